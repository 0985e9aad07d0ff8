//! The decoder's elementwise steps as fused CPU ops with their own backward passes.
//!
//! Written from primitives, each of these is several passes over [b, t, hidden] tensors forward and
//! more backward; at SmolLM2's sizes that traffic costs about as much as the matmuls (perf, README
//! "Speed of a training step"). candle's own fused versions have no backward (docs/candle.md).
//! On other devices, or dtypes other than f32/f64, the primitive versions run instead.

mod rms_norm;
mod rope;
mod softmax;

pub use rms_norm::rms_norm;
pub use rope::rope;
pub use softmax::{causal_softmax, causal_softmax_after};

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

/// Whether `x` takes the fused path.
fn fused(x: &Tensor) -> bool {
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
