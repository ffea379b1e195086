//! The progressive rollout: the released arm's weight stepped up through `[rollout] steps`,
//! each step judged on its own traffic, promotion at the end, rollback on a failed verdict.
//!
//! [`Rollout`] is the state machine, pure: [`Rollout::tick`] takes what the driver observed
//! (time passed, the arm's trip, who set the weights, the step's counts and verdicts, the
//! analysis since the build started) and returns [`Action`]s for the driver to carry out. The
//! rules:
//!
//! - A step passes when the arm has been at it for `min_step_duration` (time paused does not
//!   count), both arms have served `min_requests` there, and every metric of the analysis over
//!   the step alone passes: the arm is shown *not worse* than the limits at the configured
//!   confidence. Each step earns its pass on traffic at its own weight.
//! - A failed verdict rolls back at any moment. That verdict comes from the analysis since the
//!   build started (the one the rollback circuit uses), a single test over the whole release,
//!   so looking at every step does not multiply false rollbacks.
//! - Still inconclusive after `max_step_duration`: `hold` stays and keeps analysing (and passes
//!   the step when the evidence comes), `rollback` rolls back.
//! - Gates (`confirm-rollout` and `pre-rollout` before the first step,
//!   `confirm-traffic-increase` before each step up, `confirm-promotion` before 100%) are asked
//!   by the driver; while one says no the phase is `waiting`.
//! - Anything else that sets the weights (an admin call, a change of the file's weights) pauses
//!   the rollout and says so; `resume` takes the weights back.
//! - A trip of the arm, by the circuit or an admin call, ends the rollout `failed`.
//!
//! [`spawn`] runs the driver: it ticks every [`TICK`], carries the actions out through
//! [`Control`], asks the gates and the `rollback` hook, and writes the rollout into the state
//! file, so a restart resumes at the same step with the time spent at it.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::circuit::{Ledger, StepStatus};
use super::webhook::{Payload, Webhooks};
use crate::analysis::compare::{Metric, Verdict};
use crate::config::{Config, HookEvent, OnInconclusive, RolloutConfig, RolloutStart};
use crate::control::{ChangeError, Control, WeightSource};
use crate::routing::{fmt_percent, BASIS_POINTS};

/// How often the driver looks at the rollout.
pub const TICK: Duration = Duration::from_millis(100);
/// The state file is rewritten at least this often while the time at a step moves (and at
/// once on every other change), so a restart loses at most this much of it.
pub const SAVE_EVERY: Duration = Duration::from_secs(2);

/// Where a rollout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// No rollout has run.
    Idle,
    /// Stepping.
    Progressing,
    /// Stopped by `POST /rollout/pause` or by someone else's weight change.
    Paused,
    /// A gate said no; asked again at an interval.
    Waiting,
    /// Promoted: the arm serves 100%.
    Succeeded,
    /// Rolled back.
    Failed,
}

impl Phase {
    /// `progressing`, ...
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Progressing => "progressing",
            Phase::Paused => "paused",
            Phase::Waiting => "waiting",
            Phase::Succeeded => "succeeded",
            Phase::Failed => "failed",
        }
    }

    /// Progressing, paused or waiting.
    pub fn running(self) -> bool {
        matches!(self, Phase::Progressing | Phase::Paused | Phase::Waiting)
    }
}

/// What a gate is asked to allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pending {
    /// The first step.
    FirstStep,
    /// The next step.
    StepUp,
    /// 100%.
    Promotion,
}

impl Pending {
    /// The gates asked, in order; all must allow it.
    pub fn gates(self) -> &'static [HookEvent] {
        match self {
            Pending::FirstStep => &[HookEvent::ConfirmRollout, HookEvent::PreRollout],
            Pending::StepUp => &[HookEvent::ConfirmTrafficIncrease],
            Pending::Promotion => &[HookEvent::ConfirmPromotion],
        }
    }
}

/// One step as it went.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// From 1.
    pub step: usize,
    /// Percent.
    pub weight: f64,
    /// Unix ms.
    pub started_at_ms: u64,
    /// Unix ms, when it ended.
    pub ended_at_ms: Option<u64>,
    /// `passed`, `rolled back`, `aborted`, `superseded`, or none while it runs.
    pub outcome: Option<String>,
    /// The numbers at the end.
    pub detail: String,
}

/// A rollout of one arm, as persisted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    /// The arm released.
    pub upstream: String,
    /// Its url when the rollout started (the build released).
    pub url: String,
    /// The weights, basis points.
    pub steps: Vec<u16>,
    /// Where it is.
    pub phase: Phase,
    /// Index into `steps` of the current step; `None` before the first.
    pub step: Option<usize>,
    /// Unix ms.
    pub started_at_ms: u64,
    /// Unix ms, once it ended.
    pub ended_at_ms: Option<u64>,
    /// Time spent progressing at the current step (paused time does not count).
    pub step_elapsed_ms: u64,
    /// Why it is in its phase, in words.
    pub reason: String,
    /// What the gates are asked to allow, while that is open.
    pub pending: Option<Pending>,
    /// Whether `max_step_duration` passed with the step inconclusive and it holds.
    pub holding: bool,
    /// Whether the sample-ratio guard holds the step (a mismatch was shown).
    #[serde(default)]
    pub srm_hold: bool,
    /// Every step so far.
    pub history: Vec<StepRecord>,
}

/// What the driver saw, for one [`Rollout::tick`].
#[derive(Debug, Clone)]
pub struct Observed<'a> {
    /// Unix ms.
    pub now_ms: u64,
    /// Time since the last tick.
    pub elapsed: Duration,
    /// The `[rollout]` section in force.
    pub config: &'a RolloutConfig,
    /// The arm's trip, if tripped: (reason, detail).
    pub tripped: Option<(String, String)>,
    /// Where the weights in force come from.
    pub source: WeightSource,
    /// The arm's weight in that table.
    pub weight_bp: u16,
    /// The arm's url now.
    pub url: String,
    /// The step's counts and verdicts.
    pub step: Option<StepStatus>,
    /// The analysis since the build started fails: (metric, the numbers).
    pub failing: Option<(Metric, String)>,
    /// The sample-ratio guard shows a mismatch of the arm or the baseline: the numbers.
    pub srm: Option<String>,
}

/// What the driver does for the rollout.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Give the arm this weight (basis points); the baseline gets the rest.
    SetWeight(u16),
    /// Start the step's own analysis (or stop keeping one: `false`).
    Step(bool),
    /// Trip the arm (roll back).
    Trip {
        /// `analysis`, `webhook` or `manual`.
        reason: &'static str,
        /// The numbers.
        detail: String,
    },
    /// Send a notification hook.
    Notify(HookEvent, String),
}

/// A refused rollout call; nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RolloutError {
    /// Not possible in the rollout's phase, or with the arm tripped (HTTP 409).
    #[error("{0}")]
    Conflict(String),
    /// No `[rollout]` in the config (HTTP 400).
    #[error("{0}")]
    NotConfigured(String),
}

impl Rollout {
    /// A new rollout of `config.upstream` at `url`, before its first step (the gates of the
    /// first step are asked next).
    pub fn new(
        config: &RolloutConfig,
        url: String,
        now_ms: u64,
        why: &str,
    ) -> (Rollout, Vec<Action>) {
        let r = Rollout {
            upstream: config.upstream.clone(),
            url,
            steps: config.steps.clone(),
            phase: Phase::Progressing,
            step: None,
            started_at_ms: now_ms,
            ended_at_ms: None,
            step_elapsed_ms: 0,
            reason: format!("started ({why})"),
            pending: Some(Pending::FirstStep),
            holding: false,
            srm_hold: false,
            history: Vec::new(),
        };
        let message = format!(
            "rollout of {} started ({why}); steps {}",
            r.upstream,
            r.steps_text()
        );
        (r, vec![Action::Notify(HookEvent::Event, message)])
    }

    /// The current step from 1 (0 before the first).
    pub fn step_number(&self) -> usize {
        self.step.map_or(0, |i| i + 1)
    }

    /// The weight of the current step, basis points (0 before the first).
    pub fn weight_bp(&self) -> u16 {
        self.step
            .and_then(|i| self.steps.get(i).copied())
            .unwrap_or(0)
    }

    fn steps_text(&self) -> String {
        let list: Vec<String> = self
            .steps
            .iter()
            .map(|&s| format!("{}%", fmt_percent(s)))
            .collect();
        list.join(" -> ")
    }

    /// One look at the rollout; see the module doc for the rules.
    pub fn tick(&mut self, o: &Observed<'_>) -> Vec<Action> {
        let mut out = Vec::new();
        if !self.phase.running() {
            return out;
        }
        if let Some((reason, detail)) = &o.tripped {
            self.finish(
                Phase::Failed,
                o.now_ms,
                "rolled back",
                format!("{} was tripped ({reason}): {detail}", self.upstream),
                &mut out,
            );
            return out;
        }
        if let Some((metric, detail)) = &o.failing {
            out.push(Action::Trip {
                reason: "analysis",
                detail: detail.clone(),
            });
            self.finish(
                Phase::Failed,
                o.now_ms,
                "rolled back",
                format!(
                    "rolled back at step {}: the analysis fails on {}: {detail}",
                    self.step_number(),
                    metric.as_str()
                ),
                &mut out,
            );
            return out;
        }
        if self.phase == Phase::Paused {
            return out;
        }
        if self.step.is_some()
            && (o.source != WeightSource::Rollout || o.weight_bp != self.weight_bp())
        {
            let by = match o.source {
                WeightSource::Admin => "the admin API set the weights",
                WeightSource::File => "the config file's weights changed",
                WeightSource::Rollout => "the weights changed",
            };
            self.pause(
                format!("paused: {by}; POST /rollout/resume gives the rollout the weights back"),
                &mut out,
            );
            return out;
        }
        if self.phase == Phase::Waiting || self.pending.is_some() {
            return out;
        }
        let Some(i) = self.step else {
            return out;
        };
        self.step_elapsed_ms = self
            .step_elapsed_ms
            .saturating_add(u64::try_from(o.elapsed.as_millis()).unwrap_or(u64::MAX));
        let at_step = Duration::from_millis(self.step_elapsed_ms);
        let c = o.config;
        let (arm_n, base_n, verdicts) = match &o.step {
            Some(s) => (s.arm_requests, s.baseline_requests, s.verdicts.as_slice()),
            None => (0, 0, &[][..]),
        };
        let minimums =
            at_step >= c.min_step_duration && arm_n >= c.min_requests && base_n >= c.min_requests;
        let passes = !verdicts.is_empty() && verdicts.iter().all(|(_, v)| *v == Verdict::Pass);
        match (&o.srm, self.srm_hold) {
            (Some(detail), false) => {
                self.srm_hold = true;
                self.reason = format!(
                    "step {} holds: sample-ratio mismatch ({detail}); the analysis may be \
                     biased, so the rollout does not advance while it shows",
                    i + 1
                );
                out.push(Action::Notify(HookEvent::Event, self.reason.clone()));
            }
            (None, true) => {
                self.srm_hold = false;
                self.reason = format!("step {}: the sample-ratio mismatch is gone", i + 1);
            }
            _ => {}
        }
        if minimums && passes && !self.srm_hold {
            let detail = format!(
                "passed after {} with {arm_n} requests of {} and {base_n} of the baseline; {}",
                humantime::format_duration(Duration::from_secs(at_step.as_secs())),
                self.upstream,
                verdicts_text(verdicts)
            );
            self.close_step(o.now_ms, "passed", detail);
            self.holding = false;
            let last = i + 1 >= self.steps.len() || self.steps[i + 1] >= BASIS_POINTS;
            self.pending = Some(if last {
                Pending::Promotion
            } else {
                Pending::StepUp
            });
            self.reason = format!("step {} passed", i + 1);
            out.push(Action::Notify(HookEvent::Event, self.reason.clone()));
            return out;
        }
        if self.srm_hold {
            // Held by the guard, not by an inconclusive analysis: `on_inconclusive` does not
            // apply.
            return out;
        }
        if at_step >= c.max_step_duration && !self.holding {
            let why = format!(
                "still inconclusive after {} at step {} ({arm_n} requests of {}, {base_n} of \
                 the baseline; {})",
                humantime::format_duration(c.max_step_duration),
                i + 1,
                self.upstream,
                verdicts_text(verdicts)
            );
            match c.on_inconclusive {
                OnInconclusive::Hold => {
                    self.holding = true;
                    self.reason = format!("{why}; holding (on_inconclusive = \"hold\")");
                    out.push(Action::Notify(HookEvent::Event, self.reason.clone()));
                }
                OnInconclusive::Rollback => {
                    out.push(Action::Trip {
                        reason: "analysis",
                        detail: format!("{why} (on_inconclusive = \"rollback\")"),
                    });
                    self.finish(
                        Phase::Failed,
                        o.now_ms,
                        "rolled back",
                        format!("rolled back: {why} (on_inconclusive = \"rollback\")"),
                        &mut out,
                    );
                }
            }
        }
        out
    }

    /// The gates of `pending` answered: `allowed` moves on, otherwise the phase is `waiting`.
    pub fn gate_answered(
        &mut self,
        allowed: bool,
        refused_by: Option<HookEvent>,
        now_ms: u64,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        let Some(pending) = self.pending else {
            return out;
        };
        if !matches!(self.phase, Phase::Progressing | Phase::Waiting) {
            return out;
        }
        if !allowed {
            if self.phase != Phase::Waiting {
                let gate = refused_by.map_or("a gate", HookEvent::as_str);
                self.phase = Phase::Waiting;
                self.reason = format!(
                    "waiting: the {gate} webhook did not answer 2xx; asked again at an interval"
                );
                out.push(Action::Notify(HookEvent::Event, self.reason.clone()));
            }
            return out;
        }
        self.pending = None;
        self.phase = Phase::Progressing;
        match pending {
            Pending::FirstStep | Pending::StepUp => {
                let next = self.step.map_or(0, |i| i + 1);
                self.enter_step(next, now_ms, &mut out);
            }
            Pending::Promotion => {
                out.push(Action::SetWeight(BASIS_POINTS));
                self.finish(
                    Phase::Succeeded,
                    now_ms,
                    "passed",
                    format!("promoted: {} serves 100%", self.upstream),
                    &mut out,
                );
            }
        }
        out
    }

    fn enter_step(&mut self, i: usize, now_ms: u64, out: &mut Vec<Action>) {
        self.step = Some(i);
        self.step_elapsed_ms = 0;
        let w = self.weight_bp();
        self.history.push(StepRecord {
            step: i + 1,
            weight: f64::from(w) / 100.0,
            started_at_ms: now_ms,
            ended_at_ms: None,
            outcome: None,
            detail: String::new(),
        });
        self.reason = format!(
            "at step {} of {}: {}%",
            i + 1,
            self.steps.len(),
            fmt_percent(w)
        );
        out.push(Action::SetWeight(w));
        out.push(Action::Step(true));
        out.push(Action::Notify(HookEvent::Rollout, self.reason.clone()));
        out.push(Action::Notify(HookEvent::Event, self.reason.clone()));
    }

    fn close_step(&mut self, now_ms: u64, outcome: &str, detail: String) {
        if let Some(rec) = self.history.last_mut().filter(|r| r.ended_at_ms.is_none()) {
            rec.ended_at_ms = Some(now_ms);
            rec.outcome = Some(outcome.to_owned());
            rec.detail = detail;
        }
    }

    fn finish(
        &mut self,
        phase: Phase,
        now_ms: u64,
        step_outcome: &str,
        reason: String,
        out: &mut Vec<Action>,
    ) {
        self.close_step(now_ms, step_outcome, reason.clone());
        self.phase = phase;
        self.pending = None;
        self.ended_at_ms = Some(now_ms);
        self.reason = reason;
        out.push(Action::Step(false));
        out.push(Action::Notify(HookEvent::Event, self.reason.clone()));
        out.push(Action::Notify(HookEvent::PostRollout, self.reason.clone()));
    }

    fn pause(&mut self, reason: String, out: &mut Vec<Action>) {
        self.phase = Phase::Paused;
        self.reason = reason;
        out.push(Action::Notify(HookEvent::Event, self.reason.clone()));
    }

    /// `POST /rollout/pause`.
    pub fn pause_by_admin(&mut self) -> Result<Vec<Action>, RolloutError> {
        match self.phase {
            Phase::Progressing | Phase::Waiting => {
                let mut out = Vec::new();
                self.pause("paused by POST /rollout/pause".into(), &mut out);
                Ok(out)
            }
            other => Err(RolloutError::Conflict(format!(
                "the rollout is {}; only a progressing or waiting rollout can be paused",
                other.as_str()
            ))),
        }
    }

    /// `POST /rollout/resume`: back to progressing (or to its gates), with the step's weight
    /// given back.
    pub fn resume(&mut self, tripped: bool) -> Result<Vec<Action>, RolloutError> {
        if self.phase != Phase::Paused {
            return Err(RolloutError::Conflict(format!(
                "the rollout is {}; only a paused rollout can be resumed",
                self.phase.as_str()
            )));
        }
        if tripped {
            return Err(RolloutError::Conflict(format!(
                "{} is tripped; the rollout cannot resume (POST /reset, then /rollout/start)",
                self.upstream
            )));
        }
        let mut out = Vec::new();
        self.phase = Phase::Progressing;
        self.reason = match self.step {
            Some(i) => format!("resumed at step {} of {}", i + 1, self.steps.len()),
            None => "resumed before the first step".into(),
        };
        if self.step.is_some() {
            out.push(Action::SetWeight(self.weight_bp()));
        }
        out.push(Action::Notify(HookEvent::Event, self.reason.clone()));
        Ok(out)
    }

    /// `POST /rollout/abort`: roll back (reason `manual`).
    pub fn abort(&mut self, now_ms: u64) -> Result<Vec<Action>, RolloutError> {
        if !self.phase.running() {
            return Err(RolloutError::Conflict(format!(
                "the rollout is {}; there is nothing to abort",
                self.phase.as_str()
            )));
        }
        let mut out = vec![Action::Trip {
            reason: "manual",
            detail: "POST /rollout/abort".into(),
        }];
        self.finish(
            Phase::Failed,
            now_ms,
            "aborted",
            format!(
                "aborted by POST /rollout/abort at step {}",
                self.step_number()
            ),
            &mut out,
        );
        Ok(out)
    }

    /// The `rollback` webhook answered 2xx: roll back (reason `webhook`).
    pub fn rollback_by_webhook(&mut self, now_ms: u64) -> Vec<Action> {
        if !self.phase.running() {
            return Vec::new();
        }
        let mut out = vec![Action::Trip {
            reason: "webhook",
            detail: "the rollback webhook answered 2xx".into(),
        }];
        self.finish(
            Phase::Failed,
            now_ms,
            "rolled back",
            format!(
                "rolled back at step {}: the rollback webhook answered 2xx",
                self.step_number()
            ),
            &mut out,
        );
        out
    }

    /// A new build of the arm replaces this rollout.
    pub fn supersede(&mut self, now_ms: u64) -> Vec<Action> {
        let mut out = Vec::new();
        if self.phase.running() {
            self.finish(
                Phase::Failed,
                now_ms,
                "superseded",
                format!("superseded: {} has a new url", self.upstream),
                &mut out,
            );
        }
        out
    }
}

fn verdicts_text(verdicts: &[(Metric, Verdict)]) -> String {
    if verdicts.is_empty() {
        return "no verdicts yet".into();
    }
    let parts: Vec<String> = verdicts
        .iter()
        .map(|(m, v)| format!("{} {}", m.as_str(), v.as_str()))
        .collect();
    parts.join(", ")
}

/// The verdicts as JSON (`{"error_rate": "pass", ...}`).
pub fn verdicts_json(verdicts: &[(Metric, Verdict)]) -> Value {
    Value::Object(
        verdicts
            .iter()
            .map(|(m, v)| (m.as_str().to_owned(), json!(v.as_str())))
            .collect(),
    )
}

/// The rollout shared by the driver and the admin API.
#[derive(Debug, Default)]
pub struct Rollouts {
    current: Mutex<Option<Rollout>>,
}

impl Rollouts {
    /// Restored from the state file's value (an unreadable value is logged and dropped).
    pub fn restore(saved: Option<Value>) -> Self {
        let current = saved.and_then(|v| match serde_json::from_value::<Rollout>(v) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::error!(error = %e, "the state file's rollout cannot be read; it is dropped");
                None
            }
        });
        Rollouts {
            current: Mutex::new(current),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Option<Rollout>> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A copy of the rollout, if one ever ran.
    pub fn get(&self) -> Option<Rollout> {
        self.lock().clone()
    }

    /// `POST /rollout/start`.
    pub fn start(&self, ctx: &Context<'_>) -> Result<Rollout, RolloutError> {
        let snap = ctx.control.snapshot();
        let Some(cfg) = snap.config.rollout.as_ref() else {
            return Err(RolloutError::NotConfigured(
                "there is no [rollout] section in the config; add one (steps, minimums) and \
                 reload"
                    .into(),
            ));
        };
        let mut current = self.lock();
        if let Some(r) = current.as_ref().filter(|r| r.phase.running()) {
            return Err(RolloutError::Conflict(format!(
                "a rollout of {} is already {} (step {} of {}); pause, resume or abort it",
                r.upstream,
                r.phase.as_str(),
                r.step_number(),
                r.steps.len()
            )));
        }
        let view = ctx.control.view();
        if let Some(trip) = view.tripped.get(&cfg.upstream) {
            return Err(RolloutError::Conflict(format!(
                "{} is tripped ({}: {}); POST /reset first",
                cfg.upstream, trip.reason, trip.detail
            )));
        }
        let url = url_of(&snap.config, &cfg.upstream);
        let (r, actions) = Rollout::new(
            cfg,
            url,
            crate::control::state::now_ms(),
            "POST /rollout/start",
        );
        *current = Some(r.clone());
        drop(current);
        ctx.apply(&r, actions);
        Ok(r)
    }

    /// Runs `f` on the rollout (409 when there is none) and carries its actions out.
    pub fn change(
        &self,
        ctx: &Context<'_>,
        f: impl FnOnce(&mut Rollout) -> Result<Vec<Action>, RolloutError>,
    ) -> Result<Rollout, RolloutError> {
        let mut current = self.lock();
        let Some(r) = current.as_mut() else {
            return Err(RolloutError::Conflict(
                "no rollout has run; POST /rollout/start starts one".into(),
            ));
        };
        let actions = f(r)?;
        let r = r.clone();
        drop(current);
        ctx.apply(&r, actions);
        Ok(r)
    }
}

fn url_of(config: &Config, arm: &str) -> String {
    config
        .upstreams
        .iter()
        .find(|u| u.name == arm)
        .map(|u| u.url_text())
        .unwrap_or_default()
}

/// What carrying out actions needs.
pub struct Context<'a> {
    /// Weights and trips.
    pub control: &'a Control,
    /// Step analyses.
    pub ledger: &'a Ledger,
    /// Notifications.
    pub webhooks: &'a Webhooks,
}

impl Context<'_> {
    /// Carries `actions` of `r` out, and writes the rollout into the state file (when there
    /// are any: the time at the step alone is saved by the driver, less often).
    pub fn apply(&self, r: &Rollout, actions: Vec<Action>) {
        if actions.is_empty() {
            return;
        }
        let snap = self.control.snapshot();
        for a in actions {
            match a {
                Action::SetWeight(w) => {
                    if let Err(e) = self.control.set_rollout_weight(&r.upstream, w) {
                        let m: &dyn std::fmt::Display = match &e {
                            ChangeError::Invalid(m) | ChangeError::Tripped(m) => m,
                        };
                        tracing::warn!(upstream = %r.upstream, error = %m, "the rollout cannot set the weight");
                    }
                }
                Action::Step(on) => self.ledger.step(&r.upstream, on),
                Action::Trip { reason, detail } => {
                    self.control.trip(&r.upstream, reason, detail);
                }
                Action::Notify(event, message) => {
                    tracing::info!(upstream = %r.upstream, phase = r.phase.as_str(), step = r.step_number(), event = event.as_str(), "rollout: {message}");
                    self.webhooks.notify(
                        &snap.config.webhooks,
                        payload(r, event, message, Value::Null),
                    );
                }
            }
        }
        self.control.save_rollout(serde_json::to_value(r).ok());
        self.control
            .metrics()
            .rollout(r.step_number(), r.phase.as_str());
    }
}

/// The webhook payload for `event` about `r`.
pub fn payload(r: &Rollout, event: HookEvent, message: String, verdicts: Value) -> Payload {
    Payload {
        name: r.upstream.clone(),
        event,
        phase: r.phase.as_str().to_owned(),
        upstream: r.upstream.clone(),
        step: r.step_number(),
        weight: f64::from(r.weight_bp()) / 100.0,
        message,
        timestamp_ms: crate::control::state::now_ms(),
        verdicts,
    }
}

/// What the gates or the rollback hook answered.
enum Answer {
    /// `None`: every gate allowed it; otherwise the first that did not.
    Gate(Option<HookEvent>),
    /// Whether a receiver asked for a rollback.
    Rollback(bool),
}

/// How often gates are asked again while they say no, and the `rollback` hook is asked:
/// a fifth of `min_step_duration`, from 250 ms to 10 s.
pub fn ask_interval(c: &RolloutConfig) -> Duration {
    (c.min_step_duration / 5).clamp(Duration::from_millis(250), Duration::from_secs(10))
}

/// Runs the rollout driver until the task is aborted.
pub fn spawn(
    control: Arc<Control>,
    ledger: Arc<Ledger>,
    rollouts: Arc<Rollouts>,
    webhooks: Arc<Webhooks>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let ctx = Context {
            control: &control,
            ledger: &ledger,
            webhooks: &webhooks,
        };
        // A rollout restored from the state file analyses its step afresh: the evidence of
        // the step before the restart was in memory.
        if let Some(r) = rollouts
            .get()
            .filter(|r| r.phase.running() && r.step.is_some())
        {
            ledger.step(&r.upstream, true);
            control.metrics().rollout(r.step_number(), r.phase.as_str());
            tracing::info!(upstream = %r.upstream, step = r.step_number(), phase = r.phase.as_str(), "rollout restored from the state file");
        }
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = Instant::now();
        let mut last_saved = Instant::now();
        let mut next_ask = Instant::now();
        let mut url_seen: Option<String> = None;
        let mut asking: Option<JoinHandle<Answer>> = None;
        loop {
            tick.tick().await;
            if let Some(done) = asking.take_if(|h| h.is_finished()) {
                let now_ms = crate::control::state::now_ms();
                match done.await {
                    Ok(Answer::Gate(refused)) => {
                        let _ = rollouts.change(&ctx, |r| {
                            Ok(r.gate_answered(refused.is_none(), refused, now_ms))
                        });
                        if refused.is_none() {
                            // Allowed: the next gate (or the rollback hook) is asked at once.
                            next_ask = Instant::now();
                        }
                    }
                    Ok(Answer::Rollback(true)) => {
                        let _ = rollouts.change(&ctx, |r| Ok(r.rollback_by_webhook(now_ms)));
                    }
                    Ok(Answer::Rollback(false)) => {}
                    Err(e) => tracing::warn!(error = %e, "a rollout webhook query failed"),
                }
            }
            let now = Instant::now();
            let elapsed = now.saturating_duration_since(last);
            last = now;
            let snap = control.snapshot();
            let Some(cfg) = snap.config.rollout.clone() else {
                continue;
            };
            let url = url_of(&snap.config, &cfg.upstream);
            // A new build (also one deployed while canaryd was down) ends the rollout of the
            // old one; with start = "on_new_url" it starts a rollout of its own.
            let moved = match &url_seen {
                Some(seen) => *seen != url,
                None => rollouts.get().is_some_and(|r| r.url != url),
            };
            url_seen = Some(url.clone());
            if moved {
                let now_ms = crate::control::state::now_ms();
                let _ = rollouts.change(&ctx, |r| Ok(r.supersede(now_ms)));
                if cfg.start == RolloutStart::OnNewUrl {
                    let (r, actions) =
                        Rollout::new(&cfg, url.clone(), now_ms, "a new url for the arm");
                    *rollouts.lock() = Some(r.clone());
                    ctx.apply(&r, actions);
                    next_ask = now;
                }
            }
            let Some(r) = rollouts.get().filter(|r| r.phase.running()) else {
                continue;
            };
            let view = control.view();
            let limits = snap.config.rollback.limits();
            let weight_bp = snap
                .config
                .upstreams
                .iter()
                .position(|u| u.name == r.upstream)
                .and_then(|i| view.configured.get(i).copied())
                .unwrap_or(0);
            let observed = Observed {
                now_ms: crate::control::state::now_ms(),
                elapsed,
                config: &cfg,
                tripped: view
                    .tripped
                    .get(&r.upstream)
                    .map(|t| (t.reason.clone(), t.detail.clone())),
                source: view.source,
                weight_bp,
                url: url.clone(),
                step: ledger.step_status(&r.upstream, &limits),
                failing: ledger.failing(&r.upstream, &limits),
                srm: {
                    let timeout = snap.config.listen.request_timeout;
                    ledger
                        .srm_mismatch(&r.upstream, timeout)
                        .or_else(|| ledger.srm_mismatch(&snap.config.baseline().name, timeout))
                },
            };
            let _ = rollouts.change(&ctx, |r| Ok(r.tick(&observed)));
            let Some(r) = rollouts.get() else { continue };
            if !r.phase.running() {
                continue;
            }
            // The gates and the rollback hook are asked on a task of their own, so a slow or
            // dead receiver never holds up the ticks (and the rollbacks they make).
            if asking.is_none() && now >= next_ask {
                next_ask = now + ask_interval(&cfg);
                let verdicts = observed
                    .step
                    .as_ref()
                    .map_or(Value::Null, |s| verdicts_json(&s.verdicts));
                let hooks = snap.config.webhooks.clone();
                let webhooks = webhooks.clone();
                if let Some(pending) = r.pending.filter(|_| r.phase != Phase::Paused) {
                    let r = r.clone();
                    asking = Some(tokio::spawn(async move {
                        for &gate in pending.gates() {
                            let why = format!("may the rollout of {} go on?", r.upstream);
                            let p = payload(&r, gate, why, verdicts.clone());
                            if !webhooks.gate(&hooks, &p).await {
                                return Answer::Gate(Some(gate));
                            }
                        }
                        Answer::Gate(None)
                    }));
                } else if r.phase != Phase::Paused {
                    let p = payload(&r, HookEvent::Rollback, "roll back?".into(), verdicts);
                    asking = Some(tokio::spawn(async move {
                        Answer::Rollback(webhooks.rollback_requested(&hooks, &p).await)
                    }));
                }
            }
            // Every change is saved as it is made (`Context::apply`); the time at the step,
            // which moves every tick, at least every SAVE_EVERY.
            if last_saved.elapsed() >= SAVE_EVERY {
                last_saved = Instant::now();
                let r = rollouts.get();
                control.save_rollout(r.as_ref().and_then(|r| serde_json::to_value(r).ok()));
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(on_inconclusive: OnInconclusive) -> RolloutConfig {
        RolloutConfig {
            upstream: "canary".into(),
            steps: vec![1000, 5000, 10_000],
            min_step_duration: Duration::from_secs(60),
            min_requests: 100,
            max_step_duration: Duration::from_secs(600),
            on_inconclusive,
            start: RolloutStart::Manual,
        }
    }

    /// What the driver would see of a healthy arm at the rollout's own weight.
    fn seen<'a>(
        c: &'a RolloutConfig,
        r: &Rollout,
        elapsed_s: u64,
        n: u64,
        v: Verdict,
    ) -> Observed<'a> {
        Observed {
            now_ms: 1_000,
            elapsed: Duration::from_secs(elapsed_s),
            config: c,
            tripped: None,
            source: WeightSource::Rollout,
            weight_bp: r.weight_bp(),
            url: "http://canary".into(),
            step: Some(StepStatus {
                arm_requests: n,
                baseline_requests: n,
                verdicts: vec![(Metric::ErrorRate, v), (Metric::ErrorRateIncrease, v)],
            }),
            failing: None,
            srm: None,
        }
    }

    #[test]
    fn a_sample_ratio_mismatch_holds_the_step_until_it_is_gone() {
        let c = config(OnInconclusive::Hold);
        let mut r = started(&c);
        let mut o = seen(&c, &r, 60, 1000, Verdict::Pass);
        o.srm = Some("by users: 12 of 1000".into());
        let actions = r.tick(&o);
        assert!(r.srm_hold && r.pending.is_none(), "{actions:?}");
        assert!(r.reason.contains("sample-ratio mismatch"), "{}", r.reason);
        assert_eq!(actions.len(), 1, "{actions:?}");
        // Still shown: still held, and not notified again.
        o.elapsed = Duration::from_secs(600);
        assert!(r.tick(&o).is_empty());
        assert_eq!((r.step_number(), r.pending), (1, None));
        // Gone: the step passes at the next look.
        o.srm = None;
        r.tick(&o);
        assert!(!r.srm_hold);
        assert_eq!(r.pending, Some(Pending::StepUp));
    }

    fn started(c: &RolloutConfig) -> Rollout {
        let (mut r, actions) = Rollout::new(c, "http://canary".into(), 0, "test");
        assert!(matches!(
            &actions[..],
            [Action::Notify(HookEvent::Event, _)]
        ));
        assert_eq!(
            (r.phase, r.pending, r.step),
            (Phase::Progressing, Some(Pending::FirstStep), None)
        );
        let actions = r.gate_answered(true, None, 0);
        assert_eq!(actions[0], Action::SetWeight(1000));
        assert_eq!(actions[1], Action::Step(true));
        assert!(actions.contains(&Action::Notify(
            HookEvent::Rollout,
            "at step 1 of 3: 10%".into()
        )));
        r
    }

    #[test]
    fn a_healthy_canary_walks_every_step_to_promotion() {
        let c = config(OnInconclusive::Hold);
        let mut r = started(&c);
        for step in 1..=2 {
            assert_eq!(r.step_number(), step);
            // 59 s and plenty of passing requests: the time is not there yet.
            assert!(r.tick(&seen(&c, &r, 59, 1000, Verdict::Pass)).is_empty());
            assert_eq!(r.pending, None);
            let actions = r.tick(&seen(&c, &r, 1, 1000, Verdict::Pass));
            assert_eq!(actions.len(), 1, "{actions:?}");
            let want = if step == 2 {
                Pending::Promotion
            } else {
                Pending::StepUp
            };
            assert_eq!(r.pending, Some(want));
            assert_eq!(r.history[step - 1].outcome.as_deref(), Some("passed"));
            assert!(
                r.history[step - 1].detail.contains("passed after 1m"),
                "{:?}",
                r.history
            );
            let actions = r.gate_answered(true, None, 5);
            if step == 1 {
                assert_eq!(actions[0], Action::SetWeight(5000));
                assert_eq!(r.step_elapsed_ms, 0, "a new step starts its clock at 0");
            } else {
                assert_eq!(actions[0], Action::SetWeight(BASIS_POINTS));
                assert!(actions.contains(&Action::Step(false)));
                assert!(actions
                    .iter()
                    .any(|a| matches!(a, Action::Notify(HookEvent::PostRollout, _))));
            }
        }
        assert_eq!(r.phase, Phase::Succeeded);
        assert_eq!(r.reason, "promoted: canary serves 100%");
        assert_eq!(
            r.history.len(),
            2,
            "100% is the promotion, not a step analysed"
        );
        assert!(
            r.tick(&seen(&c, &r, 1, 1000, Verdict::Fail)).is_empty(),
            "finished"
        );
    }

    #[test]
    fn a_step_needs_both_minimums_and_a_pass() {
        let c = config(OnInconclusive::Hold);
        let mut r = started(&c);
        r.tick(&seen(&c, &r, 120, 99, Verdict::Pass));
        assert_eq!(r.pending, None, "99 requests < min_requests");
        let mut o = seen(&c, &r, 0, 1000, Verdict::Pass);
        if let Some(s) = o.step.as_mut() {
            s.baseline_requests = 50;
        }
        r.tick(&o);
        assert_eq!(r.pending, None, "the baseline's requests count too");
        r.tick(&seen(&c, &r, 0, 1000, Verdict::Inconclusive));
        assert_eq!(r.pending, None, "inconclusive does not pass");
        let mut o = seen(&c, &r, 0, 1000, Verdict::Pass);
        if let Some(s) = o.step.as_mut() {
            s.verdicts[1].1 = Verdict::Inconclusive;
        }
        r.tick(&o);
        assert_eq!(r.pending, None, "every metric must pass");
        r.tick(&seen(&c, &r, 0, 1000, Verdict::Pass));
        assert_eq!(r.pending, Some(Pending::StepUp));
    }

    #[test]
    fn inconclusive_at_max_step_duration_holds_or_rolls_back() {
        let c = config(OnInconclusive::Hold);
        let mut r = started(&c);
        r.tick(&seen(&c, &r, 599, 1000, Verdict::Inconclusive));
        assert!(!r.holding);
        let actions = r.tick(&seen(&c, &r, 1, 1000, Verdict::Inconclusive));
        assert!(r.holding && r.phase == Phase::Progressing);
        assert!(r.reason.contains("holding"), "{}", r.reason);
        assert_eq!(actions.len(), 1, "said once: {actions:?}");
        assert!(r
            .tick(&seen(&c, &r, 60, 1000, Verdict::Inconclusive))
            .is_empty());
        // The evidence comes later: the step passes.
        r.tick(&seen(&c, &r, 1, 2000, Verdict::Pass));
        assert_eq!(r.pending, Some(Pending::StepUp));

        let c = config(OnInconclusive::Rollback);
        let mut r = started(&c);
        let actions = r.tick(&seen(&c, &r, 600, 1000, Verdict::Inconclusive));
        assert!(
            matches!(&actions[0], Action::Trip { reason: "analysis", detail } if detail.contains("on_inconclusive"))
        );
        assert_eq!(r.phase, Phase::Failed);
        assert_eq!(r.history[0].outcome.as_deref(), Some("rolled back"));
    }

    #[test]
    fn a_failing_analysis_or_a_trip_ends_it_failed() {
        let c = config(OnInconclusive::Hold);
        let mut r = started(&c);
        let mut o = seen(&c, &r, 1, 10, Verdict::Inconclusive);
        o.failing = Some((
            Metric::ErrorRateIncrease,
            "arm 9 errors in 40 requests".into(),
        ));
        let actions = r.tick(&o);
        assert_eq!(
            actions[0],
            Action::Trip {
                reason: "analysis",
                detail: "arm 9 errors in 40 requests".into()
            }
        );
        assert_eq!(r.phase, Phase::Failed);
        assert!(r.reason.contains("error_rate_increase"), "{}", r.reason);

        let mut r = started(&c);
        let mut o = seen(&c, &r, 1, 10, Verdict::Inconclusive);
        o.tripped = Some(("error_rate".into(), "5 errors in 5 requests".into()));
        let actions = r.tick(&o);
        assert!(
            !actions.iter().any(|a| matches!(a, Action::Trip { .. })),
            "already tripped"
        );
        assert_eq!(r.phase, Phase::Failed);
        assert!(r.reason.contains("tripped (error_rate)"), "{}", r.reason);
    }

    #[test]
    fn someone_elses_weights_pause_it_and_resume_takes_them_back() {
        let c = config(OnInconclusive::Hold);
        let mut r = started(&c);
        r.tick(&seen(&c, &r, 30, 10, Verdict::Inconclusive));
        let mut o = seen(&c, &r, 10, 10, Verdict::Inconclusive);
        o.source = WeightSource::Admin;
        o.weight_bp = 2500;
        r.tick(&o);
        assert_eq!(r.phase, Phase::Paused);
        assert!(
            r.reason.contains("the admin API set the weights"),
            "{}",
            r.reason
        );
        // Paused time does not count.
        r.tick(&seen(&c, &r, 500, 1000, Verdict::Pass));
        assert_eq!((r.step_elapsed_ms, r.pending), (30_000, None));
        assert_eq!(
            r.resume(true),
            Err(RolloutError::Conflict(
                "canary is tripped; the rollout cannot resume (POST /reset, then /rollout/start)"
                    .into()
            ))
        );
        let actions = r.resume(false).expect("resumes");
        assert_eq!(actions[0], Action::SetWeight(1000));
        assert_eq!(r.phase, Phase::Progressing);

        let mut o = seen(&c, &r, 1, 10, Verdict::Inconclusive);
        o.source = WeightSource::File;
        r.tick(&o);
        assert!(r.reason.contains("config file"), "{}", r.reason);
    }

    #[test]
    fn a_gate_that_says_no_holds_it_waiting_until_it_says_yes() {
        let c = config(OnInconclusive::Hold);
        let (mut r, _) = Rollout::new(&c, "http://canary".into(), 0, "test");
        let actions = r.gate_answered(false, Some(HookEvent::PreRollout), 1);
        assert_eq!(r.phase, Phase::Waiting);
        assert!(r.reason.contains("pre-rollout"), "{}", r.reason);
        assert_eq!(actions.len(), 1);
        assert!(
            r.gate_answered(false, Some(HookEvent::PreRollout), 2)
                .is_empty(),
            "said once"
        );
        assert!(r.tick(&seen(&c, &r, 600, 1000, Verdict::Pass)).is_empty());
        r.gate_answered(true, None, 3);
        assert_eq!((r.phase, r.step_number()), (Phase::Progressing, 1));
    }

    #[test]
    fn impossible_calls_are_refused_with_the_phase() {
        let c = config(OnInconclusive::Hold);
        let mut r = started(&c);
        assert!(r.resume(false).is_err());
        r.pause_by_admin().expect("pauses");
        assert_eq!(
            r.pause_by_admin(),
            Err(RolloutError::Conflict(
                "the rollout is paused; only a progressing or waiting rollout can be paused".into()
            ))
        );
        let actions = r.abort(9).expect("aborts");
        assert_eq!(
            actions[0],
            Action::Trip {
                reason: "manual",
                detail: "POST /rollout/abort".into()
            }
        );
        assert_eq!(r.phase, Phase::Failed);
        assert_eq!(
            r.abort(10),
            Err(RolloutError::Conflict(
                "the rollout is failed; there is nothing to abort".into()
            ))
        );
        assert_eq!(
            r.resume(false),
            Err(RolloutError::Conflict(
                "the rollout is failed; only a paused rollout can be resumed".into()
            ))
        );
    }

    #[test]
    fn the_state_file_form_keeps_the_step_and_its_time() {
        let c = config(OnInconclusive::Hold);
        let mut r = started(&c);
        r.tick(&seen(&c, &r, 42, 10, Verdict::Inconclusive));
        let saved = serde_json::to_value(&r).expect("serialises");
        assert_eq!(saved["phase"], "progressing");
        let back: Rollout = serde_json::from_value(saved).expect("reads back");
        assert_eq!(back, r);
        assert_eq!((back.step_number(), back.step_elapsed_ms), (1, 42_000));
        let restored = Rollouts::restore(Some(serde_json::to_value(&r).expect("json")));
        assert_eq!(restored.get(), Some(r));
        assert_eq!(Rollouts::restore(Some(json!({"phase": 3}))).get(), None);
    }
}
