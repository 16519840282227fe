//! What the migration tests share: a thread that plays a guest rewriting its memory.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use tern_agent::migration::wire::PAGE_SIZE;

/// Rewrites random pages among the first `hot` pages of the file at `path`, through a
/// shared mapping as a guest would, at about `pages_per_s` scaled down by the throttle
/// percent in `throttle`, until `stop`. Returns the number of page writes.
pub fn writer(
    path: std::path::PathBuf,
    hot: u64,
    pages_per_s: u64,
    throttle: Arc<AtomicU8>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        // SAFETY: the test owns the file; the engine only reads it.
        let mut map = unsafe { memmap2::MmapMut::map_mut(&file) }.unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let tick = Duration::from_millis(2);
        let mut writes = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let keep = 100 - u64::from(throttle.load(Ordering::Relaxed));
            let n = pages_per_s * keep / 100 * tick.as_micros() as u64 / 1_000_000;
            for _ in 0..n.max(1) {
                let page = rng.gen_range(0..hot) as usize;
                rng.fill(&mut map[page * PAGE_SIZE..page * PAGE_SIZE + 32]);
                writes += 1;
            }
            std::thread::sleep(tick);
        }
        writes
    })
}
