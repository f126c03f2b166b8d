//! Process lifecycle: graceful shutdown ends open streams cleanly; finished runs leave the
//! store after their retention.

mod common;

use std::time::{Duration, Instant};

use common::*;

#[tokio::test]
async fn sigterm_ends_open_streams_cleanly_and_the_process_exits() {
    let mock = mock_agent();
    let mut gw = gateway(&mock.addrs[0]);
    let resp = gw.invoke("scenario:hang", None, false).await;
    assert_eq!(resp.status(), 200);
    let reader = tokio::spawn(async move { resp.text().await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t0 = Instant::now();
    gw.proc.terminate();
    // The stream ends with a complete chunked body (a clean end the client can resume from),
    // not a reset.
    let body = tokio::time::timeout(Duration::from_secs(10), reader)
        .await
        .expect("stream ended")
        .unwrap()
        .expect("the body ended cleanly");
    let (events, _) = parse_sse(&body);
    assert!(events[0].data.contains("\"start\""), "{body}");
    let exited = tokio::task::spawn_blocking(move || gw.proc.wait_exit(Duration::from_secs(15)))
        .await
        .unwrap();
    assert!(exited, "gateway did not exit after SIGTERM");
    assert!(t0.elapsed() < Duration::from_secs(15));
}

#[tokio::test]
async fn finished_runs_are_evicted_after_their_retention_and_threads_after_theirs() {
    let mock = mock_agent();
    let gw = gateway_with(
        &mock.addrs[0],
        "",
        "[store]\nretention = \"300ms\"\nthread_retention = \"1500ms\"\n",
    );
    let (thread, _) = gw.start("short lived", None).await;
    let done = gw.wait_terminal(&thread).await;
    assert_eq!(done["streamStatus"], "completed");
    let deadline = Instant::now() + Duration::from_secs(10);
    // First the run's events go; the thread says so instead of vanishing.
    let evicted = loop {
        let (status, snap) = gw.conversation(&thread).await;
        assert_eq!(status, 200, "the thread outlives its run: {snap}");
        if snap["evictedRuns"] == 1 {
            break snap;
        }
        assert!(Instant::now() < deadline, "run never evicted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(evicted["messages"], serde_json::json!([]));
    assert_eq!(evicted["streamStatus"], "completed");
    assert_eq!(evicted["lastSeq"], done["lastSeq"]);
    assert_eq!(evicted["evictedThroughSeq"], done["lastSeq"]);
    assert_eq!(evicted["runId"], done["runId"]);
    let m = gw.metrics().await;
    assert!(m.contains("sluice_store_evictions_total 1"), "{m}");
    assert!(
        !m.contains("sluice_store_bytes 0\n"),
        "the record is counted: {m}"
    );
    // Then, `thread_retention` later, the thread's record.
    loop {
        let (status, _) = gw.conversation(&thread).await;
        if status == 404 {
            break;
        }
        assert!(Instant::now() < deadline, "thread record never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let m = gw.metrics().await;
    assert!(m.contains("sluice_store_bytes 0\n"), "{m}");
}
