// The AI SDK's resume contract against Sluice (useChat({resume: true}) → reconnectToStream →
// GET {api}/{chatId}/stream): during a run, the full stream is replayed and rebuilds the
// snapshot's message (same id); once the run has ended, 204 → null.
//
// usage: node resume.mjs BASE_URL      prints one JSON line per check; exit 1 on failure

import * as current from 'ai';
import * as strict from 'ai-strict';

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

await check('ai@5-current', current);
await check('ai@5.0.100-strict', strict);
process.exit(failed ? 1 : 0);
