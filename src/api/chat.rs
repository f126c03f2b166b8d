//! The AI SDK's chat routes (`DefaultChatTransport` with only `api`, `headers` and `body`): a
//! second face of the same threads as `invokeAgent`.
//!
//! - `POST /api/chat` takes the transport's body `{id, messages, trigger, messageId, ...body}`.
//!   The chat `id`, chosen by the client, names a thread of the caller's organisation, created on
//!   first use (the same mapping as AgentFlow's `conversation_id`); the last message is the new
//!   user turn and its id, within the chat, the idempotency key; the earlier messages are the
//!   client's copy of what the thread already holds and are not read. `regenerate-message`, and
//!   a message the thread already holds sent again with other content (the SDK's edit), start
//!   a new run whose answer replaces the old one (and the turns after it) in snapshots, as the
//!   SDK replaces them on the client: [`plan`].
//! - `GET /api/chat/{id}/stream` is the SDK's `reconnectToStream` URL: the thread's resume route,
//!   answering `204` for a chat this organisation never started.
//! - `POST /api/chat/{id}/stop` stops the chat's run.
//!
//! Every route that names a thread (these, `getConversation?threadId=`, `/api/threads/{id}/…`,
//! `invokeAgent`'s `threadId`) takes a chat id too: [`thread_named`].

use serde_json::Value;

use super::invoke::{self, Turn};
use super::{Api, ApiError, Exchange, Identity, Reply};
use crate::store::{RunInfo, RunStatus, StoreError, ThreadId, ThreadInfo};

/// How the SDK asks for an answer (`trigger`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// `submit-message`: answer the last user message.
    Submit,
    /// `regenerate-message`: answer the last user message again, replacing its answer.
    Regenerate,
}

/// A validated chat request.
#[derive(Clone, Debug, PartialEq)]
pub struct ChatRequest {
    /// The chat id (`id`).
    pub chat_id: String,
    /// `agentId` (from the transport's `body`).
    pub agent_id: Value,
    /// The new user turn: the last of `messages`.
    pub message: Value,
    /// Its id.
    pub message_id: String,
    /// Its text parts joined with newlines.
    pub text: String,
    /// `timezone` (from the transport's `body`), passed to the backend.
    pub timezone: Option<String>,
    /// `trigger`.
    pub trigger: Trigger,
    /// `messageId`: with `regenerate-message`, the message whose answer is regenerated (the
    /// assistant message, or the user message it answers).
    pub target: Option<String>,
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::InvalidRequest(msg.into())
}

/// Parse and validate a `DefaultChatTransport` body. Pure. The history before the last
/// message is parsed one message at a time and dropped: a long chat's body costs its bytes,
/// not a parsed copy.
pub fn parse_chat(body: &[u8]) -> Result<ChatRequest, ApiError> {
    let ChatBody(mut obj, messages) = match serde_json::from_slice(body) {
        Ok(body) => body,
        // The JSON is well formed but not an object.
        Err(e) if e.classify() == serde_json::error::Category::Data => {
            return Err(bad("request body must be a JSON object"))
        }
        Err(e) => return Err(ApiError::InvalidJson(e.to_string())),
    };
    let chat_id = match obj.remove("id") {
        Some(Value::String(s)) if !s.is_empty() && s.len() <= 256 => s,
        None | Some(Value::Null) => return Err(bad("`id` (the chat id) is required")),
        Some(_) => {
            return Err(bad(
                "`id` (the chat id) must be a non-empty string of at most 256 bytes",
            ))
        }
    };
    let agent_id = invoke::agent_id(obj.remove("agentId"))?;
    let timezone = invoke::timezone(obj.remove("timezone"))?;
    let trigger = match obj.remove("trigger") {
        None | Some(Value::Null) => Trigger::Submit,
        Some(Value::String(t)) if t == "submit-message" => Trigger::Submit,
        Some(Value::String(t)) if t == "regenerate-message" => Trigger::Regenerate,
        Some(other) => {
            return Err(bad(format!(
                "`trigger` must be \"submit-message\" or \"regenerate-message\", not {other}"
            )))
        }
    };
    let target = match obj.remove("messageId") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if !s.is_empty() && s.len() <= 256 => Some(s),
        Some(_) => return Err(bad("`messageId` must be a non-empty string")),
    };
    let last = match messages {
        Messages::Last(Some(last)) => Some(last),
        Messages::Last(None) => return Err(bad("`messages` must not be empty")),
        Messages::Missing => return Err(bad("`messages` is required")),
        Messages::NotArray => return Err(bad("`messages` must be an array of UIMessages")),
    };
    let role = last.as_ref().and_then(|m| m.get("role"));
    if role.is_some_and(|r| r != "user") {
        return Err(bad(format!(
            "the last of `messages` must be the user's new message (role \"user\"), not role {}; \
             answering client-side tool results is not supported",
            role.map(Value::to_string).unwrap_or_default()
        )));
    }
    let (message, message_id, text) = invoke::user_message(last, "messages[-1]")?;
    Ok(ChatRequest {
        chat_id,
        agent_id,
        message,
        message_id,
        text,
        timezone,
        trigger,
        target,
    })
}

/// A chat body: its fields, with `messages` reduced to its last element as it is parsed.
struct ChatBody(serde_json::Map<String, Value>, Messages);

/// What `messages` held.
enum Messages {
    /// An array, and its last element (`None`: empty).
    Last(Option<Value>),
    /// Absent or `null`.
    Missing,
    /// Something else.
    NotArray,
}

impl<'de> serde::Deserialize<'de> for ChatBody {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> serde::de::Visitor<'de> for Fields {
            type Value = ChatBody;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<ChatBody, A::Error> {
                let (mut fields, mut messages) = (serde_json::Map::new(), Messages::Missing);
                while let Some(key) = map.next_key::<String>()? {
                    if key == "messages" {
                        messages = map.next_value::<Messages>()?;
                    } else {
                        fields.insert(key, map.next_value()?);
                    }
                }
                Ok(ChatBody(fields, messages))
            }
        }
        d.deserialize_map(Fields)
    }
}

impl<'de> serde::Deserialize<'de> for Messages {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Last;
        impl<'de> serde::de::Visitor<'de> for Last {
            type Value = Messages;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an array of messages")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Messages, A::Error> {
                // One message held at a time: each replaces the one before it.
                let mut last = None;
                while let Some(message) = seq.next_element::<Value>()? {
                    last = Some(message);
                }
                Ok(Messages::Last(last))
            }
            fn visit_unit<E>(self) -> Result<Messages, E> {
                Ok(Messages::Missing)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Messages, A::Error> {
                while map
                    .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(Messages::NotArray)
            }
            fn visit_bool<E>(self, _: bool) -> Result<Messages, E> {
                Ok(Messages::NotArray)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Messages, E> {
                Ok(Messages::NotArray)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Messages, E> {
                Ok(Messages::NotArray)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Messages, E> {
                Ok(Messages::NotArray)
            }
            fn visit_str<E>(self, _: &str) -> Result<Messages, E> {
                Ok(Messages::NotArray)
            }
        }
        d.deserialize_any(Last)
    }
}

/// The idempotency key of a run whose answer replaces the run that produced the assistant
/// message `answer` (and the turns after it).
pub fn replacing_key(answer: &str) -> String {
    format!("{REPLACES}{answer}")
}

/// The answer a run replaces, from its idempotency key.
pub fn replaced(key: &str) -> Option<&str> {
    key.strip_prefix(REPLACES)
}

const REPLACES: &str = "replaces\u{1f}";

/// The idempotency key of a new message `message_id` of chat `chat_id`: a chat's clients number
/// messages as they like, so the same id in another chat is another message.
pub fn message_key(chat_id: &str, message_id: &str) -> String {
    format!("chat\u{1f}{chat_id}\u{1f}{message_id}")
}

/// How a chat request is started: the idempotency key to start it under (an existing run's key
/// re-attaches to it), and the run whose answer it replaces, if any.
#[derive(Debug, PartialEq)]
pub struct Plan<'a> {
    /// The key.
    pub key: String,
    /// The run replaced.
    pub replaces: Option<&'a RunInfo>,
}

/// Decide how to start `req` in a thread whose retained runs are `runs` (oldest first). Pure.
///
/// - `submit-message` of a message no run answers: a new message, keyed within the chat.
/// - The same message again (same parts) while its latest answer is the thread's latest run
///   and did not fail: a retry, under that answer's own key (re-attaches). After `error` or
///   `timeout`: a new answer replacing the failed one.
/// - The same message id with other parts, or with later turns (the SDK's
///   `sendMessage({messageId})`, an edit, which drops the turns after it): a new answer
///   replacing the latest one.
/// - `regenerate-message`: a new answer replacing the one `messageId` names (the assistant
///   message, or the user message it answers), else the latest answer to the message; keyed by
///   the answer replaced, so the same request again re-attaches.
pub fn plan<'a>(req: &ChatRequest, runs: &'a [RunInfo]) -> Plan<'a> {
    let mut answering = runs
        .iter()
        .rev()
        .filter(|r| answers(r) == Some(&req.message_id));
    let latest = answering.clone().next();
    let replace = |old: &'a RunInfo| Plan {
        key: replacing_key(&old.assistant_message_id),
        replaces: Some(old),
    };
    let fresh = || Plan {
        key: message_key(&req.chat_id, &req.message_id),
        replaces: None,
    };
    match req.trigger {
        Trigger::Regenerate => {
            let named = req
                .target
                .as_deref()
                .and_then(|t| answering.find(|r| r.assistant_message_id == t));
            named.or(latest).map_or_else(fresh, replace)
        }
        Trigger::Submit => match latest {
            None => fresh(),
            Some(old) if failed(old.status) => replace(old),
            // Sent again as it was, with nothing after its answer: a retry. (With later turns,
            // the SDK has dropped them: the message is answered anew, as an edit is.)
            Some(old)
                if same_parts(&old.user_message, &req.message)
                    && runs.last().is_some_and(|r| std::ptr::eq(r, old)) =>
            {
                Plan {
                    key: old.idempotency_key.clone().unwrap_or_else(|| fresh().key),
                    replaces: None,
                }
            }
            Some(old) => replace(old),
        },
    }
}

fn failed(status: RunStatus) -> bool {
    matches!(status, RunStatus::Error | RunStatus::Timeout)
}

/// Whether two user messages say the same (their parts; ids and metadata aside).
fn same_parts(a: &Value, b: &Value) -> bool {
    a.get("parts") == b.get("parts")
}

/// Which of a thread's runs (oldest first) a snapshot shows: a run that replaces an answer
/// hides that answer's run and every run after it (the turns the SDK dropped on the client
/// when it regenerated or edited). Pure.
pub fn shown(runs: &[RunInfo]) -> Vec<bool> {
    let mut shown = vec![true; runs.len()];
    for (i, run) in runs.iter().enumerate() {
        let Some(answer) = run.idempotency_key.as_deref().and_then(replaced) else {
            continue;
        };
        if let Some(j) = runs[..i]
            .iter()
            .rposition(|r| r.assistant_message_id == answer)
        {
            shown[j..i].iter_mut().for_each(|s| *s = false);
        }
    }
    shown
}

/// The thread an id names for `org`: the organisation's chat (or AgentFlow conversation) of
/// that id if there is one, else its thread of that id. (No organisation has both: a chat id
/// that is one of its thread ids continues that thread and is never mapped.) An id shaped like
/// Sluice's own thread ids (a UUID) is tried as a thread first, so that polling a thread costs
/// one store read, as before chats.
pub async fn thread_named(api: &Api, org: &str, id: &str) -> Result<ThreadInfo, ApiError> {
    let named = ThreadId(id.to_string());
    let as_thread = || api.store.thread(org, &named);
    let uuid_shaped = uuid::Uuid::try_parse(id).is_ok();
    if uuid_shaped {
        match as_thread().await {
            Err(StoreError::ThreadNotFound) => {}
            found => return Ok(found?),
        }
    }
    if let Some(thread) = api.store.conversation(org, id).await? {
        match api.store.thread(org, &thread).await {
            Err(StoreError::ThreadNotFound) => {}
            found => return Ok(found?),
        }
    }
    if uuid_shaped {
        return Err(ApiError::ThreadNotFound);
    }
    Ok(as_thread().await?)
}

/// The thread id an id names for `org` (see [`thread_named`]), without reading the thread.
pub async fn thread_id_named(api: &Api, org: &str, id: &str) -> Result<ThreadId, ApiError> {
    Ok(api
        .store
        .conversation(org, id)
        .await?
        .unwrap_or_else(|| ThreadId(id.to_string())))
}

/// The user message id a run answers.
fn answers(run: &RunInfo) -> Option<&str> {
    run.user_message.get("id").and_then(Value::as_str)
}

/// Handle `POST /api/chat`.
pub async fn chat(api: &Api, who: &Identity, ex: &mut dyn Exchange) -> Result<(), ApiError> {
    let body = ex.read_body(api.config.limits.chat_body_limit()).await?;
    let req = parse_chat(&body)?;
    // Parsed: the raw body (the whole chat history) no longer counts against
    // `limits.max_body_bytes_in_flight`.
    drop(body);
    let thread = match thread_named(api, &who.org_id, &req.chat_id).await {
        Ok(thread) => Some(thread),
        Err(ApiError::ThreadNotFound) => None,
        Err(e) => return Err(e),
    };
    let runs = thread.as_ref().map_or(&[][..], |t| &t.runs[..]);
    let plan = plan(&req, runs);
    // A replacing run asks the backend under a message id of its own, so that a backend that
    // deduplicates by message id answers again rather than repeat its answer.
    let backend_message_id = match plan.replaces {
        Some(old) => format!("{}.replaces.{}", req.message_id, old.assistant_message_id),
        None => req.message_id.clone(),
    };
    let key = plan.key;
    let (thread_id, conversation) = match &thread {
        Some(t) => (Some(t.thread_id.clone()), None),
        None => (None, Some(req.chat_id.clone())),
    };
    let turn = Turn {
        agent_id: req.agent_id,
        message: req.message,
        key,
        backend_message_id,
        text: req.text,
        timezone: req.timezone,
        thread_id,
        conversation,
    };
    invoke::start_turn(api, who, ex, turn).await
}

/// Handle `GET /api/chat/{id}/stream`: the thread's resume route; `204` for a chat this
/// organisation has not started (a fresh page with `resume: true` has nothing to resume).
pub async fn chat_stream(api: &Api, who: &Identity, ex: &mut dyn Exchange) -> Result<(), ApiError> {
    let id = super::route::chat_of(ex.path(), "/stream").ok_or(ApiError::NotFound)?;
    match thread_named(api, &who.org_id, &id).await {
        Ok(thread) => super::stream::resume_thread(api, who, ex, thread).await,
        Err(ApiError::ThreadNotFound) => {
            // Still a bad cursor is refused as such.
            super::stream::cursor_of(ex)?;
            let _ = ex.respond(Reply::empty(204)).await;
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Handle `POST /api/chat/{id}/stop`.
pub async fn chat_stop(api: &Api, who: &Identity, ex: &mut dyn Exchange) -> Result<(), ApiError> {
    let id = super::route::chat_of(ex.path(), "/stop").ok_or(ApiError::NotFound)?;
    let thread = thread_named(api, &who.org_id, &id).await?;
    super::stop::stop_thread(api, ex, thread).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ok(body: Value) -> ChatRequest {
        parse_chat(body.to_string().as_bytes()).unwrap()
    }

    fn err(body: Value) -> ApiError {
        parse_chat(body.to_string().as_bytes()).unwrap_err()
    }

    fn user(id: &str, text: &str) -> Value {
        json!({"id": id, "role": "user", "parts": [{"type": "text", "text": text}]})
    }

    #[test]
    fn accepts_what_default_chat_transport_sends() {
        let r = ok(json!({
            "agentId": 1,
            "id": "chat-1",
            "messages": [
                user("u1", "Hi"),
                {"id": "a1", "role": "assistant", "parts": [{"type": "text", "text": "Hello"}]},
                user("u2", "More"),
            ],
            "trigger": "submit-message",
        }));
        assert_eq!(r.chat_id, "chat-1");
        assert_eq!(r.agent_id, json!(1));
        assert_eq!(r.message_id, "u2");
        assert_eq!(r.text, "More");
        assert_eq!(r.message, user("u2", "More"));
        assert_eq!((r.trigger, r.target), (Trigger::Submit, None));
        let r = ok(json!({
            "agentId": "bot", "id": "c", "timezone": "Europe/Paris",
            "messages": [user("u1", "Hi")],
            "trigger": "regenerate-message", "messageId": "a1",
        }));
        assert_eq!(r.trigger, Trigger::Regenerate);
        assert_eq!(r.target.as_deref(), Some("a1"));
        assert_eq!(r.timezone.as_deref(), Some("Europe/Paris"));
        // No trigger (an older or hand-written client): a submit.
        let r = ok(json!({"agentId": 1, "id": "c", "messages": [user("u1", "Hi")]}));
        assert_eq!(r.trigger, Trigger::Submit);
        // A long history: only its last message is kept, whatever came before it.
        let mut history: Vec<Value> = (0..2000)
            .map(|i| json!({"id": format!("m{i}"), "role": if i % 2 == 0 { "user" } else { "assistant" },
                            "parts": [{"type": "text", "text": "x".repeat(100)}, {"nested": [[{}], null, 1.5]}]}))
            .collect();
        history.push(user("last", "The new turn"));
        let r = ok(json!({"messages": history, "agentId": 1, "id": "c"}));
        assert_eq!(
            (r.message_id.as_str(), r.text.as_str()),
            ("last", "The new turn")
        );
    }

    #[test]
    fn the_chat_body_parser_agrees_with_a_whole_parse() {
        // `messages` anywhere among the fields, repeated (the last wins, as in a whole parse).
        let body = r#"{"id":"c","messages":[{"id":"a","parts":[{"type":"text","text":"first"}]}],
                       "agentId":1,"messages":[{"id":"b","parts":[{"type":"text","text":"second"}]}]}"#;
        let r = parse_chat(body.as_bytes()).unwrap();
        assert_eq!(r.message_id, "b");
        for (body, code) in [
            (
                r#"{"id":"c","agentId":1,"messages":{"0":{}}}"#,
                "invalid_request",
            ),
            (
                r#"{"id":"c","agentId":1,"messages":null}"#,
                "invalid_request",
            ),
            (
                r#"{"id":"c","agentId":1,"messages":[1,2]}"#,
                "invalid_request",
            ),
            (r#"{"id":"c","agentId":1,"messages":[}"#, "invalid_json"),
            (r#"{"id":"c","agentId":1,"messages":[]"#, "invalid_json"),
            (r#""text""#, "invalid_request"),
            ("", "invalid_json"),
        ] {
            assert_eq!(
                parse_chat(body.as_bytes()).unwrap_err().code(),
                code,
                "{body}"
            );
        }
    }

    #[test]
    fn refuses_bad_bodies_with_the_right_code() {
        assert_eq!(parse_chat(b"{nope").unwrap_err().code(), "invalid_json");
        let m = json!([user("u1", "Hi")]);
        for body in [
            json!([]),
            json!({"agentId": 1, "messages": m}),
            json!({"agentId": 1, "id": "", "messages": m}),
            json!({"agentId": 1, "id": 7, "messages": m}),
            json!({"agentId": 1, "id": "x".repeat(257), "messages": m}),
            json!({"id": "c", "messages": m}),
            json!({"agentId": 1.5, "id": "c", "messages": m}),
            json!({"agentId": 1, "id": "c"}),
            json!({"agentId": 1, "id": "c", "messages": []}),
            json!({"agentId": 1, "id": "c", "messages": "hi"}),
            json!({"agentId": 1, "id": "c", "messages": [
                {"id": "a1", "role": "assistant", "parts": [{"type": "text", "text": "x"}]}]}),
            json!({"agentId": 1, "id": "c", "messages": [user("u1", " ")]}),
            json!({"agentId": 1, "id": "c", "messages": ["hi"]}),
            json!({"agentId": 1, "id": "c", "messages": m, "trigger": "resume-stream"}),
            json!({"agentId": 1, "id": "c", "messages": m, "trigger": 1}),
            json!({"agentId": 1, "id": "c", "messages": m, "messageId": 5}),
            json!({"agentId": 1, "id": "c", "messages": m, "timezone": 5}),
        ] {
            let e = err(body.clone());
            assert_eq!((e.code(), e.status()), ("invalid_request", 400), "{body}");
        }
    }

    fn run(n: usize, answers: &str, key: &str) -> RunInfo {
        let now = std::time::SystemTime::now();
        RunInfo {
            run_id: crate::store::RunId(format!("r{n}")),
            thread_id: ThreadId("t".into()),
            org_id: "o".into(),
            user_id: "u".into(),
            agent_id: json!(1),
            status: crate::store::RunStatus::Completed,
            error: None,
            first_seq: 1,
            last_seq: 0,
            bytes: 0,
            created_at: now,
            updated_at: now,
            user_message: std::sync::Arc::new(user(answers, "x")),
            idempotency_key: Some(key.into()),
            assistant_message_id: format!("a{n}"),
        }
    }

    #[test]
    fn a_regenerated_answer_replaces_the_old_one_and_the_turns_after_it() {
        // u1 → a0, u2 → a1, then a1 regenerated (a2), then u3 → a3.
        let runs = [
            run(0, "u1", "u1"),
            run(1, "u2", "u2"),
            run(2, "u2", &replacing_key("a1")),
            run(3, "u3", "u3"),
        ];
        assert_eq!(shown(&runs), [true, false, true, true]);
        // Regenerating the first answer drops the second turn too.
        let runs = [
            run(0, "u1", "u1"),
            run(1, "u2", "u2"),
            run(2, "u1", &replacing_key("a0")),
        ];
        assert_eq!(shown(&runs), [false, false, true]);
        // Regenerated twice: only the latest stays.
        let runs = [
            run(0, "u1", "u1"),
            run(1, "u1", &replacing_key("a0")),
            run(2, "u1", &replacing_key("a1")),
        ];
        assert_eq!(shown(&runs), [false, false, true]);
        // An answer no longer retained (evicted): nothing else is hidden.
        let runs = [run(5, "u1", &replacing_key("a0")), run(6, "u2", "u2")];
        assert_eq!(shown(&runs), [true, true]);
        // Plain retries (a failed run's key reused) keep their history.
        let runs = [run(0, "u1", "u1"), run(1, "u1", "u1")];
        assert_eq!(shown(&runs), [true, true]);
        assert_eq!(replaced(&replacing_key("a9")), Some("a9"));
        assert_eq!(replaced("u1"), None);
    }

    fn request(trigger: Trigger, id: &str, text: &str, target: Option<&str>) -> ChatRequest {
        ChatRequest {
            chat_id: "c".into(),
            agent_id: json!(1),
            message: user(id, text),
            message_id: id.into(),
            text: text.into(),
            timezone: None,
            trigger,
            target: target.map(str::to_string),
        }
    }

    fn keyed<'a, 'p>(plan: &'p Plan<'a>) -> (&'p str, Option<&'a str>) {
        (
            plan.key.as_str(),
            plan.replaces.map(|r| r.assistant_message_id.as_str()),
        )
    }

    #[test]
    fn a_chat_request_is_a_new_message_a_retry_an_edit_or_a_regeneration() {
        use Trigger::{Regenerate, Submit};
        let u1 = message_key("c", "u1");
        assert_eq!(
            plan(&request(Submit, "u1", "x", None), &[run(0, "u1", &u1)]).key,
            u1,
            "a retry"
        );
        // u1 → a0, u2 → a1, u2 regenerated → a2.
        let runs = [
            run(0, "u1", &u1),
            run(1, "u2", &message_key("c", "u2")),
            run(2, "u2", &replacing_key("a1")),
        ];
        let plan_of = |r: ChatRequest| keyed(&plan(&r, &runs)).0.to_string();
        // A new message, keyed within the chat.
        let p = plan(&request(Submit, "u3", "x", None), &runs);
        assert_eq!(keyed(&p), (message_key("c", "u3").as_str(), None));
        let mut other_chat = request(Submit, "u3", "x", None);
        other_chat.chat_id = "d".into();
        assert_ne!(plan_of(other_chat), message_key("c", "u3"));
        // The same message again, its answer the latest: a retry, under that answer's key.
        assert_eq!(
            plan_of(request(Submit, "u1", "x", Some("u1"))).as_str(),
            replacing_key("a0"),
            "with later turns: answered anew"
        );
        assert_eq!(
            plan_of(request(Submit, "u2", "x", None)),
            replacing_key("a1")
        );
        // The same id with other parts: an edit, replacing the latest answer.
        let p = plan(&request(Submit, "u2", "edited", None), &runs);
        assert_eq!(keyed(&p), (replacing_key("a2").as_str(), Some("a2")));
        // Regenerating the answer the SDK names, again and again: the same key (re-attaches).
        let p = plan(&request(Regenerate, "u2", "x", Some("a1")), &runs);
        assert_eq!(keyed(&p), (replacing_key("a1").as_str(), Some("a1")));
        let p = plan(&request(Regenerate, "u2", "x", Some("a2")), &runs);
        assert_eq!(keyed(&p), (replacing_key("a2").as_str(), Some("a2")));
        // No `messageId`, or the user message's: the latest answer.
        for target in [None, Some("u2"), Some("a-unknown")] {
            let p = plan(&request(Regenerate, "u2", "x", target), &runs);
            assert_eq!(keyed(&p).1, Some("a2"), "{target:?}");
        }
        // Nothing answers it yet: a new message.
        let p = plan(&request(Regenerate, "u9", "x", None), &runs);
        assert_eq!(keyed(&p), (message_key("c", "u9").as_str(), None));
        // A failed answer is replaced by a retry, not re-attached to.
        let mut failed = run(3, "u4", &message_key("c", "u4"));
        failed.status = RunStatus::Error;
        let runs = [failed];
        let p = plan(&request(Submit, "u4", "x", None), &runs);
        assert_eq!(keyed(&p), (replacing_key("a3").as_str(), Some("a3")));
    }

    /// What a client does to its chat, as the AI SDK's `Chat` does it.
    #[derive(Clone, Debug)]
    enum Op {
        /// `sendMessage({text})`: a new user message.
        Send(u8),
        /// The same request again (a network retry of the latest send).
        Retry,
        /// `regenerate({messageId})` of the assistant message at this index (mod their count),
        /// or `regenerate()` (the last one).
        Regenerate(Option<usize>),
        /// `sendMessage({text, messageId})` of the user message at this index (mod their count).
        Edit(usize, u8),
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            (0u8..3).prop_map(Op::Send),
            Just(Op::Retry),
            proptest::option::of(0usize..8).prop_map(Op::Regenerate),
            (0usize..8, 0u8..3).prop_map(|(i, t)| Op::Edit(i, t)),
        ]
    }

    proptest::proptest! {
        /// Whatever a client does (new messages, retries, regenerations, edits, in any order),
        /// the snapshot shows exactly the messages the SDK shows on the client: [`plan`]
        /// (with the store's idempotency) and [`shown`] agree with the SDK's own bookkeeping.
        #[test]
        fn the_snapshot_shows_what_the_sdk_shows(ops in proptest::collection::vec(op(), 1..24)) {
            // The client's messages: (role, id, text); the server's runs, oldest first.
            let mut client: Vec<(&str, String, String)> = Vec::new();
            let mut runs: Vec<RunInfo> = Vec::new();
            let mut last: Option<ChatRequest> = None;
            let mut fresh = 0;
            for op in ops {
                let users: Vec<usize> = (0..client.len()).filter(|&i| client[i].0 == "user").collect();
                let answers: Vec<usize> = (0..client.len()).filter(|&i| client[i].0 == "assistant").collect();
                let (trigger, target) = match op {
                    Op::Send(t) => {
                        fresh += 1;
                        client.push(("user", format!("u{fresh}"), format!("text {t}")));
                        (Trigger::Submit, None)
                    }
                    Op::Retry => match &last {
                        Some(req) if client.last().is_some_and(|m| m.0 == "assistant") => {
                            // The SDK would show the same answer again: drop it, then re-add.
                            client.pop();
                            (req.trigger, req.target.clone())
                        }
                        _ => continue,
                    },
                    Op::Regenerate(at) => {
                        let Some(&i) = (match at {
                            Some(k) if !answers.is_empty() => answers.get(k % answers.len()),
                            _ => answers.last(),
                        }) else { continue };
                        let target = at.map(|_| client[i].1.clone());
                        client.truncate(i);
                        (Trigger::Regenerate, target)
                    }
                    Op::Edit(k, t) => {
                        let Some(&i) = (!users.is_empty()).then(|| &users[k % users.len()]) else {
                            continue;
                        };
                        client.truncate(i + 1);
                        client[i].2 = format!("text {t}");
                        (Trigger::Submit, Some(client[i].1.clone()))
                    }
                };
                let (_, id, text) = client.last().cloned().expect("a user message last");
                let req = ChatRequest { trigger, target, ..request(trigger, &id, &text, None) };
                let plan = plan(&req, &runs);
                // The store: a key naming a run re-attaches to it; otherwise a new run.
                let answer = match runs.iter().rev().find(|r| r.idempotency_key.as_deref() == Some(&plan.key)) {
                    Some(existing) => existing.assistant_message_id.clone(),
                    None => {
                        let n = runs.len();
                        let mut r = run(n, &id, &plan.key);
                        r.user_message = std::sync::Arc::new(user(&id, &text));
                        runs.push(r);
                        format!("a{n}")
                    }
                };
                client.push(("assistant", answer, String::new()));
                last = Some(req);
            }
            let mut snapshot: Vec<(&str, String, String)> = Vec::new();
            for (r, shown) in runs.iter().zip(shown(&runs)) {
                if shown {
                    let text = r.user_message["parts"][0]["text"].as_str().unwrap_or("").to_string();
                    snapshot.push(("user", answers(r).unwrap_or("").to_string(), text));
                    snapshot.push(("assistant", r.assistant_message_id.clone(), String::new()));
                }
            }
            proptest::prop_assert_eq!(snapshot, client);
        }
    }
}
