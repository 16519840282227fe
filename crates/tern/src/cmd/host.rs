//! `tern host`: the manager's hosts (list, show, register, remove, drain, activate). Also the
//! connection flags and the call function that `tern policy` and `tern events` share.

use std::time::Duration;

use reqwest::Method;
use serde::Serialize;
use serde_json::Value;
use tern_api::client::{ClientError, ManagerClient};
use tern_api::manager::{Capacity, RegisterHost};
use tern_model::HostName;

/// Where the manager is and how to authenticate.
#[derive(clap::Args, Clone)]
pub struct Conn {
    /// The manager's URL.
    #[arg(
        long,
        env = "TERN_MANAGER",
        default_value = "http://127.0.0.1:7080",
        global = true
    )]
    pub manager: String,
    /// File whose first line is the API bearer token (mode 0600); or set TERN_TOKEN.
    #[arg(long, env = "TERN_TOKEN_FILE", value_name = "FILE", global = true)]
    pub token_file: Option<std::path::PathBuf>,
    /// The cluster CA's certificate, to check an https:// manager by (the CA
    /// directory's ca.pem).
    #[arg(long, env = "TERN_CA_CERT", value_name = "FILE", global = true)]
    pub ca_cert: Option<std::path::PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

impl Conn {
    /// The bearer token: from --token-file, else TERN_TOKEN; never the command line,
    /// where every user of the machine can read it.
    pub fn token(&self) -> anyhow::Result<String> {
        let token = match &self.token_file {
            Some(f) => tern_pki::files::read_token(f).map_err(super::bad_input)?,
            None => std::env::var("TERN_TOKEN").unwrap_or_default(),
        };
        if token.is_empty() {
            return Err(super::bad_input(
                "no token: give --token-file FILE or set TERN_TOKEN",
            ));
        }
        Ok(token)
    }

    pub fn client(&self) -> anyhow::Result<ManagerClient> {
        self.client_with(tern_api::client::ClientOptions::with_timeout(
            Duration::from_secs(30),
        ))
    }

    /// How an `https://` manager is checked: against the cluster CA of --ca-cert.
    pub fn tls(&self) -> anyhow::Result<Option<rustls::ClientConfig>> {
        match &self.ca_cert {
            Some(f) => {
                let ca = tern_pki::files::read_public(f).map_err(super::bad_input)?;
                Ok(Some(
                    tern_pki::tls::client_config(&ca, None, None).map_err(super::bad_input)?,
                ))
            }
            None => Ok(None),
        }
    }

    /// A client with `options` (a long call's timeout, a large answer's limit).
    pub fn client_with(
        &self,
        options: tern_api::client::ClientOptions,
    ) -> anyhow::Result<ManagerClient> {
        tern_api::client::Client::with_tls(&self.manager, &self.token()?, options, self.tls()?)
            .map(ManagerClient::from)
            .map_err(super::bad_input)
    }
}

/// A refusal (4xx) is bad input (exit 2) with the manager's message; anything else is a
/// failure.
pub fn refused(e: ClientError) -> anyhow::Error {
    match e {
        ClientError::Remote {
            status, message, ..
        } if (400..500).contains(&status) => super::bad_input(format!("{message} (HTTP {status})")),
        e => anyhow::Error::new(e),
    }
}

/// Runs one call on a runtime of its own and returns the answer's JSON.
pub fn call<B: Serialize + ?Sized>(
    conn: &Conn,
    method: Method,
    path: &str,
    body: Option<&B>,
) -> anyhow::Result<Value> {
    let client = conn.client()?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(client.http().send(method, path, body))
        .map_err(refused)
}

/// Prints `rows` under `header` in aligned columns.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let s: Vec<String> = cells
            .iter()
            .zip(&width)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    conn: Conn,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Every host, with its state and load.
    List,
    /// One host.
    Show { name: HostName },
    /// Register a host by its agent's URL.
    Register {
        name: HostName,
        #[arg(long)]
        address: String,
        #[arg(long)]
        cpus: f64,
        #[arg(long)]
        memory_mib: u64,
    },
    /// Remove an empty host from the cluster and revoke its certificate.
    Remove { name: HostName },
    /// Put a host into maintenance; the manager moves its VMs away.
    Drain { name: HostName },
    /// Bring a host back from maintenance.
    Activate { name: HostName },
}

fn host_row(h: &Value) -> Vec<String> {
    let num = |v: &Value| v.as_f64().map_or("-".to_owned(), |x| format!("{x:.2}"));
    vec![
        h["name"].as_str().unwrap_or("").to_owned(),
        h["state"].as_str().unwrap_or("").to_owned(),
        num(&h["cpu_smoothed"]),
        num(&h["capacity"]["cpus"]),
        h["capacity"]["memory_mib"].to_string(),
        h["address"].as_str().unwrap_or("").to_owned(),
    ]
}

const HEADER: [&str; 6] = [
    "NAME",
    "STATE",
    "CPU USED",
    "CORES",
    "MEMORY MiB",
    "ADDRESS",
];

pub fn run(a: Args) -> anyhow::Result<()> {
    let c = &a.conn;
    let v = match a.command {
        Command::List => call::<()>(c, Method::GET, "/v1/hosts", None)?,
        Command::Show { name } => call::<()>(c, Method::GET, &format!("/v1/hosts/{name}"), None)?,
        Command::Register {
            name,
            address,
            cpus,
            memory_mib,
        } => {
            let body = RegisterHost {
                name,
                address,
                capacity: Capacity { cpus, memory_mib },
            };
            call(c, Method::POST, "/v1/hosts", Some(&body))?
        }
        Command::Remove { name } => {
            call::<()>(c, Method::DELETE, &format!("/v1/hosts/{name}"), None)?
        }
        Command::Drain { name } => {
            call::<()>(c, Method::POST, &format!("/v1/hosts/{name}/drain"), None)?
        }
        Command::Activate { name } => {
            call::<()>(c, Method::POST, &format!("/v1/hosts/{name}/activate"), None)?
        }
    };
    if c.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let rows: Vec<Vec<String>> = match &v {
            Value::Array(hs) => hs.iter().map(host_row).collect(),
            h => vec![host_row(h)],
        };
        table(&HEADER, &rows);
    }
    Ok(())
}
