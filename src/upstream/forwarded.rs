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
