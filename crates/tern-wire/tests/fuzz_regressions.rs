//! Every input the wire fuzzers ever broke the decoder with, replayed through the same
//! checks the fuzz targets make. New crashes go into `fuzz/regressions/{wire_stream,hello}/`.

use std::path::Path;

include!("../../../fuzz/replay/wire.rs");

fn replay(target: &str, check: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/regressions")
        .join(target);
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("the regression folder exists") {
        let path = entry.expect("readable folder").path();
        check(&std::fs::read(&path).expect("readable regression file"));
        seen += 1;
    }
    assert!(seen > 0, "no regression inputs in {}", dir.display());
}

#[test]
fn wire_stream_fuzz_regressions_are_refused_without_harm() {
    replay("wire_stream", decode_stream);
}

#[test]
fn hello_fuzz_regressions_round_trip_or_are_refused() {
    replay("hello", hello_round_trip);
}
