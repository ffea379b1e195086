//! The `X-Forwarded-*` fields canaryd sets on every upstream request.

use http::header::{HeaderMap, HeaderName, HeaderValue};

/// `X-Forwarded-For`.
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `X-Forwarded-Proto`.
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// `X-Forwarded-Host`.
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// The `X-Forwarded-*` fields of an upstream request; they replace any the client sent. The
/// HTTP/1.1 client writes them straight into the request head (adding three fields to the
/// header map hyper parsed would make it grow, a reallocation and rehash, on most requests);
/// for HTTP/2 they are set in the header map.
#[derive(Debug, Clone)]
pub struct Forwarded {
    /// `X-Forwarded-For`: the client's list, if any, with the peer appended.
    pub for_: HeaderValue,
    /// `X-Forwarded-Proto`: `http` or `https`.
    pub proto: HeaderValue,
    /// `X-Forwarded-Host`: the host the client asked for, if it named one.
    pub host: Option<HeaderValue>,
}

impl Forwarded {
    /// The fields with their names, in the order they are sent.
    pub fn fields(&self) -> impl Iterator<Item = (&'static HeaderName, &HeaderValue)> {
        [
            (&X_FORWARDED_FOR, Some(&self.for_)),
            (&X_FORWARDED_PROTO, Some(&self.proto)),
            (&X_FORWARDED_HOST, self.host.as_ref()),
        ]
        .into_iter()
        .filter_map(|(n, v)| Some((n, v?)))
    }

    /// Whether `name` is one of the fields these replace.
    pub fn replaces(name: &HeaderName) -> bool {
        *name == X_FORWARDED_FOR || *name == X_FORWARDED_PROTO || *name == X_FORWARDED_HOST
    }

    /// Sets the fields in a header map, replacing the client's.
    pub(crate) fn apply(&self, headers: &mut HeaderMap) {
        if self.host.is_none() {
            headers.remove(&X_FORWARDED_HOST);
        }
        for (name, value) in self.fields() {
            headers.insert(name, value.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;
    use http::Method;

    use super::*;
    use crate::http1::head::encode_request;
    use crate::http1::BodyLength;

    #[test]
    fn request_heads_carry_their_framing_and_forwarding() {
        let mut headers = HeaderMap::new();
        for (n, v) in [
            ("host", "h"),
            ("transfer-encoding", "chunked"),
            ("x-forwarded-for", "10.0.0.1"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "spoofed"),
        ] {
            headers.append(HeaderName::from_static(n), HeaderValue::from_static(v));
        }
        let fwd = Forwarded {
            for_: HeaderValue::from_static("10.0.0.1, 192.0.2.7"),
            proto: HeaderValue::from_static("http"),
            host: Some(HeaderValue::from_static("h")),
        };
        let mut buf = BytesMut::new();
        let head = |buf: &mut BytesMut, fwd: &Forwarded, body| {
            buf.clear();
            encode_request(
                buf,
                &Method::POST,
                "/p?q=1",
                &headers,
                Forwarded::replaces,
                fwd.fields(),
                body,
            );
            String::from_utf8(buf.to_vec()).expect("ascii")
        };
        assert_eq!(
            head(&mut buf, &fwd, BodyLength::Length(3)),
            "POST /p?q=1 HTTP/1.1\r\nhost: h\r\nx-forwarded-for: 10.0.0.1, 192.0.2.7\r\n\
             x-forwarded-proto: http\r\nx-forwarded-host: h\r\ncontent-length: 3\r\n\r\n",
            "the client's x-forwarded-* are replaced, the framing is canaryd's"
        );
        let fwd = Forwarded { host: None, ..fwd };
        assert_eq!(
            head(&mut buf, &fwd, BodyLength::Chunked),
            "POST /p?q=1 HTTP/1.1\r\nhost: h\r\nx-forwarded-for: 10.0.0.1, 192.0.2.7\r\n\
             x-forwarded-proto: http\r\ntransfer-encoding: chunked\r\n\r\n",
            "no x-forwarded-host without a host, not even the client's"
        );
        assert!(head(&mut buf, &fwd, BodyLength::Empty)
            .ends_with("x-forwarded-proto: http\r\ncontent-length: 0\r\n\r\n"));
        let mut h = HeaderMap::new();
        h.insert(&X_FORWARDED_HOST, HeaderValue::from_static("spoofed"));
        fwd.apply(&mut h);
        assert!(!h.contains_key(&X_FORWARDED_HOST));
        assert_eq!(h[&X_FORWARDED_FOR], "10.0.0.1, 192.0.2.7");
    }
}
