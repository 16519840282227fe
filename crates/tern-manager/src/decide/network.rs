//! Guest addresses on the hosts' network (`tern manager --guest-network CIDR`): a VM
//! with a NIC gets the first free address of the network at create, kept in its spec
//! for its whole life (live migration keeps its MAC and its address).

use std::net::Ipv4Addr;

use crate::error::{Error, Result};
use crate::state::Snapshot;

/// An IPv4 network guests get addresses from, and the gateway they are told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestNetwork {
    pub network: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
}

impl GuestNetwork {
    /// Parses `ADDR/PREFIX` (prefix 8 to 30) and an optional gateway inside it (pure).
    pub fn parse(cidr: &str, gateway: Option<&str>) -> std::result::Result<Self, String> {
        let c = tern_api::guest_config::parse_cidr(cidr)?;
        let std::net::IpAddr::V4(addr) = c.addr else {
            return Err(format!("{cidr:?}: guest networks are IPv4"));
        };
        if !(8..=30).contains(&c.prefix) {
            return Err(format!("{cidr:?}: give a prefix of 8 to 30"));
        }
        let mask = u32::MAX << (32 - c.prefix);
        let net = GuestNetwork {
            network: Ipv4Addr::from(u32::from(addr) & mask),
            prefix: c.prefix,
            gateway: None,
        };
        let gateway = gateway
            .map(|g| {
                let ip: Ipv4Addr = g
                    .parse()
                    .map_err(|_| format!("gateway {g:?} is not an IPv4 address"))?;
                match net.contains(ip) {
                    true => Ok(ip),
                    false => Err(format!("gateway {g} is outside {cidr}")),
                }
            })
            .transpose()?;
        Ok(GuestNetwork { gateway, ..net })
    }

    fn mask(&self) -> u32 {
        u32::MAX << (32 - self.prefix)
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.network)
    }

    /// The first address no VM, host or gateway holds, as `ADDR/PREFIX` (pure).
    pub fn allocate(&self, snap: &Snapshot) -> Result<String> {
        let taken: std::collections::BTreeSet<Ipv4Addr> = snap
            .vms
            .values()
            .filter_map(|v| v.spec.address.as_deref())
            .chain(snap.hosts.values().filter_map(|h| host_ip(&h.address)))
            .filter_map(|a| a.split('/').next()?.parse().ok())
            .chain(self.gateway)
            .collect();
        let first = u32::from(self.network) + 1;
        let broadcast = u32::from(self.network) | !self.mask();
        (first..broadcast)
            .map(Ipv4Addr::from)
            .find(|ip| !taken.contains(ip))
            .map(|ip| format!("{ip}/{}", self.prefix))
            .ok_or_else(|| {
                Error::Conflict(format!(
                    "every address of the guest network {}/{} is taken; delete VMs with NICs or \
                     give the manager a larger --guest-network",
                    self.network, self.prefix
                ))
            })
    }
}

/// The host part of an agent URL (`https://198.18.0.2:7070` → `198.18.0.2`).
fn host_ip(url: &str) -> Option<&str> {
    let rest = url.split("://").nth(1)?;
    Some(rest.split(['/', ':']).next().unwrap_or(rest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::testing::{cluster, running, spec};

    #[test]
    fn addresses_skip_the_network_hosts_gateway_and_vms() {
        let net = GuestNetwork::parse("198.18.0.77/24", Some("198.18.0.1")).unwrap();
        assert_eq!(net.network, Ipv4Addr::new(198, 18, 0, 0));
        let mut snap = cluster(&[1.0], 1024);
        snap.hosts.get_mut("h0").unwrap().address = "https://198.18.0.2:7070".into();
        assert_eq!(net.allocate(&snap).unwrap(), "198.18.0.3/24");
        let mut s = spec(1, 64);
        s.address = Some("198.18.0.3/24".into());
        running(&mut snap, "v", "h0", s);
        assert_eq!(net.allocate(&snap).unwrap(), "198.18.0.4/24");
        let tiny = GuestNetwork::parse("10.0.0.0/30", None).unwrap();
        let mut snap = cluster(&[1.0], 1024);
        for (i, a) in ["10.0.0.1/30", "10.0.0.2/30"].iter().enumerate() {
            let mut s = spec(1, 64);
            s.address = Some((*a).into());
            running(&mut snap, &format!("v{i}"), "h0", s);
        }
        assert!(matches!(tiny.allocate(&snap), Err(Error::Conflict(_))));
    }

    #[test]
    fn bad_networks_are_refused() {
        assert!(GuestNetwork::parse("fd00::/64", None).is_err());
        assert!(GuestNetwork::parse("10.0.0.0/31", None).is_err());
        assert!(GuestNetwork::parse("10.0.0.0/24", Some("10.0.1.1")).is_err());
        assert!(GuestNetwork::parse("10.0.0.0", None).is_err());
    }
}
