//! `POST /api/invokeAgent`: validate the request, create the run, start ingestion, and answer
//! either `202 Accepted` (`X-Stream-Response: false`) or the run's UI-message stream.

use serde_json::{json, Map, Value};

use super::quota::Gate;
use super::{stream, Api, ApiError, Exchange, Identity, Reply};
use crate::ingest::agentflow::path_segment;
use crate::ingest::{Admission, RunJob};
use crate::metrics;
use crate::render::ui::Cursor;
use crate::store::{NewRun, RunInfo, Started, ThreadId};

/// A validated invoke request.
#[derive(Clone, Debug, PartialEq)]
pub struct InvokeRequest {
    /// The agent (JSON number or non-empty string).
    pub agent_id: Value,
    /// The user message, with an `id` (generated when the client sent none).
    pub message: Value,
    /// The message id.
    pub message_id: String,
    /// The user's text parts joined with newlines.
    pub text: String,
    /// Continue this thread.
    pub thread_id: Option<String>,
    /// IANA time zone name, passed to the backend.
    pub timezone: Option<String>,
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::InvalidRequest(msg.into())
}

/// Parse and validate the body. Pure.
pub fn parse_invoke(body: &[u8]) -> Result<InvokeRequest, ApiError> {
    let mut obj = super::json_object(body)?;
    let agent_id = agent_id(obj.remove("agentId"))?;
    let thread_id = match obj.remove("threadId") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if !s.is_empty() && s.len() <= 256 => Some(s),
        Some(_) => return Err(bad("`threadId` must be a non-empty string")),
    };
    let timezone = timezone(obj.remove("timezone"))?;
    let (message, message_id, text) = user_message(obj.remove("message"), "message")?;
    Ok(InvokeRequest {
        agent_id,
        message,
        message_id,
        text,
        thread_id,
        timezone,
    })
}

/// `agentId`: a JSON integer or a non-empty string (at most 256 bytes).
pub(crate) fn agent_id(value: Option<Value>) -> Result<Value, ApiError> {
    match value {
        None | Some(Value::Null) => Err(bad("`agentId` is required")),
        Some(Value::Number(n)) if n.is_u64() || n.is_i64() => Ok(Value::Number(n)),
        Some(Value::String(s)) if !s.trim().is_empty() && s.len() <= 256 => Ok(Value::String(s)),
        Some(_) => Err(bad("`agentId` must be an integer or a non-empty string")),
    }
}

/// `timezone`: an IANA time zone name, optional.
pub(crate) fn timezone(value: Option<Value>) -> Result<Option<String>, ApiError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.len() <= 64 => Ok(Some(s)),
        Some(_) => Err(bad("`timezone` must be a string")),
    }
}

/// A user's `UIMessage` (the field `name` in errors): the message as it will be kept (role
/// `user`, an `id` generated when it has none), its id, and its text parts joined with newlines.
pub(crate) fn user_message(
    value: Option<Value>,
    name: &str,
) -> Result<(Value, String, String), ApiError> {
    let mut message = match value {
        Some(Value::Object(m)) => m,
        None | Some(Value::Null) => return Err(bad(format!("`{name}` is required"))),
        Some(_) => return Err(bad(format!("`{name}` must be a UIMessage object"))),
    };
    match message.get("role") {
        None => {
            message.insert("role".into(), json!("user"));
        }
        Some(Value::String(r)) if r == "user" => {}
        Some(_) => return Err(bad(format!("`{name}.role` must be \"user\""))),
    }
    let message_id = match message.get("id") {
        None | Some(Value::Null) => {
            let id = format!("msg_{}", uuid::Uuid::new_v4().simple());
            message.insert("id".into(), json!(id));
            id
        }
        Some(Value::String(s)) if !s.is_empty() && s.len() <= 256 => s.clone(),
        Some(_) => return Err(bad(format!("`{name}.id` must be a non-empty string"))),
    };
    let text = message_text(&message, name)?;
    Ok((Value::Object(message), message_id, text))
}

fn message_text(message: &Map<String, Value>, name: &str) -> Result<String, ApiError> {
    let Some(Value::Array(parts)) = message.get("parts") else {
        return Err(bad(format!("`{name}.parts` must be an array")));
    };
    let mut texts = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        let Some(kind) = part.get("type").and_then(Value::as_str) else {
            return Err(bad(format!("`{name}.parts[{i}].type` must be a string")));
        };
        if kind == "text" {
            match part.get("text") {
                Some(Value::String(t)) => texts.push(t.as_str()),
                _ => return Err(bad(format!("`{name}.parts[{i}].text` must be a string"))),
            }
        }
    }
    let text = texts.join("\n");
    if text.trim().is_empty() {
        return Err(bad(format!(
            "`{name}.parts` must contain a non-empty text part"
        )));
    }
    Ok(text)
}

/// Whether the client asked for the 202 + poll mode.
pub fn wants_no_stream(header: Option<&str>) -> bool {
    header.is_some_and(|v| {
        let v = v.trim();
        v.eq_ignore_ascii_case("false") || v == "0"
    })
}

/// Whether `org` may use `agent` under `auth.org_agents` (organisations not listed may use any).
pub fn agent_allowed(
    map: &std::collections::BTreeMap<String, Vec<String>>,
    org: &str,
    agent: &Value,
) -> bool {
    let Some(allowed) = map.get(org) else {
        return true;
    };
    let name = match agent {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    allowed.contains(&name)
}

/// Handle `POST /api/invokeAgent`.
pub async fn invoke_agent(
    api: &Api,
    who: &Identity,
    ex: &mut dyn Exchange,
) -> Result<(), ApiError> {
    let body = ex.read_body(api.config.limits.max_body_bytes).await?;
    let req = parse_invoke(&body)?;
    // Parsed: the raw body no longer counts against `limits.max_body_bytes_in_flight`.
    drop(body);
    // `threadId` names a thread, or a chat that `/api/chat` started (its client's id).
    let thread_id = match &req.thread_id {
        Some(id) => Some(super::chat::thread_id_named(api, &who.org_id, id).await?),
        None => None,
    };
    let turn = Turn {
        key: req.message_id.clone(),
        backend_message_id: req.message_id.clone(),
        agent_id: req.agent_id,
        message: req.message,
        text: req.text,
        timezone: req.timezone,
        thread_id,
        conversation: None,
    };
    start_turn(api, who, ex, turn).await
}

/// A user turn to start, or to re-attach to when its idempotency key names a run already:
/// what `invokeAgent` and `/api/chat` both answer with a run's UI-message stream (or `202`).
pub(crate) struct Turn {
    /// The agent.
    pub agent_id: Value,
    /// The user message, as snapshots show it.
    pub message: Value,
    /// The idempotency key (the user message's id, for a first answer).
    pub key: String,
    /// The `message_id` the backend is asked with.
    pub backend_message_id: String,
    /// The user's text.
    pub text: String,
    /// IANA time zone name, passed to the backend.
    pub timezone: Option<String>,
    /// Continue this thread.
    pub thread_id: Option<ThreadId>,
    /// With no thread: the client's conversation id, mapped to a thread created on first use.
    pub conversation: Option<String>,
}

/// Start `turn` (or re-attach to it) and answer: its stream from the start (after the client's
/// `Last-Event-ID` on a re-attach), or `202` with `X-Stream-Response: false`.
pub(crate) async fn start_turn(
    api: &Api,
    who: &Identity,
    ex: &mut dyn Exchange,
    turn: Turn,
) -> Result<(), ApiError> {
    let no_stream = wants_no_stream(ex.header("x-stream-response"));
    if !agent_allowed(&api.config.auth.org_agents, &who.org_id, &turn.agent_id) {
        return Err(ApiError::AgentNotFound);
    }
    // A streamed answer takes its slot before anything is started.
    let slot = match no_stream {
        true => None,
        false => Some(api.gates.enter(&who.org_id, Gate::Stream)?),
    };
    let started = api
        .store
        .create_run(NewRun {
            thread_id: turn.thread_id.clone(),
            org_id: who.org_id.clone(),
            user_id: who.user_id.clone(),
            agent_id: turn.agent_id.clone(),
            user_message: turn.message.clone(),
            idempotency_key: Some(turn.key.clone()),
            conversation: turn.conversation.clone(),
        })
        .await?;
    let run = started.run.clone();
    let mut ids = vec![
        ("x-thread-id", run.thread_id.0.clone()),
        ("x-run-id", run.run_id.0.clone()),
    ];
    if started.existing {
        // A retry of the same user message: re-attach to its run, never start a second one.
        metrics::IDEMPOTENT_REATTACHES.inc();
        ids.push(("x-sluice-reattached", "true".into()));
    } else if let Some(refusal) = start_upstream(api, who, &turn, &run).await {
        // A retry should ask the backend again, not re-attach to this refusal.
        api.store
            .forget_key(&who.org_id, &who.user_id, &turn.key, &run.run_id)
            .await;
        let mut reply = refusal.reply();
        reply.headers.extend(ids);
        let _ = ex.respond(reply).await;
        return Ok(());
    }
    if no_stream {
        let reply = accepted(api, &started, ids).await?;
        let _ = ex.respond(reply).await;
        return Ok(());
    }
    // A re-attaching stream continues after the client's last event when it says which (and
    // that event is in this run).
    let last_seq = api.store.run(&run.run_id).await.map_or(0, |r| r.last_seq);
    let cursor = ex
        .header("last-event-id")
        .filter(|_| started.existing)
        .and_then(|v| Cursor::parse(v.trim()))
        .filter(|c| c.seq >= run.first_seq && c.seq <= last_seq)
        .unwrap_or(Cursor::after(run.first_seq - 1));
    let slot = slot.ok_or_else(|| ApiError::Internal("a stream without its slot".into()))?;
    stream::stream_run(api, ex, &run, stream::Dialect::UiMessage, cursor, ids, slot).await
}

/// How long, beyond the connect timeout, an invoke waits for the backend's first answer.
pub(crate) const ADMISSION_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Start ingesting a new run and wait for the backend's answer to its request, so that the
/// backend's verdict on the agent (401, 403, 404) reaches the client as such. Returns that
/// refusal; any other failure ends the run with `error` and is seen in its log.
async fn start_upstream(api: &Api, who: &Identity, turn: &Turn, run: &RunInfo) -> Option<ApiError> {
    let agent_path = match &turn.agent_id {
        Value::String(s) => path_segment(s),
        other => other.to_string(),
    };
    let mut body = json!({
        "message": turn.text,
        "conversation_id": run.thread_id.0,
        "message_id": turn.backend_message_id,
        "stream": true,
    });
    if let Some(tz) = &turn.timezone {
        body["client_timezone"] = json!(tz);
    }
    admit(
        api,
        RunJob {
            run: run.clone(),
            agent_path,
            body,
            bearer: who.token.clone(),
            backend_thread: api.store.backend_thread(&run.thread_id).await,
        },
    )
    .await
}

/// Start ingesting `job` and wait (briefly) for the backend's first answer; returns its
/// refusal of the agent (401, 403, 404) as the error to give the client.
pub(crate) async fn admit(api: &Api, job: RunJob) -> Option<ApiError> {
    let admission = api.ingest.spawn(job);
    // Bounded so that a backend slow to send its headers cannot hold a 202 past the limits of
    // the clients 202 exists for; a later refusal still ends the run with `error`.
    let patience = api.config.upstream.connect_timeout.0 + ADMISSION_GRACE;
    match tokio::time::timeout(patience, admission).await {
        Ok(Ok(Admission::Refused(404, _))) => Some(ApiError::AgentNotFound),
        Ok(Ok(Admission::Refused(status @ (401 | 403), text))) => {
            Some(ApiError::AgentRefused(status, text))
        }
        _ => None,
    }
}

/// The `202 Accepted` answer for a run: a new one is reported `in_progress` (the documented
/// contract: its end is seen by polling, however soon it came), a re-attached one with its
/// current status.
pub(crate) async fn accepted(
    api: &Api,
    started: &Started,
    ids: Vec<(&'static str, String)>,
) -> Result<Reply, ApiError> {
    let run = &started.run;
    let status = if started.existing {
        api.store.run(&run.run_id).await?.status
    } else {
        run.status
    };
    let mut reply = Reply::json(
        202,
        &json!({"threadId": run.thread_id.0, "runId": run.run_id.0, "status": status.as_str()}),
    );
    reply.headers.extend(ids);
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(body: &str) -> InvokeRequest {
        parse_invoke(body.as_bytes()).unwrap()
    }

    fn err(body: &str) -> ApiError {
        parse_invoke(body.as_bytes()).unwrap_err()
    }

    #[test]
    fn accepts_the_documented_body() {
        let r = ok(
            r#"{"agentId":123,"message":{"id":"u1","role":"user","parts":[{"type":"text","text":"Hi"},{"type":"file","url":"x","mediaType":"image/png"},{"type":"text","text":"there"}]},"threadId":"t-1","timezone":"America/New_York"}"#,
        );
        assert_eq!(r.agent_id, json!(123));
        assert_eq!(r.message_id, "u1");
        assert_eq!(r.text, "Hi\nthere");
        assert_eq!(r.thread_id.as_deref(), Some("t-1"));
        assert_eq!(r.timezone.as_deref(), Some("America/New_York"));
        let r = ok(r#"{"agentId":"support-bot","message":{"parts":[{"type":"text","text":"x"}]}}"#);
        assert_eq!(r.agent_id, json!("support-bot"));
        assert!(r.message_id.starts_with("msg_"));
        assert_eq!(r.message["id"], json!(r.message_id));
        assert_eq!(r.message["role"], json!("user"));
    }

    #[test]
    fn refuses_bad_bodies_with_the_right_code() {
        assert_eq!(err("{nope").code(), "invalid_json");
        assert_eq!(err("").code(), "invalid_json");
        for body in [
            "[]",
            r#"{"message":{"parts":[{"type":"text","text":"x"}]}}"#,
            r#"{"agentId":true,"message":{"parts":[{"type":"text","text":"x"}]}}"#,
            r#"{"agentId":1.5,"message":{"parts":[{"type":"text","text":"x"}]}}"#,
            r#"{"agentId":"","message":{"parts":[{"type":"text","text":"x"}]}}"#,
            r#"{"agentId":1}"#,
            r#"{"agentId":1,"message":"hi"}"#,
            r#"{"agentId":1,"message":{"parts":"x"}}"#,
            r#"{"agentId":1,"message":{"parts":[]}}"#,
            r#"{"agentId":1,"message":{"parts":[{"type":"text","text":7}]}}"#,
            r#"{"agentId":1,"message":{"parts":[{"text":"x"}]}}"#,
            r#"{"agentId":1,"message":{"role":"assistant","parts":[{"type":"text","text":"x"}]}}"#,
            r#"{"agentId":1,"message":{"id":5,"parts":[{"type":"text","text":"x"}]}}"#,
            r#"{"agentId":1,"threadId":42,"message":{"parts":[{"type":"text","text":"x"}]}}"#,
            r#"{"agentId":1,"timezone":1,"message":{"parts":[{"type":"text","text":"x"}]}}"#,
        ] {
            let e = err(body);
            assert_eq!((e.code(), e.status()), ("invalid_request", 400), "{body}");
        }
    }

    #[test]
    fn stream_header_values() {
        assert!(wants_no_stream(Some("false")));
        assert!(wants_no_stream(Some(" FALSE ")));
        assert!(wants_no_stream(Some("0")));
        assert!(!wants_no_stream(Some("true")));
        assert!(!wants_no_stream(None));
    }
}
