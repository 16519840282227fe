//! `tern sim run SCENARIO.toml`: a custom cluster with synthetic or trace load.
//!
//! ```toml
//! seed = 7                 # synthetic load and nothing else is random
//! hours = 24
//! interval_s = 300         # scheduling interval (and synthetic sample interval)
//! policy = "thr-mmt"       # none | thr-mmt | spread
//! threshold = 0.8
//! migration = "qemu"       # cloudsim | qemu | xen | adaptive | stop-copy
//! dirty_mb_s = 20          # dirtying at 100 % CPU
//! strict_memory = true     # running VMs keep needing their RAM
//!
//! [[hosts]]
//! count = 40
//! cores = 2
//! core_mips = 2660
//! ram_mb = 8192
//! link_mbps = 1000
//! power = "hp-ml110-g5"    # or power_watts = [11 values for 0 %, 10 %, ... 100 %]
//!
//! [[vms]]
//! count = 120
//! mips = 1000
//! ram_mb = 1024
//! bw_mbps = 0
//! load = { kind = "synthetic", mean = 0.3, daily_amplitude = 0.15 }
//! # or load = { kind = "planetlab", dir = "../../data/planetlab/20110303" }
//! ```
//!
//! Trace folders are relative to the scenario file. A `planetlab` group takes the first
//! `count` files of the folder (sorted by name), wrapping around if it has fewer.

use std::path::Path;

use serde::Deserialize;

use crate::cluster::{ClusterSpec, HostType, VmType};
use crate::power::PowerModel;
use crate::trace::{SyntheticLoad, Traces};
use crate::SimError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "default_hours")]
    pub hours: f64,
    #[serde(default = "default_interval")]
    pub interval_s: f64,
    #[serde(default = "default_policy")]
    pub policy: String,
    #[serde(default = "default_threshold")]
    pub threshold: f64,
    #[serde(default = "default_migration")]
    pub migration: String,
    #[serde(default = "default_dirty")]
    pub dirty_mb_s: f64,
    #[serde(default = "default_true")]
    pub strict_memory: bool,
    pub hosts: Vec<HostGroup>,
    pub vms: Vec<VmGroup>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostGroup {
    pub count: usize,
    pub cores: u32,
    pub core_mips: f64,
    pub ram_mb: f64,
    #[serde(default = "default_link")]
    pub link_mbps: f64,
    pub power: Option<String>,
    pub power_watts: Option<[f64; 11]>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmGroup {
    pub count: usize,
    pub mips: f64,
    pub ram_mb: f64,
    #[serde(default)]
    pub bw_mbps: f64,
    pub load: Load,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Load {
    Synthetic(SyntheticLoad),
    Planetlab { dir: String },
}

fn default_hours() -> f64 {
    24.0
}
fn default_interval() -> f64 {
    300.0
}
fn default_policy() -> String {
    "thr-mmt".into()
}
fn default_threshold() -> f64 {
    0.8
}
fn default_migration() -> String {
    "qemu".into()
}
fn default_dirty() -> f64 {
    20.0
}
fn default_true() -> bool {
    true
}
fn default_link() -> f64 {
    1000.0
}

/// True for finite numbers above zero (false for NaN).
fn positive(x: f64) -> bool {
    x.is_finite() && x > 0.0
}

/// Cap on entities, so a typo (an extra zero or six) fails fast instead of exhausting memory.
const MAX_ENTITIES: usize = 10_000_000;

impl Scenario {
    /// Parses and checks a scenario file's text.
    pub fn parse(text: &str) -> Result<Scenario, SimError> {
        let s: Scenario = toml::from_str(text).map_err(|e| SimError::BadScenario(e.to_string()))?;
        s.check()?;
        Ok(s)
    }

    fn check(&self) -> Result<(), SimError> {
        let bad = |m: String| Err(SimError::BadScenario(m));
        if !(self.hours > 0.0 && self.hours.is_finite()) {
            return bad(format!("hours = {}: must be a positive number", self.hours));
        }
        if !(self.interval_s > 0.0 && self.interval_s.is_finite()) {
            return bad(format!(
                "interval_s = {}: must be a positive number",
                self.interval_s
            ));
        }
        if !(self.threshold > 0.0 && self.threshold <= 1.0) {
            return bad(format!("threshold = {}: must be in (0, 1]", self.threshold));
        }
        if !(self.dirty_mb_s >= 0.0 && self.dirty_mb_s.is_finite()) {
            return bad(format!("dirty_mb_s = {}: must be >= 0", self.dirty_mb_s));
        }
        if self.hosts.is_empty() || self.vms.is_empty() {
            return bad("needs at least one [[hosts]] and one [[vms]] group".into());
        }
        let hosts: usize = self.hosts.iter().map(|g| g.count).sum();
        let vms: usize = self.vms.iter().map(|g| g.count).sum();
        if hosts == 0 || hosts > MAX_ENTITIES || vms > MAX_ENTITIES {
            return bad(format!(
                "{hosts} hosts and {vms} VMs: need 1..={MAX_ENTITIES} hosts and at most {MAX_ENTITIES} VMs"
            ));
        }
        for (i, g) in self.hosts.iter().enumerate() {
            let n = i + 1;
            if g.cores == 0
                || ![g.core_mips, g.ram_mb, g.link_mbps]
                    .iter()
                    .all(|&x| positive(x))
            {
                return bad(format!(
                    "hosts group {n}: cores, core_mips, ram_mb and link_mbps must be positive"
                ));
            }
            match (&g.power, &g.power_watts) {
                (Some(name), None) if PowerModel::named(name).is_none() => {
                    return bad(format!(
                        "hosts group {n}: unknown power = \"{name}\"; use hp-ml110-g4, hp-ml110-g5 or power_watts = [11 values]"
                    ))
                }
                (Some(_), Some(_)) => {
                    return bad(format!("hosts group {n}: give power or power_watts, not both"))
                }
                (None, None) => {
                    return bad(format!(
                        "hosts group {n}: needs power = \"hp-ml110-g5\" (or g4) or power_watts = [11 values]"
                    ))
                }
                _ => {}
            }
        }
        for (i, g) in self.vms.iter().enumerate() {
            if !(positive(g.mips)
                && positive(g.ram_mb)
                && (g.bw_mbps == 0.0 || positive(g.bw_mbps)))
            {
                return bad(format!(
                    "vms group {}: mips and ram_mb must be positive, bw_mbps >= 0",
                    i + 1
                ));
            }
        }
        Ok(())
    }

    /// Number of scheduling intervals the run lasts.
    pub fn intervals(&self) -> u32 {
        (self.hours * 3600.0 / self.interval_s).ceil() as u32
    }

    /// The cluster and one trace per VM; trace folders resolve against `base`.
    pub fn build(&self, base: &Path) -> Result<(ClusterSpec, Traces), SimError> {
        let mut spec = ClusterSpec::default();
        for (i, g) in self.hosts.iter().enumerate() {
            let power = match (&g.power, g.power_watts) {
                (_, Some(watts)) => PowerModel { watts },
                (Some(name), None) => PowerModel::named(name).expect("checked"),
                (None, None) => unreachable!("checked"),
            };
            spec.host_types.push(HostType {
                name: format!("hosts-{}", i + 1),
                cores: g.cores,
                core_mips: g.core_mips,
                ram_mb: g.ram_mb,
                link_mbps: g.link_mbps,
                power,
            });
            spec.hosts.extend(std::iter::repeat_n(i as u16, g.count));
        }
        let samples = self.intervals() as usize + 1;
        let mut rows: Vec<(String, Vec<u8>)> = Vec::new();
        for (i, g) in self.vms.iter().enumerate() {
            spec.vm_types.push(VmType {
                name: format!("vms-{}", i + 1),
                mips: g.mips,
                ram_mb: g.ram_mb,
                bw_mbps: g.bw_mbps,
            });
            spec.vms.extend(std::iter::repeat_n(i as u16, g.count));
            let traces = match &g.load {
                Load::Synthetic(load) => Traces::synthetic(
                    load,
                    g.count,
                    samples,
                    self.interval_s,
                    self.seed.wrapping_add(i as u64),
                ),
                Load::Planetlab { dir } => {
                    let t = Traces::load_planetlab(
                        &base.join(dir),
                        crate::planetlab::SAMPLES,
                        crate::planetlab::INTERVAL_S,
                    )?;
                    resample(&t, g.count, samples, self.interval_s)
                }
            };
            for v in 0..g.count {
                let row = (0..samples)
                    .map(|k| (traces.utilisation(v, k) * 100.0).round() as u8)
                    .collect();
                rows.push((traces.names[v].clone(), row));
            }
        }
        let traces = Traces::from_rows(self.interval_s, rows)?;
        Ok((spec, traces))
    }
}

/// `count` rows of `samples` samples at `interval` from `t`, wrapping over its VMs and
/// holding each trace's sample that covers the new instant.
fn resample(t: &Traces, count: usize, samples: usize, interval: f64) -> Traces {
    let rows = (0..count)
        .map(|v| {
            let src = v % t.vms();
            let row = (0..samples)
                .map(|k| {
                    let idx = (k as f64 * interval / t.interval) as usize % t.samples;
                    (t.utilisation(src, idx) * 100.0).round() as u8
                })
                .collect();
            (t.names[src].clone(), row)
        })
        .collect();
    Traces::from_rows(interval, rows).expect("rows of equal, non-zero length")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: &str = r#"
        seed = 3
        hours = 2
        [[hosts]]
        count = 4
        cores = 2
        core_mips = 2660
        ram_mb = 4096
        power = "hp-ml110-g5"
        [[vms]]
        count = 6
        mips = 1000
        ram_mb = 1024
        load = { kind = "synthetic", mean = 0.3 }
    "#;

    #[test]
    fn parses_and_builds_a_small_scenario() {
        let s = Scenario::parse(SMALL).unwrap();
        assert_eq!(s.intervals(), 24);
        let (spec, traces) = s.build(Path::new(".")).unwrap();
        assert_eq!(spec.hosts.len(), 4);
        assert_eq!(spec.vms.len(), 6);
        assert_eq!(traces.vms(), 6);
        assert_eq!(traces.samples, 25);
    }

    #[test]
    fn rejects_bad_scenarios_naming_the_problem() {
        let cases = [
            (SMALL.replace("hours = 2", "hours = -1"), "hours"),
            (SMALL.replace("hp-ml110-g5", "toaster"), "unknown power"),
            (SMALL.replace("count = 4", "count = 4\nbogus = 1"), "bogus"),
            (SMALL.replace("\"synthetic\"", "\"sine\""), "sine"),
            (SMALL.replace("mips = 1000", "mips = 0"), "vms group 1"),
        ];
        for (text, needle) in cases {
            let err = Scenario::parse(&text).unwrap_err().to_string();
            assert!(err.contains(needle), "{needle}: {err}");
        }
    }
}
