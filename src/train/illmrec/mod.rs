//! Training the LLM recommenders (I-LLMRec and its prompt variants) on a frozen LLM.
//!
//! `fit` drives the steps (`step.rs`) of a data-parallel run, validates (`validate.rs`), commits
//! checkpoints (`checkpoint.rs`) through the run's folder, and resumes them exactly: all randomness
//! is keyed by (seed, epoch, user, window) and the early-stopping state travels in the checkpoint,
//! so the checkpoint's step is the whole of the "RNG state" and resuming replays nothing and skips
//! nothing.

pub mod checkpoint;
pub mod session;
pub mod step;
pub mod validate;

use std::time::Instant;

use serde::Serialize;
use serde_json::json;

use super::optim::AdamW;
use super::{runs, ModelKind, Result, TrainError, TrainJob};
use crate::data::prompt::Variant;
use crate::distributed::{check_same, Collective, Guarded};
use crate::store::Store;
use crate::telemetry::Progress;
use checkpoint::{
    check_fingerprint, fingerprint, optimizer_file, read_log, restore, state_digest, weights_file, write_log,
    write_validations,
};
pub use checkpoint::{load_scorer, loss_curve};
use step::StepLog;
pub use step::{Stepper, Timings};
use validate::{EarlyStopping, Validation, Validator};

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

/// Attempts at a checkpoint that must land (the final one, and a new best's) before the run gives
/// up, with a doubling pause between them.
const MUST_SAVE_ATTEMPTS: u32 = 5;

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
    /// Stopped because `patience` validations brought no better value.
    pub stopped_early: bool,
    /// (step, value) of the best validation: the BEST checkpoint.
    pub best: Option<(u64, f64)>,
    pub validation_metric: String,
    pub validation_users: usize,
    pub seconds: f64,
    pub samples_per_second: f64,
    /// Seconds inside collectives (all-reduce, checks), this rank.
    pub collective_seconds: f64,
    /// Seconds validating, this rank.
    pub validation_seconds: f64,
    pub tokens_per_item: f64,
    pub mean_prompt_tokens: f64,
    pub fallback_items: usize,
    pub log: Vec<StepLog>,
    pub validations: Vec<Validation>,
}

/// Trains `variant` on the job's latest snapshot (or continues it with `opts.resume`) as one rank of
/// `coll`: each rank computes the gradients of its share of the step's users, one all-reduce averages
/// them (with the losses riding along), and every rank applies the same update. Every
/// `validate_every` steps and after the last one the model is validated (`validate.rs`), a
/// checkpoint is committed, and BEST moves to it when it is the best so far; `patience`
/// validations without one end the run. Rank 0 writes the checkpoints and the logs.
pub fn fit(
    job: &TrainJob<'_>,
    store: &Store,
    variant: Variant,
    opts: TrainOptions,
    coll: &mut Guarded,
) -> Result<FitReport> {
    let started = Instant::now();
    let tcfg = &job.train.illmrec;
    let (rank, world) = (coll.rank(), coll.world());
    let lead = rank == 0;
    let ds = crate::data::snapshot::load(store, job.dataset)?;
    let run_id = job.run_id(ModelKind::Illmrec(variant));
    let sess = session::open(job, store, &ds, variant)?;
    let mut stepper = Stepper::new(job, &sess, &ds, rank, world)?;
    let plan = stepper.plan.clone();
    let finger = fingerprint(job, variant, &ds);
    let validator = Validator::new(tcfg, &ds, job.train.seed);
    let validate_every = tcfg.validate_every.unwrap_or(plan.steps_per_epoch).max(1);
    let due =
        |step: u64| tcfg.validates() && step > 0 && (step.is_multiple_of(validate_every) || step == plan.total_steps);
    let (mut next_step, mut log, mut early, resumed_from, warm_start_from) = if opts.resume {
        let ckpt = runs::load_latest(store, &run_id)?.ok_or_else(|| {
            TrainError::Invalid(format!("--resume: run {run_id} has no checkpoint under {}", store.url()))
        })?;
        check_fingerprint(&ckpt.state["fingerprint"], &finger, &run_id)?;
        restore(&sess, &mut stepper, &ckpt, &run_id, tcfg)?;
        let early: EarlyStopping = serde_json::from_value(ckpt.state["early_stopping"].clone()).unwrap_or_default();
        if lead && early.best.is_some_and(|(best, _)| best == ckpt.step) {
            // LATEST is the best checkpoint: a commit cut short between LATEST and BEST left BEST behind.
            runs::point_best(store, &run_id, &ckpt.name)?;
        }
        let warm_start_from = ckpt.state["warm_start_from"].as_str().map(str::to_string);
        (ckpt.step, read_log(store, &run_id, ckpt.step)?, early, Some(ckpt.step), warm_start_from)
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
        (0, Vec::new(), EarlyStopping::default(), None, opts.from.clone())
    };
    // Every rank has loaded the model: from here a collective should return within a step.
    check_same(coll, "the starting parameters and step", &state_digest(&stepper.params, next_step))?;
    coll.set_timeout(std::time::Duration::from_secs(job.dist.timeout_secs));
    coll.take_spent();
    let last = opts.stop_after.map_or(plan.total_steps, |s| s.min(plan.total_steps));
    let mut progress = lead.then(|| {
        // Named as the CLI names the model (`illmrec` is the image-token prompt).
        Progress::new(job.telemetry, &ModelKind::Illmrec(variant).to_string(), plan.total_steps)
            .with_samples_per_unit(plan.global_batch)
            .resumed_at(next_step)
    });
    let save = |step: u64, opt: &AdamW, log: &[StepLog], early: &EarlyStopping, best: bool| -> Result<()> {
        let state = json!({
            "model": ModelKind::Illmrec(variant).to_string(),
            "variant": variant.name(),
            "dataset": ds.name,
            "dataset_key": ds.key,
            "step": step,
            "epoch": plan.epoch_of(step),
            "steps_per_epoch": plan.steps_per_epoch,
            "total_steps": plan.total_steps,
            "world_size": world,
            "rng": "counter-based: every draw is keyed by (seed, epoch, user, window); the step is the whole state",
            "fingerprint": finger,
            "warm_start_from": warm_start_from,
            "early_stopping": early,
        });
        // The logs go first: a process that dies after LATEST moved must not leave them behind it
        // (a resume reads them up to its checkpoint's step, so steps past it are harmless).
        write_log(store, &run_id, log)?;
        write_validations(store, &run_id, &early.history)?;
        runs::save(
            store,
            &run_id,
            step,
            vec![("weights.safetensors", weights_file(&sess.model)?), ("optimizer.safetensors", optimizer_file(opt))],
            &state,
            tcfg.keep_checkpoints,
            best,
        )
    };
    let first_step = next_step;
    let (mut comm, mut validation_seconds) = (0.0, 0.0);
    let step_timeout = std::time::Duration::from_secs(job.dist.timeout_secs);
    // A checkpoint makes a handful of requests, each allowed the store's whole retry budget.
    let save_budget = store.request_budget() * 6;
    let pauses = std::time::Duration::from_secs((1u64 << MUST_SAVE_ATTEMPTS) - 2);
    let must_save_budget = save_budget * MUST_SAVE_ATTEMPTS + pauses;
    // A save that must land, retried MUST_SAVE_ATTEMPTS times with pauses of 2, 4, 8, ... seconds.
    let save_retrying = |what: &str, step: u64, opt: &AdamW, log: &[StepLog], early: &EarlyStopping, best| {
        let mut attempt = 1;
        loop {
            match save(step, opt, log, early, best) {
                Err(TrainError::Store(e)) if attempt < MUST_SAVE_ATTEMPTS && !e.is_conflict() => {
                    let pause = std::time::Duration::from_secs(1 << attempt);
                    tracing::warn!(
                        "{what} checkpoint at step {step} failed (attempt {attempt} of {MUST_SAVE_ATTEMPTS}), \
                         retrying in {}s: {e}",
                        pause.as_secs()
                    );
                    std::thread::sleep(pause);
                    attempt += 1;
                }
                other => return other,
            }
        }
    };
    // A checkpoint taken mid-run: the other ranks wait for rank 0's save with the store's retry
    // budget added to their deadline, so a slow store does not look like a stalled rank (on a local
    // root the deadline stays the step's, and a stalled rank is still caught fast). Storage trouble
    // costs a periodic checkpoint, not the run: the previous one stays in force and the next one
    // retries. A new best's checkpoint is retried instead: its weights are gone after the next step,
    // and BEST must name what the report calls best. A conflict (another writer on this run's
    // LATEST) ends the run at any save. Whether it committed (on rank 0; the others do not write and
    // report false).
    let checkpoint = |coll: &mut Guarded, step: u64, opt: &AdamW, log: &[StepLog], early: &EarlyStopping, best| {
        coll.set_timeout(step_timeout + if best { must_save_budget } else { save_budget });
        let mut committed = false;
        if lead {
            let saved = if best {
                save_retrying("best", step, opt, log, early, best)
            } else {
                save(step, opt, log, early, best)
            };
            match saved {
                Err(TrainError::Store(e)) if !best && !e.is_conflict() => {
                    tracing::warn!("checkpoint at step {step} failed, training goes on: {e}")
                }
                other => {
                    other?;
                    committed = true;
                }
            }
        }
        coll.barrier()?;
        coll.set_timeout(step_timeout);
        Ok::<_, TrainError>(committed)
    };
    let (mut preempted, mut stopped_early, mut saved_at) = (false, false, None);
    let mut epoch_span: Option<(u64, tracing::Span)> = None;
    loop {
        // Validation after step `next_step` (also the one a resumed run owes its checkpoint).
        if due(next_step) && !early.has(next_step) && !preempted {
            let epoch = plan.epoch_of(next_step - 1);
            let span = tracing::info_span!(
                "validate",
                step = next_step as i64,
                users = validator.users() as i64,
                value = tracing::field::Empty
            );
            let v = span.in_scope(|| validator.run(&sess, &ds, &*coll, next_step, epoch))?;
            span.record("value", v.value);
            validation_seconds += v.seconds;
            comm += coll.take_spent().as_secs_f64();
            let improved = early.record(v.clone(), tcfg.validation.min_delta);
            let (best_step, best) = early.best.unwrap_or((next_step, v.value));
            tracing::info!(
                "validation after step {next_step}: {} {:.4} on {} users ({:.1}s){}; best {best:.4} at step {best_step}",
                validator.metric(),
                v.value,
                validator.users(),
                v.seconds,
                if improved { ", new best" } else { "" }
            );
            if let Some(p) = progress.as_mut() {
                p.set_message(format!("valid {} {:.4} (best {best:.4} @ {best_step})", validator.metric(), v.value));
            }
            if checkpoint(coll, next_step, &stepper.opt, &log, &early, improved)? {
                saved_at = Some(next_step);
            }
        }
        // Checked on every pass, not only after a fresh validation: a run resumed from the checkpoint
        // it stopped early at has nothing left to train.
        if early.exhausted(tcfg.patience) {
            let (best_step, best) = early.best.unwrap_or_default();
            tracing::info!(
                "stopping early{}: {} validations without a better {} (best {best:.4} at step {best_step})",
                if resumed_from == Some(next_step) { " (as the run did before it was resumed)" } else { "" },
                early.since_best,
                validator.metric()
            );
            stopped_early = true;
            break;
        }
        if next_step >= last || preempted {
            break;
        }
        let epoch = plan.epoch_of(next_step);
        if epoch_span.as_ref().is_none_or(|(e, _)| *e != epoch) {
            epoch_span = Some((epoch, tracing::info_span!("epoch", epoch = epoch as i64)));
        }
        let parent = epoch_span.as_ref().and_then(|(_, s)| s.id());
        let _step = tracing::info_span!(parent: parent, "step", step = (next_step + 1) as i64).entered();
        let out = stepper.step(coll, next_step, crate::distributed::preempt::requested())?;
        next_step += 1;
        comm += out.collective_seconds;
        if let Some(p) = progress.as_mut() {
            let l = out.log.losses;
            let valid = early.best.map(|(s, b)| format!(", valid best {b:.4} @ {s}")).unwrap_or_default();
            p.set_message(format!("loss {:.4} (reri {:.4} risa {:.4}){valid}", l.loss, l.reri, l.risa));
            p.inc(1);
        }
        log.push(out.log);
        if out.stop {
            tracing::warn!("preemption signal: stopping after step {next_step} with a checkpoint");
            preempted = true;
            continue;
        }
        if next_step % tcfg.checkpoint_every == 0 && next_step < last && !due(next_step) {
            checkpoint(coll, next_step, &stepper.opt, &log, &early, false)?;
        }
    }
    if let Some(p) = progress {
        p.finish();
    }
    // The final save (unless the last validation just committed it) must land; BEST moves with it
    // when a validation of this very step improved.
    coll.set_timeout(step_timeout + must_save_budget);
    let resumed_at_end = resumed_from == Some(next_step);
    if lead && saved_at != Some(next_step) && !resumed_at_end {
        let best = early.history.last().is_some_and(|v| v.step == next_step && v.improved);
        save_retrying("final", next_step, &stepper.opt, &log, &early, best)?;
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
        stopped_early,
        best: early.best,
        validation_metric: validator.metric().to_string(),
        validation_users: validator.users(),
        seconds,
        samples_per_second: trained / seconds.max(1e-9),
        collective_seconds: comm,
        validation_seconds,
        tokens_per_item: sess.tokens_per_item(&sess.builder, &ds)?,
        mean_prompt_tokens: sess.mean_prompt_tokens(&sess.builder, &ds, 200)?,
        fallback_items: sess.fallback_items,
        log,
        validations: early.history,
    })
}
