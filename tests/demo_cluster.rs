//! `sluice demo --instances 3 --redis URL` (what `make demo-cluster` runs) over a real
//! `redis-server`: every curl command it prints works against the instances it names, and its
//! gateway processes end with it. Needs `curl` (installed by `.ci/run`; skipped with a message
//! when missing) and `redis-server` (never skipped).

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::cluster::RedisServer;
use common::*;
use serde_json::{json, Value};

fn alive(pid: u32) -> bool {
    // A zombie (exited, not yet reaped by the demo's waiter) counts as gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

#[tokio::test]
async fn cluster_demo_commands_work_and_its_gateways_end_with_it() {
    if Command::new("curl").arg("--version").output().is_err() {
        eprintln!("SKIPPED: curl is not installed");
        return;
    }
    let redis = RedisServer::start();
    let url = redis.url();
    let demo = spawn(
        &[
            "demo",
            "--instances",
            "3",
            "--redis",
            &url,
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ],
        6,
        None,
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !demo
        .stdout
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.starts_with("Metrics:"))
    {
        assert!(
            Instant::now() < deadline,
            "the demo printed no instructions"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let printed = demo.stdout.lock().unwrap().join("\n");
    let tokens: Vec<(String, String)> = printed
        .lines()
        .filter_map(|l| l.strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_matches('\'').to_string()))
        .collect();
    assert_eq!(tokens.len(), 2, "{printed}");
    let token = tokens.iter().find(|(k, _)| k == "TOKEN").unwrap().1.clone();
    // `sluice instance N listening on http://API (admin http://ADMIN), pid P`
    let pids: Vec<u32> = printed
        .lines()
        .filter(|l| l.starts_with("sluice instance "))
        .filter_map(|l| l.rsplit_once(", pid ")?.1.trim().parse().ok())
        .collect();
    assert_eq!(pids.len(), 3, "{printed}");
    assert!(
        printed.contains(&format!("kill -9 {}", pids[0])),
        "{printed}"
    );
    let api: Vec<String> = demo.addrs.iter().step_by(2).cloned().collect();

    // A finished run started on instance 1, with more than the 5 events step 3 resumes after,
    // read through instance 3.
    let http = client();
    let started = http
        .post(format!("http://{}/api/invokeAgent", api[0]))
        .bearer_auth(&token)
        .header("x-stream-response", "false")
        .json(&json!({"agentId": 1, "message": {"role": "user",
            "parts": [{"type": "text", "text": "scenario:long events=20"}]}}))
        .send()
        .await
        .unwrap();
    assert_eq!(started.status(), 202);
    let thread = started.headers()["x-thread-id"]
        .to_str()
        .unwrap()
        .to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let snap: Value = http
            .get(format!(
                "http://{}/api/getConversation?threadId={thread}",
                api[2]
            ))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if snap["streamStatus"] == "completed" {
            assert!(snap["lastSeq"].as_u64().unwrap() > 5, "{snap}");
            break;
        }
        assert_eq!(snap["streamStatus"], "in_progress", "{snap}");
        assert!(Instant::now() < deadline, "{snap}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let commands = curl_commands(&printed, false);
    assert!(commands.len() >= 8, "{commands:#?}");
    for (i, addr) in api.iter().enumerate() {
        assert!(
            commands.iter().any(|c| c.contains(addr.as_str())),
            "no command for instance {}: {commands:#?}",
            i + 1
        );
    }
    for cmd in commands {
        let (thread, tokens) = (thread.clone(), tokens.clone());
        let (cmd, status) = tokio::task::spawn_blocking(move || {
            let status = common::curl_status(&cmd, &thread, &tokens);
            (cmd, status)
        })
        .await
        .unwrap();
        assert!(status.starts_with('2'), "`{cmd}` answered {status}");
    }

    // The gateways end with the demo.
    drop(demo);
    let deadline = Instant::now() + Duration::from_secs(15);
    while pids.iter().any(|&p| alive(p)) {
        assert!(
            Instant::now() < deadline,
            "gateways outlived the demo: {pids:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
