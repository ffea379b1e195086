//! Prediction drift: per arm, the distribution of a categorical label and of a numeric score
//! read from responses, and how far the canary's distributions are from the baseline's.
//!
//! The label is summarized by counts over a dictionary shared by all arms ([`Labels`]: the
//! first [`MAX_LABELS`] distinct labels, then "other"), the score by a uniform reservoir
//! sample of [`RESERVOIR`] values per arm. [`categorical`] gives the Jensen-Shannon distance
//! and a chi-square test of homogeneity, [`numeric`] the two-sample Kolmogorov-Smirnov
//! statistic and test and the Wasserstein-1 distance. The JS distance and the KS statistic are
//! in `[0, 1]`, 0 for identical distributions; Wasserstein is in the score's unit.
//!
//! A test repeated after every answer would raise false alarms far above its level; so it is
//! run on the doubling schedule of [`check_level`], each run at a share of the budget.

use statrs::distribution::{ChiSquared, ContinuousCDF};

/// At most this many distinct labels are kept; later new labels count as "other".
pub const MAX_LABELS: usize = 32;

/// Score samples kept per arm (uniform reservoir).
pub const RESERVOIR: usize = 2048;

/// The name of the bucket that holds labels past the first [`MAX_LABELS`].
pub const OTHER: &str = "other";

/// The label dictionary shared by all arms (so their counts line up): the first
/// [`MAX_LABELS`] distinct labels seen, then "other".
///
/// A label spelled `"other"` counts in the "other" bucket, so the names stay distinct.
#[derive(Debug, Clone, Default)]
pub struct Labels {
    /// At most [`MAX_LABELS`]: a scan compares fewer bytes than hashing the label would.
    names: Vec<String>,
}

impl Labels {
    /// The id of `label`, adding it while there is room: `0..MAX_LABELS` for a kept label,
    /// `MAX_LABELS` for "other".
    pub fn id(&mut self, label: &str) -> usize {
        if let Some(id) = self.names.iter().position(|n| n == label) {
            return id;
        }
        if label == OTHER || self.names.len() >= MAX_LABELS {
            return MAX_LABELS;
        }
        self.names.push(label.to_owned());
        self.names.len() - 1
    }

    /// The kept labels in id order, then "other".
    pub fn names(&self) -> Vec<String> {
        let mut names = self.names.clone();
        names.push(OTHER.to_owned());
        names
    }

    /// The name of label `id` (`other` past the kept ones).
    pub fn name(&self, id: usize) -> &str {
        self.names.get(id).map_or(OTHER, String::as_str)
    }

    /// How many distinct labels are kept ("other" not counted).
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether no label has been kept yet.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// SplitMix64 (Steele, Lea and Flood, 2014): a small generator whose output for a seed is
/// fixed here, not by a dependency's version.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0), by multiply-shift; the bias, at most n / 2^64, is far below
    /// anything a sample could show.
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }
}

/// One arm's label counts (index = [`Labels`] id, last = other) and score reservoir.
#[derive(Debug, Clone)]
pub struct ArmDistribution {
    counts: [u64; MAX_LABELS + 1],
    total: u64,
    sample: Vec<f64>,
    seen: u64,
    rng: SplitMix64,
}

impl ArmDistribution {
    /// An empty distribution; `seed` fixes the reservoir's replacement choices, so the sample
    /// is a function of the seed and the stream.
    pub fn new(seed: u64) -> Self {
        ArmDistribution {
            counts: [0; MAX_LABELS + 1],
            total: 0,
            sample: Vec::new(),
            seen: 0,
            rng: SplitMix64(seed),
        }
    }

    /// Counts one answer with label `id` (from [`Labels::id`]; a larger id counts as other).
    pub fn record_label(&mut self, id: usize) {
        self.counts[id.min(MAX_LABELS)] += 1;
        self.total += 1;
    }

    /// Adds one score to the reservoir (Vitter's algorithm R: the n-th score replaces a
    /// uniformly chosen kept one with probability `RESERVOIR / n`); a non-finite score is
    /// ignored.
    pub fn record_score(&mut self, x: f64) {
        if !x.is_finite() {
            return;
        }
        self.seen += 1;
        if self.sample.len() < RESERVOIR {
            self.sample.push(x);
            return;
        }
        let j = self.rng.below(self.seen);
        if let Some(slot) = usize::try_from(j).ok().and_then(|j| self.sample.get_mut(j)) {
            *slot = x;
        }
    }

    /// Answers per label id, `MAX_LABELS + 1` of them (the last is other).
    pub fn label_counts(&self) -> &[u64] {
        &self.counts
    }

    /// Answers with a label.
    pub fn labels_total(&self) -> u64 {
        self.total
    }

    /// Finite scores recorded.
    pub fn scores_seen(&self) -> u64 {
        self.seen
    }

    /// The reservoir: up to [`RESERVOIR`] of the scores, a uniform sample of them, in no
    /// particular order.
    pub fn score_sample(&self) -> &[f64] {
        &self.sample
    }
}

/// Categorical drift between two count vectors.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CategoricalDrift {
    /// Jensen-Shannon distance, base 2: the square root of the JS divergence, in `[0, 1]`, 0
    /// for identical distributions.
    pub js_distance: f64,
    /// Chi-square statistic of the test of homogeneity (2 x k table, no continuity
    /// correction).
    pub chi_square: f64,
    /// Degrees of freedom: the columns with a count on either side, minus 1.
    pub dof: u64,
    /// P-value of the chi-square test (1 when `dof` is 0).
    pub p_value: f64,
}

/// Categorical drift between two count vectors indexed alike (a shorter one counts 0 for the
/// ids it lacks): the Jensen-Shannon distance and the chi-square test of homogeneity, columns
/// where both counts are 0 dropped. `None` when either side has no count.
pub fn categorical(a: &[u64], b: &[u64]) -> Option<CategoricalDrift> {
    let na: f64 = a.iter().map(|&x| x as f64).sum();
    let nb: f64 = b.iter().map(|&x| x as f64).sum();
    if na == 0.0 || nb == 0.0 {
        return None;
    }
    let n = na + nb;
    let at = |v: &[u64], i: usize| v.get(i).map_or(0.0, |&x| x as f64);
    let (mut js, mut chi, mut columns) = (0.0, 0.0, 0u64);
    for i in 0..a.len().max(b.len()) {
        let (x, y) = (at(a, i), at(b, i));
        if x == 0.0 && y == 0.0 {
            continue;
        }
        columns += 1;
        let (p, q) = (x / na, y / nb);
        let m = (p + q) / 2.0;
        if p > 0.0 {
            js += p * (p / m).log2();
        }
        if q > 0.0 {
            js += q * (q / m).log2();
        }
        let column = x + y;
        let (ea, eb) = (na * column / n, nb * column / n);
        chi += (x - ea).powi(2) / ea + (y - eb).powi(2) / eb;
    }
    let dof = columns.saturating_sub(1);
    Some(CategoricalDrift {
        js_distance: (js / 2.0).max(0.0).sqrt().min(1.0),
        chi_square: chi,
        dof,
        p_value: chi_square_sf(chi, dof),
    })
}

/// P(X >= x) for X chi-square with `dof` degrees of freedom; 1 for 0 degrees (a single
/// column says nothing).
fn chi_square_sf(x: f64, dof: u64) -> f64 {
    if dof == 0 {
        return 1.0;
    }
    // `new` fails only for a degree count that is not positive and finite.
    ChiSquared::new(dof as f64).map_or(f64::NAN, |d| d.sf(x))
}

/// Numeric drift between two samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NumericDrift {
    /// Two-sample Kolmogorov-Smirnov statistic D: the largest gap between the empirical
    /// distribution functions, in `[0, 1]`.
    pub ks: f64,
    /// P-value of D from the asymptotic Kolmogorov distribution at `sqrt(n m / (n + m)) D`.
    pub p_value: f64,
    /// Wasserstein-1 distance between the empirical distributions (the area between the
    /// distribution functions), in the samples' unit.
    pub wasserstein: f64,
}

/// Numeric drift between two samples (non-finite values left out): the two-sample KS
/// statistic D, its p-value, and the Wasserstein-1 distance. `None` when either is empty.
///
/// The p-value is the asymptotic Kolmogorov distribution's tail at `sqrt(en) D` with the
/// effective size `en = n m / (n + m)` (scipy's `kstwobign.sf(sqrt(en) * D)`). scipy's
/// `ks_2samp(method='asymp')` instead evaluates the exact one-sample distribution at
/// `round(en)`; the asymptotic tail is larger (conservative), by about 3% at `en = 1024` and
/// `p = 0.01`.
pub fn numeric(a: &[f64], b: &[f64]) -> Option<NumericDrift> {
    let sorted = |v: &[f64]| {
        let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
        s.sort_by(f64::total_cmp);
        s
    };
    let (x, y) = (sorted(a), sorted(b));
    if x.is_empty() || y.is_empty() {
        return None;
    }
    let (n, m) = (x.len() as f64, y.len() as f64);
    let (mut i, mut j) = (0, 0);
    let (mut ks, mut wasserstein) = (0.0f64, 0.0);
    let mut last: Option<f64> = None;
    // Walk the pooled values in order; between two of them both distribution functions are
    // flat, so the area between them is a sum of rectangles.
    loop {
        let t = match (x.get(i), y.get(j)) {
            (Some(&u), Some(&v)) => u.min(v),
            (Some(&u), None) => u,
            (None, Some(&v)) => v,
            (None, None) => break,
        };
        if let Some(s) = last {
            wasserstein += (i as f64 / n - j as f64 / m).abs() * (t - s);
        }
        while x.get(i).is_some_and(|&u| u <= t) {
            i += 1;
        }
        while y.get(j).is_some_and(|&v| v <= t) {
            j += 1;
        }
        ks = ks.max((i as f64 / n - j as f64 / m).abs());
        last = Some(t);
    }
    let en = n * m / (n + m);
    Some(NumericDrift {
        ks,
        p_value: kolmogorov_sf(en.sqrt() * ks),
        wasserstein,
    })
}

/// The Kolmogorov distribution's tail, `P(K > x) = 2 sum_{k>=1} (-1)^(k-1) exp(-2 k^2 x^2)`.
/// Below 1 that series converges slowly, so there the CDF's theta-function form is used:
/// `P(K <= x) = sqrt(2 pi) / x sum_{k>=1} exp(-(2k-1)^2 pi^2 / (8 x^2))`.
fn kolmogorov_sf(x: f64) -> f64 {
    use std::f64::consts::PI;
    if x.is_nan() {
        return f64::NAN;
    }
    if x <= 0.0 {
        return 1.0;
    }
    if x < 1.0 {
        let w = -PI * PI / (8.0 * x * x);
        let mut sum = 0.0;
        for k in 1..=20u32 {
            let odd = f64::from(2 * k - 1);
            let term = (odd * odd * w).exp();
            sum += term;
            if term <= 1e-17 * sum {
                break;
            }
        }
        return (1.0 - (2.0 * PI).sqrt() / x * sum).clamp(0.0, 1.0);
    }
    let mut sum = 0.0;
    let mut sign = 1.0;
    for k in 1..=100u32 {
        let k = f64::from(k);
        let term = (-2.0 * k * k * x * x).exp();
        sum += sign * term;
        if term <= 1e-17 * sum {
            break;
        }
        sign = -sign;
    }
    (2.0 * sum).clamp(0.0, 1.0)
}

/// The first canary count at which drift is tested; then at each doubling.
pub const FIRST_CHECK: u64 = 100;

/// When to test drift so that testing repeatedly keeps the false-alarm rate at most `alpha`:
/// only when the canary's count reaches `100 * 2^j` (j = 0, 1, 2, ...), test j at level
/// `alpha / 2^(j+1)` (Bonferroni over a doubling schedule: the levels sum to at most alpha).
///
/// Returns `Some(level)` exactly when `n_before < 100 * 2^j <= n_after` for some j, with the
/// largest such j (a step over several thresholds runs one test, at the last one's level).
pub fn check_level(n_before: u64, n_after: u64, alpha: f64) -> Option<f64> {
    let doublings = n_after / FIRST_CHECK;
    if doublings == 0 {
        return None;
    }
    // The largest j with 2^j <= n_after / 100, so 100 * 2^j <= n_after (no overflow).
    let j = doublings.ilog2();
    let threshold = FIRST_CHECK << j;
    (n_before < threshold).then(|| alpha * 0.5f64.powi(j as i32 + 1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proptest::test_runner::TestRunner;

    fn close(actual: f64, expected: f64, rel: f64) {
        assert!(
            (actual - expected).abs() <= rel * expected.abs().max(f64::MIN_POSITIVE),
            "{actual} != {expected} (relative tolerance {rel})"
        );
    }

    #[test]
    fn labels_overflow_to_other() {
        let mut labels = Labels::default();
        assert!(labels.is_empty());
        for i in 0..MAX_LABELS {
            assert_eq!(labels.id(&format!("l{i}")), i);
        }
        assert_eq!(labels.len(), MAX_LABELS);
        // The 33rd distinct label, and any after it, is "other"; the kept ones keep their id.
        assert_eq!(labels.id("l32"), MAX_LABELS);
        assert_eq!(labels.id("l33"), MAX_LABELS);
        assert_eq!(labels.id("l7"), 7);
        assert_eq!(labels.len(), MAX_LABELS);
        let names = labels.names();
        assert_eq!(names.len(), MAX_LABELS + 1);
        assert_eq!(names[0], "l0");
        assert_eq!(names[MAX_LABELS - 1], "l31");
        assert_eq!(names[MAX_LABELS], "other");
    }

    #[test]
    fn a_label_spelled_other_is_the_other_bucket() {
        let mut labels = Labels::default();
        assert_eq!(labels.id("cat"), 0);
        assert_eq!(labels.id("other"), MAX_LABELS);
        assert_eq!(labels.id("dog"), 1);
        assert_eq!(labels.names(), ["cat", "dog", "other"]);
    }

    #[test]
    fn label_counts_line_up_across_arms() {
        let mut labels = Labels::default();
        let (mut a, mut b) = (ArmDistribution::new(1), ArmDistribution::new(2));
        for l in ["x", "y", "x"] {
            a.record_label(labels.id(l));
        }
        for l in ["y", "z"] {
            b.record_label(labels.id(l));
        }
        b.record_label(MAX_LABELS + 5);
        assert_eq!(a.label_counts().len(), MAX_LABELS + 1);
        assert_eq!(&a.label_counts()[..3], [2, 1, 0]);
        assert_eq!(&b.label_counts()[..3], [0, 1, 1]);
        assert_eq!(b.label_counts()[MAX_LABELS], 1);
        assert_eq!((a.labels_total(), b.labels_total()), (3, 3));
    }

    /// A seeded stream of uniform values in [0, 1).
    fn uniform(seed: u64, n: usize) -> Vec<f64> {
        let mut g = SplitMix64(seed);
        (0..n)
            .map(|_| (g.next() >> 11) as f64 / (1u64 << 53) as f64)
            .collect()
    }

    fn mean(v: &[f64]) -> f64 {
        v.iter().sum::<f64>() / v.len() as f64
    }

    #[test]
    fn the_reservoir_keeps_a_uniform_sample() {
        let stream = uniform(42, 50_000);
        let mut d = ArmDistribution::new(7);
        for (i, &x) in stream.iter().enumerate() {
            d.record_score(x);
            assert_eq!(d.score_sample().len(), (i + 1).min(RESERVOIR));
        }
        d.record_score(f64::NAN);
        d.record_score(f64::INFINITY);
        assert_eq!(d.scores_seen(), 50_000);
        assert_eq!(d.score_sample().len(), RESERVOIR);
        // The sample mean's standard error is 0.29 / sqrt(2048) = 0.0064: 0.03 is over 4.5 of
        // them (and this seed's sample is well inside).
        assert!((mean(d.score_sample()) - mean(&stream)).abs() < 0.03);
        // A rising stream: a sample taken evenly over time has the middle's mean; keeping the
        // first or the last scores would give about 0.02 or 0.98.
        let mut d = ArmDistribution::new(7);
        let n = 50_000;
        for i in 0..n {
            d.record_score(f64::from(i) / f64::from(n));
        }
        assert!((mean(d.score_sample()) - 0.5).abs() < 0.03);
    }

    #[test]
    fn the_reservoir_is_deterministic_for_a_seed() {
        let stream = uniform(3, 10_000);
        let run = |seed| {
            let mut d = ArmDistribution::new(seed);
            for &x in &stream {
                d.record_score(x);
            }
            d.score_sample().to_vec()
        };
        assert_eq!(run(11), run(11));
        assert_ne!(run(11), run(12));
    }

    // References from scipy 1.17.1.

    #[test]
    fn jensen_shannon_against_scipy() {
        let cases: [(&[u64], &[u64], f64); 5] = [
            // jensenshannon([30,10,5,0,2], [25,18,2,0,0], base=2)
            (&[30, 10, 5, 0, 2], &[25, 18, 2, 0, 0], 0.23187394830757313),
            // jensenshannon([90,5,5], [50,25,25], base=2)
            (&[90, 5, 5], &[50, 25, 25], 0.3831358798599423),
            // jensenshannon([1,0], [0,1], base=2)
            (&[1, 0], &[0, 1], 1.0),
            // jensenshannon([10,20,30], [20,40,60], base=2)
            (&[10, 20, 30], &[20, 40, 60], 0.0),
            // jensenshannon([1000,1], [1000,0], base=2)
            (&[1000, 1], &[1000, 0], 0.02235353587686113),
        ];
        for (a, b, js) in cases {
            let d = categorical(a, b).unwrap();
            assert!(
                (d.js_distance - js).abs() < 1e-12,
                "{a:?} {b:?}: {}",
                d.js_distance
            );
            let r = categorical(b, a).unwrap();
            assert!((r.js_distance - js).abs() < 1e-12);
        }
    }

    #[test]
    fn chi_square_against_scipy() {
        // (a, b, chi2_contingency([a', b'], correction=False) statistic, dof, pvalue), where
        // a', b' drop the columns where both are 0 (scipy refuses a zero expected count).
        type Case = (&'static [u64], &'static [u64], f64, u64, f64);
        let cases: [Case; 5] = [
            // chi2_contingency([[30,10,5,2],[25,18,2,0]], correction=False)
            (
                &[30, 10, 5, 0, 2],
                &[25, 18, 2, 0, 0],
                5.9853243683030914,
                3,
                0.11232641357452647,
            ),
            // chi2_contingency([[90,5,5],[50,25,25]], correction=False)
            (
                &[90, 5, 5],
                &[50, 25, 25],
                38.095238095238095,
                2,
                5.342249341743633e-09,
            ),
            // chi2_contingency([[10,20,30],[20,40,60]], correction=False)
            (&[10, 20, 30], &[20, 40, 60], 0.0, 2, 1.0),
            // chi2_contingency([[1000,1],[1000,0]], correction=False)
            (
                &[1000, 1],
                &[1000, 0],
                0.9995004995004997,
                1,
                0.31743140255415264,
            ),
            // chi2_contingency([[400,100],[300,200]], correction=False)
            (
                &[400, 100],
                &[300, 200],
                47.61904761904762,
                1,
                5.176309056990159e-12,
            ),
        ];
        for (a, b, stat, dof, p) in cases {
            let d = categorical(a, b).unwrap();
            assert!(
                (d.chi_square - stat).abs() <= 1e-10 * stat.max(1.0),
                "{a:?}: {}",
                d.chi_square
            );
            assert_eq!(d.dof, dof, "{a:?}");
            close(d.p_value, p, 1e-9);
        }
    }

    #[test]
    fn categorical_edges() {
        assert_eq!(categorical(&[0, 0], &[1, 2]), None);
        assert_eq!(categorical(&[3], &[]), None);
        // One column: nothing to compare.
        let d = categorical(&[5, 0], &[7]).unwrap();
        assert_eq!(
            (d.js_distance, d.chi_square, d.dof, d.p_value),
            (0.0, 0.0, 0, 1.0)
        );
        // A shorter vector counts 0 for what it lacks.
        assert_eq!(
            categorical(&[1, 2], &[3, 4, 0]),
            categorical(&[1, 2, 0], &[3, 4])
        );
    }

    /// scipy: a = [0.61, ...], b = [0.29, ...] below.
    const A: [f64; 25] = [
        0.61, 0.29, 0.06, 0.59, -1.73, -0.74, 0.51, -0.56, 0.39, 1.64, 0.05, -0.06, 0.64, -0.82,
        0.37, 1.77, 1.09, -1.28, 2.36, 1.31, 1.05, -0.32, -0.4, 1.06, -2.47,
    ];
    const B: [f64; 20] = [
        0.29, 0.39, 1.2, 2.1, 0.5, -0.3, 1.5, 0.9, 0.05, 1.31, 2.8, 0.7, -0.1, 1.1, 0.29, 1.9, 0.6,
        3.0, -0.5, 1.0,
    ];

    /// (a, b, D, kstwobign p, ks_2samp(method='asymp') p, wasserstein_distance).
    type KsCase = (Vec<f64>, Vec<f64>, f64, f64, f64, f64);

    fn ks_cases() -> Vec<KsCase> {
        vec![
            // ks_2samp(a, b, method='asymp'); kstwobign.sf(sqrt(25*20/45) * 0.27);
            // wasserstein_distance(a, b). Ties between the samples (0.29, 0.39, 0.05, 1.31).
            (
                A.to_vec(),
                B.to_vec(),
                0.27,
                0.3927307079406542,
                0.3363410676497005,
                0.7201,
            ),
            // x = [(i*37 % 101)/101 for i in range(200)];
            // y = [((i*53 % 97)/97)**2 for i in range(150)]
            (
                (0..200).map(|i| f64::from(i * 37 % 101) / 101.0).collect(),
                (0..150)
                    .map(|i| {
                        let u = f64::from(i * 53 % 97) / 97.0;
                        u * u
                    })
                    .collect(),
                0.27,
                7.47463195579289e-06,
                4.994385823475365e-06,
                0.17596693812223183,
            ),
            // x = [0.0]*5 + [1.0]*5; y = [0.0]*8 + [1.0]*2
            (
                [[0.0; 5], [1.0; 5]].concat(),
                [vec![0.0; 8], vec![1.0; 2]].concat(),
                0.30000000000000004,
                0.7590978384203947,
                0.6639999999999998,
                0.30000000000000004,
            ),
            // x = y = [1.0, 2.0, 3.0]
            (vec![1.0, 2.0, 3.0], vec![3.0, 2.0, 1.0], 0.0, 1.0, 1.0, 0.0),
        ]
    }

    #[test]
    fn ks_and_wasserstein_against_scipy() {
        for (a, b, ks, p_asymptotic, p_scipy_asymp, w) in ks_cases() {
            for (x, y) in [(&a, &b), (&b, &a)] {
                let d = numeric(x, y).unwrap();
                assert!((d.ks - ks).abs() < 1e-15, "{}", d.ks);
                close(d.p_value, p_asymptotic, 1e-9);
                // ks_2samp's 'asymp' is the exact one-sample distribution at round(en): the
                // asymptotic tail is at least as large, and not far off.
                assert!(d.p_value >= p_scipy_asymp && d.p_value <= 1.6 * p_scipy_asymp);
                assert!(
                    (d.wasserstein - w).abs() <= 1e-12 * w.max(1.0),
                    "{}",
                    d.wasserstein
                );
            }
        }
    }

    #[test]
    fn kolmogorov_tail_against_scipy() {
        // kstwobign.sf(x), both sides of the switch between the two series.
        for (x, p) in [
            (0.0, 1.0),
            (0.2, 0.999999999999495),
            (0.5, 0.9639452436648751),
            (0.8, 0.5441424115741981),
            (0.99, 0.2808738392255489),
            (1.0, 0.26999967167735456),
            (1.2, 0.11224966667072497),
            (1.5, 0.022217962616525127),
            (2.0, 0.0006709252557796953),
            (3.0, 3.045995948942526e-08),
            (6.0, 1.0760372320042276e-31),
        ] {
            close(kolmogorov_sf(x), p, 1e-12);
        }
    }

    #[test]
    fn numeric_edges() {
        assert_eq!(numeric(&[], &[1.0]), None);
        assert_eq!(numeric(&[f64::NAN], &[1.0]), None);
        let d = numeric(&[1.0, f64::INFINITY, 2.0], &[2.0, 1.0, f64::NAN]).unwrap();
        assert_eq!((d.ks, d.p_value, d.wasserstein), (0.0, 1.0, 0.0));
        // Disjoint samples: D = 1, and W is the distance between them.
        let d = numeric(&[0.0, 1.0], &[10.0, 11.0]).unwrap();
        assert_eq!((d.ks, d.wasserstein), (1.0, 10.0));
        assert_eq!(numeric(&[-0.0], &[0.0]).map(|d| d.ks), Some(0.0));
    }

    #[test]
    fn identical_samples_do_not_drift() {
        let stream = uniform(5, 5000);
        let (mut a, mut b) = (ArmDistribution::new(1), ArmDistribution::new(1));
        for &x in &stream {
            a.record_score(x);
            b.record_score(x);
        }
        let d = numeric(a.score_sample(), b.score_sample()).unwrap();
        assert_eq!((d.ks, d.p_value, d.wasserstein), (0.0, 1.0, 0.0));
        // Two samples of one distribution: small distance, no evidence of a difference.
        let c = uniform(6, 2000);
        let d = numeric(&stream[..2000], &c).unwrap();
        assert!(d.ks < 0.06 && d.p_value > 0.01, "{d:?}");
    }

    #[test]
    fn the_check_schedule() {
        let alpha = 0.01;
        assert_eq!(check_level(0, 99, alpha), None);
        assert_eq!(check_level(0, 100, alpha), Some(alpha / 2.0));
        assert_eq!(check_level(99, 100, alpha), Some(alpha / 2.0));
        assert_eq!(check_level(100, 101, alpha), None);
        assert_eq!(check_level(100, 199, alpha), None);
        assert_eq!(check_level(199, 200, alpha), Some(alpha / 4.0));
        assert_eq!(check_level(399, 400, alpha), Some(alpha / 8.0));
        // Over several thresholds (200 and 400): one test, at the last one's level.
        assert_eq!(check_level(150, 450, alpha), Some(alpha / 8.0));
        assert_eq!(check_level(400, 400, alpha), None);
        assert_eq!(check_level(500, 300, alpha), None);
        // The last threshold below u64::MAX is 100 * 2^57.
        assert_eq!(check_level(0, u64::MAX, alpha), Some(alpha / 2f64.powi(58)));
        assert_eq!(check_level(100 << 57, u64::MAX, alpha), None);
    }

    #[test]
    fn the_levels_sum_to_at_most_alpha() {
        let alpha = 0.05;
        // Every threshold up to u64::MAX, one at a time.
        let all: f64 = (0..58u32)
            .map(|j| check_level((100u64 << j) - 1, 100u64 << j, alpha).unwrap())
            .sum();
        assert!(all <= alpha && all > alpha * (1.0 - 1e-15), "{all}");
        // Counted one by one: a test exactly at each threshold.
        let mut checks = Vec::new();
        let mut sum = 0.0;
        for n in 0..(100u64 << 12) {
            if let Some(level) = check_level(n, n + 1, alpha) {
                checks.push(n + 1);
                sum += level;
            }
        }
        assert_eq!(checks, (0..=12).map(|j| 100u64 << j).collect::<Vec<_>>());
        assert!(sum <= alpha);
        // In uneven steps: never more than one test per threshold, and still within alpha.
        let mut g = SplitMix64(9);
        let (mut n, mut sum, mut tests) = (0u64, 0.0, 0);
        while n < 10_000_000 {
            let step = 1 + g.below(5000);
            if let Some(level) = check_level(n, n + step, alpha) {
                sum += level;
                tests += 1;
            }
            n += step;
        }
        assert!(sum <= alpha && tests <= 17, "{sum} {tests}");
    }

    fn runner(seed: u8) -> TestRunner {
        crate::analysis::testing::seeded_runner(seed, 256)
    }

    #[test]
    fn categorical_is_symmetric_and_bounded() {
        let counts = || prop::collection::vec(0u64..50, 1..8);
        runner(3)
            .run(&(counts(), counts()), |(a, b)| {
                let (Some(d), Some(r)) = (categorical(&a, &b), categorical(&b, &a)) else {
                    return Ok(());
                };
                prop_assert!((0.0..=1.0).contains(&d.js_distance));
                prop_assert!((d.js_distance - r.js_distance).abs() < 1e-12);
                prop_assert!((d.chi_square - r.chi_square).abs() <= 1e-9 * d.chi_square.max(1.0));
                prop_assert_eq!(d.dof, r.dof);
                prop_assert!((0.0..=1.0).contains(&d.p_value));
                let same = categorical(&a, &a).unwrap();
                prop_assert_eq!(same.js_distance, 0.0);
                prop_assert!(same.p_value > 1.0 - 1e-9);
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn numeric_is_symmetric_and_bounded() {
        let sample = || {
            prop::collection::vec(
                prop::sample::select(vec![-1.0, 0.0, 0.5, 1.0, 2.5, 10.0]),
                1..30,
            )
        };
        runner(4)
            .run(&(sample(), sample()), |(a, b)| {
                let d = numeric(&a, &b).unwrap();
                let r = numeric(&b, &a).unwrap();
                prop_assert!((0.0..=1.0).contains(&d.ks));
                prop_assert_eq!(d.ks, r.ks);
                prop_assert!((0.0..=1.0).contains(&d.p_value));
                prop_assert!(d.wasserstein >= 0.0);
                prop_assert!((d.wasserstein - r.wasserstein).abs() < 1e-12);
                // W is at least D times the smallest gap, and at most the whole range.
                prop_assert!(d.wasserstein <= 11.0 + 1e-12);
                prop_assert!(d.wasserstein >= d.ks * 0.5 - 1e-12);
                Ok(())
            })
            .unwrap();
    }
}
