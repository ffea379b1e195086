//! `head_parse`: `head::parse_request` and `head::parse_response` on arbitrary bytes.
//!
//! Input: one selector byte, then the message. The selector picks the split point (the
//! message is parsed whole, then as two reads cut there, the way a server or client reads),
//! whether the response answers a `HEAD`, and the request-head limit (the server's 64 KiB, or
//! a small one so that short inputs reach the limit rules). Checks: no panic; the same
//! outcome and the same bytes left both ways (a split may only turn a response's syntax
//! error past the size limit into `TooLarge`); a refused or handed-over request leaves the
//! buffer as it was; a parsed request, encoded again by `head::encode_request`, parses back to
//! the same request.
#![no_main]

use bytes::BytesMut;
use canaryd::http1::head::{self, ParsedRequest, ResponseError};
use canaryd::http1::BodyLength;
use libfuzzer_sys::fuzz_target;

type Fields = Vec<(String, Vec<u8>)>;

fn fields_of(map: &http::HeaderMap) -> Fields {
    map.iter()
        .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
        .collect()
}

#[derive(Debug, PartialEq)]
enum Req {
    Partial,
    HandOff,
    Reject(u16),
    Complete {
        method: String,
        uri: String,
        headers: Fields,
        body: BodyLength,
        keep_alive: bool,
        expect_continue: bool,
        trailer: Vec<Vec<u8>>,
    },
}

fn req(p: &ParsedRequest) -> Req {
    match p {
        ParsedRequest::Partial => Req::Partial,
        ParsedRequest::HandOff => Req::HandOff,
        ParsedRequest::Reject(r) => Req::Reject(r.status.as_u16()),
        ParsedRequest::Complete(h) => Req::Complete {
            method: h.method.to_string(),
            uri: h.uri.to_string(),
            headers: fields_of(&h.headers),
            body: h.body,
            keep_alive: h.keep_alive,
            expect_continue: h.expect_continue,
            trailer: h.trailer.iter().map(|v| v.as_bytes().to_vec()).collect(),
        },
    }
}

/// Parses `pieces` the way the server reads: parse, and on `Partial` append the next piece.
fn parse_request(pieces: &[&[u8]], max_head: usize) -> (ParsedRequest, BytesMut) {
    let mut buf = BytesMut::new();
    let mut parsed = ParsedRequest::Partial;
    for piece in pieces {
        buf.extend_from_slice(piece);
        if matches!(parsed, ParsedRequest::Partial) && !buf.is_empty() {
            parsed = head::parse_request(&mut buf, max_head);
        }
    }
    (parsed, buf)
}

fn requests(bytes: &[u8], k: usize, max_head: usize) {
    let (whole, left) = parse_request(&[bytes], max_head);
    let (split, split_left) = parse_request(&[&bytes[..k], &bytes[k..]], max_head);
    assert_eq!(req(&whole), req(&split), "split at {k}");
    assert_eq!(left, split_left, "bytes left, split at {k}");
    let ParsedRequest::Complete(h) = whole else {
        assert_eq!(&left[..], bytes, "the buffer is kept");
        return;
    };
    // The encoder adds the framing field; a head already at the field limit would not parse
    // back for that reason alone.
    if h.headers.len() + 1 > canaryd::http1::MAX_HEADERS {
        return;
    }
    // Encoded again and parsed back: the same request (a length of 0 is no body).
    let mut wire = BytesMut::new();
    head::encode_request(
        &mut wire,
        &h.method,
        &h.uri.to_string(),
        &h.headers,
        |_| false,
        std::iter::empty(),
        h.body,
    );
    let text = String::from_utf8_lossy(&wire).into_owned();
    let back = head::parse_request(&mut wire, usize::MAX);
    assert!(wire.is_empty(), "{text:?} left {wire:?}");
    let ParsedRequest::Complete(b) = back else {
        panic!("{text:?} does not parse back: {back:?}");
    };
    assert_eq!(b.method, h.method, "{text:?}");
    assert_eq!(b.uri.to_string(), h.uri.to_string(), "{text:?}");
    assert_eq!(b.headers, h.headers, "{text:?}");
    assert_eq!(b.body, h.body, "{text:?}");
    assert_eq!(b.keep_alive, h.keep_alive, "{text:?}");
    assert!(!b.expect_continue, "{text:?}");
    assert_eq!(b.trailer, h.trailer, "{text:?}");
}

#[derive(Debug, PartialEq)]
struct Resp {
    status: u16,
    version: http::Version,
    headers: Fields,
    body: head::ResponseBody,
    reuse: bool,
    hop_by_hop: bool,
    trailer: Vec<Vec<u8>>,
}

type RespOutcome = Result<Option<Resp>, ResponseError>;

fn parse_response(pieces: &[&[u8]], head_request: bool) -> (RespOutcome, BytesMut) {
    let mut buf = BytesMut::new();
    let mut parsed = Ok(None);
    for piece in pieces {
        buf.extend_from_slice(piece);
        if matches!(parsed, Ok(None)) && !buf.is_empty() {
            parsed = head::parse_response(&mut buf, head_request).map(|h| {
                h.map(|h| Resp {
                    status: h.response.status().as_u16(),
                    version: h.response.version(),
                    headers: fields_of(h.response.headers()),
                    body: h.body,
                    reuse: h.reuse,
                    hop_by_hop: h.hop_by_hop,
                    trailer: h.trailer.iter().map(|v| v.as_bytes().to_vec()).collect(),
                })
            });
        }
    }
    (parsed, buf)
}

fn responses(bytes: &[u8], k: usize, head_request: bool) {
    let (whole, left) = parse_response(&[bytes], head_request);
    let (split, split_left) = parse_response(&[&bytes[..k], &bytes[k..]], head_request);
    if let (Err(e), Err(ResponseError::TooLarge)) = (&whole, &split) {
        if *e == ResponseError::TooLarge {
            assert_eq!(left, split_left, "bytes left, split at {k}");
            return;
        }
        // The first read was over the limit before the error further on could be seen.
        assert!(
            k > canaryd::http1::MAX_RESPONSE_HEAD,
            "TooLarge at {k}: {whole:?}"
        );
        return;
    }
    assert_eq!(whole, split, "split at {k}");
    assert_eq!(left, split_left, "bytes left, split at {k}");
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, bytes)) = data.split_first() else {
        return;
    };
    let k = sel as usize * (bytes.len() + 1) / 256;
    let max_head = if sel & 2 == 0 {
        64 * 1024
    } else {
        16 + 4 * sel as usize
    };
    requests(bytes, k, max_head);
    responses(bytes, k, sel & 1 == 1);
});
