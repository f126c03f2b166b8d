//! `GET /api/getConversation?threadId=`: the thread's snapshot. Every run contributes its user
//! message and the fold of its log (the assistant message); `streamStatus` and `lastSeq` are
//! those of the latest run, and the snapshot at `lastSeq = n` is the fold of events `1..n`.
//!
//! Long-poll: with `wait=S` the answer is held until the latest run's log passes `afterSeq`
//! (default: its current last seq) or the run ends, or `S` seconds pass (capped by
//! `stream.long_poll_max`). A waiting request holds no thread: it sleeps on the run's watch
//! channel, and a client that hangs up is noticed at once.

use std::time::Duration;

use serde_json::{json, Value};

use super::{query_param, Api, ApiError, Exchange, Identity, Reply};
use crate::event::Event;
use crate::metrics;
use crate::render::fold::fold;
use crate::store::{RunId, Store, ThreadId, ThreadInfo};

/// Events read per store round trip.
const READ_BATCH: usize = 1024;

/// Handle `GET /api/getConversation`.
pub async fn get_conversation(
    api: &Api,
    who: &Identity,
    ex: &mut dyn Exchange,
) -> Result<(), ApiError> {
    let thread_id = query_param(ex.query(), "threadId")
        .filter(|t| !t.is_empty())
        .ok_or_else(|| ApiError::InvalidRequest("query parameter `threadId` is required".into()))?;
    let thread_id = ThreadId(thread_id);
    let after = match query_param(ex.query(), "afterSeq") {
        None => None,
        Some(v) => Some(v.trim().parse::<u64>().map_err(|_| {
            ApiError::InvalidRequest(format!("`afterSeq` must be a whole number, not `{v}`"))
        })?),
    };
    let wait = match query_param(ex.query(), "wait") {
        None => None,
        Some(v) => {
            let secs = v
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|s| s.is_finite() && *s >= 0.0);
            let secs = secs.ok_or_else(|| {
                ApiError::InvalidRequest(format!("`wait` must be a number of seconds, not `{v}`"))
            })?;
            Some(Duration::from_secs_f64(secs.min(86_400.0)).min(api.config.stream.long_poll_max.0))
        }
    };
    let mut thread = api.store.thread(&who.org_id, &thread_id).await?;
    if let (Some(wait), Some(run)) = (wait.filter(|w| !w.is_zero()), thread.latest()) {
        let after = after.unwrap_or(run.last_seq);
        if run.last_seq <= after && !run.status.is_terminal() {
            let _waiting = metrics::Gauged::new(&metrics::LONG_POLLS_WAITING);
            tokio::select! {
                _ = api.store.wait(&run.run_id, after, wait) => {}
                _ = ex.closed() => return Ok(()),
            }
            thread = api.store.thread(&who.org_id, &thread_id).await?;
        }
    }
    let body = snapshot(api.store.as_ref(), &thread).await?;
    let _ = ex.respond(Reply::json(200, &body)).await;
    Ok(())
}

/// Read events `1..=last` of a run.
pub async fn read_events(
    store: &dyn Store,
    run: &RunId,
    last: u64,
) -> Result<Vec<Event>, ApiError> {
    let mut events = Vec::with_capacity(last.min(65_536) as usize);
    let mut cursor = 0;
    while cursor < last {
        let want = ((last - cursor) as usize).min(READ_BATCH);
        let batch = store.read_after(run, cursor, want).await?;
        let Some(end) = batch.events.last().map(|e| e.seq) else {
            return Err(ApiError::ThreadNotFound);
        };
        events.extend(batch.events);
        cursor = end;
    }
    Ok(events)
}

/// Build the snapshot JSON of a thread.
pub async fn snapshot(store: &dyn Store, thread: &ThreadInfo) -> Result<Value, ApiError> {
    let mut messages = Vec::with_capacity(thread.runs.len() * 2);
    for run in &thread.runs {
        messages.push(run.user_message.clone());
        if run.last_seq > 0 {
            let events = read_events(store, &run.run_id, run.last_seq).await?;
            messages.push(fold(&run.assistant_message_id, &events));
        }
    }
    let latest = thread.latest().ok_or(ApiError::ThreadNotFound)?;
    let mut body = json!({
        "threadId": thread.thread_id.0,
        "runId": latest.run_id.0,
        "agentId": thread.agent_id,
        "organizationId": thread.org_id,
        "streamStatus": latest.status.as_str(),
        "messages": messages,
        "lastSeq": latest.last_seq,
        "createdAt": timestamp(thread.created_at),
        "updatedAt": timestamp(latest.updated_at),
    });
    if let Some(error) = &latest.error {
        body["errorText"] = json!(error);
    }
    Ok(body)
}

/// RFC 3339 with milliseconds, UTC.
pub fn timestamp(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}
