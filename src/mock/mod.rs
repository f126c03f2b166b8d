//! The mock agent backend (`sluice mock-agent --dialect …`): a real HTTP server speaking one
//! backend [`Dialect`], with deterministic scenarios picked by the message text (see
//! [`scenario`]). Tests, the demo and benchmarks run against it.
//!
//! - `agentflow` (default): `POST /agents/{id}/run`, answered with the AgentFlow SSE stream,
//!   each event with an `id:` line (its `seq`). A run keeps its own clock once started, whether
//!   or not anyone reads it, and is remembered by `(conversation_id, message_id)` (the last
//!   10,000): a request naming a remembered run with `Last-Event-ID` (the header, else
//!   `last_event_id` in the body) continues that run, with the events after that id, at once
//!   for those already due and then at the run's own pace, and never starts another (`404
//!   run_not_found` if no such run is remembered); one without it re-attaches (from its first
//!   event) while the run still plays, and starts a new run once it has ended (a retry after a
//!   failure).
//! - `ui-message`: `POST /api/invokeAgent` answered with the AI SDK v5 UI-message stream
//!   (`x-thread-id`, `x-vercel-ai-ui-message-stream: v1`), or `202` as `poll` does when the
//!   request says `X-Stream-Response: false`; plus `GET /api/getConversation?threadId=…`.
//! - `poll`: `POST /api/invokeAgent` always answers `202 {threadId, status}` and runs the
//!   scenario in the background; `GET /api/getConversation?threadId=…` shows it growing.
//!
//! Every dialect plays the same scenario timeline, translated by the mock's own
//! [`translate`] module, so one scenario yields the same content in all three. Dialect A's
//! routes live in [`invoke`].
//!
//! It also answers `GET /mock/active` with `{"active": <streams being played>, "polls":
//! <getConversation requests>, "polls_in_flight_max": <the most answered at once>}`, and
//! `GET /mock/requests` with the last run requests it received (path, `x-sluice-*`,
//! `authorization`, `accept`, `content-type`, `x-stream-response`, `last-event-id` headers,
//! body), so tests can check what the gateway sent, `GET /mock/runs` with the AgentFlow runs it
//! played: `{"runs": <runs started>, "continued": <requests that continued a run after a
//! Last-Event-ID>, "attached": <requests without one that re-attached to a playing run>,
//! "by_message": {"<message_id>": <runs started for it>}}` (one backend run per message is
//! `by_message[id] == 1`), and, in the demo, serves the demo identity's JWKS. Agent ids starting with `missing`, `locked` or `secret` answer 404, 401 and 403, as a
//! backend does for an agent the caller may not use.

pub mod invoke;
pub mod scenario;
#[cfg(test)]
pub(crate) mod testing;
pub mod translate;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use dashmap::DashMap;
use serde_json::{json, Value};

use crate::api::{Exchange, Reply};
use crate::server::exchange::LocalApp;
use scenario::{Plan, Step, Timeline};

/// Requests remembered for `GET /mock/requests`.
const REMEMBERED: usize = 200;

/// AgentFlow runs (and messages) remembered for retries and `Last-Event-ID`.
const RUNS_REMEMBERED: usize = 10_000;

/// The backend dialect the mock speaks (`--dialect`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Dialect {
    /// AgentFlow "Run Agent": `POST /agents/{id}/run`, AgentFlow SSE.
    #[default]
    #[value(name = "agentflow")]
    AgentFlow,
    /// "Invoke an agent" answering with the AI SDK v5 UI-message stream (or 202 on request).
    #[value(name = "ui-message")]
    UiMessage,
    /// "Invoke an agent", poll only: 202, then `getConversation` snapshots.
    #[value(name = "poll")]
    Poll,
}

impl Dialect {
    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Dialect::AgentFlow => "agentflow",
            Dialect::UiMessage => "ui-message",
            Dialect::Poll => "poll",
        }
    }
}

/// The mock agent's state.
#[derive(Default)]
pub struct MockAgent {
    dialect: Dialect,
    /// Streams being played right now.
    active: AtomicUsize,
    /// `getConversation` requests answered.
    polls: AtomicU64,
    /// getConversation requests being answered now, and the most at once.
    polls_in_flight: AtomicUsize,
    polls_in_flight_max: AtomicUsize,
    turns: DashMap<String, u64>,
    /// AgentFlow runs, for retries and `Last-Event-ID`.
    runs: Mutex<RunBook>,
    /// Dialect A's threads (shared with the runs playing in the background).
    threads: Arc<invoke::Threads>,
    requests: Mutex<VecDeque<Value>>,
    jwks: Option<Value>,
}

/// One AgentFlow run: what it plays (rebuilt from these, the scenario being deterministic) and
/// its clock.
#[derive(Clone, Debug)]
struct MockRun {
    message: String,
    turn: u64,
    tag: String,
    started: tokio::time::Instant,
    /// When its timeline ends (its last step, a drop, or the end of a hang).
    ends: tokio::time::Instant,
}

/// The AgentFlow runs remembered, by `conversation_id` and `message_id`, and their counts.
#[derive(Default)]
struct RunBook {
    runs: HashMap<(String, String), MockRun>,
    order: VecDeque<(String, String)>,
    by_message: HashMap<String, u64>,
    messages: VecDeque<String>,
    started: u64,
    continued: u64,
    attached: u64,
}

impl RunBook {
    fn start(&mut self, key: (String, String), run: MockRun) {
        self.started += 1;
        let message = key.1.clone();
        match self.by_message.get_mut(&message) {
            Some(n) => *n += 1,
            None => {
                if self.messages.len() == RUNS_REMEMBERED {
                    if let Some(old) = self.messages.pop_front() {
                        self.by_message.remove(&old);
                    }
                }
                self.messages.push_back(message.clone());
                self.by_message.insert(message, 1);
            }
        }
        if self.runs.insert(key.clone(), run).is_none() {
            if self.order.len() == RUNS_REMEMBERED {
                if let Some(old) = self.order.pop_front() {
                    self.runs.remove(&old);
                }
            }
            self.order.push_back(key);
        }
    }

    fn json(&self) -> Value {
        json!({
            "runs": self.started,
            "continued": self.continued,
            "attached": self.attached,
            "by_message": self.by_message,
        })
    }
}

/// How long a timeline plays: up to its end, its drop, or the end of its hang.
fn duration(frames: &[(Option<u64>, Step)]) -> Duration {
    let mut ms = 0u64;
    for (_, step) in frames {
        match step {
            Step::Sleep(n) => ms = ms.saturating_add(*n),
            Step::Hang(n) => return Duration::from_millis(ms.saturating_add(*n)),
            Step::Drop => break,
            Step::Send(_) => {}
        }
    }
    Duration::from_millis(ms)
}

/// The `Last-Event-ID` of a run request: the header, else `last_event_id` in the body (a
/// string or a number); `Err` if it is not an event id.
fn last_event_id(ex: &dyn Exchange, body: &Value) -> Result<Option<u64>, Reply> {
    let given = match ex.header("last-event-id") {
        Some(h) => Some(h.trim().to_string()),
        None => match body.get("last_event_id") {
            Some(Value::String(s)) => Some(s.trim().to_string()),
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        },
    };
    match given.filter(|g| !g.is_empty()) {
        None => Ok(None),
        Some(g) => g.parse().map(Some).map_err(|_| {
            error_reply(
                400,
                "invalid_request",
                format!("Last-Event-ID {g:?} is not an event id of this backend"),
            )
        }),
    }
}

impl MockAgent {
    /// A fresh mock agent speaking AgentFlow.
    pub fn new() -> Self {
        MockAgent::default()
    }

    /// Speak `dialect` instead.
    pub fn with_dialect(mut self, dialect: Dialect) -> Self {
        self.dialect = dialect;
        self
    }

    /// Also serve this JWKS at `GET /.well-known/jwks.json` (the demo's identity provider).
    pub fn with_jwks(mut self, jwks: Value) -> Self {
        self.jwks = Some(jwks);
        self
    }

    fn remember(&self, ex: &dyn Exchange, body: &Value) {
        let mut headers = serde_json::Map::new();
        for name in [
            "x-sluice-org-id",
            "x-sluice-user-id",
            "x-sluice-run-id",
            "x-sluice-thread-id",
            "authorization",
            "content-type",
            "accept",
            "x-stream-response",
            "last-event-id",
        ] {
            if let Some(v) = ex.header(name) {
                headers.insert(name.into(), json!(v));
            }
        }
        let mut q = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() == REMEMBERED {
            q.pop_front();
        }
        q.push_back(json!({"path": ex.path(), "headers": headers, "body": body}));
    }

    async fn run(&self, ex: &mut dyn Exchange) {
        let body = match ex.read_body(8 * 1024 * 1024).await {
            Ok(b) => b,
            Err(e) => {
                let _ = ex.respond(e.reply()).await;
                return;
            }
        };
        let body: Value = match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => {
                let _ = ex
                    .respond(Reply::json(
                        400,
                        &json!({"error": {"message": e.to_string()}}),
                    ))
                    .await;
                return;
            }
        };
        self.remember(ex, &body);
        let Some(message) = body.get("message").and_then(Value::as_str) else {
            let _ = ex
                .respond(Reply::json(
                    400,
                    &json!({"error": {"message": "`message` is required"}}),
                ))
                .await;
            return;
        };
        let conversation = body
            .get("conversation_id")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let message_id = body.get("message_id").and_then(Value::as_str);
        let after = match last_event_id(ex, &body) {
            Ok(a) => a,
            Err(reply) => {
                let _ = ex.respond(reply).await;
                return;
            }
        };
        let key = message_id.map(|m| (conversation.clone(), m.to_string()));
        let now = tokio::time::Instant::now();
        // An earlier run of this message, followed rather than started again (`Err`: there is
        // none to continue).
        let earlier = {
            let mut book = self.runs.lock().unwrap_or_else(|p| p.into_inner());
            let known = key.as_ref().and_then(|k| book.runs.get(k)).cloned();
            match (known, after) {
                (Some(run), Some(after)) => {
                    book.continued += 1;
                    Ok(Some((run, after)))
                }
                (Some(run), None) if now < run.ends => {
                    book.attached += 1;
                    Ok(Some((run, 0)))
                }
                (None, Some(after)) => Err(after),
                _ => Ok(None),
            }
        };
        let earlier = match earlier {
            Ok(e) => e,
            Err(after) => {
                let reply = error_reply(
                    404,
                    "run_not_found",
                    format!(
                        "no run of message {:?} to continue after event {after}",
                        message_id.unwrap_or("")
                    ),
                );
                let _ = ex.respond(reply).await;
                return;
            }
        };
        let new_run = earlier.is_none();
        let (run, after) = match earlier {
            Some(e) => e,
            None => {
                let turn = {
                    let mut t = self.turns.entry(conversation.clone()).or_insert(0);
                    *t += 1;
                    *t
                };
                let run = MockRun {
                    message: message.to_string(),
                    turn,
                    tag: message_id.unwrap_or("m").to_string(),
                    started: now,
                    ends: now,
                };
                (run, 0)
            }
        };
        let timeline = match scenario::plan(&run.message, run.turn, &run.tag, Dialect::AgentFlow) {
            Plan::Status(code, body) => {
                let _ = ex.respond(Reply::json(code, &body)).await;
                return;
            }
            Plan::Play(t) => t,
        };
        let frames = timeline.agentflow_frames();
        if new_run {
            if let Some(key) = key {
                let ends = now + duration(&frames);
                let mut book = self.runs.lock().unwrap_or_else(|p| p.into_inner());
                book.start(
                    key,
                    MockRun {
                        ends,
                        ..run.clone()
                    },
                );
            }
        }
        let headers = vec![
            ("content-type", "text/event-stream".to_string()),
            ("cache-control", "no-cache".to_string()),
        ];
        self.active.fetch_add(1, Ordering::SeqCst);
        follow(ex, headers, &timeline, frames, run.started, after).await;
        self.active.fetch_sub(1, Ordering::SeqCst);
    }

    /// Play a stream, counted in `GET /mock/active` while it plays.
    async fn play(
        &self,
        ex: &mut dyn Exchange,
        headers: Vec<(&'static str, String)>,
        steps: Vec<Step>,
    ) {
        self.active.fetch_add(1, Ordering::SeqCst);
        play(ex, headers, steps).await;
        self.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A JSON error answer `{"error": {"code", "message"}}`.
fn error_reply(status: u16, code: &str, message: impl Into<String>) -> Reply {
    Reply::json(
        status,
        &json!({"error": {"code": code, "message": message.into()}}),
    )
}

/// The refusal for agent ids starting with `missing`, `locked` or `secret`.
fn refusal(agent: &str) -> Option<Reply> {
    [
        ("missing", 404, "agent_not_found"),
        ("locked", 401, "unauthorized"),
        ("secret", 403, "forbidden"),
    ]
    .into_iter()
    .find(|(prefix, _, _)| agent.starts_with(prefix))
    .map(|(_, status, code)| {
        error_reply(
            status,
            code,
            format!("agent {agent} is not available to this organisation"),
        )
    })
}

/// Play an AgentFlow run that started at `started` on its own clock: the events after id
/// `after` (all for 0; steps without an id are skipped with the events around them), those
/// already due at once, the rest when due; a hang lasts until its end on that clock.
async fn follow(
    ex: &mut dyn Exchange,
    headers: Vec<(&'static str, String)>,
    timeline: &Timeline,
    frames: Vec<(Option<u64>, Step)>,
    started: tokio::time::Instant,
    after: u64,
) {
    if ex.start_stream(200, headers).await.is_err() {
        return;
    }
    if timeline.bom && ex.send(Bytes::from_static(&scenario::BOM)).await.is_err() {
        return;
    }
    let mut at = started;
    let mut skipping = after > 0;
    for (id, step) in frames {
        match step {
            Step::Send(bytes) => {
                if skipping {
                    if id.is_some_and(|id| id > after) {
                        skipping = false;
                    } else {
                        continue;
                    }
                }
                if ex.send(Bytes::from(bytes)).await.is_err() {
                    return;
                }
            }
            Step::Sleep(ms) => {
                at += Duration::from_millis(ms);
                if at > tokio::time::Instant::now() {
                    tokio::select! {
                        _ = tokio::time::sleep_until(at) => {}
                        _ = ex.closed() => return,
                    }
                }
            }
            Step::Hang(ms) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at + Duration::from_millis(ms)) => {}
                    _ = ex.closed() => {}
                }
                return;
            }
            Step::Drop => {
                ex.abort();
                return;
            }
        }
    }
    let _ = ex.end_stream().await;
}

async fn play(ex: &mut dyn Exchange, headers: Vec<(&'static str, String)>, steps: Vec<Step>) {
    if ex.start_stream(200, headers).await.is_err() {
        return;
    }
    for step in steps {
        match step {
            Step::Send(bytes) => {
                if ex.send(Bytes::from(bytes)).await.is_err() {
                    return;
                }
            }
            Step::Sleep(ms) => {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(ms)) => {}
                    _ = ex.closed() => return,
                }
            }
            Step::Hang(ms) => {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(ms)) => {}
                    _ = ex.closed() => {}
                }
                return;
            }
            Step::Drop => {
                ex.abort();
                return;
            }
        }
    }
    let _ = ex.end_stream().await;
}

#[async_trait]
impl LocalApp for MockAgent {
    async fn handle(&self, ex: &mut dyn Exchange) -> &'static str {
        let path = ex.path().to_string();
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let agentflow = self.dialect == Dialect::AgentFlow;
        match (ex.method(), segments.as_slice()) {
            ("POST", ["agents", agent, "run"]) if agentflow => match refusal(agent) {
                Some(reply) => {
                    let _ = ex.respond(reply).await;
                }
                None => self.run(ex).await,
            },
            ("POST", ["api", "invokeAgent"]) if !agentflow => self.invoke_agent(ex).await,
            ("GET", ["api", "getConversation"]) if !agentflow => {
                self.polls.fetch_add(1, Ordering::SeqCst);
                let in_flight = self.polls_in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                self.polls_in_flight_max
                    .fetch_max(in_flight, Ordering::SeqCst);
                let delay = self.threads.poll_delay(ex.query());
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                let reply = self.threads.conversation(ex.query());
                self.polls_in_flight.fetch_sub(1, Ordering::SeqCst);
                let _ = ex.respond(reply).await;
            }
            ("GET", ["mock", "requests"]) => {
                let list: Vec<Value> = self
                    .requests
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .iter()
                    .cloned()
                    .collect();
                let _ = ex.respond(Reply::json(200, &json!(list))).await;
            }
            ("GET", [".well-known", "jwks.json"]) if self.jwks.is_some() => {
                let jwks = self.jwks.clone().unwrap_or_default();
                let _ = ex.respond(Reply::json(200, &jwks)).await;
            }
            ("GET", ["mock", "runs"]) => {
                let body = self.runs.lock().unwrap_or_else(|p| p.into_inner()).json();
                let _ = ex.respond(Reply::json(200, &body)).await;
            }
            ("GET", ["mock", "active"]) => {
                let n = self.active.load(Ordering::SeqCst);
                let polls = self.polls.load(Ordering::SeqCst);
                let most = self.polls_in_flight_max.load(Ordering::SeqCst);
                let body = json!({"active": n, "polls": polls, "polls_in_flight_max": most});
                let _ = ex.respond(Reply::json(200, &body)).await;
            }
            ("GET", ["healthz"]) => {
                let _ = ex.respond(Reply::json(200, &json!({"ok": true}))).await;
            }
            _ => {
                let _ = ex
                    .respond(Reply::json(
                        404,
                        &json!({"error": {"message": "not found"}}),
                    ))
                    .await;
            }
        }
        "mock"
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{request, Fake};
    use super::*;

    fn run_body(text: &str, message_id: &str) -> Value {
        json!({"message": text, "conversation_id": "c1", "message_id": message_id})
    }

    async fn post(mock: &MockAgent, body: Value, last_event_id: Option<&str>) -> Fake {
        let headers: Vec<(&str, &str)> = last_event_id
            .map(|id| ("last-event-id", id))
            .into_iter()
            .collect();
        request(mock, "POST", "/agents/7/run", &headers, body).await
    }

    /// The SSE ids and payload seqs of an AgentFlow answer.
    fn ids(ex: &Fake) -> Vec<u64> {
        let text = String::from_utf8_lossy(&ex.out);
        let mut out = Vec::new();
        for frame in text.split("\n\n").filter(|f| !f.is_empty()) {
            let id: u64 = frame
                .lines()
                .find_map(|l| l.strip_prefix("id: "))
                .unwrap()
                .parse()
                .unwrap();
            let data: Value = serde_json::from_str(
                frame
                    .lines()
                    .find_map(|l| l.strip_prefix("data: "))
                    .unwrap(),
            )
            .unwrap();
            assert_eq!(data["seq"], json!(id), "the SSE id is the event's seq");
            out.push(id);
        }
        out
    }

    async fn runs(mock: &MockAgent) -> Value {
        request(mock, "GET", "/mock/runs", &[], Value::Null)
            .await
            .json()
    }

    #[tokio::test]
    async fn a_run_continues_after_a_last_event_id_and_is_never_started_twice() {
        let mock = MockAgent::new();
        let body = run_body("scenario:slow tokens=4 delay_ms=5", "m1");
        let whole = post(&mock, body.clone(), None).await;
        assert_eq!(ids(&whole), [1, 2, 3, 4, 5, 6]);
        // Continued after event 3 (the header, or `last_event_id` in the body): the same run's
        // events after it, byte for byte.
        let rest = post(&mock, body.clone(), Some("3")).await;
        assert_eq!(ids(&rest), [4, 5, 6]);
        let text = String::from_utf8_lossy(&whole.out);
        let tail = &text[text.find("id: 4\n").unwrap()..];
        assert_eq!(String::from_utf8_lossy(&rest.out), tail);
        let mut with_field = body.clone();
        with_field["last_event_id"] = json!("5");
        assert_eq!(ids(&post(&mock, with_field, None).await), [6]);
        assert_eq!(
            ids(&post(&mock, body.clone(), Some("6")).await),
            [] as [u64; 0]
        );
        assert_eq!(
            runs(&mock).await,
            json!({"runs": 1, "continued": 3, "attached": 0, "by_message": {"m1": 1}})
        );
        // The requests remember the header.
        let seen = request(&mock, "GET", "/mock/requests", &[], Value::Null)
            .await
            .json();
        assert_eq!(seen[1]["headers"]["last-event-id"], "3");
        assert_eq!(seen[2]["body"]["last_event_id"], "5");

        // Once the run has ended, the same message without a Last-Event-ID is a new run (a
        // retry after a failure); an unknown one cannot be continued; ids are numbers.
        assert_eq!(ids(&post(&mock, body.clone(), None).await).len(), 6);
        let r = runs(&mock).await;
        assert_eq!((&r["runs"], &r["by_message"]["m1"]), (&json!(2), &json!(2)));
        let unknown = post(&mock, run_body("hi", "m2"), Some("2")).await;
        assert_eq!(unknown.status, Some(404));
        assert_eq!(unknown.json()["error"]["code"], "run_not_found");
        assert_eq!(post(&mock, body, Some("x")).await.status, Some(400));
    }

    #[tokio::test]
    async fn a_playing_run_is_rejoined_on_its_own_clock() {
        let mock = Arc::new(MockAgent::new());
        // 6 events 80 ms apart: about 480 ms in all.
        let body = run_body("scenario:slow tokens=4 delay_ms=80", "m1");
        let first = {
            let (mock, body) = (mock.clone(), body.clone());
            tokio::spawn(async move { post(&mock, body, None).await })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        // The same message while it plays, with or without a Last-Event-ID: the same run, what
        // is due at once, then live (so both end with the run, well before 480 ms from now).
        let joined = std::time::Instant::now();
        let (again, after) = tokio::join!(
            post(&mock, body.clone(), None),
            post(&mock, body.clone(), Some("1"))
        );
        let took = joined.elapsed();
        assert_eq!(ids(&again), [1, 2, 3, 4, 5, 6]);
        assert_eq!(ids(&after), [2, 3, 4, 5, 6]);
        assert!(took < Duration::from_millis(430), "{took:?}");
        assert_eq!(ids(&first.await.unwrap()), [1, 2, 3, 4, 5, 6]);
        assert_eq!(
            runs(&mock).await,
            json!({"runs": 1, "continued": 1, "attached": 1, "by_message": {"m1": 1}})
        );
    }
}
