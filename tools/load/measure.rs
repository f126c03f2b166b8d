//! Measurement primitives: a lock-free latency histogram (log-linear buckets, < 1.6 % relative
//! error), CPU time (`utime + stime` from `/proc/<pid>/stat`), resident memory (`VmRSS` from
//! `/proc/<pid>/status`) with a 100 ms peak sampler, and process discovery (children of a PID).
//! Linux only; nothing here knows about targets or scenarios.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

/// Sub-buckets per power of two (6 bits of mantissa).
const SUB: u64 = 64;
/// Enough buckets for any `u64`.
const BUCKETS: usize = 64 * 57 + 128;

/// A concurrent histogram of `u64` values (nanoseconds here), cheap to record into.
pub struct Histogram {
    buckets: Box<[AtomicU64]>,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram::new()
    }
}

impl Histogram {
    /// An empty histogram.
    pub fn new() -> Histogram {
        Histogram {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn index(v: u64) -> usize {
        if v < 2 * SUB {
            return v as usize;
        }
        let e = 63 - u64::from(v.leading_zeros());
        let shift = e - 6;
        (SUB * shift + (v >> shift)) as usize
    }

    fn value(idx: usize) -> u64 {
        let idx = idx as u64;
        if idx < 2 * SUB {
            return idx;
        }
        let shift = idx / SUB - 1;
        let m = idx - SUB * shift;
        // The middle of the bucket.
        (m << shift) + ((1u64 << shift) >> 1)
    }

    /// Record one value.
    pub fn record(&self, v: u64) {
        self.buckets[Self::index(v)].fetch_add(1, Ordering::Relaxed);
    }

    /// The `q` quantile (0..=1), or `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        let total: u64 = self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            seen += b.load(Ordering::Relaxed);
            if seen >= rank {
                return Some(Self::value(i));
            }
        }
        None
    }
}

/// The quantile `q` of a list of samples (sorted here), or `None` when empty.
pub fn quantile_of(samples: &mut [f64], q: f64) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    samples.sort_by(f64::total_cmp);
    let i = ((q * (samples.len() - 1) as f64).round() as usize).min(samples.len() - 1);
    Some(samples[i])
}

/// The median of `samples` (mean of the middle two for an even count).
pub fn median(samples: &[f64]) -> Option<f64> {
    let mut s: Vec<f64> = samples.iter().copied().filter(|v| v.is_finite()).collect();
    if s.is_empty() {
        return None;
    }
    s.sort_by(f64::total_cmp);
    let n = s.len();
    Some(if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    })
}

/// Clock ticks per second (`getconf CLK_TCK`, 100 when that fails).
pub fn clk_tck() -> u64 {
    static TCK: OnceLock<u64> = OnceLock::new();
    *TCK.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .filter(|t: &u64| *t > 0)
            .unwrap_or(100)
    })
}

/// The fields of `/proc/<pid>/stat` after the command name (field 3, `state`, is index 0).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// `utime + stime` of one process (all its threads, living and exited), in microseconds.
pub fn cpu_us(pid: u32) -> Option<u64> {
    let f = stat_fields(pid)?;
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks * 1_000_000 / clk_tck())
}

/// The summed CPU time of several processes, in microseconds (missing ones count 0).
pub fn cpu_us_all(pids: &[u32]) -> u64 {
    pids.iter().filter_map(|p| cpu_us(*p)).sum()
}

/// `VmRSS` of one process, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The summed `VmRSS` of several processes, in KiB.
pub fn rss_kib_all(pids: &[u32]) -> u64 {
    pids.iter().filter_map(|p| rss_kib(*p)).sum()
}

/// CPU ticks (`utime + stime`) of every thread of some processes, by (pid, tid).
pub fn thread_ticks(pids: &[u32]) -> std::collections::HashMap<(u32, u32), u64> {
    let mut out = std::collections::HashMap::new();
    for &pid in pids {
        let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for entry in dir.flatten() {
            let Some(tid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")) else {
                continue;
            };
            let Some(close) = s.rfind(')') else {
                continue;
            };
            let f: Vec<&str> = s[close + 2..].split_whitespace().collect();
            let ticks = f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
                + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            out.insert((pid, tid), ticks);
        }
    }
    out
}

/// The busiest thread between two [`thread_ticks`] readings, as % of one core over `secs`.
pub fn busiest_thread_pct(
    before: &std::collections::HashMap<(u32, u32), u64>,
    after: &std::collections::HashMap<(u32, u32), u64>,
    secs: f64,
) -> f64 {
    let busiest = after
        .iter()
        .map(|(k, v)| v.saturating_sub(before.get(k).copied().unwrap_or(0)))
        .max()
        .unwrap_or(0);
    busiest as f64 / clk_tck() as f64 / secs.max(1e-9) * 100.0
}

/// The PIDs whose parent is `parent`.
pub fn children_of(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some(f) = stat_fields(pid) {
            if f.get(1).and_then(|p| p.parse::<u32>().ok()) == Some(parent) {
                out.push(pid);
            }
        }
    }
    out.sort_unstable();
    out
}

/// Whether a process exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    stat_fields(pid).is_some_and(|f| f.first().map(String::as_str) != Some("Z"))
}

/// Samples the summed RSS of some processes every `every` on a thread of its own and keeps the
/// peak.
pub struct RssSampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    handle: Option<JoinHandle<()>>,
}

impl RssSampler {
    /// Start sampling `pids`.
    pub fn start(pids: Vec<u32>, every: Duration) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(rss_kib_all(&pids)));
        let handle = {
            let (stop, peak) = (stop.clone(), peak.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    peak.fetch_max(rss_kib_all(&pids), Ordering::Relaxed);
                    std::thread::sleep(every);
                }
                peak.fetch_max(rss_kib_all(&pids), Ordering::Relaxed);
            })
        };
        RssSampler {
            stop,
            peak,
            handle: Some(handle),
        }
    }

    /// The peak so far, in KiB.
    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }

    /// Stop and return the peak, in KiB.
    pub fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        self.peak()
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// CPU time of a set of processes between two instants.
pub struct CpuSpan {
    pids: Vec<u32>,
    start_us: u64,
    start: std::time::Instant,
}

impl CpuSpan {
    /// Start counting.
    pub fn start(pids: &[u32]) -> CpuSpan {
        CpuSpan {
            pids: pids.to_vec(),
            start_us: cpu_us_all(pids),
            start: std::time::Instant::now(),
        }
    }

    /// CPU microseconds used since the start, and the wall time elapsed in seconds.
    pub fn read(&self) -> (u64, f64) {
        (
            cpu_us_all(&self.pids).saturating_sub(self.start_us),
            self.start.elapsed().as_secs_f64(),
        )
    }
}

/// Nanoseconds since the UNIX epoch (the clock the generator stamps `ts` with).
pub fn wall_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_continuous_and_close() {
        let mut last = 0;
        for v in [
            0u64,
            1,
            127,
            128,
            129,
            255,
            256,
            1000,
            65_432,
            1 << 40,
            u64::MAX / 2,
        ] {
            let i = Histogram::index(v);
            assert!(i >= last && i < BUCKETS);
            last = i;
            let back = Histogram::value(i);
            let err = (back as f64 - v as f64).abs() / (v.max(1) as f64);
            assert!(err < 0.02, "{v} -> {back}");
        }
        let h = Histogram::new();
        for v in 1..=1000u64 {
            h.record(v * 1000);
        }
        let p50 = h.quantile(0.5).unwrap() as f64;
        assert!((p50 - 500_000.0).abs() / 500_000.0 < 0.02);
    }
}
