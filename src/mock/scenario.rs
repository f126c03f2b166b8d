//! Deterministic scripts for the mock agent, picked by the user's message text.
//!
//! The text may contain `scenario:NAME` and `key=value` options, e.g.
//! `scenario:slow tokens=50 delay_ms=20` or `scenario:text framing=crlf bom=1`. Pure: a script
//! is a list of [`Step`]s that the server module plays over HTTP.

use std::collections::HashMap;

use serde_json::{json, Value};

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

/// A whole answer: either an HTTP error, or a stream of steps.
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

    fn num(&self, key: &str, default: u64) -> u64 {
        self.kv
            .get(key)
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    }

    fn flag(&self, key: &str) -> bool {
        self.kv.get(key).is_some_and(|v| v == "1" || v == "true")
    }
}

/// Builds AgentFlow events with consistent ids and backend seqs, framed as configured.
struct Writer {
    steps: Vec<Step>,
    seq: u64,
    root: String,
    eol: &'static str,
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
        let mut steps = Vec::new();
        if o.flag("bom") {
            steps.push(Step::Send(vec![0xEF, 0xBB, 0xBF]));
        }
        Writer {
            steps,
            seq: 0,
            root: format!("call_{run_tag}"),
            eol,
            upper: o.flag("upper"),
            event_lines: o.flag("event_lines"),
            delay_ms: o.num("delay_ms", 2),
        }
    }

    fn raw(&mut self, s: &str) {
        self.steps
            .push(Step::Send(s.replace('\n', self.eol).into_bytes()));
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
        let mut frame = format!("id: {}\n", self.seq);
        if self.event_lines {
            frame.push_str(&format!("event: {kind}\n"));
        }
        frame.push_str(&format!("data: {payload}\n\n"));
        self.raw(&frame);
        if self.delay_ms > 0 {
            self.steps.push(Step::Sleep(self.delay_ms));
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

/// Build the script for one request. `turn` counts runs in this conversation (1 for the first).
pub fn script(message: &str, turn: u64, run_tag: &str) -> Script {
    let o = Options::parse(message);
    let mut w = Writer::new(&o, run_tag);
    match o.scenario.as_str() {
        "status" => {
            let code = o.num("code", 500).clamp(400, 599) as u16;
            return Script::Status(
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
            w.steps.push(Step::Hang(o.num("hang_ms", 600_000)));
        }
        "drop" => {
            w.start();
            w.text("This answer will be cut", false);
            w.steps.push(Step::Drop);
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
        _ => {
            w.start();
            let answer = text_answer(message, turn);
            w.text(&answer, false);
            w.end(&answer);
        }
    }
    Script::Stream(w.steps)
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
