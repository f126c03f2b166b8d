//! Test harness: runs the real `sluice` binary (gateway and mock agent) on loopback ports picked
//! at start-up, and speaks HTTP to them. Processes are killed when their handle drops.

#![allow(dead_code)]

pub mod cluster;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// A running `sluice` process.
pub struct Proc {
    child: Child,
    /// Every `http://…` address it announced, in order.
    pub addrs: Vec<String>,
    /// Everything it printed on stdout so far.
    pub stdout: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    _dir: Option<TempDir>,
}

impl Proc {
    /// Its process id.
    #[allow(dead_code)]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Send SIGTERM (graceful shutdown).
    pub fn terminate(&self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
    }

    /// Wait for the process to exit, up to `limit`; returns whether it did.
    pub fn wait_exit(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut in_use = IN_USE.lock().unwrap_or_else(|p| p.into_inner());
        for a in &self.addrs {
            in_use.remove(a);
        }
    }
}

/// A directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        let p = std::env::temp_dir().join(format!("sluice-test-{}", uuid_like()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        Instant::now().elapsed().as_nanos()
    )
}

/// Addresses announced by this test binary's live processes. A process picks its ports by
/// probing (bind to port 0, close, announce, bind again later), so two processes started at the
/// same moment can announce the same port and only one of them gets it: the other's requests
/// would silently reach the wrong process. A process that announces an address already in use
/// here is restarted.
static IN_USE: std::sync::Mutex<std::collections::BTreeSet<String>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

/// Start `sluice ARGS…` and wait for `want` announced addresses.
pub fn spawn(args: &[&str], want: usize, dir: Option<TempDir>) -> Proc {
    for _ in 0..5 {
        let (mut child, addrs, lines) = spawn_once(args, want);
        {
            let mut in_use = IN_USE.lock().unwrap_or_else(|p| p.into_inner());
            if addrs.iter().all(|a| !in_use.contains(a)) {
                in_use.extend(addrs.iter().cloned());
                drop(in_use);
                let proc = Proc {
                    child,
                    addrs,
                    stdout: lines,
                    _dir: dir,
                };
                for a in &proc.addrs {
                    wait_listening(a);
                }
                return proc;
            }
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!("sluice {args:?} kept announcing ports already in use");
}

type Lines = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

fn spawn_once(args: &[&str], want: usize) -> (Child, Vec<String>, Lines) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(args)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("sluice binary starts");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line.clone());
            for word in line.split_whitespace() {
                let w = word.trim_matches(|c| c == '(' || c == ')' || c == ',');
                if let Some(addr) = w.strip_prefix("http://") {
                    let _ = tx.send(addr.to_string());
                }
            }
        }
    });
    let mut addrs = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while addrs.len() < want {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(a) => addrs.push(a),
            Err(_) => panic!("sluice {args:?} did not announce its addresses"),
        }
    }
    (child, addrs, lines)
}

fn wait_listening(addr: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            Instant::now() < deadline,
            "{addr} never accepted connections"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A mock agent backend.
pub fn mock_agent() -> Proc {
    spawn(&["mock-agent", "--listen", "127.0.0.1:0"], 1, None)
}

/// A mock agent backend speaking `dialect` (`agentflow`, `ui-message` or `poll`).
pub fn mock_agent_speaking(dialect: &str) -> Proc {
    spawn(
        &[
            "mock-agent",
            "--listen",
            "127.0.0.1:0",
            "--dialect",
            dialect,
        ],
        1,
        None,
    )
}

/// The three backend dialects.
pub const DIALECTS: [&str; 3] = ["agentflow", "ui-message", "poll"];

/// A mock agent speaking `dialect` and a gateway configured for it (polling every 20 to 100 ms),
/// with `upstream_extra` added to `[upstream]`.
pub fn over(dialect: &str, upstream_extra: &str) -> (Proc, Gateway) {
    let mock = mock_agent_speaking(dialect);
    let gw = gateway_with(
        &mock.addrs[0],
        &format!(
            "dialect = \"{dialect}\"\npoll_interval_min = \"20ms\"\n\
             poll_interval_max = \"100ms\"\n{upstream_extra}"
        ),
        "",
    );
    (mock, gw)
}

/// Rename every `id` value (any depth) by order of first appearance, so that values built by
/// runs with different ids compare by structure.
pub fn normalize_ids(values: &[Value]) -> Vec<Value> {
    fn walk(v: &mut Value, seen: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, x) in m.iter_mut() {
                    if let (true, Value::String(s)) = (k == "id", &mut *x) {
                        let n = seen.iter().position(|p| p == s).unwrap_or_else(|| {
                            seen.push(s.clone());
                            seen.len() - 1
                        });
                        *s = format!("#{n}");
                    } else {
                        walk(x, seen);
                    }
                }
            }
            Value::Array(a) => a.iter_mut().for_each(|x| walk(x, seen)),
            _ => {}
        }
    }
    let mut seen = Vec::new();
    let mut out = values.to_vec();
    out.iter_mut().for_each(|v| walk(v, &mut seen));
    out
}

/// `GET http://{addr}{path}` as JSON (the mock agent's own routes).
pub async fn get_json(http: &reqwest::Client, addr: &str, path: &str) -> Value {
    http.get(format!("http://{addr}{path}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The requests a mock agent at `addr` received (`GET /mock/requests`).
pub async fn mock_requests(http: &reqwest::Client, addr: &str) -> Vec<Value> {
    let v = get_json(http, addr, "/mock/requests").await;
    v.as_array().cloned().unwrap_or_default()
}

/// What a mock agent at `addr` is doing: `{"active": <streams playing>, "polls": <conversation
/// requests answered>}` (`GET /mock/active`).
pub async fn mock_active(http: &reqwest::Client, addr: &str) -> Value {
    get_json(http, addr, "/mock/active").await
}

/// A gateway in front of `upstream` with extra TOML appended to a minimal config (auth disabled).
/// `extra` may contain whole sections (`[limits]` …); keys for `[upstream]` go in `upstream_extra`.
pub fn gateway_with(upstream: &str, upstream_extra: &str, extra: &str) -> Gateway {
    gateway_auth(upstream, "mode = \"disabled\"\n", upstream_extra, extra)
}

/// A gateway whose `[auth]` section is `auth`.
pub fn gateway_auth(upstream: &str, auth: &str, upstream_extra: &str, extra: &str) -> Gateway {
    gateway_conf(upstream, "", upstream_extra, auth, extra)
}

/// A gateway with keys added to `[server]`, `[upstream]` and `[auth]`, and `extra` (whole
/// sections) appended.
pub fn gateway_conf(
    upstream: &str,
    server_extra: &str,
    upstream_extra: &str,
    auth: &str,
    extra: &str,
) -> Gateway {
    let dir = TempDir::new();
    let path = dir.0.join("sluice.toml");
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{server_extra}\n\
         [upstream]\nurls = [\"http://{upstream}\"]\n{upstream_extra}\n\
         [auth]\n{auth}\n{extra}\n"
    );
    std::fs::write(&path, text).unwrap();
    let proc = spawn(&["serve", "--config", path.to_str().unwrap()], 2, Some(dir));
    Gateway {
        base: format!("http://{}", proc.addrs[0]),
        admin: format!("http://{}", proc.addrs[1]),
        proc,
        http: client(),
    }
}

/// A gateway with default settings.
pub fn gateway(upstream: &str) -> Gateway {
    gateway_with(upstream, "", "")
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

/// A running gateway and how to reach it.
pub struct Gateway {
    pub base: String,
    pub admin: String,
    pub http: reqwest::Client,
    pub proc: Proc,
}

/// A dialect-A invoke body.
pub fn invoke_body(agent: Value, text: &str, thread: Option<&str>) -> Value {
    let mut body = json!({
        "agentId": agent,
        "message": {"id": format!("u-{}", uuid_like()), "role": "user", "parts": [{"type": "text", "text": text}]},
    });
    if let Some(t) = thread {
        body["threadId"] = json!(t);
    }
    body
}

impl Gateway {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// POST an invoke for agent 1 with `text`, in stream mode or (`poll`) 202 mode.
    pub async fn invoke(&self, text: &str, thread: Option<&str>, poll: bool) -> reqwest::Response {
        self.invoke_as(None, text, thread, poll).await
    }

    /// [`Gateway::invoke`] with a bearer token.
    pub async fn invoke_as(
        &self,
        token: Option<&str>,
        text: &str,
        thread: Option<&str>,
        poll: bool,
    ) -> reqwest::Response {
        let mut req = self.http.post(self.url("/api/invokeAgent"));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if poll {
            req = req.header("x-stream-response", "false");
        }
        req.json(&invoke_body(json!(1), text, thread))
            .send()
            .await
            .unwrap()
    }

    /// Invoke in 202 mode; returns (threadId, runId).
    pub async fn start(&self, text: &str, thread: Option<&str>) -> (String, String) {
        self.start_inner(None, text, thread).await
    }

    /// [`Gateway::start`] with a bearer token.
    pub async fn start_as(
        &self,
        token: &str,
        text: &str,
        thread: Option<&str>,
    ) -> (String, String) {
        self.start_inner(Some(token), text, thread).await
    }

    async fn start_inner(
        &self,
        token: Option<&str>,
        text: &str,
        thread: Option<&str>,
    ) -> (String, String) {
        let resp = self.invoke_as(token, text, thread, true).await;
        assert_eq!(resp.status(), 202, "{:?}", resp.text().await);
        let thread_h = resp.headers()["x-thread-id"].to_str().unwrap().to_string();
        let run_h = resp.headers()["x-run-id"].to_str().unwrap().to_string();
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["threadId"], json!(thread_h));
        assert_eq!(body["status"], json!("in_progress"));
        (thread_h, run_h)
    }

    pub async fn conversation(&self, thread: &str) -> (u16, Value) {
        self.conversation_as(None, thread).await
    }

    /// [`Gateway::conversation`] with a bearer token.
    pub async fn conversation_as(&self, token: Option<&str>, thread: &str) -> (u16, Value) {
        let mut req = self
            .http
            .get(self.url("/api/getConversation"))
            .query(&[("threadId", thread)]);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// Poll until the thread's status is terminal; returns the snapshot.
    pub async fn wait_terminal(&self, thread: &str) -> Value {
        self.wait_terminal_inner(None, thread).await
    }

    /// [`Gateway::wait_terminal`] with a bearer token.
    pub async fn wait_terminal_as(&self, token: &str, thread: &str) -> Value {
        self.wait_terminal_inner(Some(token), thread).await
    }

    async fn wait_terminal_inner(&self, token: Option<&str>, thread: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (status, snap) = self.conversation_as(token, thread).await;
            assert_eq!(status, 200, "{snap}");
            if snap["streamStatus"] != json!("in_progress") {
                return snap;
            }
            assert!(Instant::now() < deadline, "run never ended: {snap}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub async fn metrics(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.admin))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

/// A series' value in Prometheus text (`series` with its labels, e.g.
/// `sluice_runs_ended_total{status="error"}`); panics when it is missing.
#[allow(dead_code)]
pub fn metric(metrics: &str, series: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("{series} missing from metrics:\n{metrics}"))
}

/// One SSE event as a client sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Sse {
    pub id: Option<String>,
    pub data: String,
}

/// A minimal, independent SSE reader for tests (LF framing, which is what Sluice sends).
/// Returns the events and the comment lines seen.
pub fn parse_sse(body: &str) -> (Vec<Sse>, Vec<String>) {
    let mut events = Vec::new();
    let mut comments = Vec::new();
    for block in body.split("\n\n") {
        let mut id = None;
        let mut data: Vec<&str> = Vec::new();
        for line in block.lines() {
            if let Some(c) = line.strip_prefix(':') {
                comments.push(c.trim().to_string());
            } else if let Some(v) = line.strip_prefix("id: ") {
                id = Some(v.to_string());
            } else if let Some(v) = line.strip_prefix("data: ") {
                data.push(v);
            }
        }
        if !data.is_empty() {
            events.push(Sse {
                id,
                data: data.join("\n"),
            });
        }
    }
    (events, comments)
}

/// An independent re-implementation of the AI SDK v5 client reducer (processUIMessageStream),
/// enough to rebuild the assistant message from UI-message chunks and to reject violations.
pub fn reduce_ui(chunks: &[Value]) -> Result<Value, String> {
    let mut id = Value::Null;
    let mut parts: Vec<Value> = Vec::new();
    let mut open_text: std::collections::HashMap<String, usize> = Default::default();
    let mut open_reasoning: std::collections::HashMap<String, usize> = Default::default();
    let mut tools: std::collections::HashMap<String, usize> = Default::default();
    for c in chunks {
        let t = c["type"].as_str().ok_or("chunk without type")?;
        match t {
            "start" => {
                if let Some(m) = c.get("messageId") {
                    id = m.clone();
                }
            }
            "start-step" => parts.push(json!({"type": "step-start"})),
            "finish-step" => {
                open_text.clear();
                open_reasoning.clear();
            }
            "text-start" | "reasoning-start" => {
                let kind = if t == "text-start" {
                    "text"
                } else {
                    "reasoning"
                };
                let mut part = json!({"type": kind, "text": "", "state": "streaming"});
                if kind == "reasoning" {
                    // Current v5 clients keep the reasoning part's id (text parts have none).
                    part["id"] = c["id"].clone();
                }
                parts.push(part);
                let map = if kind == "text" {
                    &mut open_text
                } else {
                    &mut open_reasoning
                };
                map.insert(c["id"].as_str().ok_or("no id")?.into(), parts.len() - 1);
            }
            "text-delta" | "reasoning-delta" => {
                let map = if t == "text-delta" {
                    &open_text
                } else {
                    &open_reasoning
                };
                let i = *map
                    .get(c["id"].as_str().ok_or("no id")?)
                    .ok_or(format!("{t} without start"))?;
                let cur = parts[i]["text"].as_str().unwrap().to_string();
                parts[i]["text"] = json!(cur + c["delta"].as_str().ok_or("no delta")?);
            }
            "text-end" | "reasoning-end" => {
                let map = if t == "text-end" {
                    &mut open_text
                } else {
                    &mut open_reasoning
                };
                let i = map
                    .remove(c["id"].as_str().ok_or("no id")?)
                    .ok_or(format!("{t} without start"))?;
                parts[i]["state"] = json!("done");
            }
            "tool-input-start" => {
                let call = c["toolCallId"].as_str().ok_or("no toolCallId")?.to_string();
                let name = c["toolName"].as_str().ok_or("no toolName")?;
                parts.push(json!({"type": format!("tool-{name}"), "toolCallId": call, "state": "input-streaming", "providerExecuted": c["providerExecuted"].clone()}));
                tools.insert(call, parts.len() - 1);
            }
            "tool-input-available" => {
                let call = c["toolCallId"].as_str().ok_or("no toolCallId")?.to_string();
                let i = match tools.get(&call) {
                    Some(i) => *i,
                    None => {
                        let name = c["toolName"].as_str().ok_or("no toolName")?;
                        parts.push(json!({"type": format!("tool-{name}"), "toolCallId": call, "providerExecuted": c["providerExecuted"].clone()}));
                        tools.insert(call, parts.len() - 1);
                        parts.len() - 1
                    }
                };
                parts[i]["state"] = json!("input-available");
                parts[i]["input"] = c["input"].clone();
            }
            "tool-output-available" | "tool-output-error" => {
                let call = c["toolCallId"].as_str().ok_or("no toolCallId")?;
                let i = *tools.get(call).ok_or(format!("{t} before tool input"))?;
                if t == "tool-output-available" {
                    parts[i]["state"] = json!("output-available");
                    parts[i]["output"] = c["output"].clone();
                } else {
                    parts[i]["state"] = json!("output-error");
                    parts[i]["errorText"] = c["errorText"].clone();
                }
            }
            "tool-input-delta" => {
                let call = c["toolCallId"].as_str().ok_or("no toolCallId")?;
                tools
                    .get(call)
                    .ok_or(format!("{t} before tool-input-start"))?;
                c["inputTextDelta"].as_str().ok_or("no inputTextDelta")?;
            }
            "source-url" => {
                let mut part = json!({"type": t, "sourceId": c["sourceId"], "url": c["url"]});
                if let Some(title) = c.get("title") {
                    part["title"] = title.clone();
                }
                parts.push(part);
            }
            "source-document" => {
                let mut part = json!({"type": t, "sourceId": c["sourceId"],
                                      "mediaType": c["mediaType"], "title": c["title"]});
                if let Some(f) = c.get("filename") {
                    part["filename"] = f.clone();
                }
                parts.push(part);
            }
            "file" => {
                parts.push(json!({"type": "file", "mediaType": c["mediaType"], "url": c["url"]}))
            }
            "error" | "finish" | "abort" | "message-metadata" => {}
            other if other.starts_with("data-") => {
                if c.get("transient") == Some(&json!(true)) {
                    continue;
                }
                let mut part = json!({"type": other, "data": c["data"].clone()});
                if let Some(pid) = c.get("id") {
                    part["id"] = pid.clone();
                    if let Some(existing) = parts
                        .iter_mut()
                        .find(|p| p["type"] == json!(other) && p.get("id") == Some(pid))
                    {
                        existing["data"] = c["data"].clone();
                        continue;
                    }
                }
                parts.push(part);
            }
            other => return Err(format!("unknown chunk type {other}")),
        }
    }
    Ok(json!({"id": id, "role": "assistant", "parts": parts}))
}

/// `GET /api/threads/{thread}/stream{query}`, with `Last-Event-ID: last` when given; the status
/// and the whole body.
pub async fn get_stream(
    gw: &Gateway,
    thread: &str,
    last: Option<&str>,
    query: &str,
) -> (u16, String) {
    let mut req = gw
        .http
        .get(gw.url(&format!("/api/threads/{thread}/stream{query}")));
    if let Some(id) = last {
        req = req.header("last-event-id", id);
    }
    let resp = req.send().await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

/// Stream an invoke to its end; returns (threadId, runId, events, comments, headers).
pub async fn stream_invoke(gw: &Gateway, text: &str, thread: Option<&str>) -> Streamed {
    let resp = gw
        .http
        .post(gw.url("/api/invokeAgent"))
        .json(&invoke_body(json!(1), text, thread))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let headers = resp.headers().clone();
    let body = resp.text().await.unwrap();
    let (events, comments) = parse_sse(&body);
    Streamed {
        thread: headers["x-thread-id"].to_str().unwrap().to_string(),
        run: headers["x-run-id"].to_str().unwrap().to_string(),
        events,
        comments,
        headers,
    }
}

pub struct Streamed {
    pub thread: String,
    pub run: String,
    pub events: Vec<Sse>,
    pub comments: Vec<String>,
    pub headers: reqwest::header::HeaderMap,
}

impl Streamed {
    /// The JSON chunks, with `[DONE]` checked to be last and removed.
    pub fn chunks(&self) -> Vec<Value> {
        let last = self.events.last().expect("stream has events");
        assert_eq!(last.data, "[DONE]", "stream must end with [DONE]");
        self.events[..self.events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(&e.data).expect("chunk is JSON"))
            .collect()
    }
}

/// Concatenated text of a message's text parts.
pub fn text_of(message: &Value) -> String {
    message["parts"]
        .as_array()
        .map(|parts| {
            parts
                .iter()
                .filter(|p| p["type"] == "text")
                .filter_map(|p| p["text"].as_str())
                .collect::<String>()
        })
        .unwrap_or_default()
}

/// The mock agent's answer in the `text` scenario (mirrors `sluice::mock::scenario::text_answer`).
pub fn expected_answer(message: &str, turn: u64) -> String {
    sluice::mock::scenario::text_answer(message, turn)
}

/// A real HTTP server on loopback serving a JWKS that tests can change, take down, and count.
pub struct JwksServer {
    pub url: String,
    pub jwks: std::sync::Arc<std::sync::Mutex<Value>>,
    pub up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    pub hits: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl JwksServer {
    pub fn start(jwks: Value) -> JwksServer {
        use std::io::{Read, Write};
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = JwksServer {
            url: format!("http://{addr}/.well-known/jwks.json"),
            jwks: std::sync::Arc::new(std::sync::Mutex::new(jwks)),
            up: std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true)),
            hits: std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        };
        let (jwks, up, hits) = (server.jwks.clone(), server.up.clone(), server.hits.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                hits.fetch_add(1, Ordering::SeqCst);
                let (status, body) = if up.load(Ordering::SeqCst) {
                    ("200 OK", jwks.lock().unwrap().to_string())
                } else {
                    (
                        "503 Service Unavailable",
                        "{\"error\":\"down\"}".to_string(),
                    )
                };
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        server
    }

    pub fn hits(&self) -> usize {
        self.hits.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn set_up(&self, up: bool) {
        self.up.store(up, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn set(&self, jwks: Value) {
        *self.jwks.lock().unwrap() = jwks;
    }
}

/// Run one printed `curl` command (its first stage, before any `| …`) with `THREAD_ID` replaced
/// by `thread` and `tokens` in the environment; return the HTTP status it got.
pub fn curl_status(cmd: &str, thread: &str, tokens: &[(String, String)]) -> String {
    let cmd = cmd.replace("THREAD_ID", thread).replacen(
        "curl ",
        "curl -sS -o /dev/null -w '%{http_code}' --max-time 30 ",
        1,
    );
    let cmd = match cmd.find(" | ") {
        Some(i) => cmd[..i].to_string(),
        None => cmd,
    };
    let out = Command::new("sh")
        .arg("-c")
        .arg(&cmd)
        .envs(tokens.iter().cloned())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// `curl` commands of the ```sh blocks in `text` (continuation lines joined, comments dropped).
pub fn curl_commands(text: &str, fenced: bool) -> Vec<String> {
    let mut out = Vec::new();
    let mut inside = !fenced;
    let mut current = String::new();
    for line in text.lines() {
        let t = line.trim();
        if fenced && t.starts_with("```") {
            inside = t == "```sh";
            continue;
        }
        if !inside {
            continue;
        }
        let t = match t.find("  #") {
            Some(i) => t[..i].trim_end(),
            None => t,
        };
        if current.is_empty() && !t.starts_with("curl ") {
            continue;
        }
        if let Some(head) = t.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
        } else {
            current.push_str(t);
            out.push(std::mem::take(&mut current));
        }
    }
    out
}

/// The issuer of [`JwtGateway`]'s tokens.
pub const TEST_ISSUER: &str = "https://clerk.test.local";

/// A gateway (over a mock agent) verifying Clerk-style tokens from a JWKS server of its own,
/// and a way to mint them.
pub struct JwtGateway {
    _jwks: JwksServer,
    key: jsonwebtoken::EncodingKey,
    kid: String,
    pub mock: Proc,
    pub gw: Gateway,
}

impl JwtGateway {
    pub fn new() -> JwtGateway {
        let (key, jwk, kid) = sluice::auth::testkeys::generate_rsa().unwrap();
        let jwks = JwksServer::start(sluice::auth::testkeys::jwks(&[jwk]));
        let mock = mock_agent();
        let auth = format!(
            "mode = \"jwt\"\nissuer = \"{TEST_ISSUER}\"\njwks_url = \"{}\"\n",
            jwks.url
        );
        let gw = gateway_auth(&mock.addrs[0], &auth, "", "");
        JwtGateway {
            _jwks: jwks,
            key,
            kid,
            mock,
            gw,
        }
    }

    /// An `org:admin` token (Clerk v2 claims) of `user` in `org`, valid for 15 minutes.
    pub fn admin(&self, user: &str, org: &str) -> String {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let claims = json!({"iss": TEST_ISSUER, "sub": user, "iat": t, "nbf": t - 5, "exp": t + 900,
                            "sid": "sess_1", "azp": "http://localhost:3000", "v": 2, "sts": "active",
                            "o": {"id": org, "rol": "admin", "slg": org}});
        sluice::auth::testkeys::mint(
            &claims,
            &self.key,
            jsonwebtoken::Algorithm::RS256,
            Some(&self.kid),
        )
        .unwrap()
    }
}
