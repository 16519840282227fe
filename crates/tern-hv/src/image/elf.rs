//! Just enough ELF64 reading for the image builder: whether a program is statically
//! linked (no `PT_INTERP`), and a kernel module's `.modinfo` section.
//!
//! Pure: works on bytes; bounds are checked, so a truncated file is an error, not a panic.

/// The fields of a module's `.modinfo` the builder needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModInfo {
    pub name: Option<String>,
    /// Module names this one needs loaded first (from `depends=`).
    pub depends: Vec<String>,
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], off: usize) -> Option<usize> {
    usize::try_from(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?)).ok()
}

/// Checks the ELF64 little-endian magic.
fn is_elf64le(b: &[u8]) -> bool {
    b.len() >= 64 && &b[..4] == b"\x7fELF" && b[4] == 2 && b[5] == 1
}

/// `Some(true)` when the ELF file has no program interpreter (statically linked),
/// `None` when it is not a readable ELF64 little-endian file.
pub fn is_static(b: &[u8]) -> Option<bool> {
    const PT_INTERP: u32 = 3;
    if !is_elf64le(b) {
        return None;
    }
    let phoff = u64_at(b, 0x20)?;
    let phentsize = usize::from(u16_at(b, 0x36)?);
    let phnum = usize::from(u16_at(b, 0x38)?);
    for i in 0..phnum {
        if u32_at(b, phoff.checked_add(i.checked_mul(phentsize)?)?)? == PT_INTERP {
            return Some(false);
        }
    }
    Some(true)
}

/// The bytes of the section called `name`, if the file has it.
pub fn section<'a>(b: &'a [u8], name: &str) -> Option<&'a [u8]> {
    if !is_elf64le(b) {
        return None;
    }
    let shoff = u64_at(b, 0x28)?;
    let shentsize = usize::from(u16_at(b, 0x3A)?);
    let shnum = usize::from(u16_at(b, 0x3C)?);
    let shstrndx = usize::from(u16_at(b, 0x3E)?);
    let header = |i: usize| shoff.checked_add(i.checked_mul(shentsize)?);
    let strtab_hdr = header(shstrndx)?;
    let strtab_off = u64_at(b, strtab_hdr + 0x18)?;
    for i in 0..shnum {
        let h = header(i)?;
        let name_off = strtab_off.checked_add(u32_at(b, h)? as usize)?;
        let rest = b.get(name_off..)?;
        let end = rest.iter().position(|&c| c == 0)?;
        if &rest[..end] == name.as_bytes() {
            let off = u64_at(b, h + 0x18)?;
            let size = u64_at(b, h + 0x20)?;
            return b.get(off..off.checked_add(size)?);
        }
    }
    None
}

/// Parses a `.modinfo` section: NUL-separated `key=value` strings.
pub fn parse_modinfo(section: &[u8]) -> ModInfo {
    let mut info = ModInfo {
        name: None,
        depends: Vec::new(),
    };
    for entry in section.split(|&c| c == 0) {
        let text = String::from_utf8_lossy(entry);
        if let Some(v) = text.strip_prefix("name=") {
            info.name = Some(v.to_string());
        } else if let Some(v) = text.strip_prefix("depends=") {
            info.depends = v
                .split(',')
                .filter(|d| !d.is_empty())
                .map(|d| d.to_string())
                .collect();
        }
    }
    info
}

/// The module information of a kernel module file (uncompressed).
pub fn modinfo(ko: &[u8]) -> Option<ModInfo> {
    section(ko, ".modinfo").map(parse_modinfo)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal ELF64 file with optional PT_INTERP and one named section.
    pub(crate) fn tiny_elf(interp: bool, section_name: &str, data: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; 64];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        // One program header at 64.
        let phoff = 64usize;
        b[0x20..0x28].copy_from_slice(&(phoff as u64).to_le_bytes());
        b[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        b[0x38..0x3A].copy_from_slice(&1u16.to_le_bytes());
        let mut ph = vec![0u8; 56];
        ph[..4].copy_from_slice(&(if interp { 3u32 } else { 1u32 }).to_le_bytes());
        b.extend_from_slice(&ph);
        // Section names, then data, then 3 section headers: null, .shstrtab, named.
        let strtab_off = b.len();
        let mut strtab = vec![0u8];
        strtab.extend_from_slice(b".shstrtab\0");
        let name_idx = strtab.len();
        strtab.extend_from_slice(section_name.as_bytes());
        strtab.push(0);
        b.extend_from_slice(&strtab);
        let data_off = b.len();
        b.extend_from_slice(data);
        let shoff = b.len();
        b[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        b[0x3A..0x3C].copy_from_slice(&64u16.to_le_bytes());
        b[0x3C..0x3E].copy_from_slice(&3u16.to_le_bytes());
        b[0x3E..0x40].copy_from_slice(&1u16.to_le_bytes());
        let mut sh = |name: usize, off: usize, size: usize| {
            let mut h = vec![0u8; 64];
            h[..4].copy_from_slice(&(name as u32).to_le_bytes());
            h[0x18..0x20].copy_from_slice(&(off as u64).to_le_bytes());
            h[0x20..0x28].copy_from_slice(&(size as u64).to_le_bytes());
            b.extend_from_slice(&h);
        };
        sh(0, 0, 0);
        sh(1, strtab_off, strtab.len());
        sh(name_idx, data_off, data.len());
        b
    }

    #[test]
    fn static_or_not() {
        assert_eq!(is_static(&tiny_elf(false, ".text", b"")), Some(true));
        assert_eq!(is_static(&tiny_elf(true, ".text", b"")), Some(false));
        assert_eq!(is_static(b"#!/bin/sh\n"), None);
    }

    #[test]
    fn reads_modinfo_depends() {
        let data = b"license=GPL\0depends=virtio,virtio_ring,net_failover\0name=virtio_net\0";
        let elf = tiny_elf(false, ".modinfo", data);
        let info = modinfo(&elf).unwrap();
        assert_eq!(info.name.as_deref(), Some("virtio_net"));
        assert_eq!(info.depends, ["virtio", "virtio_ring", "net_failover"]);
        let none = parse_modinfo(b"depends=\0name=virtio\0");
        assert!(none.depends.is_empty());
    }

    #[test]
    fn truncated_files_are_not_panics() {
        let elf = tiny_elf(false, ".modinfo", b"name=x\0");
        for cut in 0..elf.len() {
            let _ = modinfo(&elf[..cut]);
            let _ = is_static(&elf[..cut]);
        }
    }
}
