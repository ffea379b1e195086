//! One downstream connection: served by hyper, closed when idle, drained on shutdown.
//!
//! hyper's `header_read_timeout` only bounds a request head that has started; a keep-alive
//! connection that sends nothing would otherwise hold a `max_connections` slot forever. The
//! socket is wrapped to record when bytes last moved in either direction, and the connection
//! is shut down gracefully after `idle_timeout` of silence — graceful, so a request waiting on a
//! slow upstream (no bytes moving) still completes before the connection closes.
//!
//! Recording activity must cost next to nothing (it happens on every read and write), so it
//! only bumps a counter; the idle timer looks at the counter a few times per `idle_timeout`
//! and closes the connection between `idle_timeout` and 1¼ × `idle_timeout` after the last
//! byte moved.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::proxy::Proxy;

/// Whether bytes moved on a connection, and how many requests on it are in progress.
#[derive(Debug)]
pub struct Activity {
    /// Changes whenever bytes move or a request ends.
    moves: AtomicU64,
    busy: AtomicUsize,
}

impl Activity {
    fn new() -> Self {
        Activity {
            moves: AtomicU64::new(0),
            busy: AtomicUsize::new(0),
        }
    }

    fn touch(&self) {
        // Only a change matters, so a plain store (no read-modify-write) is enough.
        let n = self.moves.load(Ordering::Relaxed);
        self.moves.store(n.wrapping_add(1), Ordering::Relaxed);
    }

    /// Marks a request in progress until the guard is dropped (end of its response body).
    pub fn begin(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Ordering::Relaxed);
        Busy(self.clone())
    }

    /// Resolves once no request is in progress and nothing has moved for `idle`: between
    /// `idle` and 1¼ × `idle` after the last activity. Wakes four times per `idle`.
    async fn idle_for(&self, idle: Duration) {
        let step = idle / 4;
        let mut seen = self.moves.load(Ordering::Relaxed);
        let mut quiet_since = Instant::now();
        loop {
            tokio::time::sleep(step).await;
            let now = self.moves.load(Ordering::Relaxed);
            if now != seen || self.busy.load(Ordering::Relaxed) > 0 {
                seen = now;
                quiet_since = Instant::now();
            } else if quiet_since.elapsed() >= idle {
                return;
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
        // The idle period starts when the last request ends.
        self.0.touch();
    }
}

/// A socket (plain or TLS) that records activity.
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Serves `io` until the client is done, it has been idle for `idle`, or `stop` fires; the
/// last two end it gracefully (in-flight requests finish first).
pub async fn serve<S>(
    builder: &auto::Builder<TokioExecutor>,
    io: S,
    proxy: Proxy,
    idle: Duration,
    mut stop: watch::Receiver<bool>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity::new());
    let io = Tracked {
        inner: io,
        activity: activity.clone(),
    };
    let proxy = Arc::new(proxy.with_activity(activity.clone()));
    let svc = service_fn(move |req| proxy.clone().serve(req));
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    let mut conn = pin!(conn);
    // Either ends the connection gracefully: idle too long, or the proxy is stopping.
    let mut trigger = pin!(async {
        tokio::select! {
            _ = activity.idle_for(idle) => {}
            _ = stop.changed() => {}
        }
    });
    // The connection task wakes for every socket event; the trigger is polled only when its
    // own timer or signal woke it.
    let wake = Arc::new(TriggerWake::default());
    let trigger_waker = Waker::from(wake.clone());
    let mut closing = false;
    // The task's waker as last handed to `wake`; the shared copy is locked only when it changes.
    let mut task: Option<Waker> = None;
    poll_fn(|cx| {
        if !closing {
            if !task.as_ref().is_some_and(|t| t.will_wake(cx.waker())) {
                task = Some(cx.waker().clone());
                wake.set_task(cx.waker());
            }
            if wake.woken.swap(false, Ordering::AcqRel)
                && trigger
                    .as_mut()
                    .poll(&mut Context::from_waker(&trigger_waker))
                    .is_ready()
            {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
        }
        conn.as_mut().poll(cx)
    })
    .await
}

/// The waker of a connection's shutdown trigger: notes that the trigger has something to
/// look at, and wakes the connection task.
struct TriggerWake {
    woken: AtomicBool,
    task: Mutex<Option<Waker>>,
}

impl Default for TriggerWake {
    fn default() -> Self {
        TriggerWake {
            // The trigger has never been polled: it must be, once.
            woken: AtomicBool::new(true),
            task: Mutex::new(None),
        }
    }
}

impl TriggerWake {
    fn set_task(&self, waker: &Waker) {
        *self.task.lock().unwrap_or_else(PoisonError::into_inner) = Some(waker.clone());
    }
}

impl Wake for TriggerWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        let task = self.task.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(t) = task.as_ref() {
            t.wake_by_ref();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_for_waits_for_silence_since_the_last_activity() {
        let a = Arc::new(Activity::new());
        let start = Instant::now();
        let idle = tokio::spawn({
            let a = a.clone();
            async move { a.idle_for(Duration::from_secs(1)).await }
        });
        tokio::time::advance(Duration::from_millis(600)).await;
        a.touch();
        idle.await.expect("idle task");
        let waited = start.elapsed();
        // Silence since 600 ms: idle after 1 s of it, at most a quarter of that late.
        assert!(
            waited >= Duration::from_millis(1600) && waited <= Duration::from_millis(1850),
            "idle {waited:?} after the start, activity at 600 ms"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_in_progress_is_never_idle() {
        let a = Arc::new(Activity::new());
        let busy = a.begin();
        let idle = tokio::spawn({
            let a = a.clone();
            async move { a.idle_for(Duration::from_secs(1)).await }
        });
        tokio::time::advance(Duration::from_secs(30)).await;
        tokio::task::yield_now().await;
        assert!(!idle.is_finished(), "idle while a request was in progress");
        drop(busy);
        let ended = Instant::now();
        idle.await.expect("idle task");
        assert!(ended.elapsed() >= Duration::from_millis(990));
    }
}
