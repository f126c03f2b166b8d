//! `GET /api/getConversation?threadId=`: the thread's snapshot. Every run contributes its user
//! message and the fold of its log (the assistant message); `streamStatus` and `lastSeq` are
//! those of the latest run, and the snapshot at `lastSeq = n` is the fold of events `1..n`.

use serde_json::{json, Value};

use super::{query_param, Api, ApiError, Exchange, Identity, Reply};
use crate::event::Event;
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
    let thread = api.store.thread(&who.org_id, &ThreadId(thread_id)).await?;
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
