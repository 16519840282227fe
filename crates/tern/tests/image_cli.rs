//! `tern image build` from the command line: the manifest on stdout, progress on
//! stderr, and exit status 2 with a useful message when the cache is unusable.

use std::process::Command;

fn tern() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tern"))
}

#[test]
fn an_unwritable_cache_is_bad_input() {
    // A directory under a regular file can never be created, even by root.
    let file = tempfile::NamedTempFile::new().unwrap();
    let out = tern()
        .args(["image", "build", "--json"])
        .env("TERN_CACHE", file.path().join("cache"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not writable") && err.contains("TERN_CACHE"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn builds_or_reuses_the_image_and_prints_its_manifest() {
    let apt = Command::new("apt-cache").arg("--version").output().is_ok();
    if !apt {
        assert!(
            std::env::var_os("CI").is_none(),
            "apt-cache is missing under CI"
        );
        eprintln!("SKIP: apt-cache is not installed (not a Debian host)");
        return;
    }
    let cache = tern_testkit::test_cache_dir();
    let out = tern()
        .args(["image", "build", "--json", "--cache"])
        .arg(&cache)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("image: ready in"),
        "progress goes to stderr: {err}"
    );
    let manifest: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for field in ["kernel", "initramfs", "manifest"] {
        let path = manifest[field].as_str().unwrap();
        assert!(std::path::Path::new(path).is_file(), "{field} {path}");
    }
    assert!(manifest["kernel_version"]
        .as_str()
        .unwrap()
        .ends_with("-cloud-amd64"));
    assert_eq!(manifest["control_port"], "org.tern.guest");
}
