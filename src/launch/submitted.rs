//! What this working directory submitted: `.illmrec/submitted.jsonl`, one line per submission.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{LaunchError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scheduler {
    Slurm,
    K8s,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Submission {
    pub scheduler: Scheduler,
    /// Slurm's job id, or the Kubernetes workload's `kind/name`.
    pub id: String,
    pub name: String,
    pub model: String,
    pub job_file: PathBuf,
    #[serde(default)]
    pub namespace: Option<String>,
    /// Seconds since the Unix epoch.
    pub submitted_at: u64,
}

fn file(dir: &Path) -> PathBuf {
    dir.join(".illmrec").join("submitted.jsonl")
}

impl Submission {
    pub fn record(&self, dir: &Path) -> Result<()> {
        use std::io::Write as _;
        let path = file(dir);
        let io = |source| LaunchError::Io { file: path.clone(), source };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path).map_err(io)?;
        let line = serde_json::to_string(self).map_err(|e| LaunchError::Invalid(e.to_string()))?;
        writeln!(f, "{line}").map_err(io)
    }

    /// Every recorded submission, oldest first.
    pub fn all(dir: &Path) -> Result<Vec<Submission>> {
        let path = file(dir);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(LaunchError::Io { file: path, source }),
        };
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                serde_json::from_str(l)
                    .map_err(|e| LaunchError::Invalid(format!("{}, line {}: {e}", path.display(), i + 1)))
            })
            .collect()
    }

    /// The recorded submission with this id (the latest if several).
    pub fn find(dir: &Path, id: &str) -> Result<Submission> {
        Self::all(dir)?
            .into_iter()
            .rev()
            .find(|s| s.id == id)
            .ok_or_else(|| LaunchError::Invalid(format!("no submission `{id}` is recorded in {}", file(dir).display())))
    }
}

pub fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}
