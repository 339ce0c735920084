//! The HTTPS listener's certificate and key; `http::serve` runs the connections.

use std::sync::Arc;

use anyhow::Context;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, ServerConfig};

use crate::config::ListenTls;

/// Reads and checks the certificate chain and key; errors name the key and file.
pub fn server_config(tls: &ListenTls) -> anyhow::Result<ServerConfig> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&tls.certificate)
        .with_context(|| {
            format!(
                "listen.tls.certificate: cannot read {}",
                tls.certificate.display()
            )
        })?
        .collect::<Result<_, _>>()
        .with_context(|| {
            format!(
                "listen.tls.certificate: {} is not PEM",
                tls.certificate.display()
            )
        })?;
    if certs.is_empty() {
        anyhow::bail!(
            "listen.tls.certificate: {} holds no certificate",
            tls.certificate.display()
        );
    }
    let key = PrivateKeyDer::from_pem_file(&tls.private_key).with_context(|| {
        format!(
            "listen.tls.private_key: cannot read a PEM key from {}",
            tls.private_key.display()
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("listen.tls: TLS versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("listen.tls: the key does not match the certificate")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}
