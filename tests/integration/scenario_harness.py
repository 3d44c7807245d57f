"""Harness of the crash/restart scenarios: worker subprocesses and private, restartable services.

- ``WorkerProcess`` runs ``python -m worker worker`` with a ``Settings`` copy turned into
  ``METERING_*`` variables, optionally with the ``METERING_CRASH_AT`` fault-injection hook, and
  can SIGTERM or SIGKILL it. Its output goes to a log file whose tail is shown on failure.
- ``wait_drained`` polls the consumer group's committed offsets until they reach the end of
  every input partition (the pipeline commits a Kafka offset only after PostgreSQL holds the
  batch, so at that moment the ledger is complete).
- ``PrivateRedis`` / ``PrivatePostgres`` / ``PrivateKafka`` start a service of the scenario's
  own on a free port, built with the stack's own classes, so a scenario can crash, empty or stop
  it without disturbing anybody else using the shared stack.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from pydantic import SecretStr

from schemas.encode import control_key
from worker import views
from worker.config import Settings

ROOT = Path(__file__).resolve().parents[2]
KILLED = -signal.SIGKILL
CRASH_EXIT = 137
"""Exit status of the ``METERING_CRASH_AT`` hook (``os._exit(137)``, like a SIGKILL)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def settings_env(settings: Settings) -> dict[str, str]:
    """Every setting as a ``METERING_*`` variable, so a subprocess sees exactly ``settings``."""
    import json

    env: dict[str, str] = {}
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, SecretStr):
            text = value.get_secret_value()
        elif isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, dict | list | tuple):
            text = json.dumps(value)
        else:
            text = str(value)
        env[f"METERING_{name.upper()}"] = text
    return env


# --- the worker as a subprocess ----------------------------------------------------------------


class WorkerProcess:
    """One ``python -m worker worker`` process."""

    def __init__(
        self,
        settings: Settings,
        log_dir: Path,
        name: str = "worker",
        *,
        crash_at: str | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self.crash_at = crash_at
        self.extra_env = extra_env or {}
        self.proc: asyncio.subprocess.Process | None = None
        self._log: Any = None

    async def start(self) -> WorkerProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("METERING_")}
        env.update(settings_env(self.settings))
        env.update(
            {
                "METERING_LOG_FORMAT": "console",
                "METERING_LOG_LEVEL": "INFO",
                "METERING_HTTP_PORT": "0",
                "METERING_CLIENT_ID": f"{self.settings.client_id}-{self.name}",
            }
        )
        if self.crash_at:
            env["METERING_CRASH_AT"] = self.crash_at
        env.update(self.extra_env)
        self._log = self.log_path.open("ab")
        self._log.write(f"---- start {self.name} crash_at={self.crash_at}\n".encode())
        self._log.flush()
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "worker",
            "worker",
            env=env,
            cwd=ROOT,
            stdout=self._log,
            stderr=asyncio.subprocess.STDOUT,
            stdin=asyncio.subprocess.DEVNULL,
        )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.returncode

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def wait(self, timeout: float) -> int:
        assert self.proc is not None
        try:
            rc = await asyncio.wait_for(self.proc.wait(), timeout)
        finally:
            if self.proc.returncode is not None and self._log is not None:
                self._log.close()
                self._log = None
        return rc

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, exactly like a machine losing the process."""
        if self.alive:
            assert self.proc is not None
            self.proc.kill()

    async def terminate(self, timeout: float | None = None) -> int:
        """SIGTERM and wait for the graceful exit (within the shutdown grace period)."""
        assert self.proc is not None
        if self.alive:
            self.proc.send_signal(signal.SIGTERM)
        return await self.wait(timeout or self.settings.shutdown_grace_seconds + 15)

    def close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(text[-lines:])


# --- offsets -----------------------------------------------------------------------------------


async def end_offsets(settings: Settings, topics: Iterable[str]) -> dict[TopicPartition, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap)
    await consumer.start()
    try:
        cluster = await consumer._client.fetch_all_metadata()
        parts = [
            TopicPartition(t, p)
            for t in topics
            for p in sorted(cluster.partitions_for_topic(t) or ())
        ]
        return dict(await consumer.end_offsets(parts))
    finally:
        await consumer.stop()


async def committed_offsets(settings: Settings) -> dict[TopicPartition, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        got = await admin.list_consumer_group_offsets(settings.consumer_group)
        return {tp: meta.offset for tp, meta in got.items() if meta.offset >= 0}
    finally:
        await admin.close()


async def group_members(settings: Settings) -> tuple[str, int]:
    """(state, number of members) of the worker group, as the broker sees it."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        resp = await admin.describe_consumer_groups([settings.consumer_group])
        group = resp[0].to_object()["groups"][0]
        return str(group["state"]), len(group["members"])
    finally:
        await admin.close()


async def wait_members(settings: Settings, count: int, *, timeout: float = 30.0) -> None:
    """Wait until the group is stable with exactly ``count`` members."""
    deadline = time.monotonic() + timeout
    state, n = "", 0
    while time.monotonic() < deadline:
        state, n = await group_members(settings)
        if state == "Stable" and n == count:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"group {settings.consumer_group}: {state} with {n} members, not {count}")


async def committed_total(settings: Settings, topics: Iterable[str]) -> int:
    """Sum of the group's committed offsets over every partition of ``topics`` (0 if unknown)."""
    wanted = set(topics)
    try:
        got = await committed_offsets(settings)
    except Exception:
        return 0
    return sum(off for tp, off in got.items() if tp.topic in wanted)


def _logs(procs: Sequence[WorkerProcess]) -> str:
    return "\n".join(f"[{p.name} rc={p.returncode}]\n{p.log_tail()}" for p in procs)


async def wait_drained(
    settings: Settings,
    topics: Sequence[str],
    procs: Sequence[WorkerProcess],
    *,
    timeout: float = 90.0,
) -> None:
    """Wait until the group's committed offsets reach the end of every partition of ``topics``.

    The end offsets are read again while waiting (producers may still be writing). Fails
    early, with the workers' log tails, if every worker has exited.
    """
    deadline = time.monotonic() + timeout
    while True:
        # Committed offsets first: a record committed by then had its forwarded copy (a
        # record sent on to its org's home partition) acknowledged before, so the end offsets
        # read next count the copy.
        try:
            got = await committed_offsets(settings)
        except Exception:
            got = {}
        targets = await end_offsets(settings, topics)
        behind = {tp: end - got.get(tp, 0) for tp, end in targets.items() if got.get(tp, 0) < end}
        if not behind:
            return
        if procs and not any(p.alive for p in procs):
            raise AssertionError(f"all workers exited with {behind} left:\n{_logs(procs)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"after {timeout:.0f} s still behind {behind}:\n{_logs(procs)}")
        await asyncio.sleep(0.25)


async def wait_progress(
    settings: Settings,
    topics: Sequence[str],
    at_least: int,
    procs: Sequence[WorkerProcess] = (),
    *,
    timeout: float = 60.0,
) -> int:
    """Wait until at least ``at_least`` records of ``topics`` are committed; returns the count."""
    deadline = time.monotonic() + timeout
    while True:
        done = await committed_total(settings, topics)
        if done >= at_least:
            return done
        if procs and not any(p.alive for p in procs):
            raise AssertionError(f"workers exited at {done} committed:\n{_logs(procs)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"only {done} records committed after {timeout:.0f} s")
        await asyncio.sleep(0.1)


# --- private services --------------------------------------------------------------------------


class PrivateRedis:
    """A redis-server of the scenario's own (AOF everysec, noeviction), like the stack's."""

    def __init__(self, root: Path) -> None:
        from devstack.stack import RedisNode

        self.port = free_port()
        self.node = RedisNode(f"scenario-redis:{self.port}", self.port, root / "redis")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        await asyncio.to_thread(self.node.start)

    def crash(self) -> None:
        """SIGKILL: whatever AOF has not fsynced yet (up to ~1 s) is lost."""
        pid = self.node.pid()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            _wait_gone(pid)
            self.node.pidfile.unlink(missing_ok=True)

    def wipe(self) -> None:
        """Delete the data files (AOF and RDB) of a stopped server: a lost volume."""
        for path in self.node.dir.iterdir():
            if path.is_dir():
                shutil.rmtree(path)
            elif path.suffix in (".rdb", ".aof"):
                path.unlink()

    def stop(self) -> None:
        self.node.stop()

    async def snapshot(self, into: Path) -> Path:
        """Stop the server (its data is flushed), copy its data files, start it again."""
        await asyncio.to_thread(self.node.stop)
        shutil.copytree(self.node.dir, into, ignore=shutil.ignore_patterns("redis.pid"))
        await self.start()
        return into

    async def restore(self, snapshot: Path) -> None:
        """Stop the server and start it again on an older copy of its data files: Redis back
        where it was at the snapshot, everything written since lost."""
        await asyncio.to_thread(self.node.stop)
        self.wipe()
        for path in snapshot.iterdir():
            target = self.node.dir / path.name
            if path.is_dir():
                shutil.copytree(path, target)
            elif path.suffix in (".rdb", ".aof"):
                shutil.copy2(path, target)
        await self.start()


class PrivatePostgres:
    """A PostgreSQL cluster of the scenario's own (initdb in a temporary folder)."""

    def __init__(self, root: Path) -> None:
        from devstack.stack import Postgres

        self.port = free_port()
        self.pg = Postgres(root / "pg", port=self.port)

    @property
    def dsn(self) -> str:
        return f"postgresql://metering@127.0.0.1:{self.port}/metering"

    async def start(self) -> None:
        await asyncio.to_thread(self.pg.start)

    async def stop(self) -> None:
        await asyncio.to_thread(self.pg.stop)


class PrivateKafka:
    """A single-node KRaft broker of the scenario's own, sharing the stack's downloaded jars."""

    def __init__(self, root: Path, base: Settings) -> None:
        from devstack.stack import Kafka, stack_dir

        self.port = free_port()
        self.controller_port = free_port()
        self.kafka = Kafka(root / "kafka", port=self.port, controller_port=self.controller_port)
        shared_libs = (stack_dir(base) / "kafka" / "libs").resolve()
        self.kafka.root.mkdir(parents=True, exist_ok=True)
        if shared_libs.is_dir() and not self.kafka.libs.exists():
            self.kafka.libs.symlink_to(shared_libs, target_is_directory=True)
        self.settings = base.model_copy(update={"kafka_bootstrap": f"127.0.0.1:{self.port}"})

    async def start(self) -> None:
        # Started from a helper process, like `python -m devstack.stack up` does: the broker
        # outlives the Popen object that launched it, which must not be collected in this one.
        code = (
            "import sys; from pathlib import Path; from devstack.stack import Kafka;"
            "from worker.config import Settings;"
            "Kafka(Path(sys.argv[1]), port=int(sys.argv[2]), controller_port=int(sys.argv[3]))"
            ".start(Settings(kafka_bootstrap=sys.argv[4]))"
        )
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            code,
            str(self.kafka.root),
            str(self.port),
            str(self.controller_port),
            self.settings.kafka_bootstrap,
            cwd=ROOT,
        )
        rc = await proc.wait()
        assert rc == 0, f"private Kafka broker did not start (see {self.kafka.log})"

    async def stop(self) -> None:
        await asyncio.to_thread(self.kafka.stop)

    def cleanup(self) -> None:
        with contextlib.suppress(Exception):
            self.kafka.stop()
        if self.kafka.libs.is_symlink():
            self.kafka.libs.unlink()
        shutil.rmtree(self.kafka.root, ignore_errors=True)


def _wait_gone(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


# --- one scenario ------------------------------------------------------------------------------


class Scenario:
    """A workload, its isolated settings and the worker processes of one scenario."""

    def __init__(self, settings: Settings, log_dir: Path, spec: Any) -> None:
        from bench.workload import setup_commands, usage_events

        self.settings = settings
        self.log_dir = log_dir
        self.spec = spec
        self.setup = setup_commands(spec)
        self.usage = list(usage_events(spec))
        self.workers: list[WorkerProcess] = []
        self._n = 0

    def worker(
        self, *, crash_at: str | None = None, settings: Settings | None = None
    ) -> WorkerProcess:
        self._n += 1
        proc = WorkerProcess(
            settings or self.settings, self.log_dir, f"worker{self._n}", crash_at=crash_at
        )
        self.workers.append(proc)
        return proc

    @property
    def input_topics(self) -> list[str]:
        return [self.settings.topic_admin, self.settings.topic_usage]

    async def produce(self, topic: str, messages: Sequence[Any]) -> None:
        from bench.workload import produce

        await produce(self.settings.kafka_bootstrap, topic, messages)

    async def apply_setup(self) -> None:
        """Create the orgs and members and fund the pools, before any usage is produced.

        A worker applies them and stops, so the usage that follows never waits for its org
        (the model then sees the same order as the worker).
        """
        await self.produce(self.settings.topic_admin, self.setup)
        w = await self.worker().start()
        await wait_drained(self.settings, [self.settings.topic_admin], [w], timeout=60)
        rc = await w.terminate()
        assert rc == 0, f"setup worker exited with {rc}:\n{w.log_tail()}"

    async def produce_usage(self, messages: Sequence[Any] | None = None) -> None:
        await self.produce(self.settings.topic_usage, self.usage if messages is None else messages)

    async def stream_usage(self, chunks: int = 10, pause: float = 0.3) -> None:
        """Produce the usage events in ``chunks`` slices with a pause between: load over time."""
        step = max(1, len(self.usage) // chunks)
        for i in range(0, len(self.usage), step):
            await self.produce_usage(self.usage[i : i + step])
            await asyncio.sleep(pause)

    async def drain(
        self, procs: Sequence[WorkerProcess] | None = None, timeout: float = 90
    ) -> None:
        await wait_drained(
            self.settings,
            self.input_topics,
            list(procs) if procs is not None else [w for w in self.workers if w.alive],
            timeout=timeout,
        )

    async def stop_all(self) -> None:
        """SIGTERM every running worker; each must exit cleanly (status 0)."""
        running = [w for w in self.workers if w.alive]
        codes = await asyncio.gather(*(w.terminate() for w in running))
        for w, rc in zip(running, codes, strict=True):
            assert rc == 0, f"{w.name} exited with {rc} on SIGTERM:\n{w.log_tail()}"

    async def kill_all(self) -> None:
        """SIGKILL whatever still runs and reap it (the end of every scenario, pass or fail)."""
        for w in self.workers:
            w.kill()
            if w.proc is not None:
                with contextlib.suppress(Exception):
                    await w.wait(10)
            w.close_log()


# --- verification ------------------------------------------------------------------------------


async def books(settings: Settings) -> dict[str, int]:
    """A summary of the ledger of record, to compare before and after a replay."""
    import asyncpg

    conn = await asyncpg.connect(
        settings.postgres_dsn.get_secret_value(),
        server_settings={"search_path": settings.postgres_schema},
    )
    try:
        row = await conn.fetchrow(
            "SELECT count(*) AS events, coalesce(sum(credits_mc), 0) AS credits_mc,"
            " count(*) FILTER (WHERE status = 'charged') AS charged FROM usage_events"
        )
        led = await conn.fetchrow(
            "SELECT count(*) AS entries, coalesce(sum(amount_mc), 0) AS amount_mc"
            " FROM ledger_entries"
        )
        return {
            "usage_events": int(row["events"]),
            "usage_charged": int(row["charged"]),
            "usage_credits_mc": int(row["credits_mc"]),
            "ledger_entries": int(led["entries"]),
            "ledger_amount_mc": int(led["amount_mc"]),
        }
    finally:
        await conn.close()


def _ledger_key(e: Any) -> tuple[Any, ...]:
    return (
        e["member_id"],
        e["source_kind"],
        e["source_id"],
        e["task_id"],
        e["movement"],
        e["bucket"],
        e["grant_id"],
        int(e["amount_mc"]),
        bool(e["late"]),
    )


class Expected:
    """The Python model applied to exactly the accepted input of a scenario.

    Setup commands are applied before any usage (``Scenario.apply_setup`` waits for that), and
    one org's usage events all travel in one partition in production order, so the model sees
    each org's items in the order the worker did. Later copies of an ``event_id`` are left out:
    the worker drops them before its rules see them (claims, PostgreSQL), and the rules decide
    each input they are given.
    """

    def __init__(self, sc: Scenario) -> None:
        import time as _time

        from schemas.decode import CommandRecord, decode_admin, decode_usage
        from worker.model import CommandItem, Model, UsageItem

        s = sc.settings
        now = int(_time.time() * 1000)
        self.model = Model(s.tiers, s.pool_block_credits)
        by_org: dict[str, list[Any]] = {}
        for msg in sc.setup:
            rec = decode_admin(msg.value, now_ms=now, tiers=list(s.tiers))
            assert isinstance(rec, CommandRecord), rec
            by_org.setdefault(rec.org_id, []).append(CommandItem(rec.command))
        seen: set[str] = set()
        for msg in sc.usage:
            u = decode_usage(msg.value, now_ms=now)
            assert not hasattr(u, "code"), u
            if u.event_id in seen:
                continue  # a copy: the pipeline drops it before the rules see it
            seen.add(u.event_id)
            by_org.setdefault(u.org_id, []).append(
                UsageItem(u.event_id, u.member_id, u.task_id, u.credits_mc, u.occurred_at_ms)
            )
        self.orgs = sorted(by_org)
        self.effects: dict[str, list[dict[str, Any]]] = {}
        for org, items in by_org.items():
            result = self.model.apply(org, items)
            statuses = {o.status for o in result.outcomes}
            assert statuses <= {"applied"}, (org, statuses)
            self.effects[org] = result.effects
        self.event_ids = {orjson_loads(m.value)["event_id"] for m in sc.usage}

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [e for org in self.orgs for e in self.effects[org] if e["kind"] == kind]

    def signals(self) -> dict[tuple[str, str], list[tuple[int, str, str]]]:
        out: dict[tuple[str, str], list[tuple[int, str, str]]] = {}
        for e in self.of_kind("signal"):
            out.setdefault((e["org_id"], e["member_id"]), []).append(
                (int(e["member_seq"]), e["signal"], e["reason"])
            )
        return out


def _diff(label: str, got: Any, want: Any, path: str = "") -> str:
    """The first few paths where two nested structures differ (readable assertion text)."""
    out: list[str] = []

    def walk(a: Any, b: Any, p: str) -> None:
        if len(out) >= 8:
            return
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b), key=str):
                walk(a.get(k, "<missing>"), b.get(k, "<missing>"), f"{p}.{k}")
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                walk(x, y, f"{p}[{i}]")
        elif a != b:
            out.append(f"{p}: got {a!r}, model {b!r}")

    walk(got, want, path)
    return f"{label}: " + "; ".join(out)


def orjson_loads(raw: bytes) -> Any:
    import orjson

    return orjson.loads(raw)


async def read_topic(settings: Settings, topic: str) -> list[Any]:
    """Every record of ``topic`` from offset 0, in offset order per partition."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False
    )
    await consumer.start()
    try:
        cluster = await consumer._client.fetch_all_metadata()
        parts = [
            TopicPartition(topic, p) for p in sorted(cluster.partitions_for_topic(topic) or ())
        ]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        end = await consumer.end_offsets(parts)
        out: list[Any] = []
        deadline = time.monotonic() + 30
        while [tp for tp in parts if await consumer.position(tp) < end[tp]]:
            assert time.monotonic() < deadline, f"could not read {topic} to its end"
            batch = await consumer.getmany(timeout_ms=500)
            for tp in sorted(batch, key=lambda t: t.partition):
                out.extend(batch[tp])
        return out
    finally:
        await consumer.stop()


def checker_workload(sc: Scenario) -> Any:
    """The scenario's input as the pipeline checker's ``Workload`` (all of it is accepted)."""
    import time as _time

    from pipeline_checker import Produced, Workload

    from schemas.decode import CommandRecord, UsageRecord, decode_admin, decode_usage

    s = sc.settings
    now = int(_time.time() * 1000)
    wl = Workload(settings=s, now_ms=now)
    for msg in sc.setup:
        rec = decode_admin(msg.value, now_ms=now, tiers=list(s.tiers))
        assert isinstance(rec, CommandRecord), rec
        wl.commands[rec.command_id] = dict(rec.command)
        wl.messages.append(Produced(s.topic_admin, msg.key, msg.value, ident=rec.command_id))
    for msg in sc.usage:
        u = decode_usage(msg.value, now_ms=now)
        assert isinstance(u, UsageRecord), u
        wl.events.setdefault(
            u.event_id,
            {
                "event_id": u.event_id,
                "org_id": u.org_id,
                "member_id": u.member_id,
                "task_id": u.task_id,
                "credits_mc": u.credits_mc,
                "occurred_at_ms": u.occurred_at_ms,
            },
        )
        wl.messages.append(Produced(s.topic_usage, msg.key, msg.value, ident=u.event_id))
    return wl


async def verify(sc: Scenario, *, production_order: bool = True) -> dict[str, int]:
    """Check the end state of a scenario against the model; returns the ledger summary.

    ``production_order=False`` when producers scattered an org's events over partitions: then
    only the order the worker recorded is meaningful, and only the shared checker's model
    comparison (in that order) applies, plus the order-free checks below.

    What a user would notice: every event charged exactly once and into the right buckets
    (PostgreSQL ledger == model), live balances right (Redis dashboard and state == model),
    the orchestrator's view right (control topic, read with its drop-seen-seq rule, == the
    model's signals per member), nothing dead-lettered, and every input offset consumed.
    """
    from collections import Counter

    import asyncpg
    from pipeline_checker import check_pipeline

    from worker.engine import RedisEngine

    s = sc.settings
    engine = RedisEngine.from_settings(s)
    try:
        # The shared checker: offsets, decided once, dead letters, and the model replayed in
        # the order PostgreSQL recorded.
        await check_pipeline(s, checker_workload(sc), engine=engine)
    finally:
        await engine.close()

    summary = await books(s)
    distinct = {orjson_loads(m.value)["event_id"] for m in sc.usage}
    assert summary["usage_events"] == len(distinct), summary
    assert summary["usage_charged"] == len(distinct), summary
    if not production_order:
        return summary

    # Stricter, because a scenario knows the order it produced: the model fed in production
    # order (setup first, then each org's events in partition order) must agree as well.
    exp = Expected(sc)

    conn = await asyncpg.connect(
        s.postgres_dsn.get_secret_value(), server_settings={"search_path": s.postgres_schema}
    )
    try:
        rows = await conn.fetch("SELECT * FROM ledger_entries")
        got_ledger = Counter(_ledger_key(r) for r in rows)
        want_ledger = Counter(_ledger_key(e) for e in exp.of_kind("ledger"))
        assert got_ledger == want_ledger, (
            f"ledger differs from the model: missing {list((want_ledger - got_ledger).items())[:5]}"
            f", extra {list((got_ledger - want_ledger).items())[:5]}"
        )
        ids = {r["event_id"] for r in await conn.fetch("SELECT event_id FROM usage_events")}
        assert ids == exp.event_ids
        notes = Counter(
            (r["org_id"], r["type"], r["member_id"])
            for r in await conn.fetch("SELECT org_id, type, member_id FROM notifications")
        )
        assert notes == Counter(
            (e["org_id"], e["type"], e["member_id"]) for e in exp.of_kind("notification")
        )
        parked = await conn.fetchval("SELECT count(*) FROM parked_events")
        assert parked == 0, f"{parked} events still parked"
        offsets = {
            (r["topic"], r["partition"]): r["next_offset"]
            for r in await conn.fetch(
                "SELECT topic, partition, next_offset FROM consumer_offsets WHERE group_id = $1",
                s.consumer_group,
            )
        }
    finally:
        await conn.close()
    ends = await end_offsets(s, sc.input_topics)
    for tp, end in ends.items():
        if end:
            assert offsets.get((tp.topic, tp.partition)) == end, (tp, offsets, end)

    engine = RedisEngine.from_settings(s)
    try:
        for org in exp.orgs:
            assert await engine.dashboard(org) == views.dashboard(exp.model, org), org
            got_state, want_state = await engine.state_view(org), views.state(exp.model, org)
            # The per-partition applied-offset watermarks exist only in Redis (the model is fed
            # items without Kafka offsets).
            for view in (got_state, want_state):
                if view is not None:
                    view.pop("watermarks", None)
            assert got_state == want_state, _diff(org, got_state, want_state)
    finally:
        await engine.close()

    # The orchestrator's rule (docs/orchestrator.md): per member, drop a seq already seen.
    seen: dict[tuple[str, str], list[tuple[int, str, str]]] = {}
    for rec in await read_topic(s, s.topic_control):
        v = orjson_loads(rec.value)
        key = (v["org_id"], v["member_id"])
        assert rec.key == control_key(*key)
        lst = seen.setdefault(key, [])
        if not lst or v["seq"] > lst[-1][0]:
            lst.append((v["seq"], v["signal"], v["reason"]))
    assert seen == exp.signals()

    for topic in (s.topic_usage_dlq, s.topic_admin_dlq):
        dead = await read_topic(s, topic)
        assert not dead, f"{len(dead)} unexpected dead letters on {topic}: {dead[:3]}"
    return summary
