//! The first frame a stranger can send to a memory port (see `replay/wire.rs`).
#![no_main]

include!("../replay/wire.rs");

libfuzzer_sys::fuzz_target!(|data: &[u8]| hello_round_trip(data));
