//! Models and what they share: the `Scorer` view evaluation uses, and the `model` job section.

pub mod layers;
pub mod llm;
pub mod pop;
pub mod sasrec;

use serde::{Deserialize, Serialize};

use crate::config::Invalid;

pub use sasrec::{SasRec, SasRecConfig};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, ModelError>;

/// A named tensor copied to the host: what checkpoints hold.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// A trained recommender as evaluation sees it.
pub trait Scorer {
    /// Scores of every item index 0..=N for each history (row-major, `histories.len() * (N + 1)`
    /// values). Index 0 is padding; its score is ignored.
    fn score(&self, histories: &[&[u32]]) -> Result<Vec<f32>>;
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    #[serde(default)]
    pub sasrec: SasRecConfig,
}

impl ModelConfig {
    pub fn validate(&self) -> std::result::Result<(), Invalid> {
        self.sasrec.validate().map_err(|e| Invalid::new(format!("sasrec.{}", e.key), e.message))
    }
}
