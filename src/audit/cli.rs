//! `stripe-key-operator audit ...`

use std::path::PathBuf;
use std::process::ExitCode;

use super::{Anchor, verify_chain};

/// `audit` subcommands.
#[derive(Debug, clap::Args)]
pub struct AuditArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: AuditCommand,
}

/// Audit log tools.
#[derive(Debug, clap::Subcommand)]
pub enum AuditCommand {
    /// Check an audit log's hash chain and report the first problem.
    ///
    /// Exit status: 0 chain intact, 1 problem found, 2 file unreadable. Removal of the last lines
    /// is only detected against an anchor (`--expect-seq`, `--expect-head`) taken earlier from the
    /// operator's `audit chain head` log line.
    Verify {
        /// The audit log file.
        file: PathBuf,
        /// Hash of an anchored line (with `--expect-seq`: the line with that seq) that must
        /// still be present unchanged.
        #[arg(long, value_name = "HASH")]
        expect_head: Option<String>,
        /// Sequence number the log must reach (the anchored line's seq).
        #[arg(long, value_name = "N")]
        expect_seq: Option<u64>,
    },
}

/// Runs an `audit` subcommand; prints its result and returns the exit status.
pub fn run_cli(args: &AuditArgs) -> ExitCode {
    match &args.command {
        AuditCommand::Verify {
            file,
            expect_head,
            expect_seq,
        } => {
            if let Some(h) = expect_head
                && !(h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
            {
                eprintln!("error: --expect-head must be a SHA-256 in hex (64 characters)");
                return ExitCode::from(2);
            }
            let bytes = match std::fs::read(file) {
                Ok(b) => b,
                Err(e) => {
                    eprintln!("error: cannot read {}: {e}", file.display());
                    return ExitCode::from(2);
                }
            };
            let anchor = Anchor {
                head: expect_head.clone(),
                seq: *expect_seq,
            };
            match verify_chain(&bytes, &anchor) {
                Ok(summary) => {
                    println!("{summary}");
                    ExitCode::SUCCESS
                }
                Err(problem) => {
                    println!("FAIL: {}: {problem}", file.display());
                    ExitCode::FAILURE
                }
            }
        }
    }
}
