//! What a lab is made of, as pure values: names, addresses and the exact `ip`/`tc`
//! commands that build it and take it down. Nothing here runs anything.
//!
//! ```text
//!  root ns                 tern-K-sw (switch)                 tern-K-hI (host I)
//!  tern-K-r ─── veth ───── r0 ─┐
//!  198.18.K.254/24             ├─ br0 ─ pI ═══ veth, tbf B Mbit/s each way ═══ eth0 ─ tern0 (bridge)
//!                              └─ ...                                          198.18.K.I/24
//!                                                                              guests' taps join tern0
//! ```
//! Every host has its own bridge `tern0` with its uplink `eth0` in it, so a guest's tap
//! sits on the one L2 segment of the lab on whatever host it runs: it keeps its MAC and
//! IP when it moves. Each lab uses one /24 of the benchmarking range 198.18.0.0/15, chosen
//! so it collides with nothing already on the machine.

use std::net::Ipv4Addr;

/// Most hosts a lab can have: host addresses are `.1` to `.99`; guests use `.100`-`.253`.
pub const MAX_HOSTS: u32 = 99;
/// The port agents listen on inside their namespace.
pub const AGENT_PORT: u16 = 7070;
/// The per-host bridge guests' taps attach to.
pub const HOST_BRIDGE: &str = "tern0";

/// The choices that define a lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LabShape {
    /// The lab's /24 is `198.18.index.0/24`; also part of every name it creates.
    pub index: u8,
    pub hosts: u32,
    /// Shaping of each host's link in each direction; `None`: unshaped.
    pub link_mbit: Option<u32>,
}

/// One command line: program and arguments.
pub type Cmd = Vec<String>;

fn cmd(parts: &[&str]) -> Cmd {
    parts.iter().map(|s| s.to_string()).collect()
}

impl LabShape {
    /// Checks the numbers a user gave.
    pub fn validate(&self) -> Result<(), String> {
        if self.hosts == 0 || self.hosts > MAX_HOSTS {
            return Err(format!(
                "--hosts must be between 1 and {MAX_HOSTS}, got {}",
                self.hosts
            ));
        }
        if self.link_mbit == Some(0) {
            return Err("--link-mbit must be above 0 (leave it out for an unshaped link)".into());
        }
        Ok(())
    }

    pub fn switch_ns(&self) -> String {
        format!("tern-{}-sw", self.index)
    }

    /// Namespace of host `i` (1-based).
    pub fn host_ns(&self, i: u32) -> String {
        format!("tern-{}-h{i}", self.index)
    }

    /// Host names as the agents report them.
    pub fn host_name(&self, i: u32) -> String {
        format!("h{i}")
    }

    /// The root namespace's end of its link to the switch.
    pub fn root_link(&self) -> String {
        format!("tern-{}-r", self.index)
    }

    /// Host `i`'s bridge MAC: fixed, locally administered, unique in the lab (guests use
    /// QEMU's `52:54:00` range).
    pub fn host_bridge_mac(&self, i: u32) -> String {
        format!("02:74:65:{:02x}:00:{:02x}", self.index, i as u8)
    }

    pub fn host_addr(&self, i: u32) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.index, i as u8)
    }

    pub fn root_addr(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.index, 254)
    }

    pub fn agent_url(&self, i: u32) -> String {
        format!("http://{}:{AGENT_PORT}", self.host_addr(i))
    }

    /// Every namespace the lab creates.
    pub fn namespaces(&self) -> Vec<String> {
        let mut v = vec![self.switch_ns()];
        v.extend((1..=self.hosts).map(|i| self.host_ns(i)));
        v
    }

    /// Creates the switch namespace. It comes first and on its own: `ip netns add` fails
    /// when the name exists, so it claims the lab index against a lab being built at the
    /// same moment (two test runs, say).
    pub fn claim_command(&self) -> Cmd {
        cmd(&["ip", "netns", "add", &self.switch_ns()])
    }

    /// The commands that build the rest of the lab's network, in order, after the claim.
    pub fn up_commands(&self) -> Vec<Cmd> {
        let sw = self.switch_ns();
        let mut c = vec![
            cmd(&["ip", "-n", &sw, "link", "set", "lo", "up"]),
            cmd(&["ip", "-n", &sw, "link", "add", "br0", "type", "bridge"]),
            cmd(&["ip", "-n", &sw, "link", "set", "br0", "up"]),
        ];
        for i in 1..=self.hosts {
            let h = self.host_ns(i);
            let port = format!("p{i}");
            let addr = format!("{}/24", self.host_addr(i));
            c.extend([
                cmd(&["ip", "netns", "add", &h]),
                cmd(&["ip", "-n", &h, "link", "set", "lo", "up"]),
                cmd(&[
                    "ip", "-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                    "netns", &h,
                ]),
                cmd(&["ip", "-n", &sw, "link", "set", &port, "master", "br0", "up"]),
                // A bridge with no address of its own takes the lowest of its ports', so
                // a guest's tap joining or leaving could change the host's MAC under its
                // peers' ARP caches: traffic to the host then stalls for seconds.
                cmd(&[
                    "ip",
                    "-n",
                    &h,
                    "link",
                    "add",
                    HOST_BRIDGE,
                    "address",
                    &self.host_bridge_mac(i),
                    "type",
                    "bridge",
                ]),
                cmd(&[
                    "ip",
                    "-n",
                    &h,
                    "link",
                    "set",
                    "eth0",
                    "master",
                    HOST_BRIDGE,
                    "up",
                ]),
                cmd(&["ip", "-n", &h, "link", "set", HOST_BRIDGE, "up"]),
                cmd(&["ip", "-n", &h, "addr", "add", &addr, "dev", HOST_BRIDGE]),
            ]);
            if let Some(mbit) = self.link_mbit {
                // Both directions: the host's uplink egress and the switch port toward it.
                c.push(tbf(&h, "eth0", mbit));
                c.push(tbf(&sw, &port, mbit));
            }
        }
        let r = self.root_link();
        let raddr = format!("{}/24", self.root_addr());
        c.extend([
            cmd(&[
                "ip", "link", "add", &r, "type", "veth", "peer", "name", "r0", "netns", &sw,
            ]),
            cmd(&["ip", "-n", &sw, "link", "set", "r0", "master", "br0", "up"]),
            cmd(&["ip", "addr", "add", &raddr, "dev", &r]),
            cmd(&["ip", "link", "set", &r, "up"]),
        ]);
        c
    }

    /// The commands that remove exactly what [`claim_command`](Self::claim_command) and
    /// [`up_commands`](Self::up_commands) made.
    /// Deleting a namespace deletes the links inside it; the root link goes first.
    pub fn down_commands(&self) -> Vec<Cmd> {
        let mut c = vec![cmd(&["ip", "link", "del", &self.root_link()])];
        for ns in self.namespaces().into_iter().rev() {
            c.push(cmd(&["ip", "netns", "del", &ns]));
        }
        c
    }
}

/// Token bucket burst for a rate: 4 ms of traffic, at least 16 KiB, so the shaper neither
/// starves TCP at high rates nor lets long bursts through at low ones.
pub fn burst_bytes(mbit: u32) -> u64 {
    (u64::from(mbit) * 1_000_000 / 8 / 250).max(16 * 1024)
}

fn tbf(ns: &str, dev: &str, mbit: u32) -> Cmd {
    cmd(&[
        "tc",
        "-n",
        ns,
        "qdisc",
        "add",
        "dev",
        dev,
        "root",
        "tbf",
        "rate",
        &format!("{mbit}mbit"),
        "burst",
        &burst_bytes(mbit).to_string(),
        "latency",
        "20ms",
    ])
}

/// The first lab index whose names and /24 are free, given the namespaces that exist and
/// the IPv4 addresses configured in the root namespace.
pub fn pick_index(existing_ns: &[String], root_addrs: &[Ipv4Addr]) -> Option<u8> {
    (0..=255u8).find(|&k| {
        let prefix = format!("tern-{k}-");
        !existing_ns.iter().any(|n| n.starts_with(&prefix))
            && !root_addrs.iter().any(|a| a.octets()[..3] == [198, 18, k])
    })
}

/// Namespace names from `ip netns list` output (pure).
pub fn parse_netns_list(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// IPv4 addresses from `ip -4 -o addr show` output (pure).
pub fn parse_addrs(text: &str) -> Vec<Ipv4Addr> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            it.find(|w| *w == "inet")?;
            it.next()?.split('/').next()?.parse().ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn shape(hosts: u32) -> LabShape {
        LabShape {
            index: 3,
            hosts,
            link_mbit: Some(1000),
        }
    }

    #[test]
    fn names_and_addresses() {
        let s = shape(2);
        assert_eq!(s.host_ns(2), "tern-3-h2");
        assert_eq!(s.host_addr(2), Ipv4Addr::new(198, 18, 3, 2));
        assert_eq!(s.root_addr(), Ipv4Addr::new(198, 18, 3, 254));
        assert_eq!(s.agent_url(1), "http://198.18.3.1:7070");
        assert!(
            LabShape { index: 255, ..s }.root_link().len() <= 15,
            "IFNAMSIZ"
        );
    }

    #[test]
    fn every_host_bridge_has_its_own_fixed_address_before_ports_join() {
        let s = shape(3);
        let up = s.up_commands();
        let macs: Vec<String> = (1..=3).map(|i| s.host_bridge_mac(i)).collect();
        assert_eq!(
            macs.iter().collect::<std::collections::HashSet<_>>().len(),
            3
        );
        for (i, mac) in (1..=3).zip(&macs) {
            let ns = s.host_ns(i);
            let set = up
                .iter()
                .position(|c| c.contains(&ns) && c.contains(&"address".to_string()))
                .expect("the bridge's address is set");
            assert!(up[set].contains(mac), "{:?}", up[set]);
            let joins = up
                .iter()
                .position(|c| c.contains(&ns) && c.contains(&"master".to_string()))
                .unwrap();
            assert!(set < joins, "address after the first port joined");
        }
    }

    #[test]
    fn shaping_in_both_directions() {
        let up = shape(2).up_commands();
        let tbfs: Vec<_> = up
            .iter()
            .filter(|c| c.contains(&"tbf".to_string()))
            .collect();
        assert_eq!(tbfs.len(), 4);
        assert!(tbfs.iter().all(|c| c.contains(&"1000mbit".to_string())));
        let unshaped = LabShape {
            link_mbit: None,
            ..shape(2)
        };
        assert!(!unshaped.up_commands().iter().any(|c| c[0] == "tc"));
    }

    #[test]
    fn validation() {
        assert!(shape(0).validate().is_err());
        assert!(shape(100).validate().is_err());
        assert!(LabShape {
            link_mbit: Some(0),
            ..shape(1)
        }
        .validate()
        .is_err());
        assert!(shape(2).validate().is_ok());
    }

    #[test]
    fn index_avoids_existing_labs_and_addresses() {
        let ns = vec!["tern-0-sw".to_string(), "other".to_string()];
        let addrs = vec![Ipv4Addr::new(198, 18, 1, 5), Ipv4Addr::new(10, 0, 0, 1)];
        assert_eq!(pick_index(&ns, &addrs), Some(2));
        assert_eq!(pick_index(&[], &[]), Some(0));
    }

    #[test]
    fn parses_ip_output() {
        let ns = "tern-0-h1 (id: 2)\ntern-0-sw (id: 1)\n";
        assert_eq!(parse_netns_list(ns), vec!["tern-0-h1", "tern-0-sw"]);
        let a = "1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever\n\
                 7: tern-4-r    inet 198.18.4.254/24 scope global tern-4-r\n";
        assert_eq!(
            parse_addrs(a),
            vec![Ipv4Addr::new(127, 0, 0, 1), Ipv4Addr::new(198, 18, 4, 254)]
        );
    }

    proptest! {
        // Down removes every namespace up adds, and the root link: nothing is left.
        #[test]
        fn down_undoes_up(hosts in 1u32..=MAX_HOSTS, index in any::<u8>(), mbit in proptest::option::of(1u32..10_000)) {
            let s = LabShape { index, hosts, link_mbit: mbit };
            let mut up = vec![s.claim_command()];
            up.extend(s.up_commands());
            let down = s.down_commands();
            let added_ns: Vec<&String> = up.iter().filter(|c| c[1] == "netns" && c[2] == "add").map(|c| &c[3]).collect();
            for ns in &added_ns {
                prop_assert!(down.iter().any(|c| c[1] == "netns" && c[2] == "del" && &&c[3] == ns));
            }
            prop_assert_eq!(added_ns.len() as u32, hosts + 1);
            prop_assert!(down.iter().any(|c| c[..3] == ["ip", "link", "del"] && c[3] == s.root_link()));
            // Every root-namespace command touches only the lab's own link.
            for c in up.iter().filter(|c| c[0] == "ip" && c[1] != "-n" && c[1] != "netns") {
                prop_assert!(c.contains(&s.root_link()), "{:?}", c);
            }
        }

        #[test]
        fn burst_grows_with_rate(a in 1u32..100_000, b in 1u32..100_000) {
            if a <= b { prop_assert!(burst_bytes(a) <= burst_bytes(b)); }
        }
    }
}
