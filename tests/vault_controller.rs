//! The StripeKeyPolicy controller on a real OpenBao (Vault KV v2): keys land in Vault, and a Vault
//! outage in the middle of a rotation stops it without breaking the published key; it resumes
//! when Vault is back.

#[path = "common/openbao.rs"]
#[allow(dead_code)]
mod openbao;
#[path = "common/operator.rs"]
mod operator;

use std::sync::Arc;
use std::time::Duration;

use operator::*;
use serde_json::json;
use stripe_key_operator::api::RotationPhase;
use stripe_key_operator::sandbox::env::EnvOptions;
use stripe_key_operator::secret::SecretString;
use stripe_key_operator::vault::{
    SecretStore, StorePath, StorePrefix, VaultAuth, VaultConfig, VaultStore,
};

fn path() -> StorePath {
    StorePath::credential(
        &StorePrefix::new("stripe-key-operator").unwrap(),
        NS,
        "stripekeypolicy",
        "checkout",
    )
    .unwrap()
}

#[tokio::test]
async fn keys_live_in_openbao_and_a_vault_outage_mid_rotation_recovers() {
    let mut bao = openbao::OpenBao::start_persistent().await;
    let mut config = VaultConfig::new(
        bao.addr(),
        VaultAuth::Token(SecretString::new(bao.root_token())),
    );
    config.request_timeout = Duration::from_secs(2);
    let store = Arc::new(VaultStore::new(config).unwrap());
    let env = env_with(EnvOptions {
        store: Some(store.clone()),
        ..Default::default()
    })
    .await;

    env.apply_json(&policy("checkout", &["charge_read"]))
        .await
        .unwrap();
    let first = wait_policy(&env, "checkout", "Ready", ready)
        .await
        .status
        .unwrap()
        .current_key
        .clone()
        .unwrap();
    let bundle = store
        .read_bundle(&path())
        .await
        .unwrap()
        .expect("the bundle is in Vault")
        .value;
    assert_eq!(bundle.current.key_id, first.id);
    assert_eq!(bundle.current.fingerprint, first.fingerprint);
    let meta = bao.kv_metadata("secret", path().as_str()).await;
    let text = meta.to_string();
    assert!(
        text.contains(&first.id),
        "custom_metadata names the key id: {text}"
    );
    let secret = env
        .secret(NS, "checkout-stripe-key")
        .await
        .unwrap()
        .unwrap();
    assert!(
        !text.contains(&secret_value(&secret, "STRIPE_API_KEY").unwrap()),
        "never the secret"
    );

    // Vault goes down; a rotation is requested.
    bao.kill();
    annotate(
        &env,
        "checkout",
        json!({"stripekeys.io/rotate": "during-vault-outage"}),
    )
    .await;
    let p = wait_policy(&env, "checkout", "Degraded by the outage", |p| {
        condition(p, "Degraded").is_some_and(|c| c.0 == "True" && c.1.starts_with("Vault"))
    })
    .await;
    assert_eq!(
        condition(&p, "Ready").unwrap().0,
        "True",
        "the published key still works"
    );
    let secret = env
        .secret(NS, "checkout-stripe-key")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        fingerprint(&secret_value(&secret, "STRIPE_API_KEY").unwrap()),
        first.fingerprint
    );

    // Vault is back (restarted and unsealed): the rotation resumes without a second mint.
    bao.restart().await;
    bao.unseal().await;
    wait_policy(&env, "checkout", "Overlapping", |p| {
        p.status
            .as_ref()
            .and_then(|s| s.rotation.as_ref())
            .is_some_and(|r| r.phase == RotationPhase::Overlapping)
    })
    .await;
    env.clock.advance(Duration::from_secs(3700));
    nudge(&env, "checkout").await;
    let p = wait_policy(&env, "checkout", "settled", |p| {
        ready(p) && p.status.as_ref().unwrap().previous_key.is_none()
    })
    .await;
    let current = p.status.unwrap().current_key.clone().unwrap();
    assert_ne!(current.id, first.id);
    assert_eq!(active_keys(&env).len(), 1);
    assert_eq!(
        sim_keys(&env).len(),
        2,
        "no key minted twice: {:#?}",
        sim_keys(&env)
    );
    let bundle = store.read_bundle(&path()).await.unwrap().unwrap().value;
    assert_eq!(bundle.current.key_id, current.id);
    assert!(bundle.previous.is_none());
}
