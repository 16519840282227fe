//! Tracepoint record layouts, read from tracefs `events/*/*/format` files (pure).
//!
//! A tracepoint's raw record is a C struct whose layout changes between kernels (for
//! example `sched_migrate_task` lost its fixed-size `comm` for a `__data_loc` string in
//! 6.x, which moved every field after it). The kernel describes the layout in text:
//!
//! ```text
//! name: sched_switch
//! ID: 372
//! format:
//!     field:unsigned short common_type;  offset:0;  size:2;  signed:0;
//!     field:pid_t prev_pid;  offset:24;  size:4;  signed:1;
//! ```
//!
//! so offsets come from there, never from constants here. [`decode`] turns one raw
//! record into a typed [`EventKind`] using the layouts of the tracepoints recorded.

use crate::error::{Result, TraceError};
use crate::model::EventKind;

/// One field of a tracepoint record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    pub offset: usize,
    pub size: usize,
    pub signed: bool,
}

/// A tracepoint's id and record layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Format {
    pub name: String,
    /// The value of `common_type` in this tracepoint's records, and the perf `config`.
    pub id: u64,
    pub fields: Vec<Field>,
}

impl Format {
    /// The field called `name`, or an error naming the tracepoint and the field (the
    /// kernel's layout differs from what tern knows how to read).
    pub fn field(&self, name: &str) -> Result<&Field> {
        self.fields
            .iter()
            .find(|f| f.name == name)
            .ok_or_else(|| TraceError::Format {
                tracepoint: self.name.clone(),
                reason: format!("no field {name:?}"),
            })
    }

    /// Reads the integer field `name` of `raw` (sign-extended when the kernel says the
    /// field is signed). A record too short for the field is an error, not a panic:
    /// records come from the kernel, but the layout may be for another kernel.
    pub fn int(&self, raw: &[u8], name: &str) -> Result<i64> {
        self.field(name)?
            .read(raw)
            .ok_or_else(|| TraceError::Format {
                tracepoint: self.name.clone(),
                reason: format!("record of {} bytes too short for {name:?}", raw.len()),
            })
    }
}

impl Field {
    /// The field's integer value in `raw` (native byte order), `None` when `raw` is too
    /// short or the field is not 1, 2, 4 or 8 bytes wide.
    pub fn read(&self, raw: &[u8]) -> Option<i64> {
        let b = raw.get(self.offset..self.offset.checked_add(self.size)?)?;
        Some(match (self.size, self.signed) {
            (1, true) => i64::from(b[0] as i8),
            (1, false) => i64::from(b[0]),
            (2, true) => i64::from(i16::from_ne_bytes(b.try_into().ok()?)),
            (2, false) => i64::from(u16::from_ne_bytes(b.try_into().ok()?)),
            (4, true) => i64::from(i32::from_ne_bytes(b.try_into().ok()?)),
            (4, false) => i64::from(u32::from_ne_bytes(b.try_into().ok()?)),
            (8, _) => i64::from_ne_bytes(b.try_into().ok()?),
            _ => return None,
        })
    }
}

/// Parses a tracefs `format` file. `tracepoint` names it in errors.
pub fn parse(tracepoint: &str, text: &str) -> Result<Format> {
    let bad = |reason: String| TraceError::Format {
        tracepoint: tracepoint.to_string(),
        reason,
    };
    let mut name = None;
    let mut id = None;
    let mut fields = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(n) = line.strip_prefix("name:") {
            name = Some(n.trim().to_string());
        } else if let Some(i) = line.strip_prefix("ID:") {
            id = Some(
                i.trim()
                    .parse::<u64>()
                    .map_err(|e| bad(format!("bad ID {i:?}: {e}")))?,
            );
        } else if line.starts_with("field:") {
            fields.push(parse_field(line).ok_or_else(|| bad(format!("bad field line {line:?}")))?);
        }
    }
    Ok(Format {
        name: name.ok_or_else(|| bad("no name: line".into()))?,
        id: id.ok_or_else(|| bad("no ID: line".into()))?,
        fields,
    })
}

/// `field:pid_t prev_pid;\toffset:24;\tsize:4;\tsigned:1;`
fn parse_field(line: &str) -> Option<Field> {
    let mut decl = None;
    let mut offset = None;
    let mut size = None;
    let mut signed = false;
    for part in line.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = part.split_once(':')?;
        match key.trim() {
            "field" => decl = Some(value.trim()),
            "offset" => offset = value.trim().parse().ok(),
            "size" => size = value.trim().parse().ok(),
            "signed" => signed = value.trim() == "1",
            _ => {}
        }
    }
    // The name is the declaration's last word, less any array suffix: `char prev_comm[16]`.
    let last = decl?.split_whitespace().last()?;
    let name = last.split('[').next()?.to_string();
    Some(Field {
        name,
        offset: offset?,
        size: size?,
        signed,
    })
}

/// The layouts of the tracepoints a recording decodes.
#[derive(Debug, Clone)]
pub struct Layouts {
    pub switch: Format,
    pub wakeup: Format,
    pub migrate: Format,
    /// Present only where the kernel has KVM tracepoints and the caller asked for them.
    pub kvm_entry: Option<Format>,
    pub kvm_exit: Option<Format>,
}

impl Layouts {
    /// Checks every field [`decode`] reads exists, so a kernel with another layout fails
    /// when the recording starts, not on its first record.
    pub fn check(&self) -> Result<()> {
        for (f, names) in [
            (&self.switch, &["prev_pid", "prev_state", "next_pid"][..]),
            (&self.wakeup, &["pid", "target_cpu"][..]),
            (&self.migrate, &["pid", "orig_cpu", "dest_cpu"][..]),
        ] {
            for n in names {
                f.field(n)?;
            }
        }
        for f in [&self.kvm_entry, &self.kvm_exit].into_iter().flatten() {
            f.field("common_pid")?;
        }
        if let Some(f) = &self.kvm_entry {
            f.field("vcpu_id")?;
        }
        Ok(())
    }

    /// The formats of every tracepoint in this set.
    pub fn all(&self) -> Vec<&Format> {
        let mut v = vec![&self.switch, &self.wakeup, &self.migrate];
        v.extend(self.kvm_entry.iter());
        v.extend(self.kvm_exit.iter());
        v
    }
}

/// Decodes one raw tracepoint record. The tracepoint is told by `common_type`, the first
/// field of every record; `Ok(None)` for a record of a tracepoint not in `layouts`.
pub fn decode(layouts: &Layouts, raw: &[u8]) -> Result<Option<EventKind>> {
    let ty = layouts.switch.int(raw, "common_type")? as u64;
    let tid = |f: &Format, n: &str| f.int(raw, n).map(|v| v as u32);
    let cpu = |f: &Format, n: &str| f.int(raw, n).map(|v| v as u32);
    Ok(Some(if ty == layouts.switch.id {
        let s = &layouts.switch;
        EventKind::Switch {
            prev_tid: tid(s, "prev_pid")?,
            prev_state: s.int(raw, "prev_state")?,
            next_tid: tid(s, "next_pid")?,
        }
    } else if ty == layouts.wakeup.id {
        EventKind::Wakeup {
            tid: tid(&layouts.wakeup, "pid")?,
            target_cpu: cpu(&layouts.wakeup, "target_cpu")?,
        }
    } else if ty == layouts.migrate.id {
        let m = &layouts.migrate;
        EventKind::Migrate {
            tid: tid(m, "pid")?,
            orig_cpu: cpu(m, "orig_cpu")?,
            dest_cpu: cpu(m, "dest_cpu")?,
        }
    } else if let Some(e) = layouts.kvm_entry.as_ref().filter(|e| e.id == ty) {
        EventKind::KvmEntry {
            tid: tid(e, "common_pid")?,
            vcpu_id: e.int(raw, "vcpu_id")? as u32,
        }
    } else if let Some(x) = layouts.kvm_exit.as_ref().filter(|x| x.id == ty) {
        EventKind::KvmExit {
            tid: tid(x, "common_pid")?,
        }
    } else {
        return Ok(None);
    }))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The formats of this machine's kernel (6.18), as tracefs prints them.
    pub const SWITCH: &str = "name: sched_switch\nID: 372\nformat:\n\
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;\n\
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;\n\
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;\n\n\
\tfield:char prev_comm[16];\toffset:8;\tsize:16;\tsigned:0;\n\
\tfield:pid_t prev_pid;\toffset:24;\tsize:4;\tsigned:1;\n\
\tfield:int prev_prio;\toffset:28;\tsize:4;\tsigned:1;\n\
\tfield:long prev_state;\toffset:32;\tsize:8;\tsigned:1;\n\
\tfield:char next_comm[16];\toffset:40;\tsize:16;\tsigned:0;\n\
\tfield:pid_t next_pid;\toffset:56;\tsize:4;\tsigned:1;\n\
\tfield:int next_prio;\toffset:60;\tsize:4;\tsigned:1;\n\n\
print fmt: \"prev_comm=%s prev_pid=%d\", REC->prev_comm, REC->prev_pid\n";
    pub const WAKEUP: &str = "name: sched_wakeup\nID: 374\nformat:\n\
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;\n\n\
\tfield:char comm[16];\toffset:8;\tsize:16;\tsigned:0;\n\
\tfield:pid_t pid;\toffset:24;\tsize:4;\tsigned:1;\n\
\tfield:int prio;\toffset:28;\tsize:4;\tsigned:1;\n\
\tfield:int target_cpu;\toffset:32;\tsize:4;\tsigned:1;\n";
    pub const MIGRATE: &str = "name: sched_migrate_task\nID: 371\nformat:\n\
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;\n\n\
\tfield:__data_loc char[] comm;\toffset:8;\tsize:4;\tsigned:0;\n\
\tfield:pid_t pid;\toffset:12;\tsize:4;\tsigned:1;\n\
\tfield:int prio;\toffset:16;\tsize:4;\tsigned:1;\n\
\tfield:int orig_cpu;\toffset:20;\tsize:4;\tsigned:1;\n\
\tfield:int dest_cpu;\toffset:24;\tsize:4;\tsigned:1;\n";

    pub fn layouts() -> Layouts {
        Layouts {
            switch: parse("sched_switch", SWITCH).unwrap(),
            wakeup: parse("sched_wakeup", WAKEUP).unwrap(),
            migrate: parse("sched_migrate_task", MIGRATE).unwrap(),
            kvm_entry: None,
            kvm_exit: None,
        }
    }

    fn put(raw: &mut [u8], off: usize, bytes: &[u8]) {
        raw[off..off + bytes.len()].copy_from_slice(bytes);
    }

    #[test]
    fn parses_the_kernels_layout() {
        let f = parse("sched_switch", SWITCH).unwrap();
        assert_eq!(f.name, "sched_switch");
        assert_eq!(f.id, 372);
        let prev = f.field("prev_pid").unwrap();
        assert_eq!((prev.offset, prev.size, prev.signed), (24, 4, true));
        assert_eq!(f.field("prev_comm").unwrap().size, 16);
        assert_eq!(f.field("next_pid").unwrap().offset, 56);
        layouts().check().unwrap();
    }

    #[test]
    fn decodes_each_tracepoint() {
        let l = layouts();
        let mut raw = vec![0u8; 64];
        put(&mut raw, 0, &372u16.to_ne_bytes());
        put(&mut raw, 24, &1234i32.to_ne_bytes());
        put(&mut raw, 32, &1i64.to_ne_bytes());
        put(&mut raw, 56, &99i32.to_ne_bytes());
        assert_eq!(
            decode(&l, &raw).unwrap(),
            Some(EventKind::Switch {
                prev_tid: 1234,
                prev_state: 1,
                next_tid: 99
            })
        );
        let mut raw = vec![0u8; 28];
        put(&mut raw, 0, &371u16.to_ne_bytes());
        put(&mut raw, 12, &7i32.to_ne_bytes());
        put(&mut raw, 20, &0i32.to_ne_bytes());
        put(&mut raw, 24, &1i32.to_ne_bytes());
        assert_eq!(
            decode(&l, &raw).unwrap(),
            Some(EventKind::Migrate {
                tid: 7,
                orig_cpu: 0,
                dest_cpu: 1
            })
        );
        put(&mut raw, 0, &5u16.to_ne_bytes());
        assert_eq!(decode(&l, &raw).unwrap(), None, "another tracepoint");
    }

    #[test]
    fn short_records_and_missing_fields_are_errors() {
        let l = layouts();
        let mut raw = vec![0u8; 30];
        put(&mut raw, 0, &372u16.to_ne_bytes());
        let err = decode(&l, &raw).unwrap_err().to_string();
        assert!(err.contains("too short"), "{err}");
        let mut bad = l.clone();
        bad.migrate.fields.retain(|f| f.name != "dest_cpu");
        let err = bad.check().unwrap_err().to_string();
        assert!(
            err.contains("sched_migrate_task") && err.contains("dest_cpu"),
            "{err}"
        );
        assert!(parse("x", "format:\n").is_err());
    }

    proptest! {
        /// Any field line the kernel could print parses back to its numbers, and reading
        /// never panics whatever the record's length.
        #[test]
        fn field_lines_round_trip(
            name in "[a-z_]{1,12}",
            offset in 0usize..256,
            size in prop::sample::select(vec![1usize, 2, 4, 8]),
            signed: bool,
            raw in prop::collection::vec(any::<u8>(), 0..300),
        ) {
            let line = format!(
                "field:int {name};\toffset:{offset};\tsize:{size};\tsigned:{};",
                u8::from(signed)
            );
            let f = parse_field(&line).unwrap();
            prop_assert_eq!(&f, &Field { name, offset, size, signed });
            prop_assert_eq!(f.read(&raw).is_some(), raw.len() >= offset + size);
        }

        /// Arbitrary text never panics the parser.
        #[test]
        fn parse_never_panics(text in ".{0,400}") {
            let _ = parse("x", &text);
        }
    }
}
