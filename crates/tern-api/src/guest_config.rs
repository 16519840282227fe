//! What a guest is told about itself when it is created: its name, who may log in, and
//! its first NIC's static address. The agent hands it to QEMU as the fw_cfg file
//! [`FW_CFG_NAME`] (JSON); the Debian image applies it at boot (`docs/guest-image.md`).
//!
//! Every value ends up in a guest's configuration files, so [`GuestConfig::validate`]
//! bounds sizes and refuses anything that could break out of a line or a file
//! (newlines, control characters, odd key types).

use serde::{Deserialize, Serialize};
use std::net::IpAddr;

/// The fw_cfg item the guest reads (`/sys/firmware/qemu_fw_cfg/by_name/opt/tern/config/raw`).
/// Names under `opt/` are reserved by QEMU for users.
pub const FW_CFG_NAME: &str = "opt/tern/config";

/// Most authorized keys one guest takes.
pub const MAX_SSH_KEYS: usize = 32;

/// Longest authorized key line (an RSA 16384-bit key with a comment fits).
pub const MAX_SSH_KEY_LEN: usize = 8192;

/// Most DNS servers (glibc reads three; a fourth is kept for other resolvers).
pub const MAX_DNS: usize = 4;

/// Key types sshd accepts in `authorized_keys` (`ssh -Q key`), without options.
pub const SSH_KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

/// A guest's configuration at creation. Every field is optional; an empty config
/// changes nothing in the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct GuestConfig {
    /// The guest's host name: labels of letters, digits and `-` joined by `.`, at most
    /// 253 characters (each label at most 63).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Lines for root's `~/.ssh/authorized_keys`: `TYPE BASE64 [COMMENT]`, no options.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_authorized_keys: Vec<String>,
    /// Static address of the first NIC in CIDR form, e.g. `198.18.1.10/15` or
    /// `fd00::10/64`. Absent: the NIC is left unconfigured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Default gateway, of the same family as `address` (which it needs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// DNS servers, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<String>,
}

/// An address with its prefix length, parsed from `ADDR/PREFIX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Parses `ADDR/PREFIX` (IPv4 prefix 1 to 32, IPv6 1 to 128).
pub fn parse_cidr(s: &str) -> Result<Cidr, String> {
    let (addr, prefix) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?} is not ADDR/PREFIX, e.g. \"198.18.1.10/15\""))?;
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| format!("{addr:?} in {s:?} is not an IP address"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix: u8 = prefix
        .parse()
        .ok()
        .filter(|p| (1..=max).contains(p))
        .ok_or_else(|| format!("prefix {prefix:?} in {s:?} is not a number from 1 to {max}"))?;
    if addr.is_unspecified() || addr.is_multicast() || addr.is_loopback() {
        return Err(format!("{s:?} cannot be a NIC's address"));
    }
    Ok(Cidr { addr, prefix })
}

/// Checks a host name (RFC 1123): labels of ASCII letters, digits and inner `-`.
pub fn check_hostname(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 253 {
        return Err(format!("hostname {name:?} must be 1 to 253 characters"));
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!(
                "hostname {name:?}: each dot-separated part must be 1 to 63 characters"
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!(
                "hostname {name:?}: a part must not start or end with '-'"
            ));
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
        {
            return Err(format!(
                "hostname {name:?} contains {c:?}: use letters, digits, '-' and '.'"
            ));
        }
    }
    Ok(())
}

/// Checks one `authorized_keys` line: a known key type, base64 key data, an optional
/// printable comment. Options (`command="..."`, `from=...`) are refused: a key given
/// here logs in as root without restrictions, and a line is easier to check whole.
pub fn check_ssh_key(line: &str) -> Result<(), String> {
    let short: String = line.chars().take(40).collect();
    if line.len() > MAX_SSH_KEY_LEN {
        return Err(format!(
            "ssh key {short:?}... is {} bytes, above the limit of {MAX_SSH_KEY_LEN}",
            line.len()
        ));
    }
    if let Some(c) = line.chars().find(|c| c.is_control()) {
        return Err(format!(
            "ssh key {short:?} contains the control character {c:?} (one key per entry, no newlines)"
        ));
    }
    let mut parts = line.split_whitespace();
    let kind = parts.next().unwrap_or("");
    if !SSH_KEY_TYPES.contains(&kind) {
        return Err(format!(
            "ssh key {short:?} does not start with a key type ({}); give the line of a .pub file",
            SSH_KEY_TYPES.join(", ")
        ));
    }
    let data = parts.next().unwrap_or("");
    let base64 = |c: char| c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '=');
    if data.len() < 16 || !data.chars().all(base64) {
        return Err(format!(
            "ssh key {short:?}: the key data after {kind:?} is not base64"
        ));
    }
    Ok(())
}

impl GuestConfig {
    /// Checks every field; the message names the field and says what to change.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(h) = &self.hostname {
            check_hostname(h)?;
        }
        if self.ssh_authorized_keys.len() > MAX_SSH_KEYS {
            return Err(format!(
                "{} ssh_authorized_keys given; at most {MAX_SSH_KEYS}",
                self.ssh_authorized_keys.len()
            ));
        }
        for (i, k) in self.ssh_authorized_keys.iter().enumerate() {
            check_ssh_key(k).map_err(|e| format!("ssh_authorized_keys[{i}]: {e}"))?;
        }
        let address = self
            .address
            .as_deref()
            .map(parse_cidr)
            .transpose()
            .map_err(|e| format!("address: {e}"))?;
        if let Some(gw) = &self.gateway {
            let ip: IpAddr = gw
                .parse()
                .map_err(|_| format!("gateway {gw:?} is not an IP address"))?;
            let Some(addr) = address else {
                return Err(format!(
                    "gateway {gw:?} given without an address: add \"address\", e.g. \"198.18.1.10/15\""
                ));
            };
            if ip.is_ipv4() != addr.addr.is_ipv4() {
                return Err(format!(
                    "gateway {gw:?} and address {addr} are of different IP families"
                ));
            }
            if ip == addr.addr {
                return Err(format!("gateway {gw:?} is the guest's own address"));
            }
        }
        if self.dns.len() > MAX_DNS {
            return Err(format!(
                "{} dns servers given; at most {MAX_DNS}",
                self.dns.len()
            ));
        }
        for (i, d) in self.dns.iter().enumerate() {
            d.parse::<IpAddr>()
                .map_err(|_| format!("dns[{i}] {d:?} is not an IP address"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHa9Hj3bcM6Y2tF2h0s5p3pQH0d8s0m6V7v1l2kq3Xz0 me@laptop";

    fn full() -> GuestConfig {
        GuestConfig {
            hostname: Some("web-1.example".into()),
            ssh_authorized_keys: vec![KEY.into()],
            address: Some("198.18.1.10/15".into()),
            gateway: Some("198.18.0.1".into()),
            dns: vec!["198.18.0.1".into(), "2001:db8::53".into()],
        }
    }

    /// A change to a valid config and a word the refusal must contain.
    type Case = (Box<dyn FnOnce(&mut GuestConfig)>, &'static str);

    fn err(f: impl FnOnce(&mut GuestConfig)) -> String {
        let mut c = full();
        f(&mut c);
        c.validate().unwrap_err()
    }

    #[test]
    fn a_full_config_and_an_empty_one_pass() {
        full().validate().unwrap();
        GuestConfig::default().validate().unwrap();
        let v6 = GuestConfig {
            address: Some("fd00::10/64".into()),
            gateway: Some("fd00::1".into()),
            ..GuestConfig::default()
        };
        v6.validate().unwrap();
    }

    #[test]
    fn bad_values_are_refused_with_the_field_named() {
        let cases: Vec<Case> = vec![
            (Box::new(|c| c.hostname = Some(String::new())), "hostname"),
            (Box::new(|c| c.hostname = Some("a_b".into())), "'_'"),
            (Box::new(|c| c.hostname = Some("a\nb".into())), "hostname"),
            (Box::new(|c| c.hostname = Some("-a".into())), "'-'"),
            (Box::new(|c| c.hostname = Some("a..b".into())), "1 to 63"),
            (Box::new(|c| c.hostname = Some("x".repeat(64))), "1 to 63"),
            (Box::new(|c| c.hostname = Some(["a"; 130].join("."))), "253"),
            (
                Box::new(|c| c.ssh_authorized_keys = vec![format!("{KEY}\nssh-rsa AAAA")]),
                "control character",
            ),
            (
                Box::new(|c| c.ssh_authorized_keys = vec!["command=\"x\" ".to_string() + KEY]),
                "key type",
            ),
            (
                Box::new(|c| c.ssh_authorized_keys = vec!["ssh-ed25519 not*base64*at*all!".into()]),
                "base64",
            ),
            (
                Box::new(|c| c.ssh_authorized_keys = vec!["ssh-ed25519".into()]),
                "base64",
            ),
            (
                Box::new(|c| {
                    c.ssh_authorized_keys = vec![format!("{KEY} {}", "c".repeat(MAX_SSH_KEY_LEN))]
                }),
                "limit",
            ),
            (
                Box::new(|c| c.ssh_authorized_keys = vec![KEY.into(); MAX_SSH_KEYS + 1]),
                "at most",
            ),
            (
                Box::new(|c| c.address = Some("198.18.1.10".into())),
                "ADDR/PREFIX",
            ),
            (
                Box::new(|c| c.address = Some("198.18.1.10/33".into())),
                "1 to 32",
            ),
            (
                Box::new(|c| c.address = Some("198.18.1.10/0".into())),
                "1 to 32",
            ),
            (
                Box::new(|c| c.address = Some("fd00::1/129".into())),
                "1 to 128",
            ),
            (
                Box::new(|c| c.address = Some("host/24".into())),
                "IP address",
            ),
            (
                Box::new(|c| c.address = Some("127.0.0.1/8".into())),
                "cannot be",
            ),
            (Box::new(|c| c.gateway = Some("gw".into())), "gateway"),
            (Box::new(|c| c.gateway = Some("fd00::1".into())), "families"),
            (
                Box::new(|c| c.gateway = Some("198.18.1.10".into())),
                "own address",
            ),
            (
                Box::new(|c| {
                    c.address = None;
                }),
                "without an address",
            ),
            (Box::new(|c| c.dns = vec!["dns.example".into()]), "dns[0]"),
            (
                Box::new(|c| c.dns = vec!["1.1.1.1".into(); MAX_DNS + 1]),
                "at most",
            ),
        ];
        for (i, (change, says)) in cases.into_iter().enumerate() {
            let e = err(change);
            assert!(e.contains(says), "case {i}: {e:?} should mention {says:?}");
        }
    }

    #[test]
    fn every_known_key_type_passes() {
        for t in SSH_KEY_TYPES {
            check_ssh_key(&format!("{t} AAAAB3NzaC1yc2EAAAADAQABAAABAQC7")).unwrap();
        }
    }

    #[test]
    fn unknown_fields_and_old_specs() {
        let e = serde_json::from_str::<GuestConfig>(r#"{"hostnme": "a"}"#).unwrap_err();
        assert!(e.to_string().contains("hostnme"), "{e}");
        let c: GuestConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(c, GuestConfig::default());
        // An empty config serializes to `{}`: the guest's file says only what was given.
        assert_eq!(serde_json::to_string(&c).unwrap(), "{}");
    }

    #[test]
    fn a_vm_spec_checks_its_guest_config() {
        use crate::agent::VmSpec;
        // A spec from before the field parses, with no config.
        let old: VmSpec = serde_json::from_str(r#"{"memory_mib": 64}"#).unwrap();
        assert_eq!(old.guest_config, None);
        old.validate().unwrap();
        let mut spec: VmSpec = serde_json::from_value(serde_json::json!({
            "memory_mib": 64,
            "nics": [{}],
            "guest_config": {"hostname": "a_b"},
        }))
        .unwrap();
        let e = spec.validate().unwrap_err().to_string();
        assert!(e.starts_with("guest_config: hostname"), "{e}");
        spec.guest_config = Some(Box::new(full()));
        spec.validate().unwrap();
        // An address needs a NIC to go to.
        spec.nics.clear();
        let e = spec.validate().unwrap_err().to_string();
        assert!(e.contains("no NIC"), "{e}");
    }

    #[test]
    fn cidr_round_trips() {
        let c = parse_cidr("10.0.0.5/24").unwrap();
        assert_eq!(c.to_string(), "10.0.0.5/24");
        assert_eq!(c.prefix, 24);
    }
}
