//! Who is at the other end of a mutual-TLS connection: the name and role its
//! certificate carries (the subject's CN and OU, as [`crate::Ca`] issues them). Servers
//! hand it to their handlers, which decide by role what a caller may do.

use rustls_pki_types::CertificateDer;

use crate::ca::Role;

/// The authenticated client of a connection: whatever its certificate names, after
/// rustls checked it against the cluster CA and the revocation list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub name: String,
    pub role: Role,
}

impl Peer {
    /// The name and role in a certificate's subject; `None` when it has no CN or no OU
    /// naming a role (no certificate the cluster CA issues).
    pub fn from_der(cert: &CertificateDer<'_>) -> Option<Peer> {
        let (_, cert) = x509_parser::parse_x509_certificate(cert).ok()?;
        let subject = cert.subject();
        let name = subject.iter_common_name().next()?.as_str().ok()?;
        let role = subject.iter_organizational_unit().next()?.as_str().ok()?;
        Some(Peer {
            name: name.to_owned(),
            role: Role::parse(role)?,
        })
    }

    /// The peer of a connection: its first (end-entity) certificate.
    pub fn of(certs: Option<&[CertificateDer<'_>]>) -> Option<Peer> {
        Self::from_der(certs?.first()?)
    }

    /// Whether this peer is host `name`.
    pub fn is_host(&self, name: &str) -> bool {
        self.role == Role::Host && self.name == name
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Ca;

    #[test]
    fn a_certificate_names_its_holder_and_role() {
        let d = tempfile::tempdir().unwrap();
        let ca = Ca::init(d.path()).unwrap();
        for (role, name) in [
            (Role::Host, "h1"),
            (Role::Manager, "manager"),
            (Role::Operator, "alice"),
        ] {
            let id = ca.issue(role, name, &[]).unwrap();
            let der = CertificateDer::from_pem_slice(id.cert_pem.as_bytes()).unwrap();
            let peer = Peer::from_der(&der).unwrap();
            assert_eq!(
                peer,
                Peer {
                    name: name.into(),
                    role
                }
            );
            assert_eq!(peer.is_host("h1"), role == Role::Host);
        }
        let ca_der = CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).unwrap();
        assert_eq!(Peer::from_der(&ca_der), None, "the CA has no role");
        assert_eq!(Peer::of(None), None);
    }

    use rustls_pki_types::pem::PemObject;
}
