//! `chunked_decode`: `ChunkedDecoder` on arbitrary bytes, fed in pieces.
//!
//! Input: one selector byte, then the body. The selector picks the piece size (1 to 32
//! bytes) and how the data is taken (`next` with a `max` of 1, 3, 16 or no bound, or the
//! server's way: `next`, then `decode_into` gathering 16 KiB). The body is decoded whole, in
//! those pieces, and in two pieces cut at a point the selector derives. Checks: no panic; the
//! decoded data never exceed the input (data and bytes left together at most the input); the
//! same data, end (trailers or error) and bytes left every way, except that pieces may make a
//! size limit (size line, trailer section) trip before a syntax error past it is seen.
#![no_main]

use bytes::BytesMut;
use canaryd::http1::chunked::{ChunkError, ChunkedDecoder, Step};
use http::HeaderValue;
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Clone, Copy)]
enum How {
    Next(usize),
    Gather,
}

#[derive(Debug, PartialEq)]
enum End {
    Done(Option<Vec<(String, Vec<u8>)>>),
    Error(ChunkError),
    Unfinished,
}

fn decode(pieces: &[&[u8]], how: How) -> (Vec<u8>, End, BytesMut) {
    let mut d = ChunkedDecoder::new(vec![HeaderValue::from_static("x-sum, x-a, content-length")]);
    let mut buf = BytesMut::new();
    let mut data = Vec::new();
    let mut pieces = pieces.iter();
    let end = 'outer: loop {
        let Some(piece) = pieces.next() else {
            break End::Unfinished;
        };
        buf.extend_from_slice(piece);
        loop {
            let step = match how {
                How::Next(max) => d.next(&mut buf, max),
                How::Gather => match d.next(&mut buf, usize::MAX) {
                    Ok(Step::Data(first)) => {
                        data.extend_from_slice(&first);
                        let mut out = BytesMut::new();
                        let end = d.decode_into(&mut buf, &mut out, 16 * 1024);
                        data.extend_from_slice(&out);
                        match end {
                            Ok(Some(t)) => Ok(Step::End(t)),
                            Ok(None) => continue,
                            Err(e) => Err(e),
                        }
                    }
                    other => other,
                },
            };
            match step {
                Ok(Step::Data(b)) => {
                    assert!(!b.is_empty());
                    if let How::Next(max) = how {
                        assert!(b.len() <= max.max(1));
                    }
                    data.extend_from_slice(&b);
                }
                Ok(Step::End(t)) => {
                    assert!(d.is_done());
                    break 'outer End::Done(t.map(|t| {
                        t.iter()
                            .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
                            .collect()
                    }));
                }
                Ok(Step::Partial) => break,
                Err(e) => break 'outer End::Error(e),
            }
        }
    };
    for piece in pieces {
        buf.extend_from_slice(piece);
    }
    (data, end, buf)
}

fn same(whole: &(Vec<u8>, End, BytesMut), other: &(Vec<u8>, End, BytesMut), what: &str) {
    if let (End::Error(_), End::Error(ChunkError::TrailersTooLarge | ChunkError::SizeLineTooLong)) =
        (&whole.1, &other.1)
    {
        assert_eq!(whole.0, other.0, "{what}: data before the error");
        return;
    }
    assert_eq!(whole.0, other.0, "{what}: data");
    assert_eq!(whole.1, other.1, "{what}: end");
    assert_eq!(whole.2, other.2, "{what}: bytes left");
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, wire)) = data.split_first() else {
        return;
    };
    let piece = 1 + (sel & 0x1f) as usize;
    let how = match sel >> 5 {
        0 | 5 => How::Next(usize::MAX),
        1 => How::Next(1),
        2 => How::Next(3),
        3 | 6 => How::Next(16),
        _ => How::Gather,
    };
    let whole = decode(&[wire], How::Next(usize::MAX));
    assert!(
        whole.0.len() + whole.2.len() <= wire.len(),
        "more out than in"
    );
    let pieces: Vec<&[u8]> = wire.chunks(piece).collect();
    same(&whole, &decode(&pieces, how), "pieces");
    let k = sel as usize * (wire.len() + 1) / 256;
    same(
        &whole,
        &decode(&[&wire[..k], &wire[k..]], how),
        "two pieces",
    );
});
