"""The items the engine sends to its script: positions the Lua code reads (it[2] .. it[8])."""

from __future__ import annotations

import orjson

from worker.engine import _encode_item
from worker.model import CommandItem, UsageItem


def test_usage_items_travel_in_the_scripts_field_order() -> None:
    item = UsageItem("e1", "m1", "t1", 12_500, 1_767_225_600_000, "credits.usage.v1:3", 42)
    encoded = orjson.loads(orjson.dumps(_encode_item(item)))
    # apply.lua: local eid, mid, task, c, occ, src, off = it[2], ..., it[8]
    assert encoded == [1, "e1", "m1", "t1", 12_500, 1_767_225_600_000, "credits.usage.v1:3", 42]


def test_command_items_carry_their_command_as_json() -> None:
    item = CommandItem({"type": "tick", "command_id": "c1", "at_ms": 5}, "credits.admin.v1:0", 7)
    kind, command, source, offset = _encode_item(item)
    assert (kind, orjson.loads(command), source, offset) == (
        2,
        {"type": "tick", "command_id": "c1", "at_ms": 5},
        "credits.admin.v1:0",
        7,
    )
