//! `stripe-key-operator scan`: walks paths and standard input, prints masked findings, and
//! exits 0 (clean), 1 (findings) or 2 (unreadable path).

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use base64::Engine;
use rand::Rng;

const BIN: &str = env!("CARGO_BIN_EXE_stripe-key-operator");

fn secret(prefix: &str, len: usize) -> String {
    let body: String = rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(len - 3)
        .map(char::from)
        .collect();
    format!("{prefix}{body}aZ7")
}

fn scan(args: &[&str], dir: &Path) -> Output {
    Command::new(BIN)
        .arg("scan")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

fn scan_stdin(args: &[&str], input: &str) -> Output {
    let mut child = Command::new(BIN)
        .arg("scan")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn findings_in_a_tree_are_printed_masked_and_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let sk = secret("sk_live_", 24);
    let wh = secret("whsec_", 32);
    let rk = secret("rk_live_", 99);
    std::fs::create_dir_all(root.join("deploy/nested")).unwrap();
    std::fs::write(
        root.join("deploy/app.env"),
        format!("# keys\nSTRIPE_KEY={sk}\n"),
    )
    .unwrap();
    let encoded = base64::engine::general_purpose::STANDARD.encode(&rk);
    std::fs::write(
        root.join("deploy/nested/secret.yaml"),
        format!("kind: Secret\ndata:\n  key: {encoded}\n  hook: {wh}\n"),
    )
    .unwrap();
    std::fs::write(root.join("README.md"), "Keys start with sk_live_.\n").unwrap();

    let out = scan(&["."], root);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let lines: Vec<&str> = text.lines().collect();
    let tail = |s: &str| s[s.len() - 4..].to_owned();
    assert_eq!(
        lines,
        [
            format!(
                "./deploy/app.env:2:12: stripe-live-secret-key sk_live_…{}",
                tail(&sk)
            ),
            format!(
                "./deploy/nested/secret.yaml:3:8: stripe-live-restricted-key rk_live_…{} (base64)",
                tail(&rk)
            ),
            format!(
                "./deploy/nested/secret.yaml:4:9: stripe-webhook-signing-secret whsec_…{}",
                tail(&wh)
            ),
        ]
    );
    for s in [&sk, &wh, &rk, &encoded] {
        assert!(!text.contains(s.as_str()));
        assert!(!String::from_utf8_lossy(&out.stderr).contains(s.as_str()));
    }
}

#[test]
fn a_clean_tree_exits_0_with_no_output() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("a.yaml"),
        "key: whsec_...\npk: pk_live_abc\n",
    )
    .unwrap();
    let out = scan(&["a.yaml", "."], dir.path());
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(stdout(&out), "");
}

#[test]
fn git_target_binary_and_oversized_files_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let sk = secret("sk_live_", 24);
    for d in [".git", "target", "src/target"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
        std::fs::write(root.join(d).join("config"), format!("k={sk}\n")).unwrap();
    }
    let mut binary = b"\x7fELF\x00\x01".to_vec();
    binary.extend_from_slice(sk.as_bytes());
    std::fs::write(root.join("app.bin"), binary).unwrap();
    let mut big = "x\n".repeat(3 * 1024 * 1024);
    big.push_str(&sk);
    std::fs::write(root.join("big.log"), big).unwrap();
    let out = scan(&["."], root);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));

    // A file named `target` is not a directory and is scanned.
    std::fs::write(root.join("src/targetfile"), format!("k={sk}\n")).unwrap();
    let out = scan(&["."], root);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).starts_with("./src/targetfile:1:3:"));
}

#[test]
fn standard_input_is_scanned_with_a_dash() {
    let sk = secret("sk_live_", 24);
    let out = scan_stdin(&["-"], &format!("line one\nkey={sk}\n"));
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    assert!(
        text.starts_with("-:2:5: stripe-live-secret-key sk_live_…"),
        "{text}"
    );
    assert!(!text.contains(&sk));

    let out = scan_stdin(&["-"], "nothing to see\n");
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn test_keys_need_include_test() {
    let input = format!("k={}\n", secret("rk_test_", 99));
    assert_eq!(scan_stdin(&["-"], &input).status.code(), Some(0));
    let out = scan_stdin(&["--include-test", "-"], &input);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).contains("stripe-test-restricted-key rk_test_…"));
}

#[test]
fn an_unreadable_path_exits_2_but_still_reports_findings() {
    let dir = tempfile::tempdir().unwrap();
    let sk = secret("sk_live_", 24);
    std::fs::write(dir.path().join("a.env"), format!("k={sk}\n")).unwrap();
    let out = scan(&["a.env", "does-not-exist"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(stdout(&out).starts_with("a.env:1:3:"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("does-not-exist"));
}

#[test]
fn no_path_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = scan(&[], dir.path());
    assert_eq!(out.status.code(), Some(2), "clap usage errors exit 2");
}
