//! The demo's chat page (`GET /` of `sluice demo`) in a real browser: headless Chromium driven
//! by `tests/js/browser.mjs` (playwright-core) asks for slow answers and drops the connection
//! mid-answer, reloads the page mid-answer, has a stream broken off mid-event (by a relay
//! between the browser and the gateway), and uses poll mode; every answer must show exactly
//! once, whole and in order, and equal the gateway's snapshot.
//!
//! Needs Node.js, `npm ci --prefix tests/js` (done by `make test`) and Chromium at
//! `/usr/bin/chromium` (`make browser-prereq`; `CHROMIUM=PATH` points elsewhere). Skipped with a
//! message when one is missing, unless `SLUICE_REQUIRE_BROWSER=1` (set by `.ci/run`).
//! `SLUICE_SCREENSHOT=PATH` saves a screenshot of the page resuming a dropped answer
//! (`docs/demo-resume.png` is one).

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The checks `browser.mjs` reports, each of which must pass.
const CHECKS: [&str; 7] = [
    "page loads with a chat id in its address",
    "the page's SSE reader: the same events however the body is cut",
    "drop connection, resume after Last-Event-ID",
    "reload mid-answer, replay the run in progress",
    "stream breaks off mid-event, automatic resume",
    "poll mode, long-poll until the run ends",
    "no page errors, nothing fetched from elsewhere",
];

/// How long the whole browser session may take on a loaded machine.
const SESSION_LIMIT: Duration = Duration::from_secs(300);

/// `None` when everything the test needs is there, else why not and how to install it.
fn missing(js: &Path, chromium: &Path) -> Option<String> {
    if Command::new("node").arg("--version").output().is_err() {
        return Some(
            "Node.js is not installed (sudo apt-get install -y nodejs npm, then \
             npm ci --prefix tests/js)"
                .into(),
        );
    }
    if !js.join("node_modules/playwright-core").exists() {
        return Some("run `npm ci --prefix tests/js` first (make test does)".into());
    }
    if !chromium.exists() {
        return Some(format!(
            "Chromium is not at {} (sudo apt-get install -y chromium, or make browser-prereq; \
             CHROMIUM=PATH for another one)",
            chromium.display()
        ));
    }
    None
}

#[test]
fn the_demo_page_resumes_dropped_and_reloaded_answers_in_a_browser() {
    let js = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/js");
    let chromium = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    if let Some(why) = missing(&js, &chromium) {
        assert!(
            std::env::var("SLUICE_REQUIRE_BROWSER").as_deref() != Ok("1"),
            "SLUICE_REQUIRE_BROWSER=1 but {why}"
        );
        eprintln!("SKIPPED: {why}");
        return;
    }
    let demo = common::spawn(
        &[
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ],
        2,
        None,
    );
    let base = format!("http://{}", demo.addrs[0]);

    let mut node = Command::new("node");
    node.current_dir(&js)
        .arg("browser.mjs")
        .arg(&base)
        .env("CHROMIUM", &chromium)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(shot) = std::env::var_os("SLUICE_SCREENSHOT") {
        node.arg(shot);
    }
    let mut child = node.spawn().expect("node starts");
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let stdout = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let stderr = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + SESSION_LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let (stdout, stderr) = (stdout.join().unwrap(), stderr.join().unwrap());
    let status = status
        .unwrap_or_else(|| panic!("browser.mjs ran over {SESSION_LIMIT:?}:\n{stdout}\n{stderr}"));

    let reports: Vec<Value> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    for check in CHECKS {
        let report = reports
            .iter()
            .find(|r| r["check"] == check)
            .unwrap_or_else(|| panic!("no report of {check:?}:\n{stdout}\n{stderr}"));
        assert_eq!(report["ok"], true, "{check}: {report}\n{stdout}\n{stderr}");
    }
    assert_eq!(reports.len(), CHECKS.len(), "{stdout}\n{stderr}");
    assert!(status.success(), "browser.mjs failed:\n{stdout}\n{stderr}");
}
