//! Request bodies as the servers read them (feature `server`): strict at every depth.
//!
//! The types here accept fields they do not know, because responses carry them (a VM
//! spec inside a VM view, a capacity inside a host) and an older reader must be able to
//! read a newer writer. A request is the other way round: a field the server does not
//! know is a typo or a feature this server lacks, so it is refused, however deep it is.

use serde::de::DeserializeOwned;

/// Parses a JSON request body, refusing any field the type does not know; the message
/// names what is wrong (e.g. ``unknown field `spec.colour` ``).
pub fn from_slice<T: DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = strict(&mut de)?;
    de.end().map_err(|e| e.to_string())?;
    Ok(value)
}

/// As [`from_slice`], from JSON already parsed.
pub fn from_value<T: DeserializeOwned>(body: serde_json::Value) -> Result<T, String> {
    strict(body)
}

fn strict<'de, T, D>(de: D) -> Result<T, String>
where
    T: DeserializeOwned,
    D: serde::Deserializer<'de>,
{
    let mut unknown = Vec::new();
    let value: T = serde_ignored::deserialize(de, |path| unknown.push(format!("`{path}`")))
        .map_err(|e| e.to_string())?;
    match unknown.as_slice() {
        [] => Ok(value),
        [one] => Err(format!("unknown field {one}")),
        many => Err(format!("unknown fields {}", many.join(", "))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::{CreateVm, VmView};
    use crate::manager::{Host, Vm};

    #[test]
    fn requests_refuse_unknown_fields_at_any_depth() {
        let nested = br#"{"id": "v", "spec": {"memory_mib": 64, "colour": 1}}"#;
        let e = from_slice::<CreateVm>(nested).unwrap_err();
        assert_eq!(e, "unknown field `spec.colour`");
        let deeper = br#"{"id": "v", "spec": {"memory_mib": 64, "nics": [{"model": "e1000"}]}}"#;
        let e = from_slice::<CreateVm>(deeper).unwrap_err();
        assert!(e.contains("`spec.nics.0.model`"), "{e}");
        let top = serde_json::json!({"id": "v", "spec": {"memory_mib": 64}, "x": 1});
        assert!(from_value::<CreateVm>(top).unwrap_err().contains("`x`"));
        let ok = from_slice::<CreateVm>(br#"{"id": "v", "spec": {"memory_mib": 64}}"#).unwrap();
        assert_eq!(ok.spec.memory_mib, 64);
        assert!(from_slice::<CreateVm>(br#"{"id": "v"} trailing"#).is_err());
    }

    #[test]
    fn responses_carrying_request_types_accept_fields_they_do_not_know() {
        // An agent or manager newer than the reader may add fields anywhere.
        let view = r#"{"id": "v", "state": "running", "macs": [], "memory_file": null,
            "control_socket": null, "console_log": null, "pid": 7, "cpu_cores": 0.5,
            "spec": {"vcpus": 1, "memory_mib": 64, "balloon": true, "nics": [{"mac": null, "queues": 4}]}}"#;
        let view: VmView = serde_json::from_str(view).unwrap();
        assert_eq!(view.info.spec.memory_mib, 64);
        let vm = r#"{"name": "v", "desired_host": null, "observed_host": null,
            "state": "running", "cpu_used": 0.0, "last_moved": null,
            "spec": {"vcpus": 1, "memory_mib": 64, "numa": 2}}"#;
        assert_eq!(serde_json::from_str::<Vm>(vm).unwrap().spec.vcpus, 1);
        let host = r#"{"name": "h", "address": "sim:", "state": "active",
            "last_heartbeat": null, "cpu_used": null, "cpu_smoothed": null,
            "capacity": {"cpus": 4, "memory_mib": 1024, "gpus": 1}}"#;
        assert_eq!(
            serde_json::from_str::<Host>(host).unwrap().capacity.cpus,
            4.0
        );
    }
}
