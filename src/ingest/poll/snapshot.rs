//! Reading a backend's conversation snapshot (pure: no I/O).
//!
//! A snapshot is the `getConversation` answer: `{streamStatus, messages: [UIMessage…], …}`.
//! [`parse_snapshot`] checks its shape, [`backend_state`] reads its `streamStatus` (and error
//! text), [`closing`] says how a terminal state ends the run. [`our_user_message`] finds the
//! run's own user message among the thread's messages and [`our_message`] the assistant message
//! answering it, which is the only message the adapter diffs. A message is the run's by its id,
//! or (for a backend that renames messages) by its text, but only beyond the user messages the
//! conversation held before the run ([`user_messages`]): never an earlier turn's.

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

fn is_user(m: &Value) -> bool {
    role(m) == Some("user")
}

/// How many user messages a snapshot's `messages` hold. Read before a run starts, it is the
/// `before` of [`our_user_message`].
pub fn user_messages(messages: &[Value]) -> usize {
    messages.iter().filter(|m| is_user(m)).count()
}

/// Where the run's user message `ours` is in a snapshot: the last user message with its `id`;
/// or, for a backend that renames messages, the last user message if it has the same text and
/// is not one of the first `before` user messages, those the backend's conversation held before
/// this run (0 for a new conversation).
///
/// Never an earlier turn's message: until the backend shows the run's own message (its first
/// snapshots may still be the previous turn's), the answer is `None`, even when the previous
/// turn said the same words (a user answering "yes" twice).
pub fn our_user_message(messages: &[Value], ours: &Value, before: usize) -> Option<usize> {
    let id = ours.get("id").and_then(Value::as_str);
    let by_id = id.and_then(|id| {
        messages
            .iter()
            .rposition(|m| is_user(m) && m.get("id").and_then(Value::as_str) == Some(id))
    });
    by_id.or_else(|| {
        if user_messages(messages) <= before {
            // The last user message is one the conversation held before this run.
            return None;
        }
        let last = messages.iter().rposition(is_user)?;
        (text_of(&messages[last]) == text_of(ours)).then_some(last)
    })
}

/// Which of a snapshot's messages answers the run: the first assistant message after the run's
/// user message ([`our_user_message`], with the same `before`) and before the next user
/// message.
pub fn our_message(messages: &[Value], ours: &Value, before: usize) -> Option<usize> {
    let after = our_user_message(messages, ours, before)?;
    messages[after + 1..]
        .iter()
        .take_while(|m| !is_user(m))
        .position(|m| role(m) == Some("assistant"))
        .map(|i| after + 1 + i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn json_of(e: &crate::event::NewEvent) -> Value {
        serde_json::from_slice(&e.data).expect("events are JSON")
    }

    fn user(id: &str, text: &str) -> Value {
        json!({"id": id, "role": "user", "parts": [{"type": "text", "text": text}]})
    }

    fn assistant(id: &str, text: &str) -> Value {
        json!({"id": id, "role": "assistant", "parts": [{"type": "text", "text": text}]})
    }

    #[test]
    fn our_message_follows_the_runs_user_message() {
        let ms = json!([
            user("u0", "hi"), {"id": "a0", "role": "assistant"},
            user("u1", "again"), {"id": "s", "role": "system"},
            {"id": "a1", "role": "assistant"}, {"id": "a1b", "role": "assistant"},
            user("u2", "third"),
        ]);
        let ms = ms.as_array().unwrap();
        assert_eq!(user_messages(ms), 3);
        assert_eq!(our_message(ms, &user("u0", "hi"), 0), Some(1));
        assert_eq!(our_message(ms, &user("u1", "again"), 1), Some(4));
        // The run's own message has no answer yet: not the next turn's.
        assert_eq!(our_message(ms, &user("u2", "third"), 2), None);
        assert_eq!(our_user_message(ms, &user("u2", "third"), 2), Some(6));
        // A backend that renamed the message: the last user message, if it says the same.
        assert_eq!(our_message(&ms[..6], &user("zz", "again"), 1), Some(4));
        // Not yet shown (the snapshot still ends at the previous turn): never that turn's answer.
        assert_eq!(our_user_message(&ms[..6], &user("zz", "new"), 1), None);
        assert_eq!(our_message(&ms[..6], &user("zz", "new"), 1), None);
        assert_eq!(our_message(&ms[..6], &json!({}), 1), None);
        assert_eq!(our_message(&[], &user("u1", "again"), 0), None);
        assert_eq!(our_message(&ms[1..2], &user("x", ""), 0), None);
    }

    #[test]
    fn a_repeated_answer_never_takes_the_previous_turn() {
        // The user said "yes", the agent answered; the user says "yes" again. The backend
        // renames message ids, so only the text can find the run's message.
        let first = [user("srv-1", "yes"), assistant("srv-2", "first answer")];
        let yes = user("u-mine", "yes");
        // The conversation held one user message before this run: the previous "yes" is not
        // this run's, however alike.
        assert_eq!(our_user_message(&first, &yes, 1), None);
        assert_eq!(our_message(&first, &yes, 1), None);
        // Without that count the text fallback would take the previous turn (the M8 bug).
        assert_eq!(our_message(&first, &yes, 0), Some(1));
        // Once the backend shows the new "yes", that one and its answer are the run's.
        let mut both = first.to_vec();
        both.push(user("srv-3", "yes"));
        assert_eq!(our_user_message(&both, &yes, 1), Some(2));
        assert_eq!(our_message(&both, &yes, 1), None);
        both.push(assistant("srv-4", "second answer"));
        assert_eq!(our_message(&both, &yes, 1), Some(3));
        // A backend that keeps ids is matched by id, whatever the count.
        let kept = [user("u-mine", "yes"), assistant("a", "answer")];
        assert_eq!(our_message(&kept, &yes, 5), Some(1));
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            prop::sample::select(vec![
                "user",
                "assistant",
                "text",
                "yes",
                "u1",
                "completed",
                "error",
                "in_progress",
            ])
            .prop_map(|s| json!(s)),
        ];
        leaf.prop_recursive(4, 32, 5, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                prop::collection::vec(
                    (
                        prop::sample::select(vec![
                            "role",
                            "id",
                            "parts",
                            "type",
                            "text",
                            "streamStatus",
                            "errorText",
                            "error",
                            "message",
                        ]),
                        inner
                    ),
                    0..5
                )
                .prop_map(|kv| Value::Object(
                    kv.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
                )),
            ]
        })
    }

    proptest! {
        #[test]
        fn any_json_never_panics(messages in prop::collection::vec(arb_json(), 0..6), before in 0usize..4) {
            let snapshot = json!({"streamStatus": "in_progress", "messages": messages});
            let ms = snapshot["messages"].as_array().unwrap();
            for ours in [json!({"id": "u1"}), user("u9", "yes"), json!(null)] {
                if let Some(i) = our_message(ms, &ours, before) {
                    prop_assert_eq!(ms[i]["role"].as_str(), Some("assistant"));
                }
                if let Some(i) = our_user_message(ms, &ours, before) {
                    prop_assert_eq!(ms[i]["role"].as_str(), Some("user"));
                }
            }
            let _ = backend_state(&snapshot);
            for m in &messages {
                let _ = backend_state(m);
                let _ = parse_snapshot(m.to_string().as_bytes());
            }
        }
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
