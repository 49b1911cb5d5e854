//! The tower layer around every gRPC service of the server (`AnswerLayer`). It does two
//! things the generated code and tonic's transport cannot be told to do:
//!
//! - **A handler is never dropped at the deadline.** tonic's server wraps every call in its
//!   own `grpc-timeout` enforcement, outside any layer we can add, and at the deadline drops
//!   the handler's future and answers CANCELLED "Timeout expired" — also for a call whose
//!   COMMIT is under way, which may then land. That timer only covers the future that yields
//!   the response *head*, and it polls that future before its timer. So the handler runs in
//!   this layer's future, and its whole answer (head, message, status) goes out in one write
//!   when it is done — unless the caller's timeout comes first: then the handler moves to a
//!   task of its own, the head (HTTP 200, `application/grpc`) goes at once, and the message
//!   and status follow in the body and trailers when the handler is done. The answer of a
//!   write is therefore always its outcome; the engine's own deadline
//!   (`engine::CallOptions::deadline`) is what stops a call that has committed nothing. A
//!   client that resets the stream does not cancel the call either: its handler moves to a
//!   task of its own and runs to its outcome.
//! - **Transport errors get the codes the README names.** tonic answers a message over its
//!   decode limit with OUT_OF_RANGE and prost's decode failures (e.g. nesting past its
//!   recursion limit) with INTERNAL; these become RESOURCE_EXHAUSTED and INVALID_ARGUMENT.
//! - **Admission.** At most `max_in_flight` calls run at once and `max_queue` wait; a call
//!   beyond both is answered RESOURCE_EXHAUSTED at once, with a `google.rpc.RetryInfo`,
//!   before its handler runs (it commits nothing). Health and reflection are never shed.
//! - **One log line and the metrics of every call** when its status is known: method, code,
//!   latency, and what the handler noted (`telemetry::note`: principal, action, resource,
//!   decision, audit seq), with the trace id of a W3C `traceparent` header.
//! - **A server span per call** (`otlp`), the caller's `traceparent` its parent, when spans
//!   are exported; the handler's transaction and policy spans are its children.

use crate::otlp;
use crate::telemetry::{self, CallFacts};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body::Frame;
use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tonic::body::Body;
use tonic::{Code, Status};
use tracing::Instrument as _;

/// Wraps services in `Answer` (see the module doc).
#[derive(Clone, Debug)]
pub struct AnswerLayer {
    admission: Arc<Admission>,
}

impl AnswerLayer {
    /// At most `max_in_flight` calls at once, `max_queue` more waiting.
    pub fn new(max_in_flight: u32, max_queue: u32) -> Self {
        Self {
            admission: Arc::new(Admission {
                running: Arc::new(Semaphore::new(max_in_flight.max(1) as usize)),
                max_in_flight: max_in_flight.max(1),
                queued: AtomicU32::new(0),
                max_queue,
                bad_tokens: Mutex::default(),
            }),
        }
    }
}

impl Default for AnswerLayer {
    fn default() -> Self {
        Self::new(256, 256)
    }
}

impl<S> tower_layer::Layer<S> for AnswerLayer {
    type Service = Answer<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Answer { inner, admission: self.admission.clone() }
    }
}

/// A service whose calls run to completion in their own task (see the module doc).
#[derive(Clone, Debug)]
pub struct Answer<S> {
    inner: S,
    admission: Arc<Admission>,
}

/// The bound on calls in flight and waiting, shared by every service and connection.
#[derive(Debug)]
struct Admission {
    running: Arc<Semaphore>,
    max_in_flight: u32,
    queued: AtomicU32,
    max_queue: u32,
    /// UNAUTHENTICATED answers per peer address in the current minute (for the WARN line).
    bad_tokens: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

/// A peer whose calls fail authentication this often within a minute is named at WARN.
const BAD_TOKENS_WARN: u32 = 20;

impl Admission {
    /// A permit at once, a place in the queue, or None: shed.
    fn admit(&self) -> Option<Ticket> {
        if let Ok(p) = self.running.clone().try_acquire_owned() {
            return Some(Ticket::Running(p));
        }
        if self.queued.fetch_add(1, Ordering::AcqRel) >= self.max_queue {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        metrics::gauge!(telemetry::QUEUED).increment(1.0);
        Some(Ticket::Queued)
    }

    async fn wait(&self, ticket: Ticket) -> Option<OwnedSemaphorePermit> {
        let permit = match ticket {
            Ticket::Running(p) => Some(p),
            Ticket::Queued => {
                let p = self.running.clone().acquire_owned().await.ok();
                self.queued.fetch_sub(1, Ordering::AcqRel);
                metrics::gauge!(telemetry::QUEUED).decrement(1.0);
                p
            }
        };
        metrics::gauge!(telemetry::IN_FLIGHT).increment(1.0);
        permit
    }

    fn note_unauthenticated(&self, peer: Option<IpAddr>) {
        let Some(ip) = peer else { return };
        let Ok(mut m) = self.bad_tokens.lock() else { return };
        let now = Instant::now();
        if m.len() > 10_000 {
            m.retain(|_, (since, _)| now.duration_since(*since) < Duration::from_secs(60));
            if m.len() > 10_000 {
                // Bounded whatever the peers: start over (the WARN line is best effort).
                m.clear();
            }
        }
        let e = m.entry(ip).or_insert((now, 0));
        if now.duration_since(e.0) >= Duration::from_secs(60) {
            *e = (now, 0);
        }
        e.1 += 1;
        if e.1 == BAD_TOKENS_WARN {
            tracing::warn!(peer = %ip, failures = e.1, "repeated UNAUTHENTICATED answers to one peer within a minute");
        }
    }
}

enum Ticket {
    Running(OwnedSemaphorePermit),
    Queued,
}

/// What is known of a call when its answer is complete (see `CallEnd::finish`).
struct CallEnd {
    method: String,
    /// The service and method of its metrics (`(unknown)` for a method not served).
    labels: (String, String),
    start: Instant,
    facts: Arc<Mutex<CallFacts>>,
    peer: Option<IpAddr>,
    admission: Arc<Admission>,
    /// The call's server span (disabled unless spans are exported).
    span: tracing::Span,
}

impl CallEnd {
    /// The call's metrics and its one log line (never a token, a secret or a value).
    fn finish(self, code: Code) {
        let elapsed = self.start.elapsed();
        // The path is the caller's: a method that does not exist (UNIMPLEMENTED) gets no
        // series of its own, so that random paths cannot grow the metrics without bound,
        // and the log gets at most 128 characters of it.
        let (service, method) = self.labels;
        // (A path is the caller's text: anything but printable ASCII is shown escaped, so
        // that no control or bidirectional character reaches a terminal or a log viewer.)
        let shown: String = self
            .method
            .chars()
            .take(128)
            .map(|c| if c.is_ascii_graphic() { c.to_string() } else { c.escape_unicode().to_string() })
            .collect();
        let code_name = code_name(code);
        otlp::record_status(&self.span, code);
        metrics::counter!(telemetry::CALLS, "service" => service.clone(), "method" => method.clone(), "code" => code_name)
            .increment(1);
        metrics::histogram!(telemetry::CALL_SECONDS, "service" => service, "method" => method)
            .record(elapsed.as_secs_f64());
        if code == Code::Unauthenticated {
            self.admission.note_unauthenticated(self.peer);
        }
        let f = self.facts.lock().map(|f| f.clone()).unwrap_or_default();
        tracing::info!(
            target: "lockstep::call",
            method = %shown,
            code = code_name,
            latency_ms = (elapsed.as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0,
            peer = self.peer.map(|p| p.to_string()),
            principal = f.principal,
            action = f.action,
            resource = f.resource,
            decision = f.decision,
            audit_seq = f.audit_seq,
            trace_id = f.trace_id,
            "call"
        );
    }
}

/// Whether `path` names a method this server serves (the label of its metrics).
fn known_method(path: &str) -> bool {
    static KNOWN: std::sync::OnceLock<std::collections::HashSet<String>> = std::sync::OnceLock::new();
    KNOWN
        .get_or_init(|| {
            use prost::Message;
            let mut known: std::collections::HashSet<String> = [
                "/grpc.health.v1.Health/Check",
                "/grpc.health.v1.Health/Watch",
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                "/envoy.service.auth.v3.Authorization/Check",
            ]
            .into_iter()
            .map(str::to_owned)
            .collect();
            if let Ok(set) = prost_types::FileDescriptorSet::decode(super::pb::FILE_DESCRIPTOR_SET) {
                for f in set.file {
                    for svc in &f.service {
                        for m in &svc.method {
                            known.insert(format!("/{}.{}/{}", f.package(), svc.name(), m.name()));
                        }
                    }
                }
            }
            known
        })
        .contains(path)
}

/// `/lockstep.v1.Lockstep/Authorize` → (`lockstep.v1.Lockstep`, `Authorize`).
fn split_path(path: &str) -> (&str, &str) {
    let p = path.trim_start_matches('/');
    p.split_once('/').unwrap_or((p, ""))
}

/// The code's name as gRPC spells it in its documentation (`OK`, `PERMISSION_DENIED`).
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<S> tower_service::Service<Request<Body>> for Answer<S>
where
    S: tower_service::Service<Request<Body>, Response = Response<Body>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError> + Send + 'static,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = AnswerFuture<S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        req.extensions_mut().insert(Arrival(tokio::time::Instant::now()));
        let method = req.uri().path().to_owned();
        let (service, name) = if known_method(&method) { split_path(&method) } else { ("(unknown)", "(unknown)") };
        let parent = otlp::traceparent(req.headers().get("traceparent"));
        // Health and reflection answer under any load (probes must not fail for it), and
        // make no spans (a probe every few seconds is not a trace anyone wants).
        let exempt = method.starts_with("/grpc.health.") || method.starts_with("/grpc.reflection.");
        let span = if exempt { tracing::Span::none() } else { otlp::server_span(service, name, parent.as_ref()) };
        // The caller's trace, or the one this call's spans are exported under.
        let trace_id = parent.map(|p| p.trace_id).or_else(|| otlp::exported_trace_id(&span));
        let facts = Arc::new(Mutex::new(CallFacts { trace_id, ..CallFacts::default() }));
        let peer = req
            .extensions()
            .get::<tonic::transport::server::TcpConnectInfo>()
            .and_then(|i| i.remote_addr())
            .map(|a| a.ip());
        let labels = (service.to_owned(), name.to_owned());
        let end = CallEnd {
            method,
            labels,
            start: Instant::now(),
            facts: facts.clone(),
            peer,
            admission: self.admission.clone(),
            span: span.clone(),
        };
        let ticket = if exempt {
            None
        } else {
            match self.admission.admit() {
                Some(t) => Some(t),
                None => {
                    metrics::counter!(telemetry::SHED).increment(1);
                    let a = &self.admission;
                    use tonic_types::StatusExt;
                    let status = tonic::Status::with_error_details(
                        Code::ResourceExhausted,
                        format!(
                            "overloaded: {} calls in flight and {} waiting (--max-in-flight, --max-queue); nothing was \
                             done; retry after the delay in google.rpc.RetryInfo",
                            a.max_in_flight, a.max_queue
                        ),
                        tonic_types::ErrorDetails::with_retry_info(Some(Duration::from_millis(100))),
                    );
                    end.finish(Code::ResourceExhausted);
                    let shed: Handler<S::Error> = Box::pin(std::future::ready(Ok(status.into_http())));
                    return AnswerFuture { handler: Some(shed), end: None, head_by: None, head: None };
                }
            }
        };
        // The head may wait for the handler only while tonic's own `grpc-timeout` timer
        // cannot fire: until the caller's timeout, counted from now (tonic starts its timer
        // after this call returns, and polls this future before its timer). A header this
        // server cannot read gets the head at once.
        let timeout = req.headers().get("grpc-timeout").map(|v| v.to_str().ok().and_then(super::parse_grpc_timeout));
        let head_at_once = matches!(timeout, Some(None));
        let head_by = timeout.flatten().map(|d| tokio::time::Instant::now() + d);
        let call = self.inner.call(req);
        let admission = self.admission.clone();
        let handler: Handler<S::Error> = Box::pin(telemetry::scope(
            facts,
            async move {
                let _permit = match ticket {
                    Some(t) => {
                        let p = admission.wait(t).await;
                        Some(InFlight(p))
                    }
                    None => None,
                };
                call.await
            }
            .instrument(span),
        ));
        let mut answer = AnswerFuture { handler: Some(handler), end: Some(end), head_by, head: None };
        if head_at_once {
            answer.head = Some(answer.detach());
        }
        answer
    }
}

/// A call's handler: the admission wait, then the service's future.
type Handler<E> = Pin<Box<dyn Future<Output = Result<Response<Body>, E>> + Send>>;

/// The answer to one call. The handler runs here, in the connection's task for this
/// stream, and its whole answer (head, message, status) goes out in one write when it is
/// done. When the head must go first (the caller's `grpc-timeout` is near: tonic would
/// drop this future and answer CANCELLED), or this future is dropped (the caller reset the
/// stream), the handler moves to a task of its own and runs to its outcome there; the
/// head goes at once and the message and status follow in the body (`Detached`).
pub struct AnswerFuture<E: Into<BoxError> + Send + 'static> {
    handler: Option<Handler<E>>,
    end: Option<CallEnd>,
    /// When the head must be answered at the latest (None: no deadline).
    head_by: Option<tokio::time::Instant>,
    /// The head, when it was decided at the call that it goes at once (a `grpc-timeout`
    /// this server cannot read): the handler runs detached already.
    head: Option<Response<Body>>,
}

impl<E: Into<BoxError> + Send + 'static> AnswerFuture<E> {
    /// Moves the handler to a task of its own; the answer becomes a head whose body waits
    /// for that task.
    fn detach(&mut self) -> Response<Body> {
        let state = match self.handler.take() {
            Some(h) => Detached::Waiting(tokio::spawn(h)),
            None => Detached::Done,
        };
        let mut head = Response::new(Body::new(Answering { state, end: self.end.take() }));
        head.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        head
    }
}

impl<E> Future for AnswerFuture<E>
where
    E: Into<BoxError> + Send + 'static,
{
    type Output = Result<Response<Body>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if let Some(head) = this.head.take() {
            return Poll::Ready(Ok(head));
        }
        let Some(handler) = this.handler.as_mut() else {
            // Polled after its answer (never, by hyper): an empty, failed answer.
            return Poll::Ready(Ok(trailers_only(status_trailers(Status::internal("answer already given")))));
        };
        // A panic in the handler is the call's INTERNAL answer, as in a task of its own.
        let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handler.as_mut().poll(cx)));
        let answer = match polled {
            Ok(Poll::Ready(answer)) => Ok(answer),
            Err(_) => Err(()),
            Ok(Poll::Pending) => {
                if this.head_by.is_some_and(|t| tokio::time::Instant::now() >= t) {
                    return Poll::Ready(Ok(this.detach()));
                }
                return Poll::Pending;
            }
        };
        this.handler = None;
        let end = this.end.take();
        let (state, head) = match answer {
            Ok(Ok(response)) => {
                let (parts, body) = response.into_parts();
                if parts.headers.contains_key("grpc-status") {
                    (None, trailers_only(trailers(&parts.headers)))
                } else {
                    (Some(Detached::<E>::Streaming(body)), Response::from_parts(parts, Body::empty()))
                }
            }
            Ok(Err(e)) => (None, trailers_only(status_trailers(Status::from_error(e.into())))),
            Err(()) => {
                tracing::error!("a call's handler panicked");
                (
                    None,
                    trailers_only(status_trailers(Status::internal(
                        "internal error; nothing was committed unless the audit log says so; see the server log",
                    ))),
                )
            }
        };
        Poll::Ready(Ok(match state {
            Some(state) => head.map(|_| Body::new(Answering { state, end })),
            None => {
                if let Some(end) = end {
                    end.finish(Status::from_header_map(head.headers()).map_or(Code::Ok, |s| s.code()));
                }
                head
            }
        }))
    }
}

impl<E: Into<BoxError> + Send + 'static> Drop for AnswerFuture<E> {
    fn drop(&mut self) {
        // Dropped before the handler was done (the caller reset the stream): the handler
        // still runs to its outcome, in a task of its own, and the log line and metrics
        // report that outcome (a commit the caller gave up on is still a commit).
        if self.handler.is_some() {
            drop(self.detach());
        }
    }
}

/// A trailers-only answer (an error): the status in the head, no body.
fn trailers_only(status: HeaderMap) -> Response<Body> {
    let mut head = Response::new(Body::empty());
    *head.headers_mut() = status;
    head.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    head
}

/// When a call arrived, before any wait for admission: its deadline counts from here.
#[derive(Clone, Copy, Debug)]
pub struct Arrival(pub tokio::time::Instant);

/// A running call's permit; leaving the in-flight gauge when dropped.
struct InFlight(#[allow(dead_code)] Option<OwnedSemaphorePermit>);

impl Drop for InFlight {
    fn drop(&mut self) {
        metrics::gauge!(telemetry::IN_FLIGHT).decrement(1.0);
    }
}

/// `Detached`, and the call's log line and metrics once its trailers are out.
struct Answering<E: Send + 'static> {
    state: Detached<E>,
    end: Option<CallEnd>,
}

impl<E> http_body::Body for Answering<E>
where
    E: Into<BoxError> + Send + 'static,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        let frame = ready!(Pin::new(&mut this.state).poll_frame(cx));
        match &frame {
            Some(Ok(f)) if f.is_trailers() => {
                if let (Some(end), Some(t)) = (this.end.take(), f.trailers_ref()) {
                    end.finish(Status::from_header_map(t).map_or(Code::Ok, |s| s.code()));
                }
            }
            Some(Err(e)) => {
                if let Some(end) = this.end.take() {
                    end.finish(e.code());
                }
            }
            None => {
                if let Some(end) = this.end.take() {
                    end.finish(Code::Ok);
                }
            }
            _ => {}
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.state.is_end_stream()
    }
}

impl<E: Send + 'static> Drop for Answering<E> {
    fn drop(&mut self) {
        // The client went away before the answer was complete. The handler still runs to
        // its outcome in its task: the log line and metrics wait for it and report that
        // outcome (a commit the client gave up on is still a commit).
        let Some(end) = self.end.take() else { return };
        match std::mem::replace(&mut self.state, Detached::Done) {
            Detached::Waiting(task) => {
                let waited = async move {
                    let code = match task.await {
                        Ok(Ok(response)) => Status::from_header_map(response.headers()).map_or(Code::Ok, |s| s.code()),
                        Ok(Err(_)) | Err(_) => Code::Internal,
                    };
                    end.finish(code);
                };
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    rt.spawn(waited);
                }
            }
            _ => end.finish(Code::Cancelled),
        }
    }
}

/// The body of an answer whose handler runs in its own task: nothing until the handler
/// is done, then its message frames and its status as trailers.
enum Detached<E> {
    Waiting(JoinHandle<Result<Response<Body>, E>>),
    Streaming(Body),
    Trailers(Option<HeaderMap>),
    Done,
}

impl<E> http_body::Body for Detached<E>
where
    E: Into<BoxError>,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        loop {
            match this {
                Detached::Waiting(task) => {
                    let answer = ready!(Pin::new(task).poll(cx));
                    *this = match answer {
                        Ok(Ok(response)) => {
                            let (parts, body) = response.into_parts();
                            if parts.headers.contains_key("grpc-status") {
                                // A trailers-only answer (an error): its head becomes the trailers.
                                Detached::Trailers(Some(trailers(&parts.headers)))
                            } else {
                                Detached::Streaming(body)
                            }
                        }
                        Ok(Err(e)) => Detached::Trailers(Some(status_trailers(Status::from_error(e.into())))),
                        Err(e) => {
                            tracing::error!(error = %e, "a call's task failed");
                            Detached::Trailers(Some(status_trailers(Status::internal(
                                "internal error; nothing was committed unless the audit log says so; see the server log",
                            ))))
                        }
                    };
                }
                Detached::Streaming(body) => {
                    return match ready!(Pin::new(body).poll_frame(cx)) {
                        Some(Ok(frame)) => match frame.into_trailers() {
                            Ok(t) => Poll::Ready(Some(Ok(Frame::trailers(trailers(&t))))),
                            Err(frame) => Poll::Ready(Some(Ok(frame))),
                        },
                        other => Poll::Ready(other),
                    };
                }
                Detached::Trailers(t) => {
                    let t = t.take().unwrap_or_default();
                    *this = Detached::Done;
                    return Poll::Ready(Some(Ok(Frame::trailers(t))));
                }
                Detached::Done => return Poll::Ready(None),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Detached::Streaming(b) => b.is_end_stream(),
            Detached::Done => true,
            _ => false,
        }
    }
}

/// The trailers for the status in `headers` (a trailers-only answer's head, or the
/// trailers of a streamed one): as they are, but for the codes `remapped` changes.
fn trailers(headers: &HeaderMap) -> HeaderMap {
    let mut t = headers.clone();
    t.remove(http::header::CONTENT_TYPE);
    if let Some(better) = Status::from_header_map(headers).and_then(|s| remapped(&s)) {
        for name in ["grpc-status", "grpc-message", "grpc-status-details-bin"] {
            t.remove(name);
        }
        let _ = better.add_header(&mut t);
    }
    t
}

fn status_trailers(status: Status) -> HeaderMap {
    let mut t = HeaderMap::new();
    let _ = remapped(&status).unwrap_or(status).add_header(&mut t);
    t
}

/// tonic's and prost's own answers to a request they cannot decode, in the codes of the
/// README: a message over the decode limit is RESOURCE_EXHAUSTED (tonic: OUT_OF_RANGE), a
/// message prost cannot decode is INVALID_ARGUMENT (tonic: INTERNAL). Lockstep's handlers
/// answer neither OUT_OF_RANGE nor an INTERNAL with these messages, so nothing else moves.
pub fn remapped(status: &Status) -> Option<Status> {
    let m = status.message();
    match status.code() {
        Code::OutOfRange if m.starts_with("Error, decoded message length too large") => {
            Some(Status::resource_exhausted(format!("request message too large: {m}")))
        }
        Code::Internal if m.starts_with("failed to decode Protobuf message") || m.starts_with("protocol error:") => {
            // prost names every field on the way down; what went wrong is the last part.
            let what = m.rsplit(": ").next().unwrap_or(m);
            Some(Status::invalid_argument(format!("request cannot be decoded as protobuf: {what}")))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_served_methods_get_series() {
        assert!(known_method("/lockstep.v1.Lockstep/AuthorizeAndCommit"));
        assert!(known_method("/lockstep.v1.Admin/PutPolicies"));
        assert!(known_method("/grpc.health.v1.Health/Check"));
        assert!(!known_method("/lockstep.v1.Lockstep/Random123"));
        assert!(!known_method("/x/y"));
    }
}
