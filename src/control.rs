//! The control plane: owns the current config and publishes the immutable [`Snapshot`] the
//! data path reads.
//!
//! Writers (reload, and later the admin API and the circuit) take a mutex that the data path
//! never touches, build a complete new snapshot, and swap it in with one `ArcSwap::store`. A
//! request loads the snapshot once and finishes on it, so a reload never changes a request
//! half-way. Upstream pools whose settings did not change are carried into the new snapshot.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use http::header::{HeaderName, HeaderValue};

use crate::config::Config;
use crate::routing::{Router, WeightTable};
use crate::upstream::{Upstream, UpstreamKey};

/// One arm as the data path sees it.
#[derive(Debug)]
pub struct Arm {
    /// The upstream's name.
    pub name: Arc<str>,
    /// `name` as a header value, built once.
    pub header_value: HeaderValue,
    /// The pooled client.
    pub upstream: Arc<Upstream>,
}

/// Everything a request needs, immutable once published.
#[derive(Debug)]
pub struct Snapshot {
    /// Increases by one with every published snapshot.
    pub generation: u64,
    /// The config this snapshot was built from.
    pub config: Arc<Config>,
    /// Header-facing routing rule.
    pub router: Router,
    /// Effective weights.
    pub table: WeightTable,
    /// Arms in config order, index-aligned with `table`.
    pub arms: Vec<Arm>,
    /// Response header naming the arm, if on.
    pub response_header: Option<HeaderName>,
    /// Upstream exchange deadline.
    pub request_timeout: Duration,
    /// Whether to log every request.
    pub access_log: bool,
}

/// Result of the last reload attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadStatus {
    /// When it happened.
    pub at: SystemTime,
    /// `Ok(generation)` or every validation error, one per line.
    pub result: Result<u64, String>,
}

struct Inner {
    config: Arc<Config>,
    generation: u64,
    last_reload: Option<ReloadStatus>,
}

/// Owner of the published snapshot.
pub struct Control {
    current: ArcSwap<Snapshot>,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("generation", &self.current.load().generation)
            .finish()
    }
}

impl Control {
    /// Publishes the first snapshot for `config`.
    pub fn new(config: Config) -> Arc<Control> {
        let config = Arc::new(config);
        let snap = build_snapshot(&config, 1, None);
        Arc::new(Control {
            current: ArcSwap::from_pointee(snap),
            inner: Mutex::new(Inner {
                config,
                generation: 1,
                last_reload: None,
            }),
        })
    }

    /// The current snapshot; hold it for the whole request.
    #[inline]
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave Inner half-written: every writer builds
        // the new values first and assigns them last.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Swaps in a validated config. Returns the new generation and the changed settings that
    /// only apply after a restart (they keep their old values).
    pub fn apply_config(&self, mut config: Config) -> (u64, Vec<&'static str>) {
        let mut inner = self.lock();
        let restart_only = inner.config.restart_only_changes(&config);
        // Listener settings keep running with the values they were bound with.
        config.listen.addr = inner.config.listen.addr;
        config.listen.max_connections = inner.config.listen.max_connections;
        config.listen.max_header_bytes = inner.config.listen.max_header_bytes;
        config.listen.header_read_timeout = inner.config.listen.header_read_timeout;
        config.admin.addr = inner.config.admin.addr;
        let config = Arc::new(config);
        let generation = inner.generation + 1;
        let old = self.current.load_full();
        let snap = build_snapshot(&config, generation, Some(&old));
        self.current.store(Arc::new(snap));
        inner.config = config;
        inner.generation = generation;
        inner.last_reload = Some(ReloadStatus {
            at: SystemTime::now(),
            result: Ok(generation),
        });
        (generation, restart_only)
    }

    /// Records a rejected reload; the running config is untouched.
    pub fn reload_failed(&self, error: String) {
        self.lock().last_reload = Some(ReloadStatus {
            at: SystemTime::now(),
            result: Err(error),
        });
    }

    /// The last reload attempt, if any.
    pub fn last_reload(&self) -> Option<ReloadStatus> {
        self.lock().last_reload.clone()
    }
}

fn build_snapshot(config: &Arc<Config>, generation: u64, old: Option<&Snapshot>) -> Snapshot {
    let arms = config
        .upstreams
        .iter()
        .map(|u| {
            let key = UpstreamKey::of(u);
            let upstream = old
                .and_then(|s| s.arms.iter().find(|a| *a.upstream.key() == key))
                .map(|a| a.upstream.clone())
                .unwrap_or_else(|| Arc::new(Upstream::new(u)));
            Arm {
                name: u.name.as_str().into(),
                // Names were validated to be a safe header-value charset.
                header_value: HeaderValue::from_str(&u.name)
                    .unwrap_or_else(|_| HeaderValue::from_static("invalid")),
                upstream,
            }
        })
        .collect();
    Snapshot {
        generation,
        router: config.router(),
        table: config.weight_table(),
        arms,
        response_header: config.routing.response_header.clone(),
        request_timeout: config.listen.request_timeout,
        access_log: config.listen.access_log,
        config: config.clone(),
    }
}
