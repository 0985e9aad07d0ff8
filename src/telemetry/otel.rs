//! OpenTelemetry traces over OTLP (HTTP/protobuf), on when the standard variables name a collector
//! (OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT; headers, timeout and
//! compression from the other OTEL_EXPORTER_OTLP_* variables). Every span carries the job, rank and
//! world size as resource attributes. The provider batches spans on its own thread; [`shutdown`]
//! flushes it and must run before the process exits, on success and on error alike.

use std::sync::Mutex;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;

static PROVIDER: Mutex<Option<SdkTracerProvider>> = Mutex::new(None);

/// Whether the environment asks for trace export.
pub fn wanted() -> bool {
    ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"]
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()))
}

/// This process's place in the job, from the launcher's environment (the MPI backend reports the
/// same numbers once it starts).
pub fn rank_and_world() -> (i64, i64) {
    let num = |names: &[&str]| names.iter().find_map(|n| std::env::var(n).ok()?.trim().parse::<i64>().ok());
    let rank = num(&["OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID", "PMI_RANK"]).unwrap_or(0);
    let world = num(&["OMPI_COMM_WORLD_SIZE", "SLURM_NTASKS", "PMI_SIZE"]).unwrap_or(1);
    (rank, world)
}

/// Builds the exporter and provider; the tracer for the tracing layer.
pub fn start(job: &str) -> Result<opentelemetry_sdk::trace::Tracer, String> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .build()
        .map_err(|e| format!("OTLP exporter: {e}"))?;
    let (rank, world) = rank_and_world();
    let resource = Resource::builder()
        .with_service_name("illmrec")
        .with_attributes([
            KeyValue::new("illmrec.job", job.to_string()),
            KeyValue::new("illmrec.rank", rank),
            KeyValue::new("illmrec.world_size", world),
            KeyValue::new("service.instance.id", format!("{job}/rank-{rank}")),
        ])
        .build();
    let provider = SdkTracerProvider::builder().with_resource(resource).with_batch_exporter(exporter).build();
    let tracer = provider.tracer("illmrec");
    if let Ok(mut p) = PROVIDER.lock() {
        *p = Some(provider);
    }
    Ok(tracer)
}

/// Flushes and stops the provider (no-op without one). Call before exit.
pub fn shutdown() {
    let provider = PROVIDER.lock().ok().and_then(|mut p| p.take());
    if let Some(p) = provider {
        if let Err(e) = p.shutdown() {
            eprintln!("illmrec: flushing OpenTelemetry spans: {e}");
        }
    }
}
