//! The `Store` contract (`src/store/mod.rs`), as one suite that every store implementation runs.
//!
//! Every case is written only against the public [`Store`] trait, through an `Arc<dyn Store>`
//! made by a backend's factory from a small [`Limits`]. Nothing here looks inside a store, and
//! byte accounting is asserted by relations (grows, shrinks, stays under `max_total_bytes`),
//! never by a backend's own numbers. Cases that matter once the store is remote are here too:
//! concurrent creates of one key, concurrent appends, a waiter racing an append, readers that
//! must see a contiguous prefix of the log while a writer appends.
//!
//! Two backends run it: the embedded store (`memory`, with the memory budget's own cases) and
//! the shared store (`redis`: [`redis`] makes each store under a fresh key prefix on this
//! binary's own `redis-server`). A factory is async (`Made` is a boxed future) because a remote
//! store connects before it is usable.
//! The tests are named `<backend>::<case>`, so `cargo test --test store_contract memory::` runs
//! one backend.
//!
//! Timing: "is woken" is checked against a generous deadline ([`WOKEN`]), "is not woken yet"
//! by a short look ([`NOT_YET`]) that can only fail if the store answers early; no case asserts
//! how long anything took.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

use futures_util::future::BoxFuture;
use serde_json::{json, Value};
use sluice::event::{Event, NewEvent};
use sluice::store::budget::{Budget, QuotaKind, Quotas};
use sluice::store::memory::{MemoryLimits, MemoryStore};
use sluice::store::redis::{RedisSettings, RedisStore};
use sluice::store::{
    clip_error, BackendThread, LatestRun, NewRun, RunId, RunInfo, RunLimit, RunStatus, Started,
    Store, StoreError, ThreadId, MAX_ERROR_BYTES,
};
use tokio::task::JoinHandle;

// ---------------------------------------------------------------------------------------------
// What a case may vary, and the backends.
// ---------------------------------------------------------------------------------------------

/// The limits a case may vary (every backend maps them onto its own configuration).
#[derive(Clone, Debug)]
pub struct Limits {
    /// `limits.max_events_per_run`
    pub max_events_per_run: u64,
    /// `limits.max_bytes_per_run`
    pub max_bytes_per_run: u64,
    /// `limits.max_total_bytes`
    pub max_total_bytes: u64,
    /// `store.retention`: how long finished runs are kept.
    pub retention: Duration,
    /// `store.thread_retention`: how long a thread's record outlives its last run.
    pub thread_retention: Duration,
    /// `store.full_retry_after`: the `retry_after` of [`StoreError::Full`].
    pub full_retry_after: Duration,
    /// `[limits.per_org]`
    pub quotas: Quotas,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_events_per_run: 10_000,
            max_bytes_per_run: 1 << 20,
            max_total_bytes: 64 << 20,
            retention: HOUR,
            thread_retention: HOUR,
            full_retry_after: Duration::from_secs(7),
            quotas: Quotas::unlimited(),
        }
    }
}

/// What a backend's factory returns: a fresh store, empty and isolated from every other store
/// the factory made (tests run in parallel).
pub type Made = BoxFuture<'static, Arc<dyn Store>>;

/// A backend's factory.
pub type Make = dyn Fn(Limits) -> Made + Sync;

/// The embedded store.
fn memory(l: Limits) -> Made {
    let store = MemoryStore::new(MemoryLimits {
        max_events_per_run: l.max_events_per_run,
        max_bytes_per_run: l.max_bytes_per_run,
        max_total_bytes: l.max_total_bytes,
        retention: l.retention,
        thread_retention: l.thread_retention,
        retry_after: l.full_retry_after,
        quotas: l.quotas,
    });
    Box::pin(async move { Arc::new(store) as Arc<dyn Store> })
}

/// The shared store, on this test binary's own `redis-server` (started on a free port at first
/// use, stopped when the binary exits), each store under a prefix of its own.
fn redis(l: Limits) -> Made {
    static SERVER: std::sync::OnceLock<common::cluster::RedisServer> = std::sync::OnceLock::new();
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    extern "C" fn stop_server() {
        if let Some(pid) = SERVER.get().and_then(|s| s.pid()) {
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
    let url = SERVER
        .get_or_init(|| {
            unsafe { libc::atexit(stop_server) };
            common::cluster::RedisServer::start()
        })
        .url();
    let prefix = format!(
        "c{}x{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let settings = RedisSettings {
        url,
        prefix,
        connect_timeout: Duration::from_secs(2),
        response_timeout: Duration::from_secs(5),
        lease_ttl: Duration::from_secs(30),
        lease_renew: Duration::from_secs(5),
        takeover_scan: Duration::from_secs(1),
        tail_events: 256,
        max_events_per_run: l.max_events_per_run,
        max_bytes_per_run: l.max_bytes_per_run,
        retention: l.retention,
        thread_retention: l.thread_retention,
        retry_after: l.full_retry_after,
        quotas: l.quotas,
    };
    let budget = Arc::new(Budget::new(l.max_total_bytes));
    Box::pin(async move {
        let store = tokio::task::spawn_blocking(move || RedisStore::connect(settings, budget))
            .await
            .expect("connect task")
            .expect("connect to the test redis-server");
        store as Arc<dyn Store>
    })
}

/// One `#[tokio::test]` per case for a backend: `contract_suite!(name => path::to::factory);`.
/// A case can carry attributes (`#[ignore = "finding: ..."]`) in the list below.
macro_rules! contract_suite {
    // A store that bounds what it holds by `max_total_bytes` (the embedded one) also runs the
    // budget's cases; a shared store's memory is Redis's (`maxmemory`, refusals as `Full`).
    ($backend:ident => $make:path, with budget) => {
        contract_suite!($backend => $make;
            bytes_held_grows_with_appends_and_shrinks_on_eviction,
            the_budget_bounds_what_is_held_and_finished_runs_make_room,
            a_full_store_refuses_new_runs_and_whole_batches,
            what_is_held_never_exceeds_max_total_bytes,
        );
    };
    ($backend:ident => $make:path $(; $($extra:ident),* $(,)?)?) => {
        mod $backend {
            contract_suite!(@cases $make; $($($extra,)*)?
                // The log.
                seq_is_gapless_and_every_cursor_reads_exactly_what_follows,
                read_after_bounds_bytes_but_always_returns_one_event,
                seq_runs_through_the_thread_and_a_read_never_crosses_runs,
                unknown_runs_are_not_found,
                // Creating runs.
                a_new_run_and_its_thread_carry_what_was_asked,
                a_thread_refuses_a_second_live_run_and_another_agent,
                a_foreign_thread_is_reported_exactly_like_a_missing_one,
                an_idempotency_key_returns_its_run_while_retained,
                idempotency_keys_are_scoped_by_organisation_and_user,
                concurrent_creates_with_one_key_make_one_run,
                a_failed_keyed_run_is_retried_as_a_new_run_in_its_thread,
                concurrent_retries_after_a_failure_make_one_new_run,
                forget_key_forgets_only_the_run_it_names,
                a_conversation_maps_to_one_thread_per_organisation,
                concurrent_first_uses_of_a_conversation_make_one_thread,
                // Appending and finishing.
                append_keeps_what_fits_the_per_run_limits,
                per_run_limits_count_the_runs_own_events_not_the_threads,
                finish_appends_the_final_event_atomically,
                finish_happens_once_and_the_terminal_status_is_final,
                finish_keeps_the_final_event_at_a_run_limit,
                error_texts_are_clipped,
                concurrent_appends_are_whole_gapless_and_each_writer_ordered,
                a_finish_racing_appends_leaves_the_final_event_last,
                readers_see_a_contiguous_prefix_while_a_writer_appends,
                // Waiting.
                wait_returns_at_once_when_there_is_news_or_the_run_ended,
                wait_wakes_on_append_and_on_finish,
                wait_without_a_deadline_still_wakes,
                waits_time_out_with_the_current_state,
                a_waiter_racing_an_append_is_never_lost,
                wait_thread_returns_at_once_for_what_the_caller_has_not_seen,
                wait_thread_wakes_on_append,
                wait_thread_wakes_when_the_latest_run_ends_or_a_new_one_starts,
                // Retention.
                sweep_evicts_only_finished_runs_past_retention,
                an_evicted_run_leaves_its_thread_record_behind,
                a_thread_continues_after_its_runs_were_evicted_and_is_kept_while_in_use,
                thread_records_are_forgotten_after_thread_retention,
                backend_threads_are_recorded_per_thread,
                // Quotas.
                a_running_runs_quota_refuses_only_its_organisation,
                concurrent_creates_never_pass_the_running_runs_quota,
                a_bytes_quota_refuses_only_its_organisation,
            );
        }
    };
    (@cases $make:path; $($(#[$attr:meta])* $case:ident),* $(,)?) => {
        $(
            $(#[$attr])*
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                crate::cases::$case(&$make).await;
            }
        )*
    };
}

contract_suite!(memory => crate::memory, with budget);
contract_suite!(redis => crate::redis);

// ---------------------------------------------------------------------------------------------
// Helpers.
// ---------------------------------------------------------------------------------------------

const HOUR: Duration = Duration::from_secs(3600);
/// How long something that must happen may take (generous: the machine is shared and slow).
const WOKEN: Duration = Duration::from_secs(20);
/// A wait's own timeout in cases that expect it to be woken: longer than [`WOKEN`], so a wait
/// that only returns at its timeout fails the case.
const LONG: Duration = Duration::from_secs(120);
/// How long to look before concluding that a waiter has not returned yet.
const NOT_YET: Duration = Duration::from_millis(100);

fn agent() -> Value {
    json!("agent-7")
}

fn message(id: &str) -> Value {
    json!({"id": id, "role": "user", "parts": [{"type": "text", "text": "hello"}]})
}

/// A run of `org` (user `u`), in `thread` or a new one.
fn req(org: &str, thread: Option<&ThreadId>) -> NewRun {
    NewRun {
        thread_id: thread.cloned(),
        org_id: org.into(),
        user_id: "u".into(),
        agent_id: agent(),
        user_message: message("m"),
        idempotency_key: None,
        conversation: None,
    }
}

/// A run of `org` and `user` with idempotency key `key`.
fn keyed(org: &str, user: &str, key: &str, thread: Option<&ThreadId>) -> NewRun {
    NewRun {
        user_id: user.into(),
        idempotency_key: Some(key.into()),
        user_message: message(key),
        ..req(org, thread)
    }
}

fn ev(text: &str) -> NewEvent {
    NewEvent::new(text.as_bytes().to_vec())
}

fn evs(texts: &[&str]) -> Vec<NewEvent> {
    texts.iter().map(|t| ev(t)).collect()
}

fn text(e: &Event) -> String {
    String::from_utf8(e.data.to_vec()).expect("utf-8 payload")
}

fn seqs(events: &[Event]) -> Vec<u64> {
    events.iter().map(|e| e.seq).collect()
}

/// Create a run that must be new.
async fn start(s: &dyn Store, new: NewRun) -> RunInfo {
    let started = s.create_run(new).await.expect("create_run");
    assert!(
        !started.existing,
        "a new run was expected, got an existing one"
    );
    started.run
}

/// A run's whole log as (seq, text).
async fn log(s: &dyn Store, run: &RunId) -> Vec<(u64, String)> {
    let b = s
        .read_after(run, 0, usize::MAX, usize::MAX)
        .await
        .expect("read_after");
    b.events.iter().map(|e| (e.seq, text(e))).collect()
}

async fn texts(s: &dyn Store, run: &RunId) -> Vec<String> {
    log(s, run).await.into_iter().map(|(_, t)| t).collect()
}

/// `f` must complete within [`WOKEN`].
async fn woken<F: Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(WOKEN, f).await {
        Ok(out) => out,
        Err(_) => panic!("{what}: did not return within {WOKEN:?}"),
    }
}

/// A spawned waiter must still be waiting after [`NOT_YET`].
async fn still_waiting<T>(what: &str, waiter: &JoinHandle<T>) {
    tokio::time::sleep(NOT_YET).await;
    assert!(
        !waiter.is_finished(),
        "{what}: returned before anything changed"
    );
}

/// Join a spawned waiter that must return within [`WOKEN`].
async fn joined<T>(what: &str, waiter: JoinHandle<T>) -> T {
    woken(what, waiter).await.expect("waiter task panicked")
}

/// `n` tasks creating the same run at once; their outcomes, in no particular order.
async fn concurrently(
    s: &Arc<dyn Store>,
    n: usize,
    new: NewRun,
) -> Vec<Result<Started, StoreError>> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (s, new) = (s.clone(), new.clone());
            tokio::spawn(async move { s.create_run(new).await })
        })
        .collect();
    let mut outcomes = Vec::with_capacity(n);
    for t in tasks {
        outcomes.push(joined("create_run", t).await);
    }
    outcomes
}

fn spawn_wait(
    s: &Arc<dyn Store>,
    run: &RunId,
    after: u64,
    timeout: Duration,
) -> JoinHandle<Result<(u64, RunStatus), StoreError>> {
    let (s, run) = (s.clone(), run.clone());
    tokio::spawn(async move { s.wait(&run, after, timeout).await })
}

fn spawn_wait_thread(
    s: &Arc<dyn Store>,
    org: &str,
    thread: &ThreadId,
    seen: LatestRun,
    after: u64,
) -> JoinHandle<Result<bool, StoreError>> {
    let (s, org, thread) = (s.clone(), org.to_string(), thread.clone());
    tokio::spawn(async move { s.wait_thread(&org, &thread, &seen, after, LONG).await })
}

/// Sweep until `run` is evicted (within [`WOKEN`]); returns what the sweeps reported.
async fn sweep_until_evicted(s: &dyn Store, run: &RunId) -> usize {
    let deadline = Instant::now() + WOKEN;
    let mut swept = 0;
    loop {
        swept += s.sweep().await;
        match s.run(run).await {
            Err(StoreError::RunNotFound) => return swept,
            Ok(_) => {}
            Err(e) => panic!("run({run}): {e}"),
        }
        assert!(Instant::now() < deadline, "{run} was never evicted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sweep until the thread's record is forgotten (within [`WOKEN`]).
async fn sweep_until_forgotten(s: &dyn Store, org: &str, thread: &ThreadId) {
    let deadline = Instant::now() + WOKEN;
    loop {
        s.sweep().await;
        match s.thread(org, thread).await {
            Err(StoreError::ThreadNotFound) => return,
            Ok(_) => {}
            Err(e) => panic!("thread({thread}): {e}"),
        }
        assert!(
            Instant::now() < deadline,
            "thread {thread} was never forgotten"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn quotas(running: u64, bytes: u64) -> Quotas {
    let mut q = Quotas::unlimited();
    q.default.max_running_runs = running;
    q.default.max_bytes = bytes;
    q.retry_after = Duration::from_secs(3);
    q
}

/// Busy-wait `(round % 20) * 10` µs: delays shorter than a timer's resolution, swept by round.
fn spin(round: u64) {
    let until = Instant::now() + Duration::from_micros((round % 20) * 10);
    while Instant::now() < until {
        std::hint::spin_loop();
    }
}

/// A small deterministic generator (no dependency, same sequence on every backend).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

// ---------------------------------------------------------------------------------------------
// The cases.
// ---------------------------------------------------------------------------------------------

mod cases {
    use super::*;

    // --- The log -----------------------------------------------------------------------------

    /// Appends number events 1, 2, 3, ... with no gap and return the new last seq; a read after
    /// any cursor `k` returns exactly the events `k+1..`, at most `max` of them.
    pub async fn seq_is_gapless_and_every_cursor_reads_exactly_what_follows(make: &Make) {
        let s = make(Limits::default()).await;
        let r = start(&*s, req("o", None)).await;
        assert_eq!((r.first_seq, r.last_seq, r.events()), (1, 0, 0));
        let mut rng = Lcg(7);
        let mut n = 0u64;
        for _ in 0..20 {
            let size = rng.below(5);
            let batch: Vec<NewEvent> = (0..size).map(|i| ev(&format!("e{}", n + i + 1))).collect();
            let last = s.append(&r.run_id, batch).await.expect("append");
            assert_eq!(last, n + size, "append returns the new last seq");
            n = last;
        }
        assert!(n >= 5, "the batches hold a few events: {n}");
        for k in 0..=n + 2 {
            let b = s
                .read_after(&r.run_id, k, usize::MAX, usize::MAX)
                .await
                .unwrap();
            assert_eq!(
                seqs(&b.events),
                ((k + 1)..=n).collect::<Vec<_>>(),
                "after {k}"
            );
            for e in &b.events {
                assert_eq!(text(e), format!("e{}", e.seq));
            }
            assert_eq!((b.last_seq, b.status), (n, RunStatus::InProgress));
        }
        // At most `max`, from the cursor on.
        let b = s.read_after(&r.run_id, 2, 3, usize::MAX).await.unwrap();
        assert_eq!(seqs(&b.events), [3, 4, 5]);
        let b = s.read_after(&r.run_id, 0, 1, usize::MAX).await.unwrap();
        assert_eq!(seqs(&b.events), [1]);
        let info = s.run(&r.run_id).await.unwrap();
        assert_eq!((info.first_seq, info.last_seq, info.events()), (1, n, n));
    }

    /// `max_bytes` bounds a read, but the first event after the cursor is always included,
    /// whatever its size, so a reader always makes progress.
    pub async fn read_after_bounds_bytes_but_always_returns_one_event(make: &Make) {
        let s = make(Limits::default()).await;
        let r = start(&*s, req("o", None)).await;
        let (a, c) = ("a".repeat(3000), "c".repeat(3000));
        s.append(&r.run_id, evs(&[&a, "b", &c, "d"])).await.unwrap();
        let read = |after: u64, max: usize, max_bytes: usize| {
            let (s, id) = (s.clone(), r.run_id.clone());
            async move {
                let b = s.read_after(&id, after, max, max_bytes).await.unwrap();
                assert_eq!((b.last_seq, b.status), (4, RunStatus::InProgress));
                seqs(&b.events)
            }
        };
        assert_eq!(
            read(0, 10, 1).await,
            [1],
            "the first event is always included"
        );
        assert_eq!(
            read(2, 10, 1).await,
            [3],
            "the first event is always included"
        );
        assert_eq!(read(1, 10, 1).await, [2]);
        let bounded = read(0, 10, 3001).await;
        assert!(
            bounded == [1] || bounded == [1, 2],
            "about 3001 bytes from seq 1: {bounded:?}"
        );
        assert_eq!(read(0, 10, usize::MAX).await, [1, 2, 3, 4]);
        assert_eq!(read(0, 2, usize::MAX).await, [1, 2]);
        assert_eq!(read(1, 10, 100_000).await, [2, 3, 4]);
        assert_eq!(read(4, 10, 1).await, Vec::<u64>::new());
    }

    /// Seq runs through a thread: run 2 starts after run 1's last seq (its final event
    /// included); a read of a run returns only that run's events, whatever the cursor.
    pub async fn seq_runs_through_the_thread_and_a_read_never_crosses_runs(make: &Make) {
        let s = make(Limits::default()).await;
        let r1 = start(&*s, req("o", None)).await;
        let t = r1.thread_id.clone();
        s.append(&r1.run_id, evs(&["a", "b"])).await.unwrap();
        assert!(s
            .finish(&r1.run_id, RunStatus::Completed, None, Some(ev("end1")))
            .await
            .unwrap());
        let r2 = start(&*s, req("o", Some(&t))).await;
        assert_eq!(r2.thread_id, t);
        assert_eq!((r2.first_seq, r2.last_seq), (4, 3));
        assert_eq!(s.append(&r2.run_id, evs(&["c", "d"])).await, Ok(5));
        s.finish(&r2.run_id, RunStatus::Completed, None, Some(ev("end2")))
            .await
            .unwrap();
        let r3 = start(&*s, req("o", Some(&t))).await;
        assert_eq!(r3.first_seq, 7);
        assert_eq!(s.append(&r3.run_id, evs(&["e"])).await, Ok(7));
        // A cursor before a run's start reads that run from its first event, and never another's.
        assert_eq!(
            log(&*s, &r2.run_id).await,
            [(4, "c".into()), (5, "d".into()), (6, "end2".into())]
        );
        let b = s
            .read_after(&r2.run_id, 4, usize::MAX, usize::MAX)
            .await
            .unwrap();
        assert_eq!(seqs(&b.events), [5, 6]);
        assert_eq!((b.last_seq, b.status), (6, RunStatus::Completed));
        let b = s
            .read_after(&r1.run_id, 1, usize::MAX, usize::MAX)
            .await
            .unwrap();
        assert_eq!(seqs(&b.events), [2, 3], "never the next run's events");
        let b = s
            .read_after(&r1.run_id, 3, usize::MAX, usize::MAX)
            .await
            .unwrap();
        assert!(b.events.is_empty());
        // The thread lists its runs oldest first, their ranges adjacent.
        let th = s.thread("o", &t).await.unwrap();
        let ranges: Vec<_> = th.runs.iter().map(|r| (r.first_seq, r.last_seq)).collect();
        assert_eq!(ranges, [(1, 3), (4, 6), (7, 7)]);
        let ids: Vec<_> = th.runs.iter().map(|r| r.run_id.clone()).collect();
        assert_eq!(ids, [r1.run_id, r2.run_id, r3.run_id.clone()]);
        assert_eq!(th.last_seq(), 7);
        assert_eq!(th.latest_run(), Some((r3.run_id, RunStatus::InProgress)));
    }

    /// Every run operation on an unknown run is `RunNotFound`.
    pub async fn unknown_runs_are_not_found(make: &Make) {
        let s = make(Limits::default()).await;
        start(&*s, req("o", None)).await;
        let nobody = RunId::generate();
        assert_eq!(s.run(&nobody).await, Err(StoreError::RunNotFound));
        assert_eq!(
            s.append(&nobody, evs(&["x"])).await,
            Err(StoreError::RunNotFound)
        );
        assert_eq!(
            s.finish(&nobody, RunStatus::Completed, None, Some(ev("x")))
                .await,
            Err(StoreError::RunNotFound)
        );
        assert_eq!(
            s.read_after(&nobody, 0, 10, usize::MAX).await,
            Err(StoreError::RunNotFound)
        );
        assert_eq!(
            woken("wait on an unknown run", s.wait(&nobody, 0, LONG)).await,
            Err(StoreError::RunNotFound)
        );
    }

    // --- Creating runs -----------------------------------------------------------------------

    /// A new run is in progress, empty, and carries what was asked; its new thread lists it.
    pub async fn a_new_run_and_its_thread_carry_what_was_asked(make: &Make) {
        let s = make(Limits::default()).await;
        let new = keyed("o", "alice", "m-1", None);
        let r = start(&*s, new.clone()).await;
        assert_eq!(r.status, RunStatus::InProgress);
        assert_eq!(r.error, None);
        assert_eq!((r.org_id.as_str(), r.user_id.as_str()), ("o", "alice"));
        assert_eq!(r.agent_id, agent());
        assert_eq!(*r.user_message, new.user_message);
        assert_eq!(r.idempotency_key.as_deref(), Some("m-1"));
        assert_eq!((r.first_seq, r.last_seq, r.bytes), (1, 0, 0));
        assert!(!r.assistant_message_id.is_empty());
        assert!(r.updated_at >= r.created_at);
        // Read back, and after appends.
        s.append(&r.run_id, evs(&["abc", "de"])).await.unwrap();
        let got = s.run(&r.run_id).await.unwrap();
        assert_eq!(
            (&got.run_id, &got.thread_id, got.status, got.last_seq),
            (&r.run_id, &r.thread_id, RunStatus::InProgress, 2)
        );
        assert_eq!(got.bytes, 5, "payload bytes of the run");
        assert_eq!(got.assistant_message_id, r.assistant_message_id);
        assert_eq!(*got.user_message, new.user_message);
        assert!(got.updated_at >= got.created_at);
        let th = s.thread("o", &r.thread_id).await.unwrap();
        assert_eq!((th.org_id.as_str(), &th.agent_id), ("o", &agent()));
        assert_eq!(th.runs.len(), 1);
        assert_eq!(th.runs[0].run_id, r.run_id);
        assert!(th.evicted.is_empty());
        assert_eq!((th.evicted_runs, th.evicted_through), (0, 0));
        assert_eq!(th.latest_evicted, None);
        // Another new run: another thread, another run id, another assistant message.
        let other = start(&*s, req("o", None)).await;
        assert_ne!(other.run_id, r.run_id);
        assert_ne!(other.thread_id, r.thread_id);
        assert_ne!(other.assistant_message_id, r.assistant_message_id);
        assert_eq!(other.first_seq, 1);
    }

    /// A thread whose latest run is in progress refuses another run (naming that run), and a
    /// thread refuses another agent; neither refusal changes the thread.
    pub async fn a_thread_refuses_a_second_live_run_and_another_agent(make: &Make) {
        let s = make(Limits::default()).await;
        let r1 = start(&*s, req("o", None)).await;
        let t = r1.thread_id.clone();
        assert_eq!(
            s.create_run(req("o", Some(&t))).await,
            Err(StoreError::RunInProgress(r1.run_id.clone()))
        );
        s.finish(&r1.run_id, RunStatus::Completed, None, None)
            .await
            .unwrap();
        let other_agent = NewRun {
            agent_id: json!("someone-else"),
            ..req("o", Some(&t))
        };
        assert!(matches!(
            s.create_run(other_agent).await,
            Err(StoreError::AgentMismatch(_))
        ));
        assert_eq!(s.thread("o", &t).await.unwrap().runs.len(), 1);
        let r2 = start(&*s, req("o", Some(&t))).await;
        assert_eq!((r2.thread_id, r2.first_seq), (t.clone(), 1));
        assert_eq!(
            s.create_run(req("o", Some(&t))).await,
            Err(StoreError::RunInProgress(r2.run_id.clone()))
        );
    }

    /// Another organisation's thread is `ThreadNotFound` everywhere, exactly like an unknown
    /// thread: never `RunInProgress` or `AgentMismatch`, which would reveal it exists.
    pub async fn a_foreign_thread_is_reported_exactly_like_a_missing_one(make: &Make) {
        let s = make(Limits::default()).await;
        let r = start(&*s, req("a", None)).await;
        let t = r.thread_id.clone();
        let missing = ThreadId::generate();
        for thread in [&t, &missing] {
            assert_eq!(s.thread("b", thread).await, Err(StoreError::ThreadNotFound));
            // Its run is in progress: still not found.
            assert_eq!(
                s.create_run(req("b", Some(thread))).await,
                Err(StoreError::ThreadNotFound)
            );
            let other_agent = NewRun {
                agent_id: json!("someone-else"),
                ..req("b", Some(thread))
            };
            assert_eq!(
                s.create_run(other_agent).await,
                Err(StoreError::ThreadNotFound)
            );
            assert_eq!(
                woken(
                    "wait_thread on a foreign thread",
                    s.wait_thread("b", thread, &None, 0, LONG)
                )
                .await,
                Err(StoreError::ThreadNotFound)
            );
        }
        assert_eq!(
            s.thread("a", &missing).await,
            Err(StoreError::ThreadNotFound)
        );
        assert_eq!(
            s.create_run(req("a", Some(&missing))).await,
            Err(StoreError::ThreadNotFound)
        );
        // Nothing leaked into the owner's thread.
        let th = s.thread("a", &t).await.unwrap();
        assert_eq!(th.runs.len(), 1);
        assert_eq!(th.org_id, "a");
    }

    /// The same (organisation, user, key) returns the retained run: while it is in progress
    /// (also when the thread is named), once completed, once stopped; with its current state.
    pub async fn an_idempotency_key_returns_its_run_while_retained(make: &Make) {
        let s = make(Limits::default()).await;
        let r = start(&*s, keyed("o", "u", "k1", None)).await;
        let again = s.create_run(keyed("o", "u", "k1", None)).await.unwrap();
        assert!(again.existing);
        assert_eq!(again.run.run_id, r.run_id);
        assert_eq!(again.run.status, RunStatus::InProgress);
        // Naming its thread re-attaches too (not RunInProgress).
        let again = s
            .create_run(keyed("o", "u", "k1", Some(&r.thread_id)))
            .await
            .unwrap();
        assert!(again.existing && again.run.run_id == r.run_id);
        s.append(&r.run_id, evs(&["a"])).await.unwrap();
        s.finish(&r.run_id, RunStatus::Completed, None, Some(ev("end")))
            .await
            .unwrap();
        let again = s.create_run(keyed("o", "u", "k1", None)).await.unwrap();
        assert!(again.existing && again.run.run_id == r.run_id);
        assert_eq!(
            (again.run.status, again.run.last_seq),
            (RunStatus::Completed, 2)
        );
        let stopped = start(&*s, keyed("o", "u", "k2", None)).await;
        s.finish(&stopped.run_id, RunStatus::Stopped, None, None)
            .await
            .unwrap();
        let again = s.create_run(keyed("o", "u", "k2", None)).await.unwrap();
        assert!(again.existing && again.run.run_id == stopped.run_id);
        assert_eq!(again.run.status, RunStatus::Stopped);
        // Nothing new was started by the retries.
        assert_eq!(s.thread("o", &r.thread_id).await.unwrap().runs.len(), 1);
    }

    /// Two users (or organisations) whose clients number messages alike never meet.
    pub async fn idempotency_keys_are_scoped_by_organisation_and_user(make: &Make) {
        let s = make(Limits::default()).await;
        let r = start(&*s, keyed("o", "u", "m1", None)).await;
        let other_user = start(&*s, keyed("o", "v", "m1", None)).await;
        let other_org = start(&*s, keyed("p", "u", "m1", None)).await;
        let other_key = start(&*s, keyed("o", "u", "m2", None)).await;
        let ids = [
            &r.run_id,
            &other_user.run_id,
            &other_org.run_id,
            &other_key.run_id,
        ];
        for (i, a) in ids.iter().enumerate() {
            for b in &ids[i + 1..] {
                assert_ne!(a, b);
            }
        }
        for (org, user, key, want) in [
            ("o", "u", "m1", &r),
            ("o", "v", "m1", &other_user),
            ("p", "u", "m1", &other_org),
            ("o", "u", "m2", &other_key),
        ] {
            let again = s.create_run(keyed(org, user, key, None)).await.unwrap();
            assert!(again.existing, "{org}/{user}/{key}");
            assert_eq!(again.run.run_id, want.run_id, "{org}/{user}/{key}");
        }
    }

    /// Concurrent retries of one key get one run (the others re-attach to it).
    pub async fn concurrent_creates_with_one_key_make_one_run(make: &Make) {
        for round in 0..5 {
            let s = make(Limits::default()).await;
            let started: Vec<Started> = concurrently(&s, 32, keyed("o", "u", "m1", None))
                .await
                .into_iter()
                .map(|r| r.expect("create_run"))
                .collect();
            let new = started.iter().filter(|s| !s.existing).count();
            assert_eq!(new, 1, "round {round}: {new} runs created");
            let id = &started[0].run.run_id;
            assert!(started.iter().all(|s| s.run.run_id == *id));
            let th = s.thread("o", &started[0].run.thread_id).await.unwrap();
            assert_eq!(th.runs.len(), 1);
        }
    }

    /// A key whose run ended `error` or `timeout` starts a new run in the same thread (the failed
    /// one stays in its history); retries then re-attach to the new run.
    pub async fn a_failed_keyed_run_is_retried_as_a_new_run_in_its_thread(make: &Make) {
        let s = make(Limits::default()).await;
        for failed in [RunStatus::Error, RunStatus::Timeout] {
            let key = format!("m-{}", failed.as_str());
            let first = start(&*s, keyed("o", "u", &key, None)).await;
            s.append(&first.run_id, evs(&["a"])).await.unwrap();
            s.finish(
                &first.run_id,
                failed,
                Some("went away".into()),
                Some(ev("e")),
            )
            .await
            .unwrap();
            let retry = s.create_run(keyed("o", "u", &key, None)).await.unwrap();
            assert!(
                !retry.existing,
                "{failed:?}: a failed run is not re-attached"
            );
            assert_ne!(retry.run.run_id, first.run_id);
            assert_eq!(retry.run.thread_id, first.thread_id, "{failed:?}");
            assert_eq!(retry.run.first_seq, 3, "{failed:?}");
            let again = s.create_run(keyed("o", "u", &key, None)).await.unwrap();
            assert!(again.existing && again.run.run_id == retry.run.run_id);
            s.finish(&retry.run.run_id, RunStatus::Completed, None, None)
                .await
                .unwrap();
            let again = s.create_run(keyed("o", "u", &key, None)).await.unwrap();
            assert!(again.existing && again.run.run_id == retry.run.run_id);
            let th = s.thread("o", &first.thread_id).await.unwrap();
            let history: Vec<_> = th.runs.iter().map(|r| (&r.run_id, r.status)).collect();
            assert_eq!(
                history,
                [
                    (&first.run_id, failed),
                    (&retry.run.run_id, RunStatus::Completed)
                ]
            );
        }
    }

    /// After a failure, concurrent retries of the key start exactly one new run.
    pub async fn concurrent_retries_after_a_failure_make_one_new_run(make: &Make) {
        let s = make(Limits::default()).await;
        let first = start(&*s, keyed("o", "u", "m1", None)).await;
        s.finish(&first.run_id, RunStatus::Error, Some("boom".into()), None)
            .await
            .unwrap();
        let started: Vec<Started> = concurrently(&s, 16, keyed("o", "u", "m1", None))
            .await
            .into_iter()
            .map(|r| r.expect("create_run"))
            .collect();
        assert_eq!(started.iter().filter(|s| !s.existing).count(), 1);
        let id = &started[0].run.run_id;
        assert_ne!(*id, first.run_id);
        assert!(started.iter().all(|s| s.run.run_id == *id));
        let th = s.thread("o", &first.thread_id).await.unwrap();
        assert_eq!(th.runs.len(), 2);
    }

    /// `forget_key` forgets the key only if it still names that run, and only for that
    /// organisation and user; a forgotten key starts a new run.
    pub async fn forget_key_forgets_only_the_run_it_names(make: &Make) {
        let s = make(Limits::default()).await;
        let r = start(&*s, keyed("o", "u", "m1", None)).await;
        s.finish(&r.run_id, RunStatus::Completed, None, None)
            .await
            .unwrap();
        s.forget_key("o", "u", "m1", &RunId::generate()).await;
        s.forget_key("o", "v", "m1", &r.run_id).await;
        s.forget_key("p", "u", "m1", &r.run_id).await;
        s.forget_key("o", "u", "m2", &r.run_id).await;
        let again = s.create_run(keyed("o", "u", "m1", None)).await.unwrap();
        assert!(again.existing && again.run.run_id == r.run_id);
        s.forget_key("o", "u", "m1", &r.run_id).await;
        let fresh = s.create_run(keyed("o", "u", "m1", None)).await.unwrap();
        assert!(!fresh.existing);
        assert_ne!(fresh.run.run_id, r.run_id);
        // The forgotten run itself is still there.
        assert_eq!(s.run(&r.run_id).await.unwrap().status, RunStatus::Completed);
        // And the key now names the new run.
        let again = s.create_run(keyed("o", "u", "m1", None)).await.unwrap();
        assert!(again.existing && again.run.run_id == fresh.run.run_id);
    }

    /// A client conversation id maps to one thread per organisation, created on first use.
    pub async fn a_conversation_maps_to_one_thread_per_organisation(make: &Make) {
        let s = make(Limits::default()).await;
        let conv = |org: &str, c: &str, key: &str| NewRun {
            conversation: Some(c.into()),
            ..keyed(org, "u", key, None)
        };
        assert_eq!(s.conversation("o", "c-1").await, Ok(None));
        let r1 = start(&*s, conv("o", "c-1", "m1")).await;
        assert_eq!(
            s.conversation("o", "c-1").await,
            Ok(Some(r1.thread_id.clone()))
        );
        assert_eq!(
            s.create_run(conv("o", "c-1", "m2")).await,
            Err(StoreError::RunInProgress(r1.run_id.clone()))
        );
        s.append(&r1.run_id, evs(&["a"])).await.unwrap();
        s.finish(&r1.run_id, RunStatus::Completed, None, None)
            .await
            .unwrap();
        let r2 = start(&*s, conv("o", "c-1", "m2")).await;
        assert_eq!(r2.thread_id, r1.thread_id);
        assert_eq!(r2.first_seq, 2);
        // Another organisation's conversation of the same id is another thread.
        assert_eq!(s.conversation("p", "c-1").await, Ok(None));
        let p = start(&*s, conv("p", "c-1", "m1")).await;
        assert_ne!(p.thread_id, r1.thread_id);
        assert_eq!(
            s.conversation("p", "c-1").await,
            Ok(Some(p.thread_id.clone()))
        );
        assert_eq!(
            s.conversation("o", "c-1").await,
            Ok(Some(r1.thread_id.clone()))
        );
        assert_eq!(p.first_seq, 1);
        assert_eq!(
            s.thread("p", &r1.thread_id).await,
            Err(StoreError::ThreadNotFound)
        );
        // Another conversation id is another thread.
        let c2 = start(&*s, conv("o", "c-2", "m3")).await;
        assert_ne!(c2.thread_id, r1.thread_id);
    }

    /// Concurrent first uses of a conversation make one thread: one run starts, the others are
    /// refused because that thread has a run in progress.
    pub async fn concurrent_first_uses_of_a_conversation_make_one_thread(make: &Make) {
        for round in 0..10 {
            let s = make(Limits::default()).await;
            let tasks: Vec<_> = (0..8)
                .map(|i| {
                    let s = s.clone();
                    tokio::spawn(async move {
                        let new = NewRun {
                            conversation: Some("c-100".into()),
                            ..keyed("o", "u", &format!("m{i}"), None)
                        };
                        s.create_run(new).await
                    })
                })
                .collect();
            let mut started = Vec::new();
            let mut busy = Vec::new();
            for t in tasks {
                match joined("create_run", t).await {
                    Ok(st) => started.push(st),
                    Err(StoreError::RunInProgress(r)) => busy.push(r),
                    Err(e) => panic!("round {round}: {e}"),
                }
            }
            assert_eq!(started.len(), 1, "round {round}: one run starts");
            let run = &started[0].run;
            assert!(busy.iter().all(|r| *r == run.run_id), "round {round}");
            let th = s.thread("o", &run.thread_id).await.unwrap();
            assert_eq!(th.runs.len(), 1);
        }
    }

    // --- Appending and finishing -------------------------------------------------------------

    /// A batch that would pass a per-run limit appends what fits and returns `RunLimit`; the run
    /// stays in progress.
    pub async fn append_keeps_what_fits_the_per_run_limits(make: &Make) {
        let s = make(Limits {
            max_events_per_run: 4,
            ..Limits::default()
        })
        .await;
        let r = start(&*s, req("o", None)).await;
        assert_eq!(s.append(&r.run_id, evs(&["a", "b", "c"])).await, Ok(3));
        assert_eq!(
            s.append(&r.run_id, evs(&["d", "e", "f"])).await,
            Err(StoreError::RunLimit(RunLimit::Events))
        );
        assert_eq!(texts(&*s, &r.run_id).await, ["a", "b", "c", "d"]);
        assert_eq!(
            s.append(&r.run_id, evs(&["g"])).await,
            Err(StoreError::RunLimit(RunLimit::Events))
        );
        let info = s.run(&r.run_id).await.unwrap();
        assert_eq!((info.last_seq, info.status), (4, RunStatus::InProgress));

        let s = make(Limits {
            max_bytes_per_run: 10,
            ..Limits::default()
        })
        .await;
        let r = start(&*s, req("o", None)).await;
        assert_eq!(s.append(&r.run_id, evs(&["12345", "1234"])).await, Ok(2));
        assert_eq!(
            s.append(&r.run_id, evs(&["", "12"])).await,
            Err(StoreError::RunLimit(RunLimit::Bytes))
        );
        assert_eq!(
            s.append(&r.run_id, evs(&["1", "x"])).await,
            Err(StoreError::RunLimit(RunLimit::Bytes))
        );
        assert_eq!(
            s.append(&r.run_id, evs(&["too long"])).await,
            Err(StoreError::RunLimit(RunLimit::Bytes))
        );
        assert_eq!(texts(&*s, &r.run_id).await, ["12345", "1234", "", "1"]);
        let info = s.run(&r.run_id).await.unwrap();
        assert_eq!(
            (info.last_seq, info.bytes, info.status),
            (4, 10, RunStatus::InProgress)
        );
    }

    /// A run's limits count its own events, not the earlier runs' of its thread.
    pub async fn per_run_limits_count_the_runs_own_events_not_the_threads(make: &Make) {
        let s = make(Limits {
            max_events_per_run: 3,
            max_bytes_per_run: 3,
            ..Limits::default()
        })
        .await;
        let r1 = start(&*s, req("o", None)).await;
        assert_eq!(s.append(&r1.run_id, evs(&["a", "b", "c"])).await, Ok(3));
        s.finish(&r1.run_id, RunStatus::Completed, None, None)
            .await
            .unwrap();
        let r2 = start(&*s, req("o", Some(&r1.thread_id))).await;
        assert_eq!(s.append(&r2.run_id, evs(&["d", "e", "f"])).await, Ok(6));
        assert_eq!(
            s.append(&r2.run_id, evs(&["g"])).await,
            Err(StoreError::RunLimit(RunLimit::Events))
        );
    }

    /// `finish` appends the final event and ends the run in one step: nobody sees the run ended
    /// without its final event, and a waiter woken by the end sees both.
    pub async fn finish_appends_the_final_event_atomically(make: &Make) {
        let s = make(Limits::default()).await;
        let r = start(&*s, req("o", None)).await;
        s.append(&r.run_id, evs(&["a", "b"])).await.unwrap();
        let waiter = spawn_wait(&s, &r.run_id, 2, LONG);
        let observer = {
            let (s, id) = (s.clone(), r.run_id.clone());
            tokio::spawn(async move {
                let mut looks = 0u64;
                loop {
                    looks += 1;
                    let b = s.read_after(&id, 0, usize::MAX, usize::MAX).await.unwrap();
                    assert_eq!(b.events.last().map(|e| e.seq), Some(b.last_seq));
                    let info = s.run(&id).await.unwrap();
                    if info.status.is_terminal() {
                        assert_eq!(info.last_seq, 3, "ended without its final event");
                    }
                    if b.status.is_terminal() {
                        assert_eq!(b.last_seq, 3, "ended without its final event");
                        assert_eq!(text(&b.events[2]), "end");
                        return looks;
                    }
                    tokio::task::yield_now().await;
                }
            })
        };
        still_waiting("wait before the end", &waiter).await;
        assert!(s
            .finish(
                &r.run_id,
                RunStatus::Timeout,
                Some("slow".into()),
                Some(ev("end"))
            )
            .await
            .unwrap());
        assert_eq!(
            joined("wait woken by finish", waiter).await,
            Ok((3, RunStatus::Timeout))
        );
        assert!(joined("observer", observer).await >= 1);
        let info = s.run(&r.run_id).await.unwrap();
        assert_eq!(
            (info.status, info.error.as_deref(), info.last_seq),
            (RunStatus::Timeout, Some("slow"), 3)
        );
        assert_eq!(
            log(&*s, &r.run_id).await,
            [(1, "a".into()), (2, "b".into()), (3, "end".into())]
        );
    }

    /// The second `finish` returns false and changes nothing; an ended run refuses appends.
    pub async fn finish_happens_once_and_the_terminal_status_is_final(make: &Make) {
        let s = make(Limits::default()).await;
        for status in [
            RunStatus::Completed,
            RunStatus::Stopped,
            RunStatus::Error,
            RunStatus::Timeout,
        ] {
            let r = start(&*s, req("o", None)).await;
            s.append(&r.run_id, evs(&["a"])).await.unwrap();
            assert!(s.finish(&r.run_id, status, None, None).await.unwrap());
            let before = s.run(&r.run_id).await.unwrap();
            for other in [RunStatus::Completed, RunStatus::Error] {
                assert!(!s
                    .finish(&r.run_id, other, Some("late".into()), Some(ev("late")))
                    .await
                    .unwrap());
            }
            assert_eq!(
                s.append(&r.run_id, evs(&["late"])).await,
                Err(StoreError::Finished)
            );
            let after = s.run(&r.run_id).await.unwrap();
            assert_eq!(
                (after.status, after.error, after.last_seq, after.bytes),
                (status, None, 1, before.bytes),
                "{status:?}"
            );
            assert_eq!(texts(&*s, &r.run_id).await, ["a"]);
        }
    }

    /// The closing event is kept even when the run is at a per-run limit (a run must be able to
    /// say how it ended).
    pub async fn finish_keeps_the_final_event_at_a_run_limit(make: &Make) {
        let s = make(Limits {
            max_events_per_run: 2,
            max_bytes_per_run: 5,
            ..Limits::default()
        })
        .await;
        let r = start(&*s, req("o", None)).await;
        assert_eq!(
            s.append(&r.run_id, evs(&["ab", "cd", "e"])).await,
            Err(StoreError::RunLimit(RunLimit::Events))
        );
        assert!(s
            .finish(
                &r.run_id,
                RunStatus::Error,
                Some("limit".into()),
                Some(ev("end"))
            )
            .await
            .unwrap());
        assert_eq!(texts(&*s, &r.run_id).await, ["ab", "cd", "end"]);
        let r = start(&*s, req("o", None)).await;
        assert_eq!(
            s.append(&r.run_id, evs(&["12345", "6"])).await,
            Err(StoreError::RunLimit(RunLimit::Bytes))
        );
        assert!(s
            .finish(&r.run_id, RunStatus::Error, None, Some(ev("end")))
            .await
            .unwrap());
        assert_eq!(texts(&*s, &r.run_id).await, ["12345", "end"]);
        assert_eq!(s.run(&r.run_id).await.unwrap().status, RunStatus::Error);
    }

    /// A run keeps its error text as `clip_error` makes it: at most `MAX_ERROR_BYTES`, no
    /// control characters (also once the run is evicted: see the eviction case).
    pub async fn error_texts_are_clipped(make: &Make) {
        let s = make(Limits::default()).await;
        let long = format!("  upstream said:\n{}\u{1b}[31m  ", "é".repeat(2000));
        let r = start(&*s, req("o", None)).await;
        s.finish(&r.run_id, RunStatus::Error, Some(long.clone()), None)
            .await
            .unwrap();
        let kept = s
            .run(&r.run_id)
            .await
            .unwrap()
            .error
            .expect("an error text");
        assert_eq!(kept, clip_error(&long));
        assert!(kept.len() <= MAX_ERROR_BYTES + '…'.len_utf8());
        assert!(!kept.chars().any(char::is_control));
        let r = start(&*s, req("o", None)).await;
        s.finish(
            &r.run_id,
            RunStatus::Timeout,
            Some("line\nbreak".into()),
            None,
        )
        .await
        .unwrap();
        assert_eq!(
            s.run(&r.run_id).await.unwrap().error.as_deref(),
            Some("line\\u{a}break")
        );
    }

    /// Appends racing on one run are each applied whole and in one piece: the log is gapless,
    /// each batch sits at the seqs its append returned, and each writer's appends land in the
    /// order it made them.
    pub async fn concurrent_appends_are_whole_gapless_and_each_writer_ordered(make: &Make) {
        let s = make(Limits::default()).await;
        let r = start(&*s, req("o", None)).await;
        let writers: Vec<_> = (0..4u64)
            .map(|w| {
                let (s, id) = (s.clone(), r.run_id.clone());
                tokio::spawn(async move {
                    let mut rng = Lcg(w + 1);
                    let mut done = Vec::new();
                    for b in 0..25 {
                        let n = 1 + rng.below(4) as usize;
                        let batch: Vec<String> = (0..n).map(|i| format!("w{w}-b{b}-{i}")).collect();
                        let refs: Vec<&str> = batch.iter().map(String::as_str).collect();
                        let last = s.append(&id, evs(&refs)).await.expect("append");
                        done.push((last, batch));
                        if b % 3 == 0 {
                            tokio::task::yield_now().await;
                        }
                    }
                    done
                })
            })
            .collect();
        let mut batches = Vec::new();
        for w in writers {
            let done = joined("writer", w).await;
            let lasts: Vec<u64> = done.iter().map(|(l, _)| *l).collect();
            assert!(
                lasts.windows(2).all(|p| p[0] < p[1]),
                "a writer's appends land in its order: {lasts:?}"
            );
            batches.extend(done);
        }
        let total: usize = batches.iter().map(|(_, b)| b.len()).sum();
        let log = log(&*s, &r.run_id).await;
        assert_eq!(
            log.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(),
            (1..=total as u64).collect::<Vec<_>>()
        );
        for (last, batch) in &batches {
            let first = *last as usize + 1 - batch.len();
            let got: Vec<&String> = log[first - 1..*last as usize]
                .iter()
                .map(|(_, t)| t)
                .collect();
            assert_eq!(
                got,
                batch.iter().collect::<Vec<_>>(),
                "batch ending at {last}"
            );
        }
    }

    /// A stop racing a writer: after `finish`, every append is refused, and the final event is
    /// the last of a gapless log holding everything the writer was told was appended.
    pub async fn a_finish_racing_appends_leaves_the_final_event_last(make: &Make) {
        let s = make(Limits {
            max_events_per_run: 1_000_000,
            ..Limits::default()
        })
        .await;
        for round in 0..5u64 {
            let r = start(&*s, req("o", None)).await;
            let writer = {
                let (s, id) = (s.clone(), r.run_id.clone());
                tokio::spawn(async move {
                    let mut acked = Vec::new();
                    for i in 0..200_000u64 {
                        match s.append(&id, vec![ev(&format!("e{i}"))]).await {
                            Ok(seq) => acked.push(seq),
                            Err(StoreError::Finished) => return acked,
                            Err(e) => panic!("append: {e}"),
                        }
                        tokio::task::yield_now().await;
                    }
                    panic!("the run was never finished");
                })
            };
            tokio::time::sleep(Duration::from_millis(5 * round)).await;
            assert!(s
                .finish(&r.run_id, RunStatus::Stopped, None, Some(ev("stopped")))
                .await
                .unwrap());
            let acked = joined("writer", writer).await;
            let log = log(&*s, &r.run_id).await;
            let n = log.len() as u64;
            assert_eq!(
                log.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(),
                (1..=n).collect::<Vec<_>>()
            );
            assert_eq!(log.last().unwrap().1, "stopped", "the final event is last");
            assert_eq!(
                acked,
                (1..n).collect::<Vec<_>>(),
                "every acked append is in the log"
            );
            for (i, (_, t)) in log[..log.len() - 1].iter().enumerate() {
                assert_eq!(*t, format!("e{i}"));
            }
            let info = s.run(&r.run_id).await.unwrap();
            assert_eq!((info.status, info.last_seq), (RunStatus::Stopped, n));
        }
    }

    /// Readers following a run while it is written see a contiguous prefix of its log: each event
    /// once, in order, never past the reported last seq, then the end.
    pub async fn readers_see_a_contiguous_prefix_while_a_writer_appends(make: &Make) {
        let s = make(Limits::default()).await;
        let r = start(&*s, req("o", None)).await;
        let payload = |seq: u64| format!("e{seq}:{}", "x".repeat((seq % 13) as usize * 5));
        let reader = |delay: u64| {
            let (s, id) = (s.clone(), r.run_id.clone());
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(delay)).await;
                let mut cursor = 0u64;
                loop {
                    let b = s.read_after(&id, cursor, 7, 64).await.expect("read_after");
                    for e in &b.events {
                        assert_eq!(e.seq, cursor + 1, "contiguous");
                        assert_eq!(text(e), payload(e.seq));
                        cursor = e.seq;
                    }
                    assert!(cursor <= b.last_seq, "an event past the reported last seq");
                    if b.status.is_terminal() && cursor == b.last_seq {
                        return cursor;
                    }
                    if b.events.is_empty() {
                        assert!(!b.status.is_terminal(), "ended short of its last seq");
                        s.wait(&id, cursor, LONG).await.expect("wait");
                    }
                }
            })
        };
        let readers: Vec<_> = [0, 0, 3, 10, 30].into_iter().map(reader).collect();
        let mut rng = Lcg(42);
        let mut n = 0u64;
        while n < 400 {
            let size = 1 + rng.below(5);
            let batch: Vec<NewEvent> = (n + 1..=n + size).map(|seq| ev(&payload(seq))).collect();
            n = s.append(&r.run_id, batch).await.unwrap();
            if rng.below(3) == 0 {
                tokio::task::yield_now().await;
            }
        }
        s.finish(
            &r.run_id,
            RunStatus::Completed,
            None,
            Some(ev(&payload(n + 1))),
        )
        .await
        .unwrap();
        for reader in readers {
            let end = tokio::time::timeout(3 * WOKEN, reader)
                .await
                .expect("a reader never reached the end")
                .expect("reader panicked");
            assert_eq!(end, n + 1);
        }
    }

    // --- Waiting -----------------------------------------------------------------------------

    /// `wait` returns at once when there is an event after the cursor or the run has ended.
    pub async fn wait_returns_at_once_when_there_is_news_or_the_run_ended(make: &Make) {
        let s = make(Limits::default()).await;
        let r = start(&*s, req("o", None)).await;
        s.append(&r.run_id, evs(&["a", "b"])).await.unwrap();
        assert_eq!(
            woken("wait with news", s.wait(&r.run_id, 1, LONG)).await,
            Ok((2, RunStatus::InProgress))
        );
        assert_eq!(
            woken("wait with news", s.wait(&r.run_id, 0, Duration::MAX)).await,
            Ok((2, RunStatus::InProgress))
        );
        s.finish(&r.run_id, RunStatus::Completed, None, None)
            .await
            .unwrap();
        assert_eq!(
            woken("wait on an ended run", s.wait(&r.run_id, 2, LONG)).await,
            Ok((2, RunStatus::Completed))
        );
        assert_eq!(
            woken("wait on an ended run", s.wait(&r.run_id, 2, Duration::MAX)).await,
            Ok((2, RunStatus::Completed))
        );
    }

    /// A waiter at the end of a live run sleeps until an append, or until the run ends.
    pub async fn wait_wakes_on_append_and_on_finish(make: &Make) {
        let s = make(Limits::default()).await;
        let r = start(&*s, req("o", None)).await;
        let waiter = spawn_wait(&s, &r.run_id, 0, LONG);
        still_waiting("wait on an empty run", &waiter).await;
        s.append(&r.run_id, evs(&["a"])).await.unwrap();
        assert_eq!(
            joined("wait woken by append", waiter).await,
            Ok((1, RunStatus::InProgress))
        );
        let waiter = spawn_wait(&s, &r.run_id, 1, LONG);
        still_waiting("wait at the end of a live run", &waiter).await;
        s.finish(&r.run_id, RunStatus::Stopped, None, None)
            .await
            .unwrap();
        assert_eq!(
            joined("wait woken by finish", waiter).await,
            Ok((1, RunStatus::Stopped))
        );
    }

    /// `Duration::MAX` means no deadline: the wait sleeps, then wakes on an append.
    pub async fn wait_without_a_deadline_still_wakes(make: &Make) {
        let s = make(Limits::default()).await;
        let r = start(&*s, req("o", None)).await;
        let waiter = spawn_wait(&s, &r.run_id, 0, Duration::MAX);
        still_waiting("wait with no deadline", &waiter).await;
        s.append(&r.run_id, evs(&["a", "b"])).await.unwrap();
        assert_eq!(
            joined("wait with no deadline", waiter).await,
            Ok((2, RunStatus::InProgress))
        );
        let waiter = spawn_wait(&s, &r.run_id, 2, Duration::MAX);
        still_waiting("wait with no deadline", &waiter).await;
        s.finish(&r.run_id, RunStatus::Completed, None, Some(ev("end")))
            .await
            .unwrap();
        assert_eq!(
            joined("wait with no deadline", waiter).await,
            Ok((3, RunStatus::Completed))
        );
        // `wait_thread` too.
        let r2 = start(&*s, req("o", Some(&r.thread_id))).await;
        let seen = s.thread("o", &r.thread_id).await.unwrap().latest_run();
        let waiter = {
            let (s, thread, seen) = (s.clone(), r.thread_id.clone(), seen.clone());
            tokio::spawn(async move { s.wait_thread("o", &thread, &seen, 3, Duration::MAX).await })
        };
        still_waiting("wait_thread with no deadline", &waiter).await;
        s.append(&r2.run_id, evs(&["c"])).await.unwrap();
        assert_eq!(
            joined("wait_thread with no deadline", waiter).await,
            Ok(true)
        );
    }

    /// With nothing happening, `wait` and `wait_thread` return when their timeout passes, `wait`
    /// with the state it saw.
    pub async fn waits_time_out_with_the_current_state(make: &Make) {
        let s = make(Limits::default()).await;
        let r = start(&*s, req("o", None)).await;
        s.append(&r.run_id, evs(&["a"])).await.unwrap();
        let short = Duration::from_millis(50);
        assert_eq!(
            woken("wait with a short timeout", s.wait(&r.run_id, 1, short)).await,
            Ok((1, RunStatus::InProgress))
        );
        let seen = s.thread("o", &r.thread_id).await.unwrap().latest_run();
        assert_eq!(
            woken(
                "wait_thread with a short timeout",
                s.wait_thread("o", &r.thread_id, &seen, 1, short)
            )
            .await,
            Ok(false)
        );
        // The timeouts changed nothing.
        let info = s.run(&r.run_id).await.unwrap();
        assert_eq!((info.last_seq, info.status), (1, RunStatus::InProgress));
    }

    /// A waiter that starts while an append happens (before, during or after its first look)
    /// is never left asleep: no lost wake-up, for `wait` and for `wait_thread`.
    pub async fn a_waiter_racing_an_append_is_never_lost(make: &Make) {
        let s = make(Limits::default()).await;
        let r = start(&*s, req("o", None)).await;
        let mut n = 0u64;
        // The waiter and the append start together, the append after a delay swept from 0 to
        // 200 µs, so the rounds cover every interleaving of the waiter's first look and the append.
        for i in 0..400u64 {
            let waiter = spawn_wait(&s, &r.run_id, n, LONG);
            spin(i);
            n = s.append(&r.run_id, evs(&["x"])).await.unwrap();
            let (last, status) = joined("wait racing an append", waiter).await.unwrap();
            assert!(last >= n && status == RunStatus::InProgress, "round {i}");
        }
        for i in 0..400u64 {
            let seen = Some((r.run_id.clone(), RunStatus::InProgress));
            let waiter = spawn_wait_thread(&s, "o", &r.thread_id, seen, n);
            spin(i);
            n = s.append(&r.run_id, evs(&["x"])).await.unwrap();
            let changed = joined("wait_thread racing an append", waiter)
                .await
                .unwrap_or_else(|e| panic!("round {i}: {e}"));
            assert!(changed, "round {i}: woken by the append");
        }
        // The same race with the run's end.
        let waiter = spawn_wait(&s, &r.run_id, n, LONG);
        let seen = Some((r.run_id.clone(), RunStatus::InProgress));
        let thread_waiter = spawn_wait_thread(&s, "o", &r.thread_id, seen, n);
        s.finish(&r.run_id, RunStatus::Completed, None, None)
            .await
            .unwrap();
        assert_eq!(
            joined("wait racing finish", waiter).await,
            Ok((n, RunStatus::Completed))
        );
        joined("wait_thread racing finish", thread_waiter)
            .await
            .map(|changed| assert!(changed, "wait_thread racing finish: a change"))
            .unwrap();
    }

    /// `wait_thread` returns at once when the thread has an event after the cursor, or its
    /// latest run is not what the caller saw (even a change made before the call).
    pub async fn wait_thread_returns_at_once_for_what_the_caller_has_not_seen(make: &Make) {
        let s = make(Limits::default()).await;
        let r1 = start(&*s, req("o", None)).await;
        let t = r1.thread_id.clone();
        s.append(&r1.run_id, evs(&["a", "b"])).await.unwrap();
        let live = Some((r1.run_id.clone(), RunStatus::InProgress));
        woken(
            "wait_thread with news",
            s.wait_thread("o", &t, &live, 1, LONG),
        )
        .await
        .map(|changed| assert!(changed, "wait_thread with news: a change"))
        .unwrap();
        // The caller saw no run: there is one.
        woken(
            "wait_thread with a stale view",
            s.wait_thread("o", &t, &None, 2, LONG),
        )
        .await
        .map(|changed| assert!(changed, "wait_thread with a stale view: a change"))
        .unwrap();
        // The caller saw the run live: it has ended since.
        s.finish(&r1.run_id, RunStatus::Completed, None, None)
            .await
            .unwrap();
        woken(
            "wait_thread after an unseen end",
            s.wait_thread("o", &t, &live, 2, LONG),
        )
        .await
        .map(|changed| assert!(changed, "wait_thread after an unseen end: a change"))
        .unwrap();
        // The caller saw run 1 ended: run 2 has started since.
        let ended = s.thread("o", &t).await.unwrap().latest_run();
        assert_eq!(ended, Some((r1.run_id.clone(), RunStatus::Completed)));
        start(&*s, req("o", Some(&t))).await;
        woken(
            "wait_thread after an unseen new run",
            s.wait_thread("o", &t, &ended, 2, LONG),
        )
        .await
        .map(|changed| assert!(changed, "wait_thread after an unseen new run: a change"))
        .unwrap();
    }

    /// A thread waiter at the thread's end sleeps until an event is appended.
    pub async fn wait_thread_wakes_on_append(make: &Make) {
        let s = make(Limits::default()).await;
        let r = start(&*s, req("o", None)).await;
        s.append(&r.run_id, evs(&["a"])).await.unwrap();
        let seen = s.thread("o", &r.thread_id).await.unwrap().latest_run();
        let waiter = spawn_wait_thread(&s, "o", &r.thread_id, seen, 1);
        still_waiting("wait_thread with nothing new", &waiter).await;
        s.append(&r.run_id, evs(&["b"])).await.unwrap();
        assert_eq!(
            joined("wait_thread woken by append", waiter).await,
            Ok(true)
        );
    }

    /// A thread waiter sleeps until the latest run ends, and (at the end of a finished thread)
    /// until a new run starts.
    pub async fn wait_thread_wakes_when_the_latest_run_ends_or_a_new_one_starts(make: &Make) {
        let s = make(Limits::default()).await;
        let r1 = start(&*s, req("o", None)).await;
        let t = r1.thread_id.clone();
        s.append(&r1.run_id, evs(&["a"])).await.unwrap();
        let seen = s.thread("o", &t).await.unwrap().latest_run();
        let waiter = spawn_wait_thread(&s, "o", &t, seen, 1);
        still_waiting("wait_thread on a live run", &waiter).await;
        s.finish(&r1.run_id, RunStatus::Stopped, None, None)
            .await
            .unwrap();
        joined("wait_thread woken by the end", waiter)
            .await
            .map(|changed| assert!(changed, "wait_thread woken by the end: a change"))
            .unwrap();

        let seen = s.thread("o", &t).await.unwrap().latest_run();
        assert_eq!(seen, Some((r1.run_id.clone(), RunStatus::Stopped)));
        let waiter = spawn_wait_thread(&s, "o", &t, seen, 1);
        still_waiting("wait_thread on a finished thread", &waiter).await;
        let r2 = start(&*s, req("o", Some(&t))).await;
        joined("wait_thread woken by a new run", waiter)
            .await
            .map(|changed| assert!(changed, "wait_thread woken by a new run: a change"))
            .unwrap();
        let th = s.thread("o", &t).await.unwrap();
        assert_eq!(th.latest_run(), Some((r2.run_id, RunStatus::InProgress)));
    }

    // --- Retention ---------------------------------------------------------------------------

    /// `sweep` evicts finished runs once their retention has passed, never before, and never a
    /// run in progress.
    pub async fn sweep_evicts_only_finished_runs_past_retention(make: &Make) {
        // Within retention: nothing goes.
        let s = make(Limits::default()).await;
        let done = start(&*s, req("o", None)).await;
        s.append(&done.run_id, evs(&["a"])).await.unwrap();
        s.finish(&done.run_id, RunStatus::Completed, None, None)
            .await
            .unwrap();
        let live = start(&*s, req("o", None)).await;
        assert_eq!(s.sweep().await, 0);
        assert!(s.run(&done.run_id).await.is_ok());
        assert_eq!(texts(&*s, &done.run_id).await, ["a"]);
        assert!(s.run(&live.run_id).await.is_ok());

        // Past retention: the finished run goes, the live one stays however old it is.
        let s = make(Limits {
            retention: Duration::from_millis(50),
            ..Limits::default()
        })
        .await;
        let done = start(&*s, req("o", None)).await;
        s.finish(&done.run_id, RunStatus::Completed, None, None)
            .await
            .unwrap();
        let live = start(&*s, req("o", None)).await;
        s.append(&live.run_id, evs(&["a"])).await.unwrap();
        let swept = sweep_until_evicted(&*s, &done.run_id).await;
        assert_eq!(swept, 1, "sweep reports what it evicted");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(s.sweep().await, 0);
        assert_eq!(texts(&*s, &live.run_id).await, ["a"]);
        assert_eq!(
            s.run(&live.run_id).await.unwrap().status,
            RunStatus::InProgress
        );
    }

    /// An evicted run is gone (`RunNotFound` everywhere, its key forgotten), while its thread's
    /// record remembers it: evicted ids, count, seq prefix and how it ended; a thread waiter
    /// that saw it is woken.
    pub async fn an_evicted_run_leaves_its_thread_record_behind(make: &Make) {
        let s = make(Limits {
            retention: Duration::from_millis(50),
            ..Limits::default()
        })
        .await;
        let r1 = start(&*s, keyed("o", "u", "m1", None)).await;
        let t = r1.thread_id.clone();
        s.append(&r1.run_id, evs(&["a", "b"])).await.unwrap();
        let error = "upstream\nwent away";
        s.finish(
            &r1.run_id,
            RunStatus::Error,
            Some(error.into()),
            Some(ev("e")),
        )
        .await
        .unwrap();
        let before = s.thread("o", &t).await.unwrap();
        let seen = before.latest_run();
        let waiter = spawn_wait_thread(&s, "o", &t, seen, 3);
        still_waiting("wait_thread at the end of a finished thread", &waiter).await;
        sweep_until_evicted(&*s, &r1.run_id).await;
        joined("wait_thread woken by the eviction", waiter)
            .await
            .map(|changed| assert!(changed, "wait_thread woken by the eviction: a change"))
            .unwrap();

        assert_eq!(
            s.read_after(&r1.run_id, 0, 10, usize::MAX).await,
            Err(StoreError::RunNotFound)
        );
        assert_eq!(
            woken("wait on an evicted run", s.wait(&r1.run_id, 0, LONG)).await,
            Err(StoreError::RunNotFound)
        );
        assert_eq!(
            s.append(&r1.run_id, evs(&["x"])).await,
            Err(StoreError::RunNotFound)
        );
        let th = s.thread("o", &t).await.unwrap();
        assert!(th.runs.is_empty());
        assert_eq!((th.org_id.as_str(), &th.agent_id), ("o", &agent()));
        assert_eq!(th.created_at, before.created_at);
        assert_eq!(th.evicted, std::slice::from_ref(&r1.run_id));
        assert_eq!(
            (th.evicted_runs, th.evicted_through, th.last_seq()),
            (1, 3, 3)
        );
        assert_eq!(th.latest_run(), None);
        let outcome = th.latest_evicted.expect("how the evicted run ended");
        assert_eq!(outcome.run_id, r1.run_id);
        assert_eq!(outcome.status, RunStatus::Error);
        assert_eq!(outcome.error, Some(clip_error(error)));
        // Its key is forgotten with it: a retry starts a new run.
        let retry = s.create_run(keyed("o", "u", "m1", None)).await.unwrap();
        assert!(!retry.existing);
        assert_ne!(retry.run.run_id, r1.run_id);
        // Another organisation still sees nothing.
        assert_eq!(s.thread("p", &t).await, Err(StoreError::ThreadNotFound));
    }

    /// A thread whose runs were evicted can be continued (seq goes on after the evicted
    /// prefix, the agent is still checked), and is not forgotten while it has a run.
    pub async fn a_thread_continues_after_its_runs_were_evicted_and_is_kept_while_in_use(
        make: &Make,
    ) {
        let s = make(Limits {
            retention: Duration::from_millis(50),
            thread_retention: Duration::from_millis(500),
            ..Limits::default()
        })
        .await;
        let r1 = start(&*s, req("o", None)).await;
        let t = r1.thread_id.clone();
        s.append(&r1.run_id, evs(&["a", "b"])).await.unwrap();
        s.finish(&r1.run_id, RunStatus::Completed, None, None)
            .await
            .unwrap();
        sweep_until_evicted(&*s, &r1.run_id).await;
        let other_agent = NewRun {
            agent_id: json!("someone-else"),
            ..req("o", Some(&t))
        };
        assert!(matches!(
            s.create_run(other_agent).await,
            Err(StoreError::AgentMismatch(_))
        ));
        assert_eq!(
            s.create_run(req("p", Some(&t))).await,
            Err(StoreError::ThreadNotFound)
        );
        let r2 = start(&*s, req("o", Some(&t))).await;
        assert_eq!((r2.thread_id.clone(), r2.first_seq), (t.clone(), 3));
        assert_eq!(s.append(&r2.run_id, evs(&["c"])).await, Ok(3));
        // Well past thread_retention: a thread with a run is kept.
        tokio::time::sleep(Duration::from_millis(1000)).await;
        s.sweep().await;
        let th = s.thread("o", &t).await.expect("a thread in use is kept");
        assert_eq!((th.evicted_runs, th.evicted_through), (1, 2));
        assert_eq!(th.evicted, [r1.run_id]);
        assert_eq!(th.runs.len(), 1);
        assert_eq!(th.last_seq(), 3);
    }

    /// Once its last run is evicted, a thread's record is forgotten after `thread_retention`,
    /// with its backend thread and its conversation mapping.
    pub async fn thread_records_are_forgotten_after_thread_retention(make: &Make) {
        let s = make(Limits {
            retention: Duration::from_millis(50),
            thread_retention: Duration::from_millis(100),
            ..Limits::default()
        })
        .await;
        let new = NewRun {
            conversation: Some("c-1".into()),
            ..req("o", None)
        };
        let r = start(&*s, new.clone()).await;
        let t = r.thread_id.clone();
        let backend = BackendThread {
            upstream: "http://backend".into(),
            id: "bt-1".into(),
        };
        s.set_backend_thread(&t, backend.clone()).await;
        s.append(&r.run_id, evs(&["a"])).await.unwrap();
        s.finish(&r.run_id, RunStatus::Completed, None, None)
            .await
            .unwrap();
        assert_eq!(s.conversation("o", "c-1").await, Ok(Some(t.clone())));
        sweep_until_forgotten(&*s, "o", &t).await;
        assert_eq!(s.backend_thread(&t).await, None);
        assert_eq!(s.conversation("o", "c-1").await, Ok(None));
        assert_eq!(
            s.create_run(req("o", Some(&t))).await,
            Err(StoreError::ThreadNotFound)
        );
        let again = start(&*s, new).await;
        assert_ne!(again.thread_id, t, "the conversation maps to a new thread");
        assert_eq!(again.first_seq, 1);
    }

    /// A thread's backend thread is recorded per thread and kept while its record is, also
    /// after its runs were evicted.
    pub async fn backend_threads_are_recorded_per_thread(make: &Make) {
        let s = make(Limits {
            retention: Duration::from_millis(50),
            ..Limits::default()
        })
        .await;
        let a = start(&*s, req("o", None)).await;
        let b = start(&*s, req("o", None)).await;
        assert_eq!(s.backend_thread(&a.thread_id).await, None);
        let first = BackendThread {
            upstream: "http://one".into(),
            id: "x-1".into(),
        };
        let second = BackendThread {
            upstream: "http://two".into(),
            id: "x-2".into(),
        };
        s.set_backend_thread(&a.thread_id, first.clone()).await;
        assert_eq!(s.backend_thread(&a.thread_id).await, Some(first));
        assert_eq!(s.backend_thread(&b.thread_id).await, None);
        s.set_backend_thread(&a.thread_id, second.clone()).await;
        assert_eq!(s.backend_thread(&a.thread_id).await, Some(second.clone()));
        // An unknown thread records nothing.
        let nobody = ThreadId::generate();
        s.set_backend_thread(&nobody, second.clone()).await;
        assert_eq!(s.backend_thread(&nobody).await, None);
        assert_eq!(
            s.thread("o", &nobody).await,
            Err(StoreError::ThreadNotFound)
        );
        s.finish(&a.run_id, RunStatus::Completed, None, None)
            .await
            .unwrap();
        sweep_until_evicted(&*s, &a.run_id).await;
        assert_eq!(s.backend_thread(&a.thread_id).await, Some(second));
    }

    // --- Memory and quotas -------------------------------------------------------------------

    /// `bytes_held` counts runs, threads and events: it grows with a run and its appends (by at
    /// least the payload), shrinks by at least the payload on eviction, and returns to where it
    /// started once the thread's record is forgotten.
    pub async fn bytes_held_grows_with_appends_and_shrinks_on_eviction(make: &Make) {
        let s = make(Limits {
            retention: Duration::from_millis(50),
            thread_retention: Duration::from_millis(1000),
            ..Limits::default()
        })
        .await;
        let empty = s.bytes_held();
        let r = start(&*s, req("o", None)).await;
        let with_run = s.bytes_held();
        assert!(with_run > empty, "a run and its thread are held");
        let payload = "p".repeat(10_000);
        s.append(&r.run_id, evs(&[&payload])).await.unwrap();
        let with_event = s.bytes_held();
        assert!(with_event >= with_run + 10_000, "the payload is held");
        s.append(&r.run_id, evs(&[&payload, &payload]))
            .await
            .unwrap();
        let with_events = s.bytes_held();
        assert!(with_events >= with_event + 20_000);
        s.finish(&r.run_id, RunStatus::Completed, None, None)
            .await
            .unwrap();
        let finished = s.bytes_held();
        assert!(finished >= with_events, "finishing frees nothing");
        sweep_until_evicted(&*s, &r.run_id).await;
        let evicted = s.bytes_held();
        assert!(evicted + 30_000 <= finished, "eviction frees the payload");
        assert!(evicted > empty, "the thread's record is still held");
        sweep_until_forgotten(&*s, "o", &r.thread_id).await;
        let forgotten = s.bytes_held();
        assert!(forgotten < evicted);
        assert!(forgotten <= empty, "nothing is left behind");
    }

    /// What is held stays within `max_total_bytes`, and finished runs are evicted to make room
    /// for new work, which keeps being accepted.
    pub async fn the_budget_bounds_what_is_held_and_finished_runs_make_room(make: &Make) {
        let max = 64_000;
        let s = make(Limits {
            max_total_bytes: max,
            ..Limits::default()
        })
        .await;
        let payload = "p".repeat(4000);
        let mut runs = Vec::new();
        for i in 0..30 {
            let r = s
                .create_run(req("o", None))
                .await
                .unwrap_or_else(|e| panic!("run {i}: {e} (held {})", s.bytes_held()))
                .run;
            assert!(s.bytes_held() <= max, "run {i}: held {}", s.bytes_held());
            s.append(&r.run_id, evs(&[&payload]))
                .await
                .unwrap_or_else(|e| panic!("append {i}: {e} (held {})", s.bytes_held()));
            assert!(s.bytes_held() <= max, "append {i}: held {}", s.bytes_held());
            s.finish(&r.run_id, RunStatus::Completed, None, None)
                .await
                .unwrap();
            runs.push(r);
        }
        let mut evicted = 0;
        for r in &runs[..runs.len() - 1] {
            match s.run(&r.run_id).await {
                Err(StoreError::RunNotFound) => evicted += 1,
                Ok(_) => {}
                Err(e) => panic!("{e}"),
            }
        }
        assert!(evicted > 0, "30 x 4000 bytes cannot all fit in {max}");
        assert!(s.run(&runs.last().unwrap().run_id).await.is_ok());
    }

    /// A live run filling the budget: its append is refused whole (`Full` with `retry_after`),
    /// new runs are refused; once it ends, it can be evicted to admit new work.
    pub async fn a_full_store_refuses_new_runs_and_whole_batches(make: &Make) {
        let limits = Limits {
            max_total_bytes: 64_000,
            ..Limits::default()
        };
        let retry_after = limits.full_retry_after;
        let s = make(limits).await;
        let live = start(&*s, req("o", None)).await;
        let chunk = "f".repeat(4000);
        let mut full = None;
        for _ in 0..100 {
            let before = s.run(&live.run_id).await.unwrap().last_seq;
            match s.append(&live.run_id, evs(&[&chunk, "small"])).await {
                Ok(_) => assert!(s.bytes_held() <= 64_000, "held {}", s.bytes_held()),
                Err(e) => {
                    let after = s.run(&live.run_id).await.unwrap().last_seq;
                    assert_eq!(after, before, "a refused batch is refused whole");
                    full = Some(e);
                    break;
                }
            }
        }
        assert_eq!(full, Some(StoreError::Full { retry_after }));
        assert_eq!(
            s.create_run(req("o", None)).await,
            Err(StoreError::Full { retry_after })
        );
        assert_eq!(
            s.create_run(req("p", None)).await,
            Err(StoreError::Full { retry_after })
        );
        assert!(s.bytes_held() <= 64_000);
        // The live run can still end (with its closing event), then make room.
        assert!(s
            .finish(&live.run_id, RunStatus::Completed, None, Some(ev("end")))
            .await
            .unwrap());
        let next = start(&*s, req("o", None)).await;
        assert!(s.bytes_held() <= 64_000);
        assert_eq!(s.append(&next.run_id, evs(&[&chunk])).await, Ok(1));
    }

    /// `max_total_bytes` is the most held in all: appending many small events to a live run
    /// ends in `Full`, never in holding more than the budget.
    pub async fn what_is_held_never_exceeds_max_total_bytes(make: &Make) {
        let max = 200_000;
        let s = make(Limits {
            max_total_bytes: max,
            max_events_per_run: 1_000_000,
            ..Limits::default()
        })
        .await;
        let live = start(&*s, req("o", None)).await;
        let mut refused = None;
        for i in 0..200_000u64 {
            match s.append(&live.run_id, evs(&["x"])).await {
                Ok(_) => {}
                Err(e) => {
                    refused = Some((i, e));
                    break;
                }
            }
            let held = s.bytes_held();
            assert!(held <= max, "after {} events: held {held} > {max}", i + 1);
        }
        let (n, e) = refused.expect("200,000 events cannot fit in 200,000 bytes");
        assert!(
            matches!(e, StoreError::Full { .. }),
            "after {n} events: {e}"
        );
        assert!(s.bytes_held() <= max);
    }

    /// An organisation at its running-runs quota is refused (`Quota` with its `retry_after`);
    /// others are not, a retry of a live key still re-attaches, and an end frees a place.
    pub async fn a_running_runs_quota_refuses_only_its_organisation(make: &Make) {
        let q = quotas(2, u64::MAX);
        let retry_after = q.retry_after;
        let s = make(Limits {
            quotas: q,
            ..Limits::default()
        })
        .await;
        let a1 = start(&*s, keyed("a", "u", "m1", None)).await;
        let a2 = start(&*s, req("a", None)).await;
        assert_eq!(
            s.create_run(req("a", None)).await,
            Err(StoreError::Quota {
                kind: QuotaKind::RunningRuns,
                retry_after
            })
        );
        let again = s.create_run(keyed("a", "u", "m1", None)).await.unwrap();
        assert!(again.existing && again.run.run_id == a1.run_id);
        start(&*s, req("b", None)).await;
        start(&*s, req("b", None)).await;
        s.finish(&a1.run_id, RunStatus::Completed, None, None)
            .await
            .unwrap();
        let a3 = start(&*s, req("a", Some(&a1.thread_id))).await;
        assert_eq!(
            s.create_run(req("a", None)).await,
            Err(StoreError::Quota {
                kind: QuotaKind::RunningRuns,
                retry_after
            })
        );
        assert!(s.run(&a2.run_id).await.is_ok() && s.run(&a3.run_id).await.is_ok());
    }

    /// Concurrent creates of one organisation never pass its running-runs quota together.
    pub async fn concurrent_creates_never_pass_the_running_runs_quota(make: &Make) {
        let q = quotas(3, u64::MAX);
        let retry_after = q.retry_after;
        for round in 0..5 {
            let s = make(Limits {
                quotas: q.clone(),
                ..Limits::default()
            })
            .await;
            let mut started = 0;
            for outcome in concurrently(&s, 20, req("a", None)).await {
                match outcome {
                    Ok(_) => started += 1,
                    Err(e) => assert_eq!(
                        e,
                        StoreError::Quota {
                            kind: QuotaKind::RunningRuns,
                            retry_after
                        },
                        "round {round}"
                    ),
                }
            }
            assert_eq!(started, 3, "round {round}");
        }
    }

    /// An organisation holding its bytes quota in live runs is refused (`Quota`); its own
    /// finished runs make room first, and other organisations are not refused.
    pub async fn a_bytes_quota_refuses_only_its_organisation(make: &Make) {
        let q = quotas(u64::MAX, 20_000);
        let retry_after = q.retry_after;
        let s = make(Limits {
            quotas: q,
            ..Limits::default()
        })
        .await;
        let b = start(&*s, req("b", None)).await;
        s.append(&b.run_id, evs(&["b"])).await.unwrap();
        s.finish(&b.run_id, RunStatus::Completed, None, None)
            .await
            .unwrap();
        // Finished runs of its own make room for the next.
        let chunk = "x".repeat(4000);
        let mut runs = Vec::new();
        for i in 0..8 {
            let r = s
                .create_run(req("a", None))
                .await
                .unwrap_or_else(|e| panic!("run {i}: {e}"))
                .run;
            s.append(&r.run_id, evs(&[&chunk])).await.unwrap();
            s.finish(&r.run_id, RunStatus::Completed, None, None)
                .await
                .unwrap();
            runs.push(r);
        }
        assert_eq!(
            s.run(&runs[0].run_id).await,
            Err(StoreError::RunNotFound),
            "8 x 4000 bytes do not fit a 20000-byte quota"
        );
        // Live runs holding the quota: refused.
        let live = start(&*s, req("a", None)).await;
        let big = "y".repeat(10_000);
        s.append(&live.run_id, evs(&[&big, &big])).await.unwrap();
        assert_eq!(
            s.create_run(req("a", None)).await,
            Err(StoreError::Quota {
                kind: QuotaKind::Bytes,
                retry_after
            })
        );
        assert!(
            s.run(&b.run_id).await.is_ok(),
            "b's run is not a's to evict"
        );
        start(&*s, req("b", None)).await;
    }
}
