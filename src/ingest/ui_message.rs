//! The UI-message adapter: a dialect-A backend in streaming mode (`POST {upstream}{invoke_path}`
//! answering the AI SDK UI-message stream, research/protocols.md §1), rewritten chunk by chunk
//! into the run log's events (`crate::ingest::events`; the table is `docs/transcoding.md`).
//!
//! [`ChunkMapper`] is the pure part: one chunk in, zero or more events out, and whether the run
//! ended. It follows the client's reading of the stream (`processUIMessageStream`) and is
//! lenient where the client would throw (a delta for a part never started opens it). Chunk
//! types it does not know (v6 and v7 additions such as `tool-approval-request`, `custom`,
//! `reasoning-file`, `reset-step`) and `message-metadata` are kept as opaque `ui_chunk` events,
//! never failing the run; only a chunk that is not a JSON object with a string `type` is
//! malformed. Sluice's own `data-*` conventions for AgentFlow events (transient progress
//! payloads, `data-call-delta`, `data-artifact`, `data-text-replace`) are read back into those
//! events, so a
//! Sluice-rendered stream ingested again gives the same log content.
//!
//! Endings: `finish` (or `[DONE]` before it) completes the run; `error` fails it with its
//! text; `abort` ends it `stopped`; a stream that closes before any of them is `dropped`.
//!
//! A run taken over from another instance cannot be continued (the dialect has no way to rejoin
//! a run, and asking again would start a second one): it ends `error` (the default
//! [`Adapter::resume`]).

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use pingora::connectors::http::Connector;
use serde_json::{json, Value};

use super::answer::{self, SseBody};
use super::events::Events;
use super::invoke::{self, InvokeTarget};
use super::{Adapter, Ending, Failure, RunJob, RunSink};
use crate::agentflow::AfKind;
use crate::event::NewEvent;
use crate::store::RunStatus;

/// How a chunk ended the run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChunkEnd {
    /// `finish`: the run's root `end` (not written to the batch: it closes the run).
    Finished(NewEvent),
    /// `error`: the run's root `error` with this text (not written to the batch either).
    Error(String, NewEvent),
    /// `abort`: nothing was written; the run ends `stopped`.
    Aborted,
}

impl ChunkEnd {
    /// The event that closes the run, if the ending has one.
    pub fn closing(&self) -> Option<&NewEvent> {
        match self {
            ChunkEnd::Finished(e) | ChunkEnd::Error(_, e) => Some(e),
            ChunkEnd::Aborted => None,
        }
    }
}

/// Rewrites one run's UI-message chunks into log events. Pure.
#[derive(Debug)]
pub struct ChunkMapper {
    ev: Events,
    started: bool,
    /// Open text parts: the backend's chunk id → the log's `part_id`.
    text: HashMap<String, String>,
    /// Open reasoning parts, likewise.
    reasoning: HashMap<String, String>,
    /// Every part opened, open or not: (reasoning?, the backend's chunk id) → `part_id`, for
    /// Sluice's own `data-text-replace`.
    named: HashMap<(bool, String), String>,
    /// Parts opened so far (for fresh `part_id`s).
    opened: u64,
    /// Tool calls seen: call id → tool name.
    tools: HashMap<String, String>,
}

fn s<'a>(chunk: &'a Value, key: &str) -> Option<&'a str> {
    chunk.get(key)?.as_str()
}

impl ChunkMapper {
    /// A mapper whose nested calls name `root` as their parent.
    pub fn new(root: impl Into<String>) -> ChunkMapper {
        ChunkMapper {
            ev: Events::new(root),
            started: false,
            text: HashMap::new(),
            reasoning: HashMap::new(),
            named: HashMap::new(),
            opened: 0,
            tools: HashMap::new(),
        }
    }

    /// The root `start`, once, before anything else.
    fn ensure_started(&mut self, out: &mut Vec<NewEvent>) {
        if !self.started {
            self.started = true;
            out.push(self.ev.start());
        }
    }

    fn part(&mut self, reasoning: bool, id: &str) -> String {
        let open = if reasoning {
            &mut self.reasoning
        } else {
            &mut self.text
        };
        if let Some(p) = open.get(id) {
            return p.clone();
        }
        self.opened += 1;
        let p = format!("{}{}", if reasoning { "r" } else { "t" }, self.opened);
        open.insert(id.to_owned(), p.clone());
        self.named.insert((reasoning, id.to_owned()), p.clone());
        p
    }

    fn tool_name(&self, chunk: &Value, call: &str) -> String {
        s(chunk, "toolName")
            .map(str::to_owned)
            .or_else(|| self.tools.get(call).cloned())
            .unwrap_or_else(|| "tool".into())
    }

    /// Map one chunk, appending its events to `out`. `Err` when the chunk is not a JSON object
    /// with a string `type`.
    pub fn map(
        &mut self,
        chunk: &Value,
        out: &mut Vec<NewEvent>,
    ) -> Result<Option<ChunkEnd>, String> {
        let ty = chunk
            .as_object()
            .ok_or("a UI-message chunk must be a JSON object")?
            .get("type")
            .and_then(Value::as_str)
            .ok_or("a UI-message chunk has no string \"type\"")?;
        self.ensure_started(out);
        let call = s(chunk, "toolCallId").unwrap_or("").to_owned();
        match ty {
            "start" => {
                if chunk.get("messageMetadata").is_some() {
                    out.push(self.ev.ui_chunk(chunk.clone()));
                }
            }
            "start-step" | "finish-step" => {}
            "text-start" | "reasoning-start" => {
                let id = s(chunk, "id").unwrap_or("");
                let reasoning = ty == "reasoning-start";
                // A fresh part, even when the backend reuses a closed part's id.
                if reasoning {
                    self.reasoning.remove(id);
                } else {
                    self.text.remove(id);
                }
                self.part(reasoning, id);
            }
            "text-delta" | "reasoning-delta" => {
                let reasoning = ty == "reasoning-delta";
                let part = self.part(reasoning, s(chunk, "id").unwrap_or(""));
                if let Some(delta) = s(chunk, "delta").filter(|d| !d.is_empty()) {
                    out.push(self.ev.delta(&part, delta, reasoning));
                }
            }
            "text-end" => {
                self.text.remove(s(chunk, "id").unwrap_or(""));
            }
            "reasoning-end" => {
                self.reasoning.remove(s(chunk, "id").unwrap_or(""));
            }
            "tool-input-start" => {
                let name = self.tool_name(chunk, &call);
                self.tools.insert(call.clone(), name.clone());
                out.push(self.ev.tool_input_delta(&call, &name, ""));
            }
            "tool-input-delta" => {
                let name = self.tool_name(chunk, &call);
                self.tools.insert(call.clone(), name.clone());
                let text = s(chunk, "inputTextDelta").unwrap_or("");
                out.push(self.ev.tool_input_delta(&call, &name, text));
            }
            "tool-input-available" | "tool-input-error" => {
                let name = self.tool_name(chunk, &call);
                self.tools.insert(call.clone(), name.clone());
                let input = chunk.get("input").cloned().unwrap_or(Value::Null);
                out.push(self.ev.tool_start(&call, &name, input));
                if ty == "tool-input-error" {
                    let text = s(chunk, "errorText").unwrap_or("invalid tool input");
                    out.push(self.ev.tool_error(&call, text));
                }
            }
            "tool-output-available" => {
                let output = chunk.get("output").cloned().unwrap_or(Value::Null);
                if chunk.get("preliminary").and_then(Value::as_bool) == Some(true) {
                    out.push(self.ev.raw(json!({
                        "type": "tool_progress",
                        "call_id": call,
                        "parent_call_id": self.ev.root(),
                        "content": {"output": output, "preliminary": true},
                    })));
                } else {
                    out.push(self.ev.tool_end(&call, output));
                }
            }
            "tool-output-error" => {
                let text = s(chunk, "errorText").unwrap_or("tool failed");
                out.push(self.ev.tool_error(&call, text));
            }
            "source-url" => match (s(chunk, "sourceId"), s(chunk, "url")) {
                (Some(id), Some(url)) => out.push(self.ev.source_url(id, url, s(chunk, "title"))),
                _ => out.push(self.ev.ui_chunk(chunk.clone())),
            },
            "source-document" => {
                match (
                    s(chunk, "sourceId"),
                    s(chunk, "mediaType"),
                    s(chunk, "title"),
                ) {
                    (Some(id), Some(media), Some(title)) => {
                        out.push(
                            self.ev
                                .source_document(id, media, title, s(chunk, "filename")),
                        )
                    }
                    _ => out.push(self.ev.ui_chunk(chunk.clone())),
                }
            }
            "file" => match (s(chunk, "url"), s(chunk, "mediaType")) {
                (Some(url), Some(media)) => out.push(self.ev.file(url, media)),
                _ => out.push(self.ev.ui_chunk(chunk.clone())),
            },
            "error" => {
                let text = s(chunk, "errorText").unwrap_or("the agent backend reported an error");
                return Ok(Some(ChunkEnd::Error(text.to_owned(), self.ev.error(text))));
            }
            "finish" => {
                return Ok(Some(ChunkEnd::Finished(self.ev.end())));
            }
            "abort" => return Ok(Some(ChunkEnd::Aborted)),
            _ => match ty.strip_prefix("data-") {
                Some(name) if !name.is_empty() => out.push(self.data(name, chunk)),
                _ => out.push(self.ev.ui_chunk(chunk.clone())),
            },
        }
        Ok(None)
    }

    /// The stream ended with `[DONE]` before `finish`: the run is complete.
    pub fn done(&mut self, out: &mut Vec<NewEvent>) -> ChunkEnd {
        self.ensure_started(out);
        ChunkEnd::Finished(self.ev.end())
    }

    /// A `data-<name>` chunk: Sluice's own renderings of AgentFlow events are read back into
    /// those events; anything else is a `data` event.
    fn data(&self, name: &str, chunk: &Value) -> NewEvent {
        let data = chunk.get("data").cloned().unwrap_or(Value::Null);
        let transient = chunk.get("transient").and_then(Value::as_bool) == Some(true);
        let payload_type = data.get("type").and_then(Value::as_str);
        match (name, transient) {
            ("text-replace", true) => {
                let id = s(&data, "id").unwrap_or("");
                let named = [false, true].into_iter().find_map(|reasoning| {
                    let part = self.named.get(&(reasoning, id.to_owned()))?;
                    Some((part, reasoning))
                });
                return match (named, s(&data, "text")) {
                    (Some((part, reasoning)), Some(text)) => {
                        self.ev.text_replace(part, text, reasoning)
                    }
                    // Naming no part of this run: not Sluice's; kept opaque, never applied.
                    _ => self.ev.ui_chunk(chunk.clone()),
                };
            }
            // Only the event type each name stands for is read back, and `data-agentflow`
            // only for types Sluice does not know: a backend's data can never pose as a
            // start, text, end or error of the run.
            (
                "tool-progress"
                | "tool-result-delta"
                | "artifact-progress"
                | "artifact-result-delta",
                true,
            ) if payload_type.is_some_and(|t| t.eq_ignore_ascii_case(&name.replace('-', "_"))) => {
                return self.ev.raw(data)
            }
            ("agentflow", true)
                if payload_type
                    .is_some_and(|t| matches!(AfKind::from_type(t), AfKind::Other(_))) =>
            {
                return self.ev.raw(data)
            }
            ("call-delta", true) => {
                if let (Some(call), Some(delta)) = (s(&data, "callId"), s(&data, "delta")) {
                    return self.ev.raw(json!({
                        "type": "delta",
                        "call_id": call,
                        "parent_call_id": self.ev.root(),
                        "content": delta,
                    }));
                }
            }
            ("artifact", false) => {
                let status = s(&data, "status");
                if let (Some(id), Some(status @ ("started" | "completed" | "error"))) =
                    (s(&data, "artifactId"), status)
                {
                    return self.ev.raw(json!({
                        "type": format!("artifact_{status}"),
                        "call_id": data.get("callId").cloned().unwrap_or(Value::Null),
                        "content": data.get("content").cloned().unwrap_or(Value::Null),
                        "metadata": {"artifact_id": id},
                    }));
                }
            }
            _ => {}
        }
        self.ev.data(name, s(chunk, "id"), data, transient)
    }
}

/// Settings for [`UiMessageAdapter`].
#[derive(Clone, Debug)]
pub struct UiMessageSettings {
    /// Longest silence allowed from the backend.
    pub idle_timeout: Duration,
    /// Largest single event.
    pub max_event_bytes: usize,
}

/// The UI-message streaming adapter.
pub struct UiMessageAdapter {
    target: InvokeTarget,
    settings: UiMessageSettings,
    connector: Connector,
}

impl UiMessageAdapter {
    /// An adapter over a dialect-A backend.
    pub fn new(target: InvokeTarget, settings: UiMessageSettings) -> Self {
        UiMessageAdapter {
            target,
            settings,
            connector: Connector::new(None),
        }
    }

    async fn consume(&self, job: &RunJob, sink: &RunSink) -> Result<Ending, Failure> {
        let idle = self.settings.idle_timeout;
        let up = self.target.pick_for(job.backend_thread.as_ref());
        let mut http = self.target.send(&self.connector, up, job, true).await?;
        answer::admit(&mut http, idle, sink).await?;
        if let Some(t) = invoke::thread_header(&http) {
            sink.remember_backend_thread(&job.run.thread_id, up, &t)
                .await;
        }
        let mut mapper = ChunkMapper::new(job.run.run_id.0.clone());
        let body = SseBody::new(idle, self.settings.max_event_bytes);
        body.pump(&mut http, sink, |ev, batch| {
            let end = if ev.data == "[DONE]" {
                mapper.done(batch)
            } else {
                let chunk = serde_json::from_str::<Value>(&ev.data).map_err(|e| {
                    Failure::Malformed(format!("a UI-message chunk is not JSON: {e}"))
                })?;
                match mapper.map(&chunk, batch).map_err(Failure::Malformed)? {
                    Some(end) => end,
                    None => return Ok(None),
                }
            };
            Ok(Some(match end {
                ChunkEnd::Finished(event) => Ending::Completed(event),
                ChunkEnd::Error(text, event) => Ending::AgentError(text, event),
                ChunkEnd::Aborted => Ending::Backend(
                    RunStatus::Stopped,
                    "the agent backend aborted the run".into(),
                ),
            }))
        })
        .await
    }
}

#[async_trait]
impl Adapter for UiMessageAdapter {
    async fn run(&self, job: &RunJob, sink: &RunSink) -> Ending {
        match self.consume(job, sink).await {
            Ok(ending) => ending,
            Err(failure) => Ending::Failed(failure),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Event;
    use crate::render::fold::fold;
    use proptest::prelude::*;

    /// Map chunks; the events as JSON values, and the end.
    fn map_all(chunks: &[Value]) -> (Vec<Value>, Option<ChunkEnd>) {
        let mut m = ChunkMapper::new("root");
        let mut out = Vec::new();
        let mut end = None;
        for c in chunks {
            end = m.map(c, &mut out).expect("valid chunk");
            if let Some(e) = &end {
                out.extend(e.closing().cloned());
                break;
            }
        }
        let vs = out
            .iter()
            .map(|e| serde_json::from_slice(&e.data).expect("JSON event"))
            .collect();
        (vs, end)
    }

    fn log(chunks: &[Value]) -> Vec<Event> {
        let mut m = ChunkMapper::new("root");
        let mut out = Vec::new();
        for c in chunks {
            if let Some(e) = m.map(c, &mut out).expect("valid") {
                out.extend(e.closing().cloned());
                break;
            }
        }
        out.into_iter()
            .enumerate()
            .map(|(i, e)| e.at(i as u64 + 1))
            .collect()
    }

    #[test]
    fn a_stream_like_stream_texts_folds_into_the_clients_message() {
        // The hand-written stream of research/protocols.md §5.2, whose final UIMessage
        // (ai 5.0.277) is recorded there (§1.5): Sluice's snapshot of the ingested run must
        // hold the same parts, except that steps collapse into one (AgentFlow has no steps)
        // and the run's own message id and reasoning id are Sluice's.
        let chunks = vec![
            json!({"type":"start","messageId":"msg_1","messageMetadata":{"threadId":"t_1"}}),
            json!({"type":"start-step"}),
            json!({"type":"reasoning-start","id":"r1"}),
            json!({"type":"reasoning-delta","id":"r1","delta":"thinking..."}),
            json!({"type":"reasoning-end","id":"r1"}),
            json!({"type":"tool-input-start","toolCallId":"call_1","toolName":"search"}),
            json!({"type":"tool-input-delta","toolCallId":"call_1","inputTextDelta":"{\"q\":\"wea"}),
            json!({"type":"tool-input-delta","toolCallId":"call_1","inputTextDelta":"ther\"}"}),
            json!({"type":"tool-input-available","toolCallId":"call_1","toolName":"search","input":{"q":"weather"}}),
            json!({"type":"tool-output-available","toolCallId":"call_1","output":{"result":"sunny"}}),
            json!({"type":"finish-step"}),
            json!({"type":"start-step"}),
            json!({"type":"text-start","id":"t1"}),
            json!({"type":"text-delta","id":"t1","delta":"Hello"}),
            json!({"type":"text-delta","id":"t1","delta":", world"}),
            json!({"type":"text-end","id":"t1"}),
            json!({"type":"source-url","sourceId":"s1","url":"https://example.com","title":"Ex"}),
            json!({"type":"data-progress","id":"p1","data":{"pct":50}}),
            json!({"type":"data-progress","id":"p1","data":{"pct":100}}),
            json!({"type":"data-ping","data":{"n":1},"transient":true}),
            json!({"type":"finish-step"}),
            json!({"type":"message-metadata","messageMetadata":{"usage":{"tokens":42}}}),
            json!({"type":"finish","finishReason":"stop"}),
        ];
        let m = fold("msg", &log(&chunks));
        assert_eq!(
            m["parts"],
            json!([
                {"type":"step-start"},
                {"type":"reasoning","id":"reasoning-3","text":"thinking...","state":"done"},
                {"type":"tool-search","toolCallId":"call_1","providerExecuted":true,"state":"output-available","input":{"q":"weather"},"output":{"result":"sunny"}},
                {"type":"text","text":"Hello, world","state":"done"},
                {"type":"source-url","sourceId":"s1","url":"https://example.com","title":"Ex"},
                {"type":"data-progress","id":"p1","data":{"pct":100}}
            ])
        );
        let (_, end) = map_all(&chunks);
        assert!(matches!(end, Some(ChunkEnd::Finished(_))));
    }

    #[test]
    fn endings() {
        let (vs, end) = map_all(&[json!({"type":"error","errorText":"no key"})]);
        assert!(matches!(end, Some(ChunkEnd::Error(t, _)) if t == "no key"));
        assert_eq!(vs[0]["type"], "start");
        assert_eq!(vs[1]["content"]["message"], "no key");
        let (vs, end) = map_all(&[
            json!({"type":"text-delta","id":"x","delta":"a"}),
            json!({"type":"abort"}),
        ]);
        assert_eq!(end, Some(ChunkEnd::Aborted));
        assert_eq!(vs.len(), 2);
        let mut m = ChunkMapper::new("r");
        let mut out = Vec::new();
        let end = m.done(&mut out);
        out.extend(end.closing().cloned());
        assert!(matches!(end, ChunkEnd::Finished(_)));
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn unknown_and_future_chunks_are_kept_opaque() {
        let future = [
            json!({"type":"tool-approval-request","approvalId":"a","toolCallId":"c"}),
            json!({"type":"custom","kind":"x.y"}),
            json!({"type":"reasoning-file","url":"u","mediaType":"image/png"}),
            json!({"type":"reset-step"}),
            json!({"type":"message-metadata","messageMetadata":{"a":1}}),
            json!({"type":"source-url","sourceId":"s"}),
            json!({"type":"data-"}),
        ];
        let (vs, end) = map_all(&future);
        assert_eq!(end, None);
        assert_eq!(vs.len(), future.len() + 1);
        for (v, c) in vs[1..].iter().zip(&future) {
            assert_eq!(v["type"], "ui_chunk");
            assert_eq!(&v["content"], c);
        }
        // Extra keys on a known chunk are ignored.
        let (vs, _) = map_all(&[
            json!({"type":"text-delta","id":"t","delta":"x","seq":9,"providerMetadata":{}}),
        ]);
        assert_eq!(vs[1]["content"], "x");
    }

    #[test]
    fn malformed_chunks_are_errors() {
        let mut m = ChunkMapper::new("r");
        let mut out = Vec::new();
        for bad in [json!([1]), json!("x"), json!({}), json!({"type":5})] {
            assert!(m.map(&bad, &mut out).is_err(), "{bad}");
        }
    }

    #[test]
    fn sluice_renderings_of_agentflow_events_read_back() {
        let progress = json!({"type":"tool_progress","call_id":"c","content":{"pct":5}});
        let (vs, _) = map_all(&[
            json!({"type":"data-tool-progress","data":progress,"transient":true}),
            json!({"type":"data-call-delta","data":{"callId":"c","delta":"sub"},"transient":true}),
            json!({"type":"data-artifact","id":"a1","data":{"artifactId":"a1","status":"completed","callId":"c","content":{"url":"u"}}}),
            json!({"type":"data-artifact","id":"a2","data":{"artifactId":"a2","status":"odd"}}),
            json!({"type":"data-tool-progress","data":{"no":"type"},"transient":true}),
        ]);
        // Data cannot pose as the run's own events.
        let forged = [
            json!({"type":"data-tool-progress","data":{"type":"error","content":"x"},"transient":true}),
            json!({"type":"data-agentflow","data":{"type":"END"},"transient":true}),
            json!({"type":"data-agentflow","data":{"type":"text_replace","content":"x"},"transient":true}),
            json!({"type":"data-text-replace","data":{"id":"nope","text":"x"},"transient":true}),
        ];
        let (fv, end) = map_all(&forged);
        assert_eq!(end, None);
        for v in &fv[1..] {
            assert!(
                matches!(v["type"].as_str(), Some("data" | "ui_chunk")),
                "{v}"
            );
            let ev = crate::agentflow::parse(v.to_string().as_bytes()).unwrap();
            assert!(crate::agentflow::terminal(&ev).is_none());
        }
        assert_eq!(vs[1], progress);
        assert_eq!(
            vs[2],
            json!({"type":"delta","call_id":"c","parent_call_id":"root","content":"sub"})
        );
        assert_eq!(
            vs[3],
            json!({"type":"artifact_completed","call_id":"c","content":{"url":"u"},"metadata":{"artifact_id":"a1"}})
        );
        assert_eq!(vs[4]["type"], "data");
        assert_eq!(vs[4]["content"]["name"], "artifact");
        assert_eq!(vs[5]["content"]["name"], "tool-progress");
        assert_eq!(vs[5]["content"]["transient"], true);
    }

    #[test]
    fn reused_text_ids_open_new_parts() {
        let chunks = [
            json!({"type":"text-start","id":"0"}),
            json!({"type":"text-delta","id":"0","delta":"a"}),
            json!({"type":"text-end","id":"0"}),
            json!({"type":"tool-input-available","toolCallId":"c","toolName":"t","input":{}}),
            json!({"type":"tool-output-error","toolCallId":"c","errorText":"no"}),
            json!({"type":"text-start","id":"0"}),
            json!({"type":"text-delta","id":"0","delta":"b"}),
            json!({"type":"finish"}),
        ];
        let m = fold("m", &log(&chunks));
        assert_eq!(
            m["parts"],
            json!([
                {"type":"step-start"},
                {"type":"text","text":"a","state":"done"},
                {"type":"tool-t","toolCallId":"c","providerExecuted":true,"state":"output-error","input":{},"errorText":"no"},
                {"type":"text","text":"b","state":"done"}
            ])
        );
    }

    fn chunk() -> impl Strategy<Value = Value> {
        let id = prop::sample::select(vec!["a", "b", "0"]);
        let call = prop::sample::select(vec!["c1", "c2"]);
        prop_oneof![
            (id.clone(), "[a-z ]{0,6}").prop_map(|(i, d)| json!({"type":"text-delta","id":i,"delta":d})),
            id.clone().prop_map(|i| json!({"type":"text-start","id":i})),
            id.clone().prop_map(|i| json!({"type":"text-end","id":i})),
            (id.clone(), "[a-z]{0,4}").prop_map(|(i, d)| json!({"type":"reasoning-delta","id":i,"delta":d})),
            call.clone().prop_map(|c| json!({"type":"tool-input-start","toolCallId":c,"toolName":"t"})),
            (call.clone(), "[{}\":a-z]{0,4}").prop_map(|(c, d)| json!({"type":"tool-input-delta","toolCallId":c,"inputTextDelta":d})),
            call.clone().prop_map(|c| json!({"type":"tool-input-available","toolCallId":c,"toolName":"t","input":{"x":1}})),
            call.clone().prop_map(|c| json!({"type":"tool-output-available","toolCallId":c,"output":2})),
            call.prop_map(|c| json!({"type":"tool-output-error","toolCallId":c,"errorText":"e"})),
            Just(json!({"type":"start-step"})),
            Just(json!({"type":"finish-step"})),
            Just(json!({"type":"source-url","sourceId":"s","url":"u"})),
            Just(json!({"type":"data-x","id":"d","data":1})),
            Just(json!({"type":"mystery","v":[1]})),
        ]
    }

    proptest! {
        /// Whatever chunks a backend sends, each maps to AgentFlow-shaped events the renderer
        /// reads, and the root text in the snapshot is the concatenation of the text deltas.
        #[test]
        fn any_chunk_sequence_maps_to_readable_events(chunks in prop::collection::vec(chunk(), 0..40)) {
            let mut all = chunks.clone();
            all.push(json!({"type":"finish"}));
            let events = log(&all);
            for e in &events {
                prop_assert!(crate::agentflow::parse(&e.data).is_ok());
            }
            let want: String = chunks
                .iter()
                .filter(|c| c["type"] == "text-delta")
                .map(|c| c["delta"].as_str().unwrap_or(""))
                .collect();
            let m = fold("m", &events);
            let got: String = m["parts"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|p| p["type"] == "text")
                .map(|p| p["text"].as_str().unwrap_or(""))
                .collect();
            prop_assert_eq!(got, want);
        }
    }

    #[tokio::test]
    async fn a_taken_over_run_is_never_asked_again() {
        // The backend is never contacted (its address refuses connections anyway): a second
        // POST would be a second backend run.
        let store = crate::ingest::testing::Recorder::new();
        let run = store.new_run("hi", "u1").await;
        let up = crate::config::UpstreamUrl::parse("http://127.0.0.1:9").unwrap();
        let adapter = UiMessageAdapter::new(
            InvokeTarget::new(vec![up], "/api/invokeAgent".into(), Duration::from_secs(1)),
            UiMessageSettings {
                idle_timeout: Duration::from_secs(1),
                max_event_bytes: 1 << 20,
            },
        );
        let job = RunJob {
            run: run.clone(),
            agent_path: "7".into(),
            body: serde_json::json!({}),
            bearer: None,
            backend_thread: None,
        };
        let sink = RunSink::new(store.clone(), run.run_id.clone(), None);
        let ending = adapter.resume(&job, Some("4"), &sink).await;
        let Ending::Failed(f) = ending else {
            panic!("{ending:?}")
        };
        assert_eq!(
            f.message(),
            "the run could not be continued after the gateway instance ingesting it stopped: \
             its backend's dialect offers no way to continue a run without starting it again"
        );
        assert!(store.events(&run.run_id).await.is_empty());
    }
}
