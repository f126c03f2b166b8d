//! The log events that adapters other than AgentFlow write: builders for the run log's
//! vocabulary (`docs/transcoding.md`).
//!
//! The log is AgentFlow-shaped (`crate::event`), so an adapter that receives the AI SDK
//! UI-message stream or polls snapshots rewrites what it gets into the same events an AgentFlow
//! backend would send (`start`, `delta`, `end`, `error`, `tool_progress`, `artifact_*`), plus a
//! few types of Sluice's own for what AgentFlow cannot say:
//!
//! | type | shape | meaning |
//! |---|---|---|
//! | `delta` + `metadata.part_id` | root delta | text (or reasoning) of the part named `part_id`; a different id opens a new part |
//! | `text_replace` | root, `content`: the whole new text, `metadata.part_id` (+ `reasoning`) | the part's text was rewritten (not appended to) |
//! | `tool_input_delta` | nested, `content`: a piece of the input's JSON text, `metadata.tool_name` | a tool's input while it streams |
//! | `source` | `content`: `{source_type: "url"\|"document", source_id, url?, title?, media_type?, filename?}` | a cited source |
//! | `file` | `content`: `{url, media_type}` | a file the agent produced |
//! | `data` | `content`: `{name, id?, data, transient?}` | an application data part (`data-<name>`) |
//! | `ui_chunk` / `ui_part` | `content`: the chunk / part as received | a UI-message chunk or snapshot part Sluice does not understand, kept opaque |
//!
//! Nested calls name their parent with `parent_call_id` (the adapter's root call id), so
//! `verbose: false` hides them as it hides an AgentFlow backend's tools. Pure: no I/O.

use bytes::Bytes;
use serde_json::{json, Map, Value};

use crate::event::NewEvent;

fn ev(v: Value) -> NewEvent {
    NewEvent::new(Bytes::from(v.to_string()))
}

fn part_meta(part_id: &str, reasoning: bool) -> Value {
    if reasoning {
        json!({"part_id": part_id, "reasoning": true, "content_type": "reasoning"})
    } else {
        json!({"part_id": part_id})
    }
}

/// Builds the events of one run; nested calls get `root` as their parent.
#[derive(Clone, Debug)]
pub struct Events {
    root: String,
}

impl Events {
    /// Events for a run whose root call id is `root`.
    pub fn new(root: impl Into<String>) -> Events {
        Events { root: root.into() }
    }

    /// The root call id.
    pub fn root(&self) -> &str {
        &self.root
    }

    fn nested(&self, ty: &str, call_id: &str, content: Value, metadata: Value) -> NewEvent {
        ev(json!({
            "type": ty,
            "call_id": call_id,
            "parent_call_id": self.root,
            "root_call_id": self.root,
            "content": content,
            "metadata": metadata,
        }))
    }

    /// Root `start`.
    pub fn start(&self) -> NewEvent {
        ev(json!({"type": "start", "call_id": self.root, "content": {}}))
    }

    /// Root text (or reasoning) appended to the part `part_id`.
    pub fn delta(&self, part_id: &str, text: &str, reasoning: bool) -> NewEvent {
        ev(json!({
            "type": "delta",
            "call_id": self.root,
            "content": text,
            "metadata": part_meta(part_id, reasoning),
        }))
    }

    /// The part `part_id` now reads `text` in full (a rewrite, not an append).
    pub fn text_replace(&self, part_id: &str, text: &str, reasoning: bool) -> NewEvent {
        ev(json!({
            "type": "text_replace",
            "call_id": self.root,
            "content": text,
            "metadata": part_meta(part_id, reasoning),
        }))
    }

    /// A piece of a tool's input JSON text, while it streams.
    pub fn tool_input_delta(&self, call_id: &str, tool_name: &str, text: &str) -> NewEvent {
        self.nested(
            "tool_input_delta",
            call_id,
            Value::String(text.to_owned()),
            json!({"tool_name": tool_name}),
        )
    }

    /// A tool call with its input (nested `start`).
    pub fn tool_start(&self, call_id: &str, tool_name: &str, input: Value) -> NewEvent {
        self.nested(
            "start",
            call_id,
            json!({"tool_name": tool_name, "input": input}),
            json!({}),
        )
    }

    /// A tool call's result (nested `end`).
    pub fn tool_end(&self, call_id: &str, output: Value) -> NewEvent {
        self.nested("end", call_id, json!({"output": output}), json!({}))
    }

    /// A tool call's failure (nested `error`).
    pub fn tool_error(&self, call_id: &str, message: &str) -> NewEvent {
        self.nested("error", call_id, json!({"message": message}), json!({}))
    }

    /// An event of the AgentFlow vocabulary given whole (e.g. `tool_progress` read back from
    /// a UI-message data chunk).
    pub fn raw(&self, payload: Value) -> NewEvent {
        ev(payload)
    }

    /// A source cited by URL.
    pub fn source_url(&self, source_id: &str, url: &str, title: Option<&str>) -> NewEvent {
        let mut c = Map::new();
        c.insert("source_type".into(), "url".into());
        c.insert("source_id".into(), source_id.into());
        c.insert("url".into(), url.into());
        if let Some(t) = title {
            c.insert("title".into(), t.into());
        }
        ev(json!({"type": "source", "call_id": self.root, "content": c}))
    }

    /// A source document.
    pub fn source_document(
        &self,
        source_id: &str,
        media_type: &str,
        title: &str,
        filename: Option<&str>,
    ) -> NewEvent {
        let mut c = Map::new();
        c.insert("source_type".into(), "document".into());
        c.insert("source_id".into(), source_id.into());
        c.insert("media_type".into(), media_type.into());
        c.insert("title".into(), title.into());
        if let Some(f) = filename {
            c.insert("filename".into(), f.into());
        }
        ev(json!({"type": "source", "call_id": self.root, "content": c}))
    }

    /// A file (hosted or `data:` URL).
    pub fn file(&self, url: &str, media_type: &str) -> NewEvent {
        ev(json!({
            "type": "file",
            "call_id": self.root,
            "content": {"url": url, "media_type": media_type},
        }))
    }

    /// An application data part `data-<name>`.
    pub fn data(&self, name: &str, id: Option<&str>, data: Value, transient: bool) -> NewEvent {
        let mut c = Map::new();
        c.insert("name".into(), name.into());
        if let Some(id) = id {
            c.insert("id".into(), id.into());
        }
        c.insert("data".into(), data);
        if transient {
            c.insert("transient".into(), true.into());
        }
        ev(json!({"type": "data", "call_id": self.root, "content": c}))
    }

    /// Root `end`: the run completed.
    pub fn end(&self) -> NewEvent {
        ev(json!({"type": "end", "call_id": self.root, "content": {}}))
    }

    /// Root `error`: the run failed with `message`.
    pub fn error(&self, message: &str) -> NewEvent {
        ev(json!({"type": "error", "call_id": self.root, "content": {"message": message}}))
    }

    /// A UI-message chunk kept as opaque data.
    pub fn ui_chunk(&self, chunk: Value) -> NewEvent {
        ev(json!({"type": "ui_chunk", "call_id": self.root, "content": chunk}))
    }

    /// A snapshot part kept as opaque data.
    pub fn ui_part(&self, part: Value) -> NewEvent {
        ev(json!({"type": "ui_part", "call_id": self.root, "content": part}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agentflow::{parse, terminal, AfKind, Terminal};

    fn af(e: &NewEvent) -> crate::agentflow::AfEvent {
        parse(&e.data).expect("an AgentFlow-shaped event")
    }

    #[test]
    fn root_and_nested_events_read_back() {
        let b = Events::new("r1");
        assert!(af(&b.start()).is_root());
        let d = af(&b.delta("p1", "hi", false));
        assert_eq!(
            (d.kind.clone(), d.text(), d.is_reasoning()),
            (AfKind::Delta, Some("hi"), false)
        );
        assert!(af(&b.delta("p1", "hm", true)).is_reasoning());
        let t = af(&b.tool_start("c1", "search", json!({"q": 1})));
        assert!(!t.is_root());
        assert_eq!(
            (t.tool_name(), t.tool_input()),
            ("search", &json!({"q": 1}))
        );
        assert_eq!(af(&b.tool_end("c1", json!(5))).output(), &json!(5));
        assert_eq!(af(&b.tool_error("c1", "no")).error_message(), "no");
        assert_eq!(terminal(&af(&b.end())), Some(Terminal::Completed));
        assert_eq!(
            terminal(&af(&b.error("bad"))),
            Some(Terminal::Error("bad".into()))
        );
        assert!(!af(&b.tool_input_delta("c1", "search", "{")).is_root());
    }
}
