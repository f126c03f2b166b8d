//! Backend failures end the run with the right terminal status, keep the error text and the
//! events received so far, and leave other runs untouched.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

async fn ends(gw: &Gateway, text: &str) -> Value {
    let (thread, _) = gw.start(text, None).await;
    gw.wait_terminal(&thread).await
}

#[tokio::test]
async fn each_failure_ends_with_its_status_and_spares_other_runs() {
    let mock = mock_agent();
    let gw = gateway_with(
        &mock.addrs[0],
        "idle_timeout = \"1s\"\nmax_event_bytes = 4096\n",
        "",
    );
    // A healthy slow run spans all the failures below.
    let (healthy, _) = gw.start("scenario:slow tokens=40 delay_ms=50", None).await;

    let snap = ends(&gw, "scenario:error").await;
    assert_eq!(snap["streamStatus"], "error", "{snap}");
    assert!(snap["errorText"]
        .as_str()
        .unwrap()
        .contains("simulated agent failure"));
    assert_eq!(text_of(&snap["messages"][1]), "I will try. ");

    let snap = ends(&gw, "scenario:drop").await;
    assert_eq!(snap["streamStatus"], "error", "{snap}");
    assert!(
        snap["errorText"]
            .as_str()
            .unwrap()
            .contains("connection ended"),
        "{snap}"
    );
    assert_eq!(text_of(&snap["messages"][1]), "This answer will be cut");

    let snap = ends(&gw, "scenario:malformed").await;
    assert_eq!(snap["streamStatus"], "error", "{snap}");
    assert!(
        snap["errorText"].as_str().unwrap().contains("malformed"),
        "{snap}"
    );
    assert_eq!(text_of(&snap["messages"][1]), "Fine so far. ");

    let snap = ends(&gw, "scenario:hang").await;
    assert_eq!(snap["streamStatus"], "timeout", "{snap}");
    assert!(
        snap["errorText"].as_str().unwrap().contains("sent nothing"),
        "{snap}"
    );
    assert_eq!(text_of(&snap["messages"][1]), "Thinking");

    let snap = ends(&gw, "scenario:status code=503").await;
    assert_eq!(snap["streamStatus"], "error", "{snap}");
    let err = snap["errorText"].as_str().unwrap();
    assert!(
        err.contains("503") && err.contains("mock agent refused"),
        "{err}"
    );
    assert_eq!(
        snap["messages"].as_array().unwrap().len(),
        2,
        "the closing event folds into an assistant message"
    );

    let snap = ends(&gw, "scenario:oversize bytes=10000").await;
    assert_eq!(snap["streamStatus"], "error", "{snap}");
    assert!(
        snap["errorText"]
            .as_str()
            .unwrap()
            .contains("larger than 4096"),
        "{snap}"
    );

    let snap = gw.wait_terminal(&healthy).await;
    assert_eq!(snap["streamStatus"], "completed", "{snap}");
    let text = text_of(&snap["messages"][1]);
    assert!(
        text.starts_with("token0 ") && text.ends_with("token39 "),
        "{text}"
    );

    let m = gw.metrics().await;
    for kind in [
        "dropped",
        "malformed",
        "idle_timeout",
        "status",
        "event_too_large",
    ] {
        assert!(
            m.contains(&format!(
                "sluice_upstream_errors_total{{kind=\"{kind}\"}} 1"
            )),
            "{kind} missing:\n{m}"
        );
    }
    assert!(
        m.contains("sluice_runs_ended_total{status=\"timeout\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("sluice_runs_ended_total{status=\"completed\"} 1"),
        "{m}"
    );
}

#[tokio::test]
async fn a_run_longer_than_its_limit_times_out() {
    let mock = mock_agent();
    let gw = gateway_with(&mock.addrs[0], "run_timeout = \"700ms\"\n", "");
    let snap = ends(&gw, "scenario:slow tokens=100 delay_ms=50").await;
    assert_eq!(snap["streamStatus"], "timeout", "{snap}");
    assert!(
        snap["errorText"].as_str().unwrap().contains("time limit"),
        "{snap}"
    );
    assert!(text_of(&snap["messages"][1]).starts_with("token0 "));
}

#[tokio::test]
async fn an_unreachable_backend_ends_the_run_with_error() {
    // Reserve a port and leave it closed.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let gw = gateway_with(&dead.to_string(), "connect_timeout = \"1s\"\n", "");
    let snap = ends(&gw, "hello").await;
    assert_eq!(snap["streamStatus"], "error", "{snap}");
    assert!(
        snap["errorText"].as_str().unwrap().contains("unreachable"),
        "{snap}"
    );
}

#[tokio::test]
async fn a_failed_run_streams_an_error_chunk_then_done() {
    let mock = mock_agent();
    let gw = gateway(&mock.addrs[0]);
    let s = stream_invoke(&gw, "scenario:drop", None).await;
    let chunks = s.chunks();
    let err = chunks
        .iter()
        .find(|c| c["type"] == "error")
        .expect("an error chunk");
    assert!(err["errorText"]
        .as_str()
        .unwrap()
        .contains("connection ended"));
    let streamed = reduce_ui(&chunks).unwrap();
    let snap = gw.wait_terminal(&s.thread).await;
    assert_eq!(snap["messages"][1], streamed);
}

#[tokio::test]
async fn run_size_limits_end_the_run_and_keep_what_fit() {
    let mock = mock_agent();
    let gw = gateway_with(&mock.addrs[0], "", "[limits]\nmax_events_per_run = 100\n");
    let snap = ends(&gw, "scenario:long events=500").await;
    assert_eq!(snap["streamStatus"], "error", "{snap}");
    assert!(
        snap["errorText"].as_str().unwrap().contains("event limit"),
        "{snap}"
    );
    // The closing event is kept beyond the limit so readers see the end.
    assert!(
        snap["lastSeq"].as_u64().unwrap() <= 101,
        "{}",
        snap["lastSeq"]
    );
    assert!(text_of(&snap["messages"][1]).starts_with("w0 w1 "));
}

#[tokio::test]
async fn a_full_store_refuses_new_runs_with_503_and_retry_after() {
    let mock = mock_agent();
    let gw = gateway_with(
        &mock.addrs[0],
        "max_event_bytes = 1024\n",
        "[limits]\nmax_bytes_per_run = 2048\nmax_total_bytes = 8192\n\
         [limits.per_org]\nmax_bytes = 8192\n[store]\nfull_retry_after = \"7s\"\n",
    );
    // Hanging runs hold their records and first two events and never finish, so nothing can be
    // evicted: new runs are admitted until 90% of the budget is held, then refused. (The one
    // organisation may hold the whole budget: its own quota is not what is tested here.)
    let mut refused = None;
    for _ in 0..40 {
        let resp = gw.invoke("scenario:hang", None, true).await;
        if resp.status() == 503 {
            refused = Some(resp);
            break;
        }
        assert_eq!(resp.status(), 202);
        let thread = resp.headers()["x-thread-id"].to_str().unwrap().to_string();
        // Wait until the run's first events are held.
        for _ in 0..200 {
            let (_, snap) = gw.conversation(&thread).await;
            if snap["lastSeq"].as_u64().unwrap_or(0) >= 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let resp = refused.expect("the store filled up");
    assert_eq!(resp.headers()["retry-after"], "7");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "store_full");
    let ready = gw
        .http
        .get(format!("{}/readyz", gw.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
}
