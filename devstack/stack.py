"""Local development stack: Apache Kafka (KRaft), Redis (+ optional 3-master cluster), PostgreSQL.

Usage::

    python -m devstack.stack up [--cluster]   # install what is missing, start, wait, print settings
    python -m devstack.stack status           # what runs and whether it answers
    python -m devstack.stack topics           # create the SPEC topics (idempotent)
    python -m devstack.stack down             # stop what this stack started

Everything lives under ``Settings.stack_dir`` (default ``.stack`` in the project root) and
listens on 127.0.0.1 only, on ports that do not clash with system services. A service whose
``METERING_*`` setting points somewhere other than the local default, or every service when
``METERING_STACK_EXTERNAL=1``, is treated as external: nothing is started, ``up`` only checks
that it answers. A port taken by a process this stack did not start makes ``up`` fail rather
than silently use someone else's data.

Other modules import :func:`ensure_topics` and :func:`kafka_client_kwargs`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from worker.config import (
    DEFAULT_KAFKA_CONTROLLER_PORT,
    DEFAULT_KAFKA_PORT,
    DEFAULT_POSTGRES_PORT,
    DEFAULT_REDIS_CLUSTER_PORTS,
    DEFAULT_REDIS_PORT,
    Settings,
)
from worker.connections import kafka_client_kwargs
from worker.logging import redact_text

PROJECT_ROOT = Path(__file__).resolve().parent.parent
KAFKA_POM = PROJECT_ROOT / "deploy" / "kafka" / "pom.xml"
HOST = "127.0.0.1"
# Same variable as Kafka's own start scripts, so people can reuse what they know.
KAFKA_HEAP = os.environ.get("KAFKA_HEAP_OPTS", "-Xms256m -Xmx640m")
START_TIMEOUT = 120.0
STOP_TIMEOUT = 60.0

_LOCAL_KAFKA = Settings.model_fields["kafka_bootstrap"].default
_LOCAL_POSTGRES = Settings.model_fields["postgres_dsn"].default.get_secret_value()


class StackError(RuntimeError):
    """A service could not be installed, started or reached; the message says what to do."""


def say(msg: str) -> None:
    """Progress output (stderr, so ``status`` tables on stdout stay clean for scripts)."""
    print(f"[stack] {msg}", file=sys.stderr, flush=True)


# --- Topics (imported by the worker and the tests) -----------------------------------------


def topic_names(settings: Settings) -> dict[str, str]:
    """The SPEC topics as ``{settings field: topic name}``."""
    fields = (
        "topic_usage",
        "topic_admin",
        "topic_control",
        "topic_notifications",
        "topic_billing",
        "topic_usage_dlq",
        "topic_admin_dlq",
    )
    return {f: str(getattr(settings, f)) for f in fields}


async def ensure_topics(settings: Settings, names: Iterable[str] | None = None) -> list[str]:
    """Create the SPEC topics (or ``names``, a subset of them) if missing; return those created.

    Partitions come from ``Settings.topic_partitions``; the control topic is compacted because
    its latest record per member is the member's state. Existing topics are left as they are.
    """
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    wanted = list(topic_names(settings).values()) if names is None else list(names)
    admin = AIOKafkaAdminClient(**kafka_client_kwargs(settings), request_timeout_ms=30_000)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [n for n in wanted if n not in existing]
        if not missing:
            return []
        # Three copies where the cluster has the brokers for it, one on the local dev broker.
        brokers = len((await admin.describe_cluster()).get("brokers", [])) or 1
        new = [
            NewTopic(
                name=n,
                num_partitions=settings.topic_partitions,
                replication_factor=min(3, brokers),
                topic_configs=_topic_configs(settings, n),
            )
            for n in missing
        ]
        # A concurrent creator may win the race: the topic then exists, which is all we need.
        with contextlib.suppress(TopicAlreadyExistsError):
            await admin.create_topics(new, timeout_ms=30_000)
        await _wait_for_topics(admin, missing)
        return missing
    finally:
        await admin.close()


def _topic_configs(settings: Settings, name: str) -> dict[str, str]:
    # The broker rejects records larger than this; leave headroom over the accepted event size
    # so an oversize event still reaches the worker and is dead-lettered with a reason.
    configs = {"max.message.bytes": str(max(1_048_588, settings.max_message_bytes * 4))}
    if name == settings.topic_control:
        configs["cleanup.policy"] = "compact"
    return configs


async def _wait_for_topics(admin: Any, names: Sequence[str], timeout_s: float = 30.0) -> None:
    # CreateTopics returns before every partition has a leader; a producer started right after
    # would log "unknown topic" retries, so wait until metadata lists all of them with leaders.
    deadline = time.monotonic() + timeout_s
    while True:
        descs = await admin.describe_topics(list(names))
        ready = all(
            d.get("error_code", 0) == 0
            and d.get("partitions")
            and all(p.get("leader", -1) >= 0 for p in d["partitions"])
            for d in descs
        )
        if ready:
            return
        if time.monotonic() > deadline:
            raise StackError(f"topics {list(names)} created but not ready after {timeout_s}s")
        await asyncio.sleep(0.1)


async def delete_topics(settings: Settings, names: Sequence[str]) -> None:
    """Delete topics (missing ones are ignored); used by test teardown."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(**kafka_client_kwargs(settings))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        doomed = [n for n in names if n in existing]
        if doomed:
            await admin.delete_topics(doomed, timeout_ms=30_000)
    finally:
        await admin.close()


# --- Readiness checks ----------------------------------------------------------------------


def redis_url_with_db(url: str, db: int) -> str:
    """``url`` with its database number replaced by ``db``."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, parts.fragment))


async def check_kafka(settings: Settings, timeout_s: float = 5.0) -> None:
    """Raise unless the broker answers a metadata request."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(
        **kafka_client_kwargs(settings), request_timeout_ms=int(timeout_s * 1000)
    )
    try:
        async with asyncio.timeout(timeout_s):
            await admin.start()
            await admin.list_topics()
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


async def check_redis(url: str, timeout_s: float = 5.0, cluster: bool = False) -> None:
    """Raise unless Redis (or the Redis Cluster, with ``cluster``) answers PING."""
    import redis.asyncio as aioredis
    from redis.asyncio.cluster import RedisCluster

    client: Any
    if cluster:
        client = RedisCluster.from_url(url, socket_timeout=timeout_s)
    else:
        client = aioredis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
    try:
        async with asyncio.timeout(timeout_s):
            await client.ping()
    finally:
        await client.aclose()


async def check_postgres(dsn: str, timeout_s: float = 5.0) -> None:
    """Raise unless PostgreSQL accepts a connection and runs a query."""
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=timeout_s)
    try:
        await conn.fetchval("SELECT 1")
    finally:
        await conn.close()


async def check_services(settings: Settings, timeout_s: float = 5.0) -> dict[str, str | None]:
    """Check Kafka, Redis and PostgreSQL concurrently: ``{name: None or the error text}``."""

    async def one(name: str, coro: Any) -> tuple[str, str | None]:
        try:
            await coro
        except Exception as exc:  # every failure is reported, whatever the client raised
            return name, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return name, None

    results = await asyncio.gather(
        one("kafka", check_kafka(settings, timeout_s)),
        one(
            "redis",
            check_redis(settings.redis_url.get_secret_value(), timeout_s, settings.redis_cluster),
        ),
        one("postgres", check_postgres(settings.postgres_dsn.get_secret_value(), timeout_s)),
    )
    return dict(results)


# --- Process helpers -----------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) no longer serves anything.
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _read_pid(pidfile: Path, marker: str) -> int | None:
    """The pid in ``pidfile`` if that process is alive and its command line has ``marker``."""
    try:
        pid = int(pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    if _pid_alive(pid) and (marker in _cmdline(pid) or not Path("/proc").exists()):
        return pid
    return None


def _pids_with_cwd(path: Path) -> list[int]:
    """Processes whose working directory is ``path`` (how a server's helpers are found)."""
    target = path.resolve()
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if Path(os.readlink(proc / "cwd")) == target:
                found.append(int(proc.name))
    return found


def _port_open(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _wait_until(
    what: str, ready: Callable[[], bool], log: Path, timeout: float, alive: Callable[[], bool]
) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if not alive():
            raise StackError(f"{what} exited during startup; see {log}\n{_tail(log)}")
        if time.monotonic() > deadline:
            raise StackError(
                f"{what} did not answer within {timeout:.0f}s; see {log}\n{_tail(log)}"
            )
        time.sleep(0.25)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"  ({path} not found)"
    return "\n".join("  | " + line for line in text[-lines:])


def _stop_pid(what: str, pid: int, sig: int = signal.SIGTERM) -> None:
    say(f"stopping {what} (pid {pid})")
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    deadline = time.monotonic() + STOP_TIMEOUT
    while _pid_alive(pid):
        if time.monotonic() > deadline:
            say(f"{what} (pid {pid}) ignored SIGTERM for {STOP_TIMEOUT:.0f}s; killing it")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
        time.sleep(0.1)


def _run(cmd: Sequence[str], what: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, **kwargs)
    if proc.returncode != 0:
        out = (proc.stdout + proc.stderr).strip()
        raise StackError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{out}")
    return proc


def _ensure_port_free(port: int, what: str, setting: str) -> None:
    if _port_open(port):
        raise StackError(
            f"port {HOST}:{port} is in use by a process this stack did not start, so {what} "
            f"cannot start there (this stack never talks to data it does not own). Stop that "
            f"process (another checkout's stack? run `python -m devstack.stack down` there), or "
            f"use the running services as they are with METERING_STACK_EXTERNAL=1, or point "
            f"{setting} at another server."
        )


# --- Package installation ------------------------------------------------------------------


def _is_debian_root() -> bool:
    return (
        os.geteuid() == 0 and Path("/etc/debian_version").exists() and bool(shutil.which("apt-get"))
    )


def _apt_install(packages: Sequence[str], why: str) -> None:
    if not _is_debian_root():
        raise StackError(
            f"{why}: install the packages {' '.join(packages)} (Debian/Ubuntu: "
            f"`sudo apt-get install -y {' '.join(packages)}`), then run this again"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    say(f"{why}: installing {' '.join(packages)} with apt-get")
    if subprocess.run(cmd, env=env, check=False).returncode != 0:
        say("apt-get install failed; refreshing the package lists and retrying")
        _run(["apt-get", "update"], "apt-get update", env=env)
        _run(cmd, "apt-get install", env=env)


# --- Redis ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RedisNode:
    """One redis-server process of the stack (the standalone one or a cluster master)."""

    name: str
    port: int
    dir: Path
    cluster: bool = False

    @property
    def pidfile(self) -> Path:
        return self.dir / "redis.pid"

    @property
    def log(self) -> Path:
        return self.dir / "redis.log"

    def pid(self) -> int | None:
        return _read_pid(self.pidfile, "redis-server")

    def answers(self) -> bool:
        try:
            out = subprocess.run(
                ["redis-cli", "-h", HOST, "-p", str(self.port), "PING"],
                capture_output=True,
                text=True,
                timeout=5,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            return False
        return out.stdout.strip() == "PONG"

    def start(self) -> None:
        pid = self.pid()
        if pid is not None:
            say(f"{self.name} already running (pid {pid}), reusing it")
        else:
            _ensure_port_free(self.port, self.name, "METERING_REDIS_URL")
            self.dir.mkdir(parents=True, exist_ok=True)
            say(f"starting {self.name} on {HOST}:{self.port} (data {self.dir})")
            cmd = [
                "redis-server",
                "--port", str(self.port),
                "--bind", HOST,
                "--protected-mode", "no",
                "--daemonize", "yes",
                "--pidfile", str(self.pidfile),
                "--logfile", str(self.log),
                "--dir", str(self.dir),
                # AOF is the durability the engine relies on (at most ~1 s lost on a crash;
                # the ledger in Postgres is the record to rebuild from).
                "--appendonly", "yes",
                "--appendfsync", "everysec",
                # Rewrite the AOF (a fork) once it passes 1 GB and doubled, not every 64 MB: at
                # ~200 bytes of AOF per event a busy worker would fork Redis every few seconds.
                "--auto-aof-rewrite-min-size", "1gb",
                # A stream's new node reserves up to this many bytes (4 KB by default): each
                # org's outbox holds one entry at a time, mostly a few hundred bytes.
                "--stream-node-max-bytes", "1024",
                "--save", "",
                # Evicting keys would silently lose balances or dedupe marks: fail writes instead.
                "--maxmemory-policy", "noeviction",
            ]  # fmt: skip
            if self.cluster:
                cmd += [
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", "nodes.conf",
                    "--cluster-node-timeout", "5000",
                ]  # fmt: skip
            _run(cmd, f"starting {self.name}")
        _wait_until(
            f"{self.name} on port {self.port}",
            self.answers,
            self.log,
            START_TIMEOUT,
            lambda: self.pid() is not None or not self.pidfile.exists(),
        )

    def stop(self) -> bool:
        pid = self.pid()
        if pid is None:
            return False
        _stop_pid(self.name, pid)
        return True


def _redis_node(stack: Path) -> RedisNode:
    return RedisNode("redis", DEFAULT_REDIS_PORT, stack / "redis")


def _cluster_nodes(stack: Path) -> list[RedisNode]:
    return [
        RedisNode(f"redis-cluster:{p}", p, stack / "redis-cluster" / str(p), cluster=True)
        for p in DEFAULT_REDIS_CLUSTER_PORTS
    ]


def _ensure_redis_installed() -> None:
    if not (shutil.which("redis-server") and shutil.which("redis-cli")):
        _apt_install(["redis-server"], "redis-server is not installed")
        # Debian's package starts a system Redis on 6379; ours uses its own port and data, so
        # that one is left alone.


def _cluster_info(port: int) -> dict[str, str]:
    out = subprocess.run(
        ["redis-cli", "-h", HOST, "-p", str(port), "CLUSTER", "INFO"],
        capture_output=True,
        text=True,
        timeout=5,
        check=False,
    ).stdout
    return dict(line.split(":", 1) for line in out.split() if ":" in line)


def _start_cluster(stack: Path) -> None:
    nodes = _cluster_nodes(stack)
    for node in nodes:
        node.start()
    first = nodes[0].port
    info = _cluster_info(first)
    if info.get("cluster_state") != "ok":
        if all(_cluster_info(n.port).get("cluster_known_nodes") == "1" for n in nodes):
            say("creating the Redis Cluster (3 masters, no replicas)")
            _run(
                [
                    "redis-cli",
                    "--cluster",
                    "create",
                    *(f"{HOST}:{n.port}" for n in nodes),
                    "--cluster-replicas",
                    "0",
                    "--cluster-yes",
                ],
                "redis-cli --cluster create",
            )
        deadline = time.monotonic() + START_TIMEOUT
        while not all(_cluster_info(n.port).get("cluster_state") == "ok" for n in nodes):
            if time.monotonic() > deadline:
                raise StackError(
                    f"Redis Cluster on ports {[n.port for n in nodes]} is not 'ok'; see "
                    f"{nodes[0].log}; `python -m devstack.stack down` and remove "
                    f"{stack / 'redis-cluster'} to recreate it"
                )
            time.sleep(0.25)


# --- PostgreSQL ----------------------------------------------------------------------------


def _pg_bindir() -> Path | None:
    versions = []
    for p in Path("/usr/lib/postgresql").glob("*/bin/postgres"):
        with contextlib.suppress(ValueError):
            versions.append((int(p.parent.parent.name), p.parent))
    if versions:
        return max(versions)[1]
    found = shutil.which("pg_ctl")
    return Path(found).resolve().parent if found else None


def _ensure_postgres_installed() -> Path:
    bindir = _pg_bindir()
    if bindir is None:
        # Debian's package also creates a "main" cluster on 5432; ours is separate (own port,
        # own data under the stack dir), so that one is left alone.
        _apt_install(["postgresql"], "PostgreSQL is not installed")
        bindir = _pg_bindir()
        if bindir is None:
            raise StackError("PostgreSQL was installed but no bin directory was found")
    return bindir


def _pg_user() -> str | None:
    """OS user that runs initdb/postgres: ``postgres`` when we are root (they refuse root)."""
    if os.geteuid() != 0:
        return None
    try:
        import pwd

        pwd.getpwnam("postgres")
    except KeyError as exc:
        raise StackError(
            "running as root but there is no 'postgres' OS user to run PostgreSQL as "
            "(PostgreSQL refuses to run as root); install Debian's postgresql package"
        ) from exc
    return "postgres"


def _as_pg(cmd: list[str], user: str | None) -> list[str]:
    return ["runuser", "-u", user, "--", *cmd] if user else cmd


def _make_reachable(path: Path, user: str) -> None:
    """Let ``user`` traverse every parent of ``path`` (adds o+x where it is missing)."""
    for parent in reversed(path.parents):
        probe = subprocess.run(
            ["runuser", "-u", user, "--", "test", "-x", str(parent)], check=False
        )
        if probe.returncode != 0:
            mode = parent.stat().st_mode
            say(f"allowing the {user} user to traverse {parent} (chmod o+x)")
            parent.chmod(mode | 0o001)


@dataclass(frozen=True)
class Postgres:
    """The throwaway PostgreSQL cluster of the stack."""

    root: Path
    port: int = DEFAULT_POSTGRES_PORT

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def sockdir(self) -> Path:
        return self.root / "run"

    @property
    def log(self) -> Path:
        return self.root / "postgres.log"

    def pid(self) -> int | None:
        return _read_pid(self.data / "postmaster.pid", "postgres")

    def start(self) -> None:
        bindir = _ensure_postgres_installed()
        user = _pg_user()
        pid = self.pid()
        if pid is not None:
            say(f"postgres already running (pid {pid}), reusing it")
        else:
            self._clear_crash_leftovers()
            _ensure_port_free(self.port, "postgres", "METERING_POSTGRES_DSN")
            self.root.mkdir(parents=True, exist_ok=True)
            self.sockdir.mkdir(parents=True, exist_ok=True)
            if user:
                _make_reachable(self.root, user)
                shutil.chown(self.root, user, user)
                shutil.chown(self.sockdir, user, user)
                if not self.log.exists():
                    self.log.touch()
                shutil.chown(self.log, user, user)
            if not self.data.exists():
                # initdb writes into a side folder that is renamed when complete: a crash
                # mid-way leaves only the side folder, which the next run discards.
                staging = self.root / "data.init"
                shutil.rmtree(staging, ignore_errors=True)
                say(f"initialising a PostgreSQL cluster in {self.data}")
                _run(
                    _as_pg(
                        [
                            str(bindir / "initdb"),
                            "-D", str(staging),
                            "-U", "postgres",
                            "--auth=trust",  # loopback-only throwaway cluster
                            "-E", "UTF8",
                            "--locale=C",
                            "--no-instructions",
                        ],
                        user,
                    ),
                    "initdb",
                )  # fmt: skip
                staging.rename(self.data)
            opts = " ".join(
                [
                    f"-c listen_addresses={HOST}",
                    f"-c port={self.port}",
                    f"-c unix_socket_directories={self.sockdir}",
                    # fsync stays on: Postgres is the ledger of record, tests must see its
                    # real durability costs. synchronous_commit keeps its default (on).
                    "-c fsync=on",
                    # Sized for a write-heavy ledger (docs/operations.md, "PostgreSQL settings"):
                    # the indexes' insertion points of every batch COPY stay in memory, and WAL
                    # volume must not force a checkpoint every few seconds.
                    "-c shared_buffers=1GB",
                    "-c max_wal_size=8GB",
                    "-c min_wal_size=1GB",
                    "-c checkpoint_timeout=15min",
                    "-c wal_compression=on",
                    "-c max_connections=200",
                    "-c max_locks_per_transaction=256",  # many per-test schemas dropped at once
                ]
            )
            say(f"starting postgres on {HOST}:{self.port} (data {self.data})")
            cmd = [str(bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log)]
            proc = subprocess.run(
                _as_pg([*cmd, "-o", opts, "-w", "-t", str(int(START_TIMEOUT)), "start"], user),
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode != 0:
                raise StackError(
                    f"postgres did not start: {proc.stdout.strip()} {proc.stderr.strip()}; "
                    f"see {self.log}\n{_tail(self.log)}"
                )
        asyncio.run(self._ensure_role_and_db())

    def _clear_crash_leftovers(self) -> None:
        """After a killed postmaster: stop its orphaned backends and remove the stale lock file.

        Postgres refuses to start while ``postmaster.pid`` names a live process (an unreaped
        zombie counts) or old backends still hold the shared memory. Only processes whose
        working directory is this data folder are touched, so nothing of another cluster is.
        """
        lockfile = self.data / "postmaster.pid"
        stale = [lockfile, *self.sockdir.glob(".s.PGSQL.*")]
        if not any(path.exists() for path in stale):
            return
        orphans = [pid for pid in _pids_with_cwd(self.data) if _pid_alive(pid)]
        for pid in orphans:
            say(f"stopping a leftover postgres process (pid {pid}) of a crashed server")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(_pid_alive(p) for p in orphans) and time.monotonic() < deadline:
            time.sleep(0.05)
        say(f"removing the stale lock files of a crashed server ({lockfile})")
        for path in stale:
            path.unlink(missing_ok=True)

    async def _ensure_role_and_db(self) -> None:
        import asyncpg

        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                conn = await asyncpg.connect(
                    host=HOST, port=self.port, user="postgres", database="postgres", timeout=5
                )
                break
            except (OSError, asyncpg.PostgresError) as exc:
                if time.monotonic() > deadline:
                    raise StackError(f"postgres does not answer: {exc}; see {self.log}") from exc
                await asyncio.sleep(0.25)
        try:
            if not await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = 'metering'"):
                say("creating role metering")
                await conn.execute("CREATE ROLE metering LOGIN SUPERUSER")
            if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = 'metering'"):
                say("creating database metering")
                await conn.execute("CREATE DATABASE metering OWNER metering")
        finally:
            await conn.close()

    def stop(self) -> bool:
        pid = self.pid()
        if pid is None:
            return False
        bindir = _pg_bindir()
        say(f"stopping postgres (pid {pid})")
        if bindir is not None:
            subprocess.run(
                _as_pg(
                    [str(bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"],
                    _pg_user(),
                ),
                capture_output=True,
                check=False,
            )
        if _pid_alive(pid):
            _stop_pid("postgres", pid)
        return True


# --- Kafka ---------------------------------------------------------------------------------


def _kafka_cluster_id() -> str:
    # Kafka's Uuid.toString: URL-safe base64 of 16 random bytes without padding. One id in 64
    # starts with "-", which the storage tool's argument parser takes for an option: redraw.
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


@dataclass(frozen=True)
class Kafka:
    """The single-node Apache Kafka broker (KRaft, combined broker + controller)."""

    root: Path
    port: int = DEFAULT_KAFKA_PORT
    controller_port: int = DEFAULT_KAFKA_CONTROLLER_PORT

    @property
    def libs(self) -> Path:
        return self.root / "libs"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "logs" / "server.log"

    @property
    def stdout_log(self) -> Path:
        return self.root / "logs" / "stdout.log"

    @property
    def pidfile(self) -> Path:
        return self.root / "kafka.pid"

    @property
    def config(self) -> Path:
        return self.root / "server.properties"

    @property
    def log4j(self) -> Path:
        return self.root / "log4j2.properties"

    def pid(self) -> int | None:
        return _read_pid(self.pidfile, "kafka.Kafka")

    def _java(self) -> str:
        java = shutil.which("java")
        if not java and _is_debian_root():
            _apt_install(["default-jre-headless"], "Java is needed to run the Kafka broker")
            java = shutil.which("java")
        if not java:
            raise StackError(
                "Java (17+) is needed to run the Kafka broker and was not found; install a JRE "
                "(Debian: `apt-get install -y default-jre-headless`) and run this again"
            )
        return java

    def fetch_jars(self) -> None:
        """Resolve the pinned broker and its runtime dependencies with Maven (cached in ~/.m2)."""
        stamp = self.libs / ".pom.sha256"
        digest = hashlib.sha256(KAFKA_POM.read_bytes()).hexdigest()
        if stamp.exists() and stamp.read_text() == digest:
            return
        mvn = shutil.which("mvn")
        if not mvn and _is_debian_root():
            _apt_install(["maven"], "Maven is needed to fetch the Kafka broker jars")
            mvn = shutil.which("mvn")
        if not mvn:
            raise StackError(
                "Maven is needed to fetch the Kafka broker jars and was not found; install it "
                "(Debian: `apt-get install -y maven`) and run this again"
            )
        staging = self.root / "libs.partial"
        shutil.rmtree(staging, ignore_errors=True)
        say(f"fetching Apache Kafka jars with Maven ({KAFKA_POM.relative_to(PROJECT_ROOT)})")
        _run(
            [
                mvn,
                "-B",
                "-q",
                "-f", str(KAFKA_POM),
                "dependency:copy-dependencies",
                "-DincludeScope=runtime",
                f"-DoutputDirectory={staging}",
            ],
            "Maven fetch of the Kafka jars",
        )  # fmt: skip
        if not list(staging.glob("kafka_2.13-*.jar")):
            raise StackError(f"Maven finished but {staging} has no kafka_2.13 jar")
        # The stamp goes in last and the folder is swapped in whole: a crash at any point
        # leaves either the old complete libs or a partial folder the next run deletes.
        (staging / ".pom.sha256").write_text(digest)
        if self.libs.is_symlink():  # a private broker sharing the stack's jars
            self.libs.unlink()
        shutil.rmtree(self.libs, ignore_errors=True)
        staging.rename(self.libs)

    def write_config(self) -> None:
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        self.data.mkdir(parents=True, exist_ok=True)
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.bootstrap.servers": f"{HOST}:{self.controller_port}",
            "listeners": f"PLAINTEXT://{HOST}:{self.port},CONTROLLER://{HOST}:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://{HOST}:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(self.data),
            "num.partitions": "6",
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "10",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "4",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            # The worker creates its topics with the right partitions and compaction; a typo in
            # a topic name must fail loudly instead of creating a stray topic.
            "auto.create.topics.enable": "false",
            "delete.topic.enable": "true",
            "num.network.threads": "2",
            "num.io.threads": "4",
            "log.retention.hours": "168",
        }
        self.config.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        self.log4j.write_text(
            "\n".join(
                [
                    "status = warn",
                    "appender.file.type = RollingFile",
                    "appender.file.name = FILE",
                    f"appender.file.fileName = {self.log}",
                    f"appender.file.filePattern = {self.log}.%i",
                    "appender.file.layout.type = PatternLayout",
                    "appender.file.layout.pattern = [%d] %p %m (%c)%n",
                    "appender.file.policies.type = Policies",
                    "appender.file.policies.size.type = SizeBasedTriggeringPolicy",
                    "appender.file.policies.size.size = 20MB",
                    "appender.file.strategy.type = DefaultRolloverStrategy",
                    "appender.file.strategy.max = 3",
                    "rootLogger.level = INFO",
                    "rootLogger.appenderRef.file.ref = FILE",
                    # Per-partition log lines drown the useful ones when tests make many topics.
                    "logger.log.name = kafka.log",
                    "logger.log.level = WARN",
                    "logger.storage.name = org.apache.kafka.storage",
                    "logger.storage.level = WARN",
                    "logger.state.name = state.change.logger",
                    "logger.state.level = WARN",
                    "",
                ]
            )
        )

    def _classpath_cmd(self, main: str, *args: str) -> list[str]:
        return [
            self._java(),
            f"-Dlog4j2.configurationFile={self.log4j}",
            "-cp",
            f"{self.libs}/*",
            main,
            *args,
        ]

    def format_storage(self) -> None:
        if (self.data / "meta.properties").exists():
            return
        # No meta.properties means no broker ever ran here: whatever a crashed earlier format
        # left behind holds no data, and the tool refuses a half-formatted folder.
        shutil.rmtree(self.data, ignore_errors=True)
        self.data.mkdir(parents=True)
        say(f"formatting KRaft storage in {self.data}")
        _run(
            self._classpath_cmd(
                "kafka.tools.StorageTool",
                "format",
                "--standalone",
                "--cluster-id",
                _kafka_cluster_id(),
                "--config",
                str(self.config),
            ),
            "kafka storage format",
        )

    def start(self, settings: Settings) -> None:
        pid = self.pid()
        if pid is not None:
            say(f"kafka already running (pid {pid}), reusing it")
        else:
            for port in (self.port, self.controller_port):
                _ensure_port_free(port, "kafka", "METERING_KAFKA_BOOTSTRAP")
            self._java()
            self.root.mkdir(parents=True, exist_ok=True)
            self.fetch_jars()
            self.write_config()
            self.format_storage()
            say(f"starting kafka on {HOST}:{self.port} (controller {self.controller_port})")
            cmd = [
                self._java(),
                *KAFKA_HEAP.split(),
                "-XX:+UseG1GC",
                "-XX:MaxGCPauseMillis=20",
                "-Djava.awt.headless=true",
                f"-Dlog4j2.configurationFile={self.log4j}",
                f"-Dkafka.logs.dir={self.log.parent}",
                "-cp",
                f"{self.libs}/*",
                "kafka.Kafka",
                str(self.config),
            ]
            with self.stdout_log.open("ab") as out:
                proc = subprocess.Popen(
                    cmd,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,  # survives the terminal; `down` stops it by pid
                    cwd=self.root,
                )
            self.pidfile.write_text(f"{proc.pid}\n")
            pid = proc.pid
        started = pid
        _wait_until(
            f"kafka on port {self.port}",
            lambda: _port_open(self.port) and _kafka_answers(settings),
            self.log,
            START_TIMEOUT,
            lambda: _pid_alive(started),
        )

    def stop(self) -> bool:
        pid = self.pid()
        if pid is None:
            return False
        _stop_pid("kafka", pid)
        self.pidfile.unlink(missing_ok=True)
        return True


def _kafka_answers(settings: Settings) -> bool:
    try:
        asyncio.run(check_kafka(settings, timeout_s=5.0))
    except Exception:  # any client error just means "not yet"
        return False
    return True


# --- The stack -----------------------------------------------------------------------------


def stack_dir(settings: Settings) -> Path:
    """Absolute data folder of the stack (a relative ``stack_dir`` is under the project root)."""
    path = settings.stack_dir
    return path if path.is_absolute() else PROJECT_ROOT / path


def local_services(settings: Settings) -> dict[str, bool]:
    """Which services this stack runs itself (True) or treats as external (False)."""
    if settings.stack_external:
        return {"kafka": False, "redis": False, "postgres": False}
    redis = urlsplit(settings.redis_url.get_secret_value())
    local_redis_ports = {DEFAULT_REDIS_PORT, *DEFAULT_REDIS_CLUSTER_PORTS}
    redis_local = redis.hostname in (HOST, "localhost") and redis.port in local_redis_ports
    return {
        "kafka": settings.kafka_bootstrap == _LOCAL_KAFKA,
        "redis": redis_local,
        "postgres": _same_postgres(settings.postgres_dsn.get_secret_value()),
    }


def _same_postgres(dsn: str) -> bool:
    parts = urlsplit(dsn)
    local = urlsplit(_LOCAL_POSTGRES)
    return (parts.hostname, parts.port) == (local.hostname, local.port)


def _connection_table(settings: Settings, cluster: bool) -> list[tuple[str, str]]:
    rows = [
        ("METERING_KAFKA_BOOTSTRAP", settings.kafka_bootstrap),
        ("METERING_REDIS_URL", _mask_url(settings.redis_url.get_secret_value())),
        ("METERING_POSTGRES_DSN", _mask_url(settings.postgres_dsn.get_secret_value())),
    ]
    if cluster:
        rows.append(
            (
                "Redis Cluster (METERING_REDIS_CLUSTER=true)",
                f"redis://{HOST}:{DEFAULT_REDIS_CLUSTER_PORTS[0]}/0 "
                f"(masters {', '.join(map(str, DEFAULT_REDIS_CLUSTER_PORTS))})",
            )
        )
    return rows


def _mask_url(url: str) -> str:
    return redact_text(url)


def _print_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
    rows = [list(map(str, r)) for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    print(line.rstrip(), flush=True)
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip(), flush=True)


@contextlib.contextmanager
def _step(name: str) -> Iterator[None]:
    t0 = time.monotonic()
    yield
    say(f"{name} ready ({time.monotonic() - t0:.1f}s)")


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Serialise ``up``/``down`` of one stack dir: two ``make test`` started together would
    otherwise both see a service missing and race to start it on the same port."""
    import fcntl

    root.mkdir(parents=True, exist_ok=True)
    with (root / ".lock").open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for another `devstack.stack` command on {root} to finish")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def up(settings: Settings, cluster: bool = False) -> None:
    """Start (or reuse) every local service, wait until each answers, print the settings."""
    with _locked(stack_dir(settings)):
        _up(settings, cluster)


def _up(settings: Settings, cluster: bool) -> None:
    root = stack_dir(settings)
    local = local_services(settings)
    cluster = cluster or settings.redis_cluster
    if local["redis"]:
        with _step("redis"):
            _ensure_redis_installed()
            _redis_node(root).start()
            if cluster:
                _start_cluster(root)
    if local["postgres"]:
        with _step("postgres"):
            Postgres(root / "pg").start()
    if local["kafka"]:
        with _step("kafka"):
            Kafka(root / "kafka").start(settings)
    external = [name for name, is_local in local.items() if not is_local]
    if external:
        say(f"checking external services: {', '.join(external)}")
    problems = asyncio.run(check_services(settings, timeout_s=10.0))
    failed = {k: v for k, v in problems.items() if v}
    if failed:
        raise StackError(
            "services do not answer: " + "; ".join(f"{k}: {v}" for k, v in failed.items())
        )
    print(f"stack is up (data in {root})", flush=True)
    _print_table(["setting", "value"], _connection_table(settings, cluster))
    logs = [
        (name, str(path))
        for name, path, is_local in (
            ("kafka", Kafka(root / "kafka").log, local["kafka"]),
            ("redis", _redis_node(root).log, local["redis"]),
            ("postgres", Postgres(root / "pg").log, local["postgres"]),
        )
        if is_local
    ]
    if logs:
        print(flush=True)
        _print_table(["service", "log file"], logs)


def down(settings: Settings) -> None:
    """Stop every process this stack started (found by pidfile) and wait for it to exit."""
    with _locked(stack_dir(settings)):
        _down(settings)


def _down(settings: Settings) -> None:
    root = stack_dir(settings)
    stopped = []
    if Kafka(root / "kafka").stop():
        stopped.append("kafka")
    if Postgres(root / "pg").stop():
        stopped.append("postgres")
    for node in [_redis_node(root), *_cluster_nodes(root)]:
        if node.stop():
            stopped.append(node.name)
    print(f"stopped: {', '.join(stopped)}" if stopped else "nothing of this stack was running")


def status(settings: Settings) -> bool:
    """Print a table of the services; return True when all the configured ones answer."""
    root = stack_dir(settings)
    local = local_services(settings)
    answers = asyncio.run(check_services(settings, timeout_s=3.0))
    redis_pid = _redis_node(root).pid()
    pids: dict[str, int | None] = {
        "kafka": Kafka(root / "kafka").pid(),
        "redis": redis_pid,
        "postgres": Postgres(root / "pg").pid(),
    }
    where = {
        "kafka": settings.kafka_bootstrap,
        "redis": _mask_url(settings.redis_url.get_secret_value()),
        "postgres": _mask_url(settings.postgres_dsn.get_secret_value()),
    }
    rows = []
    for name in ("kafka", "redis", "postgres"):
        err = answers[name]
        mode = _run_by(local[name], pids[name], err is None)
        rows.append((name, where[name], mode, "answers" if err is None else f"DOWN ({err})"))
    for node in _cluster_nodes(root):
        pid = node.pid()
        if pid is not None or _port_open(node.port):
            state = _cluster_info(node.port).get("cluster_state", "?")
            mode = _run_by(True, pid, True)
            rows.append((node.name, f"{HOST}:{node.port}", mode, f"cluster_state {state}"))
    _print_table(["service", "address", "run by", "state"], rows)
    return all(v is None for v in answers.values())


def _run_by(local: bool, pid: int | None, answers: bool) -> str:
    if not local:
        return "external"
    if pid is not None:
        return f"this stack (pid {pid})"
    return "another process" if answers else "not running"


def topics(settings: Settings) -> None:
    """Create the SPEC topics (idempotent) and print them."""
    created = asyncio.run(ensure_topics(settings))
    rows = [
        (
            name,
            str(settings.topic_partitions),
            "compact" if name == settings.topic_control else "delete",
            "created" if name in created else "exists",
        )
        for name in topic_names(settings).values()
    ]
    _print_table(["topic", "partitions", "cleanup", "state"], rows)


def ensure_browser() -> str:
    """Install Debian's Chromium for the dashboard browser test when it is missing."""
    found = shutil.which("chromium")
    if found is None:
        _apt_install(["chromium"], "the dashboard browser test needs Chromium")
        found = shutil.which("chromium")
    if found is None:
        raise StackError("chromium is still not on PATH after installing it")
    say(f"browser: {found}")
    return found


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m devstack.stack``."""
    parser = argparse.ArgumentParser(
        prog="python -m devstack.stack", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="start (or reuse) Kafka, Redis and PostgreSQL")
    p_up.add_argument("--cluster", action="store_true", help="also start a 3-master Redis Cluster")
    sub.add_parser("down", help="stop what this stack started")
    sub.add_parser("status", help="show what runs and whether it answers")
    sub.add_parser("topics", help="create the SPEC topics on the broker (idempotent)")
    sub.add_parser("browser", help="install headless Chromium for the browser test if missing")
    args = parser.parse_args(argv)
    try:
        settings = Settings()
        if args.command == "up":
            up(settings, cluster=args.cluster)
        elif args.command == "down":
            down(settings)
        elif args.command == "status":
            return 0 if status(settings) else 1
        elif args.command == "topics":
            topics(settings)
        elif args.command == "browser":
            ensure_browser()
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
