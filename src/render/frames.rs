//! Render once: a run's UI-message SSE frames, rendered once as events arrive and shared by
//! every reader of the run as `Bytes` slices (live readers, resumes from any `k` or `k.j`,
//! replays).
//!
//! [`UiFrames`] feeds each event through one [`UiRenderer`] (whose state then never has to be
//! rebuilt from seq 1) and keeps the frames in segments: each [`UiFrames::extend`] call writes
//! its events' frames into one contiguous `Bytes` with the end offset of every event, so a
//! reader at any position gets a zero-copy slice. A `k.j` cursor is found inside event `k`'s
//! frames by counting frame ends (`\n\n`, which a frame's single-line JSON never contains).
//! Pure: no I/O, no clocks.

use bytes::{Bytes, BytesMut};

use super::ui::{Cursor, UiRenderer};
use crate::event::Event;

/// Smallest block the frame buffer grows by: frames of small batches share one allocation.
const MIN_BLOCK: usize = 4096;

/// One `extend`'s frames.
#[derive(Debug)]
struct Segment {
    /// Seq of its first event.
    first_seq: u64,
    /// The frames of its events, back to back.
    bytes: Bytes,
    /// End offset (in `bytes`) of each event's frames; an event that renders nothing ends
    /// where the previous one did.
    ends: Vec<u32>,
}

impl Segment {
    fn last_seq(&self) -> u64 {
        self.first_seq + self.ends.len() as u64 - 1
    }

    /// Byte range of event `seq`'s frames.
    fn span(&self, seq: u64) -> (usize, usize) {
        let i = (seq - self.first_seq) as usize;
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        (start, self.ends[i] as usize)
    }
}

/// A run's UI-message frames, rendered once.
#[derive(Debug)]
pub struct UiFrames {
    renderer: UiRenderer,
    segments: Vec<Segment>,
    /// Seq before the run's first event.
    base: u64,
    /// Seq of the last event rendered (`base` before the first).
    last_seq: u64,
    /// Where frames are written before a segment is cut off.
    buf: BytesMut,
    scratch: Vec<u8>,
    /// Frame bytes held (segments' data and offsets).
    held: usize,
}

impl UiFrames {
    /// Frames of the run whose assistant message is `message_id` and whose first event has
    /// seq `first_seq`.
    pub fn new(message_id: String, first_seq: u64) -> UiFrames {
        let base = first_seq.saturating_sub(1);
        UiFrames {
            renderer: UiRenderer::new(message_id),
            segments: Vec::new(),
            base,
            last_seq: base,
            buf: BytesMut::new(),
            scratch: Vec::new(),
            held: 0,
        }
    }

    /// Seq of the last event rendered (the run's first seq − 1 before any).
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Bytes held by the frames (for memory accounting).
    pub fn bytes_held(&self) -> usize {
        self.held + self.buf.capacity()
    }

    /// Whether the renderer has seen the run's end (later events render to nothing).
    pub fn is_finished(&self) -> bool {
        self.renderer.is_finished()
    }

    /// Render the events after [`last_seq`](Self::last_seq) of `events` (in order, from the
    /// run's log). Events already rendered are skipped; a gap stops the rendering there.
    pub fn extend(&mut self, events: &[Event]) {
        let first_seq = self.last_seq + 1;
        let mut ends = Vec::new();
        for ev in events.iter().skip_while(|e| e.seq < first_seq) {
            if ev.seq != self.last_seq + 1 {
                debug_assert!(false, "events must be contiguous");
                break;
            }
            self.renderer.render_sse(ev, &mut self.scratch);
            if self.buf.capacity() - self.buf.len() < self.scratch.len() {
                // A fresh block (the frames written so far in the old one stay valid).
                let block = self.scratch.len().max(MIN_BLOCK.min(self.held.max(256)));
                let written = self.buf.len();
                self.buf.reserve(block.max(written));
            }
            self.buf.extend_from_slice(&self.scratch);
            self.scratch.clear();
            ends.push(self.buf.len() as u32);
            self.last_seq = ev.seq;
        }
        if ends.is_empty() {
            return;
        }
        let bytes = self.buf.split().freeze();
        self.held += bytes.len() + ends.len() * 4 + std::mem::size_of::<Segment>();
        self.segments.push(Segment {
            first_seq,
            bytes,
            ends,
        });
        if self.renderer.is_finished() {
            // Nothing more will be written: give back the rest of the block.
            self.buf = BytesMut::new();
        }
    }

    /// Index of the segment holding event `seq` (which must have been rendered).
    fn segment_of(&self, seq: u64) -> usize {
        self.segments.partition_point(|s| s.last_seq() < seq)
    }

    /// Frames after `cursor`, up to about `max_bytes` (always whole events, and at least one
    /// event when any follows), appended to `out`. Returns the seq of the last event whose
    /// frames were given (the reader's new position), or `None` when nothing rendered follows
    /// the cursor. Events before the run's first are not in the run: a cursor before it reads
    /// from the start.
    pub fn read(&self, cursor: Cursor, max_bytes: usize, out: &mut Vec<Bytes>) -> Option<u64> {
        let (mut seq, skip) = if cursor.seq <= self.base {
            (self.base + 1, 0)
        } else if let Some(j) = cursor.chunk {
            (cursor.seq, j)
        } else {
            (cursor.seq + 1, 0)
        };
        if seq > self.last_seq {
            return None;
        }
        let mut taken = 0usize;
        let mut through = None;
        let mut i = self.segment_of(seq);
        while i < self.segments.len() && (through.is_none() || taken < max_bytes) {
            let seg = &self.segments[i];
            let (mut start, _) = seg.span(seq);
            if skip > 0 && through.is_none() {
                start = skip_frames(&seg.bytes, start, seg.span(seq).1, skip);
            }
            // Whole events of this segment, until the byte budget is spent.
            let mut last = seq;
            loop {
                let (_, end) = seg.span(last);
                if last == seg.last_seq() || end - start >= max_bytes.saturating_sub(taken) {
                    break;
                }
                last += 1;
            }
            let (_, end) = seg.span(last);
            if end > start {
                out.push(seg.bytes.slice(start..end));
            }
            taken += end - start;
            through = Some(last);
            seq = last + 1;
            i += 1;
        }
        through
    }
}

/// Offset just after the `n`-th frame that starts at `start` in `bytes[..end]` (or `end`).
fn skip_frames(bytes: &[u8], start: usize, end: usize, n: u32) -> usize {
    let mut at = start;
    for _ in 0..n {
        match memchr::memmem::find(&bytes[at..end], b"\n\n") {
            Some(i) => at += i + 2,
            None => return end,
        }
    }
    at
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::proptests::run;
    use proptest::prelude::*;

    /// What the renderer writes for a client at `cursor`, fed the whole run (the reference).
    fn reference(id: &str, events: &[Event], cursor: Cursor) -> Vec<u8> {
        let mut r = UiRenderer::new(id.to_owned());
        let mut out = Vec::new();
        for ev in events {
            r.render_sse_after(ev, cursor, &mut out);
        }
        out
    }

    /// Everything `frames` gives a reader at `cursor`, reading `max` bytes at a time.
    fn drain(frames: &UiFrames, mut cursor: Cursor, max: usize) -> Vec<u8> {
        let mut got = Vec::new();
        loop {
            let mut out = Vec::new();
            match frames.read(cursor, max, &mut out) {
                Some(through) => {
                    assert!(through >= cursor.seq, "a read never goes back");
                    for b in out {
                        got.extend_from_slice(&b);
                    }
                    cursor = Cursor::after(through);
                }
                None => return got,
            }
        }
    }

    /// Every cursor a client of this run can hold: `k` and `k.j` for each of its events.
    fn cursors(id: &str, events: &[Event]) -> Vec<Cursor> {
        let mut r = UiRenderer::new(id.to_owned());
        let mut all = vec![Cursor::after(0)];
        for ev in events {
            let mut chunks = Vec::new();
            r.render(ev, &mut chunks);
            for j in 1..chunks.len() {
                all.push(Cursor {
                    seq: ev.seq,
                    chunk: Some(j as u32),
                });
            }
            all.push(Cursor::after(ev.seq));
        }
        all
    }

    proptest! {
        /// However the run's events arrive (in batches of any size) and however much a reader
        /// takes at a time, a reader at any cursor gets exactly what a renderer fed the whole
        /// run from seq 1 would have written for it.
        #[test]
        fn shared_frames_equal_rendering_from_the_start(
            events in run(),
            splits in proptest::collection::vec(1usize..8, 1..40),
            max in prop_oneof![Just(1usize), 1usize..400, Just(usize::MAX)],
        ) {
            let mut frames = UiFrames::new("msg-1".into(), 1);
            let mut at = 0;
            for n in splits.iter().cycle() {
                if at >= events.len() { break; }
                let end = (at + n).min(events.len());
                // Overlapping batches (a reader that read before another rendered) are fine.
                frames.extend(&events[at.saturating_sub(1)..end]);
                at = end;
            }
            prop_assert_eq!(frames.last_seq(), events.len() as u64);
            for c in cursors("msg-1", &events) {
                prop_assert_eq!(
                    String::from_utf8(drain(&frames, c, max)).unwrap(),
                    String::from_utf8(reference("msg-1", &events, c)).unwrap(),
                    "cursor {}", c
                );
            }
        }
    }

    #[test]
    fn a_run_later_in_the_thread_reads_from_its_own_first_event() {
        let evs: Vec<Event> = (11..=13)
            .map(|s| Event {
                seq: s,
                data: Bytes::from_static(br#"{"type":"delta","content":"x"}"#),
            })
            .collect();
        let mut frames = UiFrames::new("m".into(), 11);
        assert_eq!(
            frames.read(Cursor::after(0), usize::MAX, &mut Vec::new()),
            None
        );
        frames.extend(&evs);
        let mut out = Vec::new();
        assert_eq!(
            frames.read(Cursor::after(7), usize::MAX, &mut out),
            Some(13)
        );
        let text: Vec<u8> = out.concat();
        let text = String::from_utf8(text).unwrap();
        assert!(
            text.starts_with("id: 11.1\ndata: {\"type\":\"start\""),
            "{text}"
        );
        assert_eq!(frames.read(Cursor::after(13), usize::MAX, &mut out), None);
    }
}
