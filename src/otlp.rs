//! Spans exported over OTLP (`--otlp-endpoint`): one server span per call (a child of the
//! caller's W3C `traceparent` when it sent one), one per transaction attempt and one per
//! policy evaluation, sent in batches to an OpenTelemetry collector over gRPC. Off unless
//! asked: without the exporter no layer wants the spans' target, so they are never built.
//!
//! The export never holds up a call: spans go to a bounded queue (2,048 by default;
//! `OTEL_BSP_*` tune it) that a thread of the SDK drains; when the collector is slow or
//! gone, spans are dropped, not calls.

use crate::telemetry::SPANS;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};
use std::time::Duration;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The exporter while the process runs; `shutdown` sends what is still queued.
pub struct Export {
    provider: SdkTracerProvider,
}

impl Export {
    /// Starts the exporter towards `endpoint` (`http://host:4317`, checked by the command
    /// line), sampling root traces at `ratio` (a caller's sampled flag is followed). Needs a
    /// tokio runtime (the gRPC channel's connection task runs on it).
    pub fn start(endpoint: &str, ratio: f64) -> anyhow::Result<Export> {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .with_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| anyhow::anyhow!("--otlp-endpoint: {e}"))?;
        let service = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| "lockstep".into());
        // The standard OTEL_BSP_* variables, within bounds: the queue is allocated up front,
        // and a delay of 0 would spin a core.
        let env = |name: &str, default: u64, lo: u64, hi: u64| {
            std::env::var(name).ok().and_then(|v| v.trim().parse::<u64>().ok()).unwrap_or(default).clamp(lo, hi)
        };
        let queue = env("OTEL_BSP_MAX_QUEUE_SIZE", 2_048, 1, 65_536);
        let batches = opentelemetry_sdk::trace::BatchConfigBuilder::default()
            .with_max_queue_size(queue as usize)
            .with_scheduled_delay(Duration::from_millis(env("OTEL_BSP_SCHEDULE_DELAY", 5_000, 50, 60_000)))
            .with_max_export_batch_size(env("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512, 1, queue) as usize)
            .build();
        let processor = opentelemetry_sdk::trace::BatchSpanProcessor::builder(Counted {
            inner: exporter,
            warned: std::sync::Mutex::new(None),
        })
        .with_batch_config(batches)
        .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio))))
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name(service)
                    .with_attribute(opentelemetry::KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
                    .build(),
            )
            .build();
        Ok(Export { provider })
    }

    pub fn tracer(&self) -> SdkTracer {
        self.provider.tracer("lockstep")
    }

    /// Sends the spans still queued; waits at most 5 s (a collector that hangs cannot keep
    /// the process from exiting).
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown_with_timeout(Duration::from_secs(5)) {
            tracing::warn!(error = %e, "OTLP export at shutdown: spans still queued are lost");
        }
    }
}

/// The OTLP exporter, counting what it sends and what it fails to send
/// (`lockstep_otlp_spans_total{outcome}`), with a WARN line at most once a minute while
/// exports fail.
#[derive(Debug)]
struct Counted {
    inner: opentelemetry_otlp::SpanExporter,
    warned: std::sync::Mutex<Option<std::time::Instant>>,
}

impl opentelemetry_sdk::trace::SpanExporter for Counted {
    async fn export(&self, batch: Vec<opentelemetry_sdk::trace::SpanData>) -> opentelemetry_sdk::error::OTelSdkResult {
        let n = batch.len() as u64;
        let outcome = self.inner.export(batch).await;
        match &outcome {
            Ok(()) => metrics::counter!(crate::telemetry::OTLP_SPANS, "outcome" => "exported").increment(n),
            Err(e) => {
                metrics::counter!(crate::telemetry::OTLP_SPANS, "outcome" => "failed").increment(n);
                let mut warned = self.warned.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                if warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                    *warned = Some(std::time::Instant::now());
                    tracing::warn!(error = %e, spans = n, "OTLP export failed; these spans are lost (the next warning in a minute at most)");
                }
            }
        }
        outcome
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

/// The parts of a W3C `traceparent` header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: String,
    pub parent_id: String,
    pub sampled: bool,
}

/// Parses `00-<32 hex>-<16 hex>-<2 hex>` (55 characters for version 00); None when absent
/// or malformed (an all-zero id is invalid). `tracestate` is not read.
pub fn traceparent(header: Option<&http::HeaderValue>) -> Option<TraceParent> {
    let v = header?.to_str().ok()?;
    if v.len() > 256 {
        return None;
    }
    let mut parts = v.trim().split('-');
    let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !hex(version, 2) || version == "ff" || !hex(trace, 32) || !hex(span, 16) || !hex(flags, 2) {
        return None;
    }
    // Version 00 has exactly four fields; later versions may add more after them.
    if version == "00" && parts.next().is_some() {
        return None;
    }
    if trace.bytes().all(|b| b == b'0') || span.bytes().all(|b| b == b'0') {
        return None;
    }
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some(TraceParent { trace_id: trace.to_owned(), parent_id: span.to_owned(), sampled: flags & 1 == 1 })
}

/// The server span of a call to `path` (`/pkg.Service/Method`, or `(unknown)`), a child of
/// `parent` when the caller sent one. Disabled (and free) when nothing exports spans.
pub fn server_span(service: &str, method: &str, parent: Option<&TraceParent>) -> tracing::Span {
    let span = tracing::info_span!(
        target: SPANS,
        "rpc",
        otel.name = format!("{service}/{method}"),
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = method,
        rpc.grpc.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    if span.is_disabled() {
        return span;
    }
    if let Some(p) = parent
        && let (Ok(t), Ok(s)) = (TraceId::from_hex(&p.trace_id), SpanId::from_hex(&p.parent_id))
    {
        let flags = if p.sampled { TraceFlags::SAMPLED } else { TraceFlags::default() };
        let remote = SpanContext::new(t, s, flags, true, TraceState::NONE);
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
    }
    span
}

/// The trace id `span` will be exported under, when it is exported (sampled).
pub fn exported_trace_id(span: &tracing::Span) -> Option<String> {
    if span.is_disabled() {
        return None;
    }
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    (sc.is_valid() && sc.is_sampled()).then(|| sc.trace_id().to_string())
}

/// Records a call's gRPC status on its server span; the codes OpenTelemetry's conventions
/// count as server errors mark the span as failed.
pub fn record_status(span: &tracing::Span, code: tonic::Code) {
    if span.is_disabled() {
        return;
    }
    span.record("rpc.grpc.status_code", code as i64);
    use tonic::Code::*;
    if matches!(code, Unknown | DeadlineExceeded | Unimplemented | Internal | Unavailable | DataLoss) {
        span.record("otel.status_code", "error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_is_parsed_or_refused() {
        let p = |v: &str| traceparent(Some(&http::HeaderValue::from_str(v).unwrap()));
        let good = p("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(good.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(good.parent_id, "00f067aa0ba902b7");
        assert!(good.sampled);
        assert!(!p("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").unwrap().sampled);
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "garbage",
        ] {
            assert_eq!(p(bad), None, "{bad}");
        }
        assert!(p("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future").is_some());
        assert_eq!(traceparent(None), None);
    }
}
