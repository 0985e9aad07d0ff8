//! Training and scoring the LLM recommenders (I-LLMRec and its prompt variants) on a frozen LLM.
//!
//! A step: the batch's users get their epoch samples (data/windows.rs), their RERI and RISA prompts go
//! through the LLM, L = L_RERI + w * L_RISA is backpropagated into the trainable set, the gradients are
//! flattened in the model's variable order, clipped by global norm, and AdamW updates the flat
//! parameters under a linear decay to 0. All randomness is keyed by (seed, epoch, user), so the
//! checkpoint's step is the whole of the "RNG state": resuming replays nothing and skips nothing.

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use serde::Serialize;
use serde_json::json;

use super::optim::{clip_global_norm, flatten_grads, read_params, write_params, AdamW};
use super::runs;
use super::{Result, TrainError};
use crate::config::JobConfig;
use crate::data::prompt::{PromptBuilder, Segment, Variant};
use crate::data::windows::{trainable_users, training_sample, TrainingSample};
use crate::data::Dataset;
use crate::dist::plan::ShardPlan;
use crate::dist::{check_same, Collective, Guarded};
use crate::model::illmrec::batch::{encode, EncodedBatch};
use crate::model::illmrec::{FeatureMatrix, Features, IllmRec};
use crate::model::llm::Llm;
use crate::model::{HostTensor, ModelError, Scorer};
use crate::seed::stream;
use crate::store::Store;
use crate::telemetry::Progress;
use crate::tensorfile::{to_bytes, Array, TensorFile};

/// How a training call starts and stops.
#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    /// Continue from the run's LATEST checkpoint instead of starting over.
    pub resume: bool,
    /// Stop (with a checkpoint) after this global step, as a preempted job would.
    pub stop_after: Option<u64>,
    /// Warm start: a new run (step 0, this job's data and schedule) whose trainable weights and
    /// optimizer state come from this run's LATEST checkpoint, e.g. the model of the catalog before
    /// it grew.
    pub from: Option<String>,
}

/// Attempts at the final checkpoint before the run gives up, with a doubling pause between them.
const FINAL_SAVE_ATTEMPTS: u32 = 5;

/// Everything a model needs at hand: the LLM, the item features, the trainable set, the prompts.
pub struct Session {
    pub llm: Llm,
    pub feats: Features,
    pub model: IllmRec,
    pub builder: PromptBuilder,
    /// Items whose prompt token comes through the missing-feature fallback.
    pub fallback_items: usize,
}

impl Session {
    /// Loads the job's LLM and features and builds a freshly initialised model for `variant`.
    pub fn new(job: &JobConfig, store: &Store, ds: &Dataset, variant: Variant) -> Result<Self> {
        let device = Device::Cpu;
        let llm = Llm::load(&job.model.llm, DType::F32, &device).map_err(|e| TrainError::Invalid(e.to_string()))?;
        let cfg = &job.model.illmrec;
        let sasrec_run = super::run_id(job, super::ModelKind::Sasrec);
        let mut feats = Features::new();
        let mut fallback_items = 0;
        for kind in cfg.feature_kinds(variant) {
            let f = crate::features::load(&job.features, kind, ds, store, &sasrec_run)?;
            if kind == cfg.token_feature && variant.has_item_token() {
                fallback_items = f.missing();
                if fallback_items > 0 && cfg.fallback_feature.is_none() {
                    return Err(TrainError::Invalid(format!(
                        "{fallback_items} items have no {kind} feature: set model.illmrec.fallback_feature"
                    )));
                }
            }
            feats.insert(kind, FeatureMatrix::new(kind, f.dim, &f.values, &f.present, llm.model.dtype(), &device)?);
        }
        let mut rng = stream(job.train.seed, "illmrec/init", 0);
        let model = IllmRec::new(cfg, variant, &llm, &FeatureMatrix::dims(&feats), &mut rng)?;
        let builder = PromptBuilder { variant, max_description_words: cfg.max_description_words };
        Ok(Self { llm, feats, model, builder, fallback_items })
    }

    fn encode_all(&self, prompts: Vec<crate::data::prompt::Prompt>) -> Result<EncodedBatch> {
        let encoded = prompts
            .iter()
            .map(|p| encode(&self.llm, p))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| TrainError::Invalid(e.to_string()))?;
        Ok(EncodedBatch::new(&encoded, self.llm.eos))
    }

    /// The retrieval prompts of histories, as a batch.
    pub fn retrieval_batch(&self, ds: &Dataset, histories: &[&[u32]]) -> Result<EncodedBatch> {
        let max = self.model.cfg.max_history;
        self.encode_all(
            histories
                .iter()
                .map(|h| {
                    let items: Vec<_> = h[h.len().saturating_sub(max)..].iter().map(|&i| ds.item(i)).collect();
                    self.builder.retrieval(&items)
                })
                .collect(),
        )
    }

    fn vars(&self) -> Vec<&Var> {
        self.model.vars().iter().map(|(_, v)| v).collect()
    }

    /// Forward and backward of one batch: the flat gradient, the losses, and where the time went.
    pub fn gradients(
        &self,
        ds: &Dataset,
        samples: &[TrainingSample],
        risa_weight: f64,
    ) -> Result<(Vec<f32>, Losses, Timings)> {
        let t0 = Instant::now();
        let histories: Vec<Vec<&crate::data::Item>> =
            samples.iter().map(|s| s.history.iter().map(|&i| ds.item(i)).collect()).collect();
        let retrieval = self.encode_all(histories.iter().map(|h| self.builder.retrieval(h)).collect())?;
        let alignment = if risa_weight > 0.0 {
            Some(
                self.encode_all(
                    histories
                        .iter()
                        .zip(samples)
                        .map(|(h, s)| self.builder.alignment(h, ds.item(s.target), s.property, s.paraphrase))
                        .collect(),
                )?,
            )
        } else {
            None
        };
        let t1 = Instant::now();
        let h = self.model.user_states(&self.llm, &retrieval, &self.feats)?;
        let targets: Vec<u32> = samples.iter().map(|s| s.target).collect();
        let negatives: Vec<u32> = samples.iter().map(|s| s.negative).collect();
        let reri = self.model.retrieval_loss(&h, &targets, &negatives, &self.feats)?;
        let mut loss = reri.clone();
        let mut risa_value = 0.0;
        if let Some(alignment) = &alignment {
            let risa = self.model.alignment_loss(&self.llm, alignment, &self.feats)?;
            risa_value = scalar(&risa)?;
            loss = (loss + risa.affine(risa_weight, 0.0)?)?;
        }
        let losses = Losses { loss: scalar(&loss)?, reri: scalar(&reri)?, risa: risa_value };
        let t2 = Instant::now();
        let grads = loss.backward()?;
        let flat = flatten_grads(&self.vars(), &grads)?;
        let t3 = Instant::now();
        let tokens = retrieval.rows * retrieval.len + alignment.as_ref().map_or(0, |a| a.rows * a.len);
        let timings = Timings {
            prompts: (t1 - t0).as_secs_f64(),
            forward: (t2 - t1).as_secs_f64(),
            backward: (t3 - t2).as_secs_f64(),
            padded_tokens: tokens,
        };
        Ok((flat, losses, timings))
    }

    /// Mean tokens of an item's piece of the prompt (text tokens + its item token), over the catalog.
    pub fn tokens_per_item(&self, ds: &Dataset) -> Result<f64> {
        self.tokens_per_item_with(&self.builder, ds)
    }

    /// The same for another prompt variant's builder.
    pub fn tokens_per_item_with(&self, builder: &PromptBuilder, ds: &Dataset) -> Result<f64> {
        let mut total = 0usize;
        for item in &ds.items {
            let mut segments = Vec::new();
            builder.item_piece(item, &mut segments);
            total += self.segment_tokens(&segments)?;
        }
        Ok(total as f64 / ds.num_items().max(1) as f64)
    }

    /// Mean tokens of the test-split retrieval prompt (the last `max_history` items) over the first
    /// `users` users.
    pub fn mean_prompt_tokens(&self, ds: &Dataset, users: usize) -> Result<f64> {
        self.mean_prompt_tokens_with(&self.builder, ds, users)
    }

    /// The same for another prompt variant's builder.
    pub fn mean_prompt_tokens_with(&self, builder: &PromptBuilder, ds: &Dataset, users: usize) -> Result<f64> {
        let n = ds.num_users().min(users).max(1);
        let mut total = 0;
        for u in 0..n {
            let h = crate::data::windows::eval_history(ds, u, crate::data::Split::Test, self.model.cfg.max_history);
            let items: Vec<_> = h.iter().map(|&i| ds.item(i)).collect();
            total += self.prompt_tokens(&builder.retrieval(&items))?;
        }
        Ok(total as f64 / n as f64)
    }

    /// Tokens of a whole prompt (answer excluded).
    pub fn prompt_tokens(&self, prompt: &crate::data::prompt::Prompt) -> Result<usize> {
        self.segment_tokens(&prompt.segments)
    }

    fn segment_tokens(&self, segments: &[Segment]) -> Result<usize> {
        let mut n = 0;
        for s in segments {
            n += match s {
                Segment::Text(t) => self.llm.encode(t).map_err(|e| TrainError::Invalid(e.to_string()))?.len(),
                Segment::Bos => usize::from(self.llm.bos.is_some()),
                Segment::ItemToken(_) | Segment::Rec => 1,
            };
        }
        Ok(n)
    }
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// Seconds spent in each phase of a step, and the tokens (padding included) the LLM processed.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Timings {
    pub prompts: f64,
    pub forward: f64,
    pub backward: f64,
    pub padded_tokens: usize,
}

#[derive(Debug, Clone, Copy, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct Losses {
    pub loss: f64,
    pub reri: f64,
    pub risa: f64,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct StepLog {
    pub step: u64,
    pub epoch: u64,
    #[serde(flatten)]
    pub losses: Losses,
    pub grad_norm: f64,
    pub lr: f64,
}

/// What a training call did, for the terminal and the run's report.
#[derive(Debug, Clone, Serialize)]
pub struct FitReport {
    pub variant: &'static str,
    pub llm: String,
    pub backend: &'static str,
    pub world_size: usize,
    pub trainable_parameters: usize,
    pub users: usize,
    pub steps_per_epoch: u64,
    pub total_steps: u64,
    pub first_step: u64,
    pub last_step: u64,
    pub resumed_from: Option<u64>,
    /// Stopped early on a preemption signal, with a checkpoint: resume to finish.
    pub preempted: bool,
    pub seconds: f64,
    pub samples_per_second: f64,
    /// Seconds inside collectives (all-reduce, checks), this rank.
    pub collective_seconds: f64,
    pub tokens_per_item: f64,
    pub mean_prompt_tokens: f64,
    pub fallback_items: usize,
    pub log: Vec<StepLog>,
}

/// Linear decay from `base` to 0 over `total` steps, no warm-up: the rate of update `step` (0-based).
pub fn linear_decay(base: f64, step: u64, total: u64) -> f64 {
    base * (total - step.min(total)) as f64 / total.max(1) as f64
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

/// The training loop's moving parts: the plan, the flat parameters and the optimizer. `step` runs
/// one global step as this rank; `fit` and `illmrec bench step` both drive it.
pub struct Stepper<'a> {
    sess: &'a Session,
    ds: &'a Dataset,
    pub plan: ShardPlan,
    cfg: &'a crate::train::IllmRecTrainConfig,
    seed: u64,
    check_every: u64,
    pub params: Vec<f32>,
    pub opt: AdamW,
    order: Option<(u64, Vec<usize>)>,
}

impl<'a> Stepper<'a> {
    pub fn new(job: &'a JobConfig, sess: &'a Session, ds: &'a Dataset, rank: usize, world: usize) -> Result<Self> {
        let cfg = &job.train.illmrec;
        let plan = ShardPlan::new(
            trainable_users(ds),
            job.train.seed,
            cfg.batch_size,
            rank,
            world,
            cfg.epochs,
            cfg.max_steps,
        )?;
        let params = read_params(&sess.vars())?;
        let opt = AdamW::new(params.len(), cfg.betas, cfg.weight_decay);
        Ok(Self {
            sess,
            ds,
            plan,
            cfg,
            seed: job.train.seed,
            check_every: job.dist.check_every,
            params,
            opt,
            order: None,
        })
    }

    /// Global step `step` (0-based): this rank's share of the users, one all-reduce that averages
    /// the gradients (the losses and this rank's vote to stop ride along), clipping, the update every
    /// rank applies alike. A stop asked on any rank is seen by all after the same step.
    pub fn step(&mut self, coll: &Guarded, step: u64, stop: bool) -> Result<StepOutcome> {
        let epoch = self.plan.epoch_of(step);
        if self.order.as_ref().is_none_or(|(e, _)| *e != epoch) {
            self.order = Some((epoch, self.plan.agreed_order(coll, epoch)?));
        }
        let order = self.order.as_ref().map(|(_, o)| &o[..]).unwrap_or_default();
        let max_history = self.sess.model.cfg.max_history;
        let samples: Vec<TrainingSample> = self
            .plan
            .rank_users(order, step)
            .iter()
            .map(|&u| training_sample(self.ds, u, epoch, self.seed, max_history))
            .collect();
        let (mut grads, local, timings) = self.sess.gradients(self.ds, &samples, self.cfg.risa_weight)?;
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
        let grad_norm = clip_global_norm(&mut grads, self.cfg.grad_clip);
        let lr = linear_decay(self.cfg.lr, step, self.plan.total_steps);
        self.opt.update(&mut self.params, &grads, lr);
        write_params(&self.sess.vars(), &self.params)?;
        let optimizer_seconds = started.elapsed().as_secs_f64();
        if (step + 1) % self.check_every == 0 {
            check_same(
                coll,
                &format!("the parameters after step {}", step + 1),
                &state_digest(&self.params, step + 1),
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

/// What must match for a checkpoint to be resumed: everything that changes the numbers.
fn fingerprint(job: &JobConfig, variant: Variant, ds: &Dataset) -> serde_json::Value {
    let t = &job.train.illmrec;
    json!({
        "variant": variant.name(),
        "dataset_key": ds.key,
        "seed": job.train.seed,
        "llm": job.model.llm,
        "model": job.model.illmrec,
        "features": job.features,
        "train": {"epochs": t.epochs, "batch_size": t.batch_size, "lr": t.lr, "betas": t.betas,
                  "weight_decay": t.weight_decay, "grad_clip": t.grad_clip, "risa_weight": t.risa_weight,
                  "max_steps": t.max_steps},
    })
}

fn weights_file(model: &IllmRec) -> Result<Vec<u8>> {
    let host = model.to_host()?;
    Ok(to_bytes(host.iter().map(|t| (t.name.clone(), Array::F32(&t.values, t.shape.clone()))).collect(), None))
}

fn read_weights(bytes: &[u8], what: &str) -> Result<Vec<HostTensor>> {
    let tf = TensorFile::parse(bytes, what)?;
    tf.names()
        .into_iter()
        .map(|name| tf.f32(&name).map(|(shape, values)| HostTensor { name, shape, values }))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(Into::into)
}

fn optimizer_file(opt: &AdamW) -> Vec<u8> {
    let n = opt.m.len();
    let meta = std::collections::HashMap::from([("step".to_string(), opt.step.to_string())]);
    to_bytes(vec![("m".into(), Array::F32(&opt.m, vec![n])), ("v".into(), Array::F32(&opt.v, vec![n]))], Some(meta))
}

fn read_optimizer(bytes: &[u8], what: &str, betas: [f64; 2], wd: f64, n: usize) -> Result<AdamW> {
    let tf = TensorFile::parse(bytes, what)?;
    let (_, m) = tf.f32("m")?;
    let (_, v) = tf.f32("v")?;
    if m.len() != n || v.len() != n {
        return Err(TrainError::Invalid(format!("{what}: optimizer state for {} values, the model has {n}", m.len())));
    }
    let step = tf.metadata("step").and_then(|s| s.parse().ok()).unwrap_or(0);
    Ok(AdamW { step, m, v, ..AdamW::new(0, betas, wd) })
}

const LOG_FILE: &str = "train-log.jsonl";

fn write_log(store: &Store, run_id: &str, log: &[StepLog]) -> Result<()> {
    let mut out = Vec::new();
    for l in log {
        serde_json::to_writer(&mut out, l).map_err(|e| TrainError::Invalid(e.to_string()))?;
        out.push(b'\n');
    }
    runs::put_report(store, run_id, LOG_FILE, out)
}

/// The run's training loss by step (empty for a run without a log).
pub fn loss_curve(store: &Store, run_id: &str) -> Result<crate::eval::plots::LossCurve> {
    let points = read_log(store, run_id, u64::MAX)?.iter().map(|l| (l.step, l.losses.loss)).collect();
    Ok(crate::eval::plots::LossCurve { label: run_id.to_string(), points })
}

fn read_log(store: &Store, run_id: &str, up_to: u64) -> Result<Vec<StepLog>> {
    let k = crate::store::key(&[&runs::dir(run_id), "report", LOG_FILE]);
    let Some(bytes) = store.get_opt(&k)? else { return Ok(Vec::new()) };
    let mut log = Vec::new();
    for line in bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let l: StepLog = serde_json::from_slice(line).map_err(|e| TrainError::Invalid(format!("{k}: {e}")))?;
        if l.step <= up_to {
            log.push(l);
        }
    }
    Ok(log)
}

/// Trains `variant` on the job's latest snapshot (or continues it with `opts.resume`) as one rank of
/// `coll`: each rank computes the gradients of its share of the step's users, one all-reduce averages
/// them (with the losses riding along), and every rank applies the same update. Rank 0 writes the
/// checkpoints and the log.
pub fn fit(
    job: &JobConfig,
    store: &Store,
    variant: Variant,
    opts: TrainOptions,
    coll: &mut Guarded,
) -> Result<FitReport> {
    let started = Instant::now();
    let tcfg = &job.train.illmrec;
    let (rank, world) = (coll.rank(), coll.world());
    let lead = rank == 0;
    let ds = crate::data::snapshot::load(store, job.dataset())?;
    let run_id = super::run_id(job, super::ModelKind::Illmrec(variant));
    let sess = Session::new(job, store, &ds, variant)?;
    let mut stepper = Stepper::new(job, &sess, &ds, rank, world)?;
    let plan = stepper.plan.clone();
    let finger = fingerprint(job, variant, &ds);
    let (mut next_step, mut log, resumed_from) = if opts.resume {
        let ckpt = runs::load_latest(store, &run_id)?.ok_or_else(|| {
            TrainError::Invalid(format!("--resume: run {run_id} has no checkpoint under {}", store.url()))
        })?;
        check_fingerprint(&ckpt.state["fingerprint"], &finger, &run_id)?;
        restore(&sess, &mut stepper, &ckpt, &run_id, tcfg)?;
        (ckpt.step, read_log(store, &run_id, ckpt.step)?, Some(ckpt.step))
    } else {
        if let Some(from) = &opts.from {
            let ckpt = runs::load_latest(store, from)?.ok_or_else(|| {
                TrainError::Invalid(format!("--from: run {from} has no checkpoint under {}", store.url()))
            })?;
            restore(&sess, &mut stepper, &ckpt, from, tcfg)?;
            tracing::info!("warm start from runs/{from} checkpoint {}", ckpt.name);
        }
        if lead {
            runs::clear(store, &run_id)?;
        }
        (0, Vec::new(), None)
    };
    // Every rank has loaded the model: from here a collective should return within a step.
    check_same(coll, "the starting parameters and step", &state_digest(&stepper.params, next_step))?;
    coll.set_timeout(std::time::Duration::from_secs(job.dist.timeout_secs));
    coll.take_spent();
    let last = opts.stop_after.map_or(plan.total_steps, |s| s.min(plan.total_steps));
    let mut progress = lead.then(|| {
        Progress::new(&job.telemetry, &format!("illmrec:{}", variant.name()), plan.total_steps)
            .with_samples_per_unit(plan.global_batch)
    });
    if let Some(p) = progress.as_mut() {
        p.inc(next_step);
    }
    let save = |step: u64, opt: &AdamW, log: &[StepLog]| -> Result<()> {
        let state = json!({
            "model": super::ModelKind::Illmrec(variant).to_string(),
            "variant": variant.name(),
            "dataset": ds.name,
            "dataset_key": ds.key,
            "step": step,
            "epoch": plan.epoch_of(step),
            "steps_per_epoch": plan.steps_per_epoch,
            "total_steps": plan.total_steps,
            "world_size": world,
            "rng": "counter-based: every draw is keyed by (seed, epoch, user); the step is the whole state",
            "fingerprint": finger,
            "warm_start_from": opts.from,
        });
        runs::save(
            store,
            &run_id,
            step,
            vec![("weights.safetensors", weights_file(&sess.model)?), ("optimizer.safetensors", optimizer_file(opt))],
            &state,
            tcfg.keep_checkpoints,
        )?;
        write_log(store, &run_id, log)
    };
    let first_step = next_step;
    let mut comm = 0.0;
    let step_timeout = std::time::Duration::from_secs(job.dist.timeout_secs);
    // A checkpoint makes a handful of requests, each allowed the store's whole retry budget.
    let save_budget = store.request_budget() * 6;
    let mut preempted = false;
    let mut epoch_span: Option<(u64, tracing::Span)> = None;
    while next_step < last {
        let epoch = plan.epoch_of(next_step);
        if epoch_span.as_ref().is_none_or(|(e, _)| *e != epoch) {
            epoch_span = Some((epoch, tracing::info_span!("epoch", epoch)));
        }
        let parent = epoch_span.as_ref().and_then(|(_, s)| s.id());
        let _step = tracing::info_span!(parent: parent, "step", step = next_step + 1).entered();
        let out = stepper.step(coll, next_step, crate::dist::preempt::requested())?;
        next_step += 1;
        comm += out.collective_seconds;
        if let Some(p) = progress.as_mut() {
            let l = out.log.losses;
            p.set_message(format!("loss {:.4} (reri {:.4} risa {:.4})", l.loss, l.reri, l.risa));
            p.inc(1);
        }
        log.push(out.log);
        if out.stop {
            tracing::warn!("preemption signal: stopping after step {next_step} with a checkpoint");
            preempted = true;
            break;
        }
        if next_step % tcfg.checkpoint_every == 0 && next_step < last {
            // The others wait for rank 0's save with the store's retry budget added to their
            // deadline: a slow store must not look like a stalled rank to their watchdogs (and on a
            // local root the deadline stays the step's, so a stalled rank is still caught fast).
            coll.set_timeout(step_timeout + save_budget);
            // Storage trouble costs this checkpoint, not the run: the previous one stays in force
            // and the next one tries again.
            if lead {
                match save(next_step, &stepper.opt, &log) {
                    Err(TrainError::Store(e)) => {
                        tracing::warn!("checkpoint at step {next_step} failed, training goes on: {e}");
                    }
                    other => other?,
                }
            }
            coll.barrier()?;
            coll.set_timeout(step_timeout);
        }
    }
    if let Some(p) = progress {
        p.finish();
    }
    // The final save may retry FINAL_SAVE_ATTEMPTS times with pauses of 2, 4, 8, ... seconds.
    let pauses = std::time::Duration::from_secs((1u64 << FINAL_SAVE_ATTEMPTS) - 2);
    coll.set_timeout(step_timeout + save_budget * FINAL_SAVE_ATTEMPTS + pauses);
    if lead && (next_step > first_step || resumed_from.is_none()) {
        let mut attempt = 1;
        loop {
            match save(next_step, &stepper.opt, &log) {
                Err(TrainError::Store(e)) if attempt < FINAL_SAVE_ATTEMPTS => {
                    let pause = std::time::Duration::from_secs(1 << attempt);
                    tracing::warn!(
                        "final checkpoint at step {next_step} failed (attempt {attempt} of {FINAL_SAVE_ATTEMPTS}), \
                         retrying in {}s: {e}",
                        pause.as_secs()
                    );
                    std::thread::sleep(pause);
                    attempt += 1;
                }
                other => break other?,
            }
        }
    }
    // Nobody leaves before the last checkpoint is committed: a launcher that restarts the job on
    // the first exit would otherwise resume from the one before.
    coll.barrier()?;
    let seconds = started.elapsed().as_secs_f64();
    let trained = (next_step - first_step) as f64 * plan.global_batch as f64;
    Ok(FitReport {
        variant: variant.name(),
        llm: sess.llm.name.clone(),
        backend: coll.name(),
        world_size: world,
        trainable_parameters: sess.model.num_parameters(),
        users: ds.num_users(),
        steps_per_epoch: plan.steps_per_epoch,
        total_steps: plan.total_steps,
        first_step,
        last_step: next_step,
        resumed_from,
        preempted,
        seconds,
        samples_per_second: trained / seconds.max(1e-9),
        collective_seconds: comm,
        tokens_per_item: sess.tokens_per_item(&ds)?,
        mean_prompt_tokens: sess.mean_prompt_tokens(&ds, 200)?,
        fallback_items: sess.fallback_items,
        log,
    })
}

/// Loads a checkpoint's trainable weights and optimizer state into the session and stepper.
fn restore(
    sess: &Session,
    stepper: &mut Stepper<'_>,
    ckpt: &runs::Checkpoint,
    run_id: &str,
    tcfg: &super::config::IllmRecTrainConfig,
) -> Result<()> {
    let what = format!("runs/{run_id} checkpoint {}", ckpt.name);
    sess.model.load_host(&read_weights(ckpt.file("weights.safetensors")?, &what)?)?;
    stepper.params = read_params(&sess.vars())?;
    stepper.opt = read_optimizer(
        ckpt.file("optimizer.safetensors")?,
        &what,
        tcfg.betas,
        tcfg.weight_decay,
        stepper.params.len(),
    )?;
    Ok(())
}

/// A digest of the parameters and step: equal on every rank of a healthy run.
fn state_digest(params: &[f32], step: u64) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(step.to_le_bytes());
    h.update(bytemuck::cast_slice(params));
    h.finalize().to_vec()
}

fn check_fingerprint(saved: &serde_json::Value, now: &serde_json::Value, run_id: &str) -> Result<()> {
    if saved == now {
        return Ok(());
    }
    let differs: Vec<String> = now
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, v)| saved.get(k.as_str()) != Some(v))
        .map(|(k, _)| k.clone())
        .collect();
    Err(TrainError::Invalid(format!(
        "--resume: run {run_id} was trained with different settings ({}); start it over without --resume",
        differs.join(", ")
    )))
}

/// A trained LLM recommender as evaluation sees it.
pub struct IllmRecScorer {
    sess: Session,
    ds: Dataset,
    item_embs: Vec<Tensor>,
    batch: usize,
}

impl IllmRecScorer {
    /// Loads the LATEST checkpoint of the job's `variant` run and scores `ds`'s items, which may be
    /// more than the run was trained on: new items are scored from their features.
    pub fn load(job: &JobConfig, store: &Store, ds: &Dataset, variant: Variant) -> Result<Self> {
        let run_id = super::run_id(job, super::ModelKind::Illmrec(variant));
        let ckpt = runs::load_latest(store, &run_id)?.ok_or_else(|| {
            TrainError::Invalid(format!(
                "no trained `{}` under {}/runs/{run_id}: run `illmrec train --job FILE --model {}` first",
                super::ModelKind::Illmrec(variant),
                store.url(),
                super::ModelKind::Illmrec(variant)
            ))
        })?;
        let sess = Session::new(job, store, ds, variant)?;
        let what = format!("runs/{run_id} checkpoint {}", ckpt.step);
        sess.model.load_host(&read_weights(ckpt.file("weights.safetensors")?, &what)?)?;
        let item_embs = sess.model.item_embeddings(&sess.feats)?;
        Ok(Self { sess, ds: ds.clone(), item_embs, batch: job.train.illmrec.eval_batch_size })
    }

    pub fn session(&self) -> &Session {
        &self.sess
    }
}

impl Scorer for IllmRecScorer {
    fn score(&self, histories: &[&[u32]]) -> crate::model::Result<Vec<f32>> {
        let mut out = Vec::with_capacity(histories.len() * (self.ds.num_items() + 1));
        for chunk in histories.chunks(self.batch) {
            let b = self.sess.retrieval_batch(&self.ds, chunk).map_err(|e| ModelError::Invalid(e.to_string()))?;
            let h = self.sess.model.user_states(&self.sess.llm, &b, &self.sess.feats)?;
            let s = self.sess.model.scores(&h, &self.item_embs, &self.sess.feats)?;
            out.extend(s.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
        }
        Ok(out)
    }
}
