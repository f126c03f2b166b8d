//! The AI SDK's own client (npm `ai`, a current v5 and the strict 5.0.100) reads Sluice's
//! UI-message stream and must rebuild exactly the message the snapshot shows. Needs Node.js and
//! `npm ci` in `tests/js` (done by `make test`); skipped with a message when either is missing.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

#[tokio::test]
async fn the_ai_sdk_reads_sluice_streams_into_the_snapshot_message() {
    let js = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/js");
    if Command::new("node").arg("--version").output().is_err() {
        eprintln!("SKIPPED: Node.js is not installed (make test installs it)");
        return;
    }
    if !js.join("node_modules/ai").exists() || !js.join("node_modules/ai-strict").exists() {
        eprintln!("SKIPPED: run `npm ci --prefix tests/js` first (make test does)");
        return;
    }
    let mock = mock_agent();
    let gw = gateway(&mock.addrs[0]);
    let base = gw.base.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .current_dir(&js)
            .args([
                "ui_stream.mjs",
                &base,
                "Hello from the AI SDK",
                "scenario:reasoning",
                "scenario:tools",
                "scenario:error",
                "scenario:drop",
                "scenario:text upper=1 framing=crlf",
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "AI SDK check failed:\n{stdout}\n{stderr}"
    );
    assert_eq!(
        stdout.lines().filter(|l| l.contains("\"ok\":true")).count(),
        12,
        "{stdout}"
    );
}

#[tokio::test]
async fn the_ai_sdk_resumes_a_running_stream_and_sees_204_when_idle() {
    let js = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/js");
    if Command::new("node").arg("--version").output().is_err()
        || !js.join("node_modules/ai-strict").exists()
    {
        eprintln!("SKIPPED: Node.js or tests/js/node_modules missing (make test installs them)");
        return;
    }
    let mock = mock_agent();
    let gw = gateway(&mock.addrs[0]);
    let base = gw.base.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .current_dir(&js)
            .args(["resume.mjs", &base])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "AI SDK resume failed:\n{stdout}\n{stderr}"
    );
    assert_eq!(
        stdout.lines().filter(|l| l.contains("\"ok\":true")).count(),
        2,
        "{stdout}"
    );
}
