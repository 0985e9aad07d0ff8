//! Matmuls with a frozen weight W, as custom ops whose backward returns only the input's gradient.
//!
//! candle's matmul backward always computes the weight-side gradient, even for a plain tensor that no
//! one will ever read; for a frozen LLM that is a third of the backward's matmul work and a weight-sized
//! buffer per layer (docs/candle.md measured ~40% of CPU time and 1.9 GB of peak memory on SmolLM2).
//! On the CPU, f32 products go through bf16 panels when the weight was packed for them (`bf16.rs`,
//! `model.llm_matmul: bf16`), else through OpenBLAS when the `openblas` feature is on (`blas.rs`).

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Storage, Tensor};

/// The frozen weight in bf16 panels, where the CPU and the job asked for them.
#[cfg(target_arch = "x86_64")]
type Packed = Option<Arc<super::bf16::PackedWeight>>;
#[cfg(not(target_arch = "x86_64"))]
type Packed = Option<Arc<()>>;

/// A linear layer without bias over a frozen weight `[out, in]`.
#[derive(Clone)]
pub struct FrozenLinear {
    weight: Tensor,
    packed: Packed,
}

impl FrozenLinear {
    pub fn new(weight: Tensor) -> Self {
        Self { weight, packed: None }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Converts the weight into bf16 panels for both products (f32 weights on an x86-64 CPU with
    /// AVX-512 BF16); false, and nothing changes, where that is not possible.
    pub fn pack_bf16(&mut self) -> candle_core::Result<bool> {
        #[cfg(target_arch = "x86_64")]
        if super::bf16::available() && self.weight.dtype() == candle_core::DType::F32 && self.weight.device().is_cpu() {
            let (out, inp) = self.weight.dims2()?;
            let w = self.weight.flatten_all()?.to_vec1::<f32>()?;
            self.packed = Some(Arc::new(super::bf16::PackedWeight::new(&w, out, inp)));
            return Ok(true);
        }
        Ok(false)
    }

    /// `x [.., in]` -> `x · Wᵀ [.., out]`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        FrozenMatmul { weight: self.weight.clone(), packed: self.packed.clone(), side: Side::Transposed }.apply(x)
    }
}

/// What computes the frozen f32 products on the CPU (for benchmark reports).
#[cfg(feature = "openblas")]
pub fn cpu_matmul_backend() -> String {
    format!("openblas {}", super::blas::core_name())
}

#[cfg(not(feature = "openblas"))]
pub fn cpu_matmul_backend() -> String {
    "candle gemm".to_string()
}

/// Which product with W the op computes: the layer's forward `x · Wᵀ`, or its input gradient `dy · W`.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Side {
    Transposed,
    Plain,
}

struct FrozenMatmul {
    weight: Tensor,
    packed: Packed,
    side: Side,
}

impl FrozenMatmul {
    /// Flattens the leading dimensions of `x [.., k]` into rows, multiplies, restores them.
    fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims();
        let (rows, inner) = (dims[..dims.len() - 1].iter().product::<usize>(), dims[dims.len() - 1]);
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("x has at least one dimension") = self.out_features()?;
        let x2 = x.reshape((rows, inner))?.contiguous()?;
        x2.apply_op1(self)?.reshape(out_dims)
    }

    fn out_features(&self) -> candle_core::Result<usize> {
        let (out, inp) = self.weight.dims2()?;
        Ok(if self.side == Side::Transposed { out } else { inp })
    }

    /// (b, m, n, k) of the product and the layout of its right-hand side (Wᵀ or W).
    fn dims(&self, layout: &Layout) -> candle_core::Result<((usize, usize, usize, usize), Layout)> {
        let (m, k) = layout.shape().dims2()?;
        let (out, inp) = self.weight.dims2()?;
        let (rhs, n, k_w) = match self.side {
            Side::Transposed => (self.weight.layout().transpose(0, 1)?, out, inp),
            Side::Plain => (self.weight.layout().clone(), inp, out),
        };
        if k != k_w {
            candle_core::bail!("frozen linear: input has {k} features, the weight expects {k_w}");
        }
        Ok(((1, m, n, k), rhs))
    }
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (bmnk, rhs) = self.dims(layout)?;
        let (w, _) = self.weight.storage_and_layout();
        let Storage::Cpu(w) = &*w else { candle_core::bail!("frozen linear: the weight is not on the CPU") };
        let shape = Shape::from((bmnk.1, bmnk.2));
        #[cfg(target_arch = "x86_64")]
        if let (Some(p), CpuStorage::F32(x)) = (&self.packed, storage) {
            if let Some((a, b)) = layout.contiguous_offsets() {
                let panels = if self.side == Side::Transposed { &p.transposed } else { &p.plain };
                let threads = candle_core::utils::get_num_threads();
                let y = super::bf16::matmul(&x[a..b], bmnk.1, panels, threads);
                return Ok((CpuStorage::F32(y), shape));
            }
        }
        #[cfg(feature = "openblas")]
        if let Some(out) =
            super::blas::frozen_sgemm(storage, layout, w, self.weight.layout(), self.side == Side::Transposed)
        {
            return Ok((out, shape));
        }
        Ok((storage.matmul(w, bmnk, layout, &rhs)?, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (bmnk, rhs) = self.dims(layout)?;
        let (w, _) = self.weight.storage_and_layout();
        let Storage::Cuda(w) = &*w else { candle_core::bail!("frozen linear: the weight is not on the GPU") };
        Ok((storage.matmul(w, bmnk, layout, &rhs)?, Shape::from((bmnk.1, bmnk.2))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        // y = x Wᵀ  =>  dx = dy W, and y = x W  =>  dx = dy Wᵀ.
        let side = if self.side == Side::Transposed { Side::Plain } else { Side::Transposed };
        Ok(Some(FrozenMatmul { weight: self.weight.clone(), packed: self.packed.clone(), side }.apply(grad_res)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn matches_plain_matmul_forward_and_input_gradient() {
        let dev = Device::Cpu;
        let w = Tensor::new(&[[1f32, 2.0, 3.0], [-1.0, 0.5, 4.0]], &dev).unwrap();
        let x = Var::from_tensor(&Tensor::new(&[[[0.5f32, -1.0, 2.0]], [[1.0, 1.0, 1.0]]], &dev).unwrap()).unwrap();
        let frozen = FrozenLinear::new(w.clone()).forward(x.as_tensor()).unwrap();
        let plain = x.as_tensor().broadcast_matmul(&w.t().unwrap()).unwrap();
        assert_eq!(frozen.to_vec3::<f32>().unwrap(), plain.to_vec3::<f32>().unwrap());
        let upstream = Tensor::new(&[[[1f32, -2.0]], [[0.5, 3.0]]], &dev).unwrap();
        let g1 = (frozen * &upstream).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (plain * &upstream).unwrap().sum_all().unwrap().backward().unwrap();
        let (a, b) = (g1.get(x.as_tensor()).unwrap(), g2.get(x.as_tensor()).unwrap());
        assert_eq!(a.to_vec3::<f32>().unwrap(), b.to_vec3::<f32>().unwrap());
    }

    #[test]
    fn large_products_match_candle_within_rounding() {
        // Big enough for every blocking path of the BLAS (edges of 7 and 13 included).
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (203, 517), &dev).unwrap();
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 37, 517), &dev).unwrap()).unwrap();
        let frozen = FrozenLinear::new(w.clone()).forward(x.as_tensor()).unwrap();
        let plain = x.as_tensor().broadcast_matmul(&w.t().unwrap()).unwrap();
        let diff = |a: &Tensor, b: &Tensor| a.sub(b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>();
        assert!(diff(&frozen, &plain).unwrap() < 1e-3);
        let upstream = Tensor::randn(0f32, 1.0, (3, 37, 203), &dev).unwrap();
        let g1 = (frozen * &upstream).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (plain * &upstream).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(diff(g1.get(x.as_tensor()).unwrap(), g2.get(x.as_tensor()).unwrap()).unwrap() < 1e-3);
    }
}
