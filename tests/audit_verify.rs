//! `audit verify`: every kind of tampering is reported at the right line, and the removal of
//! the last lines is caught only against an anchor.

use std::process::Command;

use stripe_key_operator::audit::{
    Actor, Anchor, AuditEntry, AuditLog, ChainProblem, line_hash, verify_chain,
};

const BIN: &str = env!("CARGO_BIN_EXE_stripe-key-operator");

/// An intact log of `n` lines, as the lines (without newlines).
fn log_lines(n: usize) -> Vec<String> {
    let (log, sink) = AuditLog::memory();
    for i in 0..n {
        log.record(
            AuditEntry::store_write(
                Actor::resource("StripeKeyPolicy", Some("shop"), "checkout"),
                "kv/stripe/shop/checkout",
            )
            .key(&format!("apikey_{i}"), "3f2a9c0d1e4b")
            .detail("i", i),
        );
    }
    log.flush_blocking();
    sink.lines()
}

fn join(lines: &[String]) -> String {
    lines.iter().map(|l| format!("{l}\n")).collect()
}

fn verify(lines: &[String]) -> Result<stripe_key_operator::audit::VerifySummary, ChainProblem> {
    verify_chain(join(lines).as_bytes(), &Anchor::default())
}

#[test]
fn an_intact_log_verifies_with_its_count_last_seq_and_head() {
    let lines = log_lines(6);
    let summary = verify(&lines).unwrap();
    assert_eq!(summary.lines, 6);
    assert_eq!(summary.head.seq, 6);
    assert_eq!(summary.head.hash, line_hash(lines[5].as_bytes()));
    assert_eq!(
        summary.to_string(),
        format!(
            "OK: 6 lines, chain intact, last seq 6, head {}",
            summary.head.hash
        )
    );
}

#[test]
fn an_empty_log_verifies_as_zero_lines() {
    let summary = verify_chain(b"", &Anchor::default()).unwrap();
    assert_eq!(summary.lines, 0);
    assert_eq!(summary.head.seq, 0);
}

#[test]
fn an_edited_field_names_the_edited_line() {
    let mut lines = log_lines(6);
    assert!(lines[2].contains("\"outcome\":\"success\""));
    lines[2] = lines[2].replace("\"outcome\":\"success\"", "\"outcome\":\"failure\"");
    assert_eq!(
        verify(&lines),
        Err(ChainProblem::Modified {
            line: 3,
            next_line: 4
        })
    );
}

#[test]
fn an_edited_seq_is_reported_as_such() {
    let mut lines = log_lines(6);
    lines[3] = lines[3].replace("\"seq\":4", "\"seq\":9");
    assert_eq!(
        verify(&lines),
        Err(ChainProblem::SeqEdited {
            line: 4,
            seq: 9,
            expected: 4
        })
    );
}

#[test]
fn a_deleted_line_is_a_sequence_gap() {
    let mut lines = log_lines(6);
    lines.remove(2);
    assert_eq!(
        verify(&lines),
        Err(ChainProblem::Gap {
            line: 3,
            previous_seq: 2,
            seq: 4,
            missing: 1
        })
    );
}

#[test]
fn deleting_the_first_line_breaks_the_start_of_the_chain() {
    let mut lines = log_lines(4);
    lines.remove(0);
    assert_eq!(verify(&lines), Err(ChainProblem::BadStart { seq: 2 }));
}

#[test]
fn swapped_lines_are_reported_as_reordered() {
    let mut lines = log_lines(6);
    lines.swap(2, 3);
    assert_eq!(
        verify(&lines),
        Err(ChainProblem::Reordered {
            line: 3,
            previous_seq: 2,
            seq: 4,
            found_later: Some(4)
        })
    );
}

#[test]
fn a_duplicated_line_is_reported_as_reordered() {
    let mut lines = log_lines(4);
    let dup = lines[1].clone();
    lines.insert(2, dup);
    assert!(matches!(
        verify(&lines),
        Err(ChainProblem::Reordered {
            line: 3,
            seq: 2,
            ..
        })
    ));
}

#[test]
fn a_truncated_last_line_is_reported() {
    let lines = log_lines(5);
    let text = join(&lines);
    let cut = &text.as_bytes()[..text.len() - 20];
    assert_eq!(
        verify_chain(cut, &Anchor::default()),
        Err(ChainProblem::TruncatedLastLine { line: 5 })
    );
    // Even a last line that lost only its newline is incomplete.
    let no_newline = &text.as_bytes()[..text.len() - 1];
    assert_eq!(
        verify_chain(no_newline, &Anchor::default()),
        Err(ChainProblem::TruncatedLastLine { line: 5 })
    );
}

#[test]
fn a_garbage_line_is_unparsable() {
    let mut lines = log_lines(4);
    lines[1] = "not json at all".into();
    assert!(matches!(
        verify(&lines),
        Err(ChainProblem::Unparsable { line: 2, .. })
    ));
}

#[test]
fn removing_the_last_lines_is_invisible_without_an_anchor_and_caught_with_one() {
    let mut lines = log_lines(6);
    let anchor_seq = 6;
    let anchor_head = line_hash(lines[5].as_bytes());
    lines.truncate(4);

    // The limitation: what remains is a valid chain.
    assert!(verify(&lines).is_ok());

    let text = join(&lines);
    let both = Anchor {
        head: Some(anchor_head.clone()),
        seq: Some(anchor_seq),
    };
    assert_eq!(
        verify_chain(text.as_bytes(), &both),
        Err(ChainProblem::AnchorBeyondEnd {
            last_seq: 4,
            expected_seq: 6
        })
    );
    let head_only = Anchor {
        head: Some(anchor_head),
        seq: None,
    };
    assert!(matches!(
        verify_chain(text.as_bytes(), &head_only),
        Err(ChainProblem::AnchorMismatch { .. })
    ));
    let seq_only = Anchor {
        head: None,
        seq: Some(anchor_seq),
    };
    assert!(verify_chain(text.as_bytes(), &seq_only).is_err());
}

#[test]
fn an_anchor_taken_earlier_still_verifies_after_the_log_grew() {
    let lines = log_lines(8);
    let anchor = Anchor {
        head: Some(line_hash(lines[4].as_bytes())),
        seq: Some(5),
    };
    assert_eq!(
        verify_chain(join(&lines).as_bytes(), &anchor)
            .unwrap()
            .head
            .seq,
        8
    );
}

#[test]
fn an_edit_of_the_last_line_is_caught_only_by_an_anchor_on_it() {
    let mut lines = log_lines(4);
    let anchor = Anchor {
        head: Some(line_hash(lines[3].as_bytes())),
        seq: Some(4),
    };
    lines[3] = lines[3].replace("\"outcome\":\"success\"", "\"outcome\":\"failure\"");
    assert!(verify(&lines).is_ok());
    assert!(matches!(
        verify_chain(join(&lines).as_bytes(), &anchor),
        Err(ChainProblem::AnchorMismatch {
            seq: Some(4),
            found: Some(_),
            ..
        })
    ));
}

fn write_temp(lines: &[String]) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    std::fs::write(&path, join(lines)).unwrap();
    (dir, path)
}

#[test]
fn cli_prints_ok_and_exits_0_for_an_intact_log() {
    let lines = log_lines(3);
    let (_dir, path) = write_temp(&lines);
    let out = Command::new(BIN)
        .args(["audit", "verify"])
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    let head = line_hash(lines[2].as_bytes());
    assert_eq!(
        stdout.trim(),
        format!("OK: 3 lines, chain intact, last seq 3, head {head}")
    );
}

#[test]
fn cli_names_the_edited_line_and_exits_1() {
    let mut lines = log_lines(5);
    lines[1] = lines[1].replace("apikey_1", "apikey_X");
    let (_dir, path) = write_temp(&lines);
    let out = Command::new(BIN)
        .args(["audit", "verify"])
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout.contains("line 2 was modified"), "{stdout}");
}

#[test]
fn cli_detects_removed_last_lines_against_the_exported_anchor() {
    let mut lines = log_lines(5);
    let head = line_hash(lines[4].as_bytes());
    lines.pop();
    let (_dir, path) = write_temp(&lines);
    let plain = Command::new(BIN)
        .args(["audit", "verify"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(plain.status.code(), Some(0));
    let anchored = Command::new(BIN)
        .args([
            "audit",
            "verify",
            "--expect-seq",
            "5",
            "--expect-head",
            &head,
        ])
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&anchored.stdout);
    assert_eq!(anchored.status.code(), Some(1));
    assert!(
        stdout.contains("1 line(s) at the end are missing"),
        "{stdout}"
    );
}

#[test]
fn cli_exits_2_when_the_file_cannot_be_read() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["audit", "verify"])
        .arg(dir.path().join("missing.jsonl"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));
}

#[test]
fn cli_rejects_an_anchor_that_is_not_a_sha256() {
    let (_dir, path) = write_temp(&log_lines(2));
    let out = Command::new(BIN)
        .args(["audit", "verify", "--expect-head", "abc"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("64 characters"));
}
