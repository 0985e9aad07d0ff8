//! Who started this process, as how many ranks, and how many share this machine: read from the
//! launcher's environment before any backend starts (rank and world come from the backend itself).

/// What the launcher's environment says.
#[derive(Debug, Clone, PartialEq)]
pub struct Launcher {
    /// "mpirun", "srun", "hydra" or "none".
    pub name: &'static str,
    pub world: usize,
    /// Ranks on this machine.
    pub local: usize,
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
            return Self { name: "mpirun", world, local: num("OMPI_COMM_WORLD_LOCAL_SIZE").unwrap_or(1) };
        }
        if get("SLURM_PROCID").is_some() {
            if let Some(world) = num("SLURM_NTASKS") {
                let local = get("SLURM_TASKS_PER_NODE").as_deref().and_then(slurm_tasks_per_node).unwrap_or(1);
                return Self { name: "srun", world, local };
            }
        }
        if let Some(world) = num("PMI_SIZE") {
            return Self { name: "hydra", world, local: num("MPI_LOCALNRANKS").unwrap_or(1) };
        }
        Self { name: "none", world: 1, local: 1 }
    }
}

/// Gives each of the `local` ranks on this machine its share of the cores for candle's and OpenBLAS's
/// math (unless RAYON_NUM_THREADS is set already): oversubscribed spinning thread pools are slower than one
/// thread each (candle-notes.md). Call before any tensor work.
pub fn configure_threads(launcher: &Launcher) -> usize {
    let n = var("RAYON_NUM_THREADS").unwrap_or_else(|| {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let n = (cores / launcher.local.max(1)).max(1);
        // Single-threaded here (called before any pool exists), as set_var requires.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        std::env::set_var("CANDLE_NUM_THREADS", n.to_string());
        n
    });
    #[cfg(feature = "openblas")]
    crate::model::llm::blas::set_threads(n);
    n
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
        assert_eq!(env(&[]), Launcher { name: "none", world: 1, local: 1 });
        assert_eq!(
            env(&[("OMPI_COMM_WORLD_SIZE", "4"), ("OMPI_COMM_WORLD_LOCAL_SIZE", "2")]),
            Launcher { name: "mpirun", world: 4, local: 2 }
        );
        assert_eq!(
            env(&[("SLURM_PROCID", "1"), ("SLURM_NTASKS", "6"), ("SLURM_TASKS_PER_NODE", "2(x3)")]),
            Launcher { name: "srun", world: 6, local: 2 }
        );
        // An sbatch script's environment (no SLURM_PROCID) is not a rank's.
        assert_eq!(env(&[("SLURM_NTASKS", "6")]).world, 1);
        assert_eq!(env(&[("PMI_SIZE", "3")]).world, 3);
    }
}
