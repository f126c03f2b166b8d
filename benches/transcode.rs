//! Events per second transcoded, per core, in each direction the gateway translates:
//!
//! - `ui_message_ingest`: a 1000-chunk UI-message stream (what a `ui-message` backend sends:
//!   text deltas with a tool call in the middle) parsed from its SSE `data` and rewritten into
//!   log events by the adapter's `ChunkMapper`;
//! - `ui_message_round_trip`: the same, then rendered back to UI-message SSE for a client;
//! - `agentflow_to_ui`: a 1000-event AgentFlow run rendered to UI-message SSE (the `render`
//!   bench's figure, here beside the others for scale).
//!
//! Single-threaded, so the rates are per core.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use serde_json::{json, Value};

use sluice::event::{Event, NewEvent};
use sluice::ingest::ui_message::ChunkMapper;
use sluice::render::ui::UiRenderer;

const CHUNKS: usize = 1000;

/// The `data` lines of a typical UI-message answer.
fn ui_stream() -> Vec<String> {
    let mut chunks: Vec<Value> = vec![
        json!({"type":"start","messageId":"msg_1"}),
        json!({"type":"start-step"}),
        json!({"type":"text-start","id":"t1"}),
    ];
    let half = (CHUNKS - 12) / 2;
    for i in 0..half {
        chunks
            .push(json!({"type":"text-delta","id":"t1","delta":format!("word {i}, \"quoted\" ")}));
    }
    chunks.extend([
        json!({"type":"text-end","id":"t1"}),
        json!({"type":"tool-input-start","toolCallId":"c1","toolName":"search"}),
        json!({"type":"tool-input-delta","toolCallId":"c1","inputTextDelta":"{\"q\":\"paris\"}"}),
        json!({"type":"tool-input-available","toolCallId":"c1","toolName":"search","input":{"q":"paris"}}),
        json!({"type":"tool-output-available","toolCallId":"c1","output":{"forecast":"sunny"}}),
        json!({"type":"text-start","id":"t2"}),
    ]);
    while chunks.len() < CHUNKS - 3 {
        let i = chunks.len();
        chunks.push(json!({"type":"text-delta","id":"t2","delta":format!("more {i} ")}));
    }
    chunks.extend([
        json!({"type":"text-end","id":"t2"}),
        json!({"type":"finish-step"}),
        json!({"type":"finish"}),
    ]);
    chunks.iter().map(Value::to_string).collect()
}

fn ingest(lines: &[String]) -> Vec<NewEvent> {
    let mut mapper = ChunkMapper::new("run_1");
    let mut out = Vec::with_capacity(lines.len());
    for line in lines {
        let chunk: Value = serde_json::from_str(line).expect("JSON");
        if mapper.map(&chunk, &mut out).expect("valid").is_some() {
            break;
        }
    }
    out
}

fn agentflow_run() -> Vec<Event> {
    let mut events = vec![json!({"type":"start","call_id":"root"})];
    for i in 0..CHUNKS - 2 {
        events.push(json!({"type":"delta","call_id":"root","content":format!("word {i} ")}));
    }
    events.push(json!({"type":"end","call_id":"root","content":{}}));
    events
        .into_iter()
        .enumerate()
        .map(|(i, v)| Event {
            seq: i as u64 + 1,
            data: v.to_string().into(),
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let lines = ui_stream();
    let mut g = c.benchmark_group("transcode");
    g.throughput(Throughput::Elements(CHUNKS as u64));
    g.bench_function("ui_message_ingest", |b| {
        b.iter(|| black_box(ingest(&lines).len()))
    });
    g.bench_function("ui_message_round_trip", |b| {
        let mut out = Vec::with_capacity(256 * 1024);
        b.iter(|| {
            out.clear();
            let mut r = UiRenderer::new("msg_1".into());
            for (i, e) in ingest(&lines).into_iter().enumerate() {
                r.render_sse(&e.at(i as u64 + 1), &mut out);
            }
            black_box(out.len())
        })
    });
    let run = agentflow_run();
    g.bench_function("agentflow_to_ui", |b| {
        let mut out = Vec::with_capacity(256 * 1024);
        b.iter(|| {
            out.clear();
            let mut r = UiRenderer::new("msg_1".into());
            for ev in &run {
                r.render_sse(ev, &mut out);
            }
            black_box(out.len())
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
