//! The TOML configuration: schema, defaults and validation.
//!
//! The file is read by hand over a spanned TOML tree rather than with `serde` derive, because
//! serde stops at the first problem and the contract (design §2) asks for **every** problem at
//! once, each with its key path and line. Everything the data path relies on (weights in basis
//! points summing to 10000, a baseline that exists, header names that parse) is checked here, so
//! later stages never re-validate.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::header::HeaderName;
use http::Uri;
use toml::de::DeTable;

mod reader;

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
    /// TLS settings for an https:// upstream.
    pub tls: UpstreamTls,
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
    /// Sliding window length.
    pub window: Duration,
    /// Requests an arm needs in the window before it may trip.
    pub min_requests: u64,
    /// Absolute error rate that trips.
    pub max_error_rate: f64,
    /// Error rate above the baseline's that trips.
    pub max_error_rate_increase: f64,
    /// Which response statuses count as errors.
    pub error_statuses: StatusSet,
    /// Trip when the arm's window p99 exceeds the baseline's by this much.
    pub max_p99_increase: Option<Duration>,
    /// Trip when the arm's window p99 is at least this multiple of the baseline's.
    pub max_p99_ratio: Option<f64>,
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
    spec: Vec<String>,
}

impl StatusSet {
    fn empty() -> Self {
        StatusSet {
            bits: [0; 10],
            spec: Vec::new(),
        }
    }

    fn insert(&mut self, code: u16) {
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
    /// Reads and validates the config file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                path: String::new(),
                line: None,
                message: format!("cannot read {}: {e}", path.display()),
            }])
        })?;
        Config::parse(&text)
    }

    /// Parses and validates config text, reporting every problem found.
    pub fn parse(text: &str) -> Result<Config, ConfigErrors> {
        let doc = DeTable::parse(text).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                path: String::new(),
                line: e.span().map(|s| reader::line_of(text, s.start)),
                message: format!("invalid TOML: {}", e.message().trim_end()),
            }])
        })?;
        reader::read(text, doc.get_ref())
    }

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

#[cfg(test)]
mod tests {
    use super::reader::parse_status_entry;
    use super::*;

    const MINIMAL: &str = r#"
[[upstream]]
name = "stable"
url = "http://127.0.0.1:9000"
weight = 90

[[upstream]]
name = "canary"
url = "http://127.0.0.1:9001"
weight = 10
"#;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse(MINIMAL).expect("valid");
        assert_eq!(c.listen.addr, "0.0.0.0:8080".parse().expect("addr"));
        assert_eq!(c.listen.request_timeout, Duration::from_secs(60));
        assert_eq!(c.admin.addr, "127.0.0.1:9901".parse().expect("addr"));
        assert_eq!(c.routing.sticky_header, "x-user-id");
        assert_eq!(
            c.routing.response_header.as_ref().map(|h| h.as_str()),
            Some("x-canaryd-upstream")
        );
        assert_eq!(c.baseline().name, "stable");
        assert_eq!(c.weights_bp(), vec![9000, 1000]);
        assert!(c.rollback.error_statuses.contains(503));
        assert!(!c.rollback.error_statuses.contains(404));
    }

    #[test]
    fn every_problem_is_reported_with_its_path_and_line() {
        let text = r#"
[listen]
adr = "0.0.0.0:8080"
request_timeout = "soon"

[routing]
baseline = "prod"

[[upstream]]
name = "stable"
url = "ftp://x"
weight = 90.001

[[upstream]]
name = "stable"
url = "http://127.0.0.1:9001"
weight = 20
"#;
        let errs = Config::parse(text).expect_err("invalid").0;
        let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
        for want in [
            "listen.adr",
            "listen.request_timeout",
            "upstream[0].url",
            "upstream[0].weight",
            "upstream[1].name",
            "routing.baseline",
        ] {
            assert!(paths.contains(&want), "missing {want} in {paths:?}");
        }
        let typo = errs.iter().find(|e| e.path == "listen.adr").expect("typo");
        assert_eq!(typo.line, Some(3));
        assert!(
            typo.message.contains("did you mean `addr`"),
            "{}",
            typo.message
        );
    }

    #[test]
    fn weights_must_sum_to_100() {
        let text = MINIMAL.replace("weight = 10", "weight = 12.5");
        let errs = Config::parse(&text).expect_err("invalid");
        let msg = errs.to_string();
        assert!(msg.contains("sum to 102.5"), "{msg}");
    }

    #[test]
    fn fractional_weights_become_basis_points() {
        let text = MINIMAL
            .replace("weight = 90", "weight = 87.5")
            .replace("weight = 10", "weight = 12.5");
        let c = Config::parse(&text).expect("valid");
        assert_eq!(c.weights_bp(), vec![8750, 1250]);
    }

    #[test]
    fn syntax_errors_carry_a_line() {
        let errs = Config::parse("[listen]\naddr = \n").expect_err("invalid").0;
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].line, Some(2));
    }

    #[test]
    fn status_entries() {
        assert_eq!(parse_status_entry("5xx"), Some((500, 599)));
        assert_eq!(parse_status_entry("4XX"), Some((400, 499)));
        assert_eq!(parse_status_entry("429"), Some((429, 429)));
        assert_eq!(parse_status_entry("6xx"), None);
        assert_eq!(parse_status_entry("99"), None);
    }

    #[test]
    fn missing_upstreams_is_an_error() {
        let errs = Config::parse("[listen]\naddr = \"127.0.0.1:0\"\n").expect_err("invalid");
        assert!(errs.to_string().contains("at least one [[upstream]]"));
    }
}
