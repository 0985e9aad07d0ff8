//! A Llama-family decoder whose forward takes input embeddings and returns the final-normed hidden
//! states, differentiable end to end with respect to those embeddings. The weights are plain tensors:
//! never updated, and no gradient is computed for them (see `frozen.rs`).
//!
//! RMS norm, RoPE and the causal softmax are this crate's own fused ops with backward passes (`ops/`):
//! candle's fused versions have none (docs/candle.md), so the gradient would silently stop there.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::frozen::FrozenLinear;
use super::ops::{causal_softmax, rms_norm, rope};
use super::LlmError;

/// Architecture of a Llama-family checkpoint (the fields of a Hugging Face `config.json` that matter).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    pub vocab_size: usize,
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// GGUF files store q/k permuted for the interleaved RoPE variant; Hugging Face weights use the
    /// half-split variant. Set by the loader, not read from config.json.
    #[serde(default, skip_serializing)]
    pub rope_interleaved: bool,
}

fn default_rms_eps() -> f64 {
    1e-5
}
fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_max_positions() -> usize {
    2048
}

impl LlamaConfig {
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    pub fn check(&self) -> Result<(), String> {
        let h = self.num_attention_heads;
        if h == 0 || self.hidden_size % h != 0 || self.head_dim() % 2 != 0 {
            return Err(format!("hidden_size {} must split into {h} heads of an even size", self.hidden_size));
        }
        if self.kv_heads() == 0 || h % self.kv_heads() != 0 {
            return Err(format!(
                "num_attention_heads {h} must be a multiple of num_key_value_heads {}",
                self.kv_heads()
            ));
        }
        if self.num_hidden_layers == 0 || self.vocab_size == 0 || self.intermediate_size == 0 {
            return Err("num_hidden_layers, vocab_size and intermediate_size must be positive".into());
        }
        Ok(())
    }

    /// Names and shapes of every weight, in Hugging Face naming (`lm_head.weight` only when untied).
    pub fn weight_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i, v, kv) =
            (self.hidden_size, self.intermediate_size, self.vocab_size, self.kv_heads() * self.head_dim());
        let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
        for l in 0..self.num_hidden_layers {
            let p = format!("model.layers.{l}");
            out.push((format!("{p}.input_layernorm.weight"), vec![h]));
            out.push((format!("{p}.self_attn.q_proj.weight"), vec![h, h]));
            out.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h]));
            out.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, h]));
            out.push((format!("{p}.self_attn.o_proj.weight"), vec![h, h]));
            out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
            out.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
            out.push((format!("{p}.mlp.up_proj.weight"), vec![i, h]));
            out.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
        }
        out.push(("model.norm.weight".to_string(), vec![h]));
        if !self.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), vec![v, h]));
        }
        out
    }
}

pub(super) struct Block {
    pub(super) attn_norm: Tensor,
    pub(super) q: FrozenLinear,
    pub(super) k: FrozenLinear,
    pub(super) v: FrozenLinear,
    pub(super) o: FrozenLinear,
    pub(super) mlp_norm: Tensor,
    pub(super) gate: FrozenLinear,
    pub(super) up: FrozenLinear,
    pub(super) down: FrozenLinear,
}

/// The decoder's weights and precomputed RoPE tables.
pub struct Llama {
    pub cfg: LlamaConfig,
    embed: Tensor,
    pub(super) blocks: Vec<Block>,
    pub(super) norm: Tensor,
    pub(super) lm_head: FrozenLinear,
    pub(super) cos: Tensor,
    pub(super) sin: Tensor,
    device: Device,
    dtype: DType,
}

impl Llama {
    /// Builds the decoder from weights in Hugging Face naming, converted to `dtype`.
    pub fn from_weights(
        cfg: LlamaConfig,
        mut weights: HashMap<String, Tensor>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, LlmError> {
        cfg.check().map_err(LlmError::Config)?;
        for (name, shape) in cfg.weight_shapes() {
            match weights.get(&name) {
                None => return Err(LlmError::MissingWeight(name)),
                Some(t) if t.dims() != shape.as_slice() => {
                    return Err(LlmError::WeightShape { name, found: t.dims().to_vec(), expected: shape })
                }
                Some(_) => {}
            }
        }
        let mut take = |name: &str| -> Result<Tensor, LlmError> {
            let t = weights.remove(name).ok_or_else(|| LlmError::MissingWeight(name.to_string()))?;
            Ok(t.to_device(device)?.to_dtype(dtype)?)
        };
        let embed = take("model.embed_tokens.weight")?;
        let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let mut lin = |n: &str| take(&format!("{p}.{n}.weight")).map(FrozenLinear::new);
            blocks.push(Block {
                attn_norm: lin("input_layernorm")?.weight().clone(),
                q: lin("self_attn.q_proj")?,
                k: lin("self_attn.k_proj")?,
                v: lin("self_attn.v_proj")?,
                o: lin("self_attn.o_proj")?,
                mlp_norm: lin("post_attention_layernorm")?.weight().clone(),
                gate: lin("mlp.gate_proj")?,
                up: lin("mlp.up_proj")?,
                down: lin("mlp.down_proj")?,
            });
        }
        let norm = take("model.norm.weight")?;
        let lm_head = if cfg.tie_word_embeddings { embed.clone() } else { take("lm_head.weight")? };
        let (cos, sin) = rope_tables(&cfg, dtype, device)?;
        Ok(Self {
            cfg,
            embed,
            blocks,
            norm,
            lm_head: FrozenLinear::new(lm_head),
            cos,
            sin,
            device: device.clone(),
            dtype,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The input-embedding matrix `[vocab, hidden]`.
    pub fn embedding_matrix(&self) -> &Tensor {
        &self.embed
    }

    /// Embeddings of token ids `[rows, len]` -> `[rows, len, hidden]`.
    pub fn embed(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        embed_with(&self.embed, ids)
    }

    /// Final-normed hidden states `[b, t, hidden]` for input embeddings `[b, t, hidden]`, with causal
    /// attention from position 0. Right-padded rows need no mask: a real token only sees earlier
    /// positions, which are real too.
    pub fn forward_embeds(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.cfg.num_attention_heads, self.cfg.kv_heads(), self.cfg.head_dim());
        if t > self.cfg.max_position_embeddings {
            candle_core::bail!(
                "a prompt of {t} tokens is longer than the model's {} positions",
                self.cfg.max_position_embeddings
            );
        }
        let (cos, sin) = (self.cos.narrow(0, 0, t)?, self.sin.narrow(0, 0, t)?);
        let scale = 1.0 / (hd as f64).sqrt();
        let mut x = x.clone();
        for blk in &self.blocks {
            let h = rms_norm(&x, &blk.attn_norm, self.cfg.rms_norm_eps)?;
            let heads = |lin: &FrozenLinear, n: usize| -> candle_core::Result<Tensor> {
                lin.forward(&h)?.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()
            };
            let (q, k, v) = (heads(&blk.q, nh)?, heads(&blk.k, nkv)?, heads(&blk.v, nkv)?);
            let interleaved = self.cfg.rope_interleaved;
            let (q, k) = (rope(&q, &cos, &sin, interleaved)?, rope(&k, &cos, &sin, interleaved)?);
            let (k, v) = (repeat_kv(&k, nh / nkv)?, repeat_kv(&v, nh / nkv)?);
            let probs = causal_softmax(&q.matmul(&k.t()?)?, scale)?;
            let ctx = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, nh * hd))?;
            x = (x + blk.o.forward(&ctx)?)?;
            let h = rms_norm(&x, &blk.mlp_norm, self.cfg.rms_norm_eps)?;
            let act = (candle_nn::ops::silu(&blk.gate.forward(&h)?)? * blk.up.forward(&h)?)?;
            x = (x + blk.down.forward(&act)?)?;
        }
        rms_norm(&x, &self.norm, self.cfg.rms_norm_eps)
    }

    /// Vocabulary logits `[.., vocab]` of final hidden states `[.., hidden]`: apply it only to the
    /// positions a loss needs.
    pub fn logits(&self, hidden: &Tensor) -> candle_core::Result<Tensor> {
        self.lm_head.forward(hidden)
    }
}

/// Row lookup in an embedding matrix that may be a trainable variable (then the lookup is
/// differentiable) or a frozen tensor.
pub fn embed_with(matrix: &Tensor, ids: &Tensor) -> candle_core::Result<Tensor> {
    let (rows, len) = ids.dims2()?;
    matrix.index_select(&ids.flatten_all()?, 0)?.reshape((rows, len, matrix.dim(1)?))
}

fn repeat_kv(x: &Tensor, n_rep: usize) -> candle_core::Result<Tensor> {
    if n_rep == 1 {
        return Ok(x.clone());
    }
    let (b, nkv, t, hd) = x.dims4()?;
    x.unsqueeze(2)?.broadcast_as((b, nkv, n_rep, t, hd))?.reshape((b, nkv * n_rep, t, hd))
}

fn rope_tables(cfg: &LlamaConfig, dtype: DType, device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
    let half = cfg.head_dim() / 2;
    let inv: Vec<f64> = (0..half).map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / cfg.head_dim() as f64)).collect();
    let n = cfg.max_position_embeddings;
    let angles: Vec<f64> = (0..n).flat_map(|p| inv.iter().map(move |f| p as f64 * f)).collect();
    let cos: Vec<f64> = angles.iter().map(|a| a.cos()).collect();
    let sin: Vec<f64> = angles.iter().map(|a| a.sin()).collect();
    Ok((
        Tensor::from_vec(cos, (n, half), device)?.to_dtype(dtype)?,
        Tensor::from_vec(sin, (n, half), device)?.to_dtype(dtype)?,
    ))
}
