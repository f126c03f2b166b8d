//! Idempotent retries: the same user message id never starts a second run.

mod common;

use common::*;
use serde_json::{json, Value};

#[tokio::test]
async fn twenty_concurrent_retries_start_one_run_and_all_get_the_whole_stream() {
    let mock = mock_agent();
    let gw = gateway(&mock.addrs[0]);
    let body = json!({
        "agentId": 1,
        "message": {"id": "retry-me-1", "role": "user",
                    "parts": [{"type": "text", "text": "scenario:slow tokens=20 delay_ms=20"}]},
    });
    let mut clients = Vec::new();
    for _ in 0..20 {
        let (http, url, body) = (gw.http.clone(), gw.url("/api/invokeAgent"), body.clone());
        clients.push(tokio::spawn(async move {
            let resp = http.post(url).json(&body).send().await.unwrap();
            assert_eq!(resp.status(), 200);
            let run = resp.headers()["x-run-id"].to_str().unwrap().to_string();
            let thread = resp.headers()["x-thread-id"].to_str().unwrap().to_string();
            (run, thread, resp.text().await.unwrap())
        }));
    }
    let mut results = Vec::new();
    for c in clients {
        results.push(c.await.unwrap());
    }
    let (run, thread, _) = results[0].clone();
    let snap = gw.wait_terminal(&thread).await;
    assert_eq!(
        snap["messages"].as_array().unwrap().len(),
        2,
        "one run in the thread"
    );
    for (r, t, body) in &results {
        assert_eq!((r, t), (&run, &thread));
        let (events, _) = parse_sse(body);
        assert_eq!(events.last().unwrap().data, "[DONE]");
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(&e.data).unwrap())
            .collect();
        assert_eq!(reduce_ui(&chunks).unwrap(), snap["messages"][1]);
    }
    // The backend saw exactly one run for that message.
    let seen = Value::Array(mock_requests(&gw.http, &mock.addrs[0]).await);
    let runs = seen
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["body"]["message_id"] == "retry-me-1")
        .count();
    assert_eq!(runs, 1);
    assert!(gw
        .metrics()
        .await
        .contains("sluice_idempotent_reattaches_total 19"));

    // A retry after the end, with the client's last id, re-attaches and gets nothing twice.
    let last = results[0]
        .2
        .rsplit("id: ")
        .next()
        .and_then(|s| s.lines().next())
        .unwrap()
        .to_string();
    let resp = gw
        .http
        .post(gw.url("/api/invokeAgent"))
        .header("last-event-id", &last)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-run-id"].to_str().unwrap(), run);
    assert_eq!(resp.headers()["x-sluice-reattached"], "true");
    let (events, _) = parse_sse(&resp.text().await.unwrap());
    assert_eq!(events.len(), 1, "only [DONE] is left: {events:?}");
    // In 202 mode, the same: the existing run, with its status.
    let resp = gw
        .http
        .post(gw.url("/api/invokeAgent"))
        .header("x-stream-response", "false")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let b: Value = resp.json().await.unwrap();
    assert_eq!(
        (b["runId"].as_str(), b["status"].as_str()),
        (Some(run.as_str()), Some("completed"))
    );
}
