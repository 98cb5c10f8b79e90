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
        "expired at Stripe (simulator says: expired)",
        "incident rotation: new key",
        "webhook endpoint we_",
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
