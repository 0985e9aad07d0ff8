//! Preemption: a scheduler warns a job before it ends it (Slurm: `--signal=B:USR1@120` reaches the
//! batch script, which passes SIGUSR1 to the ranks). A rank that gets SIGUSR1 votes to stop; the vote
//! rides along the next gradient all-reduce, so every rank stops after the same step, rank 0 writes a
//! checkpoint, and the process exits with [`EXIT_CODE`] for the scheduler to requeue it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

/// The exit status of a run that stopped on a preemption signal after committing a checkpoint.
pub const EXIT_CODE: i32 = 76;

static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();

/// Installs the SIGUSR1 handler (once per process).
pub fn install() -> std::io::Result<()> {
    if FLAG.get().is_some() {
        return Ok(());
    }
    let flag = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGUSR1, flag.clone())?;
    let _ = FLAG.set(flag);
    Ok(())
}

/// Whether this process got SIGUSR1 (false when no handler is installed).
pub fn requested() -> bool {
    FLAG.get().is_some_and(|f| f.load(Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    #[test]
    fn sigusr1_sets_the_flag() {
        super::install().unwrap();
        assert!(!super::requested());
        signal_hook::low_level::raise(signal_hook::consts::SIGUSR1).unwrap();
        assert!(super::requested());
    }
}
