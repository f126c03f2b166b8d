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

use super::answer::{self, SseBody};
use super::invoke;
use super::{Adapter, Ending, Failure, RunJob, RunSink};
use crate::agentflow::{self, Terminal};
use crate::client::{self, SendError};
use crate::config::UpstreamUrl;
use crate::event::NewEvent;

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
        let mut headers = invoke::identity_headers(job);
        headers.push(("content-type", "application/json".to_string()));
        headers.push(("accept", "text/event-stream".to_string()));
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
        let body = SseBody::new(idle, self.settings.max_event_bytes);
        body.pump(&mut http, sink, |ev, batch| {
            if ev.data == "[DONE]" {
                return Ok(None);
            }
            // Only the identifying fields are read (the whole payload only for a root error).
            let terminal = agentflow::terminal_of(ev.data.as_bytes())
                .map_err(|e| Failure::Malformed(e.to_string()))?;
            let event = NewEvent::new(Bytes::from(ev.data));
            // The closing event goes to the supervisor, which logs it with the run's status.
            Ok(match terminal {
                None => {
                    batch.push(event);
                    None
                }
                Some(Terminal::Completed) => Some(Ending::Completed(event)),
                Some(Terminal::Error(text)) => Some(Ending::AgentError(text, event)),
            })
        })
        .await
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
