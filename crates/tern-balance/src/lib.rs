//! Scores and planners: the pure decision code that keeps hosts evenly loaded.
//!
//! Takes a cluster snapshot (`tern_model`) and options, returns plans. No I/O, no clock.
