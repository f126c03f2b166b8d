//! Throughput of the UI-message renderers over a typical text run: 1000 events (a root
//! `start`, 998 text deltas, the root `end`) rendered to SSE bytes, and folded into a
//! `UIMessage` (plus payload parsing alone, for scale). Reported as events per second.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use serde_json::json;

use sluice::event::Event;
use sluice::render::fold::fold;
use sluice::render::ui::UiRenderer;

const EVENTS: usize = 1000;

fn text_run() -> Vec<Event> {
    let mut events = Vec::with_capacity(EVENTS);
    let mut push = |v: serde_json::Value| {
        let seq = events.len() as u64 + 1;
        events.push(Event {
            seq,
            data: v.to_string().into(),
        });
    };
    push(
        json!({"type":"start","call_id":"root","root_call_id":"root",
                "content":{"message":"Tell me a story"},"timestamp":1_700_000_000,"seq":1}),
    );
    for i in 0..EVENTS - 2 {
        push(
            json!({"type":"delta","call_id":"root","parent_call_id":null,"root_call_id":"root",
                    "content":format!("word {i}, \"quoted\"\n"),"timestamp":1_700_000_001,
                    "seq":i + 2,"metadata":{"display_name":"Assistant","content_type":"text"}}),
        );
    }
    push(json!({"type":"end","call_id":"root","root_call_id":"root",
                "content":{"response":"(the whole story)"},"seq":EVENTS}));
    events
}

fn bench(c: &mut Criterion) {
    let events = text_run();
    let mut g = c.benchmark_group("render");
    g.throughput(Throughput::Elements(EVENTS as u64));
    g.bench_function("sse_1000_events", |b| {
        let mut out = Vec::with_capacity(256 * 1024);
        b.iter(|| {
            out.clear();
            let mut r = UiRenderer::new("msg-1".into());
            for ev in &events {
                r.render_sse(ev, &mut out);
            }
            black_box(out.len())
        })
    });
    g.bench_function("fold_1000_events", |b| {
        b.iter(|| black_box(fold("msg-1", &events)))
    });
    g.bench_function("parse_only_1000_events", |b| {
        b.iter(|| {
            events
                .iter()
                .filter(|ev| sluice::agentflow::parse(&ev.data).is_ok())
                .count()
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
