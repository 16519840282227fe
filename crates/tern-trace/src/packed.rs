//! The guest's scheduler events on the control channel: a fixed 24-byte binary record
//! per event (pure), carried base64-encoded inside the channel's JSON lines.
//!
//! A JSON object per event would be ten times the size and cost the guest's vCPUs the
//! time the trace is meant to measure. Layout, little-endian:
//!
//! ```text
//! 0  time_ns u64 | 8 cpu u16 | 10 kind u8 | 11 zero u8 | 12 a u32 | 16 b u32 | 20 c u32
//! switch:  a prev_tid, b next_tid, c prev_state   wakeup:    a tid, b target_cpu
//! migrate: a tid, b orig_cpu, c dest_cpu          kvm_entry: a tid, b vcpu_id   kvm_exit: a tid
//! ```

use crate::model::{EventKind, SchedEvent};
use base64::Engine;

/// Bytes per packed event.
pub const RECORD_BYTES: usize = 24;

/// Why a packed chunk could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnpackError {
    #[error("the trace chunk is not base64: {0}")]
    Base64(String),
    #[error("the trace chunk is {0} bytes, not a whole number of {RECORD_BYTES}-byte records")]
    Length(usize),
    #[error("trace record {index} has unknown kind {kind}")]
    Kind { index: usize, kind: u8 },
}

fn put(out: &mut Vec<u8>, e: &SchedEvent) {
    let (kind, a, b, c) = match e.kind {
        // The kernel's task state fits 32 bits (its highest flag is TASK_REPORT_MAX).
        EventKind::Switch {
            prev_tid,
            prev_state,
            next_tid,
        } => (0u8, prev_tid, next_tid, prev_state as u32),
        EventKind::Wakeup { tid, target_cpu } => (1, tid, target_cpu, 0),
        EventKind::Migrate {
            tid,
            orig_cpu,
            dest_cpu,
        } => (2, tid, orig_cpu, dest_cpu),
        EventKind::KvmEntry { tid, vcpu_id } => (3, tid, vcpu_id, 0),
        EventKind::KvmExit { tid } => (4, tid, 0, 0),
    };
    out.extend_from_slice(&e.time_ns.to_le_bytes());
    out.extend_from_slice(&(e.cpu.min(u16::MAX as u32) as u16).to_le_bytes());
    out.extend_from_slice(&[kind, 0]);
    for v in [a, b, c] {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

/// Events as packed records.
pub fn pack(events: &[SchedEvent]) -> Vec<u8> {
    let mut out = Vec::with_capacity(events.len() * RECORD_BYTES);
    for e in events {
        put(&mut out, e);
    }
    out
}

/// Packed records back to events.
pub fn unpack(bytes: &[u8]) -> Result<Vec<SchedEvent>, UnpackError> {
    if !bytes.len().is_multiple_of(RECORD_BYTES) {
        return Err(UnpackError::Length(bytes.len()));
    }
    bytes
        .chunks_exact(RECORD_BYTES)
        .enumerate()
        .map(|(index, r)| {
            let u32_at = |i: usize| u32::from_le_bytes([r[i], r[i + 1], r[i + 2], r[i + 3]]);
            let mut t = [0u8; 8];
            t.copy_from_slice(&r[0..8]);
            let (a, b, c) = (u32_at(12), u32_at(16), u32_at(20));
            let kind = match r[10] {
                0 => EventKind::Switch {
                    prev_tid: a,
                    prev_state: c as i32 as i64,
                    next_tid: b,
                },
                1 => EventKind::Wakeup {
                    tid: a,
                    target_cpu: b,
                },
                2 => EventKind::Migrate {
                    tid: a,
                    orig_cpu: b,
                    dest_cpu: c,
                },
                3 => EventKind::KvmEntry { tid: a, vcpu_id: b },
                4 => EventKind::KvmExit { tid: a },
                kind => return Err(UnpackError::Kind { index, kind }),
            };
            Ok(SchedEvent {
                time_ns: u64::from_le_bytes(t),
                cpu: u16::from_le_bytes([r[8], r[9]]) as u32,
                kind,
            })
        })
        .collect()
}

/// Events packed and base64-encoded, as a chunk's `data`.
pub fn to_text(events: &[SchedEvent]) -> String {
    base64::engine::general_purpose::STANDARD.encode(pack(events))
}

/// A chunk's `data` back to events.
pub fn from_text(text: &str) -> Result<Vec<SchedEvent>, UnpackError> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|e| UnpackError::Base64(e.to_string()))?;
    unpack(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn kind() -> impl Strategy<Value = EventKind> {
        prop_oneof![
            (any::<u32>(), any::<i32>(), any::<u32>()).prop_map(|(p, s, n)| EventKind::Switch {
                prev_tid: p,
                prev_state: s as i64,
                next_tid: n
            }),
            (any::<u32>(), any::<u32>())
                .prop_map(|(tid, c)| EventKind::Wakeup { tid, target_cpu: c }),
            (any::<u32>(), any::<u32>(), any::<u32>()).prop_map(|(tid, o, d)| {
                EventKind::Migrate {
                    tid,
                    orig_cpu: o,
                    dest_cpu: d,
                }
            }),
            (any::<u32>(), any::<u32>())
                .prop_map(|(tid, v)| EventKind::KvmEntry { tid, vcpu_id: v }),
            any::<u32>().prop_map(|tid| EventKind::KvmExit { tid }),
        ]
    }

    proptest! {
        #[test]
        fn packing_round_trips(events in prop::collection::vec(
            (any::<u64>(), 0u32..=u16::MAX as u32, kind())
                .prop_map(|(time_ns, cpu, kind)| SchedEvent { time_ns, cpu, kind }),
            0..50,
        )) {
            let text = to_text(&events);
            prop_assert_eq!(pack(&events).len(), events.len() * RECORD_BYTES);
            prop_assert_eq!(from_text(&text).unwrap(), events);
        }

        #[test]
        fn garbage_is_an_error_not_a_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = unpack(&bytes);
        }
    }

    #[test]
    fn bad_chunks_say_what_is_wrong() {
        assert_eq!(unpack(&[0; 25]), Err(UnpackError::Length(25)));
        let mut r = [0u8; 24];
        r[10] = 9;
        assert_eq!(unpack(&r), Err(UnpackError::Kind { index: 0, kind: 9 }));
        assert!(matches!(
            from_text("not base64!"),
            Err(UnpackError::Base64(_))
        ));
    }
}
