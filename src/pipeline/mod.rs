//! The job as a pipeline of stages: which stage runs before which, and what one stage hands the next.
//!
//! ```text
//! synth? -> prepare -> train non-LLM models (SASRec first when the CF feature needs its item table)
//!        -> features -> train LLM recommenders -> evaluate every model
//!        -> LVLM strategies (`lvlm.strategies`; S3/S5 after their base model) -> report
//! ```
//! The stages themselves live in `data`, `features`, `train` and `eval` and know nothing of the job
//! file; this module (with the command line above it) is the only place that reads a whole job and
//! passes each stage its sections and the artefacts of the stages before it.

pub mod lvlm;

use std::time::Instant;

use candle_core::Device;

use crate::config::JobConfig;
use crate::data::prepare::PrepareReport;
use crate::data::{self, Dataset, Split};
use crate::distributed::Collective;
use crate::eval::cost::Cost;
use crate::eval::{self, EvalResult, Protocol};
use crate::features::{self, FeaturesReport};
use crate::lvlm::Strategy;
use crate::store::{self, Store};
use crate::train::illmrec::TrainOptions;
use crate::train::{self, runs, ModelKind, Result, TrainError, TrainJob};

/// Where the CF feature comes from: the item table of the job's SASRec run, or of the run
/// `features.cf` names.
pub fn cf_table(job: &JobConfig) -> String {
    match &job.features.cf {
        Some(features::CfSource::SasrecRun(run)) => features::cf_table_key(run),
        _ => features::cf_table_key(&train::run_id(&job.name, ModelKind::Sasrec)),
    }
}

/// What training reads of the job, with the artefacts of the stages before it.
pub fn train_job(job: &JobConfig) -> TrainJob<'_> {
    TrainJob {
        name: &job.name,
        dataset: job.dataset(),
        features: &job.features,
        model: &job.model,
        train: &job.train,
        dist: &job.dist,
        telemetry: &job.telemetry,
        cf_table: cf_table(job),
    }
}

/// One stage of `run`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The synthetic catalog when the job describes one, then the dataset snapshot.
    Prepare,
    Train(ModelKind),
    Features,
    Evaluate(ModelKind),
    /// An LVLM strategy of `lvlm.strategies`, with the job's default backbone.
    Lvlm(Strategy),
}

/// The stages `run` executes for the job, in order: every model of `train.models` is trained and
/// evaluated; item features are computed once, before the first model that reads them, and after SASRec
/// when the features include its item table (SASRec is added to the plan if the job does not list
/// it).
pub fn plan(job: &JobConfig) -> Result<Vec<Stage>> {
    let models = job
        .train
        .models
        .iter()
        .map(|m| m.parse::<ModelKind>().map_err(TrainError::Invalid))
        .collect::<Result<Vec<_>>>()?;
    let mut stages = vec![Stage::Prepare];
    // Only this job's own SASRec has to be trained first; a named run is an input.
    let needs_cf = matches!(job.features.cf, Some(features::CfSource::Sasrec));
    let mut trained = Vec::new();
    for &kind in &models {
        if kind.uses_features() && !stages.contains(&Stage::Features) {
            if needs_cf && !trained.contains(&ModelKind::Sasrec) {
                stages.push(Stage::Train(ModelKind::Sasrec));
                trained.push(ModelKind::Sasrec);
            }
            stages.push(Stage::Features);
        }
        if !trained.contains(&kind) {
            stages.push(Stage::Train(kind));
            trained.push(kind);
        }
    }
    stages.extend(models.iter().map(|&k| Stage::Evaluate(k)));
    // The rerankers need their base model; S2 trains its own SASRec.
    if job.lvlm.strategies.iter().any(|s| s.reranks()) {
        let base = job.lvlm.base_model.parse::<ModelKind>().map_err(TrainError::Invalid)?;
        if !trained.contains(&base) {
            let at = stages.iter().position(|s| matches!(s, Stage::Evaluate(_))).unwrap_or(stages.len());
            stages.insert(at, Stage::Train(base));
        }
    }
    stages.extend(job.lvlm.strategies.iter().map(|&s| Stage::Lvlm(s)));
    Ok(stages)
}

/// Computes (or reuses from the cache) the item features the job names.
pub fn features(job: &JobConfig, store: &Store, ds: &Dataset) -> Result<FeaturesReport> {
    Ok(features::compute(&job.features, ds, store, &cf_table(job), &job.telemetry, &Device::Cpu)?)
}

/// What `evaluate` scores: a split under the job's protocols for its user sample, and optionally fixed
/// candidate lists (test split), with one of the run's checkpoints.
pub struct EvalRequest<'a> {
    pub split: Split,
    pub protocols: &'a [Protocol],
    /// A JSON-lines file of `{user, candidates, target}` (eval::candidates).
    pub candidates: Option<&'a std::path::Path>,
    pub checkpoint: runs::Which,
}

impl<'a> EvalRequest<'a> {
    /// The test split under `protocols`, BEST checkpoint.
    pub fn test(protocols: &'a [Protocol]) -> Self {
        Self { split: Split::Test, protocols, candidates: None, checkpoint: runs::Which::Best }
    }
}

/// Evaluates one trained model and saves the results in the run's report folder.
pub fn evaluate(
    job: &JobConfig,
    store: &Store,
    ds: &Dataset,
    model: ModelKind,
    req: &EvalRequest<'_>,
) -> Result<Vec<EvalResult>> {
    let split = req.split;
    let _stage = tracing::info_span!("stage", stage = "eval", model = %model, split = ?split).entered();
    let tj = train_job(job);
    let scorer = train::load_scorer(&tj, store, model, ds, req.checkpoint)?;
    let users = job.eval.users.pick(ds.num_users(), job.eval.seed);
    let (fixed, sampled): (Vec<Protocol>, Vec<Protocol>) =
        req.protocols.iter().partition(|p| **p == Protocol::Candidates);
    let plan =
        eval::Plan { split, protocols: &sampled, ks: &job.eval.ks, users: &users, batch_size: job.eval.batch_size };
    let timer = Instant::now();
    let metrics = eval::evaluate(scorer.as_ref(), ds, &plan, Some(&job.telemetry))?;
    let mut inference = Vec::new();
    if !sampled.is_empty() {
        let what = sampled.iter().map(Protocol::to_string).collect::<Vec<_>>().join(", ");
        inference.push((what, timer.elapsed().as_secs_f64() / users.len().max(1) as f64));
    }
    let mut results: Vec<EvalResult> = sampled
        .iter()
        .zip(metrics)
        .map(|(p, m)| EvalResult {
            model: model.to_string(),
            protocol: p.to_string(),
            split,
            users: users.len(),
            metrics: m,
        })
        .collect();
    // Fixed lists: the snapshot's (protocol `candidates`) and a file's (`--candidates`).
    let mut lists = Vec::new();
    if !fixed.is_empty() {
        if split != Split::Test || ds.candidates.is_empty() {
            return Err(TrainError::Invalid(format!(
                "protocol candidates needs the test split of a snapshot prepared with data.candidates (this one has {} lists)",
                ds.candidates.len()
            )));
        }
        lists.push(("candidates".to_string(), ds.candidates.clone()));
    }
    if let Some(path) = req.candidates {
        let name = path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned());
        lists.push((format!("candidates:{name}"), data::candidates::read(path, ds)?));
    }
    for (label, lists) in lists {
        let timer = Instant::now();
        let m = eval::candidates::evaluate(
            scorer.as_ref(),
            ds,
            &lists,
            &job.eval.ks,
            job.eval.batch_size,
            Some(&job.telemetry),
        )?;
        let protocol = format!("{label} ({})", data::candidates::sizes(&lists));
        inference.push((protocol.clone(), timer.elapsed().as_secs_f64() / lists.len().max(1) as f64));
        results.push(EvalResult {
            model: model.to_string(),
            protocol,
            split: Split::Test,
            users: lists.len(),
            metrics: m,
        });
    }
    let id = tj.run_id(model);
    let json: Vec<serde_json::Value> = results.iter().map(EvalResult::to_json).collect();
    let name = format!("eval-{}.json", if split == Split::Test { "test" } else { "valid" });
    let bytes = serde_json::to_vec_pretty(&json).map_err(|e| TrainError::Invalid(e.to_string()))?;
    runs::put_report(store, &id, &name, bytes)?;
    let cost = Cost {
        model: model.to_string(),
        train_seconds_per_epoch: fit_report(store, &id)?.and_then(|f| f["seconds_per_epoch"].as_f64()),
        inference_seconds_per_user: inference,
    };
    runs::put_report(store, &id, "cost.json", serde_json::to_vec_pretty(&cost).unwrap_or_default())?;
    if split == Split::Test {
        let curves = vec![train::illmrec::loss_curve(store, &id)?];
        for (file, bytes) in eval::report::files(&id, &results, &curves) {
            runs::put_report(store, &id, file, bytes)?;
        }
    }
    Ok(results)
}

/// A run's `fit.json`, if its training wrote one.
fn fit_report(store: &Store, run_id: &str) -> Result<Option<serde_json::Value>> {
    let key = store::key(&[&runs::dir(run_id), "report", "fit.json"]);
    Ok(store.get_opt(&key)?.and_then(|b| serde_json::from_slice(&b).ok()))
}

/// A run's `cost.json`, written by its last evaluation.
fn cost_of(store: &Store, run_id: &str) -> Result<Option<Cost>> {
    let key = store::key(&[&runs::dir(run_id), "report", "cost.json"]);
    Ok(store.get_opt(&key)?.and_then(|b| serde_json::from_slice(&b).ok()))
}

/// Ingests, filters and splits the job's data into a new snapshot version and loads it for the stages
/// after.
pub fn prepare(job: &JobConfig, store: &Store) -> Result<(PrepareReport, Dataset)> {
    let report = data::prepare::prepare(job.dataset(), &job.data, store, &job.telemetry)?;
    Ok((report, data::snapshot::load(store, job.dataset())?))
}

/// Writes the synthetic catalog the job's `data.synth` section describes.
pub fn synth(job: &JobConfig) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let cfg = job.data.synth.as_ref().context("the job has no `data.synth` section")?;
    let started = Instant::now();
    let r = data::synth::generate(cfg, &job.telemetry)?;
    println!(
        "synth: {} items ({} with images), {} users, {} interactions -> {} in {:.1}s",
        r.items,
        r.images,
        r.users,
        r.interactions,
        cfg.out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Runs the whole job, single process: every stage of `plan`, then the job's report
/// (`reports/<job>/`: results.md, metrics.json, metrics.png, loss.png).
pub fn run(job: &JobConfig, store: &Store) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut coll = crate::distributed::init(&job.dist)?;
    if coll.world() > 1 {
        anyhow::bail!("`run` is the single-process pipeline; start `train` under mpirun/srun for several ranks");
    }
    let tj = train_job(job);
    let mut ds: Option<Dataset> = None;
    let mut results = Vec::new();
    let mut costs = Vec::new();
    let mut curves = Vec::new();
    for stage in plan(job)? {
        match stage {
            Stage::Prepare => {
                if job.data.synth.is_some() {
                    synth(job)?;
                }
                let (report, snapshot) = prepare(job, store)?;
                println!("{report}");
                ds = Some(snapshot);
            }
            Stage::Features => {
                let ds = ds.as_ref().ok_or_else(|| anyhow::anyhow!("features before prepare"))?;
                println!("features:\n{}", features(job, store, ds)?);
            }
            Stage::Train(kind) => {
                let t = Instant::now();
                let report = train::train(&tj, store, kind, TrainOptions::default(), &mut coll)?;
                println!("{} ({:.1}s)", report.summary, t.elapsed().as_secs_f64());
                if matches!(kind, ModelKind::Illmrec(_)) {
                    curves.push(train::illmrec::loss_curve(store, &tj.run_id(kind))?);
                }
            }
            Stage::Evaluate(kind) => {
                let ds = ds.as_ref().ok_or_else(|| anyhow::anyhow!("evaluation before prepare"))?;
                results.extend(evaluate(job, store, ds, kind, &EvalRequest::test(&job.eval.protocols))?);
                costs.extend(cost_of(store, &tj.run_id(kind))?);
            }
            Stage::Lvlm(strategy) => {
                let ds = ds.as_ref().ok_or_else(|| anyhow::anyhow!("{strategy} before prepare"))?;
                let out = lvlm::lvlm(job, store, ds, strategy, None, false)?;
                if let Some(cost) = &out.cost {
                    print!("{}", crate::lvlm::cost_table(&[(out.result.model.clone(), &out.result.metrics, cost)]));
                }
                results.push(out.result);
            }
        }
    }
    let report_dir = store::key(&["reports", &job.name]);
    for (file, bytes) in eval::report::files(&job.name, &results, &curves) {
        store.put(&store::key(&[&report_dir, file]), bytes)?;
    }
    if let Some(ds) = &ds {
        println!("\ntest split, {} users, {} items:", ds.num_users(), ds.num_items());
    }
    print!("{}", eval::markdown_table(&results));
    let cost_table = eval::cost::markdown_table(&costs);
    println!("\ncost:\n{cost_table}");
    // An output of this stage, not a document: docs/architecture.md lists the report files.
    store.put(&store::key(&[&report_dir, "cost.md"]), cost_table.into_bytes())?;
    println!("report: {}/{report_dir}/ (results.md, cost.md, metrics.json, metrics.png, loss.png)", store.url());
    println!("done in {:.1}s; everything is under {}", started.elapsed().as_secs_f64(), store.url());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(models: &str, cf: bool) -> JobConfig {
        let features = if cf { "features: {text: {tiny_bert: {seed: 1}}, cf: sasrec}\n" } else { "" };
        let text = format!(
            "name: j\ndata: {{source: {{recbole: {{dir: d, name: n}}}}}}\n{features}train: {{models: [{models}]}}\n"
        );
        JobConfig::from_str_with_base(&text, std::path::Path::new("j.yaml"), std::path::Path::new(".")).unwrap()
    }

    #[test]
    fn features_come_before_the_first_llm_model_and_after_sasrec_when_they_need_it() {
        use Stage::*;
        let (pop, sasrec, llm) = (ModelKind::Pop, ModelKind::Sasrec, "illmrec".parse::<ModelKind>().unwrap());
        assert_eq!(
            plan(&job("pop, illmrec", true)).unwrap(),
            vec![Prepare, Train(pop), Train(sasrec), Features, Train(llm), Evaluate(pop), Evaluate(llm)]
        );
        assert_eq!(
            plan(&job("illmrec, sasrec", false)).unwrap(),
            vec![Prepare, Features, Train(llm), Train(sasrec), Evaluate(llm), Evaluate(sasrec)]
        );
        assert_eq!(
            plan(&job("pop, sasrec", true)).unwrap(),
            vec![Prepare, Train(pop), Train(sasrec), Evaluate(pop), Evaluate(sasrec)]
        );
    }

    #[test]
    fn lvlm_strategies_come_last_after_the_base_model_they_rerank() {
        use Stage::*;
        let text = "name: j\ndata: {source: {recbole: {dir: d, name: n}}}\ntrain: {models: [pop]}\n\
                    lvlm: {strategies: [s5, s2], backbones: {m: {llm: {tiny: {seed: 1}}}}}\n";
        let job =
            JobConfig::from_str_with_base(text, std::path::Path::new("j.yaml"), std::path::Path::new(".")).unwrap();
        assert_eq!(
            plan(&job).unwrap(),
            vec![
                Prepare,
                Train(ModelKind::Pop),
                Train(ModelKind::Sasrec),
                Evaluate(ModelKind::Pop),
                Lvlm(Strategy::S5),
                Lvlm(Strategy::S2)
            ]
        );
    }
}
