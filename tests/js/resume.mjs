// The AI SDK's resume contract against Sluice (useChat({resume: true}) → reconnectToStream →
// GET {api}/{chatId}/stream): during a run, the full stream is replayed and rebuilds the
// snapshot's message (same id); once the run has ended, 204 → null. On a thread with several
// runs, a page reload mid-answer (a new transport, no cursor) replays the run in progress, and
// only it, even after a first reload was cut off mid-stream.
//
// usage: node resume.mjs BASE_URL      prints one JSON line per check; exit 1 on failure

import * as current from 'ai';
import * as strict from 'ai-strict';
import * as v6 from 'ai6';

const base = process.argv[2];
let failed = false;

async function check(name, ai) {
  const start = await fetch(`${base}/api/invokeAgent`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', 'x-stream-response': 'false' },
    body: JSON.stringify({ agentId: 1, message: { role: 'user', parts: [{ type: 'text', text: 'scenario:slow tokens=15 delay_ms=40' }] } }),
  });
  const { threadId } = await start.json();
  await new Promise((r) => setTimeout(r, 150));
  const transport = new ai.DefaultChatTransport({ api: `${base}/api/threads` });
  const stream = await transport.reconnectToStream({ chatId: threadId });
  let last;
  if (stream) {
    for await (const msg of ai.readUIMessageStream({ stream, terminateOnError: true })) last = msg;
  }
  let snap;
  for (let i = 0; i < 200; i++) {
    snap = await (await fetch(`${base}/api/getConversation?threadId=${threadId}`)).json();
    if (snap.streamStatus !== 'in_progress') break;
    await new Promise((r) => setTimeout(r, 25));
  }
  const replayed = stream !== null && last && last.id === snap.messages[1].id
    && JSON.stringify(last.parts.map((p) => p.text ?? p.type)) === JSON.stringify(snap.messages[1].parts.map((p) => p.text ?? p.type));
  const idle = await transport.reconnectToStream({ chatId: threadId });
  const ok = Boolean(replayed) && idle === null;
  if (!ok) failed = true;
  console.log(JSON.stringify({ client: name, ok, replayed: Boolean(replayed), idleIsNull: idle === null, got: ok ? undefined : last, want: ok ? undefined : snap.messages[1] }));
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function invoke(text, threadId) {
  const res = await fetch(`${base}/api/invokeAgent`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', 'x-stream-response': 'false' },
    body: JSON.stringify({ agentId: 1, threadId, message: { role: 'user', parts: [{ type: 'text', text }] } }),
  });
  return (await res.json()).threadId;
}

async function settled(threadId) {
  let snap;
  for (let i = 0; i < 400; i++) {
    snap = await (await fetch(`${base}/api/getConversation?threadId=${threadId}`)).json();
    if (snap.streamStatus !== 'in_progress') return snap;
    await sleep(25);
  }
  return snap;
}

const shape = (m) => JSON.stringify(m.parts.map((p) => p.text ?? p.type));

async function checkReloadOnSeveralRuns(name, ai) {
  const threadId = await invoke('first question');
  await settled(threadId);
  await invoke('second question', threadId);
  await settled(threadId);
  await invoke('scenario:slow tokens=20 delay_ms=40', threadId);
  await sleep(200);
  // A first page load reads part of the answer, then the page goes away.
  const first = await new ai.DefaultChatTransport({ api: `${base}/api/threads` }).reconnectToStream({ chatId: threadId });
  const reader = first.getReader();
  await reader.read();
  await reader.cancel();
  // The reloaded page's transport resumes: the third run, whole, and nothing of the others.
  const stream = await new ai.DefaultChatTransport({ api: `${base}/api/threads` }).reconnectToStream({ chatId: threadId });
  let last;
  let messages = 0;
  if (stream) {
    for await (const msg of ai.readUIMessageStream({ stream, terminateOnError: true })) {
      if (msg.id !== last?.id) messages += 1;
      last = msg;
    }
  }
  const snap = await settled(threadId);
  const want = snap.messages[5];
  const ok = Boolean(last) && messages === 1 && snap.messages.length === 6 && last.id === want.id && shape(last) === shape(want);
  if (!ok) failed = true;
  console.log(JSON.stringify({ client: name, check: 'reload on a thread with several runs', ok, got: ok ? undefined : last, want: ok ? undefined : want }));
}

await check('ai@5-current', current);
await check('ai@5.0.100-strict', strict);
await checkReloadOnSeveralRuns('ai@5-current', current);
await checkReloadOnSeveralRuns('ai@5.0.100-strict', strict);
await checkReloadOnSeveralRuns('ai@6', v6);
process.exit(failed ? 1 : 0);
