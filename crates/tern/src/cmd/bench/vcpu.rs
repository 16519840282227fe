//! `tern bench vcpu`: two 2-vCPU guests running `barrier` on one lab host, under each
//! vCPU scheduling policy (`none`, `pin`, `gang`), the order rotating over the rounds
//! (the host's placement of threads varies run to run). Each run reports each VM's
//! barriers per second over the run, measured from the guest's own counter between two
//! host-timed reads, and, from a host trace of the same seconds, the share of time both
//! of its vCPUs ran together (`corun_share`).

use std::time::{Duration, Instant};

use anyhow::bail;
use serde::Serialize;
use serde_json::Value;
use tern_agent::client::AgentClient;
use tern_agent::vms::CreateVm;
use tern_api::guest::{Command as GuestCommand, WorkloadSpec};
use tern_api::trace::TraceRequest;
use tern_api::vcpu::VcpuPolicy;
use tern_trace::merge::{guest_timeline, summarize_guest};
use tern_trace::VcpuMap;

use super::migration::median;
use crate::cmd::bad_input;

/// What `double_sched_delay_ms` measures.
pub const DELAY_NOTE: &str = "double_sched_delay_ms: over the run's trace, the time the \
     guest's processes were runnable on a vCPU whose host thread was not running, summed \
     over the guest's processes (guest and host scheduler events, clocks aligned)";

/// The two guests of the experiment.
const VMS: [&str; 2] = ["vcpu-a", "vcpu-b"];

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Rounds; each runs every policy once, in an order rotated by one per round.
    #[arg(long, default_value_t = 5)]
    pub rounds: u32,
    /// Seconds each run measures (and traces).
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Memory of each guest, MiB.
    #[arg(long, default_value_t = 256)]
    pub memory_mib: u64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// One VM in one run.
#[derive(Clone, Debug, Serialize)]
pub struct Run {
    pub policy: VcpuPolicy,
    pub round: u32,
    pub vm: String,
    pub barriers_per_s: f64,
    /// Of the time at least one of the VM's vCPUs ran, the share both ran (host trace).
    pub corun_share: Option<f64>,
    /// See [`DELAY_NOTE`]; empty when the guest level could not be recorded.
    pub double_sched_delay_ms: Option<f64>,
    /// Records the kernel could not write, and records not kept, in the run's trace.
    pub lost: u64,
    pub dropped: u64,
}

/// Medians over the runs of one policy (both VMs, every round).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Median {
    pub policy: VcpuPolicy,
    pub barriers_per_s: f64,
    pub corun_share: Option<f64>,
    pub double_sched_delay_ms: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub runs: Vec<Run>,
    pub medians: Vec<Median>,
    /// `gang`'s median barrier rate over `none`'s (the goal is at least 1.5).
    pub gang_over_none: Option<f64>,
    pub double_sched_delay_note: &'static str,
}

/// The policies of round `round`: all three, rotated by `round` (pure).
pub fn round_order(round: u32) -> [VcpuPolicy; 3] {
    let mut p = VcpuPolicy::ALL;
    p.rotate_left(round as usize % VcpuPolicy::ALL.len());
    p
}

/// Barriers per second between two reads of the guest's counter (pure).
pub fn rate(before: u64, after: u64, elapsed: Duration) -> f64 {
    let s = elapsed.as_secs_f64();
    if s <= 0.0 {
        return 0.0;
    }
    after.saturating_sub(before) as f64 / s
}

/// The medians per policy, in [`VcpuPolicy::ALL`]'s order (pure).
pub fn medians(runs: &[Run]) -> Vec<Median> {
    VcpuPolicy::ALL
        .into_iter()
        .filter_map(|policy| {
            let of = runs.iter().filter(|r| r.policy == policy);
            let mut rates: Vec<f64> = of.clone().map(|r| r.barriers_per_s).collect();
            if rates.is_empty() {
                return None;
            }
            rates.sort_by(f64::total_cmp);
            let sorted = |f: fn(&Run) -> Option<f64>| {
                let mut v: Vec<f64> = of.clone().filter_map(f).collect();
                v.sort_by(f64::total_cmp);
                (!v.is_empty()).then(|| median(&v))
            };
            Some(Median {
                policy,
                barriers_per_s: median(&rates),
                corun_share: sorted(|r| r.corun_share),
                double_sched_delay_ms: sorted(|r| r.double_sched_delay_ms),
            })
        })
        .collect()
}

/// `gang`'s median rate over `none`'s (pure).
pub fn gang_over_none(m: &[Median]) -> Option<f64> {
    let of = |p| m.iter().find(|x| x.policy == p).map(|x| x.barriers_per_s);
    match (of(VcpuPolicy::Gang), of(VcpuPolicy::None)) {
        (Some(g), Some(n)) if n > 0.0 => Some(g / n),
        _ => None,
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.rounds == 0 {
        return Err(bad_input("--rounds must be at least 1"));
    }
    if !(args.seconds.is_finite() && (0.5..=600.0).contains(&args.seconds)) {
        return Err(bad_input("--seconds must be within 0.5..=600"));
    }
    if args.memory_mib < 64 {
        return Err(bad_input("--memory-mib must be at least 64"));
    }
    let runs = super::with_lab(1, None, args.memory_mib * 3, async |lab, img, _| {
        let host = lab.client(
            &lab.hosts[0].url,
            Duration::from_secs(args.seconds as u64 + 60),
        )?;
        bench(&host, img, &args).await
    })?;
    let medians = medians(&runs);
    let report = Report {
        gang_over_none: gang_over_none(&medians),
        medians,
        runs,
        double_sched_delay_note: DELAY_NOTE,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

fn print_table(r: &Report) {
    println!("policy  round  vm       barriers/s  co-run   delay");
    let share = |s: Option<f64>| s.map_or("-".into(), |s| format!("{:.1} %", s * 100.0));
    for x in &r.runs {
        println!(
            "{:<7} {:>5}  {:<8} {:>10.0}  {:<7}  {}",
            x.policy.name(),
            x.round,
            x.vm,
            x.barriers_per_s,
            share(x.corun_share),
            x.double_sched_delay_ms
                .map_or("-".into(), |d| format!("{d:.0} ms"))
        );
    }
    println!("medians:");
    for m in &r.medians {
        println!(
            "{:<7} {:>10.0} barriers/s, co-run {}, delay {}",
            m.policy.name(),
            m.barriers_per_s,
            share(m.corun_share),
            m.double_sched_delay_ms
                .map_or("-".into(), |d| format!("{d:.0} ms"))
        );
    }
    if let Some(g) = r.gang_over_none {
        println!("gang / none: {g:.2}x (goal 1.5x)");
    }
    println!("{}", r.double_sched_delay_note);
}

/// One request to `vm`'s guest agent, retried for three minutes while it does not
/// answer (booting); its `result`.
pub(super) async fn guest(
    host: &AgentClient,
    vm: &str,
    req: GuestCommand,
) -> anyhow::Result<Value> {
    let t0 = Instant::now();
    loop {
        match host.guest(vm, &req).await {
            Ok(a) if a["ok"] == true => return Ok(a["result"].clone()),
            Ok(a) => bail!("guest {vm} answered {a}"),
            Err(e) if t0.elapsed() < Duration::from_secs(180) => {
                tracing::debug!(error = %e, "guest not answering yet");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Err(e) => bail!("guest {vm} does not answer: {e}"),
        }
    }
}

/// The barriers the guest's `barrier` workload has passed so far.
async fn barriers(host: &AgentClient, vm: &str) -> anyhow::Result<u64> {
    let st = guest(host, vm, GuestCommand::Status).await?;
    st["workloads"]
        .as_array()
        .and_then(|w| w.iter().find(|w| w["name"] == "barrier"))
        .and_then(|w| w["work"].as_u64())
        .ok_or_else(|| anyhow::anyhow!("guest {vm} runs no barrier workload: {st}"))
}

async fn bench(
    host: &AgentClient,
    img: &tern_hv::image::GuestImage,
    args: &Args,
) -> anyhow::Result<Vec<Run>> {
    for vm in VMS {
        eprintln!("bench: booting {vm} (2 vCPUs)");
        host.create_vm(&CreateVm {
            id: vm.parse()?,
            spec: img.vm_spec(2, args.memory_mib, vm),
            start: true,
            reuse_disks: false,
        })
        .await?;
    }
    for vm in VMS {
        guest(host, vm, GuestCommand::Ping).await?;
        let workload = WorkloadSpec::Barrier { threads: 2 };
        guest(host, vm, GuestCommand::Start { workload }).await?;
    }
    let window = Duration::from_secs_f64(args.seconds);
    let mut runs = Vec::new();
    for round in 1..=args.rounds {
        for policy in round_order(round - 1) {
            for vm in VMS {
                host.set_vcpu_policy(vm, policy).await?;
            }
            // Let the threads settle where the policy put them.
            tokio::time::sleep(Duration::from_secs(1)).await;
            let t0 = Instant::now();
            let before = [barriers(host, VMS[0]).await?, barriers(host, VMS[1]).await?];
            let req = TraceRequest {
                duration_ms: window.as_millis() as u64,
                host_only: false,
            };
            let (ta, tb) = tokio::join!(host.trace(VMS[0], &req), host.trace(VMS[1], &req));
            let after = [barriers(host, VMS[0]).await?, barriers(host, VMS[1]).await?];
            let elapsed = t0.elapsed();
            for (i, t) in [ta?, tb?].into_iter().enumerate() {
                let vcpus = VcpuMap::from_threads(&t.vcpu_threads);
                let (tl, summary) = tern_trace::analyse(&t.trace, &vcpus);
                let delay = t
                    .guest
                    .as_ref()
                    .map(|g| summarize_guest(&guest_timeline(g), g, &tl, &vcpus));
                let r = Run {
                    policy,
                    round,
                    vm: VMS[i].to_string(),
                    barriers_per_s: rate(before[i], after[i], elapsed),
                    corun_share: summary.corun_share,
                    double_sched_delay_ms: delay
                        .as_ref()
                        .map(|d| d.double_sched_delay_ns as f64 / 1e6),
                    lost: summary.lost + delay.as_ref().map_or(0, |d| d.lost),
                    dropped: summary.dropped + delay.as_ref().map_or(0, |d| d.dropped),
                };
                eprintln!("bench: {r:?}");
                runs.push(r);
            }
        }
    }
    for vm in VMS {
        let _ = host.set_vcpu_policy(vm, VcpuPolicy::None).await;
        let _ = host.delete_vm(vm).await;
    }
    Ok(runs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(policy: VcpuPolicy, rate: f64, share: Option<f64>) -> Run {
        Run {
            policy,
            round: 1,
            vm: "v".into(),
            barriers_per_s: rate,
            corun_share: share,
            double_sched_delay_ms: None,
            lost: 0,
            dropped: 0,
        }
    }

    #[test]
    fn every_round_runs_each_policy_once_and_the_order_rotates() {
        let firsts: Vec<_> = (0..3).map(|k| round_order(k)[0]).collect();
        assert_eq!(firsts, VcpuPolicy::ALL);
        for k in 0..7 {
            let mut o = round_order(k).to_vec();
            o.sort_by_key(|p| p.name());
            assert_eq!(o, [VcpuPolicy::Gang, VcpuPolicy::None, VcpuPolicy::Pin]);
        }
    }

    #[test]
    fn rates_and_medians() {
        assert_eq!(rate(100, 400, Duration::from_secs(2)), 150.0);
        assert_eq!(rate(400, 100, Duration::from_secs(2)), 0.0);
        assert_eq!(rate(0, 5, Duration::ZERO), 0.0);
        let runs = [
            r(VcpuPolicy::None, 10.0, Some(0.1)),
            r(VcpuPolicy::None, 30.0, None),
            r(VcpuPolicy::None, 20.0, Some(0.3)),
            r(VcpuPolicy::Gang, 45.0, Some(0.9)),
        ];
        let m = medians(&runs);
        assert_eq!(m.len(), 2, "pin has no runs: {m:?}");
        assert_eq!(
            m[0],
            Median {
                policy: VcpuPolicy::None,
                barriers_per_s: 20.0,
                corun_share: Some(0.2),
                double_sched_delay_ms: None
            }
        );
        assert_eq!(gang_over_none(&m), Some(2.25));
        assert_eq!(gang_over_none(&m[..1]), None);
    }
}
