//! Sliding window of one arm's requests, errors and latencies. Pure; time is passed in.
//!
//! This is the recent view `GET /status` shows per arm (the verdicts come from the analysis,
//! which keeps every outcome since the arm's build, not a window). The window is a ring of
//! [`SLOTS`] time slots with a running total alongside, so the numbers of the whole window cost
//! O(buckets), not O(slots × buckets). Latencies go into the log-linear buckets of
//! [`super::histogram`].

use std::time::Duration;

use tokio::time::Instant;

use super::histogram::{bucket_of, quantile, BUCKETS};

/// Slots per window; the window slides in steps of `window / SLOTS`.
pub const SLOTS: usize = 30;

#[derive(Clone)]
struct Counts {
    requests: u64,
    errors: u64,
    latency: Box<[u32; BUCKETS]>,
}

impl Counts {
    fn new() -> Self {
        Counts {
            requests: 0,
            errors: 0,
            latency: Box::new([0; BUCKETS]),
        }
    }

    fn clear(&mut self) {
        self.requests = 0;
        self.errors = 0;
        self.latency.fill(0);
    }
}

/// Numbers over the current window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WindowStats {
    /// Requests finished in the window.
    pub requests: u64,
    /// Of those, errors.
    pub errors: u64,
    /// `errors / requests`, 0 when empty.
    pub error_rate: f64,
    /// Median latency, if any request.
    pub p50: Option<Duration>,
    /// 99th percentile latency, if any request.
    pub p99: Option<Duration>,
}

/// One arm's sliding window.
pub struct Window {
    length: Duration,
    epoch: Instant,
    slot_width: Duration,
    /// Ring of slots; `ids[i]` is the absolute slot number stored in `slots[i]`.
    slots: Vec<Counts>,
    ids: Vec<u64>,
    total: Counts,
    /// The slot number up to which slots were last expired: nothing more can expire until
    /// the current slot moves on.
    expired_to: u64,
}

impl std::fmt::Debug for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Window")
            .field("length", &self.length())
            .field("requests", &self.total.requests)
            .finish()
    }
}

impl Window {
    /// An empty window of length `length` starting at `now`.
    pub fn new(length: Duration, now: Instant) -> Self {
        let slot_width = (length / SLOTS as u32).max(Duration::from_millis(1));
        Window {
            length,
            epoch: now,
            slot_width,
            slots: vec![Counts::new(); SLOTS],
            ids: vec![u64::MAX; SLOTS],
            expired_to: 0,
            total: Counts::new(),
        }
    }

    /// The window length it was created with.
    pub fn length(&self) -> Duration {
        self.length
    }

    fn slot_id(&self, now: Instant) -> u64 {
        let since = now.saturating_duration_since(self.epoch);
        (since.as_nanos() / self.slot_width.as_nanos().max(1)) as u64
    }

    /// Drops slots that fell out of the window ending at `now`.
    fn expire(&mut self, now: Instant) {
        self.expire_to(self.slot_id(now));
    }

    /// Drops slots that fell out of the window whose newest slot is `current`.
    fn expire_to(&mut self, current: u64) {
        if current == self.expired_to {
            return;
        }
        self.expired_to = current;
        for i in 0..SLOTS {
            let id = self.ids[i];
            if id != u64::MAX && id + (SLOTS as u64) <= current {
                let slot = &mut self.slots[i];
                self.total.requests -= slot.requests;
                self.total.errors -= slot.errors;
                for (t, s) in self.total.latency.iter_mut().zip(slot.latency.iter()) {
                    *t -= *s;
                }
                slot.clear();
                self.ids[i] = u64::MAX;
            }
        }
    }

    /// Records one finished request.
    pub fn record(&mut self, now: Instant, error: bool, latency: Duration) {
        let id = self.slot_id(now);
        self.expire_to(id);
        let i = (id % SLOTS as u64) as usize;
        self.ids[i] = id;
        let b = bucket_of(latency);
        let slot = &mut self.slots[i];
        slot.requests += 1;
        slot.latency[b] += 1;
        self.total.requests += 1;
        self.total.latency[b] += 1;
        if error {
            slot.errors += 1;
            self.total.errors += 1;
        }
    }

    /// The numbers over the window ending at `now`, with latency quantiles.
    pub fn stats(&mut self, now: Instant) -> WindowStats {
        let mut s = self.counts(now);
        s.p50 = quantile(&self.total.latency[..], s.requests, 0.50);
        s.p99 = quantile(&self.total.latency[..], s.requests, 0.99);
        s
    }

    /// Requests, errors and error rate over the window ending at `now`; no quantiles (they
    /// cost a pass over the histogram, and only the latency rules need them).
    pub fn counts(&mut self, now: Instant) -> WindowStats {
        self.expire(now);
        let t = &self.total;
        WindowStats {
            requests: t.requests,
            errors: t.errors,
            error_rate: if t.requests == 0 {
                0.0
            } else {
                t.errors as f64 / t.requests as f64
            },
            p50: None,
            p99: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn counts_and_rates() {
        let t0 = Instant::now();
        let mut w = Window::new(Duration::from_secs(30), t0);
        for i in 0..100 {
            w.record(t0, i % 10 == 0, ms(5));
        }
        let s = w.stats(t0);
        assert_eq!((s.requests, s.errors), (100, 10));
        assert!((s.error_rate - 0.1).abs() < 1e-9);
    }

    #[tokio::test(start_paused = true)]
    async fn old_requests_slide_out() {
        let t0 = Instant::now();
        let mut w = Window::new(Duration::from_secs(30), t0);
        w.record(Instant::now(), true, ms(1));
        tokio::time::advance(Duration::from_secs(15)).await;
        w.record(Instant::now(), false, ms(1));
        assert_eq!(w.stats(Instant::now()).requests, 2);
        tokio::time::advance(Duration::from_secs(16)).await;
        let s = w.stats(Instant::now());
        assert_eq!(
            (s.requests, s.errors),
            (1, 0),
            "the first request is older than 30s"
        );
        tokio::time::advance(Duration::from_secs(15)).await;
        assert_eq!(w.stats(Instant::now()).requests, 0);
    }

    #[test]
    fn quantiles_within_bucket_precision() {
        let t0 = Instant::now();
        let mut w = Window::new(Duration::from_secs(30), t0);
        for i in 1..=1000u64 {
            w.record(t0, false, Duration::from_micros(i * 100)); // 0.1 ms .. 100 ms
        }
        let s = w.stats(t0);
        let p50 = s.p50.expect("p50").as_secs_f64();
        let p99 = s.p99.expect("p99").as_secs_f64();
        assert!((p50 / 0.050 - 1.0).abs() < 0.07, "p50 {p50}");
        assert!((p99 / 0.099 - 1.0).abs() < 0.07, "p99 {p99}");
    }
}
