//! Bad input gets a JSON error with the right status; admin routes; `sluice check`.

mod common;

use common::*;
use serde_json::{json, Value};

async fn error_of(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    assert_eq!(resp.headers()["content-type"], "application/json");
    let body: Value = resp.json().await.unwrap();
    assert!(body["error"]["message"].as_str().is_some(), "{body}");
    (status, body["error"]["code"].clone())
}

#[tokio::test]
async fn bad_requests_get_json_errors_with_the_right_status() {
    let mock = mock_agent();
    let gw = gateway_with(&mock.addrs[0], "", "[limits]\nmax_body_bytes = 2048\n");
    let post = |body: String| {
        gw.http
            .post(gw.url("/api/invokeAgent"))
            .header("content-type", "application/json")
            .header("x-stream-response", "false")
            .body(body)
            .send()
    };
    let cases = [
        ("{not json".to_string(), 400, "invalid_json"),
        ("".to_string(), 400, "invalid_json"),
        ("[1,2]".to_string(), 400, "invalid_request"),
        (r#"{"message":{"parts":[{"type":"text","text":"x"}]}}"#.to_string(), 400, "invalid_request"),
        (r#"{"agentId":{},"message":{"parts":[{"type":"text","text":"x"}]}}"#.to_string(), 400, "invalid_request"),
        (r#"{"agentId":1,"message":{"parts":[{"type":"text","text":5}]}}"#.to_string(), 400, "invalid_request"),
        (r#"{"agentId":1,"message":{"parts":[{"type":"text","text":"x"}]},"threadId":"no-such-thread"}"#.to_string(), 404, "thread_not_found"),
        (format!(r#"{{"agentId":1,"message":{{"parts":[{{"type":"text","text":"{}"}}]}}}}"#, "x".repeat(4000)), 413, "payload_too_large"),
    ];
    for (body, status, code) in cases {
        let (got_status, got_code) = error_of(post(body.clone()).await.unwrap()).await;
        assert_eq!(
            (got_status, got_code),
            (status, json!(code)),
            "{}",
            &body[..body.len().min(80)]
        );
    }
    // Wrong method, unknown route, missing or unknown thread on the poll route.
    let resp = gw
        .http
        .get(gw.url("/api/invokeAgent"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["allow"], "POST");
    assert_eq!(error_of(resp).await, (405, json!("method_not_allowed")));
    let resp = gw
        .http
        .post(gw.url("/api/getConversation"))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(resp).await, (405, json!("method_not_allowed")));
    let resp = gw.http.get(gw.url("/nope")).send().await.unwrap();
    assert_eq!(error_of(resp).await, (404, json!("not_found")));
    let resp = gw
        .http
        .get(gw.url("/api/getConversation"))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(resp).await, (400, json!("invalid_request")));
    let (status, body) = gw
        .conversation("00000000-0000-0000-0000-000000000000")
        .await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (404, &json!("thread_not_found"))
    );

    // After all that, the gateway still serves runs.
    let (thread, _) = gw.start("still alive", None).await;
    assert_eq!(gw.wait_terminal(&thread).await["streamStatus"], "completed");

    let m = gw.metrics().await;
    assert!(
        m.contains("sluice_http_requests_total{route=\"invoke_agent\",status=\"400\"} 6"),
        "{m}"
    );
    assert!(
        m.contains("sluice_http_requests_total{route=\"invoke_agent\",status=\"413\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("sluice_http_requests_total{route=\"unmatched\",status=\"405\"} 2"),
        "{m}"
    );
}

#[tokio::test]
async fn admin_listener_serves_health_readiness_and_metrics() {
    let mock = mock_agent();
    let gw = gateway(&mock.addrs[0]);
    let s = stream_invoke(&gw, "metrics please", None).await;
    gw.wait_terminal(&s.thread).await;
    let health = gw
        .http
        .get(format!("{}/healthz", gw.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let ready = gw
        .http
        .get(format!("{}/readyz", gw.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    let m = gw.metrics().await;
    for needle in [
        "sluice_http_requests_total{route=\"invoke_agent\",status=\"200\"} 1",
        "sluice_http_requests_total{route=\"get_conversation\",status=\"200\"}",
        "sluice_http_request_duration_seconds_bucket{route=\"invoke_agent\"",
        "sluice_sse_streams_active 0",
        "sluice_runs_started_total 1",
        "sluice_runs_ended_total{status=\"completed\"} 1",
        "sluice_runs_ended_total{status=\"error\"} 0",
        "sluice_events_ingested_total ",
        "sluice_store_bytes ",
        "# TYPE sluice_upstream_errors_total counter",
    ] {
        assert!(m.contains(needle), "{needle} missing from:\n{m}");
    }
    assert!(metric(&m, "sluice_store_bytes") > 0);
    // No label carries an id.
    assert!(!m.contains(&s.thread) && !m.contains(&s.run));
}

#[test]
fn check_validates_and_prints_the_effective_config() {
    let bin = env!("CARGO_BIN_EXE_sluice");
    let out = std::process::Command::new(bin)
        .args(["check", "--config", "config/sluice.toml"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("max_total_bytes = 536870912"), "{text}");
    assert!(text.contains("mode = \"jwt\""), "{text}");

    // Secrets never show.
    let dir = TempDir::new();
    let secret = dir.0.join("secret.toml");
    std::fs::write(
        &secret,
        "[auth]\nmode = \"jwt\"\nissuer = \"https://i\"\nhs256_secret = \"0123456789abcdef0123456789abcdef-top\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(bin)
        .args(["check", "--config", secret.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("hs256_secret = \"<redacted>\""), "{text}");
    assert!(!text.contains("-top"), "{text}");

    let dir = TempDir::new();
    let bad = dir.0.join("bad.toml");
    std::fs::write(
        &bad,
        "[auth]\nmode = \"disabled\"\n[upstream]\nidle_timout = \"5s\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(bin)
        .args(["check", "--config", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("idle_timout"));

    std::fs::write(
        &bad,
        "[auth]\nmode = \"disabled\"\n[limits]\nmax_body_bytes = 10\n",
    )
    .unwrap();
    let out = std::process::Command::new(bin)
        .args(["serve", "--config", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("limits.max_body_bytes"));
}

/// An admin listener beyond loopback is warned about by `sluice check`; with
/// `server.admin_token`, `/metrics` needs the token while the health routes stay open.
#[tokio::test]
async fn the_admin_listener_warns_beyond_loopback_and_can_require_a_token() {
    let bin = env!("CARGO_BIN_EXE_sluice");
    let dir = TempDir::new();
    let conf = dir.0.join("open.toml");
    std::fs::write(
        &conf,
        "[server]\nadmin_listen = \"0.0.0.0:9090\"\n[auth]\nmode = \"disabled\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(bin)
        .args(["check", "--config", conf.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("warning") && err.contains("0.0.0.0:9090") && err.contains("admin_token"),
        "{err}"
    );
    // The default (loopback) says nothing.
    let out = std::process::Command::new(bin)
        .args(["check", "--config", "config/sluice.toml"])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&out.stderr).contains("warning"));

    let mock = mock_agent();
    let gw = gateway_conf(
        &mock.addrs[0],
        "admin_token = \"s3cret-admin\"\n",
        "",
        "mode = \"disabled\"\n",
        "",
    );
    let get = |path: &str, token: Option<&str>| {
        let mut req = gw.http.get(format!("{}{path}", gw.admin));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send()
    };
    assert_eq!(get("/metrics", None).await.unwrap().status(), 401);
    assert_eq!(get("/metrics", Some("wrong")).await.unwrap().status(), 401);
    let ok = get("/metrics", Some("s3cret-admin")).await.unwrap();
    assert_eq!(ok.status(), 200);
    assert!(ok.text().await.unwrap().contains("sluice_store_bytes"));
    assert_eq!(get("/readyz", None).await.unwrap().status(), 200);
    assert_eq!(get("/healthz", None).await.unwrap().status(), 200);
}
