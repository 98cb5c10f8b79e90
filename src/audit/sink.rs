//! Where audit lines go: standard output, an append-only file, or memory (tests).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::AuditError;
use super::chain::{ChainHead, line_hash, parse_link};

/// What a sink found when it was opened: where the chain continues, and what was cut off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resume {
    /// Head of the lines already stored ([`ChainHead::genesis`] for a new log).
    pub head: ChainHead,
    /// An incomplete last line removed at open (`(bytes, sha256 hex)`), from a write that
    /// was interrupted by a crash. The log records an `audit.recovery` entry about it.
    pub discarded: Option<(u64, String)>,
}

/// A destination for audit lines. Each sink is owned by the log's writer thread, so
/// implementations may block; they never see the async runtime.
pub trait AuditSink: Send + 'static {
    /// Called once before the first write: the chain state to continue from.
    fn resume(&mut self) -> Result<Resume, AuditError> {
        Ok(Resume {
            head: ChainHead::genesis(),
            discarded: None,
        })
    }

    /// Writes one line (`line` ends with `\n`). On error nothing of the line may remain.
    fn write_line(&mut self, line: &[u8]) -> io::Result<()>;

    /// Makes the lines written so far durable or visible (called after each batch).
    fn flush(&mut self) -> io::Result<()>;

    /// A short description for log messages (`stdout`, the file path, `memory`).
    fn describe(&self) -> String;
}

/// Writes each line to standard output (the operator's logs go to standard error).
#[derive(Debug, Default)]
pub struct StdoutSink;

impl AuditSink for StdoutSink {
    fn write_line(&mut self, line: &[u8]) -> io::Result<()> {
        io::stdout().lock().write_all(line)
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stdout().lock().flush()
    }

    fn describe(&self) -> String {
        "stdout".to_owned()
    }
}

/// Appends lines to a file, opened in append mode (created with mode 0600) and locked against
/// a second writer. An existing file is continued: the next line follows its last line.
#[derive(Debug)]
pub struct FileSink {
    path: PathBuf,
    file: File,
    len: u64,
}

impl FileSink {
    /// Opens (or creates) `path` for appending and takes an exclusive advisory lock on it.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, AuditError> {
        let path = path.as_ref().to_owned();
        let mut options = OpenOptions::new();
        options.read(true).append(true).create(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let io_err = |source| AuditError::Io {
            path: path.clone(),
            source,
        };
        let file = options.open(&path).map_err(io_err)?;
        file.try_lock().map_err(|e| match e {
            std::fs::TryLockError::WouldBlock => AuditError::Locked { path: path.clone() },
            std::fs::TryLockError::Error(source) => io_err(source),
        })?;
        let len = file.metadata().map_err(io_err)?.len();
        Ok(Self { path, file, len })
    }

    /// The path of the file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Reads the bytes after the last `\n` (the incomplete tail) and the last complete line.
fn read_tail(file: &mut File, len: u64) -> io::Result<Vec<u8>> {
    let mut chunk = 64 * 1024u64;
    loop {
        let start = len.saturating_sub(chunk);
        file.seek(SeekFrom::Start(start))?;
        let mut buf = Vec::with_capacity((len - start) as usize);
        Read::by_ref(file).take(len - start).read_to_end(&mut buf)?;
        // Need the newline before the last complete line (or the start of the file).
        let tail_end = buf.iter().rposition(|b| *b == b'\n');
        let line_start = match tail_end {
            Some(end) => buf[..end].iter().rposition(|b| *b == b'\n').map(|p| p + 1),
            None => None,
        };
        match line_start {
            Some(p) => return Ok(buf[p..].to_vec()),
            None if start == 0 => return Ok(buf),
            None => chunk *= 4,
        }
    }
}

impl AuditSink for FileSink {
    fn resume(&mut self) -> Result<Resume, AuditError> {
        let io_err = |source| AuditError::Io {
            path: self.path.clone(),
            source,
        };
        if self.len == 0 {
            return Ok(Resume {
                head: ChainHead::genesis(),
                discarded: None,
            });
        }
        let tail = read_tail(&mut self.file, self.len).map_err(io_err)?;
        let complete_end = tail.iter().rposition(|b| *b == b'\n').map(|p| p + 1);
        let (last_line, partial) = match complete_end {
            Some(end) => (&tail[..end - 1], &tail[end..]),
            None => (&tail[..0], &tail[..]),
        };
        let discarded = if partial.is_empty() {
            None
        } else {
            let info = (partial.len() as u64, line_hash(partial));
            let keep = self.len - partial.len() as u64;
            tracing::warn!(
                path = %self.path.display(),
                discarded_bytes = info.0,
                discarded_sha256 = %info.1,
                "audit log ends with an incomplete line (interrupted write); cutting it off and \
                 continuing the chain from the last complete line"
            );
            self.file.set_len(keep).map_err(io_err)?;
            self.len = keep;
            Some(info)
        };
        let head = if last_line.is_empty() {
            ChainHead::genesis()
        } else {
            let (seq, _) = parse_link(last_line).map_err(|reason| AuditError::Corrupt {
                path: self.path.clone(),
                reason,
            })?;
            ChainHead {
                seq,
                hash: line_hash(last_line),
            }
        };
        Ok(Resume { head, discarded })
    }

    fn write_line(&mut self, line: &[u8]) -> io::Result<()> {
        // The real length, not a counter: someone may have truncated the file meanwhile, and
        // restoring a stale length would pad it with zeros.
        let before = self.file.metadata()?.len();
        match self.file.write_all(line) {
            Ok(()) => {
                self.len = before + line.len() as u64;
                Ok(())
            }
            Err(e) => {
                // Leave no partial line behind for the next write to glue onto.
                let _ = self.file.set_len(before);
                Err(e)
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

/// Keeps lines in memory, for tests. Clones share the lines.
#[derive(Debug, Clone, Default)]
pub struct MemorySink {
    state: Arc<Mutex<MemoryState>>,
}

#[derive(Debug, Default)]
struct MemoryState {
    lines: Vec<String>,
    fail_writes: u32,
}

impl MemorySink {
    /// An empty sink.
    pub fn new() -> Self {
        Self::default()
    }

    /// The lines written so far, without their newline.
    pub fn lines(&self) -> Vec<String> {
        self.lock().lines.clone()
    }

    /// All lines joined as they would be in a file (each ending with `\n`).
    pub fn contents(&self) -> String {
        self.lock().lines.iter().map(|l| format!("{l}\n")).collect()
    }

    /// Makes the next `n` writes fail (to test failure handling).
    pub fn fail_next_writes(&self, n: u32) {
        self.lock().fail_writes = n;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl AuditSink for MemorySink {
    fn write_line(&mut self, line: &[u8]) -> io::Result<()> {
        let mut state = self.lock();
        if state.fail_writes > 0 {
            state.fail_writes -= 1;
            return Err(io::Error::other("memory sink told to fail"));
        }
        let text = String::from_utf8_lossy(line);
        state
            .lines
            .push(text.strip_suffix('\n').unwrap_or(&text).to_owned());
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn describe(&self) -> String {
        "memory".to_owned()
    }
}
