//! The control plane: owns the config, admin overrides and tripped arms, and publishes the
//! immutable [`Snapshot`] the data path reads.
//!
//! Writers (reload, admin API, rollback circuit) take a mutex the data path never touches,
//! compute the effective weights, build a complete new snapshot and swap it in with one
//! `ArcSwap::store`. A request loads the snapshot once and finishes on it. Upstream pools whose
//! settings did not change are carried into the new snapshot.
//!
//! Effective weights = (admin override, else the file's weights), then every tripped
//! non-baseline arm's weight moves to the baseline.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use http::header::{HeaderName, HeaderValue};

pub mod reload;
pub mod state;

use self::state::{AdminWeights, State, Trip};
use crate::config::{Config, ConfigError, ConfigErrors};
use crate::metrics::{ArmMetrics, Metrics};
use crate::routing::{fmt_percent, Router, WeightTable, BASIS_POINTS};
use crate::upstream::{Upstream, UpstreamKey};

/// One arm as the data path sees it.
#[derive(Debug, Clone)]
pub struct Arm {
    /// The upstream's name.
    pub name: Arc<str>,
    /// `name` as a header value, built once.
    pub header_value: HeaderValue,
    /// The pooled client.
    pub upstream: Arc<Upstream>,
    /// Pre-resolved metric handles.
    pub metrics: Arc<ArmMetrics>,
    /// Whether the rollback circuit (or an operator) has tripped this arm.
    pub tripped: bool,
    /// Moves when the arm's history stops counting (trip reset, new url): its sliding window
    /// must start over.
    pub window_epoch: u64,
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

impl Snapshot {
    /// Whether the rollback circuit watches `arm` (an arm of this snapshot): every arm but
    /// the baseline.
    pub fn watched(&self, arm: &Arm) -> bool {
        self.arms
            .get(self.table.baseline())
            .is_none_or(|base| !Arc::ptr_eq(&base.name, &arm.name))
    }
}

/// Result of the last reload attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadStatus {
    /// When it happened.
    pub at: SystemTime,
    /// `Ok(generation)` or every validation error, one per line.
    pub result: Result<u64, String>,
}

/// Which table the configured weights come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightSource {
    /// The config file.
    File,
    /// An admin API call.
    Admin,
}

impl WeightSource {
    /// `"file"` or `"admin"`.
    pub fn as_str(self) -> &'static str {
        match self {
            WeightSource::File => "file",
            WeightSource::Admin => "admin",
        }
    }
}

/// A copy of the control state for the admin API.
#[derive(Debug, Clone)]
pub struct View {
    /// Snapshot generation.
    pub generation: u64,
    /// The running config.
    pub config: Arc<Config>,
    /// Where `configured` comes from.
    pub source: WeightSource,
    /// Weights before trips, per arm (basis points).
    pub configured: Vec<u16>,
    /// The config file's weights, per arm.
    pub file: Vec<u16>,
    /// Weights in force, per arm.
    pub effective: Vec<u16>,
    /// Tripped arms.
    pub tripped: BTreeMap<String, Trip>,
    /// Last reload attempt.
    pub last_reload: Option<ReloadStatus>,
}

/// A refused admin change; nothing was modified.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChangeError {
    /// The request does not describe a valid change (HTTP 400).
    #[error("{0}")]
    Invalid(String),
    /// The change names a tripped arm (HTTP 409).
    #[error("{0}")]
    Tripped(String),
}

struct Inner {
    config: Arc<Config>,
    /// Arms (pools and metric handles) for `config`, reused by every snapshot until the
    /// config changes.
    arms: Vec<Arm>,
    admin: Option<AdminWeights>,
    tripped: BTreeMap<String, Trip>,
    /// Per-arm window epochs (see [`Arm::window_epoch`]).
    epochs: BTreeMap<String, u64>,
    generation: u64,
    last_reload: Option<ReloadStatus>,
}

impl Inner {
    fn bump_epoch(&mut self, arm: &str) {
        *self.epochs.entry(arm.to_owned()).or_default() += 1;
    }
}

/// Owner of the published snapshot.
pub struct Control {
    current: ArcSwap<Snapshot>,
    inner: Mutex<Inner>,
    metrics: Arc<Metrics>,
    state_path: Option<PathBuf>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("generation", &self.current.load().generation)
            .finish()
    }
}

impl Control {
    /// Publishes the first snapshot for `config`, restoring admin overrides and trips from the
    /// state file when one is configured (a corrupt file is moved aside and reported). Fails
    /// when an upstream's TLS files cannot be loaded.
    pub fn new(config: Config, metrics: Arc<Metrics>) -> Result<Arc<Control>, ConfigErrors> {
        let config = Arc::new(config);
        let arms = build_arms(&config, &[], &metrics)?;
        let state_path = config.state.file.clone();
        let restored = state_path.as_deref().map(restore).unwrap_or_default();
        let mut inner = Inner {
            config: config.clone(),
            arms,
            admin: restored.admin_weights,
            tripped: restored.tripped,
            epochs: BTreeMap::new(),
            generation: 1,
            last_reload: None,
        };
        // The file may have changed while canaryd was down: apply the same rules as a reload.
        reconcile(&mut inner, None);
        let snap = build_snapshot(1, &inner);
        publish_gauges(&snap);
        let control = Arc::new(Control {
            current: ArcSwap::from_pointee(snap),
            inner: Mutex::new(inner),
            metrics,
            state_path,
        });
        control.persist(&control.lock());
        Ok(control)
    }

    /// The current snapshot; hold it for the whole request.
    #[inline]
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// The metrics registry.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Writers compute new values first and assign them last, so a panic while holding the
        // lock cannot leave Inner half-written.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Rebuilds and swaps the snapshot after `inner` changed, then persists the state.
    fn publish(&self, inner: &mut Inner) -> u64 {
        inner.generation += 1;
        let snap = build_snapshot(inner.generation, inner);
        publish_gauges(&snap);
        self.current.store(Arc::new(snap));
        self.persist(inner);
        inner.generation
    }

    fn persist(&self, inner: &Inner) {
        let Some(path) = &self.state_path else {
            return;
        };
        let state = State {
            version: state::VERSION,
            admin_weights: inner.admin.clone(),
            tripped: inner.tripped.clone(),
        };
        if let Err(e) = state::save(path, &state) {
            tracing::error!(error = %e, "cannot write the state file; the change is in effect but will not survive a restart");
        }
    }

    /// Swaps in a validated config. Returns the new generation and the changed settings that
    /// only apply after a restart (they keep their old values). Nothing changes when an
    /// upstream's TLS files cannot be loaded.
    pub fn apply_config(
        &self,
        mut config: Config,
    ) -> Result<(u64, Vec<&'static str>), ConfigErrors> {
        let mut inner = self.lock();
        let arms = build_arms(&config, &inner.arms, &self.metrics)?;
        let old = inner.config.clone();
        let restart_only = old.restart_only_changes(&config);
        // Listener settings keep running with the values they were bound with.
        config.listen.addr = old.listen.addr;
        config.listen.max_connections = old.listen.max_connections;
        config.listen.max_header_bytes = old.listen.max_header_bytes;
        config.listen.header_read_timeout = old.listen.header_read_timeout;
        config.admin.addr = old.admin.addr;
        config.listen.tls = old.listen.tls.clone();
        config.listen.tls_handshake_timeout = old.listen.tls_handshake_timeout;
        for u in &config.upstreams {
            let moved = old
                .upstreams
                .iter()
                .any(|o| o.name == u.name && o.url != u.url);
            if moved {
                inner.bump_epoch(&u.name);
            }
        }
        inner.config = Arc::new(config);
        inner.arms = arms;
        reconcile(&mut inner, Some(&old));
        let generation = self.publish(&mut inner);
        inner.last_reload = Some(ReloadStatus {
            at: SystemTime::now(),
            result: Ok(generation),
        });
        self.metrics.reload(true);
        Ok((generation, restart_only))
    }

    /// Records a rejected reload; the running config is untouched.
    pub fn reload_failed(&self, error: String) {
        self.lock().last_reload = Some(ReloadStatus {
            at: SystemTime::now(),
            result: Err(error),
        });
        self.metrics.reload(false);
    }

    /// A copy of the state for the admin API.
    pub fn view(&self) -> View {
        let inner = self.lock();
        let snap = self.current.load();
        let (configured, source) = configured(&inner);
        View {
            generation: inner.generation,
            config: inner.config.clone(),
            source,
            file: inner.config.weights_bp(),
            configured,
            effective: snap.table.weights().to_vec(),
            tripped: inner.tripped.clone(),
            last_reload: inner.last_reload.clone(),
        }
    }

    /// Sets weights from the admin API. Unnamed non-baseline arms keep their current weight;
    /// the baseline gets the remainder (if named, it must equal the remainder).
    pub fn set_weights(&self, requested: &BTreeMap<String, u16>) -> Result<u64, ChangeError> {
        let mut inner = self.lock();
        let config = inner.config.clone();
        let names: Vec<&str> = config.upstreams.iter().map(|u| u.name.as_str()).collect();
        if requested.is_empty() {
            return Err(ChangeError::Invalid(
                "empty weight table; send e.g. {\"canary\": 25}".into(),
            ));
        }
        for name in requested.keys() {
            if !names.contains(&name.as_str()) {
                return Err(ChangeError::Invalid(format!(
                    "unknown upstream {name:?}; upstreams are: {}",
                    names.join(", ")
                )));
            }
        }
        if let Some((name, trip)) = requested
            .keys()
            .filter_map(|n| inner.tripped.get_key_value(n))
            .next()
        {
            return Err(tripped_error(name, trip));
        }
        let (mut weights, _) = configured(&inner);
        let baseline = config.baseline;
        for (i, name) in names.iter().enumerate() {
            if let Some(&w) = requested.get(*name) {
                weights[i] = w;
            }
        }
        let others: u32 = weights
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != baseline)
            .map(|(_, &w)| u32::from(w))
            .sum();
        let Some(rest) = u32::from(BASIS_POINTS).checked_sub(others) else {
            return Err(ChangeError::Invalid(format!(
                "non-baseline weights sum to {}%, more than 100",
                crate::routing::fmt_percent_u32(others)
            )));
        };
        let rest = rest as u16; // <= 10000
        if let Some(&b) = requested.get(names[baseline]) {
            if b != rest {
                return Err(ChangeError::Invalid(format!(
                    "weights must sum to 100: baseline {:?} would need {}%, got {}%",
                    names[baseline],
                    fmt_percent(rest),
                    fmt_percent(b)
                )));
            }
        }
        weights[baseline] = rest;
        Ok(self.store_weights(&mut inner, weights))
    }

    /// Makes a complete, validated table the admin override and publishes it.
    fn store_weights(&self, inner: &mut Inner, weights: Vec<u16>) -> u64 {
        let config = inner.config.clone();
        let names: Vec<&str> = config.upstreams.iter().map(|u| u.name.as_str()).collect();
        let table = describe(&names, &weights);
        inner.admin = Some(AdminWeights {
            weights_bp: names.iter().map(|n| n.to_string()).zip(weights).collect(),
            file_weights_bp: by_name(&config),
            at_ms: state::now_ms(),
        });
        let generation = self.publish(inner);
        tracing::info!(weights = %table, generation, "weights set by the admin API");
        generation
    }

    /// Gives one arm 100% and every other arm 0 (default target: the only canary).
    pub fn promote(&self, upstream: Option<&str>) -> Result<u64, ChangeError> {
        let mut inner = self.lock();
        let config = inner.config.clone();
        let target = match upstream {
            Some(n) => config
                .upstreams
                .iter()
                .position(|u| u.name == n)
                .ok_or_else(|| ChangeError::Invalid(format!("unknown upstream {n:?}")))?,
            None => {
                let canaries: Vec<usize> = (0..config.upstreams.len())
                    .filter(|&i| i != config.baseline)
                    .collect();
                match canaries.as_slice() {
                    [one] => *one,
                    [] => {
                        return Err(ChangeError::Invalid(
                            "there is no canary to promote (only the baseline is configured)"
                                .into(),
                        ))
                    }
                    _ => {
                        return Err(ChangeError::Invalid(
                            "several canaries are configured; name one: {\"upstream\": NAME}"
                                .into(),
                        ))
                    }
                }
            }
        };
        let name = &config.upstreams[target].name;
        if let Some(trip) = inner.tripped.get(name) {
            return Err(tripped_error(name, trip));
        }
        let mut weights = vec![0; config.upstreams.len()];
        weights[target] = BASIS_POINTS;
        Ok(self.store_weights(&mut inner, weights))
    }

    /// Trips every non-baseline arm (reason `manual`).
    pub fn rollback_all(&self) -> u64 {
        let mut inner = self.lock();
        let config = inner.config.clone();
        let mut newly = Vec::new();
        for (i, u) in config.upstreams.iter().enumerate() {
            if i != config.baseline && !inner.tripped.contains_key(&u.name) {
                inner.tripped.insert(
                    u.name.clone(),
                    Trip {
                        reason: "manual".into(),
                        detail: "POST /rollback".into(),
                        at_ms: state::now_ms(),
                        url: u.url_text(),
                    },
                );
                newly.push(u.name.clone());
            }
        }
        for name in &newly {
            self.metrics.rollback(name, "manual");
        }
        let generation = self.publish(&mut inner);
        tracing::warn!(arms = %newly.join(","), generation, "manual rollback: arms tripped, their users go to the baseline");
        generation
    }

    /// Trips one arm (the rollback circuit). Returns false when it was already tripped, is the
    /// baseline, or is no longer configured.
    pub fn trip(&self, name: &str, reason: &'static str, detail: String) -> bool {
        let mut inner = self.lock();
        let config = inner.config.clone();
        let Some(i) = config.upstreams.iter().position(|u| u.name == name) else {
            return false;
        };
        if i == config.baseline || inner.tripped.contains_key(name) {
            return false;
        }
        tracing::warn!(upstream = %name, reason, detail = %detail, "rollback circuit tripped: the arm's users go to the baseline");
        inner.tripped.insert(
            name.to_owned(),
            Trip {
                reason: reason.into(),
                detail,
                at_ms: state::now_ms(),
                url: config.upstreams[i].url_text(),
            },
        );
        self.metrics.rollback(name, reason);
        self.publish(&mut inner);
        true
    }

    /// Clears every trip; weights return to the configured/admin table.
    pub fn reset(&self) -> (u64, Vec<String>) {
        let mut inner = self.lock();
        let cleared: Vec<String> = std::mem::take(&mut inner.tripped).into_keys().collect();
        for name in &cleared {
            inner.bump_epoch(name);
        }
        let generation = self.publish(&mut inner);
        tracing::info!(cleared = %cleared.join(","), generation, "tripped arms reset");
        (generation, cleared)
    }
}

fn tripped_error(name: &str, trip: &Trip) -> ChangeError {
    ChangeError::Tripped(format!(
        "upstream {name:?} is tripped ({}: {}); POST /reset first",
        trip.reason, trip.detail
    ))
}

fn restore(path: &std::path::Path) -> State {
    match state::load(path) {
        Ok(Some(s)) => {
            tracing::info!(path = %path.display(), admin_override = s.admin_weights.is_some(), tripped = s.tripped.len(), "state restored");
            s
        }
        Ok(None) => State::default(),
        Err(e) => {
            match state::quarantine(path) {
                Ok(aside) => {
                    tracing::error!(error = %e, moved_to = %aside.display(), "state file unusable; moved aside, serving the config file's weights")
                }
                Err(m) => {
                    tracing::error!(error = %e, move_error = %m, "state file unusable and cannot be moved aside; serving the config file's weights")
                }
            }
            State::default()
        }
    }
}

fn by_name(config: &Config) -> BTreeMap<String, u16> {
    config
        .upstreams
        .iter()
        .map(|u| (u.name.clone(), u.weight_bp))
        .collect()
}

/// Applies the precedence rules after the config changed (or at start, `old = None`): a change
/// of the file's weights replaces an admin override; a trip survives unless the arm's URL
/// changed or the arm is gone.
fn reconcile(inner: &mut Inner, old: Option<&Config>) {
    let config = inner.config.clone();
    let file = by_name(&config);
    if let Some(admin) = &inner.admin {
        let file_changed = match old {
            Some(old) => by_name(old) != file,
            None => admin.file_weights_bp != file,
        };
        let names_match = admin.weights_bp.keys().eq(file.keys());
        if file_changed || !names_match {
            tracing::info!("config file weights changed; they replace the admin override");
            inner.admin = None;
        }
    }
    inner.tripped.retain(|name, trip| {
        let keep = config
            .upstreams
            .iter()
            .enumerate()
            .any(|(i, u)| u.name == *name && i != config.baseline && u.url_text() == trip.url);
        if !keep {
            tracing::info!(upstream = %name, "trip cleared: the arm's url changed or it is no longer a canary");
        }
        keep
    });
}

/// Configured weights (admin override, else file) in config order.
fn configured(inner: &Inner) -> (Vec<u16>, WeightSource) {
    match &inner.admin {
        Some(a) => (
            inner
                .config
                .upstreams
                .iter()
                .map(|u| a.weights_bp.get(&u.name).copied().unwrap_or(0))
                .collect(),
            WeightSource::Admin,
        ),
        None => (inner.config.weights_bp(), WeightSource::File),
    }
}

fn effective(inner: &Inner) -> Vec<u16> {
    let (mut w, _) = configured(inner);
    let baseline = inner.config.baseline;
    for (i, u) in inner.config.upstreams.iter().enumerate() {
        if i != baseline && inner.tripped.contains_key(&u.name) {
            w[baseline] += w[i];
            w[i] = 0;
        }
    }
    w
}

/// `stable=90,canary=10`.
pub fn describe(names: &[&str], weights: &[u16]) -> String {
    names
        .iter()
        .zip(weights)
        .map(|(n, &w)| format!("{n}={}", fmt_percent(w)))
        .collect::<Vec<_>>()
        .join(",")
}

fn publish_gauges(snap: &Snapshot) {
    for (arm, &w) in snap.arms.iter().zip(snap.table.weights()) {
        arm.metrics.set_state(w, arm.tripped);
    }
}

/// Arms for `config`, carrying over the pools of `old` arms whose upstream settings are
/// unchanged.
fn build_arms(config: &Config, old: &[Arm], metrics: &Metrics) -> Result<Vec<Arm>, ConfigErrors> {
    let mut errors = Vec::new();
    let mut arms = Vec::with_capacity(config.upstreams.len());
    for (i, u) in config.upstreams.iter().enumerate() {
        let key = UpstreamKey::of(u);
        let upstream = match old.iter().find(|a| *a.upstream.key() == key) {
            Some(a) => a.upstream.clone(),
            None => match crate::tls::client_config(u) {
                Ok(tls) => Arc::new(Upstream::new(u, tls)),
                Err(e) => {
                    errors.push(ConfigError {
                        path: format!("upstream[{i}].tls"),
                        line: None,
                        message: e.to_string(),
                    });
                    continue;
                }
            },
        };
        let name: Arc<str> = u.name.as_str().into();
        arms.push(Arm {
            // Names were validated to be a safe header-value charset.
            header_value: HeaderValue::from_str(&u.name)
                .unwrap_or_else(|_| HeaderValue::from_static("invalid")),
            upstream,
            metrics: metrics.arm(&name),
            tripped: false,
            window_epoch: 0,
            name,
        });
    }
    if errors.is_empty() {
        Ok(arms)
    } else {
        Err(ConfigErrors(errors))
    }
}

fn build_snapshot(generation: u64, inner: &Inner) -> Snapshot {
    let config = &inner.config;
    let arms = inner
        .arms
        .iter()
        .map(|a| Arm {
            tripped: inner.tripped.contains_key(&*a.name),
            window_epoch: inner.epochs.get(&*a.name).copied().unwrap_or(0),
            ..a.clone()
        })
        .collect();
    Snapshot {
        generation,
        router: config.router(),
        // Effective weights always sum to 10000: trips move weight to the baseline, and admin
        // tables are checked before they are stored.
        table: WeightTable::new(effective(inner), config.baseline)
            .expect("effective weights sum to 100%"),
        arms,
        response_header: config.routing.response_header.clone(),
        request_timeout: config.listen.request_timeout,
        access_log: config.listen.access_log,
        config: config.clone(),
    }
}
