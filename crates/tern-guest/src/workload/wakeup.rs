//! `wakeup`: `threads` threads in a ring pass one token around. Each sleeps until the
//! token reaches it, hands it to the next thread and sleeps again, so every handoff
//! wakes a sleeping thread: the work is the scheduler's wakeup and switch paths, not
//! computation. Thread `i` is bound to the `i`-th (mod n) CPU the agent may run on, so
//! with several vCPUs every handoff crosses vCPUs: an interrupt to a vCPU that is
//! usually halted, whose thread the host's scheduler then wakes too. A scheduler
//! tracer therefore sees many events at both levels. The work counted is handoffs.

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::Ctl;
use crate::GuestError;

/// How long a waiting thread sleeps before it looks at its stop flag again.
const STOP_CHECK: Duration = Duration::from_millis(50);

/// The thread that thread `i` of `n` hands the token to (pure).
pub fn next(i: usize, n: usize) -> usize {
    (i + 1) % n.max(1)
}

/// The CPU thread `i` is bound to, of the CPUs `allowed` (pure): round robin, so
/// neighbours in the ring sit on different CPUs whenever there are two or more.
pub fn cpu_for(i: usize, allowed: &[usize]) -> Option<usize> {
    (!allowed.is_empty()).then(|| allowed[i % allowed.len()])
}

/// One slot per thread; the token (its sequence number) is in at most one of them.
#[derive(Debug)]
pub struct Ring {
    slots: Vec<Slot>,
}

#[derive(Debug, Default)]
struct Slot {
    token: Mutex<Option<u64>>,
    wake: Condvar,
}

impl Ring {
    pub fn new(threads: usize) -> Ring {
        Ring {
            slots: (0..threads.max(1)).map(|_| Slot::default()).collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Puts token `t` in thread `i`'s slot and wakes that thread.
    pub fn give(&self, i: usize, t: u64) {
        let s = &self.slots[i];
        *s.token.lock().unwrap_or_else(|p| p.into_inner()) = Some(t);
        s.wake.notify_one();
    }

    /// Takes the token from thread `i`'s slot, waiting at most `timeout` for it.
    pub fn take(&self, i: usize, timeout: Duration) -> Option<u64> {
        let s = &self.slots[i];
        let held = s.token.lock().unwrap_or_else(|p| p.into_inner());
        let (mut held, _) = s
            .wake
            .wait_timeout_while(held, timeout, |t| t.is_none())
            .unwrap_or_else(|p| p.into_inner());
        held.take()
    }
}

/// The CPUs this process may run on.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set for the kernel to fill; CPU_ISSET
    // reads inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

/// Binds the calling thread to `cpu`. Best effort: a thread left unbound still hands
/// the token on, its handoffs just do not all cross CPUs.
fn bind(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is an empty set; `cpu` came from the kernel's own set,
    // so CPU_SET stays inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set);
    }
}

/// Starts `threads` threads in a ring, thread 0 holding the token; each counts its
/// handoffs.
pub fn spawn(threads: u32, ctl: Ctl) -> Result<Vec<JoinHandle<()>>, GuestError> {
    let n = threads.max(2) as usize;
    let ring = Arc::new(Ring::new(n));
    let allowed = allowed_cpus();
    ring.give(0, 0);
    (0..n)
        .map(|i| {
            let (ctl, ring) = (ctl.clone(), ring.clone());
            let cpu = cpu_for(i, &allowed);
            std::thread::Builder::new()
                .name(format!("wakeup-{i}"))
                .spawn(move || {
                    if let Some(cpu) = cpu {
                        bind(cpu);
                    }
                    while !ctl.stopped() {
                        let Some(t) = ring.take(i, STOP_CHECK) else {
                            continue;
                        };
                        // Token t belongs to thread t mod n: anything else is a lost
                        // or doubled wakeup, and the count would be meaningless.
                        if t % n as u64 != i as u64 {
                            ctl.stats
                                .fail(format!("thread {i} got token {t} of a ring of {n}"));
                            return;
                        }
                        ctl.stats.add(1);
                        ring.give(next(i, n), t + 1);
                    }
                })
                .map_err(GuestError::Io)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;
    use std::time::Instant;

    #[test]
    fn the_ring_closes_and_neighbours_sit_on_different_cpus() {
        assert_eq!((0..4).map(|i| next(i, 4)).collect::<Vec<_>>(), [1, 2, 3, 0]);
        assert_eq!(next(0, 0), 0);
        let cpus = [2, 5];
        for i in 0..4 {
            assert_ne!(cpu_for(i, &cpus), cpu_for(next(i, 4), &cpus));
        }
        assert_eq!(cpu_for(3, &cpus), Some(5));
        assert_eq!(cpu_for(3, &[]), None);
    }

    #[test]
    fn take_waits_for_the_token_and_times_out_without_it() {
        let ring = Arc::new(Ring::new(2));
        let t0 = Instant::now();
        assert_eq!(ring.take(1, Duration::from_millis(30)), None);
        assert!(t0.elapsed() >= Duration::from_millis(30));
        let giver = {
            let ring = ring.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                ring.give(1, 7);
            })
        };
        assert_eq!(ring.take(1, Duration::from_secs(5)), Some(7));
        giver.join().unwrap();
        // Taken means gone.
        assert_eq!(ring.take(1, Duration::ZERO), None);
    }

    #[test]
    fn counts_handoffs_in_ring_order_and_stops() {
        let ctl = Ctl::default();
        let hs = spawn(5, ctl.clone()).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        ctl.stop.store(true, Ordering::Relaxed);
        let t0 = Instant::now();
        hs.into_iter().for_each(|h| h.join().unwrap());
        assert!(t0.elapsed() < Duration::from_secs(2));
        let err = ctl.stats.error.lock().unwrap().clone();
        assert_eq!(err, None, "a thread saw a token out of order");
        assert!(ctl.stats.work.load(Ordering::Relaxed) > 10);
    }
}
