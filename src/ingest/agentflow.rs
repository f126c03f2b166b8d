//! The AgentFlow adapter: `POST {upstream}/agents/{id}/run` with `stream: true`, consuming the
//! backend's SSE and appending each event's JSON payload to the run log as received.
//!
//! The run ends `completed` on the root `end`, `error` on a root `error` event, a non-2xx
//! answer, malformed SSE or JSON, an event over `upstream.max_event_bytes`, or a dropped
//! connection; `timeout` when the backend is silent longer than `upstream.idle_timeout`. The
//! connection is made with Pingora's own client (plain HTTP or rustls).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use pingora::connectors::http::Connector;
use pingora::protocols::http::client::HttpSession;

pub use super::answer::error_text;
use super::answer::{self, SseBody};
use super::{Adapter, Ending, Failure, RunJob, RunSink};
use crate::agentflow::{self, Terminal};
use crate::client::{self, SendError};
use crate::config::UpstreamUrl;
use crate::event::NewEvent;
use crate::sse::SseEvent;

/// Settings for [`AgentFlowAdapter`].
#[derive(Clone, Debug)]
pub struct AgentFlowSettings {
    /// Backends, used in turn.
    pub upstreams: Vec<UpstreamUrl>,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Longest silence allowed from the backend.
    pub idle_timeout: Duration,
    /// Largest single event.
    pub max_event_bytes: usize,
}

/// The AgentFlow streaming adapter.
pub struct AgentFlowAdapter {
    settings: AgentFlowSettings,
    next: AtomicUsize,
    connector: Connector,
}

impl AgentFlowAdapter {
    /// An adapter over the given backends.
    pub fn new(settings: AgentFlowSettings) -> Self {
        AgentFlowAdapter {
            settings,
            next: AtomicUsize::new(0),
            connector: Connector::new(None),
        }
    }

    fn pick(&self) -> &UpstreamUrl {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.settings.upstreams.len();
        &self.settings.upstreams[i]
    }

    async fn open(&self, job: &RunJob) -> Result<HttpSession, Failure> {
        let up = self.pick();
        let body = Bytes::from(serde_json::to_vec(&job.body).unwrap_or_default());
        let run = &job.run;
        let mut headers = vec![
            ("content-type", "application/json".to_string()),
            ("accept", "text/event-stream".to_string()),
            ("x-sluice-org-id", run.org_id.clone()),
            ("x-sluice-user-id", run.user_id.clone()),
            ("x-sluice-run-id", run.run_id.0.clone()),
            ("x-sluice-thread-id", run.thread_id.0.clone()),
        ];
        if let Some(token) = &job.bearer {
            headers.push(("authorization", format!("Bearer {token}")));
        }
        let path = format!("/agents/{}/run", job.agent_path);
        client::send(
            &self.connector,
            up,
            self.settings.connect_timeout,
            "POST",
            &path,
            &headers,
            body,
        )
        .await
        .map_err(|e| match e {
            SendError::Connect(e) => Failure::Connect(e),
            SendError::Write(e) => Failure::Dropped(e),
        })
    }

    async fn consume(&self, job: &RunJob, sink: &RunSink) -> Result<Ending, Failure> {
        let idle = self.settings.idle_timeout;
        let mut http = self.open(job).await?;
        answer::admit(&mut http, idle, sink).await?;
        let mut body = SseBody::new(idle, self.settings.max_event_bytes);
        let mut decoded: Vec<SseEvent> = Vec::new();
        loop {
            decoded.clear();
            let problem = body.next(&mut http, &mut decoded).await;
            let mut batch = Vec::with_capacity(decoded.len());
            let mut ending = None;
            for ev in decoded.drain(..) {
                if ev.data == "[DONE]" {
                    continue;
                }
                let parsed = match agentflow::parse(ev.data.as_bytes()) {
                    Ok(p) => p,
                    Err(e) => {
                        if let Err(end) = sink.append(batch).await {
                            return Ok(end);
                        }
                        return Err(Failure::Malformed(e.to_string()));
                    }
                };
                let terminal = agentflow::terminal(&parsed);
                batch.push(NewEvent::new(Bytes::from(ev.data)));
                if let Some(t) = terminal {
                    ending = Some(match t {
                        Terminal::Completed => Ending::Completed,
                        Terminal::Error(text) => Ending::AgentError(text),
                    });
                    break;
                }
            }
            if let Err(end) = sink.append(batch).await {
                return Ok(end);
            }
            if let Some(end) = ending {
                return Ok(end);
            }
            if let Some(failure) = problem {
                return Err(failure);
            }
        }
    }
}

#[async_trait]
impl Adapter for AgentFlowAdapter {
    async fn run(&self, job: &RunJob, sink: &RunSink) -> Ending {
        match self.consume(job, sink).await {
            Ok(ending) => ending,
            Err(failure) => Ending::Failed(failure),
        }
    }
}

/// Percent-encode one path segment (RFC 3986 unreserved characters pass through).
pub fn path_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_segments_are_escaped() {
        assert_eq!(path_segment("agent-7_x.y~"), "agent-7_x.y~");
        assert_eq!(path_segment("a/b c"), "a%2Fb%20c");
        assert_eq!(path_segment("é"), "%C3%A9");
    }
}
