// The demo's chat page (`GET /` of `sluice demo`) in a real browser (Debian's Chromium, headless,
// driven by playwright-core), used as a person would: it must show every answer exactly once,
// whole and in order, after a dropped connection, after a page reload mid-answer, after the
// connection broke off mid-event, and in poll mode; and what it shows must be what the
// gateway's snapshot holds.
//
// usage: node browser.mjs BASE_URL [SCREENSHOT_PATH]
//   prints one JSON line per check ({"check", "ok", …}); exits 1 if any failed.
//   The screenshot is taken after a drop, while the resumed answer is still streaming.
//   CHROMIUM=/path/to/chromium overrides /usr/bin/chromium.
//
// The browser reaches the gateway through a TCP relay of this script's own, which passes
// everything through until told to break the next stream off in the middle of an event (as a
// network or a gateway going away would).

import net from 'node:net';
import { chromium } from 'playwright-core';

const [base, screenshotPath] = process.argv.slice(2);
if (!base) {
  console.error('usage: node browser.mjs BASE_URL [SCREENSHOT_PATH]');
  process.exit(2);
}
const executablePath = process.env.CHROMIUM || '/usr/bin/chromium';
// Generous: a loaded 2-core machine runs the gateway, its mock agent and Chromium.
const WAIT = { timeout: 90_000 };

let failed = false;
function report(check, ok, details = {}) {
  if (!ok) failed = true;
  console.log(JSON.stringify({ check, ok: Boolean(ok), ...details }));
}

// `token0 token1 … token{n-1} `: the mock agent's slow answer.
const tokens = (n) => Array.from({ length: n }, (_, i) => `token${i} `).join('');
const textOf = (message) => (message?.parts ?? []).filter((p) => p.type === 'text').map((p) => p.text).join('');

// A TCP relay to the gateway at `target` (`http://host:port`). `breakAt(text)`: the next response
// bytes containing `text` are sent only up to it, then the connection is closed.
async function relay(target) {
  const { hostname, port } = new URL(target);
  const ctl = { marker: null, breaks: 0 };
  const server = net.createServer((client) => {
    const upstream = net.connect(Number(port), hostname);
    const close = () => { client.destroy(); upstream.destroy(); };
    client.on('error', close);
    upstream.on('error', close);
    client.pipe(upstream);
    let tail = '';
    upstream.on('data', (buf) => {
      if (!ctl.marker) return client.write(buf);
      const seen = tail + buf.toString('latin1');
      const at = seen.indexOf(ctl.marker);
      if (at < 0) {
        tail = seen.slice(-ctl.marker.length);
        return client.write(buf);
      }
      ctl.marker = null;
      ctl.breaks++;
      upstream.destroy();
      // Everything before the marker (from this buffer), then a clean close mid-body.
      client.end(buf.subarray(0, Math.max(0, at - tail.length)));
    });
    upstream.on('end', () => client.end());
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    base: `http://127.0.0.1:${server.address().port}`,
    breakAt(marker) { ctl.marker = marker; },
    get breaks() { return ctl.breaks; },
    close() { server.close(); },
  };
}

const gateway = base;
const proxy = await relay(gateway);
let browser;

try {
  browser = await chromium.launch({
    executablePath,
    headless: true,
    args: ['--disable-dev-shm-usage', '--no-first-run', '--disable-gpu'],
  });
  const context = await browser.newContext({ viewport: { width: 1000, height: 640 }, deviceScaleFactor: 2 });
  const page = await context.newPage();
  page.setDefaultTimeout(WAIT.timeout);

  // Everything the page says went wrong (script errors, CSP violations, failed loads).
  // While the relay breaks a stream, the browser's own network error is expected.
  const pageErrors = [];
  let breaking = false;
  page.on('pageerror', (e) => pageErrors.push(String(e)));
  page.on('console', (m) => {
    if (m.type() !== 'error') return;
    if (breaking && /ERR_INCOMPLETE_CHUNKED_ENCODING|network error/i.test(m.text())) return;
    pageErrors.push(m.text());
  });
  // Every request the page makes, with its headers and status.
  const requests = [];
  page.on('response', async (res) => {
    const req = res.request();
    const entry = { method: req.method(), url: req.url(), status: res.status() };
    requests.push(entry);
    entry.headers = await req.allHeaders().catch(() => req.headers());
  });
  const since = (i) => requests.slice(i);

  // The status line's states, as they change (the page's own DOM, watched from outside).
  const watchStates = () => page.evaluate(() => {
    const status = document.getElementById('status');
    window.__states = [status.dataset.state];
    // Record i set the value that record i + 1 replaced (its oldValue); the last set the current.
    new MutationObserver((records) => records.forEach((r, i) => window.__states.push(
      i + 1 < records.length ? records[i + 1].oldValue : status.dataset.state,
    ))).observe(status, { attributes: true, attributeFilter: ['data-state'], attributeOldValue: true });
  });
  const states = () => page.evaluate(() => window.__states.filter((s, i, all) => s !== all[i - 1]));

  // The conversation as the page shows it.
  const shown = () => page.evaluate(() => [...document.querySelectorAll('[data-testid=message]')].map((m) => ({
    role: m.dataset.role,
    id: m.dataset.messageId,
    status: m.dataset.status,
    text: [...m.querySelectorAll('[data-part=text]')].map((t) => t.textContent).join(''),
  })));
  const lastAnswer = async () => (await shown()).filter((m) => m.role === 'assistant').at(-1);

  const waitIdle = () => page.waitForFunction(() => {
    const s = document.getElementById('status').dataset.state;
    return ['idle', 'done', 'stopped', 'error'].includes(s) && !document.querySelector('[data-status=streaming]');
  }, null, WAIT);
  // Until the answer being shown contains `text`.
  const waitAnswerContains = (text) => page.waitForFunction((t) => {
    const answers = [...document.querySelectorAll('[data-testid=message][data-role=assistant]')];
    const last = answers.at(-1);
    return last && [...last.querySelectorAll('[data-part=text]')].map((e) => e.textContent).join('').includes(t);
  }, text, WAIT);

  async function send(text) {
    await page.fill('#prompt', text);
    await page.click('#send');
  }

  async function load() {
    await page.waitForFunction(() => window.sluiceDemo && window.sluiceDemo.chatId, null, WAIT);
    await watchStates();
    await waitIdle();
  }

  await page.goto(`${proxy.base}/`);
  await load();
  const chatId = await page.evaluate(() => window.sluiceDemo.chatId);
  const token = await page.evaluate(() => window.sluiceDemo.token);
  const hash = await page.evaluate(() => location.hash);
  report('page loads with a chat id in its address', hash === `#chat=${chatId}` && !pageErrors.length, { chatId, hash, pageErrors });

  // The page's own SSE reader, fed one stream cut at every place: the same events each time.
  {
    const result = await page.evaluate(() => {
      const stream = ': hi\r\nretry: 1500\r\nid: 1.1\r\ndata: {"a":1}\r\ndata: 2\r\n\r\nid: 2\rdata: x\rdata: y\r\r'
        + 'id\ndata:z\n\nid: a\0b\ndata: w\n\nevent: e\ndata\n\n: bye\ndata: unfinished';
      const want = JSON.stringify([['message', '{"a":1}\n2', '1.1'], ['message', 'x\ny', '2'], ['message', 'z', ''],
        ['message', 'w', ''], ['e', '', '']]);
      const read = (pieces) => {
        const got = [];
        const sse = new SseReader((ev) => got.push([ev.type, ev.data, ev.id]));
        for (const p of pieces) sse.push(p);
        sse.end();
        return JSON.stringify(got) === want && sse.retry === 1500;
      };
      const failures = [];
      if (!read([stream]) || !read([...stream])) failures.push('whole or char by char');
      for (let i = 1; i < stream.length; i++) if (!read([stream.slice(0, i), stream.slice(i)])) failures.push(i);
      return failures;
    });
    report("the page's SSE reader: the same events however the body is cut", !result.length, { failures: result });
  }

  async function snapshot() {
    const res = await fetch(`${gateway}/api/getConversation?threadId=${encodeURIComponent(chatId)}`, {
      headers: { authorization: `Bearer ${token}` },
    });
    return { status: res.status, body: await res.json() };
  }

  // ---- 1. Drop the connection mid-answer: the page resumes after its last event id. ----------
  {
    const prompt = 'scenario:slow tokens=60 delay_ms=60';
    const want = tokens(60);
    const mark = requests.length;
    await send(prompt);
    await waitAnswerContains('token3 ');
    await page.waitForSelector('#drop:not([disabled])', WAIT);
    // What the page showed at the moment of the click (noted before its own handler runs).
    await page.evaluate(() => document.addEventListener('click', (e) => {
      if (e.target.id !== 'drop') return;
      const last = [...document.querySelectorAll('[data-testid=message][data-role=assistant]')].at(-1);
      window.__atDrop = {
        cursor: document.getElementById('last-id').textContent,
        text: [...last.querySelectorAll('[data-part=text]')].map((t) => t.textContent).join(''),
      };
    }, { capture: true, once: true }));
    await page.click('#drop');
    const { cursor, text: before } = await page.evaluate(() => window.__atDrop);
    // A drop is visible, then the page resumes and the answer goes on growing.
    await page.waitForFunction(() => Number(document.getElementById('resume-count').textContent) >= 1, null, WAIT);
    await page.waitForFunction((n) => {
      const s = document.getElementById('status').dataset.state;
      const last = [...document.querySelectorAll('[data-testid=message][data-role=assistant]')].at(-1);
      const text = [...last.querySelectorAll('[data-part=text]')].map((e) => e.textContent).join('');
      return s === 'done' || (s === 'streaming' && text.length > n);
    }, before.length, WAIT);
    const mid = await lastAnswer();
    const stillStreaming = mid.status === 'streaming' && mid.text.length < want.length;
    if (screenshotPath) await page.screenshot({ path: screenshotPath, animations: 'disabled' });
    await waitIdle();
    const answer = await lastAnswer();
    const snap = await snapshot();
    const snapText = textOf(snap.body.messages?.at(-1));
    const resumes = since(mark).filter((r) => r.method === 'GET' && r.url.endsWith(`/api/chat/${chatId}/stream`));
    const seen = await states();
    const ok = answer.text === want && snapText === want && answer.status === 'done'
      && snap.body.streamStatus === 'completed'
      && before.length < want.length && want.startsWith(before)
      && seen.includes('dropped') && seen.includes('resuming')
      && resumes.length === 1 && resumes[0].status === 200 && resumes[0].headers?.['last-event-id'] === cursor;
    report('drop connection, resume after Last-Event-ID', ok, {
      shownBeforeDrop: before.length, cursor, resumeRequests: resumes.map((r) => ({ status: r.status, lastEventId: r.headers?.['last-event-id'] })),
      states: seen, screenshotWhileStreaming: screenshotPath ? stillStreaming : undefined,
      ...(ok ? {} : { shown: answer.text, snapshot: snapText, streamStatus: snap.body.streamStatus }),
    });
  }

  // ---- 2. Reload the page mid-answer: it shows the conversation and continues the run. -----
  {
    const first = await shown();
    const prompt = 'scenario:slow tokens=60 delay_ms=100';
    const want = tokens(60);
    await send(prompt);
    await waitAnswerContains('token3 ');
    const before = (await lastAnswer()).text;
    const mark = requests.length;
    await page.reload();
    await load();
    const after = await shown();
    const answer = after.at(-1);
    const snap = await snapshot();
    const messages = snap.body.messages ?? [];
    const replays = since(mark).filter((r) => r.method === 'GET' && r.url.endsWith(`/api/chat/${chatId}/stream`));
    const ids = after.map((m) => m.id);
    const ok = answer.text === want && textOf(messages.at(-1)) === want && answer.status === 'done'
      && before.length < want.length
      && after.length === 4 && messages.length === 4 && new Set(ids).size === 4
      && after.map((m) => m.role).join() === 'user,assistant,user,assistant'
      && after[0].text === first[0].text && after[1].text === first[1].text && after[2].text === prompt
      && after.every((m, i) => m.id === messages[i].id && m.text === textOf(messages[i]))
      && replays.length === 1 && replays[0].status === 200 && !replays[0].headers?.['last-event-id'];
    report('reload mid-answer, replay the run in progress', ok, {
      shownBeforeReload: before.length, messages: after.length,
      replayRequests: replays.map((r) => ({ status: r.status, lastEventId: r.headers?.['last-event-id'] ?? null })),
      ...(ok ? {} : { shown: after, snapshot: messages.map((m) => ({ role: m.role, id: m.id, text: textOf(m) })) }),
    });
  }

  // ---- 3. The stream breaks off mid-event: the page resumes by itself. ---------------------
  {
    const prompt = 'scenario:slow tokens=30 delay_ms=60';
    const want = tokens(30);
    const resumesBefore = Number(await page.textContent('#resume-count'));
    const mark = requests.length;
    breaking = true;
    // The response is cut inside the event carrying `token7 `, in the middle of its JSON: the
    // page must drop that half event and resume after the event before it.
    proxy.breakAt('"delta":"token7 "');
    await send(prompt);
    await waitIdle();
    breaking = false;
    const after = await shown();
    const answer = after.at(-1);
    const snap = await snapshot();
    const resumes = since(mark).filter((r) => r.method === 'GET' && r.url.endsWith(`/api/chat/${chatId}/stream`));
    const seen = await states();
    const resumeCount = Number(await page.textContent('#resume-count'));
    const ok = proxy.breaks === 1 && answer.text === want && textOf(snap.body.messages?.at(-1)) === want
      && answer.status === 'done' && seen.includes('dropped') && resumeCount === resumesBefore + 1
      && resumes.length === 1 && resumes[0].status === 200 && Boolean(resumes[0].headers?.['last-event-id'])
      && after.length === 6 && new Set(after.map((m) => m.id)).size === 6;
    report('stream breaks off mid-event, automatic resume', ok, {
      breaks: proxy.breaks, states: seen,
      resumeRequests: resumes.map((r) => ({ status: r.status, lastEventId: r.headers?.['last-event-id'] ?? null })),
      ...(ok ? {} : { shown: answer?.text, snapshot: textOf(snap.body.messages?.at(-1)), messages: after.length }),
    });
  }

  // ---- 4. Poll mode: 202, then long-poll the snapshot until the run ends. ------------------
  {
    const prompt = 'scenario:slow tokens=20 delay_ms=60';
    const want = tokens(20);
    await page.click('label:has(#mode-poll)');
    const polling = await page.isChecked('#mode-poll');
    const mark = requests.length;
    await send(prompt);
    await waitIdle();
    const after = await shown();
    const answer = after.at(-1);
    const snap = await snapshot();
    const made = since(mark);
    const post = made.find((r) => r.method === 'POST' && r.url.endsWith('/api/chat'));
    const polls = made.filter((r) => r.url.includes('/api/getConversation') && /afterSeq=\d+/.test(r.url) && r.url.includes('wait=20'));
    const streams = made.filter((r) => r.url.includes('/stream'));
    const pollCount = Number(await page.textContent('#poll-count'));
    const ok = polling && answer.text === want && textOf(snap.body.messages?.at(-1)) === want && answer.status === 'done'
      && post?.status === 202 && post.headers?.['x-stream-response'] === 'false'
      && polls.length >= 2 && polls.every((r) => r.status === 200) && pollCount === polls.length
      && streams.length === 0 && after.length === 8 && new Set(after.map((m) => m.id)).size === 8;
    report('poll mode, long-poll until the run ends', ok, {
      post: post && { status: post.status, xStreamResponse: post.headers?.['x-stream-response'] }, polls: polls.length,
      ...(ok ? {} : { shown: answer?.text, snapshot: textOf(snap.body.messages?.at(-1)), streams: streams.length, pollCount, messages: after.length }),
    });
  }

  const foreign = requests.filter((r) => !r.url.startsWith(`${proxy.base}/`));
  report('no page errors, nothing fetched from elsewhere', !pageErrors.length && !foreign.length, {
    requests: requests.length, pageErrors, foreign: foreign.map((r) => r.url),
  });
} catch (e) {
  report('browser session', false, { error: String(e && e.stack || e) });
} finally {
  await browser?.close();
  proxy.close();
}
process.exit(failed ? 1 : 0);
