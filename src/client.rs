//! Outbound HTTP through Pingora's own client (plain HTTP, or HTTPS with rustls): connect to a
//! configured base URL and send one request. Used by the ingest adapters and the JWKS fetcher;
//! reading the answer is left to the caller, who may [`release`] the session to the pool.

use std::time::Duration;

use bytes::Bytes;
use pingora::connectors::http::Connector;
use pingora::http::RequestHeader;
use pingora::protocols::http::client::HttpSession;
use pingora::upstreams::peer::HttpPeer;

use crate::config::UpstreamUrl;

/// Why a request could not be sent.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// No connection could be made.
    #[error("{0}")]
    Connect(String),
    /// The connection broke while sending.
    #[error("{0}")]
    Write(String),
}

fn text(e: Box<pingora::Error>) -> String {
    e.to_string().trim().to_string()
}

/// How Pingora reaches `base` (equal peers share pooled connections).
fn peer(base: &UpstreamUrl, connect_timeout: Duration) -> HttpPeer {
    let mut peer = HttpPeer::new(base.address(), base.tls, base.host.clone());
    peer.options.connection_timeout = Some(connect_timeout);
    peer.options.total_connection_timeout = Some(connect_timeout);
    peer
}

/// How long a released connection may wait in the pool for its next request.
const POOL_IDLE: Duration = Duration::from_secs(30);

/// Give a session whose answer was read to the end back to the connector's pool, so that the
/// next request to `base` (sent with the same `connect_timeout`) reuses its connection.
/// A session that cannot be reused (body not read to its end, `connection: close`) is closed.
pub async fn release(
    connector: &Connector,
    http: HttpSession,
    base: &UpstreamUrl,
    connect_timeout: Duration,
) {
    connector
        .release_http_session(http, &peer(base, connect_timeout), Some(POOL_IDLE))
        .await;
}

/// Open a connection to `base` (or reuse a pooled one) and send `method base.path+path` with `headers` and `body`.
/// Returns the session, ready for `read_response_header`.
pub async fn send(
    connector: &Connector,
    base: &UpstreamUrl,
    connect_timeout: Duration,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: Bytes,
) -> Result<HttpSession, SendError> {
    let peer = peer(base, connect_timeout);
    let (mut http, _reused) = connector
        .get_http_session(&peer)
        .await
        .map_err(|e| SendError::Connect(text(e)))?;
    let full_path = format!("{}{}", base.base_path, path);
    let bad = |e| SendError::Connect(text(e));
    let mut req = RequestHeader::build(method, full_path.as_bytes(), None).map_err(bad)?;
    req.insert_header("host", base.authority()).map_err(bad)?;
    req.insert_header("content-length", body.len().to_string())
        .map_err(bad)?;
    for (name, value) in headers {
        req.insert_header(name.to_string(), value.as_str())
            .map_err(bad)?;
    }
    let write = |e| SendError::Write(text(e));
    http.write_request_header(Box::new(req))
        .await
        .map_err(write)?;
    if !body.is_empty() {
        http.write_request_body(body, true).await.map_err(write)?;
    }
    http.finish_request_body().await.map_err(write)?;
    Ok(http)
}

/// Read a whole response body, at most `limit` bytes, each read within `idle`.
/// Returns `None` if the body is larger, a read times out or fails.
pub async fn read_body(http: &mut HttpSession, limit: usize, idle: Duration) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        match tokio::time::timeout(idle, http.read_response_body()).await {
            Ok(Ok(Some(chunk))) => {
                if body.len() + chunk.len() > limit {
                    return None;
                }
                body.extend_from_slice(&chunk);
            }
            Ok(Ok(None)) => return Some(body),
            _ => return None,
        }
    }
}
