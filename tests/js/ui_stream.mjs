// Reads Sluice's UI-message stream with the AI SDK's own client code (DefaultChatTransport +
// readUIMessageStream), in a current ai@5, in ai@5.0.100, whose chunk schemas are strict
// (any extra key or unknown chunk type fails), and in ai@6 (the newest that runs on Node 20). For each prompt, the message the SDK rebuilds
// must equal the assistant message of Sluice's snapshot.
//
// usage: node ui_stream.mjs BASE_URL PROMPT...      prints one JSON line per check; exit 1 on failure

import * as current from 'ai';
import * as strict from 'ai-strict';
import * as v6 from 'ai6';

const [base, ...prompts] = process.argv.slice(2);
let failed = false;

async function check(name, ai, prompt) {
  let threadId = null;
  const transport = new ai.DefaultChatTransport({
    api: `${base}/api/invokeAgent`,
    prepareSendMessagesRequest: ({ messages }) => ({ body: { agentId: 1, message: messages.at(-1) } }),
    fetch: async (url, init) => {
      const res = await fetch(url, init);
      threadId = res.headers.get('x-thread-id');
      return res;
    },
  });
  const stream = await transport.sendMessages({
    chatId: 'chat-1', trigger: 'submit-message', messageId: undefined, abortSignal: undefined,
    messages: [{ id: `u-${name}-${Date.now()}`, role: 'user', parts: [{ type: 'text', text: prompt }] }],
  });
  let last;
  const errors = [];
  for await (const msg of ai.readUIMessageStream({ stream, terminateOnError: false, onError: (e) => errors.push(String(e)) })) {
    last = msg;
  }
  // The SDK's reader validates every chunk; a schema failure surfaces as an error here.
  const schemaErrors = errors.filter((e) => /TypeValidation|invalid_union|unrecognized_keys|Cannot read properties/.test(e));
  let snap;
  for (let i = 0; i < 200; i++) {
    snap = await (await fetch(`${base}/api/getConversation?threadId=${threadId}`)).json();
    if (snap.streamStatus !== 'in_progress') break;
    await new Promise((r) => setTimeout(r, 25));
  }
  const want = JSON.stringify(snap.messages[1]);
  const got = JSON.stringify(JSON.parse(JSON.stringify(last)));
  // ai < 5.0.1xx does not keep the reasoning part's `id`; Sluice's snapshot follows the
  // current v5 shape, so compare the older client without it.
  const norm = name.includes('strict') ? dropReasoningIds : (m) => m;
  const ok = schemaErrors.length === 0 && canonical(norm(got)) === canonical(norm(want));
  if (!ok) failed = true;
  console.log(JSON.stringify({ client: name, prompt, ok, streamStatus: snap.streamStatus, errors, got: ok ? undefined : JSON.parse(got), want: ok ? undefined : JSON.parse(want) }));
}

function dropReasoningIds(json) {
  const m = JSON.parse(json);
  for (const p of m.parts ?? []) if (p.type === 'reasoning') delete p.id;
  return JSON.stringify(m);
}

// Key order does not matter; compare with sorted keys.
function canonical(json) {
  const sort = (v) => Array.isArray(v) ? v.map(sort)
    : v && typeof v === 'object' ? Object.fromEntries(Object.keys(v).sort().map((k) => [k, sort(v[k])])) : v;
  return JSON.stringify(sort(JSON.parse(json)));
}

for (const prompt of prompts) {
  await check('ai@5-current', current, prompt);
  await check('ai@5.0.100-strict', strict, prompt);
  await check('ai@6', v6, prompt);
}
process.exit(failed ? 1 : 0);
