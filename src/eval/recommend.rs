//! Top-k recommendations for one user: every item scored, the user's own items left out.

use crate::data::Dataset;
use crate::model::{ModelError, Result, Scorer};

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Recommendation {
    pub rank: usize,
    pub item: String,
    pub title: String,
    pub score: f32,
}

/// The `k` best items for the snapshot's `user` after `history` (item indices), best first; ties go
/// to the lower index. A request that can only answer nothing (k = 0, or a history that holds every
/// item) is an error.
pub fn top_k(scorer: &dyn Scorer, ds: &Dataset, user: usize, history: &[u32], k: usize) -> Result<Vec<Recommendation>> {
    if k == 0 {
        return Err(ModelError::Invalid("k must be at least 1: a top-0 list recommends nothing".into()));
    }
    let mut seen = vec![false; ds.num_items() + 1];
    for &h in history {
        seen[h as usize] = true;
    }
    let mut candidates: Vec<u32> = (1..=ds.num_items() as u32).filter(|&i| !seen[i as usize]).collect();
    if candidates.is_empty() {
        return Err(ModelError::Invalid(format!(
            "the history holds all {} items of the catalog: there is nothing left to recommend",
            ds.num_items()
        )));
    }
    let scores = scorer.score_users(&[user], &[history])?;
    candidates.sort_by(|&a, &b| scores[b as usize].total_cmp(&scores[a as usize]).then(a.cmp(&b)));
    Ok(candidates
        .into_iter()
        .take(k)
        .enumerate()
        .map(|(r, i)| {
            let item = ds.item(i);
            Recommendation {
                rank: r + 1,
                item: item.id.clone(),
                title: item.meta.title.clone(),
                score: scores[i as usize],
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{Item, Negatives};

    struct Fixed(Vec<f32>);
    impl Scorer for Fixed {
        fn score(&self, h: &[&[u32]]) -> Result<Vec<f32>> {
            Ok(h.iter().flat_map(|_| self.0.clone()).collect())
        }
    }

    #[test]
    fn best_unseen_items_first_with_ties_by_index() {
        let items = (1..=5)
            .map(|i| {
                let meta = crate::data::ingest::ItemMeta { title: format!("T{i}"), ..Default::default() };
                Item { index: i, id: format!("i{i}"), meta, image: None }
            })
            .collect();
        let ds = Dataset {
            name: "t".into(),
            key: "k".into(),
            items,
            user_ids: vec!["u".into()],
            sequences: vec![vec![1, 2, 3]],
            negatives: Negatives { per_user: 0, valid: vec![], test: vec![] },
            candidates: vec![],
        };
        let scorer = Fixed(vec![0.0, 9.0, 1.0, 5.0, 5.0, 0.5]);
        let r = top_k(&scorer, &ds, 0, &[1, 2], 3).unwrap();
        let ids: Vec<&str> = r.iter().map(|x| x.item.as_str()).collect();
        assert_eq!(ids, ["i3", "i4", "i5"]);
        assert_eq!((r[0].rank, r[0].title.as_str(), r[0].score), (1, "T3", 5.0));
        // Lists that could only be empty are refused, with the reason.
        let zero = top_k(&scorer, &ds, 0, &[1, 2], 0).unwrap_err().to_string();
        assert!(zero.contains("k must be at least 1"), "{zero}");
        let all = top_k(&scorer, &ds, 0, &[1, 2, 3, 4, 5], 3).unwrap_err().to_string();
        assert!(all.contains("nothing left to recommend"), "{all}");
        // A k beyond what is left returns what is left.
        assert_eq!(top_k(&scorer, &ds, 0, &[1, 2], 10).unwrap().len(), 3);
    }
}
