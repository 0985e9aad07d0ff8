//! A decoder layer as one node of candle's autograd graph, with its backward written by hand.
//!
//! Built op by op, a layer is about 25 graph nodes, and candle's backward gives each node's input
//! gradient a fresh zero tensor to add into, copies the gradient of every reshape and transpose, and
//! keeps every intermediate alive until the graph is dropped: on one thread (perf, 2 rows of 537
//! tokens) the zeroing and candle's adds alone were 13% of a step, all of it on one thread.
//! Here the forward runs the same ops on detached tensors and keeps only what the backward reads
//! (queries and keys after RoPE, values, the residual stream between attention and MLP, the MLP's
//! gate and up products); the backward chains the ops' own backward kernels. The weights are frozen,
//! so the input's is the only gradient.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use super::frozen::FrozenLinear;
use super::ops::{
    add, add_storage, packed_attention, packed_attention_backward, rms_norm, rms_norm_backward, rope, rope_backward,
    silu_mul, silu_mul_backward,
};

/// One decoder layer's frozen weights.
#[derive(Clone)]
pub(super) struct Block {
    pub attn_norm: Tensor,
    pub q: FrozenLinear,
    pub k: FrozenLinear,
    pub v: FrozenLinear,
    pub o: FrozenLinear,
    pub mlp_norm: Tensor,
    pub gate: FrozenLinear,
    pub up: FrozenLinear,
    pub down: FrozenLinear,
}

/// How a layer's projections become heads: the shapes, and each token's RoPE table rows.
pub(super) struct Heads {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// cos and sin `[tokens, head_dim / 2]` at each token's position.
    pub cos: Tensor,
    pub sin: Tensor,
    pub interleaved: bool,
}

impl Heads {
    /// `y [tokens, n * head_dim]` -> `[n, tokens, head_dim]`, rotated by position when `rotate`.
    pub fn split(&self, y: &Tensor, n: usize, rotate: bool) -> candle_core::Result<Tensor> {
        let tokens = y.dim(0)?;
        let y = y.reshape((tokens, n, self.head_dim))?.transpose(0, 1)?.contiguous()?;
        if rotate {
            rope(&y.unsqueeze(0)?, &self.cos, &self.sin, self.interleaved)?.squeeze(0)
        } else {
            Ok(y)
        }
    }

    /// `y [n, tokens, head_dim]` -> `[tokens, n * head_dim]`.
    pub fn merge(y: &Tensor) -> candle_core::Result<Tensor> {
        let (n, tokens, d) = y.dims3()?;
        y.transpose(0, 1)?.reshape((tokens, n * d))
    }

    /// The gradient of `split`'s input for the gradient `dy` of its output.
    fn split_backward(&self, dy: &Tensor, rotate: bool) -> candle_core::Result<Tensor> {
        if rotate {
            Self::merge(&rope_backward(&dy.unsqueeze(0)?, &self.cos, &self.sin, self.interleaved)?.squeeze(0)?)
        } else {
            Self::merge(dy)
        }
    }
}

/// What every layer of one training forward shares besides the weights.
pub(super) struct Context {
    pub heads: Heads,
    pub eps: f64,
    /// The packed rows' lengths, the attention's scale, and whether its products run in bf16.
    pub lens: Vec<usize>,
    pub scale: f64,
    pub bf16: bool,
}

/// The layer `block` over `x [tokens, hidden]` (packed rows after the optional constant `prefix`
/// keys and values of this layer); differentiable in `x` when `x` is tracked. CPU, f32 or f64.
pub(super) fn forward(
    block: &Block,
    x: &Tensor,
    cx: &Arc<Context>,
    prefix: Option<(&Tensor, &Tensor)>,
) -> candle_core::Result<Tensor> {
    let input = x.detach();
    let h = rms_norm(&input, &block.attn_norm, cx.eps)?;
    let hd = &cx.heads;
    let q = hd.split(&block.q.forward(&h)?, hd.heads, true)?;
    let k = hd.split(&block.k.forward(&h)?, hd.kv_heads, true)?;
    let v = hd.split(&block.v.forward(&h)?, hd.kv_heads, false)?;
    let ctx = packed_attention(&q, &k, &v, &cx.lens, prefix, cx.scale, cx.bf16)?;
    let mid = add(&input, &block.o.forward(&Heads::merge(&ctx)?)?)?;
    let h = rms_norm(&mid, &block.mlp_norm, cx.eps)?;
    let (gate, up) = (block.gate.forward(&h)?, block.up.forward(&h)?);
    let mlp = block.down.forward(&silu_mul(&gate, &up)?)?;
    let saved = x.track_op().then(|| Saved { q, k, v, mid: mid.clone(), gate, up });
    x.apply_op1(Layer {
        block: block.clone(),
        cx: cx.clone(),
        prefix: prefix.map(|(k, v)| (k.clone(), v.clone())),
        sum: Mutex::new(Some((mid, mlp))),
        saved: Mutex::new(saved),
    })
}

/// What the backward reads of the forward.
struct Saved {
    /// Queries and keys after RoPE, values: `[heads or kv_heads, tokens, head_dim]`.
    q: Tensor,
    k: Tensor,
    v: Tensor,
    /// The residual stream after attention (the MLP's norm reads it).
    mid: Tensor,
    /// The MLP's gate and up products `[tokens, intermediate]`.
    gate: Tensor,
    up: Tensor,
}

/// The graph node. Its output, the residual stream after attention plus the MLP's output, is
/// computed when the node is made (`forward`); the backward takes what was saved, so it runs once.
struct Layer {
    block: Block,
    cx: Arc<Context>,
    prefix: Option<(Tensor, Tensor)>,
    sum: Mutex<Option<(Tensor, Tensor)>>,
    saved: Mutex<Option<Saved>>,
}

fn taken<T>(slot: &Mutex<Option<T>>, what: &str) -> candle_core::Result<T> {
    let taken = slot.lock().map_err(|_| candle_core::Error::Msg("decoder layer: a poisoned lock".into()))?.take();
    taken.ok_or_else(|| candle_core::Error::Msg(format!("decoder layer: {what}")))
}

impl CustomOp1 for Layer {
    fn name(&self) -> &'static str {
        "decoder-layer"
    }

    fn cpu_fwd(&self, _x: &CpuStorage, _layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (mid, mlp) = taken(&self.sum, "the output was already assembled")?;
        add_storage(&mid, &mlp)
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let s = taken(&self.saved, "no saved activations (backward twice, or the input was not tracked)")?;
        let (b, cx) = (&self.block, &self.cx);
        // MLP: out = mid + down(silu(gate(h)) * up(h)), h = norm(mid).
        let (d_gate, d_up) = silu_mul_backward(&s.gate, &s.up, &b.down.backward(dy)?)?;
        let dh = add(&b.gate.backward(&d_gate)?, &b.up.backward(&d_up)?)?;
        let d_mid = add(dy, &rms_norm_backward(&s.mid, &b.mlp_norm, cx.eps, &dh)?)?;
        // Attention: mid = x + o(attention(q(h), k(h), v(h))), h = norm(x).
        let hd = &cx.heads;
        let d_ctx = hd.split(&b.o.backward(&d_mid)?, hd.heads, false)?;
        let prefix = self.prefix.as_ref().map(|(k, v)| (k, v));
        let (dq, dk, dv) = packed_attention_backward(&s.q, &s.k, &s.v, &d_ctx, &cx.lens, prefix, cx.scale, cx.bf16)?;
        let dh = add(
            &add(&b.q.backward(&hd.split_backward(&dq, true)?)?, &b.k.backward(&hd.split_backward(&dk, true)?)?)?,
            &b.v.backward(&hd.split_backward(&dv, false)?)?,
        )?;
        Ok(Some(add(&d_mid, &rms_norm_backward(x, &b.attn_norm, cx.eps, &dh)?)?))
    }
}
