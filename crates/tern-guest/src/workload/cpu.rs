//! `cpu`: keeps threads busy a given share of each 100 ms period.

use std::hint::black_box;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::Ctl;
use crate::pacing::duty_cycle;
use crate::GuestError;

const PERIOD: Duration = Duration::from_millis(100);

/// Starts `threads` spinning threads; each counts its busy milliseconds as work.
pub fn spawn(percent: f64, threads: u32, ctl: Ctl) -> Result<Vec<JoinHandle<()>>, GuestError> {
    (0..threads)
        .map(|i| {
            let ctl = ctl.clone();
            std::thread::Builder::new()
                .name(format!("cpu-{i}"))
                .spawn(move || run(percent, &ctl))
                .map_err(GuestError::Io)
        })
        .collect()
}

fn run(percent: f64, ctl: &Ctl) {
    let (busy, idle) = duty_cycle(percent, PERIOD);
    let mut x = 1u64;
    while !ctl.stopped() {
        let start = Instant::now();
        while start.elapsed() < busy {
            for _ in 0..1000 {
                x = black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
        }
        ctl.stats.add(busy.as_millis() as u64);
        if !idle.is_zero() && !ctl.sleep(idle) {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn counts_busy_time() {
        let ctl = Ctl::default();
        let hs = spawn(20.0, 1, ctl.clone()).unwrap();
        std::thread::sleep(Duration::from_millis(550));
        ctl.stop.store(true, Ordering::Relaxed);
        hs.into_iter().for_each(|h| h.join().unwrap());
        let ms = ctl.stats.work.load(Ordering::Relaxed);
        // 20 % of 100 ms periods over ~0.55 s: 5 or 6 periods of 20 ms (fewer if a
        // loaded host wakes the thread late; never more).
        assert!((40..=140).contains(&ms), "{ms} ms busy");
    }
}
