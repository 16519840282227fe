//! The recorder on a real VM: tern's guest image booted under QEMU (TCG here, where
//! `kvm_entry` never fires), its vCPU threads from QMP `query-cpus-fast`, recorded for
//! 2 s, turned into a timeline, a summary and a Perfetto trace.

use std::time::Duration;
use tern_hv::qemu::{QemuConfig, QemuDriver};
use tern_hv::{Hypervisor, VmSpec};
use tern_trace::chrome::{self, Export};
use tern_trace::{analyse, RecorderConfig, State, VcpuMap};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guests_vcpu_threads_are_traced_for_two_seconds() {
    if !tern_testkit::require_qemu() || !tern_testkit::is_root() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs as root with QEMU"
        );
        eprintln!("SKIP: needs root and QEMU");
        return;
    }
    let img = tern_hv::image::ensure_image_async(tern_testkit::test_cache_dir(), |s| {
        eprintln!("image: {s}")
    })
    .await
    .expect("guest image builds");
    let dir = tempfile::tempdir().unwrap();
    let hv = QemuDriver::new(QemuConfig::new(
        dir.path().join("run"),
        dir.path().join("mem"),
        None,
    ));
    let spec: VmSpec = serde_json::from_value(serde_json::json!({
        "vcpus": 2,
        "memory_mib": 256,
        "kernel": img.kernel,
        "initramfs": img.initramfs,
        "cmdline": format!("{} tern.hostname=t1", img.cmdline),
    }))
    .unwrap();
    hv.create("t1", spec, false).await.unwrap();
    hv.start("t1").await.unwrap();
    let threads = hv.vcpu_threads("t1").await.unwrap();
    assert_eq!(threads.len(), 2);
    // Let the kernel bring up its second vCPU (TCG boots to userspace in about 5 s).
    tokio::time::sleep(Duration::from_secs(6)).await;

    let cfg = RecorderConfig {
        kvm: true,
        ..RecorderConfig::new(threads.clone())
    };
    let trace =
        tokio::task::spawn_blocking(move || tern_trace::record(&cfg, Duration::from_secs(2)))
            .await
            .unwrap()
            .unwrap();
    hv.destroy("t1").await.unwrap();

    let secs = (trace.end_ns - trace.start_ns) as f64 / 1e9;
    eprintln!(
        "{} events in {secs:.2} s ({:.0}/s), lost {}, dropped {}, kvm tracepoints {}",
        trace.events.len(),
        trace.events.len() as f64 / secs,
        trace.lost,
        trace.dropped,
        trace.kvm_events
    );
    assert!((1.9..3.0).contains(&secs), "recorded {secs} s");
    assert_eq!(trace.lost, 0, "a 1 MiB ring per CPU holds 2 s of two vCPUs");
    let vcpus = VcpuMap::from_threads(&threads);
    let (tl, summary) = analyse(&trace, &vcpus);
    for t in &summary.threads {
        eprintln!("{t:?}");
        assert!(t.vcpu.is_some());
        assert_eq!(
            t.run_ns + t.runnable_ns + t.sleep_ns + t.unknown_ns,
            summary.window_ns
        );
        // An idle guest halts between timer ticks: each vCPU runs and sleeps, often.
        assert!(t.run_ns > 0 && t.runs >= 10, "{t:?}");
        assert!(t.sleep_ns > 0, "{t:?}");
    }
    eprintln!(
        "cpus {:?}, co-run share {:?}, anomalies {}",
        summary.cpus, summary.corun_share, summary.anomalies
    );
    for cpu in tl.cpus() {
        let runs = tl.runs_on(cpu);
        assert!(runs.windows(2).all(|w| w[0].end_ns <= w[1].start_ns));
    }
    assert!(tl
        .spans
        .iter()
        .any(|s| matches!(s.state, State::Running { .. })));

    let path = dir.path().join("trace.json");
    let file = std::fs::File::create(&path).unwrap();
    chrome::write(
        std::io::BufWriter::new(file),
        &Export {
            host: "local",
            vm: "t1",
            timeline: &tl,
            vcpus: &vcpus,
            summary: &summary,
            guest: None,
        },
    )
    .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let evs = v["traceEvents"].as_array().unwrap();
    for name in ["vCPU 0", "vCPU 1"] {
        assert!(
            evs.iter()
                .any(|e| e["ph"] == "X" && e["pid"] == 1 && e["name"] == name),
            "{name} on a CPU track"
        );
    }
    eprintln!(
        "trace.json: {} events, {} bytes",
        evs.len(),
        std::fs::metadata(&path).unwrap().len()
    );
}
