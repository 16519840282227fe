//! The simulated cluster at one instant, and the running totals of the metrics.
//!
//! CPU sharing follows CloudSim's `VmSchedulerTimeSharedOverSubscription`: a VM asks for
//! `utilisation x MIPS` (at most one core); a VM that is migrating out gets 90 % of that
//! (the 10 % performance degradation PDM measures) and its destination reserves 10 %;
//! when a host is asked for more than it has, every share is scaled down alike.
//!
//! Metrics integrate lazily: each host keeps the rates that hold since it last changed
//! (`settle`), so an event costs time for the hosts it touches, not for the whole cluster.

use crate::cluster::ClusterSpec;

/// Marks "no host" in `vm_dest`.
pub const NO_HOST: u32 = u32::MAX;

/// Share of a migrating VM's demand that it still gets on the source.
pub const MIGRATION_SOURCE_SHARE: f64 = 0.9;
/// Share of a migrating VM's demand that its destination reserves.
pub const MIGRATION_DEST_SHARE: f64 = 0.1;

/// Rates that hold on a host between two of its events.
#[derive(Clone, Copy, Debug, Default)]
struct HostRates {
    watts: f64,
    active: bool,
    violating: bool,
    /// MIPS the resident VMs ask for (PDM's denominator).
    requested: f64,
    /// MIPS that migrating-out VMs ask for and do not get (PDM's numerator).
    migration_shortfall: f64,
}

/// Totals over the whole run so far.
#[derive(Clone, Copy, Debug, Default)]
pub struct Totals {
    pub energy_joules: f64,
    pub active_host_seconds: f64,
    pub violation_host_seconds: f64,
    pub requested_mips_seconds: f64,
    pub migration_shortfall_mips_seconds: f64,
}

/// Hosts, VMs, where each VM is, and what each host is asked for and gives.
pub struct State {
    pub spec: ClusterSpec,
    /// Host a VM runs on (the source while it migrates).
    pub vm_host: Vec<u32>,
    /// Destination of a migrating VM, `NO_HOST` otherwise.
    pub vm_dest: Vec<u32>,
    /// MIPS each VM asks for now.
    pub vm_requested: Vec<f64>,
    /// VMs that have finished (see `finish`): on no host's list any more, asking for
    /// nothing; `vm_host` keeps the host they ended on.
    pub vm_finished: Vec<bool>,
    /// When each VM last finished a migration (seconds), for a balancer's cooldown.
    pub vm_last_moved: Vec<Option<f64>>,
    /// VMs running on each host, migrating-out ones included.
    pub host_vms: Vec<Vec<u32>>,
    /// VMs migrating into each host.
    pub host_incoming: Vec<Vec<u32>>,
    /// Requested MIPS of resident and incoming VMs (what CloudSim's threshold tests).
    pub host_requested: Vec<f64>,
    /// MIPS the host actually delivers, CloudSim's "utilisation MIPS": a migrating-out VM
    /// counts at its full share, an incoming one at its 10 % reservation.
    pub host_used_mips: Vec<f64>,
    /// MIPS reserved by the CPU scheduler (free capacity = capacity - this).
    pub host_reserved_mips: Vec<f64>,
    pub host_ram_used: Vec<f64>,
    pub host_bw_used: Vec<f64>,
    /// RAM and bandwidth each VM holds on its host, MB and Mbit/s.
    pub(crate) vm_ram_held: Vec<f64>,
    pub(crate) vm_bw_held: Vec<f64>,
    /// Whether a running VM keeps asking for its full RAM and bandwidth. CloudSim's
    /// PlanetLab setup gives cloudlets a null RAM and bandwidth model, so a VM asks for
    /// them only while being created; after its first migration it holds none.
    pub strict_memory: bool,
    rates: Vec<HostRates>,
    last_settled: Vec<f64>,
    pub totals: Totals,
}

impl State {
    /// An empty cluster: every VM unplaced, asking for nothing.
    pub fn new(spec: ClusterSpec, strict_memory: bool) -> State {
        let h = spec.hosts.len();
        let v = spec.vms.len();
        State {
            vm_host: vec![NO_HOST; v],
            vm_dest: vec![NO_HOST; v],
            vm_requested: vec![0.0; v],
            vm_finished: vec![false; v],
            vm_last_moved: vec![None; v],
            host_vms: vec![Vec::new(); h],
            host_incoming: vec![Vec::new(); h],
            host_requested: vec![0.0; h],
            host_used_mips: vec![0.0; h],
            host_reserved_mips: vec![0.0; h],
            host_ram_used: vec![0.0; h],
            host_bw_used: vec![0.0; h],
            vm_ram_held: vec![0.0; v],
            vm_bw_held: vec![0.0; v],
            strict_memory,
            rates: vec![HostRates::default(); h],
            last_settled: vec![0.0; h],
            totals: Totals::default(),
            spec,
        }
    }

    pub fn hosts(&self) -> usize {
        self.spec.hosts.len()
    }

    pub fn vms(&self) -> usize {
        self.spec.vms.len()
    }

    pub fn is_migrating(&self, vm: usize) -> bool {
        self.vm_dest[vm] != NO_HOST
    }

    /// CloudSim's host CPU utilisation (0..=1): delivered MIPS over capacity.
    pub fn utilisation(&self, h: usize) -> f64 {
        (self.host_used_mips[h] / self.spec.host(h).mips()).min(1.0)
    }

    /// A host is on when it delivers any CPU; an idle host counts as switched off.
    pub fn is_active(&self, h: usize) -> bool {
        self.host_used_mips[h] > 0.0
    }

    /// RAM (MB) and bandwidth (Mbit/s) a running VM needs on a new host.
    pub fn running_needs(&self, vm: usize) -> (f64, f64) {
        if self.strict_memory {
            let vt = self.spec.vm(vm);
            (vt.ram_mb, vt.bw_mbps)
        } else {
            (0.0, 0.0)
        }
    }

    /// Puts an unplaced VM on a host (initial placement): it holds its full RAM and
    /// bandwidth, as a VM being created does.
    pub fn place(&mut self, vm: usize, h: usize, now: f64) {
        debug_assert_eq!(self.vm_host[vm], NO_HOST);
        let vt = self.spec.vm(vm);
        self.vm_ram_held[vm] = vt.ram_mb;
        self.vm_bw_held[vm] = vt.bw_mbps;
        self.vm_host[vm] = h as u32;
        self.host_vms[h].push(vm as u32);
        self.settle(h, now);
    }

    /// Whether a VM runs somewhere: placed and not finished.
    pub fn is_running(&self, vm: usize) -> bool {
        self.vm_host[vm] != NO_HOST && !self.vm_finished[vm]
    }

    /// Ends a running VM for good, as CloudSim destroys a VM whose workload asks for no
    /// CPU: it leaves its host and frees what it held. A migrating VM cannot finish.
    pub fn finish(&mut self, vm: usize, now: f64) {
        debug_assert!(self.is_running(vm) && !self.is_migrating(vm));
        let h = self.vm_host[vm] as usize;
        remove(&mut self.host_vms[h], vm as u32);
        self.vm_finished[vm] = true;
        self.vm_requested[vm] = 0.0;
        self.vm_ram_held[vm] = 0.0;
        self.vm_bw_held[vm] = 0.0;
        self.settle(h, now);
    }

    /// Marks a VM as migrating to `dest`; the destination reserves its memory at once.
    pub fn begin_migration(&mut self, vm: usize, dest: usize, now: f64) {
        let src = self.vm_host[vm] as usize;
        self.vm_dest[vm] = dest as u32;
        self.host_incoming[dest].push(vm as u32);
        self.settle(src, now);
        self.settle(dest, now);
    }

    /// Ends a migration: on success the VM now runs on the destination, else it stays.
    pub fn end_migration(&mut self, vm: usize, success: bool, now: f64) {
        let src = self.vm_host[vm] as usize;
        let dest = self.vm_dest[vm] as usize;
        self.vm_dest[vm] = NO_HOST;
        remove(&mut self.host_incoming[dest], vm as u32);
        if success {
            remove(&mut self.host_vms[src], vm as u32);
            self.host_vms[dest].push(vm as u32);
            self.vm_host[vm] = dest as u32;
            self.vm_last_moved[vm] = Some(now);
            (self.vm_ram_held[vm], self.vm_bw_held[vm]) = self.running_needs(vm);
        }
        self.settle(src, now);
        self.settle(dest, now);
    }

    /// Charges `mips_seconds` of lost CPU to migration (a stop-and-copy downtime).
    pub fn add_migration_shortfall(&mut self, mips_seconds: f64) {
        self.totals.migration_shortfall_mips_seconds += mips_seconds;
    }

    /// Integrates host `h`'s metrics up to `now` at the rates that held so far, then
    /// recomputes its derived values and rates from the current state.
    pub fn settle(&mut self, h: usize, now: f64) {
        let dt = now - self.last_settled[h];
        let old = self.rates[h];
        self.recompute(h);
        let new = self.rates[h];
        if dt > 0.0 {
            let t = &mut self.totals;
            // CloudSim's energy: linear interpolation between the utilisation at the start
            // and at the end of the interval, nothing for a host that was off at its start.
            // A host that has just gone idle ends the interval at its idle power.
            if old.active {
                let end_watts = if new.active {
                    new.watts
                } else {
                    self.spec.host(h).power.watts_at(0.0)
                };
                t.energy_joules += dt * (old.watts + end_watts) / 2.0;
                t.active_host_seconds += dt;
                if old.violating {
                    t.violation_host_seconds += dt;
                }
            }
            t.requested_mips_seconds += dt * old.requested;
            t.migration_shortfall_mips_seconds += dt * old.migration_shortfall;
        }
        self.last_settled[h] = now;
    }

    fn recompute(&mut self, h: usize) {
        let ht = self.spec.host(h);
        let capacity = ht.mips();
        let core = ht.core_mips;
        let mut demand = 0.0;
        let mut requested_all = 0.0;
        let mut requested_resident = 0.0;
        let mut migrating_demand = 0.0;
        let mut ram = 0.0;
        let mut bw = 0.0;
        for &v in &self.host_vms[h] {
            let v = v as usize;
            let r = self.vm_requested[v];
            let ask = r.min(core);
            if self.vm_dest[v] != NO_HOST {
                demand += MIGRATION_SOURCE_SHARE * ask;
                migrating_demand += ask;
            } else {
                demand += ask;
            }
            requested_all += r;
            requested_resident += r;
            ram += self.vm_ram_held[v];
            bw += self.vm_bw_held[v];
        }
        let mut incoming_demand = 0.0;
        for &v in &self.host_incoming[h] {
            let v = v as usize;
            let r = self.vm_requested[v];
            incoming_demand += MIGRATION_DEST_SHARE * r.min(core);
            requested_all += r;
            let (r_ram, r_bw) = self.running_needs(v);
            ram += r_ram;
            bw += r_bw;
        }
        demand += incoming_demand;
        let scale = if demand > capacity {
            capacity / demand
        } else {
            1.0
        };
        // Delivered MIPS as CloudSim books them: the migrating VM's 10 % loss is not
        // idle CPU on the source, so it counts at its full (scaled) share.
        let resident_full =
            demand - incoming_demand + migrating_demand * (1.0 - MIGRATION_SOURCE_SHARE);
        let used = ((resident_full + incoming_demand) * scale).min(capacity);
        let shortfall: f64 = self.host_vms[h]
            .iter()
            .map(|&v| v as usize)
            .filter(|&v| self.vm_dest[v] != NO_HOST)
            .map(|v| {
                let r = self.vm_requested[v];
                r - MIGRATION_SOURCE_SHARE * r.min(core) * scale
            })
            .sum();
        self.host_requested[h] = requested_all;
        self.host_used_mips[h] = used;
        self.host_reserved_mips[h] = (resident_full + incoming_demand).min(capacity);
        self.host_ram_used[h] = ram;
        self.host_bw_used[h] = bw;
        let utilisation = (used / capacity).min(1.0);
        let active = used > 0.0;
        self.rates[h] = HostRates {
            watts: if active {
                ht.power.watts_at(utilisation)
            } else {
                0.0
            },
            active,
            violating: used + 1e-6 < requested_all,
            requested: requested_resident,
            migration_shortfall: shortfall,
        };
    }
}

/// Removes `x` keeping the order of the rest: a host's VM list is in arrival order, as
/// CloudSim's is, and CloudSim's choices break ties by that order.
fn remove(list: &mut Vec<u32>, x: u32) {
    if let Some(i) = list.iter().position(|&y| y == x) {
        list.remove(i);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{HostType, VmType};
    use crate::power::HP_ML110_G5;

    fn two_hosts_one_vm() -> State {
        let spec = ClusterSpec {
            host_types: vec![HostType {
                name: "g5".into(),
                cores: 2,
                core_mips: 2660.0,
                ram_mb: 4096.0,
                link_mbps: 1000.0,
                power: HP_ML110_G5,
            }],
            hosts: vec![0, 0],
            vm_types: vec![VmType {
                name: "a".into(),
                mips: 2500.0,
                ram_mb: 870.0,
                bw_mbps: 100.0,
            }],
            vms: vec![0],
        };
        State::new(spec, true)
    }

    #[test]
    fn energy_integrates_power_of_active_hosts_only() {
        let mut s = two_hosts_one_vm();
        s.vm_requested[0] = 2660.0; // one full core of two: 50 %
        s.place(0, 0, 0.0);
        s.settle(0, 100.0);
        s.settle(1, 100.0);
        assert!((s.totals.energy_joules - 100.0 * 116.0).abs() < 1e-6);
        assert_eq!(s.totals.active_host_seconds, 100.0);
        assert_eq!(s.totals.violation_host_seconds, 0.0);
    }

    #[test]
    fn migration_costs_ten_percent_and_flags_the_destination() {
        let mut s = two_hosts_one_vm();
        s.vm_requested[0] = 1000.0;
        s.place(0, 0, 0.0);
        s.begin_migration(0, 1, 0.0);
        assert!((s.host_used_mips[0] - 1000.0).abs() < 1e-9);
        assert!((s.host_used_mips[1] - 100.0).abs() < 1e-9);
        assert_eq!(s.host_ram_used[1], 870.0);
        s.end_migration(0, true, 10.0);
        assert_eq!(s.vm_host[0], 1);
        assert!(s.host_vms[0].is_empty());
        let t = s.totals;
        assert!((t.migration_shortfall_mips_seconds - 10.0 * 100.0).abs() < 1e-6);
        assert!((t.requested_mips_seconds - 10.0 * 1000.0).abs() < 1e-6);
        // The destination asked for the VM's full demand and gave 10 %: CloudSim counts
        // that as time at 100 %.
        assert_eq!(t.violation_host_seconds, 10.0);
        assert_eq!(t.active_host_seconds, 20.0);
    }

    #[test]
    fn a_finished_vm_leaves_its_host_and_frees_it() {
        let mut s = two_hosts_one_vm();
        s.vm_requested[0] = 1330.0;
        s.place(0, 0, 0.0);
        s.finish(0, 100.0);
        assert!(!s.is_running(0));
        assert!(s.host_vms[0].is_empty());
        assert_eq!(s.host_ram_used[0], 0.0);
        assert!(!s.is_active(0));
        // Metered up to the finish, from 25 % (G5: 103 W) down to idle (93.7 W), as
        // CloudSim interpolates; nothing after it.
        s.settle(0, 200.0);
        assert!((s.totals.energy_joules - 100.0 * (103.0 + 93.7) / 2.0).abs() < 1e-6);
        assert_eq!(s.totals.active_host_seconds, 100.0);
    }

    #[test]
    fn overcommitted_host_scales_and_violates() {
        let mut s = two_hosts_one_vm();
        s.vm_requested[0] = 5000.0; // more than one core: capped at 2660
        s.place(0, 0, 0.0);
        assert!((s.host_used_mips[0] - 2660.0).abs() < 1e-9);
        s.settle(0, 50.0);
        assert_eq!(s.totals.violation_host_seconds, 50.0);
    }
}
