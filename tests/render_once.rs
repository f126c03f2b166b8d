//! Render once, fold once, seen from outside: however many clients stream, resume and poll a
//! run, the gateway renders each of its events into UI-message frames once and folds it into
//! the snapshot once (`sluice_events_rendered_total`, `sluice_events_folded_total`), and every
//! client still gets exactly what it would get from a fresh rendering.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

#[tokio::test]
async fn a_long_run_is_folded_and_rendered_once_however_often_it_is_read() {
    let mock = mock_agent();
    let gw = gateway(&mock.addrs[0]);
    let (thread, _) = gw.start("scenario:long events=3000", None).await;
    let done = gw.wait_terminal(&thread).await;
    let last = done["lastSeq"].as_u64().unwrap();
    assert!(last > 3000, "{last}");
    let before = gw.metrics().await;

    // Twenty polls, three whole replays and resumes from the middle and near the end.
    for _ in 0..20 {
        let (status, snap) = gw.conversation(&thread).await;
        assert_eq!(status, 200);
        assert_eq!(snap, done);
    }
    let (status, whole) = get_stream(&gw, &thread, Some("0"), "").await;
    assert_eq!(status, 200);
    for _ in 0..2 {
        assert_eq!(get_stream(&gw, &thread, Some("0"), "").await.1, whole);
    }
    let (events, _) = parse_sse(&whole);
    for from in [last / 2, last - 3] {
        let (status, tail) = get_stream(&gw, &thread, Some(&from.to_string()), "").await;
        assert_eq!(status, 200);
        let (got, _) = parse_sse(&tail);
        // Exactly the frames after the cursor in the whole replay.
        let at = events
            .iter()
            .position(|e| e.id.as_deref() == Some(from.to_string().as_str()))
            .unwrap();
        assert_eq!(got, events[at + 1..].to_vec(), "resume from {from}");
    }

    let after = gw.metrics().await;
    let folded = metric(&after, "sluice_events_folded_total")
        - metric(&before, "sluice_events_folded_total");
    let rendered = metric(&after, "sluice_events_rendered_total")
        - metric(&before, "sluice_events_rendered_total");
    // The wait above polled the run as it grew, so some events may already be folded.
    assert!(
        folded <= last,
        "{folded} events folded for a {last}-event run"
    );
    assert_eq!(rendered, last, "every event rendered exactly once");
    assert_eq!(
        metric(&after, "sluice_events_folded_total"),
        last,
        "every event folded exactly once over the run's life"
    );
}

#[tokio::test]
async fn long_polling_a_growing_run_folds_each_event_once() {
    let mock = mock_agent();
    let gw = gateway(&mock.addrs[0]);
    let (thread, _) = gw.start("scenario:slow tokens=40 delay_ms=15", None).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut after = 0;
    let mut polls = 0;
    let snap: Value = loop {
        let snap: Value = gw
            .http
            .get(gw.url(&format!(
                "/api/getConversation?threadId={thread}&afterSeq={after}&wait=5"
            )))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        polls += 1;
        let seq = snap["lastSeq"].as_u64().unwrap();
        assert!(seq >= after, "lastSeq went back: {seq} < {after}");
        // The snapshot is the fold of exactly events 1..=lastSeq: its text never shrinks.
        after = seq;
        if snap["streamStatus"] != "in_progress" {
            break snap;
        }
        assert!(Instant::now() < deadline, "run never ended");
    };
    assert_eq!(snap["streamStatus"], "completed");
    assert!(
        polls > 5,
        "the run should have been polled while it grew ({polls})"
    );
    let metrics = gw.metrics().await;
    assert_eq!(
        metric(&metrics, "sluice_events_folded_total"),
        after,
        "{polls} polls folded each of the {after} events once"
    );
    let (_, last) = gw.conversation(&thread).await;
    assert_eq!(last, snap);
}
