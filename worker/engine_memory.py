"""MemoryEngine: the engine contract over the pure model, with an in-memory outbox and claims.

A second implementation of ``worker.contract.Engine`` beside ``RedisEngine``: the pipeline runs
on it unchanged (``PIPELINE_TEST_ENGINE=model`` in the pipeline tests), which keeps the contract
honest (nothing may depend on Redis) and gives a second opinion when a scenario fails. State
lives in the process: a restart forgets everything, so it is not for production.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from worker.contract import (
    CLAIM_MINE,
    CLAIM_NEW,
    CLAIM_TAKEN,
    ApplyResult,
    ChargeRow,
    Item,
    Outcome,
    RedisBehind,
)
from worker.model import Model


class MemoryEngine:
    """``worker.contract.Engine`` on ``worker.model.Model``."""

    def __init__(self, tiers: Mapping[str, int] | None = None, block_credits: int = 500) -> None:
        self.model = Model(tiers, block_credits)
        self.outbox: dict[str, list[dict[str, Any]]] = {}
        self.claims: dict[str, str] = {}

    async def apply(
        self, org_id: str, items: Sequence[Item], *, expect_seq: int = 0
    ) -> ApplyResult:
        org = self.model.orgs.get(org_id)
        have = org.seq if org is not None else 0
        if expect_seq > 0 and have < expect_seq:
            raise RedisBehind(org_id, have, expect_seq)
        result = self.model.apply(org_id, items)
        self.outbox.setdefault(org_id, []).extend(dict(e) for e in result.effects)
        return result

    async def apply_rows(
        self, org_id: str, items: Sequence[Item], *, expect_seq: int = 0
    ) -> tuple[list[Outcome], list[dict[str, Any]], list[ChargeRow]]:
        result = await self.apply(org_id, items, expect_seq=expect_seq)
        return result.outcomes, result.effects, []

    async def claim(self, entries: Sequence[tuple[str, str]]) -> list[int]:
        out: list[int] = []
        for ident, claim in entries:
            have = self.claims.get(ident)
            if have is None:
                self.claims[ident] = claim
                out.append(CLAIM_NEW)
            else:
                out.append(CLAIM_MINE if have == claim else CLAIM_TAKEN)
        return out

    async def outbox_pending(self, org_id: str, after_seq: int = 0) -> list[dict[str, Any]]:
        return [dict(e) for e in self.outbox.get(org_id, []) if e["seq"] > after_seq]

    async def outbox_ack(
        self, acks: Mapping[str, int], unknown_marks: Mapping[str, Sequence[str]] | None = None
    ) -> None:
        for org_id, upto in acks.items():
            self.outbox[org_id] = [e for e in self.outbox.get(org_id, []) if e["seq"] > upto]
        for org_id, marks in (unknown_marks or {}).items():
            org = self.model.orgs.get(org_id)
            if org is None:
                continue
            for mark in marks:
                _, source, offset = mark.rsplit("|", 2)
                org.unknown_seen.discard((source, int(offset)))

    async def orgs_with_outbox(self) -> list[str]:
        return sorted(o for o, effects in self.outbox.items() if effects)

    async def last_seqs(self, org_ids: Sequence[str]) -> dict[str, int]:
        return {o: (org.seq if (org := self.model.orgs.get(o)) else 0) for o in org_ids}

    async def reset_org(self, org_id: str) -> None:
        self.model.orgs.pop(org_id, None)
        self.outbox.pop(org_id, None)

    async def member_signals(
        self, org_id: str, member_ids: Sequence[str]
    ) -> dict[str, dict[str, Any]]:
        org = self.model.orgs.get(org_id)
        out: dict[str, dict[str, Any]] = {}
        if org is None:
            return out
        for mid in member_ids:
            m = org.members.get(mid)
            if m is None or not m.mseq or m.last_reason is None:
                continue
            out[mid] = {
                "kind": "signal",
                "org_id": org_id,
                "member_id": mid,
                "signal": "pause" if m.paused else "resume",
                "reason": m.last_reason,
                "member_seq": m.mseq,
                "issued_at_ms": m.last_at,
            }
        return out

    async def dashboard(self, org_id: str) -> dict[str, Any] | None:
        return self.model.dashboard(org_id)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None
