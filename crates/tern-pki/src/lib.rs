//! tern's host identity and hardened serving: the cluster certificate authority, the
//! certificates it issues to hosts, the manager and operators, one-time join tokens,
//! revocation, private files for keys and tokens, rustls configurations, and the HTTP
//! server loop (plain or TLS) with header-read and idle timeouts and a connection cap.
//!
//! # Layout
//! - [`ca`]: the CA directory: create, load, issue, sign a host's CSR, revoke (CRL),
//!   join tokens.
//! - [`identity`]: a holder's certificate, key and CA as a directory; key and CSR
//!   generation for enrolment.
//! - [`tls`]: rustls server and client configurations from an identity, checked against
//!   a [`Trust`] whose revocation list can be replaced while serving.
//! - [`peer`]: the name and role of a connection's client certificate.
//! - [`files`]: secret files written 0600 and refused when others can read them.
//! - [`serve`]: the server loop with its limits.
//! - [`error`]: the crate's error type.

pub mod ca;
pub mod error;
pub mod files;
pub mod identity;
pub mod peer;
pub mod serve;
pub mod tls;

pub use ca::{Ca, Role};
pub use error::PkiError;
pub use identity::Identity;
pub use peer::Peer;
pub use serve::{Limits, Secure, TlsAcceptor};
pub use tls::Trust;
