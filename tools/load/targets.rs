//! The processes under test and their lifetimes: the generator (this binary re-executed with
//! `generator`), nginx (found on PATH, or installed with apt-get when running as root), Sluice
//! (`sluice serve` with a generated config, JWT auth over a generated ES256 key) on the memory
//! store, and Sluice on the Redis store against a `redis-server` of its own (found on PATH, or
//! installed with apt-get when running as root). Every child is registered here and stopped by
//! PID by [`cleanup`] (at the end, on error, on Ctrl-C or SIGTERM). Each running target is
//! described by a [`Target`]: its address, the PIDs whose CPU and memory count as its cost, and
//! those of a process it depends on whose cost is reported beside it (Redis).

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;

use crate::measure;

/// The ways of reaching the generator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// The generator itself.
    Direct,
    /// nginx in front of it.
    Nginx,
    /// Sluice in front of it (the embedded memory store).
    Sluice,
    /// Sluice in front of it, on the Redis store (`[store] backend = "redis"`).
    SluiceRedis,
}

impl Kind {
    /// Its name in reports and in `ONLY` (also the name its process is registered under).
    pub fn name(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::Nginx => "nginx",
            Kind::Sluice => "sluice",
            Kind::SluiceRedis => "sluice-redis",
        }
    }

    /// Parse a name.
    pub fn parse(s: &str) -> Option<Kind> {
        match s.trim().to_ascii_lowercase().as_str() {
            "direct" | "generator" => Some(Kind::Direct),
            "nginx" => Some(Kind::Nginx),
            "sluice" => Some(Kind::Sluice),
            "sluice-redis" | "sluice_redis" | "redis" => Some(Kind::SluiceRedis),
            _ => None,
        }
    }

    /// Sluice, on either store (it has the routes only Sluice has).
    pub fn is_sluice(self) -> bool {
        matches!(self, Kind::Sluice | Kind::SluiceRedis)
    }
}

/// A running target.
#[derive(Clone, Debug)]
pub struct Target {
    /// Which one.
    pub kind: Kind,
    /// Where clients connect.
    pub addr: SocketAddr,
    /// The processes whose CPU and memory are the target's cost (none for `direct`).
    pub pids: Vec<u32>,
    /// The Redis server the target uses (`sluice-redis`): its CPU, memory and commands are
    /// measured over the same windows and reported in columns of their own, not added to the
    /// target's.
    pub redis: Option<Redis>,
}

/// A child process the harness owns.
struct Managed {
    name: &'static str,
    child: Child,
    /// Other processes started through it (nginx workers).
    extra: Vec<u32>,
    /// Held open so that the child can notice the harness is gone.
    _stdin: Option<ChildStdin>,
}

static CHILDREN: Mutex<Vec<Managed>> = Mutex::new(Vec::new());
/// Temp dirs to remove on an early exit (Ctrl-C), when no destructor runs.
static TEMP_DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn register(m: Managed) {
    CHILDREN.lock().unwrap_or_else(|p| p.into_inner()).push(m);
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

fn stop_managed(mut m: Managed) {
    let pid = m.child.id();
    if matches!(m.child.try_wait(), Ok(None)) {
        signal(pid, "TERM");
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && matches!(m.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(20));
        }
        if matches!(m.child.try_wait(), Ok(None)) {
            eprintln!("load: {} (pid {pid}) ignored SIGTERM: killing it", m.name);
            let _ = m.child.kill();
        }
        let _ = m.child.wait();
    }
    for extra in m.extra {
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline && measure::alive(extra) {
            std::thread::sleep(Duration::from_millis(20));
        }
        if measure::alive(extra) {
            signal(extra, "KILL");
        }
    }
}

/// Stop every registered child (SIGTERM, then SIGKILL after 5 s), by PID, newest first.
pub fn cleanup() {
    let mut children = std::mem::take(&mut *CHILDREN.lock().unwrap_or_else(|p| p.into_inner()));
    while let Some(m) = children.pop() {
        stop_managed(m);
    }
    for dir in std::mem::take(&mut *TEMP_DIRS.lock().unwrap_or_else(|p| p.into_inner())) {
        if keep_tmp() {
            eprintln!("load: KEEP_TMP: kept {}", dir.display());
        } else {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Stop the registered children called `name` (to start a fresh one).
pub fn stop(name: &str) {
    let taken: Vec<Managed> = {
        let mut children = CHILDREN.lock().unwrap_or_else(|p| p.into_inner());
        let (taken, kept) = std::mem::take(&mut *children)
            .into_iter()
            .partition(|m| m.name == name);
        *children = kept;
        taken
    };
    for m in taken {
        stop_managed(m);
    }
}

/// Whether the main PID of a registered child is still running.
pub fn running(name: &str) -> bool {
    let mut children = CHILDREN.lock().unwrap_or_else(|p| p.into_inner());
    children
        .iter_mut()
        .filter(|m| m.name == name)
        .any(|m| matches!(m.child.try_wait(), Ok(None)))
}

/// Read stdout lines of a child on a thread; the first line containing `marker` is returned.
fn wait_for_line(
    child: &mut Child,
    marker: &'static str,
    limit: Duration,
) -> Result<String, String> {
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if !sent && line.contains(marker) {
                let _ = tx.send(line);
                sent = true;
            }
        }
    });
    rx.recv_timeout(limit)
        .map_err(|_| format!("no `{marker}` line within {limit:?}"))
}

/// The `http://ADDR` after `after` in `line`.
fn addr_after(line: &str, after: &str) -> Option<SocketAddr> {
    let rest = &line[line.find(after)? + after.len()..];
    let rest = rest.strip_prefix("http://")?;
    let end = rest
        .find(|c: char| c.is_whitespace() || c == ')')
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// Wait until `addr` accepts TCP connections.
pub fn wait_listening(addr: SocketAddr, limit: Duration) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        if Instant::now() > deadline {
            return Err(format!("{addr} never accepted connections"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// A free loopback port (bound, then released for the child to take).
fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

/// The running generator.
pub struct Generator {
    /// Its address.
    pub addr: SocketAddr,
    /// Its PID.
    pub pid: u32,
}

/// Start the generator (this executable, `generator` subcommand).
pub fn start_generator() -> Result<Generator, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let mut child = Command::new(exe)
        .args(["generator", "--listen", "127.0.0.1:0", "--watch-stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start the generator: {e}"))?;
    let stdin = child.stdin.take();
    let line = wait_for_line(
        &mut child,
        "generator listening on",
        Duration::from_secs(10),
    );
    let pid = child.id();
    register(Managed {
        name: "generator",
        child,
        extra: Vec::new(),
        _stdin: stdin,
    });
    let line = line?;
    let addr = addr_after(&line, "listening on ").ok_or(format!("bad line: {line}"))?;
    wait_listening(addr, Duration::from_secs(10))?;
    Ok(Generator { addr, pid })
}

/// A temp directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Create one under the system temp dir.
    pub fn new(tag: &str) -> Result<TempDir, String> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let p =
            std::env::temp_dir().join(format!("sluice-load-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        TEMP_DIRS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(p.clone());
        Ok(TempDir(p))
    }
}

/// `KEEP_TMP=1`: keep the temp dir (configs, Sluice's log, nginx's error log).
fn keep_tmp() -> bool {
    std::env::var("KEEP_TMP").is_ok_and(|v| !v.is_empty() && v != "0")
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !keep_tmp() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(
            [
                "/usr/sbin",
                "/usr/local/sbin",
                "/sbin",
                "/usr/local/nginx/sbin",
            ]
            .map(PathBuf::from),
        )
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Run a command with a time limit (killed by PID when over it); whether it succeeded.
fn run_limited(cmd: &mut Command, limit: Duration) -> bool {
    let Ok(mut child) = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn() else {
        return false;
    };
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status.success(),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
        }
    }
}

/// Find `bin` on PATH, installing the first of `packages` that provides it with apt-get when it
/// is missing, installing is allowed and the harness runs as root.
fn find_or_install(bin: &str, packages: &[&str], allow_install: bool) -> Result<PathBuf, String> {
    if let Some(p) = find_on_path(bin) {
        return Ok(p);
    }
    if !allow_install {
        return Err(format!(
            "{bin} is not on PATH (and installing was turned off)"
        ));
    }
    if !is_root() || find_on_path("apt-get").is_none() {
        return Err(format!(
            "{bin} is not on PATH; install it (e.g. `sudo apt-get install -y {}`) to compare \
             against it",
            packages[0]
        ));
    }
    eprintln!(
        "load: {bin} not found; installing it with apt-get ({})…",
        packages.join(", else ")
    );
    let update = run_limited(
        Command::new("apt-get").args(["update", "-qq"]),
        Duration::from_secs(180),
    );
    if !update {
        eprintln!("load: apt-get update failed; trying the install anyway");
    }
    for pkg in packages {
        let ok = run_limited(
            Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends", pkg])
                .env("DEBIAN_FRONTEND", "noninteractive"),
            Duration::from_secs(300),
        );
        if ok {
            if let Some(p) = find_on_path(bin) {
                return Ok(p);
            }
        }
    }
    Err(format!(
        "{bin} is not on PATH and `apt-get install` of {} failed",
        packages.join(" / ")
    ))
}

/// Find nginx, installing it with apt-get when missing and running as root.
pub fn find_or_install_nginx(allow_install: bool) -> Result<PathBuf, String> {
    find_or_install("nginx", &["nginx-light", "nginx"], allow_install)
}

/// Find redis-server, installing it with apt-get when missing and running as root.
pub fn find_or_install_redis(allow_install: bool) -> Result<PathBuf, String> {
    find_or_install("redis-server", &["redis-server"], allow_install)
}

/// The running Redis server (for `sluice-redis`).
#[derive(Clone, Debug)]
pub struct Redis {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its PID.
    pub pid: u32,
    /// `redis-server --version`, shortened.
    pub version: String,
}

/// Start `redis-server` on a free loopback port, without persistence (`--save ''
/// --appendonly no`), its working dir and log under `dir`.
pub fn start_redis(bin: &Path, dir: &Path) -> Result<Redis, String> {
    let port = free_port()?;
    let log = dir.join("redis.log");
    let child = Command::new(bin)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .arg("--dir")
        .arg(dir)
        .arg("--logfile")
        .arg(&log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
    let pid = child.id();
    register(Managed {
        name: "redis-server",
        child,
        extra: Vec::new(),
        _stdin: None,
    });
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().map_err(|_| "addr")?;
    wait_listening(addr, Duration::from_secs(10))
        .map_err(|e| format!("redis-server: {e}; log: {}", tail(&log, 5)))?;
    let version = Command::new(bin)
        .arg("--version")
        .output()
        .ok()
        .map(|o| {
            let v = String::from_utf8_lossy(&o.stdout);
            v.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
        })
        .unwrap_or_default();
    Ok(Redis { addr, pid, version })
}

/// Redis's `INFO commandstats` counters (`cmdstat_<name>` → calls and µs spent in them; a
/// script's inner calls count both in their own line and in the script's), read over a short
/// TCP exchange; empty when Redis does not answer.
pub fn redis_commandstats(addr: SocketAddr) -> std::collections::BTreeMap<String, (u64, u64)> {
    use std::io::{Read, Write};
    let mut out = std::collections::BTreeMap::new();
    let Ok(mut conn) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return out;
    };
    let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
    if conn
        .write_all(b"*2\r\n$4\r\nINFO\r\n$12\r\ncommandstats\r\n")
        .is_err()
    {
        return out;
    }
    // A bulk string: `$<len>\r\n<body>\r\n`.
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let mut want: Option<usize> = None;
    loop {
        match conn.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        if want.is_none() {
            if let Some(nl) = buf.windows(2).position(|w| w == b"\r\n") {
                want = std::str::from_utf8(&buf[1..nl])
                    .ok()
                    .and_then(|n| n.parse::<usize>().ok())
                    .map(|n| n + nl + 4);
            }
        }
        if want.is_some_and(|w| buf.len() >= w) {
            break;
        }
    }
    for line in String::from_utf8_lossy(&buf).lines() {
        let Some(rest) = line.strip_prefix("cmdstat_") else {
            continue;
        };
        let Some((name, stats)) = rest.split_once(':') else {
            continue;
        };
        let field = |k: &str| {
            stats
                .split(',')
                .find_map(|kv| kv.strip_prefix(k))
                .and_then(|v| v.parse::<u64>().ok())
        };
        if let (Some(calls), Some(usec)) = (field("calls="), field("usec=")) {
            out.insert(name.to_string(), (calls, usec));
        }
    }
    out
}

/// The soft and hard `RLIMIT_NOFILE` of this process.
pub fn nofile_limits() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let line = text.lines().find(|l| l.starts_with("Max open files"));
    let nums: Vec<u64> = line
        .map(|l| {
            l.split_whitespace()
                .filter_map(|w| w.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    match nums.as_slice() {
        [soft, hard, ..] => (*soft, *hard),
        _ => (1024, 1024),
    }
}

/// Raise this process's soft `RLIMIT_NOFILE` to its hard limit with `prlimit` (children
/// started afterwards inherit it). Returns the soft limit now in force.
pub fn raise_nofile() -> u64 {
    let (soft, hard) = nofile_limits();
    if soft < hard {
        let _ = Command::new("prlimit")
            .args([
                "--pid",
                &std::process::id().to_string(),
                &format!("--nofile={hard}:{hard}"),
            ])
            .stderr(Stdio::null())
            .status();
    }
    nofile_limits().0
}

/// Start nginx (2 workers) proxying everything to the generator.
pub fn start_nginx(bin: &Path, generator: SocketAddr, dir: &Path) -> Result<Target, String> {
    let port = free_port()?;
    let (_, hard) = nofile_limits();
    let d = dir.display();
    for sub in ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"] {
        let _ = std::fs::create_dir_all(dir.join(sub));
    }
    let user = if is_root() { "user root;\n" } else { "" };
    let conf = format!(
        r#"{user}daemon off;
master_process on;
worker_processes 2;
worker_rlimit_nofile {hard};
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{
    worker_connections {conns};
}}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_timeout 300s;
    keepalive_requests 1000000;
    upstream generator {{
        server {generator};
        keepalive 256;
        keepalive_requests 1000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://generator;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_cache off;
            proxy_read_timeout 1h;
            proxy_send_timeout 1h;
        }}
    }}
}}
"#,
        conns = hard.saturating_sub(100).clamp(1024, 65_536),
    );
    let conf_path = dir.join("nginx.conf");
    std::fs::write(&conf_path, conf).map_err(|e| e.to_string())?;
    let prefix = format!("{}/", dir.display());
    let error_log = dir.join("error.log");
    // `-e` (nginx ≥ 1.19.5) keeps nginx from opening its default error log before the config.
    let mut args: Vec<String> = vec![
        "-c".into(),
        conf_path.display().to_string(),
        "-p".into(),
        prefix,
        "-e".into(),
        error_log.display().to_string(),
    ];
    let test = Command::new(bin)
        .args(&args)
        .arg("-t")
        .output()
        .map_err(|e| e.to_string())?;
    if !test.status.success() {
        args.truncate(4);
        let retry = Command::new(bin)
            .args(&args)
            .arg("-t")
            .output()
            .map_err(|e| e.to_string())?;
        if !retry.status.success() {
            return Err(format!(
                "nginx -t failed: {}",
                String::from_utf8_lossy(&retry.stderr).trim()
            ));
        }
    }
    let child = Command::new(bin)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start nginx: {e}"))?;
    let master = child.id();
    register(Managed {
        name: "nginx",
        child,
        extra: Vec::new(),
        _stdin: None,
    });
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().map_err(|_| "addr")?;
    wait_listening(addr, Duration::from_secs(10))
        .map_err(|e| format!("{e} (see {})", error_log.display()))?;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut workers = measure::children_of(master);
    while workers.len() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        workers = measure::children_of(master);
    }
    {
        let mut children = CHILDREN.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = children.iter_mut().find(|m| m.name == "nginx") {
            m.extra = workers.clone();
        }
    }
    let mut pids = vec![master];
    pids.extend(workers);
    Ok(Target {
        kind: Kind::Nginx,
        addr,
        pids,
        redis: None,
    })
}

/// The bench identity: an issuer, a JWKS file and an `org:admin` token.
pub struct Identity {
    /// `iss`.
    pub issuer: String,
    /// The JWKS file.
    pub jwks_file: PathBuf,
    /// A Clerk v2 `org:admin` token valid for a day.
    pub token: Arc<str>,
}

/// Generate an ES256 key, write its JWKS under `dir`, mint a token.
pub fn identity(dir: &Path) -> Result<Identity, String> {
    use sluice::auth::testkeys;
    let issuer = "https://clerk.sluice-bench.local".to_string();
    let (key, jwk, kid) = testkeys::generate_ec()?;
    let jwks_file = dir.join("jwks.json");
    std::fs::write(&jwks_file, testkeys::jwks(&[jwk]).to_string()).map_err(|e| e.to_string())?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let claims = json!({
        "iss": issuer, "sub": "user_bench", "sid": "sess_bench",
        "iat": now, "nbf": now.saturating_sub(5), "exp": now + 24 * 3600,
        "azp": "http://localhost:3000", "v": 2, "sts": "active",
        "o": {"id": "org_bench", "rol": "admin", "slg": "bench"},
    });
    let token = testkeys::mint(&claims, &key, jsonwebtoken::Algorithm::ES256, Some(&kid))?;
    Ok(Identity {
        issuer,
        jwks_file,
        token: token.into(),
    })
}

/// The Sluice config used for the bench: the same for both stores but for `[store]`'s backend
/// (`redis`: the Redis server at that address, every other `[store.redis]` key at its default).
pub fn sluice_config(generator: SocketAddr, id: &Identity, redis: Option<SocketAddr>) -> String {
    let store = match redis {
        None => String::new(),
        Some(addr) => format!(
            "backend = \"redis\"\n\n[store.redis]\nurl = \"redis://{addr}\"\nkey_prefix = \"bench\"\n"
        ),
    };
    format!(
        r#"# Generated by tools/load (make bench-load).
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
threads = 2
grace_period = "1s"
graceful_shutdown_timeout = "1s"
max_connections = 60000

[auth]
mode = "jwt"
issuer = "{issuer}"
jwks_file = "{jwks}"

[upstream]
urls = ["http://{generator}"]
dialect = "agentflow"
idle_timeout = "15m"
run_timeout = "1h"

[limits]
max_events_per_run = 200000
max_bytes_per_run = 134217728
max_total_bytes = 8589934592

# One tenant drives the whole bench: its quotas are the gateway's.
[limits.per_org]
max_running_runs = 60000
max_bytes = 8589934592
max_streams = 60000
max_long_polls = 60000

[store]
retention = "1h"
{store}
[stream]
long_poll_max = "60s"
stuck_reader_timeout = "60s"
"#,
        issuer = id.issuer,
        jwks = id.jwks_file.display(),
    )
}

/// Start Sluice with the bench config, on the memory store or (`redis`) on the Redis store
/// (registered as `sluice` or `sluice-redis`); its stderr goes to `dir/sluice.log`.
pub fn start_sluice(
    bin: &Path,
    generator: SocketAddr,
    dir: &Path,
    id: &Identity,
    redis: Option<&Redis>,
) -> Result<Target, String> {
    let kind = if redis.is_some() {
        Kind::SluiceRedis
    } else {
        Kind::Sluice
    };
    let conf = dir.join("sluice.toml");
    std::fs::write(&conf, sluice_config(generator, id, redis.map(|r| r.addr)))
        .map_err(|e| e.to_string())?;
    let check = Command::new(bin)
        .args(["check", "--config"])
        .arg(&conf)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
    if !check.status.success() {
        return Err(format!(
            "`sluice check` refused the bench config: {}",
            String::from_utf8_lossy(&check.stderr).trim()
        ));
    }
    let log = std::fs::File::create(dir.join("sluice.log")).map_err(|e| e.to_string())?;
    let mut child = Command::new(bin)
        .args(["serve", "--config"])
        .arg(&conf)
        .env(
            "RUST_LOG",
            std::env::var("SLUICE_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
    let line = wait_for_line(&mut child, "sluice listening on", Duration::from_secs(30));
    let pid = child.id();
    register(Managed {
        name: kind.name(),
        child,
        extra: Vec::new(),
        _stdin: None,
    });
    let line = line.map_err(|e| format!("{e}; log: {}", tail(&dir.join("sluice.log"), 10)))?;
    let addr = addr_after(&line, "listening on ").ok_or(format!("bad line: {line}"))?;
    wait_listening(addr, Duration::from_secs(10))?;
    Ok(Target {
        kind,
        addr,
        pids: vec![pid],
        redis: redis.cloned(),
    })
}

/// The last `n` lines of a file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A line of `nginx -v`.
pub fn nginx_version(bin: &Path) -> String {
    Command::new(bin)
        .arg("-v")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_parse_and_name_each_other() {
        for k in [Kind::Direct, Kind::Nginx, Kind::Sluice, Kind::SluiceRedis] {
            assert_eq!(Kind::parse(k.name()), Some(k));
        }
        assert!(Kind::SluiceRedis.is_sluice() && Kind::Sluice.is_sluice());
        assert!(!Kind::Nginx.is_sluice());
    }

    #[test]
    fn the_redis_config_is_the_memory_one_plus_the_store() {
        let id = Identity {
            issuer: "https://issuer.test".into(),
            jwks_file: PathBuf::from("/tmp/jwks.json"),
            token: "t".into(),
        };
        let generator: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let redis: SocketAddr = "127.0.0.1:6399".parse().unwrap();
        let memory = sluice_config(generator, &id, None);
        let shared = sluice_config(generator, &id, Some(redis));
        let extra: Vec<&str> = {
            let kept: std::collections::HashSet<&str> = memory.lines().collect();
            shared.lines().filter(|l| !kept.contains(l)).collect()
        };
        assert_eq!(
            extra,
            [
                "backend = \"redis\"",
                "[store.redis]",
                "url = \"redis://127.0.0.1:6399\"",
                "key_prefix = \"bench\"",
            ]
        );
        assert!(memory.lines().all(|l| shared.contains(l)));
        let parsed: toml::Value = toml::from_str(&shared).unwrap();
        assert_eq!(parsed["store"]["backend"].as_str(), Some("redis"));
        assert_eq!(parsed["store"]["retention"].as_str(), Some("1h"));
    }
}
