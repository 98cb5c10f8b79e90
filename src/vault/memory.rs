//! The in-process store: same check-and-set and version semantics as Vault KV v2.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::{Cas, Record, SecretStore, StoreError, StoreHealth, StorePath, VersionInfo, Versioned};

/// A [`SecretStore`] held in memory, for tests and the local sandbox.
///
/// Versions start at 1 and increase by one per write; only the newest `max_versions` are
/// kept (like Vault's `max_versions`). Data is lost when the process exits.
///
/// [`MemoryStore::set_sealed`] and [`MemoryStore::set_unreachable`] make every call fail the
/// way a sealed or unreachable Vault does, so controller tests can exercise those paths.
#[derive(Debug)]
pub struct MemoryStore {
    max_versions: usize,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    paths: HashMap<String, Entry>,
    sealed: bool,
    unreachable: bool,
}

#[derive(Debug)]
struct Entry {
    current: u64,
    versions: BTreeMap<u64, (Record, DateTime<Utc>)>,
}

impl MemoryStore {
    /// A store keeping the newest `max_versions` versions of each path (at least 1).
    pub fn new(max_versions: usize) -> Self {
        Self {
            max_versions: max_versions.max(1),
            state: Mutex::new(State::default()),
        }
    }

    /// Makes every call fail with [`StoreError::Sealed`] until called with `false`.
    pub fn set_sealed(&self, sealed: bool) {
        self.lock().sealed = sealed;
    }

    /// Makes every call fail with [`StoreError::Unreachable`] until called with `false`.
    pub fn set_unreachable(&self, unreachable: bool) {
        self.lock().unreachable = unreachable;
    }

    /// The metadata last written at `path` (what Vault keeps as `custom_metadata`).
    pub fn metadata(&self, path: &StorePath) -> Option<BTreeMap<String, String>> {
        let state = self.lock();
        let entry = state.paths.get(path.as_str())?;
        entry
            .versions
            .get(&entry.current)
            .map(|(r, _)| r.metadata.clone())
    }

    /// Every path that currently holds data (for assertions in tests).
    pub fn paths(&self) -> Vec<String> {
        let mut paths: Vec<String> = self.lock().paths.keys().cloned().collect();
        paths.sort();
        paths
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the map half-updated (every update is
        // a single insert), so a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check(state: &State) -> Result<(), StoreError> {
        if state.unreachable {
            return Err(StoreError::Unreachable {
                address: "memory".into(),
                detail: "the in-memory store was set unreachable".into(),
            });
        }
        if state.sealed {
            return Err(StoreError::Sealed {
                address: "memory".into(),
            });
        }
        Ok(())
    }
}

impl Default for MemoryStore {
    /// Keeps 10 versions, Vault's default.
    fn default() -> Self {
        Self::new(10)
    }
}

fn describe(current: Option<u64>) -> String {
    match current {
        None => "absent".into(),
        Some(v) => format!("version {v}"),
    }
}

#[async_trait]
impl SecretStore for MemoryStore {
    fn backend(&self) -> &'static str {
        "memory"
    }

    async fn write_record(
        &self,
        path: &StorePath,
        record: &Record,
        cas: Cas,
    ) -> Result<u64, StoreError> {
        let mut state = self.lock();
        Self::check(&state)?;
        let current = state.paths.get(path.as_str()).map(|e| e.current);
        let matches = match (cas, current) {
            (Cas::Absent, None) => true,
            (Cas::Version(want), Some(have)) => want == have,
            _ => false,
        };
        if !matches {
            return Err(StoreError::Conflict {
                path: path.to_string(),
                expected: cas.to_string(),
                found: describe(current),
            });
        }
        let entry = state
            .paths
            .entry(path.as_str().to_owned())
            .or_insert_with(|| Entry {
                current: 0,
                versions: BTreeMap::new(),
            });
        entry.current += 1;
        let version = entry.current;
        entry.versions.insert(version, (record.clone(), Utc::now()));
        while entry.versions.len() > self.max_versions {
            entry.versions.pop_first();
        }
        Ok(version)
    }

    async fn read_record(
        &self,
        path: &StorePath,
        version: Option<u64>,
    ) -> Result<Option<Versioned<Record>>, StoreError> {
        let state = self.lock();
        Self::check(&state)?;
        let Some(entry) = state.paths.get(path.as_str()) else {
            return Ok(None);
        };
        let want = version.unwrap_or(entry.current);
        Ok(entry.versions.get(&want).map(|(record, at)| Versioned {
            value: record.clone(),
            version: want,
            created_time: Some(*at),
        }))
    }

    async fn list_versions(&self, path: &StorePath) -> Result<Vec<VersionInfo>, StoreError> {
        let state = self.lock();
        Self::check(&state)?;
        Ok(state
            .paths
            .get(path.as_str())
            .map(|entry| {
                entry
                    .versions
                    .iter()
                    .map(|(v, (_, at))| VersionInfo {
                        version: *v,
                        created_time: Some(*at),
                        deleted: false,
                        destroyed: false,
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn delete(&self, path: &StorePath) -> Result<(), StoreError> {
        let mut state = self.lock();
        Self::check(&state)?;
        state.paths.remove(path.as_str());
        Ok(())
    }

    async fn health(&self) -> Result<StoreHealth, StoreError> {
        let state = self.lock();
        Self::check(&state)?;
        Ok(StoreHealth {
            backend: "memory",
            detail: format!("{} paths", state.paths.len()),
        })
    }
}
