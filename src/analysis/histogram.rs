//! Log-linear latency buckets shared by the sliding windows and the analysis: exact below
//! 16 µs, then 16 sub-buckets per power of two up to 2^26 µs (67 s), so a bucket's width is at
//! most 6.25% of its value. Every bucket has known edges, which is what lets the analysis turn
//! "the k-th largest latency" into a bound that holds for the true value.

use std::time::Duration;

/// Number of buckets.
pub const BUCKETS: usize = 16 + 23 * 16;

/// The bucket a latency falls in.
pub fn bucket_of(d: Duration) -> usize {
    let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1);
    if us < 16 {
        return us as usize;
    }
    let octave = 63 - us.leading_zeros() as usize; // >= 4
    let sub = ((us >> (octave - 4)) & 15) as usize;
    (16 + (octave - 4) * 16 + sub).min(BUCKETS - 1)
}

/// Edges of a bucket in microseconds: every latency in it is in `[low, high)` (the last
/// bucket also holds everything beyond 67 s: its high edge is infinite).
pub fn bucket_edges_us(b: usize) -> (f64, f64) {
    if b < 16 {
        return (b as f64, b as f64 + 1.0);
    }
    let octave = (b - 16) / 16 + 4;
    let sub = ((b - 16) % 16) as u64;
    let lo = (16 + sub) << (octave - 4);
    let hi = (17 + sub) << (octave - 4);
    if b == BUCKETS - 1 {
        return (lo as f64, f64::INFINITY);
    }
    (lo as f64, hi as f64)
}

/// Midpoint of a bucket, in microseconds (the value a quantile estimate reports).
fn bucket_mid_us(b: usize) -> f64 {
    let (lo, hi) = bucket_edges_us(b);
    if hi.is_finite() {
        (lo + hi) / 2.0
    } else {
        lo
    }
}

/// The `q` quantile of `total` latencies counted in `hist`, at its bucket's midpoint.
pub fn quantile<T: Copy + Into<u64>>(hist: &[T], total: u64, q: f64) -> Option<Duration> {
    if total == 0 {
        return None;
    }
    let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
    let mut seen = 0u64;
    for (b, &n) in hist.iter().enumerate() {
        seen += n.into();
        if seen >= rank {
            return Some(Duration::from_nanos((bucket_mid_us(b) * 1000.0) as u64));
        }
    }
    None
}

/// The bucket of the `k`-th largest of the latencies counted in `hist` (`k` from 1), if there
/// are that many.
pub fn kth_largest<T: Copy + Into<u64>>(hist: &[T], k: u64) -> Option<usize> {
    if k == 0 {
        return None;
    }
    let mut seen = 0u64;
    for (b, &n) in hist.iter().enumerate().rev() {
        seen += n.into();
        if seen >= k {
            return Some(b);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_their_edges_hold_their_values() {
        let mut last = 0;
        for us in 1..2_000_000u64 {
            let b = bucket_of(Duration::from_micros(us));
            assert!(b >= last);
            last = b;
            let (lo, hi) = bucket_edges_us(b);
            assert!(
                lo <= us as f64 && (us as f64) < hi,
                "{us} µs in bucket {b} [{lo}, {hi})"
            );
            assert!(
                hi - lo <= (lo * 0.0625).max(1.0),
                "bucket {b} is wider than 6.25%"
            );
        }
        assert_eq!(bucket_of(Duration::from_secs(3600)), BUCKETS - 1);
        assert_eq!(bucket_edges_us(BUCKETS - 1).1, f64::INFINITY);
    }

    #[test]
    fn kth_largest_counts_from_the_top() {
        let mut hist = [0u64; BUCKETS];
        for us in [100u64, 200, 200, 5_000] {
            hist[bucket_of(Duration::from_micros(us))] += 1;
        }
        let at = |k| kth_largest(&hist, k).map(|b| bucket_edges_us(b).0);
        assert_eq!(at(1), Some(4864.0));
        assert_eq!(at(2), Some(200.0));
        assert_eq!(at(3), Some(200.0));
        assert_eq!(at(4), Some(100.0));
        assert_eq!(at(5), None);
        assert_eq!(at(0), None);
    }
}
