//! The sample-ratio mismatch guard: does each arm get the share of traffic the weights give it?
//!
//! A mismatch means the comparison is biased before any metric is read: one arm's requests
//! get lost before they are counted (an arm that crashes before answering, a client that gives
//! up on a slow arm), or something outside canaryd steers users. Each arm is tested against the
//! rest, two ways:
//!
//! * **by requests**: the requests routed by a random bucket (no sticky header). Each is an
//!   independent draw: it lands in the arm with probability `π`, the arm's effective weight
//!   when it was routed.
//! * **by users**: distinct sticky users, each counted once, when first seen, against the
//!   arm's weight at that moment. Buckets are uniform and a user's arrival does not depend on
//!   it, so each first sight is again a draw with probability `π`. Sticky requests are not
//!   tested one by one: a user's requests all go to one arm, so a heavy user would look like a
//!   mismatch.
//!
//! Because every draw carries its own `π`, ramps, trips and other weight changes are
//! accounted for exactly; forced (override header) and pinned requests are not draws and are
//! not counted.
//!
//! **The test is anytime-valid.** For an odds ratio `θ`, `Π θ^{x_t} / (1 − π_t + π_t θ)` is a
//! martingale when the draws follow the weights (`x_t` = 1 if draw `t` landed in the arm).
//! Their average over a grid of `θ` on both sides of 1 is one too, so by Ville's inequality it
//! exceeds `1/α` with probability at most `α`, however often it is looked at. The p-value
//! shown is `min(1, 1/M)`: under a correct split it stays above 0.001 for the whole life of
//! the guard in at least 99.9% of runs. (A chi-square p-value recomputed after every batch
//! would not: it crosses 0.001 by chance in a few percent of long runs.) The chi-square
//! statistic of the counts is shown beside it for reference.
//!
//! Distinct users are counted in bounded memory by sampling on the key's identity (the MD5's
//! high 64 bits, independent of its bucket): users below a threshold are kept in a set of at
//! most [`USER_SAMPLE`]; when the set is full the threshold halves and the users above it leave
//! the set (they stay counted, and are never counted again). Which users are counted depends
//! only on their identity, never on their arm, so the sample is as fair as all users.

use std::collections::HashSet;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

/// The guard's level: a mismatch is reported when the p-value falls below it.
pub const ALPHA: f64 = 0.001;
/// The most distinct users whose identities are kept to recognise them again.
pub const USER_SAMPLE: usize = 16_384;
/// Points of the `θ` grid the evidence is averaged over (the average costs `ln 24` ≈ 3.2 of
/// evidence against the best single `θ`, and covers shifts from 0.4% to 7× in the odds).
const GRID: usize = 24;

/// The odds ratios of the mixture, as `ln θ`: 12 on each side of 0, from ±0.004 to ±2.
fn log_thetas() -> [f64; GRID] {
    let mut out = [0.0; GRID];
    let ratio = (2.0f64 / 0.004).powf(1.0 / 11.0);
    let mut v = 0.004;
    for i in 0..GRID / 2 {
        out[2 * i] = v;
        out[2 * i + 1] = -v;
        v *= ratio;
    }
    out
}

/// One arm against the rest, for one kind of draw.
#[derive(Debug, Clone, Default)]
pub struct Test {
    /// Draws that landed in the arm.
    observed: u64,
    /// `(π in basis points, draws made with it)`, one entry per weight the arm had.
    by_weight: Vec<(u16, u64)>,
    /// Index of the entry last used (weights rarely change).
    last: usize,
}

/// What a [`Test`] shows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Figures {
    /// Draws counted (in any arm).
    pub draws: u64,
    /// Draws that landed in the arm.
    pub observed: u64,
    /// Draws the weights give the arm: `Σ π_t`.
    pub expected: f64,
    /// `(observed − expected)² / expected + (the same for the rest)`: Pearson's statistic.
    pub chi_square: f64,
    /// `min(1, 1/M)`, the anytime-valid p-value.
    pub p_value: f64,
}

impl Test {
    /// One draw made with the arm at `weight_bp`; `hit` if it landed in the arm.
    #[inline]
    pub fn record(&mut self, weight_bp: u16, hit: bool) {
        self.record_n(weight_bp, hit, 1);
    }

    /// `n` draws made with the arm at `weight_bp`, all in the arm (`hit`) or none.
    pub fn record_n(&mut self, weight_bp: u16, hit: bool, n: u64) {
        self.observed += if hit { n } else { 0 };
        if let Some(e) = self.by_weight.get_mut(self.last) {
            if e.0 == weight_bp {
                e.1 += n;
                return;
            }
        }
        match self.by_weight.iter().position(|e| e.0 == weight_bp) {
            Some(i) => {
                self.by_weight[i].1 += n;
                self.last = i;
            }
            None => {
                self.by_weight.push((weight_bp, n));
                self.last = self.by_weight.len() - 1;
            }
        }
    }

    /// Draws counted.
    pub fn draws(&self) -> u64 {
        self.by_weight.iter().map(|e| e.1).sum()
    }

    /// The counts, the chi-square statistic and the anytime-valid p-value.
    pub fn figures(&self) -> Figures {
        let draws = self.draws();
        let mut expected = 0.0;
        for &(w, n) in &self.by_weight {
            expected += n as f64 * f64::from(w) / 10_000.0;
        }
        let o = self.observed as f64;
        let rest = draws as f64 - expected;
        let chi_square = {
            let part = |obs: f64, exp: f64| {
                if exp > 0.0 {
                    (obs - exp).powi(2) / exp
                } else if obs > 0.0 {
                    f64::INFINITY
                } else {
                    0.0
                }
            };
            part(o, expected) + part(draws as f64 - o, rest)
        };
        Figures {
            draws,
            observed: self.observed,
            expected,
            chi_square,
            p_value: (-self.ln_evidence()).exp().min(1.0),
        }
    }

    /// `ln M`: the log of the mixture martingale, the average over the `θ` grid.
    pub fn ln_evidence(&self) -> f64 {
        let o = self.observed as f64;
        let mut terms = [0.0; GRID];
        for (term, lt) in terms.iter_mut().zip(log_thetas()) {
            let theta = lt.exp();
            let mut ln = o * lt;
            for &(w, n) in &self.by_weight {
                let pi = f64::from(w) / 10_000.0;
                ln -= n as f64 * (1.0 - pi + pi * theta).ln();
            }
            *term = ln;
        }
        let max = terms.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        if !max.is_finite() {
            return max;
        }
        let sum: f64 = terms.iter().map(|t| (t - max).exp()).sum();
        max + (sum / GRID as f64).ln()
    }
}

/// Both tests of one arm.
#[derive(Debug, Clone)]
pub struct ArmTests {
    /// The arm.
    pub name: Arc<str>,
    /// Requests routed by a random bucket.
    pub requests: Test,
    /// Distinct sticky users at first sight.
    pub users: Test,
}

/// The sampled users' identities, recognised again without keeping every user.
#[derive(Debug)]
struct Users {
    /// Identities below it are sampled.
    threshold: u64,
    seen: HashSet<u64, BuildHasherDefault<IdentityHasher>>,
}

impl Default for Users {
    fn default() -> Self {
        Users {
            threshold: u64::MAX,
            seen: HashSet::default(),
        }
    }
}

impl Users {
    /// Whether `user` is sampled and seen for the first time.
    #[inline]
    fn first_sight(&mut self, user: u64) -> bool {
        if user >= self.threshold || !self.seen.insert(user) {
            return false;
        }
        if self.seen.len() > USER_SAMPLE {
            // Halve the share sampled; those above the new threshold stay counted but are
            // not recognised (nor counted) again.
            self.threshold /= 2;
            let t = self.threshold;
            self.seen.retain(|&u| u < t);
        }
        // Still sampled after a halving only if it is below the new threshold; counting it
        // now is right either way: the decision depended on its identity alone.
        true
    }
}

/// A hasher for keys that are already uniform (MD5 bits): the key is its own hash.
#[derive(Debug, Default)]
pub struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// The guard over every arm.
#[derive(Debug, Default)]
pub struct Srm {
    arms: Vec<ArmTests>,
    users: Users,
    /// Draws waiting for their second to close (see [`Srm::defer`]), by the second they were
    /// routed in.
    pending: std::collections::BTreeMap<u64, Vec<Deferred>>,
}

/// A weight table as the guard takes it: each arm's index (from [`Srm::arm_index`]) and
/// effective weight in basis points.
pub type Table = Arc<[(usize, u16)]>;

/// Draws of one second with the same table, arm and kind.
#[derive(Debug)]
struct Deferred {
    weights: Table,
    arm: usize,
    user: bool,
    count: u64,
}

impl Srm {
    /// A guard that starts counting now.
    pub fn new() -> Self {
        Srm::default()
    }

    /// The index of `name`'s tests, created on first use.
    pub fn arm_index(&mut self, name: &Arc<str>) -> usize {
        if let Some(i) = self.arms.iter().position(|a| a.name == *name) {
            return i;
        }
        self.arms.push(ArmTests {
            name: name.clone(),
            requests: Test::default(),
            users: Test::default(),
        });
        self.arms.len() - 1
    }

    /// One request routed by the weights, in `second` (the second it was routed in):
    /// `weights` pairs each arm's index (from [`Srm::arm_index`]) with its effective weight
    /// when the request was routed; `arm` is the index of the arm that served it; `user` the
    /// sticky key's identity, `None` for a random bucket. It counts once [`Srm::commit`]
    /// takes its second. Draws are counted when they finish, and a slow arm's finish later: a
    /// draw counted at once would make an arm that is merely slower look short of traffic
    /// while its requests are in flight. Held until every request of its second has finished
    /// (been answered or timed out), the draws are exactly those routed.
    pub fn defer(&mut self, second: u64, weights: &Table, arm: usize, user: Option<u64>) {
        let user = match user {
            Some(u) if !self.users.first_sight(u) => return,
            Some(_) => true,
            None => false,
        };
        let slot = self.pending.entry(second).or_default();
        match slot
            .iter_mut()
            .find(|d| d.arm == arm && d.user == user && Arc::ptr_eq(&d.weights, weights))
        {
            Some(d) => d.count += 1,
            None => slot.push(Deferred {
                weights: weights.clone(),
                arm,
                user,
                count: 1,
            }),
        }
    }

    /// Counts the deferred draws routed before `second`.
    pub fn commit(&mut self, second: u64) {
        let later = self.pending.split_off(&second);
        let due = std::mem::replace(&mut self.pending, later);
        for d in due.into_values().flatten() {
            for &(i, w) in d.weights.iter() {
                if let Some(a) = self.arms.get_mut(i) {
                    let test = if d.user {
                        &mut a.users
                    } else {
                        &mut a.requests
                    };
                    test.record_n(w, i == d.arm, d.count);
                }
            }
        }
    }

    /// Draws deferred and not yet counted.
    pub fn deferred(&self) -> u64 {
        self.pending.values().flatten().map(|d| d.count).sum()
    }

    /// Every arm's tests.
    pub fn arms(&self) -> &[ArmTests] {
        &self.arms
    }

    /// The tests of `name`.
    pub fn arm(&self, name: &str) -> Option<&ArmTests> {
        self.arms.iter().find(|a| *a.name == *name)
    }
}

/// A mismatch, described with its numbers, if either test of `arm` shows one at [`ALPHA`].
pub fn mismatch(arm: &ArmTests) -> Option<String> {
    let mut out = Vec::new();
    for (by, test) in [("requests", &arm.requests), ("users", &arm.users)] {
        let f = test.figures();
        if f.p_value < ALPHA {
            out.push(format!(
                "by {by}: {} of {} ({:.2}%) where the weights give {:.1} ({:.2}%), p = {:.2e} < {ALPHA}",
                f.observed,
                f.draws,
                100.0 * f.observed as f64 / f.draws.max(1) as f64,
                f.expected,
                100.0 * f.expected / f.draws.max(1) as f64,
                f.p_value
            ));
        }
    }
    (!out.is_empty()).then(|| out.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::WeightTable;

    /// Simulated traffic: `users` sticky users with 1–20 requests each (heavy users exist)
    /// and as many random requests, in arrival order, over a schedule of effective tables.
    struct Run {
        rng: fastrand::Rng,
        srm: Srm,
        idx: [usize; 2],
        /// Seen users' buckets (a user keeps its bucket).
        users: Vec<(u64, u16)>,
        /// Share of requests without a sticky key.
        random: f64,
        /// Share of sticky requests from a user seen before.
        returning: f64,
    }

    impl Run {
        fn new(seed: u64) -> Self {
            let mut srm = Srm::new();
            let idx = [
                srm.arm_index(&Arc::from("stable")),
                srm.arm_index(&Arc::from("canary")),
            ];
            Run {
                rng: fastrand::Rng::with_seed(seed),
                srm,
                idx,
                users: Vec::new(),
                random: 0.5,
                returning: 0.7,
            }
        }

        /// `n` requests under a table giving the canary `canary_bp`; a canary request is lost
        /// before it is counted with probability `drop`.
        fn traffic(&mut self, n: usize, canary_bp: u16, drop: f64) {
            let table = WeightTable::new(vec![10_000 - canary_bp, canary_bp], 0).expect("valid");
            let weights: Table = Arc::from(vec![
                (self.idx[0], 10_000 - canary_bp),
                (self.idx[1], canary_bp),
            ]);
            for _ in 0..n {
                let (bucket, user) = if self.rng.f64() < self.random {
                    (self.rng.u16(..10_000), None)
                } else if self.users.is_empty() || self.rng.f64() >= self.returning {
                    let u = (self.rng.u64(..), self.rng.u16(..10_000));
                    self.users.push(u);
                    (u.1, Some(u.0))
                } else {
                    // Returning users, the earlier ones more often (heavy users).
                    let k = self.users.len();
                    let i = k - 1 - (self.rng.f64().powi(3) * k as f64) as usize % k;
                    (self.users[i].1, Some(self.users[i].0))
                };
                let arm = table.pick(bucket);
                if arm == 1 && self.rng.f64() < drop {
                    continue;
                }
                self.srm.defer(0, &weights, self.idx[arm], user);
            }
        }

        /// The canary's p-values by requests and by users, everything deferred counted.
        fn min_p(&mut self) -> (f64, f64) {
            self.srm.commit(u64::MAX);
            let a = &self.srm.arms()[self.idx[1]];
            (a.requests.figures().p_value, a.users.figures().p_value)
        }
    }

    #[test]
    fn a_correct_split_through_a_ramp_and_a_trip_stays_above_alpha() {
        // The ramp 10% -> 100% of a 20% canary in ten steps, a run at 20%, a trip (0%), and a
        // reset: checked after every 500 requests, as the circuit task would.
        let runs = 200;
        let mut flagged = 0;
        for seed in 0..runs {
            let mut run = Run::new(seed);
            let mut schedule: Vec<u16> = (1..=10).map(|k| 200 * k).collect();
            schedule.extend([2000, 2000, 0, 0, 2000, 2000]);
            let mut ever = false;
            for canary in schedule {
                for _ in 0..4 {
                    run.traffic(500, canary, 0.0);
                    let (r, u) = run.min_p();
                    ever |= r < ALPHA || u < ALPHA;
                }
            }
            flagged += usize::from(ever);
        }
        // The guarantee is 0.1% per arm and kind; the issue asks for at most 1% of runs.
        assert!(
            flagged <= runs as usize / 100,
            "{flagged} of {runs} runs flagged"
        );
    }

    /// In how many of `runs` seeded runs losing a tenth of the canary's responses before
    /// they are counted shows by requests and by users, with `random` of the requests
    /// without a sticky key and `returning` of the sticky ones from known users.
    fn found(runs: u64, random: f64, returning: f64, per_step: usize) -> (usize, usize) {
        let mut found = (0, 0);
        for seed in 0..runs {
            let mut run = Run::new(1000 + seed);
            run.random = random;
            run.returning = returning;
            for canary in [500, 1000, 2000, 2000, 2000, 2000] {
                run.traffic(per_step, canary, 0.10);
            }
            let (r, u) = run.min_p();
            found.0 += usize::from(r < ALPHA);
            found.1 += usize::from(u < ALPHA);
        }
        found
    }

    #[test]
    fn losing_a_tenth_of_the_canarys_responses_is_found_by_requests() {
        let (by_requests, _) = found(50, 1.0, 0.0, 10_000);
        assert!(by_requests >= 48, "found in {by_requests} of 50");
    }

    #[test]
    fn losing_a_tenth_of_the_canarys_new_users_is_found_by_users() {
        // Users who come once: a lost response loses the user. The sample of users is
        // bounded, so the users test needs more traffic than the requests test.
        let (_, by_users) = found(50, 0.0, 0.0, 20_000);
        assert!(by_users >= 48, "found in {by_users} of 50");
        // Users who come back are counted at a later request: losing some of their
        // responses is not a loss of users, and the users test rightly stays quiet.
        let (_, returning) = found(50, 0.0, 0.95, 20_000);
        assert!(returning <= 1, "flagged in {returning} of 50");
    }

    #[test]
    fn deferred_draws_count_only_once_their_second_is_committed() {
        let mut srm = Srm::new();
        let (a, b) = (
            srm.arm_index(&Arc::from("stable")),
            srm.arm_index(&Arc::from("canary")),
        );
        let table: Table = Arc::from(vec![(a, 9000), (b, 1000)]);
        // A slow canary: its draws of second 0 finish during second 5, the stable's at once.
        for _ in 0..900 {
            srm.defer(0, &table, a, None);
        }
        srm.commit(0);
        assert_eq!(srm.arms()[b].requests.draws(), 0);
        for _ in 0..100 {
            srm.defer(0, &table, b, None);
        }
        srm.defer(6, &table, a, Some(42));
        srm.defer(6, &table, a, Some(42));
        assert_eq!(
            srm.deferred(),
            1001,
            "a user is counted at first sight only"
        );
        srm.commit(1);
        let f = srm.arms()[b].requests.figures();
        assert_eq!((f.draws, f.observed), (1000, 100));
        assert!((f.expected - 100.0).abs() < 1e-9);
        assert_eq!(
            f.p_value,
            (-srm.arms()[b].requests.ln_evidence()).exp().min(1.0)
        );
        assert_eq!(srm.arms()[a].users.draws(), 0);
        srm.commit(7);
        assert_eq!((srm.arms()[a].users.draws(), srm.deferred()), (1, 0));
    }

    #[test]
    fn evidence_is_a_martingale_average_at_the_start() {
        let t = Test::default();
        assert_eq!(t.ln_evidence(), 0.0);
        assert_eq!(t.figures().p_value, 1.0);
    }

    #[test]
    fn impossible_draws_are_found_within_a_handful() {
        // Requests in an arm whose weight is 0: each multiplies the evidence by up to e^2.
        let mut t = Test::default();
        let mut n = 0;
        while t.figures().p_value >= ALPHA {
            t.record(0, true);
            n += 1;
            assert!(n < 10, "not found after {n} impossible draws");
        }
        assert!(
            n >= 3,
            "a single impossible draw is not yet a mismatch: {n}"
        );
    }

    #[test]
    fn figures_add_up_over_weight_changes() {
        let mut t = Test::default();
        for _ in 0..100 {
            t.record(1000, false);
        }
        for _ in 0..50 {
            t.record(5000, true);
        }
        let f = t.figures();
        assert_eq!((f.draws, f.observed), (150, 50));
        assert!((f.expected - 35.0).abs() < 1e-9, "{}", f.expected);
        let rest = 115.0;
        let chi = (50.0f64 - 35.0).powi(2) / 35.0 + (100.0f64 - rest).powi(2) / rest;
        assert!((f.chi_square - chi).abs() < 1e-9);
    }

    #[test]
    fn the_user_sample_stays_bounded_and_never_counts_a_user_twice() {
        let mut users = Users::default();
        let mut rng = fastrand::Rng::with_seed(7);
        let ids: Vec<u64> = (0..100_000).map(|_| rng.u64(..)).collect();
        let mut counted = HashSet::new();
        for round in 0..3 {
            for &id in &ids {
                if users.first_sight(id) {
                    assert!(counted.insert(id), "user counted twice (round {round})");
                }
                assert!(users.seen.len() <= USER_SAMPLE);
            }
        }
        // Every user below the final threshold is counted: the sample is a uniform share.
        let below = ids.iter().filter(|&&u| u < users.threshold).count();
        assert!(counted.len() >= below);
        assert!(below > USER_SAMPLE / 4, "{below}");
    }

    #[test]
    fn the_bound_holds_when_checked_after_every_draw() {
        // Under a correct split, the share of seeded runs whose evidence ever reaches 1/alpha
        // is below alpha, for a loose alpha (0.05) that a few hundred runs can show.
        let runs = 400;
        let alpha = 0.05;
        let mut crossed = 0;
        for seed in 0..runs {
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut t = Test::default();
            for _ in 0..3000 {
                t.record(1000, rng.f64() < 0.1);
                if t.ln_evidence() >= (1.0f64 / alpha).ln() {
                    crossed += 1;
                    break;
                }
            }
        }
        assert!(
            (crossed as f64) < alpha * runs as f64,
            "{crossed} of {runs} crossed 1/{alpha}"
        );
    }
}
