//! Hypervisor drivers behind one trait: `qemu` (QMP) and `sim` (in-process).
