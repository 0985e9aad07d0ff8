//! The MPI backend (CPU ranks): rsmpi over the system's MPI library (Open MPI from Debian here).

use ::mpi::collective::SystemOperation;
use ::mpi::environment::Universe;
use ::mpi::topology::SimpleCommunicator;
use ::mpi::traits::*;

use super::{Collective, DistError};

pub struct Mpi {
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    // Finalizes MPI when dropped, after `world`.
    _universe: Universe,
}

impl Mpi {
    pub fn init() -> Result<Self, DistError> {
        let universe = ::mpi::initialize()
            .ok_or_else(|| DistError::Setup("MPI was initialized already in this process".into()))?;
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        Ok(Self { world, rank, size, _universe: universe })
    }
}

impl Collective for Mpi {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.size
    }

    fn name(&self) -> &'static str {
        "mpi"
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), DistError> {
        if buf.len() > i32::MAX as usize {
            return Err(DistError::Collective {
                rank: self.rank,
                what: format!("{} values exceed MPI's count", buf.len()),
            });
        }
        let send = buf.to_vec();
        self.world.all_reduce_into(&send[..], buf, SystemOperation::sum());
        Ok(())
    }

    fn broadcast(&self, root: usize, bytes: &mut Vec<u8>) -> Result<(), DistError> {
        let from = self.world.process_at_rank(root as i32);
        let mut len = bytes.len() as u64;
        from.broadcast_into(&mut len);
        if self.rank != root {
            bytes.resize(len as usize, 0);
        }
        from.broadcast_into(&mut bytes[..]);
        Ok(())
    }

    fn barrier(&self) -> Result<(), DistError> {
        self.world.barrier();
        Ok(())
    }
}
