//! The AgentFlow client dialect: `POST /agents/{id}/run`.

mod common;

use common::*;
use serde_json::{json, Value};

async fn run(gw: &Gateway, body: &Value, last_event_id: Option<&str>) -> reqwest::Response {
    let mut req = gw.http.post(gw.url("/agents/7/run")).json(body);
    if let Some(id) = last_event_id {
        req = req.header("last-event-id", id);
    }
    req.send().await.unwrap()
}

fn payloads(body: &str) -> Vec<(u64, Value)> {
    parse_sse(body)
        .0
        .into_iter()
        .map(|e| {
            (
                e.id.unwrap().parse().unwrap(),
                serde_json::from_str(&e.data).unwrap(),
            )
        })
        .collect()
}

#[tokio::test]
async fn streams_events_as_received_and_every_retry_resumes_exactly() {
    let mock = mock_agent();
    let gw = gateway(&mock.addrs[0]);
    let body = json!({"message": "scenario:tools", "message_id": "m-1", "conversation_id": "conv-1",
                      "temperature": 0.3, "knowledge_bases": ["kb1"]});
    let resp = run(&gw, &body, None).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let thread = resp.headers()["x-thread-id"].to_str().unwrap().to_string();
    let full = payloads(&resp.text().await.unwrap());
    // ids are 1..n, payloads are the backend's own (its seq kept inside), ending with the root end.
    assert_eq!(
        full.iter().map(|(k, _)| *k).collect::<Vec<_>>(),
        (1..=full.len() as u64).collect::<Vec<_>>()
    );
    assert!(full
        .iter()
        .enumerate()
        .all(|(i, (_, p))| p["seq"] == json!(i as u64 + 1)));
    assert_eq!(full.last().unwrap().1["type"], "end");
    assert!(full.iter().any(|(_, p)| p["type"] == "tool_progress"));
    // Every retry of the same message, at every cursor, gets exactly the rest.
    for k in 0..full.len() {
        let resp = run(&gw, &body, Some(&k.to_string())).await;
        assert_eq!(resp.headers()["x-sluice-reattached"], "true");
        let rest = payloads(&resp.text().await.unwrap());
        assert_eq!(rest, full[k..].to_vec(), "after {k}");
    }
    // The resume route serves the same dialect.
    let resp = gw
        .http
        .get(gw.url(&format!(
            "/api/threads/{thread}/stream?format=agentflow&afterSeq=3"
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(payloads(&resp.text().await.unwrap()), full[3..].to_vec());
    // The backend saw one run, with the advanced fields untouched.
    let seen = Value::Array(mock_requests(&gw.http, &mock.addrs[0]).await);
    let runs: Vec<&Value> = seen
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["body"]["message_id"] == "m-1")
        .collect();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0]["path"], "/agents/7/run");
    assert_eq!(runs[0]["body"]["temperature"], json!(0.3));
    assert_eq!(runs[0]["body"]["knowledge_bases"], json!(["kb1"]));
    // The backend's conversation is Sluice's thread (unique per organisation), not the client's id.
    assert_eq!(runs[0]["body"]["conversation_id"], json!(thread));
    assert_eq!(runs[0]["body"]["stream"], true);
    // And the snapshot of the thread folds the same events.
    let snap = gw.wait_terminal(&thread).await;
    assert_eq!(snap["messages"][0]["parts"][0]["text"], "scenario:tools");
    assert!(text_of(&snap["messages"][1]).contains("It is sunny in Paris."));
}

#[tokio::test]
async fn verbose_false_hides_nested_calls() {
    let mock = mock_agent();
    let gw = gateway(&mock.addrs[0]);
    let body = json!({"message": "scenario:tools", "message_id": "m-2", "conversation_id": "c-2", "verbose": false});
    let events = payloads(&run(&gw, &body, None).await.text().await.unwrap());
    assert!(!events.is_empty());
    assert!(
        events.iter().all(|(_, p)| p["parent_call_id"].is_null()),
        "{events:?}"
    );
    assert_eq!(events.last().unwrap().1["type"], "end");
}

#[tokio::test]
async fn stream_false_answers_the_final_result_and_202_the_ids() {
    let mock = mock_agent();
    let gw = gateway(&mock.addrs[0]);
    let body = json!({"message": "hello", "message_id": "m-3", "conversation_id": "conv-3", "stream": false});
    let resp = run(&gw, &body, None).await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["status"], "completed");
    assert_eq!(v["response"], json!(expected_answer("hello", 1)));
    assert_eq!(v["conversation_id"], "conv-3");
    // The same conversation continues: the backend's second turn; 202 mode gives the ids.
    let resp = gw
        .http
        .post(gw.url("/agents/7/run"))
        .header("x-stream-response", "false")
        .json(&json!({"message": "again", "message_id": "m-4", "conversation_id": "conv-3"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let ids: Value = resp.json().await.unwrap();
    assert_eq!(
        ids["threadId"], v["threadId"],
        "same conversation, same thread"
    );
    let snap = gw.wait_terminal(ids["threadId"].as_str().unwrap()).await;
    assert_eq!(snap["messages"].as_array().unwrap().len(), 4);
    assert_eq!(text_of(&snap["messages"][3]), expected_answer("again", 2));
    // Bad bodies.
    for bad in [
        json!({"message": "x"}),
        json!({"message_id": "m"}),
        json!({"message": "x", "message_id": "m", "conversation_id": "c", "stream": "no"}),
        json!({"message": "x", "message_id": "m"}),
    ] {
        let resp = gw
            .http
            .post(gw.url("/agents/7/run"))
            .json(&bad)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{bad}");
    }
}
