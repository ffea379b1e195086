//! Shared support for canaryd's end-to-end tests.
//!
//! * [`FakeUpstream`]: a real hyper server (HTTP/1.1 and h2c) on an ephemeral port with
//!   scriptable behaviour and request introspection.
//! * [`Proxy`]: canaryd running in-process (`canaryd::app::run`) on ephemeral listeners, with
//!   its config in a temp dir and helpers to rewrite that file the ways editors, `cp` and
//!   Kubernetes do.
//! * [`CanarydProcess`]: the real `canaryd` binary, killed on drop.
//! * [`HttpClient`]: hyper-util legacy client (HTTP/1.1 keep-alive or h2c prior knowledge).
//! * [`poll_until`] / [`hold_for`]: deadline-based synchronisation, never fixed sleeps.
//! * [`reference_arm`] / [`reference_bucket`]: the routing rule computed independently of
//!   canaryd's code.
//!
//! Each test binary uses only part of this module.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use http::{HeaderMap, Request, Response, StatusCode, Version};
use http_body::{Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use md5::{Digest, Md5};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::{AbortHandle, JoinHandle};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type used by every client and fake server here.
pub type Body = BoxBody<Bytes, BoxError>;

/// Default response header naming the arm (`[routing] response_header`).
pub const ARM_HEADER: &str = "x-canaryd-upstream";
/// Header every [`FakeUpstream`] response carries, so proxy-made responses can be told apart.
pub const FAKE_HEADER: &str = "x-fake-upstream";
/// Default per-request timeout of [`HttpClient`].
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// Bodies
// ---------------------------------------------------------------------------------------------

pub fn full(data: impl Into<Bytes>) -> Body {
    Full::new(data.into())
        .map_err(|never| match never {})
        .boxed()
}

/// A body fed frame by frame (data and trailers) from a channel; it ends when the sender is
/// dropped.
pub struct FrameBody(pub mpsc::Receiver<Frame<Bytes>>);

impl http_body::Body for FrameBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, std::convert::Infallible>>> {
        self.0.poll_recv(cx).map(|f| f.map(Ok))
    }
}

pub fn empty() -> Body {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed()
}

/// A body fed chunk by chunk from an mpsc channel (used for SSE).
pub struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.rx.poll_recv(cx).map(|c| c.map(|b| Ok(Frame::data(b))))
    }
}

/// A generated upload body of `total` bytes, produced in `chunk_size` pieces without ever
/// holding more than one chunk. With `exact_length` the client sends `Content-Length`,
/// otherwise `Transfer-Encoding: chunked`.
pub struct PatternBody {
    remaining: u64,
    chunk: Bytes,
    exact_length: bool,
}

impl PatternBody {
    pub fn new(total: u64, chunk_size: usize, exact_length: bool) -> Self {
        let chunk: Vec<u8> = (0..chunk_size).map(|i| (i % 251) as u8).collect();
        PatternBody {
            remaining: total,
            chunk: Bytes::from(chunk),
            exact_length,
        }
    }

    pub fn boxed_body(self) -> Body {
        BodyExt::boxed(self)
    }
}

impl http_body::Body for PatternBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = self.remaining.min(self.chunk.len() as u64) as usize;
        self.remaining -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        if self.exact_length {
            SizeHint::with_exact(self.remaining)
        } else {
            SizeHint::default()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Fake upstream
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Mode {
    /// Body = the upstream's name.
    Name,
    /// `text/event-stream`, `chunks` events; between events either `interval` or, when gated,
    /// one permit released by the test through [`FakeUpstream::release_chunks`].
    Sse {
        chunks: usize,
        interval: Duration,
        gated: bool,
    },
    /// Stream the request body, discard it, answer with the byte count.
    CountBody,
    /// Answer `{"method", "uri", "version", "headers": {name: [values]}}`.
    EchoHeaders,
}

#[derive(Clone, Debug)]
struct UpstreamConfig {
    name: String,
    status: StatusCode,
    delay: Duration,
    mode: Mode,
    http1_only: bool,
    /// `(every, phase, status)`: request number `k` (1-based) answers `status` when
    /// `(k - 1) % every == phase`.
    fail_every: Option<(usize, usize, StatusCode)>,
    /// `(share, seed, status)`: request number `k` answers `status` when
    /// `seeded_unit(seed, k) < share` (a fixed pseudo-random schedule).
    fail_seeded: Option<(f64, u64, StatusCode)>,
    /// `(path prefix, status, delay)`: the first matching rule sets status and delay.
    path_rules: Vec<(String, StatusCode, Duration)>,
}

struct UpstreamState {
    requests: AtomicUsize,
    last_headers: Mutex<Option<HeaderMap>>,
    last_version: Mutex<Option<Version>>,
    body_bytes: AtomicU64,
    sse_sent: AtomicUsize,
    sse_gate: Semaphore,
    panics: Mutex<Vec<String>>,
    tasks: Mutex<Vec<AbortHandle>>,
    /// Status set at run time by [`FakeUpstream::set_status`]; 0 = the configured status.
    status_override: AtomicU16,
    /// The first [`PATH_LOG`] requests' paths, in arrival order.
    paths: Mutex<Vec<String>>,
}

/// How many request paths a [`FakeUpstream`] remembers.
pub const PATH_LOG: usize = 4096;

impl UpstreamState {
    fn new() -> Self {
        UpstreamState {
            requests: AtomicUsize::new(0),
            last_headers: Mutex::new(None),
            last_version: Mutex::new(None),
            body_bytes: AtomicU64::new(0),
            sse_sent: AtomicUsize::new(0),
            sse_gate: Semaphore::new(0),
            panics: Mutex::new(Vec::new()),
            tasks: Mutex::new(Vec::new()),
            status_override: AtomicU16::new(0),
            paths: Mutex::new(Vec::new()),
        }
    }
}

pub struct FakeUpstreamBuilder {
    cfg: UpstreamConfig,
}

impl FakeUpstreamBuilder {
    /// Fixed response status (default 200).
    pub fn status(mut self, status: u16) -> Self {
        self.cfg.status = StatusCode::from_u16(status).expect("valid status");
        self
    }

    /// Wait this long after receiving the request head before answering.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.cfg.delay = delay;
        self
    }

    /// Server-sent events: `chunks` events with `interval` between them.
    pub fn sse(mut self, chunks: usize, interval: Duration) -> Self {
        self.cfg.mode = Mode::Sse {
            chunks,
            interval,
            gated: false,
        };
        self
    }

    /// Server-sent events: the first event is sent at once, each further event only after the
    /// test calls [`FakeUpstream::release_chunks`].
    pub fn sse_gated(mut self, chunks: usize) -> Self {
        self.cfg.mode = Mode::Sse {
            chunks,
            interval: Duration::ZERO,
            gated: true,
        };
        self
    }

    /// Stream and discard the request body; the response body is the byte count.
    pub fn count_body(mut self) -> Self {
        self.cfg.mode = Mode::CountBody;
        self
    }

    /// The response body is the request (method, uri, version, headers) as JSON.
    pub fn echo_headers(mut self) -> Self {
        self.cfg.mode = Mode::EchoHeaders;
        self
    }

    /// Serve HTTP/1.1 only (default: HTTP/1.1 and h2c prior knowledge).
    pub fn http1_only(mut self) -> Self {
        self.cfg.http1_only = true;
        self
    }

    /// Deterministic partial failure: request number `k` (1-based, counted over every request
    /// this upstream receives) answers `status` when `(k - 1) % every == phase`. With
    /// `phase = 0` the 1st, `every+1`-th, ... fail (the running error rate is never under
    /// `1/every`); with `phase = every - 1` the `every`-th, `2*every`-th, ... fail (never
    /// over `1/every`).
    pub fn fail_every(mut self, every: usize, phase: usize, status: u16) -> Self {
        assert!(every > 0 && phase < every, "fail_every({every}, {phase})");
        self.cfg.fail_every = Some((
            every,
            phase,
            StatusCode::from_u16(status).expect("valid status"),
        ));
        self
    }

    /// Request number `k` (1-based) answers `status` when [`seeded_unit`]`(seed, k) < share`:
    /// a pseudo-random share of failures on a schedule fixed by the seed.
    pub fn fail_seeded(mut self, share: f64, seed: u64, status: u16) -> Self {
        self.cfg.fail_seeded = Some((
            share,
            seed,
            StatusCode::from_u16(status).expect("valid status"),
        ));
        self
    }

    /// Requests whose path starts with `prefix` answer `status` after `delay` (the first
    /// matching rule wins; it replaces the fixed status and delay).
    pub fn on_path(mut self, prefix: &str, status: u16, delay: Duration) -> Self {
        self.cfg.path_rules.push((
            prefix.to_string(),
            StatusCode::from_u16(status).expect("valid status"),
            delay,
        ));
        self
    }

    pub async fn start(self) -> FakeUpstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake upstream");
        let addr = listener.local_addr().expect("local addr");
        let cfg = Arc::new(self.cfg);
        let state = Arc::new(UpstreamState::new());
        let accept = tokio::spawn(accept_loop(listener, cfg.clone(), state.clone()));
        FakeUpstream {
            name: cfg.name.clone(),
            addr,
            state,
            accept,
        }
    }
}

/// A real HTTP server standing in for an upstream. Dropping it stops it; a panic in any of
/// its tasks fails the test at drop (or at [`FakeUpstream::assert_healthy`]).
pub struct FakeUpstream {
    name: String,
    addr: SocketAddr,
    state: Arc<UpstreamState>,
    accept: JoinHandle<()>,
}

impl FakeUpstream {
    pub fn builder(name: &str) -> FakeUpstreamBuilder {
        FakeUpstreamBuilder {
            cfg: UpstreamConfig {
                name: name.to_string(),
                status: StatusCode::OK,
                delay: Duration::ZERO,
                mode: Mode::Name,
                http1_only: false,
                fail_every: None,
                fail_seeded: None,
                path_rules: Vec::new(),
            },
        }
    }

    /// 200 with body = `name`.
    pub async fn start(name: &str) -> FakeUpstream {
        Self::builder(name).start().await
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests whose head has been received.
    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// The paths of the first [`PATH_LOG`] requests, in arrival order.
    pub fn paths(&self) -> Vec<String> {
        self.state.paths.lock().unwrap().clone()
    }

    pub fn last_headers(&self) -> Option<HeaderMap> {
        self.state.last_headers.lock().unwrap().clone()
    }

    pub fn last_version(&self) -> Option<Version> {
        *self.state.last_version.lock().unwrap()
    }

    /// Body bytes counted by the last completed `count_body` request.
    pub fn body_bytes(&self) -> u64 {
        self.state.body_bytes.load(Ordering::SeqCst)
    }

    /// SSE events handed to the connection so far (over all requests).
    pub fn sse_sent(&self) -> usize {
        self.state.sse_sent.load(Ordering::SeqCst)
    }

    /// From now on answer `status` instead of the configured one (path and `fail_every`
    /// rules still apply on top). `set_status(0)` restores the configured status.
    pub fn set_status(&self, status: u16) {
        if status != 0 {
            StatusCode::from_u16(status).expect("valid status");
        }
        self.state.status_override.store(status, Ordering::SeqCst);
    }

    /// Let a gated SSE stream send `n` more events.
    pub fn release_chunks(&self, n: usize) {
        self.state.sse_gate.add_permits(n);
    }

    /// The text of SSE event `i` as sent by this upstream.
    pub fn sse_event(&self, i: usize) -> String {
        sse_event(&self.name, i)
    }

    /// Panics if any server task panicked so far.
    pub fn assert_healthy(&self) {
        let panics = self.state.panics.lock().unwrap();
        assert!(
            panics.is_empty(),
            "fake upstream {} panicked: {:?}",
            self.name,
            *panics
        );
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.accept.abort();
        for task in self.state.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
        if !std::thread::panicking() {
            self.assert_healthy();
        }
    }
}

fn sse_event(name: &str, i: usize) -> String {
    format!("data: {name} event {i}\n\n")
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

/// Spawn `fut` as a task owned by the upstream: aborted on drop, panics recorded.
fn spawn_tracked<F>(state: &Arc<UpstreamState>, fut: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    let handle = tokio::spawn(fut);
    state.tasks.lock().unwrap().push(handle.abort_handle());
    let state = state.clone();
    tokio::spawn(async move {
        if let Err(err) = handle.await {
            if err.is_panic() {
                let msg = panic_message(err.into_panic());
                state.panics.lock().unwrap().push(msg);
            }
        }
    });
}

/// Runs hyper's background futures (HTTP/2 streams) as tracked tasks, so a panicking
/// handler on an h2c connection is recorded like one on HTTP/1.1.
#[derive(Clone)]
struct TrackedExecutor(Arc<UpstreamState>);

impl<F> hyper::rt::Executor<F> for TrackedExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        spawn_tracked(&self.0, async move {
            fut.await;
        });
    }
}

async fn accept_loop(listener: TcpListener, cfg: Arc<UpstreamConfig>, state: Arc<UpstreamState>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let cfg = cfg.clone();
        let conn_state = state.clone();
        spawn_tracked(&state, async move {
            let mut builder =
                hyper_util::server::conn::auto::Builder::new(TrackedExecutor(conn_state.clone()));
            let svc_cfg = cfg.clone();
            let svc = service_fn(move |req| handle(svc_cfg.clone(), conn_state.clone(), req));
            if cfg.http1_only {
                builder = builder.http1_only();
            }
            // Connection errors (client went away, ...) are not test failures.
            let _ = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn text_response(status: StatusCode, name: &str, ctype: &str, body: Body) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, ctype)
        .header(FAKE_HEADER, name)
        .body(body)
        .expect("response")
}

async fn handle(
    cfg: Arc<UpstreamConfig>,
    state: Arc<UpstreamState>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    *state.last_headers.lock().unwrap() = Some(req.headers().clone());
    {
        let mut paths = state.paths.lock().unwrap();
        if paths.len() < PATH_LOG {
            paths.push(req.uri().path().to_owned());
        }
    }
    *state.last_version.lock().unwrap() = Some(req.version());
    let number = state.requests.fetch_add(1, Ordering::SeqCst) + 1;

    let mut status = match state.status_override.load(Ordering::SeqCst) {
        0 => cfg.status,
        s => StatusCode::from_u16(s).expect("valid status"),
    };
    if let Some((every, phase, fail)) = cfg.fail_every {
        if (number - 1) % every == phase {
            status = fail;
        }
    }
    if let Some((share, seed, fail)) = cfg.fail_seeded {
        if seeded_unit(seed, number as u64) < share {
            status = fail;
        }
    }
    let mut delay = cfg.delay;
    if let Some((_, s, d)) = cfg
        .path_rules
        .iter()
        .find(|(prefix, _, _)| req.uri().path().starts_with(prefix.as_str()))
    {
        status = *s;
        delay = *d;
    }

    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }

    let resp = match &cfg.mode {
        Mode::Name => text_response(status, &cfg.name, "text/plain", full(cfg.name.clone())),
        Mode::EchoHeaders => {
            let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for (name, value) in req.headers() {
                headers
                    .entry(name.as_str().to_string())
                    .or_default()
                    .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
            }
            let json = serde_json::json!({
                "upstream": cfg.name,
                "method": req.method().as_str(),
                "uri": req.uri().to_string(),
                "version": format!("{:?}", req.version()),
                "headers": headers,
            });
            text_response(
                status,
                &cfg.name,
                "application/json",
                full(json.to_string()),
            )
        }
        Mode::CountBody => {
            let mut body = req.into_body();
            let mut count: u64 = 0;
            let mut error = None;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(frame) => {
                        if let Some(data) = frame.data_ref() {
                            count += data.len() as u64;
                        }
                    }
                    Err(err) => {
                        error = Some(err.to_string());
                        break;
                    }
                }
            }
            state.body_bytes.store(count, Ordering::SeqCst);
            match error {
                None => text_response(status, &cfg.name, "text/plain", full(count.to_string())),
                Some(err) => text_response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &cfg.name,
                    "text/plain",
                    full(format!("body error after {count} bytes: {err}")),
                ),
            }
        }
        Mode::Sse {
            chunks,
            interval,
            gated,
        } => {
            let (tx, rx) = mpsc::channel::<Bytes>(1);
            let (chunks, interval, gated) = (*chunks, *interval, *gated);
            let name = cfg.name.clone();
            let producer_state = state.clone();
            spawn_tracked(&state, async move {
                for i in 0..chunks {
                    if i > 0 {
                        if gated {
                            match producer_state.sse_gate.acquire().await {
                                Ok(permit) => permit.forget(),
                                Err(_) => return,
                            }
                        } else {
                            tokio::time::sleep(interval).await;
                        }
                    }
                    if tx.send(Bytes::from(sse_event(&name, i))).await.is_err() {
                        return;
                    }
                    producer_state.sse_sent.fetch_add(1, Ordering::SeqCst);
                }
            });
            let mut resp = text_response(
                status,
                &cfg.name,
                "text/event-stream",
                BodyExt::boxed(ChannelBody { rx }),
            );
            resp.headers_mut()
                .insert("cache-control", HeaderValue::from_static("no-cache"));
            resp
        }
    };
    Ok(resp)
}

// ---------------------------------------------------------------------------------------------
// HTTP client
// ---------------------------------------------------------------------------------------------

/// A complete, collected response.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: String,
}

impl Reply {
    /// The arm named by `x-canaryd-upstream`, if any.
    pub fn arm(&self) -> Option<&str> {
        self.header(ARM_HEADER)
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body parsed as JSON (panics with the body otherwise).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body))
    }
}

/// hyper-util legacy client; cheap to clone (shares the pool). Create one per test: pooled
/// connections belong to the runtime that made them.
#[derive(Clone)]
pub struct HttpClient {
    inner: Client<HttpConnector, Body>,
    timeout: Duration,
}

impl HttpClient {
    /// HTTP/1.1 with keep-alive.
    pub fn http1() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        HttpClient {
            inner: Client::builder(TokioExecutor::new()).build(connector),
            timeout: CLIENT_TIMEOUT,
        }
    }

    /// HTTP/2 over cleartext with prior knowledge.
    pub fn h2c() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        HttpClient {
            inner: Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build(connector),
            timeout: CLIENT_TIMEOUT,
        }
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Send and return the response head; the body is left to the caller.
    pub async fn try_send(&self, req: Request<Body>) -> Result<Response<Incoming>, String> {
        let what = format!("{} {}", req.method(), req.uri());
        match tokio::time::timeout(self.timeout, self.inner.request(req)).await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(err)) => Err(format!("{what}: {err:?}")),
            Err(_) => Err(format!(
                "{what}: no response head within {:?}",
                self.timeout
            )),
        }
    }

    pub async fn send(&self, req: Request<Body>) -> Response<Incoming> {
        self.try_send(req).await.unwrap_or_else(|e| panic!("{e}"))
    }

    /// Send and collect the whole response.
    pub async fn fetch(&self, req: Request<Body>) -> Reply {
        let resp = self.send(req).await;
        collect(resp, self.timeout).await
    }

    pub async fn get(&self, addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Reply {
        self.fetch(request("GET", addr, path, headers, empty()))
            .await
    }
}

/// Build a request to `http://{addr}{path}`.
pub fn request(
    method: &str,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: Body,
) -> Request<Body> {
    let mut builder = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    for (name, value) in headers {
        builder = builder.header(
            HeaderName::from_bytes(name.as_bytes()).expect("header name"),
            HeaderValue::from_str(value).expect("header value"),
        );
    }
    builder.body(body).expect("request")
}

/// Collect a response body into a [`Reply`] (body must be UTF-8-ish; lossily converted).
pub async fn collect(resp: Response<Incoming>, timeout: Duration) -> Reply {
    let (parts, body) = resp.into_parts();
    let bytes = tokio::time::timeout(timeout, body.collect())
        .await
        .unwrap_or_else(|_| panic!("response body not complete within {timeout:?}"))
        .unwrap_or_else(|e| panic!("reading response body: {e:?}"))
        .to_bytes();
    Reply {
        status: parts.status,
        version: parts.version,
        headers: parts.headers,
        body: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

/// One-shot GET over a fresh HTTP/1.1 client.
pub async fn get(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, HeaderMap, String) {
    let reply = HttpClient::http1().get(addr, path, headers).await;
    (reply.status, reply.headers, reply.body)
}

/// Send all `requests` with up to `concurrency` in flight; replies come back in input order.
pub async fn fetch_all(
    client: &HttpClient,
    requests: Vec<Request<Body>>,
    concurrency: usize,
) -> Vec<Reply> {
    let total = requests.len();
    let queue = Arc::new(Mutex::new(
        requests
            .into_iter()
            .enumerate()
            .collect::<std::collections::VecDeque<_>>(),
    ));
    let results: Arc<Mutex<Vec<Option<Reply>>>> =
        Arc::new(Mutex::new((0..total).map(|_| None).collect()));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (client, queue, results) = (client.clone(), queue.clone(), results.clone());
        workers.spawn(async move {
            loop {
                let next = queue.lock().unwrap().pop_front();
                let Some((i, req)) = next else { break };
                let reply = client.fetch(req).await;
                results.lock().unwrap()[i] = Some(reply);
            }
        });
    }
    while let Some(res) = workers.join_next().await {
        if let Err(err) = res {
            if err.is_panic() {
                std::panic::resume_unwind(err.into_panic());
            }
            panic!("request worker failed: {err}");
        }
    }
    let results = std::mem::take(&mut *results.lock().unwrap());
    results
        .into_iter()
        .map(|r| r.expect("every request answered"))
        .collect()
}

/// GET `/route` once per id with the sticky header `x-user-id: id`; replies in input order.
pub async fn route_all(
    client: &HttpClient,
    addr: SocketAddr,
    ids: &[String],
    concurrency: usize,
) -> Vec<Reply> {
    let requests = ids
        .iter()
        .map(|id| request("GET", addr, "/route", &[("x-user-id", id)], empty()))
        .collect();
    fetch_all(client, requests, concurrency).await
}

/// A `http://127.0.0.1:PORT` URL on which nothing listens (bound, then closed).
pub async fn closed_port_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    format!("http://{addr}")
}

// ---------------------------------------------------------------------------------------------
// Polling
// ---------------------------------------------------------------------------------------------

/// Waits (at most 5 s) for `closing`, the proxy's close of a connection left idle from now, and
/// checks that it came about `idle_timeout` later (from 5/6 of it to 3 s): its output.
pub async fn closed_after_idle<T>(closing: impl Future<Output = T>, idle_timeout: Duration) -> T {
    let idle_from = Instant::now();
    let out = tokio::time::timeout(Duration::from_secs(5), closing)
        .await
        .expect("the idle connection is closed by the proxy");
    let idle = idle_from.elapsed();
    assert!(
        idle >= idle_timeout * 5 / 6 && idle < Duration::from_secs(3),
        "closed after {idle:?} idle, idle_timeout is {idle_timeout:?}"
    );
    out
}

/// Call `f` until it returns `Some`, at most until `timeout` has passed; panics naming `what`
/// on timeout.
pub async fn poll_until<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = f().await {
            return value;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The negative counterpart of [`poll_until`]: check `f` repeatedly for `duration`; panics with
/// the message of the first check that fails. Returns the number of checks made.
pub async fn hold_for<F, Fut>(duration: Duration, mut f: F) -> usize
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let end = Instant::now() + duration;
    let mut checks = 0;
    loop {
        if let Err(msg) = f().await {
            panic!("condition broke after {checks} good checks: {msg}");
        }
        checks += 1;
        if Instant::now() >= end {
            return checks;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Independent reference of the routing rule
// ---------------------------------------------------------------------------------------------

/// MD5 of `salt ++ key` read as a big-endian unsigned 128-bit integer.
pub fn md5_u128(salt: &[u8], key: &[u8]) -> u128 {
    let mut hasher = Md5::new();
    hasher.update(salt);
    hasher.update(key);
    let digest: [u8; 16] = hasher.finalize().into();
    u128::from_be_bytes(digest)
}

/// Python's `int(md5(user_id).hexdigest(), 16) % 100 < canary_percent`: true = canary.
pub fn reference_arm(user_id: &str, canary_percent: u32) -> bool {
    reference_arm_salted("", user_id, canary_percent)
}

pub fn reference_arm_salted(salt: &str, user_id: &str, canary_percent: u32) -> bool {
    md5_u128(salt.as_bytes(), user_id.as_bytes()) % 100 < u128::from(canary_percent)
}

/// `bucket = (h mod 100) * 100 + (h div 100) mod 100`.
pub fn reference_bucket(salt: &str, user_id: &str) -> u16 {
    let h = md5_u128(salt.as_bytes(), user_id.as_bytes());
    ((h % 100) * 100 + (h / 100) % 100) as u16
}

/// `n` deterministic, varied user ids (plain numbers, `user_N`, emails, UUID-like, hex).
pub fn user_ids(n: usize) -> Vec<String> {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        // xorshift64*
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    (0..n)
        .map(|i| {
            let r = next();
            match i % 5 {
                0 => format!("user_{i}"),
                1 => format!("{}", r % 10_000_000),
                2 => format!("customer.{}@example.com", r % 100_000),
                3 => format!(
                    "{:08x}-{:04x}-4{:03x}-a{:03x}-{:012x}",
                    r >> 32,
                    (r >> 16) & 0xffff,
                    r & 0xfff,
                    (r >> 20) & 0xfff,
                    r.rotate_left(17) & 0xffff_ffff_ffff
                ),
                _ => format!("u-{r:016x}"),
            }
        })
        .collect()
}

/// The first of `ids`-like generated users whose reference bucket (salt "") is in `range`.
pub fn user_in_bucket_range(range: std::ops::Range<u16>) -> String {
    (0..)
        .map(|i| format!("probe-user-{i}"))
        .find(|id| range.contains(&reference_bucket("", id)))
        .expect("some user id falls in the range")
}

// ---------------------------------------------------------------------------------------------
// Config text
// ---------------------------------------------------------------------------------------------

/// Quote a string as a TOML basic string.
pub fn q(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

/// Builds config TOML for tests: listeners on `127.0.0.1:0`, admin on `127.0.0.1:0`, the
/// rollback circuit off (so error tests do not trip it) unless set otherwise.
#[derive(Clone, Debug)]
pub struct ConfigBuilder {
    sections: BTreeMap<String, Vec<(String, String)>>,
    upstreams: Vec<Vec<(String, String)>>,
    raw: String,
}

impl Default for ConfigBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl ConfigBuilder {
    pub fn new() -> Self {
        let mut b = ConfigBuilder {
            sections: BTreeMap::new(),
            upstreams: Vec::new(),
            raw: String::new(),
        };
        b = b
            .set("listen", "addr", &q("127.0.0.1:0"))
            .set("admin", "addr", &q("127.0.0.1:0"))
            .set("rollback", "enabled", "false");
        b
    }

    /// Set `[section] key = value`; `value` is TOML (use [`q`] for strings).
    pub fn set(mut self, section: &str, key: &str, value: &str) -> Self {
        let entries = self.sections.entry(section.to_string()).or_default();
        entries.retain(|(k, _)| k != key);
        entries.push((key.to_string(), value.to_string()));
        self
    }

    /// Add `[[upstream]]` with name, url and weight (weight as written, e.g. "12.5").
    pub fn upstream(mut self, name: &str, url: &str, weight: &str) -> Self {
        self.upstreams.push(vec![
            ("name".into(), q(name)),
            ("url".into(), q(url)),
            ("weight".into(), weight.to_string()),
        ]);
        self
    }

    /// Extra `key = value` (TOML) on the last added upstream.
    pub fn upstream_set(mut self, key: &str, value: &str) -> Self {
        self.upstreams
            .last_mut()
            .expect("an upstream was added")
            .push((key.to_string(), value.to_string()));
        self
    }

    /// Append raw TOML at the end.
    pub fn raw(mut self, text: &str) -> Self {
        self.raw.push_str(text);
        self.raw.push('\n');
        self
    }

    pub fn build(&self) -> String {
        let mut out = String::new();
        for (section, entries) in &self.sections {
            out.push_str(&format!("[{section}]\n"));
            for (k, v) in entries {
                out.push_str(&format!("{k} = {v}\n"));
            }
            out.push('\n');
        }
        for up in &self.upstreams {
            out.push_str("[[upstream]]\n");
            for (k, v) in up {
                out.push_str(&format!("{k} = {v}\n"));
            }
            out.push('\n');
        }
        out.push_str(&self.raw);
        out
    }
}

// ---------------------------------------------------------------------------------------------
// In-process proxy
// ---------------------------------------------------------------------------------------------

/// Where the config file lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigLayout {
    /// `dir/etc/canaryd.toml`, a regular file.
    Plain,
    /// A Kubernetes ConfigMap volume: `dir/canaryd.toml -> ..data/canaryd.toml`,
    /// `dir/..data -> ..v1`, file in `dir/..v1/`.
    ConfigMap,
    /// `dir/etc/canaryd.toml -> ../deploy/canaryd.toml`, the file in `dir/deploy/`.
    Symlinked,
}

/// How a config change is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rewrite {
    /// Editor style: write a temp file in the same directory, rename it over the config.
    Rename,
    /// `cp` style: truncate the existing file and write into it (same inode).
    InPlace,
    /// Kubernetes ConfigMap update: new `..vN` dir, `..data_tmp -> ..vN`, rename over
    /// `..data`, remove the old version dir.
    ConfigMapSwap,
    /// With [`ConfigLayout::Symlinked`]: replace (write temp + rename) the symlink's target
    /// in its own directory. Nothing changes in the directory holding the config path, so a
    /// watcher on that directory sees no event; SIGHUP (re-reading the path) picks it up.
    SymlinkTarget,
}

pub const CONFIG_FILE: &str = "canaryd.toml";

/// A config file in its own temp dir, rewritable in the styles of [`Rewrite`].
pub struct ConfigFile {
    dir: tempfile::TempDir,
    layout: ConfigLayout,
    path: PathBuf,
    version: u32,
    writes: u32,
}

impl ConfigFile {
    pub fn create(text: &str, layout: ConfigLayout) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("canaryd-test-")
            .tempdir()
            .expect("tempdir");
        let path = match layout {
            ConfigLayout::Plain | ConfigLayout::Symlinked => {
                dir.path().join("etc").join(CONFIG_FILE)
            }
            ConfigLayout::ConfigMap => dir.path().join(CONFIG_FILE),
        };
        match layout {
            ConfigLayout::Plain => {
                std::fs::create_dir(path.parent().unwrap()).expect("mkdir etc");
                write_synced(&path, text);
            }
            ConfigLayout::Symlinked => {
                std::fs::create_dir(path.parent().unwrap()).expect("mkdir etc");
                std::fs::create_dir(dir.path().join("deploy")).expect("mkdir deploy");
                write_synced(&dir.path().join("deploy").join(CONFIG_FILE), text);
                symlink(&format!("../deploy/{CONFIG_FILE}"), &path);
            }
            ConfigLayout::ConfigMap => {
                let v1 = dir.path().join("..v1");
                std::fs::create_dir(&v1).expect("mkdir ..v1");
                write_synced(&v1.join(CONFIG_FILE), text);
                symlink("..v1", &dir.path().join("..data"));
                symlink(&format!("..data/{CONFIG_FILE}"), &path);
            }
        }
        ConfigFile {
            dir,
            layout,
            path,
            version: 1,
            writes: 0,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn rewrite(&mut self, text: &str, how: Rewrite) {
        self.writes += 1;
        match how {
            Rewrite::Rename => {
                assert_eq!(
                    self.layout,
                    ConfigLayout::Plain,
                    "rename needs a plain file"
                );
                let tmp = self
                    .path
                    .with_file_name(format!(".{CONFIG_FILE}.tmp{}", self.writes));
                write_synced(&tmp, text);
                std::fs::rename(&tmp, &self.path).expect("rename over config");
            }
            Rewrite::InPlace => {
                assert_eq!(
                    self.layout,
                    ConfigLayout::Plain,
                    "in-place needs a plain file"
                );
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .truncate(true)
                    .open(&self.path)
                    .expect("open config for truncate");
                f.write_all(text.as_bytes()).expect("write config");
                f.sync_all().expect("fsync config");
            }
            Rewrite::ConfigMapSwap => {
                assert_eq!(
                    self.layout,
                    ConfigLayout::ConfigMap,
                    "swap needs ConfigMap layout"
                );
                let root = self.dir.path();
                let old = format!("..v{}", self.version);
                let new = format!("..v{}", self.version + 1);
                std::fs::create_dir(root.join(&new)).expect("mkdir new version");
                write_synced(&root.join(&new).join(CONFIG_FILE), text);
                let tmp_link = root.join("..data_tmp");
                symlink(&new, &tmp_link);
                std::fs::rename(&tmp_link, root.join("..data")).expect("swap ..data");
                std::fs::remove_dir_all(root.join(&old)).expect("remove old version");
                self.version += 1;
            }
            Rewrite::SymlinkTarget => {
                assert_eq!(
                    self.layout,
                    ConfigLayout::Symlinked,
                    "needs Symlinked layout"
                );
                let deploy = self.dir.path().join("deploy");
                let tmp = deploy.join(format!(".{CONFIG_FILE}.tmp{}", self.writes));
                write_synced(&tmp, text);
                std::fs::rename(&tmp, deploy.join(CONFIG_FILE)).expect("rename over target");
            }
        }
    }
}

fn write_synced(path: &Path, text: &str) {
    let mut f = std::fs::File::create(path).expect("create file");
    f.write_all(text.as_bytes()).expect("write file");
    f.sync_all().expect("fsync file");
}

fn symlink(target: &str, link: &Path) {
    std::os::unix::fs::symlink(target, link)
        .unwrap_or_else(|e| panic!("symlink {} -> {target}: {e}", link.display()));
}

/// canaryd running in-process via `canaryd::app::run`.
pub struct Proxy {
    config: ConfigFile,
    addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), canaryd::app::AppError>>>,
}

impl Proxy {
    /// Start with a plain config file (watched for changes).
    pub async fn start(config_text: &str) -> Proxy {
        Self::start_with(config_text, ConfigLayout::Plain).await
    }

    pub async fn start_with(config_text: &str, layout: ConfigLayout) -> Proxy {
        let config = canaryd::config::Config::parse(config_text)
            .unwrap_or_else(|errs| panic!("test config invalid:\n{errs}\n---\n{config_text}"));
        let file = ConfigFile::create(config_text, layout);
        let proxy_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let admin_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind admin");
        let addr = proxy_listener.local_addr().expect("proxy addr");
        let admin_addr = admin_listener.local_addr().expect("admin addr");
        let listeners = canaryd::app::Listeners {
            proxy: proxy_listener,
            admin: Some(admin_listener),
        };
        let (tx, rx) = oneshot::channel::<()>();
        let shutdown = async move {
            let _ = rx.await;
        };
        let task = tokio::spawn(canaryd::app::run(
            config,
            Some(file.path().to_path_buf()),
            listeners,
            shutdown,
        ));
        let proxy = Proxy {
            config: file,
            addr,
            admin_addr: Some(admin_addr),
            shutdown: Some(tx),
            task: Some(task),
        };
        proxy.wait_serving().await;
        proxy
    }

    /// The listeners are bound before `run` starts, so requests sent from now on queue in the
    /// backlog until it accepts; no readiness probe is needed (a probe through the proxy
    /// would also touch an upstream's request counter). Fail fast if `run` returned at once.
    async fn wait_serving(&self) {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        if let Some(task) = &self.task {
            assert!(
                !task.is_finished(),
                "canaryd::app::run returned right after start"
            );
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The admin listener's address (the in-process proxy always serves the admin API).
    pub fn admin(&self) -> SocketAddr {
        self.admin_addr
            .expect("the in-process proxy binds an admin listener")
    }

    /// An admin API client for this proxy, without a bearer token.
    pub fn admin_client(&self) -> AdminClient {
        AdminClient::new(self.admin())
    }

    pub fn config_path(&self) -> &Path {
        self.config.path()
    }

    pub fn rewrite_config(&mut self, text: &str, how: Rewrite) {
        self.config.rewrite(text, how);
    }

    /// Signal shutdown and return what `run` returned.
    pub async fn shutdown(mut self) -> Result<(), canaryd::app::AppError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let task = self.task.take().expect("task present");
        match tokio::time::timeout(Duration::from_secs(30), task).await {
            Ok(Ok(result)) => result,
            Ok(Err(err)) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
            Ok(Err(err)) => panic!("proxy task failed: {err}"),
            Err(_) => panic!("canaryd::app::run did not return within 30s of shutdown"),
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Admin API client and metrics text
// ---------------------------------------------------------------------------------------------

/// A client for canaryd's admin API: JSON in and out, optional bearer token.
#[derive(Clone)]
pub struct AdminClient {
    addr: SocketAddr,
    token: Option<String>,
    client: HttpClient,
}

impl AdminClient {
    pub fn new(addr: SocketAddr) -> Self {
        AdminClient {
            addr,
            token: None,
            client: HttpClient::http1(),
        }
    }

    /// Send `Authorization: Bearer <token>` on every call.
    pub fn with_token(mut self, token: &str) -> Self {
        self.token = Some(token.to_string());
        self
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Any call: `headers` are sent as given, plus the bearer token if one is set (and no
    /// `authorization` header is among `headers`).
    pub async fn call_with(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Body,
    ) -> Reply {
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let mut all: Vec<(&str, &str)> = headers.to_vec();
        if let Some(auth) = &auth {
            if !headers
                .iter()
                .any(|(n, _)| n.eq_ignore_ascii_case("authorization"))
            {
                all.push(("authorization", auth));
            }
        }
        self.client
            .fetch(request(method, self.addr, path, &all, body))
            .await
    }

    /// A call with an optional text body (sent as `application/json`).
    pub async fn call(&self, method: &str, path: &str, body: Option<&str>) -> Reply {
        match body {
            Some(b) => {
                self.call_with(
                    method,
                    path,
                    &[("content-type", "application/json")],
                    full(b.to_string()),
                )
                .await
            }
            None => self.call_with(method, path, &[], empty()).await,
        }
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.call("GET", path, None).await
    }

    /// GET that must answer 200 with JSON.
    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        let reply = self.get(path).await;
        assert_eq!(reply.status, StatusCode::OK, "GET {path}: {reply:?}");
        reply.json()
    }

    pub async fn put_json(&self, path: &str, body: &serde_json::Value) -> Reply {
        self.call("PUT", path, Some(&body.to_string())).await
    }

    pub async fn post(&self, path: &str, body: Option<&serde_json::Value>) -> Reply {
        let text = body.map(|b| b.to_string());
        self.call("POST", path, text.as_deref()).await
    }

    /// `PUT /weights` that must succeed; returns the weights document it answers with.
    pub async fn set_weights(&self, body: serde_json::Value) -> serde_json::Value {
        let reply = self.put_json("/weights", &body).await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "PUT /weights {body}: {reply:?}"
        );
        reply.json()
    }

    /// A POST that must succeed; returns its JSON body.
    pub async fn post_ok(&self, path: &str, body: Option<&serde_json::Value>) -> serde_json::Value {
        let reply = self.post(path, body).await;
        assert_eq!(reply.status, StatusCode::OK, "POST {path}: {reply:?}");
        reply.json()
    }

    pub async fn weights(&self) -> serde_json::Value {
        self.get_json("/weights").await
    }

    pub async fn status(&self) -> serde_json::Value {
        self.get_json("/status").await
    }

    /// `GET /metrics`, parsed.
    pub async fn metrics(&self) -> MetricsText {
        let reply = self.get("/metrics").await;
        assert_eq!(reply.status, StatusCode::OK, "GET /metrics: {reply:?}");
        MetricsText::parse(&reply.body)
    }

    /// The reason an arm is tripped for, per `GET /weights` (None when not tripped).
    pub async fn trip_reason(&self, arm: &str) -> Option<String> {
        self.weights().await["tripped"][arm]["reason"]
            .as_str()
            .map(str::to_string)
    }

    /// Wait until `arm` is tripped; returns the reason.
    pub async fn wait_tripped(&self, arm: &str, timeout: Duration) -> String {
        poll_until(timeout, &format!("{arm} to be tripped"), || async {
            self.trip_reason(arm).await
        })
        .await
    }
}

/// `application/x-www-form-urlencoded` encoding of a query value.
pub fn url_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// One sample of the Prometheus text exposition.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed Prometheus text exposition (`# HELP`/`# TYPE` lines are kept in `text` only).
#[derive(Clone, Debug)]
pub struct MetricsText {
    pub text: String,
    pub samples: Vec<Sample>,
}

impl MetricsText {
    /// Parses every sample line; panics on a line it cannot read (the format is part of the
    /// contract).
    pub fn parse(text: &str) -> Self {
        let samples = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| parse_sample(l).unwrap_or_else(|| panic!("unreadable metrics line {l:?}")))
            .collect();
        MetricsText {
            text: text.to_string(),
            samples,
        }
    }

    /// Samples named `name` whose labels include every `(label, value)` of `labels`.
    pub fn series(&self, name: &str, labels: &[(&str, &str)]) -> Vec<&Sample> {
        self.samples
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect()
    }

    /// Sum of the matching series, or `None` when there is none.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let series = self.series(name, labels);
        (!series.is_empty()).then(|| series.iter().map(|s| s.value).sum())
    }

    /// Sum of the matching series; 0 when there is none.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels).unwrap_or(0.0)
    }

    /// `{label value: sample value}` of the series matching `labels`, keyed by `by`.
    pub fn by_label(&self, name: &str, labels: &[(&str, &str)], by: &str) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for s in self.series(name, labels) {
            let key = s.labels.get(by).cloned().unwrap_or_default();
            *out.entry(key).or_insert(0.0) += s.value;
        }
        out
    }
}

fn parse_sample(line: &str) -> Option<Sample> {
    let (name_end, has_labels) = match line.find(['{', ' ']) {
        Some(i) => (i, line.as_bytes()[i] == b'{'),
        None => return None,
    };
    let name = line[..name_end].to_string();
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if has_labels {
        rest = &rest[1..];
        loop {
            rest = rest.trim_start_matches([',', ' ']);
            if let Some(r) = rest.strip_prefix('}') {
                rest = r;
                break;
            }
            let eq = rest.find('=')?;
            let key = rest[..eq].trim().to_string();
            rest = rest[eq + 1..].strip_prefix('"')?;
            let mut value = String::new();
            let mut chars = rest.char_indices();
            let end = loop {
                let (i, c) = chars.next()?;
                match c {
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    '"' => break i,
                    c => value.push(c),
                }
            };
            rest = &rest[end + 1..];
            labels.insert(key, value);
        }
    }
    let value_text = rest.split_whitespace().next()?;
    let value = match value_text {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name,
        labels,
        value,
    })
}

// ---------------------------------------------------------------------------------------------
// The real binary
// ---------------------------------------------------------------------------------------------

pub fn canaryd_bin() -> &'static str {
    env!("CARGO_BIN_EXE_canaryd")
}

/// Output of a finished `canaryd` invocation.
#[derive(Debug)]
pub struct CliOutput {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Run `canaryd args...` to completion (for `check` / `route`).
pub fn run_cli(args: &[&str]) -> CliOutput {
    let out = Command::new(canaryd_bin())
        .args(args)
        .env("NO_COLOR", "1")
        .env_remove("CANARYD_CONFIG")
        .stdin(Stdio::null())
        .output()
        .expect("run canaryd");
    CliOutput {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Remove ANSI escape sequences (CSI) from `s`.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// The proxy address from a `proxy listening ... addr=127.0.0.1:PORT` log line.
pub fn parse_listen_addr(line: &str) -> Option<SocketAddr> {
    let line = strip_ansi(line);
    if !line.contains("proxy listening") {
        return None;
    }
    let rest = &line[line.find("addr=")? + "addr=".len()..];
    let token: String = rest
        .trim_start_matches('"')
        .chars()
        .take_while(|c| !c.is_whitespace() && *c != '"' && *c != ',')
        .collect();
    token.parse().ok()
}

/// `canaryd run --config FILE` as a child process; killed on drop.
pub struct CanarydProcess {
    child: Child,
    config: ConfigFile,
    addr: SocketAddr,
    output: Arc<Mutex<Vec<String>>>,
}

impl CanarydProcess {
    /// Spawn and wait (up to 30 s) for the `proxy listening` log line.
    pub async fn spawn(config_text: &str) -> CanarydProcess {
        let config = ConfigFile::create(config_text, ConfigLayout::Plain);
        Self::spawn_with(config).await
    }

    pub async fn spawn_with(config: ConfigFile) -> CanarydProcess {
        Self::spawn_with_args(config, &[]).await
    }

    /// [`CanarydProcess::spawn_with`], with more command-line arguments after `run`.
    pub async fn spawn_with_args(config: ConfigFile, args: &[&str]) -> CanarydProcess {
        let mut child = Command::new(canaryd_bin())
            .arg("run")
            .args(args)
            .arg("--config")
            .arg(config.path())
            .env_remove("CANARYD_HUGE_PAGES")
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .env_remove("CANARYD_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn canaryd");
        let output = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("stderr");
        let stdout = child.stdout.take().expect("stdout");
        for (pipe, prefix) in [
            (Box::new(stderr) as Box<dyn std::io::Read + Send>, ""),
            (
                Box::new(stdout) as Box<dyn std::io::Read + Send>,
                "[stdout] ",
            ),
        ] {
            let output = output.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    output.lock().unwrap().push(format!("{prefix}{line}"));
                }
            });
        }
        let mut process = CanarydProcess {
            child,
            config,
            addr: "0.0.0.0:0".parse().unwrap(),
            output,
        };
        let addr = poll_until(
            Duration::from_secs(30),
            "`proxy listening` log line",
            || {
                let found = process
                    .output
                    .lock()
                    .unwrap()
                    .iter()
                    .find_map(|l| parse_listen_addr(l));
                let exited = found.is_none() && matches!(process.child.try_wait(), Ok(Some(_)));
                async move {
                    if exited {
                        panic!("canaryd exited before listening");
                    }
                    found
                }
            },
        )
        .await;
        let raw = process
            .output
            .lock()
            .unwrap()
            .iter()
            .find(|l| parse_listen_addr(l).is_some())
            .cloned()
            .unwrap_or_default();
        assert!(
            !raw.contains('\u{1b}'),
            "logs to a non-terminal stderr must be plain text, got {raw:?}"
        );
        process.addr = addr;
        process
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn config(&mut self) -> &mut ConfigFile {
        &mut self.config
    }

    /// `kill -SIG pid` (e.g. `"HUP"`, `"TERM"`).
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{sig} {} failed", self.pid());
    }

    /// The exit status if the process has exited.
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// Wait (polling) for the process to exit.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = &mut self.child;
        poll_until(timeout, "canaryd to exit", || {
            let status = child.try_wait().expect("try_wait");
            async move { status }
        })
        .await
    }

    /// Everything the process wrote so far (stderr lines, then `[stdout]`-prefixed lines,
    /// interleaved as read).
    pub fn output(&self) -> String {
        self.output.lock().unwrap().join("\n")
    }

    /// Peak resident set size (`VmHWM`) in KiB.
    pub fn vm_hwm_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc/PID/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc/PID/status")
    }
}

impl Drop for CanarydProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- canaryd (pid {}) output ---\n{}\n--- end ---",
                self.child.id(),
                self.output()
            );
        }
    }
}

/// Reads one HTTP/1.1 response head (through the blank line) from a raw stream, byte by byte so
/// nothing after it is consumed; returns it lower-cased.
pub async fn read_response_head(stream: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut byte))
            .await
            .expect("response head in time")
            .expect("read");
        assert_eq!(
            n, 1,
            "connection closed before a full response head: {head:?}"
        );
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).to_lowercase()
}

/// Deterministic, non-repeating bytes (xorshift), different per `seed`.
pub fn data(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A number in [0, 1) fixed by `(seed, k)` (SplitMix64 of `seed + k * golden gamma`), so a
/// schedule can be recomputed outside the test (e.g. in Python) from the same two numbers.
pub fn seeded_unit(seed: u64, k: u64) -> f64 {
    let mut z = seed.wrapping_add(k.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}
