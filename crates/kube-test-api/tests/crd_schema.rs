//! CustomResourceDefinitions: serving custom kinds, structural schema validation, defaulting,
//! pruning and CEL rules, with the apiserver's exact error messages.

mod common;

use common::{setup, status};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
};
use kube::discovery::Discovery;
use kube::runtime::wait::{await_condition, conditions};
use kube_test_api::schema::{self, FieldError, FieldErrorType};
use serde_json::{Value, json};

fn crd_json() -> Value {
    serde_yaml::from_str(include_str!("fixtures/stripekeypolicy-crd.yaml")).unwrap()
}

fn policy_resource(version: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("stripekeys.io", version, "StripeKeyPolicy"),
        "stripekeypolicies",
    )
}

async fn install(client: &kube::Client) -> Api<DynamicObject> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd: CustomResourceDefinition = serde_json::from_value(crd_json()).unwrap();
    crds.create(&PostParams::default(), &crd).await.unwrap();
    tokio::time::timeout(
        std::time::Duration::from_secs(5),
        await_condition(
            crds,
            "stripekeypolicies.stripekeys.io",
            conditions::is_crd_established(),
        ),
    )
    .await
    .expect("CRD established in time")
    .unwrap();
    Api::namespaced_with(client.clone(), "default", &policy_resource("v1alpha1"))
}

fn policy(name: &str, spec: Value) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "stripekeys.io/v1alpha1", "kind": "StripeKeyPolicy",
        "metadata": {"name": name}, "spec": spec
    }))
    .unwrap()
}

fn valid_spec() -> Value {
    json!({"accountRef": {"name": "main"}, "mode": "test", "rotation": {"every": "24h"}})
}

#[tokio::test]
async fn created_crd_is_established_discovered_and_served() {
    let (_server, client) = setup().await;
    let api = install(&client).await;
    let discovery = Discovery::new(client.clone()).run().await.unwrap();
    let (ar, caps) = discovery
        .get("stripekeys.io")
        .and_then(|g| g.recommended_kind("StripeKeyPolicy"))
        .expect("custom kind discovered");
    assert_eq!(ar.plural, "stripekeypolicies");
    assert_eq!(caps.scope, kube::discovery::Scope::Namespaced);
    let resources = client
        .list_api_group_resources("stripekeys.io/v1alpha1")
        .await
        .unwrap();
    let main = resources
        .resources
        .iter()
        .find(|r| r.name == "stripekeypolicies")
        .unwrap();
    assert_eq!(main.short_names.as_deref(), Some(&["skp".to_string()][..]));
    assert_eq!(
        main.categories.as_deref(),
        Some(&["stripe".to_string()][..])
    );
    assert!(main.namespaced);
    assert!(
        resources
            .resources
            .iter()
            .any(|r| r.name == "stripekeypolicies/status")
    );
    let created = api
        .create(&PostParams::default(), &policy("p1", valid_spec()))
        .await
        .unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    assert_eq!(api.list(&Default::default()).await.unwrap().items.len(), 1);
    // The other served version reads the same object.
    let beta: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), "default", &policy_resource("v1beta1"));
    let via_beta = beta.get("p1").await.unwrap();
    assert_eq!(via_beta.types.unwrap().api_version, "stripekeys.io/v1beta1");

    // A cluster-scoped CRD is served without a namespace.
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut cluster = crd_json();
    cluster["metadata"]["name"] = "clusterpolicies.stripekeys.io".into();
    cluster["spec"]["scope"] = "Cluster".into();
    cluster["spec"]["names"] =
        json!({"plural": "clusterpolicies", "kind": "ClusterPolicy", "shortNames": ["cpol"]});
    crds.create(
        &PostParams::default(),
        &serde_json::from_value(cluster).unwrap(),
    )
    .await
    .unwrap();
    let car = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("stripekeys.io", "v1alpha1", "ClusterPolicy"),
        "clusterpolicies",
    );
    let capi: Api<DynamicObject> = Api::all_with(client.clone(), &car);
    let mut obj = policy("global", valid_spec());
    obj.types.as_mut().unwrap().kind = "ClusterPolicy".into();
    let c = capi.create(&PostParams::default(), &obj).await.unwrap();
    assert_eq!(c.metadata.namespace, None);
}

#[tokio::test]
async fn deleting_the_crd_removes_its_objects_and_endpoints() {
    let (_server, client) = setup().await;
    let api = install(&client).await;
    api.create(&PostParams::default(), &policy("p", valid_spec()))
        .await
        .unwrap();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.delete("stripekeypolicies.stripekeys.io", &DeleteParams::default())
        .await
        .unwrap();
    let s = status(api.get("p").await.unwrap_err());
    assert_eq!(s.code, 404);
    assert_eq!(
        s.message,
        "the server could not find the requested resource"
    );
}

async fn create_err(api: &Api<DynamicObject>, spec: Value) -> String {
    let s = status(
        api.create(&PostParams::default(), &policy("bad", spec))
            .await
            .unwrap_err(),
    );
    assert_eq!(
        (s.code, s.reason.as_str()),
        (422, "Invalid"),
        "{}",
        s.message
    );
    s.message
}

#[tokio::test]
async fn schema_and_cel_errors_match_the_apiserver_text() {
    let (_server, client) = setup().await;
    let api = install(&client).await;
    let prefix = r#"StripeKeyPolicy.stripekeys.io "bad" is invalid: "#;
    let with = |patch: Value| {
        let mut s = valid_spec();
        for (k, v) in patch.as_object().unwrap() {
            if v.is_null() {
                s.as_object_mut().unwrap().remove(k);
            } else {
                s[k] = v.clone();
            }
        }
        s
    };
    let cases = [
        (
            with(json!({"accountRef": null})),
            "spec.accountRef: Required value",
        ),
        (
            with(json!({"mode": "prod"})),
            r#"spec.mode: Unsupported value: "prod": supported values: "test", "live""#,
        ),
        (
            with(json!({"rotation": {"every": "24h", "schedule": "0 0 * * *"}})),
            r#"spec.rotation: Invalid value: "object": exactly one of every or schedule must be set"#,
        ),
        (
            with(json!({"rotation": {}})),
            r#"spec.rotation: Invalid value: "object": exactly one of every or schedule must be set"#,
        ),
        (
            with(json!({"webhookUrl": "http://example.com/hook"})),
            r#"spec.webhookUrl: Invalid value: "string": must be an https URL"#,
        ),
        (
            with(json!({"accountId": "acct-1"})),
            r#"spec.accountId: Invalid value: "acct-1": spec.accountId in body should match '^acct_[A-Za-z0-9]+$'"#,
        ),
        (
            with(json!({"mode": "live"})),
            "spec.accountId: Required value: live mode needs an accountId",
        ),
        (
            with(json!({"rotation": {"every": "10m"}})),
            r#"spec.rotation.every: Invalid value: "string": rotation interval 10m is shorter than 1h"#,
        ),
        (
            with(json!({"replicas": 9})),
            "spec.replicas: Invalid value: 9: spec.replicas in body should be less than or equal to 5",
        ),
        (
            with(json!({"replicas": 0})),
            "spec.replicas: Invalid value: 0: spec.replicas in body should be greater than or equal to 1",
        ),
        (
            with(json!({"expireAt": "tomorrow"})),
            r#"spec.expireAt: Invalid value: "tomorrow": spec.expireAt in body must be of type date-time: "tomorrow""#,
        ),
        (
            with(json!({"permissions": ["read", "write", "read", "write"]})),
            "spec.permissions: Too many: 4: must have at most 3 items",
        ),
        (
            with(json!({"webhookUrl": format!("https://{}", "a".repeat(64))})),
            "spec.webhookUrl: Too long: may not be more than 64 bytes",
        ),
        (
            with(json!({"accountRef": {"name": "Main"}})),
            r#"spec.accountRef.name: Invalid value: "Main": spec.accountRef.name in body should match '^[a-z0-9]([-a-z0-9]*[a-z0-9])?$'"#,
        ),
    ];
    for (spec, want) in cases {
        let got = create_err(&api, spec).await;
        // Required, Unsupported, Too long, Too many and type errors keep CEL rules from running;
        // the apiserver then adds a fieldless notice (this CRD has rules).
        let blocking = [
            "Required value",
            "Unsupported value",
            "Too long",
            "Too many",
        ]
        .iter()
        .any(|t| want.contains(t))
            && !want.contains("live mode");
        if blocking {
            assert_eq!(got, format!("{prefix}[{want}, {NOTICE}]"));
        } else {
            assert_eq!(got, format!("{prefix}{want}"));
        }
    }
    let several = create_err(&api, with(json!({"accountRef": null, "mode": null}))).await;
    assert_eq!(
        several,
        format!("{prefix}[spec.accountRef: Required value, spec.mode: Required value, {NOTICE}]")
    );
    let typed = create_err(&api, with(json!({"replicas": "two"}))).await;
    assert_eq!(
        typed,
        format!(
            r#"{prefix}[spec.replicas: Invalid value: "string": spec.replicas in body must be of type integer: "string", {NOTICE}]"#
        )
    );
    // Non-blocking schema errors are reported together with failing rules.
    let both = create_err(
        &api,
        with(json!({"accountId": "bad", "webhookUrl": "http://x"})),
    )
    .await;
    assert_eq!(
        both,
        format!(
            r#"{prefix}[spec.accountId: Invalid value: "bad": spec.accountId in body should match '^acct_[A-Za-z0-9]+$', spec.webhookUrl: Invalid value: "string": must be an https URL]"#
        )
    );
}

const NOTICE: &str = r#"<nil>: Invalid value: "null": some validation rules were not checked because the object was invalid; correct the existing errors to complete validation"#;

#[tokio::test]
async fn transition_rule_makes_a_field_immutable_but_not_on_create() {
    let (_server, client) = setup().await;
    let api = install(&client).await;
    api.create(&PostParams::default(), &policy("imm", valid_spec()))
        .await
        .unwrap();
    let s = status(
        api.patch(
            "imm",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"accountRef": {"name": "other"}}})),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(
        s.message,
        r#"StripeKeyPolicy.stripekeys.io "imm" is invalid: spec.accountRef: Invalid value: "object": accountRef is immutable"#
    );
    let causes = s.details.unwrap().causes;
    assert_eq!(causes[0].field, "spec.accountRef");
    assert_eq!(causes[0].reason, "FieldValueInvalid");
    // Other fields can still change.
    api.patch(
        "imm",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"mode": "test", "replicas": 2}})),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn unknown_fields_are_pruned_and_defaults_applied() {
    let (_server, client) = setup().await;
    let api = install(&client).await;
    let mut spec = valid_spec();
    spec["unknown"] = json!("dropped");
    spec["extra"] = json!({"kept": {"deep": true}});
    spec["rotation"]["overlap"] = json!("25%");
    let created = api
        .create(&PostParams::default(), &policy("prune", spec))
        .await
        .unwrap();
    let got = &created.data["spec"];
    assert!(got.get("unknown").is_none());
    assert_eq!(got["extra"], json!({"kept": {"deep": true}}));
    assert_eq!(got["replicas"], json!(1), "default applied");
    assert_eq!(
        got["rotation"]["overlap"],
        json!("25%"),
        "int-or-string accepts strings"
    );
    let mut as_int = valid_spec();
    as_int["rotation"]["overlap"] = json!(3);
    api.create(&PostParams::default(), &policy("prune-int", as_int))
        .await
        .unwrap();
}

#[tokio::test]
async fn custom_resource_status_subresource_and_generation() {
    let (_server, client) = setup().await;
    let api = install(&client).await;
    let mut p = policy("st", valid_spec());
    p.data["status"] = json!({"ready": true});
    let created = api.create(&PostParams::default(), &p).await.unwrap();
    assert!(
        created.data.get("status").is_none(),
        "status is dropped on create"
    );
    let after_status = api
        .patch_status(
            "st",
            &PatchParams::apply("op").force(),
            &Patch::Apply(
                json!({"apiVersion": "stripekeys.io/v1alpha1", "kind": "StripeKeyPolicy",
                "metadata": {"name": "st"}, "status": {"ready": true, "observedGeneration": 1},
                "spec": {"mode": "live"}}),
            ),
        )
        .await
        .unwrap();
    assert_eq!(after_status.data["status"]["ready"], json!(true));
    assert_eq!(
        after_status.data["spec"]["mode"],
        json!("test"),
        "status writes ignore spec"
    );
    assert_eq!(after_status.metadata.generation, Some(1));
    let status_entry = after_status
        .metadata
        .managed_fields
        .unwrap()
        .into_iter()
        .find(|m| m.manager.as_deref() == Some("op"))
        .unwrap();
    assert_eq!(status_entry.subresource.as_deref(), Some("status"));
    let after_spec = api
        .patch(
            "st",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 3}, "status": {"ready": false}})),
        )
        .await
        .unwrap();
    assert_eq!(after_spec.metadata.generation, Some(2));
    assert_eq!(
        after_spec.data["status"]["ready"],
        json!(true),
        "main writes ignore status"
    );
}

#[tokio::test]
async fn crd_with_a_rule_that_does_not_compile_is_rejected() {
    let (_server, client) = setup().await;
    let crds: Api<CustomResourceDefinition> = Api::all(client);
    let mut crd = crd_json();
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["x-kubernetes-validations"]
        [0]["rule"] = json!("self.mode ==");
    let s = status(
        crds.create(
            &PostParams::default(),
            &serde_json::from_value(crd).unwrap(),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(s.code, 422);
    assert!(s.message.contains("compilation failed"), "{}", s.message);
}

#[test]
fn pure_validate_runs_transition_rules_only_with_an_old_object() {
    let crd = crd_json();
    let new = json!({"apiVersion": "stripekeys.io/v1alpha1", "kind": "StripeKeyPolicy", "metadata": {"name": "x"},
        "spec": {"accountRef": {"name": "b"}, "mode": "test", "rotation": {"schedule": "@daily"}}});
    let old = json!({"apiVersion": "stripekeys.io/v1alpha1", "kind": "StripeKeyPolicy", "metadata": {"name": "x"},
        "spec": {"accountRef": {"name": "a"}, "mode": "test", "rotation": {"schedule": "@daily"}}});
    let out = schema::validate(&crd, "v1alpha1", &new, None).expect("valid on create");
    assert_eq!(out["spec"]["replicas"], json!(1));
    let errs = schema::validate(&crd, "v1alpha1", &new, Some(&old)).unwrap_err();
    assert_eq!(
        errs,
        vec![FieldError {
            error_type: FieldErrorType::Invalid,
            field: "spec.accountRef".into(),
            bad_value: Some(json!("object")),
            detail: "accountRef is immutable".into(),
        }]
    );
    assert_eq!(
        schema::format_invalid("StripeKeyPolicy", "stripekeys.io", "x", &errs),
        r#"StripeKeyPolicy.stripekeys.io "x" is invalid: spec.accountRef: Invalid value: "object": accountRef is immutable"#
    );
    // A version without a schema accepts anything.
    assert!(schema::validate(&crd, "v1beta1", &json!({"spec": {"whatever": 1}}), None).is_ok());
}

#[tokio::test]
async fn custom_resources_can_be_watched_dynamically() {
    use futures::StreamExt;
    use kube::runtime::{WatchStreamExt, watcher};
    let (_server, client) = setup().await;
    let api = install(&client).await;
    let mut names = watcher(api.clone(), watcher::Config::default())
        .applied_objects()
        .boxed();
    api.create(&PostParams::default(), &policy("watched", valid_spec()))
        .await
        .unwrap();
    let first = tokio::time::timeout(std::time::Duration::from_secs(5), names.next())
        .await
        .expect("an event arrives")
        .unwrap()
        .unwrap();
    assert_eq!(first.metadata.name.as_deref(), Some("watched"));
    assert_eq!(
        first.data["spec"]["replicas"],
        json!(1),
        "watch events carry the defaulted object"
    );
}
