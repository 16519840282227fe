//! A holder's identity: its certificate and key, and the CA that vouches for both
//! sides. Saved as a directory: `ca.pem`, `cert.pem`, `key.pem` (0600) and, once a
//! revocation list was fetched, `crl.pem`.

use std::path::{Path, PathBuf};

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};

use crate::error::{PkiError, Result};
use crate::files;

/// A certificate with its private key, and the CA certificate to check peers with.
#[derive(Clone)]
pub struct Identity {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("Identity").finish_non_exhaustive()
    }
}

/// The files of an identity directory.
#[derive(Debug, Clone)]
pub struct IdentityFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub crl: PathBuf,
}

impl IdentityFiles {
    pub fn in_dir(dir: &Path) -> Self {
        IdentityFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            crl: dir.join("crl.pem"),
        }
    }
}

impl Identity {
    /// Whether `dir` holds an identity.
    pub fn exists(dir: &Path) -> bool {
        let f = IdentityFiles::in_dir(dir);
        f.ca.exists() && f.cert.exists() && f.key.exists()
    }

    pub fn save(&self, dir: &Path) -> Result<IdentityFiles> {
        let f = IdentityFiles::in_dir(dir);
        files::write_private(&f.key, self.key_pem.as_bytes())?;
        files::write_public(&f.cert, self.cert_pem.as_bytes())?;
        files::write_public(&f.ca, self.ca_pem.as_bytes())?;
        Ok(f)
    }

    /// Loads the identity in `dir`; the key must be private.
    pub fn load(dir: &Path) -> Result<Identity> {
        let f = IdentityFiles::in_dir(dir);
        Ok(Identity {
            key_pem: files::read_private(&f.key)?,
            cert_pem: files::read_public(&f.cert)?,
            ca_pem: files::read_public(&f.ca)?,
        })
    }
}

/// The revocation list saved beside an identity, if any.
pub fn load_crl(dir: &Path) -> Result<Option<String>> {
    let p = IdentityFiles::in_dir(dir).crl;
    match std::fs::read_to_string(&p) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(PkiError::io("reading", p)(e)),
    }
}

/// A new key and a certificate signing request for it: the key stays with its holder,
/// the request goes to the CA.
pub fn new_key_and_csr(name: &str) -> Result<(String, String)> {
    let key = KeyPair::generate().map_err(PkiError::cert("generating a key"))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    let csr = params
        .serialize_request(&key)
        .map_err(PkiError::cert("making a certificate signing request"))?;
    let pem = csr
        .pem()
        .map_err(PkiError::cert("writing a certificate signing request"))?;
    Ok((key.serialize_pem(), pem))
}
