//! RMS norm with a frozen weight: y = x / sqrt(mean(x²) + eps) · w, one pass per row forward and one
//! backward: with a = g ⊙ w and r = 1 / sqrt(mean(x²) + eps), dx = r·a − x · r³ · (a·x) / n.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor, WithDType, D};

use super::{fused, map_rows, run, run2, values, Kernel, Kernel2};

/// RMS norm over the last dimension of `x`; differentiable in `x` (the weight is frozen).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    if !fused(x) {
        return primitive(x, w, eps);
    }
    let n = x.dim(D::Minus1)?;
    if w.elem_count() != n {
        candle_core::bail!("rms norm: weight of {} values for rows of {n}", w.elem_count());
    }
    x.contiguous()?.apply_op1(RmsNorm { w: values(w)?, eps })
}

/// The gradient of `rms_norm(x, w, eps)` with respect to `x` for the upstream gradient `dy`, on the
/// CPU (the decoder layer's own backward, `layer.rs`).
pub fn rms_norm_backward(x: &Tensor, w: &Tensor, eps: f64, dy: &Tensor) -> candle_core::Result<Tensor> {
    RmsNorm { w: values(w)?, eps }.backward(x, dy)
}

/// The same from primitive ops (other devices, and the tests' reference).
fn primitive(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(w)
}

#[derive(Clone)]
struct RmsNorm {
    w: Arc<Vec<f64>>,
    eps: f64,
}

/// One row's kernel on AVX-512: (x row, weight, upstream row or empty, eps, out row).
#[cfg(target_arch = "x86_64")]
type RowKernel = unsafe fn(&[f32], &[f32], &[f32], f32, &mut [std::mem::MaybeUninit<f32>]);

/// The f32 rows on AVX-512 where the CPU has it (`avx512.rs`): `f(x row, dy row, out row)` over the
/// rows of `x` (and `dy`, for the backward); None where the scalar kernel runs instead.
#[cfg(target_arch = "x86_64")]
fn avx512_rows(
    op: &RmsNorm,
    x: (&CpuStorage, &Layout),
    dy: Option<(&CpuStorage, &Layout)>,
    f: RowKernel,
) -> candle_core::Result<Option<(CpuStorage, Shape)>> {
    let (CpuStorage::F32(xs), true) = (x.0, super::avx512::available()) else { return Ok(None) };
    let xs = super::contiguous(xs, x.1)?;
    let dy = match dy {
        Some((CpuStorage::F32(g), l)) => Some(super::contiguous(g, l)?),
        Some(_) => return Ok(None),
        None => None,
    };
    let w: Vec<f32> = op.w.iter().map(|&v| v as f32).collect();
    let eps = op.eps as f32;
    // SAFETY: AVX-512 F checked above; map_rows hands rows of one width (the weight's).
    let out = map_rows(xs, dy, w.len(), |_, row, g, out| unsafe { f(row, &w, g, eps, out) });
    Ok(Some((CpuStorage::F32(out), x.1.shape().clone())))
}

impl RmsNorm {
    fn backward(&self, x: &Tensor, dy: &Tensor) -> candle_core::Result<Tensor> {
        x.contiguous()?.apply_op2_no_bwd(&dy.contiguous()?, &RmsNormGrad(self.clone()))
    }

    fn inv_rms<T: WithDType>(&self, row: &[T]) -> f64 {
        let ms = row.iter().map(|v| v.to_f64() * v.to_f64()).sum::<f64>() / row.len() as f64;
        1.0 / (ms + self.eps).sqrt()
    }
}

impl Kernel for RmsNorm {
    fn apply<T: WithDType>(&self, x: &[T]) -> Vec<T> {
        let n = self.w.len();
        map_rows(x, None, n, |_, row, _, out| {
            let r = self.inv_rms(row);
            for ((o, v), w) in out.iter_mut().zip(row).zip(self.w.iter()) {
                o.write(T::from_f64(v.to_f64() * r * w));
            }
        })
    }
}

impl Kernel2 for RmsNormGrad {
    fn apply<T: WithDType>(&self, x: &[T], g: &[T]) -> Vec<T> {
        let (op, n) = (&self.0, self.0.w.len());
        map_rows(x, Some(g), n, |_, row, grow, out| {
            let r = op.inv_rms(row);
            let a = |j: usize| grow[j].to_f64() * op.w[j];
            let ax: f64 = (0..n).map(|j| a(j) * row[j].to_f64()).sum();
            let k = r * r * r * ax / n as f64;
            for (j, o) in out.iter_mut().enumerate() {
                o.write(T::from_f64(r * a(j) - row[j].to_f64() * k));
            }
        })
    }
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        #[cfg(target_arch = "x86_64")]
        if let Some(out) =
            avx512_rows(self, (s, l), None, |x, w, _, eps, out| unsafe { super::avx512::rms_norm(x, w, eps, out) })?
        {
            return Ok(out);
        }
        run(self, "rms norm", s, l)
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(self.backward(arg, grad_res)?))
    }
}

/// The backward pass as an op of (input, upstream gradient).
struct RmsNormGrad(RmsNorm);

impl CustomOp2 for RmsNormGrad {
    fn name(&self) -> &'static str {
        "rms-norm-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        #[cfg(target_arch = "x86_64")]
        if let Some(out) = avx512_rows(&self.0, (s1, l1), Some((s2, l2)), |x, w, g, eps, out| unsafe {
            super::avx512::rms_norm_grad(x, w, g, eps, out)
        })? {
            return Ok(out);
        }
        run2(self, "rms norm", (s1, l1), (s2, l2))
    }
}

#[cfg(test)]
mod tests {
    use super::super::{max_abs_diff, random_f64};
    use super::*;
    use candle_core::Var;

    #[test]
    fn matches_the_primitive_ops_forward_and_backward() {
        let x = Var::from_tensor(&random_f64(&[2, 3, 7], 1)).unwrap();
        let w = random_f64(&[7], 2);
        let up = random_f64(&[2, 3, 7], 3);
        let fused = rms_norm(x.as_tensor(), &w, 1e-5).unwrap();
        let plain = primitive(x.as_tensor(), &w, 1e-5).unwrap();
        assert!(max_abs_diff(&fused, &plain) < 1e-12);
        let g1 = (fused * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (plain * &up).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_abs_diff(g1.get(x.as_tensor()).unwrap(), g2.get(x.as_tensor()).unwrap()) < 1e-12);
    }

    #[test]
    fn f32_rows_match_the_f64_kernel_within_rounding() {
        // Widths below, at and past the 16-lane chunks, rows of very different scales.
        for width in [7usize, 16, 37, 576] {
            let scales = random_f64(&[5, 1], 4).exp().unwrap();
            let x64 = random_f64(&[5, width], 5).broadcast_mul(&scales).unwrap();
            let (w64, up64) = (random_f64(&[width], 6), random_f64(&[5, width], 7));
            let f32s = |t: &Tensor| t.to_dtype(candle_core::DType::F32).unwrap();
            let x32 = Var::from_tensor(&f32s(&x64)).unwrap();
            let x64 = Var::from_tensor(&f32s(&x64).to_dtype(candle_core::DType::F64).unwrap()).unwrap();
            let (y32, y64) =
                (rms_norm(x32.as_tensor(), &f32s(&w64), 1e-5).unwrap(), rms_norm(x64.as_tensor(), &w64, 1e-5).unwrap());
            let rel = |a: &Tensor, b: &Tensor| {
                let a = a.to_dtype(candle_core::DType::F64).unwrap();
                max_abs_diff(&a, b) / b.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap()
            };
            assert!(rel(&y32, &y64) < 1e-6, "width {width}: outputs {:.2e}", rel(&y32, &y64));
            let g32 = (y32 * f32s(&up64)).unwrap().sum_all().unwrap().backward().unwrap();
            let g64 = (y64 * &up64).unwrap().sum_all().unwrap().backward().unwrap();
            let (a, b) = (g32.get(x32.as_tensor()).unwrap(), g64.get(x64.as_tensor()).unwrap());
            assert!(rel(a, b) < 1e-5, "width {width}: gradients {:.2e}", rel(a, b));
        }
    }
}
