//! `tern-guest`: the in-guest agent. Started by the guest's `/init`; serves the host
//! over the virtio-serial port `org.tern.guest`, else `/dev/ttyS1`.
//!
//! `tern-guest --stdio` serves on stdin/stdout instead (for tests and for trying it
//! on a host; it then refuses `freeze` unless given `--allow-freeze`, so it cannot
//! freeze a host's processes). `--verifier-mib N` starts the memory verifier at once (0: not at all).
//! `tern-guest apply-config [--from FILE] [--root DIR] [--shell]` applies the host's
//! fw_cfg configuration once and exits (both images run it at boot; with `--shell` it
//! also prints the host name, address and gateway as shell assignments for the minimal
//! image's init, which has no systemd-networkd to read the files).
//! `tern-guest child SPEC` runs one `batch` or `service` workload as a process of its
//! own; the agent starts it so (see `workload::process`), not a person.
//! `tern-guest thaw` thaws whatever a freeze of an agent that is gone left frozen (the
//! Debian image's unit runs it when the agent stops; the agent itself does at start).
//! `tern-guest ipc ...` makes a unix socket server or client or a shared memory segment
//! (see `tern_guest::ipc`), for building the dependencies taint tracking follows.

use std::fs::OpenOptions;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use tern_api::guest::WorkloadSpec;
use tern_api::guest::DEFAULT_VERIFIER_PAGES_PER_SEC;
use tern_guest::channel::{find_virtio_port, FALLBACK_UART, PORT_NAME};
use tern_guest::fault::{self, Fault};
use tern_guest::server::{serve, Agent, Ended};
use tern_guest::workload::process;

const USAGE: &str = "usage: tern-guest [--stdio [--allow-freeze]] [--device PATH] [--verifier-mib N]\n       tern-guest apply-config [--from FILE] [--root DIR] [--shell]\n       tern-guest child 'batch --mib N --mbps R' | 'service --port P'\n       tern-guest ipc unix-serve PATH | unix-connect PATH | shm PATH\n       tern-guest thaw";

struct Options {
    stdio: bool,
    allow_freeze: bool,
    device: Option<PathBuf>,
    verifier_mib: u64,
}

fn parse_args() -> Result<Options, String> {
    let mut opts = Options {
        stdio: false,
        allow_freeze: false,
        device: None,
        verifier_mib: 4,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--stdio" => opts.stdio = true,
            "--allow-freeze" => opts.allow_freeze = true,
            "--device" => opts.device = Some(args.next().ok_or("--device needs a path")?.into()),
            "--verifier-mib" => {
                let v = args.next().ok_or("--verifier-mib needs a number")?;
                opts.verifier_mib = v
                    .parse()
                    .map_err(|_| format!("--verifier-mib: {v:?} is not a number"))?;
            }
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    Ok(opts)
}

/// `apply-config`: exit status 0 when applied or when the host gave nothing, 2 for a
/// configuration the guest refuses, 1 when writing failed.
fn apply_config(mut args: impl Iterator<Item = String>) -> ExitCode {
    let mut from = PathBuf::from(tern_guest::config::FW_CFG_RAW);
    let mut root = PathBuf::from("/");
    let mut shell = false;
    while let Some(a) = args.next() {
        if a == "--shell" {
            shell = true;
            continue;
        }
        let value = args.next();
        match (a.as_str(), value) {
            ("--from", Some(v)) => from = v.into(),
            ("--root", Some(v)) => root = v.into(),
            _ => {
                eprintln!("tern-guest: apply-config: bad argument {a:?}\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    match tern_guest::config::apply(&from, &root) {
        Ok(None) => {
            eprintln!("tern-guest: no configuration at {}", from.display());
            ExitCode::SUCCESS
        }
        Ok(Some(cfg)) => {
            eprintln!(
                "tern-guest: applied hostname={} keys={} address={}",
                cfg.hostname.as_deref().unwrap_or("-"),
                cfg.ssh_authorized_keys.len(),
                cfg.address.as_deref().unwrap_or("-")
            );
            if shell {
                print!("{}", tern_guest::config::shell_vars(&cfg));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tern-guest: apply-config: {e}");
            ExitCode::from(if e.starts_with("writing") { 1 } else { 2 })
        }
    }
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1).peekable();
    if args.peek().map(String::as_str) == Some("apply-config") {
        args.next();
        return apply_config(args);
    }
    if args.peek().map(String::as_str) == Some(process::CHILD_COMMAND) {
        args.next();
        let spec: Vec<String> = args.collect();
        return process::child_main(&spec.join(" "));
    }
    if args.peek().map(String::as_str) == Some("thaw") {
        return match tern_guest::taint::freeze::recover() {
            Ok(n) => {
                eprintln!("tern-guest: thawed {n} processes");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("tern-guest: thaw: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if args.peek().map(String::as_str) == Some("ipc") {
        args.next();
        let rest: Vec<String> = args.collect();
        if let Err(e) = tern_guest::ipc::run(&rest) {
            eprintln!("tern-guest: ipc: {e}");
            return ExitCode::from(2);
        }
        return ExitCode::SUCCESS;
    }
    let opts = match parse_args() {
        Ok(o) => o,
        Err(msg) => {
            eprintln!("tern-guest: {msg}");
            return ExitCode::from(2);
        }
    };
    // A freeze left behind by an agent that died is ended before anything else.
    match tern_guest::taint::freeze::recover() {
        Ok(0) => {}
        Ok(n) => eprintln!("tern-guest: thawed {n} processes a previous agent left frozen"),
        Err(e) => eprintln!("tern-guest: checking for a leftover freeze: {e}"),
    }
    let mut agent = Agent::default();
    // On its port the agent is in a guest; on stdin/stdout it may be on a host.
    agent.may_freeze = !opts.stdio || opts.allow_freeze;
    if opts.verifier_mib > 0 {
        let spec = WorkloadSpec::Verifier {
            mib: opts.verifier_mib,
            pages_per_sec: DEFAULT_VERIFIER_PAGES_PER_SEC,
        };
        if let Err(e) = agent.workloads.start(spec) {
            eprintln!("tern-guest: verifier: {e}");
        }
    }
    if opts.stdio {
        let stdin = std::io::stdin();
        let ended = serve(&mut agent, &mut stdin.lock(), &mut std::io::stdout().lock());
        return match ended {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tern-guest: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let device = opts.device.unwrap_or_else(wait_for_channel);
    eprintln!("tern-guest: serving on {}", device.display());
    serve_device(&mut agent, &device)
}

/// The virtio port if it shows up within a few seconds (its module may still be
/// loading), else the UART.
fn wait_for_channel() -> PathBuf {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        if let Some(p) = find_virtio_port(Path::new("/sys"), Path::new("/dev"), PORT_NAME) {
            return p;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    PathBuf::from(FALLBACK_UART)
}

fn serve_device(agent: &mut Agent, device: &Path) -> ExitCode {
    loop {
        let port = match OpenOptions::new().read(true).write(true).open(device) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("tern-guest: cannot open {}: {e}", device.display());
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        let mut input = match port.try_clone() {
            Ok(p) => BufReader::new(p),
            Err(e) => {
                eprintln!("tern-guest: {e}");
                return ExitCode::FAILURE;
            }
        };
        let mut output = port;
        // The port stays open for the agent's life: closing and reopening it on every
        // host disconnect would tell QEMU the guest side went away, and requests sent
        // in that gap could go unanswered.
        loop {
            match serve(agent, &mut input, &mut output) {
                Ok(Ended::Poweroff) => {
                    poweroff();
                    return ExitCode::SUCCESS;
                }
                Ok(Ended::Fault(Fault::Panic)) => {
                    let e = fault::panic_kernel();
                    eprintln!("tern-guest: could not panic the kernel: {e}");
                }
                Ok(Ended::Fault(Fault::Hang)) => {
                    if let Err(e) = fault::hang(fault::cpus()) {
                        eprintln!("tern-guest: could not hang the guest: {e}");
                    }
                }
                // With no host connected the port reads as end-of-file: wait, read again.
                Ok(Ended::Eof) => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => {
                    eprintln!("tern-guest: channel: {e}; reopening");
                    std::thread::sleep(Duration::from_millis(200));
                    break;
                }
            }
        }
    }
}

/// Powers the guest off; QEMU exits with it. Under systemd (the Debian image) an orderly
/// shutdown, so the root filesystem is unmounted clean; in the initramfs image busybox's
/// `poweroff -f`, which asks the kernel directly (there is nothing to unmount).
fn poweroff() {
    let (program, args): (&str, &[&str]) = if Path::new("/run/systemd/system").is_dir() {
        ("systemctl", &["poweroff", "--no-block"])
    } else {
        ("/bin/busybox", &["poweroff", "-f"])
    };
    if let Err(e) = std::process::Command::new(program).args(args).status() {
        eprintln!("tern-guest: {program}: {e}");
    }
}
