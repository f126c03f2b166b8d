//! `POST /api/threads/{threadId}/stop[?runId=]`: stop a run. The run ends `stopped` (its log
//! gets a closing event, so open streams render the end and finish cleanly), the backend
//! connection is closed, and the partial answer stays in the snapshot. Stopping a run that has
//! already ended changes nothing and answers 200 with its status.

use serde_json::json;

use super::{query_param, Api, ApiError, Exchange, Identity, Reply};
use crate::agentflow;
use crate::event::NewEvent;
use crate::metrics;
use crate::store::{RunStatus, ThreadInfo};

/// Handle the stop route.
pub async fn stop(api: &Api, who: &Identity, ex: &mut dyn Exchange) -> Result<(), ApiError> {
    let thread_id = super::route::thread_of(ex.path(), "/stop").ok_or(ApiError::NotFound)?;
    let thread = super::chat::thread_named(api, &who.org_id, &thread_id).await?;
    stop_thread(api, ex, thread).await
}

/// Stop the run `?runId=` names, else the latest run, of a thread already read.
pub async fn stop_thread(
    api: &Api,
    ex: &mut dyn Exchange,
    thread: ThreadInfo,
) -> Result<(), ApiError> {
    let wanted = query_param(ex.query(), "runId");
    let run = match &wanted {
        Some(id) => thread.runs.iter().find(|r| r.run_id.0 == *id),
        None => thread.latest(),
    };
    let Some(run) = run else {
        // Every run of the thread was evicted: the latest one ended long ago.
        return match (&wanted, &thread.latest_evicted) {
            (None, Some(o)) => {
                let body = json!({
                    "threadId": thread.thread_id.0,
                    "runId": o.run_id.0,
                    "status": o.status.as_str(),
                    "lastSeq": thread.last_seq(),
                });
                let _ = ex.respond(Reply::json(200, &body)).await;
                Ok(())
            }
            _ => Err(ApiError::RunNotFound),
        };
    };
    if !run.status.is_terminal() {
        let closing = agentflow::synthetic_error("stopped", "stopped by the client");
        let stopped = api
            .store
            .finish(
                &run.run_id,
                RunStatus::Stopped,
                None,
                Some(NewEvent::new(closing)),
            )
            .await?;
        if stopped {
            metrics::RUNS_STOPPED.inc();
            metrics::RUNS_ENDED
                .with_label_values(&[RunStatus::Stopped.as_str()])
                .inc();
        }
        api.ingest.cancel(&run.run_id);
    }
    let info = api.store.run(&run.run_id).await?;
    let body = json!({
        "threadId": info.thread_id.0,
        "runId": info.run_id.0,
        "status": info.status.as_str(),
        "lastSeq": info.last_seq,
    });
    let _ = ex.respond(Reply::json(200, &body)).await;
    Ok(())
}
