//! vCPU scheduling policies (`PUT /v1/vms/{id}/vcpu-policy` on the agent): how the host
//! schedules a VM's vCPU threads. The agent applies them; `docs/trace.md` describes each.

use serde::{Deserialize, Serialize};

/// How the host schedules a VM's vCPU threads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
pub enum VcpuPolicy {
    /// The host's scheduler places the threads as it likes.
    #[default]
    None,
    /// vCPU *i*'s thread may run only on core *i* mod the host's cores.
    Pin,
    /// The VM's vCPUs run together or not at all: gang VMs on a host take turns in
    /// time slices, each pinned as with `pin` while its turn lasts.
    Gang,
}

impl VcpuPolicy {
    /// Every policy, in the order the bench runs them.
    pub const ALL: [VcpuPolicy; 3] = [VcpuPolicy::None, VcpuPolicy::Pin, VcpuPolicy::Gang];

    /// Whether this is the default, `none` (for `skip_serializing_if`).
    pub fn is_none(&self) -> bool {
        *self == VcpuPolicy::None
    }

    /// The name on the wire and the command line.
    pub fn name(self) -> &'static str {
        match self {
            VcpuPolicy::None => "none",
            VcpuPolicy::Pin => "pin",
            VcpuPolicy::Gang => "gang",
        }
    }
}

impl std::fmt::Display for VcpuPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for VcpuPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        VcpuPolicy::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| format!("unknown vCPU policy {s:?}; known: none, pin, gang"))
    }
}

/// `PUT /v1/vms/{id}/vcpu-policy`'s body and the route's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct VcpuPolicySetting {
    pub policy: VcpuPolicy,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_ones_say_what_is_known() {
        for p in VcpuPolicy::ALL {
            assert_eq!(p.name().parse::<VcpuPolicy>(), Ok(p));
            let json = serde_json::to_string(&VcpuPolicySetting { policy: p }).unwrap();
            assert_eq!(json, format!("{{\"policy\":\"{p}\"}}"));
        }
        assert!("fifo".parse::<VcpuPolicy>().unwrap_err().contains("gang"));
    }
}
