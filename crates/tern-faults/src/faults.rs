//! The fault cases: a real fault injected into the real lab, measured and judged.

use crate::Case;

/// Every fault case, in the order they run.
pub fn cases() -> Vec<Case> {
    Vec::new()
}
