//! `sluice demo`: its identity provider (a key pair whose JWKS the mock agent serves, and
//! tokens minted with it) and the ready-to-paste commands it prints.

use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::auth::testkeys;
use crate::config::{AuthMode, Config};

/// The demo's issuer (`iss` of its tokens).
pub const ISSUER: &str = "https://clerk.sluice-demo.local";
/// The demo organisation.
pub const ORG: &str = "org_demo";
/// How long demo tokens stay valid.
const TOKEN_LIFETIME_SECS: u64 = 24 * 3600;

/// A generated demo key pair and tokens signed with it.
pub struct Identity {
    /// The public JWKS (served by the mock agent at `/.well-known/jwks.json`).
    pub jwks: Value,
    /// A Clerk v2 token of an `org:admin` of [`ORG`].
    pub admin_token: String,
    /// A Clerk v2 token of an `org:member` of [`ORG`] (refused with 403).
    pub member_token: String,
}

impl Identity {
    /// Generate an ES256 key pair and mint the two tokens.
    pub fn generate() -> Result<Identity, String> {
        let (key, jwk, kid) = testkeys::generate_ec()?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let claims = |user: &str, role: &str| {
            json!({
                "iss": ISSUER, "sub": user, "sid": format!("sess_{user}"),
                "iat": now, "nbf": now.saturating_sub(5), "exp": now + TOKEN_LIFETIME_SECS,
                "azp": "http://localhost:3000", "v": 2, "sts": "active",
                "o": {"id": ORG, "rol": role, "slg": "demo"},
            })
        };
        let alg = jsonwebtoken::Algorithm::ES256;
        Ok(Identity {
            jwks: testkeys::jwks(&[jwk]),
            admin_token: testkeys::mint(
                &claims("user_demo_admin", "admin"),
                &key,
                alg,
                Some(&kid),
            )?,
            member_token: testkeys::mint(
                &claims("user_demo_member", "member"),
                &key,
                alg,
                Some(&kid),
            )?,
        })
    }

    /// Point `config` at this identity: JWT auth, keys from the mock agent at `mock`.
    pub fn configure(&self, config: &mut Config, mock: SocketAddr) {
        config.auth.mode = AuthMode::Jwt;
        config.auth.issuer = ISSUER.into();
        config.auth.jwks_url = format!("http://{mock}/.well-known/jwks.json");
    }
}

/// The demo's instructions for a gateway at `api` (admin at `admin`) over a mock agent at `mock`.
pub fn instructions(api: SocketAddr, admin: SocketAddr, mock: SocketAddr, id: &Identity) -> String {
    let base = format!("http://{api}");
    let auth = r#"-H "authorization: Bearer $TOKEN""#;
    format!(
        r#"
Sluice demo: gateway {base}, admin http://{admin}, mock agent http://{mock}
Requests need a Clerk-style token. The demo signed two (valid 24 h) with a key whose JWKS the
mock agent serves at http://{mock}/.well-known/jwks.json. Paste these first:

export TOKEN='{admin_token}'
export MEMBER_TOKEN='{member_token}'

TOKEN belongs to an org:admin of {org}; MEMBER_TOKEN to an org:member, who gets 403.

1. Stream a run (AI SDK v5 UI-message stream over SSE):

  curl -N {base}/api/invokeAgent {auth} -H 'content-type: application/json' \
    -d '{{"agentId":1,"message":{{"role":"user","parts":[{{"type":"text","text":"Hello there"}}]}}}}'

2. Start a run without holding a stream (202 Accepted), then poll its snapshot:

  curl -si {base}/api/invokeAgent {auth} -H 'x-stream-response: false' -H 'content-type: application/json' \
    -d '{{"agentId":1,"message":{{"role":"user","parts":[{{"type":"text","text":"scenario:slow tokens=40"}}]}}}}'
  curl -s '{base}/api/getConversation?threadId=THREAD_ID' {auth}      # THREAD_ID from X-Thread-ID

3. Reconnect: start a slow stream, cut it with Ctrl-C, then resume after the last id you saw
   (or leave out Last-Event-ID to replay the run from its start):

  curl -Ni {base}/api/invokeAgent {auth} -H 'content-type: application/json' \
    -d '{{"agentId":1,"message":{{"role":"user","parts":[{{"type":"text","text":"scenario:slow tokens=60"}}]}}}}'
  curl -N {base}/api/threads/THREAD_ID/stream {auth} -H 'Last-Event-ID: 2'

4. A member is refused (403), and no token at all is 401:

  curl -si '{base}/api/getConversation?threadId=THREAD_ID' -H "authorization: Bearer $MEMBER_TOKEN"
  curl -si '{base}/api/getConversation?threadId=THREAD_ID'

Other scenarios (put them in the message text): scenario:reasoning, scenario:tools,
scenario:error, scenario:drop, scenario:malformed, scenario:hang, scenario:long events=5000.
Metrics: curl -s http://{admin}/metrics | grep ^sluice_
"#,
        admin_token = id.admin_token,
        member_token = id.member_token,
        org = ORG,
    )
}
