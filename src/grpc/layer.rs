//! The tower layer around every gRPC service of the server (`AnswerLayer`). It does two
//! things the generated code and tonic's transport cannot be told to do:
//!
//! - **A handler is never dropped at the deadline.** tonic's server wraps every call in its
//!   own `grpc-timeout` enforcement, outside any layer we can add, and at the deadline drops
//!   the handler's future and answers CANCELLED "Timeout expired" — also for a call whose
//!   COMMIT is under way, which may then land. That timer only covers the future that yields
//!   the response *head*, so this layer runs the handler in a task of its own, answers the
//!   head (HTTP 200, `application/grpc`) at once, and sends the handler's message and status
//!   in the body and trailers when the handler is done. The answer of a write is therefore
//!   always its outcome; the engine's own deadline (`engine::CallOptions::deadline`) is what
//!   stops a call that has committed nothing. A client that resets the stream does not cancel
//!   the task either.
//! - **Transport errors get the codes the README names.** tonic answers a message over its
//!   decode limit with OUT_OF_RANGE and prost's decode failures (e.g. nesting past its
//!   recursion limit) with INTERNAL; these become RESOURCE_EXHAUSTED and INVALID_ARGUMENT.

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body::Frame;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tokio::task::JoinHandle;
use tonic::body::Body;
use tonic::{Code, Status};

/// Wraps services in `Answer` (see the module doc).
#[derive(Clone, Copy, Debug, Default)]
pub struct AnswerLayer;

impl<S> tower_layer::Layer<S> for AnswerLayer {
    type Service = Answer<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Answer { inner }
    }
}

/// A service whose calls run to completion in their own task (see the module doc).
#[derive(Clone, Debug)]
pub struct Answer<S> {
    inner: S,
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
    type Future = std::future::Ready<Result<Response<Body>, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let task = tokio::spawn(self.inner.call(req));
        let mut head = Response::new(Body::new(Detached::Waiting(task)));
        head.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        std::future::ready(Ok(head))
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
