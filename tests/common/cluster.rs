//! Multi-instance harness: a real `redis-server` on a free loopback port, N `sluice serve`
//! processes sharing it (`[store] backend = "redis"`) in front of one mock agent, signals to
//! single instances (`kill -9`, `SIGSTOP`/`SIGCONT`, `SIGTERM`), SSE readers that reconnect
//! from instance to instance with `Last-Event-ID`, and a history checker (pure functions) that
//! judges what was recorded:
//!
//! - the backend saw one fresh run per message id (a POST with `last-event-id`, header or body
//!   field, is a resume of that run, not a new one);
//! - a thread's log, read through the gateway, is gapless from 1 (the `seq` runs through the
//!   thread, run after run), and each run in it has exactly one terminal event (a root `end` or
//!   `error`), its last;
//! - every reader's events, concatenated over its reconnects, are a contiguous slice of what the
//!   run's log (or, for UI-message readers, its full rendering) holds, with identical data at
//!   each id.
//!
//! Redis is never optional here: without `redis-server` the harness panics with how to install
//! it, so these tests cannot be skipped silently.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{gateway_conf, mock_agent_speaking, parse_sse, uuid_like, Gateway, Proc, Sse, TempDir};

// ---------------------------------------------------------------------------------------------
// redis-server

/// A `redis-server` on `127.0.0.1:<port>`, killed on drop.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: TempDir,
    args: Vec<String>,
}

const NOT_INSTALLED: &str =
    "redis-server not found: install it (apt-get install redis-server); `make test` installs it";

impl RedisServer {
    /// An in-memory Redis (no RDB snapshots, no AOF) on a free port.
    pub fn start() -> RedisServer {
        RedisServer::start_with(&[])
    }

    /// A Redis whose data survives [`RedisServer::restart`] (and `kill -9`): AOF, fsync'd on
    /// every write.
    pub fn start_persistent() -> RedisServer {
        RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"])
    }

    /// A Redis with extra command-line arguments (`--appendonly yes` …).
    pub fn start_with(args: &[&str]) -> RedisServer {
        match Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
        {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!("{NOT_INSTALLED}"),
            Err(e) => panic!("{NOT_INSTALLED} ({e})"),
            Ok(_) => {}
        }
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        for _ in 0..10 {
            let port = free_port();
            let addr = format!("127.0.0.1:{port}");
            {
                let mut in_use = super::IN_USE.lock().unwrap_or_else(|p| p.into_inner());
                if !in_use.insert(addr.clone()) {
                    continue;
                }
            }
            let mut server = RedisServer {
                child: None,
                port,
                dir: TempDir::new(),
                args: args.clone(),
            };
            if server.launch(Duration::from_secs(10)) {
                return server;
            }
            // Another process took the port first: try another one.
            drop(server);
        }
        panic!("redis-server could not be started on a free port");
    }

    /// Start the process on `self.port` and wait until it answers `PING` (and is this very
    /// process, not another one on the port); whether it did within `limit`.
    fn launch(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            let child = Command::new("redis-server")
                .args(["--port", &self.port.to_string()])
                .args(["--bind", "127.0.0.1"])
                .args(["--save", ""])
                .args(["--appendonly", "no"])
                .args(["--dir", self.dir.0.to_str().unwrap()])
                .args(["--protected-mode", "no"])
                .args(&self.args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("{NOT_INSTALLED} ({e})"));
            let pid = child.id();
            self.child = Some(child);
            // Up to 5 s for this attempt.
            let attempt = Instant::now() + Duration::from_secs(5);
            while Instant::now() < attempt {
                if let Some(Ok(Some(_))) = self.child.as_mut().map(Child::try_wait) {
                    break; // exited: the port was taken (or it is shutting down still)
                }
                if let Ok(info) = self.cmd(&["INFO", "server"]) {
                    if info.contains(&format!("process_id:{pid}\r\n")) {
                        return true;
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            self.kill();
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its process id (`None` while stopped).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether it runs.
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// Kill it (`SIGKILL`, as a crash) and wait until it is gone.
    pub fn stop(&mut self) {
        self.kill();
    }

    /// Kill it and start it again on the same port, with the same arguments and directory (so
    /// a persistent one keeps its data); panics when it does not come back within 15 s.
    pub fn restart(&mut self) {
        self.kill();
        assert!(
            self.launch(Duration::from_secs(15)),
            "redis-server did not come back on port {}",
            self.port
        );
    }

    /// Start it again after [`RedisServer::stop`].
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "redis-server is running");
        self.restart();
    }

    /// Send one command and read its reply (RESP, rendered as text: arrays one element a line;
    /// an error reply is `Err`).
    pub fn cmd(&self, args: &[&str]) -> Result<String, String> {
        let mut conn = TcpStream::connect(("127.0.0.1", self.port)).map_err(|e| e.to_string())?;
        conn.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        conn.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
        let mut reader = RespReader {
            conn,
            buf: Vec::new(),
        };
        reader.reply()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let mut in_use = super::IN_USE.lock().unwrap_or_else(|p| p.into_inner());
        in_use.remove(&format!("127.0.0.1:{}", self.port));
    }
}

/// A free loopback port (bound, read, released).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().unwrap().port()
}

/// Just enough RESP to read a reply.
struct RespReader {
    conn: TcpStream,
    buf: Vec<u8>,
}

impl RespReader {
    fn fill(&mut self) -> Result<(), String> {
        let mut chunk = [0u8; 4096];
        match self.conn.read(&mut chunk) {
            Ok(0) => Err("connection closed".into()),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        }
    }

    fn line(&mut self) -> Result<String, String> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..i]).into_owned();
                self.buf.drain(..i + 2);
                return Ok(line);
            }
            self.fill()?;
        }
    }

    fn reply(&mut self) -> Result<String, String> {
        let line = self.line()?;
        let (kind, rest) = line.split_at(1.min(line.len()));
        match kind {
            "+" | ":" => Ok(rest.to_string()),
            "-" => Err(rest.to_string()),
            "$" => {
                let n: i64 = rest.parse().map_err(|_| format!("bad reply {line}"))?;
                if n < 0 {
                    return Ok(String::new());
                }
                let n = n as usize;
                while self.buf.len() < n + 2 {
                    self.fill()?;
                }
                let s = String::from_utf8_lossy(&self.buf[..n]).into_owned();
                self.buf.drain(..n + 2);
                Ok(s)
            }
            "*" => {
                let n: i64 = rest.parse().map_err(|_| format!("bad reply {line}"))?;
                let mut out = Vec::new();
                for _ in 0..n.max(0) {
                    out.push(self.reply()?);
                }
                Ok(out.join("\n"))
            }
            _ => Err(format!("unexpected reply {line}")),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// gateways

/// What differs between clusters. Lease settings are the short test ones by default.
#[derive(Clone, Debug)]
pub struct ClusterConf {
    /// `store.redis.lease_ttl`.
    pub lease_ttl: String,
    /// `store.redis.lease_renew`.
    pub lease_renew: String,
    /// `store.redis.takeover_scan`.
    pub takeover_scan: String,
    /// Keys added to `[server]` (`threads = 1` is there already).
    pub server_extra: String,
    /// Keys added to `[upstream]` (the dialect and fast poll intervals are there already).
    pub upstream_extra: String,
    /// Keys added to `[store]` (`backend = "redis"` is there already).
    pub store_extra: String,
    /// Keys added to `[store.redis]`.
    pub redis_extra: String,
    /// Keys added to `[stream]` (`keepalive_interval = "500ms"` is there already).
    pub stream_extra: String,
    /// Whole sections appended.
    pub extra: String,
}

impl Default for ClusterConf {
    fn default() -> Self {
        ClusterConf {
            lease_ttl: "2s".into(),
            lease_renew: "600ms".into(),
            takeover_scan: "200ms".into(),
            server_extra: String::new(),
            upstream_extra: String::new(),
            store_extra: String::new(),
            redis_extra: String::new(),
            stream_extra: String::new(),
            extra: String::new(),
        }
    }
}

/// N gateways sharing one Redis, in front of one mock agent.
pub struct Cluster {
    /// The instances, by index.
    pub gateways: Vec<Gateway>,
    /// The mock agent.
    pub mock: Proc,
    /// The mock agent's `host:port`.
    pub mock_addr: String,
    /// The mock's dialect.
    pub dialect: String,
    /// The Redis key prefix the instances share.
    pub prefix: String,
    /// A client for the test's own requests.
    pub http: reqwest::Client,
}

impl Cluster {
    /// `n` gateways over a mock agent speaking `mock_dialect`, sharing `redis`, with `extra`
    /// (whole sections) appended to their configuration.
    pub fn start(n: usize, mock_dialect: &str, redis: &RedisServer, extra: &str) -> Cluster {
        Cluster::start_conf(
            n,
            mock_dialect,
            redis,
            ClusterConf {
                extra: extra.into(),
                ..ClusterConf::default()
            },
        )
    }

    /// [`Cluster::start`] with every setting.
    pub fn start_conf(
        n: usize,
        mock_dialect: &str,
        redis: &RedisServer,
        conf: ClusterConf,
    ) -> Cluster {
        let mock = mock_agent_speaking(mock_dialect);
        let mock_addr = mock.addrs[0].clone();
        let prefix = format!(
            "t{}",
            uuid_like()
                .chars()
                .filter(char::is_ascii_alphanumeric)
                .take(40)
                .collect::<String>()
        );
        let server_extra = format!("threads = 1\n{}", conf.server_extra);
        let upstream_extra = format!(
            "dialect = \"{mock_dialect}\"\npoll_interval_min = \"20ms\"\n\
             poll_interval_max = \"100ms\"\n{}",
            conf.upstream_extra
        );
        let extra = format!(
            "[store]\nbackend = \"redis\"\n{}\n\
             [store.redis]\nurl = \"{}\"\nkey_prefix = \"{prefix}\"\nlease_ttl = \"{}\"\n\
             lease_renew = \"{}\"\ntakeover_scan = \"{}\"\n{}\n\
             [stream]\nkeepalive_interval = \"500ms\"\n{}\n{}\n",
            conf.store_extra,
            redis.url(),
            conf.lease_ttl,
            conf.lease_renew,
            conf.takeover_scan,
            conf.redis_extra,
            conf.stream_extra,
            conf.extra,
        );
        let gateways = std::thread::scope(|s| {
            let handles: Vec<_> = (0..n)
                .map(|_| {
                    let (m, se, ue, ex) = (&mock_addr, &server_extra, &upstream_extra, &extra);
                    s.spawn(move || gateway_conf(m, se, ue, "mode = \"disabled\"\n", ex))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a gateway started"))
                .collect::<Vec<_>>()
        });
        Cluster {
            gateways,
            mock,
            mock_addr,
            dialect: mock_dialect.into(),
            prefix,
            http: super::client(),
        }
    }

    /// Instance `i`.
    pub fn gw(&self, i: usize) -> &Gateway {
        &self.gateways[i]
    }

    /// Every instance's base URL, by index.
    pub fn bases(&self) -> Vec<String> {
        self.gateways.iter().map(|g| g.base.clone()).collect()
    }

    fn signal(&self, i: usize, sig: &str) {
        let pid = self.gateways[i].proc.pid().to_string();
        let ok = Command::new("kill")
            .args([sig, &pid])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "kill {sig} {pid} (gateway {i}) failed");
    }

    /// `kill -9` instance `i`, and wait until it is gone.
    pub fn kill9(&mut self, i: usize) {
        self.signal(i, "-KILL");
        assert!(
            self.gateways[i].proc.wait_exit(Duration::from_secs(10)),
            "gateway {i} survived kill -9"
        );
    }

    /// `SIGSTOP` instance `i` (it holds its sockets and leases, and does nothing).
    pub fn sigstop(&self, i: usize) {
        self.signal(i, "-STOP");
    }

    /// `SIGCONT` instance `i`.
    pub fn sigcont(&self, i: usize) {
        self.signal(i, "-CONT");
    }

    /// `SIGTERM` instance `i` (drain).
    pub fn sigterm(&self, i: usize) {
        self.signal(i, "-TERM");
    }

    /// Wait up to `limit` for instance `i` to exit.
    pub fn wait_exit(&mut self, i: usize, limit: Duration) -> bool {
        self.gateways[i].proc.wait_exit(limit)
    }

    /// The run requests the mock agent received (`GET /mock/requests`).
    pub async fn mock_requests(&self) -> Vec<Value> {
        super::mock_requests(&self.http, &self.mock_addr).await
    }

    /// The AgentFlow runs the mock agent played (`GET /mock/runs`: `runs`, `continued`,
    /// `attached`, `by_message`), `None` when it has no such route.
    pub async fn mock_runs(&self) -> Option<Value> {
        let resp = self
            .http
            .get(format!("http://{}/mock/runs", self.mock_addr))
            .send()
            .await
            .ok()?;
        if resp.status() != 200 {
            return None;
        }
        resp.json().await.ok()
    }

    /// Both oracles of "one backend run per message": the request log (one request without
    /// `Last-Event-ID` per message id) and, where the mock keeps it (AgentFlow), its own count
    /// of runs started per message.
    pub async fn check_one_backend_run(&self, message_ids: &[&str]) -> Result<(), String> {
        check_one_fresh_run(&self.mock_requests().await, message_ids)?;
        if self.dialect == "agentflow" {
            let runs = self
                .mock_runs()
                .await
                .ok_or("the AgentFlow mock has no GET /mock/runs")?;
            for id in message_ids {
                if runs["by_message"][id] != json!(1) {
                    return Err(format!(
                        "message {id}: the mock started {} runs, want 1 ({runs})",
                        runs["by_message"][id]
                    ));
                }
            }
        }
        Ok(())
    }

    /// Streams the mock agent is playing now (`GET /mock/active`'s `active`).
    pub async fn mock_active(&self) -> u64 {
        super::mock_active(&self.http, &self.mock_addr).await["active"]
            .as_u64()
            .expect("/mock/active has `active`")
    }

    /// A series' value on instance `i`'s `/metrics`, `None` when the series is absent (or the
    /// instance does not answer within 5 s).
    pub async fn metric(&self, i: usize, series: &str) -> Option<u64> {
        let gw = &self.gateways[i];
        let resp = gw
            .http
            .get(format!("{}/metrics", gw.admin))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .ok()?;
        let text = resp.text().await.ok()?;
        metric_value(&text, series)
    }

    /// `GET /readyz` on instance `i`'s admin listener: its status (0 when it does not answer
    /// within 5 s).
    pub async fn readyz(&self, i: usize) -> u16 {
        let gw = &self.gateways[i];
        match gw
            .http
            .get(format!("{}/readyz", gw.admin))
            .timeout(Duration::from_secs(5))
            .send()
            .await
        {
            Ok(r) => r.status().as_u16(),
            Err(_) => 0,
        }
    }

    /// A dialect-A invoke on instance `i` in 202 mode with this message id; the response.
    pub async fn invoke_202(
        &self,
        i: usize,
        message_id: &str,
        text: &str,
        thread: Option<&str>,
    ) -> reqwest::Response {
        let mut body = json!({
            "agentId": 1,
            "message": {"id": message_id, "role": "user", "parts": [{"type": "text", "text": text}]},
        });
        if let Some(t) = thread {
            body["threadId"] = json!(t);
        }
        self.post_202(i, "/api/invokeAgent", &body).await
    }

    /// POST `body` to `path` on instance `i` with `X-Stream-Response: false` (202 mode).
    pub async fn post_202(&self, i: usize, path: &str, body: &Value) -> reqwest::Response {
        let gw = &self.gateways[i];
        gw.http
            .post(gw.url(path))
            .header("x-stream-response", "false")
            .timeout(Duration::from_secs(20))
            .json(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {path} on gateway {i}: {e}"))
    }

    /// [`Cluster::invoke_202`], asserting `202`; returns (threadId, runId).
    pub async fn start_run(&self, i: usize, message_id: &str, text: &str) -> (String, String) {
        let resp = self.invoke_202(i, message_id, text, None).await;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.text().await.unwrap_or_default();
        assert_eq!(status, 202, "invoke on gateway {i}: {body}");
        let h = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_else(|| panic!("{name} missing: {headers:?}"))
                .to_string()
        };
        (h("x-thread-id"), h("x-run-id"))
    }

    /// `getConversation` on instance `i` (`query` is appended, e.g. `&afterSeq=3&wait=5`):
    /// (status, body), or `(0, error)` when it does not answer within `limit`.
    pub async fn conversation(
        &self,
        i: usize,
        thread: &str,
        query: &str,
        limit: Duration,
    ) -> (u16, Value) {
        let gw = &self.gateways[i];
        let resp = gw
            .http
            .get(gw.url(&format!("/api/getConversation?threadId={thread}{query}")))
            .timeout(limit)
            .send()
            .await;
        match resp {
            Ok(r) => {
                let status = r.status().as_u16();
                (status, r.json().await.unwrap_or(Value::Null))
            }
            Err(e) => (0, json!(e.to_string())),
        }
    }

    /// Poll the snapshot on instance `i` until its run is no longer in progress (within
    /// `limit`); the snapshot.
    pub async fn wait_terminal(&self, i: usize, thread: &str, limit: Duration) -> Value {
        let deadline = Instant::now() + limit;
        let mut last = Value::Null;
        loop {
            let (status, snap) = self
                .conversation(i, thread, "", Duration::from_secs(5))
                .await;
            if status == 200 && snap["streamStatus"] != json!("in_progress") {
                return snap;
            }
            if status == 200 {
                last = snap;
            } else {
                last = json!({"status": status, "body": snap, "before": last});
            }
            assert!(
                Instant::now() < deadline,
                "the run on thread {thread} did not end within {limit:?} (gateway {i}): {last}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Poll instance `i`'s snapshot until `lastSeq >= seq` (within `limit`); the snapshot.
    pub async fn wait_seq(&self, i: usize, thread: &str, seq: u64, limit: Duration) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let (status, snap) = self
                .conversation(i, thread, "", Duration::from_secs(5))
                .await;
            if status == 200 && snap["lastSeq"].as_u64().unwrap_or(0) >= seq {
                return snap;
            }
            assert!(
                Instant::now() < deadline,
                "thread {thread} never reached seq {seq} on gateway {i}: {status} {snap}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// A reader that moves through instances `route` (in turn, cyclically) when a stream is cut.
    pub fn reader(&self, route: &[usize], format: Format) -> Reader {
        Reader {
            bases: route
                .iter()
                .map(|&i| (i, self.gateways[i].base.clone()))
                .collect(),
            http: super::client(),
            format,
            stall: Duration::from_secs(3),
            seen: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// The thread's whole log as instance `i` serves it (AgentFlow dialect from `afterSeq=0`,
    /// run after run until `204`); every run must have ended.
    pub async fn thread_log(&self, i: usize, thread: &str) -> Result<Vec<RunLog>, String> {
        let reader = self.reader(&[i], Format::AgentFlow);
        let mut runs = Vec::new();
        let mut cursor = 0u64;
        for _ in 0..100 {
            let s = reader
                .session(0, thread, Some(&cursor.to_string()), &|_: &[Sse]| false)
                .await;
            match &s.end {
                End::NoContent => return Ok(runs),
                End::Clean => {}
                other => {
                    return Err(format!(
                        "reading thread {thread} after {cursor} on gateway {i}: {other:?} \
                         after {} events",
                        s.events.len()
                    ))
                }
            }
            let mut events = Vec::new();
            for e in &s.events {
                let id =
                    e.id.as_deref()
                        .ok_or(format!("an event without id: {e:?}"))?;
                let seq: u64 = id.parse().map_err(|_| format!("id {id} is not a seq"))?;
                events.push((seq, e.data.clone()));
            }
            let Some(&(last, _)) = events.last() else {
                return Err(format!("an empty run after {cursor} on thread {thread}"));
            };
            cursor = last;
            runs.push(RunLog {
                run: s.run.clone().unwrap_or_default(),
                events,
            });
        }
        Err(format!("thread {thread}: more than 100 runs?"))
    }
}

/// A series' value in Prometheus text, `None` when absent.
pub fn metric_value(metrics: &str, series: &str) -> Option<u64> {
    metrics.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse::<f64>()
            .ok()
            .map(|v| v as u64)
    })
}

// ---------------------------------------------------------------------------------------------
// readers

/// Which dialect a reader streams in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// The AI SDK UI-message stream (ids `k` and `k.j`).
    Ui,
    /// `?format=agentflow` (ids are seqs, data the log's payloads).
    AgentFlow,
}

/// How one stream session ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    /// The body ended cleanly (the run's real end).
    Clean,
    /// The connection broke before a clean end.
    Cut(String),
    /// Nothing arrived for the reader's stall limit.
    Stalled,
    /// The test hung up itself.
    HungUp,
    /// `204 No Content`.
    NoContent,
    /// Any other status, with its body.
    Status(u16, String),
    /// No answer at all (connection refused, no response head).
    Unreachable(String),
}

/// One connection of a reader.
#[derive(Clone, Debug)]
pub struct Session {
    /// The instance it went to.
    pub gateway: usize,
    /// The `Last-Event-ID` it sent.
    pub cursor: Option<String>,
    /// Its `x-run-id`.
    pub run: Option<String>,
    /// The complete events it received.
    pub events: Vec<Sse>,
    /// How it ended.
    pub end: End,
}

impl Session {
    /// Whether it ended with the run's end: cleanly, after a terminal event (`[DONE]` in the
    /// UI-message dialect, a root `end`/`error` in the AgentFlow one).
    pub fn finished(&self) -> bool {
        self.end == End::Clean
            && self
                .events
                .last()
                .is_some_and(|e| e.data == "[DONE]" || is_terminal(&e.data))
    }
}

/// A stream client that reconnects through a list of instances.
#[derive(Clone)]
pub struct Reader {
    /// (instance index, base URL), in the order tried.
    pub bases: Vec<(usize, String)>,
    http: reqwest::Client,
    /// The dialect.
    pub format: Format,
    /// Longest silence before the reader gives up on a connection (keep-alives count).
    pub stall: Duration,
    /// Events received so far, over all sessions (shared by clones: a test can watch a
    /// reader running in another task).
    pub seen: Arc<AtomicUsize>,
}

impl Reader {
    /// One connection to `bases[k]`: `GET /api/threads/{thread}/stream` with `Last-Event-ID:
    /// cursor`, read until the body ends, breaks, stalls, or `hang_up(events so far)` says to
    /// hang up.
    pub async fn session(
        &self,
        k: usize,
        thread: &str,
        cursor: Option<&str>,
        hang_up: &(dyn Fn(&[Sse]) -> bool + Sync),
    ) -> Session {
        let (gateway, base) = &self.bases[k % self.bases.len()];
        let query = match self.format {
            Format::Ui => "",
            Format::AgentFlow => "?format=agentflow",
        };
        let mut s = Session {
            gateway: *gateway,
            cursor: cursor.map(str::to_string),
            run: None,
            events: Vec::new(),
            end: End::HungUp,
        };
        let mut req = self
            .http
            .get(format!("{base}/api/threads/{thread}/stream{query}"));
        if let Some(c) = cursor {
            req = req.header("last-event-id", c);
        }
        let mut resp =
            match tokio::time::timeout(self.stall + Duration::from_secs(2), req.send()).await {
                Err(_) => {
                    s.end = End::Unreachable("no response head".into());
                    return s;
                }
                Ok(Err(e)) => {
                    s.end = End::Unreachable(e.to_string());
                    return s;
                }
                Ok(Ok(r)) => r,
            };
        let status = resp.status().as_u16();
        s.run = resp
            .headers()
            .get("x-run-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        if status == 204 {
            s.end = End::NoContent;
            return s;
        }
        if status != 200 {
            let body = tokio::time::timeout(Duration::from_secs(5), resp.text())
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default();
            s.end = End::Status(status, body);
            return s;
        }
        let mut buf: Vec<u8> = Vec::new();
        loop {
            if hang_up(&s.events) {
                s.end = End::HungUp;
                return s;
            }
            match tokio::time::timeout(self.stall, resp.chunk()).await {
                Err(_) => {
                    s.end = End::Stalled;
                    return s;
                }
                Ok(Err(e)) => {
                    s.end = End::Cut(format!("{e:?}"));
                    return s;
                }
                Ok(Ok(None)) => {
                    s.end = End::Clean;
                    if !buf.iter().all(|b| b.is_ascii_whitespace()) {
                        s.end = End::Cut(format!(
                            "ended inside an event: {:?}",
                            String::from_utf8_lossy(&buf)
                        ));
                    }
                    return s;
                }
                Ok(Ok(Some(bytes))) => {
                    buf.extend_from_slice(&bytes);
                    while let Some(i) = buf.windows(2).position(|w| w == b"\n\n") {
                        let block: Vec<u8> = buf.drain(..i + 2).collect();
                        let (events, _) = parse_sse(&String::from_utf8_lossy(&block));
                        self.seen.fetch_add(events.len(), Ordering::SeqCst);
                        s.events.extend(events);
                    }
                }
            }
        }
    }

    /// Events received so far over all sessions.
    pub fn seen(&self) -> usize {
        self.seen.load(Ordering::SeqCst)
    }

    /// Follow the thread's run to its end: connect to `bases[0]` with `cursor`, and whenever a
    /// connection ends before the run does, reconnect to the next instance with the last id
    /// received, until a session ends with the run's end (or `204`), or `limit` passes (then
    /// the last session records why). `hang_up` applies to the first session only.
    pub async fn follow(
        &self,
        thread: &str,
        cursor: Option<String>,
        hang_up_first: &(dyn Fn(&[Sse]) -> bool + Sync),
        limit: Duration,
    ) -> Vec<Session> {
        let deadline = Instant::now() + limit;
        let mut sessions: Vec<Session> = Vec::new();
        let mut cursor = cursor;
        let never = |_: &[Sse]| false;
        for k in 0.. {
            let hang_up: &(dyn Fn(&[Sse]) -> bool + Sync) =
                if k == 0 { hang_up_first } else { &never };
            let s = self.session(k, thread, cursor.as_deref(), hang_up).await;
            if let Some(id) = s.events.iter().rev().find_map(|e| e.id.clone()) {
                cursor = Some(id);
            }
            let done = s.finished() || s.end == End::NoContent;
            let got_any = !s.events.is_empty();
            sessions.push(s);
            if done || Instant::now() >= deadline {
                break;
            }
            if !got_any {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        sessions
    }

    /// One session on `bases[0]` that hangs up once `n` events came: a reader the test cuts
    /// on purpose.
    pub async fn read_until(&self, thread: &str, cursor: Option<String>, n: usize) -> Session {
        self.session(0, thread, cursor.as_deref(), &|evs: &[Sse]| evs.len() >= n)
            .await
    }
}

/// The last id a reader received over its sessions.
pub fn last_id(sessions: &[Session]) -> Option<String> {
    sessions
        .iter()
        .flat_map(|s| s.events.iter())
        .rev()
        .find_map(|e| e.id.clone())
}

/// Every event of a reader's sessions, in order.
pub fn joined(sessions: &[Session]) -> Vec<Sse> {
    sessions.iter().flat_map(|s| s.events.clone()).collect()
}

/// A one-line account of a reader's sessions for failure messages.
pub fn describe(sessions: &[Session]) -> String {
    sessions
        .iter()
        .map(|s| {
            format!(
                "[gw{} after {:?}: {} events {:?}..{:?}, {:?}]",
                s.gateway,
                s.cursor,
                s.events.len(),
                s.events.first().and_then(|e| e.id.clone()),
                s.events.last().and_then(|e| e.id.clone()),
                s.end
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

// ---------------------------------------------------------------------------------------------
// history checker

/// One run of a thread's log as read through the gateway.
#[derive(Clone, Debug)]
pub struct RunLog {
    /// Its run id (from the stream's `x-run-id`).
    pub run: String,
    /// `(seq, data)`, in order.
    pub events: Vec<(u64, String)>,
}

/// Whether an AgentFlow payload ends its run: a root `end` or `error` (a `stopped`, `timeout`
/// or gateway-detected end is a root `error` with `metadata.sluice_status`).
pub fn is_terminal(data: &str) -> bool {
    let Ok(v) = serde_json::from_str::<Value>(data) else {
        return false;
    };
    let id = |k: &str| match &v[k] {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    };
    let parent = id("parent_call_id").filter(|p| !p.is_empty());
    let root = parent.is_none()
        && match (id("call_id"), id("root_call_id")) {
            (Some(c), Some(r)) => c == r,
            _ => true,
        };
    let ty = v["type"].as_str().unwrap_or("").to_ascii_lowercase();
    root && (ty == "end" || ty == "error")
}

/// A backend run request as the mock agent recorded it.
#[derive(Clone, Debug)]
pub struct BackendPost {
    /// The request path.
    pub path: String,
    /// The message id (`message_id`, or `message.id` in the invoke dialects).
    pub message_id: Option<String>,
    /// `Last-Event-ID` (header, or `last_event_id` in the body): a resume when present.
    pub last_event_id: Option<String>,
}

impl BackendPost {
    /// A resume of a run rather than a fresh one.
    pub fn is_resume(&self) -> bool {
        self.last_event_id.is_some()
    }
}

/// The mock agent's request log (`GET /mock/requests`) as backend run requests.
pub fn backend_posts(requests: &[Value]) -> Vec<BackendPost> {
    let text = |v: &Value| match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    };
    requests
        .iter()
        .map(|r| {
            let body = &r["body"];
            let header = r["headers"]
                .as_object()
                .and_then(|h| {
                    h.iter()
                        .find(|(k, _)| k.eq_ignore_ascii_case("last-event-id"))
                        .map(|(_, v)| v.clone())
                })
                .and_then(|v| text(&v));
            BackendPost {
                path: r["path"].as_str().unwrap_or("").to_string(),
                message_id: text(&body["message_id"]).or_else(|| text(&body["message"]["id"])),
                last_event_id: header.or_else(|| text(&body["last_event_id"])),
            }
        })
        .collect()
}

/// The backend saw exactly one fresh run (a request without `Last-Event-ID`) for each of
/// `message_ids`; resumes are allowed.
pub fn check_one_fresh_run(requests: &[Value], message_ids: &[&str]) -> Result<(), String> {
    let posts = backend_posts(requests);
    for id in message_ids {
        let mine: Vec<&BackendPost> = posts
            .iter()
            .filter(|p| p.message_id.as_deref() == Some(id))
            .collect();
        let fresh = mine.iter().filter(|p| !p.is_resume()).count();
        if fresh != 1 {
            return Err(format!(
                "message {id}: {fresh} fresh backend runs, want 1 (requests for it: {mine:?})"
            ));
        }
    }
    Ok(())
}

/// The resumes (requests with `Last-Event-ID`) the backend saw for `message_id`.
pub fn resumes_of(requests: &[Value], message_id: &str) -> Vec<BackendPost> {
    backend_posts(requests)
        .into_iter()
        .filter(|p| p.message_id.as_deref() == Some(message_id) && p.is_resume())
        .collect()
}

/// A thread's log is gapless from 1 across its runs, and each run holds exactly one terminal
/// event, its last.
pub fn check_thread_log(runs: &[RunLog]) -> Result<(), String> {
    let mut next = 1u64;
    if runs.is_empty() {
        return Err("the thread has no runs".into());
    }
    for (r, run) in runs.iter().enumerate() {
        if run.events.is_empty() {
            return Err(format!("run {r} ({}) is empty", run.run));
        }
        for (seq, _) in &run.events {
            if *seq != next {
                let seqs: Vec<u64> = run.events.iter().map(|(s, _)| *s).collect();
                return Err(format!(
                    "run {r} ({}): seq {seq} where {next} was due (a gap or a duplicate); \
                     its seqs: {seqs:?}",
                    run.run
                ));
            }
            next += 1;
        }
        let terminals: Vec<u64> = run
            .events
            .iter()
            .filter(|(_, d)| is_terminal(d))
            .map(|(s, _)| *s)
            .collect();
        let last = run.events.last().unwrap().0;
        if terminals != [last] {
            return Err(format!(
                "run {r} ({}): terminal events at {terminals:?}, want exactly one, at its last \
                 seq {last}; last event: {}",
                run.run,
                run.events.last().unwrap().1
            ));
        }
    }
    Ok(())
}

/// A reader's events, joined over its sessions, are a contiguous slice of `reference` (same id
/// and data at each position) that starts right after the first session's cursor (or at the
/// start without one, or with cursor `0`). With `complete`, the slice must also reach the end of `reference`.
pub fn check_reader(reference: &[Sse], sessions: &[Session], complete: bool) -> Result<(), String> {
    let got = joined(sessions);
    let start = match sessions.first().and_then(|s| s.cursor.as_deref()) {
        None | Some("0") => 0,
        Some(c) => {
            reference
                .iter()
                .position(|e| e.id.as_deref() == Some(c))
                .ok_or(format!(
                    "the reader's first cursor {c} is not an id of the run ({})",
                    describe(sessions)
                ))?
                + 1
        }
    };
    for (i, e) in got.iter().enumerate() {
        match reference.get(start + i) {
            Some(want) if want == e => {}
            Some(want) => {
                return Err(format!(
                    "reader event {i} is {e:?} where the log has {want:?} (a gap, a duplicate \
                     or different data); sessions: {}",
                    describe(sessions)
                ))
            }
            None => {
                return Err(format!(
                    "reader event {i} ({e:?}) is past the end of the log; sessions: {}",
                    describe(sessions)
                ))
            }
        }
    }
    if complete && start + got.len() != reference.len() {
        return Err(format!(
            "the reader got {} of the {} events after its cursor; sessions: {}",
            got.len(),
            reference.len() - start,
            describe(sessions)
        ));
    }
    Ok(())
}

/// A run's log as the events an AgentFlow reader sees (`id: seq`, the payload as data).
pub fn as_sse(run: &RunLog) -> Vec<Sse> {
    run.events
        .iter()
        .map(|(seq, data)| Sse {
            id: Some(seq.to_string()),
            data: data.clone(),
        })
        .collect()
}

/// The text of a run's root deltas, in order (what the assistant said).
pub fn delta_text(run: &RunLog) -> String {
    run.events
        .iter()
        .filter_map(|(_, d)| serde_json::from_str::<Value>(d).ok())
        .filter(|v| {
            v["type"]
                .as_str()
                .is_some_and(|t| t.eq_ignore_ascii_case("delta"))
                && v["parent_call_id"].as_str().is_none_or(str::is_empty)
        })
        .filter_map(|v| {
            v["content"]
                .as_str()
                .or(v["delta"].as_str())
                .map(str::to_string)
        })
        .collect()
}

/// `token0 token1 … token{n-1} `: the answer of `scenario:slow tokens=n`.
pub fn slow_answer(n: usize) -> String {
    (0..n).map(|i| format!("token{i} ")).collect()
}

/// Run `check` every 50 ms until it gives `Some`, or panic with `what` after `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "{what} (waited {limit:?})");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
