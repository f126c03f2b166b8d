//! # Sluice
//!
//! A gateway in front of an LLM agent backend that makes every run durable in a seq-keyed event
//! log, so clients can stream it (and resume), or take `202 Accepted` and poll snapshots.
//!
//! ## Layout
//!
//! The data flows ingest → store → render → api:
//!
//! - [`ingest`]: upstream adapters; background tasks that own backend connections and append
//!   events to run logs: AgentFlow SSE, the AI SDK UI-message stream, or a poll-only backend,
//!   chosen per upstream and per agent.
//! - [`store`]: threads, runs, and the append-only per-run log with a gapless `seq`; the
//!   [`store::Store`] trait and the embedded [`store::memory::MemoryStore`].
//! - [`render`]: pure renderers over the log: the AI SDK v5 UI-message stream, the AgentFlow
//!   dialect, and the snapshot fold into `UIMessage`s (`docs/transcoding.md` maps them).
//! - [`api`]: the client routes (dialect A), written against the [`api::Exchange`] trait.
//!
//! Beside them: [`event`] (the log's unit), [`agentflow`] (the AgentFlow event model), [`sse`]
//! (sans-io SSE codec), [`config`], [`metrics`], [`server`] (Pingora wiring and the only code
//! that touches Pingora's request/response API), [`mock`] (the simulated backend), [`cli`] and
//! [`demo`].

pub mod agentflow;
pub mod api;
pub mod auth;
pub mod cli;
pub mod client;
pub mod config;
pub mod demo;
pub mod event;
pub mod ingest;
pub mod metrics;
pub mod mock;
pub mod render;
pub mod server;
pub mod sse;
pub mod store;
