//! The configuration's schema: every section's validated values and the errors found on
//! the way.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::header::HeaderName;
use http::Uri;

/// A fully validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `[listen]`: the data-plane listener.
    pub listen: ListenConfig,
    /// `[admin]`: the admin API listener.
    pub admin: AdminConfig,
    /// `[routing]`: how a request picks its arm.
    pub routing: RoutingConfig,
    /// `[[upstream]]`, in config order (the order canaries take bucket ranges in).
    pub upstreams: Vec<UpstreamConfig>,
    /// Index into `upstreams` of the baseline (rollback target).
    pub baseline: usize,
    /// `[rollback]`: the local rollback circuit.
    pub rollback: RollbackConfig,
    /// `[state]`: where admin overrides and tripped arms survive restarts.
    pub state: StateConfig,
    /// `[rollout]`: the progressive rollout, when configured.
    pub rollout: Option<RolloutConfig>,
    /// `[[webhook]]`, in config order.
    pub webhooks: Vec<WebhookConfig>,
    /// `[shadow]`: requests copied to a shadow upstream and its answers compared.
    pub shadow: Option<ShadowConfig>,
    /// `[analysis]`: labels and scores read from JSON responses, and drift between arms.
    pub response_analysis: Option<ResponseAnalysisConfig>,
}

/// `[listen]` section.
#[derive(Debug, Clone, PartialEq)]
pub struct ListenConfig {
    /// Address the proxy listens on.
    pub addr: SocketAddr,
    /// Certificate chain and key: HTTPS with ALPN h2 and http/1.1 when set.
    pub tls: Option<TlsFiles>,
    /// Deadline for a client's TLS handshake.
    pub tls_handshake_timeout: Duration,
    /// Whole upstream exchange until response headers; past it the client gets 504.
    pub request_timeout: Duration,
    /// How long a client may take to send a request head.
    pub header_read_timeout: Duration,
    /// A connection with no bytes moving for this long is closed (gracefully).
    pub idle_timeout: Duration,
    /// Grace period for in-flight requests on shutdown.
    pub drain_timeout: Duration,
    /// Concurrent downstream connections; further clients wait in the accept backlog.
    pub max_connections: usize,
    /// Largest request head accepted; larger ones get 431 and are never forwarded.
    pub max_header_bytes: usize,
    /// Streams an HTTP/2 client may have open at once on one connection
    /// (`SETTINGS_MAX_CONCURRENT_STREAMS`).
    pub http2_max_concurrent_streams: u32,
    /// Log one line per request at info.
    pub access_log: bool,
}

/// `[admin]` section.
#[derive(Debug, Clone, PartialEq)]
pub struct AdminConfig {
    /// Address of the admin API and `/metrics`.
    pub addr: SocketAddr,
    /// File holding the bearer token for mutating calls.
    pub token_file: Option<PathBuf>,
}

/// `warmup`, `warmup_path`, `warmup_requests` of an `[[upstream]]`: when the arm's url
/// changes, the warmup requests go to the new url first, then the arm's effective weight ramps
/// from a tenth of its weight to all of it over `duration`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warmup {
    /// How long the ramp takes.
    pub duration: Duration,
    /// Path (and query) of the warmup requests, when any are sent.
    pub path: Option<String>,
    /// How many warmup requests are sent (0 without a path).
    pub requests: u32,
}

/// `[routing]` section.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutingConfig {
    /// Header whose value is the sticky hash key.
    pub sticky_header: HeaderName,
    /// Prepended to the key before hashing; empty keeps the classic assignment.
    pub salt: String,
    /// Header naming an upstream that must serve the request.
    pub override_header: Option<HeaderName>,
    /// Response header naming the arm that served; `None` when turned off.
    pub response_header: Option<HeaderName>,
    /// Sticky keys with a fixed arm (`[routing.pins]`): key → upstream name.
    pub pins: std::collections::BTreeMap<String, String>,
}

/// One `[[upstream]]` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    /// Arm name: metric label, header value, admin API key.
    pub name: String,
    /// Base URL (scheme and authority only).
    pub url: Uri,
    /// Configured weight in basis points (1% = 100).
    pub weight_bp: u16,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Speak HTTP/2 to this upstream (prior knowledge on http://, ALPN h2 on https://).
    pub http2: bool,
    /// HTTP/1.1 connections open to this upstream at once, idle and busy; requests beyond
    /// them wait for one (within `request_timeout`).
    pub max_connections: usize,
    /// TLS settings for an https:// upstream.
    pub tls: UpstreamTls,
    /// Slow start of a new build (its url changed), when set.
    pub warmup: Option<Warmup>,
}

/// A PEM certificate chain and its private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// TLS towards an https:// upstream.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UpstreamTls {
    /// PEM CA certificates to verify the upstream with, instead of the system roots.
    pub ca_file: Option<PathBuf>,
    /// Client certificate for mutual TLS.
    pub client: Option<TlsFiles>,
}

impl UpstreamConfig {
    /// The URL as users write it: `http://host:port`, no trailing slash.
    pub fn url_text(&self) -> String {
        self.url.to_string().trim_end_matches('/').to_owned()
    }
}

/// `[rollback]` section.
#[derive(Debug, Clone, PartialEq)]
pub struct RollbackConfig {
    /// Whether the circuit may trip arms.
    pub enabled: bool,
    /// 1 minus the share of canaries within the limits that the analysis may roll back.
    pub confidence: f64,
    /// Span of the recent per-arm numbers `/status` shows (not used by the verdicts).
    pub window: Duration,
    /// Outcomes an arm needs before the analysis gives it a verdict.
    pub min_requests: u64,
    /// Ceiling on an arm's error rate.
    pub max_error_rate: f64,
    /// Margin on an arm's error rate above the baseline's.
    pub max_error_rate_increase: f64,
    /// Which response statuses count as errors.
    pub error_statuses: StatusSet,
    /// Ceiling on an arm's p99 minus the baseline's.
    pub max_p99_increase: Option<Duration>,
    /// Ceiling on an arm's p99 over the baseline's.
    pub max_p99_ratio: Option<f64>,
}

impl RollbackConfig {
    /// The limits the analysis judges arms against.
    pub fn limits(&self) -> crate::analysis::compare::Limits {
        crate::analysis::compare::Limits {
            confidence: self.confidence,
            min_requests: self.min_requests,
            max_error_rate: self.max_error_rate,
            max_error_rate_increase: self.max_error_rate_increase,
            max_p99_ratio: self.max_p99_ratio,
            max_p99_increase: self.max_p99_increase,
        }
    }
}

/// `[rollout]` section: a progressive rollout of one arm.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutConfig {
    /// The arm being released (never the baseline).
    pub upstream: String,
    /// The weights it is stepped through, in basis points, strictly increasing.
    pub steps: Vec<u16>,
    /// Least time at each step.
    pub min_step_duration: Duration,
    /// Least requests of each arm (the released one and the baseline) at each step.
    pub min_requests: u64,
    /// After this long at a step with the verdict still inconclusive, `on_inconclusive`.
    pub max_step_duration: Duration,
    /// What an inconclusive step does at `max_step_duration`.
    pub on_inconclusive: OnInconclusive,
    /// What starts a rollout.
    pub start: RolloutStart,
}

/// `rollout.on_inconclusive`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnInconclusive {
    /// Stay at the step, report it, keep analysing.
    Hold,
    /// Roll back.
    Rollback,
}

/// `rollout.start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RolloutStart {
    /// `POST /rollout/start`.
    Manual,
    /// A new `url` for the released arm (a new build) starts a rollout from the first step.
    OnNewUrl,
}

/// A webhook hook type (Flagger's names and meanings).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HookEvent {
    /// Gate before the first step.
    ConfirmRollout,
    /// Gate before the first step (after `confirm-rollout`).
    PreRollout,
    /// Notification at each step change.
    Rollout,
    /// Gate before each step up.
    ConfirmTrafficIncrease,
    /// Gate before the promotion.
    ConfirmPromotion,
    /// Notification at the end (`succeeded` or `failed`).
    PostRollout,
    /// Asked at each analysis check: a 2xx rolls back.
    Rollback,
    /// Notification of every phase change, trip, promotion and rollback.
    Event,
}

impl HookEvent {
    /// Every hook type, in the order of a rollout.
    pub const ALL: [HookEvent; 8] = [
        HookEvent::ConfirmRollout,
        HookEvent::PreRollout,
        HookEvent::Rollout,
        HookEvent::ConfirmTrafficIncrease,
        HookEvent::ConfirmPromotion,
        HookEvent::PostRollout,
        HookEvent::Rollback,
        HookEvent::Event,
    ];

    /// The name in the config and the payload (`confirm-traffic-increase`).
    pub fn as_str(self) -> &'static str {
        match self {
            HookEvent::ConfirmRollout => "confirm-rollout",
            HookEvent::PreRollout => "pre-rollout",
            HookEvent::Rollout => "rollout",
            HookEvent::ConfirmTrafficIncrease => "confirm-traffic-increase",
            HookEvent::ConfirmPromotion => "confirm-promotion",
            HookEvent::PostRollout => "post-rollout",
            HookEvent::Rollback => "rollback",
            HookEvent::Event => "event",
        }
    }

    /// The hook type named `s`.
    pub fn parse(s: &str) -> Option<HookEvent> {
        HookEvent::ALL.into_iter().find(|e| e.as_str() == s)
    }

    /// Whether a 2xx lets the rollout proceed and anything else holds it.
    pub fn is_gate(self) -> bool {
        matches!(
            self,
            HookEvent::ConfirmRollout
                | HookEvent::PreRollout
                | HookEvent::ConfirmTrafficIncrease
                | HookEvent::ConfirmPromotion
        )
    }
}

/// One `[[webhook]]` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct WebhookConfig {
    /// Where the JSON is POSTed (`http://` or `https://`, any path).
    pub url: Uri,
    /// The hook types sent to it.
    pub events: Vec<HookEvent>,
    /// Deadline of one call (connect to response headers).
    pub timeout: Duration,
    /// Further attempts of a notification after a failed one.
    pub retries: u32,
    /// File whose content (whitespace trimmed) keys the HMAC-SHA256 signature.
    pub secret_file: Option<PathBuf>,
    /// Sent as the payload's `metadata`.
    pub metadata: std::collections::BTreeMap<String, String>,
}

/// `[shadow]` section.
#[derive(Debug, Clone, PartialEq)]
pub struct ShadowConfig {
    /// The `[[upstream]]` the copies go to.
    pub upstream: String,
    /// Share of requests copied, basis points (by the sticky key when there is one).
    pub percent_bp: u16,
    /// Methods copied (upper case).
    pub methods: Vec<http::Method>,
    /// Request or response bodies larger than this are not compared (skipped, counted).
    pub max_body_bytes: usize,
    /// Copies in flight at once; more are dropped (counted).
    pub max_in_flight: usize,
    /// JSON pointers compared; empty compares the whole body.
    pub compare: Vec<String>,
    /// `|a - b|` allowed between numbers.
    pub numeric_tolerance: f64,
    /// JSON pointers never compared.
    pub ignore: Vec<String>,
    /// Share of copied requests also sent a second time to the primary's arm, to tell noisy
    /// fields from regressions, basis points.
    pub noise_bp: u16,
}

/// `[analysis]` section: response analysis.
#[derive(Debug, Clone, PartialEq)]
pub struct ResponseAnalysisConfig {
    /// JSON pointer of the categorical field (the label).
    pub label_pointer: Option<String>,
    /// JSON pointer of the numeric field (the score).
    pub score_pointer: Option<String>,
    /// Only JSON bodies up to this size are read.
    pub max_body_bytes: usize,
    /// Drift beyond this (shown at the rollback confidence) trips the arm, reason `drift`.
    pub max_drift: Option<f64>,
}

/// `[state]` section.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StateConfig {
    /// State file path; `None` keeps admin changes in memory only.
    pub file: Option<PathBuf>,
}

/// A set of HTTP status codes (100..=599), as a bitmap so the data path checks it in O(1).
#[derive(Clone, PartialEq, Eq)]
pub struct StatusSet {
    bits: [u64; 10],
    pub(super) spec: Vec<String>,
}

impl StatusSet {
    pub(super) fn empty() -> Self {
        StatusSet {
            bits: [0; 10],
            spec: Vec::new(),
        }
    }

    pub(super) fn insert(&mut self, code: u16) {
        self.bits[usize::from(code / 64)] |= 1 << (code % 64);
    }

    /// Whether `code` is in the set.
    pub fn contains(&self, code: u16) -> bool {
        code < 640 && self.bits[usize::from(code / 64)] & (1 << (code % 64)) != 0
    }

    /// The entries as written in the config (`"5xx"`, `"429"`).
    pub fn spec(&self) -> &[String] {
        &self.spec
    }
}

impl fmt::Debug for StatusSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(&self.spec).finish()
    }
}

impl Config {
    /// The baseline upstream.
    pub fn baseline(&self) -> &UpstreamConfig {
        &self.upstreams[self.baseline]
    }

    /// Configured weights in basis points, in config order.
    pub fn weights_bp(&self) -> Vec<u16> {
        self.upstreams.iter().map(|u| u.weight_bp).collect()
    }

    /// The routing rule for this config's headers, salt and arm names.
    pub fn router(&self) -> crate::routing::Router {
        crate::routing::Router::new(
            self.routing.sticky_header.clone(),
            &self.routing.salt,
            self.routing.override_header.clone(),
            self.upstreams.iter().map(|u| u.name.as_str()),
        )
        .with_pins(self.routing.pins.iter().filter_map(|(key, arm)| {
            // parse() only returns configs whose pins name upstreams.
            let i = self.upstreams.iter().position(|u| u.name == *arm)?;
            Some((key.as_str(), i))
        }))
    }

    /// The configured weight table.
    pub fn weight_table(&self) -> crate::routing::WeightTable {
        // parse() only returns configs whose weights sum to 10000 with a baseline in range.
        crate::routing::WeightTable::new(self.weights_bp(), self.baseline)
            .expect("validated config yields a valid weight table")
    }

    /// Settings that only take effect on restart and differ between `self` and `new`.
    pub fn restart_only_changes(&self, new: &Config) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.listen.addr != new.listen.addr {
            out.push("listen.addr");
        }
        if self.listen.max_connections != new.listen.max_connections {
            out.push("listen.max_connections");
        }
        if self.listen.max_header_bytes != new.listen.max_header_bytes {
            out.push("listen.max_header_bytes");
        }
        if self.listen.header_read_timeout != new.listen.header_read_timeout {
            out.push("listen.header_read_timeout");
        }
        if self.listen.http2_max_concurrent_streams != new.listen.http2_max_concurrent_streams {
            out.push("listen.http2_max_concurrent_streams");
        }
        if self.admin.addr != new.admin.addr {
            out.push("admin.addr");
        }
        if self.listen.tls != new.listen.tls {
            out.push("listen.tls_cert/tls_key paths");
        }
        if self.listen.tls_handshake_timeout != new.listen.tls_handshake_timeout {
            out.push("listen.tls_handshake_timeout");
        }
        out
    }
}

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Key path such as `upstream[1].weight`; empty for whole-file problems.
    pub path: String,
    /// 1-based line, where the parser knows it.
    pub line: Option<usize>,
    /// What is wrong and what is expected.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.path.is_empty(), self.line) {
            (true, Some(l)) => write!(f, "line {l}: {}", self.message),
            (true, None) => write!(f, "{}", self.message),
            (false, Some(l)) => write!(f, "{} (line {l}): {}", self.path, self.message),
            (false, None) => write!(f, "{}: {}", self.path, self.message),
        }
    }
}

/// Every problem found in a config file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}
