//! One finished request's outcome, and the bounded channel that carries outcomes from the
//! data path to the rollback circuit without ever making a request wait.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

/// Outcomes buffered before the data path starts dropping them (counted in metrics).
pub const CHANNEL_CAPACITY: usize = 16_384;
/// Every this many outcomes of watched arms wake the task: a canary's window is checked
/// within this many of its requests even when they succeed (the relative rules can be met by
/// the baseline's traffic, the latency rules by slow successes).
pub const WAKE_AFTER: usize = 4;
/// One finished request, as the windows see it.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Arm that served it.
    pub arm: Arc<str>,
    /// Whether the circuit watches that arm (every arm but the baseline): these outcomes
    /// count towards [`WAKE_AFTER`].
    pub watched: bool,
    /// Error status or failure to get a response.
    pub error: bool,
    /// Time to response headers (or to the proxy's error).
    pub latency: Duration,
    /// When it finished.
    pub at: Instant,
    /// How its arm was chosen.
    pub routed: Routed,
}

/// How a request's arm was chosen, as the analysis and the sample-ratio guard see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routed {
    /// By the weights of snapshot `generation`: `user` is the sticky key's identity, `None`
    /// for a random bucket.
    Split {
        /// The snapshot whose table routed it.
        generation: u64,
        /// The request's bucket.
        bucket: u16,
        /// The sticky key's identity ([`crate::routing::hash_key`]).
        user: Option<u64>,
    },
    /// Forced by the override header, or answered by the baseline after a failover: part of
    /// the analysis, not of the split.
    Forced,
    /// A pinned user (`[routing.pins]`): neither part of the analysis nor of the split.
    Pinned,
}

impl Routed {
    /// How `decision`, taken on the table of snapshot `generation`, routed.
    pub fn of(decision: &crate::routing::Decision, generation: u64) -> Self {
        use crate::routing::Source;
        match (decision.source, decision.bucket) {
            (Source::Sticky | Source::Random, Some(bucket)) => Routed::Split {
                generation,
                bucket,
                user: decision.user,
            },
            (Source::Pinned, _) => Routed::Pinned,
            _ => Routed::Forced,
        }
    }
}

/// Sending half, held by the proxy.
#[derive(Debug, Clone)]
pub struct OutcomeSender {
    tx: mpsc::Sender<Outcome>,
    wake: Arc<Wake>,
}

impl OutcomeSender {
    /// Queues `o` for the circuit task without waiting. An error of a watched arm, and every
    /// [`WAKE_AFTER`]th outcome of one, also wakes the task if it is waiting for its next
    /// batch.
    pub fn try_send(&self, o: Outcome) -> Result<(), TrySendError<Outcome>> {
        let (error, watched) = (o.error, o.watched);
        self.tx.try_send(o)?;
        if watched {
            let n = self
                .wake
                .watched
                .fetch_add(1, Ordering::Relaxed)
                .wrapping_add(1);
            if error || n % WAKE_AFTER == 0 {
                self.wake.notify.notify_one();
            }
        }
        Ok(())
    }

    /// Outcomes sent and not yet taken by the circuit task.
    pub fn backlog(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }
}

/// Receiving half, owned by the circuit task.
#[derive(Debug)]
pub struct OutcomeReceiver {
    pub(crate) rx: mpsc::Receiver<Outcome>,
    pub(crate) wake: Arc<Wake>,
}

/// How the data path wakes the circuit task between its timed batches.
#[derive(Debug, Default)]
pub(crate) struct Wake {
    pub(crate) notify: Notify,
    /// Outcomes of watched arms sent so far (wrapping).
    watched: AtomicUsize,
}

/// Creates the outcome channel.
pub fn channel() -> (OutcomeSender, OutcomeReceiver) {
    let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
    let wake = Arc::new(Wake::default());
    (
        OutcomeSender {
            tx,
            wake: wake.clone(),
        },
        OutcomeReceiver { rx, wake },
    )
}
