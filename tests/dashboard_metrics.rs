//! Every metric the Grafana dashboard (`charts/stripe-key-operator/dashboards/`) and the alert
//! rules (`charts/stripe-key-operator/templates/prometheusrule.yaml`) query is one that the
//! operator or verify-proxy exports: a renamed or removed metric fails here instead of leaving
//! a blank panel or an alert that can never fire.

#[path = "common/operator.rs"]
mod operator;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use stripe_key_operator::metrics::Metrics;
use stripe_key_operator::webhook::proxy::ProxyMetrics;

const PREFIX: &str = "stripe_key_operator_";

/// The series names a Prometheus scrape of `encoded` (OpenMetrics, as prometheus-client writes
/// it) can contain: each family's name as its type suffixes it, from the `# TYPE` lines (so an
/// empty family counts too), plus every sample line's name.
fn exported_series(encoded: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in encoded.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest
                .split_once(' ')
                .expect("a TYPE line has a name and a type");
            let suffixes: &[&str] = match kind {
                "counter" => &["_total", "_created"],
                "histogram" | "gaugehistogram" => &["_bucket", "_sum", "_count", "_created"],
                "summary" => &["", "_sum", "_count", "_created"],
                "info" => &["_info"],
                _ => &[""],
            };
            out.extend(suffixes.iter().map(|s| format!("{name}{s}")));
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            out.insert(line[..end].to_string());
        }
    }
    out
}

/// Every `stripe_key_operator_*` name in a PromQL expression (or a template of them).
fn referenced(text: &str) -> BTreeSet<String> {
    let re = regex::Regex::new(r"\bstripe_key_operator_[a-zA-Z0-9_:]+").unwrap();
    re.find_iter(text).map(|m| m.as_str().to_string()).collect()
}

/// The names in `queries` that none of `exported` (nor the parallel-branch list) has.
fn unknown(queries: &BTreeSet<String>, exported: &BTreeSet<String>) -> Vec<String> {
    queries
        .iter()
        .filter(|n| !exported.contains(*n))
        .cloned()
        .collect()
}

/// The operator's metrics with one sample in every labelled family: prometheus-client encodes
/// nothing at all (not even `# TYPE`) for a family without a label set. A family added to
/// `Metrics` must get its sample here before a query may use it (the failure says so).
fn operator_metrics() -> Metrics {
    use stripe_key_operator::metrics::*;
    let m = Metrics::new();
    let controller = ControllerLabels {
        controller: "stripekeypolicy".into(),
    };
    let error = ErrorLabels {
        controller: "stripekeypolicy".into(),
        reason: "StripeUnavailable".into(),
    };
    let object = ObjectLabels {
        kind: "StripeKeyPolicy".into(),
        namespace: "shop".into(),
        name: "api".into(),
    };
    let store = StoreCallLabels {
        operation: "read".into(),
        outcome: "success".into(),
    };
    m.reconciliations.get_or_create(&controller).inc();
    m.reconcile_errors.get_or_create(&error).inc();
    m.reconcile_duration.get_or_create(&controller).observe(0.1);
    m.keys_minted.get_or_create(&controller).inc();
    m.rotations
        .get_or_create(&RotationLabels {
            kind: "StripeKeyPolicy".into(),
            trigger: "Schedule".into(),
        })
        .inc();
    m.rotation_failures.get_or_create(&error).inc();
    m.key_age_seconds.get_or_create(&object).set(60.0);
    m.next_rotation_seconds.get_or_create(&object).set(60.0);
    m.key_created_timestamp_seconds
        .get_or_create(&object)
        .set(1.7e9);
    m.next_rotation_timestamp_seconds
        .get_or_create(&object)
        .set(1.7e9);
    m.rollout_stuck.get_or_create(&object).set(0);
    let namespaced = NamespacedLabels {
        namespace: "shop".into(),
        name: "api".into(),
    };
    m.old_key_in_use.get_or_create(&namespaced).set(1);
    m.current_key_unused.get_or_create(&namespaced).set(1);
    m.key_viewed.get_or_create(&namespaced).inc();
    m.key_tampered.get_or_create(&namespaced).inc();
    m.unmanaged_keys
        .get_or_create(&stripe_key_operator::metrics::AccountLabels {
            account: "payments".into(),
        })
        .set(2);
    m.activity_log_reads
        .get_or_create(&stripe_key_operator::metrics::ActivityReadLabels {
            account: "payments".into(),
            outcome: "success".into(),
        })
        .inc();
    m.activity_log_entries
        .get_or_create(&stripe_key_operator::metrics::ActivityEntryLabels {
            account: "payments".into(),
            action: "api_key_viewed".into(),
        })
        .inc();
    let account = stripe_key_operator::metrics::AccountLabels {
        account: "acct_1".into(),
    };
    m.stripe_circuit_transitions
        .get_or_create(&stripe_key_operator::metrics::CircuitLabels {
            account: "acct_1".into(),
            to: "Open".into(),
        })
        .inc();
    m.stripe_circuit_state.get_or_create(&account).set(2);
    m.scheduler_in_flight.get_or_create(&account).set(4);
    m.scheduler_waiting.get_or_create(&account).set(7);
    m.scheduler_dispatched.get_or_create(&account).inc();
    m.canary_trips.get_or_create(&namespaced).inc();
    m.canary_tripped.get_or_create(&namespaced).set(1);
    m.stripe_requests
        .get_or_create(&StripeCallLabels {
            account: "acct_1".into(),
            method: "GET".into(),
            route: "/v1/account".into(),
            code: "200".into(),
        })
        .inc();
    m.store_requests.get_or_create(&store).inc();
    m.store_request_duration.get_or_create(&store).observe(0.01);
    m
}

/// verify-proxy's metrics, one sample in every labelled family.
fn proxy_metrics() -> ProxyMetrics {
    use stripe_key_operator::webhook::proxy::metrics::*;
    let m = ProxyMetrics::new();
    m.verified
        .get_or_create(&SecretLabels {
            secret_index: "0".into(),
        })
        .inc();
    m.rejected
        .get_or_create(&ReasonLabels {
            reason: "no_matching_signature".into(),
        })
        .inc();
    m.forward_duration
        .get_or_create(&ForwardLabels {
            outcome: "2xx".into(),
        })
        .observe(0.01);
    m.secret_reloads
        .get_or_create(&ReloadLabels {
            outcome: "applied".into(),
        })
        .inc();
    m.confirmations
        .get_or_create(&OutcomeLabels {
            outcome: "confirmed".into(),
        })
        .inc();
    m
}

/// Every series name the operator and verify-proxy export.
fn everything_exported() -> BTreeSet<String> {
    let mut names = exported_series(&operator_metrics().encode());
    names.extend(exported_series(&proxy_metrics().encode()));
    names
}

/// Every `# TYPE` family of an encoding.
fn families(encoded: &str) -> BTreeSet<String> {
    encoded
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|r| r.split_once(' ').map(|(n, _)| n.to_string()))
        .collect()
}

fn chart() -> &'static Path {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/charts/stripe-key-operator"
    ))
}

/// Every `expr` of every panel target in the dashboard.
fn dashboard_exprs() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(chart().join("dashboards/stripe-key-operator.json"))
        .expect("the dashboard JSON");
    let dash: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut out = Vec::new();
    let mut stack: Vec<&serde_json::Value> = dash["panels"].as_array().unwrap().iter().collect();
    while let Some(panel) = stack.pop() {
        if let Some(nested) = panel["panels"].as_array() {
            stack.extend(nested);
        }
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("every target has an expr");
            out.push((
                panel["title"].as_str().unwrap_or("?").to_string(),
                expr.into(),
            ));
        }
    }
    for var in dash["templating"]["list"].as_array().into_iter().flatten() {
        if let Some(q) = var["definition"].as_str() {
            out.push((format!("variable {}", var["name"]), q.to_string()));
        }
    }
    out
}

/// Every `expr:` block of the PrometheusRule template (Helm template text around PromQL).
fn rule_exprs() -> Vec<String> {
    let text = std::fs::read_to_string(chart().join("templates/prometheusrule.yaml"))
        .expect("the PrometheusRule template");
    let mut out = Vec::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        if line.trim() == "expr: |" {
            let indent = line.len() - line.trim_start().len();
            let mut expr = String::new();
            while let Some(next) = lines.peek() {
                if next.len() - next.trim_start().len() <= indent {
                    break;
                }
                expr.push_str(next.trim());
                expr.push('\n');
                lines.next();
            }
            out.push(expr);
        } else if let Some(inline) = line.trim().strip_prefix("expr: ") {
            out.push(inline.to_string());
        }
    }
    out
}

#[test]
fn every_family_gets_a_sample_and_suffixes_follow_the_type() {
    // prometheus-client writes nothing for a family without a label set, so the populated
    // registries above must not miss one: compare with the families `Metrics` registers, read
    // from its source.
    let fresh = Metrics::new().encode();
    assert!(!fresh.contains("stripe_key_operator_rotations"), "{fresh}");
    let src =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/metrics.rs")).unwrap();
    let registered = regex::Regex::new(r#"registry\.register\(\s*"([a-z0-9_]+)""#).unwrap();
    let mut declared: BTreeSet<String> = registered
        .captures_iter(&src)
        .map(|c| format!("{PREFIX}{}", &c[1]))
        .collect();
    // The per-object gauges are the columns of one table, exposed by a collector.
    let columns = src
        .split_once("const COLUMN_DESCRIPTORS")
        .and_then(|(_, rest)| rest.split_once("];"))
        .expect("COLUMN_DESCRIPTORS in src/metrics.rs")
        .0;
    let column = regex::Regex::new(r#"\(\s*"([a-z0-9_]+)","#).unwrap();
    let before = declared.len();
    declared.extend(
        column
            .captures_iter(columns)
            .map(|c| format!("{PREFIX}{}", &c[1])),
    );
    assert_eq!(declared.len(), before + 5, "{declared:?}");
    assert!(declared.len() >= 15, "{declared:?}");
    assert_eq!(
        families(&operator_metrics().encode()),
        declared,
        "give every family of src/metrics.rs a sample in operator_metrics()"
    );
    let src = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/src/webhook/proxy/metrics.rs"
    ))
    .unwrap();
    let declared: BTreeSet<String> = registered
        .captures_iter(&src)
        .map(|c| format!("{PREFIX}webhook_proxy_{}", &c[1]))
        .collect();
    assert_eq!(
        families(&proxy_metrics().encode()),
        declared,
        "give every family of src/webhook/proxy/metrics.rs a sample in proxy_metrics()"
    );

    let names = everything_exported();
    for name in [
        "stripe_key_operator_rotations_total",
        "stripe_key_operator_store_request_duration_seconds_bucket",
        "stripe_key_operator_store_request_duration_seconds_count",
        "stripe_key_operator_key_created_timestamp_seconds",
        "stripe_key_operator_leader",
        "stripe_key_operator_webhook_proxy_incidents_total",
    ] {
        assert!(names.contains(name), "{name} missing from {names:?}");
    }
    // No suffix a type does not have: a gauge has no _total, a counter's bare name is no series,
    // a histogram's bare name neither.
    for name in [
        "stripe_key_operator_leader_total",
        "stripe_key_operator_rotations",
        "stripe_key_operator_key_age_seconds_bucket",
        "stripe_key_operator_store_request_duration_seconds",
    ] {
        assert!(!names.contains(name), "{name}");
    }
    // Every sample name is one the TYPE lines predicted.
    let encoded = operator_metrics().encode();
    let mut typed = String::new();
    for line in encoded.lines().filter(|l| l.starts_with("# TYPE ")) {
        typed.push_str(line);
        typed.push('\n');
    }
    let predicted = exported_series(&typed);
    for line in encoded.lines().filter(|l| !l.starts_with('#')) {
        let name = &line[..line.find(['{', ' ']).unwrap_or(line.len())];
        assert!(
            predicted.contains(name),
            "{name} was not predicted from the TYPE lines"
        );
    }
}

#[test]
fn the_check_names_a_metric_nobody_exports() {
    let exported = everything_exported();
    let queries = referenced(
        "sum(rate(stripe_key_operator_rotations_total[5m])) / stripe_key_operator_rotation_total",
    );
    assert_eq!(
        unknown(&queries, &exported),
        vec!["stripe_key_operator_rotation_total".to_string()]
    );
    // A histogram's bare name is no series; a counter without `_total` is none either.
    let queries = referenced(
        "stripe_key_operator_store_request_duration_seconds + stripe_key_operator_rotations",
    );
    assert_eq!(unknown(&queries, &exported).len(), 2);
}

#[test]
fn every_metric_the_dashboard_queries_is_exported() {
    let exported = everything_exported();
    let exprs = dashboard_exprs();
    assert!(
        exprs.len() >= 15,
        "the dashboard has few queries: {exprs:?}"
    );
    let mut problems = Vec::new();
    for (title, expr) in &exprs {
        let names = referenced(expr);
        if names.is_empty() {
            problems.push(format!(
                "{title}: `{expr}` queries no stripe_key_operator_ metric"
            ));
        }
        for name in unknown(&names, &exported) {
            problems.push(format!("{title}: `{name}` is not exported"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn every_metric_the_alert_rules_query_is_exported() {
    let exported = everything_exported();
    let exprs = rule_exprs();
    assert_eq!(exprs.len(), 10, "one expr per alert: {exprs:?}");
    let mut problems = Vec::new();
    for expr in &exprs {
        let names = referenced(expr);
        if names.is_empty() {
            problems.push(format!("`{expr}` queries no stripe_key_operator_ metric"));
        }
        for name in unknown(&names, &exported) {
            problems.push(format!("`{name}` in `{}` is not exported", expr.trim()));
        }
    }
    // Anything else in the template that looks like one of our metrics must exist too.
    let template = std::fs::read_to_string(chart().join("templates/prometheusrule.yaml")).unwrap();
    for name in unknown(&referenced(&template), &exported) {
        problems.push(format!("`{name}` (template text) is not exported"));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn every_exported_name_has_the_prefix() {
    for name in everything_exported() {
        assert!(name.starts_with(PREFIX), "{name}");
    }
}

/// promtool from `.ci/cache/bin` (what `.ci/install-tools.sh` installs), else from PATH.
fn promtool() -> std::path::PathBuf {
    let local = Path::new(env!("CARGO_MANIFEST_DIR")).join(".ci/cache/bin/promtool");
    if local.exists() {
        local
    } else {
        "promtool".into()
    }
}

#[test]
fn promtool_lints_every_family_clean() {
    // Every family, the new ones included, in the text format promtool reads: its linter checks
    // names, suffixes and units (a counter without _total, a histogram named _total...).
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut text = operator_metrics().encode_prometheus_text();
    text.push_str(
        &stripe_key_operator::metrics::openmetrics_to_prometheus_text(&proxy_metrics().encode()),
    );
    let mut child = Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect(
            "promtool is installed: run `make test` (it installs it with .ci/install-tools.sh)",
        );
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}\n---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The value of the sample `series` (name and labels exactly as encoded), if present.
fn sample(encoded: &str, series: &str) -> Option<f64> {
    encoded.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .map(|v| v.parse().unwrap())
    })
}

#[tokio::test]
async fn status_writes_of_a_real_rotation_drive_the_gauges_the_alerts_read() {
    use operator::*;
    use serde_json::json;
    use stripe_key_operator::sandbox::env::EnvOptions;
    let env = env_with(EnvOptions {
        rollout_ceiling: Duration::from_secs(600),
        ..EnvOptions::default()
    })
    .await;
    env.apply_json(&policy("checkout", &["charge_read"]))
        .await
        .unwrap();
    let p = wait_policy(&env, "checkout", "Ready", ready).await;
    let status = p.status.unwrap();
    let sel = r#"{kind="StripeKeyPolicy",namespace="shop",name="checkout"}"#;
    let text = env.metrics.encode();
    let created = sample(
        &text,
        &format!("stripe_key_operator_key_created_timestamp_seconds{sel}"),
    )
    .unwrap_or_else(|| panic!("no key_created_timestamp_seconds in:\n{text}"));
    let due = sample(
        &text,
        &format!("stripe_key_operator_next_rotation_timestamp_seconds{sel}"),
    )
    .unwrap_or_else(|| panic!("no next_rotation_timestamp_seconds in:\n{text}"));
    let last = status.last_rotation_at.clone().unwrap().0.as_second() as f64;
    let next = status.next_rotation_at.clone().unwrap().0.as_second() as f64;
    assert!((created - last).abs() < 1.0, "{created} vs {last}");
    assert!((due - next).abs() < 1.0, "{due} vs {next}");
    assert!(
        due - created >= 720.0 * 3600.0,
        "the 720h schedule: {due} - {created}"
    );
    assert_eq!(
        sample(&text, &format!("stripe_key_operator_rollout_stuck{sel}")),
        Some(0.0)
    );
    // Stripe calls are counted per account; store calls are timed.
    let account =
        regex::Regex::new(r#"stripe_key_operator_stripe_requests_total\{account="([^"]+)""#)
            .unwrap();
    let accounts: BTreeSet<&str> = account
        .captures_iter(&text)
        .map(|c| c.get(1).unwrap().as_str())
        .collect();
    assert!(
        !accounts.is_empty() && accounts.iter().all(|a| a.starts_with("acct_")),
        "{accounts:?} in:\n{text}"
    );
    assert!(
        text.contains("stripe_key_operator_store_request_duration_seconds_count{operation="),
        "{text}"
    );

    // A rollout that does not finish within the ceiling: Degraded=True, reason=RolloutStuck.
    // A minute later (so that the second key's creation time differs from the first's).
    env.clock.advance(Duration::from_secs(60));
    env.api.set_workload_stuck(NS, "checkout", true);
    annotate(&env, "checkout", json!({"stripekeys.io/rotate": "r1"})).await;
    wait_policy(&env, "checkout", "RollingOut", |p| {
        p.status
            .as_ref()
            .and_then(|s| s.rotation.as_ref())
            .is_some_and(|r| r.phase == stripe_key_operator::api::RotationPhase::RollingOut)
    })
    .await;
    env.clock.advance(Duration::from_secs(700));
    nudge(&env, "checkout").await;
    wait_policy(&env, "checkout", "RolloutStuck", |p| {
        condition(p, "Degraded").is_some_and(|c| c.0 == "True" && c.1 == "RolloutStuck")
    })
    .await;
    let text = env.metrics.encode();
    assert_eq!(
        sample(&text, &format!("stripe_key_operator_rollout_stuck{sel}")),
        Some(1.0),
        "{text}"
    );

    // The workload rolls and the overlap (1h) ends: the rotation settles, stuck drops to 0 and
    // the key times move on.
    env.api.set_workload_stuck(NS, "checkout", false);
    env.clock.advance(Duration::from_secs(3700));
    nudge(&env, "checkout").await;
    let p = wait_policy(&env, "checkout", "rotation 2 settled", |p| {
        ready(p)
            && p.status
                .as_ref()
                .is_some_and(|s| s.rotation_number == Some(2))
            && condition(p, "Degraded").is_some_and(|c| c.0 == "False")
    })
    .await;
    let text = env.metrics.encode();
    assert_eq!(
        sample(&text, &format!("stripe_key_operator_rollout_stuck{sel}")),
        Some(0.0),
        "{text}"
    );
    let created2 = sample(
        &text,
        &format!("stripe_key_operator_key_created_timestamp_seconds{sel}"),
    )
    .unwrap();
    let last2 = p
        .status
        .unwrap()
        .last_rotation_at
        .clone()
        .unwrap()
        .0
        .as_second() as f64;
    assert!(
        created2 > created && (created2 - last2).abs() < 1.0,
        "{created2} vs {last2}"
    );
}
