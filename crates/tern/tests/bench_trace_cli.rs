//! `tern bench trace` refuses bad flags with exit status 2, naming the flag, before it
//! looks for perf or builds a lab.

use std::process::Command;

fn tern(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn bad_flags_exit_2_naming_the_flag() {
    let cases: [(&[&str], &str); 7] = [
        (&["--rounds", "0"], "--rounds"),
        (&["--rounds", "101"], "--rounds"),
        (&["--seconds", "0.1"], "--seconds"),
        (&["--seconds", "nan"], "--seconds"),
        (&["--threads", "1"], "--threads"),
        (&["--threads", "257"], "--threads"),
        (&["--memory-mib", "8"], "--memory-mib"),
    ];
    for (flags, names) in cases {
        let mut args = vec!["bench", "trace"];
        args.extend_from_slice(flags);
        let out = tern(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {err}");
        assert!(err.contains(names), "{flags:?}: {err}");
        assert!(out.stdout.is_empty(), "{flags:?}");
    }
    // Not a number at all: clap's own refusal, also 2.
    let out = tern(&["bench", "trace", "--rounds", "many"]);
    assert_eq!(out.status.code(), Some(2));
}
