//! Upstream connections, one pool per upstream, kept across reloads while the upstream is
//! unchanged.
//!
//! HTTP/1.1 upstreams (plain or TLS) use canaryd's own keep-alive pool of hyper client
//! connections. A connection is *driven by the request that holds it*: the downstream
//! connection's task writes the request, reads the response and streams its body on the same
//! poll, then puts the connection back. There is no connection task, no hand-off between tasks
//! and no pool key to hash, which is most of what a general-purpose client costs per request.
//! HTTP/2 upstreams multiplex many requests on one connection, which needs a task of its own:
//! they use hyper-util's pooled client.

use std::collections::VecDeque;
use std::fmt;
use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::ClientConfig;
use tokio::net::TcpStream;
use tower_service::Service;

use crate::config::{UpstreamConfig, UpstreamTls};

/// Request body sent upstream: the client's streamed body, or nothing.
pub type UpstreamBody = Either<Incoming, Empty<Bytes>>;

/// Idle keep-alive connections are closed after about this long (see [`Upstream::sweep`]).
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle connections kept per upstream; enough for a saturated sidecar, bounded for memory.
const POOL_MAX_IDLE: usize = 512;

/// What identifies a connection pool: a reload that keeps these keeps the pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamKey {
    url: Uri,
    connect_timeout: Duration,
    http2: bool,
    tls: UpstreamTls,
}

impl UpstreamKey {
    /// The pool identity of an upstream's config.
    pub fn of(cfg: &UpstreamConfig) -> Self {
        UpstreamKey {
            url: cfg.url.clone(),
            connect_timeout: cfg.connect_timeout,
            http2: cfg.http2,
            tls: cfg.tls.clone(),
        }
    }
}

/// Why no response came back from an upstream.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// TCP connect (or the TLS handshake) failed or timed out.
    #[error("connect failed: {0}")]
    Connect(String),
    /// No response headers within `request_timeout`.
    #[error("no response within {0:?}")]
    Timeout(Duration),
    /// The connection broke or the upstream spoke invalid HTTP.
    #[error("protocol error: {0}")]
    Protocol(String),
}

/// The `kind` label of `canaryd_upstream_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Connect failed or timed out.
    Connect = 0,
    /// No response headers within `request_timeout`.
    Timeout = 1,
    /// Broken connection or invalid HTTP.
    Protocol = 2,
}

impl FailureKind {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Connect => "connect",
            FailureKind::Timeout => "timeout",
            FailureKind::Protocol => "protocol",
        }
    }
}

impl UpstreamError {
    /// Which kind of failure this is.
    pub fn kind(&self) -> FailureKind {
        match self {
            UpstreamError::Connect(_) => FailureKind::Connect,
            UpstreamError::Timeout(_) => FailureKind::Timeout,
            UpstreamError::Protocol(_) => FailureKind::Protocol,
        }
    }
}

/// An error and its sources, joined; a generic outer message with a more specific source
/// ("client error (Connect)") is skipped.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = Vec::new();
    let mut cur = e.source();
    while let Some(s) = cur {
        parts.push(s.to_string());
        cur = s.source();
    }
    if parts.is_empty() {
        e.to_string()
    } else if e.is::<hyper_util::client::legacy::Error>() {
        parts.join(": ")
    } else {
        format!("{e}: {}", parts.join(": "))
    }
}

/// The socket under an HTTP/1.1 upstream connection: plain TCP or TLS over TCP.
type Io = MaybeHttpsStream<TokioIo<TcpStream>>;

/// Drives one HTTP/1.1 connection; resolves when it closes or hands its socket to an upgrade.
type Driver = Pin<Box<dyn Future<Output = hyper::Result<()>> + Send>>;

/// One HTTP/1.1 upstream connection: the handle requests go in by, and the future that moves
/// bytes. Whoever holds it polls the driver; in the pool nobody does.
struct H1 {
    send: http1::SendRequest<UpstreamBody>,
    /// `None` once the connection has closed.
    driver: Option<Driver>,
    /// The pool sweep at which it was last put back (see [`H1Pool::sweep`]).
    idle_epoch: u64,
}

impl H1 {
    /// Moves the connection forward; `false` once it has closed. Dropping the driver of a
    /// closed connection hands any request still queued on it back to its sender.
    fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        if let Some(driver) = &mut self.driver {
            if let Poll::Ready(result) = driver.as_mut().poll(cx) {
                if let Err(e) = result {
                    tracing::debug!(error = %chain(&e), "upstream connection closed");
                }
                self.driver = None;
            }
        }
        self.driver.is_some()
    }

    /// Open, and idle: ready to take a request now.
    fn ready(&mut self, cx: &mut Context<'_>) -> bool {
        self.drive(cx) && self.send.is_ready()
    }
}

/// Makes new connections to one upstream.
#[derive(Clone)]
enum Connector {
    Plain(HttpConnector),
    Tls(HttpsConnector<HttpConnector>),
}

/// The idle HTTP/1.1 connections of one upstream.
struct H1Pool {
    /// Most recently used last: requests take the warmest connection.
    idle: Mutex<VecDeque<H1>>,
    connector: Connector,
    /// Where connections go: the upstream's scheme and authority.
    target: Uri,
    /// Counts [`H1Pool::sweep`] calls; an idle connection remembers the one it was parked at.
    epoch: AtomicU64,
}

impl H1Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<H1>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The warmest idle connection. It is not polled here: if the upstream closed it while
    /// it was parked, the first poll in [`H1Pool::send`] finds out before writing anything,
    /// and the request is handed back to go on another connection.
    fn checkout(&self) -> Option<H1> {
        self.lock().pop_back()
    }

    /// Parks a connection whose exchange is complete, or closes it when it is not reusable.
    fn checkin(&self, mut conn: H1) {
        // Usually the last poll of the response body already left the connection asking for
        // the next request. If not, poll it once more, with a waker that does nothing: nobody
        // waits on a parked connection.
        if !conn.send.is_ready() && !conn.ready(&mut Context::from_waker(Waker::noop())) {
            return;
        }
        conn.idle_epoch = self.epoch.load(Ordering::Relaxed);
        let mut idle = self.lock();
        if idle.len() < POOL_MAX_IDLE {
            idle.push_back(conn);
        }
    }

    /// Opens a new connection.
    async fn connect(&self) -> Result<H1, UpstreamError> {
        let io: Io = match &self.connector {
            Connector::Plain(c) => c
                .clone()
                .call(self.target.clone())
                .await
                .map(MaybeHttpsStream::Http)
                .map_err(|e| UpstreamError::Connect(chain(&e)))?,
            Connector::Tls(c) => c
                .clone()
                .call(self.target.clone())
                .await
                .map_err(|e| UpstreamError::Connect(chain(&*e)))?,
        };
        let (send, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|e| UpstreamError::Connect(chain(&e)))?;
        Ok(H1 {
            send,
            driver: Some(Box::pin(conn.with_upgrades())),
            idle_epoch: 0,
        })
    }

    /// Closes connections the upstream has closed and those idle for longer than
    /// [`POOL_IDLE_TIMEOUT`], given that this runs every `every`.
    fn sweep(&self, every: Duration) {
        let epoch = self.epoch.fetch_add(1, Ordering::Relaxed) + 1;
        let keep = POOL_IDLE_TIMEOUT.as_millis() / every.as_millis().max(1);
        let keep = u64::try_from(keep).unwrap_or(u64::MAX).max(1);
        let mut cx = Context::from_waker(Waker::noop());
        let mut closed = Vec::new();
        let mut idle = self.lock();
        idle.retain_mut(|c| {
            let keep = epoch - c.idle_epoch <= keep && c.ready(&mut cx);
            if !keep {
                // Dropped outside the lock.
                closed.push(c.driver.take());
            }
            keep
        });
        drop(idle);
        drop(closed);
    }

    /// Sends a request on a pooled or new connection and drives it to the response head,
    /// for at most `timeout`.
    async fn send(
        self: &Arc<Self>,
        mut req: Request<UpstreamBody>,
        timeout: Duration,
    ) -> Result<(Response<Incoming>, Lease), UpstreamError> {
        // Polled in place rather than wrapping this future in `tokio::time::timeout`, which
        // would move it (a few hundred bytes) on every request.
        let mut deadline = pin!(tokio::time::sleep(timeout));
        loop {
            let (mut conn, reused) = match self.checkout() {
                Some(conn) => (conn, true),
                // Boxed: connecting is rare, and its future would otherwise make every
                // request's future several times larger.
                None => {
                    let mut connecting = Box::pin(self.connect());
                    let connected = poll_fn(|cx| match connecting.as_mut().poll(cx) {
                        Poll::Ready(r) => Poll::Ready(Some(r)),
                        Poll::Pending => deadline.as_mut().poll(cx).map(|()| None),
                    })
                    .await;
                    (connected.ok_or(UpstreamError::Timeout(timeout))??, false)
                }
            };
            let mut sent = pin!(conn.send.try_send_request(req));
            let result = poll_fn(|cx| {
                conn.drive(cx);
                // Only the driver, polled just above with this task's waker, ever completes
                // `sent`: registering the task with it too would only make the driver wake
                // the task once more, for nothing.
                match sent.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
                    Poll::Ready(r) => Poll::Ready(Some(r)),
                    Poll::Pending => deadline.as_mut().poll(cx).map(|()| None),
                }
            })
            .await;
            let Some(result) = result else {
                return Err(UpstreamError::Timeout(timeout));
            };
            match result {
                Ok(resp) => {
                    let lease = Lease {
                        conn: Some(conn),
                        pool: self.clone(),
                    };
                    return Ok((resp, lease));
                }
                Err(mut e) => match e.take_message() {
                    // A kept-alive connection that closed before the request went out: the
                    // request was never written, so another connection may take it.
                    Some(unsent) if reused => req = unsent,
                    _ => return Err(UpstreamError::Protocol(chain(e.error()))),
                },
            }
        }
    }
}

/// An HTTP/1.1 connection lent to one request until its response body has been read. The
/// holder drives it ([`Lease::poll_body`]) and gives it back ([`Lease::release`]); dropped
/// otherwise (response body abandoned half-way), it closes the connection.
pub struct Lease {
    conn: Option<H1>,
    pool: Arc<H1Pool>,
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("upstream", &self.pool.target)
            .finish()
    }
}

impl Lease {
    /// Polls the response body of the request this lease was made for, driving the
    /// connection when the body has nothing buffered.
    pub fn poll_body(
        &mut self,
        cx: &mut Context<'_>,
        body: &mut Incoming,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, hyper::Error>>> {
        use http_body::Body as _;
        let Some(conn) = &mut self.conn else {
            return Pin::new(body).poll_frame(cx);
        };
        // Frames come only from the driver, polled here with this task's waker: the body
        // need not register the task too (that would only wake it once more, for nothing).
        let quiet = &mut Context::from_waker(Waker::noop());
        match Pin::new(&mut *body).poll_frame(quiet) {
            Poll::Pending => {
                conn.drive(cx);
                Pin::new(&mut *body).poll_frame(quiet)
            }
            polled => polled,
        }
    }

    /// The response body has been read to its end: the connection may serve another request.
    pub fn release(mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.checkin(conn);
        }
    }

    /// The connection was upgraded (`101 Switching Protocols`): it belongs to the tunnel now.
    /// Its driver runs on in a task of its own until it hands the socket over.
    pub fn detach(mut self) {
        if let Some(driver) = self.conn.take().and_then(|c| c.driver) {
            tokio::spawn(async move {
                if let Err(e) = driver.await {
                    tracing::debug!(error = %chain(&e), "upgraded upstream connection failed");
                }
            });
        }
    }
}

/// A pooled client: canaryd's own for HTTP/1.1, hyper-util's for HTTP/2.
enum Pool {
    H1(Arc<H1Pool>),
    H2Plain(Client<HttpConnector, UpstreamBody>),
    H2Tls(Client<HttpsConnector<HttpConnector>, UpstreamBody>),
}

/// One upstream's keep-alive pool and target address.
pub struct Upstream {
    key: UpstreamKey,
    scheme: Scheme,
    authority: Authority,
    pool: Pool,
}

impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upstream").field("key", &self.key).finish()
    }
}

impl Upstream {
    /// Builds the pool (connections are opened lazily). `tls` is the client config for an
    /// https:// upstream (see [`crate::tls::client_config`]).
    pub fn new(cfg: &UpstreamConfig, tls: Option<Arc<ClientConfig>>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(cfg.connect_timeout));
        connector.set_keepalive(Some(Duration::from_secs(60)));
        // The URL was validated to carry scheme and authority when the config was built.
        let scheme = cfg.url.scheme().cloned().unwrap_or(Scheme::HTTP);
        let authority = cfg
            .url
            .authority()
            .cloned()
            .unwrap_or_else(|| Authority::from_static("invalid"));
        let https = tls.map(|tls| {
            connector.enforce_http(false);
            let https = hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config((*tls).clone())
                .https_only();
            // ALPN follows the protocol the pool will speak.
            if cfg.http2 {
                https.enable_http2().wrap_connector(connector.clone())
            } else {
                https.enable_http1().wrap_connector(connector.clone())
            }
        });
        let pool = if cfg.http2 {
            let mut builder = Client::builder(TokioExecutor::new());
            builder
                .pool_timer(TokioTimer::new())
                .timer(TokioTimer::new())
                .pool_idle_timeout(POOL_IDLE_TIMEOUT)
                .pool_max_idle_per_host(POOL_MAX_IDLE)
                .http2_only(true);
            match https {
                None => Pool::H2Plain(builder.build(connector)),
                Some(https) => Pool::H2Tls(builder.build(https)),
            }
        } else {
            let target = Uri::builder()
                .scheme(scheme.clone())
                .authority(authority.clone())
                .path_and_query("/")
                .build()
                .unwrap_or_else(|_| cfg.url.clone());
            Pool::H1(Arc::new(H1Pool {
                idle: Mutex::new(VecDeque::new()),
                connector: match https {
                    None => Connector::Plain(connector),
                    Some(https) => Connector::Tls(https),
                },
                target,
                epoch: AtomicU64::new(0),
            }))
        };
        Upstream {
            key: UpstreamKey::of(cfg),
            scheme,
            authority,
            pool,
        }
    }

    /// The pool identity.
    pub fn key(&self) -> &UpstreamKey {
        &self.key
    }

    /// Whether requests to this upstream go over HTTP/2.
    pub fn http2(&self) -> bool {
        self.key.http2
    }

    /// The upstream's `host[:port]`, the `Host` of a request that came without one.
    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    /// The request target for a path on this upstream: origin-form (`/path?query`) for
    /// HTTP/1.1, absolute for HTTP/2 (which sends scheme and authority as pseudo-headers).
    pub fn uri_for(&self, path: Option<&PathAndQuery>) -> Result<Uri, http::Error> {
        let path = path
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        if !self.http2() {
            return Ok(Uri::from(path));
        }
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(path)
            .build()
    }

    /// Sends a request and waits for the response head, at most `timeout`. For HTTP/1.1 the
    /// connection comes with the response: the caller drives it while reading the body.
    pub async fn send(
        &self,
        req: Request<UpstreamBody>,
        timeout: Duration,
    ) -> Result<(Response<Incoming>, Option<Lease>), UpstreamError> {
        let sent = match &self.pool {
            Pool::H1(pool) => return pool.send(req, timeout).await.map(|(r, l)| (r, Some(l))),
            Pool::H2Plain(c) => c.request(req),
            Pool::H2Tls(c) => c.request(req),
        };
        match tokio::time::timeout(timeout, sent).await {
            Ok(result) => legacy(result),
            Err(_) => Err(UpstreamError::Timeout(timeout)),
        }
    }

    /// Closes idle connections the upstream has closed or that have idled for longer than
    /// the pool's idle timeout (90 s); to be called every `every` (the metrics upkeep).
    pub fn sweep(&self, every: Duration) {
        if let Pool::H1(pool) = &self.pool {
            pool.sweep(every);
        }
    }
}

fn legacy(
    result: Result<Response<Incoming>, hyper_util::client::legacy::Error>,
) -> Result<(Response<Incoming>, Option<Lease>), UpstreamError> {
    match result {
        Ok(resp) => Ok((resp, None)),
        Err(e) if e.is_connect() => Err(UpstreamError::Connect(chain(&e))),
        Err(e) => Err(UpstreamError::Protocol(chain(&e))),
    }
}
