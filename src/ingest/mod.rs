//! Ingestion: background tasks that own a backend connection and append its events to a run.
//!
//! An [`Adapter`] speaks one backend dialect and turns what it receives into AgentFlow-shaped
//! events on the run log (see `crate::event`). The supervisor here is dialect-free: it runs the
//! adapter under the run's total time limit, records how the run ended, and closes the run in the
//! store, appending a synthetic closing event when the backend did not send one (dropped
//! connection, timeout, malformed data), so that every reader sees the end of the run in the log.
//! Clients never drive ingestion: a client that goes away does not stop a run.

pub mod agentflow;
pub mod answer;
pub mod events;
pub mod invoke;
pub mod poll;
pub mod route;
pub mod ui_message;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::event::NewEvent;
use crate::metrics;
use crate::store::{clip_error, RunInfo, RunLimit, RunStatus, Store, StoreError};

/// Everything an adapter needs to start one run on its backend.
#[derive(Clone, Debug)]
pub struct RunJob {
    /// The run, as created in the store.
    pub run: RunInfo,
    /// The agent id as the backend's path segment.
    pub agent_path: String,
    /// The request body for the backend (AgentFlow `run` request).
    pub body: serde_json::Value,
    /// The caller's bearer token, when `auth.forward_token` is on (sent with the run's request
    /// only, never with later polls: it may expire long before the run does).
    pub bearer: Option<String>,
    /// Where the thread's conversation lives on a backend with its own thread ids, if known.
    pub backend_thread: Option<crate::store::BackendThread>,
}

/// Why a run ended other than by the backend's own end or error event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The backend could not be reached.
    Connect(String),
    /// The backend answered with a non-2xx status.
    Status(u16, String),
    /// The backend sent something that is not an event we can keep.
    Malformed(String),
    /// One event was larger than `upstream.max_event_bytes`.
    EventTooLarge(usize),
    /// The connection ended before the run did.
    Dropped(String),
    /// The backend was silent longer than `upstream.idle_timeout`.
    IdleTimeout(Duration),
    /// The run lasted longer than `upstream.run_timeout`.
    RunTimeout(Duration),
    /// The run hit a per-run store limit.
    RunLimit(RunLimit),
    /// The store's byte budget is exhausted.
    StoreFull,
    /// The backend no longer knows the run (a poll answered `404`).
    Lost(String),
}

impl Failure {
    /// Every value of [`Failure::kind`].
    pub const KINDS: [&'static str; 10] = [
        "connect",
        "status",
        "malformed",
        "event_too_large",
        "dropped",
        "idle_timeout",
        "run_timeout",
        "run_limit",
        "store_full",
        "lost",
    ];

    /// Closed set of kinds, for `sluice_upstream_errors_total{kind}`.
    pub fn kind(&self) -> &'static str {
        match self {
            Failure::Connect(_) => "connect",
            Failure::Status(..) => "status",
            Failure::Malformed(_) => "malformed",
            Failure::EventTooLarge(_) => "event_too_large",
            Failure::Dropped(_) => "dropped",
            Failure::IdleTimeout(_) => "idle_timeout",
            Failure::RunTimeout(_) => "run_timeout",
            Failure::RunLimit(_) => "run_limit",
            Failure::StoreFull => "store_full",
            Failure::Lost(_) => "lost",
        }
    }

    /// The run status this failure ends in.
    pub fn status(&self) -> RunStatus {
        match self {
            Failure::IdleTimeout(_) | Failure::RunTimeout(_) => RunStatus::Timeout,
            _ => RunStatus::Error,
        }
    }

    /// Text for the snapshot and the closing event.
    pub fn message(&self) -> String {
        match self {
            Failure::Connect(e) => format!("agent backend unreachable: {e}"),
            Failure::Status(code, text) if text.is_empty() => {
                format!("agent backend answered HTTP {code}")
            }
            Failure::Status(code, text) => format!("agent backend answered HTTP {code}: {text}"),
            Failure::Malformed(e) => format!("agent backend sent a malformed event: {e}"),
            Failure::EventTooLarge(limit) => {
                format!("agent backend sent an event larger than {limit} bytes")
            }
            Failure::Dropped(e) => format!("agent backend connection ended before the run: {e}"),
            Failure::IdleTimeout(d) => format!(
                "agent backend sent nothing for {}",
                humantime::format_duration(*d)
            ),
            Failure::RunTimeout(d) => format!(
                "run exceeded its time limit of {}",
                humantime::format_duration(*d)
            ),
            Failure::RunLimit(RunLimit::Events) => "run exceeded the event limit per run".into(),
            Failure::RunLimit(RunLimit::Bytes) => "run exceeded the size limit per run".into(),
            Failure::StoreFull => "the gateway's store is full".into(),
            Failure::Lost(e) => format!("the agent backend lost the run: {e}"),
        }
    }
}

/// How a run ended, as the adapter saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ending {
    /// The backend's root `end` event, not yet in the log: the supervisor appends it and
    /// records `completed` in one store operation, so that nothing (a stop, a timeout) can come
    /// between the answer's end and the run's status.
    Completed(NewEvent),
    /// The backend's root `error` event (with this text), not yet in the log: appended with the
    /// `error` status in one store operation, like [`Ending::Completed`].
    AgentError(String, NewEvent),
    /// The backend reported that the run ended with this status (`error`, `stopped` or
    /// `timeout`) and message, without an event saying so in the log: the supervisor appends
    /// the closing event.
    Backend(RunStatus, String),
    /// Something went wrong outside the event stream.
    Failed(Failure),
    /// The run was already closed by someone else (a stop).
    Closed,
}

impl Ending {
    /// The backend's closing event this ending carries (to be logged with the status).
    pub fn closing_event(&self) -> Option<&NewEvent> {
        match self {
            Ending::Completed(e) | Ending::AgentError(_, e) => Some(e),
            _ => None,
        }
    }
}

/// What the backend said when it answered the run's request (before any event).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    /// A 2xx answer: the run is under way.
    Accepted,
    /// A non-2xx answer, with its status and error text.
    Refused(u16, String),
}

/// Appends an adapter's events to its run, counting them.
pub struct RunSink {
    store: Arc<dyn Store>,
    run: crate::store::RunId,
    admission: std::sync::Mutex<Option<tokio::sync::oneshot::Sender<Admission>>>,
}

impl RunSink {
    /// Report the backend's answer to whoever started the run (once; later calls do nothing).
    pub fn admit(&self, admission: Admission) {
        let tx = self
            .admission
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(tx) = tx {
            let _ = tx.send(admission);
        }
    }

    /// Record the backend thread the run's conversation lives on (`id` on backend `up`), for
    /// the thread's later runs.
    pub async fn remember_backend_thread(
        &self,
        thread: &crate::store::ThreadId,
        up: &crate::config::UpstreamUrl,
        id: &str,
    ) {
        if id.is_empty() {
            return;
        }
        let backend = crate::store::BackendThread {
            upstream: up.to_string(),
            id: id.to_owned(),
        };
        self.store.set_backend_thread(thread, backend).await;
    }

    /// Append a batch. A store refusal becomes the [`Ending`] the adapter should return.
    pub async fn append(&self, events: Vec<NewEvent>) -> Result<(), Ending> {
        if events.is_empty() {
            return Ok(());
        }
        let n = events.len() as u64;
        let bytes: u64 = events.iter().map(|e| e.data.len() as u64).sum();
        match self.store.append(&self.run, events).await {
            Ok(_) => {
                metrics::EVENTS_INGESTED.inc_by(n);
                metrics::EVENT_BYTES_INGESTED.inc_by(bytes);
                Ok(())
            }
            Err(StoreError::RunLimit(l)) => Err(Ending::Failed(Failure::RunLimit(l))),
            Err(StoreError::Full { .. }) => Err(Ending::Failed(Failure::StoreFull)),
            Err(StoreError::Finished) | Err(StoreError::RunNotFound) => Err(Ending::Closed),
            Err(e) => Err(Ending::Failed(Failure::Dropped(e.to_string()))),
        }
    }
}

/// One backend dialect.
#[async_trait]
pub trait Adapter: Send + Sync + 'static {
    /// Drive one run to its end: connect, send the request, append every event through `sink`.
    /// Returning (or being dropped) closes the backend connection.
    async fn run(&self, job: &RunJob, sink: &RunSink) -> Ending;
}

/// Starts runs on a backend and closes them in the store when they end.
#[derive(Clone)]
pub struct Ingestor {
    store: Arc<dyn Store>,
    adapter: Arc<dyn Adapter>,
    run_timeout: Duration,
    /// Runs being ingested here, and how to cancel each.
    running: Arc<dashmap::DashMap<crate::store::RunId, Arc<tokio::sync::Notify>>>,
}

impl Ingestor {
    /// An ingestor over one adapter.
    pub fn new(store: Arc<dyn Store>, adapter: Arc<dyn Adapter>, run_timeout: Duration) -> Self {
        Ingestor {
            store,
            adapter,
            run_timeout,
            running: Arc::new(dashmap::DashMap::new()),
        }
    }

    /// Close the backend connection of a run ingested here (after a stop). The run's status is
    /// the caller's business; the task ends without touching it.
    pub fn cancel(&self, run: &crate::store::RunId) {
        if let Some(cancel) = self.running.get(run) {
            cancel.notify_one();
        }
    }

    /// Start consuming a run in a background task on the current runtime. The task ends with the
    /// run (or when the runtime shuts down with the process). Should the task panic, a watcher
    /// ends the run with `error` so that it never stays `in_progress`. The receiver learns how
    /// the backend answered the request (dropped without a value when no answer came, e.g. the
    /// backend was unreachable).
    pub fn spawn(&self, job: RunJob) -> tokio::sync::oneshot::Receiver<Admission> {
        metrics::RUNS_STARTED.inc();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let this = self.clone();
        let run = job.run.run_id.clone();
        let task = tokio::spawn(async move { this.drive(job, Some(tx)).await });
        let (store, running) = (self.store.clone(), self.running.clone());
        tokio::spawn(async move {
            if let Err(e) = task.await {
                if e.is_panic() {
                    log::error!("run {run}: ingestion task panicked; ending the run");
                    running.remove(&run);
                    let message = "internal error in the gateway while reading the backend";
                    let closing = crate::agentflow::synthetic_error("error", message);
                    let ended = store
                        .finish(
                            &run,
                            RunStatus::Error,
                            Some(message.into()),
                            Some(NewEvent::new(closing)),
                        )
                        .await;
                    if ended == Ok(true) {
                        metrics::RUNS_ENDED.with_label_values(&["error"]).inc();
                    }
                }
            }
        });
        rx
    }

    /// Run a job to its end in the current task (what [`Ingestor::spawn`] runs).
    pub async fn drive(
        &self,
        job: RunJob,
        admission: Option<tokio::sync::oneshot::Sender<Admission>>,
    ) {
        let sink = RunSink {
            store: self.store.clone(),
            run: job.run.run_id.clone(),
            admission: std::sync::Mutex::new(admission),
        };
        let run = &job.run.run_id;
        let cancel = Arc::new(tokio::sync::Notify::new());
        self.running.insert(run.clone(), cancel.clone());
        let ending = tokio::select! {
            ended = tokio::time::timeout(self.run_timeout, self.adapter.run(&job, &sink)) => {
                match ended {
                    Ok(ending) => ending,
                    Err(_) => Ending::Failed(Failure::RunTimeout(self.run_timeout)),
                }
            }
            // Dropping the adapter's future closes the backend connection.
            _ = cancel.notified() => Ending::Closed,
        };
        self.running.remove(run);
        let closed = match ending {
            Ending::Completed(event) => {
                self.store
                    .finish(run, RunStatus::Completed, None, Some(event))
                    .await
            }
            Ending::AgentError(text, event) => {
                let text = clip_error(&text);
                self.store
                    .finish(run, RunStatus::Error, Some(text), Some(event))
                    .await
            }
            Ending::Backend(status, message) => {
                let status = if status.is_terminal() && status != RunStatus::Completed {
                    status
                } else {
                    RunStatus::Error
                };
                let message = clip_error(&message);
                log::info!(
                    "run {run} ended {} by the backend: {message}",
                    status.as_str()
                );
                let closing = crate::agentflow::synthetic_error(status.as_str(), &message);
                self.store
                    .finish(run, status, Some(message), Some(NewEvent::new(closing)))
                    .await
            }
            Ending::Failed(f) => {
                metrics::UPSTREAM_ERRORS
                    .with_label_values(&[f.kind()])
                    .inc();
                let status = f.status();
                let message = clip_error(&f.message());
                log::info!("run {run} ended {}: {message}", status.as_str());
                let closing = crate::agentflow::synthetic_error(status.as_str(), &message);
                self.store
                    .finish(run, status, Some(message), Some(NewEvent::new(closing)))
                    .await
            }
            Ending::Closed => Ok(false),
        };
        match closed {
            Ok(true) => {
                if let Ok(info) = self.store.run(run).await {
                    metrics::RUNS_ENDED
                        .with_label_values(&[info.status.as_str()])
                        .inc();
                }
            }
            Ok(false) => {}
            Err(e) => log::warn!("run {run}: could not record its end: {e}"),
        }
    }
}
