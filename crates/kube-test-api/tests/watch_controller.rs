//! Watches, bookmarks, 410 Gone and re-list, reflectors and a real `kube::runtime::Controller`.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{eventually, setup, setup_with};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::runtime::controller::Action;
use kube::runtime::{Controller, WatchStreamExt, reflector, watcher};
use kube::{Resource, ResourceExt};
use kube_test_api::ServerConfig;
use serde_json::json;

fn cm(name: &str) -> ConfigMap {
    serde_json::from_value(
        json!({"metadata": {"name": name, "labels": {"app": "x"}}, "data": {"v": "1"}}),
    )
    .unwrap()
}

fn fast_bookmarks() -> ServerConfig {
    ServerConfig {
        bookmark_interval: Duration::from_millis(100),
        ..Default::default()
    }
}

#[tokio::test]
async fn watch_streams_changes_from_a_resource_version_with_bookmarks() {
    let (_server, client) = setup_with(fast_bookmarks()).await;
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    let before = api
        .create(&PostParams::default(), &cm("before"))
        .await
        .unwrap();
    let from = before.resource_version().unwrap();
    let mut stream = api
        .watch(&WatchParams::default().timeout(10), &from)
        .await
        .unwrap()
        .boxed();

    api.create(&PostParams::default(), &cm("a")).await.unwrap();
    api.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"v": "2"}})),
    )
    .await
    .unwrap();
    api.delete("a", &DeleteParams::default()).await.unwrap();

    let mut kinds = Vec::new();
    let mut bookmark_rv = None;
    while let Some(ev) = tokio::time::timeout(Duration::from_secs(5), stream.try_next())
        .await
        .unwrap()
        .unwrap()
    {
        match ev {
            WatchEvent::Added(o) => kinds.push(format!("ADDED {}", o.name_any())),
            WatchEvent::Modified(o) => kinds.push(format!(
                "MODIFIED {} v={}",
                o.name_any(),
                o.data.unwrap()["v"]
            )),
            WatchEvent::Deleted(o) => kinds.push(format!("DELETED {}", o.name_any())),
            WatchEvent::Bookmark(b) => {
                bookmark_rv = Some(b.metadata.resource_version);
                if kinds.len() >= 3 {
                    break;
                }
            }
            WatchEvent::Error(e) => panic!("unexpected watch error {e:?}"),
        }
    }
    assert_eq!(
        kinds,
        ["ADDED a", "MODIFIED a v=2", "DELETED a"],
        "'before' is not replayed"
    );
    let bookmark_rv: u64 = bookmark_rv.unwrap().parse().unwrap();
    assert!(bookmark_rv > from.parse::<u64>().unwrap());
}

#[tokio::test]
async fn watch_with_label_selector_sees_objects_leave_the_selection() {
    let (_server, client) = setup().await;
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    api.create(&PostParams::default(), &cm("sel"))
        .await
        .unwrap();
    let mut stream = api
        .watch(
            &WatchParams::default()
                .labels("app=x")
                .disable_bookmarks()
                .timeout(10),
            "0",
        )
        .await
        .unwrap()
        .boxed();
    match stream.try_next().await.unwrap().unwrap() {
        WatchEvent::Added(o) => assert_eq!(o.name_any(), "sel"),
        other => panic!("expected initial ADDED, got {other:?}"),
    }
    api.patch(
        "sel",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"app": "y"}}})),
    )
    .await
    .unwrap();
    match tokio::time::timeout(Duration::from_secs(5), stream.try_next())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
    {
        WatchEvent::Deleted(o) => assert_eq!(o.labels()["app"], "y"),
        other => panic!("expected DELETED when leaving the selector, got {other:?}"),
    }
}

#[tokio::test]
async fn watch_from_a_compacted_version_gets_410_expired() {
    let (server, client) = setup().await;
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    let old = api
        .create(&PostParams::default(), &cm("old"))
        .await
        .unwrap();
    api.create(&PostParams::default(), &cm("newer"))
        .await
        .unwrap();
    server.compact_watch_history();
    let mut stream = api
        .watch(
            &WatchParams::default().timeout(5),
            &old.resource_version().unwrap(),
        )
        .await
        .unwrap()
        .boxed();
    match stream.try_next().await.unwrap().unwrap() {
        WatchEvent::Error(e) => {
            assert_eq!(e.code, 410);
            assert_eq!(e.reason, "Expired");
            assert!(
                e.message.starts_with("too old resource version:"),
                "{}",
                e.message
            );
        }
        other => panic!("expected 410, got {other:?}"),
    }
}

#[tokio::test]
async fn watcher_relists_after_410_gone() {
    let (server, client) = setup().await;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    api.create(&PostParams::default(), &cm("first"))
        .await
        .unwrap();
    // Without bookmarks the watcher resumes from the last event's resourceVersion.
    let cfg = watcher::Config::default().disable_bookmarks().timeout(1);
    let mut events = watcher(api.clone(), cfg).boxed();
    let mut inits = 0;
    let mut saw_gone = false;
    let mut compacted = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while tokio::time::Instant::now() < deadline {
        let Ok(Some(ev)) = tokio::time::timeout(Duration::from_secs(5), events.next()).await else {
            break;
        };
        match ev {
            Ok(watcher::Event::Init) => inits += 1,
            Ok(watcher::Event::InitDone) if inits == 1 && !compacted => {
                // Move the global resourceVersion on with another kind, then compact.
                let other: Api<Secret> = Api::namespaced(client.clone(), "default");
                let s: Secret =
                    serde_json::from_value(json!({"metadata": {"name": "bump"}})).unwrap();
                other.create(&PostParams::default(), &s).await.unwrap();
                server.compact_watch_history();
                compacted = true;
            }
            Ok(watcher::Event::InitDone) if inits == 2 => break,
            Err(watcher::Error::WatchError(e)) if e.code == 410 => saw_gone = true,
            _ => {}
        }
    }
    assert!(saw_gone, "the watcher's resumed watch got 410");
    assert_eq!(inits, 2, "the watcher re-listed after 410");
}

#[tokio::test]
async fn reflector_store_follows_the_server() {
    let (_server, client) = setup().await;
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    api.create(&PostParams::default(), &cm("r1")).await.unwrap();
    let (reader, writer) = reflector::store();
    let stream =
        reflector(writer, watcher(api.clone(), watcher::Config::default())).applied_objects();
    let task = tokio::spawn(async move {
        stream.for_each(|_| async {}).await;
    });
    reader.wait_until_ready().await.unwrap();
    assert_eq!(reader.state().len(), 1);
    api.create(&PostParams::default(), &cm("r2")).await.unwrap();
    api.delete("r1", &DeleteParams::default()).await.unwrap();
    eventually(5, "store holds only r2", || async {
        let names: Vec<String> = reader.state().iter().map(|c| c.name_any()).collect();
        (names == ["r2"]).then_some(())
    })
    .await;
    task.abort();
}

#[tokio::test]
async fn streaming_list_watch_sends_initial_events_then_end_bookmark() {
    let (_server, client) = setup().await;
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    api.create(&PostParams::default(), &cm("s1")).await.unwrap();
    let mut events = watcher(api.clone(), watcher::Config::default().streaming_lists()).boxed();
    let mut got = Vec::new();
    while let Some(ev) = tokio::time::timeout(Duration::from_secs(5), events.next())
        .await
        .unwrap()
    {
        match ev.unwrap() {
            watcher::Event::InitApply(o) => got.push(o.name_any()),
            watcher::Event::InitDone => break,
            _ => {}
        }
    }
    assert_eq!(got, ["s1"]);
}

struct Ctx {
    client: kube::Client,
    reconciles: AtomicUsize,
}

#[derive(Debug, thiserror::Error)]
#[error("kube: {0}")]
struct ReconcileError(#[from] kube::Error);

/// A tiny controller: every labelled ConfigMap gets an owned Secret with the same data.
/// It writes only when the Secret differs (steady state makes no writes).
async fn reconcile(cm: Arc<ConfigMap>, ctx: Arc<Ctx>) -> Result<Action, ReconcileError> {
    ctx.reconciles.fetch_add(1, Ordering::SeqCst);
    let ns = cm.namespace().unwrap();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let name = format!("{}-copy", cm.name_any());
    let want = cm.data.clone().unwrap_or_default();
    if let Some(existing) = secrets.get_opt(&name).await?
        && existing.string_data.is_none()
        && existing
            .data
            .clone()
            .unwrap_or_default()
            .iter()
            .map(|(k, v)| (k.clone(), String::from_utf8_lossy(&v.0).into_owned()))
            .collect::<std::collections::BTreeMap<_, _>>()
            == want
    {
        return Ok(Action::requeue(Duration::from_millis(100)));
    }
    let owner = cm.controller_owner_ref(&()).unwrap();
    let data: std::collections::BTreeMap<String, k8s_openapi::ByteString> = want
        .iter()
        .map(|(k, v)| (k.clone(), k8s_openapi::ByteString(v.as_bytes().to_vec())))
        .collect();
    let secret = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "ownerReferences": [owner]},
        "data": data,
    });
    secrets
        .patch(
            &name,
            &PatchParams::apply("tiny-controller").force(),
            &Patch::Apply(&secret),
        )
        .await?;
    Ok(Action::requeue(Duration::from_millis(100)))
}

fn error_policy(_: Arc<ConfigMap>, _: &ReconcileError, _: Arc<Ctx>) -> Action {
    Action::requeue(Duration::from_millis(100))
}

#[tokio::test]
async fn controller_with_owns_reconciles_recreates_children_and_settles_to_zero_writes() {
    let (server, client) = setup().await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "default");
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        reconciles: AtomicUsize::new(0),
    });
    let controller = Controller::new(cms.clone(), watcher::Config::default().labels("app=x"))
        .owns(secrets.clone(), watcher::Config::default())
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|_| async {});
    let task = tokio::spawn(controller);

    cms.create(&PostParams::default(), &cm("src"))
        .await
        .unwrap();
    let copy = eventually(10, "the owned Secret is created", || async {
        secrets.get_opt("src-copy").await.unwrap()
    })
    .await;
    assert_eq!(copy.data.unwrap()["v"].0, b"1");
    assert_eq!(copy.metadata.owner_references.unwrap()[0].kind, "ConfigMap");

    // Deleting the child wakes the owner (through .owns()) and it is recreated.
    secrets
        .delete("src-copy", &DeleteParams::default())
        .await
        .unwrap();
    eventually(10, "the Secret is recreated", || async {
        secrets.get_opt("src-copy").await.unwrap()
    })
    .await;

    // A change of the parent propagates.
    cms.patch(
        "src",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"v": "2"}})),
    )
    .await
    .unwrap();
    eventually(10, "the Secret follows the ConfigMap", || async {
        let s = secrets.get_opt("src-copy").await.unwrap()?;
        (s.data?.get("v")?.0 == b"2").then_some(())
    })
    .await;

    // Steady state: reconciles keep happening (requeue), writes do not.
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.reset_counts();
    let before = ctx.reconciles.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        ctx.reconciles.load(Ordering::SeqCst) > before,
        "the controller is still reconciling"
    );
    assert_eq!(
        server.write_count("secrets"),
        0,
        "steady state makes zero writes"
    );
    assert_eq!(server.request_count("patch", "secrets"), 0);

    // Deleting the parent garbage-collects the child.
    cms.delete("src", &DeleteParams::default()).await.unwrap();
    eventually(10, "the owned Secret is collected", || async {
        secrets
            .get_opt("src-copy")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    task.abort();
}

#[tokio::test]
async fn metadata_watcher_and_get_metadata_receive_partial_objects() {
    let (_server, client) = setup().await;
    let api: Api<Secret> = Api::namespaced(client.clone(), "default");
    let s: Secret = serde_json::from_value(
        json!({"metadata": {"name": "meta", "labels": {"l": "1"}}, "stringData": {"k": "v"}}),
    )
    .unwrap();
    api.create(&PostParams::default(), &s).await.unwrap();
    let meta = api.get_metadata("meta").await.unwrap();
    assert_eq!(meta.metadata.labels.unwrap()["l"], "1");
    let mut events = watcher(
        Api::<kube::core::PartialObjectMeta<Secret>>::namespaced(client, "default"),
        watcher::Config::default(),
    )
    .boxed();
    let mut seen = Vec::new();
    while let Some(ev) = tokio::time::timeout(Duration::from_secs(5), events.next())
        .await
        .unwrap()
    {
        match ev.unwrap() {
            watcher::Event::InitApply(o) => seen.push(o.name_any()),
            watcher::Event::InitDone => break,
            _ => {}
        }
    }
    assert_eq!(seen, ["meta"]);
    api.delete("meta", &DeleteParams::default()).await.unwrap();
    let deleted = loop {
        match tokio::time::timeout(Duration::from_secs(5), events.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            watcher::Event::Delete(o) => break o,
            _ => continue,
        }
    };
    assert_eq!(deleted.name_any(), "meta");
}

#[tokio::test]
async fn event_recorder_publishes_and_updates_a_series() {
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};
    let (server, client) = setup().await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let owner = cms
        .create(&PostParams::default(), &cm("evented"))
        .await
        .unwrap();
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "tiny".into(),
            instance: None,
        },
    );
    let ev = Event {
        type_: EventType::Normal,
        reason: "Rotated".into(),
        note: Some("key rotated".into()),
        action: "Rotate".into(),
        secondary: None,
    };
    let reference = owner.object_ref(&());
    recorder.publish(&ev, &reference).await.unwrap();
    recorder.publish(&ev, &reference).await.unwrap();
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client, "default");
    let list = events.list(&Default::default()).await.unwrap();
    assert_eq!(list.items.len(), 1, "the second publish updates the series");
    let e = &list.items[0];
    assert_eq!(e.reason.as_deref(), Some("Rotated"));
    assert_eq!(e.series.as_ref().map(|s| s.count), Some(2));
    assert_eq!(server.request_count("create", "events"), 1);
    assert_eq!(server.request_count("patch", "events"), 1);
}

#[tokio::test]
async fn kube_runtime_finalizer_helper_adds_runs_cleanup_and_releases() {
    use kube::runtime::finalizer::{Event as FinalizerEvent, finalizer};
    const NAME: &str = "example.com/cleanup";
    let (_server, client) = setup().await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let cleanups = Arc::new(AtomicUsize::new(0));
    let ctx = (cms.clone(), cleanups.clone());
    let controller = Controller::new(cms.clone(), watcher::Config::default().labels("app=x"))
        .run(
            |cm: Arc<ConfigMap>, ctx: Arc<(Api<ConfigMap>, Arc<AtomicUsize>)>| async move {
                let counter = ctx.1.clone();
                finalizer(&ctx.0, NAME, cm, |ev| async move {
                    match ev {
                        FinalizerEvent::Apply(_) => Ok::<_, kube::Error>(Action::await_change()),
                        FinalizerEvent::Cleanup(_) => {
                            counter.fetch_add(1, Ordering::SeqCst);
                            Ok(Action::await_change())
                        }
                    }
                })
                .await
            },
            |_, _, _| Action::requeue(Duration::from_millis(100)),
            Arc::new(ctx),
        )
        .for_each(|_| async {});
    let task = tokio::spawn(controller);
    cms.create(&PostParams::default(), &cm("guarded"))
        .await
        .unwrap();
    eventually(10, "the finalizer is added", || async {
        let c = cms.get("guarded").await.unwrap();
        c.finalizers().iter().any(|f| f == NAME).then_some(())
    })
    .await;
    cms.delete("guarded", &DeleteParams::default())
        .await
        .unwrap();
    eventually(10, "cleanup ran and the object is gone", || async {
        cms.get_opt("guarded")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    assert_eq!(cleanups.load(Ordering::SeqCst), 1);
    task.abort();
}

#[tokio::test]
async fn watch_history_window_is_configurable_and_timeout_ends_watches() {
    let (_server, client) = setup_with(ServerConfig {
        watch_history: 2,
        ..Default::default()
    })
    .await;
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    let first = api.create(&PostParams::default(), &cm("w0")).await.unwrap();
    for i in 1..5 {
        api.create(&PostParams::default(), &cm(&format!("w{i}")))
            .await
            .unwrap();
    }
    let mut old = api
        .watch(
            &WatchParams::default().timeout(5),
            &first.resource_version().unwrap(),
        )
        .await
        .unwrap()
        .boxed();
    match old.try_next().await.unwrap().unwrap() {
        WatchEvent::Error(e) => assert_eq!(e.code, 410),
        other => panic!("expected 410 outside a 2-change window, got {other:?}"),
    }
    // Within the window the watch replays; timeoutSeconds then ends the stream.
    let latest = api.get("w3").await.unwrap().resource_version().unwrap();
    let mut recent = api
        .watch(
            &WatchParams::default().timeout(1).disable_bookmarks(),
            &latest,
        )
        .await
        .unwrap()
        .boxed();
    match recent.try_next().await.unwrap().unwrap() {
        WatchEvent::Added(o) => assert_eq!(o.name_any(), "w4"),
        other => panic!("expected the replayed ADDED w4, got {other:?}"),
    }
    let end = tokio::time::timeout(Duration::from_secs(10), recent.try_next())
        .await
        .expect("the watch ends");
    assert!(end.unwrap().is_none(), "no more events after the timeout");
}

#[tokio::test]
async fn shutdown_ends_open_watches_and_stops_serving() {
    let (server, client) = setup().await;
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    let mut stream = api
        .watch(&WatchParams::default().disable_bookmarks(), "0")
        .await
        .unwrap()
        .boxed();
    server.shutdown().await;
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stream.next().await {
                None | Some(Err(_)) => return,
                Some(Ok(_)) => continue,
            }
        }
    })
    .await;
    assert!(end.is_ok(), "the watch ended when the server shut down");
    assert!(api.get_opt("anything").await.is_err(), "no longer serving");
}

#[tokio::test]
async fn a_watch_delay_lags_only_that_resource_and_never_reads() {
    let (server, client) = setup().await;
    server.set_watch_delay("configmaps", Duration::from_millis(600));
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let secrets: Api<Secret> = Api::namespaced(client, "default");
    let from = server.resource_version().to_string();
    let mut cm_watch = cms
        .watch(&WatchParams::default().timeout(10), &from)
        .await
        .unwrap()
        .boxed();
    let mut secret_watch = secrets
        .watch(&WatchParams::default().timeout(10), &from)
        .await
        .unwrap()
        .boxed();

    let written = tokio::time::Instant::now();
    cms.create(&PostParams::default(), &cm("late"))
        .await
        .unwrap();
    let secret: Secret =
        serde_json::from_value(json!({"metadata": {"name": "prompt"}, "data": {}})).unwrap();
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    // A read sees the write at once.
    assert!(cms.get_opt("late").await.unwrap().is_some());

    let ev = tokio::time::timeout(Duration::from_secs(5), secret_watch.try_next())
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(ev, Some(WatchEvent::Added(s)) if s.name_any() == "prompt"));
    assert!(
        written.elapsed() < Duration::from_millis(500),
        "other resources are not delayed"
    );
    let ev = tokio::time::timeout(Duration::from_secs(5), cm_watch.try_next())
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(ev, Some(WatchEvent::Added(c)) if c.name_any() == "late"));
    assert!(
        written.elapsed() >= Duration::from_millis(600),
        "the delayed resource's event arrives late"
    );

    // Switched off: events are prompt again.
    server.set_watch_delay("configmaps", Duration::ZERO);
    let again = tokio::time::Instant::now();
    cms.create(&PostParams::default(), &cm("prompt-again"))
        .await
        .unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(5), cm_watch.try_next())
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(ev, Some(WatchEvent::Added(c)) if c.name_any() == "prompt-again"));
    assert!(again.elapsed() < Duration::from_millis(500));
}
