//! The Vault backend against a real OpenBao server (`bao`, installed by
//! `.ci/install-tools.sh`). Each test starts its own server on a free 127.0.0.1 port and
//! isolates its data by KV mount; the server is killed when the test ends or panics.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::openbao::{OpenBao, TokenReviewer, free_port, random_token, service_account_jwt};
use serde_json::json;
use stripe_key_operator::secret::SecretString;
use stripe_key_operator::vault::{
    AccountKey, Cas, CredentialBundle, KeyMaterial, Owner, SecretStore, StoreError, StorePath,
    StorePrefix, VaultAuth, VaultConfig, VaultStore,
};

/// A self-signed public certificate (its key was discarded): OpenBao insists on a CA for the
/// Kubernetes auth config, but the fake API server is plain http on 127.0.0.1.
const UNUSED_KUBERNETES_CA: &str = "-----BEGIN CERTIFICATE-----
MIIBkTCCATegAwIBAgIUdZu8kOIO7/pI+ZLerka6XsPHg+wwCgYIKoZIzj0EAwIw
HTEbMBkGA1UEAwwSdGVzdC1rdWJlcm5ldGVzLWNhMCAXDTI2MTEyODIxMzY1NFoY
DzIxMjYxMTA0MjEzNjU0WjAdMRswGQYDVQQDDBJ0ZXN0LWt1YmVybmV0ZXMtY2Ew
WTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAAS9eeVBOQW2FcUx9f3o+Fz8UsBBrybw
kok/SNOYc8fFfkowYWOl3eEzHlWKp48lrHVwzbYIZivmuaaWH4AGysxfo1MwUTAd
BgNVHQ4EFgQUSzhlpD0Dl23gdMYL3unafhJQo4gwHwYDVR0jBBgwFoAUSzhlpD0D
l23gdMYL3unafhJQo4gwDwYDVR0TAQH/BAUwAwEB/zAKBggqhkjOPQQDAgNIADBF
AiEAx4Zi78w8a618+4SWOZNh1FbcYJ52a+FjOx0G1sm+yjoCIEDxVzsULWBM2ehr
VKDJUGCzklMjr8P4chb7mL58wl5f
-----END CERTIFICATE-----
";

const OWNER_UID: &str = "6f1c2d3e-4b5a-4c6d-8e7f-9a0b1c2d3e4f";

fn owner(name: &str) -> Owner {
    Owner {
        namespace: "shop".into(),
        kind: "StripeKey".into(),
        name: name.into(),
        uid: OWNER_UID.into(),
    }
}

/// Secret number `n` of a test's sequence: distinct, recognisable, never a real key.
fn secret(tag: &str, n: u64) -> SecretString {
    SecretString::new(format!("rk_test_{tag}_{n:04}_{}", random_token("")))
}

/// Secret `n` of a known sequence, so a stored bundle can be checked for consistency.
fn seq_secret(tag: &str, n: u64) -> SecretString {
    SecretString::new(format!("rk_test_{tag}_{n:06}"))
}

fn seq_material(tag: &str, n: u64) -> KeyMaterial {
    KeyMaterial::new(seq_secret(tag, n), format!("rk_id_{n}"))
}

fn path(prefix: &str, name: &str) -> StorePath {
    StorePath::credential(
        &StorePrefix::new(prefix).unwrap(),
        "shop",
        "stripekey",
        name,
    )
    .unwrap()
}

fn config(bao: &OpenBao, mount: &str, auth: VaultAuth) -> VaultConfig {
    let mut config = VaultConfig::new(bao.addr(), auth);
    config.kv_mount = mount.into();
    config.request_timeout = Duration::from_secs(5);
    config
}

fn root_store(bao: &OpenBao, mount: &str) -> VaultStore {
    let auth = VaultAuth::Token(SecretString::new(bao.root_token()));
    VaultStore::new(config(bao, mount, auth)).unwrap()
}

async fn new_mount(bao: &OpenBao) -> String {
    let mount = random_token("kv-").to_lowercase();
    bao.enable_kv2(&mount).await;
    mount
}

fn first_bundle(tag: &str, name: &str) -> CredentialBundle {
    CredentialBundle::initial(owner(name), KeyMaterial::new(secret(tag, 0), "rk_id_0"))
}

#[tokio::test]
async fn concurrent_writers_conflict_instead_of_overwriting() {
    let bao = OpenBao::start_dev().await;
    let mount = new_mount(&bao).await;
    let store: Arc<dyn SecretStore> = Arc::new(root_store(&bao, &mount));
    let p = path("sko", "checkout");

    let v1 = store
        .write_bundle(&p, &first_bundle("cas", "checkout"), Cas::Absent)
        .await
        .unwrap();
    assert_eq!(v1, 1);
    // A second "first write" must not replace the existing bundle.
    let err = store
        .write_bundle(&p, &first_bundle("cas", "checkout"), Cas::Absent)
        .await
        .unwrap_err();
    assert!(err.is_conflict(), "{err}");
    assert_eq!(err.reason(), "VaultConflict");

    // Eight writers race from the same read: exactly one wins, the others get a typed conflict.
    let base = store.read_bundle(&p).await.unwrap().unwrap();
    let mut tasks = Vec::new();
    for i in 0..8u64 {
        let store = store.clone();
        let p = p.clone();
        let next = base
            .value
            .rotated(KeyMaterial::new(secret("race", i), format!("rk_race_{i}")));
        let cas = Cas::Version(base.version);
        tasks.push(tokio::spawn(async move {
            (i, store.write_bundle(&p, &next, cas).await)
        }));
    }
    let mut winners = Vec::new();
    for t in tasks {
        let (i, result) = t.await.unwrap();
        match result {
            Ok(version) => winners.push((i, version)),
            Err(e) => {
                assert!(e.is_conflict(), "writer {i}: expected a conflict, got {e}");
                assert!(e.is_transient());
                assert!(e.to_string().contains("version 1"), "{e}");
            }
        }
    }
    assert_eq!(winners.len(), 1, "exactly one writer may win: {winners:?}");
    let (winner, version) = winners[0];
    assert_eq!(version, 2);
    let now = store.read_bundle(&p).await.unwrap().unwrap();
    assert_eq!(now.version, 2);
    assert_eq!(now.value.current.key_id, format!("rk_race_{winner}"));
    assert_eq!(now.value.previous.as_ref().unwrap().key_id, "rk_id_0");

    // The loser retries from fresh state and succeeds.
    let retry = now
        .value
        .rotated(KeyMaterial::new(secret("retry", 1), "rk_retry"));
    assert_eq!(
        store
            .write_bundle(&p, &retry, Cas::Version(now.version))
            .await
            .unwrap(),
        3
    );
}

#[tokio::test]
async fn versions_are_kept_and_pruned_to_max_versions() {
    let bao = OpenBao::start_dev().await;
    let mount = new_mount(&bao).await;
    let mut cfg = config(
        &bao,
        &mount,
        VaultAuth::Token(SecretString::new(bao.root_token())),
    );
    cfg.max_versions = Some(3);
    let store = VaultStore::new(cfg).unwrap();
    let p = path("sko", "pruned");

    let mut bundle = first_bundle("prune", "pruned");
    let mut cas = Cas::Absent;
    for n in 1..=5u64 {
        let v = store.write_bundle(&p, &bundle, cas).await.unwrap();
        assert_eq!(v, n, "each bundle is exactly one KV write");
        cas = Cas::Version(v);
        bundle = bundle.rotated(KeyMaterial::new(secret("prune", n), format!("rk_id_{n}")));
    }
    let versions: Vec<u64> = store
        .list_versions(&p)
        .await
        .unwrap()
        .iter()
        .map(|v| v.version)
        .collect();
    assert_eq!(versions, vec![3, 4, 5]);
    assert!(
        store
            .read_bundle_version(&p, Some(1))
            .await
            .unwrap()
            .is_none(),
        "version 1 must be pruned"
    );
    let v4 = store
        .read_bundle_version(&p, Some(4))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(v4.version, 4);
    assert_eq!(v4.value.rotation, 3);
    assert_eq!(v4.value.current.key_id, "rk_id_3");
    let meta = bao.kv_metadata(&mount, p.as_str()).await;
    assert_eq!(meta["max_versions"], json!(3));
    assert_eq!(meta["cas_required"], json!(true));

    // Cleanup removes every version; deleting again is fine.
    store.delete(&p).await.unwrap();
    assert!(store.read_bundle(&p).await.unwrap().is_none());
    assert!(store.list_versions(&p).await.unwrap().is_empty());
    store.delete(&p).await.unwrap();
}

#[tokio::test]
async fn server_killed_during_rotations_leaves_a_whole_bundle_and_the_store_recovers() {
    // File storage (not dev mode) so the data survives the crash; the server is initialised
    // and unsealed by the harness, and sealed again after the restart until we unseal it.
    let mut bao = OpenBao::start_persistent().await;
    let store = Arc::new(root_store(&bao, "secret"));
    let p = path("sko", "crash");
    let tag = random_token("crash");
    let secret_n = |n: u64| seq_secret(&tag, n);
    let material = |n: u64| seq_material(&tag, n);

    store
        .write_bundle(
            &p,
            &CredentialBundle::initial(owner("crash"), material(0)),
            Cas::Absent,
        )
        .await
        .unwrap();

    let acknowledged = Arc::new(AtomicU64::new(0));
    let writer = {
        let store = store.clone();
        let p = p.clone();
        let acknowledged = acknowledged.clone();
        let tag = tag.clone();
        tokio::spawn(async move {
            // Rotate continuously until the server goes away (bounded: at most 10 000 rotations).
            for _ in 0..10_000 {
                let current = match store.read_bundle(&p).await {
                    Ok(Some(c)) => c,
                    Ok(None) => panic!("bundle vanished"),
                    Err(e) => return e,
                };
                let next = current
                    .value
                    .rotated(seq_material(&tag, current.value.rotation + 1));
                match store
                    .write_bundle(&p, &next, Cas::Version(current.version))
                    .await
                {
                    Ok(_) => acknowledged.store(next.rotation, Ordering::SeqCst),
                    Err(e) => return e,
                }
            }
            panic!("the server was never killed");
        })
    };
    while acknowledged.load(Ordering::SeqCst) < 5 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    bao.kill();
    let err = tokio::time::timeout(Duration::from_secs(30), writer)
        .await
        .expect("writer stops once the server is gone")
        .unwrap();
    assert_eq!(err.reason(), "VaultUnreachable", "{err}");
    assert!(err.is_transient());
    let acked = acknowledged.load(Ordering::SeqCst);

    bao.restart().await;
    // Restarted but sealed: a typed, transient error, not garbage.
    let sealed = store.read_bundle(&p).await.unwrap_err();
    assert_eq!(sealed.reason(), "VaultSealed", "{sealed}");
    assert!(matches!(
        store.health().await.unwrap_err(),
        StoreError::Sealed { .. }
    ));
    bao.unseal().await;

    let stored = store.read_bundle(&p).await.unwrap().unwrap();
    let k = stored.value.rotation;
    assert!(
        k == acked || k == acked + 1,
        "stored rotation {k} must be the last acknowledged ({acked}) or the one in flight"
    );
    // Whole bundle: current and previous are the pair of that rotation, never a mix.
    assert_eq!(stored.value.current.secret, secret_n(k));
    assert_eq!(stored.value.current.key_id, format!("rk_id_{k}"));
    let previous = stored.value.previous.clone().unwrap();
    assert_eq!(previous.secret, secret_n(k - 1));
    assert_eq!(previous.key_id, format!("rk_id_{}", k - 1));
    assert_eq!(stored.version, k + 1, "one KV version per rotation");

    // The store recovers without being rebuilt.
    store.health().await.unwrap();
    let next = stored.value.rotated(material(k + 1));
    let v = store
        .write_bundle(&p, &next, Cas::Version(stored.version))
        .await
        .unwrap();
    assert_eq!(v, stored.version + 1);
}

#[tokio::test]
async fn path_outside_the_policy_is_vault_permission_denied() {
    let bao = OpenBao::start_dev().await;
    let mount = new_mount(&bao).await;
    bao.put_policy(
        "only-allowed",
        &format!(
            r#"path "{mount}/data/allowed/*" {{ capabilities = ["create", "read", "update"] }}
path "{mount}/metadata/allowed/*" {{ capabilities = ["create", "read", "update", "delete"] }}"#
        ),
    )
    .await;
    let token = bao.create_token(&["only-allowed"], "1h").await;
    let store = VaultStore::new(config(
        &bao,
        &mount,
        VaultAuth::Token(SecretString::new(token.clone())),
    ))
    .unwrap();

    let allowed = path("allowed", "checkout");
    store
        .write_bundle(&allowed, &first_bundle("pol", "checkout"), Cas::Absent)
        .await
        .unwrap();
    assert!(store.read_bundle(&allowed).await.unwrap().is_some());

    let denied = path("forbidden", "checkout");
    let err = store
        .write_bundle(&denied, &first_bundle("pol", "checkout"), Cas::Absent)
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::PermissionDenied { .. }),
        "{err:?}"
    );
    assert_eq!(err.reason(), "VaultPermissionDenied");
    assert!(!err.is_transient());
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("{mount}/data/forbidden/shop/stripekey/checkout")),
        "message names the path to grant: {msg}"
    );
    assert!(!msg.contains(&token) && !format!("{err:?}").contains(&token));
    let read = store.read_bundle(&denied).await.unwrap_err();
    assert_eq!(read.reason(), "VaultPermissionDenied");
}

#[tokio::test]
async fn kubernetes_auth_logs_in_through_a_token_review() {
    let bao = OpenBao::start_dev().await;
    let mount = new_mount(&bao).await;
    let sa_uid = "0d9e8f7a-6b5c-4d3e-2f1a-0b9c8d7e6f5a";
    let jwt = service_account_jwt("operators", "stripe-key-operator", sa_uid);
    let reviewer =
        TokenReviewer::start(jwt.clone(), "operators", "stripe-key-operator", sa_uid).await;

    bao.put_policy(
        "operator",
        &format!(
            r#"path "{mount}/data/*" {{ capabilities = ["create", "read", "update"] }}
path "{mount}/metadata/*" {{ capabilities = ["create", "read", "update", "delete"] }}"#
        ),
    )
    .await;
    bao.api(
        "POST",
        "sys/auth/kubernetes",
        Some(json!({"type": "kubernetes"})),
    )
    .await;
    bao.api(
        "POST",
        "auth/kubernetes/config",
        Some(json!({
            "kubernetes_host": reviewer.url,
            // Required by OpenBao when the server has no in-cluster files; unused over http.
            "disable_local_ca_jwt": true,
            "kubernetes_ca_cert": UNUSED_KUBERNETES_CA,
        })),
    )
    .await;
    bao.api(
        "POST",
        "auth/kubernetes/role/operator",
        Some(json!({
            "bound_service_account_names": ["stripe-key-operator"],
            "bound_service_account_namespaces": ["operators"],
            "token_policies": ["operator"],
            "token_ttl": "1h",
        })),
    )
    .await;
    let token_file = bao.dir().join("sa-token");
    std::fs::write(&token_file, &jwt).unwrap();

    let auth = VaultAuth::Kubernetes {
        mount: "kubernetes".into(),
        role: "operator".into(),
        token_file: token_file.clone(),
    };
    let store = VaultStore::new(config(&bao, &mount, auth)).unwrap();
    let p = path("sko", "k8s");
    store
        .write_bundle(&p, &first_bundle("k8s", "k8s"), Cas::Absent)
        .await
        .unwrap();
    assert_eq!(
        store
            .read_bundle(&p)
            .await
            .unwrap()
            .unwrap()
            .value
            .owner
            .name,
        "k8s"
    );
    assert!(
        reviewer.reviews.load(Ordering::SeqCst) >= 1,
        "Vault must have asked the TokenReview endpoint"
    );
    let health = store.health().await.unwrap();
    assert!(health.detail.contains("kubernetes"), "{}", health.detail);

    // A role the service account is not bound to is a clear authentication failure.
    let wrong = VaultAuth::Kubernetes {
        mount: "kubernetes".into(),
        role: "no-such-role".into(),
        token_file,
    };
    let err = VaultStore::new(config(&bao, &mount, wrong))
        .unwrap()
        .read_bundle(&p)
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "VaultAuthFailed", "{err}");
    assert!(err.to_string().contains("no-such-role"), "{err}");
    assert!(!err.to_string().contains(&jwt));
}

#[tokio::test]
async fn approle_login_works_and_logs_in_again_after_its_token_is_revoked() {
    let bao = OpenBao::start_dev().await;
    let mount = new_mount(&bao).await;
    bao.put_policy(
        "operator",
        &format!(
            r#"path "{mount}/data/*" {{ capabilities = ["create", "read", "update"] }}
path "{mount}/metadata/*" {{ capabilities = ["create", "read", "update", "delete"] }}"#
        ),
    )
    .await;
    bao.api("POST", "sys/auth/approle", Some(json!({"type": "approle"})))
        .await;
    bao.api(
        "POST",
        "auth/approle/role/operator",
        Some(json!({"token_policies": ["operator"], "token_ttl": "1h"})),
    )
    .await;
    let role_id = bao
        .api("GET", "auth/approle/role/operator/role-id", None)
        .await["data"]["role_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let secret_id = bao
        .api("POST", "auth/approle/role/operator/secret-id", None)
        .await["data"]["secret_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let secret_id_file = bao.dir().join("secret-id");
    std::fs::write(&secret_id_file, format!("{secret_id}\n")).unwrap();

    let store = VaultStore::new(config(
        &bao,
        &mount,
        VaultAuth::approle(role_id, &secret_id_file),
    ))
    .unwrap();
    let p = path("sko", "approle");
    let v1 = store
        .write_bundle(&p, &first_bundle("ar", "approle"), Cas::Absent)
        .await
        .unwrap();

    assert_eq!(approle_tokens(&bao).await, 1, "one login so far");
    // Revoke every token AppRole issued: the store's next call gets 403, logs in, retries.
    bao.api("PUT", "sys/leases/revoke-prefix/auth/approle/login", None)
        .await;
    assert_eq!(
        approle_tokens(&bao).await,
        0,
        "the store's token is revoked"
    );
    let current = store.read_bundle(&p).await.unwrap().unwrap();
    assert_eq!(current.version, v1);
    let next = current
        .value
        .rotated(KeyMaterial::new(secret("ar", 1), "rk_ar_1"));
    assert_eq!(
        store
            .write_bundle(&p, &next, Cas::Version(v1))
            .await
            .unwrap(),
        v1 + 1
    );
    assert_eq!(approle_tokens(&bao).await, 1, "the store logged in again");
}

/// How many live tokens AppRole logins have issued (looked up by accessor, as root).
async fn approle_tokens(bao: &OpenBao) -> usize {
    let list = bao.api("LIST", "auth/token/accessors", None).await;
    let mut count = 0;
    for accessor in list["data"]["keys"].as_array().unwrap() {
        let info = bao
            .api(
                "POST",
                "auth/token/lookup-accessor",
                Some(json!({"accessor": accessor})),
            )
            .await;
        if info["data"]["path"] == json!("auth/approle/login") {
            count += 1;
        }
    }
    count
}

#[tokio::test]
async fn short_lived_tokens_are_renewed_and_outlive_their_first_ttl() {
    let bao = OpenBao::start_dev().await;
    let mount = new_mount(&bao).await;
    bao.put_policy(
        "operator",
        &format!(
            r#"path "{mount}/data/*" {{ capabilities = ["create", "read", "update"] }}
path "{mount}/metadata/*" {{ capabilities = ["create", "read", "update", "delete"] }}"#
        ),
    )
    .await;
    let ttl = Duration::from_secs(9);
    // Control: a token nobody renews really expires on this server.
    let control = bao.create_token(&["operator"], "9s").await;
    // Renewed on use (no background task) when under a third (3 s) is left; used every 1.5 s.
    let on_use = bao.create_token(&["operator"], "9s").await;
    // Renewed by the background task while the store sits idle.
    let idle = bao.create_token(&["operator"], "9s").await;

    let on_use_store = VaultStore::new(config(
        &bao,
        &mount,
        VaultAuth::Token(SecretString::new(on_use)),
    ))
    .unwrap();
    let idle_store = Arc::new(
        VaultStore::new(config(
            &bao,
            &mount,
            VaultAuth::Token(SecretString::new(idle)),
        ))
        .unwrap(),
    );
    idle_store.login().await.unwrap();
    let renewer = idle_store.spawn_token_renewer();

    let p = path("sko", "renew");
    on_use_store
        .write_bundle(&p, &first_bundle("renew", "renew"), Cas::Absent)
        .await
        .unwrap();
    // Bounded: 8 rounds of 1.5 s = 12 s, well past the 9 s TTL.
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        on_use_store.read_bundle(&p).await.unwrap().unwrap();
    }
    assert!(
        bao.api_with_token(Some(&control), "GET", "auth/token/lookup-self", None)
            .await
            .is_err(),
        "the unrenewed control token should have expired after {ttl:?}"
    );
    let read = idle_store.read_bundle(&p).await.unwrap();
    assert!(read.is_some(), "the idle store's token was kept alive");
    renewer.abort();
}

#[tokio::test]
async fn sealed_vault_is_reported_as_vault_sealed() {
    let bao = OpenBao::start_dev().await;
    let mount = new_mount(&bao).await;
    let store = root_store(&bao, &mount);
    let p = path("sko", "sealed");
    store
        .write_bundle(&p, &first_bundle("seal", "sealed"), Cas::Absent)
        .await
        .unwrap();
    store.health().await.unwrap();

    bao.seal_with_cli();
    let health = store.health().await.unwrap_err();
    assert_eq!(health.reason(), "VaultSealed");
    assert!(health.is_transient());
    let read = store.read_bundle(&p).await.unwrap_err();
    assert_eq!(read.reason(), "VaultSealed", "{read}");
    assert!(read.to_string().contains("unseal"), "{read}");
    let write = store
        .write_bundle(&p, &first_bundle("seal", "sealed"), Cas::Version(1))
        .await
        .unwrap_err();
    assert_eq!(write.reason(), "VaultSealed");
}

#[tokio::test]
async fn account_rsa_key_round_trips_through_its_own_path() {
    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::rsa::{KeyPair, KeySize};
    use aws_lc_rs::signature::KeyPair as _;
    use base64::Engine;

    let bao = OpenBao::start_dev().await;
    let mount = new_mount(&bao).await;
    let store = root_store(&bao, &mount);
    let prefix = StorePrefix::new("sko").unwrap();
    let p = StorePath::account_key(&prefix, "acme-live").unwrap();
    assert_eq!(p.as_str(), "sko/_accounts/acme-live/encryption-key");

    let key = KeyPair::generate(KeySize::Rsa2048).unwrap();
    let der = AsDer::<aws_lc_rs::encoding::Pkcs8V1Der>::as_der(&key).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
    let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).unwrap());
        pem.push('\n');
    }
    pem.push_str("-----END PRIVATE KEY-----\n");
    let account_key = AccountKey {
        account: "acme-live".into(),
        private_key_pem: SecretString::new(pem.clone()),
    };

    assert!(store.read_account_key(&p).await.unwrap().is_none());
    assert_eq!(
        store
            .write_account_key(&p, &account_key, Cas::Absent)
            .await
            .unwrap(),
        1
    );
    let loaded = store.read_account_key(&p).await.unwrap().unwrap();
    assert_eq!(loaded.value, account_key);
    // The loaded PEM is the same usable key.
    let body: String = loaded
        .value
        .private_key_pem
        .expose()
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(body)
        .unwrap();
    let reloaded = KeyPair::from_pkcs8(&der).unwrap();
    assert_eq!(
        reloaded.public_key().as_ref(),
        key.public_key().as_ref(),
        "same RSA key after the round trip"
    );
    // A second start-up must not replace the key: first write is create-only.
    let err = store
        .write_account_key(&p, &account_key, Cas::Absent)
        .await
        .unwrap_err();
    assert!(err.is_conflict());
    // The key's metadata names the account and fingerprint, never the key.
    let meta = bao.kv_metadata(&mount, p.as_str()).await;
    let custom = meta["custom_metadata"].as_object().unwrap();
    assert_eq!(custom["account"], json!("acme-live"));
    assert_eq!(custom["fingerprint"], json!(account_key.fingerprint()));
    let pem_line = pem.lines().nth(1).unwrap();
    assert!(
        custom
            .values()
            .all(|v| !v.as_str().unwrap().contains(pem_line))
    );
    // A bundle cannot be written to an account-key path, nor a key to a credential path.
    assert_eq!(
        store
            .write_bundle(&p, &first_bundle("x", "x"), Cas::Absent)
            .await
            .unwrap_err()
            .reason(),
        "InvalidStorePath"
    );
}

#[tokio::test]
async fn custom_metadata_carries_owner_and_ids_but_never_a_secret() {
    let bao = OpenBao::start_dev().await;
    let mount = new_mount(&bao).await;
    let store = root_store(&bao, &mount);
    let p = path("sko", "meta").with_sub_path("live").unwrap();
    let first = first_bundle("meta", "meta");
    let v1 = store.write_bundle(&p, &first, Cas::Absent).await.unwrap();
    let second = first.rotated(KeyMaterial::new(secret("meta", 1), "rk_id_1"));
    store
        .write_bundle(&p, &second, Cas::Version(v1))
        .await
        .unwrap();

    let meta = bao.kv_metadata(&mount, p.as_str()).await;
    let custom = meta["custom_metadata"].as_object().unwrap();
    assert_eq!(custom["owner-namespace"], json!("shop"));
    assert_eq!(custom["owner-kind"], json!("StripeKey"));
    assert_eq!(custom["owner-name"], json!("meta"));
    assert_eq!(custom["owner-uid"], json!(OWNER_UID));
    assert_eq!(custom["key-id"], json!("rk_id_1"));
    assert_eq!(custom["fingerprint"], json!(second.current.fingerprint));
    assert_eq!(custom["previous-key-id"], json!("rk_id_0"));
    assert_eq!(custom["rotation"], json!("1"));
    assert_eq!(custom["data-version"], json!("2"));
    let secrets = [
        second.current.secret.expose().to_owned(),
        first.current.secret.expose().to_owned(),
    ];
    for (k, v) in custom {
        let v = v.as_str().unwrap();
        for s in &secrets {
            // Not the secret, nor its distinctive random tail.
            assert!(
                !v.contains(s.as_str()),
                "custom_metadata[{k}] holds a secret"
            );
            assert!(
                !v.contains(&s[s.len() - 16..]),
                "custom_metadata[{k}] holds part of a secret"
            );
        }
    }
    // And the secret is in the data, written as one version holding both secrets.
    let raw = bao
        .api("GET", &format!("{mount}/data/{}", p.as_str()), None)
        .await;
    assert_eq!(raw["data"]["metadata"]["version"], json!(2));
    assert_eq!(raw["data"]["data"]["secret"], json!(secrets[0]));
    assert_eq!(raw["data"]["data"]["previous_secret"], json!(secrets[1]));
}

#[tokio::test]
async fn missing_mount_is_vault_mount_missing() {
    let bao = OpenBao::start_dev().await;
    let store = root_store(&bao, "no-such-mount");
    let p = path("sko", "m");
    let err = store
        .write_bundle(&p, &first_bundle("m", "m"), Cas::Absent)
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "VaultMountMissing", "{err}");
    assert!(err.to_string().contains("kv-v2"), "{err}");
    let err = store.read_bundle(&p).await.unwrap_err();
    assert_eq!(err.reason(), "VaultMountMissing", "{err}");
}

#[tokio::test]
async fn nothing_listening_is_vault_unreachable() {
    let port = free_port();
    let mut cfg = VaultConfig::new(
        format!("http://127.0.0.1:{port}"),
        VaultAuth::Token(SecretString::new("dev-token-not-used")),
    );
    cfg.request_timeout = Duration::from_secs(2);
    let store = VaultStore::new(cfg).unwrap();
    let err = store.read_bundle(&path("sko", "u")).await.unwrap_err();
    assert_eq!(err.reason(), "VaultUnreachable", "{err}");
    assert!(err.is_transient());
    assert!(!err.to_string().contains("dev-token-not-used"));
    assert_eq!(
        store.health().await.unwrap_err().reason(),
        "VaultUnreachable"
    );
}

#[tokio::test]
async fn revoked_dev_token_is_vault_auth_failed_not_a_policy_problem() {
    let bao = OpenBao::start_dev().await;
    let mount = new_mount(&bao).await;
    bao.put_policy(
        "operator",
        &format!(r#"path "{mount}/*" {{ capabilities = ["create", "read", "update"] }}"#),
    )
    .await;
    let token = bao.create_token(&["operator"], "1h").await;
    let store = VaultStore::new(config(
        &bao,
        &mount,
        VaultAuth::Token(SecretString::new(token.clone())),
    ))
    .unwrap();
    let p = path("sko", "revoked");
    store
        .write_bundle(&p, &first_bundle("rev", "revoked"), Cas::Absent)
        .await
        .unwrap();
    bao.api(
        "POST",
        "auth/token/revoke",
        Some(json!({"token": token.clone()})),
    )
    .await;
    let err = store.read_bundle(&p).await.unwrap_err();
    assert_eq!(err.reason(), "VaultAuthFailed", "{err}");
    assert!(err.to_string().contains("expired or revoked"), "{err}");
    assert!(!err.to_string().contains(&token));
}

#[tokio::test]
async fn the_harness_kills_the_server_when_a_test_panics() {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let failing_test = tokio::spawn(async move {
        let bao = OpenBao::start_dev().await;
        tx.send(bao.pid().unwrap()).unwrap();
        panic!("simulated test failure while the server runs");
    });
    let pid = rx.await.unwrap();
    let outcome = failing_test.await.unwrap_err();
    assert!(outcome.is_panic());
    // Dropped during unwinding: killed and reaped, so the pid is gone.
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "bao server {pid} outlived the panicking test"
    );
}
