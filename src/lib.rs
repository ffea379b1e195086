//! canaryd: an L7 reverse proxy that splits HTTP traffic between a stable and canary upstreams,
//! sticky by user id, with hot-swapped weights.
//!
//! # Layout
//!
//! Folders by concern; imports run one way, from the top of this list to the bottom (checked
//! by `.ci/imports.py`: no cycle among files or folders).
//!
//! - `main.rs`: the command line only.
//! - [`app`]: `run(config, listeners, shutdown)`: wiring, nothing else.
//! - `admin/`: the admin API (weights, promote, rollback, reset, status, route, preview,
//!   metrics), its auth, its listener's loop, and the dashboard page (`dashboard`: HTML, CSS
//!   and JS compiled in).
//! - `server/`: downstream: the accept loop (connection slots, TLS handshakes), a
//!   connection's life (`conn`), what ends it (`guard`: request-head and idle timeouts, the
//!   stop signal), and canaryd's HTTP/1.1 server side (`h1`), which hands HTTP/2, upgrades,
//!   HTTP/1.0 and heads httparse refuses to hyper at a request boundary.
//! - `proxy/`: the per-request service: the edge's rules and one pass over the header fields
//!   (`request`), route, forward, failures mapped to statuses and the client's response
//!   (`response`), WebSocket tunnels (`upgrade`), and what a connection learns of its
//!   requests (`activity`).
//! - [`release`]: off the data path: the outcome channel ([`release::outcome`]), the
//!   rollback circuit task ([`release::circuit`]), the progressive rollout
//!   ([`release::rollout`]: a pure state machine and its driver), the webhooks it calls
//!   ([`release::webhook`]) and the warmup of a new build ([`release::warmup`]).
//! - [`control`]: owns the running config, admin overrides and trips, and publishes the
//!   immutable snapshot requests read; the state file ([`control::state`]) and the config and
//!   certificate reload tasks ([`control::reload`]).
//! - `upstream/`: one client per upstream, kept across reloads, both canaryd's own: HTTP/1.1
//!   (`h1`: a pool whose connections are driven by the request that holds them) and HTTP/2
//!   (`h2`, on the `h2` crate: multiplexed connections filled up to the upstream's stream
//!   limit); how connections are opened (`dial`); the `X-Forwarded-*` fields; whose fault a
//!   failure was (`error`).
//! - [`metrics`]: every metric name in one place; per-arm handles resolved once.
//! - [`tls`]: rustls for both sides: termination with hot-reloaded certificates, upstream
//!   client configs.
//! - [`preview`]: who would move under another table: bucket ranges and the recent users.
//! - `analysis/`: pure statistics over outcomes: the anytime-valid sequential tests behind the
//!   rollback circuit (`sequential`, `compare`), the latency histogram, the recent per-arm
//!   window, `simulate` (the circuit's analysis on simulated traffic), `diff` (a shadow's
//!   answer against the primary's), `drift` (label and score distributions between arms) and
//!   `srm` (the sample-ratio mismatch guard).
//! - [`observe`]: shadow copies and their comparison, and the response analysis, fed by the
//!   body taps of the data path ([`body::Tap`]) and run off it.
//! - [`body`]: request bodies as forwarded (whole, streamed by canaryd's server side, or by
//!   hyper) and the client's faults in them, which are never an arm's failure.
//! - [`http1`]: sans-IO HTTP/1.1, every wire rule both sides share: heads, `Content-Length`,
//!   transfer codings, the chunked coding, trailers, connection tokens, the hop-by-hop list.
//! - [`config`]: the TOML schema, the spanned reader that reports every problem with its key
//!   path and line, validation.
//! - [`routing`]: the bucket rule and the validated weight table; pure.
//! - [`demo`]: built-in model upstreams for `canaryd demo` (uses [`app`]).
//!
//! # A request's way
//!
//! 1. `server` accepts the connection (a slot of `max_connections`, the TLS handshake) and
//!    `server::conn` serves it under its `guard`.
//! 2. An HTTP/1.1 request is parsed by `server::h1` with [`http1`]; its body, if still
//!    arriving, is decoded by the connection's own task into a bounded hand-over
//!    ([`body::streamed`]). Anything else goes to hyper, which serves the rest of the
//!    connection.
//! 3. `proxy` applies the edge's rules, loads the [`control`] snapshot once, and
//!    [`routing`] picks the arm (override, sticky bucket, or random by weight).
//! 4. `upstream` sends it: over HTTP/1.1 the request's own task writes the head and body and
//!    reads the response on a pooled connection, with [`http1`]; over HTTP/2, hyper-util.
//! 5. The response streams back (`server::h1` writes head and small bodies in one write),
//!    naming the arm in a header; its outcome goes to [`release::outcome`] with `try_send`,
//!    and the circuit task judges it off the data path, tripping an arm by publishing a new
//!    snapshot.
//!
//! Reloads and admin calls write new snapshots; the data path only reads them.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub(crate) mod admin;
pub mod analysis;
pub mod app;
pub mod body;
pub mod config;
pub mod control;
pub mod demo;
pub mod http1;
pub mod metrics;
pub mod observe;
pub mod preview;
pub(crate) mod proxy;
pub mod release;
pub mod routing;
pub(crate) mod server;
pub mod tls;
pub(crate) mod upstream;
