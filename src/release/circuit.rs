//! The rollback circuit: per-arm sliding windows fed by request outcomes, and the trip rule.
//!
//! The proxy sends one [`Outcome`] per finished request with `try_send` on a bounded channel
//! ([`super::outcome`]):
//! it never waits. A single task owns the updates and checks the trip rule for
//! every arm that finished a request, so a spike is caught within a few requests. `/status`
//! reads the windows under a short lock the data path never takes.
//!
//! The task takes outcomes in batches. It watches every arm but the baseline: an error of a
//! watched arm wakes it at once, and so does every `WAKE_AFTER`th outcome of one, so a
//! canary is checked within a few of its requests (see [`super::outcome::WAKE_AFTER`]). Everything else (the baseline's outcomes)
//! waits for the next batch, taken at least every [`COALESCE`] while outcomes come. The
//! task's one timer is re-armed only after it fired: a loaded proxy is not woken by a timer
//! every millisecond, and the wake-ups it does get come from the data path, on the same
//! thread in a single-threaded runtime, without a system call.

use std::collections::{BTreeMap, HashMap};
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::outcome::{Outcome, OutcomeReceiver};
use crate::analysis::window::{Window, WindowStats};
use crate::config::RollbackConfig;
use crate::control::{Control, Snapshot};

/// While outcomes keep coming, the task takes a batch at least this often, so baseline
/// outcomes (which do not wake it) reach the windows within 10 ms. An idle task blocks on the
/// channel and costs nothing.
///
/// The timer that paces this is the reason for the care in [`spawn`]: a short sleep after
/// every batch would, under load, write the runtime's eventfd each time (a timer earlier than
/// the driver's next one wakes the driver) and cap its `epoll_wait` timeout, system calls per
/// request that nginx does not make (`benches/load/wakeups.sh` counts them).
pub const COALESCE: Duration = Duration::from_millis(10);
/// The most outcomes taken in one batch; a full batch is followed by the next at once.
const BATCH: usize = 1024;

/// The windows of every arm.
#[derive(Debug, Default)]
pub struct Windows {
    /// A handful of arms: a list searched by name pointer first (outcomes carry the arm's
    /// own `Arc<str>`) is faster than hashing the name for every outcome.
    inner: Mutex<Vec<(Arc<str>, Window)>>,
}

/// The window of `arm` in `arms`, if it has one.
fn find<'a>(arms: &'a mut [(Arc<str>, Window)], arm: &str) -> Option<&'a mut Window> {
    let i = arms
        .iter()
        .position(|(n, _)| std::ptr::eq(n.as_ptr(), arm.as_ptr()) && n.len() == arm.len())
        .or_else(|| arms.iter().position(|(n, _)| **n == *arm))?;
    Some(&mut arms[i].1)
}

impl Windows {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(Arc<str>, Window)>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stats of every arm that has a window, as of `now`.
    pub fn stats(&self, now: Instant) -> BTreeMap<String, WindowStats> {
        self.lock()
            .iter_mut()
            .map(|(name, w)| (name.to_string(), w.stats(now)))
            .collect()
    }

    /// Records a batch; windows are (re)created when `length` changes.
    pub fn record(&self, batch: &[Outcome], length: Duration) {
        let mut arms = self.lock();
        for o in batch {
            let w = match find(&mut arms, &o.arm) {
                Some(w) => w,
                None => {
                    arms.push((o.arm.clone(), Window::new(length, o.at)));
                    let Some((_, w)) = arms.last_mut() else {
                        continue;
                    };
                    w
                }
            };
            if w.length() != length {
                *w = Window::new(length, o.at);
            }
            w.record(o.at, o.error, o.latency);
        }
    }

    /// Forgets an arm's history (after a reset or a new build).
    pub fn clear(&self, arm: &str) {
        self.lock().retain(|(n, _)| **n != *arm);
    }

    /// One arm's stats; quantiles only when `quantiles` is set.
    pub fn arm_stats(&self, arm: &str, now: Instant, quantiles: bool) -> Option<WindowStats> {
        find(&mut self.lock(), arm).map(|w| {
            if quantiles {
                w.stats(now)
            } else {
                w.counts(now)
            }
        })
    }
}

/// Why an arm trips.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// Metric label: `error_rate`, `error_rate_increase` or `latency`.
    pub reason: &'static str,
    /// The numbers, in words, for the log and the state file.
    pub detail: String,
}

/// The trip rule (window error rate above the ceiling, or above the baseline's by the margin;
/// plus the optional p99 rules), for one arm against the baseline.
///
/// Every rule needs `min_requests` in the arm's window; the rules that compare against the
/// baseline also need `min_requests` in the baseline's window, so a quiet baseline never makes
/// a canary look worse than it is.
pub fn evaluate(cfg: &RollbackConfig, arm: &WindowStats, base: &WindowStats) -> Option<Verdict> {
    if arm.requests < cfg.min_requests {
        return None;
    }
    let numbers = format!(
        "{} errors in {} requests ({:.1}%) over {}",
        arm.errors,
        arm.requests,
        arm.error_rate * 100.0,
        humantime::format_duration(cfg.window)
    );
    if arm.error_rate >= cfg.max_error_rate {
        return Some(Verdict {
            reason: "error_rate",
            detail: format!(
                "{numbers}; max_error_rate is {:.1}%",
                cfg.max_error_rate * 100.0
            ),
        });
    }
    if base.requests < cfg.min_requests {
        return None;
    }
    if arm.error_rate - base.error_rate >= cfg.max_error_rate_increase {
        return Some(Verdict {
            reason: "error_rate_increase",
            detail: format!(
                "{numbers}; baseline {:.1}% of {}; max_error_rate_increase is {:.1} points",
                base.error_rate * 100.0,
                base.requests,
                cfg.max_error_rate_increase * 100.0
            ),
        });
    }
    let (Some(p99), Some(base_p99)) = (arm.p99, base.p99) else {
        return None;
    };
    let latency = |limit: String| Verdict {
        reason: "latency",
        detail: format!(
            "p99 {:.1}ms vs baseline {:.1}ms over {} requests; {limit}",
            p99.as_secs_f64() * 1e3,
            base_p99.as_secs_f64() * 1e3,
            arm.requests
        ),
    };
    if let Some(max) = cfg.max_p99_increase {
        if p99.saturating_sub(base_p99) >= max {
            return Some(latency(format!("max_p99_increase is {max:?}")));
        }
    }
    if let Some(ratio) = cfg.max_p99_ratio {
        if p99.as_secs_f64() >= base_p99.as_secs_f64() * ratio {
            return Some(latency(format!("max_p99_ratio is {ratio}")));
        }
    }
    None
}

/// The window epoch of each arm as last seen, to notice resets and new builds.
#[derive(Default)]
struct Seen {
    generation: u64,
    epochs: HashMap<Arc<str>, u64>,
}

impl Seen {
    /// Clears the window of every arm whose epoch moved: its history belongs to the build or
    /// the episode that was reset, not to what serves now.
    fn sync(&mut self, snap: &Snapshot, windows: &Windows) {
        if snap.generation == self.generation {
            return;
        }
        self.generation = snap.generation;
        for arm in &snap.arms {
            let previous = self.epochs.insert(arm.name.clone(), arm.window_epoch);
            if previous.is_some_and(|e| e != arm.window_epoch) {
                windows.clear(&arm.name);
            }
        }
    }
}

/// Runs the window and trip task until every sender is gone.
pub fn spawn(control: Arc<Control>, windows: Arc<Windows>, rx: OutcomeReceiver) -> JoinHandle<()> {
    let OutcomeReceiver { mut rx, wake } = rx;
    tokio::spawn(async move {
        let mut batch = Vec::with_capacity(BATCH);
        let mut seen = Seen::default();
        // One timer for the whole task, set again only after it fired: a timer left alone
        // costs nothing, while each new earliest timer wakes the runtime's driver with a
        // write to its eventfd.
        let mut timer = pin!(tokio::time::sleep(COALESCE));
        let mut armed = false;
        while rx.recv_many(&mut batch, BATCH).await > 0 {
            let snap = control.snapshot();
            seen.sync(&snap, &windows);
            let cfg = &snap.config.rollback;
            windows.record(&batch, cfg.window);
            if cfg.enabled {
                check(&control, &snap, &windows, &batch);
            }
            let full = batch.len() == BATCH;
            batch.clear();
            if full {
                // Behind: take the next batch at once.
                continue;
            }
            if !armed {
                timer.as_mut().reset(Instant::now() + COALESCE);
                armed = true;
            }
            tokio::select! {
                () = timer.as_mut() => armed = false,
                () = wake.notify.notified() => {}
            }
        }
    })
}

/// Checks every non-baseline, untripped arm that appears in `batch`.
fn check(control: &Control, snap: &Snapshot, windows: &Windows, batch: &[Outcome]) {
    let baseline = &snap.arms[snap.table.baseline()];
    let now = batch.last().map_or_else(Instant::now, |o| o.at);
    let cfg = &snap.config.rollback;
    let quantiles = cfg.max_p99_increase.is_some() || cfg.max_p99_ratio.is_some();
    let mut base: Option<WindowStats> = None;
    for arm in &snap.arms {
        if arm.tripped
            || Arc::ptr_eq(&arm.name, &baseline.name)
            || !batch.iter().any(|o| o.arm == arm.name)
        {
            continue;
        }
        let Some(stats) = windows.arm_stats(&arm.name, now, quantiles) else {
            continue;
        };
        let base = *base.get_or_insert_with(|| {
            windows
                .arm_stats(&baseline.name, now, quantiles)
                .unwrap_or(EMPTY)
        });
        if let Some(v) = evaluate(&snap.config.rollback, &stats, &base) {
            control.trip(&arm.name, v.reason, v.detail);
        }
    }
}

const EMPTY: WindowStats = WindowStats {
    requests: 0,
    errors: 0,
    error_rate: 0.0,
    p50: None,
    p99: None,
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::release::outcome::{channel, WAKE_AFTER};

    fn config(extra: &str) -> Config {
        let text = format!(
            r#"
[[upstream]]
name = "stable"
url = "http://127.0.0.1:1"
weight = 90
[[upstream]]
name = "canary"
url = "http://127.0.0.1:2"
weight = 10
[rollback]
min_requests = 20
max_error_rate = 0.10
max_error_rate_increase = 0.02
{extra}
"#
        );
        Config::parse(&text).expect("valid")
    }

    fn cfg(extra: &str) -> RollbackConfig {
        config(extra).rollback
    }

    /// Feeds `n` requests, `errors` of them failing, each taking `latency`, 10 ms apart.
    async fn feed(w: &mut Window, n: u64, errors: u64, latency: Duration) -> WindowStats {
        for i in 0..n {
            w.record(Instant::now(), i < errors, latency);
            tokio::time::advance(Duration::from_millis(10)).await;
        }
        w.stats(Instant::now())
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn outcome(arm: &Arc<str>, watched: bool, error: bool) -> Outcome {
        Outcome {
            arm: arm.clone(),
            watched,
            error,
            latency: ms(5),
            at: Instant::now(),
        }
    }

    /// Lets the circuit task run whatever it can without time moving.
    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn batches_wait_for_the_timer_unless_a_watched_arm_wakes_the_task() {
        let control = Control::new(config(""), crate::metrics::Metrics::new()).expect("control");
        let windows = Arc::new(Windows::default());
        let (tx, rx) = channel();
        let task = spawn(control, windows.clone(), rx);
        let stable: Arc<str> = Arc::from("stable");
        let canary: Arc<str> = Arc::from("canary");
        let base = |error| outcome(&stable, false, error);
        let watched = |error| outcome(&canary, true, error);
        // (requests, errors) in an arm's window
        let count = |arm: &str| {
            windows
                .arm_stats(arm, Instant::now(), false)
                .map_or((0, 0), |s| (s.requests, s.errors))
        };

        // An idle task takes the first outcome at once; the next batch waits for the timer.
        tx.try_send(base(false)).expect("queued");
        settle().await;
        assert_eq!(count("stable"), (1, 0));
        tx.try_send(base(false)).expect("queued");
        tokio::time::advance(COALESCE - ms(1)).await;
        settle().await;
        assert_eq!(
            count("stable"),
            (1, 0),
            "a baseline outcome does not wake the task"
        );
        tokio::time::advance(ms(2)).await;
        settle().await;
        assert_eq!(count("stable"), (2, 0), "taken when the timer fires");

        // Every WAKE_AFTER-th outcome of a watched arm wakes it, with what was queued before.
        for _ in 1..WAKE_AFTER {
            tx.try_send(watched(false)).expect("queued");
        }
        tx.try_send(base(false)).expect("queued");
        settle().await;
        assert_eq!(count("canary"), (0, 0), "fewer than WAKE_AFTER wait");
        tx.try_send(watched(false)).expect("queued");
        settle().await;
        assert_eq!(
            (count("stable"), count("canary")),
            ((3, 0), (WAKE_AFTER as u64, 0))
        );

        // An error of a watched arm wakes it at once; an error of the baseline does not.
        tx.try_send(watched(true)).expect("queued");
        settle().await;
        assert_eq!(count("canary"), (WAKE_AFTER as u64 + 1, 1));
        tx.try_send(base(true)).expect("queued");
        settle().await;
        assert_eq!(count("stable"), (3, 0));
        // The timer was set when the previous one fired, and was not moved since.
        tokio::time::advance(COALESCE).await;
        settle().await;
        assert_eq!(count("stable"), (4, 1));
        task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn absolute_rule_waits_for_min_requests() {
        let c = cfg("");
        let mut canary = Window::new(c.window, Instant::now());
        let mut stable = Window::new(c.window, Instant::now());
        let base = feed(&mut stable, 200, 0, ms(5)).await;
        let s = feed(&mut canary, 19, 19, ms(5)).await;
        assert_eq!(evaluate(&c, &s, &base), None, "19 < min_requests");
        let s = feed(&mut canary, 1, 1, ms(5)).await;
        let v = evaluate(&c, &s, &base).expect("20 errors of 20 trips");
        assert_eq!(v.reason, "error_rate");
        assert!(
            v.detail.contains("20 errors in 20 requests"),
            "{}",
            v.detail
        );
    }

    #[tokio::test(start_paused = true)]
    async fn relative_rule_compares_with_the_baseline() {
        let c = cfg("");
        let mut stable = Window::new(c.window, Instant::now());
        let mut canary = Window::new(c.window, Instant::now());
        // Baseline at 5% errors, canary at 5%: as bad as the baseline, no trip.
        let base = feed(&mut stable, 200, 10, ms(5)).await;
        let s = feed(&mut canary, 100, 5, ms(5)).await;
        assert_eq!(evaluate(&c, &s, &base), None);
        // Canary at 8% (< 10% absolute) is 3 points above the baseline: trips.
        let mut canary = Window::new(c.window, Instant::now());
        let s = feed(&mut canary, 100, 8, ms(5)).await;
        let v = evaluate(&c, &s, &base).expect("trips");
        assert_eq!(v.reason, "error_rate_increase");
    }

    #[tokio::test(start_paused = true)]
    async fn relative_rule_needs_a_baseline_sample() {
        let c = cfg("");
        let mut stable = Window::new(c.window, Instant::now());
        let mut canary = Window::new(c.window, Instant::now());
        let base = feed(&mut stable, 5, 0, ms(5)).await;
        let s = feed(&mut canary, 100, 5, ms(5)).await;
        assert_eq!(
            evaluate(&c, &s, &base),
            None,
            "baseline has 5 < 20 requests"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn errors_age_out_of_the_window() {
        let c = cfg("window = \"10s\"");
        let mut stable = Window::new(c.window, Instant::now());
        let mut canary = Window::new(c.window, Instant::now());
        feed(&mut canary, 20, 20, ms(5)).await;
        tokio::time::advance(Duration::from_secs(11)).await;
        let base = feed(&mut stable, 50, 0, ms(5)).await;
        let s = feed(&mut canary, 30, 0, ms(5)).await;
        assert_eq!(s.errors, 0);
        assert_eq!(evaluate(&c, &s, &base), None);
    }

    #[tokio::test(start_paused = true)]
    async fn latency_rules() {
        let c = cfg("max_p99_increase = \"50ms\"");
        let mut stable = Window::new(c.window, Instant::now());
        let base = feed(&mut stable, 100, 0, ms(20)).await;
        let mut canary = Window::new(c.window, Instant::now());
        let s = feed(&mut canary, 100, 0, ms(60)).await;
        assert_eq!(evaluate(&c, &s, &base), None, "40ms slower is within 50ms");
        let mut canary = Window::new(c.window, Instant::now());
        let s = feed(&mut canary, 100, 0, ms(80)).await;
        assert_eq!(evaluate(&c, &s, &base).map(|v| v.reason), Some("latency"));

        let c = cfg("max_p99_ratio = 1.5");
        let mut canary = Window::new(c.window, Instant::now());
        let s = feed(&mut canary, 100, 0, ms(25)).await;
        assert_eq!(evaluate(&c, &s, &base), None, "1.25x is under 1.5x");
        let mut canary = Window::new(c.window, Instant::now());
        let s = feed(&mut canary, 100, 0, ms(40)).await;
        assert_eq!(evaluate(&c, &s, &base).map(|v| v.reason), Some("latency"));
    }
}
