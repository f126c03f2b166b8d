//! The thread notification's wire format (pure: no I/O).
//!
//! Every write script publishes one message on its thread's channel, in the same atomic step:
//! `rid|status|first|last|n|` followed by `n` events, each `<len>:<bytes>`, numbered
//! `first..first+n-1`. `n` is 0 when the batch's payloads exceed 64 KiB (a reader then reads
//! the log), and for messages that only announce a state (`evicted`, `forgotten`). Payloads are
//! opaque bytes: nothing here looks inside them.

use bytes::Bytes;

use crate::event::Event;

/// One decoded notification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    /// The run (empty for a thread-level message).
    pub run: String,
    /// `in_progress`, a terminal status, `evicted` or `forgotten`.
    pub status: String,
    /// The run's last seq after the write.
    pub last: u64,
    /// The events the write added, when they were carried (contiguous, ending at `last`).
    pub events: Vec<Event>,
}

/// Encode a notification as the scripts do (for tests and benchmarks).
pub fn encode(run: &str, status: &str, first: u64, last: u64, events: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("{run}|{status}|{first}|{last}|{}|", events.len()).into_bytes();
    for e in events {
        out.extend_from_slice(e.len().to_string().as_bytes());
        out.push(b':');
        out.extend_from_slice(e);
    }
    out
}

/// Decode a notification; `None` for anything malformed (a reader then reads the log).
pub fn decode(msg: &Bytes) -> Option<Note> {
    let mut at = 0;
    let mut field = || -> Option<&[u8]> {
        let rest = msg.get(at..)?;
        let end = memchr::memchr(b'|', rest)?;
        at += end + 1;
        Some(&rest[..end])
    };
    let run = std::str::from_utf8(field()?).ok()?.to_owned();
    let status = std::str::from_utf8(field()?).ok()?.to_owned();
    let first = number(field()?)?;
    let last = number(field()?)?;
    let n = number(field()?)?;
    let mut events = Vec::with_capacity(n.min(1024) as usize);
    for i in 0..n {
        let rest = msg.get(at..)?;
        let colon = memchr::memchr(b':', rest)?;
        let len = number(&rest[..colon])? as usize;
        let start = at + colon + 1;
        let end = start.checked_add(len)?;
        if end > msg.len() {
            return None;
        }
        events.push(Event {
            seq: first.checked_add(i)?,
            data: msg.slice(start..end),
        });
        at = end;
    }
    if at != msg.len() || events.last().is_some_and(|e| e.seq != last) {
        return None;
    }
    Some(Note {
        run,
        status,
        last,
        events,
    })
}

fn number(b: &[u8]) -> Option<u64> {
    if b.is_empty() || b.len() > 20 {
        return None;
    }
    std::str::from_utf8(b).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_batch_round_trips() {
        let msg = Bytes::from(encode(
            "run_1",
            "in_progress",
            4,
            5,
            &[b"{\"a\":1}", b"x|y:z"],
        ));
        let note = decode(&msg).unwrap();
        assert_eq!(note.run, "run_1");
        assert_eq!(note.last, 5);
        assert_eq!(note.events[0].seq, 4);
        assert_eq!(&note.events[1].data[..], b"x|y:z");
    }

    #[test]
    fn a_state_only_message_carries_no_event() {
        let note = decode(&Bytes::from(encode("r", "evicted", 0, 9, &[]))).unwrap();
        assert_eq!((note.status.as_str(), note.last), ("evicted", 9));
        assert!(note.events.is_empty());
    }

    proptest! {
        #[test]
        fn encode_then_decode_is_the_identity(
            first in 1u64..1_000_000,
            payloads in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..40), 0..8),
        ) {
            let refs: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
            let last = first + payloads.len() as u64 - 1;
            let msg = Bytes::from(encode("run_x", "completed", first, last, &refs));
            let note = decode(&msg).unwrap();
            prop_assert_eq!(note.events.len(), payloads.len());
            for (i, (e, p)) in note.events.iter().zip(&payloads).enumerate() {
                prop_assert_eq!(e.seq, first + i as u64);
                prop_assert_eq!(&e.data[..], &p[..]);
            }
        }

        #[test]
        fn any_bytes_decode_or_are_refused_without_panic(raw in prop::collection::vec(any::<u8>(), 0..80)) {
            let _ = decode(&Bytes::from(raw));
        }

        #[test]
        fn a_cut_message_is_refused(payload in prop::collection::vec(any::<u8>(), 1..40), cut in 1usize..10) {
            let msg = encode("r", "in_progress", 1, 1, &[&payload]);
            let cut = cut.min(msg.len() - 1);
            prop_assert!(decode(&Bytes::from(msg[..msg.len() - cut].to_vec())).is_none());
        }
    }
}
