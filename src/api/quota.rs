//! Per-organisation gates for what a request holds while it lasts on this instance: open SSE
//! streams and waiting long-polls (`limits.per_org.max_streams`, `max_long_polls`). Runs in
//! progress and bytes held are the store's to count ([`crate::store::budget`]).
//!
//! A request takes a [`Held`] slot before it starts streaming or waiting and gives it back when
//! the slot drops; an organisation at its quota gets `429 quota_exceeded` with `Retry-After`,
//! whatever the others hold.

use std::collections::HashMap;
use std::sync::Mutex;

use super::ApiError;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::budget::OrgQuota;

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
