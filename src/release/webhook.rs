//! Webhooks: Flagger's hook types, called off the data path.
//!
//! Each receiver (a distinct [`WebhookConfig`]) gets one worker task, spawned on first use,
//! with a bounded queue of [`QUEUE_LEN`] calls. Calls to one receiver go out one at a time in
//! the order they were made, gates and notifications alike, so a receiver sees every webhook
//! in order. Nothing waits on a queue: [`Webhooks::notify`] puts a call in with `try_send` and
//! returns, and a full queue drops the notification (counted `dropped`) or answers a gate
//! `false`. A dead receiver therefore costs at most one full queue of memory and never blocks
//! the rollout.
//!
//! Every attempt (connect, request, response headers, and reading up to
//! [`MAX_RESPONSE_BODY`] bytes of the response) is bounded by the hook's `timeout`. A
//! notification that fails (non-2xx, connection error, timeout) is retried `retries` times,
//! the first retry after the backoff's first delay ([`DEFAULT_FIRST_RETRY`] unless set),
//! doubling per retry up to [`MAX_RETRY_DELAY`]. A gate is one attempt, and its asker waits
//! at most the hook's `timeout × (retries + 2)` (at most [`MAX_GATE_WAIT`]) for the calls
//! ahead of it and its own: past that it answers `false`, and a gate whose asker gave up is
//! not sent (counted `dropped`).
//!
//! With a `secret_file`, every call carries `x-canaryd-signature: sha256=<hex>`, the
//! HMAC-SHA256 of the exact body keyed with the file's content, surrounding whitespace
//! trimmed (as GitHub signs its hooks). The file is read at each call, so a rotated secret
//! takes effect at once; a file that cannot be read (or is empty) fails the call: a call is
//! never sent unsigned when a secret is configured.
//!
//! The list of hooks is passed to every call (the whole configured list, as reloads change
//! it): a receiver no longer in the list has its worker stopped, and its queued calls are
//! dropped (counted) rather than sent, so an old and a new version of one hook never send to
//! the same receiver out of order.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http::header::{CONTENT_TYPE, USER_AGENT};
use http::uri::Scheme;
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde::Serialize;
use sha2::Sha256;
use tokio::runtime::Handle;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{HookEvent, UpstreamConfig, UpstreamTls, WebhookConfig};
use crate::metrics::Metrics;
use crate::upstream::error::chain;

/// Calls one receiver's queue holds; more are dropped (notifications) or refused (gates).
pub const QUEUE_LEN: usize = 64;

/// The first retry delay of a failed notification; it doubles per retry.
pub const DEFAULT_FIRST_RETRY: Duration = Duration::from_millis(500);

/// The longest delay between two attempts of a notification.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(30);

/// The longest a gate waits for its answer, whatever the hook's timeout and retries.
pub const MAX_GATE_WAIT: Duration = Duration::from_secs(300);

/// Response body bytes read (and discarded) before the connection is given up.
pub const MAX_RESPONSE_BODY: usize = 64 * 1024;

/// The header that carries the body's HMAC-SHA256 when the hook has a `secret_file`.
pub const SIGNATURE_HEADER: &str = "x-canaryd-signature";

const USER_AGENT_VALUE: &str = concat!("canaryd/", env!("CARGO_PKG_VERSION"));

/// How long pooled connections to receivers stay open between calls.
const POOL_IDLE: Duration = Duration::from_secs(30);

/// Bounds a connect the per-call timeout abandoned but the pool finishes in the background.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// What a webhook receives, serialised as JSON: `{name, event, phase, upstream, step,
/// weight, message, timestamp, verdicts, metadata}` (`metadata` is the receiving hook's).
#[derive(Debug, Clone, PartialEq)]
pub struct Payload {
    /// The release's name (the released upstream's name).
    pub name: String,
    /// The hook type, serialised as [`HookEvent::as_str`].
    pub event: HookEvent,
    /// The rollout's phase after what happened: `idle`, `progressing`, `paused`, `waiting`,
    /// `succeeded` or `failed`.
    pub phase: String,
    /// The arm being released.
    pub upstream: String,
    /// The rollout's step, from 1; 0 before the first step.
    pub step: usize,
    /// The arm's weight, in percent.
    pub weight: f64,
    /// What happened, for people.
    pub message: String,
    /// When, in unix milliseconds (serialised as `timestamp`).
    pub timestamp_ms: u64,
    /// Per-metric verdicts, passed through as is.
    pub verdicts: serde_json::Value,
}

/// The JSON form of a [`Payload`] for one receiver.
#[derive(Serialize)]
struct Wire<'a> {
    name: &'a str,
    event: &'static str,
    phase: &'a str,
    upstream: &'a str,
    step: usize,
    weight: f64,
    message: &'a str,
    timestamp: u64,
    verdicts: &'a serde_json::Value,
    metadata: &'a BTreeMap<String, String>,
}

impl Payload {
    fn body(&self, event: HookEvent, metadata: &BTreeMap<String, String>) -> Option<Bytes> {
        let wire = Wire {
            name: &self.name,
            event: event.as_str(),
            phase: &self.phase,
            upstream: &self.upstream,
            step: self.step,
            weight: self.weight,
            message: &self.message,
            timestamp: self.timestamp_ms,
            verdicts: &self.verdicts,
            metadata,
        };
        match serde_json::to_vec(&wire) {
            Ok(v) => Some(Bytes::from(v)),
            Err(e) => {
                // Only a map with non-string keys fails, which these types cannot hold.
                tracing::warn!(event = event.as_str(), error = %e, "cannot serialise webhook payload");
                None
            }
        }
    }
}

/// Why one attempt failed.
#[derive(Debug, thiserror::Error)]
enum AttemptError {
    #[error("cannot read secret file {}: {source}", path.display())]
    Secret {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("secret file {} is empty", path.display())]
    EmptySecret { path: PathBuf },
    #[error("invalid HMAC key: {0}")]
    Key(#[source] hmac::digest::InvalidLength),
    #[error("invalid request: {0}")]
    Request(#[source] http::Error),
    #[error("https is unavailable: {0}")]
    NoTls(String),
    #[error("{}", chain(.0))]
    Http(#[source] hyper_util::client::legacy::Error),
    #[error("answered {0}")]
    Status(StatusCode),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

impl AttemptError {
    /// The metric's `result` label.
    fn result(&self) -> &'static str {
        match self {
            AttemptError::Timeout(_) => "timeout",
            AttemptError::Secret { .. }
            | AttemptError::EmptySecret { .. }
            | AttemptError::Key(_)
            | AttemptError::Request(_)
            | AttemptError::NoTls(_)
            | AttemptError::Http(_)
            | AttemptError::Status(_) => "failure",
        }
    }
}

/// The HTTP client every worker shares (one connection pool).
enum Transport {
    /// http:// and https://.
    Any(Client<HttpsConnector<HttpConnector>, Full<Bytes>>),
    /// http:// only: the TLS client config could not be built (the reason).
    Plain(Client<HttpConnector, Full<Bytes>>, String),
}

impl Transport {
    fn new() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE)
            .pool_max_idle_per_host(2);
        // The upstreams' client config: system roots, ring, safe protocol versions.
        let probe = UpstreamConfig {
            name: "webhook".to_owned(),
            url: Uri::from_static("https://webhook.invalid"),
            weight_bp: 0,
            connect_timeout: CONNECT_TIMEOUT,
            http2: false,
            max_connections: 1,
            tls: UpstreamTls::default(),
            warmup: None,
        };
        let tls = match crate::tls::client_config(&probe) {
            Ok(Some(tls)) => tls,
            Ok(None) => return Transport::Plain(builder.build(connector), "no TLS config".into()),
            Err(e) => {
                tracing::warn!(error = %e, "webhooks: no TLS client config; https:// hooks will fail");
                return Transport::Plain(builder.build(connector), e.to_string());
            }
        };
        connector.enforce_http(false);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config((*tls).clone())
            .https_or_http()
            .enable_http1()
            .wrap_connector(connector);
        Transport::Any(builder.build(https))
    }

    async fn send(&self, req: Request<Full<Bytes>>) -> Result<Response<Incoming>, AttemptError> {
        match self {
            Transport::Any(client) => client.request(req).await.map_err(AttemptError::Http),
            Transport::Plain(client, why) => {
                if req.uri().scheme() == Some(&Scheme::HTTPS) {
                    return Err(AttemptError::NoTls(why.clone()));
                }
                client.request(req).await.map_err(AttemptError::Http)
            }
        }
    }
}

/// `sha256=<lowercase hex HMAC-SHA256 of body keyed with key>`.
fn signature(key: &[u8], body: &[u8]) -> Result<String, AttemptError> {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    // HMAC takes keys of any length (hashed when longer than a block), so this never fails.
    let mut mac = Hmac::<Sha256>::new_from_slice(key).map_err(AttemptError::Key)?;
    mac.update(body);
    let tag = mac.finalize().into_bytes();
    let mut out = String::with_capacity(7 + 2 * tag.len());
    out.push_str("sha256=");
    for b in tag {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    Ok(out)
}

/// How long a gate's asker waits for its answer: `timeout × (retries + 2)`, at most
/// [`MAX_GATE_WAIT`] — room for its own attempt and the calls ahead of it.
fn gate_wait(hook: &WebhookConfig) -> Duration {
    hook.timeout
        .checked_mul(hook.retries.saturating_add(2))
        .map_or(MAX_GATE_WAIT, |d| d.min(MAX_GATE_WAIT))
}

/// What the worker does with a call.
enum Kind {
    /// Sent with retries; nobody waits for it.
    Notify,
    /// Sent once; 2xx or not goes back to the asker.
    Ask(oneshot::Sender<bool>),
}

/// One queued call.
struct Call {
    event: HookEvent,
    body: Bytes,
    kind: Kind,
}

/// What every worker shares.
struct Shared {
    metrics: Arc<Metrics>,
    transport: Transport,
    first_retry: Duration,
}

impl Shared {
    /// One attempt, bounded by the hook's timeout.
    async fn attempt(&self, hook: &WebhookConfig, body: &Bytes) -> Result<(), AttemptError> {
        let call = async {
            let mut req = Request::builder()
                .method(Method::POST)
                .uri(hook.url.clone())
                .header(CONTENT_TYPE, "application/json")
                .header(USER_AGENT, USER_AGENT_VALUE);
            if let Some(path) = &hook.secret_file {
                let raw = tokio::fs::read(path)
                    .await
                    .map_err(|source| AttemptError::Secret {
                        path: path.clone(),
                        source,
                    })?;
                let key = raw.trim_ascii();
                if key.is_empty() {
                    return Err(AttemptError::EmptySecret { path: path.clone() });
                }
                req = req.header(SIGNATURE_HEADER, signature(key, body)?);
            }
            let req = req
                .body(Full::new(body.clone()))
                .map_err(AttemptError::Request)?;
            let resp = self.transport.send(req).await?;
            let status = resp.status();
            discard_body(resp.into_body()).await;
            if status.is_success() {
                Ok(())
            } else {
                Err(AttemptError::Status(status))
            }
        };
        match tokio::time::timeout(hook.timeout, call).await {
            Ok(r) => r,
            Err(_) => Err(AttemptError::Timeout(hook.timeout)),
        }
    }

    /// A notification: the first attempt and up to `retries` more, with backoff.
    async fn notify(&self, hook: &WebhookConfig, event: HookEvent, body: &Bytes) {
        let mut delay = self.first_retry;
        let mut attempt: u32 = 0;
        loop {
            let r = self.attempt(hook, body).await;
            let result = r.as_ref().map_or_else(AttemptError::result, |()| "success");
            self.metrics.webhook_call(event.as_str(), result);
            let Err(e) = r else { return };
            attempt += 1;
            if attempt > hook.retries {
                tracing::warn!(url = %hook.url, event = event.as_str(), attempts = attempt,
                    reason = %e, "webhook notification failed");
                return;
            }
            tracing::debug!(url = %hook.url, event = event.as_str(), attempt, retry_in = ?delay,
                reason = %e, "webhook notification failed; retrying");
            tokio::time::sleep(delay).await;
            delay = delay.saturating_mul(2).min(MAX_RETRY_DELAY);
        }
    }

    /// A gate or the rollback hook: one attempt, the answer to the asker.
    async fn ask(
        &self,
        hook: &WebhookConfig,
        event: HookEvent,
        body: &Bytes,
        reply: oneshot::Sender<bool>,
    ) {
        if reply.is_closed() {
            // The asker stopped waiting behind the queue; the rollout asks again later.
            tracing::debug!(url = %hook.url, event = event.as_str(), "webhook gate expired in the queue; not sent");
            self.metrics.webhook_call(event.as_str(), "dropped");
            return;
        }
        let r = self.attempt(hook, body).await;
        let result = r.as_ref().map_or_else(AttemptError::result, |()| "success");
        self.metrics.webhook_call(event.as_str(), result);
        match &r {
            Ok(()) => {}
            // An answer, just not "yes": the rollout holds (or goes on, for `rollback`).
            Err(e @ AttemptError::Status(_)) => {
                tracing::debug!(url = %hook.url, event = event.as_str(), reason = %e, "webhook said no");
            }
            Err(e) => {
                tracing::warn!(url = %hook.url, event = event.as_str(), reason = %e, "webhook call failed");
            }
        }
        let _ = reply.send(r.is_ok());
    }

    /// Runs one call to completion.
    async fn run(&self, hook: &WebhookConfig, call: Call) {
        match call.kind {
            Kind::Notify => self.notify(hook, call.event, &call.body).await,
            Kind::Ask(reply) => self.ask(hook, call.event, &call.body, reply).await,
        }
    }
}

/// Reads and throws away up to [`MAX_RESPONSE_BODY`] bytes, so the connection can be reused
/// when the body is small; a larger one (or a broken one) just closes it.
async fn discard_body(mut body: Incoming) {
    let mut read = 0usize;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { return };
        if let Some(data) = frame.data_ref() {
            read += data.len();
            if read > MAX_RESPONSE_BODY {
                return;
            }
        }
    }
}

/// One receiver's worker: takes calls in order until its queue closes or it is stopped.
async fn work(
    shared: Arc<Shared>,
    hook: Arc<WebhookConfig>,
    mut rx: mpsc::Receiver<Call>,
    stop: CancellationToken,
) {
    loop {
        let call = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            call = rx.recv() => match call {
                Some(call) => call,
                // Webhooks dropped and the queue drained.
                None => return,
            },
        };
        let event = call.event;
        tokio::select! {
            biased;
            () = stop.cancelled() => {
                shared.metrics.webhook_call(event.as_str(), "dropped");
                break;
            }
            () = shared.run(&hook, call) => {}
        }
    }
    rx.close();
    let mut dropped = 0usize;
    while let Ok(call) = rx.try_recv() {
        // A gate's asker sees its reply sender dropped: no.
        shared.metrics.webhook_call(call.event.as_str(), "dropped");
        dropped += 1;
    }
    tracing::debug!(url = %hook.url, dropped, "webhook no longer configured; its worker stopped");
}

/// One receiver's queue, as [`Webhooks`] holds it.
struct Worker {
    hook: Arc<WebhookConfig>,
    tx: mpsc::Sender<Call>,
    stop: CancellationToken,
}

/// The webhook sender: one worker task and bounded queue per receiver (see the module docs).
pub struct Webhooks {
    shared: Arc<Shared>,
    runtime: Option<Handle>,
    workers: Mutex<Vec<Worker>>,
}

impl Webhooks {
    /// A sender with the default backoff ([`DEFAULT_FIRST_RETRY`], doubling per retry, at
    /// most [`MAX_RETRY_DELAY`]). Call it inside a tokio runtime: workers are spawned on it,
    /// lazily, when a receiver is first called.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self::with_backoff(metrics, DEFAULT_FIRST_RETRY)
    }

    /// Like [`Webhooks::new`], with `first_retry` as the first retry delay (it still doubles
    /// per retry, at most [`MAX_RETRY_DELAY`]).
    pub fn with_backoff(metrics: Arc<Metrics>, first_retry: Duration) -> Self {
        Webhooks {
            shared: Arc::new(Shared {
                metrics,
                transport: Transport::new(),
                first_retry: first_retry.min(MAX_RETRY_DELAY),
            }),
            runtime: Handle::try_current().ok(),
            workers: Mutex::new(Vec::new()),
        }
    }

    /// Fire-and-forget: queues `payload` for every hook in `hooks` subscribed to its event and
    /// returns at once. Each is retried `retries` times with backoff on failure or timeout; a
    /// full queue drops it (counted `dropped`). `hooks` is the whole configured list: workers
    /// of hooks not in it are stopped.
    pub fn notify(&self, hooks: &[WebhookConfig], payload: Payload) {
        let event = payload.event;
        let mut workers = self.lock(hooks);
        for hook in hooks.iter().filter(|h| h.events.contains(&event)) {
            let Some(body) = payload.body(event, &hook.metadata) else {
                self.shared.metrics.webhook_call(event.as_str(), "failure");
                continue;
            };
            let call = Call {
                event,
                body,
                kind: Kind::Notify,
            };
            if let Err(why) = self.enqueue(&mut workers, hook, call) {
                self.shared.metrics.webhook_call(event.as_str(), "dropped");
                tracing::warn!(url = %hook.url, event = event.as_str(), reason = why,
                    "webhook notification dropped");
            }
        }
    }

    /// A gate: `true` when every hook subscribed to `payload.event` answers 2xx (one attempt
    /// each, within its timeout), or when none is subscribed; `false` otherwise, including a
    /// full queue or no answer within `timeout × (retries + 2)` (at most [`MAX_GATE_WAIT`]).
    pub async fn gate(&self, hooks: &[WebhookConfig], payload: &Payload) -> bool {
        match self.ask(hooks, payload, payload.event).await {
            None => true,
            Some(answers) => answers.iter().all(|&ok| ok),
        }
    }

    /// The `rollback` hook (the payload is sent with event `rollback`): `true` when any hook
    /// subscribed to it answers 2xx (one attempt each, waited for as a gate is); `false`
    /// otherwise, including when none is subscribed.
    pub async fn rollback_requested(&self, hooks: &[WebhookConfig], payload: &Payload) -> bool {
        match self.ask(hooks, payload, HookEvent::Rollback).await {
            None => false,
            Some(answers) => answers.iter().any(|&ok| ok),
        }
    }

    /// Calls waiting in the queues of the configured receivers (not counting the call each
    /// worker is making): at most [`QUEUE_LEN`] per receiver.
    pub fn queued(&self) -> usize {
        let workers = self.workers.lock().unwrap_or_else(|p| p.into_inner());
        workers
            .iter()
            .map(|w| w.tx.max_capacity() - w.tx.capacity())
            .sum()
    }

    /// Queues `event` to every subscribed hook and collects the answers; `None` when no hook
    /// is subscribed.
    async fn ask(
        &self,
        hooks: &[WebhookConfig],
        payload: &Payload,
        event: HookEvent,
    ) -> Option<Vec<bool>> {
        let start = Instant::now();
        let mut pending = Vec::new();
        {
            let mut workers = self.lock(hooks);
            for hook in hooks.iter().filter(|h| h.events.contains(&event)) {
                let Some(body) = payload.body(event, &hook.metadata) else {
                    self.shared.metrics.webhook_call(event.as_str(), "failure");
                    pending.push(None);
                    continue;
                };
                let (reply, answer) = oneshot::channel();
                let call = Call {
                    event,
                    body,
                    kind: Kind::Ask(reply),
                };
                match self.enqueue(&mut workers, hook, call) {
                    Ok(()) => pending.push(Some((answer, start + gate_wait(hook)))),
                    Err(why) => {
                        self.shared.metrics.webhook_call(event.as_str(), "dropped");
                        tracing::warn!(url = %hook.url, event = event.as_str(), reason = why,
                            "webhook gate not sent; answering no");
                        pending.push(None);
                    }
                }
            }
        }
        if pending.is_empty() {
            return None;
        }
        // Every call is queued already, so waiting for them one after the other takes as
        // long as the slowest.
        let mut answers = Vec::with_capacity(pending.len());
        for p in pending {
            let ok = match p {
                None => false,
                Some((answer, deadline)) => {
                    matches!(
                        tokio::time::timeout_at(deadline, answer).await,
                        Ok(Ok(true))
                    )
                }
            };
            answers.push(ok);
        }
        Some(answers)
    }

    /// The worker list, with the workers of hooks no longer in `hooks` stopped and removed.
    fn lock(&self, hooks: &[WebhookConfig]) -> std::sync::MutexGuard<'_, Vec<Worker>> {
        let mut workers = self.workers.lock().unwrap_or_else(|p| p.into_inner());
        workers.retain(|w| {
            let keep = hooks.contains(&w.hook) && !w.tx.is_closed();
            if !keep {
                w.stop.cancel();
            }
            keep
        });
        workers
    }

    /// Puts `call` in `hook`'s queue, spawning its worker on first use.
    fn enqueue(
        &self,
        workers: &mut Vec<Worker>,
        hook: &WebhookConfig,
        call: Call,
    ) -> Result<(), &'static str> {
        let tx = match workers.iter().find(|w| *w.hook == *hook) {
            Some(w) => &w.tx,
            None => {
                let runtime = Handle::try_current()
                    .ok()
                    .or_else(|| self.runtime.clone())
                    .ok_or("no tokio runtime to run the webhook worker on")?;
                let (tx, rx) = mpsc::channel(QUEUE_LEN);
                let stop = CancellationToken::new();
                let hook = Arc::new(hook.clone());
                runtime.spawn(work(self.shared.clone(), hook.clone(), rx, stop.clone()));
                workers.push(Worker { hook, tx, stop });
                // Just pushed.
                match workers.last() {
                    Some(w) => &w.tx,
                    None => return Err("worker list empty"),
                }
            }
        };
        tx.try_send(call).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => "queue full",
            mpsc::error::TrySendError::Closed(_) => "worker stopped",
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::convert::Infallible;
    use std::net::SocketAddr;

    use http::HeaderMap;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use tokio::net::TcpListener;

    use super::*;

    /// How a test receiver answers one request.
    #[derive(Clone, Copy)]
    enum Reply {
        Status(u16),
        /// Never answers.
        Hang,
    }

    #[derive(Clone)]
    struct Received {
        headers: HeaderMap,
        body: Bytes,
    }

    impl Received {
        fn json(&self) -> serde_json::Value {
            serde_json::from_slice(&self.body).expect("the body is JSON")
        }
    }

    /// A local webhook receiver: records every request and answers from a script (200 once
    /// the script is used up).
    struct Receiver {
        addr: SocketAddr,
        seen: Arc<Mutex<Vec<Received>>>,
    }

    impl Receiver {
        async fn start(script: &[Reply]) -> Receiver {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("local addr");
            let seen = Arc::new(Mutex::new(Vec::new()));
            let script = Arc::new(Mutex::new(script.iter().copied().collect::<VecDeque<_>>()));
            let (seen2, script2) = (seen.clone(), script.clone());
            tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let (seen, script) = (seen2.clone(), script2.clone());
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (seen, script) = (seen.clone(), script.clone());
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body.collect().await.expect("request body").to_bytes();
                            seen.lock().expect("lock").push(Received {
                                headers: parts.headers,
                                body,
                            });
                            let reply = script.lock().expect("lock").pop_front();
                            let status = match reply.unwrap_or(Reply::Status(200)) {
                                Reply::Status(s) => s,
                                Reply::Hang => std::future::pending().await,
                            };
                            let resp = Response::builder()
                                .status(status)
                                .body(Full::new(Bytes::from_static(b"{\"ok\":true}")))
                                .expect("response");
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    tokio::spawn(async move {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    });
                }
            });
            Receiver { addr, seen }
        }

        fn hook(&self, events: &[HookEvent]) -> WebhookConfig {
            hook(&format!("http://{}/hooks/canary", self.addr), events)
        }

        fn seen(&self) -> Vec<Received> {
            self.seen.lock().expect("lock").clone()
        }

        /// Waits until at least `n` requests arrived, and returns them.
        async fn wait_for(&self, n: usize) -> Vec<Received> {
            until(|| self.seen().len() >= n).await;
            self.seen()
        }
    }

    fn hook(url: &str, events: &[HookEvent]) -> WebhookConfig {
        WebhookConfig {
            url: url.parse().expect("url"),
            events: events.to_vec(),
            timeout: Duration::from_secs(2),
            retries: 0,
            secret_file: None,
            metadata: BTreeMap::new(),
        }
    }

    fn payload(event: HookEvent, message: &str) -> Payload {
        Payload {
            name: "canary".into(),
            event,
            phase: "progressing".into(),
            upstream: "canary".into(),
            step: 2,
            weight: 25.0,
            message: message.into(),
            timestamp_ms: 1_700_000_000_123,
            verdicts: serde_json::json!({"error_rate": "pass", "latency": {"verdict": "inconclusive"}}),
        }
    }

    fn webhooks() -> (Webhooks, Arc<Metrics>) {
        let metrics = Metrics::new();
        (
            Webhooks::with_backoff(metrics.clone(), Duration::from_millis(10)),
            metrics,
        )
    }

    /// Polls `f` every few milliseconds; fails the test after 5 s.
    async fn until(mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !f() {
            assert!(Instant::now() < deadline, "condition not met within 5 s");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// `canaryd_webhook_calls_total{event,result}` from the metrics text (0 when absent).
    fn calls(metrics: &Metrics, event: &str, result: &str) -> u64 {
        let prefix =
            format!("canaryd_webhook_calls_total{{event=\"{event}\",result=\"{result}\"}} ");
        metrics
            .render()
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .map_or(0, |v| v.trim().parse().expect("a counter value"))
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn signature_matches_rfc_4231() {
        // RFC 4231, test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?").expect("signature"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[tokio::test]
    async fn notification_carries_the_payload() {
        let rx = Receiver::start(&[]).await;
        let (hooks, metrics) = webhooks();
        let mut h = rx.hook(&[HookEvent::Rollout]);
        h.metadata.insert("team".into(), "ml".into());
        h.metadata.insert("env".into(), "prod".into());
        hooks.notify(&[h], payload(HookEvent::Rollout, "step 2: 25%"));
        let seen = rx.wait_for(1).await;
        let r = &seen[0];
        assert_eq!(r.headers[CONTENT_TYPE], "application/json");
        assert_eq!(
            r.headers[USER_AGENT],
            format!("canaryd/{}", env!("CARGO_PKG_VERSION")).as_str()
        );
        assert!(r.headers.get(SIGNATURE_HEADER).is_none());
        assert_eq!(
            r.json(),
            serde_json::json!({
                "name": "canary",
                "event": "rollout",
                "phase": "progressing",
                "upstream": "canary",
                "step": 2,
                "weight": 25.0,
                "message": "step 2: 25%",
                "timestamp": 1_700_000_000_123u64,
                "verdicts": {"error_rate": "pass", "latency": {"verdict": "inconclusive"}},
                "metadata": {"team": "ml", "env": "prod"},
            })
        );
        until(|| calls(&metrics, "rollout", "success") == 1).await;
    }

    #[tokio::test]
    async fn only_subscribed_hooks_are_called() {
        let a = Receiver::start(&[]).await;
        let b = Receiver::start(&[]).await;
        let (hooks, _metrics) = webhooks();
        let list = [a.hook(&[HookEvent::Event]), b.hook(&[HookEvent::Rollout])];
        hooks.notify(&list, payload(HookEvent::Event, "first"));
        hooks.notify(&list, payload(HookEvent::Rollout, "second"));
        assert_eq!(a.wait_for(1).await[0].json()["message"], "first");
        assert_eq!(b.wait_for(1).await[0].json()["message"], "second");
        // A gate to `b` after both: by then `a`'s queue has nothing more for it.
        assert!(
            hooks
                .gate(&list, &payload(HookEvent::Rollout, "third"))
                .await
        );
        assert_eq!(a.seen().len(), 1);
    }

    #[tokio::test]
    async fn signature_verifies() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("secret");
        std::fs::write(&path, "  \tit's a secret\n\n").expect("write secret");
        let rx = Receiver::start(&[]).await;
        let (hooks, _metrics) = webhooks();
        let mut h = rx.hook(&[HookEvent::Event, HookEvent::ConfirmPromotion]);
        h.secret_file = Some(path.clone());
        hooks.notify(
            std::slice::from_ref(&h),
            payload(HookEvent::Event, "signed"),
        );
        assert!(
            hooks
                .gate(
                    std::slice::from_ref(&h),
                    &payload(HookEvent::ConfirmPromotion, "gate")
                )
                .await
        );
        // Rotation: the next call uses the new content.
        std::fs::write(&path, "rotated\n").expect("write secret");
        hooks.notify(
            std::slice::from_ref(&h),
            payload(HookEvent::Event, "rotated"),
        );
        let seen = rx.wait_for(3).await;
        for (r, key) in seen
            .iter()
            .zip(["it's a secret", "it's a secret", "rotated"])
        {
            let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).expect("hmac key");
            mac.update(&r.body);
            let want = format!("sha256={}", hex(&mac.finalize().into_bytes()));
            assert_eq!(r.headers[SIGNATURE_HEADER], want.as_str());
        }
    }

    #[tokio::test]
    async fn one_receiver_sees_calls_in_order() {
        let rx = Receiver::start(&[]).await;
        let (hooks, _metrics) = webhooks();
        let list = [rx.hook(&HookEvent::ALL)];
        for i in 0..5 {
            hooks.notify(&list, payload(HookEvent::Event, &format!("n{i}")));
        }
        assert!(
            hooks
                .gate(&list, &payload(HookEvent::ConfirmTrafficIncrease, "g"))
                .await
        );
        hooks.notify(&list, payload(HookEvent::Rollout, "after"));
        let seen = rx.wait_for(7).await;
        let order: Vec<_> = seen
            .iter()
            .map(|r| r.json()["message"].as_str().expect("message").to_owned())
            .collect();
        assert_eq!(order, ["n0", "n1", "n2", "n3", "n4", "g", "after"]);
        assert_eq!(seen[5].json()["event"], "confirm-traffic-increase");
    }

    #[tokio::test]
    async fn notification_is_retried_until_2xx() {
        let rx =
            Receiver::start(&[Reply::Status(500), Reply::Status(500), Reply::Status(200)]).await;
        let (hooks, metrics) = webhooks();
        let mut h = rx.hook(&[HookEvent::Rollout]);
        h.retries = 3;
        hooks.notify(&[h], payload(HookEvent::Rollout, "retried"));
        let seen = rx.wait_for(3).await;
        until(|| calls(&metrics, "rollout", "success") == 1).await;
        let text = metrics.render();
        assert!(
            text.contains("canaryd_webhook_calls_total{event=\"rollout\",result=\"failure\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("canaryd_webhook_calls_total{event=\"rollout\",result=\"success\"} 1"),
            "{text}"
        );
        assert!(seen.iter().all(|r| r.json()["message"] == "retried"));
        assert_eq!(rx.seen().len(), 3);
    }

    #[tokio::test]
    async fn notification_gives_up_after_its_retries() {
        let rx = Receiver::start(&[Reply::Status(503); 10]).await;
        let (hooks, metrics) = webhooks();
        let mut h = rx.hook(&[HookEvent::PostRollout]);
        h.retries = 2;
        hooks.notify(&[h], payload(HookEvent::PostRollout, "done"));
        until(|| calls(&metrics, "post-rollout", "failure") == 3).await;
        // A later call to the same receiver comes after the given-up one: nothing more came.
        assert_eq!(rx.seen().len(), 3);
    }

    #[tokio::test]
    async fn gate_answers() {
        let (hooks, metrics) = webhooks();
        let ok = Receiver::start(&[]).await;
        let no = Receiver::start(&[Reply::Status(500); 4]).await;
        let hang = Receiver::start(&[Reply::Hang]).await;
        let e = HookEvent::ConfirmTrafficIncrease;
        let p = payload(e, "step up?");

        assert!(hooks.gate(&[ok.hook(&[e])], &p).await);
        assert!(!hooks.gate(&[no.hook(&[e])], &p).await);
        let mut slow = hang.hook(&[e]);
        slow.timeout = Duration::from_millis(200);
        let started = Instant::now();
        assert!(!hooks.gate(std::slice::from_ref(&slow), &p).await);
        assert!(started.elapsed() < Duration::from_secs(2));
        until(|| calls(&metrics, e.as_str(), "timeout") == 1).await;
        // Every hook must say yes.
        assert!(!hooks.gate(&[ok.hook(&[e]), no.hook(&[e])], &p).await);
        // Nobody subscribed: nothing holds the rollout.
        assert!(hooks.gate(&[ok.hook(&[HookEvent::Rollout])], &p).await);
        assert!(hooks.gate(&[], &p).await);
        assert_eq!(calls(&metrics, e.as_str(), "success"), 2);
        assert_eq!(calls(&metrics, e.as_str(), "failure"), 2);
    }

    #[tokio::test]
    async fn rollback_hook_answers() {
        let (hooks, metrics) = webhooks();
        let yes = Receiver::start(&[]).await;
        let no = Receiver::start(&[Reply::Status(404); 4]).await;
        let r = HookEvent::Rollback;
        // The payload's event is replaced by `rollback`.
        let p = payload(HookEvent::Event, "roll back?");
        assert!(hooks.rollback_requested(&[yes.hook(&[r])], &p).await);
        assert_eq!(yes.seen()[0].json()["event"], "rollback");
        assert!(!hooks.rollback_requested(&[no.hook(&[r])], &p).await);
        // Any 2xx is enough.
        assert!(
            hooks
                .rollback_requested(&[no.hook(&[r]), yes.hook(&[r])], &p)
                .await
        );
        // Nobody subscribed: no rollback.
        assert!(
            !hooks
                .rollback_requested(&[yes.hook(&[HookEvent::Event])], &p)
                .await
        );
        assert_eq!(calls(&metrics, "rollback", "success"), 2);
        assert_eq!(calls(&metrics, "rollback", "failure"), 2);
    }

    #[tokio::test]
    async fn dead_receiver_is_bounded_and_blocks_nobody() {
        // Bound but never accepting: connections sit in the backlog, requests get no answer.
        let dead = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let dead_url = format!("http://{}/", dead.local_addr().expect("addr"));
        let healthy = Receiver::start(&[]).await;
        let (hooks, metrics) = webhooks();
        let mut d = hook(&dead_url, &[HookEvent::Event]);
        d.timeout = Duration::from_secs(5);
        d.retries = 3;
        let list = [d, healthy.hook(&[HookEvent::ConfirmPromotion])];
        for i in 0..500 {
            let started = std::time::Instant::now();
            hooks.notify(&list, payload(HookEvent::Event, &format!("n{i}")));
            assert!(
                started.elapsed() < Duration::from_millis(50),
                "notify waited"
            );
            assert!(hooks.queued() <= QUEUE_LEN, "queued {}", hooks.queued());
        }
        // The worker holds one call; the queue the next QUEUE_LEN; the rest were dropped.
        assert!(hooks.queued() >= QUEUE_LEN - 1);
        assert!(calls(&metrics, "event", "dropped") >= (500 - QUEUE_LEN - 1) as u64);
        let started = Instant::now();
        assert!(
            hooks
                .gate(&list, &payload(HookEvent::ConfirmPromotion, "go?"))
                .await
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "gate waited {:?}",
            started.elapsed()
        );
        // A gate to the dead receiver, whose queue is full: refused at once.
        // (The worker took one more call off the queue meanwhile: fill it up again.)
        hooks.notify(&list, payload(HookEvent::Event, "refill"));
        assert_eq!(hooks.queued(), QUEUE_LEN);
        let dropped = calls(&metrics, "event", "dropped");
        let started = Instant::now();
        assert!(!hooks.gate(&list, &payload(HookEvent::Event, "go?")).await);
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(calls(&metrics, "event", "dropped"), dropped + 1);
        drop(dead);
    }

    #[tokio::test]
    async fn missing_secret_fails_and_sends_nothing() {
        let dir = tempfile::tempdir().expect("temp dir");
        let rx = Receiver::start(&[]).await;
        let (hooks, metrics) = webhooks();
        let mut h = rx.hook(&[HookEvent::Event, HookEvent::PreRollout]);
        h.secret_file = Some(dir.path().join("missing"));
        let list = [h];
        hooks.notify(&list, payload(HookEvent::Event, "unsigned?"));
        until(|| calls(&metrics, "event", "failure") == 1).await;
        assert!(
            !hooks
                .gate(&list, &payload(HookEvent::PreRollout, "go?"))
                .await
        );
        assert_eq!(calls(&metrics, "pre-rollout", "failure"), 1);
        // An empty (whitespace only) secret is no secret either.
        std::fs::write(dir.path().join("missing"), " \n").expect("write secret");
        assert!(
            !hooks
                .gate(&list, &payload(HookEvent::PreRollout, "go?"))
                .await
        );
        assert_eq!(calls(&metrics, "pre-rollout", "failure"), 2);
        // The same receiver without a secret does get calls, so nothing was lost on the way.
        assert!(
            hooks
                .gate(
                    &[rx.hook(&[HookEvent::PreRollout])],
                    &payload(HookEvent::PreRollout, "plain")
                )
                .await
        );
        let seen = rx.seen();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].json()["message"], "plain");
    }

    #[tokio::test]
    async fn gate_behind_slow_calls_gives_up_and_is_not_sent() {
        let rx = Receiver::start(&[Reply::Hang; 3]).await;
        let (hooks, metrics) = webhooks();
        let mut h = rx.hook(&HookEvent::ALL);
        h.timeout = Duration::from_millis(150);
        let list = [h];
        // Three notifications that each take the whole timeout, ahead of a gate that waits
        // 150 ms × (0 + 2).
        for i in 0..3 {
            hooks.notify(&list, payload(HookEvent::Event, &format!("n{i}")));
        }
        let started = Instant::now();
        let e = HookEvent::ConfirmRollout;
        assert!(!hooks.gate(&list, &payload(e, "late")).await);
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(300), "{waited:?}");
        assert!(waited < Duration::from_secs(2), "{waited:?}");
        // When its turn comes, nobody waits for it: not sent, counted, and the next call
        // goes out.
        until(|| calls(&metrics, e.as_str(), "dropped") == 1).await;
        hooks.notify(&list, payload(HookEvent::Event, "after"));
        let seen = rx.wait_for(4).await;
        let order: Vec<_> = seen
            .iter()
            .map(|r| r.json()["message"].as_str().expect("message").to_owned())
            .collect();
        assert_eq!(order, ["n0", "n1", "n2", "after"]);
        assert_eq!(calls(&metrics, "event", "timeout"), 3);
    }

    #[tokio::test]
    async fn https_hook_speaks_tls() {
        // A plain-HTTP receiver behind an https:// URL sees a TLS ClientHello, not a request.
        let rx = Receiver::start(&[]).await;
        let (hooks, metrics) = webhooks();
        let e = HookEvent::ConfirmPromotion;
        let h = hook(&format!("https://{}/hooks", rx.addr), &[e]);
        assert!(!hooks.gate(&[h], &payload(e, "over tls?")).await);
        assert_eq!(calls(&metrics, e.as_str(), "failure"), 1);
        assert!(rx.seen().is_empty());
    }

    #[tokio::test]
    async fn removed_hook_stops_its_calls() {
        let hang = Receiver::start(&[Reply::Hang]).await;
        let other = Receiver::start(&[]).await;
        let (hooks, metrics) = webhooks();
        let old = [hang.hook(&[HookEvent::Event])];
        for i in 0..10 {
            hooks.notify(&old, payload(HookEvent::Event, &format!("n{i}")));
        }
        hang.wait_for(1).await;
        assert_eq!(hooks.queued(), 9);
        // A reload removed it: its queued calls are dropped, not sent.
        let new = [other.hook(&[HookEvent::Event])];
        hooks.notify(&new, payload(HookEvent::Event, "new"));
        assert_eq!(other.wait_for(1).await[0].json()["message"], "new");
        assert_eq!(hooks.queued(), 0);
        until(|| calls(&metrics, "event", "dropped") == 10).await;
        assert_eq!(hang.seen().len(), 1);
    }
}
