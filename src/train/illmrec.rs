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
use crate::data::windows::{epoch_order, trainable_users, training_sample, TrainingSample};
use crate::data::Dataset;
use crate::model::illmrec::batch::{encode, EncodedBatch};
use crate::model::illmrec::{FeatureMatrix, Features, IllmRec};
use crate::model::llm::Llm;
use crate::model::{HostTensor, ModelError, Scorer};
use crate::seed::stream;
use crate::store::Store;
use crate::telemetry::Progress;
use crate::tensorfile::{to_bytes, Array, TensorFile};

/// How a training call starts and stops.
#[derive(Debug, Clone, Copy, Default)]
pub struct TrainOptions {
    /// Continue from the run's LATEST checkpoint instead of starting over.
    pub resume: bool,
    /// Stop (with a checkpoint) after this global step, as a preempted job would.
    pub stop_after: Option<u64>,
}

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
    pub trainable_parameters: usize,
    pub users: usize,
    pub steps_per_epoch: u64,
    pub total_steps: u64,
    pub first_step: u64,
    pub last_step: u64,
    pub resumed_from: Option<u64>,
    pub seconds: f64,
    pub samples_per_second: f64,
    pub tokens_per_item: f64,
    pub mean_prompt_tokens: f64,
    pub fallback_items: usize,
    pub log: Vec<StepLog>,
}

/// The step schedule: every rank's equal share of an epoch's users per step.
pub struct Plan {
    pub users: Vec<usize>,
    pub batch: usize,
    pub steps_per_epoch: u64,
    pub total_steps: u64,
}

impl Plan {
    pub fn new(ds: &Dataset, batch: usize, epochs: u64, max_steps: Option<u64>) -> Result<Self> {
        let users = trainable_users(ds);
        if users.is_empty() {
            return Err(TrainError::Invalid("no user has a training sequence of 2+ items".into()));
        }
        let batch = batch.min(users.len());
        // Whole batches only, so every step (and every rank) sees the same number of users; the
        // epoch's permutation changes which users fall off the end.
        let steps_per_epoch = (users.len() / batch) as u64;
        let total = steps_per_epoch * epochs;
        Ok(Self { users, batch, steps_per_epoch, total_steps: max_steps.map_or(total, |m| m.min(total).max(1)) })
    }

    /// The users of global step `step` (0-based).
    pub fn batch_users(&self, seed: u64, step: u64) -> (u64, Vec<usize>) {
        let epoch = step / self.steps_per_epoch;
        let pos = (step % self.steps_per_epoch) as usize;
        let order = epoch_order(&self.users, seed, epoch);
        (epoch, order[pos * self.batch..(pos + 1) * self.batch].to_vec())
    }

    /// Linear decay from `lr` to 0 over the run, no warm-up.
    pub fn lr(&self, base: f64, step: u64) -> f64 {
        base * (self.total_steps - step) as f64 / self.total_steps as f64
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

/// Trains `variant` on the job's latest snapshot (or continues it with `opts.resume`).
pub fn fit(job: &JobConfig, store: &Store, variant: Variant, opts: TrainOptions) -> Result<FitReport> {
    let started = Instant::now();
    let tcfg = &job.train.illmrec;
    let ds = crate::data::snapshot::load(store, &job.name)?;
    let run_id = super::run_id(job, super::ModelKind::Illmrec(variant));
    let sess = Session::new(job, store, &ds, variant)?;
    let plan = Plan::new(&ds, tcfg.batch_size, tcfg.epochs, tcfg.max_steps)?;
    let vars = sess.vars();
    let mut params = read_params(&vars)?;
    let mut opt = AdamW::new(params.len(), tcfg.betas, tcfg.weight_decay);
    let finger = fingerprint(job, variant, &ds);
    let (mut next_step, mut log, resumed_from) = if opts.resume {
        let ckpt = runs::load_latest(store, &run_id)?.ok_or_else(|| {
            TrainError::Invalid(format!("--resume: run {run_id} has no checkpoint under {}", store.url()))
        })?;
        check_fingerprint(&ckpt.state["fingerprint"], &finger, &run_id)?;
        let what = format!("runs/{run_id} checkpoint {}", ckpt.step);
        sess.model.load_host(&read_weights(ckpt.file("weights.safetensors")?, &what)?)?;
        params = read_params(&vars)?;
        opt = read_optimizer(ckpt.file("optimizer.safetensors")?, &what, tcfg.betas, tcfg.weight_decay, params.len())?;
        (ckpt.step, read_log(store, &run_id, ckpt.step)?, Some(ckpt.step))
    } else {
        runs::clear(store, &run_id)?;
        (0, Vec::new(), None)
    };
    let last = opts.stop_after.map_or(plan.total_steps, |s| s.min(plan.total_steps));
    let mut progress = Progress::new(&job.telemetry, &format!("illmrec:{}", variant.name()), plan.total_steps);
    progress.inc(next_step);
    let save = |step: u64, opt: &AdamW, log: &[StepLog]| -> Result<()> {
        let state = json!({
            "model": super::ModelKind::Illmrec(variant).to_string(),
            "variant": variant.name(),
            "dataset": ds.name,
            "dataset_key": ds.key,
            "step": step,
            "epoch": step / plan.steps_per_epoch,
            "steps_per_epoch": plan.steps_per_epoch,
            "total_steps": plan.total_steps,
            "rng": "counter-based: every draw is keyed by (seed, epoch, user); the step is the whole state",
            "fingerprint": finger,
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
    let mut mean_prompt = (0.0, 0usize);
    while next_step < last {
        let (epoch, users) = plan.batch_users(job.train.seed, next_step);
        let samples: Vec<TrainingSample> =
            users.iter().map(|&u| training_sample(&ds, u, epoch, job.train.seed, sess.model.cfg.max_history)).collect();
        let (mut grads, losses, _) = sess.gradients(&ds, &samples, tcfg.risa_weight)?;
        if !losses.loss.is_finite() {
            return Err(TrainError::Invalid(format!("the loss became {} at step {}", losses.loss, next_step + 1)));
        }
        let grad_norm = clip_global_norm(&mut grads, tcfg.grad_clip);
        let lr = plan.lr(tcfg.lr, next_step);
        opt.update(&mut params, &grads, lr);
        write_params(&vars, &params)?;
        next_step += 1;
        log.push(StepLog { step: next_step, epoch, losses, grad_norm, lr });
        if mean_prompt.1 == 0 {
            let b = sess.retrieval_batch(&ds, &samples.iter().map(|s| &s.history[..]).collect::<Vec<_>>())?;
            mean_prompt = (b.lengths.iter().sum::<usize>() as f64 / b.rows as f64, 1);
        }
        progress.set_message(format!("loss {:.4} (reri {:.4} risa {:.4})", losses.loss, losses.reri, losses.risa));
        progress.inc(1);
        if next_step % tcfg.checkpoint_every == 0 && next_step < last {
            save(next_step, &opt, &log)?;
        }
    }
    progress.finish();
    if next_step > first_step || resumed_from.is_none() {
        save(next_step, &opt, &log)?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let trained = (next_step - first_step) as f64 * plan.batch as f64;
    Ok(FitReport {
        variant: variant.name(),
        llm: sess.llm.name.clone(),
        trainable_parameters: sess.model.num_parameters(),
        users: plan.users.len(),
        steps_per_epoch: plan.steps_per_epoch,
        total_steps: plan.total_steps,
        first_step,
        last_step: next_step,
        resumed_from,
        seconds,
        samples_per_second: trained / seconds.max(1e-9),
        tokens_per_item: sess.tokens_per_item(&ds)?,
        mean_prompt_tokens: mean_prompt.0,
        fallback_items: sess.fallback_items,
        log,
    })
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
