//! A tolerant view of one AgentFlow event payload, and the gateway's own terminal events.
//!
//! AgentFlow backends differ in details (see DESIGN §1 B): types may be upper-case (`DELTA`),
//! text may sit in `content` or in a legacy `delta` field, a tool's name and input have several
//! homes. This module owns those reading rules, so that ingest (which decides when a run ends)
//! and the renderers (which turn events into UI-message chunks) agree on them. Nothing here
//! does I/O, and nothing panics on odd input: absent or ill-typed fields read as absent.

use std::fmt;

use bytes::Bytes;
use serde_json::{Map, Value};

/// The event types Sluice understands; anything else is kept as [`AfKind::Other`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AfKind {
    /// `start`: a call (the root run, or a nested tool / sub-agent) begins.
    Start,
    /// `delta`: a piece of streamed text (or reasoning).
    Delta,
    /// `end`: a call ends; on the root call this carries the final response.
    End,
    /// `error`: a call failed; on the root call the run failed.
    Error,
    /// `tool_progress`: live progress of a tool.
    ToolProgress,
    /// `tool_result_delta`: a piece of a tool's result.
    ToolResultDelta,
    /// `artifact_started`.
    ArtifactStarted,
    /// `artifact_progress`.
    ArtifactProgress,
    /// `artifact_result_delta`.
    ArtifactResultDelta,
    /// `artifact_completed`.
    ArtifactCompleted,
    /// `artifact_error`.
    ArtifactError,
    /// `text_replace` (Sluice's own): a text or reasoning part was rewritten.
    TextReplace,
    /// `tool_input_delta` (Sluice's own): a piece of a tool's input while it streams.
    ToolInputDelta,
    /// `source` (Sluice's own): a cited source.
    Source,
    /// `file` (Sluice's own): a file the agent produced.
    File,
    /// `data` (Sluice's own): an application data part.
    Data,
    /// Any other type, spelled as received.
    Other(String),
}

impl AfKind {
    /// Classify a `type` value; the match ignores ASCII case (`DELTA` == `delta`).
    pub fn from_type(ty: &str) -> AfKind {
        const KNOWN: [(&str, AfKind); 16] = [
            ("start", AfKind::Start),
            ("delta", AfKind::Delta),
            ("end", AfKind::End),
            ("error", AfKind::Error),
            ("tool_progress", AfKind::ToolProgress),
            ("tool_result_delta", AfKind::ToolResultDelta),
            ("artifact_started", AfKind::ArtifactStarted),
            ("artifact_progress", AfKind::ArtifactProgress),
            ("artifact_result_delta", AfKind::ArtifactResultDelta),
            ("artifact_completed", AfKind::ArtifactCompleted),
            ("artifact_error", AfKind::ArtifactError),
            ("text_replace", AfKind::TextReplace),
            ("tool_input_delta", AfKind::ToolInputDelta),
            ("source", AfKind::Source),
            ("file", AfKind::File),
            ("data", AfKind::Data),
        ];
        for (name, kind) in KNOWN {
            if ty.eq_ignore_ascii_case(name) {
                return kind;
            }
        }
        AfKind::Other(ty.to_owned())
    }

    /// The canonical lower-case type name (`Other` keeps its spelling as received).
    pub fn as_str(&self) -> &str {
        match self {
            AfKind::Start => "start",
            AfKind::Delta => "delta",
            AfKind::End => "end",
            AfKind::Error => "error",
            AfKind::ToolProgress => "tool_progress",
            AfKind::ToolResultDelta => "tool_result_delta",
            AfKind::ArtifactStarted => "artifact_started",
            AfKind::ArtifactProgress => "artifact_progress",
            AfKind::ArtifactResultDelta => "artifact_result_delta",
            AfKind::ArtifactCompleted => "artifact_completed",
            AfKind::ArtifactError => "artifact_error",
            AfKind::TextReplace => "text_replace",
            AfKind::ToolInputDelta => "tool_input_delta",
            AfKind::Source => "source",
            AfKind::File => "file",
            AfKind::Data => "data",
            AfKind::Other(s) => s,
        }
    }
}

/// Why a payload is not an AgentFlow event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AfError {
    /// The bytes are not JSON (the parser's message).
    NotJson(String),
    /// The JSON is not an object.
    NotObject,
    /// The object has no string `type`.
    NoType,
}

impl fmt::Display for AfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AfError::NotJson(e) => write!(f, "event payload is not JSON: {e}"),
            AfError::NotObject => f.write_str("event payload is not a JSON object"),
            AfError::NoType => f.write_str("event payload has no string \"type\""),
        }
    }
}

impl std::error::Error for AfError {}

/// How a run ended, as told by its root call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Terminal {
    /// The root call ended normally.
    Completed,
    /// The root call failed (the error message).
    Error(String),
}

/// One parsed AgentFlow event: the identifying fields, plus the raw JSON for everything else.
#[derive(Clone, Debug, PartialEq)]
pub struct AfEvent {
    /// The event type.
    pub kind: AfKind,
    /// `call_id` (a number is read as its decimal text).
    pub call_id: Option<String>,
    /// `parent_call_id`.
    pub parent_call_id: Option<String>,
    /// `root_call_id`.
    pub root_call_id: Option<String>,
    /// The whole payload (always an object).
    pub raw: Value,
}

/// Parse one event payload.
pub fn parse(data: &[u8]) -> Result<AfEvent, AfError> {
    let raw: Value = serde_json::from_slice(data).map_err(|e| AfError::NotJson(e.to_string()))?;
    AfEvent::from_value(raw)
}

/// How a run ends at this event, if it does: a root `end` completes it, a root `error` fails
/// it. Errors of nested calls are not terminal (the agent may recover from a failed tool).
pub fn terminal(ev: &AfEvent) -> Option<Terminal> {
    if !ev.is_root() {
        return None;
    }
    match ev.kind {
        AfKind::End => Some(Terminal::Completed),
        AfKind::Error => Some(Terminal::Error(ev.error_message().to_owned())),
        _ => None,
    }
}

/// The payload of an event the gateway appends itself when it ends a run (`status` is one of
/// `"error"`, `"timeout"`, `"stopped"`): a root `error` whose `metadata.sluice_status` says why.
pub fn synthetic_error(status: &str, message: &str) -> Bytes {
    let v = serde_json::json!({
        "type": "error",
        "content": { "message": message },
        "metadata": { "sluice_status": status },
    });
    Bytes::from(v.to_string())
}

fn id_field(obj: &Map<String, Value>, key: &str) -> Option<String> {
    match obj.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn str_at<'a>(v: Option<&'a Value>, key: &str) -> Option<&'a str> {
    v?.get(key)?.as_str()
}

fn non_null<'a>(v: Option<&'a Value>, key: &str) -> Option<&'a Value> {
    v?.get(key).filter(|x| !x.is_null())
}

impl AfEvent {
    /// Read an already parsed payload.
    pub fn from_value(raw: Value) -> Result<AfEvent, AfError> {
        let obj = raw.as_object().ok_or(AfError::NotObject)?;
        let ty = obj
            .get("type")
            .and_then(Value::as_str)
            .ok_or(AfError::NoType)?;
        let kind = AfKind::from_type(ty);
        let call_id = id_field(obj, "call_id");
        let parent_call_id = id_field(obj, "parent_call_id");
        let root_call_id = id_field(obj, "root_call_id");
        Ok(AfEvent {
            kind,
            call_id,
            parent_call_id,
            root_call_id,
            raw,
        })
    }

    /// The whole payload.
    pub fn raw(&self) -> &Value {
        &self.raw
    }

    /// `content`, if present.
    pub fn content(&self) -> Option<&Value> {
        self.raw.get("content")
    }

    /// `metadata`, if present.
    pub fn metadata(&self) -> Option<&Value> {
        self.raw.get("metadata")
    }

    /// Whether the event belongs to the root call: true unless `parent_call_id` is a non-empty
    /// string, or `call_id` and `root_call_id` are both present and differ.
    pub fn is_root(&self) -> bool {
        if self
            .parent_call_id
            .as_deref()
            .is_some_and(|p| !p.is_empty())
        {
            return false;
        }
        match (&self.call_id, &self.root_call_id) {
            (Some(c), Some(r)) => c == r,
            _ => true,
        }
    }

    /// The text of a delta: `content` when it is a string, else the legacy `delta` field.
    pub fn text(&self) -> Option<&str> {
        self.content()
            .and_then(Value::as_str)
            .or_else(|| self.raw.get("delta").and_then(Value::as_str))
    }

    /// `metadata.part_id`: the text or reasoning part a root delta (or `text_replace`) belongs
    /// to, when the adapter names parts (see `crate::ingest::events`).
    pub fn part_id(&self) -> Option<&str> {
        str_at(self.metadata(), "part_id")
    }

    /// Whether a delta is reasoning: `metadata.reasoning == true` or
    /// `metadata.content_type == "reasoning"`.
    pub fn is_reasoning(&self) -> bool {
        let md = self.metadata();
        md.and_then(|m| m.get("reasoning")).and_then(Value::as_bool) == Some(true)
            || str_at(md, "content_type").is_some_and(|t| t.eq_ignore_ascii_case("reasoning"))
    }

    /// A nested call's name: `content.tool_name`, `content.name`, `metadata.tool_name`,
    /// `metadata.display_name`, else `"tool"`.
    pub fn tool_name(&self) -> &str {
        str_at(self.content(), "tool_name")
            .or_else(|| str_at(self.content(), "name"))
            .or_else(|| str_at(self.metadata(), "tool_name"))
            .or_else(|| str_at(self.metadata(), "display_name"))
            .unwrap_or("tool")
    }

    /// A nested call's input: `content.input`, `content.arguments`, else null.
    pub fn tool_input(&self) -> &Value {
        non_null(self.content(), "input")
            .or_else(|| non_null(self.content(), "arguments"))
            .unwrap_or(&Value::Null)
    }

    /// A call's result (for `end`): `content.output`, `content.result`, else `content` itself
    /// (null when absent).
    pub fn output(&self) -> &Value {
        let content = self.content();
        content
            .and_then(|c| c.get("output"))
            .or_else(|| content.and_then(|c| c.get("result")))
            .or(content)
            .unwrap_or(&Value::Null)
    }

    /// An error's message: `content` when a string, `content.message`, `content.error`, the
    /// `error` field (a string, or an object's `message`), else `"unknown error"`.
    pub fn error_message(&self) -> &str {
        let content = self.content();
        content
            .and_then(Value::as_str)
            .or_else(|| str_at(content, "message"))
            .or_else(|| str_at(content, "error"))
            .or_else(|| self.raw.get("error").and_then(Value::as_str))
            .or_else(|| str_at(self.raw.get("error"), "message"))
            .unwrap_or("unknown error")
    }

    /// The final response of a root `end`: `content` when a string, else the first string among
    /// `content.response`, `content.output`, `content.text`, `content.result`.
    pub fn final_text(&self) -> Option<&str> {
        let content = self.content()?;
        if let Some(s) = content.as_str() {
            return Some(s);
        }
        ["response", "output", "text", "result"]
            .iter()
            .find_map(|k| content.get(*k).and_then(Value::as_str))
    }

    /// An artifact's id: `content.artifact_id`, `content.id`, `metadata.artifact_id`, the
    /// `call_id`, else `"artifact"`.
    pub fn artifact_id(&self) -> &str {
        str_at(self.content(), "artifact_id")
            .or_else(|| str_at(self.content(), "id"))
            .or_else(|| str_at(self.metadata(), "artifact_id"))
            .or(self.call_id.as_deref())
            .unwrap_or("artifact")
    }

    /// `metadata.sluice_status` of a gateway-synthesised terminal event (see
    /// [`synthetic_error`]): `"error"`, `"timeout"` or `"stopped"`.
    pub fn sluice_status(&self) -> Option<&str> {
        str_at(self.metadata(), "sluice_status")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ev(v: Value) -> AfEvent {
        parse(v.to_string().as_bytes()).expect("valid event")
    }

    #[test]
    fn rejects_non_events() {
        assert!(matches!(parse(b"not json"), Err(AfError::NotJson(_))));
        assert!(matches!(parse(b""), Err(AfError::NotJson(_))));
        assert_eq!(parse(b"[1,2]"), Err(AfError::NotObject));
        assert_eq!(parse(b"\"delta\""), Err(AfError::NotObject));
        assert_eq!(parse(b"{}"), Err(AfError::NoType));
        assert_eq!(parse(br#"{"type":3}"#), Err(AfError::NoType));
        assert!(AfError::NoType.to_string().contains("type"));
        assert!(AfError::NotJson("x".into())
            .to_string()
            .contains("not JSON"));
        let _: &dyn std::error::Error = &AfError::NotObject;
    }

    #[test]
    fn kinds_are_case_insensitive() {
        assert_eq!(ev(json!({"type":"DELTA"})).kind, AfKind::Delta);
        assert_eq!(ev(json!({"type":"Delta"})).kind, AfKind::Delta);
        assert_eq!(ev(json!({"type":"END"})).kind, AfKind::End);
        assert_eq!(
            ev(json!({"type":"Tool_Progress"})).kind,
            AfKind::ToolProgress
        );
        assert_eq!(
            ev(json!({"type":"artifact_result_delta"})).kind,
            AfKind::ArtifactResultDelta
        );
        assert_eq!(
            ev(json!({"type":"APPROVAL_REQUIRED"})).kind,
            AfKind::Other("APPROVAL_REQUIRED".into())
        );
        for k in [
            AfKind::Start,
            AfKind::Delta,
            AfKind::End,
            AfKind::Error,
            AfKind::ToolProgress,
            AfKind::ToolResultDelta,
            AfKind::ArtifactStarted,
            AfKind::ArtifactProgress,
            AfKind::ArtifactResultDelta,
            AfKind::ArtifactCompleted,
            AfKind::ArtifactError,
            AfKind::TextReplace,
            AfKind::ToolInputDelta,
            AfKind::Source,
            AfKind::File,
            AfKind::Data,
        ] {
            assert_eq!(AfKind::from_type(&k.as_str().to_uppercase()), k);
        }
    }

    #[test]
    fn root_detection() {
        assert!(ev(json!({"type":"delta"})).is_root());
        assert!(ev(json!({"type":"delta","call_id":"a","root_call_id":"a"})).is_root());
        assert!(ev(json!({"type":"delta","call_id":"a","parent_call_id":""})).is_root());
        assert!(ev(json!({"type":"delta","call_id":"a","parent_call_id":null})).is_root());
        assert!(!ev(json!({"type":"delta","call_id":"b","parent_call_id":"a"})).is_root());
        assert!(!ev(json!({"type":"delta","call_id":"b","root_call_id":"a"})).is_root());
        assert!(!ev(json!({"type":"delta","call_id":2,"root_call_id":1})).is_root());
        assert!(ev(json!({"type":"delta","root_call_id":"a"})).is_root());
        let e = ev(json!({"type":"start","call_id":7,"parent_call_id":"p"}));
        assert_eq!(e.call_id.as_deref(), Some("7"));
        assert_eq!(e.parent_call_id.as_deref(), Some("p"));
        assert_eq!(e.root_call_id, None);
    }

    #[test]
    fn text_and_legacy_delta() {
        assert_eq!(
            ev(json!({"type":"delta","content":"hi"})).text(),
            Some("hi")
        );
        assert_eq!(ev(json!({"type":"DELTA","delta":"yo"})).text(), Some("yo"));
        assert_eq!(
            ev(json!({"type":"delta","content":"c","delta":"d"})).text(),
            Some("c")
        );
        assert_eq!(ev(json!({"type":"delta","content":{"x":1}})).text(), None);
    }

    #[test]
    fn reasoning_flags() {
        assert!(ev(json!({"type":"delta","metadata":{"reasoning":true}})).is_reasoning());
        assert!(ev(json!({"type":"delta","metadata":{"content_type":"reasoning"}})).is_reasoning());
        assert!(!ev(json!({"type":"delta","metadata":{"reasoning":"true"}})).is_reasoning());
        assert!(!ev(json!({"type":"delta","metadata":{"content_type":"text"}})).is_reasoning());
        assert!(!ev(json!({"type":"delta"})).is_reasoning());
    }

    #[test]
    fn tool_name_and_input() {
        let e = ev(
            json!({"type":"start","content":{"tool_name":"a","name":"b"},"metadata":{"display_name":"c"}}),
        );
        assert_eq!(e.tool_name(), "a");
        let e = ev(json!({"type":"start","content":{"name":"b"},"metadata":{"display_name":"c"}}));
        assert_eq!(e.tool_name(), "b");
        let e = ev(json!({"type":"start","metadata":{"display_name":"c"}}));
        assert_eq!(e.tool_name(), "c");
        assert_eq!(ev(json!({"type":"start"})).tool_name(), "tool");
        let e = ev(json!({"type":"start","content":{"input":{"q":1},"arguments":2}}));
        assert_eq!(e.tool_input(), &json!({"q":1}));
        let e = ev(json!({"type":"start","content":{"arguments":"{}"}}));
        assert_eq!(e.tool_input(), &json!("{}"));
        assert_eq!(ev(json!({"type":"start"})).tool_input(), &Value::Null);
    }

    #[test]
    fn outputs() {
        let e = ev(json!({"type":"end","content":{"output":1,"result":2}}));
        assert_eq!(e.output(), &json!(1));
        let e = ev(json!({"type":"end","content":{"result":2}}));
        assert_eq!(e.output(), &json!(2));
        let e = ev(json!({"type":"end","content":{"output":null,"result":2}}));
        assert_eq!(e.output(), &Value::Null);
        let e = ev(json!({"type":"end","content":{"other":3}}));
        assert_eq!(e.output(), &json!({"other":3}));
        let e = ev(json!({"type":"end","content":"plain"}));
        assert_eq!(e.output(), &json!("plain"));
        assert_eq!(ev(json!({"type":"end"})).output(), &Value::Null);
    }

    #[test]
    fn error_messages() {
        let m = |v: Value| ev(v).error_message().to_owned();
        assert_eq!(m(json!({"type":"error","content":"boom"})), "boom");
        assert_eq!(
            m(json!({"type":"error","content":{"message":"m","error":"e"}})),
            "m"
        );
        assert_eq!(m(json!({"type":"error","content":{"error":"e"}})), "e");
        assert_eq!(m(json!({"type":"error","error":"top"})), "top");
        assert_eq!(m(json!({"type":"error","error":{"message":"o"}})), "o");
        assert_eq!(m(json!({"type":"error"})), "unknown error");
    }

    #[test]
    fn final_texts() {
        let f = |v: Value| ev(v).final_text().map(str::to_owned);
        assert_eq!(
            f(json!({"type":"end","content":"done"})),
            Some("done".into())
        );
        assert_eq!(
            f(json!({"type":"end","content":{"response":"r","output":"o"}})),
            Some("r".into())
        );
        assert_eq!(
            f(json!({"type":"end","content":{"output":{"x":1},"text":"t"}})),
            Some("t".into())
        );
        assert_eq!(
            f(json!({"type":"end","content":{"result":"z"}})),
            Some("z".into())
        );
        assert_eq!(f(json!({"type":"end","content":{"output":1}})), None);
        assert_eq!(f(json!({"type":"end"})), None);
    }

    #[test]
    fn artifact_ids() {
        let a = |v: Value| ev(v).artifact_id().to_owned();
        assert_eq!(
            a(json!({"type":"artifact_started","content":{"artifact_id":"a","id":"b"}})),
            "a"
        );
        assert_eq!(
            a(json!({"type":"artifact_started","content":{"id":"b"}})),
            "b"
        );
        assert_eq!(
            a(json!({"type":"artifact_started","metadata":{"artifact_id":"m"},"call_id":"c"})),
            "m"
        );
        assert_eq!(a(json!({"type":"artifact_started","call_id":"c"})), "c");
        assert_eq!(a(json!({"type":"artifact_started"})), "artifact");
    }

    #[test]
    fn terminals() {
        assert_eq!(
            terminal(&ev(json!({"type":"END","content":"x"}))),
            Some(Terminal::Completed)
        );
        assert_eq!(
            terminal(&ev(json!({"type":"error","content":"bad"}))),
            Some(Terminal::Error("bad".into()))
        );
        assert_eq!(
            terminal(&ev(
                json!({"type":"end","call_id":"t","parent_call_id":"r"})
            )),
            None
        );
        assert_eq!(
            terminal(&ev(
                json!({"type":"error","call_id":"t","parent_call_id":"r"})
            )),
            None
        );
        assert_eq!(terminal(&ev(json!({"type":"delta","content":"x"}))), None);
        assert_eq!(terminal(&ev(json!({"type":"start"}))), None);
    }

    #[test]
    fn synthetic_errors_round_trip() {
        for status in ["error", "timeout", "stopped"] {
            let bytes = synthetic_error(status, "it \"broke\"\n");
            let v: Value = serde_json::from_slice(&bytes).expect("json");
            assert_eq!(
                v,
                json!({"type":"error","content":{"message":"it \"broke\"\n"},"metadata":{"sluice_status":status}})
            );
            let e = parse(&bytes).expect("event");
            assert_eq!(e.sluice_status(), Some(status));
            assert_eq!(terminal(&e), Some(Terminal::Error("it \"broke\"\n".into())));
        }
        assert_eq!(ev(json!({"type":"error"})).sluice_status(), None);
    }
}
