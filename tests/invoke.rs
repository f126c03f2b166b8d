//! End-to-end: the real gateway in front of the real mock agent, over HTTP on loopback.
//! Poll mode, stream mode, thread continuity, and a client that hangs up.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

#[tokio::test]
async fn poll_mode_runs_to_completed_with_the_agents_text() {
    let mock = mock_agent();
    let gw = gateway(&mock.addrs[0]);
    let (thread, run) = gw.start("Hello there", None).await;
    assert!(run.starts_with("run_"));
    let snap = gw.wait_terminal(&thread).await;
    assert_eq!(snap["streamStatus"], "completed", "{snap}");
    assert_eq!(snap["threadId"], json!(thread));
    assert_eq!(snap["agentId"], json!(1));
    assert_eq!(snap["organizationId"], "org_dev");
    assert!(snap["createdAt"].as_str().unwrap().ends_with('Z'));
    assert!(snap["updatedAt"].as_str().is_some());
    let messages = snap["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2, "{snap}");
    assert_eq!(messages[0]["role"], "user");
    assert_eq!(messages[0]["parts"][0]["text"], "Hello there");
    assert_eq!(messages[1]["role"], "assistant");
    assert_eq!(text_of(&messages[1]), expected_answer("Hello there", 1));
    // start + one delta per word + end
    let words = expected_answer("Hello there", 1).split(' ').count() as u64;
    assert_eq!(snap["lastSeq"], json!(words + 2));
}

#[tokio::test]
async fn stream_mode_delivers_the_message_the_snapshot_shows() {
    let mock = mock_agent();
    let gw = gateway(&mock.addrs[0]);
    for text in ["Hello stream", "scenario:reasoning", "scenario:tools"] {
        let s = stream_invoke(&gw, text, None).await;
        let h = &s.headers;
        assert_eq!(h["content-type"], "text/event-stream");
        assert_eq!(h["cache-control"], "no-cache");
        assert_eq!(h["x-vercel-ai-ui-message-stream"], "v1");
        assert_eq!(h["x-accel-buffering"], "no");
        let chunks = s.chunks();
        assert_eq!(chunks[0]["type"], "start");
        assert_eq!(chunks.last().unwrap()["type"], "finish", "{text}");
        // Every chunk carries an id: seq or seq.j, never decreasing.
        let mut last = (0u64, 0u64);
        for e in &s.events[..s.events.len() - 1] {
            let id = e.id.as_deref().expect("every chunk has an id");
            let (k, j) = match id.split_once('.') {
                Some((k, j)) => (k.parse().unwrap(), j.parse().unwrap()),
                None => (id.parse().unwrap(), u64::MAX),
            };
            assert!((k, j) > last, "ids must increase: {id} after {last:?}");
            last = (k, j);
        }
        let streamed = reduce_ui(&chunks).expect("a valid UI-message stream");
        let snap = gw.wait_terminal(&s.thread).await;
        assert_eq!(snap["streamStatus"], "completed");
        assert_eq!(
            snap["messages"][1], streamed,
            "{text}: stream and snapshot differ"
        );
        assert_eq!(streamed["id"], chunks[0]["messageId"]);
        // The final id of the stream is the run's last seq.
        assert_eq!(last.0, snap["lastSeq"].as_u64().unwrap());
    }
}

#[tokio::test]
async fn tools_and_reasoning_become_parts() {
    let mock = mock_agent();
    let gw = gateway(&mock.addrs[0]);
    let s = stream_invoke(&gw, "scenario:tools", None).await;
    let snap = gw.wait_terminal(&s.thread).await;
    let parts = snap["messages"][1]["parts"].as_array().unwrap().clone();
    let tool = parts
        .iter()
        .find(|p| p["type"] == "tool-search")
        .expect("a tool part");
    assert_eq!(tool["state"], "output-available");
    assert_eq!(tool["input"], json!({"query": "weather in Paris"}));
    assert_eq!(tool["output"], json!({"forecast": "sunny", "celsius": 21}));
    let artifacts: Vec<_> = parts
        .iter()
        .filter(|p| p["type"] == "data-artifact")
        .collect();
    assert_eq!(artifacts.len(), 1, "artifact updated in place: {parts:?}");
    assert_eq!(artifacts[0]["data"]["status"], "completed");
    assert!(parts.iter().any(|p| p["type"] == "step-start"));
    // Progress is transient: in the stream, not in the snapshot.
    let chunks = s.chunks();
    assert!(chunks
        .iter()
        .any(|c| c["type"] == "data-tool-progress" && c["transient"] == true));
    assert!(!parts.iter().any(|p| p["type"] == "data-tool-progress"));
    assert!(text_of(&snap["messages"][1]).contains("It is sunny in Paris."));

    let s = stream_invoke(&gw, "scenario:reasoning", None).await;
    let snap = gw.wait_terminal(&s.thread).await;
    let parts = snap["messages"][1]["parts"].as_array().unwrap().clone();
    let reasoning = parts
        .iter()
        .find(|p| p["type"] == "reasoning")
        .expect("reasoning part");
    assert_eq!(reasoning["text"], "Let me think about this step by step.");
    assert_eq!(reasoning["state"], "done");
}

#[tokio::test]
async fn a_known_thread_continues_and_a_busy_thread_answers_409() {
    let mock = mock_agent();
    let gw = gateway(&mock.addrs[0]);
    let (thread, run1) = gw.start("first", None).await;
    gw.wait_terminal(&thread).await;
    let (thread2, run2) = gw.start("second", Some(&thread)).await;
    assert_eq!(thread2, thread);
    assert_ne!(run2, run1);
    let snap = gw.wait_terminal(&thread).await;
    let m = snap["messages"].as_array().unwrap();
    assert_eq!(m.len(), 4, "{snap}");
    assert_eq!(m[2]["parts"][0]["text"], "second");
    // The backend saw the same conversation: this is its second turn.
    assert_eq!(text_of(&m[3]), expected_answer("second", 2));
    assert_eq!(text_of(&m[1]), expected_answer("first", 1));
    assert_eq!(snap["runId"], json!(run2));

    // While a run is in progress, another invoke on the thread is refused.
    let (thread, _) = gw.start("scenario:slow tokens=50 delay_ms=20", None).await;
    let resp = gw.invoke("again", Some(&thread), true).await;
    assert_eq!(resp.status(), 409);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "run_in_progress");
    // ... and a different agent cannot take over the thread.
    gw.wait_terminal(&thread).await;
    let resp = gw
        .http
        .post(gw.url("/api/invokeAgent"))
        .header("x-stream-response", "false")
        .json(&invoke_body(json!("other-agent"), "hi", Some(&thread)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
}

#[tokio::test]
async fn a_client_that_hangs_up_does_not_stop_the_run() {
    let mock = mock_agent();
    let gw = gateway(&mock.addrs[0]);
    let mut resp = gw
        .invoke("scenario:slow tokens=30 delay_ms=30", None, false)
        .await;
    assert_eq!(resp.status(), 200);
    let thread = resp.headers()["x-thread-id"].to_str().unwrap().to_string();
    // Read a little, then hang up mid-stream.
    let mut got = 0;
    while got < 200 {
        got += resp.chunk().await.unwrap().expect("stream open").len();
    }
    drop(resp);
    let snap = gw.wait_terminal(&thread).await;
    assert_eq!(snap["streamStatus"], "completed");
    let text = text_of(&snap["messages"][1]);
    assert!(
        text.starts_with("token0 ") && text.ends_with("token29 "),
        "{text}"
    );
    // The stream's hang-up was noticed: no stream is left open.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let m = gw.metrics().await;
        if m.lines().any(|l| l == "sluice_sse_streams_active 0") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "stream still counted open:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn quiet_streams_get_keepalive_comments() {
    let mock = mock_agent();
    let gw = gateway_with(
        &mock.addrs[0],
        "",
        "[stream]\nkeepalive_interval = \"150ms\"\n",
    );
    let s = stream_invoke(&gw, "scenario:slow tokens=3 delay_ms=500", None).await;
    assert!(
        s.comments.iter().any(|c| c == "keep-alive"),
        "no keep-alive in {:?}",
        s.comments
    );
    reduce_ui(&s.chunks()).unwrap();
}

#[tokio::test]
async fn odd_sse_framing_from_the_backend_is_read_correctly() {
    let mock = mock_agent();
    let gw = gateway(&mock.addrs[0]);
    let reference = {
        let (t, _) = gw.start("frame test", None).await;
        text_of(&gw.wait_terminal(&t).await["messages"][1])
    };
    for opts in [
        "framing=crlf",
        "framing=cr",
        "bom=1",
        "upper=1",
        "event_lines=1 framing=crlf bom=1",
    ] {
        let (t, _) = gw.start(&format!("frame test {opts}"), None).await;
        let snap = gw.wait_terminal(&t).await;
        assert_eq!(snap["streamStatus"], "completed", "{opts}: {snap}");
        let want = reference.replace("frame test", &format!("frame test {opts}"));
        assert_eq!(text_of(&snap["messages"][1]), want, "{opts}");
    }
}

#[tokio::test]
async fn the_backend_receives_the_documented_request() {
    let mock = mock_agent();
    let gw = gateway(&mock.addrs[0]);
    let body = json!({
        "agentId": "support bot/2",
        "message": {"id": "msg-42", "role": "user", "parts": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]},
        "timezone": "Europe/Paris",
    });
    let resp = gw
        .http
        .post(gw.url("/api/invokeAgent"))
        .header("x-stream-response", "false")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let thread = resp.headers()["x-thread-id"].to_str().unwrap().to_string();
    gw.wait_terminal(&thread).await;
    let seen = serde_json::Value::Array(mock_requests(&gw.http, &mock.addrs[0]).await);
    let req = seen.as_array().unwrap().last().unwrap();
    assert_eq!(req["path"], "/agents/support%20bot%2F2/run");
    assert_eq!(req["body"]["message"], "Hi\nthere");
    assert_eq!(req["body"]["conversation_id"], json!(thread));
    assert_eq!(req["body"]["message_id"], "msg-42");
    assert_eq!(req["body"]["client_timezone"], "Europe/Paris");
    assert_eq!(req["body"]["stream"], true);
    assert_eq!(req["headers"]["x-sluice-org-id"], "org_dev");
    assert_eq!(req["headers"]["x-sluice-user-id"], "user_dev");
    assert_eq!(req["headers"]["accept"], "text/event-stream");
}
