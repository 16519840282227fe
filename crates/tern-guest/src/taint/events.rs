//! The guest kernel's process and syscall events that create dependencies, decoded
//! from raw tracepoint records (pure), and the tracepoints to open for them.
//!
//! | tracepoint | event |
//! |---|---|
//! | `sched:sched_process_fork` / `sched_process_exit` | a process appears / goes |
//! | `sched:sched_process_exec` | a process's fds and name change (it is read again) |
//! | `syscalls:sys_exit_{accept,accept4,open,openat,dup,dup2,dup3}` (`ret >= 0`) | a new fd, `ret` |
//! | `syscalls:sys_enter_connect` + `sys_exit_connect` | fd `fd` is connected |
//! | `syscalls:sys_exit_{pipe,pipe2,socketpair}` | new fds (the process's fd table is re-read) |
//! | `syscalls:sys_exit_shmat`, `sys_enter_mmap` (`MAP_SHARED`) | a new shared mapping |
//! | `sock:inet_sock_set_state` (to `ESTABLISHED`) | a TCP connection, perhaps into a frozen listener's queue |
//!
//! Kernel filters keep failed calls and private mappings out of the rings; a kernel
//! that refuses a filter gets the tracepoint unfiltered (slower, same result).

use std::path::Path;

use tern_trace::format::Format;
use tern_trace::raw::Point;
use tern_trace::tracefs;
use tern_trace::TraceError;

/// What a record says happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// `parent` and `child` are thread ids (a new thread is not a new process).
    Fork {
        parent: u32,
        child: u32,
    },
    Exit {
        tid: u32,
    },
    /// Thread `tid` got fd `fd`.
    NewFd {
        tid: u32,
        fd: i32,
    },
    /// Thread `tid` got new fds the record does not name.
    FdTable {
        tid: u32,
    },
    /// Thread `tid` calls `connect` on fd `fd` (the exit says whether it worked).
    Connecting {
        tid: u32,
        fd: i32,
    },
    /// Thread `tid`'s `connect` worked (or is under way, non-blocking).
    Connected {
        tid: u32,
    },
    /// Thread `tid`'s process ran a new program: close-on-exec fds are gone, shared
    /// mappings too, the name changed.
    Exec {
        tid: u32,
    },
    /// Thread `tid` mapped shared memory.
    Maps {
        tid: u32,
    },
    /// A TCP connection was established somewhere.
    Established,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Fork,
    Exit,
    NewFd,
    FdTable,
    ConnectEnter,
    ConnectExit,
    Exec,
    Maps,
    Established,
}

/// The tracepoints the tracker reads: `(system, name, role, filter, required)`.
const POINTS: &[(&str, &str, Role, Option<&str>, bool)] = &[
    ("sched", "sched_process_fork", Role::Fork, None, true),
    ("sched", "sched_process_exit", Role::Exit, None, true),
    // exec closes close-on-exec fds and renames the process.
    ("sched", "sched_process_exec", Role::Exec, None, false),
    (
        "syscalls",
        "sys_exit_accept4",
        Role::NewFd,
        Some("ret >= 0"),
        true,
    ),
    (
        "syscalls",
        "sys_exit_accept",
        Role::NewFd,
        Some("ret >= 0"),
        false,
    ),
    (
        "syscalls",
        "sys_exit_openat",
        Role::NewFd,
        Some("ret >= 0"),
        true,
    ),
    (
        "syscalls",
        "sys_exit_open",
        Role::NewFd,
        Some("ret >= 0"),
        false,
    ),
    (
        "syscalls",
        "sys_exit_dup",
        Role::NewFd,
        Some("ret >= 0"),
        false,
    ),
    (
        "syscalls",
        "sys_exit_dup2",
        Role::NewFd,
        Some("ret >= 0"),
        false,
    ),
    (
        "syscalls",
        "sys_exit_dup3",
        Role::NewFd,
        Some("ret >= 0"),
        false,
    ),
    (
        "syscalls",
        "sys_enter_connect",
        Role::ConnectEnter,
        None,
        true,
    ),
    // A non-blocking connect answers EINPROGRESS (-115) with the peer already set.
    (
        "syscalls",
        "sys_exit_connect",
        Role::ConnectExit,
        Some("ret == 0 || ret == -115"),
        true,
    ),
    (
        "syscalls",
        "sys_exit_pipe",
        Role::FdTable,
        Some("ret == 0"),
        false,
    ),
    (
        "syscalls",
        "sys_exit_pipe2",
        Role::FdTable,
        Some("ret == 0"),
        true,
    ),
    (
        "syscalls",
        "sys_exit_socketpair",
        Role::FdTable,
        Some("ret == 0"),
        true,
    ),
    (
        "syscalls",
        "sys_exit_shmat",
        Role::Maps,
        Some("ret >= 0"),
        false,
    ),
    (
        "syscalls",
        "sys_enter_mmap",
        Role::Maps,
        Some("flags & 1"),
        true,
    ),
    (
        "sock",
        "inet_sock_set_state",
        Role::Established,
        Some("newstate == 1"),
        false,
    ),
];

/// The decoder for the tracepoints opened.
#[derive(Debug, Clone)]
pub struct Decoder {
    points: Vec<(Format, Role)>,
}

impl Decoder {
    /// Reads the formats from tracefs; a required tracepoint the kernel lacks is an
    /// error (it needs `CONFIG_FTRACE_SYSCALLS`).
    pub fn load(root: &Path) -> Result<(Decoder, Vec<Point>), TraceError> {
        let mut points = Vec::new();
        let mut open = Vec::new();
        for (system, name, role, filter, required) in POINTS {
            match tracefs::read_format(root, system, name)? {
                Some(f) => {
                    open.push(Point {
                        format: f.clone(),
                        filter: filter.map(str::to_string),
                    });
                    points.push((f, *role));
                }
                None if *required => {
                    return Err(TraceError::MissingTracepoint(format!("{system}:{name}")))
                }
                None => {}
            }
        }
        let d = Decoder { points };
        d.check()?;
        Ok((d, open))
    }

    /// Every field [`Decoder::decode`] reads exists.
    fn check(&self) -> Result<(), TraceError> {
        for (f, role) in &self.points {
            f.field("common_type")?;
            f.field("common_pid")?;
            match role {
                Role::Fork => {
                    f.field("parent_pid")?;
                    f.field("child_pid")?;
                }
                Role::Exit => {
                    f.field("pid")?;
                }
                Role::NewFd | Role::ConnectExit => {
                    f.field("ret")?;
                }
                Role::ConnectEnter => {
                    f.field("fd")?;
                }
                Role::FdTable | Role::Exec | Role::Maps | Role::Established => {}
            }
        }
        Ok(())
    }

    /// Decodes one record; `None` for another tracepoint's, a failed call's (when the
    /// kernel filter was refused) or a record too short.
    pub fn decode(&self, raw: &[u8]) -> Option<Event> {
        let ty = u64::from(u16::from_ne_bytes(raw.get(0..2)?.try_into().ok()?));
        let (f, role) = self.points.iter().find(|(f, _)| f.id == ty)?;
        let tid = f.int(raw, "common_pid").ok()? as u32;
        let ret = || f.int(raw, "ret").ok();
        Some(match role {
            Role::Fork => Event::Fork {
                parent: f.int(raw, "parent_pid").ok()? as u32,
                child: f.int(raw, "child_pid").ok()? as u32,
            },
            Role::Exit => Event::Exit {
                tid: f.int(raw, "pid").ok()? as u32,
            },
            Role::NewFd => {
                let fd = ret()?;
                if fd < 0 {
                    return None;
                }
                Event::NewFd { tid, fd: fd as i32 }
            }
            Role::FdTable => {
                if ret().is_some_and(|r| r != 0) {
                    return None;
                }
                Event::FdTable { tid }
            }
            Role::ConnectEnter => Event::Connecting {
                tid,
                fd: f.int(raw, "fd").ok()? as i32,
            },
            Role::ConnectExit => {
                if ret().is_some_and(|r| r != 0 && r != -115) {
                    return None;
                }
                Event::Connected { tid }
            }
            Role::Exec => Event::Exec { tid },
            Role::Maps => {
                if f.field("flags").is_ok() && f.int(raw, "flags").ok()? & 1 == 0 {
                    return None;
                }
                if ret().is_some_and(|r| r < 0 && r > -4096) {
                    return None;
                }
                Event::Maps { tid }
            }
            Role::Established => {
                if f.field("newstate").is_ok() && f.int(raw, "newstate").ok()? != 1 {
                    return None;
                }
                Event::Established
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_trace::format::parse;

    const FORK: &str = "name: sched_process_fork\nID: 300\nformat:\n\
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;\n\
\tfield:char parent_comm[16];\toffset:8;\tsize:16;\tsigned:0;\n\
\tfield:pid_t parent_pid;\toffset:24;\tsize:4;\tsigned:1;\n\
\tfield:char child_comm[16];\toffset:28;\tsize:16;\tsigned:0;\n\
\tfield:pid_t child_pid;\toffset:44;\tsize:4;\tsigned:1;\n";
    const OPENAT: &str = "name: sys_exit_openat\nID: 600\nformat:\n\
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;\n\
\tfield:int __syscall_nr;\toffset:8;\tsize:4;\tsigned:1;\n\
\tfield:long ret;\toffset:16;\tsize:8;\tsigned:1;\n";
    const MMAP: &str = "name: sys_enter_mmap\nID: 700\nformat:\n\
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;\n\
\tfield:int __syscall_nr;\toffset:8;\tsize:4;\tsigned:1;\n\
\tfield:unsigned long addr;\toffset:16;\tsize:8;\tsigned:0;\n\
\tfield:unsigned long flags;\toffset:24;\tsize:8;\tsigned:0;\n";

    fn decoder() -> Decoder {
        let d = Decoder {
            points: vec![
                (parse("fork", FORK).unwrap(), Role::Fork),
                (parse("openat", OPENAT).unwrap(), Role::NewFd),
                (parse("mmap", MMAP).unwrap(), Role::Maps),
            ],
        };
        d.check().unwrap();
        d
    }

    fn rec(ty: u16, pid: i32, fields: &[(usize, &[u8])]) -> Vec<u8> {
        let mut r = vec![0u8; 48];
        r[0..2].copy_from_slice(&ty.to_ne_bytes());
        r[4..8].copy_from_slice(&pid.to_ne_bytes());
        for (off, b) in fields {
            r[*off..*off + b.len()].copy_from_slice(b);
        }
        r
    }

    #[test]
    fn decodes_forks_fds_and_shared_maps() {
        let d = decoder();
        let fork = rec(
            300,
            5,
            &[(24, &5i32.to_ne_bytes()), (44, &77i32.to_ne_bytes())],
        );
        assert_eq!(
            d.decode(&fork),
            Some(Event::Fork {
                parent: 5,
                child: 77
            })
        );
        let open = rec(600, 9, &[(16, &4i64.to_ne_bytes())]);
        assert_eq!(d.decode(&open), Some(Event::NewFd { tid: 9, fd: 4 }));
        let failed = rec(600, 9, &[(16, &(-2i64).to_ne_bytes())]);
        assert_eq!(d.decode(&failed), None, "a failed open is no fd");
        let shared = rec(700, 3, &[(24, &0x21u64.to_ne_bytes())]);
        assert_eq!(d.decode(&shared), Some(Event::Maps { tid: 3 }));
        let private = rec(700, 3, &[(24, &0x22u64.to_ne_bytes())]);
        assert_eq!(d.decode(&private), None);
        assert_eq!(d.decode(&rec(999, 1, &[])), None, "another tracepoint");
        assert_eq!(d.decode(&[1]), None, "too short");
    }

    #[test]
    fn a_missing_field_fails_at_load_not_at_the_first_record() {
        let mut f = parse("openat", OPENAT).unwrap();
        f.fields.retain(|x| x.name != "ret");
        let d = Decoder {
            points: vec![(f, Role::NewFd)],
        };
        assert!(d.check().unwrap_err().to_string().contains("ret"));
    }
}
