//! The cap on client connections (`server.max_connections`): a [`ServerApp`] around Pingora's
//! HTTP application that counts the connections it is serving and answers one more with
//! `503 overloaded` (and `Retry-After`), then closes it, without reading its request.
//!
//! Counted per connection, not per request: an idle keep-alive connection holds a slot too (it
//! holds a socket and a task), and Pingora closes those after its keep-alive timeout.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;
use tokio::io::AsyncWriteExt;

use crate::metrics;

/// How long the refusal may take to write before the connection is dropped anyway.
const REFUSAL_WRITE: Duration = Duration::from_secs(1);

/// `app`, serving at most `max` connections at once.
pub struct Capped<A> {
    app: Arc<A>,
    max: usize,
    open: AtomicUsize,
}

impl<A> Capped<A> {
    /// Cap `app` at `max` connections.
    pub fn new(app: A, max: usize) -> Self {
        Capped {
            app: Arc::new(app),
            max,
            open: AtomicUsize::new(0),
        }
    }
}

/// One connection's slot, given back when it drops.
struct Slot<'a>(&'a AtomicUsize);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
        metrics::CLIENT_CONNECTIONS.dec();
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for Capped<A> {
    async fn process_new(
        self: &Arc<Self>,
        mut session: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let taken = self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .is_ok();
        if !taken {
            metrics::CONNECTIONS_REFUSED.inc();
            let body = r#"{"error":{"code":"overloaded","message":"the gateway has its most client connections open (server.max_connections); retry later"}}"#;
            let refusal = format!(
                "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
                 content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = tokio::time::timeout(REFUSAL_WRITE, async {
                session.write_all(refusal.as_bytes()).await?;
                session.flush().await?;
                session.shutdown().await
            })
            .await;
            return None;
        }
        metrics::CLIENT_CONNECTIONS.inc();
        let _slot = Slot(&self.open);
        self.app.process_new(session, shutdown).await
    }

    async fn cleanup(&self) {
        self.app.cleanup().await;
    }
}
