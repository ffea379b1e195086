//! Prometheus metrics: names in one place, handles resolved once per arm.
//!
//! Each server instance owns its own recorder (nothing is installed globally), so several
//! proxies in one process — the test suite — keep exact, separate counts. The data path only
//! touches pre-resolved atomic handles: per-status counters are created on first use of a
//! status and then read through a `OnceLock`, never looked up by string.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, Label, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

use crate::body::ClientFault;
use crate::upstream::error::FailureKind;

/// `canaryd_requests_total{upstream,status}`.
pub const REQUESTS: &str = "canaryd_requests_total";
/// `canaryd_request_duration_seconds{upstream}`.
pub const DURATION: &str = "canaryd_request_duration_seconds";
/// `canaryd_upstream_failures_total{upstream,kind}`.
pub const FAILURES: &str = "canaryd_upstream_failures_total";
/// `canaryd_requests_in_flight{upstream}`.
pub const IN_FLIGHT: &str = "canaryd_requests_in_flight";
/// `canaryd_upstream_weight_percent{upstream}`.
pub const WEIGHT: &str = "canaryd_upstream_weight_percent";
/// `canaryd_upstream_tripped{upstream}`.
pub const TRIPPED: &str = "canaryd_upstream_tripped";
/// `canaryd_rollbacks_total{upstream,reason}`.
pub const ROLLBACKS: &str = "canaryd_rollbacks_total";
/// `canaryd_config_reloads_total{result}`.
pub const RELOADS: &str = "canaryd_config_reloads_total";
/// `canaryd_grpc_responses_total{upstream,grpc_status}`.
pub const GRPC: &str = "canaryd_grpc_responses_total";
/// `canaryd_client_errors_total{kind}`: requests the client broke (never an arm's failure).
pub const CLIENT_ERRORS: &str = "canaryd_client_errors_total";
/// `canaryd_analysis_verdict{upstream,metric}`: -1 fail, 0 inconclusive, 1 pass.
pub const ANALYSIS_VERDICT: &str = "canaryd_analysis_verdict";
/// `canaryd_shadow_requests_total{result}`.
pub const SHADOW_REQUESTS: &str = "canaryd_shadow_requests_total";
/// `canaryd_shadow_field_mismatches_total{field}`.
pub const SHADOW_FIELD_MISMATCHES: &str = "canaryd_shadow_field_mismatches_total";
/// `canaryd_shadow_duration_seconds`.
pub const SHADOW_DURATION: &str = "canaryd_shadow_duration_seconds";
/// `canaryd_response_labels_total{upstream,label}`.
pub const RESPONSE_LABELS: &str = "canaryd_response_labels_total";
/// `canaryd_drift{upstream,field}`.
pub const DRIFT: &str = "canaryd_drift";
/// `canaryd_srm_p_value{upstream,by}`: the sample-ratio guard's anytime-valid p-value.
pub const SRM_P_VALUE: &str = "canaryd_srm_p_value";
/// `canaryd_webhook_calls_total{event,result}`.
pub const WEBHOOK_CALLS: &str = "canaryd_webhook_calls_total";
/// `canaryd_rollout_step`: the index of the rollout's step (from 1; 0 before the first).
pub const ROLLOUT_STEP: &str = "canaryd_rollout_step";
/// `canaryd_rollout_phase{phase}`: 1 for the rollout's phase, 0 for the others.
pub const ROLLOUT_PHASE: &str = "canaryd_rollout_phase";
/// The rollout's phases, as `canaryd_rollout_phase` labels them.
pub const ROLLOUT_PHASES: [&str; 6] = [
    "idle",
    "progressing",
    "paused",
    "waiting",
    "succeeded",
    "failed",
];
/// `canaryd_outcomes_dropped_total`: outcomes the window task could not keep up with.
pub const OUTCOMES_DROPPED: &str = "canaryd_outcomes_dropped_total";

/// Histogram buckets for request duration: 0.5 ms to 30 s.
pub const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// How often histogram samples are folded into buckets, keeping memory flat between scrapes.
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

static METADATA: Metadata<'static> = Metadata::new("canaryd", metrics::Level::INFO, None);

/// The metrics registry of one canaryd instance.
pub struct Metrics {
    recorder: Arc<PrometheusRecorder>,
    handle: PrometheusHandle,
    arms: Mutex<HashMap<Arc<str>, Arc<ArmMetrics>>>,
    reload_success: Counter,
    reload_failure: Counter,
    outcomes_dropped: Counter,
    /// Indexed by [`ClientFault`].
    client_errors: [Counter; 4],
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// A fresh registry with the duration histogram's buckets set.
    pub fn new() -> Arc<Metrics> {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(DURATION.into()), DURATION_BUCKETS)
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Full(SHADOW_DURATION.into()), DURATION_BUCKETS)
            })
            .map(PrometheusBuilder::build_recorder)
            // Only fails for an empty bucket list; DURATION_BUCKETS is a non-empty constant.
            .expect("non-empty histogram buckets");
        describe(&recorder);
        let handle = recorder.handle();
        let reload = |result: &'static str| {
            recorder.register_counter(
                &Key::from_parts(RELOADS, vec![Label::new("result", result)]),
                &METADATA,
            )
        };
        let reload_success = reload("success");
        let reload_failure = reload("failure");
        let outcomes_dropped =
            recorder.register_counter(&Key::from_name(OUTCOMES_DROPPED), &METADATA);
        let client_errors = ClientFault::ALL.map(|f| {
            recorder.register_counter(
                &Key::from_parts(CLIENT_ERRORS, vec![Label::new("kind", f.as_str())]),
                &METADATA,
            )
        });
        Arc::new(Metrics {
            client_errors,
            recorder: Arc::new(recorder),
            handle,
            arms: Mutex::new(HashMap::new()),
            reload_success,
            reload_failure,
            outcomes_dropped,
        })
    }

    /// The handles of one arm, created on first use and shared by every snapshot after.
    pub fn arm(&self, name: &Arc<str>) -> Arc<ArmMetrics> {
        let mut arms = self.arms.lock().unwrap_or_else(|p| p.into_inner());
        arms.entry(name.clone())
            .or_insert_with(|| Arc::new(ArmMetrics::new(self.recorder.clone(), name)))
            .clone()
    }

    /// Counts a config reload.
    pub fn reload(&self, ok: bool) {
        if ok {
            self.reload_success.increment(1);
        } else {
            self.reload_failure.increment(1);
        }
    }

    /// Counts outcomes dropped because the window task was behind.
    pub fn outcome_dropped(&self) {
        self.outcomes_dropped.increment(1);
    }

    /// Counts a request the client broke.
    pub fn client_error(&self, fault: ClientFault) {
        self.client_errors[fault as usize].increment(1);
    }

    /// Counts a trip of `arm` for `reason`.
    pub fn rollback(&self, arm: &str, reason: &'static str) {
        self.recorder
            .register_counter(
                &Key::from_parts(
                    ROLLBACKS,
                    vec![
                        Label::new("upstream", arm.to_owned()),
                        Label::new("reason", reason),
                    ],
                ),
                &METADATA,
            )
            .increment(1);
    }

    /// Sets `canaryd_analysis_verdict` of one arm and metric.
    pub fn analysis_verdict(&self, arm: &str, metric: &'static str, value: f64) {
        self.recorder
            .register_gauge(
                &Key::from_parts(
                    ANALYSIS_VERDICT,
                    vec![
                        Label::new("upstream", arm.to_owned()),
                        Label::new("metric", metric),
                    ],
                ),
                &METADATA,
            )
            .set(value);
    }

    /// Counts one webhook call: `event` is the hook type, `result` one of a fixed set
    /// (`success`, `failure`, `timeout`, `dropped`).
    pub fn webhook_call(&self, event: &'static str, result: &'static str) {
        self.recorder
            .register_counter(
                &Key::from_parts(
                    WEBHOOK_CALLS,
                    vec![Label::new("event", event), Label::new("result", result)],
                ),
                &METADATA,
            )
            .increment(1);
    }

    /// Sets `canaryd_rollout_step` and `canaryd_rollout_phase` (1 for `phase`, 0 for the
    /// other phases).
    pub fn rollout(&self, step: usize, phase: &str) {
        self.recorder
            .register_gauge(&Key::from_name(ROLLOUT_STEP), &METADATA)
            .set(step as f64);
        for p in ROLLOUT_PHASES {
            self.recorder
                .register_gauge(
                    &Key::from_parts(ROLLOUT_PHASE, vec![Label::new("phase", p)]),
                    &METADATA,
                )
                .set(if p == phase { 1.0 } else { 0.0 });
        }
    }

    /// Counts one shadow copy by result (`match`, `mismatch`, `error`, `skipped`, `dropped`).
    pub fn shadow_request(&self, result: &'static str) {
        self.counter(SHADOW_REQUESTS, vec![Label::new("result", result)])
            .increment(1);
    }

    /// Counts a mismatch of one compared field (a pointer from `[shadow] compare`).
    pub fn shadow_field_mismatch(&self, field: &str) {
        self.counter(
            SHADOW_FIELD_MISMATCHES,
            vec![Label::new("field", field.to_owned())],
        )
        .increment(1);
    }

    /// Records how long a shadow call took.
    pub fn shadow_duration(&self, d: Duration) {
        self.recorder
            .register_histogram(&Key::from_name(SHADOW_DURATION), &METADATA)
            .record(d.as_secs_f64());
    }

    /// The counter of answers of `arm` with `label` (one of at most 32 labels, or `other`):
    /// resolved once per pair by the caller and kept.
    pub fn response_label(&self, arm: &str, label: &str) -> Counter {
        self.counter(
            RESPONSE_LABELS,
            vec![
                Label::new("upstream", arm.to_owned()),
                Label::new("label", label.to_owned()),
            ],
        )
    }

    /// Sets the sample-ratio guard's p-value of `arm`, `by` `requests` or `users`.
    pub fn srm_p_value(&self, arm: &str, by: &'static str, value: f64) {
        self.recorder
            .register_gauge(
                &Key::from_parts(
                    SRM_P_VALUE,
                    vec![Label::new("upstream", arm.to_owned()), Label::new("by", by)],
                ),
                &METADATA,
            )
            .set(value);
    }

    /// Sets the drift of `arm` against the baseline on `field` (a distance in [0, 1]).
    pub fn drift(&self, arm: &str, field: &str, value: f64) {
        self.recorder
            .register_gauge(
                &Key::from_parts(
                    DRIFT,
                    vec![
                        Label::new("upstream", arm.to_owned()),
                        Label::new("field", field.to_owned()),
                    ],
                ),
                &METADATA,
            )
            .set(value);
    }

    fn counter(&self, name: &'static str, labels: Vec<Label>) -> Counter {
        self.recorder
            .register_counter(&Key::from_parts(name, labels), &METADATA)
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        self.handle.render()
    }

    /// Folds histogram samples; call every [`UPKEEP_INTERVAL`].
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }
}

fn describe(r: &PrometheusRecorder) {
    let d = |name: &'static str, unit: Option<Unit>, text: &'static str| (name, unit, text);
    for (name, unit, text) in [
        d(REQUESTS, None, "Requests answered, by arm and status (including 502/504 made by canaryd)."),
        d(FAILURES, None, "Failures to get a response from an upstream, by kind."),
        d(ROLLBACKS, None, "Arms tripped by the rollback circuit or the admin API, by reason."),
        d(RELOADS, None, "Config reloads, by result."),
        d(GRPC, None, "gRPC calls by arm and grpc-status (from headers or trailers)."),
        d(CLIENT_ERRORS, None, "Requests the client broke (refused head, malformed, abandoned or too slow body), by kind; never counted against an arm."),
        d(SHADOW_REQUESTS, None, "Shadow copies by result: match, mismatch (the shadow answered differently), error (the shadow failed), skipped (a body over max_body_bytes, or the primary failed), dropped (not sent: max_in_flight reached, or the shadow is failing and copies wait)."),
        d(SHADOW_FIELD_MISMATCHES, None, "Shadow mismatches by compared field (JSON pointer)."),
        d(RESPONSE_LABELS, None, "Answers by arm and label (the label_pointer field of JSON responses; 32 labels, then other)."),
        d(WEBHOOK_CALLS, None, "Webhook calls, by hook type and result (success = 2xx; dropped = not sent, the queue was full)."),
        d(OUTCOMES_DROPPED, None, "Request outcomes not counted in the analysis and the recent windows because the circuit task was behind."),
    ] {
        r.describe_counter(name.into(), unit, text.into());
    }
    r.describe_histogram(
        DURATION.into(),
        Some(Unit::Seconds),
        "Time from request received to upstream response headers (or the proxy's error), by arm."
            .into(),
    );
    r.describe_gauge(
        IN_FLIGHT.into(),
        None,
        "Requests being served, by arm.".into(),
    );
    r.describe_gauge(
        WEIGHT.into(),
        None,
        "Effective weight in percent, by arm.".into(),
    );
    r.describe_gauge(
        TRIPPED.into(),
        None,
        "1 while the arm is tripped (weight forced to 0).".into(),
    );
    r.describe_histogram(
        SHADOW_DURATION.into(),
        Some(Unit::Seconds),
        "Time of a shadow call, to the end of the shadow's body.".into(),
    );
    r.describe_gauge(
        DRIFT.into(),
        None,
        "Drift of the arm's answers from the baseline's, by field: Jensen-Shannon distance \
         (base 2) for the label, two-sample KS statistic for the score; 0 = identical."
            .into(),
    );
    r.describe_gauge(
        SRM_P_VALUE.into(),
        None,
        "Sample-ratio mismatch guard: anytime-valid p-value that the arm's share of random \
         requests (by=requests) or of distinct sticky users (by=users) follows its effective \
         weights; below 0.001 is a mismatch."
            .into(),
    );
    r.describe_gauge(
        ROLLOUT_STEP.into(),
        None,
        "The progressive rollout's step, from 1 (0 before the first step).".into(),
    );
    r.describe_gauge(
        ROLLOUT_PHASE.into(),
        None,
        "1 for the progressive rollout's phase, 0 for the others.".into(),
    );
    r.describe_gauge(
        ANALYSIS_VERDICT.into(),
        None,
        "The analysis of the arm against the baseline, by metric: 1 pass (shown within the \
         limit), 0 inconclusive, -1 fail (shown beyond it), at the configured confidence."
            .into(),
    );
}

/// Pre-resolved handles for one arm.
pub struct ArmMetrics {
    recorder: Arc<PrometheusRecorder>,
    name: Arc<str>,
    /// Indexed by `status - 100` for 100..=599.
    by_status: Box<[OnceLock<Counter>]>,
    /// Indexed by grpc-status 0..=16; index 17 for codes outside the standard range.
    by_grpc: Box<[OnceLock<Counter>]>,
    duration: Histogram,
    in_flight: Gauge,
    failures: [Counter; 3],
    weight: Gauge,
    tripped: Gauge,
}

impl std::fmt::Debug for ArmMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArmMetrics")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl ArmMetrics {
    fn new(recorder: Arc<PrometheusRecorder>, name: &Arc<str>) -> Self {
        let label = || Label::new("upstream", name.to_string());
        let key = |metric: &'static str| Key::from_parts(metric, vec![label()]);
        let failure = |kind: &'static str| {
            recorder.register_counter(
                &Key::from_parts(FAILURES, vec![label(), Label::new("kind", kind)]),
                &METADATA,
            )
        };
        ArmMetrics {
            by_status: (100..600).map(|_| OnceLock::new()).collect(),
            by_grpc: (0..18).map(|_| OnceLock::new()).collect(),
            duration: recorder.register_histogram(&key(DURATION), &METADATA),
            in_flight: recorder.register_gauge(&key(IN_FLIGHT), &METADATA),
            failures: [
                FailureKind::Connect,
                FailureKind::Timeout,
                FailureKind::Protocol,
            ]
            .map(|k| failure(k.as_str())),
            weight: recorder.register_gauge(&key(WEIGHT), &METADATA),
            tripped: recorder.register_gauge(&key(TRIPPED), &METADATA),
            name: name.clone(),
            recorder,
        }
    }

    /// Counts a finished request with its status and records its duration.
    #[inline]
    pub fn record(&self, status: u16, elapsed: Duration) {
        self.requests(status).increment(1);
        self.duration.record(elapsed.as_secs_f64());
    }

    fn requests(&self, status: u16) -> &Counter {
        // hyper's StatusCode is always 100..=999; codes past 599 share the 599 slot's label
        // space only if an upstream sends them, which HTTP does not define.
        let idx = usize::from(status.clamp(100, 599) - 100);
        self.by_status[idx].get_or_init(|| {
            self.recorder.register_counter(
                &Key::from_parts(
                    REQUESTS,
                    vec![
                        Label::new("upstream", self.name.to_string()),
                        Label::new("status", status.clamp(100, 599).to_string()),
                    ],
                ),
                &METADATA,
            )
        })
    }

    /// Counts a gRPC call's final status.
    pub fn grpc_status(&self, code: u32) {
        let idx = (code.min(17)) as usize;
        self.by_grpc[idx]
            .get_or_init(|| {
                let label = if idx == 17 {
                    "other".to_owned()
                } else {
                    idx.to_string()
                };
                self.recorder.register_counter(
                    &Key::from_parts(
                        GRPC,
                        vec![
                            Label::new("upstream", self.name.to_string()),
                            Label::new("grpc_status", label),
                        ],
                    ),
                    &METADATA,
                )
            })
            .increment(1);
    }

    /// Counts a failure to get a response.
    #[inline]
    pub fn failure(&self, kind: FailureKind) {
        self.failures[kind as usize].increment(1);
    }

    /// Counts a request as in flight until the returned guard is dropped.
    #[inline]
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.increment(1.0);
        InFlight(self.clone())
    }

    /// Publishes the arm's effective weight and tripped state.
    pub fn set_state(&self, weight_bp: u16, tripped: bool) {
        self.weight.set(f64::from(weight_bp) / 100.0);
        self.tripped.set(if tripped { 1.0 } else { 0.0 });
    }
}

/// Holds one request in `canaryd_requests_in_flight` until dropped (end of the response body).
#[derive(Debug)]
pub struct InFlight(Arc<ArmMetrics>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the sample `series` (name and labels exactly as rendered), if present.
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines().find_map(|l| {
            let rest = l.strip_prefix(series)?.strip_prefix(' ')?;
            Some(rest.trim().parse().expect("numeric sample"))
        })
    }

    /// Every sample line of `metric` (name followed by `{` or a space).
    fn series_of<'a>(text: &'a str, metric: &str) -> Vec<&'a str> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| {
                l.strip_prefix(metric)
                    .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
            })
            .collect()
    }

    fn name(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    #[test]
    fn arm_handles_are_resolved_once_per_name() {
        let m = Metrics::new();
        let a = m.arm(&name("canary"));
        // A different allocation of the same name (a new config's arm) gets the same handles.
        let again = m.arm(&name("canary"));
        assert!(Arc::ptr_eq(&a, &again));
        let stable = m.arm(&name("stable"));
        assert!(!Arc::ptr_eq(&a, &stable));
        // Adding arms later does not replace the earlier ones.
        let _third = m.arm(&name("shadow"));
        assert!(Arc::ptr_eq(&a, &m.arm(&name("canary"))));
        // Counts made through one handle are seen through the other: one series, not two.
        a.record(200, Duration::from_millis(1));
        again.record(200, Duration::from_millis(1));
        let text = m.render();
        assert_eq!(
            sample(
                &text,
                r#"canaryd_requests_total{upstream="canary",status="200"}"#
            ),
            Some(2.0),
            "{text}"
        );
    }

    #[test]
    fn status_counters_are_created_on_first_use_and_counted_exactly() {
        let m = Metrics::new();
        let canary = m.arm(&name("canary"));
        let stable = m.arm(&name("stable"));
        assert!(
            series_of(&m.render(), REQUESTS).is_empty(),
            "no status series before the first request"
        );
        for _ in 0..3 {
            canary.record(200, Duration::from_millis(2));
        }
        for _ in 0..2 {
            canary.record(503, Duration::from_millis(40));
        }
        stable.record(200, Duration::from_millis(1));
        let text = m.render();
        let mut lines = series_of(&text, REQUESTS);
        lines.sort_unstable();
        assert_eq!(
            lines,
            vec![
                r#"canaryd_requests_total{upstream="canary",status="200"} 3"#,
                r#"canaryd_requests_total{upstream="canary",status="503"} 2"#,
                r#"canaryd_requests_total{upstream="stable",status="200"} 1"#,
            ],
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                r#"canaryd_request_duration_seconds_count{upstream="canary"}"#
            ),
            Some(5.0),
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                r#"canaryd_request_duration_seconds_bucket{upstream="canary",le="0.0025"}"#
            ),
            Some(3.0),
            "the three 2 ms requests fall in the 2.5 ms bucket: {text}"
        );
        assert_eq!(
            sample(
                &text,
                r#"canaryd_request_duration_seconds_count{upstream="stable"}"#
            ),
            Some(1.0)
        );
    }

    #[test]
    fn statuses_outside_100_to_599_are_clamped_to_the_edges() {
        let m = Metrics::new();
        let arm = m.arm(&name("canary"));
        arm.record(999, Duration::ZERO);
        arm.record(599, Duration::ZERO);
        arm.record(42, Duration::ZERO);
        let text = m.render();
        assert_eq!(
            sample(
                &text,
                r#"canaryd_requests_total{upstream="canary",status="599"}"#
            ),
            Some(2.0),
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                r#"canaryd_requests_total{upstream="canary",status="100"}"#
            ),
            Some(1.0),
            "{text}"
        );
    }

    #[test]
    fn failures_are_counted_by_kind_from_zero() {
        let m = Metrics::new();
        let arm = m.arm(&name("canary"));
        let text = m.render();
        for kind in ["connect", "timeout", "protocol"] {
            assert_eq!(
                sample(
                    &text,
                    &format!(
                        r#"canaryd_upstream_failures_total{{upstream="canary",kind="{kind}"}}"#
                    )
                ),
                Some(0.0),
                "{kind} present at 0 before any failure: {text}"
            );
        }
        arm.failure(FailureKind::Connect);
        arm.failure(FailureKind::Connect);
        arm.failure(FailureKind::Timeout);
        let text = m.render();
        for (kind, n) in [("connect", 2.0), ("timeout", 1.0), ("protocol", 0.0)] {
            assert_eq!(
                sample(
                    &text,
                    &format!(
                        r#"canaryd_upstream_failures_total{{upstream="canary",kind="{kind}"}}"#
                    )
                ),
                Some(n),
                "{kind}: {text}"
            );
        }
    }

    #[test]
    fn client_errors_have_all_four_kinds_from_the_start() {
        let m = Metrics::new();
        let text = m.render();
        let mut lines = series_of(&text, CLIENT_ERRORS);
        lines.sort_unstable();
        assert_eq!(
            lines,
            vec![
                r#"canaryd_client_errors_total{kind="aborted"} 0"#,
                r#"canaryd_client_errors_total{kind="bad_request"} 0"#,
                r#"canaryd_client_errors_total{kind="body"} 0"#,
                r#"canaryd_client_errors_total{kind="timeout"} 0"#,
            ],
            "{text}"
        );
        m.client_error(ClientFault::Aborted);
        m.client_error(ClientFault::Aborted);
        m.client_error(ClientFault::Timeout);
        let text = m.render();
        for (fault, n) in [
            (ClientFault::BadRequest, 0.0),
            (ClientFault::Body, 0.0),
            (ClientFault::Aborted, 2.0),
            (ClientFault::Timeout, 1.0),
        ] {
            let series = format!(
                r#"canaryd_client_errors_total{{kind="{}"}}"#,
                fault.as_str()
            );
            assert_eq!(sample(&text, &series), Some(n), "{series}: {text}");
        }
    }

    #[test]
    fn in_flight_gauge_follows_the_guard() {
        let m = Metrics::new();
        let arm = m.arm(&name("canary"));
        let series = r#"canaryd_requests_in_flight{upstream="canary"}"#;
        assert_eq!(sample(&m.render(), series), Some(0.0));
        let first = arm.start();
        let second = arm.start();
        assert_eq!(sample(&m.render(), series), Some(2.0));
        drop(first);
        assert_eq!(sample(&m.render(), series), Some(1.0));
        drop(second);
        assert_eq!(sample(&m.render(), series), Some(0.0));
    }

    #[test]
    fn grpc_statuses_above_16_share_the_other_bucket() {
        let m = Metrics::new();
        let arm = m.arm(&name("canary"));
        for code in [0, 0, 14, 16, 17, 99, u32::MAX] {
            arm.grpc_status(code);
        }
        let text = m.render();
        let mut lines = series_of(&text, GRPC);
        lines.sort_unstable();
        assert_eq!(
            lines,
            vec![
                r#"canaryd_grpc_responses_total{upstream="canary",grpc_status="0"} 2"#,
                r#"canaryd_grpc_responses_total{upstream="canary",grpc_status="14"} 1"#,
                r#"canaryd_grpc_responses_total{upstream="canary",grpc_status="16"} 1"#,
                r#"canaryd_grpc_responses_total{upstream="canary",grpc_status="other"} 3"#,
            ],
            "{text}"
        );
    }

    #[test]
    fn state_gauges_reloads_and_rollbacks() {
        let m = Metrics::new();
        let arm = m.arm(&name("canary"));
        arm.set_state(1250, false);
        let text = m.render();
        assert_eq!(
            sample(
                &text,
                r#"canaryd_upstream_weight_percent{upstream="canary"}"#
            ),
            Some(12.5)
        );
        assert_eq!(
            sample(&text, r#"canaryd_upstream_tripped{upstream="canary"}"#),
            Some(0.0)
        );
        arm.set_state(0, true);
        m.reload(true);
        m.reload(true);
        m.reload(false);
        m.rollback("canary", "error_rate");
        m.outcome_dropped();
        let text = m.render();
        for (series, want) in [
            (r#"canaryd_upstream_weight_percent{upstream="canary"}"#, 0.0),
            (r#"canaryd_upstream_tripped{upstream="canary"}"#, 1.0),
            (r#"canaryd_config_reloads_total{result="success"}"#, 2.0),
            (r#"canaryd_config_reloads_total{result="failure"}"#, 1.0),
            (
                r#"canaryd_rollbacks_total{upstream="canary",reason="error_rate"}"#,
                1.0,
            ),
            ("canaryd_outcomes_dropped_total", 1.0),
        ] {
            assert_eq!(sample(&text, series), Some(want), "{series}: {text}");
        }
    }

    #[test]
    fn two_registries_do_not_share_counts() {
        let one = Metrics::new();
        let two = Metrics::new();
        let a = one.arm(&name("canary"));
        let b = two.arm(&name("canary"));
        assert!(!Arc::ptr_eq(&a, &b));
        for _ in 0..3 {
            a.record(200, Duration::from_millis(1));
        }
        b.record(200, Duration::from_millis(1));
        a.failure(FailureKind::Protocol);
        one.client_error(ClientFault::Body);
        let _guard = a.start();
        let series = r#"canaryd_requests_total{upstream="canary",status="200"}"#;
        let (t1, t2) = (one.render(), two.render());
        assert_eq!(sample(&t1, series), Some(3.0), "{t1}");
        assert_eq!(sample(&t2, series), Some(1.0), "{t2}");
        let fail = r#"canaryd_upstream_failures_total{upstream="canary",kind="protocol"}"#;
        assert_eq!(sample(&t1, fail), Some(1.0));
        assert_eq!(sample(&t2, fail), Some(0.0));
        let body = r#"canaryd_client_errors_total{kind="body"}"#;
        assert_eq!(sample(&t1, body), Some(1.0));
        assert_eq!(sample(&t2, body), Some(0.0));
        let in_flight = r#"canaryd_requests_in_flight{upstream="canary"}"#;
        assert_eq!(sample(&t1, in_flight), Some(1.0));
        assert_eq!(sample(&t2, in_flight), Some(0.0));
    }
}
