//! The decoder's elementwise steps as fused CPU ops with their own backward passes.
//!
//! Written from primitives, each of these is several passes over [b, t, hidden] tensors forward and
//! more backward; at SmolLM2's sizes that traffic costs about as much as the matmuls (perf, README
//! "Speed of a training step"). candle's own fused versions have no backward (candle-notes.md).
//! On other devices, or dtypes other than f32/f64, the primitive versions run instead.

mod rms_norm;
mod rope;
mod softmax;

pub use rms_norm::rms_norm;
pub use rope::rope;
pub use softmax::causal_softmax;

use candle_core::{DType, Layout, Tensor, WithDType};

/// The contiguous values of a CPU op's operand.
fn contiguous<'a, T: WithDType>(s: &'a [T], l: &Layout) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s[a..b]),
        None => candle_core::bail!("a fused op needs a contiguous input"),
    }
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
