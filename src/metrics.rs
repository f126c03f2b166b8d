//! Every Prometheus metric Sluice exports, defined once, with small recording helpers.
//!
//! Metrics live in the default registry of the `prometheus` crate that `pingora_prometheus`
//! re-exports (a second copy of the crate would make them vanish from `/metrics`). Names follow
//! Prometheus conventions (`sluice_` prefix, `_total` counters, `_seconds`, `_bytes`) and labels
//! only ever take values from closed sets (route names, status codes, run statuses, error
//! kinds), never ids or raw paths.
//!
//! This module depends on no other layer of the crate: the closed label sets that belong to a
//! layer (terminal run statuses, authentication failure reasons, upstream error kinds, the
//! memory budget's parts, the quotas) are
//! handed in as `&'static str` names by the server wiring through [`LabelSets`] at [`init`];
//! the layers, in turn, record into the metrics defined here.

use std::sync::LazyLock;

use pingora_prometheus::prometheus::{
    self, register_histogram_vec, register_int_counter, register_int_counter_vec,
    register_int_gauge, register_int_gauge_vec, Encoder, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, TextEncoder,
};

/// `sluice_http_requests_total{route,status}`: client API requests answered.
pub static HTTP_REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "sluice_http_requests_total",
        "Client API requests answered, by route and HTTP status.",
        &["route", "status"]
    )
    .expect("metric registers once")
});

/// `sluice_http_request_duration_seconds{route}`: time to answer (whole stream for SSE).
pub static HTTP_DURATION: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "sluice_http_request_duration_seconds",
        "Time from request to the end of the response, by route (includes whole SSE streams).",
        &["route"],
        vec![0.001, 0.005, 0.025, 0.1, 0.5, 2.5, 10.0, 60.0, 300.0]
    )
    .expect("metric registers once")
});

/// `sluice_sse_streams_active`: SSE responses currently open.
pub static SSE_STREAMS_ACTIVE: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "sluice_sse_streams_active",
        "SSE responses currently open to clients."
    )
    .expect("metric registers once")
});

/// `sluice_runs_started_total`: runs started.
pub static RUNS_STARTED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!("sluice_runs_started_total", "Agent runs started.")
        .expect("metric registers once")
});

/// `sluice_runs_ended_total{status}`: runs ended, by terminal status.
pub static RUNS_ENDED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "sluice_runs_ended_total",
        "Agent runs ended, by terminal status.",
        &["status"]
    )
    .expect("metric registers once")
});

/// `sluice_events_ingested_total`: events appended to run logs from backends.
pub static EVENTS_INGESTED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "sluice_events_ingested_total",
        "Events received from backends and appended to run logs."
    )
    .expect("metric registers once")
});

/// `sluice_events_ingested_bytes_total`: payload bytes of those events.
pub static EVENT_BYTES_INGESTED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "sluice_events_ingested_bytes_total",
        "Payload bytes of events appended to run logs."
    )
    .expect("metric registers once")
});

/// `sluice_store_bytes`: everything the memory budget counts (set at scrape time).
pub static STORE_BYTES: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "sluice_store_bytes",
        "Bytes held against limits.max_total_bytes: events with their overhead, run and thread \
         records, and the views of runs being read (sluice_held_bytes by part)."
    )
    .expect("metric registers once")
});

/// `sluice_events_rendered_total`: events rendered into shared UI-message frames (once per
/// event per instance, however many clients read it).
pub static EVENTS_RENDERED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "sluice_events_rendered_total",
        "Events rendered into shared UI-message frames."
    )
    .expect("metric registers once")
});

/// `sluice_events_folded_total`: events folded into kept snapshot messages (once per event per
/// instance, however often the run is polled).
pub static EVENTS_FOLDED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "sluice_events_folded_total",
        "Events folded into kept snapshot messages."
    )
    .expect("metric registers once")
});

/// `sluice_view_bytes`: bytes held by runs' shared frames and kept folds (as of the last
/// housekeeping pass).
pub static VIEW_BYTES: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "sluice_view_bytes",
        "Bytes held by rendered frames and kept folds of runs being read."
    )
    .expect("metric registers once")
});

/// `sluice_store_fenced_total`: writes refused because another instance took the run over.
pub static STORE_FENCED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "sluice_store_fenced_total",
        "Writes to a run refused because another instance holds its lease now (this instance \
         stopped ingesting the run)."
    )
    .expect("metric registers once")
});

/// `sluice_store_takeovers_total`: runs this instance took over from one that went away.
pub static STORE_TAKEOVERS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "sluice_store_takeovers_total",
        "Runs in progress this instance took over after their ingesting instance's lease \
         expired or was released."
    )
    .expect("metric registers once")
});

/// `sluice_redis_errors_total`: failed calls to Redis (timeouts, lost connections).
pub static REDIS_ERRORS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "sluice_redis_errors_total",
        "Calls to the shared store's Redis that failed (unreachable, timed out, connection lost)."
    )
    .expect("metric registers once")
});

/// `sluice_store_evictions_total{reason}`: finished runs evicted, by why ([`EVICTION_REASONS`]).
pub static STORE_EVICTIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "sluice_store_evictions_total",
        "Finished runs evicted: retention passed, memory pressure (over_share: their \
         organisation held more than an equal share; pressure: oldest first), or their \
         organisation at its bytes quota starting a run (org_quota).",
        &["reason"]
    )
    .expect("metric registers once")
});

/// `sluice_held_bytes{part}`: what the memory budget counts, by part.
pub static HELD_BYTES: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "sluice_held_bytes",
        "Bytes held against limits.max_total_bytes, by part (events, runs, threads, views); \
         their sum is sluice_store_bytes.",
        &["part"]
    )
    .expect("metric registers once")
});

/// `sluice_quota_refusals_total{reason}`: requests refused with 429 because their
/// organisation was at a quota (never labelled by organisation).
pub static QUOTA_REFUSALS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "sluice_quota_refusals_total",
        "Requests refused with 429 quota_exceeded, by the quota their organisation was at.",
        &["reason"]
    )
    .expect("metric registers once")
});

/// `sluice_request_body_bytes`: request body bytes held (`limits.max_body_bytes_in_flight`).
pub static REQUEST_BODY_BYTES: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "sluice_request_body_bytes",
        "Request body bytes held now: being read, or read and not yet handled."
    )
    .expect("metric registers once")
});

/// `sluice_client_connections`: client connections open on the API listener.
pub static CLIENT_CONNECTIONS: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "sluice_client_connections",
        "Client connections open on the API listener."
    )
    .expect("metric registers once")
});

/// `sluice_connections_refused_total`: client connections refused at `server.max_connections`.
pub static CONNECTIONS_REFUSED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "sluice_connections_refused_total",
        "Client connections answered 503 and closed because server.max_connections were open."
    )
    .expect("metric registers once")
});

/// `sluice_upstream_errors_total{kind}`: backend failures, by kind.
pub static UPSTREAM_ERRORS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "sluice_upstream_errors_total",
        "Backend failures that ended a run, by kind.",
        &["kind"]
    )
    .expect("metric registers once")
});

/// `sluice_upstream_polls_total{outcome}`: snapshot polls of a poll-only backend, by outcome:
/// `changed` (the run moved on), `unchanged`, `throttled` (`429`/`503`), `failed`.
pub static UPSTREAM_POLLS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "sluice_upstream_polls_total",
        "Snapshot polls of a poll-only backend, by outcome (changed, unchanged, throttled, failed).",
        &["outcome"]
    )
    .expect("metric registers once")
});

/// `sluice_auth_failures_total{reason}`: requests refused by authentication, by reason.
pub static AUTH_FAILURES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "sluice_auth_failures_total",
        "Requests refused by authentication, by reason.",
        &["reason"]
    )
    .expect("metric registers once")
});

/// `sluice_long_polls_waiting`: `getConversation` requests currently waiting (`wait=`).
pub static LONG_POLLS_WAITING: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "sluice_long_polls_waiting",
        "getConversation long-polls currently waiting for a change."
    )
    .expect("metric registers once")
});

/// `sluice_runs_stopped_total`: runs stopped by a client.
pub static RUNS_STOPPED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "sluice_runs_stopped_total",
        "Runs stopped by a client request."
    )
    .expect("metric registers once")
});

/// `sluice_idempotent_reattaches_total`: retries that re-attached to an existing run.
pub static IDEMPOTENT_REATTACHES: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "sluice_idempotent_reattaches_total",
        "Invokes that carried a known message id and re-attached to its run."
    )
    .expect("metric registers once")
});

/// `sluice_resumes_total{outcome}`: resume requests: `replayed` (events were missed), `live`
/// (nothing missed), `gone` (nothing to resume: 204).
pub static RESUMES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "sluice_resumes_total",
        "Stream resume requests, by outcome (replayed, live, gone).",
        &["outcome"]
    )
    .expect("metric registers once")
});

/// `sluice_events_replayed_total`: events re-sent to resuming clients from the log.
pub static EVENTS_REPLAYED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "sluice_events_replayed_total",
        "Log events replayed to resuming clients."
    )
    .expect("metric registers once")
});

/// `sluice_stuck_readers_total`: streams cut because the client stopped reading.
pub static STUCK_READERS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "sluice_stuck_readers_total",
        "SSE streams cut because the client took no data for stream.stuck_reader_timeout."
    )
    .expect("metric registers once")
});

/// Reasons of `sluice_store_evictions_total{reason}`.
pub const EVICTION_REASONS: [&str; 4] = ["retention", "pressure", "over_share", "org_quota"];

/// Outcomes of `sluice_resumes_total{outcome}`.
const RESUME_OUTCOMES: [&str; 3] = ["replayed", "live", "gone"];

/// Outcomes of `sluice_upstream_polls_total{outcome}`.
const POLL_OUTCOMES: [&str; 4] = ["changed", "unchanged", "throttled", "failed"];

/// The closed label sets owned by other layers, handed in by the wiring so that this module
/// imports none of them. Every value is pre-registered by [`init`].
pub struct LabelSets<'a> {
    /// Terminal run statuses (wire names): `sluice_runs_ended_total{status}`.
    pub run_statuses: &'a [&'static str],
    /// Authentication failure reasons: `sluice_auth_failures_total{reason}`.
    pub auth_failures: &'a [&'static str],
    /// Backend failure kinds: `sluice_upstream_errors_total{kind}`.
    pub upstream_errors: &'a [&'static str],
    /// Parts of the memory budget: `sluice_held_bytes{part}`.
    pub held_parts: &'a [&'static str],
    /// Quotas: `sluice_quota_refusals_total{reason}`.
    pub quotas: &'a [&'static str],
}

/// Touch every metric so that each appears on `/metrics` from the start (with zeroes), including
/// one series per value of each closed label set in `labels`.
pub fn init(labels: &LabelSets<'_>) {
    LazyLock::force(&HTTP_REQUESTS);
    LazyLock::force(&HTTP_DURATION);
    LazyLock::force(&SSE_STREAMS_ACTIVE);
    LazyLock::force(&RUNS_STARTED);
    for status in labels.run_statuses {
        RUNS_ENDED.with_label_values(&[status]);
    }
    LazyLock::force(&EVENTS_INGESTED);
    LazyLock::force(&EVENT_BYTES_INGESTED);
    LazyLock::force(&STORE_BYTES);
    LazyLock::force(&STORE_FENCED);
    LazyLock::force(&STORE_TAKEOVERS);
    LazyLock::force(&REDIS_ERRORS);
    for reason in EVICTION_REASONS {
        STORE_EVICTIONS.with_label_values(&[reason]);
    }
    for part in labels.held_parts {
        HELD_BYTES.with_label_values(&[part]);
    }
    for reason in labels.quotas {
        QUOTA_REFUSALS.with_label_values(&[reason]);
    }
    LazyLock::force(&CLIENT_CONNECTIONS);
    LazyLock::force(&REQUEST_BODY_BYTES);
    LazyLock::force(&CONNECTIONS_REFUSED);
    LazyLock::force(&VIEW_BYTES);
    LazyLock::force(&EVENTS_RENDERED);
    LazyLock::force(&EVENTS_FOLDED);
    LazyLock::force(&LONG_POLLS_WAITING);
    LazyLock::force(&RUNS_STOPPED);
    LazyLock::force(&IDEMPOTENT_REATTACHES);
    for outcome in RESUME_OUTCOMES {
        RESUMES.with_label_values(&[outcome]);
    }
    LazyLock::force(&EVENTS_REPLAYED);
    LazyLock::force(&STUCK_READERS);
    for reason in labels.auth_failures {
        AUTH_FAILURES.with_label_values(&[reason]);
    }
    for kind in labels.upstream_errors {
        UPSTREAM_ERRORS.with_label_values(&[kind]);
    }
    for outcome in POLL_OUTCOMES {
        UPSTREAM_POLLS.with_label_values(&[outcome]);
    }
}

/// The registry in Prometheus text format.
pub fn render() -> Vec<u8> {
    let mut out = Vec::new();
    // Encoding into a Vec cannot fail for well-formed metric families.
    let _ = TextEncoder::new().encode(&prometheus::gather(), &mut out);
    out
}

/// Holds a gauge one higher for as long as it lives.
pub struct Gauged(&'static IntGauge);

impl Gauged {
    /// Increment `gauge` until the guard drops.
    pub fn new(gauge: &'static LazyLock<IntGauge>) -> Self {
        let gauge: &'static IntGauge = gauge;
        gauge.inc();
        Gauged(gauge)
    }
}

impl Drop for Gauged {
    fn drop(&mut self) {
        self.0.dec();
    }
}
