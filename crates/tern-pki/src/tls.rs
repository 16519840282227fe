//! rustls configurations from an [`Identity`]: servers that require (or accept) a
//! client certificate from the cluster CA, and clients that trust only that CA and
//! present their own certificate. Revocation is checked against the CA's CRL.
//!
//! These are the building blocks for every TLS link in tern: the agent and manager
//! servers, the HTTP client, and the migration streams.

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

use crate::error::{PkiError, Result};
use crate::identity::Identity;

/// Whether a server asks its clients for a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// Every client must present a certificate from the cluster CA (the agents).
    Required,
    /// Clients authenticate some other way (the manager's user API: bearer tokens).
    None,
}

/// The one crypto provider tern uses (ring). rustls marks it deprecated for lacking
/// post-quantum key exchange; the alternative (aws-lc) needs cmake and a C toolchain on
/// every build host.
#[allow(deprecated)]
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls(e: impl std::fmt::Display) -> PkiError {
    PkiError::Tls(e.to_string())
}

fn certs(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| PkiError::Tls(format!("{what}: {e}")))?;
    if certs.is_empty() {
        return Err(PkiError::Tls(format!("{what}: no certificate in it")));
    }
    Ok(certs)
}

fn roots(ca_pem: &str) -> Result<Arc<RootCertStore>> {
    let mut roots = RootCertStore::empty();
    for c in certs(ca_pem, "the CA certificate")? {
        roots.add(c).map_err(tls)?;
    }
    Ok(Arc::new(roots))
}

fn crls(crl_pem: Option<&str>) -> Result<Vec<CertificateRevocationListDer<'static>>> {
    crl_pem
        .map(|pem| {
            CertificateRevocationListDer::pem_slice_iter(pem.as_bytes())
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| PkiError::Tls(format!("the revocation list: {e}")))
        })
        .unwrap_or(Ok(Vec::new()))
}

fn key(id: &Identity) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes())
        .map_err(|e| PkiError::Tls(format!("the private key: {e}")))
}

/// A server presenting `id`'s certificate; with [`ClientAuth::Required`] it accepts only
/// clients with an unrevoked certificate from `id`'s CA.
pub fn server_config(
    id: &Identity,
    crl_pem: Option<&str>,
    clients: ClientAuth,
) -> Result<Arc<ServerConfig>> {
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(tls)?;
    let builder = match clients {
        ClientAuth::Required => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(roots(&id.ca_pem)?, provider)
                    .with_crls(crls(crl_pem)?)
                    .build()
                    .map_err(tls)?;
            builder.with_client_cert_verifier(verifier)
        }
        ClientAuth::None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs(&id.cert_pem, "the certificate")?, key(id)?)
        .map_err(tls)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A client trusting only the CA in `ca_pem` (and refusing servers the CRL revokes),
/// presenting `id`'s certificate when given.
pub fn client_config(
    ca_pem: &str,
    id: Option<&Identity>,
    crl_pem: Option<&str>,
) -> Result<ClientConfig> {
    let provider = provider();
    let verifier = WebPkiServerVerifier::builder_with_provider(roots(ca_pem)?, provider.clone())
        .with_crls(crls(crl_pem)?)
        .build()
        .map_err(tls)?;
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(tls)?
        .with_webpki_verifier(verifier);
    let mut config = match id {
        Some(id) => builder
            .with_client_auth_cert(certs(&id.cert_pem, "the certificate")?, key(id)?)
            .map_err(tls)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}
