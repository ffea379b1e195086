//! End-to-end tests of the guards and explanations: pinned users, the preview of who would
//! move, the warmup of a new build, and the sample-ratio mismatch guard. canaryd runs
//! in-process in front of fake upstreams; what is asserted is what a client and an operator
//! see (responses, `/route`, `/preview`, `/weights`, `/status`, `/metrics`).

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use http::StatusCode;
use serde_json::json;

/// How long a reload, a ramp step or a verdict may take to show.
const DEADLINE: Duration = Duration::from_secs(15);

fn two_arms(stable: &str, canary: &str, canary_weight: u32) -> ConfigBuilder {
    ConfigBuilder::new()
        .upstream("stable", stable, &(100 - canary_weight).to_string())
        .upstream("canary", canary, &canary_weight.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_users_keep_their_arm_through_trips_and_reloads_and_stay_out_of_the_analysis() {
    let stable = FakeUpstream::start("stable").await;
    let canary = FakeUpstream::start("canary").await;
    // user_123 is in bucket 8884: the stable's under a 10% canary.
    let base = two_arms(&stable.url(), &canary.url(), 10);
    let config = base
        .clone()
        .raw("[routing.pins]\n\"user_123\" = \"canary\"\n");
    let mut proxy = Proxy::start(&config.build()).await;
    let admin = proxy.admin_client();
    let client = HttpClient::http1();

    let addr = proxy.addr();
    let ask = |id: &'static str| {
        let client = client.clone();
        async move {
            client
                .fetch(request("GET", addr, "/", &[("x-user-id", id)], empty()))
                .await
        }
    };
    assert_eq!(ask("user_123").await.arm(), Some("canary"));
    assert_eq!(ask("user_456").await.arm(), Some("stable"));
    let route = admin.get_json("/route?key=user_123").await;
    assert_eq!(route["arm"], "canary");
    assert_eq!(route["pinned"], true);
    assert!(
        route["why"].as_str().unwrap().contains("routing.pins"),
        "{route}"
    );

    // A pinned user's requests are not part of the analysis: the canary's comparison does
    // not see them.
    for _ in 0..20 {
        assert_eq!(ask("user_123").await.arm(), Some("canary"));
    }
    let status = admin.status().await;
    let canary_status = status["arms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "canary")
        .unwrap()
        .clone();
    let analysed = canary_status["analysis"]["arm"]["requests"].as_u64();
    assert_eq!(analysed.unwrap_or(0), 0, "{canary_status}");
    // ... while the window, which counts what the arm served, does.
    poll_until(
        DEADLINE,
        "the window to count the pinned requests",
        || async {
            let s = admin.status().await;
            (s["arms"][1]["window"]["requests"].as_u64() >= Some(21)).then_some(())
        },
    )
    .await;
    let status = admin.status().await;
    assert_eq!(
        status["arms"][1]["analysis"]["arm"]["requests"]
            .as_u64()
            .unwrap_or(0),
        0,
        "{status}"
    );

    // A tripped canary keeps its pinned users (QA can always see it); the others move.
    admin.post_ok("/rollback", None).await;
    assert_eq!(ask("user_123").await.arm(), Some("canary"));
    assert_eq!(ask("alice").await.arm(), Some("stable"));

    // An unknown arm in a reload is refused and the pins in force stay.
    proxy.rewrite_config(
        &base
            .clone()
            .raw("[routing.pins]\n\"user_123\" = \"canry\"\n")
            .build(),
        Rewrite::Rename,
    );
    let error = poll_until(DEADLINE, "the bad reload to be reported", || async {
        let s = admin.status().await;
        (s["last_reload"]["result"] == "failure").then(|| s["last_reload"]["error"].clone())
    })
    .await;
    assert!(
        error
            .as_str()
            .unwrap()
            .contains("routing.pins.\"user_123\""),
        "{error}"
    );
    assert_eq!(ask("user_123").await.arm(), Some("canary"));

    // Hot reload: the pin moves to the stable arm.
    proxy.rewrite_config(
        &base
            .clone()
            .raw("[routing.pins]\n\"user_123\" = \"stable\"\n\"alice\" = \"canary\"\n")
            .build(),
        Rewrite::Rename,
    );
    poll_until(DEADLINE, "the new pins", || async {
        (admin.get_json("/route?key=alice").await["pinned"] == true).then_some(())
    })
    .await;
    assert_eq!(ask("user_123").await.arm(), Some("stable"));
    assert_eq!(ask("alice").await.arm(), Some("canary"));
    stable.assert_healthy();
    canary.assert_healthy();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preview_counts_exactly_the_recent_users_that_would_move() {
    let stable = FakeUpstream::start("stable").await;
    let canary = FakeUpstream::start("canary").await;
    let proxy = Proxy::start(&two_arms(&stable.url(), &canary.url(), 10).build()).await;
    let admin = proxy.admin_client();
    let client = HttpClient::http1();

    let ids = user_ids(600);
    // Every user twice: the sample counts distinct users.
    let mut requests = Vec::new();
    for id in ids.iter().chain(ids.iter()) {
        requests.push(request(
            "GET",
            proxy.addr(),
            "/",
            &[("x-user-id", id)],
            empty(),
        ));
    }
    for r in fetch_all(&client, requests, 8).await {
        assert_eq!(r.status, StatusCode::OK);
    }
    // The reference: the routing rule computed independently, users in [1000, 3000) move.
    let moving = ids
        .iter()
        .filter(|id| (1000..3000).contains(&reference_bucket("", id)))
        .count() as u64;
    let preview = poll_until(DEADLINE, "every user in the sample", || async {
        let p = admin.get_json("/preview?canary=30").await;
        (p["users"]["sample"] == 600).then_some(p)
    })
    .await;
    assert_eq!(preview["users"]["moving"], moving, "{preview}");
    let direction = &preview["users"]["by_direction"];
    assert_eq!(direction.as_array().map(Vec::len), Some(1), "{direction}");
    assert_eq!(direction[0]["from"], "stable");
    assert_eq!(direction[0]["to"], "canary");
    assert_eq!(direction[0]["users"], moving);
    let share = direction[0]["share"].as_f64().unwrap();
    assert!((share - moving as f64 / 600.0).abs() < 1e-12, "{share}");
    assert_eq!(preview["current"], json!({"stable": 90, "canary": 10}));
    assert_eq!(preview["proposed"], json!({"stable": 70, "canary": 30}));
    assert_eq!(
        preview["buckets"]["ranges"],
        json!([{"from": "stable", "to": "canary", "buckets": [1000, 3000], "share": 0.2}])
    );
    // The same table as a JSON body, and a table that moves users out of the canary.
    let body = admin
        .call("POST", "/preview", Some(r#"{"canary": 30}"#))
        .await;
    assert_eq!(body.status, StatusCode::OK);
    assert_eq!(body.json()["users"]["moving"], moving);
    let down = admin.get_json("/preview?canary=5").await;
    let out = ids
        .iter()
        .filter(|id| (500..1000).contains(&reference_bucket("", id)))
        .count() as u64;
    assert_eq!(down["users"]["moving"], out, "{down}");
    assert!(out > 0, "the sample has users in buckets [500, 1000)");
    assert_eq!(down["users"]["by_direction"][0]["from"], "canary");
    assert_eq!(down["users"]["by_direction"][0]["to"], "stable");
    // Nothing changed.
    assert_eq!(admin.weights().await["effective"]["canary"], 10);

    // Refusals are specific and change nothing.
    for (path, body, needle) in [
        ("/preview?canery=30", None, "unknown upstream"),
        ("/preview?canary=130", None, "from 0 to 100"),
        ("/preview?canary=ten", None, "must be a number"),
        ("/preview", None, "missing table"),
        ("/preview?canary=30", Some(r#"{"canary": 20}"#), "not both"),
    ] {
        let r = admin.call("GET", path, body).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{path}: {}", r.body);
        assert!(r.body.contains(needle), "{path}: {}", r.body);
    }
    assert_eq!(admin.weights().await["generation"], 1);

    // The command line answers the same question for one user, offline.
    let config = proxy.config_path().to_str().unwrap().to_owned();
    let mover = ids
        .iter()
        .find(|id| (1000..3000).contains(&reference_bucket("", id)))
        .expect("a user that moves");
    let out = run_cli(&[
        "route",
        "--config",
        &config,
        "--key",
        mover,
        "--weights",
        "canary=30",
    ]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(
        out.stdout.contains("moves:  yes, stable -> canary"),
        "{}",
        out.stdout
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_build_gets_its_warmup_requests_first_then_a_ramp_up_to_its_weight() {
    let stable = FakeUpstream::start("stable").await;
    let old = FakeUpstream::start("canary-v1").await;
    // Its warmup requests take a while, so the phase can be watched.
    let new = FakeUpstream::builder("canary-v2")
        .on_path("/warm", 200, Duration::from_millis(300))
        .start()
        .await;
    let with = |url: &str| {
        ConfigBuilder::new()
            .upstream("stable", &stable.url(), "50")
            .upstream("canary", url, "50")
            .upstream_set("warmup", &q("4s"))
            .upstream_set("warmup_path", &q("/warm"))
            .upstream_set("warmup_requests", "5")
            .build()
    };
    let mut proxy = Proxy::start(&with(&old.url())).await;
    let admin = proxy.admin_client();
    // The first build is the one canaryd started with: no warmup.
    assert_eq!(admin.weights().await["effective"]["canary"], 50);
    assert_eq!(admin.weights().await["warmup"], json!({}));

    // Traffic all along, so users are there to move into the new build.
    let traffic = {
        let addr = proxy.addr();
        tokio::spawn(async move {
            let client = HttpClient::http1();
            let ids = user_ids(400);
            loop {
                for id in &ids {
                    let _ = client
                        .try_send(request(
                            "GET",
                            addr,
                            "/predict",
                            &[("x-user-id", id)],
                            empty(),
                        ))
                        .await;
                }
            }
        })
    };

    proxy.rewrite_config(&with(&new.url()), Rewrite::Rename);
    poll_until(DEADLINE, "the new build to start warming", || async {
        let w = admin.weights().await;
        (w["warmup"]["canary"]["url"] == new.url().trim_end_matches('/')
            || w["warmup"]["canary"]["url"] == new.url())
        .then_some(())
    })
    .await;
    // Poll the ramp: it only goes up, and it reaches the configured weight.
    let mut seen: Vec<f64> = Vec::new();
    let mut phases: Vec<String> = Vec::new();
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        let w = admin.weights().await;
        let eff = w["effective"]["canary"].as_f64().unwrap();
        if let Some(p) = w["warmup"]["canary"]["phase"].as_str() {
            if p == "requests" {
                assert_eq!(eff, 0.0, "no users while the warmup requests go: {w}");
            }
            if phases.last().map(String::as_str) != Some(p) {
                phases.push(p.to_owned());
            }
        }
        if seen.last() != Some(&eff) {
            seen.push(eff);
        }
        if eff == 50.0 && w["warmup"] == json!({}) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the ramp did not reach 50% within {DEADLINE:?}: {seen:?} {w}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    traffic.abort();
    assert!(
        seen.windows(2).all(|p| p[0] <= p[1]),
        "not monotone: {seen:?}"
    );
    assert!(seen.len() >= 4, "the ramp went in too few steps: {seen:?}");
    // It started from nothing (the warmup requests) and then a tenth of the weight.
    assert_eq!(seen[0], 0.0, "{seen:?}");
    assert!(seen.iter().any(|&w| w > 0.0 && w <= 10.0), "{seen:?}");
    assert_eq!(phases, ["requests", "ramp"]);

    // The new build's first five requests were the warmup, before any user's.
    let paths = new.paths();
    assert_eq!(paths[..5], ["/warm"; 5], "{paths:?}");
    assert!(paths[5..].iter().all(|p| p == "/predict"), "{paths:?}");
    assert!(paths.len() > 50, "users moved in: {}", paths.len());
    // They are not part of the analysis.
    let status = admin.status().await;
    let warm = status["arms"][1]["warmup"].clone();
    assert!(warm.is_null(), "{warm}");
    stable.assert_healthy();
    new.assert_healthy();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slower_arm_is_not_a_sample_ratio_mismatch_once_its_requests_finish() {
    let stable = FakeUpstream::start("stable").await;
    // The canary answers after 700 ms: while its requests are in flight, it has finished
    // fewer than its share. The guard counts a second of routing only once every request of
    // it has finished or timed out (the request timeout, 2 s here, and a second).
    let canary = FakeUpstream::builder("canary")
        .delay(Duration::from_millis(700))
        .start()
        .await;
    let config = two_arms(&stable.url(), &canary.url(), 20)
        .set("listen", "request_timeout", &q("2s"))
        .build();
    let proxy = Proxy::start(&config).await;
    let admin = proxy.admin_client();
    let status = admin.status().await;
    assert_eq!(
        status["srm"],
        json!({"alpha": 0.001, "mismatch": [], "lag_seconds": 3.0}),
        "{status}"
    );

    let client = HttpClient::http1();
    let requests: Vec<_> = (0..400)
        .map(|_| request("GET", proxy.addr(), "/", &[], empty()))
        .collect();
    for r in fetch_all(&client, requests, 32).await {
        assert_eq!(r.status, StatusCode::OK);
    }
    let status = poll_until(DEADLINE, "every request counted", || async {
        let s = admin.status().await;
        (s["arms"][1]["srm"]["requests"]["draws"] == 400).then_some(s)
    })
    .await;
    assert_eq!(status["srm"]["mismatch"], json!([]), "{status}");
    let by_requests = &status["arms"][1]["srm"]["requests"];
    let observed = by_requests["observed"].as_u64().unwrap();
    assert_eq!(observed as usize, canary.requests(), "{by_requests}");
    assert!((by_requests["expected"].as_f64().unwrap() - 80.0).abs() < 1e-9);
    assert!(
        by_requests["p_value"].as_f64().unwrap() >= 0.001,
        "{by_requests}"
    );
    let metrics = poll_until(DEADLINE, "the p-value metrics", || async {
        let m = admin.metrics().await;
        m.value(
            "canaryd_srm_p_value",
            &[("upstream", "canary"), ("by", "requests")],
        )
        .map(|_| m)
    })
    .await;
    assert_eq!(
        metrics.value(
            "canaryd_srm_p_value",
            &[("upstream", "canary"), ("by", "users")]
        ),
        Some(1.0),
        "no sticky users: nothing against the split"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_correct_split_with_a_weight_change_shows_no_mismatch() {
    let stable = FakeUpstream::start("stable").await;
    let canary = FakeUpstream::start("canary").await;
    let config = two_arms(&stable.url(), &canary.url(), 10)
        .set("listen", "request_timeout", &q("1s"))
        .build();
    let proxy = Proxy::start(&config).await;
    let admin = proxy.admin_client();
    let client = HttpClient::http1();
    let ids = user_ids(1500);
    let send = |ids: Vec<String>, sticky: bool| {
        let requests = ids
            .iter()
            .map(|id| {
                let headers: Vec<(&str, &str)> = if sticky {
                    vec![("x-user-id", id.as_str())]
                } else {
                    vec![]
                };
                request("GET", proxy.addr(), "/", &headers, empty())
            })
            .collect();
        fetch_all(&client, requests, 8)
    };
    send(ids[..750].to_vec(), true).await;
    send(ids[..500].to_vec(), false).await;
    admin.set_weights(json!({"canary": 40})).await;
    send(ids.clone(), true).await;
    send(ids[..500].to_vec(), false).await;
    let status = poll_until(DEADLINE, "every request counted", || async {
        let s = admin.status().await;
        let canary = s["arms"][1]["srm"].clone();
        let stable = s["arms"][0]["srm"].clone();
        let draws = canary["requests"]["draws"].as_u64().unwrap_or(0);
        let users = stable["users"]["draws"].as_u64().unwrap_or(0);
        (draws == 1000 && users == 1500).then_some(s)
    })
    .await;
    assert_eq!(status["srm"]["mismatch"], json!([]), "{status}");
    let mut shares = BTreeMap::new();
    for arm in status["arms"].as_array().unwrap() {
        let users = &arm["srm"]["users"];
        shares.insert(arm["name"].as_str().unwrap().to_owned(), users.clone());
        assert!(users["p_value"].as_f64().unwrap() >= 0.001, "{arm}");
    }
    // The expected count accounts for both tables: 750 users at 10%, 750 new ones at 40%.
    let expected = shares["canary"]["expected"].as_f64().unwrap();
    assert!((expected - 375.0).abs() < 1e-6, "{expected}");
    assert_eq!(
        shares["stable"]["draws"].as_u64(),
        Some(1500),
        "each user once: {}",
        shares["stable"]
    );
}
