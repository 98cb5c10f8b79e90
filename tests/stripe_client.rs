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
use stripe_key_operator::stripe::verify::{
    ScopeCheckError, check_scopes, verify_response_scopes, verify_scopes,
};
use stripe_key_operator::stripe::{
    ApiKeyStatus, ApiKeyType, ConnectionErrorKind, CreateApiKeyParams, ExpireOutcome, JweKeyPair,
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
    assert!(
        err.is_idempotent_replay(),
        "the last answer was the saved one"
    );
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

// ------------------------------------------------------------------ issue 17 §2, issue 13 (7, 10)

#[tokio::test]
async fn every_api_key_answer_carries_permissions_and_connect_permissions() {
    let sim = start_sim(manual_sim_config()).await;
    let client = StripeClient::new(fast_config(&sim, TEST_ACCT)).unwrap();
    let mut params = secret_key_params("perms", &["charge_read", "refund_write"]);
    params.connect_permissions = Some(vec!["customer_read".into()]);
    let perms = || Some(vec!["charge_read".to_owned(), "refund_write".to_owned()]);
    let connect = || Some(vec!["customer_read".to_owned()]);

    let created = client
        .create_api_key(&params, "perm-create")
        .await
        .unwrap()
        .value;
    assert_eq!(created.permissions, perms(), "create");
    assert_eq!(created.connect_permissions, connect(), "create");
    assert_eq!(
        verify_response_scopes(
            &created,
            &params.permissions,
            params.connect_permissions.as_deref().unwrap()
        ),
        Ok(())
    );
    // the same answer judged against a different request is refused, naming the difference
    let err = verify_response_scopes(&created, &["charge_read".to_owned()], &[]).unwrap_err();
    assert!(err.contains("not requested [refund_write]"), "{err}");
    assert!(
        err.contains("connect_permissions not requested [customer_read]"),
        "{err}"
    );
    assert!(!err.contains(created.plaintext_secret().unwrap().expose()));

    let fetched = client.retrieve_api_key(&created.id).await.unwrap().value;
    assert_eq!(
        (fetched.permissions, fetched.connect_permissions),
        (perms(), connect()),
        "retrieve"
    );
    let listed = client
        .list_all_api_keys(&ListApiKeysParams::default())
        .await
        .unwrap();
    assert_eq!(listed.items[0].permissions, perms(), "list");
    assert_eq!(listed.items[0].connect_permissions, connect(), "list");
    let updated = client
        .update_api_key(
            &created.id,
            &UpdateApiKeyParams {
                permissions: Some(vec!["balance_read".into()]),
                ..Default::default()
            },
            "perm-update",
        )
        .await
        .unwrap()
        .value;
    assert_eq!(
        updated.permissions,
        Some(vec!["balance_read".to_owned()]),
        "update"
    );
    let rotated = client
        .rotate_api_key(
            &created.id,
            &RotateApiKeyParams {
                expire_current_key_in_minutes: Some(5),
                public_key: Some(test_key_pair().public_key_param(None).unwrap()),
            },
            "perm-rotate",
        )
        .await
        .unwrap()
        .value;
    assert_ne!(rotated.id, created.id);
    assert_eq!(
        rotated.permissions,
        Some(vec!["balance_read".to_owned()]),
        "rotate"
    );
    assert_eq!(rotated.connect_permissions, connect(), "rotate");
    let expired = client
        .expire_api_key(&rotated.id, "perm-expire")
        .await
        .unwrap()
        .value;
    assert_eq!(expired.status, ApiKeyStatus::Expired);
    assert_eq!(
        expired.permissions,
        Some(vec!["balance_read".to_owned()]),
        "expire"
    );
}

#[tokio::test]
async fn test_mode_secret_key_without_public_key_is_accepted_unless_the_simulator_is_strict() {
    let sim = start_sim(sim_config()).await;
    let client = StripeClient::new(fast_config(&sim, TEST_ACCT)).unwrap();
    let mut params = secret_key_params("nopk", &["charge_read"]);
    params.public_key = None;
    let created = client
        .create_api_key(&params, "nopk-1")
        .await
        .expect("test mode accepts a secret key without public_key")
        .value;
    let token = created.plaintext_secret().expect("plaintext in test mode");
    assert!(token.expose().starts_with("rk_test_"));
    assert_eq!(
        call_with_key(&sim, Method::GET, "/v1/charges", token.expose())
            .await
            .0,
        200
    );
    // rotate follows the same rule
    client
        .rotate_api_key(
            &created.id,
            &RotateApiKeyParams {
                expire_current_key_in_minutes: Some(1),
                public_key: None,
            },
            "nopk-rotate",
        )
        .await
        .expect("test mode rotates without public_key");
    // live mode still requires it
    let live = StripeClient::new(fast_config(&sim, LIVE_ACCT)).unwrap();
    let err = live.create_api_key(&params, "nopk-live").await.unwrap_err();
    assert_eq!(
        (api_status(&err), err.code()),
        (400, Some("parameter_missing"))
    );

    let mut strict = sim_config();
    strict.require_public_key_in_test_mode = true;
    let strict_sim = start_sim(strict).await;
    let client = StripeClient::new(fast_config(&strict_sim, TEST_ACCT)).unwrap();
    let err = client.create_api_key(&params, "nopk-2").await.unwrap_err();
    assert_eq!(api_status(&err), 400);
    assert_eq!(err.api().unwrap().param.as_deref(), Some("public_key"));
    assert_eq!(
        strict_sim
            .state()
            .account(TEST_ACCT)
            .unwrap()
            .api_keys
            .len(),
        0
    );
    // with one it works
    client
        .create_api_key(&secret_key_params("pk", &["charge_read"]), "nopk-3")
        .await
        .unwrap();
}

async fn mint_test_key(client: &StripeClient, name: &str, permissions: &[&str]) -> SecretString {
    client
        .create_api_key(
            &secret_key_params(name, permissions),
            &format!("mint-{name}"),
        )
        .await
        .unwrap()
        .value
        .plaintext_secret()
        .unwrap()
        .clone()
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

#[tokio::test]
async fn scope_probes_retry_429_and_500_honour_retry_after_and_still_judge_right() {
    let sim = start_sim(sim_config()).await;
    let (client, observer) = client_with_observer(fast_config(&sim, TEST_ACCT));
    let key = mint_test_key(&client, "probe-ok", &["charge_read"]).await;
    observer.take();
    sim.clear_request_log();
    // the first probe meets a 429 with Retry-After: 1 and then a 500
    sim.inject_fault(
        FaultSpec::next(
            1,
            FaultKind::RateLimited {
                retry_after_secs: Some(1),
            },
        )
        .for_path_prefix("/v1/"),
    );
    sim.inject_fault(
        FaultSpec::next(
            1,
            FaultKind::ServerError {
                saved: false,
                should_retry: None,
            },
        )
        .for_path_prefix("/v1/"),
    );
    let started = std::time::Instant::now();
    check_scopes(&client, &key, &strings(&["charge_read"]))
        .await
        .expect("faults are retried, then the scopes are judged right");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After was honoured"
    );
    let statuses: Vec<Option<u16>> = sim.request_log().iter().map(|e| e.status).collect();
    assert_eq!(
        statuses,
        vec![Some(429), Some(500), Some(200), Some(403)],
        "charges: 429, 500, 200; balance: 403"
    );
    let records = observer.take();
    assert_eq!(records.len(), 4, "every probe attempt is reported");
    assert!(records[0].will_retry && records[1].will_retry && !records[2].will_retry);
    assert_eq!(records[0].error_code.as_deref(), Some("rate_limit"));

    // a key with the wrong scopes is still judged wrong through the same faults
    sim.inject_fault(
        FaultSpec::next(
            2,
            FaultKind::ServerError {
                saved: false,
                should_retry: None,
            },
        )
        .for_path_prefix("/v1/"),
    );
    let err = check_scopes(&client, &key, &strings(&["balance_read"]))
        .await
        .unwrap_err();
    assert!(err.is_scope_verdict(), "{err}");
    assert!(matches!(err, ScopeCheckError::WrongScopes(_)));
    assert!(!err.to_string().contains(key.expose()));
}

#[tokio::test]
async fn scope_probes_that_meet_only_429_500_or_timeouts_never_report_wrong_scopes() {
    let mut config = sim_config();
    config.hang_duration = Duration::from_secs(3);
    let sim = start_sim(config).await;
    let mut cfg = fast_config(&sim, TEST_ACCT);
    cfg.retry.max_retries = 2;
    cfg.timeout = Duration::from_millis(300);
    let (client, observer) = client_with_observer(cfg);
    let key = mint_test_key(&client, "probe-weather", &["charge_read"]).await;
    let faults = [
        FaultKind::RateLimited {
            retry_after_secs: None,
        },
        FaultKind::ServerError {
            saved: false,
            should_retry: None,
        },
        FaultKind::Hang,
        FaultKind::DropAfterCommit,
    ];
    for fault in faults {
        sim.clear_faults();
        sim.clear_request_log();
        observer.take();
        sim.inject_fault(FaultSpec::ratio(1.0, fault.clone()).for_path_prefix("/v1/"));
        let err = check_scopes(&client, &key, &strings(&["charge_read"]))
            .await
            .unwrap_err();
        assert!(
            matches!(err, ScopeCheckError::Transient(_)),
            "{fault:?}: {err}"
        );
        assert!(!err.is_scope_verdict() && err.is_transient());
        let attempts = observer.take();
        assert_eq!(
            attempts.len(),
            3,
            "{fault:?}: bounded: max_retries + 1 attempts, then no second probe"
        );
        assert!(!attempts[2].will_retry);
        // the old entry point says so too, instead of "wrong scopes"
        let old = verify_scopes(&client, &key, &strings(&["charge_read"]))
            .await
            .unwrap_err();
        assert!(old.contains("not a verdict"), "{fault:?}: {old}");
    }
    sim.clear_faults();
    // once Stripe answers again the same key passes
    check_scopes(&client, &key, &strings(&["charge_read"]))
        .await
        .unwrap();
}

#[tokio::test]
async fn scope_probe_obeys_stripe_should_retry_false_and_an_expired_key_is_not_wrong_scopes() {
    let sim = start_sim(manual_sim_config()).await;
    let (client, observer) = client_with_observer(fast_config(&sim, TEST_ACCT));
    let key = mint_test_key(&client, "probe-nr", &["charge_read"]).await;
    observer.take();
    sim.inject_fault(
        FaultSpec::next(
            1,
            FaultKind::ServerError {
                saved: false,
                should_retry: Some(false),
            },
        )
        .for_path_prefix("/v1/"),
    );
    let err = check_scopes(&client, &key, &strings(&["charge_read"]))
        .await
        .unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert_eq!(
        observer.take().len(),
        1,
        "no retry after Stripe-Should-Retry: false"
    );

    // the new key itself refused (401 api_key_expired) is KeyRejected, not a scope verdict
    let id = client
        .list_all_api_keys(&ListApiKeysParams::default())
        .await
        .unwrap()
        .items[0]
        .id
        .clone();
    client.expire_api_key(&id, "probe-expire").await.unwrap();
    let err = check_scopes(&client, &key, &strings(&["charge_read"]))
        .await
        .unwrap_err();
    match &err {
        ScopeCheckError::KeyRejected(m) => assert!(m.contains("api_key_expired"), "{m}"),
        other => panic!("expected KeyRejected, got {other:?}"),
    }
    assert!(!err.is_scope_verdict() && !err.is_transient());
}

#[tokio::test]
async fn confirmed_expire_tells_expired_already_expired_and_gone_apart() {
    let sim = start_sim(manual_sim_config()).await;
    let client = StripeClient::new(fast_config(&sim, TEST_ACCT)).unwrap();
    let key = client
        .create_api_key(&secret_key_params("exp", &["charge_read"]), "exp-mint")
        .await
        .unwrap()
        .value;
    let outcome = client
        .expire_api_key_confirmed(&key.id, "exp-1")
        .await
        .unwrap();
    assert!(
        matches!(
            outcome,
            ExpireOutcome::Expired {
                idempotent_replayed: false,
                ..
            }
        ),
        "{outcome:?}"
    );
    // the same step again (a crash and retry) replays the saved answer
    let outcome = client
        .expire_api_key_confirmed(&key.id, "exp-1")
        .await
        .unwrap();
    assert!(
        matches!(
            outcome,
            ExpireOutcome::Expired {
                idempotent_replayed: true,
                ..
            }
        ),
        "{outcome:?}"
    );
    // a fresh idempotency key on an expired key: this simulator answers 200 with the key
    let outcome = client
        .expire_api_key_confirmed(&key.id, "exp-2")
        .await
        .unwrap();
    assert_eq!(outcome.as_str(), "expired");
    // an id Stripe does not know is gone only because a full listing confirms it
    sim.clear_request_log();
    let outcome = client
        .expire_api_key_confirmed("apikey_never_existed", "exp-3")
        .await
        .unwrap();
    assert!(matches!(outcome, ExpireOutcome::Gone { .. }), "{outcome:?}");
    let log = sim.request_log();
    assert_eq!(
        log.iter()
            .map(|e| (e.method.as_str(), e.status))
            .collect::<Vec<_>>(),
        vec![("POST", Some(404)), ("GET", Some(200))],
        "a 404 is confirmed by listing"
    );

    // a simulator that answers a second expire with 400 resource_already_expired
    let mut config = manual_sim_config();
    config.already_expired_error = true;
    let strict = start_sim(config).await;
    let client = StripeClient::new(fast_config(&strict, TEST_ACCT)).unwrap();
    let key = client
        .create_api_key(&secret_key_params("exp", &["charge_read"]), "exp-mint")
        .await
        .unwrap()
        .value;
    assert_eq!(
        client
            .expire_api_key_confirmed(&key.id, "exp-1")
            .await
            .unwrap()
            .as_str(),
        "expired"
    );
    let raw = client.expire_api_key(&key.id, "exp-2").await.unwrap_err();
    assert_eq!(
        (api_status(&raw), raw.code()),
        (400, Some("resource_already_expired"))
    );
    let outcome = client
        .expire_api_key_confirmed(&key.id, "exp-3")
        .await
        .unwrap();
    assert!(
        matches!(outcome, ExpireOutcome::AlreadyExpired { .. }),
        "{outcome:?}"
    );
    // a 400 about an active key is not "already expired"
    let active = client
        .create_api_key(&secret_key_params("act", &["charge_read"]), "exp-mint-2")
        .await
        .unwrap()
        .value;
    let err = client
        .expire_api_key_confirmed(&active.id, "exp-mint-2")
        .await
        .unwrap_err();
    assert_eq!(
        err.api().unwrap().error_type.as_deref(),
        Some("idempotency_error")
    );
    assert_eq!(
        client
            .retrieve_api_key(&active.id)
            .await
            .unwrap()
            .value
            .status,
        ApiKeyStatus::Active
    );
}

#[tokio::test]
async fn expire_with_an_expired_app_key_is_an_error_not_an_expired_key() {
    let sim = start_sim(sim_config()).await;
    let client = StripeClient::new(fast_config(&sim, TEST_ACCT)).unwrap();
    let key = client
        .create_api_key(&secret_key_params("victim", &["charge_read"]), "app-mint")
        .await
        .unwrap()
        .value;
    sim.expire_app_key(sim.app_key()).unwrap();
    let raw = client
        .expire_api_key(&key.id, "app-exp-1")
        .await
        .unwrap_err();
    assert_eq!(
        (api_status(&raw), raw.code()),
        (401, Some("api_key_expired"))
    );
    assert!(raw.is_caller_key_rejected());
    assert!(!raw.is_retryable());
    assert!(!raw.to_string().contains(sim.app_key().expose()));
    let err = client
        .expire_api_key_confirmed(&key.id, "app-exp-2")
        .await
        .unwrap_err();
    assert!(err.is_caller_key_rejected(), "{err}");
    assert_eq!(err.code(), Some("api_key_expired"));
    let state = sim.state();
    assert_eq!(
        state.account(TEST_ACCT).unwrap().api_keys[0].status,
        "active",
        "the target key still works: nothing may record it as expired"
    );
    assert_eq!(
        call_with_key(
            &sim,
            Method::GET,
            "/v1/charges",
            key.plaintext_secret().unwrap().expose()
        )
        .await
        .0,
        200
    );
    // every app call is refused the same way, listing included
    let err = client
        .list_api_keys(&ListApiKeysParams::default())
        .await
        .unwrap_err();
    assert_eq!(
        (api_status(&err), err.code()),
        (401, Some("api_key_expired"))
    );
    assert!(
        sim.expire_app_key(&SecretString::new("sk_test_other"))
            .is_err()
    );
}

#[tokio::test]
async fn a_replayed_saved_500_counts_as_stripe_answering_so_the_breaker_stays_closed() {
    use std::sync::Arc;
    use stripe_key_operator::stripe::{BreakerSettings, CircuitBreaker, CircuitState};
    let sim = start_sim(sim_config()).await;
    let mut config = fast_config(&sim, TEST_ACCT);
    config.retry.max_retries = 0;
    let breaker = Arc::new(CircuitBreaker::new(
        BreakerSettings {
            failure_threshold: 2,
            cooldown: Duration::from_secs(3600),
            max_cooldown: Duration::from_secs(3600),
        },
        None,
    ));
    let client = StripeClient::new(config)
        .unwrap()
        .with_breaker(breaker.clone());
    sim.inject_fault(
        FaultSpec::next(
            1,
            FaultKind::ServerError {
                saved: true,
                should_retry: None,
            },
        )
        .for_method("POST"),
    );
    let key = idempotency_key(UID, 4, "mint");
    let params = secret_key_params("replayed", &["charge_read"]);
    // One real 500, then the saved one replayed twice: Stripe answered each replay.
    for _ in 0..3 {
        let err = client.create_api_key(&params, &key).await.unwrap_err();
        assert_eq!(api_status(&err), 500);
    }
    assert_eq!(
        sim.request_log()
            .iter()
            .map(|e| e.replayed)
            .collect::<Vec<_>>(),
        vec![false, true, true]
    );
    assert_eq!(
        breaker.state(),
        CircuitState::Closed,
        "replays are answers, not an outage"
    );
    // So the fresh key the engine moves on to is sent, and mints.
    client
        .create_api_key(&params, &idempotency_key(UID, 4, "mint-fresh"))
        .await
        .expect("a fresh idempotency key is sent and executes");
    // Two fresh 500s in a row still open it.
    sim.inject_fault(
        FaultSpec::next(
            2,
            FaultKind::ServerError {
                saved: false,
                should_retry: None,
            },
        )
        .for_method("GET"),
    );
    for _ in 0..2 {
        let _ = client.list_api_keys(&ListApiKeysParams::default()).await;
    }
    assert_eq!(breaker.state(), CircuitState::Open);
}

#[tokio::test]
async fn a_saved_server_error_is_marked_as_a_replay_on_the_error() {
    let sim = start_sim(sim_config()).await;
    let mut config = fast_config(&sim, TEST_ACCT);
    config.retry.max_retries = 0;
    let client = StripeClient::new(config).unwrap();
    sim.inject_fault(
        FaultSpec::next(
            1,
            FaultKind::ServerError {
                saved: true,
                should_retry: None,
            },
        )
        .for_method("POST"),
    );
    let key = idempotency_key(UID, 3, "mint");
    let params = secret_key_params("replayed", &["charge_read"]);
    let first = client.create_api_key(&params, &key).await.unwrap_err();
    assert_eq!(api_status(&first), 500);
    assert!(!first.is_idempotent_replay(), "the first 500 is fresh");
    let second = client.create_api_key(&params, &key).await.unwrap_err();
    assert_eq!(api_status(&second), 500);
    assert!(second.is_idempotent_replay(), "the saved 500 is replayed");
    assert!(second.api().unwrap().idempotent_replayed);
    assert!(second.to_string().contains("replay"), "{second}");
    assert_eq!(
        sim.request_log()
            .iter()
            .map(|e| e.replayed)
            .collect::<Vec<_>>(),
        vec![false, true]
    );
    // nothing was created, which a listing confirms; a fresh key then mints
    assert!(
        client
            .list_all_api_keys(&ListApiKeysParams {
                include_expired: Some(true),
                limit: Some(100)
            })
            .await
            .unwrap()
            .items
            .is_empty()
    );
    let created = client
        .create_api_key(&params, &idempotency_key(UID, 3, "mint-attempt-2"))
        .await
        .unwrap();
    assert!(!created.idempotent_replayed);
    assert_eq!(sim.state().account(TEST_ACCT).unwrap().api_keys.len(), 1);
}
