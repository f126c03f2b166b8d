//! `GET /api/getConversation?threadId=`: the thread's snapshot. Every retained run contributes
//! its user message and the fold of its log (the assistant message); `streamStatus` is the
//! latest run's, `lastSeq` the thread's, and the snapshot at `lastSeq = n` is the fold of events
//! `1..n`, with the evicted runs counted (`evictedRuns`, `evictedThroughSeq`) rather than
//! silently missing. An answer `/api/chat` replaced (regenerated or edited) is left out with
//! the turns after it, as the AI SDK leaves them out on the client.
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
use bytes::Bytes;

use super::views::LogState;
use crate::metrics;
use crate::store::{RunInfo, StoreError, ThreadInfo};

/// Handle `GET /api/getConversation`.
pub async fn get_conversation(
    api: &Api,
    who: &Identity,
    ex: &mut dyn Exchange,
) -> Result<(), ApiError> {
    let thread_id = query_param(ex.query(), "threadId")
        .filter(|t| !t.is_empty())
        .ok_or_else(|| ApiError::InvalidRequest("query parameter `threadId` is required".into()))?;
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
    // A chat id (`/api/chat`) names its thread too.
    let mut thread = super::chat::thread_named(api, &who.org_id, &thread_id).await?;
    let thread_id = thread.thread_id.clone();
    if let Some(wait) = wait.filter(|w| !w.is_zero()) {
        // With `afterSeq`, wait for anything after it (a new run included); without, only while
        // the latest run is in progress.
        let live = thread.latest().is_some_and(|r| !r.status.is_terminal());
        let last = thread.last_seq();
        if (after.is_some() || live) && after.unwrap_or(last) >= last {
            let _slot = api.gates.enter(&who.org_id, super::quota::Gate::LongPoll)?;
            let _waiting = metrics::Gauged::new(&metrics::LONG_POLLS_WAITING);
            let mut shutdown = api.shutdown.clone();
            let seen = thread.latest_run();
            let after = after.unwrap_or(last);
            let changed = tokio::select! {
                waited = api.store.wait_thread(&who.org_id, &thread_id, &seen, after, wait) => {
                    waited?
                }
                _ = ex.closed() => return Ok(()),
                // A draining process answers held polls with what it has.
                _ = super::stream::shutting_down(&mut shutdown) => true,
            };
            // A poll that ran out of time with nothing new answers with what it read.
            if changed {
                thread = api.store.thread(&who.org_id, &thread_id).await?;
            }
        }
    }
    // A run evicted while the snapshot is written (retention or memory pressure) is then
    // counted as evicted: read the thread again.
    let mut tries = 0;
    let body = loop {
        match snapshot(api, &thread).await? {
            Some(body) => break body,
            None if tries < 3 => {
                tries += 1;
                thread = api.store.thread(&who.org_id, &thread_id).await?;
            }
            None => return Err(StoreError::RunNotFound.into()),
        }
    };
    let _ = ex.respond(Reply::json_pieces(200, body)).await;
    Ok(())
}

/// The snapshot body of a thread: its retained runs' messages (each run's user message and the
/// kept fold of its log), and how many earlier runs were evicted (`evictedRuns`, which held
/// events `1..=evictedThroughSeq`). `lastSeq` and `streamStatus` are those the latest run's
/// fold is at, so the messages are exactly the fold of events `1..=lastSeq`.
///
/// Written directly as JSON, in pieces: the messages are the views' serialised bytes, never
/// re-folded or re-parsed, and large ones are shared rather than copied (a snapshot costs its
/// small parts, however large the thread). `None` when one of the thread's runs was evicted
/// meanwhile.
pub async fn snapshot(api: &Api, thread: &ThreadInfo) -> Result<Option<Vec<Bytes>>, ApiError> {
    let store = api.store.as_ref();
    let mut messages: Vec<Bytes> = Vec::with_capacity(thread.runs.len() * 2);
    let mut latest: Option<(&RunInfo, LogState)> = None;
    let shown = super::chat::shown(&thread.runs);
    for (run, shown) in thread.runs.iter().zip(shown) {
        // A replaced answer (never the latest run) is left out, and never folded.
        if !shown {
            continue;
        }
        let view = api.views.of(run);
        messages.push(view.user_json());
        let folded = match view.folded(store).await {
            Ok(folded) => folded,
            Err(StoreError::RunNotFound) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        if folded.at.last_seq >= run.first_seq {
            messages.push(folded.json);
        }
        latest = Some((run, folded.at));
    }
    let (run_id, status, error, updated_at, last_seq) = match (latest, &thread.latest_evicted) {
        (Some((run, at)), _) => {
            let run = if at.status == run.status {
                run.clone()
            } else {
                // The run ended after the thread was read: its error and end time too.
                match store.run(&run.run_id).await {
                    Ok(run) => run,
                    Err(StoreError::RunNotFound) => return Ok(None),
                    Err(e) => return Err(e.into()),
                }
            };
            (
                run.run_id,
                at.status,
                run.error,
                run.updated_at,
                at.last_seq,
            )
        }
        (None, Some(o)) => (
            o.run_id.clone(),
            o.status,
            o.error.clone(),
            o.updated_at,
            thread.last_seq(),
        ),
        (None, None) => return Err(ApiError::ThreadNotFound),
    };
    let mut out = Pieces::default();
    let field = |out: &mut Vec<u8>, key: &str, value: &Value| {
        out.push(b'"');
        out.extend_from_slice(key.as_bytes());
        out.extend_from_slice(b"\":");
        // Writing a `Value` into a `Vec` cannot fail.
        let _ = serde_json::to_writer(&mut *out, value);
        out.push(b',');
    };
    out.own.push(b'{');
    field(&mut out.own, "threadId", &json!(thread.thread_id.0));
    field(&mut out.own, "runId", &json!(run_id.0));
    field(&mut out.own, "agentId", &thread.agent_id);
    field(&mut out.own, "organizationId", &json!(thread.org_id));
    field(&mut out.own, "streamStatus", &json!(status.as_str()));
    out.own.extend_from_slice(b"\"messages\":[");
    for (i, m) in messages.into_iter().enumerate() {
        if i > 0 {
            out.own.push(b',');
        }
        out.push(m);
    }
    out.own.extend_from_slice(b"],");
    let tail = &mut out.own;
    field(tail, "lastSeq", &json!(last_seq));
    field(tail, "evictedRuns", &json!(thread.evicted_runs));
    field(tail, "evictedThroughSeq", &json!(thread.evicted_through));
    field(tail, "createdAt", &json!(timestamp(thread.created_at)));
    field(tail, "updatedAt", &json!(timestamp(updated_at)));
    if let Some(error) = error {
        field(tail, "errorText", &json!(error));
    }
    tail.pop();
    tail.push(b'}');
    Ok(Some(out.finish()))
}

/// Pieces shared below this size are copied (one write beats several tiny ones).
const SHARE_FROM: usize = 16 * 1024;

/// A body built from small parts of its own and large shared pieces.
#[derive(Default)]
struct Pieces {
    done: Vec<Bytes>,
    /// Small parts since the last shared piece.
    own: Vec<u8>,
}

impl Pieces {
    fn push(&mut self, piece: Bytes) {
        if piece.len() < SHARE_FROM {
            self.own.extend_from_slice(&piece);
            return;
        }
        if !self.own.is_empty() {
            self.done.push(Bytes::from(std::mem::take(&mut self.own)));
        }
        self.done.push(piece);
    }

    fn finish(mut self) -> Vec<Bytes> {
        if !self.own.is_empty() {
            self.done.push(Bytes::from(self.own));
        }
        self.done
    }
}

/// RFC 3339 with milliseconds, UTC.
pub fn timestamp(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}
