//! The rollback circuit: the analysis of every non-baseline arm against the baseline, fed by
//! request outcomes, and the trip on a `fail` verdict.
//!
//! The proxy sends one [`Outcome`] per finished request with `try_send` on a bounded channel
//! ([`super::outcome`]): it never waits. A single task owns the updates: every outcome goes
//! into the arm's [`Comparison`] (and a baseline outcome into every arm's, so each arm is
//! compared with the baseline over the same period) and into the recent window `/status`
//! shows. After each batch the task re-judges every arm that finished a request and trips the
//! arm whose analysis fails. `/status` reads the same state under a short lock the data path
//! never takes.
//!
//! The task takes outcomes in batches. It watches every arm but the baseline: an error of a
//! watched arm wakes it at once, and so does every `WAKE_AFTER`th outcome of one, so an arm is
//! re-judged within a few of its requests (see [`super::outcome::WAKE_AFTER`]). Everything
//! else (the baseline's outcomes) waits for the next batch, taken at least every [`COALESCE`]
//! while outcomes come. The task's one timer is re-armed only after it fired: a loaded proxy
//! is not woken by a timer every millisecond, and the wake-ups it does get come from the data
//! path, on the same thread in a single-threaded runtime, without a system call.

use std::collections::{BTreeMap, HashMap};
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::outcome::{Outcome, OutcomeReceiver, Routed};
use crate::analysis::compare::{Comparison, Limits, Metric, Report, Verdict};
use crate::analysis::srm::{self, Srm};
use crate::analysis::window::{Window, WindowStats};
use crate::control::{Control, Snapshot, Weights};
use crate::metrics::Metrics;
use crate::preview::RecentUsers;

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

/// What the circuit task keeps, and `/status` reads: the recent window of every arm and the
/// analysis of every non-baseline arm against the baseline.
#[derive(Debug, Default)]
pub struct Ledger {
    /// Recent numbers per arm, over `[rollback] window`.
    pub windows: Windows,
    analyses: Mutex<Analyses>,
    guard: Mutex<Guard>,
}

/// What the split's outcomes feed besides the analysis: the sample-ratio guard and the
/// recently seen users of the preview.
#[derive(Debug, Default)]
struct Guard {
    srm: Srm,
    recent: RecentUsers,
    /// The table last looked up: its generation and, per arm, its guard index and weight.
    table: Option<(u64, srm::Table)>,
    /// Seconds of routing are counted from here.
    origin: Option<Instant>,
    /// Arms whose mismatch has been logged (once per episode).
    warned: Vec<Arc<str>>,
    exported_at: Option<Instant>,
    /// The salt the recent users' buckets were computed with.
    salt: Option<String>,
}

impl Guard {
    fn lock(m: &Mutex<Guard>) -> std::sync::MutexGuard<'_, Guard> {
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts one outcome routed at `routed` by the weights of `generation`.
    fn record(
        &mut self,
        arm: &Arc<str>,
        (generation, bucket, user): (u64, u16, Option<u64>),
        routed: Instant,
        weights_at: &dyn Fn(u64) -> Option<Weights>,
    ) {
        if let Some(u) = user {
            self.recent.insert(u, bucket);
        }
        if self.table.as_ref().is_none_or(|(g, _)| *g != generation) {
            // A table older than the history cannot be judged; its outcomes are not counted.
            let Some(weights) = weights_at(generation) else {
                self.table = None;
                return;
            };
            let mapped: srm::Table = weights
                .iter()
                .map(|(name, w)| (self.srm.arm_index(name), *w))
                .collect();
            self.table = Some((generation, mapped));
        }
        let Some((_, weights)) = &self.table else {
            return;
        };
        let arms = self.srm.arms();
        // The outcome's name is the snapshot's own: a pointer comparison finds it.
        let Some(&(served, _)) = weights
            .iter()
            .find(|&&(i, _)| Arc::ptr_eq(&arms[i].name, arm))
            .or_else(|| weights.iter().find(|&&(i, _)| *arms[i].name == **arm))
        else {
            return;
        };
        let origin = *self.origin.get_or_insert(routed);
        let second = routed.saturating_duration_since(origin).as_secs();
        self.srm.defer(second, weights, served, user);
    }

    /// Counts the draws routed more than `horizon` ago: by then every request of theirs has
    /// been answered or has timed out.
    fn commit(&mut self, now: Instant, horizon: Duration) {
        if let Some(origin) = self.origin {
            let closed = now
                .saturating_duration_since(origin)
                .saturating_sub(horizon);
            self.srm.commit(closed.as_secs());
        }
    }
}

/// How long after its routing a draw waits to be counted: the request timeout (by which
/// every request has response headers or a 504) and a second for the outcome to arrive.
pub fn srm_horizon(request_timeout: Duration) -> Duration {
    request_timeout + Duration::from_secs(1)
}

/// The comparisons, one per non-baseline arm.
#[derive(Debug, Default)]
struct Analyses {
    /// The baseline they are compared with.
    baseline: Option<Arc<str>>,
    arms: Vec<Entry>,
}

#[derive(Debug)]
struct Entry {
    arm: Arc<str>,
    comparison: Comparison,
    /// The verdicts last exported, per metric (`canaryd_analysis_verdict` is set on change).
    exported: Vec<(Metric, Verdict)>,
    /// When they were last computed (see [`EXPORT_EVERY`]).
    exported_at: Option<Instant>,
    /// The same comparison over the current rollout step only, while a rollout runs.
    step: Option<Comparison>,
}

/// The exported verdicts are recomputed at most this often per arm (and at once on a trip):
/// the per-batch check only asks whether a metric fails, which is cheaper than judging every
/// metric both ways.
pub const EXPORT_EVERY: Duration = Duration::from_secs(1);

impl Entry {
    fn new(arm: Arc<str>) -> Self {
        Entry {
            arm,
            comparison: Comparison::new(),
            exported: Vec::new(),
            exported_at: None,
            step: None,
        }
    }

    /// Judges every metric and exports the verdicts that changed.
    fn export(&mut self, metrics: &Metrics, limits: &Limits, now: Instant) {
        self.exported_at = Some(now);
        for (metric, verdict) in self.comparison.verdicts(limits) {
            let known = self.exported.iter_mut().find(|(m, _)| *m == metric);
            match known {
                Some((_, v)) if *v == verdict => continue,
                Some((_, v)) => *v = verdict,
                None => self.exported.push((metric, verdict)),
            }
            metrics.analysis_verdict(&self.arm, metric.as_str(), verdict.gauge());
        }
    }

    /// Starts the comparison over; exported verdicts go back to inconclusive.
    fn restart(&mut self, metrics: &Metrics) {
        self.comparison = Comparison::new();
        self.exported_at = None;
        if self.step.is_some() {
            self.step = Some(Comparison::new());
        }
        for (m, v) in &mut self.exported {
            *v = Verdict::Inconclusive;
            metrics.analysis_verdict(&self.arm, m.as_str(), Verdict::Inconclusive.gauge());
        }
    }
}

impl Analyses {
    fn lock(m: &Mutex<Analyses>) -> std::sync::MutexGuard<'_, Analyses> {
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn entry(&mut self, arm: &str) -> Option<&mut Entry> {
        let i = self
            .arms
            .iter()
            .position(|e| std::ptr::eq(e.arm.as_ptr(), arm.as_ptr()) && e.arm.len() == arm.len())
            .or_else(|| self.arms.iter().position(|e| *e.arm == *arm))?;
        self.arms.get_mut(i)
    }
}

impl Ledger {
    /// Records a batch: every outcome into its arm's window; an arm's outcome into its
    /// comparison, a baseline outcome into every comparison (pinned users' outcomes into
    /// neither); the split's outcomes into the sample-ratio guard, whose tables come from
    /// `weights_at`.
    pub fn record(
        &self,
        batch: &[Outcome],
        window: Duration,
        weights_at: &dyn Fn(u64) -> Option<Weights>,
    ) {
        self.windows.record(batch, window);
        {
            let mut g = Guard::lock(&self.guard);
            for o in batch {
                if let Routed::Split {
                    generation,
                    bucket,
                    user,
                } = o.routed
                {
                    let routed = o.at.checked_sub(o.latency).unwrap_or(o.at);
                    g.record(&o.arm, (generation, bucket, user), routed, weights_at);
                }
            }
        }
        let mut a = Analyses::lock(&self.analyses);
        let Some(baseline) = a.baseline.clone() else {
            return;
        };
        for o in batch {
            if o.routed == Routed::Pinned {
                continue;
            }
            if *o.arm == *baseline {
                for e in &mut a.arms {
                    e.comparison.record_baseline(o.error, o.latency);
                    if let Some(step) = &mut e.step {
                        step.record_baseline(o.error, o.latency);
                    }
                }
            } else if let Some(e) = a.entry(&o.arm) {
                e.comparison.record_arm(o.error, o.latency);
                if let Some(step) = &mut e.step {
                    step.record_arm(o.error, o.latency);
                }
            }
        }
    }

    /// Makes the comparisons match `snap`'s arms and baseline: one per non-baseline arm; a
    /// new baseline starts every comparison over, and so does `restart` for the arms in it
    /// (a reset or a new build: history that no longer counts).
    fn align(&self, snap: &Snapshot, restart: &[Arc<str>], metrics: &Metrics) {
        let mut a = Analyses::lock(&self.analyses);
        let baseline = snap.arms.get(snap.table.baseline()).map(|b| b.name.clone());
        let new_baseline = a.baseline.as_deref() != baseline.as_deref()
            || baseline
                .as_ref()
                .is_some_and(|b| restart.iter().any(|r| r == b));
        {
            let mut g = Guard::lock(&self.guard);
            let arms_changed = g.srm.arms().len() > snap.arms.len()
                || g.srm
                    .arms()
                    .iter()
                    .any(|t| !snap.arms.iter().any(|a| a.name == t.name));
            if new_baseline || !restart.is_empty() || arms_changed {
                // The split starts over with the new build (or the new set of arms): the
                // guard counts what serves now.
                g.srm = Srm::new();
                g.table = None;
                g.origin = None;
                g.warned.clear();
                g.exported_at = None;
            }
            let salt = &snap.config.routing.salt;
            if g.salt.as_ref() != Some(salt) {
                g.recent.clear();
                g.salt = Some(salt.clone());
            }
        }
        a.baseline = baseline.clone();
        a.arms.retain(|e| {
            snap.arms.iter().any(|arm| arm.name == e.arm) && Some(&e.arm) != baseline.as_ref()
        });
        for arm in &snap.arms {
            if Some(&arm.name) == baseline.as_ref() {
                continue;
            }
            match a.entry(&arm.name) {
                Some(e) => {
                    if new_baseline || restart.contains(&arm.name) {
                        e.restart(metrics);
                    }
                }
                None => a.arms.push(Entry::new(arm.name.clone())),
            }
        }
    }

    /// The sample-ratio guard's figures for every arm it has seen: by requests, by users;
    /// over the requests routed more than [`srm_horizon`] of `request_timeout` ago.
    pub fn srm(&self, request_timeout: Duration) -> Vec<(Arc<str>, srm::Figures, srm::Figures)> {
        let mut g = Guard::lock(&self.guard);
        g.commit(Instant::now(), srm_horizon(request_timeout));
        g.srm
            .arms()
            .iter()
            .map(|a| (a.name.clone(), a.requests.figures(), a.users.figures()))
            .collect()
    }

    /// The sample-ratio mismatch of `arm` with its numbers, if the guard shows one.
    pub fn srm_mismatch(&self, arm: &str, request_timeout: Duration) -> Option<String> {
        let mut g = Guard::lock(&self.guard);
        g.commit(Instant::now(), srm_horizon(request_timeout));
        g.srm.arm(arm).and_then(srm::mismatch)
    }

    /// The buckets of the recently seen distinct sticky users (see [`crate::preview`]).
    pub fn recent_buckets(&self) -> Vec<u16> {
        Guard::lock(&self.guard).recent.buckets().collect()
    }

    /// Exports the guard's p-values and logs a mismatch once per episode, at most every
    /// [`EXPORT_EVERY`].
    fn export_guard(&self, metrics: &Metrics, now: Instant, horizon: Duration) {
        let mut g = Guard::lock(&self.guard);
        if g.exported_at
            .is_some_and(|at| now.saturating_duration_since(at) < EXPORT_EVERY)
        {
            return;
        }
        g.exported_at = Some(now);
        g.commit(now, horizon);
        let mut flagged = Vec::new();
        for a in g.srm.arms() {
            let (r, u) = (a.requests.figures(), a.users.figures());
            metrics.srm_p_value(&a.name, "requests", r.p_value);
            metrics.srm_p_value(&a.name, "users", u.p_value);
            if let Some(detail) = srm::mismatch(a) {
                flagged.push((a.name.clone(), detail));
            }
        }
        for (name, detail) in &flagged {
            if !g.warned.contains(name) {
                tracing::warn!(upstream = %name, detail = %detail, "sample-ratio mismatch: the arm's share of traffic does not follow its weights; the analysis may be biased and a rollout will not advance");
            }
        }
        g.warned = flagged.into_iter().map(|(n, _)| n).collect();
    }

    /// The analysis of `arm` as it stands, if it is a non-baseline arm. The intervals take
    /// milliseconds to find: they are found on a copy, without holding up the circuit.
    pub fn report(&self, arm: &str, limits: &Limits) -> Option<Report> {
        let comparison = {
            let mut a = Analyses::lock(&self.analyses);
            a.entry(arm)?.comparison.clone()
        };
        Some(comparison.report(limits))
    }

    /// Starts a comparison of `arm` over a rollout step (replacing the last step's), or stops
    /// keeping one (`start = false`).
    pub fn step(&self, arm: &str, start: bool) {
        let mut a = Analyses::lock(&self.analyses);
        if a.entry(arm).is_none() && start {
            // Before the arm's first outcome: the comparison starts here (the next alignment
            // with a snapshot keeps it if the arm is still a non-baseline arm).
            a.arms.push(Entry::new(Arc::from(arm)));
        }
        if let Some(e) = a.entry(arm) {
            e.step = start.then(Comparison::new);
        }
    }

    /// The outcomes of `arm` and of the baseline at the current step, and the step's verdicts.
    pub fn step_status(&self, arm: &str, limits: &Limits) -> Option<StepStatus> {
        let step = {
            let mut a = Analyses::lock(&self.analyses);
            a.entry(arm)?.step.clone()?
        };
        Some(StepStatus {
            arm_requests: step.arm_requests(),
            baseline_requests: step.baseline_requests(),
            verdicts: step.verdicts(limits),
        })
    }

    /// The analysis of `arm` over the current step, with its intervals.
    pub fn step_report(&self, arm: &str, limits: &Limits) -> Option<Report> {
        let step = {
            let mut a = Analyses::lock(&self.analyses);
            a.entry(arm)?.step.clone()?
        };
        Some(step.report(limits))
    }

    /// Whether `arm`'s analysis since its build started fails, with the numbers, whatever
    /// `[rollback] enabled` says (the rollout rolls back on it).
    pub fn failing(&self, arm: &str, limits: &Limits) -> Option<(Metric, String)> {
        let mut a = Analyses::lock(&self.analyses);
        let e = a.entry(arm)?;
        let metric = e.comparison.fails(limits)?;
        Some((metric, e.comparison.explain(metric, limits)))
    }

    /// Judges `arm`: its first failing metric and the numbers behind it, if one fails. The
    /// exported verdicts are refreshed when one fails, or when [`EXPORT_EVERY`] has passed.
    ///
    /// Without `may_trip` (the circuit is off, or the arm is tripped already) only the
    /// exported verdicts are kept fresh.
    fn judge(
        &self,
        arm: &str,
        limits: &Limits,
        metrics: &Metrics,
        now: Instant,
        may_trip: bool,
    ) -> Option<(Metric, String)> {
        let mut a = Analyses::lock(&self.analyses);
        let e = a.entry(arm)?;
        let failing = if may_trip {
            e.comparison.fails(limits)
        } else {
            None
        };
        let due = e
            .exported_at
            .is_none_or(|at| now.saturating_duration_since(at) >= EXPORT_EVERY);
        if failing.is_some() || due {
            e.export(metrics, limits, now);
        }
        failing.map(|metric| (metric, e.comparison.explain(metric, limits)))
    }
}

/// A rollout step's numbers for one arm.
#[derive(Debug, Clone, PartialEq)]
pub struct StepStatus {
    /// Outcomes of the arm at the step.
    pub arm_requests: u64,
    /// Outcomes of the baseline at the step.
    pub baseline_requests: u64,
    /// The step's verdicts per metric.
    pub verdicts: Vec<(Metric, Verdict)>,
}

/// The window epoch of each arm as last seen, to notice resets and new builds.
#[derive(Default)]
struct Seen {
    generation: Option<u64>,
    epochs: HashMap<Arc<str>, u64>,
}

impl Seen {
    /// Clears the window and restarts the comparison of every arm whose epoch moved: its
    /// history belongs to the build or the episode that was reset, not to what serves now.
    fn sync(&mut self, snap: &Snapshot, ledger: &Ledger, metrics: &Metrics) {
        if self.generation == Some(snap.generation) {
            return;
        }
        self.generation = Some(snap.generation);
        let mut restart = Vec::new();
        for arm in &snap.arms {
            let previous = self.epochs.insert(arm.name.clone(), arm.window_epoch);
            if previous.is_some_and(|e| e != arm.window_epoch) {
                ledger.windows.clear(&arm.name);
                restart.push(arm.name.clone());
            }
        }
        ledger.align(snap, &restart, metrics);
    }
}

/// Runs the circuit task until every sender is gone.
pub fn spawn(control: Arc<Control>, ledger: Arc<Ledger>, rx: OutcomeReceiver) -> JoinHandle<()> {
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
            seen.sync(&snap, &ledger, control.metrics());
            ledger.record(&batch, snap.config.rollback.window, &|g| {
                control.weights_at(g)
            });
            check(&control, &snap, &ledger, &batch);
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

/// Judges every non-baseline arm that appears in `batch`; with the circuit enabled, trips
/// the untripped ones whose analysis fails.
fn check(control: &Control, snap: &Snapshot, ledger: &Ledger, batch: &[Outcome]) {
    let baseline = &snap.arms[snap.table.baseline()];
    let cfg = &snap.config.rollback;
    let limits = cfg.limits();
    let now = Instant::now();
    ledger.export_guard(
        control.metrics(),
        now,
        srm_horizon(snap.config.listen.request_timeout),
    );
    for arm in &snap.arms {
        if Arc::ptr_eq(&arm.name, &baseline.name) || !batch.iter().any(|o| o.arm == arm.name) {
            continue;
        }
        let may_trip = cfg.enabled && !arm.tripped;
        if let Some((metric, detail)) =
            ledger.judge(&arm.name, &limits, control.metrics(), now, may_trip)
        {
            control.trip(&arm.name, metric.as_str(), detail);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::release::outcome::{channel, OutcomeSender, WAKE_AFTER};

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
            routed: crate::release::outcome::Routed::Forced,
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
        let ledger = Arc::new(Ledger::default());
        let (tx, rx) = channel();
        let task = spawn(control, ledger.clone(), rx);
        let stable: Arc<str> = Arc::from("stable");
        let canary: Arc<str> = Arc::from("canary");
        let base = |error| outcome(&stable, false, error);
        let watched = |error| outcome(&canary, true, error);
        // (requests, errors) in an arm's window
        let count = |arm: &str| {
            ledger
                .windows
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

    /// Sends `n` outcomes of `arm` (every `every`-th an error; 0: none) and lets the task
    /// take them.
    async fn send(tx: &OutcomeSender, arm: &Arc<str>, watched: bool, n: usize, every: usize) {
        for i in 1..=n {
            let error = every > 0 && i % every == 0;
            tx.try_send(outcome(arm, watched, error)).expect("queued");
            settle().await;
        }
        tokio::time::advance(COALESCE).await;
        settle().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_canary_trips_on_its_analysis_and_a_reset_starts_it_over() {
        let control = Control::new(config(""), crate::metrics::Metrics::new()).expect("control");
        let ledger = Arc::new(Ledger::default());
        let (tx, rx) = channel();
        let task = spawn(control.clone(), ledger.clone(), rx);
        let stable: Arc<str> = Arc::from("stable");
        let canary: Arc<str> = Arc::from("canary");
        let limits = control.snapshot().config.rollback.limits();
        let verdict = || {
            ledger
                .report("canary", &limits)
                .map(|r| (r.verdict, r.arm.requests, r.baseline.requests))
        };

        send(&tx, &stable, false, 300, 0).await;
        // The canary fails everything: tripped once it has min_requests (20 in this config).
        send(&tx, &canary, true, 19, 1).await;
        assert!(control.view().tripped.is_empty(), "19 < min_requests");
        send(&tx, &canary, true, 1, 1).await;
        let view = control.view();
        let trip = view.tripped.get("canary").expect("tripped");
        assert_eq!(trip.reason, "error_rate");
        assert!(
            trip.detail.contains("20 errors in 20 requests"),
            "{}",
            trip.detail
        );
        assert!(
            trip.detail.contains("shown at 99.75% confidence"),
            "{}",
            trip.detail
        );
        assert_eq!(verdict(), Some((Verdict::Fail, 20, 300)));
        assert!(
            ledger.report("stable", &limits).is_none(),
            "the baseline is not judged"
        );
        let metrics = control.metrics().render();
        assert!(
            metrics
                .contains("canaryd_analysis_verdict{upstream=\"canary\",metric=\"error_rate\"} -1"),
            "{metrics}"
        );

        // A reset starts the comparison over, baseline included; the verdicts go back to 0.
        control.reset();
        send(&tx, &stable, false, 1, 0).await;
        assert_eq!(verdict(), Some((Verdict::Inconclusive, 0, 1)));
        let metrics = control.metrics().render();
        assert!(
            metrics
                .contains("canaryd_analysis_verdict{upstream=\"canary\",metric=\"error_rate\"} 0"),
            "{metrics}"
        );
        send(&tx, &canary, true, 30, 0).await;
        assert!(control.view().tripped.is_empty());
        task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn with_the_circuit_disabled_the_analysis_runs_but_nothing_trips() {
        let control = Control::new(config("enabled = false"), crate::metrics::Metrics::new())
            .expect("control");
        let ledger = Arc::new(Ledger::default());
        let (tx, rx) = channel();
        let task = spawn(control.clone(), ledger.clone(), rx);
        let stable: Arc<str> = Arc::from("stable");
        let canary: Arc<str> = Arc::from("canary");
        send(&tx, &stable, false, 100, 0).await;
        send(&tx, &canary, true, 40, 1).await;
        assert!(control.view().tripped.is_empty());
        let limits = control.snapshot().config.rollback.limits();
        let report = ledger.report("canary", &limits).expect("judged");
        assert_eq!(report.verdict, Verdict::Fail);
        task.abort();
    }
}
