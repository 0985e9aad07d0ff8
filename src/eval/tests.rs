//! Protocols on a hand-built dataset with fixed scores.

use super::*;
use crate::data::{Item, Negatives};
use crate::model::Scorer;

/// Scores every item by a fixed table, whatever the history.
struct Fixed(Vec<f32>);

impl Scorer for Fixed {
    fn score(&self, histories: &[&[u32]]) -> crate::model::Result<Vec<f32>> {
        Ok(histories.iter().flat_map(|_| self.0.iter().copied()).collect())
    }
}

fn dataset() -> Dataset {
    let items =
        (1..=8).map(|i| Item { index: i, id: format!("i{i}"), meta: Default::default(), image: None }).collect();
    Dataset {
        name: "t".into(),
        key: "k".into(),
        items,
        user_ids: vec!["u0".into(), "u1".into()],
        sequences: vec![vec![1, 2, 3, 4], vec![5, 6, 1]],
        // per user: 3 negatives for valid, 3 for test
        negatives: Negatives { per_user: 3, valid: vec![6, 7, 8, 2, 3, 4], test: vec![7, 8, 6, 2, 3, 4] },
        candidates: vec![],
    }
}

//                          item: 0    1    2    3    4    5    6    7    8
const SCORES: [f32; 9] = [0.0, 0.1, 0.9, 0.5, 0.7, 0.7, 0.2, 0.8, 0.3];

fn run(split: Split, protocols: &[Protocol]) -> Vec<Metrics> {
    let plan = Plan { split, protocols, ks: &[1, 5, 10], users: &[0, 1], batch_size: 1 };
    evaluate(&Fixed(SCORES.to_vec()), &dataset(), &plan, None).unwrap()
}

fn assert_close(m: &Metrics, name: &str, want: f64) {
    let got = m.get(name).unwrap();
    assert!((got - want).abs() < 1e-12, "{name}: got {got}, want {want}");
}

#[test]
fn full_ranking_excludes_history_and_breaks_ties_against_the_target() {
    // u0: target 4 (0.7), history {1,2,3}; candidates 5 (0.7, a tie), 6, 7 (0.8), 8 -> rank 2.
    // u1: target 1 (0.1), history {5,6}; all five candidates score higher -> rank 5.
    let m = &run(Split::Test, &[Protocol::Full])[0];
    assert_close(m, "hit@1", 0.0);
    assert_close(m, "hit@5", 0.5);
    assert_close(m, "hit@10", 1.0);
    assert_close(m, "ndcg@5", 0.5 / 4f64.log2());
    assert_close(m, "ndcg@10", (1.0 / 4f64.log2() + 1.0 / 7f64.log2()) / 2.0);
}

#[test]
fn sampled_uses_the_first_n_stored_negatives() {
    // u0: negatives 7 (0.8), 8 (0.3) -> rank 1. u1: 2 (0.9), 3 (0.5) -> rank 2.
    let m = &run(Split::Test, &[Protocol::Sampled(2)])[0];
    assert_close(m, "hit@1", 0.0);
    assert_close(m, "hit@5", 1.0);
    assert_close(m, "ndcg@5", (1.0 / 3f64.log2() + 1.0 / 4f64.log2()) / 2.0);
}

#[test]
fn valid_split_uses_the_shorter_history() {
    // u0: target 3 (0.5), history {1,2}; candidates 4 (.7), 5 (.7), 6, 7 (.8), 8 -> rank 3.
    // u1: target 6 (0.2), history {5}; candidates 1, 2 (.9), 3 (.5), 4 (.7), 7 (.8), 8 (.3) -> rank 5.
    let m = &run(Split::Valid, &[Protocol::Full])[0];
    assert_close(m, "hit@5", 0.5);
    assert_close(m, "ndcg@5", 0.5 / 5f64.log2());
}

#[test]
fn too_many_negatives_and_nan_scores_are_errors() {
    let plan = |protocols| Plan { split: Split::Test, protocols, ks: &[1], users: &[0], batch_size: 1 };
    let err = evaluate(&Fixed(SCORES.to_vec()), &dataset(), &plan(&[Protocol::Sampled(4)]), None).unwrap_err();
    assert!(err.to_string().contains("sampled:4 needs 4 negatives"), "{err}");
    let mut nan = SCORES.to_vec();
    nan[7] = f32::NAN;
    let err = evaluate(&Fixed(nan), &dataset(), &plan(&[Protocol::Full]), None).unwrap_err();
    assert!(err.to_string().contains("item 7 of user u0"), "{err}");
}

#[test]
fn json_has_the_documented_shape() {
    let m = run(Split::Test, &[Protocol::Full]).remove(0);
    let r = EvalResult { model: "pop".into(), protocol: "full".into(), split: Split::Test, users: 2, metrics: m };
    let j = r.to_json();
    let keys: Vec<&String> = j.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["model", "protocol", "users", "metrics"]);
    let mk: Vec<&String> = j["metrics"].as_object().unwrap().keys().collect();
    assert_eq!(mk, ["hit@1", "hit@5", "hit@10", "ndcg@5", "ndcg@10"]);
    assert_eq!(j["protocol"], "full");
}
