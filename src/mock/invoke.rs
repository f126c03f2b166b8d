//! Dialect A ("Invoke an agent") in the mock backend: `POST /api/invokeAgent` and
//! `GET /api/getConversation?threadId=…`, for the `ui-message` and `poll` dialects.
//!
//! - invokeAgent body `{agentId, message: UIMessage, threadId?, timezone?}`; the scenario is
//!   read from the message's text parts joined with `\n`. No `threadId`: a new thread (a UUID);
//!   a known one is continued; an unknown one is created under that id. A scenario that
//!   refuses (`scenario:status`) leaves the thread untouched.
//! - `ui-message` streams the UI-message stream (`x-thread-id`, `x-vercel-ai-ui-message-stream:
//!   v1`) unless `X-Stream-Response: false`; `poll` (and `ui-message` asked not to stream)
//!   answers `202 {threadId, status: "in_progress"}` with `x-thread-id`.
//! - Either way the run also plays in a background task (it ends with its timeline) that
//!   updates the thread's conversation, so `getConversation` always has it: `{threadId, agentId,
//!   streamStatus, messages, errorText?, createdAt, updatedAt}`, all turns' user and assistant
//!   messages in order, `streamStatus` that of the latest turn. The assistant message
//!   (`msg_<thread>_<turn>`) appears with the run's first published update.
//! - Poll options from the message: `update_ms=N` publishes the snapshot at most every N ms
//!   (in bursts), `throttle=K` answers every K-th getConversation of the thread with `429`
//!   (`Retry-After: 1`, code `rate_limited`), `poll_delay_ms=N` makes each getConversation of the
//!   thread take N ms, `lose_after_ms=N` loses the run N ms after it
//!   started (404 from then on, as `scenario:drop` does at once). `scenario:hang` stays
//!   `in_progress`. Unknown threads answer 404 `thread_not_found`.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use dashmap::DashMap;
use serde_json::{json, Value};

use super::scenario::{self, Beat, Options, Plan, Timeline};
use super::translate::{self, Snapshot, IN_PROGRESS};
use super::{error_reply, refusal, Dialect, MockAgent};
use crate::api::{Exchange, Reply};

/// Dialect A's conversations, shared by the server and the runs playing in the background.
#[derive(Default)]
pub struct Threads {
    map: DashMap<String, Thread>,
}

struct Thread {
    agent_id: Value,
    created_at: String,
    updated_at: String,
    messages: Vec<Value>,
    turns: u64,
    status: &'static str,
    error_text: Option<String>,
    lost: bool,
    lose_at: Option<Instant>,
    throttle: u64,
    /// How long each getConversation of the thread takes to answer.
    poll_delay: Duration,
    polls: u64,
}

impl Thread {
    fn is_lost(&self) -> bool {
        self.lost || self.lose_at.is_some_and(|at| Instant::now() >= at)
    }
}

fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

fn not_found(thread: &str) -> Reply {
    error_reply(404, "thread_not_found", format!("no thread {thread}"))
}

/// One run playing in the background: where its assistant message goes.
struct Run {
    threads: Arc<Threads>,
    thread: String,
    turn: u64,
    /// Index of the run's user message in the thread.
    user_index: usize,
}

impl Run {
    /// Show `snap` in the thread. False when the run is lost (or its thread gone): stop.
    fn publish(&self, snap: &Snapshot) -> bool {
        let Some(mut t) = self.threads.map.get_mut(&self.thread) else {
            return false;
        };
        if t.is_lost() {
            return false;
        }
        if snap.is_started() {
            let msg = snap.message();
            match t.messages.iter().position(|m| m["id"] == msg["id"]) {
                Some(i) => t.messages[i] = msg,
                None => {
                    let at = (self.user_index + 1).min(t.messages.len());
                    t.messages.insert(at, msg);
                }
            }
        }
        if t.turns == self.turn {
            t.status = snap.status();
            t.error_text = snap.error_text().map(str::to_string);
        }
        t.updated_at = now();
        true
    }

    fn lose(&self) {
        if let Some(mut t) = self.threads.map.get_mut(&self.thread) {
            t.lost = true;
        }
    }

    fn alive(&self) -> bool {
        self.threads
            .map
            .get(&self.thread)
            .is_some_and(|t| !t.is_lost())
    }
}

/// Publishes a run's snapshot when time passes (before each pause, at the end), at most every
/// `every` (zero: whenever it changed). Changes made at the same instant are published together.
struct Publisher {
    run: Run,
    every: Duration,
    last: Instant,
    dirty: bool,
}

impl Publisher {
    /// Publish a pending change if due. False when the run is lost.
    fn due(&mut self, snap: &Snapshot) -> bool {
        if self.dirty && (self.every.is_zero() || self.last.elapsed() >= self.every) {
            self.last = Instant::now();
            self.dirty = false;
            return self.run.publish(snap);
        }
        self.run.alive()
    }

    /// Publish what is pending, at the next tick.
    async fn flush(&mut self, snap: &Snapshot) {
        if self.dirty {
            tokio::time::sleep_until((self.last + self.every).into()).await;
            self.dirty = false;
            self.run.publish(snap);
        }
    }
}

/// Play a timeline into the thread's conversation; returns when the timeline ends, the run
/// finishes, hangs, or is lost.
async fn play_in_background(run: Run, timeline: Timeline, message_id: String, update_ms: u64) {
    let mut snap = Snapshot::new(message_id);
    let mut p = Publisher {
        run,
        every: Duration::from_millis(update_ms),
        last: Instant::now(),
        dirty: false,
    };
    for (i, beat) in timeline.beats.iter().enumerate() {
        match beat {
            Beat::Sleep(ms) => {
                if !p.due(&snap) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(*ms)).await;
            }
            // The run never finishes: it stays `in_progress`.
            Beat::Hang(_) => break,
            Beat::Drop => {
                p.run.lose();
                return;
            }
            Beat::Event(ev) => {
                if snap.begin(ev) {
                    // Show the tool call's input streaming for a moment.
                    p.dirty = true;
                    if !p.due(&snap) {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(timeline.delay_ms)).await;
                }
                snap.apply(beat);
                p.dirty = true;
            }
            Beat::PollText(_) => {
                snap.apply(beat);
                p.dirty = true;
            }
            Beat::Raw(_) | Beat::UiChunk(_) | Beat::UiExtra(_) => {}
        }
        if snap.status() != IN_PROGRESS {
            break;
        }
        if i % 256 == 255 {
            // Long timelines without pauses: let others run, and show progress.
            if !p.due(&snap) {
                return;
            }
            tokio::task::yield_now().await;
        }
    }
    p.flush(&snap).await;
}

/// The text the scenario is read from: the text parts joined with `\n`.
fn message_text(message: &Value) -> Option<String> {
    let parts = message.get("parts")?.as_array()?;
    let texts: Vec<&str> = parts
        .iter()
        .filter(|p| p.get("type").and_then(Value::as_str) == Some("text"))
        .filter_map(|p| p.get("text").and_then(Value::as_str))
        .collect();
    Some(texts.join("\n"))
}

impl Threads {
    /// How long a `GET /api/getConversation` with this query string takes (the thread's
    /// `poll_delay_ms`).
    pub fn poll_delay(&self, query: Option<&str>) -> Duration {
        crate::api::query_param(query, "threadId")
            .and_then(|id| self.map.get(&id).map(|t| t.poll_delay))
            .unwrap_or(Duration::ZERO)
    }

    /// Answer `GET /api/getConversation` with this query string.
    pub fn conversation(&self, query: Option<&str>) -> Reply {
        let Some(id) = crate::api::query_param(query, "threadId").filter(|t| !t.is_empty()) else {
            return error_reply(400, "invalid_request", "`threadId` is required");
        };
        let Some(mut t) = self.map.get_mut(&id) else {
            return not_found(&id);
        };
        t.polls += 1;
        if t.throttle > 0 && t.polls % t.throttle == 0 {
            let mut r = error_reply(429, "rate_limited", "too many requests, retry in 1 s");
            r.headers.push(("retry-after", "1".into()));
            return r;
        }
        if t.is_lost() {
            return not_found(&id);
        }
        let mut body = json!({
            "threadId": id,
            "agentId": t.agent_id,
            "streamStatus": t.status,
            "messages": t.messages,
            "createdAt": t.created_at,
            "updatedAt": t.updated_at,
        });
        if let Some(e) = &t.error_text {
            body["errorText"] = json!(e);
        }
        Reply::json(200, &body)
    }
}

impl MockAgent {
    /// `POST /api/invokeAgent`.
    pub(super) async fn invoke_agent(&self, ex: &mut dyn Exchange) {
        let reply = match self.start_invoke(ex).await {
            Ok(Started::Accepted(thread)) => {
                let mut r = Reply::json(202, &json!({"threadId": thread, "status": IN_PROGRESS}));
                r.headers.push(("x-thread-id", thread));
                r
            }
            Ok(Started::Stream(thread, steps)) => {
                let headers = vec![
                    ("content-type", "text/event-stream".to_string()),
                    ("cache-control", "no-cache".to_string()),
                    ("x-vercel-ai-ui-message-stream", "v1".to_string()),
                    ("x-accel-buffering", "no".to_string()),
                    ("x-thread-id", thread),
                ];
                self.play(ex, headers, steps).await;
                return;
            }
            Err(reply) => reply,
        };
        let _ = ex.respond(reply).await;
    }

    async fn start_invoke(&self, ex: &mut dyn Exchange) -> Result<Started, Reply> {
        let body = ex.read_body(8 * 1024 * 1024).await.map_err(|e| e.reply())?;
        let body: Value = serde_json::from_slice(&body)
            .map_err(|e| error_reply(400, "invalid_json", e.to_string()))?;
        self.remember(ex, &body);
        let bad = |m: &str| error_reply(400, "invalid_request", m);
        let agent_id = match body.get("agentId") {
            Some(Value::String(s)) if !s.is_empty() => Value::String(s.clone()),
            Some(Value::Number(n)) => Value::Number(n.clone()),
            _ => return Err(bad("`agentId` must be a string or a number")),
        };
        if let Some(reply) = agent_id.as_str().and_then(refusal) {
            return Err(reply);
        }
        let mut message = body.get("message").cloned().unwrap_or(Value::Null);
        let text = message_text(&message)
            .ok_or_else(|| bad("`message` must be a UIMessage with `parts`"))?;
        let thread = match body.get("threadId") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            None | Some(Value::Null) => uuid::Uuid::new_v4().to_string(),
            _ => return Err(bad("`threadId` must be a non-empty string")),
        };
        let stream = self.dialect == Dialect::UiMessage
            && !ex
                .header("x-stream-response")
                .is_some_and(|v| v.trim().eq_ignore_ascii_case("false"));
        let dialect = if stream {
            Dialect::UiMessage
        } else {
            Dialect::Poll
        };
        let turn = self.threads.map.get(&thread).map_or(0, |t| t.turns) + 1;
        if message.get("id").and_then(Value::as_str).is_none() {
            message["id"] = json!(format!("user_{thread}_{turn}"));
        }
        let tag = message["id"].as_str().unwrap_or("m").to_string();
        let timeline = match scenario::plan(&text, turn, &tag, dialect) {
            Plan::Status(code, body) => return Err(Reply::json(code, &body)),
            Plan::Play(t) => t,
        };
        let o = Options::parse(&text);
        let user_index = {
            let stamp = now();
            let mut t = self
                .threads
                .map
                .entry(thread.clone())
                .or_insert_with(|| Thread {
                    agent_id: agent_id.clone(),
                    created_at: stamp.clone(),
                    updated_at: stamp.clone(),
                    messages: Vec::new(),
                    turns: 0,
                    status: IN_PROGRESS,
                    error_text: None,
                    lost: false,
                    lose_at: None,
                    throttle: 0,
                    poll_delay: Duration::ZERO,
                    polls: 0,
                });
            t.turns = turn;
            t.agent_id = agent_id;
            t.status = IN_PROGRESS;
            t.error_text = None;
            t.updated_at = stamp;
            t.throttle = o.num("throttle", 0);
            t.poll_delay = Duration::from_millis(o.num("poll_delay_ms", 0));
            if let Some(ms) = o.kv.get("lose_after_ms").and_then(|v| v.parse().ok()) {
                t.lose_at = Some(Instant::now() + Duration::from_millis(ms));
            }
            t.messages.push(message);
            t.messages.len() - 1
        };
        let message_id = translate::message_id(&thread, turn);
        let steps = stream.then(|| translate::ui_steps(&timeline, &message_id));
        let run = Run {
            threads: self.threads.clone(),
            thread: thread.clone(),
            turn,
            user_index,
        };
        tokio::spawn(play_in_background(
            run,
            timeline,
            message_id,
            o.num("update_ms", 0),
        ));
        Ok(match steps {
            Some(steps) => Started::Stream(thread, steps),
            None => Started::Accepted(thread),
        })
    }
}

enum Started {
    Accepted(String),
    Stream(String, Vec<scenario::Step>),
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use crate::mock::testing::{request, Fake};
    use crate::mock::{Dialect, MockAgent};

    fn invoke_body(text: &str, thread: Option<&str>) -> Value {
        let mut b = json!({"agentId": 7, "message": {"id": format!("u_{text}"), "role": "user",
                           "parts": [{"type": "text", "text": text}]}});
        if let Some(t) = thread {
            b["threadId"] = json!(t);
        }
        b
    }

    async fn invoke(mock: &MockAgent, text: &str, thread: Option<&str>) -> Fake {
        let body = invoke_body(text, thread);
        request(mock, "POST", "/api/invokeAgent", &[], body).await
    }

    async fn conversation(mock: &MockAgent, thread: &str) -> Fake {
        let target = format!("/api/getConversation?threadId={thread}");
        request(mock, "GET", &target, &[], Value::Null).await
    }

    /// Poll until the thread's status leaves `in_progress` (at most 5 s).
    async fn settle(mock: &MockAgent, thread: &str) -> Value {
        for _ in 0..1000 {
            let c = conversation(mock, thread).await.json();
            if c["streamStatus"] != "in_progress" {
                return c;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        panic!("thread {thread} never finished");
    }

    #[tokio::test]
    async fn poll_dialect_accepts_then_shows_the_conversation() {
        let mock = MockAgent::new().with_dialect(Dialect::Poll);
        let hdr = [("x-stream-response", "true"), ("x-sluice-org-id", "org_a")];
        let r = request(
            &mock,
            "POST",
            "/api/invokeAgent",
            &hdr,
            invoke_body("hi", None),
        )
        .await;
        assert_eq!(r.status, Some(202));
        let thread = r.json()["threadId"].as_str().unwrap().to_string();
        assert_eq!(r.json()["status"], "in_progress");
        assert_eq!(r.header_out("x-thread-id"), Some(thread.as_str()));
        assert_eq!(thread.len(), 36, "a UUID");
        let c = settle(&mock, &thread).await;
        assert_eq!(c["streamStatus"], "completed");
        assert_eq!(c["agentId"], 7);
        assert!(c["createdAt"].as_str().unwrap().ends_with('Z'));
        assert!(c.get("errorText").is_none());
        let msgs = c["messages"].as_array().unwrap();
        assert_eq!(msgs.len(), 2);
        assert_eq!(msgs[0]["id"], "u_hi");
        assert_eq!(msgs[1]["id"], format!("msg_{thread}_1"));
        assert_eq!(msgs[1]["role"], "assistant");
        assert_eq!(
            msgs[1]["parts"][1],
            json!({"type": "text", "text": "Hello! You said: hi (turn 1).", "state": "done"})
        );
        // A second turn continues the thread.
        let r = invoke(&mock, "again", Some(&thread)).await;
        assert_eq!(r.json()["threadId"], thread.as_str());
        let c = settle(&mock, &thread).await;
        let msgs = c["messages"].as_array().unwrap();
        assert_eq!(msgs.len(), 4);
        assert_eq!(msgs[3]["id"], format!("msg_{thread}_2"));
        assert_eq!(
            msgs[3]["parts"][1]["text"],
            "Hello! You said: again (turn 2)."
        );
        // What was asked is remembered; polls are counted.
        let seen = request(&mock, "GET", "/mock/requests", &[], Value::Null)
            .await
            .json();
        assert_eq!(seen[0]["path"], "/api/invokeAgent");
        assert_eq!(seen[0]["headers"]["x-stream-response"], "true");
        assert_eq!(seen[0]["headers"]["x-sluice-org-id"], "org_a");
        assert_eq!(seen[0]["body"]["message"]["parts"][0]["text"], "hi");
        let active = request(&mock, "GET", "/mock/active", &[], Value::Null)
            .await
            .json();
        assert_eq!(active["active"], 0);
        assert!(active["polls"].as_u64().unwrap() >= 2);
    }

    #[tokio::test]
    async fn unknown_and_lost_threads_answer_404() {
        let mock = MockAgent::new().with_dialect(Dialect::Poll);
        let r = conversation(&mock, "nope").await;
        assert_eq!(r.status, Some(404));
        assert_eq!(r.json()["error"]["code"], "thread_not_found");
        let r = request(&mock, "GET", "/api/getConversation", &[], Value::Null).await;
        assert_eq!(r.status, Some(400));
        // An unknown thread id given by the caller is created under that id.
        let r = invoke(&mock, "scenario:drop", Some("t-given")).await;
        assert_eq!(r.json()["threadId"], "t-given");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert_eq!(conversation(&mock, "t-given").await.status, Some(404));
        invoke(
            &mock,
            "hi lose_after_ms=40 scenario:slow delay_ms=10",
            Some("t2"),
        )
        .await;
        assert_eq!(conversation(&mock, "t2").await.status, Some(200));
        tokio::time::sleep(std::time::Duration::from_millis(80)).await;
        assert_eq!(conversation(&mock, "t2").await.status, Some(404));
    }

    #[tokio::test]
    async fn hang_error_throttle_and_refusals() {
        let mock = MockAgent::new().with_dialect(Dialect::Poll);
        invoke(&mock, "scenario:hang", Some("h")).await;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let c = conversation(&mock, "h").await.json();
        assert_eq!(c["streamStatus"], "in_progress");
        assert_eq!(c["messages"][1]["parts"][1]["text"], "Thinking");
        invoke(&mock, "scenario:error", Some("e")).await;
        let c = settle(&mock, "e").await;
        assert_eq!(c["streamStatus"], "error");
        assert_eq!(c["errorText"], "simulated agent failure: no provider key");
        invoke(&mock, "hi throttle=3", Some("th")).await;
        let codes: Vec<u16> = {
            let mut v = Vec::new();
            for _ in 0..6 {
                v.push(conversation(&mock, "th").await.status.unwrap());
            }
            v
        };
        assert_eq!(codes, [200, 200, 429, 200, 200, 429]);
        let r = conversation(&mock, "th").await;
        assert_eq!(r.status, Some(200));
        let r = {
            conversation(&mock, "th").await;
            conversation(&mock, "th").await
        };
        assert_eq!(r.header_out("retry-after"), Some("1"));
        assert_eq!(r.json()["error"]["code"], "rate_limited");
        // Refusals leave no thread behind.
        let r = invoke(&mock, "scenario:status code=503", Some("s")).await;
        assert_eq!(r.status, Some(503));
        assert_eq!(conversation(&mock, "s").await.status, Some(404));
        let mut body = invoke_body("hi", None);
        body["agentId"] = json!("missing-agent");
        let r = request(&mock, "POST", "/api/invokeAgent", &[], body).await;
        assert_eq!(r.status, Some(404));
        let r = request(
            &mock,
            "POST",
            "/api/invokeAgent",
            &[],
            json!({"agentId": 1}),
        )
        .await;
        assert_eq!(r.status, Some(400));
        // The poll dialect speaks no AgentFlow.
        let r = request(
            &mock,
            "POST",
            "/agents/1/run",
            &[],
            json!({"message": "hi"}),
        )
        .await;
        assert_eq!(r.status, Some(404));
    }

    #[tokio::test]
    async fn update_ms_publishes_in_bursts() {
        let mock = MockAgent::new().with_dialect(Dialect::Poll);
        invoke(
            &mock,
            "scenario:slow tokens=12 delay_ms=10 update_ms=60",
            Some("b"),
        )
        .await;
        let first = conversation(&mock, "b").await.json();
        assert_eq!(
            first["messages"].as_array().unwrap().len(),
            1,
            "nothing published yet"
        );
        let mut seen = vec![first["messages"].clone()];
        loop {
            let c = conversation(&mock, "b").await.json();
            if seen.last() != Some(&c["messages"]) {
                seen.push(c["messages"].clone());
            }
            if c["streamStatus"] == "completed" {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(3)).await;
        }
        // 130 ms of events in 60 ms bursts: a few distinct snapshots, not one per token.
        assert!(seen.len() <= 5, "{} snapshots", seen.len());
        let last = seen.last().unwrap();
        assert_eq!(last[1]["parts"][1]["state"], "done");
    }

    #[tokio::test]
    async fn ui_message_dialect_streams_unless_asked_not_to() {
        let mock = MockAgent::new().with_dialect(Dialect::UiMessage);
        let r = invoke(&mock, "scenario:tools", Some("u")).await;
        assert_eq!(r.status, Some(200));
        assert_eq!(r.header_out("content-type"), Some("text/event-stream"));
        assert_eq!(r.header_out("x-vercel-ai-ui-message-stream"), Some("v1"));
        assert_eq!(r.header_out("x-thread-id"), Some("u"));
        let body = String::from_utf8(r.out.clone()).unwrap();
        assert!(body.starts_with(r#"data: {"messageId":"msg_u_1","type":"start"}"#));
        assert!(body.ends_with("data: {\"type\":\"finish\"}\n\ndata: [DONE]\n\n"));
        // The streamed run is in the conversation too.
        let c = settle(&mock, "u").await;
        assert_eq!(c["messages"][1]["id"], "msg_u_1");
        assert_eq!(c["messages"][1]["parts"][2]["type"], "tool-search");
        let hdr = [("X-Stream-Response", "false")];
        let body = invoke_body("scenario:rewrite delay_ms=1", Some("u"));
        let r = request(&mock, "POST", "/api/invokeAgent", &hdr, body).await;
        assert_eq!(r.status, Some(202));
        let c = settle(&mock, "u").await;
        assert_eq!(c["messages"][3]["parts"][1]["text"], "The answer is four.");
        let r = invoke(&mock, "scenario:drop", Some("d")).await;
        assert!(r.aborted);
    }

    #[tokio::test]
    async fn agentflow_dialect_has_no_invoke_route() {
        let mock = MockAgent::new();
        assert_eq!(invoke(&mock, "hi", None).await.status, Some(404));
        assert_eq!(conversation(&mock, "t").await.status, Some(404));
    }
}
