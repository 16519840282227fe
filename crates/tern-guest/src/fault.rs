//! Faults a test injects into its own guest to see the host notice: a kernel panic and
//! a hang. Run by the binary only after the request was answered (see
//! [`crate::server::Ended`]), never by the command loop itself, so a test of the loop
//! cannot take its own machine down.

use std::io::Write;

/// A fault the host asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Panic,
    Hang,
}

/// Panics the guest kernel through magic SysRq (`c`); writing the trigger file works
/// whatever `kernel.sysrq` allows. Returns only if the kernel refused.
pub fn panic_kernel() -> std::io::Error {
    let r = std::fs::OpenOptions::new()
        .write(true)
        .open("/proc/sysrq-trigger")
        .and_then(|mut f| f.write_all(b"c"));
    match r {
        Ok(()) => std::io::Error::other("the kernel did not panic"),
        Err(e) => e,
    }
}

/// The CPUs the guest has online.
pub fn cpus() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
}

/// Hangs the guest: turns the kernel's real-time throttling off (it would leave other
/// tasks 5 % of each CPU) and starts one `SCHED_FIFO` busy loop at the highest priority
/// on each CPU. Every ordinary process, this agent's command loop included, never runs
/// again; the kernel still takes interrupts. Returns once the loops run, or why not.
pub fn hang(cpus: u32) -> std::io::Result<()> {
    std::fs::write("/proc/sys/kernel/sched_rt_runtime_us", "-1")?;
    let (tx, rx) = std::sync::mpsc::channel();
    for cpu in 0..cpus {
        let tx = tx.clone();
        std::thread::Builder::new()
            .name(format!("hang-{cpu}"))
            .spawn(move || {
                let r = hog(cpu as usize);
                // Reached only when the thread could not become a real-time hog.
                let _ = tx.send(r);
            })?;
    }
    drop(tx);
    // A hog that starts sends nothing; one that fails says why. The loop starving this
    // thread is the success case, so a short wait is all there is.
    match rx.recv_timeout(std::time::Duration::from_secs(1)) {
        Ok(Err(e)) => Err(e),
        _ => Ok(()),
    }
}

/// Pins the calling thread to `cpu`, makes it `SCHED_FIFO` at the highest priority and
/// spins forever; returns only the error that kept it from doing so.
fn hog(cpu: usize) -> std::io::Result<()> {
    // SAFETY: plain syscalls on the calling thread (pid 0) with a zeroed, then filled,
    // cpu_set_t and sched_param that live on this stack for the calls.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let param = libc::sched_param {
            sched_priority: libc::sched_get_priority_max(libc::SCHED_FIFO),
        };
        if libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    loop {
        std::hint::spin_loop();
    }
}
