//! The embedded store: everything in this process's memory.
//!
//! Runs live in a `DashMap` of cells; each cell holds its log behind a mutex and a `watch`
//! channel that is bumped on every change, so waiters (streams, long polls) sleep on a channel
//! instead of holding a thread. Memory is bounded by the per-run and total limits: finished runs
//! are evicted when their retention passes, and first (oldest finished first) under pressure;
//! new runs are refused once the store is 90% full even after eviction, leaving headroom for
//! runs already in progress.
//!
//! Lock order: a thread entry may be held while a run cell is locked, never the reverse.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use dashmap::DashMap;
use tokio::sync::watch;

use super::{
    NewRun, ReadBatch, RunId, RunInfo, RunLimit, RunStatus, Started, Store, StoreError, ThreadId,
    ThreadInfo,
};
use crate::event::{Event, NewEvent};

/// Limits the memory store enforces.
#[derive(Clone, Debug)]
pub struct MemoryLimits {
    /// Most events per run.
    pub max_events_per_run: u64,
    /// Most payload bytes per run.
    pub max_bytes_per_run: u64,
    /// Most payload bytes in all.
    pub max_total_bytes: u64,
    /// How long finished runs are kept.
    pub retention: Duration,
    /// `Retry-After` for [`StoreError::Full`].
    pub retry_after: Duration,
}

struct RunState {
    info: RunInfo,
    events: Vec<Event>,
}

struct RunCell {
    state: Mutex<RunState>,
    changed: watch::Sender<u64>,
}

struct ThreadRec {
    org_id: String,
    agent_id: serde_json::Value,
    created_at: SystemTime,
    runs: Vec<RunId>,
    /// The client's conversation id this thread stands for (AgentFlow dialect).
    conversation: Option<String>,
    /// Recently evicted runs of the thread (at most [`EVICTED_REMEMBERED`]).
    evicted: VecDeque<RunId>,
}

/// Evicted run ids remembered per thread.
const EVICTED_REMEMBERED: usize = 16;

/// The embedded [`Store`].
pub struct MemoryStore {
    limits: MemoryLimits,
    runs: DashMap<RunId, Arc<RunCell>>,
    threads: DashMap<ThreadId, ThreadRec>,
    /// (organisation, idempotency key) → run.
    keys: DashMap<(String, String), RunId>,
    /// (organisation, client conversation id) → thread.
    conversations: DashMap<(String, String), ThreadId>,
    total_bytes: AtomicU64,
    /// The part of `total_bytes` held by finished (evictable) runs.
    finished_bytes: AtomicU64,
    /// Finished runs in the order they finished (oldest first).
    finished: Mutex<VecDeque<(Instant, RunId)>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding a lock cannot leave a log half-written (every mutation is a
    // single push or field store), so a poisoned lock is still safe to use.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl MemoryStore {
    /// An empty store.
    pub fn new(limits: MemoryLimits) -> Self {
        MemoryStore {
            limits,
            runs: DashMap::new(),
            threads: DashMap::new(),
            keys: DashMap::new(),
            conversations: DashMap::new(),
            total_bytes: AtomicU64::new(0),
            finished_bytes: AtomicU64::new(0),
            finished: Mutex::new(VecDeque::new()),
        }
    }

    fn cell(&self, run: &RunId) -> Result<Arc<RunCell>, StoreError> {
        self.runs
            .get(run)
            .map(|c| c.value().clone())
            .ok_or(StoreError::RunNotFound)
    }

    fn full(&self) -> StoreError {
        StoreError::Full {
            retry_after: self.limits.retry_after,
        }
    }

    /// Evict finished runs, oldest first, until `fits()` holds or none are left.
    ///
    /// Evicts nothing when even evicting every finished run would not be enough: finished
    /// conversations are not thrown away for a request that would be refused anyway.
    fn evict_until(&self, fits: impl Fn(u64) -> bool) {
        let total = self.total_bytes.load(Ordering::Acquire);
        let finished = self.finished_bytes.load(Ordering::Acquire);
        if !fits(total.saturating_sub(finished)) {
            return;
        }
        while !fits(self.total_bytes.load(Ordering::Acquire)) {
            let next = lock(&self.finished).pop_front();
            match next {
                Some((_, run)) => self.evict(&run),
                None => return,
            }
        }
    }

    fn evict(&self, run: &RunId) {
        let Some((_, cell)) = self.runs.remove(run) else {
            return;
        };
        let (bytes, thread_id, key) = {
            let st = lock(&cell.state);
            let key = st
                .info
                .idempotency_key
                .clone()
                .map(|k| (st.info.org_id.clone(), k));
            (st.info.bytes, st.info.thread_id.clone(), key)
        };
        if let Some(key) = key {
            self.keys.remove_if(&key, |_, r| r == run);
        }
        self.total_bytes.fetch_sub(bytes, Ordering::AcqRel);
        // Only finished runs are evicted.
        self.finished_bytes.fetch_sub(bytes, Ordering::AcqRel);
        // Wake waiters so they notice the run is gone.
        cell.changed.send_modify(|v| *v += 1);
        let empty = match self.threads.get_mut(&thread_id) {
            Some(mut t) => {
                t.runs.retain(|r| r != run);
                if t.evicted.len() == EVICTED_REMEMBERED {
                    t.evicted.pop_front();
                }
                t.evicted.push_back(run.clone());
                t.runs.is_empty()
            }
            None => false,
        };
        if empty {
            if let Some((_, t)) = self.threads.remove_if(&thread_id, |_, t| t.runs.is_empty()) {
                if let Some(conv) = t.conversation {
                    self.conversations
                        .remove_if(&(t.org_id, conv), |_, th| *th == thread_id);
                }
            }
        }
    }

    fn high_water(&self) -> u64 {
        self.limits.max_total_bytes / 10 * 9
    }

    /// Create a run (no idempotency bookkeeping). Evicts nothing: callers make room first,
    /// before taking any lock that eviction needs.
    fn create_new(&self, new: NewRun) -> Result<RunInfo, StoreError> {
        if self.total_bytes.load(Ordering::Acquire) >= self.high_water() {
            return Err(self.full());
        }
        let now = SystemTime::now();
        let run_id = RunId::generate();
        let make_info = |thread_id: ThreadId| RunInfo {
            assistant_message_id: format!("msg_{}", &run_id.0[4..]),
            run_id: run_id.clone(),
            thread_id,
            org_id: new.org_id.clone(),
            user_id: new.user_id.clone(),
            agent_id: new.agent_id.clone(),
            status: RunStatus::InProgress,
            error: None,
            last_seq: 0,
            bytes: 0,
            created_at: now,
            updated_at: now,
            user_message: new.user_message.clone(),
            idempotency_key: new.idempotency_key.clone(),
        };
        let insert_run = |info: &RunInfo| {
            let (changed, _) = watch::channel(0);
            let cell = RunCell {
                state: Mutex::new(RunState {
                    info: info.clone(),
                    events: Vec::new(),
                }),
                changed,
            };
            self.runs.insert(info.run_id.clone(), Arc::new(cell));
        };
        // A client conversation id names a thread of its own organisation, created on first use.
        let mut thread_id = new.thread_id.clone();
        if let (None, Some(conv)) = (&thread_id, &new.conversation) {
            let key = (new.org_id.clone(), conv.clone());
            let known = self.conversations.get(&key).map(|t| t.clone());
            match known {
                Some(t) if self.threads.contains_key(&t) => thread_id = Some(t),
                _ => {
                    let t = ThreadId::generate();
                    self.conversations.insert(key, t.clone());
                    thread_id = Some(t.clone());
                    self.threads.insert(
                        t,
                        ThreadRec {
                            org_id: new.org_id.clone(),
                            agent_id: new.agent_id.clone(),
                            created_at: now,
                            runs: Vec::new(),
                            conversation: Some(conv.clone()),
                            evicted: VecDeque::new(),
                        },
                    );
                }
            }
        }
        match thread_id {
            None => {
                let thread_id = ThreadId::generate();
                let info = make_info(thread_id.clone());
                insert_run(&info);
                self.threads.insert(
                    thread_id,
                    ThreadRec {
                        org_id: new.org_id.clone(),
                        agent_id: new.agent_id.clone(),
                        created_at: now,
                        runs: vec![run_id.clone()],
                        conversation: None,
                        evicted: VecDeque::new(),
                    },
                );
                Ok(info)
            }
            Some(thread_id) => {
                let mut thread = match self.threads.get_mut(&thread_id) {
                    Some(t) if t.org_id == new.org_id => t,
                    _ => return Err(StoreError::ThreadNotFound),
                };
                if thread.agent_id != new.agent_id {
                    return Err(StoreError::AgentMismatch(agent_label(&thread.agent_id)));
                }
                if let Some(last) = thread.runs.last() {
                    if let Some(info) = self.info_of(last) {
                        if !info.status.is_terminal() {
                            return Err(StoreError::RunInProgress(info.run_id));
                        }
                    }
                }
                let info = make_info(thread_id);
                insert_run(&info);
                thread.runs.push(run_id.clone());
                Ok(info)
            }
        }
    }

    fn info_of(&self, run: &RunId) -> Option<RunInfo> {
        self.runs.get(run).map(|c| lock(&c.state).info.clone())
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn create_run(&self, new: NewRun) -> Result<Started, StoreError> {
        // Make room first: eviction takes the locks of `keys`, which the entry below holds.
        let high_water = self.high_water();
        self.evict_until(|total| total < high_water);
        let Some(key) = new.idempotency_key.clone() else {
            return self.create_new(new).map(|run| Started {
                run,
                existing: false,
            });
        };
        // The key's entry is held while the run is created, so concurrent retries get one run.
        match self.keys.entry((new.org_id.clone(), key)) {
            dashmap::Entry::Occupied(mut e) => {
                if let Some(run) = self.info_of(e.get()) {
                    let same_thread = new.thread_id.as_ref().is_none_or(|t| *t == run.thread_id);
                    if same_thread && run.agent_id == new.agent_id {
                        return Ok(Started {
                            run,
                            existing: true,
                        });
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

    async fn forget_key(&self, org_id: &str, key: &str, run: &RunId) {
        self.keys
            .remove_if(&(org_id.to_string(), key.to_string()), |_, r| r == run);
    }

    async fn append(&self, run: &RunId, events: Vec<NewEvent>) -> Result<u64, StoreError> {
        let cell = self.cell(run)?;
        let incoming: u64 = events.iter().map(|e| e.data.len() as u64).sum();
        let max_total = self.limits.max_total_bytes;
        self.evict_until(|total| total + incoming <= max_total);
        let mut st = lock(&cell.state);
        if st.info.status.is_terminal() {
            return Err(StoreError::Finished);
        }
        if st.info.last_seq + events.len() as u64 > self.limits.max_events_per_run {
            return Err(StoreError::RunLimit(RunLimit::Events));
        }
        if st.info.bytes + incoming > self.limits.max_bytes_per_run {
            return Err(StoreError::RunLimit(RunLimit::Bytes));
        }
        // Reserve the bytes; refuse if the budget is exhausted even after eviction.
        let reserved = self
            .total_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
                (t + incoming <= max_total).then_some(t + incoming)
            });
        if reserved.is_err() {
            return Err(self.full());
        }
        for ev in events {
            st.info.last_seq += 1;
            let seq = st.info.last_seq;
            st.events.push(ev.at(seq));
        }
        st.info.bytes += incoming;
        st.info.updated_at = SystemTime::now();
        let last = st.info.last_seq;
        drop(st);
        cell.changed.send_modify(|v| *v += 1);
        Ok(last)
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
            self.total_bytes.fetch_add(n, Ordering::AcqRel);
            st.info.bytes += n;
            st.info.last_seq += 1;
            let seq = st.info.last_seq;
            st.events.push(ev.at(seq));
        }
        st.info.status = if status.is_terminal() {
            status
        } else {
            RunStatus::Error
        };
        st.info.error = error;
        st.info.updated_at = SystemTime::now();
        self.finished_bytes
            .fetch_add(st.info.bytes, Ordering::AcqRel);
        drop(st);
        lock(&self.finished).push_back((Instant::now(), run.clone()));
        cell.changed.send_modify(|v| *v += 1);
        Ok(true)
    }

    async fn run(&self, run: &RunId) -> Result<RunInfo, StoreError> {
        self.info_of(run).ok_or(StoreError::RunNotFound)
    }

    async fn thread(&self, org_id: &str, thread: &ThreadId) -> Result<ThreadInfo, StoreError> {
        let (agent_id, created_at, run_ids, evicted) = match self.threads.get(thread) {
            Some(t) if t.org_id == org_id => (
                t.agent_id.clone(),
                t.created_at,
                t.runs.clone(),
                t.evicted.iter().cloned().collect(),
            ),
            _ => return Err(StoreError::ThreadNotFound),
        };
        let runs: Vec<RunInfo> = run_ids.iter().filter_map(|r| self.info_of(r)).collect();
        if runs.is_empty() {
            return Err(StoreError::ThreadNotFound);
        }
        Ok(ThreadInfo {
            thread_id: thread.clone(),
            org_id: org_id.to_string(),
            agent_id,
            created_at,
            runs,
            evicted,
        })
    }

    async fn read_after(
        &self,
        run: &RunId,
        after: u64,
        max: usize,
    ) -> Result<ReadBatch, StoreError> {
        let cell = self.cell(run)?;
        let st = lock(&cell.state);
        let first = st.events.first().map_or(1, |e| e.seq);
        let start = (after + 1).saturating_sub(first) as usize;
        let events = st
            .events
            .get(start.min(st.events.len())..)
            .unwrap_or(&[])
            .iter()
            .take(max)
            .cloned()
            .collect();
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
        let deadline = tokio::time::Instant::now() + timeout;
        let cell = self.cell(run)?;
        let mut rx = cell.changed.subscribe();
        drop(cell);
        loop {
            // Subscribed before reading, so no change between the read and the wait is missed.
            let (last, status) = {
                let cell = self.cell(run)?;
                let st = lock(&cell.state);
                (st.info.last_seq, st.info.status)
            };
            if last > after || status.is_terminal() {
                return Ok((last, status));
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Err(_) => return Ok((last, status)),
                Ok(Err(_)) => return Err(StoreError::RunNotFound),
                Ok(Ok(())) => {}
            }
        }
    }

    async fn sweep(&self) -> usize {
        let now = Instant::now();
        let mut expired = Vec::new();
        {
            let mut q = lock(&self.finished);
            while let Some((at, _)) = q.front() {
                if now.duration_since(*at) < self.limits.retention {
                    break;
                }
                if let Some((_, run)) = q.pop_front() {
                    expired.push(run);
                }
            }
        }
        let n = expired.len();
        for run in expired {
            self.evict(&run);
        }
        n
    }

    fn bytes_held(&self) -> u64 {
        self.total_bytes.load(Ordering::Acquire)
    }
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
            retry_after: Duration::from_secs(5),
        }
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
        let b = s.read_after(&r.run_id, 0, 100).await.unwrap();
        assert_eq!(
            b.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        let b = s.read_after(&r.run_id, 1, 1).await.unwrap();
        assert_eq!(b.events.len(), 1);
        assert_eq!((b.events[0].seq, &b.events[0].data[..]), (2, &b"b"[..]));
        assert!(s
            .read_after(&r.run_id, 3, 10)
            .await
            .unwrap()
            .events
            .is_empty());
        assert!(s
            .read_after(&r.run_id, 99, 10)
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
        let b = s.read_after(&r.run_id, 0, 10).await.unwrap();
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
    async fn per_run_limits_refuse_whole_batches() {
        let mut l = limits();
        l.max_events_per_run = 3;
        l.max_bytes_per_run = 10;
        let s = MemoryStore::new(l);
        let r = s.create_run(new_run(None, "o")).await.unwrap().run;
        s.append(&r.run_id, vec![ev("12345"), ev("1234")])
            .await
            .unwrap();
        assert_eq!(
            s.append(&r.run_id, vec![ev("12")]).await,
            Err(StoreError::RunLimit(RunLimit::Bytes))
        );
        s.append(&r.run_id, vec![ev("1")]).await.unwrap();
        assert_eq!(
            s.append(&r.run_id, vec![ev("")]).await,
            Err(StoreError::RunLimit(RunLimit::Events))
        );
        assert_eq!(s.read_after(&r.run_id, 0, 10).await.unwrap().last_seq, 3);
        assert_eq!(s.bytes_held(), 10);
    }

    #[tokio::test]
    async fn finished_runs_are_evicted_first_then_new_runs_refused() {
        let mut l = limits();
        l.max_total_bytes = 1000;
        l.max_bytes_per_run = 5000;
        let s = MemoryStore::new(l);
        let old = s.create_run(new_run(None, "o")).await.unwrap().run;
        s.append(&old.run_id, vec![ev(&"x".repeat(600))])
            .await
            .unwrap();
        s.finish(&old.run_id, RunStatus::Completed, None, None)
            .await
            .unwrap();
        let live = s.create_run(new_run(None, "o")).await.unwrap().run;
        // Appending 500 more would overflow: the finished run goes, the live one stays.
        s.append(&live.run_id, vec![ev(&"y".repeat(500))])
            .await
            .unwrap();
        assert_eq!(s.run(&old.run_id).await, Err(StoreError::RunNotFound));
        assert_eq!(
            s.thread("o", &old.thread_id).await,
            Err(StoreError::ThreadNotFound)
        );
        assert_eq!(s.bytes_held(), 500);
        s.append(&live.run_id, vec![ev(&"z".repeat(450))])
            .await
            .unwrap();
        // 950 of 1000 held by a live run: no new runs, and no overflow for the live run.
        assert!(matches!(
            s.create_run(new_run(None, "o")).await,
            Err(StoreError::Full { .. })
        ));
        assert!(matches!(
            s.append(&live.run_id, vec![ev(&"w".repeat(100))]).await,
            Err(StoreError::Full { .. })
        ));
        s.finish(&live.run_id, RunStatus::Completed, None, None)
            .await
            .unwrap();
        // Once it has finished it can be evicted to admit new work.
        s.create_run(new_run(None, "o")).await.unwrap();
        assert_eq!(s.bytes_held(), 0);
    }

    #[tokio::test]
    async fn nothing_is_evicted_for_a_request_that_would_be_refused_anyway() {
        let mut l = limits();
        l.max_total_bytes = 1000;
        l.max_bytes_per_run = 5000;
        let s = MemoryStore::new(l);
        let done = s.create_run(new_run(None, "o")).await.unwrap().run;
        s.append(&done.run_id, vec![ev(&"x".repeat(50))])
            .await
            .unwrap();
        s.finish(&done.run_id, RunStatus::Completed, None, None)
            .await
            .unwrap();
        let live = s.create_run(new_run(None, "o")).await.unwrap().run;
        s.append(&live.run_id, vec![ev(&"y".repeat(900))])
            .await
            .unwrap();
        // Live runs alone hold 90%: new work is refused, and the finished run survives.
        assert!(matches!(
            s.create_run(new_run(None, "o")).await,
            Err(StoreError::Full { .. })
        ));
        assert!(matches!(
            s.append(&live.run_id, vec![ev(&"z".repeat(101))]).await,
            Err(StoreError::Full { .. })
        ));
        assert!(s.run(&done.run_id).await.is_ok());
        assert_eq!(s.bytes_held(), 950);
    }

    #[tokio::test]
    async fn keyed_runs_are_evicted_without_deadlock() {
        let mut l = limits();
        l.max_total_bytes = 1000;
        l.max_bytes_per_run = 1000;
        let s = MemoryStore::new(l);
        // Many finished keyed runs, each forcing the eviction of earlier ones.
        for i in 0..64 {
            let new = NewRun {
                idempotency_key: Some(format!("k{i}")),
                ..new_run(None, "o")
            };
            let run = tokio::time::timeout(Duration::from_secs(5), s.create_run(new))
                .await
                .expect("no deadlock")
                .unwrap()
                .run;
            s.append(&run.run_id, vec![ev(&"x".repeat(400))])
                .await
                .unwrap();
            s.finish(&run.run_id, RunStatus::Completed, None, None)
                .await
                .unwrap();
        }
        assert!(s.bytes_held() <= 1000);
        assert!(
            s.keys.len() <= 3,
            "evicted runs' keys are forgotten: {}",
            s.keys.len()
        );
    }

    #[tokio::test]
    async fn retention_sweep_evicts_only_expired_runs() {
        let mut l = limits();
        l.retention = Duration::from_millis(50);
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
        assert_eq!(s.bytes_held(), 0);
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
                    let got = s.read_after(&r.run_id, k, usize::MAX).await.unwrap();
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
