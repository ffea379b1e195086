//! Why no response came back from an upstream, and whose fault that was.

use std::time::Duration;

use crate::body::ClientError;

/// Why no response came back from an upstream.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// TCP connect (or the TLS handshake) failed or timed out.
    #[error("connect failed: {0}")]
    Connect(String),
    /// No response headers within `request_timeout`.
    #[error("no response within {0:?}")]
    Timeout(Duration),
    /// The connection broke or the upstream spoke invalid HTTP.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The client broke, abandoned or was too slow with its request body: not the arm's
    /// failure.
    #[error("{0}")]
    Client(ClientError),
}

/// The `kind` label of `canaryd_upstream_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Connect failed or timed out.
    Connect = 0,
    /// No response headers within `request_timeout`.
    Timeout = 1,
    /// Broken connection or invalid HTTP.
    Protocol = 2,
}

impl FailureKind {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Connect => "connect",
            FailureKind::Timeout => "timeout",
            FailureKind::Protocol => "protocol",
        }
    }
}

impl UpstreamError {
    /// Which kind of failure of the arm this is; `None` for the client's.
    pub fn kind(&self) -> Option<FailureKind> {
        match self {
            UpstreamError::Connect(_) => Some(FailureKind::Connect),
            UpstreamError::Timeout(_) => Some(FailureKind::Timeout),
            UpstreamError::Protocol(_) => Some(FailureKind::Protocol),
            UpstreamError::Client(_) => None,
        }
    }
}

/// An error and its sources, joined; a generic outer message with a more specific source
/// ("client error (Connect)") is skipped.
pub(crate) fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = Vec::new();
    let mut cur = e.source();
    while let Some(s) = cur {
        parts.push(s.to_string());
        cur = s.source();
    }
    if parts.is_empty() {
        e.to_string()
    } else if e.is::<hyper_util::client::legacy::Error>() {
        parts.join(": ")
    } else {
        format!("{e}: {}", parts.join(": "))
    }
}
