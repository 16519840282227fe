//! Teardown that yields the CPU: ending a VM's process and freeing its memory file is
//! work nobody waits on while a guest does, and on a host with few cores it would
//! otherwise take CPU time from the guests still running there (a migrated guest's
//! first moments on a host that shares the cores included). Unmapping an agent's own
//! view of guest memory is not done here: a lowered thread holding the agent's memory
//! map lock would hold up the agent's other threads.

use std::path::PathBuf;

use rustix::process::{setpriority_process, Pid};

/// The lowest priority a normal thread can have.
const NICE: i32 = 19;

/// Lowers the calling thread to [`NICE`]. Linux keeps the nice value per thread, so this
/// touches no other thread of the process.
fn lower_this_thread() {
    let _ = setpriority_process(Some(rustix::thread::gettid()), NICE);
}

/// Lowers every thread of process `pid` to [`NICE`] (best effort: a thread that ends
/// meanwhile is skipped): what it does from now on, its exit included, takes only CPU
/// time nothing else wants.
pub fn lower_process(pid: u32) {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return;
    };
    for t in tasks.flatten() {
        let tid = t.file_name().to_str().and_then(|s| s.parse::<i32>().ok());
        if let Some(tid) = tid.and_then(Pid::from_raw) {
            let _ = setpriority_process(Some(tid), NICE);
        }
    }
}

/// Runs `f` on a thread of its own at [`NICE`] and waits for it without holding up the
/// async runtime. `None` when the thread could not start or panicked (then `f` may not
/// have run).
async fn in_background<R: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> R + Send + 'static,
) -> Option<R> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let started = std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            lower_this_thread();
            let _ = tx.send(f());
        });
    match started {
        Ok(_) => rx.await.ok(),
        Err(_) => None,
    }
}

/// Removes `path` in the background: unlinking a memory file frees its pages, tens of
/// milliseconds of kernel time for hundreds of MB.
pub async fn remove_file(path: PathBuf) -> Option<std::io::Result<()>> {
    in_background("tern-remove", move || std::fs::remove_file(&path)).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::process::getpriority_process;

    fn nice_of(pid: Pid) -> i32 {
        getpriority_process(Some(pid)).unwrap()
    }

    #[tokio::test]
    async fn background_work_runs_at_the_lowest_priority_and_leaves_the_caller_alone() {
        let me = rustix::thread::gettid();
        let before = nice_of(me);
        let nice = in_background("t", || nice_of(rustix::thread::gettid())).await;
        assert_eq!(nice, Some(NICE));
        assert_eq!(
            nice_of(me),
            before,
            "the caller's own priority is untouched"
        );
    }

    #[tokio::test]
    async fn a_file_is_removed_and_a_missing_one_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("mem");
        std::fs::write(&p, vec![1u8; 1 << 20]).unwrap();
        assert!(remove_file(p.clone()).await.unwrap().is_ok());
        assert!(!p.exists());
        assert!(remove_file(p).await.unwrap().is_err());
    }

    #[test]
    fn a_child_process_is_lowered_thread_by_thread() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        lower_process(child.id());
        let pid = Pid::from_raw(child.id() as i32).unwrap();
        assert_eq!(nice_of(pid), NICE);
        child.kill().unwrap();
        let _ = child.wait();
    }
}
