//! Moves and plans: what a planner returns and an executor carries out.

use serde::{Deserialize, Serialize};

use crate::{Cluster, Error, InstId, Mobility, NodeId};

/// Live-migrate `inst`, whose primary is `from`, to `to`. For a DRBD instance
/// `to` is its secondary and the two swap roles.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Move {
    pub inst: InstId,
    pub from: NodeId,
    pub to: NodeId,
}

/// A sequence of moves and the score before and after them (lower is better).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub moves: Vec<Move>,
    pub initial_score: f64,
    pub final_score: f64,
}

impl Cluster {
    /// Checks that `mv` is a live migration the instance's disks allow, from
    /// where it runs now.
    pub fn check_move(&self, mv: Move) -> Result<(), Error> {
        let n = self.instances.len();
        let inst = self
            .instances
            .get(mv.inst.index())
            .ok_or(Error::NoSuchInstance {
                id: mv.inst,
                count: n,
            })?;
        let nodes = self.nodes.len();
        for id in [mv.from, mv.to] {
            if id.index() >= nodes {
                return Err(Error::NoSuchNode { id, count: nodes });
            }
        }
        if inst.primary != mv.from {
            return Err(Error::WrongSource {
                inst: inst.name.clone(),
                expected: self.node(inst.primary).name.clone(),
                given: self.node(mv.from).name.clone(),
            });
        }
        if !self.can_migrate_to(mv.inst, mv.to) {
            return Err(Error::CannotMigrate {
                inst: inst.name.clone(),
                template: inst.disk_template.as_str(),
                to: self.node(mv.to).name.clone(),
            });
        }
        Ok(())
    }

    /// Applies a checked move: the primary becomes `to`; for DRBD the old
    /// primary becomes the secondary.
    pub fn apply_move(&mut self, mv: Move) -> Result<(), Error> {
        self.check_move(mv)?;
        let swap = matches!(self.mobility(mv.inst), Mobility::SecondaryOnly(_));
        let inst = &mut self.instances[mv.inst.index()];
        inst.primary = mv.to;
        if swap {
            inst.secondary = Some(mv.from);
        }
        Ok(())
    }
}
