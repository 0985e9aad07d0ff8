//! Training: fits a model on the job's latest dataset snapshot and saves it as a run
//! (`runs/<job name>-<model>/`), and loads saved runs back for evaluation.

mod config;
pub mod illmrec;
pub mod optim;
pub mod runs;
pub mod sasrec;
pub mod schedule;

use std::fmt;
use std::str::FromStr;

use candle_core::Device;
use serde_json::json;

pub use config::{IllmRecTrainConfig, SasRecTrainConfig, Schedule, TrainConfig, ValidationConfig};

use crate::data::prompt::Variant;
use crate::data::{DataError, Dataset};
use crate::distributed::{Collective, DistConfig};
use crate::eval::EvalError;
use crate::features::{FeatureTable, FeaturesConfig};
use crate::model::pop::Pop;
use crate::model::ModelConfig;
use crate::model::{HostTensor, ModelError, SasRec, Scorer};
use crate::store::{Store, StoreError};
use crate::telemetry::TelemetryConfig;
use crate::tensorfile::{to_bytes, Array, TensorFile, TensorFileError};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Eval(#[from] EvalError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    TensorFile(#[from] TensorFileError),
    /// Boxed: feature errors carry storage errors and would make every `Result` here large.
    #[error(transparent)]
    Features(Box<crate::features::FeatureError>),
    #[error(transparent)]
    Dist(#[from] crate::distributed::DistError),
    #[error(transparent)]
    Llm(#[from] crate::model::llm::LlmError),
    #[error("{0}")]
    Invalid(String),
}

impl From<crate::features::FeatureError> for TrainError {
    fn from(e: crate::features::FeatureError) -> Self {
        TrainError::Features(Box::new(e))
    }
}

impl From<candle_core::Error> for TrainError {
    fn from(e: candle_core::Error) -> Self {
        TrainError::Model(ModelError::Candle(e))
    }
}

pub type Result<T> = std::result::Result<T, TrainError>;

/// Models `--model` accepts.
pub const MODEL_NAMES: &str = "pop, sasrec, illmrec, illmrec:title, illmrec:description, illmrec:image+description";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    Pop,
    Sasrec,
    /// An LLM recommender on the frozen LLM; `illmrec` is the image variant (I-LLMRec), the others
    /// the prompt baselines on the same retrieval head.
    Illmrec(Variant),
}

impl FromStr for ModelKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "pop" => Ok(ModelKind::Pop),
            "sasrec" => Ok(ModelKind::Sasrec),
            "illmrec" => Ok(ModelKind::Illmrec(Variant::Image)),
            _ => match s.strip_prefix("illmrec:").map(str::parse::<Variant>) {
                Some(Ok(v)) => Ok(ModelKind::Illmrec(v)),
                _ => Err(format!("unknown model `{s}` ({MODEL_NAMES})")),
            },
        }
    }
}

impl fmt::Display for ModelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelKind::Pop => f.write_str("pop"),
            ModelKind::Sasrec => f.write_str("sasrec"),
            ModelKind::Illmrec(Variant::Image) => f.write_str("illmrec"),
            ModelKind::Illmrec(v) => write!(f, "illmrec:{}", v.name()),
        }
    }
}

/// What training reads of a job: its name (runs are saved as `<name>-<model>`), its dataset, the
/// sections that shape a model and its training, and the artefacts earlier stages handed over. The
/// `config` layer assembles it from a job file; training never sees the file itself.
#[derive(Debug, Clone)]
pub struct TrainJob<'a> {
    pub name: &'a str,
    pub dataset: &'a str,
    pub features: &'a FeaturesConfig,
    pub model: &'a ModelConfig,
    pub train: &'a TrainConfig,
    pub dist: &'a DistConfig,
    pub telemetry: &'a TelemetryConfig,
    /// Where SASRec's item table (the CF feature) lies in the store.
    pub cf_table: String,
}

impl TrainJob<'_> {
    /// The run a model of the job is saved as: `<job>-<model>`, with `:` and `+` spelled `-`.
    pub fn run_id(&self, kind: ModelKind) -> String {
        run_id(self.name, kind)
    }
}

/// The run of `kind` in the job named `job`.
pub fn run_id(job: &str, kind: ModelKind) -> String {
    format!("{job}-{}", kind.to_string().replace([':', '+'], "-"))
}

/// What a training run produced, for the terminal.
pub struct TrainReport {
    pub run_id: String,
    pub summary: String,
    /// Stopped on a preemption signal with a checkpoint; the command should exit for a requeue.
    pub preempted: bool,
}

/// Fits `kind` on the latest snapshot of the job's dataset and saves it.
pub fn train(
    job: &TrainJob<'_>,
    store: &Store,
    kind: ModelKind,
    opts: illmrec::TrainOptions,
    coll: &mut crate::distributed::Guarded,
) -> Result<TrainReport> {
    let id = job.run_id(kind);
    let _stage = tracing::info_span!("stage", stage = "train", model = %kind, run = %id).entered();
    if opts.from.is_some() && !matches!(kind, ModelKind::Illmrec(_)) {
        return Err(TrainError::Invalid(format!("--from: warm starts apply to LLM recommenders, not {kind}")));
    }
    if let ModelKind::Illmrec(variant) = kind {
        let r = illmrec::fit(job, store, variant, opts, coll)?;
        if coll.rank() == 0 {
            runs::put_report(store, &id, "fit.json", serde_json::to_vec_pretty(&r).unwrap_or_default())?;
        }
        let last = r.log.last().map(|l| l.losses).unwrap_or_default();
        let mut resumed = r.resumed_from.map(|s| format!(" (resumed at step {s})")).unwrap_or_default();
        if r.preempted {
            resumed.push_str(" (stopped early on a preemption signal; resume to finish)");
        }
        let summary = format!(
            "{kind}: steps {}..{} of {}{resumed} in {:.1}s ({:.2} samples/s), loss {:.4} (reri {:.4}, risa {:.4}); \
             {} trainable values on {}; {:.1} tokens per item, {:.0} tokens per prompt; {} items via fallback; \
             {} x {}, {:.1}s in collectives",
            r.first_step,
            r.last_step,
            r.total_steps,
            r.seconds,
            r.samples_per_second,
            last.loss,
            last.reri,
            last.risa,
            r.trainable_parameters,
            r.llm,
            r.tokens_per_item,
            r.mean_prompt_tokens,
            r.fallback_items,
            r.world_size,
            r.backend,
            r.collective_seconds
        );
        return Ok(TrainReport { run_id: id, summary, preempted: r.preempted });
    }
    if coll.world() > 1 {
        return Err(TrainError::Invalid(format!("{kind} trains in one process; start it without mpirun/srun")));
    }
    let ds = crate::data::snapshot::load(store, job.dataset)?;
    let summary = match kind {
        ModelKind::Pop => {
            let pop = Pop::fit(ds.num_items(), (0..ds.num_users()).map(|u| ds.train(u)));
            let bytes = to_bytes(vec![("counts".into(), Array::F32(&pop.counts, vec![pop.counts.len()]))], None);
            runs::save(store, &id, 1, vec![("model.safetensors", bytes)], &run_state(kind, &ds), 2, false)?;
            format!("pop: counted {} training interactions", pop.counts.iter().sum::<f32>())
        }
        ModelKind::Sasrec => train_sasrec(job, store, &ds, &id, None)?,
        ModelKind::Illmrec(_) => unreachable!("handled above"),
    };
    Ok(TrainReport { run_id: id, summary, preempted: false })
}

/// What a baseline run's state.json records of its model and data.
fn run_state(kind: impl fmt::Display, ds: &Dataset) -> serde_json::Value {
    json!({"model": kind.to_string(), "dataset": ds.name, "dataset_key": ds.key, "num_items": ds.num_items()})
}

/// Trains the job's SASRec on `ds` and saves it as run `id`, with its item table as the CF feature.
/// `item_init` (`[(items + 1) x hidden]`) replaces the random initial item table (MSRBench's S2).
/// Returns the summary line.
pub fn train_sasrec(
    job: &TrainJob<'_>,
    store: &Store,
    ds: &Dataset,
    id: &str,
    item_init: Option<&[f32]>,
) -> Result<String> {
    let (model, report) =
        sasrec::fit(ds, &job.model.sasrec, &job.train.sasrec, job.train.seed, job.telemetry, item_init)?;
    let mut state = run_state(ModelKind::Sasrec, ds);
    state["config"] = serde_json::to_value(&job.model.sasrec).unwrap_or_default();
    state["fit"] = serde_json::to_value(&report).unwrap_or_default();
    state["item_init"] = json!(item_init.is_some());
    let weights = model.to_host()?;
    let bytes =
        to_bytes(weights.iter().map(|t| (t.name.clone(), Array::F32(&t.values, t.shape.clone()))).collect(), None);
    save_cf_table(store, id, ds, &model)?;
    runs::save(store, id, 1, vec![("model.safetensors", bytes)], &state, 2, false)?;
    Ok(format!(
        "sasrec{}: {} epochs ({} steps) in {:.1}s, best valid ndcg@10 {:.4} at epoch {}, final loss {:.4}",
        if item_init.is_some() { " (item table from text)" } else { "" },
        report.epochs_run,
        report.steps,
        report.seconds,
        report.best_valid_ndcg10,
        report.best_epoch,
        report.last_loss
    ))
}

/// SASRec's item embeddings (rows 1..=N) as a feature table keyed by the items' source ids.
fn save_cf_table(store: &Store, run_id: &str, ds: &Dataset, model: &SasRec) -> Result<()> {
    let emb = model.item_embeddings().narrow(0, 1, ds.num_items())?;
    let table = FeatureTable::new(
        ds.items.iter().map(|i| i.id.clone()).collect(),
        model.cfg.hidden,
        emb.flatten_all()?.to_vec1::<f32>()?,
    )
    .map_err(|e| TrainError::Invalid(e.to_string()))?;
    store.put(&crate::features::cf_table_key(run_id), table.to_bytes())?;
    Ok(())
}

/// Loads a checkpoint (`which`) of the job's `kind` run, checking it was trained on `ds` (an
/// I-LLMRec run also scores a grown catalog).
pub fn load_scorer<'d>(
    job: &TrainJob<'_>,
    store: &Store,
    kind: ModelKind,
    ds: &'d Dataset,
    which: runs::Which,
) -> Result<Box<dyn Scorer + 'd>> {
    if let ModelKind::Illmrec(variant) = kind {
        return Ok(Box::new(illmrec::load_scorer(job, store, ds, variant, which)?));
    }
    let id = job.run_id(kind);
    match kind {
        ModelKind::Pop => {
            let (tf_bytes, _) = checkpoint_of(store, &id, kind, ds, which)?;
            let tf = TensorFile::parse(&tf_bytes, &format!("runs/{id} checkpoint"))?;
            let (_, counts) = tf.f32("counts")?;
            if counts.len() != ds.num_items() + 1 {
                return Err(TrainError::Invalid(format!(
                    "run {id}: {} item counts for {} items",
                    counts.len(),
                    ds.num_items()
                )));
            }
            Ok(Box::new(Pop { counts }))
        }
        ModelKind::Sasrec => Ok(Box::new(load_sasrec(store, &id, ds, which)?)),
        ModelKind::Illmrec(_) => unreachable!("handled above"),
    }
}

/// The model file and state of a baseline run's checkpoint, checked to be trained on `ds`.
fn checkpoint_of(
    store: &Store,
    id: &str,
    kind: impl fmt::Display,
    ds: &Dataset,
    which: runs::Which,
) -> Result<(bytes::Bytes, serde_json::Value)> {
    let ckpt = runs::load(store, id, which)?.ok_or_else(|| {
        TrainError::Invalid(format!(
            "no trained `{kind}` under {}/runs/{id}: run `illmrec train --job FILE --model {kind}` first",
            store.url()
        ))
    })?;
    let trained_on = ckpt.state["dataset_key"].as_str().unwrap_or("?");
    if trained_on != ds.key {
        return Err(TrainError::Invalid(format!(
            "run {id} was trained on dataset snapshot {trained_on}, but the latest snapshot is {}: train again",
            ds.key
        )));
    }
    Ok((ckpt.file("model.safetensors")?.clone(), ckpt.state.clone()))
}

/// The SASRec saved as run `id` (by `train_sasrec`), checked to be trained on `ds`.
pub fn load_sasrec(store: &Store, id: &str, ds: &Dataset, which: runs::Which) -> Result<SasRec> {
    let (bytes, state) = checkpoint_of(store, id, ModelKind::Sasrec, ds, which)?;
    let tf = TensorFile::parse(&bytes, &format!("runs/{id} checkpoint"))?;
    let cfg = serde_json::from_value(state["config"].clone())
        .map_err(|e| TrainError::Invalid(format!("run {id}: state.json config: {e}")))?;
    // The initial values are overwritten by the checkpoint's.
    let model = SasRec::new(cfg, ds.num_items(), &mut crate::seed::stream(0, "sasrec/load", 0), &Device::Cpu)?;
    let weights = tf
        .names()
        .into_iter()
        .map(|name| tf.f32(&name).map(|(shape, values)| HostTensor { name, shape, values }))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    model.load_host(&weights)?;
    Ok(model)
}
