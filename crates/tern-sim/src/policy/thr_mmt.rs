//! `thr-mmt`: CloudSim's static-threshold consolidation with minimum-migration-time VM
//! selection (`PowerVmAllocationPolicyMigrationStaticThreshold` with
//! `PowerVmSelectionPolicyMinimumMigrationTime`), step by step:
//!
//! 1. Hosts whose VMs ask for more than `threshold` of the CPU are overloaded. From each,
//!    take the VM with the least RAM (the quickest to migrate) until it no longer is.
//! 2. Place those VMs, largest demand first, with power-aware best fit on the other hosts.
//! 3. Walk the remaining active hosts from the least utilised up; try to place all VMs of
//!    each elsewhere (never on overloaded, switched-off or already emptied hosts). If all
//!    fit, the host is emptied and will switch off; if one does not, nothing moves.
//!
//! Hosts with a migration in flight into them, or whose VMs are all leaving, are skipped
//! in step 3, and migrating VMs are never picked.

use super::{Move, Policy};
use crate::placement::Scratch;
use crate::state::State;

pub struct ThrMmt {
    threshold: f64,
}

impl ThrMmt {
    pub fn new(threshold: f64) -> ThrMmt {
        ThrMmt { threshold }
    }
}

impl Policy for ThrMmt {
    fn name(&self) -> &'static str {
        "thr-mmt"
    }

    fn plan(&mut self, state: &State, _now: f64) -> Vec<Move> {
        plan(state, self.threshold)
    }
}

fn plan(state: &State, threshold: f64) -> Vec<Move> {
    let n = state.hosts();
    let mut scratch = Scratch::new(state, threshold);
    let overloaded: Vec<bool> = (0..n).map(|h| scratch.is_overloaded(h)).collect();
    let mut to_move: Vec<(u32, usize)> = Vec::new();
    for h in (0..n).filter(|&h| overloaded[h]) {
        let mut left: Vec<u32> = state.host_vms[h]
            .iter()
            .copied()
            .filter(|&v| !state.is_migrating(v as usize))
            .collect();
        while let Some(i) = min_ram(state, &left) {
            let v = left.remove(i);
            scratch.remove(h, v as usize, state.vm_requested[v as usize]);
            to_move.push((v, h));
            if !scratch.is_overloaded(h) {
                break;
            }
        }
    }
    sort_by_demand(state, &mut to_move);
    let mut moves = Vec::new();
    // Moves of step 2 by destination: step 3 may empty such a host again, and then
    // the VMs on their way there go to the new place instead.
    let mut arriving: Vec<Vec<usize>> = vec![Vec::new(); n];
    for &(v, _) in &to_move {
        let mips = state.vm_requested[v as usize];
        if let Some(d) = scratch.find_host(v as usize, mips, &overloaded, true) {
            scratch.add(d, v as usize, mips);
            arriving[d].push(moves.len());
            moves.push(Move {
                vm: v,
                to: d as u32,
            });
        }
    }

    // Step 3: consolidation of underloaded hosts.
    let mut skip_source: Vec<bool> = (0..n)
        .map(|h| overloaded[h] || !state.is_active(h))
        .collect();
    let mut skip_target: Vec<bool> = (0..n)
        .map(|h| overloaded[h] || !state.is_active(h))
        .collect();
    let mut candidates: Vec<u32> = (0..n as u32)
        .filter(|&h| {
            let h = h as usize;
            state.is_active(h)
                && state.host_incoming[h].is_empty()
                && !state.host_vms[h]
                    .iter()
                    .all(|&v| state.is_migrating(v as usize))
        })
        .collect();
    candidates.sort_by(|&a, &b| {
        state
            .utilisation(a as usize)
            .total_cmp(&state.utilisation(b as usize))
            .then(a.cmp(&b))
    });
    let mut tentative: Vec<(u32, usize, usize)> = Vec::new();
    for h in candidates {
        let h = h as usize;
        if skip_source[h] {
            continue;
        }
        skip_source[h] = true;
        skip_target[h] = true;
        // (VM, index of its step-2 move or usize::MAX for a VM running here)
        let mut vms: Vec<(u32, usize)> = state.host_vms[h]
            .iter()
            .copied()
            .filter(|&v| !state.is_migrating(v as usize))
            .map(|v| (v, usize::MAX))
            .chain(arriving[h].iter().map(|&i| (moves[i].vm, i)))
            .collect();
        if vms.is_empty() {
            continue;
        }
        sort_by_demand(state, &mut vms);
        tentative.clear();
        for &(v, step2) in &vms {
            let mips = state.vm_requested[v as usize];
            match scratch.find_host(v as usize, mips, &skip_target, false) {
                Some(d) => {
                    scratch.add(d, v as usize, mips);
                    tentative.push((v, d, step2));
                }
                None => {
                    for &(tv, td, _) in &tentative {
                        scratch.remove(td, tv as usize, state.vm_requested[tv as usize]);
                    }
                    tentative.clear();
                    break;
                }
            }
        }
        for &(v, d, step2) in &tentative {
            skip_source[d] = true;
            if step2 == usize::MAX {
                moves.push(Move {
                    vm: v,
                    to: d as u32,
                });
            } else {
                moves[step2].to = d as u32;
            }
        }
    }
    moves
}

/// Index in `vms` of the VM with the least RAM (the first such on ties).
fn min_ram(state: &State, vms: &[u32]) -> Option<usize> {
    let mut best: Option<(f64, usize)> = None;
    for (i, &v) in vms.iter().enumerate() {
        let ram = state.spec.vm(v as usize).ram_mb;
        if best.is_none_or(|(r, _)| ram < r) {
            best = Some((ram, i));
        }
    }
    best.map(|(_, i)| i)
}

/// Largest demand first, stable so equal demands keep their order.
fn sort_by_demand(state: &State, vms: &mut [(u32, usize)]) {
    vms.sort_by(|a, b| {
        state.vm_requested[b.0 as usize].total_cmp(&state.vm_requested[a.0 as usize])
    });
}
