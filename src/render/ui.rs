//! STUB
use crate::event::Event;
pub struct UiRenderer { id: String, started: bool }
impl UiRenderer {
    pub fn new(id: String) -> Self { UiRenderer { id, started: false } }
    pub fn skip(&mut self, _ev: &Event) { self.started = true; }
    pub fn render_sse(&mut self, ev: &Event, out: &mut Vec<u8>) {
        if !self.started { self.started = true; out.extend_from_slice(format!("data: {{\"type\":\"start\",\"messageId\":\"{}\"}}\n\n", self.id).as_bytes()); }
        out.extend_from_slice(format!("id: {}\ndata: {{\"type\":\"data-x\",\"data\":{}}}\n\n", ev.seq, String::from_utf8_lossy(&ev.data)).as_bytes());
    }
}
