//! The control plane: cluster state, REST API, placement, balancing loop.
