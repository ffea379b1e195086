//! Tests against the real `canaryd` binary: CLI (`check`, `route`), signals, bounded memory.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn path_arg(file: &ConfigFile) -> String {
    file.path().to_str().expect("utf-8 temp path").to_string()
}

/// A config pointing at two (not running) upstreams.
fn static_config(canary_weight: &str) -> String {
    let stable_weight = format!("{}", 100.0 - canary_weight.parse::<f64>().unwrap());
    ConfigBuilder::new()
        .upstream("stable", "http://127.0.0.1:9000", &stable_weight)
        .upstream("canary", "http://127.0.0.1:9001", canary_weight)
        .build()
}

async fn arm_of(client: &HttpClient, addr: SocketAddr, user: &str) -> String {
    let reply = client.get(addr, "/", &[("x-user-id", user)]).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    reply.arm().expect("arm header").to_string()
}

#[test]
fn check_accepts_a_valid_config_and_prints_the_weight_table() {
    let file = ConfigFile::create(&static_config("12.5"), ConfigLayout::Plain);
    let out = run_cli(&["check", "--config", &path_arg(&file)]);
    assert_eq!(out.code, Some(0), "{out:#?}");
    for (arm, weight) in [("stable", "87.5"), ("canary", "12.5")] {
        let line = out
            .stdout
            .lines()
            .find(|l| {
                l.split(|c: char| c.is_whitespace() || c == '|' || c == ':')
                    .any(|w| w == arm)
            })
            .unwrap_or_else(|| panic!("no weight table line for {arm}: {out:#?}"));
        assert!(line.contains(weight), "{arm} line lacks {weight}: {line:?}");
    }
}

#[test]
fn check_rejects_an_invalid_config_naming_every_problem() {
    let text = r#"
[listen]
addr = "127.0.0.1:0"
request_timeout = "soon"

[routing]
stiky_header = "x-user-id"

[[upstream]]
name = "stable"
url = "http://127.0.0.1:9000"
weight = 60

[[upstream]]
name = "canary"
url = "http://127.0.0.1:9001"
weight = 30

[[upstream]]
name = "stable"
url = "http://127.0.0.1:9002"
weight = 5
"#;
    let file = ConfigFile::create(text, ConfigLayout::Plain);
    let out = run_cli(&["check", "--config", &path_arg(&file)]);
    assert_eq!(out.code, Some(2), "{out:#?}");
    let stderr = strip_ansi(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    // Each problem: all needles on one line.
    let problems: [(&str, &[&str]); 4] = [
        ("unknown key", &["routing.stiky_header"]),
        ("bad duration", &["listen.request_timeout"]),
        ("duplicate name", &["upstream[2].name"]),
        ("weights sum to 95", &["upstream", "weight", "100"]),
    ];
    let missing: Vec<&str> = problems
        .iter()
        .filter(|(_, needles)| !lines.iter().any(|l| needles.iter().all(|n| l.contains(n))))
        .map(|(what, _)| *what)
        .collect();
    assert!(
        missing.is_empty(),
        "stderr does not report {missing:?}:\n{stderr}"
    );
}

#[test]
fn route_prints_bucket_and_arm() {
    let file = ConfigFile::create(&static_config("10"), ConfigLayout::Plain);
    for (key, bucket, arm) in [
        ("user_123", 8884, "stable"),
        ("alice", 83, "canary"),
        ("42", 7451, "stable"),
    ] {
        let out = run_cli(&["route", "--config", &path_arg(&file), "--key", key]);
        assert_eq!(out.code, Some(0), "{out:#?}");
        // `name: value` lines; padding after the colon is allowed (`arm:    stable`).
        let field = |name: &str| -> Option<String> {
            out.stdout.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == name).then(|| v.trim().to_string())
            })
        };
        assert_eq!(field("bucket"), Some(bucket.to_string()), "{key}: {out:#?}");
        assert_eq!(field("arm"), Some(arm.to_string()), "{key}: {out:#?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_config() {
    let stable = FakeUpstream::start("stable").await;
    let canary = FakeUpstream::start("canary").await;
    let config = |w: u32| {
        ConfigBuilder::new()
            .upstream("stable", &stable.url(), &(100 - w).to_string())
            .upstream("canary", &canary.url(), &w.to_string())
            .build()
    };
    // The config path is a symlink into another directory: changing the target there is
    // invisible to a watch on the config's directory, so only SIGHUP can pick it up.
    let file = ConfigFile::create(&config(10), ConfigLayout::Symlinked);
    let mut proc = CanarydProcess::spawn_with(file).await;
    let client = HttpClient::http1();
    let mover = user_in_bucket_range(1000..5000);
    assert_eq!(arm_of(&client, proc.addr(), &mover).await, "stable");

    proc.config().rewrite(&config(50), Rewrite::SymlinkTarget);
    proc.signal("HUP");
    let addr = proc.addr();
    poll_until(
        Duration::from_secs(10),
        "SIGHUP reload to move the user",
        || {
            let client = client.clone();
            let mover = mover.clone();
            async move { (arm_of(&client, addr, &mover).await == "canary").then_some(()) }
        },
    )
    .await;
    // Still running and serving after the reload.
    assert_eq!(
        arm_of(&client, addr, &user_in_bucket_range(5000..10000)).await,
        "stable"
    );
    assert!(
        proc.try_exit_status().is_none(),
        "SIGHUP must not stop canaryd"
    );
}

/// Whether a new connection to `addr` gets an HTTP answer within 500 ms.
async fn serves_new_connection(addr: SocketAddr, user: &str) -> bool {
    let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else {
        return false;
    };
    let req =
        format!("GET / HTTP/1.1\r\nHost: probe\r\nx-user-id: {user}\r\nConnection: close\r\n\r\n");
    if stream.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    match tokio::time::timeout(Duration::from_millis(500), stream.read(&mut buf)).await {
        Ok(Ok(n)) => buf[..n].starts_with(b"HTTP/"),
        _ => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_in_flight_request_and_exits_zero() {
    let slow = FakeUpstream::builder("stable")
        .delay(Duration::from_secs(2))
        .start()
        .await;
    let canary = FakeUpstream::start("canary").await;
    let cfg = ConfigBuilder::new()
        .set("listen", "drain_timeout", &q("20s"))
        .upstream("stable", &slow.url(), "90")
        .upstream("canary", &canary.url(), "10")
        .build();
    let mut proc = CanarydProcess::spawn(&cfg).await;
    let addr = proc.addr();
    let stable_user = user_in_bucket_range(1000..10000);
    let canary_user = user_in_bucket_range(0..1000);
    assert!(serves_new_connection(addr, &canary_user).await);

    let client = HttpClient::http1();
    let in_flight = {
        let client = client.clone();
        let user = stable_user.clone();
        tokio::spawn(async move { client.get(addr, "/slow", &[("x-user-id", &user)]).await })
    };
    poll_until(
        Duration::from_secs(5),
        "slow request at the upstream",
        || async { (slow.requests() == 1).then_some(()) },
    )
    .await;
    let term_at = Instant::now();
    proc.signal("TERM");

    // It stops taking new work while the slow request is still running...
    poll_until(
        Duration::from_millis(1500),
        "canaryd to stop serving new connections after SIGTERM",
        || {
            let user = canary_user.clone();
            async move { (!serves_new_connection(addr, &user).await).then_some(()) }
        },
    )
    .await;
    // ...and the in-flight request still completes.
    let reply = in_flight.await.expect("in-flight request task");
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.body, "stable");
    assert_eq!(reply.arm(), Some("stable"));

    let status = proc.wait_exit(Duration::from_secs(15)).await;
    let took = term_at.elapsed();
    assert_eq!(status.code(), Some(0), "exit status {status:?}");
    // Idle keep-alive connections (our client keeps one) must not hold up the exit until
    // drain_timeout (20s).
    assert!(
        took < Duration::from_secs(10),
        "exit took {took:?} after SIGTERM"
    );
    drop(client);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_upload_through_the_process_keeps_memory_bounded() {
    const SIZE: u64 = 256 << 20;
    const MAX_HWM_KIB: u64 = 64 * 1024;
    let counter = FakeUpstream::builder("stable").count_body().start().await;
    let canary = FakeUpstream::start("canary").await;
    let cfg = ConfigBuilder::new()
        .upstream("stable", &counter.url(), "90")
        .upstream("canary", &canary.url(), "10")
        .build();
    let proc = CanarydProcess::spawn(&cfg).await;
    let before = proc.vm_hwm_kib();
    let stable_user = user_in_bucket_range(1000..10000);
    let client = HttpClient::http1().with_timeout(Duration::from_secs(120));

    let started = Instant::now();
    let reply = client
        .fetch(request(
            "POST",
            proc.addr(),
            "/upload",
            &[("x-user-id", &stable_user)],
            PatternBody::new(SIZE, 256 << 10, true).boxed_body(),
        ))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(
        reply.body,
        SIZE.to_string(),
        "bytes counted by the upstream"
    );
    assert_eq!(counter.body_bytes(), SIZE);
    let hwm = proc.vm_hwm_kib();
    assert!(
        hwm < MAX_HWM_KIB,
        "canaryd peak RSS {hwm} KiB (before upload {before} KiB) for a {SIZE}-byte upload, \
         limit {MAX_HWM_KIB} KiB; upload took {:?}",
        started.elapsed()
    );
}

/// `THP_enabled` of a process's `/proc/PID/status`: whether transparent huge pages may back
/// its memory.
fn thp_enabled(pid: u32) -> Option<bool> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("THP_enabled:"))?;
    Some(line.split_whitespace().nth(1)? == "1")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transparent_huge_pages_are_off_unless_asked_for() {
    let config = static_config("10");
    let off = CanarydProcess::spawn(&config).await;
    let on = CanarydProcess::spawn_with_args(
        ConfigFile::create(&config, ConfigLayout::Plain),
        &["--huge-pages"],
    )
    .await;
    assert_eq!(thp_enabled(off.pid()), Some(false), "canaryd by default");
    assert_eq!(thp_enabled(on.pid()), Some(true), "canaryd --huge-pages");
}
