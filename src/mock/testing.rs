//! Test helpers: [`Fake`], an in-memory [`Exchange`] for driving the mock agent without a
//! socket, and [`request`].

use async_trait::async_trait;
use bytes::Bytes;
use serde_json::Value;

use crate::api::{ApiError, Exchange, Gone, Reply};
use crate::mock::MockAgent;
use crate::server::exchange::LocalApp;

/// An in-memory exchange: the request given, the answer recorded.
#[derive(Default)]
pub struct Fake {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    pub status: Option<u16>,
    pub reply_headers: Vec<(&'static str, String)>,
    pub out: Vec<u8>,
    pub aborted: bool,
}

#[async_trait]
impl Exchange for Fake {
    fn method(&self) -> &str {
        &self.method
    }
    fn path(&self) -> &str {
        &self.path
    }
    fn query(&self) -> Option<&str> {
        self.query.as_deref()
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    async fn read_body(&mut self, _limit: usize) -> Result<Bytes, ApiError> {
        Ok(self.body.clone())
    }
    async fn respond(&mut self, reply: Reply) -> Result<(), Gone> {
        self.status = Some(reply.status);
        self.reply_headers = reply.headers;
        self.out = reply.body.to_vec();
        Ok(())
    }
    async fn start_stream(
        &mut self,
        status: u16,
        headers: Vec<(&'static str, String)>,
    ) -> Result<(), Gone> {
        self.status = Some(status);
        self.reply_headers = headers;
        Ok(())
    }
    async fn send(&mut self, data: Bytes) -> Result<(), Gone> {
        self.out.extend_from_slice(&data);
        Ok(())
    }
    async fn end_stream(&mut self) -> Result<(), Gone> {
        Ok(())
    }
    async fn closed(&mut self) {
        std::future::pending::<()>().await
    }
    fn status_sent(&self) -> Option<u16> {
        self.status
    }
    fn add_headers(&mut self, _headers: Vec<(&'static str, String)>) {}
    fn abort(&mut self) {
        self.aborted = true;
    }
    fn aborted(&self) -> bool {
        self.aborted
    }
}

impl Fake {
    pub fn header_out(&self, name: &str) -> Option<&str> {
        self.reply_headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.out).unwrap()
    }
}

pub async fn request(
    mock: &MockAgent,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: Value,
) -> Fake {
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q.to_string())),
        None => (target, None),
    };
    let mut ex = Fake {
        method: method.into(),
        path: path.into(),
        query,
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        body: if body.is_null() {
            Bytes::new()
        } else {
            Bytes::from(body.to_string())
        },
        ..Fake::default()
    };
    mock.handle(&mut ex).await;
    ex
}
