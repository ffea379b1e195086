//! The proxy service: route, forward with streaming bodies, and map failures to 502/504.

use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body::Body;
use http_body_util::Either;
use hyper::upgrade::OnUpgrade;
use tokio::time::Instant;

pub mod activity;
mod request;
mod response;
mod upgrade;

use self::activity::{Activity, Busy};
use self::request::{check, forwarded_for, Found, RequestScan};
use self::response::{
    client_response, failure_status, grpc_status, is_grpc, local_response, send_outcome, GrpcWatch,
};
pub use self::response::{grpc_error, ProxyBody};
use self::upgrade::relay_upgrade;
use crate::body::{ClientFault, RequestBody, Tap, Tee};
use crate::control::{Arm, Control, Snapshot};
use crate::http1::fields::remove_hop_by_hop;
use crate::metrics::{InFlight, Metrics};
use crate::observe::{is_json, PrimarySink, ShadowRequest};
use crate::release::outcome::{Outcome, OutcomeSender, Routed};
use crate::routing::{Decision, Source};
use crate::upstream::error::{FailureKind, UpstreamError};
use crate::upstream::forwarded::Forwarded;
use crate::upstream::{UpstreamBody, UpstreamResponseBody};

/// What the access log needs of a request after its head was consumed.
struct Ctx {
    start: Instant,
    decision: Decision,
    /// How the arm answering was chosen (a failover makes it `Forced`).
    routed: Routed,
    /// Method and path for the access log, captured only when it is on.
    request_line: Option<(http::Method, String)>,
    /// The client side of an HTTP/1.1 Upgrade (WebSocket), if the request asked for one.
    upgrade: Option<OnUpgrade>,
    /// Keeps the connection from counting as idle until the response body ends.
    busy: Option<Busy>,
    /// Where the primary's response goes when the request is shadowed.
    shadow: Option<PrimarySink>,
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
            routed: Routed::of(&decision, snap.generation),
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
            shadow: None,
        };
        // Shadowing costs nothing here unless `[shadow]` is configured.
        let shadow = snap.shadow.as_ref().and_then(|sh| {
            let fallback = fastrand::u16(..crate::routing::BASIS_POINTS);
            sh.permit(req.method(), decision.bucket, fallback)
                .map(|permit| (sh, permit))
        });
        let in_flight = arm.metrics.start();
        let (mut up, forwarded) = match self.upstream_request(req, found, arm) {
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
        if let Some((sh, permit)) = shadow {
            let copy = ShadowRequest {
                method: up.method().clone(),
                path: up
                    .uri()
                    .path_and_query()
                    .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned()),
                headers: up.headers().clone(),
                forwarded: forwarded.clone(),
                primary: (arm.upstream.clone(), arm.name.clone()),
            };
            let empty = up.body().is_end_stream();
            let (tap, sink) = sh.start(permit, copy, empty);
            if let Some(tap) = tap {
                up = up.map(|inner| RequestBody::Tee(Box::new(Tee { inner, tap })));
            }
            ctx.shadow = Some(sink);
        }
        let base = &snap.arms[snap.table.baseline()];
        // Without a body the request can be replayed, so a canary that cannot even accept the
        // connection costs the user nothing: the baseline answers instead. Not when the client
        // forced the arm: whoever asks for the canary by name wants the canary's answer, and a
        // baseline 200 would hide that it is down.
        let forced = matches!(decision.source, Source::Override | Source::Pinned);
        let replay = if decision.arm == snap.table.baseline() || forced {
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
                    routed: ctx.routed,
                });
                ctx.routed = Routed::Forced;
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
                            routed: ctx.routed,
                        }),
                        arm: arm.metrics.clone(),
                        outcomes: self.outcomes.clone(),
                        metrics: self.control.metrics().clone(),
                    })
                }
            }
        }
        let deferred = grpc.is_some();
        // Nothing to copy (no [shadow], no [analysis]): the body goes as it is.
        let mut tap = if ctx.shadow.is_none() && snap.responses.is_none() {
            None
        } else {
            self.response_tap(snap, arm, ctx, parts.status, &parts.headers)
        };
        if body.is_end_stream() {
            // No body to stream: the copy is complete (and empty) now.
            if let Some(t) = tap.as_mut() {
                t.end();
            }
            tap = None;
        }
        let body = ProxyBody {
            inner: Either::Left(body),
            grpc,
            tap,
            _in_flight: in_flight,
            _busy: ctx.busy.take(),
        };
        let resp = Response::from_parts(parts, body);
        self.finish(snap, arm, ctx, resp, (!deferred).then_some(error))
    }

    /// The copy of the response body the shadow comparison and the response analysis read,
    /// when either wants it.
    fn response_tap(
        &self,
        snap: &Snapshot,
        arm: &Arm,
        ctx: &mut Ctx,
        status: StatusCode,
        headers: &HeaderMap,
    ) -> Option<Box<Tap>> {
        let mut tap = Tap::default();
        if let Some(sink) = ctx.shadow.take() {
            sink.attach(&mut tap, status);
        }
        if let (Some(responses), Some(cfg)) = (&snap.responses, &snap.config.response_analysis) {
            if status.is_success() && is_json(headers) {
                let responses = responses.clone();
                let name = arm.name.clone();
                let base = &snap.arms[snap.table.baseline()];
                let rollback = &snap.config.rollback;
                // Drift trips only the arms the circuit watches, and only with max_drift set.
                let judge = cfg
                    .max_drift
                    .filter(|_| rollback.enabled && snap.watched(arm) && !arm.tripped)
                    .map(|max| (base.name.clone(), max));
                let alpha = 1.0 - rollback.confidence;
                let control = judge.is_some().then(|| self.control.clone());
                tap.add(cfg.max_body_bytes, move |body| {
                    let Some(body) = body else { return };
                    let judge = judge.as_ref().map(|(b, m)| (&**b, *m));
                    if let Some(trip) = responses.record(&name, &body, judge, alpha) {
                        if let Some(control) = &control {
                            control.trip(&name, "drift", trip.detail);
                        }
                    }
                });
            }
        }
        (!tap.is_empty()).then(|| Box::new(tap))
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
                routed: ctx.routed,
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
            // HTTP/2 upstreams get no `host` field at all (see `Upstream::send`).
            _ if arm.upstream.http2() => {}
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
