//! Benchmarks that print figures (JSON), never asserted in tests: where a training step's time goes.

pub mod growth;
pub mod peak;
pub mod reference;

use std::time::Instant;

use serde::Serialize;

use crate::config::JobConfig;
use crate::data::prompt::{PromptBuilder, Variant};
use crate::data::Dataset;
use crate::distributed::{Collective, Guarded};
use crate::model::illmrec::session::Session;
use crate::store::Store;
use crate::train::illmrec::{session, Stepper, Timings};
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
    pub backend: &'static str,
    pub world_size: usize,
    /// Candle's threads per rank.
    pub threads: usize,
    /// What computes the frozen LLM's products on the CPU.
    pub matmul: String,
    pub batch_size: usize,
    pub steps: usize,
    pub trainable_parameters: usize,
    /// Mean over the timed steps.
    pub seconds_per_step: f64,
    pub seconds_per_sample: f64,
    pub samples_per_second: f64,
    pub tokens_per_step: f64,
    pub tokens_per_second: f64,
    pub prompts_seconds: f64,
    pub forward_seconds: f64,
    pub backward_seconds: f64,
    pub optimizer_seconds: f64,
    /// Inside collectives (all-reduce, plan and parameter checks), per step, this rank.
    pub collective_seconds: f64,
    pub collective_share: f64,
    pub peak_rss_mib: f64,
    pub tokens: Vec<VariantTokens>,
}

/// Times `steps` full training steps (after `warmup` untimed ones) of `variant` on the job's
/// snapshot, as one rank of `coll` (run it under mpirun for several ranks: each takes its share of
/// the global batch and the all-reduce is part of the step). With `export`, every step's inputs
/// are written there for the PyTorch reference (`reference.rs`; one rank only).
pub fn step(
    job: &JobConfig,
    store: &Store,
    variant: Variant,
    steps: usize,
    warmup: usize,
    coll: &mut Guarded,
    export: Option<&std::path::Path>,
) -> Result<StepBench, TrainError> {
    let ds = crate::data::snapshot::load(store, job.dataset())?;
    let tj = crate::pipeline::train_job(job);
    let sess = session::open(&tj, store, &ds, variant)?;
    let mut stepper = Stepper::new(&tj, &sess, &ds, coll.rank(), coll.world())?;
    coll.set_timeout(std::time::Duration::from_secs(job.dist.startup_timeout_secs));
    let export = match export {
        Some(_) if coll.world() > 1 => {
            return Err(TrainError::Invalid("--export writes the whole batch: run it as one rank".into()))
        }
        Some(dir) => Some(reference::Export::start(dir, &sess, &job.train.illmrec, &matmul_name(&sess.llm))?),
        None => None,
    };
    let mut sum = Timings::default();
    let (mut optimizer, mut collective, mut wall) = (0.0, 0.0, 0.0);
    for i in 0..warmup + steps {
        let at = i as u64 % stepper.plan.total_steps;
        let inputs = match &export {
            Some(_) => {
                let samples = stepper.samples(coll, at)?;
                let risa = job.train.illmrec.risa_weight > 0.0;
                Some((crate::train::illmrec::step::prompt_batches(&sess, &ds, &samples, risa)?, samples))
            }
            None => None,
        };
        let started = Instant::now();
        let out = stepper.step(coll, at, false)?;
        let elapsed = started.elapsed().as_secs_f64();
        if let (Some(export), Some((batches, samples))) = (&export, &inputs) {
            export.step(i, batches, samples, stepper.rates(at), &out.log)?;
        }
        if i >= warmup {
            wall += elapsed;
            optimizer += out.optimizer_seconds;
            collective += out.collective_seconds;
            sum.prompts += out.timings.prompts;
            sum.forward += out.timings.forward;
            sum.backward += out.timings.backward;
            sum.tokens += out.timings.tokens;
        }
    }
    let n = steps.max(1) as f64;
    let per_step = wall / n;
    let batch = stepper.plan.global_batch;
    Ok(StepBench {
        llm: sess.llm.name.clone(),
        variant: variant.name(),
        backend: coll.name(),
        world_size: coll.world(),
        threads: candle_core::utils::get_num_threads(),
        matmul: matmul_name(&sess.llm),
        batch_size: batch,
        steps,
        trainable_parameters: sess.model.num_parameters(),
        seconds_per_step: per_step,
        seconds_per_sample: per_step / batch as f64,
        samples_per_second: batch as f64 / per_step,
        tokens_per_step: sum.tokens as f64 / n,
        tokens_per_second: sum.tokens as f64 / wall.max(1e-9),
        prompts_seconds: sum.prompts / n,
        forward_seconds: sum.forward / n,
        backward_seconds: sum.backward / n,
        optimizer_seconds: optimizer / n,
        collective_seconds: collective / n,
        collective_share: collective / wall.max(1e-9),
        peak_rss_mib: peak_rss_mib(),
        tokens: variant_tokens(&sess, &ds)?,
    })
}

/// Tokens per item and per test prompt for every prompt variant, with the session's tokenizer.
fn variant_tokens(sess: &Session, ds: &Dataset) -> Result<Vec<VariantTokens>, TrainError> {
    Variant::ALL
        .iter()
        .map(|&variant| {
            let builder = PromptBuilder { variant, max_description_words: sess.builder.max_description_words };
            Ok(VariantTokens {
                variant: variant.name(),
                tokens_per_item: sess.tokens_per_item(&builder, ds)?,
                mean_prompt_tokens: sess.mean_prompt_tokens(&builder, ds, 500)?,
            })
        })
        .collect()
}

impl std::fmt::Display for StepBench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} / {} / global batch {} / {} x {} with {} threads each ({}) / {} trainable values",
            self.llm,
            self.variant,
            self.batch_size,
            self.world_size,
            self.backend,
            self.threads,
            self.matmul,
            self.trainable_parameters
        )?;
        writeln!(
            f,
            "  step {:.3}s = prompts {:.3}s + forward {:.3}s + backward {:.3}s + collectives {:.3}s ({:.1}%) + optimizer {:.3}s",
            self.seconds_per_step,
            self.prompts_seconds,
            self.forward_seconds,
            self.backward_seconds,
            self.collective_seconds,
            100.0 * self.collective_share,
            self.optimizer_seconds
        )?;
        writeln!(
            f,
            "  {:.3}s per sample, {:.2} samples/s, {:.0} tokens/step (cached prefixes not counted), {:.0} tokens/s, peak RSS {:.0} MiB",
            self.seconds_per_sample,
            self.samples_per_second,
            self.tokens_per_step,
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

/// The all-reduce of a buffer the size of a trainable set, and what it predicts for larger worlds.
#[derive(Debug, Serialize)]
pub struct ScalingBench {
    pub step: StepBench,
    pub floats: usize,
    /// Mean seconds of one all-reduce of `floats` values, and of one value (latency).
    pub allreduce_seconds: f64,
    pub latency_seconds: f64,
    /// Payload bytes / time, and the ring's "bus bandwidth" (2(N-1)/N of the payload crosses each link).
    pub algorithm_mb_per_s: f64,
    pub bus_mb_per_s: f64,
    pub projection: Vec<Projection>,
}

/// Weak scaling under the ring all-reduce cost model T(N) = 2(N-1)·α + 2(N-1)/N · S/β, with α and
/// β fitted to this machine's measurement and each rank's compute time per step as measured, no
/// overlap of communication with compute.
#[derive(Debug, Serialize)]
pub struct Projection {
    pub ranks: usize,
    pub allreduce_seconds: f64,
    pub step_seconds: f64,
    pub samples_per_second: f64,
    pub efficiency: f64,
}

/// Times all-reduces of `floats` values (`iters` times) and of one value, then projects the step
/// measured by `step` to 8, 32 and 128 ranks. Needs 2+ ranks.
pub fn scaling(step: StepBench, coll: &Guarded, floats: usize, iters: usize) -> Result<ScalingBench, TrainError> {
    let w = coll.world();
    if w < 2 {
        return Err(TrainError::Invalid(
            "bench scaling measures an all-reduce: start it with mpirun -np 2 (or more)".into(),
        ));
    }
    let time = |n: usize| -> Result<f64, TrainError> {
        let mut buf = vec![1f32; n];
        coll.all_reduce_sum(&mut buf)?; // warm-up: connections, buffers
        coll.barrier()?;
        let started = Instant::now();
        for _ in 0..iters.max(1) {
            coll.all_reduce_sum(&mut buf)?;
        }
        Ok(started.elapsed().as_secs_f64() / iters.max(1) as f64)
    };
    let latency = time(1)?;
    let big = time(floats)?;
    let bytes = 4.0 * floats as f64;
    let ring = |n: usize| 2.0 * (n - 1) as f64 / n as f64;
    let alpha = latency / (2.0 * (w - 1) as f64);
    let beta = ring(w) * bytes / (big - 2.0 * (w - 1) as f64 * alpha).max(1e-9);
    let compute = (step.seconds_per_step - step.collective_seconds).max(1e-9);
    let per_rank = step.batch_size / w;
    let projection = [1, 2, 8, 32, 128]
        .into_iter()
        .map(|n| {
            let ar = if n == 1 { 0.0 } else { 2.0 * (n - 1) as f64 * alpha + ring(n) * bytes / beta };
            let step_seconds = compute + ar;
            Projection {
                ranks: n,
                allreduce_seconds: ar,
                step_seconds,
                samples_per_second: (n * per_rank) as f64 / step_seconds,
                efficiency: compute / step_seconds,
            }
        })
        .collect();
    Ok(ScalingBench {
        step,
        floats,
        allreduce_seconds: big,
        latency_seconds: latency,
        algorithm_mb_per_s: bytes / big / 1e6,
        bus_mb_per_s: ring(w) * bytes / big / 1e6,
        projection,
    })
}

impl std::fmt::Display for ScalingBench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.step)?;
        writeln!(
            f,
            "  all-reduce of {} floats ({:.1} MB) over {} ranks: {:.4}s ({:.0} MB/s payload, {:.0} MB/s bus), 1 float: {:.6}s",
            self.floats,
            4.0 * self.floats as f64 / 1e6,
            self.step.world_size,
            self.allreduce_seconds,
            self.algorithm_mb_per_s,
            self.bus_mb_per_s,
            self.latency_seconds
        )?;
        writeln!(
            f,
            "  {:>6} {:>14} {:>10} {:>11} {:>10}",
            "ranks", "all-reduce s", "step s", "samples/s", "efficiency"
        )?;
        for p in &self.projection {
            writeln!(
                f,
                "  {:>6} {:>14.4} {:>10.3} {:>11.1} {:>9.1}%",
                p.ranks,
                p.allreduce_seconds,
                p.step_seconds,
                p.samples_per_second,
                100.0 * p.efficiency
            )?;
        }
        Ok(())
    }
}

/// What computes the frozen products of `llm` as loaded (a bf16 request may have fallen back), for
/// the reports.
fn matmul_name(llm: &crate::model::llm::Llm) -> String {
    if !llm.model.device().is_cpu() {
        return format!("{:?} on {:?}", llm.model.dtype(), llm.model.device().location());
    }
    match llm.matmul() {
        crate::model::LlmMatmul::Bf16 => format!("bf16 ({}, f32 sums)", crate::model::llm::cpu_bf16_kernel()),
        crate::model::LlmMatmul::F32 => crate::model::llm::cpu_matmul_backend(),
    }
}

/// CPU seconds this process has used (user + system), from /proc (Linux; 0 elsewhere).
pub fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return 0.0 };
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat (utime, stime) are the 12th and 13th after the command name, in
    // clock ticks of 1/100 s on Linux.
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(11) + tick(12)) / 100.0
}

/// Forward and backward of the frozen LLM alone on random input embeddings, the shapes a step feeds
/// it: loss = sum(hidden · fixed random), gradient for the inputs only. The same measurement as
/// scripts/reference/torch_step.py makes in PyTorch, for a side-by-side comparison.
#[derive(Debug, Serialize)]
pub struct LlmBench {
    pub llm: String,
    pub threads: usize,
    pub matmul: String,
    pub batch: usize,
    pub tokens: usize,
    pub forward_seconds: f64,
    pub backward_seconds: f64,
    pub forward_cpu_seconds: f64,
    pub backward_cpu_seconds: f64,
    pub ms_per_token: f64,
    pub step_peak_rss_mib: f64,
}

/// `matmul` overrides the job's `model.llm_matmul`. Each shape runs one untimed step, then `reps`
/// timed ones; the figures are the medians (forward and backward each), as torch_step.py reports.
pub fn llm(
    job: &JobConfig,
    shapes: &[(usize, usize)],
    matmul: Option<crate::model::LlmMatmul>,
    reps: usize,
) -> Result<Vec<LlmBench>, TrainError> {
    use candle_core::Var;
    let matmul = matmul.unwrap_or(job.model.llm_matmul);
    let device = job.model.device.open(crate::distributed::Launcher::detect().local_rank)?;
    let llm = crate::model::llm::Llm::load_for(&job.model.llm, matmul, &device)?;
    let h = llm.hidden_size();
    let mut out = Vec::new();
    for &(b, t) in shapes {
        let mut rng = crate::seed::stream(1, "bench/llm", (b * 100_000 + t) as u64);
        let x = Var::from_tensor(&crate::model::layers::normal_tensor((b, t, h), 0.02, &mut rng, &device)?)?;
        let probe = crate::model::layers::normal_tensor((b, t, h), 1.0, &mut rng, &device)?;
        let once = || -> Result<(f64, f64, f64, f64), TrainError> {
            let (w0, c0) = (Instant::now(), cpu_seconds());
            let hidden = llm.model.forward_embeds(x.as_tensor())?;
            let loss = (hidden * &probe)?.sum_all()?;
            loss.to_scalar::<f32>()?;
            let (w1, c1) = (Instant::now(), cpu_seconds());
            let grads = loss.backward()?;
            grads.get(x.as_tensor()).map(|g| g.sum_all().and_then(|s| s.to_scalar::<f32>())).transpose()?;
            Ok(((w1 - w0).as_secs_f64(), w1.elapsed().as_secs_f64(), c1 - c0, cpu_seconds() - c1))
        };
        once()?; // warm-up
                 // Peak memory of the timed step alone: reset the high-water mark (Linux).
        let _ = std::fs::write("/proc/self/clear_refs", "5");
        let runs = (0..reps.max(1)).map(|_| once()).collect::<Result<Vec<_>, _>>()?;
        let median = |pick: fn(&(f64, f64, f64, f64)) -> f64| {
            let mut v: Vec<f64> = runs.iter().map(pick).collect();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (f, bw, fc, bc) = (median(|r| r.0), median(|r| r.1), median(|r| r.2), median(|r| r.3));
        out.push(LlmBench {
            llm: llm.name.clone(),
            threads: candle_core::utils::get_num_threads(),
            matmul: matmul_name(&llm),
            batch: b,
            tokens: t,
            forward_seconds: f,
            backward_seconds: bw,
            forward_cpu_seconds: fc,
            backward_cpu_seconds: bc,
            ms_per_token: 1e3 * (f + bw) / (b * t) as f64,
            step_peak_rss_mib: peak_rss_mib(),
        });
    }
    Ok(out)
}
