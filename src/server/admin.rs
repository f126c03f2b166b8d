//! The admin listener: `/metrics` (Prometheus text format), `/healthz` (the process answers)
//! and `/readyz` (ready to take runs: not shutting down and the store has room). With
//! `server.admin_token`, `/metrics` needs it as a bearer token; the health routes stay open for
//! load balancers.

use std::sync::Arc;

use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use crate::metrics;
use crate::store::budget::{Budget, Part};

/// Serves the admin routes.
pub struct AdminApp {
    /// Set once the process is shutting down.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    /// What is held against `limits.max_total_bytes` (the store's and the views'), for the
    /// gauges and readiness.
    pub budget: Arc<Budget>,
    /// The store (a shared one may be unreachable: not ready then).
    pub store: Arc<dyn crate::store::Store>,
    /// `server.admin_token`: when set, `/metrics` needs it as a bearer token.
    pub token: Option<String>,
}

/// Whether the request carries `Authorization: Bearer <token>` (compared in constant time).
fn authorised(session: &ServerSession, token: &str) -> bool {
    let given = session
        .req_header()
        .headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .unwrap_or("");
    given.len() == token.len()
        && given
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

fn reply(status: u16, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .header("content-length", body.len())
        .body(body)
        .unwrap_or_default()
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        if req.method != http::Method::GET {
            return reply(405, "text/plain", b"method not allowed\n".to_vec());
        }
        match req.uri.path() {
            "/metrics"
                if self
                    .token
                    .as_deref()
                    .is_some_and(|t| !authorised(session, t)) =>
            {
                let mut resp = reply(401, "text/plain", b"admin token required\n".to_vec());
                resp.headers_mut().insert(
                    http::header::WWW_AUTHENTICATE,
                    http::HeaderValue::from_static("Bearer realm=\"sluice admin\""),
                );
                resp
            }
            "/metrics" => {
                metrics::STORE_BYTES.set(self.budget.total() as i64);
                for part in Part::ALL {
                    metrics::HELD_BYTES
                        .with_label_values(&[part.as_str()])
                        .set(self.budget.part(part) as i64);
                }
                reply(200, "text/plain; version=0.0.4", metrics::render())
            }
            "/healthz" => reply(200, "text/plain", b"ok\n".to_vec()),
            "/readyz" => {
                if *self.shutdown.borrow() {
                    reply(503, "text/plain", b"shutting down\n".to_vec())
                } else if self.budget.total() >= self.budget.high_water() {
                    reply(503, "text/plain", b"store full\n".to_vec())
                } else if !self.store.ready().await {
                    reply(503, "text/plain", b"store unavailable\n".to_vec())
                } else {
                    reply(200, "text/plain", b"ready\n".to_vec())
                }
            }
            _ => reply(404, "text/plain", b"not found\n".to_vec()),
        }
    }
}
