"""One owner per org, proven where it matters: Redis goes back to an older snapshot while
several workers run, with producers that key by org and with producers that spray every org
over all partitions.

Admin commands and usage of one org arrive on partition ``p`` of two topics. With Kafka's
default assignment those two partitions belong to different workers for most group sizes, so
the worker holding the org's usage cannot know the seqs the other wrote for its admin
commands, and a Redis that lost them looks current to it. With the co-partitioned assignment
(``worker/pipeline/assignor.py``) one worker owns both, and the Redis-behind check sees every
seq PostgreSQL holds or will hold for the org: the lost state is rebuilt from the ledger before
anything else is decided.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from pydantic import SecretStr
from scenario_harness import PrivateRedis, Scenario, end_offsets, verify, wait_members

from bench.workload import Commands, WorkloadSpec
from worker.config import Settings

pytestmark = pytest.mark.timeout(300)

WORKERS = 4  # with 6 partitions the default assignor splits admin p and usage p for 4 workers


def _settings(isolated: Settings, redis: PrivateRedis) -> Settings:
    return isolated.model_copy(
        update={
            "redis_url": SecretStr(redis.url),
            "batch_max_records": 200,
            "shutdown_grace_seconds": 10.0,
            "unknown_grace_seconds": 60,
            "retry_backoff_max_seconds": 1.0,
        }
    )


def _scenario(
    isolated: Settings, redis: PrivateRedis, tmp_path: Path, prefix: str
) -> tuple[Settings, WorkloadSpec, Scenario, Commands, list[str]]:
    """Eight orgs x four members with small pools, and the commands of the later phases."""
    s = _settings(isolated, redis)
    spec = WorkloadSpec(
        orgs=8,
        members_per_org=4,
        events=2_400,
        prefix=f"{prefix}{uuid.uuid4().hex[:6]}",
        span_seconds=3 * 3600,
        pool_credits=3_000,
    )
    sc = Scenario(s, tmp_path, spec)
    orgs = [spec.org_id(i) for i in range(spec.orgs)]
    return s, spec, sc, Commands(prefix=f"{spec.prefix}x"), orgs


def _lost_phase(spec: WorkloadSpec, cmds: Commands, orgs: list[str]) -> list[object]:
    """Tier limits lowered and pools topped up, an hour in."""
    at = spec.start + timedelta(hours=1)
    return [cmds.tier_limit_set(o, "pro", 150_000, at) for o in orgs] + [
        cmds.pool_purchase(o, 200_000, at) for o in orgs
    ]


def _later_phase(spec: WorkloadSpec, cmds: Commands, orgs: list[str]) -> list[object]:
    """A member limit and more pool credits, two hours in."""
    at = spec.start + timedelta(hours=2)
    return [cmds.member_limit_set(o, spec.member_id(1), 60_000, at) for o in orgs] + [
        cmds.pool_purchase(o, 100_000, at) for o in orgs
    ]


async def test_redis_restored_from_an_older_snapshot_under_several_workers(
    isolated_settings: Settings, private_redis: PrivateRedis, tmp_path: Path
) -> None:
    """Four workers; Redis is put back to a snapshot taken before a phase of admin commands
    (tier limits lowered, pools topped up): the lost phase is in PostgreSQL only. Usage and more
    commands follow. Every org's final state, ledger, invoices-to-be and signals must
    equal the model's, fed in the order PostgreSQL recorded; every event charged once."""
    s, spec, sc, cmds, orgs = _scenario(isolated_settings, private_redis, tmp_path, "own")
    third = len(sc.usage) // 3

    async def admin(messages: list[object]) -> None:
        await sc.produce(s.topic_admin, messages)
        sc.setup.extend(messages)  # type: ignore[arg-type]
        await sc.drain()

    try:
        await sc.apply_setup()
        for _ in range(WORKERS):
            await sc.worker().start()
        await wait_members(s, WORKERS, timeout=60)
        await sc.produce_usage(sc.usage[:third])
        await sc.drain()
        snapshot = await private_redis.snapshot(tmp_path / "redis-snapshot")

        # The phase Redis will lose, admin commands only: it reaches PostgreSQL (seqs the
        # usage partitions' owner never saw), then Redis goes back to the snapshot.
        await admin(_lost_phase(spec, cmds, orgs))
        await private_redis.restore(snapshot)
        # Usage first: decided on the restored Redis, it would charge against the pools and
        # limits before the lost phase (and reuse its seqs) unless the org is rebuilt first.
        await sc.produce_usage(sc.usage[third : 2 * third])
        await sc.drain()
        await admin(_later_phase(spec, cmds, orgs))
        await sc.produce_usage(sc.usage[2 * third :])
        await sc.drain(timeout=120)
        await sc.stop_all()
        logs = "".join(w.log_path.read_text() for w in sc.workers)
        assert "rebuilding the org from the ledger" in logs  # the lost phase was noticed
        await verify(sc, production_order=False)
    finally:
        await sc.kill_all()


def _sprayed(messages: list[object]) -> list[object]:
    """The same records with random keys: the producer scatters each org over all partitions."""
    from bench.workload import Message

    return [Message(uuid.uuid4().hex.encode(), m.value) for m in messages]  # type: ignore[attr-defined]


async def test_sprayed_producers_and_redis_restored_under_several_workers(
    isolated_settings: Settings, private_redis: PrivateRedis, tmp_path: Path
) -> None:
    """Usage and admin commands keyed at random, so every org's records reach every worker;
    Redis is put back to a snapshot taken before a phase of admin commands and usage. Each
    org is decided at its home partition only (records read elsewhere are sent on there), so
    the books are exact: ledger, dashboards and signals equal the model's fed in the order
    PostgreSQL recorded, every event charged once, and copies were sent on."""
    s, spec, sc, cmds, orgs = _scenario(isolated_settings, private_redis, tmp_path, "spr")
    sc.usage = _sprayed(sc.usage)  # type: ignore[arg-type]
    third = len(sc.usage) // 3

    async def admin(messages: list[object]) -> None:
        sprayed = _sprayed(messages)
        await sc.produce(s.topic_admin, sprayed)
        sc.setup.extend(sprayed)  # type: ignore[arg-type]

    try:
        await sc.apply_setup()  # keyed: each org's creation and members on its partition
        for _ in range(WORKERS):
            await sc.worker().start()
        await wait_members(s, WORKERS, timeout=60)
        await sc.produce_usage(sc.usage[:third])
        await sc.drain()
        snapshot = await private_redis.snapshot(tmp_path / "redis-snapshot")

        # The phase Redis will lose: admin commands and usage, decided and in PostgreSQL.
        await admin(_lost_phase(spec, cmds, orgs))
        await sc.produce_usage(sc.usage[third : third + third // 2])
        await sc.drain()
        await private_redis.restore(snapshot)
        await sc.produce_usage(sc.usage[third + third // 2 : 2 * third])
        await admin(_later_phase(spec, cmds, orgs))
        await sc.produce_usage(sc.usage[2 * third :])
        await sc.drain(timeout=120)
        await sc.stop_all()
        logs = "".join(w.log_path.read_text() for w in sc.workers)
        assert "rebuilding the org from the ledger" in logs  # the lost phase was noticed
        ends = await end_offsets(s, [s.topic_usage])
        assert sum(ends.values()) > len(sc.usage), "no usage record was sent on to its home"
        await verify(sc, production_order=False)
    finally:
        await sc.kill_all()


async def test_differing_partition_counts_refuse_to_start(
    isolated_settings: Settings, tmp_path: Path
) -> None:
    """Input topics that are not co-partitioned: the worker exits at once with status 2 and
    says which topic has how many partitions."""
    from aiokafka.admin import AIOKafkaAdminClient, NewPartitions
    from scenario_harness import WorkerProcess

    s = isolated_settings
    admin = AIOKafkaAdminClient(bootstrap_servers=s.kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_partitions({s.topic_usage: NewPartitions(s.topic_partitions + 2)})
    finally:
        await admin.close()
    worker = WorkerProcess(s, tmp_path, "refused")
    await worker.start()
    code = await worker.wait(60)
    assert code == 2, worker.log_tail()
    text = worker.log_path.read_text()
    assert f"{s.topic_usage} has {s.topic_partitions + 2}" in text
    assert f"{s.topic_admin} has {s.topic_partitions}" in text
    await asyncio.sleep(0)
