//! Edge and model-server protocols end to end: HTTPS termination with ALPN h2/http1.1 and
//! certificate rotation, https upstreams with a private CA and mutual TLS, gRPC over HTTP/2
//! (trailers, server streaming, non-zero grpc-status counted as errors), WebSocket upgrade.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{HeaderMap, Request, Response, StatusCode, Version};
use http_body::Frame;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};

const TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// A small PKI
// ---------------------------------------------------------------------------------------------

struct Ca {
    params: CertificateParams,
    key: KeyPair,
    pem: String,
}

struct Leaf {
    cert_pem: String,
    key_pem: String,
    der: CertificateDer<'static>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().expect("ca key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let pem = params.self_signed(&key).expect("ca cert").pem();
        Ca { params, key, pem }
    }

    fn leaf(&self, cn: &str) -> Leaf {
        let key = KeyPair::generate().expect("leaf key");
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, cn);
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).expect("leaf cert");
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }

    fn roots(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(self.pem.as_bytes()).expect("ca pem"))
            .expect("add root");
        roots
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn client_tls(roots: rustls::RootCertStore, alpn: &[&[u8]]) -> rustls::ClientConfig {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    cfg
}

/// Writes `text` to `path` atomically (write + rename), as cert-manager's volume swap does.
fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write temp");
    std::fs::rename(&tmp, path).expect("rename");
}

/// Writes a leaf's cert and key into `dir`, returns their paths.
fn write_leaf(dir: &Path, leaf: &Leaf, stem: &str) -> (PathBuf, PathBuf) {
    let cert = dir.join(format!("{stem}.crt"));
    let key = dir.join(format!("{stem}.key"));
    write_atomic(&cert, &leaf.cert_pem);
    write_atomic(&key, &leaf.key_pem);
    (cert, key)
}

fn path_str(p: &Path) -> String {
    q(p.to_str().expect("utf-8 path"))
}

fn canary_user() -> String {
    user_in_bucket_range(0..1000)
}

fn stable_user() -> String {
    user_in_bucket_range(1000..10000)
}

// ---------------------------------------------------------------------------------------------
// HTTPS termination
// ---------------------------------------------------------------------------------------------

struct TlsProxy {
    proxy: Proxy,
    _dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
}

async fn tls_proxy(ca: &Ca) -> (TlsProxy, FakeUpstream, FakeUpstream) {
    let stable = FakeUpstream::start("stable").await;
    let canary = FakeUpstream::start("canary").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = write_leaf(dir.path(), &ca.leaf("proxy-a"), "tls");
    let cfg = ConfigBuilder::new()
        .set("listen", "tls_cert", &path_str(&cert))
        .set("listen", "tls_key", &path_str(&key))
        .upstream("stable", &stable.url(), "90")
        .upstream("canary", &canary.url(), "10")
        .build();
    let proxy = Proxy::start(&cfg).await;
    (
        TlsProxy {
            proxy,
            _dir: dir,
            cert,
            key,
        },
        stable,
        canary,
    )
}

/// An HTTPS request through a fresh TLS connection; returns status, negotiated version, arm.
async fn https_get(
    addr: SocketAddr,
    roots: rustls::RootCertStore,
    alpn: &[&[u8]],
    user: &str,
) -> (StatusCode, Version, String) {
    // hyper-rustls sets ALPN from the protocols enabled below.
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(client_tls(roots, &[]))
        .https_only();
    let h2 = alpn == [b"h2".as_slice()];
    let https = if h2 {
        https.enable_http2().build()
    } else {
        https.enable_http1().build()
    };
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(h2)
        .build(https);
    let req = Request::get(format!("https://localhost:{}/hello", addr.port()))
        .header("x-user-id", user)
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = tokio::time::timeout(TIMEOUT, client.request(req))
        .await
        .expect("in time")
        .expect("https request");
    let arm = resp
        .headers()
        .get(ARM_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    (resp.status(), resp.version(), arm)
}

#[tokio::test]
async fn https_serves_http1_and_h2_by_alpn_with_the_same_routing() {
    let ca = Ca::new("test-ca");
    let (p, _stable, canary) = tls_proxy(&ca).await;
    let addr = p.proxy.addr();

    let (status, version, arm) = https_get(addr, ca.roots(), &[b"http/1.1"], &canary_user()).await;
    assert_eq!(
        (status, version, arm.as_str()),
        (StatusCode::OK, Version::HTTP_11, "canary")
    );
    let (status, version, arm) = https_get(addr, ca.roots(), &[b"h2"], &stable_user()).await;
    assert_eq!(
        (status, version, arm.as_str()),
        (StatusCode::OK, Version::HTTP_2, "stable")
    );
    // The upstream is told the client spoke https.
    let headers = canary.last_headers().expect("canary saw a request");
    assert_eq!(headers["x-forwarded-proto"], "https");
}

/// A raw TLS connection (to see the certificate the server presents), with an HTTP/1.1
/// client connection on top that stays open.
async fn tls_connection(
    addr: SocketAddr,
    roots: rustls::RootCertStore,
) -> (
    CertificateDer<'static>,
    hyper::client::conn::http1::SendRequest<Full<Bytes>>,
) {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_tls(roots, &[b"http/1.1"])));
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let tls = connector
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .expect("handshake");
    let presented = tls.get_ref().1.peer_certificates().expect("peer certs")[0].clone();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("http1 handshake");
    tokio::spawn(conn);
    (presented.into_owned(), sender)
}

async fn send_on(sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>) -> StatusCode {
    let req = Request::get("/again")
        .header("host", "localhost")
        .header("x-user-id", stable_user())
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = tokio::time::timeout(TIMEOUT, sender.send_request(req))
        .await
        .expect("in time")
        .expect("response");
    let status = resp.status();
    let _ = resp.into_body().collect().await;
    status
}

#[tokio::test]
async fn certificate_rotation_is_picked_up_and_open_connections_keep_working() {
    let ca = Ca::new("test-ca");
    let (p, _stable, _canary) = tls_proxy(&ca).await;
    let addr = p.proxy.addr();

    let (first_cert, mut old_conn) = tls_connection(addr, ca.roots()).await;
    assert_eq!(send_on(&mut old_conn).await, StatusCode::OK);

    // Renewal: a new leaf from the same CA, written the way cert-manager does.
    let renewed = ca.leaf("proxy-b");
    write_atomic(&p.key, &renewed.key_pem);
    write_atomic(&p.cert, &renewed.cert_pem);
    let seen = poll_until(
        TIMEOUT,
        "new handshakes present the renewed certificate",
        || {
            let roots = ca.roots();
            let want = renewed.der.clone();
            async move {
                let (cert, _) = tls_connection(addr, roots).await;
                (cert == want).then_some(cert)
            }
        },
    )
    .await;
    assert_ne!(seen, first_cert);
    // The connection opened before the renewal is still served.
    assert_eq!(send_on(&mut old_conn).await, StatusCode::OK);

    // A broken renewal (key does not match the certificate) keeps the working certificate.
    let other = ca.leaf("proxy-c");
    write_atomic(&p.key, &other.key_pem);
    let checks = hold_for(Duration::from_millis(800), || {
        let roots = ca.roots();
        let want = renewed.der.clone();
        async move {
            let (cert, _) = tls_connection(addr, roots).await;
            if cert == want {
                Ok(())
            } else {
                Err("a handshake presented another certificate".to_owned())
            }
        }
    })
    .await;
    assert!(checks > 0);
    let (cert, mut conn) = tls_connection(addr, ca.roots()).await;
    assert_eq!(
        cert, renewed.der,
        "the mismatched pair must not replace the good one"
    );
    assert_eq!(send_on(&mut conn).await, StatusCode::OK);
}

#[tokio::test]
async fn check_rejects_a_certificate_and_key_that_do_not_match() {
    let ca = Ca::new("test-ca");
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, _) = write_leaf(dir.path(), &ca.leaf("a"), "a");
    let (_, other_key) = write_leaf(dir.path(), &ca.leaf("b"), "b");
    let cfg = ConfigBuilder::new()
        .set("listen", "tls_cert", &path_str(&cert))
        .set("listen", "tls_key", &path_str(&other_key))
        .upstream("stable", "http://127.0.0.1:9", "100")
        .build();
    let path = dir.path().join("canaryd.toml");
    std::fs::write(&path, cfg).expect("write config");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_canaryd"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("run check");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("listen.tls_cert"), "{stderr}");
    assert!(
        stderr.contains("a.crt") && stderr.contains("b.key"),
        "{stderr}"
    );
}

// ---------------------------------------------------------------------------------------------
// https upstreams: private CA, mutual TLS
// ---------------------------------------------------------------------------------------------

/// An HTTPS upstream that answers "secure" and requires a client certificate from `client_ca`;
/// it speaks HTTP/1.1 or HTTP/2 as ALPN chose, and names the version in `x-version`.
async fn tls_upstream(server: &Leaf, client_ca: &Ca) -> SocketAddr {
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(client_ca.roots()),
        provider(),
    )
    .build()
    .expect("client verifier");
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![server.der.clone()],
            PrivateKeyDer::from_pem_slice(server.key_pem.as_bytes()).expect("key"),
        )
        .expect("server config");
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = service_fn(|req: Request<Incoming>| async move {
                    let version = format!("{:?}", req.version());
                    let resp = Response::builder()
                        .header("x-version", version)
                        .body(Full::new(Bytes::from_static(b"secure")))
                        .expect("response");
                    Ok::<_, Infallible>(resp)
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn https_upstream_with_private_ca_and_client_certificate() {
    let upstream_ca = Ca::new("upstream-ca");
    let client_ca = Ca::new("client-ca");
    let upstream = tls_upstream(&upstream_ca.leaf("upstream"), &client_ca).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_file = dir.path().join("upstream-ca.pem");
    std::fs::write(&ca_file, &upstream_ca.pem).expect("write ca");
    let (client_cert, client_key) = write_leaf(dir.path(), &client_ca.leaf("canaryd"), "client");
    let url = format!("https://localhost:{}", upstream.port());

    let with_cert = ConfigBuilder::new()
        .upstream("stable", &url, "100")
        .upstream_set("ca_file", &path_str(&ca_file))
        .upstream_set("client_cert", &path_str(&client_cert))
        .upstream_set("client_key", &path_str(&client_key))
        .build();
    let proxy = Proxy::start(&with_cert).await;
    let reply = HttpClient::http1().get(proxy.addr(), "/", &[]).await;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (StatusCode::OK, "secure")
    );
    assert_eq!(reply.header("x-version"), Some("HTTP/1.1"));

    // The same over HTTP/2, negotiated by ALPN (gRPC to a TLS model server).
    let h2 = ConfigBuilder::new()
        .upstream("stable", &url, "100")
        .upstream_set("http2", "true")
        .upstream_set("ca_file", &path_str(&ca_file))
        .upstream_set("client_cert", &path_str(&client_cert))
        .upstream_set("client_key", &path_str(&client_key))
        .build();
    let proxy = Proxy::start(&h2).await;
    for client in [HttpClient::http1(), HttpClient::h2c()] {
        let reply = client.get(proxy.addr(), "/", &[]).await;
        assert_eq!(
            (reply.status, reply.body.as_str()),
            (StatusCode::OK, "secure")
        );
        assert_eq!(reply.header("x-version"), Some("HTTP/2.0"));
    }

    // Without the client certificate the upstream refuses the handshake: 502 naming the arm.
    let without_cert = ConfigBuilder::new()
        .upstream("stable", &url, "100")
        .upstream_set("ca_file", &path_str(&ca_file))
        .build();
    let proxy = Proxy::start(&without_cert).await;
    let reply = HttpClient::http1().get(proxy.addr(), "/", &[]).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{reply:?}");
    assert!(reply.body.contains("\"stable\""), "{}", reply.body);

    // Verified against the system roots instead, the private CA is not trusted: 502.
    let system_roots = ConfigBuilder::new().upstream("stable", &url, "100").build();
    let proxy = Proxy::start(&system_roots).await;
    let reply = HttpClient::http1().get(proxy.addr(), "/", &[]).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{reply:?}");
}

// ---------------------------------------------------------------------------------------------
// gRPC over HTTP/2
// ---------------------------------------------------------------------------------------------

fn grpc_message(payload: &[u8]) -> Bytes {
    let mut b = vec![0u8];
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(payload);
    Bytes::from(b)
}

fn grpc_trailers(code: u32) -> HeaderMap {
    let mut t = HeaderMap::new();
    t.insert("grpc-status", code.to_string().parse().expect("value"));
    if code != 0 {
        t.insert("grpc-message", "model unavailable".parse().expect("value"));
    }
    t
}

/// A gRPC-like upstream over h2c. `/m.Model/Ok` and `/m.Model/Fail` answer one message and
/// trailers with status 0 or 14; `/m.Model/TrailersOnly` answers status 13 in the headers;
/// `/m.Model/Stream` sends three messages, each after a permit from `gate`, then status 0.
async fn grpc_upstream(gate: Arc<Semaphore>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let gate = gate.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let gate = gate.clone();
                    async move {
                        assert_eq!(req.headers()["te"], "trailers", "te: trailers reaches gRPC");
                        let (tx, rx) = mpsc::channel(8);
                        let mut resp = Response::new(FrameBody(rx));
                        resp.headers_mut()
                            .insert("content-type", "application/grpc".parse().expect("ct"));
                        match req.uri().path() {
                            "/m.Model/TrailersOnly" => {
                                resp.headers_mut()
                                    .insert("grpc-status", "13".parse().expect("code"));
                                drop(tx);
                            }
                            "/m.Model/Stream" => {
                                tokio::spawn(async move {
                                    for i in 0..3u8 {
                                        let permit = gate.acquire().await.expect("gate");
                                        permit.forget();
                                        let _ = tx.send(Frame::data(grpc_message(&[i]))).await;
                                    }
                                    let _ = tx.send(Frame::trailers(grpc_trailers(0))).await;
                                });
                            }
                            path => {
                                let code = if path == "/m.Model/Fail" { 14 } else { 0 };
                                tokio::spawn(async move {
                                    let _ = tx.send(Frame::data(grpc_message(b"ok"))).await;
                                    let _ = tx.send(Frame::trailers(grpc_trailers(code))).await;
                                });
                            }
                        }
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

fn grpc_client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

async fn grpc_call(proxy: SocketAddr, method: &str) -> (StatusCode, Response<Incoming>) {
    let req = Request::post(format!("http://{proxy}/m.Model/{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("x-user-id", stable_user())
        .body(Full::new(grpc_message(b"input")))
        .expect("request");
    let resp = tokio::time::timeout(TIMEOUT, grpc_client().request(req))
        .await
        .expect("in time")
        .expect("grpc response");
    (resp.status(), resp)
}

/// Reads the rest of a gRPC response: data bytes and trailers.
async fn grpc_finish(resp: Response<Incoming>) -> (usize, Option<HeaderMap>) {
    let mut body = resp.into_body();
    let (mut data, mut trailers) = (0, None);
    while let Some(frame) = tokio::time::timeout(TIMEOUT, body.frame())
        .await
        .expect("frame in time")
    {
        let frame = frame.expect("frame");
        if let Some(d) = frame.data_ref() {
            data += d.len();
        } else if let Ok(t) = frame.into_trailers() {
            trailers = Some(t);
        }
    }
    (data, trailers)
}

#[tokio::test]
async fn grpc_unary_streaming_and_error_statuses_pass_through_and_count() {
    let gate = Arc::new(Semaphore::new(0));
    let upstream = grpc_upstream(gate.clone()).await;
    let cfg = ConfigBuilder::new()
        .upstream("stable", &format!("http://{upstream}"), "100")
        .upstream_set("http2", "true")
        .build();
    let proxy = Proxy::start(&cfg).await;

    // Unary OK: trailers forwarded.
    let (status, resp) = grpc_call(proxy.addr(), "Ok").await;
    assert_eq!(status, StatusCode::OK);
    let (data, trailers) = grpc_finish(resp).await;
    assert_eq!(data, 7);
    assert_eq!(trailers.expect("trailers")["grpc-status"], "0");

    // Unary UNAVAILABLE in trailers.
    let (_, resp) = grpc_call(proxy.addr(), "Fail").await;
    let (_, trailers) = grpc_finish(resp).await;
    let trailers = trailers.expect("trailers");
    assert_eq!(trailers["grpc-status"], "14");
    assert_eq!(trailers["grpc-message"], "model unavailable");

    // Trailers-only INTERNAL.
    let (status, resp) = grpc_call(proxy.addr(), "TrailersOnly").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(resp.headers()["grpc-status"], "13");
    let _ = grpc_finish(resp).await;

    // Server streaming: each message reaches the client before the next is produced.
    let (_, resp) = grpc_call(proxy.addr(), "Stream").await;
    let mut body = resp.into_body();
    for i in 0..3u8 {
        gate.add_permits(1);
        let frame = tokio::time::timeout(TIMEOUT, body.frame())
            .await
            .expect("message in time")
            .expect("a frame")
            .expect("frame ok");
        assert_eq!(
            frame.data_ref().map(|d| d.to_vec()),
            Some(grpc_message(&[i]).to_vec())
        );
    }
    let last = tokio::time::timeout(TIMEOUT, body.frame())
        .await
        .expect("trailers in time")
        .expect("a frame")
        .expect("frame ok");
    assert_eq!(last.trailers_ref().expect("trailers")["grpc-status"], "0");

    // Metrics: statuses by code; the window counts the two failures (14, 13) as errors.
    let admin = proxy.admin_client();
    let m = admin.metrics().await;
    let grpc = |code: &str| {
        m.value(
            "canaryd_grpc_responses_total",
            &[("upstream", "stable"), ("grpc_status", code)],
        )
    };
    assert_eq!(grpc("0"), Some(2.0), "Ok and Stream");
    assert_eq!(grpc("14"), Some(1.0));
    assert_eq!(grpc("13"), Some(1.0));
    assert_eq!(
        m.value(
            "canaryd_requests_total",
            &[("upstream", "stable"), ("status", "200")]
        ),
        Some(4.0)
    );
    poll_until(
        TIMEOUT,
        "the window counts 2 gRPC errors of 4 calls",
        || {
            let admin = admin.clone();
            async move {
                let status = admin.status().await;
                let w = &status["arms"][0]["window"];
                (w["requests"] == 4 && w["errors"] == 2).then_some(())
            }
        },
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// WebSocket
// ---------------------------------------------------------------------------------------------

/// An upstream that accepts `Upgrade: websocket`, answers 101 and echoes raw bytes.
async fn websocket_echo(name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(move |mut req: Request<Incoming>| async move {
                    let mut resp = Response::new(Full::new(Bytes::new()));
                    resp.headers_mut()
                        .insert("x-fake-upstream", name.parse().expect("name"));
                    if req
                        .headers()
                        .get("upgrade")
                        .is_some_and(|v| v == "websocket")
                    {
                        let upgrade = hyper::upgrade::on(&mut req);
                        tokio::spawn(async move {
                            let Ok(upgraded) = upgrade.await else { return };
                            let mut io = TokioIo::new(upgraded);
                            let mut buf = [0u8; 1024];
                            loop {
                                match io.read(&mut buf).await {
                                    Ok(0) | Err(_) => break,
                                    Ok(n) => {
                                        if io.write_all(&buf[..n]).await.is_err() {
                                            break;
                                        }
                                    }
                                }
                            }
                        });
                        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                        let h = resp.headers_mut();
                        h.insert("connection", "upgrade".parse().expect("v"));
                        h.insert("upgrade", "websocket".parse().expect("v"));
                        h.insert(
                            "sec-websocket-accept",
                            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=".parse().expect("v"),
                        );
                    }
                    Ok::<_, Infallible>(resp)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn websocket_upgrade_is_routed_sticky_and_relayed_both_ways() {
    let stable = websocket_echo("stable").await;
    let canary = websocket_echo("canary").await;
    let cfg = ConfigBuilder::new()
        .upstream("stable", &format!("http://{stable}"), "90")
        .upstream("canary", &format!("http://{canary}"), "10")
        .build();
    let proxy = Proxy::start(&cfg).await;

    let mut tcp = TcpStream::connect(proxy.addr()).await.expect("connect");
    let handshake = format!(
        "GET /ws HTTP/1.1\r\nHost: models.example\r\nConnection: Upgrade\r\n\
         Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nx-user-id: {}\r\n\r\n",
        canary_user()
    );
    tcp.write_all(handshake.as_bytes()).await.expect("write");
    let head = read_response_head(&mut tcp).await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    assert!(head.contains("x-canaryd-upstream: canary"), "{head}");
    assert!(head.contains("x-fake-upstream: canary"), "{head}");

    // A masked text frame "hello" and a second message: echoed byte for byte.
    for msg in [
        &[
            0x81u8, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ][..],
        b"second message through the tunnel",
    ] {
        tcp.write_all(msg).await.expect("write frame");
        let mut echo = vec![0u8; msg.len()];
        tokio::time::timeout(TIMEOUT, tcp.read_exact(&mut echo))
            .await
            .expect("echo in time")
            .expect("read echo");
        assert_eq!(echo, msg);
    }
    // The tunnel counts as in flight while open, and is released when the client closes.
    let admin = proxy.admin_client();
    let in_flight =
        |m: &MetricsText| m.value("canaryd_requests_in_flight", &[("upstream", "canary")]);
    assert_eq!(in_flight(&admin.metrics().await), Some(1.0));
    drop(tcp);
    poll_until(TIMEOUT, "the closed tunnel leaves in-flight", || {
        let admin = admin.clone();
        async move { (in_flight(&admin.metrics().await) == Some(0.0)).then_some(()) }
    })
    .await;
}
