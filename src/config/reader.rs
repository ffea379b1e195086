//! Reads the spanned TOML tree into a [`Config`], recording every problem instead of stopping
//! at the first.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use http::header::HeaderName;
use http::Uri;
use toml::de::{DeTable, DeValue};
use toml::Spanned;

use super::schema::{
    AdminConfig, Config, ConfigError, ConfigErrors, ListenConfig, RollbackConfig, RoutingConfig,
    StateConfig, StatusSet, TlsFiles, UpstreamConfig, UpstreamTls,
};
use crate::routing::BASIS_POINTS;

/// Reads a parsed document; `Ok` only when no problem was found.
pub(super) fn read(src: &str, doc: &DeTable<'_>) -> Result<Config, ConfigErrors> {
    let mut r = Reader {
        src,
        errors: Vec::new(),
    };
    match r.document(doc) {
        Some(c) if r.errors.is_empty() => Ok(c),
        _ => Err(ConfigErrors(r.errors)),
    }
}

type Table<'i> = DeTable<'i>;
type Value<'i> = Spanned<DeValue<'i>>;

pub(super) fn line_of(src: &str, offset: usize) -> usize {
    src.as_bytes()[..offset.min(src.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Walks the spanned document, collecting errors instead of stopping at the first.
struct Reader<'s> {
    src: &'s str,
    errors: Vec<ConfigError>,
}

const TOP_KEYS: &[&str] = &[
    "listen", "admin", "routing", "upstream", "rollback", "state",
];
const LISTEN_KEYS: &[&str] = &[
    "addr",
    "tls_cert",
    "tls_key",
    "tls_handshake_timeout",
    "request_timeout",
    "header_read_timeout",
    "idle_timeout",
    "drain_timeout",
    "max_connections",
    "max_header_bytes",
    "access_log",
];
const ADMIN_KEYS: &[&str] = &["addr", "token_file"];
const ROUTING_KEYS: &[&str] = &[
    "sticky_header",
    "salt",
    "override_header",
    "response_header",
    "baseline",
];
const UPSTREAM_KEYS: &[&str] = &[
    "name",
    "url",
    "weight",
    "connect_timeout",
    "http2",
    "ca_file",
    "client_cert",
    "client_key",
];
const ROLLBACK_KEYS: &[&str] = &[
    "enabled",
    "window",
    "min_requests",
    "max_error_rate",
    "max_error_rate_increase",
    "error_statuses",
    "max_p99_increase",
    "max_p99_ratio",
];
const STATE_KEYS: &[&str] = &["file"];

/// hyper refuses a smaller read buffer, and it bounds the request head.
const MIN_HEADER_BYTES: u64 = 8192;
const MAX_HEADER_BYTES: u64 = 1 << 24;

impl<'s> Reader<'s> {
    fn err(
        &mut self,
        path: impl Into<String>,
        span: Option<Range<usize>>,
        message: impl Into<String>,
    ) {
        self.errors.push(ConfigError {
            path: path.into(),
            line: span.map(|s| line_of(self.src, s.start)),
            message: message.into(),
        });
    }

    fn document(&mut self, doc: &Table<'_>) -> Option<Config> {
        self.check_keys("", doc, TOP_KEYS);
        let empty = Table::new();
        let listen_t = self.section(doc, "listen").unwrap_or(&empty);
        let admin_t = self.section(doc, "admin").unwrap_or(&empty);
        let routing_t = self.section(doc, "routing").unwrap_or(&empty);
        let rollback_t = self.section(doc, "rollback").unwrap_or(&empty);
        let state_t = self.section(doc, "state").unwrap_or(&empty);

        let listen = self.listen(listen_t);
        let admin = self.admin(admin_t);
        let routing = self.routing(routing_t);
        let upstreams = self.upstreams(doc);
        let baseline = self.baseline(routing_t, &upstreams);
        let rollback = self.rollback(rollback_t);
        let state = StateConfig {
            file: self.opt_path(state_t, "state", "file"),
        };
        Some(Config {
            listen: listen?,
            admin: admin?,
            routing: routing?,
            upstreams,
            baseline: baseline?,
            rollback: rollback?,
            state,
        })
    }

    fn check_keys(&mut self, prefix: &str, table: &Table<'_>, known: &[&str]) {
        for (k, _) in table.iter() {
            let key: &str = k.get_ref();
            if !known.contains(&key) {
                let hint = known
                    .iter()
                    .find(|c| edit_distance(c, key) <= 2)
                    .map(|c| format!(" (did you mean `{c}`?)"))
                    .unwrap_or_default();
                let list = known.join(", ");
                self.err(
                    join(prefix, key),
                    Some(k.span()),
                    format!("unknown key `{key}`{hint}; expected one of: {list}"),
                );
            }
        }
    }

    fn section<'a, 'i>(&mut self, doc: &'a Table<'i>, name: &str) -> Option<&'a Table<'i>> {
        let v = doc.get(name)?;
        match v.get_ref() {
            DeValue::Table(t) => {
                let known = match name {
                    "listen" => LISTEN_KEYS,
                    "admin" => ADMIN_KEYS,
                    "routing" => ROUTING_KEYS,
                    "rollback" => ROLLBACK_KEYS,
                    _ => STATE_KEYS,
                };
                self.check_keys(name, t, known);
                Some(t)
            }
            other => {
                self.err(
                    name,
                    Some(v.span()),
                    format!("expected a table [{name}], found {}", other.type_str()),
                );
                None
            }
        }
    }

    fn listen(&mut self, t: &Table<'_>) -> Option<ListenConfig> {
        let p = "listen";
        let addr = self.addr(t, p, "addr", "0.0.0.0:8080");
        let tls = self.file_pair(t, p, "tls_cert", "tls_key");
        let tls_handshake_timeout =
            self.duration(t, p, "tls_handshake_timeout", Duration::from_secs(10));
        let request_timeout = self.duration(t, p, "request_timeout", Duration::from_secs(60));
        let header_read_timeout =
            self.duration(t, p, "header_read_timeout", Duration::from_secs(10));
        let idle_timeout = self.duration(t, p, "idle_timeout", Duration::from_secs(60));
        let drain_timeout = self.duration(t, p, "drain_timeout", Duration::from_secs(20));
        let max_connections = self.int(t, p, "max_connections", 10_000, 1..=1_000_000);
        let max_header_bytes = self.int(
            t,
            p,
            "max_header_bytes",
            65_536,
            MIN_HEADER_BYTES..=MAX_HEADER_BYTES,
        );
        let access_log = self.boolean(t, p, "access_log", false);
        Some(ListenConfig {
            addr: addr?,
            tls: tls?.map(|(cert, key)| TlsFiles { cert, key }),
            tls_handshake_timeout: tls_handshake_timeout?,
            request_timeout: request_timeout?,
            header_read_timeout: header_read_timeout?,
            idle_timeout: idle_timeout?,
            drain_timeout: drain_timeout?,
            max_connections: usize::try_from(max_connections?).ok()?,
            max_header_bytes: usize::try_from(max_header_bytes?).ok()?,
            access_log: access_log?,
        })
    }

    fn admin(&mut self, t: &Table<'_>) -> Option<AdminConfig> {
        let addr = self.addr(t, "admin", "addr", "127.0.0.1:9901");
        let token_file = self.opt_path(t, "admin", "token_file");
        if let Some(a) = addr {
            if !a.ip().is_loopback() && token_file.is_none() {
                self.err(
                    "admin.token_file",
                    t.get("addr").map(|v| v.span()),
                    format!(
                        "required because admin.addr {a} is not a loopback address: anyone who \
                         can reach it could change the weights"
                    ),
                );
            }
        }
        Some(AdminConfig {
            addr: addr?,
            token_file,
        })
    }

    fn routing(&mut self, t: &Table<'_>) -> Option<RoutingConfig> {
        let p = "routing";
        let sticky = self.header(t, p, "sticky_header", Some("x-user-id"), false);
        let salt = self.string(t, p, "salt").unwrap_or_default();
        let override_header = self.header(t, p, "override_header", None, true);
        let response_header =
            self.header(t, p, "response_header", Some("x-canaryd-upstream"), true);
        Some(RoutingConfig {
            sticky_header: sticky??,
            salt,
            override_header: override_header?,
            response_header: response_header?,
        })
    }

    fn upstreams(&mut self, doc: &Table<'_>) -> Vec<UpstreamConfig> {
        let Some(v) = doc.get("upstream") else {
            self.err(
                "upstream",
                None,
                "at least one [[upstream]] is required (name, url, weight)",
            );
            return Vec::new();
        };
        let DeValue::Array(items) = v.get_ref() else {
            self.err(
                "upstream",
                Some(v.span()),
                "expected an array of tables [[upstream]]",
            );
            return Vec::new();
        };
        if items.is_empty() {
            self.err(
                "upstream",
                Some(v.span()),
                "at least one [[upstream]] is required",
            );
        }
        let mut out = Vec::new();
        let mut names = HashSet::new();
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            let p = format!("upstream[{i}]");
            let DeValue::Table(t) = item.get_ref() else {
                self.err(p, Some(item.span()), "expected a table");
                ok = false;
                continue;
            };
            self.check_keys(&p, t, UPSTREAM_KEYS);
            // Checked on the raw value so a problem elsewhere in the entry cannot hide it.
            if let Some(name) = t.get("name") {
                if let DeValue::String(n) = name.get_ref() {
                    if !names.insert(n.to_string()) {
                        self.err(
                            join(&p, "name"),
                            Some(name.span()),
                            format!("duplicate upstream name {n:?}"),
                        );
                    }
                }
            }
            match self.upstream(&p, item.span(), t) {
                Some(u) => out.push(u),
                None => ok = false,
            }
        }
        if ok && !out.is_empty() {
            let sum: u32 = out.iter().map(|u| u32::from(u.weight_bp)).sum();
            if sum != u32::from(BASIS_POINTS) {
                let list = out
                    .iter()
                    .map(|u| format!("{}={}", u.name, crate::routing::fmt_percent(u.weight_bp)))
                    .collect::<Vec<_>>()
                    .join(", ");
                self.err(
                    "upstream",
                    Some(v.span()),
                    format!(
                        "weights must sum to 100, they sum to {} ({list})",
                        crate::routing::fmt_percent_u32(sum)
                    ),
                );
            }
        }
        out
    }

    fn upstream(&mut self, p: &str, span: Range<usize>, t: &Table<'_>) -> Option<UpstreamConfig> {
        let name = match t.get("name") {
            None => {
                self.err(
                    join(p, "name"),
                    Some(span.clone()),
                    "missing required key `name`",
                );
                None
            }
            Some(_) => self.string(t, p, "name").and_then(|n| {
                let valid = !n.is_empty()
                    && n.len() <= 64
                    && n.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
                if valid {
                    Some(n)
                } else {
                    let s = t.get("name").map(|v| v.span());
                    self.err(
                        join(p, "name"),
                        s,
                        format!(
                            "invalid name {n:?}: use 1-64 characters from A-Z a-z 0-9 . _ - \
                             (it becomes a metric label and a header value)"
                        ),
                    );
                    None
                }
            }),
        };
        let url = match t.get("url") {
            None => {
                self.err(
                    join(p, "url"),
                    Some(span.clone()),
                    "missing required key `url`",
                );
                None
            }
            Some(v) => self
                .string(t, p, "url")
                .and_then(|s| match parse_upstream_url(&s) {
                    Ok(u) => Some(u),
                    Err(m) => {
                        self.err(join(p, "url"), Some(v.span()), m);
                        None
                    }
                }),
        };
        let weight = match t.get("weight") {
            None => {
                self.err(
                    join(p, "weight"),
                    Some(span),
                    "missing required key `weight` (percent)",
                );
                None
            }
            Some(v) => self.weight(&join(p, "weight"), v),
        };
        let connect_timeout = self.duration(t, p, "connect_timeout", Duration::from_secs(2));
        let http2 = self.boolean(t, p, "http2", false);
        let ca_file = self.opt_path(t, p, "ca_file");
        let client = self.file_pair(t, p, "client_cert", "client_key");
        let url = url?;
        if url.scheme_str() != Some("https") {
            for key in ["ca_file", "client_cert", "client_key"] {
                if let Some(v) = t.get(key) {
                    self.err(
                        join(p, key),
                        Some(v.span()),
                        "only used with an https:// url",
                    );
                }
            }
        }
        Some(UpstreamConfig {
            name: name?,
            url,
            weight_bp: weight?,
            connect_timeout: connect_timeout?,
            http2: http2?,
            tls: UpstreamTls {
                ca_file,
                client: client?.map(|(cert, key)| TlsFiles { cert, key }),
            },
        })
    }

    fn weight(&mut self, path: &str, v: &Value<'_>) -> Option<u16> {
        let Some(w) = number(v.get_ref()) else {
            self.err(
                path,
                Some(v.span()),
                format!(
                    "expected a number (percent), found {}",
                    v.get_ref().type_str()
                ),
            );
            return None;
        };
        if !(0.0..=100.0).contains(&w) {
            self.err(
                path,
                Some(v.span()),
                format!("weight {w} is outside 0..=100"),
            );
            return None;
        }
        let bp = (w * 100.0).round();
        if (w * 100.0 - bp).abs() > 1e-6 {
            self.err(
                path,
                Some(v.span()),
                format!("weight {w} has more than 2 decimals"),
            );
            return None;
        }
        // In 0..=10000 after the range check above.
        Some(bp as u16)
    }

    fn baseline(&mut self, routing: &Table<'_>, ups: &[UpstreamConfig]) -> Option<usize> {
        match routing.get("baseline") {
            None => (!ups.is_empty()).then_some(0),
            Some(v) => {
                let name = self.string(routing, "routing", "baseline")?;
                let found = ups.iter().position(|u| u.name == name);
                if found.is_none() && !ups.is_empty() {
                    let names: Vec<&str> = ups.iter().map(|u| u.name.as_str()).collect();
                    self.err(
                        "routing.baseline",
                        Some(v.span()),
                        format!(
                            "baseline {name:?} is not an upstream; upstreams are: {}",
                            names.join(", ")
                        ),
                    );
                }
                found
            }
        }
    }

    fn rollback(&mut self, t: &Table<'_>) -> Option<RollbackConfig> {
        let p = "rollback";
        let enabled = self.boolean(t, p, "enabled", true);
        let window = self.duration(t, p, "window", Duration::from_secs(30));
        let min_requests = self.int(t, p, "min_requests", 20, 1..=1_000_000_000);
        let max_error_rate = self.rate(t, p, "max_error_rate", 0.10);
        let max_error_rate_increase = self.rate(t, p, "max_error_rate_increase", 0.02);
        let error_statuses = self.statuses(t, p, "error_statuses");
        let max_p99_increase = match t.get("max_p99_increase") {
            None => Some(None),
            Some(_) => self
                .duration(t, p, "max_p99_increase", Duration::ZERO)
                .map(Some),
        };
        let max_p99_ratio = match t.get("max_p99_ratio") {
            None => Some(None),
            Some(v) => match number(v.get_ref()) {
                Some(r) if r > 1.0 => Some(Some(r)),
                _ => {
                    self.err(
                        join(p, "max_p99_ratio"),
                        Some(v.span()),
                        "expected a number greater than 1 (1.2 trips at a p99 20% above the \
                         baseline's)",
                    );
                    None
                }
            },
        };
        Some(RollbackConfig {
            enabled: enabled?,
            window: window?,
            min_requests: min_requests?,
            max_error_rate: max_error_rate?,
            max_error_rate_increase: max_error_rate_increase?,
            error_statuses: error_statuses?,
            max_p99_increase: max_p99_increase?,
            max_p99_ratio: max_p99_ratio?,
        })
    }

    fn statuses(&mut self, t: &Table<'_>, p: &str, key: &str) -> Option<StatusSet> {
        let path = join(p, key);
        let mut set = StatusSet::empty();
        let Some(v) = t.get(key) else {
            for c in 500..600 {
                set.insert(c);
            }
            set.spec.push("5xx".into());
            return Some(set);
        };
        let DeValue::Array(items) = v.get_ref() else {
            self.err(
                path,
                Some(v.span()),
                "expected a list such as [\"5xx\", \"429\"]",
            );
            return None;
        };
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            let entry = match item.get_ref() {
                DeValue::String(s) => Some(s.to_string()),
                DeValue::Integer(n) => Some(n.as_str().replace('_', "")),
                _ => None,
            };
            let parsed = entry.as_deref().and_then(parse_status_entry);
            match (entry, parsed) {
                (Some(e), Some((lo, hi))) => {
                    for c in lo..=hi {
                        set.insert(c);
                    }
                    set.spec.push(e);
                }
                _ => {
                    self.err(
                        format!("{path}[{i}]"),
                        Some(item.span()),
                        "expected \"5xx\", \"4xx\" (any class 1xx-5xx) or a status code 100-599",
                    );
                    ok = false;
                }
            }
        }
        ok.then_some(set)
    }

    // ---- typed getters: each records its own error and returns None on failure ----

    fn string(&mut self, t: &Table<'_>, p: &str, key: &str) -> Option<String> {
        let v = t.get(key)?;
        match v.get_ref() {
            DeValue::String(s) => Some(s.to_string()),
            other => {
                self.err(
                    join(p, key),
                    Some(v.span()),
                    format!("expected a string, found {}", other.type_str()),
                );
                None
            }
        }
    }

    /// Two path keys that go together (certificate and key). Outer `None`: invalid.
    fn file_pair(
        &mut self,
        t: &Table<'_>,
        p: &str,
        cert: &str,
        key: &str,
    ) -> Option<Option<(PathBuf, PathBuf)>> {
        match (self.opt_path(t, p, cert), self.opt_path(t, p, key)) {
            (Some(c), Some(k)) => Some(Some((c, k))),
            (None, None) => Some(None),
            (Some(_), None) => {
                self.err(
                    join(p, key),
                    t.get(cert).map(|v| v.span()),
                    format!("`{cert}` is set, so `{key}` is required too"),
                );
                None
            }
            (None, Some(_)) => {
                self.err(
                    join(p, cert),
                    t.get(key).map(|v| v.span()),
                    format!("`{key}` is set, so `{cert}` is required too"),
                );
                None
            }
        }
    }

    fn opt_path(&mut self, t: &Table<'_>, p: &str, key: &str) -> Option<PathBuf> {
        let s = self.string(t, p, key)?;
        if s.is_empty() {
            return None;
        }
        Some(PathBuf::from(s))
    }

    fn addr(&mut self, t: &Table<'_>, p: &str, key: &str, default: &str) -> Option<SocketAddr> {
        let Some(v) = t.get(key) else {
            return default.parse().ok();
        };
        let s = self.string(t, p, key)?;
        match s.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.err(
                    join(p, key),
                    Some(v.span()),
                    format!("invalid address {s:?}: expected IP:PORT such as \"0.0.0.0:8080\" or \"[::1]:8080\""),
                );
                None
            }
        }
    }

    fn duration(
        &mut self,
        t: &Table<'_>,
        p: &str,
        key: &str,
        default: Duration,
    ) -> Option<Duration> {
        let Some(v) = t.get(key) else {
            return Some(default);
        };
        let s = self.string(t, p, key)?;
        match humantime::parse_duration(&s) {
            Ok(d) if !d.is_zero() => Some(d),
            Ok(_) => {
                self.err(
                    join(p, key),
                    Some(v.span()),
                    "duration must be greater than zero",
                );
                None
            }
            Err(e) => {
                self.err(
                    join(p, key),
                    Some(v.span()),
                    format!("invalid duration {s:?} ({e}): use a string such as \"250ms\", \"30s\" or \"2m\""),
                );
                None
            }
        }
    }

    fn int(
        &mut self,
        t: &Table<'_>,
        p: &str,
        key: &str,
        default: u64,
        range: std::ops::RangeInclusive<u64>,
    ) -> Option<u64> {
        let Some(v) = t.get(key) else {
            return Some(default);
        };
        let parsed = match v.get_ref() {
            DeValue::Integer(n) => {
                i64::from_str_radix(&n.as_str().replace('_', ""), n.radix()).ok()
            }
            _ => None,
        };
        match parsed.and_then(|n| u64::try_from(n).ok()) {
            Some(n) if range.contains(&n) => Some(n),
            _ => {
                self.err(
                    join(p, key),
                    Some(v.span()),
                    format!("expected an integer in {}..={}", range.start(), range.end()),
                );
                None
            }
        }
    }

    fn rate(&mut self, t: &Table<'_>, p: &str, key: &str, default: f64) -> Option<f64> {
        let Some(v) = t.get(key) else {
            return Some(default);
        };
        match number(v.get_ref()) {
            Some(r) if (0.0..=1.0).contains(&r) => Some(r),
            _ => {
                self.err(
                    join(p, key),
                    Some(v.span()),
                    "expected a fraction between 0 and 1 (0.1 means 10%)",
                );
                None
            }
        }
    }

    fn boolean(&mut self, t: &Table<'_>, p: &str, key: &str, default: bool) -> Option<bool> {
        let Some(v) = t.get(key) else {
            return Some(default);
        };
        match v.get_ref() {
            DeValue::Boolean(b) => Some(*b),
            other => {
                self.err(
                    join(p, key),
                    Some(v.span()),
                    format!("expected true or false, found {}", other.type_str()),
                );
                None
            }
        }
    }

    /// A header-name setting. Outer `None`: invalid. Inner `None`: turned off with `""`
    /// (only where `may_be_off`).
    fn header(
        &mut self,
        t: &Table<'_>,
        p: &str,
        key: &str,
        default: Option<&str>,
        may_be_off: bool,
    ) -> Option<Option<HeaderName>> {
        let raw = match t.get(key) {
            None => default.map(str::to_owned),
            Some(_) => Some(self.string(t, p, key)?),
        };
        let Some(raw) = raw else {
            return Some(None);
        };
        if raw.is_empty() {
            if may_be_off {
                return Some(None);
            }
            self.err(
                join(p, key),
                t.get(key).map(|v| v.span()),
                "must not be empty",
            );
            return None;
        }
        match HeaderName::from_bytes(raw.as_bytes()) {
            Ok(h) => Some(Some(h)),
            Err(_) => {
                self.err(
                    join(p, key),
                    t.get(key).map(|v| v.span()),
                    format!("{raw:?} is not a valid HTTP header name"),
                );
                None
            }
        }
    }
}

fn number(v: &DeValue<'_>) -> Option<f64> {
    match v {
        DeValue::Integer(n) => i64::from_str_radix(&n.as_str().replace('_', ""), n.radix())
            .ok()
            .map(|n| n as f64),
        DeValue::Float(f) => f.as_str().replace('_', "").parse::<f64>().ok(),
        _ => None,
    }
    .filter(|f| f.is_finite())
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_owned()
    } else {
        format!("{prefix}.{key}")
    }
}

/// `"5xx"` → 500..=599, `"429"` → 429..=429.
pub(super) fn parse_status_entry(s: &str) -> Option<(u16, u16)> {
    let b = s.as_bytes();
    if b.len() == 3 && b[1..].eq_ignore_ascii_case(b"xx") && (b'1'..=b'5').contains(&b[0]) {
        let lo = u16::from(b[0] - b'0') * 100;
        return Some((lo, lo + 99));
    }
    let code: u16 = s.parse().ok()?;
    (100..=599).contains(&code).then_some((code, code))
}

fn parse_upstream_url(s: &str) -> Result<Uri, String> {
    let uri: Uri = s.parse().map_err(|e| format!("invalid URL {s:?}: {e}"))?;
    let scheme = match uri.scheme_str() {
        Some("http") => "http",
        Some("https") => "https",
        _ => return Err(format!("URL {s:?} must start with http:// or https://")),
    };
    let Some(auth) = uri.authority() else {
        return Err(format!("URL {s:?} has no host"));
    };
    if auth.host().is_empty() {
        return Err(format!("URL {s:?} has no host"));
    }
    if auth.as_str().contains('@') {
        return Err(format!("URL {s:?} must not carry credentials"));
    }
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("");
    if !(path.is_empty() || path == "/") {
        return Err(format!(
            "URL {s:?} has a path; canaryd forwards the request path unchanged, so give only \
             scheme://host:port"
        ));
    }
    Uri::builder()
        .scheme(scheme)
        .authority(auth.clone())
        .path_and_query("/")
        .build()
        .map_err(|e| format!("invalid URL {s:?}: {e}"))
}

/// Levenshtein distance, for "did you mean" hints on unknown keys.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}
