//! Ganeti htools text, as `tern plan --ganeti FILE` reads it from an operator or a
//! cluster dump: parsing must refuse bad input with an error, never panic, and what it
//! accepts must survive being written back and read again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_model::ganeti;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cluster) = ganeti::parse(text) {
        let written = ganeti::serialize(&cluster);
        let again = ganeti::parse(&written).expect("tern's own Ganeti text parses");
        assert_eq!(ganeti::serialize(&again), written);
    }
});
