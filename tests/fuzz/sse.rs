//! Target `sse`: the SSE decoder (`sluice::sse::Decoder`), which reads every byte an
//! AgentFlow or UI-message backend streams.
//!
//! Properties, with no limit, with the tightest limit the stream passes, and one below it:
//! - it never panics;
//! - any chunking of the same bytes (one byte at a time, cuts derived from the input, empty
//!   chunks in between) gives the same events, error, last event id and retry;
//! - no dispatched event holds more than the limit (`data` + `event`, in bytes);
//! - without a limit it agrees with a direct whole-stream transcription of WHATWG HTML
//!   §9.2.5/§9.2.6; with one, it gives that model's events (a prefix of them when it fails,
//!   and then only with `EventTooLarge { limit }`);
//! - after `finish`, a new stream decodes from a clean state (the last id carried over).

use sluice::sse::{DecodeError, Decoder, SseEvent};

use super::engine::{fnv1a, Features, Target};

pub const TARGET: Target = Target {
    name: "sse",
    check,
    dictionary: &[
        b"data:",
        b"data: ",
        b"data",
        b"event:",
        b"event: ",
        b"id:",
        b"id: ",
        b"id: \0",
        b"retry:",
        b"retry: 1000",
        b"retry: 99999999999999999999999",
        b":",
        b": keep-alive",
        b"\n",
        b"\r",
        b"\r\n",
        b"\n\n",
        b"\r\n\r\n",
        b"\r\r",
        b"\xEF\xBB\xBF",
        b"\xEF\xBB",
        b"\xFF",
        b"\xE2\x82",
        b"\xF0\x9F\x98\x80",
        b"\0",
        b" ",
        b"[DONE]",
        b"{\"type\":\"text-delta\",\"id\":\"t\",\"delta\":\"x\"}",
    ],
    max_len: 2048,
    must_see: &["events", "error", "retry", "id", "bom", "event-type"],
};

type Outcome = (
    Vec<SseEvent>,
    Result<(), DecodeError>,
    Option<String>,
    Option<u64>,
);

/// Feed `chunks` in order; the events, the first error (later feeds must repeat it), and the
/// decoder's last id and retry.
fn outcome(limit: usize, chunks: &[&[u8]]) -> Result<Outcome, String> {
    let mut dec = Decoder::new(limit);
    let mut events = Vec::new();
    let mut result = Ok(());
    for chunk in chunks {
        let before = events.len();
        let r = dec.feed(chunk, &mut events);
        match (result, r) {
            (Ok(()), r) => result = r,
            (Err(first), r) => {
                if r != Err(first) || events.len() != before {
                    return Err(format!(
                        "poisoned: after {first:?}, a feed gave {r:?} and {} events",
                        events.len() - before
                    ));
                }
            }
        }
    }
    let id = dec.last_event_id().map(str::to_owned);
    Ok((events, result, id, dec.retry()))
}

fn check(input: &[u8], features: &mut Features) -> Result<(), String> {
    let (ref_events, ref_id, ref_retry) = reference(input);
    let h = fnv1a(input);
    // The tightest limit the stream passes (what a stream can hold is the same whatever the
    // limit, so passing is monotone in it), one below it, and no limit.
    let tight = tightest(input);
    let mut limits = vec![usize::MAX, tight];
    if tight > 0 {
        limits.push(tight - 1);
    }
    for limit in limits {
        let whole = outcome(limit, &[input])?;
        let (events, result, id, retry) = &whole;
        for ev in events {
            if ev.data.len() + ev.event.len() > limit {
                return Err(format!(
                    "event-over-limit: limit {limit}, event has {} bytes of data and {} of type",
                    ev.data.len(),
                    ev.event.len()
                ));
            }
        }
        match result {
            Ok(()) => {
                if (events, id, retry) != (&ref_events, &ref_id, &ref_retry) {
                    return Err(format!(
                        "reference: limit {limit}\n decoder   {:?} id {id:?} retry {retry:?}\n \
                         reference {ref_events:?} id {ref_id:?} retry {ref_retry:?}",
                        events
                    ));
                }
            }
            Err(e) => {
                features.add("error");
                if limit == usize::MAX || *e != (DecodeError::EventTooLarge { limit }) {
                    return Err(format!("reference: limit {limit} gave {e:?}"));
                }
                if !ref_events.starts_with(events) {
                    return Err(format!(
                        "reference: limit {limit} failed after events that are not the model's:\n \
                         {events:?}\n model {ref_events:?}"
                    ));
                }
            }
        }
        for (name, chunks) in chunkings(input, h) {
            let got = outcome(limit, &chunks)?;
            if got != whole {
                let sizes: Vec<usize> = chunks.iter().map(|c| c.len()).collect();
                let shown = if sizes.len() <= 16 {
                    format!("{sizes:?}")
                } else {
                    format!("({} chunks)", sizes.len())
                };
                return Err(format!(
                    "chunking: limit {limit}, {name} {shown} differs:\n whole   {whole:?}\n chunked {got:?}"
                ));
            }
        }
        if limit == usize::MAX {
            after_finish(input, id)?;
        }
    }
    features.count("events", ref_events.len());
    if !ref_events.is_empty() {
        features.add("events");
    }
    if ref_retry.is_some() {
        features.add("retry");
    }
    if ref_id.is_some() || ref_events.iter().any(|e| e.id.is_some()) {
        features.add("id");
    }
    if ref_events.iter().any(|e| !e.event.is_empty()) {
        features.add("event-type");
    }
    if input.starts_with(b"\xEF\xBB\xBF") {
        features.add("bom");
    }
    if input.contains(&b'\r') {
        features.add("cr");
    }
    Ok(())
}

/// The smallest limit under which `input` decodes without an error.
fn tightest(input: &[u8]) -> usize {
    let passes = |limit| {
        let mut dec = Decoder::new(limit);
        dec.feed(input, &mut Vec::new()).is_ok()
    };
    // Nothing can need more than the whole input (a few bytes more once invalid UTF-8 is
    // replaced, each byte by at most three).
    let (mut lo, mut hi) = (0, 3 * input.len() + 3);
    if !passes(hi) {
        return hi;
    }
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if passes(mid) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    lo
}

/// The chunkings tried: one byte at a time, split points near the start and the end and at
/// places derived from the input's hash, and a few multi-cut splits (with empty chunks).
fn chunkings(input: &[u8], h: u64) -> Vec<(String, Vec<&[u8]>)> {
    let mut out: Vec<(String, Vec<&[u8]>)> = Vec::new();
    out.push(("bytes".into(), input.chunks(1).collect()));
    let n = input.len();
    let mut points: Vec<usize> = vec![1.min(n), 2.min(n), n.saturating_sub(1), n.saturating_sub(2)];
    let mut state = h;
    for _ in 0..6 {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        points.push((state >> 33) as usize % (n + 1));
    }
    for &p in &points {
        out.push((format!("split at {p}"), vec![&input[..p], &input[p..]]));
    }
    for round in 0..3 {
        let mut cuts: Vec<usize> = (0..6)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (state >> 33) as usize % (n + 1)
            })
            .collect();
        cuts.sort_unstable();
        let mut chunks = Vec::new();
        let mut prev = 0;
        for c in cuts {
            chunks.push(&input[prev..c]);
            prev = c;
            if round == 1 {
                chunks.push(&input[c..c]);
            }
        }
        chunks.push(&input[prev..]);
        out.push((format!("cuts #{round}"), chunks));
    }
    out
}

/// After `finish`, a new stream starts clean (a BOM is stripped again) and keeps the last id.
fn after_finish(input: &[u8], id: &Option<String>) -> Result<(), String> {
    let mut dec = Decoder::new(usize::MAX);
    let mut events = Vec::new();
    dec.feed(input, &mut events)
        .map_err(|e| format!("finish: {e:?}"))?;
    dec.finish();
    events.clear();
    dec.feed(b"\xEF\xBB\xBFdata: after\n\n", &mut events)
        .map_err(|e| format!("finish: {e:?}"))?;
    let want = SseEvent {
        event: String::new(),
        data: "after".into(),
        id: id.clone(),
    };
    if events != [want.clone()] {
        return Err(format!(
            "finish: the next stream gave {events:?}, not [{want:?}]"
        ));
    }
    Ok(())
}

/// The specification's whole-stream decoding, the oracle (shared with the decoder's unit tests).
use sluice::sse::model::decode_whole as reference;
