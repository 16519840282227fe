//! The telemetry of the migrations under way: written by the control loop as the
//! sources report, read by the API beside each running migration's record. Memory
//! only: it is worthless once a migration ends.

use std::collections::BTreeMap;
use std::sync::Mutex;

use crate::client::Progress;

/// The latest telemetry of each migration under way, by migration id.
#[derive(Default)]
pub struct LiveMigrations(Mutex<BTreeMap<u64, Progress>>);

impl LiveMigrations {
    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Progress>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The latest telemetry of migration `id`, if it runs and reported any.
    pub fn get(&self, id: u64) -> Option<Progress> {
        self.map().get(&id).cloned()
    }

    /// Every running migration's latest telemetry.
    pub fn all(&self) -> BTreeMap<u64, Progress> {
        self.map().clone()
    }

    pub(crate) fn set(&self, id: u64, p: Progress) {
        self.map().insert(id, p);
    }

    pub(crate) fn end(&self, id: u64) {
        self.map().remove(&id);
    }

    /// Forgets the telemetry of every migration `running` does not hold: one whose end
    /// this manager never committed (another manager led when it ended) would stay for
    /// ever otherwise.
    pub(crate) fn retain_running(&self, running: &BTreeMap<u64, impl Sized>) {
        self.map().retain(|id, _| running.contains_key(id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn telemetry_of_migrations_no_longer_running_is_forgotten() {
        let live = LiveMigrations::default();
        for id in 1..=3 {
            live.set(id, Progress::default());
        }
        let running: BTreeMap<u64, ()> = [(2, ())].into();
        live.retain_running(&running);
        assert_eq!(live.all().into_keys().collect::<Vec<_>>(), vec![2]);
    }
}
