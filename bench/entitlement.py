"""Entitlement benchmark (``make bench-entitlement``): requests/s and latency of the agent
runtime's check before a task, at a steady target rate against a running API process.

    .venv/bin/python -m bench.entitlement [--rate 2000] [--seconds 15] [--orgs 5]
        [--members 200] [--batch-rate 20] [--batch-size 100]

Setup: ``--orgs`` orgs x ``--members`` ``pro`` members applied by the production engine under a
Redis key prefix of this run's own (the local stack's Redis); one member in ten is paused (its
allocation spent, an empty pool), so both answers are exercised. The API runs as its own
process (``worker.api.create_app`` on aiohttp, uvloop when installed, the engine's Redis
client), the load comes from this process.

Open loop: request ``i`` is due at ``start + i / rate`` whatever earlier requests did, and its
latency counts from that moment (a slow answer delays nothing else and is not hidden by the
client waiting for it). A request still waiting when the run ends counts as missing. The load
comes from plain keep-alive HTTP/1.1 connections (``--connections``, one request at a time
each), so the load generator takes a small share of the two cores. Runs: the
single form ``GET .../members/{member_id}/entitlement`` at ``--rate``, then ``POST
/v1/entitlements`` with ``--batch-size`` members per request at ``--batch-rate``. The first
``--warmup`` seconds of each run are left out of the figures. Prints a line per second and a
table; writes nothing. Every Redis key of the run is removed at the end.

``--worker-rate R``: the same runs while a worker takes ``R`` usage events/s (``bench.latency``
started as a subprocess, its own topics, schema and keys; its members pause as they run out),
so the checks share the cores with the pipeline they sit beside in production. Its pause
latency is printed with the table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from bench.e2e import _free_port, _proc_cpu_s, delete_redis_keys, log
from bench.latency import percentiles
from worker.config import Settings

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "bench-entitlement-token"
T0 = "2026-11-03T09:00:00Z"


@dataclass
class Run:
    name: str
    rate: float
    per_request: int
    latencies: list[float] = field(default_factory=list)
    sent: int = 0
    answered: int = 0
    errors: int = 0
    missing: int = 0
    seconds: float = 0.0
    allowed: int = 0
    denied: int = 0
    api_cpu: float = 0.0
    client_cpu: float = 0.0


def _items(orgs: int, members: int) -> dict[str, list[Any]]:
    """Admin commands and usage per org, as the worker decodes them."""
    from schemas import Rejection, decode_admin
    from worker.model import CommandItem, UsageItem

    base_ms = 1_793_696_400_000  # T0
    out: dict[str, list[Any]] = {}
    for o in range(orgs):
        org_id = f"bench-org-{o}"
        raws: list[dict[str, Any]] = [{"type": "org_upsert", "billing_anchor_day": 1}]
        raws += [{"type": "member_add", "member_id": f"m{m:05d}", "tier": "pro"}
                 for m in range(members)]  # fmt: skip
        items: list[Any] = []
        for n, raw in enumerate(raws):
            raw |= {"command_id": f"{org_id}-c{n}", "org_id": org_id, "at": T0}
            rec = decode_admin(orjson.dumps(raw), now_ms=base_ms + 3_600_000, tiers=("pro",))
            assert not isinstance(rec, Rejection), rec
            items.append(CommandItem(command=rec.command, source="bench:0", offset=n))
        for m in range(0, members, 10):  # one in ten spends past its allocation: paused
            n = len(items)
            items.append(
                UsageItem(f"{org_id}-e{m}", f"m{m:05d}", "t", 600_000, base_ms, "bench:0", n)
            )
        out[org_id] = items
    return out


async def setup(s: Settings, orgs: int, members: int) -> None:
    from worker.engine import RedisEngine

    engine = RedisEngine.from_settings(s)
    try:
        for org_id, items in _items(orgs, members).items():
            result = await engine.apply(org_id, items)
            assert all(o.status == "applied" for o in result.outcomes), result.outcomes[:3]
    finally:
        await engine.close()


async def serve(port: int) -> None:
    """The API process: ``create_app`` with the engine as its entitlement source."""
    from aiohttp import web

    from worker.api import create_app
    from worker.engine import RedisEngine

    s = Settings()
    engine = RedisEngine.from_settings(s)
    app = create_app(s, engine=engine, entitlements=engine)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, reuse_port=True).start()
    print("ready", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        await engine.close()


async def start_servers(s: Settings, port: int, count: int) -> list[asyncio.subprocess.Process]:
    """``count`` API processes on one port (``SO_REUSEPORT``: the kernel spreads the
    connections over them), as ``metering api`` processes would run."""
    return [await start_server(s, port) for _ in range(count)]


async def start_server(s: Settings, port: int) -> asyncio.subprocess.Process:
    env = dict(os.environ)
    env.update(
        {
            "METERING_REDIS_URL": s.redis_url.get_secret_value(),
            "METERING_REDIS_KEY_PREFIX": s.redis_key_prefix,
            "METERING_API_TOKENS": orjson.dumps({TOKEN: "*"}).decode(),
            "METERING_LOG_LEVEL": "WARNING",
        }
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.entitlement", "--serve", str(port),
        cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 30)
    if line.strip() != b"ready":
        raise SystemExit("the API process did not start")
    return proc


class Conn:
    """One keep-alive HTTP/1.1 connection of the load generator: one request at a time, the
    response read by its ``Content-Length``. Far cheaper per request than a client library,
    so the machine's cores go to the API under test, not to the load."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Conn:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
                break
        body = await self.reader.readexactly(length) if length else b""
        return status, body

    def close(self) -> None:
        self.writer.close()


def http_request(method: str, path: str, body: bytes | None, port: int) -> bytes:
    """The bytes of one request with the run's token."""
    lines = [
        f"{method} {path} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        f"Authorization: Bearer {TOKEN}",
    ]
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


async def one_run(
    conns: list[Conn],
    run: Run,
    request: Any,
    seconds: float,
    warmup: float,
) -> None:
    """Send ``request(i)`` (request bytes) at ``run.rate`` for ``seconds`` over ``conns``;
    record latencies after ``warmup``. A request waits for a free connection when all are
    busy, its latency still counted from its due time."""
    total = int(run.rate * seconds)
    start = time.perf_counter() + 0.05
    recent: list[float] = []
    due_q: asyncio.Queue[tuple[int, float]] = asyncio.Queue()
    busy = 0

    async def serve_queue(conn: Conn) -> None:
        nonlocal busy
        while True:
            i, due = await due_q.get()
            if i < 0:
                return
            busy += 1
            try:
                status, raw = await conn.request(request(i))
            except Exception:
                run.errors += 1
                return
            finally:
                busy -= 1
                due_q.task_done()
            if status != 200:
                run.errors += 1
                continue
            took = time.perf_counter() - due
            run.answered += 1
            recent.append(took)
            if due - start >= warmup:
                run.latencies.append(took)
                if run.per_request == 1:
                    if orjson.loads(raw)["allowed"]:
                        run.allowed += 1
                    else:
                        run.denied += 1

    workers = [asyncio.create_task(serve_queue(c)) for c in conns]
    next_report = start + 1.0
    i = 0
    while i < total:
        now = time.perf_counter()
        # Everything due by now goes out at once: timers have a granularity of about 1 ms, so
        # one sleep per request would cap the rate near 1,000/s.
        while i < total and start + i / run.rate <= now:
            due_q.put_nowait((i, start + i / run.rate))
            i += 1
        run.sent = i
        if now >= next_report:
            last = sorted(recent) or [float("nan")]
            recent.clear()
            log(
                f"  {run.name}: {run.sent:,} sent, {run.answered:,} answered, {run.errors} "
                f"errors, {due_q.qsize() + busy} in flight, last second p50 "
                f"{last[len(last) // 2] * 1000:.1f} ms"
            )
            next_report += 1.0
        # At least a millisecond: a shorter sleep returns at once and the loop would spin.
        await asyncio.sleep(max(0.001, start + i / run.rate - time.perf_counter()))
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(due_q.join(), 5.0)
    run.missing = due_q.qsize() + busy
    for w in workers:
        w.cancel()
    await asyncio.gather(*workers, return_exceptions=True)
    run.seconds = time.perf_counter() - start


def render(runs: list[Run], argv: list[str], orgs: int, members: int) -> str:
    lines = [
        f"`python -m bench.entitlement {' '.join(argv)}`: {orgs} orgs x {members} members, "
        "API in processes of its own, open-loop load from this one, latency from each "
        "request's due time (warm-up left out).",
        "",
        "| run | target req/s | achieved req/s | members/s | p50 ms | p90 ms | p99 ms | max ms "
        "| errors | missing | API processes CPU | load generator CPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        p = percentiles(r.latencies)
        achieved = r.answered / r.seconds if r.seconds else 0.0
        lines.append(
            f"| {r.name} | {r.rate:,.0f} | {achieved:,.0f} | {achieved * r.per_request:,.0f} "
            f"| {p['p50']:.1f} | {p['p90']:.1f} | {p['p99']:.1f} | {p['max']:.1f} "
            f"| {r.errors} | {r.missing} | {r.api_cpu / r.seconds:.0%} "
            f"| {r.client_cpu / r.seconds:.0%} |"
        )
    lines.append("")
    lines.append(
        "CPU: share of one core over the run. When the API process is near 100% it is the "
        "limit; when the achieved rate trails the target with both below, the machine is busy."
    )
    single = next((r for r in runs if r.per_request == 1), None)
    if single is not None and single.allowed + single.denied:
        lines.append("")
        lines.append(f"single: {single.allowed:,} allowed, {single.denied:,} not allowed")
    return "\n".join(lines) + "\n"


async def start_worker_load(rate: float, seconds: float) -> asyncio.subprocess.Process:
    """``bench.latency`` at ``rate`` events/s (a worker of its own, steady usage that pauses
    members), returned once its events flow: the checks are then measured beside it."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.latency", "--rate", f"{rate:g}",
        "--orgs", str(max(1, int(rate // 2))), "--members", "10", "--no-write",
        "--min-seconds", f"{seconds:g}",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    assert proc.stdout is not None
    while line := await proc.stdout.readline():
        text = line.decode().rstrip()
        log(f"  [worker load] {text}")
        if "producing" in text:
            return proc
    raise RuntimeError("the worker load ended before producing")


async def finish_worker_load(proc: asyncio.subprocess.Process) -> str:
    """The worker load's own pause-latency line, once it ends."""
    assert proc.stdout is not None
    found = ""
    while line := await proc.stdout.readline():
        text = line.decode().rstrip()
        if "pause p99" in text:
            found = text.split("]", 1)[-1].strip()
            log(f"  [worker load] {found}")
    await proc.wait()
    return found


async def main_async(a: argparse.Namespace, argv: list[str]) -> int:
    s = Settings().namespaced(f"benchent{uuid.uuid4().hex[:6]}")
    log(f"setup: {a.orgs} orgs x {a.members} members under Redis prefix {s.redis_key_prefix}")
    await setup(s, a.orgs, a.members)
    port = _free_port()
    procs = await start_servers(s, port, a.api_processes)
    load: asyncio.subprocess.Process | None = None
    load_line = ""
    rng = random.Random(7)
    pairs = [(f"bench-org-{o}", f"m{m:05d}") for o in range(a.orgs) for m in range(a.members)]
    runs: list[Run] = []
    conns: list[Conn] = []
    try:
        conns = [await Conn.open(port) for _ in range(a.connections)]

        def single(i: int) -> bytes:
            org_id, member_id = pairs[rng.randrange(len(pairs))]
            return singles[(org_id, member_id)]

        singles = {
            (o, m): http_request("GET", f"/v1/orgs/{o}/members/{m}/entitlement", None, port)
            for o, m in pairs
        }
        batches = [
            http_request(
                "POST",
                "/v1/entitlements",
                orjson.dumps(
                    {
                        "items": [
                            {"org_id": o, "member_id": m}
                            for o, m in rng.sample(pairs, min(a.batch_size, len(pairs)))
                        ]
                    }
                ),
                port,
            )
            for _ in range(50)
        ]

        def batch(i: int) -> bytes:
            return batches[i % len(batches)]

        # A few requests first on every connection: connections warm, the script is loaded.
        for conn in conns:
            status, _ = await conn.request(single(0))
            assert status == 200, status
        if a.worker_rate > 0:
            runs_s = a.seconds * (1 + (a.batch_rate > 0))
            log(f"worker load: {a.worker_rate:,.0f} usage events/s into a running worker ...")
            load = await start_worker_load(a.worker_rate, runs_s + 5)
        for name, rate, per, request in (
            ("single", a.rate, 1, single),
            (f"batch of {a.batch_size}", a.batch_rate, a.batch_size, batch),
        ):
            if rate <= 0:
                continue
            run = Run(name, rate, per)
            log(f"{name}: {rate:,.0f} requests/s for {a.seconds:.0f} s ...")
            api0, client0 = sum(_proc_cpu_s(p.pid) for p in procs), time.process_time()
            await one_run(conns, run, request, a.seconds, a.warmup)
            run.api_cpu = sum(_proc_cpu_s(p.pid) for p in procs) - api0
            run.client_cpu = time.process_time() - client0
            runs.append(run)
        if load is not None:
            load_line = await finish_worker_load(load)
            load = None
    finally:
        if load is not None and load.returncode is None:
            load.terminate()
            await load.wait()
        for conn in conns:
            conn.close()
        for p in procs:
            p.terminate()
        for p in procs:
            await p.wait()
        deleted = await delete_redis_keys(s)
        log(f"removed {deleted} Redis keys")
    print("\n" + render(runs, argv, a.orgs, a.members))
    if a.worker_rate > 0:
        print(
            f"Beside a worker taking {a.worker_rate:,.0f} usage events/s (bench.latency, members"
            f" paused as their allocations run out): {load_line or 'its figures were not read'}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--rate", type=float, default=2_000.0, help="single-form requests/s")
    p.add_argument("--seconds", type=float, default=15.0, help="length of each run")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds left out of the figures")
    p.add_argument("--orgs", type=int, default=5)
    p.add_argument("--members", type=int, default=200, help="members per org")
    p.add_argument("--batch-rate", type=float, default=20.0, help="batch requests/s (0: none)")
    p.add_argument("--batch-size", type=int, default=100, help="members per batch request")
    p.add_argument("--connections", type=int, default=64, help="client connections")
    p.add_argument("--api-processes", type=int, default=1, help="API processes sharing the port")
    p.add_argument(
        "--worker-rate",
        type=float,
        default=0.0,
        help="measure while a worker takes this many usage events/s (bench.latency's load)",
    )
    p.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    coro = serve(a.serve) if a.serve is not None else main_async(a, argv)
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
        return 0
    uvloop.run(coro)
    return 0


if __name__ == "__main__":
    sys.exit(main())
