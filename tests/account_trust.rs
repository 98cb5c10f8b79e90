//! Account trust, read as an attacker would (issue 14, opening 1): whoever can write a
//! `StripeAccount` points its credentials at a tenant's key, or its `apiBase` at their own host,
//! and references it from a policy in a namespace they control. The operator must refuse before
//! it reads or sends anything: a loopback listener standing in for the attacker's host receives
//! nothing, and the policy says what is allowed.

#[path = "common/openbao.rs"]
#[allow(dead_code)]
mod openbao;
#[path = "common/operator.rs"]
mod operator;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, PostParams};
use operator::*;
use serde_json::{Value, json};
use stripe_key_operator::api::{StripeKeyPolicy, conditions};
use stripe_key_operator::sandbox::env::{APP_KEY_SECRET, EnvOptions, LocalEnv, OPERATOR_NAMESPACE};
use stripe_key_operator::secret::SecretString;
use stripe_key_operator::vault::{VaultAuth, VaultConfig, VaultStore};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio::sync::Mutex;

/// The attacker's namespace and account.
const EVIL_NS: &str = "mallory";
const EVIL_ACCOUNT: &str = "exfil";

/// A listener on 127.0.0.1 that records every connection and every byte it is sent.
struct Collector {
    port: u16,
    connections: Arc<AtomicUsize>,
    received: Arc<Mutex<Vec<u8>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Collector {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections = Arc::new(AtomicUsize::new(0));
        let received = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn({
            let connections = connections.clone();
            let received = received.clone();
            async move {
                while let Ok((mut stream, _)) = listener.accept().await {
                    connections.fetch_add(1, Ordering::SeqCst);
                    let received = received.clone();
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 16 * 1024];
                        // Bounded: one read window per connection, then hang up.
                        if let Ok(Ok(n)) =
                            tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf))
                                .await
                        {
                            received.lock().await.extend_from_slice(&buf[..n]);
                        }
                    });
                }
            }
        });
        Self {
            port,
            connections,
            received,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    async fn assert_received_nothing(&self, secret: &str) {
        let received = self.received.lock().await.clone();
        let text = String::from_utf8_lossy(&received);
        assert!(
            !text.contains(secret),
            "the attacker's host received the secret"
        );
        assert_eq!(
            self.connections.load(Ordering::SeqCst),
            0,
            "the attacker's host was contacted ({} bytes)",
            received.len()
        );
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The attacker's namespace, an account serving it, and a policy there that uses the account.
async fn attack(env: &LocalEnv, account_spec: Value) {
    env.apply_json(&json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": EVIL_NS, "labels": {"team": EVIL_NS}}}))
        .await
        .unwrap();
    let mut spec = json!({
        "mode": "test",
        "context": "acct_1Mallory",
        "namespaceSelector": {"matchLabels": {"team": EVIL_NS}},
    });
    for (k, v) in account_spec.as_object().unwrap() {
        spec[k] = v.clone();
    }
    env.apply_json(&json!({
        "apiVersion": "stripekeys.io/v1alpha1", "kind": "StripeAccount",
        "metadata": {"name": EVIL_ACCOUNT}, "spec": spec
    }))
    .await
    .unwrap();
    env.apply_json(&json!({
        "apiVersion": "stripekeys.io/v1alpha1", "kind": "StripeKeyPolicy",
        "metadata": {"name": "loot", "namespace": EVIL_NS},
        "spec": {
            "accountRef": {"name": EVIL_ACCOUNT},
            "permissions": ["charge_read"],
            "delivery": {"secret": {"name": "loot-stripe-key"}},
            "rotation": {"every": "720h", "overlap": "1h"}
        }
    }))
    .await
    .unwrap();
}

/// Waits (bounded) until the attacker's policy is `Ready=False` with `reason`; returns the
/// condition's message.
async fn refused_with(env: &LocalEnv, reason: &str) -> String {
    let api: Api<StripeKeyPolicy> = Api::namespaced(env.client.clone(), EVIL_NS);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let p = api.get("loot").await.unwrap();
        let ready = p
            .status
            .as_ref()
            .and_then(|s| conditions::find(&s.conditions, "Ready").cloned());
        if let Some(c) = &ready
            && c.status == "False"
            && c.reason == reason
        {
            return c.message.clone();
        }
        assert!(
            Instant::now() < deadline,
            "the attacker's policy was not refused with {reason}: {ready:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Replaces the StripeAccount CRD by one without the `_accounts` path rule, as a cluster whose
/// CRDs predate it has.
async fn drop_accounts_rule_from_the_crd(env: &LocalEnv) {
    fn strip(v: &mut Value) {
        match v {
            Value::Object(map) => {
                if let Some(Value::Array(rules)) = map.get_mut("x-kubernetes-validations") {
                    rules.retain(|r| !r["rule"].as_str().unwrap_or_default().contains("_accounts"));
                }
                map.values_mut().for_each(strip);
            }
            Value::Array(items) => items.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let api: Api<CustomResourceDefinition> = Api::all(env.client.clone());
    let crd = api.get("stripeaccounts.stripekeys.io").await.unwrap();
    let mut value = serde_json::to_value(&crd).unwrap();
    let before = value.to_string();
    strip(&mut value);
    assert_ne!(before, value.to_string(), "the CRD had the rule");
    let older: CustomResourceDefinition = serde_json::from_value(value).unwrap();
    api.replace(
        "stripeaccounts.stripekeys.io",
        &PostParams::default(),
        &older,
    )
    .await
    .unwrap();
}

/// The tenant's live key: `shop/checkout` minted and delivered.
async fn tenant_key(env: &LocalEnv) -> String {
    env.apply_json(&policy("checkout", &["charge_read"]))
        .await
        .unwrap();
    wait_policy(env, "checkout", "the tenant's policy Ready", ready).await;
    let secret = env
        .secret(NS, "checkout-stripe-key")
        .await
        .unwrap()
        .expect("the tenant's Secret");
    secret_value(&secret, "STRIPE_API_KEY").expect("the tenant's key")
}

#[tokio::test]
async fn account_pointing_at_a_tenant_bundle_in_vault_is_refused_and_the_key_never_leaves() {
    let bao = openbao::OpenBao::start_dev().await;
    let store = Arc::new(
        VaultStore::new(VaultConfig::new(
            bao.addr(),
            VaultAuth::Token(SecretString::new(bao.root_token())),
        ))
        .unwrap(),
    );
    // Loopback is allowed (as in the sandbox), so only the path rule stands between the
    // tenant's key and the collector.
    let env = env_with(EnvOptions {
        store: Some(store),
        ..Default::default()
    })
    .await;
    let key = tenant_key(&env).await;
    let collector = Collector::start().await;
    let exfil = json!({
        "apiBase": collector.url(),
        "credentials": {"vault": {
            "path": format!("stripe-key-operator/{NS}/stripekeypolicy/checkout"),
            "key": "secret"
        }}
    });
    // The current CRD refuses the path at once...
    let refused = env
        .apply_json(&json!({
            "apiVersion": "stripekeys.io/v1alpha1", "kind": "StripeAccount",
            "metadata": {"name": EVIL_ACCOUNT},
            "spec": {"mode": "test", "context": "acct_1Mallory", "namespaceSelector": {},
                     "apiBase": exfil["apiBase"], "credentials": exfil["credentials"]}
        }))
        .await
        .expect_err("the CRD's CEL rule refuses a path outside _accounts");
    assert!(
        format!("{refused:#}").contains("path must lie under <prefix>/_accounts/"),
        "{refused:#}"
    );
    // ...but Helm never upgrades CRDs, and objects stored before an upgrade stay: the operator
    // must refuse on its own. An older CRD without the rule stands for both.
    drop_accounts_rule_from_the_crd(&env).await;
    attack(&env, exfil).await;
    let message = refused_with(&env, "CredentialPathNotAllowed").await;
    assert!(
        message.contains("under stripe-key-operator/_accounts/<name>/"),
        "{message}"
    );
    assert!(!message.contains(&key));
    // Give a (wrong) operator time to try again after its backoff.
    tokio::time::sleep(Duration::from_secs(2)).await;
    collector.assert_received_nothing(&key).await;
}

#[tokio::test]
async fn account_naming_a_secret_without_the_credential_label_is_refused_and_the_key_never_leaves()
{
    let env = env().await;
    let key = tenant_key(&env).await;
    // A copy of the tenant's key in the operator's namespace that no administrator labelled as
    // an app key (as a bundle of the kubernetes store is).
    env.apply_json(&json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "sko-shop-stripekeypolicy-checkout", "namespace": OPERATOR_NAMESPACE,
                     "labels": {"app.kubernetes.io/managed-by": "stripe-key-operator"}},
        "stringData": {"secret": key},
    }))
    .await
    .unwrap();
    let collector = Collector::start().await;
    attack(
        &env,
        json!({
            "apiBase": collector.url(),
            "credentials": {"secretRef": {"name": "sko-shop-stripekeypolicy-checkout", "key": "secret"}}
        }),
    )
    .await;
    let message = refused_with(&env, "CredentialSecretNotLabelled").await;
    assert!(
        message.contains("is not labelled stripekeys.io/credential=stripe-app"),
        "{message}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    collector.assert_received_nothing(&key).await;
}

#[tokio::test]
async fn account_with_an_api_base_on_a_host_not_allowed_is_refused_and_nothing_is_sent() {
    // As in production: no blanket loopback, only the simulator's own host:port (standing in
    // for api.stripe.com) is allowed.
    let env = env_with(EnvOptions {
        allow_loopback_api: false,
        ..Default::default()
    })
    .await;
    // The allowed host works: the tenant's key is minted through it.
    let _ = tenant_key(&env).await;
    let collector = Collector::start().await;
    attack(
        &env,
        json!({
            "apiBase": collector.url(),
            "credentials": {"secretRef": {"name": APP_KEY_SECRET, "key": "secret_key"}}
        }),
    )
    .await;
    let message = refused_with(&env, "ApiHostNotAllowed").await;
    assert!(
        message.contains(&format!("host 127.0.0.1:{} is not allowed", collector.port)),
        "{message}"
    );
    assert!(message.contains("--allowed-api-hosts"), "{message}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let app_key = env.sim.app_key().expose().to_string();
    collector.assert_received_nothing(&app_key).await;
}
