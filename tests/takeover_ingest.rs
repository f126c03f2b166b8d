//! Takeover at the ingest level, against the real mock agent: an instance ingesting a run dies
//! (its task is aborted mid-run: no finish, no goodbye), and another instance adopts the run
//! with what a shared store hands over (the job record and the last mark). An AgentFlow and a
//! poll backend's runs end `completed` with every event logged exactly once, in order, and one
//! backend run per message; a UI-message backend's run ends `error` with the reason, without a
//! second backend run.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use common::*;
use serde_json::{json, Value};

use sluice::config::UpstreamUrl;
use sluice::event::NewEvent;
use sluice::ingest::agentflow::{AgentFlowAdapter, AgentFlowSettings};
use sluice::ingest::invoke::InvokeTarget;
use sluice::ingest::poll::{PollAdapter, PollSettings};
use sluice::ingest::ui_message::{UiMessageAdapter, UiMessageSettings};
use sluice::ingest::{Adapter, Ingestor, RunJob};
use sluice::store::memory::{MemoryLimits, MemoryStore};
use sluice::store::{
    Adopted, BackendThread, LatestRun, NewRun, ReadBatch, RunId, RunInfo, RunStatus, Started,
    Store, StoreError, ThreadId, ThreadInfo,
};

/// A memory store that keeps, as a shared store does for a takeover, each run's job record and
/// last mark, and counts appended batches.
struct Shared {
    inner: MemoryStore,
    marks: Mutex<HashMap<RunId, String>>,
    jobs: Mutex<HashMap<RunId, Value>>,
    batches: tokio::sync::watch::Sender<usize>,
}

impl Shared {
    fn new() -> Arc<Shared> {
        Arc::new(Shared {
            inner: MemoryStore::new(MemoryLimits {
                max_events_per_run: 10_000,
                max_bytes_per_run: 1 << 24,
                max_total_bytes: 1 << 26,
                retention: Duration::from_secs(60),
                thread_retention: Duration::from_secs(3600),
                retry_after: Duration::from_secs(1),
                quotas: sluice::store::budget::Quotas::unlimited(),
            }),
            marks: Mutex::default(),
            jobs: Mutex::default(),
            batches: tokio::sync::watch::channel(0).0,
        })
    }

    /// What another instance gets when it takes `run` over.
    async fn adopted(&self, run: &RunId) -> Adopted {
        Adopted {
            run: self.inner.run(run).await.unwrap(),
            job: self.jobs.lock().unwrap().get(run).cloned(),
            mark: self.marks.lock().unwrap().get(run).cloned(),
        }
    }

    async fn appended(&self, n: usize) {
        let mut rx = self.batches.subscribe();
        tokio::time::timeout(Duration::from_secs(20), rx.wait_for(|b| *b >= n))
            .await
            .expect("batches appended in time")
            .unwrap();
    }

    async fn ended(&self, run: &RunId) -> RunInfo {
        for _ in 0..4000 {
            let info = self.inner.run(run).await.unwrap();
            if info.status != RunStatus::InProgress {
                return info;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("run {run} never ended");
    }

    async fn events(&self, run: &RunId) -> Vec<Value> {
        self.inner
            .read_after(run, 0, 100_000, usize::MAX)
            .await
            .unwrap()
            .events
            .iter()
            .map(|e| serde_json::from_slice(&e.data).unwrap())
            .collect()
    }
}

#[async_trait]
impl Store for Shared {
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
    ) -> Result<(), StoreError> {
        self.inner
            .wait_thread(org_id, thread, seen, after, timeout)
            .await
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

/// The slow scenario's answer: `token0 token1 … `.
fn answer(tokens: usize) -> String {
    (0..tokens).map(|i| format!("token{i} ")).collect()
}

/// Start a run of `text` (message id `message_id`) on instance 1 over `adapter`, let it log
/// `cut` batches, kill the instance, and let instance 2 (a fresh adapter from `adapter`) take
/// it over. Returns the run's end, its log and the mark handed over.
async fn killed_and_taken_over(
    adapter: impl Fn() -> Arc<dyn Adapter>,
    text: &str,
    message_id: &str,
    cut: usize,
) -> (RunInfo, Vec<Value>, Option<String>) {
    let store = Shared::new();
    let message =
        json!({"id": message_id, "role": "user", "parts": [{"type": "text", "text": text}]});
    let run = store
        .create_run(NewRun {
            thread_id: None,
            org_id: "org".into(),
            user_id: "user".into(),
            agent_id: json!("7"),
            user_message: message,
            idempotency_key: Some(message_id.into()),
            conversation: None,
        })
        .await
        .unwrap()
        .run;
    let id = run.run_id.clone();
    let job = RunJob {
        agent_path: "7".into(),
        body: json!({"message": text, "conversation_id": run.thread_id.0, "message_id": message_id,
                     "stream": true}),
        bearer: Some("token-of-the-caller".into()),
        backend_thread: None,
        run,
    };
    let first = Ingestor::new(store.clone(), adapter(), Duration::from_secs(60));
    let task = tokio::spawn(async move { first.drive(job, None).await });
    store.appended(cut).await;
    task.abort();
    let _ = task.await;
    assert_eq!(
        store.inner.run(&id).await.unwrap().status,
        RunStatus::InProgress
    );
    let adopted = store.adopted(&id).await;
    let job = adopted.job.clone().expect("the job was recorded");
    assert!(!job.to_string().contains("token-of-the-caller"));
    let mark = adopted.mark.clone();
    Ingestor::new(store.clone(), adapter(), Duration::from_secs(60)).adopt(adopted);
    let info = store.ended(&id).await;
    (info, store.events(&id).await, mark)
}

fn url(mock: &Proc) -> UpstreamUrl {
    UpstreamUrl::parse(&format!("http://{}", mock.addrs[0])).unwrap()
}

#[tokio::test]
async fn an_agentflow_run_continues_after_its_last_event_id() {
    let mock = mock_agent_speaking("agentflow");
    let up = url(&mock);
    let adapter = || -> Arc<dyn Adapter> {
        Arc::new(AgentFlowAdapter::new(AgentFlowSettings {
            upstreams: vec![up.clone()],
            connect_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(10),
            max_event_bytes: 1 << 20,
        }))
    };
    let text = "scenario:slow tokens=30 delay_ms=15";
    let (info, events, mark) = killed_and_taken_over(adapter, text, "af-takeover-1", 8).await;
    assert_eq!(info.status, RunStatus::Completed, "{:?}", info.error);
    // Every backend event once, in order: start, 30 deltas, the root end.
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=32).collect::<Vec<_>>());
    let last = events.last().unwrap();
    assert_eq!(
        (&last["type"], &last["parent_call_id"]),
        (&json!("end"), &Value::Null)
    );
    let said: String = events
        .iter()
        .filter(|e| e["type"] == "delta")
        .map(|e| e["content"].as_str().unwrap())
        .collect();
    assert_eq!(said, answer(30));

    // One backend run; the second request continued it after the mark.
    let http = client();
    let runs = get_json(&http, &mock.addrs[0], "/mock/runs").await;
    assert_eq!(runs["by_message"]["af-takeover-1"], 1, "{runs}");
    assert_eq!(runs["continued"], 1, "{runs}");
    let mark = mark.expect("a mark was recorded");
    let asked: Vec<Value> = mock_requests(&http, &mock.addrs[0])
        .await
        .into_iter()
        .filter(|r| r["body"]["message_id"] == "af-takeover-1")
        .collect();
    assert_eq!(asked.len(), 2);
    assert!(asked[0]["headers"].get("last-event-id").is_none());
    assert_eq!(
        asked[0]["headers"]["authorization"],
        "Bearer token-of-the-caller"
    );
    assert_eq!(asked[1]["headers"]["last-event-id"], json!(mark));
    assert_eq!(asked[1]["body"]["last_event_id"], json!(mark));
    assert!(asked[1]["headers"].get("authorization").is_none());
}

#[tokio::test]
async fn a_poll_run_is_polled_on_from_its_checkpoint() {
    let mock = mock_agent_speaking("poll");
    let up = url(&mock);
    let adapter = || -> Arc<dyn Adapter> {
        Arc::new(PollAdapter::new(
            InvokeTarget::new(
                vec![up.clone()],
                "/api/invokeAgent".into(),
                Duration::from_secs(2),
            ),
            PollSettings {
                interval_min: Duration::from_millis(10),
                interval_max: Duration::from_millis(40),
                ..PollSettings::default()
            },
        ))
    };
    let text = "scenario:slow tokens=20 delay_ms=30";
    let (info, events, mark) = killed_and_taken_over(adapter, text, "poll-takeover-1", 4).await;
    assert_eq!(info.status, RunStatus::Completed, "{:?}", info.error);
    let mark: Value = serde_json::from_str(&mark.expect("a checkpoint")).unwrap();
    assert!(
        mark["thread"].is_string() && mark["diff"].is_object(),
        "{mark}"
    );
    // One start, the text exactly once (a delta logged twice would repeat it), one end.
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(types.iter().filter(|t| **t == "start").count(), 1);
    assert_eq!(types.first(), Some(&"start"));
    assert_eq!(types.last(), Some(&"end"));
    let said: String = events
        .iter()
        .filter(|e| e["type"] == "delta")
        .map(|e| e["content"].as_str().unwrap())
        .collect();
    assert_eq!(said, answer(20));
    // One backend run: the instance that took over only polled.
    let posts = mock_requests(&client(), &mock.addrs[0])
        .await
        .into_iter()
        .filter(|r| r["path"] == "/api/invokeAgent")
        .count();
    assert_eq!(posts, 1);
}

#[tokio::test]
async fn a_ui_message_run_ends_error_without_a_second_backend_run() {
    let mock = mock_agent_speaking("ui-message");
    let up = url(&mock);
    let adapter = || -> Arc<dyn Adapter> {
        Arc::new(UiMessageAdapter::new(
            InvokeTarget::new(
                vec![up.clone()],
                "/api/invokeAgent".into(),
                Duration::from_secs(2),
            ),
            UiMessageSettings {
                idle_timeout: Duration::from_secs(10),
                max_event_bytes: 1 << 20,
            },
        ))
    };
    let text = "scenario:slow tokens=20 delay_ms=30";
    let (info, events, _) = killed_and_taken_over(adapter, text, "ui-takeover-1", 3).await;
    assert_eq!(info.status, RunStatus::Error);
    let error = info.error.unwrap();
    assert!(
        error.starts_with(
            "the run could not be continued after the gateway instance ingesting it stopped"
        ),
        "{error}"
    );
    let last = events.last().unwrap();
    assert_eq!(last["type"], "error");
    let posts = mock_requests(&client(), &mock.addrs[0])
        .await
        .into_iter()
        .filter(|r| r["path"] == "/api/invokeAgent")
        .count();
    assert_eq!(posts, 1);
}
