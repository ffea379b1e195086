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
use crate::observe::{ResponseStats, ShadowPath, ShadowStats};
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
    /// Shadow copies, when `[shadow]` is configured.
    pub shadow: Option<Arc<ShadowPath>>,
    /// Response analysis, when `[analysis]` is configured.
    pub responses: Option<Arc<ResponseStats>>,
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
    /// The progressive rollout.
    Rollout,
}

impl WeightSource {
    /// `"file"` or `"admin"`.
    pub fn as_str(self) -> &'static str {
        match self {
            WeightSource::File => "file",
            WeightSource::Admin => "admin",
            WeightSource::Rollout => "rollout",
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
    /// Arms warming up.
    pub warming: BTreeMap<String, Warming>,
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
    /// The rollout's persisted state (opaque here).
    rollout: Option<serde_json::Value>,
    /// Shadowing for the running config.
    shadow: Option<Arc<ShadowPath>>,
    /// Arms warming up after their url changed (`[[upstream]] warmup`), by name.
    warming: BTreeMap<String, Warming>,
}

/// A new build's slow start: the warmup requests, then the ramp of its effective weight from
/// a tenth of its weight to all of it.
#[derive(Debug, Clone)]
pub struct Warming {
    /// The url being warmed.
    pub url: String,
    /// The ramp's length.
    pub duration: Duration,
    /// Warmup requests to send first (path, count), until they are sent.
    pub requests: Option<(String, u32)>,
    /// Whether a task is sending them.
    pub sending: bool,
    /// Of the warmup requests: sent, and failed (no answer or a 5xx).
    pub sent: (u32, u32),
    /// When the ramp started (after the warmup requests).
    pub ramp_from: Option<tokio::time::Instant>,
}

impl Warming {
    /// The share of the arm's weight in force at `now`: 0 while the warmup requests go,
    /// then from 0.1 to 1 over the ramp.
    pub fn factor(&self, now: tokio::time::Instant) -> f64 {
        match self.ramp_from {
            None => 0.0,
            Some(from) => {
                let t = now.saturating_duration_since(from).as_secs_f64();
                (0.1 + 0.9 * t / self.duration.as_secs_f64().max(1e-9)).min(1.0)
            }
        }
    }

    /// Whether the ramp is over at `now`.
    pub fn done(&self, now: tokio::time::Instant) -> bool {
        self.ramp_from
            .is_some_and(|from| now.saturating_duration_since(from) >= self.duration)
    }

    /// `weight` ramped at `now`, rounded down (the ramp never overshoots and never goes
    /// back).
    fn ramp(&self, weight: u16, now: tokio::time::Instant) -> u16 {
        if self.done(now) {
            return weight;
        }
        (f64::from(weight) * self.factor(now)).floor() as u16
    }
}

/// A warmup to send: the arm, its pool, the request path and count.
#[derive(Debug, Clone)]
pub struct WarmupJob {
    /// The arm's name.
    pub name: String,
    /// Its url (the job stops if it changes).
    pub url: String,
    /// Where the requests go.
    pub upstream: Arc<Upstream>,
    /// Path and query.
    pub path: String,
    /// How many.
    pub count: u32,
    /// Deadline of each.
    pub timeout: Duration,
}

impl Inner {
    fn bump_epoch(&mut self, arm: &str) {
        *self.epochs.entry(arm.to_owned()).or_default() += 1;
    }
}

/// The effective weights of one snapshot, by arm name.
pub type Weights = Arc<[(Arc<str>, u16)]>;

/// How many published tables [`Control::weights_at`] remembers: most outcomes are counted
/// within milliseconds of their routing, but a long gRPC stream's only when it ends, and a
/// warmup ramp publishes up to a hundred tables. An outcome whose table is forgotten is not
/// counted by the sample-ratio guard (a few hundred KiB at most).
const TABLE_HISTORY: usize = 1024;

/// Owner of the published snapshot.
pub struct Control {
    /// Wakes the warmup driver when an arm starts warming.
    warmup_wake: tokio::sync::Notify,
    /// The effective weights of the last [`TABLE_HISTORY`] snapshots, oldest first.
    tables: Mutex<std::collections::VecDeque<(u64, Weights)>>,
    /// Shadow results and response distributions, kept across reloads.
    observed: (Arc<ShadowStats>, Arc<ResponseStats>),
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
        let observed = (
            Arc::new(ShadowStats::default()),
            Arc::new(ResponseStats::new(metrics.clone())),
        );
        let shadow = build_shadow(&config, &observed, &metrics)?;
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
            rollout: restored.rollout,
            shadow,
            warming: BTreeMap::new(),
        };
        // The file may have changed while canaryd was down: apply the same rules as a reload.
        reconcile(&mut inner, None);
        let snap = build_snapshot(1, &inner, &observed);
        publish_gauges(&snap);
        let tables = Mutex::new(std::collections::VecDeque::from([(1, weights_of(&snap))]));
        let control = Arc::new(Control {
            warmup_wake: tokio::sync::Notify::new(),
            tables,
            observed,
            current: ArcSwap::from_pointee(snap),
            inner: Mutex::new(inner),
            metrics,
            state_path,
        });
        control.persist(&control.lock());
        Ok(control)
    }

    /// Waits until an arm starts warming (for the warmup driver).
    pub async fn warmup_started(&self) {
        self.warmup_wake.notified().await;
    }

    /// The warmups whose requests are to be sent now; each is handed out once.
    pub fn warmup_jobs(&self) -> Vec<WarmupJob> {
        let mut inner = self.lock();
        let timeout = inner.config.listen.request_timeout;
        let arms = inner.arms.clone();
        let mut jobs = Vec::new();
        for (name, w) in inner.warming.iter_mut() {
            let (Some((path, count)), false) = (&w.requests, w.sending) else {
                continue;
            };
            let Some(arm) = arms.iter().find(|a| *a.name == **name) else {
                continue;
            };
            jobs.push(WarmupJob {
                name: name.clone(),
                url: w.url.clone(),
                upstream: arm.upstream.clone(),
                path: path.clone(),
                count: *count,
                timeout,
            });
            w.sending = true;
        }
        jobs
    }

    /// The warmup requests of `name` at `url` were sent (`failed` of `sent` got no answer or
    /// a 5xx): its ramp starts now.
    pub fn warmup_sent(&self, name: &str, url: &str, sent: u32, failed: u32) {
        let mut inner = self.lock();
        let Some(w) = inner.warming.get_mut(name).filter(|w| w.url == url) else {
            return;
        };
        w.requests = None;
        w.sending = false;
        w.sent = (sent, failed);
        w.ramp_from = Some(tokio::time::Instant::now());
        let ramp = humantime::format_duration(w.duration).to_string();
        if failed > 0 {
            tracing::warn!(upstream = %name, sent, failed, %ramp, "warmup requests failed; the ramp starts anyway and the analysis judges the build");
        } else {
            tracing::info!(upstream = %name, sent, %ramp, "warmup requests answered; ramping the weight");
        }
        self.publish_only(&mut inner);
    }

    /// Moves the warmup ramps on: publishes a snapshot when an effective weight changed, ends
    /// the ramps that are over. Returns when to look again, `None` when nothing warms.
    pub fn warmup_tick(&self) -> Option<Duration> {
        let mut inner = self.lock();
        if inner.warming.is_empty() {
            return None;
        }
        let now = tokio::time::Instant::now();
        let done: Vec<String> = inner
            .warming
            .iter()
            .filter(|(_, w)| w.done(now))
            .map(|(n, _)| n.clone())
            .collect();
        for name in &done {
            inner.warming.remove(name);
            tracing::info!(upstream = %name, "warmup done: the arm has its whole weight");
        }
        if effective(&inner) != self.current.load().table.weights() {
            self.publish_only(&mut inner);
        }
        inner
            .warming
            .values()
            .map(|w| (w.duration / 100).clamp(Duration::from_millis(100), Duration::from_secs(5)))
            .min()
    }

    /// The arms warming up now, by name.
    pub fn warming(&self) -> BTreeMap<String, Warming> {
        self.lock().warming.clone()
    }

    /// The current snapshot; hold it for the whole request.
    #[inline]
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// The effective weights of snapshot `generation`, if it is one of the last 1,024
    /// published.
    pub fn weights_at(&self, generation: u64) -> Option<Weights> {
        let tables = self.tables.lock().unwrap_or_else(|p| p.into_inner());
        tables
            .iter()
            .rev()
            .find(|(g, _)| *g == generation)
            .map(|(_, w)| w.clone())
    }

    /// The metrics registry.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Shadow results since start.
    pub fn shadow_stats(&self) -> &Arc<ShadowStats> {
        &self.observed.0
    }

    /// Response distributions since start (or since the pointers changed).
    pub fn responses(&self) -> &Arc<ResponseStats> {
        &self.observed.1
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Writers compute new values first and assign them last, so a panic while holding the
        // lock cannot leave Inner half-written.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Rebuilds and swaps the snapshot after `inner` changed, then persists the state.
    fn publish(&self, inner: &mut Inner) -> u64 {
        let generation = self.publish_only(inner);
        self.persist(inner);
        generation
    }

    /// Rebuilds and swaps the snapshot: for changes the state file does not keep (a warmup
    /// ramp's steps).
    fn publish_only(&self, inner: &mut Inner) -> u64 {
        inner.generation += 1;
        let snap = build_snapshot(inner.generation, inner, &self.observed);
        publish_gauges(&snap);
        {
            let mut tables = self.tables.lock().unwrap_or_else(|p| p.into_inner());
            if tables.len() == TABLE_HISTORY {
                tables.pop_front();
            }
            tables.push_back((snap.generation, weights_of(&snap)));
        }
        self.current.store(Arc::new(snap));
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
            rollout: inner.rollout.clone(),
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
        let shadow = build_shadow(&config, &self.observed, &self.metrics)?;
        let old = inner.config.clone();
        let restart_only = old.restart_only_changes(&config);
        // Listener settings keep running with the values they were bound with.
        config.listen.addr = old.listen.addr;
        config.listen.max_connections = old.listen.max_connections;
        config.listen.max_header_bytes = old.listen.max_header_bytes;
        config.listen.http2_max_concurrent_streams = old.listen.http2_max_concurrent_streams;
        config.listen.header_read_timeout = old.listen.header_read_timeout;
        config.admin.addr = old.admin.addr;
        config.listen.tls = old.listen.tls.clone();
        config.listen.tls_handshake_timeout = old.listen.tls_handshake_timeout;
        let now = tokio::time::Instant::now();
        let mut warm = false;
        for (i, u) in config.upstreams.iter().enumerate() {
            let moved = old
                .upstreams
                .iter()
                .any(|o| o.name == u.name && o.url != u.url);
            if moved {
                inner.bump_epoch(&u.name);
                inner.warming.remove(&u.name);
                if let (Some(w), false) = (&u.warmup, i == config.baseline) {
                    tracing::info!(upstream = %u.name, url = %u.url_text(), ramp = %humantime::format_duration(w.duration), requests = w.requests, "new build: warming up before it takes its weight");
                    let requests = w.path.clone().filter(|_| w.requests > 0);
                    inner.warming.insert(
                        u.name.clone(),
                        Warming {
                            url: u.url_text(),
                            duration: w.duration,
                            ramp_from: requests.is_none().then_some(now),
                            requests: requests.map(|p| (p, w.requests)),
                            sending: false,
                            sent: (0, 0),
                        },
                    );
                    warm = true;
                }
            }
        }
        // An arm whose warmup was taken out of the config, that is gone or became the
        // baseline takes its whole weight now.
        inner.warming.retain(|name, _| {
            config
                .upstreams
                .iter()
                .enumerate()
                .any(|(i, u)| u.name == *name && u.warmup.is_some() && i != config.baseline)
        });
        inner.config = Arc::new(config);
        inner.arms = arms;
        inner.shadow = shadow;
        reconcile(&mut inner, Some(&old));
        let generation = self.publish(&mut inner);
        if warm {
            self.warmup_wake.notify_one();
        }
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
            warming: inner.warming.clone(),
        }
    }

    /// Sets weights from the admin API. Unnamed non-baseline arms keep their current weight;
    /// the baseline gets the remainder (if named, it must equal the remainder).
    pub fn set_weights(&self, requested: &BTreeMap<String, u16>) -> Result<u64, ChangeError> {
        let mut inner = self.lock();
        let known = |n: &String| inner.config.upstreams.iter().any(|u| u.name == *n);
        // Refusals in order: an empty table or an unknown name, a tripped arm, the sums.
        if !requested.is_empty() && requested.keys().all(known) {
            if let Some((name, trip)) = requested
                .keys()
                .filter_map(|n| inner.tripped.get_key_value(n))
                .next()
            {
                return Err(tripped_error(name, trip));
            }
        }
        let weights = completed(&inner, requested)?;
        Ok(self.store_weights(&mut inner, weights, false))
    }

    /// The complete table `PUT /weights` would set for `requested` (unnamed non-baseline arms
    /// keep their weight, the baseline gets the rest), without setting it; trips are not
    /// applied.
    pub fn proposed_weights(
        &self,
        requested: &BTreeMap<String, u16>,
    ) -> Result<Vec<u16>, ChangeError> {
        completed(&self.lock(), requested)
    }

    /// Sets the weight of `arm` for the progressive rollout: the baseline gets the rest,
    /// other arms keep theirs. `GET /weights` reports the table's source as `rollout`.
    pub fn set_rollout_weight(&self, arm: &str, weight_bp: u16) -> Result<u64, ChangeError> {
        let mut inner = self.lock();
        let config = inner.config.clone();
        let Some(i) = config.upstreams.iter().position(|u| u.name == arm) else {
            return Err(ChangeError::Invalid(format!("unknown upstream {arm:?}")));
        };
        if i == config.baseline {
            return Err(ChangeError::Invalid(format!(
                "{arm:?} is the baseline; a rollout releases another arm"
            )));
        }
        if let Some(trip) = inner.tripped.get(arm) {
            return Err(tripped_error(arm, trip));
        }
        let (mut weights, _) = configured(&inner);
        weights[i] = weight_bp.min(BASIS_POINTS);
        let others: u32 = weights
            .iter()
            .enumerate()
            .filter(|&(j, _)| j != config.baseline)
            .map(|(_, &w)| u32::from(w))
            .sum();
        let Some(rest) = u32::from(BASIS_POINTS).checked_sub(others) else {
            return Err(ChangeError::Invalid(format!(
                "{arm:?} at {}% leaves the other arms more than 100%",
                fmt_percent(weight_bp)
            )));
        };
        weights[config.baseline] = rest as u16; // <= 10000
        Ok(self.store_weights(&mut inner, weights, true))
    }

    /// Writes the rollout's state into the state file (with the rest of the state).
    pub fn save_rollout(&self, rollout: Option<serde_json::Value>) {
        let mut inner = self.lock();
        if inner.rollout != rollout {
            inner.rollout = rollout;
            self.persist(&inner);
        }
    }

    /// The rollout's state as last saved (restored from the state file at start).
    pub fn saved_rollout(&self) -> Option<serde_json::Value> {
        self.lock().rollout.clone()
    }

    /// Makes a complete, validated table the admin override and publishes it.
    fn store_weights(&self, inner: &mut Inner, weights: Vec<u16>, by_rollout: bool) -> u64 {
        let config = inner.config.clone();
        let names: Vec<&str> = config.upstreams.iter().map(|u| u.name.as_str()).collect();
        let table = describe(&names, &weights);
        inner.admin = Some(AdminWeights {
            weights_bp: names.iter().map(|n| n.to_string()).zip(weights).collect(),
            file_weights_bp: by_name(&config),
            at_ms: state::now_ms(),
            by_rollout,
        });
        let generation = self.publish(inner);
        if by_rollout {
            tracing::info!(weights = %table, generation, "weights set by the rollout");
        } else {
            tracing::info!(weights = %table, generation, "weights set by the admin API");
        }
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
        Ok(self.store_weights(&mut inner, weights, false))
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

/// Completes a partial admin table: unnamed non-baseline arms keep their configured weight,
/// the baseline gets the remainder (if named, it must equal the remainder).
fn completed(inner: &Inner, requested: &BTreeMap<String, u16>) -> Result<Vec<u16>, ChangeError> {
    let (weights, _) = configured(inner);
    complete_weights(&inner.config, weights, requested)
}

/// Completes a partial table against `weights` (per arm of `config`): named arms take the
/// requested weight, unnamed non-baseline arms keep theirs, the baseline gets the remainder
/// (if named, it must equal it).
pub fn complete_weights(
    config: &Config,
    mut weights: Vec<u16>,
    requested: &BTreeMap<String, u16>,
) -> Result<Vec<u16>, ChangeError> {
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
    Ok(weights)
}

fn tripped_error(name: &str, trip: &Trip) -> ChangeError {
    ChangeError::Tripped(format!(
        "upstream {name:?} is tripped ({}: {}); POST /reset first",
        trip.reason, trip.detail
    ))
}

fn restore(path: &std::path::Path) -> State {
    let loaded = state::load(path)
        .map_err(|e| e.to_string())
        .and_then(|s| match s {
            // A table that parses but cannot be a table of weights is as unusable as a file that
            // does not parse.
            Some(s)
                if s.admin_weights.as_ref().is_some_and(|a| {
                    a.weights_bp.values().map(|&w| u32::from(w)).sum::<u32>()
                        != u32::from(BASIS_POINTS)
                }) =>
            {
                Err("the admin weights do not sum to 100%".to_owned())
            }
            s => Ok(s),
        });
    match loaded {
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
    let source = |a: &AdminWeights| {
        if a.by_rollout {
            WeightSource::Rollout
        } else {
            WeightSource::Admin
        }
    };
    match &inner.admin {
        Some(a) => (
            inner
                .config
                .upstreams
                .iter()
                .map(|u| a.weights_bp.get(&u.name).copied().unwrap_or(0))
                .collect(),
            source(a),
        ),
        None => (inner.config.weights_bp(), WeightSource::File),
    }
}

fn effective(inner: &Inner) -> Vec<u16> {
    let (mut w, _) = configured(inner);
    let baseline = inner.config.baseline;
    let now = tokio::time::Instant::now();
    for (i, u) in inner.config.upstreams.iter().enumerate() {
        if let Some(warming) = inner.warming.get(&u.name).filter(|_| i != baseline) {
            let ramped = warming.ramp(w[i], now);
            w[baseline] += w[i] - ramped;
            w[i] = ramped;
        }
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

fn weights_of(snap: &Snapshot) -> Weights {
    snap.arms
        .iter()
        .zip(snap.table.weights())
        .map(|(a, &w)| (a.name.clone(), w))
        .collect()
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

/// Shadowing for `config`, with a client of its own for the shadow upstream.
fn build_shadow(
    config: &Config,
    observed: &(Arc<ShadowStats>, Arc<ResponseStats>),
    metrics: &Arc<Metrics>,
) -> Result<Option<Arc<ShadowPath>>, ConfigErrors> {
    if let Some(a) = &config.response_analysis {
        observed.1.configure(a);
    }
    let Some(sh) = &config.shadow else {
        return Ok(None);
    };
    let err = |message: String| {
        ConfigErrors(vec![ConfigError {
            path: "shadow".into(),
            line: None,
            message,
        }])
    };
    let Some(u) = config.upstreams.iter().find(|u| u.name == sh.upstream) else {
        return Err(err(format!("unknown upstream {:?}", sh.upstream)));
    };
    let tls = crate::tls::client_config(u).map_err(|e| err(e.to_string()))?;
    let path = ShadowPath::new(
        sh.clone(),
        Arc::new(Upstream::new(u, tls)),
        observed.0.clone(),
        metrics.clone(),
        config
            .response_analysis
            .as_ref()
            .map(|_| observed.1.clone()),
        config.listen.request_timeout,
    )
    .map_err(err)?;
    Ok(Some(Arc::new(path)))
}

fn build_snapshot(
    generation: u64,
    inner: &Inner,
    observed: &(Arc<ShadowStats>, Arc<ResponseStats>),
) -> Snapshot {
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
        shadow: inner.shadow.clone(),
        responses: config
            .response_analysis
            .as_ref()
            .map(|_| observed.1.clone()),
        config: config.clone(),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// `(name, url, weight in percent)`; the first arm is the baseline unless one is named.
    type Spec = &'static [(&'static str, &'static str, &'static str)];

    const TWO: Spec = &[
        ("stable", "http://127.0.0.1:9000", "90"),
        ("canary", "http://127.0.0.1:9001", "10"),
    ];
    const TWO_80_20: Spec = &[
        ("stable", "http://127.0.0.1:9000", "80"),
        ("canary", "http://127.0.0.1:9001", "20"),
    ];
    /// TWO with the canary's url spelled with a trailing slash: the same url.
    const TWO_SLASH: Spec = &[
        ("stable", "http://127.0.0.1:9000", "90"),
        ("canary", "http://127.0.0.1:9001/", "10"),
    ];
    /// TWO with a new canary build at another address.
    const TWO_NEW_URL: Spec = &[
        ("stable", "http://127.0.0.1:9000", "90"),
        ("canary", "http://127.0.0.1:9002", "10"),
    ];
    const TWO_PLUS_SHADOW: Spec = &[
        ("stable", "http://127.0.0.1:9000", "90"),
        ("canary", "http://127.0.0.1:9001", "10"),
        ("shadow", "http://127.0.0.1:9003", "0"),
    ];
    const STABLE_ONLY: Spec = &[("stable", "http://127.0.0.1:9000", "100")];
    const THREE: Spec = &[
        ("stable", "http://127.0.0.1:9000", "80"),
        ("a", "http://127.0.0.1:9001", "10"),
        ("b", "http://127.0.0.1:9002", "10"),
    ];

    fn toml(arms: Spec, baseline: Option<&str>, state: Option<&Path>) -> String {
        let mut t = String::new();
        if let Some(b) = baseline {
            t.push_str(&format!("[routing]\nbaseline = {b:?}\n\n"));
        }
        if let Some(p) = state {
            t.push_str(&format!(
                "[state]\nfile = {:?}\n\n",
                p.display().to_string()
            ));
        }
        for (name, url, weight) in arms {
            t.push_str(&format!(
                "[[upstream]]\nname = {name:?}\nurl = {url:?}\nweight = {weight}\n\n"
            ));
        }
        t
    }

    fn config(arms: Spec, baseline: Option<&str>, state: Option<&Path>) -> Config {
        let text = toml(arms, baseline, state);
        Config::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    fn control(arms: Spec, state: Option<&Path>) -> Arc<Control> {
        Control::new(config(arms, None, state), Metrics::new()).expect("control")
    }

    /// A temporary directory for state files, in memory where possible: every published
    /// change fsyncs the state file and its directory, which costs milliseconds on a disk.
    fn scratch_dir() -> tempfile::TempDir {
        let shm = Path::new("/dev/shm");
        if shm.is_dir() {
            if let Ok(d) = tempfile::tempdir_in(shm) {
                return d;
            }
        }
        tempfile::tempdir().expect("tempdir")
    }

    fn names(v: &View) -> Vec<&str> {
        v.tripped.keys().map(String::as_str).collect()
    }

    /// What a refused call must leave exactly as it was.
    fn observable(c: &Control) -> (u64, Vec<u16>, Vec<u16>, WeightSource, Vec<String>, Vec<u16>) {
        let v = c.view();
        (
            v.generation,
            v.configured,
            v.effective,
            v.source,
            v.tripped.into_keys().collect(),
            v.file,
        )
    }

    /// Asserts the view, and that the published snapshot and the state file agree with it.
    #[track_caller]
    fn check(
        case: &str,
        c: &Control,
        configured: &[u16],
        effective: &[u16],
        source: WeightSource,
        tripped: &[&str],
    ) {
        let v = c.view();
        let snap = c.snapshot();
        let what = format!("case {case:?}: {v:#?}");
        assert_eq!(v.configured, configured, "configured: {what}");
        assert_eq!(v.effective, effective, "effective: {what}");
        assert_eq!(v.source, source, "source: {what}");
        assert_eq!(names(&v), tripped, "tripped: {what}");
        assert_eq!(v.file, v.config.weights_bp(), "file: {what}");
        assert_eq!(snap.generation, v.generation, "{what}");
        assert_eq!(snap.table.weights(), effective, "{what}");
        assert_eq!(snap.table.baseline(), v.config.baseline, "{what}");
        let arms: Vec<(&str, bool)> = snap.arms.iter().map(|a| (&*a.name, a.tripped)).collect();
        let want: Vec<(&str, bool)> = v
            .config
            .upstreams
            .iter()
            .map(|u| (u.name.as_str(), tripped.contains(&u.name.as_str())))
            .collect();
        assert_eq!(arms, want, "snapshot arms: {what}");
        if let Some(path) = &v.config.state.file {
            let saved = state::load(path).expect("readable").expect("written");
            assert_eq!(
                saved.tripped.keys().map(String::as_str).collect::<Vec<_>>(),
                tripped,
                "persisted trips: {what}"
            );
            match (&saved.admin_weights, source) {
                (None, WeightSource::File) => {}
                (Some(a), WeightSource::Admin) => {
                    let by_name: Vec<u16> = v
                        .config
                        .upstreams
                        .iter()
                        .map(|u| a.weights_bp[&u.name])
                        .collect();
                    assert_eq!(by_name, configured, "persisted admin weights: {what}");
                }
                (saved, source) => {
                    panic!("persisted {saved:?} while the source is {source:?}: {what}")
                }
            }
        }
    }

    #[derive(Debug, Clone, Copy)]
    enum Step {
        /// A reload with these arms, the first the baseline.
        Reload(Spec),
        /// A reload with these arms and this baseline.
        ReloadBaseline(Spec, &'static str),
        /// `PUT /weights` (basis points).
        Set(&'static [(&'static str, u16)]),
        /// `POST /promote`.
        Promote(Option<&'static str>),
        /// `POST /rollback`.
        Rollback,
        /// The rollback circuit trips an arm.
        Trip(&'static str),
        /// `POST /reset`.
        Reset,
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Outcome {
        /// A new snapshot, generation + 1.
        Published,
        /// Nothing published (a trip that does not apply).
        Unchanged,
        /// Refused with `ChangeError::Invalid`.
        Invalid,
        /// Refused with `ChangeError::Tripped`.
        Tripped,
    }
    use Outcome::{Invalid, Published, Tripped, Unchanged};
    use Step::{Promote, Reload, ReloadBaseline, Reset, Rollback, Set, Trip};
    use WeightSource::{Admin, File};

    fn refused(e: ChangeError) -> Outcome {
        match e {
            ChangeError::Invalid(_) => Invalid,
            ChangeError::Tripped(_) => Tripped,
        }
    }

    /// A `PUT /weights` body.
    fn table(w: &[(&str, u16)]) -> BTreeMap<String, u16> {
        w.iter().map(|&(n, bp)| (n.to_owned(), bp)).collect()
    }

    /// Runs `step`, returning what happened and the generation it reported, if any.
    fn run(c: &Control, step: Step, state: Option<&Path>) -> (Outcome, Option<u64>) {
        let change = |r: Result<u64, ChangeError>| match r {
            Ok(g) => (Published, Some(g)),
            Err(e) => (refused(e), None),
        };
        match step {
            Reload(arms) => {
                let (g, _) = c.apply_config(config(arms, None, state)).expect("reload");
                (Published, Some(g))
            }
            ReloadBaseline(arms, b) => {
                let (g, _) = c
                    .apply_config(config(arms, Some(b), state))
                    .expect("reload");
                (Published, Some(g))
            }
            Set(w) => change(c.set_weights(&table(w))),
            Promote(target) => change(c.promote(target)),
            Rollback => (Published, Some(c.rollback_all())),
            Trip(arm) => {
                if c.trip(arm, "error_rate", "12 errors in 20 requests".into()) {
                    (Published, None)
                } else {
                    (Unchanged, None)
                }
            }
            Reset => (Published, Some(c.reset().0)),
        }
    }

    struct Case {
        name: &'static str,
        start: Spec,
        steps: &'static [(Step, Outcome)],
        configured: &'static [u16],
        effective: &'static [u16],
        source: WeightSource,
        tripped: &'static [&'static str],
    }

    const CASES: &[Case] = &[
        Case {
            name: "the file's weights apply",
            start: TWO,
            steps: &[],
            configured: &[9000, 1000],
            effective: &[9000, 1000],
            source: File,
            tripped: &[],
        },
        Case {
            name: "an admin table replaces the file's weights",
            start: TWO,
            steps: &[(Set(&[("canary", 2500)]), Published)],
            configured: &[7500, 2500],
            effective: &[7500, 2500],
            source: Admin,
            tripped: &[],
        },
        Case {
            name: "a reload that changes the file's weights replaces the admin table",
            start: TWO,
            steps: &[
                (Set(&[("canary", 2500)]), Published),
                (Reload(TWO_80_20), Published),
            ],
            configured: &[8000, 2000],
            effective: &[8000, 2000],
            source: File,
            tripped: &[],
        },
        Case {
            name: "reloads that leave the file's weights untouched keep the admin table",
            start: TWO,
            steps: &[
                (Set(&[("canary", 2500)]), Published),
                (Reload(TWO), Published),
                (Reload(TWO_NEW_URL), Published),
                (ReloadBaseline(TWO_NEW_URL, "stable"), Published),
            ],
            configured: &[7500, 2500],
            effective: &[7500, 2500],
            source: Admin,
            tripped: &[],
        },
        Case {
            name: "a reload that adds an arm replaces the admin table",
            start: TWO,
            steps: &[
                (Set(&[("canary", 2500)]), Published),
                (Reload(TWO_PLUS_SHADOW), Published),
            ],
            configured: &[9000, 1000, 0],
            effective: &[9000, 1000, 0],
            source: File,
            tripped: &[],
        },
        Case {
            name: "a tripped arm's weight goes to the baseline; its configured weight is kept",
            start: TWO,
            steps: &[(Trip("canary"), Published)],
            configured: &[9000, 1000],
            effective: &[10000, 0],
            source: File,
            tripped: &["canary"],
        },
        Case {
            name: "a trip moves the admin weight too",
            start: TWO,
            steps: &[
                (Set(&[("canary", 2500)]), Published),
                (Trip("canary"), Published),
            ],
            configured: &[7500, 2500],
            effective: &[10000, 0],
            source: Admin,
            tripped: &["canary"],
        },
        Case {
            name: "a trip survives reloads, also with the same url spelled differently",
            start: TWO,
            steps: &[
                (Trip("canary"), Published),
                (Reload(TWO), Published),
                (Reload(TWO_SLASH), Published),
            ],
            configured: &[9000, 1000],
            effective: &[10000, 0],
            source: File,
            tripped: &["canary"],
        },
        Case {
            name: "a file weight change for a tripped arm is configured, not in effect",
            start: TWO,
            steps: &[(Trip("canary"), Published), (Reload(TWO_80_20), Published)],
            configured: &[8000, 2000],
            effective: &[10000, 0],
            source: File,
            tripped: &["canary"],
        },
        Case {
            name: "the file's new weights and a surviving trip after an admin table",
            start: TWO,
            steps: &[
                (Set(&[("canary", 2500)]), Published),
                (Trip("canary"), Published),
                (Reload(TWO_80_20), Published),
            ],
            configured: &[8000, 2000],
            effective: &[10000, 0],
            source: File,
            tripped: &["canary"],
        },
        Case {
            name: "a new url for a tripped arm (a new build) clears the trip",
            start: TWO,
            steps: &[
                (Trip("canary"), Published),
                (Reload(TWO_NEW_URL), Published),
            ],
            configured: &[9000, 1000],
            effective: &[9000, 1000],
            source: File,
            tripped: &[],
        },
        Case {
            name: "a removed arm's trip is cleared",
            start: TWO,
            steps: &[
                (Trip("canary"), Published),
                (Reload(STABLE_ONLY), Published),
            ],
            configured: &[10000],
            effective: &[10000],
            source: File,
            tripped: &[],
        },
        Case {
            name: "an arm that becomes the baseline is no longer tripped",
            start: TWO,
            steps: &[
                (Trip("canary"), Published),
                (ReloadBaseline(TWO, "canary"), Published),
            ],
            configured: &[9000, 1000],
            effective: &[9000, 1000],
            source: File,
            tripped: &[],
        },
        Case {
            name: "with another baseline, the remainder goes to it and trips move weight to it",
            start: TWO,
            steps: &[
                (ReloadBaseline(TWO, "canary"), Published),
                (Set(&[("stable", 3000)]), Published),
                (Trip("stable"), Published),
                (Trip("canary"), Unchanged),
            ],
            configured: &[3000, 7000],
            effective: &[0, 10000],
            source: Admin,
            tripped: &["stable"],
        },
        Case {
            name: "reset clears trips and restores the file's table",
            start: TWO,
            steps: &[(Trip("canary"), Published), (Reset, Published)],
            configured: &[9000, 1000],
            effective: &[9000, 1000],
            source: File,
            tripped: &[],
        },
        Case {
            name: "reset restores the admin table",
            start: TWO,
            steps: &[
                (Set(&[("canary", 2500)]), Published),
                (Trip("canary"), Published),
                (Reset, Published),
            ],
            configured: &[7500, 2500],
            effective: &[7500, 2500],
            source: Admin,
            tripped: &[],
        },
        Case {
            name: "reset makes a file weight change made while tripped effective",
            start: TWO,
            steps: &[
                (Trip("canary"), Published),
                (Reload(TWO_80_20), Published),
                (Reset, Published),
            ],
            configured: &[8000, 2000],
            effective: &[8000, 2000],
            source: File,
            tripped: &[],
        },
        Case {
            name: "rollback and reset with nothing to change still publish",
            start: TWO,
            steps: &[
                (Reset, Published),
                (Rollback, Published),
                (Rollback, Published),
            ],
            configured: &[9000, 1000],
            effective: &[10000, 0],
            source: File,
            tripped: &["canary"],
        },
        Case {
            name: "promote gives the only canary 100",
            start: TWO,
            steps: &[(Promote(None), Published)],
            configured: &[0, 10000],
            effective: &[0, 10000],
            source: Admin,
            tripped: &[],
        },
        Case {
            name: "promote a named arm",
            start: THREE,
            steps: &[(Promote(Some("b")), Published)],
            configured: &[0, 0, 10000],
            effective: &[0, 0, 10000],
            source: Admin,
            tripped: &[],
        },
        Case {
            name: "promote the baseline",
            start: TWO,
            steps: &[(Promote(Some("stable")), Published)],
            configured: &[10000, 0],
            effective: &[10000, 0],
            source: Admin,
            tripped: &[],
        },
        Case {
            name: "promote needs a name among several canaries, and a known one",
            start: THREE,
            steps: &[(Promote(None), Invalid), (Promote(Some("nope")), Invalid)],
            configured: &[8000, 1000, 1000],
            effective: &[8000, 1000, 1000],
            source: File,
            tripped: &[],
        },
        Case {
            name: "promote with only a baseline is refused",
            start: STABLE_ONLY,
            steps: &[(Promote(None), Invalid)],
            configured: &[10000],
            effective: &[10000],
            source: File,
            tripped: &[],
        },
        Case {
            name: "a promoted arm that trips goes back to the baseline",
            start: TWO,
            steps: &[(Promote(None), Published), (Trip("canary"), Published)],
            configured: &[0, 10000],
            effective: &[10000, 0],
            source: Admin,
            tripped: &["canary"],
        },
        Case {
            name: "rollback trips every canary; the weight changes that name them are refused",
            start: THREE,
            steps: &[
                (Rollback, Published),
                (Set(&[("a", 500)]), Tripped),
                (Set(&[("stable", 10000), ("b", 0)]), Tripped),
                (Promote(Some("a")), Tripped),
                (Trip("b"), Unchanged),
            ],
            configured: &[8000, 1000, 1000],
            effective: &[10000, 0, 0],
            source: File,
            tripped: &["a", "b"],
        },
        Case {
            name: "an untripped arm's weight may change while another is tripped",
            start: THREE,
            steps: &[
                (Trip("b"), Published),
                (Set(&[("a", 2000), ("b", 500)]), Tripped),
                (Set(&[("a", 2000)]), Published),
                (Promote(Some("stable")), Published),
            ],
            configured: &[10000, 0, 0],
            effective: &[10000, 0, 0],
            source: Admin,
            tripped: &["b"],
        },
        Case {
            name: "unnamed canaries keep their weight; the baseline gets the remainder",
            start: THREE,
            steps: &[
                (Set(&[("a", 2500)]), Published),
                (Set(&[("b", 0)]), Published),
            ],
            configured: &[7500, 2500, 0],
            effective: &[7500, 2500, 0],
            source: Admin,
            tripped: &[],
        },
        Case {
            name: "the baseline may be named with exactly the remainder",
            start: TWO,
            steps: &[(Set(&[("stable", 7500), ("canary", 2500)]), Published)],
            configured: &[7500, 2500],
            effective: &[7500, 2500],
            source: Admin,
            tripped: &[],
        },
        Case {
            name: "invalid tables are refused and change nothing",
            start: THREE,
            steps: &[
                (Set(&[]), Invalid),
                (Set(&[("nope", 100)]), Invalid),
                (Set(&[("a", 100), ("nope", 100)]), Invalid),
                (Set(&[("a", 10001)]), Invalid),
                (Set(&[("a", 6000), ("b", 5000)]), Invalid),
                (Set(&[("stable", 8000), ("a", 2000)]), Invalid),
                (Set(&[("a", u16::MAX), ("b", u16::MAX)]), Invalid),
            ],
            configured: &[8000, 1000, 1000],
            effective: &[8000, 1000, 1000],
            source: File,
            tripped: &[],
        },
        Case {
            name: "trips that do not apply publish nothing",
            start: TWO,
            steps: &[
                (Trip("stable"), Unchanged),
                (Trip("nope"), Unchanged),
                (Trip("canary"), Published),
                (Trip("canary"), Unchanged),
            ],
            configured: &[9000, 1000],
            effective: &[10000, 0],
            source: File,
            tripped: &["canary"],
        },
    ];

    /// Runs `case` from a fresh control plane, checking every step's outcome and generation.
    fn run_case(case: &Case, state: Option<&Path>) {
        {
            let c = control(case.start, state);
            assert_eq!(c.view().generation, 1, "{}", case.name);
            for (i, &(step, want)) in case.steps.iter().enumerate() {
                let before = observable(&c);
                let snap_before = c.snapshot();
                let (got, reported) = run(&c, step, state);
                let at = format!("{}: step {i} {step:?}", case.name);
                assert_eq!(got, want, "{at}");
                let after = observable(&c);
                if got == Published {
                    assert_eq!(after.0, before.0 + 1, "{at}: generation + 1");
                    assert_eq!(c.snapshot().generation, after.0, "{at}");
                    if let Some(g) = reported {
                        assert_eq!(g, after.0, "{at}: reported generation");
                    }
                } else {
                    assert_eq!(after, before, "{at}: nothing changes");
                    assert!(
                        Arc::ptr_eq(&snap_before, &c.snapshot()),
                        "{at}: nothing published"
                    );
                }
            }
            // One generation per published change, none for the others.
            let published = case.steps.iter().filter(|s| s.1 == Published).count();
            assert_eq!(c.view().generation, 1 + published as u64, "{}", case.name);
            check(
                case.name,
                &c,
                case.configured,
                case.effective,
                case.source,
                case.tripped,
            );
        }
    }

    #[test]
    fn weight_precedence() {
        for case in CASES {
            run_case(case, None);
        }
    }

    /// The same cases with a state file: after every case the file holds exactly the admin
    /// table (or none) and the trips in force.
    #[test]
    fn weight_precedence_is_persisted() {
        for case in CASES.iter().filter(|c| !c.steps.is_empty()) {
            let dir = scratch_dir();
            run_case(case, Some(&dir.path().join("state.json")));
        }
    }

    #[test]
    fn a_refused_reload_changes_nothing() {
        let c = control(TWO, None);
        c.set_weights(&table(&[("canary", 2500)])).expect("set");
        assert!(c.trip("canary", "latency", "p99 +80ms".into()));
        let before = observable(&c);
        let snap = c.snapshot();

        // Invalid text: every error recorded as the last reload, nothing published.
        let bad = toml(TWO_80_20, None, None).replace("weight = 20", "weight = 20.001");
        reload::reload(Path::new("canaryd.toml"), &bad, &c, "test");
        assert_eq!(observable(&c), before);
        assert!(Arc::ptr_eq(&snap, &c.snapshot()));
        let status = c.view().last_reload.expect("recorded");
        let err = status.result.expect_err("rejected");
        assert!(err.contains("upstream[1].weight (line 9)"), "{err}");

        // An upstream whose TLS files cannot be loaded refuses the whole config.
        let tls = toml(TWO_80_20, None, None).replace(
            "url = \"http://127.0.0.1:9001\"",
            "url = \"https://127.0.0.1:9001\"\nca_file = \"/nonexistent/ca.pem\"",
        );
        let e = c
            .apply_config(Config::parse(&tls).expect("parses"))
            .expect_err("unloadable CA");
        assert_eq!(e.0.len(), 1, "{e}");
        assert_eq!(e.0[0].path, "upstream[1].tls");
        assert_eq!(observable(&c), before);
        assert!(Arc::ptr_eq(&snap, &c.snapshot()));

        // A valid reload afterwards applies normally (file weights changed: the file wins).
        reload::reload(
            Path::new("canaryd.toml"),
            &toml(TWO_80_20, None, None),
            &c,
            "test",
        );
        check("after", &c, &[8000, 2000], &[10000, 0], File, &["canary"]);
        assert_eq!(
            c.view().last_reload.expect("recorded").result,
            Ok(before.0 + 1)
        );
        let text = c.metrics().render();
        for line in [
            r#"canaryd_config_reloads_total{result="failure"} 1"#,
            r#"canaryd_config_reloads_total{result="success"} 1"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line}: {text}");
        }
    }

    #[test]
    fn arms_keep_pools_and_metric_handles_and_windows_restart_when_history_stops_counting() {
        let c = control(TWO, None);
        let first = c.snapshot();
        let epochs = |s: &Snapshot| s.arms.iter().map(|a| a.window_epoch).collect::<Vec<_>>();
        assert_eq!(epochs(&first), [0, 0]);

        // Same settings: the same pools and handles, the windows go on.
        c.apply_config(config(TWO_80_20, None, None))
            .expect("reload");
        let same = c.snapshot();
        for (a, b) in first.arms.iter().zip(&same.arms) {
            assert!(Arc::ptr_eq(&a.upstream, &b.upstream), "{}", a.name);
            assert!(Arc::ptr_eq(&a.metrics, &b.metrics), "{}", a.name);
        }
        assert_eq!(epochs(&same), [0, 0]);

        // A new url: a new pool and a new window, the same metric handles.
        c.apply_config(config(TWO_NEW_URL, None, None))
            .expect("reload");
        let moved = c.snapshot();
        assert!(Arc::ptr_eq(
            &first.arms[0].upstream,
            &moved.arms[0].upstream
        ));
        assert!(!Arc::ptr_eq(
            &first.arms[1].upstream,
            &moved.arms[1].upstream
        ));
        assert!(Arc::ptr_eq(&first.arms[1].metrics, &moved.arms[1].metrics));
        assert_eq!(epochs(&moved), [0, 1]);

        // A trip keeps the window (its errors are why); reset starts it over.
        assert!(c.trip("canary", "error_rate", "x".into()));
        assert_eq!(epochs(&c.snapshot()), [0, 1]);
        assert_eq!(c.reset().1, ["canary"]);
        assert_eq!(epochs(&c.snapshot()), [0, 2]);
        assert!(c.snapshot().watched(&c.snapshot().arms[1]));
        assert!(!c.snapshot().watched(&c.snapshot().arms[0]));

        // The weight and tripped gauges follow every published snapshot.
        assert!(c.trip("canary", "error_rate", "x".into()));
        let text = c.metrics().render();
        for line in [
            r#"canaryd_upstream_weight_percent{upstream="stable"} 100"#,
            r#"canaryd_upstream_weight_percent{upstream="canary"} 0"#,
            r#"canaryd_upstream_tripped{upstream="canary"} 1"#,
            r#"canaryd_rollbacks_total{upstream="canary",reason="error_rate"} 2"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line}: {text}");
        }
    }

    #[test]
    fn trips_record_why_and_rollback_keeps_an_earlier_reason() {
        let c = control(THREE, None);
        assert!(c.trip("a", "error_rate", "12 errors in 20 requests".into()));
        c.rollback_all();
        let v = c.view();
        let a = &v.tripped["a"];
        assert_eq!(
            (a.reason.as_str(), a.detail.as_str(), a.url.as_str()),
            (
                "error_rate",
                "12 errors in 20 requests",
                "http://127.0.0.1:9001"
            )
        );
        let b = &v.tripped["b"];
        assert_eq!(
            (b.reason.as_str(), b.detail.as_str(), b.url.as_str()),
            ("manual", "POST /rollback", "http://127.0.0.1:9002")
        );
        let Err(ChangeError::Tripped(msg)) = c.set_weights(&table(&[("a", 500)])) else {
            panic!("a is tripped");
        };
        assert!(
            msg.contains("\"a\" is tripped (error_rate: 12 errors in 20 requests)"),
            "{msg}"
        );
        let (_, cleared) = c.reset();
        assert_eq!(cleared, ["a", "b"]);
    }

    /// A state written by one run: admin table canary=25 (over file weights 90/10), canary
    /// tripped at http://127.0.0.1:9001.
    fn saved_state(path: &Path) -> State {
        let c = control(TWO, Some(path));
        c.set_weights(&table(&[("canary", 2500)])).expect("set");
        assert!(c.trip("canary", "error_rate", "12 errors in 20 requests".into()));
        drop(c);
        state::load(path).expect("readable").expect("written")
    }

    #[test]
    fn a_restart_restores_admin_weights_and_trips() {
        let dir = scratch_dir();
        let path = dir.path().join("state.json");
        let saved = saved_state(&path);
        let c = control(TWO, Some(&path));
        let v = c.view();
        assert_eq!(v.generation, 1);
        check(
            "restart",
            &c,
            &[7500, 2500],
            &[10000, 0],
            Admin,
            &["canary"],
        );
        assert_eq!(
            v.tripped, saved.tripped,
            "reason, detail, time and url survive"
        );
        assert_eq!(state::load(&path).expect("readable"), Some(saved));
    }

    /// What changed in the file while canaryd was down is applied like a reload.
    #[test]
    fn a_restart_applies_the_files_changes_like_a_reload() {
        type Want = (
            &'static [u16],
            &'static [u16],
            WeightSource,
            &'static [&'static str],
        );
        let cases: &[(&str, Spec, Want)] = &[
            (
                "unchanged",
                TWO,
                (&[7500, 2500], &[10000, 0], Admin, &["canary"]),
            ),
            (
                "same url, spelled differently",
                TWO_SLASH,
                (&[7500, 2500], &[10000, 0], Admin, &["canary"]),
            ),
            (
                "weights changed",
                TWO_80_20,
                (&[8000, 2000], &[10000, 0], File, &["canary"]),
            ),
            (
                "new canary url",
                TWO_NEW_URL,
                (&[7500, 2500], &[7500, 2500], Admin, &[]),
            ),
            (
                "arm added",
                TWO_PLUS_SHADOW,
                (&[9000, 1000, 0], &[10000, 0, 0], File, &["canary"]),
            ),
            (
                "canary removed",
                STABLE_ONLY,
                (&[10000], &[10000], File, &[]),
            ),
        ];
        for &(name, arms, (configured, effective, source, tripped)) in cases {
            // Restart on the changed file.
            let dir = scratch_dir();
            let path = dir.path().join("state.json");
            saved_state(&path);
            let restarted = control(arms, Some(&path));
            assert_eq!(restarted.view().generation, 1, "{name}");
            check(name, &restarted, configured, effective, source, tripped);

            // The same change as a reload of a running canaryd.
            let running = control(TWO, None);
            running
                .set_weights(&table(&[("canary", 2500)]))
                .expect("set");
            assert!(running.trip("canary", "error_rate", "x".into()));
            running
                .apply_config(config(arms, None, None))
                .expect("reload");
            check(name, &running, configured, effective, source, tripped);
        }
    }

    #[test]
    fn a_corrupt_state_file_is_moved_aside_and_the_file_weights_serve() {
        let dir = scratch_dir();
        let path = dir.path().join("state.json");
        std::fs::write(&path, b"{\"version\": 1, \"tripped\": ").expect("write");
        let c = control(TWO, Some(&path));
        check("corrupt", &c, &[9000, 1000], &[9000, 1000], File, &[]);
        let aside: Vec<String> = std::fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("state.json.corrupt-"))
            .collect();
        assert_eq!(aside.len(), 1, "{aside:?}");
    }

    /// A state file that parses but whose admin table is not a valid table for the config
    /// (hand-edited, or written for another config with the same arm names and file weights).
    #[test]
    fn a_state_file_with_an_invalid_admin_table_does_not_stop_the_start() {
        let dir = scratch_dir();
        let path = dir.path().join("state.json");
        let file = BTreeMap::from([("canary".to_owned(), 1000), ("stable".to_owned(), 9000)]);
        let bad = State {
            version: state::VERSION,
            admin_weights: Some(AdminWeights {
                // Sums to 60%.
                weights_bp: BTreeMap::from([
                    ("canary".to_owned(), 1000),
                    ("stable".to_owned(), 5000),
                ]),
                file_weights_bp: file,
                at_ms: 1,
                by_rollout: false,
            }),
            tripped: BTreeMap::new(),
            rollout: None,
        };
        state::save(&path, &bad).expect("save");
        let started = std::panic::catch_unwind(|| {
            Control::new(config(TWO, None, Some(&path)), Metrics::new()).map(|c| c.view())
        });
        let Ok(Ok(v)) = started else {
            panic!(
                "Control::new panicked (or failed) on a state file whose admin table sums to 60%; \
                 the README says an unusable state file is moved aside and the config file's \
                 weights serve"
            );
        };
        assert_eq!((v.source, v.configured), (File, vec![9000, 1000]));
    }
}
