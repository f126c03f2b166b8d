//! Turning successive snapshots of one assistant message into log events (pure: no I/O).
//!
//! [`SnapshotDiff`] remembers what it already wrote for each part and writes only what changed,
//! in the log's vocabulary ([`Events`]): text that grew becomes a `delta` of the new suffix
//! only, text that was rewritten a `text_replace`, tool parts nested `start`/`end`/`error` calls
//! (and `tool_progress` for preliminary output), sources, files and data parts their own events,
//! anything else an opaque `ui_part`. Nothing is ever retracted; odd JSON never panics.
//!
//! What it remembers ([`DiffState`]) serialises, so that a run taken over by another instance
//! continues the diff where it stopped ([`SnapshotDiff::restore`]).

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::super::events::Events;
use crate::event::NewEvent;

/// What was emitted for one part index.
#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
struct PartSeen {
    /// The part's type (`None`: never seen).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ty: Option<String>,
    /// How many times the type at this index changed (names the part `p{i}-{gen}`).
    #[serde(default, skip_serializing_if = "is_zero")]
    generation: u32,
    /// Text (or reasoning) emitted so far.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    text: String,
    /// A once-only part was emitted.
    #[serde(default, skip_serializing_if = "is_false")]
    emitted: bool,
    /// The last data part emitted: its id and data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    data: Option<(Option<String>, Value)>,
}

/// What was emitted for one tool call.
#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
struct ToolSeen {
    #[serde(default, skip_serializing_if = "is_false")]
    started: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    done: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    progress: Option<Value>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// What a [`SnapshotDiff`] has emitted so far, per part index and per tool call: all it needs
/// to go on (JSON, for a takeover checkpoint).
#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DiffState {
    #[serde(default)]
    parts: Vec<PartSeen>,
    #[serde(default)]
    tools: HashMap<String, ToolSeen>,
}

/// Turns successive snapshots of one assistant message into the log events that say what
/// changed. Pure; never retracts anything, never panics on odd JSON.
#[derive(Debug)]
pub struct SnapshotDiff {
    events: Events,
    state: DiffState,
}

impl SnapshotDiff {
    /// A diff writing events with `events` (whose root call id is the run's).
    pub fn new(events: Events) -> SnapshotDiff {
        SnapshotDiff::restore(events, DiffState::default())
    }

    /// A diff that goes on from `state` (what [`SnapshotDiff::state`] gave), writing events with
    /// `events`: the same events as the diff that had that state would write.
    pub fn restore(events: Events, state: DiffState) -> SnapshotDiff {
        SnapshotDiff { events, state }
    }

    /// The builder of the events it writes.
    pub fn events(&self) -> &Events {
        &self.events
    }

    /// What the diff has emitted so far.
    pub fn state(&self) -> &DiffState {
        &self.state
    }

    /// The events that bring the log from the previous snapshot of the message to `message`.
    pub fn diff(&mut self, message: &Value) -> Vec<NewEvent> {
        let mut out = Vec::new();
        let Some(parts) = message.get("parts").and_then(Value::as_array) else {
            return out;
        };
        let DiffState {
            parts: seen_parts,
            tools,
        } = &mut self.state;
        if seen_parts.len() < parts.len() {
            seen_parts.resize_with(parts.len(), PartSeen::default);
        }
        // The calls read in this snapshot: a call is read from its first part only (a message
        // has one part per call), or two parts naming the same call would take turns and
        // write their progress again on every poll of an unchanged snapshot.
        let mut calls = HashSet::new();
        for (i, part) in parts.iter().enumerate() {
            let Some(ty) = part.get("type").and_then(Value::as_str) else {
                continue;
            };
            let seen = &mut seen_parts[i];
            if seen.ty.as_deref() != Some(ty) {
                let generation = seen.generation.saturating_add(u32::from(seen.ty.is_some()));
                *seen = PartSeen {
                    ty: Some(ty.to_owned()),
                    generation,
                    ..PartSeen::default()
                };
            }
            let part_id = PartId(i, seen.generation);
            let ev = &self.events;
            match ty {
                "step-start" => {}
                "text" | "reasoning" => {
                    text_part(ev, seen, part_id, part, ty == "reasoning", &mut out)
                }
                _ if ty == "dynamic-tool" || ty.starts_with("tool-") => {
                    let name = match ty.strip_prefix("tool-") {
                        Some(name) => name,
                        None => part.get("toolName").and_then(Value::as_str).unwrap_or(""),
                    };
                    tool_part(ev, tools, &mut calls, part_id, name, part, &mut out)
                }
                _ if ty.starts_with("data-") => data_part(ev, seen, &ty[5..], part, &mut out),
                _ if !seen.emitted => {
                    seen.emitted = true;
                    out.push(once_part(ev, ty, part));
                }
                _ => {}
            }
        }
        out
    }
}

/// The log's name of part `.0` in its `.1`-th incarnation (`p{i}`, then `p{i}-{n}` after the
/// type at that index changed), formatted only when an event needs it.
#[derive(Clone, Copy, Debug)]
struct PartId(usize, u32);

impl std::fmt::Display for PartId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.1 {
            0 => write!(f, "p{}", self.0),
            n => write!(f, "p{}-{n}", self.0),
        }
    }
}

fn str_of<'a>(part: &'a Value, key: &str) -> Option<&'a str> {
    part.get(key).and_then(Value::as_str)
}

fn text_part(
    ev: &Events,
    seen: &mut PartSeen,
    part_id: PartId,
    part: &Value,
    reasoning: bool,
    out: &mut Vec<NewEvent>,
) {
    let text = str_of(part, "text").unwrap_or("");
    if text == seen.text {
        return;
    }
    if let Some(suffix) = text.strip_prefix(seen.text.as_str()) {
        out.push(ev.delta(&part_id.to_string(), suffix, reasoning));
        seen.text.push_str(suffix);
    } else {
        out.push(ev.text_replace(&part_id.to_string(), text, reasoning));
        text.clone_into(&mut seen.text);
    }
}

fn tool_part(
    ev: &Events,
    tools: &mut HashMap<String, ToolSeen>,
    calls: &mut HashSet<String>,
    part_id: PartId,
    name: &str,
    part: &Value,
    out: &mut Vec<NewEvent>,
) {
    let fallback;
    let call = match str_of(part, "toolCallId") {
        Some(c) => c,
        None => {
            fallback = part_id.to_string();
            &fallback
        }
    };
    if !calls.insert(call.to_owned()) {
        return;
    }
    if !tools.contains_key(call) {
        tools.insert(call.to_owned(), ToolSeen::default());
    }
    let Some(seen) = tools.get_mut(call) else {
        return;
    };
    if seen.done {
        return;
    }
    let state = str_of(part, "state");
    match state {
        Some("input-streaming") => return,
        None if part.get("input").is_none() => return,
        _ => {}
    }
    if !seen.started {
        seen.started = true;
        let input = part.get("input").cloned().unwrap_or(Value::Null);
        out.push(ev.tool_start(call, name, input));
    }
    let output = part.get("output").unwrap_or(&Value::Null);
    let preliminary = part.get("preliminary") == Some(&Value::Bool(true));
    if state == Some("output-available") && preliminary {
        // Not final: progress, each time it changes.
        if seen.progress.as_ref() != Some(output) {
            seen.progress = Some(output.clone());
            out.push(ev.raw(json!({
                "type": "tool_progress",
                "call_id": call,
                "parent_call_id": ev.root(),
                "root_call_id": ev.root(),
                "content": {"output": output, "preliminary": true},
            })));
        }
        return;
    }
    match state {
        Some("output-available") => {
            seen.done = true;
            out.push(ev.tool_end(call, output.clone()));
        }
        Some("output-error") => {
            seen.done = true;
            let text = str_of(part, "errorText").unwrap_or("the tool call failed");
            out.push(ev.tool_error(call, text));
        }
        Some("output-denied") => {
            seen.done = true;
            out.push(ev.tool_error(call, "the tool call was denied"));
        }
        _ => {}
    }
}

fn data_part(ev: &Events, seen: &mut PartSeen, name: &str, part: &Value, out: &mut Vec<NewEvent>) {
    let id = str_of(part, "id");
    let data = part.get("data").unwrap_or(&Value::Null);
    let fresh = match &seen.data {
        None => true,
        Some((prev_id, prev)) => id.is_some() && (prev_id.as_deref() != id || prev != data),
    };
    if fresh {
        out.push(ev.data(name, id, data.clone(), false));
        seen.data = Some((id.map(str::to_owned), data.clone()));
    }
}

/// A part emitted once per index: a source, a file, or (for other types, or when the fields
/// the log needs are missing) the part itself as opaque data.
fn once_part(ev: &Events, ty: &str, part: &Value) -> NewEvent {
    let s = |k| str_of(part, k);
    match ty {
        "source-url" => match s("url") {
            Some(url) => ev.source_url(s("sourceId").unwrap_or(""), url, s("title")),
            None => ev.ui_part(part.clone()),
        },
        "source-document" => ev.source_document(
            s("sourceId").unwrap_or(""),
            s("mediaType").unwrap_or(""),
            s("title").unwrap_or(""),
            s("filename"),
        ),
        "file" => match s("url") {
            Some(url) => ev.file(url, s("mediaType").unwrap_or("")),
            None => ev.ui_part(part.clone()),
        },
        _ => ev.ui_part(part.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn json_of(e: &NewEvent) -> Value {
        serde_json::from_slice(&e.data).expect("events are JSON")
    }

    fn types(events: &[NewEvent]) -> Vec<String> {
        events
            .iter()
            .map(|e| json_of(e)["type"].as_str().unwrap_or("").to_owned())
            .collect()
    }

    fn msg(parts: Value) -> Value {
        json!({"id": "a1", "role": "assistant", "parts": parts})
    }

    fn differ() -> SnapshotDiff {
        SnapshotDiff::new(Events::new("run_1"))
    }

    /// The text a reader rebuilds for part `p0` from deltas and replaces.
    fn rebuild(events: &[NewEvent], into: &mut String) {
        for e in events {
            let v = json_of(e);
            let content = v["content"].as_str().unwrap_or("");
            match v["type"].as_str() {
                Some("delta") => into.push_str(content),
                Some("text_replace") => content.clone_into(into),
                other => panic!("unexpected event {other:?}"),
            }
        }
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            ".{0,6}".prop_map(Value::String),
            prop::sample::select(vec![
                "text",
                "reasoning",
                "tool-x",
                "dynamic-tool",
                "data-p",
                "source-url",
                "source-document",
                "file",
                "step-start",
                "input-available",
                "output-available",
                "output-error",
                "input-streaming",
                "c1",
                "p1",
                "tool-",
            ])
            .prop_map(|s| json!(s)),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::vec(
                    (
                        prop::sample::select(vec![
                            "type",
                            "text",
                            "parts",
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
                        ]),
                        inner
                    ),
                    0..6
                )
                .prop_map(|kv| Value::Object(
                    kv.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
                )),
            ]
        })
    }

    proptest! {
        #[test]
        fn growing_text_is_sent_once_as_deltas(chunks in prop::collection::vec(".{0,8}", 1..24)) {
            let mut d = differ();
            let mut text = String::new();
            let mut sent = String::new();
            for c in &chunks {
                text.push_str(c);
                let evs = d.diff(&msg(json!([{"type": "text", "text": text}])));
                for e in &evs {
                    let v = json_of(e);
                    prop_assert_eq!(v["type"].as_str(), Some("delta"));
                    prop_assert_eq!(v["metadata"]["part_id"].as_str(), Some("p0"));
                    let piece = v["content"].as_str().unwrap();
                    prop_assert!(!piece.is_empty());
                    sent.push_str(piece);
                }
                prop_assert_eq!(&sent, &text);
            }
            prop_assert_eq!(sent.len(), text.len());
        }

        #[test]
        fn rewritten_text_is_reconstructible(
            ops in prop::collection::vec((any::<bool>(), ".{0,8}"), 1..24),
            reasoning in any::<bool>(),
        ) {
            let ty = if reasoning { "reasoning" } else { "text" };
            let mut d = differ();
            let mut text = String::new();
            let mut rebuilt = String::new();
            for (rewrite, s) in &ops {
                if *rewrite {
                    text = s.clone();
                } else {
                    text.push_str(s);
                }
                let evs = d.diff(&msg(json!([{"type": "step-start"}, {"type": ty, "text": text}])));
                for e in &evs {
                    let v = json_of(e);
                    prop_assert_eq!(v["metadata"]["part_id"].as_str(), Some("p1"));
                    prop_assert_eq!(v["metadata"]["reasoning"].as_bool().unwrap_or(false), reasoning);
                }
                rebuild(&evs, &mut rebuilt);
                prop_assert_eq!(&rebuilt, &text);
            }
        }

        #[test]
        fn any_json_never_panics(messages in prop::collection::vec(arb_json(), 1..6)) {
            let mut d = differ();
            for m in &messages {
                d.diff(m);
                d.diff(&json!({"parts": m}));
                d.diff(&json!({"parts": [m, m]}));
            }
        }

        #[test]
        fn a_restored_diff_goes_on_as_the_original(
            messages in prop::collection::vec(arb_json(), 1..8),
            cut in 0usize..8,
        ) {
            // A takeover: the state after `cut` snapshots, through JSON, goes on as if nothing
            // happened.
            let snapshots: Vec<Value> = messages
                .into_iter()
                .map(|m| match m {
                    Value::Array(_) => msg(m),
                    other => msg(json!([other])),
                })
                .collect();
            let (mut a, mut b) = (differ(), differ());
            for (i, m) in snapshots.iter().enumerate() {
                if i == cut {
                    let saved = serde_json::to_string(b.state()).unwrap();
                    let state: DiffState = serde_json::from_str(&saved).unwrap();
                    prop_assert_eq!(&state, b.state());
                    b = SnapshotDiff::restore(Events::new("run_1"), state);
                }
                let (x, y) = (a.diff(m), b.diff(m));
                let x: Vec<&[u8]> = x.iter().map(|e| &e.data[..]).collect();
                let y: Vec<&[u8]> = y.iter().map(|e| &e.data[..]).collect();
                prop_assert_eq!(x, y);
            }
        }

        #[test]
        fn parts_that_shrink_or_change_type_never_panic(
            sizes in prop::collection::vec((0usize..6, 0usize..3), 1..10),
        ) {
            let kinds = ["text", "reasoning", "data-x"];
            let mut d = differ();
            for (n, k) in sizes {
                let parts: Vec<Value> = (0..n)
                    .map(|i| json!({"type": kinds[(i + k) % 3], "text": format!("t{i}"), "data": i}))
                    .collect();
                d.diff(&msg(Value::Array(parts)));
            }
        }
    }

    #[test]
    fn a_restored_diff_continues_text_tools_and_data() {
        let snaps = [
            msg(json!([{"type": "text", "text": "He"}])),
            msg(json!([{"type": "text", "text": "Hello"},
                       {"type": "tool-search", "toolCallId": "c1", "state": "input-available",
                        "input": {"q": 1}},
                       {"type": "data-p", "id": "d1", "data": 1}])),
            msg(json!([{"type": "text", "text": "Hello there"},
                       {"type": "tool-search", "toolCallId": "c1", "state": "output-available",
                        "input": {"q": 1}, "output": 2},
                       {"type": "data-p", "id": "d1", "data": 2}])),
        ];
        let mut d = differ();
        d.diff(&snaps[0]);
        d.diff(&snaps[1]);
        let saved = serde_json::to_value(d.state()).unwrap();
        let mut r =
            SnapshotDiff::restore(Events::new("run_1"), serde_json::from_value(saved).unwrap());
        let evs = r.diff(&snaps[2]);
        assert_eq!(types(&evs), ["delta", "end", "data"]);
        assert_eq!(json_of(&evs[0])["content"], " there");
        assert!(r.diff(&snaps[2]).is_empty());
    }

    #[test]
    fn a_part_whose_type_changes_is_a_new_part() {
        let mut d = differ();
        d.diff(&msg(json!([{"type": "text", "text": "ab"}])));
        let evs = d.diff(&msg(json!([{"type": "reasoning", "text": "abc"}])));
        let v = json_of(&evs[0]);
        assert_eq!(
            (
                v["type"].as_str(),
                v["content"].as_str(),
                v["metadata"]["part_id"].as_str()
            ),
            (Some("delta"), Some("abc"), Some("p0-1"))
        );
        // Fewer parts: nothing retracted, nothing sent.
        assert!(d.diff(&msg(json!([]))).is_empty());
        assert!(d.diff(&json!({"parts": "nope"})).is_empty());
    }

    #[test]
    fn a_call_named_by_two_parts_is_read_from_the_first() {
        // Found by fuzzing (fuzz/regressions/poll/): the two parts' progress took turns, so an
        // unchanged snapshot wrote two `tool_progress` events on every poll.
        let mut d = differ();
        let part = |n: u32| {
            json!({"type": "tool-x", "toolCallId": "c1", "state": "output-available",
                   "input": {}, "output": n, "preliminary": true})
        };
        let snap = msg(json!([part(1), part(2)]));
        let evs = d.diff(&snap);
        assert_eq!(types(&evs), ["start", "tool_progress"]);
        assert_eq!(json_of(&evs[1])["content"]["output"], 1);
        assert!(d.diff(&snap).is_empty());
    }

    #[test]
    fn tools_start_once_and_end_once() {
        let mut d = differ();
        let tool = |state: &str, extra: Value| {
            let mut p = json!({"type": "tool-search", "toolCallId": "c1", "state": state});
            p.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            msg(json!([p]))
        };
        assert!(d
            .diff(&tool("input-streaming", json!({"input": {"q": "we"}})))
            .is_empty());
        let evs = d.diff(&tool("input-available", json!({"input": {"q": "weather"}})));
        let v = json_of(&evs[0]);
        assert_eq!(evs.len(), 1);
        assert_eq!(
            (
                v["type"].as_str(),
                v["call_id"].as_str(),
                v["parent_call_id"].as_str()
            ),
            (Some("start"), Some("c1"), Some("run_1"))
        );
        assert_eq!(
            v["content"],
            json!({"tool_name": "search", "input": {"q": "weather"}})
        );
        assert!(d
            .diff(&tool("input-available", json!({"input": {"q": "weather"}})))
            .is_empty());
        // Preliminary output: progress each time it changes, not final.
        let pre = |n| json!({"input": {}, "output": {"n": n}, "preliminary": true});
        let evs = d.diff(&tool("output-available", pre(1)));
        assert_eq!(types(&evs), ["tool_progress"]);
        assert_eq!(
            json_of(&evs[0])["content"],
            json!({"output": {"n": 1}, "preliminary": true})
        );
        assert!(d.diff(&tool("output-available", pre(1))).is_empty());
        assert_eq!(
            types(&d.diff(&tool("output-available", pre(2)))),
            ["tool_progress"]
        );
        let evs = d.diff(&tool("output-available", json!({"output": {"n": 3}})));
        assert_eq!(types(&evs), ["end"]);
        assert_eq!(json_of(&evs[0])["content"], json!({"output": {"n": 3}}));
        assert!(d
            .diff(&tool("output-available", json!({"output": {"n": 4}})))
            .is_empty());

        // A call first seen finished: start (input or null) then end; errors once.
        let mut d = differ();
        let evs = d.diff(&msg(json!([
            {"type": "dynamic-tool", "toolName": "calc", "toolCallId": "c2",
             "state": "output-available", "output": 4},
            {"type": "tool-fetch", "toolCallId": "c3", "state": "output-error",
             "input": {"u": 1}, "errorText": "boom"},
        ])));
        assert_eq!(types(&evs), ["start", "end", "start", "error"]);
        assert_eq!(
            json_of(&evs[0])["content"],
            json!({"tool_name": "calc", "input": null})
        );
        assert_eq!(json_of(&evs[3])["content"], json!({"message": "boom"}));
        assert!(d
            .diff(&msg(json!([
                {"type": "dynamic-tool", "toolName": "calc", "toolCallId": "c2",
                 "state": "output-available", "output": 4},
                {"type": "tool-fetch", "toolCallId": "c3", "state": "output-error",
                 "input": {"u": 1}, "errorText": "boom"},
            ])))
            .is_empty());
    }

    #[test]
    fn sources_files_and_unknown_parts_are_sent_once() {
        let mut d = differ();
        let parts = json!([
            {"type": "step-start"},
            {"type": "source-url", "sourceId": "s1", "url": "https://e.x", "title": "E"},
            {"type": "source-document", "sourceId": "s2", "mediaType": "application/pdf",
             "title": "Doc", "filename": "d.pdf"},
            {"type": "file", "mediaType": "image/png", "url": "data:image/png;base64,AA=="},
            {"type": "mystery", "x": 1},
            {"type": "source-url", "sourceId": "s3"},
        ]);
        let evs = d.diff(&msg(parts.clone()));
        assert_eq!(
            types(&evs),
            ["source", "source", "file", "ui_part", "ui_part"]
        );
        assert_eq!(
            json_of(&evs[0])["content"],
            json!({"source_type": "url", "source_id": "s1", "url": "https://e.x", "title": "E"})
        );
        assert_eq!(
            json_of(&evs[1])["content"],
            json!({"source_type": "document", "source_id": "s2", "media_type": "application/pdf",
                   "title": "Doc", "filename": "d.pdf"})
        );
        assert_eq!(
            json_of(&evs[2])["content"],
            json!({"url": "data:image/png;base64,AA==", "media_type": "image/png"})
        );
        assert_eq!(
            json_of(&evs[3])["content"],
            json!({"type": "mystery", "x": 1})
        );
        assert!(d.diff(&msg(parts)).is_empty());
    }

    #[test]
    fn data_parts_update_by_id_and_otherwise_once() {
        let mut d = differ();
        let snap = |pct: u32| {
            msg(json!([
                {"type": "data-progress", "id": "p1", "data": {"pct": pct}},
                {"type": "data-note", "data": {"n": pct}},
            ]))
        };
        let evs = d.diff(&snap(10));
        assert_eq!(types(&evs), ["data", "data"]);
        assert_eq!(
            json_of(&evs[0])["content"],
            json!({"name": "progress", "id": "p1", "data": {"pct": 10}})
        );
        assert_eq!(
            json_of(&evs[1])["content"],
            json!({"name": "note", "data": {"n": 10}})
        );
        assert!(d.diff(&snap(10)).is_empty());
        let evs = d.diff(&snap(50));
        assert_eq!(evs.len(), 1);
        assert_eq!(
            json_of(&evs[0])["content"],
            json!({"name": "progress", "id": "p1", "data": {"pct": 50}})
        );
    }
}
