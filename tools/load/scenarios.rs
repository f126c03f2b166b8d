//! The scenarios: what load each applies to a target and which figures it measures. Each run
//! of a scenario against one target returns [`Row`]s of named metrics; `main` repeats them and
//! `report` aggregates (medians) and renders them.
//!
//! 1–4 streamed runs (`POST /agents/{id}/run`), 5 snapshots, 6 long-polls, 7 resume near the end
//! of a finished run (Sluice only), 8 memory per quiet stream and per held long-poll.

use std::collections::{BTreeMap, HashMap};
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;

use crate::client::{request, run_stream, BodyEnd, Conn, Sse, SseEvent, StreamSpec};
use crate::measure::{self, quantile_of, CpuSpan, Histogram, RssSampler};
use crate::targets::{Kind, Target};

/// Named figures of one measurement.
pub type Metrics = BTreeMap<&'static str, f64>;

/// One row of a scenario's table, from one repetition.
#[derive(Debug, Clone)]
pub struct Row {
    /// The row's label (`direct`, `nginx`, `sluice`, `sluice 100k`, …).
    pub label: String,
    /// Its figures.
    pub m: Metrics,
    /// Anything worth saying (errors by kind, skipped parts).
    pub notes: Vec<String>,
}

impl Row {
    fn new(label: impl Into<String>) -> Row {
        Row {
            label: label.into(),
            m: Metrics::new(),
            notes: Vec::new(),
        }
    }
}

/// What every scenario needs.
pub struct Ctx {
    /// The generator's address and PID.
    pub generator: (std::net::SocketAddr, u32),
    /// The token clients send (to every target, so requests are identical).
    pub token: Arc<str>,
    /// `DURATION`: seconds of events per stream; other windows scale with it.
    pub duration: f64,
    /// Each Sluice's (memory store, Redis store) finished threads by the run they hold: (thread
    /// id, last seq).
    pub finished: Mutex<HashMap<(Kind, Finished), (String, u64)>>,
    /// Sluice's answer size for a finished 20-event run (set once measured).
    pub snapshot_bytes: Mutex<Option<usize>>,
}

const RUN_PATH: &str = "/agents/bench/run";
const SPREAD: Duration = Duration::from_secs(1);

/// A finished run streamed through Sluice (rate 0) and kept for scenarios 5–8.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Finished {
    /// Events in the run (ids 1..=events).
    pub events: u64,
    /// `filler=progress`: the run answers what a 20-event run answers (start, 18 text deltas,
    /// end); the other events are `tool_progress` of a nested call, between the 9th and the
    /// 10th delta, which the snapshot does not keep. Otherwise every event but the first and
    /// the last is a text delta.
    pub progress_filler: bool,
}

impl Finished {
    /// The 20-event run.
    pub const SHORT: Finished = Finished {
        events: 20,
        progress_filler: false,
    };
    /// 100,000 events with the 20-event run's answer.
    pub const LONG_SAME_ANSWER: Finished = Finished {
        events: 100_000,
        progress_filler: true,
    };
    /// 100,000 events, all text deltas (a 400 KB answer).
    pub const LONG_TEXT: Finished = Finished {
        events: 100_000,
        progress_filler: false,
    };

    fn message(self) -> String {
        let filler = if self.progress_filler {
            " filler=progress"
        } else {
            ""
        };
        format!("gen events={} rate=0{filler}", self.events)
    }
}

fn run_body(message: &str) -> Arc<[u8]> {
    let id = uuid::Uuid::new_v4();
    serde_json::json!({
        "message": message,
        "message_id": format!("m-{id}"),
        "conversation_id": format!("c-{id}"),
        "stream": true,
    })
    .to_string()
    .into_bytes()
    .into()
}

fn own_pid() -> u32 {
    std::process::id()
}

fn count_notes(kinds: &BTreeMap<String, u64>, what: &str) -> Option<String> {
    if kinds.is_empty() {
        return None;
    }
    let parts: Vec<String> = kinds.iter().map(|(k, n)| format!("{n}× {k}")).collect();
    Some(format!("{what}: {}", parts.join(", ")))
}

/// Scenarios 1–4: `streams` clients each stream a run of `events` events at `rate`/s.
#[derive(Clone, Copy, Debug)]
pub struct StreamLoad {
    /// Concurrent streams.
    pub streams: usize,
    /// Events per second per stream.
    pub rate: u64,
    /// Events per run (ids 1..=events).
    pub events: u64,
    /// Reconnect after this many events per connection (0: never).
    pub reconnect_every: u64,
}

/// What a target's Redis server did over a measurement window: its CPU, its peak RSS and its
/// command counters.
struct RedisSpan {
    cpu: CpuSpan,
    rss: RssSampler,
    idle_rss: u64,
    addr: std::net::SocketAddr,
    cmds: BTreeMap<String, (u64, u64)>,
}

impl RedisSpan {
    /// Start measuring `t`'s Redis server (`None` without one).
    fn start(t: &Target) -> Option<RedisSpan> {
        let r = t.redis.as_ref()?;
        Some(RedisSpan {
            cpu: CpuSpan::start(&[r.pid]),
            rss: RssSampler::start(vec![r.pid], Duration::from_millis(100)),
            idle_rss: measure::rss_kib(r.pid).unwrap_or(0),
            addr: r.addr,
            cmds: crate::targets::redis_commandstats(r.addr),
        })
    }

    /// Stop and put the figures in `row`: Redis CPU per `unit` (`per` of them, when the key is
    /// given), Redis CPU % of a core, peak RSS, and the main commands per unit as a note.
    fn finish(self, row: &mut Row, per: Option<(&'static str, u64)>, unit: &str) {
        let (us, secs) = self.cpu.read();
        let peak = self.rss.finish();
        let after = crate::targets::redis_commandstats(self.addr);
        row.m
            .insert("redis_cpu_pct", us as f64 / 1e4 / secs.max(1e-9));
        row.m.insert("redis_peak_rss_mb", peak as f64 / 1024.0);
        row.m.insert(
            "redis_rss_growth_mb",
            peak.saturating_sub(self.idle_rss) as f64 / 1024.0,
        );
        let Some((key, n)) = per.filter(|(_, n)| *n > 0) else {
            return;
        };
        row.m.insert(key, us as f64 / n as f64);
        let mut calls: Vec<(String, u64, u64)> = after
            .iter()
            .map(|(k, (c, us))| {
                let (c0, us0) = self.cmds.get(k).copied().unwrap_or((0, 0));
                (k.clone(), c.saturating_sub(c0), us.saturating_sub(us0))
            })
            .filter(|(k, c, _)| *c > 0 && k != "info")
            .collect();
        calls.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        if !calls.is_empty() {
            let parts: Vec<String> = calls
                .iter()
                .take(8)
                .map(|(k, c, us)| {
                    format!(
                        "{k} {:.3} ({:.1} µs each)",
                        *c as f64 / n as f64,
                        *us as f64 / *c as f64
                    )
                })
                .collect();
            row.notes.push(format!(
                "{}: Redis commands per {unit}, with Redis's own time per call (a script's inner \
                 calls are counted in their own lines and again in the script's): {}",
                row.label,
                parts.join(", ")
            ));
        }
    }
}

/// Run one streaming load against `t`.
pub async fn streams(ctx: &Ctx, t: &Target, load: StreamLoad) -> Row {
    let hist = Arc::new(Histogram::new());
    let idle_rss = measure::rss_kib_all(&t.pids);
    let sampler = RssSampler::start(t.pids.clone(), Duration::from_millis(100));
    let redis = RedisSpan::start(t);
    let cpu_target = CpuSpan::start(&t.pids);
    let threads_before = measure::thread_ticks(&t.pids);
    let cpu_gen = CpuSpan::start(&[ctx.generator.1]);
    let cpu_me = CpuSpan::start(&[own_pid()]);
    let t0 = Instant::now();
    let path: Arc<str> = RUN_PATH.into();
    let message = format!("gen events={} rate={}", load.events, load.rate);
    let mut set = JoinSet::new();
    for i in 0..load.streams {
        let at = t0 + SPREAD.mul_f64(i as f64 / load.streams as f64);
        let spec = StreamSpec {
            addr: t.addr,
            path: path.clone(),
            auth: Some(ctx.token.clone()),
            body: run_body(&message),
            expected: load.events,
            reconnect_every: load.reconnect_every,
            idle: Duration::from_secs(60),
        };
        let hist = hist.clone();
        set.spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            run_stream(&spec, Some(&hist)).await
        });
    }
    let run_secs = load.events as f64 / load.rate.max(1) as f64;
    let deadline = t0 + SPREAD + Duration::from_secs_f64(run_secs) + Duration::from_secs(60);
    let (mut delivered, mut gaps, mut dups, mut no_id, mut unclean, mut reconnects) =
        (0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut done = 0usize;
    while done < load.streams {
        match tokio::time::timeout_at(deadline.into(), set.join_next()).await {
            Ok(Some(Ok(o))) => {
                done += 1;
                delivered += o.events;
                gaps += o.gaps;
                dups += o.dups;
                no_id += o.no_id;
                reconnects += o.reconnects;
                if !o.clean {
                    unclean += 1;
                }
                if let Some(e) = o.error {
                    *errors.entry(e).or_default() += 1;
                }
            }
            Ok(Some(Err(e))) => {
                done += 1;
                unclean += 1;
                *errors.entry(format!("task: {e}")).or_default() += 1;
            }
            Ok(None) => break,
            Err(_) => {
                let left = (load.streams - done) as u64;
                unclean += left;
                gaps += left * load.events;
                *errors.entry("harness deadline".into()).or_default() += left;
                set.abort_all();
                break;
            }
        }
    }
    let (target_us, elapsed) = cpu_target.read();
    let threads_after = measure::thread_ticks(&t.pids);
    let (gen_us, _) = cpu_gen.read();
    let (me_us, _) = cpu_me.read();
    let peak = sampler.finish();
    let mut row = Row::new(t.kind.name());
    let m = &mut row.m;
    m.insert("streams", load.streams as f64);
    m.insert("events", delivered as f64);
    m.insert("elapsed_s", elapsed);
    m.insert("ev_per_s", delivered as f64 / elapsed);
    if let Some(p) = hist.quantile(0.5) {
        m.insert("p50_us", p as f64 / 1e3);
    }
    if let Some(p) = hist.quantile(0.99) {
        m.insert("p99_us", p as f64 / 1e3);
    }
    if !t.pids.is_empty() {
        if delivered > 0 {
            m.insert("cpu_us_per_ev", target_us as f64 / delivered as f64);
        }
        m.insert("target_cpu_pct", target_us as f64 / 1e4 / elapsed);
        m.insert(
            "busiest_thread_pct",
            measure::busiest_thread_pct(&threads_before, &threads_after, elapsed),
        );
        m.insert("idle_rss_mb", idle_rss as f64 / 1024.0);
        m.insert("peak_rss_mb", peak as f64 / 1024.0);
        m.insert(
            "rss_per_stream_kib",
            peak.saturating_sub(idle_rss) as f64 / load.streams as f64,
        );
    }
    m.insert("gen_cpu_pct", gen_us as f64 / 1e4 / elapsed);
    m.insert("client_cpu_pct", me_us as f64 / 1e4 / elapsed);
    m.insert("gaps", gaps as f64);
    m.insert("dups", dups as f64);
    m.insert("no_id", no_id as f64);
    m.insert("unclean", unclean as f64);
    m.insert("reconnects", reconnects as f64);
    row.notes.extend(count_notes(&errors, t.kind.name()));
    if let Some(r) = redis {
        r.finish(&mut row, Some(("redis_cpu_us_per_ev", delivered)), "event");
    }
    row
}

/// Stream a finished run (rate 0) through Sluice; its thread and last seq.
pub async fn finished_run(ctx: &Ctx, t: &Target, run: Finished) -> Result<(String, u64), String> {
    let events = run.events;
    let spec = StreamSpec {
        addr: t.addr,
        path: RUN_PATH.into(),
        auth: Some(ctx.token.clone()),
        body: run_body(&run.message()),
        expected: events,
        reconnect_every: 0,
        idle: Duration::from_secs(60),
    };
    let o = run_stream(&spec, None).await;
    if !o.clean || o.gaps > 0 || o.dups > 0 {
        return Err(format!(
            "a {events}-event run did not stream cleanly: {:?} (gaps {}, dups {})",
            o.error, o.gaps, o.dups
        ));
    }
    let thread = o.thread_id.ok_or("no x-thread-id on the run's answer")?;
    Ok((thread, o.last_id))
}

/// A finished thread holding `run` on Sluice `t`, created once (per Sluice) and reused.
pub async fn cached_run(ctx: &Ctx, t: &Target, run: Finished) -> Result<(String, u64), String> {
    if let Some(hit) = ctx
        .finished
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&(t.kind, run))
    {
        return Ok(hit.clone());
    }
    let made = finished_run(ctx, t, run).await?;
    ctx.finished
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert((t.kind, run), made.clone());
    Ok(made)
}

/// One GET on a keep-alive connection (reconnecting when needed): status and body length.
async fn get(
    conn: &mut Option<Conn>,
    addr: std::net::SocketAddr,
    req: &[u8],
    idle: Duration,
) -> Result<(u16, usize), String> {
    for attempt in 0..2 {
        if conn.is_none() {
            *conn = Some(
                Conn::connect(addr, idle)
                    .await
                    .map_err(|e| format!("connect: {}", e.kind()))?,
            );
        }
        let c = conn.as_mut().expect("connected");
        if let Err(e) = c.send(req).await {
            *conn = None;
            if attempt == 0 {
                continue;
            }
            return Err(format!("write: {}", e.kind()));
        }
        let head = match c.read_head().await {
            Ok(h) => h,
            Err(e) => {
                *conn = None;
                if attempt == 0 && e.kind() == std::io::ErrorKind::UnexpectedEof {
                    continue;
                }
                return Err(format!("head: {}", e.kind()));
            }
        };
        let (end, n) = c.drain_body(&head).await;
        if end != BodyEnd::Complete {
            *conn = None;
            return Err(format!("body: {end:?}"));
        }
        if head.close {
            *conn = None;
        }
        return Ok((head.status, n));
    }
    Err("connection kept closing".into())
}

/// The snapshot path for a target: Sluice's own thread, or the generator's canned answer of
/// `bytes` bytes (through nginx or directly).
fn snapshot_path(kind: Kind, thread: &str, bytes: usize, extra: &str) -> String {
    match kind {
        Kind::Sluice | Kind::SluiceRedis => {
            format!("/api/getConversation?threadId={thread}{extra}")
        }
        _ => format!("/api/getConversation?threadId=bench&size={bytes}{extra}"),
    }
}

/// Scenario 5 for one target and path: `conns` keep-alive connections issue GETs for `secs`.
pub async fn snapshot_load(
    ctx: &Ctx,
    t: &Target,
    label: &str,
    path: &str,
    conns: usize,
    secs: f64,
) -> Row {
    let req: Arc<[u8]> =
        request("GET", path, &t.addr.to_string(), Some(&ctx.token), &[], b"").into();
    let ok = Arc::new(AtomicU64::new(0));
    let bytes = Arc::new(AtomicU64::new(0));
    let errors: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let lat = Arc::new(Histogram::new());
    let redis = RedisSpan::start(t);
    let cpu_target = CpuSpan::start(&t.pids);
    let cpu_gen = CpuSpan::start(&[ctx.generator.1]);
    let cpu_me = CpuSpan::start(&[own_pid()]);
    let stop_at = Instant::now() + Duration::from_secs_f64(secs);
    let mut set = JoinSet::new();
    for _ in 0..conns {
        let (req, ok, bytes, errors, lat, addr) = (
            req.clone(),
            ok.clone(),
            bytes.clone(),
            errors.clone(),
            lat.clone(),
            t.addr,
        );
        set.spawn(async move {
            let mut conn = None;
            while Instant::now() < stop_at {
                let start = Instant::now();
                match get(&mut conn, addr, &req, Duration::from_secs(30)).await {
                    Ok((200, n)) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                        bytes.store(n as u64, Ordering::Relaxed);
                        lat.record(start.elapsed().as_nanos() as u64);
                    }
                    Ok((status, _)) => {
                        *errors
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .entry(format!("status {status}"))
                            .or_default() += 1;
                    }
                    Err(e) => {
                        *errors
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .entry(e)
                            .or_default() += 1;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        });
    }
    let _ = tokio::time::timeout(Duration::from_secs_f64(secs + 30.0), async {
        while set.join_next().await.is_some() {}
    })
    .await;
    set.abort_all();
    let (target_us, elapsed) = cpu_target.read();
    let (gen_us, _) = cpu_gen.read();
    let (me_us, _) = cpu_me.read();
    let n = ok.load(Ordering::Relaxed);
    let mut row = Row::new(label);
    row.m.insert("requests", n as f64);
    row.m.insert("req_per_s", n as f64 / elapsed);
    row.m.insert("bytes", bytes.load(Ordering::Relaxed) as f64);
    if let Some(p) = lat.quantile(0.5) {
        row.m.insert("p50_ms", p as f64 / 1e6);
    }
    if !t.pids.is_empty() && n > 0 {
        row.m.insert("cpu_us_per_req", target_us as f64 / n as f64);
        row.m
            .insert("target_cpu_pct", target_us as f64 / 1e4 / elapsed);
    }
    row.m.insert("gen_cpu_pct", gen_us as f64 / 1e4 / elapsed);
    row.m.insert("client_cpu_pct", me_us as f64 / 1e4 / elapsed);
    let errors = errors.lock().unwrap_or_else(|p| p.into_inner()).clone();
    row.m.insert("errors", errors.values().sum::<u64>() as f64);
    row.notes.extend(count_notes(&errors, label));
    if let Some(r) = redis {
        r.finish(&mut row, Some(("redis_cpu_us_per_req", n)), "request");
    }
    row
}

/// Scenario 5's Sluice rows: the run each reads and its label (for the memory store; the
/// Redis store's say `sluice-redis` instead of `sluice`, see [`sluice_label`]).
pub const SNAPSHOT_ROWS: [(Finished, &str); 3] = [
    (Finished::SHORT, "sluice, 20-event run"),
    (
        Finished::LONG_SAME_ANSWER,
        "sluice, 100k events, same answer",
    ),
    (
        Finished::LONG_TEXT,
        "sluice, 100k text deltas, 400 KB answer",
    ),
];

/// A Sluice row's label for `kind`: `label` as is for the memory store, its leading `sluice`
/// replaced by `sluice-redis` for the Redis store.
pub fn sluice_label(kind: Kind, label: &str) -> String {
    match (kind, label.strip_prefix("sluice")) {
        (Kind::SluiceRedis, Some(rest)) => format!("{}{rest}", kind.name()),
        _ => label.to_string(),
    }
}

/// Scenario 5 against one target.
pub async fn snapshots(ctx: &Ctx, t: &Target) -> Vec<Row> {
    let conns = 32;
    let secs = (ctx.duration / 2.0).max(1.0);
    let bytes = ctx
        .snapshot_bytes
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .unwrap_or(crate::generator::DEFAULT_SNAPSHOT_BYTES);
    if !t.kind.is_sluice() {
        let path = snapshot_path(t.kind, "", bytes, "");
        return vec![snapshot_load(ctx, t, t.kind.name(), &path, conns, secs).await];
    }
    let mut rows = Vec::new();
    for (run, label) in SNAPSHOT_ROWS {
        match cached_run(ctx, t, run).await {
            Ok((thread, _)) => {
                let path = snapshot_path(t.kind, &thread, 0, "");
                let label = sluice_label(t.kind, label);
                rows.push(snapshot_load(ctx, t, &label, &path, conns, secs).await);
            }
            Err(e) => {
                let mut row = Row::new(sluice_label(t.kind, label));
                row.notes.push(e);
                rows.push(row);
            }
        }
    }
    rows
}

/// Measure Sluice's snapshot size for a finished 20-event run (for the canned answer).
pub async fn measure_snapshot_bytes(ctx: &Ctx, t: &Target) -> Result<usize, String> {
    let (thread, _) = cached_run(ctx, t, Finished::SHORT).await?;
    let req = request(
        "GET",
        &snapshot_path(Kind::Sluice, &thread, 0, ""),
        &t.addr.to_string(),
        Some(&ctx.token),
        &[],
        b"",
    );
    let mut conn = None;
    match get(&mut conn, t.addr, &req, Duration::from_secs(10)).await? {
        (200, n) => Ok(n),
        (status, _) => Err(format!("snapshot answered {status}")),
    }
}

/// Scenario 6: `clients` clients each loop long-polls (`wait=1` on a finished thread) for the
/// window; CPU is read over the steady part (after every client started).
pub async fn long_polls(ctx: &Ctx, t: &Target, clients: usize) -> Row {
    let window = ctx.duration.max(3.0);
    let mut row = Row::new(t.kind.name());
    let bytes = ctx
        .snapshot_bytes
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .unwrap_or(crate::generator::DEFAULT_SNAPSHOT_BYTES);
    let mut paths = Vec::new();
    if t.kind.is_sluice() {
        // A pool of finished threads, each polled by clients/20 clients.
        let mut set = JoinSet::new();
        for _ in 0..20 {
            let spec = StreamSpec {
                addr: t.addr,
                path: RUN_PATH.into(),
                auth: Some(ctx.token.clone()),
                body: run_body("gen events=20 rate=0"),
                expected: 20,
                reconnect_every: 0,
                idle: Duration::from_secs(30),
            };
            set.spawn(async move { run_stream(&spec, None).await });
        }
        while let Some(Ok(o)) = set.join_next().await {
            if let (true, Some(thread)) = (o.clean, o.thread_id) {
                paths.push(snapshot_path(
                    t.kind,
                    &thread,
                    0,
                    &format!("&afterSeq={}&wait=1", o.last_id),
                ));
            }
        }
        if paths.is_empty() {
            row.notes.push(format!(
                "{}: could not create the threads to poll",
                t.kind.name()
            ));
            return row;
        }
    } else {
        paths.push(snapshot_path(t.kind, "", bytes, "&afterSeq=20&wait=1"));
    }
    let polls = Arc::new(AtomicU64::new(0));
    let held_ns = Arc::new(AtomicU64::new(0));
    let errors: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let t0 = Instant::now();
    let stop_at = t0 + SPREAD + Duration::from_secs_f64(window);
    let host = t.addr.to_string();
    let mut set = JoinSet::new();
    for i in 0..clients {
        let req: Arc<[u8]> = request(
            "GET",
            &paths[i % paths.len()],
            &host,
            Some(&ctx.token),
            &[],
            b"",
        )
        .into();
        let (polls, held_ns, errors, addr) =
            (polls.clone(), held_ns.clone(), errors.clone(), t.addr);
        let at = t0 + SPREAD.mul_f64(i as f64 / clients as f64);
        set.spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            let mut conn = None;
            while Instant::now() < stop_at {
                let start = Instant::now();
                match get(&mut conn, addr, &req, Duration::from_secs(30)).await {
                    Ok((200, _)) => {
                        polls.fetch_add(1, Ordering::Relaxed);
                        held_ns.fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
                    }
                    other => {
                        let key = match other {
                            Ok((s, _)) => format!("status {s}"),
                            Err(e) => e,
                        };
                        *errors
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .entry(key)
                            .or_default() += 1;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
    }
    // The steady window: every client started and its first poll held.
    let from = t0 + SPREAD + Duration::from_millis(1200).min(Duration::from_secs_f64(window / 3.0));
    tokio::time::sleep_until(from.into()).await;
    let polls_from = polls.load(Ordering::Relaxed);
    let redis = RedisSpan::start(t);
    let cpu_target = CpuSpan::start(&t.pids);
    let cpu_gen = CpuSpan::start(&[ctx.generator.1]);
    tokio::time::sleep_until(stop_at.into()).await;
    let (target_us, secs) = cpu_target.read();
    let (gen_us, _) = cpu_gen.read();
    let polls_window = polls.load(Ordering::Relaxed) - polls_from;
    if let Some(r) = redis {
        r.finish(
            &mut row,
            Some(("redis_cpu_us_per_poll", polls_window)),
            "poll",
        );
    }
    let _ = tokio::time::timeout(Duration::from_secs(40), async {
        while set.join_next().await.is_some() {}
    })
    .await;
    set.abort_all();
    let n = polls.load(Ordering::Relaxed);
    row.m.insert("clients", clients as f64);
    row.m.insert("polls_per_s", polls_window as f64 / secs);
    if n > 0 {
        row.m.insert(
            "hold_ms",
            held_ns.load(Ordering::Relaxed) as f64 / n as f64 / 1e6,
        );
    }
    if !t.pids.is_empty() {
        row.m
            .insert("target_cpu_pct", target_us as f64 / 1e4 / secs);
        if polls_window > 0 {
            row.m
                .insert("cpu_us_per_poll", target_us as f64 / polls_window as f64);
        }
    }
    row.m.insert("gen_cpu_pct", gen_us as f64 / 1e4 / secs);
    let errors = errors.lock().unwrap_or_else(|p| p.into_inner()).clone();
    row.m.insert("errors", errors.values().sum::<u64>() as f64);
    row.notes.extend(count_notes(&errors, t.kind.name()));
    row
}

/// One resume of `thread` after `cursor`: the time from the request to the body's end, and
/// whether it held exactly ids `cursor+1..=last`.
async fn resume_once(
    ctx: &Ctx,
    t: &Target,
    thread: &str,
    cursor: u64,
    last: u64,
) -> Result<f64, String> {
    let mut conn = Conn::connect(t.addr, Duration::from_secs(30))
        .await
        .map_err(|e| format!("connect: {}", e.kind()))?;
    let cur = cursor.to_string();
    let req = request(
        "GET",
        &format!("/api/threads/{thread}/stream?format=agentflow"),
        &t.addr.to_string(),
        Some(&ctx.token),
        &[("last-event-id", &cur), ("accept", "text/event-stream")],
        b"",
    );
    let start = Instant::now();
    conn.send(&req).await.map_err(|e| format!("write: {e}"))?;
    let head = conn.read_head().await.map_err(|e| format!("head: {e}"))?;
    if head.status != 200 {
        return Err(format!("status {}", head.status));
    }
    let mut sse = Sse::default();
    let mut ids = Vec::new();
    let mut on_event = |e: SseEvent| {
        ids.push(e.id);
        ControlFlow::Continue(())
    };
    let end = conn.read_body(&head, |b| sse.feed(b, &mut on_event)).await;
    let took = start.elapsed().as_secs_f64() * 1e3;
    if end != BodyEnd::Complete {
        return Err(format!("body: {end:?}"));
    }
    let want: Vec<Option<u64>> = (cursor + 1..=last).map(Some).collect();
    if ids != want {
        return Err(format!(
            "got ids {:?}…, wanted {}..={last}",
            ids.iter().take(3).collect::<Vec<_>>(),
            cursor + 1
        ));
    }
    Ok(took)
}

/// The 100k-event run scenario 7 resumes on `kind`: one that exists already (scenario 5 made
/// both kinds; the same-answer one first), else the same-answer one, made now.
fn long_run_for_resume(ctx: &Ctx, kind: Kind) -> Finished {
    let made = ctx.finished.lock().unwrap_or_else(|p| p.into_inner());
    [Finished::LONG_SAME_ANSWER, Finished::LONG_TEXT]
        .into_iter()
        .find(|r| made.contains_key(&(kind, *r)))
        .unwrap_or(Finished::LONG_SAME_ANSWER)
}

/// Scenario 7 (Sluice): resume 10 events before the end of a finished 100k-event and 20-event
/// run, `tries` times each. Rows `20-event run`, `100k-event run` (memory store) or
/// `sluice-redis, 20-event run`, … (Redis store).
pub async fn resumes(ctx: &Ctx, t: &Target, tries: usize) -> Vec<Row> {
    let mut rows = Vec::new();
    let long = long_run_for_resume(ctx, t.kind);
    for (run, label) in [(Finished::SHORT, "20-event run"), (long, "100k-event run")] {
        let label = match t.kind {
            Kind::SluiceRedis => format!("{}, {label}", t.kind.name()),
            _ => label.to_string(),
        };
        let label = label.as_str();
        let mut row = Row::new(label);
        if run.events > Finished::SHORT.events {
            row.notes.push(format!(
                "100k-event run: {}",
                if run.progress_filler {
                    "the same-answer one (20-event answer, tool_progress filler)"
                } else {
                    "the text-delta one (400 KB answer)"
                }
            ));
        }
        match cached_run(ctx, t, run).await {
            Err(e) => row.notes.push(e),
            Ok((thread, last)) => {
                let mut times = Vec::new();
                let mut errors: BTreeMap<String, u64> = BTreeMap::new();
                for _ in 0..tries {
                    match resume_once(ctx, t, &thread, last.saturating_sub(10), last).await {
                        Ok(ms) => times.push(ms),
                        Err(e) => *errors.entry(e).or_default() += 1,
                    }
                }
                row.m.insert("tries", tries as f64);
                if let Some(v) = quantile_of(&mut times, 0.5) {
                    row.m.insert("median_ms", v);
                }
                if let Some(v) = quantile_of(&mut times, 0.9) {
                    row.m.insert("p90_ms", v);
                }
                row.m.insert("bad", errors.values().sum::<u64>() as f64);
                row.notes.extend(count_notes(&errors, label));
            }
        }
        rows.push(row);
    }
    rows
}

/// Settle, then sample RSS for a while and return the largest sample (KiB).
async fn held_rss(pids: &[u32]) -> u64 {
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let mut peak = 0;
    for _ in 0..5 {
        peak = peak.max(measure::rss_kib_all(pids));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    peak
}

/// Scenario 8: memory per quiet stream (`streams` runs that sent their first event, then
/// nothing) and per held long-poll (`polls` polls with `wait=30`), through `t`.
pub async fn memory(ctx: &Ctx, t: &Target, streams: usize, polls: usize) -> Row {
    let mut row = Row::new(t.kind.name());
    let host = t.addr.to_string();
    // Quiet streams.
    let idle = measure::rss_kib_all(&t.pids);
    let (stop_tx, stop_rx) = watch::channel(false);
    let started = Arc::new(AtomicUsize::new(0));
    let notify = Arc::new(Notify::new());
    let failures: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let mut set = JoinSet::new();
    let t0 = Instant::now();
    for i in 0..streams {
        let req: Arc<[u8]> = request(
            "POST",
            RUN_PATH,
            &host,
            Some(&ctx.token),
            &[("accept", "text/event-stream")],
            &run_body("gen events=3 rate=0 quiet=1 hold=300"),
        )
        .into();
        let (started, notify, failures, mut stop, addr) = (
            started.clone(),
            notify.clone(),
            failures.clone(),
            stop_rx.clone(),
            t.addr,
        );
        let at = t0 + SPREAD.mul_f64(i as f64 / streams as f64);
        set.spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            let fail = |e: String| {
                *failures
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(e)
                    .or_default() += 1;
                notify.notify_one();
            };
            let mut conn = match Conn::connect(addr, Duration::from_secs(60)).await {
                Ok(c) => c,
                Err(e) => return fail(format!("connect: {}", e.kind())),
            };
            if let Err(e) = conn.send(&req).await {
                return fail(format!("write: {}", e.kind()));
            }
            let head = match conn.read_head().await {
                Ok(h) if h.status == 200 => h,
                Ok(h) => return fail(format!("status {}", h.status)),
                Err(e) => return fail(format!("head: {}", e.kind())),
            };
            let mut sse = Sse::default();
            let mut first = |_: SseEvent| ControlFlow::Break(());
            match conn.read_body(&head, |b| sse.feed(b, &mut first)).await {
                BodyEnd::Stopped => {
                    started.fetch_add(1, Ordering::Relaxed);
                    notify.notify_one();
                }
                other => return fail(format!("before the first event: {other:?}")),
            }
            let _ = tokio::time::timeout(Duration::from_secs(120), stop.wait_for(|s| *s)).await;
            drop(conn);
        });
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let failed: u64 = failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .sum();
        if started.load(Ordering::Relaxed) + failed as usize >= streams || Instant::now() > deadline
        {
            break;
        }
        let _ = tokio::time::timeout(Duration::from_millis(200), notify.notified()).await;
    }
    let open = started.load(Ordering::Relaxed);
    let held = held_rss(&t.pids).await;
    row.m.insert("quiet_open", open as f64);
    row.m.insert("idle_rss_mb", idle as f64 / 1024.0);
    row.m.insert("quiet_rss_mb", held as f64 / 1024.0);
    if open > 0 {
        row.m.insert(
            "kib_per_quiet",
            held.saturating_sub(idle) as f64 / open as f64,
        );
    }
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(30), async {
        while set.join_next().await.is_some() {}
    })
    .await;
    set.abort_all();
    release_quiet(ctx).await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Held long-polls.
    let bytes = ctx
        .snapshot_bytes
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .unwrap_or(crate::generator::DEFAULT_SNAPSHOT_BYTES);
    let path = if t.kind.is_sluice() {
        match cached_run(ctx, t, Finished::SHORT).await {
            Ok((thread, last)) => Some(snapshot_path(
                t.kind,
                &thread,
                0,
                &format!("&afterSeq={last}&wait=30"),
            )),
            Err(e) => {
                row.notes.push(e);
                None
            }
        }
    } else {
        Some(snapshot_path(t.kind, "", bytes, "&afterSeq=20&wait=30"))
    };
    if let Some(path) = path {
        let idle = measure::rss_kib_all(&t.pids);
        let req: Arc<[u8]> = request("GET", &path, &host, Some(&ctx.token), &[], b"").into();
        let (stop_tx, stop_rx) = watch::channel(false);
        let sent = Arc::new(AtomicUsize::new(0));
        let early = Arc::new(AtomicUsize::new(0));
        let mut set = JoinSet::new();
        let t0 = Instant::now();
        for i in 0..polls {
            let (req, sent, early, failures, mut stop, addr) = (
                req.clone(),
                sent.clone(),
                early.clone(),
                failures.clone(),
                stop_rx.clone(),
                t.addr,
            );
            let at = t0 + SPREAD.mul_f64(i as f64 / polls as f64);
            set.spawn(async move {
                tokio::time::sleep_until(at.into()).await;
                let mut conn = match Conn::connect(addr, Duration::from_secs(60)).await {
                    Ok(c) => c,
                    Err(e) => {
                        *failures
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .entry(format!("poll connect: {}", e.kind()))
                            .or_default() += 1;
                        return;
                    }
                };
                if conn.send(&req).await.is_err() {
                    return;
                }
                sent.fetch_add(1, Ordering::Relaxed);
                tokio::select! {
                    _ = conn.read_head() => {
                        early.fetch_add(1, Ordering::Relaxed);
                    }
                    _ = stop.wait_for(|s| *s) => {}
                }
            });
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while sent.load(Ordering::Relaxed) < polls && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let held = held_rss(&t.pids).await;
        let n = sent.load(Ordering::Relaxed);
        row.m.insert("polls_held", n as f64);
        row.m
            .insert("polls_answered_early", early.load(Ordering::Relaxed) as f64);
        row.m.insert("polls_rss_mb", held as f64 / 1024.0);
        if n > 0 {
            row.m
                .insert("kib_per_poll", held.saturating_sub(idle) as f64 / n as f64);
        }
        let _ = stop_tx.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(30), async {
            while set.join_next().await.is_some() {}
        })
        .await;
        set.abort_all();
    }
    let failures = failures.lock().unwrap_or_else(|p| p.into_inner()).clone();
    row.notes.extend(count_notes(&failures, t.kind.name()));
    row
}

/// Tell the generator to end its quiet runs.
pub async fn release_quiet(ctx: &Ctx) {
    let addr = ctx.generator.0;
    let req = request(
        "POST",
        "/control/release",
        &addr.to_string(),
        None,
        &[],
        b"",
    );
    let mut conn = None;
    let _ = get(&mut conn, addr, &req, Duration::from_secs(10)).await;
}
