//! What an I-LLMRec checkpoint holds and how it is read back: the trainable weights and the AdamW
//! state (safetensors), the settings fingerprint a resume must match, and the training log beside
//! the run's report.

use serde_json::json;

use super::super::optim::{read_params, AdamW};
use super::super::{runs, IllmRecTrainConfig, ModelKind, Result, TrainError, TrainJob};
use super::step::{StepLog, Stepper};
use super::validate::Validation;
use crate::data::prompt::Variant;
use crate::data::Dataset;
use crate::model::illmrec::scorer::IllmRecScorer;
use crate::model::illmrec::session::Session;
use crate::model::illmrec::IllmRec;
use crate::model::HostTensor;
use crate::store::Store;
use crate::tensorfile::{to_bytes, Array, TensorFile};

/// What must match for a checkpoint to be resumed: everything that changes the numbers beyond
/// rounding. The device and the world size are left out: a run may move between them.
pub fn fingerprint(job: &TrainJob<'_>, variant: Variant, ds: &Dataset) -> serde_json::Value {
    let t = &job.train.illmrec;
    json!({
        "variant": variant.name(),
        "dataset_key": ds.key,
        "seed": job.train.seed,
        "llm": job.model.llm,
        "llm_matmul": job.model.llm_matmul,
        "model": job.model.illmrec,
        "features": job.features,
        "train": {"epochs": t.epochs, "batch_size": t.batch_size, "lr": t.lr, "betas": t.betas,
                  "weight_decay": t.weight_decay, "grad_clip": t.grad_clip, "risa_weight": t.risa_weight,
                  "max_steps": t.max_steps, "schedule": t.schedule, "warmup_steps": t.warmup_steps,
                  "head_lr": t.head_lr, "windows_per_user": t.windows_per_user, "negatives": t.negatives,
                  "reri_loss": t.reri_loss},
        "validation": {"every": t.validate_every, "patience": t.patience, "sample": t.validation},
    })
}

/// Refuses a resume whose settings differ from the checkpoint's, naming what differs.
pub fn check_fingerprint(saved: &serde_json::Value, now: &serde_json::Value, run_id: &str) -> Result<()> {
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

pub fn weights_file(model: &IllmRec) -> Result<Vec<u8>> {
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

pub fn optimizer_file(opt: &AdamW) -> Vec<u8> {
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

/// Loads a checkpoint's trainable weights and optimizer state into the session and stepper.
pub fn restore(
    sess: &Session,
    stepper: &mut Stepper<'_>,
    ckpt: &runs::Checkpoint,
    run_id: &str,
    tcfg: &IllmRecTrainConfig,
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
pub fn state_digest(params: &[f32], step: u64) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(step.to_le_bytes());
    h.update(bytemuck::cast_slice(params));
    h.finalize().to_vec()
}

/// Loads a checkpoint (`which`: BEST by default) of the job's `variant` run into a scorer of `ds`'s
/// items, which may be more than the run was trained on: new items are scored from their features.
pub fn load_scorer<'d>(
    job: &TrainJob<'_>,
    store: &Store,
    ds: &'d Dataset,
    variant: Variant,
    which: runs::Which,
) -> Result<IllmRecScorer<'d, Session>> {
    let kind = ModelKind::Illmrec(variant);
    let run_id = job.run_id(kind);
    let ckpt = runs::load(store, &run_id, which)?.ok_or_else(|| {
        TrainError::Invalid(format!(
            "no trained `{kind}` under {}/runs/{run_id}: run `illmrec train --job FILE --model {kind}` first",
            store.url()
        ))
    })?;
    let sess = super::session::open(job, store, ds, variant)?;
    let what = format!("runs/{run_id} checkpoint {}", ckpt.step);
    tracing::info!("{kind}: scoring with the checkpoint of step {} ({which})", ckpt.step);
    sess.model.load_host(&read_weights(ckpt.file("weights.safetensors")?, &what)?)?;
    Ok(IllmRecScorer::new(sess, ds, job.train.illmrec.eval_batch_size)?)
}

const LOG_FILE: &str = "train-log.jsonl";
const VALID_FILE: &str = "valid-log.jsonl";

/// Writes the run's validations, one JSON line each, beside the training log (an empty file for
/// none, so a fresh run does not report an earlier run's).
pub fn write_validations(store: &Store, run_id: &str, history: &[Validation]) -> Result<()> {
    let mut out = Vec::new();
    for v in history {
        serde_json::to_writer(&mut out, v).map_err(|e| TrainError::Invalid(e.to_string()))?;
        out.push(b'\n');
    }
    runs::put_report(store, run_id, VALID_FILE, out)
}

/// The run's validations (empty for a run that did not validate).
pub fn read_validations(store: &Store, run_id: &str) -> Result<Vec<Validation>> {
    let k = crate::store::key(&[&runs::dir(run_id), "report", VALID_FILE]);
    let Some(bytes) = store.get_opt(&k)? else { return Ok(Vec::new()) };
    bytes
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|line| serde_json::from_slice(line).map_err(|e| TrainError::Invalid(format!("{k}: {e}"))))
        .collect()
}

pub fn write_log(store: &Store, run_id: &str, log: &[StepLog]) -> Result<()> {
    let mut out = Vec::new();
    for l in log {
        serde_json::to_writer(&mut out, l).map_err(|e| TrainError::Invalid(e.to_string()))?;
        out.push(b'\n');
    }
    runs::put_report(store, run_id, LOG_FILE, out)
}

/// The run's training loss and validation metric by step (empty for a run without them).
pub fn loss_curve(store: &Store, run_id: &str) -> Result<crate::eval::plots::LossCurve> {
    let points = read_log(store, run_id, u64::MAX)?.iter().map(|l| (l.step, l.losses.loss)).collect();
    let validations = read_validations(store, run_id)?;
    Ok(crate::eval::plots::LossCurve {
        label: run_id.to_string(),
        points,
        validation_metric: validations.first().map(|v| v.metric.clone()).unwrap_or_default(),
        validation: validations.iter().map(|v| (v.step, v.value)).collect(),
    })
}

/// The training log up to step `up_to`.
pub fn read_log(store: &Store, run_id: &str, up_to: u64) -> Result<Vec<StepLog>> {
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
