//! Target `agentflow`: the AgentFlow payload reader (`sluice::agentflow::{parse, head,
//! terminal_of}`), which reads every event an AgentFlow backend sends, and the renderers that
//! read those payloads back from the log for clients.
//!
//! The input is read three ways: whole, line by line (one payload per line), and as choices
//! for a generated payload (an object with AgentFlow-ish keys and values, sometimes
//! corrupted). Properties:
//! - nothing panics (the accessors of a parsed event included);
//! - `head` agrees with `parse` on everything it reads (error included, message and all), and
//!   `terminal_of` with `terminal(parse(..))` (the relation of the proptest in
//!   `src/agentflow.rs`);
//! - the lines as a run's log, rendered as a UI-message stream: every chunk is a JSON object
//!   whose `type` is the chunk's; `finish`, `error` and `abort` chunks come only from a root
//!   terminal event, after which the renderer is finished and renders nothing; the fold's
//!   `write_json` is the JSON of its `message()`;
//! - rendered in the AgentFlow dialect, each shown event decodes back (with the SSE decoder) to
//!   its payload, with its seq as id.

use serde_json::{json, Value};
use sluice::agentflow::{self, head, parse, terminal, terminal_of, AfKind, Terminal};
use sluice::event::Event;
use sluice::render::agentflow::AgentFlowRenderer;
use sluice::render::chunk::Chunk;
use sluice::render::fold::Fold;
use sluice::render::ui::UiRenderer;
use sluice::sse::Decoder;

use super::engine::{Features, Target};
use super::gen::Gen;

pub const TARGET: Target = Target {
    name: "agentflow",
    check,
    dictionary: &[
        b"{\"type\":",
        b"\"type\"",
        b"\"delta\"",
        b"\"DELTA\"",
        b"\"end\"",
        b"\"End\"",
        b"\"error\"",
        b"\"start\"",
        b"\"tool_progress\"",
        b"\"artifact_completed\"",
        b"\"text_replace\"",
        b"\"call_id\"",
        b"\"parent_call_id\"",
        b"\"root_call_id\"",
        b"\"content\"",
        b"\"metadata\"",
        b"\"message\"",
        b"\"part_id\"",
        b"\"reasoning\"",
        b"\"typ\\u0065\"",
        b"\"\\ud800\"",
        b"\"\\ud83d\\ude00\"",
        b"\"\\u0000\"",
        b"null",
        b"true",
        b"{}",
        b"[]",
        b",",
        b":",
        b"\"",
        b"\\",
        b"\n",
        b"\xEF\xBB\xBF",
    ],
    max_len: 4096,
    must_see: &[
        "ok",
        "not-json",
        "not-object",
        "no-type",
        "terminal-completed",
        "terminal-error",
        "nested",
        "rendered-finish",
        "rendered-error",
        "rendered-tool",
    ],
};

fn check(input: &[u8], features: &mut Features) -> Result<(), String> {
    agrees(input, features)?;
    let lines: Vec<&[u8]> = input
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .collect();
    if lines.len() > 1 {
        for line in &lines {
            agrees(line, features)?;
        }
    }
    let generated = generate(input);
    agrees(&generated, features)?;
    render(&lines, features)?;
    Ok(())
}

/// `head` and `terminal_of` read `data` as `parse` and `terminal` do.
fn agrees(data: &[u8], features: &mut Features) -> Result<(), String> {
    let full = parse(data);
    match (head(data), &full) {
        (Ok(h), Ok(e)) => {
            features.add("ok");
            match &e.kind {
                AfKind::Other(_) => features.add("kind other"),
                k => features.add(&format!("kind {}", k.as_str())),
            }
            let same = |what: &str, a: Option<&str>, b: Option<&str>| {
                if a == b {
                    Ok(())
                } else {
                    Err(format!("head-vs-parse: {what}: head {a:?}, parse {b:?}"))
                }
            };
            same("kind", Some(h.kind().as_str()), Some(e.kind.as_str()))?;
            if h.kind() != e.kind {
                return Err(format!(
                    "head-vs-parse: kind {:?} vs {:?}",
                    h.kind(),
                    e.kind
                ));
            }
            for k in [
                e.kind.clone(),
                AfKind::End,
                AfKind::Error,
                AfKind::Delta,
                AfKind::Other(h.ty.to_string()),
                AfKind::Other(e.kind.as_str().to_ascii_uppercase()),
            ] {
                if h.is_kind(&k) != (e.kind == k) {
                    return Err(format!(
                        "head-vs-parse: is_kind({k:?}) is {} for kind {:?}",
                        h.is_kind(&k),
                        e.kind
                    ));
                }
            }
            same("call_id", h.call_id.as_deref(), e.call_id.as_deref())?;
            same(
                "parent_call_id",
                h.parent_call_id.as_deref(),
                e.parent_call_id.as_deref(),
            )?;
            same(
                "root_call_id",
                h.root_call_id.as_deref(),
                e.root_call_id.as_deref(),
            )?;
            if h.is_root() != e.is_root() {
                return Err(format!(
                    "head-vs-parse: is_root {} vs {}",
                    h.is_root(),
                    e.is_root()
                ));
            }
            if !e.is_root() {
                features.add("nested");
            }
            accessors(e, features)?;
        }
        (Err(a), Err(b)) => {
            if a != *b {
                return Err(format!(
                    "head-vs-parse: errors differ: head {a:?}, parse {b:?}"
                ));
            }
            features.add(match b {
                agentflow::AfError::NotJson(_) => "not-json",
                agentflow::AfError::NotObject => "not-object",
                agentflow::AfError::NoType => "no-type",
            });
        }
        (h, e) => return Err(format!("head-vs-parse: head {h:?} but parse {e:?}")),
    }
    let want = full.map(|e| terminal(&e));
    let got = terminal_of(data);
    if got != want {
        return Err(format!(
            "terminal_of: {got:?}, but terminal(parse(..)) is {want:?}"
        ));
    }
    match got {
        Ok(Some(Terminal::Completed)) => features.add("terminal-completed"),
        Ok(Some(Terminal::Error(_))) => features.add("terminal-error"),
        _ => {}
    }
    Ok(())
}

/// The accessors never panic, and agree with `terminal`.
fn accessors(e: &agentflow::AfEvent, features: &mut Features) -> Result<(), String> {
    let _ = (e.raw(), e.content(), e.metadata(), e.text(), e.part_id());
    let _ = (e.is_reasoning(), e.tool_name(), e.tool_input(), e.output());
    let _ = (e.final_text(), e.artifact_id(), e.sluice_status());
    if let Some(Terminal::Error(m)) = terminal(e) {
        if m != e.error_message() {
            return Err(format!(
                "accessors: terminal error {m:?} but error_message {:?}",
                e.error_message()
            ));
        }
    }
    if e.text().is_some() {
        features.add("text");
    }
    Ok(())
}

/// The lines as a run's log through both client renderers.
fn render(lines: &[&[u8]], features: &mut Features) -> Result<(), String> {
    let events: Vec<Event> = lines
        .iter()
        .enumerate()
        .map(|(i, l)| Event {
            seq: i as u64 + 1,
            data: l.to_vec().into(),
        })
        .collect();
    let mut ui = UiRenderer::new("msg_1".into());
    let mut fold = Fold::new("msg_1");
    let mut chunks = Vec::new();
    for ev in &events {
        chunks.clear();
        let was_finished = ui.is_finished();
        ui.render(ev, &mut chunks);
        fold.push(ev);
        let term = terminal_of(&ev.data).ok().flatten();
        if was_finished && !chunks.is_empty() {
            return Err(format!(
                "render: {} chunks after the run ended",
                chunks.len()
            ));
        }
        if !was_finished && ui.is_finished() != term.is_some() {
            return Err(format!(
                "render: finished is {} after an event whose terminal is {term:?}",
                ui.is_finished()
            ));
        }
        for c in &chunks {
            let json = check_chunk(c)?;
            let ending = matches!(c, Chunk::Finish | Chunk::Error { .. } | Chunk::Abort);
            if ending && term.is_none() {
                return Err(format!("render: {json} from a non-terminal event"));
            }
            features.add(&format!("rendered-{}", chunk_feature(c)));
        }
        if let (Some(Terminal::Error(m)), false) = (&term, was_finished) {
            let shown = chunks.iter().any(|c| match c {
                Chunk::Error { error_text } => error_text == m,
                Chunk::Abort => true,
                _ => false,
            });
            if !shown {
                return Err(format!("render: a root error {m:?} rendered as {chunks:?}"));
            }
        }
    }
    let mut bytes = Vec::new();
    fold.write_json(&mut bytes);
    let want = serde_json::to_vec(&fold.message()).map_err(|e| e.to_string())?;
    if bytes != want {
        return Err(format!(
            "fold: write_json gave {}, message() is {}",
            String::from_utf8_lossy(&bytes),
            String::from_utf8_lossy(&want)
        ));
    }

    // The AgentFlow dialect: each shown event decodes back to its payload.
    let r = AgentFlowRenderer { verbose: true };
    for ev in &events {
        let mut out = Vec::new();
        r.render_sse(ev, &mut out);
        let mut decoded = Vec::new();
        Decoder::new(usize::MAX)
            .feed(&out, &mut decoded)
            .map_err(|e| format!("agentflow-dialect: {e}"))?;
        let text = String::from_utf8_lossy(&ev.data)
            .replace("\r\n", "\n")
            .replace('\r', "\n");
        let seq = ev.seq.to_string();
        if decoded.len() != 1 || decoded[0].data != text || decoded[0].id.as_deref() != Some(&seq) {
            return Err(format!(
                "agentflow-dialect: event {} rendered as {:?}, decoded as {decoded:?}",
                ev.seq,
                String::from_utf8_lossy(&out)
            ));
        }
    }
    Ok(())
}

/// The chunk's JSON, checked: a JSON object whose `type` is the chunk's.
pub fn check_chunk(c: &Chunk) -> Result<String, String> {
    #[derive(serde::Deserialize)]
    struct TypeOnly {
        #[serde(rename = "type")]
        ty: String,
    }
    let json = c.to_json();
    let ty = match serde_json::from_str::<Value>(&json) {
        Ok(v) if v.is_object() => v.get("type").and_then(Value::as_str).map(str::to_owned),
        Ok(_) => None,
        // A payload may itself be as deep as serde_json's limit allows and a chunk wraps it;
        // JSON has no depth limit: check the syntax with a read that skips all but `type`
        // (skipped values have no depth limit).
        Err(e)
            if e.to_string().starts_with("recursion limit exceeded") && json.starts_with('{') =>
        {
            let t: TypeOnly = serde_json::from_str(&json)
                .map_err(|e| format!("render: chunk is not JSON ({e}): {json}"))?;
            Some(t.ty)
        }
        Err(e) => return Err(format!("render: chunk is not JSON ({e}): {json}")),
    };
    if ty.as_deref() != Some(&*c.type_name()) {
        return Err(format!(
            "render: chunk {json} is not an object of type {}",
            c.type_name()
        ));
    }
    Ok(json)
}

fn chunk_feature(c: &Chunk) -> &'static str {
    match c {
        Chunk::Finish => "finish",
        Chunk::Error { .. } | Chunk::Abort => "error",
        Chunk::ToolInputStart { .. }
        | Chunk::ToolInputAvailable { .. }
        | Chunk::ToolOutputAvailable { .. }
        | Chunk::ToolOutputError { .. } => "tool",
        Chunk::TextDelta { .. } | Chunk::ReasoningDelta { .. } => "text",
        Chunk::Data { .. } => "data",
        _ => "other",
    }
}

const KEYS: &[&str] = &[
    "type",
    "call_id",
    "parent_call_id",
    "root_call_id",
    "content",
    "metadata",
    "delta",
    "error",
    "message",
    "output",
    "result",
    "input",
    "tool_name",
    "part_id",
    "reasoning",
    "content_type",
    "artifact_id",
    "sluice_status",
    "Type",
];

const STRINGS: &[&str] = &[
    "start",
    "delta",
    "DELTA",
    "end",
    "END",
    "error",
    "Error",
    "tool_progress",
    "tool_input_delta",
    "artifact_started",
    "artifact_error",
    "text_replace",
    "source",
    "file",
    "data",
    "approval_required",
    "r",
    "t",
    "",
    "reasoning",
    "stopped",
];

/// A generated payload: an object, usually with a `type` and ids from a small pool (so that
/// ids often match), in compact or pretty JSON; sometimes cut or with a byte changed.
fn generate(input: &[u8]) -> Vec<u8> {
    // Start from the middle so that this view differs from the line view.
    let mut g = Gen::new(&input[input.len() / 2..]);
    let mut obj = serde_json::Map::new();
    if !g.chance(30) {
        obj.insert("type".into(), json!(g.string(STRINGS)));
    }
    let ids = [
        json!("r"),
        json!("t"),
        json!(""),
        json!(1),
        json!(1.0),
        Value::Null,
        json!(["r"]),
    ];
    for key in ["call_id", "parent_call_id", "root_call_id"] {
        if g.chance(128) {
            let v = if g.chance(200) {
                g.pick(&ids).clone()
            } else {
                g.value(1, KEYS, STRINGS)
            };
            obj.insert(key.into(), v);
        }
    }
    for _ in 0..g.below(4) {
        let k = g.string(KEYS);
        let v = g.value(3, KEYS, STRINGS);
        obj.insert(k, v);
    }
    let v = Value::Object(obj);
    let mut bytes = if g.chance(128) {
        serde_json::to_vec(&v)
    } else {
        serde_json::to_vec_pretty(&v)
    }
    .unwrap_or_default();
    match g.below(16) {
        0 if !bytes.is_empty() => {
            let at = g.below(bytes.len());
            bytes.truncate(at);
        }
        1 if !bytes.is_empty() => {
            let at = g.below(bytes.len());
            bytes[at] = g.byte();
        }
        2 => {
            let tail = *g.pick(&[&b" x"[..], b"{}", b"\n", b"\0"]);
            bytes.extend_from_slice(tail);
        }
        _ => {}
    }
    bytes
}
