//! The cluster model every other tern crate speaks: hosts (nodes), VMs (instances),
//! resources, load, placements, moves and plans, plus the Ganeti htools text format.
//!
//! Pure data and parsing: no I/O beyond reading and writing strings.
//!
//! # Layout
//! - [`cluster`]: the snapshot type [`Cluster`] and its parts.
//! - [`ids`]: index newtypes ([`NodeId`], [`InstId`], [`GroupId`]).
//! - [`names`]: [`VmName`], [`HostName`], [`ImageName`] and [`TemplateName`], and the
//!   one rule a name must follow.
//! - [`policy`]: instance policies, kept so Ganeti files round-trip.
//! - [`plan`]: [`Move`] and [`Plan`], and applying a move to a cluster.
//! - [`ganeti`]: the Ganeti htools text format, and the htools tag conventions.
//! - [`generate`]: reproducible synthetic clusters for tests and benchmarks.

pub mod cluster;
pub mod error;
pub mod ganeti;
pub mod generate;
pub mod ids;
pub mod names;
pub mod plan;
pub mod policy;

pub use cluster::{
    AllocPolicy, Cluster, Demand, DiskTemplate, DynUtil, Group, Instance, InstanceStatus, Mobility,
    Node, NodeInstances,
};
pub use error::Error;
pub use ids::{GroupId, InstId, NodeId};
pub use names::{HostName, ImageName, NameError, NameKind, TemplateName, VmName};
pub use plan::{Move, Plan};
pub use policy::{IPolicy, ISpec, MinMaxISpecs};
