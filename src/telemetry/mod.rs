//! Logs and progress for people. Logs go to stderr through `tracing` (level from the job's
//! `telemetry.level`, overridden by RUST_LOG); progress is a bar on a terminal and a periodic log line
//! elsewhere (Slurm and Kubernetes logs), where bars turn into noise.

pub mod otel;
mod progress;

pub use otel::shutdown;
pub use progress::Progress;

/// CPU seconds this process has used (user + system, all threads), from /proc/self/stat; `None`
/// where there is no /proc. On a busy machine this, not the wall time, says what the work costs.
pub fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The fields after the command name (which may hold spaces) start after its closing parenthesis;
    // utime and stime are the 14th and 15th fields, in clock ticks of 1/100 s (USER_HZ on Linux).
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

use serde::{Deserialize, Serialize};

use crate::invalid::Invalid;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// error, warn, info, debug or trace.
    #[serde(default = "default_level")]
    pub level: String,
    #[serde(default)]
    pub progress: ProgressMode,
    /// Seconds between progress lines when not on a terminal.
    #[serde(default = "default_log_every")]
    pub log_every_secs: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProgressMode {
    /// A bar on a terminal, log lines otherwise.
    #[default]
    Auto,
    Bar,
    Log,
    Off,
}

fn default_level() -> String {
    "info".into()
}
fn default_log_every() -> u64 {
    10
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self { level: default_level(), progress: ProgressMode::Auto, log_every_secs: default_log_every() }
    }
}

impl TelemetryConfig {
    pub fn validate(&self) -> Result<(), Invalid> {
        if !["error", "warn", "info", "debug", "trace"].contains(&self.level.as_str()) {
            return Err(Invalid::new(
                "level",
                format!("`{}` is not one of error, warn, info, debug, trace", self.level),
            ));
        }
        if self.log_every_secs == 0 {
            return Err(Invalid::new("log_every_secs", "must be at least 1"));
        }
        Ok(())
    }
}

/// Installs the log subscriber once per process (later calls are no-ops): log lines on stderr and,
/// when the OTEL_EXPORTER_OTLP_* variables name a collector, spans exported over OTLP (`otel.rs`).
/// `job` names the job in the exported spans; `rank` and `world` (from the launcher's environment)
/// are this process's place in it.
pub fn init_logging(level: &str, job: &str, rank: usize, world: usize) {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::prelude::*;
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
        // Log lines carry only the event: span context (job, stage, epoch, step) goes to traces,
        // where it is structure, not a prefix on every line.
        let fmt = tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_target(false)
            .with_filter(tracing_subscriber::filter::filter_fn(|m| m.is_event()))
            .with_filter(filter);
        let mut otel_error = None;
        let otel = if otel::wanted() {
            match otel::start(job, rank, world) {
                // Only our spans: the exporter's own HTTP client must not trace itself.
                Ok(tracer) => Some(
                    tracing_opentelemetry::layer()
                        .with_tracer(tracer)
                        .with_filter(Targets::new().with_target("illmrec", LevelFilter::INFO)),
                ),
                Err(e) => {
                    otel_error = Some(e);
                    None
                }
            }
        } else {
            None
        };
        let _ = tracing_subscriber::registry().with(fmt).with(otel).try_init();
        if let Some(e) = otel_error {
            tracing::warn!("traces will not be exported: {e}");
        }
    });
}

#[cfg(test)]
mod cpu_tests {
    #[test]
    fn cpu_time_grows_with_work() {
        let Some(before) = super::cpu_seconds() else { return };
        let mut x = 0u64;
        let started = std::time::Instant::now();
        while started.elapsed().as_millis() < 300 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        assert!(super::cpu_seconds().unwrap() > before);
    }
}
