//! Clerk-style JWT authentication against the real gateway: tokens minted here with keys
//! generated at test time, the JWKS served by a real HTTP server on loopback.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{json, Value};
use sluice::auth::testkeys;

const ISS: &str = "https://clerk.test.local";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Clerk v2 claims for `user` in `org` with `role` (without the `org:` prefix).
fn v2(user: &str, org: &str, role: &str) -> Value {
    let t = now();
    json!({"iss": ISS, "sub": user, "iat": t, "nbf": t - 5, "exp": t + 60, "sid": "sess_1",
           "azp": "http://localhost:3000", "v": 2, "sts": "active",
           "o": {"id": org, "rol": role, "slg": "acme"}})
}

/// Clerk v1 claims.
fn v1(user: &str, org: &str, role: &str) -> Value {
    let t = now();
    json!({"iss": ISS, "sub": user, "iat": t, "nbf": t - 5, "exp": t + 60,
           "azp": "http://localhost:3000", "org_id": org, "org_role": role, "org_slug": "acme"})
}

struct Setup {
    jwks: JwksServer,
    key: EncodingKey,
    kid: String,
    mock: Proc,
    gw: Gateway,
}

impl Setup {
    fn new(auth_extra: &str) -> Setup {
        let (key, jwk, kid) = testkeys::generate_rsa().unwrap();
        let jwks = JwksServer::start(testkeys::jwks(&[jwk]));
        let mock = mock_agent();
        let auth = format!(
            "mode = \"jwt\"\nissuer = \"{ISS}\"\njwks_url = \"{}\"\n{auth_extra}",
            jwks.url
        );
        let gw = gateway_auth(&mock.addrs[0], &auth, "", "");
        Setup {
            jwks,
            key,
            kid,
            mock,
            gw,
        }
    }

    fn token(&self, claims: &Value) -> String {
        testkeys::mint(claims, &self.key, Algorithm::RS256, Some(&self.kid)).unwrap()
    }

    async fn poll(&self, auth: Option<&str>, thread: &str) -> reqwest::Response {
        let mut req = self
            .gw
            .http
            .get(self.gw.url("/api/getConversation"))
            .query(&[("threadId", thread)]);
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        req.send().await.unwrap()
    }
}

async fn refused(resp: reqwest::Response) -> (u16, String, Value) {
    let status = resp.status().as_u16();
    let challenge = resp
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (status, challenge, resp.json().await.unwrap())
}

#[tokio::test]
async fn admins_of_v1_and_v2_tokens_are_accepted_and_members_refused() {
    let s = Setup::new("");
    for claims in [
        v2("user_a", "org_a", "admin"),
        v1("user_b", "org_a", "org:admin"),
    ] {
        let token = s.token(&claims);
        let (thread, _) = s.gw.start_as(&token, "hello", None).await;
        let snap = s.gw.wait_terminal_as(&token, &thread).await;
        assert_eq!(snap["streamStatus"], "completed");
        assert_eq!(snap["organizationId"], "org_a");
    }
    for claims in [
        v2("user_c", "org_a", "member"),
        v1("user_c", "org_a", "org:member"),
        json!({"iss": ISS, "sub": "user_d", "iat": now(), "exp": now() + 60}),
        {
            let mut c = v2("user_e", "org_a", "admin");
            c["sts"] = json!("pending");
            c
        },
    ] {
        let resp =
            s.gw.invoke_as(Some(&s.token(&claims)), "hi", None, true)
                .await;
        let (status, _, body) = refused(resp).await;
        assert_eq!(status, 403, "{claims}");
        assert_eq!(body["error"]["code"], "forbidden");
    }
}

#[tokio::test]
async fn bad_tokens_get_401_with_a_bearer_challenge() {
    let s = Setup::new("allowed_origins = [\"http://localhost:3000\"]\n");
    let good = s.token(&v2("user_a", "org_a", "admin"));
    let with = |f: &dyn Fn(&mut Value)| {
        let mut c = v2("user_a", "org_a", "admin");
        f(&mut c);
        s.token(&c)
    };
    // A key the JWKS does not have.
    let (other_key, _, kid2) = testkeys::generate_rsa().unwrap();
    let mut tampered = good.clone().into_bytes();
    let dot = tampered.iter().position(|b| *b == b'.').unwrap();
    tampered[dot + 5] = if tampered[dot + 5] == b'A' {
        b'B'
    } else {
        b'A'
    };
    let tampered = String::from_utf8(tampered).unwrap();
    let mut bad_sig = good.clone();
    bad_sig.pop();
    bad_sig.push(if good.ends_with('A') { 'B' } else { 'A' });
    let public_der = testkeys::rsa_public_key_der(&s.key).unwrap();
    let hs_confused = testkeys::mint(
        &v2("user_a", "org_a", "admin"),
        &EncodingKey::from_secret(&public_der),
        Algorithm::HS256,
        Some(&s.kid),
    )
    .unwrap();
    let none = testkeys::unsigned(
        &json!({"alg": "none", "typ": "JWT", "kid": s.kid}),
        &v2("user_a", "org_a", "admin"),
    );
    let foreign = testkeys::mint(
        &v2("user_a", "org_a", "admin"),
        &other_key,
        Algorithm::RS256,
        Some(&kid2),
    )
    .unwrap();
    let cases: Vec<(&str, Option<String>)> = vec![
        ("missing header", None),
        ("empty bearer", Some("Bearer ".into())),
        ("wrong scheme", Some(format!("Basic {good}"))),
        ("garbage", Some("Bearer not.a.jwt".into())),
        (
            "expired",
            Some(format!(
                "Bearer {}",
                with(&|c| c["exp"] = json!(now() - 60))
            )),
        ),
        (
            "not yet valid",
            Some(format!(
                "Bearer {}",
                with(&|c| c["nbf"] = json!(now() + 600))
            )),
        ),
        (
            "wrong issuer",
            Some(format!(
                "Bearer {}",
                with(&|c| c["iss"] = json!("https://evil"))
            )),
        ),
        (
            "wrong azp",
            Some(format!(
                "Bearer {}",
                with(&|c| c["azp"] = json!("https://evil"))
            )),
        ),
        ("tampered payload", Some(format!("Bearer {tampered}"))),
        ("tampered signature", Some(format!("Bearer {bad_sig}"))),
        ("alg none", Some(format!("Bearer {none}"))),
        (
            "HS256 with the public key as secret",
            Some(format!("Bearer {hs_confused}")),
        ),
        ("unknown kid", Some(format!("Bearer {foreign}"))),
    ];
    for (name, header) in &cases {
        let (status, challenge, body) = refused(s.poll(header.as_deref(), "t").await).await;
        assert_eq!(status, 401, "{name}: {body}");
        assert_eq!(body["error"]["code"], "unauthorized", "{name}");
        assert!(challenge.starts_with("Bearer"), "{name}: {challenge:?}");
        let text = body.to_string();
        if let Some(h) = header {
            let token = h.trim_start_matches("Bearer ").trim_start_matches("Basic ");
            if token.len() > 8 {
                assert!(!text.contains(token), "{name}: the body echoes the token");
            }
        }
        if *name != "missing header" {
            assert!(
                challenge.contains("error=\"invalid_token\""),
                "{name}: {challenge}"
            );
        }
    }
    // The same token with the right key works, so the refusals above were about the tokens.
    let (status, _, _) = refused(s.poll(Some(&format!("Bearer {good}")), "t").await).await;
    assert_eq!(status, 404, "a valid admin token reaches the route");
    let m = s.gw.metrics().await;
    for reason in [
        "missing_token",
        "expired",
        "bad_signature",
        "wrong_issuer",
        "unknown_key",
    ] {
        assert!(
            m.lines().any(|l| l.starts_with(&format!(
                "sluice_auth_failures_total{{reason=\"{reason}\"}}"
            )) && !l.ends_with(" 0")),
            "{reason} not counted:\n{m}"
        );
    }
}

#[tokio::test]
async fn rotated_keys_are_picked_up_and_a_dead_jwks_keeps_the_old_keys() {
    let s = Setup::new("jwks_ttl = \"300ms\"\njwks_refetch_cooldown = \"1s\"\n");
    let old = s.token(&v2("user_a", "org_a", "admin"));
    let (status, ..) = refused(s.poll(Some(&format!("Bearer {old}")), "t").await).await;
    assert_eq!(status, 404);
    // A new key appears in the JWKS: a token signed with it is accepted after one refetch.
    let (new_key, new_jwk, new_kid) = testkeys::generate_ec().unwrap();
    let old_jwk = s.jwks.jwks.lock().unwrap()["keys"][0].clone();
    s.jwks.set(testkeys::jwks(&[old_jwk, new_jwk]));
    let fresh = testkeys::mint(
        &v2("user_a", "org_a", "admin"),
        &new_key,
        Algorithm::ES256,
        Some(&new_kid),
    )
    .unwrap();
    let (status, ..) = refused(s.poll(Some(&format!("Bearer {fresh}")), "t").await).await;
    assert_eq!(status, 404, "the rotated-in key is used");
    // Unknown kids do not hammer the JWKS: one refetch per cooldown, whatever the traffic.
    let (stranger, _, skid) = testkeys::generate_ec().unwrap();
    let bogus = testkeys::mint(
        &v2("u", "o", "admin"),
        &stranger,
        Algorithm::ES256,
        Some(&skid),
    )
    .unwrap();
    let before = s.jwks.hits();
    for _ in 0..20 {
        let (status, ..) = refused(s.poll(Some(&format!("Bearer {bogus}")), "t").await).await;
        assert_eq!(status, 401);
    }
    assert!(
        s.jwks.hits() - before <= 2,
        "{} fetches",
        s.jwks.hits() - before
    );
    // The JWKS goes down; after its TTL the keys cannot be refreshed, yet the old ones still work.
    s.jwks.set_up(false);
    tokio::time::sleep(Duration::from_millis(500)).await;
    for token in [&old, &fresh] {
        let t2 = token.clone();
        let (status, ..) = refused(s.poll(Some(&format!("Bearer {t2}")), "t").await).await;
        assert_eq!(status, 404, "old keys still verify while the JWKS is down");
    }
    // The refresh runs in the background: give it time on a loaded machine.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while s.jwks.hits() <= before && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(s.jwks.hits() > before, "a refresh was attempted");
}

#[tokio::test]
async fn organisations_never_see_each_others_threads() {
    let s = Setup::new("");
    let a = s.token(&v2("user_a", "org_a", "admin"));
    let b = s.token(&v2("user_b", "org_b", "admin"));
    let (thread, _) =
        s.gw.start_as(&a, "scenario:slow tokens=10 delay_ms=30", None)
            .await;
    // B: read, stream, resume, and continue all answer 404 like an unknown thread.
    let (status, body) = s.gw.conversation_as(Some(&b), &thread).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (404, &json!("thread_not_found"))
    );
    let (unknown_status, unknown_body) = s.gw.conversation_as(Some(&b), "no-such-thread").await;
    assert_eq!(
        (status, &body),
        (unknown_status, &unknown_body),
        "same answer as a missing thread"
    );
    for q in ["", "?afterSeq=0"] {
        let resp =
            s.gw.http
                .get(s.gw.url(&format!("/api/threads/{thread}/stream{q}")))
                .bearer_auth(&b)
                .send()
                .await
                .unwrap();
        assert_eq!(resp.status(), 404);
    }
    let resp =
        s.gw.invoke_as(Some(&b), "mine now", Some(&thread), true)
            .await;
    assert_eq!(resp.status(), 404);
    // A still sees it, and the backend got A's identity.
    let snap = s.gw.wait_terminal_as(&a, &thread).await;
    assert_eq!(snap["organizationId"], "org_a");
    assert_eq!(
        snap["streamStatus"], "completed",
        "B's stop did not touch the run"
    );
    let seen = serde_json::Value::Array(mock_requests(&s.gw.http, &s.mock.addrs[0]).await);
    let req = seen
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["body"]["conversation_id"] == json!(thread))
        .expect("the backend saw the run");
    assert_eq!(req["headers"]["x-sluice-org-id"], "org_a");
    assert_eq!(req["headers"]["x-sluice-user-id"], "user_a");
    assert!(
        req["headers"].get("authorization").is_none(),
        "token not forwarded by default"
    );
}

#[tokio::test]
async fn tokens_are_forwarded_when_configured_and_agents_are_checked() {
    let s = Setup::new("forward_token = true\n[auth.org_agents]\norg_a = [\"1\", \"missing-agent\", \"locked-agent\", \"secret-agent\"]\n");
    let a = s.token(&v2("user_a", "org_a", "admin"));
    let (thread, _) = s.gw.start_as(&a, "hello", None).await;
    s.gw.wait_terminal_as(&a, &thread).await;
    let seen = serde_json::Value::Array(mock_requests(&s.gw.http, &s.mock.addrs[0]).await);
    let req = seen.as_array().unwrap().last().unwrap();
    assert_eq!(
        req["headers"]["authorization"],
        json!(format!("Bearer {a}"))
    );
    let invoke = |agent: &'static str, token: String| {
        let gw = &s.gw;
        async move {
            let resp = gw
                .http
                .post(gw.url("/api/invokeAgent"))
                .bearer_auth(token)
                .header("x-stream-response", "false")
                .json(&invoke_body(json!(agent), "hi", None))
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let body: Value = resp.json().await.unwrap();
            (status, body["error"]["code"].clone())
        }
    };
    // Not in the organisation's list: refused by the gateway itself.
    assert_eq!(
        invoke("other", a.clone()).await,
        (404, json!("agent_not_found"))
    );
    // The backend's own verdicts are passed on, not turned into 502.
    assert_eq!(
        invoke("missing-agent", a.clone()).await,
        (404, json!("agent_not_found"))
    );
    assert_eq!(
        invoke("locked-agent", a.clone()).await,
        (401, json!("agent_unauthorized"))
    );
    assert_eq!(
        invoke("secret-agent", a.clone()).await,
        (403, json!("agent_forbidden"))
    );
    // Another organisation, not listed, may use any agent the backend accepts.
    let b = s.token(&v2("user_b", "org_b", "admin"));
    let (status, _) = invoke("other", b).await;
    assert_eq!(
        status, 202,
        "org_b is not listed, so the backend decides: agent `other` is fine"
    );
}

#[tokio::test]
async fn an_accepted_stream_outlives_its_token() {
    let s = Setup::new("leeway = \"0s\"\n");
    let mut claims = v2("user_a", "org_a", "admin");
    claims["exp"] = json!(now() + 2);
    let token = s.token(&claims);
    let resp =
        s.gw.invoke_as(
            Some(&token),
            "scenario:slow tokens=16 delay_ms=250",
            None,
            false,
        )
        .await;
    assert_eq!(resp.status(), 200);
    let thread = resp.headers()["x-thread-id"].to_str().unwrap().to_string();
    let body = resp.text().await.unwrap();
    let (events, _) = parse_sse(&body);
    assert_eq!(
        events.last().unwrap().data,
        "[DONE]",
        "the stream ran to its end"
    );
    // The expired token no longer opens anything.
    let (status, _) = s.gw.conversation_as(Some(&token), &thread).await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn tokens_minted_by_jose_are_verified() {
    let js = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/js");
    if !js.join("node_modules/jose").exists()
        || std::process::Command::new("node")
            .arg("--version")
            .output()
            .is_err()
    {
        eprintln!("SKIPPED: Node.js or tests/js/node_modules missing (make test installs them)");
        return;
    }
    let out = std::process::Command::new("node")
        .current_dir(&js)
        .args(["mint_tokens.mjs", ISS])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let minted: Value = serde_json::from_slice(&out.stdout).unwrap();
    let jwks = JwksServer::start(minted["jwks"].clone());
    let mock = mock_agent();
    let auth = format!(
        "mode = \"jwt\"\nissuer = \"{ISS}\"\njwks_url = \"{}\"\n",
        jwks.url
    );
    let gw = gateway_auth(&mock.addrs[0], &auth, "", "");
    let tokens = minted["tokens"].as_object().unwrap();
    assert_eq!(tokens.len(), 9);
    for (name, token) in tokens {
        let (status, body) = gw.conversation_as(token.as_str(), "no-such-thread").await;
        let want = if name.ends_with("member") { 403 } else { 404 };
        assert_eq!(status, want, "{name}: {body}");
    }
}

#[tokio::test]
async fn hs256_secret_and_jwks_file_sources_work() {
    let secret = "an-hs256-development-secret-of-32+bytes";
    let mock = mock_agent();
    let gw = gateway_auth(
        &mock.addrs[0],
        &format!("mode = \"jwt\"\nissuer = \"{ISS}\"\nhs256_secret = \"{secret}\"\n"),
        "",
        "",
    );
    let hs = testkeys::mint(
        &v2("user_a", "org_a", "admin"),
        &EncodingKey::from_secret(secret.as_bytes()),
        Algorithm::HS256,
        None,
    )
    .unwrap();
    let (thread, _) = gw.start_as(&hs, "hello", None).await;
    assert_eq!(
        gw.wait_terminal_as(&hs, &thread).await["streamStatus"],
        "completed"
    );
    // An RS token is refused by an HS-only gateway.
    let (key, _, kid) = testkeys::generate_rsa().unwrap();
    let rs = testkeys::mint(
        &v2("user_a", "org_a", "admin"),
        &key,
        Algorithm::RS256,
        Some(&kid),
    )
    .unwrap();
    assert_eq!(gw.conversation_as(Some(&rs), &thread).await.0, 401);

    let (key, jwk, kid) = testkeys::generate_ec().unwrap();
    let dir = TempDir::new();
    let file = dir.0.join("jwks.json");
    std::fs::write(&file, testkeys::jwks(&[jwk]).to_string()).unwrap();
    let gw = gateway_auth(
        &mock.addrs[0],
        &format!(
            "mode = \"jwt\"\nissuer = \"{ISS}\"\njwks_file = \"{}\"\n",
            file.display()
        ),
        "",
        "",
    );
    let es = testkeys::mint(
        &v2("user_a", "org_a", "admin"),
        &key,
        Algorithm::ES256,
        Some(&kid),
    )
    .unwrap();
    assert_eq!(gw.conversation_as(Some(&es), "nope").await.0, 404);
    assert_eq!(gw.conversation_as(Some(&hs), "nope").await.0, 401);
}

#[tokio::test]
async fn a_jwks_down_at_start_gives_503_at_once_then_recovers() {
    let (key, jwk, kid) = testkeys::generate_rsa().unwrap();
    let jwks = JwksServer::start(testkeys::jwks(&[jwk]));
    jwks.set_up(false);
    let mock = mock_agent();
    let auth = format!(
        "mode = \"jwt\"\nissuer = \"{ISS}\"\njwks_url = \"{}\"\njwks_refetch_cooldown = \"500ms\"\n",
        jwks.url
    );
    let gw = gateway_auth(&mock.addrs[0], &auth, "", "");
    let token = testkeys::mint(
        &v2("u", "org_a", "admin"),
        &key,
        Algorithm::RS256,
        Some(&kid),
    )
    .unwrap();
    let (status, body) = gw.conversation_as(Some(&token), "t").await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (503, &json!("auth_unavailable"))
    );
    // Within the cooldown, refusals are immediate and do not hit the JWKS again.
    let hits = jwks.hits();
    for _ in 0..10 {
        assert_eq!(gw.conversation_as(Some(&token), "t").await.0, 503);
    }
    assert!(jwks.hits() <= hits + 1, "{} fetches", jwks.hits() - hits);
    jwks.set_up(true);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        gw.conversation_as(Some(&token), "t").await.0,
        404,
        "recovered"
    );
}

#[tokio::test]
async fn two_organisations_with_one_conversation_id_reach_two_backend_conversations() {
    let s = Setup::new("");
    let a = s.token(&v2("user_a", "org_a", "admin"));
    let b = s.token(&v2("user_b", "org_b", "admin"));
    let mut threads = Vec::new();
    for (token, message_id) in [(&a, "m-a"), (&b, "m-b")] {
        let resp =
            s.gw.http
                .post(s.gw.url("/agents/1/run"))
                .bearer_auth(token)
                .header("x-stream-response", "false")
                // `org_id` in the body must not pose as the verified organisation either.
                .json(&json!({"message": "hello", "message_id": message_id,
                              "conversation_id": "c-100", "org_id": "org_a", "user_id": "user_a"}))
                .send()
                .await
                .unwrap();
        assert_eq!(resp.status(), 202);
        let v: Value = resp.json().await.unwrap();
        let thread = v["threadId"].as_str().unwrap().to_string();
        s.gw.wait_terminal_as(token, &thread).await;
        threads.push(thread);
    }
    assert_ne!(threads[0], threads[1]);
    let seen = mock_requests(&s.gw.http, &s.mock.addrs[0]).await;
    assert_eq!(seen.len(), 2);
    for (req, (thread, org)) in seen.iter().zip(threads.iter().zip(["org_a", "org_b"])) {
        assert_eq!(req["headers"]["x-sluice-org-id"], org);
        assert_eq!(
            req["body"]["conversation_id"],
            json!(thread),
            "the backend sees a conversation scoped to the organisation"
        );
        assert!(req["body"].get("org_id").is_none() && req["body"].get("user_id").is_none());
    }
    // Each organisation's backend conversation is its own: both are the backend's first turn.
    for (token, thread) in [(&a, &threads[0]), (&b, &threads[1])] {
        let snap = s.gw.wait_terminal_as(token, thread).await;
        assert_eq!(text_of(&snap["messages"][1]), expected_answer("hello", 1));
    }
}

/// A JWKS over plain http to a host that is not loopback is refused at start (anyone on the path
/// could serve keys and mint tokens for every organisation), unless the operator accepts it,
/// and then it is warned about at start-up. Loopback JWKS (as every test here uses) are fine.
#[test]
fn a_remote_jwks_over_plain_http_is_refused_unless_allowed() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let bin = env!("CARGO_BIN_EXE_sluice");
    let dir = TempDir::new();
    let conf = dir.0.join("insecure.toml");
    let base = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [auth]\nmode = \"jwt\"\nissuer = \"{ISS}\"\njwks_url = \"http://keys.example.com/jwks.json\"\n"
    );
    std::fs::write(&conf, &base).unwrap();
    for cmd in ["check", "serve"] {
        let out = Command::new(bin)
            .args([cmd, "--config", conf.to_str().unwrap()])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{cmd}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("auth.jwks_url") && err.contains("allow_insecure_jwks"),
            "{cmd}: {err}"
        );
    }

    std::fs::write(&conf, format!("{base}allow_insecure_jwks = true\n")).unwrap();
    let mut child = Command::new(bin)
        .args(["serve", "--config", conf.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut warned = None;
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) if line.contains("allow_insecure_jwks") => {
                warned = Some(line);
                break;
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let line = warned.expect("the insecure JWKS is warned about at start-up");
    assert!(line.contains("keys.example.com"), "{line}");
}

/// Idempotency keys are per user: two users of one organisation whose clients number their
/// messages alike get a run each, while each user's own retry re-attaches to their run.
#[tokio::test]
async fn idempotency_keys_are_per_user_within_an_organisation() {
    let s = Setup::new("");
    let alice = s.token(&v2("user_alice", "org_a", "admin"));
    let bob = s.token(&v2("user_bob", "org_a", "admin"));
    let body = |thread: Option<&str>| {
        let mut b = json!({"agentId": 1, "message": {"id": "1", "role": "user",
                            "parts": [{"type": "text", "text": "hello"}]}});
        if let Some(t) = thread {
            b["threadId"] = json!(t);
        }
        b
    };
    let invoke = |token: String| {
        let http = s.gw.http.clone();
        let url = s.gw.url("/api/invokeAgent");
        let body = body(None);
        async move {
            let resp = http
                .post(url)
                .bearer_auth(token)
                .header("x-stream-response", "false")
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 202);
            let reattached = resp.headers().get("x-sluice-reattached").is_some();
            let v: Value = resp.json().await.unwrap();
            (
                v["threadId"].as_str().unwrap().to_string(),
                v["runId"].as_str().unwrap().to_string(),
                reattached,
            )
        }
    };
    let (a_thread, a_run, a_again) = invoke(alice.clone()).await;
    assert!(!a_again);
    let (b_thread, b_run, b_again) = invoke(bob.clone()).await;
    assert!(!b_again, "bob's message \"1\" re-attached to alice's run");
    assert_ne!((&a_thread, &a_run), (&b_thread, &b_run));
    // Each user's own retry finds their own run.
    let (t, r, again) = invoke(alice.clone()).await;
    assert_eq!((t, r, again), (a_thread.clone(), a_run, true));
    let (t, r, again) = invoke(bob.clone()).await;
    assert_eq!((t, r, again), (b_thread.clone(), b_run, true));
    // And the backend saw one run per user.
    let seen = mock_requests(&s.gw.http, &s.mock.addrs[0]).await;
    for user in ["user_alice", "user_bob"] {
        let runs = seen
            .iter()
            .filter(|r| r["headers"]["x-sluice-user-id"] == json!(user))
            .count();
        assert_eq!(runs, 1, "{user}: {seen:?}");
    }
}

/// A POST refused before its body is read (here: no token) gets its answer and the connection
/// is closed at once: a client trickling a chunked body cannot hold the connection (or a task)
/// after its 401.
#[tokio::test]
async fn a_trickled_body_after_a_401_does_not_hold_the_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = Setup::new("");
    let addr = s.gw.base.trim_start_matches("http://").to_string();
    let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let (mut rd, mut wr) = tcp.into_split();
    wr.write_all(
        b"POST /api/invokeAgent HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
          transfer-encoding: chunked\r\n\r\n1\r\n{\r\n",
    )
    .await
    .unwrap();
    // Keep trickling a byte every 100 ms (for up to 10 s); the gateway must answer and close
    // regardless.
    let trickle = tokio::spawn(async move {
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if wr.write_all(b"1\r\n \r\n").await.is_err() {
                return;
            }
        }
    });
    let read = async {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return got,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    let got = tokio::time::timeout(Duration::from_secs(3), read)
        .await
        .expect("the connection was held open after the 401 while the body trickled");
    trickle.abort();
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 401"), "{text}");
}
