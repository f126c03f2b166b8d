//! The generator backend (`load generator --listen ADDR`): a minimal keep-alive HTTP/1.1 server on
//! raw tokio, cheap enough never to be the bottleneck.
//!
//! - `POST /agents/{id}/run` with an AgentFlow body (`{message, message_id, conversation_id,
//!   stream, …}`): `200 text/event-stream`, chunked, one chunk per SSE event
//!   `id: n\ndata: {json}\n\n`: a root `start` (n = 1), `delta`s, a root `end` (n = N). Each
//!   payload carries `"ts"`: its send time in ns since the UNIX epoch. The message text says
//!   what to play: `gen events=N rate=R [quiet=1] [hold=S] [filler=progress [answer=A]]` (rate
//!   0: as fast as possible; `quiet=1`: the start event, then nothing until
//!   `POST /control/release`, the client leaves or `hold` seconds pass, then the rest at once;
//!   `filler=progress`: the visible answer is that of an `A`-event run (default 20: the start,
//!   A − 2 deltas, the end) and the other N − A events are `tool_progress` events of a nested
//!   call, all between the first half of the deltas and the second; see [`Frame`]).
//!   A run is keyed by `(conversation_id, message_id)` and its timeline (event n due at
//!   `t0 + (n − 1)/R`) is fixed by its first request: a request with `Last-Event-ID: k`
//!   continues after `k`, sending at once what is already due (stamped with its due time).
//! - `GET /api/getConversation?…[&wait=S][&size=B]`: a canned snapshot-shaped JSON body of `B`
//!   bytes (default: about what Sluice answers for a finished 20-event run), after holding `S`
//!   seconds (or until the client leaves).
//! - `POST /control/release`: ends every quiet run (sends its remaining events).
//! - `GET /healthz`.
//!
//! With `--watch-stdin` it exits when its stdin closes (the harness died).

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use memchr::memmem;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::measure::wall_ns;

/// The default canned snapshot size (about Sluice's answer for a finished 20-event run).
pub const DEFAULT_SNAPSHOT_BYTES: usize = 700;

/// Longest a quiet run stays quiet without a release.
const DEFAULT_HOLD_SECS: u64 = 600;

struct Timeline {
    t0: Instant,
    t0_wall: u64,
}

struct Shared {
    runs: Mutex<HashMap<String, Arc<Timeline>>>,
    release: watch::Sender<u64>,
    bodies: Mutex<HashMap<usize, Arc<Vec<u8>>>>,
}

/// Run the generator until the process is killed.
pub async fn serve(listen: &str, watch_stdin: bool) -> std::io::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "generator listening on http://{addr}")?;
        out.flush()?;
    }
    if watch_stdin {
        std::thread::spawn(|| {
            let mut sink = [0u8; 64];
            let mut stdin = std::io::stdin().lock();
            while matches!(std::io::Read::read(&mut stdin, &mut sink), Ok(n) if n > 0) {}
            std::process::exit(0);
        });
    }
    let (release, _) = watch::channel(0u64);
    let shared = Arc::new(Shared {
        runs: Mutex::new(HashMap::new()),
        release,
        bodies: Mutex::new(HashMap::new()),
    });
    loop {
        let (sock, _) = match listener.accept().await {
            Ok(s) => s,
            Err(_) => {
                // Out of descriptors, most likely: back off a little.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = sock.set_nodelay(true);
        let shared = shared.clone();
        tokio::spawn(async move {
            let _ = connection(sock, shared).await;
        });
    }
}

struct Request {
    method: String,
    target: String,
    last_event_id: Option<u64>,
    close: bool,
    body: Vec<u8>,
}

/// Read one request; `Ok(None)` when the client closed between requests.
async fn read_request(sock: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<Option<Request>> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    let head_end = loop {
        if let Some(i) = memmem::find(buf, b"\r\n\r\n") {
            break i;
        }
        if buf.len() > 64 * 1024 {
            return Err(bad("head too large"));
        }
        let mut tmp = [0u8; 8192];
        let n = sock.read(&mut tmp).await?;
        if n == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(bad("closed mid-head"))
            };
        }
        buf.extend_from_slice(&tmp[..n]);
    };
    let head = std::str::from_utf8(&buf[..head_end]).map_err(|_| bad("head not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or_default().split_whitespace();
    let method = first.next().unwrap_or_default().to_string();
    let target = first.next().unwrap_or_default().to_string();
    let (mut len, mut chunked, mut last_event_id, mut close) = (0usize, false, None, false);
    for line in lines {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let v = v.trim();
        if k.eq_ignore_ascii_case("content-length") {
            len = v.parse().map_err(|_| bad("bad content-length"))?;
        } else if k.eq_ignore_ascii_case("transfer-encoding") {
            chunked = v.to_ascii_lowercase().contains("chunked");
        } else if k.eq_ignore_ascii_case("last-event-id") {
            last_event_id = v.parse().ok();
        } else if k.eq_ignore_ascii_case("connection") {
            close = v.eq_ignore_ascii_case("close");
        }
    }
    buf.drain(..head_end + 4);
    let body = if chunked {
        read_chunked_body(sock, buf).await?
    } else {
        while buf.len() < len {
            let mut tmp = [0u8; 8192];
            let n = sock.read(&mut tmp).await?;
            if n == 0 {
                return Err(bad("closed mid-body"));
            }
            buf.extend_from_slice(&tmp[..n]);
        }
        buf.drain(..len).collect()
    };
    Ok(Some(Request {
        method,
        target,
        last_event_id,
        close,
        body,
    }))
}

async fn read_chunked_body(sock: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<Vec<u8>> {
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "bad chunked body");
    let mut body = Vec::new();
    loop {
        let nl = loop {
            if let Some(i) = memchr::memchr(b'\n', buf) {
                break i;
            }
            let mut tmp = [0u8; 8192];
            let n = sock.read(&mut tmp).await?;
            if n == 0 {
                return Err(bad());
            }
            buf.extend_from_slice(&tmp[..n]);
        };
        let line = String::from_utf8_lossy(&buf[..nl]).to_string();
        let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
            .map_err(|_| bad())?;
        buf.drain(..nl + 1);
        if size == 0 {
            // Trailers end with an empty line.
            loop {
                let nl = loop {
                    if let Some(i) = memchr::memchr(b'\n', buf) {
                        break i;
                    }
                    let mut tmp = [0u8; 1024];
                    let n = sock.read(&mut tmp).await?;
                    if n == 0 {
                        return Err(bad());
                    }
                    buf.extend_from_slice(&tmp[..n]);
                };
                let empty = buf[..nl].iter().all(|b| *b == b'\r');
                buf.drain(..nl + 1);
                if empty {
                    return Ok(body);
                }
            }
        }
        while buf.len() < size + 2 {
            let mut tmp = [0u8; 8192];
            let n = sock.read(&mut tmp).await?;
            if n == 0 {
                return Err(bad());
            }
            buf.extend_from_slice(&tmp[..n]);
        }
        body.extend_from_slice(&buf[..size]);
        buf.drain(..size + 2);
    }
}

async fn connection(mut sock: TcpStream, shared: Arc<Shared>) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(4096);
    while let Some(req) = read_request(&mut sock, &mut buf).await? {
        let (path, query) = req.target.split_once('?').unwrap_or((&req.target, ""));
        let keep = match (req.method.as_str(), path) {
            ("POST", p) if p.starts_with("/agents/") && p.ends_with("/run") => {
                run(&mut sock, &shared, &req).await?
            }
            ("GET", "/api/getConversation") => conversation(&mut sock, &shared, query).await?,
            ("POST", "/control/release") => {
                shared.release.send_modify(|n| *n += 1);
                respond(&mut sock, 200, "text/plain", b"released\n").await?;
                true
            }
            ("GET", "/healthz") => {
                respond(&mut sock, 200, "text/plain", b"ok\n").await?;
                true
            }
            _ => {
                respond(
                    &mut sock,
                    404,
                    "application/json",
                    b"{\"error\":\"not found\"}",
                )
                .await?;
                true
            }
        };
        if req.close || !keep {
            break;
        }
    }
    Ok(())
}

async fn respond(
    sock: &mut TcpStream,
    status: u16,
    ctype: &str,
    body: &[u8],
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        _ => "Not Found",
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    sock.write_all(&out).await
}

fn query_value<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

/// What a run plays, read from its message text.
struct Play {
    events: u64,
    rate: u64,
    quiet: bool,
    hold: u64,
    /// `filler=progress`: the events of the visible answer (`answer=A`, default 20); the rest
    /// of the run is `tool_progress` filler. `None`: every event but the first and last is a
    /// text delta.
    answer: Option<u64>,
}

fn play_of(message: &str) -> Play {
    let mut p = Play {
        events: 20,
        rate: 0,
        quiet: false,
        hold: DEFAULT_HOLD_SECS,
        answer: None,
    };
    let (mut filler, mut answer) = (false, 20);
    for word in message.split_whitespace() {
        if let Some((k, v)) = word.split_once('=') {
            if k == "filler" {
                filler = v == "progress";
                continue;
            }
            let v: u64 = v.parse().unwrap_or(0);
            match k {
                "events" => p.events = v.max(2),
                "rate" => p.rate = v,
                "quiet" => p.quiet = v != 0,
                "hold" => p.hold = v,
                "answer" => answer = v.max(2),
                _ => {}
            }
        }
    }
    if filler {
        p.answer = Some(answer.min(p.events));
    }
    p
}

/// What event `n` of a run is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Frame {
    /// The root `start` (event 1).
    Start,
    /// A root text delta (`"tok "`).
    Delta,
    /// The `k`-th filler event: `tool_progress` of the nested call `t1` (parent `root`),
    /// `{"progress":k}`. Sluice renders it as a transient `data-tool-progress` chunk, which a
    /// snapshot does not keep.
    Progress(u64),
    /// The root `end` (the last event).
    End,
}

impl Play {
    /// Event `n` (1-based). With filler, the answer's deltas are split in two halves (9 and 9
    /// for `answer=20`) and the `events − answer` filler events come between them.
    fn frame(&self, n: u64) -> Frame {
        if n <= 1 {
            return Frame::Start;
        }
        if n >= self.events {
            return Frame::End;
        }
        let Some(answer) = self.answer else {
            return Frame::Delta;
        };
        let first_half = answer.saturating_sub(2) / 2;
        let filler = self.events - answer;
        if n <= 1 + first_half {
            return Frame::Delta;
        }
        let k = n - 1 - first_half;
        if k > filler {
            Frame::Delta
        } else {
            Frame::Progress(k)
        }
    }
}

/// Append event `n` of the run as one chunk.
fn push_event(out: &mut Vec<u8>, n: u64, play: &Play, ts: u64) {
    let mut frame = Vec::with_capacity(128);
    let _ = match play.frame(n) {
        Frame::Start => write!(
            frame,
            "id: {n}\ndata: {{\"type\":\"start\",\"call_id\":\"root\",\"content\":{{\"name\":\"gen\"}},\"ts\":{ts}}}\n\n"
        ),
        Frame::End => write!(
            frame,
            "id: {n}\ndata: {{\"type\":\"end\",\"call_id\":\"root\",\"content\":{{}},\"ts\":{ts}}}\n\n"
        ),
        Frame::Delta => write!(
            frame,
            "id: {n}\ndata: {{\"type\":\"delta\",\"call_id\":\"root\",\"content\":\"tok \",\"ts\":{ts}}}\n\n"
        ),
        Frame::Progress(k) => write!(
            frame,
            "id: {n}\ndata: {{\"type\":\"tool_progress\",\"call_id\":\"t1\",\"parent_call_id\":\"root\",\"content\":{{\"progress\":{k}}},\"ts\":{ts}}}\n\n"
        ),
    };
    let _ = write!(out, "{:x}\r\n", frame.len());
    out.extend_from_slice(&frame);
    out.extend_from_slice(b"\r\n");
}

/// Wait until `until` passes or the client closes its side; `false` when the client left.
async fn hold(sock: &mut TcpStream, until: impl std::future::Future<Output = ()>) -> bool {
    let mut probe = [0u8; 1];
    tokio::select! {
        _ = until => true,
        r = sock.read(&mut probe) => matches!(r, Ok(n) if n > 0),
    }
}

async fn run(sock: &mut TcpStream, shared: &Shared, req: &Request) -> std::io::Result<bool> {
    let arrived = Instant::now();
    let body: serde_json::Value = match serde_json::from_slice(&req.body) {
        Ok(v) => v,
        Err(_) => {
            respond(
                sock,
                400,
                "application/json",
                b"{\"error\":\"invalid json\"}",
            )
            .await?;
            return Ok(true);
        }
    };
    let text = |k: &str| {
        body.get(k)
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string()
    };
    let play = play_of(&text("message"));
    let key = format!("{}\u{1f}{}", text("conversation_id"), text("message_id"));
    let timeline = shared
        .runs
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(key)
        .or_insert_with(|| {
            Arc::new(Timeline {
                t0: arrived,
                t0_wall: wall_ns(),
            })
        })
        .clone();
    let period_ns = 1_000_000_000u64.checked_div(play.rate).unwrap_or(0);
    let due = |n: u64| timeline.t0 + Duration::from_nanos(period_ns * (n - 1));
    let mut out = Vec::with_capacity(16 * 1024);
    out.extend_from_slice(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n",
    );
    let mut n = req.last_event_id.unwrap_or(0).min(play.events) + 1;
    let mut release = shared.release.subscribe();
    release.mark_unchanged();
    while n <= play.events {
        if play.quiet && n == 2 {
            // The start is out: stay quiet until released, the client leaves, or `hold` ends.
            sock.write_all(&out).await?;
            out.clear();
            let until = async {
                let _ =
                    tokio::time::timeout(Duration::from_secs(play.hold), release.changed()).await;
            };
            if !hold(sock, until).await {
                return Ok(false);
            }
        } else if play.rate > 0 {
            let at = due(n);
            let now = Instant::now();
            if at > now {
                if !out.is_empty() {
                    sock.write_all(&out).await?;
                    out.clear();
                }
                tokio::time::sleep_until(at.into()).await;
            }
        }
        // Everything due now goes out in one write.
        let now = Instant::now();
        while n <= play.events && (play.rate == 0 || due(n) <= now) && out.len() < 64 * 1024 {
            let ts = if play.rate > 0 && due(n) < arrived {
                // Due before this request came (a resumption): stamped with its due time.
                timeline.t0_wall + period_ns * (n - 1)
            } else {
                wall_ns()
            };
            push_event(&mut out, n, &play, ts);
            n += 1;
            if play.quiet && n == 2 {
                break;
            }
        }
        if out.len() >= 64 * 1024 {
            sock.write_all(&out).await?;
            out.clear();
        }
    }
    out.extend_from_slice(b"0\r\n\r\n");
    sock.write_all(&out).await?;
    Ok(true)
}

/// A snapshot-shaped JSON body of exactly `size` bytes (or the smallest possible).
fn canned(size: usize) -> Vec<u8> {
    let head = r#"{"threadId":"00000000-0000-4000-8000-000000000000","runId":"run_bench","agentId":"bench","organizationId":"org_bench","streamStatus":"completed","messages":[{"id":"m-bench","role":"user","parts":[{"type":"text","text":"gen events=20 rate=0"}]},{"id":"msg_bench","role":"assistant","parts":[{"type":"step-start"},{"type":"text","text":""#;
    let tail = r#"","state":"done"}]}],"lastSeq":20,"evictedRuns":0,"evictedThroughSeq":0,"createdAt":"2026-01-01T00:00:00.000Z","updatedAt":"2026-01-01T00:00:00.000Z"}"#;
    let fill = size.saturating_sub(head.len() + tail.len());
    let mut body = Vec::with_capacity(size.max(head.len() + tail.len()));
    body.extend_from_slice(head.as_bytes());
    body.extend((0..fill).map(|i| if i % 4 == 3 { b' ' } else { b"tok"[i % 4] }));
    body.extend_from_slice(tail.as_bytes());
    body
}

async fn conversation(sock: &mut TcpStream, shared: &Shared, query: &str) -> std::io::Result<bool> {
    let size = query_value(query, "size")
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_SNAPSHOT_BYTES)
        .min(64 << 20);
    let wait = query_value(query, "wait")
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|w| w.is_finite() && *w > 0.0)
        .map(|w| Duration::from_secs_f64(w.min(3600.0)));
    if let Some(wait) = wait {
        if !hold(sock, tokio::time::sleep(wait)).await {
            return Ok(false);
        }
    }
    let body = shared
        .bodies
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(size)
        .or_insert_with(|| Arc::new(canned(size)))
        .clone();
    respond(sock, 200, "application/json", &body).await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canned_bodies_are_json_of_the_size_asked() {
        for size in [0, 500, 700, 5000] {
            let b = canned(size);
            let v: serde_json::Value = serde_json::from_slice(&b).expect("json");
            assert_eq!(v["lastSeq"], 20);
            if size >= 500 {
                assert_eq!(b.len(), size);
            }
        }
    }

    #[test]
    fn events_are_agentflow_frames() {
        let mut out = Vec::new();
        push_event(&mut out, 1, &play_of("gen events=3"), 42);
        let s = String::from_utf8(out).unwrap();
        let (len, rest) = s.split_once("\r\n").unwrap();
        let frame = rest.strip_suffix("\r\n").unwrap();
        assert_eq!(usize::from_str_radix(len, 16).unwrap(), frame.len());
        assert!(frame.starts_with("id: 1\ndata: {\"type\":\"start\""));
        let p = play_of("gen events=500 rate=50 quiet=1");
        assert_eq!((p.events, p.rate, p.quiet, p.answer), (500, 50, true, None));
    }

    #[test]
    fn progress_filler_keeps_the_answer_of_a_short_run() {
        let frames = |msg: &str| {
            let p = play_of(msg);
            (1..=p.events).map(|n| p.frame(n)).collect::<Vec<_>>()
        };
        let short = frames("gen events=20 rate=0");
        let long = frames("gen events=1000 rate=0 filler=progress");
        assert_eq!(long.len(), 1000);
        let visible: Vec<Frame> = long
            .iter()
            .copied()
            .filter(|f| !matches!(f, Frame::Progress(_)))
            .collect();
        assert_eq!(visible, short);
        // The filler sits between the 9th and the 10th delta, numbered 1..=980.
        assert_eq!(long[9], Frame::Delta);
        assert_eq!(long[10], Frame::Progress(1));
        assert_eq!(long[989], Frame::Progress(980));
        assert_eq!(long[990], Frame::Delta);
        // `answer` and a run shorter than the answer.
        assert_eq!(
            play_of("gen events=50 filler=progress answer=4").answer,
            Some(4)
        );
        let tiny = frames("gen events=5 filler=progress");
        assert!(!tiny.iter().any(|f| matches!(f, Frame::Progress(_))));
        let mut out = Vec::new();
        push_event(&mut out, 11, &play_of("gen events=100 filler=progress"), 7);
        let s = String::from_utf8(out).unwrap();
        assert!(s.contains(
            "id: 11\ndata: {\"type\":\"tool_progress\",\"call_id\":\"t1\",\"parent_call_id\":\"root\",\"content\":{\"progress\":1},\"ts\":7}\n\n"
        ));
    }
}
