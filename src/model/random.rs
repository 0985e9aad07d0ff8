//! Random: the floor every results table starts with. Each history gets its scores from a seeded
//! stream keyed by the history's items, so a ranking is reproducible and does not depend on how
//! users are batched or on which machine scores them.

use rand::Rng as _;

use super::{Result, Scorer};

#[derive(Debug, Clone, PartialEq)]
pub struct RandomScorer {
    pub seed: u64,
    pub num_items: usize,
}

/// FNV-1a over the history's item indices: the index of the history's random stream.
fn history_key(history: &[u32]) -> u64 {
    history
        .iter()
        .flat_map(|i| i.to_le_bytes())
        .fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}

impl Scorer for RandomScorer {
    fn score(&self, histories: &[&[u32]]) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(histories.len() * (self.num_items + 1));
        for h in histories {
            let mut rng = crate::seed::stream(self.seed, "random/scores", history_key(h));
            out.extend((0..=self.num_items).map(|_| rng.random::<f32>()));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_independent_of_batching_and_a_uniform_ranking() {
        let r = RandomScorer { seed: 3, num_items: 29 };
        let both = r.score(&[&[1, 2], &[3]]).unwrap();
        assert_eq!(&both[30..], r.score(&[&[3]]).unwrap().as_slice());
        assert_eq!(both, RandomScorer { seed: 3, num_items: 29 }.score(&[&[1, 2], &[3]]).unwrap());
        assert_ne!(both, RandomScorer { seed: 4, num_items: 29 }.score(&[&[1, 2], &[3]]).unwrap());
        // Over many histories the target (item 1) is first among the 30 items about 1 time in 30,
        // and in the top 5 about 5 times in 30: a uniform random ranking.
        let n = 6000u32;
        let (mut top1, mut top5) = (0, 0);
        for u in 0..n {
            let s = r.score(&[&[u + 100]]).unwrap();
            let above = s[2..].iter().filter(|&&v| v >= s[1]).count();
            top1 += (above == 0) as u32;
            top5 += (above < 5) as u32;
        }
        let (h1, h5) = (top1 as f64 / n as f64, top5 as f64 / n as f64);
        assert!((h1 - 1.0 / 30.0).abs() < 0.01, "hit@1 {h1}");
        assert!((h5 - 5.0 / 30.0).abs() < 0.02, "hit@5 {h5}");
    }
}
