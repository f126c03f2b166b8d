//! The AI SDK's chat routes (issue #17, `useChat` natively), spoken over HTTP the way
//! `DefaultChatTransport` speaks them: `POST /api/chat` with `{id, messages, trigger,
//! messageId?, agentId}`, `GET /api/chat/{id}/stream` (resume) and `POST /api/chat/{id}/stop`,
//! against the real gateway and mock agent.

mod common;

use std::future::Future;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// A user `UIMessage`.
fn user(id: &str, text: &str) -> Value {
    json!({"id": id, "role": "user", "parts": [{"type": "text", "text": text}]})
}

/// What `DefaultChatTransport` sends for `submit-message` (with `body: {agentId: 1}`).
fn submit(chat: &str, messages: &[Value]) -> Value {
    json!({"agentId": 1, "id": chat, "messages": messages, "trigger": "submit-message"})
}

/// What it sends for `regenerate-message`: the messages up to the user message, and the id of
/// the assistant message regenerated (none when `chat.regenerate()` is called without one).
fn regenerate(chat: &str, messages: &[Value], answer: Option<&str>) -> Value {
    let mut body =
        json!({"agentId": 1, "id": chat, "messages": messages, "trigger": "regenerate-message"});
    if let Some(a) = answer {
        body["messageId"] = json!(a);
    }
    body
}

/// `POST /api/chat` with `body`, a bearer token when given, and `x-stream-response: false`
/// when `poll`.
async fn post_chat(
    gw: &Gateway,
    token: Option<&str>,
    body: &Value,
    poll: bool,
) -> reqwest::Response {
    let mut req = gw.http.post(gw.url("/api/chat")).json(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if poll {
        req = req.header("x-stream-response", "false");
    }
    req.send().await.unwrap()
}

/// One streamed chat turn, read to its end.
struct Turn {
    thread: String,
    run: String,
    reattached: bool,
    events: Vec<Sse>,
}

impl Turn {
    /// The JSON chunks (the stream must end with `[DONE]`).
    fn chunks(&self) -> Vec<Value> {
        chunks_of(&self.events)
    }

    /// The assistant message the stream builds.
    fn message(&self) -> Value {
        reduce_ui(&self.chunks()).expect("a valid UI-message stream")
    }
}

fn header(resp: &reqwest::Response, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_string())
}

fn reattached(resp: &reqwest::Response) -> bool {
    header(resp, "x-sluice-reattached").as_deref() == Some("true")
}

/// `POST /api/chat` in stream mode, read to the end; asserts a 200 UI-message stream.
async fn chat_turn(gw: &Gateway, token: Option<&str>, body: &Value) -> Turn {
    let resp = post_chat(gw, token, body, false).await;
    let status = resp.status().as_u16();
    let (thread, run, again) = (
        header(&resp, "x-thread-id"),
        header(&resp, "x-run-id"),
        reattached(&resp),
    );
    let ctype = header(&resp, "content-type").unwrap_or_default();
    let ui = header(&resp, "x-vercel-ai-ui-message-stream");
    let text = resp.text().await.unwrap();
    assert_eq!(status, 200, "{body}: {text}");
    assert!(ctype.starts_with("text/event-stream"), "{ctype}");
    assert_eq!(ui.as_deref(), Some("v1"));
    let (events, _) = parse_sse(&text);
    assert_eq!(
        events.last().map(|e| e.data.as_str()),
        Some("[DONE]"),
        "a finished turn ends with [DONE]: {text}"
    );
    Turn {
        thread: thread.expect("x-thread-id"),
        run: run.expect("x-run-id"),
        reattached: again,
        events,
    }
}

/// The chunks of a finished stream's events, `[DONE]` checked to be last and removed.
fn chunks_of(events: &[Sse]) -> Vec<Value> {
    assert_eq!(events.last().map(|e| e.data.as_str()), Some("[DONE]"));
    events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(&e.data).expect("chunk is JSON"))
        .collect()
}

/// Every chunk carries an SSE id `k` or `k.j`, strictly increasing.
fn assert_ids(events: &[Sse]) {
    let mut prev: Option<(u64, u64)> = None;
    for e in events.iter().filter(|e| e.data != "[DONE]") {
        let id =
            e.id.as_deref()
                .unwrap_or_else(|| panic!("chunk without id: {e:?}"));
        let mut it = id.split('.');
        let k: u64 = it.next().unwrap().parse().expect(id);
        // `k` is the last chunk of event k: it sorts after every `k.j`.
        let j: u64 = it.next().map_or(u64::MAX, |j| j.parse().expect(id));
        assert!(it.next().is_none(), "{id}");
        assert!(prev < Some((k, j)), "ids out of order at {id}: {events:?}");
        prev = Some((k, j));
    }
}

/// `GET {path}` (a resume route) with an optional `Last-Event-ID`; status and whole body.
async fn get_body(
    gw: &Gateway,
    token: Option<&str>,
    path: &str,
    last: Option<&str>,
) -> (u16, String) {
    let mut req = gw.http.get(gw.url(path));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(id) = last {
        req = req.header("last-event-id", id);
    }
    let resp = req.send().await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

/// `POST {path}` (a stop route); status and JSON body.
async fn post_empty(gw: &Gateway, token: Option<&str>, path: &str) -> (u16, Value) {
    let mut req = gw.http.post(gw.url(path));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// `(id, role, text)` of each message of a snapshot.
fn summary(snap: &Value) -> Vec<(String, String, String)> {
    snap["messages"]
        .as_array()
        .unwrap_or_else(|| panic!("no messages: {snap}"))
        .iter()
        .map(|m| {
            (
                m["id"].as_str().unwrap_or_default().to_string(),
                m["role"].as_str().unwrap_or_default().to_string(),
                text_of(m),
            )
        })
        .collect()
}

fn ids(snap: &Value) -> Vec<String> {
    summary(snap).into_iter().map(|(id, _, _)| id).collect()
}

fn id_of(message: &Value) -> String {
    message["id"].as_str().expect("message id").to_string()
}

/// Wait until `cond` holds, up to 30 s.
async fn wait_until<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The snapshot's `lastSeq` (0 when the thread is unknown).
async fn last_seq(gw: &Gateway, token: Option<&str>, chat: &str) -> u64 {
    gw.conversation_as(token, chat).await.1["lastSeq"]
        .as_u64()
        .unwrap_or(0)
}

/// The backend run requests whose conversation is `thread`.
async fn backend_runs(gw: &Gateway, mock: &Proc, thread: &str) -> Vec<Value> {
    mock_requests(&gw.http, &mock.addrs[0])
        .await
        .into_iter()
        .filter(|r| r["body"]["conversation_id"] == json!(thread))
        .collect()
}

fn tokens(n: usize) -> String {
    (0..n).map(|i| format!("token{i} ")).collect()
}

#[tokio::test]
async fn a_chat_id_names_a_thread_created_on_first_use_and_continued_by_later_turns() {
    let mock = mock_agent();
    let gw = gateway(&mock.addrs[0]);
    let chat = "chat-first-use-Xy7_q";
    let (status, body) = gw.conversation(chat).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (404, &json!("thread_not_found")),
        "no thread before the chat's first message"
    );

    let u1 = user("u1", "Hello chat");
    let t1 = chat_turn(&gw, None, &submit(chat, std::slice::from_ref(&u1))).await;
    assert!(!t1.reattached, "a first message is no retry");
    assert_ids(&t1.events);
    let chunks = t1.chunks();
    assert_eq!(chunks[0]["type"], "start");
    assert_eq!(chunks.last().unwrap()["type"], "finish");
    let a1 = t1.message();
    assert_eq!(text_of(&a1), expected_answer("Hello chat", 1));
    let snap = gw.wait_terminal(chat).await;
    assert_eq!(snap["streamStatus"], "completed");
    assert_eq!(snap["runId"], json!(t1.run));
    assert_eq!(snap["messages"][0]["id"], "u1");
    assert_eq!(snap["messages"][0]["role"], "user");
    assert_eq!(text_of(&snap["messages"][0]), "Hello chat");
    assert_eq!(
        snap["messages"][1], a1,
        "the snapshot holds the streamed answer"
    );
    assert_eq!(snap["messages"].as_array().unwrap().len(), 2);
    // Sluice's own thread id names the same thread.
    let (status, by_thread) = gw.conversation(&t1.thread).await;
    assert_eq!(status, 200, "{by_thread}");
    assert_eq!(
        (&by_thread["messages"], &by_thread["lastSeq"]),
        (&snap["messages"], &snap["lastSeq"])
    );

    // The SDK sends the whole history; only the last message is new.
    let u2 = user("u2", "Second question");
    let t2 = chat_turn(&gw, None, &submit(chat, &[u1.clone(), a1.clone(), u2])).await;
    assert_eq!(t2.thread, t1.thread, "same chat, same thread");
    assert_ne!(t2.run, t1.run);
    assert!(!t2.reattached);
    let a2 = t2.message();
    assert_eq!(text_of(&a2), expected_answer("Second question", 2));
    let snap = gw.wait_terminal(chat).await;
    assert_eq!(
        summary(&snap),
        vec![
            ("u1".into(), "user".into(), "Hello chat".into()),
            (id_of(&a1), "assistant".into(), text_of(&a1)),
            ("u2".into(), "user".into(), "Second question".into()),
            (id_of(&a2), "assistant".into(), text_of(&a2)),
        ]
    );
    assert_eq!(snap["messages"][3], a2);

    // The gateway keeps the history: what the client claims came before is not read.
    let forged = [
        user("zz", "a question never asked"),
        json!({"id": "forged", "role": "assistant", "parts": [{"type": "text", "text": "never said"}]}),
        user("u3", "Third"),
    ];
    let t3 = chat_turn(&gw, None, &submit(chat, &forged)).await;
    assert_eq!(t3.thread, t1.thread);
    let a3 = t3.message();
    assert_eq!(text_of(&a3), expected_answer("Third", 3));
    let snap = gw.wait_terminal(chat).await;
    assert_eq!(
        ids(&snap),
        [
            "u1".to_string(),
            id_of(&a1),
            "u2".into(),
            id_of(&a2),
            "u3".into(),
            id_of(&a3)
        ]
    );

    // The backend saw three runs of one conversation, one per new message.
    let seen = mock_requests(&gw.http, &mock.addrs[0]).await;
    assert_eq!(seen.len(), 3, "{seen:?}");
    // The backend's conversation id is Sluice's thread id (unique in the organisation).
    for r in &seen {
        assert_eq!(r["body"]["conversation_id"], json!(t1.thread), "{seen:?}");
    }
    let texts: Vec<_> = seen.iter().map(|r| r["body"]["message"].clone()).collect();
    assert_eq!(
        texts,
        [
            json!("Hello chat"),
            json!("Second question"),
            json!("Third")
        ]
    );
}

#[tokio::test]
async fn a_retried_user_message_reattaches_to_its_run_and_the_backend_sees_one_run() {
    let mock = mock_agent();
    let gw = gateway(&mock.addrs[0]);
    let chat = "chat-retry";
    let body = submit(
        chat,
        &[user("retry-1", "scenario:slow tokens=40 delay_ms=40")],
    );
    // The first attempt reads a little, then the client gives up (a timeout, a reload).
    let mut resp = post_chat(&gw, None, &body, false).await;
    assert_eq!(resp.status(), 200);
    assert!(!reattached(&resp));
    let run = header(&resp, "x-run-id").unwrap();
    let thread = header(&resp, "x-thread-id").unwrap();
    let mut seen = String::new();
    while parse_sse(&seen).0.len() < 4 {
        let chunk = resp.chunk().await.unwrap().expect("the stream goes on");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    drop(resp);

    // A retry in 202 mode while the run goes on: the run in progress.
    let resp = post_chat(&gw, None, &body, true).await;
    assert_eq!(resp.status(), 202);
    assert!(reattached(&resp), "x-sluice-reattached: true");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(
        (&v["runId"], &v["threadId"], &v["status"]),
        (&json!(run), &json!(thread), &json!("in_progress")),
        "re-attached while the run was in progress"
    );
    // The streaming retry (same chat, same message id) gets the run from its start.
    let retry = chat_turn(&gw, None, &body).await;
    assert!(retry.reattached, "x-sluice-reattached: true");
    assert_eq!((&retry.run, &retry.thread), (&run, &thread));
    assert_eq!(retry.chunks()[0]["type"], "start");
    let snap = gw.wait_terminal(chat).await;
    assert_eq!(snap["streamStatus"], "completed");
    assert_eq!(retry.message(), snap["messages"][1]);
    assert_eq!(text_of(&snap["messages"][1]), tokens(40));

    // After the end too, in both modes.
    let late = chat_turn(&gw, None, &body).await;
    assert!(late.reattached);
    assert_eq!(late.run, run);
    assert_eq!(late.message(), snap["messages"][1]);
    let resp = post_chat(&gw, None, &body, true).await;
    assert_eq!(resp.status(), 202);
    assert!(reattached(&resp));
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["runId"], json!(run));

    // One run in the thread, one backend run for the message.
    let snap = gw.wait_terminal(chat).await;
    assert_eq!(ids(&snap).len(), 2, "{snap}");
    let runs = backend_runs(&gw, &mock, &thread).await;
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert_eq!(mock_requests(&gw.http, &mock.addrs[0]).await.len(), 1);
}

/// Message ids are the client's: two chats may hold messages with one id (a client numbering
/// messages per chat, a chat forked from another). A retry is the same message in the same
/// chat; the same id in another chat is that chat's own first turn.
#[tokio::test]
async fn one_message_id_in_two_chats_makes_two_runs() {
    let mock = mock_agent();
    let gw = gateway(&mock.addrs[0]);
    let a = chat_turn(
        &gw,
        None,
        &submit("chat-one", &[user("m-1", "in chat one")]),
    )
    .await;
    let b = chat_turn(
        &gw,
        None,
        &submit("chat-two", &[user("m-1", "in chat two")]),
    )
    .await;
    assert!(
        !b.reattached,
        "chat-two's first message re-attached to chat-one's run"
    );
    assert_ne!((&b.thread, &b.run), (&a.thread, &a.run));
    assert_eq!(text_of(&b.message()), expected_answer("in chat two", 1));
    let snap = gw.wait_terminal("chat-two").await;
    assert_eq!(text_of(&snap["messages"][0]), "in chat two");
    assert_eq!(snap["messages"][1], b.message());
    let snap = gw.wait_terminal("chat-one").await;
    assert_eq!(ids(&snap).len(), 2);
    assert_eq!(text_of(&snap["messages"][0]), "in chat one");
    assert_eq!(mock_requests(&gw.http, &mock.addrs[0]).await.len(), 2);
}

#[tokio::test]
async fn regenerating_replaces_the_answer_and_a_retried_regenerate_reattaches() {
    let mock = mock_agent();
    let gw = gateway(&mock.addrs[0]);
    let chat = "chat-regenerate";
    let u1 = user("q1", "Question one");
    let u2 = user("q2", "Question two");
    let t1 = chat_turn(&gw, None, &submit(chat, std::slice::from_ref(&u1))).await;
    let a1 = t1.message();
    let t2 = chat_turn(
        &gw,
        None,
        &submit(chat, &[u1.clone(), a1.clone(), u2.clone()]),
    )
    .await;
    let a2 = t2.message();
    let history = [u1.clone(), a1.clone(), u2.clone()];

    // The SDK regenerates a2: the messages up to u2, and a2's id.
    let regen = regenerate(chat, &history, Some(&id_of(&a2)));
    let r = chat_turn(&gw, None, &regen).await;
    assert!(!r.reattached, "a regenerate is a new run");
    assert_eq!(r.thread, t1.thread);
    assert_ne!(r.run, t2.run);
    let a2b = r.message();
    assert_ne!(id_of(&a2b), id_of(&a2), "a new assistant message");
    assert!(
        text_of(&a2b).starts_with("Hello! You said: Question two"),
        "{a2b}"
    );
    let snap = gw.wait_terminal(chat).await;
    assert_eq!(
        ids(&snap),
        ["q1".to_string(), id_of(&a1), "q2".into(), id_of(&a2b)],
        "the regenerated answer replaces the old one"
    );
    assert_eq!(snap["messages"][3], a2b);
    let seen = mock_requests(&gw.http, &mock.addrs[0]).await;
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert_eq!(seen[2]["body"]["message"], "Question two");

    // The same regenerate again (a retry): the same run, no third backend run for it.
    let again = chat_turn(&gw, None, &regen).await;
    assert!(again.reattached, "a retried regenerate re-attaches");
    assert_eq!(again.run, r.run);
    assert_eq!(again.message(), a2b);
    assert_eq!(mock_requests(&gw.http, &mock.addrs[0]).await.len(), 3);
    let snap = gw.wait_terminal(chat).await;
    assert_eq!(
        ids(&snap),
        ["q1".to_string(), id_of(&a1), "q2".into(), id_of(&a2b)]
    );

    // `chat.regenerate()` without a message id regenerates the latest answer, each time anew.
    let mut latest = a2b.clone();
    for n in 4..=5 {
        let r = chat_turn(&gw, None, &regenerate(chat, &history, None)).await;
        assert!(!r.reattached, "regenerate #{n}");
        let answer = r.message();
        assert_ne!(id_of(&answer), id_of(&latest));
        let snap = gw.wait_terminal(chat).await;
        assert_eq!(
            ids(&snap),
            ["q1".to_string(), id_of(&a1), "q2".into(), id_of(&answer)]
        );
        assert_eq!(snap["messages"][3], answer);
        assert_eq!(mock_requests(&gw.http, &mock.addrs[0]).await.len(), n);
        latest = answer;
    }

    // Regenerating an earlier answer drops the turns after it, as the SDK does on the client.
    let r = chat_turn(
        &gw,
        None,
        &regenerate(chat, std::slice::from_ref(&u1), Some(&id_of(&a1))),
    )
    .await;
    assert!(!r.reattached);
    let a1b = r.message();
    assert_ne!(id_of(&a1b), id_of(&a1));
    assert!(text_of(&a1b).starts_with("Hello! You said: Question one"));
    let snap = gw.wait_terminal(chat).await;
    assert_eq!(ids(&snap), ["q1".to_string(), id_of(&a1b)]);
    assert_eq!(snap["messages"][1], a1b);

    // And the chat goes on from there.
    let u3 = user("q3", "Question three");
    let t3 = chat_turn(&gw, None, &submit(chat, &[u1.clone(), a1b.clone(), u3])).await;
    let a3 = t3.message();
    let snap = gw.wait_terminal(chat).await;
    assert_eq!(
        ids(&snap),
        ["q1".to_string(), id_of(&a1b), "q3".into(), id_of(&a3)]
    );
    assert!(text_of(&a3).starts_with("Hello! You said: Question three"));
}

/// The SDK's edit (`sendMessage({text, messageId})`): the same user message id with other
/// parts is a new answer replacing the old turn and the turns after it; sent again unchanged,
/// it re-attaches.
#[tokio::test]
async fn an_edited_message_gets_a_new_answer_that_replaces_the_old_turns() {
    let mock = mock_agent();
    let gw = gateway(&mock.addrs[0]);
    let chat = "chat-edit";
    let u1 = user("e1", "First wording");
    let t1 = chat_turn(&gw, None, &submit(chat, std::slice::from_ref(&u1))).await;
    let a1 = t1.message();
    let u2 = user("e2", "Second question");
    chat_turn(&gw, None, &submit(chat, &[u1.clone(), a1.clone(), u2])).await;
    // Edit the first message: the SDK cuts the history after it and sends it with new parts.
    let edited = user("e1", "Second wording");
    let mut body = submit(chat, std::slice::from_ref(&edited));
    body["messageId"] = json!("e1");
    let e = chat_turn(&gw, None, &body).await;
    assert!(!e.reattached, "an edit is a new run");
    assert_eq!(e.thread, t1.thread);
    let answer = e.message();
    assert_ne!(id_of(&answer), id_of(&a1));
    assert!(
        text_of(&answer).starts_with("Hello! You said: Second wording"),
        "{answer}"
    );
    let snap = gw.wait_terminal(chat).await;
    assert_eq!(ids(&snap), ["e1".to_string(), id_of(&answer)]);
    assert_eq!(text_of(&snap["messages"][0]), "Second wording");
    assert_eq!(snap["messages"][1], answer);
    let asked = mock_requests(&gw.http, &mock.addrs[0]).await;
    assert_eq!(asked.len(), 3, "{asked:?}");
    assert_eq!(asked[2]["body"]["message"], "Second wording");
    // The edit sent again, unchanged: a retry, re-attached, with no new backend run.
    let again = chat_turn(&gw, None, &body).await;
    assert!(again.reattached);
    assert_eq!(again.run, e.run);
    assert_eq!(mock_requests(&gw.http, &mock.addrs[0]).await.len(), 3);
}

#[tokio::test]
async fn the_chat_resume_route_replays_the_run_in_progress_and_honours_last_event_id() {
    let mock = mock_agent();
    let gw = gateway(&mock.addrs[0]);
    // A chat this organisation never started: nothing to resume.
    let (status, body) = get_body(&gw, None, "/api/chat/never-started/stream", None).await;
    assert_eq!((status, body.as_str()), (204, ""));

    let chat = "chat-resume";
    let u1 = user("r1", "scenario:slow tokens=30 delay_ms=40");
    let resp = post_chat(&gw, None, &submit(chat, std::slice::from_ref(&u1)), false).await;
    assert_eq!(resp.status(), 200);
    let original = tokio::spawn(async move { resp.text().await.unwrap() });
    let g = &gw;
    wait_until("the run's first events", || async move {
        last_seq(g, None, chat).await >= 3
    })
    .await;
    // Mid-run, no cursor: the whole run from its start, the same chunks with the same ids as
    // the stream that started it.
    let (status, replay) = get_body(&gw, None, &format!("/api/chat/{chat}/stream"), None).await;
    assert_eq!(status, 200, "{replay}");
    let (replayed, _) = parse_sse(&replay);
    let (first, _) = parse_sse(&original.await.unwrap());
    assert_eq!(replayed, first, "a replay is the run's stream, whole");
    assert_ids(&replayed);
    let chunks = chunks_of(&replayed);
    assert_eq!(chunks[0]["type"], "start");
    let snap = gw.wait_terminal(chat).await;
    assert_eq!(reduce_ui(&chunks).unwrap(), snap["messages"][1]);
    assert_eq!(text_of(&snap["messages"][1]), tokens(30));
    let run1_end = snap["lastSeq"].as_u64().unwrap();
    // Ended: 204, and the SDK stops trying.
    let (status, body) = get_body(&gw, None, &format!("/api/chat/{chat}/stream"), None).await;
    assert_eq!((status, body.as_str()), (204, ""));

    // A second turn, cut mid-stream, resumed with the last id seen: exactly the rest.
    let u2 = user("r2", "scenario:slow tokens=30 delay_ms=40");
    let a1 = snap["messages"][1].clone();
    let mut resp = post_chat(&gw, None, &submit(chat, &[u1, a1, u2]), false).await;
    assert_eq!(resp.status(), 200);
    let mut seen = String::new();
    while parse_sse(&seen).0.len() < 8 {
        let chunk = resp.chunk().await.unwrap().expect("the stream goes on");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    drop(resp);
    let cut = seen.rfind("\n\n").unwrap();
    let (before, _) = parse_sse(&seen[..cut + 2]);
    let last_id = before.last().unwrap().id.clone().unwrap();
    let (status, rest) = get_body(
        &gw,
        None,
        &format!("/api/chat/{chat}/stream"),
        Some(&last_id),
    )
    .await;
    assert_eq!(status, 200, "{rest}");
    let (after, _) = parse_sse(&rest);
    assert_eq!(after.last().unwrap().data, "[DONE]");
    let mut joined = before.clone();
    joined.extend(after.iter().cloned());
    assert_ids(&joined);
    let snap = gw.wait_terminal(chat).await;
    assert_eq!(
        reduce_ui(&chunks_of(&joined)).unwrap(),
        snap["messages"][3],
        "no gap, no duplicate"
    );
    // The whole second run, from the end of the first: the same stream.
    let (status, whole) = get_body(
        &gw,
        None,
        &format!("/api/chat/{chat}/stream"),
        Some(&run1_end.to_string()),
    )
    .await;
    assert_eq!(status, 200);
    let (whole, _) = parse_sse(&whole);
    assert_eq!(whole, joined);
    // Every cursor of the finished run: exactly what follows it (204 when only [DONE] does).
    let mut sub_event_cursors = 0;
    for (i, ev) in whole[..whole.len() - 1].iter().enumerate() {
        let id = ev.id.clone().unwrap();
        sub_event_cursors += usize::from(id.contains('.'));
        let (status, body) =
            get_body(&gw, None, &format!("/api/chat/{chat}/stream"), Some(&id)).await;
        let want = &whole[i + 1..];
        if want.len() == 1 {
            assert_eq!((status, body.as_str()), (204, ""), "cursor {id}");
            continue;
        }
        assert_eq!(status, 200, "cursor {id}: {body}");
        assert_eq!(parse_sse(&body).0, want, "resuming after {id}");
    }
    assert!(sub_event_cursors > 0, "some cursors are k.j: {whole:?}");
}

#[tokio::test]
async fn the_chat_stop_route_stops_its_run_in_progress() {
    let mock = mock_agent();
    let gw = gateway(&mock.addrs[0]);
    let (status, body) = post_empty(&gw, None, "/api/chat/never-started/stop").await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (404, &json!("thread_not_found"))
    );

    let chat = "chat-stop";
    let u1 = user("s1", "scenario:slow tokens=100 delay_ms=40");
    let resp = post_chat(&gw, None, &submit(chat, std::slice::from_ref(&u1)), false).await;
    assert_eq!(resp.status(), 200);
    let (thread, run) = (
        header(&resp, "x-thread-id").unwrap(),
        header(&resp, "x-run-id").unwrap(),
    );
    let stream = tokio::spawn(async move { resp.text().await.unwrap() });
    let g = &gw;
    wait_until("the run's first events", || async move {
        last_seq(g, None, chat).await >= 3
    })
    .await;
    let (status, body) = post_empty(&gw, None, &format!("/api/chat/{chat}/stop")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "stopped");
    assert_eq!(body["runId"], json!(run));
    assert_eq!(body["threadId"], json!(thread));
    let stopped_at = body["lastSeq"].as_u64().expect("lastSeq");
    // The open stream ends cleanly: an abort chunk, then [DONE].
    let text = tokio::time::timeout(Duration::from_secs(10), stream)
        .await
        .expect("the stream ends after a stop")
        .unwrap();
    let (events, _) = parse_sse(&text);
    let chunks = chunks_of(&events);
    assert_eq!(chunks.last().unwrap()["type"], "abort");
    let snap = gw.wait_terminal(chat).await;
    assert_eq!(snap["streamStatus"], "stopped");
    assert_eq!(snap["lastSeq"].as_u64(), Some(stopped_at));
    let partial = text_of(&snap["messages"][1]);
    assert!(
        partial.starts_with("token0 ") && !partial.contains("token99"),
        "{partial}"
    );
    assert_eq!(reduce_ui(&chunks).unwrap(), snap["messages"][1]);
    // Nothing is left to resume, and the chat takes its next message.
    let (status, _) = get_body(&gw, None, &format!("/api/chat/{chat}/stream"), None).await;
    assert_eq!(status, 204);
    let a1 = snap["messages"][1].clone();
    let t2 = chat_turn(
        &gw,
        None,
        &submit(chat, &[u1, a1, user("s2", "after the stop")]),
    )
    .await;
    assert_eq!(t2.thread, thread);
    let snap = gw.wait_terminal(chat).await;
    assert_eq!(snap["streamStatus"], "completed");
    assert_eq!(ids(&snap).len(), 4);
    assert_eq!(snap["messages"][3], t2.message());
}

#[tokio::test]
async fn a_new_message_while_the_chats_run_is_in_progress_is_409() {
    let mock = mock_agent();
    let gw = gateway(&mock.addrs[0]);
    let chat = "chat-busy";
    let u1 = user("b1", "scenario:slow tokens=60 delay_ms=40");
    let resp = post_chat(&gw, None, &submit(chat, std::slice::from_ref(&u1)), true).await;
    assert_eq!(resp.status(), 202);
    let u2 = user("b2", "too early");
    for poll in [false, true] {
        let resp = post_chat(&gw, None, &submit(chat, &[u1.clone(), u2.clone()]), poll).await;
        let status = resp.status().as_u16();
        let v: Value = resp.json().await.unwrap();
        assert_eq!(
            (status, &v["error"]["code"]),
            (409, &json!("run_in_progress")),
            "{v}"
        );
        assert!(v["error"]["message"].is_string());
    }
    let (_, snap) = gw.conversation(chat).await;
    assert_eq!(
        snap["streamStatus"], "in_progress",
        "the 409s came while the run was in progress"
    );
    assert_eq!(mock_requests(&gw.http, &mock.addrs[0]).await.len(), 1);
    let snap = gw.wait_terminal(chat).await;
    assert_eq!(
        ids(&snap).len(),
        2,
        "the refused message is not in the thread"
    );
    // Once the run has ended, the same message goes through.
    let a1 = snap["messages"][1].clone();
    let t = chat_turn(&gw, None, &submit(chat, &[u1, a1, u2])).await;
    assert!(!t.reattached);
    let snap = gw.wait_terminal(chat).await;
    assert_eq!(ids(&snap)[2], "b2");
    assert_eq!(
        text_of(&snap["messages"][3]),
        expected_answer("too early", 2)
    );
}

#[tokio::test]
async fn bad_chat_bodies_get_400_with_their_code() {
    let mock = mock_agent();
    let gw = gateway(&mock.addrs[0]);
    let ok = [user("u1", "hi")];
    let assistant =
        json!({"id": "a1", "role": "assistant", "parts": [{"type": "text", "text": "x"}]});
    let file = json!({"id": "u1", "role": "user",
                      "parts": [{"type": "file", "mediaType": "image/png", "url": "data:image/png;base64,AA=="}]});
    let cases: Vec<(&str, Vec<u8>, &str)> =
        vec![
        ("not JSON", b"{\"id\": \"bad-1\", ".to_vec(), "invalid_json"),
        ("not an object", b"[1, 2]".to_vec(), "invalid_request"),
        (
            "no id",
            json!({"agentId": 1, "messages": ok, "trigger": "submit-message"}).to_string().into(),
            "invalid_request",
        ),
        ("empty id", submit("", &ok).to_string().into(), "invalid_request"),
        (
            "no messages",
            json!({"agentId": 1, "id": "bad-2", "trigger": "submit-message"}).to_string().into(),
            "invalid_request",
        ),
        ("empty messages", submit("bad-3", &[]).to_string().into(), "invalid_request"),
        (
            "messages not an array",
            json!({"agentId": 1, "id": "bad-4", "messages": "hi", "trigger": "submit-message"})
                .to_string()
                .into(),
            "invalid_request",
        ),
        (
            "last message from the assistant",
            submit("bad-5", &[ok[0].clone(), assistant]).to_string().into(),
            "invalid_request",
        ),
        (
            "last message without text",
            submit("bad-6", &[file]).to_string().into(),
            "invalid_request",
        ),
        (
            "last message with empty text",
            submit("bad-7", &[user("u1", "")]).to_string().into(),
            "invalid_request",
        ),
        (
            "no agentId",
            json!({"id": "bad-8", "messages": ok, "trigger": "submit-message"}).to_string().into(),
            "invalid_request",
        ),
        (
            "agentId of the wrong type",
            json!({"agentId": true, "id": "bad-9", "messages": ok, "trigger": "submit-message"})
                .to_string()
                .into(),
            "invalid_request",
        ),
        (
            "unknown trigger",
            json!({"agentId": 1, "id": "bad-10", "messages": ok, "trigger": "resume-stream"})
                .to_string()
                .into(),
            "invalid_request",
        ),
    ];
    for (what, body, code) in &cases {
        let resp = gw
            .http
            .post(gw.url("/api/chat"))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        assert_eq!(
            (status, v["error"]["code"].as_str()),
            (400, Some(*code)),
            "{what}: {v}"
        );
        assert!(v["error"]["message"].is_string(), "{what}: {v}");
    }
    // Nothing reached the backend, and no chat was created.
    assert!(mock_requests(&gw.http, &mock.addrs[0]).await.is_empty());
    for n in 1..=10 {
        let (status, _) = gw.conversation(&format!("bad-{n}")).await;
        assert_eq!(status, 404, "bad-{n}");
    }
    // A good body on the same gateway goes through (the refusals were about the bodies).
    let t = chat_turn(&gw, None, &submit("good", &ok)).await;
    assert_eq!(text_of(&t.message()), expected_answer("hi", 1));
}

#[tokio::test]
async fn organisations_using_one_chat_id_get_separate_threads() {
    let s = JwtGateway::new();
    let gw = &s.gw;
    let a = s.admin("user_a", "org_a");
    let b = s.admin("user_b", "org_b");
    let (a, b) = (Some(a.as_str()), Some(b.as_str()));
    let chat = "shared-chat-id";

    // Without a token, the chat routes are refused like every other.
    let resp = post_chat(gw, None, &submit(chat, &[user("m1", "hi")]), false).await;
    assert_eq!(resp.status(), 401);
    let (status, _) = get_body(gw, None, &format!("/api/chat/{chat}/stream"), None).await;
    assert_eq!(status, 401);
    let (status, _) = post_empty(gw, None, &format!("/api/chat/{chat}/stop")).await;
    assert_eq!(status, 401);

    // A starts the chat.
    let resp = post_chat(
        gw,
        a,
        &submit(chat, &[user("m1", "scenario:slow tokens=40 delay_ms=40")]),
        true,
    )
    .await;
    assert_eq!(resp.status(), 202);
    let thread_a = header(&resp, "x-thread-id").unwrap();
    // While it runs, B sees nothing of it: not by chat id, not by Sluice's thread id.
    let (status, body) = gw.conversation_as(b, chat).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (404, &json!("thread_not_found"))
    );
    let (status, _) = gw.conversation_as(b, &thread_a).await;
    assert_eq!(status, 404);
    let (status, body) = get_body(gw, b, &format!("/api/chat/{chat}/stream"), None).await;
    assert_eq!(
        (status, body.as_str()),
        (204, ""),
        "B never started this chat"
    );
    let (status, _) = post_empty(gw, b, &format!("/api/chat/{chat}/stop")).await;
    assert_eq!(status, 404);
    for id in [chat, thread_a.as_str()] {
        let (status, _) = get_body(gw, b, &format!("/api/threads/{id}/stream"), None).await;
        assert_eq!(status, 404, "{id}");
        let (status, _) = post_empty(gw, b, &format!("/api/threads/{id}/stop")).await;
        assert_eq!(status, 404, "{id}");
    }
    let (_, snap) = gw.conversation_as(a, chat).await;
    assert_eq!(
        snap["streamStatus"], "in_progress",
        "B's stop touched nothing"
    );

    // B's message in its chat of the same id (and the same message id) is B's own first turn.
    let t = chat_turn(gw, b, &submit(chat, &[user("m1", "hello from b")])).await;
    assert!(!t.reattached, "B's message is not A's");
    assert_ne!(t.thread, thread_a);
    assert_eq!(text_of(&t.message()), expected_answer("hello from b", 1));
    let snap_b = gw.wait_terminal_as(b.unwrap(), chat).await;
    assert_eq!(snap_b["organizationId"], "org_b");
    assert_eq!(
        summary(&snap_b),
        vec![
            ("m1".into(), "user".into(), "hello from b".into()),
            (
                id_of(&t.message()),
                "assistant".into(),
                expected_answer("hello from b", 1)
            ),
        ]
    );
    // A's chat is untouched: its run ran to the end, alone in its thread.
    let snap_a = gw.wait_terminal_as(a.unwrap(), chat).await;
    assert_eq!(snap_a["organizationId"], "org_a");
    assert_eq!(snap_a["streamStatus"], "completed");
    assert_eq!(ids(&snap_a).len(), 2);
    assert_eq!(
        text_of(&snap_a["messages"][0]),
        "scenario:slow tokens=40 delay_ms=40"
    );
    assert_eq!(text_of(&snap_a["messages"][1]), tokens(40));
    let (status, by_thread) = gw.conversation_as(a, &thread_a).await;
    assert_eq!((status, &by_thread["messages"]), (200, &snap_a["messages"]));
    // Two backend conversations, one per organisation.
    let seen = mock_requests(&gw.http, &s.mock.addrs[0]).await;
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_ne!(
        seen[0]["body"]["conversation_id"],
        seen[1]["body"]["conversation_id"]
    );
    let orgs: Vec<_> = seen
        .iter()
        .map(|r| r["headers"]["x-sluice-org-id"].clone())
        .collect();
    assert_eq!(orgs, [json!("org_a"), json!("org_b")]);
}

#[tokio::test]
async fn a_chat_turn_in_202_mode_is_polled_and_reached_by_its_chat_id() {
    let mock = mock_agent();
    let gw = gateway(&mock.addrs[0]);
    // A chat id as a client may choose it: the SDK percent-encodes it into its URLs.
    let chat = "chat 202/ü?#x";
    let enc = "chat%20202%2F%C3%BC%3F%23x";
    let u1 = user("p1", "scenario:slow tokens=20 delay_ms=30");
    let resp = post_chat(&gw, None, &submit(chat, std::slice::from_ref(&u1)), true).await;
    assert_eq!(resp.status(), 202);
    let (thread, run) = (
        header(&resp, "x-thread-id").unwrap(),
        header(&resp, "x-run-id").unwrap(),
    );
    let v: Value = resp.json().await.unwrap();
    assert_eq!(
        v,
        json!({"threadId": thread, "runId": run, "status": "in_progress"})
    );
    // A long-poll by chat id answers once the thread has something after 0.
    let resp = gw
        .http
        .get(gw.url("/api/getConversation"))
        .query(&[("threadId", chat), ("afterSeq", "0"), ("wait", "20")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let polled: Value = resp.json().await.unwrap();
    assert!(polled["lastSeq"].as_u64().unwrap() >= 1, "{polled}");
    assert_eq!(polled["runId"], json!(run));
    let snap = gw.wait_terminal(chat).await;
    assert_eq!(snap["streamStatus"], "completed");
    assert_eq!(text_of(&snap["messages"][1]), tokens(20));
    // The thread routes take the chat id too.
    let (status, body) = get_body(
        &gw,
        None,
        &format!("/api/threads/{enc}/stream?afterSeq=0"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (events, _) = parse_sse(&body);
    assert_eq!(reduce_ui(&chunks_of(&events)).unwrap(), snap["messages"][1]);
    let a1 = snap["messages"][1].clone();
    let resp = post_chat(
        &gw,
        None,
        &submit(
            chat,
            &[u1, a1, user("p2", "scenario:slow tokens=200 delay_ms=40")],
        ),
        true,
    )
    .await;
    assert_eq!(resp.status(), 202);
    assert_eq!(
        header(&resp, "x-thread-id").as_deref(),
        Some(thread.as_str())
    );
    let run2 = header(&resp, "x-run-id").unwrap();
    // Resumable by the encoded chat id while it runs (the response's start is enough here).
    let mut resp = gw
        .http
        .get(gw.url(&format!("/api/chat/{enc}/stream")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "x-run-id").as_deref(), Some(run2.as_str()));
    let mut seen = String::new();
    while parse_sse(&seen).0.is_empty() {
        let chunk = resp.chunk().await.unwrap().expect("the stream goes on");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    let first: Value = serde_json::from_str(&parse_sse(&seen).0[0].data).unwrap();
    assert_eq!(first["type"], "start");
    drop(resp);
    let (status, body) = post_empty(&gw, None, &format!("/api/threads/{enc}/stop")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (&body["status"], &body["runId"]),
        (&json!("stopped"), &json!(run2))
    );
    let snap = gw.wait_terminal(chat).await;
    assert_eq!(snap["streamStatus"], "stopped");
    assert_eq!(ids(&snap).len(), 4);
    let (status, body) = post_empty(&gw, None, &format!("/api/chat/{enc}/stop")).await;
    assert_eq!(
        (status, &body["status"]),
        (200, &json!("stopped")),
        "{body}"
    );
    let (status, _) = get_body(&gw, None, &format!("/api/chat/{enc}/stream"), None).await;
    assert_eq!(status, 204);
}

/// A chat id shaped like Sluice's own thread ids (a UUID, as `crypto.randomUUID()` makes) is
/// still the client's: it names a thread of its own, reached by it on every route.
#[tokio::test]
async fn a_uuid_chat_id_is_a_chat_id() {
    let mock = mock_agent();
    let gw = gateway(&mock.addrs[0]);
    let chat = "0b5c3a8e-2f4d-4c1b-9a7e-6d2f8e1c3b5a";
    let t = chat_turn(&gw, None, &submit(chat, &[user("m1", "uuid chat")])).await;
    assert_ne!(
        t.thread, chat,
        "Sluice made a thread of its own for the chat"
    );
    let (status, snap) = gw.conversation(chat).await;
    assert_eq!(status, 200, "{snap}");
    assert_eq!(snap["threadId"], json!(t.thread));
    assert_eq!(snap["messages"][1], t.message());
    let (status, _) = get_body(&gw, None, &format!("/api/threads/{chat}/stream"), None).await;
    assert_eq!(status, 204);
    // A second turn by the chat id continues the same thread.
    let t2 = chat_turn(
        &gw,
        None,
        &submit(
            chat,
            &[user("m1", "uuid chat"), t.message(), user("m2", "again")],
        ),
    )
    .await;
    assert_eq!(t2.thread, t.thread);
}

/// The AI SDK sends the whole history with every turn: a chat body may be larger than
/// `limits.max_body_bytes`, up to `limits.max_chat_body_bytes` (413 beyond, with nothing
/// started), and only its last message counts.
#[tokio::test]
async fn a_long_chat_history_is_taken_up_to_its_own_limit() {
    let mock = mock_agent();
    let gw = gateway_with(
        &mock.addrs[0],
        "",
        "[limits]\nmax_body_bytes = 16384\nmax_chat_body_bytes = 65536\n",
    );
    let history = |bytes: usize, last: &str| {
        let mut messages: Vec<Value> = (0..bytes / 1_000)
            .map(|i| {
                let role = if i % 2 == 0 { "user" } else { "assistant" };
                json!({"id": format!("h{i}"), "role": role,
                       "parts": [{"type": "text", "text": "y".repeat(1_000)}]})
            })
            .collect();
        messages.push(user(last, "after a long history"));
        messages
    };
    // 40 KB: over max_body_bytes, under the chat limit.
    let t = chat_turn(&gw, None, &submit("long-chat", &history(40_000, "n1"))).await;
    assert_eq!(
        text_of(&t.message()),
        expected_answer("after a long history", 1)
    );
    let snap = gw.wait_terminal("long-chat").await;
    assert_eq!(ids(&snap), ["n1".to_string(), id_of(&t.message())]);
    // 80 KB: refused, and nothing started.
    let resp = post_chat(
        &gw,
        None,
        &submit("long-chat", &history(80_000, "n2")),
        false,
    )
    .await;
    assert_eq!(resp.status(), 413);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "payload_too_large");
    assert_eq!(mock_requests(&gw.http, &mock.addrs[0]).await.len(), 1);
    // Other routes keep `max_body_bytes`.
    let resp = gw
        .http
        .post(gw.url("/api/invokeAgent"))
        .json(&json!({"agentId": 1, "message": user("n3", &"z".repeat(40_000))}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
}
