//! The AgentFlow client dialect: each log event as one SSE event whose `data` is the payload as
//! the backend sent it, with the gateway's `seq` as its `id`. With `verbose = false` the events
//! of nested calls (tools, sub-agents) are left out; their seqs are simply skipped, so
//! `Last-Event-ID` resumes exactly either way.

use memchr::memchr2;

use super::put_u64;
use crate::agentflow;
use crate::event::Event;
use crate::sse;

/// Renders log events in the AgentFlow dialect.
#[derive(Clone, Copy, Debug)]
pub struct AgentFlowRenderer {
    /// Include nested calls' events.
    pub verbose: bool,
}

impl AgentFlowRenderer {
    /// Whether `ev` is shown to this client (only its identifying fields are read).
    pub fn shows(&self, ev: &Event) -> bool {
        self.verbose || agentflow::head(&ev.data).map_or(true, |h| h.is_root())
    }

    /// Append `ev` as an SSE event (`id: seq`, `data: payload`), or nothing when hidden.
    ///
    /// A single-line UTF-8 payload (the usual case: compact JSON) is copied through as is;
    /// any other goes through [`sse::encode_event`], which splits it into `data:` lines (and
    /// replaces invalid UTF-8). Either way the bytes written are those of `encode_event`.
    pub fn render_sse(&self, ev: &Event, out: &mut Vec<u8>) {
        if !self.shows(ev) {
            return;
        }
        let data = &ev.data[..];
        if memchr2(b'\n', b'\r', data).is_none() && std::str::from_utf8(data).is_ok() {
            out.reserve(data.len() + 32);
            out.extend_from_slice(b"id: ");
            put_u64(out, ev.seq);
            out.extend_from_slice(b"\ndata: ");
            out.extend_from_slice(data);
            out.extend_from_slice(b"\n\n");
        } else {
            let id = ev.seq.to_string();
            sse::encode_event(out, Some(&id), None, &String::from_utf8_lossy(data));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sse::{Decoder, SseEvent};
    use proptest::prelude::*;

    fn ev(seq: u64, json: &str) -> Event {
        Event {
            seq,
            data: json.as_bytes().to_vec().into(),
        }
    }

    #[test]
    fn events_keep_their_payload_and_take_the_seq_as_id() {
        let r = AgentFlowRenderer { verbose: true };
        let mut out = Vec::new();
        r.render_sse(
            &ev(7, r#"{"type":"delta","content":"hi","seq":99}"#),
            &mut out,
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "id: 7\ndata: {\"type\":\"delta\",\"content\":\"hi\",\"seq\":99}\n\n"
        );
    }

    #[test]
    fn verbose_false_hides_nested_calls_only() {
        let quiet = AgentFlowRenderer { verbose: false };
        let root = ev(1, r#"{"type":"delta","call_id":"r","content":"x"}"#);
        let nested = ev(2, r#"{"type":"start","call_id":"t","parent_call_id":"r"}"#);
        let synthetic = ev(3, r#"{"type":"error","content":{"message":"m"}}"#);
        assert!(quiet.shows(&root) && !quiet.shows(&nested) && quiet.shows(&synthetic));
        assert!(AgentFlowRenderer { verbose: true }.shows(&nested));
    }

    #[test]
    fn payloads_that_need_encoding_take_the_slow_path() {
        let r = AgentFlowRenderer { verbose: true };
        for (data, want) in [
            (&b"a\r\nb"[..], "id: 3\ndata: a\ndata: b\n\n"),
            (b"a\rb", "id: 3\ndata: a\ndata: b\n\n"),
            (b"", "id: 3\ndata: \n\n"),
            (b"\xffx", "id: 3\ndata: \u{FFFD}x\n\n"),
        ] {
            let mut out = Vec::new();
            r.render_sse(
                &Event {
                    seq: 3,
                    data: data.to_vec().into(),
                },
                &mut out,
            );
            assert_eq!(String::from_utf8(out).unwrap(), want);
        }
    }

    proptest! {
        /// The fast path writes exactly what `sse::encode_event` writes, for any payload bytes.
        #[test]
        fn render_sse_is_encode_event(
            seq in any::<u64>(),
            data in prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..64),
                "[^\r\n]{0,64}".prop_map(String::into_bytes),
            ],
        ) {
            let mut got = b"prefix".to_vec();
            AgentFlowRenderer { verbose: true }
                .render_sse(&Event { seq, data: data.clone().into() }, &mut got);
            let mut want = b"prefix".to_vec();
            sse::encode_event(&mut want, Some(&seq.to_string()), None, &String::from_utf8_lossy(&data));
            prop_assert_eq!(got, want);
        }

        /// Whatever the payload text (newlines included), a client's SSE parser gets it back
        /// exactly, with the seq as its id.
        #[test]
        fn payloads_round_trip_through_sse(seq in 1u64..1_000_000, text in "[^\r]{0,200}") {
            let payload = serde_json::json!({"type": "delta", "content": text}).to_string();
            let pretty = payload.replace(",", ",\n");
            let mut out = Vec::new();
            AgentFlowRenderer { verbose: true }.render_sse(&ev(seq, &pretty), &mut out);
            let mut got = Vec::new();
            Decoder::new(1 << 20).feed(&out, &mut got).unwrap();
            let want = SseEvent { event: String::new(), data: pretty.clone(), id: Some(seq.to_string()) };
            prop_assert_eq!(got, vec![want]);
        }
    }
}
