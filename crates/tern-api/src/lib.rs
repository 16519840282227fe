//! The contract between tern's processes: every value that crosses a process boundary,
//! as plain serde types with no behaviour beyond checking and naming themselves.
//!
//! Responses accept fields they do not know, so an older reader can talk to a newer
//! writer; request bodies refuse them, so a typo is an error rather than ignored: the
//! servers read them through `request`, which refuses unknown fields at every depth,
//! since the same types (a VM spec, a capacity) travel inside responses too.
//!
//! # Layout
//! - [`agent`]: the agent's API: host report, VM spec and views, actions, error body.
//! - [`migration`]: the agent's migration API: requests, ticket, phases, views, round
//!   telemetry and why pre-copy stopped.
//! - [`catalog`]: the manager's images and templates, and how hosts name image files.
//! - [`manager`]: the manager's API: hosts, VMs, migrations, settings, plan, events.
//! - `client` (feature `client`): one HTTP client for both servers, typed per route.
//! - [`guest`]: the JSON-lines protocol between the host and `tern-guest` in a VM.
//! - [`guest_config`]: what a guest is told at creation (host name, ssh keys, address).
//! - [`health`]: guest health as hosts report it, and the HA policy applied to it.
//! - [`trace`]: the agent's trace API: a host recording of a VM's vCPU threads.
//! - [`vcpu`]: vCPU scheduling policies (`none`, `pin`, `gang`).
//! - `request` (feature `server`): request bodies parsed strictly, at every depth.
//! - `openapi` (feature `openapi`): what both servers' OpenAPI documents share; every
//!   type here derives `utoipa::ToSchema` under that feature.
pub mod agent;
pub mod catalog;
#[cfg(feature = "client")]
pub mod client;
pub mod guest;
pub mod guest_config;
pub mod health;
pub mod manager;
pub mod migration;
#[cfg(feature = "openapi")]
pub mod openapi;
#[cfg(feature = "server")]
pub mod request;
pub mod trace;
pub mod vcpu;
