//! Every Ganeti test file in data/ganeti loads, or is rejected
//! exactly where Ganeti's own `hinfo -t FILE` rejects it; loaded files
//! round-trip through tern's writer.

use std::path::PathBuf;

use tern_model::ganeti;

fn data_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../data/ganeti"))
}

/// Files `hinfo -t FILE` (Ganeti 3.0.2) refuses, with the start of tern's
/// message. Everything else in the folder must load. Derived by running hinfo
/// on every file: only this one fails ("Unknown node 'no-such-node' for
/// instance new-0").
const REJECTED: &[(&str, &str)] = &[(
    "invalid-node.data",
    "line 6, instance \"new-0\": field pnode: no node named \"no-such-node\"",
)];

fn data_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(data_dir())
        .expect("data/ganeti exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "data"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_file_loads_or_is_rejected_like_ganeti() {
    let files = data_files();
    assert!(
        files.len() >= 40,
        "expected Ganeti's test files, found {}",
        files.len()
    );
    for path in files {
        let name = path.file_name().unwrap().to_str().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let expected = REJECTED.iter().find(|(f, _)| *f == name).map(|(_, m)| *m);
        match (ganeti::parse(&text), expected) {
            (Ok(_), None) => {}
            (Err(e), Some(msg)) => assert!(
                e.to_string().starts_with(msg),
                "{name}: rejected with {e}, expected {msg}"
            ),
            (Ok(_), Some(msg)) => panic!("{name}: loaded, but Ganeti rejects it ({msg})"),
            (Err(e), None) => panic!("{name}: rejected ({e}), but Ganeti loads it"),
        }
    }
}

#[test]
fn loaded_files_round_trip_through_the_writer() {
    for path in data_files() {
        let text = std::fs::read_to_string(&path).unwrap();
        let Ok(cluster) = ganeti::parse(&text) else {
            continue;
        };
        let written = ganeti::serialize(&cluster);
        let again = ganeti::parse(&written)
            .unwrap_or_else(|e| panic!("{}: re-reading tern's output: {e}", path.display()));
        assert_eq!(cluster, again, "{}", path.display());
    }
}
