//! End-to-end tests of shadow copies and response analysis: canaryd in front of fake model
//! servers that answer JSON predictions decided by the request's input number.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::{json, Value};

const DEADLINE: Duration = Duration::from_secs(60);

/// How a fake model answers input number `n` (the `x-input` header).
type Answer = fn(u64) -> Value;

/// A fake model server: answers `answer(x-input)` as JSON, records request bodies, and,
/// while `hold` is set, keeps requests waiting.
struct Model {
    addr: SocketAddr,
    bodies: Arc<Mutex<Vec<Bytes>>>,
    hold: Arc<AtomicBool>,
    served: Arc<AtomicUsize>,
}

impl Model {
    async fn start(answer: Answer) -> Model {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let hold = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicUsize::new(0));
        let (b, h, s) = (bodies.clone(), hold.clone(), served.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (b, h, s) = (b.clone(), h.clone(), s.clone());
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (b, h, s) = (b.clone(), h.clone(), s.clone());
                    async move {
                        let n: u64 = req
                            .headers()
                            .get("x-input")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0);
                        let body = req.into_body().collect().await.map(|c| c.to_bytes());
                        b.lock().unwrap().push(body.unwrap_or_default());
                        while h.load(Ordering::SeqCst) {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        s.fetch_add(1, Ordering::SeqCst);
                        let mut resp = Response::new(Full::new(Bytes::from(answer(n).to_string())));
                        resp.headers_mut()
                            .insert("content-type", "application/json".parse().unwrap());
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
        Model {
            addr,
            bodies,
            hold,
            served,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

fn positive(_: u64) -> Value {
    json!({"prediction": "positive", "confidence": 0.9})
}

/// Disagrees with [`positive`] on every 4th input.
fn every_fourth_negative(n: u64) -> Value {
    let label = if n % 4 == 3 { "negative" } else { "positive" };
    json!({"prediction": label, "confidence": 0.9})
}

/// Like [`positive`], with a field that differs at every call (noise).
fn positive_with_request_id(_: u64) -> Value {
    json!({"prediction": "positive", "request_id": fastrand::u64(..)})
}

fn shadow_config(primary: &str, shadow: &str, extra: &[(&str, &str)]) -> String {
    let mut b = ConfigBuilder::new()
        .upstream("stable", primary, "100")
        .upstream("candidate", shadow, "0")
        .set("shadow", "upstream", &q("candidate"))
        .set("shadow", "percent", "100")
        .set("shadow", "methods", r#"["GET", "POST"]"#)
        .set("shadow", "max_in_flight", "1000")
        .set("shadow", "compare", r#"["/prediction"]"#);
    for (k, v) in extra {
        b = b.set("shadow", k, v);
    }
    b.build()
}

/// Sends inputs `range` (one request each, `x-input: n`), `concurrency` at a time; every
/// reply must be the primary's 200.
async fn send_inputs(addr: SocketAddr, range: std::ops::Range<u64>, concurrency: usize) {
    let next = Arc::new(std::sync::atomic::AtomicU64::new(range.start));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let next = next.clone();
        let end = range.end;
        tasks.push(tokio::spawn(async move {
            let client = HttpClient::http1();
            loop {
                let n = next.fetch_add(1, Ordering::SeqCst);
                if n >= end {
                    break;
                }
                let input = n.to_string();
                let user = format!("user-{n}");
                let reply = client
                    .get(
                        addr,
                        "/predict",
                        &[("x-input", &input), ("x-user-id", &user)],
                    )
                    .await;
                assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
            }
        }));
    }
    for t in tasks {
        t.await.expect("sender");
    }
}

async fn shadow_until(admin: &AdminClient, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    poll_until(DEADLINE, what, || async {
        let s = admin.get_json("/shadow").await;
        f(&s).then_some(s)
    })
    .await
}

fn total(s: &Value) -> u64 {
    ["match", "mismatch", "error", "skipped", "dropped"]
        .iter()
        .map(|k| s["requests"][k].as_u64().unwrap_or(0))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_that_disagrees_on_every_4th_input_shows_exactly_25_percent() {
    const N: u64 = 10_000;
    let primary = Model::start(positive).await;
    let shadow = Model::start(every_fourth_negative).await;
    let proxy = Proxy::start(&shadow_config(&primary.url(), &shadow.url(), &[])).await;
    let admin = proxy.admin_client();
    send_inputs(proxy.addr(), 0..N, 8).await;
    let s = shadow_until(&admin, "every copy to be compared", |s| total(s) == N).await;
    assert_eq!(s["requests"]["mismatch"], N / 4, "{s}");
    assert_eq!(s["requests"]["match"], N - N / 4, "{s}");
    assert_eq!(s["mismatch_rate"], 0.25, "{s}");
    assert_eq!(s["field_mismatches"]["/prediction"], N / 4, "{s}");
    let diffs = admin.get_json("/shadow/diffs").await;
    let diffs = diffs.as_array().expect("a list");
    assert_eq!(diffs.len(), 50, "the last 50 only");
    let d = &diffs[0];
    assert_eq!(
        (d["method"].as_str(), d["path"].as_str()),
        (Some("GET"), Some("/predict"))
    );
    assert_eq!(d["fields"][0]["field"], "/prediction");
    assert_eq!(d["fields"][0]["primary"], "positive");
    assert_eq!(d["fields"][0]["shadow"], "negative");
    let m = admin.metrics().await;
    assert_eq!(
        m.value("canaryd_shadow_requests_total", &[("result", "mismatch")]),
        Some((N / 4) as f64),
        "{}",
        m.text
    );
    assert_eq!(
        m.value(
            "canaryd_shadow_field_mismatches_total",
            &[("field", "/prediction")]
        ),
        Some((N / 4) as f64)
    );
    // Users only ever got the primary's answers, and the shadow never entered the split.
    assert_eq!(primary.served.load(Ordering::SeqCst), N as usize);
    assert_eq!(shadow.served.load(Ordering::SeqCst), N as usize);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_bodies_are_copied_exactly_and_larger_ones_are_skipped_with_the_primary_intact() {
    let primary = Model::start(positive).await;
    let shadow = Model::start(positive).await;
    let text = shadow_config(&primary.url(), &shadow.url(), &[("max_body_bytes", "1000")]);
    let proxy = Proxy::start(&text).await;
    let admin = proxy.admin_client();
    let client = HttpClient::http1();
    let post =
        |body: Vec<u8>| client.fetch(request("POST", proxy.addr(), "/predict", &[], full(body)));
    let small: Vec<u8> = (0..999u32).map(|i| (i * 7 % 251) as u8).collect();
    let reply = post(small.clone()).await;
    assert_eq!(reply.status, StatusCode::OK);
    let s = shadow_until(&admin, "the copy to be compared", |s| total(s) == 1).await;
    assert_eq!(s["requests"]["match"], 1, "{s}");
    assert_eq!(shadow.bodies.lock().unwrap()[0].as_ref(), &small[..]);

    let large = vec![b'x'; 5000];
    let reply = post(large.clone()).await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "the primary answers as always"
    );
    assert_eq!(reply.json()["prediction"], "positive");
    assert_eq!(
        primary.bodies.lock().unwrap()[1].len(),
        5000,
        "the primary got all of it"
    );
    let s = shadow_until(&admin, "the large copy to be skipped", |s| total(s) == 2).await;
    assert_eq!(s["requests"]["skipped"], 1, "{s}");
    assert_eq!(
        shadow.bodies.lock().unwrap().len(),
        1,
        "nothing was sent for it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_or_dead_shadow_never_holds_up_a_client_and_excess_copies_are_dropped() {
    let primary = Model::start(positive).await;
    let shadow = Model::start(positive).await;
    shadow.hold.store(true, Ordering::SeqCst);
    let text = shadow_config(&primary.url(), &shadow.url(), &[("max_in_flight", "2")]);
    let proxy = Proxy::start(&text).await;
    let admin = proxy.admin_client();
    // Every client gets its answer while the shadow holds every copy it has.
    send_inputs(proxy.addr(), 0..20, 1).await;
    poll_until(DEADLINE, "the shadow to hold two copies", || async {
        (shadow.bodies.lock().unwrap().len() == 2).then_some(())
    })
    .await;
    let s = admin.get_json("/shadow").await;
    assert_eq!(s["requests"]["dropped"], 18, "{s}");
    assert_eq!(shadow.served.load(Ordering::SeqCst), 0);
    shadow.hold.store(false, Ordering::SeqCst);
    let s = shadow_until(&admin, "the held copies to finish", |s| total(s) == 20).await;
    assert_eq!(s["requests"]["match"], 2, "{s}");

    // A dead shadow: the clients see nothing of it; after a failure copies wait (100 ms,
    // doubling to 5 s), so it costs a connection attempt now and then, not one per request.
    let dead = closed_port_url().await;
    let proxy = Proxy::start(&shadow_config(&primary.url(), &dead, &[])).await;
    let admin = proxy.admin_client();
    send_inputs(proxy.addr(), 0..200, 2).await;
    let s = shadow_until(&admin, "every copy to be counted", |s| total(s) == 200).await;
    let errors = s["requests"]["error"].as_u64().expect("errors");
    assert!((1..20).contains(&errors), "{s}");
    assert_eq!(s["requests"]["dropped"].as_u64(), Some(200 - errors), "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fields_that_differ_between_two_calls_of_the_primary_are_noise_not_mismatches() {
    const N: u64 = 400;
    let primary = Model::start(positive_with_request_id).await;
    let shadow = Model::start(every_fourth_negative).await;
    let text = shadow_config(
        &primary.url(),
        &shadow.url(),
        &[
            ("compare", r#"["/prediction", "/request_id"]"#),
            ("noise_percent", "100"),
        ],
    );
    let proxy = Proxy::start(&text).await;
    let admin = proxy.admin_client();
    send_inputs(proxy.addr(), 0..N, 4).await;
    let s = shadow_until(&admin, "every copy to be compared", |s| total(s) == N).await;
    assert_eq!(s["noise"]["checks"], N, "{s}");
    assert_eq!(s["noise"]["noisy_fields"]["/request_id"], N, "{s}");
    assert!(
        s["noise"]["noisy_fields"].get("/prediction").is_none(),
        "{s}"
    );
    // Only the prediction counts: a quarter of the inputs.
    assert_eq!(s["requests"]["mismatch"], N / 4, "{s}");
    assert!(s["field_mismatches"].get("/request_id").is_none(), "{s}");
}

/// The canary's label flips on every other input.
fn flips_half(n: u64) -> Value {
    let label = if n % 2 == 1 { "negative" } else { "positive" };
    json!({"prediction": label, "confidence": if n % 2 == 1 { 0.2 } else { 0.9 }})
}

fn drift_config(stable: &str, canary: &str, max_drift: Option<&str>) -> String {
    let mut b = ConfigBuilder::new()
        .upstream("stable", stable, "50")
        .upstream("canary", canary, "50")
        .set("rollback", "enabled", "true")
        .set("analysis", "label_pointer", &q("/prediction"))
        .set("analysis", "score_pointer", &q("/confidence"));
    if let Some(m) = max_drift {
        b = b.set("analysis", "max_drift", m);
    }
    b.build()
}

fn arm<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["arms"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["name"] == name))
        .expect("arm")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_shows_for_a_canary_whose_labels_flip_and_not_for_an_identical_one() {
    let stable = Model::start(positive).await;
    let same = Model::start(positive).await;
    let flipping = Model::start(flips_half).await;

    let proxy = Proxy::start(&drift_config(&stable.url(), &same.url(), None)).await;
    let admin = proxy.admin_client();
    send_inputs(proxy.addr(), 0..400, 4).await;
    let s = admin.get_json("/status").await;
    let drift = &arm(&s, "canary")["responses"]["drift"];
    assert_eq!(drift["/prediction"]["js_distance"], 0.0, "{s}");
    assert_eq!(drift["/confidence"]["ks"], 0.0, "{s}");

    let proxy = Proxy::start(&drift_config(&stable.url(), &flipping.url(), None)).await;
    let admin = proxy.admin_client();
    send_inputs(proxy.addr(), 0..400, 4).await;
    let s = admin.get_json("/status").await;
    let canary = &arm(&s, "canary")["responses"];
    let js = canary["drift"]["/prediction"]["js_distance"]
        .as_f64()
        .expect("js");
    assert!(js > 0.3, "{s}");
    assert!(
        canary["drift"]["/prediction"]["p_value"]
            .as_f64()
            .expect("p")
            < 1e-6,
        "{s}"
    );
    assert!(
        canary["drift"]["/confidence"]["ks"].as_f64().expect("ks") > 0.4,
        "{s}"
    );
    assert!(
        canary["labels"]["negative"].as_u64().expect("negatives") > 50,
        "{s}"
    );
    let m = admin.metrics().await;
    assert!(
        m.value(
            "canaryd_drift",
            &[("upstream", "canary"), ("field", "/prediction")]
        )
        .is_some_and(|v| v > 0.3),
        "{}",
        m.text
    );
    assert!(
        m.sum(
            "canaryd_response_labels_total",
            &[("upstream", "canary"), ("label", "negative")]
        ) > 50.0
    );
    // Without max_drift nothing trips.
    assert_eq!(admin.get_json("/weights").await["tripped"], json!({}));

    // With max_drift, the flipping canary trips (reason drift); the circuit's error
    // analysis has nothing against it (all 200s).
    let proxy = Proxy::start(&drift_config(&stable.url(), &flipping.url(), Some("0.1"))).await;
    let admin = proxy.admin_client();
    send_inputs(proxy.addr(), 0..2000, 4).await;
    let w = poll_until(DEADLINE, "the drift trip", || async {
        let w = admin.get_json("/weights").await;
        (!w["tripped"]["canary"].is_null()).then_some(w)
    })
    .await;
    assert_eq!(w["tripped"]["canary"]["reason"], "drift", "{w}");
    assert!(
        w["tripped"]["canary"]["detail"]
            .as_str()
            .unwrap_or("")
            .contains("Jensen-Shannon"),
        "{w}"
    );
}
