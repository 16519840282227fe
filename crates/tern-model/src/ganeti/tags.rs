//! The htools tag conventions that change how a cluster is scored: cluster tags
//! name the tag prefixes that mean something, node and instance tags carry the
//! values.
//!
//! - `htools:iextags:P`: instances whose tags start with `P` exclude each other
//!   (they should not share a primary node).
//! - `htools:nlocation:P`: node tags `P:x` put the node in failure domain
//!   `P:x`; a DRBD instance should not have both nodes in one domain.
//! - `htools:desiredlocation:P`: instance tags starting with `P` name failure
//!   domains the instance's primary should be in.

use std::collections::BTreeSet;

use crate::{Cluster, InstId, NodeId};

const EXCLUSION_PREFIX: &str = "htools:iextags:";
const LOCATION_PREFIX: &str = "htools:nlocation:";
const DESIRED_LOCATION_PREFIX: &str = "htools:desiredlocation:";

fn cluster_values<'a>(cluster: &'a Cluster, prefix: &'a str) -> impl Iterator<Item = &'a str> {
    cluster
        .tags
        .iter()
        .filter_map(move |t| t.strip_prefix(prefix))
        .filter(|v| !v.is_empty())
}

/// Tags of `inst` that start with one of `prefixes`, in the instance's order.
fn tags_with_prefix(cluster: &Cluster, inst: InstId, prefixes: &[&str]) -> Vec<String> {
    cluster
        .instance(inst)
        .tags
        .iter()
        .filter(|t| prefixes.iter().any(|p| t.starts_with(p)))
        .cloned()
        .collect()
}

/// The instance's exclusion tags (Ganeti's `exclTags`).
pub fn exclusion_tags(cluster: &Cluster, inst: InstId) -> Vec<String> {
    let prefixes: Vec<&str> = cluster_values(cluster, EXCLUSION_PREFIX).collect();
    tags_with_prefix(cluster, inst, &prefixes)
}

/// The failure domains the instance wants its primary in (`dsrdLocTags`).
pub fn desired_locations(cluster: &Cluster, inst: InstId) -> BTreeSet<String> {
    let prefixes: Vec<&str> = cluster_values(cluster, DESIRED_LOCATION_PREFIX).collect();
    tags_with_prefix(cluster, inst, &prefixes)
        .into_iter()
        .collect()
}

/// The failure domains a node belongs to (Ganeti's `locationTags`).
pub fn node_locations(cluster: &Cluster, node: NodeId) -> BTreeSet<String> {
    let node_tags = &cluster.node(node).tags;
    cluster_values(cluster, LOCATION_PREFIX)
        .flat_map(|p| {
            let p = format!("{p}:");
            node_tags
                .iter()
                .filter(move |t| t.starts_with(&p))
                .cloned()
                .collect::<Vec<_>>()
        })
        .collect()
}
