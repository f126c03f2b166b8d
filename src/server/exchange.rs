//! The one place that speaks Pingora's request/response API: [`PingoraExchange`] implements the
//! API's [`Exchange`] over a `pingora_proxy::Session`, and [`Local`] is a `ProxyHttp` that answers
//! every request locally (in `request_filter`) through a [`LocalApp`].
//!
//! Streams are sent with `transfer-encoding: chunked` on HTTP/1.1 (Pingora would otherwise fall
//! back to a close-delimited body) and client hang-ups are noticed through
//! `read_body_or_idle(true)` even while nothing is being written.
//!
//! An aborted answer ([`Exchange::abort`]) makes `request_filter` return an error: Pingora then
//! drops the connection without writing the chunked terminator (or anything else), so the client
//! sees a cut. [`Local`] keeps that deliberate error out of the error log and out of Pingora's
//! error response.

use std::time::Instant;

use async_trait::async_trait;
use std::time::Duration;

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};

use crate::api::quota::Bodies;
use crate::api::{ApiError, Exchange, Gone, Reply};
use crate::metrics;

/// An [`Exchange`] over a Pingora session.
pub struct PingoraExchange<'a> {
    session: &'a mut Session,
    status: Option<u16>,
    aborted: bool,
    write_timed_out: bool,
    /// Whether the request body was read to its end.
    body_read: bool,
    /// The request bodies held at once, if the app bounds them.
    bodies: Option<Bodies>,
    /// Headers every answer carries (CORS).
    extra: Vec<(&'static str, String)>,
}

impl<'a> PingoraExchange<'a> {
    /// Wrap a session whose request header has been read; its body counts against `bodies`.
    pub fn new(session: &'a mut Session, bodies: Option<Bodies>) -> Self {
        PingoraExchange {
            session,
            status: None,
            aborted: false,
            write_timed_out: false,
            body_read: false,
            bodies,
            extra: Vec::new(),
        }
    }

    /// Whether the request announces a body (a non-zero length, or chunked).
    fn has_body(&self) -> bool {
        let chunked = self
            .header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        let length = self
            .header("content-length")
            .and_then(|v| v.trim().parse::<u64>().ok())
            .is_some_and(|n| n > 0);
        chunked || length
    }

    fn header_for(
        &self,
        status: u16,
        headers: Vec<(&'static str, String)>,
    ) -> Result<ResponseHeader, Gone> {
        let size = headers.len() + self.extra.len() + 2;
        let mut resp = ResponseHeader::build(status, Some(size)).map_err(|_| Gone)?;
        for (name, value) in headers.into_iter().chain(self.extra.iter().cloned()) {
            resp.insert_header(name, value).map_err(|_| Gone)?;
        }
        Ok(resp)
    }
}

#[async_trait]
impl Exchange for PingoraExchange<'_> {
    fn method(&self) -> &str {
        self.session.req_header().method.as_str()
    }

    fn path(&self) -> &str {
        self.session.req_header().uri.path()
    }

    fn query(&self) -> Option<&str> {
        self.session.req_header().uri.query()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.session
            .req_header()
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
    }

    async fn read_body(&mut self, limit: usize) -> Result<Bytes, ApiError> {
        let declared = self
            .header("content-length")
            .and_then(|v| v.trim().parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(ApiError::PayloadTooLarge(limit));
        }
        let mut body = Vec::new();
        // Counted as it is read; given back if the body is abandoned (an error, or this future
        // dropped), else held with the body until its last copy goes.
        let mut taken = Taken {
            bodies: self.bodies.clone(),
            n: 0,
        };
        loop {
            match self.session.read_request_body().await {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > limit {
                        return Err(ApiError::PayloadTooLarge(limit));
                    }
                    if !taken.take(chunk.len()) {
                        return Err(ApiError::Overloaded(Duration::from_secs(1)));
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => {
                    self.body_read = true;
                    return Ok(taken.hold(body));
                }
                Err(e) => {
                    return Err(ApiError::InvalidRequest(format!(
                        "could not read the request body: {e}"
                    )))
                }
            }
        }
    }

    async fn respond(&mut self, reply: Reply) -> Result<(), Gone> {
        let len = reply.body_len();
        let mut resp = self.header_for(reply.status, reply.headers)?;
        if reply.status != 204 && reply.status != 304 {
            resp.insert_header("content-length", len.to_string())
                .map_err(|_| Gone)?;
        }
        // A refusal before the body was read (a bad token, an unknown route, a drain) closes
        // the connection rather than draining the body: a client trickling a body cannot hold
        // the connection, or its task, after its answer.
        if reply.close || (!self.body_read && self.has_body()) {
            self.session.set_keepalive(None);
        }
        self.status = Some(reply.status);
        self.session
            .write_response_header(Box::new(resp), false)
            .await
            .map_err(|_| Gone)?;
        let last = reply.more.len();
        let mut sent = self
            .session
            .write_response_body(Some(reply.body), last == 0)
            .await;
        for (i, piece) in reply.more.into_iter().enumerate() {
            if sent.is_err() {
                break;
            }
            sent = self
                .session
                .write_response_body(Some(piece), i + 1 == last)
                .await;
        }
        if sent.is_err() {
            // A client that stopped reading (the write timed out) or went away: never reuse
            // a connection whose answer was cut.
            self.session.set_keepalive(None);
        }
        sent.map_err(|_| Gone)
    }

    async fn start_stream(
        &mut self,
        status: u16,
        headers: Vec<(&'static str, String)>,
    ) -> Result<(), Gone> {
        let mut resp = self.header_for(status, headers)?;
        if !self.session.as_downstream().is_http2() {
            resp.insert_header("transfer-encoding", "chunked")
                .map_err(|_| Gone)?;
        }
        self.status = Some(status);
        self.session
            .write_response_header(Box::new(resp), false)
            .await
            .map_err(|_| Gone)
    }

    async fn send(&mut self, data: Bytes) -> Result<(), Gone> {
        self.session
            .write_response_body(Some(data), false)
            .await
            .map_err(|e| {
                self.write_timed_out = *e.etype() == pingora::ErrorType::WriteTimedout;
                Gone
            })
    }

    fn write_timed_out(&self) -> bool {
        self.write_timed_out
    }

    async fn end_stream(&mut self) -> Result<(), Gone> {
        self.session
            .write_response_body(None, true)
            .await
            .map_err(|_| Gone)
    }

    fn set_write_timeout(&mut self, timeout: std::time::Duration) {
        // Pingora bounds each body write with it (HTTP/1.1 `write_body`, HTTP/2 `write_body`).
        self.session.set_write_timeout(Some(timeout));
    }

    fn set_drain_timeout(&mut self, timeout: std::time::Duration) {
        self.session
            .as_downstream_mut()
            .set_total_drain_timeout(Some(timeout));
    }

    async fn closed(&mut self) {
        match self
            .session
            .as_downstream_mut()
            .read_body_or_idle(true)
            .await
        {
            Err(_) => {}
            // Not a hang-up (e.g. pipelined bytes): never resolve for this request.
            Ok(_) => std::future::pending().await,
        }
    }

    fn add_headers(&mut self, headers: Vec<(&'static str, String)>) {
        self.extra.extend(headers);
    }

    fn status_sent(&self) -> Option<u16> {
        self.status
    }

    fn abort(&mut self) {
        self.aborted = true;
        self.session.set_keepalive(None);
    }

    fn aborted(&self) -> bool {
        self.aborted
    }
}

/// An application that answers requests itself (the client API, the mock agent).
#[async_trait]
pub trait LocalApp: Send + Sync + 'static {
    /// Answer one request; return the route label for metrics.
    async fn handle(&self, ex: &mut dyn Exchange) -> &'static str;
    /// Whether to record `sluice_http_*` metrics for this app.
    fn records_metrics(&self) -> bool {
        false
    }
    /// The bound on request bodies held at once, if any.
    fn bodies(&self) -> Option<Bodies> {
        None
    }
}

/// Request body bytes taken from [`Bodies`] while a body is read: given back when dropped,
/// unless the whole body was handed over to be held with it.
struct Taken {
    bodies: Option<Bodies>,
    n: usize,
}

impl Taken {
    fn take(&mut self, n: usize) -> bool {
        match &self.bodies {
            Some(b) if !b.take(n) => false,
            _ => {
                self.n += n;
                true
            }
        }
    }

    fn hold(mut self, body: Vec<u8>) -> Bytes {
        self.n = 0;
        match self.bodies.take() {
            Some(b) => b.hold(body),
            None => Bytes::from(body),
        }
    }
}

impl Drop for Taken {
    fn drop(&mut self) {
        if let Some(b) = &self.bodies {
            b.give_back(self.n);
        }
    }
}

/// Per-request state of [`Local`].
pub struct LocalCtx {
    route: &'static str,
    started: Instant,
    /// The app aborted its answer: the error `request_filter` returns is deliberate.
    aborted: bool,
}

/// A `ProxyHttp` that answers everything through a [`LocalApp`] and never proxies.
pub struct Local<A>(pub std::sync::Arc<A>);

#[async_trait]
impl<A: LocalApp> ProxyHttp for Local<A> {
    type CTX = LocalCtx;

    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {
        // No response compression module: every answer is written by us, event streams must
        // never be buffered by an encoder, and the module's filter would run on every frame.
    }

    fn new_ctx(&self) -> LocalCtx {
        LocalCtx {
            route: crate::api::route::UNMATCHED,
            started: Instant::now(),
            aborted: false,
        }
    }

    async fn upstream_peer(&self, _s: &mut Session, _c: &mut LocalCtx) -> Result<Box<HttpPeer>> {
        Error::e_explain(ErrorType::HTTPStatus(404), "no proxied routes")
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut LocalCtx) -> Result<bool> {
        let mut ex = PingoraExchange::new(session, self.0.bodies());
        ctx.route = self.0.handle(&mut ex).await;
        if ex.aborted() {
            // An error after the header was sent makes Pingora close the connection without
            // finishing the body: what a crashing server looks like to its client.
            ctx.aborted = true;
            return Error::e_explain(ErrorType::ConnectionClosed, "response aborted");
        }
        if ex.status_sent().is_none() {
            // Every path answers; this is a safety net against a handler that did not.
            let _ = ex
                .respond(ApiError::Internal("no answer".into()).reply())
                .await;
        }
        Ok(true)
    }

    /// An aborted answer gets nothing more: no error response (none after a streamed header,
    /// and none before it either: the client sees a dropped connection), no reuse.
    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut LocalCtx,
    ) -> FailToProxy
    where
        LocalCtx: Send + Sync,
    {
        if ctx.aborted {
            session.set_keepalive(None);
            return FailToProxy {
                error_code: 0,
                can_reuse_downstream: false,
            };
        }
        // Otherwise what Pingora's default does.
        let code = match (e.etype(), e.esource()) {
            (ErrorType::HTTPStatus(code), _) => *code,
            (_, ErrorSource::Upstream) => 502,
            (
                ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed,
                ErrorSource::Downstream,
            ) => 0,
            (_, ErrorSource::Downstream) => 400,
            (_, ErrorSource::Internal | ErrorSource::Unset) => 500,
        };
        if code > 0 {
            if let Err(e) = session.respond_error(code).await {
                log::error!("failed to send error response to downstream: {e}");
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    /// A deliberate abort is routine (shutdown, stuck reader, eviction): logged by the app at
    /// debug level, not by Pingora as an error.
    fn suppress_error_log(&self, _session: &Session, ctx: &LocalCtx, _error: &Error) -> bool {
        ctx.aborted
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut LocalCtx) {
        if !self.0.records_metrics() {
            return;
        }
        let status = session.response_written().map_or(0, |h| h.status.as_u16());
        metrics::HTTP_REQUESTS
            .with_label_values(&[ctx.route, status_label(status)])
            .inc();
        metrics::HTTP_DURATION
            .with_label_values(&[ctx.route])
            .observe(ctx.started.elapsed().as_secs_f64());
    }
}

/// Status codes as static labels (a closed set).
fn status_label(status: u16) -> &'static str {
    match status {
        200 => "200",
        202 => "202",
        204 => "204",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        405 => "405",
        409 => "409",
        410 => "410",
        413 => "413",
        500 => "500",
        502 => "502",
        503 => "503",
        0 => "none",
        _ => "other",
    }
}
