//! Server-Sent Events (`text/event-stream`) wire format, sans-io.
//!
//! This module owns the SSE codec and nothing else: an incremental [`Decoder`] that turns
//! byte chunks into [`SseEvent`]s following WHATWG HTML §9.2.5 (parsing an event stream) and
//! §9.2.6 (interpreting an event stream), with a per-event size limit, and an encoder
//! ([`encode_event`], [`encode_comment`], [`encode_retry`]) that appends well-formed frames
//! to a byte buffer. It performs no I/O and knows nothing about HTTP, async runtimes or what
//! the event payloads mean; callers feed it bytes and take bytes or events back. Beside them,
//! [`model`]: the specification's whole-stream decoding, the decoder's test oracle.

mod decode;
mod encode;
pub mod model;

pub use decode::{DecodeError, Decoder, SseEvent};
pub use encode::{encode_comment, encode_event, encode_retry};
