//! A tiny random Llama built from a seed: the same architecture and code path as a real checkpoint, a
//! few layers of width 64, for tests and the demo. Its tokenizer is a byte-level BPE trained on a fixed
//! built-in text, so any text encodes and the model does not depend on the dataset.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::AddedToken;

use super::load::byte_level_tokenizer;
use super::{Llama, LlamaConfig, Llm, LlmError};
use crate::invalid::Invalid;
use crate::model::layers::normal_tensor;
use crate::seed::stream;

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TinyLlmConfig {
    #[serde(default = "d_seed")]
    pub seed: u64,
    #[serde(default = "d_layers")]
    pub layers: usize,
    #[serde(default = "d_hidden")]
    pub hidden: usize,
    #[serde(default = "d_heads")]
    pub heads: usize,
    #[serde(default = "d_kv_heads")]
    pub kv_heads: usize,
    #[serde(default = "d_intermediate")]
    pub intermediate: usize,
    /// Target size of the trained BPE vocabulary (it can end smaller on the built-in text).
    #[serde(default = "d_vocab")]
    pub vocab: usize,
}

fn d_seed() -> u64 {
    1
}
fn d_layers() -> usize {
    2
}
fn d_hidden() -> usize {
    64
}
fn d_heads() -> usize {
    4
}
fn d_kv_heads() -> usize {
    2
}
fn d_intermediate() -> usize {
    128
}
fn d_vocab() -> usize {
    2048
}

impl Default for TinyLlmConfig {
    fn default() -> Self {
        Self {
            seed: d_seed(),
            layers: d_layers(),
            hidden: d_hidden(),
            heads: d_heads(),
            kv_heads: d_kv_heads(),
            intermediate: d_intermediate(),
            vocab: d_vocab(),
        }
    }
}

impl TinyLlmConfig {
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.vocab < 300 {
            return Err(Invalid::new("vocab", "must be at least 300 (256 bytes + specials + merges)"));
        }
        self.architecture(self.vocab).check().map_err(|m| Invalid::new("hidden", m))
    }

    fn architecture(&self, vocab_size: usize) -> LlamaConfig {
        LlamaConfig {
            hidden_size: self.hidden,
            intermediate_size: self.intermediate,
            num_hidden_layers: self.layers,
            num_attention_heads: self.heads,
            num_key_value_heads: Some(self.kv_heads),
            vocab_size,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            max_position_embeddings: 4096,
            tie_word_embeddings: true,
            rope_interleaved: false,
        }
    }
}

pub const BOS: &str = "<s>";
pub const EOS: &str = "</s>";

/// What the tiny tokenizer learns its merges from: plain English of the kind recommendation prompts use.
const CORPUS: &str = "\
A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, \
detailed, and polite answers to the user's questions. Your job is to recommend a suitable next item based \
on the items a user has interacted with. The user has chronologically interacted with the following items, \
where the information of each item is contained in curly brackets. Title, brand, category, feature, \
description, visual representation. Please conduct an analysis of user preferences based on the interacted \
items and then generate a recommendation for the next item to be consumed. What is the title of the next \
item? Which brand will the user choose next? Describe the features of the next item. Which category does it \
belong to? The details of the next item to be consumed are as follows. Unknown. Classic compact deluxe light \
modern smart soft bold vintage sturdy eco pro lamp mug backpack notebook sneaker kettle brush jacket speaker \
bottle candle pillow watch scarf bowl chair puzzle helmet blender easel racket tent guitar camera red orange \
yellow lime green teal cyan azure blue violet magenta rose cotton steel bamboo ceramic leather glass oak wool \
nylon copper made of finish built from for everyday use by the a an and of in on with to is it this that \
Classic Compact Deluxe Light Modern Smart Soft Bold Vintage Sturdy Eco Pro Lamp Mug Backpack Notebook \
Sneaker Kettle Brush Jacket Speaker Bottle Candle Pillow Watch Scarf Bowl Chair Puzzle Helmet Blender Easel \
Racket Tent Guitar Camera Lamps Mugs Bottles Chairs Synthetic ka lo mi ren to va zu no shi pe ri dan qu sol \
tek mar Ka Lo Mi Ren To Va Zu No Shi Pe Ri Dan Qu Sol Tek Mar movie film drama comedy action thriller romance children animation adventure documentary horror music \
mystery war western fantasy science fiction crime book toy game sport beauty home kitchen clothing shoes \
0 1 2 3 4 5 6 7 8 9 ( ) [ ] { } , . : ; ' \" ! ? - / &";

/// The tiny model's tokenizer: byte-level BPE trained on `CORPUS` (deterministic), plus <s> and </s>.
pub fn tokenizer(vocab: usize) -> Result<tokenizers::Tokenizer, LlmError> {
    let mut tok = byte_level_tokenizer(BPE::default(), &[])?;
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(vocab)
        .min_frequency(1)
        .show_progress(false)
        .initial_alphabet(tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet().into_iter().collect())
        .special_tokens(vec![AddedToken::from(BOS, true), AddedToken::from(EOS, true)])
        .build()
        .into();
    // The corpus is repeated so that frequent words win merges over rare ones.
    let lines: Vec<String> = CORPUS.split(". ").map(|s| format!("{s}. ")).collect();
    tok.train(&mut trainer, lines.iter().cycle().take(lines.len() * 3))
        .map_err(|e| LlmError::Tokenizer(e.to_string()))?;
    Ok(tok)
}

/// Random weights in Hugging Face naming: matrices N(0, 1/fan_in) and embeddings N(0, 1/hidden), unit
/// norms. The 1/fan_in scale keeps every projection's output at the scale of its input, so attention
/// scores vary enough for the trainable inputs to steer them (at GPT-style 0.02 a width-64 model
/// attends uniformly and passes almost nothing from the item tokens to [REC]). Every tensor draws
/// from its own seeded stream, so the model is the same on any machine.
fn weights(cfg: &LlamaConfig, seed: u64) -> candle_core::Result<HashMap<String, Tensor>> {
    cfg.weight_shapes()
        .into_iter()
        .enumerate()
        .map(|(i, (name, shape))| {
            let t = if name.ends_with("norm.weight") {
                Tensor::ones(shape, DType::F32, &Device::Cpu)?
            } else {
                let std = 1.0 / (shape[1] as f64).sqrt();
                normal_tensor(shape, std, &mut stream(seed, "tiny-llm", i as u64), &Device::Cpu)?
            };
            Ok((name, t))
        })
        .collect()
}

pub fn build(cfg: &TinyLlmConfig, dtype: DType, device: &Device) -> Result<Llm, LlmError> {
    let tokenizer = tokenizer(cfg.vocab)?;
    let arch = cfg.architecture(tokenizer.get_vocab_size(true));
    let id = |t: &str| tokenizer.token_to_id(t).ok_or_else(|| LlmError::Tokenizer(format!("no token {t}")));
    let (bos, eos) = (id(BOS)?, id(EOS)?);
    let model = Llama::from_weights(arch.clone(), weights(&arch, cfg.seed)?, dtype, device)?;
    Ok(Llm::new(
        model,
        tokenizer,
        Some(bos),
        eos,
        format!("tiny seed {} ({} layers x {})", cfg.seed, cfg.layers, cfg.hidden),
    ))
}

/// Writes the tiny model as a Hugging Face directory (config.json, model.safetensors, tokenizer.json),
/// which `LlmSource::Hf` loads back: a real checkpoint layout for tests of the loader.
pub fn save_hf_dir(cfg: &TinyLlmConfig, dir: &Path) -> Result<(), LlmError> {
    let err = |e: &dyn std::fmt::Display| LlmError::Load { path: dir.to_path_buf(), reason: e.to_string() };
    std::fs::create_dir_all(dir).map_err(|e| err(&e))?;
    let tokenizer = tokenizer(cfg.vocab)?;
    let arch = cfg.architecture(tokenizer.get_vocab_size(true));
    let mut config = serde_json::to_value(&arch).map_err(|e| err(&e))?;
    config["model_type"] = "llama".into();
    config["bos_token_id"] = tokenizer.token_to_id(BOS).into();
    config["eos_token_id"] = tokenizer.token_to_id(EOS).into();
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&config).map_err(|e| err(&e))?)
        .map_err(|e| err(&e))?;
    candle_core::safetensors::save(&weights(&arch, cfg.seed)?, dir.join("model.safetensors"))?;
    tokenizer.save(dir.join("tokenizer.json"), false).map_err(|e| err(&e))?;
    Ok(())
}
