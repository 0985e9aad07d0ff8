use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use super::{ProgressMode, TelemetryConfig};

/// Progress of one stage: a bar on a terminal, a log line every few seconds otherwise.
pub struct Progress {
    label: String,
    total: u64,
    done: u64,
    bar: Option<ProgressBar>,
    log_every: Option<Duration>,
    started: Instant,
    last_log: Instant,
    message: String,
    /// Samples in one unit of progress (a training step's global batch), for samples/s.
    samples_per_unit: Option<usize>,
    /// Units done before this process started (a resumed run): not counted in the rate.
    resumed_at: u64,
}

impl Progress {
    pub fn new(cfg: &TelemetryConfig, label: &str, total: u64) -> Self {
        let on_terminal = std::io::stderr().is_terminal();
        let use_bar = match cfg.progress {
            ProgressMode::Bar => true,
            ProgressMode::Auto => on_terminal,
            ProgressMode::Log | ProgressMode::Off => false,
        };
        let bar = use_bar.then(|| {
            let b = ProgressBar::new(total);
            let style =
                ProgressStyle::with_template("{prefix:>10} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> ");
            b.set_style(style);
            b.set_prefix(label.to_string());
            b
        });
        let log_every =
            (!use_bar && cfg.progress != ProgressMode::Off).then(|| Duration::from_secs(cfg.log_every_secs));
        let now = Instant::now();
        Self {
            label: label.into(),
            total,
            done: 0,
            bar,
            log_every,
            started: now,
            last_log: now,
            message: String::new(),
            samples_per_unit: None,
            resumed_at: 0,
        }
    }

    /// A resumed run: `n` units were done by an earlier process. They count towards the position,
    /// not towards this process's rate and ETA.
    pub fn resumed_at(mut self, n: u64) -> Self {
        self.resumed_at = n;
        self.done = n;
        if let Some(b) = &self.bar {
            b.set_position(n);
            b.reset_eta();
        }
        self
    }

    /// Also report samples/s: each unit of progress is `n` samples.
    pub fn with_samples_per_unit(mut self, n: usize) -> Self {
        self.samples_per_unit = Some(n);
        self
    }

    pub fn set_message(&mut self, msg: String) {
        if let Some(b) = &self.bar {
            b.set_message(msg.clone());
        }
        self.message = msg;
    }

    pub fn inc(&mut self, n: u64) {
        self.done += n;
        if let Some(b) = &self.bar {
            b.inc(n);
        }
        if let Some(every) = self.log_every {
            if self.last_log.elapsed() >= every {
                self.last_log = Instant::now();
                self.log_line();
            }
        }
    }

    /// Units done by this process, which the rate is measured on.
    fn done_here(&self) -> u64 {
        self.done - self.resumed_at
    }

    fn log_line(&self) {
        let elapsed = self.started.elapsed().as_secs_f64();
        let rate = self.done_here() as f64 / elapsed.max(1e-9);
        let eta = if rate > 0.0 { (self.total.saturating_sub(self.done)) as f64 / rate } else { f64::NAN };
        let samples = self.samples_per_unit.map(|n| format!(", {:.1} samples/s", rate * n as f64)).unwrap_or_default();
        tracing::info!(
            "{}: {}/{} ({rate:.2}/s{samples}, eta {eta:.0}s) {}",
            self.label,
            self.done,
            self.total,
            self.message
        );
    }

    pub fn finish(self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resumed_run_measures_its_rate_on_its_own_steps() {
        let cfg = TelemetryConfig { progress: ProgressMode::Off, ..TelemetryConfig::default() };
        let mut p = Progress::new(&cfg, "t", 1000).resumed_at(117);
        p.inc(3);
        assert_eq!((p.done, p.done_here()), (120, 3));
    }
}
