//! Matmuls with a frozen weight W, as custom ops whose backward returns only the input's gradient.
//!
//! candle's matmul backward always computes the weight-side gradient, even for a plain tensor that no
//! one will ever read; for a frozen LLM that is a third of the backward's matmul work and a weight-sized
//! buffer per layer (docs/candle.md measured ~40% of CPU time and 1.9 GB of peak memory on SmolLM2).
//! On the CPU, f32 products go through bf16 panels when the weight was packed for them (`bf16/`,
//! `model.llm_matmul: bf16`), else through OpenBLAS when the `openblas` feature is on (`blas.rs`).

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Storage, Tensor};

/// A frozen weight `[out, in]` as the products read it.
#[derive(Clone)]
enum Weight {
    /// As loaded (f32 on the CPU, any dtype on a GPU): candle's matmul, or OpenBLAS.
    Dense(Tensor),
    /// In bf16 panels for both products; the dense values are let go.
    #[cfg(target_arch = "x86_64")]
    Bf16 { packed: Arc<super::bf16::PackedWeight>, out: usize, inp: usize },
}

impl Weight {
    fn dims(&self) -> candle_core::Result<(usize, usize)> {
        match self {
            Weight::Dense(t) => t.dims2(),
            #[cfg(target_arch = "x86_64")]
            Weight::Bf16 { out, inp, .. } => Ok((*out, *inp)),
        }
    }
}

/// A linear layer without bias over a frozen weight `[out, in]`.
#[derive(Clone)]
pub struct FrozenLinear {
    weight: Weight,
}

impl FrozenLinear {
    pub fn new(weight: Tensor) -> Self {
        Self { weight: Weight::Dense(weight) }
    }

    /// Converts the weight into bf16 panels for both products (f32 weights on an x86-64 CPU with
    /// AVX-512 BF16); false, and nothing changes, where that is not possible.
    pub fn pack_bf16(&mut self) -> candle_core::Result<bool> {
        #[cfg(target_arch = "x86_64")]
        if let Weight::Dense(w) = &self.weight {
            if super::bf16::available() && w.dtype() == candle_core::DType::F32 && w.device().is_cpu() {
                let (out, inp) = w.dims2()?;
                let packed = Arc::new(super::bf16::PackedWeight::new(&w.flatten_all()?.to_vec1::<f32>()?, out, inp));
                self.weight = Weight::Bf16 { packed, out, inp };
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The layer of output rows `ids` of W (logits over a few tokens): a dense weight's rows, or a
    /// packed one's rows packed again, so each output equals that column of the full product.
    pub fn select_rows(&self, ids: &[u32]) -> candle_core::Result<FrozenLinear> {
        match &self.weight {
            Weight::Dense(w) => {
                let idx = Tensor::from_vec(ids.to_vec(), ids.len(), w.device())?;
                Ok(FrozenLinear::new(w.index_select(&idx, 0)?))
            }
            #[cfg(target_arch = "x86_64")]
            Weight::Bf16 { packed, inp, .. } => {
                let rows = Tensor::from_vec(packed.rows(ids), (ids.len(), *inp), &candle_core::Device::Cpu)?;
                let mut lin = FrozenLinear::new(rows);
                lin.pack_bf16()?;
                Ok(lin)
            }
        }
    }

    /// `x [.., in]` -> `x · Wᵀ [.., out]`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        FrozenMatmul { weight: self.weight.clone(), side: Side::Transposed }.apply(x)
    }

    /// The input gradient of `forward` for the upstream gradient `dy [.., out]`: `dy · W [.., in]`.
    pub fn backward(&self, dy: &Tensor) -> candle_core::Result<Tensor> {
        FrozenMatmul { weight: self.weight.clone(), side: Side::Plain }.apply(dy)
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

/// The kernel that runs the bf16 products of packed weights on this CPU, for the reports.
#[cfg(target_arch = "x86_64")]
pub fn cpu_bf16_kernel() -> &'static str {
    super::bf16::kernel_name()
}

#[cfg(not(target_arch = "x86_64"))]
pub fn cpu_bf16_kernel() -> &'static str {
    "none (bf16 products need x86-64)"
}

/// Which product with W the op computes: the layer's forward `x · Wᵀ`, or its input gradient `dy · W`.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Side {
    Transposed,
    Plain,
}

struct FrozenMatmul {
    weight: Weight,
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
        let (out, inp) = self.weight.dims()?;
        Ok(if self.side == Side::Transposed { out } else { inp })
    }

    /// (b, m, n, k) of the product.
    fn dims(&self, layout: &Layout) -> candle_core::Result<(usize, usize, usize, usize)> {
        let (m, k) = layout.shape().dims2()?;
        let (out, inp) = self.weight.dims()?;
        let (n, k_w) = if self.side == Side::Transposed { (out, inp) } else { (inp, out) };
        if k != k_w {
            candle_core::bail!("frozen linear: input has {k} features, the weight expects {k_w}");
        }
        Ok((1, m, n, k))
    }

    /// The right-hand side's layout (Wᵀ or W) for candle's matmul.
    fn rhs_layout(&self, w: &Tensor) -> candle_core::Result<Layout> {
        match self.side {
            Side::Transposed => w.layout().transpose(0, 1),
            Side::Plain => Ok(w.layout().clone()),
        }
    }
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let bmnk = self.dims(layout)?;
        let shape = Shape::from((bmnk.1, bmnk.2));
        let weight = match &self.weight {
            Weight::Dense(w) => w,
            #[cfg(target_arch = "x86_64")]
            Weight::Bf16 { packed, .. } => {
                let (CpuStorage::F32(x), Some((a, b))) = (storage, layout.contiguous_offsets()) else {
                    candle_core::bail!("frozen linear: bf16 products take contiguous f32 inputs")
                };
                let panels = if self.side == Side::Transposed { &packed.transposed } else { &packed.plain };
                let y = super::bf16::matmul(&x[a..b], bmnk.1, panels, candle_core::utils::get_num_threads());
                return Ok((CpuStorage::F32(y), shape));
            }
        };
        let (w, _) = weight.storage_and_layout();
        let Storage::Cpu(w) = &*w else { candle_core::bail!("frozen linear: the weight is not on the CPU") };
        #[cfg(feature = "openblas")]
        if let Some(out) = super::blas::frozen_sgemm(storage, layout, w, weight.layout(), self.side == Side::Transposed)
        {
            return Ok((out, shape));
        }
        Ok((storage.matmul(w, bmnk, layout, &self.rhs_layout(weight)?)?, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let bmnk = self.dims(layout)?;
        let Weight::Dense(weight) = &self.weight else {
            candle_core::bail!("frozen linear: bf16 panels are for the CPU")
        };
        let (w, _) = weight.storage_and_layout();
        let Storage::Cuda(w) = &*w else { candle_core::bail!("frozen linear: the weight is not on the GPU") };
        Ok((storage.matmul(w, bmnk, layout, &self.rhs_layout(weight)?)?, Shape::from((bmnk.1, bmnk.2))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        // y = x Wᵀ  =>  dx = dy W, and y = x W  =>  dx = dy Wᵀ.
        let side = if self.side == Side::Transposed { Side::Plain } else { Side::Transposed };
        Ok(Some(FrozenMatmul { weight: self.weight.clone(), side }.apply(grad_res)?))
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
    fn selected_rows_give_those_columns_of_the_product_dense_and_packed() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (70, 33), &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (5, 33), &dev).unwrap();
        let ids = [69u32, 3, 40];
        let mut full = FrozenLinear::new(w);
        for packed in [false, true] {
            if packed && !full.pack_bf16().unwrap() {
                eprintln!("no bf16 panels on this CPU: the packed case is not checked");
                break;
            }
            let all = full.forward(&x).unwrap().to_vec2::<f32>().unwrap();
            let few = full.select_rows(&ids).unwrap().forward(&x).unwrap().to_vec2::<f32>().unwrap();
            for (a, f) in all.iter().zip(&few) {
                for (j, id) in ids.iter().enumerate() {
                    assert!((f[j] - a[*id as usize]).abs() < 1e-5, "packed {packed}: {} vs {}", f[j], a[*id as usize]);
                }
            }
        }
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
