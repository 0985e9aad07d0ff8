//! Elementwise sums of same-shape tensors shared out over the thread pool: candle's own add runs on
//! the calling thread, and the residual stream's sums and the decoder layer's sums of gradients are
//! each a pass over `[tokens, hidden]` per layer.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Storage, Tensor, WithDType};

use super::{fused, map_rows, run2, Kernel2};

/// Elements per unit of work on the thread pool.
const CHUNK: usize = 4096;

/// `a + b`, not differentiated (the decoder layer's backward is written by hand).
pub fn add(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if a.dims() != b.dims() {
        candle_core::bail!("add: {:?} and {:?}", a.dims(), b.dims());
    }
    if !fused(a) {
        return a.detach() + b.detach();
    }
    a.contiguous()?.apply_op2_no_bwd(&b.contiguous()?, &Add)
}

/// `a + b` of contiguous same-shape CPU tensors as an op's output storage.
pub fn add_storage(a: &Tensor, b: &Tensor) -> candle_core::Result<(CpuStorage, Shape)> {
    if a.dims() != b.dims() {
        candle_core::bail!("add: {:?} and {:?}", a.dims(), b.dims());
    }
    let ((sa, la), (sb, lb)) = (a.storage_and_layout(), b.storage_and_layout());
    let (Storage::Cpu(sa), Storage::Cpu(sb)) = (&*sa, &*sb) else { candle_core::bail!("add: not on the CPU") };
    run2(&Add, "add", (sa, la), (sb, lb))
}

struct Add;

impl Kernel2 for Add {
    fn apply<T: WithDType>(&self, a: &[T], b: &[T]) -> Vec<T> {
        map_rows(a, Some(b), CHUNK, |_, a, b, out| {
            for ((o, a), b) in out.iter_mut().zip(a).zip(b) {
                o.write(*a + *b);
            }
        })
    }
}

impl CustomOp2 for Add {
    fn name(&self) -> &'static str {
        "add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        run2(self, "add", (s1, l1), (s2, l2))
    }
}
