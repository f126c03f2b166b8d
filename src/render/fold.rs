//! STUB
use crate::event::Event;
pub fn fold<'a>(id: &str, events: impl IntoIterator<Item = &'a Event>) -> serde_json::Value {
    serde_json::json!({"id": id, "role": "assistant", "parts": events.into_iter().map(|e| serde_json::from_slice::<serde_json::Value>(&e.data).unwrap_or_default()).collect::<Vec<_>>()})
}
