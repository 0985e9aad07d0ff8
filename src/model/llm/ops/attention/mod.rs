//! Causal self-attention of packed rows as one op with its own backward, on the CPU.
//!
//! The rows of a batch lie one after another along the token dimension with no padding; each may
//! continue a constant prefix (the prompt template's opening) whose keys and values were computed
//! once and are not differentiated. Query `i` of a row sees the whole prefix and the row's keys
//! `0..=i`. Heads share key/value heads in groups (GQA) without the keys being copied per head. The
//! products run through `gemm` on views of the packed buffers; the backward recomputes the
//! probabilities (flash-attention style) instead of keeping them.

#[cfg(target_arch = "x86_64")]
mod bf16;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Storage, Tensor, WithDType};

use super::super::shared::SharedOut;
use super::exp_f32;

/// Attention of `q [heads, tokens, d]` over `k`, `v` `[kv_heads, tokens, d]` for rows of `lens`
/// tokens each (summing to `tokens`), after the optional constant `prefix` keys and values
/// `[kv_heads, p, d]`; scores are scaled by `scale`. Returns `[heads, tokens, d]`, differentiable in
/// `q`, `k` and `v`. With `bf16` (where the CPU has AVX-512 BF16) f32 operands are multiplied in
/// bf16 with f32 sums (`bf16.rs`).
pub fn packed_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    lens: &[usize],
    prefix: Option<(&Tensor, &Tensor)>,
    scale: f64,
    bf16: bool,
) -> candle_core::Result<Tensor> {
    let op = Attention::new(q, k, v, lens, prefix, scale, bf16)?;
    if !q.device().is_cpu() {
        return primitive(q, k, v, lens, op.prefix.as_ref().map(|(a, b)| (a, b)), scale);
    }
    q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

/// The gradients of q, k and v of `packed_attention(q, k, v, ..)` for the upstream gradient `d_out`,
/// on the CPU: the decoder layer's own backward (`layer.rs`) calls it.
#[allow(clippy::too_many_arguments)]
pub fn packed_attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    d_out: &Tensor,
    lens: &[usize],
    prefix: Option<(&Tensor, &Tensor)>,
    scale: f64,
    bf16: bool,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    if !q.device().is_cpu() {
        candle_core::bail!("packed attention: the fused backward runs on the CPU");
    }
    Attention::new(q, k, v, lens, prefix, scale, bf16)?.gradients(q, k, v, d_out)
}

/// The same from candle's primitive ops: per row, keys and values after the prefix, a masked
/// softmax, the weighted sum. The reference of the tests, and the path on other devices.
pub fn primitive(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    lens: &[usize],
    prefix: Option<(&Tensor, &Tensor)>,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let (heads, _, _) = q.dims3()?;
    let rep = heads / k.dim(0)?;
    let expand = |x: &Tensor| -> candle_core::Result<Tensor> {
        let (g, t, d) = x.dims3()?;
        x.unsqueeze(1)?.broadcast_as((g, rep, t, d))?.reshape((g * rep, t, d))
    };
    let p = prefix.map_or(Ok(0), |(pk, _)| pk.dim(1))?;
    let mut out = Vec::new();
    let mut start = 0;
    for &len in lens {
        let (mut kr, mut vr) = (k.narrow(1, start, len)?, v.narrow(1, start, len)?);
        if let Some((pk, pv)) = prefix {
            kr = Tensor::cat(&[pk, &kr], 1)?;
            vr = Tensor::cat(&[pv, &vr], 1)?;
        }
        let (kr, vr) = (expand(&kr)?, expand(&vr)?);
        let scores = (q.narrow(1, start, len)?.matmul(&kr.t()?)? * scale)?;
        let mask: Vec<f32> =
            (0..len * (p + len)).map(|i| if i % (p + len) > p + i / (p + len) { -1e9 } else { 0.0 }).collect();
        let mask = Tensor::from_vec(mask, (len, p + len), q.device())?.to_dtype(q.dtype())?;
        let probs = candle_nn::ops::softmax(&scores.broadcast_add(&mask)?, candle_core::D::Minus1)?;
        out.push(probs.matmul(&vr)?);
        start += len;
    }
    Tensor::cat(&out, 1)
}

struct Attention {
    lens: Vec<usize>,
    prefix: Option<(Tensor, Tensor)>,
    scale: f64,
    heads: usize,
    kv_heads: usize,
    d: usize,
    /// f32 products in bf16 (`bf16.rs`); only set where the CPU has AVX-512 BF16.
    bf16: bool,
}

impl Attention {
    /// Checks the shapes: `q [heads, tokens, d]`, `k` and `v` `[kv_heads, tokens, d]`, rows of `lens`
    /// summing to `tokens`, a prefix of `[kv_heads, p, d]`.
    fn new(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        lens: &[usize],
        prefix: Option<(&Tensor, &Tensor)>,
        scale: f64,
        bf16: bool,
    ) -> candle_core::Result<Self> {
        let (heads, tokens, d) = q.dims3()?;
        let (kv_heads, kt, kd) = k.dims3()?;
        if v.dims() != k.dims() || kt != tokens || kd != d || kv_heads == 0 || heads % kv_heads != 0 {
            candle_core::bail!("packed attention: q {:?}, k {:?}, v {:?}", q.dims(), k.dims(), v.dims());
        }
        if lens.iter().sum::<usize>() != tokens {
            candle_core::bail!("packed attention: rows of {lens:?} tokens for {tokens} tokens");
        }
        let prefix = match prefix {
            Some((pk, pv)) => {
                let (g, _, pd) = pk.dims3()?;
                if pv.dims() != pk.dims() || g != kv_heads || pd != d {
                    candle_core::bail!("packed attention: prefix {:?} / {:?}", pk.dims(), pv.dims());
                }
                Some((pk.contiguous()?, pv.contiguous()?))
            }
            None => None,
        };
        #[cfg(target_arch = "x86_64")]
        let bf16 = bf16 && q.device().is_cpu() && super::super::bf16::available();
        #[cfg(not(target_arch = "x86_64"))]
        let bf16 = false;
        Ok(Attention { lens: lens.to_vec(), prefix, scale, heads, kv_heads, d, bf16 })
    }

    /// The gradients of q, k and v for the upstream gradient `d_out`.
    fn gradients(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        d_out: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let d_out = d_out.contiguous()?;
        let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
        let grads = q.apply_op3_no_bwd(&k, &v, &AttentionGrad { op: self, d_out: &d_out })?;
        let (nq, nk) = (q.elem_count(), k.elem_count());
        Ok((
            grads.narrow(0, 0, nq)?.reshape(q.shape())?,
            grads.narrow(0, nq, nk)?.reshape(k.shape())?,
            grads.narrow(0, nq + nk, nk)?.reshape(v.shape())?,
        ))
    }
}

/// `dst := dst·keep + lhs·rhs` for matrices given by pointer and (row, column) strides.
///
/// # Safety
/// Every pointer must address an `m × k`, `k × n`, `m × n` matrix under its strides.
#[allow(clippy::too_many_arguments)]
unsafe fn mul<T: 'static + float::Float>(
    (m, n, k): (usize, usize, usize),
    dst: *mut T,
    dst_rs: usize,
    keep: bool,
    lhs: (*const T, usize, usize),
    rhs: (*const T, usize, usize),
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        keep,
        lhs.0,
        lhs.2 as isize,
        lhs.1 as isize,
        rhs.0,
        rhs.2 as isize,
        rhs.1 as isize,
        T::one(),
        T::one(),
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

/// What the op needs of the float types it runs in: one (for `gemm`), and a row's softmax.
mod float {
    pub trait Float: Copy {
        fn one() -> Self;
        /// `row[..keep]` := softmax(scale · row[..keep]); `row[keep..]` := 0 (the causal mask).
        fn masked_softmax(row: &mut [Self], keep: usize, scale: f64);
        /// `dp := scale · p ⊙ (dp − Σ_j dp_j p_j)`: the gradient of the scores from that of the
        /// probabilities `p` of one query.
        fn softmax_grad(p: &[Self], dp: &mut [Self], scale: f64);
    }

    /// f64, the tests' type: every step in f64 with the library's `exp`.
    impl Float for f64 {
        fn one() -> Self {
            1.0
        }
        fn masked_softmax(row: &mut [f64], keep: usize, scale: f64) {
            let (head, tail) = row.split_at_mut(keep);
            let m = head.iter().fold(f64::NEG_INFINITY, |m, x| m.max(x * scale));
            let mut sum = 0.0;
            for x in head.iter_mut() {
                *x = (*x * scale - m).exp();
                sum += *x;
            }
            head.iter_mut().for_each(|x| *x /= sum);
            tail.fill(0.0);
        }
        fn softmax_grad(p: &[f64], dp: &mut [f64], scale: f64) {
            let dot: f64 = p.iter().zip(dp.iter()).map(|(a, b)| a * b).sum();
            for (x, pr) in dp.iter_mut().zip(p) {
                *x = scale * pr * (*x - dot);
            }
        }
    }

    /// f32, the model's type: the branch-free `exp` of `ops` (the compiler vectorizes it), and sums
    /// over 8 lanes.
    /// The library's scalar `exp` over every score was a large share of attention's time.
    impl Float for f32 {
        fn one() -> Self {
            1.0
        }
        fn masked_softmax(row: &mut [f32], keep: usize, scale: f64) {
            let scale = scale as f32;
            #[cfg(target_arch = "x86_64")]
            if super::super::avx512::available() {
                // SAFETY: the CPU has AVX-512 F.
                return unsafe { super::super::avx512::masked_softmax(row, keep, scale) };
            }
            let (head, tail) = row.split_at_mut(keep);
            // scale > 0, so the largest scaled score is the largest score, scaled.
            let m = head.iter().fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m }) * scale;
            let mut lanes = [0f32; 8];
            let mut chunks = head.chunks_exact_mut(8);
            for c in &mut chunks {
                for (x, acc) in c.iter_mut().zip(&mut lanes) {
                    *x = super::exp_f32(*x * scale - m);
                    *acc += *x;
                }
            }
            for (x, acc) in chunks.into_remainder().iter_mut().zip(&mut lanes) {
                *x = super::exp_f32(*x * scale - m);
                *acc += *x;
            }
            let inv = 1.0 / lanes.iter().sum::<f32>();
            head.iter_mut().for_each(|x| *x *= inv);
            tail.fill(0.0);
        }
        /// The dot product over 8 lanes in f32 (it ran in f64, one element at a time: a twentieth
        /// of a backward step).
        fn softmax_grad(p: &[f32], dp: &mut [f32], scale: f64) {
            let mut lanes = [0f32; 8];
            let (pc, dc) = (p.chunks_exact(8), dp.chunks_exact(8));
            let rest = pc.remainder().iter().zip(dc.remainder()).map(|(a, b)| a * b).sum::<f32>();
            for (a, b) in pc.zip(dc) {
                for ((acc, a), b) in lanes.iter_mut().zip(a).zip(b) {
                    *acc += a * b;
                }
            }
            let (dot, scale) = (lanes.iter().sum::<f32>() + rest, scale as f32);
            for (x, pr) in dp.iter_mut().zip(p) {
                *x = scale * pr * (*x - dot);
            }
        }
    }
}

/// What the attention probabilities of a (row, head) pair are computed from: the packed queries and
/// keys and the prefix keys.
struct Views<'a, T> {
    q: &'a [T],
    k: &'a [T],
    pk: &'a [T],
    tokens: usize,
    p: usize,
    d: usize,
}

impl<T: WithDType + float::Float> Views<'_, T> {
    /// Scaled, masked softmax probabilities of head `h` (key head `g`) for the row at `start` of
    /// `len` tokens: `len × (p + len)`, row-major.
    fn probabilities(&self, h: usize, g: usize, start: usize, len: usize, scale: f64) -> Vec<T> {
        let (p, d, w) = (self.p, self.d, self.p + len);
        let mut s = vec![T::zero(); len * w];
        let q = self.q[(h * self.tokens + start) * d..].as_ptr();
        let kr = self.k[(g * self.tokens + start) * d..].as_ptr();
        // SAFETY: q holds `len` rows of d from its pointer; the prefix keys p rows, the row's keys
        // len rows; s is len × w and the products fill its left p columns and, for the queries
        // i0..i1, the row's first i1 columns (the rest stay zero and are masked).
        unsafe {
            if p > 0 {
                mul((len, p, d), s.as_mut_ptr(), w, false, (q, d, 1), (self.pk[g * p * d..].as_ptr(), 1, d));
            }
            for (i0, i1) in causal_blocks(len) {
                let (qb, sb) = (q.add(i0 * d), s.as_mut_ptr().add(i0 * w + p));
                mul((i1 - i0, i1, d), sb, w, false, (qb, d, 1), (kr, 1, d));
            }
        }
        for (i, row) in s.chunks_exact_mut(w).enumerate() {
            T::masked_softmax(row, p + i + 1, scale);
        }
        s
    }
}

impl Attention {
    fn p(&self) -> usize {
        self.prefix.as_ref().map_or(0, |(pk, _)| pk.dim(1).unwrap_or(0))
    }

    /// Runs `f` with the prefix keys and values as slices of `T` (empty without a prefix).
    fn with_prefix<T: WithDType, R>(
        &self,
        f: impl FnOnce(&[T], &[T]) -> candle_core::Result<R>,
    ) -> candle_core::Result<R> {
        let Some((pk, pv)) = &self.prefix else { return f(&[], &[]) };
        let (ks, kl) = pk.storage_and_layout();
        let (vs, vl) = pv.storage_and_layout();
        let (Storage::Cpu(ks), Storage::Cpu(vs)) = (&*ks, &*vs) else {
            candle_core::bail!("packed attention: the prefix is not on the CPU")
        };
        let slice = |s: &CpuStorage, l: &Layout| -> candle_core::Result<Vec<T>> {
            let (a, b) =
                l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("prefix not contiguous".into()))?;
            Ok(s.as_slice::<T>()?[a..b].to_vec())
        };
        let (k, v) = (slice(ks, kl)?, slice(vs, vl)?);
        f(&k, &v)
    }

    /// (first token, tokens, head) of every unit of work: a row through `per` heads (one for the
    /// forward, whose heads write apart; a key head's group for the backward, whose heads add into
    /// the same dK and dV). Units write disjoint parts of the outputs, so they may run at once.
    fn units(&self, per: usize) -> Vec<(usize, usize, usize)> {
        let mut out = Vec::new();
        let mut start = 0;
        for &len in &self.lens {
            out.extend((0..self.heads).step_by(per).map(|h| (start, len, h)));
            start += len;
        }
        out
    }

    fn forward<T: WithDType + float::Float>(&self, q: &[T], k: &[T], v: &[T]) -> candle_core::Result<Vec<T>> {
        let (d, rep, tokens) = (self.d, self.heads / self.kv_heads, q.len() / (self.heads * self.d));
        let p = self.p();
        self.with_prefix(|pk: &[T], pv: &[T]| {
            let views = Views { q, k, pk, tokens, p, d };
            let mut out = vec![T::zero(); q.len()];
            let dst = SharedOut::new(&mut out);
            let unit = |(start, len, h): (usize, usize, usize)| {
                let (w, g) = (p + len, h / rep);
                let probs = views.probabilities(h, g, start, len, self.scale);
                // SAFETY: probs is len × w; the prefix values p × d, the row's values len × d;
                // the destination, len rows of d of head h, belongs to this unit alone.
                unsafe {
                    let dst = dst.at((h * tokens + start) * d);
                    if p > 0 {
                        mul((len, d, p), dst, d, false, (probs.as_ptr(), w, 1), (pv[g * p * d..].as_ptr(), d, 1));
                    }
                    let vr = v[(g * tokens + start) * d..].as_ptr();
                    for (i0, i1) in causal_blocks(len) {
                        let pb = (probs.as_ptr().add(i0 * w + p), w, 1);
                        mul((i1 - i0, d, i1), dst.add(i0 * d), d, p > 0, pb, (vr, d, 1));
                    }
                }
            };
            for_each_unit(self.units(1), unit);
            Ok(out)
        })
    }

    /// Gradients of q, k and v, concatenated, from the upstream gradient `go` of the output.
    fn backward<T: WithDType + float::Float>(
        &self,
        q: &[T],
        k: &[T],
        v: &[T],
        go: &[T],
    ) -> candle_core::Result<Vec<T>> {
        let (d, rep, tokens) = (self.d, self.heads / self.kv_heads, q.len() / (self.heads * self.d));
        let p = self.p();
        self.with_prefix(|pk: &[T], pv: &[T]| {
            let views = Views { q, k, pk, tokens, p, d };
            let mut grads = vec![T::zero(); q.len() + k.len() + v.len()];
            let (dq, dk, dv) = (SharedOut::new(&mut grads), q.len(), q.len() + k.len());
            let unit = |(start, len, first): (usize, usize, usize)| {
                let (w, g) = (p + len, first / rep);
                let at = |x: usize| (x * tokens + start) * d;
                for h in g * rep..(g + 1) * rep {
                    let probs = views.probabilities(h, g, start, len, self.scale);
                    let mut dp = vec![T::zero(); len * w];
                    // SAFETY (every product below): the operands are the row's len × d blocks of
                    // q/k/v/go, the p × d prefix blocks and len × w probability buffers; the
                    // destinations, the row's blocks of dq (head h), dk and dv (key head g), belong
                    // to this unit alone.
                    unsafe {
                        // dP = dO · Vᵀ over the prefix and the row's values.
                        let go_h = (go[at(h)..].as_ptr(), d, 1);
                        if p > 0 {
                            mul((len, p, d), dp.as_mut_ptr(), w, false, go_h, (pv[g * p * d..].as_ptr(), 1, d));
                        }
                        for (i0, i1) in causal_blocks(len) {
                            let (gb, db) = ((go_h.0.add(i0 * d), d, 1), dp.as_mut_ptr().add(i0 * w + p));
                            mul((i1 - i0, i1, d), db, w, false, gb, (v[at(g)..].as_ptr(), 1, d));
                        }
                    }
                    // dS, in place in dp.
                    for (prow, drow) in probs.chunks_exact(w).zip(dp.chunks_exact_mut(w)) {
                        T::softmax_grad(prow, drow, self.scale);
                    }
                    unsafe {
                        // dQ = dS · K over the prefix and the row's keys.
                        let dqh = dq.at(at(h));
                        if p > 0 {
                            mul((len, d, p), dqh, d, false, (dp.as_ptr(), w, 1), (pk[g * p * d..].as_ptr(), d, 1));
                        }
                        // dK (row part) += dSᵀ · Q; dV (row part) += Pᵀ · dO: the group's heads and
                        // the query blocks add up (query block i0..i1 reaches keys 0..i1 only).
                        let (dkg, dvg) = (dq.at(dk + at(g)), dq.at(dv + at(g)));
                        for (i0, i1) in causal_blocks(len) {
                            let (ds, pb) = (dp.as_ptr().add(i0 * w + p), probs.as_ptr().add(i0 * w + p));
                            let (qb, gb) = (q[at(h) + i0 * d..].as_ptr(), go[at(h) + i0 * d..].as_ptr());
                            mul((i1 - i0, d, i1), dqh.add(i0 * d), d, p > 0, (ds, w, 1), (k[at(g)..].as_ptr(), d, 1));
                            mul((i1, d, i1 - i0), dkg, d, true, (ds, 1, w), (qb, d, 1));
                            mul((i1, d, i1 - i0), dvg, d, true, (pb, 1, w), (gb, d, 1));
                        }
                    }
                }
            };
            for_each_unit(self.units(rep), unit);
            Ok(grads)
        })
    }
}

/// Query rows per block of the causal products: block i0..i1 of a row's queries sees the row's keys
/// 0..i1 only, so the products skip the masked upper triangle but for one block's width (about half
/// the work of the full square on rows of 500 tokens).
const QUERY_BLOCK: usize = 64;

/// The (first, end) query rows of each block of a row of `len` tokens.
fn causal_blocks(len: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..len).step_by(QUERY_BLOCK).map(move |i0| (i0, (i0 + QUERY_BLOCK).min(len)))
}

/// Runs the units of work, over the thread pool when it has more than one thread.
fn for_each_unit(units: Vec<(usize, usize, usize)>, f: impl Fn((usize, usize, usize)) + Sync + Send) {
    use rayon::prelude::*;
    if rayon::current_num_threads() > 1 && units.len() > 1 {
        units.into_par_iter().for_each(f);
    } else {
        units.into_iter().for_each(f);
    }
}

fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [T]> {
    let (a, b) =
        l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("packed attention: not contiguous".into()))?;
    Ok(&s.as_slice::<T>()?[a..b])
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "packed-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = match s1 {
            #[cfg(target_arch = "x86_64")]
            CpuStorage::F32(_) if self.bf16 => {
                let (q, k, v) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
                CpuStorage::F32(self.with_prefix(|pk: &[f32], pv: &[f32]| Ok(self.forward_bf16(q, k, v, pk, pv)))?)
            }
            CpuStorage::F32(_) => {
                CpuStorage::F32(self.forward::<f32>(slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?)?)
            }
            CpuStorage::F64(_) => {
                CpuStorage::F64(self.forward::<f64>(slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?)?)
            }
            _ => candle_core::bail!("packed attention supports f32 and f64"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dq, dk, dv) = self.gradients(q, k, v, grad_res)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// The backward as an op of q, k and v (the upstream gradient rides along); its output holds the
/// gradients of q, k and v one after the other.
struct AttentionGrad<'a> {
    op: &'a Attention,
    d_out: &'a Tensor,
}

impl CustomOp3 for AttentionGrad<'_> {
    fn name(&self) -> &'static str {
        "packed-attention-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (ds, dl) = self.d_out.storage_and_layout();
        let Storage::Cpu(ds) = &*ds else { candle_core::bail!("packed attention: the gradient is not on the CPU") };
        let out = match s1 {
            #[cfg(target_arch = "x86_64")]
            CpuStorage::F32(_) if self.op.bf16 => {
                let (q, k, v, go) = (slice::<f32>(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?, slice(ds, dl)?);
                CpuStorage::F32(
                    self.op.with_prefix(|pk: &[f32], pv: &[f32]| Ok(self.op.backward_bf16(q, k, v, go, pk, pv)))?,
                )
            }
            CpuStorage::F32(_) => {
                let (q, k, v, go) = (slice::<f32>(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?, slice(ds, dl)?);
                CpuStorage::F32(self.op.backward(q, k, v, go)?)
            }
            CpuStorage::F64(_) => {
                let (q, k, v, go) = (slice::<f64>(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?, slice(ds, dl)?);
                CpuStorage::F64(self.op.backward(q, k, v, go)?)
            }
            _ => candle_core::bail!("packed attention supports f32 and f64"),
        };
        Ok((out, Shape::from(l1.shape().elem_count() + l2.shape().elem_count() + l3.shape().elem_count())))
    }
}

#[cfg(test)]
mod tests {
    use super::super::{max_abs_diff, random_f64};
    use super::*;
    use candle_core::Var;

    /// Forward and every input's gradient against the primitive version, in f64.
    fn check(heads: usize, kv_heads: usize, lens: &[usize], p: usize) {
        let (t, d) = (lens.iter().sum::<usize>(), 6);
        let q = Var::from_tensor(&random_f64(&[heads, t, d], 1)).unwrap();
        let k = Var::from_tensor(&random_f64(&[kv_heads, t, d], 2)).unwrap();
        let v = Var::from_tensor(&random_f64(&[kv_heads, t, d], 3)).unwrap();
        let (pk, pv) = (random_f64(&[kv_heads, p, d], 4), random_f64(&[kv_heads, p, d], 5));
        let prefix = (p > 0).then_some((&pk, &pv));
        let up = random_f64(&[heads, t, d], 6);
        let fused = packed_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), lens, prefix, 0.4, false).unwrap();
        let plain = primitive(q.as_tensor(), k.as_tensor(), v.as_tensor(), lens, prefix, 0.4).unwrap();
        assert!(max_abs_diff(&fused, &plain) < 1e-12, "forward, lens {lens:?}, prefix {p}");
        let g1 = (fused * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (plain * &up).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
            let diff = max_abs_diff(g1.get(x.as_tensor()).unwrap(), g2.get(x.as_tensor()).unwrap());
            assert!(diff < 1e-12, "d{name}: {diff}, lens {lens:?}, prefix {p}");
        }
    }

    #[test]
    fn f32_rows_long_enough_for_the_vector_lanes_and_query_blocks_match_the_primitive_ops() {
        let f32s = |t: Tensor| t.to_dtype(candle_core::DType::F32).unwrap();
        let (lens, p, d) = ([150usize, 20], 11, 8);
        let t = lens.iter().sum::<usize>();
        let q = Var::from_tensor(&f32s(random_f64(&[6, t, d], 7))).unwrap();
        let k = Var::from_tensor(&f32s(random_f64(&[2, t, d], 8))).unwrap();
        let v = Var::from_tensor(&f32s(random_f64(&[2, t, d], 9))).unwrap();
        let (pk, pv) = (f32s(random_f64(&[2, p, d], 10)), f32s(random_f64(&[2, p, d], 11)));
        let up = f32s(random_f64(&[6, t, d], 12));
        let args = (q.as_tensor(), k.as_tensor(), v.as_tensor());
        let fused = packed_attention(args.0, args.1, args.2, &lens, Some((&pk, &pv)), 0.7, false).unwrap();
        let plain = primitive(args.0, args.1, args.2, &lens, Some((&pk, &pv)), 0.7).unwrap();
        let f64s = |t: &Tensor| t.to_dtype(candle_core::DType::F64).unwrap();
        assert!(max_abs_diff(&f64s(&fused), &f64s(&plain)) < 1e-5);
        let g1 = (fused * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (plain * &up).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
            let diff = max_abs_diff(&f64s(g1.get(x.as_tensor()).unwrap()), &f64s(g2.get(x.as_tensor()).unwrap()));
            assert!(diff < 1e-4, "d{name}: {diff}");
        }
    }

    #[test]
    fn matches_the_primitive_ops_with_and_without_a_prefix() {
        check(2, 2, &[5], 0);
        check(6, 2, &[3, 1, 4], 0);
        check(6, 3, &[2, 5], 3);
        check(4, 1, &[1, 1, 6], 2);
        // Rows over one and over two query blocks.
        check(6, 2, &[QUERY_BLOCK + 1, 2 * QUERY_BLOCK + 5, 3], 4);
    }
}
