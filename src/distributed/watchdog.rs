//! Turns a stalled collective into an exit. Neither MPI nor NCCL's safe API gives up on a peer that
//! died or hangs, so a thread watches a deadline that every collective call arms: past it, the rank
//! reports what it waited for and exits non-zero, and the launcher (mpirun, srun --kill-on-bad-exit)
//! ends the other ranks. The job then fails in bounded time and can be restarted with --resume.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Exit status of a rank stopped by the watchdog.
pub const EXIT_STALLED: i32 = 75;

struct State {
    /// Milliseconds since `origin` after which the process exits; 0 = disarmed.
    deadline_ms: AtomicU64,
    what: Mutex<String>,
    origin: Instant,
}

#[derive(Clone)]
pub struct Watchdog {
    state: Arc<State>,
}

impl Watchdog {
    /// Starts the watching thread for this rank.
    pub fn start(rank: usize) -> Result<Self, super::DistError> {
        let state =
            Arc::new(State { deadline_ms: AtomicU64::new(0), what: Mutex::new(String::new()), origin: Instant::now() });
        let watched = state.clone();
        std::thread::Builder::new()
            .name("illmrec-watchdog".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_millis(200));
                let deadline = watched.deadline_ms.load(Ordering::Acquire);
                if deadline != 0 && watched.origin.elapsed().as_millis() as u64 > deadline {
                    let what = watched.what.lock().map(|w| w.clone()).unwrap_or_default();
                    eprintln!(
                        "rank {rank}: {what} did not complete in time: another rank died or stalled; \
                         stopping this rank (restart the job with --resume)"
                    );
                    std::process::exit(EXIT_STALLED);
                }
            })
            .map_err(|e| super::DistError::Setup(format!("cannot start the watchdog thread: {e}")))?;
        Ok(Self { state })
    }

    pub fn arm(&self, what: &str, rank: usize, timeout: Duration) {
        if let Ok(mut w) = self.state.what.lock() {
            *w = format!("{what} (rank {rank}, timeout {}s)", timeout.as_secs());
        }
        let deadline = self.state.origin.elapsed() + timeout;
        self.state.deadline_ms.store(deadline.as_millis().max(1) as u64, Ordering::Release);
    }

    pub fn disarm(&self) {
        self.state.deadline_ms.store(0, Ordering::Release);
    }
}
