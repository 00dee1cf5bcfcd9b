//! The model registry: every model's loaded versions, which one is active, and since which
//! barrier each version scores rows in running views.
//!
//! Two readers with different needs:
//! - an ad-hoc query scores with the **active** version, the one the last statement chose;
//! - a view's operators score with the version in effect **for the epoch of the rows they
//!   process**. When a version is activated, the catalog tells the registry which barrier
//!   was the last one sent into the views (`after`); the new version takes effect for rows
//!   after the *next* barrier (`after + 1`). Every operator of every view switches when it
//!   passes that barrier, so within a view a row is filtered and scored by one version, and
//!   no operator ever switches in the middle of an epoch.
//!
//! The registry is only changed by the catalog, from the log's publish callbacks, so its
//! changes are ordered with table changes and barriers.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::model::Scorer;

/// Every model by name.
#[derive(Default)]
pub struct ModelRegistry {
    models: RwLock<BTreeMap<String, Arc<ModelEntry>>>,
}

/// One model: its versions and when each took effect.
pub struct ModelEntry {
    pub name: String,
    state: RwLock<EntryState>,
    /// Rows scored NULL because a feature was NULL or NaN, since the server started.
    pub null_scores: AtomicU64,
    /// Rows scored (all versions), since the server started.
    pub scored_rows: AtomicU64,
}

struct EntryState {
    versions: BTreeMap<u32, Arc<Scorer>>,
    active: Arc<Scorer>,
    /// `(after, version)`: rows after barrier `after` are scored by `version` in views.
    /// Ordered by `after`; the first entry has `after == 0`.
    effective: Vec<(u64, Arc<Scorer>)>,
}

fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    match lock.read() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    match lock.write() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

impl ModelRegistry {
    /// The model called `name`, if there is one. Model names are identifiers, folded to
    /// lower case unless quoted; a name in a string literal matches either way.
    pub fn get(&self, name: &str) -> Option<Arc<ModelEntry>> {
        let models = read(&self.models);
        models.get(name).or_else(|| models.get(&name.to_ascii_lowercase())).cloned()
    }

    /// Names of all models, sorted.
    pub fn names(&self) -> Vec<String> {
        read(&self.models).keys().cloned().collect()
    }

    /// Adds `scorer` as a version of its model and makes it active. `last_barrier` is the
    /// last barrier sent into the views: they switch at the one after it.
    pub fn install(&self, scorer: Scorer, last_barrier: u64) {
        let scorer = Arc::new(scorer);
        let name = scorer.model.name.clone();
        let version = scorer.model.version;
        let mut models = write(&self.models);
        match models.get(&name) {
            Some(entry) => {
                let mut state = write(&entry.state);
                state.versions.insert(version, scorer.clone());
                state.activate(scorer, last_barrier);
            }
            None => {
                let state = EntryState {
                    versions: BTreeMap::from([(version, scorer.clone())]),
                    active: scorer.clone(),
                    effective: vec![(0, scorer)],
                };
                models.insert(
                    name.clone(),
                    Arc::new(ModelEntry {
                        name,
                        state: RwLock::new(state),
                        null_scores: AtomicU64::new(0),
                        scored_rows: AtomicU64::new(0),
                    }),
                );
            }
        }
    }

    /// Makes a stored version active again (rollback); views switch after the next barrier.
    /// Returns false if the model or version does not exist.
    pub fn set_active(&self, name: &str, version: u32, last_barrier: u64) -> bool {
        let Some(entry) = self.get(name) else { return false };
        let mut state = write(&entry.state);
        let Some(scorer) = state.versions.get(&version).cloned() else { return false };
        state.activate(scorer, last_barrier);
        true
    }

    /// Forgets a model.
    pub fn remove(&self, name: &str) {
        write(&self.models).remove(name);
    }
}

impl EntryState {
    fn activate(&mut self, scorer: Arc<Scorer>, last_barrier: u64) {
        self.active = scorer.clone();
        let after = last_barrier + 1;
        // A later activation before that barrier replaces this one.
        self.effective.retain(|(a, _)| *a < after);
        self.effective.push((after, scorer));
    }
}

impl ModelEntry {
    /// The active version: what ad-hoc queries score with.
    pub fn active(&self) -> Arc<Scorer> {
        read(&self.state).active.clone()
    }

    /// The version in effect for rows after barrier `passed` (what a view scores with).
    pub fn in_effect_after(&self, passed: u64) -> Arc<Scorer> {
        let found = {
            let state = read(&self.state);
            let found = state.effective.iter().rev().find(|(after, _)| *after <= passed);
            found.or(state.effective.first()).map(|(_, scorer)| scorer.clone())
        };
        found.unwrap_or_else(|| self.active())
    }

    /// The active version number.
    pub fn active_version(&self) -> u32 {
        read(&self.state).active.model.version
    }

    /// Every stored version, oldest first.
    pub fn versions(&self) -> Vec<Arc<Scorer>> {
        read(&self.state).versions.values().cloned().collect()
    }

    /// The highest version number stored.
    pub fn latest_version(&self) -> u32 {
        read(&self.state).versions.keys().next_back().copied().unwrap_or(0)
    }

    /// Counts a scored batch.
    pub fn count(&self, rows: usize, nulls: usize) {
        self.scored_rows.fetch_add(rows as u64, Ordering::Relaxed);
        if nulls > 0 {
            self.null_scores.fetch_add(nulls as u64, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ml::model::{Column, FORMAT, FORMAT_VERSION, Model, Trained};

    fn scorer(version: u32) -> Scorer {
        Scorer::new(Model {
            format: FORMAT.into(),
            format_version: FORMAT_VERSION,
            name: "m".into(),
            version,
            params: Default::default(),
            features: vec![Column { name: "x".into(), sql_type: "double precision".into() }],
            label: None,
            training_query: None,
            training_rows: 1,
            metrics: Default::default(),
            created_at: String::new(),
            retrain_every: None,
            trained: Trained::Kmeans { centroids: vec![vec![version as f64]] },
        })
        .expect("valid")
    }

    #[test]
    fn views_switch_at_the_barrier_after_activation() {
        let registry = ModelRegistry::default();
        registry.install(scorer(1), 0);
        let entry = registry.get("m").expect("installed");
        // Activated while barrier 7 was the last one sent: rows after barrier 8 use v2.
        registry.install(scorer(2), 7);
        assert_eq!(entry.active_version(), 2);
        assert_eq!(entry.in_effect_after(7).model.version, 1);
        assert_eq!(entry.in_effect_after(8).model.version, 2);
        // Rolled back before barrier 8 was sent: v2 never takes effect.
        assert!(registry.set_active("m", 1, 7));
        assert_eq!(entry.in_effect_after(9).model.version, 1);
        assert!(!registry.set_active("m", 5, 7));
    }
}
