//! Taint classification over plain values (pure): which processes the world outside the
//! VM can observe, and why.
//!
//! A [`World`] holds every process with the resources its fds and shared mappings
//! reach, and what the kernel says about sockets (unix peers, inet addresses).
//! [`classify`] seeds the processes with a non-loopback network peer (or a listener
//! that accepted one) and spreads from them, breadth first, along shared resources and
//! from parent to child. Exempt processes (kernel threads, init, the agent) are never
//! tainted and never pass taint on: the agent talks to everything.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::{IpAddr, SocketAddr};

use tern_api::guest::{DependencyKind, TaintClass, TaintReason};

/// Most reasons kept for one dependent process (a server with a thousand tainted
/// clients needs one to be explained).
pub const MAX_REASONS: usize = 8;

/// What one fd or shared mapping reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResKey {
    /// An anonymous pipe or a FIFO: its device and inode.
    Pipe(u64, u64),
    /// A unix socket's inode.
    Unix(u64),
    /// A TCP or UDP socket's inode.
    Inet(u64),
    /// A regular file: device and inode.
    File(u64, u64),
    /// A shared memory mapping (SysV segment, `/dev/shm` or any `MAP_SHARED` file).
    Shm(u64, u64),
}

/// One fd (or mapping, with no fd) of a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handle {
    pub fd: Option<i32>,
    pub key: ResKey,
    /// Open (or mapped) for writing.
    pub write: bool,
    /// What `/proc` calls it: a path, `pipe:[N]`, `socket:[N]`.
    pub label: String,
}

/// One process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Process {
    pub pid: u32,
    pub ppid: u32,
    pub comm: String,
    pub exempt: bool,
    pub handles: Vec<Handle>,
}

/// An inet socket as `/proc/net/{tcp,udp}{,6}` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InetSocket {
    pub local: SocketAddr,
    /// The peer; `None` when unconnected (a listener, an unconnected UDP socket).
    pub remote: Option<SocketAddr>,
    pub listening: bool,
}

/// Every process and what the kernel says about the sockets they hold.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct World {
    pub procs: BTreeMap<u32, Process>,
    /// Unix socket inode → its peer's inode.
    pub unix_peer: BTreeMap<u64, u64>,
    /// A connecting unix socket whose connection is not accepted yet → the listener.
    pub unix_pending: BTreeMap<u64, u64>,
    pub inet: BTreeMap<u64, InetSocket>,
    /// Listening sockets seen accepting a non-loopback peer, and that peer.
    pub accepted_external: BTreeMap<u64, String>,
    /// Taint that no fd shows any more: inherited at fork, or found by an event.
    pub sticky: BTreeMap<u32, Vec<TaintReason>>,
}

/// A process's class and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub class: TaintClass,
    pub reasons: Vec<TaintReason>,
}

/// Loopback or no address at all: nothing outside the VM.
pub fn is_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback() || v4.is_unspecified(),
        IpAddr::V6(v6) => {
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// What makes two holders of a resource depend on each other: the channel both ends
/// of a connection share, so a client and the server's accepted socket (or, before it
/// is accepted, the listener) meet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Link {
    Pipe(u64, u64),
    Unix(u64),
    Inet(u64),
    File(u64, u64),
    Shm(u64, u64),
}

impl World {
    fn link(&self, key: ResKey, loopback: &BTreeMap<u64, u64>) -> Link {
        match key {
            ResKey::Pipe(d, i) => Link::Pipe(d, i),
            ResKey::File(d, i) => Link::File(d, i),
            ResKey::Shm(d, i) => Link::Shm(d, i),
            ResKey::Unix(i) => Link::Unix(match self.unix_pending.get(&i) {
                Some(listener) => *listener,
                None => self.unix_peer.get(&i).map_or(i, |p| i.min(*p)),
            }),
            ResKey::Inet(i) => Link::Inet(*loopback.get(&i).unwrap_or(&i)),
        }
    }

    /// Each inet socket connected over loopback → the channel it shares with its
    /// other end: the pair's smaller inode once accepted, else the listener's.
    fn loopback_channels(&self) -> BTreeMap<u64, u64> {
        let by_ends: BTreeMap<(SocketAddr, SocketAddr), u64> = self
            .inet
            .iter()
            .filter_map(|(i, s)| s.remote.map(|r| ((s.local, r), *i)))
            .collect();
        let mut out = BTreeMap::new();
        for (i, s) in &self.inet {
            let Some(r) = s.remote.filter(|r| is_local(r.ip())) else {
                continue;
            };
            if let Some(peer) = by_ends.get(&(r, s.local)) {
                out.insert(*i, (*i).min(*peer));
            } else if let Some((l, _)) = self.inet.iter().find(|(_, l)| {
                l.listening
                    && l.local.port() == r.port()
                    && (l.local.ip() == r.ip() || l.local.ip().is_unspecified())
            }) {
                out.insert(*i, *l);
            }
        }
        out
    }

    /// The reasons `p` talks to the outside itself.
    fn external_reasons(&self, p: &Process) -> Vec<TaintReason> {
        let mut out = Vec::new();
        for h in &p.handles {
            let ResKey::Inet(i) = h.key else { continue };
            let Some(s) = self.inet.get(&i) else { continue };
            if let Some(r) = s.remote.filter(|r| !is_local(r.ip())) {
                out.push(reason(
                    DependencyKind::NetworkPeer,
                    h.fd,
                    r.to_string(),
                    None,
                ));
            } else if let Some(peer) = self.accepted_external.get(&i) {
                out.push(reason(DependencyKind::Listener, h.fd, peer.clone(), None));
            }
        }
        out
    }
}

fn reason(kind: DependencyKind, fd: Option<i32>, peer: String, via: Option<u32>) -> TaintReason {
    TaintReason {
        kind,
        fd,
        peer: Some(peer),
        via_pid: via,
        latency_ms: None,
    }
}

fn kind_of(key: ResKey) -> DependencyKind {
    match key {
        ResKey::Pipe(..) => DependencyKind::Pipe,
        ResKey::Unix(_) => DependencyKind::UnixSocket,
        ResKey::Inet(_) => DependencyKind::LoopbackSocket,
        ResKey::File(..) => DependencyKind::File,
        ResKey::Shm(..) => DependencyKind::SharedMemory,
    }
}

/// Every process's class and reasons.
pub fn classify(w: &World) -> BTreeMap<u32, Verdict> {
    let loopback = w.loopback_channels();
    // Who holds each channel, and whether for writing.
    let mut holders: BTreeMap<Link, Vec<(u32, bool)>> = BTreeMap::new();
    for p in w.procs.values().filter(|p| !p.exempt) {
        for h in &p.handles {
            holders
                .entry(w.link(h.key, &loopback))
                .or_default()
                .push((p.pid, h.write));
        }
    }
    let mut children: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for p in w.procs.values().filter(|p| !p.exempt) {
        children.entry(p.ppid).or_default().push(p.pid);
    }

    let mut out: BTreeMap<u32, Verdict> = BTreeMap::new();
    let mut queue = VecDeque::new();
    for p in w.procs.values() {
        if p.exempt {
            out.insert(
                p.pid,
                Verdict {
                    class: TaintClass::Exempt,
                    reasons: Vec::new(),
                },
            );
            continue;
        }
        let mut reasons = w.external_reasons(p);
        let sticky = w.sticky.get(&p.pid).cloned().unwrap_or_default();
        let external = !reasons.is_empty()
            || sticky.iter().any(|r| {
                matches!(
                    r.kind,
                    DependencyKind::NetworkPeer | DependencyKind::Listener
                )
            });
        reasons.extend(sticky);
        if !reasons.is_empty() {
            reasons.truncate(MAX_REASONS);
            let class = if external {
                TaintClass::External
            } else {
                TaintClass::Dependent
            };
            out.insert(p.pid, Verdict { class, reasons });
            queue.push_back(p.pid);
        }
    }

    // Breadth first from the seeds: a process is tainted by the ones one step nearer.
    while let Some(t) = queue.pop_front() {
        let Some(tp) = w.procs.get(&t) else { continue };
        let mut found: BTreeMap<u32, Vec<TaintReason>> = BTreeMap::new();
        for h in &tp.handles {
            let link = w.link(h.key, &loopback);
            let writers_only = matches!(link, Link::File(..) | Link::Shm(..));
            for &(q, q_write) in holders.get(&link).into_iter().flatten() {
                if q == t || out.contains_key(&q) || (writers_only && !h.write && !q_write) {
                    continue;
                }
                // The reason names q's own fd on the shared channel.
                let (fd, label) = w.procs[&q]
                    .handles
                    .iter()
                    .find(|qh| w.link(qh.key, &loopback) == link)
                    .map(|qh| (qh.fd, qh.label.clone()))
                    .unwrap_or((None, h.label.clone()));
                found
                    .entry(q)
                    .or_default()
                    .push(reason(kind_of(h.key), fd, label, Some(t)));
            }
        }
        for &c in children.get(&t).into_iter().flatten() {
            if !out.contains_key(&c) {
                found.entry(c).or_default().push(reason(
                    DependencyKind::Parent,
                    None,
                    format!("pid {t}"),
                    Some(t),
                ));
            }
        }
        for (q, mut reasons) in found {
            reasons.sort_by_key(|r| (r.kind, r.fd));
            reasons.dedup();
            reasons.truncate(MAX_REASONS);
            out.insert(
                q,
                Verdict {
                    class: TaintClass::Dependent,
                    reasons,
                },
            );
            queue.push_back(q);
        }
    }
    for p in w.procs.values() {
        out.entry(p.pid).or_insert(Verdict {
            class: TaintClass::Untainted,
            reasons: Vec::new(),
        });
    }
    out
}

/// The processes a taint map calls tainted (external or dependent).
pub fn tainted(v: &BTreeMap<u32, Verdict>) -> BTreeSet<u32> {
    v.iter()
        .filter(|(_, v)| matches!(v.class, TaintClass::External | TaintClass::Dependent))
        .map(|(p, _)| *p)
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub fn proc_(pid: u32, ppid: u32, handles: Vec<Handle>) -> Process {
        Process {
            pid,
            ppid,
            comm: format!("p{pid}"),
            exempt: false,
            handles,
        }
    }

    pub fn h(fd: i32, key: ResKey, write: bool) -> Handle {
        Handle {
            fd: Some(fd),
            key,
            write,
            label: format!("{key:?}"),
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn world(procs: Vec<Process>) -> World {
        World {
            procs: procs.into_iter().map(|p| (p.pid, p)).collect(),
            ..World::default()
        }
    }

    /// A world where pid 10 holds socket 100 connected to 192.0.2.7:443.
    fn with_external(mut procs: Vec<Process>) -> World {
        procs.push(proc_(10, 1, vec![h(3, ResKey::Inet(100), true)]));
        let mut w = world(procs);
        w.inet.insert(
            100,
            InetSocket {
                local: addr("10.0.0.2:40000"),
                remote: Some(addr("192.0.2.7:443")),
                listening: false,
            },
        );
        w
    }

    fn class(v: &BTreeMap<u32, Verdict>, pid: u32) -> TaintClass {
        v[&pid].class
    }

    #[test]
    fn a_non_loopback_peer_is_external_and_names_fd_and_peer() {
        let v = classify(&with_external(vec![]));
        assert_eq!(class(&v, 10), TaintClass::External);
        let r = &v[&10].reasons[0];
        assert_eq!(r.kind, DependencyKind::NetworkPeer);
        assert_eq!(r.fd, Some(3));
        assert_eq!(r.peer.as_deref(), Some("192.0.2.7:443"));
        assert_eq!(r.via_pid, None);
    }

    #[test]
    fn a_pipe_chain_taints_transitively_and_strangers_stay_untainted() {
        let pipe_a = ResKey::Pipe(9, 1);
        let pipe_b = ResKey::Pipe(9, 2);
        let mut w = with_external(vec![
            proc_(11, 1, vec![h(0, pipe_a, false), h(1, pipe_b, true)]),
            proc_(12, 1, vec![h(0, pipe_b, false)]),
            proc_(13, 1, vec![h(0, ResKey::Pipe(9, 3), false)]),
        ]);
        w.procs
            .get_mut(&10)
            .unwrap()
            .handles
            .push(h(5, pipe_a, true));
        let v = classify(&w);
        assert_eq!(class(&v, 11), TaintClass::Dependent);
        assert_eq!(v[&11].reasons[0].via_pid, Some(10));
        assert_eq!(v[&11].reasons[0].kind, DependencyKind::Pipe);
        assert_eq!(v[&11].reasons[0].fd, Some(0), "the dependent's own fd");
        assert_eq!(class(&v, 12), TaintClass::Dependent);
        assert_eq!(v[&12].reasons[0].via_pid, Some(11));
        assert_eq!(class(&v, 13), TaintClass::Untainted);
        assert!(v[&13].reasons.is_empty());
    }

    #[test]
    fn unix_peers_and_pending_connections_link_client_and_server() {
        let mut w = with_external(vec![
            // A server holding listener 200 and accepted socket 201.
            proc_(
                20,
                1,
                vec![h(3, ResKey::Unix(200), true), h(4, ResKey::Unix(201), true)],
            ),
            // A process whose connection to the listener was not accepted yet.
            proc_(21, 1, vec![h(3, ResKey::Unix(210), true)]),
        ]);
        // The external process is the server's accepted client.
        w.procs
            .get_mut(&10)
            .unwrap()
            .handles
            .push(h(6, ResKey::Unix(202), true));
        w.unix_peer.extend([(201, 202), (202, 201)]);
        w.unix_pending.insert(210, 200);
        let v = classify(&w);
        assert_eq!(class(&v, 20), TaintClass::Dependent);
        assert_eq!(v[&20].reasons[0].kind, DependencyKind::UnixSocket);
        assert_eq!(class(&v, 21), TaintClass::Dependent);
        assert_eq!(v[&21].reasons[0].via_pid, Some(20));
    }

    #[test]
    fn loopback_tcp_links_both_ends_but_is_not_external() {
        let mut w = with_external(vec![
            proc_(30, 1, vec![h(3, ResKey::Inet(300), true)]),
            proc_(31, 1, vec![h(3, ResKey::Inet(301), true)]),
            proc_(32, 1, vec![h(3, ResKey::Inet(302), true)]),
        ]);
        // 10 connects over loopback to 30's listener (not accepted yet); 31 and 32 are
        // connected to each other.
        w.procs
            .get_mut(&10)
            .unwrap()
            .handles
            .push(h(7, ResKey::Inet(303), true));
        let s = |l: &str, r: Option<&str>, listening| InetSocket {
            local: addr(l),
            remote: r.map(addr),
            listening,
        };
        w.inet.insert(300, s("0.0.0.0:8080", None, true));
        w.inet
            .insert(303, s("127.0.0.1:5000", Some("127.0.0.1:8080"), false));
        w.inet
            .insert(301, s("127.0.0.1:6000", Some("127.0.0.1:6001"), false));
        w.inet
            .insert(302, s("127.0.0.1:6001", Some("127.0.0.1:6000"), false));
        let v = classify(&w);
        assert_eq!(class(&v, 30), TaintClass::Dependent);
        assert_eq!(v[&30].reasons[0].kind, DependencyKind::LoopbackSocket);
        assert_eq!(class(&v, 31), TaintClass::Untainted);
        assert_eq!(class(&v, 32), TaintClass::Untainted);
        w.procs
            .get_mut(&10)
            .unwrap()
            .handles
            .push(h(8, ResKey::Inet(301), true));
        let v = classify(&w);
        assert_eq!(
            class(&v, 32),
            TaintClass::Dependent,
            "via the shared socket 301"
        );
    }

    #[test]
    fn files_link_only_through_a_writer_and_shm_likewise() {
        let f = ResKey::File(8, 77);
        let m = ResKey::Shm(1, 5);
        let mut w = with_external(vec![
            proc_(40, 1, vec![h(3, f, false)]),
            proc_(41, 1, vec![h(3, f, true)]),
            proc_(
                42,
                1,
                vec![Handle {
                    fd: None,
                    ..h(0, m, false)
                }],
            ),
        ]);
        w.procs.get_mut(&10).unwrap().handles.push(h(9, f, false));
        w.procs.get_mut(&10).unwrap().handles.push(h(10, m, false));
        let v = classify(&w);
        // 10 reads what 41 writes; 40 only reads what 41 writes, through 41.
        assert_eq!(class(&v, 41), TaintClass::Dependent);
        assert_eq!(v[&41].reasons[0].kind, DependencyKind::File);
        assert_eq!(class(&v, 40), TaintClass::Dependent);
        assert_eq!(v[&40].reasons[0].via_pid, Some(41));
        // Both map the segment read-only: no dependency.
        assert_eq!(class(&v, 42), TaintClass::Untainted);
        w.procs.get_mut(&42).unwrap().handles[0].write = true;
        let v = classify(&w);
        assert_eq!(class(&v, 42), TaintClass::Dependent);
        assert_eq!(v[&42].reasons[0].kind, DependencyKind::SharedMemory);
        assert_eq!(v[&42].reasons[0].fd, None);
    }

    #[test]
    fn children_inherit_parents_do_not_and_exempt_processes_stop_taint() {
        let pipe = ResKey::Pipe(9, 50);
        let mut w = with_external(vec![
            proc_(50, 10, vec![]),
            proc_(51, 50, vec![]),
            proc_(52, 1, vec![h(0, pipe, false)]),
            Process {
                exempt: true,
                ..proc_(1, 0, vec![h(1, pipe, true)])
            },
        ]);
        w.procs.get_mut(&10).unwrap().handles.push(h(4, pipe, true));
        w.procs.get_mut(&10).unwrap().ppid = 53;
        w.procs.insert(53, proc_(53, 1, vec![]));
        let v = classify(&w);
        assert_eq!(class(&v, 50), TaintClass::Dependent);
        assert_eq!(v[&50].reasons[0].kind, DependencyKind::Parent);
        assert_eq!(class(&v, 51), TaintClass::Dependent, "grandchildren too");
        assert_eq!(
            class(&v, 53),
            TaintClass::Untainted,
            "taint flows down only"
        );
        assert_eq!(class(&v, 1), TaintClass::Exempt);
        assert_eq!(class(&v, 52), TaintClass::Dependent, "direct pipe to 10");
        // Without the direct pipe, the exempt writer passes nothing on.
        w.procs
            .get_mut(&10)
            .unwrap()
            .handles
            .retain(|x| x.key != pipe);
        let v = classify(&w);
        assert_eq!(class(&v, 52), TaintClass::Untainted);
    }

    #[test]
    fn sticky_taint_counts_and_listeners_that_accepted_outsiders_are_external() {
        let mut w = world(vec![
            proc_(60, 1, vec![h(3, ResKey::Inet(600), false)]),
            proc_(61, 1, vec![]),
        ]);
        w.inet.insert(
            600,
            InetSocket {
                local: addr("0.0.0.0:22"),
                remote: None,
                listening: true,
            },
        );
        let v = classify(&w);
        assert_eq!(class(&v, 60), TaintClass::Untainted, "nobody connected yet");
        w.accepted_external.insert(600, "192.0.2.9:5555".into());
        w.sticky.insert(
            61,
            vec![reason(
                DependencyKind::Parent,
                None,
                "pid 60".into(),
                Some(60),
            )],
        );
        let v = classify(&w);
        assert_eq!(class(&v, 60), TaintClass::External);
        assert_eq!(v[&60].reasons[0].kind, DependencyKind::Listener);
        assert_eq!(class(&v, 61), TaintClass::Dependent);
    }

    /// Random worlds: processes 1..=n sharing resources from a small pool.
    fn worlds() -> impl Strategy<Value = World> {
        let handle = (0u64..6, 0u8..5, any::<bool>()).prop_map(|(i, k, write)| {
            let key = match k {
                0 => ResKey::Pipe(1, i),
                1 => ResKey::Unix(i),
                2 => ResKey::File(2, i),
                3 => ResKey::Shm(3, i),
                _ => ResKey::Inet(i),
            };
            h(i as i32, key, write)
        });
        let procs = prop::collection::vec(
            (0u32..8, any::<bool>(), prop::collection::vec(handle, 0..4)),
            1..8,
        );
        (procs, prop::collection::btree_set(0u64..6, 0..3)).prop_map(|(procs, external)| {
            let mut w = World::default();
            for (i, (ppid, exempt, handles)) in procs.into_iter().enumerate() {
                let pid = i as u32 + 1;
                w.procs.insert(
                    pid,
                    Process {
                        exempt,
                        ..proc_(pid, ppid, handles)
                    },
                );
            }
            for i in 0..6u64 {
                w.inet.insert(
                    i,
                    InetSocket {
                        local: addr("10.0.0.2:1000"),
                        remote: Some(if external.contains(&i) {
                            addr("192.0.2.1:80")
                        } else {
                            addr("127.0.0.1:1")
                        }),
                        listening: false,
                    },
                );
            }
            w
        })
    }

    proptest! {
        #[test]
        fn adding_a_dependency_never_untaints(w in worlds(), pid in 1u32..8, key in 0u64..6, write: bool) {
            let before = tainted(&classify(&w));
            let mut w2 = w.clone();
            if let Some(p) = w2.procs.get_mut(&pid) {
                p.handles.push(h(99, ResKey::Pipe(1, key), write));
            }
            let after = tainted(&classify(&w2));
            prop_assert!(before.is_subset(&after), "{before:?} ⊄ {after:?}");
        }

        #[test]
        fn handle_order_does_not_matter(w in worlds()) {
            let mut w2 = w.clone();
            for p in w2.procs.values_mut() {
                p.handles.reverse();
            }
            let a = classify(&w);
            let b = classify(&w2);
            for (pid, v) in &a {
                prop_assert_eq!(v.class, b[pid].class);
            }
        }

        #[test]
        fn sharing_nothing_with_a_tainted_process_means_untainted(w in worlds()) {
            let v = classify(&w);
            let t = tainted(&v);
            for p in w.procs.values() {
                if p.exempt {
                    prop_assert_eq!(v[&p.pid].class, TaintClass::Exempt);
                    continue;
                }
                if !t.contains(&p.pid) {
                    continue;
                }
                // Every tainted process has a reason: its own socket, a tainted parent,
                // or a handle shared with another tainted process.
                let own = !w.external_reasons(p).is_empty();
                let parent = t.contains(&p.ppid) && !w.procs.get(&p.ppid).is_some_and(|q| q.exempt);
                let shared = p.handles.iter().any(|h| {
                    t.iter().any(|q| *q != p.pid && w.procs[q].handles.iter().any(|qh| {
                        let l = |k| w.link(k, &w.loopback_channels());
                        l(qh.key) == l(h.key)
                    }))
                });
                prop_assert!(own || parent || shared, "pid {} tainted for nothing", p.pid);
                prop_assert!(!v[&p.pid].reasons.is_empty());
            }
        }
    }
}
