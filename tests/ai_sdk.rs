//! The AI SDK's own client (npm `ai`, a current v5 and the strict 5.0.100) reads Sluice's
//! UI-message stream and must rebuild exactly the message the snapshot shows. Needs Node.js and
//! `npm ci` in `tests/js` (done by `make test`); skipped with a message when either is missing.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

/// Run `node tests/js/SCRIPT BASE ARGS…` against a fresh gateway over the mock agent and
/// return its stdout once it exited successfully; `None` (test skipped) without Node.js or the
/// npm packages.
async fn run_node(script: &str, args: &[&str]) -> Option<String> {
    let js = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/js");
    if Command::new("node").arg("--version").output().is_err() {
        eprintln!("SKIPPED: Node.js is not installed (make test installs it)");
        return None;
    }
    if !js.join("node_modules/ai").exists() || !js.join("node_modules/ai-strict").exists() {
        eprintln!("SKIPPED: run `npm ci --prefix tests/js` first (make test does)");
        return None;
    }
    let mock = mock_agent();
    let gw = gateway(&mock.addrs[0]);
    let mut argv = vec![script.to_string(), gw.base.clone()];
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
    // Each prompt, read by both clients.
    assert_eq!(passed(&stdout), 12, "{stdout}");
}

#[tokio::test]
async fn the_ai_sdk_resumes_a_running_stream_and_sees_204_when_idle() {
    let Some(stdout) = run_node("resume.mjs", &[]).await else {
        return;
    };
    assert_eq!(passed(&stdout), 2, "{stdout}");
}
