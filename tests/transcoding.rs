//! The transcoding table of `docs/transcoding.md`, checked row by row: the test reads the table
//! from the document itself, so the two cannot drift apart.
//!
//! For each row (log events ⇄ UI-message chunks ⇄ snapshot parts):
//! 1. the events render to exactly the chunks (after the run's opening `start`, `start-step`);
//! 2. the events fold to exactly the parts (after the opening `step-start`);
//! 3. the chunks, read by the UI-message adapter's mapper and rendered again, give the same
//!    chunks and parts (ids compared by order of appearance);
//! 4. for rows marked `yes`, the snapshots a poll backend would show after each of the row's
//!    events, diffed in turn by the poll adapter, fold to the same parts.

mod common;

use common::normalize_ids;
use serde_json::{json, Value};

use sluice::event::{Event, NewEvent};
use sluice::ingest::events::Events;
use sluice::ingest::poll::SnapshotDiff;
use sluice::ingest::ui_message::{ChunkEnd, ChunkMapper};
use sluice::render::fold::fold;
use sluice::render::ui::UiRenderer;

struct Row {
    name: String,
    events: Vec<Value>,
    chunks: Vec<Value>,
    parts: Vec<Value>,
    poll: bool,
}

fn cell(text: &str) -> Vec<Value> {
    text.split("<br>")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(|c| {
            let json = c.trim_matches('`');
            serde_json::from_str(json).unwrap_or_else(|e| panic!("bad JSON in table: {json}: {e}"))
        })
        .collect()
}

fn table() -> Vec<Row> {
    let doc = include_str!("../docs/transcoding.md");
    let start = doc
        .find("<!-- mapping-table")
        .expect("docs/transcoding.md has the mapping table marker");
    let mut rows = Vec::new();
    for line in doc[start..].lines().skip(1) {
        let line = line.trim();
        if line.is_empty() && !rows.is_empty() {
            break;
        }
        if !line.starts_with('|') || line.starts_with("| row") || line.starts_with("|---") {
            continue;
        }
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        assert_eq!(cells.len(), 5, "a row has five cells: {line}");
        rows.push(Row {
            name: cells[0].to_owned(),
            events: cell(cells[1]),
            chunks: cell(cells[2]),
            parts: cell(cells[3]),
            poll: cells[4].starts_with("yes"),
        });
    }
    assert!(rows.len() >= 20, "the table has its rows ({})", rows.len());
    rows
}

fn numbered(events: Vec<NewEvent>) -> Vec<Event> {
    events
        .into_iter()
        .enumerate()
        .map(|(i, e)| e.at(i as u64 + 1))
        .collect()
}

fn with_root_start(events: &[Value]) -> Vec<Event> {
    let mut all = vec![NewEvent::new(
        json!({"type":"start","call_id":"r"}).to_string(),
    )];
    all.extend(events.iter().map(|v| NewEvent::new(v.to_string())));
    numbered(all)
}

/// The chunks of a run, without its opening `start` and `start-step`.
fn render(events: &[Event]) -> Vec<Value> {
    let mut r = UiRenderer::new("msg".into());
    let mut chunks = Vec::new();
    for ev in events {
        r.render(ev, &mut chunks);
    }
    assert_eq!(chunks[0].to_json(), r#"{"type":"start","messageId":"msg"}"#);
    assert_eq!(chunks[1].to_json(), r#"{"type":"start-step"}"#);
    chunks[2..]
        .iter()
        .map(|c| serde_json::from_str(&c.to_json()).unwrap())
        .collect()
}

/// The parts of a run's folded message, without its opening `step-start`.
fn parts(events: &[Event]) -> Vec<Value> {
    let m = fold("msg", events);
    let parts = m["parts"].as_array().unwrap().clone();
    assert_eq!(parts[0], json!({"type":"step-start"}));
    parts[1..].to_vec()
}

/// The log a UI-message backend sending `chunks` leaves (with the closing event the adapter's
/// supervisor appends after an `abort`).
fn ingest_chunks(chunks: &[Value]) -> Vec<Event> {
    let mut mapper = ChunkMapper::new("r");
    let mut out = Vec::new();
    let opening = [
        json!({"type":"start","messageId":"up"}),
        json!({"type":"start-step"}),
    ];
    for c in opening.iter().chain(chunks) {
        let end = mapper.map(c, &mut out).expect("the row's chunks are valid");
        if let Some(closing) = end.as_ref().and_then(ChunkEnd::closing) {
            out.push(closing.clone());
        }
        if matches!(end, Some(ChunkEnd::Aborted)) {
            let closing = sluice::agentflow::synthetic_error("stopped", "aborted");
            out.push(NewEvent::new(closing));
        }
    }
    numbered(out)
}

#[test]
fn every_row_renders_folds_and_round_trips() {
    let mut failures = Vec::new();
    for row in table() {
        let events = with_root_start(&row.events);
        let mut check = |what: &str, got: Vec<Value>, want: &Vec<Value>| {
            if &got != want {
                failures.push(format!(
                    "row `{}`, {what}:\n  got  {}\n  want {}",
                    row.name,
                    Value::Array(got),
                    Value::Array(want.clone())
                ));
            }
        };
        check("render", render(&events), &row.chunks);
        check("fold", parts(&events), &row.parts);
        let reread = ingest_chunks(&row.chunks);
        check(
            "ui-message upstream, chunks",
            normalize_ids(&render(&reread)),
            &normalize_ids(&row.chunks),
        );
        check(
            "ui-message upstream, parts",
            normalize_ids(&parts(&reread)),
            &normalize_ids(&row.parts),
        );
        if row.poll {
            // The backend's snapshot after each of the row's events (its fold so far), diffed
            // in turn: growth, rewrites, tool states and data updates go through the diff.
            let ev = Events::new("r");
            let mut diff = SnapshotDiff::new(ev.clone());
            let mut log = vec![ev.start()];
            for n in 1..=events.len() {
                let message = fold("up", &events[..n]);
                log.extend(diff.diff(&message));
            }
            check(
                "poll upstream, parts",
                normalize_ids(&parts(&numbered(log))),
                &normalize_ids(&row.parts),
            );
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_poll_adapter_builds_a_growing_snapshot_into_the_same_parts() {
    // The same final message whether the poll backend showed it at once or in steps.
    let ev = Events::new("r");
    let steps = [
        json!([{"type":"step-start"},{"type":"text","text":"Let me","state":"streaming"}]),
        json!([{"type":"step-start"},{"type":"text","text":"Let me look.","state":"done"},
               {"type":"tool-search","toolCallId":"c1","state":"input-available","input":{"q":"x"}}]),
        json!([{"type":"step-start"},{"type":"text","text":"Let me look.","state":"done"},
               {"type":"tool-search","toolCallId":"c1","state":"output-available","input":{"q":"x"},"output":1},
               {"type":"text","text":"Found","state":"streaming"}]),
    ];
    let mut diff = SnapshotDiff::new(ev.clone());
    let mut log = vec![ev.start()];
    for parts in &steps {
        log.extend(diff.diff(&json!({"role":"assistant","parts":parts})));
    }
    log.push(ev.end());
    let m = fold("msg", &numbered(log));
    assert_eq!(
        m["parts"],
        json!([
            {"type":"step-start"},
            {"type":"text","text":"Let me look.","state":"done"},
            {"type":"tool-search","toolCallId":"c1","providerExecuted":true,"state":"output-available","input":{"q":"x"},"output":1},
            {"type":"text","text":"Found","state":"done"}
        ])
    );
}
