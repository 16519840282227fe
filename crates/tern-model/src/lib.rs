//! The cluster model every other tern crate speaks: hosts (nodes), VMs (instances),
//! resources, load, placements, moves and plans, plus the Ganeti htools text format.
//!
//! Pure data and parsing: no I/O beyond reading and writing strings.
