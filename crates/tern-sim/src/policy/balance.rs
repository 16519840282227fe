//! `balance`: the live manager's balancing round, exactly: every interval the simulator
//! state becomes the balancer's view and `tern_balance::round::plan` plans and filters
//! the moves (cost/benefit, per-host and cluster limits, aggressiveness, cooldown) under
//! the manager's settings (the JSON of `GET /v1/balancer`). `spread` is the bare planner
//! without that filter.
//!
//! How the simulator maps onto the manager's view: hosts that run a VM are the active
//! hosts (an empty host is switched off, as for `spread`, and receives none); CPU is in
//! cores of 1000 MIPS and every VM's demand is measured; memory is each VM type's RAM;
//! a migrating VM counts on its destination, is not moved again and holds a slot on both
//! hosts; a VM's last completed migration starts its cooldown. The settings' own interval
//! is not used: the simulator's scheduling interval paces the rounds. A disabled or
//! dry-run balancer starts no migration, as in the manager.

use std::collections::HashMap;

use tern_balance::round::{self, BalancerSettings, RecentMove};

use super::{Move, Policy};
use crate::imbalance::{cpu_cores, MIPS_PER_CORE};
use crate::state::State;

pub struct Balance {
    settings: BalancerSettings,
}

impl Balance {
    pub fn new(settings: BalancerSettings) -> Balance {
        Balance { settings }
    }
}

impl Default for Balance {
    fn default() -> Self {
        Balance::new(BalancerSettings::default())
    }
}

impl Policy for Balance {
    fn name(&self) -> &'static str {
        "balance"
    }

    fn plan(&mut self, state: &State, now: f64) -> Vec<Move> {
        let s = &self.settings;
        if !s.enabled || s.dry_run {
            return Vec::new();
        }
        let (snap, history) = view(state, s, now);
        let planned = round::plan(&snap, s, &history, millis(now));
        let host_of: HashMap<&str, u32> = snap
            .hosts
            .iter()
            .enumerate()
            .map(|(h, x)| (x.name.as_str(), h as u32))
            .collect();
        // The view lists the running VMs in index order.
        let vm_of: HashMap<&str, u32> = snap
            .vms
            .iter()
            .zip((0..state.vms()).filter(|&v| state.is_running(v)))
            .map(|(x, v)| (x.name.as_str(), v as u32))
            .collect();
        planned
            .moves
            .iter()
            .filter_map(|m| {
                Some(Move {
                    vm: *vm_of.get(m.vm.as_str())?,
                    to: *host_of.get(m.to.as_str())?,
                })
            })
            .collect()
    }
}

fn millis(t: f64) -> round::Millis {
    (t * 1000.0).round() as round::Millis
}

/// Names padded so that name order is index order, as the manager lists them.
pub fn vm_name(v: usize) -> String {
    format!("vm-{v:07}")
}

pub fn host_name(h: usize) -> String {
    format!("host-{h:06}")
}

/// The balancer's view of the simulator state at `now` (see the module doc), and the
/// moves still within the cooldown as its history. Hosts and VMs are named by
/// [`host_name`] and [`vm_name`].
pub fn view(
    state: &State,
    settings: &BalancerSettings,
    now: f64,
) -> (round::Snapshot, Vec<RecentMove>) {
    let hosts = (0..state.hosts())
        .map(|h| {
            let ht = state.spec.host(h);
            round::Host {
                name: host_name(h),
                cpus: ht.mips() / MIPS_PER_CORE,
                memory_mib: ht.ram_mb as u64,
                active: !state.host_vms[h].is_empty(),
            }
        })
        .collect();
    let mut vms = Vec::new();
    let mut in_flight = Vec::new();
    for v in (0..state.vms()).filter(|&v| state.is_running(v)) {
        let migrating = state.is_migrating(v);
        let host = if migrating {
            let (from, to) = (state.vm_host[v], state.vm_dest[v]);
            in_flight.push(round::InFlight {
                from: host_name(from as usize),
                to: host_name(to as usize),
            });
            to
        } else {
            state.vm_host[v]
        };
        vms.push(round::Vm {
            name: vm_name(v),
            host: Some(host_name(host as usize)),
            vcpus: 1,
            memory_mib: state.spec.vm(v).ram_mb as u64,
            cpu_used: cpu_cores(state, v),
            cpu_measured: true,
            movable: !migrating,
            anti_affinity: None,
        });
    }
    // A second of slack: the round itself applies the cooldown to the millisecond.
    let cooldown_s = settings.cooldown_s as f64 + 1.0;
    let history = state
        .vm_last_moved
        .iter()
        .enumerate()
        .filter_map(|(v, t)| {
            let t = (*t)?;
            (now - t < cooldown_s).then(|| RecentMove {
                vm: vm_name(v),
                at: millis(t),
            })
        })
        .collect();
    (
        round::Snapshot {
            hosts,
            vms,
            in_flight,
        },
        history,
    )
}
