//! Times the analytic model as the simulator uses it:
//! `cargo run --release -p tern-migrate --example speed`.

use std::time::Instant;

use tern_migrate::{estimate, mbit_per_s, PolicyKind, MIB};

fn main() {
    let n = 100_000u32;
    for policy in PolicyKind::ALL {
        let start = Instant::now();
        let mut rounds = 0u64;
        for i in 0..n {
            // 256 MiB to 8 GiB guests dirtying 0 to 100 MB/s over 1 Gbit/s.
            let memory = (256 + u64::from(i % 32) * 256) * MIB;
            let rate = f64::from(i % 100) * 1e6;
            let e = estimate(memory, rate, mbit_per_s(1000.0), &policy).expect("valid");
            rounds += u64::from(e.rounds);
        }
        let per = start.elapsed().as_secs_f64() / f64::from(n);
        println!(
            "{policy}: {:.2} us per estimate, {:.1} rounds on average",
            per * 1e6,
            rounds as f64 / f64::from(n)
        );
    }
}
