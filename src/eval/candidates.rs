//! Ranking on fixed candidate lists (`data::candidates`): each user's test target against exactly
//! the items of its list, ties against the target.

use super::metrics::pessimistic_rank;
use super::{check_scores, metrics_of, EvalError, Metrics};
use crate::data::candidates::CandidateList;
use crate::data::{Dataset, Split};
use crate::model::Scorer;
use crate::telemetry::{Progress, TelemetryConfig};

/// The target's 0-based rank among its list (ties against it), per list.
pub fn target_ranks(
    scorer: &dyn Scorer,
    ds: &Dataset,
    lists: &[CandidateList],
    batch_size: usize,
    progress: Option<&TelemetryConfig>,
) -> Result<Vec<usize>, EvalError> {
    let width = ds.num_items() + 1;
    let mut ranks = Vec::with_capacity(lists.len());
    let mut bar = progress.map(|t| Progress::new(t, "eval", lists.len() as u64));
    for chunk in lists.chunks(batch_size.max(1)) {
        let histories: Vec<&[u32]> = chunk.iter().map(|l| ds.history(l.user, Split::Test)).collect();
        let users: Vec<usize> = chunk.iter().map(|l| l.user).collect();
        let scores = scorer.score_users(&users, &histories)?;
        check_scores(&scores, chunk.len(), width, |row| ds.user_ids[chunk[row].user].clone())?;
        for (row, l) in chunk.iter().enumerate() {
            let s = &scores[row * width..(row + 1) * width];
            let others = l.candidates.iter().filter(|&&c| c != l.target).map(|&c| s[c as usize]);
            ranks.push(pessimistic_rank(s[l.target as usize], others));
        }
        if let Some(b) = bar.as_mut() {
            b.inc(chunk.len() as u64);
        }
    }
    if let Some(b) = bar {
        b.finish();
    }
    Ok(ranks)
}

/// Hit@k and NDCG@k over the lists.
pub fn evaluate(
    scorer: &dyn Scorer,
    ds: &Dataset,
    lists: &[CandidateList],
    ks: &[usize],
    batch_size: usize,
    progress: Option<&TelemetryConfig>,
) -> Result<Metrics, EvalError> {
    Ok(metrics_of(&target_ranks(scorer, ds, lists, batch_size, progress)?, ks))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::candidates::tests::{ds, write};

    struct Fixed(Vec<f32>);
    impl Scorer for Fixed {
        fn score(&self, h: &[&[u32]]) -> crate::model::Result<Vec<f32>> {
            Ok(h.iter().flat_map(|_| self.0.clone()).collect())
        }
    }

    //                          item: 0    1    2    3    4    5    6    7    8
    const SCORES: [f32; 9] = [0.0, 0.1, 0.9, 0.5, 0.7, 0.7, 0.2, 0.8, 0.3];

    #[test]
    fn ranks_the_target_within_its_own_list_with_ties_against_it() {
        let (_d, p) = write(&[
            // user 7: target 104 (0.7) vs 105 (0.7, a tie), 107 (0.8), 108 (0.3) -> rank 2
            r#"{"user": 7, "candidates": [105, 104, 107, 108], "target": 104}"#,
            // user 8: target 101 (0.1) vs 108 (0.3) -> rank 1
            r#"{"user": "8", "candidates": ["101", "108"], "target": "101"}"#,
        ]);
        let ds = ds();
        let lists = crate::data::candidates::read(&p, &ds).unwrap();
        assert_eq!(target_ranks(&Fixed(SCORES.to_vec()), &ds, &lists, 1, None).unwrap(), vec![2, 1]);
        let m = evaluate(&Fixed(SCORES.to_vec()), &ds, &lists, &[1, 5], 2, None).unwrap();
        assert_eq!(m.get("hit@1"), Some(0.0));
        assert_eq!(m.get("hit@5"), Some(1.0));
        let want = (1.0 / 4f64.log2() + 1.0 / 3f64.log2()) / 2.0;
        assert!((m.get("ndcg@5").unwrap() - want).abs() < 1e-12);
    }
}
