//! One data-parallel training step of an LLM recommender: this rank's share of the step's users,
//! their RERI and RISA prompts through the LLM, L = L_RERI + w * L_RISA backpropagated into the
//! trainable set, one all-reduce that averages the gradients, global-norm clipping, and the same
//! AdamW update on every rank.

use std::time::Instant;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::super::optim::{clipped_update, flatten_grads, read_params, write_params, AdamW};
use super::super::schedule::learning_rate;
use super::super::{IllmRecTrainConfig, Result, TrainError, TrainJob};
use crate::data::windows::{trainable_users, training_sample, SampleKey, TrainingSample};
use crate::data::Dataset;
use crate::distributed::plan::ShardPlan;
use crate::distributed::{check_same, Collective, Guarded};
use crate::model::illmrec::batch::EncodedBatch;
use crate::model::illmrec::session::Session;
use crate::model::illmrec::{Graph, RetrievalLoss};

/// Seconds spent in each phase of a step, and the tokens the LLM computed (cached prefixes not
/// counted; there is no padding).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Timings {
    pub prompts: f64,
    pub forward: f64,
    pub backward: f64,
    pub tokens: usize,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Losses {
    pub loss: f64,
    pub reri: f64,
    pub risa: f64,
}

/// One line of the training log (`report/train-log.jsonl`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepLog {
    pub step: u64,
    pub epoch: u64,
    #[serde(flatten)]
    pub losses: Losses,
    /// Before clipping; not finite (written as null) where the step's update was skipped.
    #[serde(deserialize_with = "nan_if_null")]
    pub grad_norm: f64,
    pub lr: f64,
}

/// serde_json writes a float that is not finite as null; it reads back as NaN.
fn nan_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// What one step did.
#[derive(Debug, Clone)]
pub struct StepOutcome {
    pub log: StepLog,
    pub timings: Timings,
    /// Seconds this rank spent in collectives during the step.
    pub collective_seconds: f64,
    pub optimizer_seconds: f64,
    /// Some rank asked to stop after this step (preemption).
    pub stop: bool,
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// The RERI prompts of a batch of samples and, with `alignment`, their RISA prompts, each packed.
pub fn prompt_batches(
    sess: &Session,
    ds: &Dataset,
    samples: &[TrainingSample],
    alignment: bool,
) -> Result<(EncodedBatch, Option<EncodedBatch>)> {
    let histories: Vec<Vec<&crate::data::Item>> =
        samples.iter().map(|s| s.history.iter().map(|&i| ds.item(i)).collect()).collect();
    let retrieval = sess.encode_all(histories.iter().map(|h| sess.builder.retrieval(h)).collect())?;
    let alignment = if alignment {
        let prompts = histories
            .iter()
            .zip(samples)
            .map(|(h, s)| sess.builder.alignment(h, ds.item(s.target), s.property, s.paraphrase))
            .collect();
        Some(sess.encode_all(prompts)?)
    } else {
        None
    };
    Ok((retrieval, alignment))
}

/// Forward and backward of one batch of samples: the flat gradient (in the model's variable order),
/// the losses, and where the time went.
pub fn gradients(
    sess: &Session,
    ds: &Dataset,
    samples: &[TrainingSample],
    risa_weight: f64,
    reri_loss: RetrievalLoss,
) -> Result<(Vec<f32>, Losses, Timings)> {
    let t0 = Instant::now();
    let (retrieval, alignment) = prompt_batches(sess, ds, samples, risa_weight > 0.0)?;
    let t1 = Instant::now();
    let h = sess.model.user_states(&sess.llm, &retrieval, &sess.feats, Graph::Keep)?;
    let targets: Vec<u32> = samples.iter().map(|s| s.target).collect();
    let per_user = samples.first().map_or(1, |s| s.negatives.len());
    let negatives: Vec<u32> = samples.iter().flat_map(|s| s.negatives.iter().copied()).collect();
    let reri = sess.model.retrieval_loss(&h, &targets, &negatives, per_user, reri_loss, &sess.feats)?;
    let mut loss = reri.clone();
    let mut risa_value = 0.0;
    if let Some(alignment) = &alignment {
        let risa = sess.model.alignment_loss(&sess.llm, alignment, &sess.feats)?;
        risa_value = scalar(&risa)?;
        loss = (loss + risa.affine(risa_weight, 0.0)?)?;
    }
    let losses = Losses { loss: scalar(&loss)?, reri: scalar(&reri)?, risa: risa_value };
    let t2 = Instant::now();
    let grads = loss.backward()?;
    let flat = flatten_grads(&sess.vars(), &grads)?;
    let t3 = Instant::now();
    let tokens = retrieval.tokens() + alignment.as_ref().map_or(0, |a| a.tokens());
    let timings = Timings {
        prompts: (t1 - t0).as_secs_f64(),
        forward: (t2 - t1).as_secs_f64(),
        backward: (t3 - t2).as_secs_f64(),
        tokens,
    };
    Ok((flat, losses, timings))
}

/// The training loop's moving parts: the plan, the flat parameters and the optimizer. `step` runs
/// one global step as this rank; `fit` and `illmrec bench step` both drive it.
pub struct Stepper<'a> {
    sess: &'a Session,
    ds: &'a Dataset,
    /// Over sample ids `user * windows_per_user + window`.
    pub plan: ShardPlan,
    cfg: &'a IllmRecTrainConfig,
    seed: u64,
    check_every: u64,
    pub params: Vec<f32>,
    pub opt: AdamW,
    /// (end in the flat parameters, whether it is a projection head) of consecutive runs of
    /// variables: the optimizer's rate groups.
    groups: Vec<(usize, bool)>,
    order: Option<(u64, Vec<usize>)>,
}

impl<'a> Stepper<'a> {
    pub fn new(job: &TrainJob<'a>, sess: &'a Session, ds: &'a Dataset, rank: usize, world: usize) -> Result<Self> {
        let cfg = &job.train.illmrec;
        let w = cfg.windows_per_user;
        let samples = trainable_users(ds).into_iter().flat_map(|u| (0..w).map(move |k| u * w + k)).collect();
        let plan = ShardPlan::new(samples, job.train.seed, cfg.batch_size, rank, world, cfg.epochs, cfg.max_steps)?;
        let params = read_params(&sess.vars())?;
        let opt = AdamW::new(params.len(), cfg.betas, cfg.weight_decay);
        let mut groups: Vec<(usize, bool)> = Vec::new();
        let mut end = 0;
        for (name, var) in sess.model.vars() {
            end += var.elem_count();
            let head = name.starts_with("user_head.") || name.starts_with("item_head.");
            match groups.last_mut() {
                Some(last) if last.1 == head => last.0 = end,
                _ => groups.push((end, head)),
            }
        }
        Ok(Self {
            sess,
            ds,
            plan,
            cfg,
            seed: job.train.seed,
            check_every: job.dist.check_every,
            params,
            opt,
            groups,
            order: None,
        })
    }

    /// The learning rate of step `step` (0-based) and that of the projection heads.
    pub fn rates(&self, step: u64) -> (f64, f64) {
        let c = self.cfg;
        let at = |base| learning_rate(base, step, self.plan.total_steps, c.warmup_steps, c.schedule);
        (at(c.lr), at(c.head_lr.unwrap_or(c.lr)))
    }

    /// The training samples this rank takes at global step `step` (0-based): what `step` computes on.
    /// Under several ranks, each takes an equal share of the global batch with about the same number
    /// of prompt tokens (`balanced_share`), so that none waits long for the others at the all-reduce.
    pub fn samples(&mut self, coll: &Guarded, step: u64) -> Result<Vec<TrainingSample>> {
        let epoch = self.plan.epoch_of(step);
        if self.order.as_ref().is_none_or(|(e, _)| *e != epoch) {
            self.order = Some((epoch, self.plan.agreed_order(coll, epoch)?));
        }
        let order = self.order.as_ref().map(|(_, o)| &o[..]).unwrap_or_default();
        let w = self.cfg.windows_per_user;
        let max_history = self.sess.model.cfg.max_history;
        let mut all: Vec<Option<TrainingSample>> = self
            .plan
            .step_users(order, step)
            .iter()
            .map(|&id| {
                let key = SampleKey { user: id / w, window: id % w };
                Some(training_sample(self.ds, key, epoch, self.seed, max_history, self.cfg.negatives))
            })
            .collect();
        if self.plan.world == 1 {
            return Ok(all.into_iter().flatten().collect());
        }
        let risa = self.cfg.risa_weight > 0.0;
        let mut costs = Vec::with_capacity(all.len());
        for sample in all.iter().flatten() {
            let (retrieval, alignment) = prompt_batches(self.sess, self.ds, std::slice::from_ref(sample), risa)?;
            costs.push(retrieval.tokens() + alignment.map_or(0, |a| a.tokens()));
        }
        Ok(self.plan.rank_share(&costs).into_iter().filter_map(|i| all[i].take()).collect())
    }

    /// Global step `step` (0-based): this rank's share of the users, one all-reduce that averages
    /// the gradients (the losses and this rank's vote to stop ride along), clipping, the update every
    /// rank applies alike. A stop asked on any rank is seen by all after the same step.
    pub fn step(&mut self, coll: &Guarded, step: u64, stop: bool) -> Result<StepOutcome> {
        let epoch = self.plan.epoch_of(step);
        let samples = self.samples(coll, step)?;
        let computing = Instant::now();
        let (mut grads, local, timings) =
            gradients(self.sess, self.ds, &samples, self.cfg.risa_weight, self.cfg.reri_loss)?;
        // The others may take as long as this rank did, and longer on a loaded machine.
        coll.grant(computing.elapsed() * 2);
        // Dividing the sum of per-rank means by the world size gives the mean over the global batch.
        grads.extend([local.loss as f32, local.reri as f32, local.risa as f32, if stop { 1.0 } else { 0.0 }]);
        coll.all_reduce_sum(&mut grads)?;
        let stop = grads.pop().is_some_and(|votes| votes > 0.0);
        let scale = 1.0 / coll.world() as f32;
        grads.iter_mut().for_each(|g| *g *= scale);
        let tail = grads.split_off(grads.len() - 3);
        let losses = Losses { loss: tail[0] as f64, reri: tail[1] as f64, risa: tail[2] as f64 };
        if !losses.loss.is_finite() {
            return Err(TrainError::Invalid(format!("the loss became {} at step {}", losses.loss, step + 1)));
        }
        let started = Instant::now();
        let (lr, head_lr) = self.rates(step);
        let groups: Vec<(usize, f64)> =
            self.groups.iter().map(|&(end, head)| (end, if head { head_lr } else { lr })).collect();
        let grad_norm = clipped_update(&mut self.opt, &mut self.params, &mut grads, self.cfg.grad_clip, &groups);
        if grad_norm.is_finite() {
            write_params(&self.sess.vars(), &self.params)?;
        } else {
            tracing::warn!("step {}: the gradient's norm is {grad_norm}; the update is skipped", step + 1);
        }
        let optimizer_seconds = started.elapsed().as_secs_f64();
        if (step + 1).is_multiple_of(self.check_every) {
            check_same(
                coll,
                &format!("the parameters after step {}", step + 1),
                &super::checkpoint::state_digest(&self.params, step + 1),
            )?;
        }
        Ok(StepOutcome {
            log: StepLog { step: step + 1, epoch, losses, grad_norm, lr },
            timings,
            collective_seconds: coll.take_spent().as_secs_f64(),
            optimizer_seconds,
            stop,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_skipped_step_reads_back_from_the_log() {
        let log = StepLog { step: 7, epoch: 0, losses: Losses::default(), grad_norm: f64::NAN, lr: 1e-3 };
        let line = serde_json::to_string(&log).unwrap();
        assert!(line.contains("\"grad_norm\":null"), "{line}");
        let back: StepLog = serde_json::from_str(&line).unwrap();
        assert!(back.grad_norm.is_nan() && back.step == 7 && back.lr == 1e-3);
    }
}
