//! The AI SDK's own client (npm `ai`: a current v5, the strict 5.0.100, and v6) reads Sluice's
//! UI-message stream and must rebuild exactly the message the snapshot shows, whichever backend
//! dialect the gateway ingested the run from. Needs Node.js and `npm ci` in `tests/js` (done by
//! `make test`); skipped with a message when either is missing.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

/// Run `node tests/js/SCRIPT BASE ARGS…` against a fresh gateway over the mock agent and
/// return its stdout once it exited successfully; `None` (test skipped) without Node.js or the
/// npm packages.
async fn run_node(script: &str, args: &[&str]) -> Option<String> {
    run_node_over("agentflow", script, args).await
}

/// [`run_node`] with the mock agent and the gateway speaking backend `dialect`.
async fn run_node_over(dialect: &str, script: &str, args: &[&str]) -> Option<String> {
    if !node_ready() {
        return None;
    }
    let (_mock, gw) = over(dialect, "");
    run_node_at(&gw.base, script, args).await
}

/// Whether Node.js and the npm packages are there (says why not when they are not).
fn node_ready() -> bool {
    let js = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/js");
    if Command::new("node").arg("--version").output().is_err() {
        eprintln!("SKIPPED: Node.js is not installed (make test installs it)");
        return false;
    }
    if ["ai", "ai-strict", "ai6"]
        .iter()
        .any(|m| !js.join("node_modules").join(m).exists())
    {
        eprintln!("SKIPPED: run `npm ci --prefix tests/js` first (make test does)");
        return false;
    }
    true
}

/// Run `node tests/js/SCRIPT BASE ARGS…` against the gateway at `base`; its stdout once it
/// exited successfully, `None` without Node.js or the npm packages.
async fn run_node_at(base: &str, script: &str, args: &[&str]) -> Option<String> {
    if !node_ready() {
        return None;
    }
    let js = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/js");
    let mut argv = vec![script.to_string(), base.to_string()];
    argv.extend(args.iter().map(|a| a.to_string()));
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .current_dir(&js)
            .args(&argv)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{script} failed:\n{stdout}\n{stderr}");
    Some(stdout)
}

fn passed(stdout: &str) -> usize {
    stdout.lines().filter(|l| l.contains("\"ok\":true")).count()
}

#[tokio::test]
async fn the_ai_sdk_reads_sluice_streams_into_the_snapshot_message() {
    let prompts = [
        "Hello from the AI SDK",
        "scenario:reasoning",
        "scenario:tools",
        "scenario:error",
        "scenario:drop",
        "scenario:text upper=1 framing=crlf",
    ];
    let Some(stdout) = run_node("ui_stream.mjs", &prompts).await else {
        return;
    };
    // Each prompt, read by the three clients.
    assert_eq!(passed(&stdout), 18, "{stdout}");
}

#[tokio::test]
async fn the_ai_sdk_reads_runs_ingested_from_ui_message_and_poll_backends() {
    let prompts = [
        "scenario:tools",
        "scenario:rich",
        "scenario:reasoning",
        "scenario:error",
    ];
    for dialect in ["ui-message", "poll"] {
        let Some(stdout) = run_node_over(dialect, "ui_stream.mjs", &prompts).await else {
            return;
        };
        assert_eq!(passed(&stdout), 12, "{dialect}: {stdout}");
    }
    // Chunk types from newer SDKs reach v5 clients only as data they accept.
    let Some(stdout) = run_node_over("ui-message", "ui_stream.mjs", &["scenario:future"]).await
    else {
        return;
    };
    assert_eq!(passed(&stdout), 3, "{stdout}");
}

#[tokio::test]
async fn the_ai_sdk_resumes_a_running_stream_and_sees_204_when_idle() {
    let Some(stdout) = run_node("resume.mjs", &[]).await else {
        return;
    };
    // Two clients resume one run; three reload a page on a thread with several runs.
    assert_eq!(passed(&stdout), 5, "{stdout}");
}

/// `useChat` natively: the SDK's `DefaultChatTransport` with only `api: {base}/api/chat`,
/// `headers` and `body: {agentId}`, and its `AbstractChat`, in ai@5 and ai@6 (chat.mjs).
#[tokio::test]
async fn use_chat_talks_to_the_chat_routes_with_nothing_but_api_headers_and_body() {
    let Some(stdout) = run_node("chat.mjs", &[]).await else {
        return;
    };
    // Per client: new chat, continued chat, regenerate, aborted-then-resumed turn, null after
    // the end (5 transport checks), and the AbstractChat session.
    assert_eq!(passed(&stdout), 12, "{stdout}");
}

/// The same, against a gateway that verifies Clerk-style tokens: the transport's `headers`
/// carry the token on every request (send, reconnect), and the snapshots are the caller's.
#[tokio::test]
async fn use_chat_sends_its_token_to_an_authenticating_gateway() {
    if !node_ready() {
        return;
    }
    let s = JwtGateway::new();
    let (gw, mock) = (&s.gw, &s.mock);
    let token = s.admin("user_chat", "org_chat");
    let Some(stdout) = run_node_at(&gw.base, "chat.mjs", &[&token]).await else {
        return;
    };
    assert_eq!(passed(&stdout), 12, "{stdout}");
    // Every backend run was made for the token's organisation.
    let seen = mock_requests(&gw.http, &mock.addrs[0]).await;
    assert!(!seen.is_empty());
    assert!(
        seen.iter()
            .all(|r| r["headers"]["x-sluice-org-id"] == "org_chat"),
        "{seen:?}"
    );
}
