//! canaryd attacked by hostile clients and upstreams, over real sockets: malformed framing,
//! request smuggling through `Expect: 100-continue`, `Content-Length` and `Host` tricks,
//! CONNECT and asterisk-form targets, 1-byte chunks, transfer codings, trailers, oversized
//! response heads, and client faults that must never be blamed on the canary.
//!
//! Both arms are [`Upstreams`], raw-TCP HTTP/1.1 servers that record every byte canaryd sends
//! them, so each test states exactly what an upstream must (or must never) receive; what
//! canaryd must send for a request is computed by [`expected_head`] from the client's request.

mod common;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use http::{Request, Version};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

/// How long any one read or write may take.
const DEADLINE: Duration = Duration::from_secs(10);
/// How long a "nothing more happens" check watches.
const QUIET: Duration = Duration::from_millis(300);
/// The default upstream answer.
const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
/// Sent after a refused request on the same connection: once it is answered (or the
/// connection is closed), canaryd is done with everything sent before it.
const SENTINEL: &str = "GET /sentinel HTTP/1.1\r\nHost: a.test\r\n\r\n";

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn lossy(bytes: &[u8]) -> String {
    const SHOW: usize = 1500;
    let shown = String::from_utf8_lossy(&bytes[..bytes.len().min(SHOW)]).into_owned();
    if bytes.len() > SHOW {
        format!("{shown:?}... ({} bytes)", bytes.len())
    } else {
        format!("{shown:?}")
    }
}

/// The header fields of a head (request or status line first), names lower-cased, values
/// without surrounding blanks.
fn fields(head: &[u8]) -> Vec<(String, String)> {
    String::from_utf8_lossy(head)
        .split("\r\n")
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| {
            (
                n.to_ascii_lowercase(),
                v.trim_matches([' ', '\t']).to_string(),
            )
        })
        .collect()
}

/// The values of `name` among `fields`.
fn values<'a>(fields: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    fields
        .iter()
        .filter(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
        .collect()
}

/// A chunked body decoded from the start of a buffer.
struct Dechunked {
    /// Bytes it takes on the wire.
    len: usize,
    data: Vec<u8>,
    /// Data chunks (the last, empty chunk not counted).
    chunks: usize,
    /// The last chunk and the trailer section, raw: `0\r\n...\r\n`.
    last: Vec<u8>,
}

/// Decodes a chunked body at the start of `b`: `Ok(None)` while incomplete.
fn dechunk(b: &[u8]) -> Result<Option<Dechunked>, String> {
    let (mut at, mut data, mut chunks) = (0, Vec::new(), 0);
    loop {
        let Some(eol) = find(&b[at..], b"\r\n").map(|i| at + i) else {
            return Ok(None);
        };
        let line = String::from_utf8_lossy(&b[at..eol]);
        let size = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size, 16)
            .map_err(|_| format!("invalid chunk-size line {line:?}"))?;
        if size == 0 {
            let mut end = eol + 2;
            loop {
                let Some(e) = find(&b[end..], b"\r\n").map(|i| end + i) else {
                    return Ok(None);
                };
                if e == end {
                    return Ok(Some(Dechunked {
                        len: e + 2,
                        data,
                        chunks,
                        last: b[at..e + 2].to_vec(),
                    }));
                }
                end = e + 2;
            }
        }
        let end = eol + 2 + size;
        if b.len() < end + 2 {
            return Ok(None);
        }
        if &b[end..end + 2] != b"\r\n" {
            return Err(format!("chunk of {size} bytes not followed by CRLF"));
        }
        data.extend_from_slice(&b[eol + 2..end]);
        chunks += 1;
        at = end + 2;
    }
}

/// How the body after a request head is framed, as a lenient recipient reads it.
enum BodyLen {
    None,
    Length(usize),
    Chunked,
}

fn body_len(head: &[u8]) -> BodyLen {
    let f = fields(head);
    let chunked = values(&f, "transfer-encoding").last().is_some_and(|te| {
        te.rsplit(',')
            .next()
            .is_some_and(|c| c.trim().eq_ignore_ascii_case("chunked"))
    });
    let length = values(&f, "content-length")
        .first()
        .and_then(|v| v.parse().ok());
    match (chunked, length) {
        (true, _) => BodyLen::Chunked,
        (false, Some(n)) => BodyLen::Length(n),
        (false, None) => BodyLen::None,
    }
}

// ---------------------------------------------------------------------------------------------
// What canaryd must send upstream
// ---------------------------------------------------------------------------------------------

/// The upstream request head canaryd must send (to an HTTP/1.1 upstream, from a client on
/// 127.0.0.1 over plain HTTP) for the client request whose head starts `req`:
///
/// - `METHOD TARGET HTTP/1.1`, an absolute-form target reduced to path and query;
/// - the client's fields in order, names lower-cased, values unchanged, without the
///   hop-by-hop ones (`connection`, `keep-alive`, `proxy-connection`, `te` unless it is
///   `trailers`, `trailer`, `transfer-encoding`, `upgrade`, `proxy-authorization`,
///   `proxy-authenticate`, and those named in `Connection`), `content-length`, `expect` and
///   the client's `x-forwarded-*`; `host` stays where it was, carrying the target's
///   authority for an absolute-form target;
/// - `x-forwarded-for: 127.0.0.1`, `x-forwarded-proto: http`, `x-forwarded-host: <host>`;
/// - `transfer-encoding: chunked` for a chunked body, else `content-length: N` (canonical)
///   when the client sent a length, else nothing;
/// - the blank line.
fn expected_head(req: &[u8]) -> Vec<u8> {
    const DROPPED: [&str; 13] = [
        "connection",
        "keep-alive",
        "proxy-connection",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
        "content-length",
        "expect",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
    ];
    let end = find(req, b"\r\n\r\n").expect("a complete request head") + 4;
    let head = &req[..end];
    let text = String::from_utf8_lossy(head);
    let mut words = text.split("\r\n").next().unwrap_or("").split(' ');
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let absolute = target
        .strip_prefix("http://")
        .or_else(|| target.strip_prefix("https://"))
        .map(|rest| {
            let cut = rest.find(['/', '?']).unwrap_or(rest.len());
            let path = &rest[cut..];
            let path = if path.starts_with('/') {
                path.to_string()
            } else {
                format!("/{path}")
            };
            (rest[..cut].to_string(), path)
        });
    let target = absolute.as_ref().map_or(target, |(_, p)| p.as_str());
    let f = fields(head);
    let named: Vec<String> = values(&f, "connection")
        .iter()
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect();
    let host = absolute
        .as_ref()
        .map(|(a, _)| a.clone())
        .or_else(|| values(&f, "host").first().map(|h| h.to_string()));
    let mut out = format!("{method} {target} HTTP/1.1\r\n");
    for (name, value) in &f {
        if DROPPED.contains(&name.as_str())
            || named.contains(name)
            || (name == "te" && !value.eq_ignore_ascii_case("trailers"))
        {
            continue;
        }
        let value = match (name.as_str(), &host) {
            ("host", Some(h)) => h.as_str(),
            _ => value.as_str(),
        };
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str("x-forwarded-for: 127.0.0.1\r\nx-forwarded-proto: http\r\n");
    if let Some(h) = &host {
        out.push_str(&format!("x-forwarded-host: {h}\r\n"));
    }
    match body_len(head) {
        BodyLen::Chunked => out.push_str("transfer-encoding: chunked\r\n"),
        BodyLen::Length(n) => out.push_str(&format!("content-length: {n}\r\n")),
        BodyLen::None => {}
    }
    out.push_str("\r\n");
    out.into_bytes()
}

#[test]
fn expected_head_follows_the_forwarding_rules() {
    let req = b"POST /u?x=1 HTTP/1.1\r\nHost: a.test\r\nConnection: keep-alive, X-Secret\r\n\
                X-Secret: s\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nExpect: 100-continue\r\n\
                X-Forwarded-For: 10.0.0.1\r\nProxy-Authorization: Basic eA==\r\n\
                Content-Type:  text/plain \r\nContent-Length: 005\r\n\r\nhello";
    assert_eq!(
        lossy(&expected_head(req)),
        lossy(
            b"POST /u?x=1 HTTP/1.1\r\nhost: a.test\r\nte: trailers\r\ncontent-type: text/plain\r\n\
              x-forwarded-for: 127.0.0.1\r\nx-forwarded-proto: http\r\nx-forwarded-host: a.test\r\n\
              content-length: 5\r\n\r\n"
        )
    );
    let req = b"GET http://evil.test?q=1 HTTP/1.1\r\nTE: gzip\r\nHost: good.test\r\n\r\n";
    assert_eq!(
        lossy(&expected_head(req)),
        lossy(
            b"GET /?q=1 HTTP/1.1\r\nhost: evil.test\r\nx-forwarded-for: 127.0.0.1\r\n\
              x-forwarded-proto: http\r\nx-forwarded-host: evil.test\r\n\r\n"
        )
    );
}

// ---------------------------------------------------------------------------------------------
// Recording upstreams
// ---------------------------------------------------------------------------------------------

/// How the upstreams answer each request.
#[derive(Clone)]
enum Answer {
    /// These bytes, once the whole request (head and body) has been read.
    Raw(Vec<u8>),
    /// `200 OK` whose body is the request target, once the whole request has been read.
    Echo,
    /// These bytes right after the head, before reading the body (which is read after).
    Early(Vec<u8>),
}

/// One request as an upstream received it, decoded afterwards from the recorded bytes.
#[derive(Clone, Debug)]
struct Seen {
    /// `stable` or `canary`: which arm's listener it came to.
    arm: &'static str,
    /// The raw head, through the blank line (or what came of it).
    head: Vec<u8>,
    target: String,
    /// The body, de-chunked if chunked (as much as came).
    body: Vec<u8>,
    /// For a chunked body: the number of data chunks.
    chunks: Option<usize>,
    /// For a chunked body: the last chunk and trailer section, raw.
    last: Vec<u8>,
    /// Head and body arrived whole.
    complete: bool,
}

impl Seen {
    fn field(&self, name: &str) -> Vec<String> {
        values(&fields(&self.head), name)
            .into_iter()
            .map(str::to_string)
            .collect()
    }
}

/// Splits the bytes received on one connection into the requests they hold.
fn decode(arm: &'static str, mut raw: &[u8]) -> Vec<Seen> {
    let mut out = Vec::new();
    while !raw.is_empty() {
        let end = find(raw, b"\r\n\r\n").map_or(raw.len(), |i| i + 4);
        let head = &raw[..end];
        let mut seen = Seen {
            arm,
            head: head.to_vec(),
            target: String::from_utf8_lossy(head)
                .split(' ')
                .nth(1)
                .unwrap_or("")
                .to_string(),
            body: Vec::new(),
            chunks: None,
            last: Vec::new(),
            complete: head.ends_with(b"\r\n\r\n"),
        };
        let rest = &raw[end..];
        let used = match body_len(head) {
            _ if !seen.complete => 0,
            BodyLen::None => 0,
            BodyLen::Length(n) => {
                let k = n.min(rest.len());
                seen.body = rest[..k].to_vec();
                seen.complete = k == n;
                k
            }
            BodyLen::Chunked => match dechunk(rest) {
                Ok(Some(d)) => {
                    seen.body = d.data;
                    seen.chunks = Some(d.chunks);
                    seen.last = d.last;
                    d.len
                }
                _ => {
                    seen.body = rest.to_vec();
                    seen.complete = false;
                    rest.len()
                }
            },
        };
        out.push(seen);
        raw = &rest[used..];
    }
    out
}

type Recorded = Arc<Mutex<Vec<(&'static str, Arc<Mutex<Vec<u8>>>)>>>;

/// Two raw HTTP/1.1 upstreams, `stable` and `canary`, that answer alike and record every
/// byte of every connection. Stopped on drop.
struct Upstreams {
    urls: [String; 2],
    conns: Recorded,
    tasks: Arc<Mutex<Vec<AbortHandle>>>,
}

impl Upstreams {
    async fn start(answer: Answer) -> Upstreams {
        let conns: Recorded = Arc::default();
        let tasks: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let mut urls = Vec::new();
        for arm in ["stable", "canary"] {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            urls.push(format!("http://{}", listener.local_addr().expect("addr")));
            let (conns, all, answer) = (conns.clone(), tasks.clone(), answer.clone());
            let accept = tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let _ = stream.set_nodelay(true);
                    let raw = Arc::new(Mutex::new(Vec::new()));
                    conns.lock().unwrap().push((arm, raw.clone()));
                    let conn = tokio::spawn(serve(stream, raw, answer.clone()));
                    all.lock().unwrap().push(conn.abort_handle());
                }
            });
            tasks.lock().unwrap().push(accept.abort_handle());
        }
        Upstreams {
            urls: [urls[0].clone(), urls[1].clone()],
            conns,
            tasks,
        }
    }

    /// Every request received so far, connection by connection.
    fn requests(&self) -> Vec<Seen> {
        let conns = self.conns.lock().unwrap();
        conns
            .iter()
            .flat_map(|(arm, raw)| decode(arm, &raw.lock().unwrap()))
            .collect()
    }

    /// Requests other than [`SENTINEL`]s.
    fn forwarded(&self) -> Vec<Seen> {
        let mut all = self.requests();
        all.retain(|r| r.target != "/sentinel");
        all
    }

    /// Bytes received, over all connections.
    fn bytes(&self) -> usize {
        let conns = self.conns.lock().unwrap();
        conns.iter().map(|(_, raw)| raw.lock().unwrap().len()).sum()
    }

    /// The one request for `target`, which must have arrived whole.
    fn only(&self, target: &str) -> Seen {
        let found: Vec<Seen> = self
            .requests()
            .into_iter()
            .filter(|r| r.target == target)
            .collect();
        assert!(
            found.len() == 1 && found[0].complete,
            "expected one complete request for {target}; {}",
            self.describe()
        );
        found.into_iter().next().unwrap()
    }

    /// Everything received, for failure messages.
    fn describe(&self) -> String {
        let conns = self.conns.lock().unwrap();
        let mut out = format!("the upstreams accepted {} connection(s)", conns.len());
        for (i, (arm, raw)) in conns.iter().enumerate() {
            out.push_str(&format!(
                "\n  conn {i} ({arm}): {}",
                lossy(&raw.lock().unwrap())
            ));
        }
        out
    }
}

impl Drop for Upstreams {
    fn drop(&mut self) {
        for task in self.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

/// Reads (recording) until `done` finds what it waits for in `buf`; `None` at EOF or error.
async fn read_until<T>(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    raw: &Mutex<Vec<u8>>,
    done: impl Fn(&[u8]) -> Option<T>,
) -> Option<T> {
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        if let Some(n) = done(buf) {
            return Some(n);
        }
        match stream.read(&mut chunk).await {
            Ok(n) if n > 0 => {
                raw.lock().unwrap().extend_from_slice(&chunk[..n]);
                buf.extend_from_slice(&chunk[..n]);
            }
            _ => return None,
        }
    }
}

/// Serves one upstream connection: each request is read whole (chunked bodies too) and
/// answered as `answer` says; anything it cannot read is only recorded.
async fn serve(mut stream: TcpStream, raw: Arc<Mutex<Vec<u8>>>, answer: Answer) {
    let mut buf = Vec::new();
    loop {
        let head_end = |b: &[u8]| find(b, b"\r\n\r\n").map(|i| i + 4);
        let Some(end) = read_until(&mut stream, &mut buf, &raw, head_end).await else {
            return;
        };
        let head: Vec<u8> = buf.drain(..end).collect();
        if let Answer::Early(bytes) = &answer {
            if stream.write_all(bytes).await.is_err() {
                return;
            }
        }
        let used = match body_len(&head) {
            BodyLen::None => Some(0),
            BodyLen::Length(n) => {
                read_until(&mut stream, &mut buf, &raw, |b| (b.len() >= n).then_some(n)).await
            }
            BodyLen::Chunked => {
                let whole = |b: &[u8]| match dechunk(b) {
                    Ok(Some(d)) => Some(Some(d.len)),
                    Ok(None) => None,
                    Err(_) => Some(None),
                };
                read_until(&mut stream, &mut buf, &raw, whole)
                    .await
                    .flatten()
            }
        };
        let Some(used) = used else {
            // EOF, or a body it cannot read: record the rest.
            let _ = read_until(&mut stream, &mut buf, &raw, |_| None::<()>).await;
            return;
        };
        buf.drain(..used);
        let reply = match &answer {
            Answer::Raw(bytes) => bytes.clone(),
            Answer::Early(_) => continue,
            Answer::Echo => {
                let target = String::from_utf8_lossy(&head)
                    .split(' ')
                    .nth(1)
                    .unwrap_or("")
                    .to_string();
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{target}",
                    target.len()
                )
                .into_bytes()
            }
        };
        if stream.write_all(&reply).await.is_err() {
            return;
        }
    }
}

/// The proxy config: `stable` at 90 %, `canary` at 10 %, `x-canary: NAME` forcing an arm.
fn config(up: &Upstreams) -> ConfigBuilder {
    ConfigBuilder::new()
        .set("routing", "override_header", &q("x-canary"))
        .upstream("stable", &up.urls[0], "90")
        .upstream("canary", &up.urls[1], "10")
}

async fn start(answer: Answer) -> (Upstreams, Proxy) {
    let up = Upstreams::start(answer).await;
    let proxy = Proxy::start(&config(&up).build()).await;
    (up, proxy)
}

// ---------------------------------------------------------------------------------------------
// Raw client
// ---------------------------------------------------------------------------------------------

/// A response read off the wire.
#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    /// De-chunked if it was chunked.
    body: Vec<u8>,
    trailers: Vec<(String, String)>,
}

impl Resp {
    fn all(&self, name: &str) -> Vec<&str> {
        values(&self.headers, name)
    }
}

/// Why no (complete) response came.
#[derive(Debug)]
enum NoResp {
    /// The connection was closed (or reset); what had come of the response.
    Closed(String),
    /// Nothing more came within [`DEADLINE`].
    Silent(String),
    /// What came is not a valid HTTP/1.1 response.
    Invalid(String),
}

/// What a request got, for failure messages: the status, `closed` or `silent` (with what
/// came of a response, if anything did).
fn outcome(r: &Result<Resp, NoResp>) -> String {
    let (what, got) = match r {
        Ok(resp) => return resp.status.to_string(),
        Err(NoResp::Closed(got)) => ("closed", got),
        Err(NoResp::Silent(got)) => ("silent", got),
        Err(NoResp::Invalid(why)) => return format!("an invalid response: {why}"),
    };
    if got == "\"\"" {
        what.to_string()
    } else {
        format!("{what} after {got}")
    }
}

/// `{outcome: count}` of several requests.
fn tally(outcomes: &[String]) -> BTreeMap<&str, usize> {
    let mut out = BTreeMap::new();
    for o in outcomes {
        *out.entry(o.as_str()).or_insert(0) += 1;
    }
    out
}

/// A raw TCP connection to the proxy; bytes after one response stay buffered for the next.
struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Client {
        let stream = tokio::time::timeout(DEADLINE, TcpStream::connect(addr))
            .await
            .expect("connect in time")
            .expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        Client {
            stream,
            buf: Vec::new(),
        }
    }

    /// Writes `bytes` in one `write_all`; false if the proxy no longer takes them.
    async fn send(&mut self, bytes: impl AsRef<[u8]>) -> bool {
        let written = tokio::time::timeout(DEADLINE, self.stream.write_all(bytes.as_ref()))
            .await
            .expect("write in time");
        written.is_ok()
    }

    /// Writes `bytes`, the first `split` of them in a write of their own.
    async fn send_split(&mut self, bytes: &[u8], split: Option<usize>) {
        let at = split.unwrap_or(bytes.len());
        if self.send(&bytes[..at]).await && at < bytes.len() {
            tokio::task::yield_now().await;
            self.send(&bytes[at..]).await;
        }
    }

    /// Reads more into the buffer: `Ok(false)` at EOF or reset.
    async fn fill(&mut self) -> Result<bool, NoResp> {
        self.buf.reserve(64 * 1024);
        match tokio::time::timeout(DEADLINE, self.stream.read_buf(&mut self.buf)).await {
            Err(_) => Err(NoResp::Silent(lossy(&self.buf))),
            Ok(Ok(n)) => Ok(n > 0),
            Ok(Err(_)) => Ok(false),
        }
    }

    async fn more(&mut self) -> Result<(), NoResp> {
        match self.fill().await? {
            true => Ok(()),
            false => Err(NoResp::Closed(lossy(&self.buf))),
        }
    }

    /// The next response (an interim `1xx` one included).
    async fn response(&mut self) -> Result<Resp, NoResp> {
        let (status, headers, len) = loop {
            let mut slots = [httparse::EMPTY_HEADER; 128];
            let mut r = httparse::Response::new(&mut slots);
            match r.parse(&self.buf) {
                Ok(httparse::Status::Complete(len)) => {
                    let headers = r
                        .headers
                        .iter()
                        .map(|h| {
                            let v = String::from_utf8_lossy(h.value).into_owned();
                            (h.name.to_ascii_lowercase(), v)
                        })
                        .collect::<Vec<_>>();
                    break (r.code.unwrap_or(0), headers, len);
                }
                Ok(httparse::Status::Partial) => self.more().await?,
                Err(e) => return Err(NoResp::Invalid(format!("head ({e}): {}", lossy(&self.buf)))),
            }
        };
        self.buf.drain(..len);
        let mut resp = Resp {
            status,
            headers,
            body: Vec::new(),
            trailers: Vec::new(),
        };
        if (100..200).contains(&status) || status == 204 || status == 304 {
            return Ok(resp);
        }
        let length = resp.all("content-length").first().map(|v| v.parse());
        if !resp.all("transfer-encoding").is_empty() {
            let d = loop {
                match dechunk(&self.buf) {
                    Ok(Some(d)) => break d,
                    Ok(None) => self.more().await?,
                    Err(e) => return Err(NoResp::Invalid(format!("chunked body ({e}): {resp:?}"))),
                }
            };
            self.buf.drain(..d.len);
            resp.body = d.data;
            resp.trailers = fields(&d.last);
        } else if let Some(n) = length {
            let n: usize = n.map_err(|_| NoResp::Invalid(format!("content-length: {resp:?}")))?;
            while self.buf.len() < n {
                self.more().await?;
            }
            resp.body = self.buf.drain(..n).collect();
        } else {
            while self.fill().await? {}
            resp.body = std::mem::take(&mut self.buf);
        }
        Ok(resp)
    }

    /// Sends [`SENTINEL`] and reads what comes: afterwards canaryd has dealt with everything
    /// sent before on this connection (answered it, or closed the connection).
    async fn settle(&mut self) {
        if self.send(SENTINEL).await {
            let _ = self.response().await;
        }
    }
}

/// Sends `req` on a connection of its own and returns what came back.
async fn exchange(proxy: &Proxy, req: &[u8]) -> Result<Resp, NoResp> {
    let mut c = Client::connect(proxy.addr()).await;
    c.send(req).await;
    c.response().await
}

/// Checks every 20 ms for `duration`; returns the first violation `f` reports, if any.
async fn watch<F, Fut>(duration: Duration, mut f: F) -> Option<String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<String>>,
{
    let end = Instant::now() + duration;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() >= end {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `req` (sent on a connection of its own) gets a 200 and reaches the upstream exactly: the
/// head [`expected_head`] says, then `body`. Returns what the upstream received.
async fn assert_forwarded(
    proxy: &Proxy,
    up: &Upstreams,
    req: &[u8],
    target: &str,
    body: &[u8],
) -> Seen {
    let resp = exchange(proxy, req)
        .await
        .unwrap_or_else(|e| panic!("{}: no response: {e:?}", lossy(req)));
    assert_eq!(resp.status, 200, "{}: {resp:?}", lossy(req));
    let seen = up.only(target);
    assert_eq!(
        lossy(&seen.head),
        lossy(&expected_head(req)),
        "upstream head for {}",
        lossy(req)
    );
    assert_eq!(lossy(&seen.body), lossy(body), "upstream body for {target}");
    seen
}

/// A request canaryd must refuse: its bytes, and where to split them into two writes.
struct Bad {
    what: &'static str,
    bytes: Vec<u8>,
    split: Option<usize>,
}

fn bad(what: &'static str, bytes: &[u8]) -> Bad {
    Bad {
        what,
        bytes: bytes.to_vec(),
        split: None,
    }
}

/// Sends each request on a connection of its own; each must get `status` and never reach an
/// upstream. Returns what went wrong, one line per request.
async fn refusals(proxy: &Proxy, up: &Upstreams, cases: &[Bad], status: u16) -> Vec<String> {
    let mut problems = Vec::new();
    for case in cases {
        let before = up.forwarded().len();
        let mut c = Client::connect(proxy.addr()).await;
        c.send_split(&case.bytes, case.split).await;
        let got = c.response().await;
        c.settle().await;
        let leaked = up.forwarded().len() - before;
        if !matches!(&got, Ok(r) if r.status == status) || leaked > 0 {
            problems.push(format!(
                "{}: want {status} and nothing forwarded, got {} and {leaked} request(s) \
                 forwarded",
                case.what,
                outcome(&got)
            ));
        }
    }
    let total = up.forwarded().len();
    if let Some(late) = watch(QUIET, || async {
        let now = up.forwarded().len();
        (now != total).then(|| format!("{} request(s) forwarded late", now - total))
    })
    .await
    {
        problems.push(late);
    }
    problems
}

fn assert_no_problems(problems: &[String], up: &Upstreams) {
    assert!(
        problems.is_empty(),
        "{} problem(s):\n  {}\n{}",
        problems.len(),
        problems.join("\n  "),
        up.describe()
    );
}

// ---------------------------------------------------------------------------------------------
// 1. Client faults
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_faults_are_never_blamed_on_the_canary() {
    let up = Upstreams::start(Answer::Raw(OK.to_vec())).await;
    let cfg =
        config(&up)
            .set("rollback", "enabled", "true")
            .set("listen", "request_timeout", &q("1s"));
    let proxy = Proxy::start(&cfg.build()).await;
    let admin = proxy.admin_client();
    let post = "POST /p HTTP/1.1\r\nHost: a.test\r\nx-canary: canary\r\n";
    let mut problems = Vec::new();

    // (a) Malformed chunked bodies: 400 each.
    let mut got = Vec::new();
    for _ in 0..25 {
        let req = format!("{post}Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nZZ\r\n");
        got.push(outcome(&exchange(&proxy, req.as_bytes()).await));
    }
    if got.iter().any(|o| o != "400") {
        problems.push(format!(
            "malformed chunked bodies: want 400 each, got {:?}",
            tally(&got)
        ));
    }

    // (b) Uploads cut short by the client: 400 or a close.
    let mut got = Vec::new();
    for _ in 0..25 {
        let mut c = Client::connect(proxy.addr()).await;
        let mut req = format!("{post}Content-Length: 1000\r\n\r\n").into_bytes();
        req.extend(data(1, 500));
        c.send(&req).await;
        let _ = c.stream.shutdown().await;
        got.push(outcome(&c.response().await));
    }
    if got.iter().any(|o| o != "400" && o != "closed") {
        problems.push(format!(
            "aborted uploads: want 400 or a close, got {:?}",
            tally(&got)
        ));
    }

    // (c) Uploads that stall past request_timeout: 408 each.
    let stalls: Vec<_> = (0..3)
        .map(|_| {
            let addr = proxy.addr();
            let req = format!("{post}Content-Length: 100\r\n\r\n0123456789");
            tokio::spawn(async move {
                let mut c = Client::connect(addr).await;
                c.send(req).await;
                outcome(&c.response().await)
            })
        })
        .collect();
    let mut got = Vec::new();
    for stall in stalls {
        got.push(stall.await.expect("stalled upload task"));
    }
    if got.iter().any(|o| o != "408") {
        problems.push(format!(
            "stalled uploads: want 408 each, got {:?}",
            tally(&got)
        ));
    }

    // The canary still serves what is sent to it.
    let after = exchange(
        &proxy,
        b"GET /after HTTP/1.1\r\nHost: a.test\r\nx-canary: canary\r\n\r\n",
    )
    .await;
    match &after {
        Ok(r) if r.status == 200 && r.all(ARM_HEADER) == ["canary"] => {}
        other => problems.push(format!("GET forced to the canary afterwards: {other:?}")),
    }
    let arms: Vec<&str> = up
        .requests()
        .iter()
        .filter(|r| r.target == "/after")
        .map(|r| r.arm)
        .collect();
    if arms != ["canary"] {
        problems.push(format!("GET /after reached {arms:?}, want [\"canary\"]"));
    }

    // Not tripped, now or a moment later (the window task is asynchronous).
    if let Some(trip) = watch(QUIET, || async {
        let w = admin.weights().await;
        w["tripped"]
            .get("canary")
            .map(|t| format!("the canary was tripped: {t}; GET /weights: {w}"))
    })
    .await
    {
        problems.push(trip);
    }

    // Metrics: client errors counted as such, nothing against the canary.
    let enough = |m: &MetricsText| {
        let kind = |k: &str| m.sum("canaryd_client_errors_total", &[("kind", k)]);
        kind("body") == 25.0 && kind("aborted") == 25.0 && kind("timeout") == 3.0
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let m = loop {
        let m = admin.metrics().await;
        if enough(&m) || Instant::now() >= deadline {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    if !enough(&m) {
        problems.push(format!(
            "canaryd_client_errors_total: want body 25, aborted 25, timeout 3 (one per request); got {:?}",
            m.by_label("canaryd_client_errors_total", &[], "kind")
        ));
    }
    let failures: Vec<_> = m
        .series("canaryd_upstream_failures_total", &[("upstream", "canary")])
        .into_iter()
        .filter(|s| s.value > 0.0)
        .collect();
    if !failures.is_empty() {
        problems.push(format!(
            "upstream failures counted for the canary: {failures:?}"
        ));
    }
    let canary = m.by_label(
        "canaryd_requests_total",
        &[("upstream", "canary")],
        "status",
    );
    if canary.contains_key("502") || canary.contains_key("504") {
        problems.push(format!("canary requests by status: {canary:?}"));
    }
    assert!(
        problems.is_empty(),
        "{} problem(s):\n  {}",
        problems.len(),
        problems.join("\n  ")
    );
}

// ---------------------------------------------------------------------------------------------
// 2. Expect: 100-continue
// ---------------------------------------------------------------------------------------------

/// A body that is itself a request.
const SMUGGLED: &[u8] = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";

fn expect_head() -> String {
    format!(
        "POST /up HTTP/1.1\r\nHost: a.test\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        SMUGGLED.len()
    )
}

/// Sends the `Expect: 100-continue` head, reads the 100, sends the body; returns the final
/// response.
async fn expect_continue(proxy: &Proxy) -> (Client, Resp) {
    let mut c = Client::connect(proxy.addr()).await;
    c.send(expect_head()).await;
    let interim = c.response().await.expect("a response to the head");
    assert_eq!(
        interim.status, 100,
        "canaryd must answer 100 Continue: {interim:?}"
    );
    c.send(SMUGGLED).await;
    let resp = c.response().await.expect("the final response");
    (c, resp)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_is_never_forwarded_and_an_early_answer_smuggles_nothing() {
    let unauthorized = b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n";
    let (up, proxy) = start(Answer::Early(unauthorized.to_vec())).await;
    let (mut c, resp) = expect_continue(&proxy).await;
    assert_eq!(resp.status, 401, "{resp:?}");
    c.settle().await;

    let forwarded = up.forwarded();
    assert_eq!(forwarded.len(), 1, "only POST /up: {}", up.describe());
    let seen = &forwarded[0];
    assert_eq!(seen.target, "/up", "{}", up.describe());
    assert_eq!(
        lossy(&seen.head),
        lossy(&expected_head(expect_head().as_bytes()))
    );
    assert!(
        SMUGGLED.starts_with(&seen.body),
        "after the head only (part of) the body may follow: {}",
        up.describe()
    );
    let late = watch(QUIET, || async {
        up.requests()
            .iter()
            .any(|r| r.target == "/smuggled")
            .then(|| up.describe())
    })
    .await;
    assert_eq!(late, None, "the body was forwarded as a request of its own");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_body_reaches_the_upstream_byte_for_byte() {
    let (up, proxy) = start(Answer::Raw(OK.to_vec())).await;
    let (_c, resp) = expect_continue(&proxy).await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.body, b"ok");
    let seen = up.only("/up");
    let mut want = expected_head(expect_head().as_bytes());
    want.extend_from_slice(SMUGGLED);
    let mut got = seen.head.clone();
    got.extend_from_slice(&seen.body);
    assert_eq!(lossy(&got), lossy(&want));
    assert_eq!(up.forwarded().len(), 1, "{}", up.describe());
}

// ---------------------------------------------------------------------------------------------
// 3. Content-Length
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_content_length_gets_400_and_is_never_forwarded() {
    let (up, proxy) = start(Answer::Raw(OK.to_vec())).await;
    let nbsp = b"POST /cl HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\xc2\xa0\r\n\r\nhello";
    let cases = [
        bad("`Content-Length: 5<NBSP>` in one write", nbsp),
        Bad {
            what: "`Content-Length: 5<NBSP>` split inside the value",
            bytes: nbsp.to_vec(),
            split: find(nbsp, b"\xa0"),
        },
        bad(
            "`Content-Length: 5` and `Content-Length: 6`",
            b"POST /cl HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n\
              hello!",
        ),
        bad(
            "`Content-Length: +5`",
            b"POST /cl HTTP/1.1\r\nHost: a.test\r\nContent-Length: +5\r\n\r\nhello",
        ),
        bad(
            "`Transfer-Encoding: chunked` and `Content-Length`",
            b"POST /cl HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\
              Content-Length: 5\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ),
    ];
    let problems = refusals(&proxy, &up, &cases, 400).await;
    assert_no_problems(&problems, &up);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_or_zero_padded_content_length_is_forwarded_once_canonically() {
    let (up, proxy) = start(Answer::Raw(OK.to_vec())).await;
    let twice = b"POST /twice HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\n\
                  Content-Length: 5\r\n\r\nhello";
    let seen = assert_forwarded(&proxy, &up, twice, "/twice", b"hello").await;
    assert_eq!(seen.field("content-length"), ["5"]);
    let padded = b"POST /padded HTTP/1.1\r\nHost: a.test\r\nContent-Length: 005\r\n\r\nhello";
    let seen = assert_forwarded(&proxy, &up, padded, "/padded", b"hello").await;
    assert_eq!(seen.field("content-length"), ["5"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_upstream_content_length_reaches_the_client_once() {
    let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 2\r\n\r\nok";
    let (_up, proxy) = start(Answer::Raw(answer.to_vec())).await;
    let resp = exchange(&proxy, b"GET /r HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await
        .expect("a response");
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.all("content-length"), ["2"], "{resp:?}");
    assert_eq!(resp.body, b"ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_upstream_responses_get_502() {
    let big = format!(
        "HTTP/1.1 200 OK\r\nx-big: {}\r\ncontent-length: 2\r\n\r\nok",
        "a".repeat(70_000)
    );
    let cases: [(&str, Vec<u8>); 3] = [
        (
            "`content-length: 2<NBSP>`",
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\xc2\xa0\r\n\r\nok".to_vec(),
        ),
        (
            "`transfer-encoding: gzip, chunked`",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
                .to_vec(),
        ),
        ("a 70 KB response head", big.into_bytes()),
    ];
    let mut problems = Vec::new();
    for (what, answer) in cases {
        let (_up, proxy) = start(Answer::Raw(answer)).await;
        let got = exchange(&proxy, b"GET /r HTTP/1.1\r\nHost: a.test\r\n\r\n").await;
        if !matches!(&got, Ok(r) if r.status == 502) {
            problems.push(format!(
                "upstream answering {what}: want 502, got {}",
                outcome(&got)
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// 4. Host
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_host_gets_400_and_is_never_forwarded() {
    let (up, proxy) = start(Answer::Raw(OK.to_vec())).await;
    let cases = [
        bad(
            "two Host fields",
            b"GET /h HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n",
        ),
        bad(
            "HTTP/1.1 without Host",
            b"GET /h HTTP/1.1\r\nx-a: 1\r\n\r\n",
        ),
        bad(
            "`Host: a.test/evil?x`",
            b"GET /h HTTP/1.1\r\nHost: a.test/evil?x\r\n\r\n",
        ),
        bad(
            "`Host: a.test evil.test`",
            b"GET /h HTTP/1.1\r\nHost: a.test evil.test\r\n\r\n",
        ),
        bad(
            "`Host: user@a.test`",
            b"GET /h HTTP/1.1\r\nHost: user@a.test\r\n\r\n",
        ),
    ];
    let problems = refusals(&proxy, &up, &cases, 400).await;
    assert_no_problems(&problems, &up);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_form_target_sends_its_authority_as_host() {
    let (up, proxy) = start(Answer::Raw(OK.to_vec())).await;
    let req = b"GET http://evil.test/p?q=1 HTTP/1.1\r\nHost: good.test\r\n\r\n";
    assert_eq!(
        lossy(&expected_head(req)),
        lossy(
            b"GET /p?q=1 HTTP/1.1\r\nhost: evil.test\r\nx-forwarded-for: 127.0.0.1\r\n\
              x-forwarded-proto: http\r\nx-forwarded-host: evil.test\r\n\r\n"
        )
    );
    assert_forwarded(&proxy, &up, req, "/p?q=1", b"").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_authority_and_host_must_agree_and_authority_becomes_host() {
    let (up, proxy) = start(Answer::Raw(OK.to_vec())).await;
    let tcp = TcpStream::connect(proxy.addr()).await.expect("connect");
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("h2c handshake");
    tokio::spawn(conn);
    let mut status_of = |uri: &str, host: Option<&str>| {
        let mut req = Request::builder()
            .method("GET")
            .uri(uri)
            .version(Version::HTTP_2);
        if let Some(h) = host {
            req = req.header("host", h);
        }
        let sent = send.send_request(req.body(empty()).expect("request"));
        async move {
            let resp = tokio::time::timeout(DEADLINE, sent)
                .await
                .expect("response in time")
                .expect("h2 response");
            let status = resp.status().as_u16();
            let _ = tokio::time::timeout(DEADLINE, resp.into_body().collect()).await;
            status
        }
    };

    let conflict = status_of("http://a.test/h2-conflict", Some("b.test")).await;
    let authority = status_of("http://a.test:8443/h2-authority", None).await;
    assert_eq!(
        conflict,
        400,
        ":authority a.test with host b.test; {}",
        up.describe()
    );
    let leaked = up.requests().iter().any(|r| r.target == "/h2-conflict");
    assert!(
        !leaked,
        "the conflicting request was forwarded: {}",
        up.describe()
    );
    assert_eq!(authority, 200, "{}", up.describe());
    let seen = up.only("/h2-authority");
    assert!(
        seen.head.starts_with(b"GET /h2-authority HTTP/1.1\r\n"),
        "{}",
        lossy(&seen.head)
    );
    assert_eq!(seen.field("host"), ["a.test:8443"], "{}", lossy(&seen.head));
    assert_eq!(
        seen.field("x-forwarded-host"),
        ["a.test:8443"],
        "{}",
        lossy(&seen.head)
    );
}

// ---------------------------------------------------------------------------------------------
// 5. Request targets
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_gets_405_and_the_upstream_hears_nothing() {
    let (up, proxy) = start(Answer::Raw(OK.to_vec())).await;
    let got = exchange(
        &proxy,
        b"CONNECT evil.test:443 HTTP/1.1\r\nHost: evil.test:443\r\n\r\n",
    )
    .await;
    assert!(
        matches!(&got, Ok(r) if r.status == 405),
        "CONNECT: want 405, got {got:?}; {}",
        up.describe()
    );
    let heard = watch(QUIET, || async { (up.bytes() > 0).then(|| up.describe()) }).await;
    assert_eq!(heard, None, "the upstream heard of the CONNECT");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asterisk_form_is_refused_for_get_and_forwarded_for_options() {
    let (up, proxy) = start(Answer::Raw(OK.to_vec())).await;
    let cases = [bad("`GET *`", b"GET * HTTP/1.1\r\nHost: a.test\r\n\r\n")];
    let problems = refusals(&proxy, &up, &cases, 400).await;
    assert_no_problems(&problems, &up);
    let seen = assert_forwarded(
        &proxy,
        &up,
        b"OPTIONS * HTTP/1.1\r\nHost: a.test\r\n\r\n",
        "*",
        b"",
    )
    .await;
    assert!(seen.head.starts_with(b"OPTIONS * HTTP/1.1\r\n"));
}

// ---------------------------------------------------------------------------------------------
// 6. Tiny chunks
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_byte_chunks_reach_the_upstream_batched() {
    const CHUNKS: usize = 10_000;
    let (up, proxy) = start(Answer::Raw(OK.to_vec())).await;
    let payload = data(6, CHUNKS);
    let mut req =
        b"POST /chunks HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for byte in &payload {
        req.extend_from_slice(b"1\r\n");
        req.push(*byte);
        req.extend_from_slice(b"\r\n");
    }
    let mut c = Client::connect(proxy.addr()).await;
    c.send(&req).await;
    c.send(b"0\r\n\r\n").await;
    let resp = c.response().await.expect("a response");
    assert_eq!(resp.status, 200, "{resp:?}");

    let seen = up.only("/chunks");
    assert_eq!(lossy(&seen.head), lossy(&expected_head(&req)));
    assert!(
        seen.body == payload,
        "the upstream got other bytes than the client sent"
    );
    let chunks = seen.chunks.expect("a chunked body");
    assert!(
        chunks <= 100,
        "{CHUNKS} one-byte chunks went upstream as {chunks} chunks (at most 100 expected)"
    );
    assert_eq!(lossy(&seen.last), lossy(b"0\r\n\r\n"));
}

// ---------------------------------------------------------------------------------------------
// 7. Transfer codings and trailers
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_transfer_codings_get_501_and_are_never_forwarded() {
    let (up, proxy) = start(Answer::Raw(OK.to_vec())).await;
    let cases = [
        bad(
            "`Transfer-Encoding: gzip, chunked`",
            b"POST /te HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: gzip, chunked\r\n\r\n\
              5\r\nhello\r\n0\r\n\r\n",
        ),
        bad(
            "`Transfer-Encoding: identity`",
            b"POST /te HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: identity\r\n\r\nhello",
        ),
    ];
    let problems = refusals(&proxy, &up, &cases, 501).await;
    assert_no_problems(&problems, &up);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_trailers_are_forwarded_only_when_announced_and_harmless() {
    let (up, proxy) = start(Answer::Raw(OK.to_vec())).await;
    let announced = b"POST /announced HTTP/1.1\r\nHost: a.test\r\nTrailer: x-checksum\r\n\
                      Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nx-checksum: 1\r\n\
                      content-length: 9\r\nhost: evil\r\nset-cookie: a=b\r\n\r\n";
    let seen = assert_forwarded(&proxy, &up, announced, "/announced", b"hello").await;
    assert_eq!(lossy(&seen.last), lossy(b"0\r\nx-checksum: 1\r\n\r\n"));

    let unannounced = b"POST /unannounced HTTP/1.1\r\nHost: a.test\r\n\
                        Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nx-checksum: 1\r\n\r\n";
    let seen = assert_forwarded(&proxy, &up, unannounced, "/unannounced", b"hello").await;
    assert_eq!(lossy(&seen.last), lossy(b"0\r\n\r\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_trailers_reach_the_client_only_when_announced_and_harmless() {
    let answer = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-checksum\r\n\r\n\
                   2\r\nok\r\n0\r\nx-checksum: 42\r\nset-cookie: a=b\r\ncontent-length: 5\r\n\r\n";
    let (_up, proxy) = start(Answer::Raw(answer.to_vec())).await;
    let resp = exchange(
        &proxy,
        b"GET /t HTTP/1.1\r\nHost: a.test\r\nTE: trailers\r\n\r\n",
    )
    .await
    .expect("a response");
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.body, b"ok");
    assert_eq!(
        resp.trailers,
        [("x-checksum".to_string(), "42".to_string())],
        "{resp:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 8. Pipelining
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_pipelined_behind_a_chunked_post_is_forwarded_exactly_and_answered_in_order() {
    let (up, proxy) = start(Answer::Echo).await;
    let post = b"POST /first HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n\
                 5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
    let get = b"GET /next HTTP/1.1\r\nHost: a.test\r\n\r\n";
    let mut c = Client::connect(proxy.addr()).await;
    c.send([&post[..], &get[..]].concat()).await;
    for target in ["/first", "/next"] {
        let resp = c.response().await.expect("a response");
        assert_eq!(resp.status, 200, "{target}: {resp:?}");
        assert_eq!(
            lossy(&resp.body),
            lossy(target.as_bytes()),
            "answered in order"
        );
    }

    let first = up.only("/first");
    assert_eq!(lossy(&first.head), lossy(&expected_head(post)));
    assert_eq!(lossy(&first.body), lossy(b"hello world"));
    assert_eq!(lossy(&first.last), lossy(b"0\r\n\r\n"));
    let next = up.only("/next");
    assert_eq!(lossy(&next.head), lossy(&expected_head(get)));
    assert!(next.body.is_empty());
    assert_eq!(up.forwarded().len(), 2, "{}", up.describe());
}

/// The same blame rule when the arm speaks HTTP/2 (hyper's client reads the body on a task of
/// its own): an upload that stalls past `request_timeout` is the client's 408, not the arm's
/// 504.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_upload_to_an_http2_arm_is_the_clients_timeout() {
    let stable = FakeUpstream::builder("stable").start().await;
    let canary = FakeUpstream::builder("canary").count_body().start().await;
    let proxy = Proxy::start(
        &ConfigBuilder::new()
            .set("routing", "override_header", &q("x-canary"))
            .set("listen", "request_timeout", &q("1s"))
            .upstream("stable", &stable.url(), "90")
            .upstream("canary", &canary.url(), "10")
            .upstream_set("http2", "true")
            .build(),
    )
    .await;
    let mut c = Client::connect(proxy.addr()).await;
    c.send(
        "POST /up HTTP/1.1\r\nHost: a.test\r\nx-canary: canary\r\nContent-Length: 100\r\n\r\n\
         0123456789",
    )
    .await;
    assert_eq!(outcome(&c.response().await), "408");
    let m = proxy.admin_client().metrics().await;
    assert_eq!(
        m.sum("canaryd_client_errors_total", &[("kind", "timeout")]),
        1.0
    );
    assert_eq!(
        m.sum("canaryd_upstream_failures_total", &[("upstream", "canary")]),
        0.0,
        "the stall is not the arm's"
    );
}
