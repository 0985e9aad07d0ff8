//! Causal softmax over attention scores as one op with its own backward, on the CPU.
//!
//! Written from primitives (scale, add a mask, max, subtract, exp, sum, divide), the softmax makes
//! six [b, heads, t, t] tensors forward and more backward; at prompt lengths of a few hundred tokens
//! that elementwise traffic and its allocations cost more than the matmuls (measured with
//! `illmrec bench step` and perf). Here the forward is one pass per row that only touches the
//! causal part, and the backward is one more: dS = scale · P ⊙ (dP − Σ_k dP_k P_k).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor, WithDType, D};

use super::{run, run2, Kernel, Kernel2};

/// `softmax(scale · x + causal mask)` over the last dimension of `x` `[.., t, t]`: row i keeps
/// columns 0..=i. Differentiable; on devices other than the CPU it runs as primitive ops.
pub fn causal_softmax(x: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    causal_softmax_after(x, scale, 0)
}

/// The same for `t` new positions after `past` earlier ones: scores `[.., t, past + t]`, row i keeps
/// columns 0..=past + i (generation with a key/value cache).
pub fn causal_softmax_after(x: &Tensor, scale: f64, past: usize) -> candle_core::Result<Tensor> {
    let t = x.dim(D::Minus2)?;
    let cols = x.dim(D::Minus1)?;
    if cols != past + t {
        candle_core::bail!(
            "causal softmax after {past} positions needs [.., t, {past} + t] scores, got {:?}",
            x.dims()
        );
    }
    if x.device().is_cpu() {
        return x.contiguous()?.apply_op1(CausalSoftmax { scale, t, past });
    }
    let mask: Vec<f32> = (0..t * cols).map(|i| if i % cols > past + i / cols { -1e9 } else { 0.0 }).collect();
    let mask = Tensor::from_vec(mask, (t, cols), x.device())?.to_dtype(x.dtype())?;
    candle_nn::ops::softmax(&(x * scale)?.broadcast_add(&mask)?, D::Minus1)
}

struct CausalSoftmax {
    scale: f64,
    /// Rows per matrix (new positions).
    t: usize,
    /// Earlier positions every row also sees; a row is `past + t` long.
    past: usize,
}

impl Kernel for CausalSoftmax {
    fn apply<T: WithDType>(&self, x: &[T]) -> Vec<T> {
        let (t, scale, cols) = (self.t, self.scale, self.past + self.t);
        let mut out = vec![T::from_f64(0.0); x.len()];
        for (r, (row, o)) in x.chunks_exact(cols).zip(out.chunks_exact_mut(cols)).enumerate() {
            let keep = self.past + r % t + 1;
            let m = row[..keep].iter().fold(f64::NEG_INFINITY, |m, v| m.max(v.to_f64() * scale));
            let mut sum = 0.0;
            for (o, v) in o[..keep].iter_mut().zip(&row[..keep]) {
                let e = (v.to_f64() * scale - m).exp();
                sum += e;
                *o = T::from_f64(e);
            }
            for o in &mut o[..keep] {
                *o = T::from_f64(o.to_f64() / sum);
            }
        }
        out
    }
}

impl Kernel2 for CausalSoftmaxGrad {
    fn apply<T: WithDType>(&self, p: &[T], g: &[T]) -> Vec<T> {
        let (t, scale, cols) = (self.0.t, self.0.scale, self.0.past + self.0.t);
        let mut out = vec![T::from_f64(0.0); p.len()];
        for (r, ((pr, gr), o)) in
            p.chunks_exact(cols).zip(g.chunks_exact(cols)).zip(out.chunks_exact_mut(cols)).enumerate()
        {
            let keep = self.0.past + r % t + 1;
            let dot: f64 = pr[..keep].iter().zip(&gr[..keep]).map(|(p, g)| p.to_f64() * g.to_f64()).sum();
            for ((o, p), g) in o[..keep].iter_mut().zip(&pr[..keep]).zip(&gr[..keep]) {
                *o = T::from_f64(scale * p.to_f64() * (g.to_f64() - dot));
            }
        }
        out
    }
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        run(self, "causal softmax", s, l)
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(res.apply_op2_no_bwd(
            &grad_res.contiguous()?,
            &CausalSoftmaxGrad(CausalSoftmax { scale: self.scale, t: self.t, past: self.past }),
        )?))
    }
}

/// The backward pass as an op of (probabilities, upstream gradient).
struct CausalSoftmaxGrad(CausalSoftmax);

impl CustomOp2 for CausalSoftmaxGrad {
    fn name(&self) -> &'static str {
        "causal-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        run2(self, "causal softmax", (s1, l1), (s2, l2))
    }
}

#[cfg(test)]
mod tests {
    use super::super::{max_abs_diff, random_f64};
    use super::*;
    use candle_core::Var;

    /// The primitive-op reference the fused op replaces.
    fn reference(x: &Tensor, scale: f64) -> Tensor {
        let t = x.dim(D::Minus1).unwrap();
        let mask: Vec<f64> = (0..t * t).map(|i| if i % t > i / t { -1e9 } else { 0.0 }).collect();
        let mask = Tensor::from_vec(mask, (t, t), x.device()).unwrap().to_dtype(x.dtype()).unwrap();
        candle_nn::ops::softmax(&(x * scale).unwrap().broadcast_add(&mask).unwrap(), D::Minus1).unwrap()
    }

    #[test]
    fn after_earlier_positions_each_row_sees_them_and_its_own_prefix() {
        // 2 new rows after 3 earlier positions: row 0 keeps 4 columns, row 1 all 5.
        let x = random_f64(&[1, 2, 2, 5], 4);
        let fused = causal_softmax_after(&x, 0.5, 3).unwrap();
        let mask: Vec<f64> = (0..10).map(|i| if i % 5 > 3 + i / 5 { -1e9 } else { 0.0 }).collect();
        let mask = Tensor::from_vec(mask, (2, 5), x.device()).unwrap();
        let plain = candle_nn::ops::softmax(&(&x * 0.5).unwrap().broadcast_add(&mask).unwrap(), D::Minus1).unwrap();
        assert!(max_abs_diff(&fused, &plain) < 1e-12);
        assert!(causal_softmax_after(&x, 0.5, 2).is_err());
    }

    #[test]
    fn matches_the_primitive_ops_forward_and_backward() {
        let x = Var::from_tensor(&random_f64(&[2, 3, 5, 5], 2)).unwrap();
        let up = random_f64(&[2, 3, 5, 5], 3);
        let fused = causal_softmax(&(x.as_tensor() * 2.0).unwrap(), 0.7).unwrap();
        let plain = reference(&(x.as_tensor() * 2.0).unwrap(), 0.7);
        assert!(max_abs_diff(&fused, &plain) < 1e-12);
        let g1 = (fused * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (plain * &up).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_abs_diff(g1.get(x.as_tensor()).unwrap(), g2.get(x.as_tensor()).unwrap()) < 1e-12);
    }
}
