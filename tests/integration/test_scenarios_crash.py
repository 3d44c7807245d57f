"""Crash and restart scenarios with the worker as a separate process (issue 4, tests).

Each scenario creates orgs and members, produces usage events (some with producer-retry
duplicates), runs one or more ``python -m worker worker`` processes and hurts them: an abrupt
exit at each step of the write path (``METERING_CRASH_AT``, ``os._exit(137)`` like kill -9), an
external SIGKILL under load, SIGTERM in the middle of a batch, workers joining and leaving the
group, the whole topic produced a second time. Then a fresh worker finishes the job and the
pipeline checker compares PostgreSQL, Redis and the output topics with the Python model applied
to exactly the accepted input.

Only the scenario's own worker processes are touched here; scenarios that crash or stop a
service run on private instances (test_scenarios_services.py).
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
from scenario_harness import (
    CRASH_EXIT,
    KILLED,
    Scenario,
    committed_total,
    verify,
    wait_members,
    wait_progress,
)

from bench.workload import WorkloadSpec
from worker.config import Settings

pytestmark = pytest.mark.timeout(240)

CRASH_STEPS = ["after_script", "after_publish", "after_pg_commit", "before_offset_commit"]


def small_spec(events: int = 3_000, *, duplicate_every: int = 97) -> WorkloadSpec:
    """4 orgs x 5 members, small pools: allocations run out, blocks are drawn, pools run dry."""
    return WorkloadSpec(
        orgs=4,
        members_per_org=5,
        events=events,
        prefix=f"s{uuid.uuid4().hex[:6]}",
        span_seconds=3 * 3600,
        pool_credits=4_000,
        duplicate_every=duplicate_every,
    )


def scenario_settings(isolated: Settings, **extra: object) -> Settings:
    # Small batches so a run has many of them: a crash lands in the middle of the stream.
    update: dict[str, object] = {
        "batch_max_records": 200,
        "batch_timeout_ms": 50,
        "shutdown_grace_seconds": 10.0,
        "unknown_grace_seconds": 30,
    }
    update.update(extra)
    return isolated.model_copy(update=update)


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    return tmp_path


@pytest.mark.parametrize("step", CRASH_STEPS)
async def test_kill9_at_each_step_then_restart(
    step: str, isolated_settings: Settings, log_dir: Path
) -> None:
    """A worker dying between two writes loses and double-charges nothing after a restart."""
    sc = Scenario(scenario_settings(isolated_settings), log_dir, small_spec())
    try:
        await sc.apply_setup()
        await sc.produce_usage()
        crashing = await sc.worker(crash_at=f"{step}:3").start()
        rc = await crashing.wait(90)
        assert rc == CRASH_EXIT, f"the {step} hook did not fire (exit {rc}):\n{crashing.log_tail()}"
        await sc.worker().start()
        await sc.drain()
        await sc.stop_all()
        await verify(sc)
    finally:
        await sc.kill_all()


async def test_external_sigkill_twice_under_load(
    isolated_settings: Settings, log_dir: Path
) -> None:
    """SIGKILL from outside while events keep arriving, twice; a third worker finishes."""
    sc = Scenario(scenario_settings(isolated_settings), log_dir, small_spec(6_000))
    try:
        await sc.apply_setup()
        producing = asyncio.create_task(sc.stream_usage(chunks=12, pause=0.4))
        total = len(sc.setup)
        for round_ in (1, 2):
            w = await sc.worker().start()
            total = await wait_progress(sc.settings, sc.input_topics, total + 300, [w])
            w.kill()
            assert await w.wait(10) == KILLED, f"round {round_}: worker was not killed"
        await producing
        await sc.worker().start()
        await sc.drain()
        await sc.stop_all()
        await verify(sc)
    finally:
        await sc.kill_all()


async def test_sigterm_mid_batch_exits_cleanly_and_resumes(
    isolated_settings: Settings, log_dir: Path
) -> None:
    """SIGTERM while batches are in flight: status 0 within the grace period, nothing lost."""
    sc = Scenario(scenario_settings(isolated_settings), log_dir, small_spec(12_000))
    try:
        await sc.apply_setup()
        await sc.produce_usage()
        w = await sc.worker().start()
        done = await wait_progress(sc.settings, sc.input_topics, len(sc.setup) + 200, [w])
        assert done < len(sc.setup) + len(sc.usage), "the worker finished before the SIGTERM"
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        rc = await w.terminate()
        assert rc == 0, f"SIGTERM exit status {rc}:\n{w.log_tail()}"
        assert loop.time() - t0 < sc.settings.shutdown_grace_seconds + 5
        # It stopped part-way (what it had fetched was finished and committed, nothing more).
        stopped_at = await committed_total(sc.settings, sc.input_topics)
        assert done <= stopped_at < len(sc.setup) + len(sc.usage)
        await sc.worker().start()
        await sc.drain()
        await sc.stop_all()
        await verify(sc)
    finally:
        await sc.kill_all()


async def test_workers_join_and_leave_under_load(
    isolated_settings: Settings, log_dir: Path
) -> None:
    """A second and a third worker join the group under load, then one leaves (SIGTERM)."""
    sc = Scenario(scenario_settings(isolated_settings), log_dir, small_spec(8_000))
    try:
        await sc.apply_setup()
        producing = asyncio.create_task(sc.stream_usage(chunks=16, pause=0.4))
        first = await sc.worker().start()
        await wait_progress(sc.settings, sc.input_topics, len(sc.setup) + 300, [first])
        second = await sc.worker().start()
        third = await sc.worker().start()
        # All three share the partitions: the broker sees one stable group of three.
        await wait_members(sc.settings, 3)
        await wait_progress(
            sc.settings, sc.input_topics, len(sc.setup) + 2_000, [first, second, third]
        )
        rc = await second.terminate()
        assert rc == 0, f"leaving worker exited with {rc}:\n{second.log_tail()}"
        await wait_members(sc.settings, 2)
        await producing
        await sc.drain()
        await sc.stop_all()
        await verify(sc)
    finally:
        await sc.kill_all()


async def test_duplicates_and_full_replay_of_the_topic(
    isolated_settings: Settings, log_dir: Path
) -> None:
    """Every usage message produced a second time (a producer replaying the topic from offset
    0): nothing more is charged; duplicates within and across batches were dropped too."""
    sc = Scenario(
        scenario_settings(isolated_settings), log_dir, small_spec(3_000, duplicate_every=7)
    )
    try:
        await sc.apply_setup()
        await sc.produce_usage()
        await sc.worker().start()
        await sc.drain()
        before = await verify(sc)
        await sc.produce_usage()
        await sc.drain()
        await sc.stop_all()
        after = await verify(sc)
        assert after == before, "replaying the topic changed the books"
    finally:
        await sc.kill_all()


async def test_replay_from_offset_zero_under_a_new_group(
    isolated_settings: Settings, log_dir: Path
) -> None:
    """A worker of a brand-new consumer group (no offsets anywhere) reads both topics from
    offset 0 against the same Redis and PostgreSQL: every record is recognised as already
    decided and the books do not move."""
    sc = Scenario(scenario_settings(isolated_settings), log_dir, small_spec(3_000))
    try:
        await sc.apply_setup()
        await sc.produce_usage()
        await sc.worker().start()
        await sc.drain()
        await sc.stop_all()
        before = await verify(sc)
        replay = sc.settings.model_copy(
            update={"consumer_group": sc.settings.consumer_group + ".replay"}
        )
        sc.settings = replay
        await sc.worker(settings=replay).start()
        await sc.drain()
        await sc.stop_all()
        assert await verify(sc) == before, "a replay from offset 0 changed the books"
    finally:
        await sc.kill_all()


async def test_unkeyed_producer_three_workers_and_a_crash(
    isolated_settings: Settings, log_dir: Path
) -> None:
    """A producer that keys events at random scatters every org over all partitions, so
    three workers apply the same orgs concurrently; one is SIGKILLed mid-way. Correctness must
    not depend on keying: each event is charged once, and the books equal the model replayed
    in the order the workers decided."""
    from bench.workload import Message

    sc = Scenario(scenario_settings(isolated_settings), log_dir, small_spec(6_000))
    sc.usage = [Message(uuid.uuid4().hex.encode(), m.value) for m in sc.usage]
    try:
        await sc.apply_setup()
        producing = asyncio.create_task(sc.stream_usage(chunks=12, pause=0.3))
        workers = [await sc.worker().start() for _ in range(3)]
        await wait_members(sc.settings, 3)
        await wait_progress(sc.settings, sc.input_topics, len(sc.setup) + 1_000, workers)
        workers[0].kill()
        assert await workers[0].wait(10) == KILLED
        await producing
        await sc.drain()
        await sc.stop_all()
        await verify(sc, production_order=False)
    finally:
        await sc.kill_all()
