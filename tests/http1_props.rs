//! Properties of the sans-IO HTTP/1.1 parsers (`canaryd::http1`):
//!
//! - split invariance: a message fed in pieces, the way a server or client reads it (parse
//!   what has arrived; on `Partial`, append the next piece and parse again), gives exactly the
//!   outcome of the whole message parsed at once: the same heads, framings, bodies, errors and
//!   bytes left over. Checked at every split offset of every corpus item, and for random
//!   multi-way splits;
//! - round trips: `head::encode_request` then `head::parse_request` gives back the request;
//!   the chunked encoder's pieces then `ChunkedDecoder` give back the data and the trailers
//!   that may pass;
//! - the corpus' verdicts (`tests/http1_corpus`).
//!
//! Random cases come from a ChaCha generator with a fixed seed, so every run checks the same
//! cases; a failure prints the case (shrunk) and can be rerun as it is.

mod http1_corpus;

use bytes::BytesMut;
use canaryd::http1::chunked::{self, ChunkError, ChunkedDecoder, Step};
use canaryd::http1::fields;
use canaryd::http1::head::{self, ParsedRequest, ResponseBody, ResponseError};
use canaryd::http1::BodyLength;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::Method;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};

use http1_corpus::{Verdict, MAX_HEAD};

// ----------------------------------------------------------------------------------------
// Outcomes, in comparable form.

/// Header fields in order, as `(name, value)`.
type Fields = Vec<(String, Vec<u8>)>;

fn fields_of(map: &HeaderMap) -> Fields {
    map.iter()
        .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
        .collect()
}

/// Trailer fields by name (each name's values in order): a `HeaderMap` that had fields
/// removed (`fields::filter_trailers`) iterates in no particular order of names.
fn trailer_fields(map: &HeaderMap) -> Fields {
    let mut f = fields_of(map);
    f.sort_by(|a, b| a.0.cmp(&b.0));
    f
}

/// A request head as parsed.
#[derive(Debug, Clone, PartialEq)]
struct Req {
    method: String,
    uri: String,
    headers: Fields,
    body: BodyLength,
    keep_alive: bool,
    expect_continue: bool,
    trailer: Vec<Vec<u8>>,
}

/// What `parse_request` said.
#[derive(Debug, Clone, PartialEq)]
enum ReqOutcome {
    Partial,
    HandOff,
    Reject(u16, &'static str),
    Complete(Req),
}

impl ReqOutcome {
    fn verdict(&self) -> Verdict {
        match self {
            ReqOutcome::Partial => Verdict::Partial,
            ReqOutcome::HandOff => Verdict::HandOff,
            ReqOutcome::Reject(s, _) => Verdict::Reject(*s),
            ReqOutcome::Complete(_) => Verdict::Complete,
        }
    }
}

fn req_outcome(p: ParsedRequest) -> ReqOutcome {
    match p {
        ParsedRequest::Partial => ReqOutcome::Partial,
        ParsedRequest::HandOff => ReqOutcome::HandOff,
        ParsedRequest::Reject(r) => ReqOutcome::Reject(r.status.as_u16(), r.reason),
        ParsedRequest::Complete(h) => ReqOutcome::Complete(Req {
            method: h.method.to_string(),
            uri: h.uri.to_string(),
            headers: fields_of(&h.headers),
            body: h.body,
            keep_alive: h.keep_alive,
            expect_continue: h.expect_continue,
            trailer: h.trailer.iter().map(|v| v.as_bytes().to_vec()).collect(),
        }),
    }
}

/// A response head as parsed.
#[derive(Debug, Clone, PartialEq)]
struct Resp {
    status: u16,
    version: http::Version,
    headers: Fields,
    body: ResponseBody,
    reuse: bool,
    hop_by_hop: bool,
    trailer: Vec<Vec<u8>>,
}

/// How a body ended.
#[derive(Debug, Clone, PartialEq)]
enum BodyEnd {
    /// Complete, with the trailers that pass.
    Complete(Option<Fields>),
    /// The chunked coding is malformed.
    Error(ChunkError),
    /// The bytes ran out first.
    Unfinished,
}

/// One step of a conversation: a head (or why there is none), or a body (all its data).
#[derive(Debug, Clone, PartialEq)]
enum Event {
    Request(ReqOutcome),
    Response(Result<Option<Resp>, String>),
    Body(Vec<u8>, BodyEnd),
}

/// The bytes of a message, arriving in pieces.
struct Wire<'a> {
    pieces: std::slice::Iter<'a, &'a [u8]>,
}

impl<'a> Wire<'a> {
    fn new(pieces: &'a [&'a [u8]]) -> Self {
        Wire {
            pieces: pieces.iter(),
        }
    }

    /// Appends the next non-empty piece; `false` once there is none (the peer closed).
    fn read(&mut self, buf: &mut BytesMut) -> bool {
        for p in self.pieces.by_ref() {
            if !p.is_empty() {
                buf.extend_from_slice(p);
                return true;
            }
        }
        false
    }

    /// What was left unread, after `buf`.
    fn rest(mut self, mut buf: BytesMut) -> Vec<u8> {
        while self.read(&mut buf) {}
        buf.to_vec()
    }
}

/// The pieces of `bytes` cut at `cuts` (offsets, in any order; out of range ones clamped).
fn split<'a>(bytes: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut cuts: Vec<usize> = cuts.iter().map(|&c| c.min(bytes.len())).collect();
    cuts.sort_unstable();
    let mut pieces = Vec::with_capacity(cuts.len() + 1);
    let mut at = 0;
    for c in cuts {
        pieces.push(&bytes[at..c]);
        at = c;
    }
    pieces.push(&bytes[at..]);
    pieces
}

/// The first request head, read as the server reads: parse what has arrived; on `Partial`,
/// read more. Returns the outcome and every byte left (the rest of the buffer, then what was
/// not read yet).
fn first_request(pieces: &[&[u8]]) -> (ReqOutcome, Vec<u8>) {
    let mut wire = Wire::new(pieces);
    let mut buf = BytesMut::new();
    loop {
        if !buf.is_empty() {
            let out = req_outcome(head::parse_request(&mut buf, MAX_HEAD));
            if out != ReqOutcome::Partial {
                return (out, wire.rest(buf));
            }
        }
        if !wire.read(&mut buf) {
            let out = if buf.is_empty() {
                ReqOutcome::Partial
            } else {
                req_outcome(head::parse_request(&mut buf, MAX_HEAD))
            };
            return (out, buf.to_vec());
        }
    }
}

/// How a chunked body is read.
#[derive(Debug, Clone, Copy)]
enum Decode {
    /// `next` with this `max`.
    Next(usize),
    /// The server's way: `next`, then `decode_into` up to this size.
    Gather(usize),
}

/// Reads a body framed by `length` (`None`: chunked, with `decoder`) from `buf` and `wire`.
fn read_body(
    buf: &mut BytesMut,
    wire: &mut Wire<'_>,
    length: Option<u64>,
    decoder: ChunkedDecoder,
    how: Decode,
) -> (Vec<u8>, BodyEnd) {
    let mut data = Vec::new();
    match length {
        Some(mut left) => loop {
            let take = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            data.extend_from_slice(&buf.split_to(take));
            left -= take as u64;
            if left == 0 {
                return (data, BodyEnd::Complete(None));
            }
            if !wire.read(buf) {
                return (data, BodyEnd::Unfinished);
            }
        },
        None => {
            let mut d = decoder;
            loop {
                match decode_some(&mut d, buf, how, &mut data) {
                    Err(e) => return (data, BodyEnd::Error(e)),
                    Ok(Some(trailers)) => {
                        return (
                            data,
                            BodyEnd::Complete(trailers.as_ref().map(trailer_fields)),
                        )
                    }
                    Ok(None) => {
                        if !wire.read(buf) {
                            return (data, BodyEnd::Unfinished);
                        }
                    }
                }
            }
        }
    }
}

/// Decodes what `buf` holds into `data`: `Some(trailers)` once the body ended, `None` when
/// more bytes are needed.
fn decode_some(
    d: &mut ChunkedDecoder,
    buf: &mut BytesMut,
    how: Decode,
    data: &mut Vec<u8>,
) -> Result<Option<Option<HeaderMap>>, ChunkError> {
    loop {
        match how {
            Decode::Next(max) => match d.next(buf, max)? {
                Step::Data(b) => {
                    assert!(!b.is_empty(), "empty data step");
                    assert!(b.len() <= max.max(1), "a step larger than max");
                    data.extend_from_slice(&b);
                }
                Step::End(t) => return Ok(Some(t)),
                Step::Partial => return Ok(None),
            },
            Decode::Gather(max) => {
                let first = match d.next(buf, usize::MAX)? {
                    Step::Data(b) => b,
                    Step::End(t) => return Ok(Some(t)),
                    Step::Partial => return Ok(None),
                };
                data.extend_from_slice(&first);
                let mut out = BytesMut::new();
                let end = d.decode_into(buf, &mut out, max);
                data.extend_from_slice(&out);
                if let Some(t) = end? {
                    return Ok(Some(t));
                }
            }
        }
    }
}

/// A connection's requests, read as the server reads them: each head, then its body, then
/// the next pipelined request, until a head is not `Complete`, a body does not end, the
/// client asked to close, or the bytes run out. Returns the events and every byte left.
fn serve(pieces: &[&[u8]], how: Decode) -> (Vec<Event>, Vec<u8>) {
    let mut wire = Wire::new(pieces);
    let mut buf = BytesMut::new();
    let mut events = Vec::new();
    loop {
        let head = loop {
            if !buf.is_empty() {
                match head::parse_request(&mut buf, MAX_HEAD) {
                    ParsedRequest::Complete(h) => break h,
                    ParsedRequest::Partial => {}
                    other => {
                        events.push(Event::Request(req_outcome(other)));
                        return (events, wire.rest(buf));
                    }
                }
            }
            if !wire.read(&mut buf) {
                if !buf.is_empty() {
                    events.push(Event::Request(ReqOutcome::Partial));
                }
                return (events, buf.to_vec());
            }
        };
        let keep_alive = head.keep_alive;
        let (length, trailer) = match head.body {
            BodyLength::Empty => (Some(0), vec![]),
            BodyLength::Length(n) => (Some(n), vec![]),
            BodyLength::Chunked => (None, head.trailer.clone()),
        };
        events.push(Event::Request(req_outcome(ParsedRequest::Complete(head))));
        let (data, end) = read_body(
            &mut buf,
            &mut wire,
            length,
            ChunkedDecoder::new(trailer),
            how,
        );
        let complete = matches!(end, BodyEnd::Complete(_));
        events.push(Event::Body(data, end));
        if !complete || !keep_alive {
            return (events, wire.rest(buf));
        }
    }
}

fn resp_outcome(
    r: Result<Option<head::ResponseHead>, ResponseError>,
) -> Result<Option<Resp>, String> {
    r.map(|h| {
        h.map(|h| Resp {
            status: h.response.status().as_u16(),
            version: h.response.version(),
            headers: fields_of(h.response.headers()),
            body: h.body,
            reuse: h.reuse,
            hop_by_hop: h.hop_by_hop,
            trailer: h.trailer.iter().map(|v| v.as_bytes().to_vec()).collect(),
        })
    })
    .map_err(|e| format!("{e:?}"))
}

/// A connection's responses, read as the client side reads them: heads (1xx ones followed by
/// another), bodies by their framing, pipelined responses, until an error, a body that does
/// not end or delimits itself by the close, a response that ends reuse, or the end of the
/// bytes.
fn receive(pieces: &[&[u8]], head_request: bool, how: Decode) -> (Vec<Event>, Vec<u8>) {
    let mut wire = Wire::new(pieces);
    let mut buf = BytesMut::new();
    let mut events = Vec::new();
    loop {
        let head = loop {
            if !buf.is_empty() {
                match head::parse_response(&mut buf, head_request) {
                    Ok(Some(h)) => break h,
                    Ok(None) => {}
                    Err(e) => {
                        events.push(Event::Response(Err(format!("{e:?}"))));
                        return (events, wire.rest(buf));
                    }
                }
            }
            if !wire.read(&mut buf) {
                if !buf.is_empty() {
                    events.push(Event::Response(Ok(None)));
                }
                return (events, buf.to_vec());
            }
        };
        let reuse = head.reuse;
        let body = head.body;
        let trailer = head.trailer.clone();
        events.push(Event::Response(resp_outcome(Ok(Some(head)))));
        let length = match body {
            ResponseBody::Empty => Some(0),
            ResponseBody::Length(n) => Some(n),
            ResponseBody::Chunked => None,
            ResponseBody::Close | ResponseBody::Upgrade => {
                return (events, wire.rest(buf));
            }
        };
        let (data, end) = read_body(
            &mut buf,
            &mut wire,
            length,
            ChunkedDecoder::new(trailer),
            how,
        );
        let complete = matches!(end, BodyEnd::Complete(_));
        events.push(Event::Body(data, end));
        if !complete || !reuse {
            return (events, wire.rest(buf));
        }
    }
}

/// A chunked body alone: its data, how it ended, and the bytes left.
fn decode(pieces: &[&[u8]], announced: &str, how: Decode) -> (Vec<u8>, BodyEnd, Vec<u8>) {
    let announced = if announced.is_empty() {
        vec![]
    } else {
        vec![HeaderValue::from_str(announced).expect("a valid Trailer value")]
    };
    let mut wire = Wire::new(pieces);
    let mut buf = BytesMut::new();
    wire.read(&mut buf);
    let (data, end) = read_body(
        &mut buf,
        &mut wire,
        None,
        ChunkedDecoder::new(announced),
        how,
    );
    (data, end, wire.rest(buf))
}

/// Whether two outcomes of the same bytes may differ: only where the pieces made a size limit
/// trip before a syntax error further on could be seen (a streaming parser refuses a section
/// over its limit without reading to its end; the whole message, parsed at once, shows the
/// error first). Both still refuse the message.
fn excused(whole: &Event, split: &Event) -> bool {
    match (whole, split) {
        (Event::Body(a, BodyEnd::Error(_)), Event::Body(b, BodyEnd::Error(e))) => {
            a == b
                && matches!(
                    e,
                    ChunkError::TrailersTooLarge | ChunkError::SizeLineTooLong
                )
        }
        (Event::Response(Err(_)), Event::Response(Err(e))) => e == "TooLarge",
        _ => false,
    }
}

/// Compares the events of the whole bytes with those of the pieces; see [`excused`].
fn same_events(whole: &(Vec<Event>, Vec<u8>), split: &(Vec<Event>, Vec<u8>)) -> Result<(), String> {
    if whole == split {
        return Ok(());
    }
    let (we, ws) = whole;
    let (se, ss) = split;
    let last_excused = we.len() == se.len()
        && we[..we.len().saturating_sub(1)] == se[..se.len().saturating_sub(1)]
        && match (we.last(), se.last()) {
            (Some(w), Some(s)) => excused(w, s),
            _ => false,
        };
    if last_excused {
        return Ok(());
    }
    let first = we.iter().zip(se).position(|(w, s)| w != s);
    Err(format!(
        "whole: {} events, {} bytes left; pieces: {} events, {} bytes left; first difference \
         at event {first:?}:\n  whole:  {:?}\n  pieces: {:?}\n  left whole:  {:?}\n  left pieces: {:?}",
        we.len(),
        ws.len(),
        se.len(),
        ss.len(),
        first.and_then(|i| we.get(i)).map(short),
        first.and_then(|i| se.get(i)).map(short),
        shorten(ws),
        shorten(ss),
    ))
}

fn short(e: &Event) -> String {
    let s = format!("{e:?}");
    if s.len() > 600 {
        format!("{}... ({} chars)", &s[..600], s.len())
    } else {
        s
    }
}

fn shorten(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(&b[..b.len().min(200)]).into_owned();
    if b.len() > 200 {
        format!("{s:?}... ({} bytes)", b.len())
    } else {
        format!("{s:?}")
    }
}

/// The offsets to split an item of `len` bytes at: every one for small items; for large ones,
/// the first and last 16, a hundred spread over the rest, and those near the limits.
fn offsets(len: usize) -> Vec<usize> {
    if len <= 4096 {
        return (0..=len).collect();
    }
    let mut v: Vec<usize> = (0..16).chain(len - 16..=len).collect();
    v.extend((0..len).step_by(len / 100));
    for limit in [
        MAX_HEAD,
        canaryd::http1::MAX_RESPONSE_HEAD,
        chunked::MAX_TRAILERS,
        chunked::MAX_SIZE_LINE,
    ] {
        v.extend((limit.saturating_sub(3)..=limit + 3).filter(|&k| k <= len));
    }
    v.sort_unstable();
    v.dedup();
    v
}

/// The fixed-seed runner: the same cases on every run, no files written.
fn runner(cases: u32, seed: u8) -> TestRunner {
    let config = Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    };
    TestRunner::new_with_rng(
        config,
        TestRng::from_seed(RngAlgorithm::ChaCha, &[seed; 32]),
    )
}

fn run<S: Strategy>(
    cases: u32,
    seed: u8,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) {
    if let Err(e) = runner(cases, seed).run(&strategy, test) {
        panic!("{e}");
    }
}

/// The ways to read a body: all for items up to 4 KiB; the large items are heads (a debug
/// build's httparse takes a millisecond for one of 64 KiB), one way is enough.
fn hows(len: usize) -> &'static [Decode] {
    if len <= 4096 {
        &HOWS
    } else {
        &HOWS[..1]
    }
}

const HOWS: [Decode; 4] = [
    Decode::Next(usize::MAX),
    Decode::Next(1),
    Decode::Next(7),
    Decode::Gather(16 * 1024),
];

// ----------------------------------------------------------------------------------------
// The corpus' verdicts.

#[test]
fn corpus_requests_get_their_documented_verdicts() {
    let mut wrong = Vec::new();
    for case in http1_corpus::corpus() {
        let mut buf = BytesMut::from(&case.bytes[..]);
        let out = req_outcome(head::parse_request(&mut buf, MAX_HEAD));
        if out.verdict() != case.verdict {
            wrong.push(format!(
                "{}: expected {:?}, got {out:?}",
                case.name, case.verdict
            ));
        }
        if !matches!(out, ReqOutcome::Complete(_)) && buf[..] != case.bytes[..] {
            wrong.push(format!("{}: {out:?} changed the buffer", case.name));
        }
        if let ReqOutcome::Reject(status, _) = out {
            if ![400, 417, 431, 501].contains(&status) {
                wrong.push(format!("{}: refused with {status}", case.name));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

// ----------------------------------------------------------------------------------------
// Split invariance at every offset.

#[test]
fn requests_parse_the_same_at_every_split() {
    let mut failures = Vec::new();
    for case in http1_corpus::corpus() {
        let bytes = &case.bytes[..];
        let whole_first = first_request(&[bytes]);
        let whole = serve(&[bytes], Decode::Next(usize::MAX));
        for k in offsets(bytes.len()) {
            let pieces = split(bytes, &[k]);
            let first = first_request(&pieces);
            if first != whole_first {
                failures.push(format!(
                    "{} split at {k}: first head {:?} (left {}) vs whole {:?} (left {})",
                    case.name,
                    first.0,
                    shorten(&first.1),
                    whole_first.0,
                    shorten(&whole_first.1)
                ));
            }
            for &how in hows(bytes.len()) {
                if let Err(e) = same_events(&whole, &serve(&pieces, how)) {
                    failures.push(format!("{} split at {k}, {how:?}: {e}", case.name));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures[..failures.len().min(20)].join("\n")
    );
}

#[test]
fn responses_parse_the_same_at_every_split() {
    let mut failures = Vec::new();
    for case in http1_corpus::responses() {
        let bytes = &case.bytes[..];
        let whole = receive(&[bytes], case.head_request, Decode::Next(usize::MAX));
        for k in offsets(bytes.len()) {
            let pieces = split(bytes, &[k]);
            for &how in hows(bytes.len()) {
                if let Err(e) = same_events(&whole, &receive(&pieces, case.head_request, how)) {
                    failures.push(format!("{} split at {k}, {how:?}: {e}", case.name));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures[..failures.len().min(20)].join("\n")
    );
}

#[test]
fn chunked_bodies_decode_the_same_at_every_split() {
    let mut failures = Vec::new();
    for case in http1_corpus::chunked() {
        let bytes = &case.bytes[..];
        let (wd, we, wl) = decode(&[bytes], case.announced, Decode::Next(usize::MAX));
        assert!(
            wd.len() + wl.len() <= bytes.len(),
            "{}: more data than bytes",
            case.name
        );
        let whole = (vec![Event::Body(wd, we)], wl);
        for k in offsets(bytes.len()) {
            let pieces = split(bytes, &[k]);
            for &how in hows(bytes.len()) {
                let (d, e, l) = decode(&pieces, case.announced, how);
                if let Err(err) = same_events(&whole, &(vec![Event::Body(d, e)], l)) {
                    failures.push(format!("{} split at {k}, {how:?}: {err}", case.name));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures[..failures.len().min(20)].join("\n")
    );
}

// ----------------------------------------------------------------------------------------
// Split invariance for random multi-way splits.

/// A corpus item and up to `max_cuts` cut points in it.
fn cuts(items: usize, max_cuts: usize) -> impl Strategy<Value = (usize, Vec<Index>, usize)> {
    (
        0..items,
        prop::collection::vec(any::<Index>(), 0..=max_cuts),
        0..HOWS.len(),
    )
}

fn cut_points(len: usize, cuts: &[Index]) -> Vec<usize> {
    cuts.iter().map(|i| i.index(len + 1)).collect()
}

#[test]
fn requests_parse_the_same_in_random_pieces() {
    let corpus = http1_corpus::corpus();
    let wholes: Vec<_> = corpus
        .iter()
        .map(|c| {
            (
                first_request(&[&c.bytes[..]]),
                serve(&[&c.bytes[..]], Decode::Next(usize::MAX)),
            )
        })
        .collect();
    run(256, 1, cuts(corpus.len(), 24), |(i, cuts, how)| {
        let bytes = &corpus[i].bytes[..];
        let pieces = split(bytes, &cut_points(bytes.len(), &cuts));
        let (whole_first, whole) = &wholes[i];
        prop_assert_eq!(&first_request(&pieces), whole_first, "{}", corpus[i].name);
        same_events(whole, &serve(&pieces, HOWS[how]))
            .map_err(|e| TestCaseError::fail(format!("{}: {e}", corpus[i].name)))
    });
}

#[test]
fn responses_parse_the_same_in_random_pieces() {
    let corpus = http1_corpus::responses();
    let wholes: Vec<_> = corpus
        .iter()
        .map(|c| receive(&[&c.bytes[..]], c.head_request, Decode::Next(usize::MAX)))
        .collect();
    run(256, 2, cuts(corpus.len(), 24), |(i, cuts, how)| {
        let c = &corpus[i];
        let pieces = split(&c.bytes, &cut_points(c.bytes.len(), &cuts));
        same_events(&wholes[i], &receive(&pieces, c.head_request, HOWS[how]))
            .map_err(|e| TestCaseError::fail(format!("{}: {e}", c.name)))
    });
}

#[test]
fn chunked_bodies_decode_the_same_in_random_pieces() {
    let corpus = http1_corpus::chunked();
    let wholes: Vec<_> = corpus
        .iter()
        .map(|c| {
            let (d, e, l) = decode(&[&c.bytes[..]], c.announced, Decode::Next(usize::MAX));
            (vec![Event::Body(d, e)], l)
        })
        .collect();
    run(256, 3, cuts(corpus.len(), 32), |(i, cuts, how)| {
        let c = &corpus[i];
        let pieces = split(&c.bytes, &cut_points(c.bytes.len(), &cuts));
        let (d, e, l) = decode(&pieces, c.announced, HOWS[how]);
        same_events(&wholes[i], &(vec![Event::Body(d, e)], l))
            .map_err(|e| TestCaseError::fail(format!("{}: {e}", c.name)))
    });
}

/// Random bytes (mostly from the characters that matter to HTTP/1.1 framing) decode the same
/// whole and in pieces, and never yield more data than they hold.
#[test]
fn random_chunked_bytes_decode_the_same_in_random_pieces() {
    let byte = prop_oneof![
        4 => prop::sample::select(b"0123456789abcdefABCDEF\r\n;= \tx:".to_vec()),
        1 => any::<u8>(),
    ];
    let strategy = (
        prop::collection::vec(byte, 0..300),
        prop::collection::vec(any::<Index>(), 0..16),
        0..HOWS.len(),
    );
    run(512, 4, strategy, |(bytes, cuts, how)| {
        let (d, e, l) = decode(&[&bytes[..]], "x", Decode::Next(usize::MAX));
        prop_assert!(d.len() <= bytes.len());
        prop_assert!(l.len() <= bytes.len() - d.len());
        let whole = (vec![Event::Body(d, e)], l);
        let pieces = split(&bytes, &cut_points(bytes.len(), &cuts));
        let (d, e, l) = decode(&pieces, "x", HOWS[how]);
        same_events(&whole, &(vec![Event::Body(d, e)], l)).map_err(TestCaseError::fail)
    });
}

/// Random heads built from valid and hostile lines parse the same whole and in pieces.
#[test]
fn random_request_heads_parse_the_same_in_random_pieces() {
    let line = prop::sample::select(vec![
        &b"Host: a\r\n"[..],
        b"Content-Length: 3\r\n",
        b"Content-Length: 03\r\n",
        b"Content-Length: 4\r\n",
        b"Transfer-Encoding: chunked\r\n",
        b"Transfer-Encoding: gzip\r\n",
        b"Transfer-Encoding : chunked\r\n",
        b"Expect: 100-continue\r\n",
        b"Expect: nope\r\n",
        b"Connection: close\r\n",
        b"Trailer: x-sum\r\n",
        b"Upgrade: h2c\r\n",
        b" folded\r\n",
        b"X-A: b\n",
        b"X-B:\t\xff\r\n",
        b"X-Nul: \x00\r\n",
        b"\r\n",
        b"abc",
        b"3\r\nabc\r\n0\r\n\r\n",
        b"GET / HTTP/1.1\r\n",
    ]);
    let start = prop::sample::select(vec![
        &b"GET / HTTP/1.1\r\n"[..],
        b"POST /p HTTP/1.1\r\n",
        b"GET http://a/ HTTP/1.1\r\n",
        b"GET / HTTP/1.0\r\n",
        b"get /x HTTP/1.1\r\n",
    ]);
    let strategy = (
        start,
        prop::collection::vec(line, 0..12),
        prop::collection::vec(any::<Index>(), 0..12),
        0..HOWS.len(),
    );
    run(1024, 5, strategy, |(start, lines, cuts, how)| {
        let bytes: Vec<u8> = std::iter::once(start)
            .chain(lines)
            .flatten()
            .copied()
            .collect();
        let whole_first = first_request(&[&bytes]);
        let whole = serve(&[&bytes], Decode::Next(usize::MAX));
        let pieces = split(&bytes, &cut_points(bytes.len(), &cuts));
        prop_assert_eq!(first_request(&pieces), whole_first);
        same_events(&whole, &serve(&pieces, HOWS[how])).map_err(TestCaseError::fail)
    });
}

// ----------------------------------------------------------------------------------------
// Round trips.

const TCHAR: &[u8] =
    b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";

fn token(max: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(TCHAR.to_vec()), 1..=max)
        .prop_map(|b| String::from_utf8(b).expect("ASCII"))
}

/// A field name: a random token, or one with a meaning to the parser or the encoder.
fn field_name() -> impl Strategy<Value = HeaderName> {
    prop_oneof![
        3 => token(12).prop_map(|t| HeaderName::from_bytes(t.as_bytes()).expect("a token")),
        1 => prop::sample::select(vec![
            "host", "connection", "trailer", "content-length", "transfer-encoding", "expect",
            "keep-alive", "te", "x-user-id",
        ])
        .prop_map(HeaderName::from_static),
    ]
    // An upgrade is hyper's to serve: the request would not come back.
    .prop_filter("upgrade", |n| n != "upgrade")
}

/// A field value as it survives a head: visible ASCII, obs-text, inner spaces and tabs, no
/// whitespace at either end; sometimes a `Connection`-like list.
fn field_value() -> impl Strategy<Value = HeaderValue> {
    let byte = prop_oneof![
        8 => 0x21u8..=0x7e,
        1 => prop::sample::select(vec![b' ', b'\t', b',']),
        1 => 0x80u8..=0xff,
    ];
    prop_oneof![
        4 => prop::collection::vec(byte, 0..24).prop_map(|mut v| {
            while v.last().is_some_and(|b| *b == b' ' || *b == b'\t') {
                v.pop();
            }
            while v.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
                v.remove(0);
            }
            HeaderValue::from_bytes(&v).expect("a valid value")
        }),
        1 => prop::sample::select(vec!["close", "keep-alive", "Keep-Alive, CLOSE", "x-a, x-b", "100-continue"])
            .prop_map(HeaderValue::from_static),
    ]
}

fn method() -> impl Strategy<Value = Method> {
    prop_oneof![
        3 => prop::sample::select(vec![
            Method::GET, Method::POST, Method::PUT, Method::DELETE, Method::PATCH,
            Method::HEAD, Method::OPTIONS, Method::TRACE,
        ]),
        1 => token(10).prop_map(|t| Method::from_bytes(t.as_bytes()).expect("a token")),
    ]
}

/// An origin-form target: a path, perhaps a query.
fn target() -> impl Strategy<Value = String> {
    const PCHAR: &[u8] = b"abcXYZ019-._~!$&'()*+,;=:@%";
    let segment = prop::collection::vec(prop::sample::select(PCHAR.to_vec()), 0..8).prop_map(|b| {
        // `%` only as a valid escape.
        String::from_utf8(b).expect("ASCII").replace('%', "%2F")
    });
    (
        prop::collection::vec(segment, 1..5),
        prop::option::of(prop::collection::vec(
            prop::sample::select(PCHAR.to_vec()),
            0..10,
        )),
    )
        .prop_map(|(segments, query)| {
            let mut t = format!("/{}", segments.join("/"));
            if let Some(q) = query {
                t.push('?');
                t.push_str(&String::from_utf8(q).expect("ASCII").replace('%', "%3D"));
            }
            t
        })
}

fn body_length() -> impl Strategy<Value = BodyLength> {
    prop_oneof![
        Just(BodyLength::Empty),
        Just(BodyLength::Chunked),
        (0u64..=u64::MAX / 2).prop_map(BodyLength::Length),
        (0u64..10).prop_map(BodyLength::Length),
    ]
}

#[test]
fn encoded_requests_parse_back() {
    let fields = || prop::collection::vec((field_name(), field_value()), 0..12);
    let strategy = (
        method(),
        target(),
        fields(),
        fields(),
        prop::collection::vec(any::<bool>(), 12),
        body_length(),
    );
    run(
        512,
        6,
        strategy,
        |(method, target, fields, extra, skip, body)| {
            let mut headers = HeaderMap::new();
            for (n, v) in &fields {
                headers.append(n.clone(), v.clone());
            }
            let skipped: Vec<&HeaderName> = fields
                .iter()
                .zip(&skip)
                .filter(|(_, s)| **s)
                .map(|((n, _), _)| n)
                .collect();
            // Framing the encoder writes from `body`, never from the fields; an extra field can
            // only be one the parser keeps (else it would change the framing or hand the request
            // to hyper).
            let dropped = |n: &HeaderName| {
                matches!(
                    n.as_str(),
                    "content-length" | "transfer-encoding" | "expect"
                )
            };
            let extra: Vec<_> = extra.into_iter().filter(|(n, _)| !dropped(n)).collect();
            let mut wire = BytesMut::new();
            head::encode_request(
                &mut wire,
                &method,
                &target,
                &headers,
                |n| skipped.contains(&n),
                extra.iter().map(|(n, v)| (n, v)),
                body,
            );
            // `skip` applies to the request's fields, not to `extra`.
            let mut expected = HeaderMap::new();
            for (n, v) in &headers {
                if !dropped(n) && !skipped.contains(&n) {
                    expected.append(n.clone(), v.clone());
                }
            }
            for (n, v) in &extra {
                expected.append(n.clone(), v.clone());
            }
            let keep_alive = !expected
                .get_all("connection")
                .iter()
                .any(|v| fields::connection_has(v.as_bytes(), b"close"));
            let trailer: Vec<_> = expected.get_all("trailer").iter().cloned().collect();

            let wire_text = String::from_utf8_lossy(&wire).into_owned();
            let mut buf = wire.clone();
            let parsed = head::parse_request(&mut buf, usize::MAX);
            let ParsedRequest::Complete(req) = parsed else {
                return Err(TestCaseError::fail(format!("{parsed:?} for {wire_text:?}")));
            };
            prop_assert!(buf.is_empty(), "{:?} left of {:?}", buf, wire_text);
            prop_assert_eq!(&req.method, &method);
            prop_assert_eq!(req.uri.to_string(), target);
            prop_assert_eq!(&req.headers, &expected, "{:?}", wire_text);
            let body = match body {
                BodyLength::Length(0) => BodyLength::Empty,
                b => b,
            };
            prop_assert_eq!(req.body, body);
            prop_assert_eq!(req.keep_alive, keep_alive);
            prop_assert!(!req.expect_continue, "Expect is never encoded");
            prop_assert_eq!(req.trailer, trailer);
            Ok(())
        },
    );
}

/// A chunked message: its chunks, its trailer fields, which of those its `Trailer` field
/// names, and the bytes that follow it.
type ChunkedMessage = (
    Vec<Vec<u8>>,
    Vec<(HeaderName, HeaderValue)>,
    Vec<bool>,
    Vec<u8>,
);

fn chunked_message() -> impl Strategy<Value = ChunkedMessage> {
    (
        prop::collection::vec(
            prop_oneof![
                4 => prop::collection::vec(any::<u8>(), 0..40),
                1 => prop::collection::vec(any::<u8>(), 0..3000),
            ],
            0..12,
        ),
        prop::collection::vec((field_name(), field_value()), 0..6),
        prop::collection::vec(any::<bool>(), 6),
        prop::collection::vec(any::<u8>(), 0..20),
    )
}

#[test]
fn encoded_chunked_bodies_decode_back() {
    let strategy = (
        chunked_message(),
        prop::collection::vec(any::<Index>(), 0..12),
        0..HOWS.len(),
    );
    run(
        512,
        7,
        strategy,
        |((chunks, trailers, announce, next), cuts, how)| {
            let mut map = HeaderMap::new();
            for (n, v) in &trailers {
                map.append(n.clone(), v.clone());
            }
            let announced: Vec<&str> = trailers
                .iter()
                .zip(&announce)
                .filter(|(_, a)| **a)
                .map(|((n, _), _)| n.as_str())
                .collect();
            let announced = announced.join(", ");

            let mut wire = BytesMut::new();
            for c in chunks.iter().filter(|c| !c.is_empty()) {
                chunked::put_size(&mut wire, c.len());
                wire.extend_from_slice(c);
                wire.extend_from_slice(b"\r\n");
            }
            chunked::put_end(&mut wire, Some(&map));
            wire.extend_from_slice(&next);

            let mut expected = map.clone();
            if !announced.is_empty() {
                fields::filter_trailers(
                    &mut expected,
                    &[HeaderValue::from_str(&announced).expect("value")],
                );
            } else {
                expected.clear();
            }
            let expected = (!expected.is_empty()).then(|| trailer_fields(&expected));

            let pieces = split(&wire, &cut_points(wire.len(), &cuts));
            let (data, end, left) = decode(&pieces, &announced, HOWS[how]);
            prop_assert_eq!(data, chunks.concat());
            prop_assert_eq!(end, BodyEnd::Complete(expected));
            prop_assert_eq!(left, next);
            Ok(())
        },
    );
}

#[test]
fn chunk_sizes_encode_and_decode_at_any_size() {
    let size = prop_oneof![
        any::<usize>(),
        0usize..4096,
        (0u32..64).prop_map(|s| 1usize << s)
    ];
    run(1024, 8, size, |n| {
        let mut wire = BytesMut::new();
        chunked::put_size(&mut wire, n);
        let mut d = ChunkedDecoder::new(vec![]);
        let step = d
            .next(&mut wire, usize::MAX)
            .map_err(|e| TestCaseError::fail(format!("{e}")))?;
        prop_assert_eq!(step, Step::Partial);
        prop_assert!(wire.is_empty());
        prop_assert_eq!(d.remaining_in_chunk(), n as u64);
        Ok(())
    });
}

// ----------------------------------------------------------------------------------------
// Seeds for the fuzz targets.

/// Writes the fuzz targets' seed corpora (`fuzz/corpus/<target>/`) from this corpus. Run by
/// `fuzz/seeds.sh`; the files are committed.
#[test]
#[ignore = "writes fuzz/corpus; run by fuzz/seeds.sh"]
fn write_fuzz_seeds() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let small = |b: &[u8]| b.len() <= 2048;
    let write = |target: &str, name: &str, bytes: Vec<u8>| {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let mut file = String::new();
        for c in name.chars() {
            file.push(if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            });
        }
        std::fs::write(dir.join(file), bytes).expect("write a seed");
    };
    for dir in ["head_parse", "chunked_decode", "server_conn"] {
        let _ = std::fs::remove_dir_all(root.join(dir));
    }
    let requests: Vec<_> = http1_corpus::corpus()
        .into_iter()
        .filter(|c| small(&c.bytes))
        .collect();
    let responses: Vec<_> = http1_corpus::responses()
        .into_iter()
        .filter(|c| small(&c.bytes))
        .collect();
    let chunked: Vec<_> = http1_corpus::chunked()
        .into_iter()
        .filter(|c| small(&c.bytes))
        .collect();
    // head_parse: a selector byte (split point, HEAD or not, the server's head limit), then
    // the message: the smuggling probes and a few valid requests; responses, one in two.
    const HEAD_PARSE: [&str; 18] = [
        "CL.TE",
        "TE.CL",
        "transfer-encoding: xchunked",
        "transfer-encoding: space before colon",
        "transfer-encoding: chunked with a trailing comma",
        "duplicate content-length, different",
        "content-length with a no-break space",
        "obs-fold",
        "bare LF line endings",
        "NUL in a value",
        "absolute-form target",
        "asterisk-form target",
        "CONNECT authority-form",
        "expect 100-continue with a body",
        "pipelined chunked then GET",
        "chunked with extensions and trailers",
        "leading empty line",
        "100 fields",
    ];
    for (i, name) in HEAD_PARSE.iter().enumerate() {
        let c = requests
            .iter()
            .find(|c| c.name == *name)
            .expect("a corpus request");
        // Bit 1 clear: the server's 64 KiB limit.
        let sel = (i * 37) as u8 & !2;
        write(
            "head_parse",
            &format!("req-{}", c.name),
            [&[sel][..], &c.bytes].concat(),
        );
    }
    for (i, c) in responses.iter().step_by(2).take(12).enumerate() {
        let sel = (i * 53) as u8 & !1 | u8::from(c.head_request);
        write(
            "head_parse",
            &format!("resp-{}", c.name),
            [&[sel][..], &c.bytes].concat(),
        );
    }
    // chunked_decode: a selector byte (piece size, max), then the body.
    for (i, c) in chunked.iter().take(30).enumerate() {
        write(
            "chunked_decode",
            c.name,
            [&[(i * 29) as u8][..], &c.bytes].concat(),
        );
    }
    // server_conn: two selector bytes (read size, consumer pace), then the connection's bytes.
    for (i, c) in requests
        .iter()
        .filter(|c| c.verdict == Verdict::Complete)
        .take(30)
        .enumerate()
    {
        write(
            "server_conn",
            c.name,
            [&[(i * 41) as u8, (i * 13) as u8][..], &c.bytes].concat(),
        );
    }
}
