//! The discrete-event simulator: trace-driven load, periodic balancing and migrations
//! that take time and bandwidth, running the same planners as the real manager.
