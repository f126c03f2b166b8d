//! The specification's decoding of a whole event stream (WHATWG HTML §9.2.5/§9.2.6), written
//! for clarity, not speed: the reference the incremental [`super::Decoder`] is tested and fuzzed
//! against (any chunking of a stream must decode to exactly this). Pure; not used to serve.

use super::decode::BOM;
use super::SseEvent;

/// Decode a whole stream as the specification reads: strip one BOM, decode with
/// replacement, split lines char by char, with no size limit. Returns the events, the last
/// event id and the last `retry`.
pub fn decode_whole(input: &[u8]) -> (Vec<SseEvent>, Option<String>, Option<u64>) {
    let input = input.strip_prefix(&BOM[..]).unwrap_or(input);
    let text = String::from_utf8_lossy(input);
    let (mut data, mut event, mut last_id) = (String::new(), String::new(), String::new());
    let mut retry = None;
    let mut events = Vec::new();
    let mut lines = Vec::new();
    let mut line = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' => {
                if chars.peek() == Some(&'\n') {
                    chars.next();
                }
                lines.push(std::mem::take(&mut line));
            }
            '\n' => lines.push(std::mem::take(&mut line)),
            c => line.push(c),
        }
    }
    // `line` (unterminated) is discarded at end of stream.
    for line in lines {
        if line.is_empty() {
            if data.is_empty() {
                event.clear();
                continue;
            }
            data.pop();
            events.push(SseEvent {
                event: std::mem::take(&mut event),
                data: std::mem::take(&mut data),
                id: (!last_id.is_empty()).then(|| last_id.clone()),
            });
            continue;
        }
        if line.starts_with(':') {
            continue;
        }
        let (name, value) = match line.find(':') {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(' ').unwrap_or(v))
            }
            None => (&line[..], ""),
        };
        match name {
            "event" => event = value.to_owned(),
            "data" => {
                data.push_str(value);
                data.push('\n');
            }
            "id" if !value.contains('\0') => last_id = value.to_owned(),
            "retry" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                retry = Some(value.parse::<u64>().unwrap_or(u64::MAX));
            }
            _ => {}
        }
    }
    let last_id = (!last_id.is_empty()).then_some(last_id);
    (events, last_id, retry)
}
