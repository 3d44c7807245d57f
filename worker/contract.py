"""The engine contract: what goes into the credit engine, what comes out, and every method the
pipeline, recovery, the API and the CLI call on it.

Two implementations keep it: ``worker.engine.RedisEngine`` (the Lua scripts, production) and
``worker.engine_memory.MemoryEngine`` (the pure model with an in-memory outbox: tests, a second
opinion). Nothing outside them reaches into an engine's client or keys.

One call applies the items of many orgs (``apply_many``), each org's items atomically and in
order, orgs independent of one another. Amounts are integer millicredits, times epoch
milliseconds. Effects are the typed values of ``worker.effects`` (a tagged union of msgspec
Structs), each with the org-wide, strictly increasing ``seq`` that also orders it in the org's
outbox.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from worker.effects import Effect, Signal


class UsageItem(NamedTuple):
    """One decoded usage event for the org of the call.

    A named tuple rather than a frozen dataclass: the pipeline makes one per event, and a
    tuple is built several times faster (and the garbage collector soon stops tracking it).
    ``source`` is ``"<topic>:<partition>"``, ``offset`` the Kafka offset, or -1 for items that
    do not come straight from Kafka (parked retries, rebuild replays).
    """

    event_id: str
    member_id: str
    task_id: str
    credits_mc: int
    occurred_at_ms: int
    source: str = ""
    offset: int = -1


@dataclass(frozen=True, slots=True)
class CommandItem:
    """One validated admin command (amounts in mc, times in ms) for the org of the call."""

    command: Mapping[str, Any]
    source: str = ""
    offset: int = -1


Item = UsageItem | CommandItem


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one item: ``status`` is applied/duplicate/replayed/rejected/unknown, or
    ``elsewhere`` (not decided here: ``code`` is the org's home partition, where the record
    is to be forwarded, docs/delivery.md "One owner per org")."""

    status: str
    code: str | None = None


@dataclass(slots=True)
class ApplyResult:
    """Outcomes (one per item, in order) and the effects produced, in ``seq`` order."""

    outcomes: list[Outcome]
    effects: list[Effect]

    def __iter__(self) -> Iterator[Any]:
        """Unpacks as ``outcomes, effects = engine.apply(...)``."""
        return iter((self.outcomes, self.effects))

    @property
    def dicts(self) -> list[dict[str, Any]]:
        """The effects as plain dicts, charges expanded (what ``worker.model`` returns)."""
        from worker.effects import as_dicts

        return as_dicts(self.effects)


class OrgCall(NamedTuple):
    """One org's part of an ``apply_many`` call.

    ``expect_seq`` (0: no check) is the org's effect seq that PostgreSQL holds or will hold:
    an engine holding the org at a lower seq (or not at all) refuses the org unchanged.
    ``replay``: the items are recorded decisions replayed by a rebuild, applied wherever they
    were decided (no home check).
    """

    org_id: str
    items: Sequence[Item]
    expect_seq: int = 0
    replay: bool = False


@dataclass(slots=True)
class OrgResult:
    """What ``apply_many`` did for one org: outcomes and effects as in :class:`ApplyResult`
    (one-bucket charges stay compact ``Charge`` effects), or ``behind`` when it refused."""

    org_id: str
    outcomes: list[Outcome]
    effects: list[Effect]
    behind: RedisBehind | None = None


CLAIM_NEW, CLAIM_MINE, CLAIM_TAKEN = 0, 1, 2
"""Verdicts of :meth:`Engine.claim`: claimed now, claimed before by the same record (a
replay), claimed by another record (a duplicate)."""


class Snapshot(NamedTuple):
    """One org's engine state at effect ``seq``, opaque to everything but the engine that
    made it (stored in ``org_snapshots``; a rebuild restores it and replays the ledger after
    ``seq``)."""

    org_id: str
    seq: int
    state: bytes


class RedisBehind(Exception):
    """A call refused because the engine holds an older state of the org than expected.

    ``apply(..., expect_seq=n)`` asks the engine to check, before it decides anything, that
    the org's effect seq is at least ``n`` (what PostgreSQL holds or will hold). A Redis
    restarted behind its AOF, or emptied, fails the check and is left unchanged.
    """

    def __init__(self, org_id: str, redis_seq: int, expected: int) -> None:
        super().__init__(f"redis has org {org_id!r} at seq {redis_seq}, expected {expected}")
        self.org_id = org_id
        self.redis_seq = redis_seq
        self.expected = expected


class Engine(Protocol):
    """Everything the worker calls on a credit engine."""

    async def apply_many(self, calls: Sequence[OrgCall]) -> list[OrgResult]:
        """Apply the items of several orgs (one :class:`OrgCall` per org, no org twice); one
        result per call, in order. Each org's items are applied atomically and in order; ids
        are not deduplicated here (``claim`` first), replayed offsets are. On an error nothing
        is returned, although orgs of the calls that reached the store may have been applied:
        applying the same calls again is safe (their offsets come back ``replayed`` and their
        effects wait in the outbox, ``outbox_pending``)."""

    def apply_stream(
        self, calls: Sequence[OrgCall]
    ) -> AsyncGenerator[list[tuple[int, OrgResult]], None]:
        """``apply_many``, with each org's result handed over as soon as the store call that
        finished the org returns: an async iterator of ``(index into calls, result)`` lists,
        every index exactly once. On an error the iteration raises; the indexes not handed
        over yet may or may not have been applied (as for ``apply_many``)."""

    async def apply(
        self, org_id: str, items: Sequence[Item], *, expect_seq: int = 0, replay: bool = False
    ) -> ApplyResult:
        """``apply_many`` for one org, charges expanded; raises :class:`RedisBehind` when the
        engine refused the org."""

    async def claim(
        self, entries: Sequence[tuple[str, str]], *, passed: AbstractSet[int] = frozenset()
    ) -> list[int]:
        """Claim namespaced ids (``e|``/``c|``) for the records carrying them (``CLAIM_*``),
        the entries of one id answered in order (at most one is not ``CLAIM_TAKEN``).
        ``passed``: positions of records sent on to their org's home, undecided here: they
        make no claim and drop their own (an earlier attempt's); ``CLAIM_NEW`` means free."""

    async def release_claims(self, entries: Sequence[tuple[str, str]]) -> None:
        """Drop the claims of records that did not decide their id (forwarded to their org's
        home): each ``(id, claim)`` removed only while that record still holds it."""

    async def outbox_pending(self, org_id: str, after_seq: int = 0) -> list[Effect]:
        """Effects not yet acknowledged with ``seq > after_seq``, in seq order (charges
        expanded)."""

    async def outbox_pending_many(self, after: Mapping[str, int]) -> dict[str, list[Effect]]:
        """``outbox_pending`` of several orgs (org -> after_seq), in one round trip."""

    async def outbox_ack(
        self, acks: Mapping[str, int], unknown_marks: Mapping[str, Sequence[str]] | None = None
    ) -> None:
        """Drop each org's outbox effects up to its seq; forget the unknown-offset marks of
        events that PostgreSQL now holds as parked."""

    async def orgs_with_outbox(self) -> list[str]:
        """Every org that has unacknowledged effects (start-up recovery)."""

    async def last_seqs(self, org_ids: Sequence[str]) -> dict[str, int]:
        """Each org's last effect seq (0 for an org the engine does not know)."""

    async def snapshots(self, org_ids: Sequence[str]) -> dict[str, Snapshot]:
        """Each known org's current state and the effect seq it is at (orgs the engine does
        not know are left out)."""

    async def restore_org(self, snapshot: Snapshot) -> None:
        """Replace the org's state with a snapshot's (empty outbox, no Kafka watermarks)."""

    async def reset_org(self, org_id: str) -> None:
        """Forget everything about one org (before a rebuild replays it)."""

    async def member_signals(
        self, wanted: Mapping[str, Sequence[str]]
    ) -> dict[str, dict[str, Signal]]:
        """Per org of ``wanted``, each listed member's current state as its latest ``signal``
        (``seq`` 0: a re-send), for members that have had one; one round trip."""

    async def dashboard(self, org_id: str) -> dict[str, Any] | None:
        """The SPEC section 7 dashboard, or None for an unknown org."""

    async def admin_view(self, org_id: str) -> dict[str, Any] | None:
        """The admin page's document (``views.admin_view``), or None for an unknown org."""

    async def entitlements(
        self, wanted: Mapping[str, Sequence[str]]
    ) -> dict[str, dict[str, dict[str, Any] | None] | None]:
        """Per org of ``wanted``, each listed member's entitlement (``views.entitlement_view``,
        None for an unknown member), or None for an unknown org; one read per call unit."""

    async def ping(self) -> None:
        """Raise unless the engine's store answers."""

    async def close(self) -> None:
        """Release the engine's connections."""
