//! A scanner for literal Stripe secret material in text: live secret and restricted keys,
//! webhook signing secrets and (optionally) test keys, in plain text or base64-encoded (as in
//! a Kubernetes Secret's `data:`).
//!
//! [`find_secrets`] is pure and allocation-light so that an admission webhook can call it on
//! every object. `stripe-key-operator scan` walks files with it ([`run_cli`]).
//!
//! # What counts as a secret
//! A prefix (`sk_live_`, `rk_live_`, `whsec_`, and with `include_test` also `sk_test_`,
//! `rk_test_`) that does not follow a letter or digit, followed by a token of ASCII letters and
//! digits that looks random: at least [`MIN_KEY_TOKEN`] characters for keys and
//! [`MIN_WHSEC_TOKEN`] for webhook secrets, at least 8 distinct characters, and at least two of
//! the classes upper case, lower case, digit. So `sk_live_` in prose, `whsec_...`, `whsec_xxx`,
//! `sk_live_` followed by 24 `X` and `sk_live_YOUR_KEY_HERE` are not findings, and
//! publishable keys (`pk_live_`) never are.
//!
//! Base64: every run of at least 32 base64 characters on a line is decoded and the result is
//! scanned the same way; such findings point at the start of the encoded run. Values folded
//! over several lines are not joined.
//!
//! Findings carry only a masked value: the prefix, `…` and the last four characters.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::LazyLock;

use base64::Engine;
use regex::Regex;

/// Fewest token characters after `sk_live_`/`rk_live_` (and test prefixes) for a finding.
pub const MIN_KEY_TOKEN: usize = 16;
/// Fewest token characters after `whsec_` for a finding.
pub const MIN_WHSEC_TOKEN: usize = 24;
/// Files larger than this are skipped by the CLI.
pub const MAX_FILE_BYTES: u64 = 5 * 1024 * 1024;
/// Shortest base64 run that is decoded (base64 of a 16-character key with its prefix is 32).
const MIN_BASE64_RUN: usize = 32;

/// The kind of secret found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SecretKind {
    /// `sk_live_...`
    LiveSecretKey,
    /// `rk_live_...`
    LiveRestrictedKey,
    /// `whsec_...`
    WebhookSigningSecret,
    /// `sk_test_...` (only with `include_test`)
    TestSecretKey,
    /// `rk_test_...` (only with `include_test`)
    TestRestrictedKey,
}

impl SecretKind {
    /// A stable label, e.g. `stripe-live-secret-key`.
    pub fn as_str(self) -> &'static str {
        match self {
            SecretKind::LiveSecretKey => "stripe-live-secret-key",
            SecretKind::LiveRestrictedKey => "stripe-live-restricted-key",
            SecretKind::WebhookSigningSecret => "stripe-webhook-signing-secret",
            SecretKind::TestSecretKey => "stripe-test-secret-key",
            SecretKind::TestRestrictedKey => "stripe-test-restricted-key",
        }
    }

    fn from_prefix(prefix: &str) -> Option<Self> {
        Some(match prefix {
            "sk_live_" => SecretKind::LiveSecretKey,
            "rk_live_" => SecretKind::LiveRestrictedKey,
            "whsec_" => SecretKind::WebhookSigningSecret,
            "sk_test_" => SecretKind::TestSecretKey,
            "rk_test_" => SecretKind::TestRestrictedKey,
            _ => return None,
        })
    }

    fn is_test(self) -> bool {
        matches!(
            self,
            SecretKind::TestSecretKey | SecretKind::TestRestrictedKey
        )
    }
}

impl fmt::Display for SecretKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One secret found in a text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// 1-based line number.
    pub line: usize,
    /// 1-based column, in characters, where the secret (or its base64 run) starts.
    pub column: usize,
    /// What was found.
    pub kind: SecretKind,
    /// The prefix, `…` and the last 4 characters, e.g. `sk_live_…abcd`.
    pub masked: String,
    /// Whether the secret was found inside base64-decoded data.
    pub base64: bool,
}

impl fmt::Display for Finding {
    /// `line:col: kind masked`, with ` (base64)` for encoded findings.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}: {} {}",
            self.line, self.column, self.kind, self.masked
        )?;
        if self.base64 {
            f.write_str(" (base64)")?;
        }
        Ok(())
    }
}

static SECRET: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?:sk_live_|rk_live_|sk_test_|rk_test_|whsec_)[A-Za-z0-9]*")
        .expect("static regex is valid")
});
static BASE64_RUN: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"[A-Za-z0-9+/]{32,}={0,2}").expect("static regex is valid"));

fn looks_random(token: &str, min_len: usize) -> bool {
    if token.len() < min_len {
        return false;
    }
    let (mut upper, mut lower, mut digit) = (false, false, false);
    let mut seen = [false; 128];
    let mut distinct = 0;
    for b in token.bytes() {
        upper |= b.is_ascii_uppercase();
        lower |= b.is_ascii_lowercase();
        digit |= b.is_ascii_digit();
        if !seen[b as usize & 127] {
            seen[b as usize & 127] = true;
            distinct += 1;
        }
    }
    distinct >= 8 && (upper as u8 + lower as u8 + digit as u8) >= 2
}

/// Masks a secret: its prefix, `…` and its last 4 characters.
pub fn mask(prefix: &str, token: &str) -> String {
    let tail = &token[token.len().saturating_sub(4)..];
    format!("{prefix}…{tail}")
}

/// Plain findings in one line: (byte offset, kind, masked).
fn scan_plain(line: &str, include_test: bool, out: &mut impl FnMut(usize, SecretKind, String)) {
    if !(line.contains("k_live_") || line.contains("k_test_") || line.contains("whsec_")) {
        return;
    }
    for m in SECRET.find_iter(line) {
        let start = m.start();
        if start > 0 && line.as_bytes()[start - 1].is_ascii_alphanumeric() {
            continue;
        }
        let text = m.as_str();
        let prefix_len = if text.starts_with("whsec_") { 6 } else { 8 };
        let (prefix, token) = text.split_at(prefix_len);
        let Some(kind) = SecretKind::from_prefix(prefix) else {
            continue;
        };
        if kind.is_test() && !include_test {
            continue;
        }
        let min = if kind == SecretKind::WebhookSigningSecret {
            MIN_WHSEC_TOKEN
        } else {
            MIN_KEY_TOKEN
        };
        if looks_random(token, min) {
            out(start, kind, mask(prefix, token));
        }
    }
}

/// Finds literal Stripe secret material in `text` (see the module docs for the rules). Test-mode
/// keys are reported only with `include_test`.
pub fn find_secrets(text: &str, include_test: bool) -> Vec<Finding> {
    let mut findings = Vec::new();
    let engine = &base64::engine::general_purpose::STANDARD;
    let lenient = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent)
            .with_decode_allow_trailing_bits(true),
    );
    for (i, raw) in text.split('\n').enumerate() {
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        let column = |offset: usize| line[..offset].chars().count() + 1;
        scan_plain(line, include_test, &mut |offset, kind, masked| {
            findings.push(Finding {
                line: i + 1,
                column: column(offset),
                kind,
                masked,
                base64: false,
            })
        });
        if line.len() < MIN_BASE64_RUN {
            continue;
        }
        for m in BASE64_RUN.find_iter(line) {
            let run = m.as_str();
            let decoded = engine.decode(run).or_else(|_| lenient.decode(run));
            let Ok(bytes) = decoded else { continue };
            let decoded = String::from_utf8_lossy(&bytes);
            for dline in decoded.split('\n') {
                scan_plain(dline, include_test, &mut |_, kind, masked| {
                    findings.push(Finding {
                        line: i + 1,
                        column: column(m.start()),
                        kind,
                        masked,
                        base64: true,
                    })
                });
            }
        }
    }
    findings
}

/// `stripe-key-operator scan` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct ScanArgs {
    /// Also report test-mode keys (`sk_test_`, `rk_test_`).
    #[arg(long)]
    pub include_test: bool,
    /// Files or directories to scan, or `-` for standard input.
    #[arg(required = true, value_name = "PATH")]
    pub paths: Vec<PathBuf>,
}

/// Counts of one scan.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ScanReport {
    /// Files scanned.
    pub files: usize,
    /// Findings printed.
    pub findings: usize,
    /// Paths that could not be read.
    pub errors: usize,
}

fn skip_dir(name: &std::ffi::OsStr) -> bool {
    name == ".git" || name == "target"
}

fn scan_bytes(
    name: &str,
    bytes: &[u8],
    include_test: bool,
    out: &mut dyn std::io::Write,
    report: &mut ScanReport,
) {
    report.files += 1;
    let text = String::from_utf8_lossy(bytes);
    for f in find_secrets(&text, include_test) {
        report.findings += 1;
        let _ = writeln!(out, "{name}:{f}");
    }
}

fn scan_path(
    path: &Path,
    explicit: bool,
    include_test: bool,
    out: &mut dyn std::io::Write,
    report: &mut ScanReport,
) {
    let error = |report: &mut ScanReport, what: &str, e: std::io::Error| {
        report.errors += 1;
        eprintln!("error: {}: {what}: {e}", path.display());
    };
    // Follow a symbolic link only when it was named on the command line.
    let meta = if explicit {
        std::fs::metadata(path)
    } else {
        std::fs::symlink_metadata(path)
    };
    let meta = match meta {
        Ok(m) => m,
        Err(e) => return error(report, "cannot read", e),
    };
    if meta.is_dir() {
        let entries = match std::fs::read_dir(path) {
            Ok(rd) => rd,
            Err(e) => return error(report, "cannot list directory", e),
        };
        let mut children: Vec<PathBuf> = Vec::new();
        for entry in entries {
            match entry {
                Ok(e) => children.push(e.path()),
                Err(e) => error(report, "cannot list directory", e),
            }
        }
        children.sort();
        for child in children {
            if child.file_name().is_some_and(skip_dir)
                && std::fs::symlink_metadata(&child).is_ok_and(|m| m.is_dir())
            {
                continue;
            }
            scan_path(&child, false, include_test, out, report);
        }
        return;
    }
    if !meta.is_file() || meta.len() > MAX_FILE_BYTES {
        return;
    }
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) => return error(report, "cannot read", e),
    };
    if bytes[..bytes.len().min(8192)].contains(&0) {
        return; // binary
    }
    scan_bytes(
        &path.display().to_string(),
        &bytes,
        include_test,
        out,
        report,
    );
}

/// Scans `args.paths` (files, directories, `-` for standard input), printing
/// `file:line:col: <kind> <masked>` for each finding to `out`. Skips `.git` and `target`
/// directories, binary files (a NUL byte in the first 8 KiB) and files over 5 MiB; symbolic
/// links inside directories are not followed.
pub fn scan(args: &ScanArgs, out: &mut dyn std::io::Write) -> ScanReport {
    let mut report = ScanReport::default();
    for path in &args.paths {
        if path.as_os_str() == "-" {
            let mut bytes = Vec::new();
            match std::io::stdin().lock().read_to_end(&mut bytes) {
                Ok(_) => scan_bytes("-", &bytes, args.include_test, out, &mut report),
                Err(e) => {
                    report.errors += 1;
                    eprintln!("error: standard input: {e}");
                }
            }
        } else {
            scan_path(path, true, args.include_test, out, &mut report);
        }
    }
    report
}

/// `stripe-key-operator scan`: exit status 0 when nothing was found, 1 on findings, 2 when a
/// path could not be read (findings are still printed).
pub fn run_cli(args: &ScanArgs) -> ExitCode {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let report = scan(args, &mut out);
    if report.errors > 0 {
        ExitCode::from(2)
    } else if report.findings > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
