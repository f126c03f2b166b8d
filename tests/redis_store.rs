//! The shared store's own promises, beyond the `Store` contract (tests/store_contract.rs): two
//! instances on one Redis under one prefix, as two gateway processes would be. A run's lease
//! is handed over (drain, expiry) and taken over by the other instance with what its ingestion
//! needs to continue (the job and the adapter's mark); the old holder's writes are refused from
//! then on, and the log stays gapless. A stop through the instance that does not ingest the run
//! reaches the one that does.

mod common;

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use sluice::event::NewEvent;
use sluice::store::budget::{Budget, Quotas};
use sluice::store::redis::{RedisSettings, RedisStore};
use sluice::store::{Control, NewRun, RunStatus, Store, StoreError};

fn settings(url: &str, prefix: &str) -> RedisSettings {
    RedisSettings {
        url: url.to_owned(),
        prefix: prefix.to_owned(),
        connect_timeout: Duration::from_secs(2),
        response_timeout: Duration::from_secs(5),
        lease_ttl: Duration::from_millis(1500),
        lease_renew: Duration::from_millis(300),
        takeover_scan: Duration::from_millis(100),
        tail_events: 64,
        max_events_per_run: 10_000,
        max_bytes_per_run: 1 << 20,
        retention: Duration::from_secs(3600),
        thread_retention: Duration::from_secs(3600),
        retry_after: Duration::from_secs(5),
        quotas: Quotas::unlimited(),
    }
}

async fn instance(url: &str, prefix: &str) -> Arc<RedisStore> {
    let s = settings(url, prefix);
    tokio::task::spawn_blocking(move || RedisStore::connect(s, Arc::new(Budget::new(1 << 30))))
        .await
        .unwrap()
        .unwrap()
}

fn new_run() -> NewRun {
    NewRun {
        thread_id: None,
        org_id: "org".into(),
        user_id: "u".into(),
        agent_id: json!("a"),
        user_message: json!({"id": "m1", "role": "user", "parts": []}),
        idempotency_key: Some("m1".into()),
        conversation: None,
    }
}

fn ev(s: &str) -> Vec<NewEvent> {
    vec![NewEvent::new(format!("{{\"t\":\"{s}\"}}"))]
}

async fn next_control(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Control>) -> Control {
    tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .expect("a control message within 20 s")
        .expect("control channel open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_run_is_taken_over_with_its_job_and_mark_and_the_old_holder_is_refused() {
    let redis = common::cluster::RedisServer::start();
    let (a, b) = (
        instance(&redis.url(), "t1").await,
        instance(&redis.url(), "t1").await,
    );
    let mut a_ctl = a.control().unwrap();
    let mut b_ctl = b.control().unwrap();
    let run = a.create_run(new_run()).await.unwrap().run;
    a.save_job(
        &run.run_id,
        json!({"agent_path": "a", "body": {"message": "hi"}}),
    )
    .await
    .unwrap();
    a.append_marked(&run.run_id, ev("1"), Some("up-7".into()))
        .await
        .unwrap();
    a.append(&run.run_id, ev("2")).await.unwrap();
    // The other instance's retry of the same message attaches to the same run.
    let again = b.create_run(new_run()).await.unwrap();
    assert!(again.existing);
    assert_eq!(again.run.run_id, run.run_id);

    a.release().await;
    assert!(matches!(next_control(&mut a_ctl).await, Control::Cancel(r) if r == run.run_id));
    let Control::Adopt(adopted) = next_control(&mut b_ctl).await else {
        panic!("b should adopt the run");
    };
    assert_eq!(adopted.run.run_id, run.run_id);
    assert_eq!(adopted.run.last_seq, 2);
    // The mark is the last one written: marks are kept until replaced.
    assert_eq!(adopted.mark.as_deref(), Some("up-7"));
    assert_eq!(adopted.job.unwrap()["body"]["message"], "hi");

    assert_eq!(b.append(&run.run_id, ev("3")).await, Ok(3));
    assert!(matches!(
        a.append(&run.run_id, ev("x")).await,
        Err(StoreError::Fenced)
    ));
    assert!(matches!(
        a.finish(&run.run_id, RunStatus::Error, Some("zombie".into()), None)
            .await,
        Err(StoreError::Fenced)
    ));
    assert_eq!(
        b.finish(
            &run.run_id,
            RunStatus::Completed,
            None,
            Some(ev("end").remove(0))
        )
        .await,
        Ok(true)
    );
    let log = a.read_after(&run.run_id, 0, 100, 1 << 20).await.unwrap();
    let seqs: Vec<u64> = log.events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4]);
    assert_eq!(log.status, RunStatus::Completed);
    assert_eq!(&log.events[2].data[..], b"{\"t\":\"3\"}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_that_is_not_renewed_expires_and_is_taken_over() {
    let redis = common::cluster::RedisServer::start();
    let a = instance(&redis.url(), "t2").await;
    let run = a.create_run(new_run()).await.unwrap().run;
    a.append(&run.run_id, ev("1")).await.unwrap();
    // The instance goes away without a word: its renewals stop with it.
    drop(a);
    let b = instance(&redis.url(), "t2").await;
    let mut b_ctl = b.control().unwrap();
    let Control::Adopt(adopted) = next_control(&mut b_ctl).await else {
        panic!("b should adopt the run");
    };
    assert_eq!(adopted.run.run_id, run.run_id);
    assert!(adopted.job.is_none(), "no job was recorded");
    assert_eq!(b.append(&run.run_id, ev("2")).await, Ok(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_through_another_instance_reaches_the_ingesting_one() {
    let redis = common::cluster::RedisServer::start();
    let (a, b) = (
        instance(&redis.url(), "t3").await,
        instance(&redis.url(), "t3").await,
    );
    let mut a_ctl = a.control().unwrap();
    let run = a.create_run(new_run()).await.unwrap().run;
    a.append(&run.run_id, ev("1")).await.unwrap();
    let closing = NewEvent::new("{\"t\":\"stopped\"}");
    assert_eq!(
        b.finish(&run.run_id, RunStatus::Stopped, None, Some(closing))
            .await,
        Ok(true)
    );
    assert!(matches!(next_control(&mut a_ctl).await, Control::Cancel(r) if r == run.run_id));
    // The ingesting instance's next write finds the run ended, and changes nothing.
    assert_eq!(
        a.append(&run.run_id, ev("late")).await,
        Err(StoreError::Finished)
    );
    let info = a.run(&run.run_id).await.unwrap();
    assert_eq!((info.status, info.last_seq), (RunStatus::Stopped, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_redis_is_unavailable_and_service_comes_back() {
    let mut redis = common::cluster::RedisServer::start();
    let a = instance(&redis.url(), "t4").await;
    let run = a.create_run(new_run()).await.unwrap().run;
    assert!(a.ready().await);
    redis.stop();
    let started = std::time::Instant::now();
    let refused = a.run(&run.run_id).await;
    assert!(
        matches!(refused, Err(StoreError::Unavailable(_))),
        "{refused:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(10), "fails fast");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(!a.ready().await);
    redis.start_again();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !a.ready().await {
        assert!(
            std::time::Instant::now() < deadline,
            "ready again within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A new Redis without persistence lost the run: a clear answer, not a hang.
    assert_eq!(a.run(&run.run_id).await, Err(StoreError::RunNotFound));
    assert!(a.create_run(new_run()).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_redis_refuses_new_runs_and_appends_as_store_full() {
    let redis = common::cluster::RedisServer::start_with(&[
        "--maxmemory",
        "3mb",
        "--maxmemory-policy",
        "noeviction",
    ]);
    let a = instance(&redis.url(), "t5").await;
    let big = "x".repeat(4 * 1024);
    let mut refused = None;
    let mut cut_short = None;
    'fill: for i in 0..2000 {
        let mut new = new_run();
        new.idempotency_key = Some(format!("m{i}"));
        let run = match a.create_run(new).await {
            Ok(s) => s.run,
            Err(e) => {
                refused = Some(e);
                break;
            }
        };
        for _ in 0..4 {
            if let Err(e) = a.append(&run.run_id, ev(&big)).await {
                refused = Some(e);
                cut_short = Some(run.run_id.clone());
                break 'fill;
            }
        }
        a.finish(&run.run_id, RunStatus::Completed, None, None)
            .await
            .unwrap();
    }
    assert!(
        matches!(refused, Some(StoreError::Full { .. })),
        "a Redis at maxmemory refuses with Full, not {refused:?}"
    );
    // A run refused an append can still be ended (its closing event is small and never
    // refused), so it does not stay in progress; reads still work.
    let run = cut_short.expect("an append was refused");
    // However little is left.
    redis.cmd(&["CONFIG", "SET", "maxmemory", "1"]).unwrap();
    let mut late = new_run();
    late.idempotency_key = Some("late".into());
    assert!(matches!(
        a.create_run(late).await,
        Err(StoreError::Full { .. })
    ));
    let closing = NewEvent::new("{\"type\":\"error\"}");
    assert_eq!(
        a.finish(
            &run,
            RunStatus::Error,
            Some("store full".into()),
            Some(closing)
        )
        .await,
        Ok(true)
    );
    let info = a.run(&run).await.unwrap();
    assert_eq!(info.status, RunStatus::Error);
    let log = a.read_after(&run, 0, 1000, usize::MAX).await.unwrap();
    assert_eq!(log.events.last().map(|e| e.seq), Some(info.last_seq));
    assert!(a.ready().await);
}

/// `rediss://`: the store speaks TLS to a Redis that only listens with TLS, trusting the CA the
/// system's trust store (here `SSL_CERT_FILE`) names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_speaks_tls_to_a_rediss_url() {
    let dir = common::TempDir::new();
    let path = |f: &str| dir.0.join(f).to_str().unwrap().to_owned();
    let openssl = |args: &[&str]| {
        let ok = std::process::Command::new("openssl")
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl is installed")
            .success();
        assert!(ok, "openssl {args:?}");
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        &path("ca.key"),
        "-out",
        &path("ca.pem"),
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        &path("redis.key"),
        "-out",
        &path("redis.csr"),
    ]);
    std::fs::write(path("ext.cnf"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        &path("redis.csr"),
        "-CA",
        &path("ca.pem"),
        "-CAkey",
        &path("ca.key"),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        &path("ext.cnf"),
        "-out",
        &path("redis.pem"),
    ]);
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut server = std::process::Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .args([
            "--tls-cert-file",
            &path("redis.pem"),
            "--tls-key-file",
            &path("redis.key"),
        ])
        .args([
            "--tls-ca-cert-file",
            &path("ca.pem"),
            "--tls-auth-clients",
            "no",
        ])
        .args(["--save", "", "--appendonly", "no", "--dir", &path("")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("redis-server");
    std::env::set_var("SSL_CERT_FILE", path("ca.pem"));
    let url = format!("rediss://127.0.0.1:{port}");
    let mut store = None;
    for _ in 0..50 {
        let s = settings(&url, "tls");
        let budget = Arc::new(Budget::new(1 << 30));
        match tokio::task::spawn_blocking(move || RedisStore::connect(s, budget))
            .await
            .unwrap()
        {
            Ok(s) => {
                store = Some(s);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let a = store.expect("connected over TLS");
    let run = a.create_run(new_run()).await.unwrap().run;
    assert_eq!(a.append(&run.run_id, ev("1")).await, Ok(1));
    assert!(a.ready().await);
    // A plain-text client cannot talk to it: the URL's scheme is what made it work.
    let plain = settings(&format!("redis://127.0.0.1:{port}"), "tls");
    let refused = tokio::task::spawn_blocking(move || {
        RedisStore::connect(plain, Arc::new(Budget::new(1 << 30)))
    })
    .await
    .unwrap();
    assert!(refused.is_err());
    let _ = server.kill();
    let _ = server.wait();
}
