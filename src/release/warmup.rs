//! The warmup of a new build: when a non-baseline arm's url changes and it has `warmup`, its
//! warmup requests (`warmup_path`, `warmup_requests`) go to the new url first, one after the
//! other and outside the analysis, while its effective weight is 0; then its effective weight
//! ramps from a tenth of its weight to all of it over `warmup` (the control plane computes
//! the ramp; this task publishes its steps).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{Method, Request};
use http_body_util::BodyExt;
use tokio::task::JoinHandle;

use crate::body::RequestBody;
use crate::control::{Control, WarmupJob};
use crate::upstream::forwarded::Forwarded;

/// Marks canaryd's warmup requests, for upstream logs.
pub static WARMUP_HEADER: HeaderName = HeaderName::from_static("x-canaryd-warmup");

/// The most a warmup response body is read (to free the connection); the rest is dropped.
const MAX_BODY: usize = 1 << 20;

/// Runs the warmups for as long as canaryd runs.
pub fn spawn(control: Arc<Control>) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            for job in control.warmup_jobs() {
                tokio::spawn(send(control.clone(), job));
            }
            match control.warmup_tick() {
                Some(next) => {
                    tokio::select! {
                        () = tokio::time::sleep(next) => {}
                        () = control.warmup_started() => {}
                    }
                }
                None => control.warmup_started().await,
            }
        }
    })
}

/// Sends one arm's warmup requests, then starts its ramp.
async fn send(control: Arc<Control>, job: WarmupJob) {
    let mut failed = 0;
    let mut sent = 0;
    for _ in 0..job.count {
        // A newer build (or a reload that dropped the warmup) ends this one.
        let current = control.warming();
        if current.get(&job.name).is_none_or(|w| w.url != job.url) {
            return;
        }
        sent += 1;
        if !warmup_request(&job).await {
            failed += 1;
        }
    }
    control.warmup_sent(&job.name, &job.url, sent, failed);
}

/// One warmup request: whether it was answered with a status below 500.
async fn warmup_request(job: &WarmupJob) -> bool {
    let Ok(path) = job.path.parse() else {
        return false;
    };
    let Ok(uri) = job.upstream.uri_for(Some(&path)) else {
        return false;
    };
    let mut req = Request::new(RequestBody::empty());
    *req.method_mut() = Method::GET;
    *req.uri_mut() = uri;
    if job.upstream.http2() {
        *req.version_mut() = http::Version::HTTP_2;
    }
    if let Ok(host) = HeaderValue::from_str(job.upstream.authority().as_str()) {
        req.headers_mut().insert(http::header::HOST, host);
    }
    req.headers_mut()
        .insert(WARMUP_HEADER.clone(), HeaderValue::from_static("1"));
    let forwarded = Forwarded {
        for_: HeaderValue::from_static("unknown"),
        proto: HeaderValue::from_static("http"),
        host: None,
    };
    match job.upstream.send(req, &forwarded, job.timeout).await {
        Ok(resp) => {
            let ok = resp.status().as_u16() < 500;
            // Read the answer so its connection goes back to the pool.
            let body = http_body_util::Limited::new(resp.into_body(), MAX_BODY);
            let read =
                tokio::time::timeout(job.timeout.max(Duration::from_secs(1)), body.collect());
            let _: Option<Bytes> = read.await.ok().and_then(|r| r.ok()).map(|c| c.to_bytes());
            ok
        }
        Err(e) => {
            tracing::debug!(upstream = %job.name, error = %e, "warmup request failed");
            false
        }
    }
}
