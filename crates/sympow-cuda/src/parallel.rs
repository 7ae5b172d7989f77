//! Data parallelism over the GPUs of one host: one thread per GPU, gradients summed by NCCL
//! (loaded at run time, like the rest of CUDA). See [`sympow::train::GradSync`] for how the
//! training loop uses it: each rank takes its share of every step's micro-batches, the
//! all-reduced gradients make every replica take the same step, rank 0 writes the files.

use crate::CudaBackend;
use cudarc::driver::CudaSlice;
use cudarc::nccl::{Comm, ReduceOp};
use sympow::train::GradSync;

/// One rank's NCCL communicator.
pub struct NcclSync {
    comm: Comm,
    rank: usize,
    world: usize,
}

// SAFETY: each communicator is used by exactly one thread (its rank's), as NCCL requires.
unsafe impl Sync for NcclSync {}
unsafe impl Send for NcclSync {}

impl NcclSync {
    /// Communicators for the given backends (one per GPU, ranks in order), created together
    /// (ncclCommInitAll) on the backends' streams.
    pub fn for_backends(backends: &[CudaBackend]) -> Result<Vec<NcclSync>, crate::Unavailable> {
        let streams = backends.iter().map(|b| b.stream().clone()).collect();
        let comms = Comm::from_devices(streams)
            .map_err(|e| crate::Unavailable::Driver(format!("NCCL: {e:?}")))?;
        let world = comms.len();
        Ok(comms
            .into_iter()
            .enumerate()
            .map(|(rank, comm)| NcclSync { comm, rank, world })
            .collect())
    }
}

impl GradSync<CudaBackend> for NcclSync {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn all_reduce(&self, _backend: &CudaBackend, t: &mut CudaSlice<f32>) {
        self.comm
            .all_reduce_in_place(t, &ReduceOp::Sum)
            .unwrap_or_else(|e| panic!("NCCL all-reduce: {e:?}"));
    }
}
