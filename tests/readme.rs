//! The README's curl examples, and the commands `sluice demo` prints, work against a running
//! `sluice demo`, whichever backend dialect its mock agent speaks. Needs `curl` (installed by `.ci/run`; skipped with a message when missing).

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

/// Run one curl command with the gateway's address, a real thread id and the demo's tokens in
/// the environment; return the status.
fn run(cmd: &str, api: &str, admin: &str, thread: &str, tokens: &[(String, String)]) -> String {
    let cmd = cmd
        .replace("http://127.0.0.1:8080", &format!("http://{api}"))
        .replace("localhost:8080", api)
        .replace("http://127.0.0.1:9090", &format!("http://{admin}"));
    common::curl_status(&cmd, thread, tokens)
}

#[tokio::test]
async fn readme_and_demo_commands_work_against_the_demo() {
    commands_work_against_the_demo_over("agentflow").await;
}

#[tokio::test]
async fn readme_and_demo_commands_work_over_a_ui_message_backend() {
    commands_work_against_the_demo_over("ui-message").await;
}

#[tokio::test]
async fn readme_and_demo_commands_work_over_a_poll_only_backend() {
    commands_work_against_the_demo_over("poll").await;
}

/// Every curl command of the README and of the demo's own instructions, against
/// `sluice demo --dialect DIALECT`.
async fn commands_work_against_the_demo_over(dialect: &str) {
    if Command::new("curl").arg("--version").output().is_err() {
        eprintln!("SKIPPED: curl is not installed");
        return;
    }
    let demo = spawn(
        &[
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--dialect",
            dialect,
        ],
        2,
        None,
    );
    let (api, admin) = (demo.addrs[0].clone(), demo.addrs[1].clone());
    // The demo prints `export NAME='token'` lines: the tokens every command needs.
    let mut tokens: Vec<(String, String)> = Vec::new();
    for _ in 0..200 {
        tokens = demo
            .stdout
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| l.strip_prefix("export "))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.trim_matches('\'').to_string()))
            .collect();
        let complete = demo
            .stdout
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.starts_with("Metrics:"));
        if tokens.len() == 2 && complete {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(tokens.len(), 2, "the demo prints TOKEN and MEMBER_TOKEN");
    let admin_token = tokens.iter().find(|(k, _)| k == "TOKEN").unwrap().1.clone();
    let printed = demo.stdout.lock().unwrap().join("\n");
    let gw = Gateway {
        base: format!("http://{api}"),
        admin: format!("http://{admin}"),
        http: client(),
        proc: demo,
    };
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let mut commands = curl_commands(&readme, true);
    commands.extend(curl_commands(&printed, false));
    assert!(commands.len() >= 10, "{commands:#?}");
    for cmd in &commands {
        // A finished thread, so that examples continuing or resuming a thread have one.
        let (thread, _) = gw.start_as(&admin_token, "readme thread", None).await;
        let snap = gw.wait_terminal_as(&admin_token, &thread).await;
        assert_eq!(snap["streamStatus"], "completed", "{dialect}: {snap}");
        assert_eq!(
            text_of(&snap["messages"][1]),
            expected_answer("readme thread", 1),
            "{dialect}"
        );
        let (api, admin, cmd, tokens) = (api.clone(), admin.clone(), cmd.clone(), tokens.clone());
        let (cmd, status) = tokio::task::spawn_blocking(move || {
            let status = run(&cmd, &api, &admin, &thread, &tokens);
            (cmd, status)
        })
        .await
        .unwrap();
        let expected = if cmd.contains("MEMBER_TOKEN") {
            "403"
        } else if cmd.contains("/api/") && !cmd.contains("$TOKEN") {
            "401"
        } else {
            "2"
        };
        assert!(
            status.starts_with(expected),
            "{dialect}: `{cmd}` answered {status}"
        );
    }
}
