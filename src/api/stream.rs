//! Streaming a run to a client as the AI SDK v5 UI-message stream: events from the log after a
//! cursor, then live events as they are appended, then `data: [DONE]` when the run has ended.
//!
//! The stream only reads the log, at its own pace: a slow or vanished client never slows
//! ingestion or other readers, and hanging up never stops the run. Quiet periods get
//! keep-alive comments; process shutdown ends the stream cleanly (the client may resume).

use bytes::Bytes;

use super::{Api, ApiError, Exchange};
use crate::metrics::StreamGuard;
use crate::render::ui::UiRenderer;
use crate::sse;
use crate::store::RunInfo;

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

/// Stream `run` to the client from after `after` (0 = from the start).
pub async fn stream_ui(
    api: &Api,
    ex: &mut dyn Exchange,
    run: &RunInfo,
    after: u64,
    extra_headers: Vec<(&'static str, String)>,
) -> Result<(), ApiError> {
    let mut headers = ui_headers();
    headers.extend(extra_headers);
    if ex.start_stream(200, headers).await.is_err() {
        return Ok(());
    }
    let _open = StreamGuard::open();
    let store = api.store.as_ref();
    let keepalive = api.config.stream.keepalive_interval.0;
    let mut shutdown = api.shutdown.clone();
    let mut renderer = UiRenderer::new(run.assistant_message_id.clone());
    let mut cursor = 0;
    let mut buf = Vec::with_capacity(16 * 1024);

    // Catch the renderer up to the cursor without sending anything.
    while cursor < after {
        let want = ((after - cursor) as usize).min(READ_BATCH);
        let batch = store.read_after(&run.run_id, cursor, want).await?;
        let Some(last) = batch.events.last().map(|e| e.seq) else {
            break;
        };
        for ev in &batch.events {
            renderer.skip(ev);
        }
        cursor = last;
    }

    loop {
        let batch = match store.read_after(&run.run_id, cursor, READ_BATCH).await {
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
            cursor = last;
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
            waited = store.wait(&run.run_id, cursor, keepalive) => match waited {
                Ok((last, status)) if last == cursor && !status.is_terminal() => {
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
