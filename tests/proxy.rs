//! End-to-end data-path tests: canaryd in-process in front of fake upstreams (the routing rule
//! and the data path's behaviour as the README states them).

mod common;

use std::time::{Duration, Instant};

use common::*;
use http::{StatusCode, Version};
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Users routed in the exhaustive assignment checks.
const USERS: usize = 3000;
/// Requests in flight at once in bulk checks.
const CONCURRENCY: usize = 8;

/// stable + canary fake upstreams and a config with `canary_weight` for the canary.
async fn two_arms(canary_weight: &str) -> (FakeUpstream, FakeUpstream, ConfigBuilder) {
    let stable = FakeUpstream::start("stable").await;
    let canary = FakeUpstream::start("canary").await;
    let stable_weight = format!("{}", 100.0 - canary_weight.parse::<f64>().unwrap());
    let cfg = ConfigBuilder::new()
        .upstream("stable", &stable.url(), &stable_weight)
        .upstream("canary", &canary.url(), canary_weight);
    (stable, canary, cfg)
}

/// A user the 90/10 rule sends to the stable arm, and one it sends to the canary.
fn stable_and_canary_users() -> (String, String) {
    (
        user_in_bucket_range(1000..10000),
        user_in_bucket_range(0..1000),
    )
}

fn assert_one_line_naming(reply: &Reply, arm: &str) {
    let ctype = reply.header("content-type").unwrap_or("");
    assert!(
        ctype.starts_with("text/plain"),
        "proxy error should be text/plain, got {ctype:?}: {reply:?}"
    );
    assert_eq!(
        reply.body.trim_end().lines().count(),
        1,
        "proxy error body should be one line: {:?}",
        reply.body
    );
    assert!(
        reply.body.contains(arm),
        "proxy error body should name the arm {arm:?}: {:?}",
        reply.body
    );
    assert!(
        reply.header(FAKE_HEADER).is_none(),
        "error must be made by the proxy, not the upstream: {reply:?}"
    );
}

#[test]
fn bucket_matches_the_readme_vectors_and_an_independent_reference() {
    for (key, bucket) in [
        ("user_123", 8884),
        ("user_456", 3544),
        ("alice", 83),
        ("42", 7451),
    ] {
        assert_eq!(
            reference_bucket("", key),
            bucket,
            "test reference for {key}"
        );
        assert_eq!(
            canaryd::routing::bucket(b"", key.as_bytes()),
            bucket,
            "canaryd::routing::bucket for {key}"
        );
    }
    let mut seen = std::collections::HashSet::new();
    for id in user_ids(USERS) {
        for salt in ["", "s1", "canary-2024"] {
            let got = canaryd::routing::bucket(salt.as_bytes(), id.as_bytes());
            assert!(got < 10_000, "bucket out of range for {id}: {got}");
            assert_eq!(got, reference_bucket(salt, &id), "salt {salt:?} id {id:?}");
            seen.insert(got);
        }
        // The test's two reference forms agree (python rule == bucket rule for whole %).
        for p in [1, 10, 33, 50, 99] {
            assert_eq!(
                reference_arm(&id, p),
                reference_bucket("", &id) < p as u16 * 100
            );
        }
    }
    assert!(seen.len() > 5000, "buckets poorly spread: {}", seen.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_90_10_matches_python_reference_for_3000_users() {
    let (stable, canary, cfg) = two_arms("10").await;
    let proxy = Proxy::start(&cfg.build()).await;
    let client = HttpClient::http1();
    let ids = user_ids(USERS);
    let replies = route_all(&client, proxy.addr(), &ids, CONCURRENCY).await;

    let mut expected_canary = 0;
    let mut wrong = Vec::new();
    for (id, reply) in ids.iter().zip(&replies) {
        let expected = if reference_arm(id, 10) {
            expected_canary += 1;
            "canary"
        } else {
            "stable"
        };
        if reply.arm() != Some(expected) || reply.body != expected {
            wrong.push(format!(
                "{id}: expected {expected}, header {:?} body {:?}",
                reply.arm(),
                reply.body
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {USERS} users misrouted; first: {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
    assert_eq!(canary.requests(), expected_canary);
    assert_eq!(stable.requests(), USERS - expected_canary);
    assert!(
        (200..400).contains(&expected_canary),
        "reference sanity: {expected_canary} canary users of {USERS}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_arms_take_consecutive_bucket_ranges_in_config_order() {
    let canary_a = FakeUpstream::start("canary-a").await;
    let stable = FakeUpstream::start("stable").await;
    let canary_b = FakeUpstream::start("canary-b").await;
    // The baseline sits between the canaries in config order on purpose: non-baseline arms
    // take ranges from 0 in config order, the baseline takes the rest.
    let cfg = ConfigBuilder::new()
        .set("routing", "baseline", &q("stable"))
        .upstream("canary-a", &canary_a.url(), "5")
        .upstream("stable", &stable.url(), "82.5")
        .upstream("canary-b", &canary_b.url(), "12.5")
        .build();
    let proxy = Proxy::start(&cfg).await;
    let client = HttpClient::http1();
    let ids = user_ids(USERS);
    let replies = route_all(&client, proxy.addr(), &ids, CONCURRENCY).await;

    let mut counts = [0usize; 3];
    let mut wrong = Vec::new();
    for (id, reply) in ids.iter().zip(&replies) {
        let bucket = reference_bucket("", id);
        let (idx, expected) = match bucket {
            b if b < 500 => (0, "canary-a"),
            b if b < 1750 => (1, "canary-b"),
            _ => (2, "stable"),
        };
        counts[idx] += 1;
        if reply.arm() != Some(expected) || reply.body != expected {
            wrong.push(format!(
                "{id} (bucket {bucket}): expected {expected}, got {:?}/{:?}",
                reply.arm(),
                reply.body
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {USERS} users misrouted; first: {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
    assert_eq!(canary_a.requests(), counts[0]);
    assert_eq!(canary_b.requests(), counts[1]);
    assert_eq!(stable.requests(), counts[2]);
    assert!(
        counts[0] > 50 && counts[1] > 200,
        "reference sanity: {counts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_sticky_header_are_split_at_random_by_weight() {
    const N: usize = 2000;
    let (stable, canary, cfg) = two_arms("30").await;
    let proxy = Proxy::start(&cfg.build()).await;
    let client = HttpClient::http1();
    let requests = (0..N)
        .map(|_| request("GET", proxy.addr(), "/random", &[], empty()))
        .collect();
    let replies = fetch_all(&client, requests, CONCURRENCY).await;

    let mut to_canary = 0;
    for reply in &replies {
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        match reply.arm() {
            Some("canary") => to_canary += 1,
            Some("stable") => {}
            other => panic!("unexpected arm {other:?}: {reply:?}"),
        }
        assert_eq!(reply.arm(), Some(reply.body.as_str()));
    }
    // 30% of 2000 = 600, sd ~ 20.5; 24%..36% is about +-5.8 sd.
    assert!(
        (N * 24 / 100..=N * 36 / 100).contains(&to_canary),
        "{to_canary} of {N} random requests went to the 30% canary"
    );
    assert_eq!(canary.requests(), to_canary);
    assert_eq!(stable.requests(), N - to_canary);
}

#[tokio::test]
async fn override_header_forces_the_named_arm() {
    let (stable, canary, cfg) = two_arms("10").await;
    let proxy = Proxy::start(
        &cfg.set("routing", "override_header", &q("x-canary"))
            .build(),
    )
    .await;
    let client = HttpClient::http1();
    let (stable_user, canary_user) = stable_and_canary_users();
    let addr = proxy.addr();

    let cases: [(&[(&str, &str)], &str); 7] = [
        (&[("x-user-id", &stable_user)], "stable"),
        (&[("x-user-id", &canary_user)], "canary"),
        (
            &[("x-user-id", &stable_user), ("x-canary", "canary")],
            "canary",
        ),
        (
            &[("x-user-id", &canary_user), ("x-canary", "stable")],
            "stable",
        ),
        // An unknown arm name falls back to the sticky rule.
        (
            &[("x-user-id", &canary_user), ("x-canary", "nope")],
            "canary",
        ),
        (
            &[("x-user-id", &stable_user), ("x-canary", "nope")],
            "stable",
        ),
        // No sticky header at all: the override still decides.
        (&[("x-canary", "canary")], "canary"),
    ];
    for (headers, expected) in cases {
        for _ in 0..3 {
            let reply = client.get(addr, "/override", headers).await;
            assert_eq!(reply.status, StatusCode::OK, "{headers:?}: {reply:?}");
            assert_eq!(reply.arm(), Some(expected), "{headers:?}: {reply:?}");
            assert_eq!(reply.body, expected, "{headers:?}");
        }
    }
    // Without a sticky header the random split would send ~90% to stable; 20 forced requests
    // all reaching the canary cannot be chance.
    for _ in 0..20 {
        let reply = client.get(addr, "/", &[("x-canary", "canary")]).await;
        assert_eq!(reply.arm(), Some("canary"));
    }
    assert_eq!(stable.requests() + canary.requests(), 7 * 3 + 20);
}

#[tokio::test]
async fn override_header_is_off_unless_configured() {
    let (_stable, _canary, cfg) = two_arms("10").await;
    let proxy = Proxy::start(&cfg.build()).await;
    let client = HttpClient::http1();
    let (stable_user, _) = stable_and_canary_users();
    for _ in 0..5 {
        let reply = client
            .get(
                proxy.addr(),
                "/",
                &[("x-user-id", &stable_user), ("x-canary", "canary")],
            )
            .await;
        assert_eq!(reply.arm(), Some("stable"), "{reply:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn salt_changes_assignment_deterministically() {
    const SALT: &str = "canary-2024";
    let ids = user_ids(600);
    let (_stable, _canary, cfg) = two_arms("10").await;
    let cfg = cfg.set("routing", "salt", &q(SALT)).build();
    let first = Proxy::start(&cfg).await;
    let replica = Proxy::start(&cfg).await;
    let client = HttpClient::http1();

    let pass1 = route_all(&client, first.addr(), &ids, CONCURRENCY).await;
    let pass2 = route_all(&client, first.addr(), &ids, CONCURRENCY).await;
    let other = route_all(&client, replica.addr(), &ids, CONCURRENCY).await;

    let mut moved_by_salt = 0;
    for (i, id) in ids.iter().enumerate() {
        let expected = if reference_arm_salted(SALT, id, 10) {
            "canary"
        } else {
            "stable"
        };
        assert_eq!(pass1[i].arm(), Some(expected), "salted rule for {id}");
        assert_eq!(pass2[i].arm(), pass1[i].arm(), "second pass for {id}");
        assert_eq!(other[i].arm(), pass1[i].arm(), "replica for {id}");
        if reference_arm(id, 10) != (expected == "canary") {
            moved_by_salt += 1;
        }
    }
    // Expected ~ 2 * 0.1 * 0.9 * 600 = 108 users whose arm differs from the unsalted rule.
    assert!(
        moved_by_salt > 50,
        "salt should reshuffle users, only {moved_by_salt} moved"
    );
}

#[tokio::test]
async fn an_http2_upstream_gets_its_own_authority_and_no_host_field() {
    // HTTP/2 upstreams (nginx, for one) refuse a `host` field that differs from `:authority`:
    // the upstream gets its own authority and the client's host in x-forwarded-host.
    let echo = FakeUpstream::builder("stable").echo_headers().start().await;
    let cfg = ConfigBuilder::new()
        .upstream("stable", &echo.url(), "100")
        .upstream_set("http2", "true")
        .build();
    let proxy = Proxy::start(&cfg).await;
    let h2_host = proxy.addr().to_string();
    // An HTTP/2 client names the host in `:authority` (the address it dials).
    for (client, host, fields) in [
        (
            HttpClient::http1(),
            "app.example:8080",
            vec![("host", "app.example:8080")],
        ),
        (HttpClient::h2c(), h2_host.as_str(), vec![]),
    ] {
        let reply = client.get(proxy.addr(), "/echo?q=1", &fields).await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        let seen = reply.json();
        assert_eq!(seen["version"], "HTTP/2.0", "{seen}");
        assert_eq!(seen["uri"], format!("{}/echo?q=1", echo.url()), "{seen}");
        assert!(seen["headers"]["host"].is_null(), "{seen}");
        assert_eq!(seen["headers"]["x-forwarded-host"][0], host, "{seen}");
    }
}

#[tokio::test]
async fn hop_by_hop_headers_removed_and_forwarding_headers_set() {
    let echo = FakeUpstream::builder("stable").echo_headers().start().await;
    let canary = FakeUpstream::start("canary").await;
    let cfg = ConfigBuilder::new()
        .upstream("stable", &echo.url(), "100")
        .upstream("canary", &canary.url(), "0")
        .build();
    let proxy = Proxy::start(&cfg).await;
    let client = HttpClient::http1();

    let reply = client
        .fetch(request(
            "POST",
            proxy.addr(),
            "/echo/path?x=1&y=two",
            &[
                ("host", "example.test"),
                ("connection", "keep-alive, x-hop-custom"),
                ("keep-alive", "timeout=5"),
                ("x-hop-custom", "must not pass"),
                ("x-forwarded-for", "203.0.113.7"),
                ("x-end-to-end", "kept"),
                ("x-user-id", "someone"),
            ],
            full("hello"),
        ))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.arm(), Some("stable"));
    let seen = reply.json();
    let header = |name: &str| -> Option<Vec<String>> {
        seen["headers"][name].as_array().map(|values| {
            values
                .iter()
                .map(|v| v.as_str().unwrap().to_string())
                .collect()
        })
    };
    assert_eq!(seen["method"], "POST");
    assert_eq!(seen["uri"], "/echo/path?x=1&y=two");
    assert_eq!(
        header("host"),
        Some(vec!["example.test".to_string()]),
        "{seen}"
    );
    assert_eq!(header("keep-alive"), None, "keep-alive forwarded: {seen}");
    assert_eq!(
        header("x-hop-custom"),
        None,
        "header named in Connection forwarded: {seen}"
    );
    if let Some(conn) = header("connection") {
        assert!(
            !conn.join(",").contains("x-hop-custom"),
            "client's Connection forwarded: {seen}"
        );
    }
    assert_eq!(header("x-end-to-end"), Some(vec!["kept".to_string()]));
    assert_eq!(header("x-user-id"), Some(vec!["someone".to_string()]));
    assert_eq!(
        header("x-forwarded-for").map(|v| v.join(", ")),
        Some("203.0.113.7, 127.0.0.1".to_string()),
        "x-forwarded-for must be appended: {seen}"
    );
    assert_eq!(header("x-forwarded-proto"), Some(vec!["http".to_string()]));
    assert_eq!(
        header("x-forwarded-host"),
        Some(vec!["example.test".to_string()])
    );

    // Without an incoming x-forwarded-for the proxy starts the list.
    let reply = client
        .get(proxy.addr(), "/", &[("host", "other.test")])
        .await;
    let seen = reply.json();
    assert_eq!(
        seen["headers"]["x-forwarded-for"],
        serde_json::json!(["127.0.0.1"])
    );
    assert_eq!(seen["headers"]["host"], serde_json::json!(["other.test"]));
    assert_eq!(canary.requests(), 0);
}

#[tokio::test]
async fn sse_events_reach_the_client_one_by_one() {
    const EVENTS: usize = 5;
    let sse = FakeUpstream::builder("stable")
        .sse_gated(EVENTS)
        .start()
        .await;
    let canary = FakeUpstream::start("canary").await;
    let cfg = ConfigBuilder::new()
        .upstream("stable", &sse.url(), "90")
        .upstream("canary", &canary.url(), "10")
        .build();
    let proxy = Proxy::start(&cfg).await;
    let (stable_user, _) = stable_and_canary_users();
    // A buffering proxy never sends the head: fail in seconds, not at the default timeout.
    let client = HttpClient::http1().with_timeout(Duration::from_secs(5));

    let resp = client
        .send(request(
            "GET",
            proxy.addr(),
            "/v1/completions",
            &[("x-user-id", &stable_user), ("accept", "text/event-stream")],
            empty(),
        ))
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers().get("content-type").unwrap(),
        "text/event-stream"
    );
    assert_eq!(resp.headers().get(ARM_HEADER).unwrap(), "stable");
    let mut body = resp.into_body();
    let mut received = String::new();
    for i in 0..EVENTS {
        let expected: String = (0..=i).map(|j| sse.sse_event(j)).collect();
        while received.len() < expected.len() {
            // The upstream holds event i+1 until we release it, so a proxy that buffers the
            // response never delivers event i and this times out.
            let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
                .await
                .unwrap_or_else(|_| {
                    panic!("event {i} not delivered while the upstream waits; got {received:?}")
                })
                .expect("stream ended early")
                .expect("body error");
            if let Some(data) = frame.data_ref() {
                received.push_str(std::str::from_utf8(data).unwrap());
            }
        }
        assert_eq!(received, expected);
        assert_eq!(
            sse.sse_sent(),
            i + 1,
            "upstream must not have sent past event {i}"
        );
        sse.release_chunks(1);
    }
    let end = tokio::time::timeout(Duration::from_secs(5), body.collect())
        .await
        .expect("stream end")
        .expect("body error")
        .to_bytes();
    assert!(end.is_empty(), "unexpected trailing data {end:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_upload_is_streamed_and_counted_exactly() {
    const SIZE: u64 = 64 << 20;
    let counter = FakeUpstream::builder("stable").count_body().start().await;
    let canary = FakeUpstream::start("canary").await;
    let cfg = ConfigBuilder::new()
        .upstream("stable", &counter.url(), "90")
        .upstream("canary", &canary.url(), "10")
        .build();
    let proxy = Proxy::start(&cfg).await;
    let (stable_user, _) = stable_and_canary_users();
    let client = HttpClient::http1().with_timeout(Duration::from_secs(60));

    // Chunked (no Content-Length): the proxy cannot know the size up front.
    let reply = client
        .fetch(request(
            "POST",
            proxy.addr(),
            "/upload",
            &[("x-user-id", &stable_user)],
            PatternBody::new(SIZE, 64 << 10, false).boxed_body(),
        ))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.arm(), Some("stable"));
    assert_eq!(reply.body, SIZE.to_string());
    assert_eq!(counter.body_bytes(), SIZE);
}

/// stable (live) 90 / canary (closed port) 10.
async fn dead_canary() -> (FakeUpstream, Proxy) {
    let stable = FakeUpstream::start("stable").await;
    let dead = closed_port_url().await;
    let cfg = ConfigBuilder::new()
        .upstream("stable", &stable.url(), "90")
        .upstream("canary", &dead, "10")
        .set("listen", "request_timeout", &q("5s"))
        .build();
    let proxy = Proxy::start(&cfg).await;
    (stable, proxy)
}

#[tokio::test]
async fn closed_upstream_port_gives_502_naming_the_arm() {
    let (stable, proxy) = dead_canary().await;
    let (stable_user, canary_user) = stable_and_canary_users();
    let client = HttpClient::http1();

    // A request with a body: it cannot be replayed elsewhere, the client must get the 502.
    let reply = client
        .fetch(request(
            "POST",
            proxy.addr(),
            "/predict",
            &[("x-user-id", &canary_user)],
            full("{\"input\": 1}"),
        ))
        .await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{reply:?}");
    assert_one_line_naming(&reply, "canary");
    assert_eq!(
        stable.requests(),
        0,
        "the POST must not reach the stable arm"
    );

    let reply = client
        .get(proxy.addr(), "/", &[("x-user-id", &stable_user)])
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body, "stable");
}

/// A request without a body whose canary refuses the connection is replayed on the baseline;
/// a dead *baseline* still gives 502.
#[tokio::test]
async fn bodiless_request_to_closed_canary_fails_over_to_the_baseline() {
    let (stable, proxy) = dead_canary().await;
    let (_, canary_user) = stable_and_canary_users();
    let reply = HttpClient::http1()
        .get(proxy.addr(), "/", &[("x-user-id", &canary_user)])
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.arm(), Some("stable"));
    assert_eq!(reply.body, "stable");
    assert_eq!(stable.requests(), 1);
}

/// A request forced to the canary by the override header never fails over: whoever asks for
/// an arm by name gets that arm's answer, here the 502 that names it.
#[tokio::test]
async fn request_forced_to_a_closed_canary_gets_its_502_not_the_baseline() {
    let stable = FakeUpstream::start("stable").await;
    let dead = closed_port_url().await;
    let cfg = ConfigBuilder::new()
        .set("routing", "override_header", &q("x-canary"))
        .upstream("stable", &stable.url(), "90")
        .upstream("canary", &dead, "10")
        .build();
    let proxy = Proxy::start(&cfg).await;
    let (stable_user, canary_user) = stable_and_canary_users();
    let client = HttpClient::http1();
    for user in [&stable_user, &canary_user] {
        let reply = client
            .get(
                proxy.addr(),
                "/",
                &[("x-user-id", user.as_str()), ("x-canary", "canary")],
            )
            .await;
        assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{reply:?}");
        assert_one_line_naming(&reply, "canary");
        assert_eq!(reply.arm(), Some("canary"));
    }
    assert_eq!(
        stable.requests(),
        0,
        "a forced request never reaches the baseline"
    );
    // The same canary user without the override is routed, and fails over as before.
    let reply = client
        .get(proxy.addr(), "/", &[("x-user-id", &canary_user)])
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.arm(), Some("stable"));
    assert_eq!(stable.requests(), 1);
}

#[tokio::test]
async fn bodiless_request_to_closed_baseline_gives_502() {
    let canary = FakeUpstream::start("canary").await;
    let dead = closed_port_url().await;
    let cfg = ConfigBuilder::new()
        .upstream("stable", &dead, "90")
        .upstream("canary", &canary.url(), "10")
        .build();
    let proxy = Proxy::start(&cfg).await;
    let (stable_user, _) = stable_and_canary_users();
    let reply = HttpClient::http1()
        .get(proxy.addr(), "/", &[("x-user-id", &stable_user)])
        .await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{reply:?}");
    assert_one_line_naming(&reply, "stable");
    assert_eq!(canary.requests(), 0);
}

#[tokio::test]
async fn slow_upstream_gives_504_after_request_timeout() {
    let stable = FakeUpstream::start("stable").await;
    let slow = FakeUpstream::builder("canary")
        .delay(Duration::from_secs(5))
        .start()
        .await;
    let cfg = ConfigBuilder::new()
        .set("listen", "request_timeout", &q("200ms"))
        .upstream("stable", &stable.url(), "90")
        .upstream("canary", &slow.url(), "10")
        .build();
    let proxy = Proxy::start(&cfg).await;
    let (stable_user, canary_user) = stable_and_canary_users();
    let client = HttpClient::http1();

    let started = Instant::now();
    let reply = client
        .get(proxy.addr(), "/", &[("x-user-id", &canary_user)])
        .await;
    let elapsed = started.elapsed();
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT, "{reply:?}");
    assert_one_line_naming(&reply, "canary");
    assert!(
        elapsed >= Duration::from_millis(190) && elapsed < Duration::from_secs(3),
        "504 after {elapsed:?}, request_timeout is 200ms"
    );
    assert_eq!(slow.requests(), 1);

    let reply = client
        .get(proxy.addr(), "/", &[("x-user-id", &stable_user)])
        .await;
    assert_eq!(reply.status, StatusCode::OK);
}

#[tokio::test]
async fn oversized_request_head_gives_431_and_is_not_forwarded() {
    let (stable, canary, cfg) = two_arms("10").await;
    let proxy = Proxy::start(&cfg.set("listen", "max_header_bytes", "16384").build()).await;

    // Just under the limit passes.
    let medium = "m".repeat(8 * 1024);
    let reply = HttpClient::http1()
        .get(proxy.addr(), "/", &[("x-medium", &medium)])
        .await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "8 KiB header under a 16 KiB limit"
    );
    let forwarded = stable.requests() + canary.requests();
    assert_eq!(forwarded, 1);

    let big = "b".repeat(100 * 1000);
    let reply = HttpClient::http1()
        .get(proxy.addr(), "/", &[("x-big", &big)])
        .await;
    assert_eq!(
        reply.status,
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        "{:?}",
        reply.headers
    );
    assert_eq!(
        stable.requests() + canary.requests(),
        forwarded,
        "an oversized request must never be forwarded"
    );

    // The proxy keeps serving.
    let reply = HttpClient::http1().get(proxy.addr(), "/", &[]).await;
    assert_eq!(reply.status, StatusCode::OK);
}

#[tokio::test]
async fn malformed_request_line_gives_400_and_the_proxy_keeps_serving() {
    let (stable, canary, cfg) = two_arms("10").await;
    let proxy = Proxy::start(&cfg.build()).await;

    let mut stream = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
    stream
        .write_all(b"THIS IS NOT HTTP\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
        .await
        .expect("proxy should answer and close the connection")
        .expect("read");
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 400"),
        "expected a 400 status line, got {answer:?}"
    );
    assert_eq!(stable.requests() + canary.requests(), 0);

    let reply = HttpClient::http1().get(proxy.addr(), "/", &[]).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(stable.requests() + canary.requests(), 1);
}

#[tokio::test]
async fn h2c_prior_knowledge_requests_are_routed() {
    let (stable, canary, cfg) = two_arms("10").await;
    let proxy = Proxy::start(&cfg.build()).await;
    let (stable_user, canary_user) = stable_and_canary_users();
    let client = HttpClient::h2c();

    for (user, arm) in [(&stable_user, "stable"), (&canary_user, "canary")] {
        let reply = client
            .get(proxy.addr(), "/h2", &[("x-user-id", user)])
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        assert_eq!(reply.version, Version::HTTP_2);
        assert_eq!(reply.arm(), Some(arm));
        assert_eq!(reply.body, arm);
    }
    assert_eq!(stable.requests(), 1);
    assert_eq!(canary.requests(), 1);
    // Upstreams speak HTTP/1.1 unless `http2 = true`.
    assert_eq!(stable.last_version(), Some(Version::HTTP_11));
}

#[tokio::test]
async fn response_header_can_be_renamed_or_turned_off() {
    let (_stable, _canary, cfg) = two_arms("10").await;
    let (stable_user, _) = stable_and_canary_users();
    let renamed = Proxy::start(
        &cfg.clone()
            .set("routing", "response_header", &q("x-arm"))
            .build(),
    )
    .await;
    let reply = HttpClient::http1()
        .get(renamed.addr(), "/", &[("x-user-id", &stable_user)])
        .await;
    assert_eq!(reply.header("x-arm"), Some("stable"), "{reply:?}");
    assert_eq!(reply.arm(), None);

    let off = Proxy::start(&cfg.set("routing", "response_header", &q("")).build()).await;
    let reply = HttpClient::http1()
        .get(off.addr(), "/", &[("x-user-id", &stable_user)])
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.arm(), None, "{reply:?}");
    assert_eq!(reply.body, "stable");
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed_but_slow_requests_finish() {
    let stable = FakeUpstream::builder("stable")
        .delay(Duration::from_millis(1200))
        .start()
        .await;
    let cfg = ConfigBuilder::new()
        .set("listen", "idle_timeout", &q("300ms"))
        .upstream("stable", &stable.url(), "100")
        .build();
    let proxy = Proxy::start(&cfg).await;

    // A request that waits 1.2 s on the upstream (no bytes moving) outlives the 300 ms idle
    // timeout and still completes on the same connection.
    let mut stream = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
    let started = Instant::now();
    stream
        .write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let head = read_response_head(&mut stream).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(started.elapsed() >= Duration::from_millis(1150));

    // Then the keep-alive connection sits idle: closed about 300 ms later.
    let mut rest = Vec::new();
    closed_after_idle(stream.read_to_end(&mut rest), Duration::from_millis(300))
        .await
        .expect("read");
    assert_eq!(stable.requests(), 1);
}

#[tokio::test]
async fn slow_request_heads_are_cut_off_but_slow_upstreams_are_waited_for() {
    let stable = FakeUpstream::builder("stable")
        .on_path("/slow", 200, Duration::from_millis(1200))
        .start()
        .await;
    let cfg = ConfigBuilder::new()
        .set("listen", "header_read_timeout", &q("400ms"))
        .upstream("stable", &stable.url(), "100")
        .build();
    let proxy = Proxy::start(&cfg).await;

    // Slowloris: a head that keeps trickling in is closed once header_read_timeout has passed
    // since the connection opened, bytes or not.
    let mut slow = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
    let opened = Instant::now();
    let trickle = b"GET / HTTP/1.1\r\nHost: x\r\nx-a: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n";
    let mut closed_after = None;
    for byte in trickle.iter() {
        if slow.write_all(&[*byte]).await.is_err() {
            closed_after = Some(opened.elapsed());
            break;
        }
        let mut buf = [0u8; 64];
        if let Ok(read) = tokio::time::timeout(Duration::from_millis(50), slow.read(&mut buf)).await
        {
            assert_eq!(
                read.unwrap_or(0),
                0,
                "no response to a head that never ended"
            );
            closed_after = Some(opened.elapsed());
            break;
        }
    }
    let closed_after = closed_after.expect("the trickling connection was closed");
    assert!(
        closed_after >= Duration::from_millis(350) && closed_after < Duration::from_secs(3),
        "closed after {closed_after:?}, header_read_timeout is 400ms"
    );

    // A request waiting 1.2 s on its upstream is not a slow head: it completes, and the
    // next request on the same connection too.
    let mut stream = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
    for path in ["/slow", "/fast"] {
        let started = Instant::now();
        stream
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let head = read_response_head(&mut stream).await;
        assert!(head.starts_with("http/1.1 200"), "{path}: {head}");
        if path == "/slow" {
            assert!(started.elapsed() >= Duration::from_millis(1150));
        }
        // Read the body ("stable") so the next head starts clean.
        let mut body = [0u8; 6];
        stream.read_exact(&mut body).await.unwrap();
        assert_eq!(&body, b"stable");
    }
    // Then no next request comes: closed about header_read_timeout after the last response.
    let waiting_from = Instant::now();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest))
        .await
        .expect("the waiting connection is closed by the proxy")
        .expect("read");
    let waited = waiting_from.elapsed();
    assert!(
        waited >= Duration::from_millis(350) && waited < Duration::from_secs(3),
        "closed {waited:?} after the last response, header_read_timeout is 400ms"
    );
    assert_eq!(stable.requests(), 2);
}
