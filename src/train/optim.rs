//! AdamW with its state in the open (candle-nn's keeps the moments private, so they cannot be
//! checkpointed). With weight_decay 0 it is Adam.

use candle_core::{backprop::GradStore, Tensor, Var};

pub struct AdamW {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Steps taken so far.
    pub step: u64,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
}

impl AdamW {
    pub fn new(vars: &[&Var], lr: f64, betas: [f64; 2], weight_decay: f64) -> candle_core::Result<Self> {
        let zeros = |v: &&Var| v.as_tensor().zeros_like();
        Ok(Self {
            lr,
            beta1: betas[0],
            beta2: betas[1],
            eps: 1e-8,
            weight_decay,
            step: 0,
            m: vars.iter().map(zeros).collect::<candle_core::Result<_>>()?,
            v: vars.iter().map(zeros).collect::<candle_core::Result<_>>()?,
        })
    }

    /// One update of every var from its gradient; a var without a gradient counts as a zero gradient.
    pub fn step(&mut self, vars: &[&Var], grads: &GradStore) -> candle_core::Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let (c1, c2) = (1.0 - self.beta1.powi(t), 1.0 - self.beta2.powi(t));
        for (i, var) in vars.iter().enumerate() {
            let theta = var.as_tensor();
            // Detached: a gradient still carries the op graph of the step that made it, and the
            // moments would otherwise keep every past step's graph alive.
            let g = match grads.get(theta) {
                Some(g) => g.detach(),
                None => theta.zeros_like()?,
            };
            self.m[i] = (self.m[i].affine(self.beta1, 0.0)? + g.affine(1.0 - self.beta1, 0.0)?)?;
            self.v[i] = (self.v[i].affine(self.beta2, 0.0)? + g.sqr()?.affine(1.0 - self.beta2, 0.0)?)?;
            self.m[i] = self.m[i].detach();
            self.v[i] = self.v[i].detach();
            let m_hat = self.m[i].affine(1.0 / c1, 0.0)?;
            let v_hat = self.v[i].affine(1.0 / c2, 0.0)?;
            let update = (m_hat / (v_hat.sqrt()? + self.eps)?)?;
            let decayed = theta.affine(1.0 - self.lr * self.weight_decay, 0.0)?;
            var.set(&(decayed - update.affine(self.lr, 0.0)?)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn first_step_moves_each_weight_by_lr_against_the_gradient_sign() {
        // With bias correction, Adam's first step is lr * g / (|g| + eps) = lr * sign(g).
        let w = Var::from_tensor(&Tensor::new(&[1f32, -2.0, 3.0], &Device::Cpu).unwrap()).unwrap();
        let loss = (w.as_tensor() * Tensor::new(&[2f32, -4.0, 0.5], &Device::Cpu).unwrap()).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let mut opt = AdamW::new(&[&w], 0.1, [0.9, 0.98], 0.0).unwrap();
        opt.step(&[&w], &grads).unwrap();
        let got = w.as_tensor().to_vec1::<f32>().unwrap();
        for (g, want) in got.iter().zip([0.9f32, -1.9, 2.9]) {
            assert!((g - want).abs() < 1e-5, "{got:?}");
        }
    }
}
