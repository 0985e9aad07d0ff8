//! Training the graph models (FREEDOM, BM3, MMGCN) in one process: each epoch visits every
//! training interaction once in seeded batches (with one sampled negative each for the BPR models),
//! every step propagates over the whole graph, Adam updates the tables, and early stopping on the
//! valid NDCG@10 keeps the best weights.

use std::time::Instant;

use rand::seq::SliceRandom;
use rand::Rng as _;

use super::early_stopping::{valid_ndcg10, BestWeights};
use super::optim::{flatten_grads, read_params, write_params, AdamW};
use super::sasrec::FitReport;
use super::{modality, GraphTrainConfig, Result, TrainError, TrainJob};
use crate::data::{Dataset, FeatureKind};
use crate::model::graph::bm3::Bm3;
use crate::model::graph::freedom::Freedom;
use crate::model::graph::mmgcn::Mmgcn;
use crate::model::graph::{Batch, GraphKind, GraphModel, GraphScorer, Interactions};
use crate::model::{load_host_into, vars_to_host, ModelConfig};
use crate::seed::stream;
use crate::store::Store;
use crate::telemetry::{Progress, TelemetryConfig};

/// The configuration section of `kind`, as the run records it.
pub fn config_json(models: &ModelConfig, kind: GraphKind) -> serde_json::Value {
    match kind {
        GraphKind::Freedom => serde_json::to_value(&models.freedom),
        GraphKind::Bm3 => serde_json::to_value(&models.bm3),
        GraphKind::Mmgcn => serde_json::to_value(&models.mmgcn),
    }
    .unwrap_or_default()
}

/// `models` with `kind`'s section replaced by the one a run recorded.
pub fn with_recorded(models: &ModelConfig, kind: GraphKind, recorded: &serde_json::Value) -> Result<ModelConfig> {
    let bad = |e: serde_json::Error| TrainError::Invalid(format!("{} run: state.json config: {e}", kind.name()));
    let mut m = models.clone();
    match kind {
        GraphKind::Freedom => m.freedom = serde_json::from_value(recorded.clone()).map_err(bad)?,
        GraphKind::Bm3 => m.bm3 = serde_json::from_value(recorded.clone()).map_err(bad)?,
        GraphKind::Mmgcn => m.mmgcn = serde_json::from_value(recorded.clone()).map_err(bad)?,
    }
    Ok(m)
}

/// A freshly initialised `kind` over the training graph of `ds` and the item features the job
/// configures (text and/or image).
pub fn build(
    job: &TrainJob<'_>,
    store: &Store,
    ds: &Dataset,
    kind: GraphKind,
    models: &ModelConfig,
    seed: u64,
) -> Result<Box<dyn GraphModel>> {
    let name = kind.name();
    let kinds = modality::configured(job, name)?;
    let matrices = modality::load(job, store, ds, &kinds, name)?;
    let mods: Vec<(FeatureKind, usize, &[f32])> = matrices.iter().map(|m| (m.kind, m.dim, m.items())).collect();
    let graph = Interactions::new(ds.num_items(), (0..ds.num_users()).map(|u| ds.train(u)));
    let rng = &mut stream(seed, &format!("{name}/init"), 0);
    Ok(match kind {
        GraphKind::Freedom => Box::new(Freedom::new(models.freedom.clone(), graph, &mods, rng)?),
        GraphKind::Bm3 => Box::new(Bm3::new(models.bm3.clone(), graph, &mods, rng)?),
        GraphKind::Mmgcn => Box::new(Mmgcn::new(models.mmgcn.clone(), graph, &mods, rng)?),
    })
}

/// The training interactions of `ds` in a seeded order, each with an item row its user never
/// interacted with.
fn epoch_samples(graph: &Interactions, seed: u64, epoch: usize) -> Result<Vec<(u32, u32, u32)>> {
    let rng = &mut stream(seed, "graph/epoch", epoch as u64);
    let mut edges = graph.edges.clone();
    edges.shuffle(rng);
    edges
        .into_iter()
        .map(|(u, i)| {
            let seen = &graph.by_user[u as usize];
            if seen.len() >= graph.items {
                return Err(TrainError::Invalid(format!("user {u} interacted with every item: no negative to draw")));
            }
            let neg = loop {
                let c = rng.random_range(0..graph.items as u32);
                if seen.binary_search(&c).is_err() {
                    break c;
                }
            };
            Ok((u, i, neg))
        })
        .collect()
}

/// Trains `model` (`name` labels progress and logs) and leaves the best validated weights in it.
pub fn fit(
    model: &mut dyn GraphModel,
    ds: &Dataset,
    tcfg: &GraphTrainConfig,
    seed: u64,
    telemetry: &TelemetryConfig,
    kind: GraphKind,
) -> Result<FitReport> {
    let started = Instant::now();
    let name = kind.name();
    let graph = Interactions::new(ds.num_items(), (0..ds.num_users()).map(|u| ds.train(u)));
    if graph.edges.is_empty() {
        return Err(TrainError::Invalid(format!("{name}: the training split has no interactions")));
    }
    let vars: Vec<candle_core::Var> = model.vars().iter().map(|(_, v)| v.clone()).collect();
    let var_refs: Vec<&candle_core::Var> = vars.iter().collect();
    let mut opt = AdamW::new(super::optim::count(&var_refs), [0.9, 0.999], 0.0);
    let mut params = read_params(&var_refs)?;
    let steps_per_epoch = graph.edges.len().div_ceil(tcfg.batch_size);
    let mut progress = Progress::new(telemetry, name, (steps_per_epoch * tcfg.epochs) as u64);
    let mut best = BestWeights::new(tcfg.patience);
    let (mut train_seconds, mut last_loss, mut epochs_run) = (0.0, f64::NAN, 0);
    for epoch in 1..=tcfg.epochs {
        epochs_run = epoch;
        let epoch_started = Instant::now();
        model.start_epoch(&mut stream(seed, &format!("{name}/graph"), epoch as u64))?;
        let samples = epoch_samples(&graph, seed, epoch)?;
        let mut loss_sum = 0.0;
        for chunk in samples.chunks(tcfg.batch_size) {
            let batch = Batch {
                users: chunk.iter().map(|s| s.0).collect(),
                positives: chunk.iter().map(|s| s.1).collect(),
                negatives: if model.needs_negatives() { chunk.iter().map(|s| s.2).collect() } else { Vec::new() },
            };
            let mut rng = stream(seed, &format!("{name}/step"), opt.step);
            let loss = model.loss(&batch, &mut rng)?;
            let value = loss.to_scalar::<f32>()? as f64;
            if !value.is_finite() {
                return Err(TrainError::Invalid(format!(
                    "{name} loss became {value} at epoch {epoch}, step {}",
                    opt.step + 1
                )));
            }
            let grads = loss.backward()?;
            opt.update(&mut params, &flatten_grads(&var_refs, &grads)?, tcfg.lr);
            write_params(&var_refs, &params)?;
            loss_sum += value;
            progress.inc(1);
        }
        train_seconds += epoch_started.elapsed().as_secs_f64();
        last_loss = loss_sum / steps_per_epoch as f64;
        progress.set_message(format!("epoch {epoch} loss {last_loss:.4}"));
        if epoch % tcfg.eval_every == 0 || epoch == tcfg.epochs {
            let ndcg = valid_ndcg10(&GraphScorer::new(model, kind)?, ds, tcfg.early_stopping_protocol)?;
            tracing::info!(
                "{name} epoch {epoch}: loss {last_loss:.4}, valid ndcg@10 ({}) {ndcg:.4}",
                tcfg.early_stopping_protocol
            );
            if best.record(epoch, ndcg, || vars_to_host(model.vars()))? {
                tracing::info!("{name}: no gain in {} validations, stopping at epoch {epoch}", tcfg.patience);
                break;
            }
        }
    }
    progress.finish();
    let (best_epoch, best_valid_ndcg10, weights) = best.finish(name)?;
    load_host_into(model.vars(), &weights)?;
    Ok(FitReport {
        epochs_run,
        seconds_per_epoch: train_seconds / epochs_run.max(1) as f64,
        best_epoch,
        best_valid_ndcg10,
        last_loss,
        seconds: started.elapsed().as_secs_f64(),
        steps: opt.step,
    })
}
