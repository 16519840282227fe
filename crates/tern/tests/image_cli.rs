//! `tern image build [minimal|debian]` from the command line: the manifest on stdout,
//! progress on stderr, and exit status 2 with a useful message when the cache is
//! unusable or the image kind unknown.

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

#[test]
fn an_unknown_image_kind_is_bad_input() {
    let out = tern().args(["image", "build", "fedora"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("minimal") && err.contains("debian"), "{err}");
}

#[test]
fn builds_or_reuses_the_debian_image_and_prints_its_manifest() {
    use std::os::unix::fs::MetadataExt;
    if std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() != 0) {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs the image tests as root"
        );
        eprintln!("SKIP: building the Debian image needs root");
        return;
    }
    let cache = tern_testkit::test_cache_dir();
    let out = tern()
        .args(["image", "build", "debian", "--json", "--cache"])
        .arg(&cache)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("image: ready in"), "{err}");
    let m: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(m["kind"], "debian");
    for (field, sum) in [
        ("root_disk", "root_disk_sha256"),
        ("kernel", "kernel_sha256"),
        ("initrd", "initrd_sha256"),
    ] {
        let path = m[field].as_str().unwrap();
        let out = Command::new("sha256sum").arg(path).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(m[sum].as_str(), text.split_whitespace().next(), "{field}");
    }
    let cmdline = m["cmdline"].as_str().unwrap();
    assert!(cmdline.contains("root=/dev/vda") && cmdline.contains("console=ttyS0"));
    assert_eq!(m["control_port"], "org.tern.guest");
    assert!(m["built_at"].as_str().unwrap().contains('T'));
}
