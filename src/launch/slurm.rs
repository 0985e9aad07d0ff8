//! Slurm: the sbatch script of a job (`slurm/sbatch.sh.tmpl`), submission with `sbatch`, state with
//! `squeue` / `scontrol`, cancellation with `scancel`.

use std::path::Path;

use super::template::{render as render_template, Values};
use super::{run_client, LaunchError, Result};
use crate::config::JobConfig;
use crate::distributed::cluster::SlurmLauncher;
use crate::train::ModelKind;

const TEMPLATE: &str = include_str!("../../slurm/sbatch.sh.tmpl");

/// The batch script. `job_file` and `workdir` are paths as the nodes see them (a shared filesystem).
pub fn render(job: &JobConfig, job_file: &Path, workdir: &Path, model: ModelKind) -> Result<String> {
    let d = &job.dist;
    let s = &d.slurm;
    let mut directives = Vec::new();
    if d.gpus_per_task > 0 {
        directives.push(format!("--gpus-per-task={}", d.gpus_per_task));
    }
    if let Some(p) = &s.partition {
        directives.push(format!("--partition={p}"));
    }
    if let Some(a) = &s.account {
        directives.push(format!("--account={a}"));
    }
    directives.extend(s.extra_directives.iter().cloned());
    let launch = match s.launcher {
        // --kill-on-bad-exit: one rank's failure ends the step (the watchdog does the same inside).
        SlurmLauncher::Srun => format!("srun --mpi={} --kill-on-bad-exit=1", s.mpi),
        SlurmLauncher::Mpirun => "mpirun --bind-to none".to_string(),
    };
    let mut v = Values::default();
    v.set("name", &job.name)
        .set("model", model)
        .set("job_file", shell_word(&job_file.display().to_string()))
        .set("workdir", workdir.display())
        .set("nodes", d.nodes)
        .set("tasks_per_node", d.tasks_per_node)
        .set("cpus_per_task", d.cpus_per_task)
        .set("time", &s.time)
        .set("output", &s.output)
        .set("signal_before_secs", s.signal_before_secs)
        .set("max_restarts", s.max_restarts)
        .set("preempted_exit", crate::distributed::preempt::EXIT_CODE)
        .set("launch", launch)
        .set("binary", shell_word(&s.binary))
        .block("directives", directives.into_iter().map(|o| format!("#SBATCH {o}")).collect());
    Ok(render_template("slurm/sbatch.sh.tmpl", TEMPLATE, &v)?)
}

/// Quotes a word for the shell when it needs it.
fn shell_word(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "/._-+:=@%".contains(c)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Submits a script; the job id.
pub fn submit(script: &str) -> Result<String> {
    let out = run_client("sbatch", &["--parsable"], Some(script))?;
    let id = out.trim().split(';').next().unwrap_or_default().to_string();
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit()) {
        return Err(LaunchError::Invalid(format!("sbatch printed `{}`, not a job id", out.trim())));
    }
    Ok(id)
}

/// The job's state (PENDING, RUNNING, COMPLETED, FAILED, ...), from squeue while Slurm lists it,
/// then from `scontrol show job` until the controller forgets it.
pub fn state(id: &str) -> Result<String> {
    // `-t all`: finished jobs too, while the controller remembers them (MinJobAge).
    let queued = run_client("squeue", &["-h", "-t", "all", "-j", id, "-o", "%T"], None).unwrap_or_default();
    if let Some(s) = queued.lines().map(str::trim).find(|l| !l.is_empty()) {
        return Ok(s.to_string());
    }
    match run_client("scontrol", &["show", "job", id], None) {
        Ok(text) => {
            Ok(text.split_whitespace().find_map(|w| w.strip_prefix("JobState=")).unwrap_or("UNKNOWN").to_string())
        }
        Err(LaunchError::Failed { .. }) => Ok("GONE (finished; the controller no longer lists it)".into()),
        Err(e) => Err(e),
    }
}

pub fn cancel(id: &str) -> Result<()> {
    run_client("scancel", &[id], None).map(|_| ())
}
