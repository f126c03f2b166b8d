//! STUB
use bytes::Bytes;
pub struct AfEvent { pub v: serde_json::Value }
#[derive(Debug)]
pub struct AfError(pub String);
impl std::fmt::Display for AfError { fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result { f.write_str(&self.0) } }
pub enum Terminal { Completed, Error(String) }
pub fn parse(data: &[u8]) -> Result<AfEvent, AfError> {
    let v: serde_json::Value = serde_json::from_slice(data).map_err(|e| AfError(e.to_string()))?;
    if v.get("type").and_then(|t| t.as_str()).is_none() { return Err(AfError("no type".into())); }
    Ok(AfEvent { v })
}
pub fn terminal(ev: &AfEvent) -> Option<Terminal> {
    let root = ev.v.get("parent_call_id").map_or(true, |p| p.is_null());
    match ev.v["type"].as_str().unwrap_or("").to_ascii_lowercase().as_str() {
        "end" if root => Some(Terminal::Completed),
        "error" if root => Some(Terminal::Error(ev.v["content"]["message"].as_str().unwrap_or("error").into())),
        _ => None,
    }
}
pub fn synthetic_error(status: &str, message: &str) -> Bytes {
    Bytes::from(serde_json::json!({"type":"error","content":{"message":message},"metadata":{"sluice_status":status}}).to_string())
}
