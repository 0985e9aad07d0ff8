//! Loading a Llama-family model from a Hugging Face directory or a GGUF file.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, Tokenizer};

use super::{Llama, LlamaConfig, Llm, LlmError};

fn load_err(path: &Path, reason: impl std::fmt::Display) -> LlmError {
    LlmError::Load { path: path.to_path_buf(), reason: reason.to_string() }
}

/// `dir/config.json`, `dir/model.safetensors` (or the shards `model.safetensors.index.json` lists) and
/// `dir/tokenizer.json`.
pub fn hf_dir(dir: &Path, dtype: DType, device: &Device) -> Result<Llm, LlmError> {
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path).map_err(|e| load_err(&config_path, e))?;
    let raw: serde_json::Value = serde_json::from_str(&text).map_err(|e| load_err(&config_path, e))?;
    if let Some(kind) = raw.get("model_type").and_then(|v| v.as_str()) {
        if kind != "llama" {
            return Err(load_err(&config_path, format!("model_type `{kind}` is not a Llama-family model")));
        }
    }
    let cfg: LlamaConfig = serde_json::from_value(raw.clone()).map_err(|e| load_err(&config_path, e))?;
    let files = safetensors_files(dir)?;
    // SAFETY: the files are mapped read-only and not modified while the model is loaded.
    let st =
        unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files) }.map_err(|e| load_err(&files[0], e))?;
    let mut weights = HashMap::new();
    for (name, _) in cfg.weight_shapes() {
        let t = st.load(&name, &Device::Cpu).map_err(|_| LlmError::MissingWeight(name.clone()))?;
        weights.insert(name, t);
    }
    let tok_path = dir.join("tokenizer.json");
    let tokenizer = Tokenizer::from_file(&tok_path).map_err(|e| load_err(&tok_path, e))?;
    let id = |key: &str| -> Option<u32> {
        let v = raw.get(key)?;
        v.as_u64().or_else(|| v.as_array()?.first()?.as_u64()).map(|x| x as u32)
    };
    let eos = id("eos_token_id").ok_or_else(|| load_err(&config_path, "no eos_token_id"))?;
    let model = Llama::from_weights(cfg, weights, dtype, device)?;
    let name = format!("hf {}", dir.file_name().map(|n| n.to_string_lossy()).unwrap_or_default());
    Ok(Llm::new(model, tokenizer, id("bos_token_id"), eos, name))
}

fn safetensors_files(dir: &Path) -> Result<Vec<std::path::PathBuf>, LlmError> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index)
        .map_err(|e| load_err(dir, format!("neither model.safetensors nor model.safetensors.index.json: {e}")))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| load_err(&index, e))?;
    let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| load_err(&index, "no weight_map"))?;
    let mut files: Vec<String> = map.values().filter_map(|f| f.as_str().map(str::to_string)).collect();
    files.sort();
    files.dedup();
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

/// GGUF tensor names -> Hugging Face names.
fn hf_name(gguf: &str) -> Option<String> {
    let direct = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(n) = direct {
        return Some(n.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let part = match part {
        "attn_norm.weight" => "input_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{part}"))
}

/// A `llama`-architecture GGUF file, dequantized.
pub fn gguf(path: &Path, dtype: DType, device: &Device) -> Result<Llm, LlmError> {
    let mut file = std::fs::File::open(path).map_err(|e| load_err(path, e))?;
    let content = gguf_file::Content::read(&mut file).map_err(|e| load_err(path, e))?;
    let meta = |key: &str| content.metadata.get(key).ok_or_else(|| load_err(path, format!("no metadata `{key}`")));
    let arch = meta("general.architecture")?.to_string().map_err(|e| load_err(path, e))?.clone();
    if arch != "llama" {
        return Err(load_err(path, format!("architecture `{arch}` is not `llama`")));
    }
    let usize_of = |key: &str| -> Result<usize, LlmError> {
        meta(key)?.to_u32().map(|v| v as usize).map_err(|e| load_err(path, format!("{key}: {e}")))
    };
    let f64_of = |key: &str, default: f64| -> Result<f64, LlmError> {
        match content.metadata.get(key) {
            None => Ok(default),
            Some(v) => v.to_f32().map(f64::from).map_err(|e| load_err(path, format!("{key}: {e}"))),
        }
    };
    let tokens = string_array(&content, "tokenizer.ggml.tokens", path)?;
    let cfg = LlamaConfig {
        hidden_size: usize_of("llama.embedding_length")?,
        intermediate_size: usize_of("llama.feed_forward_length")?,
        num_hidden_layers: usize_of("llama.block_count")?,
        num_attention_heads: usize_of("llama.attention.head_count")?,
        num_key_value_heads: Some(usize_of("llama.attention.head_count_kv")?),
        vocab_size: tokens.len(),
        rms_norm_eps: f64_of("llama.attention.layer_norm_rms_epsilon", 1e-5)?,
        rope_theta: f64_of("llama.rope.freq_base", 10_000.0)?,
        max_position_embeddings: usize_of("llama.context_length")?,
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        rope_interleaved: true,
    };
    let mut weights: HashMap<String, Tensor> = HashMap::new();
    let names: Vec<String> = content.tensor_infos.keys().cloned().collect();
    for name in names {
        let Some(hf) = hf_name(&name) else { continue };
        let q = content.tensor(&mut file, &name, &Device::Cpu).map_err(|e| load_err(path, format!("{name}: {e}")))?;
        weights.insert(hf, q.dequantize(&Device::Cpu)?);
    }
    let tokenizer = gguf_tokenizer(&content, &tokens, path)?;
    let bos = content.metadata.get("tokenizer.ggml.bos_token_id").and_then(|v| v.to_u32().ok());
    let eos = meta("tokenizer.ggml.eos_token_id")?.to_u32().map_err(|e| load_err(path, e))?;
    let model = Llama::from_weights(cfg, weights, dtype, device)?;
    let name = format!("gguf {}", path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default());
    Ok(Llm::new(model, tokenizer, bos, eos, name))
}

fn string_array(content: &gguf_file::Content, key: &str, path: &Path) -> Result<Vec<String>, LlmError> {
    let v = content.metadata.get(key).ok_or_else(|| load_err(path, format!("no metadata `{key}`")))?;
    let arr = v.to_vec().map_err(|e| load_err(path, format!("{key}: {e}")))?;
    arr.iter().map(|x| x.to_string().cloned().map_err(|e| load_err(path, format!("{key}: {e}")))).collect()
}

/// A byte-level BPE tokenizer from the GGUF vocabulary and merges (`tokenizer.ggml.model = gpt2`).
/// candle's built-in GGUF tokenizer adds a prefix space, which is wrong for these models.
fn gguf_tokenizer(content: &gguf_file::Content, tokens: &[String], path: &Path) -> Result<Tokenizer, LlmError> {
    let model = content.metadata.get("tokenizer.ggml.model").and_then(|v| v.to_string().ok()).cloned();
    if model.as_deref() != Some("gpt2") {
        return Err(load_err(path, format!("tokenizer model {model:?} is not supported (only gpt2 byte-level BPE)")));
    }
    let merges: Vec<(String, String)> = string_array(content, "tokenizer.ggml.merges", path)?
        .into_iter()
        .map(|m| m.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())))
        .collect::<Option<_>>()
        .ok_or_else(|| load_err(path, "a merge is not `a b`"))?;
    let vocab: tokenizers::models::bpe::Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let bpe = BPE::builder().vocab_and_merges(vocab, merges).build().map_err(|e| load_err(path, e))?;
    let types: Vec<i64> = match content.metadata.get("tokenizer.ggml.token_type") {
        Some(v) => v
            .to_vec()
            .map_err(|e| load_err(path, e))?
            .iter()
            .map(|x| x.to_i32().map(i64::from).map_err(|e| load_err(path, e)))
            .collect::<Result<_, _>>()?,
        None => Vec::new(),
    };
    // Token type 3 marks control tokens (<|im_start|>, ...): matched whole, never split.
    let specials: Vec<String> =
        types.iter().zip(tokens).filter(|(t, _)| **t == 3).map(|(_, tok)| tok.clone()).collect();
    byte_level_tokenizer(bpe, &specials)
}

/// The byte-level pipeline Llama-family BPE tokenizers use: digits split one by one, byte-level
/// pre-tokenization without a prefix space, byte-level decoding; `specials` are matched whole.
pub fn byte_level_tokenizer(bpe: BPE, specials: &[String]) -> Result<Tokenizer, LlmError> {
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
        PreTokenizerWrapper::Digits(Digits::new(true)),
        PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
    ])));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    tokenizer
        .add_special_tokens(specials.iter().map(|s| AddedToken::from(s.clone(), true)))
        .map_err(|e| LlmError::Tokenizer(e.to_string()))?;
    Ok(tokenizer)
}
