//! `tern bench lifecycle` refuses bad flags with exit status 2, naming the flag, before
//! it builds an image or a lab.

use std::process::Command;

fn tern(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn bad_flags_exit_2_naming_the_flag() {
    let cases: [(&[&str], &str); 5] = [
        (&["--disk-mib", "0"], "--disk-mib"),
        (&["--disk-mib", "63"], "--disk-mib"),
        (&["--disk-mib", "65537"], "--disk-mib"),
        (&["--disk-mib", "big"], "--disk-mib"),
        (&["--link-mbit", "0"], "--link-mbit"),
    ];
    for (flags, names) in cases {
        let mut args = vec!["bench", "lifecycle"];
        args.extend_from_slice(flags);
        let out = tern(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {err}");
        assert!(err.contains(names), "{flags:?}: {err}");
        assert!(out.stdout.is_empty(), "{flags:?}");
    }
    let out = tern(&["bench", "lifecycle", "--no-such-flag"]);
    assert_eq!(out.status.code(), Some(2));
}
