//! Training: fits a model on the job's latest dataset snapshot and saves it as a run
//! (`runs/<job name>-<model>/`), and loads saved runs back for evaluation.

mod config;
pub mod early_stopping;
pub mod graph;
pub mod iisan;
pub mod illmrec;
pub mod modality;
pub mod optim;
pub mod runs;
pub mod sasrec;
pub mod schedule;

use std::fmt;
use std::str::FromStr;

use candle_core::Device;
use serde_json::json;

pub use config::{GraphTrainConfig, IllmRecTrainConfig, SasRecTrainConfig, Schedule, TrainConfig, ValidationConfig};

use crate::data::prompt::Variant;
use crate::data::{DataError, Dataset};
use crate::distributed::{Collective, DistConfig};
use crate::eval::EvalError;
use crate::features::{FeatureTable, FeaturesConfig};
use crate::model::graph::{GraphKind, GraphScorer};
use crate::model::pop::Pop;
use crate::model::random::RandomScorer;
use crate::model::ModelConfig;
use crate::model::{HostTensor, ModelError, SasRec, Scorer};
use crate::store::{Store, StoreError};
use crate::telemetry::TelemetryConfig;
use crate::tensorfile::{to_bytes, Array, TensorFile, TensorFileError};
pub use modality::Modalities;

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
    #[error(transparent)]
    Device(#[from] crate::model::device::DeviceError),
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
pub const MODEL_NAMES: &str = "pop, random, sasrec, morec:text, morec:image, morec:text+image, freedom, bm3, \
     mmgcn, iisan:text, iisan:image, iisan:text+image, illmrec, illmrec:title, illmrec:description, illmrec:image+description";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    Pop,
    /// A seeded random ranking: the floor of a results table.
    Random,
    Sasrec,
    /// MoRec: SASRec whose item vectors are frozen text and/or image features through a trained
    /// linear layer.
    Morec(Modalities),
    /// IISAN: SASRec whose item vectors come from side adapter networks over the frozen text and/or
    /// image encoders' per-layer states.
    Iisan(Modalities),
    /// A graph-based multimodal recommender (FREEDOM, BM3, MMGCN) on the job's text and/or image
    /// features; trains in one process.
    Graph(GraphKind),
    /// An LLM recommender on the frozen LLM; `illmrec` is the image variant (I-LLMRec), the others
    /// the prompt baselines on the same retrieval head.
    Illmrec(Variant),
}

impl FromStr for ModelKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "pop" => Ok(ModelKind::Pop),
            "random" => Ok(ModelKind::Random),
            "sasrec" => Ok(ModelKind::Sasrec),
            "illmrec" => Ok(ModelKind::Illmrec(Variant::Image)),
            _ => {
                if let Some(Ok(m)) = s.strip_prefix("morec:").map(str::parse::<Modalities>) {
                    return Ok(ModelKind::Morec(m));
                }
                if let Some(Ok(m)) = s.strip_prefix("iisan:").map(str::parse::<Modalities>) {
                    return Ok(ModelKind::Iisan(m));
                }
                if let Some(g) = GraphKind::parse(s) {
                    return Ok(ModelKind::Graph(g));
                }
                match s.strip_prefix("illmrec:").map(str::parse::<Variant>) {
                    Some(Ok(v)) => Ok(ModelKind::Illmrec(v)),
                    _ => Err(format!("unknown model `{s}` ({MODEL_NAMES})")),
                }
            }
        }
    }
}

impl ModelKind {
    /// Whether training reads item features (so `run` computes them first).
    pub fn uses_features(self) -> bool {
        matches!(self, ModelKind::Morec(_) | ModelKind::Iisan(_) | ModelKind::Graph(_) | ModelKind::Illmrec(_))
    }
}

impl fmt::Display for ModelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelKind::Pop => f.write_str("pop"),
            ModelKind::Random => f.write_str("random"),
            ModelKind::Sasrec => f.write_str("sasrec"),
            ModelKind::Morec(m) => write!(f, "morec:{m}"),
            ModelKind::Iisan(m) => write!(f, "iisan:{m}"),
            ModelKind::Graph(g) => f.write_str(g.name()),
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
    let sequential = matches!(kind, ModelKind::Sasrec | ModelKind::Morec(_) | ModelKind::Iisan(_));
    if coll.world() > 1 && !sequential {
        return Err(TrainError::Invalid(format!("{kind} trains in one process; start it without mpirun/srun")));
    }
    let ds = crate::data::snapshot::load(store, job.dataset)?;
    let mut state = run_state(kind, &ds);
    let (tensors, summary) = match kind {
        ModelKind::Pop => {
            let pop = Pop::fit(ds.num_items(), (0..ds.num_users()).map(|u| ds.train(u)));
            let bytes = to_bytes(vec![("counts".into(), Array::F32(&pop.counts, vec![pop.counts.len()]))], None);
            (bytes, format!("pop: counted {} training interactions", pop.counts.iter().sum::<f32>()))
        }
        ModelKind::Random => {
            // Nothing is learnt: the run records the seed its scores are drawn with.
            state["seed"] = json!(job.train.seed);
            (to_bytes(Vec::new(), None), format!("random: scores drawn with seed {}", job.train.seed))
        }
        ModelKind::Sasrec | ModelKind::Morec(_) | ModelKind::Iisan(_) => {
            let model = rank0_first(coll, || {
                sasrec_model(job, store, &ds, kind, &job.model.sasrec, &job.model.iisan, job.train.seed)
            })?;
            fit_sasrec(job, store, &ds, &id, model, &kind.to_string(), kind, &mut state, coll)?
        }
        ModelKind::Graph(g) => {
            let mut model = graph::build(job, store, &ds, g, job.model, job.train.seed)?;
            let report = graph::fit(model.as_mut(), &ds, &job.train.graph, job.train.seed, job.telemetry, g)?;
            state["config"] = graph::config_json(job.model, g);
            state["fit"] = serde_json::to_value(&report).unwrap_or_default();
            runs::put_report(store, &id, "fit.json", serde_json::to_vec_pretty(&report).unwrap_or_default())?;
            let summary = report.summary(&kind.to_string());
            (weights_bytes(&crate::model::vars_to_host(model.vars())?), summary)
        }
        ModelKind::Illmrec(_) => unreachable!("handled above"),
    };
    if coll.rank() == 0 {
        runs::save(store, &id, 1, vec![("model.safetensors", tensors)], &state, 2, false)?;
    }
    Ok(TrainReport { run_id: id, summary, preempted: false })
}

/// Runs `build` on rank 0 first and on the other ranks after it, so they find the caches it filled
/// (IISAN's per-layer states) instead of computing them again; it must end within
/// `dist.startup_timeout_secs`.
fn rank0_first<T>(coll: &dyn Collective, build: impl FnOnce() -> Result<T>) -> Result<T> {
    if coll.rank() != 0 {
        coll.barrier()?;
    }
    let out = build();
    if coll.rank() == 0 {
        coll.barrier()?;
    }
    out
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
    let model = sasrec::new_model(ds, &job.model.sasrec, job.train.seed)?;
    if let Some(init) = item_init {
        model.set_item_table(init)?;
    }
    let mut state = run_state(ModelKind::Sasrec, ds);
    state["item_init"] = json!(item_init.is_some());
    let name = if item_init.is_some() { "sasrec (item table from text)" } else { "sasrec" };
    let single = crate::distributed::Single;
    let (bytes, summary) = fit_sasrec(job, store, ds, id, model, name, ModelKind::Sasrec, &mut state, &single)?;
    runs::save(store, id, 1, vec![("model.safetensors", bytes)], &state, 2, false)?;
    Ok(summary)
}

/// Fits `model` of `kind` (SASRec; MoRec: SASRec on projected features; IISAN: on side networks)
/// as `train.sasrec` (IISAN: `train.iisan`) says, under the label `name`, data-parallel over the
/// ranks of `coll`; records its config and fit in `state`, and rank 0 writes run `id`'s `fit.json`
/// and for SASRec its item table as the CF feature. Returns the weights' bytes and the summary line.
#[allow(clippy::too_many_arguments)]
fn fit_sasrec(
    job: &TrainJob<'_>,
    store: &Store,
    ds: &Dataset,
    id: &str,
    model: SasRec,
    name: &str,
    kind: ModelKind,
    state: &mut serde_json::Value,
    coll: &dyn Collective,
) -> Result<(Vec<u8>, String)> {
    let (tcfg, objective) = match kind {
        ModelKind::Iisan(_) => (&job.train.iisan, sasrec::Objective::InBatchSoftmax),
        _ => (&job.train.sasrec, sasrec::Objective::SampledNegative),
    };
    let (model, report) = sasrec::fit(ds, model, name, tcfg, objective, job.train.seed, job.telemetry, coll)?;
    state["config"] = serde_json::to_value(&job.model.sasrec).unwrap_or_default();
    if let ModelKind::Iisan(_) = kind {
        state["iisan"] = serde_json::to_value(&job.model.iisan).unwrap_or_default();
    }
    state["fit"] = serde_json::to_value(&report).unwrap_or_default();
    if coll.rank() == 0 {
        runs::put_report(store, id, "fit.json", serde_json::to_vec_pretty(&report).unwrap_or_default())?;
        if kind == ModelKind::Sasrec {
            save_cf_table(store, id, ds, &model)?;
        }
    }
    Ok((weights_bytes(&model.to_host()?), report.summary(name)))
}

/// Named tensors as the bytes of a `model.safetensors`.
fn weights_bytes(weights: &[HostTensor]) -> Vec<u8> {
    to_bytes(weights.iter().map(|t| (t.name.clone(), Array::F32(&t.values, t.shape.clone()))).collect(), None)
}

/// A freshly initialised SASRec with `cfg` for `ds`; for `morec:*` the same encoder on the frozen
/// features of its modalities, for `iisan:*` on side networks (`iisan`) over their encoders' layers.
fn sasrec_model(
    job: &TrainJob<'_>,
    store: &Store,
    ds: &Dataset,
    kind: ModelKind,
    cfg: &crate::model::SasRecConfig,
    iisan: &crate::model::iisan::IisanConfig,
    seed: u64,
) -> Result<SasRec> {
    match kind {
        ModelKind::Iisan(m) => {
            let mut rng = crate::seed::stream(seed, "iisan/init", 0);
            let adapters = iisan::side_adapters(job, store, ds, m, iisan, cfg.hidden, &mut rng)?;
            Ok(SasRec::with_side_adapters(cfg.clone(), adapters, &mut rng, &Device::Cpu)?)
        }
        ModelKind::Morec(m) => {
            let feats = modality::concat(&modality::load(job, store, ds, m.kinds(), &kind.to_string())?)?;
            Ok(SasRec::with_features(
                cfg.clone(),
                feats,
                &mut crate::seed::stream(seed, "morec/init", 0),
                &Device::Cpu,
            )?)
        }
        _ => sasrec::new_model(ds, cfg, seed),
    }
}

/// SASRec's item embeddings (rows 1..=N) as a feature table keyed by the items' source ids.
fn save_cf_table(store: &Store, run_id: &str, ds: &Dataset, model: &SasRec) -> Result<()> {
    let emb = model.item_embeddings()?.narrow(0, 1, ds.num_items())?;
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
    let ckpt = checkpoint_of(store, &id, kind, ds, which)?;
    let tf = TensorFile::parse(ckpt.file("model.safetensors")?, &format!("runs/{id} checkpoint {}", ckpt.step))?;
    match kind {
        ModelKind::Random => {
            let seed = ckpt.state["seed"]
                .as_u64()
                .ok_or_else(|| TrainError::Invalid(format!("run {id}: state.json has no `seed`")))?;
            Ok(Box::new(RandomScorer { seed, num_items: ds.num_items() }))
        }
        ModelKind::Pop => {
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
        ModelKind::Sasrec | ModelKind::Morec(_) | ModelKind::Iisan(_) => {
            let recorded = |key: &str| ckpt.state[key].clone();
            let cfg = serde_json::from_value(recorded("config"))
                .map_err(|e| TrainError::Invalid(format!("run {id}: state.json config: {e}")))?;
            let iisan = match kind {
                ModelKind::Iisan(_) => serde_json::from_value(recorded("iisan"))
                    .map_err(|e| TrainError::Invalid(format!("run {id}: state.json iisan: {e}")))?,
                _ => job.model.iisan.clone(),
            };
            // The initial values are overwritten by the checkpoint's.
            let model = sasrec_model(job, store, ds, kind, &cfg, &iisan, 0)?;
            model.load_host(&host_tensors(&tf)?)?;
            Ok(Box::new(model))
        }
        ModelKind::Graph(g) => {
            let models = graph::with_recorded(job.model, g, &ckpt.state["config"])?;
            // The initial values are overwritten by the checkpoint's.
            let model = graph::build(job, store, ds, g, &models, 0)?;
            crate::model::load_host_into(model.vars(), &host_tensors(&tf)?)?;
            Ok(Box::new(GraphScorer::new(model.as_ref(), g)?))
        }
        ModelKind::Illmrec(_) => unreachable!("handled above"),
    }
}

/// The SASRec saved as run `id` (by `train_sasrec`), checked to be trained on `ds`.
pub fn load_sasrec(job: &TrainJob<'_>, store: &Store, id: &str, ds: &Dataset, which: runs::Which) -> Result<SasRec> {
    let ckpt = checkpoint_of(store, id, ModelKind::Sasrec, ds, which)?;
    let tf = TensorFile::parse(ckpt.file("model.safetensors")?, &format!("runs/{id} checkpoint {}", ckpt.step))?;
    let cfg = serde_json::from_value(ckpt.state["config"].clone())
        .map_err(|e| TrainError::Invalid(format!("run {id}: state.json config: {e}")))?;
    // The initial values are overwritten by the checkpoint's.
    let model = sasrec_model(job, store, ds, ModelKind::Sasrec, &cfg, &job.model.iisan, 0)?;
    model.load_host(&host_tensors(&tf)?)?;
    Ok(model)
}

/// A baseline run's checkpoint (`which`), checked to be trained on `ds`.
fn checkpoint_of(
    store: &Store,
    id: &str,
    kind: impl fmt::Display,
    ds: &Dataset,
    which: runs::Which,
) -> Result<runs::Checkpoint> {
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
    Ok(ckpt)
}

/// Every tensor of a checkpoint's model file.
fn host_tensors(tf: &TensorFile<'_>) -> Result<Vec<HostTensor>> {
    Ok(tf
        .names()
        .into_iter()
        .map(|name| tf.f32(&name).map(|(shape, values)| HostTensor { name, shape, values }))
        .collect::<std::result::Result<Vec<_>, _>>()?)
}
