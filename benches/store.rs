//! Memory store hot paths: appending events to a run, and reading them back after a cursor.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use serde_json::json;
use sluice::event::NewEvent;
use sluice::store::memory::{MemoryLimits, MemoryStore};
use sluice::store::{NewRun, RunInfo, Store};

fn store() -> MemoryStore {
    MemoryStore::new(MemoryLimits {
        max_events_per_run: 10_000_000,
        max_bytes_per_run: 1 << 34,
        max_total_bytes: 1 << 36,
        retention: Duration::from_secs(3600),
        thread_retention: Duration::from_secs(3600),
        retry_after: Duration::from_secs(5),
        quotas: sluice::store::budget::Quotas::unlimited(),
    })
}

fn payload(i: usize) -> NewEvent {
    NewEvent::new(format!(
        r#"{{"type":"delta","call_id":"c1","parent_call_id":null,"root_call_id":"c1","content":"word{i} ","seq":{i}}}"#
    ))
}

async fn run(s: &MemoryStore) -> RunInfo {
    s.create_run(NewRun {
        thread_id: None,
        org_id: "o".into(),
        user_id: "u".into(),
        agent_id: json!(1),
        user_message: json!({"id":"m","role":"user","parts":[]}),
        idempotency_key: None,
        conversation: None,
    })
    .await
    .unwrap()
    .run
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("store");
    g.throughput(Throughput::Elements(1000));
    g.bench_function("append_1000_single", |b| {
        b.iter_batched(
            || {
                let s = store();
                let r = rt.block_on(run(&s));
                let evs: Vec<NewEvent> = (0..1000).map(payload).collect();
                (s, r, evs)
            },
            |(s, r, evs)| {
                rt.block_on(async {
                    for e in evs {
                        s.append(&r.run_id, vec![e]).await.unwrap();
                    }
                })
            },
            BatchSize::SmallInput,
        )
    });
    let s = store();
    let r = rt.block_on(run(&s));
    rt.block_on(s.append(&r.run_id, (0..10_000).map(payload).collect()))
        .unwrap();
    g.bench_function("read_after_1000_of_10000", |b| {
        b.iter(|| {
            rt.block_on(s.read_after(&r.run_id, 5000, 1000, usize::MAX))
                .unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
