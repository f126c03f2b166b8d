//! The Lua scripts that make every write to the shared store one atomic step in Redis.
//!
//! Each script checks everything before its first write (Redis has no rollback), reads the time
//! from Redis (`TIME`), so no instance's clock matters, and publishes the thread's notification
//! in the same step as the write it announces. Keys are built inside the scripts from the prefix
//! (`ARGV[1]`) and ids: the store targets a standalone Redis or Valkey, where a script may touch
//! any key.
//!
//! Key layout (prefix `P`, ids as Sluice mints them, so they never contain `{` or `}`):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `P:t:{tid}` | hash | thread: org, agent, created, conv key, backend thread, evicted prefix, latest run |
//! | `P:t:{tid}:runs` | list | retained run ids, oldest first |
//! | `P:t:{tid}:evicted` | list | the 16 most recently evicted run ids |
//! | `P:r:{rid}` | hash | run: ids, status, seqs, bytes, user message, lease (owner, epoch, lease_until), job, mark |
//! | `P:r:{rid}:log` | stream | the run's events, entry id `0-<seq>`, field `d` |
//! | `P:k:<hash>` | string | idempotency key (org, user, message id) → run id |
//! | `P:c:<hash>` | string | client conversation (org, id) → thread id |
//! | `P:o:<hash>` | hash | organisation: `bytes` held; `…:running`, a set of its runs in progress; `…:done`, its finished runs by end time |
//! | `P:live` | zset | runs in progress by lease deadline (ms): the takeover scan's index |
//! | `P:done` | zset | finished runs by end time: the retention sweep's index |
//! | `P:emptied` | zset | threads with no run left, by when: thread retention |
//! | `P:n:{tid}` | channel | the thread's notifications (see `wire`) |
//! | `P:ctl:<instance>` | channel | `cancel <rid>`: a run this instance ingests was ended elsewhere |

use std::sync::LazyLock;

use redis::Script;

/// Shared Lua helpers, prepended to every script.
const PRELUDE: &str = r#"
local P = ARGV[1]
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function rk(rid) return P .. ':r:{' .. rid .. '}' end
local function tk(tid) return P .. ':t:{' .. tid .. '}' end
-- A notification: `rid|status|first|last|n|` then n events as `<len>:<bytes>`.
local function notify(tid, rid, status, first, last, events)
  local parts = {rid, '|', status, '|', tostring(first), '|', tostring(last), '|'}
  local size, n = 0, 0
  if events then
    for i = 1, #events do size = size + #events[i] end
    if size <= 65536 then n = #events end
  end
  parts[#parts + 1] = tostring(n)
  parts[#parts + 1] = '|'
  for i = 1, n do
    parts[#parts + 1] = tostring(#events[i])
    parts[#parts + 1] = ':'
    parts[#parts + 1] = events[i]
  end
  redis.call('PUBLISH', P .. ':n:{' .. tid .. '}', table.concat(parts))
end
-- Evict a finished run: its log and record go, its thread remembers it; 1 when evicted.
local function evict(rid)
  local r = rk(rid)
  local m = redis.call('HMGET', r, 'thread', 'status', 'last_seq', 'error', 'updated', 'idem_k', 'bytes', 'org_k', 'umsg')
  if not m[1] or m[2] == 'in_progress' then return 0 end
  redis.call('DEL', r, r .. ':log')
  redis.call('ZREM', P .. ':done', rid)
  redis.call('ZREM', m[8] .. ':done', rid)
  if m[6] ~= '' and redis.call('GET', m[6]) == rid then redis.call('DEL', m[6]) end
  redis.call('HINCRBY', m[8], 'bytes', -(tonumber(m[7]) + #m[9]))
  local th = tk(m[1])
  if redis.call('EXISTS', th) == 1 then
    redis.call('LREM', th .. ':runs', 1, rid)
    redis.call('RPUSH', th .. ':evicted', rid)
    redis.call('LTRIM', th .. ':evicted', -16, -1)
    redis.call('HINCRBY', th, 'evicted_runs', 1)
    local through = tonumber(redis.call('HGET', th, 'evicted_through') or '0')
    redis.call('HSET', th, 'evicted_through', math.max(through, tonumber(m[3])),
      'last_evicted', rid .. '|' .. m[2] .. '|' .. m[5] .. '|' .. (m[4] or ''),
      'last_evicted_has_error', m[4] and '1' or '0')
    if redis.call('LLEN', th .. ':runs') == 0 then
      redis.call('ZADD', P .. ':emptied', now_ms(), m[1])
    end
  end
  notify(m[1], rid, 'evicted', 0, tonumber(m[3]), nil)
  return 1
end
"#;

/// A script that grows what Redis holds: refused whole, before it runs, when Redis is at
/// `maxmemory` (the shebang makes Redis check once, up front, instead of at each write, which
/// could leave a script half done).
fn growing(body: &str) -> Script {
    Script::new(&format!("#!lua\n{PRELUDE}\n{body}"))
}

/// A script that must run even when Redis is at `maxmemory`: it frees memory (eviction) or
/// writes a few bytes that must not be refused (a run's end, a lease).
fn always(body: &str) -> Script {
    Script::new(&format!("#!lua flags=allow-oom\n{PRELUDE}\n{body}"))
}

/// Create a run (and its thread), or return the retained run of the idempotency key.
///
/// ARGV: prefix, org, user, agent (JSON), user message (JSON), idempotency key name (or ''),
/// its message id, conversation key name (or ''), conversation id, thread id asked for (or ''),
/// fresh thread id, fresh run id, owner, lease ms, max running, max bytes, org key name.
///
/// Returns `{existing, rid}`, `{created, rid, tid, first_seq, now, lease_until, evicted}`,
/// `{nothread}`, `{agent, <agent json>}`, `{busy, rid}` or `{quota, running_runs|bytes}`. An
/// organisation at its bytes quota has its own oldest finished runs evicted first (`evicted`
/// says how many).
pub static CREATE: LazyLock<Script> = LazyLock::new(|| {
    growing(
        r#"
local org, user, agent, umsg = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local idem_k, idem, conv_k, conv = ARGV[6], ARGV[7], ARGV[8], ARGV[9]
local tid, new_tid, rid, owner = ARGV[10], ARGV[11], ARGV[12], ARGV[13]
local lease_ms, max_running, max_bytes, org_k = tonumber(ARGV[14]), tonumber(ARGV[15]), tonumber(ARGV[16]), ARGV[17]
local now = now_ms()
if idem_k ~= '' then
  local old = redis.call('GET', idem_k)
  if old then
    local r = redis.call('HMGET', rk(old), 'thread', 'agent', 'status')
    if r[1] and (tid == '' or tid == r[1]) and r[2] == agent then
      if r[3] ~= 'error' and r[3] ~= 'timeout' then return {'existing', old} end
      -- A retry after a failure: a new run in the same thread.
      tid = r[1]
    end
  end
end
-- At its bytes quota, an organisation's own oldest finished runs make room first.
local evicted = 0
while tonumber(redis.call('HGET', org_k, 'bytes') or '0') >= max_bytes do
  local oldest = redis.call('ZRANGE', org_k .. ':done', 0, 0)
  if #oldest == 0 then return {'quota', 'bytes', tostring(evicted)} end
  redis.call('ZREM', org_k .. ':done', oldest[1])
  evicted = evicted + evict(oldest[1])
end
if redis.call('SCARD', org_k .. ':running') >= max_running then return {'quota', 'running_runs'} end
local function new_thread(conv_key)
  redis.call('HSET', tk(new_tid), 'org', org, 'agent', agent, 'created', now, 'conv', conv_key,
    'evicted_runs', 0, 'evicted_through', 0)
  return new_tid
end
if tid == '' then
  if conv_k ~= '' then
    local known = redis.call('GET', conv_k)
    if known and redis.call('EXISTS', tk(known)) == 1 then
      tid = known
    else
      tid = new_thread(conv_k)
      redis.call('SET', conv_k, tid)
    end
  else
    tid = new_thread('')
  end
end
local th = tk(tid)
local h = redis.call('HMGET', th, 'org', 'agent', 'latest', 'evicted_through')
if not h[1] or h[1] ~= org then return {'nothread'} end
if h[2] ~= agent then return {'agent', h[2]} end
local base = tonumber(h[4] or '0')
if h[3] then
  local lr = redis.call('HMGET', rk(h[3]), 'status', 'last_seq')
  if lr[1] then
    if lr[1] == 'in_progress' then return {'busy', h[3]} end
    base = math.max(base, tonumber(lr[2]))
  end
end
local until_ms = now + lease_ms
redis.call('HSET', rk(rid), 'thread', tid, 'org', org, 'user', user, 'agent', agent,
  'status', 'in_progress', 'first_seq', base + 1, 'last_seq', base, 'bytes', 0, 'events', 0,
  'created', now, 'updated', now, 'umsg', umsg, 'idem', idem, 'idem_k', idem_k, 'org_k', org_k,
  'owner', owner, 'epoch', 1, 'lease_until', until_ms)
redis.call('SADD', org_k .. ':running', rid)
redis.call('HINCRBY', org_k, 'bytes', #umsg)
redis.call('ZADD', P .. ':live', until_ms, rid)
redis.call('RPUSH', th .. ':runs', rid)
redis.call('HSET', th, 'latest', rid)
redis.call('PERSIST', th)
redis.call('PERSIST', th .. ':runs')
redis.call('PERSIST', th .. ':evicted')
redis.call('ZREM', P .. ':emptied', tid)
if idem_k ~= '' then redis.call('SET', idem_k, rid) end
notify(tid, rid, 'in_progress', base + 1, base, nil)
return {'created', rid, tid, tostring(base + 1), tostring(now), tostring(until_ms), tostring(evicted)}
"#,
    )
});

/// Append events to a run in progress, as its lease holder.
///
/// ARGV: prefix, rid, owner, epoch, expected last seq, mark (`-` keeps the stored one, else
/// `=` followed by the new mark), max events per run, max bytes per run, then the payloads.
///
/// Returns `{ok, last_seq, limit}` (limit `''`, `events` or `bytes`: the events that fit were
/// kept), `{seq, last_seq}` (the log is not where the caller expected), `{fenced}`,
/// `{terminal, status}` or `{norun}`.
pub static APPEND: LazyLock<Script> = LazyLock::new(|| {
    growing(
        r#"
local rid, owner, epoch, expected, mark = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]), ARGV[6]
local max_events, max_bytes = tonumber(ARGV[7]), tonumber(ARGV[8])
local r = rk(rid)
local m = redis.call('HMGET', r, 'owner', 'epoch', 'last_seq', 'status', 'events', 'bytes', 'thread', 'org_k', 'first_seq')
if not m[4] then return {'norun'} end
if m[4] ~= 'in_progress' then return {'terminal', m[4]} end
if m[1] ~= owner or m[2] ~= epoch then return {'fenced'} end
local last = tonumber(m[3])
if last ~= expected then return {'seq', tostring(last)} end
local events, bytes = tonumber(m[5]), tonumber(m[6])
local first, added, limit, kept = last + 1, 0, '', {}
for i = 9, #ARGV do
  local d = ARGV[i]
  if events >= max_events then limit = 'events' break end
  if bytes + #d > max_bytes then limit = 'bytes' break end
  last = last + 1
  events = events + 1
  bytes = bytes + #d
  added = added + #d
  redis.call('XADD', r .. ':log', '0-' .. last, 'd', d)
  kept[#kept + 1] = d
end
if #kept > 0 then
  redis.call('HSET', r, 'last_seq', last, 'events', events, 'bytes', bytes, 'updated', now_ms())
  redis.call('HINCRBY', m[8], 'bytes', added)
end
if string.sub(mark, 1, 1) == '=' then redis.call('HSET', r, 'mark', string.sub(mark, 2)) end
if #kept > 0 then notify(m[7], rid, 'in_progress', first, last, kept) end
return {'ok', tostring(last), limit}
"#,
    )
});

/// End a run: the lease holder's ending, or (owner `''`) a stop from any instance.
///
/// ARGV: prefix, rid, owner (or ''), epoch, status, error (or ''), has error (`1`/`0`), final
/// event (or '') and whether there is one (`1`/`0`).
///
/// Returns `{ok, last_seq, previous owner}`, `{already}` (it had ended), `{fenced}` or `{norun}`.
pub static FINISH: LazyLock<Script> = LazyLock::new(|| {
    always(
        r#"
local rid, owner, epoch, status, err, has_err, final, has_final = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9]
local r = rk(rid)
local m = redis.call('HMGET', r, 'owner', 'epoch', 'last_seq', 'status', 'events', 'bytes', 'thread', 'org_k')
if not m[4] then return {'norun'} end
if m[4] ~= 'in_progress' then return {'already'} end
if owner ~= '' and (m[1] ~= owner or m[2] ~= epoch) then return {'fenced'} end
local last, first = tonumber(m[3]), tonumber(m[3]) + 1
local now = now_ms()
local kept = {}
if has_final == '1' then
  last = last + 1
  redis.call('XADD', r .. ':log', '0-' .. last, 'd', final)
  redis.call('HINCRBY', m[8], 'bytes', #final)
  redis.call('HSET', r, 'events', tonumber(m[5]) + 1, 'bytes', tonumber(m[6]) + #final)
  kept[1] = final
end
redis.call('HSET', r, 'status', status, 'last_seq', last, 'updated', now, 'lease_until', 0)
if has_err == '1' then redis.call('HSET', r, 'error', err) end
redis.call('SREM', m[8] .. ':running', rid)
redis.call('ZREM', P .. ':live', rid)
redis.call('ZADD', P .. ':done', now, rid)
redis.call('ZADD', m[8] .. ':done', now, rid)
notify(m[7], rid, status, first, last, kept)
if owner == '' and m[1] and m[1] ~= '' then
  redis.call('PUBLISH', P .. ':ctl:' .. m[1], 'cancel ' .. rid)
end
return {'ok', tostring(last), m[1] or ''}
"#,
    )
});

/// Push a held lease forward. ARGV: prefix, rid, owner, epoch, lease ms.
/// Returns `{ok, lease_until}`, `{fenced}`, `{terminal}` or `{norun}`.
pub static RENEW: LazyLock<Script> = LazyLock::new(|| {
    always(
        r#"
local rid, owner, epoch, ttl = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local m = redis.call('HMGET', rk(rid), 'owner', 'epoch', 'status')
if not m[3] then redis.call('ZREM', P .. ':live', rid) return {'norun'} end
if m[3] ~= 'in_progress' then return {'terminal'} end
if m[1] ~= owner or m[2] ~= epoch then return {'fenced'} end
local until_ms = now_ms() + ttl
redis.call('HSET', rk(rid), 'lease_until', until_ms)
redis.call('ZADD', P .. ':live', until_ms, rid)
return {'ok', tostring(until_ms)}
"#,
    )
});

/// Take over a run whose lease expired. ARGV: prefix, rid, new owner, lease ms.
/// Returns `{acquired, epoch, lease_until, has_mark, mark, has_job, job}`, `{held}`,
/// `{terminal}` or `{gone}`.
pub static TAKEOVER: LazyLock<Script> = LazyLock::new(|| {
    always(
        r#"
local rid, owner, ttl = ARGV[2], ARGV[3], tonumber(ARGV[4])
local r = rk(rid)
local m = redis.call('HMGET', r, 'owner', 'status', 'lease_until', 'mark', 'job')
if not m[2] then redis.call('ZREM', P .. ':live', rid) return {'gone'} end
if m[2] ~= 'in_progress' then redis.call('ZREM', P .. ':live', rid) return {'terminal'} end
local now = now_ms()
if tonumber(m[3]) > now then redis.call('ZADD', P .. ':live', m[3], rid) return {'held'} end
local epoch = redis.call('HINCRBY', r, 'epoch', 1)
local until_ms = now + ttl
redis.call('HSET', r, 'owner', owner, 'lease_until', until_ms, 'prev_owner', m[1] or '')
redis.call('ZADD', P .. ':live', until_ms, rid)
return {'acquired', tostring(epoch), tostring(until_ms), m[4] and '1' or '0', m[4] or '', m[5] and '1' or '0', m[5] or ''}
"#,
    )
});

/// Give a held lease up at once (drain). ARGV: prefix, rid, owner, epoch. Returns 1 or 0.
pub static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    always(
        r#"
local rid, owner, epoch = ARGV[2], ARGV[3], ARGV[4]
local m = redis.call('HMGET', rk(rid), 'owner', 'epoch', 'status')
if m[3] ~= 'in_progress' or m[1] ~= owner or m[2] ~= epoch then return 0 end
redis.call('HSET', rk(rid), 'lease_until', 0)
redis.call('ZADD', P .. ':live', 0, rid)
return 1
"#,
    )
});

/// Record the job of a run held by `owner`. ARGV: prefix, rid, owner, epoch, job. Returns 1/0.
pub static SAVE_JOB: LazyLock<Script> = LazyLock::new(|| {
    growing(
        r#"
local rid, owner, epoch, job = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local m = redis.call('HMGET', rk(rid), 'owner', 'epoch', 'status')
if m[3] ~= 'in_progress' or m[1] ~= owner or m[2] ~= epoch then return 0 end
redis.call('HSET', rk(rid), 'job', job)
return 1
"#,
    )
});

/// Evict a finished run past retention. ARGV: prefix, rid. Returns 1 when evicted.
pub static EVICT: LazyLock<Script> = LazyLock::new(|| {
    always(
        r#"
redis.call('ZREM', P .. ':done', ARGV[2])
return evict(ARGV[2])
"#,
    )
});

/// Forget a thread record whose runs are all gone. ARGV: prefix, tid. Returns 1 when forgotten.
pub static FORGET_THREAD: LazyLock<Script> = LazyLock::new(|| {
    always(
        r#"
local tid = ARGV[2]
local th = tk(tid)
redis.call('ZREM', P .. ':emptied', tid)
if redis.call('LLEN', th .. ':runs') > 0 then return 0 end
local conv = redis.call('HGET', th, 'conv')
if conv and conv ~= '' and redis.call('GET', conv) == tid then redis.call('DEL', conv) end
redis.call('DEL', th, th .. ':runs', th .. ':evicted')
notify(tid, '', 'forgotten', 0, 0, nil)
return 1
"#,
    )
});

/// A thread's position: ARGV prefix, tid. Returns `{org, latest rid or '', status, last_seq,
/// evicted_through}` or `{}` for no thread.
pub static POSITION: LazyLock<Script> = LazyLock::new(|| {
    always(
        r#"
local h = redis.call('HMGET', tk(ARGV[2]), 'org', 'latest', 'evicted_through')
if not h[1] then return {} end
local through = tonumber(h[3] or '0')
local runs = redis.call('LRANGE', tk(ARGV[2]) .. ':runs', -1, -1)
if #runs == 0 then return {h[1], '', '', tostring(through), tostring(through)} end
local m = redis.call('HMGET', rk(runs[1]), 'status', 'last_seq')
if not m[1] then return {h[1], '', '', tostring(through), tostring(through)} end
return {h[1], runs[1], m[1], tostring(math.max(through, tonumber(m[2]))), tostring(through)}
"#,
    )
});
