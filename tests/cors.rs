//! Browser apps on other origins (`server.cors_origins`): preflights are answered before any
//! credential check, every answer to a listed origin (streams and errors included) can be read
//! by it, and an unlisted origin gets nothing it could read.

mod common;

use common::*;
use serde_json::json;

const APP: &str = "http://app.test:3000";

fn header(resp: &reqwest::Response, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_string())
}

async fn preflight(gw: &Gateway, path: &str, origin: &str) -> reqwest::Response {
    gw.http
        .request(reqwest::Method::OPTIONS, gw.url(path))
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization,content-type",
        )
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_listed_origin_may_call_the_api_and_read_every_answer() {
    let mock = mock_agent();
    let (_, jwk, _) = sluice::auth::testkeys::generate_ec().unwrap();
    let jwks = JwksServer::start(sluice::auth::testkeys::jwks(&[jwk]));
    let gw = gateway_conf(
        &mock.addrs[0],
        &format!("cors_origins = [\"{APP}\"]"),
        "",
        // Credentials are checked: a preflight carries none and must still pass.
        &format!(
            "mode = \"jwt\"\nissuer = \"https://issuer.test\"\njwks_url = \"{}\"",
            jwks.url
        ),
        "",
    );
    for path in ["/api/chat", "/api/chat/c-1/stream", "/api/getConversation"] {
        let resp = preflight(&gw, path, APP).await;
        assert_eq!(resp.status(), 204, "{path}");
        assert_eq!(
            header(&resp, "access-control-allow-origin").as_deref(),
            Some(APP)
        );
        let allowed = header(&resp, "access-control-allow-headers").unwrap();
        for h in ["authorization", "content-type", "last-event-id"] {
            assert!(allowed.contains(h), "{allowed}");
        }
        assert!(header(&resp, "access-control-allow-credentials").is_none());
    }
    // An error answer to the listed origin is readable by it (here: no token).
    let resp = gw
        .http
        .post(gw.url("/api/chat"))
        .header("origin", APP)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(
        header(&resp, "access-control-allow-origin").as_deref(),
        Some(APP)
    );
    assert_eq!(header(&resp, "vary").as_deref(), Some("origin"));
    // An unlisted origin: its preflight is refused, and answers carry nothing it could read.
    let resp = preflight(&gw, "/api/chat", "http://evil.test").await;
    assert_eq!(resp.status(), 403);
    assert!(header(&resp, "access-control-allow-origin").is_none());
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "origin_not_allowed");
    let resp = gw
        .http
        .get(gw.url("/api/getConversation?threadId=x"))
        .header("origin", "http://evil.test")
        .send()
        .await
        .unwrap();
    assert!(header(&resp, "access-control-allow-origin").is_none());
}

#[tokio::test]
async fn a_cross_origin_stream_exposes_its_ids() {
    let mock = mock_agent();
    let gw = gateway_conf(
        &mock.addrs[0],
        "cors_origins = [\"*\"]",
        "",
        "mode = \"disabled\"",
        "",
    );
    let resp = gw
        .http
        .post(gw.url("/api/chat"))
        .header("origin", APP)
        .json(&json!({
            "id": "cors-chat", "agentId": 1, "trigger": "submit-message",
            "messages": [{"id": "m1", "role": "user", "parts": [{"type": "text", "text": "Hi"}]}],
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        header(&resp, "access-control-allow-origin").as_deref(),
        Some(APP)
    );
    let exposed = header(&resp, "access-control-expose-headers").unwrap();
    assert!(
        exposed.contains("x-thread-id") && exposed.contains("x-run-id"),
        "{exposed}"
    );
    assert!(resp.text().await.unwrap().ends_with("data: [DONE]\n\n"));
    // Without `server.cors_origins`, no answer carries CORS headers.
    let plain = gateway(&mock.addrs[0]);
    let resp = plain
        .http
        .get(plain.url("/api/getConversation?threadId=cors-chat"))
        .header("origin", APP)
        .send()
        .await
        .unwrap();
    assert!(header(&resp, "access-control-allow-origin").is_none());
    assert!(header(&resp, "vary").is_none());
}
