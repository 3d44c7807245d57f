"""Ids with braces, slashes and colons on the 3-master Redis Cluster: every key of an org keeps
one slot (the org is encoded inside its hash tag), the rules come out the same, and the whole
pipeline runs on it."""

from __future__ import annotations

from typing import Any

import pytest
from pipeline_checker import Workload, check_pipeline
from redis.asyncio.cluster import RedisCluster
from test_engine_ops import SCENARIOS, T0, RenamingHarness
from unit.test_model_rules import cmd, use

from worker.config import Settings
from worker.constants import org_keys, org_of_key, shard_of
from worker.engine import RedisEngine
from worker.runner import run_worker

HOSTILE = ["}", "{", "}{", "{x}", "a{b}c", "x:y", "a/b", "%7D", "{}/:%"]


@pytest.mark.parametrize("prefix", HOSTILE)
def test_every_key_of_an_org_has_one_non_empty_tag(prefix: str, redis_cluster_url: str) -> None:
    from redis.cluster import key_slot

    org_id = prefix + "org"
    keys = org_keys("m", org_id, 16)
    assert len({key_slot(k.encode()) for k in keys}) == 1
    # The tag is the org's shard, whatever the id holds (the id follows it as data).
    tag = keys[0].split("{", 1)[1].split("}", 1)[0]
    assert tag == f"s{shard_of(org_id, 16)}"
    assert all(k.endswith(":" + org_id) for k in keys)
    assert {org_of_key("m", k, k.split("}:", 1)[1][0]) for k in keys} == {org_id}


async def test_rules_with_hostile_org_ids_on_the_cluster(
    redis_cluster: RedisCluster, cluster_settings: Settings
) -> None:
    engine = RedisEngine(redis_cluster, cluster_settings)
    for i, (name, scenario) in enumerate(sorted(SCENARIOS.items())):
        await scenario(RenamingHarness(engine, f"{HOSTILE[i % len(HOSTILE)]}{name}-"))
    claims = await engine.claim([("e|{a}", "0:1"), ("e|{a}", "0:2"), ("c|{a}", "0:3")])
    assert claims == [0, 2, 0]


async def test_snapshots_restore_hostile_orgs_on_the_cluster(
    redis_cluster: RedisCluster, cluster_settings: Settings
) -> None:
    """Snapshots are read and restored one call per shard on the cluster, whatever the org
    ids hold; a restored org is the org it was, and goes on as it would have."""
    engine = RedisEngine(redis_cluster, cluster_settings)
    orgs = [f"{p}snap" for p in HOSTILE]
    for n, org in enumerate(orgs):
        await engine.apply(
            org,
            [
                cmd("org_upsert", T0, billing_anchor_day=1),
                cmd("member_add", T0, member_id="a{1}", tier="pro"),
                cmd("member_add", T0, member_id="b", tier="max"),
                cmd("pool_purchase", T0 + 1, credits_mc=(n + 1) * 100_000),
                use("a{1}", 450_000 + n, T0 + 2),
                use("a{1}", 90_000, T0 + 3),
                use("b", 7_000, T0 + 4),
            ],
        )
    before = {org: await engine.dashboard(org) for org in orgs}
    snaps = await engine.snapshots([*orgs, "never-seen"])
    assert sorted(snaps) == sorted(orgs)  # an org Redis does not know has no snapshot
    for org in orgs:
        assert snaps[org].seq == await engine.last_seq(org)
        await engine.reset_org(org)
        assert await engine.dashboard(org) is None
        await engine.restore_org(snaps[org])
    assert {org: await engine.dashboard(org) for org in orgs} == before
    for org in orgs:
        res = await engine.apply(org, [use("b", 1_000, T0 + 5)])
        assert res.outcomes[0].status == "applied"
        assert res.effects[0].seq == snaps[org].seq + 1


@pytest.fixture
def cluster_pipeline_settings(
    kafka_topics: Settings, pg_schema: str, cluster_settings: Settings
) -> Settings:
    return kafka_topics.model_copy(
        update={
            "redis_url": cluster_settings.redis_url,
            "redis_cluster": True,
            "redis_key_prefix": cluster_settings.redis_key_prefix,
            "postgres_schema": pg_schema,
            "http_port": 0,
        }
    )


async def test_pipeline_with_hostile_ids_on_the_cluster(
    cluster_pipeline_settings: Settings, redis_cluster: RedisCluster
) -> None:
    s = cluster_pipeline_settings
    w = Workload(s)
    for org in HOSTILE:
        w.org(org, ["c", "b/c", "}", ":"])
    for org in HOSTILE:
        for member in ("c", "b/c", "}", ":"):
            w.usage(org, member, 600_000)  # past the seat: debt and a pause
    await w.produce()
    stats = await run_worker(s, max_events=len(w.messages), idle_exit_seconds=30)
    assert stats["charged"] == len(HOSTILE) * 4, stats
    engine: Any = RedisEngine(redis_cluster, s)
    report = await check_pipeline(s, w, engine=engine)
    assert len(report.charged) == len(HOSTILE) * 4
