//! Reading a backend's answer to a run request, shared by the adapters: the status line (a
//! non-2xx answer becomes the run's refusal, with the backend's error text), and an SSE body
//! decoded in batches, each read bounded by `upstream.idle_timeout` and each event by
//! `upstream.max_event_bytes`, appended to the run batch by batch ([`SseBody::pump`]), each
//! batch marked, if asked ([`SseBody::marked`]), with the SSE id of its last backend event.

use std::time::Duration;

use pingora::protocols::http::client::HttpSession;

use super::{Admission, Ending, Failure, RunSink};
use crate::client;
use crate::event::NewEvent;
use crate::sse::{Decoder, SseEvent};
use crate::store::clip_error;

/// Most bytes of a non-2xx answer kept as its error text.
pub const ERROR_BODY_LIMIT: usize = 64 * 1024;

/// Read the answer's status line and tell the run's starter (`sink.admit`). A non-2xx answer is
/// the run's failure, with the backend's error text.
pub async fn admit(http: &mut HttpSession, idle: Duration, sink: &RunSink) -> Result<(), Failure> {
    match tokio::time::timeout(idle, http.read_response_header()).await {
        Err(_) => return Err(Failure::IdleTimeout(idle)),
        Ok(Err(e)) => return Err(Failure::Dropped(e.to_string().trim().to_string())),
        Ok(Ok(())) => {}
    }
    let status = http.response_header().map_or(0, |h| h.status.as_u16());
    if !(200..300).contains(&status) {
        let body = client::read_body(http, ERROR_BODY_LIMIT, idle)
            .await
            .unwrap_or_default();
        let text = error_text(&body);
        sink.admit(Admission::Refused(status, text.clone()));
        return Err(Failure::Status(status, text));
    }
    sink.admit(Admission::Accepted);
    Ok(())
}

/// The message of an error body: a JSON error's message (`{"error":{"message"}}`,
/// `{"error":"…"}`, `{"message":"…"}`, `{"detail":"…"}`), or the start of the text; at most
/// about 500 bytes, control characters escaped ([`clip_error`]).
pub fn error_text(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
        let pick = v
            .pointer("/error/message")
            .or_else(|| v.get("error"))
            .or_else(|| v.get("message"))
            .or_else(|| v.get("detail"));
        if let Some(serde_json::Value::String(s)) = pick {
            return clip_error(s);
        }
    }
    clip_error(&text)
}

/// An SSE answer body, read in batches.
pub struct SseBody {
    decoder: Decoder,
    idle: Duration,
    max_event_bytes: usize,
    /// Fires `idle` after the last read at the earliest: armed once per idle period rather
    /// than once per read, and moved on when it finds that a read happened since.
    timer: std::pin::Pin<Box<tokio::time::Sleep>>,
    last_read: tokio::time::Instant,
    /// Whether each batch is appended with its mark (see [`SseBody::marked`]).
    marks: bool,
}

impl SseBody {
    /// A reader with these limits.
    pub fn new(idle: Duration, max_event_bytes: usize) -> SseBody {
        SseBody {
            decoder: Decoder::new(max_event_bytes),
            idle,
            max_event_bytes,
            timer: Box::pin(tokio::time::sleep(idle)),
            last_read: tokio::time::Instant::now(),
            marks: false,
        }
    }

    /// Append each batch with a mark ([`RunSink::append_marked`]): the SSE id (the last-event-ID
    /// buffer) of the last backend event that added to the batch, for a takeover to resume
    /// from with `Last-Event-ID`. Batches of a backend that sends no ids have none.
    pub fn marked(mut self) -> SseBody {
        self.marks = true;
        self
    }

    /// Read the next piece of the body and append the events it completes to `out` (maybe
    /// none). Returns how the body cannot go on, if it cannot: the events already in `out` are
    /// still to be kept (they came before the problem).
    pub async fn next(
        &mut self,
        http: &mut HttpSession,
        out: &mut Vec<SseEvent>,
    ) -> Option<Failure> {
        let read = loop {
            tokio::select! {
                biased;
                read = http.read_response_body() => break read,
                _ = self.timer.as_mut() => {
                    let due = self.last_read + self.idle;
                    if due <= tokio::time::Instant::now() {
                        return Some(Failure::IdleTimeout(self.idle));
                    }
                    // Nothing was read yet, so the cancelled read consumed nothing.
                    self.timer.as_mut().reset(due);
                }
            }
        };
        self.last_read = tokio::time::Instant::now();
        let chunk = match read {
            Err(e) => return Some(Failure::Dropped(e.to_string().trim().to_string())),
            Ok(None) => {
                self.decoder.finish();
                return Some(Failure::Dropped(
                    "the stream closed without the run's end event".into(),
                ));
            }
            Ok(Some(chunk)) => chunk,
        };
        match self.decoder.feed(&chunk, out) {
            Ok(()) => None,
            Err(_) => Some(Failure::EventTooLarge(self.max_event_bytes)),
        }
    }
}

impl SseBody {
    /// Read the whole body: each SSE event goes to `on_event`, which appends the log events it
    /// makes to the batch (it may take the event's `data`) and says whether the run ended there
    /// (or that the event is malformed). Each piece's batch is appended to the run before the
    /// next read, marked if [`SseBody::marked`]; the events before a malformed one are kept.
    /// Returns how the run ended.
    pub async fn pump<F>(
        mut self,
        http: &mut HttpSession,
        sink: &RunSink,
        mut on_event: F,
    ) -> Result<Ending, Failure>
    where
        F: FnMut(&mut SseEvent, &mut Vec<NewEvent>) -> Result<Option<Ending>, Failure> + Send,
    {
        let mut decoded: Vec<SseEvent> = Vec::new();
        loop {
            decoded.clear();
            let problem = self.next(http, &mut decoded).await;
            let mut batch = Vec::with_capacity(decoded.len());
            let mut mark = None;
            let mut ending = None;
            for mut ev in decoded.drain(..) {
                let held = batch.len();
                let result = on_event(&mut ev, &mut batch);
                if self.marks && batch.len() > held && ev.id.is_some() {
                    mark = ev.id;
                }
                match result {
                    Ok(None) => {}
                    Ok(Some(end)) => {
                        ending = Some(end);
                        break;
                    }
                    Err(failure) => {
                        if let Err(end) = sink.append_marked(batch, mark).await {
                            return Ok(end);
                        }
                        return Err(failure);
                    }
                }
            }
            if let Err(end) = sink.append_marked(batch, mark).await {
                return Ok(end);
            }
            if let Some(end) = ending {
                return Ok(end);
            }
            if let Some(failure) = problem {
                return Err(failure);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_texts() {
        assert_eq!(error_text(br#"{"error":{"message":"m"}}"#), "m");
        assert_eq!(error_text(br#"{"error":"e"}"#), "e");
        assert_eq!(error_text(br#"{"message":"x"}"#), "x");
        assert_eq!(error_text(br#"{"detail":"d"}"#), "d");
        assert_eq!(error_text(b"  plain text \n"), "plain text");
        // At most about 500 bytes (a cut is marked), control characters escaped.
        let long = error_text(&[b'a'; 900]);
        assert!(long.len() <= 503 && long.ends_with('…'), "{long}");
        let json = format!(
            r#"{{"error":{{"message":"{}\nforged log line"}}}}"#,
            "b".repeat(70_000)
        );
        let text = error_text(json.as_bytes());
        assert!(text.len() <= 503 && !text.contains('\n'));
        assert_eq!(error_text(br#"{"detail":"a\nb"}"#), "a\\u{a}b");
    }
}
