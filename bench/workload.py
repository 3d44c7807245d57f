"""Deterministic workload: orgs, members, admin setup commands and usage events as raw JSON bytes.

Shared by the end-to-end benchmark, the demo and the crash/restart scenario tests. Every message
is a ``Message(key, value)`` pair of bytes exactly as a producer would put it on Kafka (SPEC
section 6): usage events keyed by ``org_id`` on ``credits.usage.v1``, admin commands keyed by
``org_id`` on ``credits.admin.v1``. The same ``WorkloadSpec`` always yields the same bytes, so a
benchmark, a replay and the reference model all see identical input.

Timestamps are fixed (``BASE_AT``, in the past) so the org clocks never depend on the wall clock;
the worker only rejects timestamps in the *future*.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

import orjson

BASE_AT = datetime(2026, 1, 5, tzinfo=UTC)
"""Default start of every workload: org creation time; cycles anchored on day 1."""


class Message(NamedTuple):
    """One Kafka record as a producer would send it."""

    key: bytes
    value: bytes


def rfc3339(at: datetime) -> str:
    """RFC 3339 UTC with millisecond precision and a ``Z`` suffix."""
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond // 1000:03d}Z"


def credits_wire(mc: int) -> str | int:
    """Millicredits as a wire amount: a JSON integer when whole, else a decimal string."""
    whole, frac = divmod(mc, 1000)
    if frac == 0:
        return whole
    return f"{whole}.{frac:03d}".rstrip("0")


# --- single messages ---------------------------------------------------------------------------


def usage_event(
    event_id: str,
    org_id: str,
    member_id: str,
    credits_mc: int,
    occurred_at: datetime,
    task_id: str = "task-1",
) -> Message:
    """A UsageEvent (SPEC section 6) keyed by ``org_id``."""
    body = {
        "event_id": event_id,
        "org_id": org_id,
        "member_id": member_id,
        "task_id": task_id,
        "credits": credits_wire(credits_mc),
        "occurred_at": rfc3339(occurred_at),
    }
    return Message(org_id.encode(), orjson.dumps(body))


class Commands:
    """Builds AdminCommand messages with deterministic, unique ``command_id`` values."""

    def __init__(self, prefix: str = "cmd") -> None:
        self._prefix = prefix
        self._n = 0

    def _make(self, type_: str, org_id: str, at: datetime, **fields: Any) -> Message:
        self._n += 1
        body: dict[str, Any] = {
            "type": type_,
            "command_id": f"{self._prefix}-{self._n:07d}",
            "org_id": org_id,
            "at": rfc3339(at),
        }
        body.update(fields)
        return Message(org_id.encode(), orjson.dumps(body))

    def org_upsert(self, org_id: str, at: datetime, anchor_day: int = 1) -> Message:
        return self._make("org_upsert", org_id, at, billing_anchor_day=anchor_day)

    def member_add(self, org_id: str, member_id: str, tier: str, at: datetime) -> Message:
        return self._make("member_add", org_id, at, member_id=member_id, tier=tier)

    def member_remove(self, org_id: str, member_id: str, at: datetime) -> Message:
        return self._make("member_remove", org_id, at, member_id=member_id)

    def member_set_tier(self, org_id: str, member_id: str, tier: str, at: datetime) -> Message:
        return self._make("member_set_tier", org_id, at, member_id=member_id, tier=tier)

    def tier_limit_set(self, org_id: str, tier: str, limit_mc: int | None, at: datetime) -> Message:
        limit = None if limit_mc is None else credits_wire(limit_mc)
        return self._make("tier_limit_set", org_id, at, tier=tier, limit=limit)

    def member_limit_set(
        self, org_id: str, member_id: str, limit_mc: int | str | None, at: datetime
    ) -> Message:
        limit = (
            limit_mc if limit_mc is None or isinstance(limit_mc, str) else credits_wire(limit_mc)
        )
        return self._make("member_limit_set", org_id, at, member_id=member_id, limit=limit)

    def pool_purchase(self, org_id: str, credits_mc: int, at: datetime) -> Message:
        return self._make("pool_purchase", org_id, at, credits=credits_wire(credits_mc))

    def auto_refill_set(
        self,
        org_id: str,
        at: datetime,
        *,
        enabled: bool,
        threshold_mc: int,
        amount_mc: int,
        monthly_limit_mc: int,
    ) -> Message:
        return self._make(
            "auto_refill_set",
            org_id,
            at,
            enabled=enabled,
            threshold=credits_wire(threshold_mc),
            amount=credits_wire(amount_mc),
            monthly_limit=credits_wire(monthly_limit_mc),
        )

    def refill_result(self, org_id: str, request_id: str, status: str, at: datetime) -> Message:
        return self._make("refill_result", org_id, at, request_id=request_id, status=status)

    def promo_grant(
        self,
        org_id: str,
        member_id: str,
        grant_id: str,
        credits_mc: int,
        expires_at: datetime,
        at: datetime,
    ) -> Message:
        return self._make(
            "promo_grant",
            org_id,
            at,
            member_id=member_id,
            grant_id=grant_id,
            credits=credits_wire(credits_mc),
            expires_at=rfc3339(expires_at),
        )

    def credit_request(
        self, org_id: str, member_id: str, credits_mc: int, at: datetime, note: str | None = None
    ) -> Message:
        extra: dict[str, Any] = {"note": note} if note is not None else {}
        return self._make(
            "credit_request",
            org_id,
            at,
            member_id=member_id,
            credits=credits_wire(credits_mc),
            **extra,
        )

    def tick(self, org_id: str, at: datetime) -> Message:
        return self._make("tick", org_id, at)


# --- the bulk workload -------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkloadSpec:
    """Shape of a bulk workload; the same spec always produces the same bytes."""

    orgs: int = 1_000
    members_per_org: int = 20
    events: int = 1_000_000
    seed: int = 20260105
    prefix: str = "w"
    """Prefix of every id (org, event, command), so two workloads never collide."""
    start: datetime = BASE_AT
    span_seconds: int = 6 * 3600
    """Usage events are spread over this much org time after ``start`` (inside one cycle)."""
    max_every: int = 5
    """Every Nth member has the ``max`` tier, the others ``pro``."""
    pool_credits: int = 100_000
    """Initial pool purchase per org (credits)."""
    event_credits_mc: tuple[int, int] = (1_000, 40_000)
    """Inclusive range of one event's amount in millicredits (rounded to 125 mc)."""
    duplicate_every: int = 0
    """If > 0, every Nth event re-sends an earlier event_id (a producer retry)."""

    def org_id(self, i: int) -> str:
        return f"{self.prefix}org{i:05d}"

    def member_id(self, j: int) -> str:
        return f"m{j:03d}"

    def tier(self, j: int) -> str:
        return "max" if self.max_every and j % self.max_every == 0 else "pro"

    def event_id(self, n: int) -> str:
        return f"{self.prefix}e{n:09d}"

    @property
    def org_ids(self) -> list[str]:
        return [self.org_id(i) for i in range(self.orgs)]


def setup_commands(spec: WorkloadSpec) -> list[Message]:
    """Admin commands creating every org and member and funding each pool, at ``spec.start``."""
    cmds = Commands(prefix=f"{spec.prefix}c")
    out: list[Message] = []
    for i in range(spec.orgs):
        org = spec.org_id(i)
        out.append(cmds.org_upsert(org, spec.start, anchor_day=1))
        for j in range(spec.members_per_org):
            out.append(cmds.member_add(org, spec.member_id(j), spec.tier(j), spec.start))
        if spec.pool_credits:
            out.append(cmds.pool_purchase(org, spec.pool_credits * 1000, spec.start))
    return out


def usage_events(spec: WorkloadSpec) -> Iterator[Message]:
    """``spec.events`` usage events, time-ordered with small jitter, spread over all members.

    Built with a string template rather than a JSON encoder: ids contain no characters that
    need escaping, and one million events are generated in about a second this way.
    """
    rng = random.Random(spec.seed)
    lo, hi = spec.event_credits_mc
    lo_steps, hi_steps = max(1, lo // 125), max(1, hi // 125)
    orgs = [spec.org_id(i) for i in range(spec.orgs)]
    org_keys = [o.encode() for o in orgs]
    members = [spec.member_id(j) for j in range(spec.members_per_org)]
    start_ms = int(spec.start.timestamp() * 1000)
    span_ms = spec.span_seconds * 1000
    n_events = max(1, spec.events)
    stamp_cache: dict[int, str] = {}
    sent: list[tuple[int, bytes]] = []
    for n in range(spec.events):
        if spec.duplicate_every and n and n % spec.duplicate_every == 0 and sent:
            # A producer retry: the exact same bytes again, later in the stream.
            oi, value = sent[rng.randrange(len(sent))]
            yield Message(org_keys[oi], value)
            continue
        oi = rng.randrange(spec.orgs)
        mj = rng.randrange(spec.members_per_org)
        mc = rng.randint(lo_steps, hi_steps) * 125
        jitter = rng.randrange(5_000)
        at_ms = start_ms + (n * span_ms) // n_events - jitter
        sec, ms = divmod(max(at_ms, start_ms), 1000)
        stamp = stamp_cache.get(sec)
        if stamp is None:
            if len(stamp_cache) > 4096:
                stamp_cache.clear()
            stamp = datetime.fromtimestamp(sec, UTC).strftime("%Y-%m-%dT%H:%M:%S")
            stamp_cache[sec] = stamp
        amount = credits_wire(mc)
        amount_json = str(amount) if isinstance(amount, int) else f'"{amount}"'
        value = (
            f'{{"event_id":"{spec.event_id(n)}","org_id":"{orgs[oi]}",'
            f'"member_id":"{members[mj]}","task_id":"t{mj:03d}-{n // 7 % 1000:03d}",'
            f'"credits":{amount_json},"occurred_at":"{stamp}.{ms:03d}Z"}}'
        ).encode()
        if spec.duplicate_every:
            sent.append((oi, value))
        yield Message(org_keys[oi], value)


# --- loading into Kafka ------------------------------------------------------------------------


ProgressFn = Callable[[int, int], None]


async def produce(
    bootstrap: str,
    topic: str,
    messages: Iterable[Message],
    *,
    total: int | None = None,
    progress: ProgressFn | None = None,
    batch_bytes: int = 512 * 1024,
    producer_kwargs: dict[str, Any] | None = None,
) -> int:
    """Write ``messages`` to ``topic`` in key-hashed partitions (the Java client's murmur2).

    Uses the producer's batch API: per-message ``send`` costs ~20 us of Python, which would make
    loading a million events slower than the benchmark itself. Returns the number of messages.
    """
    from aiokafka import AIOKafkaProducer
    from aiokafka.partitioner import murmur2

    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        max_batch_size=batch_bytes,
        max_request_size=4 * batch_bytes,
        linger_ms=5,
        **(producer_kwargs or {}),
    )
    await producer.start()
    try:
        partitions = sorted(await producer.partitions_for(topic))
        part_of: dict[bytes, int] = {}
        builders: dict[int, Any] = {}
        pending: list[asyncio.Future[Any]] = []
        sent = 0
        last_report = 0.0

        async def flush(partition: int) -> None:
            builder = builders.pop(partition)
            pending.append(await producer.send_batch(builder, topic, partition=partition))
            if len(pending) >= 64:
                await asyncio.gather(*pending)
                pending.clear()

        for key, value in messages:
            p = part_of.get(key)
            if p is None:
                p = partitions[(murmur2(key) & 0x7FFFFFFF) % len(partitions)]
                part_of[key] = p
            builder = builders.get(p)
            if builder is None:
                builder = builders[p] = producer.create_batch()
            if builder.append(key=key, value=value, timestamp=None) is None:
                await flush(p)
                builder = builders[p] = producer.create_batch()
                if builder.append(key=key, value=value, timestamp=None) is None:
                    raise ValueError(f"message of {len(value)} bytes does not fit a batch")
            sent += 1
            if progress is not None and sent % 10_000 == 0:
                now = time.monotonic()
                if now - last_report > 1.0:
                    last_report = now
                    progress(sent, total or 0)
        for p in list(builders):
            await flush(p)
        if pending:
            await asyncio.gather(*pending)
        if progress is not None:
            progress(sent, total or sent)
        return sent
    finally:
        await producer.stop()


async def produce_messages(
    bootstrap: str, topic: str, messages: Sequence[Message], **kwargs: Any
) -> None:
    """Send a handful of messages one by one, in order, awaiting each (tests and the demo)."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", **kwargs)
    await producer.start()
    try:
        for key, value in messages:
            await producer.send_and_wait(topic, value=value, key=key)
    finally:
        await producer.stop()


async def topic_partitions(consumer: Any, topic: str) -> list[Any]:
    """``TopicPartition`` list of ``topic``, fetched fresh from the broker.

    ``AIOKafkaConsumer.partitions_for_topic`` only knows topics it has subscribed to; a
    manually assigning reader has to ask for the cluster metadata itself.
    """
    from aiokafka import TopicPartition

    cluster = await consumer._client.fetch_all_metadata()
    parts = cluster.partitions_for_topic(topic)
    if not parts:
        raise LookupError(f"topic {topic!r} does not exist")
    return [TopicPartition(topic, p) for p in sorted(parts)]
