//! `tern bench api` from the command line: a short run over HTTPS (and one over plain
//! HTTP) reports every route, and bad sizes are refused.

use std::process::Command;

fn tern(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn a_short_run_reports_latency_in_all_and_per_route_without_errors() {
    // HTTPS by default, as a manager with a cluster CA serves its API; plain when asked.
    for (extra, tls) in [(None, true), (Some("--insecure-plain-http"), false)] {
        let mut args = vec![
            "bench",
            "api",
            "--hosts",
            "4",
            "--vms-per-host",
            "3",
            "--clients",
            "4",
            "--seconds",
            "1",
            "--json",
        ];
        args.extend(extra);
        let out = tern(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["tls"], tls, "{v}");
        let scheme = if tls { "https://" } else { "http://" };
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(&format!("against {scheme}")),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(v["vms"], 12);
        assert_eq!(v["errors"], 0, "{v}");
        let routes = v["routes"].as_object().unwrap();
        assert_eq!(routes.len(), 4, "{v}");
        let per_route: u64 = routes
            .values()
            .map(|r| r["requests"].as_u64().unwrap())
            .sum();
        assert_eq!(per_route, v["requests"].as_u64().unwrap());
        assert!(
            routes["POST /v1/hosts/NAME/heartbeat"]["requests"]
                .as_u64()
                .unwrap()
                > 0
        );
        let (p50, p99) = (v["p50_ms"].as_f64().unwrap(), v["p99_ms"].as_f64().unwrap());
        assert!(0.0 < p50 && p50 <= p99, "{v}");
    }
}

#[test]
fn zero_clients_or_hosts_exit_2_with_a_message() {
    for flag in ["--clients", "--hosts", "--seconds", "--vms-per-host"] {
        let out = tern(&["bench", "api", flag, "0"]);
        assert_eq!(out.status.code(), Some(2), "{flag}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("must be at least 1"), "{flag}: {err}");
    }
}
