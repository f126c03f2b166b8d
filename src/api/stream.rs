//! Streaming a run to a client over SSE, in either dialect: events from the log after a cursor,
//! then live events as they are appended, then the end of the run (`data: [DONE]` in the
//! UI-message dialect).
//!
//! In the UI-message dialect each chunk carries an SSE id (`k` for the last chunk of event `k`,
//! `k.j` for the ones before it; DESIGN.md §6), so `Last-Event-ID` resumes exactly, even inside
//! one event's chunks; in the AgentFlow dialect each event is one SSE event with `id: k`.
//!
//! The stream only reads the log, at its own pace: a slow or vanished client never slows
//! ingestion or other readers, and hanging up never stops the run. At most one batch of events
//! is buffered per connection; a reader stuck longer than `stream.stuck_reader_timeout` is cut
//! so that it reconnects with its cursor. Quiet periods get keep-alive comments; every stream
//! starts with a `retry:` hint. Only the run's end ends a stream cleanly: a stuck reader, an
//! eviction or store failure, or the end of the shutdown grace period aborts the connection.

use bytes::Bytes;

use super::locate::{locate, within, Located, Span};
use super::quota::{Gate, Held};
use super::views::{LogState, RunView};
use super::{query_param, Api, ApiError, Exchange, Gone, Identity, Reply};
use crate::metrics::{self, Gauged};
use crate::render::agentflow::AgentFlowRenderer;
use crate::render::ui::Cursor;
use crate::render::DONE_FRAME;
use crate::sse;
use crate::store::{RunInfo, Store, StoreError, ThreadInfo};

/// AgentFlow events read per store read.
const READ_BATCH: usize = 256;

/// Bytes handed to the connection per write, at most (whole events; one larger event goes
/// alone). What a connection holds beyond the shared frames is at most this much.
const SEND_BYTES: usize = 64 * 1024;

/// Which dialect a stream speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    /// The AI SDK v5 UI-message stream.
    UiMessage,
    /// AgentFlow events as the backend sent them; `verbose: false` hides nested calls.
    AgentFlow {
        /// Show nested calls.
        verbose: bool,
    },
}

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

fn headers_for(dialect: Dialect) -> Vec<(&'static str, String)> {
    match dialect {
        Dialect::UiMessage => ui_headers(),
        Dialect::AgentFlow { .. } => vec![
            ("content-type", "text/event-stream".into()),
            ("cache-control", "no-cache".into()),
            ("connection", "keep-alive".into()),
            ("x-accel-buffering", "no".into()),
        ],
    }
}

/// The client's cursor: `Last-Event-ID`, else `?afterSeq=`. `Ok(None)` when it sent none.
pub fn cursor_of(ex: &dyn Exchange) -> Result<Option<Cursor>, ApiError> {
    let raw = ex
        .header("last-event-id")
        .map(str::to_string)
        .filter(|v| !v.trim().is_empty())
        .or_else(|| query_param(ex.query(), "afterSeq"));
    match raw {
        None => Ok(None),
        Some(raw) => Cursor::parse(raw.trim())
            // `0.j` names chunks of no event.
            .filter(|c| c.seq > 0 || c.chunk.is_none())
            .map(Some)
            .ok_or_else(|| {
                ApiError::InvalidRequest(format!(
                    "cursor `{raw}` is not an event id (expected `k` or `k.j`)"
                ))
            }),
    }
}

/// `GET /api/threads/{threadId}/stream[?runId=&afterSeq=&format=ui-message|agentflow&verbose=]`
/// with an optional `Last-Event-ID`.
///
/// No cursor: the latest run from its first event while it is in progress (what the AI SDK's
/// `resume` expects), `204` once it has ended. With a cursor (a position in the thread): the run
/// holding the next event, from after the cursor, then live events, then that run's end; `204`
/// when nothing follows the cursor and no run is in progress; `410` for a cursor into evicted
/// runs. `?runId=` names the run explicitly (the cursor must then lie inside it).
pub async fn resume(api: &Api, who: &Identity, ex: &mut dyn Exchange) -> Result<(), ApiError> {
    let thread_id = super::route::thread_of(ex.path(), "/stream").ok_or(ApiError::NotFound)?;
    let thread = super::chat::thread_named(api, &who.org_id, &thread_id).await?;
    resume_thread(api, who, ex, thread).await
}

/// [`resume`] of a thread already read.
pub async fn resume_thread(
    api: &Api,
    who: &Identity,
    ex: &mut dyn Exchange,
    thread: ThreadInfo,
) -> Result<(), ApiError> {
    let dialect = match query_param(ex.query(), "format").as_deref() {
        None | Some("ui-message") => Dialect::UiMessage,
        Some("agentflow") => Dialect::AgentFlow {
            verbose: !matches!(query_param(ex.query(), "verbose").as_deref(), Some("false")),
        },
        Some(other) => {
            return Err(ApiError::InvalidRequest(format!(
                "`format` must be `ui-message` or `agentflow`, not `{other}`"
            )))
        }
    };
    let cursor = cursor_of(ex)?;
    let spans: Vec<Span> = thread
        .runs
        .iter()
        .map(|r| Span {
            first_seq: r.first_seq,
            last_seq: r.last_seq,
            in_progress: !r.status.is_terminal(),
        })
        .collect();
    let located = match query_param(ex.query(), "runId") {
        Some(id) => match thread.runs.iter().position(|r| r.run_id.0 == id) {
            Some(i) => match cursor {
                Some(c) if !within(c, &spans[i]) => {
                    return Err(ApiError::InvalidRequest(format!(
                        "cursor `{c}` is not in run {id} (its events are {}..={})",
                        spans[i].first_seq, spans[i].last_seq
                    )));
                }
                Some(c)
                    if c.chunk.is_none() && c.seq == spans[i].last_seq && !spans[i].in_progress =>
                {
                    Located::NothingLeft
                }
                None if !spans[i].in_progress => Located::NothingLeft,
                _ => Located::Run(i),
            },
            None if thread.evicted.iter().any(|r| r.0 == id) => Located::Expired,
            None => return Err(ApiError::RunNotFound),
        },
        None => locate(cursor, &spans, thread.evicted_through),
    };
    let run = match located {
        Located::Run(i) => thread.runs[i].clone(),
        Located::NothingLeft => {
            metrics::RESUMES.with_label_values(&["gone"]).inc();
            let _ = ex.respond(Reply::empty(204)).await;
            return Ok(());
        }
        Located::Expired => {
            metrics::RESUMES.with_label_values(&["gone"]).inc();
            return Err(ApiError::CursorExpired(match cursor {
                Some(c) => format!("cursor `{c}`"),
                None => "this run".into(),
            }));
        }
        Located::Beyond => {
            return Err(ApiError::InvalidRequest(format!(
                "cursor `{}` is beyond the end of the thread (last event {})",
                cursor.map(|c| c.to_string()).unwrap_or_default(),
                thread.last_seq()
            )));
        }
    };
    let slot = api.gates.enter(&who.org_id, Gate::Stream)?;
    // From the run's start unless the cursor is inside it.
    let cursor = cursor
        .filter(|c| c.seq >= run.first_seq)
        .unwrap_or(Cursor::after(run.first_seq - 1));
    let outcome = if cursor.seq < run.last_seq {
        "replayed"
    } else {
        "live"
    };
    metrics::RESUMES.with_label_values(&[outcome]).inc();
    metrics::EVENTS_REPLAYED.inc_by(run.last_seq.saturating_sub(cursor.seq));
    let ids = vec![
        ("x-thread-id", run.thread_id.0.clone()),
        ("x-run-id", run.run_id.0.clone()),
    ];
    stream_run(api, ex, &run, dialect, cursor, ids, slot).await
}

/// Stream `run` to the client in `dialect` from after `cursor` (`seq: 0` = from the start).
///
/// Only the run's real end (its status is terminal and every event was sent) ends the stream
/// cleanly: the dialect's end, then the end of the body. Every other end (the client hung up or
/// stopped reading for `stream.stuck_reader_timeout`, the run was evicted or the store failed
/// mid-stream, the drain's grace period ended) aborts the connection, so that the client sees a
/// cut and resumes with its cursor, never a truncated answer that looks complete (DESIGN.md §6).
pub async fn stream_run(
    api: &Api,
    ex: &mut dyn Exchange,
    run: &RunInfo,
    dialect: Dialect,
    cursor: Cursor,
    extra_headers: Vec<(&'static str, String)>,
    _slot: Held<'_>,
) -> Result<(), ApiError> {
    let store = api.store.as_ref();
    let mut source = match dialect {
        Dialect::UiMessage => Source::Frames(api.views.of(run)),
        Dialect::AgentFlow { verbose } => Source::Log(AgentFlowRenderer { verbose }),
    };
    // The log is read once before answering, so that a run evicted since it was located gets
    // `410` rather than a `200` with nothing in it.
    let mut reader = Reader {
        run,
        at: cursor,
        pending: Vec::new(),
        state: None,
        more: false,
    };
    match reader.fill(store, &mut source).await {
        Ok(()) => {}
        Err(StoreError::RunNotFound) => {
            return Err(ApiError::CursorExpired(if cursor.seq > 0 {
                format!("cursor `{cursor}`")
            } else {
                "this run".into()
            }))
        }
        Err(e) => return Err(e.into()),
    }
    let cfg = &api.config.stream;
    let stuck = cfg.stuck_reader_timeout.0;
    // Every body write is bounded by `stuck` (then the stream is aborted and the reader counted
    // as stuck): Pingora bounds each write of the session itself, so no timer of ours is armed
    // per write. (Pingora's HTTP/1.1 `finish_body`, the terminator, is not under its write
    // timeout: the clean end below bounds it itself, and an aborted answer gets no further write
    // at all.)
    ex.set_write_timeout(stuck);
    let mut headers = headers_for(dialect);
    headers.extend(extra_headers);
    if ex.start_stream(200, headers).await.is_err() {
        ex.abort();
        return Ok(());
    }
    let _open = Gauged::new(&metrics::SSE_STREAMS_ACTIVE);
    let mut cut = api.cut.clone();
    let mut retry = Vec::with_capacity(16);
    sse::encode_retry(&mut retry, cfg.retry_hint.0.as_millis() as u64);
    reader.pending.insert(0, Bytes::from(retry));

    let interval = cfg.keepalive_interval.0;
    let mut last_sent = tokio::time::Instant::now();
    let mut keepalive = std::pin::pin!(tokio::time::sleep(interval));
    // `Ok` once the run's end was sent and the body ended; `Err(why)` for any other end.
    let streamed = async {
        loop {
            if !reader.pending.is_empty() {
                for data in coalesce(&mut reader.pending) {
                    send(ex, data)
                        .await
                        .map_err(|Gone| "the client is gone or stuck")?;
                }
                last_sent = tokio::time::Instant::now();
                // Read on at once only when the last read stopped at a limit; otherwise the wait
                // below returns at once if anything came meanwhile.
                if reader.more {
                    reader
                        .fill(store, &mut source)
                        .await
                        .map_err(|e| format!("the store failed or evicted the run: {e}"))?;
                }
                continue;
            }
            let state = reader.state.expect("filled before");
            if state.status.is_terminal() && state.last_seq <= reader.at.seq {
                // The run's log ended and all of it was sent: the one clean end.
                if dialect == Dialect::UiMessage {
                    send(ex, Bytes::from_static(DONE_FRAME))
                        .await
                        .map_err(|Gone| "the client is gone or stuck")?;
                }
                return match tokio::time::timeout(stuck, ex.end_stream()).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(Gone)) => Err("the client is gone".to_string()),
                    Err(_) => {
                        metrics::STUCK_READERS.inc();
                        Err("the client is stuck before the end of the body".to_string())
                    }
                };
            }
            tokio::select! {
                // The keep-alive timer is armed once per interval, not per event: when it fires
                // after a send, it is moved to that send's time plus the interval.
                _ = &mut keepalive => {
                    let due = last_sent + interval;
                    if due <= tokio::time::Instant::now() {
                        reader.pending.push(Bytes::from_static(b": keep-alive\n\n"));
                        keepalive.as_mut().reset(tokio::time::Instant::now() + interval);
                    } else {
                        keepalive.as_mut().reset(due);
                    }
                }
                waited = store.wait(&run.run_id, reader.at.seq, std::time::Duration::MAX) => match waited {
                    Ok(_) => reader
                        .fill(store, &mut source)
                        .await
                        .map_err(|e| format!("the store failed or evicted the run: {e}"))?,
                    Err(e) => return Err(format!("the store failed or evicted the run: {e}")),
                },
                _ = ex.closed() => return Err("the client hung up".to_string()),
            }
        }
    };
    // The drain's grace period ending cuts the stream wherever it is, even mid-chunk: the abort
    // below then closes the connection without ending the body.
    let ended = tokio::select! {
        ended = streamed => ended,
        _ = shutting_down(&mut cut) => Err("the process is shutting down".to_string()),
    };
    if let Err(why) = ended {
        log::debug!("stream of {} aborted: {why}", run.run_id);
        ex.abort();
    }
    Ok(())
}

/// Where a stream's bytes come from.
enum Source {
    /// The run's shared UI-message frames (rendered once for every reader).
    Frames(std::sync::Arc<RunView>),
    /// The log itself, written through with only the `id:` line added (AgentFlow).
    Log(AgentFlowRenderer),
}

/// One stream's position in its run, and what it has to send next.
struct Reader<'a> {
    run: &'a RunInfo,
    /// What the client has.
    at: Cursor,
    /// Bytes to send next (shared frame slices, or one buffer of this stream's own).
    pending: Vec<Bytes>,
    /// The log's state as of the last read.
    state: Option<LogState>,
    /// Whether the last read stopped at a limit, with more to send right away.
    more: bool,
}

impl Reader<'_> {
    /// Queue what follows the cursor (at most about [`SEND_BYTES`]), reading the log when the
    /// source has nothing more for it.
    async fn fill(&mut self, store: &dyn Store, source: &mut Source) -> Result<(), StoreError> {
        match source {
            Source::Frames(view) => loop {
                let (read, rendered) = {
                    let frames = view.frames();
                    let read = frames.read(self.at, SEND_BYTES, &mut self.pending);
                    (read, frames.last_seq())
                };
                if let Some(through) = read {
                    self.at = Cursor::after(through);
                    self.more =
                        through < rendered || self.state.is_some_and(|s| s.last_seq > rendered);
                    if self.state.is_some() {
                        return Ok(());
                    }
                }
                let state = view.catch_up_frames(store).await?;
                self.state = Some(state);
                if view.frames().last_seq() <= self.at.seq {
                    return Ok(());
                }
            },
            Source::Log(renderer) => {
                // At `k.j`, event `k` is sent whole: an AgentFlow event is one chunk.
                let after = match self.at.chunk {
                    Some(_) => self.at.seq - 1,
                    None => self.at.seq,
                };
                let batch = store
                    .read_after(&self.run.run_id, after, READ_BATCH, SEND_BYTES)
                    .await?;
                self.state = Some(LogState {
                    last_seq: batch.last_seq,
                    status: batch.status,
                });
                let mut buf = Vec::new();
                self.more = batch.events.len() == READ_BATCH;
                for ev in &batch.events {
                    if !self.at.covers(ev.seq) {
                        renderer.render_sse(ev, &mut buf);
                    }
                    self.at = Cursor::after(ev.seq);
                    if buf.len() >= SEND_BYTES {
                        self.more = true;
                        break;
                    }
                }
                if !buf.is_empty() {
                    self.pending.push(Bytes::from(buf));
                }
                Ok(())
            }
        }
    }
}

/// The pieces queued, as few writes: small pieces are copied into one, large slices of the
/// shared frames go as they are.
fn coalesce(pending: &mut Vec<Bytes>) -> Vec<Bytes> {
    let total: usize = pending.iter().map(Bytes::len).sum();
    if pending.len() == 1 || total > SEND_BYTES {
        return std::mem::take(pending);
    }
    let mut one = Vec::with_capacity(total);
    for piece in pending.drain(..) {
        one.extend_from_slice(&piece);
    }
    vec![Bytes::from(one)]
}

/// Send `data`. A client that cannot take it within the session's write timeout is treated as
/// gone (and counted as a stuck reader).
async fn send(ex: &mut dyn Exchange, data: Bytes) -> Result<(), Gone> {
    let sent = ex.send(data).await;
    if sent.is_err() && ex.write_timed_out() {
        metrics::STUCK_READERS.inc();
    }
    sent
}

/// Resolves once the process starts shutting down (never, if nobody can tell it so).
pub(crate) async fn shutting_down(rx: &mut tokio::sync::watch::Receiver<bool>) {
    if rx.wait_for(|down| *down).await.is_err() {
        std::future::pending::<()>().await;
    }
}
