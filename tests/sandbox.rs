//! README command #1: `stripe-key-operator sandbox` runs the whole timeline and exits 0, and
//! nothing it prints — timeline, audit lines or debug logs — carries secret material.

use std::process::Command;

/// Stripe secret material: secret and restricted keys and webhook signing secrets.
fn secret_material(text: &str) -> Vec<String> {
    let re = regex::Regex::new(r"(sk|rk)_(test|live)_[A-Za-z0-9_]{8,}|whsec_[A-Za-z0-9+/=_]{8,}")
        .unwrap();
    re.find_iter(text)
        .map(|m| format!("{}…", &m.as_str()[..10]))
        .collect()
}

#[test]
fn sandbox_shows_the_whole_timeline_and_leaks_no_secret() {
    let out = Command::new(env!("CARGO_BIN_EXE_stripe-key-operator"))
        .arg("sandbox")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env(
            "RUST_LOG",
            "debug,hyper=info,h2=info,tower=info,rustls=info",
        )
        .env("LOG_FORMAT", "text")
        .output()
        .expect("the binary runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "sandbox failed:\n{stdout}\n{}",
        stderr.lines().rev().take(20).collect::<Vec<_>>().join("\n")
    );
    for step in [
        "key minted:",
        "synced: keys STRIPE_API_KEY",
        "rolled onto fingerprint",
        "still valid until the overlap ends",
        "publishes both keys during the overlap",
        "reason=OldKeyStillInUse",
        "expired at Stripe (simulator says: expired)",
        "incident rotation: new key",
        "canary tripped: key",
        "rotated as an incident: key",
        "canary re-minted as key",
        "in the (simulated) Stripe Dashboard",
        "Warning KeyViewed on StripeKeyPolicy",
        "webhook endpoint we_",
        "app -> broker -> Stripe: GET /v1/charges with the placeholder: HTTP 200",
        "POST /v1/payouts refused in the pod",
        "between requests;",
        ", 0 failed; no rollout",
        "permissions suggest from the broker's /usage:",
        "answered 429 in the pod (action Throttle, from spec.delivery.broker.anomaly); Warning EgressAnomaly",
        "hash chain intact",
        "sandbox complete: every step happened",
    ] {
        assert!(stdout.contains(step), "missing step {step:?} in:\n{stdout}");
    }
    let leaks = secret_material(&format!("{stdout}\n{stderr}"));
    assert!(leaks.is_empty(), "secret material in the output: {leaks:?}");
}

#[test]
fn the_leak_detector_finds_what_it_looks_for() {
    let fake = format!("{}{}", "rk_test_", "A1b2C3d4E5f6G7h8");
    assert_eq!(secret_material(&format!("token={fake}")).len(), 1);
    assert!(secret_material("fingerprint c05f042e02d3, key apikey_STGmc0U1").is_empty());
}

/// `sandbox --serve` looks like a cluster to kubectl: Table answers with the printer columns,
/// the operator's Events through core v1, OpenAPI documents. Asked over HTTP with kubectl's
/// headers, so it needs no kubectl.
#[test]
fn sandbox_serve_answers_what_kubectl_asks_for() {
    use std::io::BufRead;
    let mut child = Command::new(env!("CARGO_BIN_EXE_stripe-key-operator"))
        .args(["sandbox", "--serve"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("the binary runs");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(path) = line.trim().strip_prefix("export KUBECONFIG=") {
                let _ = tx.send(path.to_string());
            }
        }
    });
    let kubeconfig = rx.recv_timeout(std::time::Duration::from_secs(120));
    let result = std::panic::catch_unwind(|| {
        let kubeconfig = kubeconfig.expect("the sandbox prints a KUBECONFIG");
        let config = std::fs::read_to_string(&kubeconfig).unwrap();
        let url = config
            .lines()
            .find_map(|l| l.trim().strip_prefix("server: "))
            .expect("the kubeconfig names the server")
            .to_string();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let http = reqwest::Client::new();
            let get = |path: &str| {
                http.get(format!("{url}{path}"))
                    .header(
                        "Accept",
                        "application/json;as=Table;v=v1;g=meta.k8s.io,application/json",
                    )
                    .send()
            };
            let table: serde_json::Value = get("/apis/stripekeys.io/v1alpha1/stripekeypolicies")
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            assert_eq!(table["kind"], "Table", "{table}");
            let row = &table["rows"][0]["cells"];
            assert_eq!(row[0], "checkout", "{table}");
            assert_eq!(row[1], "True", "Ready: {table}");
            assert!(
                row[2].as_str().unwrap_or_default().starts_with("apikey_"),
                "Key: {table}"
            );
            let next = row[4].as_str().unwrap_or_default();
            assert!(
                chrono::DateTime::parse_from_rfc3339(next).is_ok(),
                "Next Rotation is a time: {table}"
            );
            let events: serde_json::Value = get("/api/v1/namespaces/shop/events")
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let reasons: Vec<&str> = events["rows"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|r| r["cells"][2].as_str())
                .collect();
            assert!(reasons.contains(&"KeyMinted"), "{reasons:?}");
            let openapi: serde_json::Value =
                get("/openapi/v3").await.unwrap().json().await.unwrap();
            assert!(
                openapi["paths"]["apis/stripekeys.io/v1alpha1"].is_object(),
                "{openapi}"
            );
        });
    });
    // Ctrl-C, as a person would; a kill if it does not stop.
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}
