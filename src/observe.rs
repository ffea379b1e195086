//! What the arms answer, watched without touching the client's exchange: shadow copies of
//! requests and the comparison of their answers with the primary's; labels and scores read
//! from JSON responses, and the drift between arms.
//!
//! On the data path there are only [`Tap`]s: a copy of a body's first bytes, up to a limit,
//! taken as the body streams (the client's body is never held back or buffered whole) and
//! handed over when it ends. Everything else runs on tasks of its own: a shadow copy is sent
//! only after both the request body and the primary's response have been copied, under a
//! bounded number of permits (a copy that finds none is dropped and counted, never queued).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::analysis::diff::{self, CompareSpec};
use crate::analysis::drift::{self, ArmDistribution, Labels};
use crate::analysis::fields::{extract_all, tokens};
use crate::body::{RequestBody, Tap};
use crate::config::{ResponseAnalysisConfig, ShadowConfig};
use crate::metrics::Metrics;
use crate::upstream::forwarded::Forwarded;
use crate::upstream::Upstream;

/// Mismatches kept for `GET /shadow/diffs`.
pub const DIFFS_KEPT: usize = 50;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// ---------------------------------------------------------------------------------------
// Shadow
// ---------------------------------------------------------------------------------------

/// One kept mismatch.
#[derive(Debug, Clone)]
struct KeptDiff {
    at_ms: u64,
    method: String,
    path: String,
    fields: Vec<diff::FieldDiff>,
}

/// Shadow results since start (kept across reloads).
#[derive(Debug, Default)]
pub struct ShadowStats {
    inner: Mutex<ShadowCounts>,
}

#[derive(Debug, Default)]
struct ShadowCounts {
    by_result: BTreeMap<&'static str, u64>,
    field_mismatches: BTreeMap<String, u64>,
    noisy: BTreeMap<String, u64>,
    noise_checks: u64,
    diffs: VecDeque<KeptDiff>,
    duration_sum: Duration,
    duration_n: u64,
}

impl ShadowStats {
    fn count(&self, metrics: &Metrics, result: &'static str) {
        metrics.shadow_request(result);
        *lock(&self.inner).by_result.entry(result).or_default() += 1;
    }

    /// `GET /shadow`: counts by result, the mismatch rate, mismatching and noisy fields.
    pub fn summary(&self, config: Option<&ShadowConfig>) -> Value {
        let c = lock(&self.inner);
        let get = |k: &str| c.by_result.get(k).copied().unwrap_or(0);
        let compared = get("match") + get("mismatch");
        json!({
            "configured": config.map(|s| json!({
                "upstream": s.upstream,
                "percent": f64::from(s.percent_bp) / 100.0,
                "methods": s.methods.iter().map(|m| m.as_str()).collect::<Vec<_>>(),
                "compare": s.compare,
                "ignore": s.ignore,
                "numeric_tolerance": s.numeric_tolerance,
                "noise_percent": f64::from(s.noise_bp) / 100.0,
                "max_in_flight": s.max_in_flight,
                "max_body_bytes": s.max_body_bytes,
            })),
            "requests": {
                "match": get("match"), "mismatch": get("mismatch"), "error": get("error"),
                "skipped": get("skipped"), "dropped": get("dropped"),
            },
            "compared": compared,
            "mismatch_rate": if compared == 0 { Value::Null } else { json!(get("mismatch") as f64 / compared as f64) },
            "field_mismatches": c.field_mismatches,
            "noise": {"checks": c.noise_checks, "noisy_fields": c.noisy},
            "mean_duration_ms": if c.duration_n == 0 { Value::Null } else {
                json!(c.duration_sum.as_secs_f64() * 1e3 / c.duration_n as f64)
            },
        })
    }

    /// `GET /shadow/diffs`: the last [`DIFFS_KEPT`] mismatches, newest first.
    pub fn diffs(&self) -> Value {
        let c = lock(&self.inner);
        Value::Array(
            c.diffs
                .iter()
                .rev()
                .map(|d| {
                    json!({
                        "at_ms": d.at_ms,
                        "method": d.method,
                        "path": d.path,
                        "fields": d.fields.iter().map(|f| json!({
                            "field": f.field, "primary": f.primary, "shadow": f.shadow,
                        })).collect::<Vec<_>>(),
                    })
                })
                .collect(),
        )
    }
}

/// Shadowing under one config: in the snapshot.
pub struct ShadowPath {
    /// The settings.
    pub config: ShadowConfig,
    spec: CompareSpec,
    upstream: Arc<Upstream>,
    permits: Arc<Semaphore>,
    stats: Arc<ShadowStats>,
    metrics: Arc<Metrics>,
    responses: Option<Arc<ResponseStats>>,
    timeout: Duration,
    /// While the shadow fails, copies wait: no copy is sent before this many ms after `born`.
    resume_at_ms: std::sync::atomic::AtomicU64,
    /// Failures in a row (the wait doubles with each).
    failures: std::sync::atomic::AtomicU32,
    born: Instant,
}

/// The first wait after a failed shadow call; it doubles with each failure in a row.
pub const SHADOW_BACKOFF: Duration = Duration::from_millis(100);
/// The longest wait.
pub const SHADOW_BACKOFF_MAX: Duration = Duration::from_secs(5);

impl std::fmt::Debug for ShadowPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShadowPath")
            .field("upstream", &self.config.upstream)
            .finish()
    }
}

/// What the shadow copy of one request needs from the data path.
pub struct ShadowRequest {
    /// Method, path and headers of the upstream request.
    pub method: Method,
    /// Path and query.
    pub path: String,
    /// Headers as sent to the primary.
    pub headers: HeaderMap,
    /// The forwarding headers.
    pub forwarded: Forwarded,
    /// The primary arm's client and name (for the noise check).
    pub primary: (Arc<Upstream>, Arc<str>),
}

impl ShadowPath {
    /// Shadowing for `config`, with its own client (`upstream`: its own pool).
    pub fn new(
        config: ShadowConfig,
        upstream: Arc<Upstream>,
        stats: Arc<ShadowStats>,
        metrics: Arc<Metrics>,
        responses: Option<Arc<ResponseStats>>,
        timeout: Duration,
    ) -> Result<Self, String> {
        let spec = CompareSpec::new(
            config.compare.clone(),
            config.numeric_tolerance,
            config.ignore.clone(),
        )?;
        Ok(ShadowPath {
            permits: Arc::new(Semaphore::new(config.max_in_flight)),
            config,
            spec,
            upstream,
            stats,
            metrics,
            responses,
            timeout,
            resume_at_ms: std::sync::atomic::AtomicU64::new(0),
            failures: std::sync::atomic::AtomicU32::new(0),
            born: Instant::now(),
        })
    }

    fn since_born_ms(&self) -> u64 {
        u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// A shadow call failed: copies wait, longer with each failure in a row, so a dead or
    /// failing shadow costs the proxy a connection attempt now and then, not one per request.
    fn failed(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        let n = self.failures.fetch_add(1, Relaxed).min(16);
        let wait = SHADOW_BACKOFF
            .saturating_mul(1 << n)
            .min(SHADOW_BACKOFF_MAX);
        let until = self
            .since_born_ms()
            .saturating_add(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX));
        self.resume_at_ms.fetch_max(until, Relaxed);
    }

    fn succeeded(&self) {
        self.failures.store(0, std::sync::atomic::Ordering::Relaxed);
    }

    /// The stats shared across reloads.
    pub fn stats(&self) -> &Arc<ShadowStats> {
        &self.stats
    }

    /// Whether this request is copied: its method is listed and it falls in `percent` (by
    /// its sticky bucket when it has one, so a user's requests are shadowed consistently;
    /// else by `fallback`, a number in 0..10000). A copy that finds no permit is dropped.
    pub fn permit(
        &self,
        method: &Method,
        bucket: Option<u16>,
        fallback: u16,
    ) -> Option<OwnedSemaphorePermit> {
        if !self.config.methods.contains(method) {
            return None;
        }
        if !sampled(bucket.unwrap_or(fallback), self.config.percent_bp) {
            return None;
        }
        let resume = self.resume_at_ms.load(std::sync::atomic::Ordering::Relaxed);
        if resume > 0 && self.since_born_ms() < resume {
            // The shadow failed just now: this copy is not sent.
            self.stats.count(&self.metrics, "dropped");
            return None;
        }
        match self.permits.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => {
                self.stats.count(&self.metrics, "dropped");
                None
            }
        }
    }

    /// Starts the copy (on a task of its own): returns the tap for the request body (none
    /// when the request has none) and where the primary's response goes: its status and its
    /// body as the client got it (see [`PrimarySink::attach`]).
    pub fn start(
        self: &Arc<Self>,
        permit: OwnedSemaphorePermit,
        req: ShadowRequest,
        body_known_empty: bool,
    ) -> (Option<Tap>, PrimarySink) {
        let (body_tx, body_rx) = oneshot::channel::<Option<Bytes>>();
        let (resp_tx, resp_rx) = oneshot::channel::<Option<(u16, Bytes)>>();
        let mut req_tap = None;
        if body_known_empty {
            let _ = body_tx.send(Some(Bytes::new()));
        } else {
            let mut t = Tap::default();
            t.add(self.config.max_body_bytes, move |b| {
                let _ = body_tx.send(b);
            });
            req_tap = Some(t);
        }
        let this = self.clone();
        tokio::spawn(async move {
            let _permit = permit;
            this.run(req, body_rx, resp_rx).await;
        });
        (
            req_tap,
            PrimarySink {
                tx: resp_tx,
                limit: self.config.max_body_bytes,
            },
        )
    }

    async fn run(
        &self,
        req: ShadowRequest,
        body: oneshot::Receiver<Option<Bytes>>,
        primary: oneshot::Receiver<Option<(u16, Bytes)>>,
    ) {
        let count = |r| self.stats.count(&self.metrics, r);
        // The request body as the primary got it (larger than the limit: not compared).
        let Ok(Some(body)) = body.await else {
            count("skipped");
            return;
        };
        let started = Instant::now();
        let shadow = self.call(&self.upstream, &req, body.clone()).await;
        let elapsed = started.elapsed();
        self.metrics.shadow_duration(elapsed);
        {
            let mut c = lock(&self.stats.inner);
            c.duration_sum += elapsed;
            c.duration_n += 1;
        }
        let Ok(Some((primary_status, primary_body))) = primary.await else {
            count("skipped");
            return;
        };
        let (shadow_status, shadow_body) = match shadow {
            Ok(Some(r)) => r,
            Ok(None) => {
                count("skipped");
                return;
            }
            Err(e) => {
                tracing::debug!(error = %e, "shadow call failed");
                self.failed();
                count("error");
                return;
            }
        };
        self.succeeded();
        if let Some(r) = &self.responses {
            r.record_body(&self.config.upstream, &shadow_body);
        }
        // Noise: the same request to the primary's arm again; what differs there is noise.
        let noise_roll = u16::try_from(fastrand::u32(..10_000)).unwrap_or(0);
        if noise_roll < self.config.noise_bp {
            if let Ok(Some((status2, body2))) = self.call(&req.primary.0, &req, body).await {
                let noisy =
                    diff::noisy_fields(&self.spec, primary_status, &primary_body, status2, &body2);
                let mut c = lock(&self.stats.inner);
                c.noise_checks += 1;
                for f in noisy {
                    *c.noisy.entry(f).or_default() += 1;
                }
            }
        }
        match self
            .spec
            .compare(primary_status, &primary_body, shadow_status, &shadow_body)
        {
            diff::Verdict::Match => count("match"),
            diff::Verdict::Mismatch(fields) => {
                let mut c = lock(&self.stats.inner);
                let real: Vec<diff::FieldDiff> = fields
                    .into_iter()
                    .filter(|f| !c.noisy.contains_key(&f.field))
                    .collect();
                if real.is_empty() {
                    drop(c);
                    count("match");
                    return;
                }
                for f in &real {
                    *c.field_mismatches.entry(f.field.clone()).or_default() += 1;
                    if self.config.compare.contains(&f.field) {
                        self.metrics.shadow_field_mismatch(&f.field);
                    }
                }
                if c.diffs.len() == DIFFS_KEPT {
                    c.diffs.pop_front();
                }
                c.diffs.push_back(KeptDiff {
                    at_ms: now_ms(),
                    method: req.method.to_string(),
                    path: req.path.clone(),
                    fields: real,
                });
                drop(c);
                count("mismatch");
            }
        }
    }

    /// One call of `req` with `body` to `upstream`: the status and the body (`None` when the
    /// body is over the limit).
    async fn call(
        &self,
        upstream: &Upstream,
        req: &ShadowRequest,
        body: Bytes,
    ) -> Result<Option<(u16, Bytes)>, String> {
        let uri = upstream
            .uri_for(req.path.parse().ok().as_ref())
            .map_err(|e| e.to_string())?;
        let mut r = Request::new(RequestBody::Full(http_body_util::Full::new(body)));
        *r.method_mut() = req.method.clone();
        *r.uri_mut() = uri;
        *r.headers_mut() = req.headers.clone();
        if upstream.http2() {
            *r.version_mut() = http::Version::HTTP_2;
            r.headers_mut().remove(http::header::CONTENT_LENGTH);
        }
        let resp = upstream
            .send(r, &req.forwarded, self.timeout)
            .await
            .map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let limited = http_body_util::Limited::new(resp.into_body(), self.config.max_body_bytes);
        let read = tokio::time::timeout(self.timeout, limited.collect()).await;
        match read {
            Ok(Ok(b)) => Ok(Some((status, b.to_bytes()))),
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Ok(None),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("the body did not arrive within {:?}", self.timeout)),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Response analysis and drift
// ---------------------------------------------------------------------------------------

/// Labels and scores per arm (kept across reloads while the pointers stay the same).
#[derive(Debug)]
pub struct ResponseStats {
    inner: Mutex<Distributions>,
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct Distributions {
    pointers: (Option<String>, Option<String>),
    /// The pointers' reference tokens, unescaped.
    paths: (Option<Vec<String>>, Option<Vec<String>>),
    labels: Labels,
    /// Per arm, found by a scan (a handful of arms: cheaper than hashing the name).
    arms: Vec<(String, ArmDistribution)>,
    /// `canaryd_response_labels_total` handles by arm, indexed by label id.
    counters: Vec<Vec<Option<metrics::Counter>>>,
}

impl Distributions {
    fn arm(&self, name: &str) -> Option<usize> {
        self.arms.iter().position(|(n, _)| n == name)
    }
}

impl std::fmt::Debug for Distributions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Distributions")
            .field("pointers", &self.pointers)
            .field("arms", &self.arms.len())
            .finish()
    }
}

/// A drift shown beyond `max_drift`.
#[derive(Debug, Clone, PartialEq)]
pub struct DriftTrip {
    /// The JSON pointer.
    pub field: String,
    /// The numbers.
    pub detail: String,
}

impl ResponseStats {
    /// Empty.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        ResponseStats {
            inner: Mutex::new(Distributions::default()),
            metrics,
        }
    }

    /// Starts over when the pointers changed.
    pub fn configure(&self, c: &ResponseAnalysisConfig) {
        let mut d = lock(&self.inner);
        let pointers = (c.label_pointer.clone(), c.score_pointer.clone());
        if d.pointers != pointers {
            let paths = (
                pointers.0.as_deref().map(tokens),
                pointers.1.as_deref().map(tokens),
            );
            *d = Distributions {
                pointers,
                paths,
                ..Distributions::default()
            };
        }
    }

    /// Reads the label and score of one JSON body of `arm`.
    pub fn record_body(&self, arm: &str, body: &[u8]) {
        let _ = self.record(arm, body, None, 0.0);
    }

    /// Reads one JSON body of `arm`; with `judge` (the baseline's name) and when the arm's
    /// count reaches the next point of the testing schedule, tests drift against the
    /// baseline at false-alarm budget `alpha` and returns a drift beyond `max_drift`.
    pub fn record(
        &self,
        arm: &str,
        body: &[u8],
        judge: Option<(&str, f64)>,
        alpha: f64,
    ) -> Option<DriftTrip> {
        let mut d = lock(&self.inner);
        // Only the two values are built, in one pass over the body.
        let none: &[String] = &[];
        let [label, score] = extract_all(
            body,
            [
                d.paths.0.as_deref().unwrap_or(none),
                d.paths.1.as_deref().unwrap_or(none),
            ],
        );
        let label = label.filter(|_| d.paths.0.is_some());
        let score = score
            .filter(|_| d.paths.1.is_some())
            .and_then(|v| v.as_f64());
        if label.is_none() && score.is_none() {
            return None;
        }
        let id = label.map(|v| match &v {
            Value::String(l) => d.labels.id(l),
            other => d.labels.id(&other.to_string()),
        });
        let at = match d.arm(arm) {
            Some(i) => i,
            None => {
                let seed = d.arms.len() as u64 + 1;
                d.arms.push((arm.to_owned(), ArmDistribution::new(seed)));
                d.counters.push(Vec::new());
                d.arms.len() - 1
            }
        };
        if let Some(id) = id {
            let Distributions {
                labels, counters, ..
            } = &mut *d;
            if let Some(list) = counters.get_mut(at) {
                if list.len() <= id {
                    list.resize(id + 1, None);
                }
                list[id]
                    .get_or_insert_with(|| self.metrics.response_label(arm, labels.name(id)))
                    .increment(1);
            }
        }
        let dist = &mut d.arms.get_mut(at)?.1;
        let before = dist.labels_total().max(dist.scores_seen());
        if let Some(id) = id {
            dist.record_label(id);
        }
        if let Some(x) = score {
            dist.record_score(x);
        }
        let after = dist.labels_total().max(dist.scores_seen());
        let (baseline, max_drift) = judge?;
        let level = drift::check_level(before, after, alpha)?;
        let (lp, sp) = d.pointers.clone();
        let base = &d.arms.get(d.arm(baseline)?)?.1;
        let arm_d = &d.arms.get(at)?.1;
        if let (Some(p), Some(c)) = (
            &lp,
            drift::categorical(arm_d.label_counts(), base.label_counts()),
        ) {
            self.metrics.drift(arm, p, c.js_distance);
            if c.js_distance > max_drift && c.p_value < level {
                return Some(DriftTrip {
                    field: p.to_string(),
                    detail: format!(
                        "drift on {p}: Jensen-Shannon distance {:.3} > max_drift {max_drift} \
                         and chi-square {:.1} (dof {}) p = {:.2e} < {:.2e} over {} answers \
                         of the arm and {} of the baseline",
                        c.js_distance,
                        c.chi_square,
                        c.dof,
                        c.p_value,
                        level,
                        arm_d.labels_total(),
                        base.labels_total()
                    ),
                });
            }
        }
        if let (Some(p), Some(n)) = (
            &sp,
            drift::numeric(arm_d.score_sample(), base.score_sample()),
        ) {
            self.metrics.drift(arm, p, n.ks);
            if n.ks > max_drift && n.p_value < level {
                return Some(DriftTrip {
                    field: p.to_string(),
                    detail: format!(
                        "drift on {p}: KS distance {:.3} > max_drift {max_drift} and p = \
                         {:.2e} < {:.2e} over {} scores of the arm and {} of the baseline",
                        n.ks,
                        n.p_value,
                        level,
                        arm_d.scores_seen(),
                        base.scores_seen()
                    ),
                });
            }
        }
        None
    }

    /// The distributions and drift of `arm` against `baseline`, for `/status`.
    pub fn status(&self, arm: &str, baseline: &str) -> Option<Value> {
        let d = lock(&self.inner);
        let a = &d.arms.get(d.arm(arm)?)?.1;
        let labels: serde_json::Map<String, Value> = a
            .label_counts()
            .iter()
            .enumerate()
            .filter(|(_, &n)| n > 0)
            .map(|(i, &n)| (d.labels.name(i).to_owned(), json!(n)))
            .collect();
        let sample = a.score_sample();
        let mean = (!sample.is_empty()).then(|| sample.iter().sum::<f64>() / sample.len() as f64);
        let mut drift_json = serde_json::Map::new();
        if arm != baseline {
            if let Some((_, b)) = d.arm(baseline).and_then(|i| d.arms.get(i)) {
                if let (Some(p), Some(c)) = (
                    &d.pointers.0,
                    drift::categorical(a.label_counts(), b.label_counts()),
                ) {
                    self.metrics.drift(arm, p, c.js_distance);
                    drift_json.insert(
                        p.to_string(),
                        json!({"js_distance": c.js_distance, "chi_square": c.chi_square,
                               "dof": c.dof, "p_value": c.p_value}),
                    );
                }
                if let (Some(p), Some(n)) = (
                    &d.pointers.1,
                    drift::numeric(a.score_sample(), b.score_sample()),
                ) {
                    self.metrics.drift(arm, p, n.ks);
                    drift_json.insert(
                        p.to_string(),
                        json!({"ks": n.ks, "p_value": n.p_value, "wasserstein": n.wasserstein}),
                    );
                }
            }
        }
        Some(json!({
            "labels": labels,
            "answers": a.labels_total(),
            "scores": {"seen": a.scores_seen(), "sample_mean": mean},
            "drift": drift_json,
        }))
    }
}

/// Whether a request in routing bucket `bucket` (0..10000) is among the `percent_bp` copied.
/// The buckets are permuted first: the canary takes a contiguous range of buckets, and a
/// shadow sample taken from the same range would only ever copy the canary's users (or only
/// the baseline's).
fn sampled(bucket: u16, percent_bp: u16) -> bool {
    // 7919 is prime and does not divide 10000: `b -> 7919 b + 4321 (mod 10000)` is a
    // permutation of the buckets that scatters every range over all of them.
    let permuted = (u32::from(bucket) * 7919 + 4321) % 10_000;
    permuted < u32::from(percent_bp)
}

/// Whether a response's content type is JSON (`application/json`, or a `+json` type).
pub fn is_json(headers: &HeaderMap) -> bool {
    let Some(v) = headers.get(http::header::CONTENT_TYPE) else {
        return false;
    };
    let v = v.as_bytes();
    let essence = v.split(|&b| b == b';').next().unwrap_or(v).trim_ascii();
    essence.eq_ignore_ascii_case(b"application/json")
        || (essence.len() >= 5 && essence[essence.len() - 5..].eq_ignore_ascii_case(b"+json"))
}

/// Where the primary's response goes for a shadow comparison. Dropped unused (the primary
/// failed), the copy is counted `skipped`.
#[derive(Debug)]
pub struct PrimarySink {
    tx: oneshot::Sender<Option<(u16, Bytes)>>,
    limit: usize,
}

impl PrimarySink {
    /// Adds the response body's consumer to `tap`, for a response with `status`.
    pub fn attach(self, tap: &mut Tap, status: StatusCode) {
        let code = status.as_u16();
        let tx = self.tx;
        tap.add(self.limit, move |b| {
            let _ = tx.send(b.map(|b| (code, b)));
        });
    }
}

/// Unix time in milliseconds.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shadow_sample_is_spread_over_the_canary_and_the_baseline() {
        let chosen: Vec<u16> = (0..10_000).filter(|&b| sampled(b, 1000)).collect();
        assert_eq!(chosen.len(), 1000, "exactly percent of the buckets");
        // A 10% canary holds buckets 0..1000: about a tenth of the sample is its users.
        let in_canary = chosen.iter().filter(|&&b| b < 1000).count();
        assert!((80..=120).contains(&in_canary), "{in_canary}");
        assert!((0..10_000).all(|b| sampled(b, 10_000)));
        assert!(!(0..10_000).any(|b| sampled(b, 0)));
    }

    #[test]
    fn json_content_types() {
        let ct = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static(v),
            );
            is_json(&h)
        };
        assert!(ct("application/json"));
        assert!(ct("Application/JSON; charset=utf-8"));
        assert!(ct("application/problem+json"));
        assert!(!ct("text/plain"));
        assert!(!ct("application/jsonx"));
        assert!(!ct("json"));
        assert!(!is_json(&HeaderMap::new()));
    }
}
