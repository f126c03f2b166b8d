//! Client-facing errors: one enum for every way a request can fail, mapped to an HTTP status,
//! a stable snake_case code and a message for a person in exactly one place ([`ApiError::reply`]).
//! Bodies are `{"error": {"code", "message"}}`; they never carry tokens or internals.

use std::time::Duration;

use bytes::Bytes;

use super::Reply;
use crate::auth::AuthError;
use crate::store::budget::QuotaKind;
use crate::store::StoreError;

/// Everything a client request can fail with.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// The body is not JSON.
    #[error("request body is not valid JSON: {0}")]
    InvalidJson(String),
    /// The JSON has missing or wrongly typed fields, or a query parameter is missing or bad.
    #[error("{0}")]
    InvalidRequest(String),
    /// No such thread for this organisation.
    #[error("thread not found")]
    ThreadNotFound,
    /// No such run in this thread.
    #[error("run not found in this thread")]
    RunNotFound,
    /// The log no longer holds the events after the client's cursor (its run was evicted); the
    /// text names the cursor or the run.
    #[error("the events after {0} are no longer retained (its run was evicted); read the conversation snapshot at /api/getConversation instead")]
    CursorExpired(String),
    /// The thread's latest run is still in progress.
    #[error("the thread's run {0} is still in progress")]
    RunInProgress(String),
    /// The body exceeds `limits.max_body_bytes`.
    #[error("request body exceeds {0} bytes")]
    PayloadTooLarge(usize),
    /// The store cannot take new runs now.
    #[error("the gateway is at capacity; retry later")]
    StoreFull(Duration),
    /// The caller's organisation is at one of its quotas (`[limits.per_org]`); the duration is
    /// the `Retry-After` hint.
    #[error("your organisation is at its {} quota (limits.per_org); retry later", .0.as_str())]
    QuotaExceeded(QuotaKind, Duration),
    /// Request bodies already held take `limits.max_body_bytes_in_flight`; the duration is the
    /// `Retry-After` hint.
    #[error("the gateway is reading as many request bodies as it may (limits.max_body_bytes_in_flight); retry later")]
    Overloaded(Duration),
    /// The shared store (Redis) cannot be reached or answered too slowly.
    #[error("the gateway's store is unavailable; retry shortly")]
    StoreUnavailable,
    /// The process is draining (SIGTERM): it takes no new requests, only finishes open ones.
    /// The duration is the `Retry-After` hint.
    #[error("the gateway is shutting down; retry on another instance or after a restart")]
    ShuttingDown(Duration),
    /// Known path, wrong method.
    #[error("method not allowed; use {0}")]
    MethodNotAllowed(&'static str),
    /// Unknown path.
    #[error("no such route")]
    NotFound,
    /// A browser preflight from an origin not in `server.cors_origins` (the text names it).
    #[error(
        "origin `{0}` may not call this API from a browser (it is not in server.cors_origins)"
    )]
    OriginNotAllowed(String),
    /// The request's credentials were refused.
    #[error("{}", .0.description())]
    Auth(AuthError),
    /// The organisation may not use this agent (`auth.org_agents`), or the backend says the
    /// agent does not exist for it.
    #[error("agent not found")]
    AgentNotFound,
    /// The backend refused the agent for this caller (its 401/403, passed on).
    #[error("the agent backend refused this request: {1}")]
    AgentRefused(u16, String),
    /// A bug or a store failure.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// The HTTP status.
    pub fn status(&self) -> u16 {
        match self {
            ApiError::InvalidJson(_) | ApiError::InvalidRequest(_) => 400,
            ApiError::ThreadNotFound | ApiError::RunNotFound | ApiError::NotFound => 404,
            ApiError::MethodNotAllowed(_) => 405,
            ApiError::RunInProgress(_) => 409,
            ApiError::PayloadTooLarge(_) => 413,
            ApiError::CursorExpired(_) => 410,
            ApiError::Internal(_) => 500,
            ApiError::Auth(e) => e.status(),
            ApiError::AgentNotFound => 404,
            ApiError::OriginNotAllowed(_) => 403,
            ApiError::AgentRefused(status, _) => *status,
            ApiError::StoreFull(_)
            | ApiError::ShuttingDown(_)
            | ApiError::Overloaded(_)
            | ApiError::StoreUnavailable => 503,
            ApiError::QuotaExceeded(..) => 429,
        }
    }

    /// The stable code (documented in the README).
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidJson(_) => "invalid_json",
            ApiError::InvalidRequest(_) => "invalid_request",
            ApiError::ThreadNotFound => "thread_not_found",
            ApiError::RunNotFound => "run_not_found",
            ApiError::RunInProgress(_) => "run_in_progress",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::CursorExpired(_) => "cursor_expired",
            ApiError::StoreFull(_) => "store_full",
            ApiError::StoreUnavailable => "store_unavailable",
            ApiError::QuotaExceeded(..) => "quota_exceeded",
            ApiError::Overloaded(_) => "overloaded",
            ApiError::ShuttingDown(_) => "shutting_down",
            ApiError::MethodNotAllowed(_) => "method_not_allowed",
            ApiError::NotFound => "not_found",
            ApiError::Internal(_) => "internal",
            ApiError::Auth(e) if e.status() == 403 => "forbidden",
            ApiError::Auth(AuthError::KeysUnavailable) => "auth_unavailable",
            ApiError::Auth(_) => "unauthorized",
            ApiError::AgentNotFound => "agent_not_found",
            ApiError::OriginNotAllowed(_) => "origin_not_allowed",
            ApiError::AgentRefused(401, _) => "agent_unauthorized",
            ApiError::AgentRefused(_, _) => "agent_forbidden",
        }
    }

    /// The full HTTP answer.
    pub fn reply(&self) -> Reply {
        let body = serde_json::json!({"error": {"code": self.code(), "message": self.to_string()}});
        let mut reply = Reply::json(self.status(), &body);
        match self {
            ApiError::StoreFull(after) => reply
                .headers
                .push(("retry-after", after.as_secs().max(1).to_string())),
            ApiError::QuotaExceeded(kind, after) => {
                crate::metrics::QUOTA_REFUSALS
                    .with_label_values(&[kind.as_str()])
                    .inc();
                reply
                    .headers
                    .push(("retry-after", after.as_secs().max(1).to_string()));
            }
            ApiError::Overloaded(after) => {
                reply
                    .headers
                    .push(("retry-after", after.as_secs().max(1).to_string()));
                // The rest of the body is not read.
                reply.close = true;
            }
            ApiError::ShuttingDown(after) => {
                reply
                    .headers
                    .push(("retry-after", after.as_secs().max(1).to_string()));
                // This connection will not be served again.
                reply.close = true;
            }
            ApiError::StoreUnavailable => reply.headers.push(("retry-after", "1".into())),
            ApiError::MethodNotAllowed(allow) => reply.headers.push(("allow", allow.to_string())),
            ApiError::PayloadTooLarge(_) => reply.close = true,
            ApiError::Auth(e) => {
                if let Some(challenge) = e.www_authenticate() {
                    reply.headers.push(("www-authenticate", challenge));
                }
            }
            _ => {}
        }
        reply
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::ThreadNotFound | StoreError::RunNotFound => ApiError::ThreadNotFound,
            StoreError::RunInProgress(run) => ApiError::RunInProgress(run.0),
            StoreError::AgentMismatch(agent) => ApiError::InvalidRequest(format!(
                "this thread belongs to agent {agent}; start a new thread for another agent"
            )),
            StoreError::Full { retry_after } => ApiError::StoreFull(retry_after),
            StoreError::Quota { kind, retry_after } => ApiError::QuotaExceeded(kind, retry_after),
            StoreError::Unavailable(why) => {
                log::warn!("store unavailable: {why}");
                ApiError::StoreUnavailable
            }
            e @ (StoreError::RunLimit(_) | StoreError::Finished | StoreError::Fenced) => {
                ApiError::Internal(e.to_string())
            }
        }
    }
}

impl Reply {
    /// An answer with no body (e.g. 204).
    pub fn empty(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: Bytes::new(),
            more: Vec::new(),
            close: false,
        }
    }

    /// A JSON answer.
    pub fn json(status: u16, body: &serde_json::Value) -> Reply {
        Reply {
            status,
            headers: vec![("content-type", "application/json".into())],
            body: Bytes::from(serde_json::to_vec(body).unwrap_or_default()),
            more: Vec::new(),
            close: false,
        }
    }
    /// A JSON answer already serialised.
    pub fn json_bytes(status: u16, body: impl Into<Bytes>) -> Reply {
        Reply {
            status,
            headers: vec![("content-type", "application/json".into())],
            body: body.into(),
            more: Vec::new(),
            close: false,
        }
    }

    /// An HTML page of the project's own (inline script and style, nothing from elsewhere).
    pub fn page(html: Bytes) -> Reply {
        Reply {
            status: 200,
            headers: vec![
                ("content-type", "text/html; charset=utf-8".into()),
                ("cache-control", "no-store".into()),
                (
                    "content-security-policy",
                    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                     connect-src 'self'; img-src 'self' data:; base-uri 'none'; \
                     form-action 'none'; frame-ancestors 'none'"
                        .into(),
                ),
                ("referrer-policy", "no-referrer".into()),
                ("x-content-type-options", "nosniff".into()),
            ],
            body: html,
            more: Vec::new(),
            close: false,
        }
    }

    /// A JSON answer written from pieces (shared, not copied into one buffer).
    pub fn json_pieces(status: u16, mut pieces: Vec<Bytes>) -> Reply {
        let body = if pieces.is_empty() {
            Bytes::new()
        } else {
            pieces.remove(0)
        };
        Reply {
            more: pieces,
            ..Reply::json_bytes(status, body)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_status_code_and_json_body() {
        let r = ApiError::StoreFull(Duration::from_secs(7)).reply();
        assert_eq!(r.status, 503);
        assert!(r.headers.contains(&("retry-after", "7".into())));
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["error"]["code"], "store_full");
        assert!(v["error"]["message"].as_str().unwrap().contains("capacity"));
        let r = ApiError::MethodNotAllowed("POST").reply();
        assert_eq!(r.status, 405);
        assert!(r.headers.contains(&("allow", "POST".into())));
        assert_eq!(ApiError::from(StoreError::ThreadNotFound).status(), 404);
        assert_eq!(
            ApiError::from(StoreError::RunInProgress(crate::store::RunId("r".into()))).code(),
            "run_in_progress"
        );
    }
}
