//! Spans over OTLP (issue 13): a real server process exports to a small OTLP/gRPC collector
//! inside the test. A call's server span is the child of the caller's `traceparent`; the
//! transaction attempt is its child and the policy evaluation the transaction's; a trace
//! started here has its id in the call's log line and audit event; a caller's unsampled
//! trace exports nothing.

use crate::common::*;
use crate::operations::{free_port, spawn, with_trace};
use lockstep::grpc::pb;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::trace::v1::Span;
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Keeps every span it is sent, with its resource's `service.name`.
#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<(String, Span)>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut kept = self.0.lock().unwrap();
        for rs in req.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| a.value.as_ref()?.value.as_ref())
                .map(|v| match v {
                    Any::StringValue(s) => s.clone(),
                    other => format!("{other:?}"),
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                kept.extend(ss.spans.into_iter().map(|s| (service.clone(), s)));
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

impl Collector {
    /// Waits until a span named `name` with `trace_id` (hex) has arrived.
    async fn span(&self, trace_id: &str, name: &str) -> Span {
        let t0 = Instant::now();
        loop {
            if let Some((_, s)) =
                self.0.lock().unwrap().iter().find(|(_, s)| hex::encode(&s.trace_id) == trace_id && s.name == name)
            {
                return s.clone();
            }
            assert!(t0.elapsed() < Duration::from_secs(15), "no span {name} in trace {trace_id}: {:#?}", self.names());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn names(&self) -> Vec<(String, String)> {
        self.0.lock().unwrap().iter().map(|(_, s)| (hex::encode(&s.trace_id), s.name.clone())).collect()
    }
}

fn attr(span: &Span, key: &str) -> Option<Any> {
    span.attributes.iter().find(|a| a.key == key).and_then(|a| a.value.clone()?.value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_otlp_collector_under_the_callers_trace() {
    let collector = Collector::default();
    let cport = free_port();
    let caddr: SocketAddr = format!("127.0.0.1:{cport}").parse().unwrap();
    let serving = collector.clone();
    tokio::spawn(async move {
        tonic::transport::Server::builder().add_service(TraceServiceServer::new(serving)).serve(caddr).await.unwrap();
    });

    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    bootstrap_db(&db.url).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("serve.log");
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let endpoint = format!("http://{caddr}");
    let _server = spawn(
        &["serve", "--database", &db.url, "--listen", &addr.to_string(), "--otlp-endpoint", &endpoint],
        &[("LOCKSTEP_LOG_FORMAT", "json"), ("LOCKSTEP_LOG", "info"), ("OTEL_BSP_SCHEDULE_DELAY", "100")],
        &log,
        addr,
    )
    .await;

    let (alice, bob) = (token("k1", "alice"), token("k1", "bob"));
    let mut c = client(addr).await;
    let doc = || commit_req(vec![update("UpdateItem", "Item", "doc", json!({ "title": "t" }), None)]);

    // A caller's trace: the server span is its child.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    c.authorize_and_commit(with_trace(&alice, doc(), trace)).await.unwrap();
    let server = collector.span(trace, "lockstep.v1.Lockstep/AuthorizeAndCommit").await;
    assert_eq!(hex::encode(&server.parent_span_id), "00f067aa0ba902b7");
    assert_eq!(server.kind, 2, "SPAN_KIND_SERVER");
    assert_eq!(attr(&server, "rpc.system"), Some(Any::StringValue("grpc".into())));
    assert_eq!(attr(&server, "rpc.method"), Some(Any::StringValue("AuthorizeAndCommit".into())));
    assert_eq!(attr(&server, "rpc.grpc.status_code"), Some(Any::IntValue(0)));
    let txn = collector.span(trace, "transaction").await;
    assert_eq!(txn.parent_span_id, server.span_id, "the transaction is the call's child");
    assert_eq!(attr(&txn, "outcome"), Some(Any::StringValue("committed".into())));
    let eval = collector.span(trace, "policy.evaluate").await;
    assert_eq!(eval.parent_span_id, txn.span_id, "the evaluation is the transaction's child");
    assert_eq!(attr(&eval, "decision"), Some(Any::StringValue("allow".into())));
    assert!(server.start_time_unix_nano <= txn.start_time_unix_nano);
    assert!(txn.end_time_unix_nano <= server.end_time_unix_nano);
    assert_eq!(collector.0.lock().unwrap()[0].0, "lockstep");

    // A trace started here: its id is in the log line and in the audit event.
    let denied = c.authorize_and_commit(authed(&bob, doc())).await.unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    let t0 = Instant::now();
    let started = loop {
        let text = std::fs::read_to_string(&log).unwrap();
        let line = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| v["target"] == "lockstep::call" && v["principal"] == "User::\"bob\"");
        if let Some(line) = line {
            break line["trace_id"].as_str().expect("a trace id in the log line").to_owned();
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "no log line: {text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_ne!(started, trace);
    let server = collector.span(&started, "lockstep.v1.Lockstep/AuthorizeAndCommit").await;
    assert!(server.parent_span_id.is_empty(), "a root span");
    assert_eq!(attr(&server, "rpc.grpc.status_code"), Some(Any::IntValue(7)));
    let eval = collector.span(&started, "policy.evaluate").await;
    assert_eq!(attr(&eval, "decision"), Some(Any::StringValue("deny".into())));
    let root = token("k2", "root");
    let events = c
        .list_audit_events(authed(&root, pb::ListAuditEventsRequest { after_seq: 0, limit: 100 }))
        .await
        .unwrap()
        .into_inner()
        .events;
    assert!(events.iter().any(|e| e.detail.contains(&started)), "{events:#?}");

    // A caller's trace it chose not to sample: nothing is exported for it.
    let unsampled = "0af7651916cd43dd8448eb211c80319c";
    let mut r = authed(&alice, doc());
    r.metadata_mut().insert("traceparent", format!("00-{unsampled}-b7ad6b7169203331-00").parse().unwrap());
    c.authorize_and_commit(r).await.unwrap();
    // A later sampled call's spans arrive after it would have.
    let after = "11111111111111111111111111111111";
    c.authorize_and_commit(with_trace(&alice, doc(), after)).await.unwrap();
    collector.span(after, "lockstep.v1.Lockstep/AuthorizeAndCommit").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!collector.names().iter().any(|(t, _)| t == unsampled), "{:#?}", collector.names());
}
