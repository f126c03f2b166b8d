//! Renderers: pure functions from a run's event log to what clients read.
//!
//! - [`chunk`]: the AI SDK v5 UI-message chunks and their exact JSON;
//! - [`ui`]: the AgentFlow → UI-message state machine and its resumable SSE framing;
//! - [`fold`]: the log folded into the assistant `UIMessage` for snapshots;
//! - [`frames`]: a run's UI-message frames, rendered once and shared by every reader;
//! - [`agentflow`]: the AgentFlow client dialect (payloads as received, `id: seq`).

pub mod agentflow;
pub mod chunk;
pub mod fold;
pub mod frames;
pub mod ui;

#[cfg(test)]
pub(crate) mod proptests;

/// The frame that ends a UI-message stream (optional for clients; sent once the run is over).
pub const DONE_FRAME: &[u8] = b"data: [DONE]\n\n";

/// Append `n` in decimal (SSE ids, without a `String` per event).
pub(crate) fn put_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[i..]);
}
