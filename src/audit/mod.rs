//! The audit log: one JSON line per security-relevant action, hash-chained.
//!
//! Every Stripe call, store write, Secret sync, workload rollout and rotation transition becomes
//! one line such as (wrapped here):
//!
//! ```text
//! {"time":"2026-11-28T21:46:36.123456Z","seq":42,
//!  "actor":{"kind":"StripeKeyPolicy","namespace":"shop","name":"checkout","trigger":"Reconcile"},
//!  "action":"stripe.request","target":{"key_id":"apikey_61T..."},"outcome":"success",
//!  "details":{"method":"POST","path":"/v2/iam/api_keys/apikey_61T.../rotate","status":200,
//!             "request_id":"req_...","idempotency_key":"..."},
//!  "prev":"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"}
//! ```
//!
//! Fields: `time` (RFC 3339, UTC, when [`AuditLog::record`] was called), `seq` (1, 2, 3... with
//! no gaps), `actor`, `action` (a stable dotted name, see [`Action`]), `target` (ids,
//! fingerprints, store paths, objects: never a secret), `outcome` (`success` or `failure`, with a
//! short `reason` for failures), optional `details`, and `prev`: the SHA-256 (lowercase hex) of
//! the previous line's exact bytes without its newline; the first line's `prev` is
//! [`GENESIS_HASH`] (64 zeros).
//!
//! # Sinks
//! [`StdoutSink`] (standard output; the operator's own logs go to standard error), [`FileSink`]
//! (an append-only file that a restarted operator continues: the next line follows the last one,
//! so the chain stays unbroken; a line cut short by a crash is removed at start-up and an
//! `audit.recovery` entry records its length and hash), and [`MemorySink`] for tests.
//!
//! Lines are written by one thread per log; [`AuditLog::record`] only queues, so it never waits
//! for a disk. If the queue is full (the sink is stuck) the entry is dropped and counted in
//! [`AuditStats::dropped`]; if the sink fails to write, the entry is lost, counted in
//! [`AuditStats::sink_failures`] and logged, and the chain continues from the last line that
//! was written, so the stored chain stays valid.
//!
//! # What the chain proves, and what it does not
//! `stripe-key-operator audit verify FILE` ([`verify_chain`]) finds an edited line, a missing
//! line, reordered lines, an unparsable line or a cut-off last line. A chain cannot detect that
//! its **last lines were removed** (or that the very last line was edited): what remains is a
//! valid, shorter chain. Nor can it stop someone who rewrites the whole file and recomputes
//! every hash. Both need an anchor kept outside the file: the writer logs
//! `audit chain head seq=S head=H` (to standard error, i.e. the cluster's log collection) about
//! once a minute and at shutdown, and [`AuditLog::head`] returns it for export elsewhere.
//! `audit verify --expect-seq S --expect-head H` then proves the line with seq `S` is still
//! there and unchanged. Ship the file itself off the node as well: the chain is tamper-evident,
//! not tamper-proof.
//!
//! One file is one chain. Rotate it by moving it away while the operator is stopped (or by
//! restarting the operator after the move): the new file starts again at seq 1 from the genesis
//! value, so verify each file on its own and keep the old file's final head (logged at
//! shutdown) as its anchor. `copytruncate`-style rotation of a live file breaks the chain.

mod chain;
mod cli;
mod entry;
mod sink;
mod stripe_observer;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;

pub use chain::{
    Anchor, ChainHead, ChainProblem, GENESIS_HASH, VerifySummary, line_hash, verify_chain,
};
pub use cli::{AuditArgs, AuditCommand, run_cli};
pub use entry::{Action, Actor, AuditEntry, MAX_REASON_CHARS, ObjectRef, Outcome, Target};
pub use sink::{AuditSink, FileSink, MemorySink, Resume, StdoutSink};
pub use stripe_observer::{ObserveStripeCall, StripeAuditObserver, StripeCall};

/// Errors opening an audit log.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The file could not be opened, read or trimmed.
    #[error("audit log {}: {source}; check the path and that the operator may write there", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Another process (or another log in this process) holds the file's lock.
    #[error("audit log {} is locked by another writer; one log file needs exactly one writer", path.display())]
    Locked {
        /// The file.
        path: PathBuf,
    },
    /// The last line of an existing file is not an audit record, so the chain cannot continue.
    #[error("audit log {}: the last line is not an audit record ({reason}); run `stripe-key-operator audit verify` on it and move it aside", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Why the line could not be read.
        reason: String,
    },
    /// The writer thread could not be started.
    #[error("could not start the audit writer thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// Where the operator sends its audit log: `off`, `stdout`, or a file path (optionally written
/// `file:PATH`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditTarget {
    /// No audit log.
    Off,
    /// Standard output.
    Stdout,
    /// An append-only file.
    File(PathBuf),
}

impl std::str::FromStr for AuditTarget {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "" => Err("empty audit target; use off, stdout or a file path".to_owned()),
            "off" | "none" => Ok(Self::Off),
            "stdout" | "-" => Ok(Self::Stdout),
            other => Ok(Self::File(
                other.strip_prefix("file:").unwrap_or(other).into(),
            )),
        }
    }
}

/// Tuning of an [`AuditLog`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditOptions {
    /// Entries that may wait for the writer before [`AuditLog::record`] drops new ones.
    pub queue_capacity: usize,
    /// How often at most the writer logs the chain head (the anchor for `audit verify`).
    pub anchor_interval: Duration,
}

impl Default for AuditOptions {
    fn default() -> Self {
        Self {
            queue_capacity: 65_536,
            anchor_interval: Duration::from_secs(60),
        }
    }
}

/// Counters of an [`AuditLog`] (for metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AuditStats {
    /// Lines written by the sink.
    pub written: u64,
    /// Entries lost because the sink failed to write them.
    pub sink_failures: u64,
    /// Entries dropped because the queue was full or the log was closed.
    pub dropped: u64,
    /// Values replaced by the secret filter (see [`AuditEntry`]).
    pub redacted: u64,
}

#[derive(Default)]
struct Shared {
    written: AtomicU64,
    sink_failures: AtomicU64,
    dropped: AtomicU64,
    redacted: AtomicU64,
    head: Mutex<Option<ChainHead>>,
}

type Ack = Box<dyn FnOnce() + Send>;

enum Msg {
    Entry(Box<AuditEntry>, DateTime<Utc>),
    Flush(Ack),
    Close(Ack),
}

struct Inner {
    tx: Option<SyncSender<Msg>>,
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
    sink: String,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the queue ends the writer after it wrote what is queued.
        drop(self.tx.take());
        let handle = self
            .thread
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(handle) = handle {
            let _ = handle.join();
        }
    }
}

/// A handle on the audit log. Cheap to clone (clones share one writer); thread-safe.
///
/// [`record`](Self::record) queues an entry and returns at once: it never waits for the sink,
/// never fails and never panics. The writer thread stops when the last handle is dropped or
/// [`close`](Self::close) is called, after writing what was queued.
#[derive(Clone)]
pub struct AuditLog {
    inner: Option<Arc<Inner>>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.inner {
            None => f.write_str("AuditLog(disabled)"),
            Some(inner) => write!(f, "AuditLog({})", inner.sink),
        }
    }
}

impl AuditLog {
    /// A log that records nothing, for callers that do not audit.
    pub fn disabled() -> Self {
        Self { inner: None }
    }

    /// A log on standard output.
    pub fn stdout() -> Result<Self, AuditError> {
        Self::with_sink(StdoutSink)
    }

    /// A log appended to `path`, continuing the chain of an existing file.
    pub fn file(path: impl Into<PathBuf>) -> Result<Self, AuditError> {
        Self::with_sink(FileSink::open(path.into())?)
    }

    /// A log in memory, and the sink to read its lines from (tests). Panics if the writer
    /// thread cannot be started.
    pub fn memory() -> (Self, MemorySink) {
        let sink = MemorySink::new();
        let log = Self::with_sink(sink.clone()).expect("start the audit writer thread");
        (log, sink)
    }

    /// Opens the log named by `target`.
    pub fn open(target: &AuditTarget) -> Result<Self, AuditError> {
        match target {
            AuditTarget::Off => Ok(Self::disabled()),
            AuditTarget::Stdout => Self::stdout(),
            AuditTarget::File(path) => Self::file(path.clone()),
        }
    }

    /// A log on any sink, with default options.
    pub fn with_sink(sink: impl AuditSink) -> Result<Self, AuditError> {
        Self::with_sink_options(sink, AuditOptions::default())
    }

    /// A log on any sink.
    pub fn with_sink_options(
        mut sink: impl AuditSink,
        options: AuditOptions,
    ) -> Result<Self, AuditError> {
        let resume = sink.resume()?;
        let shared = Arc::new(Shared {
            head: Mutex::new(Some(resume.head.clone())),
            ..Shared::default()
        });
        let (tx, rx) = std::sync::mpsc::sync_channel(options.queue_capacity.max(1));
        let name = sink.describe();
        let writer = Writer {
            sink: Box::new(sink),
            shared: shared.clone(),
            head: resume.head,
            anchor_interval: options.anchor_interval,
            last_anchor: None,
        };
        let discarded = resume.discarded;
        let thread = std::thread::Builder::new()
            .name("audit-writer".to_owned())
            .spawn(move || writer.run(rx, discarded))
            .map_err(AuditError::Thread)?;
        Ok(Self {
            inner: Some(Arc::new(Inner {
                tx: Some(tx),
                shared,
                thread: Mutex::new(Some(thread)),
                sink: name,
            })),
        })
    }

    /// Whether this log records anything.
    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Queues `entry`. Secret-looking values are redacted first (see [`AuditEntry`]).
    pub fn record(&self, mut entry: AuditEntry) {
        let Some(inner) = &self.inner else { return };
        let time = Utc::now();
        let redacted = entry.sanitize();
        if redacted > 0 {
            inner
                .shared
                .redacted
                .fetch_add(redacted as u64, Ordering::Relaxed);
            tracing::warn!(
                action = entry.action.as_str(),
                values = redacted,
                "audit entry carried secret-looking values; they were redacted (a caller passed \
                 secret material where an id or fingerprint belongs)"
            );
        }
        let action = entry.action;
        let Some(tx) = &inner.tx else { return };
        if let Err(e) = tx.try_send(Msg::Entry(Box::new(entry), time)) {
            let n = inner.shared.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                let why = match e {
                    TrySendError::Full(_) => "the writer is behind (sink stuck?)",
                    TrySendError::Disconnected(_) => "the log is closed",
                };
                tracing::warn!(
                    action = action.as_str(),
                    dropped_total = n,
                    sink = %inner.sink,
                    "audit entry dropped: {why}"
                );
            }
        }
    }

    /// Waits until every entry queued before this call is written and flushed.
    pub async fn flush(&self) {
        let Some(inner) = &self.inner else { return };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let mut msg = Msg::Flush(Box::new(move || {
            let _ = tx.send(());
        }));
        let Some(queue) = &inner.tx else { return };
        loop {
            match queue.try_send(msg) {
                Ok(()) => break,
                Err(TrySendError::Full(m)) => {
                    msg = m;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Err(TrySendError::Disconnected(_)) => return,
            }
        }
        let _ = rx.await;
    }

    /// [`flush`](Self::flush) for synchronous code (blocks the calling thread).
    pub fn flush_blocking(&self) {
        let Some(inner) = &self.inner else { return };
        let Some(queue) = &inner.tx else { return };
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let ack: Ack = Box::new(move || {
            let _ = tx.send(());
        });
        if queue.send(Msg::Flush(ack)).is_ok() {
            let _ = rx.recv();
        }
    }

    /// Writes what is queued, logs the final chain head, closes the sink (releasing a file's
    /// lock) and stops the writer. Later entries are dropped. Blocks the calling thread.
    pub fn close(&self) {
        let Some(inner) = &self.inner else { return };
        if let Some(queue) = &inner.tx {
            let (tx, rx) = std::sync::mpsc::channel::<()>();
            let ack: Ack = Box::new(move || {
                let _ = tx.send(());
            });
            if queue.send(Msg::Close(ack)).is_ok() {
                let _ = rx.recv();
            }
        }
        let handle = inner
            .thread
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(handle) = handle {
            let _ = handle.join();
        }
    }

    /// The chain head after the last line written (`None` for a disabled log). Export it
    /// off the node as the anchor for `audit verify --expect-seq --expect-head`.
    pub fn head(&self) -> Option<ChainHead> {
        let inner = self.inner.as_ref()?;
        inner
            .shared
            .head
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The counters.
    pub fn stats(&self) -> AuditStats {
        let Some(inner) = &self.inner else {
            return AuditStats::default();
        };
        let s = &inner.shared;
        AuditStats {
            written: s.written.load(Ordering::Relaxed),
            sink_failures: s.sink_failures.load(Ordering::Relaxed),
            dropped: s.dropped.load(Ordering::Relaxed),
            redacted: s.redacted.load(Ordering::Relaxed),
        }
    }
}

#[derive(Serialize)]
struct Line<'a> {
    time: String,
    seq: u64,
    #[serde(flatten)]
    body: entry::EntryBody<'a>,
    prev: &'a str,
}

const MAX_BATCH: usize = 1024;

struct Writer {
    sink: Box<dyn AuditSink>,
    shared: Arc<Shared>,
    head: ChainHead,
    anchor_interval: Duration,
    last_anchor: Option<Instant>,
}

impl Writer {
    fn run(mut self, rx: Receiver<Msg>, discarded: Option<(u64, String)>) {
        if let Some((bytes, sha256)) = discarded {
            let entry = AuditEntry::new(Action::AuditRecovery, Actor::operator("startup"))
                .failure("incomplete last line removed (interrupted write)")
                .detail("discarded_bytes", bytes)
                .detail("discarded_sha256", sha256);
            self.write(&entry, Utc::now());
        }
        while let Ok(first) = rx.recv() {
            let mut acks = Vec::new();
            let mut close = None;
            let mut next = Some(first);
            let mut n = 0;
            while let Some(msg) = next {
                match msg {
                    Msg::Entry(entry, time) => self.write(&entry, time),
                    Msg::Flush(ack) => acks.push(ack),
                    Msg::Close(ack) => {
                        close = Some(ack);
                        break;
                    }
                }
                n += 1;
                next = if n < MAX_BATCH {
                    rx.try_recv().ok()
                } else {
                    None
                };
            }
            if let Err(e) = self.sink.flush() {
                self.shared.sink_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(sink = %self.sink.describe(), error = %e, "audit sink flush failed");
            }
            self.anchor(false);
            for ack in acks {
                ack();
            }
            if let Some(ack) = close {
                self.anchor(true);
                drop(self.sink);
                ack();
                return;
            }
        }
        self.anchor(true);
    }

    fn write(&mut self, entry: &AuditEntry, time: DateTime<Utc>) {
        let seq = self.head.seq + 1;
        let line = Line {
            time: time.to_rfc3339_opts(SecondsFormat::Micros, true),
            seq,
            body: entry.body(),
            prev: &self.head.hash,
        };
        let mut bytes = match serde_json::to_vec(&line) {
            Ok(b) => b,
            Err(e) => {
                self.shared.sink_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(action = entry.action.as_str(), error = %e, "audit entry could not be serialised");
                return;
            }
        };
        let hash = line_hash(&bytes);
        bytes.push(b'\n');
        match self.sink.write_line(&bytes) {
            Ok(()) => {
                self.head = ChainHead { seq, hash };
                *self.shared.head.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(self.head.clone());
                self.shared.written.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.shared.sink_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    action = entry.action.as_str(),
                    sink = %self.sink.describe(),
                    error = %e,
                    "audit entry lost: the sink failed to write it; the chain continues from the \
                     last written line"
                );
            }
        }
    }

    fn anchor(&mut self, force: bool) {
        let due = self
            .last_anchor
            .is_none_or(|t| t.elapsed() >= self.anchor_interval);
        if (force || due) && self.head.seq > 0 {
            self.last_anchor = Some(Instant::now());
            tracing::info!(
                sink = %self.sink.describe(),
                seq = self.head.seq,
                head = %self.head.hash,
                "audit chain head (anchor for `audit verify --expect-seq --expect-head`)"
            );
        }
    }
}
