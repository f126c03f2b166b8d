//! Store lifecycle: finished runs leave the store after their retention, thread records after
//! theirs. (Shutdown is in `endings.rs`.)

mod common;

use std::time::{Duration, Instant};

use common::*;

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
    assert!(
        m.contains("sluice_store_evictions_total{reason=\"retention\"} 1"),
        "{m}"
    );
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
