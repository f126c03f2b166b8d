//! The run store: threads, runs, and their append-only event log keyed by a gapless `seq` that
//! runs through the whole thread (run 1 holds seq 1..a, run 2 a+1..b, ...), so that every cursor
//! is a position in the thread and names exactly one run (DESIGN.md §6).
//!
//! A thread outlives its runs' payload: retention evicts finished runs (a thread's runs go oldest
//! first, so the evicted ones always hold a prefix `1..=evicted_through` of the thread's seqs),
//! while the thread's small record (organisation, agent, backend thread, that prefix) is kept for
//! `store.thread_retention`, so a conversation can be continued and a cursor into the evicted
//! prefix told apart from an unknown one.
//!
//! [`Store`] is the seam between ingestion (which appends) and the API (which reads, waits and
//! folds). It is shaped for a remote implementation from the start: async, owned values in and
//! out, batched appends and reads, no references into the store's memory. [`memory::MemoryStore`]
//! is the embedded implementation; [`redis::RedisStore`] the shared one, for many instances
//! (one writer per run under a fenced lease, takeover handed to ingestion as [`Control`]). Both
//! pass one contract suite (`tests/store_contract.rs`).
//!
//! Organisation isolation lives here too: every lookup of a thread takes the caller's
//! organisation, and a thread of another organisation is reported exactly like a missing one.

pub mod budget;
pub mod memory;
pub mod redis;

use std::fmt;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::event::{Event, NewEvent};

/// A run's id (`run_<32 hex>`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RunId(pub String);

/// A thread's id (a UUID).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ThreadId(pub String);

impl RunId {
    /// A fresh random id.
    pub fn generate() -> Self {
        RunId(format!("run_{}", uuid::Uuid::new_v4().simple()))
    }
}

impl ThreadId {
    /// A fresh random id.
    pub fn generate() -> Self {
        ThreadId(uuid::Uuid::new_v4().to_string())
    }
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for ThreadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A run's status. It moves once from `InProgress` to one terminal value and never again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// The backend is still producing events.
    InProgress,
    /// The agent finished its answer.
    Completed,
    /// A client stopped the run.
    Stopped,
    /// The backend reported an error, answered non-2xx, sent malformed data, or went away.
    Error,
    /// The backend was silent too long, or the run lasted too long.
    Timeout,
}

impl RunStatus {
    /// Every status, for metrics.
    pub const ALL: [RunStatus; 5] = [
        RunStatus::InProgress,
        RunStatus::Completed,
        RunStatus::Stopped,
        RunStatus::Error,
        RunStatus::Timeout,
    ];

    /// The wire name (`in_progress`, `completed`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::InProgress => "in_progress",
            RunStatus::Completed => "completed",
            RunStatus::Stopped => "stopped",
            RunStatus::Error => "error",
            RunStatus::Timeout => "timeout",
        }
    }

    /// Whether this status is final.
    pub fn is_terminal(self) -> bool {
        self != RunStatus::InProgress
    }
}

/// What the API knows when it starts a run.
#[derive(Clone, Debug)]
pub struct NewRun {
    /// Continue this thread, or start a new one when `None`.
    pub thread_id: Option<ThreadId>,
    /// The caller's organisation.
    pub org_id: String,
    /// The caller.
    pub user_id: String,
    /// The agent, as the client named it (a JSON number or string).
    pub agent_id: serde_json::Value,
    /// The user's message (an AI SDK `UIMessage`), as it will appear in snapshots.
    pub user_message: serde_json::Value,
    /// Idempotency key (the user message's id): a run created by the same user of the same
    /// organisation with the same key, while it is retained, is returned instead of creating
    /// another. Two users whose clients number messages alike never meet.
    pub idempotency_key: Option<String>,
    /// With no `thread_id`: the client's own conversation id (AgentFlow dialect), mapped to one
    /// thread per organisation, created on first use.
    pub conversation: Option<String>,
}

/// The outcome of [`Store::create_run`].
#[derive(Clone, Debug, PartialEq)]
pub struct Started {
    /// The run.
    pub run: RunInfo,
    /// `true` when the run already existed (same idempotency key): nothing new was started.
    pub existing: bool,
}

/// A run's metadata (no events).
#[derive(Clone, Debug, PartialEq)]
pub struct RunInfo {
    /// The run.
    pub run_id: RunId,
    /// Its thread.
    pub thread_id: ThreadId,
    /// Its organisation.
    pub org_id: String,
    /// The user who started it.
    pub user_id: String,
    /// The agent.
    pub agent_id: serde_json::Value,
    /// Current status.
    pub status: RunStatus,
    /// The error text when the run ended `error` or `timeout`.
    pub error: Option<String>,
    /// Seq the run's first event has (or will have): the thread's last seq when the run
    /// started, plus one.
    pub first_seq: u64,
    /// Seq of the run's last event (`first_seq - 1` before its first).
    pub last_seq: u64,
    /// Payload bytes held for this run.
    pub bytes: u64,
    /// When the run started.
    pub created_at: SystemTime,
    /// When the run last changed.
    pub updated_at: SystemTime,
    /// The user's message that started it (shared: reading a thread's runs does not copy it).
    pub user_message: std::sync::Arc<serde_json::Value>,
    /// Its idempotency key, if any.
    pub idempotency_key: Option<String>,
    /// The id of the assistant message this run produces (snapshots and `start.messageId`).
    pub assistant_message_id: String,
}

impl RunInfo {
    /// Whether event `seq` belongs to this run.
    pub fn holds(&self, seq: u64) -> bool {
        self.first_seq <= seq && seq <= self.last_seq
    }

    /// How many events the run has.
    pub fn events(&self) -> u64 {
        self.last_seq + 1 - self.first_seq
    }
}

/// Where a thread's conversation lives on a backend that keeps its own thread ids.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendThread {
    /// The backend (its URL, as configured).
    pub upstream: String,
    /// The backend's thread id.
    pub id: String,
}

/// How an evicted run ended (the thread keeps this of its latest run once it is evicted).
#[derive(Clone, Debug, PartialEq)]
pub struct RunOutcome {
    /// The run.
    pub run_id: RunId,
    /// Its terminal status.
    pub status: RunStatus,
    /// Its error text.
    pub error: Option<String>,
    /// When it ended.
    pub updated_at: SystemTime,
}

/// A thread and its runs' metadata, oldest run first.
#[derive(Clone, Debug, PartialEq)]
pub struct ThreadInfo {
    /// The thread.
    pub thread_id: ThreadId,
    /// Its organisation.
    pub org_id: String,
    /// Its agent.
    pub agent_id: serde_json::Value,
    /// When the thread started.
    pub created_at: SystemTime,
    /// Its runs that are still retained, oldest first (maybe none: all evicted).
    pub runs: Vec<RunInfo>,
    /// Ids of its runs already evicted (the most recent ones), so a `runId` naming one of them
    /// can be told apart from an unknown run.
    pub evicted: Vec<RunId>,
    /// How many of its runs were evicted (they were its oldest).
    pub evicted_runs: u64,
    /// The evicted runs held seq `1..=evicted_through` (0: none evicted).
    pub evicted_through: u64,
    /// How the latest evicted run ended (what a thread with no retained run reports).
    pub latest_evicted: Option<RunOutcome>,
}

/// A thread's latest retained run and its status, as a waiter saw it (`None`: no run retained).
pub type LatestRun = Option<(RunId, RunStatus)>;

impl ThreadInfo {
    /// The latest retained run and its status.
    pub fn latest_run(&self) -> LatestRun {
        self.latest().map(|r| (r.run_id.clone(), r.status))
    }

    /// The latest retained run.
    pub fn latest(&self) -> Option<&RunInfo> {
        self.runs.last()
    }

    /// The thread's last seq: its latest run's, or the end of the evicted prefix.
    pub fn last_seq(&self) -> u64 {
        self.latest().map_or(self.evicted_through, |r| r.last_seq)
    }
}

/// A batch of events read from a run's log, with the run's state at the time of the read.
#[derive(Clone, Debug, PartialEq)]
pub struct ReadBatch {
    /// Events after the cursor, in order, at most the requested number.
    pub events: Vec<Event>,
    /// The run's status when read.
    pub status: RunStatus,
    /// The run's last seq when read.
    pub last_seq: u64,
}

/// Which per-run limit was hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunLimit {
    /// `limits.max_events_per_run`
    Events,
    /// `limits.max_bytes_per_run`
    Bytes,
}

/// What the store can refuse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// No such run (or it was evicted).
    #[error("run not found")]
    RunNotFound,
    /// No such thread for this organisation.
    #[error("thread not found")]
    ThreadNotFound,
    /// The thread's latest run is still in progress.
    #[error("thread has a run in progress ({0})")]
    RunInProgress(RunId),
    /// The thread belongs to another agent.
    #[error("thread belongs to agent {0}")]
    AgentMismatch(String),
    /// The store's byte budget is exhausted.
    #[error("store is full")]
    Full {
        /// How long the client should wait before retrying.
        retry_after: Duration,
    },
    /// The run reached a per-run limit: the events that fitted were appended, the rest refused.
    #[error("run exceeds its {} limit", match .0 { RunLimit::Events => "event count", RunLimit::Bytes => "size" })]
    RunLimit(RunLimit),
    /// The run has already ended; nothing was appended.
    #[error("run already ended")]
    Finished,
    /// The store cannot be reached (a remote store down or too slow): nothing was done, or
    /// nothing is known to have been done.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// This instance no longer holds the run's lease (another instance took the run over):
    /// nothing was appended, and this instance must stop ingesting the run.
    #[error("run is ingested by another instance")]
    Fenced,
    /// The caller's organisation is at one of its quotas (`[limits.per_org]`).
    #[error("organisation is at its {} quota", .kind.as_str())]
    Quota {
        /// Which quota.
        kind: budget::QuotaKind,
        /// How long the client should wait before retrying.
        retry_after: Duration,
    },
}

/// The first events of `events`, at most `max` of them and about `max_bytes` of payload: the
/// first is always taken, whatever its size (what [`Store::read_after`] promises).
pub fn bounded<'a>(
    events: impl Iterator<Item = &'a Event>,
    max: usize,
    max_bytes: usize,
) -> Vec<Event> {
    let mut bytes = 0;
    events
        .take(max)
        .take_while(|e| {
            let first = bytes == 0;
            bytes += e.data.len().max(1);
            first || bytes <= max_bytes
        })
        .cloned()
        .collect()
}

/// The longest error text a run keeps (in bytes, cut at a character boundary).
pub const MAX_ERROR_BYTES: usize = 500;

/// An error text as a run keeps it: at most [`MAX_ERROR_BYTES`], with control characters
/// (newlines included) written as `\u{..}` escapes, so a backend's text cannot forge log lines
/// or carry a large body into every snapshot.
pub fn clip_error(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_ERROR_BYTES + 4));
    for c in text.trim().chars() {
        let piece = if c.is_control() {
            c.escape_unicode().to_string()
        } else {
            c.to_string()
        };
        if out.len() + piece.len() > MAX_ERROR_BYTES {
            out.push('…');
            break;
        }
        out.push_str(&piece);
    }
    out
}

/// What a store asks of this instance's ingestion (a shared store only; see [`Store::control`]).
#[derive(Debug)]
pub enum Control {
    /// Stop ingesting this run here, without touching its status: it was stopped through
    /// another instance, or this instance lost its lease on it.
    Cancel(RunId),
    /// This instance took the run over from an instance that went away: continue ingesting it.
    Adopt(Box<Adopted>),
}

/// A run taken over from another instance, with what is needed to continue it.
#[derive(Clone, Debug)]
pub struct Adopted {
    /// The run as it stands (in progress).
    pub run: RunInfo,
    /// The job as [`Store::save_job`] recorded it (`None`: the instance went away before
    /// recording it, so the backend's state is unknown).
    pub job: Option<serde_json::Value>,
    /// The adapter's position after the last logged event, as the last
    /// [`Store::append_marked`] recorded it (`None`: nothing marked yet).
    pub mark: Option<String>,
}

/// The run store.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Create a run (and its thread when `new.thread_id` is `None`), or return the retained run
    /// of the same organisation, user and idempotency key (atomically: concurrent retries get
    /// one run) when it is for the same agent and, if the request names a thread, that thread;
    /// a key reused for another agent or thread is a new message: a new run, which the key names
    /// from then on. A key whose run ended `error` or `timeout` starts a new run in the same
    /// thread instead (the failed one stays in its history). A client conversation id maps to
    /// one thread per organisation, created atomically on first use.
    ///
    /// Refuses an unknown or foreign thread ([`StoreError::ThreadNotFound`]), a thread whose
    /// latest run is in progress ([`StoreError::RunInProgress`]), another agent's thread, a full
    /// store ([`StoreError::Full`]: the run's record would take it past 90 %), and an
    /// organisation at its running-runs or bytes quota ([`StoreError::Quota`]).
    async fn create_run(&self, new: NewRun) -> Result<Started, StoreError>;

    /// Forget an idempotency key of `user_id` in `org_id` if it still names `run` (e.g. the backend refused
    /// the run, so a retry should try again rather than re-attach to the refusal).
    async fn forget_key(&self, org_id: &str, user_id: &str, key: &str, run: &RunId);

    /// Append events to an in-progress run, numbering them from `last_seq + 1`. Returns the new
    /// `last_seq`. Wakes every waiter of the run's thread. When the batch would take the run past
    /// a per-run limit, the events that fit are appended and [`StoreError::RunLimit`] is
    /// returned; a full store refuses the whole batch.
    async fn append(&self, run: &RunId, events: Vec<NewEvent>) -> Result<u64, StoreError>;

    /// Move a run to a terminal status, appending `final_event` first when given (atomically).
    /// Returns `false` (and changes nothing) when the run had already ended.
    async fn finish(
        &self,
        run: &RunId,
        status: RunStatus,
        error: Option<String>,
        final_event: Option<NewEvent>,
    ) -> Result<bool, StoreError>;

    /// A run's metadata.
    async fn run(&self, run: &RunId) -> Result<RunInfo, StoreError>;

    /// The thread a client's conversation id of `org_id` names (an AgentFlow `conversation_id`,
    /// an AI SDK chat id), if one was created and its record is still kept. Ids of one
    /// organisation never name another's thread.
    async fn conversation(
        &self,
        org_id: &str,
        conversation: &str,
    ) -> Result<Option<ThreadId>, StoreError>;

    /// A thread of `org_id` with its runs' metadata (it may have none left: all evicted);
    /// another organisation's thread is [`StoreError::ThreadNotFound`].
    async fn thread(&self, org_id: &str, thread: &ThreadId) -> Result<ThreadInfo, StoreError>;

    /// Wait until the thread has an event after `after`, or its latest run is no longer what
    /// the caller saw in `seen` (a new run started, or the latest ended), or `timeout` passes
    /// (`Duration::MAX`: no deadline). Holds no thread while waiting. Returns `true` when
    /// something changed, `false` when the time ran out with nothing new seen (the caller's
    /// view is then still current, as of a moment ago).
    async fn wait_thread(
        &self,
        org_id: &str,
        thread: &ThreadId,
        seen: &LatestRun,
        after: u64,
        timeout: Duration,
    ) -> Result<bool, StoreError>;

    /// The backend thread a thread's conversation continues on, if one was recorded.
    async fn backend_thread(&self, thread: &ThreadId) -> Option<BackendThread>;

    /// Record the backend thread of a thread (kept as long as the thread's record).
    async fn set_backend_thread(&self, thread: &ThreadId, backend: BackendThread);

    /// Events with `seq > after`, at most `max` of them and about `max_bytes` of payload (with
    /// `max` ≥ 1 the first is always included, whatever its size), plus the run's current state.
    async fn read_after(
        &self,
        run: &RunId,
        after: u64,
        max: usize,
        max_bytes: usize,
    ) -> Result<ReadBatch, StoreError>;

    /// Wait until the run has an event after `after` or has ended, or `timeout` passes
    /// (`Duration::MAX`: no deadline). Returns the run's last seq and status at that moment.
    /// Holds no thread while waiting.
    async fn wait(
        &self,
        run: &RunId,
        after: u64,
        timeout: Duration,
    ) -> Result<(u64, RunStatus), StoreError>;

    /// Evict finished runs whose retention has passed, and thread records with no run left
    /// whose `thread_retention` has passed. Returns how many runs were evicted.
    async fn sweep(&self) -> usize;

    /// Bytes currently held, as the budget counts them: events with their overhead, run and
    /// thread records, and whatever else shares the budget (this instance's views).
    fn bytes_held(&self) -> u64;

    /// Append like [`Store::append`], recording `mark` (the adapter's position upstream after
    /// these events: an SSE id, a poll checkpoint) atomically with them, for whoever takes the
    /// run over. A store that never hands runs over ignores it.
    async fn append_marked(
        &self,
        run: &RunId,
        events: Vec<NewEvent>,
        mark: Option<String>,
    ) -> Result<u64, StoreError> {
        let _ = mark;
        self.append(run, events).await
    }

    /// Record how to continue the run's ingestion elsewhere (the backend request, never a
    /// secret), before the backend is asked. A store that never hands runs over ignores it.
    async fn save_job(&self, run: &RunId, job: serde_json::Value) -> Result<(), StoreError> {
        let _ = (run, job);
        Ok(())
    }

    /// What the store asks of this instance's ingestion: runs to cancel or to adopt. Taken
    /// once (later calls get `None`); a store that is not shared has none.
    fn control(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<Control>> {
        None
    }

    /// Drain: give up every run this instance ingests so that other instances take them over
    /// at once (their ingestion here must then stop without ending them).
    async fn release(&self) {}

    /// Whether the store can serve requests now.
    async fn ready(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn error_texts_are_cut_and_escaped() {
        assert_eq!(clip_error("  upstream said no \n"), "upstream said no");
        assert_eq!(clip_error("a\nb\u{1b}[31m"), "a\\u{a}b\\u{1b}[31m");
        let long = clip_error(&"é".repeat(1000));
        assert!(long.len() <= MAX_ERROR_BYTES + '…'.len_utf8());
        assert!(long.ends_with('…'));
    }

    proptest! {
        #[test]
        fn a_kept_error_is_short_and_has_no_control_character(text in ".{0,800}") {
            let kept = clip_error(&text);
            prop_assert!(kept.len() <= MAX_ERROR_BYTES + '…'.len_utf8());
            prop_assert!(!kept.chars().any(char::is_control));
            // Short printable texts are kept as they are (trimmed).
            if text.len() <= MAX_ERROR_BYTES && !text.chars().any(char::is_control) {
                prop_assert_eq!(kept, text.trim());
            }
        }
    }
}
