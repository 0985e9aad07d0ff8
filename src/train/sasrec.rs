//! Training SASRec: one sample per user and epoch (the whole training sequence, each position
//! predicting the next item against one sampled negative), Adam, and early stopping on the valid
//! NDCG@10; the best validated weights are kept.

use std::collections::HashSet;
use std::time::Instant;

use candle_core::Device;
use rand::seq::SliceRandom;
use rand::Rng as _;

use super::config::SasRecTrainConfig;
use super::optim::{flatten_grads, read_params, write_params, AdamW};
use super::TrainError;
use crate::data::{Dataset, Split};
use crate::eval::{evaluate, Plan};
use crate::model::sasrec::Batch;
use crate::model::{HostTensor, SasRec, SasRecConfig};
use crate::seed::stream;
use crate::telemetry::{Progress, TelemetryConfig};

#[derive(Debug, Clone, serde::Serialize)]
pub struct FitReport {
    pub epochs_run: usize,
    pub best_epoch: usize,
    pub best_valid_ndcg10: f64,
    pub last_loss: f64,
    pub seconds: f64,
    pub steps: u64,
}

pub fn fit(
    ds: &Dataset,
    mcfg: &SasRecConfig,
    tcfg: &SasRecTrainConfig,
    seed: u64,
    telemetry: &TelemetryConfig,
    item_init: Option<&[f32]>,
) -> Result<(SasRec, FitReport), TrainError> {
    let started = Instant::now();
    let device = Device::Cpu;
    let n_items = ds.num_items();
    let model = SasRec::new(mcfg.clone(), n_items, &mut stream(seed, "sasrec/init", 0), &device)?;
    if let Some(init) = item_init {
        model.set_item_table(init)?;
    }
    let vars: Vec<&candle_core::Var> = model.vars().iter().map(|(_, v)| v).collect();
    let mut opt = AdamW::new(super::optim::count(&vars), tcfg.betas, 0.0);
    let mut params = read_params(&vars)?;
    // Users whose training part has at least one (input, next item) pair.
    let users: Vec<usize> = (0..ds.num_users()).filter(|&u| ds.train(u).len() >= 2).collect();
    let all_users: Vec<usize> = (0..ds.num_users()).collect();
    let l = mcfg.max_len;
    let steps_per_epoch = users.len().div_ceil(tcfg.batch_size) as u64;
    let mut progress = Progress::new(telemetry, "sasrec", steps_per_epoch * tcfg.epochs as u64);
    let mut best: Option<(usize, f64, Vec<HostTensor>)> = None;
    let mut evals_without_gain = 0;
    let mut last_loss = f64::NAN;
    let mut epochs_run = 0;
    for epoch in 1..=tcfg.epochs {
        epochs_run = epoch;
        let mut order = users.clone();
        order.shuffle(&mut stream(seed, "sasrec/epoch", epoch as u64));
        let mut loss_sum = 0.0;
        for chunk in order.chunks(tcfg.batch_size) {
            let mut rng = stream(seed, "sasrec/step", opt.step);
            let inputs: Vec<&[u32]> = chunk.iter().map(|&u| &ds.train(u)[..ds.train(u).len() - 1]).collect();
            let nexts: Vec<&[u32]> = chunk.iter().map(|&u| &ds.train(u)[1..]).collect();
            let input = Batch::from_sequences(&inputs, l);
            let positives = Batch::from_sequences(&nexts, l).ids;
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
            let loss = model.loss(&input, &positives, &negatives, &mut rng)?;
            let grads = loss.backward()?;
            opt.update(&mut params, &flatten_grads(&vars, &grads)?, tcfg.lr);
            write_params(&vars, &params)?;
            loss_sum += loss.to_scalar::<f32>()? as f64;
            progress.inc(1);
        }
        last_loss = loss_sum / steps_per_epoch as f64;
        if !last_loss.is_finite() {
            return Err(TrainError::Invalid(format!("SASRec loss became {last_loss} at epoch {epoch}")));
        }
        progress.set_message(format!("epoch {epoch} loss {last_loss:.4}"));
        if epoch % tcfg.eval_every == 0 || epoch == tcfg.epochs {
            let plan = Plan {
                split: Split::Valid,
                protocols: &[tcfg.early_stopping_protocol],
                ks: &[10],
                users: &all_users,
                batch_size: 256,
            };
            let m = evaluate(&model, ds, &plan, None)?;
            let ndcg = m[0].get("ndcg@10").unwrap_or(0.0);
            tracing::info!(
                "sasrec epoch {epoch}: loss {last_loss:.4}, valid ndcg@10 ({}) {ndcg:.4}",
                tcfg.early_stopping_protocol
            );
            if best.as_ref().is_none_or(|b| ndcg > b.1) {
                best = Some((epoch, ndcg, model.to_host()?));
                evals_without_gain = 0;
            } else {
                evals_without_gain += 1;
                if evals_without_gain >= tcfg.patience {
                    tracing::info!("sasrec: no gain in {} validations, stopping at epoch {epoch}", tcfg.patience);
                    break;
                }
            }
        }
    }
    progress.finish();
    let (best_epoch, best_ndcg, weights) =
        best.ok_or_else(|| TrainError::Invalid("SASRec was never validated".into()))?;
    model.load_host(&weights)?;
    let report = FitReport {
        epochs_run,
        best_epoch,
        best_valid_ndcg10: best_ndcg,
        last_loss,
        seconds: started.elapsed().as_secs_f64(),
        steps: opt.step,
    };
    Ok((model, report))
}
