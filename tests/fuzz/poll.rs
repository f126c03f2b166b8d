//! Target `poll`: the poll adapter's reading of a backend's snapshots
//! (`sluice::ingest::poll::{parse_snapshot, backend_state, closing, our_message, ...}`) and the
//! snapshot diff (`SnapshotDiff`), which turns successive snapshots of the assistant message
//! into log events.
//!
//! The input is read two ways: as the wire (a stream of JSON values: each a snapshot body,
//! `{streamStatus, messages}`, whose assistant message is diffed, or a message itself), and as
//! choices for a generated sequence of messages, each usually the previous one edited (text
//! grown or rewritten, a tool's state advanced, a part added, removed or retyped). Properties:
//! - nothing panics;
//! - every event is an AgentFlow payload, and none is terminal (only the snapshot's
//!   `streamStatus` ends a run: `closing` gives the root end or error, with its text);
//! - the same snapshot twice writes nothing the second time (nothing is re-sent, so a backend
//!   that keeps answering the same snapshot cannot grow the log);
//! - the text a reader rebuilds for each text or reasoning part (deltas appended, replaces
//!   taken whole, per `part_id`) is the part's current text after every snapshot;
//! - a tool call starts once, ends (or fails) at most once, and only after its start; its
//!   progress comes between the two.

use std::collections::HashMap;

use serde_json::{json, Value};
use sluice::agentflow::{self, terminal_of, AfKind, Terminal};
use sluice::event::NewEvent;
use sluice::ingest::events::Events;
use sluice::ingest::poll::{
    backend_state, closing, our_message, our_user_message, parse_snapshot, user_messages,
    BackendState, SnapshotDiff,
};
use sluice::ingest::Ending;

use super::engine::{Features, Target};
use super::gen::Gen;

pub const TARGET: Target = Target {
    name: "poll",
    check,
    dictionary: &[
        b"{\"type\":",
        b"\"parts\":",
        b"\"text\"",
        b"\"reasoning\"",
        b"\"tool-search\"",
        b"\"dynamic-tool\"",
        b"\"data-progress\"",
        b"\"source-url\"",
        b"\"file\"",
        b"\"step-start\"",
        b"\"state\":",
        b"\"input-streaming\"",
        b"\"input-available\"",
        b"\"output-available\"",
        b"\"output-error\"",
        b"\"output-denied\"",
        b"\"preliminary\":true",
        b"\"toolCallId\":\"c1\"",
        b"\"role\":\"assistant\"",
        b"\"role\":\"user\"",
        b"\"streamStatus\":",
        b"\"completed\"",
        b"\"error\"",
        b"\"messages\":",
        b"\"id\":\"u1\"",
        b"null",
        b"{}",
        b"[]",
        b"\"",
        b",",
        b"\n",
    ],
    max_len: 4096,
    must_see: &[
        "delta",
        "text_replace",
        "start",
        "end",
        "error",
        "tool_progress",
        "data",
        "ui_part",
        "source",
        "file",
        "snapshot",
        "snapshot-error",
        "our-message",
        "state completed",
        "state error",
    ],
};

const ROOT: &str = "run_1";

fn check(input: &[u8], features: &mut Features) -> Result<(), String> {
    // The wire: JSON values, one after another (up to the first that does not parse).
    let mut wire: Vec<Value> = Vec::new();
    for v in serde_json::Deserializer::from_slice(input).into_iter::<Value>() {
        match v {
            Ok(v) => wire.push(v),
            Err(_) => break,
        }
    }
    let mut messages = Vec::new();
    let ours = json!({"id": "u1", "role": "user", "parts": [{"type": "text", "text": "hi"}]});
    for v in &wire {
        let body = serde_json::to_vec(v).map_err(|e| e.to_string())?;
        match parse_snapshot(&body) {
            Ok(snap) => {
                features.add("snapshot");
                snapshot(&snap, &ours, &mut messages, features)?;
            }
            Err(_) => {
                features.add("snapshot-error");
                messages.push(v.clone());
            }
        }
    }
    // The raw bytes as a body too (an error, or the same as above for one value).
    if let Ok(snap) = parse_snapshot(input) {
        snapshot(&snap, &ours, &mut Vec::new(), features)?;
    }
    diff_all(&messages, features).map_err(|e| format!("{e}\n(the wire view)"))?;
    let generated = generate(input);
    diff_all(&generated, features).map_err(|e| {
        let shown: Vec<String> = generated.iter().map(Value::to_string).collect();
        format!("{e}\n(the generated view:\n{})", shown.join("\n"))
    })
}

/// What the adapter reads from one snapshot: its state (and the closing event), and where its
/// own messages are; the assistant message found is pushed to `messages`.
fn snapshot(
    snap: &Value,
    ours: &Value,
    messages: &mut Vec<Value>,
    features: &mut Features,
) -> Result<(), String> {
    let state = backend_state(snap);
    let ev = Events::new(ROOT);
    let ending = closing(&ev, &state);
    let ok = match (&state, &ending) {
        (BackendState::Running, None) => true,
        (BackendState::Completed, Some(Ending::Completed(e))) => {
            terminal_of(&e.data) == Ok(Some(Terminal::Completed))
        }
        (BackendState::Error(t), Some(Ending::AgentError(t2, e))) => {
            t == t2 && terminal_of(&e.data) == Ok(Some(Terminal::Error(t.clone())))
        }
        (BackendState::Stopped(_) | BackendState::Timeout(_), Some(Ending::Backend(..))) => true,
        _ => false,
    };
    if !ok {
        return Err(format!("closing: state {state:?} closes as {ending:?}"));
    }
    features.add(match state {
        BackendState::Running => "state running",
        BackendState::Completed => "state completed",
        BackendState::Error(_) => "state error",
        BackendState::Stopped(_) => "state stopped",
        BackendState::Timeout(_) => "state timeout",
    });
    let Some(list) = snap.get("messages").and_then(Value::as_array) else {
        return Ok(());
    };
    let users = user_messages(list);
    for before in [0, 1, users] {
        let user = our_user_message(list, ours, before);
        let found = our_message(list, ours, before);
        if let Some(i) = user {
            if i >= list.len() || list[i]["role"] != "user" {
                return Err(format!("our-message: user message {i} of {list:?}"));
            }
        }
        if let Some(i) = found {
            let u = user.ok_or("our-message: an assistant message without a user message")?;
            if i <= u || i >= list.len() || list[i]["role"] != "assistant" {
                return Err(format!(
                    "our-message: assistant {i} after user {u} in {list:?}"
                ));
            }
            if before == 0 {
                features.add("our-message");
                messages.push(list[i].clone());
            }
        }
    }
    Ok(())
}

/// Diff `messages` in order and check every property after each.
fn diff_all(messages: &[Value], features: &mut Features) -> Result<(), String> {
    let mut d = SnapshotDiff::new(Events::new(ROOT));
    let mut model = Model::default();
    for (n, m) in messages.iter().enumerate() {
        let evs = d.diff(m);
        model
            .apply(&evs, features)
            .map_err(|e| format!("{e} (snapshot #{n})"))?;
        model
            .check_text(m)
            .map_err(|e| format!("{e} (snapshot #{n})"))?;
        let again = d.diff(m);
        if !again.is_empty() {
            let shown: Vec<String> = again
                .iter()
                .map(|e| String::from_utf8_lossy(&e.data).into_owned())
                .collect();
            return Err(format!(
                "idempotent: snapshot #{n} diffed twice wrote again: {shown:?}"
            ));
        }
        features.count("events per snapshot", evs.len());
    }
    Ok(())
}

/// What a reader of the log knows: each part's text, each call's progress.
#[derive(Default)]
struct Model {
    /// `part_id` → the text rebuilt from deltas and replaces.
    text: HashMap<String, String>,
    /// Per part index: the last type seen and how many times it changed.
    parts: Vec<(Option<String>, u32)>,
    /// Call id → (started, ended).
    calls: HashMap<String, (bool, bool)>,
}

impl Model {
    fn apply(&mut self, evs: &[NewEvent], features: &mut Features) -> Result<(), String> {
        for e in evs {
            let v: Value =
                serde_json::from_slice(&e.data).map_err(|err| format!("event-not-json: {err}"))?;
            let af = agentflow::parse(&e.data)
                .map_err(|err| format!("event-not-agentflow: {err}: {v}"))?;
            if terminal_of(&e.data) != Ok(None) {
                return Err(format!("terminal: the diff wrote a terminal event {v}"));
            }
            features.add(af.kind.as_str());
            let call = af.call_id.clone().unwrap_or_default();
            let nested = !af.is_root();
            match (&af.kind, nested) {
                (AfKind::Delta | AfKind::TextReplace, false) => {
                    let part = af
                        .part_id()
                        .ok_or_else(|| format!("text: no part_id in {v}"))?
                        .to_owned();
                    let piece = af.text().unwrap_or("");
                    let text = self.text.entry(part).or_default();
                    if af.kind == AfKind::Delta {
                        if piece.is_empty() {
                            return Err(format!("text: an empty delta {v}"));
                        }
                        text.push_str(piece);
                    } else {
                        piece.clone_into(text);
                    }
                }
                (AfKind::Start, true) => {
                    let c = self.calls.entry(call.clone()).or_default();
                    if c.0 {
                        return Err(format!("tools: call {call:?} started twice"));
                    }
                    c.0 = true;
                }
                (AfKind::End | AfKind::Error, true) => {
                    let c = self.calls.entry(call.clone()).or_default();
                    if !c.0 || c.1 {
                        return Err(format!(
                            "tools: call {call:?} ended (started {}, ended {})",
                            c.0, c.1
                        ));
                    }
                    c.1 = true;
                }
                (AfKind::ToolProgress, true) => {
                    let c = self.calls.entry(call.clone()).or_default();
                    if !c.0 || c.1 {
                        return Err(format!(
                            "tools: progress of call {call:?} (started {}, ended {})",
                            c.0, c.1
                        ));
                    }
                }
                (AfKind::Data | AfKind::Source | AfKind::File | AfKind::Other(_), false) => {}
                _ => return Err(format!("unexpected: the diff wrote {v}")),
            }
        }
        Ok(())
    }

    /// Every text or reasoning part of `m` reads, for a reader of the log, as its text.
    fn check_text(&mut self, m: &Value) -> Result<(), String> {
        let Some(parts) = m.get("parts").and_then(Value::as_array) else {
            return Ok(());
        };
        if self.parts.len() < parts.len() {
            self.parts.resize(parts.len(), (None, 0));
        }
        for (i, part) in parts.iter().enumerate() {
            let Some(ty) = part.get("type").and_then(Value::as_str) else {
                continue;
            };
            let (seen, generation) = &mut self.parts[i];
            if seen.as_deref() != Some(ty) {
                if seen.is_some() {
                    *generation += 1;
                }
                *seen = Some(ty.to_owned());
            }
            if ty != "text" && ty != "reasoning" {
                continue;
            }
            let id = match *generation {
                0 => format!("p{i}"),
                g => format!("p{i}-{g}"),
            };
            let want = part.get("text").and_then(Value::as_str).unwrap_or("");
            let got = self.text.get(&id).map_or("", String::as_str);
            if got != want {
                return Err(format!(
                    "text: part {id} reads {got:?} from the log, the snapshot has {want:?}"
                ));
            }
        }
        Ok(())
    }
}

const PART_TYPES: &[&str] = &[
    "text",
    "text",
    "reasoning",
    "step-start",
    "tool-search",
    "tool-fetch",
    "dynamic-tool",
    "tool-",
    "data-progress",
    "data-note",
    "source-url",
    "source-document",
    "file",
    "mystery",
];

const STATES: &[&str] = &[
    "input-streaming",
    "input-available",
    "output-available",
    "output-error",
    "output-denied",
    "approval-requested",
];

const KEYS: &[&str] = &[
    "type",
    "text",
    "toolCallId",
    "toolName",
    "state",
    "input",
    "output",
    "errorText",
    "preliminary",
    "id",
    "data",
    "url",
    "sourceId",
    "mediaType",
    "title",
    "parts",
];

const STRINGS: &[&str] = &["c1", "c2", "p0", "p1", "a", "ab", "", "x", "text", "tool-x"];

/// A generated sequence of assistant messages, each usually the previous one edited.
fn generate(input: &[u8]) -> Vec<Value> {
    let mut g = Gen::new(input);
    let mut messages: Vec<Value> = Vec::new();
    let mut parts: Vec<Value> = Vec::new();
    while !g.is_empty() && messages.len() < 24 {
        let edits = 1 + g.below(3);
        for _ in 0..edits {
            edit(&mut g, &mut parts);
        }
        let m = match g.below(16) {
            0 => g.value(3, KEYS, STRINGS),
            1 => json!({"parts": g.value(2, KEYS, STRINGS)}),
            _ => json!({"id": "a1", "role": "assistant", "parts": parts.clone()}),
        };
        messages.push(m);
    }
    messages
}

fn edit(g: &mut Gen, parts: &mut Vec<Value>) {
    if parts.is_empty() || g.below(6) == 0 {
        if parts.len() < 8 {
            let p = new_part(g);
            let at = g.below(parts.len() + 1);
            parts.insert(at, p);
        }
        return;
    }
    let i = g.below(parts.len());
    let p = &mut parts[i];
    match g.below(10) {
        0..=2 => {
            // Text grows (the usual case).
            let old = p
                .get("text")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned();
            p["text"] = json!(old + &g.string(STRINGS));
        }
        3 => p["text"] = json!(g.string(STRINGS)),
        4 => p["state"] = json!(g.pick(STATES)),
        5 => {
            p["output"] = g.value(1, KEYS, STRINGS);
            if g.chance(128) {
                p["preliminary"] = json!(g.chance(200));
            }
        }
        6 => p["type"] = json!(g.pick(PART_TYPES)),
        7 => {
            parts.remove(i);
        }
        8 => p["data"] = g.value(1, KEYS, STRINGS),
        _ => {
            let k = *g.pick(KEYS);
            p[k] = g.value(1, KEYS, STRINGS);
        }
    }
}

fn new_part(g: &mut Gen) -> Value {
    let ty = *g.pick(PART_TYPES);
    let mut p = json!({"type": ty});
    match ty {
        "text" | "reasoning" => p["text"] = json!(g.string(STRINGS)),
        t if t.starts_with("tool-") || t == "dynamic-tool" => {
            if g.chance(230) {
                p["toolCallId"] = json!(g.pick(&["c1", "c2", "c3", "p0"]));
            }
            p["toolName"] = json!("calc");
            p["state"] = json!(g.pick(STATES));
            if g.chance(160) {
                p["input"] = g.value(1, KEYS, STRINGS);
            }
        }
        t if t.starts_with("data-") => {
            if g.chance(128) {
                p["id"] = json!(g.pick(&["d1", "d2"]));
            }
            p["data"] = g.value(1, KEYS, STRINGS);
        }
        "source-url" | "file" if g.chance(200) => p["url"] = json!("https://e.x"),
        _ => {}
    }
    p
}
