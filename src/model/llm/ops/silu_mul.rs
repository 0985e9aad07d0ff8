//! The Llama MLP's gate as one op: silu(g) ⊙ u with σ = sigmoid(g), silu(g) = g·σ, and backward
//! dg = dy ⊙ u ⊙ σ(1 + g(1 − σ)), du = dy ⊙ silu(g). From primitives that is five [tokens, ffn]
//! tensors forward and more backward, at SmolLM2's width (1536) more traffic than any other
//! elementwise step.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor, WithDType};

use super::{fused, map_rows, run2, sigmoid, Kernel2};

/// Elements per unit of work on the thread pool (the op is elementwise; a chunk is a "row").
const CHUNK: usize = 4096;

/// `silu(gate) * up`, differentiable in both.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    if gate.dims() != up.dims() {
        candle_core::bail!("silu_mul: gate {:?} and up {:?}", gate.dims(), up.dims());
    }
    if !fused(gate) {
        return candle_nn::ops::silu(gate)? * up;
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, SiluMul)
}

/// The gradients of `silu_mul(gate, up)` with respect to both for the upstream gradient `dy`, on the
/// CPU (the decoder layer's own backward, `layer.rs`).
pub fn silu_mul_backward(gate: &Tensor, up: &Tensor, dy: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
    let (gate, up, dy) = (gate.contiguous()?, up.contiguous()?, dy.contiguous()?);
    let n = gate.elem_count();
    let grads = gate.apply_op3_no_bwd(&up, &dy, &SiluMulGrad)?;
    Ok((grads.narrow(0, 0, n)?.reshape(gate.shape())?, grads.narrow(0, n, n)?.reshape(up.shape())?))
}

struct SiluMul;

impl Kernel2 for SiluMul {
    fn apply<T: WithDType>(&self, g: &[T], u: &[T]) -> Vec<T> {
        map_rows(g, Some(u), CHUNK, |_, g, u, out| {
            for ((o, g), u) in out.iter_mut().zip(g).zip(u) {
                let g = g.to_f64();
                o.write(T::from_f64(g * sigmoid::<T>(g) * u.to_f64()));
            }
        })
    }
}

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        #[cfg(target_arch = "x86_64")]
        if let (CpuStorage::F32(g), CpuStorage::F32(u), true) = (s1, s2, super::avx512::available()) {
            let (g, u) = (super::contiguous(g, l1)?, super::contiguous(u, l2)?);
            let mut out = Vec::with_capacity(g.len());
            let spare = &mut out.spare_capacity_mut()[..g.len()];
            // SAFETY (both): the CPU has AVX-512 F; the chunks of out, g and u have one length.
            if shared(g.len()) {
                use rayon::prelude::*;
                let parts = spare.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)));
                parts.for_each(|(o, (g, u))| unsafe { super::avx512::silu_mul(g, u, o) });
            } else {
                unsafe { super::avx512::silu_mul(g, u, spare) }
            }
            // SAFETY: silu_mul wrote every value.
            unsafe { out.set_len(g.len()) };
            return Ok((CpuStorage::F32(out), l1.shape().clone()));
        }
        run2(self, "silu_mul", (s1, l1), (s2, l2))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dg, du) = silu_mul_backward(g, u, dy)?;
        Ok((Some(dg), Some(du)))
    }
}

/// Whether `n` values are shared out over the pool in chunks of CHUNK (else the calling thread does
/// them all). Each value depends on its own inputs alone, so either gives the same results.
fn shared(n: usize) -> bool {
    rayon::current_num_threads() > 1 && n >= 1 << 15
}

/// One chunk of the backward: (dg, du) to write from ((g, u), dy).
type Chunk<'a, T> = ((&'a mut [T], &'a mut [T]), ((&'a [T], &'a [T]), &'a [T]));

/// The backward as an op of (g, u, dy); the output is [dg | du].
struct SiluMulGrad;

impl SiluMulGrad {
    fn apply<T: WithDType>(g: &[T], u: &[T], dy: &[T]) -> Vec<T> {
        use rayon::prelude::*;
        let n = g.len();
        let mut out = vec![T::zero(); 2 * n];
        let (dg, du) = out.split_at_mut(n);
        let chunk = |((dg, du), ((g, u), dy)): Chunk<'_, T>| {
            for i in 0..g.len() {
                let (gi, yi) = (g[i].to_f64(), dy[i].to_f64());
                let s = sigmoid::<T>(gi);
                dg[i] = T::from_f64(yi * u[i].to_f64() * s * (1.0 + gi * (1.0 - s)));
                du[i] = T::from_f64(yi * gi * s);
            }
        };
        let parts = dg.par_chunks_mut(CHUNK).zip(du.par_chunks_mut(CHUNK));
        let inputs = g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)).zip(dy.par_chunks(CHUNK));
        if shared(n) {
            parts.zip(inputs).for_each(chunk);
        } else {
            dg.chunks_mut(CHUNK)
                .zip(du.chunks_mut(CHUNK))
                .zip(g.chunks(CHUNK).zip(u.chunks(CHUNK)).zip(dy.chunks(CHUNK)))
                .for_each(chunk);
        }
        out
    }
}

impl candle_core::CustomOp3 for SiluMulGrad {
    fn name(&self) -> &'static str {
        "silu-mul-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use super::contiguous;
        let n = l1.shape().elem_count();
        if l2.shape().elem_count() != n || l3.shape().elem_count() != n {
            candle_core::bail!("silu_mul backward: operands {:?}, {:?} and {:?}", l1.shape(), l2.shape(), l3.shape());
        }
        let out = match (s1, s2, s3) {
            #[cfg(target_arch = "x86_64")]
            (CpuStorage::F32(g), CpuStorage::F32(u), CpuStorage::F32(dy)) if super::avx512::available() => {
                let (g, u, dy) = (contiguous(g, l1)?, contiguous(u, l2)?, contiguous(dy, l3)?);
                let mut out = Vec::with_capacity(2 * n);
                let (dg, du) = out.spare_capacity_mut()[..2 * n].split_at_mut(n);
                // SAFETY (both): the CPU has AVX-512 F; the chunks of all five slices have one length.
                if shared(n) {
                    use rayon::prelude::*;
                    let outs = dg.par_chunks_mut(CHUNK).zip(du.par_chunks_mut(CHUNK));
                    let ins = g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)).zip(dy.par_chunks(CHUNK));
                    outs.zip(ins)
                        .for_each(|((dg, du), ((g, u), dy))| unsafe { super::avx512::silu_mul_grad(g, u, dy, dg, du) });
                } else {
                    unsafe { super::avx512::silu_mul_grad(g, u, dy, dg, du) }
                }
                // SAFETY: silu_mul_grad wrote every value of both halves.
                unsafe { out.set_len(2 * n) };
                CpuStorage::F32(out)
            }
            (CpuStorage::F32(g), CpuStorage::F32(u), CpuStorage::F32(dy)) => {
                CpuStorage::F32(Self::apply(contiguous(g, l1)?, contiguous(u, l2)?, contiguous(dy, l3)?))
            }
            (CpuStorage::F64(g), CpuStorage::F64(u), CpuStorage::F64(dy)) => {
                CpuStorage::F64(Self::apply(contiguous(g, l1)?, contiguous(u, l2)?, contiguous(dy, l3)?))
            }
            _ => candle_core::bail!("silu_mul supports f32 and f64 operands of one dtype"),
        };
        Ok((out, Shape::from(2 * n)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::{max_abs_diff, random_f64};
    use super::*;
    use candle_core::Var;

    #[test]
    fn matches_the_primitive_ops_forward_and_backward() {
        let g = Var::from_tensor(&(random_f64(&[3, 7], 1) * 3.0).unwrap()).unwrap();
        let u = Var::from_tensor(&random_f64(&[3, 7], 2)).unwrap();
        let up = random_f64(&[3, 7], 3);
        let fused = silu_mul(g.as_tensor(), u.as_tensor()).unwrap();
        let plain = (candle_nn::ops::silu(g.as_tensor()).unwrap() * u.as_tensor()).unwrap();
        assert!(max_abs_diff(&fused, &plain) < 1e-12);
        let g1 = (fused * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (plain * &up).unwrap().sum_all().unwrap().backward().unwrap();
        for x in [&g, &u] {
            assert!(max_abs_diff(g1.get(x.as_tensor()).unwrap(), g2.get(x.as_tensor()).unwrap()) < 1e-12);
        }
    }

    #[test]
    fn f32_matches_the_primitive_ops_within_rounding_over_a_wide_range() {
        let f32s = |t: Tensor| t.to_dtype(candle_core::DType::F32).unwrap();
        let f64s = |t: &Tensor| t.to_dtype(candle_core::DType::F64).unwrap();
        let mut gate = random_f64(&[5, 40], 4).flatten_all().unwrap().to_vec1::<f64>().unwrap();
        gate.iter_mut().enumerate().for_each(|(i, x)| *x *= [1.0, 10.0, 120.0][i % 3]);
        let g = Var::from_tensor(&f32s(Tensor::from_vec(gate, (5, 40), &candle_core::Device::Cpu).unwrap())).unwrap();
        let u = Var::from_tensor(&f32s(random_f64(&[5, 40], 5))).unwrap();
        let up = f32s(random_f64(&[5, 40], 6));
        let fused = silu_mul(g.as_tensor(), u.as_tensor()).unwrap();
        let plain = (candle_nn::ops::silu(g.as_tensor()).unwrap() * u.as_tensor()).unwrap();
        let rel = |a: &Tensor, b: &Tensor| {
            max_abs_diff(&f64s(a), &f64s(b)) / f64s(b).abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap()
        };
        assert!(rel(&fused, &plain) < 1e-6);
        let g1 = (fused * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (plain * &up).unwrap().sum_all().unwrap().backward().unwrap();
        for x in [&g, &u] {
            assert!(rel(g1.get(x.as_tensor()).unwrap(), g2.get(x.as_tensor()).unwrap()) < 1e-6);
        }
    }
}
