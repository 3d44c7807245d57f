"""One owner per org: the co-partitioned assignment and the start-up partition check."""

from __future__ import annotations

import pytest
from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from aiokafka.coordinator.protocol import ConsumerProtocolMemberMetadata

from worker.pipeline.assignor import (
    CoPartitionedAssignor,
    copartitioned_assignment,
    partition_problem,
)

TOPICS = ("credits.admin.v1", "credits.usage.v1")


class _Cluster:
    """The part of aiokafka's ClusterMetadata an assignor reads."""

    def __init__(self, partitions: dict[str, int]) -> None:
        self._p = partitions

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        n = self._p.get(topic)
        return None if n is None else set(range(n))


def _owners(assignment: dict[str, object]) -> dict[tuple[str, int], str]:
    owners: dict[tuple[str, int], str] = {}
    for member, a in assignment.items():
        for topic, parts in a.assignment:  # type: ignore[attr-defined]
            for p in parts:
                assert (topic, p) not in owners, "a partition assigned twice"
                owners[(topic, p)] = member
    return owners


def _members(n: int) -> dict[str, ConsumerProtocolMemberMetadata]:
    return {f"worker-{i}": ConsumerProtocolMemberMetadata(0, list(TOPICS), b"") for i in range(n)}


@pytest.mark.parametrize("workers", range(1, 14))
def test_partition_p_of_both_topics_has_one_owner_whatever_the_group_size(workers: int) -> None:
    cluster = _Cluster(dict.fromkeys(TOPICS, 12))
    owners = _owners(CoPartitionedAssignor.assign(cluster, _members(workers)))  # type: ignore[arg-type]
    assert len(owners) == 24  # every partition of both topics, once
    for p in range(12):
        assert owners[(TOPICS[0], p)] == owners[(TOPICS[1], p)]
    # Balanced: no worker holds more than one partition number above another.
    load: dict[str, int] = {}
    for (topic, _), member in owners.items():
        if topic == TOPICS[0]:
            load[member] = load.get(member, 0) + 1
    if workers <= 12:
        assert max(load.values()) - min(load.values()) <= 1 and len(load) == workers


def test_the_default_assignor_splits_orgs_this_one_fixes() -> None:
    # What the assignor is for: with 12 partitions and 5 workers aiokafka's default (round
    # robin over both topics' partitions) gives admin p and usage p different owners.
    cluster = _Cluster(dict.fromkeys(TOPICS, 12))
    owners = _owners(RoundRobinPartitionAssignor.assign(cluster, _members(5)))  # type: ignore[arg-type]
    assert any(owners[(TOPICS[0], p)] != owners[(TOPICS[1], p)] for p in range(12))


def test_a_member_without_a_topic_leaves_no_partition_unowned() -> None:
    plan = copartitioned_assignment({"a": range(4), "b": range(4)}, {"m1": ["a", "b"], "m2": ["a"]})
    owned_b = sorted(p for m in plan.values() for p in m.get("b", []))
    assert owned_b == [0, 1, 2, 3]
    assert "b" not in plan["m2"]


def test_differing_partition_counts_refuse_the_start() -> None:
    problem = partition_problem({"credits.usage.v1": 12, "credits.admin.v1": 6})
    assert problem is not None
    assert "credits.usage.v1 has 12" in problem and "credits.admin.v1 has 6" in problem
    assert partition_problem({"credits.usage.v1": 12, "credits.admin.v1": 12}) is None
    # A missing topic is not this check's business (the worker waits for it).
    assert partition_problem({"credits.usage.v1": 12, "credits.admin.v1": None}) is None
