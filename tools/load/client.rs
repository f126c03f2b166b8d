//! The load client: a raw tokio HTTP/1.1 client (request writing, response heads, chunked and
//! `content-length` bodies, keep-alive) and an SSE reader that, per event, parses only the `id:`
//! line and the `"ts":` number in the `data:` line, records latency (receive time − `ts`) and
//! checks ids (1..=N exactly once, in order). The same code drives every target.

use std::io;
use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use memchr::memmem;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::measure::{wall_ns, Histogram};

/// Largest response head accepted.
const MAX_HEAD: usize = 64 * 1024;

/// A response head.
#[derive(Debug, Default)]
pub struct Head {
    /// Status code.
    pub status: u16,
    /// `transfer-encoding: chunked`.
    pub chunked: bool,
    /// `content-length`.
    pub content_length: Option<usize>,
    /// `x-thread-id` (Sluice).
    pub thread_id: Option<String>,
    /// `connection: close`.
    pub close: bool,
}

/// How reading a body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyEnd {
    /// The whole body arrived (chunked terminator, or `content-length` bytes).
    Complete,
    /// The caller stopped reading.
    Stopped,
    /// The connection closed (or was reset) first.
    Eof,
    /// Nothing arrived for the idle timeout.
    Timeout,
    /// The framing was broken.
    Malformed,
}

/// One client connection with its read buffer.
pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    pos: usize,
    end: usize,
    /// Longest silence tolerated while reading.
    pub idle: Duration,
}

/// Build a request.
pub fn request(
    method: &str,
    path: &str,
    host: &str,
    auth: Option<&str>,
    extra: &[(&str, &str)],
    body: &[u8],
) -> Vec<u8> {
    let mut r = Vec::with_capacity(256 + body.len() + auth.map_or(0, str::len));
    r.extend_from_slice(format!("{method} {path} HTTP/1.1\r\nhost: {host}\r\n").as_bytes());
    if let Some(token) = auth {
        r.extend_from_slice(format!("authorization: Bearer {token}\r\n").as_bytes());
    }
    for (k, v) in extra {
        r.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
    }
    if method == "POST" {
        r.extend_from_slice(
            format!(
                "content-type: application/json\r\ncontent-length: {}\r\n",
                body.len()
            )
            .as_bytes(),
        );
    }
    r.extend_from_slice(b"\r\n");
    r.extend_from_slice(body);
    r
}

impl Conn {
    /// Connect (no Nagle).
    pub async fn connect(addr: SocketAddr, idle: Duration) -> io::Result<Conn> {
        let stream = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            buf: vec![0; 64 * 1024],
            pos: 0,
            end: 0,
            idle,
        })
    }

    /// Write a whole request.
    pub async fn send(&mut self, req: &[u8]) -> io::Result<()> {
        self.stream.write_all(req).await
    }

    /// Read more bytes into the buffer; `Ok(0)` at end of stream.
    async fn fill(&mut self) -> io::Result<usize> {
        if self.pos == self.end {
            self.pos = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            if self.pos == 0 {
                let n = self.buf.len();
                self.buf.resize(n * 2, 0);
            } else {
                self.buf.copy_within(self.pos..self.end, 0);
                self.end -= self.pos;
                self.pos = 0;
            }
        }
        match tokio::time::timeout(self.idle, self.stream.read(&mut self.buf[self.end..])).await {
            Ok(Ok(n)) => {
                self.end += n;
                Ok(n)
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "read timed out")),
        }
    }

    /// Read a response head.
    pub async fn read_head(&mut self) -> io::Result<Head> {
        loop {
            if let Some(i) = memmem::find(&self.buf[self.pos..self.end], b"\r\n\r\n") {
                let head = parse_head(&self.buf[self.pos..self.pos + i])?;
                self.pos += i + 4;
                return Ok(head);
            }
            if self.end - self.pos > MAX_HEAD {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "head too large"));
            }
            if self.fill().await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed before the response head",
                ));
            }
        }
    }

    /// Read a body, handing its bytes to `sink` as they come; `sink` may stop early.
    pub async fn read_body(
        &mut self,
        head: &Head,
        mut sink: impl FnMut(&[u8]) -> ControlFlow<()>,
    ) -> BodyEnd {
        if head.status == 204 || head.status == 304 {
            return BodyEnd::Complete;
        }
        if head.chunked {
            return self.read_chunked(&mut sink).await;
        }
        let mut left = head.content_length.unwrap_or(usize::MAX);
        loop {
            let n = (self.end - self.pos).min(left);
            if n > 0 {
                let flow = sink(&self.buf[self.pos..self.pos + n]);
                self.pos += n;
                left -= n;
                if flow.is_break() {
                    return BodyEnd::Stopped;
                }
            }
            if left == 0 {
                return BodyEnd::Complete;
            }
            match self.fill().await {
                Ok(0) if head.content_length.is_none() => return BodyEnd::Complete,
                Ok(0) => return BodyEnd::Eof,
                Ok(_) => {}
                Err(e) => return io_end(&e),
            }
        }
    }

    async fn read_chunked(&mut self, sink: &mut impl FnMut(&[u8]) -> ControlFlow<()>) -> BodyEnd {
        enum St {
            Size,
            Data(usize),
            DataEnd,
            Trailer,
        }
        let mut st = St::Size;
        loop {
            let avail = &self.buf[self.pos..self.end];
            let progressed = match st {
                St::Size | St::DataEnd | St::Trailer => match memchr::memchr(b'\n', avail) {
                    None if avail.len() > 4096 => return BodyEnd::Malformed,
                    None => false,
                    Some(nl) => {
                        let line = trim_cr(&avail[..nl]);
                        st = match st {
                            St::Size => {
                                let hex = line.split(|b| *b == b';').next().unwrap_or(&[]);
                                match parse_hex(hex) {
                                    Some(0) => St::Trailer,
                                    Some(n) => St::Data(n),
                                    None => return BodyEnd::Malformed,
                                }
                            }
                            St::DataEnd if line.is_empty() => St::Size,
                            St::DataEnd => return BodyEnd::Malformed,
                            St::Trailer if line.is_empty() => {
                                self.pos += nl + 1;
                                return BodyEnd::Complete;
                            }
                            _ => St::Trailer,
                        };
                        self.pos += nl + 1;
                        true
                    }
                },
                St::Data(left) => {
                    if avail.is_empty() {
                        false
                    } else {
                        let n = avail.len().min(left);
                        let flow = sink(&avail[..n]);
                        self.pos += n;
                        st = if n == left {
                            St::DataEnd
                        } else {
                            St::Data(left - n)
                        };
                        if flow.is_break() {
                            return BodyEnd::Stopped;
                        }
                        true
                    }
                }
            };
            if !progressed {
                match self.fill().await {
                    Ok(0) => return BodyEnd::Eof,
                    Ok(_) => {}
                    Err(e) => return io_end(&e),
                }
            }
        }
    }

    /// Read a whole body and return its length (keep-alive requests).
    pub async fn drain_body(&mut self, head: &Head) -> (BodyEnd, usize) {
        let mut n = 0;
        let end = self
            .read_body(head, |b| {
                n += b.len();
                ControlFlow::Continue(())
            })
            .await;
        (end, n)
    }
}

fn io_end(e: &io::Error) -> BodyEnd {
    if e.kind() == io::ErrorKind::TimedOut {
        BodyEnd::Timeout
    } else {
        BodyEnd::Eof
    }
}

fn trim_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn parse_hex(s: &[u8]) -> Option<usize> {
    let s = s.trim_ascii();
    if s.is_empty() || s.len() > 12 {
        return None;
    }
    let mut v = 0usize;
    for b in s {
        v = v * 16 + (*b as char).to_digit(16)? as usize;
    }
    Some(v)
}

fn parse_head(head: &[u8]) -> io::Result<Head> {
    let text = std::str::from_utf8(head)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "head is not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad status line"))?;
    let mut h = Head {
        status,
        ..Head::default()
    };
    for line in lines {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let v = v.trim();
        if k.eq_ignore_ascii_case("transfer-encoding") {
            h.chunked = v.to_ascii_lowercase().contains("chunked");
        } else if k.eq_ignore_ascii_case("content-length") {
            h.content_length = v.parse().ok();
        } else if k.eq_ignore_ascii_case("x-thread-id") {
            h.thread_id = Some(v.to_string());
        } else if k.eq_ignore_ascii_case("connection") {
            h.close = v.eq_ignore_ascii_case("close");
        }
    }
    Ok(h)
}

/// A minimal SSE parser: per event, the numeric `id:` and the `"ts":` of the `data:` line.
#[derive(Default)]
pub struct Sse {
    carry: Vec<u8>,
    id: Option<u64>,
    id_bad: bool,
    data: bool,
    ts: Option<u64>,
}

/// One parsed SSE event.
#[derive(Clone, Copy, Debug)]
pub struct SseEvent {
    /// Its `id:`, when numeric.
    pub id: Option<u64>,
    /// Its `ts` (ns since the epoch), when found.
    pub ts: Option<u64>,
}

impl Sse {
    /// Feed body bytes; `on_event` is called for each complete event with data and may stop.
    pub fn feed(
        &mut self,
        mut data: &[u8],
        on_event: &mut impl FnMut(SseEvent) -> ControlFlow<()>,
    ) -> ControlFlow<()> {
        while let Some(nl) = memchr::memchr(b'\n', data) {
            let flow = if self.carry.is_empty() {
                self.line(trim_cr(&data[..nl]), on_event)
            } else {
                let mut line = std::mem::take(&mut self.carry);
                line.extend_from_slice(&data[..nl]);
                let flow = self.line(trim_cr(&line), on_event);
                line.clear();
                self.carry = line;
                flow
            };
            data = &data[nl + 1..];
            if flow.is_break() {
                return flow;
            }
        }
        self.carry.extend_from_slice(data);
        ControlFlow::Continue(())
    }

    fn line(
        &mut self,
        line: &[u8],
        on_event: &mut impl FnMut(SseEvent) -> ControlFlow<()>,
    ) -> ControlFlow<()> {
        if line.is_empty() {
            let ev = SseEvent {
                id: if self.id_bad { None } else { self.id },
                ts: self.ts,
            };
            let had = self.data;
            (self.id, self.id_bad, self.data, self.ts) = (None, false, false, None);
            if had {
                return on_event(ev);
            }
        } else if let Some(v) = line.strip_prefix(b"id:") {
            let v = v.strip_prefix(b" ").unwrap_or(v);
            match std::str::from_utf8(v).ok().and_then(|s| s.parse().ok()) {
                Some(id) => self.id = Some(id),
                None => self.id_bad = true,
            }
        } else if line.starts_with(b"data:") {
            self.data = true;
            if let Some(i) = memmem::find(line, b"\"ts\":") {
                let digits = &line[i + 5..];
                let mut v = 0u64;
                let mut any = false;
                for b in digits.iter().take_while(|b| b.is_ascii_digit()) {
                    v = v * 10 + u64::from(b - b'0');
                    any = true;
                }
                if any {
                    self.ts = Some(v);
                }
            }
        }
        ControlFlow::Continue(())
    }
}

/// What one stream (with its reconnections) saw.
#[derive(Debug, Default, Clone)]
pub struct StreamOutcome {
    /// Events received (duplicates included).
    pub events: u64,
    /// Ids missing (skipped, or never received before the end).
    pub gaps: u64,
    /// Ids received again (or out of order).
    pub dups: u64,
    /// Events without a numeric id.
    pub no_id: u64,
    /// The last response ended with a chunked terminator after id N.
    pub clean: bool,
    /// Reconnections made.
    pub reconnects: u64,
    /// What went wrong, if anything (`status 503`, `eof`, `timeout`, …).
    pub error: Option<String>,
    /// `x-thread-id` of the first response.
    pub thread_id: Option<String>,
    /// The last id seen.
    pub last_id: u64,
}

/// One streamed run: how to request it and what to expect.
#[derive(Clone)]
pub struct StreamSpec {
    /// Target address.
    pub addr: SocketAddr,
    /// Request path (`/agents/bench/run`).
    pub path: Arc<str>,
    /// Bearer token.
    pub auth: Option<Arc<str>>,
    /// JSON body (same on every reconnection).
    pub body: Arc<[u8]>,
    /// Events the run has (ids 1..=N).
    pub expected: u64,
    /// Reconnect (with `Last-Event-ID`) after this many events per connection; 0: never.
    pub reconnect_every: u64,
    /// Longest silence tolerated.
    pub idle: Duration,
}

/// Stream a run to its end (reconnecting as asked), recording each event's latency in `hist`.
pub async fn run_stream(spec: &StreamSpec, hist: Option<&Histogram>) -> StreamOutcome {
    let mut out = StreamOutcome::default();
    let host = spec.addr.to_string();
    loop {
        let last = out.last_id.to_string();
        let extra: Vec<(&str, &str)> = if out.last_id > 0 {
            vec![("accept", "text/event-stream"), ("last-event-id", &last)]
        } else {
            vec![("accept", "text/event-stream")]
        };
        let req = request(
            "POST",
            &spec.path,
            &host,
            spec.auth.as_deref(),
            &extra,
            &spec.body,
        );
        let mut conn = match Conn::connect(spec.addr, spec.idle).await {
            Ok(c) => c,
            Err(e) => {
                out.error = Some(format!("connect: {}", e.kind()));
                break;
            }
        };
        if let Err(e) = conn.send(&req).await {
            out.error = Some(format!("write: {}", e.kind()));
            break;
        }
        let head = match conn.read_head().await {
            Ok(h) => h,
            Err(e) => {
                out.error = Some(format!("head: {}", e.kind()));
                break;
            }
        };
        if head.status != 200 {
            out.error = Some(format!("status {}", head.status));
            break;
        }
        if out.thread_id.is_none() {
            out.thread_id = head.thread_id.clone();
        }
        let mut sse = Sse::default();
        let mut in_conn = 0u64;
        let every = spec.reconnect_every;
        let expected = spec.expected;
        let o = &mut out;
        let mut on_event = |ev: SseEvent| {
            o.events += 1;
            in_conn += 1;
            if let Some(ts) = ev.ts {
                if let Some(h) = hist {
                    h.record(wall_ns().saturating_sub(ts));
                }
            }
            match ev.id {
                None => o.no_id += 1,
                Some(id) if id == o.last_id + 1 => o.last_id = id,
                Some(id) if id <= o.last_id => o.dups += 1,
                Some(id) => {
                    o.gaps += id - o.last_id - 1;
                    o.last_id = id;
                }
            }
            if every > 0 && in_conn >= every && o.last_id < expected {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        };
        let end = conn
            .read_body(&head, |bytes| sse.feed(bytes, &mut on_event))
            .await;
        match end {
            BodyEnd::Stopped => {
                out.reconnects += 1;
                drop(conn);
                continue;
            }
            BodyEnd::Complete => {
                out.clean = true;
            }
            BodyEnd::Eof => out.error = Some("cut (no terminator)".into()),
            BodyEnd::Timeout => out.error = Some("idle timeout".into()),
            BodyEnd::Malformed => out.error = Some("malformed chunking".into()),
        }
        break;
    }
    if out.last_id < spec.expected {
        out.gaps += spec.expected - out.last_id;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_ids_and_ts() {
        let mut sse = Sse::default();
        let mut got = Vec::new();
        let text = b"retry: 2000\n\nid: 1\ndata: {\"type\":\"start\",\"ts\":123}\n\n: keep-alive\n\nid: 2\ndata: {\"ts\":45";
        let mut f = |e: SseEvent| {
            got.push((e.id, e.ts));
            ControlFlow::Continue(())
        };
        let _ = sse.feed(&text[..20], &mut f);
        let _ = sse.feed(&text[20..], &mut f);
        let _ = sse.feed(b"6}\n\n", &mut f);
        assert_eq!(got, vec![(Some(1), Some(123)), (Some(2), Some(456))]);
    }

    /// Serve one canned answer to one connection; the address to connect to.
    async fn canned(answer: &'static str) -> SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let _ = s.write_all(answer.as_bytes()).await;
        });
        addr
    }

    fn spec(addr: SocketAddr, expected: u64) -> StreamSpec {
        StreamSpec {
            addr,
            path: "/agents/a/run".into(),
            auth: None,
            body: b"{}".to_vec().into(),
            expected,
            reconnect_every: 0,
            idle: Duration::from_secs(5),
        }
    }

    fn chunk(s: &str) -> String {
        format!("{:x}\r\n{s}\r\n", s.len())
    }

    #[tokio::test]
    async fn streams_are_checked_for_gaps_duplicates_and_a_clean_end() {
        let mut body = String::from("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n");
        for id in [1, 2, 2, 4] {
            body.push_str(&chunk(&format!("id: {id}\ndata: {{\"ts\":1}}\n\n")));
        }
        body.push_str("0\r\n\r\n");
        let addr = canned(Box::leak(body.into_boxed_str())).await;
        let o = run_stream(&spec(addr, 5), None).await;
        assert_eq!((o.events, o.gaps, o.dups, o.clean), (4, 2, 1, true));

        let cut = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n7\r\nid: 1\n\n\r\n";
        let o = run_stream(&spec(canned(cut).await, 2), None).await;
        assert!(!o.clean);
        assert_eq!(o.error.as_deref(), Some("cut (no terminator)"));
        assert_eq!(o.gaps, 2);

        let refused = "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n";
        let o = run_stream(&spec(canned(refused).await, 2), None).await;
        assert_eq!(o.error.as_deref(), Some("status 503"));
    }

    #[test]
    fn heads_parse() {
        let h = parse_head(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Thread-ID: t1\r\nConnection: close",
        )
        .unwrap();
        assert_eq!(h.status, 200);
        assert!(h.chunked && h.close);
        assert_eq!(h.thread_id.as_deref(), Some("t1"));
        assert_eq!(parse_hex(b"1a"), Some(26));
        assert_eq!(parse_hex(b"zz"), None);
    }
}
