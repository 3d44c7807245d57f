"""RedisEngine: the production credit engine, a typed wrapper over the Lua scripts.

One ``apply_many`` call applies the items of many orgs: the orgs are grouped by virtual shard
(every key of a shard's orgs shares one hash tag, ``worker/constants.py``), and each group is
one run of ``worker/lua/apply.lua``, which applies every org of the group in turn, each
atomically and in order, and returns per org its outcomes and effects; the same effects stay
in the org's outbox stream until ``outbox_ack``. Org-wide work (cycle end, pool running dry,
funding after debt) is chunked inside Redis; ``apply_many`` keeps calling the script until
every item is applied and no chunked work is left, so the caller sees one call. Key layout,
memory figures and the call sizes are in ``docs/engine.md``.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import AsyncGenerator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from importlib import resources
from typing import TYPE_CHECKING, Any, cast

import orjson
from msgspec.msgpack import decode as msgpack_decode

from worker import layout
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
    org_of_key,
    shard_of,
)
from worker.contract import (
    CLAIM_MINE,
    CLAIM_NEW,
    CLAIM_TAKEN,
    ApplyResult,
    CommandItem,
    Item,
    OrgCall,
    OrgResult,
    Outcome,
    RedisBehind,
    Snapshot,
    UsageItem,
)
from worker.effects import Effect, Signal, decode_blob, expanded
from worker.model import Grant, Member, Org, roll_member
from worker.packed import PackedScript, bulk
from worker.views import admin_view, dashboard_view, entitlement_view, state_view

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
    "OrgCall",
    "OrgResult",
    "Outcome",
    "RedisBehind",
    "RedisEngine",
    "UsageItem",
    "load_apply_script",
]

KEY_CACHE_MAX = 100_000
"""Orgs whose key names are remembered (about 1.5 KB each)."""

_OUTBOX = OrgKeys._fields.index("outbox")  # positions in OrgKeys / RedisEngine.key_args
_UNKNOWN = OrgKeys._fields.index("unknown")
_ORG = OrgKeys._fields.index("org")
_MEMBERS = OrgKeys._fields.index("members")
KEYS_PER_ORG = len(OrgKeys._fields)
"""Keys of one org in an apply call (the apply script's ``KEYS`` stride)."""
STATUS_CHUNK = 1_000
"""Orgs per ``org_status.lua`` call (start-up checks): about a millisecond of Redis each."""
SCAN_COUNT = 10_000
"""Keys a start-up ``SCAN`` step walks (a few milliseconds of Redis each)."""
STATUS_CONCURRENCY = 4
"""``org_status.lua`` calls in flight at once (one pooled connection each)."""

CALL_MAX_ORGS = 200
"""Orgs per script call at most (with their items: the time one call holds Redis)."""

CALL_MAX_ITEMS = 500
"""Items per script call at most (NOTES: ~500 debits per call keeps a call near 1-2 ms)."""

CALL_CONCURRENCY = 8
"""Script calls in flight at once (NOTES: a few calls in flight keep Redis busy while the
worker encodes the next ones)."""

APPLY_LIBRARIES = (
    "lib_layout.lua",
    "lib_calendar.lua",
    "lib_state.lua",
    "lib_effects.lua",
    "lib_rules.lua",
    "lib_jobs.lua",
    "lib_due.lua",
    "lib_items.lua",
)
"""The apply script's libraries, in dependency order (Redis Lua has no ``require``)."""

_OUTCOMES: dict[tuple[str, str | None], Outcome] = {}
_MP = {name: layout.member_index(name) for name in layout.MEMBER_FIELDS}


def load_script(name: str, *, reads_only: bool = False) -> str:
    """One stand-alone script of ``lua/`` (flagged with the ``#!lua`` shebang, see below;
    ``reads_only``: with the ``no-writes`` flag, allowed when Redis is out of memory)."""
    text = (resources.files("worker") / "lua" / name).read_text(encoding="utf-8")
    return ("#!lua flags=no-writes\n" if reads_only else "#!lua\n") + text


def load_apply_script() -> str:
    """The apply script: the libraries of :data:`APPLY_LIBRARIES`, then ``lua/apply.lua``.

    Flat in ``lua/`` so the package data glob ``lua/*.lua`` ships them.
    """
    root = resources.files("worker") / "lua"
    # The shebang makes it a flagged script (Redis 7): refused at its start when Redis is out
    # of memory, never half-way through its writes.
    parts = ["#!lua"]
    parts += [(root / name).read_text(encoding="utf-8") for name in APPLY_LIBRARIES]
    parts.append((root / "apply.lua").read_text(encoding="utf-8"))
    return "\n".join(parts)


def load_entitlement_script() -> str:
    """The read of ``entitlements``: ``lua/lib_layout.lua`` (the member record's positions),
    then ``lua/entitlement.lua``."""
    root = resources.files("worker") / "lua"
    parts = [(root / name).read_text(encoding="utf-8") for name in ("lib_layout.lua",)]
    parts.append((root / "entitlement.lua").read_text(encoding="utf-8"))
    return "#!lua flags=no-writes\n" + "\n".join(parts)


def _encode_item(item: Item) -> tuple[Any, ...]:
    if isinstance(item, UsageItem):
        # UsageItem's fields are in the script's order: event_id, member_id, task_id,
        # credits_mc, occurred_at_ms, source, offset (tests/unit/test_engine_encoding.py).
        return (layout.ITEM_USAGE, *item)
    command = orjson.dumps(dict(item.command)).decode()
    return (layout.ITEM_COMMAND, command, item.source, item.offset)


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


def org_integers(raw: bytes | str) -> dict[str, int]:
    """The org hash's ``s`` field (MessagePack) by name (``worker/layout.py`` ORG_FIELDS)."""
    values = msgpack_decode(_binary(raw))
    # A record written before a field was added is shorter: the missing fields are 0.
    out = dict.fromkeys(layout.ORG_FIELDS, 0)
    out.update(zip(layout.ORG_FIELDS, values, strict=False))
    return out


_SQ = layout.ORG_FIELDS.index("sq")


def org_seq_of(raw: bytes | str) -> int:
    """The org's last effect seq from the org hash's ``s`` field (:func:`org_integers`'s
    ``sq``, without naming the other fields)."""
    values = msgpack_decode(_binary(raw))
    return int(values[_SQ]) if len(values) > _SQ else 0


def _binary(value: bytes | str) -> bytes:
    if isinstance(value, str):
        raise TypeError("RedisEngine needs a Redis client with decode_responses=False")
    return value


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _org_record(org_id: str, integers_raw: bytes | str, fields: Mapping[str, str]) -> Org:
    """The model's ``Org`` from the org hash: its ``s`` field and the other fields as text
    (watermarks ``w:``, tier limits ``t:``; the fields left out stay at their defaults)."""
    integers = org_integers(integers_raw)

    def num(name: str) -> int:
        return integers[name]

    org = Org(
        org_id=org_id, anchor=num("an"), clock=num("ck"), cstart=num("cs"), cend=num("ce"),
        last_act=num("la"), pending_anchor=num("pa") or None, cycle_no=num("cn"),
        pool=num("pl"), locked=num("lk") == 1, pdrawn=num("pd"), below=num("bw") == 1,
        rf_enabled=num("re") == 1, rf_threshold=num("rt"), rf_amount=num("ra"),
        rf_monthly=num("rm"), refilled=num("rd"), rf_pending_id=fields.get("rp") or None,
        rf_pending_mc=num("rpm"), rf_counter=num("rc"), rf_limit_notified=num("rn") == 1,
        invoice_extra=num("ie"), seq=num("sq"),
    )  # fmt: skip
    for k, v in fields.items():
        if k.startswith("w:"):
            org.watermarks[k[2:]] = int(v)
        elif k.startswith("t:"):
            org.tier_limits[k[2:]] = None if v == "none" else int(v)
    return org


def _member_record(mid: str, rec: bytes | str) -> Member:
    """The model's ``Member`` from its record in the member hash (not rolled over)."""
    mp = _MP
    a = msgpack_decode(_binary(rec))
    promos = a[mp["pr"]]
    seats = a[mp["sh"]]
    return Member(
        member_id=mid, tier=a[mp["tier"]], next_tier=a[mp["nt"]],
        active=a[mp["act"]] == 1, cycle_no=a[mp["cn"]], ag=a[mp["ag"]], au=a[mp["au"]],
        bk=a[mp["bk"]], dr=a[mp["dr"]], bu=a[mp["bu"]], pu=a[mp["pu"]],
        debt=a[mp["debt"]], dsince=a[mp["ds"]], limit=a[mp["lim"]],
        paused=a[mp["pz"]] == 1, reason=a[mp["rs"]], mseq=a[mp["ms"]],
        added_at=a[mp["aa"]], removed_at=a[mp["ra"]],
        promos=[Grant(promos[i], promos[i + 1], promos[i + 2])
                for i in range(0, len(promos), 3)],
        seats=[(seats[i], seats[i + 1]) for i in range(0, len(seats), 2)],
        last_reason=a[mp["lr"]], last_at=a[mp["li"]],
    )  # fmt: skip


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
        )
        apply_source = load_apply_script()
        ack_source = load_script("ack.lua")
        self._apply = client.register_script(apply_source)
        self._claim = client.register_script(load_script("claim.lua"))
        self._release = client.register_script(load_script("release.lua"))
        self._ack = client.register_script(ack_source)
        self._snapshot = client.register_script(load_script("snapshot.lua"))
        self._restore = client.register_script(load_script("restore.lua"))
        self._entitlement = client.register_script(load_entitlement_script())
        self._status = client.register_script(load_script("org_status.lua", reads_only=True))
        self.claim_shards = settings.claim_shards
        self.shards = settings.redis_shards
        self._cluster = type(client).__name__ == "RedisCluster"
        # On a single Redis the org keys' wire form is cached (worker/packed.py).
        self._apply_packed: PackedScript | None = None
        self._ack_packed: PackedScript | None = None
        self._states_packed: PackedScript | None = None
        self._status_packed: PackedScript | None = None
        if not self._cluster:
            self._status_packed = PackedScript(
                cast("Redis", client), load_script("org_status.lua", reads_only=True)
            )
            self._apply_packed = PackedScript(cast("Redis", client), apply_source)
            self._ack_packed = PackedScript(cast("Redis", client), ack_source)
            self._states_packed = PackedScript(
                cast("Redis", client), load_script("member_states.lua", reads_only=True)
            )
        self._keys: dict[str, OrgKeys] = {}
        self._key_args: dict[str, tuple[bytes, ...]] = {}
        self._wire: dict[str, tuple[bytes, bytes, bytes]] = {}
        self.calls = 0
        """Script calls made (tests and the benchmark read it)."""

    @classmethod
    def from_settings(cls, settings: Settings) -> RedisEngine:
        """Engine with its own client built from settings."""
        from worker.connections import redis_client

        return cls(redis_client(settings), settings)

    def keys(self, org_id: str) -> OrgKeys:
        """The org's keys in ``KEYS`` order (all share its shard's hash tag).

        Remembered per org (bounded): the pipeline asks for them on every call.
        """
        keys = self._keys.get(org_id)
        if keys is None:
            if len(self._keys) >= KEY_CACHE_MAX:
                self._keys.clear()
            keys = self._keys[org_id] = org_keys(self.prefix, org_id, self.shards)
        return keys

    def key_args(self, org_id: str) -> tuple[bytes, ...]:
        """The org's keys as a script call's arguments: UTF-8 once, not at every call (redis-py
        packs bytes about twice as fast as str, and a call carries 8 keys per org)."""
        args = self._key_args.get(org_id)
        if args is None:
            if len(self._key_args) >= KEY_CACHE_MAX:
                self._key_args.clear()
            args = self._key_args[org_id] = tuple(k.encode() for k in self.keys(org_id))
        return args

    def wire(self, org_id: str) -> tuple[bytes, bytes, bytes]:
        """The org's keys of an apply call, of an outbox ack (outbox, unknown-offset marks)
        and of a read of member records (member hash), in their wire form
        (:func:`worker.packed.bulk`), built once per org."""
        wire = self._wire.get(org_id)
        if wire is None:
            if len(self._wire) >= KEY_CACHE_MAX:
                self._wire.clear()
            args = self.key_args(org_id)
            wire = self._wire[org_id] = (
                bulk(*args),
                bulk(args[_OUTBOX], args[_UNKNOWN]),
                bulk(args[_MEMBERS]),
            )
        return wire

    def shard(self, org_id: str) -> int:
        """The org's virtual shard (its keys' hash tag)."""
        return shard_of(org_id, self.shards)

    def call_unit(self, org_id: str) -> int:
        """Which orgs may share one script call: on a Redis Cluster the orgs of one shard
        (one hash tag, one slot); on a single Redis any orgs (the keys of a script need not
        share a slot there), so a small batch is one call whatever shards its orgs are in."""
        return self.shard(org_id) if self._cluster else 0

    async def apply(
        self, org_id: str, items: Sequence[Item], *, expect_seq: int = 0, replay: bool = False
    ) -> ApplyResult:
        """Apply items of one org in order; one outcome per item plus the effects produced
        (charges expanded). Raises :class:`RedisBehind`, having changed nothing, when Redis
        holds the org below ``expect_seq``. See :meth:`apply_many`."""
        (result,) = await self.apply_many([OrgCall(org_id, items, expect_seq, replay)])
        if result.behind is not None:
            raise result.behind
        return ApplyResult(result.outcomes, expanded(result.effects))

    async def drain(self, org_id: str) -> ApplyResult:
        """Finish any chunked org-wide work of the org (apply with no items)."""
        return await self.apply(org_id, [])

    async def apply_many(self, calls: Sequence[OrgCall]) -> list[OrgResult]:
        """Apply the items of several orgs; one :class:`OrgResult` per call, in order.

        The orgs are grouped by call unit (:meth:`call_unit`), and each group is packed into
        script calls of at most :data:`CALL_MAX_ORGS` orgs and :data:`CALL_MAX_ITEMS` items,
        :data:`CALL_CONCURRENCY` in flight. Each org's items are applied atomically per script
        call and in order; an org whose items did not fit, or whose org-wide work is pending,
        goes into the next round until everything is applied (each call leaves the org
        consistent; pending work is recorded in the org hash and finished by the next call of
        any worker before any other item). Calls for the same org must not overlap (each call is
        atomic, but two overlapping calls interleave at call boundaries); one ``apply_many``
        never has an org twice. With ``expect_seq``, an org's first call refuses it unchanged
        when Redis holds it at a lower effect seq (or not at all): its result has ``behind``
        set. Ids are not deduplicated here (a replayed offset is): the pipeline claims them
        first (:meth:`claim`). On an error the exception propagates: orgs of script calls that
        did run are applied, and applying the same calls again is safe (docs/delivery.md).
        """
        results: list[OrgResult] = [OrgResult(c.org_id, [], []) for c in calls]
        async for part in self.apply_stream(calls):
            for idx, res in part:
                results[idx] = res
        return results

    async def apply_stream(
        self, calls: Sequence[OrgCall]
    ) -> AsyncGenerator[list[tuple[int, OrgResult]], None]:
        """:meth:`apply_many`, each script call's finished orgs handed over as soon as that
        call returns (``(index into calls, result)`` lists, every index once), so the caller
        can publish a pause without waiting for the rest of the batch. An org that needs
        another round (items left over, org-wide work pending) is handed over when its last
        call returns. On an error the iteration raises once the calls in flight have ended;
        indexes not handed over may have been applied (see :meth:`apply_many`)."""
        n = len(calls)
        results = [OrgResult(c.org_id, [], []) for c in calls]
        encoded = [[_encode_item(i) for i in c.items] for c in calls]
        start = [0] * n
        expect = [c.expect_seq for c in calls]
        stalls = [0] * n
        todo = list(range(n))
        sem = asyncio.Semaphore(CALL_CONCURRENCY)

        async def run(group: list[int]) -> tuple[list[int], Any]:
            async with sem:
                return group, await self._call_group(group, calls, encoded, start, expect)

        def finished(group: list[int], reply: Any, again: list[int]) -> list[tuple[int, OrgResult]]:
            """The orgs of one script call's reply that are done; the others go to ``again``."""
            done: list[tuple[int, OrgResult]] = []
            meta = orjson.loads(reply[0])
            for j, idx in enumerate(group):
                consumed, pending, outs = meta[j]
                res = results[idx]
                if consumed < 0:  # refused unchanged: Redis is behind expect_seq
                    res.behind = RedisBehind(res.org_id, int(pending), expect[idx])
                    done.append((idx, res))
                    continue
                expect[idx] = 0  # later calls of a chunked apply follow our own writes
                if consumed:
                    res.outcomes.extend(_outcomes(outs[:consumed]))
                res.effects.extend(decode_blob(res.org_id, reply[j + 1]))
                start[idx] += consumed
                if start[idx] >= len(encoded[idx]) and not pending:
                    done.append((idx, res))
                    continue
                # Every call with a budget of at least one member makes progress for some
                # org; an org that consumed nothing twice with nothing pending is broken.
                stalls[idx] = stalls[idx] + 1 if consumed == 0 and not pending else 0
                if stalls[idx] > 1:
                    raise RuntimeError(f"engine made no progress on org {res.org_id!r}")
                again.append(idx)
            return done

        while todo:
            groups = self._pack(todo, calls, encoded, start)
            todo = []
            if len(groups) == 1:
                group, reply = await run(groups[0])
                done = finished(group, reply, todo)
                if done:
                    yield done
                continue
            tasks = [asyncio.ensure_future(run(g)) for g in groups]
            try:
                for next_done in asyncio.as_completed(tasks):
                    group, reply = await next_done
                    done = finished(group, reply, todo)
                    if done:
                        yield done
            finally:
                # On an error (or a caller that stopped early) the calls still in flight run
                # to their end: cancelling one mid-reply would only lose what it applied.
                await asyncio.gather(*tasks, return_exceptions=True)

    def _pack(
        self,
        todo: list[int],
        calls: Sequence[OrgCall],
        encoded: list[list[tuple[Any, ...]]],
        start: list[int],
    ) -> list[list[int]]:
        """Script calls for the orgs of ``todo``: one call unit each (:meth:`call_unit`), bounded
        in orgs and items."""
        by_shard: dict[int, list[int]] = {}
        for idx in todo:
            by_shard.setdefault(self.call_unit(calls[idx].org_id), []).append(idx)
        groups: list[list[int]] = []
        for members in by_shard.values():
            group: list[int] = []
            size = 0
            for idx in members:
                left = min(len(encoded[idx]) - start[idx], CALL_MAX_ITEMS)
                if group and (len(group) >= CALL_MAX_ORGS or size + left > CALL_MAX_ITEMS):
                    groups.append(group)
                    group, size = [], 0
                group.append(idx)
                size += left
            if group:
                groups.append(group)
        return groups

    async def _call_group(
        self,
        group: list[int],
        calls: Sequence[OrgCall],
        encoded: list[list[tuple[Any, ...]]],
        start: list[int],
        expect: list[int],
    ) -> Any:
        org_ids: list[str] = []
        spec: list[Any] = []
        for idx in group:
            org_id = calls[idx].org_id
            org_ids.append(org_id)
            s = start[idx]
            replay = 1 if calls[idx].replay else 0
            spec.append((org_id, encoded[idx][s : s + CALL_MAX_ITEMS], expect[idx], replay))
        args = [orjson.dumps(spec), self._config, b"%d" % self.walk_budget]
        reply = await self._run_apply(org_ids, args)
        self.calls += 1
        return reply

    async def _run_apply(self, org_ids: list[str], args: list[bytes]) -> Any:
        """One apply script call for these orgs (their keys in order) with ``args``."""
        if self._apply_packed is not None:
            wire = self.wire
            return await self._apply_packed(
                KEYS_PER_ORG * len(org_ids), [wire(o)[0] for o in org_ids], args
            )
        keys: list[bytes] = []
        for org_id in org_ids:
            keys.extend(self.key_args(org_id))
        return await self._apply(keys=keys, args=args)

    # --- claims: decided once, across orgs and workers ----------------------------------------

    def claim_keys(self, shard: int, now_ms: int) -> list[str]:
        """This and the previous window's claim hashes of one claim shard."""
        window = now_ms // self.window_ms
        tag = f"{self.prefix}:ids:{{{shard}}}:"
        return [f"{tag}{window}", f"{tag}{window - 1}"]

    async def claim(
        self,
        entries: Sequence[tuple[str, str]],
        *,
        passed: AbstractSet[int] = frozenset(),
        now_ms: int | None = None,
    ) -> list[int]:
        """Claim ids for their records: ``(id, claim)`` pairs in, one :data:`CLAIM_NEW` /
        :data:`CLAIM_MINE` / :data:`CLAIM_TAKEN` per pair out, in order.

        ``id`` is namespaced (``e|<event_id>``, ``c|<command_id>``), ``claim`` names the record
        that carries it (``<partition>:<offset>``). The claims are sharded by id over
        ``claim_shards`` hash tags, all in one script call on a single Redis (one per shard on a
        Redis Cluster, each routed to its slot's node); a window lives
        ``dedupe_window_seconds`` (two windows are consulted), PostgreSQL is the permanent record.
        The entries at the positions in ``passed`` are records sent on to their org's home
        (``[id, claim, 1]`` in claim.lua).
        """
        if not entries:
            return []
        now = int(time.time() * 1000) if now_ms is None else now_ms
        ttl = 2 * self.window_ms + 60_000
        if passed:
            entries = [(*e, 1) if i in passed else e for i, e in enumerate(entries)]  # type: ignore[misc]
        order, replies = await self._per_claim_shard(entries, now, self._claim, [ttl])
        out = [CLAIM_NEW] * len(entries)
        for (_, positions), reply in zip(order, replies, strict=True):
            verdicts = reply if isinstance(reply, bytes) else str(reply).encode()
            for i, verdict in zip(positions, verdicts, strict=True):
                out[i] = verdict - 48  # b"0" -> 0
        return out

    async def release_claims(
        self, entries: Sequence[tuple[str, str]], *, now_ms: int | None = None
    ) -> None:
        """Drop the claims of records that did not decide their id (``(id, claim)`` pairs, as
        :meth:`claim` took them); a claim another record holds stays."""
        if entries:
            now = int(time.time() * 1000) if now_ms is None else now_ms
            await self._per_claim_shard(entries, now, self._release, [])

    async def _per_claim_shard(
        self,
        entries: Sequence[tuple[str, str]],
        now: int,
        script: Any,
        head: list[Any],
    ) -> tuple[list[tuple[int, list[int]]], list[Any]]:
        """``script`` over the claim shards of ``entries``: ARGV ``head`` then the entries per
        shard as JSON. All shards in one call on a single Redis (any keys may share a call
        there), one call per shard on a Redis Cluster, each routed to its slot's node. Returns
        the shards (with the positions of their entries) and one reply per shard."""
        shards = self.claim_shards
        by_shard: dict[int, list[int]] = {}
        for i, entry in enumerate(entries):
            ident = entry[0]
            by_shard.setdefault(zlib.crc32(ident.encode()) % shards, []).append(i)
        order = list(by_shard.items())

        def call(part: list[tuple[int, list[int]]]) -> Any:
            keys: list[str] = []
            for shard, _ in part:
                keys += self.claim_keys(shard, now)
            spec = [[entries[i] for i in positions] for _, positions in part]
            return script(keys=keys, args=[*head, orjson.dumps(spec)])

        replies: list[Any] = []
        if self._cluster:
            for reply in await asyncio.gather(*(call([one]) for one in order)):
                replies.append(reply[0] if isinstance(reply, list) else reply)
        else:
            reply = await call(order)
            replies = reply if isinstance(reply, list) else [reply] * len(order)
        return order, replies

    async def member_signals(
        self, wanted: Mapping[str, Sequence[str]]
    ) -> dict[str, dict[str, Signal]]:
        """Per org, the current state of members as their latest signal (``seq`` 0: a
        re-send), for members that have had one; re-sent after a failed publish so the
        compacted control topic ends on the current state. One pipelined round trip."""
        asked = [(org_id, list(dict.fromkeys(ids))) for org_id, ids in wanted.items() if ids]
        result: dict[str, dict[str, Signal]] = {org_id: {} for org_id in wanted}
        if not asked:
            return result
        replies: list[Any]
        if self._states_packed is not None:
            # A single Redis: one script call for every org (worker/lua/member_states.lua).
            wire = self.wire
            replies = await self._states_packed(
                len(asked), [wire(o)[2] for o, _ in asked], [orjson.dumps([i for _, i in asked])]
            )
        else:
            pipe = self.client.pipeline(transaction=False)
            for org_id, ids in asked:
                pipe.hmget(self.keys(org_id).members, ids)
            replies = await pipe.execute()
        mp = _MP
        for (org_id, ids), raw in zip(asked, replies, strict=True):
            out = result[org_id]
            for mid, rec in zip(ids, raw, strict=True):
                if rec is None:
                    continue
                a = msgpack_decode(_binary(rec))
                mseq = a[mp["ms"]]
                if not mseq or a[mp["lr"]] is None:
                    continue
                signal = "pause" if a[mp["pz"]] == 1 else "resume"
                out[mid] = Signal(0, org_id, mid, signal, a[mp["lr"]], mseq, a[mp["li"]])
        return result

    async def last_seq(self, org_id: str) -> int:
        """The org's last effect seq (0 when Redis does not know the org)."""
        return (await self.last_seqs([org_id]))[org_id]

    async def last_seqs(self, org_ids: Sequence[str]) -> dict[str, int]:
        """Each org's last effect seq (0 for an org Redis does not know)."""
        return {o: seq for o, (seq, _) in (await self._org_status(org_ids)).items()}

    async def _org_status(self, org_ids: Sequence[str]) -> dict[str, tuple[int, int]]:
        """Each org's last effect seq (0: unknown to Redis) and its outbox's entry count: one
        ``org_status.lua`` call per call unit and ``STATUS_CHUNK`` orgs, up to
        ``STATUS_CONCURRENCY`` of them at once."""
        by_unit: dict[int, list[str]] = {}
        for org_id in dict.fromkeys(org_ids):
            by_unit.setdefault(self.call_unit(org_id), []).append(org_id)
        chunks = [
            orgs[start : start + STATUS_CHUNK]
            for orgs in by_unit.values()
            for start in range(0, len(orgs), STATUS_CHUNK)
        ]
        gate = asyncio.Semaphore(STATUS_CONCURRENCY)
        packed = self._status_packed

        async def read(orgs: list[str]) -> list[Any]:
            async with gate:
                if packed is not None:
                    pieces = []
                    for org_id in orgs:
                        args = self.key_args(org_id)
                        pieces.append(bulk(args[_ORG], args[_OUTBOX]))
                    return cast("list[Any]", await packed(2 * len(orgs), pieces, []))
                keys: list[bytes] = []
                for org_id in orgs:
                    args = self.key_args(org_id)
                    keys += (args[_ORG], args[_OUTBOX])
                return cast("list[Any]", await self._status(keys=keys))

        out: dict[str, tuple[int, int]] = {}
        for orgs, flat in zip(chunks, await asyncio.gather(*map(read, chunks)), strict=True):
            for i, org_id in enumerate(orgs):
                raw, pending = flat[2 * i], flat[2 * i + 1]
                out[org_id] = (org_seq_of(raw) if raw is not None else 0, pending)
        return out

    async def ping(self) -> None:
        """Raise unless Redis answers."""
        await self.client.ping()

    async def close(self) -> None:
        """Close the Redis client."""
        await self.client.aclose()

    async def snapshots(self, org_ids: Sequence[str]) -> dict[str, Snapshot]:
        """The current state of each org Redis knows, with the effect seq it is at: one
        ``snapshot.lua`` call per call unit (atomic per call, so each org's state is one
        moment's). Orgs Redis does not know are left out."""
        by_unit: dict[int, list[str]] = {}
        for org_id in dict.fromkeys(org_ids):
            by_unit.setdefault(self.call_unit(org_id), []).append(org_id)

        async def read(orgs: list[str]) -> list[tuple[str, Any]]:
            keys: list[str] = []
            for org_id in orgs:
                keys.extend(self.keys(org_id))
            return list(zip(orgs, await self._snapshot(keys=keys), strict=True))

        out: dict[str, Snapshot] = {}
        for part in await asyncio.gather(*(read(orgs) for orgs in by_unit.values())):
            for org_id, (integers, state) in part:
                if integers:  # None: Redis does not know the org
                    out[org_id] = Snapshot(org_id, org_seq_of(integers), state)
        return out

    async def restore_org(self, snapshot: Snapshot) -> None:
        """Replace the org's keys with a snapshot's state (empty outbox, no watermarks)."""
        await self._restore(keys=list(self.keys(snapshot.org_id)), args=[snapshot.state])

    async def reset_org(self, org_id: str) -> None:
        """Forget everything Redis holds for one org (before a rebuild replays it)."""
        # One DEL is fine on a cluster: every key of the org shares its hash tag.
        await self.client.delete(*self.keys(org_id))

    # --- outbox ----------------------------------------------------------------------------

    async def outbox_pending(self, org_id: str, after_seq: int = 0) -> list[Effect]:
        """Effects still in the org's outbox with ``seq > after_seq``, in seq order."""
        return (await self.outbox_pending_many({org_id: after_seq}))[org_id]

    async def outbox_pending_many(self, after: Mapping[str, int]) -> dict[str, list[Effect]]:
        """``outbox_pending`` of several orgs (org -> after_seq), one pipelined round trip."""
        orgs = list(after)
        if not orgs:
            return {}
        pipe = self.client.pipeline(transaction=False)
        for org_id in orgs:
            pipe.xrange(self.keys(org_id).outbox, min=f"({after[org_id]}-0", max="+")
        replies = await pipe.execute()
        out: dict[str, list[Effect]] = {}
        for org_id, entries in zip(orgs, replies, strict=True):
            floor = after[org_id]
            effects: list[Effect] = []
            for _id, fields in entries or ():
                blob = (fields or {}).get("e") or (fields or {}).get(b"e")
                effects.extend(e for e in expanded(decode_blob(org_id, blob)) if e.seq > floor)
            out[org_id] = effects
        return out

    async def outbox_ack(
        self, acks: Mapping[str, int], unknown_marks: Mapping[str, Sequence[str]] | None = None
    ) -> None:
        """Drop each org's outbox entries whose effects all have ``seq <= acks[org]``, and the
        unknown-offset marks of events PostgreSQL now holds as parked: one ``ack.lua`` call
        per call unit (:meth:`call_unit`), pipelined (entry ids are ``<last seq>-0``, trimmed
        with ``XTRIM MINID``)."""
        marks = unknown_marks or {}
        if not acks and not marks:
            return
        if self._ack_packed is not None:
            # A single Redis: one call for every org, keys in their cached wire form.
            wire = self.wire
            everyone = list({*acks, *marks})
            wanted = [(acks.get(o, 0), list(marks.get(o, ()))) for o in everyone]
            await self._ack_packed(
                2 * len(everyone), [wire(o)[1] for o in everyone], [orjson.dumps(wanted)]
            )
            return
        by_shard: dict[int, list[str]] = {}
        for org_id in {*acks, *marks}:
            by_shard.setdefault(self.call_unit(org_id), []).append(org_id)
        calls: list[tuple[list[bytes], list[bytes]]] = []
        for orgs in by_shard.values():
            keys: list[bytes] = []
            spec: list[Any] = []
            for org_id in orgs:
                org_keys_ = self.key_args(org_id)
                keys += (org_keys_[_OUTBOX], org_keys_[_UNKNOWN])
                spec.append((acks.get(org_id, 0), list(marks.get(org_id, ()))))
            calls.append((keys, [orjson.dumps(spec)]))
        if self._cluster or len(calls) == 1:
            await asyncio.gather(*(self._ack(keys=ks, args=a) for ks, a in calls))
        else:
            pipe = self.client.pipeline(transaction=False)
            for k, a in calls:
                await self._ack(keys=k, args=a, client=pipe)  # type: ignore[arg-type]
            await pipe.execute()

    async def orgs_with_outbox(self) -> list[str]:
        """Orgs with unacked effects (SCAN over every node; startup recovery only).

        Every org that ever had effects keeps an outbox stream (empty once acked): the scan
        finds the streams, :meth:`_org_status` asks their lengths a thousand orgs per script
        call (one command per stream cost a restart about 35 us per org in the client)."""
        pattern = f"{self.prefix}:{{s*}}:{KEY_OUTBOX}:*"
        candidates: list[str] = []
        async for raw in self.client.scan_iter(match=pattern, count=SCAN_COUNT):
            org_id = org_of_key(self.prefix, _s(raw), KEY_OUTBOX)
            if org_id is not None:
                candidates.append(org_id)
        status = await self._org_status(candidates)
        return sorted(o for o, (_, pending) in status.items() if pending > 0)

    # --- views -----------------------------------------------------------------------------

    async def load_org(self, org_id: str) -> Org | None:
        """The org as the model's ``Org`` (members rolled to the current cycle), or None."""
        keys = self.keys(org_id)
        raw_org = await self.client.hgetall(keys.org)
        packed = {_s(k): v for k, v in raw_org.items()}
        if "s" not in packed:
            return None
        raw_members = await self.client.hgetall(keys.members)
        org = _org_record(org_id, packed.pop("s"), {k: _s(v) for k, v in packed.items()})
        for mid_raw, rec in raw_members.items():
            m = _member_record(_s(mid_raw), rec)
            roll_member(m, org.cycle_no, self.tiers_mc)
            org.members[m.member_id] = m
        return org

    async def counters(self, org_id: str) -> dict[str, int]:
        """The org's running totals kept for O(1) cycle ends (tests compare them to sums)."""
        raw = await self.client.hget(self.keys(org_id).org, "s")
        v = org_integers(raw) if raw is not None else dict.fromkeys(layout.ORG_FIELDS, 0)
        return {"alloc_left": v["at"], "blocks": v["bt"], "debts": v["dt"], "next_alloc": v["nt"]}

    async def state_view(self, org_id: str) -> dict[str, Any] | None:
        """Normalised state, comparable with ``Model.state_view``."""
        org = await self.load_org(org_id)
        return None if org is None else state_view(org)

    async def entitlements(
        self, wanted: Mapping[str, Sequence[str]]
    ) -> dict[str, dict[str, dict[str, Any] | None] | None]:
        """Per org of ``wanted``, each listed member's entitlement (``views.entitlement_view``;
        None for a member the org does not have), or None for an org Redis does not know.

        One read-only ``entitlement.lua`` call per call unit (:meth:`call_unit`: one call on a
        single Redis), so each org is read at one moment. Members not yet rolled over since
        the last cycle end are shown rolled over, as on the dashboard.
        """
        asked = [(org_id, list(dict.fromkeys(ids))) for org_id, ids in wanted.items()]
        by_unit: dict[int, list[tuple[str, list[str]]]] = {}
        for org_id, ids in asked:
            by_unit.setdefault(self.call_unit(org_id), []).append((org_id, ids))

        async def read(orgs: list[tuple[str, list[str]]]) -> list[tuple[str, list[str], Any]]:
            keys: list[bytes] = []
            args: list[bytes | str | int] = []
            for org_id, ids in orgs:
                org_keys_ = self.key_args(org_id)
                keys += (org_keys_[_ORG], org_keys_[_MEMBERS])
                args.append(len(ids))
                args.extend(ids)
            reply = await self._entitlement(keys=keys, args=args)
            return [(o, ids, r) for (o, ids), r in zip(orgs, reply, strict=True)]

        units = list(by_unit.values())
        if len(units) == 1:  # the usual case (always on a single Redis): no task to schedule
            parts = [await read(units[0])]
        else:
            parts = await asyncio.gather(*(read(orgs) for orgs in units))
        out: dict[str, dict[str, dict[str, Any] | None] | None] = {}
        for part in parts:
            for org_id, ids, (integers, records, limits) in part:
                if not integers:
                    out[org_id] = None
                    continue
                fields = {_s(limits[i]): _s(limits[i + 1]) for i in range(0, len(limits), 2)}
                org = _org_record(org_id, integers, fields)
                found: dict[str, dict[str, Any] | None] = {}
                for mid, rec in zip(ids, records, strict=True):
                    if rec is None:
                        found[mid] = None
                        continue
                    m = _member_record(mid, rec)
                    roll_member(m, org.cycle_no, self.tiers_mc)
                    found[mid] = entitlement_view(org, m)
                out[org_id] = found
        return out

    async def dashboard(self, org_id: str) -> dict[str, Any] | None:
        """The admin dashboard JSON of SPEC section 7, or None for an unknown org.

        Members not yet rolled over since the last cycle end are shown rolled over.
        """
        org = await self.load_org(org_id)
        return None if org is None else dashboard_view(org, self.tiers_mc)

    async def admin_view(self, org_id: str) -> dict[str, Any] | None:
        """The admin page's document (``views.admin_view``), or None for an unknown org."""
        org = await self.load_org(org_id)
        return None if org is None else admin_view(org, self.tiers_mc)
