//! The client's response: the upstream's streamed body or a short local message, with the
//! accounting that lasts as long as the body (in-flight gauge, the connection's activity, a
//! gRPC call's outcome from its trailers), and the responses canaryd makes itself.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Either;
use tokio::sync::mpsc::error::TrySendError;

use super::activity::Busy;
use crate::body::{BoxError, Tap};
use crate::control::Arm;
use crate::metrics::{ArmMetrics, InFlight, Metrics};
use crate::release::outcome::{Outcome, OutcomeSender};
use crate::upstream::error::UpstreamError;
use crate::upstream::UpstreamResponseBody;

/// Response body: the upstream's streamed body, or a short local message. Holds the request
/// in the arm's in-flight gauge until the body is finished or dropped, and, for a gRPC
/// response whose status comes in trailers, reports the outcome when they arrive.
#[derive(Debug)]
pub struct ProxyBody {
    pub(super) inner: Either<UpstreamResponseBody, Option<Bytes>>,
    pub(super) grpc: Option<GrpcWatch>,
    /// A copy of the body for the shadow comparison and the response analysis.
    pub(super) tap: Option<Box<Tap>>,
    pub(super) _in_flight: Option<InFlight>,
    pub(super) _busy: Option<Busy>,
}

impl ProxyBody {
    pub(super) fn local(text: String) -> Self {
        ProxyBody {
            inner: Either::Right(Some(Bytes::from(text))),
            grpc: None,
            tap: None,
            _in_flight: None,
            _busy: None,
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = match &mut this.inner {
            Either::Left(upstream) => Pin::new(upstream).poll_frame(cx),
            Either::Right(local) => return Poll::Ready(local.take().map(|b| Ok(Frame::data(b)))),
        };
        if let Some(tap) = &mut this.tap {
            match &polled {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref() {
                        tap.push(data);
                    }
                    // The last frame of a body of known length: hyper asks no further.
                    let ended = match &this.inner {
                        Either::Left(upstream) => upstream.is_end_stream(),
                        Either::Right(local) => local.is_none(),
                    };
                    if ended {
                        tap.end();
                    }
                }
                Poll::Ready(None) => tap.end(),
                Poll::Ready(Some(Err(_))) => tap.fail(),
                Poll::Pending => {}
            }
        }
        if let Some(watch) = &mut this.grpc {
            match &polled {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(trailers) = frame.trailers_ref() {
                        watch.finish(grpc_status(trailers));
                    }
                }
                // The stream ended without trailers: no grpc-status is an error (UNKNOWN).
                Poll::Ready(None) => watch.finish(Some(2)),
                Poll::Ready(Some(Err(_))) => watch.finish(Some(2)),
                Poll::Pending => {}
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Either::Left(upstream) => upstream.is_end_stream(),
            Either::Right(local) => local.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Either::Left(upstream) => upstream.size_hint(),
            Either::Right(local) => {
                SizeHint::with_exact(local.as_ref().map_or(0, |b| b.len() as u64))
            }
        }
    }
}

/// gRPC status codes that count as errors of the arm: the server-side failures UNKNOWN (2),
/// DEADLINE_EXCEEDED (4), UNIMPLEMENTED (12), INTERNAL (13), UNAVAILABLE (14), DATA_LOSS (15).
/// Client-caused codes (INVALID_ARGUMENT, NOT_FOUND, PERMISSION_DENIED, ...) do not.
pub fn grpc_error(code: u32) -> bool {
    matches!(code, 2 | 4 | 12 | 13 | 14 | 15)
}

pub(super) fn grpc_status(headers: &HeaderMap) -> Option<u32> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

pub(super) fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// Reports a gRPC call's outcome once its status is known from the trailers.
#[derive(Debug)]
pub(super) struct GrpcWatch {
    pub(super) outcome: Option<Outcome>,
    pub(super) arm: Arc<ArmMetrics>,
    pub(super) outcomes: OutcomeSender,
    pub(super) metrics: Arc<Metrics>,
}

impl GrpcWatch {
    fn finish(&mut self, code: Option<u32>) {
        if let Some(mut o) = self.outcome.take() {
            let code = code.unwrap_or(2);
            self.arm.grpc_status(code);
            o.error |= grpc_error(code);
            send_outcome(&self.outcomes, &self.metrics, o);
        }
    }
}

impl Drop for GrpcWatch {
    fn drop(&mut self) {
        // The client went away before the trailers: not the arm's failure, but still a call.
        if let Some(o) = self.outcome.take() {
            send_outcome(&self.outcomes, &self.metrics, o);
        }
    }
}

pub(super) fn send_outcome(outcomes: &OutcomeSender, metrics: &Metrics, o: Outcome) {
    match outcomes.try_send(o) {
        Ok(()) | Err(TrySendError::Closed(_)) => {}
        Err(TrySendError::Full(_)) => metrics.outcome_dropped(),
    }
}

/// Status for a failure, decided by where it came from.
pub(super) fn failure_status(e: &UpstreamError) -> StatusCode {
    match e {
        UpstreamError::Connect(_) | UpstreamError::Protocol(_) => StatusCode::BAD_GATEWAY,
        UpstreamError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        UpstreamError::Client(c) => c.fault.status(),
    }
}

/// A response to a request the client got wrong; `close`: HTTP/1 closes the connection after
/// it (what follows such a request cannot be trusted).
pub(super) fn client_response(status: StatusCode, cause: &str, close: bool) -> Response<ProxyBody> {
    let text = format!(
        "canaryd: {} {}: {}\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        cause
    );
    let mut resp = Response::new(ProxyBody::local(text));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if close {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

pub(super) fn local_response(status: StatusCode, arm: &Arm, cause: &str) -> Response<ProxyBody> {
    let text = format!(
        "canaryd: {} {} from upstream \"{}\": {}\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        arm.name,
        cause
    );
    let mut resp = Response::new(ProxyBody::local(text));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
