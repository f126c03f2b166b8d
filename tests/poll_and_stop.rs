//! Long-poll (`getConversation` with `wait`) and stopping a run.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

async fn long_poll(gw: &Gateway, thread: &str, query: &str) -> (u16, Value, Duration) {
    let t0 = Instant::now();
    let resp = gw
        .http
        .get(gw.url(&format!("/api/getConversation?threadId={thread}{query}")))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap(), t0.elapsed())
}

#[tokio::test]
async fn long_poll_returns_on_the_next_event_and_times_out_at_wait() {
    let mock = mock_agent();
    let gw = gateway_with(&mock.addrs[0], "", "[stream]\nlong_poll_max = \"3s\"\n");
    // Events about every 600 ms.
    let (thread, _) = gw.start("scenario:slow tokens=6 delay_ms=600", None).await;
    let (_, snap) = gw.conversation(&thread).await;
    let k = snap["lastSeq"].as_u64().unwrap();
    let (status, snap, took) = long_poll(&gw, &thread, &format!("&afterSeq={k}&wait=10")).await;
    assert_eq!(status, 200);
    assert!(snap["lastSeq"].as_u64().unwrap() > k, "{snap}");
    assert!(took < Duration::from_millis(2500), "woke after {took:?}");
    // Without wait: at once, whatever the state.
    let (_, snap2, took) = long_poll(&gw, &thread, "&afterSeq=999").await;
    assert!(took < Duration::from_millis(500));
    assert!(snap2["lastSeq"].is_u64());
    // A finished thread: a cursor short of its end answers at once, and without a cursor too.
    let done = gw.wait_terminal(&thread).await;
    let last = done["lastSeq"].as_u64().unwrap();
    let (_, snap, took) = long_poll(&gw, &thread, &format!("&afterSeq={}&wait=10", last - 1)).await;
    assert!(took < Duration::from_millis(500), "{took:?}");
    assert_eq!(snap, done);
    let (_, snap, took) = long_poll(&gw, &thread, "&wait=10").await;
    assert!(took < Duration::from_millis(500), "{took:?}");
    assert_eq!(snap, done);
    // At its end, the poll waits for the thread's next turn and wakes when it starts.
    let waiting = {
        let (gw_http, url) = (
            gw.http.clone(),
            gw.url(&format!(
                "/api/getConversation?threadId={thread}&afterSeq={last}&wait=10"
            )),
        );
        tokio::spawn(async move {
            let t0 = Instant::now();
            let v: Value = gw_http.get(url).send().await.unwrap().json().await.unwrap();
            (v, t0.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!waiting.is_finished(), "answered before the next turn");
    gw.start("next turn", Some(&thread)).await;
    let (next, took) = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the long-poll woke for the next run")
        .unwrap();
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert_ne!(next["runId"], done["runId"], "{next}");
    assert_eq!(next["streamStatus"], "in_progress");
    assert_eq!(
        next["messages"][2]["parts"][0]["text"], "next turn",
        "{next}"
    );
    assert!(next["lastSeq"].as_u64().unwrap() >= last);

    // A silent run: the poll times out at `wait` with the unchanged snapshot...
    let (thread, _) = gw.start("scenario:hang", None).await;
    let mut snap = json!(null);
    for _ in 0..100 {
        snap = gw.conversation(&thread).await.1;
        if snap["lastSeq"].as_u64() >= Some(2) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let k = snap["lastSeq"].as_u64().unwrap();
    let (_, after, took) = long_poll(&gw, &thread, &format!("&afterSeq={k}&wait=1")).await;
    assert!(
        took >= Duration::from_millis(950) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert_eq!(after["lastSeq"], json!(k));
    // ...and `wait` is capped by stream.long_poll_max (3 s here).
    let (_, _, took) = long_poll(&gw, &thread, &format!("&afterSeq={k}&wait=60")).await;
    assert!(
        took >= Duration::from_millis(2900) && took < Duration::from_secs(6),
        "{took:?}"
    );
    // Bad values are refused.
    for q in ["&wait=soon", "&wait=-1", "&afterSeq=x"] {
        let (status, body, _) = long_poll(&gw, &thread, q).await;
        assert_eq!(
            (status, &body["error"]["code"]),
            (400, &json!("invalid_request")),
            "{q}"
        );
    }
    assert!(gw.metrics().await.contains("sluice_long_polls_waiting 0"));
}

#[tokio::test]
async fn stopping_a_run_keeps_the_partial_answer_and_ends_its_streams() {
    let mock = mock_agent();
    let gw = gateway(&mock.addrs[0]);
    let resp = gw
        .invoke("scenario:slow tokens=100 delay_ms=40", None, false)
        .await;
    let thread = resp.headers()["x-thread-id"].to_str().unwrap().to_string();
    let stream = tokio::spawn(async move { resp.text().await.unwrap() });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stop = |t: String| {
        let gw = &gw;
        async move {
            let resp = gw
                .http
                .post(gw.url(&format!("/api/threads/{t}/stop")))
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.unwrap())
        }
    };
    let (status, body) = stop(thread.clone()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "stopped");
    // The open stream ends cleanly: an abort chunk, then [DONE].
    let text = tokio::time::timeout(Duration::from_secs(5), stream)
        .await
        .unwrap()
        .unwrap();
    let (events, _) = parse_sse(&text);
    assert_eq!(events.last().unwrap().data, "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(&e.data).unwrap())
        .collect();
    assert_eq!(chunks.last().unwrap()["type"], "abort");
    let snap = gw.wait_terminal(&thread).await;
    assert_eq!(snap["streamStatus"], "stopped");
    assert!(snap.get("errorText").is_none());
    let partial = text_of(&snap["messages"][1]);
    assert!(
        partial.starts_with("token0 ") && !partial.contains("token99"),
        "{partial}"
    );
    assert_eq!(reduce_ui(&chunks).unwrap(), snap["messages"][1]);
    // The backend connection was closed: nothing more arrives.
    let last = snap["lastSeq"].clone();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(gw.conversation(&thread).await.1["lastSeq"], last);
    // Stopping again is a no-op; unknown threads are 404; the thread takes a new run.
    let (status, body) = stop(thread.clone()).await;
    assert_eq!((status, &body["status"]), (200, &json!("stopped")));
    let (status, body) = stop("no-such-thread".into()).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (404, &json!("thread_not_found"))
    );
    let (again, _) = gw.start("next", Some(&thread)).await;
    assert_eq!(gw.wait_terminal(&again).await["streamStatus"], "completed");
    // A finished run: no-op 200 with its own status.
    let (status, body) = stop(thread.clone()).await;
    assert_eq!((status, &body["status"]), (200, &json!("completed")));
    // A silent backend: the stop itself closes its connection (not the next event, nor the
    // idle timeout).
    let active = || async {
        mock_active(&gw.http, &mock.addrs[0]).await["active"]
            .as_u64()
            .unwrap()
    };
    let (silent, _) = gw.start("scenario:hang", None).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while active().await == 0 {
        assert!(
            Instant::now() < deadline,
            "the backend never started streaming"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, _) = stop(silent.clone()).await;
    assert_eq!(status, 200);
    let deadline = Instant::now() + Duration::from_secs(3);
    while active().await > 0 {
        assert!(
            Instant::now() < deadline,
            "the backend connection stayed open after stop"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let m = gw.metrics().await;
    assert!(m.contains("sluice_runs_stopped_total 2"), "{m}");
    assert!(
        m.contains("sluice_runs_ended_total{status=\"stopped\"} 2"),
        "{m}"
    );
}
