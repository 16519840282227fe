//! Guest health: whether a running guest still answers, as its host sees it, and what
//! the manager does about a guest that stopped (its HA policy). See `docs/manager.md`,
//! "Guest health".

use serde::{Deserialize, Serialize};

/// How a running guest answers its host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum GuestState {
    /// Its QEMU runs and its guest agent has not answered yet since the guest started.
    Booting,
    /// Its guest agent answers.
    Ok,
    /// Its QEMU runs, and its guest agent stopped answering for longer than the host's
    /// bound (or never answered within the boot bound): the guest hangs.
    Unresponsive,
    /// The guest kernel panicked (QEMU's pvpanic device, or the console showed it).
    Panicked,
}

impl GuestState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Booting => "booting",
            Self::Ok => "ok",
            Self::Unresponsive => "unresponsive",
            Self::Panicked => "panicked",
        }
    }

    /// A guest in this state has stopped and will not come back by itself.
    pub fn is_down(self) -> bool {
        matches!(self, Self::Unresponsive | Self::Panicked)
    }
}

impl std::fmt::Display for GuestState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A guest's health, why, and since when.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct GuestHealth {
    pub state: GuestState,
    /// What showed it, e.g. the console's panic line or how long the agent was silent.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// When the guest entered this state, in milliseconds since the Unix epoch (the
    /// reporter's clock: the agent's in its VM views, the manager's in its records).
    pub since_ms: u64,
}

/// What the manager does with a VM whose guest panicked or stopped answering.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum HaPolicy {
    /// Power it off and start it again on its host (from its disks), within the
    /// manager's restart limit.
    #[default]
    Restart,
    /// Leave it as it is; its health is only shown.
    Leave,
}

impl HaPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Restart => "restart",
            Self::Leave => "leave",
        }
    }
}

impl std::fmt::Display for HaPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for HaPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "restart" => Ok(Self::Restart),
            "leave" => Ok(Self::Leave),
            _ => Err(format!("unknown HA policy {s:?}: restart or leave")),
        }
    }
}

/// The body of `PUT /v1/vms/{name}/ha-policy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct HaPolicySetting {
    pub policy: HaPolicy,
}

/// What HA did to a VM's guest lately, as the manager records it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct GuestRestarts {
    /// When it restarted the guest, in the manager's milliseconds, within the restart
    /// window (older ones are dropped).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub at_ms: Vec<u64>,
    /// A restart decided and not yet carried out by the VM's host.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pending: bool,
    /// Set when HA gave up (the guest failed again after every allowed restart): why.
    /// An operator's start, stop, reboot or a new HA policy clears it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<String>,
}

impl GuestRestarts {
    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for p in [HaPolicy::Restart, HaPolicy::Leave] {
            assert_eq!(p.as_str().parse::<HaPolicy>(), Ok(p));
            assert_eq!(serde_json::to_value(p).unwrap(), p.as_str());
        }
        assert!("reboot".parse::<HaPolicy>().is_err());
        for s in [
            GuestState::Booting,
            GuestState::Ok,
            GuestState::Unresponsive,
            GuestState::Panicked,
        ] {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        assert!(GuestState::Panicked.is_down() && !GuestState::Booting.is_down());
        assert!(GuestRestarts::default().is_empty());
        assert_eq!(
            serde_json::to_value(GuestRestarts::default()).unwrap(),
            serde_json::json!({})
        );
    }
}
