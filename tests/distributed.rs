//! Data-parallel training under a real launcher: `mpirun --oversubscribe` with Open MPI, the tiny
//! LLM, on loopback. N ranks must equal 1 rank with the same global batch, a dead or stalled rank
//! must end every rank quickly, and a run must resume on another number of ranks.
// Ranks talk over MPI: only a build with the `mpi` feature can run these (scripts/test.sh builds it).
#![cfg(feature = "mpi")]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use illmrec::store::Store;

mod common;
use common::largest_difference;

const BIN: &str = env!("CARGO_BIN_EXE_illmrec");

fn job(root: &str, max_steps: u64, timeout: u64) -> String {
    format!(
        r#"
name: dist
{sections}train:
  illmrec: {{batch_size: 4, lr: 0.001, max_steps: {max_steps}, checkpoint_every: 2}}
dist: {{timeout_secs: {timeout}, check_every: 2}}
storage: {{root: {root}}}
telemetry: {{progress: off}}
"#,
        sections = common::tiny_sections("")
    )
}

/// A folder with the synthetic catalog, and job files `<name>.yaml` prepared with features under
/// their own storage roots.
fn setup(jobs: &[(&str, u64, u64)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (i, (name, steps, timeout)) in jobs.iter().enumerate() {
        std::fs::write(dir.path().join(format!("{name}.yaml")), job(&format!("store-{name}"), *steps, *timeout))
            .unwrap();
        let file = format!("{name}.yaml");
        let stages: &[&str] = if i == 0 { &["synth", "prepare", "features"] } else { &["prepare", "features"] };
        for stage in stages {
            run(dir.path(), &[stage, "--job", &file]);
        }
    }
    dir
}

fn run(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).current_dir(dir).output().unwrap();
    assert!(out.status.success(), "illmrec {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn mpirun(dir: &Path, np: usize, args: &[&str]) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["--oversubscribe", "-np", &np.to_string(), BIN])
        .args(args)
        .current_dir(dir)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        // One rank per core on this 2-core machine; what `configure_threads` does for real runs.
        .env("OMPI_MCA_rmaps_base_oversubscribe", "1");
    c
}

fn train(dir: &Path, np: usize, job: &str, extra: &[&str]) {
    let file = format!("{job}.yaml");
    let mut args = vec!["train", "--job", file.as_str(), "--model", "illmrec"];
    args.extend(extra);
    let out = mpirun(dir, np, &args).output().unwrap();
    assert!(
        out.status.success(),
        "mpirun -np {np} illmrec {args:?}:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Largest relative difference allowed between runs on different numbers of ranks. They differ only in
/// rounding: the all-reduce sums in another order, and OpenBLAS rounds a row of a product slightly
/// differently depending on its place in the batch (6 steps: ~1.1e-5; ~2.5e-6 with candle's own gemm,
/// `--features mpi` without `openblas`). A rank that trains the wrong users, or an all-reduce that
/// drops a rank's share, changes the gradient itself, not its rounding.
const RANKS_TOLERANCE: f32 = 5e-5;

/// Every tensor of the run's LATEST weights, by name.
fn weights(dir: &Path, job: &str) -> Vec<(String, Vec<f32>)> {
    let store = Store::open(&dir.join(format!("store-{job}")).display().to_string()).unwrap();
    common::latest_weights(&store, "dist-illmrec")
}

/// (step, loss, L_RERI, gradient norm) of every step of the run's training log.
fn step_log(dir: &Path, job: &str) -> Vec<(u64, f64, f64, f64)> {
    let path = dir.join(format!("store-{job}/runs/dist-illmrec/report/train-log.jsonl"));
    std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let f = |k: &str| v[k].as_f64().unwrap();
            (v["step"].as_u64().unwrap(), f("loss"), f("reri"), f("grad_norm"))
        })
        .collect()
}

#[test]
fn two_ranks_equal_one_rank_with_the_same_global_batch() {
    let dir = setup(&[("one", 6, 60), ("two", 6, 60)]);
    train(dir.path(), 1, "one", &[]);
    train(dir.path(), 2, "two", &[]);
    let (diff, at) = largest_difference(&weights(dir.path(), "one"), &weights(dir.path(), "two"));
    eprintln!("2 ranks vs 1 rank after 6 steps: largest relative difference {diff:.2e} at {at}");
    assert!(diff < RANKS_TOLERANCE, "{diff} at {at}");
    // Step by step, the logged losses and gradient norms agree too: AdamW would hide a gradient
    // scaled by the same factor everywhere (a missing division by the world size) from the weights,
    // but not from these.
    let (one, two) = (step_log(dir.path(), "one"), step_log(dir.path(), "two"));
    assert_eq!(one.len(), 6);
    assert_eq!(one.len(), two.len());
    let rel = |a: f64, b: f64| (a - b).abs() / a.abs().max(1e-12);
    let mut worst: f64 = 0.0;
    for (a, b) in one.iter().zip(&two) {
        assert_eq!(a.0, b.0);
        for (x, y, what) in [(a.1, b.1, "loss"), (a.2, b.2, "reri"), (a.3, b.3, "grad_norm")] {
            worst = worst.max(rel(x, y));
            assert!(rel(x, y) < RANKS_TOLERANCE as f64, "step {}: {what} {x} on 1 rank vs {y} on 2", a.0);
        }
    }
    eprintln!("per-step loss and gradient norm, 2 ranks vs 1: largest relative difference {worst:.2e}");
}

#[test]
fn a_run_resumes_on_another_number_of_ranks() {
    let dir = setup(&[("straight", 6, 60), ("grow", 6, 60), ("shrink", 6, 60)]);
    train(dir.path(), 1, "straight", &[]);
    // 2 ranks for 3 steps, then 1 rank to the end; and the reverse.
    train(dir.path(), 2, "shrink", &["--stop-after", "3"]);
    train(dir.path(), 1, "shrink", &["--resume"]);
    train(dir.path(), 1, "grow", &["--stop-after", "3"]);
    train(dir.path(), 2, "grow", &["--resume"]);
    let straight = weights(dir.path(), "straight");
    for job in ["shrink", "grow"] {
        let (diff, at) = largest_difference(&straight, &weights(dir.path(), job));
        eprintln!("{job}: largest relative difference to the uninterrupted run {diff:.2e} at {at}");
        assert!(diff < RANKS_TOLERANCE, "{job}: {diff} at {at}");
    }
}

/// The pids of processes whose parent is `parent`.
fn children(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // Fields after the parenthesised command name: state, ppid, ...
        let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        if after.split_whitespace().nth(1).and_then(|p| p.parse::<u32>().ok()) == Some(parent) {
            out.push(pid);
        }
    }
    out
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.rsplit_once(')').map(|(_, r)| r.trim_start().starts_with('Z')).unwrap_or(true))
        .unwrap_or(false)
}

/// Starts a long 2-rank run, waits until it trains, sends `signal` to rank 1, and checks that every
/// process is gone with a non-zero status within `limit`; mpirun's exit status.
fn disrupt_one_rank(signal: &str, timeout_secs: u64, limit: Duration) -> std::process::ExitStatus {
    let dir = setup(&[("long", 100_000, timeout_secs)]);
    let log = dir.path().join("mpirun.log");
    let mut child = mpirun(dir.path(), 2, &["train", "--job", "long.yaml", "--model", "illmrec"])
        .stdout(Stdio::from(std::fs::File::create(&log).unwrap()))
        .stderr(Stdio::from(std::fs::File::create(dir.path().join("mpirun.err")).unwrap()))
        .spawn()
        .unwrap();
    // Wait for the first checkpoint: both ranks are then inside the training loop.
    let ckpt = dir.path().join("store-long/runs/dist-illmrec/checkpoints/LATEST");
    let started = Instant::now();
    while !ckpt.exists() {
        assert!(started.elapsed() < Duration::from_secs(120), "the run never reached its first checkpoint");
        assert!(
            child.try_wait().unwrap().is_none(),
            "mpirun ended early: {}",
            std::fs::read_to_string(dir.path().join("mpirun.err")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let ranks: Vec<u32> = children(child.id());
    assert_eq!(ranks.len(), 2, "expected 2 rank processes under mpirun, found {ranks:?}");
    let hit = Instant::now();
    let status = Command::new("kill").args([signal, &ranks[1].to_string()]).status().unwrap();
    assert!(status.success());
    let exit = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if hit.elapsed() > limit {
            let _ = child.kill();
            for r in &ranks {
                let _ = Command::new("kill").args(["-KILL", &r.to_string()]).status();
            }
            panic!("mpirun still running {limit:?} after {signal} of rank 1");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let took = hit.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    let left: Vec<u32> = ranks.iter().copied().filter(|&p| alive(p)).collect();
    let err = std::fs::read_to_string(dir.path().join("mpirun.err")).unwrap_or_default();
    eprintln!(
        "{signal} of rank 1: mpirun exited with {exit} after {took:?}; stderr tail: {}",
        err.lines().rev().take(3).collect::<Vec<_>>().join(" | ")
    );
    assert!(!exit.success(), "the job must fail when a rank dies");
    assert!(left.is_empty(), "rank processes survived: {left:?}");
    assert!(took < limit);
    exit
}

#[test]
fn killing_one_rank_ends_every_rank_within_a_minute() {
    let status = disrupt_one_rank("-KILL", 60, Duration::from_secs(60));
    assert_eq!(status.code(), Some(137), "mpirun reports the killed rank");
}

#[test]
fn a_stalled_rank_trips_the_watchdog_of_the_others() {
    // SIGSTOP freezes rank 1 without killing it: only the other rank's watchdog (3 s) can end this,
    // with the status that says "a collective timed out".
    let status = disrupt_one_rank("-STOP", 3, Duration::from_secs(30));
    assert_eq!(status.code(), Some(75), "the watchdog's exit status");
}

/// An OTLP receiver (scripts/otlp-receiver.py, decoding the protocol with `opentelemetry-proto`) on a
/// free loopback port, writing one JSON line per span; killed on drop.
struct OtlpReceiver {
    child: std::process::Child,
    port: u16,
    out: std::path::PathBuf,
}

impl OtlpReceiver {
    fn start(dir: &Path) -> Self {
        use std::io::BufRead as _;
        let out = dir.join("spans.jsonl");
        let mut child = Command::new("python3")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/otlp-receiver.py"))
            .args(["--port", "0", "--out"])
            .arg(&out)
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 scripts/otlp-receiver.py (scripts/setup.sh installs opentelemetry-proto)");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let port = line.trim().strip_prefix("listening ").and_then(|p| p.parse().ok()).expect(&line);
        Self { child, port, out }
    }

    fn spans(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A W3C trace context a scheduler could hand the job.
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

#[test]
fn a_two_rank_run_is_one_trace_under_the_schedulers_traceparent() {
    let dir = setup(&[("traced", 4, 60)]);
    let receiver = OtlpReceiver::start(dir.path());
    let out = mpirun(dir.path(), 2, &["train", "--job", "traced.yaml", "--model", "illmrec"])
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://127.0.0.1:{}", receiver.port))
        .env("TRACEPARENT", TRACEPARENT)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let spans = receiver.spans();
    let by_id: std::collections::HashMap<&str, &serde_json::Value> =
        spans.iter().map(|s| (s["span_id"].as_str().unwrap(), s)).collect();
    let parent_name = |s: &serde_json::Value| -> String {
        let p = s["parent_span_id"].as_str().unwrap_or_default();
        by_id.get(p).map_or(String::new(), |p| p["name"].as_str().unwrap().to_string())
    };
    // One trace for the whole job, the scheduler's.
    assert!(spans.iter().all(|s| s["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"), "one trace id across ranks");
    let job_of = |rank: i64| -> &serde_json::Value {
        let jobs: Vec<&serde_json::Value> =
            spans.iter().filter(|s| s["name"] == "job" && s["resource"]["illmrec.rank"] == rank).collect();
        assert_eq!(jobs.len(), 1, "rank {rank}: one job span");
        jobs[0]
    };
    let (root, other) = (job_of(0), job_of(1));
    assert_eq!(root["parent_span_id"], "00f067aa0ba902b7", "rank 0's job span is the scheduler's child");
    assert_eq!(other["parent_span_id"], root["span_id"], "rank 1's job span is rank 0's child");
    for rank in 0..2i64 {
        let mine: Vec<&serde_json::Value> = spans.iter().filter(|s| s["resource"]["illmrec.rank"] == rank).collect();
        let named = |n: &str| mine.iter().filter(|s| s["name"] == n).copied().collect::<Vec<_>>();
        for s in &mine {
            assert_eq!(s["resource"]["illmrec.world_size"], 2);
            assert_eq!(s["resource"]["illmrec.job"], "dist");
            assert_eq!(s["resource"]["service.name"], "illmrec");
        }
        let job = job_of(rank);
        // Numbers travel as numbers.
        assert_eq!(
            (job["attributes"]["command"].as_str(), job["attributes"]["rank"].as_i64()),
            (Some("train"), Some(rank))
        );
        assert_eq!(job["attributes"]["world_size"].as_i64(), Some(2), "{job}");
        let stage = named("stage");
        assert!(stage.iter().any(|s| s["attributes"]["stage"] == "train" && parent_name(s) == "job"), "rank {rank}");
        assert!(named("epoch").iter().all(|s| parent_name(s) == "stage"));
        let steps = named("step");
        assert_eq!(steps.len(), 4, "rank {rank}: one span per step");
        assert!(steps.iter().all(|s| parent_name(s) == "epoch" && s["attributes"]["step"].is_i64()));
        let reduces = named("all_reduce");
        assert!(
            reduces.iter().filter(|s| parent_name(s) == "step").count() >= 4,
            "rank {rank}: an all-reduce per step"
        );
        assert!(reduces.iter().all(|s| s["attributes"]["backend"] == "mpi"));
        // Rank 0 writes the checkpoints (every 2 steps and the last), nobody else.
        let saves = named("checkpoint.save");
        assert_eq!(saves.len(), if rank == 0 { 2 } else { 0 }, "rank {rank}");
    }
}

#[test]
fn without_a_traceparent_rank_zero_starts_the_trace_of_the_job() {
    let dir = setup(&[("traced", 2, 60)]);
    let receiver = OtlpReceiver::start(dir.path());
    let out = mpirun(dir.path(), 2, &["train", "--job", "traced.yaml", "--model", "illmrec"])
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://127.0.0.1:{}", receiver.port))
        .env_remove("TRACEPARENT")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let spans = receiver.spans();
    let jobs: Vec<&serde_json::Value> = spans.iter().filter(|s| s["name"] == "job").collect();
    assert_eq!(jobs.len(), 2);
    let root = jobs.iter().find(|s| s["resource"]["illmrec.rank"] == 0).unwrap();
    assert_eq!(root["parent_span_id"], "", "rank 0's job span is the root");
    let trace = &root["trace_id"];
    assert!(spans.iter().all(|s| &s["trace_id"] == trace), "every rank's spans are in rank 0's trace");
}

#[test]
fn a_failing_command_still_flushes_its_spans_marked_as_an_error() {
    let dir = setup(&[("failing", 4, 60)]);
    let receiver = OtlpReceiver::start(dir.path());
    // Nothing is trained yet: evaluating fails.
    let out = Command::new(BIN)
        .args(["eval", "--job", "failing.yaml", "--model", "illmrec"])
        .current_dir(dir.path())
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://127.0.0.1:{}", receiver.port))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let spans = receiver.spans();
    let job = spans.iter().find(|s| s["name"] == "job").expect("the job span was exported before exit");
    assert_eq!(job["attributes"]["command"], "eval");
    assert!(job["attributes"]["error"].as_str().unwrap_or_default().contains("illmrec train"), "{job}");
    assert_eq!(job["status"]["code"], 2, "status ERROR: {job}");
}

#[test]
fn ranks_whose_parameters_drift_apart_are_stopped_by_the_digest_check() {
    // Two ranks, one job file each, identical but for the learning rate: they start equal (the
    // start-up check passes), their updates differ, and the check after step 2 must stop them.
    let dir = setup(&[("same", 6, 60)]);
    let text = std::fs::read_to_string(dir.path().join("same.yaml")).unwrap();
    std::fs::write(dir.path().join("drift.yaml"), text.replace("lr: 0.001", "lr: 0.002")).unwrap();
    let mut c = mpirun(dir.path(), 1, &["train", "--job", "same.yaml", "--model", "illmrec"]);
    c.args([":", "-np", "1", BIN, "train", "--job", "drift.yaml", "--model", "illmrec"]);
    let out = c.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "ranks with different parameters must not finish:\n{err}");
    assert!(err.contains("1 of 2 ranks differ from rank 0 in the parameters after step 2"), "{err}");
}

#[test]
fn the_world_size_is_checked_against_the_job_and_the_launcher() {
    let dir = setup(&[("sized", 2, 60)]);
    let text = std::fs::read_to_string(dir.path().join("sized.yaml")).unwrap();
    std::fs::write(dir.path().join("three.yaml"), text.replace("dist: {", "dist: {world_size: 3, ")).unwrap();
    let out = mpirun(dir.path(), 2, &["train", "--job", "three.yaml", "--model", "illmrec"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("dist.world_size is 3, but 2 ranks were started (mpirun)"), "{err}");
    // A launcher that says 2 tasks while MPI sees one process (srun without a PMI the MPI library
    // speaks starts N singletons): refused instead of training N separate copies.
    let out = Command::new(BIN)
        .args(["train", "--job", "sized.yaml", "--model", "illmrec"])
        .current_dir(dir.path())
        .env("SLURM_PROCID", "0")
        .env("SLURM_NTASKS", "2")
        .env("SLURM_TASKS_PER_NODE", "2")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("srun started 2 tasks, but the mpi backend sees a world of 1"), "{err}");
}

/// A job of the sequential baselines (SASRec, MoRec, IISAN) under its own storage root: 3 epochs of
/// batch 16, validated once at the end.
fn baseline_job(root: &str) -> String {
    let sections = common::tiny_sections("").replace(
        "model:\n",
        "model:\n  sasrec: {hidden: 16, blocks: 1, heads: 2, max_len: 6, dropout: 0.2}\n  iisan: {blocks: 2, bottleneck: 8}\n",
    );
    let fit = r#"{epochs: 3, batch_size: 16, eval_every: 3, patience: 1, early_stopping_protocol: "sampled:29"}"#;
    format!(
        "name: dist\n{sections}train:\n  sasrec: {fit}\n  iisan: {fit}\nstorage: {{root: {root}}}\ntelemetry: {{progress: off}}\n"
    )
}

#[test]
fn sequential_baselines_train_the_same_on_two_ranks_as_on_one() {
    let dir = tempfile::tempdir().unwrap();
    for (i, name) in ["one", "two"].iter().enumerate() {
        std::fs::write(dir.path().join(format!("{name}.yaml")), baseline_job(&format!("store-{name}"))).unwrap();
        let stages: &[&str] = if i == 0 { &["synth", "prepare", "features"] } else { &["prepare", "features"] };
        for stage in stages {
            run(dir.path(), &[stage, "--job", &format!("{name}.yaml")]);
        }
    }
    for model in ["sasrec", "morec:text+image", "iisan:text+image"] {
        for (np, name) in [(1, "one"), (2, "two")] {
            let file = format!("{name}.yaml");
            let out = mpirun(dir.path(), np, &["train", "--job", &file, "--model", model]).output().unwrap();
            assert!(out.status.success(), "{model} on {np} ranks: {}", String::from_utf8_lossy(&out.stderr));
        }
        let run_id = format!("dist-{}", model.replace([':', '+'], "-"));
        let model_weights = |name: &str| {
            let store = Store::open(&dir.path().join(format!("store-{name}")).display().to_string()).unwrap();
            let ckpt = illmrec::train::runs::load_latest(&store, &run_id).unwrap().expect("a saved run");
            let tf = illmrec::tensorfile::TensorFile::parse(ckpt.file("model.safetensors").unwrap(), "m").unwrap();
            // The attention key biases get no gradient by design (softmax ignores a shift shared by
            // a query's scores): Adam turns their rounding noise into full steps, so they are noise.
            let names = tf.names().into_iter().filter(|n| !n.ends_with(".bk"));
            names.map(|n| (n.clone(), tf.f32(&n).unwrap().1)).collect::<Vec<_>>()
        };
        let (diff, at) = largest_difference(&model_weights("one"), &model_weights("two"));
        eprintln!("{model}, 2 ranks vs 1 rank after 3 epochs: largest relative difference {diff:.2e} at {at}");
        assert!(diff < RANKS_TOLERANCE, "{model}: {diff} at {at}");
    }
}
