//! Prints the policy comparison table of `docs/migration-model.md`:
//! `cargo run -p tern-migrate --example compare`.

use tern_migrate::{
    mbit_per_s, simulate, simulate_pages, DirtyModel, MigrationParams, PolicyKind, MIB,
};

fn main() {
    let workloads = [
        (
            "hot 64 MiB @ 400 MB/s, cold 384 MiB @ 2 MB/s",
            64,
            400e6,
            384,
            2e6,
        ),
        (
            "hot 32 MiB @ 200 MB/s, cold 448 MiB @ 5 MB/s",
            32,
            200e6,
            448,
            5e6,
        ),
        (
            "hot 128 MiB @ 1 GB/s, cold 256 MiB @ 1 MB/s",
            128,
            1e9,
            256,
            1e6,
        ),
    ];
    println!("| workload | model | policy | total s | downtime ms | rounds | GiB sent | converged | throttle % |");
    println!("| --- | --- | --- | ---: | ---: | ---: | ---: | --- | ---: |");
    for (name, hot, hot_rate, cold, cold_rate) in workloads {
        let params =
            MigrationParams::new(512 * MIB, mbit_per_s(1000.0)).with_dirty(DirtyModel::HotCold {
                hot_bytes: hot * MIB,
                hot_rate_bytes_per_s: hot_rate,
                cold_bytes: cold * MIB,
                cold_rate_bytes_per_s: cold_rate,
            });
        for policy in [PolicyKind::Qemu, PolicyKind::Xen, PolicyKind::Adaptive] {
            for (model, o) in [
                ("analytic", simulate(&params, &policy)),
                ("pages", simulate_pages(&params, &policy, 7)),
            ] {
                let o = o.expect("valid parameters");
                println!(
                    "| {name} | {model} | {} | {:.2} | {:.0} | {} | {:.2} | {} | {} |",
                    o.policy,
                    o.total_time_s,
                    o.downtime_s * 1000.0,
                    o.rounds,
                    o.bytes_sent as f64 / (1u64 << 30) as f64,
                    o.converged,
                    o.max_throttle_percent
                );
            }
        }
    }
}
