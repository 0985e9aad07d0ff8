//! Who started this process, as which rank of how many, and how many share this machine: read from
//! the launcher's environment before any backend starts. This is the one reader of that environment
//! (threads, the world-size check and the trace resource all use it); once a backend runs, its own
//! rank and world are the ones collectives use.

/// What the launcher's environment says.
#[derive(Debug, Clone, PartialEq)]
pub struct Launcher {
    /// "mpirun", "srun", "hydra" or "none".
    pub name: &'static str,
    pub rank: usize,
    pub world: usize,
    /// Ranks on this machine.
    pub local: usize,
    /// This rank's index among them (which GPU it takes).
    pub local_rank: usize,
}

fn var(name: &str) -> Option<usize> {
    std::env::var(name).ok()?.trim().parse().ok()
}

/// Slurm's per-node task counts, e.g. "2(x3),1": the first node's count.
fn slurm_tasks_per_node(spec: &str) -> Option<usize> {
    spec.split(',').next()?.split('(').next()?.trim().parse().ok()
}

impl Launcher {
    pub fn detect() -> Self {
        Self::from_env(|k| std::env::var(k).ok())
    }

    fn from_env(get: impl Fn(&str) -> Option<String>) -> Self {
        let num = |k: &str| get(k).and_then(|v| v.trim().parse::<usize>().ok());
        if let Some(world) = num("OMPI_COMM_WORLD_SIZE") {
            let rank = num("OMPI_COMM_WORLD_RANK").unwrap_or(0);
            let local = num("OMPI_COMM_WORLD_LOCAL_SIZE").unwrap_or(1);
            let local_rank = num("OMPI_COMM_WORLD_LOCAL_RANK").unwrap_or(0);
            return Self { name: "mpirun", rank, world, local, local_rank };
        }
        if let Some(rank) = num("SLURM_PROCID") {
            if let Some(world) = num("SLURM_NTASKS") {
                let local = get("SLURM_TASKS_PER_NODE").as_deref().and_then(slurm_tasks_per_node).unwrap_or(1);
                let local_rank = num("SLURM_LOCALID").unwrap_or(0);
                return Self { name: "srun", rank, world, local, local_rank };
            }
        }
        if let Some(world) = num("PMI_SIZE") {
            let rank = num("PMI_RANK").unwrap_or(0);
            let local = num("MPI_LOCALNRANKS").unwrap_or(1);
            let local_rank = num("MPI_LOCALRANKID").unwrap_or(0);
            return Self { name: "hydra", rank, world, local, local_rank };
        }
        Self { name: "none", rank: 0, world: 1, local: 1, local_rank: 0 }
    }
}

/// Each of the `local` ranks on this machine gets its share of the cores for its math threads
/// (unless RAYON_NUM_THREADS is set already): oversubscribed spinning thread pools are slower than one
/// thread each (docs/candle.md). candle's own pool for element-wise ops is kept to the calling thread
/// (unless CANDLE_NUM_THREADS is set): the heavy work runs on rayon's pool, and a second pool's
/// spinning workers took cores from it. Sets both through the environment, so call it before any
/// tensor work; returns the count for the other libraries that need telling (the BLAS).
pub fn configure_threads(launcher: &Launcher) -> usize {
    // Single-threaded here (called before any pool exists), as set_var requires.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    var("RAYON_NUM_THREADS").unwrap_or_else(|| {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let n = (cores / launcher.local.max(1)).max(1);
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        n
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Launcher {
        let map: std::collections::HashMap<String, String> =
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Launcher::from_env(|k| map.get(k).cloned())
    }

    #[test]
    fn reads_mpirun_srun_and_hydra() {
        assert_eq!(env(&[]), Launcher { name: "none", rank: 0, world: 1, local: 1, local_rank: 0 });
        assert_eq!(
            env(&[
                ("OMPI_COMM_WORLD_SIZE", "4"),
                ("OMPI_COMM_WORLD_RANK", "3"),
                ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
                ("OMPI_COMM_WORLD_LOCAL_RANK", "1")
            ]),
            Launcher { name: "mpirun", rank: 3, world: 4, local: 2, local_rank: 1 }
        );
        assert_eq!(
            env(&[
                ("SLURM_PROCID", "1"),
                ("SLURM_NTASKS", "6"),
                ("SLURM_TASKS_PER_NODE", "2(x3)"),
                ("SLURM_LOCALID", "1")
            ]),
            Launcher { name: "srun", rank: 1, world: 6, local: 2, local_rank: 1 }
        );
        // An sbatch script's environment (no SLURM_PROCID) is not a rank's.
        assert_eq!(env(&[("SLURM_NTASKS", "6")]).world, 1);
        assert_eq!(
            env(&[("PMI_SIZE", "3"), ("PMI_RANK", "2")]),
            Launcher { name: "hydra", rank: 2, world: 3, local: 1, local_rank: 0 }
        );
    }
}
