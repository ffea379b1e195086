//! The admin API: a plain match on method and path, JSON in and out (the calls are listed
//! in the README, "Admin API").
//!
//! Reads are open; PUT/POST need `Authorization: Bearer <token>` when a token is configured.
//! Every refusal is `{"error": "..."}` with a precise message, and a refused call changes
//! nothing: requests are fully parsed and validated before the control plane is touched.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{json, Map, Value};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::analysis::compare::{Check, Report, SampleReport};
use crate::control::state::Trip;
use crate::control::{ChangeError, Control, View};
use crate::release::circuit::Ledger;
use crate::release::rollout::{Context, Rollout, RolloutError, Rollouts};
use crate::release::webhook::Webhooks;
use crate::routing::BASIS_POINTS;

mod dashboard;

/// Largest admin request body.
pub const MAX_BODY: usize = 64 * 1024;
/// How much of an oversized body is read and dropped, for at most [`DRAIN_TIME`], before the
/// 413 goes out: a client still sending then reads the answer, where closing on unread bytes
/// would reset the connection under it (the lingering close nginx and HAProxy do).
const DRAIN_MAX: usize = 1024 * 1024;
const DRAIN_TIME: Duration = Duration::from_secs(1);

/// Shared state of the admin API.
#[derive(Debug)]
pub struct Admin {
    /// The control plane.
    pub control: Arc<Control>,
    /// Per-arm recent windows and analyses for `/status`.
    pub ledger: Arc<Ledger>,
    /// Bearer token for mutating calls.
    pub token: Option<String>,
    /// `/readyz` answers 200 while set.
    pub ready: Arc<AtomicBool>,
    /// The progressive rollout.
    pub rollouts: Arc<Rollouts>,
    /// Webhook calls of the rollout.
    pub webhooks: Arc<Webhooks>,
}

impl std::fmt::Debug for Webhooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhooks")
            .field("queued", &self.queued())
            .finish()
    }
}

type Resp = Response<Full<Bytes>>;

/// A refused admin call: its status and the `{"error": ...}` message.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
    allow: Option<&'static str>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            allow: None,
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    fn into_response(self) -> Resp {
        let mut r = json_response(self.status, &json!({ "error": self.message }));
        if let Some(allow) = self.allow {
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

impl From<RolloutError> for ApiError {
    fn from(e: RolloutError) -> Self {
        match e {
            RolloutError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, m),
            RolloutError::NotConfigured(m) => ApiError::bad_request(m),
        }
    }
}

impl From<ChangeError> for ApiError {
    fn from(e: ChangeError) -> Self {
        match e {
            ChangeError::Invalid(m) => ApiError::bad_request(m),
            ChangeError::Tripped(m) => ApiError::new(StatusCode::CONFLICT, m),
        }
    }
}

fn json_response(status: StatusCode, body: &Value) -> Resp {
    let mut text = body.to_string();
    text.push('\n');
    let mut resp = Response::new(Full::new(Bytes::from(text)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// Weight in basis points as a JSON percentage: `1250` → `12.5`, `9000` → `90`.
fn pct(bp: u16) -> Value {
    if bp % 100 == 0 {
        json!(bp / 100)
    } else {
        json!(f64::from(bp) / 100.0)
    }
}

fn rfc3339_ms(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

const PATHS: &[(&str, &str)] = &[
    ("/", "GET"),
    ("/weights", "GET, PUT"),
    ("/promote", "POST"),
    ("/rollback", "POST"),
    ("/reset", "POST"),
    ("/status", "GET"),
    ("/rollout", "GET"),
    ("/shadow", "GET"),
    ("/shadow/diffs", "GET"),
    ("/rollout/start", "POST"),
    ("/rollout/pause", "POST"),
    ("/rollout/resume", "POST"),
    ("/rollout/abort", "POST"),
    ("/route", "GET"),
    ("/preview", "GET, POST"),
    ("/metrics", "GET"),
    ("/healthz", "GET"),
    ("/readyz", "GET"),
];

impl Admin {
    /// Handles one admin request.
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Result<Resp, Infallible> {
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let resp = self
            .call(&method, &path, req)
            .await
            .unwrap_or_else(ApiError::into_response);
        if method != Method::GET {
            tracing::debug!(%method, %path, status = resp.status().as_u16(), "admin call");
        }
        Ok(resp)
    }

    async fn call(
        &self,
        method: &Method,
        path: &str,
        req: Request<Incoming>,
    ) -> Result<Resp, ApiError> {
        match (method, path) {
            (&Method::GET, "/") => Ok(dashboard::page()),
            (&Method::GET, "/weights") => Ok(self.get_weights()),
            (&Method::PUT, "/weights") => {
                self.authorize(&req)?;
                let body = read_json(req).await?;
                self.put_weights(body)
            }
            (&Method::POST, "/promote") => {
                self.authorize(&req)?;
                let body = read_json(req).await?;
                self.promote(body)
            }
            (&Method::POST, "/rollback") => {
                self.authorize(&req)?;
                self.control.rollback_all();
                Ok(self.get_weights())
            }
            (&Method::POST, "/reset") => {
                self.authorize(&req)?;
                self.control.reset();
                Ok(self.get_weights())
            }
            (&Method::GET, "/status") => Ok(self.status()),
            (&Method::GET, "/rollout") => Ok(self.rollout_response()),
            (&Method::GET, "/shadow") => {
                let snap = self.control.snapshot();
                let mut summary = self
                    .control
                    .shadow_stats()
                    .summary(snap.config.shadow.as_ref());
                if let (Some(sh), Some(obj)) = (&snap.config.shadow, summary.as_object_mut()) {
                    let base = &snap.config.baseline().name;
                    obj.insert(
                        "responses".into(),
                        self.control
                            .responses()
                            .status(&sh.upstream, base)
                            .unwrap_or(Value::Null),
                    );
                }
                Ok(json_response(StatusCode::OK, &summary))
            }
            (&Method::GET, "/shadow/diffs") => Ok(json_response(
                StatusCode::OK,
                &self.control.shadow_stats().diffs(),
            )),
            (
                &Method::POST,
                "/rollout/start" | "/rollout/pause" | "/rollout/resume" | "/rollout/abort",
            ) => {
                self.authorize(&req)?;
                let ctx = Context {
                    control: &self.control,
                    ledger: &self.ledger,
                    webhooks: &self.webhooks,
                };
                let now_ms = crate::control::state::now_ms();
                match path {
                    "/rollout/start" => self.rollouts.start(&ctx),
                    "/rollout/pause" => self.rollouts.change(&ctx, Rollout::pause_by_admin),
                    "/rollout/resume" => {
                        let tripped =
                            |r: &Rollout| self.control.view().tripped.contains_key(&r.upstream);
                        self.rollouts.change(&ctx, |r| {
                            let t = tripped(r);
                            r.resume(t)
                        })
                    }
                    _ => self.rollouts.change(&ctx, |r| r.abort(now_ms)),
                }?;
                Ok(self.rollout_response())
            }
            (&Method::GET, "/route") => self.route(req.uri().query()),
            (&Method::GET | &Method::POST, "/preview") => {
                let query = req.uri().query().map(str::to_owned);
                let body = read_json(req).await?;
                self.preview(query.as_deref(), body)
            }
            (&Method::GET, "/metrics") => {
                let mut r = Response::new(Full::new(Bytes::from(self.control.metrics().render())));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                Ok(r)
            }
            (&Method::GET, "/healthz") => {
                Ok(json_response(StatusCode::OK, &json!({"status": "ok"})))
            }
            (&Method::GET, "/readyz") => Ok(if self.ready.load(Ordering::Relaxed) {
                json_response(StatusCode::OK, &json!({"status": "ready"}))
            } else {
                json_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &json!({"status": "not ready"}),
                )
            }),
            _ => Err(match PATHS.iter().find(|(p, _)| *p == path) {
                Some((_, allow)) => ApiError {
                    allow: Some(allow),
                    ..ApiError::new(
                        StatusCode::METHOD_NOT_ALLOWED,
                        format!("{method} is not allowed on {path}; use {allow}"),
                    )
                },
                None => {
                    let known: Vec<&str> = PATHS.iter().map(|(p, _)| *p).collect();
                    ApiError::new(
                        StatusCode::NOT_FOUND,
                        format!("no such endpoint {path}; endpoints: {}", known.join(", ")),
                    )
                }
            }),
        }
    }

    fn authorize(&self, req: &Request<Incoming>) -> Result<(), ApiError> {
        let Some(token) = &self.token else {
            return Ok(());
        };
        // The auth scheme is case-insensitive (RFC 9110 §11.1); the token is not.
        let presented = req
            .headers()
            .get(header::AUTHORIZATION)
            .map(|v| v.as_bytes())
            .filter(|v| v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer "))
            .map(|v| v[7..].trim_ascii());
        match presented {
            Some(p) if bool::from(p.ct_eq(token.as_bytes())) => Ok(()),
            Some(_) => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid bearer token",
            )),
            None => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "this call changes state and needs \"Authorization: Bearer <token>\"",
            )),
        }
    }

    fn get_weights(&self) -> Resp {
        json_response(StatusCode::OK, &weights_json(&self.control.view()))
    }

    fn put_weights(&self, body: Value) -> Result<Resp, ApiError> {
        let requested = weight_table(body)?;
        self.control.set_weights(&requested)?;
        Ok(self.get_weights())
    }

    /// Who would move under another table: the table from the query (`canary=25`) or from a
    /// JSON body, completed as `PUT /weights` would, against the effective weights now.
    fn preview(&self, query: Option<&str>, body: Value) -> Result<Resp, ApiError> {
        let table =
            match (query.filter(|q| !q.is_empty()), body) {
                (Some(_), Value::Object(_)) => return Err(ApiError::bad_request(
                    "give the table either as the query (/preview?canary=25) or as a JSON body, \
                     not both",
                )),
                (Some(q), _) => {
                    let mut map = Map::new();
                    for (k, v) in form_urlencoded::parse(q.as_bytes()) {
                        let n: f64 = v.trim().parse().map_err(|_| {
                            ApiError::bad_request(format!(
                                "weight of {k:?} must be a number from 0 to 100, got {v:?}"
                            ))
                        })?;
                        map.insert(k.into_owned(), json!(n));
                    }
                    Value::Object(map)
                }
                (None, Value::Null) => return Err(ApiError::bad_request(
                    "missing table: /preview?canary=25, or a JSON body such as {\"canary\": 25}",
                )),
                (None, body) => body,
            };
        let requested = weight_table(table)?;
        let proposed = self.control.proposed_weights(&requested)?;
        let snap = self.control.snapshot();
        let view = self.control.view();
        let names: Vec<&str> = snap.arms.iter().map(|a| &*a.name).collect();
        let to = crate::routing::WeightTable::new(proposed.clone(), snap.table.baseline())
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        let from = &snap.table;
        let table_json = |w: &[u16]| -> Value {
            names
                .iter()
                .zip(w)
                .map(|(n, &bp)| ((*n).to_owned(), pct(bp)))
                .collect::<Map<String, Value>>()
                .into()
        };
        let moves = crate::preview::moves(from, &to);
        let ranges: Vec<Value> = moves
            .iter()
            .map(|m| {
                json!({
                    "from": names[m.from],
                    "to": names[m.to],
                    "buckets": [m.start, m.end],
                    "share": f64::from(m.end - m.start) / f64::from(BASIS_POINTS),
                })
            })
            .collect();
        let moving_buckets: u32 = moves.iter().map(|m| u32::from(m.end - m.start)).sum();
        let buckets = self.ledger.recent_buckets();
        let sample = buckets.len() as u64;
        let movers = crate::preview::movers(from, &to, buckets);
        let moving: u64 = movers.iter().map(|(_, n)| n).sum();
        let share = |n: u64| {
            if sample == 0 {
                Value::Null
            } else {
                json!(n as f64 / sample as f64)
            }
        };
        let directions: Vec<Value> = movers
            .iter()
            .map(|&((f, t), n)| {
                json!({"from": names[f], "to": names[t], "users": n, "share": share(n)})
            })
            .collect();
        let mut notes = Vec::new();
        for name in requested.keys() {
            if let Some(trip) = view.tripped.get(name) {
                notes.push(format!(
                    "{name} is tripped ({}): PUT /weights would be refused until POST /reset; \
                     shown as if it were not",
                    trip.reason
                ));
            }
        }
        if !snap.config.routing.pins.is_empty() {
            notes.push(format!(
                "{} pinned user id(s) keep their arm under any table and are not in the sample",
                snap.config.routing.pins.len()
            ));
        }
        Ok(json_response(
            StatusCode::OK,
            &json!({
                "current": table_json(from.weights()),
                "proposed": table_json(&proposed),
                "buckets": {
                    "moving": moving_buckets,
                    "share": f64::from(moving_buckets) / f64::from(BASIS_POINTS),
                    "ranges": ranges,
                },
                "users": {
                    "sample": sample,
                    "moving": moving,
                    "share": share(moving),
                    "by_direction": directions,
                    "about": format!(
                        "distinct sticky users seen recently (at least the last {} while \
                         traffic lasts), each counted once by its bucket: exact for the sample",
                        crate::preview::RECENT_USERS
                    ),
                },
                "notes": notes,
                "generation": snap.generation,
            }),
        ))
    }

    fn promote(&self, body: Value) -> Result<Resp, ApiError> {
        let upstream = match &body {
            Value::Null => None,
            Value::Object(m) => {
                if let Some(k) = m.keys().find(|k| *k != "upstream") {
                    return Err(ApiError::bad_request(format!(
                        "unknown field {k:?}; expected {{\"upstream\": NAME}}"
                    )));
                }
                match m.get("upstream") {
                    None => None,
                    Some(Value::String(s)) => Some(s.as_str()),
                    Some(other) => {
                        return Err(ApiError::bad_request(format!(
                            "\"upstream\" must be a string, got {other}"
                        )))
                    }
                }
            }
            _ => {
                return Err(ApiError::bad_request(
                    "expected no body or {\"upstream\": NAME}",
                ))
            }
        };
        self.control.promote(upstream)?;
        Ok(self.get_weights())
    }

    fn status(&self) -> Resp {
        let view = self.control.view();
        let stats = self.ledger.windows.stats(tokio::time::Instant::now());
        let c = &view.config;
        let limits = c.rollback.limits();
        let srm = self.ledger.srm(c.listen.request_timeout);
        let mismatch: Vec<&str> = srm
            .iter()
            .filter(|(_, r, u)| {
                r.p_value < crate::analysis::srm::ALPHA || u.p_value < crate::analysis::srm::ALPHA
            })
            .map(|(n, _, _)| &**n)
            .collect();
        let arms: Vec<Value> = c
            .upstreams
            .iter()
            .enumerate()
            .map(|(i, u)| {
                let w = stats.get(&u.name);
                let ms = |d: Option<Duration>| d.map(|d| (d.as_secs_f64() * 1e6).round() / 1e3);
                json!({
                    "name": u.name,
                    "url": u.url_text(),
                    "baseline": i == c.baseline,
                    "effective_weight": pct(view.effective[i]),
                    "configured_weight": pct(view.configured[i]),
                    "tripped": view.tripped.get(&u.name).map(trip_json),
                    "warmup": view.warming.get(&u.name).map(|w| warmup_json(&view, &u.name, w)),
                    "window": {
                        "requests": w.map_or(0, |s| s.requests),
                        "errors": w.map_or(0, |s| s.errors),
                        "error_rate": w.map_or(0.0, |s| s.error_rate),
                        "p50_ms": ms(w.and_then(|s| s.p50)),
                        "p99_ms": ms(w.and_then(|s| s.p99)),
                    },
                    "analysis": self.ledger.report(&u.name, &limits).map(|r| analysis_json(&r)),
                    "srm": srm.iter().find(|(n, _, _)| **n == *u.name).map(|(_, r, us)| {
                        json!({"requests": srm_json(r), "users": srm_json(us)})
                    }),
                    "responses": c.response_analysis.as_ref().and_then(|_| {
                        self.control.responses().status(&u.name, &c.baseline().name)
                    }),
                })
            })
            .collect();
        let r = &c.rollback;
        let last_reload = view.last_reload.as_ref().map(|lr| {
            let at = humantime::format_rfc3339_millis(lr.at).to_string();
            match &lr.result {
                Ok(g) => json!({"at": at, "result": "success", "generation": g}),
                Err(e) => json!({"at": at, "result": "failure", "error": e}),
            }
        });
        json_response(
            StatusCode::OK,
            &json!({
                "generation": view.generation,
                "source": view.source.as_str(),
                "baseline": c.baseline().name,
                "arms": arms,
                "circuit": {
                    "enabled": r.enabled,
                    "confidence": r.confidence,
                    "window": humantime::format_duration(r.window).to_string(),
                    "min_requests": r.min_requests,
                    "max_error_rate": r.max_error_rate,
                    "max_error_rate_increase": r.max_error_rate_increase,
                    "max_p99_ratio": r.max_p99_ratio,
                    "max_p99_increase_ms": r.max_p99_increase.map(|d| d.as_secs_f64() * 1e3),
                    "error_statuses": r.error_statuses.spec(),
                    "tripped": view.tripped.keys().collect::<Vec<_>>(),
                },
                "srm": {
                    "alpha": crate::analysis::srm::ALPHA,
                    "mismatch": mismatch,
                    // Requests are counted once every request of their second has finished.
                    "lag_seconds": crate::release::circuit::srm_horizon(c.listen.request_timeout)
                        .as_secs_f64(),
                },
                "last_reload": last_reload,
                "uptime_seconds": uptime_seconds(),
            }),
        )
    }

    fn route(&self, query: Option<&str>) -> Result<Resp, ApiError> {
        let key = query.and_then(|q| {
            form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == "key")
                .map(|(_, v)| v.into_owned())
        });
        let Some(key) = key else {
            return Err(ApiError::bad_request(
                "missing query parameter: /route?key=USER_ID",
            ));
        };
        let snap = self.control.snapshot();
        let bucket = snap.router.bucket(key.as_bytes());
        if let Some(arm) = snap.router.pinned(key.as_bytes()) {
            let name = &snap.arms[arm].name;
            return Ok(json_response(
                StatusCode::OK,
                &json!({
                    "key": key,
                    "bucket": bucket,
                    "arm": &**name,
                    "pinned": true,
                    "why": format!(
                        "[routing.pins] pins {key:?} to {name}: it serves this user whatever the \
                         weights and trips, and these requests are not part of the analysis or \
                         of the split"
                    ),
                    "generation": snap.generation,
                }),
            ));
        }
        let arm = snap.table.pick(bucket);
        let (start, end) = snap.table.range(arm);
        let name = &snap.arms[arm].name;
        Ok(json_response(
            StatusCode::OK,
            &json!({
                "key": key,
                "bucket": bucket,
                "arm": &**name,
                "pinned": false,
                "range": [start, end],
                "why": format!(
                    "md5(salt ++ key) gives bucket {bucket}; {name} serves buckets [{start}, {end}) \
                     under the effective weights"
                ),
                "generation": snap.generation,
            }),
        ))
    }
}

fn uptime_seconds() -> u64 {
    static START: std::sync::OnceLock<SystemTime> = std::sync::OnceLock::new();
    let start = START.get_or_init(SystemTime::now);
    SystemTime::now()
        .duration_since(*start)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `12.5` → `1250`; `None` outside 0..=100 or with more than 2 decimals.
fn percent_to_bp(p: f64) -> Option<u16> {
    if !(0.0..=100.0).contains(&p) {
        return None;
    }
    let bp = (p * 100.0).round();
    ((p * 100.0 - bp).abs() < 1e-6 && bp <= f64::from(BASIS_POINTS)).then_some(bp as u16)
}

/// One test of the sample-ratio guard, as `/status` shows it.
fn srm_json(f: &crate::analysis::srm::Figures) -> Value {
    let share = |x: f64| {
        if f.draws == 0 {
            Value::Null
        } else {
            json!(x / f.draws as f64)
        }
    };
    json!({
        "draws": f.draws,
        "observed": f.observed,
        "expected": f.expected,
        "observed_share": share(f.observed as f64),
        "expected_share": share(f.expected),
        "chi_square": if f.chi_square.is_finite() { json!(f.chi_square) } else { Value::Null },
        "p_value": f.p_value,
    })
}

/// A JSON object of upstream name to percent, as basis points.
fn weight_table(body: Value) -> Result<BTreeMap<String, u16>, ApiError> {
    let Value::Object(map) = body else {
        return Err(ApiError::bad_request(
            "expected a JSON object of upstream name to percent, e.g. {\"canary\": 25}",
        ));
    };
    let mut requested = BTreeMap::new();
    for (name, v) in &map {
        match v.as_f64().and_then(percent_to_bp) {
            Some(bp) => {
                requested.insert(name.clone(), bp);
            }
            None => {
                return Err(ApiError::bad_request(format!(
                    "weight of {name:?} must be a number from 0 to 100 with at most 2 \
                     decimals, got {v}"
                )))
            }
        }
    }
    Ok(requested)
}

/// Reads a JSON body of at most [`MAX_BODY`] bytes; an empty body is `null`.
async fn read_json(req: Request<Incoming>) -> Result<Value, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body larger than {MAX_BODY} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut body = req.into_body();
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        drain(body).await;
        return Err(too_large());
    }
    let mut bytes = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame
            .map_err(|e| ApiError::bad_request(format!("cannot read the request body: {e}")))?;
        if let Ok(data) = frame.into_data() {
            if bytes.len() + data.len() > MAX_BODY {
                drain(body).await;
                return Err(too_large());
            }
            bytes.extend_from_slice(&data);
        }
    }
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Null);
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

/// Reads and drops the rest of a refused body: at most [`DRAIN_MAX`] bytes for at most
/// [`DRAIN_TIME`].
async fn drain(body: Incoming) {
    let mut body = Limited::new(body, DRAIN_MAX);
    let _ = tokio::time::timeout(DRAIN_TIME, async {
        while let Some(Ok(_)) = body.frame().await {}
    })
    .await;
}

/// The analysis of one arm against the baseline, as `/status` shows it: the verdict, both
/// samples' numbers and, per metric, each quantity's estimate, anytime-valid interval and limit
/// (fail when the interval's low end is above the limit, pass when its high end is at or
/// below it). Infinite ends (nothing known yet) are `null`.
fn analysis_json(r: &Report) -> Value {
    let num = |x: f64| if x.is_finite() { json!(x) } else { Value::Null };
    let sample = |s: &SampleReport| {
        json!({
            "requests": s.requests,
            "errors": s.errors,
            "error_rate": s.error_rate,
            "error_rate_interval": [num(s.error_rate_interval.0), num(s.error_rate_interval.1)],
            "p99_ms": s.p99_ms,
            "p99_interval_ms": s.p99_interval_ms.map(|(lo, hi)| [num(lo), num(hi)]),
        })
    };
    let check = |c: &Check| {
        json!({
            "quantity": c.quantity,
            "estimate": num(c.estimate),
            "interval": [num(c.low), num(c.high)],
            "limit": c.limit,
            "limit_key": c.key,
            "ln_evidence_exceeds": num(c.ln_evidence_exceeds),
            "ln_evidence_within": num(c.ln_evidence_within),
        })
    };
    let metrics: serde_json::Map<String, Value> = r
        .metrics
        .iter()
        .map(|m| {
            (
                m.metric.as_str().to_owned(),
                json!({
                    "verdict": m.verdict.as_str(),
                    // Rounded: a share of the budget such as 1 - 0.01 * 3/4 prints as 0.9925.
                    "confidence": (m.level * 1e12).round() / 1e12,
                    "threshold": m.threshold,
                    "checks": m.checks.iter().map(check).collect::<Vec<_>>(),
                }),
            )
        })
        .collect();
    json!({
        "verdict": r.verdict.as_str(),
        "confidence": r.confidence,
        "below_min_requests": r.below_min_requests,
        "arm": sample(&r.arm),
        "baseline": sample(&r.baseline),
        "metrics": metrics,
    })
}

impl Admin {
    fn rollout_response(&self) -> Resp {
        json_response(StatusCode::OK, &self.rollout_json())
    }

    /// The `GET /rollout` document.
    fn rollout_json(&self) -> Value {
        let snap = self.control.snapshot();
        let cfg = snap.config.rollout.as_ref();
        let configured = cfg.map(|c| {
            json!({
                "upstream": c.upstream,
                "steps": c.steps.iter().map(|&s| pct(s)).collect::<Vec<_>>(),
                "min_step_duration_seconds": c.min_step_duration.as_secs_f64(),
                "min_requests": c.min_requests,
                "max_step_duration_seconds": c.max_step_duration.as_secs_f64(),
                "on_inconclusive": match c.on_inconclusive {
                    crate::config::OnInconclusive::Hold => "hold",
                    crate::config::OnInconclusive::Rollback => "rollback",
                },
                "start": match c.start {
                    crate::config::RolloutStart::Manual => "manual",
                    crate::config::RolloutStart::OnNewUrl => "on_new_url",
                },
            })
        });
        let Some(r) = self.rollouts.get() else {
            return json!({"phase": "idle", "config": configured});
        };
        let limits = snap.config.rollback.limits();
        let at_step = r.step.is_some() && r.phase.running();
        let analysis = at_step
            .then(|| self.ledger.step_report(&r.upstream, &limits))
            .flatten();
        let baseline = snap.config.baseline().name.clone();
        let history: Vec<Value> = r
            .history
            .iter()
            .map(|h| {
                json!({
                    "step": h.step,
                    "weight": h.weight,
                    "started_at": rfc3339_ms(h.started_at_ms),
                    "ended_at": h.ended_at_ms.map(rfc3339_ms),
                    "outcome": h.outcome,
                    "detail": h.detail,
                })
            })
            .collect();
        json!({
            "phase": r.phase.as_str(),
            "reason": r.reason,
            "upstream": r.upstream,
            "url": r.url,
            "step": r.step_number(),
            "steps": r.steps.iter().map(|&s| pct(s)).collect::<Vec<_>>(),
            "weight": pct(r.weight_bp()),
            "waiting_for": r.pending.filter(|_| r.phase == crate::release::rollout::Phase::Waiting)
                .map(|p| p.gates().iter().map(|g| g.as_str()).collect::<Vec<_>>()),
            "started_at": rfc3339_ms(r.started_at_ms),
            "ended_at": r.ended_at_ms.map(rfc3339_ms),
            "at_step": at_step.then(|| json!({
                "seconds": r.step_elapsed_ms as f64 / 1e3,
                "requests": {
                    r.upstream.clone(): analysis.as_ref().map_or(0, |a| a.arm.requests),
                    baseline: analysis.as_ref().map_or(0, |a| a.baseline.requests),
                },
                "holding": r.holding,
            })),
            "analysis": analysis.as_ref().map(analysis_json),
            "history": history,
            "config": configured,
        })
    }
}

fn trip_json(t: &Trip) -> Value {
    json!({"reason": t.reason, "detail": t.detail, "at": rfc3339_ms(t.at_ms), "url": t.url})
}

/// The `GET /weights` document.
pub fn weights_json(view: &View) -> Value {
    let c = &view.config;
    let table = |w: &[u16]| -> Value {
        Value::Object(
            c.upstreams
                .iter()
                .zip(w)
                .map(|(u, &bp)| (u.name.clone(), pct(bp)))
                .collect::<Map<String, Value>>(),
        )
    };
    json!({
        "generation": view.generation,
        "source": view.source.as_str(),
        "baseline": c.baseline().name,
        "effective": table(&view.effective),
        "configured": table(&view.configured),
        "file": table(&view.file),
        "tripped": view
            .tripped
            .iter()
            .map(|(n, t)| (n.clone(), trip_json(t)))
            .collect::<Map<String, Value>>(),
        "warmup": view
            .warming
            .iter()
            .map(|(n, w)| (n.clone(), warmup_json(view, n, w)))
            .collect::<Map<String, Value>>(),
    })
}

/// A warming arm: the phase, the share of its weight in force, and the numbers.
fn warmup_json(view: &View, name: &str, w: &crate::control::Warming) -> Value {
    let now = tokio::time::Instant::now();
    let i = view.config.upstreams.iter().position(|u| u.name == name);
    let weight = |v: &[u16]| i.and_then(|i| v.get(i)).map(|&bp| pct(bp));
    let ends_in = w.ramp_from.map(|from| {
        let end = from + w.duration;
        (end.saturating_duration_since(now).as_secs_f64() * 10.0).round() / 10.0
    });
    json!({
        "phase": if w.ramp_from.is_some() { "ramp" } else { "requests" },
        "url": w.url,
        "factor": (w.factor(now) * 1000.0).round() / 1000.0,
        "weight": weight(&view.configured),
        "effective": weight(&view.effective),
        "duration_seconds": w.duration.as_secs_f64(),
        "ends_in_seconds": ends_in,
        "requests": {
            "to_send": w.requests.as_ref().map_or(0, |(_, n)| *n),
            "sent": w.sent.0,
            "failed": w.sent.1,
        },
    })
}

/// Serves the admin API on `listener` until `stop` fires.
pub(crate) async fn serve(
    listener: TcpListener,
    admin: Arc<Admin>,
    mut stop: watch::Receiver<bool>,
) {
    while let Some((stream, peer)) = crate::server::accept(&listener, &mut stop, "admin").await {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_conversion() {
        assert_eq!(percent_to_bp(25.0), Some(2500));
        assert_eq!(percent_to_bp(12.5), Some(1250));
        assert_eq!(percent_to_bp(0.01), Some(1));
        assert_eq!(percent_to_bp(100.0), Some(10000));
        assert_eq!(percent_to_bp(12.345), None);
        assert_eq!(percent_to_bp(-1.0), None);
        assert_eq!(percent_to_bp(100.5), None);
        assert_eq!(pct(1250), json!(12.5));
        assert_eq!(pct(9000), json!(90));
    }
}
