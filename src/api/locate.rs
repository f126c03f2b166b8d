//! Which run a resume cursor names. Pure: the stream route gives it the thread's layout and
//! serves what it answers.
//!
//! `seq` runs through the thread (DESIGN.md §6), so a cursor is a position in the thread: the
//! run to serve is the one holding the first event after it (for `k.j`, event `k` itself, whose
//! last chunks are still to come). A cursor at the end of the thread waits for the latest run
//! while it is in progress; otherwise there is nothing left to send (`204`). A cursor into the
//! evicted prefix of the thread is expired (`410`); one beyond the thread's end is refused.

use crate::render::ui::Cursor;

/// A run's place in its thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    /// Seq of its first event.
    pub first_seq: u64,
    /// Seq of its last event (`first_seq - 1` when it has none).
    pub last_seq: u64,
    /// Whether it is still in progress.
    pub in_progress: bool,
}

/// What a cursor names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Located {
    /// Serve the run at this index (of the retained runs) after the cursor.
    Run(usize),
    /// Nothing follows the cursor and no run is in progress.
    NothingLeft,
    /// The cursor points into runs that were evicted.
    Expired,
    /// The cursor is beyond the thread's last event.
    Beyond,
}

/// Locate `cursor` in a thread whose retained runs are `runs` (oldest first, contiguous) and
/// whose evicted runs held `1..=evicted_through`. No cursor: the latest run while it is in
/// progress.
pub fn locate(cursor: Option<Cursor>, runs: &[Span], evicted_through: u64) -> Located {
    let latest_live = runs
        .last()
        .filter(|r| r.in_progress)
        .map(|_| Located::Run(runs.len() - 1));
    let Some(c) = cursor else {
        return latest_live.unwrap_or(Located::NothingLeft);
    };
    let thread_last = runs.last().map_or(evicted_through, |r| r.last_seq);
    if c.seq > thread_last {
        return Located::Beyond;
    }
    // The first event the client still needs (all or part of it).
    let next = if c.chunk.is_some() { c.seq } else { c.seq + 1 };
    if next <= evicted_through {
        return Located::Expired;
    }
    match runs
        .iter()
        .position(|r| r.first_seq <= next && next <= r.last_seq)
    {
        Some(i) => Located::Run(i),
        None => latest_live.unwrap_or(Located::NothingLeft),
    }
}

/// Whether `cursor` is a position inside `run` (from just before its first event to its last),
/// for a client that names the run explicitly (`?runId=`).
pub fn within(cursor: Cursor, run: &Span) -> bool {
    let lowest = if cursor.chunk.is_some() {
        run.first_seq
    } else {
        run.first_seq - 1
    };
    lowest <= cursor.seq && cursor.seq <= run.last_seq
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn span(first: u64, last: u64, live: bool) -> Span {
        Span {
            first_seq: first,
            last_seq: last,
            in_progress: live,
        }
    }

    fn at(s: &str) -> Option<Cursor> {
        Some(Cursor::parse(s).unwrap())
    }

    #[test]
    fn a_cursor_names_the_run_holding_the_next_event() {
        // Run 1 holds 1..=30, run 2 31..=90 (finished).
        let runs = [span(1, 30, false), span(31, 90, false)];
        assert_eq!(locate(at("25"), &runs, 0), Located::Run(0));
        assert_eq!(locate(at("0"), &runs, 0), Located::Run(0));
        assert_eq!(locate(at("30.2"), &runs, 0), Located::Run(0));
        assert_eq!(locate(at("30"), &runs, 0), Located::Run(1));
        assert_eq!(locate(at("89"), &runs, 0), Located::Run(1));
        assert_eq!(locate(at("90.1"), &runs, 0), Located::Run(1));
        assert_eq!(locate(at("90"), &runs, 0), Located::NothingLeft);
        assert_eq!(locate(at("91"), &runs, 0), Located::Beyond);
        assert_eq!(locate(None, &runs, 0), Located::NothingLeft);
    }

    #[test]
    fn the_end_of_the_thread_waits_for_a_live_run() {
        // Run 2 started with no event yet.
        let runs = [span(1, 30, false), span(31, 30, true)];
        assert_eq!(locate(at("30"), &runs, 0), Located::Run(1));
        assert_eq!(locate(at("29"), &runs, 0), Located::Run(0));
        assert_eq!(locate(None, &runs, 0), Located::Run(1));
        assert_eq!(locate(at("31"), &runs, 0), Located::Beyond);
    }

    #[test]
    fn cursors_into_evicted_runs_are_expired() {
        let runs = [span(41, 50, false)];
        assert_eq!(locate(at("10"), &runs, 40), Located::Expired);
        assert_eq!(locate(at("39"), &runs, 40), Located::Expired);
        assert_eq!(locate(at("40.1"), &runs, 40), Located::Expired);
        assert_eq!(locate(at("40"), &runs, 40), Located::Run(0));
        // Every run evicted.
        assert_eq!(locate(at("40"), &[], 40), Located::NothingLeft);
        assert_eq!(locate(at("12"), &[], 40), Located::Expired);
        assert_eq!(locate(at("41"), &[], 40), Located::Beyond);
    }

    #[test]
    fn an_explicit_run_takes_cursors_inside_it_only() {
        let r = span(31, 90, false);
        assert!(within(Cursor::after(30), &r));
        assert!(within(Cursor::after(90), &r));
        assert!(within(Cursor::parse("31.1").unwrap(), &r));
        assert!(!within(Cursor::parse("30.1").unwrap(), &r));
        assert!(!within(Cursor::after(29), &r));
        assert!(!within(Cursor::after(91), &r));
    }

    proptest! {
        /// For any thread layout and any cursor up to its end, the run named is the one holding
        /// the next event, never another; a cursor at the end names the live run or nothing.
        #[test]
        fn every_cursor_names_the_run_holding_it(
            sizes in prop::collection::vec(0u64..6, 1..6),
            evicted in 0usize..3,
            live in any::<bool>(),
            chunk in prop::option::of(1u32..4),
        ) {
            let mut runs = Vec::new();
            let mut next = 1;
            for n in &sizes {
                runs.push(span(next, next + n - 1, false));
                next += n;
            }
            let last = runs.len() - 1;
            runs[last].in_progress = live;
            let evicted = evicted.min(runs.len() - 1);
            let evicted_through = if evicted == 0 { 0 } else { runs[evicted - 1].last_seq };
            let kept = &runs[evicted..];
            let thread_last = next - 1;
            for k in 0..=thread_last + 1 {
                let c = Cursor { seq: k, chunk: chunk.filter(|_| k > 0) };
                let got = locate(Some(c), kept, evicted_through);
                let want_event = if c.chunk.is_some() { k } else { k + 1 };
                let expected = if k > thread_last {
                    Located::Beyond
                } else if want_event <= evicted_through {
                    Located::Expired
                } else if let Some(i) = kept.iter().position(|r| r.first_seq <= want_event && want_event <= r.last_seq) {
                    Located::Run(i)
                } else if live {
                    Located::Run(kept.len() - 1)
                } else {
                    Located::NothingLeft
                };
                prop_assert_eq!(got, expected, "cursor {}", c);
                if let Located::Run(i) = got {
                    prop_assert!(within(c, &kept[i]));
                }
            }
        }
    }
}
