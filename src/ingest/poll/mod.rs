//! The poll adapter, for a dialect-A backend that only offers "start, then poll": its I/O loop.
//!
//! A run is `POST {upstream}{invoke_path}` with `X-Stream-Response: false` (answered `202` with
//! the backend's thread id), then `GET {upstream}{conversation_path}?threadId=…` until the
//! snapshot's `streamStatus` is terminal. The invoke is the only request that carries the
//! caller's token (`auth.forward_token`): the token lives about a minute and a run up to
//! `poll_timeout`, so polls carry the `x-sluice-*` identity headers and no `authorization`.
//!
//! The pure parts live beside this file: `snapshot` reads a snapshot (its state, the run's own
//! user message and the assistant message answering it), `diff` turns successive versions of
//! that message into log events ([`SnapshotDiff`]), and `backoff` says how long to wait between
//! polls ([`Backoff`]).
//!
//! Finding the run's message: by its id, or, for a backend that renames messages, by the text
//! of the last user message, which must then lie beyond the user messages the backend's
//! conversation held before this run, so that a user who says "yes" twice never gets the
//! previous turn's answer or status. That count is 0 for a new backend conversation; for a
//! continued one it is read from the conversation once, just before the invoke (or, if that
//! read fails, from the first poll's snapshot, which can only overcount).
//!
//! Polling backs off while nothing changes: the interval starts at `interval_min`, grows by
//! `backoff` after each quiet poll up to `interval_max`, and returns to `interval_min` after a
//! change. `429`/`503` answers are waited out (`Retry-After`, seconds or an HTTP date), other
//! failures are retried until `max_failures` in a row, and a `404` once the run has shown
//! means the backend lost it. Until a snapshot shows the run's own user message, a terminal
//! `streamStatus` (the previous turn's) and a `404` (a thread not created yet) are not taken as
//! this run's end. All runs of one adapter share `max_connections` connection permits, held
//! only during a request, never while waiting.
//!
//! Takeover: every append carries a checkpoint as its mark (`{upstream, thread, before, seen,
//! diff}`: the backend and thread polled, the count above, whether the run's message has shown,
//! and the [`SnapshotDiff`]'s state). Another instance continues the run from it with neither a
//! history read nor an invoke, polling on as this instance would have, so it logs the same
//! events; with no checkpoint (the instance went away before the run's first append) it polls
//! the thread's backend conversation if that is known, and otherwise cannot continue the run.
//! The run's time limit (`poll_timeout`) still counts from its creation.

mod backoff;
mod diff;
mod snapshot;

pub use backoff::{parse_retry_after, Backoff};
pub use diff::{DiffState, SnapshotDiff};
pub use snapshot::{
    backend_state, closing, our_message, our_user_message, parse_snapshot, user_messages,
    BackendState,
};

use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use pingora::connectors::http::Connector;
use pingora::protocols::http::client::HttpSession;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::agentflow::path_segment;
use super::answer::{error_text, ERROR_BODY_LIMIT};
use super::events::Events;
use super::invoke::{
    backend_thread, backend_thread_on, send_failure, sluice_headers, InvokeTarget,
};
use super::{Adapter, Admission, Ending, Failure, RunJob, RunSink};
use crate::client;
use crate::config::UpstreamUrl;
use crate::metrics;
use crate::store::BackendThread;

/// Settings for [`PollAdapter`].
#[derive(Clone, Debug)]
pub struct PollSettings {
    /// First (and after a change, again) wait between polls.
    pub interval_min: Duration,
    /// Longest wait between polls.
    pub interval_max: Duration,
    /// Factor the wait grows by after a poll that brought no change.
    pub backoff: f64,
    /// Longest a run may take in all.
    pub timeout: Duration,
    /// Connections open to the backend at once, over all runs of the adapter.
    pub max_connections: usize,
    /// Failed polls in a row that end the run.
    pub max_failures: u32,
    /// Path of the snapshot route (`/api/getConversation`).
    pub conversation_path: String,
    /// Longest one request (connect, send, whole answer) may take.
    pub idle_timeout: Duration,
    /// Largest snapshot body read (a larger one fails the poll).
    pub max_snapshot_bytes: usize,
}

impl Default for PollSettings {
    fn default() -> Self {
        PollSettings {
            interval_min: Duration::from_millis(250),
            interval_max: Duration::from_secs(5),
            backoff: 1.5,
            timeout: Duration::from_secs(15 * 60),
            max_connections: 64,
            max_failures: 5,
            conversation_path: "/api/getConversation".into(),
            idle_timeout: Duration::from_secs(60),
            max_snapshot_bytes: 16 * 1024 * 1024,
        }
    }
}

/// The "start, then poll" adapter over a dialect-A backend.
pub struct PollAdapter {
    target: InvokeTarget,
    settings: PollSettings,
    permits: Semaphore,
    connector: Connector,
}

/// A backend's answer, read whole.
struct Reply {
    status: u16,
    retry_after: Option<String>,
    thread: Option<String>,
    body: Vec<u8>,
}

/// What one poll got.
enum Answer {
    Snapshot(Value),
    Throttled(Option<String>),
    Lost(String),
    Failed(Failure),
}

impl PollAdapter {
    /// An adapter starting runs on `target` and polling them as `settings` say.
    pub fn new(target: InvokeTarget, settings: PollSettings) -> Self {
        PollAdapter {
            permits: Semaphore::new(settings.max_connections.max(1)),
            target,
            settings,
            connector: Connector::new(None),
        }
    }

    fn run_timeout(&self) -> Ending {
        Ending::Failed(Failure::RunTimeout(self.settings.timeout))
    }

    /// Send a request with `send`, holding a connection permit, and read its answer whole, within
    /// `idle_timeout` (else `Failure::IdleTimeout`) and the run's deadline (else `None`). Waiting
    /// for the permit counts against the deadline only. A fully read connection goes back to
    /// the pool for the next request to `up`.
    async fn exchange<F>(
        &self,
        deadline: Instant,
        up: &UpstreamUrl,
        limit: usize,
        send: F,
    ) -> Option<Result<Reply, Failure>>
    where
        F: std::future::Future<Output = Result<HttpSession, Failure>>,
    {
        let _permit = tokio::select! {
            p = self.permits.acquire() => p.ok(),
            _ = tokio::time::sleep_until(deadline) => return None,
        };
        let request = async {
            let mut http = send.await?;
            let reply = read_reply(&mut http, limit).await?;
            client::release(&self.connector, http, up, self.target.connect_timeout).await;
            Ok(reply)
        };
        let idle = Instant::now()
            .checked_add(self.settings.idle_timeout)
            .unwrap_or(deadline);
        let end = idle.min(deadline);
        match tokio::time::timeout_at(end, request).await {
            Ok(reply) => Some(reply),
            Err(_) if end == deadline => None,
            Err(_) => Some(Err(Failure::IdleTimeout(self.settings.idle_timeout))),
        }
    }

    /// Start the run; returns the backend's thread id.
    async fn start(
        &self,
        up: &UpstreamUrl,
        job: &RunJob,
        sink: &RunSink,
        deadline: Instant,
    ) -> Result<String, Ending> {
        let send = self.target.send(&self.connector, up, job, false);
        let reply = match self.exchange(deadline, up, ERROR_BODY_LIMIT, send).await {
            Some(Ok(r)) => r,
            Some(Err(f)) => return Err(Ending::Failed(f)),
            None => return Err(self.run_timeout()),
        };
        if !(200..300).contains(&reply.status) {
            let text = error_text(&reply.body);
            sink.admit(Admission::Refused(reply.status, text.clone()));
            return Err(Ending::Failed(Failure::Status(reply.status, text)));
        }
        let Some(thread) = backend_thread(reply.thread.as_deref(), Some(&reply.body)) else {
            return Err(Ending::Failed(Failure::Malformed(
                "the backend accepted the run without naming its thread (no X-Thread-ID, no threadId)"
                    .into(),
            )));
        };
        sink.remember_backend_thread(&job.run.thread_id, up, &thread)
            .await;
        sink.admit(Admission::Accepted);
        Ok(thread)
    }

    /// One poll of the backend's snapshot.
    async fn poll(
        &self,
        up: &UpstreamUrl,
        path: &str,
        headers: &[(&str, String)],
        deadline: Instant,
    ) -> Option<Answer> {
        let send = async {
            client::send(
                &self.connector,
                up,
                self.target.connect_timeout,
                "GET",
                path,
                headers,
                Bytes::new(),
            )
            .await
            .map_err(send_failure)
        };
        let limit = self.settings.max_snapshot_bytes;
        let reply = match self.exchange(deadline, up, limit, send).await? {
            Ok(r) => r,
            Err(f) => return Some(Answer::Failed(f)),
        };
        Some(match reply.status {
            200..=299 => match parse_snapshot(&reply.body) {
                Ok(v) => Answer::Snapshot(v),
                Err(e) => Answer::Failed(Failure::Malformed(e)),
            },
            429 | 503 => Answer::Throttled(reply.retry_after),
            404 => Answer::Lost(error_text(&reply.body)),
            status => Answer::Failed(Failure::Status(status, error_text(&reply.body))),
        })
    }

    /// The path of the snapshot of backend thread `thread`.
    fn conversation(&self, thread: &str) -> String {
        format!(
            "{}?threadId={}",
            self.settings.conversation_path,
            path_segment(thread)
        )
    }

    /// How many user messages the backend's conversation held before this run, so that the
    /// run's message, when the backend renames it, is never matched to an earlier turn's with
    /// the same text ([`our_user_message`]). A new backend conversation held none; a continued
    /// one is read once before the invoke (a `404`: none). `None` when that read fails: the
    /// caller then counts the user messages of its first snapshot, which can only overcount
    /// (so the text match still never takes an earlier turn; a renaming backend that shows the
    /// run in that very snapshot is then not recognised, and the run ends as lost rather than
    /// with someone else's answer). `Err` when the run's time is up.
    async fn history(
        &self,
        up: &UpstreamUrl,
        job: &RunJob,
        headers: &[(&str, String)],
        deadline: Instant,
    ) -> Result<Option<usize>, Ending> {
        let Some(thread) = backend_thread_on(job, up) else {
            return Ok(Some(0));
        };
        let Some(answer) = self
            .poll(up, &self.conversation(thread), headers, deadline)
            .await
        else {
            count("failed");
            return Err(self.run_timeout());
        };
        match answer {
            Answer::Snapshot(snapshot) => {
                count("unchanged");
                let messages = snapshot.get("messages").and_then(Value::as_array);
                Ok(messages.map(|ms| user_messages(ms)))
            }
            Answer::Lost(_) => {
                count("failed");
                Ok(Some(0))
            }
            Answer::Throttled(_) => {
                count("throttled");
                Ok(None)
            }
            Answer::Failed(failure) => {
                count("failed");
                log::debug!(
                    "run {}: reading the conversation before the invoke failed: {}",
                    job.run.run_id,
                    failure.message()
                );
                Ok(None)
            }
        }
    }

    /// The run's deadline: `timeout` after it was created (a run taken over keeps its own),
    /// from `now` for a run started here.
    fn deadline(&self, job: &RunJob, started_here: bool) -> Instant {
        let now = Instant::now();
        let left = if started_here {
            self.settings.timeout
        } else {
            let elapsed = SystemTime::now()
                .duration_since(job.run.created_at)
                .unwrap_or_default();
            self.settings.timeout.saturating_sub(elapsed)
        };
        now.checked_add(left)
            .unwrap_or(now + Duration::from_secs(100 * 365 * 86_400))
    }

    /// The requests' headers: the run's identity, never the caller's token (only the invoke
    /// carries it).
    fn poll_headers(job: &RunJob) -> Vec<(&'static str, String)> {
        let mut headers = sluice_headers(job);
        headers.push(("accept", "application/json".to_string()));
        headers
    }

    async fn drive(&self, job: &RunJob, sink: &RunSink) -> Ending {
        let deadline = self.deadline(job, true);
        let up = self.target.pick_for(job.backend_thread.as_ref());
        let headers = Self::poll_headers(job);
        // How many user messages the backend's conversation held before this run; `None`
        // until known (see `history`).
        let before = match self.history(up, job, &headers, deadline).await {
            Ok(b) => b,
            Err(ending) => return ending,
        };
        let thread = match self.start(up, job, sink, deadline).await {
            Ok(t) => t,
            Err(ending) => return ending,
        };
        let polling = Polling {
            up,
            thread,
            before,
            seen: false,
            diff: SnapshotDiff::new(Events::new(job.run.run_id.0.clone())),
        };
        self.poll_on(job, sink, polling, &headers, deadline, true)
            .await
    }

    /// Continue a taken-over run: from its checkpoint (`mark`), polling on with neither a
    /// history read nor an invoke; with none (the instance went away before its first append),
    /// by polling the thread's backend conversation, if known.
    async fn resume_polling(&self, job: &RunJob, mark: Option<&str>, sink: &RunSink) -> Ending {
        let deadline = self.deadline(job, false);
        let headers = Self::poll_headers(job);
        let unresumable = |why: &str| Ending::Failed(Failure::Unresumable(why.into()));
        let events = Events::new(job.run.run_id.0.clone());
        let (polling, first) = match mark {
            Some(mark) => {
                let Ok(c) = serde_json::from_str::<Checkpoint>(mark) else {
                    return unresumable("its poll checkpoint cannot be read");
                };
                let backend = BackendThread {
                    upstream: c.upstream,
                    id: c.thread.clone(),
                };
                let polling = Polling {
                    up: self.target.pick_for(Some(&backend)),
                    thread: c.thread,
                    before: c.before,
                    seen: c.seen,
                    diff: SnapshotDiff::restore(events, c.diff),
                };
                (polling, false)
            }
            None if job.logged_any() => {
                return unresumable("no poll checkpoint was recorded with its events")
            }
            None => {
                let Some(backend) = job.backend_thread.as_ref() else {
                    return unresumable(
                        "the instance ingesting it stopped before the backend named its thread",
                    );
                };
                let polling = Polling {
                    up: self.target.pick_for(Some(backend)),
                    thread: backend.id.clone(),
                    before: None,
                    seen: false,
                    diff: SnapshotDiff::new(events),
                };
                (polling, true)
            }
        };
        self.poll_on(job, sink, polling, &headers, deadline, first)
            .await
    }

    /// Poll the run's backend thread until the run ends, appending what changed, each batch
    /// with the checkpoint after it. `first`: the run's `start` event is to be logged first.
    async fn poll_on(
        &self,
        job: &RunJob,
        sink: &RunSink,
        mut p: Polling<'_>,
        headers: &[(&str, String)],
        deadline: Instant,
        first: bool,
    ) -> Ending {
        let s = &self.settings;
        if first {
            let start = vec![p.diff_events().start()];
            if let Err(ending) = sink.append_marked(start, Some(p.checkpoint())).await {
                return ending;
            }
        }
        let path = self.conversation(&p.thread);
        let ours = &job.run.user_message;
        let mut backoff = Backoff::of(s);
        let mut last: Option<Value> = None;
        let mut failures = 0u32;
        let mut unseen_terminal = 0u32;
        let mut wait = backoff.current();
        loop {
            let wake = Instant::now().checked_add(wait).unwrap_or(deadline);
            tokio::time::sleep_until(wake.min(deadline)).await;
            if Instant::now() >= deadline {
                return self.run_timeout();
            }
            let Some(answer) = self.poll(p.up, &path, headers, deadline).await else {
                count("failed");
                return self.run_timeout();
            };
            match answer {
                Answer::Snapshot(mut snapshot) => {
                    failures = 0;
                    let mut state = backend_state(&snapshot);
                    let messages = snapshot.get_mut("messages").and_then(Value::as_array_mut);
                    if p.before.is_none() {
                        p.before = messages.as_deref().map(|ms| user_messages(ms));
                    }
                    // Unknown yet: only a match by id counts.
                    let before = p.before.unwrap_or(usize::MAX);
                    p.seen = p.seen
                        || messages
                            .as_deref()
                            .is_some_and(|ms| our_user_message(ms, ours, before).is_some());
                    if !p.seen && state != BackendState::Running {
                        // Not this run's status: the backend does not show the run yet.
                        unseen_terminal += 1;
                        if unseen_terminal >= s.max_failures.max(1) {
                            count("failed");
                            return Ending::Failed(Failure::Lost(
                                "the backend's conversation does not show this run".into(),
                            ));
                        }
                        state = BackendState::Running;
                    }
                    let message =
                        messages.and_then(|ms| our_message(ms, ours, before).map(|i| ms[i].take()));
                    let batch = message.as_ref().map(|m| p.diff.diff(m)).unwrap_or_default();
                    let changed = !batch.is_empty() || message != last;
                    last = message;
                    count(if changed { "changed" } else { "unchanged" });
                    let ending = closing(p.diff_events(), &state);
                    let mark = (!batch.is_empty()).then(|| p.checkpoint());
                    if let Err(ending) = sink.append_marked(batch, mark).await {
                        return ending;
                    }
                    if let Some(ending) = ending {
                        return ending;
                    }
                    wait = if changed {
                        backoff.after_change()
                    } else {
                        backoff.after_quiet()
                    };
                }
                Answer::Throttled(retry_after) => {
                    count("throttled");
                    wait = backoff.after_throttle(retry_after.as_deref(), SystemTime::now());
                }
                Answer::Lost(text) if !p.seen => {
                    // The backend may not have created the thread yet: an ordinary failure.
                    count("failed");
                    failures += 1;
                    if failures >= s.max_failures.max(1) {
                        return Ending::Failed(Failure::Lost(text));
                    }
                    wait = backoff.after_quiet();
                }
                Answer::Lost(text) => {
                    count("failed");
                    let text = if text.is_empty() {
                        format!(
                            "{} answered 404 for thread {}",
                            s.conversation_path, p.thread
                        )
                    } else {
                        text
                    };
                    return Ending::Failed(Failure::Lost(text));
                }
                Answer::Failed(failure) => {
                    count("failed");
                    failures += 1;
                    if failures >= s.max_failures.max(1) {
                        return Ending::Failed(failure);
                    }
                    log::debug!(
                        "run {}: poll failed ({failures} in a row): {}",
                        job.run.run_id,
                        failure.message()
                    );
                    wait = backoff.after_quiet();
                }
            }
        }
    }
}

/// Where a polled run stands: the backend thread polled and what was made of it so far.
struct Polling<'a> {
    up: &'a UpstreamUrl,
    thread: String,
    /// User messages the backend's conversation held before this run (`None`: not known yet).
    before: Option<usize>,
    /// Whether a snapshot has shown the run's user message yet; until then a 404 or a terminal
    /// status may be the backend catching up (or the previous turn's status).
    seen: bool,
    diff: SnapshotDiff,
}

impl Polling<'_> {
    fn diff_events(&self) -> &Events {
        self.diff.events()
    }

    /// The checkpoint after what was logged so far, as JSON ([`Checkpoint`]).
    fn checkpoint(&self) -> String {
        let c = CheckpointRef {
            upstream: self.up.to_string(),
            thread: &self.thread,
            before: self.before,
            seen: self.seen,
            diff: self.diff.state(),
        };
        serde_json::to_string(&c).unwrap_or_default()
    }
}

/// A polled run's mark: the backend (as configured) and thread polled, the user messages the
/// conversation held before the run, whether the run's message has shown, and the diff's state
/// ([`DiffState`]). Another instance polls on from it.
#[derive(Deserialize)]
struct Checkpoint {
    upstream: String,
    thread: String,
    #[serde(default)]
    before: Option<usize>,
    #[serde(default)]
    seen: bool,
    diff: DiffState,
}

/// [`Checkpoint`] as written, borrowing the run's state.
#[derive(Serialize)]
struct CheckpointRef<'a> {
    upstream: String,
    thread: &'a str,
    before: Option<usize>,
    seen: bool,
    diff: &'a DiffState,
}

fn count(outcome: &str) {
    metrics::UPSTREAM_POLLS.with_label_values(&[outcome]).inc();
}

/// Read an answer whole: header, then the body (at most `limit` bytes when 2xx; the first
/// [`ERROR_BODY_LIMIT`] bytes, best effort, otherwise). The caller bounds the time.
async fn read_reply(http: &mut HttpSession, limit: usize) -> Result<Reply, Failure> {
    let dropped = |e: Box<pingora::Error>| Failure::Dropped(e.to_string().trim().to_string());
    http.read_response_header().await.map_err(dropped)?;
    let Some(head) = http.response_header() else {
        return Err(Failure::Dropped(
            "the backend sent no response header".into(),
        ));
    };
    let status = head.status.as_u16();
    let header = |name: &str| {
        head.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let (retry_after, thread) = (header("retry-after"), header("x-thread-id"));
    let ok = (200..300).contains(&status);
    let limit = if ok { limit } else { ERROR_BODY_LIMIT };
    let mut body = Vec::new();
    loop {
        match http.read_response_body().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > limit {
                    if ok {
                        return Err(Failure::Malformed(format!(
                            "the backend's answer is larger than {limit} bytes"
                        )));
                    }
                    body.extend_from_slice(&chunk[..limit - body.len()]);
                    break;
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Err(e) if ok => return Err(dropped(e)),
            Err(_) => break,
        }
    }
    Ok(Reply {
        status,
        retry_after,
        thread,
        body,
    })
}

#[async_trait]
impl Adapter for PollAdapter {
    async fn run(&self, job: &RunJob, sink: &RunSink) -> Ending {
        self.drive(job, sink).await
    }

    async fn resume(&self, job: &RunJob, mark: Option<&str>, sink: &RunSink) -> Ending {
        self.resume_polling(job, mark, sink).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use crate::store::memory::MemoryStore;
    use crate::store::{BackendThread, NewRun, RunStatus, Store};

    fn http(status: u16, headers: &str, body: &str) -> String {
        format!(
            "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n{headers}\r\n{body}",
            body.len()
        )
    }

    fn snapshot(status: &str, text: &str) -> String {
        let body = json!({
            "threadId": "bt 1", "streamStatus": status, "errorText": "no provider key",
            "messages": [
                {"id": "u0", "role": "user", "parts": [{"type": "text", "text": "before"}]},
                {"id": "a0", "role": "assistant", "parts": [{"type": "text", "text": "old"}]},
                {"id": "u1", "role": "user", "parts": [{"type": "text", "text": "hi"}]},
                {"id": "a1", "role": "assistant", "parts": [{"type": "text", "text": text}]},
            ],
        });
        http(200, "content-type: application/json\r\n", &body.to_string())
    }

    /// A backend answering each connection with `answer(request head)`, after `delay`; records
    /// the request heads and the most requests in flight at once.
    struct Backend {
        url: UpstreamUrl,
        requests: Arc<Mutex<Vec<String>>>,
        most_open: Arc<AtomicUsize>,
    }

    async fn backend(
        delay: Duration,
        answer: impl Fn(&str) -> String + Send + Sync + 'static,
    ) -> Backend {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url =
            UpstreamUrl::parse(&format!("http://{}", listener.local_addr().unwrap())).unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let most_open = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let answer = Arc::new(answer);
        let (reqs, most) = (requests.clone(), most_open.clone());
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let (reqs, most, open, answer) =
                    (reqs.clone(), most.clone(), open.clone(), answer.clone());
                tokio::spawn(async move {
                    let now = open.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    let head = loop {
                        let n = sock.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            open.fetch_sub(1, Ordering::SeqCst);
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break String::from_utf8_lossy(&buf[..end]).into_owned();
                        }
                    };
                    let response = answer(&head);
                    reqs.lock().unwrap().push(head);
                    tokio::time::sleep(delay).await;
                    // Counted as closed before the client can see the answer (and its permit
                    // go back), so that the count never overstates what the client had open.
                    open.fetch_sub(1, Ordering::SeqCst);
                    let _ = sock.write_all(response.as_bytes()).await;
                    let _ = sock.shutdown().await;
                });
            }
        });
        Backend {
            url,
            requests,
            most_open,
        }
    }

    /// A backend giving `script`'s answers in turn (the last one again once it runs out).
    async fn scripted(script: Vec<String>) -> Backend {
        let script = Mutex::new(VecDeque::from(script));
        backend(Duration::ZERO, move |_| {
            let mut s = script.lock().unwrap();
            if s.len() > 1 {
                s.pop_front().unwrap()
            } else {
                s.front().cloned().unwrap_or_default()
            }
        })
        .await
    }

    fn settings() -> PollSettings {
        PollSettings {
            interval_min: Duration::from_millis(2),
            interval_max: Duration::from_millis(10),
            backoff: 2.0,
            timeout: Duration::from_secs(10),
            max_connections: 4,
            max_failures: 3,
            conversation_path: "/api/getConversation".into(),
            idle_timeout: Duration::from_secs(5),
            max_snapshot_bytes: 1 << 20,
        }
    }

    struct Outcome {
        ending: Ending,
        admission: Option<Admission>,
        events: Vec<Value>,
        backend_thread: Option<crate::store::BackendThread>,
    }

    async fn run(adapter: &PollAdapter, store: &Arc<MemoryStore>, user: &str) -> Outcome {
        let message =
            json!({"id": user, "role": "user", "parts": [{"type": "text", "text": "hi"}]});
        run_job(adapter, store, message, None, None).await
    }

    /// A run of `user_message`, with the caller's `bearer` token forwarded and the thread's
    /// conversation on the backend (`backend_thread`) when given.
    async fn run_job(
        adapter: &PollAdapter,
        store: &Arc<MemoryStore>,
        user_message: Value,
        bearer: Option<&str>,
        backend_thread: Option<BackendThread>,
    ) -> Outcome {
        let started = store
            .create_run(NewRun {
                thread_id: None,
                org_id: "org".into(),
                user_id: "user".into(),
                agent_id: json!(7),
                user_message,
                idempotency_key: None,
                conversation: None,
            })
            .await
            .unwrap();
        let job = RunJob {
            run: started.run,
            agent_path: "7".into(),
            body: json!({}),
            bearer: bearer.map(str::to_owned),
            backend_thread,
        };
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let sink = RunSink {
            store: store.clone(),
            run: job.run.run_id.clone(),
            admission: Mutex::new(Some(tx)),
        };
        let ending = adapter.run(&job, &sink).await;
        // As the supervisor does: the closing event is logged with the status.
        if let Some(closing) = ending.closing_event() {
            store
                .finish(
                    &job.run.run_id,
                    RunStatus::Completed,
                    None,
                    Some(closing.clone()),
                )
                .await
                .unwrap();
        }
        let events = store
            .read_after(&job.run.run_id, 0, 1000, usize::MAX)
            .await
            .unwrap()
            .events
            .iter()
            .map(|e| serde_json::from_slice(&e.data).unwrap())
            .collect();
        Outcome {
            ending,
            admission: rx.try_recv().ok(),
            events,
            backend_thread: store.backend_thread(&job.run.thread_id).await,
        }
    }

    fn store() -> Arc<MemoryStore> {
        Arc::new(MemoryStore::new(crate::ingest::testing::limits()))
    }

    fn adapter(up: &Backend, settings: PollSettings) -> PollAdapter {
        let target = InvokeTarget::new(
            vec![up.url.clone()],
            "/api/invokeAgent".into(),
            Duration::from_secs(2),
        );
        PollAdapter::new(target, settings)
    }

    fn accepted() -> String {
        http(202, "", r#"{"threadId":"bt 1","status":"in_progress"}"#)
    }

    #[tokio::test]
    async fn a_run_is_started_polled_and_completed() {
        let up = scripted(vec![
            accepted(),
            snapshot("in_progress", ""),
            snapshot("in_progress", "Hel"),
            http(429, "retry-after: 0\r\n", ""),
            snapshot("in_progress", "Hel"),
            http(502, "", "bad gateway"),
            snapshot("completed", "Hello"),
        ])
        .await;
        let a = adapter(&up, settings());
        let store = store();
        let out = run(&a, &store, "u1").await;
        assert!(matches!(out.ending, Ending::Completed(_)));
        assert_eq!(out.admission, Some(Admission::Accepted));
        let shape: Vec<_> = out
            .events
            .iter()
            .map(|e| {
                (
                    e["type"].as_str().unwrap(),
                    e["content"].as_str().unwrap_or(""),
                )
            })
            .collect();
        assert_eq!(
            shape,
            [
                ("start", ""),
                ("delta", "Hel"),
                ("delta", "lo"),
                ("end", "")
            ]
        );
        assert!(out
            .events
            .iter()
            .all(|e| e["call_id"].as_str().unwrap().starts_with("run_")));
        let reqs = up.requests.lock().unwrap().clone();
        assert_eq!(reqs.len(), 7);
        assert!(reqs[0].starts_with("POST /api/invokeAgent "));
        assert!(reqs[0].to_lowercase().contains("x-stream-response: false"));
        for r in &reqs[1..] {
            assert!(
                r.starts_with("GET /api/getConversation?threadId=bt%201 "),
                "{r}"
            );
            let r = r.to_lowercase();
            assert!(r.contains("accept: application/json") && r.contains("x-sluice-run-id: run_"));
        }
        assert_eq!(out.backend_thread.map(|b| b.id).as_deref(), Some("bt 1"));
    }

    /// A snapshot from before the backend stored the run's message: the previous turn only.
    fn previous_turn(status: &str) -> String {
        let body = json!({
            "threadId": "bt 1", "streamStatus": status,
            "messages": [
                {"id": "u0", "role": "user", "parts": [{"type": "text", "text": "before"}]},
                {"id": "a0", "role": "assistant", "parts": [{"type": "text", "text": "old"}]},
            ],
        });
        http(200, "content-type: application/json\r\n", &body.to_string())
    }

    #[tokio::test]
    async fn the_previous_turn_is_never_taken_for_this_run() {
        let st = store();
        // The thread is not there yet (404), then only the previous, completed turn shows:
        // neither ends the run nor lends it the old answer.
        let up = scripted(vec![
            accepted(),
            http(404, "", r#"{"error":"no such thread"}"#),
            previous_turn("completed"),
            previous_turn("completed"),
            snapshot("in_progress", "New"),
            snapshot("completed", "New answer"),
        ])
        .await;
        let out = run(&adapter(&up, settings()), &st, "u1").await;
        assert!(matches!(out.ending, Ending::Completed(_)));
        let text: String = out
            .events
            .iter()
            .filter(|e| e["type"] == "delta")
            .map(|e| e["content"].as_str().unwrap())
            .collect();
        assert_eq!(text, "New answer");
        // A backend that never shows the run's message: lost after max_failures polls.
        let up = scripted(vec![accepted(), previous_turn("completed")]).await;
        let out = run(&adapter(&up, settings()), &st, "u1").await;
        assert!(
            matches!(&out.ending, Ending::Failed(Failure::Lost(m)) if m.contains("does not show")),
            "{:?}",
            out.ending
        );
    }

    #[tokio::test]
    async fn refusals_losses_and_failures_end_the_run() {
        let st = store();
        // The backend refuses the run.
        let up = scripted(vec![http(500, "", r#"{"error":{"message":"no key"}}"#)]).await;
        let out = run(&adapter(&up, settings()), &st, "u1").await;
        assert_eq!(
            out.admission,
            Some(Admission::Refused(500, "no key".into()))
        );
        assert_eq!(
            out.ending,
            Ending::Failed(Failure::Status(500, "no key".into()))
        );
        assert!(out.events.is_empty());

        // Accepted without a thread id.
        let up = scripted(vec![http(202, "", "{}")]).await;
        let out = run(&adapter(&up, settings()), &st, "u1").await;
        assert_eq!(out.admission, None);
        assert!(matches!(out.ending, Ending::Failed(Failure::Malformed(_))));

        // The backend forgets the run: ended at once.
        let up = scripted(vec![
            http(202, "x-thread-id: t9\r\n", ""),
            snapshot("in_progress", "a"),
            http(404, "", r#"{"error":"no such thread"}"#),
            snapshot("in_progress", "ab"),
        ])
        .await;
        let out = run(&adapter(&up, settings()), &st, "u1").await;
        assert_eq!(
            out.ending,
            Ending::Failed(Failure::Lost("no such thread".into()))
        );
        assert_eq!(up.requests.lock().unwrap().len(), 3);
        assert!(up.requests.lock().unwrap()[1].contains("threadId=t9 "));
        let types: Vec<_> = out.events.iter().map(|e| e["type"].clone()).collect();
        assert_eq!(types, ["start", "delta"]);
        assert_eq!(
            Failure::Lost("x".into()).message(),
            "the agent backend lost the run: x"
        );

        // max_failures failures in a row; a success in between resets the count.
        let up = scripted(vec![
            accepted(),
            http(500, "", ""),
            http(200, "", "not json"),
            snapshot("in_progress", ""),
            http(500, "", "oops"),
            http(500, "", "oops"),
            http(502, "", "down"),
        ])
        .await;
        let out = run(&adapter(&up, settings()), &st, "u1").await;
        assert_eq!(
            out.ending,
            Ending::Failed(Failure::Status(502, "down".into()))
        );
        assert_eq!(up.requests.lock().unwrap().len(), 7);

        // The backend says the run failed.
        let up = scripted(vec![accepted(), snapshot("error", "partial")]).await;
        let out = run(&adapter(&up, settings()), &st, "u1").await;
        assert!(matches!(&out.ending, Ending::AgentError(t, _) if t == "no provider key"));
        let last = out.events.last().unwrap();
        assert_eq!(
            (last["type"].as_str(), &last["content"]),
            (Some("error"), &json!({"message": "no provider key"}))
        );
        assert_eq!(out.events[1]["content"], "partial");

        // Stopped by the backend: no closing event (the supervisor writes it).
        let up = scripted(vec![accepted(), snapshot("stopped", "")]).await;
        let out = run(&adapter(&up, settings()), &st, "u1").await;
        assert_eq!(
            out.ending,
            Ending::Backend(RunStatus::Stopped, "no provider key".into())
        );
        assert_eq!(out.events.len(), 1);
    }

    #[tokio::test]
    async fn a_snapshot_over_the_limit_fails_the_poll() {
        let st = store();
        let big = "x".repeat(5000);
        let up = scripted(vec![accepted(), snapshot("completed", &big)]).await;
        let mut s = settings();
        s.max_snapshot_bytes = 4096;
        let out = run(&adapter(&up, s), &st, "u1").await;
        assert!(
            matches!(&out.ending, Ending::Failed(f) if f.message().contains("larger than 4096")),
            "{:?}",
            out.ending
        );
        // Within the limit, the same answer is read.
        let up = scripted(vec![accepted(), snapshot("completed", &big)]).await;
        let out = run(&adapter(&up, settings()), &st, "u1").await;
        assert!(
            matches!(out.ending, Ending::Completed(_)),
            "{:?}",
            out.ending
        );
    }

    #[tokio::test]
    async fn runs_time_out_and_slow_requests_fail() {
        let st = store();
        let up = scripted(vec![accepted(), snapshot("in_progress", "")]).await;
        let mut s = settings();
        s.timeout = Duration::from_millis(150);
        let started = Instant::now();
        let out = run(&adapter(&up, s), &st, "u1").await;
        assert_eq!(
            out.ending,
            Ending::Failed(Failure::RunTimeout(Duration::from_millis(150)))
        );
        assert!(started.elapsed() < Duration::from_secs(2));
        // Retry-After is capped by the time left.
        let up = scripted(vec![accepted(), http(503, "retry-after: 3600\r\n", "")]).await;
        let mut s = settings();
        s.timeout = Duration::from_millis(200);
        let started = Instant::now();
        let out = run(&adapter(&up, s), &st, "u1").await;
        assert!(matches!(out.ending, Ending::Failed(Failure::RunTimeout(_))));
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(up.requests.lock().unwrap().len(), 2);

        // Every request must answer within idle_timeout.
        let up = backend(Duration::from_millis(300), |_| accepted()).await;
        let mut s = settings();
        s.idle_timeout = Duration::from_millis(50);
        let out = run(&adapter(&up, s), &st, "u1").await;
        assert_eq!(
            out.ending,
            Ending::Failed(Failure::IdleTimeout(Duration::from_millis(50)))
        );
    }

    #[tokio::test]
    async fn runs_share_a_bounded_number_of_connections() {
        let polls = Arc::new(AtomicUsize::new(0));
        let p = polls.clone();
        let up = backend(Duration::from_millis(15), move |head| {
            if head.starts_with("POST") {
                accepted()
            } else if p.fetch_add(1, Ordering::SeqCst) < 12 {
                snapshot("in_progress", "")
            } else {
                snapshot("completed", "done")
            }
        })
        .await;
        let mut s = settings();
        s.max_connections = 2;
        let a = adapter(&up, s);
        let st = store();
        let runs: Vec<_> = (0..5).map(|_| run(&a, &st, "u1")).collect();
        let outs = futures_util::future::join_all(runs).await;
        for out in outs {
            assert!(matches!(out.ending, Ending::Completed(_)));
        }
        let most = up.most_open.load(Ordering::SeqCst);
        assert!((1..=2).contains(&most), "{most} connections at once");
    }

    /// A snapshot of a thread holding `messages`, from a backend that renames message ids.
    fn conversation(status: &str, messages: Value) -> String {
        let body = json!({"threadId": "bt 1", "streamStatus": status, "messages": messages});
        http(200, "content-type: application/json\r\n", &body.to_string())
    }

    fn said(id: &str, role: &str, text: &str) -> Value {
        json!({"id": id, "role": role, "parts": [{"type": "text", "text": text}]})
    }

    fn texts(out: &Outcome) -> String {
        out.events
            .iter()
            .filter(|e| e["type"] == "delta")
            .map(|e| e["content"].as_str().unwrap())
            .collect()
    }

    #[tokio::test]
    async fn a_repeated_yes_never_takes_the_previous_turns_answer() {
        // Turn 1: the user said "yes", the agent answered. Turn 2 (this run): "yes" again. The
        // backend renames message ids, so only the text can find the run's message.
        let turn1 = || {
            vec![
                said("srv-1", "user", "yes"),
                said("srv-2", "assistant", "first answer"),
            ]
        };
        let with = |answer: Option<&str>| {
            let mut ms = turn1();
            ms.push(said("srv-3", "user", "yes"));
            if let Some(a) = answer {
                ms.push(said("srv-4", "assistant", a));
            }
            Value::Array(ms)
        };
        let polls = || {
            vec![
                accepted(),
                // The backend has not stored the new "yes" yet: the previous turn, completed.
                conversation("completed", Value::Array(turn1())),
                conversation("completed", Value::Array(turn1())),
                conversation("in_progress", with(None)),
                conversation("in_progress", with(Some("second"))),
                conversation("completed", with(Some("second answer"))),
            ]
        };
        let yes = said("u-mine", "user", "yes");
        // Whether the conversation is read before the invoke, or (that read failing) counted
        // at the first poll, the run takes its own answer and status, never turn 1's.
        for before in [
            conversation("completed", Value::Array(turn1())),
            http(500, "", ""),
        ] {
            let mut script = vec![before];
            script.extend(polls());
            let up = scripted(script).await;
            let thread = BackendThread {
                upstream: up.url.to_string(),
                id: "bt 1".into(),
            };
            let out = run_job(
                &adapter(&up, settings()),
                &store(),
                yes.clone(),
                None,
                Some(thread),
            )
            .await;
            assert!(
                matches!(out.ending, Ending::Completed(_)),
                "{:?}",
                out.ending
            );
            assert_eq!(texts(&out), "second answer");
            let reqs = up.requests.lock().unwrap().clone();
            assert!(reqs[0].starts_with("GET /api/getConversation?threadId=bt%201 "));
            assert!(reqs[1].starts_with("POST /api/invokeAgent "));
            assert_eq!(reqs.len(), 7);
        }
        // A new backend conversation held nothing before: the text match needs no count.
        let up = scripted(vec![
            accepted(),
            conversation("in_progress", json!([said("srv-1", "user", "yes")])),
            conversation("completed", Value::Array(turn1())),
        ])
        .await;
        let out = run_job(&adapter(&up, settings()), &store(), yes.clone(), None, None).await;
        assert!(
            matches!(out.ending, Ending::Completed(_)),
            "{:?}",
            out.ending
        );
        assert_eq!(texts(&out), "first answer");
        assert!(up.requests.lock().unwrap()[0].starts_with("POST "));
    }

    #[tokio::test]
    async fn the_callers_token_goes_with_the_invoke_only() {
        let up = scripted(vec![
            snapshot("completed", "earlier"),
            accepted(),
            snapshot("in_progress", "Hel"),
            snapshot("completed", "Hello"),
        ])
        .await;
        let thread = BackendThread {
            upstream: up.url.to_string(),
            id: "bt 1".into(),
        };
        let message =
            json!({"id": "u1", "role": "user", "parts": [{"type": "text", "text": "hi"}]});
        let out = run_job(
            &adapter(&up, settings()),
            &store(),
            message,
            Some("tok-60s"),
            Some(thread),
        )
        .await;
        assert!(
            matches!(out.ending, Ending::Completed(_)),
            "{:?}",
            out.ending
        );
        let reqs: Vec<String> = up
            .requests
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.to_lowercase())
            .collect();
        let (invokes, polls): (Vec<_>, Vec<_>) = reqs.iter().partition(|r| r.starts_with("post "));
        assert_eq!((invokes.len(), polls.len()), (1, 3));
        assert!(
            invokes[0].contains("\r\nauthorization: bearer tok-60s"),
            "{}",
            invokes[0]
        );
        for poll in polls {
            assert!(poll.starts_with("get /api/getconversation?"), "{poll}");
            assert!(!poll.contains("authorization"), "{poll}");
            assert!(!poll.contains("tok-60s"), "{poll}");
            assert!(
                poll.contains("x-sluice-user-id: user") && poll.contains("x-sluice-run-id: run_")
            );
        }
    }

    /// A snapshot of the run's conversation whose answer reads `text`, with a `search` tool
    /// call in `tool` state if given.
    fn answer(status: &str, text: &str, tool: Option<&str>) -> String {
        let mut parts = vec![json!({"type": "text", "text": text})];
        if let Some(state) = tool {
            let mut t = json!({"type": "tool-search", "toolCallId": "c1", "state": state,
                               "input": {"q": 1}});
            if state == "output-available" {
                t["output"] = json!(2);
            }
            parts.push(t);
        }
        conversation(
            status,
            json!([said("u0", "user", "before"), said("a0", "assistant", "old"),
                   said("u1", "user", "hi"),
                   {"id": "a1", "role": "assistant", "parts": parts}]),
        )
    }

    fn growing() -> Vec<String> {
        vec![
            accepted(),
            answer("in_progress", "Hel", None),
            answer("in_progress", "Hel", None),
            answer("in_progress", "Hello", Some("input-available")),
            answer("in_progress", "Hello wor", Some("output-available")),
            answer("completed", "Hello world", Some("output-available")),
        ]
    }

    /// A run over `script`, cut (the instance gone) after `cut` appended batches and taken over
    /// from its last mark by another adapter over the same backend; or run whole.
    async fn taken_over(script: Vec<String>, cut: Option<usize>) -> (Ending, Vec<Value>, Backend) {
        use crate::ingest::testing::Recorder;
        let up = scripted(script).await;
        let store = Recorder::new();
        let run = store.new_run("hi", "u1").await;
        let job = RunJob {
            run: run.clone(),
            agent_path: "7".into(),
            body: json!({}),
            bearer: None,
            backend_thread: None,
        };
        let sink = || RunSink::new(store.clone(), run.run_id.clone(), None);
        let ending = match cut {
            None => adapter(&up, settings()).run(&job, &sink()).await,
            Some(k) => {
                let (first, dying) = (sink(), adapter(&up, settings()));
                tokio::select! {
                    biased;
                    _ = store.appended(k) => {}
                    e = dying.run(&job, &first) => panic!("ended: {e:?}"),
                }
                let adopted = store.adopted(&run.run_id).await;
                let mut job = RunJob::from_record(adopted.run, &job.record()).unwrap();
                job.backend_thread = store.backend_thread(&job.run.thread_id).await;
                adapter(&up, settings())
                    .resume(&job, adopted.mark.as_deref(), &sink())
                    .await
            }
        };
        if let Some(closing) = ending.closing_event() {
            store
                .finish(
                    &run.run_id,
                    RunStatus::Completed,
                    None,
                    Some(closing.clone()),
                )
                .await
                .unwrap();
        }
        let events = store
            .events(&run.run_id)
            .await
            .iter()
            .map(|e| {
                let e = e.to_string().replace(&run.run_id.0, "RUN");
                serde_json::from_str(&e).unwrap()
            })
            .collect();
        (ending, events, up)
    }

    #[tokio::test]
    async fn a_taken_over_run_polls_on_from_its_checkpoint() {
        let (whole, expected, _) = taken_over(growing(), None).await;
        assert!(matches!(whole, Ending::Completed(_)), "{whole:?}");
        let types: Vec<_> = expected.iter().map(|e| e["type"].clone()).collect();
        assert_eq!(
            types,
            ["start", "delta", "delta", "start", "delta", "end", "delta", "end"]
        );
        // Cut after each append (the start, "Hel", "lo" and the tool's start, …): the
        // instance that takes over logs exactly what the first would have.
        for cut in 1..=4 {
            let (ending, events, up) = taken_over(growing(), Some(cut)).await;
            assert!(matches!(ending, Ending::Completed(_)), "{ending:?}");
            assert_eq!(events, expected, "cut after {cut} batches");
            // Neither the history read nor the invoke again: polls only.
            let reqs = up.requests.lock().unwrap().clone();
            assert_eq!(reqs.len(), 6, "{reqs:?}");
            assert!(reqs[0].starts_with("POST "));
            assert!(reqs[1..]
                .iter()
                .all(|r| r.starts_with("GET /api/getConversation?threadId=bt%201 ")));
        }
    }

    #[tokio::test]
    async fn without_a_checkpoint_a_run_is_polled_only_if_its_thread_is_known() {
        use crate::ingest::testing::Recorder;
        let store = Recorder::new();
        let up = scripted(vec![
            answer("in_progress", "He", None),
            answer("completed", "Hey", None),
        ])
        .await;
        let a = adapter(&up, settings());
        let run = store.new_run("hi", "u1").await;
        let mut job = RunJob {
            run: run.clone(),
            agent_path: "7".into(),
            body: json!({}),
            bearer: None,
            backend_thread: None,
        };
        let sink = RunSink::new(store.clone(), run.run_id.clone(), None);
        let unresumable = |ending: Ending| match ending {
            Ending::Failed(Failure::Unresumable(why)) => why,
            other => panic!("{other:?}"),
        };
        // The backend never named the run's thread: nothing to poll.
        let why = unresumable(a.resume(&job, None, &sink).await);
        assert!(why.contains("before the backend named its thread"), "{why}");
        // A checkpoint that cannot be read, or events logged without one.
        let why = unresumable(a.resume(&job, Some("{"), &sink).await);
        assert!(why.contains("checkpoint cannot be read"), "{why}");
        let mut logged = job.clone();
        logged.run.last_seq = logged.run.first_seq;
        let why = unresumable(a.resume(&logged, None, &sink).await);
        assert!(why.contains("no poll checkpoint"), "{why}");
        assert!(up.requests.lock().unwrap().is_empty());
        // The thread is known: polled from the start (the run's start event first).
        job.backend_thread = Some(BackendThread {
            upstream: up.url.to_string(),
            id: "bt 1".into(),
        });
        let ending = a.resume(&job, None, &sink).await;
        assert!(matches!(ending, Ending::Completed(_)), "{ending:?}");
        let types: Vec<_> = store
            .events(&run.run_id)
            .await
            .iter()
            .map(|e| e["type"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(types, ["start", "delta", "delta"]);
        let reqs = up.requests.lock().unwrap().clone();
        assert!(reqs
            .iter()
            .all(|r| r.starts_with("GET /api/getConversation?threadId=bt%201 ")));
        // Checkpoints are recorded with the appends.
        let mark: Value = serde_json::from_str(&store.mark(&run.run_id).unwrap()).unwrap();
        assert_eq!(
            (&mark["upstream"], &mark["thread"], &mark["seen"]),
            (&json!(up.url.to_string()), &json!("bt 1"), &json!(true))
        );
        assert_eq!(mark["diff"]["parts"][0]["text"], "Hey");
    }
}
