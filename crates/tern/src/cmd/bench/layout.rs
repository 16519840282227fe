//! Where `memdirty`'s working set lies in a running guest's memory, read from the
//! guest's memory file on its host: the page-level model places the set's pages there
//! instead of in one piece after a fixed amount of data.

use std::io::Read;
use std::path::Path;

use tern_guest::workload::memdirty;
use tern_guest::PAGE_SIZE as PAGE;
use tern_migrate::SetExtent;

/// Share of the set that must be found for a layout to be used: a page the scan missed
/// would otherwise be placed by the fixed rule beside measured ones.
const MIN_FOUND: f64 = 0.9;

/// Byte offsets inside a memory page where a `memdirty` page may begin: glibc puts a
/// large allocation 16 bytes after the start of its mapping; 0 in case it does not.
const STARTS: [usize; 2] = [16, 0];

/// The runs in which the `set_pages` pages of `memdirty`'s set lie among the pages
/// holding data in the memory file at `path`, or `None` when fewer than 90 % of them
/// were found (the set not filled yet, or another writer).
pub fn working_set_extents(path: &Path, set_pages: u64) -> std::io::Result<Option<Vec<SetExtent>>> {
    let file = std::fs::File::open(path)?;
    extents_in(std::io::BufReader::with_capacity(4 << 20, file), set_pages)
}

fn extents_in(mut r: impl Read, set_pages: u64) -> std::io::Result<Option<Vec<SetExtent>>> {
    let noise = memdirty::noise();
    let mut page = vec![0u8; PAGE];
    let mut words = [0u64; 2];
    // (set page, position among the pages holding data), each set page once.
    let mut found: Vec<Option<u64>> = vec![None; set_pages as usize];
    let mut position = 0u64;
    loop {
        match r.read_exact(&mut page) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e),
        }
        if page.iter().all(|&b| b == 0) {
            continue;
        }
        for start in STARTS {
            for (i, w) in words.iter_mut().enumerate() {
                let at = start + 8 * i;
                *w = u64::from_ne_bytes(page[at..at + 8].try_into().expect("8 bytes"));
            }
            if let Some((_, k)) = memdirty::identify(&words, &noise, set_pages) {
                found[k as usize].get_or_insert(position);
                break;
            }
        }
        position += 1;
    }
    let hits = found.iter().filter(|f| f.is_some()).count();
    if (hits as f64) < MIN_FOUND * set_pages as f64 {
        return Ok(None);
    }
    let mut runs: Vec<SetExtent> = Vec::new();
    for (k, at) in found.into_iter().enumerate() {
        let Some(at) = at else { continue };
        match runs.last_mut() {
            Some(e) if e.offset + e.pages == k as u64 && e.position + e.pages == at => {
                e.pages += 1;
            }
            _ => runs.push(SetExtent {
                offset: k as u64,
                position: at,
                pages: 1,
            }),
        }
    }
    Ok(Some(runs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_guest::PAGE_WORDS;

    /// Guest memory as a byte string: `layout` gives, per memory page, what it holds.
    fn memory(layout: &[Option<u64>], offset_bytes: usize) -> Vec<u8> {
        let noise = memdirty::noise();
        let mut words = vec![0u64; PAGE_WORDS];
        let mut mem = vec![0u8; layout.len() * PAGE];
        for (i, held) in layout.iter().enumerate() {
            let page = &mut mem[i * PAGE..(i + 1) * PAGE];
            match held {
                Some(k) => {
                    memdirty::fill_page(&mut words, 2, *k, &noise);
                    for (j, w) in words.iter().enumerate() {
                        let at = offset_bytes + 8 * j;
                        if at + 8 <= PAGE {
                            page[at..at + 8].copy_from_slice(&w.to_ne_bytes());
                        }
                    }
                }
                // Other data: non-zero, not a memdirty page.
                None => page.fill(0x5A),
            }
        }
        mem
    }

    #[test]
    fn a_set_split_around_other_data_and_holes_is_found_in_its_runs() {
        // Two pages of other data, a hole, set pages 2..6, more data, then set pages 0..2
        // at the top, as the guest's allocator sometimes lays out memdirty's buffer.
        let mut layout = vec![None, None];
        let mut mem = memory(&layout, 16);
        mem.extend(vec![0u8; PAGE]);
        layout = vec![Some(2), Some(3), Some(4), Some(5), None, Some(0), Some(1)];
        mem.extend(memory(&layout, 16));
        let runs = extents_in(&mem[..], 6).unwrap().unwrap();
        let run = |offset, position, pages| SetExtent {
            offset,
            position,
            pages,
        };
        // Positions count pages holding data only: the hole is not one.
        assert_eq!(runs, vec![run(0, 7, 2), run(2, 2, 4)]);
    }

    #[test]
    fn page_aligned_pages_are_found_too_and_a_set_mostly_missing_is_not_a_layout() {
        let mem = memory(&[Some(0), Some(1), Some(2), Some(3)], 0);
        assert_eq!(extents_in(&mem[..], 4).unwrap().unwrap().len(), 1);
        assert_eq!(extents_in(&mem[..], 8).unwrap(), None, "half the set found");
        assert_eq!(extents_in(&[0u8; 3 * PAGE][..], 4).unwrap(), None);
    }
}
