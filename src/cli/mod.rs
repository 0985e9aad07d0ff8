//! The `illmrec` command line: one subcommand per stage, all reading one job file.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use crate::config::JobConfig;
use crate::data::{self, Split};
use crate::distributed::{Collective, Launcher};
use crate::eval::{self, Protocol};
use crate::launch;
use crate::pipeline;
use crate::store::Store;
use crate::train::illmrec::TrainOptions;
use crate::train::{self, ModelKind};

/// The job `illmrec run` runs when no --job is given: synthetic catalog -> prepare -> Pop and
/// SASRec -> evaluation table.
pub const DEFAULT_JOB: &str = include_str!("../../jobs/demo.yaml");

#[derive(Parser)]
#[command(name = "illmrec", version, about = "Image-token LLM recommenders: data, training, evaluation")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write the synthetic catalog the job's `data.synth` section describes (Amazon layout).
    Synth {
        #[arg(long)]
        job: PathBuf,
    },
    /// Ingest, filter and split the job's data into a snapshot under the storage root.
    Prepare {
        #[arg(long)]
        job: PathBuf,
        /// Print the manifest as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Compute the item features the job's `features` section names, only for items not cached yet.
    Features {
        #[arg(long)]
        job: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Train a model on the job's latest snapshot.
    Train {
        #[arg(long)]
        job: PathBuf,
        /// pop, random, sasrec, morec:text, morec:image, morec:text+image, freedom, bm3, mmgcn,
        /// iisan:text, iisan:image, iisan:text+image, illmrec, illmrec:title, illmrec:description,
        /// illmrec:image+description. The LLM recommenders, SASRec, MoRec and IISAN train
        /// data-parallel under mpirun/srun; Pop, Random and the graph models (FREEDOM, BM3,
        /// MMGCN) train in one process, on one rank.
        #[arg(long)]
        model: ModelKind,
        /// Continue the run from its LATEST checkpoint.
        #[arg(long, conflicts_with = "from")]
        resume: bool,
        /// Continue from LATEST when the run has a checkpoint, start fresh otherwise (with --from:
        /// warm-start): what a scheduler that requeues the same command needs.
        #[arg(long, conflicts_with = "resume")]
        auto_resume: bool,
        /// Warm-start from another run's LATEST checkpoint (trainable weights and optimizer state),
        /// e.g. `--from shop-5k-illmrec` after the catalog grew.
        #[arg(long, value_name = "RUN")]
        from: Option<String>,
        /// Checkpoint and stop after this global step (the schedule still spans the whole run).
        #[arg(long)]
        stop_after: Option<u64>,
        /// Rank 0 writes this file once training has ended normally (not on a preemption stop): a
        /// batch script tells a finished job from ranks that never started.
        #[arg(long, value_name = "PATH")]
        done_file: Option<PathBuf>,
    },
    /// Evaluate a trained model.
    Eval {
        #[arg(long)]
        job: PathBuf,
        #[arg(long)]
        model: ModelKind,
        /// full, sampled:100, sampled:29, ... (repeatable; default: the job's `eval.protocols`, none
        /// when --candidates is given).
        #[arg(long)]
        protocol: Vec<Protocol>,
        /// Also rank each user's test target among a fixed list: a JSON-lines file of
        /// {"user", "candidates", "target"} (source ids), e.g. a benchmark's 1+29 lists.
        #[arg(long, value_name = "FILE")]
        candidates: Option<PathBuf>,
        #[arg(long, default_value = "test")]
        split: Split,
        /// Which checkpoint: best (the best validation, else the latest), latest, or a step number.
        #[arg(long, default_value = "best")]
        checkpoint: train::runs::Which,
        /// One JSON object per protocol: {"model", "protocol", "users", "metrics"}.
        #[arg(long)]
        json: bool,
    },
    /// Print a user's top-k items (their whole sequence is the history; their items are left out).
    Recommend {
        #[arg(long)]
        job: PathBuf,
        #[arg(long)]
        model: ModelKind,
        /// The user's id in the source data.
        #[arg(long)]
        user: String,
        #[arg(long, default_value_t = 10)]
        k: usize,
        /// Which checkpoint: best (the best validation, else the latest), latest, or a step number.
        #[arg(long, default_value = "best")]
        checkpoint: train::runs::Which,
        #[arg(long)]
        json: bool,
    },
    /// Run an MSRBench LVLM strategy (s1..s5) on the job's test users: metrics, every answer and its
    /// cost under runs/<job>-<strategy>-<backbone>/report/.
    Lvlm {
        #[command(flatten)]
        run: LvlmArgs,
        /// Ask every request again instead of reading cached answers (to measure the cost).
        #[arg(long)]
        fresh: bool,
        /// Print the result as JSON (eval's shape, with a `cost` object).
        #[arg(long)]
        json: bool,
    },
    /// Measure: `bench step` times training steps of an LLM recommender and prints where time goes.
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
    /// Render the job's batch script (Slurm) or manifests (Kubernetes) from its `dist` section and
    /// submit them (print them with --dry-run).
    Submit {
        #[command(subcommand)]
        to: SubmitTarget,
    },
    /// The state of submitted jobs (all recorded in .illmrec/submitted.jsonl, or one).
    Status { id: Option<String> },
    /// Cancel a submitted job (a Slurm job id, or a Kubernetes `kind/name`).
    Cancel { id: String },
    /// Run the whole job: synth (if configured), prepare, train every model in `train.models`,
    /// evaluate them all. Without --job, runs the embedded default job.
    Run {
        #[arg(long)]
        job: Option<PathBuf>,
        /// Override `storage.root`.
        #[arg(long)]
        root: Option<String>,
    },
}

#[derive(Subcommand)]
enum SubmitTarget {
    /// An sbatch script (slurm/sbatch.sh.tmpl) submitted with sbatch.
    Slurm(SubmitArgs),
    /// A ConfigMap and an MPIJob or Indexed Job (k8s/*.yaml.tmpl) applied with kubectl.
    K8s(SubmitArgs),
}

#[derive(clap::Args)]
struct SubmitArgs {
    #[arg(long)]
    job: PathBuf,
    /// The LLM recommender to train (default: the job's first one in train.models).
    #[arg(long)]
    model: Option<ModelKind>,
    /// Print what would be submitted.
    #[arg(long)]
    dry_run: bool,
}

/// An MSRBench LVLM strategy on a job's test users, as `lvlm` and `bench lvlm` name it.
#[derive(clap::Args)]
struct LvlmArgs {
    #[arg(long)]
    job: PathBuf,
    #[arg(long)]
    strategy: crate::lvlm::Strategy,
    /// A backbone of the job's `lvlm.backbones` (default: `lvlm.backbone`).
    #[arg(long)]
    backbone: Option<String>,
}

impl LvlmArgs {
    /// Runs the strategy on the job's latest snapshot (`fresh`: ask every request again).
    fn run(&self, job: &JobConfig, fresh: bool) -> Result<(Store, pipeline::lvlm::LvlmOutcome)> {
        let store = open_store(job)?;
        let ds = data::snapshot::load(&store, job.dataset())?;
        let out = pipeline::lvlm::lvlm(job, &store, &ds, self.strategy, self.backbone.as_deref(), fresh)?;
        Ok((store, out))
    }
}

#[derive(Subcommand)]
enum BenchCommand {
    /// An LVLM strategy with every request asked again (no cached answers): seconds and CPU seconds
    /// per user, prompt tokens, where an in-process backbone's time went, parse failures.
    Lvlm {
        #[command(flatten)]
        run: LvlmArgs,
        /// f32 or bf16 products of an in-process backbone (default: the job's lvlm.local.matmul).
        #[arg(long)]
        matmul: Option<crate::model::LlmMatmul>,
    },
    /// Forward + backward + optimizer time per step and per sample, phases, tokens, peak memory.
    Step {
        #[arg(long)]
        job: PathBuf,
        #[arg(long, default_value = "illmrec")]
        model: ModelKind,
        #[arg(long, default_value_t = 5)]
        steps: usize,
        #[arg(long, default_value_t = 1)]
        warmup: usize,
        /// Print JSON only.
        #[arg(long)]
        json: bool,
        /// f32 or bf16 frozen products (default: the job's model.llm_matmul).
        #[arg(long)]
        matmul: Option<crate::model::LlmMatmul>,
        /// cpu, cuda or cuda:N (default: the job's model.device).
        #[arg(long)]
        device: Option<crate::model::device::ComputeDevice>,
        /// Also write every step's inputs and logged losses into this folder, for
        /// scripts/reference/torch_illmrec_step.py (one rank).
        #[arg(long)]
        export: Option<PathBuf>,
    },
    /// Forward + backward of the job's frozen LLM alone on random inputs of the given shapes (the
    /// measurement scripts/reference/torch_step.py makes in PyTorch).
    Llm {
        #[arg(long)]
        job: PathBuf,
        /// Comma-separated BATCHxTOKENS shapes.
        #[arg(long, default_value = "2x537,1x512,4x128")]
        shapes: String,
        /// f32 or bf16 frozen products (default: the job's model.llm_matmul).
        #[arg(long)]
        matmul: Option<crate::model::LlmMatmul>,
        /// cpu, cuda or cuda:N (default: the job's model.device).
        #[arg(long)]
        device: Option<crate::model::device::ComputeDevice>,
        /// Timed steps per shape after the untimed one; the medians are reported.
        #[arg(long, default_value_t = 1)]
        reps: usize,
    },
    /// The core's arithmetic ceiling: f32 FMA and bf16 dot-product flops per second of independent
    /// register-only multiply-adds on RAYON_NUM_THREADS threads (the bound no product kernel beats).
    Peak,
    /// Under mpirun -np 2+: the step at this world size, the all-reduce of a trainable set of
    /// `--floats` values, and the projected weak scaling to 8, 32 and 128 ranks.
    Scaling {
        #[arg(long)]
        job: PathBuf,
        #[arg(long, default_value = "illmrec")]
        model: ModelKind,
        #[arg(long, default_value_t = 3)]
        steps: usize,
        /// The trainable set of I-LLMRec on a 2.7B backbone is about 15M values.
        #[arg(long, default_value_t = 15_000_000)]
        floats: usize,
        #[arg(long, default_value_t = 5)]
        iters: usize,
        #[arg(long)]
        json: bool,
    },
    /// The catalog grows 5K -> 10K -> 15K -> 20K items (users 2.7K -> 59.3K, the paper's schedule,
    /// times --scale): features computed vs reused, retraining from scratch vs warm-started, and the
    /// previous model unretrained on the grown catalog.
    CatalogGrowth {
        #[arg(long)]
        job: PathBuf,
        #[arg(long, default_value = "illmrec")]
        model: ModelKind,
        /// Multiplies the paper's item and user counts.
        #[arg(long, default_value_t = 1.0)]
        scale: f64,
        /// Warm-start steps as a fraction of the scratch run's.
        #[arg(long, default_value_t = 0.25)]
        warm_fraction: f64,
        #[arg(long, default_value = "sampled:100")]
        protocol: Protocol,
        /// Warm-start each step from the previous step's scratch model (default: from the previous
        /// warm-started model, as a deployment that never retrains from scratch would).
        #[arg(long)]
        warm_from_scratch: bool,
        #[arg(long)]
        json: bool,
    },
}

/// Runs the command line; the process's exit status (0, or `distributed::preempt::EXIT_CODE` for a run
/// that stopped on a preemption signal with a checkpoint).
pub fn main() -> Result<i32> {
    let cli = Cli::parse();
    let done: Result<()> = match cli.command {
        Command::Synth { job } => with_job(&job, "synth", |job| pipeline::synth(&job)),
        Command::Prepare { job, json } => with_job(&job, "prepare", |job| {
            let report = data::prepare::prepare(job.dataset(), &job.data, &open_store(&job)?, &job.telemetry)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report.manifest)?);
            } else {
                println!("{report}");
            }
            Ok(())
        }),
        Command::Features { job, json } => with_job(&job, "features", |job| {
            let store = open_store(&job)?;
            let ds = data::snapshot::load(&store, job.dataset())?;
            let report = pipeline::features(&job, &store, &ds)?;
            let captions = pipeline::lvlm::captions(&job, &store, &ds)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
                if let Some(c) = captions {
                    println!("{}", serde_json::to_string_pretty(&c)?);
                }
            } else {
                print!("features for {} items:\n{report}", ds.num_items());
                if let Some(c) = captions {
                    println!(
                        "  captions ({}): {} computed, {} reused, {} without image",
                        c.source, c.computed, c.reused, c.without_image
                    );
                }
            }
            Ok(())
        }),
        Command::Train { job, model, resume, auto_resume, stop_after, from, done_file } => {
            configure_threads();
            crate::distributed::preempt::install().context("installing the SIGUSR1 (preemption) handler")?;
            let job = load(&job)?;
            let span = JobSpan::new(&job.name, "train");
            // The collective starts before the span does: the span's parent comes through it.
            let mut coll = match crate::distributed::init(&job.dist) {
                Ok(coll) => coll,
                Err(e) => return span.run(|| Err(e.into())),
            };
            span.join(&coll)?;
            let preempted = span.run(|| {
                let store = open_store(&job)?;
                let tj = pipeline::train_job(&job);
                let resume = resume || (auto_resume && train::runs::has_checkpoint(&store, &tj.run_id(model))?);
                // A run resumed after its warm start carries it in its own checkpoint.
                let from = if resume { None } else { from };
                let report = train::train(&tj, &store, model, TrainOptions { resume, stop_after, from }, &mut coll)?;
                if coll.rank() == 0 {
                    println!("{} -> runs/{}", report.summary, report.run_id);
                    if let (Some(path), false) = (&done_file, report.preempted) {
                        std::fs::write(path, format!("{}\n", report.run_id))
                            .with_context(|| format!("writing the done file {}", path.display()))?;
                    }
                }
                Ok(report.preempted)
            })?;
            return Ok(if preempted { crate::distributed::preempt::EXIT_CODE } else { 0 });
        }
        Command::Eval { job, model, protocol, candidates, split, checkpoint, json } => with_job(&job, "eval", |job| {
            if candidates.is_some() && split != Split::Test {
                anyhow::bail!("--candidates ranks test targets: drop --split {split:?}");
            }
            let protocols = match (protocol.is_empty(), &candidates) {
                (false, _) => protocol,
                (true, Some(_)) => Vec::new(),
                (true, None) => job.eval.protocols.clone(),
            };
            let store = open_store(&job)?;
            let ds = data::snapshot::load(&store, job.dataset())?;
            let req =
                pipeline::EvalRequest { split, protocols: &protocols, candidates: candidates.as_deref(), checkpoint };
            let results = pipeline::evaluate(&job, &store, &ds, model, &req)?;
            if json {
                for r in &results {
                    println!("{}", r.to_json());
                }
            } else {
                print!("{}", eval::markdown_table(&results));
            }
            Ok(())
        }),
        Command::Recommend { job, model, user, k, checkpoint, json } => with_job(&job, "recommend", |job| {
            let store = open_store(&job)?;
            let ds = data::snapshot::load(&store, job.dataset())?;
            let u = ds
                .user_ids
                .iter()
                .position(|id| *id == user)
                .with_context(|| format!("user `{user}` is not in dataset {} (snapshot {})", ds.name, ds.key))?;
            let scorer = train::load_scorer(&pipeline::train_job(&job), &store, model, &ds, checkpoint)?;
            let recs = eval::recommend::top_k(scorer.as_ref(), &ds, u, &ds.sequences[u], k)?;
            if json {
                println!("{}", serde_json::to_string(&recs)?);
            } else {
                println!("top {k} for user {user} ({} items in their history) by {model}:", ds.sequences[u].len());
                for r in recs {
                    println!("{:>3}. {:<12} {:>9.4}  {}", r.rank, r.item, r.score, r.title);
                }
            }
            Ok(())
        }),
        Command::Lvlm { run, fresh, json } => with_job(&run.job, "lvlm", |job| {
            let (store, out) = run.run(&job, fresh)?;
            if json {
                let mut v = out.result.to_json();
                v["cost"] = serde_json::to_value(&out.cost)?;
                println!("{v}");
            } else {
                match &out.cost {
                    Some(c) => {
                        print!("{}", crate::lvlm::cost_table(&[(out.result.model.clone(), &out.result.metrics, c)]))
                    }
                    None => print!("{}", eval::markdown_table(std::slice::from_ref(&out.result))),
                }
                println!("report: {}/runs/{}/report/", store.url(), out.run_id);
            }
            Ok(())
        }),
        Command::Bench { what } => bench(what),
        Command::Submit { to } => submit(to),
        Command::Status { id } => status(id),
        Command::Cancel { id } => {
            let sub = launch::Submission::find(&std::env::current_dir()?, &id)?;
            match sub.scheduler {
                launch::Scheduler::Slurm => launch::slurm::cancel(&sub.id)?,
                launch::Scheduler::K8s => launch::k8s::delete(&sub.id, sub.namespace.as_deref().unwrap_or("default"))?,
            }
            println!("cancelled {id}");
            Ok(())
        }
        Command::Run { job, root } => {
            configure_threads();
            let mut job = match job {
                Some(path) => load(&path)?,
                None => {
                    let job = JobConfig::from_str_with_base(
                        DEFAULT_JOB,
                        Path::new("<embedded jobs/demo.yaml>"),
                        Path::new("."),
                    )?;
                    start_logging(&job);
                    job
                }
            };
            if let Some(root) = root {
                job.storage.root = root;
            }
            JobSpan::new(&job.name, "run").run(|| pipeline::run(&job, &open_store(&job)?))
        }
    };
    done.map(|()| 0)
}

/// Sizes the thread pools, loads the job file (which starts logging and trace export) and runs `f`
/// on it inside the job's root span.
fn with_job<T>(path: &Path, command: &'static str, f: impl FnOnce(JobConfig) -> Result<T>) -> Result<T> {
    configure_threads();
    let job = load(path)?;
    JobSpan::new(&job.name, command).run(|| f(job))
}

/// The root span of a command: job, command, rank and world size. A `TRACEPARENT` in the
/// environment (W3C trace context) becomes its parent; under a launcher, `join` makes every rank's
/// root span a child of rank 0's, so a job of N ranks is one trace.
struct JobSpan(tracing::Span);

impl JobSpan {
    fn new(job: &str, command: &'static str) -> Self {
        let launcher = Launcher::detect();
        let span = tracing::info_span!(
            "job",
            job,
            command,
            rank = launcher.rank as i64,
            world_size = launcher.world as i64,
            launcher = launcher.name,
            error = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        if let Some(parent) = crate::telemetry::otel::parent_from_env() {
            crate::telemetry::otel::set_parent(&span, parent);
        }
        Self(span)
    }

    /// Rank 0 hands its span's context to the other ranks, which become its children. Call before
    /// `run` on ranks other than 0 (a started span cannot change its parent).
    fn join(&self, coll: &dyn Collective) -> Result<()> {
        if coll.world() < 2 {
            return Ok(());
        }
        let mut bytes = if coll.rank() == 0 { crate::telemetry::otel::context_bytes(&self.0) } else { Vec::new() };
        coll.broadcast(0, &mut bytes).context("sharing the trace context")?;
        if coll.rank() != 0 {
            if let Some(parent) = crate::telemetry::otel::context_from_bytes(&bytes) {
                crate::telemetry::otel::set_parent(&self.0, parent);
            }
        }
        Ok(())
    }

    /// Runs `f` inside the span; an error marks the span failed.
    fn run<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let result = self.0.in_scope(f);
        if let Err(e) = &result {
            self.0.record("error", format!("{e:#}"));
            self.0.record("otel.status_code", "ERROR");
        }
        result
    }
}

fn bench(what: BenchCommand) -> Result<()> {
    configure_threads();
    match what {
        BenchCommand::Lvlm { run, matmul } => {
            let mut job = load(&run.job)?;
            if let Some(m) = matmul {
                job.lvlm.local.matmul = m;
            }
            let (_, out) = run.run(&job, true)?;
            let cost = out.cost.context("the benchmark measures the prompted strategies (s1, s3, s4, s5)")?;
            print!("{}", crate::lvlm::cost_table(&[(out.result.model.clone(), &out.result.metrics, &cost)]));
            println!("{}", serde_json::json!({"result": out.result.to_json(), "cost": cost}));
            Ok(())
        }
        BenchCommand::Llm { job, shapes, matmul, device, reps } => {
            let shapes = shapes
                .split(',')
                .map(|s| {
                    let (b, t) =
                        s.trim().split_once('x').with_context(|| format!("shape `{s}` is not BATCHxTOKENS"))?;
                    Ok((b.parse()?, t.parse()?))
                })
                .collect::<Result<Vec<(usize, usize)>>>()?;
            let mut job = load(&job)?;
            if let Some(d) = device {
                job.model.device = d;
            }
            for r in crate::bench::llm(&job, &shapes, matmul, reps)? {
                println!("{}", serde_json::to_string(&r)?);
            }
            Ok(())
        }
        BenchCommand::Peak => {
            for r in crate::bench::peak::core_peaks(candle_core::utils::get_num_threads()) {
                println!("{}", serde_json::to_string(&r)?);
            }
            Ok(())
        }
        BenchCommand::Step { job, model, steps, warmup, json, matmul, device, export } => {
            let (step, coll) = bench_step(&job, model, steps, warmup, (matmul, device), export.as_deref())?;
            if coll.rank() == 0 {
                print_bench(&step, &serde_json::to_value(&step)?, json);
            }
            Ok(())
        }
        BenchCommand::Scaling { job, model, steps, floats, iters, json } => {
            let (step, coll) = bench_step(&job, model, steps, 1, (None, None), None)?;
            let r = crate::bench::scaling(step, &coll, floats, iters)?;
            if coll.rank() == 0 {
                print_bench(&r, &serde_json::to_value(&r)?, json);
            }
            Ok(())
        }
        BenchCommand::CatalogGrowth { job, model, scale, warm_fraction, protocol, warm_from_scratch, json } => {
            let job = load(&job)?;
            let variant = illmrec_variant(model)?;
            if !(scale > 0.0 && warm_fraction > 0.0) {
                anyhow::bail!("--scale and --warm-fraction must be positive");
            }
            let steps = crate::bench::growth::PAPER_STEPS
                .iter()
                .map(|&(i, u)| (((i as f64) * scale).round() as usize, ((u as f64) * scale).round() as usize))
                .collect();
            let plan = crate::bench::growth::GrowthPlan { steps, warm_fraction, protocol, warm_from_scratch };
            let mut coll = crate::distributed::init(&job.dist)?;
            let rows = crate::bench::growth::run(&job, &open_store(&job)?, variant, &plan, &mut coll)?;
            if !json {
                print!("{}", crate::bench::growth::table(&rows, protocol));
            }
            for r in &rows {
                println!("{}", serde_json::to_string(r)?);
            }
            Ok(())
        }
    }
}

fn submit(to: SubmitTarget) -> Result<()> {
    let cwd = std::env::current_dir()?;
    let (scheduler, SubmitArgs { job: job_path, model, dry_run }) = match to {
        SubmitTarget::Slurm(a) => (launch::Scheduler::Slurm, a),
        SubmitTarget::K8s(a) => (launch::Scheduler::K8s, a),
    };
    let (job, merged) = JobConfig::load_merged_yaml(&job_path)?;
    let model = launch::model_to_train(&job, model)?;
    let job_file = std::fs::canonicalize(&job_path).with_context(|| format!("{}", job_path.display()))?;
    let (text, namespace) = match scheduler {
        launch::Scheduler::Slurm => (launch::slurm::render(&job, &job_file, &cwd, model)?, None),
        launch::Scheduler::K8s => (launch::k8s::render(&job, &merged, model)?, Some(job.dist.k8s.namespace.clone())),
    };
    if dry_run {
        print!("{text}");
        return Ok(());
    }
    let id = match scheduler {
        launch::Scheduler::Slurm => launch::slurm::submit(&text)?,
        launch::Scheduler::K8s => {
            print!("{}", launch::k8s::apply(&text)?);
            launch::k8s::workload_id(&job)
        }
    };
    let sub = launch::Submission {
        scheduler,
        id: id.clone(),
        name: job.name.clone(),
        model: model.to_string(),
        job_file,
        namespace,
        submitted_at: launch::submitted_now(),
    };
    sub.record(&cwd)?;
    println!(
        "submitted {id} ({} {}, {model})",
        job.name,
        if scheduler == launch::Scheduler::Slurm { "to Slurm" } else { "to Kubernetes" }
    );
    Ok(())
}

fn status(id: Option<String>) -> Result<()> {
    let cwd = std::env::current_dir()?;
    let subs = match id {
        Some(id) => vec![launch::Submission::find(&cwd, &id)?],
        None => launch::Submission::all(&cwd)?,
    };
    if subs.is_empty() {
        println!("nothing submitted from {}", cwd.display());
    }
    for s in subs {
        let state = match s.scheduler {
            launch::Scheduler::Slurm => launch::slurm::state(&s.id),
            launch::Scheduler::K8s => launch::k8s::state(&s.id, s.namespace.as_deref().unwrap_or("default")),
        }
        .unwrap_or_else(|e| format!("unknown: {e}"));
        println!("{:<24} {:<16} {:<22} {state}", s.id, s.name, s.model);
    }
    Ok(())
}

fn illmrec_variant(model: ModelKind) -> Result<crate::data::prompt::Variant> {
    match model {
        ModelKind::Illmrec(v) => Ok(v),
        other => {
            anyhow::bail!("the benchmarks measure the LLM recommenders (illmrec, illmrec:title, ...), not {other}")
        }
    }
}

fn bench_step(
    job: &Path,
    model: ModelKind,
    steps: usize,
    warmup: usize,
    (matmul, device): (Option<crate::model::LlmMatmul>, Option<crate::model::device::ComputeDevice>),
    export: Option<&Path>,
) -> Result<(crate::bench::StepBench, crate::distributed::Guarded)> {
    let mut job = load(job)?;
    if let Some(m) = matmul {
        job.model.llm_matmul = m;
    }
    if let Some(d) = device {
        job.model.device = d;
    }
    let variant = illmrec_variant(model)?;
    let mut coll = crate::distributed::init(&job.dist)?;
    let step = crate::bench::step(&job, &open_store(&job)?, variant, steps, warmup, &mut coll, export)?;
    Ok((step, coll))
}

/// The human-readable figures (unless `json_only`), then one JSON line.
fn print_bench(text: &impl std::fmt::Display, value: &serde_json::Value, json_only: bool) {
    if !json_only {
        print!("{text}");
    }
    println!("{value}");
}

fn load(path: &Path) -> Result<JobConfig> {
    let job = JobConfig::load(path)?;
    start_logging(&job);
    Ok(job)
}

/// One share of this machine's cores per local rank, for rayon's pool and the BLAS alike.
fn configure_threads() {
    let n = crate::distributed::configure_threads(&Launcher::detect());
    crate::model::llm::set_cpu_threads(n);
}

/// Logs on stderr and, when the environment names a collector, traces (see `telemetry`).
fn start_logging(job: &JobConfig) {
    let launcher = Launcher::detect();
    crate::telemetry::init_logging(&job.telemetry.level, &job.name, launcher.rank, launcher.world);
}

fn open_store(job: &JobConfig) -> Result<Store> {
    Store::open_with(&job.storage).context("opening the storage root (storage.root)")
}
