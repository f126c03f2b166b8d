//! Resuming a run's UI-message stream with `Last-Event-ID`: exactly the missed chunks, in
//! order, then live ones, then the end; 204 when there is nothing to resume.

mod common;

use common::*;
use serde_json::Value;

#[tokio::test]
async fn every_cursor_resumes_with_exactly_the_rest_of_the_stream() {
    let mock = mock_agent();
    let gw = gateway(&mock.addrs[0]);
    for text in ["scenario:tools", "scenario:reasoning", "scenario:error"] {
        let (thread, _) = gw.start(text, None).await;
        let snap = gw.wait_terminal(&thread).await;
        // afterSeq=0: the whole run, even when finished.
        let (status, body) = get_stream(&gw, &thread, None, "?afterSeq=0").await;
        assert_eq!(status, 200);
        let (full, _) = parse_sse(&body);
        assert_eq!(full.last().unwrap().data, "[DONE]");
        let chunks: Vec<Value> = full[..full.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(&e.data).unwrap())
            .collect();
        assert_eq!(reduce_ui(&chunks).unwrap(), snap["messages"][1], "{text}");
        for (i, ev) in full[..full.len() - 1].iter().enumerate() {
            let id = ev.id.clone().unwrap();
            let (status, body) = get_stream(&gw, &thread, Some(&id), "").await;
            let rest = &full[i + 1..];
            if rest.len() == 1 {
                // Only [DONE] is left: nothing to resume.
                assert_eq!(status, 204, "{text} cursor {id}");
                assert!(body.is_empty());
                continue;
            }
            assert_eq!(status, 200, "{text} cursor {id}: {body}");
            let (got, _) = parse_sse(&body);
            assert_eq!(got, rest, "{text}: resuming after {id}");
        }
    }
}

#[tokio::test]
async fn a_cut_stream_resumes_live_without_gaps_or_duplicates() {
    let mock = mock_agent();
    let gw = gateway(&mock.addrs[0]);
    let mut resp = gw
        .invoke("scenario:slow tokens=40 delay_ms=25", None, false)
        .await;
    let thread = resp.headers()["x-thread-id"].to_str().unwrap().to_string();
    // Read until a few events arrived, then hang up.
    let mut body = String::new();
    while parse_sse(&body).0.len() < 8 {
        body.push_str(&String::from_utf8_lossy(
            &resp.chunk().await.unwrap().unwrap(),
        ));
    }
    drop(resp);
    // Only complete events count as seen.
    let cut = body.rfind("\n\n").unwrap();
    let (first, _) = parse_sse(&body[..cut + 2]);
    let last_id = first.last().unwrap().id.clone().unwrap();
    let (status, rest) = get_stream(&gw, &thread, Some(&last_id), "").await;
    assert_eq!(status, 200);
    let (second, _) = parse_sse(&rest);
    assert_eq!(second.last().unwrap().data, "[DONE]");
    let mut all = first.clone();
    all.extend(second[..second.len() - 1].iter().cloned());
    let chunks: Vec<Value> = all
        .iter()
        .map(|e| serde_json::from_str(&e.data).unwrap())
        .collect();
    let message = reduce_ui(&chunks).expect("the joined stream is valid");
    let snap = gw.wait_terminal(&thread).await;
    assert_eq!(message, snap["messages"][1]);
    let text = text_of(&message);
    assert!(
        text.starts_with("token0 ") && text.ends_with("token39 "),
        "{text}"
    );
}

#[tokio::test]
async fn no_cursor_replays_an_active_run_and_answers_204_once_it_ended() {
    let mock = mock_agent();
    let gw = gateway(&mock.addrs[0]);
    let (thread, _) = gw.start("scenario:slow tokens=10 delay_ms=40", None).await;
    tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    let (status, body) = get_stream(&gw, &thread, None, "").await;
    assert_eq!(status, 200);
    assert!(
        body.starts_with("retry: 2000\n\n"),
        "a retry hint first: {}",
        &body[..40]
    );
    let (events, _) = parse_sse(&body);
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(&e.data).unwrap())
        .collect();
    assert_eq!(
        chunks[0]["type"], "start",
        "a replay starts from the beginning"
    );
    let snap = gw.wait_terminal(&thread).await;
    assert_eq!(reduce_ui(&chunks).unwrap(), snap["messages"][1]);
    let (status, _) = get_stream(&gw, &thread, None, "").await;
    assert_eq!(status, 204);
}

#[tokio::test]
async fn bad_resume_requests_are_refused() {
    let mock = mock_agent();
    let gw = gateway(&mock.addrs[0]);
    let (thread, _) = gw.start("hello", None).await;
    let snap = gw.wait_terminal(&thread).await;
    let last = snap["lastSeq"].as_u64().unwrap();
    let cases = [
        ("no-such-thread".to_string(), Some("1".to_string()), "", 404),
        (thread.clone(), Some("abc".to_string()), "", 400),
        (thread.clone(), Some("1.0".to_string()), "", 400),
        (thread.clone(), Some((last + 1).to_string()), "", 400),
        (thread.clone(), None, "?afterSeq=x", 400),
        (thread.clone(), None, "?runId=run_nope", 404),
    ];
    for (t, id, q, want) in cases {
        let (status, body) = get_stream(&gw, &t, id.as_deref(), q).await;
        assert_eq!(status, want, "{id:?} {q}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert!(v["error"]["code"].is_string());
    }
    let resp = gw
        .http
        .post(gw.url(&format!("/api/threads/{thread}/stream")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 405);
}

#[tokio::test]
async fn a_stuck_reader_neither_delays_a_fast_one_nor_holds_on_forever() {
    use std::io::Write;
    let mock = mock_agent();
    let gw = gateway_with(
        &mock.addrs[0],
        "",
        "[stream]\nstuck_reader_timeout = \"1s\"\n",
    );
    let (thread, _) = gw.start("scenario:long events=60000", None).await;
    // A client that asks for the whole run and then never reads a byte.
    let addr = gw.base.trim_start_matches("http://").to_string();
    let mut stuck = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        stuck,
        "GET /api/threads/{thread}/stream?afterSeq=0 HTTP/1.1\r\nhost: {addr}\r\n\r\n"
    )
    .unwrap();
    // A fast reader of the same run gets all of it.
    let t0 = std::time::Instant::now();
    let (status, body) = get_stream(&gw, &thread, None, "?afterSeq=0").await;
    assert_eq!(status, 200);
    assert!(
        body.ends_with("data: [DONE]\n\n"),
        "fast reader did not get the end"
    );
    assert!(t0.elapsed() < std::time::Duration::from_secs(30));
    // The stuck one is cut after its timeout.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let m = gw.metrics().await;
        if m.contains("sluice_stuck_readers_total 1") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "stuck reader never cut:\n{m}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    drop(stuck);
}

#[tokio::test]
async fn a_cursor_into_an_evicted_run_gets_410_pointing_to_the_snapshot() {
    let mock = mock_agent();
    let gw = gateway_with(&mock.addrs[0], "", "[store]\nretention = \"300ms\"\n");
    let (thread, first) = gw.start("first", None).await;
    gw.wait_terminal(&thread).await;
    // A second run keeps the thread alive while the first is evicted.
    gw.start("scenario:hang", Some(&thread)).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (status, body) = get_stream(&gw, &thread, Some("2"), &format!("?runId={first}")).await;
        if status == 410 {
            let v: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["error"]["code"], "cursor_expired");
            assert!(v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("/api/getConversation"));
            break;
        }
        assert_eq!(status, 200, "{body}");
        assert!(std::time::Instant::now() < deadline, "never evicted");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // An id that never existed is still plain 404.
    let (status, _) = get_stream(&gw, &thread, Some("2"), "?runId=run_nope").await;
    assert_eq!(status, 404);
}
