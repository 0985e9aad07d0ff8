//! The NCCL backend (GPU ranks), through cudarc's `nccl` module. Ranks come from MPI: rank 0 creates
//! the NCCL unique id and MPI broadcasts it; MPI also carries byte broadcasts and barriers. Each rank
//! drives the GPU of its local rank.
//!
//! The buffers the trainer hands over live on the host (the flat gradient of the small trainable
//! set), so an all-reduce stages them through the GPU. cudarc panics when libcuda or libnccl are
//! missing, so both are probed with dlopen first and a missing one is an error.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nccl::safe::{Comm, Id, ReduceOp};

use super::launcher::Launcher;
use super::mpi::Mpi;
use super::{Collective, DistError};

fn loadable(lib: &str) -> bool {
    let name = std::ffi::CString::new(lib).expect("library names have no NUL");
    // SAFETY: dlopen with a valid C string; the handle is closed right away.
    unsafe {
        let h = libc::dlopen(name.as_ptr(), libc::RTLD_LAZY);
        if h.is_null() {
            false
        } else {
            libc::dlclose(h);
            true
        }
    }
}

/// GPUs visible to this process; 0 when the CUDA driver is not installed.
pub fn gpu_count() -> usize {
    if !loadable("libcuda.so.1") {
        return 0;
    }
    CudaContext::device_count().map(|n| n.max(0) as usize).unwrap_or(0)
}

pub struct Nccl {
    mpi: Mpi,
    comm: Comm,
    stream: Arc<CudaStream>,
}

fn setup<E: std::fmt::Debug>(what: &str) -> impl FnOnce(E) -> DistError + '_ {
    move |e| DistError::Setup(format!("NCCL set-up: {what}: {e:?}"))
}

impl Nccl {
    pub fn init(launcher: &Launcher) -> Result<Self, DistError> {
        if !loadable("libnccl.so.2") {
            return Err(DistError::Setup("NCCL (libnccl.so.2) is not installed on this machine".into()));
        }
        let mpi = Mpi::init()?;
        let gpus = gpu_count();
        if gpus == 0 {
            return Err(DistError::Setup("no GPU is visible (CUDA_VISIBLE_DEVICES, driver)".into()));
        }
        if launcher.local > gpus {
            return Err(DistError::Setup(format!(
                "{} ranks share this machine but it has {gpus} GPUs",
                launcher.local
            )));
        }
        let ctx = CudaContext::new(launcher.local_rank % gpus).map_err(setup("open the GPU"))?;
        let stream = ctx.default_stream();
        let mut id_bytes = if mpi.rank() == 0 {
            Id::new().map_err(setup("create the unique id"))?.internal().iter().map(|&c| c as u8).collect()
        } else {
            vec![0u8; 128]
        };
        mpi.broadcast(0, &mut id_bytes)?;
        let mut internal = [0 as ::core::ffi::c_char; 128];
        for (d, s) in internal.iter_mut().zip(&id_bytes) {
            *d = *s as ::core::ffi::c_char;
        }
        let comm = Comm::from_rank(stream.clone(), mpi.rank(), mpi.world(), Id::uninit(internal))
            .map_err(setup("join the communicator"))?;
        Ok(Self { mpi, comm, stream })
    }
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.mpi.rank()
    }

    fn world(&self) -> usize {
        self.mpi.world()
    }

    fn name(&self) -> &'static str {
        "nccl"
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), DistError> {
        let err = |what: &str, e: &dyn std::fmt::Debug| DistError::Collective {
            rank: self.rank(),
            what: format!("{what}: {e:?}"),
        };
        let mut dev = self.stream.clone_htod(buf).map_err(|e| err("copy to the GPU", &e))?;
        self.comm.all_reduce_in_place(&mut dev, &ReduceOp::Sum).map_err(|e| err("NCCL all-reduce", &e))?;
        let host = self.stream.clone_dtoh(&dev).map_err(|e| err("copy from the GPU", &e))?;
        buf.copy_from_slice(&host);
        Ok(())
    }

    fn broadcast(&self, root: usize, bytes: &mut Vec<u8>) -> Result<(), DistError> {
        self.mpi.broadcast(root, bytes)
    }

    fn barrier(&self) -> Result<(), DistError> {
        self.mpi.barrier()
    }
}
