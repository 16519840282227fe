//! Unix socket peers from the kernel's sock_diag netlink interface (`unix_diag`): the
//! only place that says which socket a unix socket is connected to, and which
//! connections wait unaccepted in a listener's queue. `/proc/net/unix` has neither.

use std::collections::BTreeMap;
use std::io;

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const UDIAG_SHOW_PEER: u32 = 0x4;
const UDIAG_SHOW_ICONS: u32 = 0x8;
const UNIX_DIAG_PEER: u16 = 2;
const UNIX_DIAG_ICONS: u16 = 3;
/// Every receive waits at most this long: the kernel answers a dump at once.
const RECV_TIMEOUT_MS: i64 = 1000;

/// Peers and pending connections of every unix socket.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Dump {
    pub peers: BTreeMap<u64, u64>,
    /// A connecting socket's inode → the listener whose queue holds its connection (the
    /// listener's end has no inode until it is accepted).
    pub pending: BTreeMap<u64, u64>,
}

/// The request: `nlmsghdr` + `unix_diag_req`, every state, peers and queued connections.
pub fn request() -> Vec<u8> {
    let mut m = Vec::with_capacity(40);
    m.extend_from_slice(&40u32.to_ne_bytes());
    m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes()); // seq
    m.extend_from_slice(&0u32.to_ne_bytes()); // pid
    m.push(libc::AF_UNIX as u8);
    m.push(0); // protocol
    m.extend_from_slice(&0u16.to_ne_bytes());
    m.extend_from_slice(&u32::MAX.to_ne_bytes()); // states
    m.extend_from_slice(&0u32.to_ne_bytes()); // ino
    m.extend_from_slice(&(UDIAG_SHOW_PEER | UDIAG_SHOW_ICONS).to_ne_bytes());
    m.extend_from_slice(&[0xff; 8]); // cookie: none
    m
}

fn u16_at(b: &[u8], o: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(o..o + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(o..o + 4)?.try_into().ok()?))
}

/// Parses one datagram of the answer into `out`; `Ok(true)` at the dump's end.
pub fn parse(buf: &[u8], out: &mut Dump) -> io::Result<bool> {
    let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidData, m.to_string());
    let mut off = 0;
    while off + 16 <= buf.len() {
        let len = u32_at(buf, off).ok_or_else(|| bad("short header"))? as usize;
        let ty = u16_at(buf, off + 4).ok_or_else(|| bad("short header"))?;
        if len < 16 || off + len > buf.len() {
            return Err(bad("a netlink message overruns its datagram"));
        }
        let msg = &buf[off..off + len];
        match ty {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let errno = u32_at(msg, 16).map(|e| -(e as i32)).unwrap_or(0);
                return Err(io::Error::from_raw_os_error(errno));
            }
            SOCK_DIAG_BY_FAMILY => {
                // unix_diag_msg: family, type, state, pad, ino, cookie[2].
                let ino = u64::from(u32_at(msg, 16 + 4).ok_or_else(|| bad("short message"))?);
                let mut a = 16 + 16;
                while a + 4 <= msg.len() {
                    let alen = usize::from(u16_at(msg, a).unwrap_or(0));
                    let aty = u16_at(msg, a + 2).unwrap_or(0);
                    if alen < 4 || a + alen > msg.len() {
                        break;
                    }
                    let data = &msg[a + 4..a + alen];
                    match aty {
                        UNIX_DIAG_PEER => {
                            if let Some(p) = u32_at(data, 0).filter(|p| *p != 0) {
                                out.peers.insert(ino, u64::from(p));
                            }
                        }
                        UNIX_DIAG_ICONS => {
                            for c in data.chunks_exact(4) {
                                let c = u32::from_ne_bytes(c.try_into().expect("4 bytes"));
                                out.pending.insert(u64::from(c), ino);
                            }
                        }
                        _ => {}
                    }
                    a += (alen + 3) & !3;
                }
            }
            _ => {}
        }
        off += (len + 3) & !3;
    }
    Ok(false)
}

/// Asks the kernel (needs `unix_diag`, built in or loaded).
pub fn dump() -> io::Result<Dump> {
    // SAFETY: plain socket call; the fd is closed by OwnedFd.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned here alone.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    use std::os::fd::AsRawFd;
    let tv = libc::timeval {
        tv_sec: RECV_TIMEOUT_MS / 1000,
        tv_usec: (RECV_TIMEOUT_MS % 1000) * 1000,
    };
    // SAFETY: `tv` is a valid timeval for the call.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    let req = request();
    // SAFETY: a zeroed sockaddr_nl addresses the kernel.
    let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    sa.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: `req` and `sa` are valid for the lengths given.
    let rc = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            req.as_ptr().cast(),
            req.len(),
            0,
            (&sa as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Dump::default();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        // SAFETY: `buf` is writable for its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n == 0 || parse(&buf[..n as usize], &mut out)? {
            return Ok(out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::net::UnixStream;

    fn ino(s: &UnixStream) -> u64 {
        let fd = std::os::fd::AsRawFd::as_raw_fd(s);
        std::fs::metadata(format!("/proc/self/fd/{fd}"))
            .unwrap()
            .ino()
    }

    #[test]
    fn a_socket_pair_is_each_others_peer() {
        let (a, b) = UnixStream::pair().unwrap();
        let d = match dump() {
            Ok(d) => d,
            Err(e) => {
                // Without the module (and no root to load it) there is nothing to see.
                eprintln!("SKIP: unix_diag unavailable: {e}");
                assert!(std::env::var_os("CI").is_none(), "CI has unix_diag: {e}");
                return;
            }
        };
        assert_eq!(d.peers.get(&ino(&a)), Some(&ino(&b)));
        assert_eq!(d.peers.get(&ino(&b)), Some(&ino(&a)));
    }

    #[test]
    fn a_queued_connection_points_at_its_listener() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let c = UnixStream::connect(&path).unwrap();
        let Ok(d) = dump() else {
            eprintln!("SKIP: unix_diag unavailable");
            return;
        };
        let lfd = std::os::fd::AsRawFd::as_raw_fd(&l);
        let lino = std::fs::metadata(format!("/proc/self/fd/{lfd}"))
            .unwrap()
            .ino();
        assert_eq!(d.pending.get(&ino(&c)), Some(&lino), "{d:?}");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut d = Dump::default();
        assert!(parse(&[0xff; 40], &mut d).is_err());
        assert!(!parse(&[], &mut d).unwrap());
        let mut done = vec![0u8; 16];
        done[0] = 16;
        done[4] = NLMSG_DONE as u8;
        assert!(parse(&done, &mut d).unwrap());
    }
}
