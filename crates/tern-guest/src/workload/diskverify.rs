//! `diskverify`: the verifier's idea on a block device, so the host can tell after a
//! migration or a restart whether the VM's disk holds what the guest wrote.
//!
//! The first `mib` MiB of the device are `B` blocks of 4 KiB. Write number `c` (1, 2,
//! ...) fills block `(c - 1) mod B` with a header (magic, `c`, the block's index) and
//! a pseudo-random stream seeded by `(c, block)`; a block never written reads as zeros
//! (generation 0). Each block says which write it holds, so the check needs no state
//! from the writer: the newest write found, `n`, implies the generation of every block
//! ([`last_writer`]), and a block that holds another (an older one: a lost write) or
//! whose content does not match its header (garbled) is bad.
//!
//! Writes and reads are `O_DIRECT` (and writes `O_DSYNC`): a write is counted only once
//! the virtual disk has it, and the check reads the disk, not the guest's page cache,
//! which would travel with the guest's memory in a migration and hide a disk that
//! lost data.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use super::verifier::{last_writer, page_content};
use super::Ctl;
use crate::pacing::Pacer;
use crate::GuestError;
use tern_api::guest::DiskReport;

/// Bytes per block: the page size, a multiple of any disk's logical block size.
pub const BLOCK: usize = 4096;
const WORDS: usize = BLOCK / 8;
/// Blocks read per `pread` when checking.
const READ_BLOCKS: usize = 64;
/// "terndisk".
const MAGIC: u64 = 0x7465_726e_6469_736b;

/// The content write `c` puts into block `b` (pure).
pub fn block_content(c: u64, b: u64, out: &mut [u64]) {
    page_content(c, b, out);
    out[0] = MAGIC;
    out[1] = c;
    out[2] = b;
}

/// The generation block `b` holds according to its bytes, or `None` when they are
/// neither zeros nor a complete write of that block (pure).
pub fn block_generation(b: u64, bytes: &[u8]) -> Option<u64> {
    if bytes.iter().all(|&x| x == 0) {
        return Some(0);
    }
    let word = |i: usize| u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    if word(0) != MAGIC || word(2) != b {
        return None;
    }
    let c = word(1);
    let mut want = [0u64; WORDS];
    block_content(c, b, &mut want);
    let same = want.iter().enumerate().all(|(i, &w)| word(i) == w);
    same.then_some(c)
}

/// What a scan of the blocks found (pure over the generations read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scan {
    /// The newest write found.
    pub counter: u64,
    pub bad_blocks: u64,
}

/// Judges the generations read from every block (`None`: garbled).
pub fn judge(generations: &[Option<u64>]) -> Scan {
    let blocks = generations.len() as u64;
    let counter = generations.iter().flatten().copied().max().unwrap_or(0);
    let bad_blocks = generations
        .iter()
        .enumerate()
        .filter(|(b, g)| **g != Some(last_writer(counter, *b as u64, blocks)))
        .count() as u64;
    Scan {
        counter,
        bad_blocks,
    }
}

/// A 4096-aligned byte buffer for `O_DIRECT`, without unsafe allocation: a larger
/// vector and the aligned window inside it.
struct Aligned {
    raw: Vec<u8>,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        Aligned {
            raw: vec![0; len + BLOCK],
            len,
        }
    }

    fn bytes(&mut self) -> &mut [u8] {
        let off = self.raw.as_ptr().align_offset(BLOCK);
        &mut self.raw[off..off + self.len]
    }
}

/// The device, its size in blocks and the writer's counter, behind one lock so a check
/// never reads a block half-written.
pub struct Shared {
    state: Mutex<Device>,
}

struct Device {
    file: File,
    path: String,
    mib: u64,
    blocks: u64,
    /// Writes done and durable in this boot, continuing the disk's own count.
    counter: u64,
}

fn open(path: &str) -> Result<File, GuestError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT | libc::O_DSYNC)
        .open(path)
        .map_err(|e| GuestError::BadRequest(format!("diskverify: cannot open {path}: {e}")))
}

impl Device {
    fn open(path: &str, mib: u64) -> Result<Device, GuestError> {
        let file = open(path)?;
        let size = std::fs::metadata(path)
            .ok()
            .filter(|m| m.len() > 0)
            .map(|m| m.len())
            .or_else(|| device_bytes(path))
            .unwrap_or(0);
        if mib << 20 > size {
            return Err(GuestError::BadRequest(format!(
                "diskverify: {path} has {} MiB, fewer than the {mib} MiB asked",
                size >> 20
            )));
        }
        Ok(Device {
            file,
            path: path.to_string(),
            mib,
            blocks: (mib << 20) / BLOCK as u64,
            counter: 0,
        })
    }

    fn scan(&self) -> Result<Scan, GuestError> {
        let mut buf = Aligned::new(READ_BLOCKS * BLOCK);
        let mut generations = Vec::with_capacity(self.blocks as usize);
        let mut b = 0u64;
        while b < self.blocks {
            let n = (self.blocks - b).min(READ_BLOCKS as u64) as usize;
            let bytes = &mut buf.bytes()[..n * BLOCK];
            self.file
                .read_exact_at(bytes, b * BLOCK as u64)
                .map_err(|e| self.err("reading", e))?;
            for (i, block) in bytes.chunks_exact(BLOCK).enumerate() {
                generations.push(block_generation(b + i as u64, block));
            }
            b += n as u64;
        }
        Ok(judge(&generations))
    }

    fn write(&mut self, c: u64, b: u64, buf: &mut Aligned) -> Result<(), GuestError> {
        let mut words = [0u64; WORDS];
        block_content(c, b, &mut words);
        let bytes = buf.bytes();
        for (chunk, w) in bytes.chunks_exact_mut(8).zip(words) {
            chunk.copy_from_slice(&w.to_le_bytes());
        }
        self.file
            .write_all_at(bytes, b * BLOCK as u64)
            .map_err(|e| self.err("writing", e))
    }

    /// The next `n` writes.
    fn step(&mut self, n: u64, buf: &mut Aligned) -> Result<(), GuestError> {
        for _ in 0..n {
            let c = self.counter + 1;
            self.write(c, (c - 1) % self.blocks, buf)?;
            self.counter = c;
        }
        Ok(())
    }

    fn err(&self, what: &str, e: std::io::Error) -> GuestError {
        GuestError::BadRequest(format!("diskverify: {what} {}: {e}", self.path))
    }

    fn report(&self, written: Option<u64>) -> Result<DiskReport, GuestError> {
        let scan = self.scan()?;
        Ok(DiskReport {
            device: self.path.clone(),
            mib: self.mib,
            counter: scan.counter,
            written,
            blocks: self.blocks,
            bad_blocks: scan.bad_blocks,
            ok: scan.bad_blocks == 0 && written.is_none_or(|w| scan.counter >= w),
        })
    }
}

/// The size of a block device from sysfs (`/sys/class/block/NAME/size`, 512-byte
/// sectors): `metadata` reports 0 for devices.
fn device_bytes(path: &str) -> Option<u64> {
    let name = std::path::Path::new(path).file_name()?.to_str()?;
    let sectors: u64 = std::fs::read_to_string(format!("/sys/class/block/{name}/size"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(sectors * 512)
}

impl Shared {
    /// Opens `path` and picks up where the disk's pattern left off: a disk that does
    /// not hold the pattern (new, or another content) is zeroed first.
    pub fn new(path: &str, mib: u64) -> Result<Shared, GuestError> {
        let mut dev = Device::open(path, mib)?;
        let scan = dev.scan()?;
        if scan.bad_blocks == 0 {
            dev.counter = scan.counter;
        } else {
            let mut zeros = Aligned::new(READ_BLOCKS * BLOCK);
            let mut b = 0u64;
            while b < dev.blocks {
                let n = (dev.blocks - b).min(READ_BLOCKS as u64) as usize;
                dev.file
                    .write_all_at(&zeros.bytes()[..n * BLOCK], b * BLOCK as u64)
                    .map_err(|e| dev.err("zeroing", e))?;
                b += n as u64;
            }
        }
        Ok(Shared {
            state: Mutex::new(dev),
        })
    }

    pub fn device(&self) -> String {
        self.lock().path.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Device> {
        match self.state.lock() {
            Ok(d) => d,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Reads the disk back, with the writer paused.
    pub fn report(&self) -> Result<DiskReport, GuestError> {
        let d = self.lock();
        d.report(Some(d.counter))
    }
}

/// Checks a disk no `diskverify` of this boot writes (after a reboot).
pub fn check(path: &str, mib: u64) -> Result<DiskReport, GuestError> {
    Device::open(path, mib)?.report(None)
}

/// Starts the paced writer.
pub fn spawn(
    shared: Arc<Shared>,
    blocks_per_sec: f64,
    ctl: Ctl,
) -> Result<JoinHandle<()>, GuestError> {
    std::thread::Builder::new()
        .name("diskverify".into())
        .spawn(move || {
            let mut pacer = Pacer::with_slices(blocks_per_sec);
            let mut buf = Aligned::new(BLOCK);
            let start = Instant::now();
            ctl.stats.mark_paced(start);
            while !ctl.stopped() {
                let due = pacer.due(start.elapsed());
                if due == 0 {
                    ctl.sleep(pacer.wait(start.elapsed()));
                    continue;
                }
                if let Err(e) = shared.lock().step(due, &mut buf) {
                    ctl.stats.fail(e.to_string());
                    return;
                }
                pacer.done(due);
                ctl.stats.add(due);
            }
        })
        .map_err(GuestError::Io)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(words: &[u64]) -> Vec<u8> {
        words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    #[test]
    fn blocks_say_which_write_they_hold() {
        let mut w = [0u64; WORDS];
        block_content(7, 3, &mut w);
        assert_eq!(block_generation(3, &bytes(&w)), Some(7));
        assert_eq!(
            block_generation(4, &bytes(&w)),
            None,
            "another block's content"
        );
        let mut garbled = bytes(&w);
        garbled[100] ^= 1;
        assert_eq!(block_generation(3, &garbled), None);
        assert_eq!(block_generation(3, &[0u8; BLOCK]), Some(0));
    }

    #[test]
    fn lost_and_garbled_writes_are_counted() {
        // 4 blocks, 6 writes: blocks 0,1 hold writes 5,6; blocks 2,3 hold 3,4.
        let good = [Some(5), Some(6), Some(3), Some(4)];
        assert_eq!(
            judge(&good),
            Scan {
                counter: 6,
                bad_blocks: 0
            }
        );
        let lost = [Some(1), Some(6), Some(3), Some(4)];
        assert_eq!(judge(&lost).bad_blocks, 1);
        let garbled = [Some(5), Some(6), None, Some(4)];
        assert_eq!(judge(&garbled).bad_blocks, 1);
        assert_eq!(judge(&[Some(0); 3]).counter, 0);
        assert_eq!(judge(&[Some(0); 3]).bad_blocks, 0);
        assert_eq!(judge(&[Some(1), Some(0), Some(0)]).bad_blocks, 0);
    }

    #[test]
    fn writes_and_checks_a_file() {
        // O_DIRECT needs a filesystem that has it; tmpfs (a common /tmp) before Linux
        // 6.6 does not, so then the file goes beside the crate's sources.
        let mut dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        std::fs::write(&path, vec![0xAAu8; 1 << 20]).unwrap();
        if open(path.to_str().unwrap()).is_err() {
            dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        }
        let path = dir.path().join("disk");
        std::fs::write(&path, vec![0xAAu8; 1 << 20]).unwrap();
        let p = path.to_str().unwrap();
        let s = Shared::new(p, 1).unwrap();
        let mut buf = Aligned::new(BLOCK);
        s.lock().step(300, &mut buf).unwrap();
        let r = s.report().unwrap();
        assert!(r.ok && r.counter == 300 && r.blocks == 256, "{r:?}");
        // A new writer continues the disk's count; a check without one agrees.
        let again = Shared::new(p, 1).unwrap();
        assert_eq!(again.lock().counter, 300);
        assert_eq!(check(p, 1).unwrap().counter, 300);
        // One block changed behind the writer's back is found.
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[1u8], 5 * BLOCK as u64 + 64).unwrap();
        f.sync_all().unwrap();
        let bad = check(p, 1).unwrap();
        assert!(!bad.ok && bad.bad_blocks == 1, "{bad:?}");
        assert!(Shared::new(p, 2).is_err(), "larger than the file");
    }
}
