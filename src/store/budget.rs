//! What memory the gateway holds, and who holds it: the byte [`Budget`] behind
//! `limits.max_total_bytes`, and the per-organisation [`Quotas`] (`[limits.per_org]`).
//!
//! The budget counts everything a run keeps for its retention, not only event payloads: each
//! event's payload plus its slot in the log and its share of the log's spare capacity, each run's
//! record and user message ([`RUN_OVERHEAD`], [`value_bytes`]), each thread's record, and the
//! views derived from the log on this instance (rendered frames, kept folds). The parts are kept
//! apart for `sluice_held_bytes{part}`; their sum is `sluice_store_bytes`, and it is what
//! `/readyz`, `503 store_full` and eviction go by.
//!
//! Pure bookkeeping: atomics and arithmetic, no I/O.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::Value;

/// What a run's record costs besides its texts and user message: its metadata, its log's
/// header, its change signal and its entries in the store's maps.
pub const RUN_OVERHEAD: u64 = 512;

/// What an event costs besides its payload and its slot in the log: the payload's allocation
/// and its shared-buffer header.
pub const EVENT_OVERHEAD: u64 = 48;

/// A part of what is held (a closed set: the label values of `sluice_held_bytes`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// Event payloads and their per-event overhead.
    Events,
    /// Run records and their user messages.
    Runs,
    /// Thread records.
    Threads,
    /// Rendered frames and kept folds (derived, per instance).
    Views,
}

impl Part {
    /// Every part.
    pub const ALL: [Part; 4] = [Part::Events, Part::Runs, Part::Threads, Part::Views];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Part::Events => "events",
            Part::Runs => "runs",
            Part::Threads => "threads",
            Part::Views => "views",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The byte budget: what is held in all, by part, against `max_total_bytes`.
#[derive(Debug)]
pub struct Budget {
    max_total: u64,
    total: AtomicU64,
    /// The total without the views: what the log itself holds.
    logged: AtomicU64,
    parts: [AtomicU64; 4],
}

impl Budget {
    /// An empty budget of `max_total` bytes.
    pub fn new(max_total: u64) -> Budget {
        Budget {
            max_total,
            total: AtomicU64::new(0),
            logged: AtomicU64::new(0),
            parts: Default::default(),
        }
    }

    /// The most that may be held.
    pub fn max_total(&self) -> u64 {
        self.max_total
    }

    /// New runs are refused at and above this (90 %): the rest is headroom for runs already
    /// accepted.
    pub fn high_water(&self) -> u64 {
        self.max_total / 10 * 9
    }

    /// What is held in all.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Acquire)
    }

    /// What one part holds.
    pub fn part(&self, part: Part) -> u64 {
        self.parts[part.index()].load(Ordering::Acquire)
    }

    /// What is held without the views (derived data, dropped under pressure): the bound an
    /// accepted run's appends are checked against.
    pub fn logged(&self) -> u64 {
        self.logged.load(Ordering::Acquire)
    }

    /// Count `n` more bytes held (whatever the total: for what must not be refused).
    pub fn charge(&self, part: Part, n: u64) {
        self.total.fetch_add(n, Ordering::AcqRel);
        if part != Part::Views {
            self.logged.fetch_add(n, Ordering::AcqRel);
        }
        self.parts[part.index()].fetch_add(n, Ordering::AcqRel);
    }

    /// Count `n` bytes of a logged part (not the views) only if what is logged stays within
    /// `limit`, whatever the views hold.
    pub fn try_charge_logged(&self, part: Part, n: u64, limit: u64) -> bool {
        debug_assert!(part != Part::Views);
        let ok = self
            .logged
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
                (t + n <= limit).then_some(t + n)
            })
            .is_ok();
        if ok {
            self.total.fetch_add(n, Ordering::AcqRel);
            self.parts[part.index()].fetch_add(n, Ordering::AcqRel);
        }
        ok
    }

    /// Count `n` bytes held only if the total stays within `limit`.
    pub fn try_charge(&self, part: Part, n: u64, limit: u64) -> bool {
        let ok = self
            .total
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
                (t + n <= limit).then_some(t + n)
            })
            .is_ok();
        if ok {
            if part != Part::Views {
                self.logged.fetch_add(n, Ordering::AcqRel);
            }
            self.parts[part.index()].fetch_add(n, Ordering::AcqRel);
        }
        ok
    }

    /// Count `n` bytes no longer held.
    pub fn release(&self, part: Part, n: u64) {
        self.total.fetch_sub(n, Ordering::AcqRel);
        if part != Part::Views {
            self.logged.fetch_sub(n, Ordering::AcqRel);
        }
        self.parts[part.index()].fetch_sub(n, Ordering::AcqRel);
    }

    /// Move a charge of `part` from `*held` to `now`.
    pub fn recharge(&self, part: Part, held: &mut u64, now: u64) {
        if now >= *held {
            self.charge(part, now - *held);
        } else {
            self.release(part, *held - now);
        }
        *held = now;
    }
}

/// One organisation's limits (`[limits.per_org]` or one of its overrides).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrgQuota {
    /// Most runs in progress at once.
    pub max_running_runs: u64,
    /// Most bytes its runs and threads may hold before a new run is refused (its own finished
    /// runs are evicted first to make room).
    pub max_bytes: u64,
    /// Most SSE streams open at once (on one instance).
    pub max_streams: u64,
    /// Most long-polls waiting at once (on one instance).
    pub max_long_polls: u64,
}

/// The quotas of every organisation: one default and per-organisation overrides.
#[derive(Clone, Debug)]
pub struct Quotas {
    /// The quota of organisations without an override.
    pub default: OrgQuota,
    /// Organisation id → its quota.
    pub overrides: HashMap<String, OrgQuota>,
    /// `Retry-After` sent with `429 quota_exceeded`.
    pub retry_after: Duration,
}

impl Quotas {
    /// The same quota for everybody, with no limit on anything.
    pub fn unlimited() -> Quotas {
        Quotas {
            default: OrgQuota {
                max_running_runs: u64::MAX,
                max_bytes: u64::MAX,
                max_streams: u64::MAX,
                max_long_polls: u64::MAX,
            },
            overrides: HashMap::new(),
            retry_after: Duration::from_secs(5),
        }
    }

    /// The quota of `org`.
    pub fn of(&self, org: &str) -> &OrgQuota {
        self.overrides.get(org).unwrap_or(&self.default)
    }
}

/// Which quota refused a request (a closed set: the label values of
/// `sluice_quota_refusals_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuotaKind {
    /// `max_running_runs`
    RunningRuns,
    /// `max_bytes`
    Bytes,
    /// `max_streams`
    Streams,
    /// `max_long_polls`
    LongPolls,
}

impl QuotaKind {
    /// Every kind.
    pub const ALL: [QuotaKind; 4] = [
        QuotaKind::RunningRuns,
        QuotaKind::Bytes,
        QuotaKind::Streams,
        QuotaKind::LongPolls,
    ];

    /// The label value, also the config key's stem.
    pub fn as_str(self) -> &'static str {
        match self {
            QuotaKind::RunningRuns => "running_runs",
            QuotaKind::Bytes => "bytes",
            QuotaKind::Streams => "streams",
            QuotaKind::LongPolls => "long_polls",
        }
    }
}

/// What a JSON value costs in memory, roughly: its nodes, strings, and the maps' and arrays'
/// entries (what a `serde_json::Value` tree of it allocates, within a small factor).
pub fn value_bytes(v: &Value) -> u64 {
    const NODE: u64 = std::mem::size_of::<Value>() as u64;
    // A map entry: its key's `String` and the map's own per-entry bookkeeping.
    const ENTRY: u64 = 24 + 32;
    let mut total = NODE;
    let mut stack = vec![v];
    while let Some(v) = stack.pop() {
        match v {
            Value::String(s) => total += s.len() as u64,
            Value::Array(a) => {
                total += a.len() as u64 * NODE;
                stack.extend(a.iter());
            }
            Value::Object(m) => {
                for (k, v) in m {
                    total += ENTRY + k.len() as u64 + NODE;
                    stack.push(v);
                }
            }
            _ => {}
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    #[test]
    fn parts_add_up_to_the_total_and_refusals_change_nothing() {
        let b = Budget::new(1000);
        b.charge(Part::Events, 300);
        assert!(b.try_charge(Part::Runs, 600, b.max_total()));
        assert!(!b.try_charge(Part::Views, 101, b.max_total()));
        assert_eq!(b.total(), 900);
        assert_eq!(b.part(Part::Views), 0);
        let mut held = 600;
        b.recharge(Part::Runs, &mut held, 100);
        assert_eq!((b.total(), b.part(Part::Runs), held), (400, 100, 100));
        b.release(Part::Events, 300);
        assert_eq!(b.total(), b.part(Part::Runs));
        assert_eq!(b.high_water(), 900);
        // Views count in the total, not in what is logged.
        b.charge(Part::Views, 800);
        assert_eq!((b.total(), b.logged()), (900, 100));
        assert!(!b.try_charge(Part::Runs, 200, b.max_total()));
        assert!(b.try_charge_logged(Part::Events, 200, b.max_total()));
        assert_eq!(
            (b.total(), b.logged(), b.part(Part::Events)),
            (1100, 300, 200)
        );
        assert!(!b.try_charge_logged(Part::Events, 701, b.max_total()));
    }

    #[test]
    fn a_message_costs_at_least_its_text_and_grows_with_its_structure() {
        let small = json!({"id": "m", "role": "user", "parts": [{"type": "text", "text": "hi"}]});
        let big_text = "x".repeat(100_000);
        let big = json!({"id": "m", "role": "user", "parts": [{"type": "text", "text": big_text}]});
        assert!(value_bytes(&big) >= 100_000);
        assert!(value_bytes(&big) - value_bytes(&small) >= 100_000 - 2);
        // Many small nodes cost far more than their JSON text.
        let many = Value::Array((0..1000).map(|i| json!(i)).collect());
        assert!(value_bytes(&many) >= 1000 * 16);
    }

    proptest! {
        #[test]
        fn a_value_costs_at_least_its_compact_json_minus_punctuation(
            texts in proptest::collection::vec("[a-z]{0,40}", 0..20),
        ) {
            let v = Value::Object(texts.iter().enumerate().map(|(i, t)| (format!("k{i}"), json!(t))).collect());
            let text: u64 = texts.iter().map(|t| t.len() as u64).sum();
            prop_assert!(value_bytes(&v) >= text);
        }
    }
}
