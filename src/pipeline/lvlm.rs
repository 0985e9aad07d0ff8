//! The LVLM strategies as a stage of the job (`illmrec lvlm`, and `lvlm.strategies` in `run`): this
//! module hands each strategy its inputs (candidate lists, the backbone, the base model S3/S5 rerank,
//! captions, S2's text encoder and SASRec) and saves what it produced as a run
//! (`runs/<job>-<strategy>[-<backbone>]/report/`).

use anyhow::{bail, Context, Result};

use crate::config::JobConfig;
use crate::data::Dataset;
use crate::eval::{self, EvalResult};
use crate::features::captions::{self, Captions, CaptionsReport};
use crate::features::text::TextEncoder;
use crate::features::{FeatureCache, TextSource};
use crate::lvlm::backend::local::LocalText;
use crate::lvlm::backend::openai::OpenAi;
use crate::lvlm::backend::vision::Moondream;
use crate::lvlm::backend::Backend;
use crate::lvlm::prompt::Templates;
use crate::lvlm::{self, BackboneConfig, Cost, Strategy};
use crate::store::Store;
use crate::train::{self, runs, ModelKind};

/// What one strategy run produced.
pub struct LvlmOutcome {
    pub run_id: String,
    pub result: EvalResult,
    /// Answer costs (none for S2, which costs what SASRec costs).
    pub cost: Option<Cost>,
}

/// Computes the captions the job names (imported ones are only read), or `None` without any.
pub fn captions(job: &JobConfig, store: &Store, ds: &Dataset) -> Result<Option<CaptionsReport>> {
    let Some(source) = &job.features.captions else { return Ok(None) };
    Ok(Some(captions::compute(source, ds, store, &job.telemetry)?))
}

fn load_captions(job: &JobConfig, store: &Store, ds: &Dataset) -> Result<Option<Captions>> {
    let Some(source) = &job.features.captions else {
        tracing::warn!("features.captions is not set: the history is described by titles alone");
        return Ok(None);
    };
    captions::compute(source, ds, store, &job.telemetry)?;
    let c = captions::load(source, ds, store)?;
    tracing::info!("captions: {} of {} items, from {}", c.len(), ds.num_items(), c.source);
    Ok(Some(c))
}

fn backend(cfg: &BackboneConfig, job: &JobConfig) -> Result<Box<dyn Backend>> {
    Ok(match cfg {
        BackboneConfig::Openai(o) => Box::new(OpenAi::new(o)?),
        BackboneConfig::Llm(source) => Box::new(LocalText::load(source, &job.lvlm.local)?),
        BackboneConfig::Moondream { dir } => Box::new(Moondream::load(dir)?),
        BackboneConfig::TinyMoondream { seed } => Box::new(Moondream::tiny(*seed)?),
    })
}

/// The label and run of a strategy: `s4 (smollm2)`, `<job>-s4-smollm2`.
fn names(job: &JobConfig, strategy: Strategy, backbone: Option<&str>) -> (String, String) {
    match backbone {
        Some(b) => {
            (format!("{strategy} ({b})"), format!("{}-{strategy}-{}", job.name, b.replace([':', '+', '/'], "-")))
        }
        None => (strategy.to_string(), format!("{}-{strategy}", job.name)),
    }
}

/// Runs `strategy` on the job's users and saves its report; `fresh` asks every request again instead
/// of reading cached answers.
pub fn lvlm(
    job: &JobConfig,
    store: &Store,
    ds: &Dataset,
    strategy: Strategy,
    backbone: Option<&str>,
    fresh: bool,
) -> Result<LvlmOutcome> {
    let _stage = tracing::info_span!("stage", stage = "lvlm", strategy = %strategy).entered();
    let lists = lvlm::candidate_lists(ds, &job.lvlm)?;
    let per_list = lists.first().map_or(0, |l| l.candidates.len());
    let protocol = format!("{} (1+{})", job.lvlm.protocol, per_list.saturating_sub(1));
    if strategy == Strategy::S2 {
        return s2(job, store, ds, &lists, protocol);
    }
    let (name, cfg) = job.lvlm.pick_backbone(backbone).map_err(anyhow::Error::msg)?;
    let backend = backend(cfg, job).with_context(|| format!("backbone `{name}`"))?;
    let tj = super::train_job(job);
    let base = if strategy.reranks() {
        let kind: ModelKind = job.lvlm.base_model.parse().map_err(anyhow::Error::msg).context("lvlm.base_model")?;
        Some(train::load_scorer(&tj, store, kind, ds, runs::Which::Best)?)
    } else {
        None
    };
    let captions = if strategy.uses_captions() { load_captions(job, store, ds)? } else { None };
    let templates = match &job.lvlm.prompts {
        Some(dir) => Templates::from_dir(dir)?,
        None => Templates::builtin(),
    };
    let inputs = lvlm::Inputs {
        ds,
        store,
        cfg: &job.lvlm,
        templates: &templates,
        ks: &job.eval.ks,
        lists: &lists,
        base: base.as_deref(),
        captions: captions.as_ref(),
        telemetry: &job.telemetry,
        fresh,
    };
    let report = lvlm::run::run(strategy, backend.as_ref(), &inputs)?;
    let (label, run_id) = names(job, strategy, Some(&name));
    for (file, bytes) in lvlm::report_files(&label, &protocol, &report) {
        runs::put_report(store, &run_id, file, bytes)?;
    }
    let result = EvalResult {
        model: label,
        protocol,
        split: crate::data::Split::Test,
        users: lists.len(),
        metrics: report.metrics,
    };
    Ok(LvlmOutcome { run_id, result, cost: Some(report.cost) })
}

/// S2: "title + caption" through the job's text encoder (vectors cached by text), SASRec's item table
/// initialised from them, SASRec trained as the job trains it and scored on the lists.
fn s2(
    job: &JobConfig,
    store: &Store,
    ds: &Dataset,
    lists: &[crate::data::candidates::CandidateList],
    protocol: String,
) -> Result<LvlmOutcome> {
    let encoder = match &job.features.text {
        Some(TextSource::Bert { dir }) => TextEncoder::from_dir(dir, &candle_core::Device::Cpu)?,
        Some(TextSource::TinyBert(t)) => TextEncoder::tiny(t, &candle_core::Device::Cpu)?,
        _ => {
            bail!("S2 encodes item text with the job's features.text encoder: set it to a bert (or tiny_bert) encoder")
        }
    };
    let captions = load_captions(job, store, ds)?;
    let texts: Vec<String> = ds.items.iter().map(|i| lvlm::s2::item_text(i, captions.as_ref())).collect();
    let vectors = encode_cached(&encoder, &texts, store, job.features.batch_size, &job.telemetry)?;
    let init = lvlm::s2::item_table(&vectors, encoder.dim(), job.model.sasrec.hidden, job.train.seed);
    let (label, run_id) = names(job, Strategy::S2, None);
    let tj = super::train_job(job);
    let summary = train::train_sasrec(&tj, store, ds, &run_id, Some(&init))?;
    println!("s2: {summary}");
    let model = train::load_sasrec(&tj, store, &run_id, ds, runs::Which::Best)?;
    let ranks = eval::candidates::target_ranks(&model, ds, lists, job.eval.batch_size, Some(&job.telemetry))?;
    let result = EvalResult {
        model: label,
        protocol,
        split: crate::data::Split::Test,
        users: lists.len(),
        metrics: eval::metrics_of(&ranks, &job.eval.ks),
    };
    let json = serde_json::to_vec_pretty(&[result.to_json()])?;
    runs::put_report(store, &run_id, "eval-test.json", json)?;
    Ok(LvlmOutcome { run_id, result, cost: None })
}

/// Vectors of `texts` (row-major), encoding only those the encoder's cache lacks (keyed by the text's
/// sha256, the same keys as every text feature of this encoder).
fn encode_cached(
    encoder: &TextEncoder,
    texts: &[String],
    store: &Store,
    batch: usize,
    telemetry: &crate::telemetry::TelemetryConfig,
) -> Result<Vec<f32>> {
    use sha2::{Digest, Sha256};
    let keys: Vec<String> = texts.iter().map(|t| hex::encode(Sha256::digest(t.as_bytes()))).collect();
    let mut cache = FeatureCache::open(store, &encoder.id, encoder.dim())?;
    let mut seen = std::collections::HashSet::new();
    let todo: Vec<usize> = (0..texts.len()).filter(|&i| !cache.contains(&keys[i]) && seen.insert(&keys[i])).collect();
    let mut progress = crate::telemetry::Progress::new(telemetry, "s2 text", todo.len() as u64);
    for chunk in todo.chunks(batch.max(1) * 64) {
        let mut values = Vec::with_capacity(chunk.len() * encoder.dim());
        for part in chunk.chunks(batch.max(1)) {
            values.extend(encoder.encode(&part.iter().map(|&i| texts[i].clone()).collect::<Vec<_>>())?);
            progress.inc(part.len() as u64);
        }
        cache.commit(chunk.iter().map(|&i| keys[i].clone()).collect(), values)?;
    }
    progress.finish();
    let mut out = Vec::with_capacity(texts.len() * encoder.dim());
    for k in &keys {
        out.extend_from_slice(cache.get(k).context("a text vector went missing from the cache")?);
    }
    Ok(out)
}
