//! `text/event-stream` encoder: appends SSE frames to a caller-owned byte buffer.
//!
//! Owns the serialisation of events, comments and `retry` frames so that what it writes is
//! read back by a WHATWG HTML §9.2.5/§9.2.6 parser (our `Decoder` included) as the caller
//! meant. Every frame ends with a blank line, so frames can be concatenated freely. No I/O.

use memchr::memchr2_iter;

/// Append one event: `id: ..` if `id` is given, `event: ..` if `event` is given, one
/// `data: ..` line per line of `data`, then the blank line that dispatches it.
///
/// `data` is split on CRLF, LF and CR, so any string is carried; a conforming decoder joins
/// the lines with LF, i.e. it reads `data` back with every CRLF and lone CR turned into LF.
/// Empty `data` is written as a single `data: ` line, which a decoder does dispatch, as an
/// event with empty data (§9.2.6: the data buffer then holds one LF, so it is not empty).
///
/// `id` and `event` are single-line fields: each CR or LF in them is replaced by a space.
/// Note that per §9.2.6 a decoder ignores an `id` containing U+0000, and an empty `id`
/// (`Some("")`) resets the last event ID rather than setting it. `Some("")` for `event` is
/// the same as `None`.
pub fn encode_event(out: &mut Vec<u8>, id: Option<&str>, event: Option<&str>, data: &str) {
    out.reserve(
        data.len() + id.map_or(0, |id| id.len() + 5) + event.map_or(0, |event| event.len() + 8) + 8,
    );
    if let Some(id) = id {
        single_line_field(out, b"id: ", id);
    }
    if let Some(event) = event {
        single_line_field(out, b"event: ", event);
    }
    for_each_line(data.as_bytes(), |line| {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(line);
        out.push(b'\n');
    });
    out.push(b'\n');
}

/// Append a comment frame: `: text` (one `: ` line per line of `text`, split on CRLF, LF
/// and CR), then a blank line. Decoders ignore it (§9.2.6); it is useful as a keep-alive.
/// The blank line dispatches nothing on its own, since no data precedes it in this frame.
pub fn encode_comment(out: &mut Vec<u8>, text: &str) {
    out.reserve(text.len() + 5);
    for_each_line(text.as_bytes(), |line| {
        out.extend_from_slice(b": ");
        out.extend_from_slice(line);
        out.push(b'\n');
    });
    out.push(b'\n');
}

/// Append `retry: ms` and a blank line, telling the client to wait `ms` milliseconds before
/// reconnecting (§9.2.6 `retry` field).
pub fn encode_retry(out: &mut Vec<u8>, ms: u64) {
    out.extend_from_slice(b"retry: ");
    let mut digits = [0u8; 20]; // u64::MAX has 20 digits
    let mut start = digits.len();
    let mut rest = ms;
    loop {
        start -= 1;
        digits[start] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[start..]);
    out.extend_from_slice(b"\n\n");
}

/// Write `prefix` and `value` with CR and LF replaced by spaces, then LF.
fn single_line_field(out: &mut Vec<u8>, prefix: &[u8], value: &str) {
    out.extend_from_slice(prefix);
    let value = value.as_bytes();
    let mut start = 0;
    for end in memchr2_iter(b'\r', b'\n', value) {
        out.extend_from_slice(&value[start..end]);
        out.push(b' ');
        start = end + 1;
    }
    out.extend_from_slice(&value[start..]);
    out.push(b'\n');
}

/// Call `f` with each line of `text`, lines being separated by CRLF, LF or CR (§9.2.5).
/// Always calls `f` at least once; text ending with a line break yields a final empty line.
fn for_each_line(text: &[u8], mut f: impl FnMut(&[u8])) {
    let mut start = 0;
    for end in memchr2_iter(b'\r', b'\n', text) {
        if end < start {
            // The LF of a CRLF pair.
            continue;
        }
        f(&text[start..end]);
        start = end + 1;
        if text[end] == b'\r' && text.get(start) == Some(&b'\n') {
            start += 1;
        }
    }
    f(&text[start..]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sse::{Decoder, SseEvent};
    use proptest::prelude::*;

    fn event(id: Option<&str>, event: Option<&str>, data: &str) -> String {
        let mut out = Vec::new();
        encode_event(&mut out, id, event, data);
        String::from_utf8(out).unwrap()
    }

    fn decode(bytes: &[u8]) -> (Vec<SseEvent>, Decoder) {
        let mut dec = Decoder::new(usize::MAX);
        let mut out = Vec::new();
        dec.feed(bytes, &mut out).unwrap();
        dec.finish();
        (out, dec)
    }

    #[test]
    fn event_layout() {
        assert_eq!(
            event(Some("7"), Some("delta"), "hi"),
            "id: 7\nevent: delta\ndata: hi\n\n"
        );
        assert_eq!(event(None, None, "hi"), "data: hi\n\n");
        assert_eq!(
            event(None, Some("e"), "a\nb"),
            "event: e\ndata: a\ndata: b\n\n"
        );
    }

    #[test]
    fn data_split_on_every_line_break() {
        assert_eq!(
            event(None, None, "a\r\nb\rc\nd"),
            "data: a\ndata: b\ndata: c\ndata: d\n\n"
        );
        assert_eq!(event(None, None, "a\n"), "data: a\ndata: \n\n");
        assert_eq!(event(None, None, "\r\r\n"), "data: \ndata: \ndata: \n\n");
        assert_eq!(event(None, None, " lead"), "data:  lead\n\n");
    }

    #[test]
    fn empty_data_is_dispatched_with_empty_data() {
        assert_eq!(event(None, None, ""), "data: \n\n");
        let (events, _) = decode(event(Some("1"), None, "").as_bytes());
        assert_eq!(
            events,
            vec![SseEvent {
                event: String::new(),
                data: String::new(),
                id: Some("1".into())
            }]
        );
    }

    #[test]
    fn id_and_event_line_breaks_become_spaces() {
        assert_eq!(
            event(Some("a\nb\r\nc\rd"), Some("x\ny"), "z"),
            "id: a b  c d\nevent: x y\ndata: z\n\n"
        );
        let (events, dec) = decode(event(Some("a\nb"), Some("x\r"), "z").as_bytes());
        assert_eq!(events[0].event, "x ");
        assert_eq!(dec.last_event_id(), Some("a b"));
    }

    #[test]
    fn comment_frames() {
        let mut out = Vec::new();
        encode_comment(&mut out, "keep-alive");
        assert_eq!(out, b": keep-alive\n\n");
        out.clear();
        encode_comment(&mut out, "two\r\nlines");
        assert_eq!(out, b": two\n: lines\n\n");
        out.clear();
        encode_comment(&mut out, "");
        assert_eq!(out, b": \n\n");
        // Decoders see nothing.
        encode_comment(&mut out, "data: not data\nid: 5");
        let (events, dec) = decode(&out);
        assert!(events.is_empty());
        assert_eq!(dec.last_event_id(), None);
    }

    #[test]
    fn retry_frames() {
        for ms in [0, 7, 10, 1500, 4_294_967_296, u64::MAX] {
            let mut out = b"x".to_vec();
            encode_retry(&mut out, ms);
            assert_eq!(out, format!("xretry: {ms}\n\n").as_bytes());
            let (events, dec) = decode(&out[1..]);
            assert!(events.is_empty());
            assert_eq!(dec.retry(), Some(ms));
        }
    }

    #[test]
    fn appends_to_existing_buffer() {
        let mut out = b"prefix".to_vec();
        encode_event(&mut out, None, None, "d");
        assert_eq!(out, b"prefixdata: d\n\n");
    }

    /// Data with line-break-heavy content, plus anything.
    fn data() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            Just("\r\n".to_owned()),
            Just("\r".to_owned()),
            Just("\n".to_owned()),
            Just(" ".to_owned()),
            Just(":".to_owned()),
            Just("data: ".to_owned()),
            Just("\u{FEFF}".to_owned()),
            Just("\0".to_owned()),
            any::<String>(),
        ];
        proptest::collection::vec(piece, 0..6).prop_map(|p| p.concat())
    }

    type Frame = (Option<String>, Option<String>, String, Option<u64>);

    fn frame() -> impl Strategy<Value = Frame> {
        (
            proptest::option::of("[^\0\r\n]{0,6}"),
            proptest::option::of("[^\r\n]{0,6}"),
            data(),
            proptest::option::weighted(0.2, any::<u64>()),
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Encoding then decoding gives back every event, with data normalised (CRLF and CR
        /// read back as LF) and the id as the persistent last-event-ID buffer.
        #[test]
        fn round_trip(frames in proptest::collection::vec(frame(), 0..8), chunk in 1usize..64) {
            let mut wire = Vec::new();
            let mut expected = Vec::new();
            let mut last_id: Option<String> = None;
            let mut retry = None;
            for (i, (id, ev, data, ms)) in frames.iter().enumerate() {
                if i % 3 == 1 {
                    encode_comment(&mut wire, data);
                }
                if let Some(ms) = ms {
                    encode_retry(&mut wire, *ms);
                    retry = Some(*ms);
                }
                encode_event(&mut wire, id.as_deref(), ev.as_deref(), data);
                if let Some(id) = id {
                    last_id = (!id.is_empty()).then(|| id.clone());
                }
                expected.push(SseEvent {
                    event: ev.clone().unwrap_or_default(),
                    data: data.replace("\r\n", "\n").replace('\r', "\n"),
                    id: last_id.clone(),
                });
            }
            let mut dec = Decoder::new(usize::MAX);
            let mut events = Vec::new();
            for piece in wire.chunks(chunk) {
                dec.feed(piece, &mut events).unwrap();
            }
            dec.finish();
            prop_assert_eq!(events, expected);
            prop_assert_eq!(dec.last_event_id(), last_id.as_deref());
            prop_assert_eq!(dec.retry(), retry);
        }
    }
}
