//! Deterministic scenarios for the mock agent, picked by the user's message text.
//!
//! The text may contain `scenario:NAME` and `key=value` options, e.g.
//! `scenario:slow tokens=50 delay_ms=20` or `scenario:text framing=crlf bom=1`. Pure.
//!
//! A scenario is one [`Timeline`] of [`Beat`]s: AgentFlow events (as an AgentFlow backend sends
//! them) with the pauses between them, plus a few beats meant for one dialect only (chunk types
//! newer than AI SDK v5 for `ui-message`, snapshot rewrites for `poll`). [`plan`] builds it for
//! a dialect; [`Timeline::agentflow_steps`] frames it as the AgentFlow SSE stream ([`script`]
//! does both), and `super::translate` turns the same timeline into the UI-message stream and
//! the poll dialect's snapshots, so every dialect carries the same content.
//!
//! | scenario | what happens |
//! |---|---|
//! | `text` (default) | the answer [`text_answer`], word by word |
//! | `reasoning` | reasoning, then the text answer |
//! | `tools` | text, a `search` tool call with progress and a result, an artifact, text |
//! | `error` | some text, then a root `error` |
//! | `hang` | some text, then silence (`hang_ms`); poll: stays `in_progress` |
//! | `drop` | some text, then the connection is cut; poll: the run is lost (404) |
//! | `malformed` | a broken `data:` line mid-stream (AgentFlow and ui-message; poll plays `text`) |
//! | `slow`, `long` | `tokens` at `rate`/s or `delay_ms`; `events` deltas with no pause |
//! | `oversize` | one `bytes`-long delta (poll plays `text`) |
//! | `status` | the request is refused with `code` |
//! | `rich` | text, a URL source, a source document, a file, a `data-weather` part sent twice (same id), a transient `data-ping`, text |
//! | `future` | the text answer plus chunk types and keys newer than AI SDK v5 (ui-message only; the others play `text`) |
//! | `rewrite` | poll: the text grows, then is rewritten ([`REWRITE_ANSWER`]); the others stream the final text |
//!
//! Options: `framing=crlf|cr`, `bom=1`, `upper=1` (legacy `DELTA` events with a `delta` field),
//! `event_lines=1` (AgentFlow `event:` lines), `delay_ms=N` (pause after each event; 2 by
//! default, 100 for `slow`, 0 for `long`, 150 for `rewrite`), and per scenario `tokens`, `rate`,
//! `events`, `bytes`, `hang_ms`, `code`. The poll dialect's own options (`update_ms`,
//! `throttle`, `poll_delay_ms`, `lose_after_ms`) are read by `super::invoke`.

use std::collections::HashMap;

use serde_json::{json, Value};

use super::Dialect;

/// One thing the mock backend does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Write these bytes.
    Send(Vec<u8>),
    /// Wait this many milliseconds.
    Sleep(u64),
    /// Stay silent until the client goes away (at most this many milliseconds).
    Hang(u64),
    /// Cut the connection without finishing the response.
    Drop,
}

/// One beat of a scenario's timeline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Beat {
    /// An AgentFlow event: the JSON payload exactly as an AgentFlow backend sends it.
    Event(Value),
    /// Raw SSE text (`\n` line ends) that the streaming dialects send as is: a broken frame.
    Raw(String),
    /// Wait this many milliseconds.
    Sleep(u64),
    /// Stay silent (streams) or never finish (poll), for at most this many milliseconds.
    Hang(u64),
    /// Cut the connection (streams) or lose the run (poll).
    Drop,
    /// `ui-message` only: send this chunk as is (chunk types a v5 client does not know).
    UiChunk(Value),
    /// `ui-message` only: add these keys to the next chunk sent (unknown keys on known chunks).
    UiExtra(Value),
    /// `poll` only: the open text part now reads this, which may rewrite rather than append.
    PollText(String),
}

/// A scenario's timeline, with the framing options of its streams.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Timeline {
    /// What happens, in order.
    pub beats: Vec<Beat>,
    /// Line end of the SSE framing (`\n`, `\r\n` or `\r`).
    pub eol: &'static str,
    /// Start the stream with a UTF-8 byte order mark.
    pub bom: bool,
    /// AgentFlow framing: add `event: <type>` lines.
    pub event_lines: bool,
    /// The pause after each event, in milliseconds.
    pub delay_ms: u64,
}

impl Timeline {
    /// The AgentFlow SSE stream of this timeline (each event with `id: <seq>`); beats meant
    /// for other dialects are skipped.
    pub fn agentflow_steps(&self) -> Vec<Step> {
        let mut steps = Vec::with_capacity(self.beats.len() + 1);
        if self.bom {
            steps.push(Step::Send(BOM.to_vec()));
        }
        steps.extend(self.agentflow_frames().into_iter().map(|(_, step)| step));
        steps
    }

    /// [`Timeline::agentflow_steps`] without the byte order mark, each step with the SSE id of
    /// the event it sends (the event's `seq`; `None` for other steps), so that a stream can be
    /// played again from a `Last-Event-ID`.
    pub fn agentflow_frames(&self) -> Vec<(Option<u64>, Step)> {
        let mut frames = Vec::with_capacity(self.beats.len());
        for beat in &self.beats {
            match beat {
                Beat::Event(payload) => {
                    let mut frame = format!("id: {}\n", payload["seq"]);
                    if self.event_lines {
                        let kind = payload["type"].as_str().unwrap_or("message");
                        frame.push_str(&format!("event: {kind}\n"));
                    }
                    frame.push_str(&format!("data: {payload}\n\n"));
                    frames.push((payload["seq"].as_u64(), self.send(&frame)));
                }
                Beat::Raw(text) => frames.push((None, self.send(text))),
                Beat::Sleep(ms) => frames.push((None, Step::Sleep(*ms))),
                Beat::Hang(ms) => frames.push((None, Step::Hang(*ms))),
                Beat::Drop => frames.push((None, Step::Drop)),
                Beat::UiChunk(_) | Beat::UiExtra(_) | Beat::PollText(_) => {}
            }
        }
        frames
    }

    /// `text` (with `\n` line ends) re-framed with this timeline's line end.
    pub fn send(&self, text: &str) -> Step {
        if self.eol == "\n" {
            Step::Send(text.as_bytes().to_vec())
        } else {
            Step::Send(text.replace('\n', self.eol).into_bytes())
        }
    }
}

/// The UTF-8 byte order mark (`bom=1`).
pub const BOM: [u8; 3] = [0xEF, 0xBB, 0xBF];

/// A scenario for one dialect: either an HTTP error, or a timeline to play.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Answer with this status and JSON body.
    Status(u16, Value),
    /// Play this timeline.
    Play(Timeline),
}

/// A whole AgentFlow answer: either an HTTP error, or a stream of steps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Script {
    /// Answer with this status and JSON body.
    Status(u16, Value),
    /// Answer 200 `text/event-stream` and play the steps.
    Stream(Vec<Step>),
}

/// Every scenario name, for help texts.
pub const SCENARIOS: &[&str] = &[
    "text",
    "reasoning",
    "tools",
    "error",
    "hang",
    "drop",
    "malformed",
    "slow",
    "long",
    "oversize",
    "status",
    "rich",
    "future",
    "rewrite",
];

/// Options parsed from the message text.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Scenario name (`text` when absent).
    pub scenario: String,
    /// `key=value` words.
    pub kv: HashMap<String, String>,
}

impl Options {
    /// Parse `scenario:NAME` and `key=value` words from a message.
    pub fn parse(text: &str) -> Options {
        let mut o = Options {
            scenario: "text".into(),
            kv: HashMap::new(),
        };
        for word in text.split_whitespace() {
            let word = word.trim_matches(|c: char| c == ',' || c == '.');
            if let Some(name) = word.strip_prefix("scenario:") {
                o.scenario = name.to_ascii_lowercase();
            } else if let Some((k, v)) = word.split_once('=') {
                o.kv.insert(k.to_ascii_lowercase(), v.to_string());
            }
        }
        o
    }

    /// A numeric option, or `default`.
    pub fn num(&self, key: &str, default: u64) -> u64 {
        self.kv
            .get(key)
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    }

    fn flag(&self, key: &str) -> bool {
        self.kv.get(key).is_some_and(|v| v == "1" || v == "true")
    }
}

/// Builds AgentFlow events with consistent ids and backend seqs, and the pauses between them.
struct Writer {
    beats: Vec<Beat>,
    seq: u64,
    root: String,
    eol: &'static str,
    bom: bool,
    upper: bool,
    event_lines: bool,
    delay_ms: u64,
}

impl Writer {
    fn new(o: &Options, run_tag: &str) -> Writer {
        let eol = match o.kv.get("framing").map(String::as_str) {
            Some("crlf") => "\r\n",
            Some("cr") => "\r",
            _ => "\n",
        };
        Writer {
            beats: Vec::new(),
            seq: 0,
            root: format!("call_{run_tag}"),
            eol,
            bom: o.flag("bom"),
            upper: o.flag("upper"),
            event_lines: o.flag("event_lines"),
            delay_ms: o.num("delay_ms", 2),
        }
    }

    fn timeline(self) -> Timeline {
        Timeline {
            beats: self.beats,
            eol: self.eol,
            bom: self.bom,
            event_lines: self.event_lines,
            delay_ms: self.delay_ms,
        }
    }

    fn raw(&mut self, s: &str) {
        self.beats.push(Beat::Raw(s.to_string()));
    }

    fn event(&mut self, kind: &str, call: Option<&str>, content: Value, metadata: Value) {
        self.seq += 1;
        let call_id = call.unwrap_or(&self.root).to_string();
        let parent = call.map(|_| self.root.clone());
        let kind = if self.upper {
            kind.to_ascii_uppercase()
        } else {
            kind.to_string()
        };
        let mut payload = json!({
            "type": kind,
            "call_id": call_id,
            "parent_call_id": parent,
            "root_call_id": self.root,
            "content": content,
            "timestamp": 1_700_000_000_000u64 + self.seq,
            "seq": self.seq,
            "metadata": metadata,
        });
        if self.upper && kind == "DELTA" {
            // Older backends: the text is in `delta`.
            let text = payload["content"].take();
            payload["delta"] = text;
        }
        self.beats.push(Beat::Event(payload));
        if self.delay_ms > 0 {
            self.beats.push(Beat::Sleep(self.delay_ms));
        }
    }

    fn start(&mut self) {
        self.event("start", None, json!({"name": "mock-agent"}), json!({}));
    }

    fn text(&mut self, text: &str, reasoning: bool) {
        let meta = if reasoning {
            json!({"reasoning": true, "content_type": "reasoning"})
        } else {
            json!({})
        };
        for piece in split_words(text) {
            self.event("delta", None, json!(piece), meta.clone());
        }
    }

    fn end(&mut self, response: &str) {
        self.event("end", None, json!({"response": response}), json!({}));
    }
}

/// Split text into word-sized pieces that concatenate back to it.
pub fn split_words(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for ch in text.chars() {
        cur.push(ch);
        if ch == ' ' {
            out.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// The plain answer of the `text` scenario, so tests can predict it.
pub fn text_answer(message: &str, turn: u64) -> String {
    format!("Hello! You said: {message} (turn {turn}).")
}

/// A 1×1 PNG as a `data:` URL (the `rich` scenario's file).
pub const TINY_PNG: &str = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==";

/// The final text of the `rewrite` scenario (the poll dialect shows it growing, then rewritten).
pub const REWRITE_ANSWER: &str = "The answer is four.";

/// The scenario a dialect actually plays: `future` is for `ui-message` only, and `malformed`,
/// `oversize` (broken or oversized SSE) make no sense for the poll dialect; those play `text`.
pub fn effective_scenario(name: &str, dialect: Dialect) -> &str {
    match (name, dialect) {
        ("future", Dialect::AgentFlow | Dialect::Poll) => "text",
        ("malformed" | "oversize", Dialect::Poll) => "text",
        (name, _) => name,
    }
}

/// Build the AgentFlow answer to one request. `turn` counts runs in this conversation (1 for
/// the first).
pub fn script(message: &str, turn: u64, run_tag: &str) -> Script {
    match plan(message, turn, run_tag, Dialect::AgentFlow) {
        Plan::Status(code, body) => Script::Status(code, body),
        Plan::Play(t) => Script::Stream(t.agentflow_steps()),
    }
}

/// Build the timeline of one request for `dialect`. `turn` counts runs in this conversation (1
/// for the first); `run_tag` names the root call (`call_<run_tag>`).
pub fn plan(message: &str, turn: u64, run_tag: &str, dialect: Dialect) -> Plan {
    let o = Options::parse(message);
    let mut w = Writer::new(&o, run_tag);
    match effective_scenario(&o.scenario, dialect) {
        "status" => {
            let code = o.num("code", 500).clamp(400, 599) as u16;
            return Plan::Status(
                code,
                json!({"error": {"message": format!("mock agent refused with {code}")}}),
            );
        }
        "reasoning" => {
            w.start();
            w.text("Let me think about this step by step.", true);
            let answer = text_answer(message, turn);
            w.text(&answer, false);
            w.end(&answer);
        }
        "tools" => {
            w.start();
            w.text("Let me look that up. ", false);
            let tool = "call_tool_1";
            w.event(
                "start",
                Some(tool),
                json!({"tool_name": "search", "input": {"query": "weather in Paris"}}),
                json!({"display_name": "Search"}),
            );
            w.event(
                "tool_progress",
                Some(tool),
                json!({"message": "searching", "progress": 0.5}),
                json!({}),
            );
            w.event("tool_result_delta", Some(tool), json!("sunny"), json!({}));
            w.event(
                "end",
                Some(tool),
                json!({"output": {"forecast": "sunny", "celsius": 21}}),
                json!({}),
            );
            w.event(
                "artifact_started",
                Some(tool),
                json!({"artifact_id": "art_1", "title": "Forecast report"}),
                json!({}),
            );
            w.event(
                "artifact_progress",
                Some(tool),
                json!({"artifact_id": "art_1", "progress": 0.5}),
                json!({}),
            );
            w.event(
                "artifact_completed",
                Some(tool),
                json!({"artifact_id": "art_1", "title": "Forecast report", "url": "https://example.com/a/1"}),
                json!({}),
            );
            w.text("It is sunny in Paris.", false);
            w.end("Let me look that up. It is sunny in Paris.");
        }
        "error" => {
            w.start();
            w.text("I will try. ", false);
            w.event(
                "error",
                None,
                json!({"message": "simulated agent failure: no provider key"}),
                json!({}),
            );
        }
        "hang" => {
            w.start();
            w.text("Thinking", false);
            w.beats.push(Beat::Hang(o.num("hang_ms", 600_000)));
        }
        "drop" => {
            w.start();
            w.text("This answer will be cut", false);
            w.beats.push(Beat::Drop);
        }
        "malformed" => {
            w.start();
            w.text("Fine so far. ", false);
            w.raw("data: {this is not json\n\n");
            w.text("never stored", false);
            w.end("never stored");
        }
        "slow" => {
            let tokens = o.num("tokens", 20);
            let delay = match o.kv.get("rate").and_then(|r| r.parse::<u64>().ok()) {
                Some(rate) if rate > 0 => 1000 / rate,
                _ => o.num("delay_ms", 100),
            };
            w.delay_ms = delay;
            w.start();
            let mut answer = String::new();
            for i in 0..tokens {
                let piece = format!("token{i} ");
                answer.push_str(&piece);
                w.event("delta", None, json!(piece), json!({}));
            }
            w.end(&answer);
        }
        "long" => {
            let n = o.num("events", 5000);
            w.delay_ms = o.num("delay_ms", 0);
            w.start();
            let mut answer = String::new();
            for i in 0..n {
                let piece = format!("w{i} ");
                answer.push_str(&piece);
                w.event("delta", None, json!(piece), json!({}));
            }
            w.end(&answer);
        }
        "oversize" => {
            w.start();
            let big = "x".repeat(o.num("bytes", 2 * 1024 * 1024) as usize);
            w.event("delta", None, json!(big), json!({}));
            w.end("too big");
        }
        "rich" => rich(&mut w),
        "future" => {
            w.start();
            w.beats.push(Beat::UiChunk(json!({"type": "reset-step"})));
            w.beats
                .push(Beat::UiChunk(json!({"type": "custom", "kind": "x.y"})));
            let answer = text_answer(message, turn);
            for (i, piece) in split_words(&answer).into_iter().enumerate() {
                if i == 1 {
                    // A key this chunk type will only have in a later SDK version.
                    w.beats
                        .push(Beat::UiExtra(json!({"futureField": {"since": "v7"}})));
                }
                w.event("delta", None, json!(piece), json!({}));
            }
            w.beats.push(Beat::UiChunk(json!({
                "type": "tool-approval-request",
                "approvalId": "approval_1",
                "toolCallId": "call_future_1",
            })));
            w.beats.push(Beat::UiChunk(json!({
                "type": "reasoning-file",
                "url": TINY_PNG,
                "mediaType": "image/png",
            })));
            w.end(&answer);
        }
        "rewrite" => {
            w.delay_ms = o.num("delay_ms", 150);
            w.start();
            if dialect == Dialect::Poll {
                for text in [
                    "The answer",
                    "The answer is",
                    "The answer is 4",
                    REWRITE_ANSWER,
                ] {
                    w.beats.push(Beat::PollText(text.into()));
                    w.beats.push(Beat::Sleep(w.delay_ms));
                }
            } else {
                w.text(REWRITE_ANSWER, false);
            }
            w.end(REWRITE_ANSWER);
        }
        _ => {
            w.start();
            let answer = text_answer(message, turn);
            w.text(&answer, false);
            w.end(&answer);
        }
    }
    Plan::Play(w.timeline())
}

/// The `rich` scenario: text, sources, a file, data parts (one replaced, one transient), text.
fn rich(w: &mut Writer) {
    w.start();
    let first = "Here is what I found about Paris. ";
    let second = "It is sunny and 21 degrees.";
    w.text(first, false);
    w.event(
        "source",
        None,
        json!({"source_type": "url", "source_id": "src_1", "url": "https://example.com/paris",
               "title": "Paris weather"}),
        json!({}),
    );
    w.event(
        "source",
        None,
        json!({"source_type": "document", "source_id": "src_2", "media_type": "application/pdf",
               "title": "Paris travel guide", "filename": "paris.pdf"}),
        json!({}),
    );
    w.event(
        "file",
        None,
        json!({"url": TINY_PNG, "media_type": "image/png"}),
        json!({}),
    );
    w.event(
        "data",
        None,
        json!({"name": "weather", "id": "weather_1",
               "data": {"city": "Paris", "status": "loading"}}),
        json!({}),
    );
    w.event(
        "data",
        None,
        json!({"name": "ping", "data": {"n": 1}, "transient": true}),
        json!({}),
    );
    w.event(
        "data",
        None,
        json!({"name": "weather", "id": "weather_1",
               "data": {"city": "Paris", "status": "done", "celsius": 21}}),
        json!({}),
    );
    w.text(second, false);
    w.end(&format!("{first}{second}"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse_scenario_and_values() {
        let o = Options::parse("please scenario:Slow tokens=5, delay_ms=1");
        assert_eq!(o.scenario, "slow");
        assert_eq!(o.num("tokens", 0), 5);
        assert_eq!(o.num("delay_ms", 0), 1);
        assert_eq!(Options::parse("hi").scenario, "text");
    }

    #[test]
    fn split_words_round_trips() {
        for s in ["", "a", "a b  c ", "héllo wörld"] {
            assert_eq!(split_words(s).concat(), s);
        }
    }

    #[test]
    fn scripts_are_deterministic_and_framed() {
        assert_eq!(script("hi", 1, "r"), script("hi", 1, "r"));
        let Script::Stream(steps) = script("scenario:text framing=crlf bom=1", 1, "r") else {
            panic!("stream expected");
        };
        assert_eq!(steps[0], Step::Send(vec![0xEF, 0xBB, 0xBF]));
        let Step::Send(first) = &steps[1] else {
            panic!()
        };
        assert!(String::from_utf8_lossy(first).contains("\r\n\r\n"));
        assert!(matches!(
            script("scenario:status code=503", 1, "r"),
            Script::Status(503, _)
        ));
    }
}
