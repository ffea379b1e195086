//! End-to-end tests of canaryd's HTTP/2 upstream client (src/upstream/h2.rs): streams fill a
//! connection up to the upstream's `SETTINGS_MAX_CONCURRENT_STREAMS` before another opens,
//! `max_connections` bounds the connections (further streams wait), responses larger than
//! the flow-control windows stream through, clients that stop reading hold only their own
//! streams' windows, a request body and its response stream both ways
//! at once (bidirectional gRPC), and a connection the upstream closes (GOAWAY) after every
//! response costs no request.
//!
//! The upstream here is [`H2Upstream`], hyper's HTTP/2 server with a chosen stream limit: it
//! counts the connections it accepts and holds `/held` requests until the test
//! lets them go.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::AbortHandle;

/// How long a condition that needs no timer on canaryd's side may take.
const QUICK: Duration = Duration::from_secs(10);
/// `/big` answers this many bytes: many times canaryd's stream window (256 KiB).
const BIG: usize = 3 * 1024 * 1024;

type UpBody = BoxBody<Bytes, Infallible>;

/// An HTTP/2 (h2c) upstream. `/held` waits for a permit of `gate`; `/big` streams [`BIG`]
/// bytes; `/stall` streams 16 KiB pieces without end, counting what hyper takes to send;
/// `/echo` answers at once and sends back each piece of the request body as it comes, then a
/// trailer `x-echoed` with the byte count; anything else answers `ok`.
struct H2Upstream {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    shared: Arc<Shared>,
    task: AbortHandle,
}

/// What the upstream's requests share with the test.
struct Shared {
    /// `/held` requests that arrived.
    held: AtomicUsize,
    /// Lets `/held` requests answer.
    gate: Semaphore,
    /// Bytes of `/stall` responses hyper's server has taken to send, all streams together.
    stalled: Arc<AtomicUsize>,
}

impl Drop for H2Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl H2Upstream {
    async fn start(max_streams: u32) -> H2Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let shared = Arc::new(Shared {
            held: AtomicUsize::new(0),
            gate: Semaphore::new(0),
            stalled: Arc::new(AtomicUsize::new(0)),
        });
        let (a, sh) = (accepted.clone(), shared.clone());
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                let sh = sh.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let sh = sh.clone();
                        async move { Ok::<_, Infallible>(answer(req, &sh).await) }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .max_concurrent_streams(max_streams)
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        })
        .abort_handle();
        H2Upstream {
            addr,
            accepted,
            shared,
            task,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn held(&self) -> usize {
        self.shared.held.load(Ordering::SeqCst)
    }

    fn release(&self, n: usize) {
        self.shared.gate.add_permits(n);
    }

    /// canaryd with this upstream as its only arm, over HTTP/2, plus `extra` upstream keys.
    async fn proxy(&self, extra: &[(&str, &str)]) -> Proxy {
        let mut cfg = ConfigBuilder::new()
            .upstream("stable", &format!("http://{}", self.addr), "100")
            .upstream_set("http2", "true");
        for (key, value) in extra {
            cfg = cfg.upstream_set(key, value);
        }
        Proxy::start(&cfg.build()).await
    }
}

async fn answer(req: Request<Incoming>, shared: &Shared) -> Response<UpBody> {
    let full = |s: &'static str| Response::new(Full::new(Bytes::from(s)).boxed());
    match req.uri().path() {
        "/held" => {
            shared.held.fetch_add(1, Ordering::SeqCst);
            shared.gate.acquire().await.expect("gate open").forget();
            full("held")
        }
        "/stall" => Response::new(
            Endless {
                taken: shared.stalled.clone(),
            }
            .boxed(),
        ),
        "/big" => {
            let (tx, rx) = mpsc::channel(2);
            tokio::spawn(async move {
                let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
                for _ in 0..BIG / chunk.len() {
                    if tx.send(Frame::data(chunk.clone())).await.is_err() {
                        return;
                    }
                }
            });
            Response::new(FrameBody(rx).boxed())
        }
        "/echo" => {
            let (tx, rx) = mpsc::channel(2);
            let mut body = req.into_body();
            tokio::spawn(async move {
                let mut total = 0;
                while let Some(Ok(frame)) = body.frame().await {
                    if let Ok(data) = frame.into_data() {
                        total += data.len();
                        if tx.send(Frame::data(data)).await.is_err() {
                            return;
                        }
                    }
                }
                let mut trailers = HeaderMap::new();
                trailers.insert("x-echoed", total.into());
                let _ = tx.send(Frame::trailers(trailers)).await;
            });
            Response::new(FrameBody(rx).boxed())
        }
        _ => full("ok"),
    }
}

/// A response body of 16 KiB pieces without end, counting the bytes taken from it.
struct Endless {
    taken: Arc<AtomicUsize>,
}

impl http_body::Body for Endless {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        const PIECE: usize = 16 * 1024;
        self.taken.fetch_add(PIECE, Ordering::SeqCst);
        std::task::Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(&[b's'; PIECE])))))
    }
}

/// `n` concurrent `GET /held` through the proxy, each on a client connection of its own.
fn held_requests(proxy: SocketAddr, n: usize) -> Vec<tokio::task::JoinHandle<Reply>> {
    (0..n)
        .map(|_| tokio::spawn(async move { HttpClient::h2c().get(proxy, "/held", &[]).await }))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_fill_a_connection_before_the_next_one_opens() {
    let up = H2Upstream::start(2).await;
    let proxy = up.proxy(&[]).await;
    // The first exchange tells canaryd the upstream allows 2 streams per connection.
    let first = HttpClient::h2c().get(proxy.addr(), "/", &[]).await;
    assert_eq!(first.status, StatusCode::OK, "{first:?}");
    assert_eq!(up.accepted(), 1);

    let calls = held_requests(proxy.addr(), 5);
    poll_until(QUICK, "all 5 held requests reach the upstream", || async {
        (up.held() == 5).then_some(())
    })
    .await;
    assert_eq!(up.accepted(), 3, "2 + 2 + 1 streams on 3 connections");
    up.release(5);
    for call in calls {
        let reply = call.await.expect("request task");
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        assert_eq!(reply.body, "held");
    }
    // Later requests go to the connections already open.
    let again = HttpClient::h2c().get(proxy.addr(), "/", &[]).await;
    assert_eq!(again.status, StatusCode::OK, "{again:?}");
    assert_eq!(up.accepted(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_bounds_http2_connections_and_further_streams_wait() {
    let up = H2Upstream::start(2).await;
    let proxy = up.proxy(&[("max_connections", "2")]).await;
    let first = HttpClient::h2c().get(proxy.addr(), "/", &[]).await;
    assert_eq!(first.status, StatusCode::OK, "{first:?}");

    let calls = held_requests(proxy.addr(), 5);
    poll_until(QUICK, "4 held requests reach the upstream", || async {
        (up.held() == 4).then_some(())
    })
    .await;
    // The fifth waits inside canaryd until a stream frees up: no third connection.
    up.release(1);
    poll_until(
        QUICK,
        "the fifth request follows a finished one",
        || async { (up.held() == 5).then_some(()) },
    )
    .await;
    up.release(4);
    for call in calls {
        let reply = call.await.expect("request task");
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    }
    assert_eq!(up.accepted(), 2, "at most max_connections connections");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_larger_than_the_flow_control_windows_stream_through() {
    let up = H2Upstream::start(100).await;
    let proxy = up.proxy(&[]).await;
    // Read only as each client takes it: canaryd gives the bytes back to the upstream's
    // window as they go, or the response stalls at the stream window (256 KiB).
    for client in [HttpClient::h2c(), HttpClient::http1()] {
        let reply = client.get(proxy.addr(), "/big", &[]).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.body.len(), BIG);
        assert!(reply.body.bytes().all(|b| b == b'x'));
    }
    assert_eq!(up.accepted(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_body_and_its_response_stream_both_ways_at_once() {
    let up = H2Upstream::start(100).await;
    let proxy = up.proxy(&[]).await;
    let (tx, rx) = mpsc::channel(1);
    let req = Request::post(format!("http://{}/echo", proxy.addr()))
        .header("content-type", "application/grpc")
        .body(FrameBody(rx).map_err(|never| match never {}).boxed())
        .expect("request");
    // The response head comes back while the request body is still open.
    let resp = HttpClient::h2c().send(req).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    for i in 0..3 {
        let piece = format!("piece {i}");
        tx.send(Frame::data(Bytes::from(piece.clone())))
            .await
            .expect("request body open");
        let frame = tokio::time::timeout(QUICK, body.frame())
            .await
            .expect("the echo in time")
            .expect("a frame")
            .expect("frame ok");
        assert_eq!(
            frame.data_ref().map(|d| d.to_vec()),
            Some(piece.into_bytes())
        );
    }
    drop(tx);
    let last = tokio::time::timeout(QUICK, body.frame())
        .await
        .expect("trailers in time")
        .expect("a frame")
        .expect("frame ok");
    assert_eq!(last.trailers_ref().expect("trailers")["x-echoed"], "21");
}

/// An upstream on the `h2` crate's server that answers one request per connection: it
/// refuses the next stream (REFUSED_STREAM) and closes the connection gracefully (GOAWAY),
/// refusing any stream that comes before its last GOAWAY. Returns its address and the count
/// of connections accepted.
async fn one_per_connection_upstream() -> (SocketAddr, Arc<AtomicUsize>, AbortHandle) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(tcp).await else {
                    return;
                };
                if let Some(Ok((_req, mut respond))) = conn.accept().await {
                    if let Ok(mut send) = respond.send_response(Response::new(()), false) {
                        let _ = send.send_data(Bytes::from_static(b"bye"), true);
                    }
                }
                // The next stream is refused, and the connection closes (GOAWAY) refusing any
                // stream that comes before its last GOAWAY.
                if let Some(Ok((_req, mut respond))) = conn.accept().await {
                    respond.send_reset(h2::Reason::REFUSED_STREAM);
                }
                conn.graceful_shutdown();
                while let Some(Ok((_req, mut respond))) = conn.accept().await {
                    respond.send_reset(h2::Reason::REFUSED_STREAM);
                }
            });
        }
    })
    .abort_handle();
    (addr, accepted, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_the_upstream_refused_goes_again_on_a_new_connection() {
    let (addr, accepted, task) = one_per_connection_upstream().await;
    let proxy = Proxy::start(
        &ConfigBuilder::new()
            .upstream("stable", &format!("http://{addr}"), "100")
            .upstream_set("http2", "true")
            .build(),
    )
    .await;
    let client = HttpClient::h2c();
    // Each request after the first is refused on the previous one's connection, which the
    // upstream never processed: canaryd sends it again on a new connection.
    for i in 0..20 {
        let reply = client.get(proxy.addr(), "/", &[]).await;
        assert_eq!(reply.status, StatusCode::OK, "request {i}: {reply:?}");
        assert_eq!(reply.body, "bye");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 20, "one connection each");
    let m = proxy.admin_client().metrics().await;
    assert_eq!(
        m.sum("canaryd_upstream_failures_total", &[("upstream", "stable")]),
        0.0
    );
    task.abort();
}

/// canaryd's flow-control window per upstream stream (`STREAM_WINDOW` in src/upstream/h2.rs).
const STREAM_WINDOW: usize = 256 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_stop_reading_hold_their_own_windows_not_the_connection() {
    const STUCK: usize = 24;
    let up = H2Upstream::start(100).await;
    let proxy = up.proxy(&[]).await;
    // An h2c client whose streams take no data at all (window 0): canaryd's server side never
    // reads their responses from the upstream, so each holds what canaryd's window for it lets
    // the upstream send. The 24 streams share one upstream connection.
    let stuck: Client<HttpConnector, Body> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .http2_initial_stream_window_size(0)
        .build_http();
    let mut held = Vec::new();
    for _ in 0..STUCK {
        let req = request("GET", proxy.addr(), "/stall", &[], empty());
        let resp = tokio::time::timeout(QUICK, stuck.request(req))
            .await
            .expect("head in time")
            .expect("a response head");
        assert_eq!(resp.status(), StatusCode::OK);
        held.push(resp);
    }
    // Each stream fills its own window: no connection-wide window caps them all together
    // (with 2 MiB per stream and 5 MiB per connection, the 24 would stop near 5 MiB).
    poll_until(QUICK, "every stuck stream filled its window", || async {
        (up.shared.stalled.load(Ordering::SeqCst) >= STUCK * STREAM_WINDOW).then_some(())
    })
    .await;
    // Another request on the same connection still gets its answer.
    let reply = HttpClient::h2c().get(proxy.addr(), "/", &[]).await;
    assert_eq!((reply.status, reply.body.as_str()), (StatusCode::OK, "ok"));
    assert_eq!(up.accepted(), 1, "one upstream connection");
    // And canaryd let the upstream send little beyond the windows: per stream, a piece or two
    // that canaryd's server side took before it saw the client's window shut, and one the
    // upstream queued in its own buffer (16 KiB each), not a growing backlog.
    let taken = up.shared.stalled.load(Ordering::SeqCst);
    assert!(
        taken <= STUCK * (STREAM_WINDOW + 4 * 16 * 1024),
        "{taken} bytes taken for {STUCK} streams"
    );
    drop(held);
}
