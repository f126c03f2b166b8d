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
        /// The resume property over multi-run threads: for any sequence of runs and any cursor
        /// (every `k` and `k.j` a client was sent, and every plain `k` of the thread), resuming
        /// yields exactly the rest of the run holding the cursor; at a run's very end, the next
        /// run whole; at the thread's end, nothing.
        #[test]
        fn resuming_a_thread_yields_exactly_the_rest_of_the_run_holding_the_cursor(
            logs in prop::collection::vec(
                crate::render::proptests::run().prop_filter("a run has events", |e| !e.is_empty()),
                1..4,
            ),
        ) {
            use crate::event::Event;
            use crate::render::proptests::frames;
            use crate::render::ui::UiRenderer;
            // Number the runs' events through the thread.
            let mut runs: Vec<Vec<Event>> = Vec::new();
            let mut seq = 0;
            for log in logs {
                runs.push(log.into_iter().map(|e| { seq += 1; Event { seq, data: e.data } }).collect());
            }
            let spans: Vec<Span> = runs
                .iter()
                .map(|r| span(r[0].seq, r[r.len() - 1].seq, false))
                .collect();
            let render = |i: usize, cursor: Cursor| {
                let mut r = UiRenderer::new(format!("msg-{i}"));
                let mut out = Vec::new();
                for ev in &runs[i] {
                    r.render_sse_after(ev, cursor, &mut out);
                }
                out
            };
            let full: Vec<Vec<u8>> = (0..runs.len()).map(|i| render(i, Cursor::after(spans[i].first_seq - 1))).collect();
            // What a client at `cursor` must get: served by the route (locate, then render).
            let serve = |cursor: Cursor| match locate(Some(cursor), &spans, 0) {
                Located::Run(i) => Some(render(i, cursor)),
                Located::NothingLeft => None,
                other => panic!("cursor {cursor}: {other:?}"),
            };
            for (i, sse) in full.iter().enumerate() {
                for f in frames(sse)? {
                    let cursor = Cursor::parse(&f.id).ok_or_else(|| TestCaseError::fail("bad id"))?;
                    // Events after the cursor's in this run (even ones that render nothing, such
                    // as anything after the run's end) keep the client in this run.
                    let next = if cursor.chunk.is_some() { cursor.seq } else { cursor.seq + 1 };
                    let want = if next <= spans[i].last_seq {
                        Some(sse[f.end..].to_vec())
                    } else {
                        full.get(i + 1).cloned()
                    };
                    prop_assert_eq!(serve(cursor), want, "run {} cursor {}", i, f.id);
                }
            }
            // Every plain cursor of the thread: the rest of the run holding the next event.
            for k in 0..=seq {
                let got = serve(Cursor::after(k));
                match spans.iter().position(|s| s.first_seq <= k + 1 && k < s.last_seq) {
                    Some(i) => {
                        let mut expect = Vec::new();
                        let mut r = UiRenderer::new(format!("msg-{i}"));
                        for ev in &runs[i] {
                            if ev.seq <= k { r.skip(ev) } else { r.render_sse(ev, &mut expect) }
                        }
                        prop_assert_eq!(got, Some(expect), "cursor {}", k);
                    }
                    None => prop_assert_eq!(got, None, "cursor {} is the thread's end", k),
                }
            }
        }
    }
}
