//! The request log: what the apiserver's authorizer would be asked, request by request.

mod common;

use std::collections::BTreeSet;

use axum::http::{HeaderValue, header};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube_test_api::{RecordedRequest, TestApiServer};
use serde_json::json;

/// A client that authenticates with the bearer token `token`.
fn client_as(server: &TestApiServer, token: &str) -> kube::Client {
    let mut config = kube::Config::new(server.url().parse().unwrap());
    config.headers.push((
        header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
    ));
    kube::Client::try_from(config).unwrap()
}

/// The recorded checks of `user`, as (verb, group, resource path, namespace, name, implied_by).
fn checks_of(
    server: &TestApiServer,
    user: &str,
) -> BTreeSet<(String, String, String, String, String, Option<String>)> {
    server
        .recorded_requests()
        .into_keys()
        .filter(|r: &RecordedRequest| r.user == user)
        .map(|r| {
            (
                r.verb.clone(),
                r.group.clone(),
                r.resource_path(),
                r.namespace.clone(),
                r.name.clone(),
                r.implied_by.clone(),
            )
        })
        .collect()
}

fn check(
    verb: &str,
    group: &str,
    resource: &str,
    namespace: &str,
    name: &str,
    implied_by: Option<&str>,
) -> (String, String, String, String, String, Option<String>) {
    (
        verb.into(),
        group.into(),
        resource.into(),
        namespace.into(),
        name.into(),
        implied_by.map(Into::into),
    )
}

#[tokio::test]
async fn every_request_is_recorded_with_its_rbac_verb_scope_and_caller() {
    let (server, admin) = common::setup().await;
    let client = client_as(&server, "system:serviceaccount:ops:operator");
    let user = "system:serviceaccount:ops:operator";
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "default");
    let all_secrets: Api<Secret> = Api::all(client.clone());

    let s: Secret = serde_json::from_value(json!({"metadata": {"name": "plain"}})).unwrap();
    secrets.create(&PostParams::default(), &s).await.unwrap();
    secrets.get("plain").await.unwrap();
    assert!(secrets.get_opt("absent").await.unwrap().is_none());
    all_secrets.list(&ListParams::default()).await.unwrap();
    secrets
        .list(&ListParams::default().fields("metadata.name=plain"))
        .await
        .unwrap();
    let mut s = secrets.get("plain").await.unwrap();
    s.metadata.labels = Some([("a".to_string(), "b".to_string())].into());
    secrets
        .replace("plain", &PostParams::default(), &s)
        .await
        .unwrap();
    secrets
        .patch(
            "plain",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"c": "d"}}})),
        )
        .await
        .unwrap();
    secrets
        .delete("plain", &DeleteParams::default())
        .await
        .unwrap();
    secrets
        .delete_collection(&DeleteParams::default(), &ListParams::default())
        .await
        .unwrap();
    Api::<Deployment>::namespaced(client.clone(), "default")
        .get_status("nothing")
        .await
        .unwrap_err();

    let got = checks_of(&server, user);
    let want: BTreeSet<_> = [
        check("create", "", "secrets", "default", "", None),
        check("get", "", "secrets", "default", "plain", None),
        check("get", "", "secrets", "default", "absent", None),
        check("list", "", "secrets", "", "", None),
        check("list", "", "secrets", "default", "plain", None),
        check("update", "", "secrets", "default", "plain", None),
        check("patch", "", "secrets", "default", "plain", None),
        check("delete", "", "secrets", "default", "plain", None),
        check("deletecollection", "", "secrets", "default", "", None),
        check(
            "get",
            "apps",
            "deployments/status",
            "default",
            "nothing",
            None,
        ),
    ]
    .into_iter()
    .collect();
    assert_eq!(got, want);
    let get_plain = server
        .recorded_requests()
        .into_iter()
        .find(|(r, _)| r.verb == "get" && r.name == "plain")
        .unwrap();
    assert_eq!(get_plain.1, 2, "two gets of the same object are counted");

    // The admin client sent no token: its requests are apart.
    Api::<ConfigMap>::namespaced(admin, "default")
        .list(&ListParams::default())
        .await
        .unwrap();
    assert_eq!(
        checks_of(&server, ""),
        [check("list", "", "configmaps", "default", "", None)]
            .into_iter()
            .collect()
    );
    server.clear_recorded_requests();
    assert!(server.recorded_requests().is_empty());
}

#[tokio::test]
async fn a_watch_is_recorded_as_watch() {
    let (server, _admin) = common::setup().await;
    let client = client_as(&server, "watcher");
    let api: Api<ConfigMap> = Api::all(client);
    let lp = kube::api::WatchParams::default().timeout(1);
    let stream = api.watch(&lp, "0").await.unwrap();
    drop(stream);
    assert_eq!(
        checks_of(&server, "watcher"),
        [check("watch", "", "configmaps", "", "", None)]
            .into_iter()
            .collect()
    );
}

#[tokio::test]
async fn writes_record_the_checks_the_apiserver_adds() {
    let (server, _admin) = common::setup().await;
    let user = "controller";
    let client = client_as(&server, user);
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let owner = maps
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "owner"}})).unwrap(),
        )
        .await
        .unwrap();
    let uid = owner.metadata.uid.clone().unwrap();
    let owner_ref = json!([{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid,
        "controller": true, "blockOwnerDeletion": true}]);
    server.clear_recorded_requests();

    // A server-side apply that creates a Secret controlled by `owner`: patch, plus create
    // (apply-create), plus update on the owner's finalizers (blockOwnerDeletion).
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "default");
    let body = json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "child", "ownerReferences": owner_ref}});
    secrets
        .patch(
            "child",
            &PatchParams::apply("test").force(),
            &Patch::Apply(&body),
        )
        .await
        .unwrap();
    assert_eq!(
        checks_of(&server, user),
        [
            check("patch", "", "secrets", "default", "child", None),
            check("create", "", "secrets", "default", "", Some("apply-create")),
            check(
                "update",
                "",
                "configmaps/finalizers",
                "default",
                "owner",
                Some("OwnerReferencesPermissionEnforcement")
            ),
        ]
        .into_iter()
        .collect()
    );

    // Applying it again changes nothing about its owners: the patch alone.
    server.clear_recorded_requests();
    secrets
        .patch(
            "child",
            &PatchParams::apply("test").force(),
            &Patch::Apply(&body),
        )
        .await
        .unwrap();
    assert_eq!(
        checks_of(&server, user),
        [check("patch", "", "secrets", "default", "child", None)]
            .into_iter()
            .collect()
    );

    // Removing the owner reference of an existing object needs delete on that object.
    server.clear_recorded_requests();
    secrets
        .patch(
            "child",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"ownerReferences": null}})),
        )
        .await
        .unwrap();
    assert_eq!(
        checks_of(&server, user),
        [
            check("patch", "", "secrets", "default", "child", None),
            check(
                "delete",
                "",
                "secrets",
                "default",
                "child",
                Some("OwnerReferencesPermissionEnforcement")
            ),
        ]
        .into_iter()
        .collect()
    );
}
