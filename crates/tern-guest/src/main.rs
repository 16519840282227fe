//! The agent that runs inside a tern guest: workloads, status and health over a
//! serial channel to the host.
fn main() {}
