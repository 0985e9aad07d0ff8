//! Hit@k and NDCG@k of one target per user.
//!
//! Ties are broken against the target: its 0-based rank is the number of other candidates whose score
//! is greater than OR EQUAL to its own. A model that gives many items the same score (Pop over items
//! with equal counts, a constant model) therefore cannot win by the order items happen to be listed in.

use serde_json::{Map, Value};

/// 0-based rank of a target with score `target` among `others` (the other candidates), ties counted
/// against the target.
pub fn pessimistic_rank(target: f32, others: impl IntoIterator<Item = f32>) -> usize {
    others.into_iter().filter(|&s| s >= target).count()
}

/// Running sums of Hit@k and NDCG@k over users.
#[derive(Debug, Clone)]
pub struct MetricSums {
    ks: Vec<usize>,
    hits: Vec<f64>,
    ndcgs: Vec<f64>,
    pub users: usize,
}

impl MetricSums {
    pub fn new(ks: &[usize]) -> Self {
        Self { ks: ks.to_vec(), hits: vec![0.0; ks.len()], ndcgs: vec![0.0; ks.len()], users: 0 }
    }

    /// Adds one user whose target has 0-based `rank`.
    pub fn add(&mut self, rank: usize) {
        self.users += 1;
        for (j, &k) in self.ks.iter().enumerate() {
            if rank < k {
                self.hits[j] += 1.0;
                self.ndcgs[j] += 1.0 / ((rank + 2) as f64).log2();
            }
        }
    }

    /// Means over users: `hit@k` for every k, then `ndcg@k` for every k > 1 (NDCG@1 equals Hit@1).
    pub fn means(&self) -> Metrics {
        let n = self.users.max(1) as f64;
        let mut m = Vec::new();
        for (j, &k) in self.ks.iter().enumerate() {
            m.push((format!("hit@{k}"), self.hits[j] / n));
        }
        for (j, &k) in self.ks.iter().enumerate() {
            if k > 1 {
                m.push((format!("ndcg@{k}"), self.ndcgs[j] / n));
            }
        }
        Metrics(m)
    }
}

/// Named metric values in a stable order.
#[derive(Debug, Clone, PartialEq)]
pub struct Metrics(pub Vec<(String, f64)>);

impl Metrics {
    pub fn get(&self, name: &str) -> Option<f64> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
    }

    pub fn to_json(&self) -> Value {
        Value::Object(self.0.iter().map(|(k, v)| (k.clone(), Value::from(*v))).collect::<Map<_, _>>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_count_ties_against_the_target() {
        assert_eq!(pessimistic_rank(0.5, [0.9, 0.1, 0.3]), 1);
        assert_eq!(pessimistic_rank(0.5, [0.5, 0.5, 0.1]), 2);
        assert_eq!(pessimistic_rank(1.0, []), 0);
        // A constant model ranks every target last.
        assert_eq!(pessimistic_rank(0.0, [0.0; 100]), 100);
    }

    #[test]
    fn hand_computed_hit_and_ndcg() {
        // Three users with ranks 0, 3 and 7, ks 1, 5, 10.
        let mut s = MetricSums::new(&[1, 5, 10]);
        for r in [0, 3, 7] {
            s.add(r);
        }
        let m = s.means();
        let close = |name: &str, want: f64| {
            let got = m.get(name).unwrap();
            assert!((got - want).abs() < 1e-12, "{name}: {got} vs {want}");
        };
        close("hit@1", 1.0 / 3.0);
        close("hit@5", 2.0 / 3.0);
        close("hit@10", 1.0);
        close("ndcg@5", (1.0 + 1.0 / 5f64.log2()) / 3.0);
        close("ndcg@10", (1.0 + 1.0 / 5f64.log2() + 1.0 / 9f64.log2()) / 3.0);
        let names: Vec<&str> = m.0.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["hit@1", "hit@5", "hit@10", "ndcg@5", "ndcg@10"]);
    }
}
