//! End-to-end tests of the rollback circuit: canaryd in-process in front of fake
//! upstreams that fail on cue, observed through real traffic, `GET /weights`, `/status` and
//! `/metrics`.

mod common;

use std::net::SocketAddr;
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use canaryd::analysis::compare::{Comparison, Limits};
use common::*;
use http::StatusCode;
use serde_json::{json, Value};

/// `[rollback] min_requests` in these tests.
const MIN_REQUESTS: usize = 20;
/// Requests that may still reach a canary after the one that tripped it: the circuit task
/// runs beside the data path, so a few requests can be routed before the trip is published.
const SLACK: usize = 5;
/// How long a trip, reset or reload may take to show.
const DEADLINE: Duration = Duration::from_secs(10);
/// Requests in flight at once in bulk checks.
const CONCURRENCY: usize = 8;

/// A config with the circuit on (the test `ConfigBuilder` turns it off).
fn circuit_config(stable_url: &str, canary_url: &str, canary_weight: u32) -> ConfigBuilder {
    ConfigBuilder::new()
        .upstream("stable", stable_url, &(100 - canary_weight).to_string())
        .upstream("canary", canary_url, &canary_weight.to_string())
        .set("rollback", "enabled", "true")
        .set("rollback", "window", &q("30s"))
        .set("rollback", "min_requests", &MIN_REQUESTS.to_string())
        .set("rollback", "max_error_rate", "0.10")
        .set("rollback", "max_error_rate_increase", "0.02")
}

/// The limits of [`circuit_config`], as the analysis takes them.
fn circuit_limits() -> Limits {
    Limits {
        min_requests: MIN_REQUESTS as u64,
        ..Limits::default()
    }
}

/// The canary request (counted from 1) at which the analysis first fails, for a baseline of
/// `baseline` clean requests and a canary whose `i`th request (from 0) fails when `fails(i)`:
/// where the proxy should trip, replayed on the library's own analysis.
fn trip_point(limits: &Limits, baseline: u64, fails: impl Fn(u64) -> bool) -> Option<u64> {
    let mut c = Comparison::new();
    for _ in 0..baseline {
        c.record_baseline(false, Duration::from_millis(1));
    }
    (0..100_000).find_map(|i| {
        c.record_arm(fails(i), Duration::from_millis(1));
        c.fails(limits).map(|_| i + 1)
    })
}

/// `n` distinct user ids whose reference bucket (salt "") is in `range`.
fn users_in(range: Range<u16>, n: usize, tag: &str) -> Vec<String> {
    (0..)
        .map(|i| format!("{tag}-{i}"))
        .filter(|id| range.contains(&reference_bucket("", id)))
        .take(n)
        .collect()
}

/// One request as `user`; returns the reply (any status).
async fn send_as(client: &HttpClient, addr: SocketAddr, user: &str) -> Reply {
    client.get(addr, "/", &[("x-user-id", user)]).await
}

/// Sends `users`' requests one at a time until one is served by the baseline; returns how
/// many the canary served before. Every canary reply must have `canary_status`.
async fn drive_until_tripped(
    client: &HttpClient,
    proxy: &Proxy,
    users: &[String],
    canary_status: u16,
) -> usize {
    let admin = proxy.admin_client();
    // Canary outcomes the circuit has taken (its analysis sample).
    let taken = || async {
        let s = admin.status().await;
        canary_arm(&s)["analysis"]["arm"]["requests"]
            .as_u64()
            .unwrap_or(0)
    };
    let before = taken().await;
    for (i, user) in users.iter().enumerate() {
        let reply = send_as(client, proxy.addr(), user).await;
        match reply.arm() {
            Some("stable") => {
                assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
                return i;
            }
            Some("canary") => {
                assert_eq!(reply.status.as_u16(), canary_status, "{reply:?}");
                // The circuit judges outcomes beside the data path. Waiting until it has
                // taken this one routes the next request by its decision: the count measures
                // the rule, not how soon a loaded machine runs the circuit's task.
                let want = before + i as u64 + 1;
                poll_until(
                    DEADLINE,
                    "the circuit to take the canary's outcome",
                    || async { (taken().await >= want).then_some(()) },
                )
                .await;
            }
            other => panic!("unexpected arm {other:?}: {reply:?}"),
        }
    }
    panic!(
        "the canary never tripped in {} of its users' requests",
        users.len()
    );
}

/// Every one of `users` is served by `arm` with 200 (concurrently).
async fn assert_all_served_by(client: &HttpClient, addr: SocketAddr, users: &[String], arm: &str) {
    let replies = route_all(client, addr, users, CONCURRENCY).await;
    let wrong: Vec<_> = users
        .iter()
        .zip(&replies)
        .filter(|(_, r)| r.arm() != Some(arm) || r.status != StatusCode::OK)
        .map(|(u, r)| format!("{u}: {} {:?}", r.status, r.arm()))
        .collect();
    assert!(
        wrong.is_empty(),
        "{} of {} users not served by {arm} with 200; first: {:?}",
        wrong.len(),
        users.len(),
        &wrong[..wrong.len().min(5)]
    );
}

fn rollbacks(m: &MetricsText, reason: &str) -> f64 {
    m.sum(
        "canaryd_rollbacks_total",
        &[("upstream", "canary"), ("reason", reason)],
    )
}

fn tripped_gauge(m: &MetricsText, arm: &str) -> Option<f64> {
    m.value("canaryd_upstream_tripped", &[("upstream", arm)])
}

/// The canary's entry in `/status`.
fn canary_arm(status: &Value) -> &Value {
    let arms = status["arms"].as_array().expect("arms");
    arms.iter()
        .find(|a| a["name"] == "canary")
        .expect("canary arm")
}

/// The canary's recent window in `/status`.
fn canary_window(status: &Value) -> &Value {
    &canary_arm(status)["window"]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_canary_trips_after_min_requests_and_its_users_go_to_the_baseline() {
    let stable = FakeUpstream::start("stable").await;
    let canary = FakeUpstream::builder("canary").status(500).start().await;
    let proxy = Proxy::start(&circuit_config(&stable.url(), &canary.url(), 10).build()).await;
    let admin = proxy.admin_client();
    let client = HttpClient::http1();
    let users = users_in(0..1000, 200, "failing");

    let served = drive_until_tripped(&client, &proxy, &users, 500).await;
    assert!(
        (MIN_REQUESTS..=MIN_REQUESTS + SLACK).contains(&served),
        "tripped after {served} canary requests; min_requests is {MIN_REQUESTS}"
    );
    assert_eq!(canary.requests(), served);

    let w = admin.weights().await;
    let trip = &w["tripped"]["canary"];
    assert_eq!(trip["reason"], "error_rate", "{w}");
    assert_eq!(trip["url"], canary.url(), "{w}");
    assert!(
        trip["detail"]
            .as_str()
            .is_some_and(|d| d.contains("errors in")),
        "the detail gives the numbers: {w}"
    );
    assert_eq!(w["effective"], json!({"stable": 100, "canary": 0}), "{w}");
    assert_eq!(w["configured"], json!({"stable": 90, "canary": 10}), "{w}");

    // Every later canary user goes to the baseline; the canary sees nothing more.
    let rest = &users[served + 1..];
    assert_all_served_by(&client, proxy.addr(), rest, "stable").await;
    assert_eq!(canary.requests(), served, "the tripped canary got traffic");

    let m = admin.metrics().await;
    assert_eq!(rollbacks(&m, "error_rate"), 1.0, "{}", m.text);
    assert_eq!(m.sum("canaryd_rollbacks_total", &[]), 1.0, "{}", m.text);
    assert_eq!(tripped_gauge(&m, "canary"), Some(1.0));
    assert_eq!(tripped_gauge(&m, "stable"), Some(0.0));
    assert_eq!(
        m.value("canaryd_upstream_weight_percent", &[("upstream", "canary")]),
        Some(0.0)
    );
    assert_eq!(
        m.value("canaryd_upstream_weight_percent", &[("upstream", "stable")]),
        Some(100.0)
    );
    assert_eq!(
        m.value(
            "canaryd_requests_total",
            &[("upstream", "canary"), ("status", "500")]
        ),
        Some(served as f64)
    );
    assert_eq!(
        m.sum("canaryd_requests_total", &[("upstream", "stable")]),
        (users.len() - served) as f64
    );
    let s = admin.status().await;
    assert_eq!(s["circuit"]["tripped"], json!(["canary"]), "{s}");
}

/// With the default `[rollback]` (only `enabled = true`), a canary failing every request
/// trips within 10 of its requests: `min_requests` is 5, and 5 errors in 5 put the error rate
/// far above the 10% ceiling at 99%.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_failing_everything_trips_within_ten_requests_with_the_defaults() {
    let stable = FakeUpstream::start("stable").await;
    let canary = FakeUpstream::builder("canary").status(500).start().await;
    let cfg = ConfigBuilder::new()
        .upstream("stable", &stable.url(), "90")
        .upstream("canary", &canary.url(), "10")
        .set("rollback", "enabled", "true");
    let proxy = Proxy::start(&cfg.build()).await;
    let admin = proxy.admin_client();
    let client = HttpClient::http1();
    warm_baseline(&client, proxy.addr(), 50).await;
    let users = users_in(0..1000, 100, "defaults");
    let served = drive_until_tripped(&client, &proxy, &users, 500).await;
    assert!(
        (5..=10).contains(&served),
        "tripped after {served} canary requests; expected 5 (min_requests) to 10"
    );
    let s = admin.status().await;
    let analysis = &canary_arm(&s)["analysis"];
    assert_eq!(analysis["verdict"], "fail", "{s}");
    assert_eq!(analysis["metrics"]["error_rate"]["verdict"], "fail", "{s}");
    let interval = &analysis["metrics"]["error_rate"]["checks"][0]["interval"];
    assert!(
        interval[0].as_f64().is_some_and(|lo| lo > 0.10),
        "the interval's low end is above the 10% ceiling: {s}"
    );
    let ceiling = &analysis["metrics"]["error_rate"];
    let (stat, threshold) = (
        ceiling["checks"][0]["ln_evidence_exceeds"].as_f64(),
        ceiling["threshold"].as_f64(),
    );
    assert!(
        stat.zip(threshold).is_some_and(|(s, t)| s >= t),
        "the test statistic has reached its threshold: {s}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_that_turns_bad_trips_within_a_few_requests() {
    const HEALTHY: usize = 30;
    let stable = FakeUpstream::start("stable").await;
    let canary = FakeUpstream::start("canary").await;
    let proxy = Proxy::start(&circuit_config(&stable.url(), &canary.url(), 10).build()).await;
    let admin = proxy.admin_client();
    let client = HttpClient::http1();
    warm_baseline(&client, proxy.addr(), 1000).await;
    let users = users_in(0..1000, HEALTHY + 100, "turns-bad");

    for user in &users[..HEALTHY] {
        let reply = send_as(&client, proxy.addr(), user).await;
        assert_eq!(reply.arm(), Some("canary"), "{reply:?}");
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    }
    canary.set_status(503);
    // 30 good requests, then errors, against 0 errors in 1000 baseline requests.
    let expected = trip_point(&circuit_limits(), 1000, |i| i >= HEALTHY as u64)
        .expect("the analysis fails") as usize
        - HEALTHY;
    assert!(
        (5..=10).contains(&expected),
        "the analysis needs {expected} errors after {HEALTHY} successes; a few are enough"
    );
    let failed = drive_until_tripped(&client, &proxy, &users[HEALTHY..], 503).await;
    assert!(
        (expected..=expected + SLACK).contains(&failed),
        "tripped after {failed} failing requests, expected the {expected}th (+{SLACK})"
    );
    assert_eq!(
        admin.trip_reason("canary").await.as_deref(),
        Some("error_rate_increase")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthy_canary_never_trips() {
    const REQUESTS: usize = 2000;
    let stable = FakeUpstream::start("stable").await;
    // 4xx are not errors with the default error_statuses (5xx).
    let canary = FakeUpstream::builder("canary")
        .on_path("/missing", 404, Duration::ZERO)
        .start()
        .await;
    let proxy = Proxy::start(&circuit_config(&stable.url(), &canary.url(), 50).build()).await;
    let admin = proxy.admin_client();
    let client = HttpClient::http1();

    let ids = user_ids(REQUESTS);
    let requests = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let path = if i % 3 == 0 { "/missing" } else { "/ok" };
            request("GET", proxy.addr(), path, &[("x-user-id", id)], empty())
        })
        .collect();
    let replies = fetch_all(&client, requests, CONCURRENCY).await;
    let mut per_arm = [0u64; 2];
    for (id, reply) in ids.iter().zip(&replies) {
        let canary_user = reference_arm(id, 50);
        assert_eq!(
            reply.arm(),
            Some(if canary_user { "canary" } else { "stable" }),
            "{id}: {reply:?}"
        );
        per_arm[usize::from(canary_user)] += 1;
    }
    assert!(per_arm[1] > 800, "canary served {}", per_arm[1]);

    let s = poll_until(DEADLINE, "windows to hold every request", || async {
        let s = admin.status().await;
        let n = |i: usize| s["arms"][i]["window"]["requests"].as_u64();
        (n(0) == Some(per_arm[0]) && n(1) == Some(per_arm[1])).then_some(s)
    })
    .await;
    assert_eq!(canary_window(&s)["errors"], 0, "{s}");
    let w = admin.weights().await;
    assert_eq!(w["tripped"], json!({}), "{w}");
    assert_eq!(w["effective"], json!({"stable": 50, "canary": 50}));
    let m = admin.metrics().await;
    assert_eq!(m.sum("canaryd_rollbacks_total", &[]), 0.0, "{}", m.text);
    assert_eq!(tripped_gauge(&m, "canary"), Some(0.0));
}

// ---------------------------------------------------------------------------------------------
// The relative rule
// ---------------------------------------------------------------------------------------------

/// Warm the baseline with `n` requests from its own users (sequentially, so the window sees
/// them in the order the fake upstream numbered them).
async fn warm_baseline(client: &HttpClient, addr: SocketAddr, n: usize) {
    for user in users_in(5000..10000, n, "warm") {
        let reply = send_as(client, addr, &user).await;
        assert_eq!(reply.arm(), Some("stable"), "{reply:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_as_bad_as_the_baseline_does_not_trip() {
    // Baseline fails the 1st, 21st, ... request (always >= 5%); the canary the 20th, 40th, ...
    // (always <= 5%): equally bad, never worse at any point.
    let stable = FakeUpstream::builder("stable")
        .fail_every(20, 0, 500)
        .start()
        .await;
    let canary = FakeUpstream::builder("canary")
        .fail_every(20, 19, 500)
        .start()
        .await;
    let proxy = Proxy::start(&circuit_config(&stable.url(), &canary.url(), 50).build()).await;
    let admin = proxy.admin_client();
    let client = HttpClient::http1();
    warm_baseline(&client, proxy.addr(), 400).await;

    let users = users_in(0..5000, 400, "as-bad");
    let mut errors = 0;
    for user in &users {
        let reply = send_as(&client, proxy.addr(), user).await;
        assert_eq!(reply.arm(), Some("canary"), "tripped early: {reply:?}");
        errors += usize::from(reply.status == StatusCode::INTERNAL_SERVER_ERROR);
    }
    assert_eq!(errors, 20, "the canary failed 5% of its requests");

    let s = poll_until(DEADLINE, "windows to hold every request", || async {
        let s = admin.status().await;
        (canary_window(&s)["requests"] == 400).then_some(s)
    })
    .await;
    assert_eq!(canary_window(&s)["errors"], 20, "{s}");
    assert_eq!(s["arms"][0]["window"]["requests"], 400, "{s}");
    assert_eq!(s["arms"][0]["window"]["errors"], 20, "{s}");
    assert_eq!(admin.weights().await["tripped"], json!({}));
    assert_eq!(
        admin.metrics().await.sum("canaryd_rollbacks_total", &[]),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_worse_than_the_baseline_trips_on_the_increase() {
    // A clean baseline (1000 requests); the canary fails every 11th request: 9.1% at most,
    // under the 10% ceiling (which it can therefore never be shown above), 9 points above
    // the baseline.
    let stable = FakeUpstream::start("stable").await;
    let canary = FakeUpstream::builder("canary")
        .fail_every(11, 10, 500)
        .start()
        .await;
    let proxy = Proxy::start(&circuit_config(&stable.url(), &canary.url(), 50).build()).await;
    let admin = proxy.admin_client();
    let client = HttpClient::http1();
    warm_baseline(&client, proxy.addr(), 1000).await;

    let expected = trip_point(&circuit_limits(), 1000, |i| i % 11 == 10).expect("fails") as usize;
    assert!(
        (50..=300).contains(&expected),
        "the analysis needs {expected} requests of a 9.1% canary against a clean baseline"
    );
    let users = users_in(0..5000, 400, "worse");
    let mut served = 0;
    for user in &users {
        let reply = send_as(&client, proxy.addr(), user).await;
        if reply.arm() == Some("stable") {
            break;
        }
        served += 1;
    }
    assert!(
        (expected..=expected + SLACK).contains(&served),
        "tripped after {served} canary requests, expected the {expected}th (+{SLACK})"
    );
    let w = admin.weights().await;
    assert_eq!(
        w["tripped"]["canary"]["reason"], "error_rate_increase",
        "{w}"
    );
    let detail = w["tripped"]["canary"]["detail"]
        .as_str()
        .unwrap_or_default();
    // Counted when the trip was decided: the failing request, and perhaps a few after it.
    let errors = expected / 11;
    assert!(
        detail.contains(&format!("arm {errors} errors in "))
            && detail.contains("0 errors in 1000 requests")
            && detail.contains("above max_error_rate_increase 2%"),
        "{detail}"
    );
    let m = admin.metrics().await;
    assert_eq!(rollbacks(&m, "error_rate_increase"), 1.0, "{}", m.text);
    assert_eq!(rollbacks(&m, "error_rate"), 0.0, "{}", m.text);
    let verdict = |metric| {
        m.value(
            "canaryd_analysis_verdict",
            &[("upstream", "canary"), ("metric", metric)],
        )
    };
    assert_eq!(verdict("error_rate_increase"), Some(-1.0), "{}", m.text);
    assert_eq!(verdict("error_rate"), Some(0.0), "{}", m.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_baseline_never_makes_a_canary_look_worse() {
    // The same 9.1% canary against a baseline that has served 5 requests: the baseline's
    // error rate could be anything up to 74% at 99%, so nothing is shown about the canary's
    // increase over it.
    let stable = FakeUpstream::start("stable").await;
    let canary = FakeUpstream::builder("canary")
        .fail_every(11, 10, 500)
        .start()
        .await;
    let proxy = Proxy::start(&circuit_config(&stable.url(), &canary.url(), 50).build()).await;
    let admin = proxy.admin_client();
    let client = HttpClient::http1();

    warm_baseline(&client, proxy.addr(), 5).await;
    let users = users_in(0..5000, 300, "busy");
    for user in &users[..200] {
        let reply = send_as(&client, proxy.addr(), user).await;
        assert_eq!(
            reply.arm(),
            Some("canary"),
            "quiet baseline tripped it: {reply:?}"
        );
    }
    let s = poll_until(
        DEADLINE,
        "the analysis to hold 200 canary requests",
        || async {
            let s = admin.status().await;
            (canary_arm(&s)["analysis"]["arm"]["requests"] == 200).then_some(s)
        },
    )
    .await;
    let increase = &canary_arm(&s)["analysis"]["metrics"]["error_rate_increase"];
    assert_eq!(increase["verdict"], "inconclusive", "{s}");
    assert_eq!(admin.weights().await["tripped"], json!({}));

    // Once the baseline is busy (2000 clean requests), the canary's next checks trip it.
    warm_baseline(&client, proxy.addr(), 2000).await;
    let served = drive_until_tripped(&client, &proxy, &users[200..], 200).await;
    assert!(
        served <= 1 + SLACK,
        "tripped after {served} more canary requests, expected the 1st (+{SLACK})"
    );
    assert_eq!(
        admin.trip_reason("canary").await.as_deref(),
        Some("error_rate_increase")
    );
}

/// The issue that replaced the window rule: identical arms failing 2% of requests (a normal
/// background error rate) must not trip. 5,000 requests at 50%, each arm failing on its own
/// seeded schedule. Recomputed in Python (the schedule from `seeded_unit`, the interval with
/// math.lgamma): over the canary's first 3,000 requests its rate interval's low end never
/// passes 1.27%, below the 2-point margin whatever the baseline does, so no order in which
/// the concurrent requests finish can trip it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_arms_failing_two_percent_never_trip() {
    const REQUESTS: usize = 5000;
    let stable = FakeUpstream::builder("stable")
        .fail_seeded(0.02, 1, 500)
        .start()
        .await;
    let canary = FakeUpstream::builder("canary")
        .fail_seeded(0.02, 2, 500)
        .start()
        .await;
    let cfg = ConfigBuilder::new()
        .upstream("stable", &stable.url(), "50")
        .upstream("canary", &canary.url(), "50")
        .set("rollback", "enabled", "true");
    let proxy = Proxy::start(&cfg.build()).await;
    let admin = proxy.admin_client();
    let client = HttpClient::http1();
    let ids = user_ids(REQUESTS);
    let replies = route_all(&client, proxy.addr(), &ids, CONCURRENCY).await;
    let canary_served = replies.iter().filter(|r| r.arm() == Some("canary")).count();
    assert!(
        canary_served > 2000,
        "the canary served {canary_served} of {REQUESTS}: it tripped"
    );
    let s = poll_until(DEADLINE, "the analysis to hold every request", || async {
        let s = admin.status().await;
        let a = &canary_arm(&s)["analysis"];
        let total = a["arm"]["requests"].as_u64()? + a["baseline"]["requests"].as_u64()?;
        (total == REQUESTS as u64).then_some(s)
    })
    .await;
    assert_eq!(admin.weights().await["tripped"], json!({}), "{s}");
    let a = &canary_arm(&s)["analysis"];
    assert_ne!(a["verdict"], "fail", "{s}");
    // The difference's interval holds 0 (the truth here) and is what the verdict is read from.
    let increase = &a["metrics"]["error_rate_increase"];
    let interval = &increase["checks"][0]["interval"];
    let (lo, hi) = (
        interval[0].as_f64().expect("lo"),
        interval[1].as_f64().expect("hi"),
    );
    assert!(lo < 0.0 && 0.0 < hi, "{increase}");
    assert_eq!(increase["checks"][0]["limit"], 0.02);
    // Three quarters of the 1% budget go to the increase (the ceiling has the rest).
    assert_eq!(increase["confidence"], 0.9925);
    let errors = |arm: &str| {
        replies
            .iter()
            .filter(|r| r.arm() == Some(arm) && r.status == StatusCode::INTERNAL_SERVER_ERROR)
            .count() as u64
    };
    assert_eq!(a["arm"]["errors"], errors("canary"), "{s}");
    assert_eq!(a["baseline"]["errors"], errors("stable"), "{s}");
    let m = admin.metrics().await;
    assert_eq!(m.sum("canaryd_rollbacks_total", &[]), 0.0, "{}", m.text);
}

// ---------------------------------------------------------------------------------------------
// A trip lasts until reset or a new build
// ---------------------------------------------------------------------------------------------

fn with_state(cfg: ConfigBuilder, state: &Path) -> ConfigBuilder {
    cfg.set("state", "file", &q(state.to_str().unwrap()))
}

/// Trips the canary (which must be failing with `status`) with canary-range users.
async fn trip(client: &HttpClient, proxy: &Proxy, tag: &str, status: u16) -> usize {
    let users = users_in(0..1000, 100, tag);
    drive_until_tripped(client, proxy, &users, status).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trip_survives_reload_and_restart_until_reset() {
    let stable = FakeUpstream::start("stable").await;
    let canary = FakeUpstream::builder("canary").status(500).start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state.json");
    let client = HttpClient::http1();
    // Bucket in [1000, 2000): stable at 10%, canary at 20%.
    let mover = user_in_bucket_range(1000..2000);
    let loyal = users_in(0..1000, 30, "loyal");

    let mut proxy =
        Proxy::start(&with_state(circuit_config(&stable.url(), &canary.url(), 10), &state).build())
            .await;
    let admin = proxy.admin_client();
    trip(&client, &proxy, "survive", 500).await;
    let tripped = admin.weights().await["tripped"]["canary"].clone();
    assert_eq!(tripped["reason"], "error_rate");

    // A reload with the same url (and a new weight) keeps the trip; the weight waits.
    let reloaded = with_state(circuit_config(&stable.url(), &canary.url(), 20), &state)
        .set("listen", "access_log", "true")
        .build();
    proxy.rewrite_config(&reloaded, Rewrite::Rename);
    let w = poll_until(DEADLINE, "the reload to apply", || async {
        let w = admin.weights().await;
        (w["file"]["canary"] == 20).then_some(w)
    })
    .await;
    assert_eq!(w["tripped"]["canary"], tripped, "{w}");
    assert_eq!(w["effective"], json!({"stable": 100, "canary": 0}), "{w}");
    assert_eq!(w["configured"], json!({"stable": 80, "canary": 20}), "{w}");
    assert_all_served_by(&client, proxy.addr(), &loyal, "stable").await;
    assert_eq!(
        send_as(&client, proxy.addr(), &mover).await.arm(),
        Some("stable")
    );
    proxy.shutdown().await.expect("shutdown");

    // A restart with the state file keeps it too.
    let proxy = Proxy::start(&reloaded).await;
    let admin = proxy.admin_client();
    let w = admin.weights().await;
    assert_eq!(w["tripped"]["canary"], tripped, "after restart: {w}");
    assert_eq!(w["effective"], json!({"stable": 100, "canary": 0}), "{w}");
    let m = admin.metrics().await;
    assert_eq!(tripped_gauge(&m, "canary"), Some(1.0), "{}", m.text);
    assert_all_served_by(&client, proxy.addr(), &loyal, "stable").await;

    // The fixed canary is back after POST /reset, with the weight the file gave it meanwhile.
    canary.set_status(200);
    let before = canary.requests();
    let doc = admin.post_ok("/reset", None).await;
    assert_eq!(doc["tripped"], json!({}), "{doc}");
    assert_eq!(
        doc["effective"],
        json!({"stable": 80, "canary": 20}),
        "{doc}"
    );
    assert_all_served_by(&client, proxy.addr(), &loyal, "canary").await;
    assert_eq!(
        send_as(&client, proxy.addr(), &mover).await.arm(),
        Some("canary")
    );
    assert_eq!(canary.requests(), before + loyal.len() + 1);
    let m = admin.metrics().await;
    assert_eq!(tripped_gauge(&m, "canary"), Some(0.0));
    assert_eq!(
        m.value("canaryd_upstream_weight_percent", &[("upstream", "canary")]),
        Some(20.0)
    );
}

/// How the canary gets tripped before a reset.
#[derive(Clone, Copy, Debug, PartialEq)]
enum TripBy {
    /// min_requests failures trip the circuit.
    Circuit,
    /// A few failures (under min_requests), then `POST /rollback`.
    Manual,
}

/// After a reset, the canary starts from an empty window: the errors it had before cannot
/// trip it again (README: "its window is cleared then, so old errors cannot re-trip it").
/// With `traffic_between`, baseline traffic flows between the trip and the reset; without,
/// nothing happens in between.
async fn reset_starts_a_fresh_window(how: TripBy, traffic_between: bool) {
    let stable = FakeUpstream::start("stable").await;
    let canary = FakeUpstream::builder("canary").status(500).start().await;
    let proxy = Proxy::start(&circuit_config(&stable.url(), &canary.url(), 10).build()).await;
    let admin = proxy.admin_client();
    let client = HttpClient::http1();
    let users = users_in(0..1000, 100, "fresh");

    let failures = match how {
        TripBy::Circuit => MIN_REQUESTS,
        TripBy::Manual => MIN_REQUESTS - 5,
    };
    for user in &users[..failures] {
        let reply = send_as(&client, proxy.addr(), user).await;
        assert_eq!(reply.arm(), Some("canary"), "{reply:?}");
        assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
    }
    // Then nothing more reaches the canary until it is tripped.
    let reason = match how {
        TripBy::Circuit => admin.wait_tripped("canary", DEADLINE).await,
        TripBy::Manual => {
            poll_until(DEADLINE, "the window to hold the failures", || async {
                let s = admin.status().await;
                (canary_window(&s)["errors"] == failures).then_some(())
            })
            .await;
            let doc = admin.post_ok("/rollback", None).await;
            doc["tripped"]["canary"]["reason"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        }
    };
    assert_eq!(
        reason,
        if how == TripBy::Circuit {
            "error_rate"
        } else {
            "manual"
        }
    );
    if traffic_between {
        assert_all_served_by(&client, proxy.addr(), &users[MIN_REQUESTS..60], "stable").await;
    }

    canary.set_status(200);
    let doc = admin.post_ok("/reset", None).await;
    assert_eq!(doc["tripped"], json!({}), "{doc}");
    // 40 healthy requests. Had the old errors stayed in the window, a few healthy requests
    // would re-trip it (20 of 21 failed, or 15 of 20).
    let mut wrong = Vec::new();
    for user in &users[60..] {
        let reply = send_as(&client, proxy.addr(), user).await;
        if reply.arm() != Some("canary") || reply.status != StatusCode::OK {
            wrong.push(format!("{user}: {} {:?}", reply.status, reply.arm()));
        }
    }
    let w = admin.weights().await;
    assert!(
        wrong.is_empty() && w["tripped"] == json!({}),
        "re-tripped after reset by the old window: {} of 40 healthy canary requests not \
         served by the canary (first {:?}); /weights {w}",
        wrong.len(),
        wrong.first()
    );
    let s = poll_until(DEADLINE, "the window to count the new requests", || async {
        let s = admin.status().await;
        (canary_window(&s)["requests"] == 40).then_some(s)
    })
    .await;
    assert_eq!(canary_window(&s)["errors"], 0, "{s}");
    let m = admin.metrics().await;
    assert_eq!(m.sum("canaryd_rollbacks_total", &[]), 1.0, "{}", m.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_after_traffic_does_not_retrip_from_the_old_window() {
    reset_starts_a_fresh_window(TripBy::Circuit, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_right_after_the_trip_does_not_retrip_from_the_old_window() {
    reset_starts_a_fresh_window(TripBy::Circuit, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_after_manual_rollback_and_traffic_starts_a_fresh_window() {
    reset_starts_a_fresh_window(TripBy::Manual, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_right_after_manual_rollback_starts_a_fresh_window() {
    reset_starts_a_fresh_window(TripBy::Manual, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_canary_url_clears_the_trip() {
    let stable = FakeUpstream::start("stable").await;
    let canary = FakeUpstream::builder("canary").status(500).start().await;
    let fixed = FakeUpstream::start("canary-build-2").await;
    let mut proxy = Proxy::start(&circuit_config(&stable.url(), &canary.url(), 10).build()).await;
    let admin = proxy.admin_client();
    let client = HttpClient::http1();
    trip(&client, &proxy, "new-build", 500).await;

    proxy.rewrite_config(
        &circuit_config(&stable.url(), &fixed.url(), 10).build(),
        Rewrite::Rename,
    );
    let w = poll_until(DEADLINE, "the new url to clear the trip", || async {
        let w = admin.weights().await;
        (w["tripped"] == json!({})).then_some(w)
    })
    .await;
    assert_eq!(w["effective"], json!({"stable": 90, "canary": 10}), "{w}");

    // The new build serves the canary's users and starts with a clean window.
    let users = users_in(0..1000, 40, "new-build-users");
    let replies = route_all(&client, proxy.addr(), &users, 1).await;
    for reply in &replies {
        assert_eq!(reply.arm(), Some("canary"), "{reply:?}");
        assert_eq!(reply.body, "canary-build-2", "{reply:?}");
    }
    assert_eq!(fixed.requests(), users.len());
    assert_eq!(admin.weights().await["tripped"], json!({}));
    let s = admin.status().await;
    assert_eq!(canary_window(&s)["errors"], 0, "{s}");
    let m = admin.metrics().await;
    assert_eq!(tripped_gauge(&m, "canary"), Some(0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn naming_a_tripped_arm_is_a_conflict_with_the_reason() {
    let stable = FakeUpstream::start("stable").await;
    let canary = FakeUpstream::builder("canary").status(502).start().await;
    let proxy = Proxy::start(&circuit_config(&stable.url(), &canary.url(), 10).build()).await;
    let admin = proxy.admin_client();
    let client = HttpClient::http1();
    trip(&client, &proxy, "conflict", 502).await;
    let before = admin.weights().await;

    for (method, path, body) in [
        ("PUT", "/weights", Some(json!({"canary": 25}))),
        ("PUT", "/weights", Some(json!({"stable": 75, "canary": 25}))),
        ("POST", "/promote", None),
        ("POST", "/promote", Some(json!({"upstream": "canary"}))),
    ] {
        let text = body.as_ref().map(Value::to_string);
        let reply = admin.call(method, path, text.as_deref()).await;
        assert_eq!(
            reply.status,
            StatusCode::CONFLICT,
            "{method} {path}: {reply:?}"
        );
        let msg = reply.json()["error"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(
            msg.contains("canary") && msg.contains("error_rate") && msg.contains("errors in"),
            "the message names the arm and the reason: {msg:?}"
        );
        assert_eq!(
            admin.weights().await,
            before,
            "{method} {path} changed something"
        );
    }

    admin.post_ok("/reset", None).await;
    let doc = admin.set_weights(json!({"canary": 25})).await;
    assert_eq!(doc["effective"], json!({"stable": 75, "canary": 25}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_canary_fails_over_to_the_baseline_and_trips() {
    let stable = FakeUpstream::start("stable").await;
    let dead = closed_port_url().await;
    let proxy = Proxy::start(&circuit_config(&stable.url(), &dead, 10).build()).await;
    let admin = proxy.admin_client();
    let client = HttpClient::http1();
    let users = users_in(0..1000, 120, "dead");

    // A request with a body cannot be replayed: 502 naming the canary.
    let reply = client
        .fetch(request(
            "POST",
            proxy.addr(),
            "/upload",
            &[("x-user-id", &users[0])],
            full("payload"),
        ))
        .await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{reply:?}");
    assert_eq!(reply.arm(), Some("canary"));

    // Bodyless requests are answered by the baseline, every one of them.
    for user in &users[1..60] {
        let reply = send_as(&client, proxy.addr(), user).await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        assert_eq!(reply.arm(), Some("stable"), "{reply:?}");
        assert_eq!(reply.body, "stable", "{reply:?}");
    }
    let reason = admin.wait_tripped("canary", DEADLINE).await;
    assert_eq!(reason, "error_rate");

    let m = admin.metrics().await;
    let connect = m.sum(
        "canaryd_upstream_failures_total",
        &[("upstream", "canary"), ("kind", "connect")],
    ) as usize;
    assert!(
        (MIN_REQUESTS..=MIN_REQUESTS + SLACK).contains(&connect),
        "{connect} connect failures before the trip (min_requests {MIN_REQUESTS})"
    );
    assert_eq!(
        m.by_label(
            "canaryd_requests_total",
            &[("upstream", "canary")],
            "status"
        ),
        [("502".to_string(), 1.0)].into(),
        "only the request with a body is the canary's"
    );
    assert_eq!(
        m.value(
            "canaryd_requests_total",
            &[("upstream", "stable"), ("status", "200")]
        ),
        Some(59.0),
        "failed-over requests count for the baseline that answered"
    );
    assert_eq!(stable.requests(), 59);
    assert_eq!(rollbacks(&m, "error_rate"), 1.0);
    assert_eq!(tripped_gauge(&m, "canary"), Some(1.0));
    let s = admin.status().await;
    let window = canary_window(&s);
    assert_eq!(window["requests"].as_u64(), Some(connect as u64), "{s}");
    assert_eq!(window["errors"].as_u64(), Some(connect as u64), "{s}");

    // Once tripped, the canary is not even tried.
    assert_all_served_by(&client, proxy.addr(), &users[60..], "stable").await;
    let m = admin.metrics().await;
    assert_eq!(
        m.sum(
            "canaryd_upstream_failures_total",
            &[("upstream", "canary"), ("kind", "connect")],
        ) as usize,
        connect
    );
}
