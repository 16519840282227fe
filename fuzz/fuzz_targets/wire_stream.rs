//! Whatever a peer can put on a memory stream (see `replay/wire.rs`).
#![no_main]

include!("../replay/wire.rs");

libfuzzer_sys::fuzz_target!(|data: &[u8]| decode_stream(data));
