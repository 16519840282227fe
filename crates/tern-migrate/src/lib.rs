//! Live migration: the pre-copy model, termination policies and the decisions the
//! migration engine takes round by round. Decisions are pure functions over telemetry.
