//! Evaluation: Hit@k and NDCG@k of each user's held-out item under the `full` and `sampled:N`
//! protocols, over all users or a seeded sample of them.

pub mod candidates;
pub mod cost;
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

/// One model under one protocol (`full`, `sampled:N`, or fixed candidate lists: `candidates:<file>`).
#[derive(Debug, Clone)]
pub struct EvalResult {
    pub model: String,
    pub protocol: String,
    pub split: Split,
    pub users: usize,
    pub metrics: Metrics,
}

impl EvalResult {
    /// `{"model", "protocol", "users", "metrics": {...}}`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "model": self.model,
            "protocol": self.protocol,
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
    Ok(target_ranks(scorer, ds, plan, progress)?.iter().map(|ranks| metrics_of(ranks, plan.ks)).collect())
}

/// Hit@k and NDCG@k of targets with these 0-based ranks.
pub fn metrics_of(ranks: &[usize], ks: &[usize]) -> Metrics {
    let mut sums = MetricSums::new(ks);
    for &r in ranks {
        sums.add(r);
    }
    sums.means()
}

/// The checks every score row passes before it is ranked: one score per item, all finite.
fn check_scores(
    scores: &[f32],
    rows: usize,
    width: usize,
    user_of_row: impl Fn(usize) -> String,
) -> Result<(), EvalError> {
    if scores.len() != rows * width {
        return Err(EvalError::Invalid(format!(
            "the model returned {} scores for {rows} users x {width} items",
            scores.len()
        )));
    }
    for row in 0..rows {
        let s = &scores[row * width..(row + 1) * width];
        if let Some(i) = s[1..].iter().position(|v| !v.is_finite()) {
            return Err(EvalError::Invalid(format!(
                "the model scored item {} of user {} as {}",
                i + 1,
                user_of_row(row),
                s[i + 1]
            )));
        }
    }
    Ok(())
}

/// The target's 0-based rank (ties against it) for every user of the plan under every protocol:
/// `ranks[p][i]` is user `plan.users[i]` under `plan.protocols[p]`.
pub fn target_ranks(
    scorer: &dyn Scorer,
    ds: &Dataset,
    plan: &Plan<'_>,
    progress: Option<&TelemetryConfig>,
) -> Result<Vec<Vec<usize>>, EvalError> {
    let Plan { split, protocols, users, batch_size, .. } = *plan;
    for p in protocols {
        match p {
            Protocol::Sampled(n) if *n > ds.negatives.per_user => {
                return Err(EvalError::Invalid(format!("protocol {p} needs {n} negatives per user; the snapshot stores {} (raise data.negatives and prepare again)", ds.negatives.per_user)));
            }
            Protocol::Candidates => {
                return Err(EvalError::Invalid("fixed candidate lists rank their own users: eval::candidates".into()));
            }
            _ => {}
        }
    }
    let width = ds.num_items() + 1;
    let mut ranks: Vec<Vec<usize>> = protocols.iter().map(|_| Vec::with_capacity(users.len())).collect();
    let mut in_history = vec![false; width];
    let mut bar = progress.map(|t| Progress::new(t, "eval", users.len() as u64));
    for chunk in users.chunks(batch_size.max(1)) {
        let histories: Vec<&[u32]> = chunk.iter().map(|&u| ds.history(u, split)).collect();
        let scores = scorer.score_users(chunk, &histories)?;
        check_scores(&scores, chunk.len(), width, |row| ds.user_ids[chunk[row]].clone())?;
        for (row, &u) in chunk.iter().enumerate() {
            let s = &scores[row * width..(row + 1) * width];
            let target = ds.target(u, split) as usize;
            let ts = s[target];
            for &h in histories[row] {
                in_history[h as usize] = true;
            }
            for (p, out) in protocols.iter().zip(&mut ranks) {
                out.push(match p {
                    Protocol::Full => metrics::pessimistic_rank(
                        ts,
                        (1..width).filter(|&i| i != target && !in_history[i]).map(|i| s[i]),
                    ),
                    Protocol::Sampled(n) => {
                        metrics::pessimistic_rank(ts, ds.negatives(u, split, *n).iter().map(|&i| s[i as usize]))
                    }
                    Protocol::Candidates => unreachable!("refused above"),
                });
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
    Ok(ranks)
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
