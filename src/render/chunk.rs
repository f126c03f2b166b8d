//! The AI SDK v5 UI-message chunks Sluice emits, and their exact JSON encoding.
//!
//! Clients from ai 5.0.0 to 5.0.216 validate every chunk with a strict schema: an unknown key
//! (or an unknown `type`) breaks the whole stream. So [`Chunk::write_json`] writes exactly the
//! documented camelCase fields, leaves every optional field out unless Sluice has a value for it,
//! and never adds extras such as `finishReason`, `dynamic` or `providerMetadata`
//! (research/protocols.md §1.3). Ordering and resume ids live in SSE `id:` lines, not here.
//!
//! Tool chunks carry the documented `providerExecuted: true`: every tool an agent calls has
//! already run on the backend, so a `useChat` client must not run it again (`onToolCall`) nor
//! resubmit when it completes (`lastAssistantMessageIsCompleteWithToolCalls`).

use std::borrow::Cow;

use serde::Serialize;
use serde_json::Value;

/// One UI-message chunk (a subset of v5's `UIMessageChunk`).
#[derive(Clone, Debug, PartialEq)]
pub enum Chunk {
    /// `start{messageId}`: the assistant message begins.
    Start {
        /// The assistant message id (the one snapshots report).
        message_id: String,
    },
    /// `start-step`.
    StartStep,
    /// `finish-step`.
    FinishStep,
    /// `finish` (without `finishReason`, which clients before 5.0.92 reject).
    Finish,
    /// `text-start{id}`.
    TextStart {
        /// The text part's id.
        id: String,
    },
    /// `text-delta{id, delta}`.
    TextDelta {
        /// The text part's id.
        id: String,
        /// Text to append.
        delta: String,
    },
    /// `text-end{id}`.
    TextEnd {
        /// The text part's id.
        id: String,
    },
    /// `reasoning-start{id}`.
    ReasoningStart {
        /// The reasoning part's id.
        id: String,
    },
    /// `reasoning-delta{id, delta}`.
    ReasoningDelta {
        /// The reasoning part's id.
        id: String,
        /// Text to append.
        delta: String,
    },
    /// `reasoning-end{id}`.
    ReasoningEnd {
        /// The reasoning part's id.
        id: String,
    },
    /// `tool-input-start{toolCallId, toolName}`.
    ToolInputStart {
        /// The call id.
        tool_call_id: String,
        /// The tool's name (the part becomes `tool-<name>`).
        tool_name: String,
    },
    /// `tool-input-delta{toolCallId, inputTextDelta}`.
    ToolInputDelta {
        /// The call id.
        tool_call_id: String,
        /// A piece of the input's JSON text.
        input_text_delta: String,
    },
    /// `tool-input-available{toolCallId, toolName, input}`.
    ToolInputAvailable {
        /// The call id.
        tool_call_id: String,
        /// The tool's name.
        tool_name: String,
        /// The call's input (any JSON).
        input: Value,
    },
    /// `tool-output-available{toolCallId, output}`.
    ToolOutputAvailable {
        /// The call id.
        tool_call_id: String,
        /// The call's result (any JSON).
        output: Value,
    },
    /// `tool-output-error{toolCallId, errorText}`.
    ToolOutputError {
        /// The call id.
        tool_call_id: String,
        /// Why the call failed.
        error_text: String,
    },
    /// `source-url{sourceId, url, title?}`.
    SourceUrl {
        /// The source's id.
        source_id: String,
        /// Its URL.
        url: String,
        /// Its title, when known.
        title: Option<String>,
    },
    /// `source-document{sourceId, mediaType, title, filename?}`.
    SourceDocument {
        /// The source's id.
        source_id: String,
        /// Its media type.
        media_type: String,
        /// Its title.
        title: String,
        /// Its file name, when known.
        filename: Option<String>,
    },
    /// `file{url, mediaType}`.
    File {
        /// A hosted or `data:` URL.
        url: String,
        /// Its media type.
        media_type: String,
    },
    /// `data-<name>{id?, data, transient?}`.
    Data {
        /// The name after `data-`.
        name: String,
        /// Written only when `Some`; a non-transient part with the same name and id is
        /// replaced in place by the client.
        id: Option<String>,
        /// The payload.
        data: Value,
        /// Written (as `true`) only when true: the client passes it to `onData` and does not
        /// store it in the message.
        transient: bool,
    },
    /// `error{errorText}`.
    Error {
        /// The message shown to the user.
        error_text: String,
    },
    /// `abort`.
    Abort,
}

/// Append `v` as JSON. Serialising strings and `Value`s into a `Vec` cannot fail; should it
/// ever, the field reads `null` rather than the process panicking.
fn put<T: Serialize + ?Sized>(out: &mut Vec<u8>, v: &T) {
    let mark = out.len();
    if serde_json::to_writer(&mut *out, v).is_err() {
        out.truncate(mark);
        out.extend_from_slice(b"null");
    }
}

/// Append `,"key":` (the key must need no escaping).
fn key(out: &mut Vec<u8>, k: &str) {
    out.extend_from_slice(b",\"");
    out.extend_from_slice(k.as_bytes());
    out.extend_from_slice(b"\":");
}

impl Chunk {
    /// The chunk's `type` value (`data-<name>` for data chunks).
    pub fn type_name(&self) -> Cow<'_, str> {
        Cow::Borrowed(match self {
            Chunk::Start { .. } => "start",
            Chunk::StartStep => "start-step",
            Chunk::FinishStep => "finish-step",
            Chunk::Finish => "finish",
            Chunk::TextStart { .. } => "text-start",
            Chunk::TextDelta { .. } => "text-delta",
            Chunk::TextEnd { .. } => "text-end",
            Chunk::ReasoningStart { .. } => "reasoning-start",
            Chunk::ReasoningDelta { .. } => "reasoning-delta",
            Chunk::ReasoningEnd { .. } => "reasoning-end",
            Chunk::ToolInputStart { .. } => "tool-input-start",
            Chunk::ToolInputDelta { .. } => "tool-input-delta",
            Chunk::ToolInputAvailable { .. } => "tool-input-available",
            Chunk::ToolOutputAvailable { .. } => "tool-output-available",
            Chunk::ToolOutputError { .. } => "tool-output-error",
            Chunk::SourceUrl { .. } => "source-url",
            Chunk::SourceDocument { .. } => "source-document",
            Chunk::File { .. } => "file",
            Chunk::Data { name, .. } => return Cow::Owned(format!("data-{name}")),
            Chunk::Error { .. } => "error",
            Chunk::Abort => "abort",
        })
    }

    /// Append the chunk as single-line JSON (no trailing newline), with exactly the documented
    /// v5 field names.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"type\":");
        match self {
            Chunk::Data { name, .. } => {
                // `data-` + name, escaped as one string without building it first.
                let mark = out.len();
                put(out, name.as_str());
                out.splice(mark + 1..mark + 1, b"data-".iter().copied());
            }
            other => {
                out.push(b'"');
                out.extend_from_slice(other.type_name().as_bytes());
                out.push(b'"');
            }
        }
        match self {
            Chunk::Start { message_id } => {
                key(out, "messageId");
                put(out, message_id.as_str());
            }
            Chunk::StartStep | Chunk::FinishStep | Chunk::Finish | Chunk::Abort => {}
            Chunk::TextStart { id }
            | Chunk::TextEnd { id }
            | Chunk::ReasoningStart { id }
            | Chunk::ReasoningEnd { id } => {
                key(out, "id");
                put(out, id.as_str());
            }
            Chunk::TextDelta { id, delta } | Chunk::ReasoningDelta { id, delta } => {
                key(out, "id");
                put(out, id.as_str());
                key(out, "delta");
                put(out, delta.as_str());
            }
            Chunk::ToolInputStart {
                tool_call_id,
                tool_name,
            } => {
                key(out, "toolCallId");
                put(out, tool_call_id.as_str());
                key(out, "providerExecuted");
                out.extend_from_slice(b"true");
                key(out, "toolName");
                put(out, tool_name.as_str());
            }
            Chunk::ToolInputDelta {
                tool_call_id,
                input_text_delta,
            } => {
                key(out, "toolCallId");
                put(out, tool_call_id.as_str());
                key(out, "inputTextDelta");
                put(out, input_text_delta.as_str());
            }
            Chunk::SourceUrl {
                source_id,
                url,
                title,
            } => {
                key(out, "sourceId");
                put(out, source_id.as_str());
                key(out, "url");
                put(out, url.as_str());
                if let Some(t) = title {
                    key(out, "title");
                    put(out, t.as_str());
                }
            }
            Chunk::SourceDocument {
                source_id,
                media_type,
                title,
                filename,
            } => {
                key(out, "sourceId");
                put(out, source_id.as_str());
                key(out, "mediaType");
                put(out, media_type.as_str());
                key(out, "title");
                put(out, title.as_str());
                if let Some(f) = filename {
                    key(out, "filename");
                    put(out, f.as_str());
                }
            }
            Chunk::File { url, media_type } => {
                key(out, "url");
                put(out, url.as_str());
                key(out, "mediaType");
                put(out, media_type.as_str());
            }
            Chunk::ToolInputAvailable {
                tool_call_id,
                tool_name,
                input,
            } => {
                key(out, "toolCallId");
                put(out, tool_call_id.as_str());
                key(out, "providerExecuted");
                out.extend_from_slice(b"true");
                key(out, "toolName");
                put(out, tool_name.as_str());
                key(out, "input");
                put(out, input);
            }
            Chunk::ToolOutputAvailable {
                tool_call_id,
                output,
            } => {
                key(out, "toolCallId");
                put(out, tool_call_id.as_str());
                key(out, "providerExecuted");
                out.extend_from_slice(b"true");
                key(out, "output");
                put(out, output);
            }
            Chunk::ToolOutputError {
                tool_call_id,
                error_text,
            } => {
                key(out, "toolCallId");
                put(out, tool_call_id.as_str());
                key(out, "providerExecuted");
                out.extend_from_slice(b"true");
                key(out, "errorText");
                put(out, error_text.as_str());
            }
            Chunk::Data {
                id,
                data,
                transient,
                ..
            } => {
                if let Some(id) = id {
                    key(out, "id");
                    put(out, id.as_str());
                }
                key(out, "data");
                put(out, data);
                if *transient {
                    key(out, "transient");
                    out.extend_from_slice(b"true");
                }
            }
            Chunk::Error { error_text } => {
                key(out, "errorText");
                put(out, error_text.as_str());
            }
        }
        out.push(b'}');
    }

    /// The chunk's JSON as a `String` (convenience for tests and logs).
    pub fn to_json(&self) -> String {
        let mut out = Vec::with_capacity(64);
        self.write_json(&mut out);
        // `write_json` only writes serde_json output and ASCII, so this cannot fail.
        String::from_utf8(out).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn s(x: &str) -> String {
        x.to_owned()
    }

    #[test]
    fn exact_encodings() {
        let cases: Vec<(Chunk, &str)> = vec![
            (
                Chunk::Start {
                    message_id: s("m1"),
                },
                r#"{"type":"start","messageId":"m1"}"#,
            ),
            (Chunk::StartStep, r#"{"type":"start-step"}"#),
            (Chunk::FinishStep, r#"{"type":"finish-step"}"#),
            (Chunk::Finish, r#"{"type":"finish"}"#),
            (Chunk::Abort, r#"{"type":"abort"}"#),
            (
                Chunk::TextStart { id: s("t") },
                r#"{"type":"text-start","id":"t"}"#,
            ),
            (
                Chunk::TextDelta {
                    id: s("t"),
                    delta: s("a\"b\nc\\"),
                },
                r#"{"type":"text-delta","id":"t","delta":"a\"b\nc\\"}"#,
            ),
            (
                Chunk::TextEnd { id: s("t") },
                r#"{"type":"text-end","id":"t"}"#,
            ),
            (
                Chunk::ReasoningStart { id: s("r") },
                r#"{"type":"reasoning-start","id":"r"}"#,
            ),
            (
                Chunk::ReasoningDelta {
                    id: s("r"),
                    delta: s("é\u{2028}"),
                },
                "{\"type\":\"reasoning-delta\",\"id\":\"r\",\"delta\":\"é\u{2028}\"}",
            ),
            (
                Chunk::ReasoningEnd { id: s("r") },
                r#"{"type":"reasoning-end","id":"r"}"#,
            ),
            (
                Chunk::ToolInputStart {
                    tool_call_id: s("c"),
                    tool_name: s("search"),
                },
                r#"{"type":"tool-input-start","toolCallId":"c","providerExecuted":true,"toolName":"search"}"#,
            ),
            (
                Chunk::ToolInputAvailable {
                    tool_call_id: s("c"),
                    tool_name: s("search"),
                    input: json!({"q":"x"}),
                },
                r#"{"type":"tool-input-available","toolCallId":"c","providerExecuted":true,"toolName":"search","input":{"q":"x"}}"#,
            ),
            (
                Chunk::ToolInputAvailable {
                    tool_call_id: s("c"),
                    tool_name: s("search"),
                    input: Value::Null,
                },
                r#"{"type":"tool-input-available","toolCallId":"c","providerExecuted":true,"toolName":"search","input":null}"#,
            ),
            (
                Chunk::ToolOutputAvailable {
                    tool_call_id: s("c"),
                    output: json!([1, "two"]),
                },
                r#"{"type":"tool-output-available","toolCallId":"c","providerExecuted":true,"output":[1,"two"]}"#,
            ),
            (
                Chunk::ToolOutputError {
                    tool_call_id: s("c"),
                    error_text: s("nope"),
                },
                r#"{"type":"tool-output-error","toolCallId":"c","providerExecuted":true,"errorText":"nope"}"#,
            ),
            (
                Chunk::Data {
                    name: s("artifact"),
                    id: Some(s("a1")),
                    data: json!({"k":1}),
                    transient: false,
                },
                r#"{"type":"data-artifact","id":"a1","data":{"k":1}}"#,
            ),
            (
                Chunk::Data {
                    name: s("tool-progress"),
                    id: None,
                    data: json!("x"),
                    transient: true,
                },
                r#"{"type":"data-tool-progress","data":"x","transient":true}"#,
            ),
            (
                Chunk::ToolInputDelta {
                    tool_call_id: s("c"),
                    input_text_delta: s("{\"q\":"),
                },
                r#"{"type":"tool-input-delta","toolCallId":"c","inputTextDelta":"{\"q\":"}"#,
            ),
            (
                Chunk::SourceUrl {
                    source_id: s("s1"),
                    url: s("https://e.x/a"),
                    title: Some(s("A")),
                },
                r#"{"type":"source-url","sourceId":"s1","url":"https://e.x/a","title":"A"}"#,
            ),
            (
                Chunk::SourceUrl {
                    source_id: s("s1"),
                    url: s("u"),
                    title: None,
                },
                r#"{"type":"source-url","sourceId":"s1","url":"u"}"#,
            ),
            (
                Chunk::SourceDocument {
                    source_id: s("d"),
                    media_type: s("application/pdf"),
                    title: s("T"),
                    filename: Some(s("t.pdf")),
                },
                r#"{"type":"source-document","sourceId":"d","mediaType":"application/pdf","title":"T","filename":"t.pdf"}"#,
            ),
            (
                Chunk::SourceDocument {
                    source_id: s("d"),
                    media_type: s("text/plain"),
                    title: s("T"),
                    filename: None,
                },
                r#"{"type":"source-document","sourceId":"d","mediaType":"text/plain","title":"T"}"#,
            ),
            (
                Chunk::File {
                    url: s("data:image/png;base64,AA=="),
                    media_type: s("image/png"),
                },
                r#"{"type":"file","url":"data:image/png;base64,AA==","mediaType":"image/png"}"#,
            ),
            (
                Chunk::Error {
                    error_text: s("bad\r\n"),
                },
                r#"{"type":"error","errorText":"bad\r\n"}"#,
            ),
        ];
        for (chunk, want) in cases {
            assert_eq!(chunk.to_json(), want, "{chunk:?}");
            let v: Value = serde_json::from_str(want).expect("valid JSON");
            assert_eq!(v["type"].as_str(), Some(&*chunk.type_name()));
        }
    }

    #[test]
    fn data_names_are_escaped() {
        let c = Chunk::Data {
            name: s("we\"ird"),
            id: None,
            data: Value::Null,
            transient: false,
        };
        let v: Value = serde_json::from_str(&c.to_json()).expect("valid JSON");
        assert_eq!(v, json!({"type":"data-we\"ird","data":null}));
        assert_eq!(c.type_name(), "data-we\"ird");
    }

    #[test]
    fn json_is_one_line() {
        let c = Chunk::TextDelta {
            id: s("t"),
            delta: s("a\nb\rc\u{0}"),
        };
        let j = c.to_json();
        assert!(!j.contains('\n') && !j.contains('\r'));
        let v: Value = serde_json::from_str(&j).expect("valid JSON");
        assert_eq!(v["delta"], "a\nb\rc\u{0}");
    }
}
