//! Rotary position embedding as one op: each pair of a head's coordinates is rotated by its
//! position's angle. The backward is the rotation by the opposite angle (the same op with sin
//! negated), so it needs nothing from the forward.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor, WithDType};

use super::{fused, map_rows, run, values, Kernel};

/// RoPE of `x [b, heads, t, head_dim]` with tables `cos`, `sin` `[t, head_dim / 2]`; pairs are
/// (i, i + head_dim/2) (Hugging Face) or (2i, 2i + 1) (`interleaved`, GGUF). Differentiable in `x`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, interleaved: bool) -> candle_core::Result<Tensor> {
    if !fused(x) {
        return primitive(x, cos, sin, interleaved);
    }
    x.contiguous()?.apply_op1(Rope::new(x, cos, sin, interleaved)?)
}

/// The gradient of `rope(x, ..)` with respect to `x` for the upstream gradient `dy`: the rotation by
/// the opposite angles, on the CPU (the decoder layer's own backward, `layer.rs`).
pub fn rope_backward(dy: &Tensor, cos: &Tensor, sin: &Tensor, interleaved: bool) -> candle_core::Result<Tensor> {
    let op = Rope { inverse: true, ..Rope::new(dy, cos, sin, interleaved)? };
    dy.contiguous()?.apply_op1_no_bwd(&op)
}

fn primitive(x: &Tensor, cos: &Tensor, sin: &Tensor, interleaved: bool) -> candle_core::Result<Tensor> {
    if interleaved {
        candle_nn::rotary_emb::rope_i_slow(x, cos, sin)
    } else {
        candle_nn::rotary_emb::rope_slow(x, cos, sin)
    }
}

#[derive(Clone)]
struct Rope {
    cos: Arc<Vec<f64>>,
    sin: Arc<Vec<f64>>,
    t: usize,
    d: usize,
    interleaved: bool,
    /// Rotate by −angle (the backward).
    inverse: bool,
}

impl Rope {
    /// Checks the tables against `x [b, heads, t, head_dim]`.
    fn new(x: &Tensor, cos: &Tensor, sin: &Tensor, interleaved: bool) -> candle_core::Result<Self> {
        let (_, _, t, d) = x.dims4()?;
        if cos.dims() != [t, d / 2] || sin.dims() != [t, d / 2] {
            candle_core::bail!("rope: tables {:?} / {:?} for {t} positions of {d} dims", cos.dims(), sin.dims());
        }
        Ok(Rope { cos: values(cos)?, sin: values(sin)?, t, d, interleaved, inverse: false })
    }
}

impl Kernel for Rope {
    fn apply<T: WithDType>(&self, x: &[T]) -> Vec<T> {
        let half = self.d / 2;
        let sign = if self.inverse { -1.0 } else { 1.0 };
        map_rows(x, None, self.d, |r, row, _, o| {
            let pos = r % self.t;
            for i in 0..half {
                let (c, s) = (self.cos[pos * half + i], sign * self.sin[pos * half + i]);
                let (a, b) = if self.interleaved { (2 * i, 2 * i + 1) } else { (i, i + half) };
                let (xa, xb) = (row[a].to_f64(), row[b].to_f64());
                o[a].write(T::from_f64(xa * c - xb * s));
                o[b].write(T::from_f64(xa * s + xb * c));
            }
        })
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        run(self, "rope", s, l)
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let inverse = Rope { inverse: !self.inverse, ..self.clone() };
        Ok(Some(grad_res.contiguous()?.apply_op1(inverse)?))
    }
}

#[cfg(test)]
mod tests {
    use super::super::{max_abs_diff, random_f64};
    use super::*;
    use candle_core::Var;

    #[test]
    fn matches_candles_slow_ropes_forward_and_backward() {
        let (cos, sin) = (random_f64(&[5, 4], 1), random_f64(&[5, 4], 2));
        let up = random_f64(&[2, 3, 5, 8], 3);
        for interleaved in [false, true] {
            let x = Var::from_tensor(&random_f64(&[2, 3, 5, 8], 4)).unwrap();
            let fused = rope(x.as_tensor(), &cos, &sin, interleaved).unwrap();
            let plain = primitive(x.as_tensor(), &cos, &sin, interleaved).unwrap();
            assert!(max_abs_diff(&fused, &plain) < 1e-12, "interleaved {interleaved}");
            let g1 = (fused * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (plain * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let d = max_abs_diff(g1.get(x.as_tensor()).unwrap(), g2.get(x.as_tensor()).unwrap());
            assert!(d < 1e-12, "interleaved {interleaved}: {d}");
        }
    }
}
