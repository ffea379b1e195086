//! What the proxy tells a client connection about its requests: which are in progress, and
//! whether bytes moved, for the connection's idle and request-head timeouts (see
//! [`Activity::watch`]); and whether the proxy is stopping.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

/// Whether bytes moved on a connection, whether requests made progress, and how many
/// requests on it are in progress.
#[derive(Debug)]
pub struct Activity {
    /// Changes whenever bytes move or a request ends.
    moves: AtomicU64,
    /// Changes whenever a request begins or ends or bytes are written to the client; not
    /// when bytes only arrive (a request head trickling in is not progress).
    progress: AtomicU64,
    busy: AtomicUsize,
    /// The connection carries HTTP/2: no request-head timeout.
    http2: AtomicBool,
    /// The proxy is stopping: HTTP/1 responses carry `Connection: close`.
    draining: AtomicBool,
}

/// Why a connection's watch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expired {
    /// No request and no bytes for `idle_timeout`: shut down gracefully.
    Idle,
    /// No complete request head for `header_read_timeout`: closed at once.
    Head,
}

/// Only a change of these counters matters, so a plain store (no read-modify-write) is
/// enough, even when two threads race.
fn bump(counter: &AtomicU64) {
    let n = counter.load(Ordering::Relaxed);
    counter.store(n.wrapping_add(1), Ordering::Relaxed);
}

impl Activity {
    /// A connection with nothing in progress yet.
    pub fn new() -> Self {
        Activity {
            moves: AtomicU64::new(0),
            progress: AtomicU64::new(0),
            busy: AtomicUsize::new(0),
            http2: AtomicBool::new(false),
            draining: AtomicBool::new(false),
        }
    }

    /// The proxy is stopping: an HTTP/1 response must tell the client to close the
    /// connection, so the client does not send another request on it.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// The proxy is stopping: from now on [`Activity::draining`] says so.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Whether a request is in progress.
    pub fn busy(&self) -> bool {
        self.busy.load(Ordering::Relaxed) > 0
    }

    /// Whether the connection has carried an HTTP/2 request.
    pub fn is_http2(&self) -> bool {
        self.http2.load(Ordering::Relaxed)
    }

    /// Bytes moved (either way).
    pub fn touch(&self) {
        bump(&self.moves);
    }

    /// Bytes went to the client: activity, and progress (a response is being delivered).
    pub fn wrote(&self) {
        bump(&self.moves);
        bump(&self.progress);
    }

    /// Marks a request in progress until the guard is dropped (end of its response body).
    pub fn begin(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Ordering::Relaxed);
        bump(&self.progress);
        Busy(self.clone())
    }

    /// Notes that the connection speaks HTTP/2 (its requests have no head timeout).
    pub fn http2(&self) {
        if !self.http2.load(Ordering::Relaxed) {
            self.http2.store(true, Ordering::Relaxed);
        }
    }

    /// Resolves when the connection has expired: no request in progress and nothing moved
    /// for `idle` ([`Expired::Idle`]), or, for HTTP/1, no request begun and nothing written
    /// for `head` while none was in progress ([`Expired::Head`]). Each fires between 1 and
    /// 1¼ × its timeout after the last activity; the timer wakes four times per the shorter.
    pub async fn watch(&self, idle: Duration, head: Option<Duration>) -> Expired {
        let step = head.map_or(idle, |h| h.min(idle)) / 4;
        let mut moves = self.moves.load(Ordering::Relaxed);
        let mut progress = self.progress.load(Ordering::Relaxed);
        let mut quiet_since = Instant::now();
        let mut waiting_since = quiet_since;
        loop {
            tokio::time::sleep(step).await;
            let now = Instant::now();
            let busy = self.busy.load(Ordering::Relaxed) > 0;
            let m = self.moves.load(Ordering::Relaxed);
            if m != moves || busy {
                moves = m;
                quiet_since = now;
            } else if now - quiet_since >= idle {
                return Expired::Idle;
            }
            let p = self.progress.load(Ordering::Relaxed);
            if p != progress || busy {
                progress = p;
                waiting_since = now;
            } else if head.is_some_and(|h| now - waiting_since >= h)
                && !self.http2.load(Ordering::Relaxed)
            {
                return Expired::Head;
            }
        }
    }
}

/// A request in progress on a connection (see [`Activity::begin`]).
#[derive(Debug)]
pub struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
        // The idle period, and the wait for the next request head, start when the last
        // request ends.
        self.0.touch();
        bump(&self.0.progress);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Runs `watch` in a task; paused time.
    fn watching(
        a: &Arc<Activity>,
        idle: Duration,
        head: Option<Duration>,
    ) -> tokio::task::JoinHandle<Expired> {
        let a = a.clone();
        tokio::spawn(async move { a.watch(idle, head).await })
    }

    #[tokio::test(start_paused = true)]
    async fn idle_waits_for_silence_since_the_last_activity() {
        let a = Arc::new(Activity::new());
        let start = Instant::now();
        let idle = watching(&a, Duration::from_secs(1), None);
        tokio::time::advance(600 * MS).await;
        a.touch();
        assert_eq!(idle.await.expect("watch task"), Expired::Idle);
        let waited = start.elapsed();
        // Silence since 600 ms: idle after 1 s of it, at most a quarter of that late.
        assert!(
            waited >= 1600 * MS && waited <= 1850 * MS,
            "idle {waited:?} after the start, activity at 600 ms"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_in_progress_is_never_idle() {
        let a = Arc::new(Activity::new());
        let busy = a.begin();
        let idle = watching(&a, Duration::from_secs(1), Some(Duration::from_secs(1)));
        tokio::time::advance(Duration::from_secs(30)).await;
        tokio::task::yield_now().await;
        assert!(
            !idle.is_finished(),
            "expired while a request was in progress"
        );
        drop(busy);
        let ended = Instant::now();
        idle.await.expect("watch task");
        assert!(ended.elapsed() >= 990 * MS);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_head_trickling_in_expires_at_the_head_timeout() {
        let a = Arc::new(Activity::new());
        let start = Instant::now();
        let watch = watching(&a, Duration::from_secs(60), Some(Duration::from_secs(1)));
        // Slowloris: a byte every 100 ms keeps the connection from being idle, not from
        // expiring.
        let trickle = tokio::spawn({
            let a = a.clone();
            async move {
                loop {
                    tokio::time::sleep(100 * MS).await;
                    a.touch();
                }
            }
        });
        assert_eq!(watch.await.expect("watch task"), Expired::Head);
        trickle.abort();
        let waited = start.elapsed();
        assert!(
            waited >= 1000 * MS && waited <= 1250 * MS,
            "head timeout after {waited:?}, expected 1 s to 1.25 s"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_head_timeout_restarts_when_a_response_ends_and_spares_http2() {
        let a = Arc::new(Activity::new());
        let watch = watching(&a, Duration::from_secs(60), Some(Duration::from_secs(1)));
        tokio::time::advance(700 * MS).await;
        let busy = a.begin();
        // Writing a long response to a slow reader is progress, however long it takes.
        for _ in 0..20 {
            tokio::time::advance(300 * MS).await;
            a.wrote();
        }
        drop(busy);
        let ended = Instant::now();
        assert_eq!(watch.await.expect("watch task"), Expired::Head);
        let waited = ended.elapsed();
        assert!(
            waited >= 1000 * MS && waited <= 1250 * MS,
            "head timeout {waited:?} after the response ended"
        );

        let a = Arc::new(Activity::new());
        a.http2();
        let watch = watching(&a, Duration::from_secs(5), Some(Duration::from_secs(1)));
        assert_eq!(
            watch.await.expect("watch task"),
            Expired::Idle,
            "an HTTP/2 connection waits for its idle timeout only"
        );
    }
}
