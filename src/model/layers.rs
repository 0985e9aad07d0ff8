//! Building blocks written from primitive candle ops, because candle's fused layer norm and softmax
//! have no backward pass (see docs/candle.md), and seeded where candle's own randomness is not.

use candle_core::{DType, Device, Shape, Tensor, Var, D};
use rand::Rng as _;

use crate::seed::Rng;

/// Layer norm over the last dimension: (x - mean) / sqrt(var + eps) * w + b.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    centred.broadcast_div(&(var + eps)?.sqrt()?)?.broadcast_mul(w)?.broadcast_add(b)
}

/// x [.., in] times w [in, out] plus b [out].
/// Leading dimensions are folded into one so a single 2-D matmul runs (a broadcast batched matmul is
/// several times slower on CPU, forward and backward).
pub fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let dims = x.dims();
    let (rows, inner) = (dims[..dims.len() - 1].iter().product::<usize>(), dims[dims.len() - 1]);
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().expect("x has at least one dimension") = w.dim(1)?;
    x.reshape((rows, inner))?.matmul(w)?.broadcast_add(b)?.reshape(out_dims)
}

/// σ(x) (the side networks' and the GRU's gates) as candle-nn's op, whose backward is σ(1 − σ).
/// Built as 1 / (1 + exp(−x)) from candle's primitives, the backward multiplies −1/u² = 0 by
/// exp(−x) = ∞ wherever x < −88 (f32): NaN gradients from a finite forward, which put NaN into a
/// Beauty GRU run's weights after 11,268 steps (README, "Is the LLM helping on Amazon Beauty?").
pub fn sigmoid(x: &Tensor) -> candle_core::Result<Tensor> {
    candle_nn::ops::sigmoid(x)
}

/// Inverted dropout with a mask drawn from `rng`; identity when `rng` is None (evaluation).
pub fn dropout(x: &Tensor, p: f64, rng: Option<&mut Rng>) -> candle_core::Result<Tensor> {
    let Some(rng) = rng else { return Ok(x.clone()) };
    if p <= 0.0 {
        return Ok(x.clone());
    }
    let keep = 1.0 / (1.0 - p) as f32;
    let mask: Vec<f32> = (0..x.elem_count()).map(|_| if rng.random::<f64>() < p { 0.0 } else { keep }).collect();
    x.mul(&Tensor::from_vec(mask, x.shape(), x.device())?)
}

/// Inverted dropout where row r of `x` (its first dimension) draws its mask from `rngs[r]`: a row
/// gets the same mask whichever other rows share its batch, so a batch split over ranks drops what
/// the whole batch would. Identity when `rngs` is None (evaluation).
pub fn dropout_rows(x: &Tensor, p: f64, rngs: Option<&mut [Rng]>) -> candle_core::Result<Tensor> {
    let Some(rngs) = rngs else { return Ok(x.clone()) };
    if p <= 0.0 {
        return Ok(x.clone());
    }
    let rows = x.dim(0)?;
    if rows != rngs.len() {
        candle_core::bail!("{} row streams for {rows} rows", rngs.len());
    }
    let per_row = x.elem_count() / rows.max(1);
    let keep = 1.0 / (1.0 - p) as f32;
    let mut mask = Vec::with_capacity(x.elem_count());
    for rng in rngs.iter_mut() {
        mask.extend((0..per_row).map(|_| if rng.random::<f64>() < p { 0.0 } else { keep }));
    }
    x.mul(&Tensor::from_vec(mask, x.shape(), x.device())?)
}

/// Mean binary cross-entropy with logits over the positions where `weight` is 1:
/// sum(w * (relu(x) - x*y + log(1 + exp(-|x|)))) / sum(w), numerically stable for any x.
pub fn bce_with_logits(logits: &Tensor, target: f64, weight: &Tensor, weight_sum: f64) -> candle_core::Result<Tensor> {
    let soft = logits.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()?;
    let per = ((logits.relu()? - logits.affine(target, 0.0)?)? + soft)?;
    (per * weight)?.sum_all()?.affine(1.0 / weight_sum.max(1.0), 0.0)
}

/// A tensor drawn from N(0, std^2) with a seeded stream (Box-Muller).
pub fn normal_tensor(shape: impl Into<Shape>, std: f64, rng: &mut Rng, device: &Device) -> candle_core::Result<Tensor> {
    let shape = shape.into();
    let values: Vec<f32> = (0..shape.elem_count()).map(|_| (crate::seed::standard_normal(rng) * std) as f32).collect();
    Tensor::from_vec(values, shape, device)
}

/// A trainable tensor drawn from N(0, std^2) with a seeded stream.
pub fn normal_var(shape: impl Into<Shape>, std: f64, rng: &mut Rng, device: &Device) -> candle_core::Result<Var> {
    Var::from_tensor(&normal_tensor(shape, std, rng, device)?)
}

/// Xavier-normal init for a [fan_a, fan_b] matrix, as the reference SASRec initialises its weights.
pub fn xavier_var(rows: usize, cols: usize, rng: &mut Rng, device: &Device) -> candle_core::Result<Var> {
    normal_var((rows, cols), (2.0 / (rows + cols) as f64).sqrt(), rng, device)
}

pub fn const_var(shape: impl Into<Shape>, value: f64, device: &Device) -> candle_core::Result<Var> {
    Var::from_tensor(&Tensor::ones(shape, DType::F32, device)?.affine(value, 0.0)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sigmoid_gradient_is_finite_where_exp_overflows() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::new(&[-200f32, -90.0, 0.0, 3.0, 200.0], &dev).unwrap()).unwrap();
        let y = sigmoid(x.as_tensor()).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap().get(x.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        let s3 = 1.0 / (1.0 + (-3f32).exp());
        for (got, want) in g.iter().zip([0.0, 0.0, 0.25, s3 * (1.0 - s3), 0.0]) {
            assert!((got - want).abs() < 1e-6, "dσ/dx {g:?}");
        }
        assert_eq!(y.to_vec1::<f32>().unwrap()[0], 0.0);
    }

    #[test]
    fn layer_norm_matches_hand_computation_and_has_gradients() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::new(&[[1f32, 2.0, 3.0, 6.0]], &dev).unwrap()).unwrap();
        let w = Tensor::new(&[1f32, 1.0, 2.0, 1.0], &dev).unwrap();
        let b = Tensor::new(&[0f32, 0.0, 0.0, 1.0], &dev).unwrap();
        let y = layer_norm(x.as_tensor(), &w, &b, 0.0).unwrap();
        // mean 3, var (4+1+0+9)/4 = 3.5
        let s = 3.5f32.sqrt();
        let want = [-2.0 / s, -1.0 / s, 0.0, 3.0 / s + 1.0];
        for (g, w) in y.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().zip(want) {
            assert!((g - w).abs() < 1e-5, "{g} vs {w}");
        }
        let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        assert!(grads.get(x.as_tensor()).is_some());
    }

    #[test]
    fn bce_matches_the_formula() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[2f32, -1.0, 0.5], &dev).unwrap();
        let w = Tensor::new(&[1f32, 1.0, 0.0], &dev).unwrap();
        let l1 = bce_with_logits(&x, 1.0, &w, 2.0).unwrap().to_scalar::<f32>().unwrap();
        let sig = |v: f32| 1.0 / (1.0 + (-v).exp());
        let want = -(sig(2.0).ln() + sig(-1.0).ln()) / 2.0;
        assert!((l1 - want).abs() < 1e-5, "{l1} vs {want}");
        let l0 = bce_with_logits(&x, 0.0, &w, 2.0).unwrap().to_scalar::<f32>().unwrap();
        let want0 = -((1.0 - sig(2.0)).ln() + (1.0 - sig(-1.0)).ln()) / 2.0;
        assert!((l0 - want0).abs() < 1e-5, "{l0} vs {want0}");
    }

    #[test]
    fn dropout_is_seeded_and_identity_without_rng() {
        let x = Tensor::ones((4, 8), DType::F32, &Device::Cpu).unwrap();
        let a = dropout(&x, 0.5, Some(&mut crate::seed::stream(1, "d", 0))).unwrap().to_vec2::<f32>().unwrap();
        let b = dropout(&x, 0.5, Some(&mut crate::seed::stream(1, "d", 0))).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(a, b);
        assert!(a.iter().flatten().all(|&v| v == 0.0 || v == 2.0));
        assert_eq!(dropout(&x, 0.5, None).unwrap().to_vec2::<f32>().unwrap(), x.to_vec2::<f32>().unwrap());
    }
}
