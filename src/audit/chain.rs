//! The hash chain: how a line points to its predecessor, and how a file is checked.

use serde::Deserialize;

/// The `prev` of the first line of a log: 64 zeros.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// SHA-256 (lowercase hex) of one line's exact bytes, without its terminating `\n`.
pub fn line_hash(line: &[u8]) -> String {
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, line).as_ref())
}

/// Where a chain stands: the sequence number and hash of its last line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainHead {
    /// Sequence number of the last line (0 for an empty log).
    pub seq: u64,
    /// [`line_hash`] of the last line ([`GENESIS_HASH`] for an empty log).
    pub hash: String,
}

impl ChainHead {
    /// The head of an empty log.
    pub fn genesis() -> Self {
        Self {
            seq: 0,
            hash: GENESIS_HASH.to_owned(),
        }
    }
}

/// An anchor exported earlier (from the operator's log or [`AuditLog::head`](super::AuditLog::head)):
/// the line it names must still be in the file, unchanged. This is what detects the removal of
/// the last lines, which the chain alone cannot see.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Anchor {
    /// Expected hash of the anchored line (of the line with `seq`, when both are given; of some
    /// line otherwise).
    pub head: Option<String>,
    /// Sequence number the file must reach (and, with `head`, the line `head` belongs to).
    pub seq: Option<u64>,
}

/// The result of a successful check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifySummary {
    /// Number of lines.
    pub lines: usize,
    /// The chain's head (seq 0 and [`GENESIS_HASH`] for an empty file).
    pub head: ChainHead,
}

impl std::fmt::Display for VerifySummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "OK: {} lines, chain intact, last seq {}, head {}",
            self.lines, self.head.seq, self.head.hash
        )
    }
}

/// The first problem found in an audit file. Line numbers are 1-based.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainProblem {
    /// A line is not a JSON audit record with `seq` and `prev`.
    #[error("line {line} is not an audit record ({reason}): edited or corrupted")]
    Unparsable {
        /// Line number.
        line: usize,
        /// Why it could not be read (no line content is quoted).
        reason: String,
    },
    /// The file does not end with a newline: the last line was cut short (truncated file or
    /// interrupted write).
    #[error(
        "line {line} is incomplete (no terminating newline): the file was truncated or a write was interrupted"
    )]
    TruncatedLastLine {
        /// Line number of the incomplete line.
        line: usize,
    },
    /// The content of `line` no longer hashes to the `prev` of the next line: it was edited.
    #[error(
        "line {line} was modified: its SHA-256 no longer matches the `prev` of line {next_line}"
    )]
    Modified {
        /// The edited line.
        line: usize,
        /// The line whose `prev` it no longer matches.
        next_line: usize,
    },
    /// The first line does not chain to the genesis value.
    #[error(
        "line 1 (seq {seq}) does not chain to the genesis value: earlier lines were removed or its `prev` was edited"
    )]
    BadStart {
        /// Sequence number of the first line.
        seq: u64,
    },
    /// Lines are missing: the sequence jumps forward.
    #[error("{missing} line(s) missing before line {line}: seq jumps from {previous_seq} to {seq}")]
    Gap {
        /// Line after the gap.
        line: usize,
        /// Seq of the line before the gap.
        previous_seq: u64,
        /// Seq found.
        seq: u64,
        /// How many sequence numbers are absent.
        missing: u64,
    },
    /// Lines are out of order (or duplicated): the sequence goes backwards or repeats.
    #[error("line {line} is out of order: seq {seq} after seq {previous_seq}{}", found_later.map(|l| format!(" (seq {} is at line {l})", previous_seq + 1)).unwrap_or_default())]
    Reordered {
        /// Line where the order breaks.
        line: usize,
        /// Seq of the line before.
        previous_seq: u64,
        /// Seq found.
        seq: u64,
        /// Line where the expected next seq was found, if it is further down.
        found_later: Option<usize>,
    },
    /// The line chains correctly to its predecessor but its own `seq` was changed.
    #[error("line {line} has seq {seq} where {expected} belongs, although it chains to line {}: its seq was edited", line - 1)]
    SeqEdited {
        /// Line number.
        line: usize,
        /// Seq found.
        seq: u64,
        /// Seq expected.
        expected: u64,
    },
    /// The anchor's sequence number is beyond the end of the file: the last lines were removed.
    #[error("the file ends at seq {last_seq} but the anchor expects seq {expected_seq}: {} line(s) at the end are missing", expected_seq - last_seq)]
    AnchorBeyondEnd {
        /// Last seq in the file.
        last_seq: u64,
        /// Seq of the anchor.
        expected_seq: u64,
    },
    /// The anchored line is there but its hash differs, or no line has the anchored hash.
    #[error("the anchor head {expected} {}: the log was rewritten after the anchor was taken", match (seq, found) { (Some(s), Some(f)) => format!("does not match line seq {s} (hash {f})"), _ => "matches no line of the file".to_owned() })]
    AnchorMismatch {
        /// Anchored hash.
        expected: String,
        /// Anchored seq, if given.
        seq: Option<u64>,
        /// Hash found at that seq.
        found: Option<String>,
    },
}

#[derive(Deserialize)]
struct Link {
    seq: u64,
    prev: String,
}

/// The seq and prev of one line, if it is a record.
pub(crate) fn parse_link(line: &[u8]) -> Result<(u64, String), String> {
    serde_json::from_slice::<Link>(line)
        .map(|l| (l.seq, l.prev))
        .map_err(|e| format!("{:?} error at column {}", e.classify(), e.column()))
}

/// Checks a whole audit file's bytes and reports the first problem.
///
/// Detects: edited lines (their hash no longer matches the next line's `prev`), missing lines
/// (a gap in `seq`), reordered or duplicated lines (`seq` going backwards), unparsable lines and
/// an incomplete last line. The removal of the *last* lines leaves a valid chain; only an
/// [`Anchor`] taken earlier detects it, and an edit of the very last line is likewise only
/// visible against an anchor on that line.
pub fn verify_chain(bytes: &[u8], anchor: &Anchor) -> Result<VerifySummary, ChainProblem> {
    if bytes.is_empty() {
        return check_anchor(&[], ChainHead::genesis(), anchor, 0);
    }
    let complete = bytes.ends_with(b"\n");
    let body = if complete {
        &bytes[..bytes.len() - 1]
    } else {
        bytes
    };
    let lines: Vec<&[u8]> = body.split(|b| *b == b'\n').collect();
    let links: Vec<Result<(u64, String), String>> = lines.iter().map(|l| parse_link(l)).collect();
    let mut hashes = Vec::with_capacity(lines.len());
    let mut prev_hash = GENESIS_HASH.to_owned();
    let mut prev_seq: Option<u64> = None;
    for (i, line) in lines.iter().enumerate() {
        let n = i + 1;
        if !complete && n == lines.len() {
            return Err(ChainProblem::TruncatedLastLine { line: n });
        }
        let (seq, prev) = match &links[i] {
            Ok(l) => l.clone(),
            Err(reason) => {
                return Err(ChainProblem::Unparsable {
                    line: n,
                    reason: reason.clone(),
                });
            }
        };
        let chains = prev == prev_hash;
        match prev_seq {
            None => {
                if !chains || seq != 1 {
                    if chains {
                        return Err(ChainProblem::SeqEdited {
                            line: n,
                            seq,
                            expected: 1,
                        });
                    }
                    return Err(ChainProblem::BadStart { seq });
                }
            }
            Some(ps) => {
                let expected = ps + 1;
                if seq == expected && !chains {
                    return Err(ChainProblem::Modified {
                        line: n - 1,
                        next_line: n,
                    });
                }
                if seq != expected && chains {
                    return Err(ChainProblem::SeqEdited {
                        line: n,
                        seq,
                        expected,
                    });
                }
                if seq != expected {
                    let found_later = links[i + 1..]
                        .iter()
                        .position(|l| matches!(l, Ok((s, _)) if *s == expected))
                        .map(|p| n + 1 + p);
                    if seq > expected && found_later.is_none() {
                        return Err(ChainProblem::Gap {
                            line: n,
                            previous_seq: ps,
                            seq,
                            missing: seq - expected,
                        });
                    }
                    return Err(ChainProblem::Reordered {
                        line: n,
                        previous_seq: ps,
                        seq,
                        found_later,
                    });
                }
            }
        }
        prev_hash = line_hash(line);
        hashes.push((seq, prev_hash.clone()));
        prev_seq = Some(seq);
    }
    let head = ChainHead {
        seq: prev_seq.unwrap_or(0),
        hash: prev_hash,
    };
    check_anchor(&hashes, head, anchor, lines.len())
}

fn check_anchor(
    hashes: &[(u64, String)],
    head: ChainHead,
    anchor: &Anchor,
    lines: usize,
) -> Result<VerifySummary, ChainProblem> {
    if let Some(expected_seq) = anchor.seq
        && expected_seq > head.seq
    {
        return Err(ChainProblem::AnchorBeyondEnd {
            last_seq: head.seq,
            expected_seq,
        });
    }
    if let Some(expected) = &anchor.head {
        let expected = expected.to_ascii_lowercase();
        let ok = match anchor.seq {
            Some(0) => expected == GENESIS_HASH,
            Some(s) => {
                let found = hashes.iter().find(|(q, _)| *q == s).map(|(_, h)| h.clone());
                if found.as_deref() != Some(expected.as_str()) {
                    return Err(ChainProblem::AnchorMismatch {
                        expected,
                        seq: Some(s),
                        found,
                    });
                }
                true
            }
            None => expected == GENESIS_HASH || hashes.iter().any(|(_, h)| *h == expected),
        };
        if !ok {
            return Err(ChainProblem::AnchorMismatch {
                expected,
                seq: anchor.seq,
                found: None,
            });
        }
    }
    Ok(VerifySummary { lines, head })
}
