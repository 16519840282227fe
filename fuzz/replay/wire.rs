// What the wire fuzz targets check, shared with tern-wire's regression test (which
// `include!`s this file) so that a crash kept in fuzz/regressions/ is replayed exactly.

/// A destination reading whatever a peer sends on a memory stream: frames, the Hello
/// inside the first, and page batches (plain or LZ4) inside the rest. Bad input must be
/// refused with an error, never a panic, a hang or an unbounded allocation.
pub fn decode_stream(data: &[u8]) {
    use tern_wire::{Entry, Hello, Kind, PAGE_SIZE};
    let mut r = data;
    // Each frame consumes at least its 8-byte header, so this ends.
    while let Ok(frame) = tern_wire::read_frame(&mut r) {
        match frame.kind {
            Kind::Hello => {
                let _ = Hello::decode(&frame.payload);
            }
            Kind::Pages => {
                let Ok(raw) = tern_wire::unseal(&frame) else {
                    continue;
                };
                if let Ok(entries) = tern_wire::entries(&raw) {
                    for e in entries {
                        if let Entry::Data { page, .. } = e {
                            assert_eq!(page.len(), PAGE_SIZE);
                        }
                    }
                }
            }
            Kind::Ack | Kind::RoundEnd => {
                let _ = tern_wire::parse_u32(&frame.payload);
            }
            _ => {}
        }
    }
}

/// The first frame a stranger can send: what decodes must encode back to an equal Hello.
pub fn hello_round_trip(data: &[u8]) {
    if let Ok(hello) = tern_wire::Hello::decode(data) {
        let again = tern_wire::Hello::decode(&hello.encode()).expect("an encoded Hello decodes");
        assert_eq!(hello, again);
    }
}
