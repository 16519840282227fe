//! CloudSim's power-aware best fit (`PowerVmAllocationPolicyMigrationAbstract.findHostForVm`)
//! over a scratch copy of the cluster that a policy may change tentatively.
//!
//! A VM goes to the host whose power draw grows least when the VM is added, among hosts
//! with a core as fast as the VM's demand, free CPU, RAM and bandwidth, that stay under
//! the overload threshold (an idle host always qualifies) and under 100 %. Ties go to the
//! lowest host index.
//!
//! Speed: hosts that are empty and idle ("pristine") are interchangeable within a host
//! type, so only the lowest-numbered pristine host of each type is evaluated. A search
//! then costs O(busy hosts + host types), not O(hosts).

use std::collections::BTreeSet;

use crate::state::{State, MIGRATION_DEST_SHARE, NO_HOST};

/// The cluster as one optimisation step sees and tentatively changes it.
pub struct Scratch<'a> {
    state: &'a State,
    threshold: f64,
    /// Requested MIPS of all VMs on the host (CloudSim's over-utilisation test).
    requested: Vec<f64>,
    /// CloudSim's `getUtilizationOfCpuMips`: delivered MIPS, incoming VMs at full demand.
    used: Vec<f64>,
    reserved: Vec<f64>,
    ram_free: Vec<f64>,
    bw_free: Vec<f64>,
    /// Power at the utilisation of the last update; fixed during one step.
    watts_now: Vec<f64>,
    pristine: Vec<BTreeSet<u32>>,
    is_pristine: Vec<bool>,
    busy: Vec<u32>,
}

impl<'a> Scratch<'a> {
    /// A scratch copy of `state`. `threshold` is the utilisation above which a host is
    /// overloaded (1.0 disables the test).
    pub fn new(state: &'a State, threshold: f64) -> Scratch<'a> {
        let n = state.hosts();
        let mut used = state.host_used_mips.clone();
        for (h, u) in used.iter_mut().enumerate() {
            let core = state.spec.host(h).core_mips;
            for &v in &state.host_incoming[h] {
                let r = state.vm_requested[v as usize].min(core);
                *u += r * (1.0 - MIGRATION_DEST_SHARE);
            }
        }
        let mut pristine = vec![BTreeSet::new(); state.spec.host_types.len()];
        let mut is_pristine = vec![false; n];
        let mut busy = Vec::new();
        let mut ram_free = Vec::with_capacity(n);
        let mut bw_free = Vec::with_capacity(n);
        let mut watts_now = Vec::with_capacity(n);
        for h in 0..n {
            let ht = state.spec.host(h);
            ram_free.push(ht.ram_mb - state.host_ram_used[h]);
            bw_free.push(ht.link_mbps - state.host_bw_used[h]);
            watts_now.push(ht.power.watts_at(state.utilisation(h)));
            let empty = state.host_vms[h].is_empty() && state.host_incoming[h].is_empty();
            if empty && used[h] == 0.0 {
                is_pristine[h] = true;
                pristine[usize::from(state.spec.hosts[h])].insert(h as u32);
            } else {
                busy.push(h as u32);
            }
        }
        Scratch {
            state,
            threshold,
            requested: state.host_requested.clone(),
            reserved: state.host_reserved_mips.clone(),
            used,
            ram_free,
            bw_free,
            watts_now,
            pristine,
            is_pristine,
            busy,
        }
    }

    pub fn state(&self) -> &State {
        self.state
    }

    /// Requested MIPS on the host over its capacity, as CloudSim's threshold sees it.
    pub fn requested_utilisation(&self, h: usize) -> f64 {
        self.requested[h] / self.state.spec.host(h).mips()
    }

    pub fn is_overloaded(&self, h: usize) -> bool {
        self.requested_utilisation(h) > self.threshold
    }

    /// RAM and bandwidth VM `v` needs on a host: all of it while being created, else
    /// what a running VM asks for (see `State::strict_memory`).
    fn needs(&self, v: usize) -> (f64, f64) {
        if self.state.vm_host[v] == NO_HOST {
            let vt = self.state.spec.vm(v);
            (vt.ram_mb, vt.bw_mbps)
        } else {
            self.state.running_needs(v)
        }
    }

    /// Tentatively adds VM `v` asking for `mips` to host `h`.
    pub fn add(&mut self, h: usize, v: usize, mips: f64) {
        let (ram, bw) = self.needs(v);
        self.requested[h] += mips;
        self.used[h] += mips;
        self.reserved[h] += mips;
        self.ram_free[h] -= ram;
        self.bw_free[h] -= bw;
        if self.is_pristine[h] {
            self.is_pristine[h] = false;
            self.pristine[usize::from(self.state.spec.hosts[h])].remove(&(h as u32));
            self.busy.push(h as u32);
        }
    }

    /// Tentatively takes VM `v` asking for `mips` off host `h`.
    /// (Only VMs that are running or were added to this scratch may be removed.)
    pub fn remove(&mut self, h: usize, v: usize, mips: f64) {
        let (ram, bw) = if self.state.vm_host[v] as usize == h {
            (self.state.vm_ram_held[v], self.state.vm_bw_held[v])
        } else {
            self.needs(v)
        };
        self.requested[h] -= mips;
        self.used[h] -= mips;
        self.reserved[h] -= mips;
        self.ram_free[h] += ram;
        self.bw_free[h] += bw;
    }

    /// The host power-aware best fit picks for VM `v` asking for `mips`, skipping
    /// `excluded` hosts and, unless `allow_idle`, hosts that are switched off.
    pub fn find_host(
        &self,
        v: usize,
        mips: f64,
        excluded: &[bool],
        allow_idle: bool,
    ) -> Option<usize> {
        let mut best: Option<(f64, u32)> = None;
        let mut consider = |h: u32| {
            if let Some(diff) = self.power_increase(h as usize, v, mips) {
                if best.is_none_or(|(d, i)| diff < d || (diff == d && h < i)) {
                    best = Some((diff, h));
                }
            }
        };
        for &h in &self.busy {
            if !excluded[h as usize] {
                consider(h);
            }
        }
        if allow_idle {
            for set in &self.pristine {
                if let Some(&h) = set.iter().find(|&&h| !excluded[h as usize]) {
                    consider(h);
                }
            }
        }
        best.map(|(_, h)| h as usize)
    }

    /// Watts host `h` would draw more with VM `v` on it, or `None` if it may not take it.
    fn power_increase(&self, h: usize, v: usize, mips: f64) -> Option<f64> {
        let ht = self.state.spec.host(h);
        let (ram, bw) = self.needs(v);
        let capacity = ht.mips();
        if ht.core_mips < mips
            || capacity - self.reserved[h] < mips
            || self.ram_free[h] < ram
            || self.bw_free[h] < bw
        {
            return None;
        }
        if self.used[h] != 0.0 && (self.requested[h] + mips) / capacity > self.threshold {
            return None;
        }
        let after = (self.used[h] + mips) / capacity;
        if after > 1.0 {
            return None;
        }
        Some(ht.power.watts_at(after) - self.watts_now[h])
    }
}

/// Places every VM, in index order, with power-aware best fit, as CloudSim places the
/// VMs it creates at time 0: each takes its full MIPS while being instantiated. The
/// overload threshold does not apply: CloudSim's test counts the VMs created before as
/// asking for nothing (they have no workload yet), so only a host's capacity limits
/// what it takes. A VM that fits on no host is left out, as CloudSim's broker leaves
/// out a VM whose creation failed; the VMs left out are returned.
pub fn initial_placement(state: &mut State) -> Vec<usize> {
    let n_hosts = state.hosts();
    let excluded = vec![false; n_hosts];
    let mut chosen = Vec::with_capacity(state.vms());
    let mut dropped = Vec::new();
    {
        let mut scratch = Scratch::new(state, 1.0);
        for v in 0..state.vms() {
            debug_assert_eq!(state.vm_host[v], NO_HOST);
            let mips = state.spec.vm(v).mips;
            match scratch.find_host(v, mips, &excluded, true) {
                Some(h) => {
                    scratch.add(h, v, mips);
                    chosen.push((v, h));
                }
                None => {
                    tracing::warn!(
                        vm = v,
                        vm_type = %state.spec.vm(v).name,
                        "VM fits on no host at start; it is left out of the run"
                    );
                    dropped.push(v);
                }
            }
        }
    }
    for (v, h) in chosen {
        state.place(v, h, 0.0);
    }
    dropped
}
