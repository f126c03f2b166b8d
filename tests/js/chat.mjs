// `useChat` talking to Sluice natively: the AI SDK's own DefaultChatTransport, configured with
// nothing but `api: {base}/api/chat`, `headers` (the bearer token) and `body: {agentId}`, and
// the AbstractChat class that useChat is built on. For ai@5 and ai@6:
//
//   (a) a new chat with a client-chosen id: the streamed message equals the snapshot's
//       (getConversation?threadId=<chat id>);
//   (b) a continued chat ([u1, a1, u2]): the snapshot holds the four messages in order;
//   (c) a turn whose fetch is aborted mid-stream is resumed with reconnectToStream (GET
//       {api}/{chatId}/stream) and rebuilds exactly the snapshot's final message;
//   (d) reconnectToStream gives null once the run has ended (and for an unknown chat);
//   (e) regenerate-message (messageId = a2) makes a new message that replaces a2 in the
//       snapshot;
//   and AbstractChat: sendMessage twice, regenerate(), stop() mid-answer then resumeStream();
//   its `messages` end equal to the snapshot's (ids, roles, text).
//
// usage: node chat.mjs BASE_URL [TOKEN]     prints one JSON line per check; exit 1 on failure

import * as v5 from 'ai';
import * as v6 from 'ai6';

const [base, token] = process.argv.slice(2);
const auth = token ? { authorization: `Bearer ${token}` } : {};
let failed = false;

// A hung stream fails the run rather than the test harness waiting forever.
setTimeout(() => {
  console.log(JSON.stringify({ ok: false, error: 'chat.mjs did not finish within 240 s' }));
  process.exit(1);
}, 240_000).unref();

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const unique = (label) => `${label}-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 10)}`;
const user = (id, text) => ({ id, role: 'user', parts: [{ type: 'text', text }] });
const textOf = (m) => (m?.parts ?? []).filter((p) => p.type === 'text').map((p) => p.text).join('');
const plain = (v) => (v === undefined ? undefined : JSON.parse(JSON.stringify(v)));

// Key order does not matter; compare with sorted keys (and without `undefined` values).
function canonical(v) {
  const sort = (x) => Array.isArray(x) ? x.map(sort)
    : x && typeof x === 'object' ? Object.fromEntries(Object.keys(x).sort().map((k) => [k, sort(x[k])])) : x;
  return JSON.stringify(sort(plain(v) ?? null));
}

function transportOf(ai) {
  return new ai.DefaultChatTransport({ api: `${base}/api/chat`, headers: auth, body: { agentId: 1 } });
}

async function snapshot(chatId) {
  const res = await fetch(`${base}/api/getConversation?threadId=${encodeURIComponent(chatId)}`, { headers: auth });
  return { status: res.status, body: await res.json().catch(() => null) };
}

// The chat's snapshot once its latest run has ended.
async function settled(chatId) {
  const deadline = Date.now() + 30_000;
  for (;;) {
    const { status, body } = await snapshot(chatId);
    if (status !== 200) throw new Error(`getConversation ${chatId}: ${status} ${JSON.stringify(body)}`);
    if (body.streamStatus !== 'in_progress') return body;
    if (Date.now() > deadline) throw new Error(`the run of ${chatId} never ended: ${JSON.stringify(body)}`);
    await sleep(25);
  }
}

async function lastMessage(ai, stream) {
  let last;
  for await (const msg of ai.readUIMessageStream({ stream, terminateOnError: true })) last = msg;
  return last;
}

async function send(ai, transport, chatId, messages, trigger = 'submit-message', messageId = undefined) {
  const stream = await transport.sendMessages({
    chatId, messages, trigger, messageId, abortSignal: new AbortController().signal,
  });
  return lastMessage(ai, stream);
}

const summary = (messages) => (messages ?? []).map((m) => ({ id: m.id, role: m.role, text: textOf(m) }));

async function check(client, name, body) {
  let result;
  try {
    result = await body();
  } catch (e) {
    result = { ok: false, error: String(e?.stack ?? e) };
  }
  if (!result.ok) failed = true;
  console.log(JSON.stringify({ client, check: name, ...result }));
}

async function transportChecks(client, ai) {
  const transport = transportOf(ai);
  const chatId = unique(`chat-${client}`);
  const u1 = user(`u1-${chatId}`, 'Hello from useChat');
  const u2 = user(`u2-${chatId}`, 'And a second question');
  let a1;
  let a2;

  await check(client, 'a new chat with a client-chosen id streams the snapshot message', async () => {
    const before = await snapshot(chatId);
    a1 = await send(ai, transport, chatId, [u1]);
    const snap = await settled(chatId);
    const ok = before.status === 404
      && snap.streamStatus === 'completed'
      && snap.messages.length === 2
      && snap.messages[0].id === u1.id && textOf(snap.messages[0]) === textOf(u1)
      && canonical(a1) === canonical(snap.messages[1])
      && textOf(a1) === 'Hello! You said: Hello from useChat (turn 1).';
    return { ok, before: before.status, got: ok ? undefined : a1, want: ok ? undefined : snap.messages };
  });

  await check(client, 'a continued chat keeps the history in order', async () => {
    a2 = await send(ai, transport, chatId, [u1, a1, u2]);
    const snap = await settled(chatId);
    const ids = snap.messages.map((m) => m.id);
    const ok = JSON.stringify(ids) === JSON.stringify([u1.id, a1.id, u2.id, a2.id])
      && JSON.stringify(snap.messages.map((m) => m.role)) === '["user","assistant","user","assistant"]'
      && canonical(a2) === canonical(snap.messages[3])
      && textOf(a2) === 'Hello! You said: And a second question (turn 2).';
    return { ok, got: ok ? undefined : a2, want: ok ? undefined : summary(snap.messages) };
  });

  await check(client, 'regenerate-message replaces the regenerated answer', async () => {
    const again = await send(ai, transport, chatId, [u1, a1, u2], 'regenerate-message', a2.id);
    const snap = await settled(chatId);
    const ids = snap.messages.map((m) => m.id);
    const ok = Boolean(again) && again.id !== a2.id
      && JSON.stringify(ids) === JSON.stringify([u1.id, a1.id, u2.id, again.id])
      && canonical(again) === canonical(snap.messages[3])
      && textOf(again).startsWith('Hello! You said: And a second question');
    return { ok, oldId: a2?.id, newId: again?.id, got: ok ? undefined : again, want: ok ? undefined : summary(snap.messages) };
  });

  // A chat id with characters the SDK percent-encodes into the reconnect URL.
  const slowChat = unique(`chat ${client}/slow ü`);
  await check(client, 'an aborted turn resumes with reconnectToStream', async () => {
    const abort = new AbortController();
    const stream = await transport.sendMessages({
      chatId: slowChat,
      messages: [user(`u1-${slowChat}`, 'scenario:slow tokens=50 delay_ms=40')],
      trigger: 'submit-message', messageId: undefined, abortSignal: abort.signal,
    });
    // Read a few chunks, then the page goes away (the fetch is aborted).
    const reader = stream.getReader();
    let startId;
    let seen = '';
    let chunks = 0;
    while (!seen.includes('token2 ')) {
      const { value, done } = await reader.read();
      if (done) throw new Error(`the stream ended after ${chunks} chunks, before the abort`);
      chunks += 1;
      if (value.type === 'start') startId = value.messageId;
      if (value.type === 'text-delta') seen += value.delta;
    }
    abort.abort();
    await reader.cancel().catch(() => {});
    const resumed = await transport.reconnectToStream({ chatId: slowChat });
    if (resumed === null) throw new Error('reconnectToStream gave null while the run was in progress');
    const message = await lastMessage(ai, resumed);
    const snap = await settled(slowChat);
    const want = snap.messages.at(-1);
    const full = Array.from({ length: 50 }, (_, i) => `token${i} `).join('');
    const ok = snap.streamStatus === 'completed' && snap.messages.length === 2
      && message?.id === startId && message.id === want.id
      && textOf(message) === textOf(want) && textOf(message) === full
      && canonical(message) === canonical(want);
    return { ok, chunksBeforeAbort: chunks, got: ok ? undefined : message, want: ok ? undefined : want };
  });

  await check(client, 'reconnectToStream is null after the end and for an unknown chat', async () => {
    await settled(slowChat);
    const ended = await transport.reconnectToStream({ chatId: slowChat });
    const endedFirst = await transport.reconnectToStream({ chatId });
    const unknown = await transport.reconnectToStream({ chatId: unique('never-used') });
    const ok = ended === null && endedFirst === null && unknown === null;
    return { ok, ended: ended === null, endedFirst: endedFirst === null, unknown: unknown === null };
  });
}

// A ChatState as @ai-sdk/react's Chat keeps it: arrays replaced on change, snapshots cloned.
class State {
  constructor(messages = []) {
    this.status = 'ready';
    this.error = undefined;
    this.messages = messages;
  }

  pushMessage = (message) => { this.messages = this.messages.concat(message); };

  popMessage = () => { this.messages = this.messages.slice(0, -1); };

  replaceMessage = (index, message) => {
    this.messages = [...this.messages.slice(0, index), this.snapshot(message), ...this.messages.slice(index + 1)];
  };

  snapshot = (value) => structuredClone(value);
}

async function abstractChatCheck(client, ai) {
  class Chat extends ai.AbstractChat {
    constructor(init) {
      super({ ...init, state: new State() });
    }
  }
  await check(client, 'AbstractChat: send twice, regenerate, stop then resumeStream', async () => {
    const errors = [];
    const chatId = unique(`chat-${client}-abstract`);
    const chat = new Chat({ id: chatId, transport: transportOf(ai), onError: (e) => errors.push(String(e)) });
    await chat.sendMessage({ text: 'first question' });
    await chat.sendMessage({ text: 'second question' });
    const secondAnswer = chat.messages.at(-1)?.id;
    await chat.regenerate();
    const regenerated = chat.messages.at(-1)?.id;
    const sending = chat.sendMessage({ text: 'scenario:slow tokens=50 delay_ms=40' });
    const deadline = Date.now() + 30_000;
    while (!(chat.messages.at(-1)?.role === 'assistant' && textOf(chat.messages.at(-1)).includes('token2 '))) {
      if (Date.now() > deadline) throw new Error(`no answer arrived: ${JSON.stringify(summary(chat.messages))}`);
      await sleep(5);
    }
    await chat.stop();
    await sending;
    const partial = textOf(chat.messages.at(-1));
    const stoppedStatus = chat.status;
    await chat.resumeStream();
    const snap = await settled(chatId);
    const got = summary(chat.messages);
    const want = summary(snap.messages);
    const full = Array.from({ length: 50 }, (_, i) => `token${i} `).join('');
    const ok = errors.length === 0 && chat.status === 'ready' && stoppedStatus === 'ready'
      && snap.streamStatus === 'completed'
      && got.length === 6 && canonical(got) === canonical(want)
      && secondAnswer !== regenerated
      && JSON.stringify(got.map((m) => m.role)) === '["user","assistant","user","assistant","user","assistant"]'
      && !partial.includes('token49') && got[5].text === full;
    return {
      ok, errors, partialLength: partial.length, secondAnswer, regenerated,
      got: ok ? undefined : got, want: ok ? undefined : want,
    };
  });
}

for (const [client, ai] of [['ai@5', v5], ['ai@6', v6]]) {
  await transportChecks(client, ai);
  await abstractChatCheck(client, ai);
}
process.exit(failed ? 1 : 0);
