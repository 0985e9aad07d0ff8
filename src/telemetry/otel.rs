//! OpenTelemetry traces over OTLP (HTTP/protobuf), on when the standard variables name a collector
//! (OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT; headers, timeout and
//! compression from the other OTEL_EXPORTER_OTLP_* variables). Every span carries the job, rank and
//! world size as resource attributes. The provider batches spans on its own thread; [`shutdown`]
//! flushes it and must run before the process exits, on success and on error alike.

use std::sync::Mutex;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState};
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

/// Builds the exporter and provider; the tracer for the tracing layer. `rank` and `world` are this
/// process's place in the job, as its launcher says.
pub fn start(job: &str, rank: usize, world: usize) -> Result<opentelemetry_sdk::trace::Tracer, String> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .build()
        .map_err(|e| format!("OTLP exporter: {e}"))?;
    let (rank, world) = (rank as i64, world as i64);
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

/// A W3C trace context, `00-<trace id>-<span id>-<flags>`, as a remote span context.
pub fn parse_traceparent(text: &str) -> Option<SpanContext> {
    let parts: Vec<&str> = text.trim().split('-').collect();
    let [version, trace, span, flags] = parts[..] else { return None };
    if version.len() != 2 || version == "ff" || trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
        return None;
    }
    let trace_id = TraceId::from_hex(trace).ok()?;
    let span_id = SpanId::from_hex(span).ok()?;
    let flags = TraceFlags::new(u8::from_str_radix(flags, 16).ok()?);
    let cx = SpanContext::new(trace_id, span_id, flags, true, TraceState::default());
    cx.is_valid().then_some(cx)
}

/// The span context a `TRACEPARENT` in the environment names: a scheduler or workflow engine that
/// starts the job hands its own trace over this way.
pub fn parent_from_env() -> Option<SpanContext> {
    parse_traceparent(&std::env::var("TRACEPARENT").ok()?)
}

/// Makes the (not yet entered) `span` a child of `parent`. Without trace export there is nothing to
/// connect, and the call does nothing.
pub fn set_parent(span: &tracing::Span, parent: SpanContext) {
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(parent));
}

/// A span's context as 25 bytes (trace id, span id, flags), the form ranks exchange; all zeros when
/// traces are not exported. Starts the span.
pub fn context_bytes(span: &tracing::Span) -> Vec<u8> {
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    let mut out = sc.trace_id().to_bytes().to_vec();
    out.extend(sc.span_id().to_bytes());
    out.push(sc.trace_flags().to_u8());
    out
}

/// The span context of `context_bytes`, if it names a valid one.
pub fn context_from_bytes(bytes: &[u8]) -> Option<SpanContext> {
    let trace: [u8; 16] = bytes.get(..16)?.try_into().ok()?;
    let span: [u8; 8] = bytes.get(16..24)?.try_into().ok()?;
    let flags = TraceFlags::new(*bytes.get(24)?);
    let cx = SpanContext::new(TraceId::from_bytes(trace), SpanId::from_bytes(span), flags, true, TraceState::default());
    cx.is_valid().then_some(cx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_w3c_traceparent_and_refuses_malformed_ones() {
        let cx = parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(cx.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(cx.span_id().to_string(), "00f067aa0ba902b7");
        assert!(cx.is_sampled() && cx.is_remote());
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473x-00f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn context_bytes_round_trip() {
        let cx = parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        let mut bytes = cx.trace_id().to_bytes().to_vec();
        bytes.extend(cx.span_id().to_bytes());
        bytes.push(1);
        assert_eq!(context_from_bytes(&bytes).unwrap(), cx);
        assert!(context_from_bytes(&[0; 25]).is_none());
    }
}
