//! `canaryd demo`: two built-in model servers ("v1" stable, "v2" canary) behind the real proxy.
//!
//! The demo builds an ordinary config (TOML text, validated like any file) pointing at the two
//! built-in upstreams and hands it to [`crate::app::run`], so it exercises the same code path as
//! `canaryd run`.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::app::{AppError, Listeners};
use crate::config::Config;

/// Options of `canaryd demo`.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Share (0..=1) of canary requests that fail with 500.
    pub canary_error_rate: f64,
    /// Proxy address.
    pub listen: SocketAddr,
    /// Admin address.
    pub admin: SocketAddr,
    /// Run a compressed progressive rollout with generated traffic, and stop when it ends.
    pub rollout: bool,
    /// Copy every request to a third model, "v3", that disagrees on [`SHADOW_DISAGREES`] of
    /// inputs.
    pub shadow: bool,
    /// Share (0..=1) of the canary's answers whose label flips to "negative".
    pub canary_drift: f64,
}

/// Share of inputs (by user id) on which the demo's shadow model answers differently.
pub const SHADOW_DISAGREES: f64 = 0.25;

/// How a demo model's label departs from "positive".
#[derive(Debug, Clone, Copy)]
enum Flip {
    /// Never.
    Never,
    /// This share of answers, at random.
    Random(f64),
    /// This share of inputs (by the x-user-id header), always the same ones.
    ByInput(f64),
}

/// Why the demo could not start.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// `--canary-error-rate` or `--canary-drift` outside 0..=1.
    #[error("--canary-error-rate and --canary-drift must be between 0 and 1, got {0}")]
    BadErrorRate(f64),
    /// A built-in upstream could not bind.
    #[error("cannot start the built-in model server: {0}")]
    Upstream(#[source] std::io::Error),
    /// The generated config failed validation (a bug).
    #[error("demo config is invalid: {0}")]
    Config(#[from] crate::config::ConfigErrors),
    /// The proxy failed.
    #[error(transparent)]
    App(#[from] AppError),
}

/// Starts the model servers and the proxy; returns when `shutdown` resolves and the proxy has
/// drained.
pub async fn run(
    opts: DemoOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), DemoError> {
    for x in [opts.canary_error_rate, opts.canary_drift] {
        if !(0.0..=1.0).contains(&x) {
            return Err(DemoError::BadErrorRate(x));
        }
    }
    let v1 = start_model("v1", 0.87, 0.0, Flip::Never).await?;
    let drift = if opts.canary_drift > 0.0 {
        Flip::Random(opts.canary_drift)
    } else {
        Flip::Never
    };
    let v2 = start_model("v2", 0.91, opts.canary_error_rate, drift).await?;
    let v3 = if opts.shadow {
        Some(start_model("v3", 0.89, 0.0, Flip::ByInput(SHADOW_DISAGREES)).await?)
    } else {
        None
    };
    let config = Config::parse(&demo_config(&opts, v1, v2, v3))?;
    let listeners = crate::app::bind(&config).await?;
    let proxy = listeners.proxy.local_addr().unwrap_or(opts.listen);
    let admin = listeners
        .admin
        .as_ref()
        .and_then(|l| l.local_addr().ok())
        .unwrap_or(opts.admin);
    if !opts.rollout {
        print_intro(proxy, admin, v1, v2, &opts);
        crate::app::run(
            config,
            None,
            Listeners {
                proxy: listeners.proxy,
                admin: listeners.admin,
            },
            shutdown,
        )
        .await?;
        return Ok(());
    }
    println!(
        "canaryd demo --rollout: stable = model v1, canary = model v2 (fails {:.0}% of \
         requests); proxy http://{proxy}, admin http://{admin}\n\
         steps 5% -> 25% -> 50% -> 75% -> 100%, at least {} s and {} requests of each arm per \
         step; about {} requests/s of generated traffic\n",
        opts.canary_error_rate * 100.0,
        DEMO_STEP.as_secs(),
        DEMO_MIN_REQUESTS,
        DEMO_CLIENTS * 250,
    );
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let stop = async move {
        tokio::select! {
            () = shutdown => {}
            _ = done_rx => {}
        }
    };
    let app = tokio::spawn(crate::app::run(
        config,
        None,
        Listeners {
            proxy: listeners.proxy,
            admin: listeners.admin,
        },
        stop,
    ));
    let traffic: Vec<_> = (0..DEMO_CLIENTS)
        .map(|c| tokio::spawn(generate_traffic(proxy, c)))
        .collect();
    follow_rollout(admin).await;
    for t in traffic {
        t.abort();
    }
    let _ = done_tx.send(());
    match app.await {
        Ok(r) => r?,
        Err(e) => tracing::error!(error = %e, "the demo proxy task failed"),
    }
    Ok(())
}

/// `min_step_duration` of the demo's rollout.
const DEMO_STEP: std::time::Duration = std::time::Duration::from_secs(3);
/// `min_requests` of the demo's rollout.
const DEMO_MIN_REQUESTS: u64 = 200;
/// Connections sending generated traffic (each paced at about 250 requests a second).
const DEMO_CLIENTS: usize = 4;

/// Sends requests with random user ids through the proxy on one keep-alive connection,
/// reconnecting when it closes, until aborted.
async fn generate_traffic(proxy: SocketAddr, client: usize) {
    let mut rng = fastrand::Rng::with_seed(client as u64 + 1);
    let mut pace = tokio::time::interval(std::time::Duration::from_millis(4));
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let Ok(stream) = tokio::net::TcpStream::connect(proxy).await else {
            pace.tick().await;
            continue;
        };
        let Ok((mut send, conn)) =
            hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream)).await
        else {
            continue;
        };
        tokio::spawn(conn);
        loop {
            pace.tick().await;
            let user = format!("demo-user-{}", rng.u32(..));
            let Ok(req) = Request::post("/predict")
                .header(header::HOST, "demo")
                .header("x-user-id", user)
                .body(Full::new(Bytes::from_static(
                    br#"{"text":"great product"}"#,
                )))
            else {
                break;
            };
            if send.send_request(req).await.is_err() {
                break;
            }
        }
    }
}

/// Starts the rollout through the admin API, prints a line at each step and phase change,
/// and returns when it ends.
async fn follow_rollout(admin: SocketAddr) {
    let call = |method: &'static str, path: &'static str| async move {
        let stream = tokio::net::TcpStream::connect(admin).await.ok()?;
        let (mut send, conn) =
            hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream))
                .await
                .ok()?;
        tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "admin")
            .body(Full::new(Bytes::new()))
            .ok()?;
        let resp = send.send_request(req).await.ok()?;
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .ok()?;
        serde_json::from_slice::<serde_json::Value>(&body.to_bytes()).ok()
    };
    if call("POST", "/rollout/start").await.is_none() {
        eprintln!("canaryd demo: the admin API did not answer POST /rollout/start");
        return;
    }
    let started = tokio::time::Instant::now();
    let mut last = (String::new(), 0u64);
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let Some(r) = call("GET", "/rollout").await else {
            continue;
        };
        let phase = r["phase"].as_str().unwrap_or("").to_owned();
        let step = r["step"].as_u64().unwrap_or(0);
        if (phase.clone(), step) != last {
            let requests = r["at_step"]["requests"].to_string();
            println!(
                "[{:>5.1}s] {phase:<11} step {step}/{} at {}%  {}  {}",
                started.elapsed().as_secs_f64(),
                r["steps"].as_array().map_or(0, Vec::len),
                r["weight"],
                r["reason"].as_str().unwrap_or(""),
                if r["at_step"].is_null() {
                    String::new()
                } else {
                    requests
                },
            );
            last = (phase.clone(), step);
        }
        if phase == "succeeded" || phase == "failed" {
            if let Some(h) = r["history"].as_array() {
                for s in h {
                    println!(
                        "  step {} ({}%): {} - {}",
                        s["step"],
                        s["weight"],
                        s["outcome"].as_str().unwrap_or("running"),
                        s["detail"].as_str().unwrap_or("")
                    );
                }
            }
            return;
        }
    }
}

fn demo_config(
    opts: &DemoOptions,
    v1: SocketAddr,
    v2: SocketAddr,
    v3: Option<SocketAddr>,
) -> String {
    let shadow = match v3 {
        Some(v3) => format!(
            "\n[[upstream]]\nname = \"candidate\"\nurl = \"http://{v3}\"\nweight = 0\n\n\
             [shadow]\nupstream = \"candidate\"\npercent = 100\nmethods = [\"GET\", \"POST\"]\n\
             compare = [\"/prediction\"]\n"
        ),
        None => String::new(),
    };
    let (stable_weight, canary_weight, rollout) = if opts.rollout {
        (
            100,
            0,
            format!(
                "\n[rollout]\nsteps = [5, 25, 50, 75, 100]\nmin_step_duration = \"{}s\"\n\
                 min_requests = {DEMO_MIN_REQUESTS}\nmax_step_duration = \"60s\"\n\
                 on_inconclusive = \"rollback\"\n",
                DEMO_STEP.as_secs()
            ),
        )
    } else {
        (90, 10, String::new())
    };
    let access_log = !opts.rollout;
    format!(
        r#"
[listen]
addr = "{listen}"
access_log = {access_log}

[admin]
addr = "{admin}"

[routing]
sticky_header = "x-user-id"
override_header = "x-canary"

[routing.pins]
"qa-1" = "canary"

[[upstream]]
name = "stable"
url = "http://{v1}"
weight = {stable_weight}

[[upstream]]
name = "canary"
url = "http://{v2}"
weight = {canary_weight}

{shadow}
[rollback]
confidence = 0.99
max_error_rate_increase = 0.02

[analysis]
label_pointer = "/prediction"
score_pointer = "/confidence"
{rollout}"#,
        listen = opts.listen,
        admin = opts.admin,
    )
}

fn print_intro(
    proxy: SocketAddr,
    admin: SocketAddr,
    v1: SocketAddr,
    v2: SocketAddr,
    opts: &DemoOptions,
) {
    let p = format!("http://{proxy}");
    let a = format!("http://{admin}");
    println!(
        r#"canaryd demo
  stable  = model "v1" on http://{v1}
  canary  = model "v2" on http://{v2}  (fails {rate:.0}% of requests)
  proxy   = {p}   90/10 sticky split on x-user-id, override with x-canary
  admin   = {a}

Send traffic:
  curl -si -H 'x-user-id: alice' -d '{{"text":"great product"}}' {p}/predict      # alice is in the canary (bucket 83)
  curl -si -H 'x-user-id: user_123' -d '{{"text":"great product"}}' {p}/predict   # user_123 stays on stable (bucket 8884)
  curl -si -H 'x-canary: canary' {p}/predict                                      # force the canary arm
  curl -si -H 'x-user-id: qa-1' {p}/predict                                       # qa-1 is pinned to the canary
  for i in $(seq 1 200); do curl -s -o /dev/null -H "x-user-id: user$i" {p}/predict; done

Drive it:
  curl -s {a}/weights                                  # effective and configured weights
  curl -s -X PUT {a}/weights -d '{{"canary": 25}}'       # ramp the canary to 25%
  curl -s '{a}/route?key=alice'                        # which arm a user gets, and why
  curl -s '{a}/preview?canary=30'                      # who would move at 30%
  curl -s {a}/status                                   # per arm: the analysis, its verdicts, recent window
  curl -s -X POST {a}/rollback                         # everyone back to stable
  curl -s -X POST {a}/reset                            # undo the rollback
  curl -s {a}/metrics | grep canaryd_requests_total    # Prometheus metrics
  open {a}/ in a browser                       # the dashboard

Ctrl-C stops the demo.
"#,
        rate = opts.canary_error_rate * 100.0,
    );
}

/// Binds an ephemeral port and serves a fake model that answers JSON predictions.
async fn start_model(
    version: &'static str,
    confidence: f64,
    error_rate: f64,
    flip: Flip,
) -> Result<SocketAddr, DemoError> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(DemoError::Upstream)?;
    let addr = listener.local_addr().map_err(DemoError::Upstream)?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let svc = service_fn(move |req| predict(req, version, confidence, error_rate, flip));
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

async fn predict(
    req: Request<Incoming>,
    version: &'static str,
    confidence: f64,
    error_rate: f64,
    flip: Flip,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let flipped = match flip {
        Flip::Never => false,
        Flip::Random(share) => fastrand::f64() < share,
        Flip::ByInput(share) => {
            // The same inputs every time: FNV-1a of the user id, in [0, 1).
            let user = req
                .headers()
                .get("x-user-id")
                .map_or(&b""[..], |v| v.as_bytes());
            let h = user.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
                (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
            });
            (h % 10_000) as f64 / 10_000.0 < share
        }
    };
    let (label, confidence) = if flipped {
        ("negative", 1.0 - confidence)
    } else {
        ("positive", confidence)
    };
    let (status, body) = if error_rate > 0.0 && fastrand::f64() < error_rate {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            serde_json::json!({"model": version, "error": "simulated model failure"}),
        )
    } else {
        (
            StatusCode::OK,
            serde_json::json!({
                "model": version,
                "prediction": label,
                "confidence": confidence,
                "path": req.uri().path(),
            }),
        )
    };
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}
