//! The backbone of the "is the LLM helping?" ablation (`model.illmrec.backbone: gru`): a prompt's
//! adapted item tokens, in order, through a one-layer GRU of the LLM's width instead of the frozen
//! LLM; the last state stands where the LLM's [REC] state would. Everything else (adaptor, heads,
//! L_RERI, the prompts' item order) is the I-LLMRec model's, so the difference in accuracy is what
//! the LLM adds. The GRU has no language head: L_RISA does not apply.

use candle_core::{DType, Device, Tensor, Var, D};

use super::uniform;
use crate::model::layers::{linear, sigmoid};
use crate::model::Result;
use crate::seed::Rng;

/// PyTorch's GRU cell with gates in (reset, update, new) order:
///   r = σ(x W_xr + b_xr + h W_hr + b_hr),  z = σ(x W_xz + b_xz + h W_hz + b_hz)
///   n = tanh(x W_xn + b_xn + r ⊙ (h W_hn + b_hn)),  h' = (1 − z) ⊙ n + z ⊙ h
pub struct Gru {
    w_x: Var,
    b_x: Var,
    w_h: Var,
    b_h: Var,
    width: usize,
}

impl Gru {
    /// A fresh GRU of `width`, PyTorch's init (uniform in ±1/sqrt(width)).
    pub fn new(width: usize, rng: &mut Rng, dtype: DType, device: &Device) -> Result<Self> {
        let b = 1.0 / (width as f64).sqrt();
        Ok(Self {
            w_x: uniform(&[width, 3 * width], b, rng, dtype, device)?,
            b_x: uniform(&[3 * width], b, rng, dtype, device)?,
            w_h: uniform(&[width, 3 * width], b, rng, dtype, device)?,
            b_h: uniform(&[3 * width], b, rng, dtype, device)?,
            width,
        })
    }

    pub fn named(&self, out: &mut Vec<(String, Var)>) {
        for (n, v) in [("w_x", &self.w_x), ("b_x", &self.b_x), ("w_h", &self.w_h), ("b_h", &self.b_h)] {
            out.push((format!("gru.{n}"), v.clone()));
        }
    }

    /// The last states `[rows, width]` of left-padded sequences `xs` `[rows, steps, width]`; `keep`
    /// `[rows, steps]` is 1 at real steps and 0 at padding, where the state does not move.
    pub fn last_states(&self, xs: &Tensor, keep: &Tensor) -> candle_core::Result<Tensor> {
        let (rows, steps, w) = xs.dims3()?;
        let gx = linear(&xs.reshape((rows * steps, w))?, &self.w_x, &self.b_x)?.reshape((rows, steps, 3 * w))?;
        let mut h = Tensor::zeros((rows, w), xs.dtype(), xs.device())?;
        for t in 0..steps {
            let gx_t = gx.narrow(1, t, 1)?.squeeze(1)?;
            let gh = linear(&h, &self.w_h, &self.b_h)?;
            let part = |g: &Tensor, i: usize| g.narrow(D::Minus1, i * w, w);
            let r = sigmoid(&(part(&gx_t, 0)? + part(&gh, 0)?)?)?;
            let z = sigmoid(&(part(&gx_t, 1)? + part(&gh, 1)?)?)?;
            let n = (part(&gx_t, 2)? + (r * part(&gh, 2)?)?)?.tanh()?;
            let next = ((z.affine(-1.0, 1.0)? * n)? + (&z * &h)?)?;
            let m = keep.narrow(1, t, 1)?;
            h = (next.broadcast_mul(&m)? + h.broadcast_mul(&m.affine(-1.0, 1.0)?)?)?;
        }
        Ok(h)
    }

    pub fn width(&self) -> usize {
        self.width
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_step_matches_the_cell_by_hand_and_padding_leaves_the_state() {
        // Width 1, all weights 0.5 and biases 0, input 1 from h = 0:
        // r = z = σ(0.5), n = tanh(0.5 + r · 0) = tanh(0.5), h' = (1 − σ(0.5)) · tanh(0.5).
        let dev = Device::Cpu;
        let g = Gru::new(1, &mut crate::seed::stream(1, "g", 0), DType::F32, &dev).unwrap();
        for v in [&g.w_x, &g.w_h] {
            v.set(&Tensor::new(&[[0.5f32, 0.5, 0.5]], &dev).unwrap()).unwrap();
        }
        for v in [&g.b_x, &g.b_h] {
            v.set(&Tensor::zeros(3, DType::F32, &dev).unwrap()).unwrap();
        }
        // Row 0: padding then 1; row 1: 1 alone at the last step too.
        let xs = Tensor::new(&[[[0f32], [1.0]], [[7.0], [1.0]]], &dev).unwrap();
        let keep = Tensor::new(&[[0f32, 1.0], [0.0, 1.0]], &dev).unwrap();
        let h = g.last_states(&xs, &keep).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let s = 1.0 / (1.0 + (-0.5f32).exp());
        let expected = (1.0 - s) * 0.5f32.tanh();
        assert!((h[0] - expected).abs() < 1e-6, "{h:?} vs {expected}");
        assert_eq!(h[0], h[1], "a padded step must not move the state");
    }
}
