//! Ingestion: background tasks that own a backend connection and append its events to a run.
//!
//! An [`Adapter`] speaks one backend dialect and turns what it receives into AgentFlow-shaped
//! events on the run log (see `crate::event`). The supervisor here is dialect-free: it runs the
//! adapter under the run's total time limit, records how the run ended, and closes the run in the
//! store, appending a synthetic closing event when the backend did not send one (dropped
//! connection, timeout, malformed data), so that every reader sees the end of the run in the log.
//! Clients never drive ingestion: a client that goes away does not stop a run.
//!
//! Takeover (a store shared by several instances): before the backend is asked, the job is
//! recorded with [`Store::save_job`] ([`RunJob::record`], never the caller's token), and each
//! append records the adapter's position upstream (a mark: an SSE id, a poll checkpoint) with
//! [`RunSink::append_marked`]. An instance that takes a run over gets both back
//! ([`Ingestor::adopt`]) and asks the adapter to continue from the mark ([`Adapter::resume`]),
//! under the same supervisor; an adapter that cannot continue a run ends it `error`
//! ([`Failure::Unresumable`]) rather than start a second backend run. An append refused because
//! another instance holds the run ([`StoreError::Fenced`]) stops ingestion here without touching
//! the run.

pub mod agentflow;
pub mod answer;
pub mod events;
pub mod invoke;
pub mod poll;
pub mod route;
#[cfg(test)]
pub(crate) mod testing;
pub mod ui_message;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::event::NewEvent;
use crate::metrics;
use crate::store::{
    clip_error, Adopted, BackendThread, RunId, RunInfo, RunLimit, RunStatus, Store, StoreError,
};

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

/// What [`Store::save_job`] keeps of a [`RunJob`] ([`RunJob::record`]): the job without its run
/// (the store has it) and without the caller's token (a secret, and expired by the time another
/// instance needs the record).
#[derive(Debug, Serialize, Deserialize)]
struct JobRecord {
    agent_path: String,
    body: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    backend_thread: Option<ThreadRecord>,
}

#[derive(Debug, Serialize, Deserialize)]
struct ThreadRecord {
    upstream: String,
    id: String,
}

impl RunJob {
    /// The record of this job for [`Store::save_job`]: `{agent_path, body, backend_thread?:
    /// {upstream, id}}`. Never the bearer token.
    pub fn record(&self) -> serde_json::Value {
        let record = JobRecord {
            agent_path: self.agent_path.clone(),
            body: self.body.clone(),
            backend_thread: self.backend_thread.as_ref().map(|b| ThreadRecord {
                upstream: b.upstream.clone(),
                id: b.id.clone(),
            }),
        };
        serde_json::to_value(record).unwrap_or_default()
    }

    /// The job of `run` as `record` ([`RunJob::record`]) describes it, with no bearer token.
    /// `Err`: why the record cannot be read.
    pub fn from_record(run: RunInfo, record: &serde_json::Value) -> Result<RunJob, String> {
        let r = JobRecord::deserialize(record)
            .map_err(|e| format!("its recorded request cannot be read ({e})"))?;
        Ok(RunJob {
            run,
            agent_path: r.agent_path,
            body: r.body,
            bearer: None,
            backend_thread: r.backend_thread.map(|b| BackendThread {
                upstream: b.upstream,
                id: b.id,
            }),
        })
    }

    /// Whether the run had logged events when the job was made (for a taken-over run: when it
    /// was taken over).
    pub fn logged_any(&self) -> bool {
        self.run.last_seq >= self.run.first_seq
    }
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
    /// The run was taken over from an instance that went away, and cannot be continued (why).
    Unresumable(String),
}

impl Failure {
    /// Every value of [`Failure::kind`].
    pub const KINDS: [&'static str; 11] = [
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
        "unresumable",
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
            Failure::Unresumable(_) => "unresumable",
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
            Failure::Unresumable(why) => format!(
                "the run could not be continued after the gateway instance ingesting it \
                 stopped: {why}"
            ),
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
    fn new(
        store: Arc<dyn Store>,
        run: RunId,
        admission: Option<tokio::sync::oneshot::Sender<Admission>>,
    ) -> RunSink {
        RunSink {
            store,
            run,
            admission: std::sync::Mutex::new(admission),
        }
    }

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
        self.append_marked(events, None).await
    }

    /// Append a batch with the adapter's position upstream after it (`mark`, recorded with
    /// the events for whoever takes the run over; `None`: a plain [`Store::append`]). An empty
    /// batch does nothing. A store refusal becomes the [`Ending`] the adapter should return:
    /// [`Ending::Closed`] when the run has ended or another instance holds it.
    pub async fn append_marked(
        &self,
        events: Vec<NewEvent>,
        mark: Option<String>,
    ) -> Result<(), Ending> {
        if events.is_empty() {
            return Ok(());
        }
        let n = events.len() as u64;
        let bytes: u64 = events.iter().map(|e| e.data.len() as u64).sum();
        let appended = match mark {
            Some(mark) => {
                self.store
                    .append_marked(&self.run, events, Some(mark))
                    .await
            }
            None => self.store.append(&self.run, events).await,
        };
        match appended {
            Ok(_) => {
                metrics::EVENTS_INGESTED.inc_by(n);
                metrics::EVENT_BYTES_INGESTED.inc_by(bytes);
                Ok(())
            }
            Err(StoreError::RunLimit(l)) => Err(Ending::Failed(Failure::RunLimit(l))),
            Err(StoreError::Full { .. }) => Err(Ending::Failed(Failure::StoreFull)),
            Err(StoreError::Finished) | Err(StoreError::RunNotFound) => Err(Ending::Closed),
            Err(StoreError::Fenced) => {
                log::info!(
                    "run {}: another instance took it over; ingestion stops here",
                    self.run
                );
                Err(Ending::Closed)
            }
            // The shared store retried for a whole lease term: by now the lease has lapsed and
            // the run is another instance's to continue once Redis is back (ending it here
            // could not be recorded either).
            Err(StoreError::Unavailable(e)) => {
                log::warn!(
                    "run {}: the store stayed unavailable ({e}); ingestion stops here and \
                     another instance takes the run over",
                    self.run
                );
                Err(Ending::Closed)
            }
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

    /// Continue a run that another instance was ingesting, from `mark` (the position recorded
    /// with its last append, `None` if nothing was marked), appending through `sink` only what
    /// the log does not hold yet. `job` is rebuilt from its record: no bearer token. By default
    /// a run cannot be continued: it ends `error` ([`Failure::Unresumable`]), never with a
    /// second backend run.
    async fn resume(&self, job: &RunJob, mark: Option<&str>, sink: &RunSink) -> Ending {
        let _ = (job, mark, sink);
        Ending::Failed(Failure::Unresumable(
            "its backend's dialect offers no way to continue a run without starting it again"
                .into(),
        ))
    }
}

/// Starts runs on a backend (or continues runs taken over from another instance) and closes
/// them in the store when they end.
#[derive(Clone)]
pub struct Ingestor {
    store: Arc<dyn Store>,
    adapter: Arc<dyn Adapter>,
    run_timeout: Duration,
    /// Runs being ingested here, and how to cancel each.
    running: Arc<dashmap::DashMap<RunId, Arc<tokio::sync::Notify>>>,
}

/// A run's entry in [`Ingestor::running`] while its task runs: removed when the task ends in any
/// way (returns, panics, is aborted), unless a newer task of the same run replaced it.
struct Registration {
    running: Arc<dashmap::DashMap<RunId, Arc<tokio::sync::Notify>>>,
    run: RunId,
    cancel: Arc<tokio::sync::Notify>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.running
            .remove_if(&self.run, |_, c| Arc::ptr_eq(c, &self.cancel));
    }
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

    /// Close the backend connection of a run ingested here (after a stop, or when another
    /// instance took it over). The run's status is the caller's business; the task ends without
    /// touching it.
    pub fn cancel(&self, run: &RunId) {
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
        self.watch(run, task);
        rx
    }

    /// Continue, in a background task on the current runtime, a run taken over from an instance
    /// that went away: the adapter resumes it from its mark ([`Adapter::resume`]) under the same
    /// supervision as [`Ingestor::spawn`] (cancel, panic watcher, closing), within what is left
    /// of `upstream.run_timeout` since the run was created. A run without a readable job record
    /// ends `error` ([`Failure::Unresumable`]). Not counted in `sluice_runs_started_total`.
    pub fn adopt(&self, adopted: Adopted) {
        let this = self.clone();
        let run = adopted.run.run_id.clone();
        let task = tokio::spawn(async move { this.drive_adopted(adopted).await });
        self.watch(run, task);
    }

    /// End the run `error` should `task` (ingesting `run`) panic.
    fn watch(&self, run: RunId, task: tokio::task::JoinHandle<()>) {
        let store = self.store.clone();
        tokio::spawn(async move {
            if let Err(e) = task.await {
                if e.is_panic() {
                    log::error!("run {run}: ingestion task panicked; ending the run");
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
    }

    /// Run a job to its end in the current task (what [`Ingestor::spawn`] runs). The job is
    /// recorded for a takeover ([`Store::save_job`]) before the backend is asked.
    pub async fn drive(
        &self,
        job: RunJob,
        admission: Option<tokio::sync::oneshot::Sender<Admission>>,
    ) {
        let run = &job.run.run_id;
        let sink = RunSink::new(self.store.clone(), run.clone(), admission);
        let work = async {
            if let Err(e) = self.store.save_job(run, job.record()).await {
                log::warn!("run {run}: could not record its job (no takeover possible): {e}");
            }
            self.adapter.run(&job, &sink).await
        };
        self.supervise(run, self.run_timeout, work).await;
    }

    /// Continue a taken-over run to its end in the current task (what [`Ingestor::adopt`]
    /// runs).
    pub async fn drive_adopted(&self, adopted: Adopted) {
        let Adopted { run, job, mark } = adopted;
        let run_id = run.run_id.clone();
        let elapsed = SystemTime::now()
            .duration_since(run.created_at)
            .unwrap_or_default();
        let left = self.run_timeout.saturating_sub(elapsed);
        let job = match job {
            Some(record) => RunJob::from_record(run, &record),
            None => Err("the instance ingesting it stopped before recording its request".into()),
        };
        let mut job = match job {
            Ok(job) => job,
            Err(why) => {
                log::info!("run {run_id}: taken over, and cannot be continued: {why}");
                self.close(&run_id, Ending::Failed(Failure::Unresumable(why)))
                    .await;
                return;
            }
        };
        if job.backend_thread.is_none() {
            // Learnt from the backend after the job was recorded (a new backend thread).
            job.backend_thread = self.store.backend_thread(&job.run.thread_id).await;
        }
        log::info!(
            "run {run_id}: taken over from another instance; continuing after {}",
            mark.as_deref().map_or_else(
                || "no mark".to_string(),
                |m| format!("mark {:?}", clip_error(m))
            )
        );
        let sink = RunSink::new(self.store.clone(), run_id.clone(), None);
        let work = self.adapter.resume(&job, mark.as_deref(), &sink);
        self.supervise(&run_id, left, work).await;
    }

    /// Run `work` (an adapter ingesting `run`) under the run's limits: at most `limit` (the
    /// rest of `upstream.run_timeout`), stopped by [`Ingestor::cancel`]; then close the run as
    /// its [`Ending`] says.
    async fn supervise<F>(&self, run: &RunId, limit: Duration, work: F)
    where
        F: std::future::Future<Output = Ending>,
    {
        let cancel = Arc::new(tokio::sync::Notify::new());
        if let Some(older) = self.running.insert(run.clone(), cancel.clone()) {
            // A task of this run is still here (a run taken back over): it stops.
            older.notify_one();
        }
        let registration = Registration {
            running: self.running.clone(),
            run: run.clone(),
            cancel: cancel.clone(),
        };
        let ending = tokio::select! {
            ended = tokio::time::timeout(limit, work) => {
                match ended {
                    Ok(ending) => ending,
                    Err(_) => Ending::Failed(Failure::RunTimeout(self.run_timeout)),
                }
            }
            // Dropping the adapter's future closes the backend connection.
            _ = cancel.notified() => Ending::Closed,
        };
        drop(registration);
        self.close(run, ending).await;
    }

    /// Record how the run ended, appending its closing event.
    async fn close(&self, run: &RunId, ending: Ending) {
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

#[cfg(test)]
mod tests {
    use super::testing::Recorder;
    use super::*;
    use serde_json::{json, Value};

    fn delta(text: &str) -> NewEvent {
        NewEvent::new(bytes::Bytes::from(
            json!({"type": "delta", "call_id": "c", "content": text}).to_string(),
        ))
    }

    fn end() -> NewEvent {
        NewEvent::new(bytes::Bytes::from(
            json!({"type": "end", "call_id": "c", "parent_call_id": null, "content": {}})
                .to_string(),
        ))
    }

    /// Streams "a", "b", "c", … marked with their position; `run` stops (hangs) after `cut`
    /// of them, `resume` goes on after its mark up to `len`, then ends.
    struct Letters {
        len: usize,
        cut: usize,
    }

    impl Letters {
        async fn from(&self, i: usize, stop: usize, sink: &RunSink) -> Ending {
            for k in i..stop {
                let letter = ((b'a' + k as u8) as char).to_string();
                if let Err(e) = sink
                    .append_marked(vec![delta(&letter)], Some(k.to_string()))
                    .await
                {
                    return e;
                }
            }
            if stop < self.len {
                std::future::pending::<()>().await;
            }
            Ending::Completed(end())
        }
    }

    #[async_trait]
    impl Adapter for Letters {
        async fn run(&self, _: &RunJob, sink: &RunSink) -> Ending {
            self.from(0, self.cut, sink).await
        }

        async fn resume(&self, job: &RunJob, mark: Option<&str>, sink: &RunSink) -> Ending {
            assert!(job.bearer.is_none(), "no token after a takeover");
            let next = mark.map_or(0, |m| m.parse::<usize>().unwrap() + 1);
            self.from(next, self.len, sink).await
        }
    }

    fn job(run: RunInfo) -> RunJob {
        RunJob {
            run,
            agent_path: "7".into(),
            body: json!({"message": "hi", "message_id": "m1"}),
            bearer: Some("secret-token".into()),
            backend_thread: Some(BackendThread {
                upstream: "http://127.0.0.1:1".into(),
                id: "bt".into(),
            }),
        }
    }

    fn texts(events: &[Value]) -> String {
        events
            .iter()
            .map(|e| e["content"].as_str().unwrap_or("|"))
            .collect()
    }

    #[tokio::test]
    async fn an_adopted_run_goes_on_from_its_mark_under_the_same_supervisor() {
        let store = Recorder::new();
        let first = Ingestor::new(
            store.clone(),
            Arc::new(Letters { len: 6, cut: 3 }),
            Duration::from_secs(60),
        );
        let run = store.new_run("hi", "m1").await;
        let id = run.run_id.clone();
        let j = job(run);
        let task = tokio::spawn({
            let (first, j) = (first.clone(), j.clone());
            async move { first.drive(j, None).await }
        });
        store.appended(3).await;
        // The instance dies: its task is gone, the run stays in progress.
        task.abort();
        let _ = task.await;
        assert!(
            first.running.is_empty(),
            "a dead task leaves no registration"
        );
        let record = store.job(&id).expect("the job was recorded");
        assert_eq!(
            record,
            json!({"agent_path": "7", "body": {"message": "hi", "message_id": "m1"},
                   "backend_thread": {"upstream": "http://127.0.0.1:1", "id": "bt"}})
        );
        assert!(!record.to_string().contains("secret-token"));
        let back = RunJob::from_record(j.run.clone(), &record).unwrap();
        assert_eq!(
            (back.bearer, back.backend_thread, back.body),
            (None, j.backend_thread.clone(), j.body.clone())
        );

        let second = Ingestor::new(
            store.clone(),
            Arc::new(Letters { len: 6, cut: 0 }),
            Duration::from_secs(60),
        );
        let adopted = store.adopted(&id).await;
        assert_eq!(adopted.mark.as_deref(), Some("2"));
        second.adopt(adopted);
        let info = store.ended(&id).await;
        assert_eq!(info.status, RunStatus::Completed);
        assert_eq!(texts(&store.events(&id).await), "abcdef|");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(second.running.is_empty());
    }

    #[tokio::test]
    async fn a_fenced_instance_stops_without_ending_the_run() {
        let store = Recorder::new();
        let ingest = Ingestor::new(
            store.clone(),
            Arc::new(Letters { len: 6, cut: 6 }),
            Duration::from_secs(60),
        );
        let run = store.new_run("hi", "m1").await;
        let id = run.run_id.clone();
        store.fence();
        tokio::time::timeout(Duration::from_secs(5), ingest.drive(job(run), None))
            .await
            .expect("a fenced run stops at once");
        let info = store.run(&id).await.unwrap();
        assert_eq!(info.status, RunStatus::InProgress, "the run is another's");
        assert!(store.events(&id).await.is_empty());
        assert!(ingest.running.is_empty());
    }

    #[tokio::test]
    async fn a_run_that_cannot_be_continued_ends_error_with_the_reason() {
        let store = Recorder::new();
        // No job recorded (the instance died before), or one that cannot be read.
        for job in [None, Some(json!({"agent_path": 7}))] {
            let run = store.new_run("hi", "m1").await;
            let id = run.run_id.clone();
            let ingest = Ingestor::new(
                store.clone(),
                Arc::new(Letters { len: 2, cut: 0 }),
                Duration::from_secs(60),
            );
            ingest
                .drive_adopted(Adopted {
                    run,
                    job,
                    mark: None,
                })
                .await;
            let info = store.run(&id).await.unwrap();
            assert_eq!(info.status, RunStatus::Error);
            let error = info.error.unwrap();
            assert!(
                error.starts_with(
                    "the run could not be continued after the gateway instance ingesting it \
                     stopped: "
                ),
                "{error}"
            );
            let last = store.events(&id).await.pop().unwrap();
            assert_eq!(last["type"], "error");
        }

        // An adapter that cannot resume (the default): error, never a second backend run.
        struct Once;
        #[async_trait]
        impl Adapter for Once {
            async fn run(&self, _: &RunJob, _: &RunSink) -> Ending {
                panic!("a takeover never starts the run again");
            }
        }
        let run = store.new_run("hi", "m1").await;
        let id = run.run_id.clone();
        let record = job(run.clone()).record();
        Ingestor::new(store.clone(), Arc::new(Once), Duration::from_secs(60))
            .drive_adopted(Adopted {
                run,
                job: Some(record),
                mark: Some("3".into()),
            })
            .await;
        let info = store.run(&id).await.unwrap();
        assert_eq!(info.status, RunStatus::Error);
        assert!(info.error.unwrap().ends_with(
            "its backend's dialect offers no way to continue a run without starting it again"
        ));
        let f = Failure::Unresumable("x".into());
        assert_eq!((f.kind(), f.status()), ("unresumable", RunStatus::Error));
        assert!(Failure::KINDS.contains(&f.kind()));
    }

    #[tokio::test]
    async fn an_adopted_run_has_only_what_is_left_of_its_time() {
        let store = Recorder::new();
        let mut run = store.new_run("hi", "m1").await;
        let id = run.run_id.clone();
        let record = job(run.clone()).record();
        // Created 500 ms before the takeover, with a 600 ms limit: 100 ms left.
        run.created_at = SystemTime::now() - Duration::from_millis(500);
        struct Silent;
        #[async_trait]
        impl Adapter for Silent {
            async fn run(&self, _: &RunJob, _: &RunSink) -> Ending {
                std::future::pending().await
            }
            async fn resume(&self, _: &RunJob, _: Option<&str>, _: &RunSink) -> Ending {
                std::future::pending().await
            }
        }
        let ingest = Ingestor::new(store.clone(), Arc::new(Silent), Duration::from_millis(600));
        let started = tokio::time::Instant::now();
        ingest
            .drive_adopted(Adopted {
                run,
                job: Some(record),
                mark: None,
            })
            .await;
        let took = started.elapsed();
        assert!(took < Duration::from_millis(450), "{took:?}");
        let info = store.run(&id).await.unwrap();
        assert_eq!(info.status, RunStatus::Timeout);
        assert!(info.error.unwrap().contains("600ms"));
    }
}
