//! The first frame a stranger can send to a memory port: decoding must refuse what is
//! not a Hello, and what it accepts must encode back to an equal Hello.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_agent::migration::wire::Hello;

fuzz_target!(|data: &[u8]| {
    if let Ok(hello) = Hello::decode(data) {
        let again = Hello::decode(&hello.encode()).expect("an encoded Hello decodes");
        assert_eq!(hello, again);
    }
});
