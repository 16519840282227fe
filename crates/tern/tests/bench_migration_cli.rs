//! `tern bench migration` refuses bad flags before it builds a lab.

use std::process::Command;

fn tern(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn zero_repetitions_exit_2_naming_the_flag() {
    let out = tern(&["bench", "migration", "--repeat", "0"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--repeat"), "{err}");
    assert!(out.stdout.is_empty());
}
