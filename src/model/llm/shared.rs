//! An output buffer that several threads of the pool fill at once, each its own part of it: the
//! bf16 products' column panels and the attention's per-row units write through one of these.

/// A raw pointer into an output buffer, shareable between the pool's threads.
#[derive(Clone, Copy)]
pub(super) struct SharedOut<T>(*mut T);

// SAFETY: the callers hand each thread a region of the buffer no other thread writes, and read the
// buffer only after the parallel loop has joined.
unsafe impl<T> Send for SharedOut<T> {}
unsafe impl<T> Sync for SharedOut<T> {}

impl<T> SharedOut<T> {
    pub(super) fn new(buffer: &mut [T]) -> Self {
        Self(buffer.as_mut_ptr())
    }

    /// The pointer `offset` values in.
    ///
    /// # Safety
    /// `offset` must lie within the buffer, and the region written from there must be this
    /// thread's alone.
    pub(super) unsafe fn at(self, offset: usize) -> *mut T {
        self.0.add(offset)
    }
}
