//! A [`SecretStore`] decorator that counts and times every call by operation and outcome
//! (`stripe_key_operator_store_requests_total`, `stripe_key_operator_store_request_duration_seconds`).

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;

use super::{Cas, Record, SecretStore, StoreError, StoreHealth, StorePath, VersionInfo, Versioned};
use crate::metrics::{Metrics, StoreCallLabels};
use crate::secret::SecretString;

/// Wraps a store and counts and times its calls.
pub struct InstrumentedStore {
    inner: Arc<dyn SecretStore>,
    metrics: Metrics,
}

impl std::fmt::Debug for InstrumentedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InstrumentedStore")
            .field("inner", &self.inner)
            .finish()
    }
}

impl InstrumentedStore {
    pub fn new(inner: Arc<dyn SecretStore>, metrics: Metrics) -> Self {
        Self { inner, metrics }
    }

    fn count<T>(&self, operation: &str, started: Instant, result: &Result<T, StoreError>) {
        let outcome = match result {
            Ok(_) => "success".to_string(),
            Err(e) => e.reason().to_string(),
        };
        let labels = StoreCallLabels {
            operation: operation.into(),
            outcome,
        };
        self.metrics
            .store_request_duration
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64());
        self.metrics.store_requests.get_or_create(&labels).inc();
    }
}

#[async_trait]
impl SecretStore for InstrumentedStore {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    async fn write_record(
        &self,
        path: &StorePath,
        record: &Record,
        cas: Cas,
    ) -> Result<u64, StoreError> {
        let started = Instant::now();
        let result = self.inner.write_record(path, record, cas).await;
        self.count("write", started, &result);
        result
    }

    async fn read_record(
        &self,
        path: &StorePath,
        version: Option<u64>,
    ) -> Result<Option<Versioned<Record>>, StoreError> {
        let started = Instant::now();
        let result = self.inner.read_record(path, version).await;
        self.count("read", started, &result);
        result
    }

    async fn list_versions(&self, path: &StorePath) -> Result<Vec<VersionInfo>, StoreError> {
        let started = Instant::now();
        let result = self.inner.list_versions(path).await;
        self.count("list_versions", started, &result);
        result
    }

    async fn delete(&self, path: &StorePath) -> Result<(), StoreError> {
        let started = Instant::now();
        let result = self.inner.delete(path).await;
        self.count("delete", started, &result);
        result
    }

    async fn health(&self) -> Result<StoreHealth, StoreError> {
        let started = Instant::now();
        let result = self.inner.health().await;
        self.count("health", started, &result);
        result
    }

    async fn read_external_field(
        &self,
        path: &str,
        field: &str,
    ) -> Result<Option<SecretString>, StoreError> {
        let started = Instant::now();
        let result = self.inner.read_external_field(path, field).await;
        self.count("read_external", started, &result);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vault::{MemoryStore, StorePrefix};

    #[tokio::test]
    async fn calls_are_counted_by_operation_and_outcome() {
        let metrics = Metrics::new();
        let memory = Arc::new(MemoryStore::default());
        let store = InstrumentedStore::new(memory.clone(), metrics.clone());
        let path = StorePath::credential(
            &StorePrefix::new("p").unwrap(),
            "ns",
            "stripekeypolicy",
            "a",
        )
        .unwrap();
        assert!(store.read_record(&path, None).await.unwrap().is_none());
        memory.set_unreachable(true);
        assert!(store.read_record(&path, None).await.is_err());
        let text = metrics.encode();
        assert!(
            text.contains(
                r#"stripe_key_operator_store_requests_total{operation="read",outcome="success"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"stripe_key_operator_store_requests_total{operation="read",outcome="VaultUnreachable"} 1"#), "{text}");
        // Each call is timed under the same labels (the dashboard's store latency).
        for outcome in ["success", "VaultUnreachable"] {
            let count = format!(
                r#"stripe_key_operator_store_request_duration_seconds_count{{operation="read",outcome="{outcome}"}} 1"#
            );
            assert!(text.contains(&count), "{count} missing in:\n{text}");
        }
    }
}
