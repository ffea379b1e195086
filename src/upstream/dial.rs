//! Opening a connection to an upstream: TCP (with the connect timeout, `TCP_NODELAY` and
//! keep-alive probes), then TLS for `https://` with the ALPN protocol the client speaks.

use std::fmt;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Uri;
use hyper_util::client::legacy::connect::HttpConnector;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tower_service::Service;

use super::error::{chain, UpstreamError};

/// The socket under an upstream connection: plain TCP or TLS over TCP.
pub enum Stream {
    /// `http://`
    Plain(TcpStream),
    /// `https://`
    Tls(Box<TlsStream<TcpStream>>),
}

impl fmt::Debug for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stream::Plain(_) => "Stream::Plain",
            Stream::Tls(_) => "Stream::Tls",
        })
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Where a pool's connections go and how they are opened.
pub(crate) struct Dialer {
    connector: HttpConnector,
    /// `scheme://authority/`, what the connector dials.
    uri: Uri,
    /// For `https://`: the TLS client and the name to verify (or why the host cannot be one).
    tls: Option<(TlsConnector, Result<ServerName<'static>, String>)>,
}

impl Dialer {
    /// Dials `uri` with `connector`, then for `https://` (`tls` given) shakes hands offering
    /// `alpn` as the only application protocol.
    pub(crate) fn new(
        mut connector: HttpConnector,
        uri: Uri,
        tls: Option<&rustls::ClientConfig>,
        alpn: &[u8],
    ) -> Self {
        connector.enforce_http(false);
        let tls = tls.map(|cfg| {
            let mut cfg = cfg.clone();
            cfg.alpn_protocols = vec![alpn.to_vec()];
            let host = uri.host().unwrap_or_default();
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let name = ServerName::try_from(host.to_owned())
                .map_err(|e| format!("{host:?} is not a name TLS can verify: {e}"));
            (TlsConnector::from(Arc::new(cfg)), name)
        });
        Dialer {
            connector,
            uri,
            tls,
        }
    }

    /// `scheme://authority/` of the upstream.
    pub(crate) fn uri(&self) -> &Uri {
        &self.uri
    }

    /// Opens a new connection: TCP, then TLS for `https://`.
    pub(crate) async fn dial(&self) -> Result<Stream, UpstreamError> {
        let tcp = self
            .connector
            .clone()
            .call(self.uri.clone())
            .await
            .map_err(|e| UpstreamError::Connect(chain(&e)))?
            .into_inner();
        Ok(match &self.tls {
            None => Stream::Plain(tcp),
            Some((tls, name)) => Stream::Tls(Box::new(
                tls.connect(name.clone().map_err(UpstreamError::Connect)?, tcp)
                    .await
                    .map_err(|e| UpstreamError::Connect(format!("TLS handshake: {e}")))?,
            )),
        })
    }
}
