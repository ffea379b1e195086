//! Upstream connections, one pool per upstream, kept across reloads while the upstream is
//! unchanged.
//!
//! HTTP/1.1 upstreams (plain or TLS) use canaryd's own client ([`h1`]): a keep-alive pool
//! whose connections are driven by the request that holds them. HTTP/2 upstreams use
//! canaryd's client on the `h2` crate ([`h2`]): a few multiplexed connections, each driven
//! by a task of its own, and requests that wait for their responses on their own tasks.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use rustls::ClientConfig;

pub mod dial;
pub mod error;
pub mod forwarded;
pub mod h1;
pub mod h2;

use self::error::UpstreamError;
use self::forwarded::Forwarded;
use self::h1::{H1Body, H1Pool};
use self::h2::{H2Body, H2Pool};
use crate::body::{BoxError, RequestBody};
use crate::config::{UpstreamConfig, UpstreamTls};

/// Request body sent upstream (see [`RequestBody`]).
pub type UpstreamBody = RequestBody;

/// A response body from an upstream, over HTTP/1.1 or HTTP/2.
#[derive(Debug)]
pub enum UpstreamResponseBody {
    /// From an HTTP/1.1 upstream; holds the connection until read.
    H1(H1Body),
    /// From an HTTP/2 upstream; holds its place on the connection until read.
    H2(H2Body),
}

impl http_body::Body for UpstreamResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            UpstreamResponseBody::H1(b) => Pin::new(b).poll_frame(cx),
            UpstreamResponseBody::H2(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamResponseBody::H1(b) => b.is_end_stream(),
            UpstreamResponseBody::H2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            UpstreamResponseBody::H1(b) => b.size_hint(),
            UpstreamResponseBody::H2(b) => b.size_hint(),
        }
    }
}

/// What identifies a connection pool: a reload that keeps these keeps the pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamKey {
    url: Uri,
    connect_timeout: Duration,
    http2: bool,
    max_connections: usize,
    tls: UpstreamTls,
}

impl UpstreamKey {
    /// The pool identity of an upstream's config.
    pub fn of(cfg: &UpstreamConfig) -> Self {
        UpstreamKey {
            url: cfg.url.clone(),
            connect_timeout: cfg.connect_timeout,
            http2: cfg.http2,
            max_connections: cfg.max_connections,
            tls: cfg.tls.clone(),
        }
    }
}

/// A pooled client for HTTP/1.1 or HTTP/2.
enum Pool {
    H1(Arc<H1Pool>),
    H2(H2Pool),
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
        let target = Uri::builder()
            .scheme(scheme.clone())
            .authority(authority.clone())
            .path_and_query("/")
            .build()
            .unwrap_or_else(|_| cfg.url.clone());
        let pool = if cfg.http2 {
            Pool::H2(H2Pool::new(
                connector,
                target,
                tls.as_deref(),
                cfg.max_connections,
            ))
        } else {
            Pool::H1(Arc::new(H1Pool::new(
                connector,
                target,
                tls.as_deref(),
                cfg.max_connections,
            )))
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

    /// Sends a request and waits for the response head, at most `timeout`. An HTTP/1.1
    /// response body holds its connection until it has been read.
    pub async fn send(
        &self,
        mut req: Request<UpstreamBody>,
        forwarded: &Forwarded,
        timeout: Duration,
    ) -> Result<Response<UpstreamResponseBody>, UpstreamError> {
        match &self.pool {
            Pool::H1(pool) => {
                let resp = pool.send(req, forwarded, timeout).await?;
                Ok(resp.map(UpstreamResponseBody::H1))
            }
            Pool::H2(pool) => {
                forwarded.apply(req.headers_mut());
                // HTTP/2 carries the host in `:authority`, and a `host` field that differs
                // from it makes the request malformed (RFC 9113, section 8.3.1; nginx answers
                // 400). The `:authority` is the upstream's own `host:port`, where the pool's
                // connections go whatever hosts the clients name; the client's host goes on
                // in `X-Forwarded-Host`.
                req.headers_mut().remove(http::header::HOST);
                let resp = pool.send(req, timeout).await?;
                Ok(resp.map(UpstreamResponseBody::H2))
            }
        }
    }

    /// Closes idle connections the upstream has closed or that have idled for longer than
    /// the pool's idle timeout (90 s); to be called every `every` (the metrics upkeep).
    pub fn sweep(&self, every: Duration) {
        match &self.pool {
            Pool::H1(pool) => pool.sweep(every),
            Pool::H2(pool) => pool.sweep(every),
        }
    }
}
