//! `illmrec bench catalog-growth`: the catalog grows in steps (the paper: 5K, 10K, 15K, 20K items with
//! about 2.7K, 13.8K, 33.7K, 59.3K users) and at each step we measure what incremental retraining
//! costs and buys against retraining from scratch:
//!
//! - features: items computed vs reused from the content-addressed cache, and the time;
//! - the previous model, unretrained, scoring the grown catalog (new items from their features);
//! - a warm start (`train --from` the previous model) with a fraction of the scratch steps;
//! - a model trained from scratch.
//!
//! Every step is a new version of one dataset (its manifest names the version before as parent);
//! the runs are `<job>-<items>-scratch-<model>` and `<job>-<items>-warm-<model>`.

use std::time::Instant;

use serde::Serialize;

use crate::config::JobConfig;
use crate::data::prompt::Variant;
use crate::distributed::Guarded;
use crate::eval::Protocol;
use crate::store::Store;
use crate::train::illmrec::TrainOptions;
use crate::train::{ModelKind, TrainError};

/// The paper's growth schedule: (items, users).
pub const PAPER_STEPS: [(usize, usize); 4] = [(5_000, 2_700), (10_000, 13_800), (15_000, 33_700), (20_000, 59_300)];

pub struct GrowthPlan {
    /// (items, users) per step, in order.
    pub steps: Vec<(usize, usize)>,
    /// Warm-start steps as a fraction of the scratch run's steps.
    pub warm_fraction: f64,
    /// The protocol whose Hit@5 / NDCG@5 are compared.
    pub protocol: Protocol,
    /// Warm-start from the previous step's scratch model instead of the previous deployed model
    /// (its warm start, where there is one).
    pub warm_from_scratch: bool,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Accuracy {
    pub hit5: f64,
    pub ndcg5: f64,
}

#[derive(Debug, Serialize)]
pub struct GrowthStep {
    pub items: usize,
    pub users: usize,
    /// After k-core: what the snapshot holds.
    pub snapshot_items: usize,
    pub snapshot_users: usize,
    pub snapshot: String,
    pub parent: Option<String>,
    pub features_computed: usize,
    pub features_reused: usize,
    pub features_seconds: f64,
    pub scratch_steps: u64,
    pub scratch_seconds: f64,
    pub scratch: Accuracy,
    pub warm_steps: Option<u64>,
    pub warm_seconds: Option<f64>,
    pub warm: Option<Accuracy>,
    /// The previous step's model (the one warm starts come from), not retrained, on this catalog.
    pub previous_unretrained: Option<Accuracy>,
}

impl GrowthStep {
    /// Warm-start Hit@5 relative to scratch, and its training time relative to scratch.
    pub fn warm_vs_scratch(&self) -> Option<(f64, f64)> {
        let (w, s) = (self.warm?, self.warm_seconds?);
        Some((w.hit5 / self.scratch.hit5.max(1e-12), s / self.scratch_seconds.max(1e-12)))
    }
}

/// Runs the plan on `base` (a job with a `data.synth` section, an I-LLMRec model and its training
/// settings), single process.
pub fn run(
    base: &JobConfig,
    store: &Store,
    variant: Variant,
    plan: &GrowthPlan,
    coll: &mut Guarded,
) -> Result<Vec<GrowthStep>, TrainError> {
    let synth = base
        .data
        .synth
        .clone()
        .ok_or_else(|| TrainError::Invalid("catalog-growth needs a job with a `data.synth` section".into()))?;
    let dataset = base.dataset().to_string();
    let kind = ModelKind::Illmrec(variant);
    let mut out = Vec::new();
    let mut previous: Option<JobConfig> = None;
    for &(items, users) in &plan.steps {
        let mut job = base.clone();
        job.data.dataset = Some(dataset.clone());
        let synth = crate::data::SynthConfig { items, users, ..synth.clone() };
        job.data.synth = Some(synth.clone());
        crate::data::synth::generate(&synth, &job.telemetry)?;
        let (prepared, ds) = crate::pipeline::prepare(&job, store)?;

        let t = Instant::now();
        let feats = crate::pipeline::features(&job, store, &ds)?;
        let features_seconds = t.elapsed().as_secs_f64();
        let accuracy = |job: &JobConfig| -> Result<Accuracy, TrainError> {
            let r = crate::pipeline::evaluate(
                job,
                store,
                &ds,
                kind,
                &crate::pipeline::EvalRequest::test(&[plan.protocol]),
            )?;
            let m = &r[0].metrics;
            Ok(Accuracy { hit5: m.get("hit@5").unwrap_or(f64::NAN), ndcg5: m.get("ndcg@5").unwrap_or(f64::NAN) })
        };
        let previous_unretrained = previous.as_ref().map(&accuracy).transpose()?;

        let mut scratch_job = job.clone();
        scratch_job.name = format!("{}-{items}-scratch", base.name);
        let t = Instant::now();
        let scratch_fit = crate::train::illmrec::fit(
            &crate::pipeline::train_job(&scratch_job),
            store,
            variant,
            TrainOptions::default(),
            coll,
        )?;
        let scratch_seconds = t.elapsed().as_secs_f64();
        let scratch = accuracy(&scratch_job)?;

        let mut warm = None;
        if let Some(prev) = &previous {
            let mut warm_job = job.clone();
            warm_job.name = format!("{}-{items}-warm", base.name);
            let steps = ((scratch_fit.total_steps as f64 * plan.warm_fraction).ceil() as u64).max(1);
            warm_job.train.illmrec.max_steps = Some(steps);
            let from = Some(crate::train::run_id(&prev.name, kind));
            let t = Instant::now();
            crate::train::illmrec::fit(
                &crate::pipeline::train_job(&warm_job),
                store,
                variant,
                TrainOptions { from, ..TrainOptions::default() },
                coll,
            )?;
            let seconds = t.elapsed().as_secs_f64();
            warm = Some((steps, seconds, accuracy(&warm_job)?, warm_job));
        }
        let (feature_computed, feature_reused) =
            feats.0.iter().fold((0, 0), |(c, r), f| (c + f.computed, r + f.reused));
        let step = GrowthStep {
            items,
            users,
            snapshot_items: ds.num_items(),
            snapshot_users: ds.num_users(),
            snapshot: prepared.manifest.key.clone(),
            parent: prepared.manifest.parent.clone(),
            features_computed: feature_computed,
            features_reused: feature_reused,
            features_seconds,
            scratch_steps: scratch_fit.total_steps,
            scratch_seconds,
            scratch,
            warm_steps: warm.as_ref().map(|w| w.0),
            warm_seconds: warm.as_ref().map(|w| w.1),
            warm: warm.as_ref().map(|w| w.2),
            previous_unretrained,
        };
        tracing::info!("catalog growth: {}", serde_json::to_string(&step).unwrap_or_default());
        out.push(step);
        previous = Some(match warm {
            Some(w) if !plan.warm_from_scratch => w.3,
            _ => scratch_job,
        });
    }
    Ok(out)
}

/// The figures as a Markdown table.
pub fn table(steps: &[GrowthStep], protocol: Protocol) -> String {
    let mut s = String::from(
        "| items | users (after k-core) | features computed / reused (s) | scratch: steps, s, Hit@5, NDCG@5 | \
         warm start: steps, s, Hit@5, NDCG@5 | previous model unretrained: Hit@5, NDCG@5 | warm/scratch Hit@5, time |\n\
         |---|---|---|---|---|---|---|\n",
    );
    let acc = |a: Option<Accuracy>| a.map_or("-".to_string(), |a| format!("{:.4}, {:.4}", a.hit5, a.ndcg5));
    for r in steps {
        let warm = match (r.warm_steps, r.warm_seconds) {
            (Some(n), Some(sec)) => format!("{n}, {sec:.0}, {}", acc(r.warm)),
            _ => "-".into(),
        };
        let ratio = r.warm_vs_scratch().map_or("-".into(), |(h, t)| format!("{h:.3}, {t:.2}x"));
        s.push_str(&format!(
            "| {} | {} ({}) | {} / {} ({:.1}) | {}, {:.0}, {} | {warm} | {} | {ratio} |\n",
            r.items,
            r.users,
            r.snapshot_users,
            r.features_computed,
            r.features_reused,
            r.features_seconds,
            r.scratch_steps,
            r.scratch_seconds,
            acc(Some(r.scratch)),
            acc(r.previous_unretrained),
        ));
    }
    s.push_str(&format!("\nHit@5 / NDCG@5 on the test split under `{protocol}`.\n"));
    s
}
