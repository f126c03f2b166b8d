//! A small mutational fuzzer for the stable toolchain: no coverage instrumentation, no libFuzzer.
//!
//! A [`Target`] is a check over bytes: it runs a parser on the input and returns `Err` when a
//! property fails (a panic inside is caught and counts as a failure too). [`fuzz`] first
//! replays every file of `fuzz/regressions/<target>/` and `fuzz/corpus/<target>/` (each must
//! pass), then, for `FUZZ_SECONDS` (default 2) or `FUZZ_ITERS` inputs, mutates corpus entries
//! (bit flips, byte inserts and deletes, range copies, splices between entries, dictionary
//! tokens, awkward numbers, deep nesting) and checks each result.
//!
//! Instead of coverage, targets report *features* (what an input made the parser do: an error
//! kind, an event type, a count bucket); an input that shows a feature never seen before joins
//! the in-memory corpus, so the search keeps what reaches new behaviour.
//!
//! Everything is deterministic given the seed (`FUZZ_SEED`, random and printed when unset) and
//! the corpus: the failure message gives the seed and the iteration. A failing input is first
//! shrunk (greedy deletion that keeps the same failure), then written to
//! `fuzz/regressions/<target>/<hash>`, where every later run replays it.

use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::fmt::Write as _;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Once;
use std::time::{Duration, Instant};

/// What an input made the parser do; see the module docs.
#[derive(Default)]
pub struct Features {
    seen: Vec<u64>,
}

impl Features {
    /// Record a named behaviour.
    pub fn add(&mut self, name: &str) {
        self.seen.push(fnv1a(name.as_bytes()));
    }

    /// Record a named behaviour with a count, bucketed (0, 1, 2, 3-4, 5-8, ...).
    pub fn count(&mut self, name: &str, n: usize) {
        let bucket = usize::BITS - n.leading_zeros();
        self.seen
            .push(fnv1a(name.as_bytes()) ^ u64::from(bucket).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    }
}

/// One fuzz target.
pub struct Target {
    /// Names the corpus and regression directories, and the seed stream.
    pub name: &'static str,
    /// The property check. `Err` (or a panic) is a failure; the text says which property.
    pub check: fn(&[u8], &mut Features) -> Result<(), String>,
    /// Tokens the mutator inserts or overwrites with.
    pub dictionary: &'static [&'static [u8]],
    /// Inputs are kept at most this long.
    pub max_len: usize,
    /// Features the corpus (replayed before fuzzing) must show, so that a target that stopped
    /// reaching its parser (an empty corpus, an always-failing setup) fails loudly.
    pub must_see: &'static [&'static str],
}

/// Where a target's files live.
pub struct Dirs {
    pub corpus: PathBuf,
    pub regressions: PathBuf,
}

impl Dirs {
    /// The repository's `fuzz/corpus/<name>` and `fuzz/regressions/<name>`.
    pub fn of(name: &str) -> Dirs {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
        Dirs {
            corpus: root.join("corpus").join(name),
            regressions: root.join("regressions").join(name),
        }
    }
}

/// Settings read from the environment.
pub struct Budget {
    pub seed: u64,
    pub time: Duration,
    pub iters: Option<u64>,
}

impl Budget {
    /// `FUZZ_SEED` (decimal or `0x` hex; random when unset), `FUZZ_SECONDS` (default 2, per
    /// target) and `FUZZ_ITERS` (a fixed number of inputs instead of a time budget).
    pub fn from_env() -> Budget {
        let seed = match std::env::var("FUZZ_SEED") {
            Ok(s) => parse_u64(&s).unwrap_or_else(|| panic!("FUZZ_SEED={s:?} is not a number")),
            Err(_) => {
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64);
                splitmix(nanos ^ u64::from(std::process::id()))
            }
        };
        let secs = std::env::var("FUZZ_SECONDS")
            .ok()
            .map(|s| {
                s.parse::<f64>()
                    .ok()
                    .filter(|f| f.is_finite() && *f >= 0.0)
                    .unwrap_or_else(|| panic!("FUZZ_SECONDS={s:?} is not a number of seconds"))
            })
            .unwrap_or(2.0);
        let iters = std::env::var("FUZZ_ITERS")
            .ok()
            .map(|s| parse_u64(&s).unwrap_or_else(|| panic!("FUZZ_ITERS={s:?} is not a number")));
        Budget {
            seed,
            time: Duration::from_secs_f64(secs),
            iters,
        }
    }
}

fn parse_u64(s: &str) -> Option<u64> {
    match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// What [`fuzz`] did, for the caller's own assertions.
#[derive(Debug)]
pub struct Report {
    pub replayed: usize,
    pub inputs: u64,
    pub corpus: usize,
    pub features: usize,
}

/// A failure: its kind (a property's name, or where a panic happened), used to keep shrinking
/// on the same failure, and the whole message.
#[derive(Clone, Debug)]
pub struct Failure {
    pub kind: String,
    pub message: String,
}

/// Replay the target's regressions and corpus, then fuzz it within `budget`. Panics (failing
/// the test) on the first failing input, after saving it to the regressions directory.
pub fn fuzz(target: &Target, dirs: &Dirs, budget: &Budget) -> Report {
    let mut corpus: Vec<Vec<u8>> = Vec::new();
    let mut seen: HashSet<u64> = HashSet::new();
    let mut replayed = 0;
    for (dir, what) in [(&dirs.regressions, "regression"), (&dirs.corpus, "corpus")] {
        for (path, input) in read_dir(dir) {
            replayed += 1;
            match run_one(target, &input) {
                Ok(features) => seen.extend(features),
                Err(f) => panic!(
                    "fuzz target `{}`: {what} file {} fails ({}):\n{}\ninput ({} bytes): {}",
                    target.name,
                    path.display(),
                    f.kind,
                    f.message,
                    input.len(),
                    escape(&input, 4000)
                ),
            }
            corpus.push(input);
        }
    }
    let missing: Vec<&str> = target
        .must_see
        .iter()
        .copied()
        .filter(|name| !seen.contains(&fnv1a(name.as_bytes())))
        .collect();
    assert!(
        missing.is_empty(),
        "fuzz target `{}`: the corpus in {} never shows {missing:?}; the target no longer \
         reaches what it is meant to test",
        target.name,
        dirs.corpus.display()
    );
    if corpus.is_empty() {
        corpus.push(Vec::new());
    }

    let seed = budget.seed;
    let mut rng = Rng::new(seed ^ fnv1a(target.name.as_bytes()));
    let start = Instant::now();
    let mut inputs = 0u64;
    loop {
        match budget.iters {
            Some(n) if inputs >= n => break,
            None if start.elapsed() >= budget.time => break,
            _ => {}
        }
        let base = rng.below(corpus.len());
        let mut input = corpus[base].clone();
        let depth = rng.below(4);
        let stack = 1 + rng.below(1 << depth);
        for _ in 0..stack {
            mutate(&mut rng, &mut input, &corpus, target);
        }
        let iteration = inputs;
        inputs += 1;
        match run_one(target, &input) {
            Ok(features) => {
                let mut new = false;
                for f in features {
                    new |= seen.insert(f);
                }
                if new && corpus.len() < 4096 {
                    corpus.push(input);
                }
            }
            Err(failure) => fail(target, dirs, seed, iteration, input, failure),
        }
    }
    let report = Report {
        replayed,
        inputs,
        corpus: corpus.len(),
        features: seen.len(),
    };
    eprintln!(
        "fuzz {}: FUZZ_SEED={seed:#x}, {} files replayed, {} inputs in {:.1} s, corpus {}, {} features",
        target.name,
        report.replayed,
        report.inputs,
        start.elapsed().as_secs_f64(),
        report.corpus,
        report.features
    );
    report
}

fn fail(target: &Target, dirs: &Dirs, seed: u64, iteration: u64, input: Vec<u8>, f: Failure) -> ! {
    let (input, f) = shrink(target, input, f);
    let saved = save(&dirs.regressions, &input);
    let saved = match &saved {
        Ok(p) => format!(
            "saved to {} (replayed by every run from now on)",
            p.display()
        ),
        Err(e) => format!("could not be saved: {e}"),
    };
    panic!(
        "fuzz target `{name}` failed ({kind}):\n{message}\n\
         input ({len} bytes, shrunk), {saved}:\n{escaped}\n\
         seed: FUZZ_SEED={seed:#x}, iteration {iteration} (the same seed, corpus and \
         regressions give the same inputs: FUZZ_SEED={seed:#x} FUZZ_ITERS={next} \
         cargo test --test fuzz {name})",
        name = target.name,
        kind = f.kind,
        message = f.message,
        len = input.len(),
        escaped = escape(&input, 4000),
        next = iteration + 1,
    )
}

/// Write `input` to `dir/<hash>` and return the path.
pub fn save(dir: &Path, input: &[u8]) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!("{:016x}", fnv1a(input)));
    std::fs::write(&path, input)?;
    Ok(path)
}

/// The files of `dir` (none when it does not exist), sorted by name; `README*` files skipped.
pub fn read_dir(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .filter(|p| {
            !p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("README"))
        })
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p, bytes)
        })
        .collect()
}

// ---- running one input ----

thread_local! {
    /// Set while a target runs: the panic hook then records instead of printing.
    static QUIET: Cell<bool> = const { Cell::new(false) };
    static LAST_PANIC: RefCell<Option<(String, String)>> = const { RefCell::new(None) };
}

fn install_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if QUIET.with(Cell::get) {
                let at = info
                    .location()
                    .map_or_else(|| "?".to_owned(), |l| format!("{}:{}", l.file(), l.line()));
                let msg = if let Some(s) = info.payload().downcast_ref::<&str>() {
                    (*s).to_owned()
                } else if let Some(s) = info.payload().downcast_ref::<String>() {
                    s.clone()
                } else {
                    "(non-text panic payload)".to_owned()
                };
                LAST_PANIC.with(|p| *p.borrow_mut() = Some((at, msg)));
            } else {
                previous(info);
            }
        }));
    });
}

/// Inputs slower than this are failures (a superlinear path, or a hang in the making).
fn slow_limit() -> Duration {
    let ms = std::env::var("FUZZ_SLOW_MS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5000);
    Duration::from_millis(ms)
}

/// Run the check on one input under `catch_unwind`; its features, or the failure.
pub fn run_one(target: &Target, input: &[u8]) -> Result<Vec<u64>, Failure> {
    install_hook();
    let mut features = Features::default();
    let started = Instant::now();
    QUIET.with(|q| q.set(true));
    let result = panic::catch_unwind(AssertUnwindSafe(|| (target.check)(input, &mut features)));
    QUIET.with(|q| q.set(false));
    let elapsed = started.elapsed();
    match result {
        Ok(Ok(())) => {
            if elapsed > slow_limit() {
                // Confirm: a busy machine can stall any one run.
                let again = Instant::now();
                let _ = (target.check)(input, &mut Features::default());
                if again.elapsed() > slow_limit() {
                    return Err(Failure {
                        kind: "slow".into(),
                        message: format!("one input took {elapsed:?} (limit FUZZ_SLOW_MS)"),
                    });
                }
            }
            Ok(features.seen)
        }
        Ok(Err(message)) => Err(Failure {
            kind: message.split(':').next().unwrap_or("").trim().to_owned(),
            message,
        }),
        Err(payload) => {
            let (at, msg) = LAST_PANIC
                .with(|p| p.borrow_mut().take())
                .unwrap_or_else(|| {
                    let msg = payload
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_owned())
                        .or_else(|| payload.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    ("?".to_owned(), msg)
                });
            Err(Failure {
                kind: format!("panic at {at}"),
                message: format!("panicked at {at}: {msg}"),
            })
        }
    }
}

/// Greedy deletion of ranges (halves, quarters, ... single bytes) that keeps the same kind of
/// failure; bounded in attempts and time.
fn shrink(target: &Target, mut input: Vec<u8>, mut failure: Failure) -> (Vec<u8>, Failure) {
    let started = Instant::now();
    let mut attempts = 0;
    let mut size = input.len().div_ceil(2).max(1);
    while size >= 1 && !input.is_empty() {
        let mut at = 0;
        let mut progress = false;
        while at < input.len() {
            if attempts >= 20_000 || started.elapsed() > Duration::from_secs(20) {
                return (input, failure);
            }
            attempts += 1;
            let end = (at + size).min(input.len());
            let mut candidate = input[..at].to_vec();
            candidate.extend_from_slice(&input[end..]);
            match run_one(target, &candidate) {
                Err(f) if f.kind == failure.kind => {
                    input = candidate;
                    failure = f;
                    progress = true;
                }
                _ => at += size,
            }
        }
        if !progress {
            if size == 1 {
                break;
            }
            size = size.div_ceil(2);
        }
    }
    (input, failure)
}

// ---- mutation ----

/// A small, fast, deterministic generator (SplitMix64).
pub struct Rng(u64);

fn splitmix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        splitmix(self.0)
    }

    /// Uniform in `0..n` (`0` when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Bytes that often matter to a parser.
const INTERESTING_BYTES: &[u8] = b"\0\x01\x7f\x80\xbf\xc0\xef\xf0\xfe\xff\n\r\t \"\\:{}[],.-+eE0";

/// Number texts at the edges of what parsers accept.
const INTERESTING_NUMBERS: &[&[u8]] = &[
    b"0",
    b"-0",
    b"-1",
    b"1.5",
    b"-0.5",
    b"1e400",
    b"-1e400",
    b"1e-400",
    b"4294967296",
    b"9223372036854775807",
    b"-9223372036854775809",
    b"18446744073709551615",
    b"18446744073709551616",
    b"123456789012345678901234567890",
    b"1E3",
    b"01",
    b"1.",
    b".5",
    b"NaN",
    b"Infinity",
];

/// Apply one random mutation to `input`.
fn mutate(rng: &mut Rng, input: &mut Vec<u8>, corpus: &[Vec<u8>], target: &Target) {
    let len = input.len();
    let pos = rng.below(len + 1);
    match rng.below(15) {
        0 if len > 0 => {
            let i = rng.below(len);
            input[i] ^= 1 << rng.below(8);
        }
        1 if len > 0 => {
            let i = rng.below(len);
            input[i] = if rng.below(2) == 0 {
                *rng.pick(INTERESTING_BYTES)
            } else {
                rng.next() as u8
            };
        }
        2 => {
            let n = 1 + rng.below(4);
            for _ in 0..n {
                let b = if rng.below(2) == 0 {
                    *rng.pick(INTERESTING_BYTES)
                } else {
                    rng.next() as u8
                };
                input.insert(pos.min(input.len()), b);
            }
        }
        3 if len > 0 => {
            let at = rng.below(len);
            let most = if rng.below(4) == 0 { len } else { 16 };
            let n = 1 + rng.below((len - at).min(most));
            input.drain(at..at + n);
        }
        4 if len > 0 => {
            // Copy a range elsewhere.
            let at = rng.below(len);
            let n = 1 + rng.below((len - at).min(64));
            let piece = input[at..at + n].to_vec();
            let to = rng.below(input.len() + 1);
            input.splice(to..to, piece);
        }
        5 | 6 if !target.dictionary.is_empty() => {
            let token = rng.pick(target.dictionary);
            input.splice(pos..pos, token.iter().copied());
        }
        7 if !target.dictionary.is_empty() && len > 0 => {
            // Overwrite a range with a token.
            let token = rng.pick(target.dictionary);
            let at = rng.below(len);
            let end = (at + token.len()).min(len);
            input.splice(at..end, token.iter().copied());
        }
        8 => {
            // Splice with another corpus entry: our prefix, its suffix (or a piece of it).
            let other = rng.pick(corpus);
            if !other.is_empty() {
                let from = rng.below(other.len());
                if rng.below(2) == 0 {
                    input.truncate(pos);
                    input.extend_from_slice(&other[from..]);
                } else {
                    let n = 1 + rng.below((other.len() - from).min(256));
                    input.splice(pos..pos, other[from..from + n].iter().copied());
                }
            }
        }
        9 => {
            // Replace a run of digits (or insert) with an awkward number.
            let number = rng.pick(INTERESTING_NUMBERS);
            match (0..len)
                .map(|i| (pos + i) % len)
                .find(|&i| input[i].is_ascii_digit())
            {
                Some(start) => {
                    let end = (start..len)
                        .find(|&i| {
                            !matches!(input[i], b'0'..=b'9' | b'.' | b'e' | b'E' | b'-' | b'+')
                        })
                        .unwrap_or(len);
                    input.splice(start..end, number.iter().copied());
                }
                None => {
                    input.splice(pos..pos, number.iter().copied());
                }
            }
        }
        10 => {
            // Deep nesting: n openers here, n closers later.
            let n = *rng.pick(&[2usize, 8, 64, 126, 127, 128, 129, 300]);
            let (open, close) = if rng.below(2) == 0 {
                (b'[', b']')
            } else {
                (b'{', b'}')
            };
            let opener: Vec<u8> = if open == b'{' {
                b"{\"a\":".repeat(n)
            } else {
                vec![open; n]
            };
            let end = pos + rng.below(len - pos + 1);
            input.splice(end..end, std::iter::repeat_n(close, n));
            input.splice(pos..pos, opener);
        }
        11 if len > 0 => input.truncate(rng.below(len)),
        12 if len > 0 => {
            // Repeat a range (long lines, long values).
            let at = rng.below(len);
            let n = 1 + rng.below((len - at).min(32));
            let most = if rng.below(8) == 0 { 1000 } else { 16 };
            let times = 1 + rng.below(most);
            let piece = input[at..at + n].repeat(times);
            input.splice(at..at, piece);
        }
        13 if len > 1 => {
            // Swap two bytes (reorders tokens, moves line ends).
            let (a, b) = (rng.below(len), rng.below(len));
            input.swap(a, b);
        }
        _ => {
            // Whole-input change: a token appended, or an entry of the corpus concatenated.
            if rng.below(2) == 0 && !target.dictionary.is_empty() {
                let token = *rng.pick(target.dictionary);
                input.extend_from_slice(token);
            } else {
                let other = rng.pick(corpus).clone();
                input.extend_from_slice(&other);
            }
        }
    }
    input.truncate(target.max_len);
}

// ---- helpers ----

/// FNV-1a, 64-bit: names regression files and features.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xCBF2_9CE4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    h
}

/// `input` as a Rust byte-string body (printable ASCII kept, the rest escaped), at most
/// `max` bytes of it.
pub fn escape(input: &[u8], max: usize) -> String {
    let mut s = String::from("b\"");
    for b in input.iter().take(max) {
        match b {
            b'"' => s.push_str("\\\""),
            b'\\' => s.push_str("\\\\"),
            b'\n' => s.push_str("\\n"),
            b'\r' => s.push_str("\\r"),
            b'\t' => s.push_str("\\t"),
            0x20..=0x7e => s.push(char::from(*b)),
            _ => {
                let _ = write!(s, "\\x{b:02x}");
            }
        }
    }
    s.push('"');
    if input.len() > max {
        let _ = write!(s, " ... ({} more bytes)", input.len() - max);
    }
    s
}
