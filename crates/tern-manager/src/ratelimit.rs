//! Repeated warnings, rate-limited: the control loop retries a failing call every 200 ms,
//! and one line per retry per VM buries everything else in the log. Each key (a VM and
//! what failed) may warn once per [`WARN_EVERY`]; the next warning says how many were
//! held back meanwhile.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often one key may warn.
pub const WARN_EVERY: Duration = Duration::from_secs(30);

/// Keys remembered at most; past this, keys quiet for a whole period are forgotten.
const MAX_KEYS: usize = 4096;

/// When a key last warned and how many of its warnings were held back since.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Seen {
    at: Instant,
    held: u64,
}

/// Whether a warning for a key last seen as `seen` goes out at `now`; the key's new
/// state either way (pure). `Some(n)`: warn, mentioning `n` held back.
fn decide(seen: Option<Seen>, now: Instant, every: Duration) -> (Option<u64>, Seen) {
    match seen {
        Some(s) if now.duration_since(s.at) < every => (
            None,
            Seen {
                held: s.held + 1,
                ..s
            },
        ),
        s => (Some(s.map_or(0, |s| s.held)), Seen { at: now, held: 0 }),
    }
}

/// The rate limiter: one per control loop.
#[derive(Debug, Default)]
pub struct Warnings {
    seen: Mutex<HashMap<String, Seen>>,
}

impl Warnings {
    /// Whether `key` may warn now; `Some(n)`: yes, and `n` warnings were held back since
    /// it last did.
    pub fn allow(&self, key: &str) -> Option<u64> {
        self.allow_at(key, Instant::now())
    }

    fn allow_at(&self, key: &str, now: Instant) -> Option<u64> {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let (out, next) = decide(seen.get(key).copied(), now, WARN_EVERY);
        seen.insert(key.to_owned(), next);
        if seen.len() > MAX_KEYS {
            seen.retain(|_, s| now.duration_since(s.at) < WARN_EVERY);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_warns_once_per_period_and_counts_what_it_held_back() {
        let w = Warnings::default();
        let t0 = Instant::now();
        assert_eq!(w.allow_at("v1/create", t0), Some(0));
        // The control loop's 200 ms retries for the rest of the period: all held back.
        let retries = (WARN_EVERY.as_millis() / 200) as u32 - 1;
        for i in 1..=retries {
            assert_eq!(
                w.allow_at("v1/create", t0 + i * Duration::from_millis(200)),
                None
            );
        }
        assert_eq!(w.allow_at("v2/create", t0), Some(0), "keys are independent");
        assert_eq!(
            w.allow_at("v1/create", t0 + WARN_EVERY),
            Some(u64::from(retries))
        );
    }

    #[test]
    fn quiet_keys_are_forgotten_once_there_are_many() {
        let w = Warnings::default();
        let t0 = Instant::now();
        for i in 0..MAX_KEYS {
            w.allow_at(&format!("k{i}"), t0);
        }
        w.allow_at("late", t0 + WARN_EVERY * 2);
        assert_eq!(w.seen.lock().unwrap().len(), 1);
    }
}
