//! `server_conn`: canaryd's HTTP/1.1 server side, as far as it can be reached from outside
//! the crate. The connection itself (`h1_server::serve`) is private and needs a whole proxy,
//! so this target replays its read loop with the same public pieces and the same rules:
//! `head::parse_request` on a buffer that grows by fuzz-sized reads; then the body, framed by
//! `Content-Length` or chunked (`ChunkedDecoder::next`, small chunks gathered with
//! `decode_into` into 16 KiB pieces, as the server does), handed over through
//! `body::streamed`'s bounded queue to a consumer (the proxy's side) that takes it at a
//! fuzz-chosen pace or drops it; then the next pipelined request, until a head is handed over
//! or refused, a body breaks, the client asked to close, or the bytes run out. It does not
//! cover the socket, timeouts, the response side or the hand-off to hyper.
//!
//! Input: a read-size byte, a consumer-pace byte, then what the client sends. Checks: no
//! panic; the consumer gets exactly the data handed over, in order, then the body's end; a
//! body never yields more than the bytes it took from the wire, nor more than its
//! `Content-Length` (and exactly that when complete).
#![no_main]

use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::{Bytes, BytesMut};
use canaryd::body::{self, ClientError, ClientFault, StreamedBody};
use canaryd::http1::chunked::{ChunkError, ChunkedDecoder, Step};
use canaryd::http1::head::{self, ParsedRequest};
use canaryd::http1::BodyLength;
use http_body::Body;
use libfuzzer_sys::fuzz_target;

const MAX_HEAD: usize = 64 * 1024;
const GATHER: usize = 16 * 1024;

/// The client: its bytes, delivered `read` at a time.
struct Client<'a> {
    wire: &'a [u8],
    at: usize,
    read: usize,
}

impl Client<'_> {
    /// Appends the next read to `buf`; 0 once the client has sent everything (closed).
    fn read(&mut self, buf: &mut BytesMut) -> usize {
        let n = self.read.min(self.wire.len() - self.at);
        buf.extend_from_slice(&self.wire[self.at..self.at + n]);
        self.at += n;
        n
    }
}

enum Decoder {
    Length(u64),
    Chunked(ChunkedDecoder),
}

/// `h1_server`'s `Pump::decode`: data (if any) and, once the body ended, its trailers.
#[allow(clippy::type_complexity)]
fn decode(
    decoder: &mut Decoder,
    rbuf: &mut BytesMut,
) -> Result<(Option<Bytes>, Option<Option<http::HeaderMap>>), ChunkError> {
    match decoder {
        Decoder::Length(left) => {
            let take = rbuf.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
            *left -= take as u64;
            let data = (take > 0).then(|| rbuf.split_to(take).freeze());
            Ok((data, (*left == 0).then_some(None)))
        }
        Decoder::Chunked(d) => {
            let first = match d.next(rbuf, usize::MAX)? {
                Step::Partial => return Ok((None, None)),
                Step::End(trailers) => return Ok((None, Some(trailers))),
                Step::Data(data) if data.len() >= GATHER / 4 => return Ok((Some(data), None)),
                Step::Data(data) => data,
            };
            let mut out = BytesMut::with_capacity(GATHER);
            out.extend_from_slice(&first);
            let end = d.decode_into(rbuf, &mut out, GATHER)?;
            Ok((Some(out.freeze()), end))
        }
    }
}

/// The proxy's side of a body: what it has taken so far.
struct Consumer {
    body: Option<StreamedBody>,
    got: Vec<u8>,
    ended: Option<bool>,
    /// Frames taken per round (0: only when the queue is full).
    pace: u8,
    /// Drops the body after its first frame.
    drop_early: bool,
}

impl Consumer {
    /// Takes one frame; `false` when there is none ready.
    fn take(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(body) = self.body.as_mut() else {
            return false;
        };
        match Pin::new(body).poll_frame(cx) {
            Poll::Pending => false,
            Poll::Ready(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    assert!(!data.is_empty(), "an empty data frame");
                    self.got.extend_from_slice(&data);
                    if self.drop_early {
                        self.body = None;
                    }
                }
                true
            }
            Poll::Ready(Some(Err(_))) => {
                self.ended = Some(false);
                true
            }
            Poll::Ready(None) => {
                self.ended.get_or_insert(true);
                self.body = None;
                false
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let [read, pace, wire @ ..] = data else {
        return;
    };
    let mut client = Client {
        wire,
        at: 0,
        read: 1 + (*read as usize).pow(2) / 16,
    };
    let me = Waker::noop();
    let mut cx = Context::from_waker(me);
    let mut rbuf = BytesMut::new();
    loop {
        let head = loop {
            if !rbuf.is_empty() {
                match head::parse_request(&mut rbuf, MAX_HEAD) {
                    ParsedRequest::Complete(head) => break head,
                    ParsedRequest::Partial => {}
                    ParsedRequest::HandOff | ParsedRequest::Reject(_) => return,
                }
            }
            if client.read(&mut rbuf) == 0 {
                return;
            }
        };
        let (length, mut decoder) = match head.body {
            BodyLength::Empty => {
                if !head.keep_alive {
                    return;
                }
                continue;
            }
            BodyLength::Length(n) => (Some(n), Decoder::Length(n)),
            BodyLength::Chunked => (None, Decoder::Chunked(ChunkedDecoder::new(head.trailer))),
        };
        let body_start = client.at - rbuf.len();
        let (tx, body) = body::streamed(length);
        let mut consumer = Consumer {
            body: Some(body),
            got: Vec::new(),
            ended: None,
            pace: *pace & 3,
            drop_early: *pace == 0xff,
        };
        let mut sent: Vec<u8> = Vec::new();
        let mut complete = false;
        loop {
            for _ in 0..consumer.pace {
                consumer.take(&mut cx);
            }
            match tx.poll_room(&mut cx) {
                Poll::Pending => {
                    assert!(consumer.take(&mut cx), "a full queue with nothing to take");
                    continue;
                }
                // Nobody takes the body: the connection closes after the response.
                Poll::Ready(false) => break,
                Poll::Ready(true) => {}
            }
            if !rbuf.is_empty() {
                match decode(&mut decoder, &mut rbuf) {
                    Ok((data, end)) => {
                        let progressed = data.is_some() || end.is_some();
                        if let Some(data) = data {
                            sent.extend_from_slice(&data);
                            tx.send(data, me);
                        }
                        if let Some(trailers) = end {
                            tx.end(Ok(trailers), me);
                            complete = true;
                            break;
                        }
                        if progressed {
                            continue;
                        }
                    }
                    Err(e) => {
                        tx.end(Err(ClientError::new(ClientFault::Body, e.to_string())), me);
                        break;
                    }
                }
            }
            if client.read(&mut rbuf) == 0 {
                tx.end(Err(ClientError::new(ClientFault::Aborted, "closed")), me);
                break;
            }
        }
        let body_wire = (client.at - rbuf.len() - body_start) as u64;
        assert!(
            sent.len() as u64 <= body_wire,
            "{} bytes of body from {body_wire} bytes of wire",
            sent.len()
        );
        if let Some(n) = length {
            assert!(
                sent.len() as u64 <= n,
                "{} bytes for a length of {n}",
                sent.len()
            );
            if complete {
                assert_eq!(sent.len() as u64, n);
            }
        }
        // The proxy's side takes the rest: exactly what was sent, then the end.
        while consumer.take(&mut cx) {}
        if consumer.drop_early && consumer.body.is_none() && consumer.ended.is_none() {
            assert!(
                sent.starts_with(&consumer.got),
                "the consumer got other data"
            );
            return;
        }
        assert_eq!(consumer.got, sent, "the consumer got other data");
        assert_eq!(consumer.ended, Some(complete), "the body ended otherwise");
        if !complete || !head.keep_alive {
            return;
        }
    }
});
