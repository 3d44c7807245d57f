"""The Lua calendar (``worker/lua/lib_calendar.lua``) against Python's for random instants."""

from __future__ import annotations

import datetime as dt
from importlib import resources

import orjson
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.model import add_months, cycle_containing, next_cycle_end, to_ms

LO = to_ms(dt.datetime(1971, 1, 1, tzinfo=dt.UTC))
HI = to_ms(dt.datetime(2199, 12, 31, tzinfo=dt.UTC))
EDGES = [
    to_ms(dt.datetime(y, m, d, tzinfo=dt.UTC)) + off
    for y in (2024, 2025, 2100)
    for m, d in ((1, 31), (2, 28), (2, 29) if y == 2024 else (3, 1), (3, 31), (12, 31))
    for off in (-1, 0, 1)
]

WRAPPER = """
local out = {}
for _, c in ipairs(cjson.decode(ARGV[1])) do
  local t, a = c[1], c[2]
  local s, e = cycle_containing(t, a)
  out[#out + 1] = {s, e, next_cycle_end(t, a), add_months(t, 12), add_months(t, -1)}
end
return cjson.encode(out)
"""


def lua_calendar() -> str:
    root = resources.files("worker") / "lua"
    return (root / "lib_calendar.lua").read_text(encoding="utf-8") + WRAPPER


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    cases=st.lists(
        st.tuples(st.one_of(st.integers(LO, HI), st.sampled_from(EDGES)), st.integers(1, 31)),
        min_size=1,
        max_size=200,
    )
)
async def test_lua_calendar_matches_python(redis_url: str, cases: list[tuple[int, int]]) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        raw = await client.eval(lua_calendar(), 0, orjson.dumps(cases).decode())
    finally:
        await client.aclose()
    got = orjson.loads(raw)
    want = [
        [*cycle_containing(t, a), next_cycle_end(t, a), add_months(t, 12), add_months(t, -1)]
        for t, a in cases
    ]
    assert got == want
