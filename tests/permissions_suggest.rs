//! `stripe-key-operator permissions suggest`: merges egress usage reports, prints the least
//! permission set that served them (a write covers its read), the diff against a policy, refused
//! requests flagged separately, as text and JSON; bad input is a clear error.

#[path = "common/kube_api.rs"]
mod kube_api;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use serde_json::{Value, json};
use stripe_key_operator::egress::suggest::{merge, parse_report, suggest};

const BIN: &str = env!("CARGO_BIN_EXE_stripe-key-operator");

fn report_a() -> Value {
    json!({
        "routesVersion": "2026-10-14.1",
        "since": "2026-11-20T08:00:00Z",
        "permissions": {
            "charge_read": {"count": 120, "lastSeen": "2026-11-29T10:00:00Z"},
            "refund_write": {"count": 4, "lastSeen": "2026-11-28T09:00:00Z"},
            "customer_read": {"count": 30, "lastSeen": "2026-11-29T09:00:00Z"}
        },
        "refused": {
            "payout_write": {"count": 2, "lastSeen": "2026-11-27T12:00:00Z"}
        }
    })
}

fn report_b() -> Value {
    json!({
        "routesVersion": "2026-10-14.1",
        "since": "2026-11-18T00:00:00Z",
        "permissions": {
            "charge_read": {"count": 80, "lastSeen": "2026-11-29T11:30:00Z"},
            "customer_write": {"count": 5, "lastSeen": "2026-11-26T00:00:00Z"},
            "invoice_read": {"count": 0, "lastSeen": "2026-11-18T00:00:00Z"}
        },
        "refused": {
            "payout_write": {"count": 1, "lastSeen": "2026-11-29T12:00:00Z"},
            "charge_read": {"count": 3, "lastSeen": "2026-11-18T01:00:00Z"}
        }
    })
}

const POLICY: &str = "\
apiVersion: stripekeys.io/v1alpha1
kind: StripeKeyPolicy
metadata:
  name: checkout
  namespace: shop
spec:
  accountRef: {name: payments-test}
  permissions: [charge_write, customer_write, refund_write, subscription_write]
  delivery: {secret: {name: checkout-stripe}}
";

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

fn run(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(BIN)
        .args(["permissions", "suggest"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

fn reports(dir: &Path) -> (String, String) {
    (
        write(dir, "a.json", &report_a().to_string()),
        write(dir, "b.json", &report_b().to_string()),
    )
}

#[test]
fn reports_merge_adding_counts_and_keeping_the_latest_and_earliest_times() {
    let a = parse_report("a", &report_a().to_string()).unwrap();
    let b = parse_report("b", &report_b().to_string()).unwrap();
    let m = merge(&[a, b]);
    assert_eq!(m.reports, 2);
    assert_eq!(m.routes_versions, vec!["2026-10-14.1"]);
    assert_eq!(m.since.unwrap().to_rfc3339(), "2026-11-18T00:00:00+00:00");
    let charge = &m.permissions["charge_read"];
    assert_eq!(charge.count, 200);
    assert_eq!(charge.last_seen.to_rfc3339(), "2026-11-29T11:30:00+00:00");
    assert_eq!(m.refused["payout_write"].count, 3);
    assert_eq!(
        m.refused["payout_write"].last_seen.to_rfc3339(),
        "2026-11-29T12:00:00+00:00"
    );
}

#[test]
fn the_least_set_counts_a_write_once_and_drops_unused_names() {
    let a = parse_report("a", &report_a().to_string()).unwrap();
    let b = parse_report("b", &report_b().to_string()).unwrap();
    let s = suggest(&[a, b], None);
    // customer_read is served by customer_write; invoice_read had zero requests; the refused
    // payout_write is not in the set.
    assert_eq!(
        s.suggested,
        vec!["charge_read", "customer_write", "refund_write"]
    );
    assert!(s.diff.is_none());
}

#[test]
fn text_output_shows_the_set_and_the_diff_against_a_policy_file() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = reports(dir.path());
    let policy = write(dir.path(), "policy.yaml", POLICY);
    let out = run(&[&a, &b, "--policy", &policy], None);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("2 usage reports since 2026-11-18T00:00:00Z"),
        "{text}"
    );
    assert!(text.contains("least permission set (3):"), "{text}");
    assert!(text.contains("also serves 30 customer_read"), "{text}");
    assert!(text.contains("against policy shop/checkout:"), "{text}");
    assert!(
        text.contains("keep:    customer_write refund_write"),
        "{text}"
    );
    assert!(
        text.contains("remove:  charge_write subscription_write"),
        "{text}"
    );
    assert!(text.contains("add:     charge_read"), "{text}");
    assert!(
        text.contains("(charge_read replaces charge_write: only reads were served)"),
        "{text}"
    );
    assert!(text.contains("refused: payout_write"), "{text}");
    // charge_read was refused once (an older key) but the policy grants it through charge_write
    let refused_line = text.lines().find(|l| l.contains("refused: ")).unwrap();
    assert!(!refused_line.contains("charge_read"), "{refused_line}");
}

#[test]
fn json_output_reads_a_report_from_standard_input() {
    let dir = tempfile::tempdir().unwrap();
    let (a, _) = reports(dir.path());
    let policy = write(dir.path(), "policy.yaml", POLICY);
    let out = run(
        &["-o", "json", &a, "-", "--policy", &policy],
        Some(&report_b().to_string()),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["suggested"],
        json!(["charge_read", "customer_write", "refund_write"])
    );
    assert_eq!(v["usage"]["reports"], 2);
    assert_eq!(v["usage"]["permissions"]["charge_read"]["count"], 200);
    assert_eq!(v["diff"]["policy"], "shop/checkout");
    assert_eq!(
        v["diff"]["remove"],
        json!(["charge_write", "subscription_write"])
    );
    assert_eq!(v["diff"]["add"], json!(["charge_read"]));
    assert_eq!(v["diff"]["keep"], json!(["customer_write", "refund_write"]));
    assert_eq!(v["diff"]["refused"], json!(["payout_write"]));
}

#[test]
fn a_policy_that_is_already_least_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let (a, _) = reports(dir.path());
    let policy = write(
        dir.path(),
        "policy.yaml",
        &POLICY.replace(
            "[charge_write, customer_write, refund_write, subscription_write]",
            "[charge_read, customer_read, refund_write]",
        ),
    );
    let out = run(&[&a, "--policy", &policy], None);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success());
    assert!(
        text.contains("the policy is already the least set"),
        "{text}"
    );
    // the refused payout_write is flagged, not added
    assert!(text.contains("refused: payout_write"), "{text}");
    assert!(text.contains("add:     -"), "{text}");
}

#[test]
fn bad_input_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(String, &str)> = vec![
        (
            write(dir.path(), "junk.json", "{not json"),
            "junk.json is not a usage report",
        ),
        (
            write(
                dir.path(),
                "shape.json",
                &json!({"routesVersion": "x", "permissions": {}}).to_string(),
            ),
            "missing field `since`",
        ),
        (
            write(
                dir.path(),
                "name.json",
                &json!({"routesVersion": "x", "since": "2026-11-01T00:00:00Z",
                        "permissions": {"Refunds!": {"count": 1, "lastSeen": "2026-11-01T00:00:00Z"}}})
                .to_string(),
            ),
            "\"Refunds!\" in permissions is not a permission name",
        ),
        (
            write(
                dir.path(),
                "count.json",
                &json!({"routesVersion": "x", "since": "2026-11-01T00:00:00Z",
                        "permissions": {"charge_read": {"count": -1, "lastSeen": "2026-11-01T00:00:00Z"}}})
                .to_string(),
            ),
            "count.json is not a usage report",
        ),
        (
            dir.path().join("missing.json").display().to_string(),
            "cannot read usage report",
        ),
    ];
    for (path, expected) in cases {
        let out = run(&[&path], None);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{path}");
        assert!(err.contains(expected), "{path}: {err}");
        assert!(out.stdout.is_empty(), "{path}");
    }
    // a policy without a StripeKeyPolicy
    let (a, _) = reports(dir.path());
    let cm = write(
        dir.path(),
        "cm.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n",
    );
    let out = run(&[&a, "--policy", &cm], None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no StripeKeyPolicy"));
    // no report at all
    let out = run(&[], None);
    assert!(!out.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_cluster_compares_with_the_policy_in_the_api() {
    use kube::api::Api;
    use stripe_key_operator::api::StripeKeyPolicy;

    let (server, client) = kube_api::api_with_crds().await;
    kube_api::create_namespace(&client, "shop").await;
    let policy: StripeKeyPolicy = serde_yaml::from_str(POLICY).unwrap();
    let policies: Api<StripeKeyPolicy> = Api::namespaced(client.clone(), "shop");
    kube_api::create(&policies, &policy).await;
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = reports(dir.path());
    let kubeconfig = write(dir.path(), "kubeconfig", &server.kubeconfig_yaml());
    let cli = move |target: &'static str| {
        let (a, b, kubeconfig) = (a.clone(), b.clone(), kubeconfig.clone());
        tokio::task::spawn_blocking(move || {
            Command::new(BIN)
                .args([
                    "permissions",
                    "suggest",
                    &a,
                    &b,
                    "-o",
                    "json",
                    "--from-cluster",
                    target,
                ])
                .env("KUBECONFIG", &kubeconfig)
                .output()
                .unwrap()
        })
    };
    let out = cli("shop/checkout").await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["diff"]["policy"], "shop/checkout");
    assert_eq!(
        v["diff"]["remove"],
        json!(["charge_write", "subscription_write"])
    );
    assert_eq!(v["diff"]["refused"], json!(["payout_write"]));
    let out = cli("shop/nope").await.unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("stripekeypolicy \"nope\" not found in namespace \"shop\""),
        "{err}"
    );
    server.shutdown().await;
}
