//! Test helpers for takeover: [`Recorder`], a memory store that keeps what a shared store keeps
//! for a takeover (each run's last mark and its job record) and can fence this instance out.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{json, Value};

use crate::event::NewEvent;
use crate::store::memory::{MemoryLimits, MemoryStore};
use crate::store::{
    Adopted, BackendThread, LatestRun, NewRun, ReadBatch, RunId, RunInfo, RunStatus, Started,
    Store, StoreError, ThreadId, ThreadInfo,
};

/// Roomy limits for an ingestion test's memory store.
pub fn limits() -> MemoryLimits {
    MemoryLimits {
        max_events_per_run: 10_000,
        max_bytes_per_run: 1 << 24,
        max_total_bytes: 1 << 26,
        retention: Duration::from_secs(60),
        thread_retention: Duration::from_secs(3600),
        retry_after: Duration::from_secs(1),
        quotas: crate::store::budget::Quotas::unlimited(),
    }
}

/// A [`MemoryStore`] that records marks and jobs, counts appended batches, and refuses appends
/// with [`StoreError::Fenced`] once [`Recorder::fence`] is called.
pub struct Recorder {
    pub inner: MemoryStore,
    marks: Mutex<HashMap<RunId, String>>,
    jobs: Mutex<HashMap<RunId, Value>>,
    batches: tokio::sync::watch::Sender<usize>,
    fenced: AtomicBool,
}

impl Recorder {
    pub fn new() -> Arc<Recorder> {
        Arc::new(Recorder {
            inner: MemoryStore::new(limits()),
            marks: Mutex::default(),
            jobs: Mutex::default(),
            batches: tokio::sync::watch::channel(0).0,
            fenced: AtomicBool::new(false),
        })
    }

    /// A new run of `text` (user message id `message_id`), in a new thread.
    pub async fn new_run(&self, text: &str, message_id: &str) -> RunInfo {
        let message =
            json!({"id": message_id, "role": "user", "parts": [{"type": "text", "text": text}]});
        let started = self
            .create_run(NewRun {
                thread_id: None,
                org_id: "org".into(),
                user_id: "user".into(),
                agent_id: json!(7),
                user_message: message,
                idempotency_key: None,
                conversation: None,
            })
            .await
            .unwrap();
        started.run
    }

    /// The last mark appended with `run`'s events.
    pub fn mark(&self, run: &RunId) -> Option<String> {
        self.marks.lock().unwrap().get(run).cloned()
    }

    /// The job recorded for `run`.
    pub fn job(&self, run: &RunId) -> Option<Value> {
        self.jobs.lock().unwrap().get(run).cloned()
    }

    /// What a takeover of `run` gets now.
    pub async fn adopted(&self, run: &RunId) -> Adopted {
        Adopted {
            run: self.inner.run(run).await.unwrap(),
            job: self.job(run),
            mark: self.mark(run),
        }
    }

    /// From now on, appends are refused: another instance holds the runs.
    pub fn fence(&self) {
        self.fenced.store(true, Ordering::SeqCst);
    }

    /// Wait until `n` batches were appended in all (at most 10 s).
    pub async fn appended(&self, n: usize) {
        let mut rx = self.batches.subscribe();
        tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|b| *b >= n))
            .await
            .expect("the batches were appended in time")
            .unwrap();
    }

    /// `run`'s events, as JSON.
    pub async fn events(&self, run: &RunId) -> Vec<Value> {
        self.inner
            .read_after(run, 0, 100_000, usize::MAX)
            .await
            .unwrap()
            .events
            .iter()
            .map(|e| serde_json::from_slice(&e.data).unwrap())
            .collect()
    }

    /// Wait until `run` has ended (at most 10 s); its info.
    pub async fn ended(&self, run: &RunId) -> RunInfo {
        for _ in 0..2000 {
            let info = self.inner.run(run).await.unwrap();
            if info.status != RunStatus::InProgress {
                return info;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("run {run} never ended");
    }
}

#[async_trait]
impl Store for Recorder {
    async fn create_run(&self, new: NewRun) -> Result<Started, StoreError> {
        self.inner.create_run(new).await
    }
    async fn forget_key(&self, org_id: &str, user_id: &str, key: &str, run: &RunId) {
        self.inner.forget_key(org_id, user_id, key, run).await
    }
    async fn append(&self, run: &RunId, events: Vec<NewEvent>) -> Result<u64, StoreError> {
        self.append_marked(run, events, None).await
    }
    async fn finish(
        &self,
        run: &RunId,
        status: RunStatus,
        error: Option<String>,
        final_event: Option<NewEvent>,
    ) -> Result<bool, StoreError> {
        self.inner.finish(run, status, error, final_event).await
    }
    async fn run(&self, run: &RunId) -> Result<RunInfo, StoreError> {
        self.inner.run(run).await
    }
    async fn thread(&self, org_id: &str, thread: &ThreadId) -> Result<ThreadInfo, StoreError> {
        self.inner.thread(org_id, thread).await
    }
    async fn wait_thread(
        &self,
        org_id: &str,
        thread: &ThreadId,
        seen: &LatestRun,
        after: u64,
        timeout: Duration,
    ) -> Result<bool, StoreError> {
        self.inner
            .wait_thread(org_id, thread, seen, after, timeout)
            .await
    }
    async fn conversation(
        &self,
        org_id: &str,
        conversation: &str,
    ) -> Result<Option<ThreadId>, StoreError> {
        self.inner.conversation(org_id, conversation).await
    }
    async fn backend_thread(&self, thread: &ThreadId) -> Option<BackendThread> {
        self.inner.backend_thread(thread).await
    }
    async fn set_backend_thread(&self, thread: &ThreadId, backend: BackendThread) {
        self.inner.set_backend_thread(thread, backend).await
    }
    async fn read_after(
        &self,
        run: &RunId,
        after: u64,
        max: usize,
        max_bytes: usize,
    ) -> Result<ReadBatch, StoreError> {
        self.inner.read_after(run, after, max, max_bytes).await
    }
    async fn wait(
        &self,
        run: &RunId,
        after: u64,
        timeout: Duration,
    ) -> Result<(u64, RunStatus), StoreError> {
        self.inner.wait(run, after, timeout).await
    }
    async fn sweep(&self) -> usize {
        self.inner.sweep().await
    }
    fn bytes_held(&self) -> u64 {
        self.inner.bytes_held()
    }
    async fn append_marked(
        &self,
        run: &RunId,
        events: Vec<NewEvent>,
        mark: Option<String>,
    ) -> Result<u64, StoreError> {
        if self.fenced.load(Ordering::SeqCst) {
            return Err(StoreError::Fenced);
        }
        let last = self.inner.append(run, events).await?;
        if let Some(mark) = mark {
            self.marks.lock().unwrap().insert(run.clone(), mark);
        }
        self.batches.send_modify(|b| *b += 1);
        Ok(last)
    }
    async fn save_job(&self, run: &RunId, job: Value) -> Result<(), StoreError> {
        self.jobs.lock().unwrap().insert(run.clone(), job);
        Ok(())
    }
}
