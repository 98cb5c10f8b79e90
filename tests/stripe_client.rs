//! The Stripe client against the simulator: retries, idempotency, rate limits, JWE, pagination,
//! rotation and scopes.

#[path = "common/stripe_harness.rs"]
mod harness;

use std::collections::HashSet;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use harness::*;
use reqwest::Method;
use stripe_key_operator::secret::SecretString;
use stripe_key_operator::sim::{FaultKind, FaultSpec, SimConfig};
use stripe_key_operator::stripe::{
    ApiKeyStatus, ApiKeyType, ConnectionErrorKind, CreateApiKeyParams, JweKeyPair,
    ListApiKeysParams, Mode, RotateApiKeyParams, StripeClient, StripeError, UpdateApiKeyParams,
    idempotency_key,
};

const UID: &str = "0b6f3c1e-9f5e-4b0e-9d61-2f6a1c0d5e11";
const TEST_ACCT: &str = "acct_test1";
const LIVE_ACCT: &str = "acct_live1";

fn sim_config() -> SimConfig {
    SimConfig::new()
        .with_account(TEST_ACCT, Mode::Test)
        .with_account(LIVE_ACCT, Mode::Live)
}

fn manual_sim_config() -> SimConfig {
    sim_config().with_manual_clock(Utc.with_ymd_and_hms(2026, 11, 1, 12, 0, 0).unwrap())
}

fn api_status(e: &StripeError) -> u16 {
    e.status().expect("an HTTP error")
}

#[tokio::test]
async fn rate_limit_storm_client_stays_under_its_rate_and_every_call_succeeds() {
    let sim = start_sim(sim_config()).await;
    let mut config = fast_config(&sim, TEST_ACCT);
    config.requests_per_second = 20.0;
    config.burst = 1;
    config.retry.max_retries = 30;
    let (client, observer) = client_with_observer(config);
    // about half of the requests are answered 429, at most 20 of them in total
    sim.inject_fault(FaultSpec {
        count: Some(20),
        ..FaultSpec::ratio(
            0.5,
            FaultKind::RateLimited {
                retry_after_secs: None,
            },
        )
    });
    let clones: Vec<StripeClient> = (0..3).map(|_| client.clone()).collect();
    let mut tasks = Vec::new();
    for (i, c) in clones.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for j in 0..8 {
                let key = idempotency_key(UID, 1, &format!("storm-{i}-{j}"));
                let created = c
                    .create_api_key(
                        &secret_key_params(&format!("storm-{i}-{j}"), &["charge_read"]),
                        &key,
                    )
                    .await
                    .expect("every call succeeds in the end");
                ids.push(created.value.id);
            }
            ids
        }));
    }
    let mut ids = HashSet::new();
    for t in tasks {
        ids.extend(t.await.unwrap());
    }
    assert_eq!(ids.len(), 24, "24 distinct keys");
    let state = sim.state();
    assert_eq!(
        state.account(TEST_ACCT).unwrap().api_keys.len(),
        24,
        "no key minted twice"
    );

    let log = sim.request_log();
    let throttled = log.iter().filter(|e| e.status == Some(429)).count();
    assert!(throttled > 0, "the storm produced 429s");
    assert!(
        log.iter()
            .filter(|e| e.status == Some(429))
            .all(|e| e.fault.is_some()),
        "the simulator's own per-account limit never fired: the client stayed under 25/s"
    );
    // In every one-second window the three clones together sent at most rate + burst requests
    // (plus the three that may be in flight at once, in case the server handles queued
    // requests late and back to back). Without the limiter this would be hundreds.
    let times: Vec<u64> = log.iter().map(|e| e.received_ms).collect();
    for (i, start) in times.iter().enumerate() {
        let in_window = times[i..].iter().take_while(|t| **t < start + 1000).count();
        assert!(
            in_window <= 20 + 1 + 3,
            "{in_window} requests within 1 s starting at {start} ms"
        );
    }
    let records = observer.take();
    assert_eq!(records.len(), log.len(), "the observer saw every attempt");
    assert!(
        records
            .iter()
            .filter(|r| r.status == Some(429))
            .all(|r| r.will_retry)
    );
}

#[tokio::test]
async fn simulator_rate_limit_answers_429_with_retry_after_and_the_client_waits() {
    let mut config = sim_config();
    config.rate_limit_test = 2;
    let sim = start_sim(config).await;
    let (client, observer) = client_with_observer(fast_config(&sim, TEST_ACCT));
    for _ in 0..4 {
        client
            .list_api_keys(&ListApiKeysParams::default())
            .await
            .expect("succeeds after waiting");
    }
    let log = sim.request_log();
    let limited: Vec<usize> = (0..log.len())
        .filter(|&i| log[i].status == Some(429))
        .collect();
    assert!(
        !limited.is_empty(),
        "the simulator throttled a client that ignored the limit"
    );
    for i in limited {
        assert!(log[i].fault.is_none());
        let retry = log.get(i + 1).expect("a retry follows");
        assert!(
            retry.received_ms >= log[i].received_ms + 1000,
            "Retry-After: 1 was honoured ({} -> {} ms)",
            log[i].received_ms,
            retry.received_ms
        );
    }
    let records = observer.take();
    assert!(
        records
            .iter()
            .any(|r| r.error_code.as_deref() == Some("rate_limit"))
    );
}

#[tokio::test]
async fn server_error_then_success_with_same_idempotency_key_mints_exactly_one_key() {
    let sim = start_sim(sim_config()).await;
    let (client, observer) = client_with_observer(fast_config(&sim, TEST_ACCT));
    sim.inject_fault(
        FaultSpec::next(
            1,
            FaultKind::ServerError {
                saved: false,
                should_retry: None,
            },
        )
        .for_method("POST")
        .for_path_prefix("/v2/iam/api_keys"),
    );
    let key = idempotency_key(UID, 1, "mint");
    let created = client
        .create_api_key(&secret_key_params("one", &["charge_read"]), &key)
        .await
        .unwrap();
    assert_eq!(created.attempts, 2);
    assert!(
        created
            .request_id
            .as_deref()
            .is_some_and(|r| r.starts_with("req_"))
    );
    let log = sim.request_log();
    assert_eq!(log.len(), 2);
    assert_eq!((log[0].status, log[1].status), (Some(500), Some(200)));
    assert!(
        log.iter()
            .all(|e| e.idempotency_key.as_deref() == Some(key.as_str()))
    );
    assert_eq!(sim.state().account(TEST_ACCT).unwrap().api_keys.len(), 1);

    // a later retry of the same step (e.g. after an operator crash) replays, not re-mints
    let again = client
        .create_api_key(&secret_key_params("one", &["charge_read"]), &key)
        .await
        .unwrap();
    assert!(again.idempotent_replayed);
    assert_eq!(again.value.id, created.value.id);
    assert_eq!(sim.state().account(TEST_ACCT).unwrap().api_keys.len(), 1);

    let records = observer.take();
    assert_eq!(records[0].status, Some(500));
    assert!(records[0].will_retry);
    assert_eq!(records[0].idempotency_key.as_deref(), Some(key.as_str()));
    assert_eq!((records[0].attempt, records[1].attempt), (1, 2));
}

#[tokio::test]
async fn saved_server_error_is_replayed_for_the_same_key_and_retries_stay_bounded() {
    let sim = start_sim(sim_config()).await;
    let mut config = fast_config(&sim, TEST_ACCT);
    config.retry.max_retries = 2;
    let client = StripeClient::new(config).unwrap();
    sim.inject_fault(FaultSpec::next(
        1,
        FaultKind::ServerError {
            saved: true,
            should_retry: None,
        },
    ));
    let key = idempotency_key(UID, 1, "mint");
    let err = client
        .create_api_key(&secret_key_params("k", &[]), &key)
        .await
        .unwrap_err();
    assert_eq!(api_status(&err), 500);
    assert_eq!(err.api().unwrap().attempts, 3);
    let log = sim.request_log();
    assert_eq!(log.len(), 3);
    assert_eq!(
        log.iter().map(|e| e.replayed).collect::<Vec<_>>(),
        vec![false, true, true]
    );
    assert_eq!(sim.state().account(TEST_ACCT).unwrap().api_keys.len(), 0);
    // a new idempotency key executes
    let key2 = idempotency_key(UID, 1, "mint-retry");
    client
        .create_api_key(&secret_key_params("k", &[]), &key2)
        .await
        .unwrap();
    assert_eq!(sim.state().account(TEST_ACCT).unwrap().api_keys.len(), 1);
}

#[tokio::test]
async fn stripe_should_retry_false_stops_retries_and_true_forces_them() {
    let sim = start_sim(sim_config()).await;
    let client = StripeClient::new(fast_config(&sim, TEST_ACCT)).unwrap();
    sim.inject_fault(FaultSpec::next(
        1,
        FaultKind::ServerError {
            saved: false,
            should_retry: Some(false),
        },
    ));
    let err = client.retrieve_api_key("apikey_missing").await.unwrap_err();
    assert_eq!(api_status(&err), 500);
    assert!(!err.is_retryable());
    assert_eq!(
        sim.request_log().len(),
        1,
        "no retry after Stripe-Should-Retry: false"
    );

    sim.clear_request_log();
    sim.inject_fault(FaultSpec::next(
        1,
        FaultKind::ServerError {
            saved: false,
            should_retry: Some(true),
        },
    ));
    let err = client.retrieve_api_key("apikey_missing").await.unwrap_err();
    assert_eq!(
        api_status(&err),
        404,
        "retried after the 500, then got the real answer"
    );
    assert_eq!(sim.request_log().len(), 2, "404 itself is not retried");
}

#[tokio::test]
async fn connection_dropped_after_commit_retry_returns_the_same_key() {
    let sim = start_sim(sim_config()).await;
    let (client, observer) = client_with_observer(fast_config(&sim, TEST_ACCT));
    sim.inject_fault(FaultSpec::next(1, FaultKind::DropAfterCommit).for_method("POST"));
    let key = idempotency_key(UID, 7, "mint");
    let created = client
        .create_api_key(&secret_key_params("dropped", &["charge_read"]), &key)
        .await
        .unwrap();
    assert!(
        created.idempotent_replayed,
        "the retry got the saved answer"
    );
    assert_eq!(created.attempts, 2);
    let state = sim.state();
    let keys = &state.account(TEST_ACCT).unwrap().api_keys;
    assert_eq!(keys.len(), 1, "exactly one key minted");
    assert_eq!(keys[0].id, created.value.id);
    let log = sim.request_log();
    assert_eq!(log[0].status, None, "the first answer never arrived");
    let records = observer.take();
    assert_eq!(
        records[0].connection_error,
        Some(ConnectionErrorKind::Broken)
    );
    assert!(records[0].will_retry);
}

#[tokio::test]
async fn request_hanging_past_the_timeout_is_retried_and_a_permanent_hang_is_a_timeout_error() {
    let mut config = sim_config();
    config.hang_duration = Duration::from_secs(5);
    let sim = start_sim(config).await;
    let mut cfg = fast_config(&sim, TEST_ACCT);
    cfg.timeout = Duration::from_millis(300);
    cfg.retry.max_retries = 1;
    let (client, observer) = client_with_observer(cfg);
    sim.inject_fault(FaultSpec::next(1, FaultKind::Hang).for_method("GET"));
    client
        .list_api_keys(&ListApiKeysParams::default())
        .await
        .unwrap();
    let records = observer.take();
    assert_eq!(
        records[0].connection_error,
        Some(ConnectionErrorKind::Timeout)
    );
    assert_eq!(records[1].status, Some(200));

    sim.inject_fault(FaultSpec::next(2, FaultKind::Hang));
    let err = client
        .list_api_keys(&ListApiKeysParams::default())
        .await
        .unwrap_err();
    match &err {
        StripeError::Connection {
            kind,
            attempts,
            path,
            ..
        } => {
            assert_eq!(*kind, ConnectionErrorKind::Timeout);
            assert_eq!(*attempts, 2);
            assert_eq!(path, "/v2/iam/api_keys");
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(err.is_retryable());
}

#[tokio::test]
async fn live_mode_secret_arrives_only_as_jwe_and_decrypts_to_a_working_key() {
    let sim = start_sim(sim_config()).await;
    let client = StripeClient::new(fast_config(&sim, LIVE_ACCT)).unwrap();
    // the operator's own 3072-bit pair, stored in and loaded back from Vault as PKCS#8 PEM
    let generated = JweKeyPair::generate().unwrap();
    assert_eq!(generated.key_size_bits(), 3072);
    let stored: SecretString = generated.to_pkcs8_pem().unwrap();
    let pair = JweKeyPair::from_pkcs8_pem(&stored).unwrap();
    let mut params = secret_key_params("live", &["charge_read"]);
    params.public_key = Some(pair.public_key_param(Some("kid-1".into())).unwrap());
    let created = client
        .create_api_key(&params, &idempotency_key(UID, 1, "mint"))
        .await
        .unwrap()
        .value;
    assert!(created.livemode);
    assert!(
        created.plaintext_secret().is_none(),
        "no plaintext in live mode"
    );
    let enc = created.encrypted_secret().expect("encrypted secret");
    assert_eq!(enc.format, "jwe_compact");
    assert_eq!(enc.recipient_key_id.as_deref(), Some("kid-1"));
    let secret = created.reveal_secret(&pair).unwrap().unwrap();
    assert!(secret.expose().starts_with("rk_live_"));
    // the key really works, and only with the matching private key
    let (status, _) = call_with_key(&sim, Method::GET, "/v1/charges", secret.expose()).await;
    assert_eq!(status, 200);
    assert!(created.reveal_secret(test_key_pair()).is_err());
    // retrieve never shows a live secret again
    let fetched = client.retrieve_api_key(&created.id).await.unwrap().value;
    let sk = fetched.secret_key.unwrap();
    assert!(sk.token.is_none() && sk.encrypted_secret.is_none());
    assert!(sk.secret_token_redacted.unwrap().starts_with("rk_live_..."));
    // rotation returns the new secret encrypted too
    let rotated = client
        .rotate_api_key(
            &created.id,
            &RotateApiKeyParams {
                expire_current_key_in_minutes: Some(5),
                public_key: Some(pair.public_key_param(None).unwrap()),
            },
            &idempotency_key(UID, 2, "rotate"),
        )
        .await
        .unwrap()
        .value;
    let new_secret = rotated.reveal_secret(&pair).unwrap().unwrap();
    assert_ne!(new_secret.expose(), secret.expose());
}

#[tokio::test]
async fn secret_keys_need_an_rsa_public_key_of_at_least_2048_bits() {
    let sim = start_sim(sim_config()).await;
    let client = StripeClient::new(fast_config(&sim, LIVE_ACCT)).unwrap();
    let mut params = secret_key_params("nokey", &[]);
    params.public_key = None;
    let err = client.create_api_key(&params, "k1").await.unwrap_err();
    assert_eq!(api_status(&err), 400);
    assert_eq!(err.api().unwrap().param.as_deref(), Some("public_key"));
    assert_eq!(err.code(), Some("parameter_missing"));

    const RSA_1024: &str = "-----BEGIN PUBLIC KEY-----
MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQCt/4RYI8bLwZHq3HEW6g+ADT48
a9q40q9himGJOCRdpte3BHpRfhQjbel/MM0/cVvq0zF2h02kg/elLJuS0OZfUwby
LaMFhmNEMYjuJsNpBSq42h7kgL9XX3py4MvPyLo1SSjN68JCTywgpgz04LrOmo/1
E3FlayOrL/LFEI5X8wIDAQAB
-----END PUBLIC KEY-----
";
    let mut params = secret_key_params("weak", &[]);
    params.public_key.as_mut().unwrap().pem_key.data = RSA_1024.to_owned();
    let err = client.create_api_key(&params, "k2").await.unwrap_err();
    assert_eq!(api_status(&err), 400);
    assert_eq!(err.code(), Some("parameter_invalid"));
    assert_eq!(sim.state().account(LIVE_ACCT).unwrap().api_keys.len(), 0);

    // a publishable key needs none
    let pk = CreateApiKeyParams {
        key_type: ApiKeyType::PublishableKey,
        name: "pk".into(),
        note: None,
        permissions: vec![],
        connect_permissions: None,
        expires_at: None,
        public_key: None,
    };
    let created = client.create_api_key(&pk, "k3").await.unwrap().value;
    assert!(
        created
            .publishable_key
            .unwrap()
            .token
            .starts_with("pk_live_")
    );
}

#[tokio::test]
async fn list_follows_next_page_url_over_250_keys() {
    let mut config = sim_config();
    config.rate_limit_test = 100_000;
    let sim = start_sim(config).await;
    let client = StripeClient::new(fast_config(&sim, TEST_ACCT)).unwrap();
    let mut created = Vec::new();
    for i in 0..250 {
        let k = client
            .create_api_key(
                &secret_key_params(&format!("bulk-{i}"), &["charge_read"]),
                &idempotency_key(UID, i, "mint"),
            )
            .await
            .unwrap();
        created.push(k.value.id);
    }
    let all = client
        .list_all_api_keys(&ListApiKeysParams {
            include_expired: None,
            limit: Some(100),
        })
        .await
        .unwrap();
    assert_eq!(all.request_ids.len(), 3, "three pages of at most 100");
    assert!(all.request_ids.iter().all(Option::is_some));
    let listed: Vec<String> = all.items.iter().map(|k| k.id.clone()).collect();
    let unique: HashSet<&String> = listed.iter().collect();
    assert_eq!(unique.len(), 250, "every key exactly once");
    let mut newest_first = created.clone();
    newest_first.reverse();
    assert_eq!(listed, newest_first, "newest first");
    // the first page is 100 keys and names the next page
    let first = client
        .list_api_keys(&ListApiKeysParams {
            include_expired: None,
            limit: Some(100),
        })
        .await
        .unwrap();
    assert_eq!(first.value.data.len(), 100);
    assert!(
        first
            .value
            .next_page_url
            .as_deref()
            .unwrap()
            .starts_with("/v2/iam/api_keys?")
    );

    // expired keys are hidden unless asked for
    for id in &created[..10] {
        client
            .expire_api_key(id, &idempotency_key(id, 0, "expire"))
            .await
            .unwrap();
    }
    let active = client
        .list_all_api_keys(&ListApiKeysParams {
            include_expired: None,
            limit: Some(100),
        })
        .await
        .unwrap();
    assert_eq!(active.items.len(), 240);
    assert!(
        active
            .items
            .iter()
            .all(|k| k.status == ApiKeyStatus::Active)
    );
    let everything = client
        .list_all_api_keys(&ListApiKeysParams {
            include_expired: Some(true),
            limit: Some(100),
        })
        .await
        .unwrap();
    assert_eq!(everything.items.len(), 250);
    assert!(
        client
            .list_api_keys(&ListApiKeysParams {
                include_expired: None,
                limit: Some(101)
            })
            .await
            .is_err()
    );
}

#[tokio::test]
async fn wrong_app_key_or_unknown_context_is_401_and_not_retried() {
    let sim = start_sim(sim_config()).await;
    let mut wrong_key = fast_config(&sim, TEST_ACCT);
    wrong_key.secret_key = SecretString::new("sk_test_not_the_app");
    let err = StripeClient::new(wrong_key)
        .unwrap()
        .list_api_keys(&ListApiKeysParams::default())
        .await
        .unwrap_err();
    assert_eq!(api_status(&err), 401);
    assert!(!err.is_retryable());
    assert!(
        !err.to_string().contains("sk_test_not_the_app"),
        "the key is not echoed"
    );

    let mut unknown = fast_config(&sim, TEST_ACCT);
    unknown.context = "acct_unknown".into();
    let err = StripeClient::new(unknown)
        .unwrap()
        .list_api_keys(&ListApiKeysParams::default())
        .await
        .unwrap_err();
    assert_eq!(api_status(&err), 401);
    assert_eq!(err.api().unwrap().attempts, 1);
    assert_eq!(sim.request_log().len(), 2, "no retries");
}

#[tokio::test]
async fn same_idempotency_key_with_different_parameters_is_an_idempotency_error() {
    let sim = start_sim(sim_config()).await;
    let client = StripeClient::new(fast_config(&sim, TEST_ACCT)).unwrap();
    let key = idempotency_key(UID, 1, "mint");
    client
        .create_api_key(&secret_key_params("a", &["charge_read"]), &key)
        .await
        .unwrap();
    let err = client
        .create_api_key(&secret_key_params("b", &["charge_read"]), &key)
        .await
        .unwrap_err();
    assert_eq!(api_status(&err), 400);
    assert_eq!(
        err.api().unwrap().error_type.as_deref(),
        Some("idempotency_error")
    );
    assert!(!err.is_retryable());
    assert_eq!(sim.state().account(TEST_ACCT).unwrap().api_keys.len(), 1);
}

#[tokio::test]
async fn rotate_without_overlap_kills_the_old_key_at_once() {
    let sim = start_sim(manual_sim_config()).await;
    let client = StripeClient::new(fast_config(&sim, TEST_ACCT)).unwrap();
    let old = client
        .create_api_key(&secret_key_params("svc", &["charge_read"]), "mint-1")
        .await
        .unwrap()
        .value;
    let old_token = old.plaintext_secret().unwrap().clone();
    assert_eq!(
        call_with_key(&sim, Method::GET, "/v1/charges", old_token.expose())
            .await
            .0,
        200
    );
    let new = client
        .rotate_api_key(
            &old.id,
            &RotateApiKeyParams {
                expire_current_key_in_minutes: None,
                public_key: Some(test_key_pair().public_key_param(None).unwrap()),
            },
            "rotate-1",
        )
        .await
        .unwrap()
        .value;
    assert_ne!(new.id, old.id);
    assert_eq!(new.name, old.name);
    assert_eq!(new.note, old.note);
    let new_token = new.plaintext_secret().unwrap();
    assert_ne!(new_token, &old_token);
    let (status, body) = call_with_key(&sim, Method::GET, "/v1/charges", old_token.expose()).await;
    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], "api_key_expired");
    assert_eq!(
        call_with_key(&sim, Method::GET, "/v1/charges", new_token.expose())
            .await
            .0,
        200
    );
    let state = sim.state();
    let keys = &state.account(TEST_ACCT).unwrap().api_keys;
    assert_eq!(keys[0].status, "expired");
    assert_eq!(keys[0].rotated_to.as_deref(), Some(new.id.as_str()));
    assert_eq!(keys[1].permissions, vec!["charge_read"], "same properties");
}

#[tokio::test]
async fn rotate_with_overlap_keeps_the_old_key_until_the_clock_passes_it() {
    let sim = start_sim(manual_sim_config()).await;
    let client = StripeClient::new(fast_config(&sim, TEST_ACCT)).unwrap();
    let old = client
        .create_api_key(&secret_key_params("svc", &["customer_read"]), "mint-1")
        .await
        .unwrap()
        .value;
    let old_token = old.plaintext_secret().unwrap().clone();
    let new = client
        .rotate_api_key(
            &old.id,
            &RotateApiKeyParams {
                expire_current_key_in_minutes: Some(60),
                public_key: Some(test_key_pair().public_key_param(None).unwrap()),
            },
            "rotate-1",
        )
        .await
        .unwrap()
        .value;
    let fetched = client.retrieve_api_key(&old.id).await.unwrap().value;
    assert_eq!(fetched.status, ApiKeyStatus::Active);
    assert_eq!(
        fetched.expires_at,
        Some(sim.now() + chrono::Duration::minutes(60))
    );
    sim.advance_clock(Duration::from_secs(59 * 60));
    assert_eq!(
        call_with_key(&sim, Method::GET, "/v1/customers", old_token.expose())
            .await
            .0,
        200
    );
    sim.advance_clock(Duration::from_secs(2 * 60));
    let (status, body) =
        call_with_key(&sim, Method::GET, "/v1/customers", old_token.expose()).await;
    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], "api_key_expired");
    assert_eq!(
        call_with_key(
            &sim,
            Method::GET,
            "/v1/customers",
            new.plaintext_secret().unwrap().expose()
        )
        .await
        .0,
        200
    );
    assert_eq!(
        client.retrieve_api_key(&old.id).await.unwrap().value.status,
        ApiKeyStatus::Expired
    );
    // an expired key cannot be rotated again
    let err = client
        .rotate_api_key(
            &old.id,
            &RotateApiKeyParams {
                expire_current_key_in_minutes: None,
                public_key: Some(test_key_pair().public_key_param(None).unwrap()),
            },
            "rotate-2",
        )
        .await
        .unwrap_err();
    assert_eq!(api_status(&err), 400);
    // the maximum overlap is 7 days, checked client-side before sending
    let err = client
        .rotate_api_key(
            &new.id,
            &RotateApiKeyParams {
                expire_current_key_in_minutes: Some(10_081),
                public_key: None,
            },
            "rotate-3",
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StripeError::InvalidRequest(_)));
}

#[tokio::test]
async fn expire_makes_the_key_fail_at_once() {
    let sim = start_sim(sim_config()).await;
    let client = StripeClient::new(fast_config(&sim, TEST_ACCT)).unwrap();
    let key = client
        .create_api_key(&secret_key_params("svc", &["balance_read"]), "mint-1")
        .await
        .unwrap()
        .value;
    let token = key.plaintext_secret().unwrap().clone();
    assert_eq!(
        call_with_key(&sim, Method::GET, "/v1/balance", token.expose())
            .await
            .0,
        200
    );
    let expired = client
        .expire_api_key(&key.id, "expire-1")
        .await
        .unwrap()
        .value;
    assert_eq!(expired.status, ApiKeyStatus::Expired);
    let (status, body) = call_with_key(&sim, Method::GET, "/v1/balance", token.expose()).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("api_key_expired"))
    );
    let missing = client
        .expire_api_key("apikey_nope", "expire-2")
        .await
        .unwrap_err();
    assert!(missing.is_not_found());
}

#[tokio::test]
async fn scope_surface_allows_held_permissions_and_forbids_the_rest() {
    let sim = start_sim(sim_config()).await;
    let client = StripeClient::new(fast_config(&sim, TEST_ACCT)).unwrap();
    let key = client
        .create_api_key(
            &secret_key_params("scoped", &["charge_write", "customer_read"]),
            "mint-1",
        )
        .await
        .unwrap()
        .value;
    let token = key.plaintext_secret().unwrap().expose().to_owned();
    let expectations = [
        (Method::GET, "/v1/charges", 200),
        (Method::GET, "/v1/customers", 200),
        (Method::POST, "/v1/refunds", 403),
        (Method::GET, "/v1/balance", 403),
        (Method::GET, "/v1/payment_intents", 403),
    ];
    for (method, path, expected) in expectations {
        let (status, body) = call_with_key(&sim, method.clone(), path, &token).await;
        assert_eq!(status, expected, "{method} {path}");
        if status == 403 {
            assert!(
                body["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("permission")
            );
            assert!(!body.to_string().contains(&token), "the key is not echoed");
        }
    }
    let refunder = client
        .create_api_key(
            &secret_key_params("refunds", &["refund_write", "payment_intent_read"]),
            "mint-2",
        )
        .await
        .unwrap()
        .value;
    let t2 = refunder.plaintext_secret().unwrap().expose().to_owned();
    assert_eq!(
        call_with_key(&sim, Method::POST, "/v1/refunds", &t2)
            .await
            .0,
        200
    );
    assert_eq!(
        call_with_key(&sim, Method::GET, "/v1/payment_intents", &t2)
            .await
            .0,
        200
    );
    assert_eq!(
        call_with_key(&sim, Method::GET, "/v1/charges", &t2).await.0,
        403
    );
    assert_eq!(
        call_with_key(&sim, Method::GET, "/v1/charges", "rk_test_unknown")
            .await
            .0,
        401
    );
}

#[tokio::test]
async fn update_with_empty_permissions_changes_nothing_and_a_real_update_applies() {
    let sim = start_sim(sim_config()).await;
    let client = StripeClient::new(fast_config(&sim, TEST_ACCT)).unwrap();
    let key = client
        .create_api_key(&secret_key_params("svc", &["charge_read"]), "mint-1")
        .await
        .unwrap()
        .value;
    let token = key.plaintext_secret().unwrap().expose().to_owned();
    let same = client
        .update_api_key(
            &key.id,
            &UpdateApiKeyParams {
                permissions: Some(vec![]),
                ..Default::default()
            },
            "upd-1",
        )
        .await
        .unwrap();
    assert_eq!(same.status, 200);
    assert_eq!(
        sim.state().account(TEST_ACCT).unwrap().api_keys[0].permissions,
        vec!["charge_read"]
    );
    assert_eq!(
        call_with_key(&sim, Method::GET, "/v1/charges", &token)
            .await
            .0,
        200
    );

    let updated = client
        .update_api_key(
            &key.id,
            &UpdateApiKeyParams {
                permissions: Some(vec!["balance_read".into()]),
                note: Some("narrowed".into()),
                ..Default::default()
            },
            "upd-2",
        )
        .await
        .unwrap()
        .value;
    assert_eq!(updated.note.as_deref(), Some("narrowed"));
    assert_eq!(
        call_with_key(&sim, Method::GET, "/v1/charges", &token)
            .await
            .0,
        403
    );
    assert_eq!(
        call_with_key(&sim, Method::GET, "/v1/balance", &token)
            .await
            .0,
        200
    );
    let bad = client
        .update_api_key(
            &key.id,
            &UpdateApiKeyParams {
                permissions: Some(vec!["everything".into()]),
                ..Default::default()
            },
            "upd-3",
        )
        .await
        .unwrap_err();
    assert_eq!(api_status(&bad), 400);
}

#[tokio::test]
async fn observer_records_every_attempt_without_secrets_or_query_values() {
    let sim = start_sim(sim_config()).await;
    let (client, observer) = client_with_observer(fast_config(&sim, TEST_ACCT));
    sim.inject_fault(FaultSpec::next(
        1,
        FaultKind::RateLimited {
            retry_after_secs: None,
        },
    ));
    let created = client
        .create_api_key(&secret_key_params("obs", &["charge_read"]), "obs-key-1")
        .await
        .unwrap();
    client
        .list_api_keys(&ListApiKeysParams {
            include_expired: Some(true),
            limit: Some(5),
        })
        .await
        .unwrap();
    let records = observer.take();
    assert_eq!(records.len(), 3);
    assert_eq!(records[0].method, "POST");
    assert_eq!(records[0].path, "/v2/iam/api_keys");
    assert_eq!(records[0].status, Some(429));
    assert_eq!(records[0].error_code.as_deref(), Some("rate_limit"));
    assert_eq!(records[0].attempt, 1);
    assert_eq!(records[1].attempt, 2);
    assert_eq!(records[1].request_id, created.request_id);
    assert_eq!(records[1].account, TEST_ACCT);
    assert_eq!(records[2].path, "/v2/iam/api_keys", "no query string");
    assert_eq!(records[2].idempotency_key, None);
    let log = sim.request_log();
    for (r, e) in records.iter().zip(&log) {
        assert_eq!(r.request_id.as_deref(), Some(e.request_id.as_str()));
    }
    let dump = format!("{records:?}");
    assert!(!dump.contains(sim.app_key().expose()));
    assert!(!dump.contains(created.value.plaintext_secret().unwrap().expose()));
    assert!(
        !format!("{:?}", created.value)
            .contains(created.value.plaintext_secret().unwrap().expose())
    );
    assert!(!format!("{:?}", client).contains(sim.app_key().expose()));
}

#[tokio::test]
async fn post_without_a_valid_idempotency_key_is_refused_before_sending() {
    let sim = start_sim(sim_config()).await;
    let client = StripeClient::new(fast_config(&sim, TEST_ACCT)).unwrap();
    for bad in [String::new(), "x".repeat(256), "has space".to_owned()] {
        let err = client
            .create_api_key(&secret_key_params("a", &[]), &bad)
            .await
            .unwrap_err();
        assert!(matches!(err, StripeError::InvalidRequest(_)));
    }
    assert!(sim.request_log().is_empty());
}

#[tokio::test]
async fn concurrent_request_with_the_same_idempotency_key_gets_409_then_the_saved_answer() {
    let sim = start_sim(sim_config()).await;
    let mut config = fast_config(&sim, TEST_ACCT);
    config.retry.initial_backoff = Duration::from_millis(400);
    config.retry.max_backoff = Duration::from_millis(800);
    let client = StripeClient::new(config).unwrap();
    // the first request to arrive is held for a second while the other one arrives
    sim.inject_fault(FaultSpec::next(1, FaultKind::Latency { millis: 1000 }).for_method("POST"));
    let key = idempotency_key(UID, 1, "mint");
    let params = secret_key_params("concurrent", &["charge_read"]);
    let first = {
        let (client, key, params) = (client.clone(), key.clone(), params.clone());
        tokio::spawn(async move { client.create_api_key(&params, &key).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let second = client.create_api_key(&params, &key).await.unwrap();
    let first = first.await.unwrap().unwrap();
    assert_eq!(first.value.id, second.value.id);
    // whichever arrived second got 409, retried, and received the saved answer
    let (late, early) = if second.idempotent_replayed {
        (&second, &first)
    } else {
        (&first, &second)
    };
    assert!(
        late.idempotent_replayed && late.attempts >= 2,
        "the 409 was retried"
    );
    assert!(!early.idempotent_replayed);
    let log = sim.request_log();
    assert!(log.iter().any(|e| e.status == Some(409)));
    assert_eq!(sim.state().account(TEST_ACCT).unwrap().api_keys.len(), 1);
}
