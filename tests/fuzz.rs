//! Fuzzing of every parser that reads bytes from the network, on the stable toolchain (see
//! `fuzz/README.md`): the SSE decoder, the AgentFlow payload reader, the UI-message chunk
//! mapper, the poll snapshot reader and diff, the JWT header and claims, and the JWKS reader.
//!
//! Each test replays the target's `fuzz/regressions/` and `fuzz/corpus/` files, then fuzzes it
//! for `FUZZ_SECONDS` (default 2). `make fuzz` runs them longer, in release mode.
//! `FUZZ_SEED` fixes the seed (printed with `--nocapture`, and in every failure);
//! `FUZZ_ITERS` fixes the number of inputs instead of the time.

#[path = "fuzz/agentflow.rs"]
mod agentflow;
#[path = "fuzz/engine.rs"]
mod engine;
#[path = "fuzz/gen.rs"]
mod gen;
#[path = "fuzz/jwt.rs"]
mod jwt;
#[path = "fuzz/poll.rs"]
mod poll;
#[path = "fuzz/sse.rs"]
mod sse;
#[path = "fuzz/ui_message.rs"]
mod ui_message;

use engine::{Budget, Dirs, Features, Target};

fn fuzz(target: &Target) {
    let report = engine::fuzz(target, &Dirs::of(target.name), &Budget::from_env());
    assert!(report.replayed > 0, "no corpus for `{}`", target.name);
}

#[test]
fn sse_decoder() {
    fuzz(&sse::TARGET);
}

#[test]
fn agentflow_payloads() {
    fuzz(&agentflow::TARGET);
}

#[test]
fn ui_message_chunks() {
    fuzz(&ui_message::TARGET);
}

#[test]
fn poll_snapshots() {
    fuzz(&poll::TARGET);
}

#[test]
fn jwt_tokens() {
    fuzz(&jwt::TARGET);
}

#[test]
fn jwks_documents() {
    fuzz(&jwt::JWKS);
}

// ---- the engine itself ----

/// A parser with a planted bug: it panics on `{"a":[` followed, somewhere, by `:::`, and
/// breaks a property (returns an error) on inputs longer than 300 bytes that start with `!`.
fn planted(input: &[u8], features: &mut Features) -> Result<(), String> {
    if let Some(i) = input.windows(6).position(|w| w == br#"{"a":["#) {
        features.add("opened");
        if input[i..].windows(3).any(|w| w == b":::") {
            let v: Vec<u8> = Vec::new();
            let _ = v[input.len()]; // index out of bounds
        }
    }
    if input.first() == Some(&b'!') && input.len() > 300 {
        return Err(format!("too-long: {} bytes", input.len()));
    }
    Ok(())
}

fn scratch_dirs(name: &str) -> Dirs {
    let root = std::env::temp_dir().join(format!(
        "sluice-fuzz-selftest-{}-{name}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&root);
    let dirs = Dirs {
        corpus: root.join("corpus"),
        regressions: root.join("regressions"),
    };
    std::fs::create_dir_all(&dirs.corpus).unwrap();
    std::fs::write(dirs.corpus.join("seed"), b"hello").unwrap();
    dirs
}

/// The engine finds a planted panic through its dictionary and splices, shrinks it, saves it,
/// and the saved file then fails the replay even with no time to fuzz.
#[test]
fn engine_finds_saves_and_replays_a_planted_panic() {
    const PLANTED: Target = Target {
        name: "planted",
        check: planted,
        dictionary: &[b"{\"a\":[", b":", b"x"],
        max_len: 512,
        must_see: &[],
    };
    let dirs = scratch_dirs("panic");
    let budget = Budget {
        seed: 7,
        time: std::time::Duration::from_secs(60),
        iters: Some(200_000),
    };
    let failure = std::panic::catch_unwind(|| engine::fuzz(&PLANTED, &dirs, &budget))
        .expect_err("the planted panic was not found");
    let message = failure
        .downcast_ref::<String>()
        .expect("a formatted failure message");
    assert!(message.contains("panicked at tests/fuzz.rs"), "{message}");
    assert!(message.contains("FUZZ_SEED=0x7"), "{message}");
    let saved = engine::read_dir(&dirs.regressions);
    assert_eq!(saved.len(), 1, "{message}");
    let (_, input) = &saved[0];
    // Shrunk to the essentials: the opener and the colons.
    assert_eq!(
        input.as_slice(),
        br#"{"a":[:::"#,
        "{}",
        engine::escape(input, 100)
    );
    // Replayed first, before any fuzzing.
    let replay = Budget {
        seed: 1,
        time: std::time::Duration::ZERO,
        iters: Some(0),
    };
    let failure = std::panic::catch_unwind(|| engine::fuzz(&PLANTED, &dirs, &replay))
        .expect_err("the saved regression did not fail the replay");
    let message = failure.downcast_ref::<String>().unwrap();
    assert!(message.contains("regression file"), "{message}");
    let _ = std::fs::remove_dir_all(dirs.corpus.parent().unwrap());
}

/// A property violation (an `Err`, not a panic) fails too, and the same seed finds the same
/// input at the same iteration.
#[test]
fn engine_reports_property_violations_deterministically() {
    const PLANTED: Target = Target {
        name: "planted",
        check: planted,
        dictionary: &[b"!", b"0123456789"],
        max_len: 1024,
        must_see: &[],
    };
    let run = || {
        let dirs = scratch_dirs("property");
        let budget = Budget {
            seed: 42,
            time: std::time::Duration::from_secs(60),
            iters: Some(200_000),
        };
        let failure = std::panic::catch_unwind(|| engine::fuzz(&PLANTED, &dirs, &budget))
            .expect_err("the planted violation was not found");
        let message = failure.downcast_ref::<String>().unwrap().clone();
        let _ = std::fs::remove_dir_all(dirs.corpus.parent().unwrap());
        message
    };
    let first = run();
    assert!(first.contains("failed (too-long)"), "{first}");
    // Shrunk to the smallest failing length.
    assert!(first.contains("input (301 bytes, shrunk)"), "{first}");
    assert_eq!(run(), first);
}

/// A target whose corpus no longer reaches what it tests fails.
#[test]
fn engine_requires_the_corpus_to_show_its_features() {
    const BLIND: Target = Target {
        name: "blind",
        check: planted,
        dictionary: &[],
        max_len: 64,
        must_see: &["opened"],
    };
    let dirs = scratch_dirs("blind");
    let budget = Budget {
        seed: 1,
        time: std::time::Duration::ZERO,
        iters: Some(0),
    };
    let failure = std::panic::catch_unwind(|| engine::fuzz(&BLIND, &dirs, &budget))
        .expect_err("a corpus without the feature passed");
    let message = failure.downcast_ref::<String>().unwrap();
    assert!(message.contains("never shows [\"opened\"]"), "{message}");
    std::fs::write(dirs.corpus.join("opener"), br#"{"a":["#).unwrap();
    engine::fuzz(&BLIND, &dirs, &budget);
    let _ = std::fs::remove_dir_all(dirs.corpus.parent().unwrap());
}
