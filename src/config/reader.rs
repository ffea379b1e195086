//! Reads the spanned TOML tree into a [`Config`], recording every problem instead of stopping
//! at the first.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use http::header::HeaderName;
use http::Uri;
use toml::de::{DeTable, DeValue};
use toml::Spanned;

use super::schema::{
    AdminConfig, Config, ConfigError, ConfigErrors, HookEvent, ListenConfig, OnInconclusive,
    ResponseAnalysisConfig, RollbackConfig, RolloutConfig, RolloutStart, RoutingConfig,
    ShadowConfig, StateConfig, StatusSet, TlsFiles, UpstreamConfig, UpstreamTls, Warmup,
    WebhookConfig,
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
        _ => {
            // In the order of the file, whatever order the sections were read in (problems
            // with no line, such as a missing section, last).
            r.errors.sort_by_key(|e| e.line.unwrap_or(usize::MAX));
            Err(ConfigErrors(r.errors))
        }
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
    "listen", "admin", "routing", "upstream", "rollback", "state", "rollout", "webhook", "shadow",
    "analysis",
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
    "http2_max_concurrent_streams",
    "access_log",
];
const ADMIN_KEYS: &[&str] = &["addr", "token_file"];
const ROUTING_KEYS: &[&str] = &[
    "sticky_header",
    "salt",
    "override_header",
    "response_header",
    "baseline",
    "pins",
];
const UPSTREAM_KEYS: &[&str] = &[
    "name",
    "url",
    "weight",
    "connect_timeout",
    "http2",
    "max_connections",
    "ca_file",
    "client_cert",
    "client_key",
    "warmup",
    "warmup_path",
    "warmup_requests",
];
const ROLLBACK_KEYS: &[&str] = &[
    "enabled",
    "confidence",
    "window",
    "min_requests",
    "max_error_rate",
    "max_error_rate_increase",
    "error_statuses",
    "max_p99_increase",
    "max_p99_ratio",
];
const STATE_KEYS: &[&str] = &["file"];
const ROLLOUT_KEYS: &[&str] = &[
    "upstream",
    "steps",
    "min_step_duration",
    "min_requests",
    "max_step_duration",
    "on_inconclusive",
    "start",
];
const SHADOW_KEYS: &[&str] = &[
    "upstream",
    "percent",
    "methods",
    "max_body_bytes",
    "max_in_flight",
    "compare",
    "numeric_tolerance",
    "ignore",
    "noise_percent",
];
const ANALYSIS_KEYS: &[&str] = &[
    "label_pointer",
    "score_pointer",
    "max_body_bytes",
    "max_drift",
];
const WEBHOOK_KEYS: &[&str] = &[
    "url",
    "events",
    "timeout",
    "retries",
    "secret_file",
    "metadata",
];

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
        let rollout_t = self.section(doc, "rollout");
        let shadow_t = self.section(doc, "shadow");
        let analysis_t = self.section(doc, "analysis");

        let listen = self.listen(listen_t);
        let admin = self.admin(admin_t);
        let routing = self.routing(routing_t);
        let upstreams = self.upstreams(doc);
        let baseline = self.baseline(routing_t, &upstreams, doc);
        let pins = self.pins(routing_t, &upstreams, doc);
        if let Some(b) = baseline {
            self.warmup_arms(&upstreams, b, doc);
        }
        let rollback = self.rollback(rollback_t);
        let state = StateConfig {
            file: self.opt_path(state_t, "state", "file"),
        };
        let rollout = match (rollout_t, baseline) {
            (Some(t), Some(b)) => {
                let span = doc.get("rollout").map(|v| v.span());
                self.rollout(t, span, &upstreams, b).map(Some)
            }
            (None, _) => Some(None),
            // Without a baseline the arm cannot be checked; that error is reported already.
            (Some(_), None) => None,
        };
        let webhooks = self.webhooks(doc);
        let shadow = match shadow_t {
            Some(t) => {
                let span = doc.get("shadow").map(|v| v.span());
                self.shadow(t, span, &upstreams).map(Some)
            }
            None => Some(None),
        };
        let response_analysis = match analysis_t {
            Some(t) => self.response_analysis(t).map(Some),
            None => Some(None),
        };
        let mut routing = routing?;
        routing.pins = pins?;
        Some(Config {
            listen: listen?,
            admin: admin?,
            routing,
            upstreams,
            baseline: baseline?,
            rollback: rollback?,
            state,
            rollout: rollout?,
            webhooks: webhooks?,
            shadow: shadow?,
            response_analysis: response_analysis?,
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
                    "rollout" => ROLLOUT_KEYS,
                    "shadow" => SHADOW_KEYS,
                    "analysis" => ANALYSIS_KEYS,
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
        let http2_streams = self.int(t, p, "http2_max_concurrent_streams", 100, 1..=10_000);
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
            http2_max_concurrent_streams: u32::try_from(http2_streams?).ok()?,
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
            pins: Default::default(),
        })
    }

    /// `[routing.pins]`: sticky key → the name of an upstream. Every pin names a configured
    /// upstream.
    fn pins(
        &mut self,
        routing: &Table<'_>,
        ups: &[UpstreamConfig],
        doc: &Table<'_>,
    ) -> Option<BTreeMap<String, String>> {
        let Some(v) = routing.get("pins") else {
            return Some(BTreeMap::new());
        };
        let DeValue::Table(t) = v.get_ref() else {
            self.err(
                "routing.pins",
                Some(v.span()),
                format!(
                    "expected a table of user id = upstream name, found {}",
                    v.get_ref().type_str()
                ),
            );
            return None;
        };
        // An entry with problems of its own is not among `ups`, but its name is a name.
        let mut names: Vec<String> = Vec::new();
        let named = doc
            .get("upstream")
            .and_then(|v| v.get_ref().as_array())
            .into_iter()
            .flatten()
            .filter_map(|e| e.get_ref().as_table()?.get("name")?.get_ref().as_str())
            .map(str::to_owned)
            .chain(ups.iter().map(|u| u.name.clone()));
        for n in named {
            if !names.contains(&n) {
                names.push(n);
            }
        }
        let mut out = BTreeMap::new();
        let mut ok = true;
        for (k, value) in t.iter() {
            let key: &str = k.get_ref();
            let path = format!("routing.pins.{key:?}");
            if key.is_empty() || http::HeaderValue::from_str(key).is_err() {
                self.err(
                    &path,
                    Some(k.span()),
                    "a pinned user id must be a non-empty header value (visible ASCII and spaces)",
                );
                ok = false;
                continue;
            }
            match value.get_ref() {
                DeValue::String(arm) if names.iter().any(|n| n == arm.as_ref()) => {
                    out.insert(key.to_owned(), arm.to_string());
                }
                DeValue::String(arm) => {
                    self.err(
                        &path,
                        Some(value.span()),
                        format!(
                            "unknown upstream {arm:?}; upstreams are: {}",
                            names.join(", ")
                        ),
                    );
                    ok = false;
                }
                other => {
                    self.err(
                        &path,
                        Some(value.span()),
                        format!(
                            "expected an upstream name (string), found {}",
                            other.type_str()
                        ),
                    );
                    ok = false;
                }
            }
        }
        ok.then_some(out)
    }

    /// Warmup ramps a non-baseline arm's weight: the baseline takes whatever the others leave,
    /// so it has no weight of its own to ramp.
    fn warmup_arms(&mut self, ups: &[UpstreamConfig], baseline: usize, doc: &Table<'_>) {
        let Some(base) = ups.get(baseline) else {
            return;
        };
        if base.warmup.is_none() {
            return;
        }
        let span = doc
            .get("upstream")
            .and_then(|v| v.get_ref().as_array())
            .into_iter()
            .flatten()
            .enumerate()
            .find(|(_, e)| {
                e.get_ref()
                    .as_table()
                    .and_then(|t| t.get("name"))
                    .and_then(|n| n.get_ref().as_str())
                    == Some(base.name.as_str())
            })
            .and_then(|(i, e)| Some((i, e.get_ref().as_table()?.get("warmup")?.span())));
        let (i, span) = match span {
            Some((i, s)) => (i, Some(s)),
            None => (baseline, None),
        };
        self.err(
            format!("upstream[{i}].warmup"),
            span,
            format!(
                "{:?} is the baseline: it takes the traffic the other arms leave, so it has no \
                 weight to ramp; set warmup on the canaries",
                base.name
            ),
        );
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
        let warmup = self.warmup(t, p);
        let http2 = self.boolean(t, p, "http2", false);
        let max_connections = self.int(t, p, "max_connections", 1024, 1..=1_000_000);
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
            max_connections: usize::try_from(max_connections?).ok()?,
            tls: UpstreamTls {
                ca_file,
                client: client?.map(|(cert, key)| TlsFiles { cert, key }),
            },
            warmup: warmup?,
        })
    }

    /// `warmup` (the ramp), `warmup_path` and `warmup_requests` of one upstream.
    fn warmup(&mut self, t: &Table<'_>, p: &str) -> Option<Option<Warmup>> {
        let duration = match t.get("warmup") {
            None => None,
            Some(v) => {
                let d = self.duration(t, p, "warmup", Duration::ZERO)?;
                if d > Duration::from_secs(24 * 3600) {
                    self.err(join(p, "warmup"), Some(v.span()), "warmup is at most 24h");
                    return None;
                }
                Some(d)
            }
        };
        let path = match t.get("warmup_path") {
            None => None,
            Some(v) => {
                let s = self.string(t, p, "warmup_path")?;
                if !s.starts_with('/') || s.parse::<http::uri::PathAndQuery>().is_err() {
                    self.err(
                        join(p, "warmup_path"),
                        Some(v.span()),
                        format!("invalid path {s:?}: expected a path such as \"/healthz\""),
                    );
                    return None;
                }
                Some(s)
            }
        };
        let requests = match t.get("warmup_requests") {
            None => None,
            Some(_) => Some(self.int(t, p, "warmup_requests", 0, 1..=10_000)? as u32),
        };
        let Some(duration) = duration else {
            for key in ["warmup_path", "warmup_requests"] {
                if let Some(v) = t.get(key) {
                    self.err(
                        join(p, key),
                        Some(v.span()),
                        "only used with `warmup` (the ramp's duration, e.g. \"60s\")",
                    );
                }
            }
            return if t.contains_key("warmup_path") || t.contains_key("warmup_requests") {
                None
            } else {
                Some(None)
            };
        };
        if let (None, Some(_)) = (&path, requests) {
            self.err(
                join(p, "warmup_requests"),
                t.get("warmup_requests").map(|v| v.span()),
                "warmup requests need `warmup_path` (where to send them)",
            );
            return None;
        }
        let requests = match &path {
            Some(_) => requests.unwrap_or(10),
            None => 0,
        };
        Some(Some(Warmup {
            duration,
            path,
            requests,
        }))
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

    fn baseline(
        &mut self,
        routing: &Table<'_>,
        ups: &[UpstreamConfig],
        doc: &Table<'_>,
    ) -> Option<usize> {
        match routing.get("baseline") {
            None => (!ups.is_empty()).then_some(0),
            Some(v) => {
                let name = self.string(routing, "routing", "baseline")?;
                let found = ups.iter().position(|u| u.name == name);
                // An entry with problems of its own is not among `ups`, but it is there: its
                // problems are reported, not a missing baseline.
                let named = || {
                    doc.get("upstream")
                        .and_then(|v| v.get_ref().as_array())
                        .into_iter()
                        .flatten()
                        .filter_map(|e| e.get_ref().as_table()?.get("name"))
                        .any(|n| n.get_ref().as_str() == Some(name.as_str()))
                };
                if found.is_none() && !ups.is_empty() && !named() {
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
        let confidence = match t.get("confidence") {
            None => Some(0.99),
            Some(v) => match number(v.get_ref()) {
                Some(c) if (0.5..1.0).contains(&c) && c <= 0.999_999 => Some(c),
                _ => {
                    self.err(
                        join(p, "confidence"),
                        Some(v.span()),
                        "expected a number from 0.5 to 0.999999 (0.99 rolls back at most 1% of \
                         canaries that are within the limits)",
                    );
                    None
                }
            },
        };
        let window = self.duration(t, p, "window", Duration::from_secs(30));
        let min_requests = self.int(t, p, "min_requests", 5, 1..=1_000_000_000);
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
            confidence: confidence?,
            window: window?,
            min_requests: min_requests?,
            max_error_rate: max_error_rate?,
            max_error_rate_increase: max_error_rate_increase?,
            error_statuses: error_statuses?,
            max_p99_increase: max_p99_increase?,
            max_p99_ratio: max_p99_ratio?,
        })
    }

    fn rollout(
        &mut self,
        t: &Table<'_>,
        span: Option<Range<usize>>,
        ups: &[UpstreamConfig],
        baseline: usize,
    ) -> Option<RolloutConfig> {
        let p = "rollout";
        let base_name = ups.get(baseline).map(|u| u.name.as_str()).unwrap_or("");
        let canaries: Vec<&str> = ups
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != baseline)
            .map(|(_, u)| u.name.as_str())
            .collect();
        let upstream = match t.get("upstream") {
            Some(v) => {
                let name = self.string(t, p, "upstream")?;
                if name == base_name {
                    self.err(
                        join(p, "upstream"),
                        Some(v.span()),
                        format!("{name:?} is the baseline; a rollout releases another arm"),
                    );
                    None
                } else if !canaries.contains(&name.as_str()) {
                    self.err(
                        join(p, "upstream"),
                        Some(v.span()),
                        format!(
                            "unknown upstream {name:?}; the arms that can be released are: {}",
                            canaries.join(", ")
                        ),
                    );
                    None
                } else {
                    Some(name)
                }
            }
            None => match canaries.as_slice() {
                [one] => Some((*one).to_owned()),
                [] => {
                    self.err(
                        p,
                        span,
                        "a rollout needs an arm besides the baseline to release",
                    );
                    None
                }
                _ => {
                    self.err(
                        join(p, "upstream"),
                        span,
                        format!(
                            "several arms besides the baseline ({}); name the one to release",
                            canaries.join(", ")
                        ),
                    );
                    None
                }
            },
        };
        let steps = self.steps(t, p);
        let min_step_duration = self.duration(t, p, "min_step_duration", Duration::from_secs(300));
        let min_requests = self.int(t, p, "min_requests", 500, 0..=1_000_000_000);
        let mut max_step_duration =
            self.duration(t, p, "max_step_duration", Duration::from_secs(1800));
        if let (Some(min), Some(max)) = (min_step_duration, max_step_duration) {
            if max < min {
                max_step_duration = None;
                self.err(
                    join(p, "max_step_duration"),
                    t.get("max_step_duration")
                        .or(t.get("min_step_duration"))
                        .map(|v| v.span()),
                    format!(
                        "{} is shorter than min_step_duration ({}); a step could never pass",
                        humantime::format_duration(max),
                        humantime::format_duration(min)
                    ),
                );
            }
        }
        let on_inconclusive = self.choice(
            t,
            p,
            "on_inconclusive",
            &[
                ("hold", OnInconclusive::Hold),
                ("rollback", OnInconclusive::Rollback),
            ],
            OnInconclusive::Hold,
        );
        let start = self.choice(
            t,
            p,
            "start",
            &[
                ("manual", RolloutStart::Manual),
                ("on_new_url", RolloutStart::OnNewUrl),
            ],
            RolloutStart::Manual,
        );
        Some(RolloutConfig {
            upstream: upstream?,
            steps: steps?,
            min_step_duration: min_step_duration?,
            min_requests: min_requests?,
            max_step_duration: max_step_duration?,
            on_inconclusive: on_inconclusive?,
            start: start?,
        })
    }

    /// `rollout.steps`: percentages, strictly increasing, each in (0, 100].
    fn steps(&mut self, t: &Table<'_>, p: &str) -> Option<Vec<u16>> {
        let path = join(p, "steps");
        let Some(v) = t.get("steps") else {
            return Some(vec![500, 2500, 5000, 7500, 10_000]);
        };
        let DeValue::Array(items) = v.get_ref() else {
            self.err(
                path,
                Some(v.span()),
                "expected a list of percentages such as [5, 25, 50, 75, 100]",
            );
            return None;
        };
        if items.is_empty() {
            self.err(path, Some(v.span()), "expected at least one step");
            return None;
        }
        let mut out = Vec::new();
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            let at = format!("{path}[{i}]");
            match self.weight(&at, item) {
                Some(0) => {
                    self.err(at, Some(item.span()), "a step must be above 0%");
                    ok = false;
                }
                Some(w) if out.last().is_some_and(|&last| w <= last) => {
                    self.err(
                        at,
                        Some(item.span()),
                        format!(
                            "steps must increase: {}% follows {}%",
                            crate::routing::fmt_percent(w),
                            crate::routing::fmt_percent(out[out.len() - 1])
                        ),
                    );
                    ok = false;
                }
                Some(w) => out.push(w),
                None => ok = false,
            }
        }
        ok.then_some(out)
    }

    /// A string key that must be one of `choices`.
    fn choice<T: Copy>(
        &mut self,
        t: &Table<'_>,
        p: &str,
        key: &str,
        choices: &[(&str, T)],
        default: T,
    ) -> Option<T> {
        let Some(v) = t.get(key) else {
            return Some(default);
        };
        let s = self.string(t, p, key)?;
        match choices.iter().find(|(name, _)| *name == s) {
            Some(&(_, value)) => Some(value),
            None => {
                let names: Vec<String> = choices.iter().map(|(n, _)| format!("{n:?}")).collect();
                self.err(
                    join(p, key),
                    Some(v.span()),
                    format!("unknown value {s:?}; expected {}", names.join(" or ")),
                );
                None
            }
        }
    }

    /// `[[webhook]]` entries (none when absent).
    fn webhooks(&mut self, doc: &Table<'_>) -> Option<Vec<WebhookConfig>> {
        let Some(v) = doc.get("webhook") else {
            return Some(Vec::new());
        };
        let DeValue::Array(items) = v.get_ref() else {
            self.err(
                "webhook",
                Some(v.span()),
                "expected an array of tables [[webhook]]",
            );
            return None;
        };
        let mut out = Vec::new();
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            let p = format!("webhook[{i}]");
            let DeValue::Table(t) = item.get_ref() else {
                self.err(p, Some(item.span()), "expected a table");
                ok = false;
                continue;
            };
            self.check_keys(&p, t, WEBHOOK_KEYS);
            match self.webhook(&p, item.span(), t) {
                Some(w) => out.push(w),
                None => ok = false,
            }
        }
        ok.then_some(out)
    }

    fn webhook(&mut self, p: &str, span: Range<usize>, t: &Table<'_>) -> Option<WebhookConfig> {
        let url = match t.get("url") {
            None => {
                self.err(join(p, "url"), Some(span), "missing required key `url`");
                None
            }
            Some(v) => self.string(t, p, "url").and_then(|s| {
                let parsed = s.parse::<Uri>().ok().filter(|u| {
                    matches!(u.scheme_str(), Some("http" | "https"))
                        && u.authority().is_some_and(|a| !a.host().is_empty())
                });
                if parsed.is_none() {
                    self.err(
                        join(p, "url"),
                        Some(v.span()),
                        format!(
                            "invalid URL {s:?}: expected http:// or https://, a host, any path"
                        ),
                    );
                }
                parsed
            }),
        };
        let events = match t.get("events") {
            None => Some(HookEvent::ALL.to_vec()),
            Some(v) => {
                let path = join(p, "events");
                match v.get_ref() {
                    DeValue::Array(items) if !items.is_empty() => {
                        let mut out = Vec::new();
                        let mut ok = true;
                        for (i, item) in items.iter().enumerate() {
                            let name = match item.get_ref() {
                                DeValue::String(s) => {
                                    HookEvent::parse(s).filter(|e| !out.contains(e))
                                }
                                _ => None,
                            };
                            match name {
                                Some(e) => out.push(e),
                                None => {
                                    let all: Vec<&str> =
                                        HookEvent::ALL.iter().map(|e| e.as_str()).collect();
                                    self.err(
                                        format!("{path}[{i}]"),
                                        Some(item.span()),
                                        format!(
                                            "expected a hook type, once each: {}",
                                            all.join(", ")
                                        ),
                                    );
                                    ok = false;
                                }
                            }
                        }
                        ok.then_some(out)
                    }
                    _ => {
                        self.err(
                            path,
                            Some(v.span()),
                            "expected a non-empty list of hook types such as [\"rollout\", \"rollback\"]",
                        );
                        None
                    }
                }
            }
        };
        let timeout = self.duration(t, p, "timeout", Duration::from_secs(5));
        let retries = self.int(t, p, "retries", 3, 0..=20);
        let secret_file = self.opt_path(t, p, "secret_file");
        let metadata = match t.get("metadata") {
            None => Some(Default::default()),
            Some(v) => match v.get_ref() {
                DeValue::Table(m) => {
                    let mut out = std::collections::BTreeMap::new();
                    let mut ok = true;
                    for (k, val) in m.iter() {
                        match val.get_ref() {
                            DeValue::String(s) => {
                                out.insert(k.get_ref().to_string(), s.to_string());
                            }
                            other => {
                                self.err(
                                    join(&join(p, "metadata"), k.get_ref()),
                                    Some(val.span()),
                                    format!("expected a string, found {}", other.type_str()),
                                );
                                ok = false;
                            }
                        }
                    }
                    ok.then_some(out)
                }
                other => {
                    self.err(
                        join(p, "metadata"),
                        Some(v.span()),
                        format!("expected a table of strings, found {}", other.type_str()),
                    );
                    None
                }
            },
        };
        Some(WebhookConfig {
            url: url?,
            events: events?,
            timeout: timeout?,
            retries: u32::try_from(retries?).ok()?,
            secret_file,
            metadata: metadata?,
        })
    }

    fn shadow(
        &mut self,
        t: &Table<'_>,
        span: Option<Range<usize>>,
        ups: &[UpstreamConfig],
    ) -> Option<ShadowConfig> {
        let p = "shadow";
        let upstream = match t.get("upstream") {
            None => {
                self.err(
                    join(p, "upstream"),
                    span,
                    "missing required key `upstream` (the [[upstream]] the copies go to)",
                );
                None
            }
            Some(v) => self.string(t, p, "upstream").and_then(|name| {
                if ups.iter().any(|u| u.name == name) {
                    Some(name)
                } else {
                    let names: Vec<&str> = ups.iter().map(|u| u.name.as_str()).collect();
                    self.err(
                        join(p, "upstream"),
                        Some(v.span()),
                        format!(
                            "unknown upstream {name:?}; add it as an [[upstream]] (weight 0 \
                             keeps users off it); upstreams are: {}",
                            names.join(", ")
                        ),
                    );
                    None
                }
            }),
        };
        let percent = match t.get("percent") {
            None => Some(10_000),
            Some(v) => self.weight(&join(p, "percent"), v),
        };
        let noise = match t.get("noise_percent") {
            None => Some(0),
            Some(v) => self.weight(&join(p, "noise_percent"), v),
        };
        let methods = match t.get("methods") {
            None => Some(vec![http::Method::GET, http::Method::HEAD]),
            Some(v) => self.strings(t, p, "methods").and_then(|list| {
                let mut out = Vec::new();
                for m in list {
                    match http::Method::from_bytes(m.to_ascii_uppercase().as_bytes()) {
                        Ok(method) if !m.is_empty() => out.push(method),
                        _ => {
                            self.err(
                                join(p, "methods"),
                                Some(v.span()),
                                format!("invalid method {m:?}"),
                            );
                            return None;
                        }
                    }
                }
                Some(out)
            }),
        };
        let max_body_bytes = self.int(t, p, "max_body_bytes", 1 << 20, 0..=1 << 30);
        let max_in_flight = self.int(t, p, "max_in_flight", 64, 1..=100_000);
        let compare = self.pointers(t, p, "compare");
        let ignore = self.pointers(t, p, "ignore");
        let numeric_tolerance = match t.get("numeric_tolerance") {
            None => Some(0.0),
            Some(v) => match number(v.get_ref()) {
                Some(x) if x >= 0.0 && x.is_finite() => Some(x),
                _ => {
                    self.err(
                        join(p, "numeric_tolerance"),
                        Some(v.span()),
                        "expected a number >= 0 (the |a - b| allowed between numbers)",
                    );
                    None
                }
            },
        };
        Some(ShadowConfig {
            upstream: upstream?,
            percent_bp: percent?,
            methods: methods?,
            max_body_bytes: usize::try_from(max_body_bytes?).ok()?,
            max_in_flight: usize::try_from(max_in_flight?).ok()?,
            compare: compare?,
            numeric_tolerance: numeric_tolerance?,
            ignore: ignore?,
            noise_bp: noise?,
        })
    }

    fn response_analysis(&mut self, t: &Table<'_>) -> Option<ResponseAnalysisConfig> {
        let p = "analysis";
        let label_pointer = self.pointer(t, p, "label_pointer");
        let score_pointer = self.pointer(t, p, "score_pointer");
        let max_body_bytes = self.int(t, p, "max_body_bytes", 65_536, 1..=1 << 24);
        let max_drift = match t.get("max_drift") {
            None => Some(None),
            Some(v) => match number(v.get_ref()) {
                Some(x) if x > 0.0 && x < 1.0 => Some(Some(x)),
                _ => {
                    self.err(
                        join(p, "max_drift"),
                        Some(v.span()),
                        "expected a distance between 0 and 1 (0.1: a Jensen-Shannon or KS \
                         distance of 0.1 between the canary's and the baseline's answers)",
                    );
                    None
                }
            },
        };
        let (label_pointer, score_pointer) = (label_pointer?, score_pointer?);
        if label_pointer.is_none() && score_pointer.is_none() {
            self.err(
                p,
                None,
                "[analysis] needs label_pointer, score_pointer or both (JSON pointers such as \
                 \"/prediction\")",
            );
            return None;
        }
        Some(ResponseAnalysisConfig {
            label_pointer,
            score_pointer,
            max_body_bytes: usize::try_from(max_body_bytes?).ok()?,
            max_drift: max_drift?,
        })
    }

    /// An optional JSON pointer: "" or starting with "/". Outer `None`: invalid.
    fn pointer(&mut self, t: &Table<'_>, p: &str, key: &str) -> Option<Option<String>> {
        let Some(v) = t.get(key) else {
            return Some(None);
        };
        let s = self.string(t, p, key)?;
        if s.is_empty() || s.starts_with('/') {
            Some(Some(s))
        } else {
            self.err(
                join(p, key),
                Some(v.span()),
                format!("invalid JSON pointer {s:?}: it starts with \"/\", e.g. \"/prediction\""),
            );
            None
        }
    }

    /// A list of JSON pointers (empty when absent).
    fn pointers(&mut self, t: &Table<'_>, p: &str, key: &str) -> Option<Vec<String>> {
        let Some(v) = t.get(key) else {
            return Some(Vec::new());
        };
        let list = self.strings(t, p, key)?;
        if let Some(bad) = list.iter().find(|s| !(s.is_empty() || s.starts_with('/'))) {
            self.err(
                join(p, key),
                Some(v.span()),
                format!(
                    "invalid JSON pointer {bad:?}: each starts with \"/\", e.g. \"/prediction\""
                ),
            );
            return None;
        }
        Some(list)
    }

    /// A list of strings.
    fn strings(&mut self, t: &Table<'_>, p: &str, key: &str) -> Option<Vec<String>> {
        let v = t.get(key)?;
        let DeValue::Array(items) = v.get_ref() else {
            self.err(join(p, key), Some(v.span()), "expected a list of strings");
            return None;
        };
        let mut out = Vec::new();
        for item in items {
            match item.get_ref() {
                DeValue::String(s) => out.push(s.to_string()),
                other => {
                    self.err(
                        join(p, key),
                        Some(item.span()),
                        format!("expected a list of strings, found {}", other.type_str()),
                    );
                    return None;
                }
            }
        }
        Some(out)
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::config::{Config, ConfigError, HookEvent, OnInconclusive, RolloutStart};

    fn errors(text: &str) -> Vec<ConfigError> {
        match Config::parse(text) {
            Ok(c) => panic!("expected errors, parsed {c:?}\n{text}"),
            Err(e) => e.0,
        }
    }

    fn show(errs: &[ConfigError]) -> String {
        errs.iter()
            .map(|e| format!("  {:?} line {:?}: {}", e.path, e.line, e.message))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Exactly the errors `want` (key path, line, a fragment of the message), in any order.
    #[track_caller]
    fn assert_errors(text: &str, want: &[(&str, usize, &str)]) {
        let errs = errors(text);
        let mut got: Vec<(&str, Option<usize>)> =
            errs.iter().map(|e| (e.path.as_str(), e.line)).collect();
        let mut expected: Vec<(&str, Option<usize>)> =
            want.iter().map(|&(p, l, _)| (p, Some(l))).collect();
        got.sort_unstable_by_key(|&(p, l)| (l, p));
        expected.sort_unstable_by_key(|&(p, l)| (l, p));
        assert_eq!(got, expected, "errors:\n{}\nfile:\n{text}", show(&errs));
        for &(path, line, fragment) in want {
            let e = errs
                .iter()
                .find(|e| e.path == path && e.line == Some(line))
                .expect("matched above");
            assert!(
                e.message.contains(fragment),
                "{path} (line {line}): {:?} does not contain {fragment:?}",
                e.message
            );
        }
    }

    /// Two valid upstreams; `canary_url` and the weights are spliced in. The canary's `url` is
    /// on line 8 and its `weight` on line 9.
    fn two_arms(stable_weight: &str, canary_url: &str, canary_weight: &str) -> String {
        format!(
            r#"[[upstream]]
name = "stable"
url = "http://127.0.0.1:9000"
weight = {stable_weight}

[[upstream]]
name = "canary"
url = "{canary_url}"
weight = {canary_weight}
"#
        )
    }

    #[test]
    fn pins_and_warmup_and_http2_streams_take_their_defaults_and_report_mistakes() {
        let arms = two_arms("90", "http://127.0.0.1:9001", "10");
        let c = Config::parse(&arms).expect("valid");
        assert!(c.routing.pins.is_empty());
        assert_eq!(c.listen.http2_max_concurrent_streams, 100);
        assert!(c.upstreams.iter().all(|u| u.warmup.is_none()));

        let ok = format!(
            "[listen]\nhttp2_max_concurrent_streams = 250\n\n{arms}warmup = \"30s\"\nwarmup_path = \"/warm\"\n\n[routing.pins]\n\"qa-1\" = \"canary\"\n"
        );
        let c = Config::parse(&ok).expect("valid");
        assert_eq!(c.listen.http2_max_concurrent_streams, 250);
        assert_eq!(
            c.routing.pins.get("qa-1").map(String::as_str),
            Some("canary")
        );
        assert_eq!(
            c.upstreams[1].warmup,
            Some(crate::config::Warmup {
                duration: Duration::from_secs(30),
                path: Some("/warm".into()),
                requests: 10,
            })
        );

        let bad = format!(
            "[listen]\nhttp2_max_concurrent_streams = 0\n\n{arms}warmup_requests = 5\n\n[routing.pins]\n\"qa-1\" = \"canry\"\n"
        );
        assert_errors(
            &bad,
            &[
                ("listen.http2_max_concurrent_streams", 2, "1..=10000"),
                ("upstream[1].warmup_requests", 13, "only used with `warmup`"),
                (
                    "routing.pins.\"qa-1\"",
                    16,
                    "unknown upstream \"canry\"; upstreams are: stable, canary",
                ),
            ],
        );
        let pooled = "[[upstream]]\nname = \"stable\"\nurl = \"http://127.0.0.1:9000\"\nweight = 100\nmax_connections = 8\n";
        assert_eq!(
            Config::parse(pooled).expect("valid").upstreams[0].max_connections,
            8
        );
        assert_eq!(c.upstreams[0].max_connections, 1024);
        let h2_pooled = "[[upstream]]\nname = \"stable\"\nurl = \"http://127.0.0.1:9000\"\nweight = 100\nhttp2 = true\nmax_connections = 8\n";
        assert_eq!(
            Config::parse(h2_pooled).expect("valid").upstreams[0].max_connections,
            8
        );
        let baseline_warmup = "[[upstream]]\nname = \"stable\"\nurl = \"http://127.0.0.1:9000\"\nweight = 100\nwarmup = \"10s\"\n";
        assert_errors(
            baseline_warmup,
            &[("upstream[0].warmup", 5, "is the baseline")],
        );
    }

    #[test]
    fn shadow_and_response_analysis_take_their_defaults_and_report_mistakes() {
        let arms = two_arms("90", "http://127.0.0.1:9001", "10");
        let ok = format!(
            "{arms}\n[shadow]\nupstream = \"canary\"\ncompare = [\"/prediction\"]\n\n[analysis]\nlabel_pointer = \"/prediction\"\n"
        );
        let c = Config::parse(&ok).expect("valid");
        let sh = c.shadow.expect("shadow");
        assert_eq!(sh.upstream, "canary");
        assert_eq!(sh.percent_bp, 10_000);
        assert_eq!(sh.methods, vec![http::Method::GET, http::Method::HEAD]);
        assert_eq!((sh.max_body_bytes, sh.max_in_flight), (1 << 20, 64));
        assert_eq!(sh.compare, vec!["/prediction".to_owned()]);
        assert_eq!((sh.numeric_tolerance, sh.noise_bp), (0.0, 0));
        let a = c.response_analysis.expect("analysis");
        assert_eq!(a.label_pointer.as_deref(), Some("/prediction"));
        assert_eq!(
            (a.score_pointer, a.max_body_bytes, a.max_drift),
            (None, 65_536, None)
        );

        let bad = format!(
            r#"{arms}
[shadow]
upstream = "candidate"
percent = 120
methods = ["GET", "P O S T"]
compare = ["prediction"]
numeric_tolerance = -1

[analysis]
label_pointer = "label"
max_drift = 2
"#
        );
        assert_errors(
            &bad,
            &[
                ("shadow.upstream", 12, "unknown upstream \"candidate\""),
                ("shadow.percent", 13, "outside 0..=100"),
                ("shadow.methods", 14, "invalid method"),
                ("shadow.compare", 15, "invalid JSON pointer \"prediction\""),
                ("shadow.numeric_tolerance", 16, "expected a number >= 0"),
                ("analysis.label_pointer", 19, "invalid JSON pointer"),
                ("analysis.max_drift", 20, "between 0 and 1"),
            ],
        );
    }

    #[test]
    fn rollout_and_webhooks_take_their_defaults() {
        let text = format!(
            "{}\n[rollout]\n\n[[webhook]]\nurl = \"https://ci.example/hooks/canary\"\n",
            two_arms("90", "http://127.0.0.1:9001", "10")
        );
        let c = Config::parse(&text).expect("valid");
        let r = c.rollout.expect("a rollout");
        assert_eq!(r.upstream, "canary");
        assert_eq!(r.steps, vec![500, 2500, 5000, 7500, 10_000]);
        assert_eq!(r.min_step_duration, Duration::from_secs(300));
        assert_eq!(r.min_requests, 500);
        assert_eq!(r.max_step_duration, Duration::from_secs(1800));
        assert_eq!(r.on_inconclusive, OnInconclusive::Hold);
        assert_eq!(r.start, RolloutStart::Manual);
        let w = &c.webhooks[0];
        assert_eq!(w.url.to_string(), "https://ci.example/hooks/canary");
        assert_eq!(w.events, HookEvent::ALL.to_vec());
        assert_eq!((w.timeout, w.retries), (Duration::from_secs(5), 3));
        assert!(w.secret_file.is_none() && w.metadata.is_empty());
        let none = Config::parse(&two_arms("90", "http://127.0.0.1:9001", "10")).expect("valid");
        assert!(none.rollout.is_none() && none.webhooks.is_empty());
    }

    #[test]
    fn rollout_and_webhook_mistakes_are_each_reported() {
        let text = format!(
            r#"{}
[rollout]
upstream = "stable"
steps = [5, 0, 25, 20, 100.5]
min_step_duration = "10m"
max_step_duration = "5m"
on_inconclusive = "wait"
start = "now"

[[webhook]]
url = "ftp://ci.example"
events = ["rollout", "deploy", "rollout"]
retries = 99
metadata = {{ team = 7 }}
"#,
            two_arms("90", "http://127.0.0.1:9001", "10")
        );
        assert_errors(
            &text,
            &[
                ("rollout.upstream", 12, "is the baseline"),
                ("rollout.steps[1]", 13, "above 0%"),
                (
                    "rollout.steps[3]",
                    13,
                    "steps must increase: 20% follows 25%",
                ),
                ("rollout.steps[4]", 13, "outside 0..=100"),
                (
                    "rollout.max_step_duration",
                    15,
                    "shorter than min_step_duration",
                ),
                (
                    "rollout.on_inconclusive",
                    16,
                    "expected \"hold\" or \"rollback\"",
                ),
                ("rollout.start", 17, "expected \"manual\" or \"on_new_url\""),
                ("webhook[0].url", 20, "expected http:// or https://"),
                ("webhook[0].events[1]", 21, "expected a hook type"),
                ("webhook[0].events[2]", 21, "once each"),
                ("webhook[0].retries", 22, "expected an integer in 0..=20"),
                ("webhook[0].metadata.team", 23, "expected a string"),
            ],
        );
    }

    #[test]
    fn a_rollout_with_several_canaries_names_its_arm() {
        let text = r#"[[upstream]]
name = "stable"
url = "http://127.0.0.1:9000"
weight = 80
[[upstream]]
name = "a"
url = "http://127.0.0.1:9001"
weight = 10
[[upstream]]
name = "b"
url = "http://127.0.0.1:9002"
weight = 10
[rollout]
steps = [10]
"#;
        assert_errors(text, &[("rollout.upstream", 13, "name the one to release")]);
    }

    #[test]
    fn unknown_keys_are_reported_in_every_section() {
        let text = r#"[listen]
adr = "0.0.0.0:8080"
colour = "blue"

[admin]
tokn_file = "/etc/canaryd/token"

[routing]
stiky_header = "x-user-id"

[[upstream]]
name = "stable"
url = "http://127.0.0.1:9000"
weight = 90

[[upstream]]
name = "canary"
url = "http://127.0.0.1:9001"
weight = 10
htp2 = true

[rollback]
windw = "30s"

[state]
fiel = "/var/lib/canaryd/state.json"

[rollbak]
enabled = false
"#;
        assert_errors(
            text,
            &[
                ("listen.adr", 2, "unknown key `adr` (did you mean `addr`?)"),
                (
                    "listen.colour",
                    3,
                    "unknown key `colour`; expected one of: addr,",
                ),
                ("admin.tokn_file", 6, "did you mean `token_file`?"),
                ("routing.stiky_header", 9, "did you mean `sticky_header`?"),
                ("upstream[1].htp2", 20, "did you mean `http2`?"),
                ("rollback.windw", 23, "did you mean `window`?"),
                ("state.fiel", 26, "did you mean `file`?"),
                ("rollbak", 28, "did you mean `rollback`?"),
            ],
        );
        let colour = errors(text)
            .into_iter()
            .find(|e| e.path == "listen.colour")
            .expect("colour");
        assert!(
            !colour.message.contains("did you mean"),
            "no hint for a key nothing resembles: {}",
            colour.message
        );
    }

    #[test]
    fn wrong_types_name_the_expected_and_found_type() {
        let text = r#"[listen]
access_log = "yes"
max_connections = "many"

[admin]
addr = 9901

[routing]
salt = 5

[[upstream]]
name = "stable"
url = "http://127.0.0.1:9000"
weight = 90
http2 = 1

[[upstream]]
name = "canary"
url = "http://127.0.0.1:9001"
weight = "ten"

[rollback]
enabled = "no"
min_requests = 1.5
max_error_rate = 2
error_statuses = "5xx"
max_p99_ratio = 0.5

[state]
file = 1
"#;
        assert_errors(
            text,
            &[
                (
                    "listen.access_log",
                    2,
                    "expected true or false, found string",
                ),
                (
                    "listen.max_connections",
                    3,
                    "expected an integer in 1..=1000000",
                ),
                ("admin.addr", 6, "expected a string, found integer"),
                ("routing.salt", 9, "expected a string, found integer"),
                (
                    "upstream[0].http2",
                    15,
                    "expected true or false, found integer",
                ),
                (
                    "upstream[1].weight",
                    20,
                    "expected a number (percent), found string",
                ),
                (
                    "rollback.enabled",
                    23,
                    "expected true or false, found string",
                ),
                (
                    "rollback.min_requests",
                    24,
                    "expected an integer in 1..=1000000000",
                ),
                ("rollback.max_error_rate", 25, "fraction between 0 and 1"),
                ("rollback.error_statuses", 26, "expected a list"),
                ("rollback.max_p99_ratio", 27, "greater than 1"),
                ("state.file", 30, "expected a string, found integer"),
            ],
        );
    }

    #[test]
    fn misshapen_sections_and_entries() {
        let arms = two_arms("90", "http://127.0.0.1:9001", "10");
        assert_errors(
            &format!("listen = 5\n{arms}"),
            &[("listen", 1, "expected a table [listen], found integer")],
        );
        assert_errors(
            "[upstream]\nname = \"stable\"\nurl = \"http://127.0.0.1:9000\"\nweight = 100\n",
            &[("upstream", 1, "expected an array of tables [[upstream]]")],
        );
        assert_errors(
            "upstream = [1]\n",
            &[("upstream[0]", 1, "expected a table")],
        );
        assert_errors(
            "[[upstream]]\nname = \"stable\"\n",
            &[
                ("upstream[0].url", 1, "missing required key `url`"),
                ("upstream[0].weight", 1, "missing required key `weight`"),
            ],
        );
        assert_errors(
            &format!("{arms}\n[[upstream]]\nurl = \"http://127.0.0.1:9002\"\nweight = 0\n"),
            &[("upstream[2].name", 11, "missing required key `name`")],
        );
        assert_errors(
            &two_arms("90", "http://127.0.0.1:9001", "10").replace("\"canary\"", "\"can ary\""),
            &[("upstream[1].name", 7, "invalid name \"can ary\"")],
        );
    }

    #[test]
    fn bad_durations() {
        let text = r#"[listen]
request_timeout = "soon"
idle_timeout = "0s"
drain_timeout = 20

[[upstream]]
name = "stable"
url = "http://127.0.0.1:9000"
weight = 100
connect_timeout = "2 parsecs"

[rollback]
window = "-1s"
max_p99_increase = "fast"
"#;
        assert_errors(
            text,
            &[
                ("listen.request_timeout", 2, "invalid duration \"soon\""),
                (
                    "listen.idle_timeout",
                    3,
                    "duration must be greater than zero",
                ),
                (
                    "listen.drain_timeout",
                    4,
                    "expected a string, found integer",
                ),
                (
                    "upstream[0].connect_timeout",
                    10,
                    "invalid duration \"2 parsecs\"",
                ),
                ("rollback.window", 13, "invalid duration \"-1s\""),
                ("rollback.max_p99_increase", 14, "invalid duration \"fast\""),
            ],
        );
        let good = text
            .replace("\"soon\"", "\"250ms\"")
            .replace("\"0s\"", "\"2m\"")
            .replace("= 20", "= \"1h 30m\"")
            .replace("\"2 parsecs\"", "\"1500ms\"")
            .replace("\"-1s\"", "\"45s\"")
            .replace("\"fast\"", "\"50ms\"");
        let c = Config::parse(&good).expect("valid durations");
        let ms = std::time::Duration::from_millis;
        assert_eq!(c.listen.request_timeout, ms(250));
        assert_eq!(c.listen.idle_timeout, ms(120_000));
        assert_eq!(c.listen.drain_timeout, ms(5_400_000));
        assert_eq!(c.upstreams[0].connect_timeout, ms(1500));
        assert_eq!(c.rollback.window, ms(45_000));
        assert_eq!(c.rollback.max_p99_increase, Some(ms(50)));
    }

    #[test]
    fn weights_must_sum_to_100_and_the_error_gives_the_sum() {
        let text = format!(
            "[listen]\naddr = \"127.0.0.1:8080\"\n\n{}",
            two_arms("90", "http://127.0.0.1:9001", "12.5")
        );
        // The sum belongs to the whole array: reported at the first [[upstream]] (line 4).
        assert_errors(
            &text,
            &[(
                "upstream",
                4,
                "weights must sum to 100, they sum to 102.5 (stable=90, canary=12.5)",
            )],
        );
        assert_errors(
            &two_arms("89.99", "http://127.0.0.1:9001", "10"),
            &[("upstream", 1, "they sum to 99.99 (stable=89.99, canary=10)")],
        );
        // An out-of-range weight is reported on its own line, and no sum is claimed.
        assert_errors(
            &two_arms("-5", "http://127.0.0.1:9001", "105"),
            &[
                ("upstream[0].weight", 4, "weight -5 is outside 0..=100"),
                ("upstream[1].weight", 9, "weight 105 is outside 0..=100"),
            ],
        );
    }

    #[test]
    fn weights_take_at_most_two_decimals() {
        assert_errors(
            &two_arms("89.995", "http://127.0.0.1:9001", "10.005"),
            &[
                (
                    "upstream[0].weight",
                    4,
                    "weight 89.995 has more than 2 decimals",
                ),
                (
                    "upstream[1].weight",
                    9,
                    "weight 10.005 has more than 2 decimals",
                ),
            ],
        );
        // Two decimals are exact, whatever binary floating point makes of them.
        for bp in [1u16, 7, 29, 57, 115, 3333, 5785, 9999, 10_000] {
            let pct = |bp: u16| format!("{}.{:02}", bp / 100, bp % 100);
            let text = two_arms(&pct(10_000 - bp), "http://127.0.0.1:9001", &pct(bp));
            let c = Config::parse(&text).unwrap_or_else(|e| panic!("{bp}: {e}\n{text}"));
            assert_eq!(c.weights_bp(), vec![10_000 - bp, bp], "{text}");
        }
    }

    #[test]
    fn duplicate_upstream_names() {
        let text = format!(
            "{}\n[[upstream]]\nname = \"stable\"\nurl = \"http://127.0.0.1:9002\"\nweight = 0\n",
            two_arms("90", "http://127.0.0.1:9001", "10")
        );
        assert_errors(
            &text,
            &[("upstream[2].name", 12, "duplicate upstream name \"stable\"")],
        );
    }

    #[test]
    fn unknown_baseline() {
        let text = format!(
            "[routing]\nbaseline = \"prod\"\n\n{}",
            two_arms("90", "http://127.0.0.1:9001", "10")
        );
        assert_errors(
            &text,
            &[(
                "routing.baseline",
                2,
                "baseline \"prod\" is not an upstream; upstreams are: stable, canary",
            )],
        );
        let named = text.replace("\"prod\"", "\"canary\"");
        assert_eq!(Config::parse(&named).expect("valid").baseline, 1);
    }

    #[test]
    fn bad_upstream_urls() {
        for (url, fragment) in [
            ("http://127.0.0.1:9001/api", "has a path"),
            ("http://127.0.0.1:9001/?debug=1", "has a path"),
            (
                "ftp://127.0.0.1:9001",
                "must start with http:// or https://",
            ),
            ("127.0.0.1:9001", "must start with http:// or https://"),
            (
                "http://user:pw@127.0.0.1:9001",
                "must not carry credentials",
            ),
            ("not a url", "invalid URL"),
            ("", "invalid URL"),
        ] {
            let text = two_arms("90", url, "10");
            let errs = errors(&text);
            assert_eq!(errs.len(), 1, "{url:?}:\n{}", show(&errs));
            let e = &errs[0];
            assert_eq!(
                (e.path.as_str(), e.line),
                ("upstream[1].url", Some(8)),
                "{url:?}"
            );
            assert!(e.message.contains(fragment), "{url:?}: {}", e.message);
        }
        for url in [
            "http://127.0.0.1:9001/",
            "https://model.internal:8443",
            "http://[::1]:9001",
        ] {
            let text = two_arms("90", url, "10");
            if let Err(e) = Config::parse(&text) {
                panic!("{url:?} is valid: {e}");
            }
        }
    }

    #[test]
    fn bad_header_names() {
        let arms = two_arms("90", "http://127.0.0.1:9001", "10");
        let routing = |sticky: &str, over: &str, resp: &str| {
            format!(
                "[routing]\nsticky_header = \"{sticky}\"\noverride_header = \"{over}\"\n\
                 response_header = \"{resp}\"\n\n{arms}"
            )
        };
        assert_errors(
            &routing("x user", "x(y)", "bad:header"),
            &[
                (
                    "routing.sticky_header",
                    2,
                    "\"x user\" is not a valid HTTP header name",
                ),
                (
                    "routing.override_header",
                    3,
                    "\"x(y)\" is not a valid HTTP header name",
                ),
                (
                    "routing.response_header",
                    4,
                    "\"bad:header\" is not a valid HTTP header name",
                ),
            ],
        );
        // The sticky header cannot be turned off; the other two can.
        assert_errors(
            &routing("", "", ""),
            &[("routing.sticky_header", 2, "must not be empty")],
        );
        let c = Config::parse(&routing("X-Tenant", "", "")).expect("valid");
        assert_eq!(c.routing.sticky_header.as_str(), "x-tenant");
        assert_eq!(c.routing.override_header, None);
        assert_eq!(c.routing.response_header, None);
    }

    #[test]
    fn invalid_toml_reports_the_parsers_line() {
        for (text, line) in [
            ("[listen]\naddr = \"a\"\naddr = \"b\"\n", 3),
            ("[listen]\n\n[listen]\n", 3),
            ("[listen]\naddr = \n", 2),
            (
                "[[upstream]]\nname = \"unterminated\nurl = \"http://x:1\"\n",
                2,
            ),
            ("\n\n[listen\naddr = \"x\"\n", 3),
            ("[[upstream]]\nname = \"a\"\nweight = 50 50\n", 3),
        ] {
            let errs = errors(text);
            assert_eq!(errs.len(), 1, "{text:?}:\n{}", show(&errs));
            let e = &errs[0];
            assert_eq!(e.path, "", "{text:?}");
            assert_eq!(e.line, Some(line), "{text:?}: {}", e.message);
            assert!(e.message.starts_with("invalid TOML: "), "{}", e.message);
            assert_eq!(
                e.to_string(),
                format!("line {line}: {}", e.message),
                "whole-file errors print their line"
            );
        }
    }

    #[test]
    fn status_list_entries_are_checked_one_by_one() {
        let text = format!(
            "[rollback]\nerror_statuses = [\"5xx\", \"6xx\", 429, \"abc\", 600]\n\n{}",
            two_arms("90", "http://127.0.0.1:9001", "10")
        );
        assert_errors(
            &text,
            &[
                ("rollback.error_statuses[1]", 2, "expected \"5xx\""),
                ("rollback.error_statuses[3]", 2, "expected \"5xx\""),
                ("rollback.error_statuses[4]", 2, "expected \"5xx\""),
            ],
        );
    }

    /// Eleven independent problems, one per line, in every section; used by the two tests below.
    const MANY_PROBLEMS: &str = r#"[listen]
addr = "0.0.0.0:80800"
request_timeout = "soon"
acess_log = true

[admin]
addr = "127.0.0.1:9901"
token_file = 7

[routing]
sticky_header = "x user"
baseline = "prod"

[[upstream]]
name = "stable"
url = "http://127.0.0.1:9000"
weight = 90

[[upstream]]
name = "canary"
url = "ftp://127.0.0.1:9001"
weight = 10.005

[[upstream]]
name = "stable"
url = "http://127.0.0.1:9002"
weight = 0

[rollback]
windw = "30s"
error_statuses = ["5xx", "6xx"]
"#;

    /// In file order.
    const MANY_EXPECTED: &[(&str, usize, &str)] = &[
        ("listen.addr", 2, "invalid address \"0.0.0.0:80800\""),
        ("listen.request_timeout", 3, "invalid duration"),
        ("listen.acess_log", 4, "did you mean `access_log`?"),
        ("admin.token_file", 8, "expected a string, found integer"),
        ("routing.sticky_header", 11, "not a valid HTTP header name"),
        (
            "routing.baseline",
            12,
            "baseline \"prod\" is not an upstream",
        ),
        ("upstream[1].url", 21, "must start with http:// or https://"),
        ("upstream[1].weight", 22, "more than 2 decimals"),
        ("upstream[2].name", 25, "duplicate upstream name"),
        ("rollback.windw", 30, "did you mean `window`?"),
        ("rollback.error_statuses[1]", 31, "expected \"5xx\""),
    ];

    #[test]
    fn n_independent_problems_yield_exactly_n_errors() {
        assert_errors(MANY_PROBLEMS, MANY_EXPECTED);
    }

    #[test]
    fn errors_are_listed_in_file_order() {
        let errs = errors(MANY_PROBLEMS);
        let got: Vec<(&str, Option<usize>)> =
            errs.iter().map(|e| (e.path.as_str(), e.line)).collect();
        let want: Vec<(&str, Option<usize>)> = MANY_EXPECTED
            .iter()
            .map(|&(p, l, _)| (p, Some(l)))
            .collect();
        assert_eq!(got, want, "errors:\n{}", show(&errs));
    }

    #[test]
    fn a_problem_in_the_baselines_entry_does_not_also_report_an_unknown_baseline() {
        let text = format!(
            "[routing]\nbaseline = \"stable\"\n\n{}",
            two_arms("90", "http://127.0.0.1:9001", "10")
                .replace("http://127.0.0.1:9000", "http://127.0.0.1:9000/api")
        );
        // One problem (line 6: the url has a path): one error. "stable" is an upstream.
        assert_errors(&text, &[("upstream[0].url", 6, "has a path")]);
    }
}
