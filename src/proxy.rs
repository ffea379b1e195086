//! The proxy service: route, forward with streaming bodies, and map failures to 502/504.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Either;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc::error::TrySendError;
use tokio::time::Instant;

use crate::body::{ClientFault, RequestBody};
use crate::circuit::{Outcome, OutcomeSender};
use crate::conn::{Activity, Busy};
use crate::control::{Arm, Control, Snapshot};
use crate::h1::{BoxError, Upgraded};
use crate::http1::fields::{self, connection_has, remove_hop_by_hop, HopByHop};
use crate::metrics::{ArmMetrics, InFlight, Metrics};
use crate::routing::Decision;
use crate::upstream::{
    FailureKind, Forwarded, UpstreamBody, UpstreamError, UpstreamResponseBody, X_FORWARDED_FOR,
};

/// Response body: the upstream's streamed body, or a short local message. Holds the request
/// in the arm's in-flight gauge until the body is finished or dropped, and, for a gRPC
/// response whose status comes in trailers, reports the outcome when they arrive.
#[derive(Debug)]
pub struct ProxyBody {
    inner: Either<UpstreamResponseBody, Option<Bytes>>,
    grpc: Option<GrpcWatch>,
    _in_flight: Option<InFlight>,
    _busy: Option<Busy>,
}

impl ProxyBody {
    fn local(text: String) -> Self {
        ProxyBody {
            inner: Either::Right(Some(Bytes::from(text))),
            grpc: None,
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

fn grpc_status(headers: &HeaderMap) -> Option<u32> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// Reports a gRPC call's outcome once its status is known from the trailers.
#[derive(Debug)]
struct GrpcWatch {
    outcome: Option<Outcome>,
    arm: Arc<ArmMetrics>,
    outcomes: OutcomeSender,
    metrics: Arc<crate::metrics::Metrics>,
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

fn send_outcome(outcomes: &OutcomeSender, metrics: &crate::metrics::Metrics, o: Outcome) {
    match outcomes.try_send(o) {
        Ok(()) | Err(TrySendError::Closed(_)) => {}
        Err(TrySendError::Full(_)) => metrics.outcome_dropped(),
    }
}

/// What the access log needs of a request after its head was consumed.
struct Ctx {
    start: Instant,
    decision: Decision,
    /// Method and path for the access log, captured only when it is on.
    request_line: Option<(http::Method, String)>,
    /// The client side of an HTTP/1.1 Upgrade (WebSocket), if the request asked for one.
    upgrade: Option<OnUpgrade>,
    /// Keeps the connection from counting as idle until the response body ends.
    busy: Option<Busy>,
}

/// A bodyless upstream request, ready to be sent again to another arm.
struct Replay {
    method: http::Method,
    uri: http::Uri,
    version: Version,
    headers: HeaderMap,
}

impl Replay {
    /// `None` when `req` has a body (it is being streamed and cannot be sent twice).
    fn of(req: &Request<UpstreamBody>, to: &Arm) -> Option<Self> {
        if !req.body().is_end_stream() {
            return None;
        }
        Some(Replay {
            method: req.method().clone(),
            uri: to.upstream.uri_for(req.uri().path_and_query()).ok()?,
            version: if to.upstream.http2() {
                Version::HTTP_2
            } else {
                Version::HTTP_11
            },
            headers: req.headers().clone(),
        })
    }

    fn into_request(self) -> Request<UpstreamBody> {
        let mut req = Request::new(RequestBody::empty());
        *req.method_mut() = self.method;
        *req.uri_mut() = self.uri;
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers;
        req
    }
}

/// The per-connection proxy service.
#[derive(Clone, Debug)]
pub struct Proxy {
    control: Arc<Control>,
    outcomes: OutcomeSender,
    /// The connection's activity, for its idle timeout.
    activity: Option<Arc<Activity>>,
    /// The client's IP as an `x-forwarded-for` entry, formatted once per connection.
    peer_ip: HeaderValue,
    proto: &'static str,
}

impl Proxy {
    /// A service for one downstream connection from `peer` (`proto` is `http` or `https`).
    pub fn new(
        control: Arc<Control>,
        outcomes: OutcomeSender,
        peer: SocketAddr,
        proto: &'static str,
    ) -> Self {
        // An IP address always formats to a valid header value.
        let peer_ip = HeaderValue::from_str(&peer.ip().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        Proxy {
            control,
            outcomes,
            activity: None,
            peer_ip,
            proto,
        }
    }

    /// Reports requests in progress to the connection's idle timer.
    pub fn with_activity(mut self, activity: Arc<Activity>) -> Self {
        self.activity = Some(activity);
        self
    }

    /// Handles one request. Never fails: every failure becomes a response.
    pub async fn handle(&self, mut req: Request<UpstreamBody>) -> Response<ProxyBody> {
        let start = Instant::now();
        let snap = self.control.snapshot();
        let scan = RequestScan::of(req.headers(), snap.router.headers());
        if let Err((status, reason)) = check(&req, &scan) {
            return self.refuse(&req, status, reason);
        }
        let decision = snap
            .router
            .decide_with(&snap.table, scan.sticky, scan.override_value);
        let arm = &snap.arms[decision.arm];
        let upgrade_proto = scan
            .upgrade
            .filter(|_| scan.connection_upgrade && req.version() == Version::HTTP_11)
            .cloned();
        let found = Found {
            host: scan.host.cloned(),
            forwarded_for: scan.forwarded_for,
            hop: scan.hop,
            expect: scan.expect,
            content_length: scan.content_length,
        };
        let mut ctx = Ctx {
            start,
            decision,
            request_line: snap
                .access_log
                .then(|| (req.method().clone(), req.uri().path().to_owned())),
            upgrade: upgrade_proto
                .is_some()
                .then(|| hyper::upgrade::on(&mut req)),
            busy: self.activity.as_ref().map(|a| {
                if req.version() == Version::HTTP_2 {
                    a.http2();
                }
                a.begin()
            }),
        };
        let in_flight = arm.metrics.start();
        let (up, forwarded) = match self.upstream_request(req, found, arm) {
            Ok((mut up, forwarded)) => {
                if let Some(proto) = upgrade_proto {
                    let h = up.headers_mut();
                    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                    h.insert(header::UPGRADE, proto);
                }
                (up, forwarded)
            }
            // A request canaryd cannot express upstream is the client's fault, not the arm's.
            Err(e) => {
                let resp = local_response(
                    StatusCode::BAD_REQUEST,
                    arm,
                    &format!("cannot build the upstream request: {e}"),
                );
                return self.finish(&snap, arm, &ctx, resp, Some(false));
            }
        };
        let base = &snap.arms[snap.table.baseline()];
        // Without a body the request can be replayed, so a canary that cannot even accept the
        // connection costs the user nothing: the baseline answers instead.
        let replay = if decision.arm == snap.table.baseline() {
            None
        } else {
            Replay::of(&up, base)
        };
        let result = arm
            .upstream
            .send(up, &forwarded, snap.request_timeout)
            .await;
        let result = match (result, replay) {
            (Err(e @ UpstreamError::Connect(_)), Some(replay)) => {
                tracing::debug!(upstream = %arm.name, error = %e, "connect failed; failing over to the baseline");
                arm.metrics.failure(FailureKind::Connect);
                self.report(Outcome {
                    arm: arm.name.clone(),
                    watched: snap.watched(arm),
                    error: true,
                    latency: start.elapsed(),
                    at: Instant::now(),
                });
                drop(in_flight);
                let in_flight = base.metrics.start();
                let timeout = snap.request_timeout.saturating_sub(start.elapsed());
                let result = base
                    .upstream
                    .send(replay.into_request(), &forwarded, timeout)
                    .await;
                return self.respond(&snap, base, &mut ctx, result, in_flight);
            }
            (result, _) => result,
        };
        self.respond(&snap, arm, &mut ctx, result, in_flight)
    }

    /// Turns the upstream result into the client's response.
    fn respond(
        &self,
        snap: &Snapshot,
        arm: &Arm,
        ctx: &mut Ctx,
        result: Result<Response<UpstreamResponseBody>, UpstreamError>,
        in_flight: InFlight,
    ) -> Response<ProxyBody> {
        let mut resp = match result {
            Ok(r) => r,
            // The client's fault: answered and counted as such, never an outcome of the arm.
            Err(UpstreamError::Client(e)) => {
                tracing::debug!(upstream = %arm.name, kind = e.fault.as_str(), cause = %e.cause, "the client broke its request");
                if !e.counted {
                    self.metrics().client_error(e.fault);
                }
                let resp = client_response(e.fault.status(), &e.cause, true);
                return self.finish(snap, arm, ctx, resp, None);
            }
            Err(e) => {
                tracing::debug!(upstream = %arm.name, error = %e, "upstream failed");
                if let Some(kind) = e.kind() {
                    arm.metrics.failure(kind);
                }
                let resp = local_response(failure_status(&e), arm, &e.to_string());
                return self.finish(snap, arm, ctx, resp, Some(true));
            }
        };
        let status = resp.status();
        let mut error = snap
            .config
            .rollback
            .error_statuses
            .contains(status.as_u16());
        let mut in_flight = Some(in_flight);
        let upgraded = match (ctx.upgrade.take(), in_flight.take()) {
            (Some(client), Some(guard)) if status == StatusCode::SWITCHING_PROTOCOLS => {
                let upstream = match resp.body_mut() {
                    UpstreamResponseBody::H1(body) => body.take_upgrade(),
                    UpstreamResponseBody::H2(_) => None,
                };
                let Some(upstream) = upstream else {
                    let resp = local_response(
                        StatusCode::BAD_GATEWAY,
                        arm,
                        "101 Switching Protocols without a connection to switch",
                    );
                    return self.finish(snap, arm, ctx, resp, Some(true));
                };
                let proto = resp.headers().get(header::UPGRADE).cloned();
                relay_upgrade(client, upstream, guard, arm);
                proto
            }
            (_, guard) => {
                in_flight = guard;
                None
            }
        };
        let (mut parts, body) = resp.into_parts();
        // canaryd's HTTP/1.1 client has consumed the usual connection fields already.
        let consumed = matches!(&body, UpstreamResponseBody::H1(b) if !b.has_hop_by_hop());
        if !consumed {
            // Whatever was removed, the response goes on.
            let _ = remove_hop_by_hop(&mut parts.headers);
        }
        if let Some(proto) = upgraded {
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            parts.headers.insert(header::UPGRADE, proto);
            let resp = Response::from_parts(parts, ProxyBody::local(String::new()));
            return self.finish(snap, arm, ctx, resp, Some(error));
        }
        let mut grpc = None;
        if is_grpc(&parts.headers) {
            match grpc_status(&parts.headers) {
                // Trailers-only response: the status is already here.
                Some(code) => {
                    arm.metrics.grpc_status(code);
                    error |= grpc_error(code);
                }
                None => {
                    grpc = Some(GrpcWatch {
                        outcome: Some(Outcome {
                            arm: arm.name.clone(),
                            watched: snap.watched(arm),
                            error,
                            latency: ctx.start.elapsed(),
                            at: Instant::now(),
                        }),
                        arm: arm.metrics.clone(),
                        outcomes: self.outcomes.clone(),
                        metrics: self.control.metrics().clone(),
                    })
                }
            }
        }
        let deferred = grpc.is_some();
        let body = ProxyBody {
            inner: Either::Left(body),
            grpc,
            _in_flight: in_flight,
            _busy: ctx.busy.take(),
        };
        let resp = Response::from_parts(parts, body);
        self.finish(snap, arm, ctx, resp, (!deferred).then_some(error))
    }

    /// Records the request for `arm` (metrics, window outcome unless `error` is `None` because
    /// the body reports it later, access log) and names the arm.
    fn finish(
        &self,
        snap: &Snapshot,
        arm: &Arm,
        ctx: &Ctx,
        mut resp: Response<ProxyBody>,
        error: Option<bool>,
    ) -> Response<ProxyBody> {
        let elapsed = ctx.start.elapsed();
        arm.metrics.record(resp.status().as_u16(), elapsed);
        if let Some(error) = error {
            self.report(Outcome {
                arm: arm.name.clone(),
                watched: snap.watched(arm),
                error,
                latency: elapsed,
                at: ctx.start + elapsed,
            });
        }
        if let Some(h) = &snap.response_header {
            resp.headers_mut()
                .insert(h.clone(), arm.header_value.clone());
        }
        if let Some(a) = &self.activity {
            // Stopping: the client must not send another request on this connection (hyper
            // closes it after this response). HTTP/2 gets a GOAWAY instead.
            if a.draining() && !a.is_http2() && resp.status() != StatusCode::SWITCHING_PROTOCOLS {
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
        }
        if snap.access_log {
            log_access(&arm.name, ctx, resp.status(), elapsed);
        }
        resp
    }

    /// The metrics registry.
    pub(crate) fn metrics(&self) -> Arc<Metrics> {
        self.control.metrics().clone()
    }

    /// Answers a request refused before routing: counted as the client's, never an arm's.
    fn refuse(
        &self,
        req: &Request<UpstreamBody>,
        status: StatusCode,
        reason: &str,
    ) -> Response<ProxyBody> {
        tracing::debug!(status = status.as_u16(), reason, "request refused");
        self.control.metrics().client_error(ClientFault::BadRequest);
        client_response(status, reason, req.version() != Version::HTTP_2)
    }

    /// Hands an outcome to the window task without ever waiting for it.
    fn report(&self, outcome: Outcome) {
        send_outcome(&self.outcomes, self.control.metrics(), outcome);
    }

    /// Rewrites the downstream request for the arm: URI, version, hop-by-hop headers, and
    /// the forwarding headers to add. The body is passed through untouched (streamed).
    fn upstream_request(
        &self,
        req: Request<UpstreamBody>,
        found: Found,
        arm: &Arm,
    ) -> Result<(Request<UpstreamBody>, Forwarded), http::Error> {
        let (mut parts, body) = req.into_parts();
        let removed = found.hop.remove(&mut parts.headers);
        if found.expect {
            // canaryd's server side (or hyper's) answers the expectation: the upstream only
            // ever gets the body, never a body it did not ask for.
            parts.headers.remove(header::EXPECT);
        }
        if found.content_length && arm.upstream.http2() {
            // The HTTP/2 client states the length itself, once, from the body.
            parts.headers.remove(header::CONTENT_LENGTH);
        }
        // The authority of an absolute-form target (HTTP/2: `:authority`) is the host,
        // whatever a `Host` field says.
        let authority = parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok());
        // `Connection: host` would have removed it.
        let has_host = authority.is_none()
            && found.host.is_some()
            && (!removed || parts.headers.contains_key(header::HOST));
        let host = authority.or(found.host);
        let forwarded = Forwarded {
            for_: if found.forwarded_for {
                forwarded_for(&parts.headers, &self.peer_ip)
            } else {
                self.peer_ip.clone()
            },
            proto: HeaderValue::from_static(self.proto),
            host: host.clone(),
        };
        match host {
            Some(host) => {
                if !has_host {
                    parts.headers.insert(header::HOST, host);
                }
            }
            // HTTP/1.0 without Host: the upstream's own name (HTTP/1.1 requires one).
            None => {
                if let Ok(v) = HeaderValue::from_str(arm.upstream.authority().as_str()) {
                    parts.headers.insert(header::HOST, v);
                }
            }
        }
        parts.uri = arm.upstream.uri_for(parts.uri.path_and_query())?;
        parts.version = if arm.upstream.http2() {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };
        Ok((Request::from_parts(parts, body), forwarded))
    }
}

/// What one pass over a request's headers finds: what routing, the upgrade check, the
/// forwarding headers and hop-by-hop removal need, instead of a hashed lookup for each.
struct RequestScan<'a> {
    /// The first value of the router's sticky header.
    sticky: Option<&'a HeaderValue>,
    /// The first value of the router's override header, if one is configured.
    override_value: Option<&'a HeaderValue>,
    host: Option<&'a HeaderValue>,
    /// How many `Host` fields.
    hosts: usize,
    /// An `Expect` field.
    expect: bool,
    /// A `Content-Length` field.
    content_length: bool,
    upgrade: Option<&'a HeaderValue>,
    /// A `Connection` header lists `upgrade`.
    connection_upgrade: bool,
    /// The client sent `X-Forwarded-For`.
    forwarded_for: bool,
    hop: HopByHop,
}

impl<'a> RequestScan<'a> {
    fn of(
        headers: &'a HeaderMap,
        (sticky, override_name): (&HeaderName, Option<&HeaderName>),
    ) -> Self {
        let mut scan = RequestScan {
            sticky: None,
            override_value: None,
            host: None,
            hosts: 0,
            expect: false,
            content_length: false,
            upgrade: None,
            connection_upgrade: false,
            forwarded_for: false,
            hop: HopByHop::default(),
        };
        for (name, value) in headers {
            if name == sticky {
                scan.sticky.get_or_insert(value);
            } else if Some(name) == override_name {
                scan.override_value.get_or_insert(value);
            }
            match name.as_str() {
                "host" => {
                    scan.host.get_or_insert(value);
                    scan.hosts += 1;
                }
                "expect" => scan.expect = true,
                "content-length" => scan.content_length = true,
                "x-forwarded-for" => scan.forwarded_for = true,
                "connection" => {
                    scan.connection_upgrade |= connection_has(value.as_bytes(), b"upgrade");
                    scan.hop.see(name, value);
                }
                "upgrade" => {
                    scan.upgrade.get_or_insert(value);
                    scan.hop.see(name, value);
                }
                _ => scan.hop.see(name, value),
            }
        }
        scan
    }
}

/// What [`RequestScan`] found that outlives the borrow of the headers.
struct Found {
    host: Option<HeaderValue>,
    forwarded_for: bool,
    hop: HopByHop,
    expect: bool,
    content_length: bool,
}

/// Relays bytes both ways between the upgraded client and upstream connections until either
/// side closes. The request stays in flight for as long as the tunnel is open.
fn relay_upgrade(client: OnUpgrade, upstream: Upgraded, in_flight: InFlight, arm: &Arm) {
    let name = arm.name.clone();
    tokio::spawn(async move {
        let _in_flight = in_flight;
        let Upgraded { io: mut u, read } = upstream;
        let relayed = async {
            let mut c = TokioIo::new(client.await.map_err(std::io::Error::other)?);
            // What the upstream sent right behind its 101 head goes first.
            c.write_all(&read).await?;
            tokio::io::copy_bidirectional(&mut c, &mut u).await
        };
        if let Err(e) = relayed.await {
            tracing::debug!(upstream = %name, error = %e, "upgraded connection ended");
        }
    });
}

/// Status for a failure, decided by where it came from.
fn failure_status(e: &UpstreamError) -> StatusCode {
    match e {
        UpstreamError::Connect(_) | UpstreamError::Protocol(_) => StatusCode::BAD_GATEWAY,
        UpstreamError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        UpstreamError::Client(c) => c.fault.status(),
    }
}

/// The rules of a trusted edge for what may reach an upstream, whichever side parsed the
/// request: `CONNECT` is refused (405: canaryd is no forward proxy), the asterisk-form target
/// is for `OPTIONS` only, an absolute-form target is `http` or `https` with no user info, an
/// HTTP/1.1 request has exactly one valid `Host` (HTTP/1.0: at most one), an HTTP/2 `host`
/// field agrees with `:authority`, and the only transfer coding is chunked (501 otherwise).
fn check(
    req: &Request<UpstreamBody>,
    scan: &RequestScan<'_>,
) -> Result<(), (StatusCode, &'static str)> {
    const fn bad(reason: &'static str) -> Result<(), (StatusCode, &'static str)> {
        Err((StatusCode::BAD_REQUEST, reason))
    }
    if req.method() == Method::CONNECT {
        return Err((
            StatusCode::METHOD_NOT_ALLOWED,
            "CONNECT is not served (canaryd is a reverse proxy)",
        ));
    }
    let uri = req.uri();
    if uri.path() == "*" && req.method() != Method::OPTIONS {
        return bad("the asterisk-form target is only for OPTIONS");
    }
    if scan.hosts > 1 {
        return bad("more than one Host field");
    }
    if scan.hosts == 0 && req.version() == Version::HTTP_11 {
        return bad("an HTTP/1.1 request without Host");
    }
    if scan.host.is_some_and(|h| !fields::valid_host(h.as_bytes())) {
        return bad("invalid Host");
    }
    match uri.scheme_str() {
        None | Some("http" | "https") => {}
        Some(_) => return bad("a request target whose scheme is not http or https"),
    }
    if let Some(authority) = uri.authority() {
        if uri.scheme().is_none() {
            // `host:port` alone is CONNECT's form, refused above.
            return bad("the authority-form target is only for CONNECT");
        }
        if authority.as_str().contains('@') {
            return bad("user info in the request target");
        }
        if req.version() == Version::HTTP_2
            && scan.host.is_some_and(|h| {
                !h.as_bytes()
                    .eq_ignore_ascii_case(authority.as_str().as_bytes())
            })
        {
            return bad("Host differs from :authority");
        }
    }
    if scan.hop.transfer_encoding() {
        let mut framing = fields::Framing::default();
        for v in req.headers().get_all(header::TRANSFER_ENCODING) {
            framing.coding(v.as_bytes());
        }
        if framing.chunked().is_err() {
            return Err((
                StatusCode::NOT_IMPLEMENTED,
                "transfer codings other than chunked are not implemented",
            ));
        }
    }
    Ok(())
}

/// A response to a request the client got wrong; `close`: HTTP/1 closes the connection after
/// it (what follows such a request cannot be trusted).
fn client_response(status: StatusCode, cause: &str, close: bool) -> Response<ProxyBody> {
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

fn local_response(status: StatusCode, arm: &Arm, cause: &str) -> Response<ProxyBody> {
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

/// The `X-Forwarded-For` value to send: the client's list, if any, with the peer appended.
fn forwarded_for(headers: &HeaderMap, peer_ip: &HeaderValue) -> HeaderValue {
    let mut sent = headers.get_all(&X_FORWARDED_FOR).iter().peekable();
    if sent.peek().is_none() {
        return peer_ip.clone();
    }
    let mut joined = Vec::new();
    for v in sent {
        joined.extend_from_slice(v.as_bytes());
        joined.extend_from_slice(b", ");
    }
    joined.extend_from_slice(peer_ip.as_bytes());
    HeaderValue::from_bytes(&joined).unwrap_or_else(|_| peer_ip.clone())
}

fn log_access(arm: &str, ctx: &Ctx, status: StatusCode, elapsed: std::time::Duration) {
    let d = &ctx.decision;
    let (method, path) = ctx
        .request_line
        .as_ref()
        .map_or(("", ""), |(m, p)| (m.as_str(), p.as_str()));
    tracing::info!(
        target: "canaryd::access",
        upstream = %arm,
        source = %d.source,
        bucket = d.bucket.map(i64::from).unwrap_or(-1),
        method = %method,
        path = %path,
        status = status.as_u16(),
        duration_ms = elapsed.as_secs_f64() * 1000.0,
        "request"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_for_is_appended() {
        let mut h = HeaderMap::new();
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.1"));
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.2"));
        let peer = HeaderValue::from_static("192.0.2.7");
        assert_eq!(forwarded_for(&h, &peer), "10.0.0.1, 10.0.0.2, 192.0.2.7");
        assert_eq!(forwarded_for(&HeaderMap::new(), &peer), "192.0.2.7");
    }
}
