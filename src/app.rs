//! Wiring: binds listeners, runs the proxy accept loop and the reload task, drains on shutdown.
//!
//! [`run`] takes already-bound listeners and a shutdown future, so tests bind `127.0.0.1:0`,
//! pass the listeners in, and talk to the real server.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;

use crate::admin::Admin;
use crate::circuit::{OutcomeSender, Windows};
use crate::config::{Config, ListenConfig};
use crate::control::Control;
use crate::metrics::{Metrics, UPKEEP_INTERVAL};
use crate::proxy::Proxy;
use crate::tls::CertStore;

/// Listeners bound before [`run`] starts.
#[derive(Debug)]
pub struct Listeners {
    /// The data-plane listener.
    pub proxy: TcpListener,
    /// The admin listener, if the admin API is served.
    pub admin: Option<TcpListener>,
}

/// A failure that stops canaryd.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// The configured address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Signal handlers or the reload task could not be set up.
    #[error("cannot start the config reload task: {0}")]
    Reload(#[source] std::io::Error),
    /// The config cannot be served: TLS files unusable (a configuration problem: exit code 2).
    #[error("invalid config:\n{0}")]
    Config(#[from] crate::config::ConfigErrors),
    /// The admin token file is unusable (a configuration problem: exit code 2).
    #[error("admin.token_file {path}: {problem}")]
    Token {
        /// The configured path.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
}

/// Reads the admin token: the file's content without surrounding whitespace, not empty.
pub fn load_token(config: &Config) -> Result<Option<String>, AppError> {
    let Some(path) = &config.admin.token_file else {
        return Ok(None);
    };
    let err = |problem: String| AppError::Token {
        path: path.clone(),
        problem,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(err("the file is empty".into()));
    }
    Ok(Some(token.to_owned()))
}

/// Binds the proxy and admin listeners named in the config.
pub async fn bind(config: &Config) -> Result<Listeners, AppError> {
    async fn one(what: &'static str, addr: SocketAddr) -> Result<TcpListener, AppError> {
        TcpListener::bind(addr)
            .await
            .map_err(|source| AppError::Bind { what, addr, source })
    }
    Ok(Listeners {
        proxy: one("proxy", config.listen.addr).await?,
        admin: Some(one("admin", config.admin.addr).await?),
    })
}

/// Serves until `shutdown` resolves, then drains in-flight requests for up to
/// `listen.drain_timeout`. With `config_path`, the file is watched and reloaded (also on
/// SIGHUP).
pub async fn run(
    config: Config,
    config_path: Option<PathBuf>,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AppError> {
    let listen = config.listen.clone();
    let token = load_token(&config)?;
    let metrics = Metrics::new();
    let tls_errors = crate::tls::check_files(&config);
    if !tls_errors.is_empty() {
        return Err(AppError::Config(crate::config::ConfigErrors(tls_errors)));
    }
    let tls_err = |e: crate::tls::TlsError| {
        AppError::Config(crate::config::ConfigErrors(vec![
            crate::config::ConfigError {
                path: "listen.tls_cert".into(),
                line: None,
                message: e.to_string(),
            },
        ]))
    };
    let tls = match &listen.tls {
        None => None,
        Some(files) => {
            let store = CertStore::load(files.clone()).map_err(tls_err)?;
            let server = crate::tls::server_config(store.clone()).map_err(tls_err)?;
            Some((store, server))
        }
    };
    let control = Control::new(config, metrics.clone())?;
    let cert_watch = tls
        .as_ref()
        .map(|(store, _)| crate::reload::spawn_cert_watch(store.clone()));
    let reloader = match config_path {
        Some(path) => Some(crate::reload::spawn(path, control.clone()).map_err(AppError::Reload)?),
        None => None,
    };
    let (outcomes, outcome_rx) = crate::circuit::channel();
    let windows = Arc::new(Windows::default());
    let circuit = crate::circuit::spawn(control.clone(), windows.clone(), outcome_rx);
    let upkeep = tokio::spawn({
        let control = control.clone();
        async move {
            let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
            loop {
                tick.tick().await;
                metrics.upkeep();
                // Idle upstream connections: closed by the peer, or idle for too long.
                for arm in &control.snapshot().arms {
                    arm.upstream.sweep(UPKEEP_INTERVAL);
                }
            }
        }
    });
    // Config loaded and listeners bound (they were bound by the caller): ready.
    let ready = Arc::new(AtomicBool::new(true));
    let (stop_tx, stop_rx) = watch::channel(false);
    let (admin_stop_tx, admin_stop_rx) = watch::channel(false);

    let admin = listeners.admin.map(|listener| {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(addr = %addr, auth = token.is_some(), "admin listening");
        }
        let admin = Arc::new(Admin {
            control: control.clone(),
            windows,
            token,
            ready: ready.clone(),
        });
        tokio::spawn(serve_admin(listener, admin, admin_stop_rx))
    });
    if let Ok(addr) = listeners.proxy.local_addr() {
        tracing::info!(addr = %addr, "proxy listening");
    }
    let tls = tls.map(|(_, server)| Tls {
        acceptor: TlsAcceptor::from(server),
        handshake_timeout: listen.tls_handshake_timeout,
    });
    let proxy = tokio::spawn(serve_proxy(
        listeners.proxy,
        control.clone(),
        outcomes,
        listen,
        tls,
        stop_rx,
    ));
    shutdown.await;
    tracing::info!("shutting down: no new connections; draining in-flight requests");
    // Readiness fails first so load balancers stop sending while requests drain.
    ready.store(false, Ordering::Relaxed);
    let _ = stop_tx.send(true);
    if let Some(r) = reloader {
        r.abort();
    }
    if let Some(w) = cert_watch {
        w.abort();
    }
    if let Err(e) = proxy.await {
        tracing::error!(error = %e, "proxy task failed");
    }
    let _ = admin_stop_tx.send(true);
    if let Some(a) = admin {
        let _ = a.await;
    }
    upkeep.abort();
    circuit.abort();
    Ok(())
}

/// The next connection, or `None` once `stop` fires. Accept errors (EMFILE and friends) are
/// logged and retried after a short back-off instead of spinning; the listener survives.
async fn accept(
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

async fn serve_admin(listener: TcpListener, admin: Arc<Admin>, mut stop: watch::Receiver<bool>) {
    while let Some((stream, peer)) = accept(&listener, &mut stop, "admin").await {
        let admin = admin.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| admin.clone().handle(req));
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                tracing::debug!(peer = %peer, error = %e, "admin connection ended with an error");
            }
        });
    }
}

/// Downstream TLS termination settings.
#[derive(Clone)]
struct Tls {
    acceptor: TlsAcceptor,
    handshake_timeout: Duration,
}

async fn serve_proxy(
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
        .max_header_list_size(u32::try_from(listen.max_header_bytes).unwrap_or(u32::MAX));
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
        let limits = crate::conn::Limits {
            idle: control.snapshot().config.listen.idle_timeout,
            head: Some(listen.header_read_timeout),
            drain_linger: crate::conn::DRAIN_LINGER.min(listen.drain_timeout),
            max_header_bytes: listen.max_header_bytes,
        };
        let builder = builder.clone();
        let tls = tls.clone();
        let stop = stop.clone();
        tracker.spawn(async move {
            let result = match tls {
                None => crate::conn::serve(&builder, stream, proxy, limits, stop).await,
                Some(tls) => {
                    match tokio::time::timeout(tls.handshake_timeout, tls.acceptor.accept(stream))
                        .await
                    {
                        Ok(Ok(stream)) => {
                            crate::conn::serve(&builder, stream, proxy, limits, stop).await
                        }
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
