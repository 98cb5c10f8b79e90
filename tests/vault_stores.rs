//! One behavioural contract for every [`SecretStore`] backend, run against the in-memory
//! store, the Kubernetes-Secret store (on a fake API server that enforces `resourceVersion`
//! like the real one) and, in `vault_openbao.rs`, Vault itself.

use std::collections::HashMap;
use std::pin::pin;
use std::sync::{Arc, Mutex};

use http::{Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{Value, json};
use stripe_key_operator::secret::SecretString;
use stripe_key_operator::vault::{
    AccountKey, Cas, CredentialBundle, KeyMaterial, KubeSecretStore, MemoryStore, Owner,
    SecretStore, StorePath, StorePrefix,
};

fn owner() -> Owner {
    Owner {
        namespace: "shop".into(),
        kind: "StripeKey".into(),
        name: "checkout".into(),
        uid: "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d".into(),
    }
}

fn material(n: u64) -> KeyMaterial {
    KeyMaterial::new(
        SecretString::new(format!("rk_test_contract_secret_{n:04}")),
        format!("rk_id_{n}"),
    )
}

fn path(name: &str) -> StorePath {
    StorePath::credential(&StorePrefix::new("sko").unwrap(), "shop", "stripekey", name).unwrap()
}

/// What every backend must do. `max_versions` is the store's configured limit (3 here).
async fn contract(store: Arc<dyn SecretStore>) {
    let p = path("checkout");
    assert!(store.read_bundle(&p).await.unwrap().is_none());
    assert!(store.list_versions(&p).await.unwrap().is_empty());
    store.delete(&p).await.unwrap(); // absent: still fine

    // First write is create-only.
    let first = CredentialBundle::initial(owner(), material(0));
    assert_eq!(
        store.write_bundle(&p, &first, Cas::Absent).await.unwrap(),
        1
    );
    let again = store
        .write_bundle(&p, &first, Cas::Absent)
        .await
        .unwrap_err();
    assert!(again.is_conflict(), "{again}");
    assert_eq!(again.reason(), "VaultConflict");

    // A stale version is a conflict, not an overwrite.
    let second = first.rotated(material(1));
    assert_eq!(
        store
            .write_bundle(&p, &second, Cas::Version(1))
            .await
            .unwrap(),
        2
    );
    let stale = store
        .write_bundle(&p, &first.rotated(material(99)), Cas::Version(1))
        .await
        .unwrap_err();
    assert!(stale.is_conflict(), "{stale}");
    assert!(stale.is_transient());
    let read = store.read_bundle(&p).await.unwrap().unwrap();
    assert_eq!(read.version, 2);
    assert_eq!(read.value, second, "the stale writer changed nothing");

    // Versions are kept up to the limit, then the oldest are pruned.
    let mut bundle = second;
    for n in 2..=4u64 {
        bundle = bundle.rotated(material(n));
        let v = store
            .write_bundle(&p, &bundle, Cas::Version(n))
            .await
            .unwrap();
        assert_eq!(v, n + 1);
    }
    let versions: Vec<u64> = store
        .list_versions(&p)
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.version)
        .collect();
    assert_eq!(versions, vec![3, 4, 5]);
    assert!(
        store
            .read_bundle_version(&p, Some(2))
            .await
            .unwrap()
            .is_none()
    );
    let v3 = store
        .read_bundle_version(&p, Some(3))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(v3.value.current.key_id, "rk_id_2");
    assert_eq!(v3.value.previous.unwrap().key_id, "rk_id_1");

    // Concurrent writers from the same read: exactly one wins.
    let base = store.read_bundle(&p).await.unwrap().unwrap();
    let mut tasks = Vec::new();
    for i in 0..6u64 {
        let store = store.clone();
        let p = p.clone();
        let next = base.value.rotated(material(100 + i));
        let cas = Cas::Version(base.version);
        tasks.push(tokio::spawn(async move {
            store.write_bundle(&p, &next, cas).await
        }));
    }
    let mut wins = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => wins += 1,
            Err(e) => assert!(e.is_conflict(), "{e}"),
        }
    }
    assert_eq!(wins, 1);

    // Account keys have their own path kind.
    let kp = StorePath::account_key(&StorePrefix::new("sko").unwrap(), "acme").unwrap();
    let key = AccountKey {
        account: "acme".into(),
        private_key_pem: SecretString::new(
            "-----BEGIN PRIVATE KEY-----\nMIIBVQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----\n",
        ),
    };
    assert_eq!(
        store
            .write_account_key(&kp, &key, Cas::Absent)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        store.read_account_key(&kp).await.unwrap().unwrap().value,
        key
    );
    assert_eq!(
        store.read_bundle(&kp).await.unwrap_err().reason(),
        "InvalidStorePath"
    );

    // Cleanup removes everything at the path.
    store.delete(&p).await.unwrap();
    assert!(store.read_bundle(&p).await.unwrap().is_none());
    assert!(store.list_versions(&p).await.unwrap().is_empty());
    assert_eq!(
        store.write_bundle(&p, &first, Cas::Absent).await.unwrap(),
        1,
        "a deleted path starts over"
    );
    store.health().await.unwrap();
}

#[tokio::test]
async fn memory_store_keeps_the_store_contract() {
    contract(Arc::new(MemoryStore::new(3))).await;
}

#[tokio::test]
async fn memory_store_can_simulate_a_sealed_or_unreachable_vault() {
    let store = MemoryStore::new(3);
    let p = path("sim");
    store
        .write_bundle(
            &p,
            &CredentialBundle::initial(owner(), material(0)),
            Cas::Absent,
        )
        .await
        .unwrap();
    store.set_sealed(true);
    assert_eq!(
        store.read_bundle(&p).await.unwrap_err().reason(),
        "VaultSealed"
    );
    assert_eq!(store.health().await.unwrap_err().reason(), "VaultSealed");
    store.set_sealed(false);
    store.set_unreachable(true);
    let err = store.read_bundle(&p).await.unwrap_err();
    assert_eq!(err.reason(), "VaultUnreachable");
    assert!(err.is_transient());
    store.set_unreachable(false);
    assert!(store.read_bundle(&p).await.unwrap().is_some());
    let meta = store.metadata(&p).unwrap();
    assert_eq!(meta["owner-uid"], owner().uid);
    assert!(meta.values().all(|v| !v.contains("contract_secret")));
    assert_eq!(store.paths(), vec![p.as_str().to_owned()]);
}

/// A fake Kubernetes API server for Secrets in one namespace, enforcing create-only POST and
/// `resourceVersion` preconditions on PUT like the real API server.
#[derive(Default)]
struct FakeSecrets {
    objects: HashMap<String, Value>,
    next_rv: u64,
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code.as_u16(),
    });
    Response::builder()
        .status(code)
        .body(Body::from(body.to_string().into_bytes()))
        .unwrap()
}

fn ok(code: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .body(Body::from(body.to_string().into_bytes()))
        .unwrap()
}

impl FakeSecrets {
    fn handle(&mut self, method: &http::Method, path: &str, body: &[u8]) -> Response<Body> {
        let prefix = "/api/v1/namespaces/operator/secrets";
        let rest = path
            .strip_prefix(prefix)
            .expect("only Secrets in namespace operator");
        let name = rest.trim_start_matches('/');
        match (method.as_str(), name.is_empty()) {
            ("GET", true) => ok(
                StatusCode::OK,
                &json!({"kind": "PartialObjectMetadataList", "apiVersion": "meta.k8s.io/v1",
                        "metadata": {}, "items": []}),
            ),
            ("GET", false) => match self.objects.get(name) {
                Some(obj) => ok(StatusCode::OK, obj),
                None => status(StatusCode::NOT_FOUND, "NotFound", "secrets not found"),
            },
            ("POST", true) => {
                let mut obj: Value = serde_json::from_slice(body).unwrap();
                let name = obj["metadata"]["name"].as_str().unwrap().to_owned();
                if self.objects.contains_key(&name) {
                    return status(StatusCode::CONFLICT, "AlreadyExists", "already exists");
                }
                self.next_rv += 1;
                obj["metadata"]["resourceVersion"] = json!(self.next_rv.to_string());
                self.objects.insert(name, obj.clone());
                ok(StatusCode::CREATED, &obj)
            }
            ("PUT", false) => {
                let mut obj: Value = serde_json::from_slice(body).unwrap();
                let Some(existing) = self.objects.get(name) else {
                    return status(StatusCode::NOT_FOUND, "NotFound", "secrets not found");
                };
                if obj["metadata"]["resourceVersion"] != existing["metadata"]["resourceVersion"] {
                    return status(
                        StatusCode::CONFLICT,
                        "Conflict",
                        "the object has been modified; please apply your changes to the latest version and try again",
                    );
                }
                self.next_rv += 1;
                obj["metadata"]["resourceVersion"] = json!(self.next_rv.to_string());
                self.objects.insert(name.to_owned(), obj.clone());
                ok(StatusCode::OK, &obj)
            }
            ("DELETE", false) => match self.objects.remove(name) {
                Some(_) => ok(
                    StatusCode::OK,
                    &json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                            "status": "Success", "code": 200}),
                ),
                None => status(StatusCode::NOT_FOUND, "NotFound", "secrets not found"),
            },
            other => panic!("unexpected request {other:?} {path}"),
        }
    }
}

fn fake_api() -> (
    kube::Client,
    Arc<Mutex<FakeSecrets>>,
    tokio::task::JoinHandle<()>,
) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let state = Arc::new(Mutex::new(FakeSecrets::default()));
    let server_state = state.clone();
    let task = tokio::spawn(async move {
        let mut handle = pin!(handle);
        while let Some((request, send)) = handle.next_request().await {
            let method = request.method().clone();
            let path = request.uri().path().to_owned();
            let body = request.into_body().collect_bytes().await.unwrap();
            let response = server_state.lock().unwrap().handle(&method, &path, &body);
            send.send_response(response);
        }
    });
    (kube::Client::new(service, "operator"), state, task)
}

#[tokio::test]
async fn kubernetes_secret_store_keeps_the_store_contract() {
    let (client, _state, task) = fake_api();
    contract(Arc::new(KubeSecretStore::new(client, "operator", 3))).await;
    task.abort();
}

#[tokio::test]
async fn kubernetes_secret_store_lays_out_one_labelled_secret_per_path() {
    let (client, state, task) = fake_api();
    let store = KubeSecretStore::new(client, "operator", 2);
    let p = path("checkout").with_sub_path("live").unwrap();
    let first = CredentialBundle::initial(owner(), material(0));
    store.write_bundle(&p, &first, Cas::Absent).await.unwrap();
    let second = first.rotated(material(1));
    store
        .write_bundle(&p, &second, Cas::Version(1))
        .await
        .unwrap();
    store
        .write_bundle(&p, &second.rotated(material(2)), Cas::Version(2))
        .await
        .unwrap();

    let name = KubeSecretStore::secret_name(&p);
    assert!(name.starts_with("sko-store-") && name.len() <= 63, "{name}");
    let obj = state.lock().unwrap().objects[&name].clone();
    let labels = &obj["metadata"]["labels"];
    assert_eq!(
        labels["app.kubernetes.io/managed-by"],
        json!("stripe-key-operator")
    );
    assert_eq!(
        labels["stripe-key-operator.io/owner-uid"],
        json!(owner().uid)
    );
    assert_eq!(
        labels["stripe-key-operator.io/owner-namespace"],
        json!("shop")
    );
    let annotations = &obj["metadata"]["annotations"];
    assert_eq!(
        annotations["stripe-key-operator.io/store-path"],
        json!(p.as_str())
    );
    assert_eq!(
        annotations["meta.stripe-key-operator.io/key-id"],
        json!("rk_id_2")
    );
    // Only the kept versions (2 and 3) remain in the data; version 1 was pruned.
    let keys: Vec<&String> = obj["data"].as_object().unwrap().keys().collect();
    assert!(
        keys.iter()
            .all(|k| k.starts_with("v2.") || k.starts_with("v3.")),
        "{keys:?}"
    );
    assert!(keys.iter().any(|k| *k == "v3.secret"));
    // Annotations and labels never carry the secret.
    let meta_text = obj["metadata"].to_string();
    assert!(!meta_text.contains("contract_secret"));
    task.abort();
}
