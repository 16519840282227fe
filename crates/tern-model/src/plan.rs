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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ganeti;

    const TEXT: &str = "g|u|preferred||\n\n\
        a|4096|0|4096|1000|1000|4|N|u\n\
        b|4096|0|4096|1000|1000|4|N|u\n\
        c|4096|0|4096|1000|1000|4|N|u\n\n\
        shared|128|10|1|running|Y|a||rbd|\n\
        mirrored|128|10|1|running|Y|a|b|drbd|\n\
        local|128|10|1|running|Y|a||plain|\n\n\n";

    fn ids(c: &Cluster, inst: &str) -> InstId {
        c.find_instance(inst).unwrap()
    }

    #[test]
    fn mobility_follows_the_disk_template() {
        let c = ganeti::parse(TEXT).unwrap();
        let (a, b, cn) = (NodeId(0), NodeId(1), NodeId(2));
        assert_eq!(c.mobility(ids(&c, "shared")), Mobility::AnyNode);
        assert_eq!(c.mobility(ids(&c, "mirrored")), Mobility::SecondaryOnly(b));
        assert_eq!(c.mobility(ids(&c, "local")), Mobility::Immovable);
        assert!(c.can_migrate_to(ids(&c, "shared"), cn));
        assert!(!c.can_migrate_to(ids(&c, "shared"), a), "already there");
        assert!(!c.can_migrate_to(ids(&c, "mirrored"), cn));
        let by_node = c.instances_by_node();
        assert_eq!(by_node.primaries[0].len(), 3);
        assert_eq!(by_node.secondaries[1], vec![ids(&c, "mirrored")]);
    }

    #[test]
    fn drbd_move_swaps_primary_and_secondary() {
        let mut c = ganeti::parse(TEXT).unwrap();
        let i = ids(&c, "mirrored");
        c.apply_move(Move {
            inst: i,
            from: NodeId(0),
            to: NodeId(1),
        })
        .unwrap();
        assert_eq!(c.instance(i).primary, NodeId(1));
        assert_eq!(c.instance(i).secondary, Some(NodeId(0)));
    }

    #[test]
    fn refused_moves_name_the_reason_and_change_nothing() {
        let mut c = ganeti::parse(TEXT).unwrap();
        let before = c.clone();
        let local = ids(&c, "local");
        let err = c.apply_move(Move {
            inst: local,
            from: NodeId(0),
            to: NodeId(1),
        });
        assert!(matches!(
            err,
            Err(Error::CannotMigrate {
                template: "plain",
                ..
            })
        ));
        let shared = ids(&c, "shared");
        let err = c.apply_move(Move {
            inst: shared,
            from: NodeId(1),
            to: NodeId(2),
        });
        assert!(matches!(err, Err(Error::WrongSource { .. })));
        let err = c.apply_move(Move {
            inst: InstId(9),
            from: NodeId(0),
            to: NodeId(1),
        });
        assert!(matches!(err, Err(Error::NoSuchInstance { .. })));
        assert_eq!(c, before);
    }

    #[test]
    fn plans_serialize_as_plain_json_values() {
        let plan = Plan {
            moves: vec![Move {
                inst: InstId(1),
                from: NodeId(0),
                to: NodeId(2),
            }],
            initial_score: 2.5,
            final_score: 1.0,
        };
        let v = serde_json::to_value(&plan).unwrap();
        assert_eq!(v["moves"][0]["to"], 2);
        assert_eq!(serde_json::from_value::<Plan>(v).unwrap(), plan);
    }
}
