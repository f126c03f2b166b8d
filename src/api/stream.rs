//! Streaming a run to a client as the AI SDK v5 UI-message stream: events from the log after a
//! cursor, then live events as they are appended, then `data: [DONE]` when the run has ended.
//!
//! Each chunk carries an SSE id (`k` for the last chunk of event `k`, `k.j` for the ones before
//! it; DESIGN.md §6), so `Last-Event-ID` resumes exactly, even inside one event's chunks. The
//! stream only reads the log, at its own pace: a slow or vanished client never slows ingestion
//! or other readers, and hanging up never stops the run. Quiet periods get keep-alive comments;
//! process shutdown ends the stream cleanly (the client may resume).

use bytes::Bytes;

use super::{query_param, Api, ApiError, Exchange, Identity, Reply};
use crate::metrics::{self, Gauged};
use crate::render::ui::{Cursor, UiRenderer};
use crate::sse;
use crate::store::{RunInfo, ThreadId};

/// Events rendered per store read.
const READ_BATCH: usize = 256;

/// The response headers of a UI-message stream (AI SDK `UI_MESSAGE_STREAM_HEADERS`).
pub fn ui_headers() -> Vec<(&'static str, String)> {
    vec![
        ("content-type", "text/event-stream".into()),
        ("cache-control", "no-cache".into()),
        ("connection", "keep-alive".into()),
        ("x-vercel-ai-ui-message-stream", "v1".into()),
        ("x-accel-buffering", "no".into()),
    ]
}

/// `GET /api/threads/{threadId}/stream[?runId=&afterSeq=]` with an optional `Last-Event-ID`.
///
/// No cursor: the whole run from its first event while it is in progress (what the AI SDK's
/// `resume` expects), `204` once it has ended. With a cursor: the events after it, then live
/// events, then the end; `204` when the cursor is already at the end of a finished run.
pub async fn resume(api: &Api, who: &Identity, ex: &mut dyn Exchange) -> Result<(), ApiError> {
    let thread_id = super::route::thread_of(ex.path(), "/stream").ok_or(ApiError::NotFound)?;
    let thread = api.store.thread(&who.org_id, &ThreadId(thread_id)).await?;
    let run = match query_param(ex.query(), "runId") {
        Some(id) => thread.runs.iter().find(|r| r.run_id.0 == id),
        None => thread.latest(),
    }
    .ok_or(ApiError::RunNotFound)?
    .clone();
    let raw = ex
        .header("last-event-id")
        .map(str::to_string)
        .filter(|v| !v.trim().is_empty())
        .or_else(|| query_param(ex.query(), "afterSeq"));
    let cursor = match raw {
        None => None,
        Some(raw) => Some(Cursor::parse(raw.trim()).ok_or_else(|| {
            ApiError::InvalidRequest(format!(
                "cursor `{raw}` is not an event id (expected `k` or `k.j`)"
            ))
        })?),
    };
    let finished = run.status.is_terminal();
    match cursor {
        None if finished => {
            let _ = ex.respond(Reply::empty(204)).await;
            return Ok(());
        }
        Some(c) if c.seq > run.last_seq => {
            return Err(ApiError::InvalidRequest(format!(
                "cursor `{c}` is beyond the end of run {} (last event {})",
                run.run_id, run.last_seq
            )));
        }
        Some(c) if finished && c.seq == run.last_seq && c.chunk.is_none() => {
            let _ = ex.respond(Reply::empty(204)).await;
            return Ok(());
        }
        _ => {}
    }
    let ids = vec![
        ("x-thread-id", run.thread_id.0.clone()),
        ("x-run-id", run.run_id.0.clone()),
    ];
    let cursor = cursor.unwrap_or(Cursor {
        seq: 0,
        chunk: None,
    });
    stream_ui(api, ex, &run, cursor, ids).await
}

/// Stream `run` to the client from after `cursor` (`seq: 0` = from the start).
pub async fn stream_ui(
    api: &Api,
    ex: &mut dyn Exchange,
    run: &RunInfo,
    cursor: Cursor,
    extra_headers: Vec<(&'static str, String)>,
) -> Result<(), ApiError> {
    let mut headers = ui_headers();
    headers.extend(extra_headers);
    if ex.start_stream(200, headers).await.is_err() {
        return Ok(());
    }
    let _open = Gauged::new(&metrics::SSE_STREAMS_ACTIVE);
    let store = api.store.as_ref();
    let keepalive = api.config.stream.keepalive_interval.0;
    let mut shutdown = api.shutdown.clone();
    let mut renderer = UiRenderer::new(run.assistant_message_id.clone());
    let mut buf = Vec::with_capacity(16 * 1024);

    // Restore the renderer's state by folding the events the client has fully seen.
    let seen = match cursor.chunk {
        Some(_) => cursor.seq.saturating_sub(1),
        None => cursor.seq,
    };
    let mut at = 0;
    while at < seen {
        let want = ((seen - at) as usize).min(READ_BATCH);
        let batch = store.read_after(&run.run_id, at, want).await?;
        let Some(last) = batch.events.last().map(|e| e.seq) else {
            break;
        };
        for ev in &batch.events {
            renderer.skip(ev);
        }
        at = last;
    }
    // A cursor inside an event's chunks: send the rest of that event.
    if let Some(j) = cursor.chunk {
        let batch = store.read_after(&run.run_id, at, 1).await?;
        if let Some(ev) = batch.events.first() {
            renderer.render_sse_from(ev, j, &mut buf);
            at = ev.seq;
            if !buf.is_empty() && ex.send(Bytes::copy_from_slice(&buf)).await.is_err() {
                return Ok(());
            }
        }
    }

    loop {
        let batch = match store.read_after(&run.run_id, at, READ_BATCH).await {
            Ok(b) => b,
            Err(e) => {
                // The run was evicted under us: end the stream; the client may poll.
                log::debug!("stream of {}: {e}", run.run_id);
                break;
            }
        };
        if let Some(last) = batch.events.last().map(|e| e.seq) {
            buf.clear();
            for ev in &batch.events {
                renderer.render_sse(ev, &mut buf);
            }
            at = last;
            if !buf.is_empty() && ex.send(Bytes::copy_from_slice(&buf)).await.is_err() {
                return Ok(());
            }
            continue;
        }
        if batch.status.is_terminal() {
            let _ = ex.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
            break;
        }
        tokio::select! {
            waited = store.wait(&run.run_id, at, keepalive) => match waited {
                Ok((last, status)) if last == at && !status.is_terminal() => {
                    buf.clear();
                    sse::encode_comment(&mut buf, "keep-alive");
                    if ex.send(Bytes::copy_from_slice(&buf)).await.is_err() {
                        return Ok(());
                    }
                }
                Ok(_) => {}
                Err(_) => break,
            },
            _ = ex.closed() => return Ok(()),
            _ = shutting_down(&mut shutdown) => break,
        }
    }
    let _ = ex.end_stream().await;
    Ok(())
}

/// Resolves once the process starts shutting down (never, if nobody can tell it so).
async fn shutting_down(rx: &mut tokio::sync::watch::Receiver<bool>) {
    if rx.wait_for(|down| *down).await.is_err() {
        std::future::pending::<()>().await;
    }
}
