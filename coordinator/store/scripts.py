"""Finds the Lua scripts shipped with the package and registers them with redis-py.

A line ``--!include <file>.lua`` is replaced by that file's text, so that scripts can
share a function (the transaction-creating code of create.lua is also used by the
flash sale's buy script) while each still runs as one atomic EVALSHA.

The batch script is generated here from the others: each script's text becomes a Lua
function, and a dispatcher runs several calls of them in one EVALSHA (store/batch.py
decides which calls may share one).
"""

from __future__ import annotations

from coordinator.resources import read_resource

_INCLUDE = "--!include "


def _read(filename: str) -> str:
    return read_resource("lua", filename)


def script_text(name: str) -> str:
    """The text of lua/<name>.lua with its includes expanded (one level deep)."""
    lines = []
    for line in _read(f"{name}.lua").splitlines(keepends=True):
        if line.startswith(_INCLUDE):
            lines.append(_read(line[len(_INCLUDE):].strip()))
        else:
            lines.append(line)
    return "".join(lines)


SCRIPT_NAMES = (
    "create", "transition", "claim", "load", "sweep", "register", "reset_due", "topic",
    "due",
)

# A failed call's reply in a batch: {BATCH_ERROR, message}. No script replies with it.
BATCH_ERROR = "__ERR__"

# The batch script's own part. RUN lists the wrapped scripts in the order of the names
# given to batch_script_text. ARGV[1] = number of calls n; ARGV[3i-1], ARGV[3i],
# ARGV[3i+1] = script number, key count and argument count of call i; then the keys of
# every call in KEYS and their arguments after the header in ARGV, call after call.
_DISPATCH = """
-- Every script asks for the time once; the batch asks the server once, and its calls
-- share that moment. Everything else reaches the real redis.call unchanged, errors
-- and all, so each script's own pcall and error_reply behave as when it runs alone.
-- The moment comes as numbers: each script's tonumber of them is then free.
local real = redis
local time_reply
local shim = setmetatable({
  call = function(command, ...)
    if (command == 'TIME' or command == 'time') and select('#', ...) == 0 then
      if not time_reply then
        local t = real.call('TIME')
        time_reply = {tonumber(t[1]), tonumber(t[2])}
      end
      return {time_reply[1], time_reply[2]}
    end
    return real.call(command, ...)
  end,
}, {__index = real})

-- tonumber of a string and string.format of one number cost a C library call each
-- (strtod, snprintf) of about a thousand instructions, several per script call; the
-- calls of a batch convert the same few texts (counts, lease lengths) and, sharing one
-- moment, format the same few times. So the scripts get versions that remember their
-- answers for the batch, with the same results (a call that errs errs the same way).
local real_tonumber, real_format = tonumber, string.format
local numbers = {}
-- (type() is a C call too: the hit paths do without it.)
local function batch_tonumber(v, base)
  local n
  if base == nil then
    n = numbers[v]
    if n ~= nil then
      return n or nil
    end
  end
  n = real_tonumber(v, base)
  -- Any v but nil and NaN can be a key; tonumber of it is the same each time.
  if base == nil and v ~= nil and v == v then
    numbers[v] = n or false
  end
  return n
end
local formatted = {}
local batch_string = setmetatable({
  format = function(format, v, more, ...)
    local by = formatted[format]
    if more == nil and by then
      -- Only numbers are keys here, so a hit formats a number.
      local text = by[v]
      if text then
        return text
      end
    end
    if more ~= nil or type(v) ~= 'number' or v ~= v then
      return real_format(format, v, more, ...)
    end
    if not by then
      by = {}
      formatted[format] = by
    end
    local text = real_format(format, v)
    by[v] = text
    return text
  end,
}, {__index = string})

-- unpack copies in C, about twice as fast as a loop; it is bounded by the Lua stack.
local function slice(list, after, count)
  if count <= 4000 then
    return {unpack(list, after + 1, after + count)}
  end
  local out = {}
  for j = 1, count do
    out[j] = list[after + j]
  end
  return out
end

local n = tonumber(ARGV[1])
local replies = {}
local key_at, arg_at = 0, 1 + 3 * n
for i = 1, n do
  local run = RUN[batch_tonumber(ARGV[3 * i - 1])]
  local key_count, arg_count = batch_tonumber(ARGV[3 * i]), batch_tonumber(ARGV[3 * i + 1])
  local keys, args = slice(KEYS, key_at, key_count), slice(ARGV, arg_at, arg_count)
  key_at, arg_at = key_at + key_count, arg_at + arg_count
  -- One call's error must not take the replies of the calls before and after it.
  local ok, reply = pcall(run, keys, args, shim, batch_tonumber, batch_string)
  if not ok then
    if type(reply) == 'table' and reply.err then
      reply = reply.err
    end
    reply = {'@ERROR@', tostring(reply)}
  elseif reply == nil then
    -- A nil would end the reply array here; false is the same nil reply.
    reply = false
  elseif type(reply) == 'table' and reply.err then
    reply = {'@ERROR@', tostring(reply.err)}
  end
  replies[i] = reply
end
return replies
""".replace("@ERROR@", BATCH_ERROR)


def batchable(name: str) -> bool:
    """Whether a script can run inside the batch script. A shebang line (script flags)
    only means something at the start of a script of its own, and the reply protocol
    and replication mode a script sets would last into the calls after it."""
    text = script_text(name)
    return not text.startswith("#!") and "setresp" not in text and "set_repl" not in text


def batch_script_text(names: tuple[str, ...]) -> str:
    """One script that runs calls of the named scripts, one after another, in one
    EVALSHA (see `_DISPATCH` for its KEYS and ARGV).

    Each script's text becomes the body of a function whose parameters KEYS, ARGV,
    redis, tonumber and string shadow the globals, so the scripts run unchanged on their
    slice of the keys and arguments.
    """
    parts = [
        "-- batch (generated by coordinator/store/scripts.py from "
        + ", ".join(f"{name}.lua" for name in names) + ")\n"
    ]
    for name in names:
        if not name.isidentifier():
            raise ValueError(f"script name {name!r} is not a Lua name")
        parts.append(
            f"local function run_{name}(KEYS, ARGV, redis, tonumber, string)\n"
            f"{script_text(name)}\nend\n"
        )
    parts.append("local RUN = {" + ", ".join(f"run_{name}" for name in names) + "}\n")
    parts.append(_DISPATCH)
    return "".join(parts)
