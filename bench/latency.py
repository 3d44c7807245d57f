"""Latency benchmark (``make bench-latency``): how fast a member who can no longer pay is paused,
under live traffic at a steady rate.

Workload (flags change every number): ``--orgs`` orgs x ``--members`` ``pro`` members, empty
pools; each member gets 6 usage events of 100 credits, 100 ms apart, starting at a random moment
of the run, produced at the overall ``--rate`` (events/s). The org's cycle starts today, so a
member's allocation is just under 500 credits and its 5th event is the one that exhausts it: the
worker must publish a ``pause`` (``pool_exhausted``) for every member.

Measured in one run, against the worker as a subprocess (already running, setup applied):

- **pause latency**: the ``pause`` record's broker timestamp on the control topic (created with
  ``message.timestamp.type=LogAppendTime``, so the broker's own clock) minus the 5th event's
  ``occurred_at``, which is the moment the event is due to be produced (encoded beforehand: a
  late send counts against the worker);
- **resume latency**: every ``FUNDED_EVERY``-th org is funded (a ``pool_purchase`` on the
  admin topic) ``FUND_AFTER_S`` after its last member's 5th event is due; the first
  ``resume`` record of each of its paused members after the pause, broker timestamp, minus
  the moment the command was due (its ``at``). The members of a funded org start within
  ``FUNDED_WINDOW_S`` of each other, at a random moment of the run like everyone else: were
  they spread over the run, nearly every org's last pause (and so its funding) would fall in
  the run's last seconds, a burst of resumes of the benchmark's making. So the fundings, and
  the resumes, come at a steady pace while the usage of the other orgs flows. When the worker
  runs more than ``FUND_AFTER_S`` behind, a funding can be applied before a member's 5th
  event (a batch's admin records go first): that member never needs a pause. Such members
  are counted apart (their ledger shows a pool draw); a member with neither a pause nor a
  draw is a pause missing;
- **commit latency**: ``usage_events.decided_at`` (PostgreSQL's clock at the commit of the
  event's batch) minus ``occurred_at``, for every event;
- **broker floor**: a probe message every 10 ms through a topic of its own, produced and consumed
  by this process the way the worker does (idempotent producer, ``getmany`` consumer): what any
  consumer of the usage topic pays before the worker does anything;
- **load producer lateness**: at each send, how long the first event sent had been due. It is
  part of the pause latency (a late send counts against the worker); it shows when the load
  generator, not the worker, is the one behind. Every event is encoded before the clock starts,
  and the clock starts only once that is done.

Prints p50/p90/p99/max of each and writes the latency section of ``BENCHMARKS.md``. All clocks are
this machine's.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import math
import os
import random
import statistics
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import GroupCoordinatorNotAvailableError
from aiokafka.partitioner import DefaultPartitioner

from bench.e2e import (
    _free_port,
    _proc_cpu_s,
    _service_cpu_s,
    _worker_env,
    all_topics,
    bench_settings,
    delete_redis_keys,
    drop_schema,
    end_offsets,
    log,
)
from bench.workload import Commands
from worker.config import Settings

ROOT = Path(__file__).resolve().parent.parent
BENCH_MD = ROOT / "BENCHMARKS.md"
SECTION_START = "<!-- bench.latency:start -->"
SECTION_END = "<!-- bench.latency:end -->"

EVENTS_PER_MEMBER = 6
EVENT_CREDITS = 100
EVENT_GAP_S = 0.1
FUND_AFTER_S = 0.5
"""How long after an org's last exhausting event is due its ``pool_purchase`` is."""
FUNDED_EVERY = 5
FUNDED_WINDOW_S = 0.3
FUND_CREDITS_PER_MEMBER = 1000
LINGER_S = 0.005
"""How often the load producer sends what is due: librdkafka's default ``linger.ms``, the agent
runtime's producer (a send per event costs a producer and the broker several times more CPU)."""


def percentiles(values: list[float]) -> dict[str, float]:
    """p50, p90, p99 and max of ``values`` (seconds), as milliseconds."""
    if not values:
        return {"n": 0, "p50": float("nan"), "p90": float("nan"), "p99": float("nan"),
                "max": float("nan")}  # fmt: skip
    xs = sorted(values)

    def at(q: float) -> float:
        return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000

    return {"n": len(xs), "p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "max": xs[-1] * 1000}


@dataclass
class Run:
    rate: float
    orgs: int
    members: int
    pauses: list[float] = field(default_factory=list)
    resumes: list[float] = field(default_factory=list)
    resume_missing: int = 0
    commits: list[float] = field(default_factory=list)
    floor: list[float] = field(default_factory=list)
    missing: int = 0
    funded_first: int = 0  # no pause needed: the org's funding was applied before the 5th event
    produced: int = 0
    produce_seconds: float = 0.0
    worker_cpu_s: float = 0.0  # CPU seconds while the events were produced
    redis_cpu_s: float = 0.0
    postgres_cpu_s: float = 0.0
    send_late: list[float] = field(default_factory=list)  # per send: now - first event's due


async def create_topics(s: Settings, probe: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=s.kafka_bootstrap)
    await admin.start()
    try:
        new = []
        for name in all_topics(s):
            config = {"message.timestamp.type": os.environ.get("BENCH_TS", "LogAppendTime")}
            if name == s.topic_control:
                config["cleanup.policy"] = "compact"
            new.append(NewTopic(name, s.topic_partitions, 1, topic_configs=config))
        new.append(NewTopic(probe, 1, 1))
        await admin.create_topics(new)
    finally:
        await admin.close()


async def delete_topics(s: Settings, probe: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=s.kafka_bootstrap)
    await admin.start()
    try:
        await admin.delete_topics([*all_topics(s), probe])
    finally:
        await admin.close()


def setup(orgs: int, members: int) -> list[tuple[bytes, bytes]]:
    """Orgs whose cycle starts today (anchor = today's day), ``pro`` members, no pool."""
    now = datetime.now(UTC)
    at = now.replace(hour=0, minute=0, second=0, microsecond=0)
    cmds = Commands(f"lat{uuid.uuid4().hex[:6]}")
    out = []
    for o in range(orgs):
        org = f"org{o:05d}"
        out.append(cmds.org_upsert(org, at, anchor_day=now.day))
        for m in range(members):
            out.append(cmds.member_add(org, f"m{m:02d}", "pro", at))
    return [(msg.key, msg.value) for msg in out]


async def wait_committed(s: Settings, topic: str, within: float) -> None:
    targets = await end_offsets(s.kafka_bootstrap, topic)
    admin = AIOKafkaAdminClient(bootstrap_servers=s.kafka_bootstrap)
    await admin.start()
    try:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            try:
                got = await admin.list_consumer_group_offsets(s.consumer_group)
            except GroupCoordinatorNotAvailableError:
                # A fresh broker creates its offsets topic with the first group: not yet.
                await asyncio.sleep(0.2)
                continue
            if all(got.get(tp) and got[tp].offset >= end for tp, end in targets.items() if end):
                return
            await asyncio.sleep(0.2)
    finally:
        await admin.close()
    raise TimeoutError(f"{topic} not committed after {within} s")


async def probe_floor(bootstrap: str, topic: str, stop: asyncio.Event, out: list[float]) -> None:
    """A message every 10 ms, produced and consumed like the worker does: the broker's floor."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, enable_idempotence=True, acks="all", linger_ms=0
    )
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await producer.start()
    await consumer.start()
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    await consumer.seek_to_end(tp)

    async def receive() -> None:
        while not stop.is_set():
            got = await consumer.getmany(timeout_ms=100)
            now = time.time()
            for recs in got.values():
                for r in recs:
                    out.append(now - float(r.value))

    receiver = asyncio.create_task(receive())
    try:
        while not stop.is_set():
            await producer.send(topic, str(time.time()).encode())
            await asyncio.sleep(0.01)
    finally:
        await asyncio.sleep(0.3)
        receiver.cancel()
        await producer.stop()
        await consumer.stop()


async def produce_usage(
    s: Settings, run: Run, seed: int
) -> tuple[dict[tuple[str, str], float], dict[str, float]]:
    """Produce every member's 6 events at the run's rate, and a funding command for every
    ``FUNDED_EVERY``-th org ``FUND_AFTER_S`` after its last 5th event; returns each member's
    5th event's ``occurred_at`` and each funded org's funding ``at`` (epoch seconds)."""
    rng = random.Random(seed)
    members = [(f"org{o:05d}", f"m{m:02d}") for o in range(run.orgs) for m in range(run.members)]
    total = len(members) * EVENTS_PER_MEMBER
    span = max(1.0, total / run.rate - EVENTS_PER_MEMBER * EVENT_GAP_S)
    schedule: list[tuple[float, str, str, int]] = []
    # A funded org's members start together (see the module docstring).
    funded_start = {f"org{o:05d}": rng.random() * span for o in range(0, run.orgs, FUNDED_EVERY)}
    last_fifth: dict[str, float] = {}
    for org, member in members:
        org_start = funded_start.get(org)
        if org_start is None:
            start = rng.random() * span
        else:
            start = org_start + rng.random() * FUNDED_WINDOW_S
            last_fifth[org] = max(last_fifth.get(org, 0.0), start + 4 * EVENT_GAP_S)
        for k in range(EVENTS_PER_MEMBER):
            schedule.append((start + k * EVENT_GAP_S, org, member, k))
    for org, due in last_fifth.items():
        schedule.append((due + FUND_AFTER_S, org, "", -1))  # k -1: the org's funding
    schedule.sort()
    funding = Commands(f"fund{seed:x}")
    # Everything is encoded before the clock starts, with ``occurred_at`` = the moment the
    # event is due (a late send counts against the worker), and sent in batches built by hand,
    # one per partition and tick: this process shares the cores with the worker, and a send()
    # per message would cost it several times more CPU.
    producer = AIOKafkaProducer(
        bootstrap_servers=s.kafka_bootstrap, enable_idempotence=True, acks="all", linger_ms=1
    )
    await producer.start()
    partitioner = DefaultPartitioner()
    partitions = sorted(await producer.partitions_for(s.topic_usage))
    fifth: dict[tuple[str, str], float] = {}
    funded: dict[str, float] = {}

    def encode(t0_wall: float, part: list[tuple[float, str, str, int]]) -> list[Any]:
        out = []
        for due, org, member, k in part:
            wall = int((t0_wall + due) * 1000) / 1000
            occurred = datetime.fromtimestamp(wall, UTC)
            if k < 0:
                credits_mc = FUND_CREDITS_PER_MEMBER * run.members * 1000
                msg = funding.pool_purchase(org, credits_mc, occurred)
                funded[org] = wall
                key = org.encode()
                out.append((wall, s.topic_admin, partitioner(key, partitions, partitions), key,
                            msg.value))  # fmt: skip
                continue
            value = orjson.dumps(
                {
                    "event_id": f"{org}-{member}-{k}-{seed}",
                    "org_id": org,
                    "member_id": member,
                    "task_id": "t",
                    "credits": EVENT_CREDITS,
                    "occurred_at": occurred.strftime("%Y-%m-%dT%H:%M:%S.")
                    + f"{occurred.microsecond // 1000:03d}Z",
                }
            )
            if k == 4:
                fifth[(org, member)] = wall
            key = org.encode()
            out.append((wall, s.topic_usage, partitioner(key, partitions, partitions), key, value))
        return out

    # The clock starts once everything is encoded: started earlier, the events due while the
    # encoding still ran would leave in one burst at the first send (13,000 events at once
    # at 15,000/s), a start-up spike of the producer's making. The encoding time is measured
    # on a sample first.
    took = time.perf_counter()
    encode(time.time(), schedule[:2000])
    took = (time.perf_counter() - took) / max(1, min(2000, len(schedule)))
    t0_wall = time.time() + 1.0 + 1.5 * took * len(schedule)
    fifth.clear()
    funded.clear()
    encoded = encode(t0_wall, schedule)
    # What was just built stays until the run ends: out of the collector's way, so that a full
    # collection over a million objects never stalls the sends (the worker does the same).
    gc.collect()
    gc.freeze()
    if time.time() > t0_wall:
        log(f"  the producer starts {time.time() - t0_wall:.2f} s late (encoding took longer)")
    futures: list[Any] = []
    await asyncio.sleep(max(0.0, t0_wall - time.time()))
    t0 = time.monotonic()
    try:
        i = 0
        sent_at = 0.0
        while i < len(encoded):
            now = time.time()
            # Send what is due at most every LINGER_S (an event waits up to that long; the
            # wait counts against the worker, its occurred_at being when it was due).
            wake = max(encoded[i][0], sent_at + LINGER_S)
            if wake > now:
                await asyncio.sleep(wake - now)
                continue
            sent_at = now
            run.send_late.append(now - encoded[i][0])
            batches: dict[tuple[str, int], Any] = {}
            while i < len(encoded) and encoded[i][0] <= now:
                _, topic, part, key, value = encoded[i]
                batch = batches.get((topic, part))
                if batch is None:
                    batch = batches[topic, part] = producer.create_batch()
                if batch.append(key=key, value=value, timestamp=None) is None:
                    futures.append(await producer.send_batch(batch, topic, partition=part))
                    batch = batches[topic, part] = producer.create_batch()
                    batch.append(key=key, value=value, timestamp=None)
                i += 1
            for (topic, part), batch in batches.items():
                futures.append(await producer.send_batch(batch, topic, partition=part))
            if len(futures) > 500:
                # Acknowledged sends are dropped (a failed one raises); the loop never waits
                # for acks, so a slow one does not hold back the events due after it.
                for f in futures:
                    if f.done():
                        f.result()
                futures = [f for f in futures if not f.done()]
        await asyncio.gather(*futures)
    finally:
        gc.unfreeze()
        await producer.stop()
    run.produced = len(schedule) - len(funded)
    run.produce_seconds = time.monotonic() - t0
    return fifth, funded


async def read_signals(
    s: Settings, want: int, within: float
) -> tuple[dict[tuple[str, str], float], dict[tuple[str, str], float]]:
    """Per member, the first ``pause`` record on the control topic and the first ``resume``
    after it: their broker timestamps (``want``: members to wait for, paused and resumed)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap, enable_auto_commit=False)
    await consumer.start()
    paused: dict[tuple[str, str], float] = {}
    resumed: dict[tuple[str, str], float] = {}
    try:
        parts = [TopicPartition(s.topic_control, p) for p in range(s.topic_partitions)]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        deadline = time.monotonic() + within
        while len(resumed) < want and time.monotonic() < deadline:
            got = await consumer.getmany(timeout_ms=500)
            for recs in got.values():
                for r in recs:
                    v = orjson.loads(r.value)
                    key = (v["org_id"], v["member_id"])
                    if v["signal"] == "pause" and key not in paused:
                        paused[key] = r.timestamp / 1000
                    elif v["signal"] == "resume" and key in paused and key not in resumed:
                        resumed[key] = r.timestamp / 1000
    finally:
        await consumer.stop()
    return paused, resumed


async def _fetch(s: Settings, query: str, *args: Any) -> list[Any]:
    """Rows of one query in the run's schema."""
    import asyncpg

    conn = await asyncpg.connect(
        s.postgres_dsn.get_secret_value(), server_settings={"search_path": s.postgres_schema}
    )
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


async def drew_from_pool(s: Settings, orgs: list[str]) -> set[tuple[str, str]]:
    """The (org, member) pairs of ``orgs`` whose ledger has a pool draw."""
    if not orgs:
        return set()
    rows = await _fetch(
        s,
        "SELECT DISTINCT org_id, member_id FROM ledger_entries"
        " WHERE movement = 'draw' AND org_id = ANY($1::text[])",
        orgs,
    )
    return {(r["org_id"], r["member_id"]) for r in rows}


async def commit_latencies(s: Settings) -> list[float]:
    rows = await _fetch(
        s,
        "SELECT extract(epoch FROM decided_at) - occurred_at_ms / 1000.0 AS lag"
        " FROM usage_events WHERE status = 'charged'",
    )
    return [float(r["lag"]) for r in rows]


async def one_run(base: Settings, rate: float, orgs: int, members: int) -> Run:
    """Fresh topics, schema and keys; the worker as a subprocess; one steady-rate run."""
    run_id = uuid.uuid4().hex[:6]
    s = bench_settings(base, f"lat{run_id}")
    probe = f"bench-lat{run_id}.probe"
    run = Run(rate, orgs, members)
    await create_topics(s, probe)
    proc = None
    try:
        producer = AIOKafkaProducer(bootstrap_servers=s.kafka_bootstrap, acks="all")
        await producer.start()
        try:
            for key, value in setup(orgs, members):
                await producer.send(s.topic_admin, value, key=key)
            await producer.flush()
        finally:
            await producer.stop()
        env = _worker_env(s, _free_port())
        # BENCH_WORKER_LOG=DEBUG BENCH_WORKER_LOG_FILE=worker.log: the worker's per-batch lines.
        log_file = os.environ.get("BENCH_WORKER_LOG_FILE")
        out: Any = (
            open(log_file, "ab")  # noqa: SIM115, ASYNC230 (once, before the run)
            if log_file
            else asyncio.subprocess.DEVNULL
        )
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "worker", "worker", env=env, cwd=ROOT,
            stdout=out, stderr=asyncio.subprocess.STDOUT if log_file else out,
        )  # fmt: skip
        log(f"rate {rate:,.0f}/s, {orgs:,} orgs x {members}: worker applies the setup ...")
        await wait_committed(s, s.topic_admin, 300)
        await asyncio.sleep(1.0)
        stop = asyncio.Event()
        floor = asyncio.create_task(probe_floor(s.kafka_bootstrap, probe, stop, run.floor))
        total = orgs * members * EVENTS_PER_MEMBER
        log(f"  producing {total:,} events at {rate:,.0f}/s ({total / rate:.0f} s) ...")
        cpu0, services0 = _proc_cpu_s(proc.pid), _service_cpu_s()
        fifth, funded = await produce_usage(s, run, seed=int(run_id, 16))
        services1 = _service_cpu_s()
        run.worker_cpu_s = _proc_cpu_s(proc.pid) - cpu0
        run.redis_cpu_s = services1["Redis"] - services0["Redis"]
        run.postgres_cpu_s = services1["PostgreSQL"] - services0["PostgreSQL"]
        stop.set()
        await floor
        pauses, resumes = await read_signals(s, len(fifth), within=30)
        await wait_committed(s, s.topic_usage, 120)  # the ledger holds every decision
        unpaused = [m for m in fifth if m not in pauses]
        drew = await drew_from_pool(s, sorted({org for org, _ in unpaused if org in funded}))
        for member, t in fifth.items():
            got = pauses.get(member)
            if got is None:
                # A member of a funded org whose funding was applied before its 5th event (the
                # worker takes a batch's admin records first) could always draw from the pool:
                # it never needed a pause. It shows as a draw in the ledger; anything else is
                # a pause missing.
                if member in drew:
                    run.funded_first += 1
                else:
                    run.missing += 1
            else:
                run.pauses.append(got - t)
                if member[0] not in funded:
                    continue
                back = resumes.get(member)
                if back is None:
                    run.resume_missing += 1
                else:
                    run.resumes.append(back - funded[member[0]])
        run.commits = await commit_latencies(s)
        log(
            f"  pause p99 {percentiles(run.pauses)['p99']:.1f} ms over {len(run.pauses):,},"
            f" {run.missing} missing; resume p99 {percentiles(run.resumes)['p99']:.1f} ms,"
            f" {run.resume_missing} missing; {run.funded_first} funded before their 5th event;"
            f" floor p99 {percentiles(run.floor)['p99']:.1f} ms;"
            f" producer late p99 {percentiles(run.send_late)['p99']:.1f} ms;"
            f" worker {run.worker_cpu_s / max(run.produced, 1) * 1e6:.0f} us CPU per event"
        )
    finally:
        if proc is not None and proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 60)
            except TimeoutError:
                proc.kill()
        await delete_topics(s, probe)
        await drop_schema(s)
        await delete_redis_keys(s)
    return run


def render(runs: list[Run], argv: list[str]) -> str:
    head = (
        f"Command: `python -m bench.latency {' '.join(argv)}`".rstrip()
        + f". Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on this machine, the worker, broker,"
        " Redis and PostgreSQL of the local stack sharing its cores.\n\n"
    )
    lines = [
        "| rate (events/s) | orgs x members | measure | n | p50 ms | p90 ms | p99 ms | max ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        for name, values in (
            ("pause (broker time - occurred_at)", r.pauses),
            ("resume (broker time - funding command due)", r.resumes),
            ("commit (PostgreSQL - occurred_at)", r.commits),
            ("broker floor (produce -> consume)", r.floor),
            ("load producer: send - due (counted in pause)", r.send_late),
        ):
            p = percentiles(values)
            lines.append(
                f"| {r.rate:,.0f} | {r.orgs:,} x {r.members} | {name} | {p['n']:,} |"
                f" {p['p50']:.1f} | {p['p90']:.1f} | {p['p99']:.1f} | {p['max']:.1f} |"
            )
        if r.missing:
            lines.append(f"| {r.rate:,.0f} | | pauses missing after 30 s | {r.missing} | | | | |")
        if r.funded_first:
            lines.append(
                f"| {r.rate:,.0f} | | no pause needed: funding applied before the 5th event"
                f" | {r.funded_first} | | | | |"
            )
        if r.resume_missing:
            lines.append(
                f"| {r.rate:,.0f} | | resumes missing after 30 s | {r.resume_missing} | | | | |"
            )
    cpu = [
        "",
        "CPU per event while the events were produced (process CPU-seconds / events produced):",
        "",
        "| rate (events/s) | worker us/event | Redis us/event | PostgreSQL us/event |",
        "|---|---|---|---|",
    ]
    for r in runs:
        n = max(r.produced, 1)
        cpu.append(
            f"| {r.rate:,.0f} | {r.worker_cpu_s / n * 1e6:.0f} | {r.redis_cpu_s / n * 1e6:.0f} |"
            f" {r.postgres_cpu_s / n * 1e6:.0f} |"
        )
    return head + "\n".join(lines) + "\n" + "\n".join(cpu) + "\n"


def write_markdown(text: str) -> None:
    section = f"{SECTION_START}\n## Pause latency (`make bench-latency`)\n\n{text}{SECTION_END}"
    md = BENCH_MD.read_text(encoding="utf-8")
    if SECTION_START in md:
        before, rest = md.split(SECTION_START, 1)
        after = rest.split(SECTION_END, 1)[1]
        md = before + section + after
    else:
        md = md.rstrip() + "\n\n" + section + "\n"
    BENCH_MD.write_text(md, encoding="utf-8")


SHAPES = (("dense", 1_000, 20), ("sparse", 10_000, 10))
"""The two backlog shapes of ``--shapes``: (name, orgs, members per org)."""


async def shape_rate(name: str, orgs: int, members: int, events: int) -> dict[str, float]:
    """One ``bench.e2e`` run of one backlog shape: its events/s and consume+decode ceiling."""
    out = Path(f"/tmp/bench-shape-{os.getpid()}-{name}.json")
    log(f"{name} backlog: {events:,} events, {orgs:,} orgs x {members} members (bench.e2e) ...")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.e2e", "--events", str(events), "--orgs", str(orgs),
        "--members", str(members), "--skip-naive", "--no-write", "--json", str(out),
        cwd=ROOT, stdout=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    if await proc.wait() != 0:
        raise SystemExit(f"bench.e2e failed for the {name} shape")
    rate: dict[str, float] = orjson.loads(out.read_bytes())  # noqa: ASYNC240 (small, once)
    out.unlink()  # noqa: ASYNC240
    log(f"  {name}: {rate['events_per_s']:,.0f} events/s")
    return rate


async def shape_rates(events: int, rounds: int) -> list[dict[str, dict[str, float]]]:
    """Backlog throughput of each shape of :data:`SHAPES`, ``rounds`` times, on the same stack.

    The shapes alternate (dense first in odd rounds, sparse first in even ones), so a machine
    that speeds up or slows down during the run (a neighbour on the host) moves both shapes
    of a round alike: each round gives one sparse/dense ratio, and the table reports their
    median. One pair alone moved from 72% to 89% within the same hour on the same code."""
    out: list[dict[str, dict[str, float]]] = []
    for n in range(rounds):
        if rounds > 1:
            log(f"backlog shapes, round {n + 1}/{rounds}")
        order = SHAPES if n % 2 == 0 else tuple(reversed(SHAPES))
        measured: dict[str, dict[str, float]] = {}
        for name, orgs, members in order:
            measured[name] = await shape_rate(name, orgs, members, events)
        out.append(measured)
    return out


def sparse_capacity(rounds: list[dict[str, dict[str, float]]]) -> float:
    """The sparse shape's events/s: the median over the rounds."""
    return statistics.median(r["sparse"]["events_per_s"] for r in rounds)


def render_shapes(rounds: list[dict[str, dict[str, float]]], events: int) -> str:
    n = len(rounds)
    what = "launch to last commit"
    if n > 1:
        what += f"; median of {n} rounds, shapes alternating"
    lines = [
        f"Backlog shapes ({events:,} events each, `bench.e2e`, {what}):\n",
        "| shape | orgs x members | events/s | vs dense | vs consume+decode ceiling |",
        "|---|---|---|---|---|",
    ]
    for name, orgs, members in SHAPES:
        rates = [r[name]["events_per_s"] for r in rounds]
        ratios = [r[name]["events_per_s"] / r["dense"]["events_per_s"] for r in rounds]
        vs_dense = statistics.median(ratios)
        ceilings = [
            r[name]["events_per_s"] / r[name]["decode_ceiling_per_s"]
            for r in rounds
            if r[name]["decode_ceiling_per_s"]
        ]
        rate = f"{statistics.median(rates):,.0f}"
        if n > 1:
            rate += " (" + ", ".join(f"{x:,.0f}" for x in rates) + ")"
        vs = f"{vs_dense:.0%}"
        if n > 1 and name != "dense":
            vs += " (" + ", ".join(f"{x:.0%}" for x in ratios) + ")"
        ceiling = f"{statistics.median(ceilings):.1%}" if ceilings else ""
        lines.append(f"| {name} | {orgs:,} x {members} | {rate} | {vs} | {ceiling} |")
    return "\n".join(lines) + "\n\n"


async def main_async(args: argparse.Namespace, argv: list[str]) -> int:
    base = Settings()
    shapes = ""
    rates = list(args.rate)
    if args.shapes:
        measured = await shape_rates(args.shape_events, args.shape_rounds)
        shapes = render_shapes(measured, args.shape_events)
        half = sparse_capacity(measured) / 2
        log(f"half of the sparse shape's capacity: {half:,.0f} events/s")
        rates.append(round(half, -2))
    runs = []
    for rate in rates:
        # Enough members that the run lasts --min-seconds at this rate (a steady state, not
        # the first seconds of one).
        orgs = max(
            args.orgs, math.ceil(rate * args.min_seconds / (args.members * EVENTS_PER_MEMBER))
        )
        runs.append(await one_run(base, rate, orgs, args.members))
    text = shapes + render(runs, argv)
    print("\n" + text)
    if args.write_md:
        write_markdown(text)
    return 0


def _at_least_one(text: str) -> int:
    """An argparse type: a whole number of 1 or more."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--rate", type=float, action="append", help="events/s (repeatable)")
    p.add_argument("--orgs", type=int, default=1_000)
    p.add_argument("--members", type=int, default=10)
    p.add_argument("--no-write", dest="write_md", action="store_false")
    p.add_argument(
        "--shapes",
        action="store_true",
        help="first measure the dense and sparse backlog shapes (bench.e2e), then add a run at"
        " half of the sparse shape's capacity",
    )
    p.add_argument("--shape-events", type=int, default=300_000)
    p.add_argument(
        "--shape-rounds",
        type=_at_least_one,
        default=3,
        help="rounds of the two backlog shapes, alternating (the table gives the medians)",
    )
    p.add_argument(
        "--min-seconds",
        type=float,
        default=20.0,
        help="more orgs than --orgs when needed so that each run lasts this long",
    )
    args = p.parse_args(argv)
    args.rate = args.rate or [2_000.0]
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main_async(args, argv))
    return uvloop.run(main_async(args, argv))


if __name__ == "__main__":
    sys.exit(main())
