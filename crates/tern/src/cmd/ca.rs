//! `tern ca`: the cluster certificate authority: create it, make one-time join tokens
//! for hosts, issue certificates (an operator's, for `tern agent vm`), revoke them.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use tern_pki::{Ca, Role};

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Create the cluster CA in DIR (`tern manager --ca DIR` also creates it when absent).
    Init {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
    },
    /// Write a one-time join token for `tern agent --join URL --join-token-file FILE`.
    JoinToken {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Seconds the token stays valid (at most a week).
        #[arg(long, default_value_t = 3600)]
        ttl_s: u64,
        /// Where to write the token (mode 0600); hand it to the host privately.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Issue a certificate and a new key into OUT (ca.pem, cert.pem, key.pem).
    Issue {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        #[arg(long, value_enum, default_value = "operator")]
        role: IssueRole,
        /// Whose certificate: an operator's or a host's name.
        #[arg(long)]
        name: String,
        /// A host's IP addresses, which clients check it by.
        #[arg(long)]
        address: Vec<IpAddr>,
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Revoke every certificate issued to NAME (a host: `tern host remove` does this too).
    Revoke {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        name: String,
    },
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum IssueRole {
    /// A person or tool calling agents directly (`tern agent vm --tls-dir`).
    Operator,
    /// A host's agent enrolled without a manager (the lab does this).
    Host,
}

pub fn run(c: Command) -> anyhow::Result<()> {
    match c {
        Command::Init { dir } => {
            Ca::init(&dir).map_err(super::bad_input)?;
            println!("cluster CA created in {}", dir.display());
        }
        Command::JoinToken { dir, ttl_s, out } => {
            let ca = Ca::load(&dir).map_err(super::bad_input)?;
            let token = ca
                .create_join_token(Duration::from_secs(ttl_s))
                .map_err(super::bad_input)?;
            tern_pki::files::write_private(&out, &serde_json::to_vec_pretty(&token)?)?;
            println!(
                "join token written to {} (valid {ttl_s} s, once)",
                out.display()
            );
        }
        Command::Issue {
            dir,
            role,
            name,
            address,
            out,
        } => {
            let ca = Ca::load(&dir).map_err(super::bad_input)?;
            let role = match role {
                IssueRole::Operator => Role::Operator,
                IssueRole::Host => Role::Host,
            };
            let id = ca.issue(role, &name, &address).map_err(super::bad_input)?;
            id.save(&out)?;
            println!("certificate for {name} written to {}", out.display());
        }
        Command::Revoke { dir, name } => {
            let ca = Ca::load(&dir).map_err(super::bad_input)?;
            let n = ca.revoke(&name).map_err(super::bad_input)?;
            println!("{n} certificate(s) of {name} revoked; crl.pem rewritten");
        }
    }
    Ok(())
}
