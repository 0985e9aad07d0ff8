//! The decoder's elementwise steps as fused CPU ops with their own backward passes.
//!
//! Written from primitives, each of these is several passes over [b, t, hidden] tensors forward and
//! more backward; at SmolLM2's sizes that traffic costs about as much as the matmuls (perf, README
//! "Speed of a training step"). candle's own fused versions have no backward (docs/candle.md).
//! On other devices, or dtypes other than f32/f64, the primitive versions run instead.

mod add;
mod attention;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod rms_norm;
mod rope;
mod silu_mul;

pub use add::{add, add_storage};
pub use attention::{packed_attention, packed_attention_backward};
pub use rms_norm::{rms_norm, rms_norm_backward};
pub use rope::{rope, rope_backward};
pub use silu_mul::{silu_mul, silu_mul_backward};

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, DType, Layout, Shape, Tensor, WithDType};

/// The contiguous values of a CPU op's operand.
fn contiguous<'a, T: WithDType>(s: &'a [T], l: &Layout) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s[a..b]),
        None => candle_core::bail!("a fused op needs a contiguous input"),
    }
}

/// A fused op's CPU computation over contiguous values, written once for every dtype.
trait Kernel {
    fn apply<T: WithDType>(&self, x: &[T]) -> Vec<T>;
}

/// The same for a backward pass of two operands (a forward value and the upstream gradient).
trait Kernel2 {
    fn apply<T: WithDType>(&self, a: &[T], b: &[T]) -> Vec<T>;
}

/// Runs `k` on an f32 or f64 operand; the result has the operand's shape.
fn run<K: Kernel>(k: &K, name: &str, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
    let out = match s {
        CpuStorage::F32(v) => CpuStorage::F32(k.apply(contiguous(v, l)?)),
        CpuStorage::F64(v) => CpuStorage::F64(k.apply(contiguous(v, l)?)),
        _ => candle_core::bail!("{name} supports f32 and f64"),
    };
    Ok((out, l.shape().clone()))
}

/// Runs `k` on two operands of the same dtype (f32 or f64); the result has the first one's shape.
fn run2<K: Kernel2>(
    k: &K,
    name: &str,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
) -> candle_core::Result<(CpuStorage, Shape)> {
    let out = match (s1, s2) {
        (CpuStorage::F32(a), CpuStorage::F32(b)) => CpuStorage::F32(k.apply(contiguous(a, l1)?, contiguous(b, l2)?)),
        (CpuStorage::F64(a), CpuStorage::F64(b)) => CpuStorage::F64(k.apply(contiguous(a, l1)?, contiguous(b, l2)?)),
        _ => candle_core::bail!("{name} supports f32 and f64 operands of one dtype"),
    };
    Ok((out, l1.shape().clone()))
}

/// Rows of `width` values of `x` (and of `y`, the same shape, where a backward reads two operands)
/// mapped through `f(row index, x row, y row, out row)` into a new buffer of rows of the same width
/// (the last row may be short), over the thread pool when there is enough work to share. `f` must
/// write every value of its out row: the buffer is not zeroed first (zeroing fresh buffers cost a
/// pass over memory per op).
fn map_rows<T: WithDType>(
    x: &[T],
    y: Option<&[T]>,
    width: usize,
    f: impl Fn(usize, &[T], &[T], &mut [MaybeUninit<T>]) + Sync,
) -> Vec<T> {
    use rayon::prelude::*;
    let width = width.max(1);
    let mut out = Vec::with_capacity(x.len());
    let spare = &mut out.spare_capacity_mut()[..x.len()];
    let y = y.unwrap_or(&[]);
    let yrow = |r: usize| if y.is_empty() { &y[..0] } else { &y[r * width..((r + 1) * width).min(y.len())] };
    if rayon::current_num_threads() > 1 && x.len() >= 1 << 15 {
        spare.par_chunks_mut(width).zip(x.par_chunks(width)).enumerate().for_each(|(r, (o, xr))| f(r, xr, yrow(r), o));
    } else {
        for (r, (o, xr)) in spare.chunks_mut(width).zip(x.chunks(width)).enumerate() {
            f(r, xr, yrow(r), o);
        }
    }
    // SAFETY: every row was handed to `f`, which writes each of its values.
    unsafe { out.set_len(x.len()) };
    out
}

/// e^x in f32 to within 2 ulp for -87 <= x <= 88, inlined so loops over it vectorize (the library's
/// scalar `exp`, in f64, was a quarter of the forward on 1 x 512): x = n ln 2 + r with |r| <= ln 2 / 2,
/// e^r by its Taylor series to r^7 (truncation below 1e-8 relative), 2^n from the exponent bits.
/// Outside, the bound's value: e^-87 (~1.6e-38) and e^88 (~1.7e38); a NaN stays NaN.
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 in two parts, so that n · LN2_HI is exact for the n that occur here.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding and removing 1.5 · 2^23 rounds to the nearest integer (the FPU's default mode).
    const ROUND: f32 = 12_582_912.0;
    // `clamp` keeps a NaN (unlike `max`/`min`, which drop it).
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (1.0 / 2.0
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    p * f32::from_bits(((n as i32 + 127) << 23) as u32)
}

/// The logistic function of `g` for an op running in `T`: through `exp_f32` for f32, the library's
/// f64 `exp` otherwise (the f64 finite-difference tests).
fn sigmoid<T: WithDType>(g: f64) -> f64 {
    if T::DTYPE == DType::F32 {
        1.0 / (1.0 + exp_f32(-g as f32) as f64)
    } else {
        1.0 / (1.0 + (-g).exp())
    }
}

/// Whether `x` takes the fused path.
pub fn fused(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// A small frozen tensor (norm weight, RoPE table) as f64 values the ops read in any dtype.
fn values(t: &Tensor) -> candle_core::Result<std::sync::Arc<Vec<f64>>> {
    Ok(std::sync::Arc::new(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?))
}

#[cfg(test)]
fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap()
}

#[cfg(test)]
fn random_f64(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = crate::seed::stream(seed, "fused-ops", 0);
    crate::model::layers::normal_tensor(shape.to_vec(), 1.0, &mut rng, &candle_core::Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    /// Every op's output and input gradients on f32 data big enough to be shared out, in a pool of
    /// `threads` threads.
    fn run_all(threads: usize) -> Vec<Vec<f32>> {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            let f32s = |t: Tensor| t.to_dtype(DType::F32).unwrap();
            let x = Var::from_tensor(&f32s(random_f64(&[2, 3, 96, 64], 1))).unwrap();
            let w = f32s(random_f64(&[64], 2));
            let (cos, sin) = (f32s(random_f64(&[96, 32], 3)), f32s(random_f64(&[96, 32], 4)));
            let kv = Var::from_tensor(&f32s(random_f64(&[2, 192, 64], 5))).unwrap();
            let y = rms_norm(x.as_tensor(), &w, 1e-5).unwrap();
            let y = rope(&y, &cos, &sin, true).unwrap();
            let y = silu_mul(&y, x.as_tensor()).unwrap();
            let q = y.reshape((6, 192, 32)).unwrap().narrow(2, 0, 32).unwrap().contiguous().unwrap();
            let kv2 = kv.as_tensor().narrow(2, 0, 32).unwrap().contiguous().unwrap();
            let out = packed_attention(&q, &kv2, &kv2, &[100, 92], None, 0.2, false).unwrap();
            let grads = out.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            vec![flat(&out), flat(grads.get(x.as_tensor()).unwrap()), flat(grads.get(kv.as_tensor()).unwrap())]
        })
    }

    #[test]
    fn the_f32_exp_is_within_2_ulp_of_the_exact_one_clamps_and_keeps_nan() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -90.0 + 178.0 * i as f32 / 200_000.0;
            let (got, want) = (exp_f32(x) as f64, (x as f64).exp());
            if (-87.0..=88.0).contains(&x) {
                worst = worst.max((got - want).abs() / want);
            } else if x < -87.0 {
                assert!(got > 0.0 && got < 2e-38, "exp({x}) = {got}");
            }
        }
        assert!(worst < 2.0 * f32::EPSILON as f64, "worst relative error {worst}");
        assert!(exp_f32(f32::NAN).is_nan());
        assert_eq!(exp_f32(1000.0), exp_f32(88.0));
        assert!(exp_f32(88.0).is_finite());
    }

    #[test]
    fn threads_change_nothing_bit_for_bit() {
        assert_eq!(run_all(1), run_all(2));
    }
}
