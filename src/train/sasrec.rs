//! Training SASRec, MoRec (SASRec on frozen item features) and IISAN (SASRec on side networks): one
//! sample per user and epoch (the whole training sequence, each position predicting the next item
//! against one sampled negative, or for IISAN against the batch's other next items), Adam, and
//! early stopping on the valid NDCG@10; the best validated weights are kept.

use std::collections::HashSet;
use std::time::Instant;

use candle_core::Device;
use rand::seq::SliceRandom;
use rand::Rng as _;

use super::config::SasRecTrainConfig;
use super::early_stopping::{valid_ndcg10, BestWeights};
use super::optim::{flatten_grads, read_params, write_params, AdamW};
use super::TrainError;
use crate::data::Dataset;
use crate::model::sasrec::Batch;
use crate::model::{SasRec, SasRecConfig};
use crate::seed::stream;
use crate::telemetry::{Progress, TelemetryConfig};

#[derive(Debug, Clone, serde::Serialize)]
pub struct FitReport {
    pub epochs_run: usize,
    /// Training seconds per epoch, validation left out (the cost table's training column).
    pub seconds_per_epoch: f64,
    pub best_epoch: usize,
    pub best_valid_ndcg10: f64,
    pub last_loss: f64,
    pub seconds: f64,
    pub steps: u64,
}

impl FitReport {
    /// The run's summary line, under the label `name`.
    pub fn summary(&self, name: &str) -> String {
        format!(
            "{name}: {} epochs ({} steps, {:.1}s per epoch) in {:.1}s, best valid ndcg@10 {:.4} at epoch {}, \
             final loss {:.4}",
            self.epochs_run,
            self.steps,
            self.seconds_per_epoch,
            self.seconds,
            self.best_valid_ndcg10,
            self.best_epoch,
            self.last_loss
        )
    }
}

/// What each position of a training sequence is scored against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Objective {
    /// BCE of the next item and one sampled item the user has not seen (SASRec, MoRec).
    SampledNegative,
    /// Softmax over the batch's next items (IISAN).
    InBatchSoftmax,
}

/// A freshly initialised SASRec for `ds`.
pub fn new_model(ds: &Dataset, mcfg: &SasRecConfig, seed: u64) -> Result<SasRec, TrainError> {
    Ok(SasRec::new(mcfg.clone(), ds.num_items(), &mut stream(seed, "sasrec/init", 0), &Device::Cpu)?)
}

/// Trains `model` (`name` labels its progress and logs) and leaves the best validated weights in it.
pub fn fit(
    ds: &Dataset,
    model: SasRec,
    name: &str,
    tcfg: &SasRecTrainConfig,
    objective: Objective,
    seed: u64,
    telemetry: &TelemetryConfig,
) -> Result<(SasRec, FitReport), TrainError> {
    let started = Instant::now();
    let vars: Vec<&candle_core::Var> = model.vars().iter().map(|(_, v)| v).collect();
    let mut opt = AdamW::new(super::optim::count(&vars), tcfg.betas, 0.0);
    let mut params = read_params(&vars)?;
    // Users whose training part has at least one (input, next item) pair.
    let users: Vec<usize> = (0..ds.num_users()).filter(|&u| ds.train(u).len() >= 2).collect();
    let l = model.cfg.max_len;
    let steps_per_epoch = users.len().div_ceil(tcfg.batch_size) as u64;
    let mut progress = Progress::new(telemetry, name, steps_per_epoch * tcfg.epochs as u64);
    let mut train_seconds = 0.0;
    let mut best = BestWeights::new(tcfg.patience);
    let mut last_loss = f64::NAN;
    let mut epochs_run = 0;
    for epoch in 1..=tcfg.epochs {
        epochs_run = epoch;
        let epoch_started = Instant::now();
        let mut order = users.clone();
        order.shuffle(&mut stream(seed, "sasrec/epoch", epoch as u64));
        let mut loss_sum = 0.0;
        for chunk in order.chunks(tcfg.batch_size) {
            let mut rng = stream(seed, "sasrec/step", opt.step);
            let inputs: Vec<&[u32]> = chunk.iter().map(|&u| &ds.train(u)[..ds.train(u).len() - 1]).collect();
            let nexts: Vec<&[u32]> = chunk.iter().map(|&u| &ds.train(u)[1..]).collect();
            let input = Batch::from_sequences(&inputs, l);
            let positives = Batch::from_sequences(&nexts, l).ids;
            let loss = match objective {
                Objective::InBatchSoftmax => model.in_batch_loss(&input, &positives, &mut rng)?,
                Objective::SampledNegative => {
                    let negatives = sample_negatives(ds, chunk, &positives, l, &mut rng);
                    model.loss(&input, &positives, &negatives, &mut rng)?
                }
            };
            let grads = loss.backward()?;
            opt.update(&mut params, &flatten_grads(&vars, &grads)?, tcfg.lr);
            write_params(&vars, &params)?;
            loss_sum += loss.to_scalar::<f32>()? as f64;
            progress.inc(1);
        }
        train_seconds += epoch_started.elapsed().as_secs_f64();
        last_loss = loss_sum / steps_per_epoch as f64;
        if !last_loss.is_finite() {
            return Err(TrainError::Invalid(format!("{name} loss became {last_loss} at epoch {epoch}")));
        }
        progress.set_message(format!("epoch {epoch} loss {last_loss:.4}"));
        if epoch % tcfg.eval_every == 0 || epoch == tcfg.epochs {
            let ndcg = valid_ndcg10(&model, ds, tcfg.early_stopping_protocol)?;
            tracing::info!(
                "{name} epoch {epoch}: loss {last_loss:.4}, valid ndcg@10 ({}) {ndcg:.4}",
                tcfg.early_stopping_protocol
            );
            if best.record(epoch, ndcg, || model.to_host())? {
                tracing::info!("{name}: no gain in {} validations, stopping at epoch {epoch}", tcfg.patience);
                break;
            }
        }
    }
    progress.finish();
    let (best_epoch, best_ndcg, weights) = best.finish(name)?;
    model.load_host(&weights)?;
    let report = FitReport {
        epochs_run,
        seconds_per_epoch: train_seconds / epochs_run.max(1) as f64,
        best_epoch,
        best_valid_ndcg10: best_ndcg,
        last_loss,
        seconds: started.elapsed().as_secs_f64(),
        steps: opt.step,
    };
    Ok((model, report))
}

/// For every non-padded position of `positives` (`chunk.len()` rows of `l`), an item the row's user
/// has not trained on; 0 at padding.
fn sample_negatives(
    ds: &Dataset,
    chunk: &[usize],
    positives: &[u32],
    l: usize,
    rng: &mut crate::seed::Rng,
) -> Vec<u32> {
    let n_items = ds.num_items();
    let mut negatives = vec![0u32; positives.len()];
    for (r, &u) in chunk.iter().enumerate() {
        let seen: HashSet<u32> = ds.train(u).iter().copied().collect();
        for j in 0..l {
            if positives[r * l + j] != 0 {
                negatives[r * l + j] = loop {
                    let c = rng.random_range(1..=n_items as u32);
                    if !seen.contains(&c) {
                        break c;
                    }
                };
            }
        }
    }
    negatives
}
