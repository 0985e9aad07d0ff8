//! Models and what they share: the `Scorer` view evaluation uses, and the `model` job section.

pub mod device;
pub mod graph;
pub mod iisan;
pub mod illmrec;
pub mod layers;
pub mod llm;
pub mod pop;
pub mod random;
pub mod sasrec;

use serde::{Deserialize, Serialize};

use crate::invalid::Invalid;

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

/// Host copies of named trainable tensors (as f32), for checkpoints.
pub fn vars_to_host(vars: &[(String, candle_core::Var)]) -> Result<Vec<HostTensor>> {
    vars.iter()
        .map(|(name, v)| {
            let t = v.as_tensor().to_dtype(candle_core::DType::F32)?;
            Ok(HostTensor { name: name.clone(), shape: t.dims().to_vec(), values: t.flatten_all()?.to_vec1::<f32>()? })
        })
        .collect()
}

/// Overwrites named trainable tensors from host copies; every name must be there with its shape.
pub fn load_host_into(vars: &[(String, candle_core::Var)], tensors: &[HostTensor]) -> Result<()> {
    let by_name: std::collections::HashMap<&str, &HostTensor> = tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    for (name, var) in vars {
        let t = by_name
            .get(name.as_str())
            .ok_or_else(|| ModelError::Invalid(format!("checkpoint has no tensor `{name}`")))?;
        if t.shape.as_slice() != var.as_tensor().dims() {
            return Err(ModelError::Invalid(format!(
                "tensor `{name}` has shape {:?}, the model needs {:?}",
                t.shape,
                var.as_tensor().dims()
            )));
        }
        let value = candle_core::Tensor::from_slice(&t.values, t.shape.as_slice(), var.as_tensor().device())?
            .to_dtype(var.as_tensor().dtype())?;
        var.set(&value)?;
    }
    Ok(())
}

/// A trained recommender as evaluation sees it.
pub trait Scorer {
    /// Scores of every item index 0..=N for each history (row-major, `histories.len() * (N + 1)`
    /// values). Index 0 is padding; its score is ignored.
    fn score(&self, histories: &[&[u32]]) -> Result<Vec<f32>>;

    /// The same for users of the snapshot the model was trained on (`users[r]` is the index of the
    /// user whose history is `histories[r]`). Evaluation and `recommend` call this. Models that learn
    /// one vector per user (the graph models) need the user; the others score the history alone.
    fn score_users(&self, users: &[usize], histories: &[&[u32]]) -> Result<Vec<f32>> {
        let _ = users;
        self.score(histories)
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    #[serde(default)]
    pub sasrec: SasRecConfig,
    /// The frozen LLM of the LLM recommenders.
    #[serde(default)]
    pub llm: llm::LlmSource,
    #[serde(default)]
    pub illmrec: illmrec::IllmRecConfig,
    /// How the frozen LLM's products run on the CPU: `f32`, or `bf16` (inputs rounded to bf16, f32
    /// sums: twice the f32 rate on CPUs with AVX-512 BF16; f32 with a warning on other CPUs).
    #[serde(default)]
    pub llm_matmul: LlmMatmul,
    /// Where the LLM recommenders compute: `cpu`, `cuda` (each rank takes the GPU of its local
    /// index) or `cuda:N` (`device.rs`). The other models train on the CPU.
    #[serde(default)]
    pub device: device::ComputeDevice,
    #[serde(default)]
    pub freedom: graph::freedom::FreedomConfig,
    #[serde(default)]
    pub bm3: graph::bm3::Bm3Config,
    #[serde(default)]
    pub mmgcn: graph::mmgcn::MmgcnConfig,
    #[serde(default)]
    pub iisan: iisan::IisanConfig,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LlmMatmul {
    #[default]
    F32,
    Bf16,
}

impl std::str::FromStr for LlmMatmul {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" => Ok(LlmMatmul::F32),
            "bf16" => Ok(LlmMatmul::Bf16),
            _ => Err(format!("`{s}` is not f32 or bf16")),
        }
    }
}

impl ModelConfig {
    pub fn validate(&self) -> std::result::Result<(), Invalid> {
        self.sasrec.validate().map_err(|e| Invalid::new(format!("sasrec.{}", e.key), e.message))?;
        self.llm.validate().map_err(|e| Invalid::new(format!("llm.{}", e.key), e.message))?;
        self.illmrec.validate().map_err(|e| Invalid::new(format!("illmrec.{}", e.key), e.message))?;
        self.freedom.validate().map_err(|e| Invalid::new(format!("freedom.{}", e.key), e.message))?;
        self.bm3.validate().map_err(|e| Invalid::new(format!("bm3.{}", e.key), e.message))?;
        self.mmgcn.validate().map_err(|e| Invalid::new(format!("mmgcn.{}", e.key), e.message))?;
        self.iisan.validate().map_err(|e| Invalid::new(format!("iisan.{}", e.key), e.message))
    }
}
