//! Which users are evaluated: all, a fixed count, or Cochran's sample size (95% confidence, +-5%
//! margin, p = 0.5, with the finite-population correction), drawn with a seed.

use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum UserSample {
    Count(usize),
    Named(UserSampleName),
}

impl Default for UserSample {
    fn default() -> Self {
        UserSample::Named(UserSampleName::All)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UserSampleName {
    All,
    Cochran,
}

/// n0 = z^2 p (1-p) / e^2 with z = 1.96, p = 0.5, e = 0.05 (= 384.16); n = n0 / (1 + (n0 - 1) / N),
/// rounded up.
pub fn cochran(population: usize) -> usize {
    let n0 = 1.96f64 * 1.96 * 0.25 / (0.05 * 0.05);
    let n = n0 / (1.0 + (n0 - 1.0) / population as f64);
    (n.ceil() as usize).min(population)
}

impl UserSample {
    /// The evaluated users among 0..population, sorted.
    pub fn pick(&self, population: usize, seed: u64) -> Vec<usize> {
        let n = match self {
            UserSample::Count(n) => (*n).min(population),
            UserSample::Named(UserSampleName::Cochran) => cochran(population),
            UserSample::Named(UserSampleName::All) => population,
        };
        let mut all: Vec<usize> = (0..population).collect();
        if n < population {
            all.shuffle(&mut crate::seed::stream(seed, "eval/users", 0));
            all.truncate(n);
            all.sort_unstable();
        }
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cochran_sizes() {
        assert_eq!(cochran(100_000), 383);
        assert_eq!(cochran(943), 274); // 384.16 / (1 + 383.16 / 943) = 273.17
        assert_eq!(cochran(10), 10);
    }

    #[test]
    fn sampling_is_seeded_sorted_and_bounded() {
        let a = UserSample::Count(5).pick(50, 1);
        assert_eq!(a, UserSample::Count(5).pick(50, 1));
        assert_eq!(a.len(), 5);
        assert!(a.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(UserSample::Count(500).pick(50, 1).len(), 50);
        assert_eq!(UserSample::default().pick(7, 1), (0..7).collect::<Vec<_>>());
    }

    #[test]
    fn parses_from_yaml() {
        let p = |s: &str| serde_norway::from_str::<UserSample>(s).unwrap();
        assert_eq!(p("all"), UserSample::Named(UserSampleName::All));
        assert_eq!(p("cochran"), UserSample::Named(UserSampleName::Cochran));
        assert_eq!(p("200"), UserSample::Count(200));
        assert!(serde_norway::from_str::<UserSample>("everyone").is_err());
    }
}
