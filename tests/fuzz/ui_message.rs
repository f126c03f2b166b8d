//! Target `ui_message`: the UI-message chunk mapper (`sluice::ingest::ui_message::ChunkMapper`),
//! which turns a dialect-A backend's stream chunks into the run's log events, and the
//! UI-message renderer (`render::ui`, `render::chunk`) that turns those events back into
//! chunks for clients.
//!
//! The input is read two ways: as the wire (an SSE stream decoded as the adapter does, each
//! event's data `[DONE]` or JSON; data that is not JSON is skipped), and as choices for a
//! generated chunk sequence (known and unknown chunk types, ids from a small pool, fields of
//! the right and wrong JSON types). Properties:
//! - nothing panics;
//! - `map` fails exactly for a chunk that is not an object with a string `type`, and then
//!   writes nothing;
//! - the log starts with one root `start`; every event is an AgentFlow payload (`parse` takes
//!   it); none but the closing one is terminal (a backend's data never poses as the run's end,
//!   error, start or text): root `delta`s come only from `text-delta`/`reasoning-delta`, root
//!   `text_replace` only from `data-text-replace`;
//! - the closing event says what the ending says (`finish`/`[DONE]`: completed; `error`: failed
//!   with its `errorText`; `abort`: no event);
//! - rendered for a client: every chunk is a JSON object of its type; no `finish`, `error` or
//!   `abort` before the closing event, and after it the stream is finished.

use serde_json::{json, Value};
use sluice::agentflow::{self, terminal_of, AfKind, Terminal};
use sluice::event::{Event, NewEvent};
use sluice::ingest::ui_message::{ChunkEnd, ChunkMapper};
use sluice::render::chunk::Chunk;
use sluice::render::fold::fold;
use sluice::render::ui::UiRenderer;
use sluice::sse::Decoder;

use super::engine::{Features, Target};
use super::gen::Gen;

pub const TARGET: Target = Target {
    name: "ui_message",
    check,
    dictionary: &[
        b"data: ",
        b"\n\n",
        b"data: [DONE]\n\n",
        b"{\"type\":",
        b"\"type\"",
        b"\"text-delta\"",
        b"\"text-start\"",
        b"\"reasoning-delta\"",
        b"\"tool-input-start\"",
        b"\"tool-input-available\"",
        b"\"tool-output-available\"",
        b"\"tool-output-error\"",
        b"\"data-text-replace\"",
        b"\"data-agentflow\"",
        b"\"data-tool-progress\"",
        b"\"data-artifact\"",
        b"\"finish\"",
        b"\"error\"",
        b"\"abort\"",
        b"\"id\"",
        b"\"delta\"",
        b"\"toolCallId\"",
        b"\"toolName\"",
        b"\"transient\":true",
        b"\"preliminary\":true",
        b"\"data\":",
        b"\"errorText\"",
        b"null",
        b"{}",
        b"[]",
        b"\"\\ud800\"",
        b"\"",
        b",",
    ],
    max_len: 4096,
    must_see: &[
        "end finished",
        "end error",
        "end aborted",
        "done",
        "malformed",
        "not-json",
        "event ui_chunk",
        "event delta",
        "event start nested",
        "event end nested",
        "event text_replace",
        "event tool_progress",
        "event data",
    ],
};

/// One item of the backend's stream.
#[derive(Debug)]
enum Item {
    Done,
    Chunk(Value),
}

fn check(input: &[u8], features: &mut Features) -> Result<(), String> {
    // The wire, as the adapter reads it (SseBody: the decoder, then each event's data).
    let mut dec = Decoder::new(1 << 20);
    let mut events = Vec::new();
    let _ = dec.feed(input, &mut events);
    let mut wire = Vec::new();
    for ev in events {
        if ev.data == "[DONE]" {
            wire.push(Item::Done);
        } else {
            match serde_json::from_str::<Value>(&ev.data) {
                Ok(v) => wire.push(Item::Chunk(v)),
                Err(_) => features.add("not-json"),
            }
        }
    }
    run(&wire, features).map_err(|e| format!("{e}\n(the wire view: {wire:?})"))?;
    let generated = generate(input);
    run(&generated, features).map_err(|e| format!("{e}\n(the generated view: {generated:?})"))
}

fn json_of(e: &NewEvent) -> Result<Value, String> {
    serde_json::from_slice(&e.data).map_err(|err| {
        format!(
            "event-not-json: {err}: {}",
            String::from_utf8_lossy(&e.data)
        )
    })
}

fn run(items: &[Item], features: &mut Features) -> Result<(), String> {
    let mut m = ChunkMapper::new("run_root");
    let mut log: Vec<NewEvent> = Vec::new();
    let mut ending = None;
    for item in items {
        let before = log.len();
        let end = match item {
            Item::Done => {
                features.add("done");
                Some(m.done(&mut log))
            }
            Item::Chunk(v) => {
                let well_formed = v.get("type").is_some_and(Value::is_string) && v.is_object();
                match m.map(v, &mut log) {
                    Err(e) => {
                        features.add("malformed");
                        if well_formed || log.len() != before {
                            return Err(format!(
                                "map-error: {e:?} for {v}, which has a string type, \
                                 wrote {} events",
                                log.len() - before
                            ));
                        }
                        continue;
                    }
                    Ok(end) => {
                        if !well_formed {
                            return Err(format!("map-error: {v} was accepted"));
                        }
                        end
                    }
                }
            }
        };
        let ty = match item {
            Item::Chunk(v) => v["type"].as_str().unwrap_or(""),
            Item::Done => "[DONE]",
        };
        for (i, e) in log.iter().enumerate().skip(before) {
            let v = json_of(e)?;
            let af = agentflow::parse(&e.data)
                .map_err(|err| format!("event-not-agentflow: {err}: {v}"))?;
            let root = af.is_root();
            let kind = match &af.kind {
                AfKind::Other(name) if name != "ui_chunk" => "other",
                k => k.as_str(),
            };
            features.add(&format!(
                "event {kind}{}",
                if root { "" } else { " nested" }
            ));
            if i == 0 {
                if !(af.kind == AfKind::Start && root) {
                    return Err(format!("first-event: the log starts with {v}"));
                }
                continue;
            }
            if terminal_of(&e.data) != Ok(None) {
                return Err(format!("posing: chunk {ty:?} wrote a terminal event {v}"));
            }
            let posing = match (&af.kind, root) {
                (AfKind::Start, true) => true,
                (AfKind::Delta, true) => !matches!(ty, "text-delta" | "reasoning-delta"),
                (AfKind::TextReplace, true) => ty != "data-text-replace",
                _ => false,
            };
            if posing {
                return Err(format!("posing: chunk {ty:?} wrote {v}"));
            }
        }
        if log.is_empty() {
            return Err(format!("first-event: chunk {ty:?} did not start the run"));
        }
        if let Some(end) = end {
            let closing = end.closing().cloned();
            let want = match &end {
                ChunkEnd::Finished(_) => Some(Terminal::Completed),
                ChunkEnd::Error(t, _) => Some(Terminal::Error(t.clone())),
                ChunkEnd::Aborted => None,
            };
            features.add(match &end {
                ChunkEnd::Finished(_) => "end finished",
                ChunkEnd::Error(..) => "end error",
                ChunkEnd::Aborted => "end aborted",
            });
            if let Some(c) = &closing {
                let got = terminal_of(&c.data).map_err(|e| format!("closing: {e}"))?;
                if got != want {
                    return Err(format!("closing: {end:?} closes with terminal {got:?}"));
                }
            }
            ending = Some((end, closing));
            break;
        }
    }
    features.count("log", log.len());
    render(
        &log,
        ending.as_ref().map(|(e, c)| (e, c.as_ref())),
        features,
    )
}

/// The log through the UI-message renderer (and the fold), as a client would read it.
fn render(
    log: &[NewEvent],
    ending: Option<(&ChunkEnd, Option<&NewEvent>)>,
    features: &mut Features,
) -> Result<(), String> {
    let mut events: Vec<Event> = log
        .iter()
        .enumerate()
        .map(|(i, e)| e.clone().at(i as u64 + 1))
        .collect();
    let mut ui = UiRenderer::new("msg_1".into());
    let mut chunks = Vec::new();
    for ev in &events {
        ui.render(ev, &mut chunks);
    }
    check_chunks(&chunks)?;
    if let Some(c) = chunks
        .iter()
        .find(|c| matches!(c, Chunk::Finish | Chunk::Error { .. } | Chunk::Abort))
    {
        return Err(format!("render: {} before the run ended", c.to_json()));
    }
    if ui.is_finished() {
        return Err("render: finished before the run ended".into());
    }
    if let Some((end, Some(closing))) = ending {
        let ev = closing.clone().at(events.len() as u64 + 1);
        chunks.clear();
        ui.render(&ev, &mut chunks);
        check_chunks(&chunks)?;
        let ok = match (end, chunks.last()) {
            (ChunkEnd::Finished(_), Some(Chunk::Finish)) => true,
            (ChunkEnd::Error(t, _), Some(Chunk::Error { error_text })) => t == error_text,
            _ => false,
        };
        if !ok || !ui.is_finished() {
            return Err(format!(
                "render: {end:?} rendered as {chunks:?} (finished: {})",
                ui.is_finished()
            ));
        }
        events.push(ev);
    }
    let message = fold("msg_1", &events);
    if !message.get("parts").is_some_and(Value::is_array) {
        return Err(format!("fold: no parts array in {message}"));
    }
    features.count("parts", message["parts"].as_array().map_or(0, Vec::len));
    Ok(())
}

fn check_chunks(chunks: &[Chunk]) -> Result<(), String> {
    for c in chunks {
        super::agentflow::check_chunk(c)?;
    }
    Ok(())
}

const TYPES: &[&str] = &[
    "start",
    "start-step",
    "finish-step",
    "text-start",
    "text-delta",
    "text-end",
    "reasoning-start",
    "reasoning-delta",
    "reasoning-end",
    "tool-input-start",
    "tool-input-delta",
    "tool-input-available",
    "tool-input-error",
    "tool-output-available",
    "tool-output-error",
    "source-url",
    "source-document",
    "file",
    "message-metadata",
    "data-text-replace",
    "data-tool-progress",
    "data-tool-result-delta",
    "data-artifact-progress",
    "data-agentflow",
    "data-call-delta",
    "data-artifact",
    "data-x",
    "data-",
    "custom",
    "error",
    "finish",
    "abort",
];

const KEYS: &[&str] = &[
    "type",
    "id",
    "delta",
    "toolCallId",
    "toolName",
    "inputTextDelta",
    "input",
    "output",
    "preliminary",
    "errorText",
    "sourceId",
    "url",
    "title",
    "mediaType",
    "filename",
    "data",
    "transient",
    "messageMetadata",
    "text",
    "callId",
    "artifactId",
    "status",
    "content",
];

const STRINGS: &[&str] = &[
    "a",
    "b",
    "0",
    "c1",
    "c2",
    "run_root",
    "x",
    "",
    "tool_progress",
    "TOOL_PROGRESS",
    "tool_result_delta",
    "artifact_progress",
    "end",
    "error",
    "start",
    "delta",
    "text_replace",
    "approval_required",
    "started",
    "completed",
    "odd",
];

/// A generated chunk sequence: mostly well-formed chunks of every type with ids from a small
/// pool, some with fields of the wrong type or extra keys, some malformed, `[DONE]` rarely.
fn generate(input: &[u8]) -> Vec<Item> {
    let mut g = Gen::new(input);
    let mut items = Vec::new();
    while !g.is_empty() && items.len() < 64 {
        match g.below(32) {
            0 => items.push(Item::Done),
            1 => items.push(Item::Chunk(g.value(2, KEYS, STRINGS))),
            _ => {
                let ty = g.string(TYPES);
                let mut c = serde_json::Map::new();
                c.insert("type".into(), json!(ty));
                for _ in 0..g.below(5) {
                    let key = *g.pick(KEYS);
                    let v = match key {
                        "data" if g.chance(200) => {
                            let mut d = serde_json::Map::new();
                            for _ in 0..g.below(4) {
                                d.insert(g.string(KEYS), small(&mut g));
                            }
                            Value::Object(d)
                        }
                        "transient" | "preliminary" if g.chance(200) => json!(true),
                        _ => small(&mut g),
                    };
                    c.insert(key.into(), v);
                }
                items.push(Item::Chunk(Value::Object(c)));
            }
        }
    }
    items
}

/// A field value: usually a pool string, sometimes any JSON.
fn small(g: &mut Gen) -> Value {
    if g.chance(190) {
        json!(g.string(STRINGS))
    } else {
        g.value(2, KEYS, STRINGS)
    }
}
