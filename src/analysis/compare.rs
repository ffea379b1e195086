//! Canary analysis: one non-baseline arm against the baseline, judged with anytime-valid
//! confidence sequences ([`super::sequential`]).
//!
//! A [`Comparison`] holds every outcome of the arm, and of the baseline, since the comparison
//! began (the arm's build or its last reset): the baseline is compared over the same period as
//! the arm, so a daily pattern in error rates is not read as a regression. Each arm's sample
//! is judged only by its own outcomes, so changing how traffic is split (a ramp step, a trip
//! of another arm) changes how fast evidence comes, never what it means.
//!
//! Three metrics, each with a verdict:
//!
//! - `error_rate`: the arm's error rate against the ceiling `max_error_rate`;
//! - `error_rate_increase`: the arm's rate minus the baseline's against the margin
//!   `max_error_rate_increase`;
//! - `latency` (when `max_p99_ratio` or `max_p99_increase` is set): the arm's p99 against the
//!   baseline's, as a ratio and as a difference, on successful requests.
//!
//! Every check is the same rule on an interval whose ends are anytime-valid bounds
//! ([`super::sequential`]): **fail** when the low end is above the limit, **pass** when the
//! high end is at or below it, **inconclusive** otherwise, and always inconclusive before the
//! arm has `min_requests` outcomes. The false-alarm budget `1 - confidence` is split evenly
//! between the error metrics (both read the same rate bounds) and latency when it is
//! configured, and within each, three quarters to the arm's bounds and a quarter to the
//! baseline's. So for an arm within the limits, the chance that any check *ever* fails,
//! however often it is looked at, is at most `1 - confidence`; likewise the chance that an
//! arm beyond a limit ever passes. (Each end holds at the confidence on its own; the two ends
//! together at `1 - 2 (1 - confidence)`.)

use std::time::Duration;

use super::histogram::{bucket_edges_us, bucket_of, kth_largest, quantile, BUCKETS};

use super::sequential::{boundary, Counts, Difference, Mixture};

/// The limits and confidence a comparison is judged against (from `[rollback]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// 1 minus the false-alarm rate.
    pub confidence: f64,
    /// Outcomes of the arm before any verdict.
    pub min_requests: u64,
    /// Ceiling on the arm's error rate.
    pub max_error_rate: f64,
    /// Margin on the arm's error rate above the baseline's.
    pub max_error_rate_increase: f64,
    /// Ceiling on the arm's p99 over the baseline's.
    pub max_p99_ratio: Option<f64>,
    /// Ceiling on the arm's p99 minus the baseline's.
    pub max_p99_increase: Option<Duration>,
}

impl Default for Limits {
    /// The defaults of `[rollback]`: confidence 0.99, `min_requests` 5, `max_error_rate` 10%,
    /// `max_error_rate_increase` 2 points, no latency limit.
    fn default() -> Self {
        Limits {
            confidence: 0.99,
            min_requests: 5,
            max_error_rate: 0.10,
            max_error_rate_increase: 0.02,
            max_p99_ratio: None,
            max_p99_increase: None,
        }
    }
}

impl Limits {
    fn latency(&self) -> bool {
        self.max_p99_ratio.is_some() || self.max_p99_increase.is_some()
    }

    /// False-alarm budget of one metric group (error rates; latency).
    fn alpha_group(&self) -> f64 {
        let groups = if self.latency() { 2.0 } else { 1.0 };
        (1.0 - self.confidence) / groups
    }
}

/// The share of the error metrics' budget that `error_rate_increase` has; `error_rate` has
/// the rest. The increase is the test that has to find small regressions, the ceiling only
/// large ones.
const INCREASE_SHARE: f64 = 0.75;
/// The arm's share of the budget of the per-arm p99 intervals `/status` shows (the latency
/// verdicts come from a two-sample test; these intervals are for reading).
const ARM_SHARE: f64 = 0.75;

/// A verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Shown not worse than the limits, at the confidence.
    Pass,
    /// Not shown either way yet.
    Inconclusive,
    /// Shown worse than a limit, at the confidence.
    Fail,
}

impl Verdict {
    /// `pass`, `inconclusive` or `fail`.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Inconclusive => "inconclusive",
            Verdict::Fail => "fail",
        }
    }

    /// The value of `canaryd_analysis_verdict`: 1 pass, 0 inconclusive, -1 fail.
    pub fn gauge(self) -> f64 {
        match self {
            Verdict::Pass => 1.0,
            Verdict::Inconclusive => 0.0,
            Verdict::Fail => -1.0,
        }
    }

    /// Fail if any fails, pass if all pass, inconclusive otherwise.
    fn combine(verdicts: impl IntoIterator<Item = Verdict>) -> Verdict {
        let mut all_pass = true;
        for v in verdicts {
            match v {
                Verdict::Fail => return Verdict::Fail,
                Verdict::Inconclusive => all_pass = false,
                Verdict::Pass => {}
            }
        }
        if all_pass {
            Verdict::Pass
        } else {
            Verdict::Inconclusive
        }
    }
}

/// The metrics a comparison judges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// The arm's error rate against `max_error_rate`.
    ErrorRate,
    /// The arm's error rate minus the baseline's against `max_error_rate_increase`.
    ErrorRateIncrease,
    /// The arm's p99 against the baseline's (`max_p99_ratio`, `max_p99_increase`).
    Latency,
}

impl Metric {
    /// The metric's name, also its rollback reason and its `metric` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Metric::ErrorRate => "error_rate",
            Metric::ErrorRateIncrease => "error_rate_increase",
            Metric::Latency => "latency",
        }
    }
}

/// One quantity with its estimate, its anytime-valid interval and the limit it is held to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Check {
    /// What is measured: `error_rate`, `error_rate_difference`, `p99_ratio`,
    /// `p99_increase_ms`.
    pub quantity: &'static str,
    /// Its point estimate.
    pub estimate: f64,
    /// Low end of its interval (may be -inf).
    pub low: f64,
    /// High end of its interval (may be +inf).
    pub high: f64,
    /// The limit it is held to: the metric fails when the quantity is shown above it, and
    /// passes when it is shown at or below it.
    pub limit: f64,
    /// The config key the limit comes from.
    pub key: &'static str,
    /// The test statistic against "within the limit": ln of the evidence (the metric fails
    /// when it reaches [`MetricReport::threshold`]).
    pub ln_evidence_exceeds: f64,
    /// The same against "beyond the limit" (the metric passes when it reaches the threshold).
    pub ln_evidence_within: f64,
}

/// One metric's verdict and the checks behind it.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricReport {
    /// Which metric.
    pub metric: Metric,
    /// Its verdict.
    pub verdict: Verdict,
    /// The confidence each end of its intervals holds with (at least).
    pub level: f64,
    /// `ln(1 / (1 - level))`: the evidence a test needs.
    pub threshold: f64,
    /// The quantities it is judged on.
    pub checks: Vec<Check>,
}

/// One arm's numbers in a comparison.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SampleReport {
    /// Outcomes.
    pub requests: u64,
    /// Errors among them.
    pub errors: u64,
    /// `errors / requests` (0 when empty).
    pub error_rate: f64,
    /// Bounds on the error rate (with this sample's share of the error metrics' budget).
    pub error_rate_interval: (f64, f64),
    /// p99 of successful requests (ms), when latency is judged and there is one.
    pub p99_ms: Option<f64>,
    /// Interval for that p99 (ms).
    pub p99_interval_ms: Option<(f64, f64)>,
}

/// The whole analysis of one arm against the baseline.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// Fail if any metric fails, pass if all pass, inconclusive otherwise.
    pub verdict: Verdict,
    /// The arm's numbers.
    pub arm: SampleReport,
    /// The baseline's numbers over the same period.
    pub baseline: SampleReport,
    /// Whether the arm has fewer than `min_requests` outcomes (no verdict yet).
    pub below_min_requests: bool,
    /// The confidence asked for.
    pub confidence: f64,
    /// Per metric.
    pub metrics: Vec<MetricReport>,
}

impl Report {
    /// The first failing metric, if any.
    pub fn failure(&self) -> Option<&MetricReport> {
        self.metrics.iter().find(|m| m.verdict == Verdict::Fail)
    }
}

/// A small positive number with 3 significant digits and no trailing zeros.
fn trim_sig(x: f64) -> String {
    let decimals = (2.0 - x.log10().floor()).clamp(0.0, 12.0) as usize;
    let s = format!("{x:.decimals$}");
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

/// A number with at most 3 decimals and no trailing zeros.
fn trim(x: f64) -> String {
    let s = format!("{x:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".into()
    } else {
        s.into()
    }
}

/// One arm's outcomes since the comparison began.
#[derive(Debug, Clone)]
struct Sample {
    requests: u64,
    errors: u64,
    /// Latencies of successful requests.
    latency: Box<[u64; BUCKETS]>,
    latency_n: u64,
}

/// The tests a comparison is judged with, and their budgets.
struct Tests {
    /// The arm's error rate against the baseline's (the arm's mixture weighted at the
    /// margin).
    difference: Difference,
    /// For the share of latencies above the p99, judged from above (a p99 shown high): weight
    /// at shares of 1.5% to 5% (a slow arm puts a few percent of its requests above what was
    /// the p99); from below (a p99 shown low): the grid.
    latency: (Mixture, Mixture),
    /// The baseline's factor in the latency tests.
    latency_base: Mixture,
    /// The budget of each latency test (the latency group's, split between the ratio and the
    /// increase when both are set).
    latency_test_alpha: f64,
    /// Budgets: the increase, the ceiling, and latency (arm, baseline) when judged.
    increase_alpha: f64,
    ceiling_alpha: f64,
    latency_alpha: Option<(f64, f64)>,
}

impl Tests {
    fn new(limits: &Limits) -> Self {
        let group = limits.alpha_group();
        Tests {
            difference: Difference {
                arm: Mixture::around(limits.max_error_rate_increase),
                base: Mixture::with_null(),
            },
            latency: (Mixture::around(LATENCY_SHIFT), Mixture::grid()),
            latency_base: Mixture::with_null(),
            latency_test_alpha: group
                / f64::from(
                    u8::from(limits.max_p99_ratio.is_some())
                        + u8::from(limits.max_p99_increase.is_some()),
                )
                .max(1.0),
            increase_alpha: group * INCREASE_SHARE,
            ceiling_alpha: group * (1.0 - INCREASE_SHARE),
            latency_alpha: limits
                .latency()
                .then_some((group * ARM_SHARE, group * (1.0 - ARM_SHARE))),
        }
    }
}

impl Sample {
    fn new() -> Self {
        Sample {
            requests: 0,
            errors: 0,
            latency: Box::new([0; BUCKETS]),
            latency_n: 0,
        }
    }

    fn record(&mut self, error: bool, latency: Duration) {
        self.requests += 1;
        if error {
            self.errors += 1;
        } else {
            self.latency[bucket_of(latency)] += 1;
            self.latency_n += 1;
        }
    }

    fn counts(&self) -> Counts {
        Counts {
            k: self.errors,
            n: self.requests,
        }
    }

    /// The numbers, each interval end holding with probability `1 - alpha` on its own
    /// (`latency_alpha` for the p99, when latency is judged).
    fn report(&self, tests: &Tests, alpha: f64, latency_alpha: Option<f64>) -> SampleReport {
        let rate = if self.requests == 0 {
            0.0
        } else {
            self.errors as f64 / self.requests as f64
        };
        let (p99_ms, p99_interval_ms) = match latency_alpha {
            Some(a) if self.latency_n > 0 => {
                let (lo, hi) = self.p99_interval_us(&tests.latency, a);
                let est =
                    quantile(&self.latency[..], self.latency_n, P99).map(|d| d.as_secs_f64() * 1e3);
                (est, Some((lo / 1e3, hi / 1e3)))
            }
            _ => (None, None),
        };
        SampleReport {
            requests: self.requests,
            errors: self.errors,
            error_rate: rate,
            error_rate_interval: (
                tests
                    .difference
                    .arm
                    .lower_bound(self.errors, self.requests, alpha),
                tests
                    .difference
                    .arm
                    .upper_bound(self.errors, self.requests, alpha),
            ),
            p99_ms,
            p99_interval_ms,
        }
    }

    /// Interval for the p99 of successful requests, in µs. The count `k` of latencies above
    /// the true p99 is a count of events of rate 1%, so it stays within the band `[lo, hi]`
    /// of [`Mixture::count_band`]: then the p99 is at least the (hi+1)-th largest latency and
    /// below the lo-th largest. Bucket edges make both ends hold for the true values.
    fn p99_interval_us(&self, mixtures: &(Mixture, Mixture), alpha: f64) -> (f64, f64) {
        let (_, hi) = mixtures.0.count_band(self.latency_n, 1.0 - P99, alpha);
        let (lo, _) = mixtures.1.count_band(self.latency_n, 1.0 - P99, alpha);
        let low = kth_largest(&self.latency[..], hi + 1).map_or(0.0, |b| bucket_edges_us(b).0);
        let high =
            kth_largest(&self.latency[..], lo).map_or(f64::INFINITY, |b| bucket_edges_us(b).1);
        (low, high)
    }
}

/// The quantile the latency metric is about.
const P99: f64 = 0.99;
/// Where the latency test looks hardest: a p99 that has moved so far that 1% + 2 points of
/// requests are above the old one.
const LATENCY_SHIFT: f64 = 0.02;

/// One non-baseline arm against the baseline, since the comparison began.
#[derive(Debug, Clone)]
pub struct Comparison {
    arm: Sample,
    base: Sample,
}

impl Default for Comparison {
    fn default() -> Self {
        Self::new()
    }
}

impl Comparison {
    /// An empty comparison.
    pub fn new() -> Self {
        Comparison {
            arm: Sample::new(),
            base: Sample::new(),
        }
    }

    /// Records one outcome of the arm.
    pub fn record_arm(&mut self, error: bool, latency: Duration) {
        self.arm.record(error, latency);
    }

    /// Records one outcome of the baseline.
    pub fn record_baseline(&mut self, error: bool, latency: Duration) {
        self.base.record(error, latency);
    }

    /// Outcomes of the arm so far.
    pub fn arm_requests(&self) -> u64 {
        self.arm.requests
    }

    /// Outcomes of the baseline so far.
    pub fn baseline_requests(&self) -> u64 {
        self.base.requests
    }

    /// The first metric shown to fail, if any: the cheap question the circuit asks after
    /// every batch (microseconds). It agrees with [`Self::verdicts`].
    pub fn fails(&self, limits: &Limits) -> Option<Metric> {
        if self.arm.requests < limits.min_requests {
            return None;
        }
        let tests = Tests::new(limits);
        if self.ceiling(limits, &tests, true) {
            return Some(Metric::ErrorRate);
        }
        let (arm, base) = (self.arm.counts(), self.base.counts());
        let margin = limits.max_error_rate_increase;
        if tests
            .difference
            .shown_above(arm, base, margin, tests.increase_alpha)
        {
            return Some(Metric::ErrorRateIncrease);
        }
        if shifts(limits).any(|shift| p99_shown_above(&self.arm, &self.base, shift, &tests)) {
            return Some(Metric::Latency);
        }
        None
    }

    /// Each judged metric's verdict, without the intervals (tens of microseconds): what the
    /// circuit exports as `canaryd_analysis_verdict`.
    pub fn verdicts(&self, limits: &Limits) -> Vec<(Metric, Verdict)> {
        let tests = Tests::new(limits);
        let mut out = Vec::with_capacity(3);
        let waiting = self.arm.requests < limits.min_requests;
        let judge = |fail: &dyn Fn() -> bool, pass: &dyn Fn() -> bool| {
            if waiting {
                Verdict::Inconclusive
            } else if fail() {
                Verdict::Fail
            } else if pass() {
                Verdict::Pass
            } else {
                Verdict::Inconclusive
            }
        };
        out.push((
            Metric::ErrorRate,
            judge(&|| self.ceiling(limits, &tests, true), &|| {
                self.ceiling(limits, &tests, false)
            }),
        ));
        let (arm, base) = (self.arm.counts(), self.base.counts());
        let (margin, alpha, d) = (
            limits.max_error_rate_increase,
            tests.increase_alpha,
            &tests.difference,
        );
        out.push((
            Metric::ErrorRateIncrease,
            judge(&|| d.shown_above(arm, base, margin, alpha), &|| {
                d.shown_below(arm, base, margin, alpha)
            }),
        ));
        if limits.latency() {
            let (a, b) = (&self.arm, &self.base);
            let each = shifts(limits).map(|shift| {
                judge(&|| p99_shown_above(a, b, shift, &tests), &|| {
                    p99_shown_below(a, b, shift, &tests)
                })
            });
            out.push((Metric::Latency, Verdict::combine(each)));
        }
        out
    }

    /// Whether the arm's error rate is shown above `max_error_rate` (`above`), or below it.
    fn ceiling(&self, limits: &Limits, tests: &Tests, above: bool) -> bool {
        let (k, n) = (self.arm.errors, self.arm.requests);
        let m = &tests.difference.arm;
        let evidence = if above {
            m.ln_evidence_above(k, n, limits.max_error_rate)
        } else {
            m.ln_evidence_below(k, n, limits.max_error_rate)
        };
        evidence >= -tests.ceiling_alpha.ln()
    }

    /// One line with the numbers behind `metric`'s verdict: the counts, the limit, the test
    /// statistic (ln of the evidence against the limit) and its threshold `ln(1/alpha)`. Cheap
    /// enough to write at the moment of a trip (the intervals take milliseconds and are in
    /// [`Self::report`]).
    pub fn explain(&self, metric: Metric, limits: &Limits) -> String {
        let tests = Tests::new(limits);
        let counts = |s: &Sample| {
            format!(
                "{} errors in {} requests ({:.2}%)",
                s.errors,
                s.requests,
                100.0 * s.counts().rate()
            )
        };
        let pct = |x: f64| format!("{}%", trim(x * 100.0));
        let (who, what, alpha) = match metric {
            Metric::ErrorRate => (
                format!("arm {}", counts(&self.arm)),
                format!(
                    "error_rate above max_error_rate {}: ln evidence {:.2}",
                    pct(limits.max_error_rate),
                    tests.difference.arm.ln_evidence_above(
                        self.arm.errors,
                        self.arm.requests,
                        limits.max_error_rate
                    )
                ),
                tests.ceiling_alpha,
            ),
            Metric::ErrorRateIncrease => (
                format!("arm {}, baseline {}", counts(&self.arm), counts(&self.base)),
                format!(
                    "error_rate_difference {} above max_error_rate_increase {}: ln evidence, \
                     at every baseline rate,",
                    pct(self.arm.counts().rate() - self.base.counts().rate()),
                    pct(limits.max_error_rate_increase)
                ),
                tests.increase_alpha,
            ),
            Metric::Latency => {
                let p99 = |s: &Sample| match quantile(&s.latency[..], s.latency_n, P99) {
                    Some(d) => format!(
                        "p99 {:.1}ms of {} successes",
                        d.as_secs_f64() * 1e3,
                        s.latency_n
                    ),
                    None => "no successes".to_owned(),
                };
                let shown: Vec<String> = shifts(limits)
                    .filter(|&shift| p99_shown_above(&self.arm, &self.base, shift, &tests))
                    .map(|shift| match shift {
                        Shift::Ratio(r) => format!("p99_ratio above max_p99_ratio {r:.3}x"),
                        Shift::Add(us) => {
                            format!("p99_increase above max_p99_increase {:.1}ms", us / 1e3)
                        }
                    })
                    .collect();
                (
                    format!("arm {}, baseline {}", p99(&self.arm), p99(&self.base)),
                    format!(
                        "{}: ln evidence, at every baseline p99,",
                        shown.join(" and ")
                    ),
                    tests.latency_test_alpha,
                )
            }
        };
        format!(
            "{}: {who}; {what} >= threshold {:.2} = ln(1/{}); shown at {}% confidence \
             (anytime-valid)",
            metric.as_str(),
            -alpha.ln(),
            trim_sig(alpha),
            trim((1.0 - alpha) * 100.0)
        )
    }

    /// The analysis as it stands, with every interval (the difference's takes a search:
    /// milliseconds, for `/status` and the exported verdicts, not for every batch).
    pub fn report(&self, limits: &Limits) -> Report {
        let tests = Tests::new(limits);
        let lat = tests.latency_alpha;
        let arm = self
            .arm
            .report(&tests, tests.ceiling_alpha, lat.map(|l| l.0));
        let base = self
            .base
            .report(&tests, tests.increase_alpha, lat.map(|l| l.1));
        let waiting = self.arm.requests < limits.min_requests;
        let verdicts = self.verdicts(limits);
        let verdict_of = |metric| {
            verdicts
                .iter()
                .find(|(m, _)| *m == metric)
                .map_or(Verdict::Inconclusive, |(_, v)| *v)
        };
        let judged = |checks: Vec<Check>, metric, level: f64| MetricReport {
            metric,
            verdict: verdict_of(metric),
            level,
            threshold: -(1.0 - level).ln(),
            checks,
        };
        let (ac, bc) = (self.arm.counts(), self.base.counts());
        let (low, high) = tests.difference.interval(ac, bc, tests.increase_alpha);
        let (al, ah) = arm.error_rate_interval;
        let mut metrics = vec![
            judged(
                vec![Check {
                    quantity: "error_rate",
                    estimate: arm.error_rate,
                    low: al,
                    high: ah,
                    limit: limits.max_error_rate,
                    key: "max_error_rate",
                    ln_evidence_exceeds: tests.difference.arm.ln_evidence_above(
                        ac.k,
                        ac.n,
                        limits.max_error_rate,
                    ),
                    ln_evidence_within: tests.difference.arm.ln_evidence_below(
                        ac.k,
                        ac.n,
                        limits.max_error_rate,
                    ),
                }],
                Metric::ErrorRate,
                1.0 - tests.ceiling_alpha,
            ),
            judged(
                vec![Check {
                    quantity: "error_rate_difference",
                    estimate: arm.error_rate - base.error_rate,
                    low,
                    high,
                    limit: limits.max_error_rate_increase,
                    key: "max_error_rate_increase",
                    ln_evidence_exceeds: tests.difference.ln_evidence_above(
                        ac,
                        bc,
                        limits.max_error_rate_increase,
                    ),
                    ln_evidence_within: tests.difference.ln_evidence_below(
                        ac,
                        bc,
                        limits.max_error_rate_increase,
                    ),
                }],
                Metric::ErrorRateIncrease,
                1.0 - tests.increase_alpha,
            ),
        ];
        if lat.is_some() {
            let checks = self.latency_checks(limits, &tests, &arm, &base);
            metrics.push(judged(
                checks,
                Metric::Latency,
                1.0 - tests.latency_test_alpha,
            ));
        }
        let verdict = Verdict::combine(metrics.iter().map(|m| m.verdict));
        Report {
            verdict,
            arm,
            baseline: base,
            below_min_requests: waiting,
            confidence: limits.confidence,
            metrics,
        }
    }
}

impl Comparison {
    /// The latency checks: each interval is the set of limits neither test rejects.
    fn latency_checks(
        &self,
        limits: &Limits,
        tests: &Tests,
        arm: &SampleReport,
        base: &SampleReport,
    ) -> Vec<Check> {
        let (a, b) = (&self.arm, &self.base);
        let mut checks = Vec::new();
        for shift in shifts(limits) {
            let (quantity, key, limit, estimate) = match shift {
                Shift::Ratio(r) => (
                    "p99_ratio",
                    "max_p99_ratio",
                    r,
                    match (arm.p99_ms, base.p99_ms) {
                        (Some(x), Some(y)) if y > 0.0 => x / y,
                        _ => f64::NAN,
                    },
                ),
                Shift::Add(us) => (
                    "p99_increase_ms",
                    "max_p99_increase",
                    us / 1e3,
                    match (arm.p99_ms, base.p99_ms) {
                        (Some(x), Some(y)) => x - y,
                        _ => f64::NAN,
                    },
                ),
            };
            let make = |v: f64| match shift {
                Shift::Ratio(_) => Shift::Ratio(v),
                Shift::Add(_) => Shift::Add(v * 1e3),
            };
            let above = |v: f64| p99_shown_above(a, b, make(v), tests);
            let below = |v: f64| p99_shown_below(a, b, make(v), tests);
            // Found to a tenth of the precision shown (ratios to 3 places, ms to 1).
            let (lo_range, hi_range, tol) = match shift {
                Shift::Ratio(_) => (0.0, 1e4, 1e-4),
                Shift::Add(_) => (-1e7, 1e7, 1e-2),
            };
            let low = boundary(lo_range, hi_range, tol, above);
            let high = -boundary(-hi_range, -lo_range, tol, |v| below(-v));
            checks.push(Check {
                quantity,
                estimate,
                low: if low <= lo_range && lo_range < 0.0 {
                    f64::NEG_INFINITY
                } else {
                    low
                },
                high: if high >= hi_range {
                    f64::INFINITY
                } else {
                    high
                },
                limit,
                key,
                ln_evidence_exceeds: p99_evidence_above(a, b, shift, tests, f64::NEG_INFINITY),
                ln_evidence_within: p99_evidence_below(a, b, shift, tests, f64::NEG_INFINITY),
            });
        }
        checks
    }
}

/// How a limit moves the baseline's p99 to the arm's allowed p99.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Shift {
    /// `max_p99_ratio`: times this.
    Ratio(f64),
    /// `max_p99_increase`: plus this many µs.
    Add(f64),
}

impl Shift {
    fn apply(self, t_us: f64) -> f64 {
        match self {
            Shift::Ratio(r) => r * t_us,
            Shift::Add(us) => t_us + us,
        }
    }
}

fn shifts(limits: &Limits) -> impl Iterator<Item = Shift> {
    let ratio = limits.max_p99_ratio.map(Shift::Ratio);
    let add = limits
        .max_p99_increase
        .map(|d| Shift::Add(d.as_secs_f64() * 1e6));
    ratio.into_iter().chain(add)
}

/// `suffix[j]` = latencies counted in buckets `j..`.
fn suffix(hist: &[u64; BUCKETS]) -> [u64; BUCKETS + 1] {
    let mut out = [0u64; BUCKETS + 1];
    for j in (0..BUCKETS).rev() {
        out[j] = out[j + 1] + hist[j];
    }
    out
}

/// The first bucket whose values are all at least `t` µs (`BUCKETS` if none).
fn first_bucket_from(t_us: f64) -> usize {
    if !t_us.is_finite() {
        return if t_us < 0.0 { 0 } else { BUCKETS };
    }
    if t_us <= 0.0 {
        return 0;
    }
    let b = bucket_of(Duration::from_nanos(
        (t_us * 1e3).min(u64::MAX as f64) as u64
    ));
    if bucket_edges_us(b).0 >= t_us {
        b
    } else {
        b + 1
    }
}

/// The bucket holding `t` µs (values in it may be above `t`).
fn bucket_holding(t_us: f64) -> usize {
    if t_us <= 0.0 || t_us.is_nan() {
        return 0;
    }
    if !t_us.is_finite() {
        return BUCKETS;
    }
    bucket_of(Duration::from_nanos(
        (t_us * 1e3).min(u64::MAX as f64) as u64
    ))
}

/// Whether the arm's p99 is shown above `shift` of the baseline's p99.
///
/// For the baseline's true p99 `t`, the share of the baseline's latencies above `t` is 1%, and
/// under "the arm's p99 is at most shift(t)" the share of the arm's above `shift(t)` is at
/// most 1%: the product of the arm's evidence against "at most 1% above shift(t)" and the
/// baseline's against "at least 1% above t" is a supermartingale. `t` is unknown, so the
/// test takes the smallest product over every `t`, bucket by bucket, counting each bucket's
/// latencies the way that weakens the evidence (so bucketing never helps a verdict).
fn p99_shown_above(arm: &Sample, base: &Sample, shift: Shift, tests: &Tests) -> bool {
    let limit = -tests.latency_test_alpha.ln();
    p99_evidence_above(arm, base, shift, tests, limit) >= limit
}

/// The smallest ln evidence over the baseline's p99 for [`p99_shown_above`]; it stops once the
/// evidence falls below `stop` (the test is then decided).
fn p99_evidence_above(arm: &Sample, base: &Sample, shift: Shift, tests: &Tests, stop: f64) -> f64 {
    if arm.latency_n == 0 {
        return 0.0;
    }
    let (sa, sb) = (suffix(&arm.latency), suffix(&base.latency));
    let share = 1.0 - P99;
    // t in bucket i: at least k_arm arm latencies are above shift(t) (those from the first
    // bucket wholly above shift(bucket's top)), at most k_base baseline ones above t (bucket
    // i and up).
    let counts = |i: usize| {
        let top = bucket_edges_us(i).1;
        (sa[first_bucket_from(shift.apply(top))], sb[i])
    };
    let evidence = |(k_arm, k_base): (u64, u64)| {
        tests
            .latency
            .0
            .ln_evidence_above(k_arm, arm.latency_n, share)
            + tests
                .latency_base
                .ln_evidence_below(k_base, base.latency_n, share)
    };
    least_over_buckets(base, counts, evidence, stop)
}

/// Whether the arm's p99 is shown below `shift` of the baseline's p99: the same test the
/// other way (the arm's evidence against "at least 1% above shift(t)", the baseline's against
/// "at most 1% above t"), counting buckets the other way.
fn p99_shown_below(arm: &Sample, base: &Sample, shift: Shift, tests: &Tests) -> bool {
    let limit = -tests.latency_test_alpha.ln();
    p99_evidence_below(arm, base, shift, tests, limit) >= limit
}

/// The smallest ln evidence over the baseline's p99 for [`p99_shown_below`]; it stops once the
/// evidence falls below `stop` (the test is then decided).
fn p99_evidence_below(arm: &Sample, base: &Sample, shift: Shift, tests: &Tests, stop: f64) -> f64 {
    if arm.latency_n == 0 || base.latency_n == 0 {
        return 0.0;
    }
    let (sa, sb) = (suffix(&arm.latency), suffix(&base.latency));
    let share = 1.0 - P99;
    // t in bucket i: at most k_arm arm latencies are above shift(t) (from the bucket holding
    // shift(bottom) up), at least k_base baseline ones above t (above bucket i).
    let counts = |i: usize| {
        let bottom = bucket_edges_us(i).0;
        (
            sa[bucket_holding(shift.apply(bottom)).min(BUCKETS)],
            sb[i + 1],
        )
    };
    let evidence = |(k_arm, k_base): (u64, u64)| {
        tests
            .latency
            .1
            .ln_evidence_below(k_arm, arm.latency_n, share)
            + tests
                .latency_base
                .ln_evidence_above(k_base, base.latency_n, share)
    };
    least_over_buckets(base, counts, evidence, stop)
}

/// The smallest `evidence(counts(i))` over every bucket `i` of the baseline's p99, stopping
/// once it falls below `stop`. The bucket of the baseline's own p99 goes first: the test is
/// most often refuted there.
fn least_over_buckets(
    base: &Sample,
    counts: impl Fn(usize) -> (u64, u64),
    evidence: impl Fn((u64, u64)) -> f64,
    stop: f64,
) -> f64 {
    let guess = kth_largest(&base.latency[..], (base.latency_n / 100).max(1)).unwrap_or(0);
    let mut least = evidence(counts(guess));
    if least < stop {
        return least;
    }
    let mut last = None;
    for i in 0..BUCKETS {
        let c = counts(i);
        if last == Some(c) {
            continue;
        }
        last = Some(c);
        least = least.min(evidence(c));
        if least < stop {
            return least;
        }
    }
    least
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits::default()
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn verdict_of(r: &Report, m: Metric) -> Verdict {
        r.metrics
            .iter()
            .find(|x| x.metric == m)
            .map(|x| x.verdict)
            .expect("metric present")
    }

    /// Feeds `n` outcomes to one side, every `every`-th an error (0: none).
    fn feed(c: &mut Comparison, arm: bool, n: u64, every: u64, latency: Duration) {
        for i in 1..=n {
            let error = every > 0 && i % every == 0;
            if arm {
                c.record_arm(error, latency);
            } else {
                c.record_baseline(error, latency);
            }
        }
    }

    #[test]
    fn a_canary_failing_everything_fails_at_min_requests() {
        let mut c = Comparison::new();
        feed(&mut c, false, 500, 0, ms(5));
        feed(&mut c, true, 4, 1, ms(5));
        let r = c.report(&limits());
        assert_eq!(r.verdict, Verdict::Inconclusive, "4 < min_requests");
        assert!(r.below_min_requests);
        feed(&mut c, true, 1, 1, ms(5));
        let r = c.report(&limits());
        assert_eq!(r.verdict, Verdict::Fail);
        let f = r.failure().expect("a failing metric");
        assert_eq!(f.metric, Metric::ErrorRate);
        assert!((f.threshold - 400f64.ln()).abs() < 1e-9, "ln(1/0.0025)");
        let stat = f.checks[0].ln_evidence_exceeds;
        assert!((stat - 7.6005).abs() < 1e-4, "{stat}");
        assert!(f.checks[0].ln_evidence_within < 0.0);
        // ln of the mixture's sum over its alternatives r of w (1 + 9r)^5, worked out by hand
        // (Python, the same weights): 7.6005.
        let line = c.explain(f.metric, &limits());
        assert_eq!(
            line,
            "error_rate: arm 5 errors in 5 requests (100.00%); error_rate above max_error_rate \
             10%: ln evidence 7.60 >= threshold 5.99 = ln(1/0.0025); shown at 99.75% confidence \
             (anytime-valid)"
        );
    }

    #[test]
    fn an_identical_canary_passes_with_enough_traffic() {
        let mut c = Comparison::new();
        feed(&mut c, false, 90_000, 100, ms(5));
        feed(&mut c, true, 10_000, 100, ms(5));
        let r = c.report(&limits());
        assert_eq!(verdict_of(&r, Metric::ErrorRate), Verdict::Pass);
        assert_eq!(verdict_of(&r, Metric::ErrorRateIncrease), Verdict::Pass);
        assert_eq!(r.verdict, Verdict::Pass);
        let d = &r.metrics[1].checks[0];
        assert!(d.low < 0.0 && d.high > 0.0 && d.high <= 0.02, "{d:?}");
        assert!(d.estimate.abs() < 1e-12);
    }

    #[test]
    fn a_canary_above_the_margin_fails_on_the_increase_not_the_ceiling() {
        let mut c = Comparison::new();
        // baseline 1%, canary 8%: under the 10% ceiling, 7 points above the baseline.
        feed(&mut c, false, 20_000, 100, ms(5));
        for i in 0..2_000u64 {
            c.record_arm(i % 25 < 2, ms(5));
        }
        let r = c.report(&limits());
        assert_eq!(verdict_of(&r, Metric::ErrorRateIncrease), Verdict::Fail);
        assert_ne!(verdict_of(&r, Metric::ErrorRate), Verdict::Fail);
        assert_eq!(
            r.failure().map(|m| m.metric),
            Some(Metric::ErrorRateIncrease)
        );
    }

    #[test]
    fn a_quiet_baseline_never_makes_a_canary_fail_the_increase() {
        let mut c = Comparison::new();
        feed(&mut c, false, 3, 0, ms(5));
        feed(&mut c, true, 200, 20, ms(5)); // 5%
        let r = c.report(&limits());
        assert_ne!(verdict_of(&r, Metric::ErrorRateIncrease), Verdict::Fail);
    }

    #[test]
    fn latency_fails_when_the_canary_p99_is_shown_above_the_ratio() {
        let lim = Limits {
            max_p99_ratio: Some(1.5),
            max_p99_increase: Some(ms(50)),
            ..limits()
        };
        let spread = |c: &mut Comparison, arm: bool, n: u64, scale: u64| {
            for i in 0..n {
                // 1..100 ms, evenly: p99 is 99 ms times `scale`.
                let d = Duration::from_micros((i % 100 + 1) * 1000 * scale);
                if arm {
                    c.record_arm(false, d);
                } else {
                    c.record_baseline(false, d);
                }
            }
        };
        let mut same = Comparison::new();
        spread(&mut same, false, 20_000, 1);
        spread(&mut same, true, 2_000, 1);
        let r = same.report(&lim);
        assert_ne!(verdict_of(&r, Metric::Latency), Verdict::Fail);
        let (lo, hi) = r.arm.p99_interval_ms.expect("an interval");
        assert!(lo <= 99.0 && 99.0 <= hi, "[{lo}, {hi}]");

        let mut slow = Comparison::new();
        spread(&mut slow, false, 20_000, 1);
        spread(&mut slow, true, 2_000, 3);
        let r = slow.report(&lim);
        assert_eq!(verdict_of(&r, Metric::Latency), Verdict::Fail);
        assert_eq!(r.metrics[2].checks.len(), 2);
        // The budget of 1%: half to latency (0.5%), half to the error metrics, of which the
        // increase has three quarters (0.375%) and the ceiling the rest (0.125%). Latency's
        // half is split again between its two limits (0.25% each).
        let levels: Vec<f64> = r.metrics.iter().map(|m| m.level).collect();
        for (got, want) in levels.iter().zip([0.99875, 0.99625, 0.9975]) {
            assert!((got - want).abs() < 1e-12, "{levels:?}");
        }
        assert_eq!(slow.fails(&lim), Some(Metric::Latency));
        let line = slow.explain(Metric::Latency, &lim);
        assert!(
            line.starts_with("latency: arm p99 30") && line.contains("baseline p99 10"),
            "{line}"
        );
        assert!(
            line.contains(
                "p99_ratio above max_p99_ratio 1.500x and p99_increase above \
                 max_p99_increase 50.0ms: ln evidence, at every baseline p99, >= threshold \
                 5.99 = ln(1/0.0025); shown at 99.75% confidence"
            ),
            "{line}"
        );
    }

    #[test]
    fn errors_are_kept_out_of_the_latency_sample() {
        let lim = Limits {
            max_p99_ratio: Some(1.5),
            ..limits()
        };
        let mut c = Comparison::new();
        feed(&mut c, true, 100, 0, ms(5));
        feed(&mut c, true, 100, 1, ms(60_000));
        let r = c.report(&lim);
        assert_eq!((r.arm.requests, r.arm.errors), (200, 100));
        let p99 = r.arm.p99_ms.expect("p99");
        assert!(p99 < 6.0, "{p99}");
    }
}
