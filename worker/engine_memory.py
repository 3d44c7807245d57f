"""MemoryEngine: the engine contract over the pure model, with an in-memory outbox and claims.

A second implementation of ``worker.contract.Engine`` beside ``RedisEngine``: the pipeline runs
on it unchanged (``PIPELINE_TEST_ENGINE=model`` in the pipeline tests), which keeps the contract
honest (nothing may depend on Redis) and gives a second opinion when a scenario fails. State
lives in the process: a restart forgets everything, so it is not for production.
"""

from __future__ import annotations

import pickle
from collections.abc import AsyncGenerator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from copy import deepcopy
from typing import Any

from worker import views
from worker.contract import (
    CLAIM_MINE,
    CLAIM_NEW,
    CLAIM_TAKEN,
    ApplyResult,
    Item,
    OrgCall,
    OrgResult,
    RedisBehind,
    Snapshot,
)
from worker.effects import Effect, Signal, from_dict
from worker.model import Model


class MemoryEngine:
    """``worker.contract.Engine`` on ``worker.model.Model``."""

    def __init__(self, tiers: Mapping[str, int] | None = None, block_credits: int = 500) -> None:
        self.model = Model(tiers, block_credits)
        self.outbox: dict[str, list[Effect]] = {}
        self.claims: dict[str, str] = {}

    async def apply_many(self, calls: Sequence[OrgCall]) -> list[OrgResult]:
        out: list[OrgResult] = []
        for org_id, items, expect_seq, replay in calls:
            try:
                result = await self.apply(org_id, items, expect_seq=expect_seq, replay=replay)
            except RedisBehind as behind:
                out.append(OrgResult(org_id, [], [], behind))
                continue
            out.append(OrgResult(org_id, result.outcomes, result.effects))
        return out

    async def apply_stream(
        self, calls: Sequence[OrgCall]
    ) -> AsyncGenerator[list[tuple[int, OrgResult]], None]:
        # One org at a time, as the store would finish them one call after the other.
        for i, call in enumerate(calls):
            (result,) = await self.apply_many([call])
            yield [(i, result)]

    async def apply(
        self, org_id: str, items: Sequence[Item], *, expect_seq: int = 0, replay: bool = False
    ) -> ApplyResult:
        org = self.model.orgs.get(org_id)
        have = org.seq if org is not None else 0
        if expect_seq > 0 and have < expect_seq:
            raise RedisBehind(org_id, have, expect_seq)
        result = self.model.apply(org_id, items, replay=replay)
        effects: list[Effect] = [from_dict(e) for e in result.effects]
        self.outbox.setdefault(org_id, []).extend(effects)
        return ApplyResult(result.outcomes, effects)

    async def claim(
        self, entries: Sequence[tuple[str, str]], *, passed: AbstractSet[int] = frozenset()
    ) -> list[int]:
        out: list[int] = []
        passing: dict[str, str] = {}  # ids of passed-on records seen in this call
        for i, (ident, claim) in enumerate(entries):
            have = passing.get(ident) or self.claims.get(ident)
            if i in passed and (have is None or have == claim):
                self.claims.pop(ident, None)
                passing[ident] = claim
                out.append(CLAIM_NEW)
            elif have is None:
                self.claims[ident] = claim
                out.append(CLAIM_NEW)
            else:
                out.append(CLAIM_MINE if have == claim else CLAIM_TAKEN)
        return out

    async def release_claims(self, entries: Sequence[tuple[str, str]]) -> None:
        for ident, claim in entries:
            if self.claims.get(ident) == claim:
                del self.claims[ident]

    async def outbox_pending(self, org_id: str, after_seq: int = 0) -> list[Effect]:
        return [e for e in self.outbox.get(org_id, []) if e.seq > after_seq]

    async def outbox_pending_many(self, after: Mapping[str, int]) -> dict[str, list[Effect]]:
        return {org_id: await self.outbox_pending(org_id, seq) for org_id, seq in after.items()}

    async def outbox_ack(
        self, acks: Mapping[str, int], unknown_marks: Mapping[str, Sequence[str]] | None = None
    ) -> None:
        for org_id, upto in acks.items():
            self.outbox[org_id] = [e for e in self.outbox.get(org_id, []) if e.seq > upto]
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

    async def snapshots(self, org_ids: Sequence[str]) -> dict[str, Snapshot]:
        out: dict[str, Snapshot] = {}
        for org_id in org_ids:
            org = self.model.orgs.get(org_id)
            if org is not None:
                copy = deepcopy(org)
                copy.watermarks.clear()  # as snapshot.lua: no Kafka positions, no marks
                copy.unknown_seen.clear()
                out[org_id] = Snapshot(org_id, org.seq, pickle.dumps(copy))
        return out

    async def restore_org(self, snapshot: Snapshot) -> None:
        self.model.orgs[snapshot.org_id] = pickle.loads(snapshot.state)  # noqa: S301 (our own)
        self.outbox.pop(snapshot.org_id, None)

    async def reset_org(self, org_id: str) -> None:
        self.model.orgs.pop(org_id, None)
        self.outbox.pop(org_id, None)

    async def member_signals(
        self, wanted: Mapping[str, Sequence[str]]
    ) -> dict[str, dict[str, Signal]]:
        result: dict[str, dict[str, Signal]] = {}
        for org_id, member_ids in wanted.items():
            org = self.model.orgs.get(org_id)
            out = result[org_id] = {}
            if org is None:
                continue
            for mid in member_ids:
                m = org.members.get(mid)
                if m is None or not m.mseq or m.last_reason is None:
                    continue
                signal = "pause" if m.paused else "resume"
                out[mid] = Signal(0, org_id, mid, signal, m.last_reason, m.mseq, m.last_at)
        return result

    async def dashboard(self, org_id: str) -> dict[str, Any] | None:
        return views.dashboard(self.model, org_id)

    async def admin_view(self, org_id: str) -> dict[str, Any] | None:
        return views.admin(self.model, org_id)

    async def entitlements(
        self, wanted: Mapping[str, Sequence[str]]
    ) -> dict[str, dict[str, dict[str, Any] | None] | None]:
        return {o: views.entitlements(self.model, o, list(ids)) for o, ids in wanted.items()}

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None
