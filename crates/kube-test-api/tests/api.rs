//! CRUD, errors, selectors, paging, patches, server-side apply, status, generation, finalizers,
//! garbage collection, namespaces, workloads and request counters, through the real kube client.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{eventually, setup, setup_with, status};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::discovery::Discovery;
use kube_test_api::ServerConfig;
use serde_json::json;

fn secret(name: &str, labels: &[(&str, &str)]) -> Secret {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "labels": labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>()},
        "data": {"k": "dmFsdWU="}
    }))
    .unwrap()
}

fn deployment(name: &str, replicas: i32) -> Deployment {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": {"app": name}},
                              "spec": {"containers": [{"name": "app", "image": "nginx:1"}]}}}
    }))
    .unwrap()
}

fn rv(s: &Option<String>) -> u64 {
    s.as_deref().unwrap().parse().unwrap()
}

#[tokio::test]
async fn kube_discovery_finds_builtin_resources() {
    let (_server, client) = setup().await;
    let discovery = Discovery::new(client.clone())
        .run()
        .await
        .expect("discovery runs");
    for (group, kind) in [
        ("", "Secret"),
        ("", "Namespace"),
        ("", "ConfigMap"),
        ("", "Event"),
        ("", "Pod"),
        ("", "ServiceAccount"),
        ("apps", "Deployment"),
        ("apps", "StatefulSet"),
        ("apps", "DaemonSet"),
        ("coordination.k8s.io", "Lease"),
        ("events.k8s.io", "Event"),
        ("apiextensions.k8s.io", "CustomResourceDefinition"),
    ] {
        let g = discovery
            .get(group)
            .unwrap_or_else(|| panic!("group {group:?} discovered"));
        assert!(
            g.recommended_resources()
                .iter()
                .any(|(ar, _)| ar.kind == kind),
            "{kind} in {group:?}"
        );
    }
    let aggregated = Discovery::new(client.clone())
        .run_aggregated()
        .await
        .expect("aggregated discovery runs");
    let apps = aggregated
        .get("apps")
        .expect("apps group in aggregated discovery");
    assert!(apps.recommended_kind("Deployment").is_some());
    assert!(
        aggregated
            .get("")
            .and_then(|g| g.recommended_kind("Secret"))
            .is_some()
    );
    let version = client.apiserver_version().await.unwrap();
    assert_eq!(version.major, "1");
}

#[tokio::test]
async fn secret_crud_sets_metadata_and_bumps_resource_version() {
    let (_server, client) = setup().await;
    let api: Api<Secret> = Api::namespaced(client, "default");
    let created = api
        .create(&PostParams::default(), &secret("s1", &[]))
        .await
        .unwrap();
    let meta = &created.metadata;
    assert!(meta.uid.as_deref().is_some_and(|u| u.len() == 36));
    assert!(meta.creation_timestamp.is_some());
    assert_eq!(meta.namespace.as_deref(), Some("default"));
    assert_eq!(
        meta.generation, None,
        "core Secrets carry no generation, like the apiserver"
    );
    let rv1 = rv(&meta.resource_version);

    let got = api.get("s1").await.unwrap();
    assert_eq!(got.metadata.uid, created.metadata.uid);

    let mut changed = got.clone();
    changed.data = Some(BTreeMap::from([(
        "k".to_string(),
        ByteString(b"other".to_vec()),
    )]));
    let replaced = api
        .replace("s1", &PostParams::default(), &changed)
        .await
        .unwrap();
    assert!(rv(&replaced.metadata.resource_version) > rv1);
    assert_eq!(replaced.data.unwrap()["k"].0, b"other");

    let listed = api.list(&ListParams::default()).await.unwrap();
    assert_eq!(listed.items.len(), 1);
    assert!(rv(&listed.metadata.resource_version) >= rv(&replaced.metadata.resource_version));

    api.delete("s1", &DeleteParams::default()).await.unwrap();
    assert!(api.get_opt("s1").await.unwrap().is_none());
}

#[tokio::test]
async fn errors_are_status_objects_like_the_apiserver() {
    let (_server, client) = setup().await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "default");
    let s = status(secrets.get("x").await.unwrap_err());
    assert_eq!(
        (s.code, s.reason.as_str(), s.message.as_str()),
        (404, "NotFound", r#"secrets "x" not found"#)
    );

    let deploys: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let s = status(deploys.get("x").await.unwrap_err());
    assert_eq!(s.message, r#"deployments.apps "x" not found"#);

    secrets
        .create(&PostParams::default(), &secret("dup", &[]))
        .await
        .unwrap();
    let s = status(
        secrets
            .create(&PostParams::default(), &secret("dup", &[]))
            .await
            .unwrap_err(),
    );
    assert_eq!(
        (s.code, s.reason.as_str(), s.message.as_str()),
        (409, "AlreadyExists", r#"secrets "dup" already exists"#)
    );

    let missing_ns: Api<Secret> = Api::namespaced(client, "nope");
    let s = status(
        missing_ns
            .create(&PostParams::default(), &secret("a", &[]))
            .await
            .unwrap_err(),
    );
    assert_eq!(
        (s.code, s.message.as_str()),
        (404, r#"namespaces "nope" not found"#)
    );
}

#[tokio::test]
async fn replace_or_patch_with_stale_resource_version_conflicts() {
    let (_server, client) = setup().await;
    let api: Api<Secret> = Api::namespaced(client, "default");
    let first = api
        .create(&PostParams::default(), &secret("c", &[]))
        .await
        .unwrap();
    let mut newer = first.clone();
    newer.metadata.labels = Some(BTreeMap::from([("v".into(), "2".into())]));
    api.replace("c", &PostParams::default(), &newer)
        .await
        .unwrap();

    let s = status(
        api.replace("c", &PostParams::default(), &first)
            .await
            .unwrap_err(),
    );
    assert_eq!(s.code, 409);
    assert_eq!(s.reason, "Conflict");
    assert_eq!(
        s.message,
        r#"Operation cannot be fulfilled on secrets "c": the object has been modified; please apply your changes to the latest version and try again"#
    );
    let stale = json!({"metadata": {"resourceVersion": first.metadata.resource_version, "labels": {"v": "3"}}});
    let s = status(
        api.patch("c", &PatchParams::default(), &Patch::Merge(&stale))
            .await
            .unwrap_err(),
    );
    assert_eq!(s.code, 409);
}

#[tokio::test]
async fn label_and_field_selectors_filter_lists() {
    let (_server, client) = setup().await;
    let api: Api<Secret> = Api::namespaced(client.clone(), "default");
    for (name, env, tier) in [
        ("a", "prod", "web"),
        ("b", "dev", "web"),
        ("c", "prod", "db"),
    ] {
        api.create(
            &PostParams::default(),
            &secret(name, &[("env", env), ("tier", tier)]),
        )
        .await
        .unwrap();
    }
    api.create(&PostParams::default(), &secret("d", &[]))
        .await
        .unwrap();
    let names = |l: kube::core::ObjectList<Secret>| -> Vec<String> {
        l.items
            .into_iter()
            .map(|s| s.metadata.name.unwrap())
            .collect()
    };
    let q = |sel: &str| ListParams::default().labels(sel);
    assert_eq!(names(api.list(&q("env=prod")).await.unwrap()), ["a", "c"]);
    assert_eq!(names(api.list(&q("env!=prod")).await.unwrap()), ["b", "d"]);
    assert_eq!(
        names(api.list(&q("tier in (db,cache)")).await.unwrap()),
        ["c"]
    );
    assert_eq!(
        names(api.list(&q("tier notin (db)")).await.unwrap()),
        ["a", "b", "d"]
    );
    assert_eq!(names(api.list(&q("env")).await.unwrap()), ["a", "b", "c"]);
    assert_eq!(names(api.list(&q("!env")).await.unwrap()), ["d"]);
    assert_eq!(
        names(api.list(&q("env=prod,tier=web")).await.unwrap()),
        ["a"]
    );
    let f = ListParams::default().fields("metadata.name=b");
    assert_eq!(names(api.list(&f).await.unwrap()), ["b"]);
    let all: Api<Secret> = Api::all(client);
    let f = ListParams::default().fields("metadata.namespace!=default");
    assert!(all.list(&f).await.unwrap().items.is_empty());
}

#[tokio::test]
async fn list_pages_with_limit_and_continue() {
    let (_server, client) = setup().await;
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    for i in 0..5 {
        let cm: ConfigMap =
            serde_json::from_value(json!({"metadata": {"name": format!("cm{i}")}})).unwrap();
        api.create(&PostParams::default(), &cm).await.unwrap();
    }
    let mut seen = Vec::new();
    let mut lp = ListParams::default().limit(2);
    let mut pages = 0;
    loop {
        let page = api.list(&lp).await.unwrap();
        pages += 1;
        assert!(page.items.len() <= 2);
        seen.extend(page.items.into_iter().map(|c| c.metadata.name.unwrap()));
        match page.metadata.continue_ {
            Some(c) if !c.is_empty() => lp = lp.continue_token(&c),
            _ => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, ["cm0", "cm1", "cm2", "cm3", "cm4"]);
}

#[tokio::test]
async fn server_side_apply_creates_updates_and_records_managed_fields() {
    let (server, client) = setup().await;
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    let pp = PatchParams::apply("operator");
    let v1 = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ssa", "labels": {"a": "1"}},
                    "data": {"x": "1", "y": "2"}});
    let created = api.patch("ssa", &pp, &Patch::Apply(&v1)).await.unwrap();
    let mf = created.metadata.managed_fields.clone().unwrap();
    assert_eq!(mf.len(), 1);
    assert_eq!(mf[0].manager.as_deref(), Some("operator"));
    assert_eq!(mf[0].operation.as_deref(), Some("Apply"));
    assert_eq!(mf[0].fields_type.as_deref(), Some("FieldsV1"));
    let fields = serde_json::to_value(mf[0].fields_v1.as_ref().unwrap()).unwrap();
    assert_eq!(
        fields,
        json!({"f:data": {"f:x": {}, "f:y": {}}, "f:metadata": {"f:labels": {"f:a": {}}}})
    );

    // The same apply again changes nothing: no new resourceVersion.
    let again = api.patch("ssa", &pp, &Patch::Apply(&v1)).await.unwrap();
    assert_eq!(
        again.metadata.resource_version,
        created.metadata.resource_version
    );

    // Another manager's field survives; a field dropped from the apply is removed.
    api.patch(
        "ssa",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"other": "o"}})),
    )
    .await
    .unwrap();
    let v2 = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ssa"}, "data": {"x": "10"}});
    let updated = api.patch("ssa", &pp, &Patch::Apply(&v2)).await.unwrap();
    let data = updated.data.unwrap();
    assert_eq!(data.get("x").map(String::as_str), Some("10"));
    assert_eq!(
        data.get("y"),
        None,
        "y was owned only by operator and no longer applied"
    );
    assert_eq!(data.get("other").map(String::as_str), Some("o"));
    assert!(updated.metadata.labels.unwrap_or_default().is_empty());
    let managers: Vec<String> = updated
        .metadata
        .managed_fields
        .unwrap()
        .into_iter()
        .filter_map(|m| m.manager)
        .collect();
    assert!(
        managers.contains(&"operator".to_string()) && managers.len() == 2,
        "{managers:?}"
    );

    // A second applier changing an owned field conflicts unless forced.
    let other = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ssa"}, "data": {"x": "20"}});
    let s = status(
        api.patch(
            "ssa",
            &PatchParams::apply("intruder"),
            &Patch::Apply(&other),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(s.code, 409);
    assert_eq!(
        s.message,
        r#"Apply failed with 1 conflict: conflict with "operator": .data.x"#
    );
    let forced = api
        .patch(
            "ssa",
            &PatchParams::apply("intruder").force(),
            &Patch::Apply(&other),
        )
        .await
        .unwrap();
    assert_eq!(forced.data.unwrap()["x"], "20");
    assert_eq!(server.request_count("patch", "configmaps"), 6);
}

#[tokio::test]
async fn merge_and_json_patches_apply() {
    let (_server, client) = setup().await;
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    let cm: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "p"}, "data": {"a": "1", "b": "2"}}))
            .unwrap();
    api.create(&PostParams::default(), &cm).await.unwrap();
    let merged = api
        .patch(
            "p",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"a": null, "c": "3"}})),
        )
        .await
        .unwrap();
    assert_eq!(
        merged.data.unwrap(),
        BTreeMap::from([("b".into(), "2".into()), ("c".into(), "3".into())])
    );
    let strategic = api
        .patch(
            "p",
            &PatchParams::default(),
            &Patch::Strategic(json!({"metadata": {"labels": {"l": "v"}}})),
        )
        .await
        .unwrap();
    assert_eq!(strategic.metadata.labels.unwrap()["l"], "v");
    let ops: json_patch::Patch = serde_json::from_value(json!([
        {"op": "add", "path": "/data/d", "value": "4"},
        {"op": "replace", "path": "/data/b", "value": "20"},
        {"op": "remove", "path": "/data/c"}
    ]))
    .unwrap();
    let patched = api
        .patch("p", &PatchParams::default(), &Patch::<()>::Json(ops))
        .await
        .unwrap();
    assert_eq!(
        patched.data.unwrap(),
        BTreeMap::from([("b".into(), "20".into()), ("d".into(), "4".into())])
    );
}

#[tokio::test]
async fn status_subresource_isolates_spec_and_status_writes() {
    let (server, client) = setup().await;
    server.set_workload_stuck("default", "iso", true);
    let api: Api<Deployment> = Api::namespaced(client, "default");
    api.create(&PostParams::default(), &deployment("iso", 1))
        .await
        .unwrap();
    // A write to the main resource ignores status.
    let main = api
        .patch(
            "iso",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"replicas": 99}})),
        )
        .await
        .unwrap();
    assert_ne!(main.status.and_then(|s| s.replicas), Some(99));
    // A write to /status ignores spec.
    let st = api
        .patch_status(
            "iso",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 7}, "status": {"collisionCount": 5}})),
        )
        .await
        .unwrap();
    assert_eq!(st.spec.unwrap().replicas, Some(1));
    assert_eq!(st.status.unwrap().collision_count, Some(5));
}

#[tokio::test]
async fn generation_bumps_only_on_spec_changes() {
    let (server, client) = setup().await;
    server.set_workload_stuck("default", "gen", true);
    let api: Api<Deployment> = Api::namespaced(client, "default");
    let d = api
        .create(&PostParams::default(), &deployment("gen", 1))
        .await
        .unwrap();
    assert_eq!(d.metadata.generation, Some(1));
    let d = api
        .patch(
            "gen",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"x": "y"}}})),
        )
        .await
        .unwrap();
    assert_eq!(
        d.metadata.generation,
        Some(1),
        "metadata changes do not bump generation"
    );
    let d = api
        .patch_status(
            "gen",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"collisionCount": 1}})),
        )
        .await
        .unwrap();
    assert_eq!(
        d.metadata.generation,
        Some(1),
        "status changes do not bump generation"
    );
    let d = api
        .patch(
            "gen",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 3}})),
        )
        .await
        .unwrap();
    assert_eq!(d.metadata.generation, Some(2));
}

#[tokio::test]
async fn finalizers_hold_deletion_until_removed() {
    let (_server, client) = setup().await;
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    let cm: ConfigMap = serde_json::from_value(
        json!({"metadata": {"name": "fin", "finalizers": ["example.com/guard"]}}),
    )
    .unwrap();
    api.create(&PostParams::default(), &cm).await.unwrap();
    let deleted = api.delete("fin", &DeleteParams::default()).await.unwrap();
    let kept = deleted
        .left()
        .expect("object is kept while finalizers remain");
    assert!(kept.metadata.deletion_timestamp.is_some());
    assert_eq!(kept.metadata.deletion_grace_period_seconds, Some(0));
    assert!(api.get("fin").await.is_ok());

    let s = status(
        api.patch(
            "fin",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"finalizers": ["example.com/guard", "example.com/new"]}}),
            ),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(s.code, 422);
    assert!(
        s.message.contains(r#"metadata.finalizers: Forbidden: no new finalizers can be added if the object is being deleted, found new finalizers []string{"example.com/new"}"#),
        "{}",
        s.message
    );
    api.patch(
        "fin",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    assert!(api.get_opt("fin").await.unwrap().is_none());
}

fn owned_by(name: &str, owner: &ConfigMap) -> ConfigMap {
    serde_json::from_value(json!({"metadata": {"name": name, "ownerReferences": [{
        "apiVersion": "v1", "kind": "ConfigMap", "name": owner.metadata.name, "uid": owner.metadata.uid,
        "controller": true, "blockOwnerDeletion": true}]}}))
    .unwrap()
}

#[tokio::test]
async fn deleting_an_owner_garbage_collects_dependents_unless_orphaned() {
    let (_server, client) = setup().await;
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    let owner_a = api
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "owner-a"}})).unwrap(),
        )
        .await
        .unwrap();
    api.create(&PostParams::default(), &owned_by("child-a", &owner_a))
        .await
        .unwrap();
    let child_a = api.get("child-a").await.unwrap();
    api.create(&PostParams::default(), &owned_by("grandchild-a", &child_a))
        .await
        .unwrap();
    api.delete("owner-a", &DeleteParams::background())
        .await
        .unwrap();
    eventually(5, "child-a and grandchild-a are collected", || async {
        (api.get_opt("child-a").await.unwrap().is_none()
            && api.get_opt("grandchild-a").await.unwrap().is_none())
        .then_some(())
    })
    .await;

    let owner_b = api
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "owner-b"}})).unwrap(),
        )
        .await
        .unwrap();
    api.create(&PostParams::default(), &owned_by("child-b", &owner_b))
        .await
        .unwrap();
    api.delete("owner-b", &DeleteParams::orphan())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let orphan = api
        .get("child-b")
        .await
        .expect("orphaned dependent survives");
    assert!(
        orphan
            .metadata
            .owner_references
            .unwrap_or_default()
            .is_empty()
    );
}

#[tokio::test]
async fn a_dependent_created_with_a_missing_or_different_owner_is_collected_and_one_with_a_live_owner_stays()
 {
    let (_server, client) = setup().await;
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    let owner = api
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "owner"}})).unwrap(),
        )
        .await
        .unwrap();
    // The owner's name with another uid (a deleted and recreated owner): not its owner.
    let mut impostor = owner.clone();
    impostor.metadata.uid = Some("00000000-0000-4000-8000-000000000000".into());
    let mut gone = owner.clone();
    gone.metadata.name = Some("never-existed".into());
    gone.metadata.uid = Some("00000000-0000-4000-8000-000000000001".into());
    for (name, by) in [
        ("live", &owner),
        ("wrong-uid", &impostor),
        ("no-owner", &gone),
    ] {
        api.create(&PostParams::default(), &owned_by(name, by))
            .await
            .unwrap();
    }
    eventually(
        5,
        "the dependents without a live owner are collected",
        || async {
            (api.get_opt("wrong-uid").await.unwrap().is_none()
                && api.get_opt("no-owner").await.unwrap().is_none())
            .then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        api.get_opt("live").await.unwrap().is_some(),
        "a dependent of a live owner stays"
    );
}

#[tokio::test]
async fn deleting_a_namespace_removes_its_contents() {
    let (_server, client) = setup().await;
    let nss: Api<Namespace> = Api::all(client.clone());
    nss.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "team"}})).unwrap(),
    )
    .await
    .unwrap();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "team");
    secrets
        .create(&PostParams::default(), &secret("s", &[]))
        .await
        .unwrap();
    nss.delete("team", &DeleteParams::default()).await.unwrap();
    eventually(5, "namespace team is gone", || async {
        nss.get_opt("team").await.unwrap().is_none().then_some(())
    })
    .await;
    let s = status(secrets.get("s").await.unwrap_err());
    assert_eq!(s.code, 404);
    assert!(nss.get("default").await.is_ok() && nss.get("kube-system").await.is_ok());
}

#[tokio::test]
async fn deployment_rolls_out_after_delay_or_stays_stuck() {
    let (server, client) = setup_with(ServerConfig {
        rollout_delay: Duration::from_millis(300),
        ..Default::default()
    })
    .await;
    let api: Api<Deployment> = Api::namespaced(client, "default");
    // Record every status the Deployment goes through.
    let mut stream = api
        .watch(
            &kube::api::WatchParams::default()
                .fields("metadata.name=web")
                .timeout(20),
            "0",
        )
        .await
        .unwrap()
        .boxed();
    api.create(&PostParams::default(), &deployment("web", 3))
        .await
        .unwrap();
    let mut seen = Vec::new();
    let ready = loop {
        let ev = tokio::time::timeout(Duration::from_secs(10), stream.try_next())
            .await
            .expect("status changes arrive")
            .unwrap()
            .unwrap();
        if let kube::api::WatchEvent::Modified(d) = ev {
            let st = d.status.unwrap_or_default();
            seen.push((st.observed_generation, st.ready_replicas.unwrap_or(0)));
            if st.ready_replicas == Some(3) {
                break st;
            }
        }
    };
    // First the generation is observed with nothing ready, then all replicas become ready.
    assert_eq!(seen.first(), Some(&(Some(1), 0)), "{seen:?}");
    assert_eq!(seen.last(), Some(&(Some(1), 3)), "{seen:?}");
    assert_eq!(
        (
            ready.replicas,
            ready.updated_replicas,
            ready.available_replicas
        ),
        (Some(3), Some(3), Some(3))
    );

    server.set_workload_stuck("default", "web", true);
    api.patch(
        "web",
        &PatchParams::default(),
        &Patch::Merge(
            json!({"spec": {"template": {"metadata": {"annotations": {"rotated": "1"}}}}}),
        ),
    )
    .await
    .unwrap();
    eventually(5, "generation 2 observed", || async {
        let d = api.get("web").await.unwrap();
        d.status.filter(|s| s.observed_generation == Some(2))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let stuck = api.get("web").await.unwrap().status.unwrap();
    assert_eq!(
        stuck.ready_replicas.unwrap_or(0),
        0,
        "a stuck rollout never becomes ready"
    );
    server.set_workload_stuck("default", "web", false);
    eventually(5, "ready after unsticking", || async {
        let d = api.get("web").await.unwrap();
        d.status
            .filter(|s| s.ready_replicas == Some(3) && s.observed_generation == Some(2))
    })
    .await;
}

#[tokio::test]
async fn request_counters_count_per_verb_and_resource() {
    let (server, client) = setup().await;
    let api: Api<Secret> = Api::namespaced(client, "default");
    server.reset_counts();
    api.create(&PostParams::default(), &secret("w", &[]))
        .await
        .unwrap();
    api.get("w").await.unwrap();
    api.list(&ListParams::default()).await.unwrap();
    api.patch(
        "w",
        &PatchParams::apply("m"),
        &Patch::Apply(json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "w"}})),
    )
    .await
    .unwrap();
    let _ = api.get("missing").await;
    assert_eq!(server.request_count("create", "secrets"), 1);
    assert_eq!(server.request_count("get", "secrets"), 2);
    assert_eq!(server.request_count("list", "secrets"), 1);
    assert_eq!(server.request_count("patch", "secrets"), 1);
    assert_eq!(server.write_count("secrets"), 2);
    assert_eq!(server.write_count("configmaps"), 0);
    server.reset_counts();
    assert_eq!(server.write_count("secrets"), 0);
}

#[tokio::test]
async fn handle_puts_and_gets_objects_directly() {
    let (server, client) = setup().await;
    let stored = server
        .put(json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "direct", "namespace": "default"},
                    "stringData": {"a": "b"}}))
        .unwrap();
    assert!(stored["metadata"]["uid"].is_string());
    assert_eq!(
        stored["data"]["a"], "Yg==",
        "stringData is folded into data like the apiserver does"
    );
    assert!(stored.get("stringData").is_none());
    assert_eq!(stored["type"], "Opaque");
    let api: Api<Secret> = Api::namespaced(client, "default");
    assert!(api.get("direct").await.is_ok());
    assert!(
        server
            .get("v1", "Secret", Some("default"), "direct")
            .is_some()
    );
    assert_eq!(server.list("v1", "Secret", None).len(), 1);
    assert_eq!(
        server.write_count("secrets"),
        0,
        "handle writes are not requests"
    );
    server
        .delete("v1", "Secret", Some("default"), "direct")
        .unwrap();
    assert!(api.get_opt("direct").await.unwrap().is_none());
}

#[tokio::test]
async fn kubeconfig_yaml_connects_a_client() {
    let (server, _client) = setup().await;
    let kubeconfig = kube::config::Kubeconfig::from_yaml(&server.kubeconfig_yaml()).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    assert_eq!(config.default_namespace, "default");
    let client = kube::Client::try_from(config).unwrap();
    let nss: Api<Namespace> = Api::all(client);
    assert!(nss.get("default").await.is_ok());
}

#[tokio::test]
async fn server_side_apply_merges_containers_by_name_and_finalizers_as_a_set() {
    let (server, client) = setup().await;
    server.set_workload_stuck("default", "mix", true);
    let api: Api<Deployment> = Api::namespaced(client, "default");
    let full = serde_json::to_value(deployment("mix", 1)).unwrap();
    let mut full = full;
    full["metadata"]["finalizers"] = json!(["a.example.com/guard"]);
    api.patch("mix", &PatchParams::apply("owner"), &Patch::Apply(&full))
        .await
        .unwrap();

    // A second manager injects an env var into the existing container only.
    let inject = json!({"apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "mix", "finalizers": ["b.example.com/guard"]},
        "spec": {"template": {"spec": {"containers": [{"name": "app", "env": [{"name": "KEY", "value": "v1"}]}]}}}});
    let d = api
        .patch(
            "mix",
            &PatchParams::apply("injector"),
            &Patch::Apply(&inject),
        )
        .await
        .unwrap();
    let c = &d
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0];
    assert_eq!(
        c.image.as_deref(),
        Some("nginx:1"),
        "the owner's image survives"
    );
    assert_eq!(c.env.as_ref().unwrap()[0].name, "KEY");
    assert_eq!(
        d.metadata.finalizers.as_deref(),
        Some(
            &[
                "a.example.com/guard".to_string(),
                "b.example.com/guard".to_string()
            ][..]
        )
    );
    let injector = d
        .metadata
        .managed_fields
        .unwrap()
        .into_iter()
        .find(|m| m.manager.as_deref() == Some("injector"))
        .unwrap();
    let fields = serde_json::to_value(injector.fields_v1.unwrap()).unwrap();
    assert!(
        fields.pointer("/f:spec/f:template/f:spec/f:containers/k:{\"name\":\"app\"}/f:env/k:{\"name\":\"KEY\"}/f:value").is_some(),
        "{fields}"
    );

    // The injector stops applying its env var: it is removed, the container is not.
    let without = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "mix"},
        "spec": {"template": {"spec": {"containers": [{"name": "app"}]}}}});
    let d = api
        .patch(
            "mix",
            &PatchParams::apply("injector"),
            &Patch::Apply(&without),
        )
        .await
        .unwrap();
    let c = &d
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0];
    assert!(
        c.env.as_deref().unwrap_or_default().is_empty(),
        "{:?}",
        c.env
    );
    assert_eq!(c.image.as_deref(), Some("nginx:1"));
    assert_eq!(
        d.metadata.finalizers.as_deref(),
        Some(&["a.example.com/guard".to_string()][..])
    );
}

#[tokio::test]
async fn delete_collection_deletes_the_selected_objects() {
    let (_server, client) = setup().await;
    let api: Api<Secret> = Api::namespaced(client, "default");
    for (name, app) in [("a", "x"), ("b", "x"), ("c", "y")] {
        api.create(&PostParams::default(), &secret(name, &[("app", app)]))
            .await
            .unwrap();
    }
    api.delete_collection(
        &DeleteParams::default(),
        &ListParams::default().labels("app=x"),
    )
    .await
    .unwrap();
    let left: Vec<String> = api
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|s| s.metadata.name.unwrap())
        .collect();
    assert_eq!(left, ["c"]);
}

#[tokio::test]
async fn builtin_validation_rejects_bad_labels_keys_and_immutable_changes() {
    let (server, client) = setup().await;
    server.set_workload_stuck("default", "sel", true);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "default");
    let s = status(
        secrets
            .create(
                &PostParams::default(),
                &secret("lbl", &[("app", "not valid!")]),
            )
            .await
            .unwrap_err(),
    );
    assert_eq!(s.code, 422);
    assert!(
        s.message.starts_with(r#"Secret "lbl" is invalid: metadata.labels: Invalid value: "not valid!": a valid label must be an empty string or consist of alphanumeric characters"#),
        "{}",
        s.message
    );
    let bad_key: Secret =
        serde_json::from_value(json!({"metadata": {"name": "k"}, "stringData": {"a/b": "x"}}))
            .unwrap();
    let s = status(
        secrets
            .create(&PostParams::default(), &bad_key)
            .await
            .unwrap_err(),
    );
    assert!(
        s.message.starts_with(
            r#"Secret "k" is invalid: data[a/b]: Invalid value: "a/b": a valid config key"#
        ),
        "{}",
        s.message
    );

    let deploys: Api<Deployment> = Api::namespaced(client, "default");
    deploys
        .create(&PostParams::default(), &deployment("sel", 1))
        .await
        .unwrap();
    let s = status(
        deploys
            .patch(
                "sel",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"selector": {"matchLabels": {"app": "other"}}}})),
            )
            .await
            .unwrap_err(),
    );
    assert!(
        s.message.contains("spec.selector: Invalid value:"),
        "{}",
        s.message
    );
    assert!(s.message.contains("field is immutable"), "{}", s.message);
}

#[tokio::test]
async fn statefulsets_and_daemonsets_roll_out_too() {
    use k8s_openapi::api::apps::v1::{DaemonSet, StatefulSet};
    let (server, client) = setup_with(ServerConfig {
        rollout_delay: Duration::from_millis(50),
        ..Default::default()
    })
    .await;
    let template = json!({"metadata": {"labels": {"app": "w"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}});
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), "default");
    let s: StatefulSet = serde_json::from_value(json!({"metadata": {"name": "db"},
        "spec": {"replicas": 2, "serviceName": "db", "selector": {"matchLabels": {"app": "w"}}, "template": template}})).unwrap();
    server.set_workload_stuck("default", "db", true);
    sts.create(&PostParams::default(), &s).await.unwrap();
    let stuck = eventually(5, "statefulset generation observed", || async {
        sts.get("db")
            .await
            .unwrap()
            .status
            .filter(|st| st.observed_generation == Some(1))
    })
    .await;
    assert_eq!(stuck.ready_replicas.unwrap_or(0), 0);
    assert_ne!(
        stuck.current_revision, stuck.update_revision,
        "a stuck rollout has not reached the new revision"
    );
    server.set_workload_stuck("default", "db", false);
    let done = eventually(5, "statefulset ready", || async {
        sts.get("db")
            .await
            .unwrap()
            .status
            .filter(|st| st.ready_replicas == Some(2))
    })
    .await;
    assert_eq!(done.current_revision, done.update_revision);

    let ds: Api<DaemonSet> = Api::namespaced(client, "default");
    let d: DaemonSet = serde_json::from_value(json!({"metadata": {"name": "agent"},
        "spec": {"selector": {"matchLabels": {"app": "w"}}, "template": template}}))
    .unwrap();
    ds.create(&PostParams::default(), &d).await.unwrap();
    let st = eventually(5, "daemonset ready", || async {
        ds.get("agent")
            .await
            .unwrap()
            .status
            .filter(|st| st.number_ready == 1)
    })
    .await;
    assert_eq!(
        (st.desired_number_scheduled, st.observed_generation),
        (1, Some(1))
    );
}

/// The apiserver treats `metadata.resourceVersion` in any write body as a precondition: apply,
/// merge and JSON patches and PUT, on the object and on its `status` subresource.
#[tokio::test]
async fn every_write_with_a_stale_resource_version_conflicts_on_the_object_and_its_status() {
    let (_server, client) = setup().await;
    // A Pod: it has a status subresource and no emulated controller writing to it.
    let api: Api<Pod> = Api::namespaced(client, "default");
    let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "d"},
        "spec": {"containers": [{"name": "app", "image": "nginx:1"}]}}))
    .unwrap();
    let first = api.create(&PostParams::default(), &pod).await.unwrap();
    let stale = first.metadata.resource_version.clone().unwrap();
    // Someone else writes: `stale` is now out of date.
    api.patch(
        "d",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"v": "2"}}})),
    )
    .await
    .unwrap();
    let expected = r#"Operation cannot be fulfilled on pods "d": the object has been modified; please apply your changes to the latest version and try again"#;
    let conflict = |e: kube::Error, what: &str| {
        let s = status(e);
        assert_eq!(
            (s.code, s.reason.as_str(), s.message.as_str()),
            (409, "Conflict", expected),
            "{what}"
        );
    };
    let apply = PatchParams::apply("tester").force();
    let applied = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "d", "resourceVersion": stale, "labels": {"v": "3"}}});
    conflict(
        api.patch("d", &apply, &Patch::Apply(&applied))
            .await
            .unwrap_err(),
        "apply",
    );
    let status_apply = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "d", "resourceVersion": stale}, "status": {"message": "seven"}});
    conflict(
        api.patch_status("d", &apply, &Patch::Apply(&status_apply))
            .await
            .unwrap_err(),
        "apply to status",
    );
    let merge = json!({"metadata": {"resourceVersion": stale}, "status": {"message": "seven"}});
    conflict(
        api.patch_status("d", &PatchParams::default(), &Patch::Merge(&merge))
            .await
            .unwrap_err(),
        "merge patch of status",
    );
    conflict(
        api.patch(
            "d",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"resourceVersion": stale, "labels": {"v": "4"}}})),
        )
        .await
        .unwrap_err(),
        "merge patch",
    );
    let json_patch: json_patch::Patch = serde_json::from_value(json!([
        {"op": "replace", "path": "/metadata/resourceVersion", "value": stale},
        {"op": "replace", "path": "/metadata/labels", "value": {"v": "5"}}
    ]))
    .unwrap();
    conflict(
        api.patch("d", &PatchParams::default(), &Patch::Json::<()>(json_patch))
            .await
            .unwrap_err(),
        "JSON patch",
    );
    conflict(
        api.replace("d", &PostParams::default(), &first)
            .await
            .unwrap_err(),
        "PUT",
    );
    conflict(
        api.replace_status("d", &PostParams::default(), &first)
            .await
            .unwrap_err(),
        "PUT of status",
    );
    // Nothing of the refused writes landed.
    let now = api.get("d").await.unwrap();
    assert_eq!(now.metadata.labels.unwrap()["v"], "2");
    assert_ne!(
        now.status.and_then(|s| s.message).as_deref(),
        Some("seven"),
        "no refused status write landed"
    );
    // With the current resourceVersion every one of them goes through.
    let current = now.metadata.resource_version.unwrap();
    let status_apply = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "d", "resourceVersion": current}, "status": {"message": "seven"}});
    let written = api
        .patch_status("d", &apply, &Patch::Apply(&status_apply))
        .await
        .unwrap();
    assert_eq!(written.status.unwrap().message.as_deref(), Some("seven"));
    let current = written.metadata.resource_version.unwrap();
    api.patch(
        "d",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"resourceVersion": current, "labels": {"v": "6"}}})),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn injected_faults_fail_hang_or_delay_the_matching_requests_only() {
    let (server, client) = setup().await;
    let api: Api<Secret> = Api::namespaced(client.clone(), "default");
    api.create(&PostParams::default(), &secret("s", &[]))
        .await
        .unwrap();
    server.inject_fault("get", "secrets", kube_test_api::Fault::Status(500), Some(2));
    for _ in 0..2 {
        let s = status(api.get("s").await.unwrap_err());
        assert_eq!((s.code, s.reason.as_str()), (500, "InternalError"));
    }
    api.get("s").await.expect("the rule was used up");
    assert!(
        api.list(&ListParams::default()).await.is_ok(),
        "other verbs"
    );

    server.inject_fault("*", "secrets", kube_test_api::Fault::Hang, None);
    let hung = tokio::time::timeout(Duration::from_millis(500), api.get("s")).await;
    assert!(hung.is_err(), "a hanging request gets no answer");
    assert_eq!(
        server.request_count("get", "secrets"),
        4,
        "it counts as received"
    );
    server.clear_faults();
    api.get("s").await.unwrap();

    server.inject_fault(
        "update",
        "secrets",
        kube_test_api::Fault::Delay(Duration::from_millis(300)),
        Some(1),
    );
    let s = api.get("s").await.unwrap();
    let started = std::time::Instant::now();
    api.replace("s", &PostParams::default(), &s).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(300));
}
