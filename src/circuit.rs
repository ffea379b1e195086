//! Per-arm sliding windows fed by request outcomes, off the data path.
//!
//! The proxy sends one [`Outcome`] per finished request with `try_send` on a bounded channel:
//! it never waits. A single task owns the updates; `/status` reads the windows under a short
//! lock the data path never takes.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::control::Control;
use crate::window::{Window, WindowStats};

/// Outcomes buffered before the data path starts dropping them (counted in metrics).
pub const CHANNEL_CAPACITY: usize = 16_384;

/// One finished request, as the windows see it.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Arm that served it.
    pub arm: Arc<str>,
    /// Error status or failure to get a response.
    pub error: bool,
    /// Time to response headers (or to the proxy's error).
    pub latency: Duration,
    /// When it finished.
    pub at: Instant,
}

/// Sending half, held by the proxy.
pub type OutcomeSender = mpsc::Sender<Outcome>;

/// The windows of every arm.
#[derive(Debug, Default)]
pub struct Windows {
    inner: Mutex<HashMap<Arc<str>, Window>>,
}

impl Windows {
    /// Stats of every arm that has a window, as of `now`.
    pub fn stats(&self, now: Instant) -> BTreeMap<String, WindowStats> {
        let mut arms = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        arms.iter_mut()
            .map(|(name, w)| (name.to_string(), w.stats(now)))
            .collect()
    }

    /// Records a batch; windows are (re)created when `length` changes.
    fn record(&self, batch: &[Outcome], length: Duration) {
        let mut arms = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        for o in batch {
            let w = arms
                .entry(o.arm.clone())
                .or_insert_with(|| Window::new(length, o.at));
            if w.length() != length {
                *w = Window::new(length, o.at);
            }
            w.record(o.at, o.error, o.latency);
        }
    }
}

/// Creates the outcome channel.
pub fn channel() -> (OutcomeSender, mpsc::Receiver<Outcome>) {
    mpsc::channel(CHANNEL_CAPACITY)
}

/// Runs the window task until every sender is gone.
pub fn spawn(
    control: Arc<Control>,
    windows: Arc<Windows>,
    mut rx: mpsc::Receiver<Outcome>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut batch = Vec::with_capacity(256);
        while rx.recv_many(&mut batch, 256).await > 0 {
            let length = control.snapshot().config.rollback.window;
            windows.record(&batch, length);
            batch.clear();
        }
    })
}
