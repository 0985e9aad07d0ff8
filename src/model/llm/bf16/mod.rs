//! The frozen-weight products in bfloat16 on CPUs with AVX-512 BF16 (`model.llm_matmul: bf16`).
//!
//! One `vdpbf16ps` multiplies 32 bf16 pairs and adds them into 16 f32 lanes: on this project's CPUs
//! (AMD Zen 4) twice the f32 FMA rate (measured: 227 vs 114 GFLOP/s per core). Inputs are rounded to
//! bf16 (8 bits of mantissa), products and sums stay f32, as on GPUs that train in bf16. The frozen
//! weight is converted once, when the LLM loads, into panels for both products a step needs (the
//! forward x·Wᵀ and the input gradient dy·W); activations are converted per product. Every output
//! row depends on its input row alone, so a row's result does not depend on the batch around it.
//! On CPUs with AMX (Intel Xeon from Sapphire Rapids on) the weights' products of 32 rows and more
//! run on its tiles instead (`amx.rs`: 2.4-3.5x faster per token on SmolLM2's forward + backward).

use std::arch::x86_64::*;

use super::shared::SharedOut;

#[cfg(target_os = "linux")]
mod amx;

/// Output columns per panel: two 16-lane registers.
const NR: usize = 32;
/// Rows per micro-kernel call: 12 rows x 2 registers of accumulators, with room for the operands.
const MR: usize = 12;
/// Pairs of rows in one AMX tile's depth (16 x 4 bytes): panels are padded to a multiple.
const TILE_PAIRS: usize = 16;

/// Whether this CPU runs the bf16 products (AVX-512 BW for the 16-bit interleaving of the
/// attention's operands; every CPU with AVX-512 BF16 has it).
pub fn available() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bf16")
        && is_x86_feature_detected!("avx512bw")
}

/// A matrix `B [k, n]` in panels of `NR` columns; within a panel, for each pair of rows (2i, 2i+1),
/// the 32 columns' two values side by side (the operand layout of `vdpbf16ps`, and of AMX's B
/// tiles). Rows and columns past the matrix are zero.
pub struct Panels {
    k: usize,
    n: usize,
    /// Pairs of rows stored per panel: `ceil(k/2)` rounded up to whole AMX tiles (`TILE_PAIRS`).
    stride: usize,
    data: Vec<u16>,
}

impl Panels {
    /// Packs the `k x n` matrix whose element (row, col) is `at(row, col)`.
    fn pack(k: usize, n: usize, at: impl Fn(usize, usize) -> f32) -> Self {
        let (k2, panels) = (k.div_ceil(2), n.div_ceil(NR));
        let stride = k2.next_multiple_of(TILE_PAIRS);
        let mut data = vec![0u16; panels * stride * NR * 2];
        for p in 0..panels {
            for r in 0..k2 {
                let base = (p * stride + r) * NR * 2;
                for c in 0..NR.min(n - p * NR) {
                    let col = p * NR + c;
                    data[base + 2 * c] = bf16(at(2 * r, col));
                    if 2 * r + 1 < k {
                        data[base + 2 * c + 1] = bf16(at(2 * r + 1, col));
                    }
                }
            }
        }
        Self { k, n, stride, data }
    }

    /// Element (row, col) as stored: an f32 with the bf16 value.
    fn at(&self, row: usize, col: usize) -> f32 {
        let (p, c) = (col / NR, col % NR);
        let half = self.data[(p * self.stride + row / 2) * NR * 2 + 2 * c + row % 2];
        f32::from_bits((half as u32) << 16)
    }
}

impl Panels {
    /// `B [k, n]` whose row kk is `row(kk)` (at least n values), packed with vector conversions.
    pub fn from_rows<'a>(k: usize, n: usize, row: impl Fn(usize) -> &'a [f32]) -> Self {
        assert!(available(), "bf16 panels on a CPU without AVX-512 BF16");
        let (k2, panels) = (k.div_ceil(2), n.div_ceil(NR));
        let stride = k2.next_multiple_of(TILE_PAIRS);
        let mut data = vec![0u16; panels * stride * NR * 2];
        for r in 0..k2 {
            let (x0, x1) = (&row(2 * r)[..n], (2 * r + 1 < k).then(|| &row(2 * r + 1)[..n]));
            for p in 0..panels {
                let cols = p * NR..(p * NR + NR).min(n);
                let out = &mut data[(p * stride + r) * NR * 2..][..2 * cols.len()];
                // SAFETY: the CPU has AVX-512 BF16 and BW (asserted above).
                unsafe { interleave(&x0[cols.clone()], x1.map(|x| &x[cols.clone()]), out) };
            }
        }
        Self { k, n, stride, data }
    }

    /// `B = Xᵀ [k, n]` for `X [n, k]` whose row j is `row(j)` (at least k values): the keys' or
    /// values' rows as the columns of a product.
    pub fn from_columns<'a>(k: usize, n: usize, row: impl Fn(usize) -> &'a [f32]) -> Self {
        let (k2, panels) = (k.div_ceil(2), n.div_ceil(NR));
        let stride = k2.next_multiple_of(TILE_PAIRS);
        let mut data = vec![0u16; panels * stride * NR * 2];
        let mut words = vec![0u32; k2];
        for j in 0..n {
            pairs_into(&row(j)[..k], &mut words);
            let (p, c) = (j / NR, j % NR);
            for (r, w) in words.iter().enumerate() {
                let at = (p * stride + r) * NR * 2 + 2 * c;
                data[at] = *w as u16;
                data[at + 1] = (*w >> 16) as u16;
            }
        }
        Self { k, n, stride, data }
    }

    /// Pairs along k.
    pub fn pairs(&self) -> usize {
        self.k.div_ceil(2)
    }
}

/// `x`'s values as bf16 pairs along the row: word r = (x[2r], x[2r+1]), the last pair's second half
/// zero when the length is odd.
fn pairs_into(x: &[f32], words: &mut [u32]) {
    assert!(available(), "bf16 pairs on a CPU without AVX-512 BF16");
    assert_eq!(words.len(), x.len().div_ceil(2));
    let full = x.len() / 32;
    // SAFETY: the CPU has AVX-512 BF16; 32 values are read and 16 words written per chunk, in bounds.
    unsafe { pairs_avx512(x.as_ptr(), full, words.as_mut_ptr()) };
    for (r, w) in words.iter_mut().enumerate().skip(full * 16) {
        let hi = if 2 * r + 1 < x.len() { bf16(x[2 * r + 1]) as u32 } else { 0 };
        *w = bf16(x[2 * r]) as u32 | hi << 16;
    }
}

#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn pairs_avx512(x: *const f32, chunks: usize, words: *mut u32) {
    for c in 0..chunks {
        let v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x.add(32 * c + 16)), _mm512_loadu_ps(x.add(32 * c)));
        _mm512_storeu_si512(words.add(16 * c) as *mut _, std::mem::transmute::<__m512bh, __m512i>(v));
    }
}

/// Rows of pairs: the `m` rows of `k` values of `x` (row i at `x[i * stride..]`), `ceil(k/2)` words each.
pub fn row_pairs(x: &[f32], m: usize, k: usize, stride: usize) -> Vec<u32> {
    let k2 = k.div_ceil(2);
    let mut out = vec![0u32; m * k2];
    for (i, words) in out.chunks_exact_mut(k2.max(1)).enumerate().take(m) {
        pairs_into(&x[i * stride..i * stride + k], words);
    }
    out
}

/// Pairs down the columns: for `X [m, n]` (row i at `x[i * stride..]`), word `r * n + c` =
/// (X[2r][c], X[2r+1][c]): `Xᵀ` as the rows of pairs of a product (row c, pair r; strides 1 and n).
pub fn column_pairs(x: &[f32], m: usize, n: usize, stride: usize) -> Vec<u32> {
    assert!(available(), "bf16 pairs on a CPU without AVX-512 BF16");
    let mut out = vec![0u32; m.div_ceil(2) * n];
    for (r, words) in out.chunks_exact_mut(n.max(1)).enumerate() {
        let (x0, x1) = (&x[2 * r * stride..][..n], (2 * r + 1 < m).then(|| &x[(2 * r + 1) * stride..][..n]));
        // SAFETY: n u32 words are 2n u16 values (a word's low half first, as the pairs are laid out);
        // the CPU has AVX-512 BF16 and BW (asserted above).
        unsafe { interleave(x0, x1, std::slice::from_raw_parts_mut(words.as_mut_ptr() as *mut u16, 2 * n)) };
    }
    out
}

/// `out[2c] = bf16(x0[c])`, `out[2c + 1] = bf16(x1[c])` (0 without x1).
#[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
unsafe fn interleave(x0: &[f32], x1: Option<&[f32]>, out: &mut [u16]) {
    const LO: [u16; 32] = {
        let mut idx = [0u16; 32];
        let mut j = 0;
        while j < 32 {
            idx[j] = (j / 2 + if j % 2 == 1 { 32 } else { 0 }) as u16;
            j += 1;
        }
        idx
    };
    let n = x0.len();
    debug_assert!(out.len() == 2 * n && x1.is_none_or(|x| x.len() == n));
    let (lo, hi) = (
        _mm512_loadu_si512(LO.as_ptr() as *const _),
        _mm512_add_epi16(_mm512_loadu_si512(LO.as_ptr() as *const _), _mm512_set1_epi16(16)),
    );
    let convert = |x: *const f32| -> __m512i {
        std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(_mm512_loadu_ps(x.add(16)), _mm512_loadu_ps(x)))
    };
    let full = n / 32;
    for c in 0..full {
        let a = convert(x0.as_ptr().add(32 * c));
        let b = match x1 {
            Some(x1) => convert(x1.as_ptr().add(32 * c)),
            None => _mm512_setzero_si512(),
        };
        _mm512_storeu_si512(out.as_mut_ptr().add(64 * c) as *mut _, _mm512_permutex2var_epi16(a, lo, b));
        _mm512_storeu_si512(out.as_mut_ptr().add(64 * c + 32) as *mut _, _mm512_permutex2var_epi16(a, hi, b));
    }
    for c in 32 * full..n {
        out[2 * c] = bf16(x0[c]);
        out[2 * c + 1] = x1.map_or(0, |x| bf16(x[c]));
    }
}

/// `dst [m, n] (+)= A · B` in bf16 with f32 sums, on the calling thread: A's rows of pairs
/// (`a`: pointer, row stride, pair stride, over `k2` pairs), B from column `col0` (a multiple of
/// 32) and pair `pair0` of `b`, `dst` with row stride `ldc`; with `keep`, added to what it holds.
/// The attention's products, whose operands change every call. On CPUs with AMX, products of rows of
/// pairs (`a.2 == 1`) of 32 rows and more that overwrite `dst` run on the tiles.
///
/// # Safety
/// A must hold m rows of k2 pairs under its strides, and `dst` m rows of n values under `ldc`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn product(
    (m, n, k2): (usize, usize, usize),
    a: (*const u32, usize, usize),
    b: &Panels,
    (col0, pair0): (usize, usize),
    dst: *mut f32,
    ldc: usize,
    keep: bool,
) {
    assert!(col0 % NR == 0 && col0 + n <= b.n && pair0 + k2 <= b.pairs(), "bf16 product outside its panels");
    if m == 0 || n == 0 {
        return;
    }
    // The tiles read whole rows of pairs (a pair stride of 1) and overwrite what `dst` holds.
    #[cfg(target_os = "linux")]
    if !keep
        && a.2 == 1
        && m >= amx::MIN_ROWS
        && k2 > 0
        && pair0 + k2.next_multiple_of(TILE_PAIRS) <= b.stride
        && amx::available()
    {
        return amx::product((m, n, k2), (a.0, a.1), b, (col0, pair0), dst, ldc);
    }
    product_avx512((m, n, k2), a, b, (col0, pair0), dst, ldc, keep)
}

/// `product` with the AVX-512 BF16 kernel below.
///
/// # Safety
/// As for `product`.
#[allow(clippy::too_many_arguments)]
unsafe fn product_avx512(
    (m, n, k2): (usize, usize, usize),
    a: (*const u32, usize, usize),
    b: &Panels,
    (col0, pair0): (usize, usize),
    dst: *mut f32,
    ldc: usize,
    keep: bool,
) {
    for p in 0..n.div_ceil(NR) {
        let cols = NR.min(n - p * NR);
        let bp = b.data.as_ptr().add(((col0 / NR + p) * b.stride + pair0) * NR * 2);
        for blk in 0..m.div_ceil(MR) {
            let rows = MR.min(m - blk * MR);
            let ab = (a.0.add(blk * MR * a.1), a.1, a.2);
            kernel::<false>(k2, ab, bp, dst.add(blk * MR * ldc + p * NR), ldc, rows, cols, keep);
        }
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

/// The kernel of the weights' products on this CPU (`matmul`): AMX tiles where the CPU and the
/// kernel allow them (for products of at least `amx::MIN_ROWS` rows), else AVX-512 BF16.
pub fn kernel_name() -> &'static str {
    #[cfg(target_os = "linux")]
    if available() && amx::available() {
        return "AMX tiles from 32 rows, AVX-512 BF16 below";
    }
    "AVX-512 BF16"
}

/// Round to nearest even, as the hardware conversion does (NaN stays NaN).
fn bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    ((bits + 0x7fff + ((bits >> 16) & 1)) >> 16) as u16
}

/// `x [m, b.k] · B -> [m, b.n]` in bf16 with f32 sums. `threads` panels run at once. On CPUs with
/// AMX the tiles do the work (`amx.rs`) once there are rows enough to fill them.
pub fn matmul(x: &[f32], m: usize, b: &Panels, threads: usize) -> Vec<f32> {
    assert_eq!(x.len(), m * b.k, "bf16 matmul: {} values for {m} rows of {}", x.len(), b.k);
    assert!(available(), "bf16 matmul on a CPU without AVX-512 BF16");
    #[cfg(target_os = "linux")]
    if m >= amx::MIN_ROWS && amx::available() {
        return amx::matmul(x, m, b, threads);
    }
    matmul_avx512(x, m, b, threads)
}

/// `matmul` with the AVX-512 BF16 kernel below.
fn matmul_avx512(x: &[f32], m: usize, b: &Panels, threads: usize) -> Vec<f32> {
    let (k2, n) = (b.k.div_ceil(2), b.n);
    // Every output value is written once by the kernel below, so the buffer is not zeroed first
    // (zeroing fresh buffers was a twentieth of a step).
    let mut out: Vec<f32> = Vec::with_capacity(m * n);
    // The rows in blocks of MR, each as (pair of columns) words, zero-padded; the blocks are
    // packed in parallel too (packed on one thread, they held a second thread idle for a tenth of
    // a step).
    let blocks = m.div_ceil(MR);
    // Every word is written below (the last block's rows past m as zeros), so the buffer is not
    // zeroed first (it is m x k x 2 bytes, for every product of a step).
    let mut a: Vec<u32> = Vec::with_capacity(blocks * k2 * MR);
    // A row is converted with vector instructions, then its pairs spread MR apart.
    let pack = |(blk, words): (usize, &mut [std::mem::MaybeUninit<u32>])| {
        let mut row_words = vec![0u32; k2];
        let rows = MR.min(m - blk * MR);
        for i in 0..MR {
            if i < rows {
                pairs_into(&x[(blk * MR + i) * b.k..(blk * MR + i + 1) * b.k], &mut row_words);
            } else if i == rows {
                row_words.fill(0);
            }
            for (r, w) in row_words.iter().enumerate() {
                words[r * MR + i].write(*w);
            }
        }
    };
    let spare = &mut a.spare_capacity_mut()[..blocks * k2 * MR];
    if threads > 1 && blocks > 1 {
        use rayon::prelude::*;
        spare.par_chunks_mut(k2 * MR).enumerate().for_each(pack);
    } else {
        spare.chunks_mut(k2 * MR).enumerate().for_each(pack);
    }
    // SAFETY: `pack` wrote all k2 x MR words of every block.
    unsafe { a.set_len(blocks * k2 * MR) };
    let panels = n.div_ceil(NR);
    let out_ptr = SharedOut::new(out.spare_capacity_mut());
    let run = |p: usize| {
        let cols = NR.min(n - p * NR);
        let bp = b.data[p * b.stride * NR * 2..].as_ptr();
        for blk in 0..blocks {
            let rows = MR.min(m - blk * MR);
            // SAFETY: `a` holds k2 x MR words for this block, the panel k2 x NR pairs; the kernel
            // writes rows x cols values of `out` at (blk * MR, p * NR) with row stride n, a region no
            // other panel touches.
            unsafe {
                let c = out_ptr.at(blk * MR * n + p * NR).cast::<f32>();
                kernel::<true>(k2, (a[blk * k2 * MR..].as_ptr(), 1, MR), bp, c, n, rows, cols, false);
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

/// `c[rows, cols] (+)= A · B` for one block of up to MR rows and one panel, over k2 pairs. A is a
/// block packed by `matmul` (`PACKED`: row i's pair r at `a.0[r * MR + i]`, zero rows past `rows`)
/// or rows of pairs (row i's pair r at `a.0[i * a.1 + r * a.2]`; rows past `rows` are read as the
/// last one and dropped, so every block runs the same unrolled loop). With `keep`, adds to what `c`
/// holds.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn kernel<const PACKED: bool>(
    k2: usize,
    a: (*const u32, usize, usize),
    b: *const u16,
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    keep: bool,
) {
    let (a, a_rs, a_cs) = a;
    let row_at: [*const u32; MR] = std::array::from_fn(|i| a.add(i.min(rows.saturating_sub(1)) * a_rs));
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    for r in 0..k2 {
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(r * NR * 2) as *const _));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(r * NR * 2 + NR) as *const _));
        for (i, acc) in acc.iter_mut().enumerate() {
            let word = if PACKED { *a.add(r * MR + i) } else { *row_at[i].add(r * a_cs) };
            let ai: __m512bh = std::mem::transmute(_mm512_set1_epi32(word as i32));
            acc[0] = _mm512_dpbf16_ps(acc[0], ai, b0);
            acc[1] = _mm512_dpbf16_ps(acc[1], ai, b1);
        }
    }
    let (m0, m1) = (mask(cols.min(16)), mask(cols.saturating_sub(16)));
    // One store per row at a constant index, so that the accumulators stay registers: a loop over
    // `rows` read them from a stack array, zeroed by a memset on every call (4% of a bf16 step on
    // 4 x 128 tokens under perf).
    macro_rules! store_rows {
        ($($i:literal)*) => {$(
            if $i < rows {
                let row = c.add($i * ldc);
                let (mut v0, mut v1) = (acc[$i][0], acc[$i][1]);
                if keep {
                    v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, row));
                    v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, row.add(16)));
                }
                _mm512_mask_storeu_ps(row, m0, v0);
                _mm512_mask_storeu_ps(row.add(16), m1, v1);
            }
        )*};
    }
    const _: () = assert!(MR == 12, "store_rows! names rows 0..MR");
    store_rows!(0 1 2 3 4 5 6 7 8 9 10 11);
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

    /// Standard normal values, seeded, in arrays of the given sizes.
    fn normals<const N: usize>(seed: u64, tag: &str, sizes: [usize; N]) -> [Vec<f32>; N] {
        let mut rng = crate::seed::stream(seed, tag, 0);
        sizes.map(|n| {
            crate::model::layers::normal_tensor(n, 1.0, &mut rng, &candle_core::Device::Cpu)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
    }

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
        let [w, x, dy] = normals(9, "bf16", [out * inp, m * inp, m * out]);
        let p = PackedWeight::new(&w, out, inp);
        let y = matmul_avx512(&x, m, &p.transposed, 1);
        let dx = matmul_avx512(&dy, m, &p.plain, 2);
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
        let alone = matmul_avx512(&x[5 * inp..6 * inp], 1, &p.transposed, 1);
        assert_eq!(alone, y[5 * out..6 * out]);
        // Both panels are padded to whole AMX tiles: 19 and 23 pairs to 32.
        assert_eq!((p.transposed.stride, p.plain.stride), (32, 32));
        // Rows read back from the panels are the weight's rows rounded to bf16.
        let rows = p.rows(&[44, 0, 7]);
        for (i, r) in [44usize, 0, 7].into_iter().enumerate() {
            for c in 0..inp {
                assert_eq!(rows[i * inp + c], f32::from_bits((bf16(w[r * inp + c]) as u32) << 16));
            }
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn amx_tiles_compute_the_avx512_kernels_products_up_to_the_order_of_their_sums() {
        if !(available() && amx::available()) {
            eprintln!("no AMX on this CPU (or no tile state from the kernel): nothing to check");
            return;
        }
        // Rows past a block of 32, columns past a panel, pairs past a tile: 45 x 37 and 37 x 45.
        let (m, out, inp) = (45, 45, 37);
        let [w, x, dy] = normals(11, "amx", [out * inp, m * inp, m * out]);
        let p = PackedWeight::new(&w, out, inp);
        for (a, panels, threads) in [(&x, &p.transposed, 1), (&dy, &p.plain, 2)] {
            let tiles = amx::matmul(a, m, panels, threads);
            let vectors = matmul_avx512(a, m, panels, 1);
            assert_eq!(tiles.len(), vectors.len());
            // The same bf16 operands and f32 products; only the order of the f32 additions
            // differs, by a few units in the last place of sums of about sqrt(k) in size.
            let worst = tiles.iter().zip(&vectors).map(|(t, v)| (t - v).abs()).fold(0.0, f32::max);
            assert!(worst < 1e-4, "AMX and AVX-512 products differ by {worst}");
            // The dispatch takes the tiles for this many rows.
            assert_eq!(matmul(a, m, panels, threads), tiles);
            // A row's result does not depend on the rows around it: rows 13-44 on their own are
            // one full block, where above they straddle two.
            let k = panels.k;
            let last = amx::matmul(&a[13 * k..], m - 13, panels, 1);
            assert_eq!(last, tiles[13 * panels.n..]);
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn amx_attention_products_match_the_avx512_kernel_on_partial_blocks_and_tiles() {
        if !(available() && amx::available()) {
            eprintln!("no AMX on this CPU (or no tile state from the kernel): nothing to check");
            return;
        }
        // X [45 rows, 37] times B [37, 70] from the rows of Y (19 pairs, padded to a tile of 16
        // twice), and times Zᵀ [37, 70] from the columns of Z [70, 37]; a block from row 13 and
        // pair 0 to 9 pairs, as the causal blocks ask (rows past pair 9 of A are zero there).
        let (m, k, n) = (45, 37, 70);
        let [x, y, z] = normals(12, "amx-attention", [m * k, k * n, n * k]);
        let xa = row_pairs(&x, m, k, k);
        let k2 = k.div_ceil(2);
        for b in [Panels::from_rows(k, n, |r| &y[r * n..]), Panels::from_columns(k, n, |j| &z[j * k..])] {
            assert_eq!(b.stride, 32);
            for (row0, rows, pairs) in [(0, m, k2), (13, 32, 9)] {
                let (mut tiles, mut vectors) = (vec![0f32; rows * n], vec![0f32; rows * n]);
                // SAFETY: xa holds m rows of k2 pairs; the outputs rows x n values.
                unsafe {
                    let a = xa.as_ptr().add(row0 * k2);
                    amx::product((rows, n, pairs), (a, k2), &b, (0, 0), tiles.as_mut_ptr(), n);
                    product_avx512((rows, n, pairs), (a, k2, 1), &b, (0, 0), vectors.as_mut_ptr(), n, false);
                }
                let worst = tiles.iter().zip(&vectors).map(|(t, v)| (t - v).abs()).fold(0.0, f32::max);
                assert!(worst < 1e-4, "AMX and AVX-512 attention products differ by {worst}");
                assert!(vectors.iter().any(|v| *v != 0.0));
            }
        }
    }
}
