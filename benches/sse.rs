//! Criterion benchmarks for the SSE codec (`sluice::sse`): decoding a realistic
//! AgentFlow-like stream of 1000 events fed whole and in 64-byte pieces, and encoding
//! 1000 events. Throughput is reported in bytes of wire format.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use sluice::sse::{encode_event, Decoder};

const EVENTS: usize = 1000;

/// The JSON payload of event `seq`, shaped like an AgentFlow delta.
fn payload(seq: usize) -> String {
    format!(r#"{{"type":"delta","call_id":"c1","content":"hello ","seq":{seq}}}"#)
}

/// A 1000-event stream, as an upstream agent would send it.
fn stream() -> Vec<u8> {
    let mut wire = Vec::new();
    wire.extend_from_slice(b": connected\n\n");
    for seq in 0..EVENTS {
        wire.extend_from_slice(format!("id: {seq}\ndata: {}\n\n", payload(seq)).as_bytes());
    }
    wire
}

fn decode(c: &mut Criterion) {
    let wire = stream();
    let mut group = c.benchmark_group("sse_decode");
    group.throughput(Throughput::Bytes(wire.len() as u64));
    let mut out = Vec::with_capacity(EVENTS);
    group.bench_function("whole", |b| {
        b.iter(|| {
            let mut dec = Decoder::new(1 << 20);
            out.clear();
            dec.feed(black_box(&wire), &mut out).unwrap();
            dec.finish();
            assert_eq!(out.len(), EVENTS);
        })
    });
    group.bench_function("chunks_64", |b| {
        b.iter(|| {
            let mut dec = Decoder::new(1 << 20);
            out.clear();
            for piece in black_box(&wire).chunks(64) {
                dec.feed(piece, &mut out).unwrap();
            }
            dec.finish();
            assert_eq!(out.len(), EVENTS);
        })
    });
    group.finish();
}

fn encode(c: &mut Criterion) {
    let events: Vec<(String, String)> = (0..EVENTS)
        .map(|seq| (seq.to_string(), payload(seq)))
        .collect();
    let mut wire = Vec::new();
    for (id, data) in &events {
        encode_event(&mut wire, Some(id), None, data);
    }
    let mut group = c.benchmark_group("sse_encode");
    group.throughput(Throughput::Bytes(wire.len() as u64));
    group.bench_function("events_1000", |b| {
        b.iter(|| {
            wire.clear();
            for (id, data) in black_box(&events) {
                encode_event(&mut wire, Some(id), None, data);
            }
            black_box(&wire);
        })
    });
    group.finish();
}

criterion_group!(benches, decode, encode);
criterion_main!(benches);
