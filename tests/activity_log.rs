//! Stripe's activity log (issue 16 §3): the StripeAccount controller reads it every
//! `--activity-log-interval` with a cursor in status, and acts on what concerns keys: a managed
//! key viewed by a person in the Dashboard (`KeyViewed`, and an incident rotation when the
//! policy asks for one), a managed key changed or deleted outside the operator (`KeyTampered`
//! and a repair), keys created by hand (unmanaged). The real controllers run against the
//! Kubernetes API for tests and the Stripe simulator, whose control API plays the person.

#[path = "common/operator.rs"]
mod operator;

use std::time::{Duration, Instant};

use kube::api::Api;
use operator::*;
use serde_json::{Value, json};
use stripe_key_operator::api::{StripeAccount, StripeKeyPolicy};
use stripe_key_operator::audit::{AuditLog, MemorySink};
use stripe_key_operator::sandbox::env::{EnvOptions, LocalEnv};
use stripe_key_operator::sim::DashboardAction;

/// The operator's `--activity-log-interval` in these tests.
const INTERVAL: Duration = Duration::from_secs(2);
/// Time a reaction may take beyond one interval (a reconcile, Stripe calls, an Event).
const SLACK: Duration = Duration::from_secs(4);
const EMAIL: &str = "mallory@example.com";

struct Setup {
    env: LocalEnv,
    audit: AuditLog,
    sink: MemorySink,
}

/// The environment with the reader on and the `checkout` policy minted, after the account's
/// first activity-log read (which only sets the cursor: history is not replayed).
async fn setup(policy_json: Value) -> Setup {
    let (audit, sink) = AuditLog::memory();
    let env = env_with(EnvOptions {
        activity_log_interval: INTERVAL,
        audit: Some(audit.clone()),
        ..EnvOptions::default()
    })
    .await;
    wait_account("the first activity-log read", &env, |s| {
        s.activity_log
            .as_ref()
            .is_some_and(|a| a.started_at.is_some())
    })
    .await;
    env.apply_json(&policy_json).await.unwrap();
    wait_policy(&env, "checkout", "the first key", ready).await;
    Setup { env, audit, sink }
}

fn current_key(p: &StripeKeyPolicy) -> String {
    p.status
        .as_ref()
        .and_then(|s| s.current_key.as_ref())
        .map(|k| k.id.clone())
        .expect("a current key")
}

async fn wait_account(
    what: &str,
    env: &LocalEnv,
    pred: impl Fn(&stripe_key_operator::api::StripeAccountStatus) -> bool,
) -> StripeAccount {
    let api: Api<StripeAccount> = Api::all(env.client.clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let a = api.get(ACCOUNT).await.unwrap();
        if a.status.as_ref().is_some_and(&pred) {
            return a;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {:#?}",
            a.status
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How often a Warning `reason` was recorded for the policy: the Event recorder folds
/// repeats of one reason into a series, so each Event counts `series.count` times.
async fn count_events(env: &LocalEnv, reason: &str) -> usize {
    let api: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(env.client.clone(), NS);
    api.list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("checkout"))
        .filter(|e| e.type_.as_deref() == Some("Warning") && e.reason.as_deref() == Some(reason))
        .map(|e| e.series.map(|s| s.count.max(1) as usize).unwrap_or(1))
        .sum()
}

/// Waits until `reason` was recorded `n` times; returns how long it took.
async fn wait_events(env: &LocalEnv, reason: &str, n: usize, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let seen = count_events(env, reason).await;
        if seen >= n {
            assert_eq!(seen, n, "{reason} recorded more often than expected");
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "{reason}: {seen} of {n} Events after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The `stripe.activity` audit records.
async fn activity_records(s: &Setup) -> Vec<Value> {
    s.audit.flush().await;
    s.sink
        .lines()
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["action"] == "stripe.activity")
        .collect()
}

fn metric(env: &LocalEnv, line_prefix: &str) -> Option<f64> {
    env.metrics
        .encode()
        .lines()
        .find_map(|l| l.strip_prefix(line_prefix)?.trim().parse().ok())
}

fn dashboard(env: &LocalEnv, action: DashboardAction) -> String {
    env.sim
        .dashboard(&env.account_id, EMAIL, action)
        .expect("the simulated Dashboard acts")
}

fn sim_key(env: &LocalEnv, id: &str) -> stripe_key_operator::sim::KeyState {
    sim_keys(env).into_iter().find(|k| k.id == id).unwrap()
}

fn with_on_key_viewed(choice: &str) -> Value {
    let mut p = policy("checkout", &["charge_read"]);
    p["spec"]["rotation"]["onKeyViewed"] = json!(choice);
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_viewed_by_a_person_raises_key_viewed_within_one_interval_and_only_alerts_by_default()
{
    let s = setup(policy("checkout", &["charge_read"])).await;
    let env = &s.env;
    let key = current_key(&get_policy(env, "checkout").await);
    dashboard(
        env,
        DashboardAction::View {
            key_id: key.clone(),
        },
    );
    let took = wait_events(env, "KeyViewed", 1, INTERVAL + SLACK).await;
    assert!(took <= INTERVAL + SLACK, "{took:?}");
    // Alert only: the key stays.
    tokio::time::sleep(INTERVAL * 2).await;
    let p = get_policy(env, "checkout").await;
    assert_eq!(current_key(&p), key, "Alert does not rotate");
    assert_eq!(sim_key(env, &key).status, "active");
    let records = activity_records(&s).await;
    assert_eq!(records.len(), 1, "{records:#?}");
    assert_eq!(records[0]["target"]["key_id"], key.as_str());
    assert_eq!(records[0]["details"]["stripe_action"], "api_key_viewed");
    assert_eq!(
        records[0]["details"]["stripe_actor"],
        format!("user {EMAIL}").as_str()
    );
    assert_eq!(
        metric(
            env,
            &format!(
                "stripe_key_operator_key_viewed_total{{namespace=\"{NS}\",name=\"checkout\"}}"
            )
        ),
        Some(1.0)
    );
    assert_eq!(count_events(env, "KeyTampered").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_viewed_with_on_key_viewed_incident_rotation_is_replaced_and_revoked() {
    let s = setup(with_on_key_viewed("IncidentRotation")).await;
    let env = &s.env;
    let old = current_key(&get_policy(env, "checkout").await);
    dashboard(
        env,
        DashboardAction::View {
            key_id: old.clone(),
        },
    );
    wait_events(env, "KeyViewed", 1, INTERVAL + SLACK).await;
    let p = wait_policy(env, "checkout", "an incident rotation", |p| {
        ready(p)
            && p.status
                .as_ref()
                .and_then(|s| s.current_key.as_ref())
                .is_some_and(|k| k.id != old)
    })
    .await;
    assert_eq!(
        sim_key(env, &old).status,
        "expired",
        "the viewed key is revoked"
    );
    let status = p.status.unwrap();
    assert!(
        status.previous_key.is_none(),
        "an incident keeps no old key"
    );
    assert!(
        status
            .last_handled_rotate_request
            .as_deref()
            .is_some_and(|r| r.starts_with("activity-actlog_")),
        "{:?}",
        status.last_handled_rotate_request
    );
    // The operator's own incident (its create and its expiry) raises nothing more.
    tokio::time::sleep(INTERVAL * 2).await;
    assert_eq!(count_events(env, "KeyViewed").await, 1);
    assert_eq!(count_events(env, "KeyTampered").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_changed_outside_the_operator_is_repaired_in_place() {
    let s = setup(policy("checkout", &["charge_read"])).await;
    let env = &s.env;
    let key = current_key(&get_policy(env, "checkout").await);
    let before = sim_key(env, &key);
    dashboard(
        env,
        DashboardAction::Update {
            key_id: key.clone(),
            name: Some("mine now".into()),
            permissions: Some(vec!["charge_read".into(), "refund_write".into()]),
        },
    );
    assert!(
        sim_key(env, &key)
            .permissions
            .contains(&"refund_write".to_string())
    );
    wait_events(env, "KeyTampered", 1, INTERVAL + SLACK).await;
    let deadline = Instant::now() + SLACK;
    loop {
        let k = sim_key(env, &key);
        if k.permissions == ["charge_read"] && k.name == before.name {
            assert_eq!(k.note, before.note, "the owner mark is back");
            break;
        }
        assert!(Instant::now() < deadline, "not repaired: {k:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        current_key(&get_policy(env, "checkout").await),
        key,
        "repaired in place"
    );
    // The repair's own update is recognised: no second KeyTampered, and its actor is learned.
    tokio::time::sleep(INTERVAL * 2 + SLACK).await;
    assert_eq!(count_events(env, "KeyTampered").await, 1);
    let account = wait_account("the repair seen", env, |s| {
        s.activity_log
            .as_ref()
            .is_some_and(|a| a.pending_repairs.is_empty())
    })
    .await;
    let app_key_id = env.sim.app_key_id(env.sim.app_key());
    assert!(
        account
            .status
            .unwrap()
            .activity_log
            .unwrap()
            .operator_key_ids
            .contains(&app_key_id)
    );
    let records = activity_records(&s).await;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["details"]["stripe_action"], "api_key_updated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_deleted_outside_the_operator_is_re_minted() {
    let s = setup(policy("checkout", &["charge_read"])).await;
    let env = &s.env;
    let old = current_key(&get_policy(env, "checkout").await);
    dashboard(
        env,
        DashboardAction::Expire {
            key_id: old.clone(),
        },
    );
    wait_events(env, "KeyTampered", 1, INTERVAL + SLACK).await;
    let p = wait_policy(env, "checkout", "a new key", |p| {
        ready(p)
            && p.status
                .as_ref()
                .and_then(|s| s.current_key.as_ref())
                .is_some_and(|k| k.id != old)
    })
    .await;
    let new = current_key(&p);
    assert_eq!(sim_key(env, &new).status, "active");
    let secret = env
        .secret(NS, "checkout-stripe-key")
        .await
        .unwrap()
        .unwrap();
    assert!(
        secret_value(&secret, "STRIPE_API_KEY")
            .is_some_and(|v| fingerprint(&v) == sim_key(env, &new).token_fingerprint)
    );
    tokio::time::sleep(INTERVAL * 2).await;
    assert_eq!(count_events(env, "KeyTampered").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_created_by_hand_is_listed_as_unmanaged_until_deleted() {
    let s = setup(policy("checkout", &["charge_read"])).await;
    let env = &s.env;
    let id = dashboard(
        env,
        DashboardAction::Create {
            name: "laptop script".into(),
            permissions: vec!["charge_write".into()],
        },
    );
    let account = wait_account("the unmanaged key", env, |s| !s.unmanaged_keys.is_empty()).await;
    let status = account.status.unwrap();
    assert_eq!(status.unmanaged_key_count, Some(1));
    let listed = &status.unmanaged_keys[0];
    assert_eq!(listed.id, id);
    assert_eq!(listed.name.as_deref(), Some("laptop script"));
    assert_eq!(listed.created_by, format!("user {EMAIL}"));
    assert_eq!(
        metric(
            env,
            &format!("stripe_key_operator_unmanaged_keys{{account=\"{ACCOUNT}\"}}")
        ),
        Some(1.0)
    );
    // Not the operator's: it never touches the key.
    assert_eq!(sim_key(env, &id).status, "active");
    dashboard(env, DashboardAction::Expire { key_id: id });
    wait_account("the unmanaged key gone", env, |s| {
        s.unmanaged_keys.is_empty() && s.unmanaged_key_count == Some(0)
    })
    .await;
    assert_eq!(count_events(env, "KeyTampered").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operators_own_rotations_raise_nothing() {
    let s = setup(policy("checkout", &["charge_read"])).await;
    let env = &s.env;
    let first = current_key(&get_policy(env, "checkout").await);
    // A routine rotation: mint, overlap, expire the previous key.
    annotate(env, "checkout", json!({"stripekeys.io/rotate": "r1"})).await;
    wait_policy(env, "checkout", "the overlap", |p| {
        p.status
            .as_ref()
            .and_then(|s| s.previous_key.as_ref())
            .is_some_and(|k| k.id == first)
    })
    .await;
    // Past the overlap (again if the rollout finished after a jump of the clock).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        env.clock.advance(Duration::from_secs(2 * 3600));
        nudge(env, "checkout").await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let p = get_policy(env, "checkout").await;
        if ready(&p) && p.status.as_ref().is_some_and(|s| s.previous_key.is_none()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the previous key was never expired: {:#?}",
            p.status
        );
    }
    assert_eq!(sim_key(env, &first).status, "expired");
    // An incident: everything handed out is retired by the operator.
    annotate(
        env,
        "checkout",
        json!({"stripekeys.io/rotate": "r2", "stripekeys.io/rotate-reason": "incident"}),
    )
    .await;
    wait_policy(env, "checkout", "the incident handled", |p| {
        ready(p)
            && p.status
                .as_ref()
                .is_some_and(|s| s.last_handled_rotate_request.as_deref() == Some("r2"))
    })
    .await;
    let log = env.sim.activity_log(&env.account_id);
    assert!(
        log.iter().filter(|e| e.action == "api_key_deleted").count() >= 2,
        "{log:#?}"
    );
    tokio::time::sleep(INTERVAL * 2 + SLACK).await;
    wait_account("every entry read", env, |s| {
        s.activity_log
            .as_ref()
            .and_then(|a| a.last_entry_id.as_deref())
            == log.last().map(|e| e.id.as_str())
    })
    .await;
    assert_eq!(count_events(env, "KeyTampered").await, 0);
    assert_eq!(count_events(env, "KeyViewed").await, 0);
    assert!(activity_records(&s).await.is_empty());
    let account = Api::<StripeAccount>::all(env.client.clone())
        .get(ACCOUNT)
        .await
        .unwrap();
    let status = account.status.unwrap();
    assert!(status.unmanaged_keys.is_empty());
    assert_eq!(
        status.activity_log.unwrap().operator_key_ids,
        vec![env.sim.app_key_id(env.sim.app_key())],
        "learned from its own creates"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cursor_survives_a_restart_no_entry_handled_twice_none_skipped() {
    let mut s = setup(policy("checkout", &["charge_read"])).await;
    let key = current_key(&get_policy(&s.env, "checkout").await);
    dashboard(
        &s.env,
        DashboardAction::View {
            key_id: key.clone(),
        },
    );
    wait_events(&s.env, "KeyViewed", 1, INTERVAL + SLACK).await;
    // The cursor is written after the entry's action (a crash between the two handles the
    // entry again: at least once, never skipped): the crash comes once it passed the view.
    let log = s.env.sim.activity_log(&s.env.account_id);
    wait_account("the cursor past the view", &s.env, |st| {
        st.activity_log
            .as_ref()
            .and_then(|a| a.last_entry_id.as_deref())
            == log.last().map(|e| e.id.as_str())
    })
    .await;
    // A crash, and two views while the operator is down.
    s.env.kill_operator().await;
    dashboard(
        &s.env,
        DashboardAction::View {
            key_id: key.clone(),
        },
    );
    dashboard(
        &s.env,
        DashboardAction::View {
            key_id: key.clone(),
        },
    );
    s.env.start_operator();
    wait_events(&s.env, "KeyViewed", 3, INTERVAL + SLACK).await;
    // A second restart with nothing new: nothing is handled again.
    s.env.kill_operator().await;
    s.env.start_operator();
    tokio::time::sleep(INTERVAL * 2 + SLACK).await;
    assert_eq!(count_events(&s.env, "KeyViewed").await, 3);
    let records = activity_records(&s).await;
    let mut ids: Vec<&str> = records
        .iter()
        .map(|r| r["details"]["activity_log_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 3, "{records:#?}");
    ids.dedup();
    assert_eq!(ids.len(), 3, "each entry once");
    let views: Vec<String> = s
        .env
        .sim
        .activity_log(&s.env.account_id)
        .into_iter()
        .filter(|e| e.action == "api_key_viewed")
        .map(|e| e.id)
        .collect();
    assert_eq!(ids, views.iter().map(String::as_str).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_entries_than_one_page_are_all_handled_once() {
    let mut s = setup(policy("checkout", &["charge_read"])).await;
    let key = current_key(&get_policy(&s.env, "checkout").await);
    // Let the reader pass the policy's own entries, then stop it.
    tokio::time::sleep(INTERVAL + SLACK).await;
    s.env.kill_operator().await;
    let mut created = Vec::new();
    for i in 0..130 {
        created.push(dashboard(
            &s.env,
            DashboardAction::Create {
                name: format!("script {i}"),
                permissions: vec!["charge_read".into()],
            },
        ));
        if i % 50 == 10 {
            dashboard(
                &s.env,
                DashboardAction::View {
                    key_id: key.clone(),
                },
            );
        }
    }
    s.env.sim.clear_request_log();
    s.env.start_operator();
    wait_events(&s.env, "KeyViewed", 3, INTERVAL + SLACK * 2).await;
    let account = wait_account("every unmanaged key", &s.env, |s| {
        s.unmanaged_key_count == Some(130)
    })
    .await;
    let status = account.status.unwrap();
    assert_eq!(status.unmanaged_keys.len(), 50, "the newest 50 are listed");
    assert_eq!(&status.unmanaged_keys[0].id, created.last().unwrap());
    let reads: Vec<_> = s
        .env
        .sim
        .request_log()
        .into_iter()
        .filter(|r| r.path == "/v2/iam/activity_logs")
        .collect();
    assert!(reads.len() >= 2, "two pages: {reads:#?}");
    assert!(reads[1].query.contains("page="), "{:?}", reads[1].query);
    tokio::time::sleep(INTERVAL * 2).await;
    assert_eq!(count_events(&s.env, "KeyViewed").await, 3);
    let account = wait_account("nothing counted twice", &s.env, |_| true).await;
    assert_eq!(account.status.unwrap().unmanaged_key_count, Some(130));
}

/// The client's side of the activity log against the simulator: filters, `limit`, pages
/// followed with `next_page_url` (newest first, nothing twice), retrieve, and the app key as the
/// actor of the app's own key changes.
#[tokio::test]
async fn the_client_reads_the_activity_log_page_by_page() {
    use stripe_key_operator::sim::{SimConfig, Simulator};
    use stripe_key_operator::stripe::{
        ApiKeyType, CreateApiKeyParams, ListActivityLogsParams, Mode, StripeClient,
    };
    let sim = Simulator::start(SimConfig::new().with_account("acct_1Activity", Mode::Test))
        .await
        .unwrap();
    let mut config = sim.stripe_config("acct_1Activity").unwrap();
    config.requests_per_second = 1000.0;
    let client = StripeClient::new(config).unwrap();
    let key = client
        .create_api_key(
            &CreateApiKeyParams {
                key_type: ApiKeyType::SecretKey,
                name: "stripe-key-operator/shop/a".into(),
                note: Some("policy-uid=u rotation=1".into()),
                permissions: vec!["charge_read".into()],
                connect_permissions: None,
                expires_at: None,
                public_key: None,
            },
            "idem-create-1",
        )
        .await
        .unwrap()
        .value;
    for _ in 0..4 {
        sim.dashboard(
            "acct_1Activity",
            EMAIL,
            DashboardAction::View {
                key_id: key.id.clone(),
            },
        )
        .unwrap();
    }
    let params = ListActivityLogsParams {
        action_groups: vec!["api_key".into()],
        actions: vec!["api_key_viewed".into()],
        limit: Some(3),
    };
    let first = client.list_activity_logs(&params).await.unwrap().value;
    assert_eq!(first.data.len(), 3);
    let next = first.next_page_url.clone().expect("a second page");
    let second = client.list_activity_logs_page(&next).await.unwrap().value;
    assert_eq!(second.data.len(), 1);
    assert!(second.next_page_url.is_none());
    let ids: Vec<&str> = first
        .data
        .iter()
        .chain(&second.data)
        .map(|e| e.id.as_str())
        .collect();
    let log = sim.activity_log("acct_1Activity");
    let expected: Vec<&str> = log
        .iter()
        .rev()
        .filter(|e| e.action == "api_key_viewed")
        .map(|e| e.id.as_str())
        .collect();
    assert_eq!(ids, expected, "newest first, each once");
    let viewed = &first.data[0];
    assert_eq!(viewed.actor.user_email(), Some(EMAIL));
    assert_eq!(
        viewed.api_key().map(|k| k.id.as_str()),
        Some(key.id.as_str())
    );
    assert!(viewed.created <= chrono::Utc::now());
    // The create was the app's own: actor api_key, the app key's id.
    let all = client
        .list_activity_logs(&ListActivityLogsParams {
            actions: vec!["api_key_created".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .value;
    assert_eq!(all.data.len(), 1);
    assert_eq!(
        all.data[0].actor.api_key_id(),
        Some(sim.app_key_id(sim.app_key()).as_str())
    );
    let one = client
        .retrieve_activity_log(&viewed.id)
        .await
        .unwrap()
        .value;
    assert_eq!(one, *viewed);
    let missing = client
        .retrieve_activity_log("actlog_nope")
        .await
        .unwrap_err();
    assert_eq!(missing.status(), Some(404));
    // A page URL on another origin never gets the app key.
    assert!(
        client
            .list_activity_logs_page("https://evil.example/v2/iam/activity_logs?page=x")
            .await
            .is_err()
    );
}

/// A read that fails (Stripe answers 500 for a while) is reported on the account and skips
/// nothing: the entries made meanwhile are handled once the log can be read again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_read_is_reported_and_skips_nothing() {
    use stripe_key_operator::sim::{FaultKind, FaultSpec};
    let s = setup(policy("checkout", &["charge_read"])).await;
    let env = &s.env;
    let key = current_key(&get_policy(env, "checkout").await);
    env.sim.inject_fault(
        FaultSpec::ratio(
            1.0,
            FaultKind::ServerError {
                saved: false,
                should_retry: Some(false),
            },
        )
        .for_path_prefix("/v2/iam/activity_logs"),
    );
    dashboard(
        env,
        DashboardAction::View {
            key_id: key.clone(),
        },
    );
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(env.client.clone(), "default");
    let deadline = Instant::now() + INTERVAL + SLACK;
    loop {
        let found = events
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .any(|e| {
                e.reason.as_deref() == Some("ActivityLogUnreadable")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(ACCOUNT)
            });
        if found {
            break;
        }
        assert!(Instant::now() < deadline, "no ActivityLogUnreadable Event");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(count_events(env, "KeyViewed").await, 0, "not read yet");
    env.sim.clear_faults();
    wait_events(env, "KeyViewed", 1, INTERVAL + SLACK).await;
    assert!(
        metric(
            env,
            &format!(
                "stripe_key_operator_activity_log_reads_total{{account=\"{ACCOUNT}\",outcome=\"StripeUnavailable\"}}"
            )
        )
        .is_some_and(|n| n >= 1.0)
    );
}
