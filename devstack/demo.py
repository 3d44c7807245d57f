"""``make demo``: the whole product story, end to end, on the local stack.

Two orgs and five members; a simulated agent runtime spends credits; allocations run out and
members draw 500-credit blocks from their org's pool; a member hits the tier's pool limit; the
pool drops below the auto-refill threshold, the payment system declines the refill, the pool
locks and members are paused (the pause signals are read back from ``credits.control.v1``); the
admin buys credits and raises a limit, debts are settled and members resume; the final dashboard
per org is printed; then the billing month closes and the invoices appear.

Every act publishes real AdminCommand/UsageEvent JSON to Kafka and runs the real worker
(``worker.runner.run_worker``, bounded: it stops once the topics are idle), so what is printed is
what the worker decided. Timestamps are fixed (March 2026), so the numbers are the same on every
run. Each run uses its own topics (``demo<id>.credits.*``), PostgreSQL schema and a flushed
Redis database, so it can be repeated and never touches production-named topics.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson

from bench.workload import Commands, Message, produce_messages, topic_partitions, usage_event
from worker.config import Settings

T0 = datetime(2026, 3, 2, tzinfo=UTC)
"""Org creation and the start of the first billing cycle (anchor day 2)."""


def at(hours: float = 0, minutes: float = 0) -> datetime:
    """A moment on the demo's fixed clock, relative to ``T0``."""
    return T0 + timedelta(hours=hours, minutes=minutes)


def credits(mc: int | str | None) -> str:
    """Display an amount: millicredits (int) or a wire decimal string."""
    if mc is None:
        return "-"
    value = Decimal(mc) if isinstance(mc, str) else Decimal(mc) / 1000
    return f"{value:,.3f}".rstrip("0").rstrip(".")


# --- output ------------------------------------------------------------------------------------


class Out:
    """Readable terminal output: act headers, narration and simple tables."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream or sys.stdout
        self.act = 0

    def line(self, text: str = "") -> None:
        print(text, file=self.stream, flush=True)

    def header(self, title: str) -> None:
        self.act += 1
        self.line()
        self.line(f"== Act {self.act}: {title} " + "=" * max(0, 70 - len(title)))

    def say(self, text: str) -> None:
        self.line(f"   {text}")

    def table(self, head: Sequence[str], rows: Sequence[Sequence[Any]], indent: int = 3) -> None:
        cells = [[str(c) for c in head]] + [
            [("-" if c is None else str(c)) for c in r] for r in rows
        ]
        widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
        pad = " " * indent
        self.line(pad + "  ".join(c.ljust(widths[i]) for i, c in enumerate(cells[0])))
        self.line(pad + "  ".join("-" * w for w in widths))
        for r in cells[1:]:
            self.line(
                pad
                + "  ".join(
                    c.rjust(widths[i]) if _numeric(c) else c.ljust(widths[i])
                    for i, c in enumerate(r)
                )
            )


def _numeric(text: str) -> bool:
    return bool(text) and text.replace(",", "").replace(".", "").replace("-", "").isdigit()


# --- the environment ---------------------------------------------------------------------------


def demo_settings(base: Settings, run_id: str) -> Settings:
    """Settings of one demo run: own topics, group, Postgres schema and Redis key prefix."""
    return base.namespaced(f"demo{run_id}", tick_interval_seconds=0.0, http_port=0)


class Outputs:
    """Reads what the worker published (control, notifications, billing, dead letters)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topics = [
            settings.topic_control,
            settings.topic_notifications,
            settings.topic_billing,
            settings.topic_usage_dlq,
            settings.topic_admin_dlq,
        ]
        self._consumer: Any = None
        self.latest_control: dict[tuple[str, str], dict[str, Any]] = {}

    async def start(self) -> None:
        from aiokafka import AIOKafkaConsumer

        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka_bootstrap, enable_auto_commit=False
        )
        await self._consumer.start()
        parts = []
        for topic in self.topics:
            parts.extend(await topic_partitions(self._consumer, topic))
        self._consumer.assign(parts)
        await self._consumer.seek_to_beginning(*parts)

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()

    async def new_records(self) -> dict[str, list[tuple[bytes | None, dict[str, Any], Any]]]:
        """Everything published since the last call, per topic, in offset order per partition."""
        c = self._consumer
        parts = list(c.assignment())
        end = await c.end_offsets(parts)
        out: dict[str, list[tuple[bytes | None, dict[str, Any], Any]]] = {
            t: [] for t in self.topics
        }
        deadline = time.monotonic() + 10
        while [tp for tp in parts if await c.position(tp) < end[tp]]:
            if time.monotonic() > deadline:
                break
            batch = await c.getmany(timeout_ms=200)
            for tp, records in sorted(batch.items(), key=lambda kv: kv[0].partition):
                for r in records:
                    try:
                        value = orjson.loads(r.value) if r.value is not None else {}
                    except orjson.JSONDecodeError:
                        value = {"raw": r.value[:80].decode("utf-8", "replace")}
                    out[tp.topic].append((r.key, value, r.headers))
        for _, value, _ in out[self.settings.topic_control]:
            self.latest_control[(value.get("org_id", ""), value.get("member_id", ""))] = value
        return out


class DemoInterrupted(Exception):
    """SIGINT/SIGTERM arrived: the story stops after the current act."""


class Demo:
    """Drives the story: publish, run the worker until idle, show what came out."""

    def __init__(self, settings: Settings, out: Out, idle_exit: float, engine: Any) -> None:
        self.s = settings
        self.engine = engine
        self.out = out
        self.idle_exit = idle_exit
        self.cmd = Commands(prefix="demo-cmd")
        self.outputs = Outputs(settings)
        self._event_n = 0
        self.refill_requests: list[dict[str, Any]] = []
        self.stopping = asyncio.Event()

    def install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, self.stopping.set)

    # publishing
    async def admin(self, *msgs: Message) -> None:
        await produce_messages(self.s.kafka_bootstrap, self.s.topic_admin, msgs)

    def usage(self, org: str, member: str, amount_credits: float, when: datetime) -> Message:
        self._event_n += 1
        mc = int(Decimal(str(amount_credits)) * 1000)
        task = f"task-{member}-{self._event_n:03d}"
        return usage_event(f"demo-ev-{self._event_n:05d}", org, member, mc, when, task)

    async def send_usage(self, msgs: Sequence[Message]) -> None:
        await produce_messages(self.s.kafka_bootstrap, self.s.topic_usage, msgs)

    # running the worker
    async def process(self) -> dict[str, list[tuple[bytes | None, dict[str, Any], Any]]]:
        """Run the worker until it has applied everything published so far, then show effects."""
        from worker.runner import run_worker

        started = time.monotonic()
        # The worker takes over SIGINT/SIGTERM while it runs (finishing its batch) and drops
        # them when it returns; the demo's own handlers make Ctrl-C end the whole story.
        await run_worker(
            self.s, idle_exit_seconds=self.idle_exit, engine=self.engine, stop=self.stopping
        )
        self.install_signals()
        if self.stopping.is_set():
            raise DemoInterrupted
        records = await self.outputs.new_records()
        self.out.line(f"   (worker ran {time.monotonic() - started:.1f} s)")
        self.show(records)
        return records

    def show(self, records: dict[str, list[tuple[bytes | None, dict[str, Any], Any]]]) -> None:
        s = self.s
        signals = records[s.topic_control]
        if signals:
            self.out.say("signals on credits.control.v1:")
            self.out.table(
                ("signal", "org", "member", "reason", "seq", "issued_at"),
                [
                    (
                        v.get("signal", "").upper(),
                        v.get("org_id"),
                        v.get("member_id"),
                        v.get("reason"),
                        v.get("seq"),
                        v.get("issued_at"),
                    )
                    for _, v, _ in signals
                ],
                indent=6,
            )
        notes = records[s.topic_notifications]
        if notes:
            self.out.say("notifications on credits.notifications.v1:")
            self.out.table(
                ("type", "org", "member", "detail"),
                [
                    (
                        v.get("type"),
                        v.get("org_id"),
                        v.get("member_id"),
                        ", ".join(f"{k}={val}" for k, val in (v.get("detail") or {}).items()),
                    )
                    for _, v, _ in notes
                ],
                indent=6,
            )
        billing = records[s.topic_billing]
        for _, v, _ in billing:
            if v.get("type") == "refill_request":
                self.refill_requests.append(v)
                self.out.say(
                    f"billing: REFILL REQUEST {v.get('request_id')} for {v.get('org_id')}: "
                    f"{credits(v.get('credits'))} credits (USD cents {v.get('amount_usd_cents')})"
                )
            elif v.get("type") == "invoice":
                self.out.say(
                    f"billing: INVOICE {v.get('org_id')} cycle {v.get('cycle_start')} .. "
                    f"{v.get('cycle_end')}: negative balance "
                    f"{credits(v.get('negative_balance_credits'))} credits = "
                    f"{v.get('amount_usd_cents')} US cents"
                )
            else:
                self.out.say(f"billing: {orjson.dumps(v).decode()}")
        for topic in (s.topic_usage_dlq, s.topic_admin_dlq):
            for key, _value, headers in records[topic]:
                hdr = {k: bytes(val).decode("utf-8", "replace") for k, val in headers or ()}
                self.out.say(
                    f"dead letter on {topic.split('.', 1)[-1]}: {hdr.get('error.code')} "
                    f"({hdr.get('error.detail', '')[:60]}) key={key!r}"
                )

    # reading state
    async def dashboards(self, orgs: Sequence[str]) -> None:
        """The SPEC section 7 dashboard of each org, as ``GET /v1/orgs/{org}/credits`` serves it."""
        for org in orgs:
            view = await self.engine.dashboard(org)
            if view is None:
                self.out.say(f"{org}: unknown org")
                continue
            self.show_dashboard(view)

    def show_dashboard(self, view: dict[str, Any]) -> None:
        pool = view["pool"]
        self.out.line()
        self.out.say(
            f"org {view['org_id']}: cycle {view['cycle_start']} .. reset {view['reset_at']}"
        )
        self.out.say(
            f"pool balance {credits(pool['balance'])} credits, drawn this cycle "
            f"{credits(pool['used_this_cycle'])}, locked={pool['locked']}, "
            f"refill pending={pool['refill_pending']}"
        )
        self.out.table(
            (
                "member",
                "tier",
                "granted",
                "used",
                "remaining",
                "pool drawn",
                "pool limit",
                "debt",
                "state",
                "pause reason",
            ),
            [
                (
                    m["member_id"] + ("" if m.get("active", True) else " (removed)"),
                    m["tier"],
                    credits(m["granted"]),
                    credits(m["used"]),
                    credits(m["remaining"]),
                    credits(m["pool_drawn"]),
                    "none" if m["pool_limit"] is None else credits(m["pool_limit"]),
                    credits(m["negative_balance"]),
                    m["state"],
                    m.get("pause_reason"),
                )
                for m in view["members"]
            ],
        )

    def control_state(self) -> None:
        """The orchestrator's view: the latest record per member on the compacted topic."""
        rows = [
            (org, member, v.get("signal"), v.get("reason"), v.get("seq"))
            for (org, member), v in sorted(self.outputs.latest_control.items())
        ]
        if rows:
            self.out.table(("org", "member", "state", "reason", "seq"), rows)


# --- the story ---------------------------------------------------------------------------------


async def story(demo: Demo) -> None:
    out, cmd = demo.out, demo.cmd
    acme, globex = "acme", "globex"

    out.header("set up two orgs (admin panel)")
    out.say("acme:   alice (pro, 500 credits/cycle), bob (pro), carol (max, 15,000/cycle);")
    out.say("        pro members may draw at most 1,000 credits from the pool per cycle;")
    out.say("        pool funded with 2,000 credits; auto-refill: below 800, add 1,500,")
    out.say("        at most 1,500 per month.")
    out.say("globex: dave (max), erin (pro); pro members may not draw from the pool (limit 0);")
    out.say("        pool funded with 10,000 credits.")
    await demo.admin(
        cmd.org_upsert(acme, at(), anchor_day=2),
        cmd.member_add(acme, "alice", "pro", at()),
        cmd.member_add(acme, "bob", "pro", at()),
        cmd.member_add(acme, "carol", "max", at()),
        cmd.tier_limit_set(acme, "pro", 1_000_000, at()),
        cmd.pool_purchase(acme, 2_000_000, at()),
        cmd.auto_refill_set(
            acme,
            at(),
            enabled=True,
            threshold_mc=800_000,
            amount_mc=1_500_000,
            monthly_limit_mc=1_500_000,
        ),
        cmd.org_upsert(globex, at(), anchor_day=2),
        cmd.member_add(globex, "dave", "max", at()),
        cmd.member_add(globex, "erin", "pro", at()),
        cmd.tier_limit_set(globex, "pro", 0, at()),
        cmd.pool_purchase(globex, 10_000_000, at()),
    )
    await demo.process()
    await demo.dashboards([acme, globex])

    out.header("the agent runtime reports a morning of tasks")
    out.say("alice runs 4 tasks of 150 credits: her 500 run out, she draws a 500-credit block.")
    out.say("bob runs 8 tasks of 200 credits: 500 allocation + two blocks reach his 1,000 limit;")
    out.say("the last 100 credits become debt and bob is paused (member_limit_reached).")
    out.say("bob's second block leaves acme's pool at 500, below 800: a refill is requested.")
    out.say("erin (globex, limit 0) runs 3 tasks of 180: 40 credits of debt, paused.")
    out.say("carol and dave work within their 15,000-credit allocations.")
    msgs: list[Message] = []
    for i in range(4):
        msgs.append(demo.usage(acme, "alice", 150, at(9, 10 * i)))
    for i in range(8):
        msgs.append(demo.usage(acme, "bob", 200, at(9, 5 + 5 * i)))
    for i in range(3):
        msgs.append(demo.usage(acme, "carol", 1200, at(9, 3 + 7 * i)))
        msgs.append(demo.usage(globex, "dave", 900, at(9, 4 + 7 * i)))
        msgs.append(demo.usage(globex, "erin", 180, at(9, 6 + 7 * i)))
    msgs.sort(key=lambda m: orjson.loads(m.value)["occurred_at"])
    await demo.send_usage(msgs)
    await demo.process()

    out.header("the payment system declines the refill")
    if demo.refill_requests:
        request = demo.refill_requests[-1]
        out.say(f"answering refill_result failed for request {request['request_id']}:")
        out.say("the admin is notified and the pool locks: no new blocks. Members who still")
        out.say("have allocation or block credits keep working; the next one who needs the")
        out.say("pool is paused with reason refill_failed.")
        await demo.admin(
            cmd.refill_result(request["org_id"], request["request_id"], "failed", at(10))
        )
        await demo.process()
    else:
        out.say("(no refill request was published; nothing to decline)")

    out.header("alice keeps working on a locked pool")
    out.say("3 tasks of 200: 400 left in her block, then the pool is locked: 200 of debt,")
    out.say("paused with reason refill_failed. bob asks his admin for more credits.")
    await demo.send_usage([demo.usage(acme, "alice", 200, at(10, 5 + 5 * i)) for i in range(3)])
    await demo.process()
    await demo.admin(cmd.credit_request(acme, "bob", 500_000, at(10, 30), note="release demo"))
    await demo.process()
    out.say("what the orchestrator now knows (latest record per member on the compacted topic):")
    demo.control_state()

    out.header("the admin buys credits and raises bob's limit")
    out.say("purchase of 3,000 credits: the pool unlocks, alice's debt is paid from a new block")
    out.say("(oldest debt first), alice resumes (funded). bob stays paused: his limit is used up.")
    out.say(
        "then bob's own limit goes to 2,000: his debt is settled and he resumes (limit_raised)."
    )
    await demo.admin(cmd.pool_purchase(acme, 3_000_000, at(11)))
    await demo.process()
    await demo.admin(cmd.member_limit_set(acme, "bob", 2_000_000, at(11, 5)))
    await demo.process()
    demo.control_state()

    out.header("dashboards at the end of the day (GET /v1/orgs/{org}/credits)")
    await demo.dashboards([acme, globex])

    out.header("the billing month closes (scheduler tick on 2 April)")
    out.say("allocations reset, leftover blocks return to the pool, each org gets one invoice for")
    out.say("the closed cycle (its members' debt; zero is invoiced too, to prove the close), and")
    out.say("members paused only for lack of credits resume at once (cycle_reset).")
    close = T0 + timedelta(days=31, seconds=1)
    await demo.admin(cmd.tick(acme, close), cmd.tick(globex, close))
    await demo.process()
    await demo.dashboards([acme, globex])


async def _ensure(settings: Settings) -> None:
    from devstack.stack import ensure_topics

    await ensure_topics(settings)


async def _cleanup(settings: Settings) -> None:
    import asyncpg

    from devstack.stack import delete_topics, topic_names

    with contextlib.suppress(Exception):
        await delete_topics(settings, list(topic_names(settings).values()))
    with contextlib.suppress(Exception):
        conn = await asyncpg.connect(settings.postgres_dsn.get_secret_value())
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{settings.postgres_schema}" CASCADE')
        finally:
            await conn.close()
    with contextlib.suppress(Exception):
        await _delete_redis_keys(settings)


async def _delete_redis_keys(settings: Settings) -> None:
    """Remove the run's Redis keys (all under its own key prefix)."""
    from worker.connections import redis_client

    client = redis_client(settings)
    try:
        keys = [k async for k in client.scan_iter(match=f"{settings.redis_key_prefix}:*")]
        for key in keys:  # one by one: on a cluster, orgs live in different slots
            await client.unlink(key)
    finally:
        await client.aclose()


def _port(preferred: int) -> int:
    """``preferred`` if free on 127.0.0.1, else any free port."""
    import socket

    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise OSError("no free port")


async def serve(demo: Demo, port: int) -> None:
    """The admin page over the demo's data, with a worker applying what it publishes, until
    Ctrl-C. Prints the page's URL with a fresh operator token."""
    import secrets

    import asyncpg
    from aiohttp import web
    from pydantic import SecretStr

    from worker.admin_commands import AdminPublisher
    from worker.admin_store import PgAdminHistory
    from worker.api import PgLedgerReader, create_app
    from worker.connections import pg_connect_kwargs
    from worker.runner import run_worker

    token = secrets.token_urlsafe(18)
    read_token = secrets.token_urlsafe(18)
    grants = {token: "*", read_token: {"org": "acme", "role": "read"}}
    settings = demo.s.model_copy(update={"api_tokens": SecretStr(orjson.dumps(grants).decode())})
    pool = await asyncpg.create_pool(**pg_connect_kwargs(settings), min_size=1, max_size=2)
    publisher = AdminPublisher(settings)
    app = create_app(
        settings,
        engine=demo.engine,
        ledger=PgLedgerReader(pool, settings.postgres_schema),
        admin_history=PgAdminHistory(pool, settings.postgres_schema),
        admin_sink=publisher,
    )
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = _port(port)
    await web.TCPSite(runner, "127.0.0.1", port).start()
    worker = asyncio.create_task(run_worker(settings, stop=demo.stopping, engine=demo.engine))
    out = demo.out
    out.header("the admin page (Ctrl-C to stop)")
    out.say(f"admin (operator token): http://127.0.0.1:{port}/orgs/acme?token={token}")
    out.say(f"read-only, acme only:   http://127.0.0.1:{port}/orgs/acme?token={read_token}")
    out.say("             and globex: " + f"http://127.0.0.1:{port}/orgs/globex?token={token}")
    out.say("changes made on the page are applied by a worker running beside it; the page's")
    out.say("commands carry the wall-clock time, so the org clock jumps from March to today.")
    try:
        await worker
    finally:
        await runner.cleanup()
        await publisher.close()
        await pool.close()


async def run_demo(
    base: Settings,
    *,
    keep: bool = False,
    idle_exit: float = 1.5,
    engine_factory: Callable[[Settings], Any] | None = None,
    serve_port: int | None = None,
) -> int:
    """Run the story against the services ``base`` points at; returns an exit status."""
    from worker.runner import make_engine

    run_id = datetime.now(UTC).strftime("%m%d%H%M%S")
    settings = demo_settings(base, run_id)
    out = Out()
    out.line("credit metering demo")
    out.line(
        f"   topics {settings.topic_usage.rsplit('.', 3)[0]}.*, Postgres schema "
        f"{settings.postgres_schema}, Redis keys {settings.redis_key_prefix}:*; org clock starts "
        f"{T0:%Y-%m-%d}"
    )
    await _ensure(settings)
    # One engine for the whole story: every act's worker run and the dashboards share it.
    engine = (engine_factory or make_engine)(settings)
    demo = Demo(settings, out, idle_exit, engine)
    await demo.outputs.start()
    demo.install_signals()
    status = 0
    try:
        await story(demo)
        if serve_port is not None:
            await serve(demo, serve_port)
    except DemoInterrupted:
        out.line()
        out.line("interrupted: the current act was finished and committed; stopping here.")
        status = 130
    finally:
        await demo.outputs.stop()
        await engine.close()
        if not keep:
            await _cleanup(settings)
    if status == 0:
        out.line()
        out.line("done.")
    return status


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m devstack.demo", description=__doc__.split("\n")[0])
    p.add_argument("--keep", action="store_true", help="keep the demo's topics and schema")
    p.add_argument(
        "--idle-exit",
        type=float,
        default=1.5,
        help="seconds without input after which each worker run stops (default 1.5)",
    )
    p.add_argument("--verbose", action="store_true", help="show the worker's own log lines")
    p.add_argument(
        "--serve",
        nargs="?",
        type=int,
        const=8080,
        metavar="PORT",
        help="then serve the admin page on 127.0.0.1:PORT (default 8080, else a free port) "
        "with a worker beside it, printing its URL with a token, until Ctrl-C",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    if not args.verbose:
        # Fresh topics elect their leaders a moment after creation; the client's retries of
        # that moment are noise in a demo.
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    base = Settings()
    if not args.verbose:
        base = base.model_copy(update={"log_level": "WARNING"})
    try:
        import uvloop
    except ImportError:
        return asyncio.run(
            run_demo(base, keep=args.keep, idle_exit=args.idle_exit, serve_port=args.serve)
        )
    return uvloop.run(
        run_demo(base, keep=args.keep, idle_exit=args.idle_exit, serve_port=args.serve)
    )


if __name__ == "__main__":
    sys.exit(main())
