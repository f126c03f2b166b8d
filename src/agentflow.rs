//! A tolerant view of one AgentFlow event payload, and the gateway's own terminal events.
//!
//! AgentFlow backends differ in details (see DESIGN §1 B): types may be upper-case (`DELTA`),
//! text may sit in `content` or in a legacy `delta` field, a tool's name and input have several
//! homes. This module owns those reading rules, so that ingest (which decides when a run ends)
//! and the renderers (which turn events into UI-message chunks) agree on them. Nothing here
//! does I/O, and nothing panics on odd input: absent or ill-typed fields read as absent.

use std::borrow::Cow;
use std::fmt;

use bytes::Bytes;
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

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
        AfKind::known(ty).unwrap_or_else(|| AfKind::Other(ty.to_owned()))
    }

    /// The known kind a `type` value names (ignoring ASCII case), or `None` for an
    /// [`AfKind::Other`] type. Never allocates.
    fn known(ty: &str) -> Option<AfKind> {
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
        KNOWN
            .into_iter()
            .find_map(|(name, kind)| ty.eq_ignore_ascii_case(name).then_some(kind))
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

/// The identifying fields of one event payload, read without building a [`Value`]: what
/// ingest needs to see whether a run ends, and a quiet reader whether an event is shown.
///
/// Read by the same rules as [`AfEvent`] (see [`head`]); strings borrow from the payload
/// unless they hold escapes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Head<'a> {
    /// The `type` value as received (see [`Head::kind`]).
    pub ty: Cow<'a, str>,
    /// `call_id` (a number is read as its JSON number text, as in [`AfEvent::call_id`]).
    pub call_id: Option<Cow<'a, str>>,
    /// `parent_call_id`.
    pub parent_call_id: Option<Cow<'a, str>>,
    /// `root_call_id`.
    pub root_call_id: Option<Cow<'a, str>>,
}

impl Head<'_> {
    /// The event type, as [`AfKind::from_type`] (allocates only for an [`AfKind::Other`]).
    pub fn kind(&self) -> AfKind {
        AfKind::from_type(&self.ty)
    }

    /// Whether the event type is `kind`, i.e. `self.kind() == *kind`, without allocating.
    pub fn is_kind(&self, kind: &AfKind) -> bool {
        match kind {
            AfKind::Other(name) => *self.ty == **name && AfKind::known(&self.ty).is_none(),
            known => self.ty.eq_ignore_ascii_case(known.as_str()),
        }
    }

    /// Whether the event belongs to the root call, as [`AfEvent::is_root`].
    pub fn is_root(&self) -> bool {
        root_rule(
            self.call_id.as_deref(),
            self.parent_call_id.as_deref(),
            self.root_call_id.as_deref(),
        )
    }
}

/// Read the identifying fields of one event payload. Gives exactly what [`parse`] gives for
/// every input (the same [`AfError`], message included; the same kind, ids and root-ness),
/// but without building a [`Value`]: the payload is checked as strictly as `parse` checks it
/// (UTF-8, escapes, number range, nesting depth, trailing bytes), and fields other than
/// `type`, `call_id`, `parent_call_id` and `root_call_id` are read and dropped without
/// allocating. As in a [`Value`], the last of duplicate keys wins.
pub fn head(data: &[u8]) -> Result<Head<'_>, AfError> {
    match serde_json::from_slice(data) {
        Err(e) => Err(AfError::NotJson(e.to_string())),
        Ok(Top::NotObject) => Err(AfError::NotObject),
        Ok(Top::Object {
            ty,
            call_id,
            parent_call_id,
            root_call_id,
        }) => Ok(Head {
            ty: ty.ok_or(AfError::NoType)?,
            call_id,
            parent_call_id,
            root_call_id,
        }),
    }
}

/// [`terminal`] of [`parse`]`(data)`, reading only the identifying fields unless the event is
/// a root `error` (whose message needs the whole payload).
pub fn terminal_of(data: &[u8]) -> Result<Option<Terminal>, AfError> {
    let h = head(data)?;
    if !h.is_root() {
        return Ok(None);
    }
    if h.is_kind(&AfKind::End) {
        Ok(Some(Terminal::Completed))
    } else if h.is_kind(&AfKind::Error) {
        parse(data).map(|e| terminal(&e))
    } else {
        Ok(None)
    }
}

/// What [`head`] reads from the whole payload. Every value is read through
/// `deserialize_any`, as a [`Value`] would be, so that the checks serde_json makes (and the
/// errors it reports) are the same as [`parse`]'s. (`IgnoredAny` skips values more loosely:
/// it accepts out-of-range numbers, lone surrogate escapes, invalid UTF-8 in strings, and
/// nesting beyond serde_json's depth limit.)
enum Top<'a> {
    NotObject,
    Object {
        ty: Option<Cow<'a, str>>,
        call_id: Option<Cow<'a, str>>,
        parent_call_id: Option<Cow<'a, str>>,
        root_call_id: Option<Cow<'a, str>>,
    },
}

impl<'de> Deserialize<'de> for Top<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(TopVisitor)
    }
}

struct TopVisitor;

impl<'de> Visitor<'de> for TopVisitor {
    type Value = Top<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Top<'de>, A::Error> {
        let (mut ty, mut call_id, mut parent_call_id, mut root_call_id) = (None, None, None, None);
        while let Some(key) = map.next_key::<Key>()? {
            match key {
                Key::Type => ty = map.next_value::<Scalar<'de>>()?.into_str(),
                Key::CallId => call_id = map.next_value::<Scalar<'de>>()?.into_id(),
                Key::ParentCallId => parent_call_id = map.next_value::<Scalar<'de>>()?.into_id(),
                Key::RootCallId => root_call_id = map.next_value::<Scalar<'de>>()?.into_id(),
                Key::Other => map.next_value::<Skip>().map(drop)?,
            }
        }
        Ok(Top::Object {
            ty,
            call_id,
            parent_call_id,
            root_call_id,
        })
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Top<'de>, A::Error> {
        SkipVisitor.visit_seq(seq).map(|()| Top::NotObject)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Top<'de>, E> {
        Ok(Top::NotObject)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Top<'de>, E> {
        Ok(Top::NotObject)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Top<'de>, E> {
        Ok(Top::NotObject)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Top<'de>, E> {
        Ok(Top::NotObject)
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Top<'de>, E> {
        Ok(Top::NotObject)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Top<'de>, E> {
        Ok(Top::NotObject)
    }
}

/// A top-level key: one of the four read, or any other (compared after unescaping, as the
/// keys of a [`Value`] are).
enum Key {
    Type,
    CallId,
    ParentCallId,
    RootCallId,
    Other,
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(KeyVisitor)
    }
}

struct KeyVisitor;

impl Visitor<'_> for KeyVisitor {
    type Value = Key;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string key")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<Key, E> {
        Ok(match key {
            "type" => Key::Type,
            "call_id" => Key::CallId,
            "parent_call_id" => Key::ParentCallId,
            "root_call_id" => Key::RootCallId,
            _ => Key::Other,
        })
    }
}

/// The value of an identifying field: a string, a number, or anything else (consumed).
enum Scalar<'a> {
    Str(Cow<'a, str>),
    Num(Number),
    Other,
}

impl<'a> Scalar<'a> {
    /// As `Value::as_str`.
    fn into_str(self) -> Option<Cow<'a, str>> {
        match self {
            Scalar::Str(s) => Some(s),
            _ => None,
        }
    }

    /// As `id_field`: a string, or a number's text.
    fn into_id(self) -> Option<Cow<'a, str>> {
        match self {
            Scalar::Str(s) => Some(s),
            Scalar::Num(n) => Some(Cow::Owned(n.to_string())),
            Scalar::Other => None,
        }
    }
}

impl<'de> Deserialize<'de> for Scalar<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ScalarVisitor)
    }
}

struct ScalarVisitor;

impl<'de> Visitor<'de> for ScalarVisitor {
    type Value = Scalar<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Str(Cow::Borrowed(s)))
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Str(Cow::Owned(s.to_owned())))
    }

    fn visit_string<E: de::Error>(self, s: String) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Str(Cow::Owned(s)))
    }

    // The number rules of `Value`'s own visitor.
    fn visit_i64<E: de::Error>(self, n: i64) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Num(n.into()))
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Num(n.into()))
    }

    fn visit_f64<E: de::Error>(self, n: f64) -> Result<Scalar<'de>, E> {
        Ok(Number::from_f64(n).map_or(Scalar::Other, Scalar::Num))
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Other)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Other)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Scalar<'de>, A::Error> {
        SkipVisitor.visit_seq(seq).map(|()| Scalar::Other)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Scalar<'de>, A::Error> {
        SkipVisitor.visit_map(map).map(|()| Scalar::Other)
    }
}

/// Any JSON value, checked as a [`Value`] would be and dropped (strings are borrowed or
/// unescaped into the parser's scratch buffer; nothing is allocated per value).
struct Skip;

impl<'de> Deserialize<'de> for Skip {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(SkipVisitor).map(|()| Skip)
    }
}

struct SkipVisitor;

impl<'de> Visitor<'de> for SkipVisitor {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element::<Skip>()?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map.next_entry::<Skip, Skip>()?.is_some() {}
        Ok(())
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

/// The rule of [`AfEvent::is_root`] and [`Head::is_root`].
fn root_rule(
    call_id: Option<&str>,
    parent_call_id: Option<&str>,
    root_call_id: Option<&str>,
) -> bool {
    if parent_call_id.is_some_and(|p| !p.is_empty()) {
        return false;
    }
    match (call_id, root_call_id) {
        (Some(c), Some(r)) => c == r,
        _ => true,
    }
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
        root_rule(
            self.call_id.as_deref(),
            self.parent_call_id.as_deref(),
            self.root_call_id.as_deref(),
        )
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
    use proptest::prelude::*;
    use proptest::test_runner::TestCaseError;
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

    /// `head` agrees with `parse` on `data` in everything it reads, and `terminal_of` with
    /// `terminal` of `parse`.
    fn agrees(data: &[u8]) -> Result<(), TestCaseError> {
        let full = parse(data);
        match (head(data), &full) {
            (Ok(h), Ok(e)) => {
                prop_assert_eq!(h.kind(), e.kind.clone());
                for k in [
                    e.kind.clone(),
                    AfKind::End,
                    AfKind::Error,
                    AfKind::Other(h.ty.to_string()),
                    AfKind::Other(e.kind.as_str().to_ascii_uppercase()),
                ] {
                    prop_assert_eq!(h.is_kind(&k), e.kind == k, "{:?}", k);
                }
                prop_assert_eq!(h.call_id.as_deref(), e.call_id.as_deref());
                prop_assert_eq!(h.parent_call_id.as_deref(), e.parent_call_id.as_deref());
                prop_assert_eq!(h.root_call_id.as_deref(), e.root_call_id.as_deref());
                prop_assert_eq!(h.is_root(), e.is_root());
            }
            (Err(a), Err(b)) => prop_assert_eq!(&a, b),
            (h, e) => prop_assert!(false, "head {:?} but parse {:?}", h, e),
        }
        prop_assert_eq!(terminal_of(data), full.map(|e| terminal(&e)));
        Ok(())
    }

    fn check(data: &[u8]) {
        if let Err(e) = agrees(data) {
            panic!("{e} for {:?}", String::from_utf8_lossy(data));
        }
    }

    #[test]
    fn head_reads_the_identifying_fields() {
        let h = head(br#"{"content":{"type":"x"},"type":"END","call_id":"c","root_call_id":"c"}"#)
            .unwrap();
        assert_eq!(h.ty, "END");
        assert_eq!(h.kind(), AfKind::End);
        assert!(h.is_kind(&AfKind::End) && !h.is_kind(&AfKind::Error));
        assert_eq!(h.call_id.as_deref(), Some("c"));
        assert_eq!(h.parent_call_id, None);
        assert!(h.is_root());
        // Unescaped strings are borrowed from the payload, escaped ones unescaped.
        assert!(matches!(h.ty, Cow::Borrowed(_)));
        assert!(matches!(h.call_id, Some(Cow::Borrowed(_))));
        let h = head(br#"{"type":"d\u0065lta","call_id":"a\"b\\c\n\u00e9\ud83d\ude00"}"#).unwrap();
        assert_eq!(h.kind(), AfKind::Delta);
        assert_eq!(h.call_id.as_deref(), Some("a\"b\\c\né\u{1F600}"));
        assert!(matches!(h.call_id, Some(Cow::Owned(_))));
        // Escaped keys are the keys they spell; keys are case-sensitive.
        let h = head(br#"{"typ\u0065":"start","p\u0061rent_call_id":"p","Type":"end"}"#).unwrap();
        assert_eq!(
            (h.kind(), h.parent_call_id.as_deref()),
            (AfKind::Start, Some("p"))
        );
        assert!(!h.is_root());
        let h = head(br#"{"type":"Approval_Required"}"#).unwrap();
        assert_eq!(h.kind(), AfKind::Other("Approval_Required".into()));
        assert!(h.is_kind(&AfKind::Other("Approval_Required".into())));
        assert!(!h.is_kind(&AfKind::Other("approval_required".into())));
        // An `Other` spelling a known type is never the kind of a payload.
        let h = head(br#"{"type":"end"}"#).unwrap();
        assert!(!h.is_kind(&AfKind::Other("end".into())));
        for data in [
            &br#"{"type":"end","call_id":"c","root_call_id":"c"}"#[..],
            br#"{"type":"d\u0065lta","call_id":"a\"b"}"#,
            br#"{"type":"x","Type":"end"}"#,
        ] {
            check(data);
        }
    }

    #[test]
    fn head_reads_numbers_as_their_text() {
        for (num, text) in [
            ("12", "12"),
            ("-3", "-3"),
            ("1.5", "1.5"),
            ("-0", "-0.0"),
            ("-0.0", "-0.0"),
            ("1e3", "1000.0"),
            ("2.50E-1", "0.25"),
            ("18446744073709551615", "18446744073709551615"),
            ("18446744073709551616", "1.8446744073709552e+19"),
            ("-9223372036854775809", "-9.223372036854776e+18"),
        ] {
            let data = format!(r#"{{"type":"delta","call_id":{num},"root_call_id":"{text}"}}"#);
            let h = head(data.as_bytes()).unwrap();
            assert_eq!(h.call_id.as_deref(), Some(text), "{num}");
            assert!(h.is_root(), "{num}");
            check(data.as_bytes());
        }
        let h = head(br#"{"type":"delta","call_id":2,"root_call_id":1}"#).unwrap();
        assert!(!h.is_root());
    }

    #[test]
    fn head_reads_other_id_types_as_absent() {
        for v in [
            "null",
            "true",
            "false",
            "{}",
            r#"{"a":[1,{"b":"c"}]}"#,
            "[]",
            r#"["r"]"#,
        ] {
            let data = format!(
                r#"{{"type":"end","call_id":"t","parent_call_id":{v},"root_call_id":{v}}}"#
            );
            let h = head(data.as_bytes()).unwrap();
            assert_eq!(
                (h.parent_call_id.as_ref(), h.root_call_id.as_ref()),
                (None, None),
                "{v}"
            );
            assert_eq!(
                terminal_of(data.as_bytes()),
                Ok(Some(Terminal::Completed)),
                "{v}"
            );
            check(data.as_bytes());
        }
    }

    #[test]
    fn head_takes_the_last_of_duplicate_keys() {
        let h = head(br#"{"type":"start","call_id":"a","type":"end","call_id":null}"#).unwrap();
        assert_eq!((h.kind(), h.call_id), (AfKind::End, None));
        assert_eq!(head(br#"{"type":"end","type":3}"#), Err(AfError::NoType));
        let h =
            head(br#"{"type":3,"type":"error","parent_call_id":"p","parent_call_id":""}"#).unwrap();
        assert!(h.is_kind(&AfKind::Error) && h.is_root());
        for data in [
            &br#"{"type":"start","call_id":"a","type":"end","call_id":null}"#[..],
            br#"{"type":"end","type":3}"#,
            br#"{"type":3,"type":"error","parent_call_id":"p","parent_call_id":""}"#,
            br#"{"type":"error","content":"a","content":{"message":"b"}}"#,
        ] {
            check(data);
        }
    }

    #[test]
    fn head_rejects_what_parse_rejects() {
        assert!(matches!(head(b"not json"), Err(AfError::NotJson(_))));
        assert_eq!(head(b"[1,{\"type\":\"end\"}]"), Err(AfError::NotObject));
        assert_eq!(head(b" \"delta\" "), Err(AfError::NotObject));
        assert_eq!(head(b"{}"), Err(AfError::NoType));
        let deep = |n: usize| format!(r#"{{"type":"end","x":{}{}}}"#, "[".repeat(n), "]".repeat(n));
        for data in [
            &b""[..],
            b"{",
            b"{\"type\":\"end\"",
            b"{\"type\":\"end\"} x",
            b"{\"type\":\"end\"}{}",
            b"{\"type\":\"end\",}",
            b"{'type':'end'}",
            b"null",
            b"12",
            b"[1,2",
            // Looser under `IgnoredAny`, rejected by `parse`: out-of-range numbers, lone
            // surrogates, invalid UTF-8, control characters, invalid escapes.
            b"{\"type\":\"end\",\"x\":1e400}",
            b"{\"type\":\"end\",\"x\":[\"\\ud800\"]}",
            b"{\"type\":\"end\",\"x\":{\"\\udc00\":1}}",
            b"{\"type\":\"end\",\"x\":\"\xff\"}",
            b"{\"type\":\"end\",\"\xc3\":1}",
            b"{\"type\":\"end\",\"x\":\"\x01\"}",
            b"{\"type\":\"end\",\"x\":\"\\q\"}",
            b"{\"type\":\"end\",\"x\":01}",
            b"{\"type\":\"end\",\"x\":1.}",
            b"{\"type\":\"end\",\"x\":-}",
            b"{\"type\":\"end\",\"x\":tru}",
            b"\xef\xbb\xbf{\"type\":\"end\"}",
        ] {
            check(data);
        }
        assert!(matches!(
            head(b"{\"type\":\"end\",\"x\":1e400}"),
            Err(AfError::NotJson(_))
        ));
        // serde_json's nesting limit (127 levels deep) applies as in `parse`.
        for n in [1, 126, 127, 128, 129, 1000] {
            check(deep(n).as_bytes());
        }
        assert!(head(deep(126).as_bytes()).is_ok());
        assert!(head(deep(127).as_bytes()).is_err());
    }

    #[test]
    fn terminal_of_reads_error_messages() {
        let data =
            br#"{"type":"ERROR","content":{"message":"bad"},"call_id":"r","root_call_id":"r"}"#;
        assert_eq!(terminal_of(data), Ok(Some(Terminal::Error("bad".into()))));
        assert_eq!(
            terminal_of(br#"{"type":"error","parent_call_id":"r"}"#),
            Ok(None)
        );
        assert_eq!(terminal_of(br#"{"type":"delta"}"#), Ok(None));
        assert_eq!(terminal_of(b"{}"), Err(AfError::NoType));
        let syn = synthetic_error("timeout", "slow");
        assert_eq!(terminal_of(&syn), Ok(Some(Terminal::Error("slow".into()))));
    }

    /// A JSON string literal (quotes included) made of plain text and escapes, some invalid.
    fn json_str() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            6 => "[a-zA-Z0-9 _]{0,5}",
            1 => Just("é".to_owned()),
            1 => Just("\\\"".to_owned()),
            1 => Just("\\\\".to_owned()),
            1 => Just("\\/".to_owned()),
            1 => Just("\\n".to_owned()),
            1 => Just("\\u0072".to_owned()),
            1 => Just("\\u00E9".to_owned()),
            1 => Just("\\ud83d\\ude00".to_owned()),
        ];
        // Rarely, an invalid piece: a lone surrogate, a bad escape, a control character.
        let bad = prop::sample::select(vec!["\\ud800", "\\udc00x", "\\x", "\\u12", "\u{1}"]);
        let bad = (bad, any::<prop::sample::Index>());
        (
            proptest::collection::vec(piece, 0..4),
            proptest::option::weighted(0.03, bad),
        )
            .prop_map(|(mut p, bad)| {
                if let Some((b, at)) = bad {
                    p.insert(at.index(p.len() + 1), b.to_owned());
                }
                format!("\"{}\"", p.concat())
            })
    }

    /// A JSON number's text, some out of range or malformed.
    fn json_num() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => any::<i64>().prop_map(|n| n.to_string()),
            4 => any::<u64>().prop_map(|n| n.to_string()),
            4 => (-3i64..3).prop_map(|n| n.to_string()),
            4 => any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| format!("{f:?}")),
            4 => any::<f32>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| format!("{f:e}")),
            4 => prop::sample::select(vec![
                "-0",
                "-0.0",
                "1.0",
                "1.5",
                "1E3",
                "2.5e-3",
                "1e-400",
                "123456789012345678901234567890",
                "-123456789012345678901234567890",
            ])
            .prop_map(str::to_owned),
            // Rarely, out of range or malformed.
            1 => prop::sample::select(vec!["1e400", "-1e400", "01", "1.", "-", ".5", "1e", "+1"])
                .prop_map(str::to_owned),
        ]
    }

    /// A `type` value: a known name in any case, another name, or not a string.
    fn json_type() -> impl Strategy<Value = String> {
        let names = prop::sample::select(vec![
            "start",
            "delta",
            "end",
            "error",
            "tool_progress",
            "artifact_error",
            "text_replace",
            "data",
            "approval_required",
            "",
            "end ",
            "en",
        ]);
        prop_oneof![
            (names, proptest::collection::vec(any::<bool>(), 24)).prop_map(|(n, up)| {
                let cased: String = n
                    .chars()
                    .zip(up)
                    .map(|(c, u)| if u { c.to_ascii_uppercase() } else { c })
                    .collect();
                format!("\"{cased}\"")
            }),
            Just("\"\\u0065nd\"".to_owned()),
            Just("\"ERR\\u004fR\"".to_owned()),
            json_str(),
        ]
    }

    /// Any JSON value, nested.
    fn json_value() -> impl Strategy<Value = String> {
        let leaf = prop_oneof![
            prop::sample::select(vec!["null", "true", "false"]).prop_map(str::to_owned),
            json_num(),
            json_str(),
            json_type(),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4)
                    .prop_map(|vs| format!("[{}]", vs.join(","))),
                proptest::collection::vec((json_key(), inner), 0..4).prop_map(|kvs| {
                    let kvs: Vec<String> =
                        kvs.into_iter().map(|(k, v)| format!("{k}:{v}")).collect();
                    format!("{{{}}}", kvs.join(","))
                }),
            ]
        })
    }

    fn json_key() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => prop::sample::select(vec![
                "\"type\"", "\"call_id\"", "\"parent_call_id\"", "\"root_call_id\"",
                "\"typ\\u0065\"", "\"c\\u0061ll_id\"", "\"Type\"", "\"content\"", "\"metadata\"",
                "\"error\"",
            ])
            .prop_map(str::to_owned),
            1 => json_str(),
        ]
    }

    /// A value for an identifying field: ids from a small pool (so that they often match),
    /// numbers, other types, nested values.
    fn field_value() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => prop::sample::select(vec![
                "\"r\"", "\"t\"", "\"\"", "\"\\u0072\"", "\"1\"", "1", "1.0", "-1", "null",
                "true", "{}", "[\"r\"]",
            ])
            .prop_map(str::to_owned),
            2 => json_type(),
            1 => json_num(),
            1 => json_value(),
        ]
    }

    /// An object payload, usually with a `type` first, with whitespace between tokens.
    fn json_object() -> impl Strategy<Value = String> {
        let ws = prop::sample::select(vec!["", "", " ", "\n\t ", "\r\n"]);
        let ty = proptest::option::weighted(0.8, json_type());
        let kvs = proptest::collection::vec((json_key(), field_value(), ws.clone(), ws), 0..7);
        (ty, kvs).prop_map(|(ty, kvs)| {
            let kvs: Vec<String> = ty
                .map(|t| format!("\"type\":{t}"))
                .into_iter()
                .chain(
                    kvs.into_iter()
                        .map(|(k, v, a, b)| format!("{a}{k}{b}:{a}{v}{b}")),
                )
                .collect();
            format!("{{{}}}", kvs.join(","))
        })
    }

    fn payload() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            8 => json_object().prop_map(String::into_bytes),
            1 => json_value().prop_map(String::into_bytes),
            1 => (json_object(), prop::sample::select(vec![" ", "x", "{}", ",", "\u{0}", "  \n"]))
                .prop_map(|(o, t)| format!("{o}{t}").into_bytes()),
            1 => (json_object(), any::<prop::sample::Index>()).prop_map(|(o, i)| {
                let cut = i.index(o.len() + 1);
                o.into_bytes()[..cut].to_vec()
            }),
            1 => (json_object(), any::<prop::sample::Index>(), any::<u8>()).prop_map(|(o, i, b)| {
                let mut bytes = o.into_bytes();
                let at = i.index(bytes.len());
                bytes[at] = b;
                bytes
            }),
            1 => proptest::collection::vec(any::<u8>(), 0..40),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        /// `head` (and `terminal_of`) read every payload exactly as `parse` (and `terminal`).
        #[test]
        fn head_agrees_with_parse(data in payload()) {
            agrees(&data)?;
        }
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
