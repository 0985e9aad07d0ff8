//! Early stopping for the epoch-based trainers (SASRec, MoRec, the graph models): every few epochs
//! the model is validated by NDCG@10 of every user's valid target; the best weights are kept and
//! training stops after `patience` validations without a gain.

use super::{Result, TrainError};
use crate::data::{Dataset, Split};
use crate::eval::{evaluate, Plan, Protocol};
use crate::model::{HostTensor, Scorer};

/// NDCG@10 of every user's valid target under `protocol`.
pub fn valid_ndcg10(scorer: &dyn Scorer, ds: &Dataset, protocol: Protocol) -> Result<f64> {
    let users: Vec<usize> = (0..ds.num_users()).collect();
    let plan = Plan { split: Split::Valid, protocols: &[protocol], ks: &[10], users: &users, batch_size: 256 };
    Ok(evaluate(scorer, ds, &plan, None)?[0].get("ndcg@10").unwrap_or(0.0))
}

/// The best validation so far, with its weights.
pub struct BestWeights {
    patience: usize,
    best: Option<(usize, f64, Vec<HostTensor>)>,
    since_best: usize,
}

impl BestWeights {
    pub fn new(patience: usize) -> Self {
        Self { patience, best: None, since_best: 0 }
    }

    /// Records the validation after `epoch`; `weights` is called only when it is the best so far.
    /// True when `patience` validations in a row brought no gain.
    pub fn record(
        &mut self,
        epoch: usize,
        value: f64,
        weights: impl FnOnce() -> crate::model::Result<Vec<HostTensor>>,
    ) -> Result<bool> {
        if self.best.as_ref().is_none_or(|b| value > b.1) {
            self.best = Some((epoch, value, weights()?));
            self.since_best = 0;
        } else {
            self.since_best += 1;
        }
        Ok(self.since_best >= self.patience)
    }

    /// (epoch, value, weights) of the best validation.
    pub fn finish(self, name: &str) -> Result<(usize, f64, Vec<HostTensor>)> {
        self.best.ok_or_else(|| TrainError::Invalid(format!("{name} was never validated")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_best_and_stops_after_patience_without_gain() {
        let w = |v: f32| move || Ok(vec![HostTensor { name: "w".into(), shape: vec![1], values: vec![v] }]);
        let mut b = BestWeights::new(2);
        assert!(!b.record(1, 0.1, w(1.0)).unwrap());
        assert!(!b.record(2, 0.3, w(2.0)).unwrap());
        assert!(!b.record(3, 0.3, w(3.0)).unwrap(), "a tie is no gain, but patience is 2");
        assert!(b.record(4, 0.2, w(4.0)).unwrap());
        let (epoch, value, weights) = b.finish("m").unwrap();
        assert_eq!((epoch, value, weights[0].values[0]), (2, 0.3, 2.0));
        assert!(BestWeights::new(1).finish("m").unwrap_err().to_string().contains("m was never validated"));
    }
}
