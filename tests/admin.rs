//! End-to-end tests of the admin API, its metrics and the state file: canaryd
//! in-process in front of fake upstreams, driven over real HTTP on the admin listener.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::*;
use http::StatusCode;
use serde_json::{json, Value};

/// Users routed in bulk checks.
const USERS: usize = 600;
/// Requests in flight at once in bulk checks.
const CONCURRENCY: usize = 8;
/// How long a config rewrite may take to be applied (or rejected).
const RELOAD_DEADLINE: Duration = Duration::from_secs(10);
/// How long the asynchronous window task may take to see finished requests.
const WINDOW_DEADLINE: Duration = Duration::from_secs(5);
/// Body size just over the admin limit (64 KiB).
const OVERSIZED: usize = 64 * 1024 + 1;

/// stable + canary fake upstreams.
async fn arms() -> (FakeUpstream, FakeUpstream) {
    (
        FakeUpstream::start("stable").await,
        FakeUpstream::start("canary").await,
    )
}

fn two_arm_config(
    stable: &FakeUpstream,
    canary: &FakeUpstream,
    canary_weight: &str,
) -> ConfigBuilder {
    let stable_weight = format!("{}", 100.0 - canary_weight.parse::<f64>().unwrap());
    ConfigBuilder::new()
        .upstream("stable", &stable.url(), &stable_weight)
        .upstream("canary", &canary.url(), canary_weight)
}

/// The arm (per `x-canaryd-upstream`, cross-checked with the fake's body) serving `user`.
async fn arm_of(client: &HttpClient, addr: SocketAddr, user: &str) -> String {
    let reply = client.get(addr, "/", &[("x-user-id", user)]).await;
    assert_eq!(reply.status, StatusCode::OK, "{user}: {reply:?}");
    let arm = reply.arm().expect("arm header").to_string();
    assert_eq!(
        reply.body, arm,
        "{user}: header and serving upstream disagree"
    );
    arm
}

/// Routes every id through the proxy and checks each one against the reference rule for a
/// canary of `canary_percent`; returns the users the canary served.
async fn assert_split(
    client: &HttpClient,
    addr: SocketAddr,
    ids: &[String],
    canary_percent: u32,
    what: &str,
) -> BTreeSet<String> {
    let replies = route_all(client, addr, ids, CONCURRENCY).await;
    let mut wrong = Vec::new();
    let mut canary_users = BTreeSet::new();
    for (id, reply) in ids.iter().zip(&replies) {
        let expected = if reference_arm(id, canary_percent) {
            "canary"
        } else {
            "stable"
        };
        if reply.status != StatusCode::OK || reply.arm() != Some(expected) || reply.body != expected
        {
            wrong.push(format!(
                "{id}: expected {expected}, got {} {:?}/{:?}",
                reply.status,
                reply.arm(),
                reply.body
            ));
        }
        if reply.arm() == Some("canary") {
            canary_users.insert(id.clone());
        }
    }
    assert!(
        wrong.is_empty(),
        "{what}: {} of {} users misrouted at canary {canary_percent}%; first: {:?}",
        wrong.len(),
        ids.len(),
        &wrong[..wrong.len().min(5)]
    );
    canary_users
}

/// The error message of a refused admin call, checking the `{"error": "..."}` shape.
fn error_message(reply: &Reply) -> String {
    let ctype = reply.header("content-type").unwrap_or("");
    assert!(
        ctype.starts_with("application/json"),
        "admin error should be JSON, got {ctype:?}: {reply:?}"
    );
    let body = reply.json();
    let obj = body.as_object().expect("error body is an object");
    assert_eq!(
        obj.keys().collect::<Vec<_>>(),
        vec!["error"],
        "error body has exactly one key: {body}"
    );
    let msg = body["error"]
        .as_str()
        .expect("error is a string")
        .to_string();
    assert!(!msg.trim().is_empty(), "empty error message");
    msg
}

/// The admin listener is bound before `run` starts, so `/readyz` may answer 503 for a moment
/// while `run` is still starting up; it must turn 200 once the proxy serves.
async fn wait_ready(admin: &AdminClient) {
    poll_until(Duration::from_secs(5), "/readyz to answer 200", || async {
        (admin.get("/readyz").await.status == StatusCode::OK).then_some(())
    })
    .await;
}

fn assert_weights(doc: &Value, key: &str, expected: Value) {
    assert_eq!(doc[key], expected, "{key} weights in {doc}");
}

// ---------------------------------------------------------------------------------------------
// Calls and error statuses
// ---------------------------------------------------------------------------------------------

/// One refused call: method, path, body, status, a fragment of the message, `Allow`.
struct Refusal {
    method: &'static str,
    path: &'static str,
    body: Option<&'static str>,
    status: u16,
    fragment: &'static str,
    allow: Option<&'static str>,
}

const fn refused(
    method: &'static str,
    path: &'static str,
    body: Option<&'static str>,
    status: u16,
    fragment: &'static str,
) -> Refusal {
    Refusal {
        method,
        path,
        body,
        status,
        fragment,
        allow: None,
    }
}

const fn not_allowed(method: &'static str, path: &'static str, allow: &'static str) -> Refusal {
    Refusal {
        method,
        path,
        body: None,
        status: 405,
        fragment: method,
        allow: Some(allow),
    }
}

const REFUSALS: &[Refusal] = &[
    refused("GET", "/nope", None, 404, "/nope"),
    not_allowed("POST", "/", "GET"),
    refused(
        "PUT",
        "/weights/canary",
        Some(r#"{"canary": 5}"#),
        404,
        "/weights/canary",
    ),
    not_allowed("DELETE", "/weights", "GET, PUT"),
    not_allowed("POST", "/weights", "GET, PUT"),
    not_allowed("PATCH", "/weights", "GET, PUT"),
    not_allowed("GET", "/promote", "POST"),
    not_allowed("PUT", "/rollback", "POST"),
    not_allowed("GET", "/reset", "POST"),
    not_allowed("POST", "/status", "GET"),
    not_allowed("DELETE", "/metrics", "GET"),
    not_allowed("PUT", "/route", "GET"),
    not_allowed("POST", "/healthz", "GET"),
    not_allowed("POST", "/readyz", "GET"),
    // Not JSON at all, truncated, or not an object.
    refused("PUT", "/weights", Some("canary=25"), 400, "invalid JSON"),
    refused(
        "PUT",
        "/weights",
        Some(r#"{"canary": 25"#),
        400,
        "invalid JSON",
    ),
    refused("PUT", "/weights", None, 400, "JSON object"),
    refused("PUT", "/weights", Some("   \n"), 400, "JSON object"),
    refused("PUT", "/weights", Some("[25]"), 400, "JSON object"),
    refused("PUT", "/weights", Some("25"), 400, "JSON object"),
    refused("PUT", "/weights", Some(r#""canary""#), 400, "JSON object"),
    refused("PUT", "/weights", Some("{}"), 400, "empty"),
    // Wrong types and out-of-range numbers.
    refused(
        "PUT",
        "/weights",
        Some(r#"{"canary": "25"}"#),
        400,
        "canary",
    ),
    refused(
        "PUT",
        "/weights",
        Some(r#"{"canary": true}"#),
        400,
        "canary",
    ),
    refused(
        "PUT",
        "/weights",
        Some(r#"{"canary": null}"#),
        400,
        "canary",
    ),
    refused(
        "PUT",
        "/weights",
        Some(r#"{"canary": [25]}"#),
        400,
        "canary",
    ),
    refused(
        "PUT",
        "/weights",
        Some(r#"{"canary": {"w": 25}}"#),
        400,
        "canary",
    ),
    refused(
        "PUT",
        "/weights",
        Some(r#"{"canary": 12.345}"#),
        400,
        "2 decimals",
    ),
    refused(
        "PUT",
        "/weights",
        Some(r#"{"canary": 0.001}"#),
        400,
        "2 decimals",
    ),
    refused("PUT", "/weights", Some(r#"{"canary": -1}"#), 400, "canary"),
    refused(
        "PUT",
        "/weights",
        Some(r#"{"canary": -0.01}"#),
        400,
        "canary",
    ),
    refused(
        "PUT",
        "/weights",
        Some(r#"{"canary": 100.01}"#),
        400,
        "canary",
    ),
    refused("PUT", "/weights", Some(r#"{"canary": 1e3}"#), 400, "canary"),
    // Unknown names (alone, or next to a valid change that must not be applied either).
    refused("PUT", "/weights", Some(r#"{"nope": 5}"#), 400, "nope"),
    refused(
        "PUT",
        "/weights",
        Some(r#"{"canary": 5, "nope": 5}"#),
        400,
        "nope",
    ),
    // Naming the baseline requires the exact remainder.
    refused(
        "PUT",
        "/weights",
        Some(r#"{"stable": 80, "canary": 25}"#),
        400,
        "sum to 100",
    ),
    refused("PUT", "/weights", Some(r#"{"stable": 50}"#), 400, "stable"),
    refused(
        "PUT",
        "/weights",
        Some(r#"{"stable": 100, "canary": 0.5}"#),
        400,
        "stable",
    ),
    // Promote: unknown arm, wrong types, unknown fields, not an object.
    refused(
        "POST",
        "/promote",
        Some(r#"{"upstream": "nope"}"#),
        400,
        "nope",
    ),
    refused(
        "POST",
        "/promote",
        Some(r#"{"upstream": 5}"#),
        400,
        "string",
    ),
    refused(
        "POST",
        "/promote",
        Some(r#"{"target": "canary"}"#),
        400,
        "target",
    ),
    refused("POST", "/promote", Some(r#"["canary"]"#), 400, "upstream"),
    refused("POST", "/promote", Some("canary"), 400, "invalid JSON"),
    // Route needs a key.
    refused("GET", "/route", None, 400, "key"),
    refused("GET", "/route?user=alice", None, 400, "key"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_calls_answer_their_status_and_change_nothing() {
    let (stable, canary) = arms().await;
    let proxy = Proxy::start(&two_arm_config(&stable, &canary, "10").build()).await;
    let admin = proxy.admin_client();
    let before = admin.weights().await;
    assert_eq!(before["source"], "file", "{before}");

    let mut failures = Vec::new();
    for r in REFUSALS {
        let reply = admin.call(r.method, r.path, r.body).await;
        let what = format!("{} {} {:?}", r.method, r.path, r.body);
        if reply.status.as_u16() != r.status {
            failures.push(format!("{what}: expected {}, got {reply:?}", r.status));
            continue;
        }
        let msg = error_message(&reply);
        if !msg.contains(r.fragment) {
            failures.push(format!("{what}: message {msg:?} lacks {:?}", r.fragment));
        }
        if reply.header("allow") != r.allow {
            failures.push(format!(
                "{what}: Allow {:?}, expected {:?}",
                reply.header("allow"),
                r.allow
            ));
        }
        let after = admin.weights().await;
        if after != before {
            failures.push(format!("{what}: changed /weights from {before} to {after}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} refusals wrong:\n{}",
        failures.len(),
        REFUSALS.len(),
        failures.join("\n")
    );

    // Routing did not change either: the 10% split still holds.
    let client = HttpClient::http1();
    assert_split(&client, proxy.addr(), &user_ids(200), 10, "after refusals").await;
    let metrics = admin.metrics().await;
    assert_eq!(metrics.sum("canaryd_rollbacks_total", &[]), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_get_413_and_change_nothing() {
    let (stable, canary) = arms().await;
    let proxy = Proxy::start(&two_arm_config(&stable, &canary, "10").build()).await;
    let admin = proxy.admin_client();
    let before = admin.weights().await;

    // A valid table padded with whitespace past the limit, with Content-Length and chunked.
    let mut padded = String::from(r#"{"canary": 25}"#);
    padded.push_str(&" ".repeat(OVERSIZED - padded.len()));
    for (method, path) in [("PUT", "/weights"), ("POST", "/promote")] {
        let reply = admin
            .call_with(method, path, &[], full(padded.clone()))
            .await;
        assert_eq!(
            reply.status,
            StatusCode::PAYLOAD_TOO_LARGE,
            "{method} {path} with Content-Length: {reply:?}"
        );
        assert!(error_message(&reply).contains("65536"), "{reply:?}");
        let reply = admin
            .call_with(
                method,
                path,
                &[],
                PatternBody::new(OVERSIZED as u64, 8192, false).boxed_body(),
            )
            .await;
        assert_eq!(
            reply.status,
            StatusCode::PAYLOAD_TOO_LARGE,
            "{method} {path} chunked: {reply:?}"
        );
        error_message(&reply);
        assert_eq!(
            admin.weights().await,
            before,
            "{method} {path} changed weights"
        );
    }

    // Exactly 64 KiB is within the limit.
    let mut at_limit = String::from(r#"{"canary": 25}"#);
    at_limit.push_str(&" ".repeat(OVERSIZED - 1 - at_limit.len()));
    let reply = admin
        .call_with("PUT", "/weights", &[], full(at_limit))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "64 KiB body: {reply:?}");
    assert_eq!(reply.json()["effective"]["canary"], json!(25));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_calls_on_three_arms() {
    let stable = FakeUpstream::start("stable").await;
    let a = FakeUpstream::start("canary-a").await;
    let b = FakeUpstream::start("canary-b").await;
    let cfg = ConfigBuilder::new()
        .upstream("stable", &stable.url(), "80")
        .upstream("canary-a", &a.url(), "10")
        .upstream("canary-b", &b.url(), "10")
        .build();
    let proxy = Proxy::start(&cfg).await;
    let admin = proxy.admin_client();
    let file = json!({"stable": 80, "canary-a": 10, "canary-b": 10});

    let w = admin.weights().await;
    let keys: Vec<&String> = w.as_object().unwrap().keys().collect();
    for k in [
        "generation",
        "source",
        "baseline",
        "effective",
        "configured",
        "file",
        "tripped",
    ] {
        assert!(w.get(k).is_some(), "GET /weights lacks {k}: {w}");
    }
    assert!(w["generation"].is_u64(), "{w}");
    assert_eq!(w["source"], "file");
    assert_eq!(w["baseline"], "stable");
    assert_weights(&w, "effective", file.clone());
    assert_weights(&w, "configured", file.clone());
    assert_weights(&w, "file", file.clone());
    assert_eq!(w["tripped"], json!({}), "{keys:?}");
    let mut generation = w["generation"].as_u64().unwrap();

    // A partial table: the unnamed canary keeps its weight, the baseline gets the rest.
    let steps: &[(Value, Value)] = &[
        (
            json!({"canary-a": 12.5}),
            json!({"stable": 77.5, "canary-a": 12.5, "canary-b": 10}),
        ),
        (
            json!({"canary-b": 0.01}),
            json!({"stable": 87.49, "canary-a": 12.5, "canary-b": 0.01}),
        ),
        (
            json!({"stable": 60, "canary-a": 20, "canary-b": 20}),
            json!({"stable": 60, "canary-a": 20, "canary-b": 20}),
        ),
    ];
    for (body, expected) in steps {
        let doc = admin.set_weights(body.clone()).await;
        assert_eq!(doc["source"], "admin", "PUT {body}: {doc}");
        assert_weights(&doc, "effective", expected.clone());
        assert_weights(&doc, "configured", expected.clone());
        assert_weights(&doc, "file", file.clone());
        let g = doc["generation"].as_u64().unwrap();
        assert!(
            g > generation,
            "generation must increase: {g} after {generation}"
        );
        generation = g;
        assert_eq!(
            admin.weights().await,
            doc,
            "PUT answers the new GET /weights"
        );
    }

    // /route follows the effective table: canaries from 0 in config order.
    for (key, arm, range) in [
        ("alice", "canary-a", [0, 2000]),       // bucket 83
        ("user_456", "canary-b", [2000, 4000]), // bucket 3544
        ("42", "stable", [4000, 10000]),        // bucket 7451
    ] {
        let r = admin.get_json(&format!("/route?key={key}")).await;
        assert_eq!(r["arm"], arm, "{r}");
        assert_eq!(r["range"], json!(range), "{r}");
    }

    // Non-baseline weights over 100 are refused.
    let before = admin.weights().await;
    let reply = admin
        .put_json("/weights", &json!({"canary-a": 70, "canary-b": 40}))
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{reply:?}");
    error_message(&reply);
    assert_eq!(admin.weights().await, before);

    // Promote needs a name when there are several canaries.
    let reply = admin.post("/promote", None).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{reply:?}");
    assert!(error_message(&reply).contains("upstream"), "{reply:?}");
    assert_eq!(admin.weights().await, before);

    let doc = admin
        .post_ok("/promote", Some(&json!({"upstream": "canary-b"})))
        .await;
    let promoted = json!({"stable": 0, "canary-a": 0, "canary-b": 100});
    assert_weights(&doc, "effective", promoted.clone());
    assert_eq!(doc["source"], "admin");
    let client = HttpClient::http1();
    for id in user_ids(50) {
        assert_eq!(arm_of(&client, proxy.addr(), &id).await, "canary-b", "{id}");
    }

    // Rollback trips every canary (reason manual); the baseline takes everything.
    let doc = admin.post_ok("/rollback", None).await;
    assert_weights(
        &doc,
        "effective",
        json!({"stable": 100, "canary-a": 0, "canary-b": 0}),
    );
    assert_weights(&doc, "configured", promoted.clone());
    for (name, up) in [("canary-a", &a), ("canary-b", &b)] {
        let t = &doc["tripped"][name];
        assert_eq!(t["reason"], "manual", "{doc}");
        assert_eq!(t["url"], up.url(), "{doc}");
        assert!(
            t["at"].as_str().is_some_and(|s| s.ends_with('Z')),
            "RFC 3339 time: {doc}"
        );
        assert!(t["detail"].is_string(), "{doc}");
    }
    for id in user_ids(50) {
        assert_eq!(arm_of(&client, proxy.addr(), &id).await, "stable", "{id}");
    }
    let m = admin.metrics().await;
    for name in ["canary-a", "canary-b"] {
        assert_eq!(
            m.value(
                "canaryd_rollbacks_total",
                &[("upstream", name), ("reason", "manual")]
            ),
            Some(1.0),
            "{name}"
        );
        assert_eq!(
            m.value("canaryd_upstream_tripped", &[("upstream", name)]),
            Some(1.0)
        );
    }

    // Reset returns to the configured (admin) table.
    let doc = admin.post_ok("/reset", None).await;
    assert_eq!(doc["tripped"], json!({}));
    assert_weights(&doc, "effective", promoted);
    for id in user_ids(50) {
        assert_eq!(arm_of(&client, proxy.addr(), &id).await, "canary-b", "{id}");
    }
    let m = admin.metrics().await;
    assert_eq!(m.sum("canaryd_upstream_tripped", &[]), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_endpoints_describe_the_running_proxy() {
    let (stable, canary) = arms().await;
    let cfg = two_arm_config(&stable, &canary, "10")
        .set("rollback", "enabled", "true")
        .set("rollback", "min_requests", "25")
        .build();
    let proxy = Proxy::start(&cfg).await;
    let admin = proxy.admin_client();
    wait_ready(&admin).await;

    for path in ["/healthz", "/readyz"] {
        let reply = admin.get(path).await;
        assert_eq!(reply.status, StatusCode::OK, "{path}: {reply:?}");
        assert!(reply.json().is_object(), "{path}: {reply:?}");
    }

    let s = admin.status().await;
    assert_eq!(s["source"], "file", "{s}");
    assert_eq!(s["baseline"], "stable", "{s}");
    assert!(s["generation"].is_u64(), "{s}");
    assert_eq!(s["last_reload"], Value::Null, "no reload yet: {s}");
    assert_eq!(s["circuit"]["enabled"], true, "{s}");
    assert_eq!(s["circuit"]["min_requests"], 25, "{s}");
    assert_eq!(s["circuit"]["tripped"], json!([]), "{s}");
    let arms = s["arms"].as_array().expect("arms array");
    assert_eq!(arms.len(), 2, "{s}");
    for (arm, name, up, weight, baseline) in [
        (&arms[0], "stable", &stable, 90, true),
        (&arms[1], "canary", &canary, 10, false),
    ] {
        assert_eq!(arm["name"], name, "{arm}");
        assert_eq!(arm["url"], up.url(), "{arm}");
        assert_eq!(arm["baseline"], baseline, "{arm}");
        assert_eq!(arm["effective_weight"], weight, "{arm}");
        assert_eq!(arm["configured_weight"], weight, "{arm}");
        assert_eq!(arm["tripped"], Value::Null, "{arm}");
        let w = &arm["window"];
        assert_eq!(w["requests"], 0, "{arm}");
        assert_eq!(w["errors"], 0, "{arm}");
        assert_eq!(w["error_rate"].as_f64(), Some(0.0), "{arm}");
        assert_eq!(w["p50_ms"], Value::Null, "{arm}");
        assert_eq!(w["p99_ms"], Value::Null, "{arm}");
    }

    let reply = admin.get("/metrics").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(
        reply
            .header("content-type")
            .is_some_and(|c| c.starts_with("text/plain")),
        "{reply:?}"
    );
    let m = MetricsText::parse(&reply.body);
    for (arm, weight) in [("stable", 90.0), ("canary", 10.0)] {
        assert_eq!(
            m.value("canaryd_upstream_weight_percent", &[("upstream", arm)]),
            Some(weight),
            "{}",
            m.text
        );
        assert_eq!(
            m.value("canaryd_upstream_tripped", &[("upstream", arm)]),
            Some(0.0)
        );
    }
    for result in ["success", "failure"] {
        assert_eq!(
            m.value("canaryd_config_reloads_total", &[("result", result)]),
            Some(0.0),
            "{}",
            m.text
        );
    }
}

/// A ready proxy in front of `stable` and `canary` (all traffic to stable) with a 10 s drain.
async fn start_for_drain(stable: &FakeUpstream, canary: &FakeUpstream) -> (Proxy, AdminClient) {
    let cfg = two_arm_config(stable, canary, "0")
        .set("listen", "drain_timeout", &q("10s"))
        .build();
    let proxy = Proxy::start(&cfg).await;
    let admin = proxy.admin_client();
    wait_ready(&admin).await;
    (proxy, admin)
}

/// Until `/readyz` answers 503: the proxy has begun draining.
async fn wait_draining(admin: &AdminClient) {
    poll_until(Duration::from_secs(5), "/readyz to answer 503", || async {
        (admin.get("/readyz").await.status == StatusCode::SERVICE_UNAVAILABLE).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_fails_while_draining_and_healthz_stays_up() {
    let stable = FakeUpstream::builder("stable").sse_gated(2).start().await;
    let canary = FakeUpstream::start("canary").await;
    let (proxy, admin) = start_for_drain(&stable, &canary).await;

    // Hold a response open so the drain takes as long as the test wants.
    let client = HttpClient::http1();
    let resp = client
        .send(request("GET", proxy.addr(), "/events", &[], empty()))
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let shutdown = tokio::spawn(proxy.shutdown());

    wait_draining(&admin).await;
    assert_eq!(admin.get("/healthz").await.status, StatusCode::OK);
    assert!(
        !shutdown.is_finished(),
        "the open response must hold the drain"
    );

    stable.release_chunks(1);
    let reply = collect(resp, CLIENT_TIMEOUT).await;
    assert_eq!(
        reply.body,
        format!("{}{}", stable.sse_event(0), stable.sse_event(1))
    );
    tokio::time::timeout(Duration::from_secs(10), shutdown)
        .await
        .expect("shutdown finishes once the response is done")
        .expect("no panic")
        .expect("run returns Ok");
}

/// Reads one response (head and `Content-Length` body) from a raw keep-alive connection.
async fn read_response(stream: &mut tokio::net::TcpStream) -> (String, String) {
    use tokio::io::AsyncReadExt;
    let head = read_response_head(stream).await;
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("a content-length in {head}"));
    let mut body = vec![0; len];
    tokio::time::timeout(CLIENT_TIMEOUT, stream.read_exact(&mut body))
        .await
        .expect("body in time")
        .expect("body");
    (head, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_serves_a_request_sent_on_an_idle_connection_and_then_closes_it() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stable = FakeUpstream::start("stable").await;
    let canary = FakeUpstream::start("canary").await;
    let (proxy, admin) = start_for_drain(&stable, &canary).await;

    // Two keep-alive connections, each idle after one request.
    const GET: &[u8] = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut busy_later = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
    let mut silent = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
    for stream in [&mut busy_later, &mut silent] {
        stream.write_all(GET).await.unwrap();
        let (head, _) = read_response(stream).await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(!head.contains("connection: close"), "{head}");
    }

    let started = std::time::Instant::now();
    let shutdown = tokio::spawn(proxy.shutdown());
    wait_draining(&admin).await;

    // A request written on an idle keep-alive connection after the signal (as a client that
    // had not yet heard of the shutdown would) is served, and told to close.
    busy_later.write_all(GET).await.unwrap();
    let (head, body) = read_response(&mut busy_later).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    assert!(!body.is_empty());
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), busy_later.read_to_end(&mut rest))
        .await
        .expect("closed after the response")
        .expect("read");
    assert_eq!(n, 0, "nothing after the last response: {rest:?}");

    // The connection that stays silent is closed once the linger is over.
    let n = tokio::time::timeout(Duration::from_secs(5), silent.read_to_end(&mut rest))
        .await
        .expect("the silent connection is closed")
        .expect("read");
    assert_eq!(n, 0);
    tokio::time::timeout(Duration::from_secs(10), shutdown)
        .await
        .expect("shutdown finishes after the linger")
        .expect("no panic")
        .expect("run returns Ok");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the linger is about 1 s, not drain_timeout: took {:?}",
        started.elapsed()
    );
    assert_eq!(stable.requests(), 3);
}

// ---------------------------------------------------------------------------------------------
// Token
// ---------------------------------------------------------------------------------------------

const TOKEN: &str = "s3cret-t0ken";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_guards_every_mutating_call_and_reads_stay_open() {
    let (stable, canary) = arms().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("admin-token");
    // Surrounding whitespace (a trailing newline from `echo`) is not part of the token.
    std::fs::write(&token_file, format!("  {TOKEN}\n")).expect("write token");
    let cfg = two_arm_config(&stable, &canary, "10")
        .set("admin", "token_file", &q(token_file.to_str().unwrap()))
        .build();
    let proxy = Proxy::start(&cfg).await;
    let open = proxy.admin_client();
    wait_ready(&open).await;
    let before = open.weights().await;

    let calls: &[(&str, &str, Option<&str>)] = &[
        ("PUT", "/weights", Some(r#"{"canary": 25}"#)),
        ("PUT", "/weights", Some("not even json")),
        ("POST", "/promote", None),
        ("POST", "/rollback", None),
        ("POST", "/reset", None),
    ];
    let bad_auth: &[Option<String>] = &[
        None,
        Some("Bearer wrong".into()),
        Some("Bearer ".into()),
        Some(format!("Bearer {TOKEN}x")),
        Some(format!("Bearer {}", &TOKEN[..TOKEN.len() - 1])),
        Some(TOKEN.into()),
        Some(format!("Basic {TOKEN}")),
        Some(format!("Token {TOKEN}")),
    ];
    let mut failures = Vec::new();
    for (method, path, body) in calls {
        for auth in bad_auth {
            let mut headers = vec![("content-type", "application/json")];
            if let Some(a) = auth {
                headers.push(("authorization", a.as_str()));
            }
            let body = body.map_or_else(empty, |b| full(b.to_string()));
            let reply = open.call_with(method, path, &headers, body).await;
            let what = format!("{method} {path} with authorization {auth:?}");
            if reply.status != StatusCode::UNAUTHORIZED {
                failures.push(format!("{what}: expected 401, got {reply:?}"));
                continue;
            }
            error_message(&reply);
            if reply.header("www-authenticate") != Some("Bearer") {
                failures.push(format!(
                    "{what}: WWW-Authenticate {:?}",
                    reply.header("www-authenticate")
                ));
            }
            if open.weights().await != before {
                failures.push(format!("{what}: changed the weights"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // Reads need no token.
    for path in [
        "/weights",
        "/status",
        "/metrics",
        "/route?key=alice",
        "/healthz",
        "/readyz",
    ] {
        let reply = open.get(path).await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "GET {path} without token: {reply:?}"
        );
    }

    // With the token every mutating call works.
    let authed = proxy.admin_client().with_token(TOKEN);
    let doc = authed.set_weights(json!({"canary": 25})).await;
    assert_eq!(doc["effective"]["canary"], 25);
    let doc = authed.post_ok("/rollback", None).await;
    assert_eq!(doc["tripped"]["canary"]["reason"], "manual");
    let doc = authed.post_ok("/reset", None).await;
    assert_eq!(doc["tripped"], json!({}));
    let doc = authed.post_ok("/promote", None).await;
    assert_eq!(doc["effective"], json!({"stable": 0, "canary": 100}));

    // The scheme name is case-insensitive (RFC 9110 §11.1); the token is not.
    let auth = format!("bearer {TOKEN}");
    let headers = [
        ("content-type", "application/json"),
        ("authorization", auth.as_str()),
    ];
    let reply = open.call_with("POST", "/reset", &headers, empty()).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    let auth = format!("Bearer {}", TOKEN.to_uppercase());
    let headers = [
        ("content-type", "application/json"),
        ("authorization", auth.as_str()),
    ];
    let reply = open.call_with("POST", "/reset", &headers, empty()).await;
    if TOKEN.to_uppercase() != TOKEN {
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{reply:?}");
    }
}

fn write_config(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write config");
    path.to_str().unwrap().to_string()
}

/// `canaryd run` that must exit by itself within `timeout` (killed otherwise).
fn run_to_exit(config: &str, timeout: Duration) -> (Option<i32>, String) {
    let mut child = std::process::Command::new(canaryd_bin())
        .args(["run", "--config", config])
        .env("NO_COLOR", "1")
        .env_remove("CANARYD_CONFIG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn canaryd");
    let deadline = std::time::Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("canaryd run --config {config} still running after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("read stderr");
    (status.code(), stderr)
}

#[test]
fn non_loopback_admin_address_needs_a_token_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let upstreams = ConfigBuilder::new()
        .upstream("stable", "http://127.0.0.1:9000", "90")
        .upstream("canary", "http://127.0.0.1:9001", "10");

    let open = write_config(
        dir.path(),
        "open.toml",
        &upstreams
            .clone()
            .set("admin", "addr", &q("0.0.0.0:9901"))
            .build(),
    );
    let out = run_cli(&["check", "--config", &open]);
    assert_eq!(out.code, Some(2), "check: {out:?}");
    assert!(out.stderr.contains("admin.token_file"), "{out:?}");

    let token = dir.path().join("token");
    std::fs::write(&token, format!("{TOKEN}\n")).expect("write token");
    let guarded = write_config(
        dir.path(),
        "guarded.toml",
        &upstreams
            .clone()
            .set("admin", "addr", &q("0.0.0.0:9901"))
            .set("admin", "token_file", &q(token.to_str().unwrap()))
            .build(),
    );
    let out = run_cli(&["check", "--config", &guarded]);
    assert_eq!(out.code, Some(0), "check with token_file: {out:?}");

    // `run` refuses the same config before serving (ephemeral ports, in case it did not).
    let open_run = write_config(
        dir.path(),
        "open-run.toml",
        &upstreams
            .clone()
            .set("admin", "addr", &q("0.0.0.0:0"))
            .build(),
    );
    let (code, stderr) = run_to_exit(&open_run, Duration::from_secs(10));
    assert_eq!(code, Some(2), "run without token_file: {stderr}");
    assert!(stderr.contains("admin.token_file"), "{stderr}");

    // An empty token file is a config error too.
    let empty = dir.path().join("empty-token");
    std::fs::write(&empty, "\n").expect("write empty token");
    let empty_run = write_config(
        dir.path(),
        "empty-run.toml",
        &upstreams
            .set("admin", "addr", &q("0.0.0.0:0"))
            .set("admin", "token_file", &q(empty.to_str().unwrap()))
            .build(),
    );
    let (code, stderr) = run_to_exit(&empty_run, Duration::from_secs(10));
    assert_eq!(code, Some(2), "run with an empty token file: {stderr}");
}

// ---------------------------------------------------------------------------------------------
// Ramp, promote, rollback, reset with real traffic
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ramp_moves_users_only_into_the_canary_then_promote_rollback_reset() {
    let (stable, canary) = arms().await;
    let proxy = Proxy::start(&two_arm_config(&stable, &canary, "0").build()).await;
    let admin = proxy.admin_client();
    let client = HttpClient::http1();
    let addr = proxy.addr();
    let ids = user_ids(USERS);

    let mut in_canary = assert_split(&client, addr, &ids, 0, "file weights").await;
    assert!(in_canary.is_empty());
    for p in [5u32, 25, 50, 100] {
        let doc = admin.set_weights(json!({"canary": p})).await;
        assert_eq!(doc["effective"], json!({"stable": 100 - p, "canary": p}));
        let now = assert_split(&client, addr, &ids, p, &format!("PUT canary {p}")).await;
        let left: Vec<_> = in_canary.difference(&now).collect();
        assert!(
            left.is_empty(),
            "users moved out of the canary at {p}%: {left:?}"
        );
        assert!(
            now.len() > in_canary.len(),
            "ramp to {p}% moved nobody in ({} users)",
            now.len()
        );
        in_canary = now;
    }
    assert_eq!(in_canary.len(), USERS);

    // Rollback: every user back to the baseline; reset: back to 100%.
    let doc = admin.post_ok("/rollback", None).await;
    assert_eq!(doc["tripped"]["canary"]["reason"], "manual", "{doc}");
    assert_eq!(doc["effective"], json!({"stable": 100, "canary": 0}));
    assert_eq!(doc["configured"], json!({"stable": 0, "canary": 100}));
    assert_split(&client, addr, &ids, 0, "after rollback").await;
    let m = admin.metrics().await;
    assert_eq!(
        m.value(
            "canaryd_rollbacks_total",
            &[("upstream", "canary"), ("reason", "manual")]
        ),
        Some(1.0)
    );
    assert_eq!(
        m.value("canaryd_upstream_tripped", &[("upstream", "canary")]),
        Some(1.0)
    );
    assert_eq!(
        m.value("canaryd_upstream_weight_percent", &[("upstream", "canary")]),
        Some(0.0)
    );

    // While tripped, naming the canary is a conflict and changes nothing.
    let reply = admin.put_json("/weights", &json!({"canary": 10})).await;
    assert_eq!(reply.status, StatusCode::CONFLICT, "{reply:?}");
    assert!(error_message(&reply).contains("manual"), "{reply:?}");
    let reply = admin.post("/promote", None).await;
    assert_eq!(reply.status, StatusCode::CONFLICT, "{reply:?}");
    assert_eq!(admin.weights().await, doc);

    let doc = admin.post_ok("/reset", None).await;
    assert_eq!(doc["tripped"], json!({}));
    assert_split(&client, addr, &ids, 100, "after reset").await;

    // Back to 10% by PUT, then promote by POST.
    admin.set_weights(json!({"canary": 10})).await;
    assert_split(&client, addr, &ids, 10, "PUT canary 10").await;
    let doc = admin.post_ok("/promote", None).await;
    assert_eq!(doc["effective"], json!({"stable": 0, "canary": 100}));
    assert_eq!(doc["source"], "admin");
    assert_split(&client, addr, &ids, 100, "after promote").await;
    let m = admin.metrics().await;
    assert_eq!(
        m.value("canaryd_upstream_weight_percent", &[("upstream", "canary")]),
        Some(100.0)
    );
    assert_eq!(
        m.value("canaryd_upstream_weight_percent", &[("upstream", "stable")]),
        Some(0.0)
    );
}

// ---------------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_every_response_exactly() {
    const TIMEOUT_MS: u64 = 200;
    let stable = FakeUpstream::builder("stable")
        .on_path("/slow", 200, Duration::from_secs(5))
        .start()
        .await;
    let canary = FakeUpstream::builder("canary")
        .on_path("/fail", 500, Duration::ZERO)
        .on_path("/teapot", 418, Duration::ZERO)
        .start()
        .await;
    let cfg = two_arm_config(&stable, &canary, "30")
        .set("listen", "request_timeout", &q(&format!("{TIMEOUT_MS}ms")))
        .build();
    let proxy = Proxy::start(&cfg).await;
    let admin = proxy.admin_client();
    let client = HttpClient::http1();

    // 300 users, each one request; the path decides what each arm answers.
    let ids = user_ids(300);
    let mut expected: BTreeMap<(&str, u16), u64> = BTreeMap::new();
    let mut requests = Vec::new();
    let mut plan = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let path = match i {
            i if i % 10 == 0 => "/slow",
            i if i % 3 == 0 => "/fail",
            i if i % 7 == 0 => "/teapot",
            _ => "/ok",
        };
        let arm = if reference_arm(id, 30) {
            "canary"
        } else {
            "stable"
        };
        let status = match (arm, path) {
            ("stable", "/slow") => 504,
            ("canary", "/fail") => 500,
            ("canary", "/teapot") => 418,
            _ => 200,
        };
        *expected.entry((arm, status)).or_default() += 1;
        plan.push((arm, status));
        requests.push(request(
            "GET",
            proxy.addr(),
            path,
            &[("x-user-id", id)],
            empty(),
        ));
    }
    let replies = fetch_all(&client, requests, CONCURRENCY).await;
    for ((arm, status), reply) in plan.iter().zip(&replies) {
        assert_eq!(reply.status.as_u16(), *status, "{reply:?}");
        assert_eq!(reply.arm(), Some(*arm), "{reply:?}");
    }
    let timeouts = expected.get(&("stable", 504)).copied().unwrap_or(0);
    assert!(
        timeouts > 5 && expected.get(&("canary", 500)).is_some_and(|&n| n > 5),
        "the mix must exercise every status: {expected:?}"
    );

    let m = admin.metrics().await;
    for arm in ["stable", "canary"] {
        let got = m.by_label("canaryd_requests_total", &[("upstream", arm)], "status");
        let want: BTreeMap<String, f64> = expected
            .iter()
            .filter(|((a, _), _)| *a == arm)
            .map(|((_, s), n)| (s.to_string(), *n as f64))
            .collect();
        assert_eq!(got, want, "canaryd_requests_total for {arm}");
    }
    let upstream_labels: BTreeSet<&str> = m
        .series("canaryd_requests_total", &[])
        .iter()
        .map(|s| s.labels["upstream"].as_str())
        .collect();
    assert_eq!(upstream_labels, BTreeSet::from(["canary", "stable"]));

    // The histogram: real buckets 0.5 ms .. 30 s plus +Inf, _count = requests of the arm.
    let want_le = [
        0.0005,
        0.001,
        0.0025,
        0.005,
        0.01,
        0.025,
        0.05,
        0.1,
        0.25,
        0.5,
        1.0,
        2.5,
        5.0,
        10.0,
        30.0,
        f64::INFINITY,
    ];
    for arm in ["stable", "canary"] {
        let total: u64 = expected
            .iter()
            .filter(|((a, _), _)| *a == arm)
            .map(|(_, n)| n)
            .sum();
        let buckets = m.series(
            "canaryd_request_duration_seconds_bucket",
            &[("upstream", arm)],
        );
        let mut les: Vec<(f64, f64)> = buckets
            .iter()
            .map(|s| {
                let le = &s.labels["le"];
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().expect("numeric le")
                };
                (le, s.value)
            })
            .collect();
        les.sort_by(|a, b| a.0.total_cmp(&b.0));
        assert_eq!(
            les.iter().map(|(le, _)| *le).collect::<Vec<_>>(),
            want_le,
            "bucket bounds for {arm}"
        );
        assert!(
            les.windows(2).all(|w| w[0].1 <= w[1].1),
            "buckets are cumulative: {les:?}"
        );
        assert_eq!(les.last().unwrap().1, total as f64, "+Inf bucket for {arm}");
        assert_eq!(
            m.value(
                "canaryd_request_duration_seconds_count",
                &[("upstream", arm)]
            ),
            Some(total as f64),
            "_count for {arm}"
        );
        let sum = m
            .value("canaryd_request_duration_seconds_sum", &[("upstream", arm)])
            .expect("_sum");
        if arm == "stable" {
            // Each 504 took at least request_timeout.
            let floor = timeouts as f64 * TIMEOUT_MS as f64 / 1000.0;
            assert!(sum >= floor, "_sum {sum} < {floor}");
            let fast = les.iter().find(|(le, _)| *le == 0.1).unwrap().1;
            assert!(
                fast <= (total - timeouts) as f64,
                "504s counted under 100 ms: {les:?}"
            );
        }
    }

    // Failures by kind: the 504s are timeouts of stable, nothing else failed.
    for (arm, kind, want) in [
        ("stable", "timeout", timeouts),
        ("stable", "connect", 0),
        ("stable", "protocol", 0),
        ("canary", "timeout", 0),
        ("canary", "connect", 0),
        ("canary", "protocol", 0),
    ] {
        assert_eq!(
            m.sum(
                "canaryd_upstream_failures_total",
                &[("upstream", arm), ("kind", kind)]
            ),
            want as f64,
            "failures_total{{{arm},{kind}}}"
        );
    }
    for (arm, weight) in [("stable", 70.0), ("canary", 30.0)] {
        assert_eq!(
            m.value("canaryd_upstream_weight_percent", &[("upstream", arm)]),
            Some(weight)
        );
        assert_eq!(
            m.value("canaryd_upstream_tripped", &[("upstream", arm)]),
            Some(0.0)
        );
    }
    assert_eq!(m.sum("canaryd_rollbacks_total", &[]), 0.0);

    // Every body was read: nothing is in flight any more.
    poll_until(Duration::from_secs(5), "in-flight gauges at 0", || async {
        let m = admin.metrics().await;
        let in_flight = m.series("canaryd_requests_in_flight", &[]);
        (in_flight.len() == 2 && in_flight.iter().all(|s| s.value == 0.0)).then_some(())
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Precedence through reloads
// ---------------------------------------------------------------------------------------------

/// Wait for `/status` to report a reload newer than `after_generation` with `result`.
async fn wait_reload(admin: &AdminClient, result: &str, seen: &mut Option<Value>) -> Value {
    let s = poll_until(
        RELOAD_DEADLINE,
        &format!("a reload with result {result}"),
        || async {
            let s = admin.status().await;
            let lr = s["last_reload"].clone();
            (lr["result"] == result && Some(&lr) != seen.as_ref()).then_some(s)
        },
    )
    .await;
    *seen = Some(s["last_reload"].clone());
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_table_survives_reloads_that_keep_file_weights_only() {
    let (stable, canary) = arms().await;
    let base = two_arm_config(&stable, &canary, "10");
    let mut proxy = Proxy::start(&base.build()).await;
    let admin = proxy.admin_client();
    let client = HttpClient::http1();
    let addr = proxy.addr();
    // Bucket in [2000, 2500): stable at 10% and 20%, canary at 25%.
    let mover = user_in_bucket_range(2000..2500);
    assert_eq!(arm_of(&client, addr, &mover).await, "stable");

    let doc = admin.set_weights(json!({"canary": 25})).await;
    assert_eq!(doc["source"], "admin");
    assert_eq!(arm_of(&client, addr, &mover).await, "canary");

    // Reload with the same weights but another change: the admin table stays.
    let mut seen = None;
    proxy.rewrite_config(
        &base.clone().set("listen", "access_log", "true").build(),
        Rewrite::Rename,
    );
    let s = wait_reload(&admin, "success", &mut seen).await;
    assert!(s["last_reload"]["generation"].is_u64(), "{s}");
    let w = admin.weights().await;
    assert_eq!(w["source"], "admin", "{w}");
    assert_eq!(w["effective"], json!({"stable": 75, "canary": 25}), "{w}");
    assert_eq!(w["file"], json!({"stable": 90, "canary": 10}), "{w}");
    assert_eq!(arm_of(&client, addr, &mover).await, "canary");

    // Reload with changed weights: the file wins.
    let changed = two_arm_config(&stable, &canary, "20");
    proxy.rewrite_config(&changed.build(), Rewrite::Rename);
    wait_reload(&admin, "success", &mut seen).await;
    let w = admin.weights().await;
    assert_eq!(w["source"], "file", "{w}");
    assert_eq!(w["effective"], json!({"stable": 80, "canary": 20}), "{w}");
    assert_eq!(w["configured"], json!({"stable": 80, "canary": 20}), "{w}");
    assert_eq!(arm_of(&client, addr, &mover).await, "stable");

    // An invalid file changes nothing and is reported.
    proxy.rewrite_config(
        &changed
            .clone()
            .set("listen", "adr", &q("127.0.0.1:0"))
            .build(),
        Rewrite::Rename,
    );
    let s = wait_reload(&admin, "failure", &mut seen).await;
    let err = s["last_reload"]["error"].as_str().unwrap_or_default();
    assert!(
        err.contains("listen.adr"),
        "reload error names the key: {s}"
    );
    assert_eq!(
        admin.weights().await,
        w,
        "a failed reload changed the weights"
    );
    assert_eq!(arm_of(&client, addr, &mover).await, "stable");
    let m = admin.metrics().await;
    assert_eq!(
        m.value("canaryd_config_reloads_total", &[("result", "success")]),
        Some(2.0),
        "{}",
        m.text
    );
    assert_eq!(
        m.value("canaryd_config_reloads_total", &[("result", "failure")]),
        Some(1.0),
        "{}",
        m.text
    );
    let status = admin.status().await;
    assert_eq!(status["last_reload"]["result"], "failure", "{status}");
}

// ---------------------------------------------------------------------------------------------
// State file
// ---------------------------------------------------------------------------------------------

fn state_config(
    stable: &FakeUpstream,
    canary: &FakeUpstream,
    weight: &str,
    state: &Path,
) -> String {
    two_arm_config(stable, canary, weight)
        .set("state", "file", &q(state.to_str().unwrap()))
        .build()
}

/// `/weights` without the generation (which restarts with the process).
fn weights_state(doc: &Value) -> Value {
    let mut doc = doc.clone();
    doc.as_object_mut().unwrap().remove("generation");
    doc
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_file_keeps_admin_weights_and_trips_across_restarts() {
    let (stable, canary) = arms().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state.json");
    let cfg = state_config(&stable, &canary, "10", &state);
    // Bucket in [1000, 2500): stable at 10%, canary at 25%.
    let mover = user_in_bucket_range(1000..2500);
    let client = HttpClient::http1();

    let first = Proxy::start(&cfg).await;
    let admin = first.admin_client();
    admin.set_weights(json!({"canary": 25})).await;
    let before = admin.post_ok("/rollback", None).await;
    assert_eq!(before["effective"], json!({"stable": 100, "canary": 0}));
    let saved: Value =
        serde_json::from_slice(&std::fs::read(&state).expect("state file written")).expect("JSON");
    assert_eq!(saved["tripped"]["canary"]["reason"], "manual", "{saved}");
    first.shutdown().await.expect("shutdown");

    let second = Proxy::start(&cfg).await;
    let admin = second.admin_client();
    let after = admin.weights().await;
    assert_eq!(
        weights_state(&after),
        weights_state(&before),
        "restored state"
    );
    assert_eq!(after["source"], "admin");
    assert_eq!(after["configured"], json!({"stable": 75, "canary": 25}));
    assert_eq!(arm_of(&client, second.addr(), &mover).await, "stable");
    let m = admin.metrics().await;
    assert_eq!(
        m.value("canaryd_upstream_tripped", &[("upstream", "canary")]),
        Some(1.0),
        "{}",
        m.text
    );
    assert_eq!(
        m.value("canaryd_upstream_weight_percent", &[("upstream", "canary")]),
        Some(0.0)
    );

    // The reset is persisted too.
    let doc = admin.post_ok("/reset", None).await;
    assert_eq!(doc["effective"], json!({"stable": 75, "canary": 25}));
    assert_eq!(arm_of(&client, second.addr(), &mover).await, "canary");
    second.shutdown().await.expect("shutdown");

    let third = Proxy::start(&cfg).await;
    let w = third.admin_client().weights().await;
    assert_eq!(w["tripped"], json!({}), "{w}");
    assert_eq!(w["effective"], json!({"stable": 75, "canary": 25}), "{w}");
    assert_eq!(arm_of(&client, third.addr(), &mover).await, "canary");
    third.shutdown().await.expect("shutdown");

    // The file's weights changed while canaryd was down: the file wins over the saved table.
    let changed = state_config(&stable, &canary, "20", &state);
    let fourth = Proxy::start(&changed).await;
    let w = fourth.admin_client().weights().await;
    assert_eq!(w["source"], "file", "{w}");
    assert_eq!(w["effective"], json!({"stable": 80, "canary": 20}), "{w}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_state_file_is_moved_aside_and_the_config_is_served() {
    let (stable, canary) = arms().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state.json");
    let garbage = b"{\"version\": 1, \"tripped\": {\"canary\": ";
    std::fs::write(&state, garbage).expect("write corrupt state");

    let proxy = Proxy::start(&state_config(&stable, &canary, "10", &state)).await;
    let admin = proxy.admin_client();
    let w = admin.weights().await;
    assert_eq!(w["source"], "file", "{w}");
    assert_eq!(w["effective"], json!({"stable": 90, "canary": 10}), "{w}");
    assert_eq!(w["tripped"], json!({}), "{w}");
    let client = HttpClient::http1();
    assert_split(&client, proxy.addr(), &user_ids(200), 10, "corrupt state").await;

    let aside: Vec<_> = std::fs::read_dir(dir.path())
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().into_string().unwrap())
        .filter(|n| n.starts_with("state.json.corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1, "one file moved aside: {aside:?}");
    let suffix = &aside[0]["state.json.corrupt-".len()..];
    assert!(
        !suffix.is_empty() && suffix.bytes().all(|b| b.is_ascii_digit()),
        "suffix is unix ms: {aside:?}"
    );
    assert_eq!(
        std::fs::read(dir.path().join(&aside[0])).expect("read aside"),
        garbage,
        "the corrupt file is kept as it was"
    );
    if let Ok(bytes) = std::fs::read(&state) {
        serde_json::from_slice::<Value>(&bytes).expect("a state file written now is valid JSON");
    }

    // Changes are persisted again.
    admin.set_weights(json!({"canary": 30})).await;
    let saved: Value =
        serde_json::from_slice(&std::fs::read(&state).expect("state file")).expect("JSON");
    assert!(saved["admin_weights"].is_object(), "{saved}");
}

// ---------------------------------------------------------------------------------------------
// /route and /status
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_agrees_with_the_reference_bucket_and_the_data_path() {
    let (stable, canary) = arms().await;
    let proxy = Proxy::start(&two_arm_config(&stable, &canary, "10").build()).await;
    let admin = proxy.admin_client();
    admin.set_weights(json!({"canary": 12.5})).await;
    let client = HttpClient::http1();

    let mut ids: Vec<String> = ["user_123", "user_456", "alice", "42", "a b&c=d/é"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    ids.extend(user_ids(300));
    let mut wrong = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let r = admin
            .get_json(&format!("/route?key={}", url_encode(id)))
            .await;
        let bucket = reference_bucket("", id);
        let (arm, range) = if bucket < 1250 {
            ("canary", json!([0, 1250]))
        } else {
            ("stable", json!([1250, 10000]))
        };
        if r["key"] != id.as_str()
            || r["bucket"] != bucket
            || r["arm"] != arm
            || r["range"] != range
        {
            wrong.push(format!(
                "{id}: expected bucket {bucket} {arm} {range}, got {r}"
            ));
        }
        if !r["why"]
            .as_str()
            .is_some_and(|w| w.contains(&bucket.to_string()))
        {
            wrong.push(format!("{id}: why does not name the bucket: {r}"));
        }
        // The data path agrees with /route (header-safe ids, every 5th to keep it quick).
        if i % 5 == 0 && id.is_ascii() {
            let served = arm_of(&client, proxy.addr(), id).await;
            if served != arm {
                wrong.push(format!("{id}: /route says {arm}, proxy served {served}"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{}",
        wrong[..wrong.len().min(10)].join("\n")
    );
    for (key, bucket) in [
        ("user_123", 8884),
        ("user_456", 3544),
        ("alice", 83),
        ("42", 7451),
    ] {
        let r = admin.get_json(&format!("/route?key={key}")).await;
        assert_eq!(r["bucket"], bucket, "routing vector {key}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_window_counts_the_traffic_sent() {
    let stable = FakeUpstream::start("stable").await;
    let canary = FakeUpstream::builder("canary")
        .delay(Duration::from_millis(40))
        .on_path("/fail", 503, Duration::ZERO)
        .start()
        .await;
    let proxy = Proxy::start(&two_arm_config(&stable, &canary, "50").build()).await;
    let admin = proxy.admin_client();
    let client = HttpClient::http1();

    // 45 stable requests (5 on /fail, which stable answers 200), 30 canary (10 on /fail).
    let stable_users: Vec<String> = user_ids(2000)
        .into_iter()
        .filter(|id| !reference_arm(id, 50))
        .take(45)
        .collect();
    let canary_users: Vec<String> = user_ids(2000)
        .into_iter()
        .filter(|id| reference_arm(id, 50))
        .take(30)
        .collect();
    let mut requests = Vec::new();
    for (i, id) in stable_users.iter().enumerate() {
        let path = if i < 5 { "/fail" } else { "/ok" };
        requests.push(request(
            "GET",
            proxy.addr(),
            path,
            &[("x-user-id", id)],
            empty(),
        ));
    }
    for (i, id) in canary_users.iter().enumerate() {
        let path = if i < 10 { "/fail" } else { "/ok" };
        requests.push(request(
            "GET",
            proxy.addr(),
            path,
            &[("x-user-id", id)],
            empty(),
        ));
    }
    let replies = fetch_all(&client, requests, CONCURRENCY).await;
    let failed = replies.iter().filter(|r| r.status == 503).count();
    assert_eq!(failed, 10, "only the canary's /fail requests fail");

    let s = poll_until(WINDOW_DEADLINE, "windows to hold every request", || async {
        let s = admin.status().await;
        let n = |i: usize| s["arms"][i]["window"]["requests"].as_u64();
        (n(0) == Some(45) && n(1) == Some(30)).then_some(s)
    })
    .await;
    let (sw, cw) = (&s["arms"][0]["window"], &s["arms"][1]["window"]);
    assert_eq!(s["arms"][0]["name"], "stable");
    assert_eq!(sw["errors"], 0, "{s}");
    assert_eq!(sw["error_rate"].as_f64(), Some(0.0), "{s}");
    assert_eq!(cw["errors"], 10, "{s}");
    let rate = cw["error_rate"].as_f64().expect("error_rate");
    assert!(
        (rate - 10.0 / 30.0).abs() < 1e-9,
        "canary error_rate {rate}"
    );
    // 20 of 30 canary requests waited 40 ms: the median is at least that (histogram ~6%).
    let p50 = cw["p50_ms"].as_f64().expect("p50_ms");
    let p99 = cw["p99_ms"].as_f64().expect("p99_ms");
    assert!(p50 >= 40.0 * 0.93, "canary p50 {p50} ms: {s}");
    assert!(p99 >= p50, "p99 {p99} < p50 {p50}");
    let sp50 = sw["p50_ms"].as_f64().expect("stable p50_ms");
    assert!(
        sp50 < p50,
        "stable p50 {sp50} should be under canary's {p50}"
    );

    // The windows and the metrics agree.
    let m = admin.metrics().await;
    assert_eq!(
        m.sum("canaryd_requests_total", &[("upstream", "stable")]),
        45.0
    );
    assert_eq!(
        m.sum("canaryd_requests_total", &[("upstream", "canary")]),
        30.0
    );
    assert_eq!(
        m.value(
            "canaryd_requests_total",
            &[("upstream", "canary"), ("status", "503")]
        ),
        Some(10.0)
    );
}
