//! Guest RAM as the engine sees it: the VM's shared memory file, mapped.
//!
//! The source maps its VM's file read-only and finds changed pages by content: a 64-bit
//! xxh3 digest per 4 KiB page of what was last sent. The guest keeps writing while a
//! page is copied, so the digest recorded is the digest of the bytes that went on the
//! wire, never of what a scan saw earlier. The destination writes pages into its own
//! VM's file at their offsets and punches holes for zero pages.
//!
//! Memory the guest writes is never seen as `&[u8]`: the compiler may assume the bytes
//! behind a shared reference do not change, which the guest breaks at will. [`GuestRam`]
//! hands out only copies of whole pages, made through raw pointers into a buffer of the
//! caller's (on the stack, in L1), which is then zero-tested or hashed at memory speed.

use std::fs::OpenOptions;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use memmap2::{MmapOptions, MmapRaw};
use rustix::fs::SeekFrom;
use rustix::io::Errno;
use xxhash_rust::xxh3::xxh3_64;

use super::wire::PAGE_SIZE;

/// Opening or mapping a memory file failed.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("memory file {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("memory file {path} is {len} bytes, not a positive multiple of {PAGE_SIZE}")]
    BadSize { path: String, len: u64 },
    #[error("page {index} is outside guest memory of {pages} pages")]
    OutOfRange { index: u64, pages: u64 },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> MemoryError + '_ {
    move |source| MemoryError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The digest a zero page has; also what the destination holds before anything arrives.
pub fn zero_digest() -> u64 {
    static ZERO: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *ZERO.get_or_init(|| xxh3_64(&[0u8; PAGE_SIZE]))
}

/// True when every byte of `page` is zero.
pub fn is_zero(page: &[u8]) -> bool {
    // OR-folding 64-byte blocks lets the compiler vectorise; the early exit per block
    // keeps non-zero pages (the common case after boot) cheap.
    let mut blocks = page.chunks_exact(64);
    let blocks_zero = blocks.all(|b| b.iter().fold(0u8, |acc, &x| acc | x) == 0);
    blocks_zero && page.chunks_exact(64).remainder().iter().all(|&b| b == 0)
}

/// A read-only mapping of memory another process writes while we read it. It never
/// forms a reference into the mapping; bytes leave it only as page copies. (The same
/// contract as vm-memory's `VolatileSlice`, whose bulk copies are plain `memcpy`s through
/// raw pointers too; that crate brings its own region and bitmap types for one function.)
struct GuestRam {
    map: MmapRaw,
}

impl GuestRam {
    fn map(file: &std::fs::File) -> std::io::Result<GuestRam> {
        Ok(GuestRam {
            map: MmapOptions::new().map_raw_read_only(file)?,
        })
    }

    fn len(&self) -> usize {
        self.map.len()
    }

    /// Copies page `index` into `out`; panics when the page is outside the mapping.
    fn copy_page(&self, index: u64, out: &mut [u8; PAGE_SIZE]) {
        let start = usize::try_from(index)
            .ok()
            .and_then(|i| i.checked_mul(PAGE_SIZE))
            .filter(|&s| s <= self.len().saturating_sub(PAGE_SIZE))
            .expect("page index within guest memory");
        // SAFETY: `start + PAGE_SIZE` is within the mapping (checked above), which lives as
        // long as `self`; the file is never truncated while mapped (QEMU sized it at start
        // and the agent only deletes it after the VM is gone). `out` is our own buffer, so
        // the ranges do not overlap. The guest may write the page during the copy; the
        // copy is then torn, which no digest sent matches, so the page is sent again, and
        // no Rust reference to the changing bytes exists for the compiler to reason about.
        unsafe {
            std::ptr::copy_nonoverlapping(self.map.as_ptr().add(start), out.as_mut_ptr(), PAGE_SIZE)
        }
    }
}

/// The source's read-only view of guest RAM.
pub struct SourceMemory {
    map: GuestRam,
    file: std::fs::File,
    /// Per page: the file had storage there at the last [`SourceMemory::refresh_extents`].
    /// Guest RAM the guest never touched is a hole in the tmpfs file, and reading a hole
    /// through a shared mapping makes tmpfs allocate and zero a page: 18 µs a page
    /// measured under load, seconds for a mostly empty guest. Holes are zero pages
    /// known without reading them.
    data: Vec<std::sync::atomic::AtomicBool>,
}

impl SourceMemory {
    pub fn open(path: &Path) -> Result<SourceMemory, MemoryError> {
        let file = std::fs::File::open(path).map_err(io_err(path))?;
        let len = file.metadata().map_err(io_err(path))?.len();
        if len == 0 || !len.is_multiple_of(PAGE_SIZE as u64) {
            return Err(MemoryError::BadSize {
                path: path.display().to_string(),
                len,
            });
        }
        let map = GuestRam::map(&file).map_err(io_err(path))?;
        let pages = len / PAGE_SIZE as u64;
        let mem = SourceMemory {
            map,
            file,
            data: (0..pages)
                .map(|_| std::sync::atomic::AtomicBool::new(true))
                .collect(),
        };
        mem.refresh_extents();
        Ok(mem)
    }

    /// Re-reads where the file has storage. A page the guest first writes after this
    /// still counts as a hole (zero) until the next refresh, so every scan refreshes
    /// first: the final pass, with the guest paused, is then exact.
    pub fn refresh_extents(&self) {
        let len = self.map.len() as u64;
        let mut has_data = vec![false; self.data.len()];
        let mut pos: u64 = 0;
        while pos < len {
            let start = match rustix::fs::seek(&self.file, SeekFrom::Data(pos)) {
                Ok(start) => start,
                // ENXIO: no data past `pos`. Anything else: assume data everywhere left,
                // which is only slower, never wrong.
                Err(e) => {
                    if e != Errno::NXIO {
                        has_data[pos as usize / PAGE_SIZE..].fill(true);
                    }
                    break;
                }
            };
            let end =
                rustix::fs::seek(&self.file, SeekFrom::Hole(start)).map_or(len, |e| e.min(len));
            let first = start as usize / PAGE_SIZE;
            let last = (end as usize).div_ceil(PAGE_SIZE).min(has_data.len());
            has_data[first..last].fill(true);
            pos = end.max(start + 1);
        }
        for (slot, d) in self.data.iter().zip(has_data) {
            slot.store(d, Ordering::Relaxed);
        }
    }

    /// False when page `index` was a hole (all zero) at the last refresh.
    pub fn has_data(&self, index: u64) -> bool {
        self.data[index as usize].load(Ordering::Relaxed)
    }

    /// The digest of page `index` as it is now, holes without reading them; `buf` is
    /// scratch space, reused across pages so the copy lands in cache-hot memory.
    pub fn digest(&self, index: u64, buf: &mut [u8; PAGE_SIZE]) -> u64 {
        if self.has_data(index) {
            self.map.copy_page(index, buf);
            xxh3_64(buf)
        } else {
            zero_digest()
        }
    }

    pub fn pages(&self) -> u64 {
        (self.map.len() / PAGE_SIZE) as u64
    }

    /// Copies page `index` into `out`. The guest may be writing it: the copy is then
    /// torn, its digest matches nothing sent, and the page is sent again.
    pub fn read_page(&self, index: u64, out: &mut [u8; PAGE_SIZE]) {
        self.map.copy_page(index, out)
    }
}

/// What the destination was last sent, page by page, as digests. Shared by the sending
/// streams, each of which owns a disjoint set of pages within a round.
pub struct SentDigests {
    digests: Vec<AtomicU64>,
}

impl SentDigests {
    /// A fresh destination file is all zeros, so every page starts as "zero sent".
    pub fn new(pages: u64) -> SentDigests {
        let z = zero_digest();
        SentDigests {
            digests: (0..pages).map(|_| AtomicU64::new(z)).collect(),
        }
    }

    pub fn get(&self, index: u64) -> u64 {
        self.digests[index as usize].load(Ordering::Relaxed)
    }

    pub fn set(&self, index: u64, digest: u64) {
        self.digests[index as usize].store(digest, Ordering::Relaxed)
    }

    pub fn len(&self) -> u64 {
        self.digests.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }
}

/// The result of one pass over guest memory.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Scan {
    /// Pages that differ from what was sent, ascending: what a round would send.
    pub dirty: Vec<u64>,
    /// Pages whose content changed since the previous scan, ascending: the guest's
    /// dirtying during the last round, whether or not the page was sent.
    pub changed: Vec<u64>,
    /// When each of `changed` was read ([`scan_timed`] only; empty otherwise): where a
    /// guest writing in order stood when the scan passed it (round 1's probe reports it).
    pub changed_read_at: Vec<Instant>,
}

/// Digests of every page as the previous scan saw them, to tell what the guest changed
/// during a round from what was merely left unsent.
pub struct SeenDigests(Vec<AtomicU64>);

impl SeenDigests {
    pub fn new(pages: u64) -> SeenDigests {
        let z = zero_digest();
        SeenDigests((0..pages).map(|_| AtomicU64::new(z)).collect())
    }
}

/// Pages a scan thread takes at a time: small enough that the threads finish together
/// however the data lies (holes cost nothing, and a guest's data sits in a few places,
/// so one half of memory can hold most of it: a busy guest's final pass took 6-38 ms
/// with a half per thread, 8.5-24 ms in these pieces) and whatever else holds a core
/// for a while, large enough that taking one is nothing beside reading it.
const SCAN_CHUNK_PAGES: u64 = 2048;

/// Runs `part` over consecutive page ranges of [`SCAN_CHUNK_PAGES`] on `threads`
/// threads, each taking the next range when it is done with one; results in page
/// order. A pass over guest memory is the floor of the downtime, so it uses every core
/// until the end.
fn in_parallel<T: Send>(
    pages: u64,
    threads: usize,
    part: impl Fn(std::ops::Range<u64>) -> T + Sync,
) -> Vec<T> {
    let chunks = pages.div_ceil(SCAN_CHUNK_PAGES);
    let threads = (threads.clamp(1, 16) as u64).min(chunks.max(1));
    let next = AtomicU64::new(0);
    let take = || {
        let mut mine = Vec::new();
        loop {
            let chunk = next.fetch_add(1, Ordering::Relaxed);
            if chunk >= chunks {
                return mine;
            }
            let start = chunk * SCAN_CHUNK_PAGES;
            mine.push((chunk, part(start..(start + SCAN_CHUNK_PAGES).min(pages))));
        }
    };
    let mut done: Vec<(u64, T)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads).map(|_| s.spawn(take)).collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("scan thread panicked"))
            .collect()
    });
    done.sort_unstable_by_key(|(chunk, _)| *chunk);
    done.into_iter().map(|(_, part)| part).collect()
}

/// One pass over guest memory (`changed_read_at` left empty).
pub fn scan(mem: &SourceMemory, sent: &SentDigests, seen: &SeenDigests, threads: usize) -> Scan {
    scan_pass(mem, sent, seen, threads, false)
}

/// [`scan`] that also notes when it read each changed page: only round 1's probe asks,
/// so the other passes do not read the clock per page.
pub fn scan_timed(
    mem: &SourceMemory,
    sent: &SentDigests,
    seen: &SeenDigests,
    threads: usize,
) -> Scan {
    scan_pass(mem, sent, seen, threads, true)
}

fn scan_pass(
    mem: &SourceMemory,
    sent: &SentDigests,
    seen: &SeenDigests,
    threads: usize,
    timed: bool,
) -> Scan {
    mem.refresh_extents();
    let parts = in_parallel(mem.pages(), threads, |range| {
        let mut out = Scan::default();
        // Each page is copied to this buffer and hashed there: the copy stays in L1, so
        // the pass reads guest memory once, as hashing in place would.
        let mut buf = [0u8; PAGE_SIZE];
        for index in range {
            let d = mem.digest(index, &mut buf);
            if d != sent.get(index) {
                out.dirty.push(index);
            }
            if seen.0[index as usize].swap(d, Ordering::Relaxed) != d {
                out.changed.push(index);
                if timed {
                    out.changed_read_at.push(Instant::now());
                }
            }
        }
        out
    });
    let mut all = Scan::default();
    for part in parts {
        all.dirty.extend(part.dirty);
        all.changed.extend(part.changed);
        all.changed_read_at.extend(part.changed_read_at);
    }
    all
}

/// The pages that differ from what was sent (a scan without change tracking): the
/// final pass, with the guest paused, so only digests are compared.
pub fn changed_pages(mem: &SourceMemory, sent: &SentDigests, threads: usize) -> Vec<u64> {
    mem.refresh_extents();
    in_parallel(mem.pages(), threads, |range| {
        let mut buf = [0u8; PAGE_SIZE];
        range
            .filter(|&index| mem.digest(index, &mut buf) != sent.get(index))
            .collect::<Vec<u64>>()
    })
    .concat()
}

/// The destination's side of guest RAM: its own VM's memory file, written with
/// positional writes. No mapping: writing through one faults every page in one at a
/// time, and checking a zero page through one allocates it (a hole read through a
/// shared mapping is a page tmpfs must allocate and clear). Positional writes need no
/// lock, so the streams apply their batches in parallel.
pub struct DestMemory {
    file: std::fs::File,
    path: String,
    pages: u64,
}

impl DestMemory {
    /// Opens (or creates, sized, when absent) the destination memory file.
    pub fn open(path: &Path, bytes: u64) -> Result<DestMemory, MemoryError> {
        if bytes == 0 || !bytes.is_multiple_of(PAGE_SIZE as u64) {
            return Err(MemoryError::BadSize {
                path: path.display().to_string(),
                len: bytes,
            });
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io_err(path))?;
        let len = file.metadata().map_err(io_err(path))?.len();
        if len != bytes {
            if len != 0 {
                return Err(MemoryError::BadSize {
                    path: path.display().to_string(),
                    len,
                });
            }
            file.set_len(bytes).map_err(io_err(path))?;
        }
        Ok(DestMemory {
            file,
            path: path.display().to_string(),
            pages: bytes / PAGE_SIZE as u64,
        })
    }

    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Applies one received batch: each run of consecutive data pages with one
    /// `pwritev`, each zero run by punching a hole (a no-op where the file has none).
    pub fn apply(&self, entries: &[super::wire::Entry<'_>]) -> Result<(), MemoryError> {
        use super::wire::Entry;
        let mut run: Vec<&[u8]> = Vec::new();
        let mut run_start = 0u64;
        for entry in entries {
            match *entry {
                Entry::Data { index, page } => {
                    let index = u64::from(index);
                    self.check(index, 1)?;
                    if run.is_empty() || run_start + run.len() as u64 != index {
                        self.write_run(run_start, &run)?;
                        run.clear();
                        run_start = index;
                    }
                    run.push(page);
                }
                Entry::ZeroRun { index, count } => {
                    let index = u64::from(index);
                    self.check(index, u64::from(count))?;
                    self.write_run(run_start, &run)?;
                    run.clear();
                    self.zero(index, u64::from(count))?;
                }
            }
        }
        self.write_run(run_start, &run)
    }

    /// Writes `pages` (each one page long) at page `first` onwards.
    fn write_run(&self, first: u64, pages: &[&[u8]]) -> Result<(), MemoryError> {
        use std::io::IoSlice;
        // Linux takes at most IOV_MAX (1024) buffers per call.
        for (k, chunk) in pages.chunks(1024).enumerate() {
            let mut iov: Vec<IoSlice<'_>> = chunk.iter().map(|p| IoSlice::new(p)).collect();
            let mut bufs = &mut iov[..];
            let mut offset = (first + (k * 1024) as u64) * PAGE_SIZE as u64;
            while !bufs.is_empty() {
                let n = match rustix::io::pwritev(&self.file, bufs, offset) {
                    Ok(0) => return Err(self.io(std::io::ErrorKind::WriteZero.into())),
                    Ok(n) => n,
                    Err(Errno::INTR) => continue,
                    Err(e) => return Err(self.io(e.into())),
                };
                // A short write: carry on from where it stopped.
                offset += n as u64;
                IoSlice::advance_slices(&mut bufs, n);
            }
        }
        Ok(())
    }

    /// Makes `count` pages from `first` read as zeros.
    fn zero(&self, first: u64, count: u64) -> Result<(), MemoryError> {
        use rustix::fs::FallocateFlags;
        let (offset, len) = (first * PAGE_SIZE as u64, count * PAGE_SIZE as u64);
        let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        match rustix::fs::fallocate(&self.file, flags, offset, len) {
            Ok(()) => return Ok(()),
            Err(Errno::OPNOTSUPP) => {}
            Err(e) => return Err(self.io(e.into())),
        }
        // A filesystem without holes: write the zeros.
        use std::os::unix::fs::FileExt;
        let zeros = [0u8; PAGE_SIZE];
        for p in first..first + count {
            self.file
                .write_all_at(&zeros, p * PAGE_SIZE as u64)
                .map_err(|e| self.io(e))?;
        }
        Ok(())
    }

    fn io(&self, source: std::io::Error) -> MemoryError {
        MemoryError::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn check(&self, index: u64, count: u64) -> Result<(), MemoryError> {
        if index.checked_add(count).is_none_or(|end| end > self.pages) {
            return Err(MemoryError::OutOfRange {
                index,
                pages: self.pages,
            });
        }
        Ok(())
    }

    /// Digest of the whole file, to compare with the source's in tests and checks.
    pub fn digest(&self) -> u64 {
        use std::os::unix::fs::FileExt;
        let mut all = vec![0u8; (self.pages * PAGE_SIZE as u64) as usize];
        match self.file.read_exact_at(&mut all, 0) {
            Ok(()) => xxh3_64(&all),
            // Not a digest of any content the source could have.
            Err(_) => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parallel_parts_cover_every_page_once_in_order() {
        for (pages, threads) in [
            (0, 2),
            (1, 2),
            (SCAN_CHUNK_PAGES, 3),
            (5 * SCAN_CHUNK_PAGES + 7, 2),
            (100_000, 16),
        ] {
            let parts = in_parallel(pages, threads, |r| r.collect::<Vec<u64>>());
            let all: Vec<u64> = parts.concat();
            assert_eq!(
                all,
                (0..pages).collect::<Vec<_>>(),
                "{pages} pages on {threads} threads"
            );
        }
    }

    #[test]
    fn zero_test_and_digest_agree() {
        let mut page = vec![0u8; PAGE_SIZE];
        assert!(is_zero(&page));
        assert_eq!(xxh3_64(&page), zero_digest());
        page[PAGE_SIZE - 1] = 1;
        assert!(!is_zero(&page));
    }

    #[test]
    fn scan_finds_exactly_the_pages_that_differ_from_what_was_sent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        let mut content = vec![0u8; PAGE_SIZE * 64];
        for page in [3usize, 17, 40] {
            content[page * PAGE_SIZE + 5] = 9;
        }
        std::fs::write(&path, &content).unwrap();
        let mem = SourceMemory::open(&path).unwrap();
        let sent = SentDigests::new(mem.pages());
        assert_eq!(changed_pages(&mem, &sent, 3), vec![3, 17, 40]);
        let mut buf = [0u8; PAGE_SIZE];
        mem.read_page(17, &mut buf);
        sent.set(17, xxh3_64(&buf));
        assert_eq!(changed_pages(&mem, &sent, 1), vec![3, 40]);
    }

    #[test]
    fn holes_are_zero_pages_and_a_page_written_later_is_seen_by_the_next_scan() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(PAGE_SIZE as u64 * 1024).unwrap();
        file.write_all_at(&[7u8; PAGE_SIZE], 700 * PAGE_SIZE as u64)
            .unwrap();
        let mem = SourceMemory::open(&path).unwrap();
        assert!(mem.has_data(700));
        // Filesystems may allocate in larger blocks, but never far from the data.
        assert!(!mem.has_data(100) && !mem.has_data(1000));
        let sent = SentDigests::new(mem.pages());
        assert_eq!(changed_pages(&mem, &sent, 2), vec![700]);
        file.write_all_at(&[9u8; PAGE_SIZE], 100 * PAGE_SIZE as u64)
            .unwrap();
        assert_eq!(changed_pages(&mem, &sent, 2), vec![100, 700]);
        // Reading through the hole map did not fill the holes.
        assert!(!mem.has_data(1000));
    }

    #[test]
    fn destination_writes_runs_of_pages_and_zeroes_by_punching_holes() {
        use super::super::wire::Entry;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        let dest = DestMemory::open(&path, 2048 * PAGE_SIZE as u64).unwrap();
        let pages: Vec<Vec<u8>> = (0..1500u32)
            .map(|i| vec![(i % 251 + 1) as u8; PAGE_SIZE])
            .collect();
        // A run longer than one pwritev takes, a gap, a single page.
        let mut entries: Vec<Entry<'_>> = (0..1200u32)
            .map(|i| Entry::Data {
                index: i,
                page: &pages[i as usize],
            })
            .collect();
        entries.push(Entry::Data {
            index: 1300,
            page: &pages[1300],
        });
        dest.apply(&entries).unwrap();
        dest.apply(&[Entry::ZeroRun {
            index: 100,
            count: 50,
        }])
        .unwrap();
        let got = std::fs::read(&path).unwrap();
        for (i, page) in got.chunks(PAGE_SIZE).enumerate() {
            let want = match i {
                100..150 => 0,
                1300 => (i % 251 + 1) as u8,
                1200.. => 0,
                _ => (i % 251 + 1) as u8,
            };
            assert!(page.iter().all(|&b| b == want), "page {i}");
        }
        assert_eq!(dest.digest(), xxh3_64(&got));
    }

    #[test]
    fn destination_rejects_pages_outside_its_memory_and_mismatched_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        let dest = DestMemory::open(&path, 8 * PAGE_SIZE as u64).unwrap();
        let page = vec![1u8; PAGE_SIZE];
        assert!(dest
            .apply(&[super::super::wire::Entry::Data {
                index: 8,
                page: &page
            }])
            .is_err());
        assert!(dest
            .apply(&[super::super::wire::Entry::ZeroRun {
                index: 4,
                count: u32::MAX
            }])
            .is_err());
        assert!(DestMemory::open(&path, 16 * PAGE_SIZE as u64).is_err());
        assert!(DestMemory::open(&path, 100).is_err());
    }
}
