//! The shared store: the run log in Redis (7.0+) or Valkey (7.2+), so that any number of
//! instances answer any request, and one instance at a time ingests each run, fenced.
//!
//! - **Writes** are Lua scripts (`scripts`): create with idempotency, append, finish, lease
//!   renewal, takeover, eviction. Each checks before it writes, and publishes the thread's
//!   notification in the same atomic step.
//! - **One writer per run.** The instance that creates (or takes over) a run holds its lease:
//!   an owner id and an epoch in the run's hash, checked by every append and finish in Redis.
//!   An instance that was paused or cut off past its lease finds its next write refused
//!   ([`StoreError::Fenced`]) and stops ingesting; the log stays gapless, with no duplicate.
//!   Appends carry the seq the writer expects, so a retry after a lost answer is recognised.
//! - **Takeover** (`lease`): leases are renewed every `lease_renew`; every `takeover_scan`
//!   each instance looks for leases past their deadline and takes the runs over (a new epoch),
//!   handing them to its ingestion as [`Control::Adopt`] with the job and the adapter's mark
//!   logged with the last events. A stop through another instance reaches the owner's
//!   ingestion as [`Control::Cancel`] on its control channel.
//! - **Reads** go to the log (`XRANGE`), except for what a watched run's tail already holds
//!   (`watch`): live readers wait on one pub/sub connection per instance, whatever their number.
//!
//! Redis being unreachable or slow (`response_timeout`) is [`StoreError::Unavailable`]; an
//! out-of-memory refusal is [`StoreError::Full`]. Appends are retried with the same expected
//! seq for up to `lease_ttl`; after that the lease is let lapse, and whichever instance scans
//! first once Redis is back continues the run.

mod lease;
pub mod scripts;
pub mod watch;
pub mod wire;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use dashmap::DashMap;
use redis::aio::ConnectionManager;
use redis::Value;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::budget::{Budget, QuotaKind, Quotas};
use super::{
    clip_error, BackendThread, Control, LatestRun, NewRun, ReadBatch, RunId, RunInfo, RunLimit,
    RunOutcome, RunStatus, Started, Store, StoreError, ThreadId, ThreadInfo,
};
use crate::event::{Event, NewEvent};
use watch::{status_of, Watcher};
use wire::Note;

/// What the shared store needs to know.
#[derive(Clone, Debug)]
pub struct RedisSettings {
    /// `redis://…`
    pub url: String,
    /// Prefix of every key and channel.
    pub prefix: String,
    /// Longest wait for a connection.
    pub connect_timeout: Duration,
    /// Longest wait for an answer.
    pub response_timeout: Duration,
    /// How long a lease lasts without renewal.
    pub lease_ttl: Duration,
    /// How often leases are renewed.
    pub lease_renew: Duration,
    /// How often expired leases are looked for.
    pub takeover_scan: Duration,
    /// Events cached per watched run.
    pub tail_events: usize,
    /// `limits.max_events_per_run`
    pub max_events_per_run: u64,
    /// `limits.max_bytes_per_run`
    pub max_bytes_per_run: u64,
    /// `store.retention`
    pub retention: Duration,
    /// `store.thread_retention`
    pub thread_retention: Duration,
    /// `store.full_retry_after`
    pub retry_after: Duration,
    /// `[limits.per_org]` (running runs and bytes are enforced here, across instances).
    pub quotas: Quotas,
}

/// A lease this instance holds.
struct Lease {
    epoch: String,
    /// The seq the next append expects to follow.
    last: u64,
    /// When Redis last confirmed the lease (or it was taken).
    renewed: Instant,
}

type Held = Arc<tokio::sync::Mutex<Lease>>;

/// The shared store.
pub struct RedisStore {
    conn: ConnectionManager,
    s: RedisSettings,
    /// This instance's owner id (fresh at every start).
    instance: String,
    watcher: Arc<Watcher>,
    leases: DashMap<RunId, Held>,
    /// Run id → thread id (never changes, so cached without bound checks beyond a cap).
    threads_of: DashMap<RunId, String>,
    control_tx: mpsc::UnboundedSender<Control>,
    control_rx: Mutex<Option<mpsc::UnboundedReceiver<Control>>>,
    budget: Arc<Budget>,
    /// Set on drain: this instance takes no run over any more.
    draining: std::sync::atomic::AtomicBool,
    /// Last successful ping (ms since the store started; 0: never).
    ready_at: AtomicU64,
    born: Instant,
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        if let Some(rt) = self
            .runtime
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            rt.shutdown_background();
        }
    }
}

/// Longest a waiter trusts notifications alone before re-reading the run's state.
const SAFETY_POLL: Duration = Duration::from_secs(5);
/// Entries of the run → thread cache.
const THREADS_CACHED: usize = 100_000;

fn unavailable(e: redis::RedisError) -> StoreError {
    crate::metrics::REDIS_ERRORS.inc();
    StoreError::Unavailable(e.to_string())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn time_of(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// A short key name for client-chosen ids: hex SHA-256 of the parts.
fn hashed(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0]);
    }
    h.finalize()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        Value::Okay => Some("OK".into()),
        _ => None,
    }
}

fn strings(v: Value) -> Vec<String> {
    match v {
        Value::Array(items) => items.iter().map(|i| text(i).unwrap_or_default()).collect(),
        other => text(&other).into_iter().collect(),
    }
}

fn map_of(v: Value) -> HashMap<String, String> {
    let mut out = HashMap::new();
    match v {
        Value::Map(pairs) => {
            for (k, v) in pairs {
                if let (Some(k), Some(v)) = (text(&k), text(&v)) {
                    out.insert(k, v);
                }
            }
        }
        Value::Array(items) => {
            for pair in items.chunks(2) {
                if let [k, v] = pair {
                    if let (Some(k), Some(v)) = (text(k), text(v)) {
                        out.insert(k, v);
                    }
                }
            }
        }
        _ => {}
    }
    out
}

fn num(m: &HashMap<String, String>, k: &str) -> u64 {
    m.get(k).and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn agent_label(agent: &str) -> String {
    match serde_json::from_str::<serde_json::Value>(agent) {
        Ok(serde_json::Value::String(s)) => s,
        _ => agent.to_owned(),
    }
}

/// A run's info from its hash (`None`: no such run).
fn info_of(rid: &str, m: &HashMap<String, String>) -> Option<RunInfo> {
    let status = status_of(m.get("status")?)?;
    let json = |k: &str| {
        m.get(k)
            .and_then(|v| serde_json::from_str(v).ok())
            .unwrap_or(serde_json::Value::Null)
    };
    Some(RunInfo {
        run_id: RunId(rid.to_owned()),
        thread_id: ThreadId(m.get("thread")?.clone()),
        org_id: m.get("org")?.clone(),
        user_id: m.get("user").cloned().unwrap_or_default(),
        agent_id: json("agent"),
        status,
        error: m.get("error").cloned(),
        first_seq: num(m, "first_seq"),
        last_seq: num(m, "last_seq"),
        bytes: num(m, "bytes"),
        created_at: time_of(num(m, "created")),
        updated_at: time_of(num(m, "updated")),
        user_message: Arc::new(json("umsg")),
        idempotency_key: m.get("idem").filter(|k| !k.is_empty()).cloned(),
        assistant_message_id: format!("msg_{}", rid.strip_prefix("run_").unwrap_or(rid)),
    })
}

impl RedisStore {
    /// Connect (failing when Redis cannot be reached within `connect_timeout`) and start the
    /// store's own tasks (notifications, lease renewal, takeover scan) on a runtime of its own.
    pub fn connect(s: RedisSettings, budget: Arc<Budget>) -> Result<Arc<RedisStore>, String> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("sluice-redis")
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the store's runtime: {e}"))?;
        let client =
            redis::Client::open(s.url.as_str()).map_err(|e| format!("store.redis.url: {e}"))?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(s.connect_timeout))
            .set_response_timeout(Some(s.response_timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = runtime.block_on(async {
            let connect = client.get_connection_manager_with_config(config);
            match tokio::time::timeout(s.connect_timeout * 2, connect).await {
                Ok(Ok(c)) => Ok(c),
                Ok(Err(e)) => Err(format!("cannot connect to redis: {e}")),
                Err(_) => Err("cannot connect to redis: timed out".to_string()),
            }
        })?;
        let instance = format!("i{}", uuid::Uuid::new_v4().simple());
        let watcher = Watcher::new(
            s.tail_events,
            format!("{}:ctl:{instance}", s.prefix),
            s.connect_timeout,
        );
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        let store = Arc::new(RedisStore {
            conn,
            instance,
            watcher: watcher.clone(),
            leases: DashMap::new(),
            threads_of: DashMap::new(),
            control_tx: control_tx.clone(),
            control_rx: Mutex::new(Some(control_rx)),
            budget,
            draining: std::sync::atomic::AtomicBool::new(false),
            ready_at: AtomicU64::new(0),
            born: Instant::now(),
            runtime: Mutex::new(None),
            s: s.clone(),
        });
        runtime.spawn(watcher.clone().run(client, s.connect_timeout, control_tx));
        // Up before the first request, so that no reader starts without notifications.
        if !runtime.block_on(watcher.wait_up(s.connect_timeout * 2)) {
            runtime.shutdown_background();
            return Err("cannot open the redis notifications connection".into());
        }
        runtime.spawn(lease::run(Arc::downgrade(&store)));
        *store.runtime.lock().unwrap_or_else(|p| p.into_inner()) = Some(runtime);
        Ok(store)
    }

    /// This instance's owner id.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    fn run_key(&self, rid: &str) -> String {
        format!("{}:r:{{{rid}}}", self.s.prefix)
    }

    fn thread_key(&self, tid: &str) -> String {
        format!("{}:t:{{{tid}}}", self.s.prefix)
    }

    fn channel(&self, tid: &str) -> String {
        format!("{}:n:{{{tid}}}", self.s.prefix)
    }

    /// The key of a client conversation id of `org` (→ its thread id).
    fn conversation_key(&self, org: &str, conversation: &str) -> String {
        format!("{}:c:{}", self.s.prefix, hashed(&[org, conversation]))
    }

    fn org_key(&self, org: &str) -> String {
        format!("{}:o:{}", self.s.prefix, hashed(&[org]))
    }

    async fn eval(
        &self,
        script: &redis::Script,
        args: &[&[u8]],
    ) -> Result<Vec<String>, StoreError> {
        let mut inv = script.prepare_invoke();
        inv.arg(self.s.prefix.as_str());
        for a in args {
            inv.arg(*a);
        }
        match inv.invoke_async::<Value>(&mut self.conn()).await {
            Ok(v) => Ok(strings(v)),
            Err(e) if e.code() == Some("OOM") => Err(StoreError::Full {
                retry_after: self.s.retry_after,
            }),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn hgetall(&self, key: &str) -> Result<HashMap<String, String>, StoreError> {
        let v: Value = redis::cmd("HGETALL")
            .arg(key)
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(map_of(v))
    }

    /// The thread of a run (cached: it never changes).
    async fn thread_of(&self, run: &RunId) -> Result<String, StoreError> {
        if let Some(t) = self.threads_of.get(run) {
            return Ok(t.clone());
        }
        let tid: Option<String> = redis::cmd("HGET")
            .arg(self.run_key(&run.0))
            .arg("thread")
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        let tid = tid.ok_or(StoreError::RunNotFound)?;
        if self.threads_of.len() >= THREADS_CACHED {
            self.threads_of.clear();
        }
        self.threads_of.insert(run.clone(), tid.clone());
        Ok(tid)
    }

    /// A run's last seq and status, from Redis.
    async fn state(&self, run: &RunId) -> Result<(u64, RunStatus), StoreError> {
        let (status, last): (Option<String>, Option<u64>) = redis::cmd("HMGET")
            .arg(self.run_key(&run.0))
            .arg("status")
            .arg("last_seq")
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        let status = status
            .and_then(|s| status_of(&s))
            .ok_or(StoreError::RunNotFound)?;
        Ok((last.unwrap_or(0), status))
    }

    /// The lease held on `run`, if any.
    fn lease(&self, run: &RunId) -> Option<Held> {
        self.leases.get(run).map(|l| l.clone())
    }

    /// What a write refused because the run is not ours (or no longer in progress) means.
    async fn not_ours(&self, run: &RunId) -> StoreError {
        match self.state(run).await {
            Ok((_, s)) if s.is_terminal() => StoreError::Finished,
            Ok(_) => StoreError::Fenced,
            Err(e) => e,
        }
    }

    /// Forget a lease this instance held (only that one: the run may have been taken over by
    /// this very instance again since, under a new epoch).
    fn drop_lease(&self, run: &RunId, held: &Held) {
        self.leases.remove_if(run, |_, l| Arc::ptr_eq(l, held));
    }

    /// A lease found lost: forget it and stop the run's ingestion here.
    fn lost(&self, run: &RunId, held: &Held) {
        self.drop_lease(run, held);
        crate::metrics::STORE_FENCED.inc();
        let _ = self.control_tx.send(Control::Cancel(run.clone()));
    }

    async fn read_log(
        &self,
        run: &RunId,
        after: u64,
        max: usize,
        max_bytes: usize,
    ) -> Result<ReadBatch, StoreError> {
        let (last, status) = self.state(run).await?;
        let mut events = Vec::new();
        let mut bytes = 0usize;
        let mut cursor = after;
        let log = format!("{}:log", self.run_key(&run.0));
        'pages: while events.len() < max && cursor < last {
            let page = (max - events.len()).min(1024);
            let v: Value = redis::cmd("XRANGE")
                .arg(&log)
                .arg(format!("0-{}", cursor + 1))
                .arg(format!("0-{last}"))
                .arg("COUNT")
                .arg(page)
                .query_async(&mut self.conn())
                .await
                .map_err(unavailable)?;
            let Value::Array(entries) = v else { break };
            if entries.is_empty() {
                break;
            }
            for entry in entries {
                let Some((seq, data)) = entry_of(entry) else {
                    continue;
                };
                if seq <= cursor {
                    continue;
                }
                let first = bytes == 0;
                bytes += data.len().max(1);
                if !first && bytes > max_bytes {
                    break 'pages;
                }
                cursor = seq;
                events.push(Event { seq, data });
                if events.len() >= max {
                    break 'pages;
                }
            }
        }
        Ok(ReadBatch {
            events,
            status,
            last_seq: last,
        })
    }

    /// Merge what this instance wrote into its cache of the run, if a reader here keeps one
    /// (its own notification may not have come back yet).
    fn noted(
        &self,
        run: &RunId,
        status: &str,
        first: u64,
        last: u64,
        data: impl Iterator<Item = Bytes>,
    ) {
        let events = data
            .enumerate()
            .map(|(i, data)| Event {
                seq: first + i as u64,
                data,
            })
            .collect();
        self.watcher.note_local(&Note {
            run: run.0.clone(),
            status: status.to_owned(),
            last,
            events,
        });
    }

    async fn thread_position(
        &self,
        org_id: &str,
        thread: &ThreadId,
    ) -> Result<(u64, LatestRun), StoreError> {
        let r = self
            .eval(&scripts::POSITION, &[thread.0.as_bytes()])
            .await?;
        match r.as_slice() {
            [org, rid, status, last, _] if org == org_id => {
                let latest = status_of(status).map(|s| (RunId(rid.clone()), s));
                Ok((last.parse().unwrap_or(0), latest))
            }
            _ => Err(StoreError::ThreadNotFound),
        }
    }
}

/// `(seq, payload)` of an XRANGE entry `[id, [field, value]]`.
fn entry_of(entry: Value) -> Option<(u64, Bytes)> {
    let Value::Array(mut parts) = entry else {
        return None;
    };
    if parts.len() != 2 {
        return None;
    }
    let fields = parts.pop()?;
    let id = text(&parts.pop()?)?;
    let seq = id.strip_prefix("0-")?.parse().ok()?;
    let Value::Array(fields) = fields else {
        return None;
    };
    match fields.into_iter().nth(1)? {
        Value::BulkString(b) => Some((seq, Bytes::from(b))),
        _ => None,
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn create_run(&self, new: NewRun) -> Result<Started, StoreError> {
        let agent = serde_json::to_string(&new.agent_id).unwrap_or_default();
        let umsg = serde_json::to_string(&new.user_message).unwrap_or_default();
        let key = new.idempotency_key.clone().unwrap_or_default();
        let idem_k = match &new.idempotency_key {
            Some(k) => format!(
                "{}:k:{}",
                self.s.prefix,
                hashed(&[&new.org_id, &new.user_id, k])
            ),
            None => String::new(),
        };
        let conv = new.conversation.clone().unwrap_or_default();
        let conv_k = match (&new.thread_id, &new.conversation) {
            (None, Some(c)) => self.conversation_key(&new.org_id, c),
            _ => String::new(),
        };
        let tid = new
            .thread_id
            .as_ref()
            .map(|t| t.0.clone())
            .unwrap_or_default();
        let (new_tid, rid) = (ThreadId::generate(), RunId::generate());
        let quota = *self.s.quotas.of(&new.org_id);
        let lease_ms = self.s.lease_ttl.as_millis().to_string();
        let max_running = quota.max_running_runs.min(1 << 52).to_string();
        let max_bytes = quota.max_bytes.min(1 << 52).to_string();
        let org_k = self.org_key(&new.org_id);
        let args: [&[u8]; 16] = [
            new.org_id.as_bytes(),
            new.user_id.as_bytes(),
            agent.as_bytes(),
            umsg.as_bytes(),
            idem_k.as_bytes(),
            key.as_bytes(),
            conv_k.as_bytes(),
            conv.as_bytes(),
            tid.as_bytes(),
            new_tid.0.as_bytes(),
            rid.0.as_bytes(),
            self.instance.as_bytes(),
            lease_ms.as_bytes(),
            max_running.as_bytes(),
            max_bytes.as_bytes(),
            org_k.as_bytes(),
        ];
        let r = self.eval(&scripts::CREATE, &args).await?;
        let quota_refused = |kind| StoreError::Quota {
            kind,
            retry_after: self.s.quotas.retry_after,
        };
        match r.first().map(String::as_str) {
            Some("created") if r.len() == 7 => {
                let evicted: u64 = r[6].parse().unwrap_or(0);
                crate::metrics::STORE_EVICTIONS
                    .with_label_values(&["org_quota"])
                    .inc_by(evicted);
                let thread = r[2].clone();
                let first_seq: u64 = r[3].parse().unwrap_or(1);
                let created = time_of(r[4].parse().unwrap_or(0));
                let lease = Lease {
                    epoch: "1".into(),
                    last: first_seq - 1,
                    renewed: Instant::now(),
                };
                self.leases
                    .insert(rid.clone(), Arc::new(tokio::sync::Mutex::new(lease)));
                self.threads_of.insert(rid.clone(), thread.clone());
                Ok(Started {
                    run: RunInfo {
                        assistant_message_id: format!("msg_{}", &rid.0[4..]),
                        run_id: rid,
                        thread_id: ThreadId(thread),
                        org_id: new.org_id,
                        user_id: new.user_id,
                        agent_id: new.agent_id,
                        status: RunStatus::InProgress,
                        error: None,
                        first_seq,
                        last_seq: first_seq - 1,
                        bytes: 0,
                        created_at: created,
                        updated_at: created,
                        user_message: Arc::new(new.user_message),
                        idempotency_key: new.idempotency_key,
                    },
                    existing: false,
                })
            }
            Some("existing") if r.len() == 2 => Ok(Started {
                run: self.run(&RunId(r[1].clone())).await?,
                existing: true,
            }),
            Some("nothread") => Err(StoreError::ThreadNotFound),
            Some("agent") => Err(StoreError::AgentMismatch(agent_label(
                r.get(1).map_or("", String::as_str),
            ))),
            Some("busy") => Err(StoreError::RunInProgress(RunId(
                r.get(1).cloned().unwrap_or_default(),
            ))),
            Some("quota") if r.get(1).map(String::as_str) == Some("bytes") => {
                Err(quota_refused(QuotaKind::Bytes))
            }
            Some("quota") => Err(quota_refused(QuotaKind::RunningRuns)),
            _ => Err(StoreError::Unavailable(format!(
                "unexpected answer to create: {r:?}"
            ))),
        }
    }

    async fn conversation(
        &self,
        org_id: &str,
        conversation: &str,
    ) -> Result<Option<ThreadId>, StoreError> {
        let k = self.conversation_key(org_id, conversation);
        let known: Option<String> = redis::cmd("GET")
            .arg(k)
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(known.map(ThreadId))
    }

    async fn forget_key(&self, org_id: &str, user_id: &str, key: &str, run: &RunId) {
        let k = format!("{}:k:{}", self.s.prefix, hashed(&[org_id, user_id, key]));
        let forget = redis::Script::new(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
        );
        if let Err(e) = forget
            .key(k)
            .arg(&run.0)
            .invoke_async::<i64>(&mut self.conn())
            .await
        {
            log::warn!("run {run}: could not forget its idempotency key: {e}");
        }
    }

    async fn append(&self, run: &RunId, events: Vec<NewEvent>) -> Result<u64, StoreError> {
        self.append_marked(run, events, None).await
    }

    async fn append_marked(
        &self,
        run: &RunId,
        events: Vec<NewEvent>,
        mark: Option<String>,
    ) -> Result<u64, StoreError> {
        let Some(held) = self.lease(run) else {
            return Err(self.not_ours(run).await);
        };
        let mut lease = held.lock().await;
        if !self.leases.get(run).is_some_and(|l| Arc::ptr_eq(&l, &held)) {
            return Err(self.not_ours(run).await);
        }
        let mark = match &mark {
            Some(m) => format!("={m}"),
            None => "-".to_string(),
        };
        let (max_events, max_bytes) = (
            self.s.max_events_per_run.to_string(),
            self.s.max_bytes_per_run.to_string(),
        );
        let expected = lease.last;
        let expected_s = expected.to_string();
        let mut args: Vec<&[u8]> = vec![
            run.0.as_bytes(),
            self.instance.as_bytes(),
            lease.epoch.as_bytes(),
            expected_s.as_bytes(),
            mark.as_bytes(),
            max_events.as_bytes(),
            max_bytes.as_bytes(),
        ];
        args.extend(events.iter().map(|e| &e.data[..]));
        // Retried with the same expected seq while Redis is away, within the lease.
        let deadline = Instant::now() + self.s.lease_ttl;
        let mut wait = Duration::from_millis(50);
        let r = loop {
            match self.eval(&scripts::APPEND, &args).await {
                Err(StoreError::Unavailable(e)) if Instant::now() + wait < deadline => {
                    log::debug!("run {run}: append failed ({e}); retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_millis(500));
                }
                Err(StoreError::Unavailable(e)) => {
                    // A whole lease term without Redis: the lease lapses (no more renewals
                    // from here), and whoever scans first once Redis is back continues the run.
                    drop(lease);
                    self.drop_lease(run, &held);
                    let _ = self.control_tx.send(Control::Cancel(run.clone()));
                    return Err(StoreError::Unavailable(e));
                }
                other => break other?,
            }
        };
        match r.first().map(String::as_str) {
            Some("ok") => {
                let last: u64 = r.get(1).and_then(|l| l.parse().ok()).unwrap_or(expected);
                let kept = (last - expected) as usize;
                lease.last = last;
                if kept > 0 {
                    let data = events.iter().take(kept).map(|e| e.data.clone());
                    self.noted(run, "in_progress", expected + 1, last, data);
                }
                match r.get(2).map(String::as_str) {
                    Some("events") => Err(StoreError::RunLimit(RunLimit::Events)),
                    Some("bytes") => Err(StoreError::RunLimit(RunLimit::Bytes)),
                    _ => Ok(last),
                }
            }
            // An earlier attempt of this very append landed (its answer was lost): only the
            // lease holder writes, and it writes one batch at a time.
            Some("seq") => {
                let last: u64 = r.get(1).and_then(|l| l.parse().ok()).unwrap_or(0);
                if last > expected {
                    lease.last = last;
                    Ok(last)
                } else {
                    drop(lease);
                    self.lost(run, &held);
                    Err(StoreError::Fenced)
                }
            }
            Some("fenced") => {
                drop(lease);
                self.lost(run, &held);
                Err(StoreError::Fenced)
            }
            Some("terminal") => {
                drop(lease);
                self.drop_lease(run, &held);
                Err(StoreError::Finished)
            }
            _ => {
                drop(lease);
                self.drop_lease(run, &held);
                Err(StoreError::RunNotFound)
            }
        }
    }

    async fn finish(
        &self,
        run: &RunId,
        status: RunStatus,
        error: Option<String>,
        final_event: Option<NewEvent>,
    ) -> Result<bool, StoreError> {
        let status = if status.is_terminal() {
            status
        } else {
            RunStatus::Error
        };
        // A stop may come through any instance; every other ending only from the lease holder.
        let held = self.lease(run);
        let guard = match &held {
            Some(h) => Some(h.lock().await),
            None if status == RunStatus::Stopped => None,
            None => {
                return match self.not_ours(run).await {
                    StoreError::Finished => Ok(false),
                    e => Err(e),
                }
            }
        };
        let error = error.map(|e| clip_error(&e));
        let (owner, epoch) = match &guard {
            Some(l) => (self.instance.as_str(), l.epoch.as_str()),
            None => ("", ""),
        };
        let final_data = final_event.as_ref().map(|e| e.data.clone());
        let args: [&[u8]; 8] = [
            run.0.as_bytes(),
            owner.as_bytes(),
            epoch.as_bytes(),
            status.as_str().as_bytes(),
            error.as_deref().unwrap_or("").as_bytes(),
            if error.is_some() { b"1" } else { b"0" },
            final_data.as_deref().unwrap_or(b""),
            if final_data.is_some() { b"1" } else { b"0" },
        ];
        let r = self.eval(&scripts::FINISH, &args).await?;
        drop(guard);
        match r.first().map(String::as_str) {
            Some("ok") => {
                if let Some(h) = &held {
                    self.drop_lease(run, h);
                }
                let last: u64 = r.get(1).and_then(|l| l.parse().ok()).unwrap_or(0);
                let first = last + 1 - u64::from(final_data.is_some());
                self.noted(run, status.as_str(), first, last, final_data.into_iter());
                Ok(true)
            }
            Some("already") => {
                if let Some(h) = &held {
                    self.drop_lease(run, h);
                }
                Ok(false)
            }
            Some("fenced") => {
                if let Some(h) = &held {
                    self.lost(run, h);
                }
                Err(StoreError::Fenced)
            }
            _ => {
                if let Some(h) = &held {
                    self.drop_lease(run, h);
                }
                Err(StoreError::RunNotFound)
            }
        }
    }

    async fn run(&self, run: &RunId) -> Result<RunInfo, StoreError> {
        let m = self.hgetall(&self.run_key(&run.0)).await?;
        info_of(&run.0, &m).ok_or(StoreError::RunNotFound)
    }

    async fn thread(&self, org_id: &str, thread: &ThreadId) -> Result<ThreadInfo, StoreError> {
        let th = self.thread_key(&thread.0);
        let (t, runs, evicted): (Value, Vec<String>, Vec<String>) = redis::pipe()
            .cmd("HGETALL")
            .arg(&th)
            .cmd("LRANGE")
            .arg(format!("{th}:runs"))
            .arg(0)
            .arg(-1)
            .cmd("LRANGE")
            .arg(format!("{th}:evicted"))
            .arg(0)
            .arg(-1)
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        let t = map_of(t);
        if t.get("org").map(String::as_str) != Some(org_id) {
            return Err(StoreError::ThreadNotFound);
        }
        let mut infos = Vec::with_capacity(runs.len());
        if !runs.is_empty() {
            let mut pipe = redis::pipe();
            for r in &runs {
                pipe.cmd("HGETALL").arg(self.run_key(r));
            }
            let maps: Vec<Value> = pipe
                .query_async(&mut self.conn())
                .await
                .map_err(unavailable)?;
            for (r, m) in runs.iter().zip(maps) {
                if let Some(info) = info_of(r, &map_of(m)) {
                    infos.push(info);
                }
            }
        }
        let latest_evicted = t.get("last_evicted").and_then(|v| {
            let mut it = v.splitn(4, '|');
            let (rid, status, updated, error) = (it.next()?, it.next()?, it.next()?, it.next());
            Some(RunOutcome {
                run_id: RunId(rid.to_owned()),
                status: status_of(status)?,
                error: (t.get("last_evicted_has_error").map(String::as_str) == Some("1"))
                    .then(|| error.unwrap_or("").to_owned()),
                updated_at: time_of(updated.parse().ok()?),
            })
        });
        Ok(ThreadInfo {
            thread_id: thread.clone(),
            org_id: org_id.to_owned(),
            agent_id: t
                .get("agent")
                .and_then(|a| serde_json::from_str(a).ok())
                .unwrap_or(serde_json::Value::Null),
            created_at: time_of(num(&t, "created")),
            runs: infos,
            evicted: evicted.into_iter().map(RunId).collect(),
            evicted_runs: num(&t, "evicted_runs"),
            evicted_through: num(&t, "evicted_through"),
            latest_evicted,
        })
    }

    async fn wait_thread(
        &self,
        org_id: &str,
        thread: &ThreadId,
        seen: &LatestRun,
        after: u64,
        timeout: Duration,
    ) -> Result<bool, StoreError> {
        let deadline = (timeout != Duration::MAX).then(|| tokio::time::Instant::now() + timeout);
        let mut held = self
            .watcher
            .watch(&self.channel(&thread.0))
            .await
            .map_err(StoreError::Unavailable)?;
        loop {
            held.changes.borrow_and_update();
            let (last, latest) = self.thread_position(org_id, thread).await?;
            if last > after || latest != *seen {
                return Ok(true);
            }
            let nap = tokio::time::Instant::now() + SAFETY_POLL;
            let until = deadline.map_or(nap, |d| d.min(nap));
            let _ = tokio::time::timeout_at(until, held.changes.changed()).await;
            if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                return Ok(false);
            }
        }
    }

    async fn backend_thread(&self, thread: &ThreadId) -> Option<BackendThread> {
        let (up, id): (Option<String>, Option<String>) = redis::cmd("HMGET")
            .arg(self.thread_key(&thread.0))
            .arg("backend_up")
            .arg("backend_id")
            .query_async(&mut self.conn())
            .await
            .ok()?;
        Some(BackendThread {
            upstream: up?,
            id: id?,
        })
    }

    async fn set_backend_thread(&self, thread: &ThreadId, backend: BackendThread) {
        let set = redis::Script::new(
            "if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'backend_up', ARGV[1], 'backend_id', ARGV[2]) end return 0",
        );
        if let Err(e) = set
            .key(self.thread_key(&thread.0))
            .arg(&backend.upstream)
            .arg(&backend.id)
            .invoke_async::<i64>(&mut self.conn())
            .await
        {
            log::warn!("thread {thread}: could not record its backend thread: {e}");
        }
    }

    async fn read_after(
        &self,
        run: &RunId,
        after: u64,
        max: usize,
        max_bytes: usize,
    ) -> Result<ReadBatch, StoreError> {
        if max == 0 {
            let (last, status) = self.state(run).await?;
            return Ok(ReadBatch {
                events: Vec::new(),
                status,
                last_seq: last,
            });
        }
        if let Some(t) = self.threads_of.get(run).map(|t| t.clone()) {
            let cached = self.watcher.with_tail(&run.0, &self.channel(&t), |tail| {
                if tail.gone {
                    return None;
                }
                let events = tail.read(after, max, max_bytes)?;
                Some(ReadBatch {
                    events,
                    status: tail.status?,
                    last_seq: tail.known_last,
                })
            });
            if let Some(Some(batch)) = cached {
                return Ok(batch);
            }
            let batch = self.read_log(run, after, max, max_bytes).await?;
            // What the log said starts (or refreshes) the watched run's tail.
            let _ = self.watcher.with_tail(&run.0, &self.channel(&t), |tail| {
                tail.merge_state(batch.last_seq, batch.status)
            });
            return Ok(batch);
        }
        self.read_log(run, after, max, max_bytes).await
    }

    async fn wait(
        &self,
        run: &RunId,
        after: u64,
        timeout: Duration,
    ) -> Result<(u64, RunStatus), StoreError> {
        let deadline = (timeout != Duration::MAX).then(|| tokio::time::Instant::now() + timeout);
        let thread = self.thread_of(run).await?;
        let channel = self.channel(&thread);
        let mut held = self
            .watcher
            .watch(&channel)
            .await
            .map_err(StoreError::Unavailable)?;
        // A watched run's tail is kept current by its notifications (and dropped whenever one
        // may have been missed): Redis is read only when there is none, and after a quiet spell.
        let mut fresh = false;
        loop {
            held.changes.borrow_and_update();
            let cached = if fresh {
                None
            } else {
                self.watcher
                    .with_tail(&run.0, &channel, |t| {
                        (!t.gone)
                            .then_some(())
                            .and(t.status.map(|s| (t.known_last, s)))
                    })
                    .flatten()
            };
            let (last, status) = match cached {
                Some(s) => s,
                None => {
                    let (last, status) = self.state(run).await?;
                    let _ = self
                        .watcher
                        .with_tail(&run.0, &channel, |t| t.merge_state(last, status));
                    (last, status)
                }
            };
            fresh = false;
            if last > after || status.is_terminal() {
                return Ok((last, status));
            }
            let nap = tokio::time::Instant::now() + SAFETY_POLL;
            let until = deadline.map_or(nap, |d| d.min(nap));
            let woken = tokio::time::timeout_at(until, held.changes.changed()).await;
            if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                let (last, status) = self.state(run).await?;
                return Ok((last, status));
            }
            if woken.is_err() {
                fresh = true;
            }
        }
    }

    async fn sweep(&self) -> usize {
        lease::sweep(self).await
    }

    fn bytes_held(&self) -> u64 {
        self.budget.total()
    }

    async fn save_job(&self, run: &RunId, job: serde_json::Value) -> Result<(), StoreError> {
        let Some(held) = self.lease(run) else {
            return Err(self.not_ours(run).await);
        };
        let lease = held.lock().await;
        let job = serde_json::to_string(&job).unwrap_or_default();
        let r = self
            .eval(
                &scripts::SAVE_JOB,
                &[
                    run.0.as_bytes(),
                    self.instance.as_bytes(),
                    lease.epoch.as_bytes(),
                    job.as_bytes(),
                ],
            )
            .await?;
        match r.first().map(String::as_str) {
            Some("1") => Ok(()),
            _ => {
                drop(lease);
                Err(self.not_ours(run).await)
            }
        }
    }

    fn control(&self) -> Option<mpsc::UnboundedReceiver<Control>> {
        self.control_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    async fn release(&self) {
        lease::release_all(self).await;
    }

    async fn ready(&self) -> bool {
        let age = self.born.elapsed().as_millis() as u64;
        let at = self.ready_at.load(Ordering::Relaxed);
        if at != 0 && age.saturating_sub(at) < 1000 {
            return true;
        }
        let mut conn = self.conn();
        let cmd = redis::cmd("PING");
        let ping = cmd.query_async::<String>(&mut conn);
        let ok = matches!(
            tokio::time::timeout(self.s.response_timeout, ping).await,
            Ok(Ok(_))
        ) && self.watcher.connected();
        if ok {
            self.ready_at.store(age.max(1), Ordering::Relaxed);
        } else {
            self.ready_at.store(0, Ordering::Relaxed);
        }
        ok
    }
}
