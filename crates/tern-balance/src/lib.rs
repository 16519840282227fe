//! Scores and planners: the pure decision code that keeps hosts evenly loaded.
//!
//! Takes a cluster snapshot (`tern_model`) and options, returns plans. No I/O, no clock.
//!
//! # Layout
//! - [`metric`]: scores with an incremental interface ([`metric::Metric`]).
//! - [`state`]: the planner's working placement and running sums.
//! - [`constraints`]: hard constraints and the [`Refusal`] reasons.
//! - [`synth`]: seeded unbalanced clusters for benchmarks and tests.
//! - [`planner`]: hbal-style steepest descent, [`plan`] and its step [`best_move`].
//! - [`lazy`]: many moves per step from a lazily updated candidate heap (`spread`).
//! - [`bound`]: the best score a move can reach, for the planner to stop early.

pub mod bound;
pub mod constraints;
pub mod lazy;
pub mod metric;
pub mod planner;
pub mod state;
pub mod synth;

pub use constraints::{Refusal, Refusals};
pub use planner::{best_move, plan, plan_spread, PlanOptions, Planned, Search};
pub use state::State;
