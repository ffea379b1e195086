//! Pooled HTTP clients, one per upstream, kept across reloads while the upstream is unchanged.

use std::error::Error as _;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::{Client, ResponseFuture};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::ClientConfig;

use crate::config::{UpstreamConfig, UpstreamTls};

/// Request body sent upstream: the client's streamed body, or nothing.
pub type UpstreamBody = Either<Incoming, Empty<Bytes>>;

/// Idle keep-alive connections are closed after this long.
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
    /// TCP connect failed or timed out.
    #[error("connect failed: {}", chain(.0))]
    Connect(#[source] hyper_util::client::legacy::Error),
    /// No response headers within `request_timeout`.
    #[error("no response within {0:?}")]
    Timeout(Duration),
    /// The connection broke or the upstream spoke invalid HTTP.
    #[error("protocol error: {}", chain(.0))]
    Protocol(#[source] hyper_util::client::legacy::Error),
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

/// Joins an error's source chain, skipping hyper-util's generic outer message.
fn chain(e: &hyper_util::client::legacy::Error) -> String {
    let mut parts = Vec::new();
    let mut cur = e.source();
    while let Some(s) = cur {
        parts.push(s.to_string());
        cur = s.source();
    }
    if parts.is_empty() {
        e.to_string()
    } else {
        parts.join(": ")
    }
}

/// A pooled client: plain TCP, or TLS for https:// upstreams.
#[derive(Debug)]
enum Pool {
    Plain(Client<HttpConnector, UpstreamBody>),
    Tls(Client<HttpsConnector<HttpConnector>, UpstreamBody>),
}

impl Pool {
    fn request(&self, req: Request<UpstreamBody>) -> ResponseFuture {
        match self {
            Pool::Plain(c) => c.request(req),
            Pool::Tls(c) => c.request(req),
        }
    }
}

/// One upstream's keep-alive pool and target address.
#[derive(Debug)]
pub struct Upstream {
    key: UpstreamKey,
    scheme: Scheme,
    authority: Authority,
    pool: Pool,
}

impl Upstream {
    /// Builds the pool (connections are opened lazily). `tls` is the client config for an
    /// https:// upstream (see [`crate::tls::client_config`]).
    pub fn new(cfg: &UpstreamConfig, tls: Option<Arc<ClientConfig>>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(cfg.connect_timeout));
        connector.set_keepalive(Some(Duration::from_secs(60)));
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(POOL_MAX_IDLE)
            .http2_only(cfg.http2);
        let pool = match tls {
            None => Pool::Plain(builder.build(connector)),
            Some(tls) => {
                connector.enforce_http(false);
                let https = hyper_rustls::HttpsConnectorBuilder::new()
                    .with_tls_config((*tls).clone())
                    .https_only();
                // ALPN follows the protocol the pool will speak.
                let https = if cfg.http2 {
                    https.enable_http2().wrap_connector(connector)
                } else {
                    https.enable_http1().wrap_connector(connector)
                };
                Pool::Tls(builder.build(https))
            }
        };
        // The URL was validated to carry scheme and authority when the config was built.
        let scheme = cfg.url.scheme().cloned().unwrap_or(Scheme::HTTP);
        let authority = cfg
            .url
            .authority()
            .cloned()
            .unwrap_or_else(|| Authority::from_static("invalid"));
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

    /// The absolute URI for a request path on this upstream.
    pub fn uri_for(&self, path: Option<&PathAndQuery>) -> Result<Uri, http::Error> {
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(
                path.cloned()
                    .unwrap_or_else(|| PathAndQuery::from_static("/")),
            )
            .build()
    }

    /// Sends a request and waits for the response head, at most `timeout`.
    pub async fn send(
        &self,
        req: Request<UpstreamBody>,
        timeout: Duration,
    ) -> Result<Response<Incoming>, UpstreamError> {
        match tokio::time::timeout(timeout, self.pool.request(req)).await {
            Err(_) => Err(UpstreamError::Timeout(timeout)),
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) if e.is_connect() => Err(UpstreamError::Connect(e)),
            Ok(Err(e)) => Err(UpstreamError::Protocol(e)),
        }
    }
}
