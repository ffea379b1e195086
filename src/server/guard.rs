//! What ends a client connection, or begins to end it: its request-head and idle timeouts
//! and the proxy's stop signal, watched for whichever side (canaryd's HTTP/1.1 server or
//! hyper) serves it.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use crate::proxy::activity::{Activity, Expired};

/// What ends, or begins to end, a connection (see [`Guard::poll_event`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Event {
    /// No complete request head in time: close at once.
    Head,
    /// Idle too long: close once no request is in progress.
    Idle,
    /// The proxy is stopping; the connection is now draining, and lingering if it was idle
    /// (an HTTP/1 connection with no request in progress).
    Stop,
    /// The linger after a stop is over: close once no request is in progress.
    LingerOver,
}

/// Watches a connection's timeouts and the proxy's stop signal, for whichever side (canaryd's
/// HTTP/1.1 server or hyper) serves it. The connection task wakes for every socket event; the
/// trigger is polled only when its own timer or signal woke it.
pub(crate) struct Guard<'a> {
    /// `None` once it fired.
    trigger: Option<Pin<Box<dyn Future<Output = Option<Expired>> + Send + 'a>>>,
    wake: Arc<TriggerWake>,
    trigger_waker: Waker,
    /// The task's waker as last handed to `wake`; the shared copy is locked only when it
    /// changes.
    task: Option<Waker>,
    activity: Arc<Activity>,
    drain_linger: Duration,
    linger: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<'a> Guard<'a> {
    pub(crate) fn new(
        trigger: Pin<Box<dyn Future<Output = Option<Expired>> + Send + 'a>>,
        activity: Arc<Activity>,
        drain_linger: Duration,
    ) -> Self {
        let wake = Arc::new(TriggerWake::default());
        Guard {
            trigger: Some(trigger),
            trigger_waker: Waker::from(wake.clone()),
            wake,
            task: None,
            activity,
            drain_linger,
            linger: None,
        }
    }

    /// The next event, if one is due. Each is reported once; after [`Event::Head`] or
    /// [`Event::Idle`] nothing more is.
    pub(crate) fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Event> {
        if let Some(trigger) = &mut self.trigger {
            if !self.task.as_ref().is_some_and(|t| t.will_wake(cx.waker())) {
                self.task = Some(cx.waker().clone());
                self.wake.set_task(cx.waker());
            }
            if self.wake.woken.swap(false, Ordering::AcqRel) {
                if let Poll::Ready(why) = trigger
                    .as_mut()
                    .poll(&mut Context::from_waker(&self.trigger_waker))
                {
                    self.trigger = None;
                    return Poll::Ready(match why {
                        Some(Expired::Head) => Event::Head,
                        Some(Expired::Idle) => Event::Idle,
                        None => {
                            self.activity.set_draining();
                            let idle = !self.activity.busy();
                            if idle && !self.activity.is_http2() {
                                self.linger = Some(Box::pin(tokio::time::sleep(self.drain_linger)));
                            }
                            Event::Stop
                        }
                    });
                }
            }
        }
        if let Some(linger) = &mut self.linger {
            if linger.as_mut().poll(cx).is_ready() {
                self.linger = None;
                return Poll::Ready(Event::LingerOver);
            }
        }
        Poll::Pending
    }

    /// The proxy is stopping: no further request on this connection.
    pub(crate) fn draining(&self) -> bool {
        self.activity.draining()
    }

    /// Stopping, and the linger for a request already on its way is not over.
    pub(crate) fn lingering(&self) -> bool {
        self.linger.is_some()
    }
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
