"""The Lua scripts every node runs against Redis (private).

Each script is one atomic step on the server, so the decisions that must be made once for
the whole cluster are made here and nowhere else:

- ``BATCH`` applies a node's queued writes in order: acceptances (a run id is taken once),
  withdrawals, and terminals — first writer wins, and the winning terminal is appended to the
  terminal stream in the same step. A write is *fenced* when the node that made it no longer
  holds its lease: a zombie's terminal is refused and counted, never recorded.
- ``REGISTER`` / ``HEARTBEAT`` hold a node's lease (a key with a TTL). ``RECOVER`` declares
  every node whose lease expired dead and gives each of its runs exactly one terminal: an
  abandoned failure, recorded and streamed like any other. A node declared dead never takes
  its lease again, so an incarnation that came back too late stays fenced for good; one
  whose lease merely expired (Redis restarted, or nobody swept yet) takes it back: none of
  its runs was ended for it.

Keys (``P`` is the namespace prefix, ``{name}:``, one hash slot):
``P run:<id>`` hash ``s`` session, ``n`` owning node while pending, ``rc`` terminal JSON,
``z`` its size; ``P node:<node>:runs`` set of a node's pending runs; ``P nodes`` set of live
nodes; ``P dead`` nodes declared dead whose runs are being recovered; ``P lease:<node>`` the
lease; ``P terminals`` the terminal stream (fields ``id``, ``rc``; ``p`` a routed run's
workspace path); ``P accepted`` the acceptance stream (``id``, ``s``, ``p``; ``w`` for a
withdrawal; ``x`` the node that claimed it, when a routed run becomes active); ``P order`` zset of
retained terminals by time (ms); ``P bytes`` their size; ``P stats`` hash of cluster-wide
counters.

Routed runs (DESIGN R2: one active run per session, cluster-wide, FIFO): a run accepted with
a workspace path is not owned by the node that accepted it (``a`` in its hash) but queued in
its session's lane, ``P lane:<session>`` (a list, acceptance order; ``q`` marks it queued,
``c`` holds its call, ``x`` when Redis accepted it (microseconds), which a cancellation's
fence is compared with; ``P routed`` is the set of routed runs without a terminal).

Listing: ``P index`` is a sorted set of every run still held, all of score 0, ordered by its
member ``<accepted_at, %020.6f>|<run id>`` (``k`` in the run's hash), so newest first is
``ZREVRANGEBYLEX`` and a page's cursor is a member; a run's hash keeps ``w`` its workspace
path, ``m`` its metadata (JSON: ``accepted_at``, ``labels``) and ``t`` when a node claimed
it. ``P ready`` lists sessions whose lane may
start a run; ``CLAIM`` pops them and makes the head of each lane the session's active run,
``P active:<session>``, owned (``n``) by the claiming node. Its terminal frees the lane (and
readies the session again when runs wait); so does recovery, when its node dies. ``P
control`` streams cancellations of active runs to the nodes running them; ``P progress``
streams the progress routed runs emit (lossy, trimmed), for the other nodes' subscribers.
"""

from __future__ import annotations

__all__ = [
    "BATCH",
    "CLAIM",
    "HEARTBEAT",
    "INFO",
    "LIST",
    "PENDING",
    "READ",
    "RECOVER",
    "REGISTER",
    "RELEASE",
]

# Shared by BATCH and RECOVER: record a terminal (the caller checked it is the first), stream
# it, and keep retention within count, bytes and age.
_FINISH = r"""
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function finish(P, limits, id, session, outcome, rc, owner, now)
  local run = P .. 'run:' .. id
  -- A routed run leaves its lane: a queued one its place, an active one the lane itself,
  -- which starts its next run (the session is readied for any node to claim).
  if redis.call('HEXISTS', run, 'q') == 1 then
    redis.call('LREM', P .. 'lane:' .. session, 1, id)
  end
  local active = P .. 'active:' .. session
  if redis.call('GET', active) == id then
    redis.call('DEL', active)
    if redis.call('LLEN', P .. 'lane:' .. session) > 0 then
      redis.call('RPUSH', P .. 'ready', session)
    end
  end
  local path = redis.call('HGET', run, 'w')
  redis.call('HSET', run, 'rc', rc, 's', session, 'z', #rc)
  redis.call('HDEL', run, 'n', 'q', 'c')
  redis.call('SREM', P .. 'routed', id)
  if owner then
    redis.call('SREM', P .. 'node:' .. owner .. ':runs', id)
  end
  if path then
    redis.call('XADD', P .. 'terminals', 'MAXLEN', '~', limits.stream, '*', 'id', id, 'rc', rc,
               'p', path)
  else
    redis.call('XADD', P .. 'terminals', 'MAXLEN', '~', limits.stream, '*', 'id', id, 'rc', rc)
  end
  redis.call('ZADD', P .. 'order', now, id)
  redis.call('INCRBY', P .. 'bytes', #rc)
  redis.call('HINCRBY', P .. 'stats', outcome, 1)
  -- Retention: the oldest terminals go first, past the count, the bytes or the age bound.
  while true do
    local oldest = redis.call('ZRANGE', P .. 'order', 0, 0, 'WITHSCORES')
    if #oldest == 0 then break end
    local count = redis.call('ZCARD', P .. 'order')
    local bytes = tonumber(redis.call('GET', P .. 'bytes') or '0')
    if count > limits.count or bytes > limits.bytes or tonumber(oldest[2]) < now - limits.age then
      local gone = P .. 'run:' .. oldest[1]
      local size = tonumber(redis.call('HGET', gone, 'z') or '0')
      local member = redis.call('HGET', gone, 'k')
      if member then redis.call('ZREM', P .. 'index', member) end
      redis.call('ZREM', P .. 'order', oldest[1])
      redis.call('DEL', gone)
      redis.call('DECRBY', P .. 'bytes', size)
      redis.call('HINCRBY', P .. 'stats', 'evicted', 1)
    else
      break
    end
  end
end

-- A queued routed run leaves without running: one cancelled terminal, stamped with what its
-- call says (acceptance time, labels). False if it already ended or is not queued.
local function drop_queued(P, limits, id, session, reason, now)
  local run = P .. 'run:' .. id
  if redis.call('HEXISTS', run, 'q') == 0 or redis.call('HEXISTS', run, 'rc') == 1 then
    return false
  end
  local t = {session_id = session, run_id = id, cancelled = true, reason = reason,
             ended_at = now / 1000}
  local call = redis.call('HGET', run, 'c')
  if call then
    local c = cjson.decode(call)
    t.accepted_at = c.accepted_at
    t.labels = c.labels
  end
  finish(P, limits, id, session, 'cancelled', cjson.encode(t), nil, now)
  return true
end

-- Ask the node running a session's active run to cancel it (it publishes the terminal).
local function cancel_active(P, limits, session, id, reason)
  redis.call('XADD', P .. 'control', 'MAXLEN', '~', limits.stream, '*', 'id', id, 's', session,
             'n', redis.call('HGET', P .. 'run:' .. id, 'n') or '', 'reason', reason)
end
"""

BATCH = (
    _FINISH
    + r"""
-- ARGV[1] prefix; ARGV[2] JSON {limits, ops}; each op is
--   ["accept", id, session, node, routed, path, call, meta, member, rerun] -> "ok" |
--      "dup" | "fenced"; routed (a boolean): queued in its lane with its call; path, call
--      and meta (JSON: accepted_at, labels) may be ""; member is its place in the index;
--      rerun (a boolean): its node's death puts it back at its lane's head (``r``)
--   ["withdraw", id, node]           -> "ok"
--   ["complete", id, session, outcome, rc, node] -> "ok" | "dup" | "fenced" | "handed"
--      ("handed": a routed run, from the node that accepted it but does not run it: only
--      the node that claimed it, a lane op or recovery ends a routed run)
--   ["started", id, unix seconds] -> "ok": when its agent began (for listings)
--   ["progress", path, progress JSON] -> "ok": for the other nodes' subscribers (lossy)
--   ["lane", session, action, run id or "", reason, fence (µs), caller node]
--      -> "ok" | "queued" | "active" | "none"
--      action "cancel": drop the lane's queued runs and cancel its active one; "clear":
--      drop the queued runs; "cancel_run": the one run, queued or active; "release": a run
--      the node (in place of the reason) claimed and could not start goes back to the head
--      of its lane.
-- Every op is idempotent for the node that sent it: a batch retried after a lost reply
-- gets the answers it would have got the first time.
local P = ARGV[1]
local req = cjson.decode(ARGV[2])
local limits = req.limits
local now = now_ms()
local live = {}
local function alive(node)
  if live[node] == nil then
    live[node] = redis.call('EXISTS', P .. 'lease:' .. node) == 1
    if not live[node] and redis.call('SISMEMBER', P .. 'nodes', node) == 1 then
      -- Expired, but nobody declared it dead (Redis restarted, or no survivor swept):
      -- none of its runs was ended for it, so it may go on.
      redis.call('SET', P .. 'lease:' .. node, '1', 'PX', req.ttl)
      live[node] = true
    end
  end
  return live[node]
end
local out = {}
for i, op in ipairs(req.ops) do
  local kind, id = op[1], op[2]
  local run = P .. 'run:' .. id
  if kind == 'accept' then
    local node, routed, path, meta, member = op[4], op[5], op[6], op[8], op[9]
    if redis.call('HGET', run, 'n') == node or redis.call('HGET', run, 'a') == node then
      out[i] = 'ok'
    elseif redis.call('EXISTS', run) == 1 then
      out[i] = 'dup'
    elseif not alive(node) then
      out[i] = 'fenced'
    else
      -- What a listing shows of it: its place in acceptance order, workspace and metadata.
      redis.call('ZADD', P .. 'index', 0, member)
      redis.call('HSET', run, 'k', member)
      if path ~= '' then redis.call('HSET', run, 'w', path) end
      if meta ~= '' then redis.call('HSET', run, 'm', meta) end
    end
    if out[i] then
      -- decided above
    elseif routed then
      -- Routed: owned by no node until one claims it, so its acceptor's death loses nothing.
      local session = op[3]
      redis.call('HSET', run, 's', session, 'a', node, 'c', op[7], 'q', '1')
      if op[10] then redis.call('HSET', run, 'r', '1') end
      redis.call('SADD', P .. 'routed', id)
      if redis.call('RPUSH', P .. 'lane:' .. session, id) == 1
          and redis.call('EXISTS', P .. 'active:' .. session) == 0 then
        redis.call('RPUSH', P .. 'ready', session)
      end
      redis.call('XADD', P .. 'accepted', 'MAXLEN', '~', limits.stream, '*', 'id', id,
                 's', session, 'p', path)
      local t = redis.call('TIME')
      redis.call('HSET', run, 'x', t[1] .. string.format('%06d', t[2]))
      redis.call('HINCRBY', P .. 'stats', 'accepted', 1)
      out[i] = 'ok'
    else
      redis.call('HSET', run, 's', op[3], 'n', node)
      redis.call('SADD', P .. 'node:' .. node .. ':runs', id)
      redis.call('XADD', P .. 'accepted', 'MAXLEN', '~', limits.stream, '*', 'id', id, 's', op[3])
      redis.call('HINCRBY', P .. 'stats', 'accepted', 1)
      out[i] = 'ok'
    end
  elseif kind == 'withdraw' then
    local node = op[3]
    local queued = redis.call('HGET', run, 'a') == node and redis.call('HEXISTS', run, 'q') == 1
    if (redis.call('HGET', run, 'n') == node or queued)
        and redis.call('HEXISTS', run, 'rc') == 0 then
      if queued then
        redis.call('LREM', P .. 'lane:' .. redis.call('HGET', run, 's'), 1, id)
        redis.call('SREM', P .. 'routed', id)
      end
      local member = redis.call('HGET', run, 'k')
      if member then redis.call('ZREM', P .. 'index', member) end
      redis.call('DEL', run)
      redis.call('SREM', P .. 'node:' .. node .. ':runs', id)
      redis.call('XADD', P .. 'accepted', 'MAXLEN', '~', limits.stream, '*', 'id', id, 'w', '1')
      redis.call('HINCRBY', P .. 'stats', 'accepted', -1)
    end
    out[i] = 'ok'
  elseif kind == 'complete' then
    local session, outcome, rc, node = op[3], op[4], op[5], op[6]
    local recorded = redis.call('HGET', run, 'rc')
    local owner = redis.call('HGET', run, 'n')
    if not recorded and owner ~= node and redis.call('HGET', run, 'a') == node then
      out[i] = 'handed'
    elseif recorded then
      if recorded == rc then
        out[i] = 'ok'
      else
        redis.call('HINCRBY', P .. 'stats', 'duplicates', 1)
        out[i] = 'dup'
      end
    elseif not alive(node) then
      -- A zombie: its lease expired, so its runs are (or will be) recovery's to end.
      redis.call('HINCRBY', P .. 'stats', 'fenced', 1)
      out[i] = 'fenced'
    elseif owner and owner ~= node then
      -- Another node runs it (this node's acceptance of the same id was refused).
      redis.call('HINCRBY', P .. 'stats', 'duplicates', 1)
      out[i] = 'dup'
    else
      finish(P, limits, id, session, outcome, rc, owner, now)
      out[i] = 'ok'
    end
  elseif kind == 'progress' then
    redis.call('XADD', P .. 'progress', 'MAXLEN', '~', limits.stream, '*', 'p', op[2],
               'd', op[3])
    out[i] = 'ok'
  elseif kind == 'started' then
    if redis.call('EXISTS', run) == 1 and redis.call('HEXISTS', run, 'rc') == 0 then
      redis.call('HSET', run, 't', op[3])
    end
    out[i] = 'ok'
  elseif kind == 'lane' then
    local session, action, target, reason = op[2], op[3], op[4], op[5]
    local lane = P .. 'lane:' .. session
    local answer = 'ok'
    if action == 'cancel' or action == 'clear' then
      -- Only what was accepted before the call: by the calling node (its acceptances are
      -- written in order, before this), or by any node before the call's time (op[6], in
      -- microseconds of the calling node's clock, against Redis's at acceptance, ``x``): a
      -- run accepted meanwhile on another node is untouched.
      local caller, fence = op[7], tonumber(op[6])
      local function before(id)
        local run = P .. 'run:' .. id
        if redis.call('HGET', run, 'a') == caller then return true end
        return tonumber(redis.call('HGET', run, 'x') or '0') < fence
      end
      local queued = redis.call('LRANGE', lane, 0, -1)
      redis.call('DEL', lane)  -- first: each drop then leaves an empty lane, in O(1)
      local kept = {}
      for _, each in ipairs(queued) do
        if before(each) then
          drop_queued(P, limits, each, session, reason, now)
        else
          kept[#kept + 1] = each
        end
      end
      for _, each in ipairs(kept) do
        redis.call('RPUSH', lane, each)
      end
      local active = redis.call('GET', P .. 'active:' .. session)
      if action == 'cancel' and active and before(active) then
        cancel_active(P, limits, session, active, reason)
      end
    else
      -- The run's own session decides, whatever the caller believed it to be.
      session = redis.call('HGET', P .. 'run:' .. target, 's') or session
    end
    if action == 'cancel' or action == 'clear' then
      answer = 'ok'
    elseif action == 'release' then
      local run = P .. 'run:' .. target
      answer = 'none'
      if redis.call('HGET', run, 'n') == reason and redis.call('HEXISTS', run, 'rc') == 0 then
        redis.call('HDEL', run, 'n')
        redis.call('HSET', run, 'q', '1')
        redis.call('SREM', P .. 'node:' .. reason .. ':runs', target)
        redis.call('LPUSH', P .. 'lane:' .. session, target)
        if redis.call('GET', P .. 'active:' .. session) == target then
          redis.call('DEL', P .. 'active:' .. session)
        end
        redis.call('RPUSH', P .. 'ready', session)
        answer = 'queued'
      end
    elseif drop_queued(P, limits, target, session, reason, now) then
      answer = 'queued'
    elseif action == 'cancel_run' and redis.call('GET', P .. 'active:' .. session) == target then
      cancel_active(P, limits, session, target, reason)
      answer = 'active'
    else
      answer = 'none'
    end
    out[i] = answer
  else
    return redis.error_reply('unknown op ' .. tostring(kind))
  end
end
return out
"""
)

CLAIM = r"""
-- ARGV: prefix, node, max, stream length, ttl ms, mine. Pops ready sessions and makes the
-- head of each one's lane its active run, owned by this node: {"ok", id, session, path,
-- call, reruns, ...} (at most max runs), or {"fenced"} when the node was declared dead.
-- With mine = "1" it first returns the routed runs this node owns already and has not
-- ended (a claim whose answer was lost on the way: the node asks again, not a wedged lane).
local P, node, max, stream = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
if redis.call('EXISTS', P .. 'lease:' .. node) == 0 then
  -- Expired, but nobody declared it dead (Redis restarted, or no survivor swept): none of
  -- its runs was ended for it, so it may go on (as BATCH decides).
  if redis.call('SISMEMBER', P .. 'nodes', node) == 0 then
    return {'fenced'}
  end
  redis.call('SET', P .. 'lease:' .. node, '1', 'PX', ARGV[5])
end
local out = {'ok'}
local claimed = 0
if ARGV[6] == '1' then
  for _, id in ipairs(redis.call('SMEMBERS', P .. 'node:' .. node .. ':runs')) do
    local run = P .. 'run:' .. id
    local call = redis.call('HGET', run, 'c')
    if call and redis.call('HEXISTS', run, 'rc') == 0 then
      out[#out + 1] = id
      out[#out + 1] = redis.call('HGET', run, 's')
      out[#out + 1] = redis.call('HGET', run, 'w')
      out[#out + 1] = call
      out[#out + 1] = redis.call('HGET', run, 'e') or '0'
    end
  end
end
while claimed < max do
  local session = redis.call('LPOP', P .. 'ready')
  if not session then break end
  -- A session already active is readied again when its run ends.
  if redis.call('EXISTS', P .. 'active:' .. session) == 0 then
    while true do
      local id = redis.call('LPOP', P .. 'lane:' .. session)
      if not id then break end
      local run = P .. 'run:' .. id
      if redis.call('HEXISTS', run, 'q') == 1 and redis.call('HEXISTS', run, 'rc') == 0 then
        redis.call('SET', P .. 'active:' .. session, id)
        local t = redis.call('TIME')
        redis.call('HSET', run, 'n', node, 't', t[1] .. '.' .. string.format('%06d', t[2]))
        redis.call('HDEL', run, 'q')
        redis.call('SADD', P .. 'node:' .. node .. ':runs', id)
        -- Every node learns which run of the session is active (``x``: the node running it).
        redis.call('XADD', P .. 'accepted', 'MAXLEN', '~', stream, '*', 'id', id, 's', session,
                   'x', node)
        out[#out + 1] = id
        out[#out + 1] = session
        out[#out + 1] = redis.call('HGET', run, 'w')
        out[#out + 1] = redis.call('HGET', run, 'c')
        out[#out + 1] = redis.call('HGET', run, 'e') or '0'
        claimed = claimed + 1
        break
      end
    end
  end
end
if claimed > 0 then
  redis.call('HINCRBY', P .. 'stats', 'claimed', claimed)
end
return out
"""

LIST = r"""
-- ARGV[1] prefix; ARGV[2] JSON {before, path, session, state, lk, lv, want, scan}: runs of
-- the index strictly before member `before` ("" for the newest), newest first, matching
-- every filter given ("" for any); stops after `want` matches or `scan` index entries.
-- Returns {where to go on from ("" once the index is exhausted), then for each match:
-- id, s, w, m, t, rc, k}.
local P = ARGV[1]
local q = cjson.decode(ARGV[2])
local out = {''}
local from = '+'
if q.before ~= '' then from = '(' .. q.before end
local matched, scanned, last, exhausted = 0, 0, '', false
while not exhausted and matched < q.want and scanned < q.scan do
  local batch = redis.call('ZREVRANGEBYLEX', P .. 'index', from, '-', 'LIMIT', 0, 100)
  local stopped = false
  for _, member in ipairs(batch) do
    scanned = scanned + 1
    last = member
    local id = string.sub(member, string.find(member, '|', 1, true) + 1)
    local f = redis.call('HMGET', P .. 'run:' .. id, 's', 'w', 'm', 't', 'rc')
    local ok = f[1] ~= false
    if ok and q.session ~= '' and f[1] ~= q.session then ok = false end
    if ok and q.path ~= '' and f[2] ~= q.path then ok = false end
    if ok and q.state == 'pending' and f[5] then ok = false end
    if ok and q.state == 'terminal' and not f[5] then ok = false end
    if ok and q.lk ~= '' then
      local labels = (f[3] and cjson.decode(f[3]).labels) or {}
      if type(labels) ~= 'table' or labels[q.lk] ~= q.lv then ok = false end
    end
    if ok then
      out[#out + 1] = id
      for j = 1, 5 do out[#out + 1] = f[j] or '' end
      out[#out + 1] = member
      matched = matched + 1
    end
    if matched >= q.want or scanned >= q.scan then
      stopped = true
      break
    end
  end
  if not stopped and #batch < 100 then exhausted = true end
  from = '(' .. last
end
if not exhausted then out[1] = last end
return out
"""

INFO = r"""
-- ARGV[1] prefix, ARGV[2] run id: {s, w, m, t, rc, k} ("" for each field absent), or
-- nil for a run Redis does not hold.
local f = redis.call('HMGET', ARGV[1] .. 'run:' .. ARGV[2], 's', 'w', 'm', 't', 'rc', 'k')
if not f[1] then return false end
for j = 1, 6 do f[j] = f[j] or '' end
return f
"""

REGISTER = r"""
-- ARGV: prefix, node, ttl_ms. A fresh incarnation: its lease, and its place among nodes.
local P = ARGV[1]
if redis.call('SET', P .. 'lease:' .. ARGV[2], '1', 'PX', ARGV[3], 'NX') then
  redis.call('SADD', P .. 'nodes', ARGV[2])
  return 1
end
return 0
"""

HEARTBEAT = r"""
-- ARGV: prefix, node, ttl_ms. Extends the lease: 1; takes it again if it expired but the
-- node was never declared dead (Redis restarted, or nobody swept yet): 2; else 0 (fenced).
local P = ARGV[1]
if redis.call('PEXPIRE', P .. 'lease:' .. ARGV[2], ARGV[3]) == 1 then
  return 1
end
if redis.call('SISMEMBER', P .. 'nodes', ARGV[2]) == 1 then
  redis.call('SET', P .. 'lease:' .. ARGV[2], '1', 'PX', ARGV[3])
  return 2
end
return 0
"""

RELEASE = r"""
-- ARGV: prefix, node. A graceful exit: the node is dead now, so any run it still owns is
-- recovered at the next sweep instead of after the TTL.
local P = ARGV[1]
redis.call('DEL', P .. 'lease:' .. ARGV[2])
if redis.call('SREM', P .. 'nodes', ARGV[2]) == 1 then
  redis.call('SADD', P .. 'dead', ARGV[2])
end
return 1
"""

RECOVER = (
    _FINISH
    + r"""
-- ARGV[1] prefix; ARGV[2] JSON {limits, error, max, executions}. Every run of a node whose
-- lease is gone gets one abandoned terminal, or, a routed run whose workspace reruns what a
-- crash interrupted (``r``), goes back to the head of its lane for its next execution (``e``
-- counts the reruns) unless it had `executions` already; returns {run ids recovered}.
local P = ARGV[1]
local req = cjson.decode(ARGV[2])
local now = now_ms()
-- Declare dead every node whose lease is gone: from now on it cannot take it again.
for _, node in ipairs(redis.call('SMEMBERS', P .. 'nodes')) do
  if redis.call('EXISTS', P .. 'lease:' .. node) == 0 then
    redis.call('SREM', P .. 'nodes', node)
    redis.call('SADD', P .. 'dead', node)
  end
end
local done = {}
for _, node in ipairs(redis.call('SMEMBERS', P .. 'dead')) do
  local key = P .. 'node:' .. node .. ':runs'
  for _, id in ipairs(redis.call('SRANDMEMBER', key, req.max - #done)) do
    local run = P .. 'run:' .. id
    local session = redis.call('HGET', run, 's')
    local reruns = tonumber(redis.call('HGET', run, 'e') or '0')
    if session and redis.call('HEXISTS', run, 'rc') == 0 and redis.call('HGET', run, 'r') == '1'
        and redis.call('HEXISTS', run, 'c') == 1 and reruns + 1 < req.executions then
      redis.call('HSET', run, 'q', '1', 'e', reruns + 1)
      redis.call('HDEL', run, 'n', 't')
      redis.call('SREM', key, id)
      redis.call('SADD', P .. 'routed', id)
      if redis.call('GET', P .. 'active:' .. session) == id then
        redis.call('DEL', P .. 'active:' .. session)
      end
      redis.call('LPUSH', P .. 'lane:' .. session, id)
      redis.call('RPUSH', P .. 'ready', session)
      redis.call('HINCRBY', P .. 'stats', 'rerun', 1)
      done[#done + 1] = id
    elseif session and redis.call('HEXISTS', run, 'rc') == 0 then
      local rc = cjson.encode({session_id = session, run_id = id, error = req.error,
                               cancelled = false, abandoned = true, reason = 'abandoned',
                               ended_at = now / 1000})
      finish(P, req.limits, id, session, 'failed', rc, node, now)
      redis.call('HINCRBY', P .. 'stats', 'abandoned', 1)
      done[#done + 1] = id
    else
      redis.call('SREM', key, id)
    end
  end
  if redis.call('SCARD', key) == 0 then
    redis.call('SREM', P .. 'dead', node)
  end
  if #done >= req.max then break end
end
return done
"""
)

READ = r"""
-- ARGV[1] prefix, ARGV[2..] run ids: each run's terminal JSON, "" while it is pending, or
-- nil for a run Redis does not know.
local out = {}
for i = 2, #ARGV do
  local run = ARGV[1] .. 'run:' .. ARGV[i]
  out[i - 1] = redis.call('HGET', run, 'rc') or (redis.call('EXISTS', run) == 1 and '') or false
end
return out
"""

PENDING = r"""
-- ARGV[1] prefix: {id, session, id, session, ...} for every pending run of every node,
-- then every routed run no node claimed yet.
local P = ARGV[1]
local out = {}
local function add(ids)
  for _, id in ipairs(ids) do
    local session = redis.call('HGET', P .. 'run:' .. id, 's')
    if session then
      out[#out + 1] = id
      out[#out + 1] = session
    end
  end
end
add(redis.call('SMEMBERS', P .. 'routed'))
for _, set in ipairs({'nodes', 'dead'}) do
  for _, node in ipairs(redis.call('SMEMBERS', P .. set)) do
    add(redis.call('SMEMBERS', P .. 'node:' .. node .. ':runs'))
  end
end
return out
"""
