//! canaryd: an L7 reverse proxy that splits HTTP traffic between a stable and canary upstreams,
//! sticky by user id, with hot-swapped weights.
//!
//! # Layout
//!
//! - [`config`]: TOML schema and validation that reports every problem with its key path.
//! - [`routing`]: the exact bucket rule of the design (§3) and the validated weight table; pure.
//! - [`control`]: owns the running config and publishes the immutable snapshot requests read.
//! - [`proxy`]: the per-request service: route, forward with streaming bodies, map failures.
//! - [`upstream`]: one client per upstream, kept across reloads: canaryd's own for HTTP/1.1
//!   ([`h1`]), hyper-util's for HTTP/2; the `X-Forwarded-*` fields of a request.
//! - [`http1`]: sans-IO HTTP/1.1, every wire rule both sides share: heads, `Content-Length`,
//!   transfer codings, the chunked coding, trailers, connection tokens, the hop-by-hop list.
//! - [`h1`]: the HTTP/1.1 client: a keep-alive pool whose connections are driven by the
//!   request that holds them, speaking [`http1`] on them.
//! - [`body`]: request bodies as forwarded (whole, streamed by canaryd's server side, or by
//!   hyper) and the client's faults in them, which are never an arm's failure.
//! - [`reload`]: directory watch + SIGHUP → parse → validate → atomic swap.
//! - [`admin`]: the admin API (weights, promote, rollback, reset, status, route, metrics).
//! - [`metrics`]: Prometheus names and per-arm handles resolved once.
//! - [`window`]: sliding per-arm request/error/latency window; pure.
//! - [`circuit`]: the task that feeds windows from request outcomes, off the data path.
//! - [`state`]: the state file (admin overrides, tripped arms), written atomically.
//! - [`tls`]: rustls termination with hot-reloaded certificates; upstream client configs.
//! - [`app`]: binds listeners, runs the accept loop and tasks, drains on shutdown.
//! - [`conn`]: one downstream connection: idle and request-head timeouts, graceful stop, and
//!   the hand-off from canaryd's HTTP/1.1 server side (`h1_server`: HTTP/1.1 requests and
//!   their bodies, parsed and answered by the connection's task) to hyper for the rest
//!   (HTTP/2, upgrades, HTTP/1.0, heads httparse refuses).
//! - [`demo`]: built-in model upstreams for `canaryd demo`.
//!
//! A request: accept ([`app`]) → [`proxy`] loads the snapshot once → [`routing`] picks the arm
//! → [`upstream`] sends, body streaming → response streams back with the arm named in a header.
//! Reload writes new snapshots; the data path only reads.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod app;
pub mod body;
pub mod circuit;
pub mod config;
pub mod conn;
pub mod control;
pub mod demo;
pub mod h1;
mod h1_server;
pub mod http1;
pub mod metrics;
pub mod proxy;
pub mod reload;
pub mod routing;
pub mod state;
pub mod tls;
pub mod upstream;
pub mod window;
