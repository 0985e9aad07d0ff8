//! The frozen LLM: a Llama-family decoder plus its tokenizer, loaded from a Hugging Face directory,
//! a GGUF file (dequantized to plain tensors), or built tiny and random from a seed for tests.

#[cfg(target_arch = "x86_64")]
mod bf16;
#[cfg(feature = "openblas")]
pub mod blas;
mod cache;
mod frozen;
mod layer;
mod llama;
mod load;
mod ops;
mod shared;
pub mod tiny;

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

pub use cache::{argmax_rows, KvCache, VocabSubset};
pub use frozen::{cpu_bf16_kernel, cpu_matmul_backend, FrozenLinear};
pub use llama::{embed_with, Llama, LlamaConfig, PrefixCache};
pub use tiny::TinyLlmConfig;

use crate::invalid::Invalid;

#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    #[error("{path}: {reason}")]
    Load { path: PathBuf, reason: String },
    #[error("the model's configuration is invalid: {0}")]
    Config(String),
    #[error("the checkpoint has no weight `{0}`")]
    MissingWeight(String),
    #[error("weight `{name}` has shape {found:?}, the configuration needs {expected:?}")]
    WeightShape { name: String, found: Vec<usize>, expected: Vec<usize> },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Tells the CPU matmul library how many threads it may use (candle's own pool reads its size from
/// the environment, see `distributed::configure_threads`); OpenBLAS reads its environment before
/// `main` runs, so it must be told.
pub fn set_cpu_threads(n: usize) {
    #[cfg(feature = "openblas")]
    blas::set_threads(n);
    #[cfg(not(feature = "openblas"))]
    let _ = n;
}

/// Where the LLM comes from (`model.llm` in a job).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum LlmSource {
    /// A Hugging Face directory: config.json, *.safetensors (sharded or not), tokenizer.json.
    Hf { dir: PathBuf },
    /// A GGUF file of a `llama` architecture model; weights are dequantized to f32 and the tokenizer
    /// is built from the file's metadata.
    Gguf { file: PathBuf },
    /// A tiny random model built from a seed (tests, the demo).
    Tiny(TinyLlmConfig),
}

impl Default for LlmSource {
    fn default() -> Self {
        LlmSource::Tiny(TinyLlmConfig::default())
    }
}

impl LlmSource {
    pub fn validate(&self) -> Result<(), Invalid> {
        match self {
            LlmSource::Tiny(t) => t.validate().map_err(|e| Invalid::new(format!("tiny.{}", e.key), e.message)),
            LlmSource::Hf { dir } if dir.as_os_str().is_empty() => Err(Invalid::new("hf.dir", "must not be empty")),
            LlmSource::Gguf { file } if file.as_os_str().is_empty() => {
                Err(Invalid::new("gguf.file", "must not be empty"))
            }
            _ => Ok(()),
        }
    }
}

/// A loaded LLM: the frozen decoder, its tokenizer and the ids of its special tokens.
pub struct Llm {
    pub model: Llama,
    pub tokenizer: Tokenizer,
    pub bos: Option<u32>,
    pub eos: u32,
    /// A short description for reports ("gguf SmolLM2-135M-Instruct.Q4_1.gguf", "tiny seed 1").
    pub name: String,
    /// The precision the frozen products run at (bf16 only where `load_for` could pack the weights).
    matmul: super::LlmMatmul,
    /// Prompt prefixes computed so far, by their token ids (`prefix`).
    prefixes: std::sync::Mutex<std::collections::HashMap<Vec<u32>, std::sync::Arc<PrefixCache>>>,
}

impl Llm {
    /// Loads the model `source` names in `dtype` (f32 on CPU: candle has no fast bf16 CPU matmul).
    pub fn load(source: &LlmSource, dtype: DType, device: &Device) -> Result<Self, LlmError> {
        match source {
            LlmSource::Hf { dir } => load::hf_dir(dir, dtype, device),
            LlmSource::Gguf { file } => load::gguf(file, dtype, device),
            LlmSource::Tiny(cfg) => tiny::build(cfg, dtype, device),
        }
    }

    /// Loads it and puts its products on the precision `matmul` asks for (see `ModelConfig`).
    pub fn load_for(source: &LlmSource, matmul: super::LlmMatmul, device: &Device) -> Result<Self, LlmError> {
        let mut llm = Self::load(source, DType::F32, device)?;
        if matmul == super::LlmMatmul::Bf16 {
            if llm.model.use_bf16_matmuls()? {
                llm.matmul = super::LlmMatmul::Bf16;
            } else if device.is_cpu() {
                tracing::warn!("bf16 products need an x86-64 CPU with AVX-512 BF16; the products stay f32");
            } else {
                tracing::warn!("bf16 panels are a CPU path: on the GPU the products stay f32");
            }
        }
        Ok(llm)
    }

    pub(crate) fn new(model: Llama, tokenizer: Tokenizer, bos: Option<u32>, eos: u32, name: String) -> Self {
        Self { model, tokenizer, bos, eos, name, matmul: super::LlmMatmul::F32, prefixes: Default::default() }
    }

    /// The precision the frozen products run at.
    pub fn matmul(&self) -> super::LlmMatmul {
        self.matmul
    }

    pub fn hidden_size(&self) -> usize {
        self.model.cfg.hidden_size
    }

    /// The cached keys and values of a constant prompt prefix (token ids), computed the first time
    /// it is asked for. The weights are frozen, so the cache never goes stale.
    pub fn prefix(&self, ids: &[u32]) -> candle_core::Result<std::sync::Arc<PrefixCache>> {
        let mut known = self.prefixes.lock().map_err(|_| candle_core::Error::Msg("prefix cache poisoned".into()))?;
        if let Some(c) = known.get(ids) {
            return Ok(c.clone());
        }
        let x = self.model.embed(&Tensor::from_slice(ids, (1, ids.len()), self.model.device())?)?.squeeze(0)?;
        let cache = std::sync::Arc::new(self.model.prefix_cache(&x)?);
        known.insert(ids.to_vec(), cache.clone());
        Ok(cache)
    }

    /// Token ids of `text`, without special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, LlmError> {
        let enc = self.tokenizer.encode(text, false).map_err(|e| LlmError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String, LlmError> {
        self.tokenizer.decode(ids, false).map_err(|e| LlmError::Tokenizer(e.to_string()))
    }

    /// Embeddings `[rows, len, hidden]` of token ids given row-major.
    pub fn embed_ids(&self, ids: Vec<u32>, rows: usize) -> candle_core::Result<Tensor> {
        let len = ids.len() / rows.max(1);
        self.model.embed(&Tensor::from_vec(ids, (rows, len), self.model.device())?)
    }
}

#[cfg(test)]
mod tests;
