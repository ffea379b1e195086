//! End-to-end tests of the progressive rollout: canaryd in front of fake upstreams, real
//! traffic, steps of about a second, a real webhook receiver; and the real binary killed with
//! SIGKILL mid-rollout.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use hmac::{Hmac, Mac};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::Value;
use sha2::Sha256;

const DEADLINE: Duration = Duration::from_secs(60);
const SECRET: &str = "rollout-test-secret";

/// One call the receiver got.
#[derive(Debug, Clone)]
struct Call {
    event: String,
    body: Value,
    signed_ok: bool,
}

/// A webhook receiver: records every call; answers 404 to the `rollback` hook (no kill
/// switch pulled), `gate_status` to `confirm-traffic-increase`, 200 to the rest.
struct Receiver {
    addr: SocketAddr,
    calls: Arc<Mutex<Vec<Call>>>,
    gate_status: Arc<AtomicU16>,
}

impl Receiver {
    async fn start() -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let calls = Arc::new(Mutex::new(Vec::new()));
        let gate_status = Arc::new(AtomicU16::new(200));
        let (c, g) = (calls.clone(), gate_status.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (c, g) = (c.clone(), g.clone());
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (c, g) = (c.clone(), g.clone());
                    async move {
                        let sig = req
                            .headers()
                            .get("x-canaryd-signature")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_owned();
                        let raw = req.into_body().collect().await.map(|b| b.to_bytes());
                        let raw = raw.unwrap_or_default();
                        let mut mac =
                            Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).expect("key");
                        mac.update(&raw);
                        let want: String = mac
                            .finalize()
                            .into_bytes()
                            .iter()
                            .map(|b| format!("{b:02x}"))
                            .collect();
                        let body: Value = serde_json::from_slice(&raw).unwrap_or(Value::Null);
                        let event = body["event"].as_str().unwrap_or("").to_owned();
                        let status = match event.as_str() {
                            "rollback" => 404,
                            "confirm-traffic-increase" => g.load(Ordering::SeqCst),
                            _ => 200,
                        };
                        c.lock().unwrap().push(Call {
                            event,
                            body,
                            signed_ok: sig == format!("sha256={want}"),
                        });
                        let mut resp = Response::new(Full::new(Bytes::from_static(b"ok")));
                        *resp.status_mut() = StatusCode::from_u16(status).expect("status");
                        Ok::<_, Infallible>(resp)
                    }
                });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Receiver {
            addr,
            calls,
            gate_status,
        }
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    /// The hook types received, without the `rollback` queries and `event` notifications,
    /// and with a gate asked several times in a row counted once.
    fn sequence(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for c in self.calls() {
            if c.event == "rollback" || c.event == "event" {
                continue;
            }
            if out.last() == Some(&c.event) && c.event.starts_with("confirm-") {
                continue;
            }
            out.push(c.event);
        }
        out
    }
}

/// Requests with fresh user ids, `CLIENTS` at a time, until the returned flag is set.
fn generate_traffic(addr: SocketAddr) -> Arc<AtomicBool> {
    const CLIENTS: usize = 6;
    let stop = Arc::new(AtomicBool::new(false));
    for c in 0..CLIENTS {
        let stop = stop.clone();
        tokio::spawn(async move {
            let client = HttpClient::http1();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let user = format!("user-{c}-{i}");
                i += 1;
                let _ = client.get(addr, "/", &[("x-user-id", &user)]).await;
            }
        });
    }
    stop
}

fn rollout_config(
    stable: &str,
    canary: &str,
    steps: &str,
    webhook: Option<(&Receiver, &std::path::Path)>,
) -> String {
    let mut b = ConfigBuilder::new()
        .upstream("stable", stable, "100")
        .upstream("canary", canary, "0")
        .set("rollout", "steps", steps)
        .set("rollout", "min_step_duration", &q("1s"))
        .set("rollout", "min_requests", "100")
        .set("rollout", "max_step_duration", &q("60s"));
    if let Some((r, secret)) = webhook {
        b = b.raw(&format!(
            "[[webhook]]\nurl = {}\ntimeout = \"2s\"\nretries = 1\nsecret_file = {}\nmetadata = {{ team = \"ml\" }}\n",
            q(&format!("http://{}/hooks", r.addr)),
            q(secret.to_str().expect("utf-8 path"))
        ));
    }
    b.build()
}

fn secret_file() -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(f.path(), format!("  {SECRET}\n")).expect("write secret");
    f
}

/// Healthy fake upstreams, a receiver, the secret, and the proxy running a rollout through
/// `steps` with the receiver subscribed to every hook.
/// Everything lives as long as the value (bind it whole: a destructuring `..` would drop the
/// rest at once).
struct Setup {
    _stable: FakeUpstream,
    canary: FakeUpstream,
    receiver: Receiver,
    _secret: tempfile::NamedTempFile,
    proxy: Proxy,
}

async fn setup(steps: &str) -> Setup {
    let stable = FakeUpstream::start("stable").await;
    let canary = FakeUpstream::start("canary").await;
    let receiver = Receiver::start().await;
    let secret = secret_file();
    let text = rollout_config(
        &stable.url(),
        &canary.url(),
        steps,
        Some((&receiver, secret.path())),
    );
    let proxy = Proxy::start(&text).await;
    Setup {
        _stable: stable,
        canary,
        receiver,
        _secret: secret,
        proxy,
    }
}

async fn rollout_until(admin: &AdminClient, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    poll_until(DEADLINE, what, || async {
        let r = admin.get_json("/rollout").await;
        f(&r).then_some(r)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_canary_walks_every_step_and_the_receiver_sees_every_webhook_in_order() {
    let setup = setup("[10, 50, 100]").await;
    let (receiver, proxy) = (&setup.receiver, &setup.proxy);
    let admin = proxy.admin_client();
    assert_eq!(admin.get_json("/rollout").await["phase"], "idle");
    let traffic = generate_traffic(proxy.addr());

    let started = admin.call("POST", "/rollout/start", None).await;
    assert_eq!(started.status, StatusCode::OK, "{started:?}");
    assert_eq!(started.json()["phase"], "progressing");
    let again = admin.call("POST", "/rollout/start", None).await;
    assert_eq!(again.status, StatusCode::CONFLICT, "{again:?}");
    assert!(
        again.json()["error"]
            .as_str()
            .unwrap_or("")
            .contains("already progressing"),
        "{again:?}"
    );

    let at_step_one = rollout_until(&admin, "step 1", |r| r["step"] == 1).await;
    assert_eq!(at_step_one["weight"], 10);
    let w = admin.get_json("/weights").await;
    assert_eq!(w["source"], "rollout", "{w}");

    let done = rollout_until(&admin, "the rollout to end", |r| {
        r["phase"] == "succeeded" || r["phase"] == "failed"
    })
    .await;
    traffic.store(true, Ordering::Relaxed);
    assert_eq!(done["phase"], "succeeded", "{done}");
    let history = done["history"].as_array().expect("history");
    assert_eq!(history.len(), 2, "{done}");
    for (i, h) in history.iter().enumerate() {
        assert_eq!(h["step"], i + 1);
        assert_eq!(h["outcome"], "passed", "{done}");
        assert!(
            h["detail"]
                .as_str()
                .unwrap_or("")
                .contains("error_rate_increase pass"),
            "{h}"
        );
    }
    let w = admin.get_json("/weights").await;
    assert_eq!(w["effective"]["canary"], 100, "{w}");

    // Every hook in the order of the rollout, each signed, the last one saying it succeeded.
    let seq = poll_until(DEADLINE, "post-rollout to arrive", || async {
        let s = receiver.sequence();
        (s.last().map(String::as_str) == Some("post-rollout")).then_some(s)
    })
    .await;
    assert_eq!(
        seq,
        [
            "confirm-rollout",
            "pre-rollout",
            "rollout",
            "confirm-traffic-increase",
            "rollout",
            "confirm-promotion",
            "post-rollout"
        ],
        "{:?}",
        receiver.calls()
    );
    let calls = receiver.calls();
    assert!(
        calls.iter().all(|c| c.signed_ok),
        "every call is signed: {calls:?}"
    );
    let last = calls
        .iter()
        .rev()
        .find(|c| c.event == "post-rollout")
        .expect("post-rollout");
    assert_eq!(last.body["phase"], "succeeded");
    assert_eq!(last.body["upstream"], "canary");
    assert_eq!(last.body["metadata"]["team"], "ml");
    let second = calls
        .iter()
        .filter(|c| c.event == "rollout")
        .nth(1)
        .expect("second rollout hook");
    assert_eq!(
        (second.body["step"].as_u64(), second.body["weight"].as_f64()),
        (Some(2), Some(50.0))
    );

    let m = admin.metrics().await;
    assert_eq!(
        m.value("canaryd_rollout_phase", &[("phase", "succeeded")]),
        Some(1.0),
        "{}",
        m.text
    );
    assert_eq!(
        m.value("canaryd_rollout_step", &[]),
        Some(2.0),
        "{}",
        m.text
    );
    assert!(
        m.sum("canaryd_webhook_calls_total", &[("result", "success")]) >= 7.0,
        "{}",
        m.text
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_that_turns_bad_at_step_3_is_rolled_back_on_the_analysis() {
    let setup = setup("[10, 25, 50, 100]").await;
    let (canary, receiver, proxy) = (&setup.canary, &setup.receiver, &setup.proxy);
    let admin = proxy.admin_client();
    let traffic = generate_traffic(proxy.addr());
    assert_eq!(
        admin.call("POST", "/rollout/start", None).await.status,
        StatusCode::OK
    );
    rollout_until(&admin, "step 3", |r| r["step"] == 3).await;
    canary.set_status(500);
    let done = rollout_until(&admin, "the rollout to end", |r| {
        r["phase"] == "failed" || r["phase"] == "succeeded"
    })
    .await;
    traffic.store(true, Ordering::Relaxed);
    assert_eq!(done["phase"], "failed", "{done}");
    let history = done["history"].as_array().expect("history");
    assert_eq!(history.len(), 3, "{done}");
    assert_eq!(history[2]["outcome"], "rolled back", "{done}");
    assert!(
        done["reason"]
            .as_str()
            .unwrap_or("")
            .contains("rolled back at step 3"),
        "{done}"
    );
    let w = admin.get_json("/weights").await;
    assert_eq!(w["tripped"]["canary"]["reason"], "analysis", "{w}");
    assert_eq!(w["effective"]["canary"], 0, "{w}");
    let m = admin.metrics().await;
    assert_eq!(
        m.sum(
            "canaryd_rollbacks_total",
            &[("upstream", "canary"), ("reason", "analysis")]
        ),
        1.0,
        "{}",
        m.text
    );
    // The receiver was asked the rollback question while the rollout ran, and told the end.
    let calls = poll_until(DEADLINE, "post-rollout to arrive", || async {
        let c = receiver.calls();
        c.iter().any(|c| c.event == "post-rollout").then_some(c)
    })
    .await;
    assert!(calls.iter().any(|c| c.event == "rollback"), "{calls:?}");
    let end = calls
        .iter()
        .find(|c| c.event == "post-rollout")
        .expect("post-rollout");
    assert_eq!(end.body["phase"], "failed");
    assert_eq!(end.body["step"], 3);
    assert!(calls.iter().any(|c| c.event == "event"
        && c.body["message"]
            .as_str()
            .unwrap_or("")
            .contains("error_rate")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gate_answering_500_holds_the_rollout_waiting_until_it_answers_200() {
    let setup = setup("[10, 50, 100]").await;
    let (receiver, proxy) = (&setup.receiver, &setup.proxy);
    receiver.gate_status.store(500, Ordering::SeqCst);
    let admin = proxy.admin_client();
    let traffic = generate_traffic(proxy.addr());
    assert_eq!(
        admin.call("POST", "/rollout/start", None).await.status,
        StatusCode::OK
    );
    let waiting = rollout_until(&admin, "the gate to hold it", |r| r["phase"] == "waiting").await;
    assert_eq!(
        waiting["waiting_for"],
        serde_json::json!(["confirm-traffic-increase"]),
        "{waiting}"
    );
    assert_eq!(waiting["step"], 1);
    assert!(
        waiting["reason"]
            .as_str()
            .unwrap_or("")
            .contains("confirm-traffic-increase"),
        "{waiting}"
    );
    // It asks again at an interval, and stays at step 1 while the answer is 500.
    poll_until(DEADLINE, "the gate to be asked again", || async {
        let asked = receiver
            .calls()
            .iter()
            .filter(|c| c.event == "confirm-traffic-increase")
            .count();
        (asked >= 3).then_some(())
    })
    .await;
    let still = admin.get_json("/rollout").await;
    assert_eq!(
        (still["phase"].clone(), still["step"].clone()),
        ("waiting".into(), 1.into()),
        "{still}"
    );
    assert_eq!(admin.get_json("/weights").await["effective"]["canary"], 10);

    receiver.gate_status.store(200, Ordering::SeqCst);
    let done = rollout_until(&admin, "the rollout to end", |r| {
        r["phase"] == "succeeded" || r["phase"] == "failed"
    })
    .await;
    traffic.store(true, Ordering::Relaxed);
    assert_eq!(done["phase"], "succeeded", "{done}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impossible_rollout_calls_are_refused_with_the_phase() {
    let stable = FakeUpstream::start("stable").await;
    let canary = FakeUpstream::start("canary").await;
    let text = rollout_config(&stable.url(), &canary.url(), "[10, 100]", None);
    let proxy = Proxy::start(&text).await;
    let admin = proxy.admin_client();
    for path in ["/rollout/pause", "/rollout/resume", "/rollout/abort"] {
        let r = admin.call("POST", path, None).await;
        assert_eq!(r.status, StatusCode::CONFLICT, "{path}: {r:?}");
        assert!(
            r.json()["error"]
                .as_str()
                .unwrap_or("")
                .contains("no rollout has run"),
            "{r:?}"
        );
    }
    admin.call("POST", "/rollback", None).await;
    let r = admin.call("POST", "/rollout/start", None).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{r:?}");
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap_or("")
            .contains("canary is tripped"),
        "{r:?}"
    );
    admin.call("POST", "/reset", None).await;
    assert_eq!(
        admin.call("POST", "/rollout/start", None).await.status,
        StatusCode::OK
    );
    assert_eq!(
        admin.call("POST", "/rollout/pause", None).await.status,
        StatusCode::OK
    );
    let r = admin.call("POST", "/rollout/pause", None).await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap_or("")
            .contains("the rollout is paused"),
        "{r:?}"
    );
    // An admin weight change while it runs pauses it with the reason; resume takes them back.
    assert_eq!(
        admin.call("POST", "/rollout/resume", None).await.status,
        StatusCode::OK
    );
    rollout_until(&admin, "step 1", |r| {
        r["step"] == 1 && r["phase"] == "progressing"
    })
    .await;
    admin
        .call("PUT", "/weights", Some(r#"{"canary": 30}"#))
        .await;
    let paused = rollout_until(&admin, "the rollout to pause", |r| r["phase"] == "paused").await;
    assert!(
        paused["reason"]
            .as_str()
            .unwrap_or("")
            .contains("the admin API set the weights"),
        "{paused}"
    );
    assert_eq!(
        admin.call("POST", "/rollout/resume", None).await.status,
        StatusCode::OK
    );
    poll_until(DEADLINE, "the rollout's weight back", || async {
        let w = admin.get_json("/weights").await;
        (w["source"] == "rollout" && w["effective"]["canary"] == 10).then_some(())
    })
    .await;
    let aborted = admin.call("POST", "/rollout/abort", None).await;
    assert_eq!(aborted.status, StatusCode::OK, "{aborted:?}");
    assert_eq!(aborted.json()["phase"], "failed");
    let w = admin.get_json("/weights").await;
    assert_eq!(w["tripped"]["canary"]["reason"], "manual", "{w}");
    let r = admin.call("POST", "/rollout/resume", None).await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap_or("")
            .contains("the rollout is failed"),
        "{r:?}"
    );
}

/// The admin address from the `admin listening` log line.
fn admin_addr(p: &CanarydProcess) -> Option<SocketAddr> {
    p.output()
        .lines()
        .find(|l| l.contains("admin listening"))
        .and_then(|l| {
            let at = l.find("addr=")? + 5;
            l[at..].split_whitespace().next()?.parse().ok()
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_step_2_and_a_restart_resume_at_step_2_with_its_time() {
    let stable = FakeUpstream::start("stable").await;
    let canary = FakeUpstream::start("canary").await;
    let state = tempfile::tempdir().expect("temp dir");
    let state_file = state.path().join("state.json");
    let text = ConfigBuilder::new()
        .upstream("stable", &stable.url(), "100")
        .upstream("canary", &canary.url(), "0")
        .set("state", "file", &q(state_file.to_str().expect("utf-8")))
        .set("rollout", "steps", "[10, 50, 100]")
        .set("rollout", "min_step_duration", &q("1s"))
        .set("rollout", "min_requests", "100")
        .set("rollout", "max_step_duration", &q("1h"))
        .build();
    let first = CanarydProcess::spawn(&text).await;
    let admin = AdminClient::new(admin_addr(&first).expect("admin address"));
    let traffic = generate_traffic(first.addr());
    assert_eq!(
        admin.call("POST", "/rollout/start", None).await.status,
        StatusCode::OK
    );
    rollout_until(&admin, "step 2", |r| r["step"] == 2).await;
    // No traffic at step 2: it cannot pass, and its time keeps growing.
    traffic.store(true, Ordering::Relaxed);
    let before = rollout_until(&admin, "4.5 s at step 2", |r| {
        r["at_step"]["seconds"].as_f64().is_some_and(|s| s >= 4.5)
    })
    .await;
    assert_eq!(before["phase"], "progressing", "{before}");
    first.signal("KILL");
    drop(first);

    let second = CanarydProcess::spawn(&text).await;
    let admin = AdminClient::new(admin_addr(&second).expect("admin address"));
    let after = admin.get_json("/rollout").await;
    assert_eq!(after["phase"], "progressing", "{after}");
    assert_eq!(after["step"], 2, "{after}");
    assert_eq!(after["weight"], 50, "{after}");
    let seconds = after["at_step"]["seconds"].as_f64().expect("seconds");
    // The time at the step is saved at least every 2 s: at most that much is lost.
    assert!(
        seconds >= 2.4,
        "{seconds} s at step 2 after the restart: {after}"
    );
    assert_eq!(
        after["history"].as_array().map(Vec::len),
        Some(2),
        "{after}"
    );
    let w = admin.get_json("/weights").await;
    assert_eq!(
        (w["source"].clone(), w["effective"]["canary"].clone()),
        ("rollout".into(), 50.into()),
        "{w}"
    );
    // And it goes on from there.
    let traffic = generate_traffic(second.addr());
    let done = rollout_until(&admin, "the rollout to end", |r| r["phase"] == "succeeded").await;
    traffic.store(true, Ordering::Relaxed);
    assert_eq!(done["history"].as_array().map(Vec::len), Some(2), "{done}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_canary_url_starts_a_rollout_from_the_first_step_with_on_new_url() {
    let stable = FakeUpstream::start("stable").await;
    let old = FakeUpstream::start("canary").await;
    let new = FakeUpstream::start("canary").await;
    let config = |canary: &str| {
        ConfigBuilder::new()
            .upstream("stable", &stable.url(), "100")
            .upstream("canary", canary, "0")
            .set("rollout", "steps", "[10, 100]")
            .set("rollout", "min_step_duration", &q("1h"))
            .set("rollout", "max_step_duration", &q("2h"))
            .set("rollout", "start", &q("on_new_url"))
            .build()
    };
    let mut proxy = Proxy::start(&config(&old.url())).await;
    let admin = proxy.admin_client();
    // Serving its first url is not a new build.
    assert_eq!(admin.get_json("/rollout").await["phase"], "idle");
    proxy.rewrite_config(&config(&new.url()), Rewrite::Rename);
    let r = rollout_until(&admin, "a rollout of the new build", |r| r["step"] == 1).await;
    assert_eq!(r["phase"], "progressing", "{r}");
    assert_eq!(r["url"], new.url().trim_end_matches('/'), "{r}");
    assert!(r["reason"].as_str().unwrap_or("").contains("step 1"), "{r}");
    assert_eq!(admin.get_json("/weights").await["effective"]["canary"], 10);
}
