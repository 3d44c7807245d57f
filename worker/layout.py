"""The records that cross between Python and the Lua engine, declared once.

Items go into the apply script as positional JSON arrays, effects and member records come back
as positional arrays: one order, defined here, read by both sides. ``python -m worker.layout``
writes ``worker/lua/lib_layout.lua`` from these declarations (row constructors, the member
record's positions, the kind codes), and ``worker/effects.py`` builds its decoders from them;
``tests/unit/test_layout.py`` fails when the generated file is out of date. A new field is
added here, in one place, and both languages follow.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path
from typing import Final

ITEM_USAGE: Final = 1
ITEM_COMMAND: Final = 2
USAGE_ITEM_FIELDS: Final = (
    "event_id", "member_id", "task_id", "credits_mc", "occurred_at_ms", "source", "offset",
)  # fmt: skip
"""A usage item: ``[ITEM_USAGE, *fields]``. A command item: ``[ITEM_COMMAND, command JSON,
source, offset]``."""

EFFECT_KINDS: Final = (
    "ledger", "usage", "command", "signal", "notification", "refill_request", "invoice", "charge",
)  # fmt: skip
"""Kind codes of effect rows: the 1-based position here (``ledger`` is 1, ``charge`` 8)."""

EFFECT_FIELDS: Final[dict[str, tuple[str, ...]]] = {
    "ledger": (
        "member_id", "source_kind", "source_id", "task_id", "movement", "bucket", "grant_id",
        "amount_mc", "cycle_start_ms", "late", "at_ms",
    ),
    "usage": (
        "event_id", "member_id", "task_id", "credits_mc", "occurred_at_ms", "status", "code",
        "late", "source", "offset",
    ),
    "command": ("command_id", "type", "status", "code", "command", "source", "offset"),
    "signal": ("member_id", "signal", "reason", "member_seq", "issued_at_ms"),
    "notification": ("type", "member_id", "detail", "at_ms"),
    "refill_request": ("request_id", "credits_mc", "amount_usd_cents", "at_ms"),
    "invoice": ("cycle_start_ms", "cycle_end_ms", "negative_balance_mc", "amount_usd_cents"),
    # A usage event paid by one bucket: its ledger row (seq) and its usage row (seq + 1).
    "charge": (
        "bucket", "grant_id", "event_id", "member_id", "task_id", "credits_mc",
        "occurred_at_ms", "late", "source", "offset", "cycle_start_ms", "at_ms",
    ),
}  # fmt: skip
"""Every effect row is ``[kind code, seq, *fields]`` in this order."""

MEMBER_FIELDS: Final = (
    "tier",  # seat tier
    "nt",  # next cycle's tier
    "act",  # 1 active, 0 removed
    "cn",  # cycle number the counters belong to
    "ag",  # allocation granted this cycle
    "au",  # allocation used
    "bk",  # pool block credits left
    "dr",  # drawn from the pool this cycle
    "bu",  # block credits used
    "pu",  # promotional credits used
    "debt",
    "ds",  # org clock when the debt began
    "lim",  # pool limit: mc, null (none) or "inherit"
    "pz",  # 1 paused
    "rs",  # pause reason
    "ms",  # member seq of the last signal
    "aa",  # added at (the current or last seat's start)
    "ra",  # removed at (the last removal)
    "inp",  # in the paused set
    "inq",  # in the pool-dependents set
    "inb",  # in the debtors set
    "pr",  # promos, flat [grant_id, left, expires_at, ...]
    "sh",  # closed seats, flat [added_at, removed_at, ...]
    "lr",  # reason of the last signal
    "li",  # org clock of the last signal
)
"""The member record: one MessagePack array per member in the org's member hash."""

MEMBER_ENCODED_ARGS: Final = ("lim", "rs", "ra", "pr")
"""Member fields whose stored form the Lua side computes before packing (``nil``/``false`` as
MessagePack nil, promos flattened): arguments of the generated ``member_array``."""

MEMBER_DECODED_BY_HAND: Final = ("lim", "rs", "ra", "pr", "sh", "lr", "li")
"""Member fields the Lua side decodes itself (defaults, nil, promos as tables); the generated
``member_from`` copies the others."""

ORG_FIELDS: Final = (
    "an",  # billing anchor day
    "pa",  # pending anchor day (0: none)
    "ck",  # org clock
    "cn",  # cycle number
    "cs",  # cycle start
    "ce",  # cycle end
    "la",  # last pool activity
    "pl",  # pool balance
    "lk",  # 1 locked after a failed refill
    "pd",  # drawn from the pool this cycle
    "bw",  # 1 below-threshold notified
    "re",  # auto-refill enabled
    "rt",  # auto-refill threshold
    "ra",  # auto-refill amount
    "rm",  # auto-refill monthly limit
    "rd",  # refilled this cycle
    "rpm",  # credits of the pending refill request
    "rc",  # refill request counter
    "rn",  # 1 monthly-limit notified
    "ie",  # invoice charges outside member debt
    "sq",  # last effect seq
    "at",  # allocation left (O(1) cycle end)
    "bt",  # block credits out
    "dt",  # member debt
    "nt",  # next cycle's allocation total
    "np",  # earliest promo expiry (lower bound)
    "hm",  # home partition + 1: where the org is decided (0: none, decided where it arrives)
)
"""The org's integers: one field ``s`` of the org hash, a MessagePack array in this order (one
read and one write per call instead of one per field)."""

LUA_FILE: Final = "lib_layout.lua"


def org_index(name: str) -> int:
    """0-based position of an org field in the ``s`` field."""
    return ORG_FIELDS.index(name)


def member_index(name: str) -> int:
    """0-based position of a member record field (Python side)."""
    return MEMBER_FIELDS.index(name)


def render_lua() -> str:
    """``lib_layout.lua``: the kind codes, the member positions and one constructor per row."""
    lines = [
        "-- Generated from worker/layout.py by `python -m worker.layout`: do not edit.",
        "-- Item kinds, effect kind codes, member record positions, the org's integer fields and",
        "-- effect row constructors.",
        "",
        f"local ITEM_USAGE, ITEM_COMMAND = {ITEM_USAGE}, {ITEM_COMMAND}",
        "local EK = {" + ", ".join(f"{k} = {i}" for i, k in enumerate(EFFECT_KINDS, 1)) + "}",
        "local MP = {"
        + ", ".join(f"{name} = {i}" for i, name in enumerate(MEMBER_FIELDS, 1))
        + "}",
        "local ORG_FIELDS = {" + ", ".join(f"'{name}'" for name in ORG_FIELDS) + "}",
        "",
    ]
    # Table constructors, not loops over the names: Lua sizes a constructor's table once, where
    # filling an empty table field by field rehashes it five times (the org and a member are
    # read and written on every call, so this is per-org work of every call).
    org_fields = ", ".join(f"{name} = a[{i}] or 0" for i, name in enumerate(ORG_FIELDS, 1))
    member_values = ", ".join(
        name if name in MEMBER_ENCODED_ARGS else f"m.{name}" for name in MEMBER_FIELDS
    )
    member_plain = ", ".join(
        f"{name} = a[{i}]"
        for i, name in enumerate(MEMBER_FIELDS, 1)
        if name not in MEMBER_DECODED_BY_HAND
    )
    lines += [
        "-- The org's integers from their stored array (and the pending refill id), and back.",
        "local function org_from(a, rp)",
        f"  return {{{org_fields}, rp = rp}}",
        "end",
        "local function org_array(o)",
        "  return {" + ", ".join(f"o.{name}" for name in ORG_FIELDS) + "}",
        "end",
        "-- A member from its stored array: the fields stored as they are ("
        + ", ".join(MEMBER_DECODED_BY_HAND)
        + " are the caller's).",
        "local function member_from(id, a)",
        f"  return {{id = id, {member_plain}}}",
        "end",
        "-- A member's stored array; "
        + ", ".join(MEMBER_ENCODED_ARGS)
        + " as the caller encoded them.",
        f"local function member_array(m, {', '.join(MEMBER_ENCODED_ARGS)})",
        f"  return {{{member_values}}}",
        "end",
        "",
    ]
    for kind in EFFECT_KINDS:
        fields = EFFECT_FIELDS[kind]
        args = ", ".join(("seq", *fields))
        lines.append(f"-- [{EFFECT_KINDS.index(kind) + 1}, {args}]")
        lines.append(f"local function row_{kind}({args})")
        lines.append(f"  return {{{EFFECT_KINDS.index(kind) + 1}, {args}}}")
        lines.append("end")
    return "\n".join(lines) + "\n"


def lua_path() -> Path:
    return Path(str(resources.files("worker") / "lua" / LUA_FILE))


def main(argv: list[str] | None = None) -> int:
    """``python -m worker.layout [--check]``: write (or check) ``lua/lib_layout.lua``."""
    args = sys.argv[1:] if argv is None else argv
    path = lua_path()
    text = render_lua()
    if "--check" in args:
        current = path.read_text(encoding="utf-8") if path.exists() else ""
        if current != text:
            sys.stderr.write(f"{path} is out of date: run python -m worker.layout\n")
            return 1
        return 0
    path.write_text(text, encoding="utf-8")
    sys.stdout.write(f"wrote {path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
