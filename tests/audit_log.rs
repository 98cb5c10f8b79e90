//! The audit log: line format, hash chain, sinks, restarts, concurrency, failure handling and
//! the secret filter.

use std::collections::HashSet;
use std::io::Write;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use rand::Rng;
use serde_json::Value;
use stripe_key_operator::audit::{
    Actor, AuditEntry, AuditError, AuditLog, AuditOptions, AuditSink, AuditTarget, ChainHead,
    GENESIS_HASH, MemorySink, ObserveStripeCall, StripeAuditObserver, StripeCall, line_hash,
    verify_chain,
};

fn random_alnum(n: usize) -> String {
    let mut rng = rand::rng();
    // Always mixed case and digits, like real Stripe tokens.
    let body: String = (&mut rng)
        .sample_iter(rand::distr::Alphanumeric)
        .take(n.saturating_sub(3))
        .map(char::from)
        .collect();
    format!("{body}aZ7")
}

fn actor() -> Actor {
    Actor::resource("StripeKeyPolicy", Some("shop"), "checkout")
}

fn parse(lines: &[String]) -> Vec<Value> {
    lines
        .iter()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect()
}

#[tokio::test]
async fn lines_are_json_records_chained_from_the_genesis_value() {
    let (log, sink) = AuditLog::memory();
    log.record(
        AuditEntry::store_write(actor(), "secret/data/stripe/shop/checkout")
            .key("apikey_1", "3f2a9c0d1e4b")
            .detail("version", 7),
    );
    log.record(
        AuditEntry::secret_sync(actor().triggered_by("schedule"), "shop", "checkout-stripe")
            .fingerprint("3f2a9c0d1e4b"),
    );
    log.record(
        AuditEntry::rollout_patch(actor(), "Deployment", "shop", "web").failure("forbidden"),
    );
    log.record(AuditEntry::rotation_transition(actor(), "Minted", "Stored"));
    log.flush().await;

    let lines = sink.lines();
    assert_eq!(lines.len(), 4);
    let v = parse(&lines);
    for (i, rec) in v.iter().enumerate() {
        assert_eq!(rec["seq"], (i + 1) as u64);
        let expected_prev = if i == 0 {
            GENESIS_HASH.to_owned()
        } else {
            line_hash(lines[i - 1].as_bytes())
        };
        assert_eq!(rec["prev"], expected_prev.as_str(), "line {}", i + 1);
        let time = rec["time"].as_str().unwrap();
        chrono::DateTime::parse_from_rfc3339(time).expect("time is RFC 3339");
    }
    assert_eq!(v[0]["action"], "store.write");
    assert_eq!(v[0]["actor"]["kind"], "StripeKeyPolicy");
    assert_eq!(v[0]["actor"]["namespace"], "shop");
    assert_eq!(v[0]["actor"]["name"], "checkout");
    assert_eq!(v[0]["actor"]["trigger"], "Reconcile");
    assert_eq!(v[0]["target"]["key_id"], "apikey_1");
    assert_eq!(v[0]["target"]["fingerprint"], "3f2a9c0d1e4b");
    assert_eq!(
        v[0]["target"]["store_path"],
        "secret/data/stripe/shop/checkout"
    );
    assert_eq!(v[0]["outcome"], "success");
    assert!(v[0].get("reason").is_none());
    assert_eq!(v[0]["details"]["version"], 7);
    assert_eq!(v[1]["action"], "secret.sync");
    assert_eq!(v[1]["actor"]["trigger"], "schedule");
    assert_eq!(v[1]["target"]["object"]["kind"], "Secret");
    assert_eq!(v[1]["target"]["object"]["name"], "checkout-stripe");
    assert_eq!(v[2]["action"], "rollout.patch");
    assert_eq!(v[2]["outcome"], "failure");
    assert_eq!(v[2]["reason"], "forbidden");
    assert_eq!(v[3]["action"], "rotation.transition");
    assert_eq!(v[3]["details"]["from"], "Minted");
    assert_eq!(v[3]["details"]["to"], "Stored");

    let summary = verify_chain(sink.contents().as_bytes(), &Default::default()).unwrap();
    assert_eq!(summary.lines, 4);
    assert_eq!(Some(summary.head.clone()), log.head());
    assert_eq!(summary.head.hash, line_hash(lines[3].as_bytes()));
    assert_eq!(log.stats().written, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_records_get_strictly_increasing_seq_and_one_valid_chain() {
    const TASKS: usize = 16;
    const EACH: usize = 200;
    let (log, sink) = AuditLog::memory();
    let mut handles = Vec::new();
    for t in 0..TASKS {
        let log = log.clone();
        handles.push(tokio::spawn(async move {
            for i in 0..EACH {
                log.record(
                    AuditEntry::rotation_transition(actor(), "A", "B")
                        .detail("task", t)
                        .detail("i", i),
                );
                if i % 50 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    log.flush().await;
    let lines = sink.lines();
    assert_eq!(lines.len(), TASKS * EACH);
    let v = parse(&lines);
    let mut last_i = vec![None::<u64>; TASKS];
    let mut seen = HashSet::new();
    for (n, rec) in v.iter().enumerate() {
        assert_eq!(
            rec["seq"],
            (n + 1) as u64,
            "seq strictly increasing without gaps"
        );
        let t = rec["details"]["task"].as_u64().unwrap() as usize;
        let i = rec["details"]["i"].as_u64().unwrap();
        assert!(seen.insert((t, i)), "entry ({t},{i}) written once");
        assert!(
            last_i[t].is_none_or(|p| p < i),
            "a task's entries keep their order"
        );
        last_i[t] = Some(i);
    }
    let summary = verify_chain(sink.contents().as_bytes(), &Default::default()).unwrap();
    assert_eq!(summary.head.seq, (TASKS * EACH) as u64);
    assert_eq!(log.stats().dropped, 0);
}

#[test]
fn a_restarted_file_log_continues_the_same_chain() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");

    let first = AuditLog::file(&path).unwrap();
    for i in 0..5 {
        first.record(AuditEntry::store_write(actor(), "kv/a").detail("i", i));
    }
    first.close();
    let head_before = first.head().unwrap();
    assert_eq!(head_before.seq, 5);
    drop(first);

    let second = AuditLog::file(&path).unwrap();
    assert_eq!(
        second.head(),
        Some(head_before.clone()),
        "resumes from the last line"
    );
    for i in 0..3 {
        second.record(AuditEntry::store_write(actor(), "kv/b").detail("i", i));
    }
    second.close();

    let bytes = std::fs::read(&path).unwrap();
    let summary = verify_chain(&bytes, &Default::default()).unwrap();
    assert_eq!(summary.lines, 8);
    assert_eq!(summary.head.seq, 8);
    let text = String::from_utf8(bytes).unwrap();
    let lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let v = parse(&lines);
    assert_eq!(v[5]["seq"], 6);
    assert_eq!(v[5]["prev"], head_before.hash.as_str());
    assert_eq!(v[5]["target"]["store_path"], "kv/b");
}

#[test]
fn a_second_writer_on_an_open_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let first = AuditLog::file(&path).unwrap();
    match AuditLog::file(&path) {
        Err(AuditError::Locked { .. }) => {}
        other => panic!("expected Locked, got {other:?}"),
    }
    first.close();
    AuditLog::file(&path)
        .expect("the lock is released by close")
        .close();
}

#[cfg(unix)]
#[test]
fn the_audit_file_is_created_private_to_the_operator() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    AuditLog::file(&path).unwrap().close();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "mode {mode:o} grants group/other access");
}

#[test]
fn a_restart_after_an_interrupted_write_cuts_the_partial_line_and_records_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let log = AuditLog::file(&path).unwrap();
    for _ in 0..3 {
        log.record(AuditEntry::store_write(actor(), "kv/a"));
    }
    log.close();
    drop(log);
    let partial = b"{\"time\":\"2026-11-28T10:00:00Z\",\"seq\":4,\"act";
    std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap()
        .write_all(partial)
        .unwrap();
    assert!(verify_chain(&std::fs::read(&path).unwrap(), &Default::default()).is_err());

    let log = AuditLog::file(&path).unwrap();
    log.record(AuditEntry::store_write(actor(), "kv/after"));
    log.close();

    let bytes = std::fs::read(&path).unwrap();
    let summary = verify_chain(&bytes, &Default::default()).expect("chain intact after recovery");
    assert_eq!(summary.lines, 5);
    let text = String::from_utf8(bytes).unwrap();
    let lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let v = parse(&lines);
    assert_eq!(v[3]["action"], "audit.recovery");
    assert_eq!(v[3]["seq"], 4);
    assert_eq!(v[3]["details"]["discarded_bytes"], partial.len() as u64);
    assert_eq!(
        v[3]["details"]["discarded_sha256"],
        line_hash(partial).as_str()
    );
    assert_eq!(v[4]["target"]["store_path"], "kv/after");
}

#[test]
fn a_file_whose_last_line_is_not_a_record_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    std::fs::write(&path, "hello world\n").unwrap();
    match AuditLog::file(&path) {
        Err(e @ AuditError::Corrupt { .. }) => {
            assert!(e.to_string().contains("audit verify"), "{e}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[tokio::test]
async fn secret_material_in_any_field_is_redacted_before_it_is_written() {
    let secrets = [
        format!("{}{}", "sk_live_", random_alnum(24)),
        format!("{}{}", "rk_live_", random_alnum(99)),
        format!("{}{}", "whsec_", random_alnum(32)),
        format!("{}{}", "sk_test_", random_alnum(24)),
        format!("{}{}", "rk_test_", random_alnum(24)),
    ];
    let (log, sink) = AuditLog::memory();
    for s in &secrets {
        log.record(
            AuditEntry::store_write(
                Actor::resource("StripeKeyPolicy", Some("shop"), s.as_str()),
                &format!("kv/stripe/{s}"),
            )
            .key(s, s)
            .failure(format!("create failed for {s}"))
            .detail("token", s.as_str())
            .detail(s, "as a key")
            .detail("nested", serde_json::json!({ "list": [s.as_str()] })),
        );
    }
    // Legitimate ids next to a secret stay as they are.
    log.record(
        AuditEntry::secret_sync(actor(), "shop", "checkout-stripe")
            .key_id("apikey_61TzA9")
            .detail("permissions", "risk_read task_test_case"),
    );
    log.flush().await;
    let contents = sink.contents();
    for s in &secrets {
        assert!(
            !contents.contains(s.as_str()),
            "a secret reached the audit log"
        );
        let fp = stripe_key_operator::secret::fingerprint(s.as_bytes());
        assert!(contents.contains(&format!("[redacted fp={fp}]")));
    }
    let v = parse(&sink.lines());
    assert_eq!(
        v[0]["target"]["fingerprint"], "[invalid]",
        "a fingerprint must be hex"
    );
    assert_eq!(v[5]["target"]["key_id"], "apikey_61TzA9");
    assert_eq!(v[5]["details"]["permissions"], "risk_read task_test_case");
    assert!(log.stats().redacted >= 5 * 7);
    verify_chain(contents.as_bytes(), &Default::default()).unwrap();
}

#[tokio::test]
async fn a_failing_sink_is_counted_and_the_stored_chain_stays_valid() {
    let (log, sink) = AuditLog::memory();
    log.record(AuditEntry::store_write(actor(), "kv/1"));
    log.flush().await;
    sink.fail_next_writes(1);
    log.record(AuditEntry::store_write(actor(), "kv/lost"));
    log.record(AuditEntry::store_write(actor(), "kv/3"));
    log.flush().await;
    let stats = log.stats();
    assert_eq!(stats.sink_failures, 1);
    assert_eq!(stats.written, 2);
    let v = parse(&sink.lines());
    assert_eq!(v.len(), 2);
    assert_eq!(v[1]["seq"], 2);
    assert_eq!(v[1]["target"]["store_path"], "kv/3");
    verify_chain(sink.contents().as_bytes(), &Default::default()).unwrap();
}

/// A sink whose writes wait until the test opens a gate.
#[derive(Clone, Default)]
struct GatedSink {
    gate: Arc<(Mutex<bool>, Condvar)>,
    inner: MemorySink,
}

impl GatedSink {
    fn open(&self) {
        *self.gate.0.lock().unwrap() = true;
        self.gate.1.notify_all();
    }
}

impl AuditSink for GatedSink {
    fn write_line(&mut self, line: &[u8]) -> std::io::Result<()> {
        let (lock, cvar) = &*self.gate;
        let mut open = lock.lock().unwrap();
        while !*open {
            open = cvar.wait(open).unwrap();
        }
        drop(open);
        self.inner.write_line(line)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    fn describe(&self) -> String {
        "gated".into()
    }
}

#[test]
fn record_never_waits_for_a_stuck_sink_and_counts_what_it_drops() {
    let sink = GatedSink::default();
    let options = AuditOptions {
        queue_capacity: 4,
        ..AuditOptions::default()
    };
    let log = AuditLog::with_sink_options(sink.clone(), options).unwrap();
    // With the sink stuck, these calls would hang forever if record() waited for it.
    for i in 0..50 {
        log.record(AuditEntry::store_write(actor(), "kv").detail("i", i));
    }
    let dropped = log.stats().dropped;
    assert!(
        dropped >= 50 - 4 - 1,
        "only the queue and the write in flight fit: {dropped}"
    );
    sink.open();
    log.flush_blocking();
    let stats = log.stats();
    assert_eq!(stats.written + stats.dropped, 50);
    assert_eq!(sink.inner.lines().len() as u64, stats.written);
    verify_chain(sink.inner.contents().as_bytes(), &Default::default()).unwrap();
}

#[test]
fn a_disabled_log_records_nothing() {
    let log = AuditLog::disabled();
    assert!(!log.is_enabled());
    log.record(AuditEntry::store_write(actor(), "kv"));
    log.flush_blocking();
    log.close();
    assert_eq!(log.head(), None);
    assert_eq!(log.stats(), Default::default());
}

#[test]
fn entries_after_close_are_dropped_and_counted() {
    let (log, sink) = AuditLog::memory();
    log.record(AuditEntry::store_write(actor(), "kv"));
    log.close();
    log.record(AuditEntry::store_write(actor(), "kv"));
    assert_eq!(sink.lines().len(), 1);
    assert_eq!(log.stats().dropped, 1);
    assert_eq!(
        log.head(),
        Some(ChainHead {
            seq: 1,
            hash: line_hash(sink.lines()[0].as_bytes())
        })
    );
}

#[tokio::test]
async fn the_stripe_observer_records_each_call_for_the_reconciling_resource() {
    let (log, sink) = AuditLog::memory();
    let observer = StripeAuditObserver::new(
        log.clone(),
        Actor::resource("StripeKeyPolicy", Some("shop"), "checkout"),
    );
    observer.on_stripe_call(&StripeCall {
        method: "POST".into(),
        path: "/v2/iam/api_keys/apikey_123/rotate".into(),
        account: "acct_1".into(),
        status: Some(200),
        request_id: Some("req_abc".into()),
        idempotency_key: Some("uid-7-rotate-3".into()),
        attempt: 1,
        duration: Duration::from_millis(42),
        ..StripeCall::default()
    });
    observer.on_stripe_call(&StripeCall {
        method: "POST".into(),
        path: "/v2/iam/api_keys".into(),
        account: "acct_1".into(),
        status: Some(429),
        request_id: Some("req_def".into()),
        idempotency_key: Some("uid-7-create".into()),
        attempt: 2,
        error_type: Some("invalid_request_error".into()),
        error_code: Some("rate_limit".into()),
        will_retry: true,
        ..StripeCall::default()
    });
    observer.on_stripe_call(&StripeCall {
        method: "GET".into(),
        path: "/v1/webhook_endpoints/we_9".into(),
        account: "acct_1".into(),
        connection_error: Some("timeout".into()),
        attempt: 3,
        ..StripeCall::default()
    });
    log.flush().await;
    let v = parse(&sink.lines());
    assert_eq!(v.len(), 3);
    for rec in &v {
        assert_eq!(rec["action"], "stripe.request");
        assert_eq!(rec["actor"]["name"], "checkout");
        assert_eq!(rec["actor"]["namespace"], "shop");
        assert_eq!(rec["details"]["account"], "acct_1");
    }
    assert_eq!(v[0]["outcome"], "success");
    assert_eq!(v[0]["target"]["key_id"], "apikey_123");
    assert_eq!(v[0]["details"]["method"], "POST");
    assert_eq!(
        v[0]["details"]["path"],
        "/v2/iam/api_keys/apikey_123/rotate"
    );
    assert_eq!(v[0]["details"]["status"], 200);
    assert_eq!(v[0]["details"]["request_id"], "req_abc");
    assert_eq!(v[0]["details"]["idempotency_key"], "uid-7-rotate-3");
    assert_eq!(v[0]["details"]["duration_ms"], 42);
    assert_eq!(v[1]["outcome"], "failure");
    assert_eq!(v[1]["reason"], "HTTP 429 rate_limit (will retry)");
    assert!(v[1].get("target").is_none());
    assert_eq!(v[2]["outcome"], "failure");
    assert_eq!(v[2]["reason"], "connection timeout");
    assert_eq!(v[2]["target"]["key_id"], "we_9");
}

#[test]
fn audit_targets_parse_from_flags() {
    assert_eq!("off".parse::<AuditTarget>(), Ok(AuditTarget::Off));
    assert_eq!("stdout".parse::<AuditTarget>(), Ok(AuditTarget::Stdout));
    assert_eq!(
        "file:/var/log/a.jsonl".parse::<AuditTarget>(),
        Ok(AuditTarget::File("/var/log/a.jsonl".into()))
    );
    assert_eq!(
        "/var/log/a.jsonl".parse::<AuditTarget>(),
        Ok(AuditTarget::File("/var/log/a.jsonl".into()))
    );
    assert!("".parse::<AuditTarget>().is_err());
}

#[test]
fn a_restart_continues_after_a_last_line_longer_than_the_read_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let log = AuditLog::file(&path).unwrap();
    log.record(AuditEntry::store_write(actor(), "kv/a"));
    log.record(AuditEntry::store_write(actor(), "kv/b").detail("note", "n".repeat(300 * 1024)));
    log.close();
    let head = log.head().unwrap();
    drop(log);
    let log = AuditLog::file(&path).unwrap();
    assert_eq!(log.head(), Some(head));
    log.record(AuditEntry::store_write(actor(), "kv/c"));
    log.close();
    let summary = verify_chain(&std::fs::read(&path).unwrap(), &Default::default()).unwrap();
    assert_eq!(summary.head.seq, 3);
}

#[tokio::test]
async fn the_stripe_request_constructor_marks_non_2xx_as_failure() {
    let (log, sink) = AuditLog::memory();
    log.record(AuditEntry::stripe_request(
        actor(),
        "POST",
        "/v2/iam/api_keys/apikey_9/expire",
        Some(200),
        Some("req_1"),
        Some("idem-1"),
    ));
    log.record(AuditEntry::stripe_request(
        actor(),
        "GET",
        "/v2/iam/api_keys",
        Some(401),
        None,
        None,
    ));
    log.record(AuditEntry::stripe_request(
        actor(),
        "GET",
        "/v2/iam/api_keys",
        None,
        None,
        None,
    ));
    log.flush().await;
    let v = parse(&sink.lines());
    assert_eq!(v[0]["outcome"], "success");
    assert_eq!(v[0]["target"]["key_id"], "apikey_9");
    assert_eq!(v[0]["details"]["request_id"], "req_1");
    assert_eq!(v[0]["details"]["idempotency_key"], "idem-1");
    assert_eq!(v[1]["reason"], "HTTP 401");
    assert_eq!(v[2]["reason"], "no answer");
}
