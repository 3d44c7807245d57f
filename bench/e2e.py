"""End-to-end benchmark (``make bench``): ceiling, naive baseline and the worker on the same data.

Steps, all in one run and on the same topics:

0. create fresh topics, load the admin commands creating 1,000 orgs x 20 members and funding
   their pools, let the worker apply them (a warm-up run, not timed), then pre-load 1,000,000
   usage events;
1. **ceiling**: a consume-only aiokafka ``getmany`` loop over the usage topic (raw, and with a
   msgspec decode of every value);
2. **naive**: one Postgres transaction per event with ``SELECT ... FOR UPDATE`` (bench/naive.py),
   time-bounded because it is slow;
3. **worker**: ``python -m worker worker`` as a subprocess, timed from launch until the group's
   committed offsets reach the end of every usage partition (the pipeline commits Kafka offsets
   only after Postgres holds the batch), with its peak RSS read from ``/proc``.

Prints a table with the three figures and their ratios and rewrites the end-to-end section of
``BENCHMARKS.md``. Run ``python -m bench.e2e --help`` for smaller runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import signal
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bench.naive import run_naive
from bench.workload import WorkloadSpec, produce, setup_commands, topic_partitions, usage_events
from worker.config import Settings

ROOT = Path(__file__).resolve().parent.parent
BENCH_MD = ROOT / "BENCHMARKS.md"
SECTION_START = "<!-- bench.e2e:start -->"
SECTION_END = "<!-- bench.e2e:end -->"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- topics ------------------------------------------------------------------------------------


def bench_settings(base: Settings, run_id: str) -> Settings:
    """Settings pointing at this run's own topics, group, Postgres schema and Redis keys."""
    return base.namespaced(f"bench{run_id}")


def all_topics(s: Settings) -> list[str]:
    return [
        s.topic_usage,
        s.topic_admin,
        s.topic_control,
        s.topic_notifications,
        s.topic_billing,
        s.topic_usage_dlq,
        s.topic_admin_dlq,
    ]


async def create_topics(s: Settings) -> None:
    """Create this run's topics (control compacted), partitions from the settings."""
    admin = AIOKafkaAdminClient(bootstrap_servers=s.kafka_bootstrap)
    await admin.start()
    try:
        new = [
            NewTopic(
                name,
                num_partitions=s.topic_partitions,
                replication_factor=1,
                topic_configs={"cleanup.policy": "compact"} if name == s.topic_control else {},
            )
            for name in all_topics(s)
        ]
        await admin.create_topics(new)
    finally:
        await admin.close()
    # Metadata for new topics propagates asynchronously; wait until a client sees them all.
    consumer = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap)
    await consumer.start()
    try:
        for _ in range(100):
            known = await consumer.topics()
            if all(t in known for t in all_topics(s)):
                return
            await asyncio.sleep(0.1)
        raise RuntimeError("topics were created but never appeared in metadata")
    finally:
        await consumer.stop()


async def delete_topics(s: Settings) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=s.kafka_bootstrap)
    await admin.start()
    try:
        await admin.delete_topics(all_topics(s))
    finally:
        await admin.close()


async def end_offsets(bootstrap: str, topic: str) -> dict[TopicPartition, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        parts = await topic_partitions(consumer, topic)
        return dict(await consumer.end_offsets(parts))
    finally:
        await consumer.stop()


# --- 1. ceiling --------------------------------------------------------------------------------


class _Usage(msgspec.Struct):
    event_id: str
    org_id: str
    member_id: str
    task_id: str
    credits: int | str | float
    occurred_at: str


async def consume_only(bootstrap: str, topic: str, *, decode: bool) -> tuple[int, float]:
    """Read the whole topic with ``getmany``; optionally msgspec-decode each value."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        max_partition_fetch_bytes=8 * 1024 * 1024,
        fetch_max_bytes=64 * 1024 * 1024,
    )
    await consumer.start()
    decoder = msgspec.json.Decoder(_Usage)
    try:
        parts = await topic_partitions(consumer, topic)
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        end = await consumer.end_offsets(parts)
        remaining = sum(end.values())
        n = 0
        started = time.perf_counter()
        while n < remaining:
            batch = await consumer.getmany(timeout_ms=1000, max_records=10_000)
            for records in batch.values():
                n += len(records)
                if decode:
                    for r in records:
                        decoder.decode(r.value)
        return n, time.perf_counter() - started
    finally:
        await consumer.stop()


# --- 3. the worker -----------------------------------------------------------------------------


def _worker_env(s: Settings, http_port: int = 0) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "METERING_KAFKA_BOOTSTRAP": s.kafka_bootstrap,
            "METERING_TOPIC_USAGE": s.topic_usage,
            "METERING_TOPIC_ADMIN": s.topic_admin,
            "METERING_TOPIC_CONTROL": s.topic_control,
            "METERING_TOPIC_NOTIFICATIONS": s.topic_notifications,
            "METERING_TOPIC_BILLING": s.topic_billing,
            "METERING_TOPIC_USAGE_DLQ": s.topic_usage_dlq,
            "METERING_TOPIC_ADMIN_DLQ": s.topic_admin_dlq,
            "METERING_CONSUMER_GROUP": s.consumer_group,
            "METERING_POSTGRES_SCHEMA": s.postgres_schema,
            "METERING_REDIS_URL": s.redis_url.get_secret_value(),
            "METERING_REDIS_KEY_PREFIX": s.redis_key_prefix,
            "METERING_LOG_FORMAT": "console",
            "METERING_LOG_LEVEL": os.environ.get("BENCH_WORKER_LOG", "WARNING"),
            "METERING_HTTP_PORT": str(http_port),
        }
    )
    env.pop("METERING_CRASH_AT", None)
    return env


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


_STAGES = {
    "metering_batch_seconds": "batch (end to end)",
    "metering_redis_script_seconds": "engine calls of a batch",
    "metering_pg_flush_seconds": "PostgreSQL flush",
}


async def scrape_stages(port: int) -> dict[str, tuple[int, float]]:
    """(count, total seconds) of the worker's stage histograms, from its /metrics endpoint."""
    import aiohttp
    from prometheus_client.parser import text_string_to_metric_families

    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}/metrics", timeout=aiohttp.ClientTimeout(total=5)) as r,
    ):
        text = await r.text()
    out: dict[str, tuple[int, float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name not in _STAGES:
            continue
        count = total = 0.0
        for sample in family.samples:
            if sample.name.endswith("_count"):
                count += sample.value
            elif sample.name.endswith("_sum"):
                total += sample.value
        out[_STAGES[family.name]] = (int(count), total)
    return out


def _rss_kib(pid: int) -> tuple[int, int]:
    """(current RSS, peak RSS) of a process in KiB, from /proc (0, 0 once it is gone)."""
    rss = hwm = 0
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
    except OSError:
        pass
    return rss, hwm


@dataclass
class WorkerRun:
    events: int
    seconds: float
    steady_seconds: float
    peak_rss_kib: int
    exit_code: int | None
    worker_cpu_s: float = 0.0
    machine_busy_s: float = 0.0
    service_cpu_s: dict[str, float] = field(default_factory=dict)
    stages: dict[str, tuple[int, float]] = field(default_factory=dict)
    pg_counts: dict[str, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0

    @property
    def steady_rate(self) -> float:
        return self.events / self.steady_seconds if self.steady_seconds > 0 else 0.0


def _proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


_SERVICE_NAMES = {"redis-server": "Redis", "postgres": "PostgreSQL", "java": "Kafka broker"}


def _service_cpu_s() -> dict[str, float]:
    """CPU seconds used so far by every Redis, PostgreSQL and Java process on the machine."""
    out = dict.fromkeys(_SERVICE_NAMES.values(), 0.0)
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                raw = f.read()
        except OSError:
            continue
        name = raw[raw.find("(") + 1 : raw.rfind(")")]
        label = _SERVICE_NAMES.get(name)
        if label is None:
            continue
        fields = raw.rsplit(")", 1)[1].split()
        out[label] += (int(fields[11]) + int(fields[12])) / tick
    return out


def _machine_busy_s() -> float:
    """CPU seconds all CPUs spent not idle since boot (from /proc/stat)."""
    with open("/proc/stat", encoding="ascii") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    return (sum(parts[:8]) - idle) / os.sysconf("SC_CLK_TCK")


async def run_worker_process(
    s: Settings,
    topics: list[str],
    *,
    expected: int,
    timeout_s: float,
    label: str,
    profile: str | None = None,
    workers: int = 1,
) -> WorkerRun:
    """Launch the worker (``workers`` processes in one consumer group), wait until the group's
    committed offsets reach the end of ``topics``.

    Then SIGTERM it (graceful shutdown) and collect its exit code, peak RSS and CPU time (with
    several workers: the largest peak RSS of one process, the CPU time of all of them).
    """
    targets: dict[TopicPartition, int] = {}
    for topic in topics:
        targets.update(await end_offsets(s.kafka_bootstrap, topic))
    total = sum(targets.values())
    admin = AIOKafkaAdminClient(bootstrap_servers=s.kafka_bootstrap)
    await admin.start()
    cmd = [sys.executable, "-m", "worker", "worker"]
    sampling = bool(profile and profile.endswith(".txt"))
    if profile and not sampling:
        cmd[1:1] = ["-m", "cProfile", "-o", profile]
    busy0 = _machine_busy_s()
    services0 = _service_cpu_s()
    self0 = time.process_time()
    started = time.perf_counter()
    http_port = _free_port()
    stages: dict[str, tuple[int, float]] = {}
    procs = [
        await asyncio.create_subprocess_exec(
            *cmd, env=_worker_env(s, http_port if i == 0 else _free_port()), cwd=ROOT
        )
        for i in range(workers)
    ]
    proc = procs[0]
    spy = None
    if sampling:
        # py-spy attached from outside (collapsed stacks; it stops when the worker exits):
        # sampling barely slows the worker, unlike cProfile.
        spy = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(proc.pid),
            "-r", "200", "-f", "raw", "-o", str(profile), "--nonblocking",
            stdout=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
    peak = 0
    worker_cpu = 0.0
    first_progress: float | None = None
    last_report = started
    done_at: float | None = None
    busy1 = busy0
    services1 = services0
    try:
        while True:
            await asyncio.sleep(0.2)
            peak = max(peak, *(_rss_kib(p.pid)[1] for p in procs))
            worker_cpu = max(worker_cpu, sum(_proc_cpu_s(p.pid) for p in procs))
            for p in procs:
                if p.returncode is not None:
                    raise RuntimeError(f"worker exited early with code {p.returncode}")
            try:
                got = await admin.list_consumer_group_offsets(s.consumer_group)
            except Exception as exc:  # the group may not exist yet
                got = {}
                if time.perf_counter() - started > 30:
                    log(f"  committed-offset query failed: {exc!r}")
            done = sum(min(got[tp].offset, end) for tp, end in targets.items() if tp in got)
            now = time.perf_counter()
            if first_progress is None and done > 0:
                first_progress = now
            if now - last_report >= 3.0:
                last_report = now
                rss = max(_rss_kib(p.pid)[0] for p in procs)
                log(
                    f"  {label}: {done:,}/{total:,} offsets committed,"
                    f" {now - started:5.1f} s, RSS {rss / 1024:.0f} MiB"
                    + (f" (largest of {workers} workers)" if workers > 1 else "")
                )
            if done >= total:
                done_at = now
                busy1 = _machine_busy_s()
                services1 = _service_cpu_s()
                services1["this benchmark process"] = time.process_time() - self0
                try:
                    stages = await scrape_stages(http_port)
                except Exception as exc:  # the figures are a bonus, not the measurement
                    log(f"  could not read the worker's /metrics: {exc!r}")
                break
            if now - started > timeout_s:
                raise TimeoutError(f"{label}: not done after {timeout_s:.0f} s ({done:,} done)")
    finally:
        await admin.close()
        live = [p for p in procs if p.returncode is None]
        if live:
            peak = max(peak, *(_rss_kib(p.pid)[1] for p in live))
            worker_cpu = max(worker_cpu, sum(_proc_cpu_s(p.pid) for p in procs))
        for p in live:
            p.send_signal(signal.SIGTERM)
        for p in live:
            try:
                await asyncio.wait_for(p.wait(), timeout=s.shutdown_grace_seconds + 10)
            except TimeoutError:
                p.kill()
                await p.wait()
        if spy is not None:
            await spy.wait()
            log(f"  py-spy profile written to {profile}")
    assert done_at is not None
    return WorkerRun(
        events=expected,
        seconds=done_at - started,
        steady_seconds=done_at - (first_progress or started),
        peak_rss_kib=peak,
        exit_code=next((p.returncode for p in procs if p.returncode), proc.returncode),
        worker_cpu_s=worker_cpu,
        machine_busy_s=busy1 - busy0,
        service_cpu_s={k: services1[k] - services0.get(k, 0.0) for k in services1},
        stages=stages,
    )


async def pg_table_counts(s: Settings) -> dict[str, int]:
    """Row counts of every table in the worker's schema (to show Postgres holds the ledger)."""
    import asyncpg

    conn = await asyncpg.connect(s.postgres_dsn.get_secret_value())
    try:
        names = await conn.fetch(
            "SELECT table_name FROM information_schema.tables"
            " WHERE table_schema = $1 ORDER BY table_name",
            s.postgres_schema,
        )
        out: dict[str, int] = {}
        for row in names:
            name = row["table_name"]
            out[name] = await conn.fetchval(f'SELECT count(*) FROM "{s.postgres_schema}"."{name}"')
        return out
    finally:
        await conn.close()


async def drop_schema(s: Settings) -> None:
    import asyncpg

    conn = await asyncpg.connect(s.postgres_dsn.get_secret_value())
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{s.postgres_schema}" CASCADE')
    finally:
        await conn.close()


async def delete_redis_keys(s: Settings) -> int:
    """Remove every key of this run (its unique key prefix) from Redis."""
    from worker.connections import redis_client

    client = redis_client(s)
    deleted = 0
    try:
        batch: list[Any] = []
        async for key in client.scan_iter(match=f"{s.redis_key_prefix}:*", count=1000):
            batch.append(key)
            # On a cluster the keys of different orgs live in different slots: one by one.
            if s.redis_cluster or len(batch) >= 500:
                deleted += await client.unlink(*batch)
                batch.clear()
        if batch:
            deleted += await client.unlink(*batch)
    finally:
        await client.aclose()
    return deleted


# --- report ------------------------------------------------------------------------------------


@dataclass
class Results:
    spec: WorkloadSpec
    load_seconds: float = 0.0
    ceiling_raw: tuple[int, float] | None = None
    ceiling_decode: tuple[int, float] | None = None
    naive: Any = None
    worker: WorkerRun | None = None
    notes: list[str] = field(default_factory=list)


def _rate(pair: tuple[int, float] | None) -> float:
    if not pair or pair[1] <= 0:
        return 0.0
    return pair[0] / pair[1]


def render_table(r: Results) -> str:
    naive_rate = r.naive.rate if r.naive else 0.0
    worker_rate = r.worker.rate if r.worker else 0.0
    rows: list[tuple[str, str, str, str, str]] = []

    def ratio(x: float) -> str:
        return f"{x / naive_rate:,.1f}x" if naive_rate and x else "-"

    if r.ceiling_raw:
        n, t = r.ceiling_raw
        rate = _rate(r.ceiling_raw)
        rows.append(
            (
                "1. consume-only ceiling (getmany, no decode)",
                f"{n:,}",
                f"{t:.1f}",
                f"{rate:,.0f}",
                ratio(rate),
            )
        )
    if r.ceiling_decode:
        n, t = r.ceiling_decode
        rate = _rate(r.ceiling_decode)
        rows.append(
            ("1b. consume-only + msgspec decode", f"{n:,}", f"{t:.1f}", f"{rate:,.0f}", ratio(rate))
        )
    if r.naive:
        rows.append(
            (
                "2. naive: 1 Postgres tx per event (sample)",
                f"{r.naive.events:,}",
                f"{r.naive.seconds:.1f}",
                f"{naive_rate:,.0f}",
                "1.0x",
            )
        )
    if r.worker:
        w = r.worker
        rows.append(
            (
                "3. worker, launch -> all offsets committed",
                f"{w.events:,}",
                f"{w.seconds:.1f}",
                f"{worker_rate:,.0f}",
                ratio(worker_rate),
            )
        )
        rows.append(
            (
                "3b. worker, first commit -> all committed",
                f"{w.events:,}",
                f"{w.steady_seconds:.1f}",
                f"{w.steady_rate:,.0f}",
                ratio(w.steady_rate),
            )
        )
    head = ("run", "events", "seconds", "events/s", "vs naive")
    widths = [max(len(str(x[i])) for x in [head, *rows]) for i in range(5)]
    lines = [
        "| " + " | ".join(str(c).ljust(widths[i]) for i, c in enumerate(head)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    for row in rows:
        lines.append(
            "| "
            + " | ".join(
                c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)
            )
            + " |"
        )
    return "\n".join(lines)


def _cpu_line(w: WorkerRun) -> str:
    cpus = os.cpu_count() or 1
    rest = w.machine_busy_s - w.worker_cpu_s - sum(w.service_cpu_s.values())
    return (
        f"During the timed run the worker process used {w.worker_cpu_s:.1f} CPU-seconds "
        f"({100 * w.worker_cpu_s / w.seconds:.0f}% of one core) and the whole machine "
        f"{w.machine_busy_s:.1f} CPU-seconds ({100 * w.machine_busy_s / (w.seconds * cpus):.0f}% "
        f"of its {cpus} cores: broker, Redis, PostgreSQL and the worker share them); "
        + ", ".join(f"{k} {v:.1f} s" for k, v in w.service_cpu_s.items())
        + f", everything else (kernel, hypervisor steal, other processes) {rest:.1f} s."
    )


def _stages_line(w: WorkerRun) -> str:
    if not w.stages:
        return ""
    parts = [
        f"{name}: {count:,} x {1000 * total / count:.1f} ms = {total:.1f} s"
        for name, (count, total) in w.stages.items()
        if count
    ]
    return (
        "Worker's own stage timings (its /metrics histograms, whole run): " + "; ".join(parts) + "."
    )


HISTORY_PREFIX = "- run of "


def _history_line(r: Results) -> str:
    naive = r.naive.rate if r.naive else 0.0
    parts = [f"{HISTORY_PREFIX}{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {r.spec.events:,} events:"]
    if r.worker:
        ratio = f" ({r.worker.rate / naive:.1f}x naive)" if naive else ""
        parts.append(f"worker {r.worker.rate:,.0f}/s{ratio},")
    if naive:
        parts.append(f"naive {naive:,.0f}/s,")
    parts.append(f"ceiling {_rate(r.ceiling_raw):,.0f}/s")
    return " ".join(parts)


def previous_history() -> list[str]:
    """The history lines already in BENCHMARKS.md's end-to-end section."""
    if not BENCH_MD.exists():
        return []
    text = BENCH_MD.read_text(encoding="utf-8")
    if SECTION_START not in text or SECTION_END not in text:
        return []
    section = text.split(SECTION_START, 1)[1].split(SECTION_END, 1)[0]
    return [line for line in section.splitlines() if line.startswith(HISTORY_PREFIX)]


def render_section(r: Results, argv: list[str], history: list[str] | None = None) -> str:
    spec = r.spec
    cmd = "make bench" if not argv else "python -m bench.e2e " + " ".join(argv)
    history = history or []
    lines = [
        SECTION_START,
        "## End to end (`make bench`)",
        "",
        f"Command: `{cmd}` (`.venv/bin/python -m bench.e2e`). Measured "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {os.cpu_count()} CPUs "
        f"({platform.machine()}, Python {platform.python_version()}), with the Kafka broker, "
        "Redis (AOF everysec) and PostgreSQL (fsync on) of `python -m devstack.stack up` on the "
        "same machine.",
        "",
        f"Workload: {spec.events:,} usage events over {spec.orgs:,} orgs x "
        f"{spec.members_per_org} members (every {spec.max_every}th member `max`, the others "
        f"`pro`), pools funded with {spec.pool_credits:,} credits, amounts 1-40 credits, "
        f"{spec.span_seconds // 3600} h of org time inside one cycle; pre-loaded into "
        f"{Settings().topic_partitions} partitions ({r.load_seconds:.0f} s to load). The "
        "admin commands that create the orgs and members are applied by a warm-up worker run "
        "before the usage events are loaded, so every timed run sees only usage events.",
        "",
        render_table(r),
        "",
    ]
    if r.worker:
        w = r.worker
        lines.append(
            f"Worker peak RSS: {w.peak_rss_kib / 1024:.0f} MiB (VmHWM of the worker process). "
            f"Exit code after SIGTERM: {w.exit_code}. {_cpu_line(w)} {_stages_line(w)}"
        )
        if w.pg_counts:
            counts = ", ".join(f"`{k}` {v:,}" for k, v in w.pg_counts.items() if v)
            lines.append(f"Postgres rows after the run: {counts}.")
        lines.append("")
    lines.extend(f"- {n}" for n in r.notes)
    if r.notes:
        lines.append("")
    lines.append(
        "How each figure is measured: (1) one aiokafka consumer, `getmany(max_records=10000)` "
        "from offset 0 to the end offsets (1b also decodes each value into a msgspec struct); "
        "(2) `bench/naive.py`: per event `BEGIN; SELECT ... FOR UPDATE` on the member's balance "
        "row (and the pool row when the allocation is used up), `UPDATE`, `INSERT` a ledger "
        "row, `COMMIT`; Kafka offsets committed per fetched batch; run on a time-bounded sample "
        "because it is slow; (3) `python -m worker worker` as a subprocess, clocked from "
        "process launch (imports, migrations and the group join included) until the consumer "
        "group's committed offsets reach the end of every usage partition; the pipeline commits "
        "Kafka offsets only after Postgres holds the batch, so at that moment every ledger row "
        "is in Postgres. 3b excludes start-up: it is clocked from the first committed offset."
    )
    lines.append("")
    lines.append(
        "Runs so far (the figures move with whatever else the 2-core machine is doing; "
        "newest last):"
    )
    lines.append("")
    lines.extend([*history, _history_line(r)])
    lines.append(SECTION_END)
    return "\n".join(lines)


def write_markdown(section: str) -> None:
    """Replace (or append) the end-to-end section of BENCHMARKS.md, leaving the rest alone."""
    text = BENCH_MD.read_text(encoding="utf-8") if BENCH_MD.exists() else "# Benchmarks\n"
    if SECTION_START in text and SECTION_END in text:
        before, rest = text.split(SECTION_START, 1)
        _, after = rest.split(SECTION_END, 1)
        text = before + section + after
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    BENCH_MD.write_text(text, encoding="utf-8")


# --- main --------------------------------------------------------------------------------------


async def main_async(args: argparse.Namespace, argv: list[str]) -> int:
    base = Settings()
    run_id = datetime.now(UTC).strftime("%m%d%H%M%S")
    s = bench_settings(base, run_id)
    spec = WorkloadSpec(
        orgs=args.orgs,
        members_per_org=args.members,
        events=args.events,
        prefix=f"b{run_id}",
    )
    res = Results(spec=spec)
    log(f"bench run {run_id}: topics {s.topic_usage} / {s.topic_admin}, schema {s.postgres_schema}")
    await create_topics(s)
    try:
        # 0. setup commands, applied by a warm-up worker run, then the usage events.
        setup = setup_commands(spec)
        log(f"loading {len(setup):,} admin commands ...")
        await produce(s.kafka_bootstrap, s.topic_admin, setup)

        if not args.skip_worker:
            log("warm-up: worker applies the admin commands (not timed) ...")
            await run_worker_process(
                s,
                [s.topic_admin],
                expected=len(setup),
                timeout_s=args.worker_timeout,
                label="warm-up",
            )

        log(f"loading {spec.events:,} usage events ...")
        t0 = time.perf_counter()

        def progress(sent: int, total: int) -> None:
            rate = sent / max(time.perf_counter() - t0, 1e-9)
            log(f"  loaded {sent:,}/{total:,} ({rate:,.0f}/s)")

        await produce(
            s.kafka_bootstrap,
            s.topic_usage,
            usage_events(spec),
            total=spec.events,
            progress=progress,
        )
        res.load_seconds = time.perf_counter() - t0
        log(f"loaded {spec.events:,} usage events in {res.load_seconds:.1f} s")

        # 1. ceiling
        log("1. consume-only ceiling ...")
        res.ceiling_raw = await consume_only(s.kafka_bootstrap, s.topic_usage, decode=False)
        log(f"   {_rate(res.ceiling_raw):,.0f} events/s (no decode)")
        res.ceiling_decode = await consume_only(s.kafka_bootstrap, s.topic_usage, decode=True)
        log(f"   {_rate(res.ceiling_decode):,.0f} events/s (msgspec decode)")

        # 2. naive
        if not args.skip_naive:
            log(
                f"2. naive baseline: sample of at most {args.naive_events:,} events or "
                f"{args.naive_seconds:.0f} s (one Postgres transaction per event) ..."
            )
            res.naive = await run_naive(
                bootstrap=s.kafka_bootstrap,
                dsn=s.postgres_dsn.get_secret_value(),
                usage_topic=s.topic_usage,
                admin_topic=s.topic_admin,
                group_id=f"bench{run_id}-naive",
                time_limit_s=args.naive_seconds,
                max_events=args.naive_events,
                progress=lambda n, t: log(f"   naive: {n:,} events in {t:.0f} s"),
            )
            log(f"   {res.naive.rate:,.0f} events/s over {res.naive.events:,} events")
            res.notes.append(
                f"The naive baseline ran on a sample: the first {res.naive.events:,} events "
                f"({res.naive.seconds:.0f} s); a full run at that rate would take "
                f"{spec.events / max(res.naive.rate, 1) / 60:.0f} minutes."
            )

        # 3. the worker
        if not args.skip_worker:
            log(f"3. worker on {spec.events:,} usage events ...")
            res.worker = await run_worker_process(
                s,
                [s.topic_usage],
                expected=spec.events,
                timeout_s=args.worker_timeout,
                label="worker" if args.workers == 1 else f"{args.workers} workers",
                profile=args.profile,
                workers=args.workers,
            )
            if args.workers > 1:
                res.notes.append(
                    f"The timed run is {args.workers} worker processes in one consumer group"
                    " (`--workers`): CPU-seconds are their sum, the peak RSS the largest one's."
                )
            res.worker.pg_counts = await pg_table_counts(s)
            log(
                f"   {res.worker.rate:,.0f} events/s (launch to last commit), "
                f"{res.worker.steady_rate:,.0f} events/s steady, "
                f"peak RSS {res.worker.peak_rss_kib / 1024:.0f} MiB"
            )
        else:
            res.notes.append("The worker run was skipped (`--skip-worker`).")

        print()
        print(render_table(res))
        if res.worker:
            print(f"worker peak RSS: {res.worker.peak_rss_kib / 1024:.0f} MiB")
            print(_cpu_line(res.worker))
            if res.worker.stages:
                print(_stages_line(res.worker))
            naive_rate = res.naive.rate if res.naive else 0.0
            ok_abs = res.worker.rate >= 40_000
            ok_rel = bool(naive_rate) and res.worker.rate >= 20 * naive_rate
            print(
                f"targets: >= 40,000 events/s: {'met' if ok_abs else 'NOT met'}; "
                f">= 20x naive: {'met' if ok_rel else 'NOT met'}"
            )
        if args.json:
            Path(args.json).write_bytes(  # noqa: ASYNC240 (once, at the end)
                orjson.dumps(
                    {
                        "events_per_s": res.worker.rate if res.worker else 0.0,
                        "steady_events_per_s": res.worker.steady_rate if res.worker else 0.0,
                        "decode_ceiling_per_s": _rate(res.ceiling_decode),
                        "worker_cpu_s": res.worker.worker_cpu_s if res.worker else 0.0,
                        "service_cpu_s": res.worker.service_cpu_s if res.worker else {},
                        "peak_rss_mib": res.worker.peak_rss_kib / 1024 if res.worker else 0.0,
                        "workers": args.workers,
                    }
                )
            )
        if args.write_md:
            write_markdown(render_section(res, argv, previous_history()))
            log(f"wrote the end-to-end section of {BENCH_MD.name}")
        return 0
    finally:
        if not args.keep:
            with contextlib.suppress(Exception):
                await delete_topics(s)
            with contextlib.suppress(Exception):
                await drop_schema(s)
            with contextlib.suppress(Exception):
                await delete_redis_keys(s)
            with contextlib.suppress(Exception):
                await drop_schema(s.model_copy(update={"postgres_schema": "bench_naive"}))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__.split("\n")[0])
    p.add_argument("--events", type=int, default=1_000_000, help="usage events (default 1M)")
    p.add_argument("--orgs", type=int, default=1_000)
    p.add_argument("--members", type=int, default=20, help="members per org")
    p.add_argument("--naive-seconds", type=float, default=30.0, help="time bound of the baseline")
    p.add_argument("--naive-events", type=int, default=100_000, help="event bound of the baseline")
    p.add_argument("--worker-timeout", type=float, default=420.0)
    p.add_argument("--skip-naive", action="store_true")
    p.add_argument("--skip-worker", action="store_true", help="only load, ceiling and naive")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes in the timed run (one consumer group; the warm-up uses one)",
    )
    p.add_argument(
        "--no-write", dest="write_md", action="store_false", help="do not rewrite BENCHMARKS.md"
    )
    p.add_argument("--keep", action="store_true", help="keep topics and schemas afterwards")
    p.add_argument(
        "--json", metavar="FILE", help="also write the worker's rates, CPU and peak RSS to FILE"
    )
    p.add_argument(
        "--profile",
        metavar="FILE",
        help="profile the timed worker: FILE.txt = py-spy collapsed stacks (sampling, cheap), "
        "any other name = cProfile stats (slower)",
    )
    args = p.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main_async(args, argv))
    return uvloop.run(main_async(args, argv))


if __name__ == "__main__":
    sys.exit(main())
