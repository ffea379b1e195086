//! The dashboard (`GET /` on the admin address) in a real browser: Debian's Chromium, headless,
//! driven through chromedriver with the W3C WebDriver protocol (JSON over HTTP, sent with the
//! hyper client of `common`). canaryd runs in-process in front of two fake upstreams with an
//! admin token; the test reads what the page shows, compares it with `GET /status`, rolls the
//! canary back through the page's buttons and token prompt, takes a screenshot and checks that
//! the page asked nothing of any other origin.
//!
//! Needs `chromium` and `chromedriver` on PATH (`.ci/install-test-tools.sh` installs them); the
//! test fails, rather than skips, without them.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;
use serde_json::{json, Value};

const TOKEN: &str = "dashboard-test-token-7c41";
/// Requests sent through the proxy before the page is read.
const REQUESTS: usize = 400;
/// How long the page may take to show a state the API already has (it polls every 2 s).
const PAGE_DEADLINE: Duration = Duration::from_secs(20);
/// How long the asynchronous window task may take to see finished requests.
const WINDOW_DEADLINE: Duration = Duration::from_secs(5);
/// WebDriver's key for an element reference.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// The path of `name` on PATH, if it is there.
fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

fn require_tool(name: &str) -> PathBuf {
    on_path(name).unwrap_or_else(|| {
        panic!(
            "`{name}` is not on PATH: the dashboard test drives Chromium through chromedriver; \
             install them (Debian packages chromium and chromium-driver) with \
             `.ci/install-test-tools.sh` as root"
        )
    })
}

/// chromedriver on a free port with at most one session; on drop the session is deleted
/// (chromedriver makes Chromium quit) and chromedriver, by its pid, is killed.
struct WebDriver {
    child: Child,
    addr: SocketAddr,
    http: HttpClient,
    session: Option<String>,
    log: PathBuf,
}

impl WebDriver {
    async fn start(dir: &Path) -> WebDriver {
        let chromedriver = require_tool("chromedriver");
        require_tool("chromium");
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
            l.local_addr().expect("addr").port()
        };
        let log = dir.join("chromedriver.log");
        let child = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn chromedriver");
        let mut driver = WebDriver {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            http: HttpClient::http1().with_timeout(Duration::from_secs(60)),
            session: None,
            log,
        };
        let (http, addr) = (driver.http.clone(), driver.addr);
        let child = &mut driver.child;
        poll_until(
            Duration::from_secs(30),
            "chromedriver /status ready",
            || {
                let exited = matches!(child.try_wait(), Ok(Some(_)));
                let http = http.clone();
                async move {
                    assert!(!exited, "chromedriver exited at start");
                    let req = request("GET", addr, "/status", &[], empty());
                    let reply = http.try_send(req).await.ok()?;
                    let reply = collect(reply, Duration::from_secs(10)).await;
                    let v: Value = serde_json::from_str(&reply.body).ok()?;
                    v["value"]["ready"].as_bool().filter(|r| *r)
                }
            },
        )
        .await;
        driver
    }

    /// One WebDriver command; panics with the driver's error on a non-2xx answer.
    async fn command(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let body = body.map(|b| b.to_string());
        let req = match &body {
            Some(b) => request(
                method,
                self.addr,
                path,
                &[("content-type", "application/json")],
                full(b.clone()),
            ),
            None => request(method, self.addr, path, &[], empty()),
        };
        let reply = self.http.fetch(req).await;
        let v: Value = serde_json::from_str(&reply.body)
            .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {:?}", reply.body));
        assert!(
            reply.status.is_success(),
            "WebDriver {method} {path} {}: {} {}",
            body.unwrap_or_default(),
            reply.status,
            v["value"]
        );
        v["value"].clone()
    }

    fn session(&self) -> &str {
        self.session.as_deref().expect("a session")
    }

    async fn new_session(&mut self, profile: &Path) {
        let chromium = require_tool("chromium");
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--window-size=1280,900", "--hide-scrollbars", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update",
                    format!("--user-data-dir={}", profile.display()),
                ],
            },
        }}});
        let v = self.command("POST", "/session", Some(caps)).await;
        let id = v["sessionId"].as_str().expect("sessionId").to_string();
        self.session = Some(id);
    }

    async fn go(&self, url: &str) {
        let path = format!("/session/{}/url", self.session());
        self.command("POST", &path, Some(json!({ "url": url })))
            .await;
    }

    /// Runs `script` (a function body; `arguments` are `args`) and returns its value.
    async fn script(&self, script: &str, args: Value) -> Value {
        let path = format!("/session/{}/execute/sync", self.session());
        self.command(
            "POST",
            &path,
            Some(json!({ "script": script, "args": args })),
        )
        .await
    }

    /// Polls `script` until it returns something other than null/false.
    async fn wait_for(&self, what: &str, script: &str) -> Value {
        let deadline = Instant::now() + PAGE_DEADLINE;
        loop {
            let v = self.script(script, json!([])).await;
            if !v.is_null() && v != Value::Bool(false) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {PAGE_DEADLINE:?} waiting for the page: {what}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn find(&self, css: &str) -> String {
        let path = format!("/session/{}/element", self.session());
        let v = self
            .command(
                "POST",
                &path,
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        v[ELEMENT_KEY]
            .as_str()
            .expect("element reference")
            .to_string()
    }

    async fn click(&self, css: &str) {
        let e = self.find(css).await;
        let path = format!("/session/{}/element/{e}/click", self.session());
        self.command("POST", &path, Some(json!({}))).await;
    }

    async fn type_into(&self, css: &str, text: &str) {
        let e = self.find(css).await;
        let path = format!("/session/{}/element/{e}/value", self.session());
        self.command("POST", &path, Some(json!({ "text": text })))
            .await;
    }

    async fn screenshot(&self) -> Vec<u8> {
        let path = format!("/session/{}/screenshot", self.session());
        let v = self.command("GET", &path, None).await;
        base64_decode(v.as_str().expect("base64 screenshot"))
    }
}

impl Drop for WebDriver {
    fn drop(&mut self) {
        if let Some(id) = self.session.take() {
            blocking_delete(self.addr, &format!("/session/{id}"));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("--- chromedriver log (last lines, newest first) ---");
            for l in tail {
                eprintln!("{l}");
            }
        }
    }
}

/// `DELETE path` with plain blocking I/O (usable from `Drop`).
fn blocking_delete(addr: SocketAddr, path: &str) {
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(15)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
    let head = format!(
        "DELETE {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    if s.write_all(head.as_bytes()).is_ok() {
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    }
}

fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c:?}"),
        }
    };
    let clean: Vec<u8> = text
        .bytes()
        .filter(|b| !b.is_ascii_whitespace() && *b != b'=')
        .collect();
    let mut out = Vec::with_capacity(clean.len() * 3 / 4);
    for chunk in clean.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= value(c) << (18 - 6 * i);
        }
        out.extend_from_slice(&n.to_be_bytes()[1..chunk.len()]);
    }
    out
}

/// JavaScript's `x.toFixed(digits)` for `0 <= x < 1e15`: the exact decimal value of `x`
/// rounded to `digits` decimals, a tie going up.
fn to_fixed(x: f64, digits: usize) -> String {
    assert!((0.0..1e15).contains(&x), "to_fixed({x})");
    // Exact: a double in this range has at most 52 + 17 fractional binary (so decimal) digits
    // for the magnitudes here; the assertion below checks it.
    let text = format!("{x:.100}");
    let (int, frac) = text.split_once('.').expect("a point");
    assert!(
        frac[80..].bytes().all(|b| b == b'0'),
        "{x} needs more digits"
    );
    let mut d: Vec<u8> = int
        .bytes()
        .chain(frac[..digits].bytes())
        .map(|b| b - b'0')
        .collect();
    if frac.as_bytes()[digits] >= b'5' {
        let mut i = d.len();
        loop {
            if i == 0 {
                d.insert(0, 1);
                break;
            }
            i -= 1;
            if d[i] == 9 {
                d[i] = 0;
            } else {
                d[i] += 1;
                break;
            }
        }
    }
    let s: String = d.iter().map(|b| char::from(b + b'0')).collect();
    let (i, f) = s.split_at(s.len() - digits);
    if digits == 0 {
        i.to_string()
    } else {
        format!("{i}.{f}")
    }
}

/// A JSON number as JavaScript's `String()` prints it (for the values canaryd sends:
/// integers and short decimals).
fn js_number(v: &Value) -> String {
    if let Some(i) = v.as_i64() {
        return i.to_string();
    }
    let x = v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"));
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        format!("{x}")
    }
}

/// What the page must show for one arm of `GET /status`, in the page's documented formats.
fn expected_fields(arm: &Value) -> Vec<(&'static str, String)> {
    let w = &arm["window"];
    let ms = |v: &Value| match v.as_f64() {
        Some(x) => format!("{} ms", to_fixed(x, 3)),
        None => "\u{2013}".to_string(),
    };
    vec![
        (
            "effective_weight",
            format!("{}%", js_number(&arm["effective_weight"])),
        ),
        (
            "configured_weight",
            format!("{}%", js_number(&arm["configured_weight"])),
        ),
        ("requests", js_number(&w["requests"])),
        ("errors", js_number(&w["errors"])),
        (
            "error_rate",
            format!(
                "{}%",
                to_fixed(w["error_rate"].as_f64().expect("error_rate") * 100.0, 2)
            ),
        ),
        ("p50", ms(&w["p50_ms"])),
        ("p99", ms(&w["p99_ms"])),
    ]
}

/// Every arm card's `data-field` texts, and whether its trip box is shown.
const READ_ARMS: &str = r#"
const out = {};
for (const s of document.querySelectorAll('section.arm[data-arm]')) {
  const f = {};
  for (const e of s.querySelectorAll('[data-field]')) f[e.dataset.field] = e.textContent;
  f.trip_shown = !s.querySelector('[data-field=trip]').hidden;
  out[s.dataset.arm] = f;
}
return out;
"#;

/// Waits until every arm's numbers on the page equal those of `GET /status` read right after
/// the page (the page polls every 2 s); returns the matching status.
async fn page_matches_status(driver: &WebDriver, admin: &AdminClient) -> Value {
    let deadline = Instant::now() + PAGE_DEADLINE;
    loop {
        let page = driver.script(READ_ARMS, json!([])).await;
        let status = admin.status().await;
        let mut diffs = Vec::new();
        for arm in status["arms"].as_array().expect("arms") {
            let name = arm["name"].as_str().expect("name");
            for (field, want) in expected_fields(arm) {
                let shown = page[name][field].as_str().unwrap_or("<missing>");
                if shown != want {
                    diffs.push(format!("{name}.{field}: page {shown:?}, /status {want:?}"));
                }
            }
        }
        if diffs.is_empty() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "the page did not show /status within {PAGE_DEADLINE:?}: {}",
            diffs.join("; ")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_status_and_rolls_back_with_the_token() {
    let started = Instant::now();
    let dir = tempfile::Builder::new()
        .prefix("canaryd-dashboard-")
        .tempdir()
        .expect("tempdir");
    // Fail at once, before anything else starts, when the browser tools are missing.
    require_tool("chromedriver");
    require_tool("chromium");

    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).expect("write token");
    let stable = FakeUpstream::builder("stable")
        .delay(Duration::from_millis(1))
        .start()
        .await;
    // Every 8th canary request fails: some errors on the page, the circuit is off.
    let canary = FakeUpstream::builder("canary")
        .fail_every(8, 7, 500)
        .start()
        .await;
    let config = ConfigBuilder::new()
        .set("routing", "sticky_header", &q("x-user-id"))
        .set("admin", "token_file", &q(token_file.to_str().unwrap()))
        .upstream("stable", &stable.url(), "90")
        .upstream("canary", &canary.url(), "10")
        .build();
    let proxy = Proxy::start(&config).await;
    let admin = proxy.admin_client();
    let origin = format!("http://{}", proxy.admin());

    // 1. Traffic with varied users, then nothing more: the window numbers stay put.
    let client = HttpClient::http1();
    let replies = route_all(&client, proxy.addr(), &user_ids(REQUESTS), 8).await;
    let served = |arm: &str| replies.iter().filter(|r| r.arm() == Some(arm)).count();
    assert_eq!(served("stable") + served("canary"), REQUESTS);
    assert!(served("canary") >= 8, "canary served {}", served("canary"));
    poll_until(WINDOW_DEADLINE, "the windows to hold every request", || {
        let admin = admin.clone();
        async move {
            let s = admin.status().await;
            let total: u64 = s["arms"]
                .as_array()?
                .iter()
                .map(|a| a["window"]["requests"].as_u64().unwrap_or(0))
                .sum();
            (total == REQUESTS as u64).then_some(())
        }
    })
    .await;

    // The page's own headers.
    let reply = admin.get("/").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    assert_eq!(reply.header("cache-control"), Some("no-store"));
    assert_eq!(reply.header("x-content-type-options"), Some("nosniff"));
    let csp = reply
        .header("content-security-policy")
        .expect("CSP")
        .to_string();
    for directive in [
        "default-src 'none'",
        "connect-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(directive), "{directive} in {csp}");
    }
    assert!(reply.header("access-control-allow-origin").is_none());

    // 2. The page shows what /status says.
    let mut driver = WebDriver::start(dir.path()).await;
    driver.new_session(&dir.path().join("profile")).await;
    driver.go(&format!("{origin}/")).await;
    driver
        .wait_for(
            "two polls",
            "return Number(document.body.dataset.polls || 0) >= 2",
        )
        .await;
    let status = page_matches_status(&driver, &admin).await;
    let canary_window = &status["arms"][1]["window"];
    assert_eq!(status["arms"][1]["name"], "canary");
    assert!(
        canary_window["errors"].as_u64().unwrap() > 0,
        "{canary_window}"
    );
    let page = driver.script(READ_ARMS, json!([])).await;
    assert_eq!(page["canary"]["effective_weight"], "10%");
    assert_eq!(page["stable"]["effective_weight"], "90%");
    assert_eq!(page["canary"]["trip_shown"], false);
    // The style applied (its CSP hash matched) and the weights bar is drawn.
    let bar = driver
        .script(
            "const b = document.getElementById('weights-bar');\
             const s = b.querySelector('[data-segment=canary]');\
             return {display: getComputedStyle(b).display, canary: s.getBoundingClientRect().width,\
                     bar: b.getBoundingClientRect().width};",
            json!([]),
        )
        .await;
    assert_eq!(bar["display"], "flex", "{bar}");
    let share = bar["canary"].as_f64().unwrap() / bar["bar"].as_f64().unwrap();
    assert!((share - 0.10).abs() < 0.01, "canary segment share {share}");

    // 3. Roll back through the page: confirm, then the 401 asks for the token; a wrong one
    // is refused, the right one goes through.
    driver.click("#action-rollback").await;
    driver
        .wait_for(
            "the confirmation dialog",
            "return document.getElementById('dialog').open",
        )
        .await;
    driver.click("#dialog-confirm").await;
    let asked = driver
        .wait_for(
            "the token prompt",
            "const r = document.getElementById('dialog-token-row');\
             const e = document.getElementById('dialog-error');\
             return !r.hidden && !e.hidden ? e.textContent : null;",
        )
        .await;
    assert!(
        asked.as_str().unwrap().contains("Authorization: Bearer"),
        "the server's 401 message is shown: {asked}"
    );
    assert_eq!(
        admin.trip_reason("canary").await,
        None,
        "a refused call changes nothing"
    );
    driver.type_into("#dialog-token", "not-the-token").await;
    driver.click("#dialog-confirm").await;
    let refused = driver
        .wait_for(
            "the wrong token refused",
            "const e = document.getElementById('dialog-error').textContent;\
             return e.includes('invalid bearer token') ? e : null;",
        )
        .await;
    assert!(refused.as_str().unwrap().contains("refused"), "{refused}");
    driver.type_into("#dialog-token", TOKEN).await;
    driver.click("#dialog-confirm").await;
    driver
        .wait_for(
            "the dialog to close",
            "return !document.getElementById('dialog').open",
        )
        .await;
    let weights = admin.weights().await;
    assert_eq!(
        weights["tripped"]["canary"]["reason"], "manual",
        "{weights}"
    );
    assert_eq!(weights["effective"]["canary"], 0, "{weights}");
    driver
        .wait_for(
            "the trip on the page",
            "const c = document.querySelector('section.arm[data-arm=canary]');\
             return !c.querySelector('[data-field=trip]').hidden\
               && c.querySelector('[data-field=trip-reason]').textContent === 'manual'\
               && c.querySelector('[data-field=effective_weight]').textContent === '0%'\
               && document.querySelector('[data-banner=trip][data-arm-trip=canary]') !== null;",
        )
        .await;
    page_matches_status(&driver, &admin).await;
    // The token lives in a JS variable only: no storage, no cookie, the field emptied.
    let kept = driver
        .script(
            "return {local: localStorage.length, session: sessionStorage.length,\
                     cookie: document.cookie, field: document.getElementById('dialog-token').value};",
            json!([]),
        )
        .await;
    assert_eq!(
        kept,
        json!({"local": 0, "session": 0, "cookie": "", "field": ""})
    );

    // 4. A screenshot of the page as it stands.
    let png = driver.screenshot().await;
    let shot = dir.path().join("dashboard.png");
    std::fs::write(&shot, &png).expect("write screenshot");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
    assert_eq!(&png[12..16], b"IHDR");
    let width = u32::from_be_bytes(png[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(png[20..24].try_into().unwrap());
    assert!(width >= 800 && height >= 500, "screenshot {width}x{height}");
    assert!(
        png.len() > 20_000,
        "screenshot of {} bytes looks empty",
        png.len()
    );

    // 5. Nothing but the admin origin was asked for.
    let urls = driver
        .script(
            "return [location.href].concat(\
               performance.getEntriesByType('navigation').map(e => e.name),\
               performance.getEntriesByType('resource').map(e => e.name));",
            json!([]),
        )
        .await;
    let urls: Vec<&str> = urls
        .as_array()
        .expect("urls")
        .iter()
        .map(|u| u.as_str().expect("url"))
        .collect();
    let prefix = format!("{origin}/");
    for u in &urls {
        assert!(u.starts_with(&prefix), "request outside {origin}: {u}");
    }
    for path in ["/status", "/weights", "/metrics", "/rollback"] {
        assert!(
            urls.iter().any(|u| u.ends_with(path)),
            "the page fetched {path}: {urls:?}"
        );
    }

    drop(driver);
    stable.assert_healthy();
    canary.assert_healthy();
    eprintln!(
        "dashboard test: {} requests, screenshot {} ({} bytes), {:.1} s",
        REQUESTS,
        shot.display(),
        png.len(),
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn to_fixed_rounds_like_javascript() {
    assert_eq!(to_fixed(0.0, 2), "0.00");
    assert_eq!(to_fixed(12.5, 2), "12.50");
    assert_eq!(to_fixed(0.125, 2), "0.13"); // a tie goes up
    assert_eq!(to_fixed(1.005, 2), "1.00"); // 1.00499999999999989... below the tie
    assert_eq!(to_fixed(99.995, 2), "100.00"); // 99.99500000000000454..., as in JS
    assert_eq!(to_fixed(9.9999, 2), "10.00");
    assert_eq!(to_fixed(1.056, 3), "1.056");
    assert_eq!(to_fixed(0.5, 0), "1");
    assert_eq!(js_number(&json!(90)), "90");
    assert_eq!(js_number(&json!(12.5)), "12.5");
    assert_eq!(js_number(&json!(5.0)), "5");
    assert_eq!(base64_decode("Zm9vYmFy"), b"foobar");
    assert_eq!(base64_decode("Zm9vYg=="), b"foob");
}
