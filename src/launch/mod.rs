//! `illmrec submit slurm|k8s`, `illmrec status`, `illmrec cancel`: render a job file's `dist`
//! section into an sbatch script (`slurm/`) or Kubernetes manifests (`k8s/`), hand them to the
//! scheduler's own client (`sbatch`, `kubectl`), and remember what was submitted in
//! `.illmrec/submitted.jsonl` of the working directory so `status` and `cancel` can find it.

pub mod k8s;
pub mod slurm;
mod submitted;
pub mod template;

use std::process::{Command, Stdio};

pub use submitted::{now as submitted_now, Scheduler, Submission};

use crate::config::JobConfig;
use crate::train::ModelKind;

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error(transparent)]
    Template(#[from] template::TemplateError),
    #[error("`{command}` could not run: {source} (is it installed and on PATH?)")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed { command: String, status: String, stderr: String },
    #[error("{0}")]
    Invalid(String),
    #[error("{file}: {source}")]
    Io {
        file: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, LaunchError>;

/// The model a submitted job trains: the one asked for, else the job's first LLM recommender.
pub fn model_to_train(job: &JobConfig, asked: Option<ModelKind>) -> Result<ModelKind> {
    if let Some(m) = asked {
        return match m {
            ModelKind::Illmrec(_) => Ok(m),
            other => Err(LaunchError::Invalid(format!(
                "{other} trains in one process; submit an LLM recommender (illmrec, illmrec:title, ...)"
            ))),
        };
    }
    job.train
        .models
        .iter()
        .filter_map(|m| m.parse::<ModelKind>().ok())
        .find(|m| matches!(m, ModelKind::Illmrec(_)))
        .map_or(Ok(ModelKind::Illmrec(crate::data::prompt::Variant::Image)), Ok)
}

/// Runs a scheduler client, feeding `stdin`; its stdout on success.
fn run_client(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String> {
    use std::io::Write as _;
    let command = format!("{program} {}", args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| LaunchError::Spawn { command: command.clone(), source })?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes()).map_err(|source| LaunchError::Spawn { command: command.clone(), source })?;
    }
    let out = child.wait_with_output().map_err(|source| LaunchError::Spawn { command: command.clone(), source })?;
    if !out.status.success() {
        return Err(LaunchError::Failed {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A Kubernetes-safe name from the job's name: lowercase letters, digits and dashes.
pub fn dns_name(name: &str) -> String {
    let mut s: String =
        name.to_ascii_lowercase().chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
    s.truncate(50);
    s.trim_matches('-').to_string()
}
