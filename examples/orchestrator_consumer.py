"""Reference consumer of ``credits.control.v1`` for a task orchestrator (see docs/orchestrator.md).

It keeps, per member, the last TaskControl applied and drops any record whose ``seq`` is not
above it: the worker publishes at least once, so after a crash a signal may arrive twice (or an
older one after a newer one across a rebalance). Reading the compacted topic from the beginning
rebuilds the whole view, so the state needs no storage of its own.

    python examples/orchestrator_consumer.py --bootstrap 127.0.0.1:19092 --from-beginning

Only the standard library and aiokafka are used; adapt ``on_pause``/``on_resume`` to the real
orchestrator.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import dataclass


@dataclass
class MemberState:
    """What the orchestrator knows about one member."""

    org_id: str
    member_id: str
    signal: str  # "pause" | "resume"
    reason: str
    seq: int


def split_key(key: bytes) -> tuple[str, str]:
    """``(org_id, member_id)`` of a record key: ``org/member``, each part with ``%`` and ``/``
    percent-encoded (``%25``, ``%2F``). The value carries both ids too; this is for tools that
    only see keys (compaction, topic browsers)."""
    org, _, member = key.decode("utf-8").partition("/")

    def unquote(part: str) -> str:
        out, i = [], 0
        while i < len(part):
            if part.startswith("%25", i) or part.startswith("%2F", i):
                out.append("%" if part[i + 2] == "5" else "/")
                i += 3
            else:
                out.append(part[i])
                i += 1
        return "".join(out)

    return unquote(org), unquote(member)


class ControlView:
    """Last applied TaskControl per ``(org_id, member_id)``; drops anything already seen."""

    def __init__(self) -> None:
        self.members: dict[tuple[str, str], MemberState] = {}
        self.dropped = 0

    def apply(self, value: bytes) -> MemberState | None:
        """Apply one record; returns the new state, or None if it was a repeat or stale."""
        msg = json.loads(value)
        key = (msg["org_id"], msg["member_id"])
        seq = int(msg["seq"])
        current = self.members.get(key)
        if current is not None and seq <= current.seq:
            self.dropped += 1  # a re-published or out-of-date signal: already applied
            return None
        state = MemberState(key[0], key[1], msg["signal"], msg["reason"], seq)
        self.members[key] = state
        return state

    def paused(self, org_id: str, member_id: str) -> bool:
        state = self.members.get((org_id, member_id))
        return state is not None and state.signal == "pause"


def on_pause(org_id: str, member_id: str, reason: str) -> None:
    print(f"pause  {org_id}/{member_id} ({reason}): stop scheduling new task steps")


def on_resume(org_id: str, member_id: str, reason: str) -> None:
    print(f"resume {org_id}/{member_id} ({reason}): tasks may run again")


async def run(bootstrap: str, topic: str, group: str | None, from_beginning: bool) -> None:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=group is not None,
        auto_offset_reset="earliest" if from_beginning else "latest",
    )
    view = ControlView()
    await consumer.start()
    try:
        async for record in consumer:
            state = view.apply(record.value)
            if state is None:
                continue
            # Ids are data: take them from the value, never from splitting the key by hand.
            on = on_pause if state.signal == "pause" else on_resume
            on(state.org_id, state.member_id, state.reason)
    finally:
        await consumer.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bootstrap", default="127.0.0.1:19092")
    p.add_argument("--topic", default="credits.control.v1")
    p.add_argument("--group", default=None, help="consumer group (default: none, read all)")
    p.add_argument("--from-beginning", action="store_true")
    args = p.parse_args()
    asyncio.run(run(args.bootstrap, args.topic, args.group, args.from_beginning))


if __name__ == "__main__":
    main()
