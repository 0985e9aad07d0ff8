//! The `train` section of a job.

use serde::{Deserialize, Serialize};

use crate::config::Invalid;
use crate::eval::Protocol;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Models `illmrec run` trains and evaluates, in order.
    #[serde(default = "default_models")]
    pub models: Vec<String>,
    #[serde(default)]
    pub sasrec: SasRecTrainConfig,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SasRecTrainConfig {
    #[serde(default = "d_epochs")]
    pub epochs: usize,
    #[serde(default = "d_batch")]
    pub batch_size: usize,
    #[serde(default = "d_lr")]
    pub lr: f64,
    #[serde(default = "d_betas")]
    pub betas: [f64; 2],
    /// Epochs between validations.
    #[serde(default = "d_eval_every")]
    pub eval_every: usize,
    /// Validations without a better valid NDCG@10 before training stops.
    #[serde(default = "d_patience")]
    pub patience: usize,
    /// Protocol of the validation that drives early stopping.
    #[serde(default = "d_protocol")]
    pub early_stopping_protocol: Protocol,
}

fn default_seed() -> u64 {
    2024
}
fn default_models() -> Vec<String> {
    vec!["pop".into(), "sasrec".into()]
}
fn d_epochs() -> usize {
    200
}
fn d_batch() -> usize {
    128
}
fn d_lr() -> f64 {
    1e-3
}
fn d_betas() -> [f64; 2] {
    [0.9, 0.98]
}
fn d_eval_every() -> usize {
    5
}
fn d_patience() -> usize {
    5
}
fn d_protocol() -> Protocol {
    Protocol::Full
}

impl Default for SasRecTrainConfig {
    fn default() -> Self {
        Self {
            epochs: d_epochs(),
            batch_size: d_batch(),
            lr: d_lr(),
            betas: d_betas(),
            eval_every: d_eval_every(),
            patience: d_patience(),
            early_stopping_protocol: d_protocol(),
        }
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self { seed: default_seed(), models: default_models(), sasrec: SasRecTrainConfig::default() }
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<(), Invalid> {
        for (i, m) in self.models.iter().enumerate() {
            if m.parse::<super::ModelKind>().is_err() {
                return Err(Invalid::new(format!("models[{i}]"), format!("unknown model `{m}` (pop, sasrec)")));
            }
        }
        let s = &self.sasrec;
        let bad = |k: &str, m: &str| Err(Invalid::new(format!("sasrec.{k}"), m));
        if s.epochs == 0 {
            return bad("epochs", "must be at least 1");
        }
        if s.batch_size == 0 {
            return bad("batch_size", "must be at least 1");
        }
        if !(s.lr > 0.0 && s.lr.is_finite()) {
            return bad("lr", "must be a positive number");
        }
        if s.betas.iter().any(|b| !(0.0..1.0).contains(b)) {
            return bad("betas", "both must be in [0, 1)");
        }
        if s.eval_every == 0 || s.patience == 0 {
            return bad("eval_every", "eval_every and patience must be at least 1");
        }
        Ok(())
    }
}
