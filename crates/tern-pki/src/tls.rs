//! rustls configurations from an [`Identity`]: servers that require (or accept) a
//! client certificate from the cluster CA, and clients that trust only that CA and
//! present their own certificate. Revocation is checked against the CA's CRL.
//!
//! The CA and its revocation list are held by a [`Trust`], which every configuration
//! built from it consults at each handshake: a new revocation list
//! ([`Trust::set_crl`]) takes effect on the next connection of every server and
//! client of the process, without building new configurations.
//!
//! These are the building blocks for every TLS link in tern: the agent and manager
//! servers, the HTTP client, and the migration streams.

use std::sync::{Arc, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore};
use rustls::{ServerConfig, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime,
};

use crate::error::{PkiError, Result};
use crate::identity::Identity;

/// Whether a server asks its clients for a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// Every client must present a certificate from the cluster CA (the agents).
    Required,
    /// Clients may present one, which is then checked (the manager: hosts renew their
    /// leases with their certificate, users call with a bearer token).
    Optional,
    /// Clients authenticate some other way.
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

/// The verifiers of one revocation list.
#[derive(Debug)]
struct Verifiers {
    crl_pem: Option<String>,
    /// The list's CRL number, big-endian without leading zeros: a list older than the
    /// one held is refused, so a replayed list cannot lift a revocation.
    number: Vec<u8>,
    client: Arc<dyn ClientCertVerifier>,
    server: Arc<WebPkiServerVerifier>,
}

/// The cluster CA as a process trusts it: its certificate and the newest revocation
/// list seen. Shared by every configuration the process builds ([`server_config_with`],
/// [`client_config_with`]), which check each handshake against the list held now.
#[derive(Debug)]
pub struct Trust {
    ca_pem: String,
    roots: Arc<RootCertStore>,
    hints: Vec<DistinguishedName>,
    current: RwLock<Arc<Verifiers>>,
}

impl Trust {
    /// Trusts the CA in `ca_pem`, with `crl_pem` as the revocation list so far (checked
    /// as [`Trust::set_crl`] checks it).
    pub fn new(ca_pem: &str, crl_pem: Option<&str>) -> Result<Arc<Trust>> {
        let roots = roots(ca_pem)?;
        let number = match crl_pem {
            Some(pem) => crl_number(ca_pem, pem)?,
            None => Vec::new(),
        };
        let verifiers = Self::verifiers(&roots, crl_pem, number)?;
        Ok(Arc::new(Trust {
            ca_pem: ca_pem.to_owned(),
            hints: roots.subjects(),
            roots,
            current: RwLock::new(Arc::new(verifiers)),
        }))
    }

    fn verifiers(
        roots: &Arc<RootCertStore>,
        crl_pem: Option<&str>,
        number: Vec<u8>,
    ) -> Result<Verifiers> {
        let provider = provider();
        let client = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .with_crls(crls(crl_pem)?)
            .build()
            .map_err(tls)?;
        let server = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider)
            .with_crls(crls(crl_pem)?)
            .build()
            .map_err(tls)?;
        Ok(Verifiers {
            crl_pem: crl_pem.map(str::to_owned),
            number,
            client,
            server,
        })
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The revocation list held now.
    pub fn crl_pem(&self) -> Option<String> {
        self.now().crl_pem.clone()
    }

    fn now(&self) -> Arc<Verifiers> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Makes `crl_pem` the revocation list every handshake from now on is checked
    /// against. It must be signed by this CA and no older than the one held (by its CRL
    /// number); true when it replaced the one held, false when it was the same.
    pub fn set_crl(&self, crl_pem: &str) -> Result<bool> {
        let number = crl_number(&self.ca_pem, crl_pem)?;
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        if current.crl_pem.as_deref() == Some(crl_pem) {
            return Ok(false);
        }
        let older = (number.len(), &number) < (current.number.len(), &current.number);
        if older {
            return Err(PkiError::Cert {
                what: "the new revocation list".into(),
                message: "it is older than the one held (a lower CRL number); keeping the \
                          one held"
                    .into(),
            });
        }
        *current = Arc::new(Self::verifiers(&self.roots, Some(crl_pem), number)?);
        Ok(true)
    }
}

/// Checks that `crl_pem` is one revocation list signed by the CA in `ca_pem`, and
/// gives its CRL number (big-endian, no leading zeros).
fn crl_number(ca_pem: &str, crl_pem: &str) -> Result<Vec<u8>> {
    let bad = |message: String| PkiError::Cert {
        what: "the revocation list".into(),
        message,
    };
    let ca_der = certs(ca_pem, "the CA certificate")?;
    let (_, ca) = x509_parser::parse_x509_certificate(&ca_der[0])
        .map_err(|e| bad(format!("the CA certificate does not parse: {e}")))?;
    let lists = crls(Some(crl_pem))?;
    let [der] = lists.as_slice() else {
        return Err(bad(format!(
            "expected one revocation list in the PEM, found {}",
            lists.len()
        )));
    };
    let (_, crl) =
        x509_parser::parse_x509_crl(der).map_err(|e| bad(format!("does not parse: {e}")))?;
    if crl.issuer() != ca.subject() {
        return Err(bad("it was not issued by the cluster CA".into()));
    }
    crl.verify_signature(ca.public_key())
        .map_err(|e| bad(format!("its signature is not the cluster CA's: {e}")))?;
    let mut n = crl
        .crl_number()
        .map(|n| n.to_bytes_be())
        .unwrap_or_default();
    let zeros = n.iter().take_while(|b| **b == 0).count();
    n.drain(..zeros);
    Ok(n)
}

/// Checks client certificates against the [`Trust`]'s list at each handshake.
#[derive(Debug)]
struct ClientCerts {
    trust: Arc<Trust>,
    mandatory: bool,
}

impl ClientCertVerifier for ClientCerts {
    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.trust.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> std::result::Result<ClientCertVerified, rustls::Error> {
        self.trust
            .now()
            .client
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.trust
            .now()
            .client
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.trust
            .now()
            .client
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.trust.now().client.supported_verify_schemes()
    }
}

/// Checks server certificates against the [`Trust`]'s list at each handshake.
#[derive(Debug)]
struct ServerCerts(Arc<Trust>);

impl ServerCertVerifier for ServerCerts {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        self.0.now().server.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0
            .now()
            .server
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0
            .now()
            .server
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.now().server.supported_verify_schemes()
    }
}

/// A server presenting `id`'s certificate; with [`ClientAuth::Required`] it accepts only
/// clients with an unrevoked certificate from `id`'s CA, the list as of `crl_pem`.
pub fn server_config(
    id: &Identity,
    crl_pem: Option<&str>,
    clients: ClientAuth,
) -> Result<Arc<ServerConfig>> {
    server_config_with(id, &Trust::new(&id.ca_pem, crl_pem)?, clients)
}

/// A server presenting `id`'s certificate and checking client certificates against
/// `trust` as it is at each handshake.
pub fn server_config_with(
    id: &Identity,
    trust: &Arc<Trust>,
    clients: ClientAuth,
) -> Result<Arc<ServerConfig>> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls)?;
    let builder = match clients {
        ClientAuth::Required | ClientAuth::Optional => {
            builder.with_client_cert_verifier(Arc::new(ClientCerts {
                trust: trust.clone(),
                mandatory: clients == ClientAuth::Required,
            }))
        }
        ClientAuth::None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs(&id.cert_pem, "the certificate")?, key(id)?)
        .map_err(tls)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    // A resumed session skips the certificate check: a client revoked since its first
    // handshake could resume its way in. Every handshake is a full one.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// A client trusting only the CA in `ca_pem` (and refusing servers the CRL revokes),
/// presenting `id`'s certificate when given.
pub fn client_config(
    ca_pem: &str,
    id: Option<&Identity>,
    crl_pem: Option<&str>,
) -> Result<ClientConfig> {
    client_config_with(&Trust::new(ca_pem, crl_pem)?, id)
}

/// A client checking servers against `trust` as it is at each handshake, presenting
/// `id`'s certificate when given.
pub fn client_config_with(trust: &Arc<Trust>, id: Option<&Identity>) -> Result<ClientConfig> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ServerCerts(trust.clone())));
    let mut config = match id {
        Some(id) => builder
            .with_client_auth_cert(certs(&id.cert_pem, "the certificate")?, key(id)?)
            .map_err(tls)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    // Resuming would skip the server's certificate check against a newer list.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}
