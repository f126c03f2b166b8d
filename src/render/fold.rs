//! Folding a run's log into its assistant `UIMessage`, for snapshots (`getConversation`).
//!
//! [`MessageBuilder`] applies UI-message chunks the way the AI SDK v5 client does
//! (`processUIMessageStream` in ai 5.0.x; research/protocols.md §1.3, §1.5), so a snapshot equals
//! what a `useChat` client holds after reading the same stream, but for the two departures its
//! documentation lists (Sluice's `data-text-replace` is applied; streamed tool input shows once
//! it parses whole). [`fold`] and [`Fold`] run the
//! log through [`UiRenderer`] and that builder: the snapshot at `lastSeq = n` is the fold of
//! events `1..n` (DESIGN §3 invariant 2), whether computed at once or as events arrive.
//!
//! Where a real client would throw (a delta for an unknown part, output for an unknown tool
//! call), the builder ignores the chunk instead; the renderer never emits such sequences.

use std::collections::HashMap;

use serde::Serialize;
use serde_json::{Map, Value};

use super::chunk::Chunk;
use super::ui::UiRenderer;
use crate::event::Event;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ToolState {
    InputStreaming,
    InputAvailable,
    OutputAvailable,
    OutputError,
}

impl ToolState {
    fn as_str(self) -> &'static str {
        match self {
            ToolState::InputStreaming => "input-streaming",
            ToolState::InputAvailable => "input-available",
            ToolState::OutputAvailable => "output-available",
            ToolState::OutputError => "output-error",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Part {
    StepStart,
    Text {
        /// The chunk id it was opened with (not part of the snapshot).
        id: String,
        text: String,
        done: bool,
    },
    SourceUrl {
        source_id: String,
        url: String,
        title: Option<String>,
    },
    SourceDocument {
        source_id: String,
        media_type: String,
        title: String,
        filename: Option<String>,
    },
    File {
        media_type: String,
        url: String,
    },
    Reasoning {
        id: String,
        text: String,
        done: bool,
    },
    Tool {
        /// `tool-<name>`, fixed when the part is created.
        ty: String,
        call_id: String,
        state: ToolState,
        input: Option<Value>,
        output: Option<Value>,
        error_text: Option<String>,
    },
    Data {
        /// `data-<name>`.
        ty: String,
        id: Option<String>,
        data: Value,
    },
}

fn streaming_str(done: bool) -> &'static str {
    if done {
        "done"
    } else {
        "streaming"
    }
}

fn streaming_state(done: bool) -> Value {
    Value::from(streaming_str(done))
}

/// Append `v` as JSON, as `serde_json` writes it inside a `Value` (same escaping, same
/// numbers). Writing a string or a `Value` into a `Vec` cannot fail; should it ever, the field
/// reads `null` rather than the process panicking.
fn put<T: Serialize + ?Sized>(out: &mut Vec<u8>, v: &T) {
    let mark = out.len();
    if serde_json::to_writer(&mut *out, v).is_err() {
        out.truncate(mark);
        out.extend_from_slice(b"null");
    }
}

/// Writes one JSON object, compact as `serde_json` writes a `Value`. Members must come in the
/// order `serde_json::Map` iterates them: sorted by key, as this crate is built without
/// serde_json's `preserve_order` feature. Keys must need no escaping.
struct Obj<'a> {
    out: &'a mut Vec<u8>,
    first: bool,
}

impl<'a> Obj<'a> {
    fn new(out: &'a mut Vec<u8>) -> Obj<'a> {
        out.push(b'{');
        Obj { out, first: true }
    }

    /// Start the member `k`; its value is to be written into the returned buffer.
    fn key(&mut self, k: &str) -> &mut Vec<u8> {
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        self.out.push(b'"');
        self.out.extend_from_slice(k.as_bytes());
        self.out.extend_from_slice(b"\":");
        self.out
    }

    fn str(&mut self, k: &str, v: &str) {
        put(self.key(k), v);
    }

    fn value(&mut self, k: &str, v: &Value) {
        put(self.key(k), v);
    }

    fn end(self) {
        self.out.push(b'}');
    }
}

impl Part {
    fn to_value(&self) -> Value {
        let mut m = Map::new();
        match self {
            Part::StepStart => {
                m.insert("type".into(), "step-start".into());
            }
            Part::Text { text, done, .. } => {
                m.insert("type".into(), "text".into());
                m.insert("text".into(), text.as_str().into());
                m.insert("state".into(), streaming_state(*done));
            }
            Part::SourceUrl {
                source_id,
                url,
                title,
            } => {
                m.insert("type".into(), "source-url".into());
                m.insert("sourceId".into(), source_id.as_str().into());
                m.insert("url".into(), url.as_str().into());
                if let Some(t) = title {
                    m.insert("title".into(), t.as_str().into());
                }
            }
            Part::SourceDocument {
                source_id,
                media_type,
                title,
                filename,
            } => {
                m.insert("type".into(), "source-document".into());
                m.insert("sourceId".into(), source_id.as_str().into());
                m.insert("mediaType".into(), media_type.as_str().into());
                m.insert("title".into(), title.as_str().into());
                if let Some(f) = filename {
                    m.insert("filename".into(), f.as_str().into());
                }
            }
            Part::File { media_type, url } => {
                m.insert("type".into(), "file".into());
                m.insert("mediaType".into(), media_type.as_str().into());
                m.insert("url".into(), url.as_str().into());
            }
            Part::Reasoning { id, text, done } => {
                m.insert("type".into(), "reasoning".into());
                m.insert("id".into(), id.as_str().into());
                m.insert("text".into(), text.as_str().into());
                m.insert("state".into(), streaming_state(*done));
            }
            Part::Tool {
                ty,
                call_id,
                state,
                input,
                output,
                error_text,
            } => {
                m.insert("type".into(), ty.as_str().into());
                m.insert("toolCallId".into(), call_id.as_str().into());
                m.insert("state".into(), state.as_str().into());
                // Every tool runs on the backend (see render::chunk).
                m.insert("providerExecuted".into(), true.into());
                if let Some(input) = input {
                    m.insert("input".into(), input.clone());
                }
                if let Some(output) = output {
                    m.insert("output".into(), output.clone());
                }
                if let Some(e) = error_text {
                    m.insert("errorText".into(), e.as_str().into());
                }
            }
            Part::Data { ty, id, data } => {
                m.insert("type".into(), ty.as_str().into());
                if let Some(id) = id {
                    m.insert("id".into(), id.as_str().into());
                }
                m.insert("data".into(), data.clone());
            }
        }
        Value::Object(m)
    }

    /// Append `serde_json::to_vec(&self.to_value())`: the same members, in sorted key order.
    fn write_json(&self, out: &mut Vec<u8>) {
        let mut o = Obj::new(out);
        match self {
            Part::StepStart => o.str("type", "step-start"),
            Part::Text { text, done, .. } => {
                o.str("state", streaming_str(*done));
                o.str("text", text);
                o.str("type", "text");
            }
            Part::SourceUrl {
                source_id,
                url,
                title,
            } => {
                o.str("sourceId", source_id);
                if let Some(t) = title {
                    o.str("title", t);
                }
                o.str("type", "source-url");
                o.str("url", url);
            }
            Part::SourceDocument {
                source_id,
                media_type,
                title,
                filename,
            } => {
                if let Some(f) = filename {
                    o.str("filename", f);
                }
                o.str("mediaType", media_type);
                o.str("sourceId", source_id);
                o.str("title", title);
                o.str("type", "source-document");
            }
            Part::File { media_type, url } => {
                o.str("mediaType", media_type);
                o.str("type", "file");
                o.str("url", url);
            }
            Part::Reasoning { id, text, done } => {
                o.str("id", id);
                o.str("state", streaming_str(*done));
                o.str("text", text);
                o.str("type", "reasoning");
            }
            Part::Tool {
                ty,
                call_id,
                state,
                input,
                output,
                error_text,
            } => {
                if let Some(e) = error_text {
                    o.str("errorText", e);
                }
                if let Some(input) = input {
                    o.value("input", input);
                }
                if let Some(output) = output {
                    o.value("output", output);
                }
                o.key("providerExecuted").extend_from_slice(b"true");
                o.str("state", state.as_str());
                o.str("toolCallId", call_id);
                o.str("type", ty);
            }
            Part::Data { ty, id, data } => {
                o.value("data", data);
                if let Some(id) = id {
                    o.str("id", id);
                }
                o.str("type", ty);
            }
        }
        o.end();
    }
}

/// Builds an assistant `UIMessage` from UI-message chunks with the AI SDK v5 client's rules:
///
/// - `start` sets the id; `start-step` pushes `{type:"step-start"}`; `finish-step` forgets the
///   open text and reasoning parts; `finish`, `error`, `abort` and transient data add nothing;
/// - `text-start` pushes `{type:"text", text:"", state:"streaming"}`, deltas append, `text-end`
///   sets `state:"done"`; reasoning alike, with the part's `id` (as ai 5.0.277 keeps it);
/// - `tool-input-start` / `-available` create or update `{type:"tool-<name>", toolCallId,
///   state, input?}` in the current step; `tool-output-available` / `-error` update the call's
///   part (`output` / `errorText`);
/// - `tool-input-delta` accumulates the input's text; the part's `input` is that text parsed,
///   once it parses as an object or array (the client shows a partial parse meanwhile);
/// - `source-url`, `source-document` and `file` push their parts;
/// - non-transient `data-<name>` replaces the `data` of the part with the same type and id, or
///   is pushed as `{type, id?, data}`.
///
/// One addition to the client's rules: the transient `data-text-replace` `{id, text}` that
/// Sluice sends when a backend rewrote a text or reasoning part (see `render::ui`) sets that
/// part's text, so snapshots show the text as rewritten.
///
/// Cost: the client finds parts by scanning the message; the builder keeps indexes instead
/// (below), so applying a chunk costs a few hash lookups (plus a binary search over the parts
/// of one tool call id), not a scan of the parts, and folding `n` chunks is linear in `n`
/// rather than quadratic (many tool calls or keyed data parts). Only the work a chunk asks for
/// remains proportional to its content: appending deltas, parsing streamed tool input once a
/// piece closes it, cloning data. `tests::indexed_equals_linear_*` check the indexes against a
/// copy of the scanning implementation; there is deliberately no timing test (to measure, fold
/// e.g. 20,000 tool calls or keyed data parts with and without the indexes in a benchmark).
#[derive(Clone, Debug)]
pub struct MessageBuilder {
    id: String,
    // Parts are only ever pushed or updated in place, never removed or reordered, so an index
    // into `parts` stays valid once recorded; the indexes below rely on that.
    parts: Vec<Part>,
    active_text: HashMap<String, usize>,
    active_reasoning: HashMap<String, usize>,
    /// Input text of tool calls whose input streams.
    tool_input_text: HashMap<String, String>,
    /// Index of the current step's first part: just after the last `step-start`, or 0.
    step_start: usize,
    /// Tool call id → indices of its tool parts, ascending.
    tools: HashMap<String, Vec<usize>>,
    /// Data part name (after `data-`) → id → index of the part with that type and id.
    data: HashMap<String, HashMap<String, usize>>,
    /// Text or reasoning chunk id → index of the latest part opened with it.
    texts: HashMap<String, usize>,
}

impl MessageBuilder {
    /// An empty assistant message with this id (a `start` chunk may change it).
    pub fn new(message_id: &str) -> MessageBuilder {
        MessageBuilder {
            id: message_id.to_owned(),
            parts: Vec::new(),
            active_text: HashMap::new(),
            active_reasoning: HashMap::new(),
            tool_input_text: HashMap::new(),
            step_start: 0,
            tools: HashMap::new(),
            data: HashMap::new(),
            texts: HashMap::new(),
        }
    }

    /// The message id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Index of the first tool part for `call_id` in the current step (after the last
    /// `step-start`).
    fn tool_in_step(&self, call_id: &str) -> Option<usize> {
        let found = self.tools.get(call_id)?;
        found
            .get(found.partition_point(|&i| i < self.step_start))
            .copied()
    }

    /// The client's `getToolInvocation`: the current step first, then the whole message from
    /// the end.
    fn tool_anywhere(&self, call_id: &str) -> Option<usize> {
        self.tool_in_step(call_id)
            .or_else(|| self.tools.get(call_id)?.last().copied())
    }

    /// Record a tool's outcome on its part (anywhere in the message); without a part, nothing.
    fn tool_outcome(
        &mut self,
        call_id: &str,
        new_state: ToolState,
        new_output: Option<Value>,
        new_error: Option<String>,
    ) {
        if let Some(i) = self.tool_anywhere(call_id) {
            if let Part::Tool {
                state,
                output,
                error_text,
                ..
            } = &mut self.parts[i]
            {
                *state = new_state;
                *output = new_output;
                *error_text = new_error;
            }
        }
    }

    /// Create or update (in the current step) the tool part of `call_id`, as the client's
    /// `updateToolPart` does for `tool-input-*` chunks.
    fn tool_input(&mut self, call_id: &str, name: &str, state: ToolState, input: Option<&Value>) {
        match self.tool_in_step(call_id) {
            Some(i) => {
                if let Part::Tool {
                    state: s,
                    input: inp,
                    output,
                    error_text,
                    ..
                } = &mut self.parts[i]
                {
                    *s = state;
                    *inp = input.cloned();
                    *output = None;
                    *error_text = None;
                }
            }
            None => {
                let i = self.parts.len();
                match self.tools.get_mut(call_id) {
                    Some(found) => found.push(i),
                    None => {
                        self.tools.insert(call_id.to_owned(), vec![i]);
                    }
                }
                self.parts.push(Part::Tool {
                    ty: format!("tool-{name}"),
                    call_id: call_id.to_owned(),
                    state,
                    input: input.cloned(),
                    output: None,
                    error_text: None,
                });
            }
        }
    }

    /// Apply one chunk.
    pub fn apply(&mut self, chunk: &Chunk) {
        match chunk {
            Chunk::Start { message_id } => self.id.clone_from(message_id),
            Chunk::StartStep => {
                self.parts.push(Part::StepStart);
                self.step_start = self.parts.len();
            }
            Chunk::FinishStep => {
                self.active_text.clear();
                self.active_reasoning.clear();
            }
            Chunk::Finish | Chunk::Error { .. } | Chunk::Abort => {}
            Chunk::TextStart { id } => {
                let i = self.parts.len();
                self.active_text.insert(id.clone(), i);
                self.texts.insert(id.clone(), i);
                self.parts.push(Part::Text {
                    id: id.clone(),
                    text: String::new(),
                    done: false,
                });
            }
            Chunk::TextDelta { id, delta } => {
                if let Some(&i) = self.active_text.get(id) {
                    if let Some(Part::Text { text, .. }) = self.parts.get_mut(i) {
                        text.push_str(delta);
                    }
                }
            }
            Chunk::TextEnd { id } => {
                if let Some(i) = self.active_text.remove(id) {
                    if let Some(Part::Text { done, .. }) = self.parts.get_mut(i) {
                        *done = true;
                    }
                }
            }
            Chunk::ReasoningStart { id } => {
                let i = self.parts.len();
                self.active_reasoning.insert(id.clone(), i);
                self.texts.insert(id.clone(), i);
                self.parts.push(Part::Reasoning {
                    id: id.clone(),
                    text: String::new(),
                    done: false,
                });
            }
            Chunk::ReasoningDelta { id, delta } => {
                if let Some(&i) = self.active_reasoning.get(id) {
                    if let Some(Part::Reasoning { text, .. }) = self.parts.get_mut(i) {
                        text.push_str(delta);
                    }
                }
            }
            Chunk::ReasoningEnd { id } => {
                if let Some(i) = self.active_reasoning.remove(id) {
                    if let Some(Part::Reasoning { done, .. }) = self.parts.get_mut(i) {
                        *done = true;
                    }
                }
            }
            Chunk::ToolInputStart {
                tool_call_id,
                tool_name,
            } => self.tool_input(tool_call_id, tool_name, ToolState::InputStreaming, None),
            Chunk::ToolInputDelta {
                tool_call_id,
                input_text_delta,
            } => {
                let text = self
                    .tool_input_text
                    .entry(tool_call_id.clone())
                    .or_default();
                text.push_str(input_text_delta);
                // Only a piece that closes an object or array can complete the input: parsing
                // after every piece would be quadratic in the input's length.
                let closes = input_text_delta.trim_end().ends_with(['}', ']']);
                let parsed = closes
                    .then(|| serde_json::from_str::<Value>(text).ok())
                    .flatten();
                if let Some(parsed) = parsed {
                    if let Some(i) = self.tool_anywhere(tool_call_id) {
                        if let Part::Tool { input, .. } = &mut self.parts[i] {
                            *input = Some(parsed);
                        }
                    }
                }
            }
            Chunk::SourceUrl {
                source_id,
                url,
                title,
            } => self.parts.push(Part::SourceUrl {
                source_id: source_id.clone(),
                url: url.clone(),
                title: title.clone(),
            }),
            Chunk::SourceDocument {
                source_id,
                media_type,
                title,
                filename,
            } => self.parts.push(Part::SourceDocument {
                source_id: source_id.clone(),
                media_type: media_type.clone(),
                title: title.clone(),
                filename: filename.clone(),
            }),
            Chunk::File { url, media_type } => self.parts.push(Part::File {
                media_type: media_type.clone(),
                url: url.clone(),
            }),
            Chunk::ToolInputAvailable {
                tool_call_id,
                tool_name,
                input,
            } => self.tool_input(
                tool_call_id,
                tool_name,
                ToolState::InputAvailable,
                Some(input),
            ),
            Chunk::ToolOutputAvailable {
                tool_call_id,
                output,
            } => self.tool_outcome(
                tool_call_id,
                ToolState::OutputAvailable,
                Some(output.clone()),
                None,
            ),
            Chunk::ToolOutputError {
                tool_call_id,
                error_text,
            } => self.tool_outcome(
                tool_call_id,
                ToolState::OutputError,
                None,
                Some(error_text.clone()),
            ),
            Chunk::Data {
                name,
                id,
                data,
                transient,
            } => {
                if *transient {
                    if name == "text-replace" {
                        self.replace_text(data);
                    }
                    return;
                }
                let existing = id
                    .as_deref()
                    .and_then(|id| self.data.get(name.as_str())?.get(id).copied());
                match existing {
                    Some(i) => {
                        if let Part::Data { data: d, .. } = &mut self.parts[i] {
                            d.clone_from(data);
                        }
                    }
                    None => {
                        let i = self.parts.len();
                        if let Some(id) = id {
                            match self.data.get_mut(name.as_str()) {
                                Some(ids) => {
                                    ids.insert(id.clone(), i);
                                }
                                None => {
                                    self.data
                                        .insert(name.clone(), HashMap::from([(id.clone(), i)]));
                                }
                            }
                        }
                        self.parts.push(Part::Data {
                            ty: format!("data-{name}"),
                            id: id.clone(),
                            data: data.clone(),
                        });
                    }
                }
            }
        }
    }

    /// Apply Sluice's `data-text-replace` `{id, text}`: the text or reasoning part opened with
    /// chunk id `id` now reads `text`.
    fn replace_text(&mut self, data: &Value) {
        let (Some(id), Some(new)) = (
            data.get("id").and_then(Value::as_str),
            data.get("text").and_then(Value::as_str),
        ) else {
            return;
        };
        let Some(&i) = self.texts.get(id) else {
            return;
        };
        if let Part::Text { id: pid, text, .. } | Part::Reasoning { id: pid, text, .. } =
            &mut self.parts[i]
        {
            debug_assert_eq!(pid.as_str(), id);
            new.clone_into(text);
        }
    }

    /// The message so far: `{"id", "role":"assistant", "parts":[…]}`.
    ///
    /// This clones every part into a `Value` tree; to send the message, [`Self::write_json`]
    /// writes the same JSON without building one.
    pub fn message(&self) -> Value {
        let mut m = Map::new();
        m.insert("id".into(), self.id.as_str().into());
        m.insert("role".into(), "assistant".into());
        m.insert(
            "parts".into(),
            Value::Array(self.parts.iter().map(Part::to_value).collect()),
        );
        Value::Object(m)
    }

    /// Append the message as JSON: exactly the bytes of `serde_json::to_vec(&self.message())`,
    /// without building the `Value`.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        let mut o = Obj::new(out);
        o.str("id", &self.id);
        let out = o.key("parts");
        out.push(b'[');
        for (n, part) in self.parts.iter().enumerate() {
            if n > 0 {
                out.push(b',');
            }
            part.write_json(out);
        }
        out.push(b']');
        o.str("role", "assistant");
        o.end();
    }
}

/// A fold that grows as events arrive: after pushing events `1..n`, [`Fold::message`] equals
/// [`fold`] of those events.
#[derive(Debug)]
pub struct Fold {
    renderer: UiRenderer,
    builder: MessageBuilder,
    scratch: Vec<Chunk>,
    last_seq: u64,
}

impl Fold {
    /// An empty fold for the assistant message `message_id`.
    pub fn new(message_id: &str) -> Fold {
        Fold {
            renderer: UiRenderer::new(message_id.to_owned()),
            builder: MessageBuilder::new(message_id),
            scratch: Vec::new(),
            last_seq: 0,
        }
    }

    /// Apply the run's next event.
    pub fn push(&mut self, ev: &Event) {
        self.renderer.render(ev, &mut self.scratch);
        for chunk in self.scratch.drain(..) {
            self.builder.apply(&chunk);
        }
        self.last_seq = ev.seq;
    }

    /// The seq of the last event pushed (0 if none).
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// The message so far.
    pub fn message(&self) -> Value {
        self.builder.message()
    }

    /// Append the message so far as JSON: the bytes of `serde_json::to_vec(&self.message())`
    /// (see [`MessageBuilder::write_json`]).
    pub fn write_json(&self, out: &mut Vec<u8>) {
        self.builder.write_json(out);
    }

    /// The builder (for callers that want more than the message).
    pub fn builder(&self) -> &MessageBuilder {
        &self.builder
    }
}

/// The assistant `UIMessage` for a run's events (in order, from seq 1).
pub fn fold<'a>(message_id: &str, events: impl IntoIterator<Item = &'a Event>) -> Value {
    let mut f = Fold::new(message_id);
    for ev in events {
        f.push(ev);
    }
    f.message()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn s(x: &str) -> String {
        x.to_owned()
    }

    fn build(chunks: &[Chunk]) -> Value {
        let mut b = MessageBuilder::new("init");
        for c in chunks {
            b.apply(c);
        }
        b.message()
    }

    fn parts(chunks: &[Chunk]) -> Value {
        build(chunks)["parts"].clone()
    }

    #[test]
    fn start_sets_id_and_step_start_pushes() {
        let m = build(&[
            Chunk::Start {
                message_id: s("m1"),
            },
            Chunk::StartStep,
        ]);
        assert_eq!(
            m,
            json!({"id":"m1","role":"assistant","parts":[{"type":"step-start"}]})
        );
        assert_eq!(
            build(&[]),
            json!({"id":"init","role":"assistant","parts":[]})
        );
    }

    #[test]
    fn text_parts() {
        let t = |x: &str| Chunk::TextDelta {
            id: s("t"),
            delta: s(x),
        };
        let streaming = parts(&[Chunk::TextStart { id: s("t") }, t("a"), t("b")]);
        assert_eq!(
            streaming,
            json!([{"type":"text","text":"ab","state":"streaming"}])
        );
        let done = parts(&[
            Chunk::TextStart { id: s("t") },
            t("a"),
            Chunk::TextEnd { id: s("t") },
            t("ignored after end"),
        ]);
        assert_eq!(done, json!([{"type":"text","text":"a","state":"done"}]));
        // A delta for an unknown id is ignored (a client would throw).
        assert_eq!(parts(&[t("x")]), json!([]));
    }

    #[test]
    fn reasoning_parts_keep_their_id() {
        let p = parts(&[
            Chunk::ReasoningStart { id: s("r") },
            Chunk::ReasoningDelta {
                id: s("r"),
                delta: s("hm"),
            },
            Chunk::ReasoningEnd { id: s("r") },
        ]);
        assert_eq!(
            p,
            json!([{"type":"reasoning","id":"r","text":"hm","state":"done"}])
        );
    }

    #[test]
    fn finish_step_forgets_open_parts() {
        let p = parts(&[
            Chunk::TextStart { id: s("t") },
            Chunk::FinishStep,
            Chunk::TextDelta {
                id: s("t"),
                delta: s("lost"),
            },
            Chunk::TextEnd { id: s("t") },
        ]);
        assert_eq!(p, json!([{"type":"text","text":"","state":"streaming"}]));
    }

    #[test]
    fn tool_lifecycle() {
        let start = Chunk::ToolInputStart {
            tool_call_id: s("c"),
            tool_name: s("search"),
        };
        let avail = Chunk::ToolInputAvailable {
            tool_call_id: s("c"),
            tool_name: s("search"),
            input: json!({"q":1}),
        };
        assert_eq!(
            parts(std::slice::from_ref(&start)),
            json!([{"type":"tool-search","toolCallId":"c","providerExecuted":true,"state":"input-streaming"}])
        );
        assert_eq!(
            parts(&[start.clone(), avail.clone()]),
            json!([{"type":"tool-search","toolCallId":"c","providerExecuted":true,"state":"input-available","input":{"q":1}}])
        );
        let ok = Chunk::ToolOutputAvailable {
            tool_call_id: s("c"),
            output: json!("sunny"),
        };
        assert_eq!(
            parts(&[start.clone(), avail.clone(), ok]),
            json!([{"type":"tool-search","toolCallId":"c","providerExecuted":true,"state":"output-available",
                    "input":{"q":1},"output":"sunny"}])
        );
        let err = Chunk::ToolOutputError {
            tool_call_id: s("c"),
            error_text: s("boom"),
        };
        assert_eq!(
            parts(&[start, avail, err]),
            json!([{"type":"tool-search","toolCallId":"c","providerExecuted":true,"state":"output-error",
                    "input":{"q":1},"errorText":"boom"}])
        );
    }

    #[test]
    fn tool_input_null_is_kept_and_output_needs_a_part() {
        let p = parts(&[
            Chunk::ToolOutputAvailable {
                tool_call_id: s("ghost"),
                output: json!(1),
            },
            Chunk::ToolInputAvailable {
                tool_call_id: s("c"),
                tool_name: s("x"),
                input: Value::Null,
            },
        ]);
        assert_eq!(
            p,
            json!([{"type":"tool-x","toolCallId":"c","providerExecuted":true,"state":"input-available","input":null}])
        );
    }

    #[test]
    fn tool_input_updates_within_the_step_only() {
        let start = |name: &str| Chunk::ToolInputStart {
            tool_call_id: s("c"),
            tool_name: s(name),
        };
        // Same step: updated in place (its type stays).
        assert_eq!(
            parts(&[start("a"), start("b")]),
            json!([{"type":"tool-a","toolCallId":"c","providerExecuted":true,"state":"input-streaming"}])
        );
        // New step: a second part; output then goes to the one in the current step.
        let p = parts(&[
            start("a"),
            Chunk::StartStep,
            start("b"),
            Chunk::ToolOutputError {
                tool_call_id: s("c"),
                error_text: s("e"),
            },
        ]);
        assert_eq!(
            p,
            json!([{"type":"tool-a","toolCallId":"c","providerExecuted":true,"state":"input-streaming"},
                   {"type":"step-start"},
                   {"type":"tool-b","toolCallId":"c","providerExecuted":true,"state":"output-error","errorText":"e"}])
        );
        // Output for a call in an earlier step finds it from the end.
        let p = parts(&[
            start("a"),
            Chunk::StartStep,
            Chunk::ToolOutputAvailable {
                tool_call_id: s("c"),
                output: json!(2),
            },
        ]);
        assert_eq!(
            p[0],
            json!({"type":"tool-a","toolCallId":"c","providerExecuted":true,"state":"output-available","output":2})
        );
    }

    #[test]
    fn data_parts() {
        let d = |name: &str, id: Option<&str>, v: Value, transient: bool| Chunk::Data {
            name: s(name),
            id: id.map(s),
            data: v,
            transient,
        };
        let p = parts(&[
            d("artifact", Some("a"), json!(1), false),
            d("progress", None, json!("t"), true),
            d("artifact", Some("b"), json!(2), false),
            d("other", Some("a"), json!(3), false),
            d("artifact", Some("a"), json!(4), false),
            d("note", None, json!(5), false),
            d("note", None, json!(6), false),
        ]);
        assert_eq!(
            p,
            json!([
                {"type":"data-artifact","id":"a","data":4},
                {"type":"data-artifact","id":"b","data":2},
                {"type":"data-other","id":"a","data":3},
                {"type":"data-note","data":5},
                {"type":"data-note","data":6}
            ])
        );
    }

    #[test]
    fn terminal_chunks_add_no_parts() {
        let p = parts(&[
            Chunk::Finish,
            Chunk::Abort,
            Chunk::Error { error_text: s("x") },
            Chunk::FinishStep,
        ]);
        assert_eq!(p, json!([]));
    }

    fn evs(vs: &[Value]) -> Vec<Event> {
        vs.iter()
            .enumerate()
            .map(|(i, v)| Event {
                seq: i as u64 + 1,
                data: v.to_string().into(),
            })
            .collect()
    }

    #[test]
    fn fold_of_a_whole_run() {
        let events = evs(&[
            json!({"type":"start","call_id":"r"}),
            json!({"type":"delta","content":"plan","metadata":{"reasoning":true}}),
            json!({"type":"delta","content":"Looking"}),
            json!({"type":"start","call_id":"t","parent_call_id":"r","content":{"name":"web","arguments":{"q":"x"}}}),
            json!({"type":"tool_progress","call_id":"t","content":{"pct":50}}),
            json!({"type":"end","call_id":"t","parent_call_id":"r","content":{"result":[1]}}),
            json!({"type":"artifact_started","content":{"artifact_id":"a"}}),
            json!({"type":"delta","content":" done"}),
            json!({"type":"artifact_completed","content":{"artifact_id":"a","v":2}}),
            json!({"type":"end","content":"Looking done"}),
        ]);
        let m = fold("msg", &events);
        assert_eq!(
            m,
            json!({"id":"msg","role":"assistant","parts":[
                {"type":"step-start"},
                {"type":"reasoning","id":"reasoning-2","text":"plan","state":"done"},
                {"type":"text","text":"Looking","state":"done"},
                {"type":"tool-web","toolCallId":"t","providerExecuted":true,"state":"output-available","input":{"q":"x"},"output":[1]},
                {"type":"data-artifact","id":"a","data":{"artifactId":"a","status":"completed","callId":null,"content":{"artifact_id":"a","v":2}}},
                {"type":"text","text":" done","state":"done"}
            ]})
        );
        let mut f = Fold::new("msg");
        for (n, ev) in events.iter().enumerate() {
            f.push(ev);
            assert_eq!(f.message(), fold("msg", &events[..=n]));
            assert_eq!(f.last_seq(), ev.seq);
        }
    }

    #[test]
    fn fold_with_final_text_only_and_errors() {
        let m = fold(
            "m",
            &evs(&[
                json!({"type":"start"}),
                json!({"type":"end","content":{"output":"Hi"}}),
            ]),
        );
        assert_eq!(
            m["parts"],
            json!([{"type":"step-start"},{"type":"text","text":"Hi","state":"done"}])
        );
        let stopped = crate::agentflow::synthetic_error("stopped", "stopped by user");
        let mut events = evs(&[json!({"type":"delta","content":"part"})]);
        events.push(Event {
            seq: 2,
            data: stopped,
        });
        let m = fold("m", &events);
        assert_eq!(
            m["parts"],
            json!([{"type":"step-start"},{"type":"text","text":"part","state":"done"}])
        );
        assert_eq!(
            fold("m", &[]),
            json!({"id":"m","role":"assistant","parts":[]})
        );
    }

    #[test]
    fn replacements_rewrite_the_snapshot_text() {
        let b = crate::ingest::events::Events::new("r");
        let evs: Vec<Event> = [
            b.delta("p1", "The answer is 4", false),
            b.delta("p1", "2", false),
            b.text_replace("p1", "The answer is forty-two", false),
            b.delta("p1", ".", false),
            b.delta("p2", "think", true),
            b.text_replace("p2", "thought", true),
            b.end(),
        ]
        .into_iter()
        .enumerate()
        .map(|(i, e)| e.at(i as u64 + 1))
        .collect();
        let m = fold("m", &evs);
        assert_eq!(
            m["parts"],
            json!([
                {"type":"step-start"},
                {"type":"text","text":"The answer is forty-two.","state":"done"},
                {"type":"reasoning","id":"reasoning-5","text":"thought","state":"done"}
            ])
        );
        // A replacement naming no sent part, or without text, changes nothing.
        let mut bld = MessageBuilder::new("m");
        bld.apply(&Chunk::TextStart { id: s("t") });
        for data in [json!({"id":"zz","text":"x"}), json!({"id":"t"}), json!(3)] {
            bld.apply(&Chunk::Data {
                name: s("text-replace"),
                id: None,
                data,
                transient: true,
            });
        }
        assert_eq!(
            bld.message()["parts"],
            json!([{"type":"text","text":"","state":"streaming"}])
        );
    }

    /// The builder as it was before its indexes (verbatim but for its name): the reference
    /// the indexed builder must agree with.
    #[derive(Clone, Debug)]
    struct LinearBuilder {
        id: String,
        parts: Vec<Part>,
        active_text: HashMap<String, usize>,
        active_reasoning: HashMap<String, usize>,
        /// Input text of tool calls whose input streams.
        tool_input_text: HashMap<String, String>,
    }

    impl LinearBuilder {
        /// An empty assistant message with this id (a `start` chunk may change it).
        pub fn new(message_id: &str) -> LinearBuilder {
            LinearBuilder {
                id: message_id.to_owned(),
                parts: Vec::new(),
                active_text: HashMap::new(),
                active_reasoning: HashMap::new(),
                tool_input_text: HashMap::new(),
            }
        }

        /// Index of the first tool part for `call_id` in the current step (after the last
        /// `step-start`).
        fn tool_in_step(&self, call_id: &str) -> Option<usize> {
            let step = self
                .parts
                .iter()
                .rposition(|p| matches!(p, Part::StepStart))
                .map_or(0, |i| i + 1);
            (step..self.parts.len()).find(|&i| is_tool(&self.parts[i], call_id))
        }

        /// The client's `getToolInvocation`: the current step first, then the whole message from
        /// the end.
        fn tool_anywhere(&self, call_id: &str) -> Option<usize> {
            self.tool_in_step(call_id)
                .or_else(|| self.parts.iter().rposition(|p| is_tool(p, call_id)))
        }

        /// Record a tool's outcome on its part (anywhere in the message); without a part, nothing.
        fn tool_outcome(
            &mut self,
            call_id: &str,
            new_state: ToolState,
            new_output: Option<Value>,
            new_error: Option<String>,
        ) {
            if let Some(i) = self.tool_anywhere(call_id) {
                if let Part::Tool {
                    state,
                    output,
                    error_text,
                    ..
                } = &mut self.parts[i]
                {
                    *state = new_state;
                    *output = new_output;
                    *error_text = new_error;
                }
            }
        }

        /// Create or update (in the current step) the tool part of `call_id`, as the client's
        /// `updateToolPart` does for `tool-input-*` chunks.
        fn tool_input(
            &mut self,
            call_id: &str,
            name: &str,
            state: ToolState,
            input: Option<&Value>,
        ) {
            match self.tool_in_step(call_id) {
                Some(i) => {
                    if let Part::Tool {
                        state: s,
                        input: inp,
                        output,
                        error_text,
                        ..
                    } = &mut self.parts[i]
                    {
                        *s = state;
                        *inp = input.cloned();
                        *output = None;
                        *error_text = None;
                    }
                }
                None => self.parts.push(Part::Tool {
                    ty: format!("tool-{name}"),
                    call_id: call_id.to_owned(),
                    state,
                    input: input.cloned(),
                    output: None,
                    error_text: None,
                }),
            }
        }

        /// Apply one chunk.
        pub fn apply(&mut self, chunk: &Chunk) {
            match chunk {
                Chunk::Start { message_id } => self.id.clone_from(message_id),
                Chunk::StartStep => self.parts.push(Part::StepStart),
                Chunk::FinishStep => {
                    self.active_text.clear();
                    self.active_reasoning.clear();
                }
                Chunk::Finish | Chunk::Error { .. } | Chunk::Abort => {}
                Chunk::TextStart { id } => {
                    self.active_text.insert(id.clone(), self.parts.len());
                    self.parts.push(Part::Text {
                        id: id.clone(),
                        text: String::new(),
                        done: false,
                    });
                }
                Chunk::TextDelta { id, delta } => {
                    if let Some(&i) = self.active_text.get(id) {
                        if let Some(Part::Text { text, .. }) = self.parts.get_mut(i) {
                            text.push_str(delta);
                        }
                    }
                }
                Chunk::TextEnd { id } => {
                    if let Some(i) = self.active_text.remove(id) {
                        if let Some(Part::Text { done, .. }) = self.parts.get_mut(i) {
                            *done = true;
                        }
                    }
                }
                Chunk::ReasoningStart { id } => {
                    self.active_reasoning.insert(id.clone(), self.parts.len());
                    self.parts.push(Part::Reasoning {
                        id: id.clone(),
                        text: String::new(),
                        done: false,
                    });
                }
                Chunk::ReasoningDelta { id, delta } => {
                    if let Some(&i) = self.active_reasoning.get(id) {
                        if let Some(Part::Reasoning { text, .. }) = self.parts.get_mut(i) {
                            text.push_str(delta);
                        }
                    }
                }
                Chunk::ReasoningEnd { id } => {
                    if let Some(i) = self.active_reasoning.remove(id) {
                        if let Some(Part::Reasoning { done, .. }) = self.parts.get_mut(i) {
                            *done = true;
                        }
                    }
                }
                Chunk::ToolInputStart {
                    tool_call_id,
                    tool_name,
                } => self.tool_input(tool_call_id, tool_name, ToolState::InputStreaming, None),
                Chunk::ToolInputDelta {
                    tool_call_id,
                    input_text_delta,
                } => {
                    let text = self
                        .tool_input_text
                        .entry(tool_call_id.clone())
                        .or_default();
                    text.push_str(input_text_delta);
                    // Only a piece that closes an object or array can complete the input: parsing
                    // after every piece would be quadratic in the input's length.
                    let closes = input_text_delta.trim_end().ends_with(['}', ']']);
                    let parsed = closes
                        .then(|| serde_json::from_str::<Value>(text).ok())
                        .flatten();
                    if let Some(i) = self.tool_anywhere(tool_call_id) {
                        if let Part::Tool { input, .. } = &mut self.parts[i] {
                            if parsed.is_some() {
                                *input = parsed;
                            }
                        }
                    }
                }
                Chunk::SourceUrl {
                    source_id,
                    url,
                    title,
                } => self.parts.push(Part::SourceUrl {
                    source_id: source_id.clone(),
                    url: url.clone(),
                    title: title.clone(),
                }),
                Chunk::SourceDocument {
                    source_id,
                    media_type,
                    title,
                    filename,
                } => self.parts.push(Part::SourceDocument {
                    source_id: source_id.clone(),
                    media_type: media_type.clone(),
                    title: title.clone(),
                    filename: filename.clone(),
                }),
                Chunk::File { url, media_type } => self.parts.push(Part::File {
                    media_type: media_type.clone(),
                    url: url.clone(),
                }),
                Chunk::ToolInputAvailable {
                    tool_call_id,
                    tool_name,
                    input,
                } => self.tool_input(
                    tool_call_id,
                    tool_name,
                    ToolState::InputAvailable,
                    Some(input),
                ),
                Chunk::ToolOutputAvailable {
                    tool_call_id,
                    output,
                } => self.tool_outcome(
                    tool_call_id,
                    ToolState::OutputAvailable,
                    Some(output.clone()),
                    None,
                ),
                Chunk::ToolOutputError {
                    tool_call_id,
                    error_text,
                } => self.tool_outcome(
                    tool_call_id,
                    ToolState::OutputError,
                    None,
                    Some(error_text.clone()),
                ),
                Chunk::Data {
                    name,
                    id,
                    data,
                    transient,
                } => {
                    if *transient {
                        if name == "text-replace" {
                            self.replace_text(data);
                        }
                        return;
                    }
                    let existing = id.as_deref().and_then(|id| {
                        self.parts.iter_mut().find(|p| {
                            matches!(p, Part::Data { ty, id: Some(pid), .. }
                                if pid == id && ty.strip_prefix("data-") == Some(name.as_str()))
                        })
                    });
                    match existing {
                        Some(Part::Data { data: d, .. }) => *d = data.clone(),
                        _ => self.parts.push(Part::Data {
                            ty: format!("data-{name}"),
                            id: id.clone(),
                            data: data.clone(),
                        }),
                    }
                }
            }
        }

        /// Apply Sluice's `data-text-replace` `{id, text}`: the text or reasoning part opened with
        /// chunk id `id` now reads `text`.
        fn replace_text(&mut self, data: &Value) {
            let (Some(id), Some(new)) = (
                data.get("id").and_then(Value::as_str),
                data.get("text").and_then(Value::as_str),
            ) else {
                return;
            };
            let part = self.parts.iter_mut().rev().find(|p| match p {
                Part::Text { id: pid, .. } | Part::Reasoning { id: pid, .. } => pid == id,
                _ => false,
            });
            if let Some(Part::Text { text, .. } | Part::Reasoning { text, .. }) = part {
                new.clone_into(text);
            }
        }

        /// The message so far: `{"id", "role":"assistant", "parts":[…]}`.
        pub fn message(&self) -> Value {
            let mut m = Map::new();
            m.insert("id".into(), self.id.as_str().into());
            m.insert("role".into(), "assistant".into());
            m.insert(
                "parts".into(),
                Value::Array(self.parts.iter().map(Part::to_value).collect()),
            );
            Value::Object(m)
        }
    }

    fn is_tool(p: &Part, call_id: &str) -> bool {
        matches!(p, Part::Tool { call_id: c, .. } if c == call_id)
    }
    mod indexed {
        use proptest::prelude::*;
        use proptest::strategy::Union;

        use super::super::*;
        use super::{s, LinearBuilder};
        use crate::render::proptests::run;
        use crate::render::ui::UiRenderer;
        use serde_json::json;

        fn name(prefix: &'static str, n: u8) -> impl Strategy<Value = String> {
            (0..n).prop_map(move |i| format!("{prefix}{i}"))
        }

        fn text() -> impl Strategy<Value = String> {
            prop_oneof![
                3 => "[a-z ]{0,6}",
                1 => any::<String>(),
                1 => Just("\"q\"\\\n\u{0}\u{2028}é😀".to_owned()),
            ]
        }

        fn json_value() -> impl Strategy<Value = Value> {
            prop_oneof![
                Just(Value::Null),
                any::<i64>().prop_map(Value::from),
                any::<f64>().prop_map(Value::from),
                text().prop_map(Value::from),
                (text(), any::<bool>()).prop_map(|(s, b)| json!({"z": s, "a": [b, 1.5], "m": {}})),
            ]
        }

        /// Pieces of streamed tool input: some close an object or array, some parse.
        fn input_piece() -> impl Strategy<Value = String> {
            prop::sample::select(vec![
                "{", "}", "\"k\":1", ",", "[", "]", "[1]", "{}  ", "2", "",
            ])
            .prop_map(str::to_owned)
        }

        /// Chunks over small pools of ids, so call ids repeat across steps, data parts repeat
        /// their (name, id), and replacements find (or miss) text and reasoning parts.
        fn chunk() -> impl Strategy<Value = Chunk> {
            let call = || name("c", 4);
            let part = || name("t", 4);
            let tool = || name("", 2);
            Union::new_weighted(vec![
                (1, name("m", 2).prop_map(|message_id| Chunk::Start { message_id }).boxed()),
                (4, Just(Chunk::StartStep).boxed()),
                (2, Just(Chunk::FinishStep).boxed()),
                (1, Just(Chunk::Finish).boxed()),
                (1, Just(Chunk::Abort).boxed()),
                (1, text().prop_map(|error_text| Chunk::Error { error_text }).boxed()),
                (3, part().prop_map(|id| Chunk::TextStart { id }).boxed()),
                (3, (part(), text()).prop_map(|(id, delta)| Chunk::TextDelta { id, delta }).boxed()),
                (2, part().prop_map(|id| Chunk::TextEnd { id }).boxed()),
                (2, part().prop_map(|id| Chunk::ReasoningStart { id }).boxed()),
                (
                    2,
                    (part(), text())
                        .prop_map(|(id, delta)| Chunk::ReasoningDelta { id, delta })
                        .boxed(),
                ),
                (1, part().prop_map(|id| Chunk::ReasoningEnd { id }).boxed()),
                (
                    5,
                    (call(), tool())
                        .prop_map(|(tool_call_id, tool_name)| Chunk::ToolInputStart {
                            tool_call_id,
                            tool_name,
                        })
                        .boxed(),
                ),
                (
                    4,
                    (call(), input_piece())
                        .prop_map(|(tool_call_id, input_text_delta)| Chunk::ToolInputDelta {
                            tool_call_id,
                            input_text_delta,
                        })
                        .boxed(),
                ),
                (
                    5,
                    (call(), tool(), json_value())
                        .prop_map(|(tool_call_id, tool_name, input)| {
                            Chunk::ToolInputAvailable {
                                tool_call_id,
                                tool_name,
                                input,
                            }
                        })
                        .boxed(),
                ),
                (
                    4,
                    (call(), json_value())
                        .prop_map(|(tool_call_id, output)| Chunk::ToolOutputAvailable {
                            tool_call_id,
                            output,
                        })
                        .boxed(),
                ),
                (
                    2,
                    (call(), text())
                        .prop_map(|(tool_call_id, error_text)| Chunk::ToolOutputError {
                            tool_call_id,
                            error_text,
                        })
                        .boxed(),
                ),
                (
                    1,
                    (text(), text(), prop::option::of(text()))
                        .prop_map(|(source_id, url, title)| Chunk::SourceUrl {
                            source_id,
                            url,
                            title,
                        })
                        .boxed(),
                ),
                (
                    1,
                    (text(), text(), text(), prop::option::of(text()))
                        .prop_map(|(source_id, media_type, title, filename)| {
                            Chunk::SourceDocument {
                                source_id,
                                media_type,
                                title,
                                filename,
                            }
                        })
                        .boxed(),
                ),
                (
                    1,
                    (text(), text())
                        .prop_map(|(url, media_type)| Chunk::File { url, media_type })
                        .boxed(),
                ),
                (
                    6,
                    (
                        prop::sample::select(vec!["a", "b", "text-replace"]),
                        prop::option::of(name("x", 3)),
                        json_value(),
                        prop::bool::weighted(0.2),
                    )
                        .prop_map(|(name, id, data, transient)| Chunk::Data {
                            name: name.to_owned(),
                            id,
                            data,
                            transient,
                        })
                        .boxed(),
                ),
                (
                    3,
                    prop_oneof![
                        4 => (part(), text()).prop_map(|(id, text)| json!({"id": id, "text": text})),
                        1 => part().prop_map(|id| json!({"id": id})),
                        1 => json_value(),
                    ]
                    .prop_map(|data| Chunk::Data {
                        name: "text-replace".to_owned(),
                        id: None,
                        data,
                        transient: true,
                    })
                    .boxed(),
                ),
            ])
        }

        fn json_of(b: &MessageBuilder) -> Vec<u8> {
            let mut out = b"prefix".to_vec();
            b.write_json(&mut out);
            assert_eq!(&out[..6], b"prefix");
            out.split_off(6)
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

            /// The indexed builder's message equals the scanning builder's after every chunk,
            /// `write_json` writes exactly `serde_json::to_vec(&message())`, and a clone taken
            /// midway carries its indexes along.
            #[test]
            fn indexed_equals_linear_on_chunks(
                chunks in prop::collection::vec(chunk(), 0..160),
                split in any::<prop::sample::Index>(),
            ) {
                let mut indexed = MessageBuilder::new("init");
                let mut linear = LinearBuilder::new("init");
                let split = split.index(chunks.len() + 1);
                let mut clone = None;
                for (n, c) in chunks.iter().enumerate() {
                    if n == split {
                        clone = Some(indexed.clone());
                    }
                    indexed.apply(c);
                    linear.apply(c);
                    let m = indexed.message();
                    prop_assert_eq!(&m, &linear.message(), "after chunk {}: {:?}", n, c);
                    prop_assert_eq!(json_of(&indexed), serde_json::to_vec(&m).unwrap());
                    prop_assert_eq!(indexed.id(), m["id"].as_str().unwrap());
                }
                let mut clone = clone.unwrap_or_else(|| indexed.clone());
                for c in &chunks[split.min(chunks.len())..] {
                    clone.apply(c);
                }
                prop_assert_eq!(clone.message(), indexed.message());
                prop_assert_eq!(json_of(&clone), json_of(&indexed));
            }

            /// The same through [`Fold`], over generated AgentFlow runs.
            #[test]
            fn indexed_equals_linear_on_runs(events in run()) {
                let mut f = Fold::new("msg-1");
                let mut renderer = UiRenderer::new("msg-1".to_owned());
                let mut linear = LinearBuilder::new("msg-1");
                let mut chunks = Vec::new();
                for ev in &events {
                    f.push(ev);
                    renderer.render(ev, &mut chunks);
                    for c in chunks.drain(..) {
                        linear.apply(&c);
                    }
                    let m = f.message();
                    prop_assert_eq!(&m, &linear.message());
                    let mut out = Vec::new();
                    f.write_json(&mut out);
                    prop_assert_eq!(out, serde_json::to_vec(&m).unwrap());
                }
            }
        }

        #[test]
        fn write_json_of_every_part_kind() {
            let mut b = MessageBuilder::new("m\"1");
            for c in [
                Chunk::StartStep,
                Chunk::TextStart { id: s("t") },
                Chunk::TextDelta {
                    id: s("t"),
                    delta: s("a\nb"),
                },
                Chunk::ReasoningStart { id: s("r") },
                Chunk::ReasoningEnd { id: s("r") },
                Chunk::SourceUrl {
                    source_id: s("s"),
                    url: s("u"),
                    title: Some(s("T")),
                },
                Chunk::SourceUrl {
                    source_id: s("s"),
                    url: s("u"),
                    title: None,
                },
                Chunk::SourceDocument {
                    source_id: s("s"),
                    media_type: s("text/plain"),
                    title: s("T"),
                    filename: Some(s("f")),
                },
                Chunk::File {
                    url: s("data:,x"),
                    media_type: s("text/plain"),
                },
                Chunk::ToolInputAvailable {
                    tool_call_id: s("c"),
                    tool_name: s("x"),
                    input: json!({"b": 1, "a": [2.5, null]}),
                },
                Chunk::ToolOutputError {
                    tool_call_id: s("c"),
                    error_text: s("e"),
                },
                Chunk::Data {
                    name: s("d"),
                    id: Some(s("i")),
                    data: json!({"y": 1, "x": 2}),
                    transient: false,
                },
                Chunk::Data {
                    name: s("d"),
                    id: None,
                    data: json!(0),
                    transient: false,
                },
            ] {
                b.apply(&c);
            }
            let mut out = Vec::new();
            b.write_json(&mut out);
            assert_eq!(out, serde_json::to_vec(&b.message()).unwrap());
            assert_eq!(
                String::from_utf8(out).unwrap(),
                concat!(
                    r#"{"id":"m\"1","parts":[{"type":"step-start"},"#,
                    r#"{"state":"streaming","text":"a\nb","type":"text"},"#,
                    r#"{"id":"r","state":"done","text":"","type":"reasoning"},"#,
                    r#"{"sourceId":"s","title":"T","type":"source-url","url":"u"},"#,
                    r#"{"sourceId":"s","type":"source-url","url":"u"},"#,
                    r#"{"filename":"f","mediaType":"text/plain","sourceId":"s","title":"T","type":"source-document"},"#,
                    r#"{"mediaType":"text/plain","type":"file","url":"data:,x"},"#,
                    r#"{"errorText":"e","input":{"a":[2.5,null],"b":1},"providerExecuted":true,"state":"output-error","toolCallId":"c","type":"tool-x"},"#,
                    r#"{"data":{"x":2,"y":1},"id":"i","type":"data-d"},"#,
                    r#"{"data":0,"type":"data-d"}"#,
                    r#"],"role":"assistant"}"#
                )
            );
        }
    }
}
