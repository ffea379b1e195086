//! Hand-written HTTP/1.1 messages, valid and hostile, shared by the property tests
//! (`tests/http1_props.rs`), the differential test against httparse and hyper
//! (`tests/http1_differential.rs`) and, through `write_fuzz_seeds` in the property tests, the
//! fuzz targets' seed corpora (`fuzz/corpus/`).
//!
//! Every request carries the verdict canaryd's `head::parse_request` gives it today with the
//! server's limit ([`MAX_HEAD`]); the property tests check those verdicts, so that a change
//! to one is a decision, not an accident.

// Each test binary uses part of this module.
#![allow(dead_code)]

/// The server's request-head limit (`listen.max_header_bytes`' default).
pub const MAX_HEAD: usize = 64 * 1024;

/// What `parse_request` says about the front of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A head canaryd serves itself.
    Complete,
    /// Not complete yet.
    Partial,
    /// Given to hyper untouched.
    HandOff,
    /// Refused with this status.
    Reject(u16),
}

/// A request as a client sends it.
pub struct Request {
    pub name: &'static str,
    pub bytes: Vec<u8>,
    pub verdict: Verdict,
}

/// A response as an upstream sends it, to a `HEAD` request or not.
pub struct Response {
    pub name: &'static str,
    pub bytes: Vec<u8>,
    pub head_request: bool,
}

/// A chunked body (and whatever follows it), with the message's `Trailer` value.
pub struct Chunked {
    pub name: &'static str,
    pub announced: &'static str,
    pub bytes: Vec<u8>,
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// `n` header fields `x-<i>: <i>`.
fn fields(n: usize) -> Vec<u8> {
    (0..n)
        .flat_map(|i| format!("x-{i}: {i}\r\n").into_bytes())
        .collect()
}

/// The request corpus.
pub fn corpus() -> Vec<Request> {
    use Verdict::*;
    let r = |name, bytes: Vec<u8>, verdict| Request {
        name,
        bytes,
        verdict,
    };
    let big_value = vec![b'a'; 70 * 1024];
    let near_limit = vec![b'b'; MAX_HEAD - 64];
    vec![
        // Valid.
        r("get", b"GET / HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(), Complete),
        r(
            "post content-length",
            b"POST /p?q=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello".to_vec(),
            Complete,
        ),
        r(
            "post chunked",
            b"POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
                .to_vec(),
            Complete,
        ),
        r(
            "chunked with extensions and trailers",
            b"POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTrailer: x-sum\r\n\r\n\
              5;name=val;flag\r\nhello\r\n6 ; q=\"x\"\r\n world\r\n0\r\nx-sum: 1\r\nhost: evil\r\n\r\n"
                .to_vec(),
            Complete,
        ),
        r(
            "chunked, uppercase coding and hex",
            b"PUT /u HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: CHUNKED\r\n\r\nA\r\n0123456789\r\n0\r\n\r\n"
                .to_vec(),
            Complete,
        ),
        r(
            "content-length 0 on GET",
            b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n".to_vec(),
            Complete,
        ),
        r(
            "content-length with leading zeros",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 005\r\n\r\nhello".to_vec(),
            Complete,
        ),
        r(
            "content-length 19 digits",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 9999999999999999999\r\n\r\nabc".to_vec(),
            Complete,
        ),
        r(
            "content-length, body not all there",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nhel".to_vec(),
            Complete,
        ),
        r(
            "connection close",
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Close\r\n\r\n".to_vec(),
            Complete,
        ),
        r(
            "no host",
            b"GET / HTTP/1.1\r\nUser-Agent: x\r\n\r\n".to_vec(),
            Complete,
        ),
        r(
            "two hosts",
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n".to_vec(),
            Complete,
        ),
        r(
            "absolute-form target",
            b"GET http://b.test:8080/x?y=1 HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(),
            Complete,
        ),
        r(
            "asterisk-form target",
            b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(),
            Complete,
        ),
        r(
            "CONNECT authority-form",
            b"CONNECT b.test:443 HTTP/1.1\r\nHost: b.test:443\r\n\r\n".to_vec(),
            Complete,
        ),
        r(
            "extension method, lowercase",
            b"purge /cache HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(),
            Complete,
        ),
        r(
            "obs-text in a value",
            b"GET / HTTP/1.1\r\nHost: a\r\nX-Name: caf\xc3\xa9 \xff\r\n\r\n".to_vec(),
            Complete,
        ),
        r(
            "tab around a value",
            b"GET / HTTP/1.1\r\nHost: a\r\nX-Tab:\tv\t\r\n\r\n".to_vec(),
            Complete,
        ),
        r(
            "leading empty line",
            b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(),
            Complete,
        ),
        r(
            "expect 100-continue with a body",
            b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-Continue\r\nContent-Length: 2\r\n\r\nhi".to_vec(),
            Complete,
        ),
        r(
            "expect 100-continue without a body",
            b"GET / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n".to_vec(),
            Complete,
        ),
        r(
            "100 fields",
            cat(&[b"GET / HTTP/1.1\r\n", &fields(100), b"\r\n"]),
            Complete,
        ),
        r(
            "head just under the limit",
            cat(&[b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: ", &near_limit, b"\r\n\r\n"]),
            Complete,
        ),
        r(
            "pipelined GETs",
            b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\nGET /3 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
                .to_vec(),
            Complete,
        ),
        r(
            "pipelined POST then GET",
            b"POST /1 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabcGET /2 HTTP/1.1\r\nHost: a\r\n\r\n"
                .to_vec(),
            Complete,
        ),
        r(
            "pipelined chunked then GET",
            b"POST /1 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n"
                .to_vec(),
            Complete,
        ),
        // Transfer-Encoding obfuscation.
        r(
            "transfer-encoding: tab before chunked",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\tchunked\r\n\r\n0\r\n\r\n".to_vec(),
            Complete,
        ),
        r(
            "transfer-encoding: xchunked",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n".to_vec(),
            Reject(501),
        ),
        r(
            "transfer-encoding: space before colon",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n".to_vec(),
            HandOff,
        ),
        r(
            "transfer-encoding: folded onto the previous line",
            b"POST / HTTP/1.1\r\nHost: a\r\n Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\nabc"
                .to_vec(),
            HandOff,
        ),
        r(
            "transfer-encoding: vertical tab",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: \x0bchunked\r\n\r\n0\r\n\r\n".to_vec(),
            HandOff,
        ),
        r(
            "transfer-encoding: chunked then identity",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n"
                .to_vec(),
            Reject(501),
        ),
        r(
            "transfer-encoding: chunked, chunked",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n".to_vec(),
            Reject(501),
        ),
        r(
            "transfer-encoding: gzip, chunked",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n".to_vec(),
            Reject(501),
        ),
        r(
            "transfer-encoding: empty",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: \r\n\r\n".to_vec(),
            Reject(501),
        ),
        // Every list element counts, empty ones too: hyper refuses a coding list whose last
        // element is not `chunked`, and canaryd accepts nothing hyper refuses.
        r(
            "transfer-encoding: chunked with a trailing comma",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked,\r\n\r\n0\r\n\r\n".to_vec(),
            Reject(501),
        ),
        r(
            "transfer-encoding: chunked, then an empty field",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: \r\n\r\n0\r\n\r\n"
                .to_vec(),
            Reject(501),
        ),
        r(
            "transfer-encoding: leading comma",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: , chunked\r\n\r\n0\r\n\r\n".to_vec(),
            Reject(501),
        ),
        r(
            "transfer-encoding on HTTP/1.0",
            b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(),
            HandOff,
        ),
        // Both framings, and bad lengths.
        r(
            "CL.TE",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG"
                .to_vec(),
            Reject(400),
        ),
        r(
            "TE.CL",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n"
                .to_vec(),
            Reject(400),
        ),
        r(
            "TE.CL with content-length 0",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
                .to_vec(),
            Reject(400),
        ),
        r(
            "duplicate content-length, equal",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello".to_vec(),
            Complete,
        ),
        r(
            "duplicate content-length, different",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!".to_vec(),
            Reject(400),
        ),
        r(
            "content-length list",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\nhello".to_vec(),
            Reject(400),
        ),
        r(
            "content-length with a no-break space",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\xc2\xa0\r\n\r\nhello".to_vec(),
            Reject(400),
        ),
        r(
            "content-length +5",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\nhello".to_vec(),
            Reject(400),
        ),
        r(
            "content-length -1",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n".to_vec(),
            Reject(400),
        ),
        r(
            "content-length hex",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x5\r\n\r\nhello".to_vec(),
            Reject(400),
        ),
        r(
            "content-length 20 digits",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 18446744073709551616\r\n\r\n".to_vec(),
            Reject(400),
        ),
        r(
            "content-length empty",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: \r\n\r\n".to_vec(),
            Reject(400),
        ),
        // Line endings, folding, control bytes.
        r(
            "obs-fold",
            b"GET / HTTP/1.1\r\nHost: a\r\nX-Folded: a\r\n b\r\n\r\n".to_vec(),
            HandOff,
        ),
        r(
            "bare LF line endings",
            b"GET / HTTP/1.1\nHost: a\nContent-Length: 2\n\nhi".to_vec(),
            Complete,
        ),
        r(
            "bare LF ends the head",
            b"GET / HTTP/1.1\r\nHost: a\r\n\n".to_vec(),
            Complete,
        ),
        r(
            "bare CR",
            b"GET / HTTP/1.1\rHost: a\r\n\r\n".to_vec(),
            HandOff,
        ),
        r(
            "NUL in a value",
            b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\x00b\r\n\r\n".to_vec(),
            HandOff,
        ),
        r(
            "NUL in the target",
            b"GET /\x00 HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(),
            HandOff,
        ),
        r(
            "NUL before the method",
            b"\x00GET / HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(),
            HandOff,
        ),
        r(
            "two spaces in the request line",
            b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(),
            HandOff,
        ),
        r(
            "space in a field name",
            b"GET / HTTP/1.1\r\nHost: a\r\nBad Name: x\r\n\r\n".to_vec(),
            HandOff,
        ),
        r(
            "empty field name",
            b"GET / HTTP/1.1\r\nHost: a\r\n: x\r\n\r\n".to_vec(),
            HandOff,
        ),
        // `http::Uri` takes both (so does hyper).
        r(
            "non-ASCII target",
            b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(),
            Complete,
        ),
        r(
            "target with a fragment",
            b"GET /a#frag HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(),
            Complete,
        ),
        r(
            "target with braces",
            b"GET /a{b} HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(),
            Complete,
        ),
        // Expectations, versions, upgrades.
        r(
            "unknown expectation",
            b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 200-ok\r\nContent-Length: 2\r\n\r\nhi".to_vec(),
            Reject(417),
        ),
        r("HTTP/1.0", b"GET / HTTP/1.0\r\n\r\n".to_vec(), HandOff),
        r("HTTP/1.2", b"GET / HTTP/1.2\r\nHost: a\r\n\r\n".to_vec(), HandOff),
        r(
            "HTTP/2 preface",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
            HandOff,
        ),
        r(
            "websocket upgrade",
            b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n".to_vec(),
            HandOff,
        ),
        // Sizes.
        r(
            "101 fields",
            cat(&[b"GET / HTTP/1.1\r\n", &fields(101), b"\r\n"]),
            HandOff,
        ),
        r(
            "1000 fields",
            cat(&[b"GET / HTTP/1.1\r\n", &fields(1000), b"\r\n"]),
            HandOff,
        ),
        r(
            "head over the limit, complete",
            cat(&[b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: ", &big_value, b"\r\n\r\n"]),
            Reject(431),
        ),
        r(
            "head over the limit, unfinished",
            cat(&[b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: ", &big_value]),
            Reject(431),
        ),
        r(
            "unfinished head",
            b"GET / HTTP/1.1\r\nHost: a\r\n".to_vec(),
            Partial,
        ),
        r(
            "chunked head, malformed body",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n".to_vec(),
            Complete,
        ),
        r(
            "chunked head, bare LF in the body",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\n0\n\n".to_vec(),
            Complete,
        ),
        r(
            "chunked, whitespace after the size",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5 \t\r\nhello\r\n0\r\n\r\n".to_vec(),
            Complete,
        ),
        r(
            "chunked, whitespace before the size",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n 5\r\nhello\r\n0\r\n\r\n".to_vec(),
            Complete,
        ),
        r(
            "chunked, obs-text and a quoted semicolon in extensions",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;a=\xff;b=\"c;d\"\r\nhello\r\n0\r\n\r\n"
                .to_vec(),
            Complete,
        ),
        r(
            "chunked, CR inside an extension",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;a\rb\r\nhello\r\n0\r\n\r\n".to_vec(),
            Complete,
        ),
        r(
            "chunked, 16-digit size",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0000000000000005\r\nhello\r\n0\r\n\r\n"
                .to_vec(),
            Complete,
        ),
        r(
            "chunked, framing fields in the trailers",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTrailer: content-length, x-sum\r\n\r\n\
              5\r\nhello\r\n0\r\nContent-Length: 99\r\nTransfer-Encoding: gzip\r\nx-sum: 1\r\n\r\n"
                .to_vec(),
            Complete,
        ),
        r(
            "chunked, bare LF in the trailers",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nx-sum: 1\n\r\n".to_vec(),
            Complete,
        ),
        r(
            "chunked, no CRLF after the data",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello0\r\n\r\n".to_vec(),
            Complete,
        ),
        r(
            "chunked head, chunk size overflow",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000005\r\nhello\r\n0\r\n\r\n"
                .to_vec(),
            Complete,
        ),
    ]
}

/// The response corpus.
pub fn responses() -> Vec<Response> {
    let r = |name, bytes: Vec<u8>| Response {
        name,
        bytes,
        head_request: false,
    };
    let big = vec![b'a'; 70 * 1024];
    vec![
        r("200 content-length", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello".to_vec()),
        r(
            "200 chunked, extensions and trailers",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-sum\r\n\r\n\
              5;a=b\r\nhello\r\n0;last\r\nx-sum: 1\r\nset-cookie: s\r\n\r\n"
                .to_vec(),
        ),
        r(
            "gzip, chunked",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n".to_vec(),
        ),
        r(
            "identity coding",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\n\r\nabc".to_vec(),
        ),
        r(
            "70 KB head",
            cat(&[b"HTTP/1.1 200 OK\r\nX-Big: ", &big, b"\r\nContent-Length: 0\r\n\r\n"]),
        ),
        r(
            "70 KB head, unfinished",
            cat(&[b"HTTP/1.1 200 OK\r\nX-Big: ", &big]),
        ),
        r(
            "100 Continue then 200",
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec(),
        ),
        r(
            "103 Early Hints twice then 200",
            b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\nHTTP/1.1 103 Early Hints\r\n\r\n\
              HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
                .to_vec(),
        ),
        r(
            "101 Switching Protocols",
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n\x81\x00".to_vec(),
        ),
        r(
            "204 with a content-length",
            b"HTTP/1.1 204 No Content\r\nContent-Length: 9\r\n\r\n".to_vec(),
        ),
        r(
            "304 with chunked",
            b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec(),
        ),
        r(
            "HTTP/1.0 until close",
            b"HTTP/1.0 200 OK\r\n\r\nall of this is the body".to_vec(),
        ),
        r(
            "HTTP/1.0 keep-alive",
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\nx".to_vec(),
        ),
        r(
            "both framings",
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
                .to_vec(),
        ),
        r(
            "duplicate content-length, different",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!".to_vec(),
        ),
        r(
            "duplicate content-length, equal",
            b"HTTP/1.1 200 OK\r\nContent-Length: 05\r\ncontent-length: 5\r\n\r\nhello".to_vec(),
        ),
        r(
            "content-length with a no-break space",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\xc2\xa0\r\n\r\nhello".to_vec(),
        ),
        r(
            "obs-fold",
            b"HTTP/1.1 200 OK\r\nX-Folded: a\r\n b\r\nContent-Length: 0\r\n\r\n".to_vec(),
        ),
        r(
            "bare LF",
            b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok".to_vec(),
        ),
        r("status 999", b"HTTP/1.1 999 Odd\r\nContent-Length: 0\r\n\r\n".to_vec()),
        r("no reason phrase", b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n".to_vec()),
        r("two-digit status", b"HTTP/1.1 20 OK\r\n\r\n".to_vec()),
        r(
            "connection close",
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx".to_vec(),
        ),
        r(
            "connection names a field",
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive, x-private\r\nKeep-Alive: timeout=5\r\nx-private: 1\r\n\
              Proxy-Connection: x\r\nContent-Length: 0\r\n\r\n"
                .to_vec(),
        ),
        Response {
            name: "HEAD response with a length",
            bytes: b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
                .to_vec(),
            head_request: true,
        },
        Response {
            name: "HEAD response, chunked",
            bytes: b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec(),
            head_request: true,
        },
        r("unfinished head", b"HTTP/1.1 200 OK\r\nContent-Le".to_vec()),
        r(
            "NUL in a value",
            b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 0\r\n\r\n".to_vec(),
        ),
        r("SSH banner", b"SSH-2.0-OpenSSH_9.2\r\n\r\n".to_vec()),
        r(
            "101 fields",
            cat(&[b"HTTP/1.1 200 OK\r\n", &fields(101), b"\r\n"]),
        ),
        r(
            "pipelined responses",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\naHTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n\
              HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nb\r\n0\r\n\r\n"
                .to_vec(),
        ),
        r(
            "chunked response, malformed body",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\n0\r\n\r\n".to_vec(),
        ),
    ]
}

/// The chunked-body corpus.
pub fn chunked() -> Vec<Chunked> {
    let c = |name, announced, bytes: Vec<u8>| Chunked {
        name,
        announced,
        bytes,
    };
    let long_ext = cat(&[b"5;", &vec![b'x'; 1100], b"\r\nhello\r\n0\r\n\r\n"]);
    let line_at_limit = cat(&[b"5;", &vec![b'x'; 1024 - 5], b"\r\nhello\r\n0\r\n\r\n"]);
    let big_trailer = cat(&[b"0\r\nx-sum: ", &vec![b'a'; 17 * 1024], b"\r\n\r\n"]);
    let big_bad_trailer = cat(&[b"0\r\nx-sum: ", &vec![b'a'; 17 * 1024], b"\x00\r\n\r\n"]);
    let many: Vec<u8> = (0..200u8)
        .flat_map(|i| format!("1\r\n{}\r\n", char::from(b'a' + i % 26)).into_bytes())
        .chain(b"0\r\n\r\n".iter().copied())
        .collect();
    vec![
        c("one chunk", "", b"5\r\nhello\r\n0\r\n\r\n".to_vec()),
        c("empty body", "", b"0\r\n\r\n".to_vec()),
        c(
            "extensions",
            "",
            b"5;a=b;c\r\nhello\r\n3 ; q=\"x;y\"\r\nabc\r\n0;end\r\n\r\n".to_vec(),
        ),
        c(
            "trailers, announced and not",
            "x-sum, set-cookie",
            b"5\r\nhello\r\n0\r\nx-sum: 1\r\nset-cookie: a\r\nx-other: 2\r\n\r\n".to_vec(),
        ),
        c(
            "next message follows",
            "",
            b"A\r\n0123456789\r\n0\r\n\r\nGET / HTTP/1.1\r\n\r\n".to_vec(),
        ),
        c(
            "hex digits, both cases",
            "",
            b"a\r\n0123456789\r\nB\r\n0123456789a\r\n0\r\n\r\n".to_vec(),
        ),
        c(
            "leading zeros, 16 digits",
            "",
            b"0000000000000005\r\nhello\r\n0\r\n\r\n".to_vec(),
        ),
        c(
            "17 digits",
            "",
            b"00000000000000005\r\nhello\r\n0\r\n\r\n".to_vec(),
        ),
        c("size overflow", "", b"10000000000000000\r\n".to_vec()),
        c(
            "huge size, data never all there",
            "",
            b"ffffffffffffffff\r\nsome of it".to_vec(),
        ),
        c(
            "bare LF after the size",
            "",
            b"5\nhello\r\n0\r\n\r\n".to_vec(),
        ),
        c(
            "bare LF after the data",
            "",
            b"5\r\nhello\n0\r\n\r\n".to_vec(),
        ),
        c("data not followed by CRLF", "", b"5\r\nhelloXX".to_vec()),
        c("data followed by CR only", "", b"5\r\nhello\rX".to_vec()),
        c(
            "NUL in an extension",
            "",
            b"5;a\x00\r\nhello\r\n0\r\n\r\n".to_vec(),
        ),
        c(
            "whitespace before CRLF",
            "",
            b"5 \t\r\nhello\r\n0\r\n\r\n".to_vec(),
        ),
        c(
            "whitespace before the size",
            "",
            b" 5\r\nhello\r\n0\r\n\r\n".to_vec(),
        ),
        c("negative size", "", b"-5\r\nhello\r\n0\r\n\r\n".to_vec()),
        c("0x prefix", "", b"0x5\r\nhello\r\n0\r\n\r\n".to_vec()),
        c("size line too long", "", long_ext),
        c("size line at the limit", "", line_at_limit),
        c("trailer with a bare LF", "x", b"0\r\nx: 1\n\r\n".to_vec()),
        c("bare LF ends the trailers", "", b"0\r\n\n".to_vec()),
        c(
            "invalid trailer field",
            "",
            b"0\r\nbad field\r\n\r\n".to_vec(),
        ),
        c("trailer section too large", "x-sum", big_trailer),
        c(
            "trailer section too large, NUL past the limit",
            "x-sum",
            big_bad_trailer,
        ),
        c(
            "empty size line",
            "",
            b"5\r\nhello\r\n\r\n0\r\n\r\n".to_vec(),
        ),
        c("unfinished", "", b"5\r\nhello\r\n0\r\n".to_vec()),
        c("200 one-byte chunks", "", many),
    ]
}
