//! `POST /api/chat` bodies: the AI SDK sends the whole chat history with every turn. Sluice's
//! parser keeps only the last message, dropping each earlier one as soon as it is parsed; this
//! compares it with parsing the whole body into a `serde_json::Value`, in time (criterion) and
//! in peak heap (printed once, measured by a counting allocator).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use serde_json::{json, Value};
use sluice::api::chat::parse_chat;

/// The system allocator, counting live bytes and their peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(now, Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// A chat body of `turns` user/assistant pairs (text and a tool call each), then the new turn.
fn body(turns: usize) -> Vec<u8> {
    let mut messages = Vec::new();
    for i in 0..turns {
        messages.push(json!({"id": format!("u{i}"), "role": "user",
            "parts": [{"type": "text", "text": "What is the weather like in Lisbon this week?"}]}));
        messages.push(json!({"id": format!("a{i}"), "role": "assistant", "parts": [
            {"type": "step-start"},
            {"type": "tool-weather", "toolCallId": format!("c{i}"), "state": "output-available",
             "input": {"city": "Lisbon", "days": 7},
             "output": {"days": (0..7).map(|d| json!({"day": d, "high": 21, "low": 14, "sky": "sunny"})).collect::<Vec<_>>()}},
            {"type": "text", "text": "It will be sunny all week, with highs around 21 °C and lows near 14 °C.", "state": "done"},
        ]}));
    }
    messages.push(
        json!({"id": "new", "role": "user", "parts": [{"type": "text", "text": "And next week?"}]}),
    );
    serde_json::to_vec(
        &json!({"id": "chat-1", "agentId": 1, "trigger": "submit-message", "messages": messages}),
    )
    .unwrap()
}

/// Peak heap bytes above what was live before `f` ran.
fn peak_of<T>(f: impl FnOnce() -> T) -> usize {
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    black_box(f());
    PEAK.load(Ordering::Relaxed) - base
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("chat_body");
    for turns in [10, 1000] {
        let body = body(turns);
        let whole = peak_of(|| serde_json::from_slice::<Value>(&body).unwrap());
        let last = peak_of(|| parse_chat(&body).unwrap());
        println!(
            "chat body of {turns} turns ({} bytes): peak heap {whole} bytes parsed whole, {last} bytes keeping the last message",
            body.len()
        );
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_function(format!("{turns}_turns/whole_value"), |b| {
            b.iter(|| serde_json::from_slice::<Value>(black_box(&body)).unwrap())
        });
        g.bench_function(format!("{turns}_turns/parse_chat"), |b| {
            b.iter(|| parse_chat(black_box(&body)).unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
