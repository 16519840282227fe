//! `tern policy`: the balancer's settings on the manager, and its dry-run plan.

use reqwest::Method;
use serde_json::Value;

use super::host::{call, table, Conn};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    conn: Conn,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// The current settings.
    Show,
    /// Change some settings; the others keep their values.
    Set {
        #[arg(long)]
        enabled: Option<bool>,
        #[arg(long)]
        dry_run: Option<bool>,
        /// 1 (only evacuate) to 5 (act on small gains).
        #[arg(long)]
        aggressiveness: Option<u8>,
        #[arg(long)]
        interval_s: Option<u64>,
        #[arg(long)]
        cooldown_s: Option<u64>,
        #[arg(long)]
        max_per_host: Option<u32>,
        #[arg(long)]
        max_per_cluster: Option<u32>,
        #[arg(long)]
        dead_after_s: Option<u64>,
        #[arg(long)]
        smoothing_window: Option<u32>,
        /// qemu, xen, adaptive, stop-copy or dependency-aware.
        #[arg(long)]
        default_policy: Option<String>,
        /// The policy of a drain's moves when neither the VM nor the migration names
        /// one (`default`: the default policy).
        #[arg(long, value_name = "POLICY")]
        evacuation_policy: Option<String>,
    },
    /// What the balancer would do now (nothing is changed).
    Plan,
}

fn settings_table(v: &Value) {
    let rows: Vec<Vec<String>> = v
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, x)| match x {
            // An unset policy falls back to another setting: say which.
            Value::Null if k == "evacuation_policy" => vec![k.clone(), "(default_policy)".into()],
            _ => vec![k.clone(), x.to_string().trim_matches('"').to_owned()],
        })
        .collect();
    table(&["SETTING", "VALUE"], &rows);
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let c = &a.conn;
    let v = match a.command {
        Command::Show => call::<()>(c, Method::GET, "/v1/balancer", None)?,
        Command::Plan => call::<()>(c, Method::GET, "/v1/plan", None)?,
        Command::Set {
            enabled,
            dry_run,
            aggressiveness,
            interval_s,
            cooldown_s,
            max_per_host,
            max_per_cluster,
            dead_after_s,
            smoothing_window,
            default_policy,
            evacuation_policy,
        } => {
            // The settings as the manager wrote them, so fields a newer manager has and
            // this CLI does not know go back unchanged.
            let mut s = call::<()>(c, Method::GET, "/v1/balancer", None)?;
            let mut put = |k: &str, x: Option<Value>| {
                if let Some(x) = x {
                    s[k] = x;
                }
            };
            put("enabled", enabled.map(Value::from));
            put("dry_run", dry_run.map(Value::from));
            put("aggressiveness", aggressiveness.map(Value::from));
            put("interval_s", interval_s.map(Value::from));
            put("cooldown_s", cooldown_s.map(Value::from));
            put("max_per_host", max_per_host.map(Value::from));
            put("max_per_cluster", max_per_cluster.map(Value::from));
            put("dead_after_s", dead_after_s.map(Value::from));
            put("smoothing_window", smoothing_window.map(Value::from));
            put("default_policy", default_policy.map(Value::from));
            let evacuation_policy = evacuation_policy
                .map(|p| super::vm::policy_or_default(&p).map_err(super::bad_input))
                .transpose()?;
            put(
                "evacuation_policy",
                evacuation_policy.map(|p| p.map_or(Value::Null, |p| p.as_str().into())),
            );
            call(c, Method::PUT, "/v1/balancer", Some(&s))?
        }
    };
    if c.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else if v.get("moves").is_some() {
        println!(
            "spread score {:.4} -> {:.4}",
            v["score_before"].as_f64().unwrap_or(0.0),
            v["score_after"].as_f64().unwrap_or(0.0)
        );
        let rows: Vec<Vec<String>> = v["moves"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| {
                ["vm", "from", "to"]
                    .iter()
                    .map(|k| m[*k].as_str().unwrap_or("").to_owned())
                    .chain([
                        format!("{:.1}", m["gain"].as_f64().unwrap_or(0.0)),
                        format!("{:.1}", m["cost"].as_f64().unwrap_or(0.0)),
                    ])
                    .collect()
            })
            .collect();
        table(&["VM", "FROM", "TO", "GAIN", "COST"], &rows);
    } else {
        settings_table(&v);
    }
    Ok(())
}
