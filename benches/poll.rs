//! The poll adapter's costs. First a deterministic simulation (pure, on a simulated clock) of
//! its back-off against two backends, printing how many backend requests one run takes with the
//! default settings and how late changes are seen: a typical 20-second answer (4 s of thinking
//! without change, then 16 s of text changing every 100 ms) and a slow-updating backend (a
//! change every 2 s for 20 s). Then a criterion timing of `SnapshotDiff::diff` over a snapshot
//! growing to 20 parts, and over an unchanged 20-part snapshot (the cost of a quiet poll).

use std::time::Duration;

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use serde_json::{json, Value};

use sluice::ingest::events::Events;
use sluice::ingest::poll::{Backoff, PollSettings, SnapshotDiff};

/// A backend whose snapshot first changes at `first`, then every `every`, and completes at `end`.
struct Sim {
    name: &'static str,
    first: Duration,
    every: Duration,
    end: Duration,
}

impl Sim {
    /// When change `k` (0-based) happens.
    fn change_at(&self, k: u64) -> Duration {
        self.first + self.every * k as u32
    }

    /// How many changes have happened by `t`.
    fn changes_by(&self, t: Duration) -> u64 {
        if t < self.first {
            return 0;
        }
        let last = (t.min(self.end) - self.first).as_nanos() / self.every.as_nanos();
        last as u64 + 1
    }
}

/// Requests (invoke + polls), mean and worst delay before a change is seen, and how long after
/// the end the run is seen complete.
struct Outcome {
    requests: u64,
    mean_lag: Duration,
    worst_lag: Duration,
    end_lag: Duration,
}

/// Poll `sim` the way the adapter does: wait, poll, `after_change` or `after_quiet`.
fn simulate(sim: &Sim, mut backoff: Backoff, fixed: bool) -> Outcome {
    let mut t = Duration::ZERO;
    let mut requests = 1; // the invoke
    let mut seen = 0u64;
    let (mut lag_sum, mut worst_lag) = (Duration::ZERO, Duration::ZERO);
    let mut wait = backoff.current();
    loop {
        t += wait;
        requests += 1;
        let now = sim.changes_by(t);
        for k in seen..now {
            let lag = t - sim.change_at(k);
            lag_sum += lag;
            worst_lag = worst_lag.max(lag);
        }
        let changed = now != seen;
        seen = now;
        if t >= sim.end {
            return Outcome {
                requests,
                mean_lag: lag_sum / seen.max(1) as u32,
                worst_lag,
                end_lag: t - sim.end,
            };
        }
        if !fixed {
            wait = if changed {
                backoff.after_change()
            } else {
                backoff.after_quiet()
            };
        }
    }
}

fn print_simulation() {
    let s = PollSettings::default();
    let sims = [
        Sim {
            name: "typical answer (4 s thinking, then text every 100 ms until 20 s)",
            first: Duration::from_secs(4),
            every: Duration::from_millis(100),
            end: Duration::from_secs(20),
        },
        Sim {
            name: "slow backend (a change every 2 s until 20 s)",
            first: Duration::from_secs(2),
            every: Duration::from_secs(2),
            end: Duration::from_secs(20),
        },
    ];
    println!(
        "poll back-off, default settings (interval_min {:?}, interval_max {:?}, backoff {}):",
        s.interval_min, s.interval_max, s.backoff
    );
    for sim in &sims {
        let o = simulate(sim, Backoff::of(&s), false);
        let fixed = simulate(sim, Backoff::of(&s), true);
        println!(
            "  {}: {} backend requests per run (1 invoke + {} polls; a fixed {:?} interval: {}); \
             changes seen after {} ms on average, {} ms at worst; completion seen {} ms late",
            sim.name,
            o.requests,
            o.requests - 1,
            s.interval_min,
            fixed.requests,
            o.mean_lag.as_millis(),
            o.worst_lag.as_millis(),
            o.end_lag.as_millis()
        );
    }
}

/// The assistant message after `step` of 200 steps: a new part every 10 steps (up to 20, of
/// every kind), and each step adds a few words to the last text or reasoning part.
fn snapshots() -> Vec<Value> {
    let mut parts: Vec<Value> = Vec::new();
    let mut out = Vec::with_capacity(200);
    for step in 0..200usize {
        if step % 10 == 0 {
            let k = step / 10;
            parts.push(match k % 10 {
                0 => json!({"type": "step-start"}),
                1 => json!({"type": "reasoning", "text": ""}),
                2 => json!({"type": "tool-search", "toolCallId": format!("c{k}"),
                            "state": "output-available", "input": {"q": "weather"},
                            "output": {"result": "sunny", "n": k}}),
                3 => json!({"type": "source-url", "sourceId": format!("s{k}"),
                            "url": "https://example.com/a", "title": "Example"}),
                4 => json!({"type": "data-progress", "id": "p1", "data": {"pct": k}}),
                5 => json!({"type": "file", "mediaType": "image/png", "url": "https://example.com/f.png"}),
                _ => json!({"type": "text", "text": ""}),
            });
        }
        let last = parts
            .iter_mut()
            .rev()
            .find(|p| matches!(p["type"].as_str(), Some("text" | "reasoning")));
        if let Some(p) = last {
            let grown = format!(
                "{}word {step}, \"quoted\" ",
                p["text"].as_str().unwrap_or("")
            );
            p["text"] = json!(grown);
        }
        out.push(json!({"id": "a1", "role": "assistant", "parts": parts.clone()}));
    }
    out
}

fn bench(c: &mut Criterion) {
    print_simulation();
    let snaps = snapshots();
    let mut g = c.benchmark_group("poll");
    g.throughput(Throughput::Elements(snaps.len() as u64));
    g.bench_function("diff_growing_to_20_parts_200_snapshots", |b| {
        b.iter(|| {
            let mut d = SnapshotDiff::new(Events::new("run_1"));
            let mut n = 0;
            for s in &snaps {
                n += d.diff(s).len();
            }
            black_box(n)
        })
    });
    let last = snaps.last().expect("snapshots");
    let mut warm = SnapshotDiff::new(Events::new("run_1"));
    for s in &snaps {
        warm.diff(s);
    }
    g.throughput(Throughput::Elements(1));
    g.bench_function("diff_unchanged_20_parts", |b| {
        b.iter(|| black_box(warm.diff(last).len()))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
