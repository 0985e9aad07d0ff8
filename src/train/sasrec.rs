//! Training SASRec, MoRec (SASRec on frozen item features) and IISAN (SASRec on side networks): one
//! sample per user and epoch (the whole training sequence, each position predicting the next item
//! against one sampled negative, or for IISAN against the batch's other next items), Adam, and
//! early stopping on the valid NDCG@10; the best validated weights are kept.
//!
//! Under a launcher the ranks split every global batch: each takes a contiguous share of its users,
//! whose negatives and dropout masks come from per-user streams keyed by the step, divides its loss by
//! the global batch's positions, and one all-reduce sums the gradients. Every rank then holds the
//! gradient of the whole batch and applies the same update: N ranks train what one rank trains.

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
use crate::distributed::{check_same, Collective};
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

/// Trains `model` (`name` labels its progress and logs) and leaves the best validated weights in it;
/// the ranks of `coll` share every batch.
#[allow(clippy::too_many_arguments)]
pub fn fit(
    ds: &Dataset,
    model: SasRec,
    name: &str,
    tcfg: &SasRecTrainConfig,
    objective: Objective,
    seed: u64,
    telemetry: &TelemetryConfig,
    coll: &dyn Collective,
) -> Result<(SasRec, FitReport), TrainError> {
    let started = Instant::now();
    let vars: Vec<&candle_core::Var> = model.vars().iter().map(|(_, v)| v).collect();
    let mut opt = AdamW::new(super::optim::count(&vars), tcfg.betas, 0.0);
    let mut params = read_params(&vars)?;
    // Users whose training part has at least one (input, next item) pair.
    let users: Vec<usize> = (0..ds.num_users()).filter(|&u| ds.train(u).len() >= 2).collect();
    let steps_per_epoch = users.len().div_ceil(tcfg.batch_size) as u64;
    let mut progress = (coll.rank() == 0).then(|| Progress::new(telemetry, name, steps_per_epoch * tcfg.epochs as u64));
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
            let step = Step { ds, model: &model, objective, seed, index: opt.step };
            let (mut grads, loss) = step.gradients(chunk, coll.rank(), coll.world())?;
            grads.push(loss);
            coll.all_reduce_sum(&mut grads)?;
            let loss = grads.pop().unwrap_or_default();
            opt.update(&mut params, &grads, tcfg.lr);
            write_params(&vars, &params)?;
            loss_sum += loss as f64;
            if let Some(p) = progress.as_mut() {
                p.inc(1);
            }
        }
        train_seconds += epoch_started.elapsed().as_secs_f64();
        last_loss = loss_sum / steps_per_epoch as f64;
        if !last_loss.is_finite() {
            return Err(TrainError::Invalid(format!("{name} loss became {last_loss} at epoch {epoch}")));
        }
        if let Some(p) = progress.as_mut() {
            p.set_message(format!("epoch {epoch} loss {last_loss:.4}"));
        }
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
    if let Some(p) = progress {
        p.finish();
    }
    // Same data, same updates: a rank that differs now has a bug or a bad machine.
    check_same(
        coll,
        &format!("{name}'s parameters after training"),
        &super::illmrec::checkpoint::state_digest(&params, opt.step),
    )?;
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

/// One global step's data: the share of a batch a rank computes, with the streams that make it
/// independent of how the batch is split.
struct Step<'a> {
    ds: &'a Dataset,
    model: &'a SasRec,
    objective: Objective,
    seed: u64,
    /// The global step (0-based).
    index: u64,
}

impl Step<'_> {
    /// This rank's gradient of the global batch `chunk`'s loss (flat, in the model's variable order)
    /// and its part of the loss; summed over ranks they are the whole batch's.
    fn gradients(&self, chunk: &[usize], rank: usize, world: usize) -> Result<(Vec<f32>, f32), TrainError> {
        let (ds, l) = (self.ds, self.model.cfg.max_len);
        let vars: Vec<&candle_core::Var> = self.model.vars().iter().map(|(_, v)| v).collect();
        let nexts = |users: &[usize]| {
            let seqs: Vec<&[u32]> = users.iter().map(|&u| &ds.train(u)[1..]).collect();
            Batch::from_sequences(&seqs, l).ids
        };
        let all_next = nexts(chunk);
        let total = all_next.iter().filter(|&&p| p != 0).count() as f64;
        let mine = &chunk[chunk.len() * rank / world..chunk.len() * (rank + 1) / world];
        if mine.is_empty() {
            return Ok((vec![0.0; super::optim::count(&vars)], 0.0));
        }
        // Each user's negatives and dropout masks from its own stream for this step.
        let mut rngs: Vec<crate::seed::Rng> = mine
            .iter()
            .map(|&u| stream(self.seed, "sasrec/sample", self.index * ds.num_users() as u64 + u as u64))
            .collect();
        let inputs: Vec<&[u32]> = mine.iter().map(|&u| &ds.train(u)[..ds.train(u).len() - 1]).collect();
        let input = Batch::from_sequences(&inputs, l);
        let positives = nexts(mine);
        let loss = match self.objective {
            Objective::InBatchSoftmax => {
                let mut candidates: Vec<u32> = all_next.iter().copied().filter(|&p| p != 0).collect();
                candidates.sort_unstable();
                candidates.dedup();
                self.model.in_batch_loss(&input, &positives, &candidates, &mut rngs, total)?
            }
            Objective::SampledNegative => {
                let negatives = sample_negatives(ds, mine, &positives, l, &mut rngs);
                self.model.loss(&input, &positives, &negatives, &mut rngs, total)?
            }
        };
        let grads = loss.backward()?;
        Ok((flatten_grads(&vars, &grads)?, loss.to_scalar::<f32>()?))
    }
}

/// For every non-padded position of `positives` (`users.len()` rows of `l`), an item the row's user
/// has not trained on, drawn from the row's stream; 0 at padding.
fn sample_negatives(
    ds: &Dataset,
    users: &[usize],
    positives: &[u32],
    l: usize,
    rngs: &mut [crate::seed::Rng],
) -> Vec<u32> {
    let n_items = ds.num_items();
    let mut negatives = vec![0u32; positives.len()];
    for (r, (&u, rng)) in users.iter().zip(rngs.iter_mut()).enumerate() {
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
