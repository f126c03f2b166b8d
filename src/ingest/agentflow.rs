//! The AgentFlow adapter: `POST {upstream}/agents/{id}/run` with `stream: true`, consuming the
//! backend's SSE and appending each event's JSON payload to the run log as received.
//!
//! The run ends `completed` on the root `end`, `error` on a root `error` event, a non-2xx
//! answer, malformed SSE or JSON, an event over `upstream.max_event_bytes`, or a dropped
//! connection; `timeout` when the backend is silent longer than `upstream.idle_timeout`. The
//! connection is made with Pingora's own client (plain HTTP or rustls).
//!
//! Each batch is appended with the SSE id of its last backend event as its mark. A run taken
//! over from another instance ([`Adapter::resume`]) is asked again with the same body (same
//! `message_id`, which AgentFlow treats as a retry of the same run) plus `Last-Event-ID: <mark>`
//! and `"last_event_id": "<mark>"`, and the events up to the mark are dropped should the backend
//! send them again ([`Replay`]). With no mark, a run that logged nothing yet is asked again
//! without a `Last-Event-ID`; one that did (a backend that sends no ids) cannot be continued. A
//! `4xx` answer to a resume ends the run `error` ([`Failure::Unresumable`]).

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

    /// Send the run's request; `after`: resume after this SSE id (`Last-Event-ID`).
    async fn open(&self, job: &RunJob, after: Option<&str>) -> Result<HttpSession, Failure> {
        let up = self.pick();
        let body = match after {
            None => serde_json::to_vec(&job.body),
            Some(id) => {
                let mut body = job.body.clone();
                if let Some(map) = body.as_object_mut() {
                    map.insert("last_event_id".into(), id.into());
                }
                serde_json::to_vec(&body)
            }
        };
        let body = Bytes::from(body.unwrap_or_default());
        let mut headers = invoke::identity_headers(job);
        headers.push(("content-type", "application/json".to_string()));
        headers.push(("accept", "text/event-stream".to_string()));
        if let Some(id) = after {
            headers.push(("last-event-id", id.to_string()));
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

    /// Ask the backend (again, after `replay`'s mark, when resuming) and log its events.
    async fn consume(
        &self,
        job: &RunJob,
        sink: &RunSink,
        mut replay: Option<Replay>,
    ) -> Result<Ending, Failure> {
        let idle = self.settings.idle_timeout;
        let after = replay.as_ref().map(|r| r.mark.as_str());
        let mut http = self.open(job, after).await?;
        answer::admit(&mut http, idle, sink).await?;
        let body = SseBody::new(idle, self.settings.max_event_bytes).marked();
        body.pump(&mut http, sink, |ev, batch| {
            if ev.data == "[DONE]" {
                return Ok(None);
            }
            if let Some(r) = replay.as_mut() {
                if r.logged(ev.id.as_deref()) {
                    return Ok(None);
                }
            }
            // Only the identifying fields are read (the whole payload only for a root error).
            let terminal = agentflow::terminal_of(ev.data.as_bytes())
                .map_err(|e| Failure::Malformed(e.to_string()))?;
            let event = NewEvent::new(Bytes::from(std::mem::take(&mut ev.data)));
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
        match self.consume(job, sink, None).await {
            Ok(ending) => ending,
            Err(failure) => Ending::Failed(failure),
        }
    }

    async fn resume(&self, job: &RunJob, mark: Option<&str>, sink: &RunSink) -> Ending {
        if mark.is_none() && job.logged_any() {
            return Ending::Failed(Failure::Unresumable(
                "the backend sends no event ids to resume from".into(),
            ));
        }
        match self.consume(job, sink, mark.map(Replay::after)).await {
            Ok(ending) => ending,
            Err(Failure::Status(code, text)) if (400..500).contains(&code) => {
                let refused = Failure::Status(code, text).message();
                Ending::Failed(Failure::Unresumable(format!(
                    "asked to continue it, the {refused}"
                )))
            }
            Err(failure) => Ending::Failed(failure),
        }
    }
}

/// Which events of a resumed stream the log already holds: those up to the mark (the SSE id of
/// the last event logged), should the backend send them again. Ids are compared as numbers
/// when both are. Opaque ids cannot be ordered: the mark's own event is dropped, and the first
/// event with another id starts what is new (the backend honoured `Last-Event-ID`). Events with
/// no id before that point are dropped (they cannot be placed).
#[derive(Debug)]
pub struct Replay {
    mark: String,
    number: Option<u64>,
    /// The event whose id is the mark has been seen.
    found: bool,
    /// An event after the mark has been seen: everything from here on is new.
    passed: bool,
}

impl Replay {
    /// Drop what comes up to `mark`.
    pub fn after(mark: &str) -> Replay {
        Replay {
            mark: mark.to_string(),
            number: mark.trim().parse().ok(),
            found: false,
            passed: false,
        }
    }

    /// Whether the event with SSE id `id` (the last-event-ID buffer) is already in the log.
    pub fn logged(&mut self, id: Option<&str>) -> bool {
        if self.passed {
            return false;
        }
        let Some(id) = id else {
            return true;
        };
        if id == self.mark {
            self.found = true;
            return true;
        }
        let before = match (self.number, id.trim().parse::<u64>()) {
            (Some(mark), Ok(n)) => n < mark,
            // Opaque ids cannot be ordered: a backend that sends the mark again replays
            // through it; one whose first event is another id honoured `Last-Event-ID` (as
            // AgentFlow documents) and sends only what follows.
            _ => false,
        };
        self.passed = !before;
        before
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
    use crate::ingest::testing::Recorder;
    use crate::store::{RunInfo, RunStatus};
    use serde_json::{json, Value};
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn replays_drop_what_the_log_holds() {
        // Numeric ids: up to the mark, whatever the backend sends again.
        let mut r = Replay::after("3");
        let kept: Vec<bool> = ["1", "2", "3", "4", "5"]
            .iter()
            .map(|id| !r.logged(Some(id)))
            .collect();
        assert_eq!(kept, [false, false, false, true, true]);
        // A backend that resumes after the mark: everything is new.
        let mut r = Replay::after("3");
        assert!(!r.logged(Some("4")) && !r.logged(None));
        // Opaque ids: a backend that sends the mark again replays through it (id-less events
        // before it cannot be placed and are dropped)...
        let mut r = Replay::after("b");
        let kept: Vec<bool> = [None, Some("b"), Some("c"), None, Some("a")]
            .into_iter()
            .map(|id| !r.logged(id))
            .collect();
        assert_eq!(kept, [false, false, true, true, true]);
        // ...and one that starts with another id sends only what follows the mark.
        let mut r = Replay::after("b");
        assert!(!r.logged(Some("x7")) && !r.logged(Some("b")));
    }

    /// What one request to the scripted backend got.
    #[derive(Clone, Debug)]
    struct Seen {
        head: String,
        body: Value,
    }

    /// An AgentFlow backend answering each request with `answer(request)`: a status, SSE frames
    /// (sent one by one, chunked), and whether to stay open afterwards.
    async fn backend(
        answer: impl Fn(&Seen) -> (u16, Vec<String>, bool) + Send + Sync + 'static,
    ) -> (UpstreamUrl, Arc<Mutex<Vec<Seen>>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url =
            UpstreamUrl::parse(&format!("http://{}", listener.local_addr().unwrap())).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let answer = Arc::new(answer);
        let log = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let (log, answer) = (log.clone(), answer.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    let (head, end) = loop {
                        let n = sock.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break (String::from_utf8_lossy(&buf[..end]).to_lowercase(), end + 4);
                        }
                    };
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |v| v.trim().parse().unwrap());
                    while buf.len() < end + len {
                        let n = sock.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    let request = Seen {
                        head,
                        body: serde_json::from_slice(&buf[end..end + len]).unwrap(),
                    };
                    let (status, frames, hang) = answer(&request);
                    log.lock().unwrap().push(request);
                    let head = format!(
                        "HTTP/1.1 {status} X\r\ncontent-type: text/event-stream\r\n\
                         transfer-encoding: chunked\r\n\r\n"
                    );
                    let _ = sock.write_all(head.as_bytes()).await;
                    for f in frames {
                        let piece = format!("{:x}\r\n{f}\r\n", f.len());
                        if sock.write_all(piece.as_bytes()).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    if hang {
                        std::future::pending::<()>().await;
                    }
                    let _ = sock.write_all(b"0\r\n\r\n").await;
                });
            }
        });
        (url, seen)
    }

    /// Backend event `seq` (a root delta of its number, or the root end after 6).
    fn frame(seq: u64) -> String {
        let kind = if seq == 7 { "end" } else { "delta" };
        let e = json!({"type": kind, "call_id": "root", "parent_call_id": null,
                       "root_call_id": "root", "content": format!("{seq} "), "seq": seq});
        format!("id: {seq}\ndata: {e}\n\n")
    }

    fn adapter(up: &UpstreamUrl) -> AgentFlowAdapter {
        AgentFlowAdapter::new(AgentFlowSettings {
            upstreams: vec![up.clone()],
            connect_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(5),
            max_event_bytes: 1 << 20,
        })
    }

    fn job(run: RunInfo) -> RunJob {
        RunJob {
            run,
            agent_path: "7".into(),
            body: json!({"message": "hi", "message_id": "m1", "conversation_id": "c1"}),
            bearer: Some("tok".into()),
            backend_thread: None,
        }
    }

    fn sink(store: &Arc<Recorder>, run: &RunInfo) -> RunSink {
        RunSink::new(store.clone(), run.run_id.clone(), None)
    }

    /// The backend seqs of `run`'s log.
    async fn seqs(store: &Recorder, run: &RunInfo) -> Vec<u64> {
        store
            .events(&run.run_id)
            .await
            .iter()
            .map(|e| e["seq"].as_u64().unwrap())
            .collect()
    }

    #[tokio::test]
    async fn a_cut_run_resumes_after_its_last_logged_event() {
        // The backend stops after event 3 (the instance dies there); asked again with a
        // Last-Event-ID it sends everything from the start (`replay`) or only what follows.
        for replay in [true, false] {
            let (up, seen) = backend(move |r| {
                match r.head.lines().find_map(|l| {
                    l.strip_prefix("last-event-id:")
                        .map(|v| v.trim().parse::<u64>().unwrap())
                }) {
                    None => (200, (1..=3).map(frame).collect(), true),
                    Some(after) => {
                        let from = if replay { 1 } else { after + 1 };
                        (200, (from..=7).map(frame).collect(), false)
                    }
                }
            })
            .await;
            let store = Recorder::new();
            let run = store.new_run("hi", "m1").await;
            let a = adapter(&up);
            let j = job(run.clone());
            let first = sink(&store, &run);
            tokio::select! {
                ending = a.run(&j, &first) => panic!("the run ended: {ending:?}"),
                _ = async {
                    while store.mark(&run.run_id).as_deref() != Some("3") {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                } => {}
            }
            let adopted = store.adopted(&run.run_id).await;
            let j = RunJob::from_record(adopted.run, &j.record()).unwrap();
            let ending = a
                .resume(&j, adopted.mark.as_deref(), &sink(&store, &run))
                .await;
            let Ending::Completed(end) = ending else {
                panic!("{ending:?}")
            };
            assert_eq!(seqs(&store, &run).await, [1, 2, 3, 4, 5, 6]);
            assert!(String::from_utf8_lossy(&end.data).contains(r#""seq":7"#));
            assert_eq!(store.mark(&run.run_id).as_deref(), Some("6"));
            let seen = seen.lock().unwrap().clone();
            assert_eq!(seen.len(), 2);
            assert!(
                !seen[0].head.contains("last-event-id")
                    && seen[0].body.get("last_event_id").is_none()
            );
            assert!(seen[0].head.contains("authorization: bearer tok"));
            // Asked again: the same message, after event 3, without the caller's token.
            assert!(
                seen[1].head.contains("\r\nlast-event-id: 3"),
                "{}",
                seen[1].head
            );
            assert!(!seen[1].head.contains("authorization"));
            assert_eq!(
                seen[1].body,
                json!({"message": "hi", "message_id": "m1", "conversation_id": "c1",
                       "last_event_id": "3"})
            );
        }
    }

    #[tokio::test]
    async fn without_a_mark_only_a_run_with_nothing_logged_is_asked_again() {
        let (up, seen) = backend(|_| (200, (1..=7).map(frame).collect(), false)).await;
        let store = Recorder::new();
        let a = adapter(&up);
        // Nothing logged: the same request again (AgentFlow's retry of one message id).
        let run = store.new_run("hi", "m1").await;
        let ending = a.resume(&job(run.clone()), None, &sink(&store, &run)).await;
        assert!(matches!(ending, Ending::Completed(_)), "{ending:?}");
        assert_eq!(seqs(&store, &run).await, [1, 2, 3, 4, 5, 6]);
        let first = seen.lock().unwrap()[0].clone();
        assert!(!first.head.contains("last-event-id") && first.body.get("last_event_id").is_none());
        // Events logged but no mark (a backend without ids): cannot be continued.
        let mut logged = run.clone();
        logged.last_seq = logged.first_seq + 2;
        let ending = a.resume(&job(logged), None, &sink(&store, &run)).await;
        assert_eq!(
            ending,
            Ending::Failed(Failure::Unresumable(
                "the backend sends no event ids to resume from".into()
            ))
        );
        assert_eq!(seen.lock().unwrap().len(), 1, "the backend was not asked");
    }

    #[tokio::test]
    async fn a_refused_resume_ends_the_run_with_the_reason() {
        let (up, _) = backend(|_| {
            (
                404,
                vec![r#"{"error":{"message":"no run for message m1"}}"#.into()],
                false,
            )
        })
        .await;
        let store = Recorder::new();
        let run = store.new_run("hi", "m1").await;
        let ending = adapter(&up)
            .resume(&job(run.clone()), Some("3"), &sink(&store, &run))
            .await;
        let Ending::Failed(f) = ending else {
            panic!("{ending:?}")
        };
        assert_eq!(f.status(), RunStatus::Error);
        assert_eq!(
            f.message(),
            "the run could not be continued after the gateway instance ingesting it stopped: \
             asked to continue it, the agent backend answered HTTP 404: no run for message m1"
        );
    }

    #[test]
    fn path_segments_are_escaped() {
        assert_eq!(path_segment("agent-7_x.y~"), "agent-7_x.y~");
        assert_eq!(path_segment("a/b c"), "a%2Fb%20c");
        assert_eq!(path_segment("é"), "%C3%A9");
    }
}
