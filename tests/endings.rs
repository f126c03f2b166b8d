//! Only a run's real end ends a stream cleanly (DESIGN.md §6, invariant 1): a shutdown, a stuck
//! reader or an eviction mid-stream cut the connection (no chunked terminator, no `finish`, no
//! `[DONE]`), so that clients resume instead of keeping a truncated answer. The clients here are
//! raw TCP sockets, so that the framing the gateway sends (or does not) is seen byte for byte.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What a raw HTTP/1.1 client has seen of one response so far.
#[derive(Debug, Default)]
struct Seen {
    /// Status code, once the header arrived.
    status: Option<u16>,
    /// The response header, as text.
    head: String,
    /// The body, de-chunked.
    body: Vec<u8>,
    /// The chunked body's terminator (`0\r\n\r\n`) arrived: a clean end.
    terminated: bool,
    /// The chunked framing broke (e.g. a chunk cut short, then more framing): never acceptable.
    corrupt: Option<String>,
    /// A `content-length` body arrived whole.
    complete: bool,
    /// The server closed the connection (EOF or reset).
    closed: bool,
}

impl Seen {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The response ended (cleanly or not).
    fn over(&self) -> bool {
        self.terminated || self.complete || self.closed || self.corrupt.is_some()
    }
}

/// A raw HTTP/1.1 connection that parses the response incrementally.
struct Raw {
    sock: TcpStream,
    raw: Vec<u8>,
    /// Parse position in `raw`.
    pos: usize,
    /// `Some(n)`: a content-length body of n bytes; `None`: chunked (or not known yet).
    length: Option<usize>,
    seen: Seen,
}

impl Raw {
    /// Connect to `addr`; with `small_buffer`, the receive buffer is tiny, so that a client that
    /// does not read soon makes the gateway's writes block.
    async fn connect(addr: &str, small_buffer: bool) -> std::io::Result<Raw> {
        let sock = tokio::net::TcpSocket::new_v4()?;
        if small_buffer {
            sock.set_recv_buffer_size(4096)?;
        }
        let sock = sock.connect(addr.parse().unwrap()).await?;
        Ok(Raw {
            sock,
            raw: Vec::new(),
            pos: 0,
            length: None,
            seen: Seen::default(),
        })
    }

    /// Send a request (and start reading a new response).
    async fn request(&mut self, method: &str, path: &str, body: Option<&serde_json::Value>) {
        let host = self.sock.peer_addr().unwrap();
        let mut req = format!("{method} {path} HTTP/1.1\r\nhost: {host}\r\n");
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        if !body.is_empty() {
            req.push_str(&format!(
                "content-type: application/json\r\ncontent-length: {}\r\n",
                body.len()
            ));
        }
        req.push_str("\r\n");
        req.push_str(&body);
        self.raw.drain(..self.pos);
        self.pos = 0;
        self.length = None;
        self.seen = Seen::default();
        self.sock.write_all(req.as_bytes()).await.unwrap();
    }

    /// Whether sending another request on this connection works (it may have been closed).
    async fn try_request(&mut self, path: &str) -> bool {
        let host = self.sock.peer_addr().unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nhost: {host}\r\n\r\n");
        self.raw.drain(..self.pos);
        self.pos = 0;
        self.length = None;
        self.seen = Seen::default();
        self.sock.write_all(req.as_bytes()).await.is_ok()
    }

    /// Read until `until` holds, the response is over, or `limit` passes.
    async fn read_until(&mut self, limit: Duration, until: impl Fn(&Seen) -> bool) {
        let deadline = tokio::time::Instant::now() + limit;
        let mut chunk = vec![0u8; 64 * 1024];
        while !until(&self.seen) && !self.seen.over() {
            match tokio::time::timeout_at(deadline, self.sock.read(&mut chunk)).await {
                Err(_) => return,
                Ok(Ok(0)) | Ok(Err(_)) => self.seen.closed = true,
                Ok(Ok(n)) => {
                    self.raw.extend_from_slice(&chunk[..n]);
                    self.parse();
                }
            }
        }
    }

    /// Read until the response is over (or `limit` passes).
    async fn read_to_end(&mut self, limit: Duration) {
        self.read_until(limit, |_| false).await
    }

    fn parse(&mut self) {
        let s = &mut self.seen;
        if s.status.is_none() {
            let Some(end) = find(&self.raw[self.pos..], b"\r\n\r\n") else {
                return;
            };
            s.head = String::from_utf8_lossy(&self.raw[..end]).to_lowercase();
            s.status = s.head.split(' ').nth(1).and_then(|c| c.parse().ok());
            self.length = s
                .head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse().unwrap());
            self.pos = end + 4;
        }
        if let Some(n) = self.length {
            let have = self.raw.len() - self.pos;
            let take = have.min(n - s.body.len());
            s.body
                .extend_from_slice(&self.raw[self.pos..self.pos + take]);
            self.pos += take;
            s.complete = s.body.len() == n;
            return;
        }
        // Chunked: `size\r\n data \r\n` ... `0\r\n\r\n`.
        while !s.terminated && s.corrupt.is_none() {
            let rest = &self.raw[self.pos..];
            let Some(eol) = find(rest, b"\r\n") else {
                return;
            };
            let size_text = String::from_utf8_lossy(&rest[..eol]).into_owned();
            let Ok(size) = usize::from_str_radix(size_text.trim(), 16) else {
                s.corrupt = Some(format!("bad chunk size line {size_text:?}"));
                return;
            };
            if rest.len() < eol + 2 + size + 2 {
                return;
            }
            if &rest[eol + 2 + size..eol + 4 + size] != b"\r\n" {
                s.corrupt = Some(format!("chunk of {size} bytes not followed by CRLF"));
                return;
            }
            s.body.extend_from_slice(&rest[eol + 2..eol + 2 + size]);
            self.pos += eol + 4 + size;
            s.terminated = size == 0;
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A gateway in front of `upstream` (auth disabled) with `server_extra` in `[server]` and
/// `extra` (whole sections) appended.
fn gateway_server(upstream: &str, server_extra: &str, extra: &str) -> Gateway {
    gateway_conf(upstream, server_extra, "", "mode = \"disabled\"\n", extra)
}

fn addr_of(gw: &Gateway) -> String {
    gw.base.trim_start_matches("http://").to_string()
}

/// Wait until the gateway's metrics contain `line`.
async fn wait_metric(gw: &Gateway, line: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let m = gw.metrics().await;
        if m.contains(line) {
            return;
        }
        assert!(Instant::now() < deadline, "never saw `{line}`:\n{m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What became of a request sent while the gateway drains: it must not be served as usual.
#[derive(Debug, PartialEq)]
enum Refused {
    /// The connection was refused (the listener is closed).
    NotAccepted,
    /// The connection was closed without an answer.
    NoAnswer,
    /// `503 shutting_down`, closing the connection.
    ShuttingDown,
}

fn refused(seen: &Seen) -> Refused {
    match seen.status {
        None => {
            assert!(
                seen.closed,
                "no answer and the connection stays open: {seen:?}"
            );
            Refused::NoAnswer
        }
        Some(503) => {
            let v: serde_json::Value = serde_json::from_slice(&seen.body).unwrap();
            assert_eq!(v["error"]["code"], "shutting_down", "{v}");
            assert!(seen.head.contains("retry-after:"), "{}", seen.head);
            assert!(seen.head.contains("connection: close"), "{}", seen.head);
            Refused::ShuttingDown
        }
        Some(other) => panic!("a request during the drain was served: {other} {seen:?}"),
    }
}

#[tokio::test]
async fn sigterm_cuts_open_streams_at_the_end_of_the_grace_period_and_refuses_new_requests() {
    let mock = mock_agent();
    // grace_period 3s: streams are cut 2.75 s after SIGTERM; the process is gone 3 s after it
    // (plus graceful_shutdown_timeout at most).
    let mut gw = gateway_server(
        &mock.addrs[0],
        "grace_period = \"3s\"\ngraceful_shutdown_timeout = \"2s\"\n",
        "[stream]\nkeepalive_interval = \"200ms\"\n",
    );
    let addr = addr_of(&gw);

    // A stream whose run will not end before the process does.
    let mut open = Raw::connect(&addr, false).await.unwrap();
    open.request(
        "POST",
        "/api/invokeAgent",
        Some(&invoke_body(json!(1), "scenario:hang", None)),
    )
    .await;
    open.read_until(Duration::from_secs(10), |s| {
        String::from_utf8_lossy(&s.body).contains("text-delta")
    })
    .await;
    assert_eq!(open.seen.status, Some(200), "{:?}", open.seen);
    let thread = open
        .seen
        .head
        .lines()
        .find_map(|l| l.strip_prefix("x-thread-id:"))
        .unwrap()
        .trim()
        .to_string();

    // A keep-alive connection that answered one request and waits for the next.
    let mut idle = Raw::connect(&addr, false).await.unwrap();
    idle.request(
        "GET",
        &format!("/api/getConversation?threadId={thread}"),
        None,
    )
    .await;
    idle.read_to_end(Duration::from_secs(10)).await;
    assert_eq!(idle.seen.status, Some(200));
    assert!(idle.seen.complete && !idle.seen.closed);

    // A stream whose run ends (in about 1.2 s) within the grace period.
    let mut ending = Raw::connect(&addr, false).await.unwrap();
    ending
        .request(
            "POST",
            "/api/invokeAgent",
            Some(&invoke_body(
                json!(1),
                "scenario:slow tokens=12 delay_ms=100",
                None,
            )),
        )
        .await;
    ending
        .read_until(Duration::from_secs(10), |s| s.status.is_some())
        .await;
    assert_eq!(ending.seen.status, Some(200));

    let t0 = Instant::now();
    gw.proc.terminate();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // During the drain, no new request is served: not on a new connection...
    let fresh = match Raw::connect(&addr, false).await {
        Err(_) => Refused::NotAccepted,
        Ok(mut fresh) => {
            fresh
                .request(
                    "GET",
                    &format!("/api/getConversation?threadId={thread}"),
                    None,
                )
                .await;
            fresh.read_to_end(Duration::from_secs(2)).await;
            refused(&fresh.seen)
        }
    };
    // ...nor on a kept-alive one.
    let reused = if idle
        .try_request(&format!("/api/getConversation?threadId={thread}"))
        .await
    {
        idle.read_to_end(Duration::from_secs(2)).await;
        refused(&idle.seen)
    } else {
        Refused::NoAnswer
    };
    eprintln!("during the drain: new connection {fresh:?}, kept-alive connection {reused:?}");

    // The run that ends within the grace period ends its stream cleanly.
    ending.read_to_end(Duration::from_secs(10)).await;
    let text = ending.seen.text();
    assert!(ending.seen.terminated, "not a clean end: {:?}", ending.seen);
    assert_eq!(ending.seen.corrupt, None);
    assert!(text.contains("\"type\":\"finish\""), "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(
        t0.elapsed() < Duration::from_millis(2700),
        "ended by the cut?"
    );

    // The other stream stays open through the grace period (keep-alives go on), then is cut:
    // the connection closes with no chunked terminator, no `finish`, no `[DONE]`.
    let before = open.seen.body.len();
    open.read_to_end(Duration::from_secs(10)).await;
    let cut_at = t0.elapsed();
    let text = open.seen.text();
    assert!(!open.seen.terminated, "the stream ended cleanly: {text}");
    assert_eq!(open.seen.corrupt, None);
    assert!(open.seen.closed, "never closed: {:?}", open.seen);
    assert!(!text.contains("\"type\":\"finish\""), "{text}");
    assert!(!text.contains("[DONE]"), "{text}");
    assert!(
        String::from_utf8_lossy(&open.seen.body[before..]).contains(": keep-alive"),
        "the stream went quiet during the drain: {text}"
    );
    assert!(
        cut_at > Duration::from_secs(2) && cut_at < Duration::from_secs(5),
        "cut after {cut_at:?}, not at the end of the grace period"
    );

    let exited = tokio::task::spawn_blocking(move || gw.proc.wait_exit(Duration::from_secs(15)))
        .await
        .unwrap();
    assert!(exited, "gateway did not exit after SIGTERM");
}

#[tokio::test]
async fn a_stuck_reader_is_cut_without_a_clean_end_and_the_connection_closed() {
    let mock = mock_agent();
    let gw = gateway_server(
        &mock.addrs[0],
        "",
        "[stream]\nstuck_reader_timeout = \"1s\"\n",
    );
    let (thread, _) = gw.start("scenario:long events=60000", None).await;
    gw.wait_terminal(&thread).await;
    // A client that asks for the whole run and then reads nothing.
    let mut stuck = Raw::connect(&addr_of(&gw), true).await.unwrap();
    stuck
        .request(
            "GET",
            &format!("/api/threads/{thread}/stream?afterSeq=0"),
            None,
        )
        .await;
    let t0 = Instant::now();
    wait_metric(&gw, "sluice_stuck_readers_total 1", Duration::from_secs(15)).await;
    wait_metric(&gw, "sluice_sse_streams_active 0", Duration::from_secs(5)).await;
    // Reading now drains what was sent before the cut, then the connection ends: no terminator
    // (the old behaviour wrote one after a half-written chunk and kept the connection open).
    stuck.read_to_end(Duration::from_secs(20)).await;
    let text = stuck.seen.text();
    assert_eq!(stuck.seen.status, Some(200));
    assert!(!stuck.seen.terminated, "a cut stream ended cleanly");
    assert_eq!(
        stuck.seen.corrupt, None,
        "a chunk cut short, then more framing"
    );
    assert!(stuck.seen.closed, "connection still open after the cut");
    assert!(!text.contains("[DONE]") && !text.contains("\"type\":\"finish\""));
    assert!(t0.elapsed() < Duration::from_secs(30));
}

#[tokio::test]
async fn a_run_evicted_while_it_is_replayed_cuts_the_stream() {
    let mock = mock_agent();
    // The reader pauses well within the stuck timeout; the run's retention ends meanwhile.
    let gw = gateway_server(
        &mock.addrs[0],
        "",
        "[store]\nretention = \"300ms\"\n[stream]\nstuck_reader_timeout = \"30s\"\n",
    );
    let (thread, _) = gw.start("scenario:long events=60000", None).await;
    // Reads the run from its start, a little, then pauses (buffers full, the gateway's write
    // waits) until the run is evicted.
    let mut slow = Raw::connect(&addr_of(&gw), true).await.unwrap();
    slow.request(
        "GET",
        &format!("/api/threads/{thread}/stream?afterSeq=0"),
        None,
    )
    .await;
    slow.read_until(Duration::from_secs(10), |s| s.body.len() > 1000)
        .await;
    assert_eq!(slow.seen.status, Some(200), "{:?}", slow.seen);
    assert!(!slow.seen.over());
    gw.wait_terminal(&thread).await;
    wait_metric(
        &gw,
        "sluice_store_evictions_total{reason=\"retention\"} 1",
        Duration::from_secs(10),
    )
    .await;
    // Reading on: the events sent before the eviction, then a cut, never a clean end.
    slow.read_to_end(Duration::from_secs(20)).await;
    let text = slow.seen.text();
    assert!(!slow.seen.terminated, "an evicted replay ended cleanly");
    assert_eq!(slow.seen.corrupt, None);
    assert!(slow.seen.closed, "connection still open");
    assert!(!text.contains("[DONE]") && !text.contains("\"type\":\"finish\""));
    // The reader was indeed behind when the run went.
    let (events, _) = parse_sse(&text);
    assert!(events.len() > 10, "{}", events.len());
    assert!(
        events.len() < 60000,
        "the whole run was delivered before eviction"
    );
}

/// A request over a fake exchange, recording the answer.
struct Fake {
    method: &'static str,
    path: String,
    query: Option<String>,
    reply: Option<sluice::api::Reply>,
}

#[async_trait::async_trait]
impl sluice::api::Exchange for Fake {
    fn method(&self) -> &str {
        self.method
    }
    fn path(&self) -> &str {
        &self.path
    }
    fn query(&self) -> Option<&str> {
        self.query.as_deref()
    }
    fn header(&self, _name: &str) -> Option<&str> {
        None
    }
    async fn read_body(&mut self, _limit: usize) -> Result<bytes::Bytes, sluice::api::ApiError> {
        Ok(bytes::Bytes::new())
    }
    async fn respond(&mut self, reply: sluice::api::Reply) -> Result<(), sluice::api::Gone> {
        self.reply = Some(reply);
        Ok(())
    }
    async fn start_stream(
        &mut self,
        _status: u16,
        _headers: Vec<(&'static str, String)>,
    ) -> Result<(), sluice::api::Gone> {
        panic!("no stream expected")
    }
    async fn send(&mut self, _data: bytes::Bytes) -> Result<(), sluice::api::Gone> {
        Ok(())
    }
    async fn end_stream(&mut self) -> Result<(), sluice::api::Gone> {
        Ok(())
    }
    async fn closed(&mut self) {
        std::future::pending().await
    }
    fn status_sent(&self) -> Option<u16> {
        self.reply.as_ref().map(|r| r.status)
    }
    fn add_headers(&mut self, _headers: Vec<(&'static str, String)>) {}
    fn abort(&mut self) {}
    fn aborted(&self) -> bool {
        false
    }
}

/// Over TCP, Pingora closes its listeners and idle connections at SIGTERM, so a new request
/// seldom reaches the API while it drains (the first test sees both refusals); one that does
/// (read just as the drain starts) gets `503 shutting_down` with `Retry-After`, closing the
/// connection. In process, with the API's own drain signal.
#[tokio::test]
async fn a_draining_api_answers_new_requests_503_shutting_down() {
    use std::sync::Arc;

    use sluice::store::memory::{MemoryLimits, MemoryStore};
    let config = sluice::config::Config::parse(
        "[server]\ngrace_period = \"7s\"\n[upstream]\nurls = [\"http://127.0.0.1:9\"]\n\
         [auth]\nmode = \"disabled\"\n",
    )
    .unwrap();
    let config = Arc::new(config);
    let store: Arc<dyn sluice::store::Store> = Arc::new(MemoryStore::new(MemoryLimits {
        max_events_per_run: 1000,
        max_bytes_per_run: 1 << 20,
        max_total_bytes: 1 << 24,
        retention: Duration::from_secs(60),
        thread_retention: Duration::from_secs(60),
        retry_after: Duration::from_secs(1),
        quotas: sluice::store::budget::Quotas::unlimited(),
    }));
    let adapter = Arc::new(sluice::ingest::route::Routes::from_config(&config));
    let (draining_tx, draining) = tokio::sync::watch::channel(false);
    let (_cut_tx, cut) = tokio::sync::watch::channel(false);
    let api = sluice::api::Api {
        config: config.clone(),
        store: store.clone(),
        ingest: sluice::ingest::Ingestor::new(store, adapter, Duration::from_secs(60)),
        shutdown: draining,
        cut,
        auth: sluice::auth::Authenticator::from_config(&config.auth),
        views: Default::default(),
        gates: sluice::api::quota::Gates::new(config.limits.quotas()),
        bodies: sluice::api::quota::Bodies::new(config.limits.max_body_bytes_in_flight),
        page: None,
        cors: Default::default(),
    };
    let ask = || Fake {
        method: "GET",
        path: "/api/getConversation".into(),
        query: Some("threadId=nope".into()),
        reply: None,
    };
    // Before the drain: served (no such thread).
    let mut ex = ask();
    api.handle(&mut ex).await;
    assert_eq!(ex.reply.unwrap().status, 404);
    // Once it started: refused, whatever the route.
    draining_tx.send_replace(true);
    for (method, path) in [
        ("GET", "/api/getConversation"),
        ("POST", "/api/invokeAgent"),
        ("GET", "/api/threads/t/stream"),
    ] {
        let mut ex = ask();
        ex.method = method;
        ex.path = path.into();
        api.handle(&mut ex).await;
        let reply = ex.reply.expect("answered");
        assert_eq!(reply.status, 503, "{method} {path}");
        let v: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(v["error"]["code"], "shutting_down");
        assert!(reply.headers.contains(&("retry-after", "7".into())));
        assert!(reply.close, "the connection is not kept alive");
    }
}

/// Not only streams: any answer to a client that stops reading is bounded by
/// `stream.stuck_reader_timeout`. Here a 12 MB snapshot to a client that reads nothing for
/// several seconds: the gateway gives up, closes the connection, and the client finds the
/// answer cut short.
#[tokio::test]
async fn a_client_that_never_reads_a_large_answer_is_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mock = mock_agent();
    let gw = gateway_conf(
        &mock.addrs[0],
        "",
        "max_event_bytes = 16777216\n",
        "mode = \"disabled\"\n",
        "[stream]\nstuck_reader_timeout = \"1s\"\n",
    );
    let (thread, _) = gw.start("scenario:oversize bytes=12000000", None).await;
    let done = gw.wait_terminal(&thread).await;
    assert_eq!(done["streamStatus"], "completed", "{done}");

    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut tcp = socket.connect(addr_of(&gw).parse().unwrap()).await.unwrap();
    tcp.write_all(
        format!("GET /api/getConversation?threadId={thread} HTTP/1.1\r\nhost: x\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    // Read nothing for well over the timeout.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    let read_all = async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read_all)
        .await
        .expect("the connection was closed");
    let head_end = find(&got, b"\r\n\r\n").expect("a response head") + 4;
    let head = String::from_utf8_lossy(&got[..head_end]).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .and_then(|v| v.trim().parse().ok())
        .expect("content-length");
    assert!(length > 12_000_000, "{length}");
    assert!(
        got.len() - head_end < length,
        "the whole answer was delivered to a client that did not read ({} bytes)",
        got.len() - head_end
    );
}
