//! The report: aggregates the rows of every repetition (medians; error counters are summed),
//! renders one markdown table per scenario, checks the targets (met / missed) and writes
//! `report.md` and `results.json`.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde_json::json;

use crate::measure::median;
use crate::scenarios::{Metrics, Row};

/// Counters summed over repetitions (any occurrence matters); every other figure is a median.
const SUMMED: &[&str] = &["gaps", "dups", "no_id", "unclean", "errors", "bad"];

/// One row of one repetition of one scenario.
#[derive(Debug, Clone)]
pub struct Record {
    /// Scenario number (1–8).
    pub scenario: u8,
    /// Repetition (0-based).
    pub rep: usize,
    /// The row.
    pub row: Row,
}

/// A row aggregated over repetitions.
#[derive(Debug, Clone)]
pub struct Agg {
    /// Its label.
    pub label: String,
    /// Medians (sums for [`SUMMED`]).
    pub m: Metrics,
    /// Notes, deduplicated.
    pub notes: Vec<String>,
    /// Repetitions seen.
    pub reps: usize,
}

/// Aggregate the records of one scenario, rows in order of first appearance.
pub fn aggregate(records: &[Record], scenario: u8) -> Vec<Agg> {
    let mut order: Vec<String> = Vec::new();
    let mut by: BTreeMap<String, Vec<&Row>> = BTreeMap::new();
    for r in records.iter().filter(|r| r.scenario == scenario) {
        if !by.contains_key(&r.row.label) {
            order.push(r.row.label.clone());
        }
        by.entry(r.row.label.clone()).or_default().push(&r.row);
    }
    order
        .into_iter()
        .map(|label| {
            let rows = &by[&label];
            let mut keys: Vec<&'static str> =
                rows.iter().flat_map(|r| r.m.keys().copied()).collect();
            keys.sort_unstable();
            keys.dedup();
            let mut m = Metrics::new();
            for k in keys {
                let vals: Vec<f64> = rows.iter().filter_map(|r| r.m.get(k).copied()).collect();
                let v = if SUMMED.contains(&k) {
                    Some(vals.iter().sum())
                } else {
                    median(&vals)
                };
                if let Some(v) = v {
                    m.insert(k, v);
                }
            }
            let mut notes: Vec<String> = rows.iter().flat_map(|r| r.notes.clone()).collect();
            notes.dedup();
            Agg {
                label,
                m,
                notes,
                reps: rows.len(),
            }
        })
        .collect()
}

/// One column: header, metric key, decimals.
type Col = (&'static str, &'static str, usize);

fn fmt_num(v: f64, decimals: usize) -> String {
    if !v.is_finite() {
        return "—".into();
    }
    let s = format!("{v:.decimals$}");
    // Thousands separators for the integer part.
    let (int, frac) = match s.split_once('.') {
        Some((i, f)) => (i.to_string(), format!(".{f}")),
        None => (s.clone(), String::new()),
    };
    let (sign, digits) = match int.strip_prefix('-') {
        Some(d) => ("-", d.to_string()),
        None => ("", int),
    };
    let mut grouped = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(c);
    }
    format!("{sign}{grouped}{frac}")
}

fn table(out: &mut String, first: &str, cols: &[Col], rows: &[Agg]) {
    let _ = write!(out, "| {first} |");
    for (h, _, _) in cols {
        let _ = write!(out, " {h} |");
    }
    out.push_str("\n|---|");
    for _ in cols {
        out.push_str("---:|");
    }
    out.push('\n');
    for r in rows {
        let _ = write!(out, "| {} |", r.label);
        for (_, key, d) in cols {
            let cell = r.m.get(key).map_or("—".to_string(), |v| fmt_num(*v, *d));
            let _ = write!(out, " {cell} |");
        }
        out.push('\n');
    }
}

const STREAM_COLS: &[Col] = &[
    ("events/s", "ev_per_s", 0),
    ("p50 µs", "p50_us", 0),
    ("p99 µs", "p99_us", 0),
    ("added p50 µs", "added_p50_us", 0),
    ("added p99 µs", "added_p99_us", 0),
    ("CPU-µs/event", "cpu_us_per_ev", 2),
    ("target CPU %", "target_cpu_pct", 0),
    ("busiest thread %", "busiest_thread_pct", 0),
    ("peak RSS MB", "peak_rss_mb", 1),
    ("(peak−idle)/stream KiB", "rss_per_stream_kib", 1),
    ("gaps", "gaps", 0),
    ("dups", "dups", 0),
    ("unclean", "unclean", 0),
    ("reconnects", "reconnects", 0),
    ("Redis CPU-µs/event", "redis_cpu_us_per_ev", 2),
    ("Redis CPU %", "redis_cpu_pct", 0),
    ("Redis peak RSS MB", "redis_peak_rss_mb", 1),
    ("Redis RSS growth MB", "redis_rss_growth_mb", 1),
    ("gen CPU %", "gen_cpu_pct", 0),
    ("client CPU %", "client_cpu_pct", 0),
];

const SNAPSHOT_COLS: &[Col] = &[
    ("req/s", "req_per_s", 0),
    ("CPU-µs/req", "cpu_us_per_req", 1),
    ("target CPU %", "target_cpu_pct", 0),
    ("bytes/answer", "bytes", 0),
    ("p50 ms", "p50_ms", 2),
    ("errors", "errors", 0),
    ("Redis CPU-µs/req", "redis_cpu_us_per_req", 1),
    ("Redis CPU %", "redis_cpu_pct", 0),
    ("gen CPU %", "gen_cpu_pct", 0),
    ("client CPU %", "client_cpu_pct", 0),
];

const POLL_COLS: &[Col] = &[
    ("clients", "clients", 0),
    ("polls/s", "polls_per_s", 0),
    ("mean hold ms", "hold_ms", 0),
    ("target CPU % of a core", "target_cpu_pct", 1),
    ("CPU-µs/poll", "cpu_us_per_poll", 1),
    ("errors", "errors", 0),
    ("Redis CPU % of a core", "redis_cpu_pct", 1),
    ("Redis CPU-µs/poll", "redis_cpu_us_per_poll", 1),
    ("gen CPU %", "gen_cpu_pct", 0),
];

const RESUME_COLS: &[Col] = &[
    ("tries", "tries", 0),
    ("median ms", "median_ms", 2),
    ("p90 ms", "p90_ms", 2),
    ("bad answers", "bad", 0),
];

const MEMORY_COLS: &[Col] = &[
    ("quiet streams open", "quiet_open", 0),
    ("idle RSS MB", "idle_rss_mb", 1),
    ("RSS, quiet streams MB", "quiet_rss_mb", 1),
    ("KiB/quiet stream", "kib_per_quiet", 1),
    ("held polls", "polls_held", 0),
    ("RSS, held polls MB", "polls_rss_mb", 1),
    ("KiB/held poll", "kib_per_poll", 1),
    ("answered early", "polls_answered_early", 0),
];

/// A scenario's title and what it did.
pub fn describe(
    scenario: u8,
    desc: &BTreeMap<u8, String>,
) -> (String, &'static [Col], &'static str) {
    let (title, cols) = match scenario {
        1..=4 => ("streamed runs", STREAM_COLS),
        5 => ("snapshots (`GET /api/getConversation`, 32 keep-alive connections)", SNAPSHOT_COLS),
        6 => ("long-polls (`wait=1` on a finished thread)", POLL_COLS),
        7 => ("resume 10 events before the end (Sluice, `GET /api/threads/{id}/stream?format=agentflow`)", RESUME_COLS),
        _ => ("memory per quiet stream and per held long-poll", MEMORY_COLS),
    };
    let what = desc.get(&scenario).cloned().unwrap_or_default();
    let first = if scenario == 7 { "run" } else { "target" };
    (format!("{scenario}. {title}: {what}"), cols, first)
}

/// One of the targets, checked.
pub struct Check {
    /// The target as the issue states it.
    pub target: String,
    /// What was measured.
    pub measured: String,
    /// Met, missed, or not measured.
    pub met: Option<bool>,
}

fn get(aggs: &BTreeMap<u8, Vec<Agg>>, s: u8, label: &str, key: &str) -> Option<f64> {
    aggs.get(&s)?
        .iter()
        .find(|a| a.label == label)?
        .m
        .get(key)
        .copied()
}

/// Evaluate the targets.
pub fn checks(aggs: &BTreeMap<u8, Vec<Agg>>) -> Vec<Check> {
    let mut out = Vec::new();
    let na = |target: &str| Check {
        target: target.into(),
        measured: "not measured (scenario or target not run)".into(),
        met: None,
    };
    for s in 1..=4u8 {
        let t = format!("CPU-µs per event ≤ nginx's (scenario {s})");
        match (
            get(aggs, s, "sluice", "cpu_us_per_ev"),
            get(aggs, s, "nginx", "cpu_us_per_ev"),
        ) {
            (Some(a), Some(b)) => out.push(Check {
                target: t,
                measured: format!("sluice {a:.2} µs vs nginx {b:.2} µs"),
                met: Some(a <= b),
            }),
            _ => out.push(na(&t)),
        }
    }
    let t = "added p50 at 100 streams ≤ nginx's + 100 µs (scenario 1)";
    match (
        get(aggs, 1, "sluice", "added_p50_us"),
        get(aggs, 1, "nginx", "added_p50_us"),
    ) {
        (Some(a), Some(b)) => out.push(Check {
            target: t.into(),
            measured: format!("sluice +{a:.0} µs vs nginx +{b:.0} µs"),
            met: Some(a <= b + 100.0),
        }),
        _ => out.push(na(t)),
    }
    let t = "snapshot req/s ≥ 2× nginx (scenario 5, 20-event run)";
    match (
        get(aggs, 5, "sluice, 20-event run", "req_per_s"),
        get(aggs, 5, "nginx", "req_per_s"),
    ) {
        (Some(a), Some(b)) => out.push(Check {
            target: t.into(),
            measured: format!("sluice {a:.0} req/s vs nginx {b:.0} req/s ({:.2}×)", a / b),
            met: Some(a >= 2.0 * b),
        }),
        _ => out.push(na(t)),
    }
    let t = "100k-event snapshot ≤ 2× the CPU/request of the 20-event one, response size aside (scenario 5, the 100k-event run with the same answer)";
    match (
        get(
            aggs,
            5,
            "sluice, 100k events, same answer",
            "cpu_us_per_req",
        ),
        get(aggs, 5, "sluice, 20-event run", "cpu_us_per_req"),
    ) {
        (Some(a), Some(b)) => out.push(Check {
            target: t.into(),
            measured: format!("{a:.0} µs vs {b:.0} µs ({:.1}×)", a / b),
            met: Some(a <= 2.0 * b),
        }),
        _ => out.push(na(t)),
    }
    let t = "2,000 long-polls ≤ 10 % of a core (scenario 6)";
    match get(aggs, 6, "sluice", "target_cpu_pct") {
        Some(a) => out.push(Check {
            target: t.into(),
            measured: format!("{a:.1} % of a core"),
            met: Some(a <= 10.0),
        }),
        None => out.push(na(t)),
    }
    let t = "resume time independent of run length (scenario 7; read as: 100k-event median ≤ 2× the 20-event one)";
    match (
        get(aggs, 7, "100k-event run", "median_ms"),
        get(aggs, 7, "20-event run", "median_ms"),
    ) {
        (Some(a), Some(b)) => out.push(Check {
            target: t.into(),
            measured: format!("{a:.2} ms vs {b:.2} ms ({:.1}×)", a / b.max(1e-9)),
            met: Some(a <= 2.0 * b),
        }),
        _ => out.push(na(t)),
    }
    let t = "memory per quiet stream ≤ 16 KiB (scenario 8)";
    match get(aggs, 8, "sluice", "kib_per_quiet") {
        Some(a) => out.push(Check {
            target: t.into(),
            measured: format!("{a:.1} KiB per stream"),
            met: Some(a <= 16.0),
        }),
        None => out.push(na(t)),
    }
    out
}

/// The streamed scenarios' memory-store and Redis-store rows side by side (when both ran):
/// Sluice's CPU per event, Redis's, their sum, the added latencies and the stream errors.
fn store_comparison(out: &mut String, aggs: &BTreeMap<u8, Vec<Agg>>) {
    let mut lines = Vec::new();
    for s in 1..=4u8 {
        let Some(rows) = aggs.get(&s) else { continue };
        let (Some(mem), Some(red)) = (
            rows.iter().find(|a| a.label == "sluice"),
            rows.iter().find(|a| a.label == "sluice-redis"),
        ) else {
            continue;
        };
        let streams = mem.m.get("streams").or(red.m.get("streams")).copied();
        for a in [mem, red] {
            let f = |k: &str, d: usize| a.m.get(k).map_or("—".to_string(), |v| fmt_num(*v, d));
            let total = match (a.m.get("cpu_us_per_ev"), a.m.get("redis_cpu_us_per_ev")) {
                (Some(x), Some(y)) => fmt_num(x + y, 2),
                (Some(x), None) if a.label == "sluice" => fmt_num(*x, 2),
                _ => "—".to_string(),
            };
            let streams = streams.map_or("—".to_string(), |v| fmt_num(v, 0));
            let stream_errors = a.m.get("gaps").copied().unwrap_or(0.0)
                + a.m.get("dups").copied().unwrap_or(0.0)
                + a.m.get("unclean").copied().unwrap_or(0.0);
            lines.push(format!(
                "| {s} | {streams} | {} | {} | {} | {total} | {} | {} | {} | {} | {} |",
                a.label,
                f("cpu_us_per_ev", 2),
                if a.label == "sluice" {
                    "—".to_string()
                } else {
                    f("redis_cpu_us_per_ev", 2)
                },
                f("added_p50_us", 0),
                f("added_p99_us", 0),
                f("p50_us", 0),
                f("p99_us", 0),
                fmt_num(stream_errors, 0),
            ));
        }
    }
    if lines.is_empty() {
        return;
    }
    let _ = writeln!(out, "## Memory store against Redis store (streamed runs)\n");
    let _ = writeln!(
        out,
        "| scenario | streams | target | Sluice CPU-µs/event | Redis CPU-µs/event | total CPU-µs/event | added p50 µs | added p99 µs | p50 µs | p99 µs | gaps + dups + unclean |"
    );
    let _ = writeln!(
        out,
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for l in lines {
        let _ = writeln!(out, "{l}");
    }
    out.push('\n');
}

/// Everything the report's header says.
pub struct Meta {
    /// The command that ran.
    pub command: String,
    /// When.
    pub date: String,
    /// Machine lines (`- …`).
    pub machine: Vec<String>,
    /// Settings lines.
    pub settings: Vec<String>,
    /// What each scenario did, by number.
    pub desc: BTreeMap<u8, String>,
    /// Notes on the run as a whole.
    pub notes: Vec<String>,
}

/// Render the markdown report.
pub fn render(meta: &Meta, records: &[Record], scenarios: &[u8]) -> (String, serde_json::Value) {
    let mut out = String::new();
    let _ = writeln!(out, "# Sluice load report (`make bench-load`)\n");
    let _ = writeln!(out, "- command: `{}`", meta.command);
    let _ = writeln!(out, "- date: {}", meta.date);
    for m in &meta.machine {
        let _ = writeln!(out, "- {m}");
    }
    for s in &meta.settings {
        let _ = writeln!(out, "- {s}");
    }
    out.push('\n');
    let mut aggs: BTreeMap<u8, Vec<Agg>> = BTreeMap::new();
    let mut json_rows = Vec::new();
    for &s in scenarios {
        let rows = aggregate(records, s);
        let (title, cols, first) = describe(s, &meta.desc);
        let _ = writeln!(out, "## {title}\n");
        if rows.is_empty() {
            let _ = writeln!(out, "(no rows: no applicable target ran)\n");
        } else {
            // Only the columns some row has.
            let cols: Vec<Col> = cols
                .iter()
                .copied()
                .filter(|(_, k, _)| rows.iter().any(|r| r.m.contains_key(k)))
                .collect();
            table(&mut out, first, &cols, &rows);
            out.push('\n');
        }
        for r in &rows {
            for n in &r.notes {
                let _ = writeln!(out, "- note: {n}");
            }
            json_rows.push(json!({"scenario": s, "label": r.label, "reps": r.reps, "metrics": r.m, "notes": r.notes}));
        }
        if rows.iter().any(|r| !r.notes.is_empty()) {
            out.push('\n');
        }
        aggs.insert(s, rows);
    }
    store_comparison(&mut out, &aggs);
    let checks = checks(&aggs);
    let _ = writeln!(out, "## The issue's targets\n");
    let _ = writeln!(out, "| target | measured | result |\n|---|---|---|");
    for c in &checks {
        let verdict = match c.met {
            Some(true) => "**met**",
            Some(false) => "**missed**",
            None => "n/a",
        };
        let _ = writeln!(out, "| {} | {} | {verdict} |", c.target, c.measured);
    }
    out.push('\n');
    if !meta.notes.is_empty() {
        let _ = writeln!(out, "## Notes\n");
        for n in &meta.notes {
            let _ = writeln!(out, "- {n}");
        }
        out.push('\n');
    }
    let json = json!({
        "command": meta.command,
        "date": meta.date,
        "machine": meta.machine,
        "settings": meta.settings,
        "rows": json_rows,
        "raw": records.iter().map(|r| json!({"scenario": r.scenario, "rep": r.rep, "label": r.row.label, "metrics": r.row.m, "notes": r.row.notes})).collect::<Vec<_>>(),
        "checks": checks.iter().map(|c| json!({"target": c.target, "measured": c.measured, "met": c.met})).collect::<Vec<_>>(),
    });
    (out, json)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_read_the_snapshot_rows_scenario_5_makes() {
        let labels: Vec<&str> = crate::scenarios::SNAPSHOT_ROWS
            .iter()
            .map(|(_, l)| *l)
            .collect();
        for l in ["sluice, 20-event run", "sluice, 100k events, same answer"] {
            assert!(labels.contains(&l), "{l}");
        }
    }

    #[test]
    fn the_redis_store_rows_are_labelled_apart() {
        use crate::scenarios::sluice_label;
        use crate::targets::Kind;
        let (_, label) = crate::scenarios::SNAPSHOT_ROWS[0];
        assert_eq!(sluice_label(Kind::Sluice, label), label);
        assert_eq!(
            sluice_label(Kind::SluiceRedis, label),
            "sluice-redis, 20-event run"
        );
    }

    #[test]
    fn the_store_comparison_sums_sluice_and_redis() {
        let row = |label: &str, m: &[(&'static str, f64)]| Row {
            label: label.into(),
            m: m.iter().copied().collect(),
            notes: vec![],
        };
        let recs = vec![
            Record {
                scenario: 2,
                rep: 0,
                row: row("sluice", &[("streams", 1000.0), ("cpu_us_per_ev", 20.0)]),
            },
            Record {
                scenario: 2,
                rep: 0,
                row: row(
                    "sluice-redis",
                    &[("cpu_us_per_ev", 50.0), ("redis_cpu_us_per_ev", 25.0)],
                ),
            },
        ];
        let mut aggs = BTreeMap::new();
        aggs.insert(2, aggregate(&recs, 2));
        let mut out = String::new();
        store_comparison(&mut out, &aggs);
        assert!(
            out.contains("| 2 | 1,000 | sluice | 20.00 | — | 20.00 |"),
            "{out}"
        );
        assert!(
            out.contains("| 2 | 1,000 | sluice-redis | 50.00 | 25.00 | 75.00 |"),
            "{out}"
        );
        let mut none = String::new();
        aggs.get_mut(&2).unwrap().retain(|a| a.label == "sluice");
        store_comparison(&mut none, &aggs);
        assert!(none.is_empty());
    }

    #[test]
    fn numbers_are_grouped() {
        assert_eq!(fmt_num(1234567.891, 1), "1,234,567.9");
        assert_eq!(fmt_num(-1234.0, 0), "-1,234");
        assert_eq!(fmt_num(12.0, 2), "12.00");
        assert_eq!(fmt_num(f64::NAN, 0), "—");
    }

    #[test]
    fn medians_and_sums() {
        let row = |v: f64| Row {
            label: "sluice".into(),
            m: [("p50_us", v), ("gaps", 1.0)].into_iter().collect(),
            notes: vec![],
        };
        let recs: Vec<Record> = [1.0, 5.0, 3.0]
            .iter()
            .enumerate()
            .map(|(rep, v)| Record {
                scenario: 1,
                rep,
                row: row(*v),
            })
            .collect();
        let a = aggregate(&recs, 1);
        assert_eq!(a[0].m["p50_us"], 3.0);
        assert_eq!(a[0].m["gaps"], 3.0);
        assert_eq!(a[0].reps, 3);
    }
}
