//! The probes of the holes issue 8 closed, one file per group, each run against the
//! suite's lab: its agents and manager over their real addresses, with the lab CA.
//!
//! # Layout
//! - [`identity`]: who may call whom, and where credentials go (item 1).
//! - [`streams`]: the migration streams and listening sockets (item 2).
//! - [`limits`]: timeouts, caps and bounded registries (item 3).
//! - [`input`]: names, paths, numbers, frames and state machines (item 4).
//! - `kit`: what the probes share (findings, an attacker's listener, slow clients, an
//!   eavesdropper on the lab's switch).

pub mod identity;
pub mod input;
mod kit;
pub mod limits;
pub mod streams;

use crate::Case;

/// Every probe, in the order they run.
pub fn cases() -> Vec<Case> {
    let mut all = identity::cases();
    all.extend(streams::cases());
    all.extend(limits::cases());
    all.extend(input::cases());
    all
}
