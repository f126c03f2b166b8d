//! The mock's own translation of a scenario's AgentFlow events into dialect A: the AI SDK v5
//! UI-message stream ([`UiTranslator`], [`ui_steps`]) and the poll dialect's conversation
//! snapshot ([`Snapshot`]). Pure: no I/O, no clocks.
//!
//! It follows the published protocols (research/protocols.md §1.1, §1.3, §1.5) and shares no
//! code with the gateway's renderers, so the gateway's adapters are tested against an
//! independent reading. Events are read tolerantly ([`read`]): types are case-insensitive, text
//! is in `content` or the legacy `delta` field, a call is nested when `parent_call_id` is set.
//!
//! | AgentFlow event | UI-message chunks | snapshot |
//! |---|---|---|
//! | the first event, whatever it is | `start{messageId}`, `start-step` first | a `step-start` part |
//! | root `delta` | (`reasoning-end`, `text-start{id}`), `text-delta{id, delta}` | appended to the open `text` part (`streaming`) |
//! | root `delta`, reasoning | (`text-end`, `reasoning-start{id}`), `reasoning-delta` | appended to the open `reasoning` part |
//! | nested `start` | (close open parts), `tool-input-start`, 2 × `tool-input-delta`, `tool-input-available` | `tool-<name>` part, `input-streaming` then `input-available` |
//! | nested `end` / `error` | `tool-output-available` / `tool-output-error` | the tool part's `output-available` / `output-error` |
//! | `tool_progress`, `tool_result_delta`, `artifact_progress`, `artifact_result_delta` | transient `data-tool-progress` etc., `data` = the payload | nothing |
//! | `artifact_started`, `artifact_completed`, `artifact_error` | `data-artifact{id, data: {artifactId, status, callId, content}}` | one `data-artifact` part per artifact, replaced in place |
//! | `source` (url / document), `file`, `data` (Sluice's own types) | `source-url`, `source-document`, `file`, `data-<name>` | the matching parts (`data-*` with an id replaced in place, transient ones left out) |
//! | root `end` | (a text part with the final text if none was streamed), (close open parts), `finish-step`, `finish` | parts closed (`done`), `completed` |
//! | root `error` | (close open parts), `error{errorText}` | parts closed, `error` + `errorText` |
//! | anything else, anything after the root `end`/`error` | nothing | nothing |
//!
//! Text parts are named `text_<n>` and reasoning parts `reasoning_<n>` (`n` counts the parts
//! opened in the message); as in current v5 clients, a snapshot's reasoning part keeps its `id`
//! and a text part has none. Sources, files and data parts do not close an open text part: text
//! after them is appended to the same part, as a v5 client does with a `text-delta` for a part
//! that is still open. The UI stream ends with `data: [DONE]` after the root `end` or `error`.

use std::collections::{HashMap, HashSet};

use serde_json::{json, Map, Value};

use super::scenario::{Beat, Step, Timeline, BOM};

/// What one AgentFlow event means for the assistant's UI message.
#[derive(Clone, Debug, PartialEq)]
pub enum Meaning {
    /// The root call started.
    RootStart,
    /// Root text or reasoning.
    Text {
        /// The piece of text.
        text: String,
        /// Whether it is reasoning.
        reasoning: bool,
    },
    /// A nested call (tool or sub-agent) started.
    ToolStart {
        /// Its call id.
        call_id: String,
        /// Its name.
        name: String,
        /// Its input.
        input: Value,
    },
    /// A nested call's result.
    ToolEnd {
        /// Its call id.
        call_id: String,
        /// The result.
        output: Value,
    },
    /// A nested call failed.
    ToolError {
        /// Its call id.
        call_id: String,
        /// Why.
        error: String,
    },
    /// Live progress, sent as a transient `data-<name>` chunk.
    Transient {
        /// `tool-progress`, `tool-result-delta`, `artifact-progress`, `artifact-result-delta`.
        name: String,
        /// The whole AgentFlow payload.
        payload: Value,
    },
    /// An artifact's lifecycle.
    Artifact {
        /// The artifact id.
        id: String,
        /// `{artifactId, status, callId, content}`.
        data: Value,
    },
    /// A source cited by URL.
    SourceUrl {
        /// Source id.
        source_id: String,
        /// Its URL.
        url: String,
        /// Its title.
        title: Option<String>,
    },
    /// A source document.
    SourceDocument {
        /// Source id.
        source_id: String,
        /// Its media type.
        media_type: String,
        /// Its title.
        title: String,
        /// Its file name.
        filename: Option<String>,
    },
    /// A file.
    File {
        /// Hosted or `data:` URL.
        url: String,
        /// Its media type.
        media_type: String,
    },
    /// An application data part `data-<name>`.
    Data {
        /// The name.
        name: String,
        /// Its id (a part with the same name and id is replaced).
        id: Option<String>,
        /// The data.
        data: Value,
        /// Transient data is never stored in the message.
        transient: bool,
    },
    /// The run completed.
    End {
        /// The final text, for a run that streamed none.
        final_text: Option<String>,
    },
    /// The run failed.
    Error {
        /// Why.
        message: String,
    },
    /// Nothing the UI message shows.
    Ignored,
}

fn str_at<'a>(v: &'a Value, keys: &[&str]) -> Option<&'a str> {
    keys.iter().find_map(|k| v.get(*k).and_then(Value::as_str))
}

fn error_text(content: &Value) -> String {
    content
        .as_str()
        .or_else(|| str_at(content, &["message", "error", "errorText"]))
        .unwrap_or("agent error")
        .to_string()
}

/// Read an AgentFlow event payload tolerantly (DESIGN §1 B).
pub fn read(ev: &Value) -> Meaning {
    let ty = ev
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_ascii_lowercase();
    let nested = ev
        .get("parent_call_id")
        .and_then(Value::as_str)
        .is_some_and(|p| !p.is_empty());
    let null = Value::Null;
    let content = ev.get("content").unwrap_or(&null);
    let metadata = ev.get("metadata").unwrap_or(&null);
    let call_id = ev
        .get("call_id")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    match (ty.as_str(), nested) {
        ("start", false) => Meaning::RootStart,
        ("start", true) => Meaning::ToolStart {
            call_id,
            name: str_at(content, &["tool_name", "name"])
                .or_else(|| str_at(metadata, &["display_name"]))
                .unwrap_or("tool")
                .to_string(),
            input: content
                .get("input")
                .or_else(|| content.get("arguments"))
                .cloned()
                .unwrap_or(Value::Null),
        },
        ("delta", false) => {
            let text = content
                .as_str()
                .or_else(|| ev.get("delta").and_then(Value::as_str));
            match text {
                Some(t) if !t.is_empty() => Meaning::Text {
                    text: t.to_string(),
                    reasoning: metadata.get("reasoning") == Some(&Value::Bool(true))
                        || str_at(metadata, &["content_type"]) == Some("reasoning"),
                },
                _ => Meaning::Ignored,
            }
        }
        ("end", true) => Meaning::ToolEnd {
            call_id,
            output: content
                .get("output")
                .or_else(|| content.get("result"))
                .unwrap_or(content)
                .clone(),
        },
        ("error", true) => Meaning::ToolError {
            call_id,
            error: error_text(content),
        },
        ("end", false) => Meaning::End {
            final_text: content
                .as_str()
                .or_else(|| str_at(content, &["response", "output", "text", "result"]))
                .filter(|t| !t.is_empty())
                .map(str::to_string),
        },
        ("error", false) => Meaning::Error {
            message: error_text(content),
        },
        (
            "tool_progress" | "tool_result_delta" | "artifact_progress" | "artifact_result_delta",
            _,
        ) => Meaning::Transient {
            name: ty.replace('_', "-"),
            payload: ev.clone(),
        },
        ("artifact_started" | "artifact_completed" | "artifact_error", _) => {
            let id = str_at(content, &["artifact_id", "id"])
                .or_else(|| str_at(metadata, &["artifact_id"]))
                .unwrap_or(&call_id)
                .to_string();
            let status = &ty["artifact_".len()..];
            let call = ev.get("call_id").cloned().unwrap_or(Value::Null);
            Meaning::Artifact {
                data: json!({"artifactId": id, "status": status, "callId": call, "content": content}),
                id,
            }
        }
        ("source", _) => {
            let source_id = str_at(content, &["source_id"]).unwrap_or("").to_string();
            let title = str_at(content, &["title"]).map(str::to_string);
            match str_at(content, &["source_type"]) {
                Some("document") => Meaning::SourceDocument {
                    source_id,
                    media_type: str_at(content, &["media_type"]).unwrap_or("").to_string(),
                    title: title.unwrap_or_default(),
                    filename: str_at(content, &["filename"]).map(str::to_string),
                },
                _ => Meaning::SourceUrl {
                    source_id,
                    url: str_at(content, &["url"]).unwrap_or("").to_string(),
                    title,
                },
            }
        }
        ("file", _) => Meaning::File {
            url: str_at(content, &["url"]).unwrap_or("").to_string(),
            media_type: str_at(content, &["media_type"]).unwrap_or("").to_string(),
        },
        ("data", _) => Meaning::Data {
            name: str_at(content, &["name"]).unwrap_or("data").to_string(),
            id: str_at(content, &["id"]).map(str::to_string),
            data: content.get("data").cloned().unwrap_or(Value::Null),
            transient: content.get("transient") == Some(&Value::Bool(true)),
        },
        _ => Meaning::Ignored,
    }
}

/// The assistant message id of a thread's `turn`-th run: `msg_<thread>_<turn>`.
pub fn message_id(thread: &str, turn: u64) -> String {
    format!("msg_{thread}_{turn}")
}

fn source_url(source_id: &str, url: &str, title: &Option<String>) -> Value {
    let mut v = json!({"type": "source-url", "sourceId": source_id, "url": url});
    if let Some(t) = title {
        v["title"] = json!(t);
    }
    v
}

fn source_document(
    source_id: &str,
    media_type: &str,
    title: &str,
    filename: &Option<String>,
) -> Value {
    let mut v = json!({"type": "source-document", "sourceId": source_id,
                       "mediaType": media_type, "title": title});
    if let Some(f) = filename {
        v["filename"] = json!(f);
    }
    v
}

fn data_part(name: &str, id: &Option<String>, data: &Value) -> Value {
    let mut v = json!({"type": format!("data-{name}"), "data": data});
    if let Some(id) = id {
        v["id"] = json!(id);
    }
    v
}

/// The tool input's JSON text in two pieces (split at a character boundary).
fn input_pieces(input: &Value) -> (String, String) {
    let text = input.to_string();
    let mut mid = text.len() / 2;
    while !text.is_char_boundary(mid) {
        mid += 1;
    }
    (text[..mid].to_string(), text[mid..].to_string())
}

/// Turns AgentFlow events into AI SDK v5 UI-message chunks, one event at a time.
#[derive(Clone, Debug)]
pub struct UiTranslator {
    message_id: String,
    started: bool,
    finished: bool,
    opened: u32,
    text: Option<String>,
    reasoning: Option<String>,
    tools: HashSet<String>,
    root_text: bool,
    extra: Option<Map<String, Value>>,
}

impl UiTranslator {
    /// A translator for the assistant message `message_id`.
    pub fn new(message_id: impl Into<String>) -> UiTranslator {
        UiTranslator {
            message_id: message_id.into(),
            started: false,
            finished: false,
            opened: 0,
            text: None,
            reasoning: None,
            tools: HashSet::new(),
            root_text: false,
            extra: None,
        }
    }

    /// Whether the root `end` or `error` was translated (the stream is over).
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// The chunks of one beat: events are translated, `UiChunk`s passed through, a `UiExtra`
    /// is kept for the next chunk; other beats have none.
    pub fn beat(&mut self, beat: &Beat, out: &mut Vec<Value>) {
        let before = out.len();
        match beat {
            Beat::Event(ev) => self.event(ev, out),
            Beat::UiChunk(c) if !self.finished => out.push(c.clone()),
            Beat::UiExtra(Value::Object(m)) => {
                self.extra.get_or_insert_with(Map::new).extend(m.clone());
            }
            _ => {}
        }
        if out.len() > before {
            if let (Some(extra), Some(Value::Object(first))) =
                (self.extra.take(), out.get_mut(before))
            {
                first.extend(extra);
            }
        }
    }

    fn close_text(&mut self, out: &mut Vec<Value>) {
        if let Some(id) = self.text.take() {
            out.push(json!({"type": "text-end", "id": id}));
        }
    }

    fn close_reasoning(&mut self, out: &mut Vec<Value>) {
        if let Some(id) = self.reasoning.take() {
            out.push(json!({"type": "reasoning-end", "id": id}));
        }
    }

    fn open(&mut self, kind: &str, out: &mut Vec<Value>) -> String {
        self.opened += 1;
        let id = format!("{kind}_{}", self.opened);
        out.push(json!({"type": format!("{kind}-start"), "id": id}));
        id
    }

    /// The chunks of one AgentFlow event.
    pub fn event(&mut self, ev: &Value, out: &mut Vec<Value>) {
        if self.finished {
            return;
        }
        if !self.started {
            self.started = true;
            out.push(json!({"type": "start", "messageId": self.message_id}));
            out.push(json!({"type": "start-step"}));
        }
        match read(ev) {
            Meaning::RootStart | Meaning::Ignored => {}
            Meaning::Text { text, reasoning } => {
                let kind = if reasoning { "reasoning" } else { "text" };
                let id = if reasoning {
                    self.close_text(out);
                    match self.reasoning.clone() {
                        Some(id) => id,
                        None => {
                            let id = self.open(kind, out);
                            self.reasoning = Some(id.clone());
                            id
                        }
                    }
                } else {
                    self.close_reasoning(out);
                    self.root_text = true;
                    match self.text.clone() {
                        Some(id) => id,
                        None => {
                            let id = self.open(kind, out);
                            self.text = Some(id.clone());
                            id
                        }
                    }
                };
                out.push(json!({"type": format!("{kind}-delta"), "id": id, "delta": text}));
            }
            Meaning::ToolStart {
                call_id,
                name,
                input,
            } => {
                self.close_text(out);
                self.close_reasoning(out);
                let (a, b) = input_pieces(&input);
                out.push(json!({"type": "tool-input-start", "toolCallId": call_id,
                                "toolName": name, "providerExecuted": true}));
                out.push(json!({"type": "tool-input-delta", "toolCallId": call_id,
                                "inputTextDelta": a}));
                out.push(json!({"type": "tool-input-delta", "toolCallId": call_id,
                                "inputTextDelta": b}));
                out.push(
                    json!({"type": "tool-input-available", "toolCallId": call_id,
                                "toolName": name, "input": input, "providerExecuted": true}),
                );
                self.tools.insert(call_id);
            }
            Meaning::ToolEnd { call_id, output } => {
                if self.tools.contains(&call_id) {
                    out.push(
                        json!({"type": "tool-output-available", "toolCallId": call_id,
                                    "output": output, "providerExecuted": true}),
                    );
                }
            }
            Meaning::ToolError { call_id, error } => {
                if self.tools.contains(&call_id) {
                    out.push(json!({"type": "tool-output-error", "toolCallId": call_id,
                                    "errorText": error, "providerExecuted": true}));
                }
            }
            Meaning::Transient { name, payload } => {
                out.push(json!({"type": format!("data-{name}"), "data": payload,
                                "transient": true}));
            }
            Meaning::Artifact { id, data } => {
                out.push(json!({"type": "data-artifact", "id": id, "data": data}));
            }
            Meaning::SourceUrl {
                source_id,
                url,
                title,
            } => out.push(source_url(&source_id, &url, &title)),
            Meaning::SourceDocument {
                source_id,
                media_type,
                title,
                filename,
            } => out.push(source_document(&source_id, &media_type, &title, &filename)),
            Meaning::File { url, media_type } => {
                out.push(json!({"type": "file", "url": url, "mediaType": media_type}));
            }
            Meaning::Data {
                name,
                id,
                data,
                transient,
            } => {
                let mut c = data_part(&name, &id, &data);
                if transient {
                    c["transient"] = json!(true);
                }
                out.push(c);
            }
            Meaning::End { final_text } => {
                if let (false, Some(text)) = (self.root_text, final_text) {
                    self.close_reasoning(out);
                    let id = self.open("text", out);
                    out.push(json!({"type": "text-delta", "id": id, "delta": text}));
                    out.push(json!({"type": "text-end", "id": id}));
                }
                self.close_text(out);
                self.close_reasoning(out);
                out.push(json!({"type": "finish-step"}));
                out.push(json!({"type": "finish"}));
                self.finished = true;
            }
            Meaning::Error { message } => {
                self.close_text(out);
                self.close_reasoning(out);
                out.push(json!({"type": "error", "errorText": message}));
                self.finished = true;
            }
        }
    }
}

/// One chunk framed as the AI SDK frames it: `data: <one-line JSON>\n\n`.
pub fn frame(chunk: &Value, out: &mut String) {
    out.push_str("data: ");
    out.push_str(&chunk.to_string());
    out.push_str("\n\n");
}

/// The end-of-stream marker sent after the root `end` or `error`.
pub const DONE: &str = "data: [DONE]\n\n";

/// The UI-message SSE stream of a timeline for the assistant message `message_id`: the chunks
/// of each event in one write, the pauses between them, `data: [DONE]` once the run is over;
/// broken frames (`malformed`) are sent as they are, hangs and drops happen where they are.
pub fn ui_steps(timeline: &Timeline, message_id: &str) -> Vec<Step> {
    let mut steps = Vec::with_capacity(timeline.beats.len() + 2);
    if timeline.bom {
        steps.push(Step::Send(BOM.to_vec()));
    }
    let mut tr = UiTranslator::new(message_id);
    let mut chunks = Vec::new();
    for beat in &timeline.beats {
        match beat {
            Beat::Sleep(ms) => steps.push(Step::Sleep(*ms)),
            Beat::Hang(ms) => steps.push(Step::Hang(*ms)),
            Beat::Drop => steps.push(Step::Drop),
            Beat::Raw(text) => steps.push(timeline.send(text)),
            _ => {
                chunks.clear();
                tr.beat(beat, &mut chunks);
                if !chunks.is_empty() {
                    let mut text = String::new();
                    for c in &chunks {
                        frame(c, &mut text);
                    }
                    if tr.is_finished() {
                        text.push_str(DONE);
                    }
                    steps.push(timeline.send(&text));
                }
                if tr.is_finished() {
                    break;
                }
            }
        }
    }
    steps
}

/// Status of a run as the poll dialect reports it (`streamStatus`).
pub const IN_PROGRESS: &str = "in_progress";
/// See [`IN_PROGRESS`].
pub const COMPLETED: &str = "completed";
/// See [`IN_PROGRESS`].
pub const ERROR: &str = "error";

/// The assistant message of a run as the poll dialect shows it, built from the same events.
#[derive(Clone, Debug)]
pub struct Snapshot {
    message_id: String,
    parts: Vec<Value>,
    started: bool,
    finished: bool,
    /// Text and reasoning parts opened (reasoning parts carry the stream's ids).
    opened: u32,
    text: Option<usize>,
    reasoning: Option<usize>,
    tools: HashMap<String, usize>,
    data: HashMap<(String, String), usize>,
    root_text: bool,
    status: &'static str,
    error_text: Option<String>,
}

impl Snapshot {
    /// An empty assistant message `message_id`, in progress.
    pub fn new(message_id: impl Into<String>) -> Snapshot {
        Snapshot {
            message_id: message_id.into(),
            parts: Vec::new(),
            started: false,
            finished: false,
            opened: 0,
            text: None,
            reasoning: None,
            tools: HashMap::new(),
            data: HashMap::new(),
            root_text: false,
            status: IN_PROGRESS,
            error_text: None,
        }
    }

    /// The message: `{id, role: "assistant", parts}`.
    pub fn message(&self) -> Value {
        json!({"id": self.message_id, "role": "assistant", "parts": self.parts})
    }

    /// Whether any event was applied (before that there is no assistant message to show).
    pub fn is_started(&self) -> bool {
        self.started
    }

    /// `in_progress`, `completed` or `error`.
    pub fn status(&self) -> &'static str {
        self.status
    }

    /// Why the run failed.
    pub fn error_text(&self) -> Option<&str> {
        self.error_text.as_deref()
    }

    fn start(&mut self) {
        if !self.started {
            self.started = true;
            self.parts.push(json!({"type": "step-start"}));
        }
    }

    fn close_text(&mut self) {
        if let Some(i) = self.text.take() {
            self.parts[i]["state"] = json!("done");
        }
    }

    fn close_reasoning(&mut self) {
        if let Some(i) = self.reasoning.take() {
            self.parts[i]["state"] = json!("done");
        }
    }

    fn push(&mut self, part: Value) -> usize {
        self.parts.push(part);
        self.parts.len() - 1
    }

    fn open_text(&mut self, reasoning: bool) -> usize {
        if reasoning {
            self.close_text();
        } else {
            self.close_reasoning();
            self.root_text = true;
        }
        let open = if reasoning { self.reasoning } else { self.text };
        if let Some(i) = open {
            return i;
        }
        self.opened += 1;
        let i = if reasoning {
            let id = format!("reasoning_{}", self.opened);
            self.push(json!({"type": "reasoning", "id": id, "text": "", "state": "streaming"}))
        } else {
            self.push(json!({"type": "text", "text": "", "state": "streaming"}))
        };
        if reasoning {
            self.reasoning = Some(i);
        } else {
            self.text = Some(i);
        }
        i
    }

    fn append(&mut self, i: usize, text: &str) {
        if let Some(Value::String(s)) = self.parts[i].get_mut("text") {
            s.push_str(text);
        }
    }

    /// The first stage of a nested `start`: its tool part while the input streams. Returns
    /// whether it created one (then the caller may show it before [`Snapshot::apply`]).
    pub fn begin(&mut self, ev: &Value) -> bool {
        if self.finished {
            return false;
        }
        let Meaning::ToolStart { call_id, name, .. } = read(ev) else {
            return false;
        };
        if self.tools.contains_key(&call_id) {
            return false;
        }
        self.start();
        self.close_text();
        self.close_reasoning();
        let i = self.push(
            json!({"type": format!("tool-{name}"), "toolCallId": call_id,
                                 "state": "input-streaming", "providerExecuted": true}),
        );
        self.tools.insert(call_id, i);
        true
    }

    /// Apply one beat: events and `PollText` change the message, other beats do not.
    pub fn apply(&mut self, beat: &Beat) {
        match beat {
            Beat::Event(ev) => self.event(ev),
            Beat::PollText(text) if !self.finished => {
                self.start();
                let i = self.open_text(false);
                self.parts[i]["text"] = json!(text);
            }
            _ => {}
        }
    }

    /// Apply one AgentFlow event.
    pub fn event(&mut self, ev: &Value) {
        if self.finished {
            return;
        }
        self.start();
        match read(ev) {
            Meaning::RootStart | Meaning::Ignored | Meaning::Transient { .. } => {}
            Meaning::Text { text, reasoning } => {
                let i = self.open_text(reasoning);
                self.append(i, &text);
            }
            Meaning::ToolStart { call_id, input, .. } => {
                self.begin(ev);
                if let Some(&i) = self.tools.get(&call_id) {
                    self.parts[i]["state"] = json!("input-available");
                    self.parts[i]["input"] = input;
                }
            }
            Meaning::ToolEnd { call_id, output } => {
                if let Some(&i) = self.tools.get(&call_id) {
                    self.parts[i]["state"] = json!("output-available");
                    self.parts[i]["output"] = output;
                }
            }
            Meaning::ToolError { call_id, error } => {
                if let Some(&i) = self.tools.get(&call_id) {
                    self.parts[i]["state"] = json!("output-error");
                    self.parts[i]["errorText"] = json!(error);
                }
            }
            Meaning::Artifact { id, data } => {
                self.data_part("artifact", Some(id), data);
            }
            Meaning::SourceUrl {
                source_id,
                url,
                title,
            } => {
                self.push(source_url(&source_id, &url, &title));
            }
            Meaning::SourceDocument {
                source_id,
                media_type,
                title,
                filename,
            } => {
                self.push(source_document(&source_id, &media_type, &title, &filename));
            }
            Meaning::File { url, media_type } => {
                self.push(json!({"type": "file", "mediaType": media_type, "url": url}));
            }
            Meaning::Data {
                name,
                id,
                data,
                transient,
            } => {
                if !transient {
                    self.data_part(&name, id, data);
                }
            }
            Meaning::End { final_text } => {
                if let (false, Some(text)) = (self.root_text, final_text) {
                    let i = self.open_text(false);
                    self.append(i, &text);
                }
                self.close_text();
                self.close_reasoning();
                self.status = COMPLETED;
                self.finished = true;
            }
            Meaning::Error { message } => {
                self.close_text();
                self.close_reasoning();
                self.status = ERROR;
                self.error_text = Some(message);
                self.finished = true;
            }
        }
    }

    fn data_part(&mut self, name: &str, id: Option<String>, data: Value) {
        let key = id.clone().map(|id| (name.to_string(), id));
        match key.as_ref().and_then(|k| self.data.get(k)) {
            Some(&i) => self.parts[i]["data"] = data,
            None => {
                let i = self.push(data_part(name, &id, &data));
                if let Some(k) = key {
                    self.data.insert(k, i);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock::scenario::{plan, Plan, SCENARIOS};
    use crate::mock::Dialect;

    /// A v5 client's fold of UI-message chunks into the assistant message
    /// (`processUIMessageStream`, research/protocols.md §1.3), written independently of
    /// [`Snapshot`]. Chunk types a v5 client does not know are skipped. Returns the message and
    /// the status the stream ended with.
    fn fold(chunks: &[Value]) -> (Value, &'static str, Option<String>) {
        let mut id = String::new();
        let mut parts: Vec<Value> = Vec::new();
        let mut active: HashMap<String, usize> = HashMap::new();
        let mut tools: HashMap<String, usize> = HashMap::new();
        let mut status = IN_PROGRESS;
        let mut error = None;
        for c in chunks {
            let ty = c["type"].as_str().unwrap();
            let s = |k: &str| c[k].as_str().unwrap().to_string();
            match ty {
                "start" => id = s("messageId"),
                "start-step" => parts.push(json!({"type": "step-start"})),
                "text-start" => {
                    parts.push(json!({"type": "text", "text": "", "state": "streaming"}));
                    active.insert(s("id"), parts.len() - 1);
                }
                "reasoning-start" => {
                    // Current v5 clients keep the reasoning part's id (5.0.100 did not).
                    let id = s("id");
                    parts.push(
                        json!({"type": "reasoning", "id": id, "text": "", "state": "streaming"}),
                    );
                    active.insert(id, parts.len() - 1);
                }
                "text-delta" | "reasoning-delta" => {
                    let p = &mut parts[active[&s("id")]];
                    let t = format!("{}{}", p["text"].as_str().unwrap(), s("delta"));
                    p["text"] = json!(t);
                }
                "text-end" | "reasoning-end" => {
                    let i = active.remove(&s("id")).unwrap();
                    parts[i]["state"] = json!("done");
                }
                "tool-input-start" => {
                    parts.push(json!({"type": format!("tool-{}", s("toolName")),
                        "toolCallId": s("toolCallId"), "state": "input-streaming",
                        "providerExecuted": c["providerExecuted"]}));
                    tools.insert(s("toolCallId"), parts.len() - 1);
                }
                "tool-input-delta" => assert!(tools.contains_key(&s("toolCallId"))),
                "tool-input-available" => {
                    let p = &mut parts[tools[&s("toolCallId")]];
                    p["state"] = json!("input-available");
                    p["input"] = c["input"].clone();
                }
                "tool-output-available" => {
                    let p = &mut parts[tools[&s("toolCallId")]];
                    p["state"] = json!("output-available");
                    p["output"] = c["output"].clone();
                }
                "tool-output-error" => {
                    let p = &mut parts[tools[&s("toolCallId")]];
                    p["state"] = json!("output-error");
                    p["errorText"] = c["errorText"].clone();
                }
                "source-url" | "source-document" | "file" => {
                    let mut p = c.clone();
                    p.as_object_mut().unwrap().remove("providerMetadata");
                    parts.push(p);
                }
                "finish-step" => active.clear(),
                "finish" => status = COMPLETED,
                "error" => {
                    status = ERROR;
                    error = Some(s("errorText"));
                }
                t if t.starts_with("data-") => {
                    if c["transient"] == json!(true) {
                        continue;
                    }
                    let same = c.get("id").and_then(|cid| {
                        parts
                            .iter()
                            .position(|p| p["type"] == c["type"] && p.get("id") == Some(cid))
                    });
                    match same {
                        Some(i) => parts[i]["data"] = c["data"].clone(),
                        None => {
                            let mut p = json!({"type": t, "data": c["data"]});
                            if let Some(cid) = c.get("id") {
                                p["id"] = cid.clone();
                            }
                            parts.push(p);
                        }
                    }
                }
                _ => {}
            }
        }
        let msg = json!({"id": id, "role": "assistant", "parts": parts});
        (msg, status, error)
    }

    fn timeline(message: &str, dialect: Dialect) -> Timeline {
        match plan(message, 1, "t", dialect) {
            Plan::Play(t) => t,
            Plan::Status(..) => panic!("{message}: a stream expected"),
        }
    }

    fn ui_chunks(message: &str) -> Vec<Value> {
        let mut tr = UiTranslator::new("msg_t_1");
        let mut out = Vec::new();
        for b in &timeline(message, Dialect::UiMessage).beats {
            tr.beat(b, &mut out);
        }
        out
    }

    /// Every published state of the poll dialect's snapshot, as the background player makes
    /// them (no `update_ms`).
    fn snapshots(message: &str) -> Vec<Snapshot> {
        let mut snap = Snapshot::new("msg_t_1");
        let mut out = Vec::new();
        for b in &timeline(message, Dialect::Poll).beats {
            match b {
                Beat::Hang(_) | Beat::Drop => break,
                Beat::Event(ev) if snap.begin(ev) => out.push(snap.clone()),
                _ => {}
            }
            if matches!(b, Beat::Event(_) | Beat::PollText(_)) {
                snap.apply(b);
                out.push(snap.clone());
            }
        }
        out
    }

    /// The chunks of a UI-message SSE body (every event one `data:` line), and whether it
    /// ended with `[DONE]`.
    fn parse_sse(steps: &[Step]) -> (Vec<Value>, bool) {
        let mut body = Vec::new();
        for s in steps {
            if let Step::Send(b) = s {
                body.extend_from_slice(b);
            }
        }
        let body = String::from_utf8(body).unwrap();
        let mut chunks = Vec::new();
        let mut done = false;
        for event in body.split("\n\n").filter(|e| !e.is_empty()) {
            assert!(!event.contains('\n'), "one line per event: {event}");
            let data = event.strip_prefix("data: ").unwrap();
            assert!(!done, "nothing after [DONE]");
            if data == "[DONE]" {
                done = true;
            } else {
                chunks.push(serde_json::from_str(data).unwrap());
            }
        }
        (chunks, done)
    }

    const VARIANTS: &[&str] = &[
        "scenario:text upper=1",
        "scenario:tools upper=1 event_lines=1",
        "scenario:reasoning upper=1",
        "scenario:slow tokens=5 delay_ms=0",
        "scenario:long events=50",
    ];

    #[test]
    fn poll_snapshots_and_ui_chunks_agree_for_every_scenario() {
        let messages = SCENARIOS
            .iter()
            .filter(|s| !matches!(**s, "status" | "malformed" | "oversize"))
            .map(|s| format!("scenario:{s}"))
            .chain(VARIANTS.iter().map(|s| s.to_string()));
        for m in messages {
            let (ui, status, error) = fold(&ui_chunks(&m));
            let last = snapshots(&m).pop().unwrap();
            assert_eq!(ui, last.message(), "{m}");
            assert_eq!(status, last.status(), "{m}");
            assert_eq!(error.as_deref(), last.error_text(), "{m}");
        }
    }

    #[test]
    fn ui_steps_frame_the_chunks_and_end_with_done() {
        for s in SCENARIOS
            .iter()
            .filter(|s| !matches!(**s, "status" | "malformed"))
        {
            let m = format!("scenario:{s} bytes=100");
            let steps = ui_steps(&timeline(&m, Dialect::UiMessage), "msg_t_1");
            let (chunks, done) = parse_sse(&steps);
            assert_eq!(chunks, ui_chunks(&m), "{m}");
            let over = matches!(
                chunks.last().unwrap()["type"].as_str(),
                Some("finish" | "error")
            );
            assert_eq!(done, over, "{m}");
            assert_eq!(done, !matches!(*s, "hang" | "drop"), "{m}");
        }
        let steps = ui_steps(&timeline("scenario:drop", Dialect::UiMessage), "m");
        assert_eq!(steps.last(), Some(&Step::Drop));
        let steps = ui_steps(
            &timeline("scenario:hang hang_ms=7", Dialect::UiMessage),
            "m",
        );
        assert_eq!(steps.last(), Some(&Step::Hang(7)));
    }

    #[test]
    fn ui_framing_options_and_broken_lines() {
        let steps = ui_steps(
            &timeline("scenario:text framing=crlf bom=1", Dialect::UiMessage),
            "m",
        );
        assert_eq!(steps[0], Step::Send(BOM.to_vec()));
        let Step::Send(first) = &steps[1] else {
            panic!()
        };
        assert!(String::from_utf8_lossy(first)
            .starts_with("data: {\"messageId\":\"m\",\"type\":\"start\"}\r\n\r\n"));
        let steps = ui_steps(&timeline("scenario:malformed", Dialect::UiMessage), "m");
        assert!(steps.contains(&Step::Send(b"data: {this is not json\n\n".to_vec())));
        let Step::Send(last) = steps.last().unwrap() else {
            panic!()
        };
        assert!(String::from_utf8_lossy(last).ends_with(DONE));
    }

    #[test]
    fn tools_scenario_chunks() {
        let chunks = ui_chunks("scenario:tools");
        let types: Vec<&str> = chunks.iter().map(|c| c["type"].as_str().unwrap()).collect();
        let mut want = vec!["start", "start-step", "text-start"];
        want.extend(["text-delta"; 5]);
        want.extend([
            "text-end",
            "tool-input-start",
            "tool-input-delta",
            "tool-input-delta",
            "tool-input-available",
            "data-tool-progress",
            "data-tool-result-delta",
            "tool-output-available",
            "data-artifact",
            "data-artifact-progress",
            "data-artifact",
            "text-start",
        ]);
        want.extend(["text-delta"; 5]);
        want.extend(["text-end", "finish-step", "finish"]);
        assert_eq!(types, want);
        assert_eq!(chunks[0], json!({"type": "start", "messageId": "msg_t_1"}));
        assert_eq!(chunks[2], json!({"type": "text-start", "id": "text_1"}));
        assert_eq!(
            chunks[3],
            json!({"type": "text-delta", "id": "text_1", "delta": "Let "})
        );
        let input = json!({"query": "weather in Paris"});
        assert_eq!(
            chunks[9],
            json!({"type": "tool-input-start", "toolCallId": "call_tool_1",
                   "toolName": "search", "providerExecuted": true})
        );
        let text = format!(
            "{}{}",
            chunks[10]["inputTextDelta"].as_str().unwrap(),
            chunks[11]["inputTextDelta"].as_str().unwrap()
        );
        assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), input);
        assert!(!chunks[10]["inputTextDelta"].as_str().unwrap().is_empty());
        assert_eq!(
            chunks[12],
            json!({"type": "tool-input-available", "toolCallId": "call_tool_1",
                   "toolName": "search", "input": input, "providerExecuted": true})
        );
        assert_eq!(chunks[13]["transient"], json!(true));
        assert_eq!(chunks[13]["data"]["type"], "tool_progress");
        assert_eq!(chunks[13]["data"]["content"]["progress"], json!(0.5));
        assert_eq!(
            chunks[15],
            json!({"type": "tool-output-available", "toolCallId": "call_tool_1",
                   "output": {"forecast": "sunny", "celsius": 21}, "providerExecuted": true})
        );
        assert_eq!(
            chunks[16],
            json!({"type": "data-artifact", "id": "art_1", "data": {"artifactId": "art_1",
                   "status": "started", "callId": "call_tool_1",
                   "content": {"artifact_id": "art_1", "title": "Forecast report"}}})
        );
        assert_eq!(chunks[18]["data"]["status"], "completed");
        assert_eq!(chunks[19], json!({"type": "text-start", "id": "text_2"}));
    }

    #[test]
    fn tools_scenario_snapshots_step_by_step() {
        let snaps = snapshots("scenario:tools");
        let parts = |i: usize| snaps[i].message()["parts"].clone();
        assert_eq!(parts(0), json!([{"type": "step-start"}]));
        assert_eq!(
            parts(1),
            json!([{"type": "step-start"}, {"type": "text", "text": "Let ", "state": "streaming"}])
        );
        // After the four words, the tool call: first its input streams, then it is available.
        let tool = snaps
            .iter()
            .position(|s| s.message()["parts"].as_array().unwrap().len() == 3)
            .unwrap();
        assert_eq!(
            parts(tool),
            json!([{"type": "step-start"},
                   {"type": "text", "text": "Let me look that up. ", "state": "done"},
                   {"type": "tool-search", "toolCallId": "call_tool_1",
                    "state": "input-streaming", "providerExecuted": true}])
        );
        assert_eq!(parts(tool + 1)[2]["state"], "input-available");
        assert_eq!(
            parts(tool + 1)[2]["input"],
            json!({"query": "weather in Paris"})
        );
        // Progress is transient: nothing changes.
        assert_eq!(parts(tool + 2), parts(tool + 1));
        assert_eq!(parts(tool + 3), parts(tool + 1));
        assert_eq!(parts(tool + 4)[2]["state"], "output-available");
        assert_eq!(parts(tool + 5)[3]["data"]["status"], "started");
        assert_eq!(parts(tool + 7)[3]["data"]["status"], "completed");
        assert_eq!(parts(tool + 7).as_array().unwrap().len(), 4);
        let last = snaps.last().unwrap();
        assert_eq!(last.status(), COMPLETED);
        assert_eq!(
            last.message()["parts"][4],
            json!({"type": "text", "text": "It is sunny in Paris.", "state": "done"})
        );
        assert!(snaps[..snaps.len() - 1]
            .iter()
            .all(|s| s.status() == IN_PROGRESS));
    }

    #[test]
    fn reasoning_then_text_and_legacy_deltas() {
        for m in ["scenario:reasoning", "scenario:reasoning upper=1"] {
            let chunks = ui_chunks(m);
            let types: Vec<&str> = chunks.iter().map(|c| c["type"].as_str().unwrap()).collect();
            assert_eq!(types[2], "reasoning-start");
            let end = types.iter().position(|t| *t == "reasoning-end").unwrap();
            assert_eq!(types[end + 1], "text-start");
            let (msg, ..) = fold(&chunks);
            assert_eq!(msg["parts"][1]["type"], "reasoning");
            assert_eq!(msg["parts"][1]["id"], "reasoning_1");
            assert_eq!(
                msg["parts"][1]["text"],
                "Let me think about this step by step."
            );
            assert_eq!(msg["parts"][1]["state"], "done");
            assert_eq!(msg["parts"][2]["type"], "text");
        }
    }

    #[test]
    fn error_and_final_text() {
        let snap = snapshots("scenario:error").pop().unwrap();
        assert_eq!(snap.status(), ERROR);
        assert_eq!(
            snap.error_text(),
            Some("simulated agent failure: no provider key")
        );
        assert_eq!(snap.message()["parts"][1]["state"], "done");
        let chunks = ui_chunks("scenario:error");
        assert_eq!(
            &chunks[chunks.len() - 2..],
            &[
                json!({"type": "text-end", "id": "text_1"}),
                json!({"type": "error", "errorText": "simulated agent failure: no provider key"})
            ]
        );
        // A run that streamed no text: its final text becomes a text part.
        let end = json!({"type": "end", "call_id": "r", "content": {"response": "Done."}});
        let mut tr = UiTranslator::new("m");
        let mut out = Vec::new();
        tr.event(&end, &mut out);
        let (msg, status, _) = fold(&out);
        assert_eq!(status, COMPLETED);
        let mut snap = Snapshot::new("m");
        snap.event(&end);
        assert_eq!(msg, snap.message());
        assert_eq!(
            msg["parts"][1],
            json!({"type": "text", "text": "Done.", "state": "done"})
        );
        // Nothing after the end.
        tr.event(&end, &mut out);
        assert_eq!(out.len(), 7);
    }

    #[test]
    fn rich_scenario_parts() {
        let chunks = ui_chunks("scenario:rich");
        let find = |t: &str| {
            chunks
                .iter()
                .filter(|c| c["type"] == t)
                .cloned()
                .collect::<Vec<_>>()
        };
        assert_eq!(
            find("source-url"),
            vec![json!({"type": "source-url", "sourceId": "src_1",
                        "url": "https://example.com/paris", "title": "Paris weather"})]
        );
        assert_eq!(
            find("source-document"),
            vec![json!({"type": "source-document", "sourceId": "src_2",
                        "mediaType": "application/pdf", "title": "Paris travel guide",
                        "filename": "paris.pdf"})]
        );
        assert_eq!(
            find("file"),
            vec![
                json!({"type": "file", "url": crate::mock::scenario::TINY_PNG,
                        "mediaType": "image/png"})
            ]
        );
        assert_eq!(find("data-weather").len(), 2);
        assert_eq!(find("data-weather")[1]["id"], "weather_1");
        assert_eq!(
            find("data-ping"),
            vec![json!({"type": "data-ping", "data": {"n": 1}, "transient": true})]
        );
        let msg = snapshots("scenario:rich").pop().unwrap().message();
        let types: Vec<&str> = msg["parts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap())
            .collect();
        assert_eq!(
            types,
            [
                "step-start",
                "text",
                "source-url",
                "source-document",
                "file",
                "data-weather"
            ]
        );
        assert_eq!(
            msg["parts"][1]["text"],
            "Here is what I found about Paris. It is sunny and 21 degrees."
        );
        assert_eq!(
            msg["parts"][5],
            json!({"type": "data-weather", "id": "weather_1",
                   "data": {"city": "Paris", "status": "done", "celsius": 21}})
        );
    }

    #[test]
    fn future_chunks_only_in_ui_message() {
        let chunks = ui_chunks("scenario:future");
        for t in [
            "tool-approval-request",
            "custom",
            "reasoning-file",
            "reset-step",
        ] {
            assert_eq!(chunks.iter().filter(|c| c["type"] == t).count(), 1, "{t}");
        }
        let extra: Vec<&Value> = chunks
            .iter()
            .filter(|c| c.get("futureField").is_some())
            .collect();
        assert_eq!(extra.len(), 1);
        assert_eq!(extra[0]["type"], "text-delta");
        for d in [Dialect::AgentFlow, Dialect::Poll] {
            let beats = timeline("scenario:future", d).beats;
            assert!(!beats
                .iter()
                .any(|b| matches!(b, Beat::UiChunk(_) | Beat::UiExtra(_))));
        }
        let (msg, ..) = fold(&chunks);
        let answer = crate::mock::scenario::text_answer("scenario:future", 1);
        assert_eq!(msg["parts"][1]["text"], json!(answer));
    }

    #[test]
    fn rewrite_grows_then_rewrites_in_poll_only() {
        let texts: Vec<String> = snapshots("scenario:rewrite")
            .iter()
            .filter_map(|s| s.message()["parts"][1]["text"].as_str().map(str::to_string))
            .collect();
        let mut distinct = texts.clone();
        distinct.dedup();
        assert_eq!(
            distinct,
            [
                "The answer",
                "The answer is",
                "The answer is 4",
                "The answer is four."
            ]
        );
        assert!(!distinct[3].starts_with(&distinct[2]));
        let (msg, ..) = fold(&ui_chunks("scenario:rewrite"));
        assert_eq!(msg["parts"][1]["text"], "The answer is four.");
    }

    #[test]
    fn hang_and_drop_stay_in_progress() {
        for m in ["scenario:hang", "scenario:drop"] {
            let last = snapshots(m).pop().unwrap();
            assert_eq!(last.status(), IN_PROGRESS);
            assert_eq!(last.message()["parts"][1]["state"], "streaming");
        }
    }
}
