//! Prints the policy comparison tables of `docs/migration-model.md`:
//! `cargo run -p tern-migrate --example compare`.

use tern_migrate::{
    mbit_per_s, simulate, simulate_pages, Adaptive, DirtyModel, MigrationOutcome, MigrationParams,
    Policy, PolicyKind, MIB,
};

/// (hot MiB, hot rate, cold MiB, cold rate) on a 512 MiB guest.
const WORKLOADS: [(u64, f64, u64, f64); 5] = [
    (64, 400e6, 384, 2e6),
    (128, 1e9, 256, 1e6),
    (48, 300e6, 400, 4e6),
    (96, 600e6, 160, 8e6),
    (32, 200e6, 448, 5e6),
];

fn row(workload: &str, model: &str, label: &str, o: &MigrationOutcome) {
    println!(
        "| {workload} | {model} | {label} | {:.2} | {:.0} | {} | {:.2} | {} | {} |",
        o.total_time_s,
        o.downtime_s * 1000.0,
        o.rounds,
        o.bytes_sent as f64 / (1u64 << 30) as f64,
        o.converged,
        o.max_throttle_percent
    );
}

/// Round-by-round telemetry of one migration, as a Markdown table.
fn rounds_table(o: &MigrationOutcome) {
    println!("| round | pages sent | pages changed | remaining | held back | predicted downtime ms | round ms | throttle % |");
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for r in &o.telemetry {
        println!(
            "| {} | {} | {} | {} | {} | {:.0} | {:.0} | {} |",
            r.round,
            r.pages_sent,
            r.pages_changed,
            r.remaining_pages,
            r.held_back_pages,
            r.predicted_downtime_s * 1000.0,
            r.duration_s * 1000.0,
            r.throttle_percent
        );
    }
    println!(
        "\nstop: {:?}, downtime {:.0} ms, total {:.2} s\n",
        o.stop_reason,
        o.downtime_s * 1000.0,
        o.total_time_s
    );
}

fn main() {
    let no_throttle = Adaptive {
        max_throttle_percent: 0,
        ..Adaptive::default()
    };
    let policies: [(&str, &dyn Policy); 4] = [
        ("qemu", &PolicyKind::Qemu),
        ("xen", &PolicyKind::Xen),
        ("adaptive", &PolicyKind::Adaptive),
        ("adaptive, no throttle", &no_throttle),
    ];
    let mut trace = None;
    println!("| workload (512 MiB, 1 Gbit/s) | model | policy | total s | downtime ms | rounds | GiB sent | converged | max throttle % |");
    println!("| --- | --- | --- | ---: | ---: | ---: | ---: | --- | ---: |");
    for (i, (hot, hot_rate, cold, cold_rate)) in WORKLOADS.into_iter().enumerate() {
        let name = format!(
            "hot {hot} MiB @ {} MB/s, cold {cold} MiB @ {} MB/s",
            hot_rate / 1e6,
            cold_rate / 1e6
        );
        let params =
            MigrationParams::new(512 * MIB, mbit_per_s(1000.0)).with_dirty(DirtyModel::HotCold {
                hot_bytes: hot * MIB,
                hot_rate_bytes_per_s: hot_rate,
                cold_bytes: cold * MIB,
                cold_rate_bytes_per_s: cold_rate,
            });
        if i == 0 {
            trace = Some(params.clone());
        }
        for (label, policy) in policies {
            row(
                &name,
                "analytic",
                label,
                &simulate(&params, policy).expect("valid"),
            );
            // The page-level model for the first workload, to show the two agree.
            if i == 0 {
                let o = simulate_pages(&params, policy, 7).expect("valid");
                row(&name, "pages", label, &o);
            }
        }
    }
    if let Some(params) = trace {
        println!("\nadaptive, round by round, on the first workload (analytic model):\n");
        rounds_table(&simulate(&params, &PolicyKind::Adaptive).expect("valid"));
    }
}
