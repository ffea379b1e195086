//! The HTTP/2 server side, end to end with a raw `h2` client: what a client sees when it
//! resets a stream, closes its connection, sends a body its `content-length` contradicts,
//! leaves a connection idle, or gets an answer canaryd makes itself.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Method, Request, StatusCode};
use tokio::net::TcpStream;

/// An h2c connection to `addr` (prior knowledge), its connection driven on a task whose
/// handle says when the proxy closed it.
async fn h2c(
    addr: SocketAddr,
) -> (
    h2::client::SendRequest<Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (send, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    (send, tokio::spawn(conn))
}

fn get(path: &str) -> Request<()> {
    Request::builder()
        .uri(format!("http://a.test{path}"))
        .body(())
        .expect("request")
}

/// Sends `GET path` (no body) and waits for the response head, at most 10 s.
async fn fetch(
    send: &mut h2::client::SendRequest<Bytes>,
    path: &str,
) -> http::Response<h2::RecvStream> {
    let (resp, _) = send.send_request(get(path), true).expect("send");
    tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .expect("an answer in time")
        .expect("response")
}

/// A proxy with one arm, `stable` at `url`, and `[listen]` settings `listen`.
async fn proxy_to(url: &str, listen: &[(&str, &str)]) -> Proxy {
    let mut cfg = ConfigBuilder::new();
    for (key, value) in listen {
        cfg = cfg.set("listen", key, &q(value));
    }
    Proxy::start(&cfg.upstream("stable", url, "100").build()).await
}

/// Reads a response body whole.
async fn read_body(mut body: h2::RecvStream) -> Bytes {
    let mut out = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("body chunk");
        let _ = body.flow_control().release_capacity(chunk.len());
        out.extend_from_slice(&chunk);
    }
    Bytes::from(out)
}

async fn in_flight(proxy: &Proxy) -> f64 {
    proxy
        .admin_client()
        .metrics()
        .await
        .sum("canaryd_requests_in_flight", &[])
}

/// `stable`, answering `/slow` after 60 s and anything else at once.
async fn slow_upstream() -> FakeUpstream {
    FakeUpstream::builder("stable")
        .on_path("/slow", 200, Duration::from_secs(60))
        .start()
        .await
}

/// Waits (at most 10 s) until `n` requests are in flight and `stable` has received `received`.
async fn until_in_flight(proxy: &Proxy, stable: &FakeUpstream, n: usize, received: usize) {
    let what = format!("{n} requests in flight, {received} received upstream");
    poll_until(Duration::from_secs(10), &what, || async {
        (stable.requests() == received && in_flight(proxy).await == n as f64).then_some(())
    })
    .await;
}

/// `stable` was never counted as failing: what the client did is not the arm's failure.
async fn assert_no_failure_of_stable(proxy: &Proxy, why: &str) {
    let m = proxy.admin_client().metrics().await;
    assert_eq!(
        m.sum("canaryd_upstream_failures_total", &[("upstream", "stable")]),
        0.0,
        "{why}"
    );
}

#[tokio::test]
async fn a_stream_the_client_resets_ends_its_upstream_request_and_the_connection_goes_on() {
    let stable = slow_upstream().await;
    let proxy = proxy_to(&stable.url(), &[]).await;
    let (mut send, _conn) = h2c(proxy.addr()).await;
    let (slow, _) = send.send_request(get("/slow"), true).expect("send");
    until_in_flight(&proxy, &stable, 1, 1).await;

    // Dropping the response future resets the stream (RST_STREAM CANCEL): canaryd drops the
    // request and its upstream exchange long before the upstream's 60 s are up.
    drop(slow);
    until_in_flight(&proxy, &stable, 0, 1).await;

    // The connection serves on.
    let mut send = send.ready().await.expect("connection still open");
    let resp = fetch(&mut send, "/fast").await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(read_body(resp.into_body()).await, "stable");
    assert_no_failure_of_stable(&proxy, "a client's reset is not the arm's failure").await;
}

#[tokio::test]
async fn a_client_that_closes_its_connection_ends_the_requests_it_left_waiting() {
    let stable = slow_upstream().await;
    let proxy = proxy_to(&stable.url(), &[("request_timeout", "120s")]).await;
    let (mut send, conn) = h2c(proxy.addr()).await;
    let waiting: Vec<_> = (0..3)
        .map(|_| send.send_request(get("/slow"), true).expect("send").0)
        .collect();
    until_in_flight(&proxy, &stable, 3, 3).await;

    // The connection's task owns the socket: ending it closes the connection, with no
    // GOAWAY and no reset (the streams' handles live on, so none is reset). canaryd drops
    // every request that was waiting on it, long before the upstream's 60 s (or
    // request_timeout) are up.
    conn.abort();
    assert!(conn.await.is_err_and(|e| e.is_cancelled()));
    until_in_flight(&proxy, &stable, 0, 3).await;
    assert_no_failure_of_stable(&proxy, "a client that leaves is not the arm's failure").await;
    drop(waiting);
}

#[tokio::test]
async fn a_body_longer_than_its_content_length_is_the_clients_fault_not_the_arms() {
    let stable = FakeUpstream::builder("stable").count_body().start().await;
    let proxy = proxy_to(&stable.url(), &[]).await;
    let (mut send, _conn) = h2c(proxy.addr()).await;
    let req = Request::builder()
        .method(Method::POST)
        .uri("http://a.test/up")
        .header("content-length", "10")
        .body(())
        .expect("request");
    let (resp, mut body) = send.send_request(req, false).expect("send");
    body.send_data(Bytes::from_static(b"01234"), false)
        .expect("first bytes");
    // The request is on its way upstream before the body breaks its own length.
    poll_until(
        Duration::from_secs(10),
        "the upstream to get the request",
        || async { (stable.requests() == 1).then_some(()) },
    )
    .await;
    // 15 bytes where 10 were promised.
    body.send_data(Bytes::from_static(b"5678901234"), true)
        .expect("more bytes");
    // canaryd's HTTP/2 side resets the stream (PROTOCOL_ERROR), or answers 400: either way
    // no 2xx and no 5xx.
    if let Ok(Ok(resp)) = tokio::time::timeout(Duration::from_secs(10), resp).await {
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    }
    poll_until(
        Duration::from_secs(10),
        "the client error to count",
        || async {
            let m = proxy.admin_client().metrics().await;
            (m.sum("canaryd_client_errors_total", &[("kind", "body")]) == 1.0).then_some(())
        },
    )
    .await;
    assert_no_failure_of_stable(
        &proxy,
        "the client's malformed body is not the arm's failure",
    )
    .await;
    assert_eq!(in_flight(&proxy).await, 0.0);
}

#[tokio::test]
async fn an_idle_connection_gets_a_goaway_but_a_slow_request_finishes_first() {
    let stable = FakeUpstream::builder("stable")
        .on_path("/slow", 200, Duration::from_millis(1200))
        .start()
        .await;
    let proxy = proxy_to(&stable.url(), &[("idle_timeout", "300ms")]).await;
    let (mut send, conn) = h2c(proxy.addr()).await;
    // 1.2 s waiting on the upstream (no bytes moving) is not idleness.
    let started = Instant::now();
    let resp = fetch(&mut send, "/slow").await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(read_body(resp.into_body()).await, "stable");
    assert!(started.elapsed() >= Duration::from_millis(1150));

    // Then nothing moves: the proxy says GOAWAY and closes, cleanly.
    let closed = closed_after_idle(conn, Duration::from_millis(300))
        .await
        .expect("connection task");
    assert!(closed.is_ok(), "a graceful close, got {closed:?}");
    assert_eq!(stable.requests(), 1);
}

#[tokio::test]
async fn answers_canaryd_makes_itself_carry_date_and_length() {
    let dead = closed_port_url().await;
    let proxy = proxy_to(&dead, &[]).await;
    let (mut send, _conn) = h2c(proxy.addr()).await;
    let resp = fetch(&mut send, "/").await;
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    let date = resp.headers().get("date").expect("a date field").clone();
    assert!(
        httpdate::parse_http_date(date.to_str().expect("ascii")).is_ok(),
        "{date:?}"
    );
    let length: usize = resp.headers()["content-length"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("a number");
    let body = read_body(resp.into_body()).await;
    assert_eq!(body.len(), length);
    assert!(
        String::from_utf8_lossy(&body).contains("stable"),
        "the answer names the arm: {body:?}"
    );
}
