//! Anytime-valid bounds on a rate, the building block of every verdict.
//!
//! For `k` events in `n` independent trials of an unknown rate `p`, and a candidate rate
//! `p0`, the likelihood ratio of an alternative `q` against `p0`,
//! `(q/p0)^k ((1-q)/(1-p0))^(n-k)`, is a nonnegative martingale with mean 1 when `p0` is the
//! true rate, and a supermartingale when the true rate is below `p0` and `q` above it (or the
//! other way round). So is any fixed mixture of such ratios. Ville's inequality bounds the
//! chance that a nonnegative supermartingale starting at 1 *ever* reaches `1/α` by `α`,
//! however often it is looked at and whenever the looking stops. The rates `p0` whose
//! evidence stays below `1/α` therefore form a bound that holds at every `n` at once with
//! probability at least `1 - α`: a confidence sequence (Howard, Ramdas, McAuliffe and
//! Sekhon, "Time-uniform, nonparametric, nonasymptotic confidence sequences", 2021).
//!
//! The mixture here is over sequential probability ratio tests (Wald's SPRT) whose
//! alternatives sit at fixed relative distances `r` from `p0`: `q = p0 + (1 - p0) r` for a
//! lower bound, `q = p0 (1 - r)` for an upper bound, with `r` on a doubling grid (so every
//! size of regression is within a factor of 2 of one of them) and, for the analysis, more
//! weight at the margin the operator set, where detection speed matters. With alternatives
//! tied to `p0` this way the evidence is monotone in `p0`, so each bound is one root of a
//! smooth function. Against a single prior over all rates (a Beta mixture), this gives up a
//! constant `ln(1/weight)` instead of a cost that grows with `ln n`: in `canaryd simulate`'s
//! 1% -> 5% case it catches the regression in roughly half the canary requests.

/// The relative distances of the doubling grid: 0.95, then 2^-1 .. 2^-16.
const GRID: usize = 17;
/// Parts of the largest mixture (the grid and three at the margin).
const MAX_PARTS: usize = GRID + 3;

/// The share of the mixture's weight on the grid when a margin is given (the rest goes to
/// alternatives at half, once and twice the margin).
const GRID_SHARE: f64 = 0.4;

/// A mixture of SPRT alternatives at relative distances from the null.
#[derive(Debug, Clone, PartialEq)]
pub struct Mixture {
    /// `(r, ln weight)`, weights summing to 1.
    parts: Vec<(f64, f64)>,
}

impl Mixture {
    /// The doubling grid alone, equal weights.
    pub fn grid() -> Self {
        Mixture {
            parts: grid_r().map(|r| (r, -(GRID as f64).ln())).collect(),
        }
    }

    /// Half the weight on "no change" (a ratio of 1), half on the grid: the baseline's factor
    /// in a comparison, which must stay a martingale at the baseline's true rate but should
    /// cost little where the data sit.
    pub fn with_null() -> Self {
        let mut parts = vec![(0.0, 0.5f64.ln())];
        parts.extend(grid_r().map(|r| (r, (0.5 / GRID as f64).ln())));
        Mixture { parts }
    }

    /// The grid with 40% of the weight (`GRID_SHARE`), and the rest at half, once and twice
    /// `margin` (in weights 1:2:1), where a regression at the margin is decided.
    pub fn around(margin: f64) -> Self {
        let mut parts: Vec<(f64, f64)> = grid_r()
            .map(|r| (r, (GRID_SHARE / GRID as f64).ln()))
            .collect();
        let rest = 1.0 - GRID_SHARE;
        for (f, w) in [(0.5, 0.25), (1.0, 0.5), (2.0, 0.25)] {
            let r = (margin * f).clamp(1e-9, 0.95);
            parts.push((r, (rest * w).ln()));
        }
        Mixture { parts }
    }

    /// ln of the evidence against "the rate is at most `p0`" after `k` events in `n` trials.
    pub fn ln_evidence_above(&self, k: u64, n: u64, p0: f64) -> f64 {
        let (k, f) = (k as f64, n.saturating_sub(k) as f64);
        let odds = (1.0 - p0) / p0;
        // 0 ln(anything) = 0: no events say nothing however large the odds.
        let up = |r: f64| {
            if k == 0.0 {
                0.0
            } else {
                k * (r * odds).ln_1p()
            }
        };
        log_sum_exp(
            self.parts
                .iter()
                .map(|&(r, w)| w + up(r) + f * (-r).ln_1p()),
        )
    }

    /// ln of the evidence against "the rate is at least `p0`" after `k` events in `n` trials.
    pub fn ln_evidence_below(&self, k: u64, n: u64, p0: f64) -> f64 {
        self.ln_evidence_above(n.saturating_sub(k), n, 1.0 - p0)
    }

    /// The lowest rate not ruled out at level `1 - alpha`: `inf { p0 : E(p0) < 1/alpha }`
    /// for the evidence against "at most `p0`", which falls as `p0` rises.
    pub fn lower_bound(&self, k: u64, n: u64, alpha: f64) -> f64 {
        let k = k.min(n);
        if k == 0 {
            return 0.0;
        }
        let limit = -alpha.ln();
        let (kf, ff) = (k as f64, (n - k) as f64);
        // g(u) = ln E(e^u) - limit and its slope, on u = ln p0: the bounds can be tiny.
        let g = |u: f64| {
            let p = u.exp();
            let odds = (1.0 - p) / p;
            let mut top = f64::NEG_INFINITY;
            let mut terms = [(0.0f64, 0.0f64); MAX_PARTS];
            for (slot, &(r, w)) in terms.iter_mut().zip(&self.parts) {
                let t = w + kf * (r * odds).ln_1p() + ff * (-r).ln_1p();
                top = top.max(t);
                // d t / d u
                *slot = (t, -kf * r / (p + r * (1.0 - p)));
            }
            let (mut sum, mut slope) = (0.0, 0.0);
            for (t, d) in &terms[..self.parts.len().min(MAX_PARTS)] {
                let e = (t - top).exp();
                sum += e;
                slope += e * d;
            }
            (top + sum.ln() - limit, slope / sum)
        };
        // At p0 = k/n every alternative is less likely than the observed rate: g < 0 there,
        // and g -> +inf as p0 -> 0. Bracket the root, then Newton with a bisection guard.
        let mut hi = (kf / n as f64).ln();
        let mut step = 1.0;
        let mut lo = hi - step;
        while g(lo).0 < 0.0 {
            hi = lo;
            step *= 2.0;
            lo -= step;
            if lo < -700.0 {
                return 0.0;
            }
        }
        let mut u = (lo + hi) / 2.0;
        for _ in 0..100 {
            let (v, slope) = g(u);
            if v < 0.0 && v > -1e-10 {
                return u.exp();
            }
            if v >= 0.0 {
                lo = u;
            } else {
                hi = u;
            }
            if hi - lo < 1e-10 {
                break;
            }
            let newton = u - v / slope;
            u = if slope < 0.0 && newton > lo && newton < hi {
                newton
            } else {
                (lo + hi) / 2.0
            };
        }
        hi.exp()
    }

    /// The highest rate not ruled out at level `1 - alpha`.
    pub fn upper_bound(&self, k: u64, n: u64, alpha: f64) -> f64 {
        1.0 - self.lower_bound(n.saturating_sub(k), n, alpha)
    }

    /// The most events in `n` trials that do not rule out "the rate is `p0`" from above at
    /// level `1 - alpha`, and the fewest that do not rule it out from below: while the true
    /// rate is `p0`, the count stays within these at every `n` (each side failing with
    /// probability at most `alpha`).
    pub fn count_band(&self, n: u64, p0: f64, alpha: f64) -> (u64, u64) {
        let limit = -alpha.ln();
        // The evidence from above rises with k, from below falls with k.
        let hi = last_true(0, n, |k| self.ln_evidence_above(k, n, p0) < limit);
        let lo = first_true(0, n, |k| self.ln_evidence_below(k, n, p0) < limit);
        (lo.unwrap_or(n), hi.unwrap_or(0))
    }
}

/// The evidence that one rate exceeds another by more than `d`, from two samples.
///
/// For "the arm's rate minus the baseline's is at most `d`", with the baseline's true rate
/// `p` unknown: for every candidate `p`, the product of the arm's evidence against "at most
/// `p + d`" and the baseline's evidence against "at least `p`" (half of it "no change") is a
/// supermartingale if `p` is the baseline's true rate and the null holds. So is the smallest
/// such product over `p`, which is what is tested: the null is rejected only when *every*
/// baseline rate is ruled out as an explanation. Unlike bounding each rate on its own and
/// subtracting, the baseline's uncertainty is paid only where the data put it.
///
/// The first factor falls as `p` rises and the second rises, so a segment of candidates
/// `[a, b]` is bounded below by `arm(b + d) + base(a)`; a branch and bound over segments
/// decides the minimum rigorously, answering "not shown" when it cannot prove it.
#[derive(Debug, Clone, PartialEq)]
pub struct Difference {
    /// The arm's mixture.
    pub arm: Mixture,
    /// The baseline's mixture (with a null part).
    pub base: Mixture,
}

/// Counts of one sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Events (errors).
    pub k: u64,
    /// Trials (requests).
    pub n: u64,
}

impl Counts {
    /// `k / n` (0 when `n` is 0).
    pub fn rate(self) -> f64 {
        if self.n == 0 {
            0.0
        } else {
            self.k as f64 / self.n as f64
        }
    }

    fn flipped(self) -> Counts {
        Counts {
            k: self.n - self.k.min(self.n),
            n: self.n,
        }
    }
}

/// Evaluations of the branch and bound before it gives up (answering "not shown").
const MAX_EVALUATIONS: usize = 4096;
/// The same for each step of [`Difference::interval`]'s search: near an end the minimum sits
/// barely above the limit and proving it takes many evaluations; giving up there counts the
/// difference as not ruled out, so the interval comes out a little wider, never narrower.
const INTERVAL_EVALUATIONS: usize = 256;

impl Difference {
    /// Whether the arm's rate is shown to exceed the baseline's by more than `d` at level
    /// `1 - alpha`.
    pub fn shown_above(&self, arm: Counts, base: Counts, d: f64, alpha: f64) -> bool {
        self.above(arm, base, d, alpha, MAX_EVALUATIONS)
    }

    /// [`Self::shown_above`] with at most `budget` evaluations.
    fn above(&self, arm: Counts, base: Counts, d: f64, alpha: f64, budget: usize) -> bool {
        let limit = -alpha.ln();
        match self.factors(arm, base, d) {
            Some((a, b, lo, hi)) => min_at_least(&a, &b, lo, hi, limit, budget),
            None => d < -1.0,
        }
    }

    /// The test statistic of [`Self::shown_above`]: the ln evidence, at its smallest over the
    /// baseline's rates. Found by a search (every candidate of the first pass, then a golden
    /// section around the least), so it may sit a little above the exact infimum: the
    /// verdicts come from the rigorous [`Self::shown_above`], this number is for reading.
    pub fn ln_evidence_above(&self, arm: Counts, base: Counts, d: f64) -> f64 {
        match self.factors(arm, base, d) {
            Some((a, b, lo, hi)) => least_found(&a, &b, lo, hi),
            None if d < -1.0 => f64::INFINITY,
            None => 0.0,
        }
    }

    /// The statistic of [`Self::shown_below`].
    pub fn ln_evidence_below(&self, arm: Counts, base: Counts, d: f64) -> f64 {
        self.ln_evidence_above(arm.flipped(), base.flipped(), -d)
    }

    /// The two factors of the evidence against "the arm's rate is at most the baseline's
    /// `p` plus `d`", as functions of `p`, and the range of `p` (`None` if it is empty).
    #[allow(clippy::type_complexity)]
    fn factors(
        &self,
        arm: Counts,
        base: Counts,
        d: f64,
    ) -> Option<(impl Fn(f64) -> f64 + '_, impl Fn(f64) -> f64 + '_, f64, f64)> {
        // p + d must be a rate: p in [max(0, -d), min(1, 1 - d)].
        let (lo, hi) = ((-d).max(0.0), (1.0 - d).min(1.0));
        if lo > hi {
            return None;
        }
        let a = move |p: f64| {
            let q = (p + d).clamp(f64::MIN_POSITIVE, 1.0);
            self.arm.ln_evidence_above(arm.k, arm.n, q)
        };
        let b = move |p: f64| {
            let q = p.clamp(0.0, 1.0 - f64::EPSILON);
            self.base.ln_evidence_below(base.k, base.n, q)
        };
        Some((a, b, lo, hi))
    }

    /// Whether the arm's rate is shown to be below the baseline's plus `d` (the difference
    /// is less than `d`) at level `1 - alpha`: the same test on the successes.
    pub fn shown_below(&self, arm: Counts, base: Counts, d: f64, alpha: f64) -> bool {
        self.below(arm, base, d, alpha, MAX_EVALUATIONS)
    }

    /// [`Self::shown_below`] with at most `budget` evaluations.
    fn below(&self, arm: Counts, base: Counts, d: f64, alpha: f64, budget: usize) -> bool {
        // p_arm - p_base < d  <=>  (1 - p_arm) - (1 - p_base) > -d
        self.above(arm.flipped(), base.flipped(), -d, alpha, budget)
    }

    /// The interval of differences not ruled out at level `1 - alpha` on each side: every
    /// `d` at which neither [`Self::shown_above`] nor [`Self::shown_below`] holds.
    pub fn interval(&self, arm: Counts, base: Counts, alpha: f64) -> (f64, f64) {
        let est = arm.rate() - base.rate();
        // shown_above(d) holds for d below the low end; shown_below(d) above the high end.
        let (tol, budget) = (INTERVAL_TOLERANCE, INTERVAL_EVALUATIONS);
        let low = boundary(-1.0, est, tol, |d| self.above(arm, base, d, alpha, budget));
        let high = -boundary(-1.0, -est, tol, |d| {
            self.below(arm, base, -d, alpha, budget)
        });
        (low, high)
    }
}

/// How closely [`Difference::interval`] finds its ends: a thousandth of a percentage point.
/// Each end is the last difference shown, so the interval errs wide, never narrow.
const INTERVAL_TOLERANCE: f64 = 1e-5;

/// For a predicate true below some point and false above it on `[a, b]`: a point where it
/// holds within `tol` below that point, or `a` if it is false at `a`.
pub(crate) fn boundary(a: f64, b: f64, tol: f64, holds: impl Fn(f64) -> bool) -> f64 {
    if !holds(a) {
        return a;
    }
    if holds(b) {
        return b;
    }
    let (mut lo, mut hi) = (a, b);
    while hi - lo > tol {
        let mid = (lo + hi) / 2.0;
        if holds(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

/// The least `a(p) + b(p)` found on `[lo, hi]`: the candidates of [`min_at_least`]'s first
/// pass, then a golden-section search between the neighbours of the least.
fn least_found(a: &dyn Fn(f64) -> f64, b: &dyn Fn(f64) -> f64, lo: f64, hi: f64) -> f64 {
    let f = |t: f64| {
        let p = candidate(lo, hi, t);
        a(p) + b(p)
    };
    let ts: Vec<f64> = (0..START).map(start_t).collect();
    let values: Vec<f64> = ts.iter().map(|&t| f(t)).collect();
    let (best, mut least) =
        values
            .iter()
            .copied()
            .enumerate()
            .fold(
                (0, f64::INFINITY),
                |m, (i, v)| if v < m.1 { (i, v) } else { m },
            );
    let (mut l, mut r) = (ts[best.saturating_sub(1)], ts[(best + 1).min(START - 1)]);
    const PHI: f64 = 0.618_033_988_749_895;
    for _ in 0..40 {
        let (x, y) = (r - PHI * (r - l), l + PHI * (r - l));
        let (fx, fy) = (f(x), f(y));
        least = least.min(fx).min(fy);
        if fx < fy {
            r = y;
        } else {
            l = x;
        }
    }
    least
}

/// Candidates of the first pass, evenly spaced in the log-odds of where `p` sits in
/// `[lo, hi]`, so rates from 1e-12 to 1 - 1e-12 of the way are all resolved; both ends are
/// candidates too.
const START: usize = 48;
/// logistic(27.7) = 1 - 1e-12.
const T: f64 = 27.7;

/// The `i`th first-pass candidate, in log-odds.
fn start_t(i: usize) -> f64 {
    -T + 2.0 * T * i as f64 / (START - 1) as f64
}

/// The rate at log-odds `t` of the way through `[lo, hi]`.
fn candidate(lo: f64, hi: f64, t: f64) -> f64 {
    if t <= -T {
        lo
    } else if t >= T {
        hi
    } else {
        lo + (hi - lo) / (1.0 + (-t).exp())
    }
}

/// Whether `a(p) + b(p) >= c` for every `p` in `[lo, hi]`, for `a` non-increasing and `b`
/// non-decreasing; `false` when that cannot be shown within `budget` evaluations.
fn min_at_least(
    a: &dyn Fn(f64) -> f64,
    b: &dyn Fn(f64) -> f64,
    lo: f64,
    hi: f64,
    c: f64,
    budget: usize,
) -> bool {
    let eval = |t: f64| {
        let p = candidate(lo, hi, t);
        (t, a(p), b(p))
    };
    let mut points = Vec::with_capacity(START);
    for i in 0..START {
        let point = eval(start_t(i));
        if point.1 + point.2 < c {
            return false;
        }
        points.push(point);
    }
    let mut evaluations = points.len();
    // A segment [l, r] is bounded below by a(r) + b(l); those below c need a closer look.
    let mut stack: Vec<_> = points
        .windows(2)
        .filter(|w| w[1].1 + w[0].2 < c)
        .map(|w| (w[0], w[1]))
        .collect();
    while let Some((l, r)) = stack.pop() {
        if evaluations >= budget || r.0 - l.0 < 1e-9 {
            return false;
        }
        let mid = eval((l.0 + r.0) / 2.0);
        evaluations += 1;
        if mid.1 + mid.2 < c {
            return false;
        }
        if mid.1 + l.2 < c {
            stack.push((l, mid));
        }
        if r.1 + mid.2 < c {
            stack.push((mid, r));
        }
    }
    true
}

fn grid_r() -> impl Iterator<Item = f64> {
    std::iter::once(0.95).chain((1..GRID as i32).map(|j| 0.5f64.powi(j)))
}

fn log_sum_exp(xs: impl Iterator<Item = f64> + Clone) -> f64 {
    let m = xs.clone().fold(f64::NEG_INFINITY, f64::max);
    if !m.is_finite() {
        return m;
    }
    m + xs.map(|x| (x - m).exp()).sum::<f64>().ln()
}

/// The largest `k` in `[a, b]` with `pred(k)`, for a predicate true then false as `k` rises.
fn last_true(a: u64, b: u64, pred: impl Fn(u64) -> bool) -> Option<u64> {
    if !pred(a) {
        return None;
    }
    let (mut lo, mut hi) = (a, b.saturating_add(1));
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if pred(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Some(lo)
}

/// The smallest `k` in `[a, b]` with `pred(k)`, for a predicate false then true as `k` rises.
fn first_true(a: u64, b: u64, pred: impl Fn(u64) -> bool) -> Option<u64> {
    if !pred(b) {
        return None;
    }
    if pred(a) {
        return Some(a);
    }
    let (mut lo, mut hi) = (a, b);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if pred(mid) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Some(hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The difference test against a brute-force minimum over 4,001 baseline rates: it never
    /// claims more than the minimum allows (soundness), it decides the clear cases, and its
    /// statistic is the minimum to within a little.
    #[test]
    fn the_difference_test_agrees_with_a_brute_force_minimum() {
        let test = Difference {
            arm: Mixture::around(0.02),
            base: Mixture::with_null(),
        };
        let mut rng = fastrand::Rng::with_seed(23);
        let alpha = 0.0075;
        let c = -f64::ln(alpha);
        let (mut shown, mut clear) = (0, 0);
        for _ in 0..80 {
            let n_arm = rng.u64(1..3000);
            let n_base = rng.u64(1..30_000);
            let arm = Counts {
                k: rng.u64(0..=n_arm / 4),
                n: n_arm,
            };
            let base = Counts {
                k: rng.u64(0..=n_base / 20),
                n: n_base,
            };
            let d = [0.0, 0.01, 0.02, 0.05][rng.usize(0..4)];
            let Some((a, b, lo, hi)) = test.factors(arm, base, d) else {
                panic!("d = {d} leaves rates")
            };
            let brute = (0..=4_000)
                .map(|i| {
                    let p = lo + (hi - lo) * i as f64 / 4_000.0;
                    a(p) + b(p)
                })
                .fold(f64::INFINITY, f64::min);
            let verdict = test.shown_above(arm, base, d, alpha);
            let stat = test.ln_evidence_above(arm, base, d);
            let case = format!("{arm:?} {base:?} d={d}: brute {brute}, statistic {stat}");
            if verdict {
                shown += 1;
                assert!(
                    brute >= c,
                    "shown, but the minimum is below the limit: {case}"
                );
                assert!(stat >= c, "{case}");
            }
            if brute >= c + 0.05 {
                clear += 1;
                assert!(verdict, "clearly shown, not decided: {case}");
            }
            if stat < c {
                assert!(!verdict, "{case}");
            }
            // The search finds the minimum or better than the grid, within a little.
            assert!(stat <= brute + 0.05, "{case}");
        }
        assert!(shown >= 10 && clear >= 10, "{shown} shown, {clear} clear");
    }

    #[test]
    fn the_difference_interval_holds_the_estimate_and_bounds_the_verdicts() {
        let test = Difference {
            arm: Mixture::around(0.02),
            base: Mixture::with_null(),
        };
        let alpha = 0.0075;
        for (arm, base) in [
            (Counts { k: 18, n: 198 }, Counts { k: 0, n: 1000 }),
            (
                Counts { k: 100, n: 10_000 },
                Counts {
                    k: 1000,
                    n: 100_000,
                },
            ),
            (Counts { k: 5, n: 5 }, Counts { k: 0, n: 51 }),
            (Counts { k: 0, n: 40 }, Counts { k: 3, n: 3 }),
        ] {
            let (lo, hi) = test.interval(arm, base, alpha);
            let est = arm.rate() - base.rate();
            assert!(
                lo <= est && est <= hi,
                "{arm:?} {base:?}: [{lo}, {hi}] vs {est}"
            );
            // Every d below the low end is shown exceeded, every d above the high end shown
            // not reached; nothing inside is either.
            assert!(lo <= -1.0 || test.shown_above(arm, base, lo - 1e-3, alpha));
            assert!(hi >= 1.0 || test.shown_below(arm, base, hi + 1e-3, alpha));
            let mid = (lo + hi) / 2.0;
            assert!(!test.shown_above(arm, base, mid, alpha) || mid < lo);
        }
    }

    #[test]
    fn weights_sum_to_one() {
        for m in [Mixture::grid(), Mixture::around(0.02), Mixture::with_null()] {
            let total: f64 = m.parts.iter().map(|(_, w)| w.exp()).sum();
            assert!((total - 1.0).abs() < 1e-12, "{total}");
        }
    }

    #[test]
    fn evidence_matches_a_hand_computed_likelihood_ratio() {
        // One alternative, r = 0.5 at p0 = 0.2: q = 0.6; 3 events in 10 trials.
        // Python: 3*log(0.6/0.2) + 7*log(0.4/0.8) = -1.5562115...
        let one = Mixture {
            parts: vec![(0.5, 0.0)],
        };
        let e = one.ln_evidence_above(3, 10, 0.2);
        assert!(
            (e - (3.0 * 3f64.ln() + 7.0 * 0.5f64.ln())).abs() < 1e-12,
            "{e}"
        );
        // From below, r = 0.5 at p0 = 0.2: q = 0.1.
        let e = one.ln_evidence_below(3, 10, 0.2);
        assert!((e - (3.0 * 0.5f64.ln() + 7.0 * (0.9f64 / 0.8).ln())).abs() < 1e-12);
    }

    /// Each bound is where the evidence reaches 1/alpha, and the evidence is past it beyond.
    #[test]
    fn bounds_are_where_the_evidence_reaches_one_over_alpha() {
        let m = Mixture::around(0.02);
        let alpha: f64 = 0.005;
        let limit = -alpha.ln();
        for &(k, n) in &[
            (1u64, 10u64),
            (5, 10),
            (10, 10),
            (3, 1000),
            (200, 100_000),
            (99_990, 100_000),
        ] {
            let lo = m.lower_bound(k, n, alpha);
            let hi = m.upper_bound(k, n, alpha);
            let p = k as f64 / n as f64;
            assert!(lo <= p && p <= hi, "{k}/{n}: [{lo}, {hi}]");
            if lo > 0.0 && lo < p {
                assert!((m.ln_evidence_above(k, n, lo) - limit).abs() < 1e-6);
                assert!(m.ln_evidence_above(k, n, lo * 0.99) > limit);
            }
            if hi < 1.0 && hi > p {
                assert!((m.ln_evidence_below(k, n, hi) - limit).abs() < 1e-6);
                assert!(m.ln_evidence_below(k, n, hi + (1.0 - hi) * 0.01) > limit);
            }
        }
        assert_eq!(m.lower_bound(0, 100, alpha), 0.0);
        assert_eq!(m.upper_bound(100, 100, alpha), 1.0);
        assert_eq!(
            (m.lower_bound(0, 0, alpha), m.upper_bound(0, 0, alpha)),
            (0.0, 1.0)
        );
    }

    #[test]
    fn bounds_tighten_with_data_and_loosen_with_confidence() {
        let m = Mixture::grid();
        let (a, b) = (
            m.lower_bound(10, 1_000, 0.01),
            m.upper_bound(10, 1_000, 0.01),
        );
        let (c, d) = (
            m.lower_bound(100, 10_000, 0.01),
            m.upper_bound(100, 10_000, 0.01),
        );
        assert!(c > a && d < b);
        let (e, f) = (
            m.lower_bound(10, 1_000, 0.001),
            m.upper_bound(10, 1_000, 0.001),
        );
        assert!(e < a && f > b);
    }

    /// Five failures in five requests put the rate above a 10% ceiling at 99%.
    #[test]
    fn a_run_of_failures_is_quickly_far_from_a_low_rate() {
        let m = Mixture::around(0.02);
        assert!(m.lower_bound(5, 5, 0.0075) > 0.1);
        assert!(m.lower_bound(2, 2, 0.0075) < 0.1);
    }

    #[test]
    fn count_band_is_where_the_evidence_stays_below_one_over_alpha() {
        let m = Mixture::grid();
        let (p0, alpha): (f64, f64) = (0.01, 0.0025);
        let limit = -alpha.ln();
        for n in [0u64, 1, 10, 100, 1_000, 20_000] {
            let (lo, hi) = m.count_band(n, p0, alpha);
            assert!(lo <= hi && hi <= n, "n {n}: [{lo}, {hi}]");
            assert!(m.ln_evidence_above(hi, n, p0) < limit);
            assert!(hi == n || m.ln_evidence_above(hi + 1, n, p0) >= limit);
            assert!(m.ln_evidence_below(lo, n, p0) < limit);
            assert!(lo == 0 || m.ln_evidence_below(lo - 1, n, p0) >= limit);
        }
    }

    /// The guarantee itself, by simulation: the share of seeded runs in which the true rate
    /// is ever ruled out, checked after every trial, stays below alpha for each side.
    #[test]
    fn bounds_hold_under_continuous_monitoring() {
        let m = Mixture::around(0.02);
        let alpha: f64 = 0.05;
        let limit = -alpha.ln();
        let runs = 300;
        let (mut below, mut above) = (0, 0);
        let mut rng = fastrand::Rng::with_seed(19);
        for _ in 0..runs {
            let p = 0.03;
            let (mut k, mut lost_low, mut lost_high) = (0, false, false);
            for n in 1..=2_000u64 {
                k += u64::from(rng.f64() < p);
                // The bound passes p exactly when the evidence at p reaches 1/alpha (the
                // evidence is monotone in p0; bounds_are_where_the_evidence_... checks the
                // bounds against it).
                lost_low |= m.ln_evidence_above(k, n, p) >= limit;
                lost_high |= m.ln_evidence_below(k, n, p) >= limit;
            }
            below += u64::from(lost_low);
            above += u64::from(lost_high);
        }
        // Expected at most 15 of 300 each (alpha); with this seed the counts are fixed.
        assert!(
            below <= 15 && above <= 15,
            "lost: low {below}, high {above} of {runs}"
        );
    }
}
