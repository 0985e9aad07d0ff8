//! Distributed execution: the `Collective` every rank talks through (single process, MPI on CPUs,
//! NCCL on GPUs), how ranks find out who they are from their launcher, a watchdog that turns a stalled
//! collective into an exit instead of a hang, and the coordinator's shard plan.

pub mod cluster;
mod launcher;
#[cfg(feature = "mpi")]
mod mpi;
#[cfg(feature = "nccl")]
mod nccl;
pub mod plan;
pub mod preempt;
mod single;
mod watchdog;

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub use launcher::{configure_threads, Launcher};
pub use single::Single;
pub use watchdog::Watchdog;

use crate::invalid::Invalid;

#[derive(Debug, thiserror::Error)]
pub enum DistError {
    #[error("{0}")]
    Setup(String),
    #[error("rank {rank}: {what}")]
    Collective { rank: usize, what: String },
    #[error("ranks disagree: {0}")]
    Mismatch(String),
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// NCCL when built with `cuda` and a GPU is present, MPI when a launcher started several ranks,
    /// else a single process.
    #[default]
    Auto,
    Single,
    Mpi,
    Nccl,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DistConfig {
    #[serde(default)]
    pub backend: Backend,
    /// Ranks the job expects; the run stops if the launcher started another number. Unset: any.
    #[serde(default)]
    pub world_size: Option<usize>,
    /// Seconds a rank may wait in one collective during training before the job is stopped, on top
    /// of twice the time this rank itself spent computing the step (so a loaded machine, where every
    /// step is slow, is not taken for a stalled rank).
    #[serde(default = "d_timeout")]
    pub timeout_secs: u64,
    /// The same for the first collective, which waits for every rank to load the model.
    #[serde(default = "d_startup")]
    pub startup_timeout_secs: u64,
    /// Steps between checks that every rank holds the same parameters.
    #[serde(default = "d_check")]
    pub check_every: u64,
    /// Cluster resources for `illmrec submit`: one rank per task.
    #[serde(default = "d_one")]
    pub nodes: usize,
    #[serde(default = "d_one")]
    pub tasks_per_node: usize,
    #[serde(default)]
    pub gpus_per_task: usize,
    #[serde(default = "d_one")]
    pub cpus_per_task: usize,
    #[serde(default)]
    pub slurm: cluster::SlurmConfig,
    #[serde(default)]
    pub k8s: cluster::K8sConfig,
}

fn d_one() -> usize {
    1
}

fn d_timeout() -> u64 {
    60
}
fn d_startup() -> u64 {
    900
}
fn d_check() -> u64 {
    50
}

impl Default for DistConfig {
    fn default() -> Self {
        Self {
            backend: Backend::Auto,
            world_size: None,
            timeout_secs: d_timeout(),
            startup_timeout_secs: d_startup(),
            check_every: d_check(),
            nodes: 1,
            tasks_per_node: 1,
            gpus_per_task: 0,
            cpus_per_task: 1,
            slurm: cluster::SlurmConfig::default(),
            k8s: cluster::K8sConfig::default(),
        }
    }
}

impl DistConfig {
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.world_size == Some(0) {
            return Err(Invalid::new("world_size", "must be at least 1"));
        }
        if self.timeout_secs == 0 || self.startup_timeout_secs == 0 {
            return Err(Invalid::new("timeout_secs", "timeouts must be at least 1 second"));
        }
        if self.check_every == 0 {
            return Err(Invalid::new("check_every", "must be at least 1"));
        }
        for (key, v) in
            [("nodes", self.nodes), ("tasks_per_node", self.tasks_per_node), ("cpus_per_task", self.cpus_per_task)]
        {
            if v == 0 {
                return Err(Invalid::new(key, "must be at least 1"));
            }
        }
        if let Some(w) =
            self.world_size.filter(|w| *w != self.nodes * self.tasks_per_node && self.nodes * self.tasks_per_node > 1)
        {
            return Err(Invalid::new(
                "world_size",
                format!("{w} ranks, but nodes x tasks_per_node = {}", self.nodes * self.tasks_per_node),
            ));
        }
        self.slurm.validate().map_err(|e| Invalid::new(format!("slurm.{}", e.key), e.message))?;
        self.k8s.validate().map_err(|e| Invalid::new(format!("k8s.{}", e.key), e.message))
    }
}

/// What ranks need from each other. Every call is collective: all ranks make it, in the same order.
pub trait Collective {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// The backend's name, for reports.
    fn name(&self) -> &'static str;
    /// Element-wise sum over ranks, in place.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), DistError>;
    /// Replaces every rank's `bytes` with the root's.
    fn broadcast(&self, root: usize, bytes: &mut Vec<u8>) -> Result<(), DistError>;
    fn barrier(&self) -> Result<(), DistError>;
}

/// A collective whose every call runs under the watchdog's deadline, and which counts the time spent
/// in collectives (the communication share of a step).
pub struct Guarded {
    inner: Box<dyn Collective>,
    watchdog: Watchdog,
    timeout: std::cell::Cell<Duration>,
    /// Added to `timeout` for the next collective only (`grant`).
    grace: std::cell::Cell<Duration>,
    spent: std::cell::Cell<Duration>,
}

impl Guarded {
    pub fn new(inner: Box<dyn Collective>, watchdog: Watchdog, timeout: Duration) -> Self {
        Self {
            inner,
            watchdog,
            timeout: std::cell::Cell::new(timeout),
            grace: std::cell::Cell::new(Duration::ZERO),
            spent: std::cell::Cell::new(Duration::ZERO),
        }
    }

    /// Sets the deadline of later calls (a long one while every rank loads, a short one per step).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout.set(timeout);
    }

    /// Lets the next collective wait `extra` longer than the timeout: the others may still be
    /// computing what this rank has finished.
    pub fn grant(&self, extra: Duration) {
        self.grace.set(extra);
    }

    /// Time spent inside collectives since the last call, and resets the count.
    pub fn take_spent(&self) -> Duration {
        self.spent.replace(Duration::ZERO)
    }

    fn guard<T>(&self, what: &str, f: impl FnOnce() -> Result<T, DistError>) -> Result<T, DistError> {
        let started = Instant::now();
        self.watchdog.arm(what, self.inner.rank(), self.timeout.get() + self.grace.take());
        let r = f();
        self.watchdog.disarm();
        self.spent.set(self.spent.get() + started.elapsed());
        r
    }
}

impl Collective for Guarded {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world(&self) -> usize {
        self.inner.world()
    }
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), DistError> {
        let _span = tracing::info_span!("all_reduce", floats = buf.len() as i64, backend = self.inner.name()).entered();
        self.guard("all-reduce", || self.inner.all_reduce_sum(buf))
    }
    fn broadcast(&self, root: usize, bytes: &mut Vec<u8>) -> Result<(), DistError> {
        self.guard("broadcast", || self.inner.broadcast(root, bytes))
    }
    fn barrier(&self) -> Result<(), DistError> {
        self.guard("barrier", || self.inner.barrier())
    }
}

/// Starts the backend the job's `dist` section and the launcher call for, checks the world size, and
/// puts it under a watchdog with the start-up timeout.
pub fn init(cfg: &DistConfig) -> Result<Guarded, DistError> {
    let launcher = Launcher::detect();
    let inner: Box<dyn Collective> = match cfg.backend {
        Backend::Single if launcher.world > 1 => {
            return Err(DistError::Setup(format!(
                "dist.backend is single, but {} started {} ranks",
                launcher.name, launcher.world
            )))
        }
        Backend::Single => Box::new(Single),
        Backend::Nccl => nccl_backend(&launcher)?,
        Backend::Mpi => mpi_backend()?,
        Backend::Auto if cuda_present() => nccl_backend(&launcher)?,
        Backend::Auto if launcher.world > 1 => mpi_backend()?,
        Backend::Auto => Box::new(Single),
    };
    if launcher.world > 1 && inner.world() != launcher.world {
        return Err(DistError::Setup(format!(
            "{} started {} tasks, but the {} backend sees a world of {}: the MPI library does not speak this \
             launcher's process-management interface (under Slurm, try `srun --mpi=pmix`)",
            launcher.name,
            launcher.world,
            inner.name(),
            inner.world()
        )));
    }
    if let Some(want) = cfg.world_size {
        if inner.world() != want {
            return Err(DistError::Setup(format!(
                "dist.world_size is {want}, but {} ranks were started ({})",
                inner.world(),
                launcher.name
            )));
        }
    }
    let rank = inner.rank();
    Ok(Guarded::new(inner, Watchdog::start(rank)?, Duration::from_secs(cfg.startup_timeout_secs)))
}

#[cfg(feature = "mpi")]
fn mpi_backend() -> Result<Box<dyn Collective>, DistError> {
    Ok(Box::new(mpi::Mpi::init()?))
}

#[cfg(not(feature = "mpi"))]
fn mpi_backend() -> Result<Box<dyn Collective>, DistError> {
    Err(DistError::Setup("several ranks were started, but this build has no MPI (feature `mpi`)".into()))
}

#[cfg(feature = "nccl")]
fn cuda_present() -> bool {
    nccl::gpu_count() > 0
}

#[cfg(not(feature = "nccl"))]
fn cuda_present() -> bool {
    false
}

#[cfg(feature = "nccl")]
fn nccl_backend(launcher: &Launcher) -> Result<Box<dyn Collective>, DistError> {
    Ok(Box::new(nccl::Nccl::init(launcher)?))
}

#[cfg(not(feature = "nccl"))]
fn nccl_backend(_: &Launcher) -> Result<Box<dyn Collective>, DistError> {
    Err(DistError::Setup("this build has no NCCL (feature `cuda`)".into()))
}

/// Checks that every rank holds what rank 0 holds: rank 0's bytes are broadcast, every rank compares,
/// and the verdict is all-reduced so that all ranks stop together with the same error.
pub fn check_same(coll: &dyn Collective, what: &str, mine: &[u8]) -> Result<(), DistError> {
    let mut root = mine.to_vec();
    coll.broadcast(0, &mut root)?;
    let mut differs = [if root == mine { 0.0 } else { 1.0 }];
    coll.all_reduce_sum(&mut differs)?;
    if differs[0] > 0.0 {
        return Err(DistError::Mismatch(format!(
            "{} of {} ranks differ from rank 0 in {what}",
            differs[0],
            coll.world()
        )));
    }
    Ok(())
}
