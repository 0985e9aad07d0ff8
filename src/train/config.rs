//! The `train` section of a job.

use serde::{Deserialize, Serialize};

use crate::eval::{Protocol, UserSample};
use crate::invalid::Invalid;
use crate::model::illmrec::RetrievalLoss;

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
    /// IISAN trains in SASRec's loop with its own settings.
    #[serde(default = "d_iisan_train")]
    pub iisan: SasRecTrainConfig,
    #[serde(default)]
    pub illmrec: IllmRecTrainConfig,
    /// Training of the graph models (FREEDOM, BM3, MMGCN).
    #[serde(default)]
    pub graph: GraphTrainConfig,
}

/// Training of the graph models: every training interaction once per epoch in batches, Adam, and
/// early stopping on the valid NDCG@10. Defaults are MMRec's (MSRBench trained them with it).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GraphTrainConfig {
    #[serde(default = "d_graph_epochs")]
    pub epochs: usize,
    /// Interactions per step.
    #[serde(default = "d_graph_batch")]
    pub batch_size: usize,
    #[serde(default = "d_lr")]
    pub lr: f64,
    /// Epochs between validations.
    #[serde(default = "d_one")]
    pub eval_every: usize,
    /// Validations without a better valid NDCG@10 before training stops.
    #[serde(default = "d_graph_patience")]
    pub patience: usize,
    #[serde(default = "d_protocol")]
    pub early_stopping_protocol: Protocol,
}

fn d_graph_epochs() -> usize {
    1000
}
fn d_graph_batch() -> usize {
    2048
}
fn d_graph_patience() -> usize {
    20
}

impl Default for GraphTrainConfig {
    fn default() -> Self {
        Self {
            epochs: d_graph_epochs(),
            batch_size: d_graph_batch(),
            lr: d_lr(),
            eval_every: 1,
            patience: d_graph_patience(),
            early_stopping_protocol: d_protocol(),
        }
    }
}

/// Training of the LLM recommenders (every prompt variant). Defaults are the paper's.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IllmRecTrainConfig {
    #[serde(default = "d_llm_epochs")]
    pub epochs: u64,
    /// Users per step over all ranks (the global batch): each of N ranks takes batch_size / N of
    /// them, so it must be a multiple of the number of ranks.
    #[serde(default = "d_llm_batch")]
    pub batch_size: usize,
    #[serde(default = "d_llm_lr")]
    pub lr: f64,
    #[serde(default = "d_llm_betas")]
    pub betas: [f64; 2],
    #[serde(default)]
    pub weight_decay: f64,
    /// Global-norm gradient clipping; 0 turns it off.
    #[serde(default = "d_clip")]
    pub grad_clip: f64,
    /// Weight of L_RISA in L = L_RERI + w * L_RISA.
    #[serde(default = "d_risa")]
    pub risa_weight: f64,
    /// Stop after this many steps instead of `epochs` (the learning-rate schedule ends there too).
    #[serde(default)]
    pub max_steps: Option<u64>,
    /// Steps between checkpoints (one is always written at the end).
    #[serde(default = "d_ckpt_every")]
    pub checkpoint_every: u64,
    /// Checkpoints kept (at least 2, so a damaged newest one leaves a good one).
    #[serde(default = "d_keep")]
    pub keep_checkpoints: usize,
    /// Users per LLM call when scoring (evaluation, recommend, validation).
    #[serde(default = "d_eval_batch")]
    pub eval_batch_size: usize,
    /// Learning-rate schedule after the warm-up: `linear` decay to 0 (the paper) or `cosine`.
    #[serde(default)]
    pub schedule: Schedule,
    /// Steps of linear warm-up from 0 to `lr` (the paper: none).
    #[serde(default)]
    pub warmup_steps: u64,
    /// Learning rate of the projection heads, when it should differ from `lr` (same schedule).
    #[serde(default)]
    pub head_lr: Option<f64>,
    /// Training windows drawn per user and epoch (the paper: 1).
    #[serde(default = "d_one")]
    pub windows_per_user: usize,
    /// Negatives per training window for L_RERI (the paper: 1).
    #[serde(default = "d_one")]
    pub negatives: usize,
    /// `bce` (the paper) or `softmax` over the target and its negatives.
    #[serde(default)]
    pub reri_loss: RetrievalLoss,
    /// Steps between validations on the valid split (default: once per epoch); validation also runs
    /// after the last step. 0 turns validation, early stopping and the BEST checkpoint off.
    #[serde(default)]
    pub validate_every: Option<u64>,
    /// Validations in a row without a better validation metric before training stops early; unset:
    /// never stop early.
    #[serde(default = "d_patience_llm")]
    pub patience: Option<usize>,
    /// What validation scores.
    #[serde(default)]
    pub validation: ValidationConfig,
}

/// The learning rate after the warm-up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// Linear decay to 0 at the last step.
    #[default]
    Linear,
    /// Half a cosine from `lr` to 0.
    Cosine,
}

/// What training validates on: a fixed seeded sample of users' valid targets, under one protocol,
/// and the metric that decides BEST and early stopping.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ValidationConfig {
    #[serde(default = "d_valid_users")]
    pub users: UserSample,
    /// Default: sampled:100, or as many negatives as the snapshot stores when fewer (full without).
    #[serde(default)]
    pub protocol: Option<Protocol>,
    /// The metric that decides BEST and early stopping: hit@K or ndcg@K.
    #[serde(default = "d_valid_metric")]
    pub metric: String,
    /// A validation counts as better only when it beats the best by more than this: a smaller gain
    /// (noise, on a few hundred users) leaves BEST where it is and lets the patience run on. Left
    /// out of the settings a checkpoint records while 0, so runs from before it resume.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub min_delta: f64,
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

fn d_one() -> usize {
    1
}
fn d_valid_users() -> UserSample {
    UserSample::Named(crate::eval::users::UserSampleName::Cochran)
}
fn d_valid_metric() -> String {
    "ndcg@10".into()
}
fn d_patience_llm() -> Option<usize> {
    Some(3)
}

impl Default for ValidationConfig {
    fn default() -> Self {
        Self { users: d_valid_users(), protocol: None, metric: d_valid_metric(), min_delta: 0.0 }
    }
}

impl ValidationConfig {
    /// The protocol for a snapshot that stores `negatives` per user.
    pub fn protocol_for(&self, negatives: usize) -> Protocol {
        self.protocol.unwrap_or(match negatives.min(100) {
            0 => Protocol::Full,
            n => Protocol::Sampled(n),
        })
    }

    /// The cut-off of `metric` (`hit@5` -> 5).
    pub fn metric_k(&self) -> Option<usize> {
        let (name, k) = self.metric.split_once('@')?;
        let k: usize = k.parse().ok()?;
        (matches!(name, "hit" | "ndcg") && k > 0).then_some(k)
    }

    fn validate(&self) -> Result<(), Invalid> {
        if self.metric_k().is_none() {
            return Err(Invalid::new("metric", format!("`{}` is not hit@K or ndcg@K", self.metric)));
        }
        if self.protocol == Some(Protocol::Candidates) {
            return Err(Invalid::new(
                "protocol",
                "fixed candidate lists are test lists: validate with full or sampled:N",
            ));
        }
        if self.users == UserSample::Count(0) {
            return Err(Invalid::new("users", "0 users would validate nothing"));
        }
        if !(self.min_delta >= 0.0 && self.min_delta.is_finite()) {
            return Err(Invalid::new("min_delta", format!("{} is not a finite value >= 0", self.min_delta)));
        }
        Ok(())
    }
}

fn d_llm_epochs() -> u64 {
    8
}
fn d_llm_batch() -> usize {
    8
}
fn d_llm_lr() -> f64 {
    5e-5
}
fn d_llm_betas() -> [f64; 2] {
    [0.9, 0.999]
}
fn d_clip() -> f64 {
    1.0
}
fn d_risa() -> f64 {
    1.0
}
fn d_ckpt_every() -> u64 {
    200
}
fn d_keep() -> usize {
    2
}
fn d_eval_batch() -> usize {
    16
}

impl Default for IllmRecTrainConfig {
    fn default() -> Self {
        Self {
            epochs: d_llm_epochs(),
            batch_size: d_llm_batch(),
            lr: d_llm_lr(),
            betas: d_llm_betas(),
            weight_decay: 0.0,
            grad_clip: d_clip(),
            risa_weight: d_risa(),
            max_steps: None,
            checkpoint_every: d_ckpt_every(),
            keep_checkpoints: d_keep(),
            eval_batch_size: d_eval_batch(),
            schedule: Schedule::Linear,
            warmup_steps: 0,
            head_lr: None,
            windows_per_user: 1,
            negatives: 1,
            reri_loss: RetrievalLoss::Bce,
            validate_every: None,
            patience: d_patience_llm(),
            validation: ValidationConfig::default(),
        }
    }
}

impl IllmRecTrainConfig {
    /// Whether training validates (and so keeps a BEST checkpoint and may stop early).
    pub fn validates(&self) -> bool {
        self.validate_every != Some(0)
    }

    pub fn validate(&self) -> Result<(), Invalid> {
        let bad = |k: &str, m: &str| Err(Invalid::new(k, m));
        if self.epochs == 0 || self.batch_size == 0 || self.eval_batch_size == 0 {
            return bad("batch_size", "epochs, batch_size and eval_batch_size must be at least 1");
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad("lr", "must be a positive number");
        }
        if self.betas.iter().any(|b| !(0.0..1.0).contains(b)) {
            return bad("betas", "both must be in [0, 1)");
        }
        if self.weight_decay < 0.0 || self.grad_clip < 0.0 || self.risa_weight < 0.0 {
            return bad("weight_decay", "weight_decay, grad_clip and risa_weight must not be negative");
        }
        if self.max_steps == Some(0) {
            return bad("max_steps", "must be at least 1");
        }
        if self.checkpoint_every == 0 {
            return bad("checkpoint_every", "must be at least 1");
        }
        if self.keep_checkpoints < 2 {
            return bad("keep_checkpoints", "must be at least 2");
        }
        if self.head_lr.is_some_and(|lr| !(lr > 0.0 && lr.is_finite())) {
            return bad("head_lr", "must be a positive number");
        }
        if self.windows_per_user == 0 || self.negatives == 0 {
            return bad("windows_per_user", "windows_per_user and negatives must be at least 1");
        }
        if self.patience == Some(0) {
            return bad("patience", "must be at least 1 (leave it unset to never stop early)");
        }
        self.validation.validate().map_err(|e| Invalid::new(format!("validation.{}", e.key), e.message))
    }
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

impl SasRecTrainConfig {
    pub fn validate(&self) -> Result<(), Invalid> {
        let s = self;
        let bad = |k: &str, m: &str| Err(Invalid::new(k, m));
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
        if s.early_stopping_protocol == Protocol::Candidates {
            return bad("early_stopping_protocol", "fixed candidate lists are test lists: use full or sampled:N");
        }
        Ok(())
    }
}

/// IISAN's training when the job has no `train.iisan`: SASRec's loop at MSRBench's IISAN settings
/// (batch 64, lr 5e-4). Fields left out of a `train.iisan` section take `train.sasrec`'s defaults.
fn d_iisan_train() -> SasRecTrainConfig {
    SasRecTrainConfig { batch_size: 64, lr: 5e-4, ..SasRecTrainConfig::default() }
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
        Self {
            seed: default_seed(),
            models: default_models(),
            sasrec: SasRecTrainConfig::default(),
            iisan: d_iisan_train(),
            illmrec: IllmRecTrainConfig::default(),
            graph: GraphTrainConfig::default(),
        }
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<(), Invalid> {
        for (i, m) in self.models.iter().enumerate() {
            if m.parse::<super::ModelKind>().is_err() {
                return Err(Invalid::new(
                    format!("models[{i}]"),
                    format!("unknown model `{m}` ({})", super::MODEL_NAMES),
                ));
            }
        }
        self.illmrec.validate().map_err(|e| Invalid::new(format!("illmrec.{}", e.key), e.message))?;
        let prefixed = |section: &str, e: Invalid| Invalid::new(format!("{section}.{}", e.key), e.message);
        self.sasrec.validate().map_err(|e| prefixed("sasrec", e))?;
        self.iisan.validate().map_err(|e| prefixed("iisan", e))?;
        let g = &self.graph;
        let bad = |k: &str, m: &str| Err(Invalid::new(format!("graph.{k}"), m));
        if g.epochs == 0 || g.batch_size == 0 || g.eval_every == 0 || g.patience == 0 {
            return bad("epochs", "epochs, batch_size, eval_every and patience must be at least 1");
        }
        if !(g.lr > 0.0 && g.lr.is_finite()) {
            return bad("lr", "must be a positive number");
        }
        if g.early_stopping_protocol == Protocol::Candidates {
            return bad("early_stopping_protocol", "fixed candidate lists are test lists: use full or sampled:N");
        }
        Ok(())
    }
}
