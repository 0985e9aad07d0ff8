//! Pop: every user gets the items ranked by how often they occur in the training sequences.

use super::{Result, Scorer};

#[derive(Debug, Clone, PartialEq)]
pub struct Pop {
    /// counts[i] = training interactions of item i (index 0 unused).
    pub counts: Vec<f32>,
}

impl Pop {
    /// Counts items over the training parts of the sequences.
    pub fn fit<'a>(num_items: usize, train_sequences: impl IntoIterator<Item = &'a [u32]>) -> Self {
        let mut counts = vec![0f32; num_items + 1];
        for seq in train_sequences {
            for &i in seq {
                counts[i as usize] += 1.0;
            }
        }
        Self { counts }
    }
}

impl Scorer for Pop {
    fn score(&self, histories: &[&[u32]]) -> Result<Vec<f32>> {
        Ok(histories.iter().flat_map(|_| self.counts.iter().copied()).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_training_occurrences() {
        let p = Pop::fit(3, [&[1u32, 2][..], &[2, 3][..]]);
        assert_eq!(p.counts, vec![0.0, 1.0, 2.0, 1.0]);
        assert_eq!(p.score(&[&[1], &[]]).unwrap().len(), 8);
    }
}
