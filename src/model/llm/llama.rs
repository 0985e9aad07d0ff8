//! A Llama-family decoder whose forward takes input embeddings and returns the final-normed hidden
//! states, differentiable end to end with respect to those embeddings. The weights are plain tensors:
//! never updated, and no gradient is computed for them (see `frozen.rs`).
//!
//! RMS norm, RoPE, attention and the MLP's gate are this crate's own fused ops with backward passes
//! (`ops/`): candle's fused versions have none (docs/candle.md), so the gradient would silently stop
//! there.
//!
//! A batch is packed: its prompts lie one after another along the token dimension, without padding,
//! and may all continue one constant prefix (the template's opening words) whose keys and values are
//! computed once (`prefix_cache`) and never differentiated.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::frozen::FrozenLinear;
use super::layer::{self, Block, Context, Heads};
use super::ops::{fused, packed_attention, rms_norm, silu_mul};
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
        if h == 0 || !self.hidden_size.is_multiple_of(h) || !self.head_dim().is_multiple_of(2) {
            return Err(format!("hidden_size {} must split into {h} heads of an even size", self.hidden_size));
        }
        if self.kv_heads() == 0 || !h.is_multiple_of(self.kv_heads()) {
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

/// The decoder's weights and precomputed RoPE tables.
pub struct Llama {
    pub cfg: LlamaConfig,
    embed: Tensor,
    blocks: Vec<Block>,
    pub(super) norm: Tensor,
    pub(super) lm_head: FrozenLinear,
    cos: Tensor,
    sin: Tensor,
    device: Device,
    dtype: DType,
    /// Whether the products (the weights' and the attention's) run in bf16 (`use_bf16_matmuls`).
    pub(super) bf16: bool,
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
            let mut w = |n: &str| take(&format!("{p}.{n}.weight"));
            let attn_norm = w("input_layernorm")?;
            let mlp_norm = w("post_attention_layernorm")?;
            let mut lin = |n: &str| w(n).map(FrozenLinear::new);
            blocks.push(Block {
                attn_norm,
                q: lin("self_attn.q_proj")?,
                k: lin("self_attn.k_proj")?,
                v: lin("self_attn.v_proj")?,
                o: lin("self_attn.o_proj")?,
                mlp_norm,
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
            bf16: false,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Puts every frozen product (the layers' and the LM head's) on bf16 panels where the CPU can
    /// (`frozen.rs`), and the attention's products in bf16 too; whether it could.
    pub fn use_bf16_matmuls(&mut self) -> candle_core::Result<bool> {
        let mut all = self.lm_head.pack_bf16()?;
        for b in &mut self.blocks {
            for lin in [&mut b.q, &mut b.k, &mut b.v, &mut b.o, &mut b.gate, &mut b.up, &mut b.down] {
                all &= lin.pack_bf16()?;
            }
        }
        self.bf16 = all;
        Ok(all)
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

    /// Final-normed hidden states `[b, t, hidden]` for input embeddings `[b, t, hidden]`: `b` rows of
    /// `t` tokens each, causal attention from position 0.
    pub fn forward_embeds(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, h) = x.dims3()?;
        self.forward_packed(&x.reshape((b * t, h))?, &vec![t; b], None)?.reshape((b, t, h))
    }

    /// Final-normed hidden states `[tokens, hidden]` of packed rows: row r is the next `lens[r]`
    /// input embeddings of `x [tokens, hidden]`, with causal attention within the row and to the
    /// whole `prefix` it continues (its positions start after the prefix).
    pub fn forward_packed(
        &self,
        x: &Tensor,
        lens: &[usize],
        prefix: Option<&PrefixCache>,
    ) -> candle_core::Result<Tensor> {
        let x = self.layers(x, lens, prefix, None)?;
        rms_norm(&x, &self.norm, self.cfg.rms_norm_eps)
    }

    /// The keys and values every layer computes for a constant prefix `[p, hidden]` of input
    /// embeddings (no gradient flows into them).
    pub fn prefix_cache(&self, x: &Tensor) -> candle_core::Result<PrefixCache> {
        let p = x.dim(0)?;
        let mut kv = (Vec::with_capacity(self.blocks.len()), Vec::with_capacity(self.blocks.len()));
        self.layers(&x.detach(), &[p], None, Some(&mut kv))?;
        Ok(PrefixCache { len: p, k: kv.0, v: kv.1 })
    }

    /// The decoder blocks over packed rows (before the final norm); the keys (after RoPE) and values
    /// of every layer go to `collect` when it is given.
    fn layers(
        &self,
        x: &Tensor,
        lens: &[usize],
        prefix: Option<&PrefixCache>,
        collect: Option<&mut (Vec<Tensor>, Vec<Tensor>)>,
    ) -> candle_core::Result<Tensor> {
        let positions = self.positions(x.dim(0)?, lens, prefix)?;
        if collect.is_none() && fused(x) {
            self.fused_layers(x, positions, lens, prefix)
        } else {
            self.graph_layers(x, positions, lens, prefix, collect)
        }
    }

    /// Each token's position: the prefix's length plus its place in its row.
    pub(super) fn positions(
        &self,
        tokens: usize,
        lens: &[usize],
        prefix: Option<&PrefixCache>,
    ) -> candle_core::Result<Vec<u32>> {
        let p = prefix.map_or(0, |c| c.len);
        let longest = p + lens.iter().copied().max().unwrap_or(0);
        if longest > self.cfg.max_position_embeddings {
            candle_core::bail!(
                "a prompt of {longest} tokens is longer than the model's {} positions",
                self.cfg.max_position_embeddings
            );
        }
        let positions: Vec<u32> = lens.iter().flat_map(|&n| (p..p + n).map(|i| i as u32)).collect();
        if positions.len() != tokens {
            candle_core::bail!("rows of {lens:?} tokens for {tokens} input embeddings");
        }
        Ok(positions)
    }

    fn attention_scale(&self) -> f64 {
        1.0 / (self.cfg.head_dim() as f64).sqrt()
    }

    /// `layers` with every op a node of the autograd graph: other devices and dtypes, and the prefix
    /// cache's keys and values.
    pub(super) fn graph_layers(
        &self,
        x: &Tensor,
        positions: Vec<u32>,
        lens: &[usize],
        prefix: Option<&PrefixCache>,
        mut collect: Option<&mut (Vec<Tensor>, Vec<Tensor>)>,
    ) -> candle_core::Result<Tensor> {
        let scale = self.attention_scale();
        self.blocks_with(x, positions, |layer, q, k, v| {
            let cached = prefix.map(|c| (&c.k[layer], &c.v[layer]));
            let ctx = packed_attention(&q, &k, &v, lens, cached, scale, self.bf16)?;
            if let Some((ks, vs)) = collect.as_deref_mut() {
                ks.push(k);
                vs.push(v);
            }
            Ok(ctx)
        })
    }

    /// `layers` on the CPU with each layer one node of the autograd graph (`layer.rs`).
    pub(super) fn fused_layers(
        &self,
        x: &Tensor,
        positions: Vec<u32>,
        lens: &[usize],
        prefix: Option<&PrefixCache>,
    ) -> candle_core::Result<Tensor> {
        let cx = std::sync::Arc::new(Context {
            heads: self.heads_at(positions)?,
            eps: self.cfg.rms_norm_eps,
            lens: lens.to_vec(),
            scale: self.attention_scale(),
            bf16: self.bf16,
        });
        let mut x = x.clone();
        for (l, blk) in self.blocks.iter().enumerate() {
            x = layer::forward(blk, &x, &cx, prefix.map(|c| (&c.k[l], &c.v[l])))?;
        }
        Ok(x)
    }

    /// The head shapes and RoPE rows of tokens at `positions`.
    fn heads_at(&self, positions: Vec<u32>) -> candle_core::Result<Heads> {
        let tokens = positions.len();
        let at = Tensor::from_vec(positions, tokens, &self.device)?;
        Ok(Heads {
            heads: self.cfg.num_attention_heads,
            kv_heads: self.cfg.kv_heads(),
            head_dim: self.cfg.head_dim(),
            cos: self.cos.index_select(&at, 0)?,
            sin: self.sin.index_select(&at, 0)?,
            interleaved: self.cfg.rope_interleaved,
        })
    }

    /// The decoder blocks (before the final norm) over `x [tokens, hidden]`, token i at
    /// `positions[i]`, with attention left to `attend(layer, q, k, v)`: queries `[heads, tokens,
    /// head_dim]`, keys and values `[kv_heads, tokens, head_dim]` (queries and keys after RoPE) in,
    /// the attention output `[heads, tokens, head_dim]` out. The training forward attends over packed
    /// rows, generation over a key/value cache (`cache.rs`).
    pub(super) fn blocks_with(
        &self,
        x: &Tensor,
        positions: Vec<u32>,
        mut attend: impl FnMut(usize, Tensor, Tensor, Tensor) -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<Tensor> {
        let hd = self.heads_at(positions)?;
        let eps = self.cfg.rms_norm_eps;
        let mut x = x.clone();
        for (layer, blk) in self.blocks.iter().enumerate() {
            let h = rms_norm(&x, &blk.attn_norm, eps)?;
            let q = hd.split(&blk.q.forward(&h)?, hd.heads, true)?;
            let (k, v) =
                (hd.split(&blk.k.forward(&h)?, hd.kv_heads, true)?, hd.split(&blk.v.forward(&h)?, hd.kv_heads, false)?);
            let ctx = attend(layer, q, k, v)?;
            x = (x + blk.o.forward(&Heads::merge(&ctx)?)?)?;
            let h = rms_norm(&x, &blk.mlp_norm, eps)?;
            x = (x + blk.down.forward(&silu_mul(&blk.gate.forward(&h)?, &blk.up.forward(&h)?)?)?)?;
        }
        Ok(x)
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

/// The keys (after RoPE) and values `[kv_heads, len, head_dim]` of a constant prompt prefix at every
/// layer: what rows continuing it attend to.
pub struct PrefixCache {
    pub len: usize,
    k: Vec<Tensor>,
    v: Vec<Tensor>,
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
