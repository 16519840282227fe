//! The cluster certificate authority: a directory holding the CA's certificate and key,
//! a ledger of what it issued, the revocation list built from that ledger, and the
//! one-time join tokens it will redeem.
//!
//! Layout of the directory (keys and tokens 0600, the rest 0644):
//! - `ca.pem`, `ca.key`: the CA.
//! - `issued.json`: every certificate issued: serial, name, role, revoked or not.
//! - `crl.pem`: the revocation list, rewritten on each revocation.
//! - `join/ID.json`: unredeemed join tokens (a hash of the secret and an expiry).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams,
    CertificateSigningRequestParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams, SanType, SerialNumber,
};
use rustls_pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::error::{PkiError, Result};
use crate::files;
use crate::identity::Identity;

/// How long a host's or an operator's certificate is valid; rotate by enrolling again.
pub const CERT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// How long the CA itself is valid.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Clocks of hosts differ; a certificate is valid from a little before it was made.
const CLOCK_SKEW: Duration = Duration::from_secs(3600);
/// Largest join token lifetime accepted.
pub const MAX_JOIN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// What a certificate lets its holder be; written as the subject's OU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// A host's agent: serves the agent API and calls other agents.
    Host,
    /// The manager: serves the user API and calls agents.
    Manager,
    /// A person or tool calling agents directly (`tern agent vm`).
    Operator,
}

impl Role {
    /// The role an OU names.
    pub fn parse(ou: &str) -> Option<Role> {
        [Role::Host, Role::Manager, Role::Operator]
            .into_iter()
            .find(|r| r.as_str() == ou)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Host => "host",
            Role::Manager => "manager",
            Role::Operator => "operator",
        }
    }
}

/// One line of the ledger.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Issued {
    /// The certificate's serial number, hex.
    pub serial: String,
    pub name: String,
    pub role: Role,
    /// Seconds since the epoch.
    pub issued_at: u64,
    pub revoked_at: Option<u64>,
}

/// A join token: given once to a host, redeemed once by the manager.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinToken {
    /// `ID.SECRET`; the ID names the token, the SECRET proves it.
    pub token: String,
    /// The cluster CA's certificate, so the joining host can authenticate the manager
    /// before sending it anything.
    pub ca_pem: String,
    /// Seconds since the epoch after which the token is refused.
    pub expires_at: u64,
}

#[derive(Serialize, Deserialize)]
struct StoredToken {
    sha256: String,
    expires_at: u64,
}

/// The cluster CA, loaded.
pub struct Ca {
    dir: PathBuf,
    issuer: rcgen::Certificate,
    key: KeyPair,
    cert_pem: String,
    /// Serialises this process's edits of the ledger and the CRL; [`Ca::locked`] adds
    /// a lock on the directory for other processes (HA managers, `tern ca revoke`).
    ledger: Mutex<()>,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn offset(from_now: Duration, later: bool) -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    let d = time::Duration::try_from(from_now).unwrap_or(time::Duration::ZERO);
    if later {
        now + d
    } else {
        now - d
    }
}

fn random_serial() -> SerialNumber {
    let mut b = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut b);
    // A positive DER integer: clear the top bit.
    b[0] &= 0x7f;
    SerialNumber::from_slice(&b)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

impl Ca {
    pub fn cert_path(dir: &Path) -> PathBuf {
        dir.join("ca.pem")
    }

    /// Whether `dir` holds a CA.
    pub fn exists(dir: &Path) -> bool {
        Self::cert_path(dir).exists() && dir.join("ca.key").exists()
    }

    /// Creates a new CA in `dir`; refuses a directory that already has one.
    pub fn init(dir: &Path) -> Result<Ca> {
        if Self::exists(dir) {
            return Err(PkiError::CaExists {
                dir: dir.to_path_buf(),
            });
        }
        let key = KeyPair::generate().map_err(PkiError::cert("generating the CA key"))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "tern cluster CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = offset(CLOCK_SKEW, false);
        params.not_after = offset(CA_VALIDITY, true);
        params.serial_number = Some(random_serial());
        let cert = params
            .self_signed(&key)
            .map_err(PkiError::cert("signing the CA certificate"))?;
        files::write_private(&dir.join("ca.key"), key.serialize_pem().as_bytes())?;
        files::write_public(&Self::cert_path(dir), cert.pem().as_bytes())?;
        let ca = Self::load(dir)?;
        ca.write_crl(&[])?;
        Ok(ca)
    }

    /// Loads the CA in `dir`; its key file must be private.
    pub fn load(dir: &Path) -> Result<Ca> {
        if !Self::exists(dir) {
            return Err(PkiError::NoCa {
                dir: dir.to_path_buf(),
            });
        }
        let key_pem = files::read_private(&dir.join("ca.key"))?;
        let cert_pem = files::read_public(&Self::cert_path(dir))?;
        let key = KeyPair::from_pem(&key_pem).map_err(PkiError::cert("reading ca.key"))?;
        // rcgen signs with parameters, not with a parsed certificate: rebuild the CA's
        // (same subject, same key, so what it signs chains to ca.pem).
        let params = CertificateParams::from_ca_cert_pem(&cert_pem)
            .map_err(PkiError::cert("reading ca.pem"))?;
        let issuer = params
            .self_signed(&key)
            .map_err(PkiError::cert("loading the CA"))?;
        Ok(Ca {
            dir: dir.to_path_buf(),
            issuer,
            key,
            cert_pem,
            ledger: Mutex::new(()),
        })
    }

    /// Loads the CA in `dir`, creating it first if there is none; true when created.
    pub fn open_or_init(dir: &Path) -> Result<(Ca, bool)> {
        if Self::exists(dir) {
            Ok((Self::load(dir)?, false))
        } else {
            Ok((Self::init(dir)?, true))
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    fn params(role: Role, name: &str, addresses: &[IpAddr]) -> Result<CertificateParams> {
        if name.is_empty() || name.len() > 64 || name.chars().any(|c| c.is_control()) {
            return Err(PkiError::BadName(format!(
                "{name:?} cannot name a certificate: give 1 to 64 printable characters"
            )));
        }
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        dn.push(DnType::OrganizationalUnitName, role.as_str());
        params.distinguished_name = dn;
        params.not_before = offset(CLOCK_SKEW, false);
        params.not_after = offset(CERT_VALIDITY, true);
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        params.key_identifier_method = KeyIdMethod::Sha256;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = match role {
            Role::Host | Role::Manager => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            Role::Operator => vec![ExtendedKeyUsagePurpose::ClientAuth],
        };
        if role != Role::Operator {
            // The name as a DNS name where it is one, so a client may also verify by name.
            if let Ok(dns) = name.try_into() {
                params.subject_alt_names.push(SanType::DnsName(dns));
            }
            params
                .subject_alt_names
                .extend(addresses.iter().map(|a| SanType::IpAddress(*a)));
        }
        Ok(params)
    }

    /// Issues a certificate and a new key for `name` (the lab's hosts, the manager, an
    /// operator); a host's SANs are its name and `addresses`.
    pub fn issue(&self, role: Role, name: &str, addresses: &[IpAddr]) -> Result<Identity> {
        let key = KeyPair::generate().map_err(PkiError::cert("generating a key"))?;
        let params = Self::params(role, name, addresses)?;
        let cert = self.sign(params, &key, name, role)?;
        Ok(Identity {
            ca_pem: self.cert_pem.clone(),
            cert_pem: cert,
            key_pem: key.serialize_pem(),
        })
    }

    /// Signs a host's certificate signing request; the key stays on the host. The
    /// subject and SANs are the ones given here, never the CSR's own.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        role: Role,
        name: &str,
        addresses: &[IpAddr],
    ) -> Result<String> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(PkiError::cert("reading the certificate signing request"))?;
        let params = Self::params(role, name, addresses)?;
        self.sign(params, &csr.public_key, name, role)
    }

    fn sign(
        &self,
        params: CertificateParams,
        key: &impl rcgen::PublicKeyData,
        name: &str,
        role: Role,
    ) -> Result<String> {
        let serial = params
            .serial_number
            .as_ref()
            .map(|s| hex(&s.to_bytes()))
            .unwrap_or_default();
        let cert = params
            .signed_by(key, &self.issuer, &self.key)
            .map_err(PkiError::cert(format!("signing a certificate for {name}")))?;
        let _g = self.locked()?;
        let mut ledger = self.ledger()?;
        ledger.push(Issued {
            serial,
            name: name.to_string(),
            role,
            issued_at: now_secs(),
            revoked_at: None,
        });
        self.write_ledger(&ledger)?;
        Ok(cert.pem())
    }

    /// Holds the ledger for an edit: this process's lock, then an exclusive `flock` on
    /// `CA_DIR/.lock`, so managers sharing the directory do not lose each other's lines.
    fn locked(&self) -> Result<(std::sync::MutexGuard<'_, ()>, std::fs::File)> {
        let g = self.ledger.lock().unwrap_or_else(|p| p.into_inner());
        let path = self.dir.join(".lock");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(PkiError::io("opening", &path))?;
        rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| PkiError::io("locking", &path)(e.into()))?;
        // Released when the file is closed, with the guard.
        Ok((g, f))
    }

    /// Every certificate issued so far.
    pub fn ledger(&self) -> Result<Vec<Issued>> {
        let p = self.dir.join("issued.json");
        match std::fs::read_to_string(&p) {
            Ok(s) => serde_json::from_str(&s).map_err(|e| PkiError::Cert {
                what: format!("reading {}", p.display()),
                message: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(PkiError::io("reading", p)(e)),
        }
    }

    fn write_ledger(&self, ledger: &[Issued]) -> Result<()> {
        let json = serde_json::to_vec_pretty(ledger).map_err(|e| PkiError::Cert {
            what: "writing issued.json".into(),
            message: e.to_string(),
        })?;
        files::write_public(&self.dir.join("issued.json"), &json)
    }

    /// Revokes every certificate issued to `name` and rewrites the CRL; the number of
    /// certificates newly revoked.
    pub fn revoke(&self, name: &str) -> Result<usize> {
        let _g = self.locked()?;
        let mut ledger = self.ledger()?;
        let now = now_secs();
        let mut n = 0;
        for i in ledger
            .iter_mut()
            .filter(|i| i.name == name && i.revoked_at.is_none())
        {
            i.revoked_at = Some(now);
            n += 1;
        }
        self.write_ledger(&ledger)?;
        self.write_crl(&ledger)?;
        Ok(n)
    }

    /// The current revocation list.
    pub fn crl_pem(&self) -> Result<String> {
        files::read_public(&self.dir.join("crl.pem"))
    }

    /// The CRL number of `crl.pem`, 0 when there is none.
    fn crl_number(&self) -> u64 {
        let Ok(pem) = self.crl_pem() else { return 0 };
        let der = rustls_pki_types::CertificateRevocationListDer::from_pem_slice(pem.as_bytes());
        let number = der.ok().and_then(|der| {
            let (_, crl) = x509_parser::parse_x509_crl(&der).ok()?;
            let n = crl.crl_number()?.to_bytes_be();
            let tail = n.get(n.len().saturating_sub(8)..)?;
            let mut b = [0u8; 8];
            b[8 - tail.len()..].copy_from_slice(tail);
            Some(u64::from_be_bytes(b))
        });
        number.unwrap_or(0)
    }

    fn write_crl(&self, ledger: &[Issued]) -> Result<()> {
        let revoked = ledger
            .iter()
            .filter(|i| i.revoked_at.is_some())
            .filter_map(|i| {
                Some(RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&unhex(&i.serial)?),
                    revocation_time: offset(Duration::ZERO, false),
                    reason_code: None,
                    invalidity_date: None,
                })
            })
            .collect();
        // Each list's number is above the last one's, so holders can refuse an older
        // list offered as new.
        let number = (now_secs() << 16).max(self.crl_number().saturating_add(1));
        let number = (number & (u64::MAX >> 1)).to_be_bytes();
        let crl = CertificateRevocationListParams {
            this_update: offset(CLOCK_SKEW, false),
            // Servers do not require a fresh CRL (they reload it); a far next update
            // keeps a stopped manager from locking every host out.
            next_update: offset(CA_VALIDITY, true),
            crl_number: SerialNumber::from_slice(&number),
            issuing_distribution_point: None,
            revoked_certs: revoked,
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(&self.issuer, &self.key)
        .map_err(PkiError::cert("signing the revocation list"))?;
        let pem = crl
            .pem()
            .map_err(PkiError::cert("writing the revocation list"))?;
        files::write_public(&self.dir.join("crl.pem"), pem.as_bytes())
    }

    /// Makes a join token valid for `ttl`; only its hash is kept here.
    pub fn create_join_token(&self, ttl: Duration) -> Result<JoinToken> {
        if ttl.is_zero() || ttl > MAX_JOIN_TTL {
            return Err(PkiError::JoinToken(format!(
                "a join token lives between 1 s and {} h; {ttl:?} asked",
                MAX_JOIN_TTL.as_secs() / 3600
            )));
        }
        let mut id = [0u8; 6];
        let mut secret = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut id);
        rand::thread_rng().fill_bytes(&mut secret);
        let (id, secret) = (hex(&id), hex(&secret));
        let expires_at = now_secs() + ttl.as_secs();
        let stored = StoredToken {
            sha256: hex(&Sha256::digest(secret.as_bytes())),
            expires_at,
        };
        let json = serde_json::to_vec(&stored).map_err(|e| PkiError::JoinToken(e.to_string()))?;
        files::write_private(&self.join_path(&id), &json)?;
        Ok(JoinToken {
            token: format!("{id}.{secret}"),
            ca_pem: self.cert_pem.clone(),
            expires_at,
        })
    }

    fn join_path(&self, id: &str) -> PathBuf {
        self.dir.join("join").join(format!("{id}.json"))
    }

    /// Redeems a join token: it must exist, match and be unexpired, and is gone after.
    pub fn redeem_join_token(&self, token: &str) -> Result<()> {
        let refused = |why: &str| PkiError::JoinToken(why.to_string());
        let (id, secret) = token
            .split_once('.')
            .ok_or_else(|| refused("not of the form ID.SECRET"))?;
        if id.len() != 12 || !id.bytes().all(|b| b.is_ascii_hexdigit()) || secret.len() > 128 {
            return Err(refused("not of the form ID.SECRET"));
        }
        let path = self.join_path(id);
        let stored: StoredToken = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|_| refused("unreadable record"))?,
            Err(_) => return Err(refused("unknown or already used")),
        };
        let given = Sha256::digest(secret.as_bytes());
        let want = unhex(&stored.sha256).unwrap_or_default();
        // Both are digests of equal length; compare every byte anyway.
        let diff = given
            .iter()
            .zip(want.iter().chain(std::iter::repeat(&0)))
            .fold(u8::from(want.len() != given.len()), |d, (a, b)| d | (a ^ b));
        if diff != 0 {
            return Err(refused("wrong secret"));
        }
        // Removing it is what redeems it: of two hosts racing, one remove fails.
        std::fs::remove_file(&path).map_err(|_| refused("unknown or already used"))?;
        if now_secs() > stored.expires_at {
            return Err(refused(
                "expired; make a new one with `tern manager join-token`",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_load_and_refuse_a_second_init() {
        let d = tempfile::tempdir().unwrap();
        let ca = Ca::init(d.path()).unwrap();
        assert!(matches!(Ca::init(d.path()), Err(PkiError::CaExists { .. })));
        let again = Ca::load(d.path()).unwrap();
        assert_eq!(again.cert_pem(), ca.cert_pem());
        let (_, created) = Ca::open_or_init(d.path()).unwrap();
        assert!(!created);
        assert!(matches!(
            Ca::load(&d.path().join("none")),
            Err(PkiError::NoCa { .. })
        ));
    }

    #[test]
    fn a_ca_key_others_can_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        Ca::init(d.path()).unwrap();
        let key = d.path().join("ca.key");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            Ca::load(d.path()),
            Err(PkiError::NotPrivate { .. })
        ));
    }

    #[test]
    fn join_tokens_are_one_time_and_checked() {
        let d = tempfile::tempdir().unwrap();
        let ca = Ca::init(d.path()).unwrap();
        let t = ca.create_join_token(Duration::from_secs(60)).unwrap();
        assert_eq!(t.ca_pem, ca.cert_pem());
        let (id, _) = t.token.split_once('.').unwrap();
        let wrong = format!("{id}.{}", "0".repeat(64));
        assert!(ca.redeem_join_token(&wrong).is_err());
        assert!(ca.redeem_join_token("garbage").is_err());
        ca.redeem_join_token(&t.token).unwrap();
        let e = ca.redeem_join_token(&t.token).unwrap_err();
        assert!(e.to_string().contains("already used"), "{e}");
        assert!(ca.create_join_token(Duration::ZERO).is_err());
        assert!(ca.create_join_token(MAX_JOIN_TTL * 2).is_err());
    }

    #[test]
    fn revoking_a_name_marks_its_certificates_and_rewrites_the_crl() {
        let d = tempfile::tempdir().unwrap();
        let ca = Ca::init(d.path()).unwrap();
        let before = ca.crl_pem().unwrap();
        ca.issue(Role::Host, "h1", &["127.0.0.1".parse().unwrap()])
            .unwrap();
        ca.issue(Role::Host, "h2", &[]).unwrap();
        assert_eq!(ca.revoke("h1").unwrap(), 1);
        assert_eq!(ca.revoke("h1").unwrap(), 0);
        let ledger = ca.ledger().unwrap();
        assert_eq!(ledger.len(), 2);
        assert!(ledger
            .iter()
            .any(|i| i.name == "h1" && i.revoked_at.is_some()));
        assert!(ledger
            .iter()
            .any(|i| i.name == "h2" && i.revoked_at.is_none()));
        assert_ne!(ca.crl_pem().unwrap(), before);
    }

    #[test]
    fn bad_names_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let ca = Ca::init(d.path()).unwrap();
        assert!(ca.issue(Role::Host, "", &[]).is_err());
        assert!(ca.issue(Role::Host, &"x".repeat(65), &[]).is_err());
        assert!(ca.sign_csr("not a csr", Role::Host, "h1", &[]).is_err());
    }
}
