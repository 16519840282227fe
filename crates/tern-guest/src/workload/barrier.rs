//! `barrier`: `threads` threads meet at a spin barrier in a loop; the work counted is
//! barriers passed. A thread whose vCPU the host is not running holds every other
//! thread at the barrier, so the rate shows what double scheduling costs.

use std::hint::spin_loop;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use super::Ctl;
use crate::GuestError;

/// A sense-reversing spin barrier: the last thread to arrive resets the count and
/// moves the generation on, which releases the others.
#[derive(Debug)]
pub struct SpinBarrier {
    parties: usize,
    arrived: AtomicUsize,
    generation: AtomicU64,
}

impl SpinBarrier {
    pub fn new(parties: usize) -> SpinBarrier {
        SpinBarrier {
            parties: parties.max(1),
            arrived: AtomicUsize::new(0),
            generation: AtomicU64::new(0),
        }
    }

    /// Waits until all parties arrived or `stopped` says to give up; true when passed.
    pub fn wait(&self, stopped: impl Fn() -> bool) -> bool {
        let gen = self.generation.load(Ordering::Acquire);
        if self.arrived.fetch_add(1, Ordering::AcqRel) + 1 == self.parties {
            self.arrived.store(0, Ordering::Relaxed);
            self.generation.fetch_add(1, Ordering::Release);
            return true;
        }
        let mut spins = 0u32;
        while self.generation.load(Ordering::Acquire) == gen {
            spin_loop();
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(4096) && stopped() {
                return false;
            }
        }
        true
    }
}

/// Starts `threads` threads meeting at one barrier; thread 0 counts the barriers.
pub fn spawn(threads: u32, ctl: Ctl) -> Result<Vec<JoinHandle<()>>, GuestError> {
    let barrier = Arc::new(SpinBarrier::new(threads as usize));
    (0..threads)
        .map(|i| {
            let ctl = ctl.clone();
            let barrier = barrier.clone();
            std::thread::Builder::new()
                .name(format!("barrier-{i}"))
                .spawn(move || {
                    while !ctl.stopped() && barrier.wait(|| ctl.stopped()) {
                        if i == 0 {
                            ctl.stats.add(1);
                        }
                    }
                    // Whoever stops first may leave the others waiting: they see the
                    // flag in their spin.
                })
                .map_err(GuestError::Io)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    #[test]
    fn no_thread_passes_a_barrier_before_all_arrive() {
        let threads = 3;
        let b = Arc::new(SpinBarrier::new(threads));
        let passed = Arc::new(AtomicU64::new(0));
        let hs: Vec<_> = (0..threads)
            .map(|_| {
                let (b, passed) = (b.clone(), passed.clone());
                std::thread::spawn(move || {
                    for round in 0..200u64 {
                        assert!(b.wait(|| false));
                        // Everyone passed `round` barriers before this one.
                        assert!(passed.load(Ordering::SeqCst) >= round * threads as u64);
                        passed.fetch_add(1, Ordering::SeqCst);
                        assert!(b.wait(|| false));
                    }
                })
            })
            .collect();
        hs.into_iter().for_each(|h| h.join().unwrap());
        assert_eq!(passed.load(Ordering::SeqCst), 200 * threads as u64);
    }

    #[test]
    fn counts_barriers_and_stops_even_with_a_party_missing() {
        let ctl = Ctl::default();
        let hs = spawn(2, ctl.clone()).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        ctl.stop.store(true, Ordering::Relaxed);
        hs.into_iter().for_each(|h| h.join().unwrap());
        assert!(ctl.stats.work.load(Ordering::Relaxed) > 0);
        // One thread of two alone never passes, and still sees the stop flag.
        let b = SpinBarrier::new(2);
        assert!(!b.wait(|| true));
    }
}
