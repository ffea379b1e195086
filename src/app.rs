//! Wiring: binds listeners, starts the servers (proxy and admin), the reload, circuit and
//! upkeep tasks, and drains on shutdown.
//!
//! [`run`] takes already-bound listeners and a shutdown future, so tests bind `127.0.0.1:0`,
//! pass the listeners in, and talk to the real server.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::admin::Admin;
use crate::config::Config;
use crate::control::Control;
use crate::metrics::{Metrics, UPKEEP_INTERVAL};
use crate::release::circuit::Ledger;
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
        .map(|(store, _)| crate::control::reload::spawn_cert_watch(store.clone()));
    let reloader = match config_path {
        Some(path) => {
            Some(crate::control::reload::spawn(path, control.clone()).map_err(AppError::Reload)?)
        }
        None => None,
    };
    let (outcomes, outcome_rx) = crate::release::outcome::channel();
    let ledger = Arc::new(Ledger::default());
    let circuit = crate::release::circuit::spawn(control.clone(), ledger.clone(), outcome_rx);
    let webhooks = Arc::new(crate::release::webhook::Webhooks::new(metrics.clone()));
    let rollouts = Arc::new(crate::release::rollout::Rollouts::restore(
        control.saved_rollout(),
    ));
    let rollout = crate::release::rollout::spawn(
        control.clone(),
        ledger.clone(),
        rollouts.clone(),
        webhooks.clone(),
    );
    let warmup = crate::release::warmup::spawn(control.clone());
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
            ledger,
            token,
            ready: ready.clone(),
            rollouts,
            webhooks,
        });
        tokio::spawn(crate::admin::serve(listener, admin, admin_stop_rx))
    });
    if let Ok(addr) = listeners.proxy.local_addr() {
        tracing::info!(addr = %addr, "proxy listening");
    }
    let tls = tls.map(|(_, server)| crate::server::Tls {
        acceptor: TlsAcceptor::from(server),
        handshake_timeout: listen.tls_handshake_timeout,
    });
    let proxy = tokio::spawn(crate::server::serve(
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
    warmup.abort();
    rollout.abort();
    circuit.abort();
    Ok(())
}
