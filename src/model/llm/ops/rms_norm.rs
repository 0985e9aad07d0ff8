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

impl RmsNorm {
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
                *o = T::from_f64(v.to_f64() * r * w);
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
                *o = T::from_f64(r * a(j) - row[j].to_f64() * k);
            }
        })
    }
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        run(self, "rms norm", s, l)
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(arg.apply_op2_no_bwd(&grad_res.contiguous()?, &RmsNormGrad(self.clone()))?))
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
}
