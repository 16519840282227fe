//! What the tests that drive a lab through the `tern` CLI share: running `tern` with a
//! state directory of the test's own, reading its JSON, and taking the lab (and a
//! manager the test started) down however the test ends.

use std::process::{Child, Command, Output};

use serde_json::Value;

/// `tern ARGS` with `TERN_STATE` set to `state` and no ambient token or manager.
pub fn tern(state: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(args)
        .env("TERN_STATE", state)
        // The tests' image cache: a lab's agents take their image directory from it,
        // and the default one may not exist on a fresh machine.
        .env("TERN_CACHE", tern_testkit::test_cache_dir())
        .env_remove("TERN_TOKEN")
        .env_remove("TERN_MANAGER")
        .output()
        .expect("tern runs")
}

/// The JSON a successful `tern` printed.
pub fn json(o: &Output) -> Value {
    assert!(
        o.status.success(),
        "tern failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).expect("JSON on stdout")
}

/// Tears down what the test started, however it ends.
pub struct Teardown {
    pub state: std::path::PathBuf,
    pub manager: Option<Child>,
}

impl Drop for Teardown {
    fn drop(&mut self) {
        if let Some(mut m) = self.manager.take() {
            let _ = m.kill();
            let _ = m.wait();
        }
        let _ = tern(&self.state, &["lab", "down"]);
    }
}
