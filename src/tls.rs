//! TLS with rustls (ring provider): downstream termination with certificates that reload
//! without a restart, and client configs for https upstreams.
//!
//! The server resolves its certificate through [`CertStore`], an `ArcSwap` of the current
//! key pair: a renewal (cert-manager, Let's Encrypt) swaps it for new handshakes while open
//! connections keep the session they negotiated. A renewal that does not load (missing file,
//! key not matching the certificate) keeps the old pair and is reported.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::{Config, ConfigError, TlsFiles, UpstreamConfig};

/// A TLS file problem, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file could not be read or holds no usable PEM item.
    #[error("{path}: {problem}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// rustls refused the material (e.g. the key does not match the certificate).
    #[error("{0}")]
    Rustls(String),
}

fn file_err(path: &Path, problem: impl Into<String>) -> TlsError {
    TlsError::File {
        path: path.to_owned(),
        problem: problem.into(),
    }
}

/// The process-wide crypto provider (ring).
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(path, e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(path, format!("invalid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(file_err(path, "no CERTIFICATE block found"));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| {
        file_err(
            path,
            format!("no usable private key (PKCS#8, PKCS#1 or SEC1 PEM): {e}"),
        )
    })
}

/// Loads a certificate chain and its key, checking that they belong together.
pub fn load_certified_key(files: &TlsFiles) -> Result<CertifiedKey, TlsError> {
    let certs = load_certs(&files.cert)?;
    let key = load_key(&files.key)?;
    CertifiedKey::from_der(certs, key, &provider()).map_err(|e| {
        TlsError::Rustls(format!(
            "{} and {} do not form a usable pair: {e}",
            files.cert.display(),
            files.key.display()
        ))
    })
}

/// The server's current certificate, swappable at run time.
#[derive(Debug)]
pub struct CertStore {
    files: TlsFiles,
    current: ArcSwap<CertifiedKey>,
}

impl CertStore {
    /// Loads the pair named in `files`.
    pub fn load(files: TlsFiles) -> Result<Arc<Self>, TlsError> {
        let key = load_certified_key(&files)?;
        Ok(Arc::new(CertStore {
            files,
            current: ArcSwap::from_pointee(key),
        }))
    }

    /// Re-reads the files; on failure the current pair stays in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        let key = load_certified_key(&self.files)?;
        self.current.store(Arc::new(key));
        Ok(())
    }

    /// The watched files.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// Server config: TLS 1.2 and 1.3, ALPN `h2` then `http/1.1`, certificate from `store`.
pub fn server_config(store: Arc<CertStore>) -> Result<Arc<ServerConfig>, TlsError> {
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rustls(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(store);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

fn native_roots() -> Arc<RootCertStore> {
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::warn!(error = %e, "cannot load some system CA certificates");
            }
            let mut roots = RootCertStore::empty();
            let (added, ignored) = roots.add_parsable_certificates(found.certs);
            tracing::debug!(added, ignored, "system CA certificates loaded");
            Arc::new(roots)
        })
        .clone()
}

/// The rustls client config for an https upstream (`None` for http://). ALPN is set by the
/// connector from the upstream's `http2` setting; SNI comes from the URL host.
pub fn client_config(u: &UpstreamConfig) -> Result<Option<Arc<ClientConfig>>, TlsError> {
    if u.url.scheme_str() != Some("https") {
        return Ok(None);
    }
    let roots = match &u.tls.ca_file {
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in load_certs(path)? {
                roots
                    .add(cert)
                    .map_err(|e| file_err(path, format!("not a usable CA certificate: {e}")))?;
            }
            Arc::new(roots)
        }
        None => native_roots(),
    };
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rustls(e.to_string()))?
        .with_root_certificates(roots);
    let cfg = match &u.tls.client {
        Some(files) => builder
            .with_client_auth_cert(load_certs(&files.cert)?, load_key(&files.key)?)
            .map_err(|e| {
                TlsError::Rustls(format!(
                    "client certificate {} / {}: {e}",
                    files.cert.display(),
                    files.key.display()
                ))
            })?,
        None => builder.with_no_client_auth(),
    };
    Ok(Some(Arc::new(cfg)))
}

/// Every TLS file problem in `config`, with key paths, for `check`, start-up and reloads.
pub fn check_files(config: &Config) -> Vec<ConfigError> {
    let mut errors = Vec::new();
    let mut push = |path: String, e: TlsError| {
        errors.push(ConfigError {
            path,
            line: None,
            message: e.to_string(),
        })
    };
    if let Some(files) = &config.listen.tls {
        if let Err(e) = load_certified_key(files) {
            push("listen.tls_cert".into(), e);
        }
    }
    for (i, u) in config.upstreams.iter().enumerate() {
        if let Err(e) = client_config(u) {
            push(format!("upstream[{i}].tls"), e);
        }
    }
    errors
}
