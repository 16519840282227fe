//! `memdirty`: rewrites a working set at a steady rate with changing, non-zero data.
//!
//! Every page write stores words that mix the page number with a generation that grows
//! on each pass over the working set, so each rewrite really changes the page's content
//! (a migration engine that compares content sees it), and no page is ever all zeros
//! (zero pages travel as flags and would not load the link).

use std::thread::JoinHandle;
use std::time::Instant;

use super::Ctl;
use crate::pacing::{pages_per_sec, Pacer};
use crate::{GuestError, PAGE_SIZE, PAGE_WORDS};

/// Starts the writer thread; the working set is allocated and touched on that thread.
pub fn spawn(mib: u64, mbps: f64, ctl: Ctl) -> Result<JoinHandle<()>, GuestError> {
    std::thread::Builder::new()
        .name("memdirty".into())
        .spawn(move || {
            if let Err(e) = run(mib, mbps, &ctl) {
                ctl.stats.fail(e.to_string());
            }
        })
        .map_err(GuestError::Io)
}

fn run(mib: u64, mbps: f64, ctl: &Ctl) -> Result<(), GuestError> {
    rewrite(mib, mbps, false, ctl)
}

/// The writer: fills `mib` MiB, then rewrites it in order at `mbps`. With `check`
/// (the `batch` job), every page is first checked to hold what the previous pass wrote
/// (three words: enough to tell one pass's key from another's, cheap enough not to
/// set the pace); checked pages are counted in `stats.checked`, and the first page
/// holding anything else ends the job with an error naming it.
pub fn rewrite(mib: u64, mbps: f64, check: bool, ctl: &Ctl) -> Result<(), GuestError> {
    let pages = usize::try_from(mib * (1 << 20) / PAGE_SIZE as u64)
        .map_err(|_| GuestError::BadRequest(format!("memdirty: {mib} MiB is too large")))?;
    let mut mem: Vec<u64> = Vec::new();
    mem.try_reserve_exact(pages * PAGE_WORDS).map_err(|_| {
        GuestError::BadRequest(format!("memdirty: cannot allocate {mib} MiB in this guest"))
    })?;
    mem.resize(pages * PAGE_WORDS, 0);
    let noise = noise();
    // Generation 0 fills the whole set once, so every page is resident and non-zero
    // before the paced phase starts.
    for (p, page) in mem.chunks_exact_mut(PAGE_WORDS).enumerate() {
        fill_page(page, 0, p as u64, &noise);
        if p % 256 == 0 && ctl.stopped() {
            return Ok(());
        }
    }
    let mut pacer = Pacer::with_slices(pages_per_sec(mbps));
    let start = Instant::now();
    ctl.stats.mark_paced(start);
    let (mut next, mut generation) = (0usize, 1u64);
    while !ctl.stopped() {
        let due = pacer.due(start.elapsed());
        if due == 0 {
            ctl.sleep(pacer.wait(start.elapsed()));
            continue;
        }
        for _ in 0..due {
            let page = &mem[next * PAGE_WORDS..(next + 1) * PAGE_WORDS];
            if check && !holds(page, generation - 1, next as u64, &noise) {
                return Err(GuestError::BadRequest(format!(
                    "batch: page {next} does not hold what pass {} wrote",
                    generation - 1
                )));
            }
            fill_page(
                &mut mem[next * PAGE_WORDS..(next + 1) * PAGE_WORDS],
                generation,
                next as u64,
                &noise,
            );
            next += 1;
            if next == pages {
                next = 0;
                generation += 1;
            }
        }
        pacer.done(due);
        ctl.stats.add(due);
        if check {
            ctl.stats
                .checked
                .fetch_add(due, std::sync::atomic::Ordering::Relaxed);
        }
    }
    Ok(())
}

/// 4 KiB of pseudo-random words with the top bit set, the same for every page.
pub fn noise() -> Vec<u64> {
    let mut s = 0x7E27_6E55_u64;
    (0..PAGE_WORDS)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            (z ^ (z >> 31)) | (1 << 63)
        })
        .collect()
}

/// Content of `page` at `generation`: the noise block xored with a word unique to
/// (generation, page). It differs from every other generation and page, it does not
/// compress (so a migration that compresses gains nothing over one that does not),
/// no word is ever zero (noise has the top bit set, the key never), and it costs one
/// load, xor and store per word, so the writer, not the arithmetic, sets the pace
/// even under TCG.
pub fn fill_page(words: &mut [u64], generation: u64, page: u64, noise: &[u64]) {
    let key = page_key(generation, page);
    for (w, n) in words.iter_mut().zip(noise) {
        *w = n ^ key;
    }
}

/// Whether `words` still hold page `page` of `generation`, judged by its first, middle
/// and last word.
pub fn holds(words: &[u64], generation: u64, page: u64, noise: &[u64]) -> bool {
    let key = page_key(generation, page);
    [0, PAGE_WORDS / 2, PAGE_WORDS - 1]
        .iter()
        .all(|&i| words[i] == noise[i] ^ key)
}

const KEY_FACTOR: u64 = 0x9E37_79B9_7F4A_7C15;

fn page_key(generation: u64, page: u64) -> u64 {
    ((generation << 32) ^ page).wrapping_mul(KEY_FACTOR) >> 1
}

/// Which page of which pass `words` (a page's first two words at least) hold, if they
/// are a `memdirty` page with a page index below `pages`: how the host finds where the
/// guest put the working set in its memory.
pub fn identify(words: &[u64], noise: &[u64], pages: u64) -> Option<(u64, u64)> {
    let key = words.first()? ^ noise.first()?;
    if key >> 63 != 0 || key != words.get(1)? ^ noise.get(1)? {
        return None;
    }
    // The key is an odd multiple shifted right once: undo the shift both ways the lost
    // bit could have been, then the multiplication (an odd factor is invertible
    // modulo 2^64; Newton's iteration doubles the correct bits each step).
    let mut inverse = KEY_FACTOR;
    for _ in 0..6 {
        inverse = inverse.wrapping_mul(2u64.wrapping_sub(KEY_FACTOR.wrapping_mul(inverse)));
    }
    (0..2u64).find_map(|low| {
        let x = ((key << 1) | low).wrapping_mul(inverse);
        let (generation, page) = (x >> 32, x & 0xFFFF_FFFF);
        (page < pages && generation < 1 << 24).then_some((generation, page))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_change_each_generation_and_are_never_zero() {
        let n = noise();
        let mut a = vec![0u64; PAGE_WORDS];
        let mut b = vec![0u64; PAGE_WORDS];
        fill_page(&mut a, 1, 7, &n);
        fill_page(&mut b, 2, 7, &n);
        assert_ne!(a, b);
        assert!(a.iter().all(|&w| w != 0));
        fill_page(&mut b, 1, 8, &n);
        assert_ne!(a, b, "neighbouring pages differ too");
    }

    #[test]
    fn a_page_holds_its_own_pass_only() {
        let n = noise();
        let mut a = vec![0u64; PAGE_WORDS];
        fill_page(&mut a, 4, 9, &n);
        assert!(holds(&a, 4, 9, &n));
        assert!(!holds(&a, 3, 9, &n), "an older pass");
        assert!(!holds(&a, 4, 10, &n), "another page");
        a[PAGE_WORDS - 1] ^= 1;
        assert!(!holds(&a, 4, 9, &n), "one flipped bit in the last word");
    }

    #[test]
    fn checked_rewrite_counts_its_checks() {
        let ctl = Ctl::default();
        let c = ctl.clone();
        let h = std::thread::spawn(move || rewrite(1, 8.192, true, &c));
        std::thread::sleep(std::time::Duration::from_millis(700));
        ctl.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        h.join().unwrap().unwrap();
        let checked = ctl.stats.checked.load(std::sync::atomic::Ordering::Relaxed);
        let work = ctl.stats.work.load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            checked > 0 && checked == work,
            "{checked} checked, {work} written"
        );
    }

    #[test]
    fn a_page_tells_which_page_and_pass_it_is() {
        let n = noise();
        let mut w = vec![0u64; PAGE_WORDS];
        for (generation, page) in [(0, 0), (1, 7), (3, 32_767), (900, 12_345)] {
            fill_page(&mut w, generation, page, &n);
            assert_eq!(identify(&w, &n, 32_768), Some((generation, page)));
        }
        assert_eq!(identify(&w, &n, 12_345), None, "an index past the set");
        assert_eq!(identify(&[0; 2], &n, 32_768), None, "a zero page");
        let other: Vec<u64> = (0..PAGE_WORDS as u64)
            .map(|i| i * 0x1234_5678_9ABC)
            .collect();
        assert_eq!(identify(&other, &n, 32_768), None, "other data");
    }

    #[test]
    fn pages_do_not_compress() {
        // Few repeated bytes: a 4-byte window almost never recurs within a page.
        let mut page = vec![0u64; PAGE_WORDS];
        fill_page(&mut page, 3, 11, &noise());
        let bytes: Vec<u8> = page.iter().flat_map(|w| w.to_le_bytes()).collect();
        let windows: std::collections::HashSet<&[u8]> = bytes.windows(4).collect();
        assert!(windows.len() > bytes.len() * 99 / 100, "{}", windows.len());
    }

    #[test]
    fn writes_at_about_the_asked_rate() {
        let ctl = Ctl::default();
        let h = spawn(1, 8.192, ctl.clone()).unwrap();
        // Let the initial fill finish, then measure over 1 s.
        std::thread::sleep(std::time::Duration::from_millis(200));
        let w0 = ctl.stats.work.load(std::sync::atomic::Ordering::Relaxed);
        std::thread::sleep(std::time::Duration::from_secs(1));
        let w1 = ctl.stats.work.load(std::sync::atomic::Ordering::Relaxed);
        ctl.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        h.join().unwrap();
        // 8.192 MB/s = 2000 pages/s. Not ahead of the schedule (allowing for a late
        // wake-up); the lower bound is loose because a loaded test host may starve
        // the thread.
        let got = w1 - w0;
        assert!((800..=2300).contains(&got), "{got} pages in 1 s");
    }
}
