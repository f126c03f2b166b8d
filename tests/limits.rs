//! Bounded and fair under abuse, against the real binary: per-organisation quotas (JWT-verified
//! organisations, tokens minted here) and a flood of large messages, large events, readers
//! that never read and long-polls against a small memory budget.

mod common;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{json, Value};
use sluice::auth::testkeys;
use tokio::io::AsyncWriteExt;

const ISS: &str = "https://clerk.test.local";

/// A gateway with JWT auth, and tokens for any organisation.
struct Orgs {
    _jwks: JwksServer,
    key: EncodingKey,
    kid: String,
    _mock: Proc,
    gw: Gateway,
}

impl Orgs {
    fn new(extra: &str) -> Orgs {
        let (key, jwk, kid) = testkeys::generate_rsa().unwrap();
        let jwks = JwksServer::start(testkeys::jwks(&[jwk]));
        let mock = mock_agent();
        let auth = format!(
            "mode = \"jwt\"\nissuer = \"{ISS}\"\njwks_url = \"{}\"\n",
            jwks.url
        );
        let gw = gateway_auth(&mock.addrs[0], &auth, "", extra);
        Orgs {
            _jwks: jwks,
            key,
            kid,
            _mock: mock,
            gw,
        }
    }

    fn token(&self, org: &str) -> String {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let claims = json!({"iss": ISS, "sub": format!("user_{org}"), "iat": t, "nbf": t - 5,
            "exp": t + 600, "sid": "sess_1", "v": 2, "sts": "active",
            "o": {"id": org, "rol": "admin", "slg": org}});
        testkeys::mint(&claims, &self.key, Algorithm::RS256, Some(&self.kid)).unwrap()
    }

    /// Invoke in 202 mode as `org` with a user message of `text`.
    async fn invoke(&self, org: &str, text: &str) -> reqwest::Response {
        self.gw
            .invoke_as(Some(&self.token(org)), text, None, true)
            .await
    }

    async fn get(&self, org: &str, path: &str) -> reqwest::Response {
        self.gw
            .http
            .get(self.gw.url(path))
            .bearer_auth(self.token(org))
            .send()
            .await
            .unwrap()
    }
}

/// A `429 quota_exceeded` naming `quota`, with `Retry-After`.
async fn assert_quota(resp: reqwest::Response, quota: &str) {
    assert_eq!(resp.status(), 429, "{quota}: {:?}", resp.text().await);
    assert_eq!(resp.headers()["retry-after"], "3");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "quota_exceeded", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains(quota), "{message}");
}

fn ids(resp: &reqwest::Response) -> (String, String) {
    let h = |k: &str| resp.headers()[k].to_str().unwrap().to_string();
    (h("x-thread-id"), h("x-run-id"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_organisation_at_its_quota_is_refused_while_another_is_untouched() {
    let orgs = Orgs::new(
        "[limits]\nmax_bytes_per_run = 1048576\n\
         [limits.per_org]\nmax_running_runs = 2\nmax_streams = 2\nmax_long_polls = 2\n\
         retry_after = \"3s\"\n\
         [limits.per_org.overrides.org_c]\nmax_running_runs = 100\nmax_bytes = 1200000\n",
    );
    // Organisation B has a finished conversation.
    let resp = orgs.invoke("org_b", "hello from b").await;
    assert_eq!(resp.status(), 202);
    let (b_thread, _) = ids(&resp);
    let b_before = orgs
        .gw
        .wait_terminal_as(&orgs.token("org_b"), &b_thread)
        .await;
    assert_eq!(b_before["streamStatus"], "completed");

    // Organisation A starts runs up to its quota, then is refused.
    // Runs that last (30 s) unless stopped.
    let slow = "scenario:slow tokens=600 delay_ms=50";
    let mut a_threads = Vec::new();
    for _ in 0..2 {
        let resp = orgs.invoke("org_a", slow).await;
        assert_eq!(resp.status(), 202);
        a_threads.push(ids(&resp).0);
    }
    assert_quota(orgs.invoke("org_a", slow).await, "running_runs").await;

    // Its streams and long-polls have quotas of their own.
    let mut held = Vec::new();
    for t in &a_threads {
        let resp = orgs.get("org_a", &format!("/api/threads/{t}/stream")).await;
        assert_eq!(resp.status(), 200);
        held.push(resp);
    }
    let third = orgs
        .get("org_a", &format!("/api/threads/{}/stream", a_threads[0]))
        .await;
    assert_quota(third, "streams").await;
    let poll = |t: String| {
        let path = format!("/api/getConversation?threadId={t}&wait=20&afterSeq=100000");
        let gw_http = orgs.gw.http.clone();
        let url = orgs.gw.url(&path);
        let token = orgs.token("org_a");
        tokio::spawn(async move { gw_http.get(url).bearer_auth(token).send().await })
    };
    let waiting = [poll(a_threads[0].clone()), poll(a_threads[1].clone())];
    // Let both take their slots.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let resp = orgs
        .get(
            "org_a",
            &format!("/api/getConversation?threadId={}&wait=20", a_threads[0]),
        )
        .await;
    assert_quota(resp, "long_polls").await;

    // Meanwhile organisation B is untouched: a new run, a stream, a long-poll, and its finished
    // conversation as it was.
    let resp = orgs.invoke("org_b", "hello again").await;
    assert_eq!(resp.status(), 202);
    let (b2_thread, _) = ids(&resp);
    let resp = orgs
        .get("org_b", &format!("/api/threads/{b2_thread}/stream"))
        .await;
    assert_eq!(resp.status(), 200);
    let body = resp.text().await.unwrap();
    assert!(body.contains("data: [DONE]"), "{body}");
    let b_after = orgs
        .gw
        .conversation_as(Some(&orgs.token("org_b")), &b_thread)
        .await;
    assert_eq!(b_after, (200, b_before));

    // Organisation C holds at most its bytes: large messages count.
    let big = format!(
        "scenario:slow tokens=200 delay_ms=50 {}",
        "x".repeat(300_000)
    );
    let mut c_statuses = Vec::new();
    for _ in 0..6 {
        let resp = orgs.invoke("org_c", &big).await;
        c_statuses.push(resp.status().as_u16());
        if resp.status() == 429 {
            assert_quota(resp, "bytes").await;
            break;
        }
    }
    assert!(
        c_statuses.starts_with(&[202, 202]) && c_statuses.last() == Some(&429),
        "{c_statuses:?}"
    );

    // A run's end gives its place back.
    drop(held);
    for w in waiting {
        w.abort();
    }
    let stop = orgs
        .gw
        .http
        .post(orgs.gw.url(&format!("/api/threads/{}/stop", a_threads[0])))
        .bearer_auth(orgs.token("org_a"))
        .send()
        .await
        .unwrap();
    assert!(stop.status().is_success(), "{:?}", stop.text().await);
    orgs.gw
        .wait_terminal_as(&orgs.token("org_a"), &a_threads[0])
        .await;
    let resp = orgs.invoke("org_a", "hello").await;
    assert_eq!(resp.status(), 202);

    let metrics = orgs.gw.metrics().await;
    for reason in ["running_runs", "streams", "long_polls", "bytes"] {
        let n = metric(
            &metrics,
            &format!("sluice_quota_refusals_total{{reason=\"{reason}\"}}"),
        );
        assert!(n >= 1, "{reason}: {n}");
    }
    assert!(!metrics.contains("org_a"), "no organisation ids in labels");
}

/// The resident set of a process, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// What the flood test allows above `max_total_bytes`: the idle process (about 24 MiB for the
/// debug build tests run), plus what requests in flight hold (`SENDERS` messages of
/// `MESSAGE_BYTES` each read, parsed and forwarded to the backend; 30 snapshots of threads with
/// such messages; two backends' 300 kB events being decoded), plus allocator slack. Measured
/// peaks: 64 to 82 MiB at a 24 MiB budget, 110 MiB at 48 MiB (`docs/benchmarks.md`).
const OVERHEAD_BYTES: u64 = 72 << 20;
const SENDERS: usize = 8;
const MESSAGE_BYTES: usize = 400_000;
const MAX_TOTAL: u64 = 24 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_is_bounded_and_accepted_runs_keep_every_event() {
    let mock = mock_agent();
    let gw = gateway_conf(
        &mock.addrs[0],
        "",
        "",
        "mode = \"disabled\"\n",
        &format!(
            "[limits]\nmax_total_bytes = {MAX_TOTAL}\nmax_bytes_per_run = 2097152\n\
             [limits.per_org]\nmax_running_runs = 8\nmax_bytes = {MAX_TOTAL}\n\
             [stream]\nstuck_reader_timeout = \"2s\"\n\
             [store]\nfull_retry_after = \"1s\"\n"
        ),
    );
    // Runs in progress (at most 8, each holding at most about 1 MiB: its message, or 300 kB
    // of events, or 3,000 events) always fit the budget once finished runs are evicted: that is
    // what lets every accepted run keep every event.
    let pid = gw.proc.pid();
    let idle = rss(pid);
    let flood_for = Duration::from_secs(12);
    let until = Instant::now() + flood_for;
    let gw = std::sync::Arc::new(gw);
    let accepted = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(String, String)>::new()));

    // Senders: runs with large user messages, large events, many events.
    let mut tasks = Vec::new();
    for i in 0..SENDERS + 4 {
        let gw = gw.clone();
        let accepted = accepted.clone();
        tasks.push(tokio::spawn(async move {
            let mut refused = 0u32;
            let mut n = 0;
            while Instant::now() < until {
                n += 1;
                let text = match i {
                    i if i < SENDERS => format!("flood {i}.{n} {}", "m".repeat(MESSAGE_BYTES)),
                    i if i < SENDERS + 2 => "scenario:oversize bytes=300000".to_string(),
                    _ => "scenario:long events=3000".to_string(),
                };
                let resp = gw.invoke(&text, None, true).await;
                match resp.status().as_u16() {
                    202 => {
                        let h = |k: &str| resp.headers()[k].to_str().unwrap().to_string();
                        accepted
                            .lock()
                            .unwrap()
                            .push((h("x-thread-id"), text[..text.len().min(40)].to_string()));
                    }
                    429 | 503 => {
                        assert!(resp.headers().contains_key("retry-after"));
                        let body: Value = resp.json().await.unwrap();
                        let code = body["error"]["code"].as_str().unwrap().to_string();
                        assert!(code == "store_full" || code == "quota_exceeded", "{body}");
                        refused += 1;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    other => panic!("unexpected {other}: {:?}", resp.text().await),
                }
            }
            refused
        }));
    }
    // Readers that never read, and long-polls, on whatever was accepted.
    let mut holders = Vec::new();
    for i in 0..60 {
        let gw = gw.clone();
        let accepted = accepted.clone();
        holders.push(tokio::spawn(async move {
            let addr = gw.base.trim_start_matches("http://").to_string();
            while Instant::now() < until {
                let thread = {
                    let a = accepted.lock().unwrap();
                    a.get(i % a.len().max(1)).map(|(t, _)| t.clone())
                };
                let Some(thread) = thread else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                if i % 2 == 0 {
                    // A stream nobody reads: the gateway must cut it, not buffer it.
                    let mut sock = tokio::net::TcpStream::connect(&addr).await.unwrap();
                    let req =
                        format!("GET /api/threads/{thread}/stream HTTP/1.1\r\nhost: x\r\n\r\n");
                    sock.write_all(req.as_bytes()).await.unwrap();
                    tokio::time::sleep(Duration::from_secs(3)).await;
                } else {
                    let resp = gw
                        .http
                        .get(gw.url("/api/getConversation"))
                        .query(&[
                            ("threadId", thread.as_str()),
                            ("wait", "2"),
                            ("afterSeq", "1000000"),
                        ])
                        .send()
                        .await
                        .unwrap();
                    let status = resp.status().as_u16();
                    assert!([200, 410, 429].contains(&status), "long-poll {status}");
                }
            }
        }));
    }
    // Watch the process while it lasts.
    let mut peak = idle;
    let (mut checks, mut healthy) = (0, 0);
    while Instant::now() < until {
        peak = peak.max(rss(pid));
        let health = gw.http.get(format!("{}/healthz", gw.admin)).send().await;
        checks += 1;
        if health.is_ok_and(|r| r.status() == 200) {
            healthy += 1;
        }
        if std::env::var("FLOOD_DEBUG").is_ok() && healthy % 10 == 0 {
            // What the budget counts beside what the process holds.
            let m = gw.metrics().await;
            let held: Vec<&str> = m
                .lines()
                .filter(|l| l.starts_with("sluice_held_bytes{") || l.starts_with("sluice_store_"))
                .collect();
            eprintln!("rss {} MiB {held:?}", rss(pid) >> 20);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut refused = 0;
    for t in tasks {
        refused += t.await.expect("sender did not panic");
    }
    for h in holders {
        h.await.expect("reader did not panic");
    }
    peak = peak.max(rss(pid));
    let accepted = accepted.lock().unwrap().clone();
    eprintln!(
        "flood: {} runs accepted, {refused} refused; RSS idle {} MiB, peak {} MiB (budget {} MiB)",
        accepted.len(),
        idle >> 20,
        peak >> 20,
        MAX_TOTAL >> 20
    );
    assert!(accepted.len() >= 10, "the gateway kept accepting work");
    assert!(refused > 0, "the flood reached the limits");
    assert!(
        checks >= 10 && healthy == checks,
        "the gateway kept answering: {healthy} of {checks} health checks"
    );
    assert!(
        peak <= MAX_TOTAL + OVERHEAD_BYTES,
        "RSS peaked at {} MiB, over {} + {} MiB",
        peak >> 20,
        MAX_TOTAL >> 20,
        OVERHEAD_BYTES >> 20
    );

    // Every accepted run ends completed: none lost an event to the budget.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let m = gw.metrics().await;
        let ended = |status: &str| {
            metric(
                &m,
                &format!("sluice_runs_ended_total{{status=\"{status}\"}}"),
            )
        };
        let completed = ended("completed");
        let failed = ended("error") + ended("timeout");
        assert_eq!(failed, 0, "accepted runs failed:\n{m}");
        if completed == accepted.len() as u64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{completed} of {} accepted runs completed",
            accepted.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Those still retained hold exactly their answer.
    let mut checked = 0;
    for (thread, text) in &accepted {
        let (status, snap) = gw.conversation(thread).await;
        if status != 200 || snap["messages"].as_array().is_none_or(|m| m.len() < 2) {
            continue;
        }
        assert_eq!(snap["streamStatus"], "completed");
        if text.starts_with("flood") {
            let user = text_of(&snap["messages"][0]);
            assert_eq!(
                text_of(&snap["messages"][1]),
                expected_answer(&user, 1),
                "{thread}"
            );
            checked += 1;
        }
    }
    assert!(
        checked > 0,
        "some flooded runs were still retained to check"
    );
    // And it still takes new work.
    let resp = gw.invoke("hello after the flood", None, true).await;
    assert!([202, 503].contains(&resp.status().as_u16()));
}

#[tokio::test]
async fn connections_beyond_the_cap_are_refused_and_closed() {
    use tokio::io::AsyncReadExt;
    let mock = mock_agent();
    let gw = gateway_conf(
        &mock.addrs[0],
        "max_connections = 3\n",
        "",
        "mode = \"disabled\"\n",
        "",
    );
    let addr = gw.base.trim_start_matches("http://").to_string();
    // Three connections held open (idle, keep-alive): the cap.
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut sock = tokio::net::TcpStream::connect(&addr).await.unwrap();
        sock.write_all(b"GET /api/nothing HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0; 4096];
        let n = sock.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 404"));
        held.push(sock);
    }
    // A fourth: 503 overloaded with Retry-After, then closed.
    let mut extra = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), extra.read_to_string(&mut answer))
        .await
        .expect("the refused connection is closed")
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("retry-after: 1"), "{answer}");
    assert!(answer.contains("\"code\":\"overloaded\""), "{answer}");
    // One closed: room for another.
    held.pop();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let resp = reqwest::Client::new()
            .get(gw.url("/api/getConversation?threadId=x"))
            .send()
            .await;
        if resp.as_ref().is_ok_and(|r| r.status() == 404) {
            break;
        }
        assert!(Instant::now() < deadline, "never served again: {resp:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let m = gw.metrics().await;
    assert!(!m.contains("sluice_connections_refused_total 0\n"), "{m}");
}

#[tokio::test]
async fn request_bodies_in_flight_are_bounded() {
    use tokio::io::AsyncReadExt;
    let mock = mock_agent();
    let gw = gateway_with(
        &mock.addrs[0],
        "",
        "[limits]\nmax_body_bytes = 65536\nmax_body_bytes_in_flight = 131072\n",
    );
    let addr = gw.base.trim_start_matches("http://").to_string();
    let body = serde_json::to_vec(&invoke_body(json!(1), &"x".repeat(60_000), None)).unwrap();
    let head = |len: usize| {
        format!(
            "POST /api/invokeAgent HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
             x-stream-response: false\r\ncontent-length: {len}\r\n\r\n"
        )
    };
    // Two clients send all of their body but its last byte: about 120 kB held.
    let mut slow = Vec::new();
    for _ in 0..2 {
        let mut sock = tokio::net::TcpStream::connect(&addr).await.unwrap();
        sock.write_all(head(body.len()).as_bytes()).await.unwrap();
        sock.write_all(&body[..body.len() - 1]).await.unwrap();
        slow.push(sock);
    }
    // Once the gateway holds them...
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = gw.metrics().await;
        let held = metric(&m, "sluice_request_body_bytes");
        if held >= 2 * (body.len() as u64 - 1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the slow bodies were never read: {held}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // ...a third body does not fit beside them: 503 overloaded, and the connection closed.
    let refused = gw
        .http
        .post(gw.url("/api/invokeAgent"))
        .header("x-stream-response", "false")
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "1");
    let err: Value = refused.json().await.unwrap();
    assert_eq!(err["error"]["code"], "overloaded", "{err}");
    // The held bodies complete and are answered; then there is room again.
    for mut sock in slow {
        sock.write_all(&body[body.len() - 1..]).await.unwrap();
        let mut buf = vec![0; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), sock.read(&mut buf))
            .await
            .expect("answered")
            .unwrap();
        let answer = String::from_utf8_lossy(&buf[..n]);
        assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
    }
    let resp = gw.invoke(&"y".repeat(60_000), None, true).await;
    assert_eq!(resp.status(), 202);
    // A body abandoned half-way (the client goes) or refused as too large is given back.
    let mut gone = tokio::net::TcpStream::connect(&addr).await.unwrap();
    gone.write_all(head(body.len()).as_bytes()).await.unwrap();
    gone.write_all(&body[..30_000]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(gone);
    let big = gw
        .http
        .post(gw.url("/api/invokeAgent"))
        .header("transfer-encoding", "chunked")
        .body(reqwest::Body::wrap_stream(chunked(vec![vec![
            b'x';
            70_000
        ]])))
        .send()
        .await
        .unwrap();
    assert_eq!(big.status(), 413);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = gw.metrics().await;
        if m.lines().any(|l| l == "sluice_request_body_bytes 0") {
            break;
        }
        assert!(Instant::now() < deadline, "bodies never given back:\n{m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A body sent as a stream of chunks (so that its length is not announced).
fn chunked(
    chunks: Vec<Vec<u8>>,
) -> impl futures_util::Stream<Item = Result<Vec<u8>, std::io::Error>> {
    futures_util::stream::iter(chunks.into_iter().map(Ok))
}
