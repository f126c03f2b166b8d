//! Rendering a run's AgentFlow events as the AI SDK v5 UI-message stream.
//!
//! [`UiRenderer`] is the state machine that turns each log event into zero or more
//! [`Chunk`]s (which parts are open, which tool calls the client has seen, whether the run has
//! ended), and frames them as SSE with the resumable id scheme of DESIGN §6: when event `k`
//! renders as chunks `c1…cm`, chunk `cj` (j < m) carries `id: k.j` and `cm` carries `id: k`.
//! [`Cursor`] is such an id read back from `Last-Event-ID`. Pure: no I/O, no clocks.
//!
//! Chunks in parentheses are emitted only when needed (a part is open, nothing was streamed…).
//!
//! | AgentFlow event | chunks |
//! |---|---|
//! | first event of the run, whatever it is | `start{messageId}`, `start-step` before its own chunks |
//! | root `start` | nothing more |
//! | root `delta` (text) | (`reasoning-end`, `text-start{id:"text-<seq>"}`), `text-delta` |
//! | root `delta` (reasoning) | (`text-end`, `reasoning-start{id:"reasoning-<seq>"}`), `reasoning-delta` |
//! | nested `start` | (close open parts), `tool-input-start`, `tool-input-available` |
//! | nested `end` | (close open parts, `tool-input-start`, `tool-input-available{input:null}` if no start was seen), `tool-output-available` |
//! | nested `error` | (as for `end`), `tool-output-error` |
//! | nested `delta` | transient `data-call-delta` `{callId, delta}` |
//! | `tool_progress`, `tool_result_delta`, `artifact_progress`, `artifact_result_delta` | transient `data-tool-progress` etc. (`_` → `-`), data = the payload |
//! | `artifact_started`, `artifact_completed`, `artifact_error` | `data-artifact`, `id` = artifact id, `{artifactId, status, callId, content}` |
//! | other types, a root delta without text, an unparsable payload | transient `data-agentflow` |
//! | root `end` | (`text-start`, `text-delta`, `text-end` with the final text), (close open parts), `finish-step`, `finish` |
//! | root `error` | (close open parts), `error{errorText}`, or `abort` when `sluice_status` is `stopped` |
//! | anything after a root `end`/`error` | nothing |
//!
//! Sluice's own event types (written by the UI-message and poll adapters; `crate::ingest::events`):
//!
//! | event | chunks |
//! |---|---|
//! | root `delta` with `metadata.part_id` | as a root delta; a `part_id` other than the open part's opens a new part |
//! | root `text_replace` of a part already sent | transient `data-text-replace` `{id, text}` (the snapshot's part takes the new text) |
//! | root `text_replace` of an unknown part | as a root delta with the whole text |
//! | `tool_input_delta` | (close open parts, `tool-input-start` for a new call), `tool-input-delta` |
//! | nested `start` of a call already begun | `tool-input-available` only |
//! | `source` | `source-url` or `source-document` |
//! | `file` | `file` |
//! | `data` | `data-<name>` with its id, data and transient flag |
//! | any of these without the fields they need | transient `data-agentflow` |
//!
//! A v5 client cannot take back text it was sent, so a rewrite reaches UI-message clients as
//! that transient `data-text-replace` chunk, for applications to apply in `onData`.

use std::collections::HashMap;
use std::fmt;

use serde_json::{Map, Value};

use super::chunk::Chunk;
use super::put_u64;
use crate::agentflow::{self, AfEvent, AfKind, Terminal};
use crate::event::Event;

/// A position in a UI-message stream, as carried by SSE `id:` lines: `k` (event `k` fully
/// seen) or `k.j` (events before `k`, plus the first `j` chunks of event `k`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cursor {
    /// The event's seq.
    pub seq: u64,
    /// How many of the event's chunks were seen; `None` means all of them.
    pub chunk: Option<u32>,
}

fn digits<T: std::str::FromStr>(s: &str) -> Option<T> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

impl Cursor {
    /// The cursor just after event `seq`.
    pub fn after(seq: u64) -> Cursor {
        Cursor { seq, chunk: None }
    }

    /// Read `"k"` or `"k.j"` (ASCII digits only, `j >= 1`); anything else is `None`.
    pub fn parse(s: &str) -> Option<Cursor> {
        match s.split_once('.') {
            None => Some(Cursor::after(digits(s)?)),
            Some((k, j)) => {
                let j: u32 = digits(j)?;
                (j >= 1).then_some(())?;
                Some(Cursor {
                    seq: digits(k)?,
                    chunk: Some(j),
                })
            }
        }
    }

    /// Whether event `seq` was entirely seen by a client at this cursor.
    pub fn covers(&self, seq: u64) -> bool {
        seq < self.seq || (seq == self.seq && self.chunk.is_none())
    }
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.chunk {
            None => write!(f, "{}", self.seq),
            Some(j) => write!(f, "{}.{}", self.seq, j),
        }
    }
}

/// Renders one run's events, in order, as UI-message chunks. One renderer per client stream
/// (or per fold); feed it every event from seq 1, using [`UiRenderer::skip`] for the events a
/// resuming client already has.
#[derive(Debug)]
pub struct UiRenderer {
    message_id: String,
    started: bool,
    finished: bool,
    /// Id of the open text part.
    text: Option<String>,
    /// Id of the open reasoning part.
    reasoning: Option<String>,
    /// The `part_id` the open text part was opened with.
    text_part: Option<String>,
    /// The `part_id` the open reasoning part was opened with.
    reasoning_part: Option<String>,
    /// Named parts sent so far: (reasoning?, `part_id`) → the chunk id of the latest such part.
    named: HashMap<(bool, String), String>,
    /// Whether any root text delta was streamed (else a root `end` supplies the final text).
    root_text: bool,
    /// Tool calls the client has a part for: call id → tool name.
    tools: HashMap<String, String>,
    /// Reused buffer for the SSE methods.
    scratch: Vec<Chunk>,
}

fn transient(name: &str, data: Value) -> Chunk {
    Chunk::Data {
        name: name.to_owned(),
        id: None,
        data,
        transient: true,
    }
}

impl UiRenderer {
    /// A renderer for the assistant message `message_id` (sent in `start`).
    pub fn new(message_id: String) -> UiRenderer {
        UiRenderer {
            message_id,
            started: false,
            finished: false,
            text: None,
            reasoning: None,
            text_part: None,
            reasoning_part: None,
            named: HashMap::new(),
            root_text: false,
            tools: HashMap::new(),
            scratch: Vec::new(),
        }
    }

    /// The assistant message id.
    pub fn message_id(&self) -> &str {
        &self.message_id
    }

    /// Whether a terminal event (root `end` or `error`) was rendered; later events render to
    /// nothing.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Render `ev` (the next event of the run), appending its chunks to `out`.
    pub fn render(&mut self, ev: &Event, out: &mut Vec<Chunk>) {
        if self.finished {
            return;
        }
        if !self.started {
            self.started = true;
            out.push(Chunk::Start {
                message_id: self.message_id.clone(),
            });
            out.push(Chunk::StartStep);
        }
        let af = match agentflow::parse(&ev.data) {
            Ok(af) => af,
            Err(_) => {
                let raw = String::from_utf8_lossy(&ev.data).into_owned();
                out.push(transient("agentflow", Value::String(raw)));
                return;
            }
        };
        let root = af.is_root();
        match af.kind {
            AfKind::Start if root => {}
            AfKind::Start => self.tool_start(ev.seq, &af, out),
            AfKind::Delta if root => self.root_delta(ev.seq, af, out),
            AfKind::Delta => {
                let mut data = Map::new();
                data.insert("callId".into(), opt_str(af.call_id.as_deref()));
                data.insert("delta".into(), opt_str(af.text()));
                out.push(transient("call-delta", Value::Object(data)));
            }
            AfKind::End | AfKind::Error if root => self.terminal(ev.seq, &af, out),
            AfKind::End => {
                let call_id = self.ensure_tool(ev.seq, &af, out);
                out.push(Chunk::ToolOutputAvailable {
                    tool_call_id: call_id,
                    output: af.output().clone(),
                });
            }
            AfKind::Error => {
                let call_id = self.ensure_tool(ev.seq, &af, out);
                out.push(Chunk::ToolOutputError {
                    tool_call_id: call_id,
                    error_text: af.error_message().to_owned(),
                });
            }
            AfKind::ToolProgress => out.push(transient("tool-progress", af.raw)),
            AfKind::ToolResultDelta => out.push(transient("tool-result-delta", af.raw)),
            AfKind::ArtifactProgress => out.push(transient("artifact-progress", af.raw)),
            AfKind::ArtifactResultDelta => out.push(transient("artifact-result-delta", af.raw)),
            AfKind::ArtifactStarted => out.push(artifact(&af, "started")),
            AfKind::ArtifactCompleted => out.push(artifact(&af, "completed")),
            AfKind::ArtifactError => out.push(artifact(&af, "error")),
            AfKind::TextReplace if root => self.replace(ev.seq, af, out),
            AfKind::ToolInputDelta => self.tool_input_delta(ev.seq, &af, out),
            AfKind::Source => push_or_opaque(source(&af), af, out),
            AfKind::File => push_or_opaque(file(&af), af, out),
            AfKind::Data => push_or_opaque(data(&af), af, out),
            AfKind::TextReplace | AfKind::Other(_) => out.push(transient("agentflow", af.raw)),
        }
    }

    /// Advance the state over `ev` without output (for events a resuming client already has).
    pub fn skip(&mut self, ev: &Event) {
        let mut chunks = std::mem::take(&mut self.scratch);
        self.render(ev, &mut chunks);
        chunks.clear();
        self.scratch = chunks;
    }

    /// Render `ev` as SSE frames (`id: …\ndata: <chunk>\n\n` per chunk) appended to `out`.
    /// An event that renders no chunk writes nothing.
    pub fn render_sse(&mut self, ev: &Event, out: &mut Vec<u8>) {
        self.render_sse_from(ev, 0, out);
    }

    /// Like [`render_sse`](Self::render_sse), but write only the chunks after the first
    /// `skip_chunks` (the state still advances over all of them). Ids are those of the full
    /// rendering, so a client at cursor `k.j` gets exactly the frames after `k.j`.
    pub fn render_sse_from(&mut self, ev: &Event, skip_chunks: u32, out: &mut Vec<u8>) {
        let mut chunks = std::mem::take(&mut self.scratch);
        self.render(ev, &mut chunks);
        let m = chunks.len();
        for (i, chunk) in chunks.iter().enumerate().skip(skip_chunks as usize) {
            out.extend_from_slice(b"id: ");
            put_u64(out, ev.seq);
            if i + 1 < m {
                out.push(b'.');
                put_u64(out, (i + 1) as u64);
            }
            out.extend_from_slice(b"\ndata: ");
            chunk.write_json(out);
            out.extend_from_slice(b"\n\n");
        }
        chunks.clear();
        self.scratch = chunks;
    }

    /// Serve a client that has seen everything up to `cursor`: feed every event of the run in
    /// order from seq 1; events the cursor covers only advance the state, the event at a
    /// `k.j` cursor writes its chunks after the j-th, later events are written in full.
    pub fn render_sse_after(&mut self, ev: &Event, cursor: Cursor, out: &mut Vec<u8>) {
        if cursor.covers(ev.seq) {
            self.skip(ev);
        } else if ev.seq == cursor.seq {
            self.render_sse_from(ev, cursor.chunk.unwrap_or(0), out);
        } else {
            self.render_sse(ev, out);
        }
    }

    fn close_parts(&mut self, out: &mut Vec<Chunk>) {
        if let Some(id) = self.text.take() {
            out.push(Chunk::TextEnd { id });
        }
        if let Some(id) = self.reasoning.take() {
            out.push(Chunk::ReasoningEnd { id });
        }
        self.text_part = None;
        self.reasoning_part = None;
    }

    fn root_delta(&mut self, seq: u64, af: AfEvent, out: &mut Vec<Chunk>) {
        let reasoning = af.is_reasoning();
        let Some(text) = af.text() else {
            // A root delta without text: keep it, opaquely.
            out.push(transient("agentflow", af.raw));
            return;
        };
        if text.is_empty() {
            return;
        }
        let part = af.part_id();
        let delta = text.to_owned();
        if reasoning {
            let id = match &self.reasoning {
                Some(id) if self.reasoning_part.as_deref() == part => id.clone(),
                _ => {
                    self.close_parts(out);
                    let id = format!("reasoning-{seq}");
                    self.open_named(true, part, &id);
                    self.reasoning = Some(id.clone());
                    self.reasoning_part = part.map(str::to_owned);
                    out.push(Chunk::ReasoningStart { id: id.clone() });
                    id
                }
            };
            out.push(Chunk::ReasoningDelta { id, delta });
        } else {
            self.root_text = true;
            let id = match &self.text {
                Some(id) if self.text_part.as_deref() == part => id.clone(),
                _ => {
                    self.close_parts(out);
                    let id = format!("text-{seq}");
                    self.open_named(false, part, &id);
                    self.text = Some(id.clone());
                    self.text_part = part.map(str::to_owned);
                    out.push(Chunk::TextStart { id: id.clone() });
                    id
                }
            };
            out.push(Chunk::TextDelta { id, delta });
        }
    }

    fn open_named(&mut self, reasoning: bool, part: Option<&str>, id: &str) {
        if let Some(p) = part {
            self.named.insert((reasoning, p.to_owned()), id.to_owned());
        }
    }

    /// A root `text_replace`: the part it names now reads its text.
    fn replace(&mut self, seq: u64, af: AfEvent, out: &mut Vec<Chunk>) {
        let Some(text) = af.text() else {
            out.push(transient("agentflow", af.raw));
            return;
        };
        let reasoning = af.is_reasoning();
        let sent = af
            .part_id()
            .and_then(|p| self.named.get(&(reasoning, p.to_owned())));
        match sent {
            Some(id) => {
                let mut data = Map::new();
                data.insert("id".into(), Value::String(id.clone()));
                data.insert("text".into(), Value::String(text.to_owned()));
                if !reasoning {
                    self.root_text = true;
                }
                out.push(transient("text-replace", Value::Object(data)));
            }
            // Nothing of the part was sent yet: its whole text is new.
            None => self.root_delta(seq, af, out),
        }
    }

    /// A piece of a tool's input: the call's part opens on the first one.
    fn tool_input_delta(&mut self, seq: u64, af: &AfEvent, out: &mut Vec<Chunk>) {
        let call_id = Self::call_id(seq, af);
        if !self.tools.contains_key(&call_id) {
            self.close_parts(out);
            out.push(Chunk::ToolInputStart {
                tool_call_id: call_id.clone(),
                tool_name: af.tool_name().to_owned(),
            });
            self.tools
                .insert(call_id.clone(), af.tool_name().to_owned());
        }
        if let Some(text) = af.text().filter(|t| !t.is_empty()) {
            out.push(Chunk::ToolInputDelta {
                tool_call_id: call_id,
                input_text_delta: text.to_owned(),
            });
        }
    }

    fn call_id(seq: u64, af: &AfEvent) -> String {
        match &af.call_id {
            Some(id) if !id.is_empty() => id.clone(),
            _ => format!("call-{seq}"),
        }
    }

    /// A nested `start`: a new tool part (closing open text so later text follows it), or
    /// the input of a call whose input was streaming.
    fn tool_start(&mut self, seq: u64, af: &AfEvent, out: &mut Vec<Chunk>) {
        let call_id = Self::call_id(seq, af);
        match self.tools.get(&call_id).cloned() {
            Some(name) => {
                self.close_parts(out);
                out.push(Chunk::ToolInputAvailable {
                    tool_call_id: call_id,
                    tool_name: name,
                    input: af.tool_input().clone(),
                });
            }
            None => self.open_tool(call_id, af.tool_name(), af.tool_input().clone(), out),
        }
    }

    fn open_tool(&mut self, call_id: String, name: &str, input: Value, out: &mut Vec<Chunk>) {
        self.close_parts(out);
        out.push(Chunk::ToolInputStart {
            tool_call_id: call_id.clone(),
            tool_name: name.to_owned(),
        });
        out.push(Chunk::ToolInputAvailable {
            tool_call_id: call_id.clone(),
            tool_name: name.to_owned(),
            input,
        });
        self.tools.insert(call_id, name.to_owned());
    }

    /// The call id of a nested `end`/`error`, after giving the client a tool part for it if
    /// its `start` was never seen (a client rejects output for an unknown call).
    fn ensure_tool(&mut self, seq: u64, af: &AfEvent, out: &mut Vec<Chunk>) -> String {
        let call_id = Self::call_id(seq, af);
        if !self.tools.contains_key(&call_id) {
            self.open_tool(call_id.clone(), af.tool_name(), Value::Null, out);
        }
        call_id
    }

    fn terminal(&mut self, seq: u64, af: &AfEvent, out: &mut Vec<Chunk>) {
        match agentflow::terminal(af) {
            Some(Terminal::Completed) => {
                if !self.root_text {
                    if let Some(text) = af.final_text().filter(|t| !t.is_empty()) {
                        self.close_parts(out);
                        let id = format!("text-{seq}");
                        out.push(Chunk::TextStart { id: id.clone() });
                        out.push(Chunk::TextDelta {
                            id: id.clone(),
                            delta: text.to_owned(),
                        });
                        out.push(Chunk::TextEnd { id });
                    }
                }
                self.close_parts(out);
                out.push(Chunk::FinishStep);
                out.push(Chunk::Finish);
            }
            Some(Terminal::Error(message)) => {
                self.close_parts(out);
                if af.sluice_status() == Some("stopped") {
                    out.push(Chunk::Abort);
                } else {
                    out.push(Chunk::Error {
                        error_text: message,
                    });
                }
            }
            // Only called for root end/error, which are always terminal.
            None => return,
        }
        self.finished = true;
    }
}

fn push_or_opaque(chunk: Option<Chunk>, af: AfEvent, out: &mut Vec<Chunk>) {
    match chunk {
        Some(c) => out.push(c),
        None => out.push(transient("agentflow", af.raw)),
    }
}

fn content_str<'a>(af: &'a AfEvent, key: &str) -> Option<&'a str> {
    af.content()?.get(key)?.as_str()
}

/// A `source` event as `source-url` (it has a `url`) or `source-document` (`media_type` and
/// `title`); `None` when it has neither.
fn source(af: &AfEvent) -> Option<Chunk> {
    let source_id = content_str(af, "source_id")?.to_owned();
    let title = content_str(af, "title").map(str::to_owned);
    let document = content_str(af, "source_type") == Some("document");
    match (content_str(af, "url"), document) {
        (Some(url), false) => Some(Chunk::SourceUrl {
            source_id,
            url: url.to_owned(),
            title,
        }),
        _ => Some(Chunk::SourceDocument {
            source_id,
            media_type: content_str(af, "media_type")?.to_owned(),
            title: title?,
            filename: content_str(af, "filename").map(str::to_owned),
        }),
    }
}

/// A `file` event; `None` without `url` and `media_type`.
fn file(af: &AfEvent) -> Option<Chunk> {
    Some(Chunk::File {
        url: content_str(af, "url")?.to_owned(),
        media_type: content_str(af, "media_type")?.to_owned(),
    })
}

/// A `data` event as `data-<name>`; `None` without a non-empty `name`.
fn data(af: &AfEvent) -> Option<Chunk> {
    let name = content_str(af, "name").filter(|n| !n.is_empty())?;
    let content = af.content()?;
    Some(Chunk::Data {
        name: name.to_owned(),
        id: content_str(af, "id").map(str::to_owned),
        data: content.get("data").cloned().unwrap_or(Value::Null),
        transient: content.get("transient").and_then(Value::as_bool) == Some(true),
    })
}

fn opt_str(s: Option<&str>) -> Value {
    s.map_or(Value::Null, |s| Value::String(s.to_owned()))
}

fn artifact(af: &AfEvent, status: &str) -> Chunk {
    let id = af.artifact_id().to_owned();
    let mut data = Map::new();
    data.insert("artifactId".into(), Value::String(id.clone()));
    data.insert("status".into(), Value::String(status.to_owned()));
    data.insert("callId".into(), opt_str(af.call_id.as_deref()));
    data.insert(
        "content".into(),
        af.content().cloned().unwrap_or(Value::Null),
    );
    Chunk::Data {
        name: "artifact".into(),
        id: Some(id),
        data: Value::Object(data),
        transient: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn events(vs: &[Value]) -> Vec<Event> {
        vs.iter()
            .enumerate()
            .map(|(i, v)| Event {
                seq: i as u64 + 1,
                data: v.to_string().into(),
            })
            .collect()
    }

    /// Render `vs` as events 1..n; the chunks of each event, as JSON values.
    fn per_event(vs: &[Value]) -> Vec<Vec<Value>> {
        let mut r = UiRenderer::new("m".into());
        events(vs)
            .iter()
            .map(|ev| {
                let mut out = Vec::new();
                r.render(ev, &mut out);
                out.iter()
                    .map(|c| serde_json::from_str(&c.to_json()).expect("chunk JSON"))
                    .collect()
            })
            .collect()
    }

    fn all(vs: &[Value]) -> Vec<Value> {
        per_event(vs).into_iter().flatten().collect()
    }

    fn start_chunks() -> Vec<Value> {
        vec![
            json!({"type":"start","messageId":"m"}),
            json!({"type":"start-step"}),
        ]
    }

    #[test]
    fn first_event_gets_start_whatever_it_is() {
        assert_eq!(per_event(&[json!({"type":"start"})]), vec![start_chunks()]);
        let got = per_event(&[json!({"type":"delta","content":"hi"})]);
        let mut want = start_chunks();
        want.push(json!({"type":"text-start","id":"text-1"}));
        want.push(json!({"type":"text-delta","id":"text-1","delta":"hi"}));
        assert_eq!(got, vec![want]);
        let got = per_event(&[json!({"type":"mystery"}), json!({"type":"start"})]);
        assert_eq!(got[0][..2], start_chunks()[..]);
        assert_eq!(got[1], Vec::<Value>::new());
    }

    #[test]
    fn root_text_deltas_share_one_part() {
        let got = per_event(&[
            json!({"type":"start"}),
            json!({"type":"delta","content":"Hel"}),
            json!({"type":"delta","content":"lo"}),
            json!({"type":"end","content":"Hello"}),
        ]);
        assert_eq!(
            got[1],
            vec![
                json!({"type":"text-start","id":"text-2"}),
                json!({"type":"text-delta","id":"text-2","delta":"Hel"})
            ]
        );
        assert_eq!(
            got[2],
            vec![json!({"type":"text-delta","id":"text-2","delta":"lo"})]
        );
        // Text was streamed, so the final response is not repeated.
        assert_eq!(
            got[3],
            vec![
                json!({"type":"text-end","id":"text-2"}),
                json!({"type":"finish-step"}),
                json!({"type":"finish"})
            ]
        );
    }

    #[test]
    fn legacy_upper_case_delta() {
        let got = per_event(&[
            json!({"type":"START"}),
            json!({"type":"DELTA","delta":"old"}),
            json!({"type":"END"}),
        ]);
        assert_eq!(
            got[1],
            vec![
                json!({"type":"text-start","id":"text-2"}),
                json!({"type":"text-delta","id":"text-2","delta":"old"})
            ]
        );
        assert_eq!(got[2].last(), Some(&json!({"type":"finish"})));
    }

    #[test]
    fn reasoning_then_text_then_reasoning() {
        let got = per_event(&[
            json!({"type":"start"}),
            json!({"type":"delta","content":"think","metadata":{"reasoning":true}}),
            json!({"type":"delta","content":"more","metadata":{"content_type":"reasoning"}}),
            json!({"type":"delta","content":"answer"}),
            json!({"type":"delta","content":"again","metadata":{"reasoning":true}}),
            json!({"type":"end"}),
        ]);
        assert_eq!(
            got[1],
            vec![
                json!({"type":"reasoning-start","id":"reasoning-2"}),
                json!({"type":"reasoning-delta","id":"reasoning-2","delta":"think"})
            ]
        );
        assert_eq!(
            got[2],
            vec![json!({"type":"reasoning-delta","id":"reasoning-2","delta":"more"})]
        );
        assert_eq!(
            got[3],
            vec![
                json!({"type":"reasoning-end","id":"reasoning-2"}),
                json!({"type":"text-start","id":"text-4"}),
                json!({"type":"text-delta","id":"text-4","delta":"answer"})
            ]
        );
        assert_eq!(
            got[4],
            vec![
                json!({"type":"text-end","id":"text-4"}),
                json!({"type":"reasoning-start","id":"reasoning-5"}),
                json!({"type":"reasoning-delta","id":"reasoning-5","delta":"again"})
            ]
        );
        assert_eq!(
            got[5],
            vec![
                json!({"type":"reasoning-end","id":"reasoning-5"}),
                json!({"type":"finish-step"}),
                json!({"type":"finish"})
            ]
        );
    }

    #[test]
    fn empty_and_textless_root_deltas() {
        let got = per_event(&[
            json!({"type":"start"}),
            json!({"type":"delta","content":""}),
            json!({"type":"delta","content":{"odd":1}}),
        ]);
        assert_eq!(got[1], Vec::<Value>::new());
        assert_eq!(
            got[2],
            vec![
                json!({"type":"data-agentflow","data":{"type":"delta","content":{"odd":1}},"transient":true})
            ]
        );
    }

    #[test]
    fn final_text_when_nothing_streamed() {
        let got = per_event(&[
            json!({"type":"start"}),
            json!({"type":"delta","content":"hmm","metadata":{"reasoning":true}}),
            json!({"type":"end","content":{"response":"The answer"}}),
        ]);
        assert_eq!(
            got[2],
            vec![
                json!({"type":"reasoning-end","id":"reasoning-2"}),
                json!({"type":"text-start","id":"text-3"}),
                json!({"type":"text-delta","id":"text-3","delta":"The answer"}),
                json!({"type":"text-end","id":"text-3"}),
                json!({"type":"finish-step"}),
                json!({"type":"finish"})
            ]
        );
        // An empty final text adds no part.
        let got = per_event(&[json!({"type":"end","content":""})]);
        let mut want = start_chunks();
        want.extend([json!({"type":"finish-step"}), json!({"type":"finish"})]);
        assert_eq!(got, vec![want]);
    }

    #[test]
    fn nested_tool_with_start() {
        let got = per_event(&[
            json!({"type":"start","call_id":"r"}),
            json!({"type":"delta","call_id":"r","content":"Let me look"}),
            json!({"type":"start","call_id":"t1","parent_call_id":"r",
                   "content":{"tool_name":"search","input":{"q":"w"}}}),
            json!({"type":"end","call_id":"t1","parent_call_id":"r","content":{"output":{"ok":true}}}),
            json!({"type":"delta","call_id":"r","content":"Found"}),
        ]);
        assert_eq!(
            got[2],
            vec![
                json!({"type":"text-end","id":"text-2"}),
                json!({"type":"tool-input-start","toolCallId":"t1","providerExecuted":true,"toolName":"search"}),
                json!({"type":"tool-input-available","toolCallId":"t1","providerExecuted":true,"toolName":"search","input":{"q":"w"}})
            ]
        );
        assert_eq!(
            got[3],
            vec![
                json!({"type":"tool-output-available","toolCallId":"t1","providerExecuted":true,"output":{"ok":true}})
            ]
        );
        assert_eq!(
            got[4],
            vec![
                json!({"type":"text-start","id":"text-5"}),
                json!({"type":"text-delta","id":"text-5","delta":"Found"})
            ]
        );
    }

    #[test]
    fn nested_tool_without_start() {
        let got = per_event(&[
            json!({"type":"start","call_id":"r"}),
            json!({"type":"end","call_id":"t9","root_call_id":"r","content":{"result":5},
                   "metadata":{"display_name":"Calc"}}),
            json!({"type":"error","call_id":"t8","parent_call_id":"r","content":{"error":"nope"}}),
            json!({"type":"error","call_id":"t9","parent_call_id":"r","content":"late"}),
        ]);
        assert_eq!(
            got[1],
            vec![
                json!({"type":"tool-input-start","toolCallId":"t9","providerExecuted":true,"toolName":"Calc"}),
                json!({"type":"tool-input-available","toolCallId":"t9","providerExecuted":true,"toolName":"Calc","input":null}),
                json!({"type":"tool-output-available","toolCallId":"t9","providerExecuted":true,"output":5})
            ]
        );
        assert_eq!(
            got[2],
            vec![
                json!({"type":"tool-input-start","toolCallId":"t8","providerExecuted":true,"toolName":"tool"}),
                json!({"type":"tool-input-available","toolCallId":"t8","providerExecuted":true,"toolName":"tool","input":null}),
                json!({"type":"tool-output-error","toolCallId":"t8","providerExecuted":true,"errorText":"nope"})
            ]
        );
        // t9 is known by now: no second input.
        assert_eq!(
            got[3],
            vec![
                json!({"type":"tool-output-error","toolCallId":"t9","providerExecuted":true,"errorText":"late"})
            ]
        );
    }

    #[test]
    fn nested_error_is_not_terminal() {
        let got = per_event(&[
            json!({"type":"error","call_id":"t","parent_call_id":"r","content":"x"}),
            json!({"type":"delta","content":"still here"}),
        ]);
        assert_eq!(got[1].len(), 2);
    }

    #[test]
    fn nested_delta_is_transient_data() {
        let got = per_event(&[
            json!({"type":"start"}),
            json!({"type":"delta","call_id":"t","parent_call_id":"r","content":"sub"}),
            json!({"type":"DELTA","call_id":"t","parent_call_id":"r","delta":"old"}),
        ]);
        assert_eq!(
            got[1],
            vec![
                json!({"type":"data-call-delta","data":{"callId":"t","delta":"sub"},"transient":true})
            ]
        );
        assert_eq!(
            got[2],
            vec![
                json!({"type":"data-call-delta","data":{"callId":"t","delta":"old"},"transient":true})
            ]
        );
    }

    #[test]
    fn progress_events_are_transient_data() {
        for (ty, name) in [
            ("tool_progress", "data-tool-progress"),
            ("TOOL_RESULT_DELTA", "data-tool-result-delta"),
            ("artifact_progress", "data-artifact-progress"),
            ("artifact_result_delta", "data-artifact-result-delta"),
        ] {
            let payload = json!({"type":ty,"call_id":"t","content":{"pct":5}});
            let got = per_event(&[json!({"type":"start"}), payload.clone()]);
            assert_eq!(
                got[1],
                vec![json!({"type":name,"data":payload,"transient":true})]
            );
        }
    }

    #[test]
    fn artifacts_are_keyed_data() {
        let got = per_event(&[
            json!({"type":"start"}),
            json!({"type":"artifact_started","call_id":"c","content":{"artifact_id":"a1","title":"T"}}),
            json!({"type":"artifact_completed","content":{"artifact_id":"a1","url":"u"}}),
            json!({"type":"artifact_error","metadata":{"artifact_id":"a2"}}),
        ]);
        assert_eq!(
            got[1],
            vec![json!({"type":"data-artifact","id":"a1","data":{
                "artifactId":"a1","status":"started","callId":"c","content":{"artifact_id":"a1","title":"T"}}})]
        );
        assert_eq!(
            got[2],
            vec![json!({"type":"data-artifact","id":"a1","data":{
                "artifactId":"a1","status":"completed","callId":null,"content":{"artifact_id":"a1","url":"u"}}})]
        );
        assert_eq!(
            got[3],
            vec![json!({"type":"data-artifact","id":"a2","data":{
                "artifactId":"a2","status":"error","callId":null,"content":null}})]
        );
    }

    #[test]
    fn unknown_types_and_garbage() {
        let mut r = UiRenderer::new("m".into());
        let mut out = Vec::new();
        r.render(
            &Event {
                seq: 1,
                data: "{\"type\":\"APPROVAL_REQUIRED\",\"x\":1}".into(),
            },
            &mut out,
        );
        assert_eq!(
            out[2].to_json(),
            r#"{"type":"data-agentflow","data":{"type":"APPROVAL_REQUIRED","x":1},"transient":true}"#
        );
        for garbage in [&b"not json \"\n"[..], b"[1]", b"{}", b"\xff\xfe", b""] {
            out.clear();
            r.render(
                &Event {
                    seq: 2,
                    data: bytes::Bytes::copy_from_slice(garbage),
                },
                &mut out,
            );
            assert_eq!(out.len(), 1);
            let v: Value = serde_json::from_str(&out[0].to_json()).expect("JSON");
            assert_eq!(v["type"], "data-agentflow");
            assert_eq!(v["transient"], true);
            assert_eq!(
                v["data"],
                Value::String(String::from_utf8_lossy(garbage).into_owned())
            );
        }
    }

    #[test]
    fn root_error_closes_parts_and_ends() {
        let got = per_event(&[
            json!({"type":"start"}),
            json!({"type":"delta","content":"par"}),
            json!({"type":"error","content":{"message":"provider key missing"}}),
            json!({"type":"delta","content":"after"}),
            json!({"type":"end"}),
        ]);
        assert_eq!(
            got[2],
            vec![
                json!({"type":"text-end","id":"text-2"}),
                json!({"type":"error","errorText":"provider key missing"})
            ]
        );
        assert!(got[3].is_empty() && got[4].is_empty());
    }

    #[test]
    fn synthetic_terminals() {
        for (status, last) in [
            ("error", json!({"type":"error","errorText":"upstream died"})),
            (
                "timeout",
                json!({"type":"error","errorText":"upstream died"}),
            ),
            ("stopped", json!({"type":"abort"})),
        ] {
            let syn = agentflow::synthetic_error(status, "upstream died");
            let syn: Value = serde_json::from_slice(&syn).expect("JSON");
            let got = per_event(&[
                json!({"type":"start"}),
                json!({"type":"delta","content":"x","metadata":{"reasoning":true}}),
                syn,
            ]);
            assert_eq!(
                got[2],
                vec![json!({"type":"reasoning-end","id":"reasoning-2"}), last]
            );
        }
    }

    #[test]
    fn nothing_after_end() {
        let got = all(&[
            json!({"type":"end","content":"a"}),
            json!({"type":"delta","content":"b"}),
            json!({"type":"start","call_id":"t","parent_call_id":"r"}),
            json!({"type":"error"}),
        ]);
        assert_eq!(got.last(), Some(&json!({"type":"finish"})));
        assert_eq!(got.len(), 7);
    }

    fn sse(vs: &[Value]) -> String {
        let mut r = UiRenderer::new("m".into());
        let mut out = Vec::new();
        for ev in events(vs) {
            r.render_sse(&ev, &mut out);
        }
        String::from_utf8(out).expect("utf8")
    }

    #[test]
    fn sse_ids_follow_the_k_j_scheme() {
        let got = sse(&[
            json!({"type":"start"}),
            json!({"type":"delta","content":"a"}),
            json!({"type":"delta","content":"b"}),
            json!({"type":"mystery"}),
            json!({"type":"delta","content":""}),
            json!({"type":"end"}),
        ]);
        let want = "id: 1.1\ndata: {\"type\":\"start\",\"messageId\":\"m\"}\n\n\
id: 1\ndata: {\"type\":\"start-step\"}\n\n\
id: 2.1\ndata: {\"type\":\"text-start\",\"id\":\"text-2\"}\n\n\
id: 2\ndata: {\"type\":\"text-delta\",\"id\":\"text-2\",\"delta\":\"a\"}\n\n\
id: 3\ndata: {\"type\":\"text-delta\",\"id\":\"text-2\",\"delta\":\"b\"}\n\n\
id: 4\ndata: {\"type\":\"data-agentflow\",\"data\":{\"type\":\"mystery\"},\"transient\":true}\n\n\
id: 6.1\ndata: {\"type\":\"text-end\",\"id\":\"text-2\"}\n\n\
id: 6.2\ndata: {\"type\":\"finish-step\"}\n\n\
id: 6\ndata: {\"type\":\"finish\"}\n\n";
        assert_eq!(got, want);
    }

    #[test]
    fn sse_from_skips_leading_chunks() {
        let evs = events(&[json!({"type":"start"}), json!({"type":"end","content":"x"})]);
        let mut r = UiRenderer::new("m".into());
        r.skip(&evs[0]);
        let mut out = Vec::new();
        r.render_sse_from(&evs[1], 2, &mut out);
        assert_eq!(
            String::from_utf8(out).expect("utf8"),
            "id: 2.3\ndata: {\"type\":\"text-end\",\"id\":\"text-2\"}\n\n\
id: 2.4\ndata: {\"type\":\"finish-step\"}\n\n\
id: 2\ndata: {\"type\":\"finish\"}\n\n"
        );
        // Skipping more chunks than there are writes nothing, but still advances.
        let mut r = UiRenderer::new("m".into());
        let mut out = Vec::new();
        r.render_sse_from(&evs[0], 9, &mut out);
        assert!(out.is_empty());
        r.render_sse(&evs[1], &mut out);
        assert!(String::from_utf8(out)
            .expect("utf8")
            .starts_with("id: 2.1\ndata: {\"type\":\"text-start\""));
    }

    #[test]
    fn skip_restores_state_without_a_second_start() {
        let evs = events(&[
            json!({"type":"start"}),
            json!({"type":"delta","content":"a"}),
            json!({"type":"delta","content":"b"}),
        ]);
        let mut r = UiRenderer::new("m".into());
        r.skip(&evs[0]);
        r.skip(&evs[1]);
        let mut out = Vec::new();
        r.render_sse(&evs[2], &mut out);
        assert_eq!(
            String::from_utf8(out).expect("utf8"),
            "id: 3\ndata: {\"type\":\"text-delta\",\"id\":\"text-2\",\"delta\":\"b\"}\n\n"
        );
    }

    #[test]
    fn cursor_parsing() {
        assert_eq!(Cursor::parse("7"), Some(Cursor::after(7)));
        assert_eq!(Cursor::parse("0"), Some(Cursor::after(0)));
        assert_eq!(
            Cursor::parse("12.3"),
            Some(Cursor {
                seq: 12,
                chunk: Some(3)
            })
        );
        for bad in [
            "",
            ".",
            "7.",
            ".3",
            "7.0",
            "+7",
            "-1",
            "7.+1",
            "7.1.2",
            " 7",
            "7 ",
            "a",
            "1e3",
            "99999999999999999999999",
            "1.99999999999",
        ] {
            assert_eq!(Cursor::parse(bad), None, "{bad:?}");
        }
        for s in ["0", "7", "12.3", "18446744073709551615.4294967295"] {
            assert_eq!(Cursor::parse(s).map(|c| c.to_string()).as_deref(), Some(s));
        }
        let c = Cursor {
            seq: 5,
            chunk: Some(2),
        };
        assert!(c.covers(4) && !c.covers(5) && !c.covers(6));
        assert!(Cursor::after(5).covers(5) && !Cursor::after(5).covers(6));
    }

    #[test]
    fn resume_after_cursor_gives_the_suffix() {
        let vs = [
            json!({"type":"start"}),
            json!({"type":"delta","content":"a"}),
            json!({"type":"end","content":"a"}),
        ];
        let full = sse(&vs);
        let evs = events(&vs);
        for (cursor, tail_from) in [("1.1", "id: 1\n"), ("2.1", "id: 2\n"), ("3.1", "id: 3.2\n")] {
            let c = Cursor::parse(cursor).expect("cursor");
            let mut r = UiRenderer::new("m".into());
            let mut out = Vec::new();
            for ev in &evs {
                r.render_sse_after(ev, c, &mut out);
            }
            let at = full.find(tail_from).expect("frame");
            assert_eq!(String::from_utf8(out).expect("utf8"), full[at..]);
        }
    }

    #[test]
    fn put_u64_digits() {
        for n in [0u64, 7, 10, 12345, u64::MAX] {
            let mut out = b"x".to_vec();
            crate::render::put_u64(&mut out, n);
            assert_eq!(out, format!("x{n}").into_bytes());
        }
    }

    /// Events built by `crate::ingest::events`, as JSON values.
    fn values(events: &[crate::event::NewEvent]) -> Vec<Value> {
        events
            .iter()
            .map(|e| serde_json::from_slice(&e.data).expect("JSON"))
            .collect()
    }

    #[test]
    fn named_parts_open_and_replace() {
        let b = crate::ingest::events::Events::new("r");
        let vs = values(&[
            b.delta("p1", "Hel", false),
            b.delta("p1", "lo", false),
            b.delta("p2", "More", false),
            b.text_replace("p1", "Howdy", false),
            b.text_replace("p3", "Fresh", false),
            b.delta("p4", "hm", true),
            b.text_replace("p4", "hmm!", true),
        ]);
        let got = per_event(&vs);
        assert_eq!(
            got[1],
            vec![json!({"type":"text-delta","id":"text-1","delta":"lo"})]
        );
        assert_eq!(
            got[2],
            vec![
                json!({"type":"text-end","id":"text-1"}),
                json!({"type":"text-start","id":"text-3"}),
                json!({"type":"text-delta","id":"text-3","delta":"More"})
            ]
        );
        assert_eq!(
            got[3],
            vec![
                json!({"type":"data-text-replace","data":{"id":"text-1","text":"Howdy"},"transient":true})
            ]
        );
        // A part never sent: its whole text opens it.
        assert_eq!(
            got[4],
            vec![
                json!({"type":"text-end","id":"text-3"}),
                json!({"type":"text-start","id":"text-5"}),
                json!({"type":"text-delta","id":"text-5","delta":"Fresh"})
            ]
        );
        assert_eq!(
            got[6],
            vec![
                json!({"type":"data-text-replace","data":{"id":"reasoning-6","text":"hmm!"},"transient":true})
            ]
        );
    }

    #[test]
    fn streamed_tool_input_then_available() {
        let b = crate::ingest::events::Events::new("r");
        let vs = values(&[
            b.delta("p0", "x", false),
            b.tool_input_delta("c1", "search", "{\"q\":"),
            b.tool_input_delta("c1", "search", "1}"),
            b.tool_start("c1", "search", json!({"q":1})),
            b.tool_end("c1", json!("ok")),
        ]);
        let got = per_event(&vs);
        assert_eq!(
            got[1],
            vec![
                json!({"type":"text-end","id":"text-1"}),
                json!({"type":"tool-input-start","toolCallId":"c1","providerExecuted":true,"toolName":"search"}),
                json!({"type":"tool-input-delta","toolCallId":"c1","inputTextDelta":"{\"q\":"})
            ]
        );
        assert_eq!(
            got[2],
            vec![json!({"type":"tool-input-delta","toolCallId":"c1","inputTextDelta":"1}"})]
        );
        assert_eq!(
            got[3],
            vec![
                json!({"type":"tool-input-available","toolCallId":"c1","providerExecuted":true,"toolName":"search","input":{"q":1}})
            ]
        );
        let m = crate::render::fold::fold("m", &events(&vs));
        assert_eq!(
            m["parts"][2],
            json!({"type":"tool-search","toolCallId":"c1","providerExecuted":true,"state":"output-available","input":{"q":1},"output":"ok"})
        );
    }

    #[test]
    fn sources_files_and_data() {
        let b = crate::ingest::events::Events::new("r");
        let mut vs = values(&[
            b.source_url("s1", "https://e.x", Some("E")),
            b.source_document("d1", "application/pdf", "Doc", Some("d.pdf")),
            b.file("data:image/png;base64,AA==", "image/png"),
            b.data("weather", Some("w"), json!({"t":21}), false),
            b.data("ping", None, json!(1), true),
        ]);
        // Without the fields they need: kept opaque.
        vs.push(json!({"type":"source","content":{"source_id":"x"}}));
        vs.push(json!({"type":"file","content":{"url":"u"}}));
        vs.push(json!({"type":"data","content":{"data":1}}));
        let got = per_event(&vs);
        assert_eq!(
            got[0][2],
            json!({"type":"source-url","sourceId":"s1","url":"https://e.x","title":"E"})
        );
        assert_eq!(
            got[1],
            vec![
                json!({"type":"source-document","sourceId":"d1","mediaType":"application/pdf","title":"Doc","filename":"d.pdf"})
            ]
        );
        assert_eq!(
            got[2],
            vec![json!({"type":"file","url":"data:image/png;base64,AA==","mediaType":"image/png"})]
        );
        assert_eq!(
            got[3],
            vec![json!({"type":"data-weather","id":"w","data":{"t":21}})]
        );
        assert_eq!(
            got[4],
            vec![json!({"type":"data-ping","data":1,"transient":true})]
        );
        for g in &got[5..] {
            assert_eq!(g.len(), 1);
            assert_eq!(g[0]["type"], "data-agentflow");
        }
        let m = crate::render::fold::fold("m", &events(&vs));
        assert_eq!(
            m["parts"],
            json!([
                {"type":"step-start"},
                {"type":"source-url","sourceId":"s1","url":"https://e.x","title":"E"},
                {"type":"source-document","sourceId":"d1","mediaType":"application/pdf","title":"Doc","filename":"d.pdf"},
                {"type":"file","mediaType":"image/png","url":"data:image/png;base64,AA=="},
                {"type":"data-weather","id":"w","data":{"t":21}}
            ])
        );
    }
}
