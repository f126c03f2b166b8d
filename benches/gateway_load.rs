//! Whole-gateway load, with the real binaries on loopback:
//!
//! 1. `readers` concurrent clients each start a run of `events` events and read it to the end,
//!    through Sluice (UI-message stream) and directly against the mock agent; events per second
//!    delivered in each case.
//! 2. Replay: a finished 10,000-event run streamed from the start to a reconnecting client.
//!
//! `cargo bench --bench gateway_load` runs the full size (env `READERS`, default 1000, and
//! `EVENTS`, default 200); under `cargo test` it runs a small smoke size. Use a release build
//! for figures: `cargo bench` builds one.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::future::join_all;
use serde_json::json;

/// Read a streamed response to its end; return how many SSE events it held.
async fn count_events(resp: reqwest::Response) -> usize {
    let mut resp = resp;
    let mut n = 0;
    let mut tail = Vec::new();
    while let Ok(Some(chunk)) = resp.chunk().await {
        tail.extend_from_slice(&chunk);
        while let Some(i) = tail.windows(2).position(|w| w == b"\n\n") {
            if tail[..i].windows(5).any(|w| w == b"data:") {
                n += 1;
            }
            tail.drain(..i + 2);
        }
    }
    n
}

async fn load(readers: usize, label: &str, start: impl Fn(usize) -> reqwest::RequestBuilder) {
    let t0 = Instant::now();
    let counts = join_all((0..readers).map(|i| {
        let req = start(i);
        async move {
            match req.send().await {
                Ok(resp) if resp.status().is_success() => count_events(resp).await,
                _ => 0,
            }
        }
    }))
    .await;
    let secs = t0.elapsed().as_secs_f64();
    let total: usize = counts.iter().sum();
    let complete = counts.iter().filter(|c| **c > 0).count();
    println!(
        "{label:<10} readers={readers:<5} complete={complete:<5} sse_events={total:<8} \
         time={secs:>7.3}s rate={:>10.0} events/s",
        total as f64 / secs
    );
}

#[tokio::main]
async fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let (readers, events, replay) = if full {
        (env("READERS", 1000), env("EVENTS", 200), 10_000)
    } else {
        (10, 20, 500)
    };
    let mock = mock_agent();
    let gw = gateway_with(
        &mock.addrs[0],
        "",
        "[limits]\nmax_total_bytes = 4294967296\n",
    );
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(readers)
        .timeout(Duration::from_secs(600))
        .build()
        .unwrap();
    let text = format!("scenario:long events={events}");
    println!("sluice gateway load: {readers} concurrent runs of {events} events each");
    let mock_url = format!("http://{}/agents/1/run", mock.addrs[0]);
    load(readers, "direct", |i| {
        http.post(&mock_url).json(&json!({
            "message": text, "message_id": format!("direct-{i}"), "conversation_id": format!("c-{i}"), "stream": true
        }))
    })
    .await;
    let gw_url = gw.url("/api/invokeAgent");
    load(readers, "gateway", |_| {
        http.post(&gw_url).json(&invoke_body(json!(1), &text, None))
    })
    .await;

    // Replay of a finished run to a reconnecting client.
    let (thread, _) = gw
        .start(&format!("scenario:long events={replay}"), None)
        .await;
    gw.wait_terminal(&thread).await;
    let mut times = Vec::new();
    for _ in 0..5 {
        let t0 = Instant::now();
        let resp = http
            .get(gw.url(&format!("/api/threads/{thread}/stream?afterSeq=0")))
            .send()
            .await
            .unwrap();
        let n = count_events(resp).await;
        times.push((t0.elapsed(), n));
    }
    times.sort();
    let (median, n) = times[times.len() / 2];
    println!(
        "replay     events={replay} sse_events={n} median={:.1} ms ({:.0} events/s)",
        median.as_secs_f64() * 1000.0,
        replay as f64 / median.as_secs_f64()
    );
}
