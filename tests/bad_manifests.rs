//! Admission-time validation of the four CRDs, proven with manifests.
//!
//! `tests/manifests/bad/NN-<what>.yaml` is a complete object that is wrong in one way (one is
//! wrong in several); `NN-<what>.expected` holds the exact message the apiserver answers with.
//! `<what>.old.yaml` + `<what>.new.yaml` + `<what>.expected` is an update from old to new.
//! `tests/manifests/good/*.yaml` and the stripekeys.io objects in `examples/` must be accepted.
//!
//! Messages come from the CRDs the code generates (`stripe_key_operator::api::crds()`), checked
//! by `kube_test_api::schema` (structural schema and CEL, the apiserver's texts), through the
//! test API server over HTTP, and — `#[ignore]`d — by a real cluster.
//!
//! `UPDATE_EXPECTED=1 cargo test --test bad_manifests` rewrites the `.expected` files from the
//! current CRDs; review every changed message by hand before committing it.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch};
use kube::api::{PatchParams, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use kube_test_api::schema;
use serde_json::Value;
use stripe_key_operator::api::GROUP;

/// The least number of bad manifests issue #2 asks for.
const MIN_BAD_MANIFESTS: usize = 15;
/// The namespace namespaced objects are submitted to (they carry none themselves).
const TEST_NAMESPACE: &str = "default";

fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// Every generated CRD as JSON, as the apiserver receives it.
fn crds_json() -> Vec<Value> {
    stripe_key_operator::api::crds()
        .iter()
        .map(|crd| serde_json::to_value(crd).expect("CRD serializes"))
        .collect()
}

fn crd_for_kind<'a>(crds: &'a [Value], kind: &str) -> &'a Value {
    crds.iter()
        .find(|c| c["spec"]["names"]["kind"] == kind)
        .unwrap_or_else(|| panic!("no CRD for kind {kind}"))
}

/// Every YAML document of a file, empty documents skipped.
fn yaml_docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| {
            let v: Value = serde::Deserialize::deserialize(doc)
                .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()));
            v
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// The one object of a manifest file.
fn manifest(path: &Path) -> Value {
    let mut docs = yaml_docs(path);
    assert_eq!(docs.len(), 1, "{} holds exactly one object", path.display());
    let obj = docs.remove(0);
    for field in ["apiVersion", "kind", "spec"] {
        assert!(
            obj.get(field).is_some(),
            "{} is a complete object: {field} is missing",
            path.display()
        );
    }
    assert!(
        obj["metadata"]["name"].is_string(),
        "{} is a complete object: metadata.name is missing",
        path.display()
    );
    obj
}

fn kind_of(obj: &Value) -> &str {
    obj["kind"].as_str().expect("kind is a string")
}

fn name_of(obj: &Value) -> &str {
    obj["metadata"]["name"].as_str().expect("name is a string")
}

/// `(group, version)` of an object's `apiVersion`.
fn group_version(obj: &Value) -> (&str, &str) {
    let api_version = obj["apiVersion"].as_str().expect("apiVersion is a string");
    api_version
        .split_once('/')
        .unwrap_or_else(|| panic!("{api_version} has a group"))
}

/// One bad manifest: a create (`old == None`) or an update from `old` to `new`.
struct BadCase {
    /// The file name without `.yaml` / `.new.yaml`, also the stem of the `.expected` file.
    stem: String,
    new: PathBuf,
    old: Option<PathBuf>,
    expected: PathBuf,
}

impl BadCase {
    fn display(&self) -> String {
        match &self.old {
            None => format!("tests/manifests/bad/{}.yaml", self.stem),
            Some(_) => format!("tests/manifests/bad/{}.{{old,new}}.yaml", self.stem),
        }
    }
}

fn bad_cases() -> Vec<BadCase> {
    let dir = repo_path("tests/manifests/bad");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .expect("tests/manifests/bad exists")
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    let mut cases = Vec::new();
    for name in &names {
        let Some(base) = name.strip_suffix(".yaml") else {
            assert!(
                name.ends_with(".expected"),
                "unexpected file tests/manifests/bad/{name}"
            );
            continue;
        };
        if base.ends_with(".old") {
            continue;
        }
        let (stem, old) = match base.strip_suffix(".new") {
            Some(stem) => {
                let old = dir.join(format!("{stem}.old.yaml"));
                assert!(old.exists(), "{name} needs {stem}.old.yaml");
                (stem.to_string(), Some(old))
            }
            None => (base.to_string(), None),
        };
        cases.push(BadCase {
            expected: dir.join(format!("{stem}.expected")),
            new: dir.join(name),
            old,
            stem,
        });
    }
    // Every .expected file belongs to a manifest.
    let stems: BTreeSet<&str> = cases.iter().map(|c| c.stem.as_str()).collect();
    for name in &names {
        if let Some(stem) = name.strip_suffix(".expected") {
            assert!(
                stems.contains(stem),
                "tests/manifests/bad/{name} has no manifest"
            );
        }
    }
    cases
}

/// Validates `obj` (an update from `old` when given) against its CRD like the apiserver:
/// `Ok(stored object)` or `Err(the Invalid message)`.
fn validate(crds: &[Value], obj: &Value, old: Option<&Value>) -> Result<Value, String> {
    let (group, version) = group_version(obj);
    assert_eq!(group, GROUP, "{} is a stripekeys.io object", name_of(obj));
    let crd = crd_for_kind(crds, kind_of(obj));
    schema::validate(crd, version, obj, old)
        .map_err(|errors| schema::format_invalid(kind_of(obj), group, name_of(obj), &errors))
}

fn read_expected(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim_end_matches('\n').to_string())
}

/// How an actual message must match its `.expected` file.
#[derive(Clone, Copy, PartialEq)]
enum Match {
    /// Byte for byte.
    Exact,
    /// Byte for byte, except that the errors of a `[e1, e2]` list may come in another order: a
    /// real apiserver reports list-set duplicates after the other schema errors, and its schema
    /// validator walks properties in its own order.
    AnyErrorOrder,
}

/// The `... is invalid: ` prefix and the single errors of an `Invalid` message.
fn split_errors(message: &str) -> (&str, BTreeSet<&str>) {
    const SEP: &str = ", ";
    let Some(at) = message.find(" is invalid: [") else {
        return (message, BTreeSet::new());
    };
    let prefix = &message[..at];
    let Some(list) = message[at + " is invalid: [".len()..].strip_suffix(']') else {
        return (message, BTreeSet::new());
    };
    // Split at ", " only where a field path starts: values themselves contain ", ".
    let starts_field = |rest: &str| {
        ["spec.", "metadata.", "status.", "<nil>:"]
            .iter()
            .any(|p| rest.starts_with(p))
    };
    let mut errors = BTreeSet::new();
    let mut start = 0;
    let mut from = 0;
    while let Some(i) = list[from..].find(SEP).map(|i| i + from) {
        if starts_field(&list[i + SEP.len()..]) {
            errors.insert(&list[start..i]);
            start = i + SEP.len();
        }
        from = i + SEP.len();
    }
    errors.insert(&list[start..]);
    (prefix, errors)
}

fn messages_match(expected: &str, actual: &str, how: Match) -> bool {
    expected == actual
        || (how == Match::AnyErrorOrder && split_errors(expected) == split_errors(actual))
}

/// Compares actual messages with the `.expected` files; rewrites them with `UPDATE_EXPECTED=1`.
/// Panics with every mismatch, expected and actual on consecutive lines.
fn check_messages(what: &str, actual: Vec<(&BadCase, Result<(), String>)>, how: Match) {
    let update = std::env::var_os("UPDATE_EXPECTED").is_some_and(|v| v == "1");
    let mut report = String::new();
    for (case, result) in actual {
        let expected = read_expected(&case.expected);
        match result {
            Ok(()) => {
                let _ = writeln!(
                    report,
                    "{}\n  was ACCEPTED, expected: {}\n",
                    case.display(),
                    expected.as_deref().unwrap_or("<no .expected file>")
                );
            }
            Err(message)
                if !expected
                    .as_deref()
                    .is_some_and(|e| messages_match(e, &message, how)) =>
            {
                if update {
                    std::fs::write(&case.expected, format!("{message}\n"))
                        .expect("write .expected");
                    eprintln!("updated {}", case.expected.display());
                } else {
                    let _ = writeln!(
                        report,
                        "{}\n  expected: {}\n  actual:   {}\n",
                        case.display(),
                        expected.as_deref().unwrap_or("<no .expected file>"),
                        message
                    );
                }
            }
            Err(_) => {}
        }
    }
    assert!(
        report.is_empty(),
        "{what}: messages differ from tests/manifests/bad/*.expected \
         (UPDATE_EXPECTED=1 rewrites them; review each by hand):\n\n{report}"
    );
}

#[test]
fn every_bad_manifest_gets_exactly_its_expected_message() {
    let crds = crds_json();
    let cases = bad_cases();
    let results = cases
        .iter()
        .map(|case| {
            let new = manifest(&case.new);
            let old = case.old.as_ref().map(|p| {
                let old = manifest(p);
                validate(&crds, &old, None).unwrap_or_else(|m| {
                    panic!("{} must be valid to test the update: {m}", p.display())
                })
            });
            (case, validate(&crds, &new, old.as_ref()).map(|_| ()))
        })
        .collect();
    check_messages("schema validation", results, Match::Exact);
}

#[test]
fn there_are_at_least_15_bad_manifests_across_all_four_kinds_each_with_its_message() {
    let cases = bad_cases();
    assert!(
        cases.len() >= MIN_BAD_MANIFESTS,
        "only {} bad manifests",
        cases.len()
    );
    let kinds: BTreeSet<String> = cases
        .iter()
        .map(|c| kind_of(&manifest(&c.new)).to_string())
        .collect();
    let all: BTreeSet<String> = crds_json()
        .iter()
        .map(|c| c["spec"]["names"]["kind"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(kinds, all, "every kind has bad manifests");
    for case in &cases {
        let expected = read_expected(&case.expected)
            .unwrap_or_else(|| panic!("{} has no .expected file", case.display()));
        let obj = manifest(&case.new);
        let prefix = format!(
            "{}.{GROUP} \"{}\" is invalid: ",
            kind_of(&obj),
            name_of(&obj)
        );
        assert!(
            expected.starts_with(&prefix) && !expected.contains('\n'),
            "{}: the expected message is one line starting with {prefix:?}",
            case.display()
        );
    }
}

#[test]
fn error_lists_compare_in_any_order_only_when_asked() {
    let a = r#"K.g "n" is invalid: [spec.a: Unsupported value: "x": supported values: "p", "q", spec.b[1]: Duplicate value: "y", <nil>: Invalid value: "null": later]"#;
    let b = r#"K.g "n" is invalid: [spec.b[1]: Duplicate value: "y", spec.a: Unsupported value: "x": supported values: "p", "q", <nil>: Invalid value: "null": later]"#;
    assert_eq!(split_errors(a).1.len(), 3, "{:?}", split_errors(a));
    assert!(messages_match(a, b, Match::AnyErrorOrder));
    assert!(!messages_match(a, b, Match::Exact));
    let c = b.replace("\"y\"", "\"z\"");
    assert!(!messages_match(a, &c, Match::AnyErrorOrder));
}

#[test]
fn every_cel_rule_of_every_crd_compiles() {
    fn count_rules(v: &Value) -> usize {
        match v {
            Value::Object(m) => {
                m.get("x-kubernetes-validations")
                    .and_then(Value::as_array)
                    .map_or(0, Vec::len)
                    + m.values().map(count_rules).sum::<usize>()
            }
            Value::Array(a) => a.iter().map(count_rules).sum(),
            _ => 0,
        }
    }
    let crds = crds_json();
    let mut total = 0;
    for crd in &crds {
        let errors = schema::check_rules_compile(crd);
        assert!(
            errors.is_empty(),
            "{}: {}",
            crd["metadata"]["name"],
            errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        );
        total += count_rules(crd);
    }
    // Guards against a serialisation change that would silently drop every rule.
    assert!(total >= 15, "only {total} CEL rules in the CRDs");
}

#[test]
fn cel_rules_over_strings_lists_and_maps_are_bounded_for_the_cost_budget() {
    // The apiserver estimates each rule's worst-case cost from maxLength / maxItems /
    // maxProperties and refuses the CRD when it exceeds the per-rule budget. Without a bound it
    // assumes the largest request (3 MiB), which puts `matches()`, `contains()`, `exists()`,
    // `all()` and `==` on lists well over budget. Every node carrying a rule that is a string,
    // list or map must be bounded, and so must the items of a list it iterates.
    fn walk(path: &str, s: &Value, unbounded: &mut Vec<String>) {
        let has_rules = s
            .get("x-kubernetes-validations")
            .and_then(Value::as_array)
            .is_some_and(|r| !r.is_empty());
        if has_rules {
            match s.get("type").and_then(Value::as_str) {
                Some("string") if s.get("maxLength").is_none() => unbounded.push(path.into()),
                Some("array") => {
                    if s.get("maxItems").is_none() {
                        unbounded.push(path.into());
                    }
                    if s["items"]["type"] == "string" && s["items"].get("maxLength").is_none() {
                        unbounded.push(format!("{path}[]"));
                    }
                }
                Some("object")
                    if s.get("additionalProperties").is_some()
                        && s.get("maxProperties").is_none() =>
                {
                    unbounded.push(path.into())
                }
                _ => {}
            }
        }
        if let Some(props) = s.get("properties").and_then(Value::as_object) {
            for (k, sub) in props {
                walk(&format!("{path}.{k}"), sub, unbounded);
            }
        }
        if let Some(items) = s.get("items") {
            walk(&format!("{path}[]"), items, unbounded);
        }
        if let Some(ap) = s.get("additionalProperties").filter(|a| a.is_object()) {
            walk(&format!("{path}[*]"), ap, unbounded);
        }
    }
    let mut unbounded = Vec::new();
    for crd in crds_json() {
        let kind = crd["spec"]["names"]["kind"].as_str().unwrap().to_string();
        for v in crd["spec"]["versions"].as_array().unwrap() {
            walk(&kind, &v["schema"]["openAPIV3Schema"], &mut unbounded);
        }
    }
    assert!(
        unbounded.is_empty(),
        "CEL rules on unbounded values: {unbounded:#?}"
    );
}

/// Every good manifest and every stripekeys.io object of `examples/`, with its file.
fn good_objects() -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for dir in ["tests/manifests/good", "examples", "examples/brokered"] {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(repo_path(dir))
            .unwrap_or_else(|e| panic!("{dir}: {e}"))
            .map(|e| e.expect("dir entry").path())
            .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
            .collect();
        paths.sort();
        for path in paths {
            for obj in yaml_docs(&path) {
                let api_version = obj["apiVersion"].as_str().unwrap_or_default();
                if api_version.starts_with(&format!("{GROUP}/")) {
                    let file = path.strip_prefix(repo_path("")).unwrap_or(&path);
                    out.push((file.display().to_string(), obj));
                }
            }
        }
    }
    out
}

#[test]
fn good_manifests_and_examples_are_accepted() {
    let crds = crds_json();
    let good = good_objects();
    let mut refused = Vec::new();
    for (file, obj) in &good {
        if let Err(message) = validate(&crds, obj, None) {
            refused.push(format!("{file}: {message}"));
        }
    }
    assert!(
        refused.is_empty(),
        "good manifests refused:\n{}",
        refused.join("\n")
    );
    let kinds: BTreeSet<&str> = good.iter().map(|(_, o)| kind_of(o)).collect();
    assert_eq!(kinds.len(), 4, "good manifests of every kind: {kinds:?}");
    assert!(
        good.iter().any(|(f, _)| f.starts_with("examples/")),
        "the examples are checked too"
    );
}

#[test]
fn updating_a_policy_without_moving_accounts_passes_the_immutability_rule() {
    let crds = crds_json();
    let old = manifest(&repo_path(
        "tests/manifests/bad/immutable-accountref.old.yaml",
    ));
    let stored = validate(&crds, &old, None).expect("old policy is valid");
    let mut new = stored.clone();
    new["spec"]["permissions"] = serde_json::json!(["charge_read", "refund_write"]);
    new["spec"]["rotation"] = serde_json::json!({"every": "720h"});
    validate(&crds, &new, Some(&stored)).expect("other fields may change");
}

#[test]
fn defaults_are_filled_in_for_an_account() {
    // The defaults the controllers rely on are applied by the apiserver, not only by serde.
    let crds = crds_json();
    let account = manifest(&repo_path("tests/manifests/good/account-live-vault.yaml"));
    let stored = validate(&crds, &account, None).expect("valid account");
    assert_eq!(stored["spec"]["apiBase"], "https://api.stripe.com");
    assert_eq!(
        stored["spec"]["apiVersion"],
        stripe_key_operator::api::DEFAULT_STRIPE_API_VERSION
    );
    assert_eq!(
        stored["spec"]["encryptionKey"]["vault"]["key"], "secret_key",
        "vault key defaults to secret_key"
    );
}

// ------------------------------------------------------------------------------------------------
// Through an API server: the test API server over HTTP, and a real cluster.
// ------------------------------------------------------------------------------------------------

/// The dynamic API of an object's kind, in [`TEST_NAMESPACE`] when the kind is namespaced.
fn dynamic_api(client: &kube::Client, crds: &[Value], obj: &Value) -> Api<DynamicObject> {
    let crd = crd_for_kind(crds, kind_of(obj));
    let (group, version) = group_version(obj);
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(group, version, kind_of(obj)),
        crd["spec"]["names"]["plural"].as_str().expect("plural"),
    );
    if crd["spec"]["scope"] == "Namespaced" {
        Api::namespaced_with(client.clone(), TEST_NAMESPACE, &resource)
    } else {
        Api::all_with(client.clone(), &resource)
    }
}

fn dynamic_object(obj: &Value) -> DynamicObject {
    let mut obj = obj.clone();
    if let Some(meta) = obj["metadata"].as_object_mut() {
        meta.remove("namespace");
    }
    serde_json::from_value(obj).expect("a manifest is a DynamicObject")
}

/// Installs (server-side applies) every CRD and waits until each is established.
async fn install_crds(client: &kube::Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let params = PatchParams::apply("stripe-key-operator-tests").force();
    for crd in stripe_key_operator::api::crds() {
        let name = crd.metadata.name.clone().expect("CRD name");
        crds.patch(&name, &params, &Patch::Apply(&crd))
            .await
            .unwrap_or_else(|e| panic!("apply CRD {name}: {e}"));
        tokio::time::timeout(
            Duration::from_secs(30),
            await_condition(crds.clone(), &name, conditions::is_crd_established()),
        )
        .await
        .unwrap_or_else(|_| panic!("CRD {name} established in time"))
        .expect("watch CRD");
    }
}

/// Creates `obj`, retrying while the apiserver does not serve the new kind yet (404 right
/// after a CRD is established).
async fn create(
    api: &Api<DynamicObject>,
    params: &PostParams,
    obj: &DynamicObject,
) -> Result<DynamicObject, kube::Error> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match api.create(params, obj).await {
            Err(kube::Error::Api(s)) if s.code == 404 && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => return other,
        }
    }
}

/// The `Invalid` message an API server gives a rejected write, or `Ok(())` if it accepted it.
fn invalid_message(result: Result<DynamicObject, kube::Error>) -> Result<(), String> {
    match result {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 422 && s.reason == "Invalid" => Err(s.message),
        Err(other) => Err(format!("<not a 422 Invalid: {other}>")),
    }
}

/// Submits every bad manifest to the API server behind `client` and returns its answers.
/// `dry_run` creates nothing for a create; an update needs its old object to exist, so that one
/// is created for real, updated with the new object (dry run too when asked) and deleted.
async fn submit_bad_manifests<'a>(
    client: &kube::Client,
    cases: &'a [BadCase],
    dry_run: bool,
) -> Vec<(&'a BadCase, Result<(), String>)> {
    let crds = crds_json();
    let params = PostParams {
        dry_run,
        field_manager: Some("stripe-key-operator-tests".into()),
    };
    let mut out = Vec::new();
    for case in cases {
        let new = manifest(&case.new);
        let api = dynamic_api(client, &crds, &new);
        let result = match &case.old {
            None => invalid_message(create(&api, &params, &dynamic_object(&new)).await),
            Some(old_path) => {
                let old = manifest(old_path);
                let real = PostParams {
                    dry_run: false,
                    ..params.clone()
                };
                // A leftover of an interrupted run would make the create fail.
                let _ = api.delete(name_of(&old), &DeleteParams::default()).await;
                let created = create(&api, &real, &dynamic_object(&old))
                    .await
                    .unwrap_or_else(|e| panic!("create {}: {e}", old_path.display()));
                let mut update = dynamic_object(&new);
                update.metadata.resource_version = created.metadata.resource_version.clone();
                let result = api.replace(name_of(&new), &params, &update).await;
                api.delete(name_of(&old), &DeleteParams::default())
                    .await
                    .unwrap_or_else(|e| panic!("delete {}: {e}", old_path.display()));
                invalid_message(result)
            }
        };
        out.push((case, result));
    }
    out
}

#[tokio::test]
async fn test_api_server_refuses_bad_manifests_over_http_with_the_expected_messages() {
    let server = kube_test_api::TestApiServer::start()
        .await
        .expect("server starts");
    let config = kube::Config::new(server.url().parse().expect("url"));
    let client = kube::Client::try_from(config).expect("client");
    install_crds(&client).await;

    // One bad policy on its own, as `kubectl apply` would send it.
    let crds = crds_json();
    let case = bad_cases()
        .into_iter()
        .find(|c| c.stem == "07-rotation-every-and-schedule")
        .expect("the every-and-schedule manifest exists");
    let bad = manifest(&case.new);
    let api = dynamic_api(&client, &crds, &bad);
    let err = create(&api, &PostParams::default(), &dynamic_object(&bad))
        .await
        .expect_err("the apiserver refuses the bad policy");
    let kube::Error::Api(status) = err else {
        panic!("expected an API error, got {err}")
    };
    assert_eq!((status.code, status.reason.as_str()), (422, "Invalid"));
    assert_eq!(
        Some(status.message),
        read_expected(&case.expected),
        "{}",
        case.display()
    );
    assert!(
        api.get_opt(name_of(&bad)).await.unwrap().is_none(),
        "nothing stored"
    );

    // A good policy is stored.
    let good = manifest(&repo_path(
        "tests/manifests/good/policy-cron-every-option.yaml",
    ));
    let created = create(&api, &PostParams::default(), &dynamic_object(&good))
        .await
        .expect("the apiserver accepts the good policy");
    assert_eq!(created.data["spec"]["rotation"]["schedule"], "0 3 * * 1");

    // Every other bad manifest, and the update, through HTTP too.
    let cases = bad_cases();
    let results = submit_bad_manifests(&client, &cases, true).await;
    check_messages("test API server over HTTP", results, Match::Exact);
    server.shutdown().await;
}

/// Runs the bad manifests against a real cluster (Kubernetes 1.26 or later):
/// `KUBECONFIG=~/.kube/kind cargo test --test bad_manifests -- --ignored`.
///
/// It server-side applies the CRDs (field manager `stripe-key-operator-tests`, forced), submits
/// every bad create with `dryRun=All` in the `default` namespace, and for the update creates
/// the old policy for real, replaces it with `dryRun=All` and deletes it. Use a cluster without
/// the operator's admission webhook, whose refusals would come first for some manifests.
#[tokio::test]
#[ignore = "needs a real cluster"]
async fn real_cluster_refuses_bad_manifests_with_the_expected_messages() {
    let path = std::env::var("KUBECONFIG").expect("KUBECONFIG names the test cluster's config");
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).expect("KUBECONFIG readable");
    let config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .expect("kubeconfig usable");
    let client = kube::Client::try_from(config).expect("client");
    install_crds(&client).await;
    let cases = bad_cases();
    let results = submit_bad_manifests(&client, &cases, true).await;
    check_messages("real cluster", results, Match::AnyErrorOrder);

    // The good manifests pass the real apiserver too (dry run: nothing is created).
    let crds = crds_json();
    let params = PostParams {
        dry_run: true,
        field_manager: Some("stripe-key-operator-tests".into()),
    };
    let mut refused = Vec::new();
    for (file, obj) in good_objects() {
        let api = dynamic_api(&client, &crds, &obj);
        if let Err(e) = create(&api, &params, &dynamic_object(&obj)).await {
            refused.push(format!("{file}: {e}"));
        }
    }
    assert!(refused.is_empty(), "refused:\n{}", refused.join("\n"));
}
