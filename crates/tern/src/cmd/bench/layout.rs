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

/// Where `memdirty`'s set lies in a guest's memory.
#[derive(Debug, Clone, PartialEq)]
pub struct SetLayout {
    /// The runs of the set among the pages holding data, in set order.
    pub extents: Vec<SetExtent>,
    /// (guest page, set page) of every set page found, by guest page.
    by_page: Vec<(u64, u64)>,
    set_pages: u64,
}

impl SetLayout {
    /// Where a writer that has just written guest page `page` and not the page after
    /// it stands in its set, as a share of the set (the next set page it writes):
    /// `None` when `page` is not a set page, or when the set's next page does not
    /// follow it in memory, so that the reading says nothing about whether the writer
    /// went on there.
    pub fn writer_after(&self, page: u64) -> Option<f64> {
        let i = self.by_page.binary_search_by_key(&page, |&(p, _)| p).ok()?;
        let (_, k) = self.by_page[i];
        let next = (k + 1) % self.set_pages;
        match self.by_page.get(i + 1) {
            Some(&(p, n)) if p == page + 1 && n == next => {
                Some(next as f64 / self.set_pages as f64)
            }
            _ => None,
        }
    }
}

/// Where the `set_pages` pages of `memdirty`'s set lie in the memory file at `path`,
/// or `None` when fewer than 90 % of them were found (the set not filled yet, or
/// another writer).
pub fn working_set_layout(path: &Path, set_pages: u64) -> std::io::Result<Option<SetLayout>> {
    let file = std::fs::File::open(path)?;
    layout_in(std::io::BufReader::with_capacity(4 << 20, file), set_pages)
}

fn layout_in(mut r: impl Read, set_pages: u64) -> std::io::Result<Option<SetLayout>> {
    let noise = memdirty::noise();
    let mut page = vec![0u8; PAGE];
    let mut words = [0u64; 2];
    // (set page, position among the pages holding data), each set page once.
    let mut found: Vec<Option<u64>> = vec![None; set_pages as usize];
    let mut by_page = Vec::with_capacity(set_pages as usize);
    let mut position = 0u64;
    let mut index = 0u64;
    loop {
        match r.read_exact(&mut page) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e),
        }
        index += 1;
        if page.iter().all(|&b| b == 0) {
            continue;
        }
        for start in STARTS {
            for (i, w) in words.iter_mut().enumerate() {
                let at = start + 8 * i;
                *w = u64::from_ne_bytes(page[at..at + 8].try_into().expect("8 bytes"));
            }
            if let Some((_, k)) = memdirty::identify(&words, &noise, set_pages) {
                if found[k as usize].is_none() {
                    found[k as usize] = Some(position);
                    by_page.push((index - 1, k));
                }
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
    Ok(Some(SetLayout {
        extents: runs,
        by_page,
        set_pages,
    }))
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
        let layout = layout_in(&mem[..], 6).unwrap().unwrap();
        let run = |offset, position, pages| SetExtent {
            offset,
            position,
            pages,
        };
        // Positions count pages holding data only: the hole is not one.
        assert_eq!(layout.extents, vec![run(0, 7, 2), run(2, 2, 4)]);
        // Guest pages 3-6 hold set pages 2-5, guest pages 8-9 set pages 0-1.
        assert_eq!(layout.writer_after(3), Some(3.0 / 6.0));
        assert_eq!(layout.writer_after(8), Some(1.0 / 6.0));
        assert_eq!(layout.writer_after(0), None, "not a set page");
        // Set page 5's successor (0, by wrap-around) is elsewhere in memory, and set
        // page 1's (2) too: the writer may have gone on there unseen.
        assert_eq!(layout.writer_after(6), None);
        assert_eq!(layout.writer_after(9), None);
    }

    #[test]
    fn page_aligned_pages_are_found_too_and_a_set_mostly_missing_is_not_a_layout() {
        let mem = memory(&[Some(0), Some(1), Some(2), Some(3)], 0);
        assert_eq!(layout_in(&mem[..], 4).unwrap().unwrap().extents.len(), 1);
        assert_eq!(layout_in(&mem[..], 8).unwrap(), None, "half the set found");
        assert_eq!(layout_in(&[0u8; 3 * PAGE][..], 4).unwrap(), None);
    }
}
