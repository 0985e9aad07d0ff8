//! Benchmarks that print figures (JSON), never asserted in tests: where a training step's time goes.

use std::time::Instant;

use serde::Serialize;

use crate::config::JobConfig;
use crate::data::prompt::{PromptBuilder, Variant};
use crate::data::windows::{eval_history, training_sample, TrainingSample};
use crate::data::{Dataset, Split};
use crate::store::Store;
use crate::train::illmrec::{Plan, Session, Timings};
use crate::train::optim::{clip_global_norm, read_params, write_params, AdamW};
use crate::train::TrainError;

/// Peak resident memory of this process so far, in MiB (Linux; 0 elsewhere).
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(str::to_string))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<f64>().ok()))
        .map_or(0.0, |kb| kb / 1024.0)
}

#[derive(Debug, Serialize)]
pub struct VariantTokens {
    pub variant: &'static str,
    pub tokens_per_item: f64,
    /// Mean tokens of the test-split retrieval prompt (last `max_history` items).
    pub mean_prompt_tokens: f64,
}

#[derive(Debug, Serialize)]
pub struct StepBench {
    pub llm: String,
    pub variant: &'static str,
    pub threads: usize,
    pub batch_size: usize,
    pub steps: usize,
    pub trainable_parameters: usize,
    /// Mean over the timed steps.
    pub seconds_per_step: f64,
    pub seconds_per_sample: f64,
    pub samples_per_second: f64,
    pub padded_tokens_per_step: f64,
    pub tokens_per_second: f64,
    pub prompts_seconds: f64,
    pub forward_seconds: f64,
    pub backward_seconds: f64,
    pub optimizer_seconds: f64,
    pub peak_rss_mib: f64,
    pub tokens: Vec<VariantTokens>,
}

/// Times `steps` full training steps (after `warmup` untimed ones) of `variant` on the job's snapshot.
pub fn step(
    job: &JobConfig,
    store: &Store,
    variant: Variant,
    steps: usize,
    warmup: usize,
) -> Result<StepBench, TrainError> {
    let ds = crate::data::snapshot::load(store, &job.name)?;
    let sess = Session::new(job, store, &ds, variant)?;
    let t = &job.train.illmrec;
    let plan = Plan::new(&ds, t.batch_size, t.epochs, None)?;
    let vars: Vec<&candle_core::Var> = sess.model.vars().iter().map(|(_, v)| v).collect();
    let mut params = read_params(&vars)?;
    let mut opt = AdamW::new(params.len(), t.betas, t.weight_decay);
    let mut sum = Timings::default();
    let mut optimizer = 0.0;
    let mut wall = 0.0;
    for i in 0..warmup + steps {
        let (epoch, users) = plan.batch_users(job.train.seed, i as u64 % plan.total_steps);
        let samples: Vec<TrainingSample> =
            users.iter().map(|&u| training_sample(&ds, u, epoch, job.train.seed, sess.model.cfg.max_history)).collect();
        let started = Instant::now();
        let (mut grads, _, timings) = sess.gradients(&ds, &samples, t.risa_weight)?;
        let o = Instant::now();
        clip_global_norm(&mut grads, t.grad_clip);
        opt.update(&mut params, &grads, t.lr);
        write_params(&vars, &params)?;
        if i >= warmup {
            optimizer += o.elapsed().as_secs_f64();
            wall += started.elapsed().as_secs_f64();
            sum.prompts += timings.prompts;
            sum.forward += timings.forward;
            sum.backward += timings.backward;
            sum.padded_tokens += timings.padded_tokens;
        }
    }
    let n = steps.max(1) as f64;
    let per_step = wall / n;
    Ok(StepBench {
        llm: sess.llm.name.clone(),
        variant: variant.name(),
        threads: candle_core::utils::get_num_threads(),
        batch_size: plan.batch,
        steps,
        trainable_parameters: sess.model.num_parameters(),
        seconds_per_step: per_step,
        seconds_per_sample: per_step / plan.batch as f64,
        samples_per_second: plan.batch as f64 / per_step,
        padded_tokens_per_step: sum.padded_tokens as f64 / n,
        tokens_per_second: sum.padded_tokens as f64 / wall.max(1e-9),
        prompts_seconds: sum.prompts / n,
        forward_seconds: sum.forward / n,
        backward_seconds: sum.backward / n,
        optimizer_seconds: optimizer / n,
        peak_rss_mib: peak_rss_mib(),
        tokens: variant_tokens(&sess, &ds)?,
    })
}

/// Tokens per item and per test prompt for every prompt variant, with the session's tokenizer.
fn variant_tokens(sess: &Session, ds: &Dataset) -> Result<Vec<VariantTokens>, TrainError> {
    let users: Vec<usize> = (0..ds.num_users().min(500)).collect();
    let max = sess.model.cfg.max_history;
    Variant::ALL
        .iter()
        .map(|&variant| {
            let builder = PromptBuilder { variant, max_description_words: sess.builder.max_description_words };
            let tokens_per_item = sess.tokens_per_item_with(&builder, ds)?;
            let mut total = 0usize;
            for &u in &users {
                let items: Vec<_> = eval_history(ds, u, Split::Test, max).iter().map(|&i| ds.item(i)).collect();
                total += sess.prompt_tokens(&builder.retrieval(&items))?;
            }
            Ok(VariantTokens {
                variant: variant.name(),
                tokens_per_item,
                mean_prompt_tokens: total as f64 / users.len().max(1) as f64,
            })
        })
        .collect()
}

impl std::fmt::Display for StepBench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} / {} / batch {} / {} threads / {} trainable values",
            self.llm, self.variant, self.batch_size, self.threads, self.trainable_parameters
        )?;
        writeln!(
            f,
            "  step {:.3}s = prompts {:.3}s + forward {:.3}s + backward {:.3}s + optimizer {:.3}s",
            self.seconds_per_step,
            self.prompts_seconds,
            self.forward_seconds,
            self.backward_seconds,
            self.optimizer_seconds
        )?;
        writeln!(
            f,
            "  {:.3}s per sample, {:.2} samples/s, {:.0} padded tokens/step, {:.0} tokens/s, peak RSS {:.0} MiB",
            self.seconds_per_sample,
            self.samples_per_second,
            self.padded_tokens_per_step,
            self.tokens_per_second,
            self.peak_rss_mib
        )?;
        for t in &self.tokens {
            writeln!(
                f,
                "  {:<18} {:>6.1} tokens/item {:>7.1} tokens/prompt",
                t.variant, t.tokens_per_item, t.mean_prompt_tokens
            )?;
        }
        Ok(())
    }
}
