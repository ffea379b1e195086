//! The routing rule: sticky buckets and the weight table. Pure; no I/O.
//!
//! `bucket = (h mod 100) * 100 + (h div 100) mod 100` where `h` is the MD5 of `salt ++ key`
//! read as a big-endian `u128`. The first factor is the classic `md5(uid) % 100` percentile, so
//! whole-percent splits match the Python routers users migrate from; the second refines it to
//! basis points. Non-baseline arms take consecutive ranges from bucket 0 in config order, the
//! baseline takes the rest, so raising a canary's weight only ever moves users into it.

use std::fmt;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use md5::{Digest, Md5};

/// Number of buckets: weights are in basis points (1% = 100).
pub const BASIS_POINTS: u16 = 10_000;

/// The bucket of a sticky key, in `[0, 10000)`: the MD5 of `salt ++ key` as a big-endian
/// 128-bit integer `h`, then `(h mod 100) * 100 + (h div 100) mod 100`.
pub fn bucket(salt: &[u8], key: &[u8]) -> u16 {
    hash_key(salt, key).0
}

/// The bucket of a sticky key and a 64-bit identity of the key: the digest's high 64 bits,
/// which are independent of the bucket (the sample-ratio guard and the preview sample users by
/// it without hashing again).
pub fn hash_key(salt: &[u8], key: &[u8]) -> (u16, u64) {
    let mut md5 = Md5::new();
    md5.update(salt);
    md5.update(key);
    let h = u128::from_be_bytes(md5.finalize().into());
    // Both factors are < 100, so the bucket is < 10000 and fits in u16.
    (((h % 100) * 100 + (h / 100) % 100) as u16, (h >> 64) as u64)
}

/// A uniformly random bucket, for requests without the sticky header.
pub fn random_bucket() -> u16 {
    fastrand::u16(0..BASIS_POINTS)
}

/// Why a weight table was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WeightError {
    /// The weights do not add up to 100%.
    #[error("weights must sum to 100, they sum to {}", fmt_percent_u32(*.0))]
    BadSum(u32),
    /// The baseline index does not name an arm.
    #[error("baseline index {0} is out of range")]
    NoBaseline(usize),
}

/// Validated weights in basis points, with the bucket ranges precomputed.
///
/// Built once per config/admin change; the data path only calls [`WeightTable::pick`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightTable {
    weights: Vec<u16>,
    baseline: usize,
    /// `(end, arm)` for each non-baseline arm with weight > 0, ends strictly increasing.
    ranges: Vec<(u16, usize)>,
}

impl WeightTable {
    /// Builds a table from per-arm weights (basis points, config order) and the baseline index.
    pub fn new(weights: Vec<u16>, baseline: usize) -> Result<Self, WeightError> {
        if baseline >= weights.len() {
            return Err(WeightError::NoBaseline(baseline));
        }
        let sum: u32 = weights.iter().map(|&w| u32::from(w)).sum();
        if sum != u32::from(BASIS_POINTS) {
            return Err(WeightError::BadSum(sum));
        }
        let mut ranges = Vec::new();
        let mut end = 0u16;
        for (i, &w) in weights.iter().enumerate() {
            if i != baseline && w > 0 {
                end += w;
                ranges.push((end, i));
            }
        }
        Ok(WeightTable {
            weights,
            baseline,
            ranges,
        })
    }

    /// The arm that serves `bucket`.
    #[inline]
    pub fn pick(&self, bucket: u16) -> usize {
        for &(end, arm) in &self.ranges {
            if bucket < end {
                return arm;
            }
        }
        self.baseline
    }

    /// The bucket range `[start, end)` an arm serves (empty for weight 0).
    pub fn range(&self, arm: usize) -> (u16, u16) {
        let mut start = 0u16;
        for &(end, a) in &self.ranges {
            if a == arm {
                return (start, end);
            }
            start = end;
        }
        if arm == self.baseline {
            (start, BASIS_POINTS)
        } else {
            (start, start)
        }
    }

    /// Per-arm weights in basis points.
    pub fn weights(&self) -> &[u16] {
        &self.weights
    }

    /// Index of the baseline arm.
    pub fn baseline(&self) -> usize {
        self.baseline
    }
}

/// How a request's arm was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The override header named the arm.
    Override,
    /// The sticky header's hash bucket.
    Sticky,
    /// No sticky header: a random bucket.
    Random,
    /// The sticky key is listed in `[routing.pins]`.
    Pinned,
}

impl Source {
    /// Lower-case name for logs and the admin API.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Override => "override",
            Source::Sticky => "sticky",
            Source::Random => "random",
            Source::Pinned => "pinned",
        }
    }

    /// Whether the weights chose the arm (sticky or random bucket), rather than the client
    /// (override header) or the operator (a pin).
    pub fn is_split(self) -> bool {
        matches!(self, Source::Sticky | Source::Random)
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The outcome of routing one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Index of the chosen arm.
    pub arm: usize,
    /// The bucket, when one was computed (not for overrides and pins).
    pub bucket: Option<u16>,
    /// How the arm was chosen.
    pub source: Source,
    /// The sticky key's 64-bit identity (see [`hash_key`]), for sticky decisions.
    pub user: Option<u64>,
}

/// The header-facing half of routing: which headers to read and the arm names to match.
#[derive(Debug, Clone)]
pub struct Router {
    sticky_header: HeaderName,
    salt: Box<[u8]>,
    override_header: Option<HeaderName>,
    names: Vec<Box<[u8]>>,
    /// Sticky keys with a fixed arm (`[routing.pins]`), sorted by key for binary search.
    pins: Vec<(Box<[u8]>, usize)>,
}

impl Router {
    /// A router for arms named `names` (config order).
    pub fn new(
        sticky_header: HeaderName,
        salt: &str,
        override_header: Option<HeaderName>,
        names: impl IntoIterator<Item = impl AsRef<str>>,
    ) -> Self {
        Router {
            sticky_header,
            salt: salt.as_bytes().into(),
            override_header,
            names: names
                .into_iter()
                .map(|n| n.as_ref().as_bytes().into())
                .collect(),
            pins: Vec::new(),
        }
    }

    /// Pins sticky keys to arms (arm indices in config order); a later pin of the same key
    /// wins.
    pub fn with_pins(mut self, pins: impl IntoIterator<Item = (impl AsRef<str>, usize)>) -> Self {
        let mut pins: Vec<(Box<[u8]>, usize)> = pins
            .into_iter()
            .map(|(k, arm)| (k.as_ref().as_bytes().into(), arm))
            .collect();
        pins.reverse();
        pins.sort_by(|a, b| a.0.cmp(&b.0));
        pins.dedup_by(|a, b| a.0 == b.0);
        self.pins = pins;
        self
    }

    /// The arm pinned for a sticky key, if any.
    pub fn pinned(&self, key: &[u8]) -> Option<usize> {
        if self.pins.is_empty() {
            return None;
        }
        self.pins
            .binary_search_by(|(k, _)| (**k).cmp(key))
            .ok()
            .map(|i| self.pins[i].1)
    }

    /// Routes a request by its headers (override, then sticky bucket, then random).
    #[inline]
    pub fn decide(&self, table: &WeightTable, headers: &HeaderMap) -> Decision {
        let override_value = self.override_header.as_ref().and_then(|h| headers.get(h));
        self.decide_with(table, headers.get(&self.sticky_header), override_value)
    }

    /// [`Router::decide`] given the request's values of the sticky header and of the override
    /// header (see [`Router::headers`]), for a caller that found them in its own pass over
    /// the headers.
    pub fn decide_with(
        &self,
        table: &WeightTable,
        sticky: Option<&HeaderValue>,
        override_value: Option<&HeaderValue>,
    ) -> Decision {
        if let Some(v) = override_value {
            let v = v.as_bytes();
            if let Some(arm) = self.names.iter().position(|n| **n == *v) {
                return Decision {
                    arm,
                    bucket: None,
                    source: Source::Override,
                    user: None,
                };
            }
        }
        let Some(key) = sticky.map(HeaderValue::as_bytes) else {
            let bucket = random_bucket();
            return Decision {
                arm: table.pick(bucket),
                bucket: Some(bucket),
                source: Source::Random,
                user: None,
            };
        };
        if let Some(arm) = self.pinned(key) {
            return Decision {
                arm,
                bucket: None,
                source: Source::Pinned,
                user: None,
            };
        }
        let (bucket, user) = hash_key(&self.salt, key);
        Decision {
            arm: table.pick(bucket),
            bucket: Some(bucket),
            source: Source::Sticky,
            user: Some(user),
        }
    }

    /// The names of the sticky header and of the override header (if configured).
    pub fn headers(&self) -> (&HeaderName, Option<&HeaderName>) {
        (&self.sticky_header, self.override_header.as_ref())
    }

    /// The bucket of a sticky key under this router's salt.
    pub fn bucket(&self, key: &[u8]) -> u16 {
        bucket(&self.salt, key)
    }

    /// The bucket and identity of a sticky key under this router's salt (see [`hash_key`]).
    pub fn hash_key(&self, key: &[u8]) -> (u16, u64) {
        hash_key(&self.salt, key)
    }
}

/// Formats basis points as a percentage without trailing zeros (`1250` → `12.5`).
pub fn fmt_percent(bp: u16) -> String {
    fmt_percent_u32(u32::from(bp))
}

/// [`fmt_percent`] for sums that may exceed 100%.
pub fn fmt_percent_u32(bp: u32) -> String {
    let (whole, frac) = (bp / 100, bp % 100);
    match frac {
        0 => whole.to_string(),
        f if f % 10 == 0 => format!("{whole}.{}", f / 10),
        f => format!("{whole}.{f:02}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn readme_vectors() {
        assert_eq!(bucket(b"", b"user_123"), 8884);
        assert_eq!(bucket(b"", b"user_456"), 3544);
        assert_eq!(bucket(b"", b"alice"), 83);
        assert_eq!(bucket(b"", b"42"), 7451);
    }

    #[test]
    fn whole_percent_matches_the_python_rule() {
        // int(md5(uid).hexdigest(), 16) % 100 < p, computed from the digest directly.
        for i in 0..2000 {
            let uid = format!("user-{i}");
            let h = u128::from_be_bytes(Md5::digest(uid.as_bytes()).into());
            assert_eq!(u128::from(bucket(b"", uid.as_bytes()) / 100), h % 100);
        }
    }

    #[test]
    fn ranges_follow_config_order_and_baseline_takes_the_rest() {
        // canary-a 5%, stable (baseline) 82.5%, canary-b 12.5%
        let t = WeightTable::new(vec![500, 8250, 1250], 1).expect("valid");
        assert_eq!(t.pick(0), 0);
        assert_eq!(t.pick(499), 0);
        assert_eq!(t.pick(500), 2);
        assert_eq!(t.pick(1749), 2);
        assert_eq!(t.pick(1750), 1);
        assert_eq!(t.pick(9999), 1);
        assert_eq!(t.range(0), (0, 500));
        assert_eq!(t.range(2), (500, 1750));
        assert_eq!(t.range(1), (1750, 10000));
    }

    #[test]
    fn invalid_tables_are_refused() {
        assert_eq!(
            WeightTable::new(vec![9000, 900], 0),
            Err(WeightError::BadSum(9900))
        );
        assert_eq!(
            WeightTable::new(vec![10000], 3),
            Err(WeightError::NoBaseline(3))
        );
    }

    #[test]
    fn raising_canary_weight_never_moves_a_user_out() {
        // Property over every bucket and every pair of weights p < q (in 0.25% steps).
        for p in (0..=10000u16).step_by(25) {
            let low = WeightTable::new(vec![10000 - p, p], 0).expect("valid");
            for q in (p..=10000u16).step_by(250) {
                let high = WeightTable::new(vec![10000 - q, q], 0).expect("valid");
                for b in (0..BASIS_POINTS).step_by(7) {
                    if low.pick(b) == 1 {
                        assert_eq!(high.pick(b), 1, "bucket {b} left canary going {p}->{q}");
                    }
                }
            }
        }
    }

    #[test]
    fn override_then_sticky_then_random() {
        let t = WeightTable::new(vec![9000, 1000], 0).expect("valid");
        let r = Router::new(
            HeaderName::from_static("x-user-id"),
            "",
            Some(HeaderName::from_static("x-canary")),
            ["stable", "canary"],
        );
        let mut h = HeaderMap::new();
        h.insert("x-user-id", HeaderValue::from_static("alice"));
        let d = r.decide(&t, &h);
        assert_eq!((d.arm, d.bucket, d.source), (1, Some(83), Source::Sticky));

        h.insert("x-canary", HeaderValue::from_static("stable"));
        let d = r.decide(&t, &h);
        assert_eq!((d.arm, d.bucket, d.source), (0, None, Source::Override));

        h.insert("x-canary", HeaderValue::from_static("nope"));
        assert_eq!(r.decide(&t, &h).source, Source::Sticky);

        let d = r.decide(&t, &HeaderMap::new());
        assert_eq!(d.source, Source::Random);
        assert!(d.bucket.is_some_and(|b| b < BASIS_POINTS));
    }

    #[test]
    fn salt_changes_assignment() {
        assert_ne!(bucket(b"s1", b"user_123"), bucket(b"", b"user_123"));
        assert_eq!(bucket(b"s1", b"user_123"), bucket(b"", b"s1user_123"));
    }

    #[test]
    fn percent_formatting() {
        assert_eq!(fmt_percent(1250), "12.5");
        assert_eq!(fmt_percent(1000), "10");
        assert_eq!(fmt_percent(1), "0.01");
        assert_eq!(fmt_percent_u32(10250), "102.5");
    }
}
