//! Throughput of the UI-message renderers over a typical text run: 1000 events (a root
//! `start`, 998 text deltas, the root `end`) rendered to SSE bytes, and folded into a
//! `UIMessage` (plus payload parsing alone, for scale, and the typed head parse that ingestion
//! uses to find a run's end). Reported as events per second.
//!
//! Render once, fold once: the same run kept as shared frames (`frames_*`: rendering them once,
//! then what a reader costs, a whole replay and a resume near the end, which is a slice) and as
//! a kept fold (`kept_fold_*`: the snapshot of a finished run is its kept JSON; a growing run's
//! poll writes the message without re-folding).

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use serde_json::json;

use sluice::event::Event;
use sluice::render::fold::{fold, Fold};
use sluice::render::frames::UiFrames;
use sluice::render::ui::Cursor;
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
    g.bench_function("head_only_1000_events", |b| {
        b.iter(|| {
            events
                .iter()
                .filter(|ev| sluice::agentflow::terminal_of(&ev.data).is_ok())
                .count()
        })
    });
    g.bench_function("parse_only_1000_events", |b| {
        b.iter(|| {
            events
                .iter()
                .filter(|ev| sluice::agentflow::parse(&ev.data).is_ok())
                .count()
        })
    });
    g.bench_function("frames_render_1000_events", |b| {
        b.iter(|| {
            let mut f = UiFrames::new("msg-1".into(), 1);
            f.extend(&events);
            black_box(f.last_seq())
        })
    });
    let mut frames = UiFrames::new("msg-1".into(), 1);
    for batch in events.chunks(7) {
        frames.extend(batch);
    }
    g.bench_function("frames_replay_1000_events", |b| {
        let mut out = Vec::new();
        b.iter(|| {
            let mut at = Cursor::after(0);
            while let Some(through) = frames.read(at, 64 * 1024, &mut out) {
                at = Cursor::after(through);
            }
            black_box(out.drain(..).count())
        })
    });
    g.finish();

    let mut g = c.benchmark_group("render_once");
    g.bench_function("frames_resume_near_the_end", |b| {
        let mut out = Vec::new();
        b.iter(|| {
            let through = frames.read(Cursor::after(EVENTS as u64 - 3), 64 * 1024, &mut out);
            out.clear();
            black_box(through)
        })
    });
    let mut kept = Fold::new("msg-1");
    for ev in &events {
        kept.push(ev);
    }
    g.bench_function("kept_fold_write_json", |b| {
        let mut out = Vec::new();
        b.iter(|| {
            out.clear();
            kept.write_json(&mut out);
            black_box(out.len())
        })
    });
    g.bench_function("fold_then_serialise_value", |b| {
        b.iter(|| black_box(serde_json::to_vec(&kept.message()).map(|v| v.len())))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
