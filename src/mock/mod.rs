//! The mock agent backend (`sluice mock-agent --dialect …`): a real HTTP server speaking one
//! backend [`Dialect`], with deterministic scenarios picked by the message text (see
//! [`scenario`]). Tests, the demo and benchmarks run against it.
//!
//! - `agentflow` (default): `POST /agents/{id}/run`, answered with the AgentFlow SSE stream.
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
//! `authorization`, `accept`, `content-type`, `x-stream-response` headers, body), so tests can check what the gateway sent, and, in the demo, serves the demo identity's
//! JWKS. Agent ids starting with `missing`, `locked` or `secret` answer 404, 401 and 403, as a
//! backend does for an agent the caller may not use.

pub mod invoke;
pub mod scenario;
pub mod translate;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use dashmap::DashMap;
use serde_json::{json, Value};

use crate::api::{Exchange, Reply};
use crate::server::exchange::LocalApp;
use scenario::{Script, Step};

/// Requests remembered for `GET /mock/requests`.
const REMEMBERED: usize = 200;

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
    /// Dialect A's threads (shared with the runs playing in the background).
    threads: Arc<invoke::Threads>,
    requests: Mutex<VecDeque<Value>>,
    jwks: Option<Value>,
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
        let turn = {
            let mut t = self.turns.entry(conversation.clone()).or_insert(0);
            *t += 1;
            *t
        };
        let tag = body
            .get("message_id")
            .and_then(Value::as_str)
            .unwrap_or("m")
            .to_string();
        match scenario::script(message, turn, &tag) {
            Script::Status(code, body) => {
                let _ = ex.respond(Reply::json(code, &body)).await;
            }
            Script::Stream(steps) => {
                let headers = vec![
                    ("content-type", "text/event-stream".to_string()),
                    ("cache-control", "no-cache".to_string()),
                ];
                self.play(ex, headers, steps).await;
            }
        }
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
