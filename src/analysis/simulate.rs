//! `canaryd simulate`: the analysis run on simulated outcomes, to answer before a release how
//! often a config rolls back a good canary and how fast it catches a bad one.
//!
//! Each run draws requests one by one: the canary takes each with the weight of the current
//! part of the run (a list of weights splits the run into equal parts, to model ramp steps),
//! and every request fails with its arm's error rate and takes a log-normal latency. The
//! analysis is checked as the circuit checks it: after every canary error and every
//! [`WAKE_AFTER`](crate::release::outcome::WAKE_AFTER)th canary outcome. A run ends at its
//! first `fail`. Runs are seeded from the run's number, so a result is the same for a given
//! seed on any machine and with any number of threads.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use statrs::function::beta::inv_beta_reg;
use statrs::function::erf::erfc_inv;

use super::compare::{Comparison, Limits, Metric};

/// How one arm behaves in a simulation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Behaviour {
    /// Share of requests that fail.
    pub error_rate: f64,
    /// Median latency.
    pub median: Duration,
    /// Shape of the log-normal latency (standard deviation of its log); 0 is constant.
    pub sigma: f64,
}

/// What is simulated.
#[derive(Debug, Clone, PartialEq)]
pub struct Scenario {
    /// The analysis' limits (from the config).
    pub limits: Limits,
    /// Requests per run.
    pub requests: u64,
    /// Requests per second (for the time to detection).
    pub rps: f64,
    /// The canary's share of traffic (0..1) in each equal part of the run.
    pub weights: Vec<f64>,
    /// The baseline.
    pub baseline: Behaviour,
    /// The canary.
    pub canary: Behaviour,
    /// The canary is checked after every error and every this many of its outcomes.
    pub check_every: u64,
}

/// When a run tripped the canary.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Detection {
    /// Canary requests up to and including the one after which it tripped.
    pub canary_requests: u64,
    /// Seconds into the run.
    pub seconds: f64,
    /// The metric that failed.
    pub metric: Metric,
}

/// Runs one seeded run; `Some` if the canary tripped.
pub fn run_once(sc: &Scenario, seed: u64) -> Option<Detection> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut c = Comparison::new();
    let latency = sc.limits.max_p99_ratio.is_some() || sc.limits.max_p99_increase.is_some();
    let parts = sc.weights.len().max(1) as u64;
    let mut canary_n = 0u64;
    for i in 0..sc.requests {
        let part = (i * parts / sc.requests.max(1)) as usize;
        let weight = sc.weights.get(part).copied().unwrap_or(0.0);
        let to_canary = rng.f64() < weight;
        let arm = if to_canary { &sc.canary } else { &sc.baseline };
        let error = rng.f64() < arm.error_rate;
        let took = if latency {
            sample_latency(&mut rng, arm)
        } else {
            arm.median
        };
        if !to_canary {
            c.record_baseline(error, took);
            continue;
        }
        c.record_arm(error, took);
        canary_n += 1;
        if !error && canary_n % sc.check_every.max(1) != 0 {
            continue;
        }
        if let Some(metric) = c.fails(&sc.limits) {
            return Some(Detection {
                canary_requests: canary_n,
                seconds: (i + 1) as f64 / sc.rps,
                metric,
            });
        }
    }
    None
}

/// A log-normal latency with the arm's median and shape.
fn sample_latency(rng: &mut fastrand::Rng, arm: &Behaviour) -> Duration {
    if arm.sigma == 0.0 {
        return arm.median;
    }
    // Standard normal by inversion; u in (0, 1).
    let u = (rng.f64() + f64::EPSILON).min(1.0 - f64::EPSILON);
    let z = -std::f64::consts::SQRT_2 * erfc_inv(2.0 * u);
    arm.median.mul_f64((arm.sigma * z).exp().min(1e6))
}

/// The results of many runs of one scenario.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Runs made.
    pub runs: u64,
    /// Detections, by run number (`None`: never tripped).
    pub detections: Vec<Option<Detection>>,
}

impl Summary {
    /// Runs that tripped.
    pub fn tripped(&self) -> u64 {
        self.detections.iter().filter(|d| d.is_some()).count() as u64
    }

    /// The `q` quantile (nearest rank) of canary requests to detection, over runs that
    /// tripped.
    pub fn canary_requests(&self, q: f64) -> Option<u64> {
        let mut v: Vec<u64> = self
            .detections
            .iter()
            .flatten()
            .map(|d| d.canary_requests)
            .collect();
        v.sort_unstable();
        nearest_rank(&v, q).copied()
    }

    /// The `q` quantile (nearest rank) of seconds to detection, over runs that tripped.
    pub fn seconds(&self, q: f64) -> Option<f64> {
        let mut v: Vec<f64> = self
            .detections
            .iter()
            .flatten()
            .map(|d| d.seconds)
            .collect();
        v.sort_unstable_by(f64::total_cmp);
        nearest_rank(&v, q).copied()
    }

    /// How many runs each metric tripped.
    pub fn by_metric(&self) -> Vec<(Metric, u64)> {
        [
            Metric::ErrorRate,
            Metric::ErrorRateIncrease,
            Metric::Latency,
        ]
        .into_iter()
        .map(|m| {
            let n = self
                .detections
                .iter()
                .flatten()
                .filter(|d| d.metric == m)
                .count();
            (m, n as u64)
        })
        .filter(|(_, n)| *n > 0)
        .collect()
    }
}

fn nearest_rank<T>(sorted: &[T], q: f64) -> Option<&T> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted.get(rank - 1)
}

/// The seed of run `run` of a simulation seeded `seed` (SplitMix64: neighbouring runs get
/// unrelated streams).
pub fn run_seed(seed: u64, run: u64) -> u64 {
    let mut z = seed.wrapping_add(run.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Runs `runs` seeded runs on `threads` threads; `done` counts finished runs as they finish
/// (for a progress bar). The result does not depend on `threads`.
pub fn run_many(sc: &Scenario, runs: u64, seed: u64, threads: usize, done: &AtomicU64) -> Summary {
    let threads = threads.clamp(1, 64) as u64;
    let mut detections = vec![None; runs as usize];
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let mut mine = Vec::new();
                    let mut run = t;
                    while run < runs {
                        mine.push((run, run_once(sc, run_seed(seed, run))));
                        done.fetch_add(1, Ordering::Relaxed);
                        run += threads;
                    }
                    mine
                })
            })
            .collect();
        for h in handles {
            if let Ok(mine) = h.join() {
                for (run, d) in mine {
                    detections[run as usize] = d;
                }
            }
        }
    });
    Summary { runs, detections }
}

/// The Clopper-Pearson interval for a share of `x` in `n` at level `level` (e.g. 0.95).
pub fn binomial_interval(x: u64, n: u64, level: f64) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let a = (1.0 - level) / 2.0;
    let (xf, nf) = (x as f64, n as f64);
    let lo = if x == 0 {
        0.0
    } else {
        inv_beta_reg(xf, nf - xf + 1.0, a)
    };
    let hi = if x == n {
        1.0
    } else {
        inv_beta_reg(xf + 1.0, nf - xf, 1.0 - a)
    };
    (lo, hi)
}

/// What `canaryd simulate` prints: the identical canary's false rollbacks and, when a
/// regression was given, how fast it was caught.
pub struct Report<'a> {
    /// The identical-canary scenario.
    pub identical: &'a Scenario,
    /// Its results.
    pub aa: &'a Summary,
    /// The regression scenario and its results, if one was given.
    pub regression: Option<(&'a Scenario, &'a Summary)>,
}

fn pct(x: f64) -> String {
    format!("{:.2}%", x * 100.0)
}

fn ms(d: Duration) -> String {
    format!("{}ms", (d.as_secs_f64() * 1e4).round() / 10.0)
}

impl Report<'_> {
    /// The human-readable report.
    pub fn text(&self) -> String {
        let sc = self.identical;
        let l = &sc.limits;
        let weights: Vec<String> = sc
            .weights
            .iter()
            .map(|w| format!("{}%", w * 100.0))
            .collect();
        let mut out = format!(
            "canaryd simulate: {} runs per scenario, {} requests each ({} rps for {:.0}s); \
             canary weight {}{}\n",
            self.aa.runs,
            sc.requests,
            sc.rps,
            sc.requests as f64 / sc.rps,
            weights.join(" then "),
            if weights.len() > 1 {
                " (equal parts of each run)"
            } else {
                ""
            },
        );
        out += &format!(
            "analysis: confidence {}, max_error_rate_increase {}, max_error_rate {}, min_requests {}",
            l.confidence, l.max_error_rate_increase, l.max_error_rate, l.min_requests
        );
        if let Some(r) = l.max_p99_ratio {
            out += &format!(", max_p99_ratio {r}");
        }
        if let Some(d) = l.max_p99_increase {
            out += &format!(", max_p99_increase {}", ms(d));
        }
        out += "\n\n";
        let (x, n) = (self.aa.tripped(), self.aa.runs);
        let (lo, hi) = binomial_interval(x, n, 0.95);
        out += &format!(
            "identical canary ({} errors, median latency {} on both arms):\n  rolled back in {x} \
             of {n} runs: {} (95% interval {} to {}); the config allows at most {}\n",
            pct(sc.baseline.error_rate),
            ms(sc.baseline.median),
            pct(x as f64 / n as f64),
            pct(lo),
            pct(hi),
            pct(1.0 - l.confidence),
        );
        if let Some((reg, s)) = self.regression {
            let (x, n) = (s.tripped(), s.runs);
            let (lo, hi) = binomial_interval(x, n, 0.95);
            out += &format!(
                "regressed canary (errors {} -> {}, median latency {} -> {}):\n  caught in {x} \
                 of {n} runs: {} (95% interval {} to {})\n",
                pct(reg.baseline.error_rate),
                pct(reg.canary.error_rate),
                ms(reg.baseline.median),
                ms(reg.canary.median),
                pct(x as f64 / n as f64),
                pct(lo),
                pct(hi),
            );
            if x > 0 {
                let q = |q| s.canary_requests(q).unwrap_or(0);
                let t = |q| s.seconds(q).unwrap_or(0.0);
                out += &format!(
                    "  canary requests to detection: median {}, p95 {}, max {}\n  seconds to \
                     detection: median {:.1}, p95 {:.1}, max {:.1}\n  by metric:",
                    q(0.5),
                    q(0.95),
                    q(1.0),
                    t(0.5),
                    t(0.95),
                    t(1.0)
                );
                for (m, k) in s.by_metric() {
                    out += &format!(" {} {k}", m.as_str());
                }
                out += "\n";
            }
        }
        out
    }

    /// The same numbers as one JSON object.
    pub fn json(&self) -> serde_json::Value {
        let summary = |s: &Summary| {
            let (lo, hi) = binomial_interval(s.tripped(), s.runs, 0.95);
            let metrics: serde_json::Map<String, serde_json::Value> = s
                .by_metric()
                .into_iter()
                .map(|(m, n)| (m.as_str().to_owned(), n.into()))
                .collect();
            serde_json::json!({
                "runs": s.runs,
                "tripped": s.tripped(),
                "share": s.tripped() as f64 / s.runs.max(1) as f64,
                "share_interval_95": [lo, hi],
                "canary_requests": {
                    "median": s.canary_requests(0.5),
                    "p95": s.canary_requests(0.95),
                    "max": s.canary_requests(1.0),
                },
                "seconds": {
                    "median": s.seconds(0.5),
                    "p95": s.seconds(0.95),
                    "max": s.seconds(1.0),
                },
                "by_metric": metrics,
            })
        };
        let sc = self.identical;
        serde_json::json!({
            "requests_per_run": sc.requests,
            "rps": sc.rps,
            "weights_percent": sc.weights.iter().map(|w| w * 100.0).collect::<Vec<_>>(),
            "confidence": sc.limits.confidence,
            "baseline_error": sc.baseline.error_rate,
            "identical": summary(self.aa),
            "regression": self.regression.map(|(reg, s)| {
                let mut v = summary(s);
                v["canary_error"] = reg.canary.error_rate.into();
                v["canary_median_latency_ms"] = (reg.canary.median.as_secs_f64() * 1e3).into();
                v
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn limits() -> Limits {
        Limits::default()
    }

    fn arm(error_rate: f64) -> Behaviour {
        Behaviour {
            error_rate,
            median: Duration::from_millis(20),
            sigma: 0.5,
        }
    }

    fn scenario(weights: Vec<f64>, base: f64, canary: f64, requests: u64) -> Scenario {
        Scenario {
            limits: limits(),
            requests,
            rps: 1000.0,
            weights,
            baseline: arm(base),
            canary: arm(canary),
            check_every: 4,
        }
    }

    #[test]
    fn clopper_pearson_matches_its_closed_forms() {
        // x = 0: the upper end is 1 - (a/2)^(1/n).
        let (lo, hi) = binomial_interval(0, 2000, 0.95);
        assert_eq!(lo, 0.0);
        assert!(
            (hi - (1.0 - 0.025f64.powf(1.0 / 2000.0))).abs() < 1e-9,
            "{hi}"
        );
        // x = n: the lower end is (a/2)^(1/n).
        let (lo, hi) = binomial_interval(10, 10, 0.95);
        assert!((lo - 0.025f64.powf(0.1)).abs() < 1e-9, "{lo}");
        assert_eq!(hi, 1.0);
        let (lo, hi) = binomial_interval(20, 2000, 0.95);
        assert!(lo < 0.01 && 0.01 < hi);
    }

    #[test]
    fn a_canary_failing_everything_trips_within_ten_requests_every_time() {
        let sc = scenario(vec![0.10], 0.0, 1.0, 20_000);
        let s = run_many(&sc, 200, 7, 2, &AtomicU64::new(0));
        assert_eq!(s.tripped(), 200);
        assert!(
            s.canary_requests(1.0).is_some_and(|n| n <= 10),
            "{:?}",
            s.canary_requests(1.0)
        );
    }

    /// The false-rollback guarantee by simulation: 300 seeded A/A runs at a 2% error rate
    /// on both arms, checked as the circuit checks, with a ramp 10% -> 50% mid-run. A correct
    /// analysis trips in at most 1% of runs in expectation; 9 of 300 (3%) would be a
    /// failure of the method, not luck (binomial tail below 1e-3).
    #[test]
    fn identical_arms_rarely_trip_under_continuous_monitoring_and_a_ramp() {
        let sc = scenario(vec![0.10, 0.50], 0.02, 0.02, 20_000);
        let s = run_many(&sc, 300, 19, 2, &AtomicU64::new(0));
        assert!(s.tripped() < 9, "{} of 300 A/A runs tripped", s.tripped());
    }

    #[test]
    fn results_do_not_depend_on_threads() {
        let sc = scenario(vec![0.10], 0.01, 0.05, 10_000);
        let one = run_many(&sc, 40, 3, 1, &AtomicU64::new(0));
        let two = run_many(&sc, 40, 3, 2, &AtomicU64::new(0));
        assert_eq!(one, two);
        assert!(one.tripped() > 0);
    }
}
