//! The attention's products in bf16 with f32 sums (`model.llm_matmul: bf16`), as the frozen
//! weights' products run: the operands (queries, keys, values, probabilities and their gradients)
//! are rounded to bf16 per product, the scores, the softmax and every sum stay f32. The f32 products
//! through `gemm` were a sixth of a bf16 step on 2 x 537 tokens; `vdpbf16ps` does twice the work per
//! instruction on 16 lanes where `gemm`'s kernels use 8.
//!
//! Same units of work, causal blocks and recomputing backward as the f32 path (`mod.rs`); the
//! prefix keys and values are the first `p` of the row's keys and values (one product over both).
//! For dK and dV the products run transposed (dKᵀ = Qᵀ · dS, dVᵀ = dOᵀ · P) by key blocks, so that
//! their operands are packed from rows rather than transposed element by element.

use super::super::super::bf16::{column_pairs, product, row_pairs, Panels};
use super::super::super::shared::SharedOut;
use super::float::Float;
use super::{causal_blocks, for_each_unit, Attention};

/// A row's keys or values after the prefix's: `w = p + len` rows of `d`.
struct Rows<'a> {
    prefix: &'a [f32],
    own: &'a [f32],
    p: usize,
    d: usize,
}

impl<'a> Rows<'a> {
    fn row(&self, j: usize) -> &'a [f32] {
        if j < self.p {
            &self.prefix[j * self.d..(j + 1) * self.d]
        } else {
            &self.own[(j - self.p) * self.d..(j - self.p + 1) * self.d]
        }
    }
}

impl Attention {
    /// Scaled, masked softmax probabilities of one head's queries `q` (`len` rows of d) over keys
    /// whose transpose is `kt`: `len × w`, row-major.
    fn bf16_probabilities(&self, q: &[f32], len: usize, p: usize, kt: &Panels) -> Vec<f32> {
        let mut s = self.bf16_scores(q, len, p, kt);
        for (i, row) in s.chunks_exact_mut(p + len).enumerate() {
            f32::masked_softmax(row, p + i + 1, self.scale);
        }
        s
    }

    /// `dst [len, d] = X · Y` for `X [len, w]` causal (row i zero past column p + i) and `Y [w, d]` as
    /// panels, by query blocks.
    fn bf16_causal_times(&self, x: &[f32], len: usize, p: usize, y: &Panels, dst: *mut f32) {
        let (d, w) = (self.d, p + len);
        let (xa, w2) = (row_pairs(x, len, w, w), w.div_ceil(2));
        for (i0, i1) in causal_blocks(len) {
            // SAFETY: xa holds len rows of w2 pairs, of which the block reads the first (p + i1) / 2
            // rounded up (past them its rows are zero); dst holds len rows of d for the caller alone.
            unsafe {
                let a = (xa.as_ptr().add(i0 * w2), w2, 1);
                product((i1 - i0, d, (p + i1).div_ceil(2)), a, y, (0, 0), dst.add(i0 * d), d, false);
            }
        }
    }

    /// `acc [d, len] += Xᵀ · Y[:, p..]` for `X [len, d]` (a head's queries or output gradients) and
    /// `Y [len, w]` causal (row i zero past column p + i): key block j0..j1 sums over queries j0.. only.
    fn bf16_transposed_times(&self, x: &[f32], y: &[f32], len: usize, p: usize, acc: &mut [f32]) {
        let (d, w) = (self.d, p + len);
        let xt = column_pairs(x, len, d, d);
        let yp = Panels::from_rows(len, len, |i| &y[i * w + p..(i + 1) * w]);
        for (j0, j1) in causal_blocks(len) {
            // SAFETY: xt holds Xᵀ's d rows of len / 2 pairs (strides 1 and d), read from pair j0 / 2
            // on (j0 is even); acc is d × len and the block adds its columns j0..j1.
            unsafe {
                let a = (xt.as_ptr().add(j0 / 2 * d), 1, d);
                let k2 = (len - j0).div_ceil(2);
                product((d, j1 - j0, k2), a, &yp, (j0, j0 / 2), acc.as_mut_ptr().add(j0), len, true);
            }
        }
    }

    pub(super) fn forward_bf16(&self, q: &[f32], k: &[f32], v: &[f32], pk: &[f32], pv: &[f32]) -> Vec<f32> {
        let (d, rep, tokens, p) = (self.d, self.heads / self.kv_heads, q.len() / (self.heads * self.d), self.p());
        let mut out = vec![0f32; q.len()];
        let dst = SharedOut::new(&mut out);
        let unit = |(start, len, h): (usize, usize, usize)| {
            let (g, at) = (h / rep, |x: usize| (x * tokens + start) * d);
            let pre = |g: usize| g * p * d;
            let keys = Rows { prefix: &pk[pre(g)..], own: &k[at(g)..], p, d };
            let values = Rows { prefix: &pv[pre(g)..], own: &v[at(g)..], p, d };
            let probs =
                self.bf16_probabilities(&q[at(h)..], len, p, &Panels::from_columns(d, p + len, |j| keys.row(j)));
            // SAFETY: len rows of d of head h from `start`: this unit's alone.
            let dst = unsafe { dst.at(at(h)) };
            self.bf16_causal_times(&probs, len, p, &Panels::from_rows(p + len, d, |j| values.row(j)), dst);
        };
        for_each_unit(self.units(1), unit);
        out
    }

    /// Gradients of q, k and v, concatenated, from the upstream gradient `go`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn backward_bf16(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        go: &[f32],
        pk: &[f32],
        pv: &[f32],
    ) -> Vec<f32> {
        let (d, rep, tokens, p) = (self.d, self.heads / self.kv_heads, q.len() / (self.heads * self.d), self.p());
        let mut grads = vec![0f32; q.len() + k.len() + v.len()];
        let (dq, dk, dv) = (SharedOut::new(&mut grads), q.len(), q.len() + k.len());
        let unit = |(start, len, first): (usize, usize, usize)| {
            let (g, w, at) = (first / rep, p + len, |x: usize| (x * tokens + start) * d);
            let pre = |g: usize| g * p * d;
            let keys = Rows { prefix: &pk[pre(g)..], own: &k[at(g)..], p, d };
            let values = Rows { prefix: &pv[pre(g)..], own: &v[at(g)..], p, d };
            let kt = Panels::from_columns(d, w, |j| keys.row(j));
            let kp = Panels::from_rows(w, d, |j| keys.row(j));
            let vt = Panels::from_columns(d, w, |j| values.row(j));
            // dKᵀ and dVᵀ of the row's keys, summed over the group's heads.
            let (mut dkt, mut dvt) = (vec![0f32; d * len], vec![0f32; d * len]);
            for h in g * rep..(g + 1) * rep {
                let (qh, goh) = (&q[at(h)..at(h) + len * d], &go[at(h)..at(h) + len * d]);
                let probs = self.bf16_probabilities(qh, len, p, &kt);
                // dP = dO · Vᵀ: the same causal products as the scores.
                let mut dp = self.bf16_scores(goh, len, p, &vt);
                for (prow, drow) in probs.chunks_exact(w).zip(dp.chunks_exact_mut(w)) {
                    f32::softmax_grad(prow, drow, self.scale);
                }
                // SAFETY: len rows of d of head h's dq from `start`: this unit's alone.
                self.bf16_causal_times(&dp, len, p, &kp, unsafe { dq.at(at(h)) });
                self.bf16_transposed_times(qh, &dp, len, p, &mut dkt);
                self.bf16_transposed_times(goh, &probs, len, p, &mut dvt);
            }
            // SAFETY: the row's len × d blocks of dk and dv for key head g: this unit's alone.
            unsafe {
                let (dkg, dvg) = (dq.at(dk + at(g)), dq.at(dv + at(g)));
                for j in 0..len {
                    for c in 0..d {
                        *dkg.add(j * d + c) = dkt[c * len + j];
                        *dvg.add(j * d + c) = dvt[c * len + j];
                    }
                }
            }
        };
        for_each_unit(self.units(rep), unit);
        grads
    }

    /// `len × w` products `X · Yᵀ` of a head's rows `x` (len × d) with the keys or values whose
    /// transpose is `yt`, by causal query blocks (past column p + i1 of a block: zero).
    fn bf16_scores(&self, x: &[f32], len: usize, p: usize, yt: &Panels) -> Vec<f32> {
        let (d, w) = (self.d, p + len);
        let (xa, d2) = (row_pairs(x, len, d, d), d.div_ceil(2));
        let mut s = vec![0f32; len * w];
        for (i0, i1) in causal_blocks(len) {
            // SAFETY: xa holds len rows of d2 pairs; s is len × w and block i0..i1 writes its rows'
            // first p + i1 columns.
            unsafe {
                let a = (xa.as_ptr().add(i0 * d2), d2, 1);
                product((i1 - i0, p + i1, d2), a, yt, (0, 0), s.as_mut_ptr().add(i0 * w), w, false);
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::super::bf16::available;
    use super::super::super::{max_abs_diff, random_f64};
    use super::super::{packed_attention, primitive, QUERY_BLOCK};
    use candle_core::{DType, Tensor, Var};

    /// Largest difference relative to the reference's largest value.
    fn rel(got: &Tensor, want: &Tensor) -> f64 {
        let f64s = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        max_abs_diff(&f64s(got), &f64s(want)) / f64s(want).abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap()
    }

    /// The bf16 products against the f64 primitive ops: forward and every input's gradient within
    /// bf16 rounding (operands with 8 bits of mantissa, f32 sums: measured 2-6e-3 of the largest
    /// value), and above f32 rounding (so the bf16 products did run).
    fn check(heads: usize, kv_heads: usize, lens: &[usize], p: usize) {
        let (t, d) = (lens.iter().sum::<usize>(), 64);
        let f32s = |x: Tensor| x.to_dtype(DType::F32).unwrap();
        let q = Var::from_tensor(&f32s(random_f64(&[heads, t, d], 1))).unwrap();
        let k = Var::from_tensor(&f32s(random_f64(&[kv_heads, t, d], 2))).unwrap();
        let v = Var::from_tensor(&f32s(random_f64(&[kv_heads, t, d], 3))).unwrap();
        let (pk, pv) = (f32s(random_f64(&[kv_heads, p, d], 4)), f32s(random_f64(&[kv_heads, p, d], 5)));
        let prefix = (p > 0).then_some((&pk, &pv));
        let up = f32s(random_f64(&[heads, t, d], 6));
        let fused = packed_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), lens, prefix, 0.125, true).unwrap();
        let f64s = |x: &Tensor| x.to_dtype(DType::F64).unwrap();
        let (q64, k64, v64) = (
            Var::from_tensor(&f64s(&q)).unwrap(),
            Var::from_tensor(&f64s(&k)).unwrap(),
            Var::from_tensor(&f64s(&v)).unwrap(),
        );
        let (pk64, pv64) = (f64s(&pk), f64s(&pv));
        let plain = primitive(
            q64.as_tensor(),
            k64.as_tensor(),
            v64.as_tensor(),
            lens,
            (p > 0).then_some((&pk64, &pv64)),
            0.125,
        )
        .unwrap();
        let err = rel(&fused, &plain);
        assert!(err < 1e-2 && err > 1e-4, "forward {err}, lens {lens:?}, prefix {p}");
        let g1 = (fused * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (plain * f64s(&up)).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, a, b) in [("q", &q, &q64), ("k", &k, &k64), ("v", &v, &v64)] {
            let err = rel(g1.get(a.as_tensor()).unwrap(), g2.get(b.as_tensor()).unwrap());
            assert!(err < 1e-2 && err > 1e-4, "d{name}: {err}, lens {lens:?}, prefix {p}");
        }
    }

    #[test]
    fn bf16_products_match_the_f64_primitive_ops_within_bf16_rounding() {
        if !available() {
            eprintln!("no AVX-512 BF16 on this CPU: nothing to check");
            return;
        }
        check(2, 2, &[5], 0);
        check(6, 2, &[3, 1, 4], 0);
        check(6, 3, &[2, 5], 3);
        // Rows over one and several query blocks, odd prefix and row lengths (pairs straddling them).
        check(6, 2, &[QUERY_BLOCK + 1, 2 * QUERY_BLOCK + 5, 3], 7);
        check(3, 1, &[3 * QUERY_BLOCK - 1], 0);
    }

    #[test]
    fn bf16_results_do_not_depend_on_the_thread_count() {
        if !available() {
            return;
        }
        let run = |threads: usize| {
            rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap().install(|| {
                let f32s = |x: Tensor| x.to_dtype(DType::F32).unwrap();
                let q = Var::from_tensor(&f32s(random_f64(&[6, 150, 64], 7))).unwrap();
                let k = Var::from_tensor(&f32s(random_f64(&[2, 150, 64], 8))).unwrap();
                let (pk, pv) = (f32s(random_f64(&[2, 5, 64], 9)), f32s(random_f64(&[2, 5, 64], 10)));
                let out = packed_attention(
                    q.as_tensor(),
                    k.as_tensor(),
                    k.as_tensor(),
                    &[100, 50],
                    Some((&pk, &pv)),
                    0.2,
                    true,
                )
                .unwrap();
                let grads = out.sqr().unwrap().sum_all().unwrap().backward().unwrap();
                let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                [flat(&out), flat(grads.get(q.as_tensor()).unwrap()), flat(grads.get(k.as_tensor()).unwrap())]
            })
        };
        assert_eq!(run(1), run(2));
    }
}
