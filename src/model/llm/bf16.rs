//! The frozen-weight products in bfloat16 on CPUs with AVX-512 BF16 (`model.llm_matmul: bf16`).
//!
//! One `vdpbf16ps` multiplies 32 bf16 pairs and adds them into 16 f32 lanes: on this project's CPUs
//! (AMD Zen 4) twice the f32 FMA rate (measured: 227 vs 114 GFLOP/s per core). Inputs are rounded to
//! bf16 (8 bits of mantissa), products and sums stay f32, as on GPUs that train in bf16. The frozen
//! weight is converted once, when the LLM loads, into panels for both products a step needs (the
//! forward x·Wᵀ and the input gradient dy·W); activations are converted per product. Every output
//! row depends on its input row alone, so a row's result does not depend on the batch around it.

use std::arch::x86_64::*;

use super::shared::SharedOut;

/// Output columns per panel: two 16-lane registers.
const NR: usize = 32;
/// Rows per micro-kernel call: 12 rows x 2 registers of accumulators, with room for the operands.
const MR: usize = 12;

/// Whether this CPU runs the bf16 products.
pub fn available() -> bool {
    is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
}

/// A matrix `B [k, n]` in panels of `NR` columns; within a panel, for each pair of rows (2i, 2i+1),
/// the 32 columns' two values side by side (the operand layout of `vdpbf16ps`). Rows and columns
/// past the matrix are zero.
pub struct Panels {
    k: usize,
    n: usize,
    data: Vec<u16>,
}

impl Panels {
    /// Packs the `k x n` matrix whose element (row, col) is `at(row, col)`.
    fn pack(k: usize, n: usize, at: impl Fn(usize, usize) -> f32) -> Self {
        let (k2, panels) = (k.div_ceil(2), n.div_ceil(NR));
        let mut data = vec![0u16; panels * k2 * NR * 2];
        for p in 0..panels {
            for r in 0..k2 {
                let base = (p * k2 + r) * NR * 2;
                for c in 0..NR.min(n - p * NR) {
                    let col = p * NR + c;
                    data[base + 2 * c] = bf16(at(2 * r, col));
                    if 2 * r + 1 < k {
                        data[base + 2 * c + 1] = bf16(at(2 * r + 1, col));
                    }
                }
            }
        }
        Self { k, n, data }
    }

    /// Element (row, col) as stored: an f32 with the bf16 value.
    fn at(&self, row: usize, col: usize) -> f32 {
        let (k2, p, c) = (self.k.div_ceil(2), col / NR, col % NR);
        let half = self.data[(p * k2 + row / 2) * NR * 2 + 2 * c + row % 2];
        f32::from_bits((half as u32) << 16)
    }
}

/// A frozen weight `W [out, in]` packed for both products of a training step.
pub struct PackedWeight {
    /// `Wᵀ [in, out]`: the forward `x · Wᵀ`.
    pub transposed: Panels,
    /// `W [out, in]`: the input gradient `dy · W`.
    pub plain: Panels,
}

impl PackedWeight {
    pub fn new(w: &[f32], out: usize, inp: usize) -> Self {
        Self {
            transposed: Panels::pack(inp, out, |r, c| w[c * inp + r]),
            plain: Panels::pack(out, inp, |r, c| w[r * inp + c]),
        }
    }

    /// Rows `ids` of W `[ids.len(), in]`, row-major, at the bf16 values the products read.
    pub fn rows(&self, ids: &[u32]) -> Vec<f32> {
        let p = &self.plain;
        ids.iter().flat_map(|&r| (0..p.n).map(move |c| p.at(r as usize, c))).collect()
    }
}

/// Round to nearest even, as the hardware conversion does (NaN stays NaN).
fn bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    ((bits + 0x7fff + ((bits >> 16) & 1)) >> 16) as u16
}

/// `x [m, b.k] · B -> [m, b.n]` in bf16 with f32 sums. `threads` panels run at once.
pub fn matmul(x: &[f32], m: usize, b: &Panels, threads: usize) -> Vec<f32> {
    assert_eq!(x.len(), m * b.k, "bf16 matmul: {} values for {m} rows of {}", x.len(), b.k);
    assert!(available(), "bf16 matmul on a CPU without AVX-512 BF16");
    let (k2, n) = (b.k.div_ceil(2), b.n);
    // Every output value is written once by the kernel below, so the buffer is not zeroed first
    // (zeroing fresh buffers was a twentieth of a step).
    let mut out: Vec<f32> = Vec::with_capacity(m * n);
    // The rows in blocks of MR, each as (pair of columns) words, zero-padded; the blocks are
    // packed in parallel too (packed on one thread, they held a second thread idle for a tenth of
    // a step).
    let blocks = m.div_ceil(MR);
    let mut a = vec![0u32; blocks * k2 * MR];
    let pack = |(blk, words): (usize, &mut [u32])| {
        for i in 0..MR.min(m - blk * MR) {
            let row = &x[(blk * MR + i) * b.k..(blk * MR + i + 1) * b.k];
            for r in 0..k2 {
                let lo = bf16(row[2 * r]) as u32;
                let hi = if 2 * r + 1 < b.k { bf16(row[2 * r + 1]) as u32 } else { 0 };
                words[r * MR + i] = lo | hi << 16;
            }
        }
    };
    if threads > 1 && blocks > 1 {
        use rayon::prelude::*;
        a.par_chunks_mut(k2 * MR).enumerate().for_each(pack);
    } else {
        a.chunks_mut(k2 * MR).enumerate().for_each(pack);
    }
    let panels = n.div_ceil(NR);
    let out_ptr = SharedOut::new(out.spare_capacity_mut());
    let run = |p: usize| {
        let cols = NR.min(n - p * NR);
        let bp = b.data[p * k2 * NR * 2..].as_ptr();
        for blk in 0..blocks {
            let rows = MR.min(m - blk * MR);
            // SAFETY: `a` holds k2 x MR words for this block, the panel k2 x NR pairs; the kernel
            // writes rows x cols values of `out` at (blk * MR, p * NR) with row stride n, a region no
            // other panel touches.
            unsafe {
                let c = out_ptr.at(blk * MR * n + p * NR).cast::<f32>();
                kernel(k2, a[blk * k2 * MR..].as_ptr(), bp, c, n, rows, cols);
            }
        }
    };
    if threads > 1 && panels > 1 {
        use rayon::prelude::*;
        (0..panels).into_par_iter().for_each(run);
    } else {
        (0..panels).for_each(run);
    }
    // SAFETY: the panels wrote all m x n values (each block's rows, each panel's columns).
    unsafe { out.set_len(m * n) };
    out
}

/// `c[rows, cols] = A · B` for one block of MR packed rows and one panel, over k2 pairs.
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn kernel(k2: usize, a: *const u32, b: *const u16, c: *mut f32, ldc: usize, rows: usize, cols: usize) {
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    for r in 0..k2 {
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(r * NR * 2) as *const _));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(r * NR * 2 + NR) as *const _));
        let ar = a.add(r * MR);
        for (i, acc) in acc.iter_mut().enumerate() {
            let ai: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ar.add(i) as i32));
            acc[0] = _mm512_dpbf16_ps(acc[0], ai, b0);
            acc[1] = _mm512_dpbf16_ps(acc[1], ai, b1);
        }
    }
    let (m0, m1) = (mask(cols.min(16)), mask(cols.saturating_sub(16)));
    for (i, acc) in acc.iter().enumerate().take(rows) {
        let row = c.add(i * ldc);
        _mm512_mask_storeu_ps(row, m0, acc[0]);
        _mm512_mask_storeu_ps(row.add(16), m1, acc[1]);
    }
}

/// The first `n` of 16 lanes.
fn mask(n: usize) -> __mmask16 {
    if n >= 16 {
        0xffff
    } else {
        ((1u32 << n) - 1) as __mmask16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_to_nearest_even_like_the_hardware() {
        assert_eq!(bf16(1.0), 0x3f80);
        // 1 + 2^-8 lies halfway between two bf16 values: to the even one (1.0).
        assert_eq!(bf16(f32::from_bits(0x3f80_8000)), 0x3f80);
        assert_eq!(bf16(f32::from_bits(0x3f81_8000)), 0x3f82);
        assert_eq!(bf16(f32::from_bits(0x3f80_8001)), 0x3f81);
        assert!(f32::from_bits((bf16(f32::NAN) as u32) << 16).is_nan());
    }

    #[test]
    fn products_match_f64_within_bf16_rounding_in_both_orientations() {
        if !available() {
            eprintln!("no AVX-512 BF16 on this CPU: nothing to check");
            return;
        }
        // Odd sizes on every side: padded rows, columns and pairs.
        let (m, out, inp) = (27, 45, 37);
        let mut rng = crate::seed::stream(9, "bf16", 0);
        let mut normal = |n: usize| -> Vec<f32> {
            crate::model::layers::normal_tensor(n, 1.0, &mut rng, &candle_core::Device::Cpu)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let (w, x, dy) = (normal(out * inp), normal(m * inp), normal(m * out));
        let p = PackedWeight::new(&w, out, inp);
        let y = matmul(&x, m, &p.transposed, 1);
        let dx = matmul(&dy, m, &p.plain, 2);
        for (got, want, (rows, cols, inner)) in [
            (
                &y,
                (0..m * out)
                    .map(|e| (0..inp).map(|k| x[e / out * inp + k] as f64 * w[e % out * inp + k] as f64).sum::<f64>())
                    .collect::<Vec<_>>(),
                (m, out, inp),
            ),
            (
                &dx,
                (0..m * inp)
                    .map(|e| (0..out).map(|k| dy[e / inp * out + k] as f64 * w[k * inp + e % inp] as f64).sum::<f64>())
                    .collect::<Vec<_>>(),
                (m, inp, out),
            ),
        ] {
            assert_eq!(got.len(), rows * cols);
            // Two operands rounded to 8 mantissa bits: each product is off by up to ~2^-8
            // relative; over `inner` terms of unit size the sum is off by about sqrt(inner)·2^-8.
            let bound = 4.0 * (inner as f64).sqrt() * 2f64.powi(-8);
            let worst = got.iter().zip(&want).map(|(g, w)| (*g as f64 - w).abs()).fold(0.0, f64::max);
            assert!(worst < bound, "largest error {worst} > {bound}");
            assert!(worst > 0.0, "bf16 products cannot be exact on random data");
        }
        // A row's result does not depend on the rows around it.
        let alone = matmul(&x[5 * inp..6 * inp], 1, &p.transposed, 1);
        assert_eq!(alone, y[5 * out..6 * out]);
        // Rows read back from the panels are the weight's rows rounded to bf16.
        let rows = p.rows(&[44, 0, 7]);
        for (i, r) in [44usize, 0, 7].into_iter().enumerate() {
            for c in 0..inp {
                assert_eq!(rows[i * inp + c], f32::from_bits((bf16(w[r * inp + c]) as u32) << 16));
            }
        }
    }
}
