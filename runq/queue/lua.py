"""What runq's Lua scripts share: the server clock, and names passed in from Python constants.

Every script is built with ``script``: the hash fields, statuses and limits it uses are declared
as Lua locals holding the values of runq's Python constants, so a name is spelled once, in
``constants.py``, and a script never disagrees with the Python that reads what it wrote.
"""

from __future__ import annotations

import json

from runq.queue import constants

# Server time in epoch seconds: deadlines, leases, due times and the drain rate are all read
# against the Redis server's clock, so processes on hosts whose clocks disagree still agree.
SERVER_NOW = """
local function server_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
"""


def script(body: str, *snippets: str, **names: str | int | float) -> str:
    """The source of a script: ``names`` as Lua locals, then ``snippets``, then ``body``."""
    declared = "".join(f"local {name} = {_literal(value)}\n" for name, value in names.items())
    return declared + "".join(snippets) + body


def _literal(value: str | int | float) -> str:
    # A JSON string is a valid Lua string literal for the ASCII names runq uses.
    return json.dumps(value) if isinstance(value, str) else repr(value)


# The drain rate decayed to `now`: an exponentially weighted count of tasks per second, kept in
# a hash under DRAIN_RATE_FIELD and DRAIN_AT_FIELD (locals the scripts that write it use too).
DRAIN_RATE = script(
    """
local function drain_rate(key, now, window)
  local drain = redis.call('HMGET', key, DRAIN_RATE_FIELD, DRAIN_AT_FIELD)
  if not drain[1] then
    return 0
  end
  return tonumber(drain[1]) * math.exp((tonumber(drain[2]) - now) / window)
end
""",
    DRAIN_RATE_FIELD=constants.DRAIN_RATE_FIELD,
    DRAIN_AT_FIELD=constants.DRAIN_AT_FIELD,
)


# Variadic calls for a whole batch: members gathered per key with add(), then sent by
# call_with() in one command per key. unpack() is bounded by Lua's C stack (about 8,000
# values), so a batch of thousands goes in slices.
VARIADIC = script(
    """
local function add(groups, key, ...)
  local members = groups[key]
  if not members then
    members = {}
    groups[key] = members
  end
  for _, member in ipairs({...}) do
    members[#members + 1] = member
  end
end
local function call_with(command, key, members)
  for first = 1, #members, UNPACK_MAX do
    local last = math.min(first + UNPACK_MAX - 1, #members)
    if key then
      redis.call(command, key, unpack(members, first, last))
    else
      redis.call(command, unpack(members, first, last))
    end
  end
end
""",
    # Even, so that score-member pairs are never split.
    UNPACK_MAX=4000,
)
