//! canaryd's request parser against httparse and hyper's HTTP/1.1 server, on the corpus of
//! `tests/http1_corpus`: canaryd must accept (serve itself) no request that either refuses,
//! must decode no request body that hyper refuses or decodes differently, and refuses only
//! with 400, 417, 431 or 501.
//!
//! "hyper accepts" means its service was called for the first request: the service drains
//! the body and answers 200, so any other first answer (400, 414, 431, 501, none at all) is
//! hyper refusing the request. hyper runs as canaryd runs it (`max_buf_size` at the request
//! head limit), on one end of an in-memory duplex stream; the request is written, the write
//! side shut down, and everything hyper answers read back.

mod http1_corpus;

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use canaryd::http1::chunked::{ChunkedDecoder, Step};
use canaryd::http1::head::{self, ParsedRequest};
use canaryd::http1::BodyLength;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use http1_corpus::MAX_HEAD;

/// What canaryd makes of a request: the head's verdict, and the first body when it is read
/// to its end from the bytes there are.
#[derive(Debug, Clone, PartialEq)]
enum Canaryd {
    Complete {
        body: Option<Result<Vec<u8>, String>>,
    },
    Partial,
    HandOff,
    Reject(u16),
}

fn canaryd(bytes: &[u8]) -> Canaryd {
    let mut buf = BytesMut::from(bytes);
    match head::parse_request(&mut buf, MAX_HEAD) {
        ParsedRequest::Partial => Canaryd::Partial,
        ParsedRequest::HandOff => Canaryd::HandOff,
        ParsedRequest::Reject(r) => Canaryd::Reject(r.status.as_u16()),
        ParsedRequest::Complete(h) => {
            let body = match h.body {
                BodyLength::Empty => Some(Ok(vec![])),
                BodyLength::Length(n) => {
                    (buf.len() as u64 >= n).then(|| Ok(buf[..n as usize].to_vec()))
                }
                BodyLength::Chunked => {
                    let mut d = ChunkedDecoder::new(h.trailer);
                    let mut data = Vec::new();
                    loop {
                        match d.next(&mut buf, usize::MAX) {
                            Ok(Step::Data(b)) => data.extend_from_slice(&b),
                            Ok(Step::End(_)) => break Some(Ok(data)),
                            Ok(Step::Partial) => break None,
                            Err(e) => break Some(Err(e.to_string())),
                        }
                    }
                }
            };
            Canaryd::Complete { body }
        }
    }
}

/// Whether httparse (default config, 100 header slots as canaryd and hyper have) parses a
/// complete request head.
fn httparse_accepts(bytes: &[u8]) -> bool {
    let mut headers = [httparse::EMPTY_HEADER; 100];
    let mut req = httparse::Request::new(&mut headers);
    matches!(
        httparse::ParserConfig::default().parse_request(&mut req, bytes),
        Ok(httparse::Status::Complete(_))
    )
}

/// What hyper made of a request.
#[derive(Debug, Clone)]
struct Hyper {
    /// The first response's status, if it answered at all.
    status: Option<u16>,
    /// The bodies the service drained, in order: the data, or why it broke.
    bodies: Vec<Result<Vec<u8>, String>>,
    /// It did not finish within the timeout.
    timed_out: bool,
}

impl Hyper {
    /// Its service answered the first request.
    fn accepts(&self) -> bool {
        self.status == Some(200) && !self.bodies.is_empty()
    }
}

async fn hyper(bytes: Vec<u8>) -> Hyper {
    let (mut client, server) = tokio::io::duplex(1 << 20);
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let seen = bodies.clone();
    let service = service_fn(move |req: Request<Incoming>| {
        let seen = seen.clone();
        async move {
            let body = match req.into_body().collect().await {
                Ok(b) => Ok(b.to_bytes().to_vec()),
                Err(e) => Err(e.to_string()),
            };
            seen.lock().expect("lock").push(body);
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
        }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .half_close(true)
        .max_buf_size(MAX_HEAD);
    let conn = builder.serve_connection(TokioIo::new(server), service);
    let task = tokio::spawn(conn);
    let exchange = async {
        // hyper may close before reading everything: a failed write is an answer too.
        let _ = client.write_all(&bytes).await;
        let _ = client.shutdown().await;
        let mut answer = Vec::new();
        let _ = client.read_to_end(&mut answer).await;
        answer
    };
    let (answer, timed_out) = match tokio::time::timeout(Duration::from_secs(10), exchange).await {
        Ok(a) => (a, false),
        Err(_) => (Vec::new(), true),
    };
    task.abort();
    let status = first_final_status(&answer);
    let bodies = bodies.lock().expect("lock").clone();
    Hyper {
        status,
        bodies,
        timed_out,
    }
}

/// The status of the first response that is not an interim (1xx) one.
fn first_final_status(mut answer: &[u8]) -> Option<u16> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 100];
        let mut resp = httparse::Response::new(&mut headers);
        let httparse::Status::Complete(len) = resp.parse(answer).ok()? else {
            return None;
        };
        let code = resp.code?;
        if !(100..200).contains(&code) || code == 101 {
            return Some(code);
        }
        answer = &answer[len..];
    }
}

fn show_body(b: &Option<Result<Vec<u8>, String>>) -> String {
    match b {
        None => "unfinished".into(),
        Some(Ok(d)) => format!("{} bytes", d.len()),
        Some(Err(e)) => format!("error: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn canaryd_accepts_nothing_httparse_or_hyper_refuses() {
    let corpus = http1_corpus::corpus();
    let runs: Vec<_> = corpus
        .iter()
        .map(|c| tokio::spawn(hyper(c.bytes.clone())))
        .collect();
    let mut table = String::new();
    let _ = writeln!(
        table,
        "{:<56} {:<26} {:<9} {:<8} hyper's first body",
        "request", "canaryd (first body)", "httparse", "hyper"
    );
    let mut problems = Vec::new();
    for (case, run) in corpus.iter().zip(runs) {
        let h = run.await.expect("the hyper task");
        let c = canaryd(&case.bytes);
        let hp = httparse_accepts(&case.bytes);
        let c_text = match &c {
            Canaryd::Complete { body } => format!("Complete ({})", show_body(body)),
            other => format!("{other:?}"),
        };
        let h_text = match (h.status, h.timed_out) {
            (_, true) => "timeout".to_owned(),
            (Some(s), _) if h.accepts() => format!("{s} ok"),
            (Some(s), _) => format!("{s}"),
            (None, _) => "closed".to_owned(),
        };
        let _ = writeln!(
            table,
            "{:<56} {:<26} {:<9} {:<8} {}",
            case.name,
            c_text,
            if hp { "accepts" } else { "refuses" },
            h_text,
            h.bodies
                .first()
                .map_or("-".into(), |b| show_body(&Some(b.clone()))),
        );
        match &c {
            Canaryd::Complete { body } => {
                if !hp {
                    problems.push(format!("{}: canaryd accepts, httparse refuses", case.name));
                }
                if !h.accepts() {
                    problems.push(format!(
                        "{}: canaryd accepts, hyper refuses ({h_text})",
                        case.name
                    ));
                }
                match (body, h.bodies.first()) {
                    (Some(Ok(mine)), Some(Ok(theirs))) if mine != theirs => problems.push(format!(
                        "{}: the bodies differ: canaryd {:?}, hyper {:?}",
                        case.name,
                        String::from_utf8_lossy(mine),
                        String::from_utf8_lossy(theirs)
                    )),
                    (Some(Ok(_)), Some(Err(e))) => problems.push(format!(
                        "{}: canaryd decodes the body, hyper refuses it ({e})",
                        case.name
                    )),
                    _ => {}
                }
            }
            Canaryd::Reject(status) if ![400, 417, 431, 501].contains(status) => {
                problems.push(format!("{}: refused with {status}", case.name));
            }
            _ => {}
        }
    }
    println!("{table}");
    assert!(
        problems.is_empty(),
        "{} disagreements:\n{}\n\n{table}",
        problems.len(),
        problems.join("\n")
    );
}
