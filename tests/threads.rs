//! The thread is the stream (DESIGN.md §6): `seq` runs through a thread's runs, so every cursor
//! names exactly one run; threads outlive their runs' payload; runs at a limit keep what fit;
//! retries after a failure start a new run; conversations are scoped per organisation.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

#[tokio::test]
async fn a_cursor_of_an_earlier_run_gets_exactly_that_runs_rest_in_both_dialects() {
    let mock = mock_agent();
    let gw = gateway(&mock.addrs[0]);
    // Run 1 (tools: events of several chunks each), then run 2 (longer) in the same thread.
    let run1 = stream_invoke(&gw, "scenario:tools", None).await;
    let thread = run1.thread.clone();
    let run2 = stream_invoke(&gw, "scenario:slow tokens=40 delay_ms=0", Some(&thread)).await;
    assert_eq!(run2.thread, thread);
    let ids = |s: &Streamed| -> Vec<String> {
        s.events
            .iter()
            .filter_map(|e| e.id.clone())
            .collect::<Vec<_>>()
    };
    let (ids1, ids2) = (ids(&run1), ids(&run2));
    // Seq runs through the thread: run 2's ids continue after run 1's.
    let last1: u64 = ids1.last().unwrap().parse().unwrap();
    let first2: u64 = ids2[0].split('.').next().unwrap().parse().unwrap();
    assert_eq!(first2, last1 + 1, "{ids1:?} {ids2:?}");
    let snap = gw.wait_terminal(&thread).await;
    assert_eq!(
        snap["lastSeq"],
        json!(ids2.last().unwrap().parse::<u64>().unwrap())
    );
    // Replayed from the thread's start: run 1, identical to what was streamed live.
    let (status, body) = get_stream(&gw, &thread, Some("0"), "").await;
    assert_eq!(status, 200);
    assert_eq!(
        parse_sse(&body).0,
        run1.events,
        "the run replays identically"
    );
    let (status, _) = get_stream(&gw, &thread, None, &format!("?runId={}", run1.run)).await;
    assert_eq!(status, 204, "a finished run without a cursor is over");

    // UI-message dialect: every id of run 1 resumes with exactly run 1's rest, then its end.
    for (i, ev) in run1.events.iter().enumerate() {
        let Some(id) = ev.id.as_deref() else { continue };
        let (status, body) = get_stream(&gw, &thread, Some(id), "").await;
        assert_eq!(status, 200, "cursor {id}: {body}");
        let got = parse_sse(&body).0;
        if i + 2 == run1.events.len() {
            // At run 1's very end, the next thing in the thread is run 2, whole.
            assert_eq!(got, run2.events, "cursor {id}");
        } else {
            assert_eq!(got, run1.events[i + 1..], "cursor {id}");
            let chunks: Vec<Value> = got[..got.len() - 1]
                .iter()
                .map(|e| serde_json::from_str(&e.data).unwrap())
                .collect();
            assert!(
                chunks.iter().all(|c| c["type"] != "start"),
                "no second start: {chunks:?}"
            );
        }
    }
    // At the thread's end there is nothing left.
    let (status, _) = get_stream(&gw, &thread, Some(ids2.last().unwrap()), "").await;
    assert_eq!(status, 204);
    let beyond = last1 + ids2.len() as u64 + 100;
    let (status, body) = get_stream(&gw, &thread, Some(&beyond.to_string()), "").await;
    assert_eq!(status, 400, "{body}");

    // AgentFlow dialect: run 1's events are ids 1..=last1, and every k resumes within run 1.
    let (status, body) = get_stream(&gw, &thread, Some("0"), "?format=agentflow").await;
    assert_eq!(status, 200);
    let af1 = parse_sse(&body).0;
    assert_eq!(
        af1.iter()
            .map(|e| e.id.clone().unwrap())
            .collect::<Vec<_>>(),
        (1..=last1).map(|k| k.to_string()).collect::<Vec<_>>()
    );
    for k in 0..last1 {
        let (status, body) =
            get_stream(&gw, &thread, Some(&k.to_string()), "?format=agentflow").await;
        assert_eq!(status, 200);
        assert_eq!(parse_sse(&body).0, af1[k as usize..], "after {k}");
    }
    let (_, body) = get_stream(&gw, &thread, Some(&last1.to_string()), "?format=agentflow").await;
    let last2: u64 = ids2.last().unwrap().parse().unwrap();
    assert_eq!(
        parse_sse(&body)
            .0
            .iter()
            .map(|e| e.id.clone().unwrap())
            .collect::<Vec<_>>(),
        (first2..=last2).map(|k| k.to_string()).collect::<Vec<_>>(),
        "at run 1's end: run 2, whole"
    );
    // An explicit run takes only cursors inside it.
    let (status, _) = get_stream(&gw, &thread, Some("3"), &format!("?runId={}", run2.run)).await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn eviction_keeps_the_thread_and_expires_its_cursors() {
    let mock = mock_agent();
    let gw = gateway_with(&mock.addrs[0], "", "[store]\nretention = \"200ms\"\n");
    let first = stream_invoke(&gw, "remember the number 7", None).await;
    let thread = first.thread.clone();
    let done = gw.wait_terminal(&thread).await;
    let last = done["lastSeq"].as_u64().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while gw.conversation(&thread).await.1["evictedRuns"] != 1 {
        assert!(Instant::now() < deadline, "never evicted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Cursors into the evicted run: 410, in both dialects and by run id.
    for (cursor, query) in [
        ("2", String::new()),
        ("2.1", String::new()),
        ("0", "?format=agentflow".to_string()),
        ("1", format!("?runId={}", first.run)),
    ] {
        let (status, body) = get_stream(&gw, &thread, Some(cursor), &query).await;
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            (status, v["error"]["code"].as_str()),
            (410, Some("cursor_expired")),
            "{cursor}{query}"
        );
    }
    // The end of the evicted run is the thread's end: nothing left.
    let (status, _) = get_stream(&gw, &thread, Some(&last.to_string()), "").await;
    assert_eq!(status, 204);
    // The conversation continues: same thread, seq after the evicted run, same backend
    // conversation (the backend counts this as its second turn).
    let second = stream_invoke(&gw, "what was the number?", Some(&thread)).await;
    assert_eq!(second.thread, thread);
    let first_id: u64 = second.events[0]
        .id
        .as_deref()
        .unwrap()
        .split('.')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(first_id, last + 1);
    let snap = gw.wait_terminal(&thread).await;
    assert_eq!(snap["evictedRuns"], 1);
    assert_eq!(snap["evictedThroughSeq"], json!(last));
    assert_eq!(
        text_of(&snap["messages"][1]),
        expected_answer("what was the number?", 2)
    );
    let seen = mock_requests(&gw.http, &mock.addrs[0]).await;
    let convs: Vec<&Value> = seen.iter().map(|r| &r["body"]["conversation_id"]).collect();
    assert_eq!(convs, [&json!(thread), &json!(thread)]);
}

#[tokio::test]
async fn a_run_at_its_event_limit_keeps_every_event_that_fit() {
    let mock = mock_agent();
    let gw = gateway_with(&mock.addrs[0], "", "[limits]\nmax_events_per_run = 50\n");
    let (thread, _) = gw.start("scenario:slow tokens=250 delay_ms=0", None).await;
    let snap = gw.wait_terminal(&thread).await;
    assert_eq!(snap["streamStatus"], "error");
    assert!(
        snap["errorText"].as_str().unwrap().contains("event limit"),
        "{snap}"
    );
    // 50 events kept, plus the closing error event the gateway always records.
    assert_eq!(snap["lastSeq"], 51);
    let text = text_of(&snap["messages"][1]);
    let expected: String = (0..49).map(|i| format!("token{i} ")).collect();
    assert_eq!(
        text, expected,
        "the first 49 tokens (after the start event)"
    );
    // Streams and replays show the same, ending in an error.
    let (status, body) = get_stream(&gw, &thread, Some("0"), "").await;
    assert_eq!(status, 200);
    let chunks: Vec<Value> = parse_sse(&body).0[..]
        .iter()
        .filter(|e| e.data != "[DONE]")
        .map(|e| serde_json::from_str(&e.data).unwrap())
        .collect();
    assert_eq!(chunks.last().unwrap()["type"], "error");
    assert_eq!(text_of(&reduce_ui(&chunks).unwrap()), expected);
}

#[tokio::test]
async fn a_retry_after_a_failed_run_starts_a_new_backend_run() {
    let mock = mock_agent();
    let gw = gateway(&mock.addrs[0]);
    let body = json!({
        "agentId": 1,
        "message": {"id": "msg-retry-1", "role": "user", "parts": [{"type": "text", "text": "scenario:error"}]},
    });
    let post = || {
        gw.http
            .post(gw.url("/api/invokeAgent"))
            .header("x-stream-response", "false")
            .json(&body)
            .send()
    };
    let first: Value = post().await.unwrap().json().await.unwrap();
    let thread = first["threadId"].as_str().unwrap().to_string();
    assert_eq!(gw.wait_terminal(&thread).await["streamStatus"], "error");
    // The retry is a new run, in the same thread, after the failed one.
    let resp = post().await.unwrap();
    assert!(resp.headers().get("x-sluice-reattached").is_none());
    let retry: Value = resp.json().await.unwrap();
    assert_eq!(retry["threadId"], json!(thread));
    assert_ne!(retry["runId"], first["runId"]);
    let snap = gw.wait_terminal(&thread).await;
    assert_eq!(snap["runId"], retry["runId"]);
    assert_eq!(
        snap["messages"].as_array().unwrap().len(),
        4,
        "the failed run stays in history"
    );
    let runs = mock_requests(&gw.http, &mock.addrs[0])
        .await
        .into_iter()
        .filter(|r| r["body"]["message_id"] == "msg-retry-1")
        .count();
    assert_eq!(runs, 2, "two backend runs, one after the other");
    // A retry of a completed message re-attaches, and starts nothing.
    let ok = json!({
        "agentId": 1, "threadId": thread,
        "message": {"id": "msg-ok", "role": "user", "parts": [{"type": "text", "text": "hello"}]},
    });
    for _ in 0..2 {
        let resp = gw
            .http
            .post(gw.url("/api/invokeAgent"))
            .header("x-stream-response", "false")
            .json(&ok)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 202);
        gw.wait_terminal(&thread).await;
    }
    let runs = mock_requests(&gw.http, &mock.addrs[0])
        .await
        .into_iter()
        .filter(|r| r["body"]["message_id"] == "msg-ok")
        .count();
    assert_eq!(runs, 1);
}

#[tokio::test]
async fn concurrent_first_requests_of_one_conversation_make_one_thread() {
    let mock = mock_agent();
    let gw = gateway(&mock.addrs[0]);
    let mut tasks = Vec::new();
    for i in 0..8 {
        let (http, url) = (gw.http.clone(), gw.url("/agents/7/run"));
        tasks.push(tokio::spawn(async move {
            let resp = http
                .post(url)
                .header("x-stream-response", "false")
                .json(&json!({"message": "scenario:slow tokens=5 delay_ms=100",
                              "message_id": format!("m-{i}"), "conversation_id": "c-new"}))
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let thread = resp
                .headers()
                .get("x-thread-id")
                .map(|v| v.to_str().unwrap().to_string());
            (status, thread)
        }));
    }
    let mut threads = std::collections::HashSet::new();
    let mut started = 0;
    for t in tasks {
        let (status, thread) = t.await.unwrap();
        match status {
            202 => {
                started += 1;
                threads.insert(thread.unwrap());
            }
            409 => {}
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(
        (started, threads.len()),
        (1, 1),
        "one thread, one run at a time"
    );
    let runs = mock_requests(&gw.http, &mock.addrs[0]).await;
    assert_eq!(runs.len(), 1, "{runs:?}");
}

#[tokio::test]
async fn agentflow_runs_need_a_conversation_id() {
    let mock = mock_agent();
    let gw = gateway(&mock.addrs[0]);
    let resp = gw
        .http
        .post(gw.url("/agents/7/run"))
        .json(&json!({"message": "hi", "message_id": "m-1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "invalid_request");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("conversation_id"));
    assert!(mock_requests(&gw.http, &mock.addrs[0]).await.is_empty());
}

#[tokio::test]
async fn client_conversation_ids_pass_through_only_when_configured() {
    let mock = mock_agent();
    let gw = gateway_with(&mock.addrs[0], "conversation_ids = \"client\"\n", "");
    let resp = gw
        .http
        .post(gw.url("/agents/7/run"))
        .header("x-stream-response", "false")
        .json(&json!({"message": "hi", "message_id": "m-1", "conversation_id": "c-1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let seen = mock_requests(&gw.http, &mock.addrs[0]).await;
    assert_eq!(seen[0]["body"]["conversation_id"], "c-1");
}
