//! Property tests of the renderers over generated, plausible AgentFlow runs: incremental fold
//! equals batch fold, every chunk has exactly its documented keys, the chunk sequence obeys
//! the AI SDK client's rules, every resume cursor yields exactly the missing suffix, and
//! rendering is deterministic.

use std::collections::HashSet;

use proptest::prelude::*;
use serde_json::{json, Value};

use super::chunk::Chunk;
use super::fold::{fold, Fold, MessageBuilder};
use super::ui::{Cursor, UiRenderer};
use crate::agentflow;
use crate::event::Event;

#[derive(Clone, Debug)]
enum Op {
    RootStart,
    Text {
        text: String,
        legacy: bool,
    },
    Reasoning {
        text: String,
        by_content_type: bool,
    },
    ToolStart {
        call: u8,
        name: String,
        input: Value,
    },
    ToolEnd {
        call: u8,
        output: Value,
    },
    ToolError {
        call: u8,
        message: String,
    },
    NestedDelta {
        call: u8,
        text: String,
    },
    Progress {
        which: u8,
        pct: u8,
    },
    Artifact {
        id: u8,
        status: u8,
    },
    Unknown {
        ty: String,
    },
    Garbage(Vec<u8>),
}

#[derive(Clone, Debug)]
enum Ending {
    End(Option<String>),
    Error(String),
    Synthetic(u8),
    Nothing,
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[a-z \"\\\\\n\r\t{}]{0,12}",
        Just("line1\nline2\r\n\"quoted\" \u{2028}\u{0}é😀".to_owned()),
        Just(String::new()),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<i64>().prop_map(Value::from),
        text().prop_map(Value::from),
        (text(), any::<bool>()).prop_map(|(s, b)| json!({"q": s, "flag": b, "n": [1, 2]})),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => Just(Op::RootStart),
        6 => (text(), any::<bool>()).prop_map(|(text, legacy)| Op::Text { text, legacy }),
        3 => (text(), any::<bool>())
            .prop_map(|(text, by_content_type)| Op::Reasoning { text, by_content_type }),
        2 => (0u8..4, "[a-z_]{1,8}", json_value())
            .prop_map(|(call, name, input)| Op::ToolStart { call, name, input }),
        2 => (0u8..4, json_value()).prop_map(|(call, output)| Op::ToolEnd { call, output }),
        1 => (0u8..4, text()).prop_map(|(call, message)| Op::ToolError { call, message }),
        1 => (0u8..4, text()).prop_map(|(call, text)| Op::NestedDelta { call, text }),
        1 => (0u8..4, any::<u8>()).prop_map(|(which, pct)| Op::Progress { which, pct }),
        2 => (0u8..3, 0u8..3).prop_map(|(id, status)| Op::Artifact { id, status }),
        1 => "[A-Za-z_]{1,10}".prop_map(|ty| Op::Unknown { ty }),
        1 => prop::collection::vec(any::<u8>(), 0..12).prop_map(Op::Garbage),
    ]
}

fn ending() -> impl Strategy<Value = Ending> {
    prop_oneof![
        prop::option::of(text()).prop_map(Ending::End),
        text().prop_map(Ending::Error),
        (0u8..3).prop_map(Ending::Synthetic),
        Just(Ending::Nothing),
    ]
}

fn nested(call: u8, kind: &str, mut v: Value) -> Value {
    v["type"] = kind.into();
    v["call_id"] = format!("c{call}").into();
    // Nested calls are recognised either way.
    if call % 2 == 0 {
        v["parent_call_id"] = "root".into();
    } else {
        v["root_call_id"] = "root".into();
    }
    v
}

fn payload(op: &Op) -> Vec<u8> {
    let v = match op {
        Op::RootStart => json!({"type":"start","call_id":"root","content":{"message":"hi"}}),
        Op::Text { text, legacy: true } => json!({"type":"DELTA","delta":text}),
        Op::Text { text, .. } => json!({"type":"delta","call_id":"root","content":text}),
        Op::Reasoning {
            text,
            by_content_type: true,
        } => json!({"type":"delta","content":text,"metadata":{"content_type":"reasoning"}}),
        Op::Reasoning { text, .. } => {
            json!({"type":"delta","content":text,"metadata":{"reasoning":true}})
        }
        Op::ToolStart { call, name, input } => nested(
            *call,
            "start",
            json!({"content":{"tool_name":name,"input":input}}),
        ),
        Op::ToolEnd { call, output } => nested(*call, "end", json!({"content":{"output":output}})),
        Op::ToolError { call, message } => {
            nested(*call, "error", json!({"content":{"message":message}}))
        }
        Op::NestedDelta { call, text } => nested(*call, "delta", json!({"content":text})),
        Op::Progress { which, pct } => {
            let ty = [
                "tool_progress",
                "TOOL_RESULT_DELTA",
                "artifact_progress",
                "artifact_result_delta",
            ][*which as usize % 4];
            json!({"type":ty,"call_id":"c1","content":{"pct":pct}})
        }
        Op::Artifact { id, status } => {
            let ty = ["artifact_started", "artifact_completed", "artifact_error"][*status as usize];
            json!({"type":ty,"content":{"artifact_id":format!("a{id}"),"v":status}})
        }
        Op::Unknown { ty } => json!({"type":ty,"x":[1]}),
        Op::Garbage(bytes) => return bytes.clone(),
    };
    v.to_string().into_bytes()
}

fn ending_payload(e: &Ending) -> Option<Vec<u8>> {
    Some(match e {
        Ending::End(Some(t)) => json!({"type":"end","call_id":"root","content":{"response":t}})
            .to_string()
            .into_bytes(),
        Ending::End(None) => br#"{"type":"END"}"#.to_vec(),
        Ending::Error(m) => json!({"type":"error","content":m}).to_string().into_bytes(),
        Ending::Synthetic(s) => {
            agentflow::synthetic_error(["error", "timeout", "stopped"][*s as usize], "gateway")
                .to_vec()
        }
        Ending::Nothing => return None,
    })
}

/// A run: ops, an optional ending, then (rarely) events that arrive after the ending.
pub(crate) fn run() -> impl Strategy<Value = Vec<Event>> {
    (
        any::<bool>(),
        prop::collection::vec(op(), 0..30),
        ending(),
        prop::collection::vec(op(), 0..3),
    )
        .prop_map(|(lead_start, ops, end, after)| {
            let mut payloads: Vec<Vec<u8>> = Vec::new();
            if lead_start {
                payloads.push(payload(&Op::RootStart));
            }
            payloads.extend(ops.iter().map(payload));
            if let Some(p) = ending_payload(&end) {
                payloads.push(p);
                payloads.extend(after.iter().map(payload));
            }
            payloads
                .into_iter()
                .enumerate()
                .map(|(i, data)| Event {
                    seq: i as u64 + 1,
                    data: data.into(),
                })
                .collect()
        })
}

fn full_sse(events: &[Event]) -> Vec<u8> {
    let mut r = UiRenderer::new("msg-1".into());
    let mut out = Vec::new();
    for ev in events {
        r.render_sse(ev, &mut out);
    }
    out
}

fn all_chunks(events: &[Event]) -> Vec<Chunk> {
    let mut r = UiRenderer::new("msg-1".into());
    let mut out = Vec::new();
    for ev in events {
        r.render(ev, &mut out);
    }
    out
}

/// One SSE frame of our output: its id, its data, and where it ends in the stream.
pub(crate) struct Frame {
    pub id: String,
    pub data: String,
    pub end: usize,
}

/// Split the renderer's SSE output into frames, checking the exact framing on the way.
pub(crate) fn frames(sse: &[u8]) -> Result<Vec<Frame>, TestCaseError> {
    let s = std::str::from_utf8(sse).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < s.len() {
        let rest = &s[pos..];
        let len = rest
            .find("\n\n")
            .ok_or_else(|| TestCaseError::fail("unterminated frame"))?;
        let frame = &rest[..len];
        let (id_line, data_line) = frame
            .split_once('\n')
            .ok_or_else(|| TestCaseError::fail(format!("frame without two lines: {frame:?}")))?;
        let id = id_line
            .strip_prefix("id: ")
            .ok_or_else(|| TestCaseError::fail("no id line"))?;
        let data = data_line
            .strip_prefix("data: ")
            .ok_or_else(|| TestCaseError::fail("no data line"))?;
        prop_assert!(!data.contains('\n') && !data.contains('\r'));
        pos += len + 2;
        out.push(Frame {
            id: id.to_owned(),
            data: data.to_owned(),
            end: pos,
        });
    }
    Ok(out)
}

/// The keys each chunk type may carry: (required, optional).
fn allowed_keys(ty: &str) -> Option<(&'static [&'static str], &'static [&'static str])> {
    Some(match ty {
        "start" => (&["type", "messageId"], &[]),
        "start-step" | "finish-step" | "finish" | "abort" => (&["type"], &[]),
        "text-start" | "text-end" | "reasoning-start" | "reasoning-end" => (&["type", "id"], &[]),
        "text-delta" | "reasoning-delta" => (&["type", "id", "delta"], &[]),
        "tool-input-start" => (&["type", "toolCallId", "providerExecuted", "toolName"], &[]),
        "tool-input-available" => (
            &[
                "type",
                "toolCallId",
                "providerExecuted",
                "toolName",
                "input",
            ],
            &[],
        ),
        "tool-output-available" => (&["type", "toolCallId", "providerExecuted", "output"], &[]),
        "tool-output-error" => (
            &["type", "toolCallId", "providerExecuted", "errorText"],
            &[],
        ),
        "error" => (&["type", "errorText"], &[]),
        t if t.starts_with("data-") && t.len() > 5 => (&["type", "data"], &["id", "transient"]),
        _ => return None,
    })
}

const STRING_KEYS: [&str; 7] = [
    "messageId",
    "id",
    "delta",
    "toolCallId",
    "toolName",
    "errorText",
    "type",
];

fn check_chunk_json(json: &str) -> Result<Value, TestCaseError> {
    let v: Value = serde_json::from_str(json)
        .map_err(|e| TestCaseError::fail(format!("bad JSON {json:?}: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| TestCaseError::fail("not an object"))?;
    let ty = obj.get("type").and_then(Value::as_str).unwrap_or("");
    let (required, optional) =
        allowed_keys(ty).ok_or_else(|| TestCaseError::fail(format!("unknown type {ty:?}")))?;
    for k in required {
        prop_assert!(obj.contains_key(*k), "{} lacks {}", json, k);
    }
    for k in obj.keys() {
        prop_assert!(
            required.contains(&k.as_str()) || optional.contains(&k.as_str()),
            "{} has extra key {}",
            json,
            k
        );
        if STRING_KEYS.contains(&k.as_str()) {
            prop_assert!(obj[k].is_string(), "{} key {} not a string", json, k);
        }
    }
    if let Some(t) = obj.get("transient") {
        prop_assert_eq!(t, &Value::Bool(true));
    }
    Ok(v)
}

/// Read a chunk back from its JSON (the test's independent decoder of the wire format).
fn chunk_from_json(v: &Value) -> Option<Chunk> {
    let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
    let ty = v.get("type")?.as_str()?;
    Some(match ty {
        "start" => Chunk::Start {
            message_id: s("messageId")?,
        },
        "start-step" => Chunk::StartStep,
        "finish-step" => Chunk::FinishStep,
        "finish" => Chunk::Finish,
        "abort" => Chunk::Abort,
        "text-start" => Chunk::TextStart { id: s("id")? },
        "text-delta" => Chunk::TextDelta {
            id: s("id")?,
            delta: s("delta")?,
        },
        "text-end" => Chunk::TextEnd { id: s("id")? },
        "reasoning-start" => Chunk::ReasoningStart { id: s("id")? },
        "reasoning-delta" => Chunk::ReasoningDelta {
            id: s("id")?,
            delta: s("delta")?,
        },
        "reasoning-end" => Chunk::ReasoningEnd { id: s("id")? },
        "tool-input-start" => Chunk::ToolInputStart {
            tool_call_id: s("toolCallId")?,
            tool_name: s("toolName")?,
        },
        "tool-input-available" => Chunk::ToolInputAvailable {
            tool_call_id: s("toolCallId")?,
            tool_name: s("toolName")?,
            input: v.get("input")?.clone(),
        },
        "tool-output-available" => Chunk::ToolOutputAvailable {
            tool_call_id: s("toolCallId")?,
            output: v.get("output")?.clone(),
        },
        "tool-output-error" => Chunk::ToolOutputError {
            tool_call_id: s("toolCallId")?,
            error_text: s("errorText")?,
        },
        "error" => Chunk::Error {
            error_text: s("errorText")?,
        },
        _ => Chunk::Data {
            name: ty.strip_prefix("data-")?.to_owned(),
            id: s("id"),
            data: v.get("data")?.clone(),
            transient: v.get("transient").and_then(Value::as_bool).unwrap_or(false),
        },
    })
}

/// The AI SDK client's rules for a chunk sequence (what would throw or be dropped).
fn check_client_rules(chunks: &[Value]) -> Result<(), TestCaseError> {
    let mut open_text = HashSet::new();
    let mut open_reasoning = HashSet::new();
    let mut used_ids = HashSet::new();
    let mut tools = HashSet::new();
    let mut ended = false;
    let mut finish_step_seen = false;
    for (i, c) in chunks.iter().enumerate() {
        let ty = c["type"].as_str().unwrap_or("");
        prop_assert!(!ended, "chunk {} after the end: {}", i, c);
        match i {
            0 => prop_assert_eq!(c, &json!({"type":"start","messageId":"msg-1"})),
            1 => prop_assert_eq!(ty, "start-step"),
            _ => prop_assert!(ty != "start" && ty != "start-step", "second {}", ty),
        }
        let id = c["id"].as_str().unwrap_or("").to_owned();
        let call = c["toolCallId"].as_str().unwrap_or("").to_owned();
        match ty {
            "start" | "start-step" => {}
            "text-start" | "reasoning-start" => {
                prop_assert!(used_ids.insert(id.clone()), "part id reused: {}", id);
                prop_assert!(
                    open_text.is_empty() && open_reasoning.is_empty(),
                    "two open parts"
                );
                if ty == "text-start" {
                    open_text.insert(id);
                } else {
                    open_reasoning.insert(id);
                }
            }
            "text-delta" => prop_assert!(open_text.contains(&id), "text-delta for {}", id),
            "reasoning-delta" => {
                prop_assert!(open_reasoning.contains(&id), "reasoning-delta for {}", id)
            }
            "text-end" => prop_assert!(open_text.remove(&id), "text-end for {}", id),
            "reasoning-end" => prop_assert!(open_reasoning.remove(&id), "reasoning-end for {}", id),
            "tool-input-start" | "tool-input-available" => {
                prop_assert!(open_text.is_empty() && open_reasoning.is_empty());
                tools.insert(call);
            }
            "tool-output-available" | "tool-output-error" => {
                prop_assert!(tools.contains(&call), "{} before input for {}", ty, call)
            }
            "finish-step" => {
                prop_assert!(!finish_step_seen, "second finish-step");
                prop_assert!(open_text.is_empty() && open_reasoning.is_empty());
                finish_step_seen = true;
            }
            "finish" => {
                prop_assert!(finish_step_seen, "finish without finish-step");
                ended = true;
            }
            "error" | "abort" => {
                prop_assert!(open_text.is_empty() && open_reasoning.is_empty());
                ended = true;
            }
            _ => prop_assert!(ty.starts_with("data-"), "unexpected {}", ty),
        }
        if ty != "finish" && ty != "finish-step" {
            prop_assert!(!finish_step_seen, "{} after finish-step", ty);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// (a) The fold after n events equals the batch fold of the first n events.
    #[test]
    fn incremental_fold_equals_batch_fold(events in run()) {
        let mut f = Fold::new("msg-1");
        prop_assert_eq!(f.message(), fold("msg-1", &events[..0]));
        for n in 1..=events.len() {
            f.push(&events[n - 1]);
            prop_assert_eq!(f.message(), fold("msg-1", &events[..n]));
            // And both equal the builder applied to the prefix's chunks, put together by hand.
            let mut b = MessageBuilder::new("other");
            for c in all_chunks(&events[..n]) {
                b.apply(&c);
            }
            prop_assert_eq!(f.message(), b.message());
        }
        let m = f.message();
        prop_assert_eq!(&m["id"], "msg-1");
        prop_assert_eq!(&m["role"], "assistant");
    }

    /// (b) Every chunk is one-line JSON with exactly the keys its type allows, both from
    /// `write_json` and as framed on the wire; (c) the sequence obeys the client's rules.
    #[test]
    fn chunks_are_valid_and_ordered(events in run()) {
        let chunks = all_chunks(&events);
        let mut values = Vec::new();
        for c in &chunks {
            let v = check_chunk_json(&c.to_json())?;
            prop_assert_eq!(v["type"].as_str(), Some(&*c.type_name()));
            prop_assert_eq!(chunk_from_json(&v), Some(c.clone()));
            values.push(v);
        }
        let wire = frames(&full_sse(&events))?;
        prop_assert_eq!(wire.len(), chunks.len());
        for (f, v) in wire.iter().zip(&values) {
            prop_assert_eq!(&check_chunk_json(&f.data)?, v);
        }
        check_client_rules(&values)?;
        if !events.is_empty() {
            prop_assert!(values.len() >= 2);
        }
        // A run that ended says so last.
        let ended = events.iter().any(|e| {
            agentflow::parse(&e.data).ok().and_then(|a| agentflow::terminal(&a)).is_some()
        });
        let last = values.last().and_then(|v| v["type"].as_str()).unwrap_or("");
        prop_assert_eq!(ended, matches!(last, "finish" | "error" | "abort"));
    }

    /// (d) For every cursor in the full render (`k`, and each `k.j`), resuming yields exactly
    /// the rest of the full output: no duplicate, no gap.
    #[test]
    fn resume_from_any_cursor_yields_the_exact_suffix(events in run()) {
        let full = full_sse(&events);
        let wire = frames(&full)?;
        // Ids: event k's chunks are k.1 … k.(m-1), then k; in order.
        let mut i = 0;
        while i < wire.len() {
            let seq = wire[i].id.split('.').next().unwrap_or("").to_owned();
            let m = wire[i..].iter().take_while(|f| f.id.split('.').next() == Some(&seq)).count();
            for j in 1..m {
                prop_assert_eq!(&wire[i + j - 1].id, &format!("{seq}.{j}"));
            }
            prop_assert_eq!(&wire[i + m - 1].id, &seq);
            i += m;
        }
        let resume = |cursor: Cursor| {
            let mut r = UiRenderer::new("msg-1".into());
            let mut out = Vec::new();
            for ev in &events {
                r.render_sse_after(ev, cursor, &mut out);
            }
            out
        };
        for f in &wire {
            let cursor = Cursor::parse(&f.id).ok_or_else(|| TestCaseError::fail("bad id"))?;
            prop_assert_eq!(cursor.to_string(), f.id.clone());
            prop_assert_eq!(resume(cursor), full[f.end..].to_vec(), "cursor {}", f.id);
        }
        // Every plain event cursor, including events that rendered nothing, 0 and past the end.
        for k in 0..=events.len() as u64 + 1 {
            let from = wire
                .iter()
                .position(|f| f.id.split('.').next().and_then(|s| s.parse::<u64>().ok()) > Some(k))
                .map_or(full.len(), |p| if p == 0 { 0 } else { wire[p - 1].end });
            prop_assert_eq!(resume(Cursor::after(k)), full[from..].to_vec(), "cursor {}", k);
        }
    }

    /// (e) Rendering and folding are deterministic.
    #[test]
    fn rendering_is_deterministic(events in run()) {
        prop_assert_eq!(full_sse(&events), full_sse(&events));
        prop_assert_eq!(fold("msg-1", &events), fold("msg-1", &events));
        prop_assert_eq!(all_chunks(&events), all_chunks(&events));
    }

    /// Arbitrary bytes never panic the parser or the renderer.
    #[test]
    fn arbitrary_payloads_never_panic(data in prop::collection::vec(any::<u8>(), 0..64)) {
        let _ = agentflow::parse(&data);
        let ev = Event { seq: 1, data: data.into() };
        let mut out = Vec::new();
        UiRenderer::new("m".into()).render_sse(&ev, &mut out);
        prop_assert!(!out.is_empty());
    }
}
