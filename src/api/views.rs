//! Render once, fold once, on this instance: each run read by a client gets one [`RunView`]
//! holding its UI-message frames ([`UiFrames`]) and its folded assistant message ([`Fold`]),
//! both advanced from the store's log only by the events they have not seen yet. Every stream,
//! resume and snapshot of the run shares them, so serving a reader costs what it is sent, and a
//! poll of a 100,000-event run costs what one of a 20-event run does, apart from the bytes of
//! the answer. A finished run's message is serialised once.
//!
//! Views are derived from the log and nothing else (the log stays the source of truth), so a
//! view can be dropped and rebuilt at any time with the same frames and ids. They are built on
//! first read, catch up in bounded batches (yielding between them, so a long run's first read
//! does not hold a worker thread), and are dropped ([`Views::prune`], from housekeeping) when
//! the store no longer has their run, or when their run has ended and nobody has read it for
//! [`VIEW_IDLE`] (a later reader rebuilds it, with the same frames and ids). What they hold is
//! charged to the memory budget ([`Part::Views`]); under pressure every view nobody is reading
//! goes at the next prune.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;

use crate::event::Event;
use crate::metrics;
use crate::render::fold::Fold;
use crate::render::frames::UiFrames;
use crate::store::budget::{Budget, Part};
use crate::store::{RunId, RunInfo, RunStatus, Store, StoreError};

/// Events read from the store per catch-up step.
const CATCH_UP_BATCH: usize = 1024;

/// Payload bytes read from the store per catch-up step (about: at least one event).
const CATCH_UP_BYTES: usize = 1024 * 1024;

/// How long the view of a finished run is kept after its last reader asked for it.
pub const VIEW_IDLE: std::time::Duration = std::time::Duration::from_secs(60);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The views of the runs this instance serves.
pub struct Views {
    runs: Mutex<HashMap<RunId, Arc<RunView>>>,
    /// When the views began: `RunView::last_used` counts milliseconds from here.
    epoch: std::time::Instant,
    /// What the views hold is charged here ([`Part::Views`]), beside the store's log.
    budget: Arc<Budget>,
}

impl Default for Views {
    /// Views charging a budget of their own, without limit.
    fn default() -> Self {
        Views::with_budget(Arc::new(Budget::new(u64::MAX)))
    }
}

impl Views {
    /// Views charging `budget` (the store's, so that frames and folds count against
    /// `limits.max_total_bytes`).
    pub fn with_budget(budget: Arc<Budget>) -> Self {
        Views {
            runs: Mutex::default(),
            epoch: std::time::Instant::now(),
            budget,
        }
    }

    /// The view of `run`, created on first use.
    pub fn of(&self, run: &RunInfo) -> Arc<RunView> {
        let now = self.epoch.elapsed().as_millis() as u64;
        let mut runs = lock(&self.runs);
        if let Some(view) = runs.get(&run.run_id) {
            view.last_used.store(now, Ordering::Relaxed);
            return view.clone();
        }
        let view = Arc::new(RunView::new(run, self.budget.clone()));
        view.last_used.store(now, Ordering::Relaxed);
        runs.insert(run.run_id.clone(), view.clone());
        view
    }

    /// Drop the views of runs the store no longer holds, and those of ended runs nobody asked
    /// for in the last `idle`; under memory pressure (the budget at its high-water mark), also
    /// every view nobody is reading now (a later reader rebuilds it). Returns the bytes the
    /// remaining views hold.
    pub async fn prune(&self, store: &dyn Store, idle: std::time::Duration) -> usize {
        let views: Vec<Arc<RunView>> = lock(&self.runs).values().cloned().collect();
        let now = self.epoch.elapsed().as_millis() as u64;
        let idle = idle.as_millis() as u64;
        let pressed = self.budget.total() >= self.budget.high_water();
        let mut held = 0;
        for view in views {
            // Held here, in the map, and by nobody else.
            let unread = Arc::strong_count(&view) <= 2;
            let drop = match store.run(&view.run_id).await {
                Ok(_) if pressed && unread => true,
                Err(StoreError::RunNotFound) => true,
                Ok(run) => {
                    run.status.is_terminal()
                        && now.saturating_sub(view.last_used.load(Ordering::Relaxed)) >= idle
                }
                Err(_) => false,
            };
            if drop {
                lock(&self.runs).remove(&view.run_id);
            } else {
                held += view.bytes_held();
            }
        }
        held
    }

    /// How many runs have a view.
    pub fn len(&self) -> usize {
        lock(&self.runs).len()
    }

    /// Whether no run has a view.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The log's state as of a read: its last seq and the run's status then.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogState {
    /// The run's last seq.
    pub last_seq: u64,
    /// Its status.
    pub status: RunStatus,
}

/// One run's shared frames and fold.
pub struct RunView {
    run_id: RunId,
    /// When a reader last asked for it (milliseconds since [`Views`] began).
    last_used: AtomicU64,
    ui: Mutex<UiFrames>,
    fold: Mutex<FoldView>,
    /// Held while the fold catches up with the log: concurrent snapshots of a long run wait for
    /// one reader of the log instead of each reading it.
    catching_up: tokio::sync::Mutex<()>,
    /// The run's user message, serialised once.
    user_json: Bytes,
    /// The budget its bytes are charged to, and what it is charged now.
    budget: Arc<Budget>,
    charged: AtomicU64,
}

/// The kept fold and what it has seen.
struct FoldView {
    fold: Fold,
    /// Seq of the last event folded.
    last_seq: u64,
    /// The log's state when the fold last caught up with it (`last_seq` equal to the fold's).
    synced: Option<LogState>,
    /// The serialised message, once the run has ended and everything is folded.
    finished: Option<Bytes>,
    /// How many events were folded (each exactly once).
    folded: u64,
    /// Payload bytes folded into `fold` (what the kept fold is charged until the run ends and
    /// only its JSON is kept).
    folded_bytes: u64,
}

/// A run's folded assistant message at one point of its log.
#[derive(Clone, Debug, PartialEq)]
pub struct Folded {
    /// The message as JSON.
    pub json: Bytes,
    /// The log's state it is the fold of.
    pub at: LogState,
}

impl RunView {
    fn new(run: &RunInfo, budget: Arc<Budget>) -> RunView {
        RunView {
            run_id: run.run_id.clone(),
            last_used: AtomicU64::new(0),
            budget,
            charged: AtomicU64::new(0),
            ui: Mutex::new(UiFrames::new(
                run.assistant_message_id.clone(),
                run.first_seq,
            )),
            fold: Mutex::new(FoldView {
                fold: Fold::new(&run.assistant_message_id),
                last_seq: run.first_seq - 1,
                synced: None,
                finished: None,
                folded: 0,
                folded_bytes: 0,
            }),
            catching_up: tokio::sync::Mutex::new(()),
            user_json: Bytes::from(serde_json::to_vec(&*run.user_message).unwrap_or_default()),
        }
    }

    /// The run's user message as JSON.
    pub fn user_json(&self) -> Bytes {
        self.user_json.clone()
    }

    /// Bytes the view holds: its frames, its fold (the payload bytes folded while the run goes
    /// on, its JSON once the run has ended) and its user message.
    pub fn bytes_held(&self) -> usize {
        let frames = lock(&self.ui).bytes_held();
        let fold = {
            let f = lock(&self.fold);
            match &f.finished {
                Some(json) => json.len(),
                None => f.folded_bytes as usize,
            }
        };
        frames + fold + self.user_json.len()
    }

    /// Charge the budget what the view holds now.
    fn recharge(&self) {
        let now = self.bytes_held() as u64;
        let before = self.charged.swap(now, Ordering::AcqRel);
        let mut held = before;
        self.budget.recharge(Part::Views, &mut held, now);
    }

    /// The UI-message frames (read them with [`UiFrames::read`] under the lock).
    pub fn frames(&self) -> MutexGuard<'_, UiFrames> {
        lock(&self.ui)
    }

    /// Render the events the frames do not have yet (at most one batch). Returns the log's
    /// state as of that read: when its `last_seq` is the frames' own, they are complete.
    pub async fn catch_up_frames(&self, store: &dyn Store) -> Result<LogState, StoreError> {
        let have = lock(&self.ui).last_seq();
        let batch = store
            .read_after(&self.run_id, have, CATCH_UP_BATCH, CATCH_UP_BYTES)
            .await?;
        {
            let mut ui = lock(&self.ui);
            let before = ui.last_seq();
            ui.extend(&batch.events);
            metrics::EVENTS_RENDERED.inc_by(ui.last_seq() - before);
        }
        self.recharge();
        Ok(LogState {
            last_seq: batch.last_seq,
            status: batch.status,
        })
    }

    /// The folded assistant message, caught up with the log as it is now.
    pub async fn folded(&self, store: &dyn Store) -> Result<Folded, StoreError> {
        let finished = || {
            let f = lock(&self.fold);
            match (&f.finished, f.synced) {
                (Some(json), Some(at)) => Some(Folded {
                    json: json.clone(),
                    at,
                }),
                _ => None,
            }
        };
        if let Some(done) = finished() {
            return Ok(done);
        }
        let _catching_up = self.catching_up.lock().await;
        loop {
            if let Some(done) = finished() {
                return Ok(done);
            }
            let have = lock(&self.fold).last_seq;
            let batch = store
                .read_after(&self.run_id, have, CATCH_UP_BATCH, CATCH_UP_BYTES)
                .await?;
            {
                let mut f = lock(&self.fold);
                f.apply(&batch.events);
                // A run's end is final: an older read racing this one (same last seq, still in
                // progress) must not take it back.
                let ended = f
                    .synced
                    .is_some_and(|s| s.last_seq == batch.last_seq && s.status.is_terminal());
                if f.last_seq == batch.last_seq && !ended {
                    f.synced = Some(LogState {
                        last_seq: batch.last_seq,
                        status: batch.status,
                    });
                }
                if let Some(at) = f.synced.filter(|s| s.last_seq == f.last_seq) {
                    let json = f.json(at.status.is_terminal());
                    drop(f);
                    self.recharge();
                    return Ok(Folded { json, at });
                }
            }
            self.recharge();
            // A long log is folded in steps, giving the worker back between them.
            tokio::task::yield_now().await;
        }
    }

    /// How many events the fold has taken in (each exactly once over the view's life).
    pub fn events_folded(&self) -> u64 {
        lock(&self.fold).folded
    }
}

impl FoldView {
    fn apply(&mut self, events: &[Event]) {
        for ev in events {
            if ev.seq == self.last_seq + 1 {
                self.fold.push(ev);
                self.last_seq = ev.seq;
                self.folded += 1;
                self.folded_bytes += ev.data.len() as u64;
                metrics::EVENTS_FOLDED.inc();
            }
        }
    }

    /// The message as JSON; kept once the run has ended.
    fn json(&mut self, finished: bool) -> Bytes {
        if let Some(json) = &self.finished {
            return json.clone();
        }
        let mut json = Vec::new();
        self.fold.write_json(&mut json);
        let json = Bytes::from(json);
        if finished {
            self.finished = Some(json.clone());
            // An ended run's message never changes again: only its JSON is kept.
            self.fold = Fold::new("");
        }
        json
    }
}

impl Drop for RunView {
    fn drop(&mut self) {
        self.budget
            .release(Part::Views, self.charged.load(Ordering::Acquire));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::NewEvent;
    use crate::render::fold::fold;
    use crate::render::proptests::run;
    use crate::render::ui::Cursor;
    use crate::store::memory::{MemoryLimits, MemoryStore};
    use crate::store::NewRun;
    use proptest::prelude::*;
    use std::time::Duration;

    fn store() -> MemoryStore {
        MemoryStore::new(MemoryLimits {
            max_events_per_run: 100_000,
            max_bytes_per_run: 1 << 30,
            max_total_bytes: 1 << 30,
            retention: Duration::from_secs(60),
            thread_retention: Duration::from_secs(60),
            retry_after: Duration::from_secs(1),
            quotas: crate::store::budget::Quotas::unlimited(),
        })
    }

    async fn start(store: &MemoryStore) -> RunInfo {
        store
            .create_run(NewRun {
                thread_id: None,
                org_id: "org".into(),
                user_id: "user".into(),
                agent_id: serde_json::json!(1),
                user_message: serde_json::json!({"id": "u1", "role": "user", "parts": []}),
                idempotency_key: None,
                conversation: None,
            })
            .await
            .unwrap()
            .run
    }

    #[tokio::test]
    async fn views_go_with_their_run_or_when_an_ended_run_is_left_unread() {
        let store = store();
        let live = start(&store).await;
        let ended = start(&store).await;
        store
            .finish(&ended.run_id, RunStatus::Completed, None, None)
            .await
            .unwrap();
        let views = Views::default();
        views.of(&live);
        views.of(&ended);
        // Read just now: both kept.
        views.prune(&store, Duration::from_secs(60)).await;
        assert_eq!(views.len(), 2);
        // Unread for the idle period: the ended run's view goes, the live one stays.
        views.prune(&store, Duration::ZERO).await;
        assert_eq!(views.len(), 1);
        assert!(lock(&views.runs).contains_key(&live.run_id));
    }

    proptest! {
        /// The kept fold and the shared frames, advanced by polls and reads interleaved with
        /// appends of any size, equal a fold and a rendering of the whole log from scratch,
        /// and each event is folded exactly once.
        #[test]
        fn kept_fold_and_frames_equal_a_fresh_fold(
            events in run(),
            splits in proptest::collection::vec(1usize..6, 1..30),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            rt.block_on(async {
                let store = store();
                let info = start(&store).await;
                let views = Views::default();
                let view = views.of(&info);
                let mut at = 0;
                for n in splits.iter().cycle() {
                    if at >= events.len() {
                        break;
                    }
                    let end = (at + n).min(events.len());
                    let batch = events[at..end].iter().map(|e| NewEvent::new(e.data.clone())).collect();
                    store.append(&info.run_id, batch).await.unwrap();
                    at = end;
                    let folded = view.folded(&store).await.unwrap();
                    prop_assert_eq!(folded.at.last_seq, end as u64);
                    let want = serde_json::to_vec(&fold(&info.assistant_message_id, &events[..end])).unwrap();
                    prop_assert_eq!(&folded.json[..], &want[..]);
                    view.catch_up_frames(&store).await.unwrap();
                }
                store.finish(&info.run_id, RunStatus::Completed, None, None).await.unwrap();
                let folded = view.folded(&store).await.unwrap();
                prop_assert_eq!(folded.at.status, RunStatus::Completed);
                prop_assert_eq!(view.events_folded(), events.len() as u64);
                // The frames: what a fresh renderer writes for the whole run.
                while view.catch_up_frames(&store).await.unwrap().last_seq > view.frames().last_seq() {}
                let mut got = Vec::new();
                let mut cursor = Cursor::after(0);
                while let Some(through) = view.frames().read(cursor, 1 << 20, &mut got) {
                    cursor = Cursor::after(through);
                }
                let mut fresh = crate::render::ui::UiRenderer::new(info.assistant_message_id.clone());
                let mut want = Vec::new();
                for ev in &events {
                    fresh.render_sse(ev, &mut want);
                }
                prop_assert_eq!(got.concat(), want);
                Ok(())
            })?;
        }
    }
}
