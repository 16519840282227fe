//! `tern-guest ipc`: local IPC endpoints that a busybox-only guest cannot make, so a
//! person or a test can build the dependencies taint tracking follows: a unix socket
//! server, a client of it, and a shared memory segment.
//!
//! - `ipc unix-serve PATH`: listens on PATH, accepts every connection and reads each
//!   until it ends.
//! - `ipc unix-connect PATH`: connects (waiting up to 10 s for PATH to appear), copies
//!   stdin to the socket and keeps the connection open after stdin ends.
//! - `ipc shm PATH`: maps PATH (created, one page) shared and writable, closes the fd,
//!   and increments a counter in it ten times a second.
//!
//! Each runs until killed.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

const USAGE: &str = "usage: tern-guest ipc unix-serve PATH | unix-connect PATH | shm PATH";

/// Runs `ipc ARGS`; returns only on a bad command line or a failure.
pub fn run(args: &[String]) -> Result<(), String> {
    let (Some(what), Some(path), None) = (args.first(), args.get(1), args.get(2)) else {
        return Err(USAGE.into());
    };
    match what.as_str() {
        "unix-serve" => serve(path),
        "unix-connect" => connect(path),
        "shm" => shm(path),
        other => Err(format!("unknown ipc {other:?}\n{USAGE}")),
    }
}

fn serve(path: &str) -> Result<(), String> {
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path).map_err(|e| format!("bind {path}: {e}"))?;
    for conn in l.incoming() {
        let mut c = conn.map_err(|e| format!("accept on {path}: {e}"))?;
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while matches!(c.read(&mut buf), Ok(n) if n > 0) {}
        });
    }
    Ok(())
}

fn connect(path: &str) -> Result<(), String> {
    let t0 = Instant::now();
    let mut s = loop {
        match UnixStream::connect(path) {
            Ok(s) => break s,
            Err(e) if t0.elapsed() > Duration::from_secs(10) => {
                return Err(format!("connect {path}: {e}"))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    let mut buf = [0u8; 4096];
    let mut stdin = std::io::stdin();
    while let Ok(n) = stdin.read(&mut buf) {
        if n == 0 || s.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    hold()
}

fn shm(path: &str) -> Result<(), String> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| format!("open {path}: {e}"))?;
    f.set_len(crate::PAGE_SIZE as u64)
        .map_err(|e| format!("size {path}: {e}"))?;
    // SAFETY: a fresh shared mapping of one page of an open file; the pointer is used
    // only within that page, and the mapping lives until the process ends.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            crate::PAGE_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            std::os::fd::AsRawFd::as_raw_fd(&f),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(format!("mmap {path}: {}", std::io::Error::last_os_error()));
    }
    // Only the mapping links the process to the segment from here on.
    drop(f);
    let counter = p.cast::<u64>();
    loop {
        // SAFETY: `counter` points into the live page mapped above.
        unsafe { counter.write_volatile(counter.read_volatile().wrapping_add(1)) };
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn hold() -> ! {
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_command_lines_say_how() {
        assert!(run(&[]).unwrap_err().contains("usage"));
        assert!(run(&["pipe".into(), "/x".into()])
            .unwrap_err()
            .contains("unknown ipc"));
        assert!(run(&["shm".into(), "/x".into(), "y".into()])
            .unwrap_err()
            .contains("usage"));
    }
}
