//! End-to-end tests of canaryd's HTTP/1.1 upstream client (src/upstream/h1.rs): connection reuse,
//! upstreams that close connections (with and without `Connection: close`), chunked and
//! bodyless responses, responses abandoned half-way, streamed request bodies on a reused
//! connection, the idle sweep, upstreams that never answer, interim `1xx` responses,
//! close-delimited and doubly framed responses, invalid responses, and bytes behind a `101`.
//!
//! The upstream here is [`RawUpstream`], a hand-written HTTP/1.1 server on raw TCP: it counts
//! the connections it accepts, records every request with the connection it came on, sees
//! when canaryd closes a connection, and closes connections itself when a test says so.

mod common;

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::StatusCode;
use http_body::Frame;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use md5::{Digest, Md5};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::AbortHandle;

/// How long a condition that needs no timer on canaryd's side may take.
const QUICK: Duration = Duration::from_secs(10);
/// canaryd sweeps idle upstream connections every 5 s (`UPKEEP_INTERVAL`): two sweeps plus
/// slack.
const SWEEP_DEADLINE: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------------
// Raw HTTP/1.1 upstream
// ---------------------------------------------------------------------------------------------

/// One request as the upstream read it off the wire.
#[derive(Clone, Debug)]
struct RawRequest {
    /// Index of the connection it came on (0 = the first accepted).
    conn: usize,
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RawRequest {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// What the upstream does with a request.
enum Action {
    /// Write each part with a write (and flush) of its own, then wait for the next request on
    /// the same connection.
    Reply(Vec<Vec<u8>>),
    /// Write the parts, then close the socket.
    ReplyAndClose(Vec<Vec<u8>>),
    /// Never answer: read and discard until canaryd closes the connection.
    Hang,
    /// Wait, then do the action.
    Later(Duration, Box<Action>),
}

/// One accepted connection, as the test sees it.
#[derive(Default)]
struct RawConn {
    requests: AtomicUsize,
    /// canaryd closed its side: a read returned EOF or failed, or a write failed.
    proxy_closed: AtomicBool,
    /// This upstream closed (or half-closed) its side.
    upstream_closed: AtomicBool,
    /// Makes the connection shut down its write side (FIN) and read on until EOF.
    half_close: Notify,
    /// Makes the connection close its socket.
    close: Notify,
}

type Handler = dyn Fn(&RawRequest) -> Action + Send + Sync;

struct RawShared {
    handler: Box<Handler>,
    conns: Mutex<Vec<Arc<RawConn>>>,
    requests: Mutex<Vec<RawRequest>>,
    tasks: Mutex<Vec<AbortHandle>>,
    panics: Mutex<Vec<String>>,
    /// Connections open now, and the most ever open at once.
    open: AtomicUsize,
    max_open: AtomicUsize,
}

/// Counts a connection as open until dropped.
struct OpenConn(Arc<RawShared>);

impl OpenConn {
    fn new(shared: Arc<RawShared>) -> Self {
        let now = shared.open.fetch_add(1, Ordering::SeqCst) + 1;
        shared.max_open.fetch_max(now, Ordering::SeqCst);
        OpenConn(shared)
    }
}

impl Drop for OpenConn {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A raw-TCP HTTP/1.1 upstream on an ephemeral port; stopped on drop, and a panic in any of
/// its tasks (say, a request it could not parse) fails the test at drop.
struct RawUpstream {
    addr: SocketAddr,
    shared: Arc<RawShared>,
}

impl RawUpstream {
    async fn start(handler: impl Fn(&RawRequest) -> Action + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind raw upstream");
        let addr = listener.local_addr().expect("local addr");
        let shared = Arc::new(RawShared {
            handler: Box::new(handler),
            conns: Mutex::new(Vec::new()),
            requests: Mutex::new(Vec::new()),
            tasks: Mutex::new(Vec::new()),
            panics: Mutex::new(Vec::new()),
            open: AtomicUsize::new(0),
            max_open: AtomicUsize::new(0),
        });
        let accept_shared = shared.clone();
        spawn_tracked(&shared, async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let conn = Arc::new(RawConn::default());
                let index = {
                    let mut conns = accept_shared.conns.lock().unwrap();
                    conns.push(conn.clone());
                    conns.len() - 1
                };
                let shared = accept_shared.clone();
                let open = OpenConn::new(shared.clone());
                spawn_tracked(
                    &accept_shared,
                    serve_conn(stream, index, conn, shared, open),
                );
            }
        });
        RawUpstream { addr, shared }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Connections accepted so far.
    fn accepted(&self) -> usize {
        self.shared.conns.lock().unwrap().len()
    }

    /// The most connections ever open at once.
    fn max_open(&self) -> usize {
        self.shared.max_open.load(Ordering::SeqCst)
    }

    fn conn(&self, index: usize) -> Arc<RawConn> {
        self.shared
            .conns
            .lock()
            .unwrap()
            .get(index)
            .unwrap_or_else(|| panic!("no connection {index}: {}", self.describe()))
            .clone()
    }

    fn requests(&self) -> Vec<RawRequest> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// The connection the last request came on.
    fn last_conn(&self) -> usize {
        self.requests().last().expect("a request was received").conn
    }

    /// Accepted connections, what came on each and who closed it, for failure messages.
    fn describe(&self) -> String {
        let requests = self.requests();
        let conns = self.shared.conns.lock().unwrap();
        let mut out = format!("{} connection(s) accepted", conns.len());
        for (i, c) in conns.iter().enumerate() {
            let paths: Vec<String> = requests
                .iter()
                .filter(|r| r.conn == i)
                .map(|r| format!("{} {}", r.method, r.path))
                .collect();
            out.push_str(&format!(
                "\n  conn {i}: requests {:?}, proxy closed: {}, upstream closed: {}",
                paths,
                c.proxy_closed.load(Ordering::SeqCst),
                c.upstream_closed.load(Ordering::SeqCst),
            ));
        }
        out
    }

    /// Wait until canaryd has closed its side of connection `index`.
    async fn wait_proxy_closed(&self, index: usize, timeout: Duration, what: &str) {
        let conn = self.conn(index);
        let deadline = Instant::now() + timeout;
        while !conn.proxy_closed.load(Ordering::SeqCst) {
            assert!(
                Instant::now() < deadline,
                "{what}: canaryd did not close upstream connection {index} within {timeout:?}; {}",
                self.describe()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Wait until this upstream has closed its side of connection `index`.
    async fn wait_upstream_closed(&self, index: usize) {
        let conn = self.conn(index);
        poll_until(QUICK, "the upstream to close its connection", || {
            let closed = conn.upstream_closed.load(Ordering::SeqCst);
            async move { closed.then_some(()) }
        })
        .await;
    }
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        for task in self.shared.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
        if !std::thread::panicking() {
            let panics = self.shared.panics.lock().unwrap();
            assert!(panics.is_empty(), "raw upstream panicked: {:?}", *panics);
        }
    }
}

/// Spawns `fut` as a task of the upstream: aborted on drop, a panic recorded.
fn spawn_tracked<F>(shared: &Arc<RawShared>, fut: F)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let handle = tokio::spawn(fut);
    shared.tasks.lock().unwrap().push(handle.abort_handle());
    let shared = shared.clone();
    tokio::spawn(async move {
        if let Err(err) = handle.await {
            if err.is_panic() {
                let payload = err.into_panic();
                let msg = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "non-string panic".to_string());
                shared.panics.lock().unwrap().push(msg);
            }
        }
    });
}

enum Event {
    Request(io::Result<Option<RawRequest>>),
    HalfClose,
    Close,
}

async fn serve_conn(
    mut stream: TcpStream,
    index: usize,
    conn: Arc<RawConn>,
    shared: Arc<RawShared>,
    open: OpenConn,
) {
    let mut buf = Vec::new();
    loop {
        let event = tokio::select! {
            read = read_request(&mut stream, &mut buf, index) => Event::Request(read),
            () = conn.half_close.notified() => Event::HalfClose,
            () = conn.close.notified() => Event::Close,
        };
        let req = match event {
            Event::Request(Ok(Some(req))) => req,
            Event::Request(Ok(None) | Err(_)) => {
                conn.proxy_closed.store(true, Ordering::SeqCst);
                return;
            }
            Event::HalfClose => {
                let _ = stream.shutdown().await;
                conn.upstream_closed.store(true, Ordering::SeqCst);
                drain(&mut stream).await;
                conn.proxy_closed.store(true, Ordering::SeqCst);
                return;
            }
            Event::Close => {
                drop(stream);
                conn.upstream_closed.store(true, Ordering::SeqCst);
                return;
            }
        };
        conn.requests.fetch_add(1, Ordering::SeqCst);
        shared.requests.lock().unwrap().push(req.clone());
        let mut action = (shared.handler)(&req);
        while let Action::Later(wait, then) = action {
            tokio::time::sleep(wait).await;
            action = *then;
        }
        match action {
            Action::Later(..) => unreachable!("waited for above"),
            Action::Reply(parts) => {
                if write_parts(&mut stream, &parts).await.is_err() {
                    conn.proxy_closed.store(true, Ordering::SeqCst);
                    return;
                }
            }
            Action::ReplyAndClose(parts) => {
                let _ = write_parts(&mut stream, &parts).await;
                // No longer counted before canaryd can see the close.
                drop(open);
                drop(stream);
                conn.upstream_closed.store(true, Ordering::SeqCst);
                return;
            }
            Action::Hang => {
                drain(&mut stream).await;
                conn.proxy_closed.store(true, Ordering::SeqCst);
                return;
            }
        }
    }
}

async fn write_parts(stream: &mut TcpStream, parts: &[Vec<u8>]) -> io::Result<()> {
    for part in parts {
        stream.write_all(part).await?;
        stream.flush().await?;
    }
    Ok(())
}

/// Reads and discards until EOF or an error.
async fn drain(stream: &mut TcpStream) {
    let mut sink = vec![0u8; 16 * 1024];
    while let Ok(n) = stream.read(&mut sink).await {
        if n == 0 {
            return;
        }
    }
}

/// Reads more into `buf`; `false` at EOF.
async fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<bool> {
    buf.reserve(64 * 1024);
    Ok(stream.read_buf(buf).await? > 0)
}

async fn need(stream: &mut TcpStream, buf: &mut Vec<u8>, n: usize) -> io::Result<()> {
    while buf.len() < n {
        if !fill(stream, buf).await? {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// One CRLF-terminated line, without the CRLF.
async fn read_line(stream: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<String> {
    loop {
        if let Some(i) = find(buf, b"\r\n") {
            let line = String::from_utf8(buf[..i].to_vec()).expect("chunk line is text");
            buf.drain(..i + 2);
            return Ok(line);
        }
        if !fill(stream, buf).await? {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
}

/// The next request on the connection; `None` at EOF between requests. Panics on a request
/// it cannot parse (canaryd sent invalid HTTP/1.1).
async fn read_request(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    conn: usize,
) -> io::Result<Option<RawRequest>> {
    let head_end = loop {
        if let Some(i) = find(buf, b"\r\n\r\n") {
            break i + 4;
        }
        if !fill(stream, buf).await? {
            if buf.is_empty() {
                return Ok(None);
            }
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    };
    let head = String::from_utf8(buf[..head_end].to_vec()).expect("request head is text");
    buf.drain(..head_end);
    let mut lines = head.split("\r\n");
    let request_line = lines.next().expect("request line");
    let mut words = request_line.split(' ');
    let method = words.next().expect("method").to_string();
    let path = words.next().expect("request target").to_string();
    assert_eq!(
        words.next(),
        Some("HTTP/1.1"),
        "request line {request_line:?}"
    );
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (n, v) = l
                .split_once(':')
                .unwrap_or_else(|| panic!("header line {l:?}"));
            (n.trim().to_ascii_lowercase(), v.trim().to_string())
        })
        .collect();
    let mut req = RawRequest {
        conn,
        method,
        path,
        headers,
        body: Vec::new(),
    };
    let chunked = req
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
    if chunked {
        loop {
            let line = read_line(stream, buf).await?;
            let size = line.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size, 16)
                .unwrap_or_else(|_| panic!("chunk size line {line:?}"));
            if size == 0 {
                // Trailers, up to the empty line.
                while !read_line(stream, buf).await?.is_empty() {}
                break;
            }
            need(stream, buf, size + 2).await?;
            assert_eq!(&buf[size..size + 2], b"\r\n", "chunk not CRLF-terminated");
            req.body.extend_from_slice(&buf[..size]);
            buf.drain(..size + 2);
        }
    } else if let Some(len) = req.header("content-length") {
        let len: usize = len.parse().expect("content-length is a number");
        need(stream, buf, len).await?;
        req.body = buf[..len].to_vec();
        buf.drain(..len);
    }
    Ok(Some(req))
}

/// A response head: status line (`"200 OK"`) and headers, through the blank line.
fn head(status: &str, headers: &[(&str, &str)]) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status}\r\n");
    for (n, v) in headers {
        out.push_str(&format!("{n}: {v}\r\n"));
    }
    out.push_str("\r\n");
    out.into_bytes()
}

/// `200 OK` with a `Content-Length` body, in one write.
fn ok(body: impl AsRef<[u8]>) -> Vec<u8> {
    let body = body.as_ref();
    let mut out = head(
        "200 OK",
        &[
            ("content-type", "text/plain"),
            ("content-length", &body.len().to_string()),
        ],
    );
    out.extend_from_slice(body);
    out
}

/// A `200` with [`hello`]'s body and `Connection: close`.
fn ok_close(path: &str) -> Vec<u8> {
    let body = hello(path);
    let mut resp = head(
        "200 OK",
        &[
            ("connection", "close"),
            ("content-length", &body.len().to_string()),
        ],
    );
    resp.extend_from_slice(body.as_bytes());
    resp
}

/// The body the upstreams below answer a GET with: names the path, so a response cannot be
/// mistaken for another request's.
fn hello(path: &str) -> String {
    format!("hello {path}")
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// canaryd in front of one upstream taking all traffic (rollback circuit off).
fn single_arm(url: &str) -> ConfigBuilder {
    ConfigBuilder::new().upstream("only", url, "100")
}

fn assert_hello(reply: &Reply, path: &str, up: &RawUpstream) {
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "GET {path}: {reply:?}; {}",
        up.describe()
    );
    assert_eq!(
        reply.body,
        hello(path),
        "GET {path}: wrong body; {}",
        up.describe()
    );
}

fn md5_hex(bytes: &[u8]) -> String {
    format!("{:x}", Md5::digest(bytes))
}

/// `n` GETs of `{prefix}/{i}` sent at once; the replies with their paths, in order.
async fn concurrently(
    client: &HttpClient,
    addr: SocketAddr,
    prefix: &str,
    n: usize,
) -> Vec<(Reply, String)> {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let client = client.clone();
            let path = format!("{prefix}/{i}");
            tokio::spawn(async move { (client.get(addr, &path, &[]).await, path) })
        })
        .collect();
    let mut out = Vec::new();
    for task in tasks {
        out.push(task.await.expect("request task"));
    }
    out
}

/// A request body sent in the given pieces, length unknown (`Transfer-Encoding: chunked`).
struct Pieces(VecDeque<Bytes>);

impl http_body::Body for Pieces {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_requests_reuse_one_upstream_connection() {
    let up = RawUpstream::start(|req| Action::Reply(vec![ok(hello(&req.path))])).await;
    let proxy = Proxy::start(&single_arm(&up.url()).build()).await;
    let client = HttpClient::http1();
    for i in 0..50 {
        let path = format!("/reuse/{i}");
        let reply = client.get(proxy.addr(), &path, &[]).await;
        assert_hello(&reply, &path, &up);
    }
    assert_eq!(
        up.accepted(),
        1,
        "50 sequential requests should share one kept-alive upstream connection; {}",
        up.describe()
    );
    assert_eq!(up.conn(0).requests.load(Ordering::SeqCst), 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_close_responses_get_a_fresh_connection_each() {
    let up = RawUpstream::start(|req| Action::ReplyAndClose(vec![ok_close(&req.path)])).await;
    let proxy = Proxy::start(&single_arm(&up.url()).build()).await;
    let client = HttpClient::http1();
    for i in 0..20 {
        let path = format!("/close/{i}");
        let reply = client.get(proxy.addr(), &path, &[]).await;
        assert_hello(&reply, &path, &up);
        assert!(
            reply.header("connection").is_none_or(|v| v != "close"),
            "the upstream's `Connection: close` is hop-by-hop: {reply:?}"
        );
    }
    assert_eq!(up.accepted(), 20, "{}", up.describe());
    for i in 0..20 {
        assert_eq!(
            up.conn(i).requests.load(Ordering::SeqCst),
            1,
            "{}",
            up.describe()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_closed_silently_by_the_upstream_is_not_used_again() {
    // No `Connection: close`: the upstream answers as if it kept the connection, then closes
    // it, either right after the response (a keep-alive timeout of 0) or a moment later, when
    // canaryd has certainly parked it in its pool (`/later`, closed by the test).
    let up = RawUpstream::start(|req| {
        if req.path.starts_with("/now/") {
            Action::ReplyAndClose(vec![ok(hello(&req.path))])
        } else {
            Action::Reply(vec![ok(hello(&req.path))])
        }
    })
    .await;
    let proxy = Proxy::start(&single_arm(&up.url()).build()).await;
    let client = HttpClient::http1();
    let rounds = 10;
    for round in 0..rounds {
        let path = if round % 2 == 0 {
            format!("/now/{round}")
        } else {
            format!("/later/{round}")
        };
        let reply = client.get(proxy.addr(), &path, &[]).await;
        assert_hello(&reply, &path, &up);
        let conn = up.last_conn();
        assert_eq!(
            conn,
            round,
            "round {round} should have needed a new connection; {}",
            up.describe()
        );
        if round % 2 == 1 {
            up.conn(conn).close.notify_one();
        }
        up.wait_upstream_closed(conn).await;
    }
    assert_eq!(up.accepted(), rounds, "{}", up.describe());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_and_bodyless_responses_leave_the_connection_reusable() {
    let up = RawUpstream::start(|req| {
        let chunked = head(
            "200 OK",
            &[
                ("content-type", "text/plain"),
                ("transfer-encoding", "chunked"),
            ],
        );
        let parts = match (req.method.as_str(), req.path.as_str()) {
            ("HEAD", "/plain") => vec![head(
                "200 OK",
                &[
                    ("content-type", "text/plain"),
                    ("content-length", &hello("/plain").len().to_string()),
                ],
            )],
            (_, "/chunked") => vec![
                chunked,
                b"5\r\nhello\r\n".to_vec(),
                b"1\r\n \r\n".to_vec(),
                b"a\r\nchunked wo\r\n".to_vec(),
                b"3;ext=1\r\nrld\r\n".to_vec(),
                b"0\r\n\r\n".to_vec(),
            ],
            (_, "/chunked-empty") => vec![chunked, b"0\r\n\r\n".to_vec()],
            (_, "/empty") => vec![head("200 OK", &[("content-length", "0")])],
            (_, "/no-content") => vec![head("204 No Content", &[("x-kind", "none")])],
            // A 304 may carry the representation's length; it still has no body.
            (_, "/not-modified") => vec![head(
                "304 Not Modified",
                &[("etag", "\"v1\""), ("content-length", "10")],
            )],
            (_, path) => vec![ok(hello(path))],
        };
        Action::Reply(parts)
    })
    .await;
    let proxy = Proxy::start(&single_arm(&up.url()).build()).await;
    let client = HttpClient::http1();
    let addr = proxy.addr();
    let plain = |after: &'static str| {
        let client = client.clone();
        let up = &up;
        async move {
            let reply = client.get(addr, "/plain", &[]).await;
            assert_eq!(
                reply.status,
                StatusCode::OK,
                "GET /plain after {after}: {reply:?}; {}",
                up.describe()
            );
            assert_eq!(
                reply.body,
                hello("/plain"),
                "GET /plain after {after}; {}",
                up.describe()
            );
        }
    };

    let reply = client.get(addr, "/chunked", &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.body, "hello chunked world");
    plain("a chunked response").await;

    let reply = client.get(addr, "/chunked-empty", &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.body, "");
    plain("an empty chunked response").await;

    let reply = client.get(addr, "/empty", &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.body, "");
    plain("a Content-Length: 0 response").await;

    let reply = client
        .fetch(request("HEAD", addr, "/plain", &[], empty()))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.body, "");
    let len = hello("/plain").len().to_string();
    assert_eq!(
        reply.header("content-length"),
        Some(len.as_str()),
        "HEAD keeps the GET's Content-Length: {reply:?}"
    );
    plain("a HEAD").await;

    let reply = client.get(addr, "/no-content", &[]).await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT, "{reply:?}");
    assert_eq!(reply.body, "");
    assert_eq!(reply.header("x-kind"), Some("none"), "{reply:?}");
    plain("a 204").await;

    let reply = client.get(addr, "/not-modified", &[]).await;
    assert_eq!(reply.status, StatusCode::NOT_MODIFIED, "{reply:?}");
    assert_eq!(reply.body, "");
    assert_eq!(reply.header("etag"), Some("\"v1\""), "{reply:?}");
    plain("a 304").await;

    assert_eq!(
        up.accepted(),
        1,
        "every one of these responses ends cleanly: one connection serves them all; {}",
        up.describe()
    );
    assert_eq!(up.conn(0).requests.load(Ordering::SeqCst), 12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_response_with_trailers_leaves_the_connection_reusable() {
    // The body ends with a trailer section: the exchange is complete and the connection
    // reusable, exactly as after a chunked body without trailers.
    let up = RawUpstream::start(|req| match req.path.as_str() {
        "/trailers" => Action::Reply(vec![
            head(
                "200 OK",
                &[
                    ("content-type", "text/plain"),
                    ("transfer-encoding", "chunked"),
                    ("trailer", "x-checksum"),
                ],
            ),
            b"8\r\ntrailers\r\n".to_vec(),
            b"0\r\nx-checksum: 42\r\n\r\n".to_vec(),
        ]),
        path => Action::Reply(vec![ok(hello(path))]),
    })
    .await;
    let proxy = Proxy::start(&single_arm(&up.url()).build()).await;
    let client = HttpClient::http1();
    for i in 0..3 {
        let reply = client.get(proxy.addr(), "/trailers", &[]).await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        assert_eq!(reply.body, "trailers", "{reply:?}");
        let path = format!("/after/{i}");
        let reply = client.get(proxy.addr(), &path, &[]).await;
        assert_hello(&reply, &path, &up);
    }
    assert_eq!(
        up.accepted(),
        1,
        "a chunked response with trailers ends cleanly: its connection should be reused; {}",
        up.describe()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_large_response_closes_its_upstream_connection() {
    const BIG: usize = 8 << 20;
    let up = RawUpstream::start(|req| match req.path.as_str() {
        "/big" => {
            let mut parts = vec![head(
                "200 OK",
                &[
                    ("content-type", "application/octet-stream"),
                    ("content-length", &BIG.to_string()),
                ],
            )];
            parts.extend((0..BIG / (64 << 10)).map(|_| vec![b'A'; 64 << 10]));
            Action::Reply(parts)
        }
        path => Action::Reply(vec![ok(hello(path))]),
    })
    .await;
    let proxy = Proxy::start(&single_arm(&up.url()).build()).await;

    // A raw client: read the head and a little of the body, then go away.
    let mut client = TcpStream::connect(proxy.addr()).await.expect("connect");
    client
        .write_all(b"GET /big HTTP/1.1\r\nhost: test\r\n\r\n")
        .await
        .expect("write request");
    let head = read_response_head(&mut client).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let mut got = 0;
    let mut chunk = vec![0u8; 16 * 1024];
    while got < 256 * 1024 {
        let n = tokio::time::timeout(QUICK, client.read(&mut chunk))
            .await
            .expect("body bytes in time")
            .expect("read body");
        assert!(n > 0, "body ended after {got} bytes");
        assert!(chunk[..n].iter().all(|&b| b == b'A'));
        got += n;
    }
    drop(client);

    // The next request: its own connection, its own bytes.
    let reply = HttpClient::http1().get(proxy.addr(), "/small", &[]).await;
    assert_hello(&reply, "/small", &up);
    assert_eq!(
        up.accepted(),
        2,
        "the half-read connection must not serve another request; {}",
        up.describe()
    );
    let requests = up.requests();
    assert_eq!(requests.len(), 2, "{}", up.describe());
    assert_eq!((requests[0].conn, requests[0].path.as_str()), (0, "/big"));
    assert_eq!((requests[1].conn, requests[1].path.as_str()), (1, "/small"));
    // And the abandoned connection is closed, not left half-read.
    up.wait_proxy_closed(0, QUICK, "abandoned response").await;
    // The healthy connection stays pooled and serves the next request.
    let reply = HttpClient::http1().get(proxy.addr(), "/again", &[]).await;
    assert_hello(&reply, "/again", &up);
    assert_eq!(up.accepted(), 2, "{}", up.describe());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_stream_exactly_over_a_reused_connection() {
    let up = RawUpstream::start(|req| {
        Action::Reply(vec![ok(format!(
            "{} {}",
            req.body.len(),
            md5_hex(&req.body)
        ))])
    })
    .await;
    let proxy = Proxy::start(&single_arm(&up.url()).build()).await;

    // One client connection, kept alive across all the uploads.
    let stream = TcpStream::connect(proxy.addr()).await.expect("connect");
    let (mut send, conn) = hyper::client::conn::http1::handshake::<_, Body>(TokioIo::new(stream))
        .await
        .expect("client handshake");
    let client_conn = tokio::spawn(conn);

    // (length, sent with Content-Length?) ; chunked bodies go in uneven pieces.
    let uploads: [(usize, bool); 9] = [
        (0, true),
        (1, true),
        (1000, true),
        (70_001, true),
        ((1 << 20) + 17, true),
        (3, false),
        (600_000, false),
        (65_536, true),
        (10, true),
    ];
    for (i, &(len, exact)) in uploads.iter().enumerate() {
        let bytes = data(i as u64 + 1, len);
        let body = if exact {
            full(bytes.clone())
        } else {
            let mut pieces = VecDeque::new();
            let mut rest = Bytes::from(bytes.clone());
            let mut size = 1;
            while !rest.is_empty() {
                pieces.push_back(rest.split_to(size.min(rest.len())));
                size = size * 7 + 3;
            }
            Pieces(pieces).boxed()
        };
        let path = format!("/upload/{i}");
        let req = http::Request::builder()
            .method("POST")
            .uri(&path)
            .header("host", "test")
            .header("content-type", "application/octet-stream")
            .body(body)
            .expect("request");
        tokio::time::timeout(QUICK, send.ready())
            .await
            .expect("client connection ready in time")
            .expect("client connection still open (keep-alive)");
        let resp = tokio::time::timeout(QUICK, send.send_request(req))
            .await
            .expect("response in time")
            .unwrap_or_else(|e| panic!("POST {path} ({len} bytes): {e}; {}", up.describe()));
        let reply = collect(resp, QUICK).await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "POST {path} ({len} bytes): {reply:?}"
        );
        assert_eq!(
            reply.body,
            format!("{len} {}", md5_hex(&bytes)),
            "POST {path}: the upstream must receive exactly the {len} bytes sent \
             (content-length: {exact}); {}",
            up.describe()
        );
        let received = up.requests();
        let last = received.last().expect("request received");
        assert_eq!(last.path, path);
        assert_eq!(last.body.len(), len);
    }
    assert!(
        !client_conn.is_finished(),
        "the client's keep-alive connection should still be open"
    );
    assert_eq!(
        up.accepted(),
        1,
        "all uploads should reuse one upstream connection; {}",
        up.describe()
    );
    assert_eq!(up.requests().len(), uploads.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connection_closed_by_the_upstream_is_closed_by_the_sweep() {
    let up = RawUpstream::start(|req| Action::Reply(vec![ok(hello(&req.path))])).await;
    let proxy = Proxy::start(&single_arm(&up.url()).build()).await;
    let client = HttpClient::http1();
    let reply = client.get(proxy.addr(), "/first", &[]).await;
    assert_hello(&reply, "/first", &up);

    // The connection is parked in the pool now (the response has ended). The upstream
    // half-closes it (FIN) and reads on: with no further request, only the pool sweep can
    // notice and close canaryd's side; otherwise it would sit in CLOSE_WAIT until reused.
    up.conn(0).half_close.notify_one();
    up.wait_upstream_closed(0).await;
    up.wait_proxy_closed(0, SWEEP_DEADLINE, "idle sweep").await;

    let reply = client.get(proxy.addr(), "/second", &[]).await;
    assert_hello(&reply, "/second", &up);
    assert_eq!(up.accepted(), 2, "{}", up.describe());
    assert_eq!(up.last_conn(), 1, "{}", up.describe());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_that_never_answers_gets_504_and_the_proxy_keeps_serving() {
    let up = RawUpstream::start(|req| {
        if req.path == "/hang" {
            Action::Hang
        } else {
            Action::Reply(vec![ok(hello(&req.path))])
        }
    })
    .await;
    let cfg = single_arm(&up.url()).set("listen", "request_timeout", &q("300ms"));
    let proxy = Proxy::start(&cfg.build()).await;
    let addr = proxy.addr();

    let hang = tokio::spawn(async move {
        let start = Instant::now();
        let reply = HttpClient::http1().get(addr, "/hang", &[]).await;
        (reply, start.elapsed())
    });
    poll_until(QUICK, "the upstream to receive /hang", || {
        let got = up.requests().iter().any(|r| r.path == "/hang");
        async move { got.then_some(()) }
    })
    .await;
    // Served on another connection while /hang waits.
    let client = HttpClient::http1();
    let reply = client.get(addr, "/ok/1", &[]).await;
    assert_hello(&reply, "/ok/1", &up);

    let (reply, elapsed) = hang.await.expect("hang request task");
    assert_eq!(
        reply.status,
        StatusCode::GATEWAY_TIMEOUT,
        "{reply:?}; {}",
        up.describe()
    );
    assert!(
        reply.body.contains("only"),
        "the 504 names the arm: {reply:?}"
    );
    assert!(
        elapsed >= Duration::from_millis(300) && elapsed < Duration::from_secs(5),
        "504 after {elapsed:?}, expected just after the 300ms request_timeout"
    );
    // The connection the request timed out on is closed, not returned to the pool.
    let hung = up
        .requests()
        .iter()
        .find(|r| r.path == "/hang")
        .expect("/hang")
        .conn;
    up.wait_proxy_closed(hung, QUICK, "timed-out request").await;

    let reply = client.get(addr, "/ok/2", &[]).await;
    assert_hello(&reply, "/ok/2", &up);
    assert_eq!(
        up.accepted(),
        2,
        "one connection for /hang, one reused for both /ok; {}",
        up.describe()
    );
    assert_ne!(up.last_conn(), hung, "{}", up.describe());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interim_responses_are_skipped_and_the_connection_is_reused() {
    let up = RawUpstream::start(|req| {
        Action::Reply(vec![
            b"HTTP/1.1 100 Continue\r\n\r\n".to_vec(),
            head("103 Early Hints", &[("link", "</style.css>; rel=preload")]),
            ok(hello(&req.path)),
        ])
    })
    .await;
    let proxy = Proxy::start(&single_arm(&up.url()).build()).await;
    let client = HttpClient::http1();
    for path in ["/interim/1", "/interim/2"] {
        let reply = client.get(proxy.addr(), path, &[]).await;
        assert_hello(&reply, path, &up);
        assert_eq!(
            reply.header("link"),
            None,
            "a 103's fields are not the response's"
        );
    }
    assert_eq!(up.accepted(), 1, "{}", up.describe());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_delimited_responses_arrive_whole_and_their_connection_is_not_reused() {
    let up = RawUpstream::start(|req| match req.path.as_str() {
        // No length and no chunking: the body is everything until the upstream closes.
        "/http10" => Action::ReplyAndClose(vec![
            b"HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\n".to_vec(),
            b"an HTTP/1.0 body ".to_vec(),
            b"in two writes".to_vec(),
        ]),
        "/until-close" => Action::ReplyAndClose(vec![
            head("200 OK", &[("content-type", "text/plain")]),
            b"read until ".to_vec(),
            b"the end".to_vec(),
        ]),
        path => Action::Reply(vec![ok(hello(path))]),
    })
    .await;
    let proxy = Proxy::start(&single_arm(&up.url()).build()).await;
    let client = HttpClient::http1();
    let reply = client.get(proxy.addr(), "/http10", &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.body, "an HTTP/1.0 body in two writes");
    let reply = client.get(proxy.addr(), "/until-close", &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.body, "read until the end");
    let reply = client.get(proxy.addr(), "/plain", &[]).await;
    assert_hello(&reply, "/plain", &up);
    assert_eq!(
        up.accepted(),
        3,
        "each close-delimited response used up its connection; {}",
        up.describe()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_with_both_framings_is_read_as_chunked_and_its_connection_closed() {
    let up = RawUpstream::start(|req| match req.path.as_str() {
        "/both" => Action::Reply(vec![
            head(
                "200 OK",
                &[("content-length", "3"), ("transfer-encoding", "chunked")],
            ),
            b"5\r\nhello\r\n0\r\n\r\n".to_vec(),
        ]),
        path => Action::Reply(vec![ok(hello(path))]),
    })
    .await;
    let proxy = Proxy::start(&single_arm(&up.url()).build()).await;
    let client = HttpClient::http1();
    let reply = client.get(proxy.addr(), "/both", &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(
        reply.body, "hello",
        "the chunked coding wins over Content-Length"
    );
    up.wait_proxy_closed(0, QUICK, "a response with both framings")
        .await;
    let reply = client.get(proxy.addr(), "/plain", &[]).await;
    assert_hello(&reply, "/plain", &up);
    assert_eq!(up.last_conn(), 1, "{}", up.describe());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_upstream_responses_are_502_and_the_proxy_keeps_serving() {
    let up = RawUpstream::start(|req| match req.path.as_str() {
        "/not-http" => Action::ReplyAndClose(vec![b"SSH-2.0-OpenSSH_9.2\r\n\r\n".to_vec()]),
        "/two-lengths" => Action::Reply(vec![
            head(
                "200 OK",
                &[("content-length", "5"), ("content-length", "6")],
            ),
            b"hello!".to_vec(),
        ]),
        "/bad-chunk" => Action::Reply(vec![
            head("200 OK", &[("transfer-encoding", "chunked")]),
            b"zz\r\nhello\r\n0\r\n\r\n".to_vec(),
        ]),
        "/closed-early" => Action::ReplyAndClose(vec![
            head("200 OK", &[("content-length", "100")]),
            b"only part".to_vec(),
        ]),
        path => Action::Reply(vec![ok(hello(path))]),
    })
    .await;
    let proxy = Proxy::start(&single_arm(&up.url()).build()).await;
    let client = HttpClient::http1();
    for (path, cause) in [
        ("/not-http", "invalid response head"),
        ("/two-lengths", "conflicting content-length"),
    ] {
        let reply = client.get(proxy.addr(), path, &[]).await;
        assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{path}: {reply:?}");
        assert!(
            reply.body.contains(cause) && reply.body.contains("\"only\""),
            "{path}: the 502 names the arm and the cause: {reply:?}"
        );
    }
    // Once the head has gone to the client, a broken body can only be cut off.
    for path in ["/bad-chunk", "/closed-early"] {
        let result = tokio::time::timeout(QUICK, get_to_the_end(proxy.addr(), path))
            .await
            .unwrap_or_else(|_| panic!("{path}: no answer within {QUICK:?}"));
        assert!(
            result.is_err(),
            "{path}: a broken body must not look complete: {result:?}"
        );
    }
    let reply = client.get(proxy.addr(), "/plain", &[]).await;
    assert_hello(&reply, "/plain", &up);
}

/// A GET on a fresh connection whose body is read to the end: `Err` if the body broke.
async fn get_to_the_end(addr: SocketAddr, path: &str) -> Result<Bytes, String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header("host", "test")
        .body(http_body_util::Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    resp.into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_the_upstream_sends_right_behind_its_101_reach_the_client() {
    let up = RawUpstream::start(|_| {
        // The head and the first tunnel bytes in one write: canaryd reads them together.
        let mut first = head(
            "101 Switching Protocols",
            &[("connection", "upgrade"), ("upgrade", "x-echo")],
        );
        first.extend_from_slice(b"hello-behind-101");
        Action::Reply(vec![first])
    })
    .await;
    let proxy = Proxy::start(&single_arm(&up.url()).build()).await;
    let mut client = TcpStream::connect(proxy.addr()).await.expect("connect");
    client
        .write_all(
            b"GET /tunnel HTTP/1.1\r\nhost: test\r\nconnection: upgrade\r\nupgrade: x-echo\r\n\r\n",
        )
        .await
        .expect("write");
    let mut got = Vec::new();
    let deadline = Instant::now() + QUICK;
    while find(&got, b"hello-behind-101").is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut buf = [0u8; 1024];
        let n = tokio::time::timeout(left, client.read(&mut buf))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "no tunnel bytes within {QUICK:?}: {:?}",
                    String::from_utf8_lossy(&got)
                )
            })
            .expect("read");
        assert!(
            n > 0,
            "closed before the tunnel bytes: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 101"), "{text}");
    assert_eq!(up.requests()[0].header("upgrade"), Some("x-echo"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_max_connections_wait_for_a_connection() {
    // Each response takes 100 ms; 12 requests at once on one HTTP/2 connection, with room for
    // 3 upstream connections: they go 3 at a time over the same 3 connections.
    let up = RawUpstream::start(|req| {
        Action::Later(
            Duration::from_millis(100),
            Box::new(Action::Reply(vec![ok(hello(&req.path))])),
        )
    })
    .await;
    let cfg = single_arm(&up.url()).upstream_set("max_connections", "3");
    let proxy = Proxy::start(&cfg.build()).await;
    let client = HttpClient::h2c();
    let start = Instant::now();
    let replies = concurrently(&client, proxy.addr(), "/queued", 12).await;
    let elapsed = start.elapsed();
    for (reply, path) in &replies {
        assert_hello(reply, path, &up);
    }
    assert_eq!(up.accepted(), 3, "{}", up.describe());
    assert_eq!(up.max_open(), 3, "{}", up.describe());
    for i in 0..3 {
        assert_eq!(
            up.conn(i).requests.load(Ordering::SeqCst),
            4,
            "each connection carries a quarter; {}",
            up.describe()
        );
    }
    // Four rounds of 100 ms: they did wait for each other.
    assert!(elapsed >= Duration::from_millis(400), "{elapsed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_connection_gives_its_place_to_a_waiting_request() {
    // Every response closes its connection: with one connection allowed, each waiting request
    // gets to open the next, one at a time.
    let up = RawUpstream::start(|req| {
        Action::Later(
            Duration::from_millis(20),
            Box::new(Action::ReplyAndClose(vec![ok_close(&req.path)])),
        )
    })
    .await;
    let cfg = single_arm(&up.url()).upstream_set("max_connections", "1");
    let proxy = Proxy::start(&cfg.build()).await;
    let client = HttpClient::h2c();
    let replies = concurrently(&client, proxy.addr(), "/one-at-a-time", 8).await;
    for (reply, path) in &replies {
        assert_hello(reply, path, &up);
    }
    assert_eq!(up.accepted(), 8, "{}", up.describe());
    assert_eq!(up.max_open(), 1, "{}", up.describe());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_a_connection_counts_against_the_request_timeout() {
    // /slow sends its head and part of its body, then nothing: its response holds the only
    // connection for as long as the client holds the response.
    let up = RawUpstream::start(|req| match req.path.as_str() {
        "/slow" => Action::Reply(vec![
            head("200 OK", &[("content-length", "100")]),
            b"partial".to_vec(),
        ]),
        path => Action::Reply(vec![ok(hello(path))]),
    })
    .await;
    let cfg = single_arm(&up.url())
        .upstream_set("max_connections", "1")
        .set("listen", "request_timeout", &q("500ms"));
    let proxy = Proxy::start(&cfg.build()).await;
    let addr = proxy.addr();
    let mut slow = TcpStream::connect(addr).await.expect("connect");
    slow.write_all(b"GET /slow HTTP/1.1\r\nhost: test\r\n\r\n")
        .await
        .expect("write request");
    let head = read_response_head(&mut slow).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");

    // The only connection is taken: this request waits, and its wait is its timeout.
    let start = Instant::now();
    let reply = HttpClient::http1().get(addr, "/waits", &[]).await;
    let waited = start.elapsed();
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT, "{reply:?}");
    assert!(
        waited >= Duration::from_millis(500) && waited < Duration::from_secs(5),
        "504 after {waited:?}"
    );
    assert!(
        up.requests().iter().all(|r| r.path != "/waits"),
        "it never reached the upstream; {}",
        up.describe()
    );
    // The upstream breaking off /slow closes the connection and gives its place back.
    up.conn(0).close.notify_one();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(QUICK, slow.read_to_end(&mut rest)).await;
    let reply = HttpClient::http1().get(addr, "/after", &[]).await;
    assert_hello(&reply, "/after", &up);
    assert_eq!(up.accepted(), 2, "{}", up.describe());
    assert_eq!(up.max_open(), 1, "{}", up.describe());
}
