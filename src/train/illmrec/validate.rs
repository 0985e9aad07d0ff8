//! Validation during training: the model as it stands scores a fixed, seeded sample of users' valid
//! targets, spread over the ranks; early stopping keeps the best value of one metric and how many
//! validations have passed without beating it. Its state travels in every checkpoint, so a resumed
//! run decides exactly as an uninterrupted one.

use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::super::{IllmRecTrainConfig, Result};
use crate::data::{Dataset, Split};
use crate::distributed::{Collective, Guarded};
use crate::eval::{metrics_of, target_ranks, Plan, Protocol};
use crate::model::illmrec::scorer::IllmRecScorer;
use crate::model::illmrec::session::Session;

/// What one validation measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Validation {
    /// After this many steps.
    pub step: u64,
    pub epoch: u64,
    /// Hit@k and NDCG@k, as `eval` names them.
    pub metrics: Vec<(String, f64)>,
    /// The metric that decides (`train.illmrec.validation.metric`) and its value.
    pub metric: String,
    pub value: f64,
    pub improved: bool,
    pub seconds: f64,
}

/// The early-stopping state: every validation so far, the best value and where it was reached.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EarlyStopping {
    pub history: Vec<Validation>,
    pub best: Option<(u64, f64)>,
    /// Validations since the best one.
    pub since_best: usize,
}

impl EarlyStopping {
    /// Records a validation; true when it beat every earlier one by more than `min_delta` (the first
    /// always does).
    pub fn record(&mut self, mut v: Validation, min_delta: f64) -> bool {
        v.improved = self.best.is_none_or(|(_, b)| v.value > b + min_delta);
        if v.improved {
            self.best = Some((v.step, v.value));
            self.since_best = 0;
        } else {
            self.since_best += 1;
        }
        let improved = v.improved;
        self.history.push(v);
        improved
    }

    /// Whether `patience` validations in a row brought nothing better.
    pub fn exhausted(&self, patience: Option<usize>) -> bool {
        patience.is_some_and(|p| self.since_best >= p)
    }

    /// Whether the validation after `step` is on record already.
    pub fn has(&self, step: u64) -> bool {
        self.history.last().is_some_and(|v| v.step == step)
    }
}

/// Scores the validation sample under the configured protocol.
pub struct Validator {
    users: Vec<usize>,
    protocol: Protocol,
    ks: Vec<usize>,
    metric: String,
    batch: usize,
}

impl Validator {
    /// The sample is drawn once from `seed` over all users (every user has a valid target).
    pub fn new(cfg: &IllmRecTrainConfig, ds: &Dataset, seed: u64) -> Self {
        let v = &cfg.validation;
        let mut ks = vec![1, 5, 10];
        ks.extend(v.metric_k());
        ks.sort_unstable();
        ks.dedup();
        Self {
            users: v.users.pick(ds.num_users(), seed),
            protocol: v.protocol_for(ds.negatives.per_user),
            ks,
            metric: v.metric.clone(),
            batch: cfg.eval_batch_size,
        }
    }

    pub fn metric(&self) -> &str {
        &self.metric
    }

    pub fn users(&self) -> usize {
        self.users.len()
    }

    /// Validates the session's current weights as one rank of `coll`: rank r scores every world-th
    /// user from the r-th, one all-reduce gathers the targets' ranks, and every rank computes the
    /// same metrics from them in the sample's order.
    pub fn run(&self, sess: &Session, ds: &Dataset, coll: &Guarded, step: u64, epoch: u64) -> Result<Validation> {
        let started = Instant::now();
        let mine: Vec<usize> = self.users.iter().skip(coll.rank()).step_by(coll.world()).copied().collect();
        let scorer = IllmRecScorer::new(sess, ds, self.batch)?;
        let protocols = [self.protocol];
        let plan =
            Plan { split: Split::Valid, protocols: &protocols, ks: &self.ks, users: &mine, batch_size: self.batch };
        let local = target_ranks(&scorer, ds, &plan, None)?.remove(0);
        // The others may take as long as this rank did to score their share.
        coll.grant(started.elapsed() * 2);
        // Ranks are small integers: exact in f32, whatever order the sum takes.
        let mut all = vec![0f32; self.users.len()];
        for (j, r) in local.into_iter().enumerate() {
            all[coll.rank() + j * coll.world()] = (r + 1) as f32;
        }
        coll.all_reduce_sum(&mut all)?;
        let ranks: Vec<usize> = all.iter().map(|&r| (r as usize).saturating_sub(1)).collect();
        let metrics = metrics_of(&ranks, &self.ks);
        let value = metrics.get(&self.metric).unwrap_or(f64::NAN);
        Ok(Validation {
            step,
            epoch,
            metrics: metrics.0,
            metric: self.metric.clone(),
            value,
            improved: false,
            seconds: started.elapsed().as_secs_f64(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(step: u64, value: f64) -> Validation {
        Validation { step, epoch: 0, metrics: vec![], metric: "ndcg@10".into(), value, improved: false, seconds: 0.0 }
    }

    #[test]
    fn stops_after_patience_validations_without_a_better_value() {
        let mut es = EarlyStopping::default();
        assert!(es.record(v(10, 0.2), 0.0));
        assert!(!es.record(v(20, 0.2), 0.0), "a tie is no improvement");
        assert!(es.record(v(30, 0.3), 0.0));
        assert!(!es.record(v(40, 0.25), 0.0));
        assert!(!es.exhausted(Some(2)));
        assert!(!es.record(v(50, 0.1), 0.0));
        assert!(es.exhausted(Some(2)) && !es.exhausted(None));
        assert_eq!((es.best, es.since_best), (Some((30, 0.3)), 2));
        assert!(es.has(50) && !es.has(40));
        let improved: Vec<bool> = es.history.iter().map(|v| v.improved).collect();
        assert_eq!(improved, [true, false, true, false, false]);
        // The state survives a checkpoint's JSON.
        let back: EarlyStopping = serde_json::from_value(serde_json::to_value(&es).unwrap()).unwrap();
        assert_eq!(back, es);
    }

    #[test]
    fn a_gain_within_min_delta_is_no_improvement() {
        // The Beauty plateau run's last four validations: 0.2757 beat 0.2756 by 0.0001.
        let mut es = EarlyStopping::default();
        assert!(es.record(v(3500, 0.2756), 0.001));
        assert!(!es.record(v(3850, 0.2684), 0.001));
        assert!(!es.record(v(4200, 0.2738), 0.001));
        assert!(!es.record(v(4550, 0.2757), 0.001), "0.0001 better is within min_delta");
        assert!(es.exhausted(Some(3)));
        assert_eq!(es.best, Some((3500, 0.2756)));
        // A gain of more than min_delta counts.
        assert!(es.record(v(4900, 0.2770), 0.001));
        assert_eq!((es.best, es.since_best), (Some((4900, 0.2770)), 0));
    }

    #[test]
    fn a_zero_min_delta_leaves_the_recorded_settings_as_before_it_existed() {
        // Checkpoints record the validation settings and refuse a resume whose settings differ:
        // runs saved before `min_delta` existed must still resume.
        let mut cfg = crate::train::ValidationConfig::default();
        let before = serde_json::json!({"users": cfg.users, "protocol": cfg.protocol, "metric": cfg.metric});
        assert_eq!(serde_json::to_value(&cfg).unwrap(), before);
        cfg.min_delta = 0.001;
        assert_eq!(serde_json::to_value(&cfg).unwrap()["min_delta"], 0.001);
    }
}
