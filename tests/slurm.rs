//! `illmrec submit slurm` on a real one-node Slurm (slurmctld + slurmd from Debian, started on
//! 127.0.0.1 by scripts/slurm-local.sh, installed by scripts/setup.sh): a 2-task job of the tiny model
//! runs to the end with its checkpoint and report; the same job requeued mid-run (`scontrol requeue`)
//! and preempted (SIGUSR1 to the batch script, as `--signal=B:USR1@N` sends it before the time limit)
//! resumes from LATEST and ends with the same parameters as the uninterrupted run; `illmrec status`
//! and `illmrec cancel` follow the jobs.
// Ranks talk over MPI: only a build with the `mpi` feature can run these (scripts/test.sh builds it).
#![cfg(feature = "mpi")]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use illmrec::store::Store;

mod common;
use common::{largest_difference, latest_weights};

const BIN: &str = env!("CARGO_BIN_EXE_illmrec");

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/slurm-local.sh")
}

/// The local Slurm, stopped on drop.
struct Slurm {
    dir: PathBuf,
}

impl Slurm {
    fn start(dir: &Path) -> Self {
        // Ports the OS says are free, so a leftover or a neighbour's Slurm cannot collide.
        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (ctld, slurmd) = (a.local_addr().unwrap().port(), b.local_addr().unwrap().port());
        drop((a, b));
        let out = Command::new(script())
            .arg("start")
            .arg(dir)
            .env("SLURM_LOCAL_CTLD_PORT", ctld.to_string())
            .env("SLURM_LOCAL_SLURMD_PORT", slurmd.to_string())
            .output()
            .unwrap();
        if !out.status.success() {
            let _ = Command::new(script()).arg("stop").arg(dir).output();
        }
        assert!(out.status.success(), "slurm-local.sh start: {}", String::from_utf8_lossy(&out.stderr));
        Slurm { dir: dir.to_path_buf() }
    }

    fn conf(&self) -> PathBuf {
        self.dir.join("slurm.conf")
    }

    /// The daemons' last log lines, for a failure message: why a step did not launch is only there.
    fn log_tails(&self) -> String {
        let mut text = String::new();
        for name in ["slurmctld.log", "slurmd.log"] {
            let log = std::fs::read_to_string(self.dir.join("log").join(name)).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            text += &format!("--- {name} (last 60 lines)\n{}\n", lines[lines.len().saturating_sub(60)..].join("\n"));
        }
        text
    }
}

impl Drop for Slurm {
    fn drop(&mut self) {
        let _ = Command::new(script()).arg("stop").arg(&self.dir).output();
    }
}

fn job(name: &str, steps: u64) -> String {
    format!(
        r#"
name: {name}
{sections}train:
  illmrec: {{batch_size: 4, lr: 0.001, max_steps: {steps}, checkpoint_every: 5}}
dist:
  world_size: 2
  nodes: 1
  tasks_per_node: 2
  timeout_secs: 60
  slurm: {{time: "00:15:00", launcher: srun, mpi: pmix, binary: "{BIN}", output: "{name}-%j.out"}}
storage: {{root: store}}
telemetry: {{progress: log, log_every_secs: 1}}
"#,
        sections = common::tiny_sections("  dataset: shared\n")
    )
}

/// Fields drop in order: Slurm stops before its folder (pid files, state) is removed.
struct Cluster {
    slurm: Slurm,
    dir: tempfile::TempDir,
}

impl Cluster {
    fn illmrec(&self, args: &[&str]) -> String {
        let out = Command::new(BIN)
            .args(args)
            .current_dir(self.dir.path())
            .env("SLURM_CONF", self.slurm.conf())
            .output()
            .unwrap();
        assert!(out.status.success(), "illmrec {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn slurm_cmd(&self, program: &str, args: &[&str]) {
        let out = Command::new(program).args(args).env("SLURM_CONF", self.slurm.conf()).output().unwrap();
        assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Submits `<name>.yaml`; the Slurm job id.
    fn submit(&self, name: &str, steps: u64) -> String {
        std::fs::write(self.dir.path().join(format!("{name}.yaml")), job(name, steps)).unwrap();
        let out = self.illmrec(&["submit", "slurm", "--job", &format!("{name}.yaml")]);
        out.split_whitespace().nth(1).expect(&out).to_string()
    }

    fn state(&self, id: &str) -> String {
        let out = self.illmrec(&["status", id]);
        out.split_whitespace().nth(3).unwrap_or_default().to_string()
    }

    fn wait_for(&self, id: &str, what: &str, limit: Duration, done: impl Fn(&str) -> bool) -> String {
        let started = Instant::now();
        loop {
            let state = self.state(id);
            if done(&state) {
                return state;
            }
            assert!(
                started.elapsed() < limit,
                "job {id}: no {what} after {limit:?} (state {state}):\n{}\n{}",
                self.log(id),
                self.slurm.log_tails()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    fn wait_end(&self, id: &str) -> String {
        let end = ["COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"];
        self.wait_for(id, "end", Duration::from_secs(300), |s| end.contains(&s))
    }

    fn log(&self, id: &str) -> String {
        let mut text = String::new();
        for e in std::fs::read_dir(self.dir.path()).unwrap().flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.ends_with(&format!("-{id}.out")) {
                text += &std::fs::read_to_string(e.path()).unwrap_or_default();
            }
        }
        text
    }

    /// Waits until the run has committed a checkpoint (and is still going).
    fn wait_first_checkpoint(&self, id: &str, name: &str) {
        let latest = self.dir.path().join(format!("store/runs/{name}-illmrec/checkpoints/LATEST"));
        let started = Instant::now();
        while !latest.exists() {
            assert!(started.elapsed() < Duration::from_secs(180), "job {id}: no checkpoint:\n{}", self.log(id));
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn weights(&self, name: &str) -> Vec<(String, Vec<f32>)> {
        let store = Store::open(&self.dir.path().join("store").display().to_string()).unwrap();
        latest_weights(&store, &format!("{name}-illmrec"))
    }
}

#[test]
fn slurm_jobs_run_requeue_and_preempt_to_the_same_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let slurm = Slurm::start(&dir.path().join("slurm"));
    let c = Cluster { slurm, dir };
    // Prepare the shared dataset and features once, outside Slurm.
    std::fs::write(c.dir.path().join("prep.yaml"), job("prep", 1)).unwrap();
    for stage in ["synth", "prepare", "features"] {
        c.illmrec(&[stage, "--job", "prep.yaml"]);
    }
    let steps = 300;

    // Uninterrupted.
    let straight = c.submit("straight", steps);
    assert_eq!(c.wait_end(&straight), "COMPLETED", "{}", c.log(&straight));
    let log = c.log(&straight);
    assert!(log.contains(&format!("steps 0..{steps} of {steps}")), "{log}");
    assert!(log.contains("2 x mpi"), "two MPI ranks under srun --mpi=pmix:\n{log}");
    let fit = c.dir.path().join("store/runs/straight-illmrec/report/fit.json");
    let fit: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fit).unwrap()).unwrap();
    assert_eq!((fit["world_size"].as_u64(), fit["last_step"].as_u64()), (Some(2), Some(steps)));

    // Requeued mid-run by the scheduler (node trouble, an admin): the ranks are killed; the job starts
    // again and resumes from the last committed checkpoint.
    let requeued = c.submit("requeued", steps);
    c.wait_first_checkpoint(&requeued, "requeued");
    c.slurm_cmd("scontrol", &["requeue", &requeued]);
    assert_eq!(c.wait_end(&requeued), "COMPLETED", "{}", c.log(&requeued));
    let log = c.log(&requeued);
    assert!(log.contains("restart 1 of at most 3"), "the job did not restart:\n{log}");
    assert!(log.contains("resumed at step"), "{log}");

    // Preempted: SIGUSR1 to the batch script, as Slurm sends it before the time limit. The ranks
    // agree on a step, checkpoint, exit 76; the script requeues the job; it resumes.
    let preempted = c.submit("preempted", steps);
    c.wait_first_checkpoint(&preempted, "preempted");
    c.slurm_cmd("scancel", &["--signal=USR1", "--batch", &preempted]);
    assert_eq!(c.wait_end(&preempted), "COMPLETED", "{}", c.log(&preempted));
    let log = c.log(&preempted);
    assert!(log.contains("stopped early on a preemption signal"), "{log}");
    assert!(log.contains("requeueing job"), "{log}");
    assert!(log.contains("restart 1 of at most 3") && log.contains("resumed at step"), "{log}");

    let reference = c.weights("straight");
    for name in ["requeued", "preempted"] {
        let (diff, at) = largest_difference(&reference, &c.weights(name));
        eprintln!("{name}: largest relative difference to the uninterrupted job {diff:.2e}");
        assert_eq!(diff, 0.0, "{name} differs at {at}");
    }

    // Cancel.
    let cancelled = c.submit("cancelled", 100_000);
    c.wait_for(&cancelled, "start", Duration::from_secs(120), |s| s == "RUNNING");
    c.illmrec(&["cancel", &cancelled]);
    assert_eq!(c.wait_end(&cancelled), "CANCELLED");
    let all = c.illmrec(&["status"]);
    assert_eq!(all.lines().count(), 4, "{all}");
}
