//! The verifier: a memory region whose whole content follows from one counter, so the
//! host can tell after a migration whether memory arrived intact.
//!
//! The region has `P` pages. Write number `c` (1, 2, ...) fills page `(c - 1) mod P`
//! with a pseudo-random stream seeded by `(c, page)`; before the first write every
//! page holds generation 0. From the counter alone the expected content of every page
//! follows ([`last_writer`]), so `expected` is computed without reading the region and
//! `checksum` by reading it; they are equal exactly when no write was lost or garbled.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use super::Ctl;
use crate::pacing::Pacer;
use crate::{GuestError, PAGE_SIZE, PAGE_WORDS};
use tern_api::guest::VerifyReport;

/// The region and its counter, behind one lock so a report sees a consistent pair.
pub struct Shared {
    region: Mutex<Region>,
}

struct Region {
    words: Vec<u64>,
    counter: u64,
    mib: u64,
}

impl Shared {
    pub fn new(mib: u64) -> Result<Shared, GuestError> {
        let pages = (mib * (1 << 20) / PAGE_SIZE as u64) as usize;
        let mut words = Vec::new();
        words.try_reserve_exact(pages * PAGE_WORDS).map_err(|_| {
            GuestError::BadRequest(format!("verifier: cannot allocate {mib} MiB in this guest"))
        })?;
        words.resize(pages * PAGE_WORDS, 0);
        for (p, page) in words.chunks_exact_mut(PAGE_WORDS).enumerate() {
            page_content(0, p as u64, page);
        }
        Ok(Shared {
            region: Mutex::new(Region {
                words,
                counter: 0,
                mib,
            }),
        })
    }

    /// Does the next `n` writes.
    pub fn step(&self, n: u64) {
        let Ok(mut r) = self.region.lock() else {
            return;
        };
        let pages = (r.words.len() / PAGE_WORDS) as u64;
        for _ in 0..n {
            r.counter += 1;
            let c = r.counter;
            let p = ((c - 1) % pages) as usize;
            page_content(
                c,
                p as u64,
                &mut r.words[p * PAGE_WORDS..(p + 1) * PAGE_WORDS],
            );
        }
    }

    /// Counter, checksum of memory as it is, checksum of what it should be.
    pub fn report(&self) -> VerifyReport {
        let r = match self.region.lock() {
            Ok(r) => r,
            Err(poisoned) => poisoned.into_inner(),
        };
        let pages = (r.words.len() / PAGE_WORDS) as u64;
        let mut want = vec![0u64; PAGE_WORDS];
        let (mut checksum, mut expected, mut bad_pages) = (0u64, 0u64, 0u64);
        for (p, page) in r.words.chunks_exact(PAGE_WORDS).enumerate() {
            page_content(last_writer(r.counter, p as u64, pages), p as u64, &mut want);
            let (have, should) = (page_digest(page), page_digest(&want));
            checksum = combine(checksum, have);
            expected = combine(expected, should);
            bad_pages += u64::from(have != should);
        }
        VerifyReport {
            counter: r.counter,
            checksum,
            expected,
            ok: checksum == expected,
            mib: r.mib,
            bad_pages,
        }
    }

    #[cfg(test)]
    fn corrupt(&self, word: usize) {
        self.region.lock().unwrap().words[word] ^= 1;
    }
}

/// Starts the paced writer.
pub fn spawn(
    shared: Arc<Shared>,
    pages_per_sec: f64,
    ctl: Ctl,
) -> Result<JoinHandle<()>, GuestError> {
    std::thread::Builder::new()
        .name("verifier".into())
        .spawn(move || {
            let mut pacer = Pacer::with_slices(pages_per_sec);
            let start = Instant::now();
            ctl.stats.mark_paced(start);
            while !ctl.stopped() {
                let due = pacer.due(start.elapsed());
                if due == 0 {
                    ctl.sleep(pacer.wait(start.elapsed()));
                    continue;
                }
                shared.step(due);
                pacer.done(due);
                ctl.stats.add(due);
            }
        })
        .map_err(GuestError::Io)
}

/// The write that last filled `page` once `counter` writes are done (0: none yet).
pub fn last_writer(counter: u64, page: u64, pages: u64) -> u64 {
    // Writes to `page` are c = page + 1, page + 1 + pages, ...
    if counter < page + 1 {
        0
    } else {
        counter - (counter - (page + 1)) % pages
    }
}

/// The content write `c` puts into `page`: a splitmix64 stream seeded by both.
pub fn page_content(c: u64, page: u64, out: &mut [u64]) {
    let mut s = c.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ page.wrapping_mul(0xD1B5_4A32_D192_ED03);
    for w in out.iter_mut() {
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        *w = z ^ (z >> 31);
    }
}

/// A 64-bit digest of one page (FNV-1a over words, then a final mix).
pub fn page_digest(words: &[u64]) -> u64 {
    let mut h = 0xCBF2_9CE4_8422_2325u64;
    for &w in words {
        h = (h ^ w).wrapping_mul(0x0000_0100_0000_01B3);
    }
    h ^ (h >> 29)
}

fn combine(acc: u64, page: u64) -> u64 {
    acc.rotate_left(5) ^ page
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn counter_advances_and_checksum_matches() {
        let s = Shared::new(1).unwrap();
        let a = s.report();
        assert!(a.ok && a.counter == 0);
        s.step(300);
        let b = s.report();
        assert_eq!(b.counter, 300);
        assert!(b.ok, "{b:?}");
        assert_ne!(a.checksum, b.checksum);
        // Wrap around the 256-page region more than once.
        s.step(600);
        assert!(s.report().ok);
    }

    #[test]
    fn a_flipped_bit_is_caught() {
        let s = Shared::new(1).unwrap();
        s.step(10);
        s.corrupt(12_345);
        let r = s.report();
        assert!(!r.ok);
        assert_eq!(r.bad_pages, 1);
    }

    proptest! {
        /// last_writer agrees with replaying the writes one by one.
        #[test]
        fn last_writer_matches_replay(pages in 1u64..40, counter in 0u64..200) {
            let mut last = vec![0u64; pages as usize];
            for c in 1..=counter {
                last[((c - 1) % pages) as usize] = c;
            }
            for p in 0..pages {
                prop_assert_eq!(last_writer(counter, p, pages), last[p as usize]);
            }
        }
    }
}
