//! Incremental `text/event-stream` decoder (WHATWG HTML §9.2.5 and §9.2.6).
//!
//! Owns everything between raw body bytes and dispatched events: stripping the one leading
//! UTF-8 BOM, splitting lines on CRLF / LF / CR (including a CR and its LF arriving in
//! different chunks), field parsing, the data / event-type / last-event-ID buffers, dispatch,
//! the reconnection time (`retry`), and a bound on the bytes held for one event. It is
//! sans-io: [`Decoder::feed`] takes whatever chunk arrived and appends completed events to a
//! caller-owned `Vec`, and [`Decoder::finish`] marks the end of the stream.
//!
//! Text is decoded as UTF-8 with replacement (`String::from_utf8_lossy`) field by field.
//! Because line terminators and `:` are ASCII and end any malformed sequence, this gives the
//! same text as decoding the whole stream first, which is what §9.2.5 prescribes.

use std::borrow::Cow;
use std::fmt;

use memchr::{memchr, memchr2_iter};

/// The UTF-8 byte order mark; §9.2.5 strips one at the start of the stream.
pub(super) const BOM: [u8; 3] = [0xEF, 0xBB, 0xBF];

/// One dispatched event (§9.2.6, "dispatch the event").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` field; empty when none was given (the spec's `"message"` default is left
    /// to the caller).
    pub event: String,
    /// The `data:` lines joined with `'\n'` (the one trailing `'\n'` removed, per spec).
    pub data: String,
    /// The last-event-ID buffer at dispatch time. It persists across events until an `id`
    /// field changes it; `None` while it is empty (never set, or reset by an empty `id`).
    pub id: Option<String>,
}

/// Why [`Decoder::feed`] gave up. Once returned, the decoder is poisoned and keeps
/// returning the same error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The bytes held for the event being assembled (partial line, data buffer and event
    /// type buffer) would exceed the decoder's limit.
    EventTooLarge {
        /// The limit given to [`Decoder::new`], in bytes.
        limit: usize,
    },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::EventTooLarge { limit } => {
                write!(f, "server-sent event exceeds the {limit}-byte limit")
            }
        }
    }
}

impl std::error::Error for DecodeError {}

/// Progress through the optional leading BOM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bom {
    /// At the start of the stream; this many BOM bytes have been seen (and held back).
    Matching(u8),
    /// Past the start of the stream: a BOM is ordinary content from here on.
    Done,
}

/// Incremental, sans-io SSE decoder.
///
/// Feed it chunks with [`feed`](Decoder::feed) in stream order; chunk boundaries may fall
/// anywhere (inside a BOM, a UTF-8 sequence, a field, or between a CR and its LF) and do not
/// change the result.
///
/// Size limit: before a line is buffered or interpreted, the decoder checks that the bytes
/// of that line seen so far plus the data and event type buffers stay within
/// `max_event_bytes`; otherwise it fails with [`DecodeError::EventTooLarge`]. Comment lines
/// and unknown fields count while they are read, so a line that never ends fails instead of
/// growing without bound. A dispatched event's `data` plus `event` text stays within the
/// limit too: invalid UTF-8 grows when replaced (one byte becomes the three of U+FFFD), and
/// an event that outgrows the limit that way fails the same way. Events completed earlier in
/// the same chunk are still pushed.
#[derive(Debug)]
pub struct Decoder {
    max_event_bytes: usize,
    bom: Bom,
    /// The previous chunk ended with a CR: an LF at the start of the next one belongs to it.
    after_cr: bool,
    /// The start of a line whose end has not arrived yet.
    line: Vec<u8>,
    /// §9.2.6 data buffer (raw bytes, each value followed by `'\n'`).
    data: Vec<u8>,
    /// §9.2.6 event type buffer (raw bytes).
    event: Vec<u8>,
    /// §9.2.6 last event ID buffer (persists across events).
    last_id: String,
    /// §9.2.6 reconnection time set by `retry`, in milliseconds.
    retry: Option<u64>,
    poisoned: Option<DecodeError>,
}

impl Decoder {
    /// A decoder for a new stream that refuses to hold more than `max_event_bytes` bytes for
    /// one event (see the type's docs for what counts).
    pub fn new(max_event_bytes: usize) -> Self {
        Decoder {
            max_event_bytes,
            bom: Bom::Matching(0),
            after_cr: false,
            line: Vec::new(),
            data: Vec::new(),
            event: Vec::new(),
            last_id: String::new(),
            retry: None,
            poisoned: None,
        }
    }

    /// Feed the next chunk of the stream; every event it completes is pushed to `out`.
    ///
    /// After an `Err` the decoder is poisoned: further feeds return the same error (and push
    /// nothing). Events completed before the failing line are still pushed to `out`.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<SseEvent>) -> Result<(), DecodeError> {
        if let Some(err) = self.poisoned {
            return Err(err);
        }
        let result = self.feed_inner(input, out);
        if let Err(err) = result {
            self.poisoned = Some(err);
            self.line = Vec::new();
            self.data = Vec::new();
            self.event = Vec::new();
        }
        result
    }

    /// The last `retry:` value seen, in milliseconds, if any. Values too large for a `u64`
    /// saturate to `u64::MAX`.
    pub fn retry(&self) -> Option<u64> {
        self.retry
    }

    /// The current last-event-ID buffer; `None` while it is empty.
    pub fn last_event_id(&self) -> Option<&str> {
        if self.last_id.is_empty() {
            None
        } else {
            Some(&self.last_id)
        }
    }

    /// End of stream. Per §9.2.5 pending data is discarded: an event without its terminating
    /// blank line is not dispatched, and an unterminated last line is not interpreted.
    ///
    /// The decoder can then be fed another stream (e.g. after a reconnection): a BOM at its
    /// start is stripped again, while the last event ID and retry carry over, as they do for
    /// an `EventSource`. A poisoned decoder stays poisoned.
    pub fn finish(&mut self) {
        self.line.clear();
        self.data.clear();
        self.event.clear();
        self.after_cr = false;
        self.bom = Bom::Matching(0);
    }

    fn feed_inner(&mut self, mut input: &[u8], out: &mut Vec<SseEvent>) -> Result<(), DecodeError> {
        // §9.2.5: the UTF-8 decode algorithm strips one leading BOM. It may arrive split
        // across chunks, so matched bytes are held back until the match completes or fails.
        if let Bom::Matching(seen) = self.bom {
            let mut seen = usize::from(seen);
            let mut used = 0;
            while seen < BOM.len() && used < input.len() && input[used] == BOM[seen] {
                seen += 1;
                used += 1;
            }
            input = &input[used..];
            if seen == BOM.len() {
                self.bom = Bom::Done;
            } else if input.is_empty() {
                // Still a possible BOM prefix (`seen` < 3 fits in a u8).
                self.bom = Bom::Matching(seen as u8);
                return Ok(());
            } else {
                // Not a BOM after all: the held bytes are content.
                self.bom = Bom::Done;
                self.scan(&BOM[..seen], out)?;
            }
        }
        self.scan(input, out)
    }

    /// Split `input` into lines (§9.2.5: CRLF, LF or CR end a line) and interpret each
    /// complete one; keep the unterminated rest.
    fn scan(&mut self, input: &[u8], out: &mut Vec<SseEvent>) -> Result<(), DecodeError> {
        if input.is_empty() {
            return Ok(());
        }
        let mut start = 0;
        if self.after_cr {
            self.after_cr = false;
            if input[0] == b'\n' {
                start = 1;
            }
        }
        for end in memchr2_iter(b'\r', b'\n', input) {
            if end < start {
                // The LF of a CRLF pair, already consumed.
                continue;
            }
            self.end_line(&input[start..end], out)?;
            start = end + 1;
            if input[end] == b'\r' {
                match input.get(start) {
                    Some(b'\n') => start += 1,
                    Some(_) => {}
                    None => self.after_cr = true,
                }
            }
        }
        let rest = &input[start..];
        if !rest.is_empty() {
            self.check_size(self.line.len() + rest.len())?;
            self.line.extend_from_slice(rest);
        }
        Ok(())
    }

    /// Fails if a line of `line_len` bytes cannot be held alongside the event's buffers.
    fn check_size(&self, line_len: usize) -> Result<(), DecodeError> {
        let held = self.data.len() + self.event.len() + line_len;
        if held > self.max_event_bytes {
            Err(DecodeError::EventTooLarge {
                limit: self.max_event_bytes,
            })
        } else {
            Ok(())
        }
    }

    /// A line ended: `tail` is its part in the current chunk, after any held start.
    fn end_line(&mut self, tail: &[u8], out: &mut Vec<SseEvent>) -> Result<(), DecodeError> {
        self.check_size(self.line.len() + tail.len())?;
        if self.line.is_empty() {
            self.process_line(tail, out)?;
        } else {
            let mut line = std::mem::take(&mut self.line);
            line.extend_from_slice(tail);
            self.process_line(&line, out)?;
            line.clear();
            self.line = line;
        }
        Ok(())
    }

    /// Interpret one line (§9.2.6).
    fn process_line(&mut self, line: &[u8], out: &mut Vec<SseEvent>) -> Result<(), DecodeError> {
        // §9.2.6: an empty line dispatches the event.
        if line.is_empty() {
            return self.dispatch(out);
        }
        // §9.2.6: a line starting with ':' is a comment.
        if line[0] == b':' {
            return Ok(());
        }
        // §9.2.6: split at the first ':' and drop one leading space from the value; a line
        // without ':' is a field name with an empty value.
        let (name, value) = match memchr(b':', line) {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &[][..]),
        };
        // §9.2.6 "process the field".
        match name {
            b"event" => {
                self.event.clear();
                self.event.extend_from_slice(value);
            }
            b"data" => {
                self.data.extend_from_slice(value);
                self.data.push(b'\n');
            }
            // Ignored if the value contains U+0000 (only the byte 0 encodes it in UTF-8); an
            // empty value resets the buffer.
            b"id" if memchr(0, value).is_none() => {
                self.last_id.clear();
                self.last_id.push_str(&text(value));
            }
            // Only a value made of ASCII digits sets the reconnection time.
            b"retry" if !value.is_empty() && value.iter().all(u8::is_ascii_digit) => {
                self.retry = Some(value.iter().fold(0u64, |acc, digit| {
                    acc.saturating_mul(10)
                        .saturating_add(u64::from(digit - b'0'))
                }));
            }
            _ => {}
        }
        Ok(())
    }

    /// §9.2.6 "dispatch the event". Fails if replacing invalid UTF-8 made the event's text
    /// outgrow the limit.
    fn dispatch(&mut self, out: &mut Vec<SseEvent>) -> Result<(), DecodeError> {
        if self.data.is_empty() {
            // Nothing to fire; the last event ID buffer is kept as is.
            self.event.clear();
            return Ok(());
        }
        // Remove the one trailing LF.
        self.data.pop();
        let event = lossy(&self.event);
        let data = lossy(&self.data);
        if event.len() + data.len() > self.max_event_bytes {
            return Err(DecodeError::EventTooLarge {
                limit: self.max_event_bytes,
            });
        }
        self.event.clear();
        self.data.clear();
        let id = if self.last_id.is_empty() {
            None
        } else {
            Some(self.last_id.clone())
        };
        out.push(SseEvent { event, data, id });
        Ok(())
    }
}

/// UTF-8 decode with replacement (`String::from_utf8_lossy` semantics). Valid input, the
/// common case, takes the faster `str::from_utf8` path.
fn text(bytes: &[u8]) -> Cow<'_, str> {
    match std::str::from_utf8(bytes) {
        Ok(valid) => Cow::Borrowed(valid),
        Err(_) => String::from_utf8_lossy(bytes),
    }
}

/// [`text`] into an owned string (one exact-size allocation when non-empty).
fn lossy(bytes: &[u8]) -> String {
    text(bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const BIG: usize = 1 << 20;

    fn ev(event: &str, data: &str, id: Option<&str>) -> SseEvent {
        SseEvent {
            event: event.to_owned(),
            data: data.to_owned(),
            id: id.map(str::to_owned),
        }
    }

    /// Feed `chunks` in order to a fresh decoder with `limit`, then finish.
    fn run(limit: usize, chunks: &[&[u8]]) -> (Vec<SseEvent>, Result<(), DecodeError>, Decoder) {
        let mut dec = Decoder::new(limit);
        let mut out = Vec::new();
        let mut result = Ok(());
        for chunk in chunks {
            result = dec.feed(chunk, &mut out);
            if result.is_err() {
                break;
            }
        }
        dec.finish();
        (out, result, dec)
    }

    fn decode(input: &[u8]) -> Vec<SseEvent> {
        let (events, result, _) = run(BIG, &[input]);
        assert_eq!(result, Ok(()));
        events
    }

    #[test]
    fn simple_event() {
        assert_eq!(
            decode(b"event: delta\ndata: hello\nid: 7\n\n"),
            vec![ev("delta", "hello", Some("7"))]
        );
    }

    #[test]
    fn bom_stripped_at_start() {
        assert_eq!(decode(b"\xEF\xBB\xBFdata: x\n\n"), vec![ev("", "x", None)]);
    }

    #[test]
    fn bom_split_across_feeds() {
        let (events, result, _) = run(BIG, &[b"\xEF", b"\xBB\xBFdata: x\n\n"]);
        assert_eq!(result, Ok(()));
        assert_eq!(events, vec![ev("", "x", None)]);
        let (events, _, _) = run(BIG, &[b"\xEF", b"\xBB", b"", b"\xBF", b"data: x\n\n"]);
        assert_eq!(events, vec![ev("", "x", None)]);
    }

    #[test]
    fn only_one_bom_stripped() {
        // A second BOM is part of the field name, which is then unknown.
        assert_eq!(
            decode(b"\xEF\xBB\xBF\xEF\xBB\xBFdata: x\n\ndata: y\n\n"),
            vec![ev("", "y", None)]
        );
    }

    #[test]
    fn bom_not_at_start_kept() {
        assert_eq!(
            decode(b"data: \xEF\xBB\xBFx\n\n"),
            vec![ev("", "\u{FEFF}x", None)]
        );
        // A BOM starting a later line is not stripped: the field name is unknown.
        assert_eq!(
            decode(b"data: a\n\n\xEF\xBB\xBFdata: b\n\n"),
            vec![ev("", "a", None)]
        );
        // A BOM in a second chunk (not at stream start) is kept too.
        let (events, _, _) = run(BIG, &[b"data: a\n\n", b"\xEF\xBB\xBFdata: b\n\n"]);
        assert_eq!(events, vec![ev("", "a", None)]);
    }

    #[test]
    fn partial_bom_is_content() {
        // EF BB then 'x': not a BOM; the bytes become (invalid UTF-8) content.
        let (events, result, _) = run(BIG, &[b"\xEF\xBB", b"data: b\n\ndata: c\n\n"]);
        assert_eq!(result, Ok(()));
        // "\xEF\xBBdata: b" has an unknown field name, so only "c" is dispatched.
        assert_eq!(events, vec![ev("", "c", None)]);
        let (events, _, _) = run(BIG, &[b"\xEF", b"\n", b"data: d\n\n"]);
        assert_eq!(events, vec![ev("", "d", None)]);
    }

    #[test]
    fn line_endings_lf_cr_crlf() {
        let expected = vec![ev("", "a\nb", None), ev("", "c", None)];
        assert_eq!(decode(b"data: a\ndata: b\n\ndata: c\n\n"), expected);
        assert_eq!(decode(b"data: a\rdata: b\r\rdata: c\r\r"), expected);
        assert_eq!(
            decode(b"data: a\r\ndata: b\r\n\r\ndata: c\r\n\r\n"),
            expected
        );
        assert_eq!(decode(b"data: a\r\ndata: b\r\rdata: c\n\r\n"), expected);
    }

    #[test]
    fn cr_then_lf_across_feeds_is_one_line_ending() {
        let (events, _, _) = run(BIG, &[b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"]);
        assert_eq!(events, vec![ev("", "a\nb", None)]);
        // With an empty chunk in between, too.
        let (events, _, _) = run(BIG, &[b"data: a\r", b"", b"\n\r", b"\n"]);
        assert_eq!(events, vec![ev("", "a", None)]);
        // CR then CR across feeds is two line endings: the second dispatches.
        let (events, _, _) = run(BIG, &[b"data: a\r", b"\r"]);
        assert_eq!(events, vec![ev("", "a", None)]);
    }

    #[test]
    fn comments_ignored() {
        assert_eq!(
            decode(b": keep-alive\n:\ndata: x\n: inside\ndata: y\n\n:only\n\n"),
            vec![ev("", "x\ny", None)]
        );
    }

    #[test]
    fn field_parsing() {
        // One leading space removed, not two; no space is fine; no colon = empty value.
        assert_eq!(decode(b"data:  two\n\n"), vec![ev("", " two", None)]);
        assert_eq!(decode(b"data:none\n\n"), vec![ev("", "none", None)]);
        assert_eq!(decode(b"data\n\n"), vec![ev("", "", None)]);
        assert_eq!(decode(b"data\ndata\n\n"), vec![ev("", "\n", None)]);
        assert_eq!(decode(b"data: a:b: c\n\n"), vec![ev("", "a:b: c", None)]);
        // Unknown fields and wrong case are ignored.
        assert_eq!(
            decode(b"Data: no\nfoo: bar\ndata: yes\n\n"),
            vec![ev("", "yes", None)]
        );
        // Invalid UTF-8 is replaced.
        assert_eq!(
            decode(b"data: a\xFFb\xE2\x82\n\n"),
            vec![ev("", "a\u{FFFD}b\u{FFFD}", None)]
        );
    }

    #[test]
    fn event_type_reset_after_dispatch() {
        assert_eq!(
            decode(b"event: a\nevent: b\ndata: 1\n\ndata: 2\n\n"),
            vec![ev("b", "1", None), ev("", "2", None)]
        );
        // A block without data clears the event type too.
        assert_eq!(
            decode(b"event: lost\n\ndata: 3\n\n"),
            vec![ev("", "3", None)]
        );
    }

    #[test]
    fn id_persists_and_nul_ignored_and_empty_resets() {
        let (events, _, dec) =
            run(BIG, &[b"id: 1\ndata: a\n\ndata: b\n\nid: 2\0x\ndata: c\n\nid\ndata: d\n\nid: 3\ndata: e\n\nid:\ndata: f\n\n"]);
        assert_eq!(
            events,
            vec![
                ev("", "a", Some("1")),
                ev("", "b", Some("1")),
                ev("", "c", Some("1")),
                ev("", "d", None),
                ev("", "e", Some("3")),
                ev("", "f", None),
            ]
        );
        assert_eq!(dec.last_event_id(), None);
    }

    #[test]
    fn id_only_block_updates_last_event_id() {
        let (events, _, dec) = run(BIG, &[b"data: a\n\nid: 9\n\n"]);
        assert_eq!(events, vec![ev("", "a", None)]);
        assert_eq!(dec.last_event_id(), Some("9"));
        // And the next event carries it.
        assert_eq!(
            decode(b"id: 9\n\ndata: b\n\n"),
            vec![ev("", "b", Some("9"))]
        );
    }

    #[test]
    fn id_applies_to_event_being_assembled() {
        assert_eq!(decode(b"data: a\nid: 5\n\n"), vec![ev("", "a", Some("5"))]);
    }

    #[test]
    fn retry_only_digits() {
        let retry = |input: &[u8]| run(BIG, &[input]).2.retry();
        assert_eq!(retry(b"retry: 1500\n"), Some(1500));
        assert_eq!(retry(b"retry:0\n"), Some(0));
        assert_eq!(retry(b"retry: 1a\n"), None);
        assert_eq!(retry(b"retry: -1\n"), None);
        assert_eq!(retry(b"retry:  1\n"), None);
        assert_eq!(retry(b"retry: 1 \n"), None);
        assert_eq!(retry(b"retry: 1.5\n"), None);
        assert_eq!(retry(b"retry:\n"), None);
        assert_eq!(retry(b"retry\n"), None);
        assert_eq!(retry(b"retry: \xEF\xBC\x91\n"), None); // fullwidth digit one
        assert_eq!(retry(b"retry: 10\nretry: 1a\n"), Some(10));
        assert_eq!(retry(b"retry: 10\nretry: 20\n"), Some(20));
        assert_eq!(retry(b"retry: 99999999999999999999999\n"), Some(u64::MAX));
        // No dispatch needed, and it does not make an event.
        assert_eq!(run(BIG, &[b"retry: 5\n\n"]).0, vec![]);
    }

    #[test]
    fn multi_line_data() {
        assert_eq!(
            decode(b"data: one\ndata:\ndata: three\n\n"),
            vec![ev("", "one\n\nthree", None)]
        );
    }

    #[test]
    fn no_dispatch_without_blank_line() {
        let mut dec = Decoder::new(BIG);
        let mut out = Vec::new();
        dec.feed(b"data: a\ndata: b\n", &mut out).unwrap();
        assert!(out.is_empty());
        dec.feed(b"\n", &mut out).unwrap();
        assert_eq!(out, vec![ev("", "a\nb", None)]);
    }

    #[test]
    fn incomplete_event_dropped_at_finish() {
        let mut dec = Decoder::new(BIG);
        let mut out = Vec::new();
        dec.feed(b"data: a\n\ndata: b\nid: 4", &mut out).unwrap();
        dec.finish();
        assert_eq!(out, vec![ev("", "a", None)]);
        // The unterminated `id: 4` line was not interpreted.
        assert_eq!(dec.last_event_id(), None);
        // A new stream after finish starts clean, BOM included.
        dec.feed(b"\xEF\xBB\xBFdata: c\n\n", &mut out).unwrap();
        assert_eq!(out, vec![ev("", "a", None), ev("", "c", None)]);
        // A dangling CR from the old stream does not eat the new stream's first LF.
        dec.feed(b"data: d\r", &mut out).unwrap();
        dec.finish();
        dec.feed(b"\ndata: e\n\n", &mut out).unwrap();
        assert_eq!(out[2..], [ev("", "e", None)]);
    }

    #[test]
    fn finish_keeps_id_and_retry() {
        let mut dec = Decoder::new(BIG);
        let mut out = Vec::new();
        dec.feed(b"id: 3\nretry: 7\n\n", &mut out).unwrap();
        dec.finish();
        assert_eq!(dec.last_event_id(), Some("3"));
        assert_eq!(dec.retry(), Some(7));
        dec.feed(b"data: x\n\n", &mut out).unwrap();
        assert_eq!(out, vec![ev("", "x", Some("3"))]);
    }

    #[test]
    fn size_limit_long_data() {
        let mut dec = Decoder::new(16);
        let mut out = Vec::new();
        // Exactly at the limit is fine: "data: 0123456789" is 16 bytes.
        dec.feed(b"data: 0123456789\n\n", &mut out).unwrap();
        assert_eq!(out.len(), 1);
        // Data accumulated over several lines counts.
        dec.feed(b"data: 01234\n", &mut out).unwrap(); // data buffer holds "01234\n"
        dec.feed(b"data: 0\n", &mut out).unwrap(); // 6 + 7 <= 16; buffer now 8 bytes
                                                   // 8 + 10 > 16.
        assert_eq!(
            dec.feed(b"data: 0123\n\n", &mut out),
            Err(DecodeError::EventTooLarge { limit: 16 })
        );
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn size_limit_counts_event_type_and_comments() {
        let (_, result, _) = run(10, &[b"event: ab\n:123456789\n"]);
        assert_eq!(result, Err(DecodeError::EventTooLarge { limit: 10 }));
        let (_, result, _) = run(10, &[b"event: ab\n:1234567\n"]);
        assert_eq!(result, Ok(()));
        let (_, result, _) = run(10, &[b":12345678901\n"]);
        assert_eq!(result, Err(DecodeError::EventTooLarge { limit: 10 }));
        // After dispatch the buffers are empty again.
        let (events, result, _) = run(12, &[b"data: 123456\n\ndata: 123456\n\n"]);
        assert_eq!(result, Ok(()));
        assert_eq!(events.len(), 2);
    }

    #[test]
    fn size_limit_endless_line() {
        let mut dec = Decoder::new(1000);
        let mut out = Vec::new();
        let chunk = [b'x'; 100];
        let mut fed = 0;
        let err = loop {
            match dec.feed(&chunk, &mut out) {
                Ok(()) => fed += chunk.len(),
                Err(e) => break e,
            }
            assert!(fed <= 1000, "buffered past the limit");
        };
        assert_eq!(err, DecodeError::EventTooLarge { limit: 1000 });
        assert_eq!(fed, 1000);
        // The same in one chunk without a newline.
        let (_, result, _) = run(1000, &[&[b':'; 5000]]);
        assert_eq!(result, Err(DecodeError::EventTooLarge { limit: 1000 }));
    }

    #[test]
    fn size_limit_counts_replaced_invalid_utf8() {
        // 10 bytes held ("\xFF" x 9 and the LF), but 27 once each byte becomes U+FFFD.
        let stream: &[u8] = b"data: ok\n\ndata:\xFF\xFF\xFF\xFF\xFF\xFF\xFF\xFF\xFF\n\n";
        let (events, result, _) = run(26, &[stream]);
        assert_eq!(result, Err(DecodeError::EventTooLarge { limit: 26 }));
        assert_eq!(events, vec![ev("", "ok", None)]);
        let (events, result, _) = run(27, &[stream]);
        assert_eq!(result, Ok(()));
        assert_eq!(events[1].data, "\u{FFFD}".repeat(9));
    }

    #[test]
    fn poisoned_after_error() {
        let mut dec = Decoder::new(8);
        let mut out = Vec::new();
        let err = DecodeError::EventTooLarge { limit: 8 };
        // The event before the failing line is still delivered.
        assert_eq!(
            dec.feed(b"data: a\n\ndata: 123456789\n\n", &mut out),
            Err(err)
        );
        assert_eq!(out, vec![ev("", "a", None)]);
        assert_eq!(dec.feed(b"data: b\n\n", &mut out), Err(err));
        assert_eq!(dec.feed(b"", &mut out), Err(err));
        dec.finish();
        assert_eq!(dec.feed(b"data: b\n\n", &mut out), Err(err));
        assert_eq!(out.len(), 1);
        assert_eq!(
            err.to_string(),
            "server-sent event exceeds the 8-byte limit"
        );
    }

    #[test]
    fn events_pushed_after_existing_ones() {
        let mut dec = Decoder::new(BIG);
        let mut out = vec![ev("x", "y", None)];
        dec.feed(b"data: z\n\n", &mut out).unwrap();
        assert_eq!(out, vec![ev("x", "y", None), ev("", "z", None)]);
    }

    // ---- reference model and property tests ----

    use crate::sse::model::decode_whole as reference;

    type Outcome = (
        Vec<SseEvent>,
        Result<(), DecodeError>,
        Option<String>,
        Option<u64>,
    );

    fn outcome(limit: usize, chunks: &[&[u8]]) -> Outcome {
        let (events, result, dec) = run(limit, chunks);
        let id = dec.last_event_id().map(str::to_owned);
        (events, result, id, dec.retry())
    }

    fn fragment() -> impl Strategy<Value = Vec<u8>> {
        let fixed: Vec<&'static [u8]> = vec![
            b"data: x",
            b"data:",
            b"data",
            b"data: ",
            b"dat",
            b"a: y",
            b"event: e",
            b"event",
            b"id: 1",
            b"id: 22",
            b"id",
            b"id:",
            b"id: a\0b",
            b"retry: 100",
            b"retry: 1a",
            b"retry:",
            b"retry: 99999999999999999999999",
            b": comment",
            b":",
            b" ",
            b"\r",
            b"\n",
            b"\r\n",
            b"\n\n",
            b"\r\r",
            b"\xEF\xBB\xBF",
            b"\xEF\xBB",
            b"\xEF",
            b"\0",
            b"\xFF",
            b"\xE2\x82",
            "é€😀".as_bytes(),
        ];
        prop_oneof![
            4 => proptest::sample::select(fixed).prop_map(<[u8]>::to_vec),
            1 => proptest::collection::vec(any::<u8>(), 0..6),
        ]
    }

    fn stream() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(fragment(), 0..40).prop_map(|f| f.concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// With no effective limit, the decoder agrees with the reference model.
        #[test]
        fn matches_reference(input in stream()) {
            let (events, result, id, retry) = outcome(usize::MAX, &[&input]);
            prop_assert_eq!(result, Ok(()));
            let (ref_events, ref_id, ref_retry) = reference(&input);
            prop_assert_eq!(events, ref_events);
            prop_assert_eq!(id, ref_id);
            prop_assert_eq!(retry, ref_retry);
        }

        /// Splitting the stream anywhere changes nothing: events, errors, id and retry.
        #[test]
        fn split_invariant(
            input in stream(),
            limit in prop_oneof![Just(usize::MAX), 0usize..64],
            cuts in proptest::collection::vec(any::<proptest::sample::Index>(), 0..8),
        ) {
            let whole = outcome(limit, &[&input]);
            for at in 0..=input.len() {
                let (a, b) = input.split_at(at);
                prop_assert_eq!(&outcome(limit, &[a, b]), &whole, "split at {}", at);
            }
            let bytes: Vec<&[u8]> = input.chunks(1).collect();
            prop_assert_eq!(&outcome(limit, &bytes), &whole, "byte at a time");
            let mut points: Vec<usize> = cuts.iter().map(|i| i.index(input.len() + 1)).collect();
            points.sort_unstable();
            let mut chunks = Vec::new();
            let mut prev = 0;
            for p in points {
                chunks.push(&input[prev..p]);
                prev = p;
            }
            chunks.push(&input[prev..]);
            prop_assert_eq!(&outcome(limit, &chunks), &whole, "cuts {:?}", chunks);
        }
    }
}
