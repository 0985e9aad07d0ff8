//! Evaluation: Hit@k and NDCG@k of each user's held-out item under the `full` and `sampled:N`
//! protocols, over all users or a seeded sample of them.

pub mod metrics;
pub mod plots;
pub mod protocol;
pub mod recommend;
pub mod report;
pub mod users;

use serde::{Deserialize, Serialize};

use crate::data::{Dataset, Split};
use crate::invalid::Invalid;
use crate::model::{ModelError, Scorer};
use crate::telemetry::{Progress, TelemetryConfig};
pub use metrics::{MetricSums, Metrics};
pub use protocol::Protocol;
pub use users::UserSample;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    #[serde(default = "default_ks")]
    pub ks: Vec<usize>,
    #[serde(default = "default_protocols")]
    pub protocols: Vec<Protocol>,
    /// all, a count, or cochran.
    #[serde(default)]
    pub users: UserSample,
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Users scored per model call.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
}

fn default_ks() -> Vec<usize> {
    vec![1, 5, 10]
}
fn default_protocols() -> Vec<Protocol> {
    vec![Protocol::Full, Protocol::Sampled(100), Protocol::Sampled(29)]
}
fn default_seed() -> u64 {
    2024
}
fn default_batch() -> usize {
    256
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            ks: default_ks(),
            protocols: default_protocols(),
            users: UserSample::default(),
            seed: default_seed(),
            batch_size: default_batch(),
        }
    }
}

impl EvalConfig {
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.ks.is_empty() || self.ks.contains(&0) {
            return Err(Invalid::new("ks", "must be a non-empty list of positive cut-offs"));
        }
        if self.protocols.is_empty() {
            return Err(Invalid::new("protocols", "must list at least one protocol"));
        }
        if self.batch_size == 0 {
            return Err(Invalid::new("batch_size", "must be at least 1"));
        }
        if self.users == UserSample::Count(0) {
            return Err(Invalid::new("users", "0 users would evaluate nothing"));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("{0}")]
    Invalid(String),
}

/// One model under one protocol.
#[derive(Debug, Clone)]
pub struct EvalResult {
    pub model: String,
    pub protocol: Protocol,
    pub split: Split,
    pub users: usize,
    pub metrics: Metrics,
}

impl EvalResult {
    /// `{"model", "protocol", "users", "metrics": {...}}`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "model": self.model,
            "protocol": self.protocol.to_string(),
            "users": self.users,
            "metrics": self.metrics.to_json(),
        })
    }
}

/// What to evaluate: which split, under which protocols and cut-offs, for which users.
#[derive(Debug, Clone, Copy)]
pub struct Plan<'a> {
    pub split: Split,
    pub protocols: &'a [Protocol],
    pub ks: &'a [usize],
    pub users: &'a [usize],
    /// Users scored per model call.
    pub batch_size: usize,
}

/// Scores the plan's users under every protocol. Each user's target is ranked against the
/// protocol's candidates; history items are never candidates.
pub fn evaluate(
    scorer: &dyn Scorer,
    ds: &Dataset,
    plan: &Plan<'_>,
    progress: Option<&TelemetryConfig>,
) -> Result<Vec<Metrics>, EvalError> {
    let Plan { split, protocols, ks, users, batch_size } = *plan;
    for p in protocols {
        if let Protocol::Sampled(n) = p {
            if *n > ds.negatives.per_user {
                return Err(EvalError::Invalid(format!("protocol {p} needs {n} negatives per user; the snapshot stores {} (raise data.negatives and prepare again)", ds.negatives.per_user)));
            }
        }
    }
    let n_items = ds.num_items();
    let width = n_items + 1;
    let mut sums: Vec<MetricSums> = protocols.iter().map(|_| MetricSums::new(ks)).collect();
    let mut in_history = vec![false; width];
    let mut bar = progress.map(|t| Progress::new(t, "eval", users.len() as u64));
    for chunk in users.chunks(batch_size.max(1)) {
        let histories: Vec<&[u32]> = chunk.iter().map(|&u| ds.history(u, split)).collect();
        let scores = scorer.score(&histories)?;
        if scores.len() != chunk.len() * width {
            return Err(EvalError::Invalid(format!(
                "the model returned {} scores for {} users x {width} items",
                scores.len(),
                chunk.len()
            )));
        }
        for (row, &u) in chunk.iter().enumerate() {
            let s = &scores[row * width..(row + 1) * width];
            if let Some(i) = s[1..].iter().position(|v| !v.is_finite()) {
                return Err(EvalError::Invalid(format!(
                    "the model scored item {} of user {} as {}",
                    i + 1,
                    ds.user_ids[u],
                    s[i + 1]
                )));
            }
            let target = ds.target(u, split) as usize;
            let ts = s[target];
            for &h in histories[row] {
                in_history[h as usize] = true;
            }
            for (p, sum) in protocols.iter().zip(&mut sums) {
                let rank = match p {
                    Protocol::Full => metrics::pessimistic_rank(
                        ts,
                        (1..width).filter(|&i| i != target && !in_history[i]).map(|i| s[i]),
                    ),
                    Protocol::Sampled(n) => {
                        metrics::pessimistic_rank(ts, ds.negatives(u, split, *n).iter().map(|&i| s[i as usize]))
                    }
                };
                sum.add(rank);
            }
            for &h in histories[row] {
                in_history[h as usize] = false;
            }
        }
        if let Some(b) = bar.as_mut() {
            b.inc(chunk.len() as u64);
        }
    }
    if let Some(b) = bar {
        b.finish();
    }
    Ok(sums.iter().map(MetricSums::means).collect())
}

/// A table of results, one row per (model, protocol), for the terminal and the README.
pub fn markdown_table(results: &[EvalResult]) -> String {
    let Some(first) = results.first() else { return String::new() };
    let names: Vec<&str> = first.metrics.0.iter().map(|(n, _)| n.as_str()).collect();
    let mut out = format!("| model | protocol | users | {} |\n", names.join(" | "));
    out += &format!("|---|---|---:|{}\n", "---:|".repeat(names.len()));
    for r in results {
        let vals: Vec<String> =
            names.iter().map(|n| r.metrics.get(n).map(|v| format!("{v:.4}")).unwrap_or_default()).collect();
        out += &format!("| {} | {} | {} | {} |\n", r.model, r.protocol, r.users, vals.join(" | "));
    }
    out
}

#[cfg(test)]
mod tests;
