//! The optimizer and what surrounds it, on flat host vectors of the trainable set: gradients flattened
//! in the model's fixed variable order (the buffer a data-parallel step all-reduces), global-norm
//! clipping, and AdamW whose moments are plain vectors that checkpoints save (candle-nn's AdamW keeps
//! them private).

use candle_core::{backprop::GradStore, Tensor, Var};

/// AdamW (decoupled weight decay); with weight_decay 0 it is Adam.
#[derive(Debug, Clone, PartialEq)]
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Updates taken so far.
    pub step: u64,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

impl AdamW {
    pub fn new(len: usize, betas: [f64; 2], weight_decay: f64) -> Self {
        Self {
            beta1: betas[0],
            beta2: betas[1],
            eps: 1e-8,
            weight_decay,
            step: 0,
            m: vec![0.0; len],
            v: vec![0.0; len],
        }
    }

    /// One update of `params` from `grads` at learning rate `lr`.
    pub fn update(&mut self, params: &mut [f32], grads: &[f32], lr: f64) {
        let n = params.len();
        self.update_groups(params, grads, &[(n, lr)]);
    }

    /// One update where consecutive parameter groups have their own rates: `groups` lists (end of
    /// the group, rate) in order, the last ending at `params.len()`.
    pub fn update_groups(&mut self, params: &mut [f32], grads: &[f32], groups: &[(usize, f64)]) {
        assert_eq!(params.len(), self.m.len(), "parameter count changed under the optimizer");
        assert_eq!(grads.len(), self.m.len(), "gradient count does not match the parameters");
        assert_eq!(groups.last().map(|g| g.0), Some(params.len()), "the groups must cover the parameters");
        self.step += 1;
        let t = self.step as i32;
        let (c1, c2) = (1.0 - self.beta1.powi(t), 1.0 - self.beta2.powi(t));
        let mut group = 0;
        for i in 0..params.len() {
            while i >= groups[group].0 {
                group += 1;
            }
            let lr = groups[group].1;
            let g = grads[i] as f64;
            let m = self.beta1 * self.m[i] as f64 + (1.0 - self.beta1) * g;
            let v = self.beta2 * self.v[i] as f64 + (1.0 - self.beta2) * g * g;
            self.m[i] = m as f32;
            self.v[i] = v as f32;
            let update = (m / c1) / ((v / c2).sqrt() + self.eps);
            let p = params[i] as f64 * (1.0 - lr * self.weight_decay) - lr * update;
            params[i] = p as f32;
        }
    }
}

/// Values in a set of variables.
pub fn count(vars: &[&Var]) -> usize {
    vars.iter().map(|v| v.elem_count()).sum()
}

/// The gradients of `vars`, in order, as one f32 vector; a var without a gradient contributes zeros.
pub fn flatten_grads(vars: &[&Var], grads: &GradStore) -> candle_core::Result<Vec<f32>> {
    let mut out = Vec::with_capacity(count(vars));
    for v in vars {
        match grads.get(v.as_tensor()) {
            Some(g) => out.extend(g.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?),
            None => out.extend(std::iter::repeat_n(0.0, v.elem_count())),
        }
    }
    Ok(out)
}

/// The values of `vars`, in order, as one f32 vector.
pub fn read_params(vars: &[&Var]) -> candle_core::Result<Vec<f32>> {
    let mut out = Vec::with_capacity(count(vars));
    for v in vars {
        out.extend(v.as_tensor().to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
    }
    Ok(out)
}

/// Writes a flat vector back into `vars`.
pub fn write_params(vars: &[&Var], flat: &[f32]) -> candle_core::Result<()> {
    let mut off = 0;
    for v in vars {
        let t = v.as_tensor();
        let n = t.elem_count();
        let value = Tensor::from_slice(&flat[off..off + n], t.shape(), t.device())?.to_dtype(t.dtype())?;
        v.set(&value)?;
        off += n;
    }
    Ok(())
}

/// Clips `grads` to the global L2 norm `max_norm` (0: no clipping) and applies them, unless their
/// norm is not finite (an overflow somewhere in the step): then the parameters and the optimizer's
/// state stay as they were, so one bad batch cannot turn every weight into NaN (a finite loss does
/// not rule that out: a ReLU maps NaN to 0). Returns the norm before clipping.
pub fn clipped_update(
    opt: &mut AdamW,
    params: &mut [f32],
    grads: &mut [f32],
    max_norm: f64,
    groups: &[(usize, f64)],
) -> f64 {
    let norm = clip_global_norm(grads, max_norm);
    if norm.is_finite() {
        opt.update_groups(params, grads, groups);
    }
    norm
}

/// Scales `grads` so their global L2 norm is at most `max_norm`; returns the norm before clipping.
fn clip_global_norm(grads: &mut [f32], max_norm: f64) -> f64 {
    let norm = grads.iter().map(|&g| (g as f64) * (g as f64)).sum::<f64>().sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let scale = (max_norm / (norm + 1e-6)) as f32;
        grads.iter_mut().for_each(|g| *g *= scale);
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn first_step_moves_each_weight_by_lr_against_the_gradient_sign() {
        // With bias correction, Adam's first step is lr * g / (|g| + eps) = lr * sign(g).
        let mut p = vec![1f32, -2.0, 3.0];
        let mut opt = AdamW::new(3, [0.9, 0.98], 0.0);
        opt.update(&mut p, &[2.0, -4.0, 0.5], 0.1);
        for (g, want) in p.iter().zip([0.9f32, -1.9, 2.9]) {
            assert!((g - want).abs() < 1e-6, "{p:?}");
        }
        assert_eq!(opt.step, 1);
    }

    #[test]
    fn each_group_moves_at_its_own_rate() {
        let mut p = vec![0f32; 4];
        let mut opt = AdamW::new(4, [0.9, 0.99], 0.0);
        opt.update_groups(&mut p, &[1.0, 1.0, -1.0, 1.0], &[(1, 0.1), (3, 0.5), (4, 0.0)]);
        for (g, want) in p.iter().zip([-0.1f32, -0.5, 0.5, 0.0]) {
            assert!((g - want).abs() < 1e-6, "{p:?}");
        }
    }

    #[test]
    fn a_gradient_that_is_not_finite_changes_nothing() {
        let mut p = vec![1f32, 2.0];
        let mut opt = AdamW::new(2, [0.9, 0.999], 0.0);
        let norm = clipped_update(&mut opt, &mut p, &mut [0.5, f32::NAN], 1.0, &[(2, 0.1)]);
        assert!(norm.is_nan());
        assert_eq!(
            (p.as_slice(), opt.step, opt.m.as_slice(), opt.v.as_slice()),
            ([1f32, 2.0].as_slice(), 0, [0f32; 2].as_slice(), [0f32; 2].as_slice())
        );
        let norm = clipped_update(&mut opt, &mut p, &mut [f32::INFINITY, 0.0], 1.0, &[(2, 0.1)]);
        assert!(norm.is_infinite() && p == [1.0, 2.0] && opt.step == 0);
        // A finite one is clipped and applied.
        assert_eq!(clipped_update(&mut opt, &mut p, &mut [3.0, -4.0], 1.0, &[(2, 0.1)]), 5.0);
        assert!((p[0] - 0.9).abs() < 1e-6 && (p[1] - 2.1).abs() < 1e-6 && opt.step == 1, "{p:?}");
    }

    #[test]
    fn decoupled_weight_decay_shrinks_weights_without_gradient() {
        let mut p = vec![2f32];
        let mut opt = AdamW::new(1, [0.9, 0.999], 0.1);
        opt.update(&mut p, &[0.0], 0.5);
        assert!((p[0] - 2.0 * (1.0 - 0.05)).abs() < 1e-6, "{p:?}");
    }

    #[test]
    fn clipping_scales_to_the_max_norm_and_leaves_small_gradients() {
        let mut g = vec![3f32, 4.0];
        assert_eq!(clip_global_norm(&mut g, 1.0), 5.0);
        assert!((g[0] - 0.6).abs() < 1e-5 && (g[1] - 0.8).abs() < 1e-5);
        let mut small = vec![0.3f32, 0.4];
        clip_global_norm(&mut small, 1.0);
        assert_eq!(small, vec![0.3, 0.4]);
    }

    #[test]
    fn flatten_and_write_back_keep_the_variable_order() {
        let dev = Device::Cpu;
        let a = Var::from_tensor(&Tensor::new(&[1f32, 2.0], &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::new(&[[3f32], [4.0]], &dev).unwrap()).unwrap();
        let loss = (a.as_tensor().sum_all().unwrap() * 2.0).unwrap();
        let grads = loss.backward().unwrap();
        assert_eq!(flatten_grads(&[&a, &b], &grads).unwrap(), vec![2.0, 2.0, 0.0, 0.0]);
        write_params(&[&a, &b], &[5.0, 6.0, 7.0, 8.0]).unwrap();
        assert_eq!(read_params(&[&a, &b]).unwrap(), vec![5.0, 6.0, 7.0, 8.0]);
    }
}
