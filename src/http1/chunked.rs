//! The chunked transfer coding (RFC 9112 §7.1): a decoder that works on whatever bytes have
//! arrived, and the encoder's pieces.
//!
//! The decoder is strict where a parser that forwards must be: chunk sizes are 1 to 16 hex
//! digits, every line ends in CRLF (a bare LF is an error), chunk extensions are skipped but
//! bounded, and the trailer section is parsed as fields and bounded like a head.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};

use super::fields::{filter_trailers, trailer_allowed};
use super::MAX_HEADERS;

/// The longest chunk-size line accepted, extensions included.
pub const MAX_SIZE_LINE: usize = 1024;
/// The largest trailer section accepted.
pub const MAX_TRAILERS: usize = 16 * 1024;

/// Why a chunked body is malformed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    /// A chunk-size line that is not hex digits, optional extensions and CRLF.
    #[error("invalid chunk size line")]
    SizeLine,
    /// A chunk-size line longer than [`MAX_SIZE_LINE`].
    #[error("chunk size line too long")]
    SizeLineTooLong,
    /// A chunk size that does not fit in 64 bits.
    #[error("chunk size too large")]
    SizeTooLarge,
    /// Chunk data not followed by CRLF.
    #[error("chunk data not followed by CRLF")]
    DataEnd,
    /// A trailer section that is not valid fields and an empty line.
    #[error("invalid trailer section")]
    Trailers,
    /// A trailer section larger than [`MAX_TRAILERS`].
    #[error("trailer section too large")]
    TrailersTooLarge,
}

/// What the decoder produced.
#[derive(Debug, PartialEq)]
pub enum Step {
    /// Body data (part of one chunk).
    Data(Bytes),
    /// The body is complete; the trailer fields that may be forwarded (see
    /// [`ChunkedDecoder::new`]), if any.
    End(Option<HeaderMap>),
    /// More bytes are needed.
    Partial,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Expecting a chunk-size line.
    Size,
    /// This many bytes of chunk data remain.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer fields, then an empty line.
    Trailers,
    /// Complete.
    Done,
}

/// Decodes a chunked body from the bytes at the front of a buffer, consuming them as it goes.
#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    state: State,
    /// The message's `Trailer` values: which trailer fields may pass.
    announced: Vec<HeaderValue>,
}

impl ChunkedDecoder {
    /// A decoder at the start of a body. Trailer fields pass only when `announced` (the
    /// message's `Trailer` values) lists them and [`super::fields::trailer_allowed`] allows
    /// them; the rest are parsed, checked and dropped.
    pub fn new(announced: Vec<HeaderValue>) -> Self {
        ChunkedDecoder {
            state: State::Size,
            announced,
        }
    }

    /// Whether the last chunk and the trailer section have been read.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Bytes of the current chunk's data still to come (0 between chunks).
    pub fn remaining_in_chunk(&self) -> u64 {
        match self.state {
            State::Data(n) => n,
            _ => 0,
        }
    }

    /// Decodes from the front of `buf`: the next piece of data (at most `max` bytes, shared
    /// with `buf`'s allocation, not copied), the end of the body, or [`Step::Partial`] when
    /// `buf` holds too little. Consumes exactly what it decodes.
    pub fn next(&mut self, buf: &mut BytesMut, max: usize) -> Result<Step, ChunkError> {
        loop {
            match self.state {
                State::Done => return Ok(Step::End(None)),
                State::Size => match size_line(buf)? {
                    None => return Ok(Step::Partial),
                    Some((used, size)) => {
                        buf.advance(used);
                        self.state = if size == 0 {
                            State::Trailers
                        } else {
                            State::Data(size)
                        };
                    }
                },
                State::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Step::Partial);
                    }
                    let take = buf
                        .len()
                        .min(usize::try_from(left).unwrap_or(usize::MAX))
                        .min(max.max(1));
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        State::DataEnd
                    } else {
                        State::Data(left)
                    };
                    return Ok(Step::Data(buf.split_to(take).freeze()));
                }
                State::DataEnd => match buf.get(..2) {
                    None if buf.first().is_some_and(|&b| b != b'\r') => {
                        return Err(ChunkError::DataEnd)
                    }
                    None => return Ok(Step::Partial),
                    Some(b"\r\n") => {
                        buf.advance(2);
                        self.state = State::Size;
                    }
                    Some(_) => return Err(ChunkError::DataEnd),
                },
                State::Trailers => {
                    let Some(trailers) = self.trailers(buf)? else {
                        return Ok(Step::Partial);
                    };
                    self.state = State::Done;
                    return Ok(Step::End(trailers));
                }
            }
        }
    }

    /// Decodes as much as `buf` holds into `out`, copying, until `out` holds `max` bytes or
    /// more; for many small chunks, one piece of data instead of one per chunk. Returns
    /// whether the body ended, and its forwardable trailers.
    pub fn decode_into(
        &mut self,
        buf: &mut BytesMut,
        out: &mut BytesMut,
        max: usize,
    ) -> Result<Option<Option<HeaderMap>>, ChunkError> {
        while out.len() < max {
            match self.next(buf, max - out.len())? {
                Step::Data(data) => out.extend_from_slice(&data),
                Step::End(trailers) => return Ok(Some(trailers)),
                Step::Partial => break,
            }
        }
        Ok(None)
    }

    /// Parses the trailer section at the front of `buf` once it is complete.
    fn trailers(&self, buf: &mut BytesMut) -> Result<Option<Option<HeaderMap>>, ChunkError> {
        if buf.starts_with(b"\r\n") {
            buf.advance(2);
            return Ok(Some(None));
        }
        if buf.len() < 2 && buf.first().is_none_or(|&b| b == b'\r') {
            return Ok(None);
        }
        let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let (used, fields) = match httparse::parse_headers(buf, &mut slots) {
            Ok(httparse::Status::Complete((used, fields))) if used <= MAX_TRAILERS => {
                (used, fields)
            }
            Ok(httparse::Status::Complete(_)) => return Err(ChunkError::TrailersTooLarge),
            Ok(httparse::Status::Partial) if buf.len() > MAX_TRAILERS => {
                return Err(ChunkError::TrailersTooLarge)
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(_) => return Err(ChunkError::Trailers),
        };
        // httparse accepts a bare LF as a line end; a forwarding parser does not.
        if buf[..used]
            .windows(2)
            .any(|w| w[1] == b'\n' && w[0] != b'\r')
            || buf.first() == Some(&b'\n')
        {
            return Err(ChunkError::Trailers);
        }
        let mut map = HeaderMap::with_capacity(fields.len());
        for f in fields.iter() {
            let name =
                HeaderName::from_bytes(f.name.as_bytes()).map_err(|_| ChunkError::Trailers)?;
            let value = HeaderValue::from_bytes(f.value).map_err(|_| ChunkError::Trailers)?;
            map.append(name, value);
        }
        buf.advance(used);
        filter_trailers(&mut map, &self.announced);
        Ok(Some((!map.is_empty()).then_some(map)))
    }
}

/// Parses a chunk-size line at the front of `buf`: `(bytes used, size)`, or `None` when the
/// line is not complete yet.
fn size_line(buf: &[u8]) -> Result<Option<(usize, u64)>, ChunkError> {
    let mut size: u64 = 0;
    let mut digits = 0;
    let mut i = 0;
    while let Some(&b) = buf.get(i) {
        let d = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            b'A'..=b'F' => b - b'A' + 10,
            _ => break,
        };
        if digits == 16 {
            return Err(ChunkError::SizeTooLarge);
        }
        size = size << 4 | u64::from(d);
        digits += 1;
        i += 1;
    }
    if i == buf.len() {
        return if i > 16 {
            Err(ChunkError::SizeLineTooLong)
        } else {
            Ok(None)
        };
    }
    if digits == 0 {
        return Err(ChunkError::SizeLine);
    }
    // Optional whitespace, then extensions (`;name[=value]`, skipped), then CRLF.
    let rest = &buf[i..];
    let Some(cr) = rest.iter().position(|&b| b == b'\r' || b == b'\n') else {
        return if buf.len() > MAX_SIZE_LINE {
            Err(ChunkError::SizeLineTooLong)
        } else {
            Ok(None)
        };
    };
    if i + cr + 2 > MAX_SIZE_LINE {
        return Err(ChunkError::SizeLineTooLong);
    }
    let between = &rest[..cr];
    let ws = between
        .iter()
        .position(|&b| b != b' ' && b != b'\t')
        .unwrap_or(between.len());
    let ext = &between[ws..];
    if !ext.is_empty()
        && (ext[0] != b';' || ext.iter().any(|&b| b < 0x20 && b != b'\t' || b == 0x7f))
    {
        return Err(ChunkError::SizeLine);
    }
    match rest.get(cr..cr + 2) {
        Some(b"\r\n") => Ok(Some((i + cr + 2, size))),
        None if rest[cr] == b'\r' => Ok(None),
        _ => Err(ChunkError::SizeLine),
    }
}

/// Writes a chunk-size line: `len` in hex and CRLF.
pub fn put_size(buf: &mut BytesMut, len: usize) {
    let digits = (usize::BITS - len.leading_zeros()).div_ceil(4).max(1);
    buf.reserve(digits as usize + 2);
    for i in (0..digits).rev() {
        buf.put_u8(b"0123456789abcdef"[(len >> (4 * i)) & 0xf]);
    }
    buf.put_slice(b"\r\n");
}

/// Writes the last chunk, the trailer fields (if any; those [`trailer_allowed`] refuses are
/// left out, whoever parsed them) and the final CRLF.
pub fn put_end(buf: &mut BytesMut, trailers: Option<&HeaderMap>) {
    buf.put_slice(b"0\r\n");
    for (name, value) in trailers.into_iter().flatten() {
        if trailer_allowed(name) {
            super::head::put_field(buf, name.as_str().as_bytes(), value.as_bytes());
        }
    }
    buf.put_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `wire` fed in pieces of `step` bytes; the data and the trailers.
    pub(crate) fn decode(
        wire: &[u8],
        step: usize,
        announced: &str,
    ) -> Result<(Vec<u8>, Option<HeaderMap>, usize), ChunkError> {
        let announced = if announced.is_empty() {
            vec![]
        } else {
            vec![HeaderValue::from_str(announced).expect("value")]
        };
        let mut d = ChunkedDecoder::new(announced);
        let mut buf = BytesMut::new();
        let mut data = Vec::new();
        for piece in wire.chunks(step.max(1)) {
            buf.extend_from_slice(piece);
            loop {
                match d.next(&mut buf, usize::MAX)? {
                    Step::Data(b) => data.extend_from_slice(&b),
                    Step::End(t) => return Ok((data, t, buf.len())),
                    Step::Partial => break,
                }
            }
        }
        panic!("the body never ended: {wire:?}")
    }

    #[test]
    fn chunked_bodies_decode_at_every_split() {
        let wire =
            b"5\r\nhello\r\nA;ext=1\r\n0123456789\r\n0\r\nx-sum: 1\r\nset-cookie: a\r\n\r\nNEXT";
        for step in 1..wire.len() {
            let (data, trailers, left) = decode(wire, step, "x-sum, set-cookie").expect("valid");
            assert_eq!(data, b"hello0123456789");
            let trailers = trailers.expect("trailers");
            assert_eq!(trailers.len(), 1, "set-cookie is never a trailer");
            assert_eq!(trailers["x-sum"], "1");
            assert!(left <= 4, "only the next message stays");
        }
        let (_, trailers, _) = decode(b"0\r\nx-sum: 1\r\n\r\n", 3, "").expect("valid");
        assert_eq!(trailers, None, "unannounced trailers are dropped");
    }

    #[test]
    fn malformed_chunked_bodies_are_errors() {
        for (wire, err) in [
            (&b"5\r\nhello\r\nZZ\r\n"[..], ChunkError::SizeLine),
            (b"5\r\nhelloXX", ChunkError::DataEnd),
            (b"5\nhello\r\n0\r\n\r\n", ChunkError::SizeLine),
            (b"-5\r\n", ChunkError::SizeLine),
            (b"\r\n", ChunkError::SizeLine),
            (b"0x5\r\n", ChunkError::SizeLine),
            (b"5 x\r\n", ChunkError::SizeLine),
            (b"5;a\x00\r\n", ChunkError::SizeLine),
            (b"11111111111111111\r\n", ChunkError::SizeTooLarge),
            (b"0\r\nbad field\r\n\r\n", ChunkError::Trailers),
            (b"0\r\nx: 1\n\r\n", ChunkError::Trailers),
        ] {
            assert_eq!(decode(wire, wire.len(), "").err(), Some(err), "{wire:?}");
        }
        let mut long = b"5;".to_vec();
        long.extend(std::iter::repeat_n(b'x', MAX_SIZE_LINE));
        assert_eq!(
            decode(&long, 7, "").err(),
            Some(ChunkError::SizeLineTooLong)
        );
        let mut big = b"0\r\nx: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', MAX_TRAILERS));
        assert_eq!(
            decode(&big, 4096, "").err(),
            Some(ChunkError::TrailersTooLarge)
        );
    }

    #[test]
    fn small_chunks_are_gathered_into_one_piece() {
        let mut wire = BytesMut::new();
        for i in 0..1000u32 {
            wire.extend_from_slice(format!("1\r\n{}\r\n", i % 10).as_bytes());
        }
        wire.extend_from_slice(b"0\r\n\r\n");
        let mut d = ChunkedDecoder::new(vec![]);
        let mut out = BytesMut::new();
        assert_eq!(
            d.decode_into(&mut wire, &mut out, 600).expect("valid"),
            None
        );
        assert_eq!(out.len(), 600);
        out.clear();
        assert_eq!(
            d.decode_into(&mut wire, &mut out, 16 * 1024)
                .expect("valid"),
            Some(None)
        );
        assert_eq!(out.len(), 400);
        assert!(wire.is_empty());
    }

    #[test]
    fn sizes_and_ends_encode() {
        for n in [0, 1, 15, 16, 255, 4096, 0x12345, usize::MAX] {
            let mut b = BytesMut::new();
            put_size(&mut b, n);
            assert_eq!(&b[..], format!("{n:x}\r\n").as_bytes());
        }
        let mut t = HeaderMap::new();
        t.insert("x-sum", HeaderValue::from_static("1"));
        t.insert("content-length", HeaderValue::from_static("1"));
        let mut b = BytesMut::new();
        put_end(&mut b, Some(&t));
        assert_eq!(&b[..], b"0\r\nx-sum: 1\r\n\r\n");
    }
}
