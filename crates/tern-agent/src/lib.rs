//! The host agent: runs VMs through `tern-hv`, reports load and serves migrations.
