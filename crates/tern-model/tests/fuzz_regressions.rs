//! Every input the Ganeti fuzzer ever broke the parser with, replayed: each must be
//! refused with an error or survive being written back and read again, as the fuzz
//! target demands. New crashes go into `fuzz/regressions/ganeti/`.

use std::path::Path;

use tern_model::ganeti;

#[test]
fn ganeti_fuzz_regressions_parse_or_refuse() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/regressions/ganeti");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("the regression folder exists") {
        let path = entry.expect("readable folder").path();
        let data = std::fs::read(&path).expect("readable regression file");
        seen += 1;
        let Ok(text) = std::str::from_utf8(&data) else {
            continue;
        };
        if let Ok(cluster) = ganeti::parse(text) {
            let written = ganeti::serialize(&cluster);
            let again = ganeti::parse(&written)
                .unwrap_or_else(|e| panic!("{}: tern's own text fails: {e}", path.display()));
            assert_eq!(ganeti::serialize(&again), written, "{}", path.display());
        }
    }
    assert!(seen > 0, "no regression inputs in {}", dir.display());
}

#[test]
fn an_overflowing_ratio_is_refused_by_name() {
    let text = "\n\n\n\n|9,0,0,0,0,0||plain|9e999|1.0\n";
    let err = ganeti::parse(text).expect_err("infinity is no ratio");
    assert!(err.to_string().contains("too large"), "{err}");
}

#[test]
fn a_group_name_given_twice_is_refused() {
    let text = "g1|uuid-1|preferred||\ng1|uuid-2|preferred||\n\n\n\n";
    let err = ganeti::parse(text).expect_err("two groups named g1");
    assert!(err.to_string().contains("same name"), "{err}");
}
