//! The mock agent backend (`sluice mock-agent`): a real HTTP server speaking the AgentFlow
//! dialect (`POST /agents/{id}/run`, SSE answer), with deterministic scenarios picked by the
//! message text (see [`scenario`]). Tests, the demo and benchmarks run against it.
//!
//! It also answers `GET /mock/active` with the number of streams it is playing, and
//! `GET /mock/requests` with the last requests it received (path, `x-sluice-*`
//! headers, body), so tests can check what the gateway sent, and, in the demo, serves the demo
//! identity's JWKS. Agent ids starting with `missing`, `locked` or `secret` answer 404, 401 and
//! 403, as a backend does for an agent the caller may not use.

pub mod scenario;

use std::collections::VecDeque;
use std::sync::Mutex;
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

/// The mock agent's state.
#[derive(Default)]
pub struct MockAgent {
    /// Streams being played right now.
    active: std::sync::atomic::AtomicUsize,
    turns: DashMap<String, u64>,
    requests: Mutex<VecDeque<Value>>,
    jwks: Option<Value>,
}

impl MockAgent {
    /// A fresh mock agent.
    pub fn new() -> Self {
        MockAgent::default()
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
                use std::sync::atomic::Ordering;
                self.active.fetch_add(1, Ordering::SeqCst);
                play(ex, steps).await;
                self.active.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }
}

async fn play(ex: &mut dyn Exchange, steps: Vec<Step>) {
    let headers = vec![
        ("content-type", "text/event-stream".to_string()),
        ("cache-control", "no-cache".to_string()),
    ];
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
        match (ex.method(), segments.as_slice()) {
            ("POST", ["agents", agent, "run"]) => {
                let refusal = [("missing", 404), ("locked", 401), ("secret", 403)]
                    .into_iter()
                    .find(|(prefix, _)| agent.starts_with(prefix));
                match refusal {
                    Some((_, code)) => {
                        let msg = format!("agent {agent} is not available to this organisation");
                        let _ = ex
                            .respond(Reply::json(code, &json!({"error": {"message": msg}})))
                            .await;
                    }
                    None => self.run(ex).await,
                }
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
                let n = self.active.load(std::sync::atomic::Ordering::SeqCst);
                let _ = ex.respond(Reply::json(200, &json!({"active": n}))).await;
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
