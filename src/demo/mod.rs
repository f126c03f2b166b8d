//! `sluice demo`: its identity provider (a key pair whose JWKS the mock agent serves, and
//! tokens minted with it), the ready-to-paste commands it prints, its chat page (`page.html`,
//! served at the gateway's root with the demo's token), and the cluster demo
//! (`--instances N --redis URL`: gateway child processes sharing Redis).

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::auth::testkeys;
use crate::config::{AuthMode, Config, Secret, StoreBackend};
use crate::mock::{Dialect, MockAgent};
use crate::server;

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

/// The chat page: plain HTML and JavaScript of the project's own, nothing fetched.
const PAGE: &str = include_str!("page.html");

/// Where the page takes its token: this JavaScript string literal is replaced by the token's.
const TOKEN_SLOT: &str = "\"__SLUICE_DEMO_TOKEN__\"";

/// The chat page, carrying `token` to its own requests.
pub fn page(token: &str) -> bytes::Bytes {
    // A JSON string is a JavaScript string literal; `<` is escaped so that no text in it can
    // end the script element.
    let literal = serde_json::to_string(token)
        .unwrap_or_default()
        .replace('<', "\\u003c");
    bytes::Bytes::from(PAGE.replace(TOKEN_SLOT, &literal))
}

/// The demo's instructions for a gateway at `api` (admin at `admin`) over a mock agent at `mock`.
pub fn instructions(api: SocketAddr, admin: SocketAddr, mock: SocketAddr, id: &Identity) -> String {
    let base = format!("http://{api}");
    let auth = r#"-H "authorization: Bearer $TOKEN""#;
    format!(
        r#"
Sluice demo: gateway {base}, admin http://{admin}, mock agent http://{mock}
Chat page: open {base}/ in a browser (stream, drop the connection, reload, poll).
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

/// Key prefix of the demo's gateways in Redis, apart from a deployment's default (`sl`).
pub const KEY_PREFIX: &str = "sl-demo";

/// How long a cluster instance may take to announce its listeners.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Point `config` at the shared store in Redis at `url`, under the demo's key prefix.
pub fn use_redis(config: &mut Config, url: &str) {
    config.store.backend = StoreBackend::Redis;
    config.store.redis.url = Secret(url.to_string());
    config.store.redis.key_prefix = KEY_PREFIX.into();
}

/// One gateway process of the cluster demo.
struct Instance {
    /// Client API.
    api: SocketAddr,
    /// Admin listener.
    admin: SocketAddr,
    /// Its process id (for `kill -9`).
    pid: u32,
}

/// `sluice demo --instances N --redis URL`: the mock agent in this process and `instances`
/// gateways as child processes (`sluice serve`), all sharing Redis. `config` is the demo's
/// gateway configuration (listeners of instance 1, dialect, the Redis store); instance `i`
/// listens on the ports of instance 1 plus `i - 1` (port 0 stays 0: a free port each).
pub fn cluster(mut config: Config, dialect: Dialect, instances: u16) -> ExitCode {
    let fail = |msg: String| {
        eprintln!("sluice: {msg}");
        ExitCode::FAILURE
    };
    let identity = match Identity::generate() {
        Ok(i) => i,
        Err(e) => return fail(format!("cannot generate the demo keys: {e}")),
    };
    let (Ok(api), Ok(admin)) = (
        config.server.listen.parse::<SocketAddr>(),
        config.server.admin_listen.parse::<SocketAddr>(),
    ) else {
        return fail(format!(
            "--listen {} and --admin-listen {} must be addresses like 127.0.0.1:8080",
            config.server.listen, config.server.admin_listen
        ));
    };
    let mut srv = server::new_server(&config);
    let mock = MockAgent::new()
        .with_dialect(dialect)
        .with_jwks(identity.jwks.clone());
    let mock_addr = match server::add_local_app(&mut srv, "sluice mock agent", mock, "127.0.0.1:0")
    {
        Ok(a) => a,
        Err(e) => return fail(format!("cannot start the mock agent: {e}")),
    };
    config.upstream.urls = vec![format!("http://{mock_addr}")];
    identity.configure(&mut config, mock_addr);

    // One configuration file per instance, readable by this user only (the Redis URL may hold
    // a password), removed once every instance has read its own.
    let dir = std::env::temp_dir().join(format!("sluice-demo-{}", std::process::id()));
    let ports: Option<Vec<_>> = (0..instances)
        .map(|i| Some((offset(api, i)?, offset(admin, i)?)))
        .collect();
    let Some(ports) = ports else {
        return fail(format!("instance {instances} would listen past port 65535"));
    };
    let mut files = Vec::new();
    for (i, (api_i, admin_i)) in ports.into_iter().enumerate() {
        config.server.listen = api_i.to_string();
        config.server.admin_listen = admin_i.to_string();
        let text = match instance_toml(&config) {
            Ok(t) => t,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return fail(format!("instance {}: {e}", i + 1));
            }
        };
        let path = dir.join(format!("instance-{}.toml", i + 1));
        if let Err(e) = write_private(&path, &text) {
            let _ = std::fs::remove_dir_all(&dir);
            return fail(format!("cannot write {}: {e}", path.display()));
        }
        files.push(path);
    }
    let started = start_instances(&files);
    let _ = std::fs::remove_dir_all(&dir);
    let (children, listening) = match started {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let mut list = Vec::new();
    for (i, (child, (api, admin))) in children.into_iter().zip(listening).enumerate() {
        let pid = child.id();
        announce(&format!(
            "sluice instance {} listening on http://{api} (admin http://{admin}), pid {pid}",
            i + 1
        ));
        list.push(Instance { api, admin, pid });
        // Reap it, and say so when it ends (`kill -9` in the demo's step 4).
        std::thread::spawn(move || {
            let mut child = child;
            if let Ok(status) = child.wait() {
                eprintln!(
                    "sluice demo: instance {} (pid {pid}) ended: {status}",
                    i + 1
                );
            }
        });
    }
    announce(&format!(
        "mock-agent listening on http://{mock_addr} (dialect {})",
        dialect.name()
    ));
    announce(&cluster_instructions(
        &list, mock_addr, &config, dialect, &identity,
    ));
    srv.run_forever()
}

/// `addr` with its port moved up by `by` (port 0, "any free port", stays 0).
fn offset(addr: SocketAddr, by: u16) -> Option<SocketAddr> {
    let mut a = addr;
    if a.port() != 0 {
        a.set_port(a.port().checked_add(by)?);
    }
    Some(a)
}

/// `config` as a file `sluice serve` reads: the effective configuration, with the secret that
/// `to_toml` redacts (the Redis URL) written back, checked by parsing it again.
fn instance_toml(config: &Config) -> Result<String, String> {
    let mut table = toml::Table::try_from(config).map_err(|e| e.to_string())?;
    let redis = table
        .get_mut("store")
        .and_then(|s| s.get_mut("redis"))
        .and_then(|r| r.as_table_mut())
        .ok_or("no [store.redis] in the effective configuration")?;
    redis.insert(
        "url".into(),
        toml::Value::String(config.store.redis.url.0.clone()),
    );
    let text = toml::to_string(&table).map_err(|e| e.to_string())?;
    Config::parse(&text).map_err(|e| e.to_string())?;
    Ok(text)
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?
        .write_all(text.as_bytes())
}

/// Start `sluice serve --config FILE` for each file and wait until each announces its
/// listeners. Their logs go to this process's stderr, each line prefixed `[instance i]`; they
/// get SIGTERM when this process ends. On a failure every instance started is killed.
#[allow(clippy::type_complexity)]
fn start_instances(
    files: &[PathBuf],
) -> Result<(Vec<Child>, Vec<(SocketAddr, SocketAddr)>), String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    let mut children: Vec<Child> = Vec::new();
    let mut waiting = Vec::new();
    let kill_all = |children: &mut Vec<Child>| {
        for c in children.iter_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    };
    for (i, file) in files.iter().enumerate() {
        let n = i + 1;
        let mut cmd = Command::new(&exe);
        cmd.arg("serve")
            .arg("--config")
            .arg(file)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        die_with_parent(&mut cmd);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                kill_all(&mut children);
                return Err(format!("cannot start instance {n}: {e}"));
            }
        };
        let (tx, rx) = mpsc::channel();
        if let Some(out) = child.stdout.take() {
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    let addrs: Vec<SocketAddr> = line
                        .split_whitespace()
                        .filter_map(|w| w.trim_matches(['(', ')', ',']).strip_prefix("http://"))
                        .filter_map(|a| a.parse().ok())
                        .collect();
                    if let [api, admin] = addrs[..] {
                        let _ = tx.send((api, admin));
                    }
                }
            });
        }
        if let Some(err) = child.stderr.take() {
            std::thread::spawn(move || {
                for line in BufReader::new(err).lines().map_while(Result::ok) {
                    eprintln!("[instance {n}] {line}");
                }
            });
        }
        children.push(child);
        waiting.push(rx);
    }
    let deadline = Instant::now() + START_TIMEOUT;
    let mut listening = Vec::new();
    for (i, rx) in waiting.iter().enumerate() {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(addrs) => listening.push(addrs),
            Err(e) => {
                // Its output closes as it exits: give it a moment to be reaped.
                let gone = Instant::now() + Duration::from_secs(2);
                let mut status = children[i].try_wait();
                while e == mpsc::RecvTimeoutError::Disconnected
                    && matches!(status, Ok(None))
                    && Instant::now() < gone
                {
                    std::thread::sleep(Duration::from_millis(20));
                    status = children[i].try_wait();
                }
                let why = match status {
                    Ok(Some(status)) => format!("exited ({status})"),
                    _ if e == mpsc::RecvTimeoutError::Disconnected => "closed its output".into(),
                    _ => format!("did not start within {}s", START_TIMEOUT.as_secs()),
                };
                kill_all(&mut children);
                return Err(format!(
                    "instance {} {why}; its log is above ([instance {}] lines)",
                    i + 1,
                    i + 1
                ));
            }
        }
    }
    Ok((children, listening))
}

/// Have the child get SIGTERM when the thread that started it (this process's main thread,
/// which runs the demo until the end) goes away, so that no gateway outlives the demo.
fn die_with_parent(cmd: &mut Command) {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: the closure runs in the forked child before exec and only calls prctl, which
        // is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = cmd;
}

fn announce(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// A Redis URL fit to print: any `user:password@` replaced by `…@`.
fn shown_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((_, host)) => format!("{scheme}://…@{host}"),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

/// The cluster demo's instructions (`instances` holds at least one): invoke on instance 1, poll
/// on 2, resume on 3, kill 1.
fn cluster_instructions(
    instances: &[Instance],
    mock: SocketAddr,
    config: &Config,
    dialect: Dialect,
    id: &Identity,
) -> String {
    let redis = shown_url(&config.store.redis.url.0);
    let (ttl, scan) = (
        config.store.redis.lease_ttl.0,
        config.store.redis.takeover_scan.0,
    );
    let base = |i: usize| format!("http://{}", instances[i.min(instances.len() - 1)].api);
    let (one, two, three) = (base(0), base(1), base(2));
    let admin = |i: usize| instances[i.min(instances.len() - 1)].admin;
    let auth = r#"-H "authorization: Bearer $TOKEN""#;
    let list: String = instances
        .iter()
        .enumerate()
        .map(|(i, x)| {
            format!(
                "  instance {}: http://{}  admin http://{}  pid {}\n",
                i + 1,
                x.api,
                x.admin,
                x.pid
            )
        })
        .collect();
    let takeover = match dialect {
        Dialect::AgentFlow => {
            "The mock agent is asked again with the same message_id and Last-Event-ID set to the
   last backend event id logged; events already logged are dropped, so the stream of step 3
   goes on with no gap and no duplicate."
        }
        Dialect::Poll => {
            "The mock agent is polled on from the stored checkpoint; the stream of step 3 goes on."
        }
        Dialect::UiMessage => {
            "A UI-message backend cannot be resumed, so the run ends `error` with the reason (never
   a second backend run); --dialect agentflow or poll shows a run going on."
        }
    };
    let takeovers: String = instances
        .iter()
        .skip(1)
        .map(|x| {
            format!(
                "  curl -s http://{}/metrics | grep ^sluice_store_takeovers_total\n",
                x.admin
            )
        })
        .collect();
    format!(
        r#"
Sluice cluster demo: {n} gateway instances sharing one log in Redis ({redis}, key prefix
{prefix}), over a mock agent at http://{mock} (dialect {dialect}). Any instance answers any
request; the instance that starts a run ingests it.

{list}
Requests need a Clerk-style token. The demo signed two (valid 24 h) with a key whose JWKS the
mock agent serves at http://{mock}/.well-known/jwks.json. Paste these first:

export TOKEN='{admin_token}'
export MEMBER_TOKEN='{member_token}'

1. Start a slow run (about a minute) on instance 1, without holding a stream (202 Accepted);
   THREAD_ID is in its X-Thread-ID header:

  curl -si {one}/api/invokeAgent {auth} -H 'x-stream-response: false' -H 'content-type: application/json' \
    -d '{{"agentId":1,"message":{{"role":"user","parts":[{{"type":"text","text":"scenario:slow tokens=240 delay_ms=250"}}]}}}}'

2. Poll it on instance 2 (add &afterSeq=K&wait=25 to wait for what follows event K):

  curl -s '{two}/api/getConversation?threadId=THREAD_ID' {auth}

3. Stream it on instance 2, cut the stream with Ctrl-C, then resume it on instance 3 after the
   last id you saw (keep this one open for step 4):

  curl -N {two}/api/threads/THREAD_ID/stream {auth}
  curl -N {three}/api/threads/THREAD_ID/stream {auth} -H 'Last-Event-ID: 5'

4. Kill instance 1, which ingests the run, mid-run:

  kill -9 {pid}

   Once its lease has expired, another instance takes the run over, within about {total:?}
   (store.redis.lease_ttl {ttl:?} + takeover_scan {scan:?}). {takeover}
   Watch it finish through instance 2 (the stream from the start, then the snapshot), and see
   which instance took it over (sluice_store_takeovers_total):

  curl -N {two}/api/threads/THREAD_ID/stream {auth}
  curl -s '{two}/api/getConversation?threadId=THREAD_ID' {auth}
{takeovers}
   Instance 1 stays down (Ctrl-C ends the demo). Readiness, as a load balancer sees it:

  curl -si http://{admin2}/readyz

Metrics: curl -s http://{admin2}/metrics | grep -E '^sluice_(store|redis)_'
"#,
        n = instances.len(),
        prefix = config.store.redis.key_prefix,
        total = ttl + scan,
        dialect = dialect.name(),
        pid = instances[0].pid,
        admin2 = admin(1),
        admin_token = id.admin_token,
        member_token = id.member_token,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_carries_the_token_as_a_script_string() {
        assert_eq!(PAGE.matches(TOKEN_SLOT).count(), 1, "one token slot");
        let page = page("eyJ.a-b_c");
        let page = std::str::from_utf8(&page).unwrap();
        assert!(!page.contains(TOKEN_SLOT));
        assert_eq!(page.matches("\"eyJ.a-b_c\"").count(), 1);
        // No token text can end the script element.
        let page = page_of("x</script><script>alert(1)//");
        assert!(!page.contains("</script><script>alert"));
        assert!(page.contains("\\u003c/script>"));
    }

    fn page_of(token: &str) -> String {
        String::from_utf8(page(token).to_vec()).unwrap()
    }

    #[test]
    fn the_page_is_self_contained() {
        // Nothing fetched from elsewhere: no external scripts, styles, images or fonts.
        for banned in ["src=\"http", "href=\"http", "url(http", "@import", "//cdn"] {
            assert!(!PAGE.contains(banned), "the page refers to {banned}");
        }
    }
}
