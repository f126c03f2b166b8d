//! Reading a backend's conversation snapshot (pure: no I/O).
//!
//! A snapshot is the `getConversation` answer: `{streamStatus, messages: [UIMessage…], …}`.
//! [`parse_snapshot`] checks its shape, [`backend_state`] reads its `streamStatus` (and error
//! text), [`closing`] says how a terminal state ends the run. [`our_user_message`] finds the
//! run's own user message among the thread's messages and [`our_message`] the assistant message
//! answering it, which is the only message the adapter diffs.

use serde_json::Value;

use super::super::events::Events;
use super::super::Ending;
use crate::store::RunStatus;

/// The run's state according to a snapshot's `streamStatus`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendState {
    /// `in_progress`, or a status we do not know.
    Running,
    /// `completed`.
    Completed,
    /// `error`, with the snapshot's error text (or a default).
    Error(String),
    /// `stopped`, with a message.
    Stopped(String),
    /// `timeout`, with a message.
    Timeout(String),
}

/// Whether a body is a conversation snapshot: a JSON object with a string `streamStatus` (and
/// `messages`, when present, an array).
pub fn parse_snapshot(body: &[u8]) -> Result<Value, String> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| format!("the snapshot is not JSON: {e}"))?;
    if !v.get("streamStatus").is_some_and(Value::is_string) {
        return Err("the snapshot has no streamStatus".into());
    }
    if v.get("messages").is_some_and(|m| !m.is_array()) {
        return Err("the snapshot's messages are not an array".into());
    }
    Ok(v)
}

/// The error text a snapshot carries (`errorText`, `error` as text or `{message}`).
fn snapshot_error(snapshot: &Value) -> Option<String> {
    let pick = snapshot
        .get("errorText")
        .or_else(|| snapshot.pointer("/error/message"))
        .or_else(|| snapshot.get("error"))?;
    pick.as_str()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// The run's state in a snapshot.
pub fn backend_state(snapshot: &Value) -> BackendState {
    let status = snapshot.get("streamStatus").and_then(Value::as_str);
    let text = |default: &str| snapshot_error(snapshot).unwrap_or_else(|| default.to_owned());
    match status {
        Some("completed") => BackendState::Completed,
        Some("error") => BackendState::Error(text("the agent backend reported an error")),
        Some("stopped") => BackendState::Stopped(text("the agent backend stopped the run")),
        Some("timeout") => BackendState::Timeout(text("the agent backend timed out the run")),
        _ => BackendState::Running,
    }
}

/// How a terminal state closes the run (with the closing event the supervisor logs together
/// with the status, after the diff's events). `None` while the run is in progress.
pub fn closing(events: &Events, state: &BackendState) -> Option<Ending> {
    match state {
        BackendState::Running => None,
        BackendState::Completed => Some(Ending::Completed(events.end())),
        BackendState::Error(t) => Some(Ending::AgentError(t.clone(), events.error(t))),
        BackendState::Stopped(t) => Some(Ending::Backend(RunStatus::Stopped, t.clone())),
        BackendState::Timeout(t) => Some(Ending::Backend(RunStatus::Timeout, t.clone())),
    }
}

fn role(m: &Value) -> Option<&str> {
    m.get("role").and_then(Value::as_str)
}

/// The text parts of a message, joined.
fn text_of(m: &Value) -> String {
    m.get("parts")
        .and_then(Value::as_array)
        .map(|parts| {
            parts
                .iter()
                .filter(|p| p.get("type").and_then(Value::as_str) == Some("text"))
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
}

/// Where the run's user message `ours` is in a snapshot: the last user message with its `id`;
/// or, for a backend that renames messages, the last user message if it has the same text.
/// Never an earlier turn's message: until the backend shows the run's own message (its first
/// snapshots may still be the previous turn's), the answer is `None`.
pub fn our_user_message(messages: &[Value], ours: &Value) -> Option<usize> {
    let is_user = |m: &Value| role(m) == Some("user");
    let id = ours.get("id").and_then(Value::as_str);
    let by_id = id.and_then(|id| {
        messages
            .iter()
            .rposition(|m| is_user(m) && m.get("id").and_then(Value::as_str) == Some(id))
    });
    by_id.or_else(|| {
        let last = messages.iter().rposition(is_user)?;
        (text_of(&messages[last]) == text_of(ours)).then_some(last)
    })
}

/// Which of a snapshot's messages answers the run: the first assistant message after the run's
/// user message ([`our_user_message`]) and before the next user message.
pub fn our_message(messages: &[Value], ours: &Value) -> Option<usize> {
    let after = our_user_message(messages, ours)?;
    messages[after + 1..]
        .iter()
        .take_while(|m| role(m) != Some("user"))
        .position(|m| role(m) == Some("assistant"))
        .map(|i| after + 1 + i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn json_of(e: &crate::event::NewEvent) -> Value {
        serde_json::from_slice(&e.data).expect("events are JSON")
    }

    #[test]
    fn our_message_follows_the_runs_user_message() {
        let user = |id: &str, text: &str| json!({"id": id, "role": "user", "parts": [{"type": "text", "text": text}]});
        let ms = json!([
            user("u0", "hi"), {"id": "a0", "role": "assistant"},
            user("u1", "again"), {"id": "s", "role": "system"},
            {"id": "a1", "role": "assistant"}, {"id": "a1b", "role": "assistant"},
            user("u2", "third"),
        ]);
        let ms = ms.as_array().unwrap();
        assert_eq!(our_message(ms, &user("u0", "hi")), Some(1));
        assert_eq!(our_message(ms, &user("u1", "again")), Some(4));
        // The run's own message has no answer yet: not the next turn's.
        assert_eq!(our_message(ms, &user("u2", "third")), None);
        assert_eq!(our_user_message(ms, &user("u2", "third")), Some(6));
        // A backend that renamed the message: the last user message, if it says the same.
        assert_eq!(our_message(&ms[..6], &user("zz", "again")), Some(4));
        // Not yet shown (the snapshot still ends at the previous turn): never that turn's answer.
        assert_eq!(our_user_message(&ms[..6], &user("zz", "new")), None);
        assert_eq!(our_message(&ms[..6], &user("zz", "new")), None);
        assert_eq!(our_message(&ms[..6], &json!({})), None);
        assert_eq!(our_message(&[], &user("u1", "again")), None);
        assert_eq!(our_message(&ms[1..2], &user("x", "")), None);
    }

    #[test]
    fn terminal_statuses_close_the_run() {
        let ev = Events::new("r");
        let state = |v: Value| backend_state(&v);
        assert_eq!(
            state(json!({"streamStatus": "in_progress"})),
            BackendState::Running
        );
        assert_eq!(
            state(json!({"streamStatus": "paused"})),
            BackendState::Running
        );
        assert_eq!(state(json!({})), BackendState::Running);
        assert!(closing(&ev, &BackendState::Running).is_none());

        let end = closing(&ev, &state(json!({"streamStatus": "completed"}))).unwrap();
        assert!(matches!(end, Ending::Completed(_)));
        assert_eq!(json_of(end.closing_event().unwrap())["type"], "end");

        let end = closing(
            &ev,
            &state(json!({"streamStatus": "error", "errorText": "no key"})),
        )
        .unwrap();
        assert!(matches!(&end, Ending::AgentError(t, _) if t == "no key"));
        assert_eq!(
            json_of(end.closing_event().unwrap())["content"],
            json!({"message": "no key"})
        );
        let end = closing(&ev, &state(json!({"streamStatus": "error"}))).unwrap();
        assert!(
            matches!(&end, Ending::AgentError(t, _) if t == "the agent backend reported an error")
        );
        let end = closing(
            &ev,
            &state(json!({"streamStatus": "error", "error": {"message": "quota"}})),
        )
        .unwrap();
        assert!(matches!(&end, Ending::AgentError(t, _) if t == "quota"));

        let end = closing(&ev, &state(json!({"streamStatus": "stopped"}))).unwrap();
        assert!(end.closing_event().is_none());
        assert!(matches!(end, Ending::Backend(RunStatus::Stopped, _)));
        let end = closing(
            &ev,
            &state(json!({"streamStatus": "timeout", "error": "slow"})),
        )
        .unwrap();
        assert!(end.closing_event().is_none());
        assert_eq!(end, Ending::Backend(RunStatus::Timeout, "slow".into()));
    }

    #[test]
    fn snapshots_must_be_json_objects_with_a_status() {
        assert!(parse_snapshot(br#"{"streamStatus":"in_progress","messages":[]}"#).is_ok());
        assert!(parse_snapshot(br#"{"streamStatus":"completed"}"#).is_ok());
        assert!(parse_snapshot(b"<html>").is_err());
        assert!(parse_snapshot(br#"{"messages":[]}"#).is_err());
        assert!(parse_snapshot(br#"{"streamStatus":"x","messages":{}}"#).is_err());
        assert!(parse_snapshot(b"[]").is_err());
    }
}
