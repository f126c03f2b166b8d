//! The AgentFlow dialect (DESIGN.md §1 B): `POST /agents/{id}/run` with the backend's own body.
//!
//! The body goes to the backend with every advanced field kept, except: `stream` is forced on
//! (Sluice always consumes the stream); `conversation_id` becomes Sluice's thread id, unique per
//! organisation, unless `upstream.conversation_ids = "client"`; and fields that name an identity
//! ([`IDENTITY_FIELDS`]) are removed: the verified identity travels in the `X-Sluice-*`
//! headers only. The client's `conversation_id` (required) names one thread per organisation,
//! and `(organisation, conversation_id, message_id)` is the idempotency key: a retry re-attaches
//! to the run it started, resuming after `Last-Event-ID` when given.
//!
//! - `stream: true` (default): the run's events in AgentFlow form, each with `id: <seq>`;
//!   `verbose: false` leaves out nested calls.
//! - `stream: false`: the final result as JSON once the run has ended.
//! - `X-Stream-Response: false`: `202` with the ids to poll (`getConversation`), as in dialect A.

use serde_json::{json, Map, Value};

use super::invoke::{agent_allowed, wants_no_stream};
use super::quota::Gate;
use super::stream::{self, Dialect};
use super::{Api, ApiError, Exchange, Identity, Reply};
use crate::config::ConversationIds;
use crate::ingest::agentflow::path_segment;
use crate::ingest::RunJob;
use crate::metrics;
use crate::render::ui::Cursor;
use crate::store::{NewRun, RunInfo};

/// A validated `run` request.
#[derive(Clone, Debug, PartialEq)]
pub struct RunRequest {
    /// The body as the client sent it (with `stream` forced to `true` for the backend).
    pub body: Map<String, Value>,
    /// `message`.
    pub message: String,
    /// `message_id`.
    pub message_id: String,
    /// `conversation_id`.
    pub conversation_id: String,
    /// The client's `stream` (default `true`).
    pub stream: bool,
    /// The client's `verbose` (default `true`).
    pub verbose: bool,
}

/// Body fields that name an identity. A backend that reads one could be told another user or
/// organisation than the verified one, so they are never forwarded.
pub const IDENTITY_FIELDS: &[&str] = &[
    "user_id",
    "userId",
    "org_id",
    "orgId",
    "organization_id",
    "organizationId",
    "organisation_id",
    "organisationId",
    "tenant_id",
    "tenantId",
];

fn bad(msg: &str) -> ApiError {
    ApiError::InvalidRequest(msg.into())
}

/// Parse and validate the body. Pure.
pub fn parse_run(body: &[u8]) -> Result<RunRequest, ApiError> {
    let mut body = super::json_object(body)?;
    let message = match body.get("message") {
        Some(Value::String(m)) if !m.trim().is_empty() => m.clone(),
        _ => return Err(bad("`message` must be a non-empty string")),
    };
    let message_id = match body.get("message_id") {
        Some(Value::String(m)) if !m.is_empty() && m.len() <= 256 => m.clone(),
        _ => {
            return Err(bad(
                "`message_id` is required: a stable id for this user message",
            ))
        }
    };
    let conversation_id =
        match body.get("conversation_id") {
            Some(Value::String(c)) if !c.is_empty() && c.len() <= 256 => c.clone(),
            None | Some(Value::Null) => return Err(bad(
                "`conversation_id` is required: the id of the conversation this message continues",
            )),
            Some(_) => return Err(bad("`conversation_id` must be a non-empty string")),
        };
    let flag = |name: &str| match body.get(name) {
        None | Some(Value::Null) => Ok(true),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(bad(&format!("`{name}` must be a boolean"))),
    };
    let (stream, verbose) = (flag("stream")?, flag("verbose")?);
    body.insert("stream".into(), Value::Bool(true));
    for field in IDENTITY_FIELDS {
        body.remove(*field);
    }
    Ok(RunRequest {
        body,
        message,
        message_id,
        conversation_id,
        stream,
        verbose,
    })
}

/// The `{id}` of `/agents/{id}/run`, percent-decoded.
pub fn agent_of(path: &str) -> Option<String> {
    super::route::id_between(path, "/agents/", "/run")
}

/// Handle `POST /agents/{id}/run`.
pub async fn run_agent(api: &Api, who: &Identity, ex: &mut dyn Exchange) -> Result<(), ApiError> {
    let agent = agent_of(ex.path()).ok_or(ApiError::NotFound)?;
    let body = ex.read_body(api.config.limits.max_body_bytes).await?;
    let req = parse_run(&body)?;
    // Parsed: the raw body no longer counts against `limits.max_body_bytes_in_flight`.
    drop(body);
    let agent_id = Value::String(agent.clone());
    if !agent_allowed(&api.config.auth.org_agents, &who.org_id, &agent_id) {
        return Err(ApiError::AgentNotFound);
    }
    // Before anything is started: a malformed cursor is refused with nothing done, and a
    // streamed answer takes its slot.
    let client_cursor = stream::cursor_of(ex)?;
    let streams = req.stream && !wants_no_stream(ex.header("x-stream-response"));
    let slot = match streams {
        true => Some(api.gates.enter(&who.org_id, Gate::Stream)?),
        false => None,
    };
    let key = format!(
        "agentflow\u{1f}{}\u{1f}{}",
        req.conversation_id, req.message_id
    );
    let started = api
        .store
        .create_run(NewRun {
            thread_id: None,
            org_id: who.org_id.clone(),
            user_id: who.user_id.clone(),
            agent_id,
            user_message: json!({"id": req.message_id, "role": "user",
                                 "parts": [{"type": "text", "text": req.message}]}),
            idempotency_key: Some(key.clone()),
            conversation: Some(req.conversation_id.clone()),
        })
        .await?;
    let run = started.run.clone();
    let mut ids = vec![
        ("x-thread-id", run.thread_id.0.clone()),
        ("x-run-id", run.run_id.0.clone()),
    ];
    if started.existing {
        metrics::IDEMPOTENT_REATTACHES.inc();
        ids.push(("x-sluice-reattached", "true".into()));
    } else {
        let mut body = req.body.clone();
        if api.config.upstream.conversation_ids == ConversationIds::Thread {
            body.insert("conversation_id".into(), json!(run.thread_id.0));
        }
        let job = RunJob {
            run: run.clone(),
            agent_path: path_segment(&agent),
            body: Value::Object(body),
            bearer: who.token.clone(),
            backend_thread: api.store.backend_thread(&run.thread_id).await,
        };
        if let Some(err) = super::invoke::admit(api, job).await {
            api.store
                .forget_key(&who.org_id, &who.user_id, &key, &run.run_id)
                .await;
            let mut reply = err.reply();
            reply.headers.extend(ids);
            let _ = ex.respond(reply).await;
            return Ok(());
        }
    }
    if wants_no_stream(ex.header("x-stream-response")) {
        let reply = super::invoke::accepted(api, &started, ids).await?;
        let _ = ex.respond(reply).await;
        return Ok(());
    }
    if !req.stream {
        return final_result(api, ex, &run, &req, ids).await;
    }
    // A re-attaching client continues after its cursor when the cursor is inside the run.
    let cursor = match client_cursor {
        Some(c) if started.existing && c.seq >= run.first_seq => c,
        _ => Cursor::after(run.first_seq - 1),
    };
    let dialect = Dialect::AgentFlow {
        verbose: req.verbose,
    };
    let slot = slot.ok_or_else(|| ApiError::Internal("a stream without its slot".into()))?;
    stream::stream_run(api, ex, &run, dialect, cursor, ids, slot).await
}

/// `stream: false`: wait for the run's end (or the client's hang-up), then answer its result.
async fn final_result(
    api: &Api,
    ex: &mut dyn Exchange,
    run: &RunInfo,
    req: &RunRequest,
    ids: Vec<(&'static str, String)>,
) -> Result<(), ApiError> {
    let deadline = tokio::time::Instant::now() + api.config.upstream.run_timeout.0;
    let mut info = api.store.run(&run.run_id).await?;
    while !info.status.is_terminal() && tokio::time::Instant::now() < deadline {
        tokio::select! {
            _ = api.store.wait(&run.run_id, info.last_seq, api.config.stream.keepalive_interval.0) => {}
            _ = ex.closed() => return Ok(()),
        }
        info = api.store.run(&run.run_id).await?;
    }
    let folded = api.views.of(&info).folded(api.store.as_ref()).await?;
    let message: serde_json::Value = serde_json::from_slice(&folded.json).unwrap_or_default();
    let text: String = message["parts"]
        .as_array()
        .map(|parts| {
            parts
                .iter()
                .filter(|p| p["type"] == "text")
                .filter_map(|p| p["text"].as_str())
                .collect()
        })
        .unwrap_or_default();
    let mut body = json!({
        "conversation_id": req.conversation_id,
        "message_id": req.message_id,
        "threadId": info.thread_id.0,
        "runId": info.run_id.0,
        "status": info.status.as_str(),
        "response": text,
        "message": message,
        "lastSeq": info.last_seq,
    });
    if let Some(e) = &info.error {
        body["errorText"] = json!(e);
    }
    let mut reply = Reply::json(200, &body);
    reply.headers.extend(ids);
    let _ = ex.respond(reply).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_passes_through_with_stream_forced_on() {
        let r = parse_run(
            br#"{"message":"hi","message_id":"m1","conversation_id":"c1","stream":false,"verbose":false,"temperature":0.2,"knowledge_bases":["kb"]}"#,
        )
        .unwrap();
        assert_eq!((r.stream, r.verbose), (false, false));
        assert_eq!(r.body["stream"], json!(true));
        assert_eq!(r.body["temperature"], json!(0.2));
        assert_eq!(r.body["knowledge_bases"], json!(["kb"]));
        assert_eq!(r.conversation_id, "c1");
    }

    #[test]
    fn identity_fields_never_reach_the_backend() {
        let r = parse_run(
            br#"{"message":"hi","message_id":"m1","conversation_id":"c1","user_id":"admin","org_id":"other","organizationId":"x","tenant_id":"t","topic":"kept"}"#,
        )
        .unwrap();
        for field in IDENTITY_FIELDS {
            assert!(!r.body.contains_key(*field), "{field}");
        }
        assert_eq!(r.body["topic"], json!("kept"));
    }

    #[test]
    fn bad_bodies_are_refused() {
        assert_eq!(parse_run(b"{").unwrap_err().code(), "invalid_json");
        for body in [
            r#"[]"#,
            r#"{"message_id":"m","conversation_id":"c"}"#,
            r#"{"message":"","message_id":"m","conversation_id":"c"}"#,
            r#"{"message":"hi","conversation_id":"c"}"#,
            r#"{"message":"hi","message_id":7,"conversation_id":"c"}"#,
            r#"{"message":"hi","message_id":"m","conversation_id":5}"#,
            r#"{"message":"hi","message_id":"m"}"#,
            r#"{"message":"hi","message_id":"m","conversation_id":""}"#,
            r#"{"message":"hi","message_id":"m","conversation_id":"c","stream":"yes"}"#,
        ] {
            assert_eq!(
                parse_run(body.as_bytes()).unwrap_err().code(),
                "invalid_request",
                "{body}"
            );
        }
    }

    #[test]
    fn agent_ids_come_from_the_path() {
        assert_eq!(agent_of("/agents/42/run").as_deref(), Some("42"));
        assert_eq!(agent_of("/agents/a%20b/run").as_deref(), Some("a b"));
        assert_eq!(agent_of("/agents//run"), None);
        assert_eq!(agent_of("/agents/a/b/run"), None);
    }
}
