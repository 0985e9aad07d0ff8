//! Sampled negatives for the `sampled:N` protocols, drawn once at prepare time and stored with the
//! split so every model is scored against the same candidates.
//!
//! For each user and split: `k` distinct items drawn uniformly from the catalog minus everything the
//! user ever interacted with (the valid and test targets included). `sampled:N` uses the first N, so
//! the 1+29 candidates are a subset of the 1+100 ones.

use std::collections::HashSet;

use rand::Rng as _;

use super::dataset::{Negatives, Split};
use super::error::{DataError, Result};

pub fn sample(sequences: &[Vec<u32>], num_items: usize, k: usize, seed: u64) -> Result<Negatives> {
    let mut valid = Vec::with_capacity(sequences.len() * k);
    let mut test = Vec::with_capacity(sequences.len() * k);
    for (user, seq) in sequences.iter().enumerate() {
        let seen: HashSet<u32> = seq.iter().copied().collect();
        if num_items - seen.len() < k {
            return Err(DataError::Invalid(format!(
                "user {user} has {} distinct items out of {num_items}: fewer than {k} are left to sample as negatives (lower data.negatives)",
                seen.len()
            )));
        }
        for (split, out) in [(Split::Valid, &mut valid), (Split::Test, &mut test)] {
            let mut rng = crate::seed::stream(seed, &format!("negatives/{split:?}"), user as u64);
            let mut chosen: HashSet<u32> = HashSet::with_capacity(k);
            // Rejection sampling is fast while the excluded share is small; when most of the catalog
            // is excluded, draw from the explicit list of allowed items instead.
            if seen.len() * 2 < num_items {
                while chosen.len() < k {
                    let c = rng.random_range(1..=num_items as u32);
                    if !seen.contains(&c) && chosen.insert(c) {
                        out.push(c);
                    }
                }
            } else {
                let mut allowed: Vec<u32> = (1..=num_items as u32).filter(|i| !seen.contains(i)).collect();
                for j in 0..k {
                    let pick = rng.random_range(j..allowed.len());
                    allowed.swap(j, pick);
                    out.push(allowed[j]);
                }
            }
        }
    }
    Ok(Negatives { per_user: k, valid, test })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negatives_avoid_history_are_distinct_and_seeded() {
        let seqs = vec![vec![1, 2, 3], vec![4, 5, 6, 7]];
        let n = sample(&seqs, 20, 10, 7).unwrap();
        for (u, seq) in seqs.iter().enumerate() {
            for split in [&n.valid, &n.test] {
                let row = &split[u * 10..u * 10 + 10];
                let set: HashSet<_> = row.iter().collect();
                assert_eq!(set.len(), 10);
                assert!(row.iter().all(|i| (1..=20).contains(i) && !seq.contains(i)));
            }
        }
        assert_eq!(n, sample(&seqs, 20, 10, 7).unwrap());
        assert_ne!(n, sample(&seqs, 20, 10, 8).unwrap());
    }

    #[test]
    fn dense_users_use_the_allowed_list() {
        let seqs = vec![(1..=15).collect::<Vec<u32>>()];
        let n = sample(&seqs, 20, 5, 1).unwrap();
        let mut v = n.valid.clone();
        v.sort();
        assert_eq!(v, vec![16, 17, 18, 19, 20]);
        assert!(sample(&seqs, 20, 6, 1).is_err());
    }
}
