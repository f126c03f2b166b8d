//! The poll adapter, for a dialect-A backend that only offers "start, then poll":
//! `POST {upstream}{invoke_path}` with `X-Stream-Response: false` (answered `202` with the
//! backend's thread id), then `GET {upstream}{conversation_path}?threadId=…` until the snapshot's
//! `streamStatus` is terminal.
//!
//! Each snapshot's assistant message (the one answering the run's user message) is diffed against
//! the previous one by a pure [`SnapshotDiff`], which writes the log's vocabulary
//! ([`Events`]): text that grew becomes a `delta` of the new suffix only, text that was
//! rewritten a `text_replace`, tool parts nested `start`/`end`/`error` calls (and `tool_progress`
//! for preliminary output), sources, files and data parts their own events, anything else an
//! opaque `ui_part`. Nothing is ever retracted.
//!
//! Polling backs off while nothing changes ([`Backoff`]): the interval starts at
//! `interval_min`, grows by `backoff` after each quiet poll up to `interval_max`, and returns to
//! `interval_min` after a change. `429`/`503` answers are waited out (`Retry-After`, seconds or
//! an HTTP date), other failures are retried until `max_failures` in a row, and a `404` once the
//! run has shown means the backend lost it. Until a snapshot shows the run's own user message,
//! a terminal `streamStatus` (the previous turn's) and a `404` (a thread not created yet) are
//! not taken as this run's end. All runs of one adapter share `max_connections` connection
//! permits, held only during a request, never while waiting.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use pingora::connectors::http::Connector;
use pingora::protocols::http::client::HttpSession;
use serde_json::{json, Value};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::agentflow::path_segment;
use super::answer::{error_text, ERROR_BODY_LIMIT};
use super::events::Events;
use super::invoke::{backend_thread, identity_headers, send_failure, InvokeTarget};
use super::{Adapter, Admission, Ending, Failure, RunJob, RunSink};
use crate::client;
use crate::config::UpstreamUrl;
use crate::event::NewEvent;
use crate::metrics;
use crate::store::RunStatus;

/// Most bytes of one conversation snapshot (the whole thread's messages).
const SNAPSHOT_LIMIT: usize = 16 * 1024 * 1024;

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
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Back-off (pure)
// ---------------------------------------------------------------------------------------------

/// The wait between polls: starts at `min`, grows by `factor` after each quiet poll (capped at
/// `max`), returns to `min` after a change. Pure.
#[derive(Clone, Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    factor: f64,
    current: Duration,
}

impl Backoff {
    /// A back-off from `min` to `max` by `factor` (a factor below 1 or not finite counts as 1;
    /// a `max` below `min` as `min`).
    pub fn new(min: Duration, max: Duration, factor: f64) -> Backoff {
        let factor = if factor.is_finite() && factor >= 1.0 {
            factor
        } else {
            1.0
        };
        Backoff {
            min,
            max: max.max(min),
            factor,
            current: min,
        }
    }

    /// The back-off of `settings`.
    pub fn of(settings: &PollSettings) -> Backoff {
        Backoff::new(
            settings.interval_min,
            settings.interval_max,
            settings.backoff,
        )
    }

    /// The wait before the next poll as things stand.
    pub fn current(&self) -> Duration {
        self.current
    }

    /// The last poll brought a change: wait `min`.
    pub fn after_change(&mut self) -> Duration {
        self.current = self.min;
        self.current
    }

    /// The last poll brought nothing new (or failed): wait longer.
    pub fn after_quiet(&mut self) -> Duration {
        let grown = self.current.as_secs_f64() * self.factor;
        let grown = Duration::try_from_secs_f64(grown).unwrap_or(self.max);
        self.current = grown.clamp(self.current, self.max);
        self.current
    }

    /// The backend asked us to slow down (`429`/`503`): wait its `Retry-After` (delta-seconds
    /// or an HTTP date, read at `now`; at least `min`), or, for nonsense or none, the current
    /// wait grown as after a quiet poll. The caller caps the wait by the run's time left.
    pub fn after_throttle(&mut self, retry_after: Option<&str>, now: SystemTime) -> Duration {
        match retry_after.and_then(|v| parse_retry_after(v, now)) {
            Some(d) => d.max(self.min),
            None => self.after_quiet(),
        }
    }
}

/// A `Retry-After` value (RFC 9110 §10.2.3): delta-seconds, or an HTTP date, which is read as
/// the time from `now` until then (zero when it has passed); `None` for anything else.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        let at = httpdate::parse_http_date(v).ok()?;
        return Some(at.duration_since(now).unwrap_or(Duration::ZERO));
    }
    // An absurdly large number is still a (long) wait: the caller caps it by the time left.
    Some(Duration::from_secs(v.parse::<u64>().unwrap_or(u64::MAX)))
}

// ---------------------------------------------------------------------------------------------
// Snapshots (pure)
// ---------------------------------------------------------------------------------------------

/// The run's state according to a snapshot's `streamStatus`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendState {
    /// `in_progress`, or a status we do not know.
    Running,
    /// `completed`.
    Completed,
    /// `error`, with the snapshot's error text (or a default).
    Error(String),
    /// `stopped`, with a message.
    Stopped(String),
    /// `timeout`, with a message.
    Timeout(String),
}

/// Whether a body is a conversation snapshot: a JSON object with a string `streamStatus` (and
/// `messages`, when present, an array).
pub fn parse_snapshot(body: &[u8]) -> Result<Value, String> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| format!("the snapshot is not JSON: {e}"))?;
    if !v.get("streamStatus").is_some_and(Value::is_string) {
        return Err("the snapshot has no streamStatus".into());
    }
    if v.get("messages").is_some_and(|m| !m.is_array()) {
        return Err("the snapshot's messages are not an array".into());
    }
    Ok(v)
}

/// The error text a snapshot carries (`errorText`, `error` as text or `{message}`).
fn snapshot_error(snapshot: &Value) -> Option<String> {
    let pick = snapshot
        .get("errorText")
        .or_else(|| snapshot.pointer("/error/message"))
        .or_else(|| snapshot.get("error"))?;
    pick.as_str()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// The run's state in a snapshot.
pub fn backend_state(snapshot: &Value) -> BackendState {
    let status = snapshot.get("streamStatus").and_then(Value::as_str);
    let text = |default: &str| snapshot_error(snapshot).unwrap_or_else(|| default.to_owned());
    match status {
        Some("completed") => BackendState::Completed,
        Some("error") => BackendState::Error(text("the agent backend reported an error")),
        Some("stopped") => BackendState::Stopped(text("the agent backend stopped the run")),
        Some("timeout") => BackendState::Timeout(text("the agent backend timed out the run")),
        _ => BackendState::Running,
    }
}

/// How a terminal state closes the run: the closing event to append (after the diff's events)
/// and the ending. `None` while the run is in progress.
pub fn closing(events: &Events, state: &BackendState) -> Option<(Option<NewEvent>, Ending)> {
    match state {
        BackendState::Running => None,
        BackendState::Completed => Some((Some(events.end()), Ending::Completed)),
        BackendState::Error(t) => Some((Some(events.error(t)), Ending::AgentError(t.clone()))),
        BackendState::Stopped(t) => Some((None, Ending::Backend(RunStatus::Stopped, t.clone()))),
        BackendState::Timeout(t) => Some((None, Ending::Backend(RunStatus::Timeout, t.clone()))),
    }
}

fn role(m: &Value) -> Option<&str> {
    m.get("role").and_then(Value::as_str)
}

/// The text parts of a message, joined.
fn text_of(m: &Value) -> String {
    m.get("parts")
        .and_then(Value::as_array)
        .map(|parts| {
            parts
                .iter()
                .filter(|p| p.get("type").and_then(Value::as_str) == Some("text"))
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
}

/// Where the run's user message `ours` is in a snapshot: the last user message with its `id`;
/// or, for a backend that renames messages, the last user message if it has the same text.
/// Never an earlier turn's message: until the backend shows the run's own message (its first
/// snapshots may still be the previous turn's), the answer is `None`.
pub fn our_user_message(messages: &[Value], ours: &Value) -> Option<usize> {
    let is_user = |m: &Value| role(m) == Some("user");
    let id = ours.get("id").and_then(Value::as_str);
    let by_id = id.and_then(|id| {
        messages
            .iter()
            .rposition(|m| is_user(m) && m.get("id").and_then(Value::as_str) == Some(id))
    });
    by_id.or_else(|| {
        let last = messages.iter().rposition(is_user)?;
        (text_of(&messages[last]) == text_of(ours)).then_some(last)
    })
}

/// Which of a snapshot's messages answers the run: the first assistant message after the run's
/// user message ([`our_user_message`]) and before the next user message.
pub fn our_message(messages: &[Value], ours: &Value) -> Option<usize> {
    let after = our_user_message(messages, ours)?;
    messages[after + 1..]
        .iter()
        .take_while(|m| role(m) != Some("user"))
        .position(|m| role(m) == Some("assistant"))
        .map(|i| after + 1 + i)
}

/// What was emitted for one part index.
#[derive(Debug, Default)]
struct PartSeen {
    /// The part's type (`None`: never seen).
    ty: Option<String>,
    /// How many times the type at this index changed (names the part `p{i}-{gen}`).
    generation: u32,
    /// Text (or reasoning) emitted so far.
    text: String,
    /// A once-only part was emitted.
    emitted: bool,
    /// The last data part emitted: its id and data.
    data: Option<(Option<String>, Value)>,
}

/// What was emitted for one tool call.
#[derive(Debug, Default)]
struct ToolSeen {
    started: bool,
    done: bool,
    progress: Option<Value>,
}

/// Turns successive snapshots of one assistant message into the log events that say what
/// changed. Pure; never retracts anything, never panics on odd JSON.
#[derive(Debug)]
pub struct SnapshotDiff {
    events: Events,
    parts: Vec<PartSeen>,
    tools: HashMap<String, ToolSeen>,
}

impl SnapshotDiff {
    /// A diff writing events with `events` (whose root call id is the run's).
    pub fn new(events: Events) -> SnapshotDiff {
        SnapshotDiff {
            events,
            parts: Vec::new(),
            tools: HashMap::new(),
        }
    }

    /// The events that bring the log from the previous snapshot of the message to `message`.
    pub fn diff(&mut self, message: &Value) -> Vec<NewEvent> {
        let mut out = Vec::new();
        let Some(parts) = message.get("parts").and_then(Value::as_array) else {
            return out;
        };
        if self.parts.len() < parts.len() {
            self.parts.resize_with(parts.len(), PartSeen::default);
        }
        for (i, part) in parts.iter().enumerate() {
            let Some(ty) = part.get("type").and_then(Value::as_str) else {
                continue;
            };
            let seen = &mut self.parts[i];
            if seen.ty.as_deref() != Some(ty) {
                let generation = seen.generation.saturating_add(u32::from(seen.ty.is_some()));
                *seen = PartSeen {
                    ty: Some(ty.to_owned()),
                    generation,
                    ..PartSeen::default()
                };
            }
            let part_id = PartId(i, seen.generation);
            let ev = &self.events;
            match ty {
                "step-start" => {}
                "text" | "reasoning" => {
                    text_part(ev, seen, part_id, part, ty == "reasoning", &mut out)
                }
                "dynamic-tool" => {
                    let name = part.get("toolName").and_then(Value::as_str).unwrap_or("");
                    tool_part(ev, &mut self.tools, part_id, name, part, &mut out);
                }
                _ if ty.starts_with("tool-") => {
                    tool_part(ev, &mut self.tools, part_id, &ty[5..], part, &mut out)
                }
                _ if ty.starts_with("data-") => data_part(ev, seen, &ty[5..], part, &mut out),
                _ if !seen.emitted => {
                    seen.emitted = true;
                    out.push(once_part(ev, ty, part));
                }
                _ => {}
            }
        }
        out
    }
}

/// The log's name of part `.0` in its `.1`-th incarnation (`p{i}`, then `p{i}-{n}` after the
/// type at that index changed), formatted only when an event needs it.
#[derive(Clone, Copy, Debug)]
struct PartId(usize, u32);

impl std::fmt::Display for PartId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.1 {
            0 => write!(f, "p{}", self.0),
            n => write!(f, "p{}-{n}", self.0),
        }
    }
}

fn str_of<'a>(part: &'a Value, key: &str) -> Option<&'a str> {
    part.get(key).and_then(Value::as_str)
}

fn text_part(
    ev: &Events,
    seen: &mut PartSeen,
    part_id: PartId,
    part: &Value,
    reasoning: bool,
    out: &mut Vec<NewEvent>,
) {
    let text = str_of(part, "text").unwrap_or("");
    if text == seen.text {
        return;
    }
    if let Some(suffix) = text.strip_prefix(seen.text.as_str()) {
        out.push(ev.delta(&part_id.to_string(), suffix, reasoning));
        seen.text.push_str(suffix);
    } else {
        out.push(ev.text_replace(&part_id.to_string(), text, reasoning));
        text.clone_into(&mut seen.text);
    }
}

fn tool_part(
    ev: &Events,
    tools: &mut HashMap<String, ToolSeen>,
    part_id: PartId,
    name: &str,
    part: &Value,
    out: &mut Vec<NewEvent>,
) {
    let fallback;
    let call = match str_of(part, "toolCallId") {
        Some(c) => c,
        None => {
            fallback = part_id.to_string();
            &fallback
        }
    };
    if !tools.contains_key(call) {
        tools.insert(call.to_owned(), ToolSeen::default());
    }
    let Some(seen) = tools.get_mut(call) else {
        return;
    };
    if seen.done {
        return;
    }
    let state = str_of(part, "state");
    match state {
        Some("input-streaming") => return,
        None if part.get("input").is_none() => return,
        _ => {}
    }
    if !seen.started {
        seen.started = true;
        let input = part.get("input").cloned().unwrap_or(Value::Null);
        out.push(ev.tool_start(call, name, input));
    }
    let output = part.get("output").unwrap_or(&Value::Null);
    let preliminary = part.get("preliminary") == Some(&Value::Bool(true));
    if state == Some("output-available") && preliminary {
        // Not final: progress, each time it changes.
        if seen.progress.as_ref() != Some(output) {
            seen.progress = Some(output.clone());
            out.push(ev.raw(json!({
                "type": "tool_progress",
                "call_id": call,
                "parent_call_id": ev.root(),
                "root_call_id": ev.root(),
                "content": {"output": output, "preliminary": true},
            })));
        }
        return;
    }
    match state {
        Some("output-available") => {
            seen.done = true;
            out.push(ev.tool_end(call, output.clone()));
        }
        Some("output-error") => {
            seen.done = true;
            let text = str_of(part, "errorText").unwrap_or("the tool call failed");
            out.push(ev.tool_error(call, text));
        }
        Some("output-denied") => {
            seen.done = true;
            out.push(ev.tool_error(call, "the tool call was denied"));
        }
        _ => {}
    }
}

fn data_part(ev: &Events, seen: &mut PartSeen, name: &str, part: &Value, out: &mut Vec<NewEvent>) {
    let id = str_of(part, "id");
    let data = part.get("data").unwrap_or(&Value::Null);
    let fresh = match &seen.data {
        None => true,
        Some((prev_id, prev)) => id.is_some() && (prev_id.as_deref() != id || prev != data),
    };
    if fresh {
        out.push(ev.data(name, id, data.clone(), false));
        seen.data = Some((id.map(str::to_owned), data.clone()));
    }
}

/// A part emitted once per index: a source, a file, or (for other types, or when the fields
/// the log needs are missing) the part itself as opaque data.
fn once_part(ev: &Events, ty: &str, part: &Value) -> NewEvent {
    let s = |k| str_of(part, k);
    match ty {
        "source-url" => match s("url") {
            Some(url) => ev.source_url(s("sourceId").unwrap_or(""), url, s("title")),
            None => ev.ui_part(part.clone()),
        },
        "source-document" => ev.source_document(
            s("sourceId").unwrap_or(""),
            s("mediaType").unwrap_or(""),
            s("title").unwrap_or(""),
            s("filename"),
        ),
        "file" => match s("url") {
            Some(url) => ev.file(url, s("mediaType").unwrap_or("")),
            None => ev.ui_part(part.clone()),
        },
        _ => ev.ui_part(part.clone()),
    }
}

// ---------------------------------------------------------------------------------------------
// The adapter (I/O)
// ---------------------------------------------------------------------------------------------

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
        self.target.remember(&job.run.thread_id, up, &thread);
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
        let reply = match self.exchange(deadline, up, SNAPSHOT_LIMIT, send).await? {
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

    async fn drive(&self, job: &RunJob, sink: &RunSink) -> Ending {
        let s = &self.settings;
        let now = Instant::now();
        let deadline = now
            .checked_add(s.timeout)
            .unwrap_or(now + Duration::from_secs(100 * 365 * 86_400));
        let events = Events::new(job.run.run_id.0.clone());
        let up = self.target.pick_for(&job.run.thread_id);
        let thread = match self.start(up, job, sink, deadline).await {
            Ok(t) => t,
            Err(ending) => return ending,
        };
        if let Err(ending) = sink.append(vec![events.start()]).await {
            return ending;
        }
        let path = format!("{}?threadId={}", s.conversation_path, path_segment(&thread));
        let mut headers = identity_headers(job);
        headers.push(("accept", "application/json".to_string()));
        let ours = &job.run.user_message;
        let mut diff = SnapshotDiff::new(events.clone());
        let mut backoff = Backoff::of(s);
        let mut last: Option<Value> = None;
        let mut failures = 0u32;
        // Whether a snapshot has shown the run's user message yet; until then a 404 or a
        // terminal status may be the backend catching up (or the previous turn's status).
        let mut seen = false;
        let mut unseen_terminal = 0u32;
        let mut wait = backoff.current();
        loop {
            let wake = Instant::now().checked_add(wait).unwrap_or(deadline);
            tokio::time::sleep_until(wake.min(deadline)).await;
            if Instant::now() >= deadline {
                return self.run_timeout();
            }
            let Some(answer) = self.poll(up, &path, &headers, deadline).await else {
                count("failed");
                return self.run_timeout();
            };
            match answer {
                Answer::Snapshot(mut snapshot) => {
                    failures = 0;
                    let mut state = backend_state(&snapshot);
                    let messages = snapshot.get_mut("messages").and_then(Value::as_array_mut);
                    seen = seen
                        || messages
                            .as_deref()
                            .is_some_and(|ms| our_user_message(ms, ours).is_some());
                    if !seen && state != BackendState::Running {
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
                        messages.and_then(|ms| our_message(ms, ours).map(|i| ms[i].take()));
                    let mut batch = message.as_ref().map(|m| diff.diff(m)).unwrap_or_default();
                    let changed = !batch.is_empty() || message != last;
                    last = message;
                    count(if changed { "changed" } else { "unchanged" });
                    let ending = closing(&events, &state).map(|(closing_event, ending)| {
                        batch.extend(closing_event);
                        ending
                    });
                    if let Err(ending) = sink.append(batch).await {
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
                Answer::Lost(text) if !seen => {
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
                        format!("{} answered 404 for thread {thread}", s.conversation_path)
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn json_of(e: &NewEvent) -> Value {
        serde_json::from_slice(&e.data).expect("events are JSON")
    }

    fn types(events: &[NewEvent]) -> Vec<String> {
        events
            .iter()
            .map(|e| json_of(e)["type"].as_str().unwrap_or("").to_owned())
            .collect()
    }

    fn msg(parts: Value) -> Value {
        json!({"id": "a1", "role": "assistant", "parts": parts})
    }

    fn differ() -> SnapshotDiff {
        SnapshotDiff::new(Events::new("run_1"))
    }

    /// The text a reader rebuilds for part `p0` from deltas and replaces.
    fn rebuild(events: &[NewEvent], into: &mut String) {
        for e in events {
            let v = json_of(e);
            let content = v["content"].as_str().unwrap_or("");
            match v["type"].as_str() {
                Some("delta") => into.push_str(content),
                Some("text_replace") => content.clone_into(into),
                other => panic!("unexpected event {other:?}"),
            }
        }
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            ".{0,6}".prop_map(Value::String),
            prop::sample::select(vec![
                "text",
                "reasoning",
                "tool-x",
                "dynamic-tool",
                "data-p",
                "source-url",
                "source-document",
                "file",
                "step-start",
                "input-available",
                "output-available",
                "output-error",
                "input-streaming",
                "c1",
                "p1",
                "tool-",
            ])
            .prop_map(|s| json!(s)),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::vec(
                    (
                        prop::sample::select(vec![
                            "type",
                            "text",
                            "parts",
                            "toolCallId",
                            "toolName",
                            "state",
                            "input",
                            "output",
                            "errorText",
                            "preliminary",
                            "id",
                            "data",
                            "url",
                            "sourceId",
                            "mediaType",
                            "title",
                        ]),
                        inner
                    ),
                    0..6
                )
                .prop_map(|kv| Value::Object(
                    kv.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
                )),
            ]
        })
    }

    proptest! {
        #[test]
        fn growing_text_is_sent_once_as_deltas(chunks in prop::collection::vec(".{0,8}", 1..24)) {
            let mut d = differ();
            let mut text = String::new();
            let mut sent = String::new();
            for c in &chunks {
                text.push_str(c);
                let evs = d.diff(&msg(json!([{"type": "text", "text": text}])));
                for e in &evs {
                    let v = json_of(e);
                    prop_assert_eq!(v["type"].as_str(), Some("delta"));
                    prop_assert_eq!(v["metadata"]["part_id"].as_str(), Some("p0"));
                    let piece = v["content"].as_str().unwrap();
                    prop_assert!(!piece.is_empty());
                    sent.push_str(piece);
                }
                prop_assert_eq!(&sent, &text);
            }
            prop_assert_eq!(sent.len(), text.len());
        }

        #[test]
        fn rewritten_text_is_reconstructible(
            ops in prop::collection::vec((any::<bool>(), ".{0,8}"), 1..24),
            reasoning in any::<bool>(),
        ) {
            let ty = if reasoning { "reasoning" } else { "text" };
            let mut d = differ();
            let mut text = String::new();
            let mut rebuilt = String::new();
            for (rewrite, s) in &ops {
                if *rewrite {
                    text = s.clone();
                } else {
                    text.push_str(s);
                }
                let evs = d.diff(&msg(json!([{"type": "step-start"}, {"type": ty, "text": text}])));
                for e in &evs {
                    let v = json_of(e);
                    prop_assert_eq!(v["metadata"]["part_id"].as_str(), Some("p1"));
                    prop_assert_eq!(v["metadata"]["reasoning"].as_bool().unwrap_or(false), reasoning);
                }
                rebuild(&evs, &mut rebuilt);
                prop_assert_eq!(&rebuilt, &text);
            }
        }

        #[test]
        fn any_json_never_panics(messages in prop::collection::vec(arb_json(), 1..6)) {
            let mut d = differ();
            for m in &messages {
                d.diff(m);
                d.diff(&json!({"parts": m}));
                d.diff(&json!({"parts": [m, m]}));
            }
            let snapshot = json!({"streamStatus": "in_progress", "messages": messages});
            let ms = snapshot["messages"].as_array().unwrap();
            let _ = our_message(ms, &json!({"id": "p1"}));
            let _ = backend_state(&snapshot);
        }

        #[test]
        fn parts_that_shrink_or_change_type_never_panic(
            sizes in prop::collection::vec((0usize..6, 0usize..3), 1..10),
        ) {
            let kinds = ["text", "reasoning", "data-x"];
            let mut d = differ();
            for (n, k) in sizes {
                let parts: Vec<Value> = (0..n)
                    .map(|i| json!({"type": kinds[(i + k) % 3], "text": format!("t{i}"), "data": i}))
                    .collect();
                d.diff(&msg(Value::Array(parts)));
            }
        }
    }

    #[test]
    fn a_part_whose_type_changes_is_a_new_part() {
        let mut d = differ();
        d.diff(&msg(json!([{"type": "text", "text": "ab"}])));
        let evs = d.diff(&msg(json!([{"type": "reasoning", "text": "abc"}])));
        let v = json_of(&evs[0]);
        assert_eq!(
            (
                v["type"].as_str(),
                v["content"].as_str(),
                v["metadata"]["part_id"].as_str()
            ),
            (Some("delta"), Some("abc"), Some("p0-1"))
        );
        // Fewer parts: nothing retracted, nothing sent.
        assert!(d.diff(&msg(json!([]))).is_empty());
        assert!(d.diff(&json!({"parts": "nope"})).is_empty());
    }

    #[test]
    fn tools_start_once_and_end_once() {
        let mut d = differ();
        let tool = |state: &str, extra: Value| {
            let mut p = json!({"type": "tool-search", "toolCallId": "c1", "state": state});
            p.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            msg(json!([p]))
        };
        assert!(d
            .diff(&tool("input-streaming", json!({"input": {"q": "we"}})))
            .is_empty());
        let evs = d.diff(&tool("input-available", json!({"input": {"q": "weather"}})));
        let v = json_of(&evs[0]);
        assert_eq!(evs.len(), 1);
        assert_eq!(
            (
                v["type"].as_str(),
                v["call_id"].as_str(),
                v["parent_call_id"].as_str()
            ),
            (Some("start"), Some("c1"), Some("run_1"))
        );
        assert_eq!(
            v["content"],
            json!({"tool_name": "search", "input": {"q": "weather"}})
        );
        assert!(d
            .diff(&tool("input-available", json!({"input": {"q": "weather"}})))
            .is_empty());
        // Preliminary output: progress each time it changes, not final.
        let pre = |n| json!({"input": {}, "output": {"n": n}, "preliminary": true});
        let evs = d.diff(&tool("output-available", pre(1)));
        assert_eq!(types(&evs), ["tool_progress"]);
        assert_eq!(
            json_of(&evs[0])["content"],
            json!({"output": {"n": 1}, "preliminary": true})
        );
        assert!(d.diff(&tool("output-available", pre(1))).is_empty());
        assert_eq!(
            types(&d.diff(&tool("output-available", pre(2)))),
            ["tool_progress"]
        );
        let evs = d.diff(&tool("output-available", json!({"output": {"n": 3}})));
        assert_eq!(types(&evs), ["end"]);
        assert_eq!(json_of(&evs[0])["content"], json!({"output": {"n": 3}}));
        assert!(d
            .diff(&tool("output-available", json!({"output": {"n": 4}})))
            .is_empty());

        // A call first seen finished: start (input or null) then end; errors once.
        let mut d = differ();
        let evs = d.diff(&msg(json!([
            {"type": "dynamic-tool", "toolName": "calc", "toolCallId": "c2",
             "state": "output-available", "output": 4},
            {"type": "tool-fetch", "toolCallId": "c3", "state": "output-error",
             "input": {"u": 1}, "errorText": "boom"},
        ])));
        assert_eq!(types(&evs), ["start", "end", "start", "error"]);
        assert_eq!(
            json_of(&evs[0])["content"],
            json!({"tool_name": "calc", "input": null})
        );
        assert_eq!(json_of(&evs[3])["content"], json!({"message": "boom"}));
        assert!(d
            .diff(&msg(json!([
                {"type": "dynamic-tool", "toolName": "calc", "toolCallId": "c2",
                 "state": "output-available", "output": 4},
                {"type": "tool-fetch", "toolCallId": "c3", "state": "output-error",
                 "input": {"u": 1}, "errorText": "boom"},
            ])))
            .is_empty());
    }

    #[test]
    fn sources_files_and_unknown_parts_are_sent_once() {
        let mut d = differ();
        let parts = json!([
            {"type": "step-start"},
            {"type": "source-url", "sourceId": "s1", "url": "https://e.x", "title": "E"},
            {"type": "source-document", "sourceId": "s2", "mediaType": "application/pdf",
             "title": "Doc", "filename": "d.pdf"},
            {"type": "file", "mediaType": "image/png", "url": "data:image/png;base64,AA=="},
            {"type": "mystery", "x": 1},
            {"type": "source-url", "sourceId": "s3"},
        ]);
        let evs = d.diff(&msg(parts.clone()));
        assert_eq!(
            types(&evs),
            ["source", "source", "file", "ui_part", "ui_part"]
        );
        assert_eq!(
            json_of(&evs[0])["content"],
            json!({"source_type": "url", "source_id": "s1", "url": "https://e.x", "title": "E"})
        );
        assert_eq!(
            json_of(&evs[1])["content"],
            json!({"source_type": "document", "source_id": "s2", "media_type": "application/pdf",
                   "title": "Doc", "filename": "d.pdf"})
        );
        assert_eq!(
            json_of(&evs[2])["content"],
            json!({"url": "data:image/png;base64,AA==", "media_type": "image/png"})
        );
        assert_eq!(
            json_of(&evs[3])["content"],
            json!({"type": "mystery", "x": 1})
        );
        assert!(d.diff(&msg(parts)).is_empty());
    }

    #[test]
    fn data_parts_update_by_id_and_otherwise_once() {
        let mut d = differ();
        let snap = |pct: u32| {
            msg(json!([
                {"type": "data-progress", "id": "p1", "data": {"pct": pct}},
                {"type": "data-note", "data": {"n": pct}},
            ]))
        };
        let evs = d.diff(&snap(10));
        assert_eq!(types(&evs), ["data", "data"]);
        assert_eq!(
            json_of(&evs[0])["content"],
            json!({"name": "progress", "id": "p1", "data": {"pct": 10}})
        );
        assert_eq!(
            json_of(&evs[1])["content"],
            json!({"name": "note", "data": {"n": 10}})
        );
        assert!(d.diff(&snap(10)).is_empty());
        let evs = d.diff(&snap(50));
        assert_eq!(evs.len(), 1);
        assert_eq!(
            json_of(&evs[0])["content"],
            json!({"name": "progress", "id": "p1", "data": {"pct": 50}})
        );
    }

    #[test]
    fn our_message_follows_the_runs_user_message() {
        let user = |id: &str, text: &str| json!({"id": id, "role": "user", "parts": [{"type": "text", "text": text}]});
        let ms = json!([
            user("u0", "hi"), {"id": "a0", "role": "assistant"},
            user("u1", "again"), {"id": "s", "role": "system"},
            {"id": "a1", "role": "assistant"}, {"id": "a1b", "role": "assistant"},
            user("u2", "third"),
        ]);
        let ms = ms.as_array().unwrap();
        assert_eq!(our_message(ms, &user("u0", "hi")), Some(1));
        assert_eq!(our_message(ms, &user("u1", "again")), Some(4));
        // The run's own message has no answer yet: not the next turn's.
        assert_eq!(our_message(ms, &user("u2", "third")), None);
        assert_eq!(our_user_message(ms, &user("u2", "third")), Some(6));
        // A backend that renamed the message: the last user message, if it says the same.
        assert_eq!(our_message(&ms[..6], &user("zz", "again")), Some(4));
        // Not yet shown (the snapshot still ends at the previous turn): never that turn's answer.
        assert_eq!(our_user_message(&ms[..6], &user("zz", "new")), None);
        assert_eq!(our_message(&ms[..6], &user("zz", "new")), None);
        assert_eq!(our_message(&ms[..6], &json!({})), None);
        assert_eq!(our_message(&[], &user("u1", "again")), None);
        assert_eq!(our_message(&ms[1..2], &user("x", "")), None);
    }

    #[test]
    fn terminal_statuses_close_the_run() {
        let ev = Events::new("r");
        let state = |v: Value| backend_state(&v);
        assert_eq!(
            state(json!({"streamStatus": "in_progress"})),
            BackendState::Running
        );
        assert_eq!(
            state(json!({"streamStatus": "paused"})),
            BackendState::Running
        );
        assert_eq!(state(json!({})), BackendState::Running);
        assert!(closing(&ev, &BackendState::Running).is_none());

        let (e, end) = closing(&ev, &state(json!({"streamStatus": "completed"}))).unwrap();
        assert_eq!(end, Ending::Completed);
        assert_eq!(json_of(&e.unwrap())["type"], "end");

        let (e, end) = closing(
            &ev,
            &state(json!({"streamStatus": "error", "errorText": "no key"})),
        )
        .unwrap();
        assert_eq!(end, Ending::AgentError("no key".into()));
        assert_eq!(
            json_of(&e.unwrap())["content"],
            json!({"message": "no key"})
        );
        let (_, end) = closing(&ev, &state(json!({"streamStatus": "error"}))).unwrap();
        assert_eq!(
            end,
            Ending::AgentError("the agent backend reported an error".into())
        );
        let (_, end) = closing(
            &ev,
            &state(json!({"streamStatus": "error", "error": {"message": "quota"}})),
        )
        .unwrap();
        assert_eq!(end, Ending::AgentError("quota".into()));

        let (e, end) = closing(&ev, &state(json!({"streamStatus": "stopped"}))).unwrap();
        assert!(e.is_none());
        assert!(matches!(end, Ending::Backend(RunStatus::Stopped, _)));
        let (e, end) = closing(
            &ev,
            &state(json!({"streamStatus": "timeout", "error": "slow"})),
        )
        .unwrap();
        assert!(e.is_none());
        assert_eq!(end, Ending::Backend(RunStatus::Timeout, "slow".into()));
    }

    #[test]
    fn snapshots_must_be_json_objects_with_a_status() {
        assert!(parse_snapshot(br#"{"streamStatus":"in_progress","messages":[]}"#).is_ok());
        assert!(parse_snapshot(br#"{"streamStatus":"completed"}"#).is_ok());
        assert!(parse_snapshot(b"<html>").is_err());
        assert!(parse_snapshot(br#"{"messages":[]}"#).is_err());
        assert!(parse_snapshot(br#"{"streamStatus":"x","messages":{}}"#).is_err());
        assert!(parse_snapshot(b"[]").is_err());
    }

    #[test]
    fn backoff_grows_while_quiet_and_resets_on_change() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(250), ms(5000), 1.5);
        assert_eq!(b.current(), ms(250));
        let quiet: Vec<_> = (0..9).map(|_| b.after_quiet().as_millis()).collect();
        assert_eq!(quiet, [375, 562, 843, 1265, 1898, 2847, 4271, 5000, 5000]);
        assert_eq!(b.after_change(), ms(250));
        assert_eq!(b.after_quiet(), ms(375));
        // Throttles: a delta-seconds value or a date is waited (at least min) without changing
        // the curve; anything else grows the wait as a quiet poll would.
        let now = httpdate::parse_http_date("Wed, 21 Oct 2015 07:28:00 GMT").unwrap();
        assert_eq!(b.after_throttle(Some("3"), now), ms(3000));
        assert_eq!(b.after_throttle(Some("0"), now), ms(250));
        assert_eq!(b.current(), ms(375));
        assert_eq!(
            b.after_throttle(Some("Wed, 21 Oct 2015 07:28:07 GMT"), now),
            ms(7000)
        );
        assert_eq!(
            b.after_throttle(Some("Wed, 21 Oct 2015 07:27:00 GMT"), now),
            ms(250)
        );
        assert_eq!(b.current(), ms(375));
        assert_eq!(b.after_throttle(Some("soon"), now).as_millis(), 562);
        assert_eq!(b.after_throttle(None, now).as_millis(), 843);
        assert_eq!(b.after_throttle(Some("-1"), now).as_millis(), 1265);
        // Odd settings stay sane.
        let mut flat = Backoff::new(ms(100), ms(10), f64::NAN);
        assert_eq!((flat.after_quiet(), flat.after_quiet()), (ms(100), ms(100)));
        let mut huge = Backoff::new(ms(100), Duration::MAX, 1e300);
        assert_eq!(huge.after_quiet(), Duration::MAX);
        assert_eq!(huge.after_quiet(), Duration::MAX);
    }

    #[test]
    fn retry_after_is_delta_seconds_or_an_http_date() {
        let now = httpdate::parse_http_date("Wed, 21 Oct 2015 07:28:00 GMT").unwrap();
        let p = |v: &str| parse_retry_after(v, now);
        assert_eq!(p("5"), Some(Duration::from_secs(5)));
        assert_eq!(p(" 12 "), Some(Duration::from_secs(12)));
        assert_eq!(p("0"), Some(Duration::ZERO));
        assert_eq!(
            p("99999999999999999999999"),
            Some(Duration::from_secs(u64::MAX))
        );
        assert_eq!(
            p("Wed, 21 Oct 2015 07:29:30 GMT"),
            Some(Duration::from_secs(90))
        );
        assert_eq!(p("Tue, 20 Oct 2015 07:28:00 GMT"), Some(Duration::ZERO));
        for bad in ["", "1.5", "-1", "+3", "soon", "1 2", "Wed, 99 Oct 2015"] {
            assert_eq!(p(bad), None, "{bad}");
        }
    }

    // -----------------------------------------------------------------------------------------
    // The adapter against a scripted backend
    // -----------------------------------------------------------------------------------------

    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use crate::store::memory::{MemoryLimits, MemoryStore};
    use crate::store::{NewRun, Store};

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
        }
    }

    struct Outcome {
        ending: Ending,
        admission: Option<Admission>,
        events: Vec<Value>,
        thread: crate::store::ThreadId,
    }

    async fn run(adapter: &PollAdapter, store: &Arc<MemoryStore>, user: &str) -> Outcome {
        let started = store
            .create_run(NewRun {
                thread_id: None,
                org_id: "org".into(),
                user_id: "user".into(),
                agent_id: json!(7),
                user_message: json!({"id": user, "role": "user", "parts": [{"type": "text", "text": "hi"}]}),
                idempotency_key: None,
                conversation: None,
            })
            .await
            .unwrap();
        let job = RunJob {
            run: started.run,
            agent_path: "7".into(),
            body: json!({}),
            bearer: None,
        };
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let sink = RunSink {
            store: store.clone(),
            run: job.run.run_id.clone(),
            admission: Mutex::new(Some(tx)),
        };
        let ending = adapter.run(&job, &sink).await;
        let events = store
            .read_after(&job.run.run_id, 0, 1000)
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
            thread: job.run.thread_id.clone(),
        }
    }

    fn store() -> Arc<MemoryStore> {
        Arc::new(MemoryStore::new(MemoryLimits {
            max_events_per_run: 10_000,
            max_bytes_per_run: 1 << 24,
            max_total_bytes: 1 << 26,
            retention: Duration::from_secs(60),
            retry_after: Duration::from_secs(1),
        }))
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
        assert_eq!(out.ending, Ending::Completed);
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
        assert_eq!(
            a.target.threads.get(&out.thread).map(|(_, t)| t).as_deref(),
            Some("bt 1")
        );
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
        assert_eq!(out.ending, Ending::Completed);
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
        assert_eq!(out.ending, Ending::AgentError("no provider key".into()));
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
            assert_eq!(out.ending, Ending::Completed);
        }
        let most = up.most_open.load(Ordering::SeqCst);
        assert!((1..=2).contains(&most), "{most} connections at once");
    }
}
