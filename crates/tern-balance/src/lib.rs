//! Scores and planners: the pure decision code that keeps hosts evenly loaded.
//!
//! Takes a cluster snapshot (`tern_model`) and options, returns plans. No I/O, no clock:
//! time comes in as a value.
//!
//! # Layout
//! - [`metric`]: scores with an incremental interface ([`metric::Metric`]).
//! - [`state`]: the planner's working placement and running sums; [`score`] from scratch.
//! - [`refusal`]: the [`Refusal`] reasons a candidate is turned down, and their counts.
//! - [`constraints`]: hard constraints, checked on the planner's [`State`].
//! - [`synth`]: seeded unbalanced clusters for benchmarks and tests.
//! - [`planner`]: hbal-style steepest descent, [`plan`] and its step [`best_move`].
//! - [`round`]: one balancing round as the live manager runs it (and the simulator's
//!   `balance` policy): [`round::plan`] with its [`round::BalancerSettings`].
//! - [`lazy`]: many moves per step from a lazily updated candidate heap (`spread`).
//! - [`bound`]: the best score a move can reach, for the planner to stop early.

pub mod bound;
pub mod constraints;
pub mod lazy;
pub mod metric;
pub mod planner;
pub mod refusal;
pub mod round;
pub mod state;
pub mod synth;

pub use planner::{best_move, plan, plan_spread, PlanOptions, Planned, Search};
pub use refusal::{Refusal, Refusals};
pub use state::{score, State};
