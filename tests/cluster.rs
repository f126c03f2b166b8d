//! Many instances, one log: three `sluice serve` processes sharing one real `redis-server`
//! (`[store] backend = "redis"`), each request sent to a different instance; an instance
//! killed, paused or drained mid-run; Redis restarted mid-run. A history checker
//! (`common::cluster`) judges what the backend saw, each thread's log and every reader.
//!
//! Leases are short here (`lease_ttl` 2 s, renewed every 600 ms, scanned every 200 ms), so a
//! dead instance's runs move within about 2.5 s.

mod common;

use std::time::{Duration, Instant};

use common::cluster::*;
use common::{parse_sse, reduce_ui, text_of, Sse};
use serde_json::{json, Value};

const SEC: Duration = Duration::from_secs(1);
const MS: Duration = Duration::from_millis(1);

fn never(_: &[Sse]) -> bool {
    false
}

/// A UI-message stream's chunks (without `[DONE]`) as JSON.
fn ui_chunks(events: &[Sse]) -> Vec<Value> {
    events
        .iter()
        .filter(|e| e.data != "[DONE]")
        .map(|e| serde_json::from_str(&e.data).expect("a chunk is JSON"))
        .collect()
}

/// The whole UI-message rendering of the thread's first run, read on instance `i` from
/// `Last-Event-ID: 0` once the run has ended.
async fn ui_reference(c: &Cluster, i: usize, thread: &str) -> Vec<Sse> {
    let s = c
        .reader(&[i], Format::Ui)
        .session(0, thread, Some("0"), &never)
        .await;
    assert!(
        s.finished(),
        "the full UI-message stream on gateway {i} did not end with [DONE]: {}",
        describe(std::slice::from_ref(&s))
    );
    s.events
}

/// The thread's log read on instance `i`, checked (gapless, one terminal per run, last).
async fn checked_log(c: &Cluster, i: usize, thread: &str) -> Vec<RunLog> {
    let log = c
        .thread_log(i, thread)
        .await
        .unwrap_or_else(|e| panic!("reading the log on gateway {i}: {e}"));
    check_thread_log(&log).unwrap_or_else(|e| panic!("thread {thread}'s log: {e}"));
    log
}

/// `sum` of a counter over the instances `of` (absent series count 0).
async fn metric_sum(c: &Cluster, of: &[usize], series: &str) -> u64 {
    let mut sum = 0;
    for &i in of {
        sum += c.metric(i, series).await.unwrap_or(0);
    }
    sum
}

#[test]
fn the_history_checker_finds_gaps_duplicates_and_misplaced_terminals() {
    let sse = |id: &str, data: &str| Sse {
        id: Some(id.into()),
        data: data.into(),
    };
    let session = |cursor: Option<&str>, events: Vec<Sse>| Session {
        gateway: 0,
        cursor: cursor.map(str::to_string),
        run: None,
        events,
        end: End::Clean,
    };
    let d = r#"{"type":"delta","content":"x"}"#;
    let end = r#"{"type":"end","content":{}}"#;
    let run = |seqs: &[(u64, &str)]| RunLog {
        run: "r".into(),
        events: seqs.iter().map(|(s, d)| (*s, d.to_string())).collect(),
    };
    assert!(check_thread_log(&[run(&[(1, d), (2, end)]), run(&[(3, d), (4, end)])]).is_ok());
    assert!(check_thread_log(&[run(&[(1, d), (3, end)])]).is_err());
    assert!(check_thread_log(&[run(&[(1, d), (1, d), (2, end)])]).is_err());
    assert!(check_thread_log(&[run(&[(1, end), (2, end)])]).is_err());
    assert!(check_thread_log(&[run(&[(1, d), (2, d)])]).is_err());
    assert!(check_thread_log(&[run(&[(2, d), (3, end)])]).is_err());
    let nested_end = r#"{"type":"end","call_id":"t","parent_call_id":"r"}"#;
    assert!(check_thread_log(&[run(&[(1, nested_end), (2, end)])]).is_ok());
    let stopped = r#"{"type":"error","content":{"message":"stopped"},"metadata":{"sluice_status":"stopped"}}"#;
    assert!(check_thread_log(&[run(&[(1, d), (2, stopped)])]).is_ok());

    let reference = vec![sse("1", "a"), sse("2", "b"), sse("3", "c"), sse("4", "d")];
    let ok = [
        session(None, vec![sse("1", "a")]),
        session(Some("1"), vec![sse("2", "b"), sse("3", "c"), sse("4", "d")]),
    ];
    assert!(check_reader(&reference, &ok, true).is_ok());
    let dup = [
        session(None, vec![sse("1", "a"), sse("2", "b")]),
        session(Some("1"), vec![sse("2", "b")]),
    ];
    assert!(check_reader(&reference, &dup, false).is_err());
    let gap = [session(Some("1"), vec![sse("3", "c")])];
    assert!(check_reader(&reference, &gap, false).is_err());
    let short = [session(Some("2"), vec![sse("3", "c")])];
    assert!(check_reader(&reference, &short, false).is_ok());
    assert!(check_reader(&reference, &short, true).is_err());
    let changed = [session(Some("2"), vec![sse("3", "C")])];
    assert!(check_reader(&reference, &changed, false).is_err());

    let reqs = vec![
        json!({"path": "/agents/1/run", "headers": {}, "body": {"message_id": "m1"}}),
        json!({"path": "/agents/1/run", "headers": {"last-event-id": "4"}, "body": {"message_id": "m1"}}),
        json!({"path": "/api/invokeAgent", "headers": {}, "body": {"message": {"id": "m2"}}}),
        json!({"path": "/api/invokeAgent", "headers": {}, "body": {"message": {"id": "m2"}}}),
        json!({"path": "/agents/1/run", "headers": {}, "body": {"message_id": "m3", "last_event_id": 2}}),
    ];
    assert!(check_one_fresh_run(&reqs, &["m1"]).is_ok());
    assert!(check_one_fresh_run(&reqs, &["m2"]).is_err());
    assert!(check_one_fresh_run(&reqs, &["m3"]).is_err());
    assert!(check_one_fresh_run(&reqs, &["m4"]).is_err());
    assert_eq!(resumes_of(&reqs, "m1").len(), 1);
}

/// Invoke on one instance; snapshot, long-poll, stream, resume (both dialects, from `k` and
/// `k.j`) and stop on the others.
#[tokio::test]
async fn any_instance_answers_any_request() {
    let redis = RedisServer::start();
    let c = Cluster::start(3, "agentflow", &redis, "");
    let n = 30;
    let (thread, run) = c
        .start_run(
            0,
            "m-any-1",
            &format!("scenario:slow tokens={n} delay_ms=100"),
        )
        .await;

    // Snapshot on gateway 1.
    let snap = c.wait_seq(1, &thread, 2, 10 * SEC).await;
    assert_eq!(snap["threadId"], json!(thread), "{snap}");
    assert_eq!(snap["runId"], json!(run), "{snap}");
    assert_eq!(snap["streamStatus"], "in_progress", "{snap}");
    assert_eq!(
        snap["messages"][0]["parts"][0]["text"],
        json!(format!("scenario:slow tokens={n} delay_ms=100"))
    );

    // Long-poll on gateway 1: it wakes on the next event ingested by gateway 0.
    let k = snap["lastSeq"].as_u64().unwrap();
    let t0 = Instant::now();
    let (status, next) = c
        .conversation(1, &thread, &format!("&afterSeq={k}&wait=10"), 15 * SEC)
        .await;
    let took = t0.elapsed();
    assert_eq!(status, 200, "{next}");
    assert!(next["lastSeq"].as_u64().unwrap() > k, "{next}");
    assert!(
        took < 3 * SEC,
        "the long-poll on gateway 1 woke after {took:?} (events come every 100 ms on gateway 0)"
    );

    // Streams on gateway 2 (UI-message) and gateway 2 (AgentFlow), cut mid-way, resumed on
    // gateway 1 and gateway 0 with Last-Event-ID.
    let ui_first = c
        .reader(&[2], Format::Ui)
        .read_until(&thread, None, 6)
        .await;
    assert_eq!(
        ui_first.end,
        End::HungUp,
        "{}",
        describe(std::slice::from_ref(&ui_first))
    );
    let af_first = c
        .reader(&[2], Format::AgentFlow)
        .read_until(&thread, Some("0".into()), 5)
        .await;
    assert_eq!(
        af_first.end,
        End::HungUp,
        "{}",
        describe(std::slice::from_ref(&af_first))
    );
    let ui_resume = c.reader(&[1, 0], Format::Ui);
    let af_resume = c.reader(&[0, 1], Format::AgentFlow);
    let (ui_rest, af_rest) = tokio::join!(
        ui_resume.follow(
            &thread,
            last_id(std::slice::from_ref(&ui_first)),
            &never,
            30 * SEC
        ),
        af_resume.follow(
            &thread,
            last_id(std::slice::from_ref(&af_first)),
            &never,
            30 * SEC
        ),
    );
    let snap = c.wait_terminal(2, &thread, 20 * SEC).await;
    assert_eq!(snap["streamStatus"], "completed", "{snap}");
    assert_eq!(text_of(&snap["messages"][1]), slow_answer(n));
    let mut ui_sessions = vec![ui_first];
    ui_sessions.extend(ui_rest);
    let mut af_sessions = vec![af_first];
    af_sessions.extend(af_rest);
    assert!(
        ui_sessions.last().unwrap().finished() && af_sessions.last().unwrap().finished(),
        "resumed streams did not reach the run's end: {} / {}",
        describe(&ui_sessions),
        describe(&af_sessions)
    );
    assert!(
        ui_sessions[1].gateway == 1 && af_sessions[1].gateway == 0,
        "the resumes went elsewhere: {} / {}",
        describe(&ui_sessions),
        describe(&af_sessions)
    );

    // The log, read on gateway 1, and what every reader got.
    let log = checked_log(&c, 1, &thread).await;
    assert_eq!(log.len(), 1, "one run");
    assert_eq!(delta_text(&log[0]), slow_answer(n));
    check_reader(&as_sse(&log[0]), &af_sessions, true)
        .unwrap_or_else(|e| panic!("AgentFlow reader: {e}"));
    let ui_full = ui_reference(&c, 2, &thread).await;
    check_reader(&ui_full, &ui_sessions, true).unwrap_or_else(|e| panic!("UI reader: {e}"));
    assert_eq!(
        reduce_ui(&ui_chunks(&joined(&ui_sessions))).unwrap(),
        snap["messages"][1],
        "the joined UI stream rebuilds the snapshot's message"
    );
    // Every instance renders the same stream.
    for i in [0, 1] {
        assert_eq!(
            ui_reference(&c, i, &thread).await,
            ui_full,
            "gateway {i} renders differently"
        );
    }

    // A resume from every id (`k.j` ones included) on a rotating instance gets exactly the rest.
    let ids: Vec<(usize, String)> = ui_full
        .iter()
        .enumerate()
        .filter_map(|(i, e)| e.id.clone().map(|id| (i, id)))
        .collect();
    assert!(
        ids.iter().any(|(_, id)| id.contains('.')),
        "no k.j ids in the UI stream: {ids:?}"
    );
    for (k, (i, id)) in ids.iter().enumerate() {
        let gw = k % 3;
        let s = c
            .reader(&[gw], Format::Ui)
            .session(0, &thread, Some(id), &never)
            .await;
        let rest = &ui_full[i + 1..];
        if rest.iter().all(|e| e.data == "[DONE]") {
            assert_eq!(
                s.end,
                End::NoContent,
                "after {id} on gateway {gw}: nothing is left"
            );
            continue;
        }
        assert!(s.finished(), "after {id} on gateway {gw}: {:?}", s.end);
        assert_eq!(s.events, rest, "resuming after {id} on gateway {gw}");
    }

    // A poller on gateway 1 waiting at the thread's end wakes when gateway 2 starts the
    // thread's next turn, whose seqs follow the first run's.
    let last = snap["lastSeq"].as_u64().unwrap();
    let (polled, sent_at) = tokio::join!(
        async {
            let r = c
                .conversation(1, &thread, &format!("&afterSeq={last}&wait=10"), 15 * SEC)
                .await;
            (r, Instant::now())
        },
        async {
            tokio::time::sleep(700 * MS).await;
            let at = Instant::now();
            let resp = c
                .invoke_202(2, "m-any-1b", "And then?", Some(&thread))
                .await;
            assert_eq!(resp.status(), 202, "{:?}", resp.text().await);
            at
        },
    );
    let ((status, next), woke_at) = polled;
    assert_eq!(status, 200, "{next}");
    assert!(
        woke_at >= sent_at && woke_at - sent_at < 5 * SEC,
        "the poller on gateway 1 woke {:?} from the next turn's start on gateway 2: {next}",
        woke_at.checked_duration_since(sent_at)
    );
    assert_ne!(next["runId"], json!(run), "{next}");
    assert_eq!(
        next["messages"][2]["parts"][0]["text"], "And then?",
        "{next}"
    );
    let second = c.wait_terminal(0, &thread, 20 * SEC).await;
    assert_eq!(second["streamStatus"], "completed", "{second}");
    let log = checked_log(&c, 0, &thread).await;
    assert_eq!(log.len(), 2, "two runs in the thread");

    // The instances really share Redis (not each its own memory store).
    let keys = redis.cmd(&["KEYS", &format!("{}*", c.prefix)]).unwrap();
    assert!(
        !keys.is_empty(),
        "nothing under the key prefix {} in Redis",
        c.prefix
    );

    c.check_one_backend_run(&["m-any-1", "m-any-1b"])
        .await
        .unwrap();
    assert!(
        resumes_of(&c.mock_requests().await, "m-any-1").is_empty(),
        "no instance died, yet the backend was asked to resume"
    );

    // A stop on gateway 2 of a run invoked on gateway 0 (a silent one: only the stop ends it).
    eventually(
        5 * SEC,
        "the first run's backend stream never closed",
        || async { (c.mock_active().await == 0).then_some(()) },
    )
    .await;
    let (silent, silent_run) = c.start_run(0, "m-any-2", "scenario:hang").await;
    eventually(10 * SEC, "the backend never started streaming", || async {
        (c.mock_active().await == 1).then_some(())
    })
    .await;
    c.wait_seq(1, &silent, 2, 10 * SEC).await;
    // A reader on gateway 1 is open when the stop comes.
    let watcher = c.reader(&[1], Format::Ui);
    let w = watcher.clone();
    let t = silent.clone();
    let watching = tokio::spawn(async move { w.session(0, &t, None, &never).await });
    eventually(10 * SEC, "the watcher on gateway 1 got nothing", || async {
        (watcher.seen() >= 2).then_some(())
    })
    .await;
    let t0 = Instant::now();
    let gw2 = c.gw(2);
    let resp = gw2
        .http
        .post(gw2.url(&format!("/api/threads/{silent}/stop")))
        .timeout(10 * SEC)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    assert_eq!(status, 200, "stop on gateway 2: {body}");
    assert_eq!(body["status"], "stopped", "{body}");
    assert_eq!(body["runId"], json!(silent_run), "{body}");
    let snap = c.wait_terminal(1, &silent, 5 * SEC).await;
    assert_eq!(snap["streamStatus"], "stopped", "{snap}");
    eventually(
        5 * SEC,
        "the backend stream stayed open after a stop on another instance",
        || async { (c.mock_active().await == 0).then_some(()) },
    )
    .await;
    assert!(
        t0.elapsed() < 5 * SEC,
        "the stop took {:?} to reach gateway 0's ingest",
        t0.elapsed()
    );
    let watched = tokio::time::timeout(10 * SEC, watching)
        .await
        .expect("the open stream on gateway 1 did not end after the stop")
        .unwrap();
    assert!(watched.finished(), "{:?}", watched.end);
    let chunks = ui_chunks(&watched.events);
    assert_eq!(chunks.last().unwrap()["type"], "abort", "{chunks:?}");
    checked_log(&c, 2, &silent).await;
}

/// Three concurrent invokes of one message, one per instance: one run, one backend request.
#[tokio::test]
async fn retries_of_one_message_across_instances_make_one_backend_run() {
    let redis = RedisServer::start();
    let c = Cluster::start(3, "agentflow", &redis, "");
    let text = "scenario:slow tokens=10 delay_ms=50";
    let mut threads = Vec::new();
    let mut ids = Vec::new();

    // Dialect A, 202 mode, a new conversation each round.
    for round in 0..3 {
        let mid = format!("m-retry-a{round}");
        let answers = futures_util::future::join_all((0..3).map(|i| {
            let mid = mid.clone();
            let c = &c;
            async move {
                let resp = c.invoke_202(i, &mid, text, None).await;
                let status = resp.status().as_u16();
                let re = resp.headers().get("x-sluice-reattached").is_some();
                let body: Value = resp.json().await.unwrap_or(Value::Null);
                (i, status, re, body)
            }
        }))
        .await;
        for (i, status, _, body) in &answers {
            assert_eq!(*status, 202, "gateway {i}: {body}");
        }
        let run = &answers[0].3["runId"];
        let thread = &answers[0].3["threadId"];
        for (i, _, _, body) in &answers {
            assert_eq!(
                (&body["runId"], &body["threadId"]),
                (run, thread),
                "round {round}: gateway {i} answered another run: {answers:?}"
            );
        }
        let reattached = answers.iter().filter(|a| a.2).count();
        assert_eq!(reattached, 2, "round {round}: {answers:?}");
        threads.push(thread.as_str().unwrap().to_string());
        ids.push(mid);
    }

    // The AgentFlow dialect: same conversation_id and message_id.
    for round in 0..2 {
        let mid = format!("m-retry-b{round}");
        let conv = format!("conv-retry-{round}");
        let answers = futures_util::future::join_all((0..3).map(|i| {
            let body = json!({"message": text, "message_id": mid, "conversation_id": conv});
            let c = &c;
            async move {
                let resp = c.post_202(i, "/agents/1/run", &body).await;
                let status = resp.status().as_u16();
                let body: Value = resp.json().await.unwrap_or(Value::Null);
                (i, status, body)
            }
        }))
        .await;
        for (i, status, body) in &answers {
            assert_eq!(*status, 202, "gateway {i}: {body}");
            assert_eq!(
                (&body["runId"], &body["threadId"]),
                (&answers[0].2["runId"], &answers[0].2["threadId"]),
                "round {round}: gateway {i} answered another run: {answers:?}"
            );
        }
        threads.push(answers[0].2["threadId"].as_str().unwrap().to_string());
        ids.push(mid);
    }

    // Streaming retries: every instance streams the same run, whole.
    let mid = "m-retry-s".to_string();
    let bodies = futures_util::future::join_all((0..3).map(|i| {
        let gw = c.gw(i);
        let body = json!({"agentId": 1, "message": {"id": mid, "role": "user",
                          "parts": [{"type": "text", "text": text}]}});
        async move {
            let resp = gw
                .http
                .post(gw.url("/api/invokeAgent"))
                .timeout(30 * SEC)
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200, "gateway {i}");
            let thread = resp.headers()["x-thread-id"].to_str().unwrap().to_string();
            let run = resp.headers()["x-run-id"].to_str().unwrap().to_string();
            (thread, run, resp.text().await.unwrap())
        }
    }))
    .await;
    let (thread, run, first) = bodies[0].clone();
    let (first_events, _) = parse_sse(&first);
    assert_eq!(first_events.last().map(|e| e.data.as_str()), Some("[DONE]"));
    for (i, (t, r, body)) in bodies.iter().enumerate() {
        assert_eq!((t, r), (&thread, &run), "gateway {i}");
        assert_eq!(
            parse_sse(body).0,
            first_events,
            "gateway {i} streamed differently"
        );
    }
    threads.push(thread);
    ids.push(mid);

    for t in &threads {
        let snap = c.wait_terminal(1, t, 20 * SEC).await;
        assert_eq!(snap["streamStatus"], "completed", "{snap}");
        assert_eq!(
            snap["messages"].as_array().unwrap().len(),
            2,
            "one run: {snap}"
        );
        assert_eq!(text_of(&snap["messages"][1]), slow_answer(10));
        let log = checked_log(&c, 2, t).await;
        assert_eq!(log.len(), 1);
    }
    // A retry after the end, on any instance, re-attaches to the finished run.
    for i in 0..3 {
        let resp = c.invoke_202(i, &ids[0], text, None).await;
        assert_eq!(resp.status(), 202, "gateway {i}");
        assert_eq!(
            resp.headers()
                .get("x-sluice-reattached")
                .map(|v| v.as_bytes()),
            Some(&b"true"[..]),
            "gateway {i}"
        );
        let body: Value = resp.json().await.unwrap();
        assert_eq!(
            (body["threadId"].as_str(), body["status"].as_str()),
            (Some(threads[0].as_str()), Some("completed")),
            "gateway {i}: {body}"
        );
    }
    let reqs = c.mock_requests().await;
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    c.check_one_backend_run(&ids).await.unwrap();
    for id in ids {
        let all = backend_posts(&reqs)
            .into_iter()
            .filter(|p| p.message_id.as_deref() == Some(id))
            .count();
        assert_eq!(all, 1, "message {id}: {all} backend requests");
    }
}

/// `kill -9` of the instance ingesting a run: another one continues it to `completed`, readers
/// that reconnect to survivors get every event once, and the backend ran the message once.
async fn a_killed_owner_is_taken_over(dialect: &str) {
    let redis = RedisServer::start();
    let mut c = Cluster::start(3, dialect, &redis, "");
    let mid = format!("m-kill-{dialect}");
    let n = 60;
    let (thread, _) = c
        .start_run(0, &mid, &format!("scenario:slow tokens={n} delay_ms=100"))
        .await;
    // One reader on the owner (cut by the kill, it moves on to 1, then 2), one on gateway 1.
    let on_owner = c.reader(&[0, 1, 2], Format::AgentFlow);
    let on_peer = c.reader(&[1, 2], Format::AgentFlow);
    let owner_task = {
        let (r, t) = (on_owner.clone(), thread.clone());
        tokio::spawn(async move { r.follow(&t, Some("0".into()), &never, 45 * SEC).await })
    };
    let peer_task = {
        let (r, t) = (on_peer.clone(), thread.clone());
        tokio::spawn(async move { r.follow(&t, Some("0".into()), &never, 45 * SEC).await })
    };
    eventually(
        10 * SEC,
        "the readers got nothing before the kill",
        || async { (on_owner.seen() >= 5 && on_peer.seen() >= 5).then_some(()) },
    )
    .await;
    let before = c.wait_seq(1, &thread, 5, 10 * SEC).await["lastSeq"]
        .as_u64()
        .unwrap();
    c.kill9(0);
    let killed = Instant::now();

    let snap = c.wait_terminal(2, &thread, 30 * SEC).await;
    assert_eq!(
        snap["streamStatus"], "completed",
        "the run did not complete after its owner was killed at seq {before}: {snap}"
    );
    eprintln!("{dialect}: completed {:?} after the kill", killed.elapsed());
    assert_eq!(text_of(&snap["messages"][1]), slow_answer(n), "{snap}");
    let log = checked_log(&c, 2, &thread).await;
    assert_eq!(log.len(), 1);
    assert_eq!(delta_text(&log[0]), slow_answer(n));
    let reference = as_sse(&log[0]);

    let owner_sessions = tokio::time::timeout(50 * SEC, owner_task)
        .await
        .expect("the owner's reader never finished")
        .unwrap();
    let peer_sessions = tokio::time::timeout(50 * SEC, peer_task)
        .await
        .expect("the peer's reader never finished")
        .unwrap();
    for (name, sessions) in [("owner", &owner_sessions), ("peer", &peer_sessions)] {
        assert!(
            sessions.last().unwrap().finished(),
            "{name} reader never reached the end: {}",
            describe(sessions)
        );
        check_reader(&reference, sessions, true).unwrap_or_else(|e| panic!("{name} reader: {e}"));
    }
    assert!(
        owner_sessions.len() >= 2
            && owner_sessions[0].gateway == 0
            && owner_sessions[0].end != End::Clean,
        "the reader on the killed owner was not cut and resumed elsewhere: {}",
        describe(&owner_sessions)
    );

    c.check_one_backend_run(&[&mid]).await.unwrap();
    let reqs = c.mock_requests().await;
    match dialect {
        "agentflow" => assert!(
            !resumes_of(&reqs, &mid).is_empty(),
            "the new owner continued without asking the backend to resume: {:?}",
            backend_posts(&reqs)
        ),
        _ => assert_eq!(
            backend_posts(&reqs)
                .iter()
                .filter(|p| p.message_id.as_deref() == Some(mid.as_str()))
                .count(),
            1,
            "a poll backend's run is polled on, never asked again"
        ),
    }
    let takeovers = metric_sum(&c, &[1, 2], "sluice_store_takeovers_total").await;
    assert!(takeovers >= 1, "no survivor counts a takeover");
}

#[tokio::test]
async fn a_killed_owner_is_taken_over_agentflow() {
    a_killed_owner_is_taken_over("agentflow").await;
}

#[tokio::test]
async fn a_killed_owner_is_taken_over_poll() {
    a_killed_owner_is_taken_over("poll").await;
}

/// A UI-message backend cannot be asked to resume: the run ends `error`, saying why, and the
/// backend never sees a second request.
#[tokio::test]
async fn a_killed_owner_of_a_ui_message_run_ends_it_error_with_the_reason() {
    let redis = RedisServer::start();
    let mut c = Cluster::start(3, "ui-message", &redis, "");
    let mid = "m-kill-ui";
    let (thread, _) = c
        .start_run(0, mid, "scenario:slow tokens=60 delay_ms=100")
        .await;
    let reader = c.reader(&[1, 2], Format::Ui);
    let task = {
        let (r, t) = (reader.clone(), thread.clone());
        tokio::spawn(async move { r.follow(&t, None, &never, 45 * SEC).await })
    };
    eventually(
        10 * SEC,
        "the reader got nothing before the kill",
        || async { (reader.seen() >= 5).then_some(()) },
    )
    .await;
    c.wait_seq(1, &thread, 5, 10 * SEC).await;
    c.kill9(0);
    let snap = c.wait_terminal(2, &thread, 30 * SEC).await;
    assert_eq!(snap["streamStatus"], "error", "{snap}");
    let why = snap["errorText"]
        .as_str()
        .unwrap_or("")
        .to_ascii_lowercase();
    assert!(
        why.contains("continu") || why.contains("resum"),
        "the error does not say the run could not be continued: {snap}"
    );
    checked_log(&c, 1, &thread).await;
    let sessions = tokio::time::timeout(50 * SEC, task)
        .await
        .expect("the reader never finished")
        .unwrap();
    assert!(
        sessions.last().unwrap().finished(),
        "{}",
        describe(&sessions)
    );
    let reference = ui_reference(&c, 2, &thread).await;
    check_reader(&reference, &sessions, true).unwrap_or_else(|e| panic!("UI reader: {e}"));
    let chunks = ui_chunks(&joined(&sessions));
    assert_eq!(
        chunks.last().unwrap()["type"],
        "error",
        "{:?}",
        chunks.last()
    );
    let reqs = c.mock_requests().await;
    let all: Vec<BackendPost> = backend_posts(&reqs)
        .into_iter()
        .filter(|p| p.message_id.as_deref() == Some(mid))
        .collect();
    assert_eq!(
        all.len(),
        1,
        "the backend was asked more than once: {all:?}"
    );
}

/// An owner paused past its lease (`SIGSTOP`), then resumed (`SIGCONT`): another instance has
/// taken the run over and completes it; the zombie's appends are refused.
#[tokio::test]
async fn a_paused_owner_is_fenced() {
    let redis = RedisServer::start();
    let c = Cluster::start(3, "agentflow", &redis, "");
    let mid = "m-pause";
    let n = 120;
    let (thread, _) = c
        .start_run(0, mid, &format!("scenario:slow tokens={n} delay_ms=100"))
        .await;
    let reader = c.reader(&[1, 2], Format::AgentFlow);
    let task = {
        let (r, t) = (reader.clone(), thread.clone());
        tokio::spawn(async move { r.follow(&t, Some("0".into()), &never, 50 * SEC).await })
    };
    let at_stop = c.wait_seq(1, &thread, 5, 10 * SEC).await["lastSeq"]
        .as_u64()
        .unwrap();
    c.sigstop(0);
    let stopped = Instant::now();
    // Another instance takes over, and the run goes on while gateway 0 sleeps.
    eventually(
        10 * SEC,
        "no instance took the paused owner's run over",
        || async {
            (metric_sum(&c, &[1, 2], "sluice_store_takeovers_total").await >= 1).then_some(())
        },
    )
    .await;
    c.wait_seq(1, &thread, at_stop + 5, 10 * SEC).await;
    // Paused for more than twice the lease (2 s), and woken while the run still streams, so
    // that the zombie has events to append.
    if let Some(left) = (5 * SEC).checked_sub(stopped.elapsed()) {
        tokio::time::sleep(left).await;
    }
    let (_, at_wake) = c.conversation(1, &thread, "", 5 * SEC).await;
    assert_eq!(
        at_wake["streamStatus"], "in_progress",
        "the run ended before the owner woke: make it longer ({at_wake})"
    );
    c.sigcont(0);
    let snap = c.wait_terminal(2, &thread, 40 * SEC).await;
    assert_eq!(snap["streamStatus"], "completed", "{snap}");
    assert_eq!(text_of(&snap["messages"][1]), slow_answer(n));
    let log = checked_log(&c, 2, &thread).await;
    assert_eq!(delta_text(&log[0]), slow_answer(n));
    // The old owner, awake again, answers like any instance.
    let (status, again) = c.conversation(0, &thread, "", 10 * SEC).await;
    assert_eq!(
        (status, &again["streamStatus"]),
        (200, &json!("completed")),
        "{again}"
    );
    let sessions = tokio::time::timeout(55 * SEC, task)
        .await
        .expect("the reader never finished")
        .unwrap();
    check_reader(&as_sse(&log[0]), &sessions, true).unwrap_or_else(|e| panic!("reader: {e}"));
    c.check_one_backend_run(&[mid]).await.unwrap();
    // The zombie tried to write and was refused.
    let fenced = eventually(
        10 * SEC,
        "sluice_store_fenced_total never rose on the resumed owner",
        || async {
            match c.metric(0, "sluice_store_fenced_total").await {
                Some(v) if v > 0 => Some(v),
                _ => None,
            }
        },
    )
    .await;
    eprintln!("fenced appends on the old owner: {fenced}");
    // Nothing the zombie did after its wake-up reached the log.
    let again = checked_log(&c, 0, &thread).await;
    assert_eq!(again.len(), 1);
    assert_eq!(
        as_sse(&again[0]),
        as_sse(&log[0]),
        "the log changed after the run ended"
    );
}

/// Redis killed mid-run and restarted (with its AOF): fast `503 store_unavailable`, `/readyz`
/// not ready, then recovery by itself; the run in flight ends, its log intact.
#[tokio::test]
async fn redis_restart_mid_run() {
    let mut redis = RedisServer::start_persistent();
    let c = Cluster::start(3, "agentflow", &redis, "");
    let mid = "m-redis-1";
    let (thread, _) = c
        .start_run(0, mid, "scenario:slow tokens=60 delay_ms=100")
        .await;
    c.wait_seq(1, &thread, 5, 10 * SEC).await;
    redis.stop();
    let down = Instant::now();

    // Requests fail fast with 503 store_unavailable.
    let snap_err = eventually(
        5 * SEC,
        "getConversation never answered 503 with Redis down",
        || async {
            let t0 = Instant::now();
            let (status, body) = c.conversation(1, &thread, "", 5 * SEC).await;
            assert!(
                t0.elapsed() < 5 * SEC,
                "getConversation took {:?}",
                t0.elapsed()
            );
            assert!(status == 503 || status == 200, "{status} {body}");
            (status == 503).then_some(body)
        },
    )
    .await;
    assert_eq!(snap_err["error"]["code"], "store_unavailable", "{snap_err}");
    let t0 = Instant::now();
    let resp = c.invoke_202(2, "m-redis-down", "hello", None).await;
    let took = t0.elapsed();
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    assert_eq!(
        (status, &body["error"]["code"]),
        (503, &json!("store_unavailable")),
        "{body}"
    );
    assert!(took < 5 * SEC, "invoke took {took:?} to fail");
    for i in 0..3 {
        eventually(
            5 * SEC,
            &format!("gateway {i}'s /readyz stayed 200 with Redis down"),
            || async { (c.readyz(i).await != 200).then_some(()) },
        )
        .await;
    }
    // Down for longer than the lease (2 s): the owner cannot renew it, and every request in
    // the meantime still fails fast.
    while down.elapsed() < 3500 * MS {
        let t0 = Instant::now();
        let (status, body) = c.conversation(2, &thread, "", 5 * SEC).await;
        assert_eq!(
            (status, &body["error"]["code"]),
            (503, &json!("store_unavailable")),
            "with Redis down for {:?}: {body}",
            down.elapsed()
        );
        assert!(
            t0.elapsed() < 3 * SEC,
            "getConversation took {:?}",
            t0.elapsed()
        );
        tokio::time::sleep(200 * MS).await;
    }

    redis.start_again();
    let up = Instant::now();
    for i in 0..3 {
        eventually(
            10 * SEC,
            &format!("gateway {i}'s /readyz never came back"),
            || async { (c.readyz(i).await == 200).then_some(()) },
        )
        .await;
    }
    eprintln!("ready again {:?} after the restart", up.elapsed());
    // New runs work, through any instance.
    let (fresh, _) = c.start_run(1, "m-redis-2", "hello after the restart").await;
    let snap = c.wait_terminal(2, &fresh, 20 * SEC).await;
    assert_eq!(snap["streamStatus"], "completed", "{snap}");
    // The run that was in flight ends, one way or the other, with a whole log.
    let snap = c.wait_terminal(0, &thread, 30 * SEC).await;
    match snap["streamStatus"].as_str() {
        Some("completed") => assert_eq!(text_of(&snap["messages"][1]), slow_answer(60)),
        Some("error") => assert!(
            snap["errorText"].as_str().is_some_and(|t| !t.is_empty()),
            "an error without a reason: {snap}"
        ),
        _ => panic!("the run in flight ended neither completed nor error: {snap}"),
    }
    eprintln!("the run in flight ended {}", snap["streamStatus"]);
    let log = checked_log(&c, 1, &thread).await;
    if snap["streamStatus"] == "completed" {
        assert_eq!(delta_text(&log[0]), slow_answer(60));
    }
    checked_log(&c, 0, &fresh).await;
    c.check_one_backend_run(&[mid, "m-redis-2"]).await.unwrap();
}

/// `SIGTERM`: the draining instance hands its runs over at once (long leases here, so only a
/// release explains a prompt takeover), cuts its streams without a clean end, and its readers
/// resume elsewhere exactly once.
#[tokio::test]
async fn drain_hands_runs_over() {
    let redis = RedisServer::start();
    let mut c = Cluster::start_conf(
        3,
        "agentflow",
        &redis,
        ClusterConf {
            lease_ttl: "10s".into(),
            lease_renew: "3s".into(),
            ..ClusterConf::default()
        },
    );
    let mid = "m-drain";
    let n = 80;
    let (thread, _) = c
        .start_run(0, mid, &format!("scenario:slow tokens={n} delay_ms=100"))
        .await;
    let ui = c.reader(&[0, 1], Format::Ui);
    let af = c.reader(&[0, 2], Format::AgentFlow);
    let ui_task = {
        let (r, t) = (ui.clone(), thread.clone());
        tokio::spawn(async move { r.follow(&t, None, &never, 45 * SEC).await })
    };
    let af_task = {
        let (r, t) = (af.clone(), thread.clone());
        tokio::spawn(async move { r.follow(&t, Some("0".into()), &never, 45 * SEC).await })
    };
    eventually(10 * SEC, "the readers on gateway 0 got nothing", || async {
        (ui.seen() >= 5 && af.seen() >= 5).then_some(())
    })
    .await;
    c.sigterm(0);
    let t0 = Instant::now();
    eventually(
        8 * SEC,
        "no instance took the draining instance's run over",
        || async {
            (metric_sum(&c, &[1, 2], "sluice_store_takeovers_total").await >= 1).then_some(())
        },
    )
    .await;
    let took = t0.elapsed();
    eprintln!("drain: taken over {took:?} after SIGTERM");
    assert!(
        took < 4 * SEC,
        "the takeover came {took:?} after SIGTERM (lease_ttl is 10 s: was the lease released?)"
    );
    let snap = c.wait_terminal(1, &thread, 30 * SEC).await;
    assert_eq!(snap["streamStatus"], "completed", "{snap}");
    assert_eq!(text_of(&snap["messages"][1]), slow_answer(n));
    let log = checked_log(&c, 2, &thread).await;
    assert_eq!(delta_text(&log[0]), slow_answer(n));

    let ui_sessions = tokio::time::timeout(50 * SEC, ui_task)
        .await
        .unwrap()
        .unwrap();
    let af_sessions = tokio::time::timeout(50 * SEC, af_task)
        .await
        .unwrap()
        .unwrap();
    for (name, sessions) in [("UI-message", &ui_sessions), ("AgentFlow", &af_sessions)] {
        let first = &sessions[0];
        assert_eq!(first.gateway, 0, "{name}: {}", describe(sessions));
        assert!(
            first.end != End::Clean,
            "{name}: the draining instance ended the stream cleanly: {}",
            describe(sessions)
        );
        assert!(
            !first
                .events
                .iter()
                .any(|e| e.data == "[DONE]" || is_terminal(&e.data)),
            "{name}: the draining instance sent an end: {}",
            describe(sessions)
        );
        assert!(
            sessions.len() >= 2 && sessions.last().unwrap().finished(),
            "{name}: the reader did not finish elsewhere: {}",
            describe(sessions)
        );
    }
    check_reader(&as_sse(&log[0]), &af_sessions, true)
        .unwrap_or_else(|e| panic!("AgentFlow reader: {e}"));
    let ui_full = ui_reference(&c, 1, &thread).await;
    check_reader(&ui_full, &ui_sessions, true).unwrap_or_else(|e| panic!("UI reader: {e}"));
    c.check_one_backend_run(&[mid]).await.unwrap();
    assert!(
        c.wait_exit(0, 15 * SEC),
        "the drained instance did not exit"
    );
}

/// Live readers share their instance's few Redis connections: 60 streams of one run on one
/// instance open no connection of their own, and each gets the whole run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_live_readers_share_a_few_redis_connections() {
    let redis = RedisServer::start();
    let c = Cluster::start(2, "agentflow", &redis, "");
    let (thread, _) = c
        .start_run(0, "m-many", "scenario:slow tokens=40 delay_ms=100")
        .await;
    let readers: Vec<_> = (0..60)
        .map(|_| {
            let gw = c.gw(1);
            let req = gw
                .http
                .get(format!("{}/api/threads/{thread}/stream", gw.base))
                .header("last-event-id", "0");
            tokio::spawn(async move { req.send().await.unwrap().text().await.unwrap() })
        })
        .collect();
    eventually(20 * SEC, "the 60 streams never all opened", || async {
        (c.metric(1, "sluice_sse_streams_active").await >= Some(60)).then_some(())
    })
    .await;
    let info = redis.cmd(&["INFO", "clients"]).unwrap();
    let clients: u64 = info
        .lines()
        .find_map(|l| l.trim().strip_prefix("connected_clients:"))
        .and_then(|n| n.parse().ok())
        .expect("connected_clients in INFO");
    // Two instances, each with a command connection and a notifications connection, and this
    // test's own: far fewer than the readers.
    assert!(clients <= 8, "{clients} Redis connections for 60 readers");
    let mut bodies = Vec::new();
    for r in readers {
        bodies.push(tokio::time::timeout(40 * SEC, r).await.unwrap().unwrap());
    }
    assert!(bodies[0].contains("data: [DONE]"), "{}", bodies[0]);
    assert!(
        bodies.iter().all(|b| *b == bodies[0]),
        "every reader got the same run"
    );
}

/// POST `/api/chat` for `chat` on instance `i` (202 mode), with the user message `id`.
async fn chat_202(c: &Cluster, i: usize, chat: &str, id: &str, text: &str, regen: bool) -> Value {
    let mut body = json!({
        "id": chat, "agentId": 1,
        "trigger": if regen { "regenerate-message" } else { "submit-message" },
        "messages": [{"id": id, "role": "user", "parts": [{"type": "text", "text": text}]}],
    });
    if regen {
        body["messageId"] = Value::Null;
    }
    let resp = c.post_202(i, "/api/chat", &body).await;
    assert_eq!(resp.status(), 202, "chat on gateway {i}");
    resp.json().await.unwrap()
}

/// A chat id names one thread across instances: started on one, resumed (by chat id) on
/// another, regenerated on a third, and polled by chat id anywhere.
#[tokio::test]
async fn a_chat_goes_on_across_instances() {
    let redis = RedisServer::start();
    let c = Cluster::start(3, "agentflow", &redis, "");
    let chat = "chat-across-instances";
    let first = chat_202(
        &c,
        0,
        chat,
        "cm-1",
        "scenario:slow tokens=20 delay_ms=60",
        false,
    )
    .await;
    // The resume route on another instance replays the run in progress from its start.
    let gw = c.gw(1);
    let resp = gw
        .http
        .get(gw.url(&format!("/api/chat/{chat}/stream")))
        .timeout(30 * SEC)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.text().await.unwrap();
    assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
    let (events, _) = parse_sse(&body);
    let replayed = reduce_ui(&ui_chunks(&events)).unwrap();
    let snap = c.wait_terminal(2, chat, 20 * SEC).await;
    assert_eq!(snap["threadId"], first["threadId"], "{snap}");
    assert_eq!(snap["messages"][1]["id"], replayed["id"], "{snap}");
    assert_eq!(text_of(&snap["messages"][1]), text_of(&replayed));
    // Nothing in progress: 204 everywhere.
    for i in 0..3 {
        let gw = c.gw(i);
        let resp = gw
            .http
            .get(gw.url(&format!("/api/chat/{chat}/stream")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 204, "gateway {i}");
    }
    // Regenerated on a third instance: a new answer replaces the first in the snapshot.
    let again = chat_202(
        &c,
        2,
        chat,
        "cm-1",
        "scenario:slow tokens=20 delay_ms=60",
        true,
    )
    .await;
    assert_eq!(again["threadId"], first["threadId"]);
    assert_ne!(again["runId"], first["runId"]);
    let snap = c.wait_terminal(1, chat, 20 * SEC).await;
    let messages = snap["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2, "{snap}");
    assert_eq!(messages[0]["id"], "cm-1");
    assert_ne!(messages[1]["id"], replayed["id"], "{snap}");
    assert_eq!(text_of(&messages[1]), text_of(&replayed));
    assert_eq!(snap["streamStatus"], "completed");
    // The backend was asked twice: the turn, then the regeneration under its own message id.
    let asked: Vec<String> = c
        .mock_requests()
        .await
        .iter()
        .filter_map(|r| r["body"]["message_id"].as_str().map(str::to_string))
        .collect();
    assert_eq!(asked.len(), 2, "{asked:?}");
    assert_eq!(asked[0], "cm-1");
    assert!(asked[1].starts_with("cm-1.replaces."), "{asked:?}");
}
