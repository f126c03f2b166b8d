//! The embedded store: everything in this process's memory.
//!
//! Runs live in a `DashMap` of cells; each cell holds its log behind a mutex. Each thread has
//! one change signal (a `Notify`), shared by its runs' cells and fired on every change (an append, an end,
//! a new run, an eviction), so waiters (streams, long polls) sleep on a channel instead of
//! holding a thread.
//!
//! Memory is bounded by the per-run limits and the [`Budget`], which counts what is held (event
//! payloads and their overhead, run records with their user messages, thread records; the
//! views share it): finished runs are evicted when their retention passes, and first under
//! pressure; new runs are refused once the budget is 90% used even after eviction, leaving
//! headroom for runs already in progress. A thread's record (a few hundred bytes) outlives its
//! runs for `thread_retention` after its last run was evicted.
//!
//! Organisations are kept apart by their [`Quotas`]: a new run is refused (`429`) when its
//! organisation has its most runs in progress, or holds its most bytes even after its own
//! finished runs were evicted; eviction under pressure takes first from the organisations
//! holding more than an equal share of the budget, so one tenant's load does not evict the
//! others' conversations while its own are kept.
//!
//! Lock order: `keys` → `conversations` → `threads` → a run cell → an organisation's finished
//! queue, and `keys` → `orgs` → an organisation's finished queue. A thread entry may be held
//! while a run cell is locked, never the reverse; a finished queue is always taken last.

use std::collections::VecDeque;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use dashmap::DashMap;
use tokio::sync::Notify;

use super::budget::{value_bytes, Budget, Part, QuotaKind, Quotas, EVENT_OVERHEAD, RUN_OVERHEAD};
use super::{
    clip_error, BackendThread, LatestRun, NewRun, ReadBatch, RunId, RunInfo, RunLimit, RunOutcome,
    RunStatus, Started, Store, StoreError, ThreadId, ThreadInfo,
};
use crate::event::{Event, NewEvent};

/// A fast hash for the ids the store generates itself (random run and thread ids), looked up
/// several times per event. Keys a client chooses (idempotency keys, conversation ids) keep the
/// default keyed hash, so nobody can fill a map with colliding keys.
#[derive(Clone, Copy, Default)]
struct IdHash(u64);

impl Hasher for IdHash {
    fn write(&mut self, bytes: &[u8]) {
        const K: u64 = 0x517c_c1b7_2722_0a95;
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let word = u64::from_le_bytes(c.try_into().expect("8 bytes"));
            self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(K);
        }
        for &b in chunks.remainder() {
            self.0 = (self.0.rotate_left(5) ^ u64::from(b)).wrapping_mul(K);
        }
    }

    fn finish(&self) -> u64 {
        // Spread the high bits down: the maps pick shards and buckets from different bits.
        self.0 ^ (self.0 >> 29)
    }
}

type IdHashing = BuildHasherDefault<IdHash>;

/// Limits the memory store enforces.
#[derive(Clone, Debug)]
pub struct MemoryLimits {
    /// Most events per run.
    pub max_events_per_run: u64,
    /// Most payload bytes per run.
    pub max_bytes_per_run: u64,
    /// Most bytes in all (payloads and thread records).
    pub max_total_bytes: u64,
    /// How long finished runs are kept.
    pub retention: Duration,
    /// How long a thread's record is kept once its last run was evicted.
    pub thread_retention: Duration,
    /// `Retry-After` for [`StoreError::Full`].
    pub retry_after: Duration,
    /// Per-organisation quotas (running runs and bytes are enforced here).
    pub quotas: Quotas,
}

/// What a thread record is charged in the memory budget, besides its ids and texts.
pub const THREAD_RECORD_BYTES: u64 = 256;

struct RunState {
    info: RunInfo,
    events: Vec<Event>,
    /// What the events are charged ([`Part::Events`]): payloads, per-event overhead and the
    /// log's capacity.
    events_charged: u64,
}

struct RunCell {
    state: Mutex<RunState>,
    /// The thread's change signal (shared by all its runs).
    changed: Arc<Changes>,
    /// Its organisation's tally.
    org: Arc<Org>,
    /// What its record and user message are charged ([`Part::Runs`]).
    record: u64,
}

/// What one organisation holds.
#[derive(Default)]
struct Org {
    /// Runs in progress.
    running: AtomicU64,
    /// Bytes its runs and threads hold.
    bytes: AtomicU64,
    /// The part of `bytes` held by its finished runs.
    finished_bytes: AtomicU64,
    /// Its finished runs in the order they finished (oldest first).
    finished: Mutex<VecDeque<(Instant, RunId)>>,
}

impl Org {
    fn add(&self, n: u64) {
        self.bytes.fetch_add(n, Ordering::AcqRel);
    }

    fn sub(&self, n: u64) {
        self.bytes.fetch_sub(n, Ordering::AcqRel);
    }

    fn is_idle(&self) -> bool {
        self.running.load(Ordering::Acquire) == 0 && self.bytes.load(Ordering::Acquire) == 0
    }
}

impl RunCell {
    fn bump(&self) {
        self.changed.bump();
    }
}

/// A thread's change signal: every append, status change, new run and eviction wakes its
/// waiters, who then read the state again. One `Notify` (a waiter registers before it reads,
/// so no change between its read and its wait is missed).
#[derive(Default)]
struct Changes {
    notify: Notify,
}

impl Changes {
    fn bump(&self) {
        self.notify.notify_waiters();
    }
}

struct ThreadRec {
    org_id: String,
    agent_id: serde_json::Value,
    created_at: SystemTime,
    /// Retained runs, oldest first.
    runs: Vec<RunId>,
    /// The client's conversation id this thread stands for (AgentFlow dialect).
    conversation: Option<String>,
    /// Recently evicted runs of the thread (at most [`EVICTED_REMEMBERED`]).
    evicted: VecDeque<RunId>,
    /// How many runs were evicted, and the seq their prefix ends at.
    evicted_runs: u64,
    evicted_through: u64,
    latest_evicted: Option<RunOutcome>,
    backend: Option<BackendThread>,
    /// When its last retained run was evicted (its record expires `thread_retention` later).
    emptied_at: Option<Instant>,
    /// Bytes this record is charged.
    bytes: u64,
    changed: Arc<Changes>,
    org: Arc<Org>,
}

impl ThreadRec {
    fn new(
        org_id: &str,
        org: Arc<Org>,
        agent_id: &serde_json::Value,
        conversation: Option<String>,
    ) -> Self {
        let mut rec = ThreadRec {
            org_id: org_id.to_owned(),
            agent_id: agent_id.clone(),
            created_at: SystemTime::now(),
            runs: Vec::new(),
            conversation,
            evicted: VecDeque::new(),
            evicted_runs: 0,
            evicted_through: 0,
            latest_evicted: None,
            backend: None,
            emptied_at: None,
            bytes: 0,
            changed: Arc::default(),
            org,
        };
        rec.bytes = rec.charge();
        rec
    }

    /// The record's size for the budget (a fixed overhead plus its texts).
    fn charge(&self) -> u64 {
        let texts = self.org_id.len()
            + self.agent_id.to_string().len()
            + self.conversation.as_ref().map_or(0, String::len)
            + self
                .backend
                .as_ref()
                .map_or(0, |b| b.upstream.len() + b.id.len());
        THREAD_RECORD_BYTES + texts as u64 + self.evicted.len() as u64 * 40
    }
}

/// Evicted run ids remembered per thread.
const EVICTED_REMEMBERED: usize = 16;

/// The embedded [`Store`].
pub struct MemoryStore {
    limits: MemoryLimits,
    runs: DashMap<RunId, Arc<RunCell>, IdHashing>,
    threads: DashMap<ThreadId, ThreadRec, IdHashing>,
    /// (organisation, user, idempotency key) → run.
    keys: DashMap<(String, String, String), RunId>,
    /// (organisation, client conversation id) → thread.
    conversations: DashMap<(String, String), ThreadId>,
    /// What is held, against `max_total_bytes` (shared with the views).
    budget: Arc<Budget>,
    /// The part of the budget held by finished (evictable) runs.
    finished_bytes: AtomicU64,
    /// Organisation id → what it holds, and its finished runs.
    orgs: DashMap<String, Arc<Org>>,
    /// Threads whose last run was evicted, in that order (their records expire in turn).
    emptied: Mutex<VecDeque<(Instant, ThreadId)>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding a lock cannot leave a log half-written (every mutation is a
    // single push or field store), so a poisoned lock is still safe to use.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl MemoryStore {
    /// An empty store with a budget of its own.
    pub fn new(limits: MemoryLimits) -> Self {
        let budget = Arc::new(Budget::new(limits.max_total_bytes));
        Self::with_budget(limits, budget)
    }

    /// An empty store charging `budget` (shared with whatever else it bounds, e.g. the views).
    pub fn with_budget(limits: MemoryLimits, budget: Arc<Budget>) -> Self {
        MemoryStore {
            limits,
            runs: DashMap::with_hasher(IdHashing::default()),
            threads: DashMap::with_hasher(IdHashing::default()),
            keys: DashMap::new(),
            conversations: DashMap::new(),
            budget,
            finished_bytes: AtomicU64::new(0),
            orgs: DashMap::new(),
            emptied: Mutex::new(VecDeque::new()),
        }
    }

    /// The budget this store charges.
    pub fn budget(&self) -> &Arc<Budget> {
        &self.budget
    }

    /// What `org` holds now: (runs in progress, bytes).
    pub fn org_usage(&self, org: &str) -> (u64, u64) {
        self.orgs.get(org).map_or((0, 0), |o| {
            (
                o.running.load(Ordering::Acquire),
                o.bytes.load(Ordering::Acquire),
            )
        })
    }

    fn cell(&self, run: &RunId) -> Result<Arc<RunCell>, StoreError> {
        self.runs
            .get(run)
            .map(|c| c.value().clone())
            .ok_or(StoreError::RunNotFound)
    }

    fn org(&self, org: &str) -> Arc<Org> {
        if let Some(o) = self.orgs.get(org) {
            return o.clone();
        }
        self.orgs.entry(org.to_owned()).or_default().clone()
    }

    fn full(&self) -> StoreError {
        StoreError::Full {
            retry_after: self.limits.retry_after,
        }
    }

    fn over_quota(&self, kind: QuotaKind) -> StoreError {
        StoreError::Quota {
            kind,
            retry_after: self.limits.quotas.retry_after,
        }
    }

    /// Evict finished runs until `measure()` (what is held, as the caller counts it) is at most
    /// `target`, or none are left: first those of the organisations holding more than an equal
    /// share of the budget (the largest holder's oldest first), then the oldest of all.
    ///
    /// Evicts nothing when even evicting every finished run would not be enough: finished
    /// conversations are not thrown away for a request that would be refused anyway.
    fn evict_until(&self, measure: impl Fn() -> u64, target: u64) {
        let finished = self.finished_bytes.load(Ordering::Acquire);
        if measure().saturating_sub(finished) > target {
            return;
        }
        while measure() > target {
            match self.pressure_victim() {
                Some((run, fair)) => {
                    self.evict(&run);
                    crate::metrics::STORE_EVICTIONS
                        .with_label_values(&[if fair { "over_share" } else { "pressure" }])
                        .inc();
                }
                None => return,
            }
        }
    }

    /// The finished run to evict next under pressure, and whether its organisation holds more
    /// than its share.
    fn pressure_victim(&self) -> Option<(RunId, bool)> {
        let holders = self
            .orgs
            .iter()
            .filter(|o| o.bytes.load(Ordering::Acquire) > 0)
            .count()
            .max(1) as u64;
        let share = self.budget.max_total() / holders;
        let mut largest: Option<(u64, Arc<Org>)> = None;
        let mut oldest: Option<(Instant, Arc<Org>)> = None;
        for o in self.orgs.iter() {
            let Some(front) = lock(&o.finished).front().map(|(at, _)| *at) else {
                continue;
            };
            let bytes = o.bytes.load(Ordering::Acquire);
            if largest.as_ref().is_none_or(|(b, _)| bytes > *b) {
                largest = Some((bytes, o.value().clone()));
            }
            if oldest.as_ref().is_none_or(|(at, _)| front < *at) {
                oldest = Some((front, o.value().clone()));
            }
        }
        let (org, fair) = match largest {
            Some((bytes, org)) if bytes > share => (org, true),
            _ => (oldest?.1, false),
        };
        let run = lock(&org.finished).pop_front().map(|(_, run)| run)?;
        Some((run, fair))
    }

    /// Evict `org`'s own finished runs, oldest first, until it holds less than `max` bytes.
    /// Evicts nothing when its runs in progress alone hold that much.
    fn evict_own(&self, org: &Org, max: u64) {
        let bytes = org.bytes.load(Ordering::Acquire);
        // (Two loads, not one snapshot: saturating, as a run may finish between them.)
        let live = bytes.saturating_sub(org.finished_bytes.load(Ordering::Acquire));
        if bytes < max || live >= max {
            return;
        }
        while org.bytes.load(Ordering::Acquire) >= max {
            let next = lock(&org.finished).pop_front();
            match next {
                Some((_, run)) => {
                    self.evict(&run);
                    crate::metrics::STORE_EVICTIONS
                        .with_label_values(&["org_quota"])
                        .inc();
                }
                None => return,
            }
        }
    }

    /// Evict a finished run's events; its thread remembers the seq range it held.
    fn evict(&self, run: &RunId) {
        let Some((_, cell)) = self.runs.remove(run) else {
            return;
        };
        // What eviction needs of the run (not its user message).
        let (outcome, thread_id, key, last_seq, events_charged) = {
            let st = lock(&cell.state);
            let i = &st.info;
            let outcome = RunOutcome {
                run_id: i.run_id.clone(),
                status: i.status,
                error: i.error.clone(),
                updated_at: i.updated_at,
            };
            let key = i
                .idempotency_key
                .clone()
                .map(|k| (i.org_id.clone(), i.user_id.clone(), k));
            (
                outcome,
                i.thread_id.clone(),
                key,
                i.last_seq,
                st.events_charged,
            )
        };
        if let Some(key) = key {
            self.keys.remove_if(&key, |_, r| r == run);
        }
        let charged = cell.record + events_charged;
        self.budget.release(Part::Runs, cell.record);
        self.budget.release(Part::Events, events_charged);
        // Only finished runs are evicted.
        self.finished_bytes.fetch_sub(charged, Ordering::AcqRel);
        cell.org.finished_bytes.fetch_sub(charged, Ordering::AcqRel);
        cell.org.sub(charged);
        let emptied = match self.threads.get_mut(&thread_id) {
            Some(mut t) => {
                t.runs.retain(|r| r != run);
                if t.evicted.len() == EVICTED_REMEMBERED {
                    t.evicted.pop_front();
                }
                t.evicted.push_back(run.clone());
                t.evicted_runs += 1;
                // A thread's runs finish, and so are evicted, in order: the evicted ones are
                // always a prefix of the thread.
                t.evicted_through = t.evicted_through.max(last_seq);
                t.latest_evicted = Some(outcome);
                self.recharge_thread(&mut t);
                if t.runs.is_empty() {
                    t.emptied_at = Some(Instant::now());
                }
                t.runs.is_empty()
            }
            None => false,
        };
        // Wake waiters so they notice the run is gone.
        cell.bump();
        if emptied {
            lock(&self.emptied).push_back((Instant::now(), thread_id));
        }
    }

    /// Charge a thread record what it holds now.
    fn recharge_thread(&self, t: &mut ThreadRec) {
        let (before, now) = (t.bytes, t.charge());
        self.budget.recharge(Part::Threads, &mut t.bytes, now);
        t.org.add(now);
        t.org.sub(before);
    }

    /// Remove a thread record whose runs were all evicted at least `thread_retention` ago, and
    /// its conversation mapping.
    fn forget_thread(&self, thread: &ThreadId, now: Instant) {
        let keep = self.limits.thread_retention;
        let expired = |t: &ThreadRec| {
            t.runs.is_empty()
                && t.emptied_at
                    .is_some_and(|at| now.duration_since(at) >= keep)
        };
        let Some((_, t)) = self.threads.remove_if(thread, |_, t| expired(t)) else {
            return;
        };
        self.budget.release(Part::Threads, t.bytes);
        t.org.sub(t.bytes);
        t.changed.bump();
        if let Some(conv) = t.conversation {
            self.conversations
                .remove_if(&(t.org_id, conv), |_, th| th == thread);
        }
    }

    /// Create a run (no idempotency bookkeeping). Evicts nothing: callers make room first,
    /// before taking any lock that eviction needs.
    fn create_new(&self, new: NewRun) -> Result<RunInfo, StoreError> {
        if self.budget.total() >= self.budget.high_water() {
            return Err(self.full());
        }
        let quota = *self.limits.quotas.of(&new.org_id);
        let org = self.org(&new.org_id);
        if org.bytes.load(Ordering::Acquire) >= quota.max_bytes {
            return Err(self.over_quota(QuotaKind::Bytes));
        }
        if org.running.load(Ordering::Acquire) >= quota.max_running_runs {
            return Err(self.over_quota(QuotaKind::RunningRuns));
        }
        let thread_id = match (&new.thread_id, &new.conversation) {
            (Some(t), _) => t.clone(),
            // A client conversation id names a thread of its own organisation, created on first
            // use; the entry is held until the thread exists, so concurrent first requests of
            // one conversation get one thread.
            (None, Some(conv)) => {
                match self.conversations.entry((new.org_id.clone(), conv.clone())) {
                    dashmap::Entry::Occupied(e) if self.threads.contains_key(e.get()) => {
                        e.get().clone()
                    }
                    entry => {
                        let t = ThreadId::generate();
                        self.insert_thread(&t, &new, &org, Some(conv.clone()));
                        entry.insert(t.clone());
                        t
                    }
                }
            }
            (None, None) => {
                let t = ThreadId::generate();
                self.insert_thread(&t, &new, &org, None);
                t
            }
        };
        let mut thread = match self.threads.get_mut(&thread_id) {
            Some(t) if t.org_id == new.org_id => t,
            _ => return Err(StoreError::ThreadNotFound),
        };
        if thread.agent_id != new.agent_id {
            return Err(StoreError::AgentMismatch(agent_label(&thread.agent_id)));
        }
        let mut base = thread.evicted_through;
        if let Some(last) = thread.runs.last() {
            if let Some(info) = self.info_of(last) {
                if !info.status.is_terminal() {
                    return Err(StoreError::RunInProgress(info.run_id));
                }
                base = base.max(info.last_seq);
            }
        }
        let record = record_charge(&new);
        // Taken last, atomically: concurrent starts never pass the 90 % mark or the quota
        // together (the run's record, user message included, is charged only if it fits).
        let refusal = if !self
            .budget
            .try_charge(Part::Runs, record, self.budget.high_water())
        {
            Some(self.full())
        } else if org
            .running
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < quota.max_running_runs).then_some(n + 1)
            })
            .is_err()
        {
            self.budget.release(Part::Runs, record);
            Some(self.over_quota(QuotaKind::RunningRuns))
        } else {
            None
        };
        if let Some(refusal) = refusal {
            if thread.runs.is_empty() && thread.emptied_at.is_none() {
                // A thread made for this run: it expires like one whose runs were evicted.
                thread.emptied_at = Some(Instant::now());
                drop(thread);
                lock(&self.emptied).push_back((Instant::now(), thread_id));
            }
            return Err(refusal);
        }
        let now = SystemTime::now();
        let run_id = RunId::generate();
        let info = RunInfo {
            assistant_message_id: format!("msg_{}", &run_id.0[4..]),
            run_id: run_id.clone(),
            thread_id,
            org_id: new.org_id,
            user_id: new.user_id,
            agent_id: new.agent_id,
            status: RunStatus::InProgress,
            error: None,
            first_seq: base + 1,
            last_seq: base,
            bytes: 0,
            created_at: now,
            updated_at: now,
            user_message: new.user_message.into(),
            idempotency_key: new.idempotency_key,
        };
        org.add(record);
        let cell = RunCell {
            state: Mutex::new(RunState {
                info: info.clone(),
                events: Vec::new(),
                events_charged: 0,
            }),
            changed: thread.changed.clone(),
            org,
            record,
        };
        self.runs.insert(run_id.clone(), Arc::new(cell));
        thread.runs.push(run_id);
        thread.emptied_at = None;
        thread.changed.bump();
        Ok(info)
    }

    fn insert_thread(
        &self,
        id: &ThreadId,
        new: &NewRun,
        org: &Arc<Org>,
        conversation: Option<String>,
    ) {
        let rec = ThreadRec::new(&new.org_id, org.clone(), &new.agent_id, conversation);
        self.budget.charge(Part::Threads, rec.bytes);
        org.add(rec.bytes);
        self.threads.insert(id.clone(), rec);
    }

    fn info_of(&self, run: &RunId) -> Option<RunInfo> {
        self.runs.get(run).map(|c| lock(&c.state).info.clone())
    }

    /// (last seq, latest run, its status) of a thread of `org_id`.
    fn position(&self, org_id: &str, thread: &ThreadId) -> Result<(u64, LatestRun), StoreError> {
        let t = match self.threads.get(thread) {
            Some(t) if t.org_id == org_id => t,
            _ => return Err(StoreError::ThreadNotFound),
        };
        let latest = t.runs.last().and_then(|r| {
            let cell = self.runs.get(r)?;
            let st = lock(&cell.state);
            Some((st.info.last_seq, st.info.run_id.clone(), st.info.status))
        });
        Ok(match latest {
            Some((last, id, status)) => (last.max(t.evicted_through), Some((id, status))),
            None => (t.evicted_through, None),
        })
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn create_run(&self, mut new: NewRun) -> Result<Started, StoreError> {
        // Make room first: eviction takes the locks of `keys`, which the entry below holds.
        // Room for the run's record, and its thread's when it starts one.
        let thread = match new.thread_id {
            Some(_) => 0,
            None => {
                THREAD_RECORD_BYTES + (new.org_id.len() + new.agent_id.to_string().len()) as u64
            }
        };
        let (high_water, record) = (self.budget.high_water(), record_charge(&new) + thread);
        self.evict_until(|| self.budget.total(), high_water.saturating_sub(record));
        if let Some(org) = self.orgs.get(&new.org_id).map(|o| o.value().clone()) {
            self.evict_own(&org, self.limits.quotas.of(&new.org_id).max_bytes);
        }
        let Some(key) = new.idempotency_key.clone() else {
            return self.create_new(new).map(|run| Started {
                run,
                existing: false,
            });
        };
        // The key's entry is held while the run is created, so concurrent retries get one run.
        match self
            .keys
            .entry((new.org_id.clone(), new.user_id.clone(), key))
        {
            dashmap::Entry::Occupied(mut e) => {
                if let Some(run) = self.info_of(e.get()) {
                    let same_thread = new.thread_id.as_ref().is_none_or(|t| *t == run.thread_id);
                    if same_thread && run.agent_id == new.agent_id {
                        if !matches!(run.status, RunStatus::Error | RunStatus::Timeout) {
                            return Ok(Started {
                                run,
                                existing: true,
                            });
                        }
                        // A retry after a failure: a new run in the same thread.
                        new.thread_id = Some(run.thread_id);
                    }
                }
                let run = self.create_new(new)?;
                e.insert(run.run_id.clone());
                Ok(Started {
                    run,
                    existing: false,
                })
            }
            dashmap::Entry::Vacant(e) => {
                let run = self.create_new(new)?;
                e.insert(run.run_id.clone());
                Ok(Started {
                    run,
                    existing: false,
                })
            }
        }
    }

    async fn conversation(
        &self,
        org_id: &str,
        conversation: &str,
    ) -> Result<Option<ThreadId>, StoreError> {
        let known = self
            .conversations
            .get(&(org_id.to_string(), conversation.to_string()))
            .map(|t| t.clone());
        Ok(known.filter(|t| self.threads.contains_key(t)))
    }

    async fn forget_key(&self, org_id: &str, user_id: &str, key: &str, run: &RunId) {
        let key = (org_id.to_string(), user_id.to_string(), key.to_string());
        self.keys.remove_if(&key, |_, r| r == run);
    }

    async fn append(&self, run: &RunId, mut events: Vec<NewEvent>) -> Result<u64, StoreError> {
        let cell = self.cell(run)?;
        let max_total = self.budget.max_total();
        let mut made_room = false;
        // One pass under the run's lock; only when the budget refuses, a second one after
        // evicting finished runs to make room.
        let (mut st, fit, fit_bytes, fit_charge, limit, capacity, grow_to, charge) = loop {
            let st = lock(&cell.state);
            if st.info.status.is_terminal() {
                return Err(StoreError::Finished);
            }
            // Keep the events that fit the run's limits (on payload bytes); refuse the rest.
            let mut room_events = self
                .limits
                .max_events_per_run
                .saturating_sub(st.info.events());
            let mut room_bytes = self.limits.max_bytes_per_run.saturating_sub(st.info.bytes);
            let (mut fit, mut fit_bytes, mut fit_charge, mut limit) = (0, 0, 0, None);
            for ev in &events {
                let n = ev.data.len() as u64;
                if room_events == 0 {
                    limit = Some(RunLimit::Events);
                    break;
                }
                if n > room_bytes {
                    limit = Some(RunLimit::Bytes);
                    break;
                }
                room_events -= 1;
                room_bytes -= n;
                fit += 1;
                fit_bytes += n;
                fit_charge += charge_of(&ev.data);
            }
            // The log's growth is memory held too, charged with the events. It keeps one spare
            // slot, so that the closing event (always kept) never grows it past what was charged.
            let capacity = st.events.capacity();
            let grow_to = grown_capacity(st.events.len(), capacity, fit);
            let charge = fit_charge + log_bytes(grow_to - capacity);
            // A run already accepted is bounded by what the log holds, not by the views derived
            // from it (those are dropped under pressure, and new runs are refused counting them).
            if self
                .budget
                .try_charge_logged(Part::Events, charge, max_total)
            {
                break (
                    st, fit, fit_bytes, fit_charge, limit, capacity, grow_to, charge,
                );
            }
            if made_room {
                return Err(self.full());
            }
            drop(st);
            self.evict_until(|| self.budget.logged(), max_total.saturating_sub(charge));
            made_room = true;
        };
        events.truncate(fit);
        let len = st.events.len();
        st.events.reserve_exact(grow_to - len);
        // Whatever the allocator made of it, what is charged is what is held.
        let actual = fit_charge + log_bytes(st.events.capacity() - capacity);
        if actual > charge {
            self.budget.charge(Part::Events, actual - charge);
        } else {
            self.budget.release(Part::Events, charge - actual);
        }
        let appended = !events.is_empty();
        for ev in events {
            st.info.last_seq += 1;
            let seq = st.info.last_seq;
            st.events.push(ev.at(seq));
        }
        st.events_charged += actual;
        cell.org.add(actual);
        st.info.bytes += fit_bytes;
        st.info.updated_at = SystemTime::now();
        let last = st.info.last_seq;
        drop(st);
        if appended {
            cell.bump();
        }
        match limit {
            Some(l) => Err(StoreError::RunLimit(l)),
            None => Ok(last),
        }
    }

    async fn finish(
        &self,
        run: &RunId,
        status: RunStatus,
        error: Option<String>,
        final_event: Option<NewEvent>,
    ) -> Result<bool, StoreError> {
        debug_assert!(status.is_terminal());
        let cell = self.cell(run)?;
        let mut st = lock(&cell.state);
        if st.info.status.is_terminal() {
            return Ok(false);
        }
        if let Some(ev) = final_event {
            // The closing event is small and must not be lost to a limit: it is always kept.
            let n = ev.data.len() as u64;
            let capacity = st.events.capacity();
            let charge = charge_of(&ev.data);
            st.info.bytes += n;
            st.info.last_seq += 1;
            let seq = st.info.last_seq;
            st.events.push(ev.at(seq));
            let charge = charge + log_bytes(st.events.capacity() - capacity);
            self.budget.charge(Part::Events, charge);
            cell.org.add(charge);
            st.events_charged += charge;
        }
        st.info.status = if status.is_terminal() {
            status
        } else {
            RunStatus::Error
        };
        st.info.error = error.map(|e| clip_error(&e));
        st.info.updated_at = SystemTime::now();
        let charged = cell.record + st.events_charged;
        self.finished_bytes.fetch_add(charged, Ordering::AcqRel);
        cell.org.finished_bytes.fetch_add(charged, Ordering::AcqRel);
        cell.org.running.fetch_sub(1, Ordering::AcqRel);
        lock(&cell.org.finished).push_back((Instant::now(), run.clone()));
        drop(st);
        cell.bump();
        Ok(true)
    }

    async fn run(&self, run: &RunId) -> Result<RunInfo, StoreError> {
        self.info_of(run).ok_or(StoreError::RunNotFound)
    }

    async fn thread(&self, org_id: &str, thread: &ThreadId) -> Result<ThreadInfo, StoreError> {
        let t = match self.threads.get(thread) {
            Some(t) if t.org_id == org_id => t,
            _ => return Err(StoreError::ThreadNotFound),
        };
        // Lock order allows a run cell under a thread entry.
        let runs: Vec<RunInfo> = t.runs.iter().filter_map(|r| self.info_of(r)).collect();
        Ok(ThreadInfo {
            thread_id: thread.clone(),
            org_id: org_id.to_string(),
            agent_id: t.agent_id.clone(),
            created_at: t.created_at,
            runs,
            evicted: t.evicted.iter().cloned().collect(),
            evicted_runs: t.evicted_runs,
            evicted_through: t.evicted_through,
            latest_evicted: t.latest_evicted.clone(),
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
        // `Duration::MAX`: no deadline, and no timer.
        let deadline = (timeout != Duration::MAX).then(|| tokio::time::Instant::now() + timeout);
        let changes = match self.threads.get(thread) {
            Some(t) if t.org_id == org_id => t.changed.clone(),
            _ => return Err(StoreError::ThreadNotFound),
        };
        loop {
            // Registered before reading, so no change between the read and the wait is missed;
            // and compared with what the caller saw, so no change before the call either.
            let mut notified = std::pin::pin!(changes.notify.notified());
            notified.as_mut().enable();
            let (last, latest) = self.position(org_id, thread)?;
            if last > after || latest != *seen {
                return Ok(true);
            }
            match deadline {
                Some(deadline) => {
                    if tokio::time::timeout_at(deadline, notified).await.is_err() {
                        return Ok(false);
                    }
                }
                None => notified.await,
            }
        }
    }

    async fn backend_thread(&self, thread: &ThreadId) -> Option<BackendThread> {
        self.threads.get(thread).and_then(|t| t.backend.clone())
    }

    async fn set_backend_thread(&self, thread: &ThreadId, backend: BackendThread) {
        if let Some(mut t) = self.threads.get_mut(thread) {
            t.backend = Some(backend);
            self.recharge_thread(&mut t);
        }
    }

    async fn read_after(
        &self,
        run: &RunId,
        after: u64,
        max: usize,
        max_bytes: usize,
    ) -> Result<ReadBatch, StoreError> {
        let cell = self.cell(run)?;
        let st = lock(&cell.state);
        let first = st.info.first_seq;
        let start = (after + 1).saturating_sub(first) as usize;
        let held = st.events.get(start.min(st.events.len())..).unwrap_or(&[]);
        let events = super::bounded(held.iter(), max, max_bytes);
        Ok(ReadBatch {
            events,
            status: st.info.status,
            last_seq: st.info.last_seq,
        })
    }

    async fn wait(
        &self,
        run: &RunId,
        after: u64,
        timeout: Duration,
    ) -> Result<(u64, RunStatus), StoreError> {
        // `Duration::MAX`: no deadline, and no timer.
        let deadline = (timeout != Duration::MAX).then(|| tokio::time::Instant::now() + timeout);
        let mut cell = Some(self.cell(run)?);
        let changes = cell.as_ref().map(|c| c.changed.clone()).expect("just set");
        loop {
            // Registered before reading, so no change between the read and the wait is missed.
            // After a wake-up the run is looked up again: it may have been evicted.
            let mut notified = std::pin::pin!(changes.notify.notified());
            notified.as_mut().enable();
            let cell = match cell.take() {
                Some(cell) => cell,
                None => self.cell(run)?,
            };
            let (last, status) = {
                let st = lock(&cell.state);
                (st.info.last_seq, st.info.status)
            };
            drop(cell);
            if last > after || status.is_terminal() {
                return Ok((last, status));
            }
            match deadline {
                Some(deadline) => {
                    if tokio::time::timeout_at(deadline, notified).await.is_err() {
                        return Ok((last, status));
                    }
                }
                None => notified.await,
            }
        }
    }

    async fn sweep(&self) -> usize {
        let now = Instant::now();
        let orgs: Vec<Arc<Org>> = self.orgs.iter().map(|o| o.value().clone()).collect();
        let mut n = 0;
        for org in orgs {
            let expired = drain_expired(&org.finished, now, self.limits.retention);
            n += expired.len();
            for run in expired {
                self.evict(&run);
            }
        }
        crate::metrics::STORE_EVICTIONS
            .with_label_values(&["retention"])
            .inc_by(n as u64);
        for thread in drain_expired(&self.emptied, now, self.limits.thread_retention) {
            self.forget_thread(&thread, now);
        }
        // Organisations that hold nothing and are referenced by nothing are forgotten.
        self.orgs
            .retain(|_, o| Arc::strong_count(o) > 1 || !o.is_idle());
        n
    }

    fn bytes_held(&self) -> u64 {
        self.budget.total()
    }
}

/// What a run's record is charged: its fixed overhead, its texts and its user message.
fn record_charge(new: &NewRun) -> u64 {
    let texts = new.org_id.len()
        + new.user_id.len()
        + new.agent_id.to_string().len()
        + new.idempotency_key.as_ref().map_or(0, String::len);
    RUN_OVERHEAD + value_bytes(&new.user_message) + texts as u64
}

/// What an event is charged: its payload and the per-event overhead (its slot in the log is
/// charged as the log grows).
fn charge_of(data: &bytes::Bytes) -> u64 {
    data.len() as u64 + EVENT_OVERHEAD
}

/// The capacity a log of `len` events (with `capacity` slots) grows to for `adding` more: it
/// doubles as a `Vec` does, and keeps one spare slot, so that the closing event (always kept)
/// never grows it past what was charged.
fn grown_capacity(len: usize, capacity: usize, adding: usize) -> usize {
    let need = len + adding + 1;
    if need > capacity {
        need.max(capacity * 2).max(4)
    } else {
        capacity
    }
}

/// What `slots` more event slots of a log take.
fn log_bytes(slots: usize) -> u64 {
    (slots * std::mem::size_of::<Event>()) as u64
}

/// Take the entries of a time-ordered queue older than `keep`.
fn drain_expired<T>(queue: &Mutex<VecDeque<(Instant, T)>>, now: Instant, keep: Duration) -> Vec<T> {
    let mut q = lock(queue);
    let mut out = Vec::new();
    while q
        .front()
        .is_some_and(|(at, _)| now.duration_since(*at) >= keep)
    {
        if let Some((_, item)) = q.pop_front() {
            out.push(item);
        }
    }
    out
}

fn agent_label(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn limits() -> MemoryLimits {
        MemoryLimits {
            max_events_per_run: 1000,
            max_bytes_per_run: 10_000,
            max_total_bytes: 100_000,
            retention: Duration::from_secs(3600),
            thread_retention: Duration::from_secs(3600),
            retry_after: Duration::from_secs(5),
            quotas: crate::store::budget::Quotas::unlimited(),
        }
    }

    /// What `n` thread records of the tests' organisation and agent are charged.
    fn records(n: u64) -> u64 {
        n * (THREAD_RECORD_BYTES + "o".len() as u64 + "7".len() as u64)
    }

    /// What the record of a run made by [`new_run`] (no key) is charged.
    fn record() -> u64 {
        let new = new_run(None, "o");
        RUN_OVERHEAD + value_bytes(&new.user_message) + ("o".len() + "u".len() + "7".len()) as u64
    }

    /// What a log of `n` events, appended a few at a time, is charged for its slots (it doubles
    /// as a `Vec` does, keeping one spare slot for the closing event).
    fn slots(n: u64) -> u64 {
        let cap = if n == 0 {
            0
        } else {
            (n + 1).next_power_of_two().max(4)
        };
        cap * std::mem::size_of::<Event>() as u64
    }

    fn new_run(thread: Option<ThreadId>, org: &str) -> NewRun {
        NewRun {
            thread_id: thread,
            org_id: org.into(),
            user_id: "u".into(),
            agent_id: json!(7),
            user_message: json!({"id":"m","role":"user","parts":[]}),
            idempotency_key: None,
            conversation: None,
        }
    }

    fn ev(s: &str) -> NewEvent {
        NewEvent::new(s.as_bytes().to_vec())
    }

    #[tokio::test]
    async fn seq_is_gapless_from_one_and_reads_after_cursor() {
        let s = MemoryStore::new(limits());
        let r = s.create_run(new_run(None, "o")).await.unwrap().run;
        assert_eq!(
            s.append(&r.run_id, vec![ev("a"), ev("b")]).await.unwrap(),
            2
        );
        assert_eq!(s.append(&r.run_id, vec![ev("c")]).await.unwrap(), 3);
        let b = s.read_after(&r.run_id, 0, 100, usize::MAX).await.unwrap();
        assert_eq!(
            b.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        let b = s.read_after(&r.run_id, 1, 1, usize::MAX).await.unwrap();
        assert_eq!(b.events.len(), 1);
        assert_eq!((b.events[0].seq, &b.events[0].data[..]), (2, &b"b"[..]));
        assert!(s
            .read_after(&r.run_id, 3, 10, usize::MAX)
            .await
            .unwrap()
            .events
            .is_empty());
        assert!(s
            .read_after(&r.run_id, 99, 10, usize::MAX)
            .await
            .unwrap()
            .events
            .is_empty());
    }

    #[tokio::test]
    async fn terminal_status_is_final() {
        let s = MemoryStore::new(limits());
        let r = s.create_run(new_run(None, "o")).await.unwrap().run;
        assert!(s
            .finish(&r.run_id, RunStatus::Completed, None, None)
            .await
            .unwrap());
        assert!(!s
            .finish(&r.run_id, RunStatus::Error, Some("x".into()), Some(ev("e")))
            .await
            .unwrap());
        let info = s.run(&r.run_id).await.unwrap();
        assert_eq!(
            (info.status, info.error, info.last_seq),
            (RunStatus::Completed, None, 0)
        );
        assert_eq!(
            s.append(&r.run_id, vec![ev("late")]).await,
            Err(StoreError::Finished)
        );
    }

    #[tokio::test]
    async fn finish_appends_the_final_event() {
        let s = MemoryStore::new(limits());
        let r = s.create_run(new_run(None, "o")).await.unwrap().run;
        s.append(&r.run_id, vec![ev("a")]).await.unwrap();
        s.finish(
            &r.run_id,
            RunStatus::Timeout,
            Some("slow".into()),
            Some(ev("t")),
        )
        .await
        .unwrap();
        let b = s.read_after(&r.run_id, 0, 10, usize::MAX).await.unwrap();
        assert_eq!((b.last_seq, b.status), (2, RunStatus::Timeout));
        assert_eq!(&b.events[1].data[..], b"t");
        assert_eq!(
            s.run(&r.run_id).await.unwrap().error.as_deref(),
            Some("slow")
        );
    }

    #[tokio::test]
    async fn threads_continue_and_refuse_a_second_active_run() {
        let s = MemoryStore::new(limits());
        let r1 = s.create_run(new_run(None, "o")).await.unwrap().run;
        let t = r1.thread_id.clone();
        assert_eq!(
            s.create_run(new_run(Some(t.clone()), "o")).await,
            Err(StoreError::RunInProgress(r1.run_id.clone()))
        );
        s.finish(&r1.run_id, RunStatus::Completed, None, None)
            .await
            .unwrap();
        let r2 = s
            .create_run(new_run(Some(t.clone()), "o"))
            .await
            .unwrap()
            .run;
        assert_eq!(r2.thread_id, t);
        let th = s.thread("o", &t).await.unwrap();
        assert_eq!(
            th.runs.iter().map(|r| r.run_id.clone()).collect::<Vec<_>>(),
            [r1.run_id, r2.run_id]
        );
        let mut other_agent = new_run(Some(t.clone()), "o");
        other_agent.agent_id = json!("x");
        assert!(matches!(
            s.create_run(other_agent).await,
            Err(StoreError::AgentMismatch(_))
        ));
    }

    #[tokio::test]
    async fn an_idempotency_key_returns_its_run_while_retained() {
        let s = Arc::new(MemoryStore::new(limits()));
        let keyed = |org: &str, key: &str| NewRun {
            idempotency_key: Some(key.into()),
            ..new_run(None, org)
        };
        // Concurrent retries: one run.
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let s = s.clone();
            let n = keyed("o", "m1");
            tasks.push(tokio::spawn(async move { s.create_run(n).await.unwrap() }));
        }
        let mut runs = Vec::new();
        for t in tasks {
            runs.push(t.await.unwrap());
        }
        assert_eq!(runs.iter().filter(|r| !r.existing).count(), 1);
        assert!(runs.iter().all(|r| r.run.run_id == runs[0].run.run_id));
        // Another organisation with the same key gets its own run; another key too.
        let other = s.create_run(keyed("p", "m1")).await.unwrap();
        assert!(!other.existing && other.run.run_id != runs[0].run.run_id);
        assert!(!s.create_run(keyed("o", "m2")).await.unwrap().existing);
        // Still returned once finished; forgotten once evicted.
        let id = runs[0].run.run_id.clone();
        s.finish(&id, RunStatus::Completed, None, None)
            .await
            .unwrap();
        assert!(s.create_run(keyed("o", "m1")).await.unwrap().existing);
        s.evict(&id);
        let again = s.create_run(keyed("o", "m1")).await.unwrap();
        assert!(!again.existing && again.run.run_id != id);
    }

    #[tokio::test]
    async fn another_organisation_sees_nothing() {
        let s = MemoryStore::new(limits());
        let r = s.create_run(new_run(None, "a")).await.unwrap().run;
        assert_eq!(
            s.thread("b", &r.thread_id).await,
            Err(StoreError::ThreadNotFound)
        );
        assert_eq!(
            s.create_run(new_run(Some(r.thread_id.clone()), "b")).await,
            Err(StoreError::ThreadNotFound)
        );
        assert_eq!(
            s.thread("a", &ThreadId("nope".into())).await,
            Err(StoreError::ThreadNotFound)
        );
    }

    #[tokio::test]
    async fn per_run_limits_keep_the_events_that_fit() {
        let mut l = limits();
        l.max_events_per_run = 4;
        l.max_bytes_per_run = 10;
        let s = MemoryStore::new(l);
        let r = s.create_run(new_run(None, "o")).await.unwrap().run;
        s.append(&r.run_id, vec![ev("12345"), ev("1234")])
            .await
            .unwrap();
        // Over the byte limit: what fits is kept, the rest refused.
        assert_eq!(
            s.append(&r.run_id, vec![ev(""), ev("12")]).await,
            Err(StoreError::RunLimit(RunLimit::Bytes))
        );
        assert_eq!(
            s.append(&r.run_id, vec![ev("1"), ev("")]).await,
            Err(StoreError::RunLimit(RunLimit::Events))
        );
        let b = s.read_after(&r.run_id, 0, 10, usize::MAX).await.unwrap();
        assert_eq!(b.last_seq, 4);
        assert_eq!(
            b.events.iter().map(|e| &e.data[..]).collect::<Vec<_>>(),
            [&b"12345"[..], b"1234", b"", b"1"]
        );
        // Everything held is counted: payloads, per-event overhead, the log, the records.
        assert_eq!(
            s.bytes_held(),
            10 + 4 * EVENT_OVERHEAD + slots(4) + record() + records(1)
        );
        assert_eq!(s.org_usage("o"), (1, s.bytes_held()));
        // The run's end is still recorded, with its closing event.
        assert!(s
            .finish(&r.run_id, RunStatus::Error, None, Some(ev("e")))
            .await
            .unwrap());
        assert_eq!(s.run(&r.run_id).await.unwrap().last_seq, 5);
    }

    #[tokio::test]
    async fn a_runs_limit_counts_its_own_events_not_the_threads() {
        let mut l = limits();
        l.max_events_per_run = 3;
        let s = MemoryStore::new(l);
        let r1 = s.create_run(new_run(None, "o")).await.unwrap().run;
        s.append(&r1.run_id, vec![ev("a"), ev("b"), ev("c")])
            .await
            .unwrap();
        s.finish(&r1.run_id, RunStatus::Completed, None, None)
            .await
            .unwrap();
        let r2 = s
            .create_run(new_run(Some(r1.thread_id.clone()), "o"))
            .await
            .unwrap()
            .run;
        assert_eq!((r2.first_seq, r2.last_seq), (4, 3));
        assert_eq!(
            s.append(&r2.run_id, vec![ev("d"), ev("e"), ev("f")]).await,
            Ok(6)
        );
    }

    #[tokio::test]
    async fn seq_runs_through_the_thread() {
        let s = MemoryStore::new(limits());
        let r1 = s.create_run(new_run(None, "o")).await.unwrap().run;
        let t = r1.thread_id.clone();
        s.append(&r1.run_id, vec![ev("a"), ev("b")]).await.unwrap();
        s.finish(&r1.run_id, RunStatus::Completed, None, Some(ev("end")))
            .await
            .unwrap();
        let r2 = s
            .create_run(new_run(Some(t.clone()), "o"))
            .await
            .unwrap()
            .run;
        assert_eq!(r2.first_seq, 4);
        assert_eq!(s.append(&r2.run_id, vec![ev("c")]).await, Ok(4));
        let b = s.read_after(&r2.run_id, 3, 10, usize::MAX).await.unwrap();
        assert_eq!(b.events.iter().map(|e| e.seq).collect::<Vec<_>>(), [4]);
        // A cursor before the run's start reads the run from its first event.
        assert_eq!(
            s.read_after(&r2.run_id, 0, 10, usize::MAX)
                .await
                .unwrap()
                .events
                .len(),
            1
        );
        let th = s.thread("o", &t).await.unwrap();
        assert_eq!(th.last_seq(), 4);
        assert_eq!(
            th.runs
                .iter()
                .map(|r| (r.first_seq, r.last_seq))
                .collect::<Vec<_>>(),
            [(1, 3), (4, 4)]
        );
    }

    #[tokio::test]
    async fn finished_runs_are_evicted_first_then_new_runs_refused() {
        let mut l = limits();
        // What the live run and the threads hold besides payloads, when its log is at 9000.
        let besides = record() + records(2) + 40 + 2 * EVENT_OVERHEAD + slots(2);
        l.max_total_bytes = 10_000 + besides;
        l.max_bytes_per_run = 50_000;
        let s = MemoryStore::new(l);
        let old = s.create_run(new_run(None, "o")).await.unwrap().run;
        s.append(&old.run_id, vec![ev(&"x".repeat(6000))])
            .await
            .unwrap();
        s.finish(&old.run_id, RunStatus::Completed, None, None)
            .await
            .unwrap();
        let live = s.create_run(new_run(None, "o")).await.unwrap().run;
        // Appending 5000 more would overflow: the finished run goes, the live one stays.
        s.append(&live.run_id, vec![ev(&"y".repeat(5000))])
            .await
            .unwrap();
        assert_eq!(s.run(&old.run_id).await, Err(StoreError::RunNotFound));
        // Its thread is still there, knowing what it lost.
        let th = s.thread("o", &old.thread_id).await.unwrap();
        assert!(th.runs.is_empty());
        assert_eq!(
            (th.evicted_runs, th.evicted_through, th.last_seq()),
            (1, 1, 1)
        );
        assert_eq!(
            th.latest_evicted.map(|o| (o.run_id, o.status)),
            Some((old.run_id.clone(), RunStatus::Completed))
        );
        let held = 5000 + EVENT_OVERHEAD + slots(1) + record() + records(2) + 40;
        assert_eq!(s.bytes_held(), held);
        s.append(&live.run_id, vec![ev(&"z".repeat(4000))])
            .await
            .unwrap();
        // 90% held by a live run: no new runs, and no overflow for the live run.
        assert!(matches!(
            s.create_run(new_run(None, "o")).await,
            Err(StoreError::Full { .. })
        ));
        assert!(matches!(
            s.append(&live.run_id, vec![ev(&"w".repeat(1000))]).await,
            Err(StoreError::Full { .. })
        ));
        s.finish(&live.run_id, RunStatus::Completed, None, None)
            .await
            .unwrap();
        // Once it has finished it can be evicted to admit new work.
        s.create_run(new_run(None, "o")).await.unwrap();
        assert_eq!(s.bytes_held(), records(3) + 80 + record());
    }

    #[tokio::test]
    async fn nothing_is_evicted_for_a_request_that_would_be_refused_anyway() {
        let mut l = limits();
        // Room for the live run at 90 % and the finished one beside it.
        l.max_total_bytes = 11_000;
        l.max_bytes_per_run = 50_000;
        let s = MemoryStore::new(l);
        let done = s.create_run(new_run(None, "o")).await.unwrap().run;
        s.append(&done.run_id, vec![ev(&"x".repeat(50))])
            .await
            .unwrap();
        s.finish(&done.run_id, RunStatus::Completed, None, None)
            .await
            .unwrap();
        let live = s.create_run(new_run(None, "o")).await.unwrap().run;
        // Live: both thread records, its own record and one event.
        let fill = (9900 - records(2) - record() - EVENT_OVERHEAD - slots(1)) as usize;
        s.append(&live.run_id, vec![ev(&"y".repeat(fill))])
            .await
            .unwrap();
        // Live runs (and thread records) alone hold 90%: new work is refused, and the finished
        // run survives.
        assert!(matches!(
            s.create_run(new_run(None, "o")).await,
            Err(StoreError::Full { .. })
        ));
        assert!(matches!(
            s.append(&live.run_id, vec![ev(&"z".repeat(2001))]).await,
            Err(StoreError::Full { .. })
        ));
        assert!(s.run(&done.run_id).await.is_ok());
        let done_holds = 50 + EVENT_OVERHEAD + slots(1) + record();
        assert_eq!(s.bytes_held(), 9900 + done_holds);
    }

    #[tokio::test]
    async fn keyed_runs_are_evicted_without_deadlock() {
        let mut l = limits();
        l.max_total_bytes = 1000 + 2 * (records(64) + 64 * 40);
        l.max_bytes_per_run = 1000;
        let s = MemoryStore::new(l);
        // Many finished keyed runs, each forcing the eviction of earlier ones.
        for i in 0..64 {
            let new = NewRun {
                idempotency_key: Some(format!("k{i}")),
                ..new_run(None, "o")
            };
            let total = s.bytes_held();
            let run = tokio::time::timeout(Duration::from_secs(5), s.create_run(new))
                .await
                .expect("no deadlock")
                .unwrap_or_else(|e| panic!("run {i}: {e} (held {total})"))
                .run;
            s.append(&run.run_id, vec![ev(&"x".repeat(400))])
                .await
                .unwrap();
            s.finish(&run.run_id, RunStatus::Completed, None, None)
                .await
                .unwrap();
        }
        assert!(s.bytes_held() <= 1000 + 2 * (records(64) + 64 * 40));
        assert!(s.runs.len() < 64, "runs were evicted");
        assert!(
            s.keys.len() == s.runs.len(),
            "evicted runs' keys are forgotten: {}",
            s.keys.len()
        );
    }

    #[tokio::test]
    async fn retention_sweep_evicts_only_expired_runs() {
        let mut l = limits();
        l.retention = Duration::from_millis(50);
        l.thread_retention = Duration::from_millis(150);
        let s = MemoryStore::new(l);
        let done = s.create_run(new_run(None, "o")).await.unwrap().run;
        s.append(&done.run_id, vec![ev("a")]).await.unwrap();
        s.finish(&done.run_id, RunStatus::Completed, None, None)
            .await
            .unwrap();
        let live = s.create_run(new_run(None, "o")).await.unwrap().run;
        assert_eq!(s.sweep().await, 0);
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert_eq!(s.sweep().await, 1);
        assert_eq!(s.run(&done.run_id).await, Err(StoreError::RunNotFound));
        assert!(s.run(&live.run_id).await.is_ok());
        // The thread record outlives its run for `thread_retention`, then goes too.
        assert_eq!(s.bytes_held(), records(2) + 40 + record());
        assert!(s.thread("o", &done.thread_id).await.is_ok());
        tokio::time::sleep(Duration::from_millis(200)).await;
        s.sweep().await;
        assert_eq!(
            s.thread("o", &done.thread_id).await,
            Err(StoreError::ThreadNotFound)
        );
        assert!(s.thread("o", &live.thread_id).await.is_ok());
        assert_eq!(s.bytes_held(), records(1) + record());
    }

    #[tokio::test]
    async fn user_messages_are_counted_and_bound_new_runs() {
        let mut l = limits();
        l.max_total_bytes = 1 << 20;
        let s = MemoryStore::new(l);
        let big = |i: usize| NewRun {
            user_message: json!({"id": format!("m{i}"), "role": "user",
                "parts": [{"type": "text", "text": "x".repeat(100_000)}]}),
            ..new_run(None, "o")
        };
        let mut started = 0;
        for i in 0..20 {
            match s.create_run(big(i)).await {
                Ok(_) => started += 1,
                Err(StoreError::Full { .. }) => break,
                Err(e) => panic!("{e}"),
            }
        }
        // About nine 100 kB messages fit under 90 % of 1 MiB; none of them has an event.
        assert!((8..=10).contains(&started), "{started} runs started");
        assert!(s.bytes_held() >= started * 100_000);
        assert!(s.bytes_held() <= s.budget().max_total());
    }

    #[tokio::test]
    async fn reads_are_bounded_by_bytes_but_always_make_progress() {
        let s = MemoryStore::new(limits());
        let r = s.create_run(new_run(None, "o")).await.unwrap().run;
        let batch = vec![
            ev(&"a".repeat(3000)),
            ev("b"),
            ev(&"c".repeat(3000)),
            ev("d"),
        ];
        s.append(&r.run_id, batch).await.unwrap();
        let seqs = |b: ReadBatch| b.events.iter().map(|e| e.seq).collect::<Vec<_>>();
        assert_eq!(
            seqs(s.read_after(&r.run_id, 0, 10, 3001).await.unwrap()),
            [1, 2]
        );
        assert_eq!(seqs(s.read_after(&r.run_id, 0, 10, 1).await.unwrap()), [1]);
        assert_eq!(
            seqs(s.read_after(&r.run_id, 1, 10, 6001).await.unwrap()),
            [2, 3, 4]
        );
    }

    fn quotas(running: u64, bytes: u64) -> Quotas {
        let mut q = Quotas::unlimited();
        q.default.max_running_runs = running;
        q.default.max_bytes = bytes;
        q
    }

    #[tokio::test]
    async fn an_organisation_at_its_running_quota_is_refused_and_others_are_not() {
        let mut l = limits();
        l.quotas = quotas(2, u64::MAX);
        let s = MemoryStore::new(l);
        let a1 = s.create_run(new_run(None, "a")).await.unwrap().run;
        s.create_run(new_run(None, "a")).await.unwrap();
        let refused = s.create_run(new_run(None, "a")).await;
        assert!(matches!(
            refused,
            Err(StoreError::Quota {
                kind: QuotaKind::RunningRuns,
                ..
            })
        ));
        // The refusal left no thread behind.
        assert_eq!(s.threads.len(), 2);
        s.create_run(new_run(None, "b")).await.unwrap();
        // A run's end gives its place back; a re-attach by key needs none.
        s.finish(&a1.run_id, RunStatus::Completed, None, None)
            .await
            .unwrap();
        s.create_run(new_run(None, "a")).await.unwrap();
        assert_eq!(s.org_usage("a").0, 2);
    }

    #[tokio::test]
    async fn an_organisation_at_its_bytes_quota_evicts_its_own_runs_first_then_is_refused() {
        let mut l = limits();
        let quota = 20_000;
        l.quotas = quotas(u64::MAX, quota);
        l.max_bytes_per_run = 50_000;
        let s = MemoryStore::new(l);
        let b = s.create_run(new_run(None, "b")).await.unwrap().run;
        s.append(&b.run_id, vec![ev("b")]).await.unwrap();
        s.finish(&b.run_id, RunStatus::Completed, None, None)
            .await
            .unwrap();
        // Org a fills its quota with finished runs: its own oldest go to make room.
        let mut runs = Vec::new();
        for _ in 0..8 {
            let r = s.create_run(new_run(None, "a")).await.unwrap().run;
            s.append(&r.run_id, vec![ev(&"x".repeat(4000))])
                .await
                .unwrap();
            s.finish(&r.run_id, RunStatus::Completed, None, None)
                .await
                .unwrap();
            runs.push(r);
        }
        assert!(s.run(&runs[0].run_id).await.is_err(), "a's oldest went");
        assert!(s.run(&runs[7].run_id).await.is_ok());
        assert!(s.org_usage("a").1 < quota + 5_000);
        // b's finished run is untouched.
        assert!(s.run(&b.run_id).await.is_ok());
        // Runs in progress alone at the quota: refused, nothing evicted.
        let live = s.create_run(new_run(None, "a")).await.unwrap().run;
        s.append(&live.run_id, vec![ev(&"y".repeat(10_000)); 2])
            .await
            .unwrap();
        let kept = s.runs.len();
        assert!(matches!(
            s.create_run(new_run(None, "a")).await,
            Err(StoreError::Quota {
                kind: QuotaKind::Bytes,
                ..
            })
        ));
        assert_eq!(s.runs.len(), kept, "nothing evicted for a refusal");
        assert!(s.run(&b.run_id).await.is_ok());
        s.create_run(new_run(None, "b")).await.unwrap();
    }

    #[tokio::test]
    async fn pressure_evicts_from_the_organisation_over_its_share_first() {
        let mut l = limits();
        l.max_total_bytes = 40_000;
        l.max_bytes_per_run = 40_000;
        let s = MemoryStore::new(l);
        // b finished first (its run is the oldest of all), then a holds far more than half.
        let b = s.create_run(new_run(None, "b")).await.unwrap().run;
        s.append(&b.run_id, vec![ev(&"b".repeat(2000))])
            .await
            .unwrap();
        s.finish(&b.run_id, RunStatus::Completed, None, None)
            .await
            .unwrap();
        let mut a = Vec::new();
        for _ in 0..4 {
            let r = s.create_run(new_run(None, "a")).await.unwrap().run;
            s.append(&r.run_id, vec![ev(&"a".repeat(6000))])
                .await
                .unwrap();
            s.finish(&r.run_id, RunStatus::Completed, None, None)
                .await
                .unwrap();
            a.push(r);
        }
        // A live run of a needs room: a's finished runs go, b's older one stays.
        let live = s.create_run(new_run(None, "a")).await.unwrap().run;
        s.append(&live.run_id, vec![ev(&"l".repeat(9000))])
            .await
            .unwrap();
        assert!(s.run(&a[0].run_id).await.is_err());
        assert!(s.run(&b.run_id).await.is_ok(), "b is within its share");
    }

    #[tokio::test]
    async fn a_thread_continues_after_its_runs_were_evicted() {
        let mut l = limits();
        l.retention = Duration::from_millis(1);
        l.thread_retention = Duration::from_millis(100);
        let s = MemoryStore::new(l);
        let r1 = s.create_run(new_run(None, "o")).await.unwrap().run;
        s.append(&r1.run_id, vec![ev("a"), ev("b")]).await.unwrap();
        s.finish(&r1.run_id, RunStatus::Completed, None, None)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(s.sweep().await, 1);
        let r2 = s
            .create_run(new_run(Some(r1.thread_id.clone()), "o"))
            .await
            .unwrap()
            .run;
        assert_eq!(r2.first_seq, 3);
        // A thread in use is not forgotten, however long ago its first run was evicted.
        tokio::time::sleep(Duration::from_millis(120)).await;
        s.sweep().await;
        let th = s.thread("o", &r1.thread_id).await.unwrap();
        assert_eq!((th.evicted_runs, th.evicted_through), (1, 2));
        assert_eq!(th.evicted, [r1.run_id]);
        assert_eq!(th.runs.len(), 1);
        // Another organisation still sees nothing.
        assert_eq!(
            s.create_run(new_run(Some(r1.thread_id.clone()), "p")).await,
            Err(StoreError::ThreadNotFound)
        );
    }

    #[tokio::test]
    async fn a_retry_after_a_failure_starts_a_new_run_in_the_same_thread() {
        let s = MemoryStore::new(limits());
        let keyed = |thread: Option<ThreadId>| NewRun {
            idempotency_key: Some("m1".into()),
            ..new_run(thread, "o")
        };
        for failed in [RunStatus::Error, RunStatus::Timeout] {
            let first = s.create_run(keyed(None)).await.unwrap();
            s.finish(&first.run.run_id, failed, Some("x".into()), Some(ev("e")))
                .await
                .unwrap();
            let retry = s.create_run(keyed(None)).await.unwrap();
            assert!(!retry.existing, "{failed:?}");
            assert_eq!(retry.run.thread_id, first.run.thread_id);
            assert_eq!(retry.run.first_seq, 2);
            // While the new run is in progress (or once done), retries re-attach to it.
            let again = s.create_run(keyed(None)).await.unwrap();
            assert!(again.existing && again.run.run_id == retry.run.run_id);
            s.finish(
                &retry.run.run_id,
                RunStatus::Completed,
                None,
                Some(ev("end")),
            )
            .await
            .unwrap();
            assert!(s.create_run(keyed(None)).await.unwrap().existing);
            let th = s.thread("o", &first.run.thread_id).await.unwrap();
            assert_eq!(th.runs.len(), 2, "the failed run stays in the history");
            s.forget_key("o", "u", "m1", &retry.run.run_id).await;
        }
        // Stopped and completed runs re-attach.
        let stopped = s.create_run(keyed(None)).await.unwrap();
        s.finish(&stopped.run.run_id, RunStatus::Stopped, None, None)
            .await
            .unwrap();
        assert!(s.create_run(keyed(None)).await.unwrap().existing);
    }

    #[tokio::test]
    async fn concurrent_first_uses_of_a_conversation_make_one_thread() {
        for _ in 0..20 {
            let s = Arc::new(MemoryStore::new(limits()));
            let mut tasks = Vec::new();
            for i in 0..8 {
                let s = s.clone();
                tasks.push(tokio::spawn(async move {
                    let new = NewRun {
                        conversation: Some("c-100".into()),
                        idempotency_key: Some(format!("m{i}")),
                        ..new_run(None, "o")
                    };
                    s.create_run(new).await
                }));
            }
            let mut threads = std::collections::HashSet::new();
            let mut started = 0;
            for t in tasks {
                match t.await.unwrap() {
                    Ok(st) => {
                        started += 1;
                        threads.insert(st.run.thread_id);
                    }
                    Err(StoreError::RunInProgress(_)) => {}
                    Err(e) => panic!("{e}"),
                }
            }
            assert_eq!((threads.len(), started), (1, 1));
        }
    }

    #[tokio::test]
    async fn wait_thread_wakes_for_events_new_runs_and_ends() {
        let s = Arc::new(MemoryStore::new(limits()));
        let r1 = s.create_run(new_run(None, "o")).await.unwrap().run;
        let t = r1.thread_id.clone();
        s.append(&r1.run_id, vec![ev("a")]).await.unwrap();
        s.finish(&r1.run_id, RunStatus::Completed, None, Some(ev("end")))
            .await
            .unwrap();
        let long = Duration::from_secs(10);
        // Something after the cursor: at once.
        let seen = s.thread("o", &t).await.unwrap().latest_run();
        tokio::time::timeout(
            Duration::from_secs(1),
            s.wait_thread("o", &t, &seen, 1, long),
        )
        .await
        .unwrap()
        .unwrap();
        // At the end of a finished thread: until the next run starts.
        let (s2, t2, seen2) = (s.clone(), t.clone(), seen.clone());
        let waiter = tokio::spawn(async move { s2.wait_thread("o", &t2, &seen2, 2, long).await });
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(!waiter.is_finished());
        // A change the caller has not seen, even one made before the call, wakes at once.
        let r2 = s
            .create_run(new_run(Some(t.clone()), "o"))
            .await
            .unwrap()
            .run;
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        tokio::time::timeout(
            Duration::from_secs(1),
            s.wait_thread("o", &t, &seen, 2, long),
        )
        .await
        .unwrap()
        .unwrap();
        // On a live run with nothing new: until its end.
        let seen = s.thread("o", &t).await.unwrap().latest_run();
        let (s2, t2) = (s.clone(), t.clone());
        let waiter = tokio::spawn(async move { s2.wait_thread("o", &t2, &seen, 2, long).await });
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(!waiter.is_finished());
        s.finish(&r2.run_id, RunStatus::Stopped, None, None)
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(
            s.wait_thread("p", &t, &None, 0, long).await,
            Err(StoreError::ThreadNotFound)
        );
    }

    #[tokio::test]
    async fn wait_wakes_on_append_and_on_finish_and_times_out() {
        let s = Arc::new(MemoryStore::new(limits()));
        let r = s.create_run(new_run(None, "o")).await.unwrap().run;
        let (s2, id) = (s.clone(), r.run_id.clone());
        let waiter = tokio::spawn(async move { s2.wait(&id, 0, Duration::from_secs(10)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        s.append(&r.run_id, vec![ev("a")]).await.unwrap();
        assert_eq!(waiter.await.unwrap().unwrap(), (1, RunStatus::InProgress));

        let (s2, id) = (s.clone(), r.run_id.clone());
        let waiter = tokio::spawn(async move { s2.wait(&id, 1, Duration::from_secs(10)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        s.finish(&r.run_id, RunStatus::Stopped, None, None)
            .await
            .unwrap();
        assert_eq!(waiter.await.unwrap().unwrap(), (1, RunStatus::Stopped));

        let r2 = s.create_run(new_run(None, "o")).await.unwrap().run;
        let t0 = Instant::now();
        let got = s
            .wait(&r2.run_id, 0, Duration::from_millis(30))
            .await
            .unwrap();
        assert_eq!(got, (0, RunStatus::InProgress));
        assert!(t0.elapsed() >= Duration::from_millis(25));
    }

    proptest! {
        /// Any interleaving of batch sizes yields seq 1..n in order, and every cursor reads
        /// exactly the events after it.
        #[test]
        fn log_is_gapless_and_cursor_reads_are_exact(batches in prop::collection::vec(0usize..5, 1..20)) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let s = MemoryStore::new(limits());
                let r = s.create_run(new_run(None, "o")).await.unwrap().run;
                let mut n = 0u64;
                for b in batches {
                    let evs = (0..b).map(|i| ev(&format!("{}", n + i as u64 + 1))).collect();
                    n = s.append(&r.run_id, evs).await.unwrap();
                }
                for k in 0..=n {
                    let got = s.read_after(&r.run_id, k, usize::MAX, usize::MAX).await.unwrap();
                    let seqs: Vec<u64> = got.events.iter().map(|e| e.seq).collect();
                    prop_assert_eq!(seqs, ((k + 1)..=n).collect::<Vec<_>>());
                    for e in &got.events {
                        let want = e.seq.to_string();
                        prop_assert_eq!(&e.data[..], want.as_bytes());
                    }
                }
                Ok(())
            })?;
        }
    }
}
