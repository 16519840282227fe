//! Reading the guest's processes and sockets from `/proc` (and the kernel's unix
//! socket diagnostics) into a [`World`]: the tracker's seed, the answer to `taint` when
//! nothing is tracked, and the recovery after lost events. Parsers are pure; the
//! readers around them tolerate processes that exit while being read.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::{FileTypeExt, MetadataExt};

use super::graph::{Handle, InetSocket, Process, ResKey, World};
use super::unix_diag;

/// The kernel marks its own threads with this flag in `/proc/PID/stat`.
const PF_KTHREAD: u64 = 0x0020_0000;
/// `st_dev` of anonymous pipes (pipefs): `pipe:[N]` links carry only the inode.
const PIPEFS: u64 = 0;

/// What `/proc/net` and the unix diagnostics say about every socket.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sockets {
    /// Unix socket inodes.
    pub unix: BTreeMap<u64, String>,
    pub unix_peer: BTreeMap<u64, u64>,
    pub unix_pending: BTreeMap<u64, u64>,
    pub inet: BTreeMap<u64, InetSocket>,
    /// Listeners with a non-loopback connection, accepted or still queued.
    pub accepted_external: BTreeMap<u64, String>,
    /// Why unix peers are unknown, if they are.
    pub unix_diag_error: Option<String>,
}

/// `pid (comm) state ppid ... flags ...` → (comm, ppid, flags).
pub fn parse_stat(text: &str) -> Option<(String, u32, u64)> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_string();
    let mut rest = text.get(close + 1..)?.split_whitespace();
    let _state = rest.next()?;
    let ppid = rest.next()?.parse().ok()?;
    // pgrp session tty_nr tpgid, then flags.
    let flags = rest.nth(4)?.parse().ok()?;
    Some((comm, ppid, flags))
}

/// A `/proc/net/{tcp,udp}{,6}` address: `0100007F:1F90` (IPv4, the kernel's byte
/// order) or 32 hex digits (IPv6, four native-order words).
pub fn parse_addr(text: &str) -> Option<SocketAddr> {
    let (ip, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(
            u32::from_str_radix(ip, 16).ok()?.to_ne_bytes(),
        )),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                let w = u32::from_str_radix(ip.get(i * 8..i * 8 + 8)?, 16).ok()?;
                b[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// The sockets of one `/proc/net/{tcp,udp}{,6}` table: inode → socket. `tcp` says
/// whether state `0A` means listening. Rows of connections no process holds yet (inode
/// 0, in a listener's queue) are returned apart, by their ends.
pub fn parse_inet(text: &str, tcp: bool) -> (Vec<(u64, InetSocket)>, Vec<InetSocket>) {
    let mut held = Vec::new();
    let mut queued = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(local), Some(remote), Some(st), Some(inode)) =
            (f.get(1), f.get(2), f.get(3), f.get(9))
        else {
            continue;
        };
        let (Some(local), Some(remote), Ok(inode)) =
            (parse_addr(local), parse_addr(remote), inode.parse::<u64>())
        else {
            continue;
        };
        let listening = tcp && *st == "0A";
        let connected = !(remote.ip().is_unspecified() && remote.port() == 0);
        let s = InetSocket {
            local,
            remote: connected.then_some(remote),
            listening,
        };
        if inode == 0 {
            queued.push(s);
        } else {
            held.push((inode, s));
        }
    }
    (held, queued)
}

/// `/proc/net/unix`: inode → path (empty for unnamed sockets).
pub fn parse_unix(text: &str) -> BTreeMap<u64, String> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let inode = f.get(6)?.parse().ok()?;
            Some((inode, f.get(7).map(|s| s.to_string()).unwrap_or_default()))
        })
        .collect()
}

/// `/proc/PID/fdinfo/N`'s `flags:` (octal) → open for writing.
pub fn fdinfo_writes(text: &str) -> bool {
    text.lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .and_then(|f| u64::from_str_radix(f.trim(), 8).ok())
        .is_some_and(|f| matches!(f & 3, 1 | 2))
}

/// The shared mappings of `/proc/PID/maps`: `(major, minor, inode, writable, path)`.
pub fn parse_maps(text: &str) -> Vec<(u32, u32, u64, bool, String)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut f = line.split_whitespace();
        let (Some(_range), Some(perms), Some(_off), Some(dev), Some(inode)) =
            (f.next(), f.next(), f.next(), f.next(), f.next())
        else {
            continue;
        };
        let path: Vec<&str> = f.collect();
        if perms.as_bytes().get(3) != Some(&b's') {
            continue;
        }
        let Some((maj, min)) = dev.split_once(':') else {
            continue;
        };
        let (Ok(maj), Ok(min), Ok(inode)) = (
            u32::from_str_radix(maj, 16),
            u32::from_str_radix(min, 16),
            inode.parse::<u64>(),
        ) else {
            continue;
        };
        if inode == 0 {
            continue;
        }
        let write = perms.as_bytes().get(1) == Some(&b'w');
        out.push((maj, min, inode, write, path.join(" ")));
    }
    out
}

/// Classifies one `/proc/PID/fd/N` link text; `None` for what carries no dependency
/// here (terminals, devices, eventfds) and for paths, which need a `stat`.
pub fn parse_link(link: &str, sockets: &Sockets) -> Option<ResKey> {
    let inode = |p: &str| link.strip_prefix(p)?.strip_suffix(']')?.parse::<u64>().ok();
    if let Some(i) = inode("pipe:[") {
        return Some(ResKey::Pipe(PIPEFS, i));
    }
    if let Some(i) = inode("socket:[") {
        if sockets.unix.contains_key(&i) {
            return Some(ResKey::Unix(i));
        }
        if sockets.inet.contains_key(&i) {
            return Some(ResKey::Inet(i));
        }
    }
    None
}

fn read(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// Reads every socket table (and the unix peers).
pub fn sockets() -> Sockets {
    let mut s = Sockets {
        unix: read("/proc/net/unix")
            .map(|t| parse_unix(&t))
            .unwrap_or_default(),
        ..Sockets::default()
    };
    let mut queued = Vec::new();
    for (file, tcp) in [
        ("tcp", true),
        ("tcp6", true),
        ("udp", false),
        ("udp6", false),
    ] {
        if let Some(t) = read(&format!("/proc/net/{file}")) {
            let (held, q) = parse_inet(&t, tcp);
            s.inet.extend(held);
            if tcp {
                queued.extend(q);
            }
        }
    }
    s.accepted_external = accepted_external(&s.inet, &queued);
    match unix_diag::dump() {
        Ok(d) => {
            s.unix_peer = d.peers;
            s.unix_pending = d.pending;
        }
        Err(e) => s.unix_diag_error = Some(e.to_string()),
    }
    s
}

/// Listeners with a connection from a non-loopback peer on their port (accepted or
/// queued): the listener serves the outside.
pub fn accepted_external(
    inet: &BTreeMap<u64, InetSocket>,
    queued: &[InetSocket],
) -> BTreeMap<u64, String> {
    let mut out = BTreeMap::new();
    for (li, l) in inet.iter().filter(|(_, l)| l.listening) {
        let conn = inet.values().chain(queued).find(|c| {
            !c.listening
                && c.local.port() == l.local.port()
                && c.remote.is_some_and(|r| !super::graph::is_local(r.ip()))
                && (l.local.ip().is_unspecified() || l.local.ip() == c.local.ip())
        });
        if let Some(r) = conn.and_then(|c| c.remote) {
            out.insert(*li, r.to_string());
        }
    }
    out
}

/// Who is exempt: kernel threads, init, this agent.
pub fn is_exempt(pid: u32, flags: u64) -> bool {
    pid == 1 || pid == std::process::id() || flags & PF_KTHREAD != 0
}

/// One process's fd and one fd's handle, or `None` once it is gone.
pub fn handle(pid: u32, fd: i32, sockets: &Sockets) -> Option<Handle> {
    let path = format!("/proc/{pid}/fd/{fd}");
    let link = std::fs::read_link(&path).ok()?;
    let label = link.to_string_lossy().into_owned();
    let write = read(&format!("/proc/{pid}/fdinfo/{fd}")).is_some_and(|t| fdinfo_writes(&t));
    let key = match parse_link(&label, sockets) {
        Some(k) => k,
        None if label.starts_with('/') => {
            let m = std::fs::metadata(&path).ok()?;
            if m.file_type().is_fifo() {
                ResKey::Pipe(m.dev(), m.ino())
            } else if m.file_type().is_file() {
                ResKey::File(m.dev(), m.ino())
            } else {
                return None;
            }
        }
        None => return None,
    };
    Some(Handle {
        fd: Some(fd),
        key,
        write,
        label,
    })
}

/// One process's fds and shared mappings, or `None` once it is gone.
pub fn process(pid: u32, sockets: &Sockets) -> Option<Process> {
    let (comm, ppid, flags) = parse_stat(&read(&format!("/proc/{pid}/stat"))?)?;
    let exempt = is_exempt(pid, flags);
    let mut handles = Vec::new();
    if !exempt {
        handles = fds(pid)
            .into_iter()
            .filter_map(|fd| handle(pid, fd, sockets))
            .collect();
        handles.extend(mappings(pid));
    }
    Some(Process {
        pid,
        ppid,
        comm,
        exempt,
        handles,
    })
}

/// A process's fd handles now, reusing `known` ones whose link is unchanged (one
/// `readlink` per fd; only new or changed fds are read further). `None` once gone.
pub fn refresh_fds(pid: u32, known: &[Handle], sockets: &Sockets) -> Option<Vec<Handle>> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    let mut out = Vec::new();
    for e in dir.flatten() {
        let Some(fd) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(link) = std::fs::read_link(e.path()) else {
            continue;
        };
        let link = link.to_string_lossy();
        match known.iter().find(|h| h.fd == Some(fd) && h.label == link) {
            Some(h) => out.push(h.clone()),
            None => out.extend(handle(pid, fd, sockets)),
        }
    }
    out.sort_by_key(|h| h.fd);
    Some(out)
}

/// A process's name now.
pub fn comm(pid: u32) -> Option<String> {
    read(&format!("/proc/{pid}/comm")).map(|c| c.trim_end().to_string())
}

/// The fd numbers a process has open now.
pub fn fds(pid: u32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    let mut v: Vec<i32> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    v.sort_unstable();
    v
}

/// A process's shared mappings as handles with no fd.
pub fn mappings(pid: u32) -> Vec<Handle> {
    let Some(text) = read(&format!("/proc/{pid}/maps")) else {
        return Vec::new();
    };
    let mut out: Vec<Handle> = Vec::new();
    for (maj, min, ino, write, path) in parse_maps(&text) {
        let key = ResKey::Shm(libc::makedev(maj, min), ino);
        match out.iter_mut().find(|h| h.key == key) {
            Some(h) => h.write |= write,
            None => out.push(Handle {
                fd: None,
                key,
                write,
                label: path,
            }),
        }
    }
    out
}

/// The process a thread belongs to (`Tgid:` of `/proc/TID/status`), `None` once gone.
pub fn tgid(tid: u32) -> Option<u32> {
    read(&format!("/proc/{tid}/status"))?
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))?
        .trim()
        .parse()
        .ok()
}

/// The pids in `/proc` (thread-group leaders).
pub fn pids() -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut v: Vec<u32> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    v.sort_unstable();
    v
}

/// A whole scan.
pub fn world() -> (World, Sockets) {
    let s = sockets();
    let procs = pids()
        .into_iter()
        .filter_map(|pid| process(pid, &s))
        .map(|p| (p.pid, p))
        .collect();
    let w = World {
        procs,
        unix_peer: s.unix_peer.clone(),
        unix_pending: s.unix_pending.clone(),
        inet: s.inet.clone(),
        accepted_external: s.accepted_external.clone(),
        sticky: BTreeMap::new(),
    };
    (w, s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_with_odd_names() {
        let (comm, ppid, flags) =
            parse_stat("42 (my (odd) name) S 7 42 42 0 -1 4194560 100 0").unwrap();
        assert_eq!((comm.as_str(), ppid, flags), ("my (odd) name", 7, 4194560));
        let (_, _, f) = parse_stat("2 (kthreadd) S 0 0 0 0 -1 2129984 0").unwrap();
        assert!(is_exempt(2, f), "kthreadd has PF_KTHREAD");
        assert!(parse_stat("garbage").is_none());
    }

    #[test]
    fn inet_tables() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1234 1 0 100 0 0 10 0\n\
   1: 0100007F:9C40 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 1240 1\n\
   2: 0200000A:1F90 0900000A:D431 01 00000000:00000000 00:00000000 00000000     0        0 0 1\n";
        let (held, queued) = parse_inet(text, true);
        assert_eq!(held.len(), 2);
        assert_eq!(held[0].0, 1234);
        assert!(held[0].1.listening);
        assert_eq!(held[0].1.local, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(held[0].1.remote, None);
        assert_eq!(held[1].1.remote, Some("127.0.0.1:8080".parse().unwrap()));
        assert_eq!(queued.len(), 1);
        assert_eq!(queued[0].remote, Some("10.0.0.9:54321".parse().unwrap()));
        let inet: BTreeMap<u64, InetSocket> = held.into_iter().collect();
        let acc = accepted_external(&inet, &queued);
        assert_eq!(acc.get(&1234).map(String::as_str), Some("10.0.0.9:54321"));
        // IPv6 loopback.
        assert_eq!(
            parse_addr("00000000000000000000000001000000:0016"),
            Some("[::1]:22".parse().unwrap())
        );
    }

    #[test]
    fn unix_table_fdinfo_maps_and_links() {
        let u = parse_unix(
            "Num       RefCount Protocol Flags    Type St Inode Path\n\
0000000000000000: 00000002 00000000 00010000 0001 01 17405 /run/x.sock\n\
0000000000000000: 00000003 00000000 00000000 0001 03 17410\n",
        );
        assert_eq!(u.get(&17405).map(String::as_str), Some("/run/x.sock"));
        assert_eq!(u.get(&17410).map(String::as_str), Some(""));
        assert!(fdinfo_writes("pos:\t0\nflags:\t0100001\nmnt_id:\t20\n"));
        assert!(fdinfo_writes("flags:\t02\n"));
        assert!(!fdinfo_writes("flags:\t0100000\n"));
        let m = parse_maps(
            "7f00-7f10 rw-s 00000000 00:01 32769 /SYSV0000162e (deleted)\n\
7f10-7f20 r-xp 00000000 fd:00 12 /usr/lib/libc.so\n\
7f20-7f30 r--s 00000000 00:19 5 /dev/shm/seg\n",
        );
        assert_eq!(m.len(), 2);
        assert_eq!(m[0], (0, 1, 32769, true, "/SYSV0000162e (deleted)".into()));
        assert!(!m[1].3);
        let s = Sockets {
            unix: u,
            ..Sockets::default()
        };
        assert_eq!(parse_link("pipe:[99]", &s), Some(ResKey::Pipe(PIPEFS, 99)));
        assert_eq!(parse_link("socket:[17405]", &s), Some(ResKey::Unix(17405)));
        assert_eq!(parse_link("socket:[5]", &s), None, "netlink and friends");
        assert_eq!(parse_link("anon_inode:[eventfd]", &s), None);
    }

    /// This process and a child it shares a pipe with, as the scan sees them.
    #[test]
    fn a_scan_of_this_host_finds_a_shared_pipe() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let s = sockets();
        let p = process(child.id(), &s).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(p.ppid, std::process::id());
        assert!(
            p.handles
                .iter()
                .any(|h| h.fd == Some(0) && matches!(h.key, ResKey::Pipe(PIPEFS, _)) && !h.write),
            "{p:?}"
        );
    }
}
