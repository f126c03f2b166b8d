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
use pingora::http::RequestHeader;
use pingora::protocols::http::client::HttpSession;
use pingora::upstreams::peer::HttpPeer;

use super::{Adapter, Ending, Failure, RunJob, RunSink};
use crate::agentflow::{self, Terminal};
use crate::config::UpstreamUrl;
use crate::event::NewEvent;
use crate::sse::{Decoder, SseEvent};

/// Most bytes of a non-2xx answer kept as its error text.
const ERROR_BODY_LIMIT: usize = 4096;

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
        let mut peer = HttpPeer::new(up.address(), up.tls, up.host.clone());
        peer.options.connection_timeout = Some(self.settings.connect_timeout);
        peer.options.total_connection_timeout = Some(self.settings.connect_timeout);
        let connect = |e: Box<pingora::Error>| Failure::Connect(e.to_string().trim().to_string());
        let (mut http, _reused) = self
            .connector
            .get_http_session(&peer)
            .await
            .map_err(connect)?;
        let path = format!("{}/agents/{}/run", up.base_path, job.agent_path);
        let body = Bytes::from(serde_json::to_vec(&job.body).unwrap_or_default());
        let mut req = RequestHeader::build("POST", path.as_bytes(), None).map_err(connect)?;
        let run = &job.run;
        let headers = [
            ("host", up.authority()),
            ("content-type", "application/json".to_string()),
            ("accept", "text/event-stream".to_string()),
            ("content-length", body.len().to_string()),
            ("x-sluice-org-id", run.org_id.clone()),
            ("x-sluice-user-id", run.user_id.clone()),
            ("x-sluice-run-id", run.run_id.0.clone()),
            ("x-sluice-thread-id", run.thread_id.0.clone()),
        ];
        for (name, value) in headers {
            req.insert_header(name, value).map_err(connect)?;
        }
        let send = |e: Box<pingora::Error>| Failure::Dropped(e.to_string().trim().to_string());
        http.write_request_header(Box::new(req))
            .await
            .map_err(send)?;
        http.write_request_body(body, true).await.map_err(send)?;
        http.finish_request_body().await.map_err(send)?;
        Ok(http)
    }

    async fn consume(&self, job: &RunJob, sink: &RunSink) -> Result<Ending, Failure> {
        let idle = self.settings.idle_timeout;
        let mut http = self.open(job).await?;
        match tokio::time::timeout(idle, http.read_response_header()).await {
            Err(_) => return Err(Failure::IdleTimeout(idle)),
            Ok(Err(e)) => return Err(Failure::Dropped(e.to_string().trim().to_string())),
            Ok(Ok(())) => {}
        }
        let status = http.response_header().map_or(0, |h| h.status.as_u16());
        if !(200..300).contains(&status) {
            let text = read_error_text(&mut http, idle).await;
            return Err(Failure::Status(status, text));
        }
        let mut decoder = Decoder::new(self.settings.max_event_bytes);
        let mut decoded: Vec<SseEvent> = Vec::new();
        loop {
            let chunk = match tokio::time::timeout(idle, http.read_response_body()).await {
                Err(_) => return Err(Failure::IdleTimeout(idle)),
                Ok(Err(e)) => return Err(Failure::Dropped(e.to_string().trim().to_string())),
                Ok(Ok(None)) => {
                    decoder.finish();
                    return Err(Failure::Dropped(
                        "the stream closed without the run's end event".into(),
                    ));
                }
                Ok(Ok(Some(chunk))) => chunk,
            };
            decoded.clear();
            let fed = decoder.feed(&chunk, &mut decoded);
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
            if fed.is_err() {
                return Err(Failure::EventTooLarge(self.settings.max_event_bytes));
            }
        }
    }
}

async fn read_error_text(http: &mut HttpSession, idle: Duration) -> String {
    let mut body = Vec::new();
    while body.len() < ERROR_BODY_LIMIT {
        match tokio::time::timeout(idle, http.read_response_body()).await {
            Ok(Ok(Some(chunk))) => body.extend_from_slice(&chunk),
            _ => break,
        }
    }
    body.truncate(ERROR_BODY_LIMIT);
    let text = String::from_utf8_lossy(&body);
    // Prefer the message of a JSON error body ({"error":{"message"}}, {"error":"…"},
    // {"message":"…"}, {"detail":"…"}).
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
        let pick = v
            .pointer("/error/message")
            .or_else(|| v.get("error"))
            .or_else(|| v.get("message"))
            .or_else(|| v.get("detail"));
        if let Some(serde_json::Value::String(s)) = pick {
            return s.clone();
        }
    }
    text.trim().chars().take(500).collect()
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
