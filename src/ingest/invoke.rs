//! Starting a run on a dialect-A backend ("Invoke an agent"), shared by the UI-message and poll
//! adapters: `POST {upstream}{invoke_path}` with `{agentId, message, threadId?, timezone?}`.
//!
//! The backend keeps its own thread ids. The first run of a Sluice thread goes without
//! `threadId`; the id the backend answers with (`X-Thread-ID`, or `threadId` in a JSON body) is
//! recorded in the thread's record in the store ([`crate::store::BackendThread`], with the
//! backend it lives on), so that later runs of the thread go to that backend and continue its
//! conversation, for as long as the thread's record is kept.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use pingora::connectors::http::Connector;
use pingora::protocols::http::client::HttpSession;
use serde_json::{json, Value};

use super::{Failure, RunJob};
use crate::client::{self, SendError};
use crate::config::UpstreamUrl;
use crate::store::BackendThread;

/// Where and how runs are started on a dialect-A backend.
#[derive(Debug)]
pub struct InvokeTarget {
    /// Backends, used in turn (a run stays on the one it started on).
    pub upstreams: Vec<UpstreamUrl>,
    /// Path of the invoke route (`/api/invokeAgent`).
    pub invoke_path: String,
    /// Connect timeout.
    pub connect_timeout: Duration,
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
            next: AtomicUsize::new(0),
        }
    }

    /// The backend for a run of a thread whose conversation is `backend` (if known): the one
    /// it lives on, else the next one, round robin.
    pub fn pick_for(&self, backend: Option<&BackendThread>) -> &UpstreamUrl {
        if let Some(up) =
            backend.and_then(|b| self.upstreams.iter().find(|u| u.to_string() == b.upstream))
        {
            return up;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.upstreams.len().max(1);
        &self.upstreams[i]
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
        let body = request_body(job, backend_thread_on(job, up));
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

/// The backend thread to continue on `up`, if the job's thread has one there.
pub fn backend_thread_on<'a>(job: &'a RunJob, up: &UpstreamUrl) -> Option<&'a str> {
    job.backend_thread
        .as_ref()
        .filter(|b| b.upstream == up.to_string())
        .map(|b| b.id.as_str())
}

/// A send error as the run's failure.
pub fn send_failure(e: SendError) -> Failure {
    match e {
        SendError::Connect(e) => Failure::Connect(e),
        SendError::Write(e) => Failure::Dropped(e),
    }
}

/// The `x-sluice-*` identity headers alone, for every request about a run after the one that
/// starts it (the poll adapter's snapshot reads). Never the caller's token: see
/// [`identity_headers`].
pub fn sluice_headers(job: &RunJob) -> Vec<(&'static str, String)> {
    let run = &job.run;
    vec![
        ("x-sluice-org-id", run.org_id.clone()),
        ("x-sluice-user-id", run.user_id.clone()),
        ("x-sluice-run-id", run.run_id.0.clone()),
        ("x-sluice-thread-id", run.thread_id.0.clone()),
    ]
}

/// The headers of the request that starts a run (a dialect-A invoke, an AgentFlow `run`): the
/// identity headers ([`sluice_headers`]) and, with `auth.forward_token`, the caller's bearer
/// token. Only this request carries the token: it lives about a minute, a polled run up to
/// `poll_timeout`, so later requests use [`sluice_headers`].
pub fn identity_headers(job: &RunJob) -> Vec<(&'static str, String)> {
    let mut headers = sluice_headers(job);
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
        "message": *job.run.user_message,
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
    use crate::store::{RunId, RunInfo, RunStatus, ThreadId};
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
                first_seq: 1,
                last_seq: 0,
                bytes: 0,
                created_at: SystemTime::UNIX_EPOCH,
                updated_at: SystemTime::UNIX_EPOCH,
                user_message:
                    json!({"id":"u1","role":"user","parts":[{"type":"text","text":"hi"}]}).into(),
                idempotency_key: None,
                assistant_message_id: "a1".into(),
            },
            agent_path: "7".into(),
            body,
            bearer: Some("tok".into()),
            backend_thread: None,
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
        // Later requests (polls) carry the identity, never the token.
        let later = sluice_headers(&j);
        assert!(later.contains(&("x-sluice-thread-id", "th_1".into())));
        assert!(later.iter().all(|(name, _)| *name != "authorization"));
    }

    #[test]
    fn a_thread_stays_on_the_backend_its_conversation_lives_on() {
        let ups: Vec<UpstreamUrl> = ["http://a:1", "http://b:2", "http://c:3"]
            .iter()
            .map(|u| UpstreamUrl::parse(u).unwrap())
            .collect();
        let target = InvokeTarget::new(ups.clone(), "/i".into(), Duration::from_secs(1));
        let first = target.pick_for(None).clone();
        let known = BackendThread {
            upstream: first.to_string(),
            id: "bt".into(),
        };
        for _ in 0..5 {
            assert_eq!(target.pick_for(Some(&known)), &first);
            target.pick_for(None);
        }
        let mut j = job(json!({}));
        j.backend_thread = Some(known);
        assert_eq!(backend_thread_on(&j, &first), Some("bt"));
        let elsewhere = ups.iter().find(|u| **u != first).unwrap();
        assert_eq!(backend_thread_on(&j, elsewhere), None);
        // A backend no longer configured: round robin, no backend thread.
        let gone = BackendThread {
            upstream: "http://gone:9".into(),
            id: "x".into(),
        };
        assert!(ups.contains(target.pick_for(Some(&gone))));
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
    }
}
