//! Per-organisation gates for what a request holds while it lasts on this instance: open SSE
//! streams and waiting long-polls (`limits.per_org.max_streams`, `max_long_polls`). Runs in
//! progress and bytes held are the store's to count ([`crate::store::budget`]).
//!
//! A request takes a [`Held`] slot before it starts streaming or waiting and gives it back when
//! the slot drops; an organisation at its quota gets `429 quota_exceeded` with `Retry-After`,
//! whatever the others hold.
//!
//! Beside them, [`Bodies`]: the request bodies held at once, in all organisations
//! (`limits.max_body_bytes_in_flight`), counted as they are read and until the last copy of a
//! body is dropped; a body that would pass it is refused with `503 overloaded`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::ApiError;
use crate::metrics;
use crate::store::budget::{QuotaKind, Quotas};

/// What a slot is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    /// An open SSE stream.
    Stream,
    /// A long-poll waiting for a change.
    LongPoll,
}

/// The open streams and long-polls of each organisation on this instance.
pub struct Gates {
    quotas: Quotas,
    /// Organisation id → (streams, long-polls) held now; an organisation holding nothing has
    /// no entry.
    held: Mutex<HashMap<String, [u64; 2]>>,
}

impl Gates {
    /// Gates enforcing `quotas`.
    pub fn new(quotas: Quotas) -> Gates {
        Gates {
            quotas,
            held: Mutex::default(),
        }
    }

    /// Take a slot of `gate` for `org`, or refuse when it holds its most.
    pub fn enter(&self, org: &str, gate: Gate) -> Result<Held<'_>, ApiError> {
        let quota = self.quotas.of(org);
        let (i, max, kind) = match gate {
            Gate::Stream => (0, quota.max_streams, QuotaKind::Streams),
            Gate::LongPoll => (1, quota.max_long_polls, QuotaKind::LongPolls),
        };
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let counts = held.entry(org.to_owned()).or_default();
        if counts[i] >= max {
            if counts == &[0, 0] {
                held.remove(org);
            }
            return Err(ApiError::QuotaExceeded(kind, self.quotas.retry_after));
        }
        counts[i] += 1;
        Ok(Held {
            gates: self,
            org: org.to_owned(),
            i,
        })
    }

    /// What `org` holds now: (streams, long-polls).
    pub fn held(&self, org: &str) -> (u64, u64) {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.get(org).map_or((0, 0), |c| (c[0], c[1]))
    }
}

/// A slot held until dropped.
pub struct Held<'a> {
    gates: &'a Gates,
    org: String,
    i: usize,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let mut held = self.gates.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(counts) = held.get_mut(&self.org) {
            counts[self.i] -= 1;
            if counts == &[0, 0] {
                held.remove(&self.org);
            }
        }
    }
}

/// The request bodies held at once, against a maximum.
#[derive(Clone, Debug)]
pub struct Bodies(Arc<BodyCount>);

#[derive(Debug)]
struct BodyCount {
    held: AtomicU64,
    max: u64,
}

impl Bodies {
    /// At most `max` bytes of request bodies at once.
    pub fn new(max: u64) -> Bodies {
        Bodies(Arc::new(BodyCount {
            held: AtomicU64::new(0),
            max,
        }))
    }

    /// Count `n` more bytes being read, unless that would pass the maximum.
    pub fn take(&self, n: usize) -> bool {
        let taken = self
            .0
            .held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |h| {
                (h + n as u64 <= self.0.max).then_some(h + n as u64)
            })
            .is_ok();
        if taken {
            metrics::REQUEST_BODY_BYTES.add(n as i64);
        }
        taken
    }

    /// Give back `n` bytes taken (a body abandoned before it was whole).
    pub fn give_back(&self, n: usize) {
        self.0.give_back(n);
    }

    /// A whole body whose bytes (already taken) stay counted until its last copy is dropped.
    pub fn hold(&self, body: Vec<u8>) -> Bytes {
        Bytes::from_owner(HeldBody {
            body,
            count: self.0.clone(),
        })
    }

    /// Bytes held now.
    pub fn held(&self) -> u64 {
        self.0.held.load(Ordering::Acquire)
    }
}

struct HeldBody {
    body: Vec<u8>,
    count: Arc<BodyCount>,
}

impl AsRef<[u8]> for HeldBody {
    fn as_ref(&self) -> &[u8] {
        &self.body
    }
}

impl BodyCount {
    fn give_back(&self, n: usize) {
        self.held.fetch_sub(n as u64, Ordering::AcqRel);
        metrics::REQUEST_BODY_BYTES.sub(n as i64);
    }
}

impl Drop for HeldBody {
    fn drop(&mut self) {
        self.count.give_back(self.body.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::budget::OrgQuota;

    #[test]
    fn bodies_are_counted_until_their_last_copy_goes() {
        let b = Bodies::new(100);
        assert!(b.take(60));
        let body = b.hold(vec![1; 60]);
        let copy = body.slice(10..20);
        assert!(!b.take(41), "over the maximum");
        assert!(b.take(40));
        b.give_back(40);
        drop(body);
        assert_eq!(b.held(), 60, "a slice still holds the body");
        drop(copy);
        assert_eq!(b.held(), 0);
        assert!(b.take(100));
    }

    fn gates() -> Gates {
        let mut quotas = Quotas::unlimited();
        quotas.default.max_streams = 2;
        quotas.default.max_long_polls = 1;
        quotas.overrides.insert(
            "big".into(),
            OrgQuota {
                max_streams: 3,
                ..quotas.default
            },
        );
        Gates::new(quotas)
    }

    #[test]
    fn an_organisation_at_its_quota_is_refused_and_others_are_not() {
        let g = gates();
        let a1 = g.enter("a", Gate::Stream).unwrap();
        let _a2 = g.enter("a", Gate::Stream).unwrap();
        let refused = g.enter("a", Gate::Stream).err().unwrap();
        assert_eq!(refused.status(), 429);
        assert_eq!(refused.code(), "quota_exceeded");
        // Long-polls are counted apart; another organisation is untouched; overrides apply.
        let _p = g.enter("a", Gate::LongPoll).unwrap();
        assert!(g.enter("a", Gate::LongPoll).is_err());
        let _b = g.enter("b", Gate::Stream).unwrap();
        let _big: Vec<_> = (0..3)
            .map(|_| g.enter("big", Gate::Stream).unwrap())
            .collect();
        assert!(g.enter("big", Gate::Stream).is_err());
        // A slot given back can be taken again.
        drop(a1);
        assert_eq!(g.held("a"), (1, 1));
        let _a3 = g.enter("a", Gate::Stream).unwrap();
    }

    #[test]
    fn an_organisation_holding_nothing_has_no_entry() {
        let g = gates();
        drop(g.enter("a", Gate::Stream).unwrap());
        drop(g.enter("x", Gate::LongPoll).unwrap());
        assert!(g.held.lock().unwrap().is_empty());
    }
}
