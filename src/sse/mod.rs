//! STUB (replaced by the real codec).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SseEvent { pub event: String, pub data: String, pub id: Option<String> }
#[derive(Debug, PartialEq, Eq)]
pub enum DecodeError { EventTooLarge { limit: usize } }
pub struct Decoder { buf: Vec<u8>, max: usize }
impl Decoder {
    pub fn new(max: usize) -> Self { Decoder { buf: Vec::new(), max } }
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<SseEvent>) -> Result<(), DecodeError> {
        self.buf.extend_from_slice(input);
        while let Some(p) = self.buf.windows(2).position(|w| w == b"\n\n") {
            let block: Vec<u8> = self.buf.drain(..p + 2).collect();
            let text = String::from_utf8_lossy(&block);
            let mut data = Vec::new();
            for l in text.lines() { if let Some(d) = l.strip_prefix("data:") { data.push(d.trim_start().to_string()); } }
            if !data.is_empty() { out.push(SseEvent { event: String::new(), data: data.join("\n"), id: None }); }
        }
        if self.buf.len() > self.max { return Err(DecodeError::EventTooLarge { limit: self.max }); }
        Ok(())
    }
    pub fn finish(&mut self) {}
}
pub fn encode_comment(out: &mut Vec<u8>, text: &str) { out.extend_from_slice(format!(": {text}\n\n").as_bytes()); }
