//! Starting a run on a dialect-A backend ("Invoke an agent"), shared by the UI-message and poll
//! adapters: `POST {upstream}{invoke_path}` with `{agentId, message, threadId?, timezone?}`.
//!
//! The backend keeps its own thread ids. The first run of a Sluice thread goes without
//! `threadId`; the id the backend answers with (`X-Thread-ID`, or `threadId` in a JSON body) is
//! remembered in [`BackendThreads`], with the backend it lives on, so that later runs of the
//! thread go to that backend and continue its conversation. The map is this process's memory:
//! after a restart (or on another instance) a thread's next run starts a new backend
//! conversation.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use pingora::connectors::http::Connector;
use pingora::protocols::http::client::HttpSession;
use serde_json::{json, Value};

use super::{Failure, RunJob};
use crate::client::{self, SendError};
use crate::config::UpstreamUrl;
use crate::store::ThreadId;

/// Most backend threads remembered; past it the map is cleared (later runs of a forgotten
/// thread start a new backend conversation, which the backend answers like any other).
const THREADS_REMEMBERED: usize = 100_000;

/// Sluice thread → the backend (its index in the upstream list) and its thread id there.
#[derive(Debug, Default)]
pub struct BackendThreads(DashMap<ThreadId, (usize, String)>);

impl BackendThreads {
    /// The backend and backend thread of a Sluice thread, if known.
    pub fn get(&self, thread: &ThreadId) -> Option<(usize, String)> {
        self.0.get(thread).map(|t| t.clone())
    }

    /// Remember the backend thread of a Sluice thread, on backend `upstream`.
    pub fn remember(&self, thread: &ThreadId, upstream: usize, backend: &str) {
        if backend.is_empty() {
            return;
        }
        if self.0.len() >= THREADS_REMEMBERED {
            self.0.clear();
        }
        self.0
            .insert(thread.clone(), (upstream, backend.to_owned()));
    }
}

/// Where and how runs are started on a dialect-A backend.
#[derive(Debug)]
pub struct InvokeTarget {
    /// Backends, used in turn (a run stays on the one it started on).
    pub upstreams: Vec<UpstreamUrl>,
    /// Path of the invoke route (`/api/invokeAgent`).
    pub invoke_path: String,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Backend thread ids.
    pub threads: BackendThreads,
    next: AtomicUsize,
}

impl InvokeTarget {
    /// A target over `upstreams`.
    pub fn new(
        upstreams: Vec<UpstreamUrl>,
        invoke_path: String,
        connect_timeout: Duration,
    ) -> Self {
        InvokeTarget {
            upstreams,
            invoke_path,
            connect_timeout,
            threads: BackendThreads::default(),
            next: AtomicUsize::new(0),
        }
    }

    /// The backend for a run of `thread`: the one its conversation lives on, else the next
    /// one, round robin.
    pub fn pick_for(&self, thread: &ThreadId) -> &UpstreamUrl {
        if let Some(up) = self
            .threads
            .get(thread)
            .and_then(|(i, _)| self.upstreams.get(i))
        {
            return up;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.upstreams.len().max(1);
        &self.upstreams[i]
    }

    /// Remember that `thread`'s conversation is `backend` on `up`.
    pub fn remember(&self, thread: &ThreadId, up: &UpstreamUrl, backend: &str) {
        if let Some(i) = self.upstreams.iter().position(|u| u == up) {
            self.threads.remember(thread, i, backend);
        }
    }

    /// The backend thread to continue on `up`, if `thread` has one there.
    fn backend_thread(&self, thread: &ThreadId, up: &UpstreamUrl) -> Option<String> {
        let (i, backend) = self.threads.get(thread)?;
        (self.upstreams.get(i) == Some(up)).then_some(backend)
    }

    /// Send the run's invoke request to `up`. `stream: false` adds `X-Stream-Response: false`
    /// (the 202 mode). Returns the session, ready for `read_response_header`.
    pub async fn send(
        &self,
        connector: &Connector,
        up: &UpstreamUrl,
        job: &RunJob,
        stream: bool,
    ) -> Result<HttpSession, Failure> {
        let backend_thread = self.backend_thread(&job.run.thread_id, up);
        let body = request_body(job, backend_thread.as_deref());
        let body = Bytes::from(serde_json::to_vec(&body).unwrap_or_default());
        let mut headers = identity_headers(job);
        headers.push(("content-type", "application/json".to_string()));
        if stream {
            headers.push(("accept", "text/event-stream".to_string()));
        } else {
            headers.push(("accept", "application/json".to_string()));
            headers.push(("x-stream-response", "false".to_string()));
        }
        client::send(
            connector,
            up,
            self.connect_timeout,
            "POST",
            &self.invoke_path,
            &headers,
            body,
        )
        .await
        .map_err(send_failure)
    }
}

/// A send error as the run's failure.
pub fn send_failure(e: SendError) -> Failure {
    match e {
        SendError::Connect(e) => Failure::Connect(e),
        SendError::Write(e) => Failure::Dropped(e),
    }
}

/// The `x-sluice-*` identity headers (and the caller's bearer token when forwarded).
pub fn identity_headers(job: &RunJob) -> Vec<(&'static str, String)> {
    let run = &job.run;
    let mut headers = vec![
        ("x-sluice-org-id", run.org_id.clone()),
        ("x-sluice-user-id", run.user_id.clone()),
        ("x-sluice-run-id", run.run_id.0.clone()),
        ("x-sluice-thread-id", run.thread_id.0.clone()),
    ];
    if let Some(token) = &job.bearer {
        headers.push(("authorization", format!("Bearer {token}")));
    }
    headers
}

/// The dialect-A invoke body for a run: the agent as the client named it, the user's
/// `UIMessage`, the backend's thread when known, and the time zone (`client_timezone` of the
/// AgentFlow request the run was built with). Other AgentFlow fields have no dialect-A
/// counterpart and are not sent. Pure.
pub fn request_body(job: &RunJob, backend_thread: Option<&str>) -> Value {
    let mut body = json!({
        "agentId": job.run.agent_id,
        "message": job.run.user_message,
    });
    if let Some(t) = backend_thread {
        body["threadId"] = json!(t);
    }
    if let Some(tz) = job.body.get("client_timezone").and_then(Value::as_str) {
        body["timezone"] = json!(tz);
    }
    body
}

/// The backend's thread id from its answer: the `X-Thread-ID` header, else `threadId` in a
/// JSON body.
pub fn backend_thread(header: Option<&str>, body: Option<&[u8]>) -> Option<String> {
    if let Some(h) = header.map(str::trim).filter(|h| !h.is_empty()) {
        return Some(h.to_owned());
    }
    let v: Value = serde_json::from_slice(body?).ok()?;
    v.get("threadId")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
}

/// The `X-Thread-ID` header of a backend answer.
pub fn thread_header(http: &HttpSession) -> Option<String> {
    http.response_header()?
        .headers
        .get("x-thread-id")?
        .to_str()
        .ok()
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{RunId, RunInfo, RunStatus};
    use std::time::SystemTime;

    fn job(body: Value) -> RunJob {
        RunJob {
            run: RunInfo {
                run_id: RunId("run_1".into()),
                thread_id: ThreadId("th_1".into()),
                org_id: "org".into(),
                user_id: "user".into(),
                agent_id: json!(7),
                status: RunStatus::InProgress,
                error: None,
                last_seq: 0,
                bytes: 0,
                created_at: SystemTime::UNIX_EPOCH,
                updated_at: SystemTime::UNIX_EPOCH,
                user_message: json!({"id":"u1","role":"user","parts":[{"type":"text","text":"hi"}]}),
                idempotency_key: None,
                assistant_message_id: "a1".into(),
            },
            agent_path: "7".into(),
            body,
            bearer: Some("tok".into()),
        }
    }

    #[test]
    fn bodies_carry_the_message_thread_and_timezone() {
        let j = job(json!({"message":"hi","client_timezone":"Europe/Paris","model":"x"}));
        assert_eq!(
            request_body(&j, Some("bt")),
            json!({"agentId":7,"message":{"id":"u1","role":"user","parts":[{"type":"text","text":"hi"}]},
                   "threadId":"bt","timezone":"Europe/Paris"})
        );
        let b = request_body(&job(json!({})), None);
        assert!(b.get("threadId").is_none() && b.get("timezone").is_none());
        let h = identity_headers(&j);
        assert!(h.contains(&("authorization", "Bearer tok".into())));
        assert!(h.contains(&("x-sluice-thread-id", "th_1".into())));
    }

    #[test]
    fn a_thread_stays_on_the_backend_its_conversation_lives_on() {
        let ups: Vec<UpstreamUrl> = ["http://a:1", "http://b:2", "http://c:3"]
            .iter()
            .map(|u| UpstreamUrl::parse(u).unwrap())
            .collect();
        let target = InvokeTarget::new(ups.clone(), "/i".into(), Duration::from_secs(1));
        let (t, other) = (ThreadId("t".into()), ThreadId("o".into()));
        let first = target.pick_for(&t).clone();
        target.remember(&t, &first, "bt");
        for _ in 0..5 {
            assert_eq!(target.pick_for(&t), &first);
            target.pick_for(&other);
        }
        assert_eq!(target.backend_thread(&t, &first).as_deref(), Some("bt"));
        let elsewhere = ups.iter().find(|u| **u != first).unwrap();
        assert_eq!(target.backend_thread(&t, elsewhere), None);
    }

    #[test]
    fn backend_threads_come_from_the_header_or_the_body() {
        assert_eq!(backend_thread(Some(" t1 "), None), Some("t1".into()));
        assert_eq!(
            backend_thread(Some(""), Some(br#"{"threadId":"t2"}"#)),
            Some("t2".into())
        );
        assert_eq!(backend_thread(None, Some(b"nope")), None);
        assert_eq!(backend_thread(None, Some(br#"{"threadId":""}"#)), None);
        let threads = BackendThreads::default();
        let t = ThreadId("a".into());
        assert_eq!(threads.get(&t), None);
        threads.remember(&t, 0, "");
        assert_eq!(threads.get(&t), None);
        threads.remember(&t, 1, "b");
        assert_eq!(threads.get(&t), Some((1, "b".into())));
    }
}
