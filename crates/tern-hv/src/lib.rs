//! Hypervisor drivers behind one trait: `qemu` (QMP) and `sim` (in-process).
//!
//! # Layout
//! - [`Hypervisor`] (in [`driver`]): the one async trait every driver implements, covering
//!   the VM lifecycle, per-VM metrics and the QMP steps the migration engine needs.
//! - [`spec`]: what a VM is made of ([`VmSpec`]) and its validation (pure).
//! - [`state`]: the VM state machine shared by both drivers (pure).
//! - [`disk`]: VM disks in the host's store: qcow2 files made with `qemu-img`, blank or
//!   as overlays on read-only images, and the checks before any is made.
//! - [`saved`]: a suspended VM's memory and device state in the store, written whole
//!   or not at all and claimed by one restoring host.
//! - [`accel`]: KVM or TCG, decided from a probed fact (pure decision, tiny probe).
//! - [`procfs`]: parsers for `/proc` files (vCPU thread CPU time, memory).
//! - [`qmp`]: a small async QMP client with timeouts.
//! - [`qemu`]: the QEMU driver (guest RAM in a shared memory-backend file on tmpfs).
//! - [`sim`]: the in-process driver for the simulator demo and tests.

pub mod accel;
pub mod disk;
pub mod driver;
pub mod error;
pub mod image;
pub mod procfs;
pub mod qemu;
pub mod qmp;
pub mod saved;
pub mod sim;
pub mod spec;
pub mod state;
pub mod teardown;

pub use driver::{Hypervisor, MigrationState, MigrationStatus, VcpuSample, VmInfo, VmMetrics};
pub use error::{HvError, Result};
pub use spec::{Nic, VmSpec};
pub use state::{Action, VmState};
