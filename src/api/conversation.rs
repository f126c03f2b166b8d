//! `GET /api/getConversation?threadId=`: the thread's snapshot. Every retained run contributes
//! its user message and the fold of its log (the assistant message); `streamStatus` is the
//! latest run's, `lastSeq` the thread's, and the snapshot at `lastSeq = n` is the fold of events
//! `1..n`, with the evicted runs counted (`evictedRuns`, `evictedThroughSeq`) rather than
//! silently missing.
//!
//! Long-poll: with `wait=S&afterSeq=k` the answer is held until the thread has anything after
//! `k` (an event, a new run, the latest run's end) or `S` seconds pass (capped by
//! `stream.long_poll_max`); without `afterSeq`, it is held only while the latest run is in
//! progress, until it changes. A waiting request holds no thread: it sleeps on the thread's
//! watch channel, a client that hangs up is noticed at once, and a draining process answers at
//! once.

use std::time::Duration;

use serde_json::{json, Value};

use super::{query_param, Api, ApiError, Exchange, Identity, Reply};
use crate::event::Event;
use crate::metrics;
use crate::render::fold::fold;
use crate::store::{RunInfo, Store, ThreadId, ThreadInfo};

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
    if let Some(wait) = wait.filter(|w| !w.is_zero()) {
        // With `afterSeq`, wait for anything after it (a new run included); without, only while
        // the latest run is in progress.
        let live = thread.latest().is_some_and(|r| !r.status.is_terminal());
        let last = thread.last_seq();
        if (after.is_some() || live) && after.unwrap_or(last) >= last {
            let _waiting = metrics::Gauged::new(&metrics::LONG_POLLS_WAITING);
            let mut shutdown = api.shutdown.clone();
            let seen = thread.latest_run();
            let after = after.unwrap_or(last);
            tokio::select! {
                _ = api.store.wait_thread(&who.org_id, &thread_id, &seen, after, wait) => {}
                _ = ex.closed() => return Ok(()),
                // A draining process answers held polls with what it has.
                _ = super::stream::shutting_down(&mut shutdown) => {}
            }
            thread = api.store.thread(&who.org_id, &thread_id).await?;
        }
    }
    let body = snapshot(api.store.as_ref(), &thread).await?;
    let _ = ex.respond(Reply::json(200, &body)).await;
    Ok(())
}

/// Read a run's events (`first_seq..=last_seq`).
pub async fn read_events(store: &dyn Store, run: &RunInfo) -> Result<Vec<Event>, ApiError> {
    let mut events = Vec::with_capacity(run.events().min(65_536) as usize);
    let mut cursor = run.first_seq - 1;
    while cursor < run.last_seq {
        let want = ((run.last_seq - cursor) as usize).min(READ_BATCH);
        let batch = store.read_after(&run.run_id, cursor, want).await?;
        let Some(end) = batch.events.last().map(|e| e.seq) else {
            return Err(ApiError::ThreadNotFound);
        };
        events.extend(batch.events);
        cursor = end;
    }
    Ok(events)
}

/// Build the snapshot JSON of a thread: its retained runs' messages, and how many earlier runs
/// were evicted (`evictedRuns`, which held events `1..=evictedThroughSeq`).
pub async fn snapshot(store: &dyn Store, thread: &ThreadInfo) -> Result<Value, ApiError> {
    let mut messages = Vec::with_capacity(thread.runs.len() * 2);
    for run in &thread.runs {
        messages.push(run.user_message.clone());
        if run.last_seq >= run.first_seq {
            let events = read_events(store, run).await?;
            messages.push(fold(&run.assistant_message_id, &events));
        }
    }
    let (run_id, status, error, updated_at) = match (thread.latest(), &thread.latest_evicted) {
        (Some(r), _) => (&r.run_id, r.status, &r.error, r.updated_at),
        (None, Some(o)) => (&o.run_id, o.status, &o.error, o.updated_at),
        (None, None) => return Err(ApiError::ThreadNotFound),
    };
    let mut body = json!({
        "threadId": thread.thread_id.0,
        "runId": run_id.0,
        "agentId": thread.agent_id,
        "organizationId": thread.org_id,
        "streamStatus": status.as_str(),
        "messages": messages,
        "lastSeq": thread.last_seq(),
        "evictedRuns": thread.evicted_runs,
        "evictedThroughSeq": thread.evicted_through,
        "createdAt": timestamp(thread.created_at),
        "updatedAt": timestamp(updated_at),
    });
    if let Some(error) = error {
        body["errorText"] = json!(error);
    }
    Ok(body)
}

/// RFC 3339 with milliseconds, UTC.
pub fn timestamp(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}
