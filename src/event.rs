//! The unit of a run's log: one event, numbered by the gateway.
//!
//! Every adapter (ingest) turns what its backend sends into events whose payload is an
//! AgentFlow-style JSON object (`{type, call_id, parent_call_id, content, metadata, ...}`),
//! kept byte for byte as received. The store numbers them with a gapless `seq` starting at 1;
//! renderers read them back. Nothing here does I/O.

use bytes::Bytes;

/// An event as an adapter hands it to the store (not yet numbered).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewEvent {
    /// The payload: one JSON object, as received from the backend (or built by the gateway
    /// for the events it synthesises, such as a timeout).
    pub data: Bytes,
}

/// An event in a run's log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// Position in the run's log: 1, 2, 3, ... with no gaps. This is the SSE `id` clients see.
    pub seq: u64,
    /// The payload, as in [`NewEvent::data`].
    pub data: Bytes,
}

impl NewEvent {
    /// Wrap a payload.
    pub fn new(data: impl Into<Bytes>) -> Self {
        NewEvent { data: data.into() }
    }

    /// Number this event.
    pub fn at(self, seq: u64) -> Event {
        Event {
            seq,
            data: self.data,
        }
    }
}
