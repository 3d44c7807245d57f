"""RedisEngine: the production credit engine, a typed wrapper over the Lua scripts.

One ``apply`` call runs a batch of items of ONE org atomically in Redis (``worker/lua/apply.lua``)
and returns one outcome per item and the effects produced; the same effects stay in the org's
outbox stream until ``outbox_ack``. Org-wide work (cycle end, pool running dry, funding after
debt) is chunked inside Redis; ``apply`` keeps calling the script until every item is applied
and no chunked work is left, so the caller sees one call. Key layout, memory figures and the
dedupe design are in ``docs/engine.md``.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import TYPE_CHECKING, Any

import orjson

from schemas.ids import unhash_tag_part
from worker.constants import (
    DEFAULT_WALK_BUDGET,
    KEY_OUTBOX,
    MAX_AMOUNT_MC,
    MAX_BALANCE_MC,
    MAX_TIER_CREDITS,
    MAX_USAGE_MC,
    MC_PER_CREDIT,
    OrgKeys,
    org_keys,
)
from worker.contract import (
    CLAIM_MINE,
    CLAIM_NEW,
    CLAIM_TAKEN,
    ApplyResult,
    CommandItem,
    Item,
    Outcome,
    RedisBehind,
    UsageItem,
)
from worker.model import Grant, Member, Org, dashboard_view, roll_member, state_view

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster

    from worker.config import Settings

__all__ = [
    "CLAIM_MINE",
    "CLAIM_NEW",
    "CLAIM_TAKEN",
    "ApplyResult",
    "CommandItem",
    "Item",
    "Outcome",
    "RedisBehind",
    "RedisEngine",
    "UsageItem",
    "load_apply_script",
]


def _ledger(r: list[Any], org: str) -> dict[str, Any]:
    return {"kind": "ledger", "seq": r[1], "org_id": org, "member_id": r[2],
            "source_kind": r[3], "source_id": r[4], "task_id": r[5], "movement": r[6],
            "bucket": r[7], "grant_id": r[8], "amount_mc": r[9], "cycle_start_ms": r[10],
            "late": r[11], "at_ms": r[12]}  # fmt: skip


def _usage(r: list[Any], org: str) -> dict[str, Any]:
    return {"kind": "usage", "seq": r[1], "org_id": org, "event_id": r[2], "member_id": r[3],
            "task_id": r[4], "credits_mc": r[5], "occurred_at_ms": r[6], "status": r[7],
            "code": r[8], "late": r[9], "source": r[10], "offset": r[11]}  # fmt: skip


def _command(r: list[Any], org: str) -> dict[str, Any]:
    return {"kind": "command", "seq": r[1], "org_id": org, "command_id": r[2], "type": r[3],
            "status": r[4], "code": r[5], "command": orjson.loads(r[6]), "source": r[7],
            "offset": r[8]}  # fmt: skip


def _signal(r: list[Any], org: str) -> dict[str, Any]:
    return {"kind": "signal", "seq": r[1], "org_id": org, "member_id": r[2], "signal": r[3],
            "reason": r[4], "member_seq": r[5], "issued_at_ms": r[6]}  # fmt: skip


def _notification(r: list[Any], org: str) -> dict[str, Any]:
    return {"kind": "notification", "seq": r[1], "org_id": org, "type": r[2],
            "member_id": r[3], "detail": r[4], "at_ms": r[5]}  # fmt: skip


def _refill_request(r: list[Any], org: str) -> dict[str, Any]:
    return {"kind": "refill_request", "seq": r[1], "org_id": org, "request_id": r[2],
            "credits_mc": r[3], "amount_usd_cents": r[4], "at_ms": r[5]}  # fmt: skip


def _invoice(r: list[Any], org: str) -> dict[str, Any]:
    return {"kind": "invoice", "seq": r[1], "org_id": org, "cycle_start_ms": r[2],
            "cycle_end_ms": r[3], "negative_balance_mc": r[4],
            "amount_usd_cents": r[5]}  # fmt: skip


def _charge(r: list[Any], org: str) -> tuple[dict[str, Any], dict[str, Any]]:
    # One row for the common charge: a usage event paid by one bucket (ledger seq, usage seq+1).
    ledger = {"kind": "ledger", "seq": r[1], "org_id": org, "member_id": r[5],
              "source_kind": "usage", "source_id": r[4], "task_id": r[6], "movement": "charge",
              "bucket": r[2], "grant_id": r[3], "amount_mc": -r[7], "cycle_start_ms": r[12],
              "late": r[9], "at_ms": r[13]}  # fmt: skip
    usage = {"kind": "usage", "seq": r[1] + 1, "org_id": org, "event_id": r[4],
             "member_id": r[5], "task_id": r[6], "credits_mc": r[7], "occurred_at_ms": r[8],
             "status": "charged", "code": None, "late": r[9], "source": r[10],
             "offset": r[11]}  # fmt: skip
    return ledger, usage


# Effects travel from the script as positional JSON arrays (row[0] = kind code, row[1] = seq).
_DECODERS = (None, _ledger, _usage, _command, _signal, _notification, _refill_request, _invoice)
_CHARGE = 8
KEY_CACHE_MAX = 100_000
"""Orgs whose key names are remembered (about 1.5 KB each)."""

CHARGE_FIELDS = (
    "kind", "ledger_seq", "bucket", "grant_id", "event_id", "member_id", "task_id",
    "credits_mc", "occurred_at_ms", "late", "source", "offset", "cycle_start_ms", "at_ms",
)  # fmt: skip
"""Positions in a compact charge row: a usage event paid by one bucket, whose ``ledger``
effect has seq ``ledger_seq`` and whose ``usage`` effect (status ``charged``) ``ledger_seq + 1``."""
_OUTCOMES: dict[tuple[str, str | None], Outcome] = {}


def load_script(name: str) -> str:
    """One stand-alone script of ``lua/`` (flagged with the ``#!lua`` shebang, see below)."""
    text = (resources.files("worker") / "lua" / name).read_text(encoding="utf-8")
    return "#!lua\n" + text


def load_apply_script() -> str:
    """The apply script: ``lua/lib_*.lua`` (shared helpers) followed by ``lua/apply.lua``.

    Redis Lua has no ``require``; the helpers are concatenated in front (flat in ``lua/`` so
    the package data glob ``lua/*.lua`` ships them).
    """
    root = resources.files("worker") / "lua"
    lib = sorted(
        (p for p in root.iterdir() if p.name.startswith("lib_") and p.name.endswith(".lua")),
        key=lambda p: p.name,
    )
    # The shebang makes it a flagged script (Redis 7): refused at its start when Redis is out
    # of memory, never half-way through its writes.
    parts = ["#!lua"]
    parts += [p.read_text(encoding="utf-8") for p in lib]
    parts.append((root / "apply.lua").read_text(encoding="utf-8"))
    return "\n".join(parts)


def _encode_item(item: Item) -> tuple[Any, ...]:
    if isinstance(item, UsageItem):
        # UsageItem's fields are in the script's order: event_id, member_id, task_id,
        # credits_mc, occurred_at_ms, source, offset (tests/unit/test_engine_encoding.py).
        return (1, *item)
    return (2, orjson.dumps(dict(item.command)).decode(), item.source, item.offset)


def decode_effects(
    org_id: str, raw: Any, charges: list[list[Any]] | None = None
) -> list[dict[str, Any]]:
    """Effect dicts (``docs/architecture.md`` fields) from the scripts' positional JSON.

    With ``charges``, compact charge rows (see :data:`CHARGE_FIELDS`) are appended there as they
    came instead of being expanded into their ``ledger`` and ``usage`` dicts.
    """
    rows = orjson.loads(raw) if isinstance(raw, str | bytes) else raw
    if not rows:
        return []
    dec = _DECODERS
    out: list[dict[str, Any]] = []
    for r in rows:
        if r[0] == _CHARGE:
            if charges is None:
                out.extend(_charge(r, org_id))
            else:
                charges.append(r)
        else:
            out.append(dec[r[0]](r, org_id))  # type: ignore[misc]
    return out


def expand_charges(org_id: str, charges: Sequence[list[Any]]) -> list[dict[str, Any]]:
    """The ``ledger`` and ``usage`` effect dicts of compact charge rows, in seq order."""
    out: list[dict[str, Any]] = []
    for r in charges:
        out.extend(_charge(r, org_id))
    return out


def _outcomes(rows: list[list[Any]]) -> list[Outcome]:
    # The rows come from JSON (str or None), and outcomes are immutable: share them.
    cache = _OUTCOMES
    out: list[Outcome] = []
    for status, code in rows:
        key = (status, code)
        found = cache.get(key)
        if found is None:
            found = cache[key] = Outcome(status, code)
        out.append(found)
    return out


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisEngine:
    """Credit engine on Redis (standalone or Cluster): apply, outbox, dashboard."""

    def __init__(
        self,
        client: Redis | RedisCluster,
        settings: Settings,
        *,
        walk_budget: int = DEFAULT_WALK_BUDGET,
    ) -> None:
        for name, credits in settings.tiers.items():
            if not 0 <= credits <= MAX_TIER_CREDITS:
                raise ValueError(f"tier {name!r}: credits must be 0..{MAX_TIER_CREDITS}")
        self.client = client
        self.prefix = settings.redis_key_prefix
        self.tiers_mc = {k: v * MC_PER_CREDIT for k, v in settings.tiers.items()}
        self.block_mc = settings.pool_block_credits * MC_PER_CREDIT
        self.window_ms = settings.dedupe_window_seconds * 1000
        self.walk_budget = max(1, walk_budget)
        self._config = orjson.dumps(
            [self.tiers_mc, self.block_mc, MAX_USAGE_MC, MAX_AMOUNT_MC, MAX_BALANCE_MC]
        ).decode()
        self._apply = client.register_script(load_apply_script())
        self._claim = client.register_script(load_script("claim.lua"))
        self.claim_shards = settings.claim_shards
        self._cluster = type(client).__name__ == "RedisCluster"
        self._keys: dict[str, OrgKeys] = {}
        self.calls = 0
        """Script calls made (tests and the benchmark read it)."""

    @classmethod
    def from_settings(cls, settings: Settings) -> RedisEngine:
        """Engine with its own client built from settings."""
        from worker.connections import redis_client

        return cls(redis_client(settings), settings)

    def keys(self, org_id: str) -> OrgKeys:
        """The org's keys in ``KEYS`` order (all share the hash tag ``{org_id}``).

        Remembered per org (bounded): the pipeline asks for them on every call.
        """
        keys = self._keys.get(org_id)
        if keys is None:
            if len(self._keys) >= KEY_CACHE_MAX:
                self._keys.clear()
            keys = self._keys[org_id] = org_keys(self.prefix, org_id)
        return keys

    async def apply(
        self, org_id: str, items: Sequence[Item], *, expect_seq: int = 0
    ) -> ApplyResult:
        """Apply items of one org in order; one outcome per item plus the effects produced.

        Calls for different orgs may run concurrently; calls for the same org should not
        overlap when the relative order of their items matters (each call is atomic, but two
        overlapping calls interleave at call boundaries).
        Several script calls happen when org-wide work is chunked; each call is atomic and
        leaves the org consistent, and a crash between calls leaves the pending work recorded
        in the org hash, where the next call (of any worker) finishes it before anything else.
        With ``expect_seq``, the first call raises :class:`RedisBehind` without changing anything
        when Redis holds the org at a lower effect seq (or not at all). Ids are not
        deduplicated here (a replayed offset is): the pipeline claims them first (:meth:`claim`).
        """
        outcomes, effects, _ = await self._run(org_id, items, None, expect_seq)
        return ApplyResult(outcomes, effects)

    async def apply_rows(
        self, org_id: str, items: Sequence[Item], *, expect_seq: int = 0
    ) -> tuple[list[Outcome], list[dict[str, Any]], list[list[Any]]]:
        """Like :meth:`apply`, but one-bucket charges stay compact rows (:data:`CHARGE_FIELDS`).

        Returns ``(outcomes, effects, charges)``: ``effects`` holds every other effect; each
        list is in seq order on its own. The pipeline builds PostgreSQL rows straight from the
        charge rows instead of two dicts per event.
        """
        charges: list[list[Any]] = []
        outcomes, effects, _ = await self._run(org_id, items, charges, expect_seq)
        return outcomes, effects, charges

    async def _run(
        self,
        org_id: str,
        items: Sequence[Item],
        charges: list[list[Any]] | None,
        expect_seq: int = 0,
    ) -> tuple[list[Outcome], list[dict[str, Any]], list[list[Any]] | None]:
        keys = self.keys(org_id)
        encoded = [_encode_item(i) for i in items]
        outcomes: list[Outcome] = []
        effects: list[dict[str, Any]] = []
        start = 0
        stalls = 0
        while True:
            batch = orjson.dumps(encoded[start:]).decode()
            args: list[str | int] = [org_id, batch, self._config, self.walk_budget, expect_seq]
            meta_raw, blob = await self._apply(keys=keys, args=args)
            self.calls += 1
            consumed, pending, outs = orjson.loads(meta_raw)
            if consumed < 0:  # refused unchanged: Redis is behind expect_seq
                raise RedisBehind(org_id, int(pending), expect_seq)
            expect_seq = 0  # later calls of a chunked apply follow our own writes
            if isinstance(outs, dict):  # cjson writes an empty table as {}
                outs = []
            outcomes.extend(_outcomes(outs[:consumed]))
            effects.extend(decode_effects(org_id, blob, charges))
            start += consumed
            if start >= len(encoded) and not pending:
                return outcomes, effects, charges
            # Every call with a budget of at least one member makes progress, so a call that
            # consumed nothing and reports nothing pending means the script is broken.
            stalls = stalls + 1 if consumed == 0 and not pending else 0
            if stalls > 1:
                raise RuntimeError(f"engine made no progress on org {org_id!r}")

    # --- claims: decided once, across orgs and workers ----------------------------------------

    def claim_keys(self, shard: int, now_ms: int) -> list[str]:
        """This and the previous window's claim hashes of one claim shard."""
        window = now_ms // self.window_ms
        tag = f"{self.prefix}:ids:{{{shard}}}:"
        return [f"{tag}{window}", f"{tag}{window - 1}"]

    async def claim(
        self, entries: Sequence[tuple[str, str]], *, now_ms: int | None = None
    ) -> list[int]:
        """Claim ids for their records: ``(id, claim)`` pairs in, one :data:`CLAIM_NEW` /
        :data:`CLAIM_MINE` / :data:`CLAIM_TAKEN` per pair out, in order.

        ``id`` is namespaced (``e|<event_id>``, ``c|<command_id>``), ``claim`` names the record
        that carries it (``<partition>:<offset>``). The claims are sharded by id over
        ``claim_shards`` hash tags and sent in one pipelined round trip; a window lives
        ``dedupe_window_seconds`` (two windows are consulted), PostgreSQL is the permanent record.
        """
        if not entries:
            return []
        now = int(time.time() * 1000) if now_ms is None else now_ms
        shards = self.claim_shards
        by_shard: dict[int, list[int]] = {}
        for i, (ident, _) in enumerate(entries):
            by_shard.setdefault(zlib.crc32(ident.encode()) % shards, []).append(i)
        ttl = 2 * self.window_ms + 60_000
        order = list(by_shard.items())
        calls: list[tuple[list[str], list[str | int]]] = [
            (
                self.claim_keys(shard, now),
                [ttl, orjson.dumps([entries[i] for i in positions]).decode()],
            )
            for shard, positions in order
        ]
        replies: list[Any]
        if self._cluster:
            # One call per shard, each routed to the node of its slot.
            replies = await asyncio.gather(*(self._claim(keys=k, args=a) for k, a in calls))
        else:
            pipe = self.client.pipeline(transaction=False)
            for k, a in calls:
                await self._claim(keys=k, args=a, client=pipe)  # type: ignore[arg-type]
            replies = await pipe.execute()
        out = [CLAIM_NEW] * len(entries)
        for (_, positions), reply in zip(order, replies, strict=True):
            verdicts = reply if isinstance(reply, bytes) else str(reply).encode()
            for i, verdict in zip(positions, verdicts, strict=True):
                out[i] = verdict - 48  # b"0" -> 0
        return out

    async def member_signals(
        self, org_id: str, member_ids: Sequence[str]
    ) -> dict[str, dict[str, Any]]:
        """The current state of members as their latest signal (``kind="signal"`` effect dicts
        without ``seq``), for members that have had one; re-sent after a failed publish so the
        compacted control topic ends on the current state."""
        if not member_ids:
            return {}
        ids = list(dict.fromkeys(member_ids))
        raw = await self.client.hmget(self.keys(org_id).members, ids)
        out: dict[str, dict[str, Any]] = {}
        for mid, rec in zip(ids, raw, strict=True):
            if rec is None:
                continue
            a = orjson.loads(rec)
            mseq = a[15]
            if not mseq or len(a) < 25 or a[23] is None:
                continue
            out[mid] = {
                "kind": "signal", "org_id": org_id, "member_id": mid,
                "signal": "pause" if a[13] == 1 else "resume", "reason": a[23],
                "member_seq": mseq, "issued_at_ms": a[24],
            }  # fmt: skip
        return out

    async def drain(self, org_id: str) -> ApplyResult:
        """Finish any chunked org-wide work of the org (apply with no items)."""
        return await self.apply(org_id, [])

    async def last_seq(self, org_id: str) -> int:
        """The org's last effect seq (0 when Redis does not know the org)."""
        return (await self.last_seqs([org_id]))[org_id]

    async def last_seqs(self, org_ids: Sequence[str]) -> dict[str, int]:
        """Each org's last effect seq (0 for an org Redis does not know), one round trip."""
        pipe = self.client.pipeline(transaction=False)
        for org_id in org_ids:
            pipe.hget(self.keys(org_id).org, "sq")
        values = await pipe.execute() if org_ids else []
        return {o: int(_s(v)) if v is not None else 0 for o, v in zip(org_ids, values, strict=True)}

    async def ping(self) -> None:
        """Raise unless Redis answers."""
        await self.client.ping()

    async def close(self) -> None:
        """Close the Redis client."""
        await self.client.aclose()

    async def reset_org(self, org_id: str) -> None:
        """Forget everything Redis holds for one org (before a rebuild replays it)."""
        # One DEL is fine on a cluster: every key of the org shares its hash tag.
        await self.client.delete(*self.keys(org_id))

    # --- outbox ----------------------------------------------------------------------------

    async def outbox_pending(self, org_id: str, after_seq: int = 0) -> list[dict[str, Any]]:
        """Effects still in the org's outbox with ``seq > after_seq``, in seq order."""
        key = self.keys(org_id).outbox
        entries = await self.client.xrange(key, min=f"({after_seq}-0", max="+")
        out: list[dict[str, Any]] = []
        for _id, fields in entries or ():
            blob = (fields or {}).get("e") or (fields or {}).get(b"e")
            out.extend(e for e in decode_effects(org_id, blob) if e["seq"] > after_seq)
        return out

    async def outbox_ack(
        self, acks: Mapping[str, int], unknown_marks: Mapping[str, Sequence[str]] | None = None
    ) -> None:
        """Drop each org's outbox entries whose effects all have ``seq <= acks[org]``, and the
        unknown-offset marks of events PostgreSQL now holds as parked; one round trip.

        ``XTRIM MINID`` per org (entry ids are ``<last seq>-0``) and ``SREM`` of the marks.
        """
        if not acks and not unknown_marks:
            return
        pipe = self.client.pipeline(transaction=False)
        for org_id, seq in acks.items():
            pipe.xtrim(self.keys(org_id).outbox, minid=f"{seq + 1}-0", approximate=False)
        for org_id, marks in (unknown_marks or {}).items():
            if marks:
                pipe.srem(self.keys(org_id).unknown, *marks)
        await pipe.execute()

    async def orgs_with_outbox(self) -> list[str]:
        """Orgs with unacked effects (SCAN over every node; startup recovery only)."""
        suffix = f"}}:{KEY_OUTBOX}"
        head = f"{self.prefix}:{{"
        found: set[str] = set()
        async for raw in self.client.scan_iter(match=f"{head}*{suffix}", count=1000):
            key = _s(raw)
            if key.startswith(head) and key.endswith(suffix) and await self.client.xlen(key) > 0:
                found.add(unhash_tag_part(key[len(head) : -len(suffix)]))
        return sorted(found)

    # --- views -----------------------------------------------------------------------------

    async def load_org(self, org_id: str) -> Org | None:
        """The org as the model's ``Org`` (members rolled to the current cycle), or None."""
        keys = self.keys(org_id)
        raw_org = await self.client.hgetall(keys.org)
        h = {_s(k): _s(v) for k, v in raw_org.items()}
        if "ex" not in h:
            return None
        raw_members = await self.client.hgetall(keys.members)

        def num(name: str) -> int:
            return int(h.get(name, "0"))

        org = Org(
            org_id=org_id, anchor=num("an"), clock=num("ck"), cstart=num("cs"), cend=num("ce"),
            last_act=num("la"), pending_anchor=num("pa") or None, cycle_no=num("cn"),
            pool=num("pl"), locked=num("lk") == 1, pdrawn=num("pd"), below=num("bw") == 1,
            rf_enabled=num("re") == 1, rf_threshold=num("rt"), rf_amount=num("ra"),
            rf_monthly=num("rm"), refilled=num("rd"), rf_pending_id=h.get("rp") or None,
            rf_pending_mc=num("rpm"), rf_counter=num("rc"), rf_limit_notified=num("rn") == 1,
            invoice_extra=num("ie"), seq=num("sq"),
        )  # fmt: skip
        for k, v in h.items():
            if k.startswith("w:"):
                org.watermarks[k[2:]] = int(v)
            elif k.startswith("t:"):
                org.tier_limits[k[2:]] = None if v == "none" else int(v)
        for mid_raw, rec in raw_members.items():
            mid = _s(mid_raw)
            a = orjson.loads(rec)
            promos = a[21] if isinstance(a[21], list) else []
            seats = a[22] if len(a) > 22 and isinstance(a[22], list) else []
            m = Member(
                member_id=mid, tier=a[0], next_tier=a[1], active=a[2] == 1, cycle_no=a[3],
                ag=a[4], au=a[5], bk=a[6], dr=a[7], bu=a[8], pu=a[9], debt=a[10], dsince=a[11],
                limit=a[12], paused=a[13] == 1, reason=a[14], mseq=a[15], added_at=a[16],
                removed_at=a[17],
                promos=[Grant(promos[i], promos[i + 1], promos[i + 2])
                        for i in range(0, len(promos), 3)],
                seats=[(seats[i], seats[i + 1]) for i in range(0, len(seats), 2)],
                last_reason=a[23] if len(a) > 23 else None,
                last_at=a[24] if len(a) > 24 else 0,
            )  # fmt: skip
            roll_member(m, org.cycle_no, self.tiers_mc)
            org.members[mid] = m
        return org

    async def counters(self, org_id: str) -> dict[str, int]:
        """The org's running totals kept for O(1) cycle ends (tests compare them to sums)."""
        raw = await self.client.hmget(self.keys(org_id).org, ["at", "bt", "dt", "nt"])
        names = ("alloc_left", "blocks", "debts", "next_alloc")
        return {n: int(_s(v)) if v is not None else 0 for n, v in zip(names, raw, strict=True)}

    async def state_view(self, org_id: str) -> dict[str, Any] | None:
        """Normalised state, comparable with ``Model.state_view``."""
        org = await self.load_org(org_id)
        return None if org is None else state_view(org)

    async def dashboard(self, org_id: str) -> dict[str, Any] | None:
        """The admin dashboard JSON of SPEC section 7, or None for an unknown org.

        Members not yet rolled over since the last cycle end are shown rolled over.
        """
        org = await self.load_org(org_id)
        return None if org is None else dashboard_view(org, self.tiers_mc)
