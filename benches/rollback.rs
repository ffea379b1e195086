//! Rollback reaction: how many canary requests fail, and how many milliseconds pass between the
//! first failure a client sees and the trip, when a 10% canary starts failing every request
//! under steady load. Real proxy, real upstreams, real clients on loopback.
//!
//! `cargo bench --bench rollback` (`-- --runs N --rate RPS` to change the defaults)

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use canaryd::app::{self, Listeners};
use canaryd::config::Config;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

const WORKERS: u64 = 8;

/// An upstream that answers 200, or 500 once `failing` is set.
async fn upstream(failing: Arc<AtomicBool>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind upstream");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let failing = failing.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |_req: Request<hyper::body::Incoming>| {
                    let status = if failing.load(Ordering::Relaxed) {
                        StatusCode::INTERNAL_SERVER_ERROR
                    } else {
                        StatusCode::OK
                    };
                    async move {
                        let mut r = Response::new(Full::new(Bytes::from_static(b"ok")));
                        *r.status_mut() = status;
                        Ok::<_, Infallible>(r)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

struct RunResult {
    reason: String,
    failed_canary: u64,
    reaction_ms: i64,
    canary_after_trip: u64,
}

async fn run_once(rate: u64, warmup: Duration) -> RunResult {
    let canary_failing = Arc::new(AtomicBool::new(false));
    let stable = upstream(Arc::new(AtomicBool::new(false))).await;
    let canary = upstream(canary_failing.clone()).await;
    let config = Config::parse(&format!(
        r#"
[listen]
addr = "127.0.0.1:0"
[admin]
addr = "127.0.0.1:0"
[[upstream]]
name = "stable"
url = "http://{stable}"
weight = 90
[[upstream]]
name = "canary"
url = "http://{canary}"
weight = 10
[rollback]
window = "30s"
min_requests = 20
max_error_rate = 0.10
max_error_rate_increase = 0.02
"#
    ))
    .expect("valid config");
    let proxy_l = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
    let admin_l = TcpListener::bind("127.0.0.1:0").await.expect("bind admin");
    let proxy = proxy_l.local_addr().expect("addr");
    let admin = admin_l.local_addr().expect("addr");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app::run(
        config,
        None,
        Listeners {
            proxy: proxy_l,
            admin: Some(admin_l),
        },
        async {
            let _ = stop_rx.await;
        },
    ));

    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let failed = Arc::new(AtomicU64::new(0));
    let first_fail_ms = Arc::new(AtomicU64::new(u64::MAX));
    let canary_after = Arc::new(AtomicU64::new(0));
    let tripped = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let seq = Arc::new(AtomicU64::new(0));

    // Steady load: each worker sends at rate/WORKERS per second, user ids never repeat.
    let period = Duration::from_nanos(1_000_000_000 * WORKERS / rate);
    let mut workers = Vec::new();
    for _ in 0..WORKERS {
        let (client, failed, first, after, tripped, stop, seq) = (
            client.clone(),
            failed.clone(),
            first_fail_ms.clone(),
            canary_after.clone(),
            tripped.clone(),
            stop.clone(),
            seq.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let id = seq.fetch_add(1, Ordering::Relaxed);
                let req = Request::get(format!("http://{proxy}/predict"))
                    .header("x-user-id", format!("user-{id}"))
                    .body(Empty::new())
                    .expect("request");
                let Ok(resp) = client.request(req).await else {
                    continue;
                };
                let on_canary = resp
                    .headers()
                    .get("x-canaryd-upstream")
                    .is_some_and(|v| v == "canary");
                let status = resp.status();
                let _ = resp.into_body().collect().await;
                if on_canary && tripped.load(Ordering::Relaxed) {
                    after.fetch_add(1, Ordering::Relaxed);
                }
                if on_canary && status == StatusCode::INTERNAL_SERVER_ERROR {
                    failed.fetch_add(1, Ordering::Relaxed);
                    first.fetch_min(unix_ms(), Ordering::Relaxed);
                }
            }
        }));
    }

    // A healthy warm-up fills both windows, then the canary breaks.
    tokio::time::sleep(warmup).await;
    canary_failing.store(true, Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(20);
    let (trip_at, reason) = loop {
        let weights = admin_get(&client, admin).await;
        let trip = &weights["tripped"]["canary"];
        if let Some(at) = trip["at"].as_str() {
            let reason = trip["reason"].as_str().unwrap_or("?").to_owned();
            break (humantime::parse_rfc3339(at).expect("rfc3339"), reason);
        }
        assert!(Instant::now() < deadline, "no trip within 20 s: {weights}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    tripped.store(true, Ordering::Relaxed);
    // Requests routed before the trip may still be finishing; give them time, then stop.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let failed_before_stop = failed.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.await;
    }
    let _ = stop_tx.send(());
    let _ = server.await;

    let trip_ms = trip_at
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    RunResult {
        reason,
        failed_canary: failed_before_stop,
        reaction_ms: trip_ms - first_fail_ms.load(Ordering::Relaxed) as i64,
        canary_after_trip: canary_after.load(Ordering::Relaxed),
    }
}

async fn admin_get(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>,
    admin: SocketAddr,
) -> serde_json::Value {
    let resp = client
        .get(format!("http://{admin}/weights").parse().expect("uri"))
        .await
        .expect("admin reachable");
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    serde_json::from_slice(&body).expect("json")
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn median(mut v: Vec<i64>) -> i64 {
    v.sort_unstable();
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: u64| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let runs = arg("--runs", 5);
    let rate = arg("--rate", 1000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    for (label, warmup) in [
        (
            "warm: canary healthy for 1.5 s, then fails every request",
            Duration::from_millis(1500),
        ),
        (
            "cold: canary fails every request from its first one",
            Duration::ZERO,
        ),
    ] {
        println!("\n{label}; 90/10 split, min_requests = 20, {rate} req/s, {runs} runs");
        println!("run  tripped by            failed canary requests  first failure -> trip (ms)  canary responses after trip");
        let mut failed = Vec::new();
        let mut ms = Vec::new();
        for i in 0..runs {
            let r = rt.block_on(run_once(rate, warmup));
            println!(
                "{:>3}  {:<20}  {:>22}  {:>26}  {:>27}",
                i + 1,
                r.reason,
                r.failed_canary,
                r.reaction_ms,
                r.canary_after_trip
            );
            failed.push(r.failed_canary as i64);
            ms.push(r.reaction_ms);
        }
        println!(
            "median: {} failed canary requests, {} ms from the first failure to the trip",
            median(failed),
            median(ms)
        );
    }
}
