//! Downstream: the proxy's accept loop (connection slots, TLS handshakes), each connection's
//! life ([`conn`]), what ends it ([`guard`]), and canaryd's HTTP/1.1 server side ([`h1`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;

use crate::config::ListenConfig;
use crate::control::Control;
use crate::proxy::Proxy;
use crate::release::outcome::OutcomeSender;

pub mod conn;
mod guard;
mod h1;

/// The next connection, or `None` once `stop` fires. Accept errors (EMFILE and friends) are
/// logged and retried after a short back-off instead of spinning; the listener survives.
pub(crate) async fn accept(
    listener: &TcpListener,
    stop: &mut watch::Receiver<bool>,
    what: &'static str,
) -> Option<(tokio::net::TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => return Some(x),
                Err(e) => {
                    tracing::warn!(listener = what, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = stop.changed() => return None,
        }
    }
}

/// Downstream TLS termination settings.
#[derive(Clone)]
pub(crate) struct Tls {
    pub(crate) acceptor: TlsAcceptor,
    pub(crate) handshake_timeout: Duration,
}

/// Accepts and serves proxy connections until `stop` fires, then drains them for up to
/// `listen.drain_timeout`.
pub(crate) async fn serve(
    listener: TcpListener,
    control: Arc<Control>,
    outcomes: OutcomeSender,
    listen: ListenConfig,
    tls: Option<Tls>,
    mut stop: watch::Receiver<bool>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // The request-head timeout is canaryd's own (`conn::Limits::head`), checked by the
        // connection's one timer instead of a timer per request.
        .header_read_timeout(None)
        .max_buf_size(listen.max_header_bytes);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(listen.max_header_bytes).unwrap_or(u32::MAX))
        // hyper's own default (200) is not part of its stable API; 100 is HAProxy's.
        .max_concurrent_streams(listen.http2_max_concurrent_streams);
    let builder = Arc::new(builder);
    // Tracks connection tasks (TLS handshakes included) so the drain can wait for them.
    let tracker = TaskTracker::new();
    let slots = Arc::new(Semaphore::new(listen.max_connections));

    loop {
        // Waiting for a slot before accepting leaves excess clients in the kernel backlog.
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = stop.changed() => break,
        };
        let Some((stream, peer)) = accept(&listener, &mut stop, "proxy").await else {
            break;
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let proto = if tls.is_some() { "https" } else { "http" };
        let proxy = Proxy::new(control.clone(), outcomes.clone(), peer, proto);
        let limits = conn::Limits {
            idle: control.snapshot().config.listen.idle_timeout,
            head: Some(listen.header_read_timeout),
            drain_linger: conn::DRAIN_LINGER.min(listen.drain_timeout),
            max_header_bytes: listen.max_header_bytes,
        };
        let builder = builder.clone();
        let tls = tls.clone();
        let stop = stop.clone();
        tracker.spawn(async move {
            let result = match tls {
                None => conn::serve(&builder, stream, proxy, limits, stop).await,
                Some(tls) => {
                    match tokio::time::timeout(tls.handshake_timeout, tls.acceptor.accept(stream))
                        .await
                    {
                        Ok(Ok(stream)) => conn::serve(&builder, stream, proxy, limits, stop).await,
                        Ok(Err(e)) => {
                            tracing::debug!(peer = %peer, error = %e, "TLS handshake failed");
                            Ok(())
                        }
                        Err(_) => {
                            tracing::debug!(peer = %peer, "TLS handshake timed out");
                            Ok(())
                        }
                    }
                }
            };
            if let Err(e) = result {
                tracing::debug!(peer = %peer, error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    tracker.close();
    let open = tracker.len();
    tokio::select! {
        _ = tracker.wait() => tracing::info!(connections = open, "drained"),
        _ = tokio::time::sleep(listen.drain_timeout) => {
            tracing::warn!(timeout = ?listen.drain_timeout, "drain timeout reached; closing remaining connections");
        }
    }
}
