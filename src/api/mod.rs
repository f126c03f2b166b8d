//! The client API (dialect A, "Invoke an agent"): routes, request parsing, snapshots and
//! streams, written against the small [`Exchange`] trait so that no Pingora type appears here
//! (`crate::server::exchange` implements it over a Pingora session).

pub mod agentflow;
pub mod chat;
pub mod conversation;
pub mod cors;
pub mod error;
pub mod invoke;
pub mod locate;
pub mod quota;
pub mod route;
pub mod stop;
pub mod stream;
pub mod views;

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

pub use error::ApiError;
pub use route::Route;

use crate::config::Config;
use crate::ingest::Ingestor;
use crate::store::Store;

/// A complete (non-streamed) HTTP answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// Headers besides content-length.
    pub headers: Vec<(&'static str, String)>,
    /// Body.
    pub body: Bytes,
    /// The rest of the body, after `body`: pieces shared with what they were taken from (e.g.
    /// a run's kept message in a snapshot), written one after another, never copied together.
    pub more: Vec<Bytes>,
    /// Close the connection after answering (the request body may be unread).
    pub close: bool,
}

impl Reply {
    /// The body's length, all pieces together.
    pub fn body_len(&self) -> usize {
        self.body.len() + self.more.iter().map(Bytes::len).sum::<usize>()
    }

    /// The whole body in one buffer (tests, and answers that are not written to a socket).
    pub fn body_bytes(&self) -> Bytes {
        if self.more.is_empty() {
            return self.body.clone();
        }
        let mut all = Vec::with_capacity(self.body_len());
        all.extend_from_slice(&self.body);
        for piece in &self.more {
            all.extend_from_slice(piece);
        }
        Bytes::from(all)
    }
}

/// The client hung up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gone;

/// One request/response exchange with a client, as the API sees it.
#[async_trait]
pub trait Exchange: Send {
    /// Request method.
    fn method(&self) -> &str;
    /// Request path, without the query.
    fn path(&self) -> &str;
    /// Raw query string, if any.
    fn query(&self) -> Option<&str>;
    /// A request header as text (`None` when absent or not valid text).
    fn header(&self, name: &str) -> Option<&str>;
    /// Read the whole request body, refusing more than `limit` bytes.
    async fn read_body(&mut self, limit: usize) -> Result<Bytes, ApiError>;
    /// Send a complete answer.
    async fn respond(&mut self, reply: Reply) -> Result<(), Gone>;
    /// Start a streamed answer (chunked on HTTP/1.1).
    async fn start_stream(
        &mut self,
        status: u16,
        headers: Vec<(&'static str, String)>,
    ) -> Result<(), Gone>;
    /// Send a piece of a streamed answer, flushed at once.
    async fn send(&mut self, data: Bytes) -> Result<(), Gone>;
    /// End a streamed answer.
    async fn end_stream(&mut self) -> Result<(), Gone>;
    /// Resolves when the client hangs up (never otherwise). Safe to cancel.
    async fn closed(&mut self);
    /// Status of the answer sent, if any.
    fn status_sent(&self) -> Option<u16>;
    /// Add `headers` to the answer, whichever it is (set before answering).
    fn add_headers(&mut self, headers: Vec<(&'static str, String)>);
    /// Bound every later write of this answer's body to `timeout` (a backstop against a
    /// client that stops reading). No-op where there is nothing to bound.
    fn set_write_timeout(&mut self, _timeout: std::time::Duration) {}
    /// Bound the reading of a request body left unread, after the answer, to `timeout` (past
    /// it the connection is closed rather than kept). No-op where there is nothing to bound.
    fn set_drain_timeout(&mut self, _timeout: std::time::Duration) {}
    /// Whether the last failed write failed because the write timeout passed (a stuck
    /// reader) rather than because the client went away.
    fn write_timed_out(&self) -> bool {
        false
    }
    /// Drop the connection without finishing the answer: after a streamed header, the client
    /// sees a cut (no end of body), never a clean end; before any answer, it gets none.
    fn abort(&mut self);
    /// Whether [`Exchange::abort`] was called.
    fn aborted(&self) -> bool;
}

/// Who is calling: every run and thread records it.
pub type Identity = crate::auth::Caller;

/// The client API's shared state.
pub struct Api {
    /// Effective configuration.
    pub config: Arc<Config>,
    /// The run store.
    pub store: Arc<dyn Store>,
    /// Starts runs on the backend.
    pub ingest: Ingestor,
    /// Becomes `true` when the process starts draining (SIGTERM): new requests are refused
    /// with 503 and held long-polls answer at once, while open streams go on.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    /// Becomes `true` just before the drain's grace period ends: streams still open are cut
    /// (aborted), so that their clients resume elsewhere rather than see a truncated end.
    pub cut: tokio::sync::watch::Receiver<bool>,
    /// Checks every request's credentials.
    pub auth: crate::auth::Authenticator,
    /// Runs' frames and folds, rendered and folded once for every reader on this instance.
    pub views: Arc<views::Views>,
    /// Each organisation's open streams and waiting long-polls, against its quotas.
    pub gates: quota::Gates,
    /// The request bodies held at once (`limits.max_body_bytes_in_flight`).
    pub bodies: quota::Bodies,
    /// The chat page served at `/` (`sluice demo` only; elsewhere `/` is not found).
    pub page: Option<Bytes>,
    /// The browser origins that may call the API (`server.cors_origins`).
    pub cors: cors::Cors,
}

impl Api {
    /// Answer one request. Returns the route label for metrics.
    pub async fn handle(&self, ex: &mut dyn Exchange) -> &'static str {
        // Every answer's writes are bounded: a client that stops reading is dropped after
        // `stream.stuck_reader_timeout`, whatever the route (streams set the same bound).
        ex.set_write_timeout(self.config.stream.stuck_reader_timeout.0);
        ex.set_drain_timeout(self.config.server.drain_timeout.0);
        // A browser app on a listed origin may read every answer, errors included.
        let cors = self.cors.headers(ex.header("origin"));
        ex.add_headers(cors);
        if ex.method() == "OPTIONS" && ex.header("access-control-request-method").is_some() {
            let _ = ex.respond(self.cors.preflight(ex.header("origin"))).await;
            return route::PREFLIGHT;
        }
        let routed = route::route(ex.method(), ex.path());
        let label = routed.as_ref().map_or(route::UNMATCHED, |r| r.name());
        // A draining process takes no new work; answers already under way go on. Retry once
        // this instance is gone: after its grace period (another instance, or the restarted one).
        if *self.shutdown.borrow() {
            let retry_after = self.config.server.grace_period.0;
            let _ = ex
                .respond(ApiError::ShuttingDown(retry_after).reply())
                .await;
            return label;
        }
        // The demo's page is public: it carries the demo's token to its own requests.
        if routed == Ok(Route::DemoPage) {
            let reply = match &self.page {
                Some(page) => Reply::page(page.clone()),
                None => ApiError::NotFound.reply(),
            };
            let _ = ex.respond(reply).await;
            return label;
        }
        // Credentials first, on every request, before any route work.
        let identity = match self.auth.authenticate(ex.header("authorization")).await {
            Ok(id) => id,
            Err(e) => {
                let _ = ex.respond(ApiError::Auth(e).reply()).await;
                return label;
            }
        };
        let route = match routed {
            Ok(r) => r,
            Err(e) => {
                let _ = ex.respond(e.reply()).await;
                return label;
            }
        };
        let result = match route {
            Route::InvokeAgent => invoke::invoke_agent(self, &identity, ex).await,
            Route::GetConversation => conversation::get_conversation(self, &identity, ex).await,
            Route::ResumeStream => stream::resume(self, &identity, ex).await,
            Route::StopRun => stop::stop(self, &identity, ex).await,
            Route::RunAgent => agentflow::run_agent(self, &identity, ex).await,
            Route::Chat => chat::chat(self, &identity, ex).await,
            Route::ChatStream => chat::chat_stream(self, &identity, ex).await,
            Route::ChatStop => chat::chat_stop(self, &identity, ex).await,
            Route::DemoPage => Err(ApiError::NotFound),
        };
        if let Err(e) = result {
            if ex.status_sent().is_none() {
                let _ = ex.respond(e.reply()).await;
            } else {
                log::warn!("{}: failed after answering: {e}", route.name());
            }
        }
        route.name()
    }
}

/// A request body that must be one JSON object: `invalid_json` when it is not JSON,
/// `invalid_request` when it is JSON of another shape.
pub fn json_object(body: &[u8]) -> Result<serde_json::Map<String, serde_json::Value>, ApiError> {
    match serde_json::from_slice(body) {
        Ok(serde_json::Value::Object(obj)) => Ok(obj),
        Ok(_) => Err(ApiError::InvalidRequest(
            "request body must be a JSON object".into(),
        )),
        Err(e) => Err(ApiError::InvalidJson(e.to_string())),
    }
}

/// Parse a query string into (name, value) pairs.
pub fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}
