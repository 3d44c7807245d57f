"""One owner per org: partition ``p`` of every input topic goes to the same worker.

Producers key usage and admin commands by ``org_id`` (SPEC section 6), so with co-partitioned
input topics (the same partition count, the same default partitioner) an org's usage and its
admin commands sit in partition ``p`` of both topics. Kafka's default assignors hand the
topics' partitions out independently (aiokafka's round robin, for instance, walks the
partitions of both topics in one list, so with 12 partitions and 5 workers usage ``p`` and
admin ``p`` land on different workers); :class:`CoPartitionedAssignor` hands out partition
*numbers* instead, each with every subscribed topic's partition of that number, as Kafka
Streams does for co-partitioned topics. One worker then decides everything of an org, in the
order of its two partitions, and its view of what PostgreSQL holds for the org is its own
(docs/delivery.md, "One owner per org").

:func:`partition_problem` is the start-up check: the worker refuses to start when the input
topics' partition counts differ, because then no assignment can keep an org on one worker.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterable, Mapping

from aiokafka.cluster import ClusterMetadata
from aiokafka.coordinator.assignors.abstract import AbstractPartitionAssignor
from aiokafka.coordinator.protocol import (
    ConsumerProtocolMemberAssignment,
    ConsumerProtocolMemberMetadata,
)

log = logging.getLogger(__name__)


def copartitioned_assignment(
    partitions: Mapping[str, Iterable[int]], subscriptions: Mapping[str, Iterable[str]]
) -> dict[str, dict[str, list[int]]]:
    """``member -> topic -> partitions``: partition numbers dealt round robin over the members
    (sorted by id, so every member computes the same), each number with every topic of it the
    member subscribes to. Pure: the assignor's logic without Kafka's types (unit-tested)."""
    members = sorted(subscriptions)
    subs = {m: set(subscriptions[m]) for m in members}
    numbers = sorted({p for ps in partitions.values() for p in ps})
    by_topic = {t: set(ps) for t, ps in partitions.items()}
    out: dict[str, dict[str, list[int]]] = {m: collections.defaultdict(list) for m in members}
    if not members:
        return {}
    for i, number in enumerate(numbers):
        owner = members[i % len(members)]
        for topic in sorted(by_topic):
            if number not in by_topic[topic]:
                continue
            if topic in subs[owner]:
                out[owner][topic].append(number)
                continue
            # A member that does not subscribe to this topic (a rolling change of topics):
            # the partition goes to the next member that does, so none is left unowned.
            takers = [m for m in members if topic in subs[m]]
            if takers:
                out[takers[i % len(takers)]][topic].append(number)
    return {m: dict(t) for m, t in out.items()}


class CoPartitionedAssignor(AbstractPartitionAssignor):  # type: ignore[misc]
    """aiokafka partition assignor: partition ``p`` of every subscribed topic to one member."""

    name = "metering-copartitioned"
    version = 0

    @classmethod
    def assign(
        cls,
        cluster: ClusterMetadata,
        members: Mapping[str, ConsumerProtocolMemberMetadata],
    ) -> dict[str, ConsumerProtocolMemberAssignment]:
        topics: set[str] = set()
        for metadata in members.values():
            topics.update(metadata.subscription)
        partitions: dict[str, set[int]] = {}
        for topic in topics:
            found = cluster.partitions_for_topic(topic)
            if found is None:
                log.warning("no partition metadata for topic %s", topic)
                continue
            partitions[topic] = set(found)
        counts = {t: len(p) for t, p in partitions.items()}
        if len(set(counts.values())) > 1:
            log.error(
                "input topics are not co-partitioned (%s): an org's usage and admin commands"
                " may be decided by different workers",
                ", ".join(f"{t}: {n}" for t, n in sorted(counts.items())),
            )
        plan = copartitioned_assignment(
            partitions, {m: meta.subscription for m, meta in members.items()}
        )
        return {
            member: ConsumerProtocolMemberAssignment(
                cls.version, sorted((t, sorted(ps)) for t, ps in plan.get(member, {}).items()), b""
            )
            for member in members
        }

    @classmethod
    def metadata(cls, topics: Iterable[str]) -> ConsumerProtocolMemberMetadata:
        return ConsumerProtocolMemberMetadata(cls.version, list(topics), b"")

    @classmethod
    def on_assignment(cls, assignment: ConsumerProtocolMemberAssignment) -> None:
        return None


def partition_problem(counts: Mapping[str, int | None]) -> str | None:
    """Why the input topics cannot run (``topic -> partition count``, None: missing), or None.

    Missing topics are reported elsewhere (the worker waits for them); differing counts stop
    the worker at start-up with this message.
    """
    known = {t: n for t, n in counts.items() if n is not None}
    if len(set(known.values())) <= 1:
        return None
    listed = ", ".join(f"{t} has {n}" for t, n in sorted(known.items()))
    return (
        f"input topics must have the same number of partitions (co-partitioned, so that one"
        f" worker owns all of an org's records): {listed}. Recreate or extend the topics to one"
        f" count (kafka-topics --alter --partitions N) and start again."
    )
