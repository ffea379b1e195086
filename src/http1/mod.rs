//! Sans-IO HTTP/1.1: every wire rule canaryd's server side (downstream) and client side
//! (upstream) share, with no sockets and no clock.
//!
//! - [`head`]: request and response heads, parsed and encoded; the framing they announce.
//! - [`fields`]: `Content-Length` (ASCII digits only; duplicates only when equal, then one
//!   canonical value), transfer codings (`chunked` alone), `Connection` tokens, the one
//!   hop-by-hop list, `Host`, and which trailer fields may pass.
//! - [`chunked`]: the chunked coding's decoder (bounded size lines and trailer sections) and
//!   encoder pieces.
//!
//! The limits apply to complete and incomplete heads alike: a head is refused as soon as it
//! is longer than the limit, whether or not its end has arrived.

pub mod chunked;
pub mod fields;
pub mod head;

/// The most header fields a head may have, as in hyper.
pub const MAX_HEADERS: usize = 100;
/// The largest response head (status line and fields) accepted, as in hyper.
pub const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// How a message body is framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyLength {
    /// No body (or a length of 0).
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}
