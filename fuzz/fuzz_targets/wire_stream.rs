//! A destination agent reading whatever a peer sends on a memory stream: frames, the
//! Hello inside the first, and page batches (plain or LZ4) inside the rest. It must
//! refuse bad input with an error, never panic, hang or allocate without bound.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_agent::migration::wire::{self, Entry, Hello, Kind, PAGE_SIZE};

fuzz_target!(|data: &[u8]| {
    let mut r = data;
    // Each frame consumes at least its 8-byte header, so this ends.
    while let Ok(frame) = wire::read_frame(&mut r) {
        match frame.kind {
            Kind::Hello => {
                let _ = Hello::decode(&frame.payload);
            }
            Kind::Pages => {
                let Ok(raw) = wire::unseal(&frame) else {
                    continue;
                };
                if let Ok(entries) = wire::entries(&raw) {
                    for e in entries {
                        if let Entry::Data { page, .. } = e {
                            assert_eq!(page.len(), PAGE_SIZE);
                        }
                    }
                }
            }
            Kind::Ack | Kind::RoundEnd => {
                let _ = wire::parse_u32(&frame.payload);
            }
            _ => {}
        }
    }
});
