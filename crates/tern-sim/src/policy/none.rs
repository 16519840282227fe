//! `none`: static placement. VMs stay where the initial placement put them.

use super::{Move, Policy};
use crate::state::State;

pub struct Static;

impl Policy for Static {
    fn name(&self) -> &'static str {
        "none"
    }

    fn plan(&mut self, _state: &State, _now: f64) -> Vec<Move> {
        Vec::new()
    }
}
