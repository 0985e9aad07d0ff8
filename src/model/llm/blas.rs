//! The frozen-weight products through OpenBLAS's `cblas_sgemm` (the `openblas` feature).
//!
//! The `gemm` crate behind candle's CPU matmul uses AVX2 kernels on stable Rust; OpenBLAS picks
//! AVX-512 kernels where the CPU has them, and these products are two thirds of a training step
//! (README, "Speed of a training step"). Only f32 with contiguous operands takes this path; anything
//! else falls back to candle.

use std::os::raw::c_int;

use candle_core::{CpuStorage, Layout};

const ROW_MAJOR: c_int = 101;
const NO_TRANS: c_int = 111;
const TRANS: c_int = 112;

#[link(name = "openblas")]
extern "C" {
    #[allow(clippy::too_many_arguments)]
    fn cblas_sgemm(
        layout: c_int,
        trans_a: c_int,
        trans_b: c_int,
        m: c_int,
        n: c_int,
        k: c_int,
        alpha: f32,
        a: *const f32,
        lda: c_int,
        b: *const f32,
        ldb: c_int,
        beta: f32,
        c: *mut f32,
        ldc: c_int,
    );
    fn openblas_set_num_threads(n: c_int);
    fn openblas_get_corename() -> *const std::os::raw::c_char;
}

/// Gives OpenBLAS the same number of threads as candle's pool (it reads its environment when the
/// library loads, before `main` could set it).
pub fn set_threads(n: usize) {
    // SAFETY: a plain setter of OpenBLAS's global thread count.
    unsafe { openblas_set_num_threads(n.clamp(1, c_int::MAX as usize) as c_int) }
}

/// The kernel family OpenBLAS chose for this CPU (OPENBLAS_CORETYPE overrides it at start-up).
pub fn core_name() -> String {
    // SAFETY: OpenBLAS returns a pointer to a static NUL-terminated name.
    unsafe { std::ffi::CStr::from_ptr(openblas_get_corename()) }.to_string_lossy().into_owned()
}

/// `x · Wᵀ` (`transposed`) or `x · W` for `x [m, k]` and the frozen `W [out, in]`; `None` when the
/// operands are not contiguous f32 or too large for BLAS's 32-bit sizes.
pub fn frozen_sgemm(
    x: &CpuStorage,
    x_layout: &Layout,
    w: &CpuStorage,
    w_layout: &Layout,
    transposed: bool,
) -> Option<CpuStorage> {
    let (CpuStorage::F32(x), CpuStorage::F32(w)) = (x, w) else { return None };
    let (xs, xe) = x_layout.contiguous_offsets()?;
    let (ws, we) = w_layout.contiguous_offsets()?;
    let (x, w) = (&x[xs..xe], &w[ws..we]);
    let (m, k) = x_layout.shape().dims2().ok()?;
    let (out, inp) = w_layout.shape().dims2().ok()?;
    let n = if transposed { out } else { inp };
    if (transposed && k != inp) || (!transposed && k != out) {
        return None;
    }
    let fits = |v: usize| c_int::try_from(v).ok();
    let (mi, ni, ki, ldw) = (fits(m)?, fits(n)?, fits(k)?, fits(inp)?);
    fits(m.checked_mul(n)?)?;
    let mut y: Vec<f32> = Vec::with_capacity(m * n);
    if m > 0 && n > 0 {
        let trans_w = if transposed { TRANS } else { NO_TRANS };
        // SAFETY: x is m×k, w is out×in (row-major, leading dimension `in`), y has room for m×n; the
        // sizes were checked against the slices' shapes above and fit in c_int. With beta = 0 BLAS
        // writes every element of y without reading it, so y may start uninitialised.
        unsafe {
            cblas_sgemm(
                ROW_MAJOR,
                NO_TRANS,
                trans_w,
                mi,
                ni,
                ki,
                1.0,
                x.as_ptr(),
                ki.max(1),
                w.as_ptr(),
                ldw.max(1),
                0.0,
                y.as_mut_ptr(),
                ni,
            );
            y.set_len(m * n);
        }
    }
    Some(CpuStorage::F32(y))
}
