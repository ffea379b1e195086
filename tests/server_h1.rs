//! End-to-end tests of canaryd's own HTTP/1.1 server side (src/server/h1.rs) and its hand-off
//! to hyper, seen from a raw TCP client: pipelining, request bodies the server side streams
//! (chunked, still-arriving and `Expect: 100-continue` bodies), requests that go to hyper in
//! the middle of a connection (HTTP/1.0),
//! `Connection: close`, bodyless responses (HEAD, 204, 304), large, streamed and trailered
//! response bodies, the `date` field, request heads over `listen.max_header_bytes`, and
//! clients that pipeline or leave while a response waits on its upstream.
//!
//! Every response is read off the wire and framed by the test itself (see [`RawClient`]), so a
//! byte too many or too few in any response shows up as a broken next response.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

/// How long any one read or write on a raw connection may take.
const DEADLINE: Duration = Duration::from_secs(10);
/// How long the proxy may take to close a connection it said it would close. Well under the
/// `header_read_timeout` set by [`base_config`], so a close that only comes from that timeout
/// fails the test.
const CLOSE_DEADLINE: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------
// Raw HTTP/1.1 client
// ---------------------------------------------------------------------------------------------

/// A response as read off the wire.
#[derive(Debug)]
struct RawResponse {
    /// `1` for HTTP/1.1, `0` for HTTP/1.0.
    minor: u8,
    status: u16,
    /// Header fields in wire order, names lower-cased.
    headers: Vec<(String, String)>,
    /// The body, de-chunked if it was chunked.
    body: Vec<u8>,
    chunked: bool,
    /// Trailer fields of a chunked body, names lower-cased.
    trailers: Vec<(String, String)>,
}

impl RawResponse {
    /// The only value of `name`; panics if the field appears more than once.
    fn header(&self, name: &str) -> Option<&str> {
        let all = self.all(name);
        assert!(
            all.len() <= 1,
            "{name} appears {} times: {self:?}",
            all.len()
        );
        all.first().copied()
    }

    fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Whether `connection` lists `close`.
    fn says_close(&self) -> bool {
        self.all("connection")
            .iter()
            .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")))
    }
}

/// A response head.
struct Head {
    minor: u8,
    status: u16,
    headers: Vec<(String, String)>,
}

/// One piece of a chunked body.
enum Chunk {
    Data(Vec<u8>),
    /// The last chunk, with the trailer fields.
    End(Vec<(String, String)>),
}

/// A raw TCP connection to the proxy that writes requests as given and reads responses
/// byte-exactly: bytes after one response stay buffered for the next.
struct RawClient {
    stream: TcpStream,
    buf: Vec<u8>,
}

fn lossy(bytes: &[u8]) -> String {
    const SHOW: usize = 600;
    if bytes.len() > SHOW {
        format!(
            "{:?}... ({} bytes)",
            String::from_utf8_lossy(&bytes[..SHOW]),
            bytes.len()
        )
    } else {
        format!("{:?}", String::from_utf8_lossy(bytes))
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

impl RawClient {
    async fn connect(addr: SocketAddr) -> RawClient {
        let stream = tokio::time::timeout(DEADLINE, TcpStream::connect(addr))
            .await
            .expect("connect to the proxy in time")
            .expect("connect to the proxy");
        stream.set_nodelay(true).expect("set TCP_NODELAY");
        RawClient {
            stream,
            buf: Vec::new(),
        }
    }

    /// Writes `bytes` in one `write_all`.
    async fn write(&mut self, bytes: impl AsRef<[u8]>) {
        tokio::time::timeout(DEADLINE, self.stream.write_all(bytes.as_ref()))
            .await
            .expect("request written in time")
            .expect("write the request");
    }

    /// Reads more bytes into the buffer; `false` at EOF.
    async fn fill(&mut self, what: &str) -> bool {
        self.buf.reserve(64 * 1024);
        match tokio::time::timeout(DEADLINE, self.stream.read_buf(&mut self.buf)).await {
            Err(_) => panic!(
                "nothing more within {DEADLINE:?} while reading {what}; buffered: {}",
                lossy(&self.buf)
            ),
            Ok(Err(e)) => panic!(
                "read error while reading {what}: {e}; buffered: {}",
                lossy(&self.buf)
            ),
            Ok(Ok(n)) => n > 0,
        }
    }

    /// Makes sure `n` bytes are buffered.
    async fn need(&mut self, n: usize, what: &str) {
        while self.buf.len() < n {
            assert!(
                self.fill(what).await,
                "connection closed in {what}: needed {n} bytes, have {}",
                self.buf.len()
            );
        }
    }

    /// One CRLF-terminated line, without the CRLF.
    async fn line(&mut self, what: &str) -> String {
        loop {
            if let Some(i) = find(&self.buf, b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..i]).into_owned();
                self.buf.drain(..i + 2);
                return line;
            }
            assert!(
                self.fill(what).await,
                "connection closed in {what}; buffered: {}",
                lossy(&self.buf)
            );
        }
    }

    /// The next response head (a `1xx` one included).
    async fn head(&mut self) -> Head {
        loop {
            let mut fields = [httparse::EMPTY_HEADER; 64];
            let mut resp = httparse::Response::new(&mut fields);
            match resp.parse(&self.buf) {
                Ok(httparse::Status::Complete(len)) => {
                    let head = Head {
                        minor: resp.version.expect("version"),
                        status: resp.code.expect("status"),
                        headers: resp
                            .headers
                            .iter()
                            .map(|h| {
                                (
                                    h.name.to_ascii_lowercase(),
                                    String::from_utf8_lossy(h.value).into_owned(),
                                )
                            })
                            .collect(),
                    };
                    self.buf.drain(..len);
                    return head;
                }
                Ok(httparse::Status::Partial) => {}
                Err(e) => panic!(
                    "not a valid HTTP/1.x response head ({e}): {}",
                    lossy(&self.buf)
                ),
            }
            assert!(
                self.fill("a response head").await,
                "connection closed before a complete response head; got {}",
                lossy(&self.buf)
            );
        }
    }

    /// The next chunk of a chunked body.
    async fn chunk(&mut self) -> Chunk {
        let line = self.line("a chunk-size line").await;
        let size = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size, 16)
            .unwrap_or_else(|_| panic!("invalid chunk-size line {line:?}"));
        if size == 0 {
            let mut trailers = Vec::new();
            loop {
                let field = self.line("the trailer section").await;
                if field.is_empty() {
                    return Chunk::End(trailers);
                }
                let (name, value) = field
                    .split_once(':')
                    .unwrap_or_else(|| panic!("invalid trailer field {field:?}"));
                trailers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
            }
        }
        self.need(size + 2, "chunk data").await;
        assert_eq!(
            &self.buf[size..size + 2],
            b"\r\n",
            "chunk of {size} bytes not followed by CRLF: {}",
            lossy(&self.buf[..size + 2])
        );
        let data = self.buf[..size].to_vec();
        self.buf.drain(..size + 2);
        Chunk::Data(data)
    }

    /// The body that follows `head`, framed as RFC 9112 §6.3 says.
    async fn body(&mut self, head: Head, head_request: bool) -> RawResponse {
        let mut resp = RawResponse {
            minor: head.minor,
            status: head.status,
            headers: head.headers,
            body: Vec::new(),
            chunked: false,
            trailers: Vec::new(),
        };
        if head_request || (100..200).contains(&resp.status) || [204, 304].contains(&resp.status) {
            return resp;
        }
        let te = resp.all("transfer-encoding").join(",");
        if !te.is_empty() {
            assert!(
                te.trim().eq_ignore_ascii_case("chunked"),
                "unexpected transfer-encoding {te:?}: {resp:?}"
            );
            assert!(
                resp.all("content-length").is_empty(),
                "both content-length and transfer-encoding: {resp:?}"
            );
            resp.chunked = true;
            loop {
                match self.chunk().await {
                    Chunk::Data(data) => resp.body.extend_from_slice(&data),
                    Chunk::End(trailers) => {
                        resp.trailers = trailers;
                        return resp;
                    }
                }
            }
        }
        if let Some(len) = resp.header("content-length") {
            let len: usize = len
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("invalid content-length {len:?}"));
            self.need(len, "a content-length body").await;
            resp.body = self.buf.drain(..len).collect();
            return resp;
        }
        // Delimited by the end of the connection.
        while self.fill("a close-delimited body").await {}
        resp.body = std::mem::take(&mut self.buf);
        resp
    }

    /// The next final response (answering a HEAD request if `head_request`).
    async fn response(&mut self, head_request: bool) -> RawResponse {
        let head = self.head().await;
        self.body(head, head_request).await
    }

    /// Writes `request` and reads its response.
    async fn exchange(&mut self, request: impl AsRef<[u8]>) -> RawResponse {
        self.write(request).await;
        self.response(false).await
    }

    /// The proxy closes the connection: EOF within [`CLOSE_DEADLINE`], with nothing (neither
    /// buffered nor read) after the last response.
    async fn expect_closed(&mut self, what: &str) {
        assert!(
            self.buf.is_empty(),
            "{what}: unexpected bytes after the last response: {}",
            lossy(&self.buf)
        );
        let mut rest = Vec::new();
        let read = tokio::time::timeout(CLOSE_DEADLINE, self.stream.read_to_end(&mut rest))
            .await
            .unwrap_or_else(|_| {
                panic!("{what}: the proxy did not close the connection within {CLOSE_DEADLINE:?}")
            });
        match read {
            Ok(_) => assert!(
                rest.is_empty(),
                "{what}: unexpected bytes before the close: {}",
                lossy(&rest)
            ),
            Err(e) => panic!("{what}: the connection was reset instead of closed: {e}"),
        }
    }
}

/// `GET path` as user `user`, keep-alive.
fn get(path: &str, user: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: canaryd.test\r\nx-user-id: {user}\r\n\r\n")
}

/// `POST path` as user `user` with a `Content-Length` body.
fn post(path: &str, user: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "POST {path} HTTP/1.1\r\nHost: canaryd.test\r\nx-user-id: {user}\r\n\
         content-type: application/octet-stream\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

/// `POST path` as user `user` with `Transfer-Encoding: chunked`, one chunk per piece.
fn post_chunked(path: &str, user: &str, pieces: &[&[u8]]) -> Vec<u8> {
    let mut out = format!(
        "POST {path} HTTP/1.1\r\nHost: canaryd.test\r\nx-user-id: {user}\r\n\
         content-type: application/octet-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    for piece in pieces {
        out.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        out.extend_from_slice(piece);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

/// Asserts a 200 from `arm` (arm header and fake upstream header agree) and returns the body.
fn assert_ok_from(resp: &RawResponse, arm: &str, what: &str) -> String {
    assert_eq!(resp.status, 200, "{what}: {resp:?}");
    assert_eq!(
        resp.minor, 1,
        "{what}: HTTP/1.1 response expected: {resp:?}"
    );
    assert_eq!(resp.header(ARM_HEADER), Some(arm), "{what}: {resp:?}");
    assert_eq!(resp.header(FAKE_HEADER), Some(arm), "{what}: {resp:?}");
    resp.text()
}

/// The `(upstream, uri)` an `echo_headers` upstream saw, from its JSON body.
fn echoed(resp: &RawResponse) -> (String, String) {
    let json: serde_json::Value = serde_json::from_slice(&resp.body)
        .unwrap_or_else(|e| panic!("echo body is not JSON ({e}): {resp:?}"));
    (
        json["upstream"].as_str().unwrap_or_default().to_string(),
        json["uri"].as_str().unwrap_or_default().to_string(),
    )
}

// ---------------------------------------------------------------------------------------------
// Proxy set-up
// ---------------------------------------------------------------------------------------------

/// A user the 90/10 split sends to the stable arm, and one it sends to the canary.
fn users() -> (String, String) {
    (
        user_in_bucket_range(1000..10000),
        user_in_bucket_range(0..1000),
    )
}

/// Listeners on ephemeral ports, timeouts long enough that only an explicit close ends a
/// connection within [`CLOSE_DEADLINE`].
fn base_config() -> ConfigBuilder {
    ConfigBuilder::new()
        .set("listen", "header_read_timeout", &q("30s"))
        .set("listen", "idle_timeout", &q("60s"))
}

/// canaryd with `stable` at 90 % and `canary` at 10 %.
/// What the request-body tests start from.
struct Setup {
    stable: FakeUpstream,
    /// Answers with the number of request-body bytes it read.
    canary: FakeUpstream,
    /// Held so the proxy runs until the test ends.
    _proxy: Proxy,
    stable_user: String,
    canary_user: String,
    /// A raw connection to the proxy, nothing sent yet.
    conn: RawClient,
}

async fn counting_setup() -> Setup {
    let stable = FakeUpstream::start("stable").await;
    let canary = FakeUpstream::builder("canary").count_body().start().await;
    let proxy = proxy_for(&stable, &canary).await;
    let (stable_user, canary_user) = users();
    let conn = RawClient::connect(proxy.addr()).await;
    Setup {
        stable,
        canary,
        _proxy: proxy,
        stable_user,
        canary_user,
        conn,
    }
}

async fn proxy_for(stable: &FakeUpstream, canary: &FakeUpstream) -> Proxy {
    proxy_with(base_config(), stable, canary).await
}

async fn proxy_with(cfg: ConfigBuilder, stable: &FakeUpstream, canary: &FakeUpstream) -> Proxy {
    let cfg = cfg
        .upstream("stable", &stable.url(), "90")
        .upstream("canary", &canary.url(), "10");
    Proxy::start(&cfg.build()).await
}

// ---------------------------------------------------------------------------------------------
// A scripted raw upstream (exact response bytes: no date, trailers, large bodies, 204/304)
// ---------------------------------------------------------------------------------------------

/// An HTTP/1.1 upstream on raw TCP that answers each request with the bytes `respond` makes
/// from its path, on keep-alive connections. Stopped on drop.
struct ScriptedUpstream {
    addr: SocketAddr,
    requests: Arc<AtomicUsize>,
    tasks: Arc<Mutex<Vec<AbortHandle>>>,
}

impl ScriptedUpstream {
    async fn start(respond: fn(&str) -> Vec<u8>) -> ScriptedUpstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind scripted upstream");
        let addr = listener.local_addr().expect("scripted upstream addr");
        let requests = Arc::new(AtomicUsize::new(0));
        let tasks = Arc::new(Mutex::new(Vec::new()));
        let accept = {
            let (requests, tasks) = (requests.clone(), tasks.clone());
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let conn = tokio::spawn(scripted_conn(stream, respond, requests.clone()));
                    tasks.lock().expect("task list").push(conn.abort_handle());
                }
            })
        };
        tasks.lock().expect("task list").push(accept.abort_handle());
        ScriptedUpstream {
            addr,
            requests,
            tasks,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for ScriptedUpstream {
    fn drop(&mut self) {
        for task in self.tasks.lock().expect("task list").drain(..) {
            task.abort();
        }
    }
}

/// Serves one upstream connection: requests without bodies or with a `Content-Length` one.
async fn scripted_conn(
    mut stream: TcpStream,
    respond: fn(&str) -> Vec<u8>,
    count: Arc<AtomicUsize>,
) {
    let _ = stream.set_nodelay(true);
    let mut buf = Vec::new();
    loop {
        let end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i + 4;
            }
            buf.reserve(16 * 1024);
            match stream.read_buf(&mut buf).await {
                Ok(n) if n > 0 => {}
                _ => return,
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end);
        let path = head.split(' ').nth(1).unwrap_or_default().to_string();
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (n, v) = l.split_once(':')?;
                n.trim()
                    .eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        while buf.len() < length {
            buf.reserve(16 * 1024);
            match stream.read_buf(&mut buf).await {
                Ok(n) if n > 0 => {}
                _ => return,
            }
        }
        buf.drain(..length);
        count.fetch_add(1, Ordering::SeqCst);
        if stream.write_all(&respond(&path)).await.is_err() {
            return;
        }
    }
}

/// Size of the `/big` body.
const BIG: usize = 4 * 1024 * 1024 + 7;
/// Chunk sizes of the `/big-chunked` body: tiny, under, at and over 16 KiB, and very large.
const CHUNKS: [usize; 7] = [1, 100, 16 * 1024, 16 * 1024 + 1, 70_000, 1, 1024 * 1024];

/// What the scripted upstream answers: no `date` field in any response.
fn scripted(path: &str) -> Vec<u8> {
    let head = |status: &str, fields: &[(&str, String)]| {
        let mut out = format!("HTTP/1.1 {status}\r\n");
        for (n, v) in fields {
            out.push_str(&format!("{n}: {v}\r\n"));
        }
        out.push_str("\r\n");
        out.into_bytes()
    };
    match path {
        "/big" => {
            let body = data(1, BIG);
            let mut out = head(
                "200 OK",
                &[
                    ("content-type", "application/octet-stream".into()),
                    ("content-length", body.len().to_string()),
                ],
            );
            out.extend_from_slice(&body);
            out
        }
        "/big-chunked" => {
            let mut out = head(
                "200 OK",
                &[
                    ("content-type", "application/octet-stream".into()),
                    ("transfer-encoding", "chunked".into()),
                ],
            );
            for (i, size) in CHUNKS.iter().enumerate() {
                out.extend_from_slice(format!("{size:x}\r\n").as_bytes());
                out.extend_from_slice(&data(10 + i as u64, *size));
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b"0\r\n\r\n");
            out
        }
        "/trailers" => {
            let mut out = head(
                "200 OK",
                &[
                    ("content-type", "text/plain".into()),
                    ("transfer-encoding", "chunked".into()),
                    ("trailer", "x-checksum".into()),
                ],
            );
            out.extend_from_slice(b"8\r\ntrailers\r\n0\r\nx-checksum: 42\r\n\r\n");
            out
        }
        "/no-content" => head("204 No Content", &[("x-kind", "none".into())]),
        // A 304 may carry the representation's length; it still has no body.
        "/not-modified" => head(
            "304 Not Modified",
            &[("etag", "\"v1\"".into()), ("content-length", "10".into())],
        ),
        path => {
            let body = format!("hello {path}");
            let mut out = head(
                "200 OK",
                &[
                    ("content-type", "text/plain".into()),
                    ("content-length", body.len().to_string()),
                ],
            );
            out.extend_from_slice(body.as_bytes());
            out
        }
    }
}

/// canaryd in front of one scripted upstream taking all traffic.
async fn scripted_proxy() -> (ScriptedUpstream, Proxy) {
    let up = ScriptedUpstream::start(scripted).await;
    let cfg = base_config().upstream("only", &up.url(), "100");
    let proxy = Proxy::start(&cfg.build()).await;
    (up, proxy)
}

// ---------------------------------------------------------------------------------------------
// Date
// ---------------------------------------------------------------------------------------------

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Seconds since the epoch of an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), checking the
/// exact format and the weekday.
fn parse_imf_fixdate(s: &str) -> Option<i64> {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    let parts: Vec<&str> = s.split(' ').collect();
    let [weekday, day, month, year, time, "GMT"] = parts.as_slice() else {
        return None;
    };
    let weekday = weekday.strip_suffix(',')?;
    if day.len() != 2 || year.len() != 4 || time.len() != 8 {
        return None;
    }
    let day: i64 = day.parse().ok()?;
    let month = MONTHS.iter().position(|m| m == month)? as i64 + 1;
    let year: i64 = year.parse().ok()?;
    let hms: Vec<i64> = time
        .split(':')
        .map(|t| t.parse().ok())
        .collect::<Option<_>>()?;
    let [h, m, sec] = hms.as_slice() else {
        return None;
    };
    let days = days_from_civil(year, month, day);
    if WEEKDAYS[days.rem_euclid(7) as usize] != weekday {
        return None;
    }
    Some(days * 86_400 + h * 3600 + m * 60 + sec)
}

/// Asserts exactly one `date` field, a valid IMF-fixdate within a few seconds of now.
fn assert_fresh_date(resp: &RawResponse, what: &str) {
    let dates = resp.all("date");
    assert_eq!(dates.len(), 1, "{what}: exactly one date field: {resp:?}");
    let at = parse_imf_fixdate(dates[0])
        .unwrap_or_else(|| panic!("{what}: date {:?} is not an IMF-fixdate", dates[0]));
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64;
    assert!(
        (at - now).abs() <= 5,
        "{what}: date {:?} is {} s from now",
        dates[0],
        at - now
    );
}

#[test]
fn imf_fixdate_parser_matches_known_dates() {
    assert_eq!(
        parse_imf_fixdate("Sun, 06 Nov 1994 08:49:37 GMT"),
        Some(784_111_777)
    );
    assert_eq!(parse_imf_fixdate("Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
    // Wrong weekday, obsolete formats.
    assert_eq!(parse_imf_fixdate("Mon, 06 Nov 1994 08:49:37 GMT"), None);
    assert_eq!(parse_imf_fixdate("Sunday, 06-Nov-94 08:49:37 GMT"), None);
    assert_eq!(parse_imf_fixdate("Sun Nov  6 08:49:37 1994"), None);
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order_and_the_connection_stays_open() {
    let stable = FakeUpstream::builder("stable").echo_headers().start().await;
    let canary = FakeUpstream::builder("canary").echo_headers().start().await;
    let proxy = proxy_for(&stable, &canary).await;
    let (stable_user, canary_user) = users();

    let mut conn = RawClient::connect(proxy.addr()).await;
    // Two requests in one write, to different arms, so a swap cannot go unnoticed.
    conn.write(format!(
        "{}{}",
        get("/first", &stable_user),
        get("/second?n=2", &canary_user)
    ))
    .await;
    let first = conn.response(false).await;
    let second = conn.response(false).await;
    assert_ok_from(&first, "stable", "first pipelined GET");
    assert_eq!(echoed(&first), ("stable".to_string(), "/first".to_string()));
    assert_ok_from(&second, "canary", "second pipelined GET");
    assert_eq!(
        echoed(&second),
        ("canary".to_string(), "/second?n=2".to_string())
    );
    for resp in [&first, &second] {
        assert!(
            !resp.says_close(),
            "keep-alive response says close: {resp:?}"
        );
        assert!(
            resp.header("content-length").is_some(),
            "a Full upstream body is framed by length: {resp:?}"
        );
    }

    // The connection is still open for a third request.
    let third = conn.exchange(get("/third", &stable_user)).await;
    assert_ok_from(&third, "stable", "GET after the pipelined pair");
    assert_eq!(echoed(&third).1, "/third");
    assert_eq!(stable.requests(), 2);
    assert_eq!(canary.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_request_bodies_are_split_at_their_content_length() {
    let mut s = counting_setup().await;

    // A body that looks like a request: only its Content-Length says where it ends.
    let tricky = get("/smuggled", &s.canary_user);
    let mut batch = post("/a", &s.canary_user, b"hello");
    batch.extend(post("/b", &s.canary_user, tricky.as_bytes()));
    batch.extend(post("/c", &s.canary_user, b""));
    batch.extend(get("/d", &s.canary_user).into_bytes());
    s.conn.write(&batch).await;
    let expected = [
        "5".to_string(),
        tricky.len().to_string(),
        "0".into(),
        "0".into(),
    ];
    for (i, count) in expected.iter().enumerate() {
        let resp = s.conn.response(false).await;
        assert_eq!(
            &assert_ok_from(&resp, "canary", &format!("pipelined request {i}")),
            count,
            "request {i}: body bytes the upstream counted"
        );
    }
    assert_eq!(s.canary.requests(), 4, "exactly the four requests sent");
    assert_eq!(s.stable.requests(), 0);
    let again = s.conn.exchange(post("/e", &s.canary_user, b"xyz")).await;
    assert_eq!(
        assert_ok_from(&again, "canary", "POST after the batch"),
        "3"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_mid_connection_is_served_and_the_connection_keeps_serving() {
    let mut s = counting_setup().await;

    let before = s.conn.exchange(get("/before", &s.stable_user)).await;
    assert_eq!(assert_ok_from(&before, "stable", "GET before"), "stable");

    let pieces: [&[u8]; 3] = [b"hello ", &[b'x'; 5000], b" world"];
    let total: usize = pieces.iter().map(|p| p.len()).sum();
    let upload = s
        .conn
        .exchange(post_chunked("/upload", &s.canary_user, &pieces))
        .await;
    assert_eq!(
        assert_ok_from(&upload, "canary", "chunked POST"),
        total.to_string()
    );
    assert_eq!(
        s.canary.body_bytes(),
        total as u64,
        "upstream got the whole body"
    );

    // The same connection serves on: a GET, and a POST with a Content-Length body.
    let after = s.conn.exchange(get("/after", &s.stable_user)).await;
    assert_eq!(assert_ok_from(&after, "stable", "GET after"), "stable");
    let sized = s
        .conn
        .exchange(post("/sized", &s.canary_user, b"0123456789"))
        .await;
    assert_eq!(assert_ok_from(&sized, "canary", "POST after"), "10");
    assert_eq!(s.stable.requests(), 2);
    assert_eq!(s.canary.requests(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_post_and_a_get_in_one_write_are_both_answered() {
    let mut s = counting_setup().await;

    // Everything read before the hand-off (the pipelined GET too) must reach hyper.
    let mut batch = get("/first", &s.stable_user).into_bytes();
    batch.extend(post_chunked("/upload", &s.canary_user, &[b"abc", b"defgh"]));
    batch.extend(get("/last", &s.stable_user).into_bytes());
    s.conn.write(&batch).await;
    let first = s.conn.response(false).await;
    assert_eq!(assert_ok_from(&first, "stable", "GET before"), "stable");
    let upload = s.conn.response(false).await;
    assert_eq!(assert_ok_from(&upload, "canary", "chunked POST"), "8");
    let last = s.conn.response(false).await;
    assert_eq!(assert_ok_from(&last, "stable", "GET after"), "stable");
    assert_eq!(s.stable.requests(), 2);
    assert_eq!(s.canary.requests(), 1);
    assert_eq!(s.canary.body_bytes(), 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_content_length_body_arriving_in_two_writes_reaches_the_upstream_whole() {
    let mut s = counting_setup().await;

    let first = s.conn.exchange(get("/first", &s.stable_user)).await;
    assert_eq!(assert_ok_from(&first, "stable", "GET before"), "stable");

    let body = data(7, 100_000);
    let request = post("/upload", &s.canary_user, &body);
    let split = request.len() - body.len() / 2;
    s.conn.write(&request[..split]).await;
    // The head is forwarded while the rest of the body is still on its way; only then does
    // the rest come.
    poll_until(DEADLINE, "the upstream to get the request head", || async {
        (s.canary.requests() == 1).then_some(())
    })
    .await;
    tokio::task::yield_now().await;
    s.conn.write(&request[split..]).await;
    let resp = s.conn.response(false).await;
    assert_eq!(
        assert_ok_from(&resp, "canary", "POST in two writes"),
        body.len().to_string()
    );
    assert_eq!(s.canary.body_bytes(), body.len() as u64);

    let after = s.conn.exchange(get("/after", &s.stable_user)).await;
    assert_eq!(assert_ok_from(&after, "stable", "GET after"), "stable");
    assert_eq!(s.stable.requests(), 2);
    assert_eq!(s.canary.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_gets_its_interim_response_then_the_body_is_forwarded() {
    let mut s = counting_setup().await;

    let first = s.conn.exchange(get("/first", &s.stable_user)).await;
    assert_eq!(assert_ok_from(&first, "stable", "GET before"), "stable");

    s.conn
        .write(format!(
            "POST /upload HTTP/1.1\r\nHost: canaryd.test\r\nx-user-id: {}\r\n\
         content-length: 11\r\nexpect: 100-continue\r\n\r\n",
            s.canary_user
        ))
        .await;
    let interim = s.conn.head().await;
    assert_eq!(interim.status, 100, "headers: {:?}", interim.headers);
    s.conn.write(b"hello world").await;
    let resp = s.conn.response(false).await;
    assert_eq!(assert_ok_from(&resp, "canary", "POST after 100"), "11");
    assert_eq!(s.canary.body_bytes(), 11);

    let after = s.conn.exchange(get("/after", &s.stable_user)).await;
    assert_eq!(assert_ok_from(&after, "stable", "GET after"), "stable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_close_from_the_client_is_honoured() {
    let stable = FakeUpstream::start("stable").await;
    let canary = FakeUpstream::start("canary").await;
    let proxy = proxy_for(&stable, &canary).await;
    let (stable_user, _) = users();

    // One keep-alive request first: the close is not a property of the connection.
    let mut conn = RawClient::connect(proxy.addr()).await;
    let first = conn.exchange(get("/first", &stable_user)).await;
    assert_eq!(assert_ok_from(&first, "stable", "keep-alive GET"), "stable");
    assert!(!first.says_close(), "{first:?}");

    // A request asking to close, and one pipelined behind it that must not be served.
    conn.write(format!(
        "GET /closing HTTP/1.1\r\nHost: canaryd.test\r\nx-user-id: {stable_user}\r\n\
         Connection: close\r\n\r\n{}",
        get("/never", &stable_user)
    ))
    .await;
    let resp = conn.response(false).await;
    assert_eq!(assert_ok_from(&resp, "stable", "GET with close"), "stable");
    assert!(
        resp.says_close(),
        "the response must say connection: close: {resp:?}"
    );
    conn.expect_closed("after a Connection: close request")
        .await;
    assert_eq!(
        stable.requests(),
        2,
        "the request after the close must not be forwarded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_responses_have_the_headers_and_no_body() {
    let stable = FakeUpstream::start("stable").await;
    let canary = FakeUpstream::start("canary").await;
    let proxy = proxy_for(&stable, &canary).await;
    let (stable_user, _) = users();
    let mut conn = RawClient::connect(proxy.addr()).await;

    let head_request =
        format!("HEAD /h HTTP/1.1\r\nHost: canaryd.test\r\nx-user-id: {stable_user}\r\n\r\n");
    conn.write(&head_request).await;
    let resp = conn.response(true).await;
    assert_ok_from(&resp, "stable", "HEAD");
    assert_eq!(resp.header("content-type"), Some("text/plain"), "{resp:?}");
    assert_eq!(
        resp.header("content-length"),
        Some("6"),
        "HEAD keeps the length the GET would have: {resp:?}"
    );
    assert!(
        resp.header("transfer-encoding").is_none(),
        "no chunked framing on a HEAD response: {resp:?}"
    );

    // No body bytes were left on the wire: the next response starts right here.
    let get_resp = conn.exchange(get("/g", &stable_user)).await;
    assert_eq!(
        assert_ok_from(&get_resp, "stable", "GET after HEAD"),
        "stable"
    );

    // HEAD and GET pipelined: the GET's response follows the HEAD's head directly.
    conn.write(format!("{head_request}{}", get("/g2", &stable_user)))
        .await;
    let resp = conn.response(true).await;
    assert_ok_from(&resp, "stable", "pipelined HEAD");
    let get_resp = conn.response(false).await;
    assert_eq!(
        assert_ok_from(&get_resp, "stable", "GET pipelined after HEAD"),
        "stable"
    );
    assert_eq!(stable.requests(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_content_and_not_modified_responses_have_no_body() {
    let (up, proxy) = scripted_proxy().await;
    let mut conn = RawClient::connect(proxy.addr()).await;
    let plain = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: canaryd.test\r\n\r\n");

    let resp = conn.exchange(plain("/no-content")).await;
    assert_eq!(resp.status, 204, "{resp:?}");
    assert_eq!(resp.header("x-kind"), Some("none"), "{resp:?}");
    assert!(
        resp.header("transfer-encoding").is_none() && resp.header("content-length").is_none(),
        "a 204 has no framing fields: {resp:?}"
    );
    let next = conn.exchange(plain("/one")).await;
    assert_eq!(next.status, 200, "GET after a 204: {next:?}");
    assert_eq!(next.text(), "hello /one");

    let resp = conn.exchange(plain("/not-modified")).await;
    assert_eq!(resp.status, 304, "{resp:?}");
    assert_eq!(resp.header("etag"), Some("\"v1\""), "{resp:?}");
    assert!(
        resp.header("transfer-encoding").is_none(),
        "a 304 is not chunked: {resp:?}"
    );
    let next = conn.exchange(plain("/two")).await;
    assert_eq!(next.status, 200, "GET after a 304: {next:?}");
    assert_eq!(next.text(), "hello /two");
    assert_eq!(up.requests(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_response_body_arrives_intact() {
    let (up, proxy) = scripted_proxy().await;
    let mut conn = RawClient::connect(proxy.addr()).await;
    let plain = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: canaryd.test\r\n\r\n");

    let resp = conn.exchange(plain("/big")).await;
    assert_eq!(resp.status, 200, "{:?}", resp.headers);
    assert!(
        !resp.chunked,
        "a response with a length keeps it: {:?}",
        resp.headers
    );
    assert_eq!(
        resp.header("content-length"),
        Some(BIG.to_string().as_str()),
        "{:?}",
        resp.headers
    );
    assert_eq!(resp.body.len(), BIG);
    assert!(
        resp.body == data(1, BIG),
        "the 4 MiB body differs from the upstream's"
    );

    // Chunked from the upstream, in chunks of every size class: re-chunked, same bytes.
    let resp = conn.exchange(plain("/big-chunked")).await;
    assert_eq!(resp.status, 200, "{:?}", resp.headers);
    assert!(resp.chunked, "no length known: chunked: {:?}", resp.headers);
    let expected: Vec<u8> = CHUNKS
        .iter()
        .enumerate()
        .flat_map(|(i, size)| data(10 + i as u64, *size))
        .collect();
    assert_eq!(resp.body.len(), expected.len());
    assert!(
        resp.body == expected,
        "the chunked body differs from the upstream's"
    );

    let next = conn.exchange(plain("/after")).await;
    assert_eq!(next.status, 200, "{next:?}");
    assert_eq!(next.text(), "hello /after");
    assert_eq!(up.requests(), 3);
}

/// A gated event stream (`events` events, the first sent at once) from the stable arm,
/// requested on a new connection whose response head has been read.
struct EventStream {
    stable: FakeUpstream,
    canary: FakeUpstream,
    proxy: Proxy,
    conn: RawClient,
    head: Head,
    /// A user the canary arm serves.
    canary_user: String,
}

async fn event_stream(events: usize) -> EventStream {
    let stable = FakeUpstream::builder("stable")
        .sse_gated(events)
        .start()
        .await;
    let canary = FakeUpstream::start("canary").await;
    let proxy = proxy_for(&stable, &canary).await;
    let (stable_user, canary_user) = users();
    let mut conn = RawClient::connect(proxy.addr()).await;
    conn.write(get("/events", &stable_user)).await;
    let head = conn.head().await;
    assert_eq!(head.status, 200, "{:?}", head.headers);
    EventStream {
        stable,
        canary,
        proxy,
        conn,
        head,
        canary_user,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_response_is_chunked_and_each_event_sent_as_it_comes() {
    const EVENTS: usize = 3;
    let EventStream {
        stable,
        canary: _canary,
        proxy: _proxy,
        mut conn,
        head,
        canary_user,
    } = event_stream(EVENTS).await;
    let field = |name: &str| {
        head.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        field("transfer-encoding"),
        ["chunked"],
        "{:?}",
        head.headers
    );
    assert!(field("content-length").is_empty(), "{:?}", head.headers);
    assert_eq!(
        field("content-type"),
        ["text/event-stream"],
        "{:?}",
        head.headers
    );
    assert_eq!(field(ARM_HEADER), ["stable"], "{:?}", head.headers);

    // Each event reaches the client before the upstream is allowed to send the next.
    let mut got = Vec::new();
    for i in 0..EVENTS {
        if i > 0 {
            stable.release_chunks(1);
        }
        let want: Vec<u8> = (0..=i)
            .flat_map(|j| stable.sse_event(j).into_bytes())
            .collect();
        while got.len() < want.len() {
            match conn.chunk().await {
                Chunk::Data(data) => {
                    assert!(!data.is_empty(), "a zero-size chunk ends the body early");
                    got.extend(data);
                }
                Chunk::End(_) => {
                    panic!("body ended after {} of {EVENTS} events: {}", i, lossy(&got))
                }
            }
        }
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(&want),
            "events 0..={i}"
        );
    }
    match conn.chunk().await {
        Chunk::End(trailers) => assert!(trailers.is_empty(), "{trailers:?}"),
        Chunk::Data(data) => panic!("more than {EVENTS} events: {}", lossy(&data)),
    }

    // The chunked body ended exactly: the next response follows.
    let next = conn.exchange(get("/next", &canary_user)).await;
    assert_eq!(
        assert_ok_from(&next, "canary", "GET after the stream"),
        "canary"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_trailers_reach_the_client() {
    let (up, proxy) = scripted_proxy().await;
    let mut conn = RawClient::connect(proxy.addr()).await;
    let resp = conn
        .exchange("GET /trailers HTTP/1.1\r\nHost: canaryd.test\r\nTE: trailers\r\n\r\n")
        .await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert!(resp.chunked, "{resp:?}");
    assert_eq!(resp.text(), "trailers");
    assert_eq!(
        resp.trailers,
        [("x-checksum".to_string(), "42".to_string())],
        "{resp:?}"
    );
    let next = conn
        .exchange("GET /after HTTP/1.1\r\nHost: canaryd.test\r\n\r\n")
        .await;
    assert_eq!(next.text(), "hello /after", "{next:?}");
    assert_eq!(up.requests(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_carry_exactly_one_valid_date() {
    // An upstream that sends no date: canaryd adds one.
    let (up, proxy) = scripted_proxy().await;
    let mut conn = RawClient::connect(proxy.addr()).await;
    for path in ["/a", "/b"] {
        let resp = conn
            .exchange(format!("GET {path} HTTP/1.1\r\nHost: canaryd.test\r\n\r\n"))
            .await;
        assert_eq!(resp.status, 200, "{resp:?}");
        assert_fresh_date(&resp, &format!("GET {path} from an upstream without date"));
    }
    assert_eq!(up.requests(), 2);

    // An upstream that sends its own (hyper does): kept, not doubled.
    let stable = FakeUpstream::start("stable").await;
    let canary = FakeUpstream::start("canary").await;
    let proxy = proxy_for(&stable, &canary).await;
    let (stable_user, _) = users();
    let mut conn = RawClient::connect(proxy.addr()).await;
    let resp = conn.exchange(get("/", &stable_user)).await;
    assert_ok_from(&resp, "stable", "GET from an upstream with date");
    assert_fresh_date(&resp, "GET from an upstream with date");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_1_0_requests_are_served_and_their_connections_closed() {
    let stable = FakeUpstream::start("stable").await;
    let canary = FakeUpstream::start("canary").await;
    let proxy = proxy_for(&stable, &canary).await;
    let (stable_user, canary_user) = users();

    let mut conn = RawClient::connect(proxy.addr()).await;
    conn.write(format!(
        "GET /old HTTP/1.0\r\nx-user-id: {stable_user}\r\n\r\n"
    ))
    .await;
    let resp = conn.response(false).await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.header(ARM_HEADER), Some("stable"), "{resp:?}");
    assert_eq!(resp.text(), "stable");
    conn.expect_closed("after an HTTP/1.0 request without keep-alive")
        .await;
    assert_eq!(stable.requests(), 1);

    // HTTP/1.0 with keep-alive, then HTTP/1.1 on the same connection.
    let mut conn = RawClient::connect(proxy.addr()).await;
    let resp = conn
        .exchange(format!(
            "GET /old HTTP/1.0\r\nConnection: keep-alive\r\nx-user-id: {canary_user}\r\n\r\n"
        ))
        .await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.header(ARM_HEADER), Some("canary"), "{resp:?}");
    assert_eq!(resp.text(), "canary");
    assert!(!resp.says_close(), "{resp:?}");
    let next = conn.exchange(get("/new", &stable_user)).await;
    assert_eq!(
        assert_ok_from(&next, "stable", "HTTP/1.1 after 1.0"),
        "stable"
    );
    assert_eq!(stable.requests(), 2);
    assert_eq!(canary.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_heads_over_max_header_bytes_get_431_and_are_never_forwarded() {
    /// The smallest `listen.max_header_bytes` the config accepts.
    const LIMIT: usize = 8192;
    let stable = FakeUpstream::start("stable").await;
    let canary = FakeUpstream::start("canary").await;
    let cfg = base_config().set("listen", "max_header_bytes", &LIMIT.to_string());
    let proxy = proxy_with(cfg, &stable, &canary).await;
    let (stable_user, _) = users();
    // A GET whose head is exactly `size` bytes.
    let head_of = |size: usize| {
        let bare = format!(
            "GET /big-head HTTP/1.1\r\nHost: canaryd.test\r\nx-user-id: {stable_user}\r\n\
             x-pad: \r\n\r\n"
        );
        assert!(size >= bare.len());
        let head = bare.replace(
            "x-pad: ",
            &format!("x-pad: {}", "p".repeat(size - bare.len())),
        );
        assert_eq!(head.len(), size);
        head
    };

    // Under the limit: served.
    let mut conn = RawClient::connect(proxy.addr()).await;
    let resp = conn.exchange(head_of(LIMIT - 1024)).await;
    assert_eq!(
        assert_ok_from(&resp, "stable", "head under the limit"),
        "stable"
    );
    assert_eq!(stable.requests(), 1);

    // Over it, in one write or two, HTTP/1.1 (canaryd's server side first) or HTTP/1.0
    // (handed to hyper at once): 431, never forwarded. Every case is tried before the
    // verdict, so a failure lists them all.
    let mut outcomes = Vec::new();
    for (size, split, version) in [
        (LIMIT + 1, None, "1.1"),
        (LIMIT + 500, None, "1.1"),
        (LIMIT + 4000, None, "1.1"),
        (LIMIT + 4000, Some(LIMIT - 2000), "1.1"),
        (2 * LIMIT + 1, None, "1.1"),
        (3 * LIMIT, None, "1.1"),
        (LIMIT + 1, None, "1.0"),
        (LIMIT + 500, None, "1.0"),
    ] {
        let head = head_of(size).replacen("HTTP/1.1", &format!("HTTP/{version}"), 1);
        let forwarded_before = stable.requests() + canary.requests();
        let mut conn = RawClient::connect(proxy.addr()).await;
        match split {
            None => conn.write(&head).await,
            Some(at) => {
                conn.write(&head[..at]).await;
                tokio::task::yield_now().await;
                conn.write(&head[at..]).await;
            }
        }
        let resp = conn.response(false).await;
        let forwarded = stable.requests() + canary.requests() - forwarded_before;
        outcomes.push((size, split, version, resp.status, forwarded));
    }
    let wrong: Vec<String> = outcomes
        .iter()
        .filter(|(_, _, _, status, forwarded)| *status != 431 || *forwarded != 0)
        .map(|(size, split, version, status, forwarded)| {
            format!(
                "HTTP/{version} {size}-byte head (limit {LIMIT}), written {}: status {status}, \
                 forwarded {forwarded} time(s)",
                match split {
                    None => "in one write".to_string(),
                    Some(at) => format!("in two writes split at byte {at}"),
                }
            )
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "request heads over max_header_bytes must get 431 and never be forwarded:\n  {}",
        wrong.join("\n  ")
    );

    // The proxy keeps serving.
    let mut conn = RawClient::connect(proxy.addr()).await;
    let resp = conn.exchange(get("/after", &stable_user)).await;
    assert_eq!(
        assert_ok_from(&resp, "stable", "GET after the 431s"),
        "stable"
    );
}

#[tokio::test]
async fn a_request_pipelined_while_a_streamed_response_waits_is_answered_after_it() {
    const EVENTS: usize = 2;
    let EventStream {
        stable,
        canary,
        proxy: _proxy,
        mut conn,
        canary_user,
        ..
    } = event_stream(EVENTS).await;
    let mut got = Vec::new();
    let first = stable.sse_event(0).into_bytes();
    while got.len() < first.len() {
        match conn.chunk().await {
            Chunk::Data(data) => got.extend(data),
            Chunk::End(_) => panic!("the stream ended early: {}", lossy(&got)),
        }
    }
    // The response waits on its upstream while the next request arrives: it is read ahead
    // (watching the client) and kept for after the stream.
    conn.write(get("/after", &canary_user)).await;
    stable.release_chunks(1);
    let want: Vec<u8> = (0..EVENTS)
        .flat_map(|j| stable.sse_event(j).into_bytes())
        .collect();
    while let Chunk::Data(data) = conn.chunk().await {
        got.extend(data);
    }
    assert_eq!(lossy(&got), lossy(&want));
    let next = conn.response(false).await;
    assert_eq!(
        assert_ok_from(&next, "canary", "the request pipelined during the stream"),
        "canary"
    );
    assert_eq!(canary.paths(), ["/after"]);
}

/// An upstream that never finishes an answer: to `GET /quiet` it sends nothing at all, to any
/// other request a head promising 100 bytes and 10 of them. It counts the request heads it
/// read and the connections the proxy closed.
struct StallingUpstream {
    addr: SocketAddr,
    heads: Arc<AtomicUsize>,
    closed: Arc<AtomicUsize>,
    task: AbortHandle,
}

async fn stalling_upstream() -> StallingUpstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let heads = Arc::new(AtomicUsize::new(0));
    let closed = Arc::new(AtomicUsize::new(0));
    let (head_count, close_count) = (heads.clone(), closed.clone());
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let (heads, closed) = (head_count.clone(), close_count.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut piece = [0u8; 4096];
                while find(&buf, b"\r\n\r\n").is_none() {
                    match stream.read(&mut piece).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&piece[..n]),
                    }
                }
                heads.fetch_add(1, Ordering::SeqCst);
                if !buf.starts_with(b"GET /quiet ") {
                    let _ = stream
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789")
                        .await;
                }
                // Hold the connection until the proxy closes it.
                loop {
                    match stream.read(&mut piece).await {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
                closed.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    StallingUpstream {
        addr,
        heads,
        closed,
        task: task.abort_handle(),
    }
}

/// One proxied arm, `stable`, at `addr`; `request_timeout` far beyond the test's deadlines, so
/// only the client's leaving can end a request in time.
async fn patient_proxy_to(addr: SocketAddr) -> Proxy {
    Proxy::start(
        &base_config()
            .set("listen", "request_timeout", &q("120s"))
            .upstream("stable", &format!("http://{addr}"), "100")
            .build(),
    )
    .await
}

impl StallingUpstream {
    /// The client leaves the proxy: it closes its sending side (FIN), or resets (RST). The
    /// proxy then closes its `closed`th connection to this upstream, because the client left.
    async fn sees_the_client_leave(&self, mut conn: RawClient, reset: bool, closed: usize) {
        if reset {
            // Deprecated because a lingering close blocks the thread; a zero linger resets at
            // once instead, which is the point here.
            #[allow(deprecated)]
            conn.stream
                .set_linger(Some(Duration::ZERO))
                .expect("SO_LINGER");
            drop(conn);
        } else {
            conn.stream.shutdown().await.expect("shutdown");
        }
        poll_until(DEADLINE, "the upstream connection to close", || async {
            (self.closed.load(Ordering::SeqCst) == closed).then_some(())
        })
        .await;
    }

    /// Once the clients left, `proxy` has no request in flight and counted no failure of
    /// this upstream; then it stops.
    async fn nothing_left_in(self, proxy: &Proxy) {
        let m = proxy.admin_client().metrics().await;
        assert_eq!(m.sum("canaryd_requests_in_flight", &[]), 0.0);
        assert_eq!(
            m.sum("canaryd_upstream_failures_total", &[]),
            0.0,
            "a client that leaves is not the arm's failure"
        );
        self.task.abort();
    }
}

#[tokio::test]
async fn a_client_that_leaves_while_the_upstream_stalls_mid_body_ends_the_upstream_exchange() {
    let upstream = stalling_upstream().await;
    let proxy = patient_proxy_to(upstream.addr).await;
    // A client that closes its side (FIN), and one that resets (RST, SO_LINGER 0).
    for (i, reset) in [false, true].into_iter().enumerate() {
        let mut conn = RawClient::connect(proxy.addr()).await;
        conn.write("GET /stall HTTP/1.1\r\nHost: canaryd.test\r\n\r\n")
            .await;
        let head = conn.head().await;
        assert_eq!(head.status, 200, "{:?}", head.headers);
        // What the head's read took of the body first.
        let mut got: Vec<u8> = conn.buf.drain(..).collect();
        while got.len() < 10 {
            let mut piece = [0u8; 64];
            let n = tokio::time::timeout(DEADLINE, conn.stream.read(&mut piece))
                .await
                .expect("the first bytes in time")
                .expect("read");
            assert!(n > 0, "closed after {}", lossy(&got));
            got.extend_from_slice(&piece[..n]);
        }
        assert_eq!(lossy(&got), lossy(b"0123456789"));
        // The upstream would send nothing more, ever.
        upstream.sees_the_client_leave(conn, reset, i + 1).await;
    }
    upstream.nothing_left_in(&proxy).await;
}

#[tokio::test]
async fn a_client_that_leaves_before_the_response_head_ends_the_upstream_exchange() {
    let upstream = stalling_upstream().await;
    let proxy = patient_proxy_to(upstream.addr).await;
    for (i, reset) in [false, true].into_iter().enumerate() {
        let mut conn = RawClient::connect(proxy.addr()).await;
        conn.write("GET /quiet HTTP/1.1\r\nHost: canaryd.test\r\n\r\n")
            .await;
        poll_until(DEADLINE, "the upstream to hold the request", || async {
            (upstream.heads.load(Ordering::SeqCst) == i + 1).then_some(())
        })
        .await;
        // No head would ever come, and request_timeout is minutes away.
        upstream.sees_the_client_leave(conn, reset, i + 1).await;
    }
    upstream.nothing_left_in(&proxy).await;
}
