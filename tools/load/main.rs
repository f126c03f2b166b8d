//! `load`: the whole-gateway load harness (`make bench-load`, docs/bench-load.md).
//!
//! One process tree on 127.0.0.1: this harness starts the generator backend (itself, re-executed
//! as `load generator`), nginx and Sluice in front of it (Sluice on the memory store, and, when
//! asked for, a second Sluice on the Redis store with a `redis-server` of its own), drives the
//! same raw HTTP/1.1 client at the generator directly, at nginx and at each Sluice, scenario by
//! scenario, and prints a markdown
//! report (also written to `target/bench-load/report.md`). Every child is stopped by PID at the
//! end, on error and on Ctrl-C.
//!
//! Modules: `generator` (the backend), `client` (HTTP/1.1 + SSE client), `targets` (processes),
//! `measure` (histograms, /proc CPU and RSS), `scenarios` (the loads), `report` (tables, targets).

mod client;
mod generator;
mod measure;
mod report;
mod scenarios;
mod targets;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::Duration;

use clap::{Parser, Subcommand};

use report::{Meta, Record};
use scenarios::{Ctx, Row, StreamLoad};
use targets::{Kind, Target};

/// Whole-gateway load harness: a generator backend, directly, behind nginx and behind Sluice.
#[derive(Debug, Parser)]
#[command(name = "load")]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// The sluice binary (env SLUICE_BIN; default target/release/sluice).
    #[arg(long)]
    sluice: Option<PathBuf>,
    /// Seconds of events per stream in scenarios 1–4; other windows scale with it (env
    /// DURATION; default 10).
    #[arg(long)]
    duration: Option<f64>,
    /// Events per second per stream in scenarios 1–4, instead of each scenario's own (50, 50,
    /// 20, 50) (env RATE).
    #[arg(long)]
    rate: Option<u64>,
    /// Repetitions; the report shows medians (env REPS; default 1).
    #[arg(long)]
    reps: Option<usize>,
    /// Targets to run, e.g. `sluice` or `nginx,sluice`; `sluice-redis` adds Sluice on the Redis
    /// store (env ONLY; default direct,nginx,sluice).
    #[arg(long)]
    only: Option<String>,
    /// Scenarios to run, e.g. `1,5` or `1-4` (env SCENARIOS; default 1-8).
    #[arg(long)]
    scenarios: Option<String>,
    /// Where to write the report (results.json goes beside it).
    #[arg(long, default_value = "target/bench-load/report.md")]
    out: PathBuf,
    /// Never install nginx or redis-server (env NO_INSTALL=1).
    #[arg(long)]
    no_install: bool,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the generator backend.
    Generator {
        /// Listen address (port 0 picks one, announced on stdout).
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
        /// Exit when stdin closes (the harness is gone).
        #[arg(long)]
        watch_stdin: bool,
    },
}

/// Settings after flags and environment.
struct Settings {
    sluice: PathBuf,
    duration: f64,
    rate: Option<u64>,
    reps: usize,
    only: Vec<Kind>,
    scenarios: Vec<u8>,
    out: PathBuf,
    install: bool,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn parse_scenarios(s: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let (a, b): (u8, u8) = (
            a.trim()
                .parse()
                .map_err(|_| format!("bad scenario `{part}`"))?,
            b.trim()
                .parse()
                .map_err(|_| format!("bad scenario `{part}`"))?,
        );
        if a < 1 || b > 8 || a > b {
            return Err(format!("scenarios are 1 to 8, not `{part}`"));
        }
        out.extend(a..=b);
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

fn settings(cli: &Cli) -> Result<Settings, String> {
    let sluice = cli
        .sluice
        .clone()
        .or_else(|| env("SLUICE_BIN").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("target/release/sluice"));
    let duration = match cli.duration {
        Some(d) => d,
        None => env("DURATION")
            .map(|d| d.parse::<f64>().map_err(|_| format!("DURATION: `{d}`")))
            .transpose()?
            .unwrap_or(10.0),
    };
    if !(duration.is_finite() && (0.5..=3600.0).contains(&duration)) {
        return Err("DURATION must be between 0.5 and 3600 seconds".into());
    }
    let rate = match cli.rate {
        Some(r) => Some(r),
        None => env("RATE")
            .map(|r| r.parse::<u64>().map_err(|_| format!("RATE: `{r}`")))
            .transpose()?,
    };
    if rate.is_some_and(|r| !(1..=10_000).contains(&r)) {
        return Err("RATE must be between 1 and 10000 events per second".into());
    }
    let reps = match cli.reps {
        Some(r) => r,
        None => env("REPS")
            .map(|r| r.parse::<usize>().map_err(|_| format!("REPS: `{r}`")))
            .transpose()?
            .unwrap_or(1),
    }
    .clamp(1, 20);
    let only = cli
        .only
        .clone()
        .or_else(|| env("ONLY"))
        .unwrap_or_else(|| "direct,nginx,sluice".into());
    let mut kinds = Vec::new();
    for name in only.split(',').filter(|n| !n.trim().is_empty()) {
        kinds.push(Kind::parse(name).ok_or(format!("ONLY: unknown target `{name}`"))?);
    }
    kinds.sort_unstable();
    kinds.dedup();
    let scenarios = parse_scenarios(
        &cli.scenarios
            .clone()
            .or_else(|| env("SCENARIOS"))
            .unwrap_or_else(|| "1-8".into()),
    )?;
    Ok(Settings {
        sluice,
        duration,
        rate,
        reps,
        only: kinds,
        scenarios,
        out: cli.out.clone(),
        install: !cli.no_install && env("NO_INSTALL").is_none_or(|v| v == "0"),
    })
}

/// Stops every child when dropped (normal end, error, panic in `main`).
struct CleanupGuard;

impl Drop for CleanupGuard {
    fn drop(&mut self) {
        targets::cleanup();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Cmd::Generator {
        listen,
        watch_stdin,
    }) = &cli.cmd
    {
        let rt = match tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("generator: {e}");
                return ExitCode::FAILURE;
            }
        };
        return match rt.block_on(generator::serve(listen, *watch_stdin)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("generator: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let settings = match settings(&cli) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("load: {e}");
            return ExitCode::from(2);
        }
    };
    let _guard = CleanupGuard;
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("load: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        tokio::spawn(async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            let terminated = async {
                match term.as_mut() {
                    Some(t) => {
                        t.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminated => {}
            }
            eprintln!("load: interrupted; stopping the processes it started");
            targets::cleanup();
            std::process::exit(130);
        });
        harness(settings).await
    });
    rt.shutdown_timeout(Duration::from_secs(2));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("load: {e}");
            ExitCode::FAILURE
        }
    }
}

fn progress(msg: &str) {
    eprintln!("load: {msg}");
}

/// The processes and what is needed to restart them.
struct Procs {
    generator: targets::Generator,
    nginx_bin: Option<PathBuf>,
    sluice_bin: PathBuf,
    redis: Option<targets::Redis>,
    identity: Option<targets::Identity>,
    dir: targets::TempDir,
    targets: Vec<Target>,
    restarts: u32,
}

impl Procs {
    fn target(&self, kind: Kind) -> Option<&Target> {
        self.targets.iter().find(|t| t.kind == kind)
    }

    /// Replace a target's process with a fresh one (memory is measured on fresh processes).
    fn restart(&mut self, kind: Kind) -> Result<(), String> {
        self.restarts += 1;
        let sub = self
            .dir
            .0
            .join(format!("{}-{}", kind.name(), self.restarts));
        std::fs::create_dir_all(&sub).map_err(|e| e.to_string())?;
        targets::stop(kind.name());
        let fresh = match kind {
            Kind::Direct => return Ok(()),
            Kind::Nginx => targets::start_nginx(
                self.nginx_bin.as_ref().ok_or("no nginx")?,
                self.generator.addr,
                &sub,
            )?,
            Kind::Sluice => targets::start_sluice(
                &self.sluice_bin,
                self.generator.addr,
                &sub,
                self.identity.as_ref().ok_or("no identity")?,
                None,
            )?,
            // The Redis server stays (and keeps the runs made so far).
            Kind::SluiceRedis => targets::start_sluice(
                &self.sluice_bin,
                self.generator.addr,
                &sub,
                self.identity.as_ref().ok_or("no identity")?,
                Some(self.redis.as_ref().ok_or("no redis-server")?),
            )?,
        };
        for t in &mut self.targets {
            if t.kind == kind {
                *t = fresh.clone();
            }
        }
        Ok(())
    }
}

fn machine_lines() -> Vec<String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown".to_string(), |(_, v)| v.trim().to_string());
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or("?".into(), |kb| format!("{:.1} GiB", kb / 1024.0 / 1024.0));
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    vec![format!(
        "machine: {nproc} CPUs (nproc), {model}, {mem} RAM, Linux {kernel}"
    )]
}

fn git_line() -> Option<String> {
    let rev = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    let dirty = std::process::Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .ok()
        .is_some_and(|o| !o.stdout.is_empty());
    Some(format!(
        "sluice source: git {}{}",
        String::from_utf8_lossy(&rev.stdout).trim(),
        if dirty { " with local changes" } else { "" }
    ))
}

/// Scenarios 1–4: streams and events per second per stream (`rate` overrides the latter).
fn streams_and_rate(s: u8, rate: Option<u64>) -> (usize, u64) {
    let (streams, own) = match s {
        1 => (100, 50),
        2 => (1000, 50),
        3 => (5000, 20),
        _ => (1000, 50),
    };
    (streams, rate.unwrap_or(own))
}

fn stream_load(
    s: u8,
    duration: f64,
    rate: Option<u64>,
    max_conns: usize,
    notes: &mut Vec<String>,
) -> StreamLoad {
    let (streams, rate) = streams_and_rate(s, rate);
    let events = ((rate as f64 * duration).round() as u64).max(4);
    let reconnect_every = if s == 4 {
        100.min(events / 4).max(1)
    } else {
        0
    };
    let capped = streams.min(max_conns);
    if capped < streams {
        notes.push(format!(
            "scenario {s}: {capped} streams instead of {streams} (RLIMIT_NOFILE too low; run with `ulimit -n 65536`)"
        ));
    }
    StreamLoad {
        streams: capped,
        rate,
        events,
        reconnect_every,
    }
}

fn describe_all(duration: f64, rate: Option<u64>) -> BTreeMap<u8, String> {
    let ev = |rate: u64| ((rate as f64 * duration).round() as u64).max(4);
    let r = |s: u8| streams_and_rate(s, rate).1;
    let every = 100.min(ev(r(4)) / 4).max(1);
    let mut d = BTreeMap::new();
    d.insert(
        1,
        format!(
            "100 streams × {} ev/s, {} events each (started over 1 s)",
            r(1),
            ev(r(1))
        ),
    );
    d.insert(
        2,
        format!("1,000 streams × {} ev/s, {} events each", r(2), ev(r(2))),
    );
    d.insert(
        3,
        format!("5,000 streams × {} ev/s, {} events each", r(3), ev(r(3))),
    );
    d.insert(
        4,
        format!(
            "1,000 streams × {} ev/s, {} events each, reconnecting with `Last-Event-ID` every {every} events",
            r(4),
            ev(r(4))
        ),
    );
    d.insert(
        5,
        format!(
            "{:.0} s per row; Sluice: a finished 20-event run, a 100,000-event run with the same \
             answer (start, 18 text deltas, end; 99,980 `tool_progress` events of a nested call \
             between the 9th and 10th delta, not kept in the snapshot), and a 100,000-event run \
             of text deltas (a 400 KB answer)",
            (duration / 2.0).max(1.0)
        ),
    );
    d.insert(6, format!("2,000 clients, {:.0} s", duration.max(3.0)));
    d.insert(7, "50 tries each, on finished runs".into());
    d.insert(
        8,
        "1,000 quiet streams, then 2,000 held `wait=30` polls, on freshly started targets".into(),
    );
    d
}

async fn settle() {
    tokio::time::sleep(Duration::from_secs(2)).await;
}

fn summary(row: &Row) -> String {
    let mut parts: Vec<String> = row
        .m
        .iter()
        .filter(|(k, _)| {
            matches!(
                **k,
                "ev_per_s"
                    | "p50_us"
                    | "p99_us"
                    | "cpu_us_per_ev"
                    | "gaps"
                    | "dups"
                    | "unclean"
                    | "req_per_s"
                    | "cpu_us_per_req"
                    | "polls_per_s"
                    | "target_cpu_pct"
                    | "median_ms"
                    | "kib_per_quiet"
                    | "kib_per_poll"
            )
        })
        .map(|(k, v)| format!("{k}={v:.1}"))
        .collect();
    parts.extend(row.notes.iter().cloned());
    format!("{}: {}", row.label, parts.join(" "))
}

async fn harness(s: Settings) -> Result<(), String> {
    let started_at = std::time::SystemTime::now();
    let mut notes: Vec<String> = Vec::new();
    let nofile = targets::raise_nofile();
    let max_conns = (nofile as usize).saturating_sub(300).max(100);
    if nofile < 12_000 {
        notes.push(format!(
            "RLIMIT_NOFILE is {nofile}: scenarios with many connections may be capped"
        ));
    }
    let dir = targets::TempDir::new("run")?;
    progress(&format!("temp dir {}", dir.0.display()));
    let generator = targets::start_generator()?;
    progress(&format!(
        "generator on {} (pid {})",
        generator.addr, generator.pid
    ));
    let mut tlist: Vec<Target> = Vec::new();
    if s.only.contains(&Kind::Direct) {
        tlist.push(Target {
            kind: Kind::Direct,
            addr: generator.addr,
            pids: Vec::new(),
            redis: None,
        });
    }
    let mut nginx_bin = None;
    let mut settings_lines = vec![
        format!(
            "settings: DURATION={} s,{} REPS={}, targets {}, scenarios {}",
            s.duration,
            s.rate
                .map_or(String::new(), |r| format!(" RATE={r} ev/s per stream (scenarios 1–4),")),
            s.reps,
            s.only.iter().map(|k| k.name()).collect::<Vec<_>>().join(","),
            s.scenarios
                .iter()
                .map(u8::to_string)
                .collect::<Vec<_>>()
                .join(",")
        ),
        format!("RLIMIT_NOFILE {nofile}; every process on 127.0.0.1; one generator process (tokio, all cores) shared by all targets"),
    ];
    if s.only.contains(&Kind::Nginx) {
        match targets::find_or_install_nginx(s.install) {
            Ok(bin) => {
                let sub = dir.0.join("nginx-0");
                std::fs::create_dir_all(&sub).map_err(|e| e.to_string())?;
                match targets::start_nginx(&bin, generator.addr, &sub) {
                    Ok(t) => {
                        progress(&format!("nginx on {} (pids {:?})", t.addr, t.pids));
                        settings_lines.push(format!(
                            "nginx: {} ({}), 2 workers, upstream keepalive 256, proxy_buffering off",
                            targets::nginx_version(&bin),
                            bin.display()
                        ));
                        tlist.push(t);
                        nginx_bin = Some(bin);
                    }
                    Err(e) => {
                        let msg = format!("nginx skipped: {e}");
                        progress(&msg);
                        notes.push(msg);
                    }
                }
            }
            Err(e) => {
                let msg = format!("nginx skipped: {e}");
                progress(&msg);
                notes.push(msg);
            }
        }
    }
    let mut identity = None;
    let mut redis = None;
    if s.only.iter().any(|k| k.is_sluice()) {
        if !s.sluice.is_file() {
            return Err(format!(
                "{} not found: build it (cargo build --release --bin sluice) or pass --sluice",
                s.sluice.display()
            ));
        }
        identity = Some(targets::identity(&dir.0)?);
    }
    if let (true, Some(id)) = (s.only.contains(&Kind::Sluice), &identity) {
        let sub = dir.0.join("sluice-0");
        std::fs::create_dir_all(&sub).map_err(|e| e.to_string())?;
        let t = targets::start_sluice(&s.sluice, generator.addr, &sub, id, None)?;
        progress(&format!("sluice on {} (pid {:?})", t.addr, t.pids));
        settings_lines.push(format!(
            "sluice: {} (`serve`, [server] threads = 2, JWT auth (ES256, JWKS file), memory store, RUST_LOG={})",
            s.sluice.display(),
            env("SLUICE_LOG").unwrap_or_else(|| "warn".into())
        ));
        tlist.push(t);
    }
    if let (true, Some(id)) = (s.only.contains(&Kind::SluiceRedis), &identity) {
        let started = targets::find_or_install_redis(s.install).and_then(|bin| {
            let sub = dir.0.join("redis");
            std::fs::create_dir_all(&sub).map_err(|e| e.to_string())?;
            let r = targets::start_redis(&bin, &sub)?;
            progress(&format!("redis-server on {} (pid {})", r.addr, r.pid));
            let sub = dir.0.join("sluice-redis-0");
            std::fs::create_dir_all(&sub).map_err(|e| e.to_string())?;
            let t = targets::start_sluice(&s.sluice, generator.addr, &sub, id, Some(&r))?;
            Ok((bin, r, t))
        });
        match started {
            Ok((bin, r, t)) => {
                progress(&format!("sluice-redis on {} (pid {:?})", t.addr, t.pids));
                settings_lines.push(format!(
                    "sluice-redis: the same Sluice and config (auth, quotas, max_connections, threads) but \
                     `[store] backend = \"redis\"` (every other `[store.redis]` key at its default) \
                     on {} ({}, pid {}, `--save '' --appendonly no`, started by the harness); \
                     its CPU is Sluice's, Redis's is reported in the Redis columns",
                    r.version,
                    bin.display(),
                    r.pid
                ));
                tlist.push(t);
                redis = Some(r);
            }
            Err(e) => {
                let msg = format!("sluice-redis skipped: {e}");
                progress(&msg);
                notes.push(msg);
            }
        }
    }
    settings_lines.extend(git_line());
    let token = match &identity {
        Some(id) => id.token.clone(),
        None => targets::identity(&dir.0)?.token,
    };
    let mut procs = Procs {
        generator,
        nginx_bin,
        sluice_bin: s.sluice.clone(),
        redis,
        identity,
        dir,
        targets: tlist,
        restarts: 0,
    };
    for t in procs.targets.iter().filter(|t| t.kind.is_sluice()) {
        check_auth(t, &token).await?;
    }
    let ctx = Ctx {
        generator: (procs.generator.addr, procs.generator.pid),
        token,
        duration: s.duration,
        finished: Mutex::new(HashMap::new()),
        snapshot_bytes: Mutex::new(None),
    };
    let first_sluice = procs
        .target(Kind::Sluice)
        .or(procs.target(Kind::SluiceRedis));
    if let Some(t) = first_sluice {
        match scenarios::measure_snapshot_bytes(&ctx, t).await {
            Ok(n) => *ctx.snapshot_bytes.lock().unwrap_or_else(|p| p.into_inner()) = Some(n),
            Err(e) => notes.push(format!("could not measure Sluice's snapshot size: {e}")),
        }
    }
    let bytes = *ctx.snapshot_bytes.lock().unwrap_or_else(|p| p.into_inner());
    let note = match bytes {
        Some(n) => format!(
            "scenarios 5, 6, 8: nginx and direct serve the generator's canned {n}-byte \
             snapshot (the size of Sluice's for a finished 20-event run)"
        ),
        None => format!(
            "scenarios 5, 6, 8: nginx and direct serve the generator's canned {}-byte \
             snapshot (default size: Sluice's was not measured)",
            generator::DEFAULT_SNAPSHOT_BYTES
        ),
    };
    if procs.targets.iter().any(|t| !t.kind.is_sluice()) {
        notes.push(note);
    }
    let mut records: Vec<Record> = Vec::new();
    let mut used = false;
    for &sc in &s.scenarios {
        for rep in 0..s.reps {
            progress(&format!("scenario {sc}, repetition {}/{}", rep + 1, s.reps));
            let rows = scenario(&ctx, &mut procs, sc, &s, max_conns, &mut notes, used).await;
            used = true;
            for row in rows {
                progress(&format!("  {}", summary(&row)));
                records.push(Record {
                    scenario: sc,
                    rep,
                    row,
                });
            }
        }
    }
    // Each Sluice's own complaints during the run (its logs are in `<name>-<n>/sluice.log`).
    for kind in [Kind::Sluice, Kind::SluiceRedis] {
        if procs.target(kind).is_some() {
            notes.extend(log_note(&procs.dir.0, kind));
        }
    }
    // Stop the processes before writing the report (the temp dir goes with them).
    targets::cleanup();
    let args: Vec<String> = std::env::args().collect();
    let env_part: Vec<String> = ["DURATION", "RATE", "REPS", "ONLY", "SCENARIOS"]
        .iter()
        .filter_map(|k| env(k).map(|v| format!("{k}={v}")))
        .collect();
    let mut command = env_part.join(" ");
    if !command.is_empty() {
        command.push(' ');
    }
    command.push_str(&args.join(" "));
    let took = started_at.elapsed().map_or(0.0, |d| d.as_secs_f64());
    notes.push(format!("the run took {took:.0} s"));
    let meta = Meta {
        command,
        date: humantime::format_rfc3339_seconds(started_at).to_string(),
        machine: machine_lines(),
        settings: settings_lines,
        desc: describe_all(s.duration, s.rate),
        notes,
    };
    let (md, json) = report::render(&meta, &records, &s.scenarios);
    println!("{md}");
    if let Some(parent) = s.out.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    std::fs::write(&s.out, &md).map_err(|e| format!("{}: {e}", s.out.display()))?;
    let json_path = s.out.with_file_name("results.json");
    let _ = std::fs::write(
        &json_path,
        serde_json::to_string_pretty(&json).unwrap_or_default(),
    );
    progress(&format!(
        "report written to {} (and {})",
        s.out.display(),
        json_path.display()
    ));
    Ok(())
}

/// What a Sluice of `kind` logged (its `sluice.log` files under `dir`): the line count, the
/// distinct messages with their counts (timestamps set aside), the first lines.
fn log_note(dir: &std::path::Path, kind: Kind) -> Option<String> {
    let mut lines = 0u64;
    let mut first = Vec::new();
    let mut kinds: BTreeMap<String, u64> = BTreeMap::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(n) = name
            .strip_prefix(kind.name())
            .and_then(|r| r.strip_prefix('-'))
        else {
            continue;
        };
        if n.parse::<u32>().is_err() {
            continue;
        }
        let text = std::fs::read_to_string(entry.path().join("sluice.log")).unwrap_or_default();
        for line in text.lines() {
            lines += 1;
            if first.len() < 5 {
                first.push(line.chars().take(300).collect::<String>());
            }
            *kinds.entry(log_message(line)).or_default() += 1;
        }
    }
    if lines == 0 {
        return None;
    }
    let mut by: Vec<(String, u64)> = kinds.into_iter().collect();
    by.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let distinct: Vec<String> = by
        .iter()
        .take(8)
        .map(|(m, n)| format!("{n}× `{m}`"))
        .collect();
    Some(format!(
        "{}'s log ({} level and above): {lines} line(s); by message: {}; first: {}",
        kind.name(),
        env("SLUICE_LOG").unwrap_or_else(|| "warn".into()),
        distinct.join(", "),
        first.join(" / ")
    ))
}

/// A log line without its timestamp, ids and numbers (to count lines by message).
fn log_message(line: &str) -> String {
    // tracing's default format: `<timestamp>  LEVEL target: message fields`.
    let rest = line
        .split_once(' ')
        .filter(|(ts, _)| ts.contains('T') && ts.chars().next().is_some_and(|c| c.is_ascii_digit()))
        .map_or(line, |(_, r)| r)
        .trim();
    let mut out = String::new();
    let mut last_digit = false;
    for c in rest.chars().take(160) {
        if c.is_ascii_hexdigit() && (c.is_ascii_digit() || last_digit) {
            if !last_digit {
                out.push('#');
            }
            last_digit = true;
        } else {
            last_digit = false;
            out.push(c);
        }
    }
    out.replace('`', "'")
}

/// A request with the bench token reaches Sluice's routes (404 for a missing thread, not 401).
async fn check_auth(t: &Target, token: &str) -> Result<(), String> {
    let req = client::request(
        "GET",
        "/api/getConversation?threadId=does-not-exist",
        &t.addr.to_string(),
        Some(token),
        &[],
        b"",
    );
    let mut conn = client::Conn::connect(t.addr, Duration::from_secs(10))
        .await
        .map_err(|e| e.to_string())?;
    conn.send(&req).await.map_err(|e| e.to_string())?;
    let head = conn.read_head().await.map_err(|e| e.to_string())?;
    match head.status {
        404 => Ok(()),
        s => Err(format!(
            "sluice answered {s} to an authenticated request for a missing thread (expected 404): \
             the bench's JWT setup is wrong"
        )),
    }
}

/// Whether Sluice (either) is still alive (a crash is reported, and its rows skipped).
fn alive(t: &Target, notes: &mut Vec<String>) -> bool {
    if !t.kind.is_sluice() || targets::running(t.kind.name()) {
        return true;
    }
    let msg = format!(
        "{} exited during the run: its remaining rows are skipped",
        t.kind.name()
    );
    if !notes.contains(&msg) {
        notes.push(msg);
    }
    false
}

async fn scenario(
    ctx: &Ctx,
    procs: &mut Procs,
    sc: u8,
    s: &Settings,
    max_conns: usize,
    notes: &mut Vec<String>,
    used: bool,
) -> Vec<Row> {
    let mut rows = Vec::new();
    match sc {
        1..=4 => {
            let load = stream_load(sc, s.duration, s.rate, max_conns, notes);
            let mut direct: Option<(f64, f64)> = None;
            for t in procs.targets.clone() {
                if !alive(&t, notes) {
                    continue;
                }
                let mut row = scenarios::streams(ctx, &t, load).await;
                let p = (row.m.get("p50_us").copied(), row.m.get("p99_us").copied());
                if t.kind == Kind::Direct {
                    if let (Some(a), Some(b)) = p {
                        direct = Some((a, b));
                    }
                } else if let (Some((d50, d99)), (Some(a), Some(b))) = (direct, p) {
                    row.m.insert("added_p50_us", a - d50);
                    row.m.insert("added_p99_us", b - d99);
                }
                rows.push(row);
                settle().await;
            }
        }
        5 => {
            let sluices: Vec<Target> = procs
                .targets
                .iter()
                .filter(|t| t.kind.is_sluice())
                .cloned()
                .collect();
            for t in &sluices {
                // The runs are made now, outside any measurement.
                for (run, _) in scenarios::SNAPSHOT_ROWS {
                    if let Err(e) = scenarios::cached_run(ctx, t, run).await {
                        notes.push(format!("{}: {e}", t.kind.name()));
                    }
                }
                settle().await;
            }
            for t in procs.targets.clone() {
                if !alive(&t, notes) {
                    continue;
                }
                rows.extend(scenarios::snapshots(ctx, &t).await);
                settle().await;
            }
        }
        6 => {
            for t in procs.targets.clone() {
                if !alive(&t, notes) {
                    continue;
                }
                rows.push(scenarios::long_polls(ctx, &t, 2000.min(max_conns)).await);
                settle().await;
            }
        }
        7 => {
            for kind in [Kind::Sluice, Kind::SluiceRedis] {
                if let Some(t) = procs.target(kind).cloned() {
                    if alive(&t, notes) {
                        rows.extend(scenarios::resumes(ctx, &t, 50).await);
                    }
                }
            }
        }
        _ => {
            for kind in [Kind::Nginx, Kind::Sluice, Kind::SluiceRedis] {
                if procs.target(kind).is_none() {
                    continue;
                }
                if used {
                    if let Err(e) = procs.restart(kind) {
                        notes.push(format!("could not restart {}: {e}", kind.name()));
                        procs.targets.retain(|t| t.kind != kind);
                        continue;
                    }
                    if kind.is_sluice() {
                        // The fresh process has none of the old threads (the memory store), or
                        // they are best made afresh (the Redis store keeps them).
                        ctx.finished
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .retain(|(k, _), _| *k != kind);
                    }
                }
                let Some(t) = procs.target(kind).cloned() else {
                    continue;
                };
                if kind.is_sluice() {
                    // The finished thread polled below, made before the idle measurement.
                    if let Err(e) = scenarios::cached_run(ctx, &t, scenarios::Finished::SHORT).await
                    {
                        notes.push(e);
                    }
                }
                settle().await;
                let quiet = 1000.min(max_conns / 2);
                let polls = 2000.min(max_conns / 2);
                rows.push(scenarios::memory(ctx, &t, quiet, polls).await);
                settle().await;
            }
        }
    }
    rows
}
