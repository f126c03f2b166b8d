//! Every upstream adapter behind every client dialect: the mock agent plays the same scenario as
//! an AgentFlow backend, a UI-message backend and a poll-only backend, and clients must not be
//! able to tell which one ran: same snapshot, same stream (a poll backend's in the steps it was
//! polled in), same resume, long-poll and stop behaviour, streams as the answer grows. Then what
//! only a poll backend does: Retry-After, rewrites, lost runs, back-off on a slow backend,
//! bounded connections.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// A UI-message stream reduced to what every adapter can show: transient chunks (a poll backend
/// has none to show) and streamed tool input left out, a part's deltas merged into its first
/// (polls see text grow in steps), consecutive updates of one data part reduced to the last,
/// ids by order of appearance.
fn stream_shape(chunks: &[Value]) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::new();
    for c in chunks {
        let ty = c["type"].as_str().unwrap_or("");
        if c["transient"] == json!(true) || ty == "tool-input-delta" {
            continue;
        }
        if ty == "text-delta" || ty == "reasoning-delta" {
            // All of an open part's text in its first delta: a poll backend cannot tell
            // where, among other parts, the text grew.
            if let Some(first) = out
                .iter_mut()
                .find(|p| p["type"] == c["type"] && p["id"] == c["id"])
            {
                let joined = format!(
                    "{}{}",
                    first["delta"].as_str().unwrap_or(""),
                    c["delta"].as_str().unwrap_or("")
                );
                first["delta"] = json!(joined);
                continue;
            }
        }
        if let Some(last) = out.last_mut() {
            if ty.starts_with("data-") && last["type"] == c["type"] && last["id"] == c["id"] {
                *last = c.clone();
                continue;
            }
        }
        let mut c = c.clone();
        if ty == "start" {
            // Each run's own assistant message id.
            c["messageId"] = json!("<message>");
        }
        out.push(c);
    }
    normalize_ids(&out)
}

/// A UI-message stream as it is, but for ids (by order of appearance), the run's message id
/// and root call id, and without `tool-input-delta` chunks (an AgentFlow backend does not
/// stream tool input).
fn stream_exact(chunks: &[Value]) -> Vec<Value> {
    let kept: Vec<Value> = chunks
        .iter()
        .filter(|c| c["type"] != "tool-input-delta")
        .map(|c| {
            let mut c = c.clone();
            if c["type"] == "start" {
                c["messageId"] = json!("<message>");
            }
            // AgentFlow payloads carried in data chunks name the run's root call.
            for key in ["parent_call_id", "root_call_id"] {
                if c["data"].get(key).is_some_and(Value::is_string) {
                    c["data"][key] = json!("<root>");
                }
            }
            c
        })
        .collect();
    normalize_ids(&kept)
}

/// What a client sees of one run: the snapshot's assistant message (ids normalised), its status
/// and error text, the stream as it is (`exact`) and reduced to what a poll backend can show
/// (`shape`). Each stream is also checked to rebuild the snapshot with an independent AI
/// SDK-style reducer.
#[derive(Debug, PartialEq)]
struct Seen {
    message: Value,
    status: Value,
    error: Value,
    exact: Vec<Value>,
    shape: Vec<Value>,
}

async fn see(gw: &Gateway, prompt: &str) -> Seen {
    let streamed = stream_invoke(gw, prompt, None).await;
    let chunks = streamed.chunks();
    let snap = gw.wait_terminal(&streamed.thread).await;
    let message = snap["messages"][1].clone();
    let reduced = reduce_ui(&chunks).unwrap_or_else(|e| panic!("{prompt}: {e}"));
    assert_eq!(
        reduced, message,
        "{prompt}: the stream rebuilds the snapshot"
    );
    Seen {
        message: normalize_ids(&[message]).remove(0),
        status: snap["streamStatus"].clone(),
        error: snap["errorText"].clone(),
        exact: stream_exact(&chunks),
        shape: stream_shape(&chunks),
    }
}

#[tokio::test]
async fn the_same_scenario_gives_the_same_snapshot_and_stream_over_every_adapter() {
    let prompts = [
        "Hello there",
        "scenario:reasoning",
        "scenario:tools",
        "scenario:rich",
        "scenario:error",
        "scenario:text upper=1",
    ];
    let mut seen: Vec<Vec<Seen>> = Vec::new();
    for dialect in DIALECTS {
        let (_mock, gw) = over(dialect, "");
        let mut runs = Vec::new();
        for p in prompts {
            runs.push(see(&gw, p).await);
        }
        seen.push(runs);
    }
    for (i, prompt) in prompts.iter().enumerate() {
        let reference = &seen[0][i];
        let want_status = if prompt.contains("error") {
            "error"
        } else {
            "completed"
        };
        assert_eq!(reference.status, json!(want_status), "{prompt}");
        // A UI-message backend streams exactly what an AgentFlow one does.
        assert_eq!(
            seen[1][i], *reference,
            "{prompt}: the ui-message upstream differs from agentflow"
        );
        // A poll backend shows the same run in the steps it was polled in.
        let (poll, reference) = (&seen[2][i], &seen[0][i]);
        assert_eq!(
            (&poll.message, &poll.status, &poll.error, &poll.shape),
            (
                &reference.message,
                &reference.status,
                &reference.error,
                &reference.shape
            ),
            "{prompt}: the poll upstream differs from agentflow"
        );
    }
    // The rich scenario really carried sources, files and data parts through.
    let rich = &seen[2][3].message;
    let types: Vec<&str> = rich["parts"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["type"].as_str())
        .collect();
    for t in ["source-url", "source-document", "file", "data-weather"] {
        assert!(types.contains(&t), "{t} missing from {rich}");
    }
}

#[tokio::test]
async fn resume_and_long_poll_work_over_every_adapter() {
    for dialect in DIALECTS {
        let (_mock, gw) = over(dialect, "");
        let (thread, _) = gw.start("scenario:tools", None).await;
        // Long-poll: held until the log passes afterSeq=1 (the run has just started).
        let resp = gw
            .http
            .get(gw.url("/api/getConversation"))
            .query(&[
                ("threadId", thread.as_str()),
                ("afterSeq", "1"),
                ("wait", "10"),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{dialect}");
        let first: Value = resp.json().await.unwrap();
        assert!(first["lastSeq"].as_u64().unwrap() > 1, "{dialect}: {first}");
        let snap = gw.wait_terminal(&thread).await;
        assert_eq!(snap["streamStatus"], "completed", "{dialect}");
        for format in ["", "&format=agentflow"] {
            let (status, body) =
                get_stream(&gw, &thread, None, &format!("?afterSeq=0{format}")).await;
            assert_eq!(status, 200, "{dialect}{format}");
            let (full, _) = parse_sse(&body);
            let n = full.len() - usize::from(format.is_empty());
            for i in (0..n).step_by(2) {
                let id = full[i].id.clone().unwrap();
                let (status, body) =
                    get_stream(&gw, &thread, Some(&id), &format!("?x=1{format}")).await;
                let rest: Vec<Sse> = full[i + 1..].to_vec();
                if rest.iter().all(|e| e.data == "[DONE]") {
                    assert_eq!(status, 204, "{dialect}{format} after {id}");
                    continue;
                }
                assert_eq!(status, 200, "{dialect}{format} after {id}: {body}");
                assert_eq!(
                    parse_sse(&body).0,
                    rest,
                    "{dialect}{format}: resume after {id}"
                );
            }
        }
    }
}

#[tokio::test]
async fn ui_message_and_poll_only_backends_stream_as_the_answer_grows() {
    for dialect in ["ui-message", "poll"] {
        stream_latency_over(dialect).await;
    }
}

/// 30 tokens, one every 100 ms (3 s); the gateway polls every 20 ms to 100 ms.
async fn stream_latency_over(dialect: &str) {
    let (_mock, gw) = over(dialect, "");
    let mut resp = gw
        .invoke("scenario:slow tokens=30 delay_ms=100", None, false)
        .await;
    assert_eq!(resp.status(), 200);
    let started = Instant::now();
    let mut body = String::new();
    let mut arrivals: Vec<Duration> = Vec::new();
    while let Some(chunk) = resp.chunk().await.unwrap() {
        let text = String::from_utf8_lossy(&chunk);
        let deltas = text.matches("\"text-delta\"").count();
        arrivals.extend(std::iter::repeat_n(started.elapsed(), deltas));
        body.push_str(&text);
    }
    let (events, _) = parse_sse(&body);
    assert_eq!(events.last().unwrap().data, "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(&e.data).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .filter(|c| c["type"] == "text-delta")
        .map(|c| c["delta"].as_str().unwrap())
        .collect();
    let want: String = (0..30).map(|i| format!("token{i} ")).collect();
    assert_eq!(text, want, "{dialect}");
    // Streamed as it grew, not in one piece at the end. A token comes every 100 ms and is seen
    // within one poll interval (at most 100 ms here): most tokens arrive as their own delta,
    // the typical gap is about a token's time, and no gap (the first one counted from the
    // stream's start) comes near the 3 s the answer takes. The bounds leave room for a loaded
    // machine.
    assert!(
        arrivals.len() >= 10,
        "{dialect}: only {} deltas: {body}",
        arrivals.len()
    );
    let mut times = vec![Duration::ZERO];
    times.extend(arrivals);
    let mut gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
    gaps.sort();
    let (median, longest) = (gaps[gaps.len() / 2], gaps[gaps.len() - 1]);
    assert!(
        median < Duration::from_millis(400),
        "{dialect}: median gap {median:?}"
    );
    assert!(
        longest < Duration::from_millis(2000),
        "{dialect}: a {longest:?} gap"
    );
}

async fn stream_agentflow_text(gw: &Gateway, thread: &str) -> Vec<Value> {
    let (status, body) = get_stream(gw, thread, None, "?afterSeq=0&format=agentflow").await;
    assert_eq!(status, 200);
    parse_sse(&body)
        .0
        .iter()
        .map(|e| serde_json::from_str(&e.data).unwrap())
        .collect()
}

#[tokio::test]
async fn a_rewritten_snapshot_is_a_replacement_not_an_append() {
    let (_mock, gw) = over("poll", "");
    // Each step of the text stays up for 500 ms: every one is polled.
    let (thread, _) = gw.start("scenario:rewrite delay_ms=500", None).await;
    let snap = gw.wait_terminal(&thread).await;
    assert_eq!(snap["streamStatus"], "completed");
    let final_text = text_of(&snap["messages"][1]);
    // The same scenario over a streaming backend: the text as finally written.
    let (_m2, af) = over("agentflow", "");
    let (t2, _) = af.start("scenario:rewrite delay_ms=500", None).await;
    let want = text_of(&af.wait_terminal(&t2).await["messages"][1]);
    assert_eq!(final_text, want);
    // The log holds the rewrite as a replacement, for AgentFlow clients too…
    let events = stream_agentflow_text(&gw, &thread).await;
    assert!(
        events.iter().any(|e| e["type"] == "text_replace"),
        "{events:?}"
    );
    // …and UI-message clients are told with a transient data-text-replace.
    let (_, body) = get_stream(&gw, &thread, None, "?afterSeq=0").await;
    assert!(body.contains("\"type\":\"data-text-replace\""), "{body}");
}

#[tokio::test]
async fn a_throttling_backend_is_polled_after_its_retry_after() {
    let (_mock, gw) = over("poll", "");
    let started = Instant::now();
    let (thread, _) = gw
        .start("scenario:slow tokens=6 delay_ms=100 throttle=3", None)
        .await;
    let snap = gw.wait_terminal(&thread).await;
    // The answer takes 0.6 s; the third poll answers 429 with `Retry-After: 1`, and that second
    // was waited.
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "done in {:?}: Retry-After was not honoured",
        started.elapsed()
    );
    assert_eq!(snap["streamStatus"], "completed", "{snap}");
    let want: String = (0..6).map(|i| format!("token{i} ")).collect();
    assert_eq!(text_of(&snap["messages"][1]), want);
    let metrics = gw.metrics().await;
    let throttled = metrics
        .lines()
        .find(|l| l.starts_with("sluice_upstream_polls_total{outcome=\"throttled\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(throttled >= 1.0, "{metrics}");
}

#[tokio::test]
async fn a_run_the_backend_loses_ends_with_error() {
    let (_mock, gw) = over("poll", "");
    let (thread, _) = gw
        .start(
            "scenario:slow tokens=50 delay_ms=50 lose_after_ms=1500",
            None,
        )
        .await;
    let snap = gw.wait_terminal(&thread).await;
    assert_eq!(snap["streamStatus"], "error", "{snap}");
    assert!(
        snap["errorText"].as_str().unwrap().contains("lost"),
        "{snap}"
    );
    // What was seen before the loss is kept.
    assert!(
        text_of(&snap["messages"][1]).starts_with("token0 "),
        "{snap}"
    );
}

#[tokio::test]
async fn many_polled_runs_share_a_few_backend_connections() {
    // Each poll takes 50 ms to answer: 12 runs polling every 20 to 100 ms would have many polls
    // in flight at once, but the gateway allows only 2.
    let most_in_flight = |cap: usize| async move {
        let (mock, gw) = over("poll", &format!("poll_max_connections = {cap}\n"));
        let mut threads = Vec::new();
        for i in 0..12 {
            let (t, _) = gw
                .start(
                    &format!("scenario:slow tokens=4 delay_ms=50 poll_delay_ms=50 run={i}"),
                    None,
                )
                .await;
            threads.push(t);
        }
        let want: String = (0..4).map(|i| format!("token{i} ")).collect();
        for t in threads {
            let snap = gw.wait_terminal(&t).await;
            assert_eq!(snap["streamStatus"], "completed");
            assert_eq!(text_of(&snap["messages"][1]), want);
        }
        mock_active(&gw.http, &mock.addrs[0]).await["polls_in_flight_max"]
            .as_u64()
            .unwrap()
    };
    let capped = most_in_flight(2).await;
    assert!((1..=2).contains(&capped), "{capped} polls at once");
    // Without the cap, the same load does overlap (so the bound above is the gateway's doing).
    let uncapped = most_in_flight(64).await;
    assert!(uncapped > 2, "{uncapped} polls at once without a cap");
}

#[tokio::test]
async fn unknown_chunks_from_newer_ai_sdks_are_kept_not_fatal() {
    let (_mock, gw) = over("ui-message", "");
    let streamed = stream_invoke(&gw, "scenario:future", None).await;
    let snap = gw.wait_terminal(&streamed.thread).await;
    assert_eq!(snap["streamStatus"], "completed", "{snap}");
    assert!(!text_of(&snap["messages"][1]).is_empty());
    let chunks = streamed.chunks();
    let opaque: Vec<&Value> = chunks
        .iter()
        .filter(|c| c["type"] == "data-agentflow" && c["data"]["type"] == "ui_chunk")
        .collect();
    let kinds: Vec<&str> = opaque
        .iter()
        .filter_map(|c| c["data"]["content"]["type"].as_str())
        .collect();
    for k in [
        "tool-approval-request",
        "custom",
        "reasoning-file",
        "reset-step",
    ] {
        assert!(kinds.contains(&k), "{k} not kept: {kinds:?}");
    }
    reduce_ui(&chunks).expect("only v5 chunks reach the client");
}

#[tokio::test]
async fn a_malformed_ui_message_stream_ends_the_run_with_error() {
    let (_mock, gw) = over("ui-message", "");
    let (thread, _) = gw.start("scenario:malformed", None).await;
    let snap = gw.wait_terminal(&thread).await;
    assert_eq!(snap["streamStatus"], "error", "{snap}");
    assert!(
        text_of(&snap["messages"][1]).starts_with("Fine so far."),
        "{snap}"
    );
}

#[tokio::test]
async fn threads_continue_on_the_backends_own_thread() {
    for dialect in ["ui-message", "poll"] {
        let (mock, gw) = over(dialect, "");
        let (thread, _) = gw.start("first", None).await;
        gw.wait_terminal(&thread).await;
        let (again, _) = gw.start("second", Some(&thread)).await;
        assert_eq!(again, thread);
        let snap = gw.wait_terminal(&thread).await;
        assert_eq!(snap["messages"].as_array().unwrap().len(), 4, "{snap}");
        assert_eq!(
            text_of(&snap["messages"][3]),
            expected_answer("second", 2),
            "{dialect}"
        );
        let reqs = mock_requests(&gw.http, &mock.addrs[0]).await;
        let invokes: Vec<&Value> = reqs
            .iter()
            .filter(|r| r["path"] == "/api/invokeAgent")
            .collect();
        assert_eq!(invokes.len(), 2, "{dialect}: {reqs:?}");
        assert!(invokes[0]["body"].get("threadId").is_none());
        assert!(
            invokes[1]["body"]["threadId"].is_string(),
            "{dialect}: {reqs:?}"
        );
        assert_eq!(invokes[1]["body"]["message"]["parts"][0]["text"], "second");
        assert_eq!(
            invokes[0]["headers"]["x-sluice-thread-id"].as_str(),
            Some(thread.as_str())
        );
        if dialect == "poll" {
            assert_eq!(invokes[0]["headers"]["x-stream-response"], "false");
        }
    }
}

#[tokio::test]
async fn the_agentflow_dialect_runs_over_the_other_adapters() {
    for dialect in ["ui-message", "poll"] {
        let (_mock, gw) = over(dialect, "");
        let resp = gw
            .http
            .post(gw.url("/agents/7/run"))
            .json(
                &json!({"message": "scenario:tools", "conversation_id": "c-1",
                          "message_id": format!("m-{dialect}"), "stream": false}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{dialect}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["status"], "completed", "{dialect}: {v}");
        assert!(
            v["response"]
                .as_str()
                .unwrap()
                .contains("It is sunny in Paris."),
            "{dialect}: {v}"
        );
    }
}

#[tokio::test]
async fn routes_send_agents_to_their_own_backends() {
    let af = mock_agent_speaking("agentflow");
    let poll = mock_agent_speaking("poll");
    let gw = gateway_with(
        &af.addrs[0],
        &format!(
            "poll_interval_min = \"20ms\"\npoll_interval_max = \"100ms\"\n\
             [[upstream.routes]]\nagents = [\"legacy-*\"]\nurls = [\"http://{}\"]\ndialect = \"poll\"\n",
            poll.addrs[0]
        ),
        "",
    );
    let resp = gw
        .http
        .post(gw.url("/api/invokeAgent"))
        .header("x-stream-response", "false")
        .json(&invoke_body(json!("legacy-bot"), "hello", None))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let thread = resp.headers()["x-thread-id"].to_str().unwrap().to_string();
    let snap = gw.wait_terminal(&thread).await;
    assert_eq!(text_of(&snap["messages"][1]), expected_answer("hello", 1));
    let (t2, _) = gw.start("hello", None).await;
    gw.wait_terminal(&t2).await;
    let invokes = |reqs: Vec<Value>| -> Vec<Value> {
        reqs.into_iter()
            .filter(|r| r["path"] != "/api/getConversation")
            .collect()
    };
    let polled = invokes(mock_requests(&gw.http, &poll.addrs[0]).await);
    let streamed = invokes(mock_requests(&gw.http, &af.addrs[0]).await);
    assert_eq!(polled.len(), 1, "{polled:?}");
    assert_eq!(polled[0]["body"]["agentId"], "legacy-bot");
    assert_eq!(streamed.len(), 1, "{streamed:?}");
    assert_eq!(streamed[0]["path"], "/agents/1/run");
}

#[tokio::test]
async fn a_backend_slow_to_update_streams_in_coarse_steps_and_loses_nothing() {
    // Tokens every 50 ms for 1.5 s, but the backend's snapshot only changes every 500 ms.
    let (mock, gw) = over("poll", "");
    let streamed = stream_invoke(
        &gw,
        "scenario:slow tokens=30 delay_ms=50 update_ms=500",
        None,
    )
    .await;
    let chunks = streamed.chunks();
    let deltas: Vec<&str> = chunks
        .iter()
        .filter(|c| c["type"] == "text-delta")
        .map(|c| c["delta"].as_str().unwrap())
        .collect();
    let want: String = (0..30).map(|i| format!("token{i} ")).collect();
    assert_eq!(deltas.concat(), want);
    // One delta per snapshot change, not per token.
    assert!(
        (1..=6).contains(&deltas.len()),
        "{} deltas: {deltas:?}",
        deltas.len()
    );
    // The gateway kept polling meanwhile, and backed off between changes: 1.5 s at the 20 ms
    // floor would be 75 polls.
    let active = mock_active(&gw.http, &mock.addrs[0]).await;
    let polls = active["polls"].as_u64().unwrap();
    assert!((4..60).contains(&polls), "{active}");
}

#[tokio::test]
async fn stopping_a_run_works_over_every_adapter() {
    for dialect in DIALECTS {
        let (mock, gw) = over(dialect, "");
        let (thread, _) = gw.start("scenario:slow tokens=200 delay_ms=20", None).await;
        // Wait until some text arrived, then stop.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (_, snap) = gw.conversation(&thread).await;
            if !text_of(&snap["messages"][1]).is_empty() {
                break;
            }
            assert!(Instant::now() < deadline, "{dialect}: no text came");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let resp = gw
            .http
            .post(gw.url(&format!("/api/threads/{thread}/stop")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{dialect}");
        let snap = gw.wait_terminal(&thread).await;
        assert_eq!(snap["streamStatus"], "stopped", "{dialect}");
        let kept = text_of(&snap["messages"][1]);
        assert!(kept.starts_with("token0 "), "{dialect}: {kept}");
        // The stream ends with an abort…
        let (_, body) = get_stream(&gw, &thread, None, "?afterSeq=0").await;
        assert!(body.contains("{\"type\":\"abort\"}"), "{dialect}: {body}");
        // …and the backend is no longer read: no stream playing, no more polls.
        let deadline = Instant::now() + Duration::from_secs(5);
        while mock_active(&gw.http, &mock.addrs[0]).await["active"] != 0 {
            assert!(
                Instant::now() < deadline,
                "{dialect}: the backend stream stayed open"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let polls = mock_active(&gw.http, &mock.addrs[0]).await["polls"].clone();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            mock_active(&gw.http, &mock.addrs[0]).await["polls"],
            polls,
            "{dialect}: still polled after the stop"
        );
    }
}
