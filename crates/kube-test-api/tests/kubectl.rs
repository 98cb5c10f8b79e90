//! What kubectl asks for, with the headers kubectl 1.32 sends: `Table` answers (printer columns
//! of CRDs and built-in kinds), OpenAPI v3 documents (`kubectl explain`, and `kubectl apply`'s
//! check that the server validates fields), Events through both `v1` and `events.k8s.io/v1`,
//! and the apiserver's texts for schema errors.

mod common;

use std::time::Duration;

use common::{eventually, setup};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, PostParams};
use kube_test_api::TestApiServer;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What `kubectl get` sends as `Accept`.
const TABLE_ACCEPT: &str = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json";

/// One HTTP/1.1 request with `Connection: close`; returns (status, body).
async fn http(
    server: &TestApiServer,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&Value>,
) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nUser-Agent: kubectl/v1.32.4 (linux/amd64) kubernetes/59526cd\r\nContent-Length: {}\r\n",
        server.addr(),
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(&body);
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw))
        .await
        .expect("the server answers")
        .unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    (status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

async fn get_json(server: &TestApiServer, path: &str, accept: &str) -> Value {
    let (code, body) = http(server, "GET", path, &[("Accept", accept)], None).await;
    assert_eq!(code, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
}

fn crds() -> Vec<Value> {
    let yaml = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../crds/stripekeys.io.yaml"
    ))
    .unwrap();
    serde_yaml::Deserializer::from_str(&yaml)
        .map(|d| serde_json::to_value(serde_yaml::Value::deserialize(d).unwrap()).unwrap())
        .collect()
}

async fn install_crds(client: &kube::Client) {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in crds() {
        api.create(
            &PostParams::default(),
            &serde_json::from_value(crd).unwrap(),
        )
        .await
        .unwrap();
    }
}

fn column_names(table: &Value) -> Vec<String> {
    table["columnDefinitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect()
}

fn policy(server: &TestApiServer, name: &str, status: Value) {
    server
        .put(json!({
            "apiVersion": "stripekeys.io/v1alpha1", "kind": "StripeKeyPolicy",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"accountRef": {"name": "main"}, "permissions": ["charge_read"],
                     "delivery": {"secret": {"name": format!("{name}-key")}}},
            "status": status,
        }))
        .unwrap();
}

#[tokio::test]
async fn kubectl_get_shows_the_crds_printer_columns_with_future_times_readable() {
    let (server, client) = setup().await;
    install_crds(&client).await;
    let next = (chrono::Utc::now() + chrono::TimeDelta::days(30))
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let last = (chrono::Utc::now() - chrono::TimeDelta::hours(3))
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    policy(
        &server,
        "checkout",
        json!({"conditions": [
                {"type": "Rotating", "status": "False", "reason": "Idle", "message": "", "lastTransitionTime": last},
                {"type": "Ready", "status": "True", "reason": "KeyMinted", "message": "", "lastTransitionTime": last}],
               "currentKey": {"id": "apikey_123", "fingerprint": "abc"},
               "lastRotationAt": last, "nextRotationAt": next}),
    );
    policy(&server, "fresh", json!({}));

    let table = get_json(
        &server,
        "/apis/stripekeys.io/v1alpha1/stripekeypolicies?limit=500",
        TABLE_ACCEPT,
    )
    .await;
    assert_eq!(table["kind"], "Table");
    assert_eq!(table["apiVersion"], "meta.k8s.io/v1");
    assert_eq!(
        column_names(&table),
        [
            "Name",
            "Ready",
            "Key",
            "Last Rotated",
            "Next Rotation",
            "Age"
        ]
    );
    assert_eq!(table["columnDefinitions"][0]["format"], "name");
    let rows = table["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    let cells = &rows[0]["cells"];
    assert_eq!(cells[0], "checkout");
    assert_eq!(cells[1], "True", "the Ready condition's status, by filter");
    assert_eq!(cells[2], "apikey_123");
    assert_eq!(cells[3], "3h", "a past date column is an age");
    assert_eq!(
        cells[4],
        next.as_str(),
        "the next rotation is the time itself"
    );
    assert!(
        cells[5].as_str().unwrap().ends_with('s'),
        "age: {}",
        cells[5]
    );
    // Absent fields are empty cells, and each row carries the object's metadata (kubectl -A
    // reads the namespace there).
    assert_eq!(rows[1]["cells"][1], Value::Null);
    assert_eq!(rows[1]["object"]["kind"], "PartialObjectMetadata");
    assert_eq!(rows[0]["object"]["metadata"]["namespace"], "default");

    // One object, and the Account's columns (priority 1 = only with -o wide).
    let one = get_json(
        &server,
        "/apis/stripekeys.io/v1alpha1/namespaces/default/stripekeypolicies/checkout",
        TABLE_ACCEPT,
    )
    .await;
    assert_eq!(one["rows"].as_array().unwrap().len(), 1);
    let accounts = get_json(
        &server,
        "/apis/stripekeys.io/v1alpha1/stripeaccounts",
        TABLE_ACCEPT,
    )
    .await;
    let wide: Vec<(String, i64)> = accounts["columnDefinitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_string(),
                c["priority"].as_i64().unwrap(),
            )
        })
        .collect();
    assert!(
        wide.contains(&("Encryption Key".to_string(), 1)),
        "{wide:?}"
    );

    // Without the Table media type the answer is the list, as before.
    let list = get_json(
        &server,
        "/apis/stripekeys.io/v1alpha1/stripekeypolicies",
        "application/json",
    )
    .await;
    assert_eq!(list["kind"], "StripeKeyPolicyList");
}

#[tokio::test]
async fn kubectl_get_shows_the_usual_columns_of_built_in_kinds() {
    let (server, _client) = setup().await;
    server.set_rollout_delay(Duration::from_millis(50));
    server
        .put(json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
                     "template": {"metadata": {"labels": {"app": "web"}},
                                  "spec": {"containers": [{"name": "app", "image": "nginx:1"}]}}}}))
        .unwrap();
    server
        .put(json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "s", "namespace": "default"},
            "type": "kubernetes.io/tls", "data": {"tls.crt": "YQ==", "tls.key": "Yg=="}}))
        .unwrap();
    let deploy = eventually(5, "the deployment is available", || async {
        let t = get_json(
            &server,
            "/apis/apps/v1/namespaces/default/deployments",
            TABLE_ACCEPT,
        )
        .await;
        (t["rows"][0]["cells"][1] == "2/2").then_some(t)
    })
    .await;
    assert_eq!(
        column_names(&deploy),
        [
            "Name",
            "Ready",
            "Up-to-date",
            "Available",
            "Age",
            "Containers",
            "Images",
            "Selector"
        ]
    );
    let cells = &deploy["rows"][0]["cells"];
    assert_eq!(cells[2], 2);
    assert_eq!(cells[3], 2);
    assert_eq!(cells[6], "nginx:1");
    assert_eq!(cells[7], "app=web");

    let secrets = get_json(&server, "/api/v1/namespaces/default/secrets", TABLE_ACCEPT).await;
    assert_eq!(column_names(&secrets), ["Name", "Type", "Data", "Age"]);
    assert_eq!(secrets["rows"][0]["cells"][1], "kubernetes.io/tls");
    assert_eq!(secrets["rows"][0]["cells"][2], 2);

    let namespaces = get_json(&server, "/api/v1/namespaces", TABLE_ACCEPT).await;
    assert_eq!(column_names(&namespaces), ["Name", "Status", "Age"]);
    assert_eq!(namespaces["rows"][0]["cells"][1], "Active");
}

#[tokio::test]
async fn events_written_through_events_k8s_io_are_listed_by_kubectl_get_events() {
    let (server, client) = setup().await;
    // What kube's Recorder sends.
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(client.clone(), "default");
    let now = chrono::Utc::now()
        .format("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string();
    let ev: k8s_openapi::api::events::v1::Event = serde_json::from_value(json!({
        "metadata": {"name": "checkout.1", "namespace": "default"},
        "eventTime": now, "action": "Mint", "reason": "KeyMinted", "type": "Normal",
        "note": "key apikey_1 minted", "reportingController": "stripe-key-operator",
        "reportingInstance": "pod-a",
        "regarding": {"apiVersion": "stripekeys.io/v1alpha1", "kind": "StripeKeyPolicy",
                      "name": "checkout", "namespace": "default"}}))
    .unwrap();
    events.create(&PostParams::default(), &ev).await.unwrap();
    // A later occurrence, as the Recorder patches a series.
    events
        .patch(
            "checkout.1",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"series": {"count": 2, "lastObservedTime": now}})),
        )
        .await
        .unwrap();

    // The same object through core v1, as kubectl reads it.
    let core: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), "default");
    let e = core.get("checkout.1").await.unwrap();
    assert_eq!(e.message.as_deref(), Some("key apikey_1 minted"));
    assert_eq!(e.involved_object.name.as_deref(), Some("checkout"));
    assert_eq!(
        e.reporting_component.as_deref(),
        Some("stripe-key-operator")
    );
    let table = get_json(&server, "/api/v1/namespaces/default/events", TABLE_ACCEPT).await;
    assert_eq!(
        column_names(&table),
        [
            "Last Seen",
            "Type",
            "Reason",
            "Object",
            "Subobject",
            "Source",
            "Message",
            "First Seen",
            "Count",
            "Name"
        ]
    );
    let cells = &table["rows"][0]["cells"];
    assert_eq!(cells[2], "KeyMinted");
    assert_eq!(cells[3], "stripekeypolicy/checkout");
    assert_eq!(cells[5], "stripe-key-operator, pod-a");
    assert_eq!(cells[6], "key apikey_1 minted");
    assert_eq!(cells[8], 2, "the series count");

    // And back through events.k8s.io/v1, with field selectors on the view's field names.
    let back = events.get("checkout.1").await.unwrap();
    assert_eq!(back.note.as_deref(), Some("key apikey_1 minted"));
    assert_eq!(back.series.as_ref().map(|s| s.count), Some(2));
    let selected = events
        .list(&kube::api::ListParams::default().fields("regarding.name=checkout"))
        .await
        .unwrap();
    assert_eq!(selected.items.len(), 1);
    let none = events
        .list(&kube::api::ListParams::default().fields("regarding.name=other"))
        .await
        .unwrap();
    assert!(none.items.is_empty());
    // One object, one counter: both views count as `events`.
    assert_eq!(server.list("v1", "Event", Some("default")).len(), 1);
    assert_eq!(
        server.list("events.k8s.io/v1", "Event", Some("default"))[0]["note"],
        "key apikey_1 minted"
    );
}

#[tokio::test]
async fn openapi_v3_serves_every_group_version_for_explain_and_apply() {
    let (server, client) = setup().await;
    install_crds(&client).await;
    let root = get_json(&server, "/openapi/v3", "application/json").await;
    let paths = root["paths"].as_object().unwrap();
    for gv in [
        "api/v1",
        "apis/apps/v1",
        "apis/events.k8s.io/v1",
        "apis/stripekeys.io/v1alpha1",
    ] {
        assert!(paths.contains_key(gv), "{gv} in {:?}", paths.keys());
    }
    let url = paths["apis/stripekeys.io/v1alpha1"]["serverRelativeURL"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        url.starts_with("/openapi/v3/apis/stripekeys.io/v1alpha1?hash="),
        "{url}"
    );
    let doc = get_json(&server, &url, "application/json").await;
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    let skp = &schemas["io.stripekeys.v1alpha1.StripeKeyPolicy"];
    assert_eq!(
        skp["x-kubernetes-group-version-kind"],
        json!([{"group": "stripekeys.io", "version": "v1alpha1", "kind": "StripeKeyPolicy"}])
    );
    assert!(
        skp["properties"]["spec"]["properties"]["rotation"]["properties"]["every"]["description"]
            .as_str()
            .unwrap()
            .contains("At least `1h`")
    );
    let meta_ref = skp["properties"]["metadata"]["allOf"][0]["$ref"]
        .as_str()
        .unwrap();
    let meta_name = meta_ref.strip_prefix("#/components/schemas/").unwrap();
    assert!(
        schemas[meta_name]["properties"]["name"].is_object(),
        "ObjectMeta is in the document"
    );
    // kubectl apply looks for the PATCH operation of the kind and its fieldValidation parameter;
    // without it kubectl falls back to client-side validation.
    let patch = &doc["paths"]["/apis/stripekeys.io/v1alpha1/namespaces/{namespace}/stripekeypolicies/{name}"]
        ["patch"];
    assert_eq!(
        patch["x-kubernetes-group-version-kind"]["kind"],
        "StripeKeyPolicy"
    );
    assert!(
        patch["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "fieldValidation" && p["in"] == "query")
    );
    // Cluster-scoped kinds have no namespace in their path.
    assert!(
        doc["paths"]["/apis/stripekeys.io/v1alpha1/stripeaccounts/{name}"]["patch"].is_object()
    );

    // Built-in kinds carry the upstream schemas.
    let apps = get_json(&server, "/openapi/v3/apis/apps/v1", "application/json").await;
    let deploy = &apps["components"]["schemas"]["io.k8s.api.apps.v1.Deployment"];
    assert_eq!(
        deploy["x-kubernetes-group-version-kind"][0]["kind"],
        "Deployment"
    );
    assert!(apps["components"]["schemas"]["io.k8s.api.apps.v1.DeploymentSpec"]["properties"]["replicas"].is_object());
    let (code, _) = http(
        &server,
        "GET",
        "/openapi/v3/apis/nope.example.com/v1",
        &[],
        None,
    )
    .await;
    assert_eq!(code, 404);
}

#[test]
fn an_empty_list_below_min_items_reports_its_length_like_the_apiserver() {
    let crd = crds()
        .into_iter()
        .find(|c| c["spec"]["names"]["kind"] == "StripeKeyPolicy")
        .unwrap();
    let obj = json!({"apiVersion": "stripekeys.io/v1alpha1", "kind": "StripeKeyPolicy",
        "metadata": {"name": "p"},
        "spec": {"accountRef": {"name": "main"}, "permissions": [],
                 "delivery": {"secret": {"name": "k"}}}});
    let errors = kube_test_api::schema::validate(&crd, "v1alpha1", &obj, None).unwrap_err();
    let text =
        kube_test_api::schema::format_invalid("StripeKeyPolicy", "stripekeys.io", "p", &errors);
    assert!(
        text.contains("spec.permissions: Invalid value: 0: spec.permissions in body should have at least 1 items"),
        "{text}"
    );
}

#[tokio::test]
async fn strict_field_validation_refuses_undeclared_fields_as_kubectl_apply_asks() {
    let (server, client) = setup().await;
    install_crds(&client).await;
    let obj = json!({"apiVersion": "stripekeys.io/v1alpha1", "kind": "StripeKeyPolicy",
        "metadata": {"name": "typo", "namespace": "default"},
        "spec": {"accountRef": {"name": "main"}, "permissions": ["charge_read"],
                 "delivery": {"secret": {"name": "k"}, "rolloutTargets": [{"kind": "Deployment", "name": "web", "replicas": 2}]},
                 "rotaton": {"every": "24h"}}});
    let path = "/apis/stripekeys.io/v1alpha1/namespaces/default/stripekeypolicies";
    let json_body = [
        ("Content-Type", "application/json"),
        ("Accept", "application/json"),
    ];
    let (code, body) = http(
        &server,
        "POST",
        &format!("{path}?fieldManager=kubectl-client-side-apply&fieldValidation=Strict"),
        &json_body,
        Some(&obj),
    )
    .await;
    assert_eq!(code, 400, "{body}");
    let status: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["reason"], "BadRequest");
    let message = status["message"].as_str().unwrap();
    assert!(
        message.starts_with("StripeKeyPolicy in version \"v1alpha1\" cannot be handled as a StripeKeyPolicy: strict decoding error: "),
        "{message}"
    );
    assert!(
        message.contains("unknown field \"spec.rotaton\""),
        "{message}"
    );
    assert!(
        message.contains("unknown field \"spec.delivery.rolloutTargets[0].replicas\""),
        "{message}"
    );
    // Server-side apply says it in its own words.
    let (code, body) = http(
        &server,
        "PATCH",
        &format!("{path}/typo?fieldManager=kubectl&fieldValidation=Strict&force=false"),
        &[
            ("Content-Type", "application/apply-patch+yaml"),
            ("Accept", "application/json"),
        ],
        Some(&obj),
    )
    .await;
    assert_eq!(code, 400, "{body}");
    assert!(
        body.contains(".spec.rotaton: field not declared in schema"),
        "{body}"
    );
    // Without Strict (kube's default) the fields are pruned, as before.
    let (code, body) = http(&server, "POST", path, &json_body, Some(&obj)).await;
    assert_eq!(code, 201, "{body}");
    let stored = server
        .get(
            "stripekeys.io/v1alpha1",
            "StripeKeyPolicy",
            Some("default"),
            "typo",
        )
        .unwrap();
    assert!(stored["spec"].get("rotaton").is_none());
}

/// The `kubectl` on `PATH`, if any.
fn kubectl_binary() -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("kubectl"))
            .find(|p| p.is_file())
    })
}

/// Runs kubectl against `server` with its own cache directory; returns (success, stdout+stderr).
async fn kubectl(binary: &std::path::Path, dir: &std::path::Path, args: &[&str]) -> (bool, String) {
    let out = tokio::process::Command::new(binary)
        .args(args)
        .env("KUBECONFIG", dir.join("kubeconfig"))
        .env("KUBECACHEDIR", dir.join("cache"))
        .env("HOME", dir)
        .output()
        .await
        .expect("kubectl runs");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_real_kubectl_sees_a_cluster_when_one_is_installed() {
    let Some(binary) = kubectl_binary() else {
        eprintln!("kubectl is not installed: skipping the check with a real kubectl");
        return;
    };
    let (server, client) = setup().await;
    install_crds(&client).await;
    let dir = std::env::temp_dir().join(format!("kube-test-api-kubectl-{}", server.addr().port()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("kubeconfig"), server.kubeconfig_yaml()).unwrap();
    let next = (chrono::Utc::now() + chrono::TimeDelta::days(30))
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    policy(
        &server,
        "checkout",
        json!({"conditions": [{"type": "Ready", "status": "True", "reason": "KeyMinted",
                               "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
               "currentKey": {"id": "apikey_123", "fingerprint": "abc"}, "nextRotationAt": next}),
    );
    server
        .put(json!({"apiVersion": "events.k8s.io/v1", "kind": "Event",
            "metadata": {"name": "checkout.1", "namespace": "default"},
            "eventTime": "2026-01-01T00:00:00.000000Z", "action": "Mint", "reason": "KeyMinted",
            "type": "Normal", "note": "minted key apikey_123", "reportingController": "stripe-key-operator",
            "reportingInstance": "pod-a",
            "regarding": {"kind": "StripeKeyPolicy", "name": "checkout", "namespace": "default"}}))
        .unwrap();

    let (ok, out) = kubectl(&binary, &dir, &["get", "stripekeypolicies", "-A"]).await;
    assert!(ok, "{out}");
    assert!(
        out.contains("NEXT ROTATION") && out.contains(&next),
        "{out}"
    );
    assert!(
        out.contains("apikey_123") && !out.contains("<invalid>"),
        "{out}"
    );

    let (ok, out) = kubectl(&binary, &dir, &["get", "events", "-n", "default"]).await;
    assert!(ok, "{out}");
    assert!(
        out.contains("KeyMinted") && out.contains("stripekeypolicy/checkout"),
        "{out}"
    );

    let (ok, out) = kubectl(&binary, &dir, &["explain", "stripekeypolicy.spec.rotation"]).await;
    assert!(ok, "{out}");
    assert!(
        out.contains("every") && out.contains("Go duration"),
        "{out}"
    );

    let manifest = dir.join("policy.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: stripekeys.io/v1alpha1\nkind: StripeKeyPolicy\nmetadata: {name: other, namespace: default}\nspec:\n  accountRef: {name: main}\n  permissions: [charge_read]\n  delivery: {secret: {name: other-key}}\n",
    )
    .unwrap();
    let manifest = manifest.to_string_lossy().into_owned();
    let (ok, out) = kubectl(&binary, &dir, &["apply", "-f", &manifest]).await;
    assert!(
        ok,
        "kubectl apply validates without --validate=false: {out}"
    );
    let (ok, out) = kubectl(
        &binary,
        &dir,
        &[
            "wait",
            "--for=condition=Ready",
            "stripekeypolicy/checkout",
            "--timeout=10s",
        ],
    )
    .await;
    assert!(ok, "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}
