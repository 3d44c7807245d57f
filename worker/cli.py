"""The ``metering`` command: operate the worker and administer orgs.

Read-only: ``lag`` (the consumer group's per-partition lag), ``org show ORG`` (the dashboard in
the terminal), ``check-config``. Admin commands (``org create``, ``member add|remove|tier``,
``limit tier|member``, ``pool purchase``, ``refill set|result``, ``promo grant``, ``credit
request``, ``tick``) validate their input and publish one AdminCommand to the admin topic,
keyed by org, with a fresh ``command_id``; the worker applies it (each ``command_id`` at most
once, so retrying with ``--command-id`` is safe). Process commands (``worker``, ``api``,
``migrate``, ``rebuild``, ``stack``) delegate to their modules, imported only when used.

Every command takes ``--json`` for machine-readable output. Exit status: 0 success, 1 failure
at run time (a service unreachable, an unknown org), 2 invalid arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import importlib
import inspect
import logging
import sys
import uuid
from collections.abc import Callable, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any, NoReturn, TextIO

import orjson
from pydantic import ValidationError
from pydantic_settings import SettingsError

from worker.admin_commands import (
    AdminPublisher,
    InvalidCommand,
    build_admin_command,
    check_admin_command,
    parse_credits,
    parse_limit,
    rfc3339,
)
from worker.config import Settings

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INCOMPLETE = 3
"""``metering worker`` stopped (SIGTERM, a failure) with batches it could not commit."""
KAFKA_TIMEOUT_SECONDS = 15.0


class CliError(Exception):
    """A failure to report as ``error: ...`` with an exit status (no traceback)."""

    def __init__(self, message: str, status: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.status = status


# --- Argument types ----------------------------------------------------------------------------
def credits_arg(text: str) -> str:
    """A positive credit amount with at most 3 decimals, kept as a decimal string."""
    try:
        return parse_credits(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def non_negative_credits_arg(text: str) -> str:
    """Like ``credits_arg`` but 0 is allowed (refill threshold)."""
    try:
        return parse_credits(text, allow_zero=True)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def limit_arg(allow_inherit: bool) -> Callable[[str], str | None]:
    """A pool limit: whole credits, ``none`` (no limit) or, for members, ``inherit``."""

    def parse(text: str) -> str | None:
        try:
            return parse_limit(text, allow_inherit=allow_inherit)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def timestamp_arg(text: str) -> str:
    """An RFC 3339 timestamp with a timezone (``Z`` or an offset)."""
    try:
        parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an RFC 3339 timestamp (e.g. 2026-12-31T23:59:59Z)"
        ) from None
    if parsed.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no timezone (add Z or +hh:mm)")
    return rfc3339(parsed)


def anchor_day_arg(text: str) -> int:
    """A billing anchor day 1..31."""
    try:
        day = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a day of the month") from None
    if not 1 <= day <= 31:
        raise argparse.ArgumentTypeError("anchor day must be 1..31")
    return day


# --- Admin commands ----------------------------------------------------------------------------
def validate_admin_command(command: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """Check a command with the worker's own admin decoder (``schemas.decode_admin``) before it
    is published, so what the CLI accepts the worker accepts; ``CliError`` (status 2) if not."""
    try:
        return check_admin_command(command, settings)
    except InvalidCommand as exc:
        raise CliError(str(exc), EXIT_USAGE) from None


async def publish_admin_command(settings: Settings, command: dict[str, Any]) -> dict[str, Any]:
    """Publish one AdminCommand to ``Settings.topic_admin`` keyed by org; returns its position."""
    publisher = AdminPublisher(settings, timeout_s=KAFKA_TIMEOUT_SECONDS)
    try:
        return await publisher.publish(command)
    except TimeoutError:
        raise CliError(
            f"Kafka at {settings.kafka_bootstrap} did not answer in {KAFKA_TIMEOUT_SECONDS:g} s"
        ) from None
    finally:
        await publisher.close()


def _admin_fields(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """The AdminCommand type and its fields for the parsed admin sub-command."""
    action = args.action
    if action == "org create":
        return "org_upsert", {"billing_anchor_day": args.anchor_day}
    if action == "member add":
        return "member_add", {"member_id": args.member, "tier": args.tier}
    if action == "member remove":
        return "member_remove", {"member_id": args.member}
    if action == "member tier":
        return "member_set_tier", {"member_id": args.member, "tier": args.tier}
    if action == "limit tier":
        return "tier_limit_set", {"tier": args.tier, "limit": args.limit}
    if action == "limit member":
        return "member_limit_set", {"member_id": args.member, "limit": args.limit}
    if action == "pool purchase":
        return "pool_purchase", {"credits": args.credits}
    if action == "refill set":
        return "auto_refill_set", {
            "enabled": args.enabled,
            "threshold": args.threshold,
            "amount": args.amount,
            "monthly_limit": args.monthly_limit,
        }
    if action == "refill result":
        return "refill_result", {"request_id": args.request_id, "status": args.status}
    if action == "promo grant":
        return "promo_grant", {
            "member_id": args.member,
            "grant_id": args.grant_id or f"promo-{uuid.uuid4()}",
            "credits": args.credits,
            "expires_at": args.expires_at,
        }
    if action == "credit request":
        fields: dict[str, Any] = {"member_id": args.member, "credits": args.credits}
        if args.note:
            fields["note"] = args.note
        return "credit_request", fields
    if action == "tick":
        return "tick", {}
    raise CliError(f"unknown admin action {action}", EXIT_USAGE)


def cmd_admin(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    """Build, validate and publish one admin command."""
    cmd_type, fields = _admin_fields(args)
    command = build_admin_command(
        cmd_type, args.org, fields, command_id=args.command_id, at=args.at
    )
    validate_admin_command(command, settings)
    if args.dry_run:
        _emit(out, args, {"command": command, "published": None}, orjson.dumps(command).decode())
        return EXIT_OK
    position = asyncio.run(publish_admin_command(settings, command))
    text = (
        f"published {cmd_type} for org {args.org}: command_id={command['command_id']} "
        f"({position['topic']}[{position['partition']}]@{position['offset']})"
    )
    _emit(out, args, {"command": command, "published": position}, text)
    return EXIT_OK


# --- Read-only commands ------------------------------------------------------------------------
def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain text table; numeric-looking columns are right-aligned."""
    cells = [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]

    def numeric(col: int) -> bool:
        values = [row[col] for row in cells if row[col] not in ("-", "none")]
        return bool(values) and all(_is_number(v) for v in values)

    right = [numeric(i) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right, strict=True)
        ]
        return "  ".join(parts).rstrip()

    out = [line(list(headers)), line(["-" * w for w in widths])]
    out.extend(line(row) for row in cells)
    return "\n".join(out)


def _is_number(text: str) -> bool:
    try:
        Decimal(text)
    except InvalidOperation:
        return False
    return True


def cmd_lag(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    """Print the consumer group's lag per partition."""
    from worker.lag import group_lag, postgres_offsets

    topics = args.topic or None

    async def lag_rows() -> list[Any]:
        processed = None
        if args.offsets != "kafka":
            try:
                processed = await postgres_offsets(settings, args.group)
            except Exception as exc:
                if args.offsets == "postgres":
                    raise CliError(f"cannot read offsets from PostgreSQL: {exc}") from None
                sys.stderr.write(f"note: PostgreSQL offsets unavailable ({exc}); Kafka only\n")
        return await group_lag(settings, args.group, topics, processed)

    try:
        rows = asyncio.run(asyncio.wait_for(lag_rows(), KAFKA_TIMEOUT_SECONDS * 2))
    except TimeoutError:
        raise CliError(f"Kafka at {settings.kafka_bootstrap} did not answer") from None
    except LookupError as exc:
        raise CliError(str(exc)) from None
    group = args.group or settings.consumer_group
    if args.json:
        out.write(
            orjson.dumps(
                {
                    "group": group,
                    "total_lag": sum(r.lag for r in rows),
                    "partitions": [r.as_dict() for r in rows],
                },
                option=orjson.OPT_INDENT_2,
            ).decode()
            + "\n"
        )
        return EXIT_OK
    table = format_table(
        ["TOPIC", "PARTITION", "COMMITTED", "END", "LAG", "MEMBER"],
        [(r.topic, r.partition, r.committed, r.end, r.lag, r.member) for r in rows],
    )
    out.write(f"group {group}\n{table}\ntotal lag {sum(r.lag for r in rows)}\n")
    return EXIT_OK


def render_org(data: dict[str, Any]) -> str:
    """The dashboard document of one org as terminal text."""
    pool = data.get("pool") or {}
    flags = [
        name
        for name, on in (
            ("LOCKED", pool.get("locked")),
            ("refill pending", pool.get("refill_pending")),
        )
        if on
    ]
    head = [
        f"org {data.get('org_id')}",
        f"cycle {data.get('cycle_start')} .. {data.get('reset_at')}",
        f"reset date {data.get('reset_at')}",
        f"pool balance {pool.get('balance')} credits, "
        f"used this cycle {pool.get('used_this_cycle')}"
        + (f" [{', '.join(flags)}]" if flags else ""),
        "",
    ]
    rows = []
    for m in data.get("members") or []:
        state = "removed" if not m.get("active", True) else str(m.get("state"))
        if m.get("pause_reason") and state == "paused":
            state = f"paused ({m['pause_reason']})"
        rows.append(
            (
                m.get("member_id"),
                m.get("tier"),
                m.get("granted"),
                m.get("used"),
                m.get("remaining"),
                m.get("pool_drawn"),
                "none" if m.get("pool_limit") is None else m.get("pool_limit"),
                m.get("negative_balance"),
                state,
            )
        )
    table = format_table(
        ["MEMBER", "TIER", "GRANTED", "USED", "REMAINING", "POOL DRAWN", "LIMIT", "DEBT", "STATE"],
        rows,
    )
    return "\n".join(head) + table + "\n"


async def _fetch_dashboard(settings: Settings, org_id: str) -> dict[str, Any] | None:
    from worker.api import close_engine, make_dashboard_engine

    engine = make_dashboard_engine(settings)
    try:
        result: dict[str, Any] | None = await engine.dashboard(org_id)
        return result
    finally:
        await close_engine(engine)


def cmd_org_show(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    """Print one org's dashboard (from Redis, the same source as the API)."""
    data = asyncio.run(_fetch_dashboard(settings, args.org))
    if data is None:
        raise CliError(f"unknown org {args.org!r}")
    if args.json:
        out.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        out.write(render_org(data))
    return EXIT_OK


def cmd_check_config(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    """Print the effective settings with secrets masked."""
    redacted = settings.redacted()
    if args.json:
        out.write(orjson.dumps(redacted, option=orjson.OPT_INDENT_2, default=str).decode() + "\n")
    else:
        for key, value in redacted.items():
            out.write(f"{key} = {value}\n")
        out.write("configuration OK\n")
    return EXIT_OK


# --- Delegating commands -----------------------------------------------------------------------
def _load(module: str, attr: str, command: str) -> Callable[..., Any]:
    """Import ``module.attr`` for ``command``; a clear error when that part is not installed."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and (exc.name == module or module.startswith(exc.name + ".")):
            raise CliError(
                f"`metering {command}` needs {module}, which this installation does not have"
            ) from None
        raise
    func = getattr(mod, attr, None)
    if func is None:
        raise CliError(f"`metering {command}` needs {module}.{attr}, which does not exist")
    return func  # type: ignore[no-any-return]


def _call(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    result = func(*args, **kwargs)
    if inspect.isawaitable(result):
        return asyncio.run(_await(result))
    return result


async def _await(awaitable: Any) -> Any:
    return await awaitable


def _run_async(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def cmd_worker(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    """Run the metering worker until SIGTERM."""
    run_worker = _load("worker.runner", "run_worker", "worker")
    bounds: dict[str, Any] = {}
    if getattr(args, "max_events", None) is not None:
        bounds["max_events"] = args.max_events
    if getattr(args, "idle_exit", None) is not None:
        bounds["idle_exit_seconds"] = args.idle_exit
    from worker.pipeline import ShutdownIncomplete, StartRefused

    try:
        result = run_worker(settings, **bounds)
        if inspect.isawaitable(result):
            _run_async(result)
    except StartRefused as exc:
        sys.stderr.write(f"metering: worker refused to start: {exc}\n")
        return EXIT_USAGE
    except ShutdownIncomplete as exc:
        # Safe (the next owner replays what was not committed), but an operator should know.
        sys.stderr.write(f"metering: worker stopped before committing everything: {exc}\n")
        return EXIT_INCOMPLETE
    return EXIT_OK


def cmd_api(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    """Serve the read API standalone."""
    from worker.api import run_api

    if args.port is not None:
        settings = settings.model_copy(update={"http_port": args.port})
    if args.host is not None:
        settings = settings.model_copy(update={"http_host": args.host})
    _run_async(run_api(settings))
    return EXIT_OK


def cmd_migrate(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    """Apply PostgreSQL migrations."""
    migrate = _load("worker.ledger", "migrate", "migrate")
    result = _call(migrate, settings)
    _emit(out, args, {"migrated": True, "result": result}, "migrations applied")
    return EXIT_OK


def cmd_rebuild(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    """Rebuild Redis state from the PostgreSQL ledger."""
    rebuild = _load("worker.recovery", "rebuild", "rebuild")
    kwargs: dict[str, Any] = {}
    if args.org:
        kwargs["org_ids"] = args.org
    result = _call(rebuild, settings, **kwargs)
    _emit(out, args, {"rebuilt": True, "result": result}, f"rebuild done: {result}")
    return EXIT_OK


def cmd_stack(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    """Delegate to ``python -m devstack.stack``."""
    main_func = _load("devstack.stack", "main", "stack")
    result = main_func(list(args.stack_args))
    return int(result or 0)


def _emit(out: TextIO, args: argparse.Namespace, payload: object, text: str) -> None:
    if getattr(args, "json", False):
        out.write(orjson.dumps(payload, option=orjson.OPT_INDENT_2, default=str).decode() + "\n")
    else:
        out.write(text + "\n")


# --- Parser ------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse with a hint to ``--help`` on errors."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n(see `{self.prog} --help`)\n")


def _common(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS keeps a sub-command's default from overriding ``metering --json <command>``.
    parser.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output"
    )


def _admin_common(parser: argparse.ArgumentParser) -> None:
    _common(parser)
    parser.add_argument(
        "--command-id",
        help="command id to use (default: a fresh one); reuse it to retry safely",
    )
    parser.add_argument(
        "--at",
        type=timestamp_arg,
        help="command time, RFC 3339 (default: now; at most 5 minutes in the future)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="validate and print the command, do not publish"
    )


def build_parser() -> argparse.ArgumentParser:
    """The full ``metering`` argument parser."""
    parser = _Parser(
        prog="metering",
        description="Operate the credit-metering worker and administer orgs. Settings come "
        "from METERING_* environment variables (see `metering check-config`).",
    )
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="validate the environment and print the settings (secrets masked), then exit",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable JSON output")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("lag", help="consumer lag per partition", description=cmd_lag.__doc__)
    _common(p)
    p.add_argument("--group", help="consumer group (default: METERING_CONSUMER_GROUP)")
    p.add_argument(
        "--topic", action="append", help="topic to report (repeatable; default: usage and admin)"
    )
    p.add_argument(
        "--offsets",
        choices=["auto", "kafka", "postgres"],
        default="auto",
        help="where processed offsets come from: the group's Kafka commits, the worker's "
        "PostgreSQL offsets, or auto (the later of both; Kafka only if PostgreSQL is down)",
    )
    p.set_defaults(func=cmd_lag)

    p = sub.add_parser("check-config", help="print the settings with secrets masked")
    _common(p)
    p.set_defaults(func=cmd_check_config)

    # org
    org = sub.add_parser("org", help="show or create an org", description="Org commands.")
    org_sub = org.add_subparsers(dest="org_command", metavar="ACTION", parser_class=_Parser)
    org_sub.required = True
    p = org_sub.add_parser("show", help="the org's dashboard in the terminal")
    _common(p)
    p.add_argument("org", metavar="ORG")
    p.set_defaults(func=cmd_org_show)
    p = org_sub.add_parser("create", help="create an org or change its billing anchor day")
    _admin_common(p)
    p.add_argument("org", metavar="ORG")
    p.add_argument(
        "--anchor-day", type=anchor_day_arg, required=True, help="billing anchor day, 1..31"
    )
    p.set_defaults(func=cmd_admin, action="org create")

    # member
    member = sub.add_parser("member", help="add, remove or re-tier a member")
    m_sub = member.add_subparsers(dest="member_command", metavar="ACTION", parser_class=_Parser)
    m_sub.required = True
    p = m_sub.add_parser("add", help="add a member with a seat tier")
    _admin_common(p)
    p.add_argument("org", metavar="ORG")
    p.add_argument("member", metavar="MEMBER")
    p.add_argument("--tier", required=True, help="seat tier (e.g. pro, max)")
    p.set_defaults(func=cmd_admin, action="member add")
    p = m_sub.add_parser("remove", help="remove a member (forfeits allocation, invoices debt)")
    _admin_common(p)
    p.add_argument("org", metavar="ORG")
    p.add_argument("member", metavar="MEMBER")
    p.set_defaults(func=cmd_admin, action="member remove")
    p = m_sub.add_parser("tier", help="change a member's seat tier")
    _admin_common(p)
    p.add_argument("org", metavar="ORG")
    p.add_argument("member", metavar="MEMBER")
    p.add_argument("tier", metavar="TIER")
    p.set_defaults(func=cmd_admin, action="member tier")

    # limit
    limit = sub.add_parser("limit", help="set pool usage limits per tier or member")
    l_sub = limit.add_subparsers(dest="limit_command", metavar="ACTION", parser_class=_Parser)
    l_sub.required = True
    p = l_sub.add_parser("tier", help="pool limit for every member of a tier")
    _admin_common(p)
    p.add_argument("org", metavar="ORG")
    p.add_argument("tier", metavar="TIER")
    p.add_argument(
        "limit", metavar="LIMIT|none", type=limit_arg(False), help="whole credits or none"
    )
    p.set_defaults(func=cmd_admin, action="limit tier")
    p = l_sub.add_parser("member", help="pool limit for one member")
    _admin_common(p)
    p.add_argument("org", metavar="ORG")
    p.add_argument("member", metavar="MEMBER")
    p.add_argument(
        "limit",
        metavar="LIMIT|none|inherit",
        type=limit_arg(True),
        help="whole credits, none (no limit) or inherit (the tier's)",
    )
    p.set_defaults(func=cmd_admin, action="limit member")

    # pool
    pool = sub.add_parser("pool", help="fund the org pool")
    p_sub = pool.add_subparsers(dest="pool_command", metavar="ACTION", parser_class=_Parser)
    p_sub.required = True
    p = p_sub.add_parser("purchase", help="add purchased credits to the pool")
    _admin_common(p)
    p.add_argument("org", metavar="ORG")
    p.add_argument("credits", metavar="CREDITS", type=credits_arg)
    p.set_defaults(func=cmd_admin, action="pool purchase")

    # refill
    refill = sub.add_parser("refill", help="auto-refill settings and results")
    r_sub = refill.add_subparsers(dest="refill_command", metavar="ACTION", parser_class=_Parser)
    r_sub.required = True
    p = r_sub.add_parser("set", help="configure auto-refill")
    _admin_common(p)
    p.add_argument("org", metavar="ORG")
    onoff = p.add_mutually_exclusive_group(required=True)
    onoff.add_argument("--enabled", dest="enabled", action="store_true")
    onoff.add_argument("--disabled", dest="enabled", action="store_false")
    p.add_argument("--threshold", type=non_negative_credits_arg, required=True)
    p.add_argument("--amount", type=credits_arg, required=True)
    p.add_argument("--monthly-limit", type=credits_arg, required=True)
    p.set_defaults(func=cmd_admin, action="refill set")
    p = r_sub.add_parser("result", help="report a refill payment result (payment system)")
    _admin_common(p)
    p.add_argument("org", metavar="ORG")
    p.add_argument("request_id", metavar="REQUEST_ID")
    p.add_argument("status", choices=["succeeded", "failed"])
    p.set_defaults(func=cmd_admin, action="refill result")

    # promo
    promo = sub.add_parser("promo", help="promotional credits")
    pr_sub = promo.add_subparsers(dest="promo_command", metavar="ACTION", parser_class=_Parser)
    pr_sub.required = True
    p = pr_sub.add_parser("grant", help="grant promotional credits to a member")
    _admin_common(p)
    p.add_argument("org", metavar="ORG")
    p.add_argument("member", metavar="MEMBER")
    p.add_argument("credits", metavar="CREDITS", type=credits_arg)
    p.add_argument("--expires-at", type=timestamp_arg, required=True, help="RFC 3339")
    p.add_argument("--grant-id", help="grant id (default: a fresh one)")
    p.set_defaults(func=cmd_admin, action="promo grant")

    # credit request
    credit = sub.add_parser("credit", help="member credit requests")
    c_sub = credit.add_subparsers(dest="credit_command", metavar="ACTION", parser_class=_Parser)
    c_sub.required = True
    p = c_sub.add_parser("request", help="record a member's request for more credits")
    _admin_common(p)
    p.add_argument("org", metavar="ORG")
    p.add_argument("member", metavar="MEMBER")
    p.add_argument("credits", metavar="CREDITS", type=credits_arg)
    p.add_argument("--note")
    p.set_defaults(func=cmd_admin, action="credit request")

    p = sub.add_parser("tick", help="advance an org's clock to now (closes due cycles)")
    _admin_common(p)
    p.add_argument("org", metavar="ORG")
    p.set_defaults(func=cmd_admin, action="tick")

    # processes
    p = sub.add_parser("worker", help="run the metering worker")
    p.add_argument(
        "--max-events",
        type=int,
        help="bounded run: stop after this many input records (default: METERING_MAX_EVENTS)",
    )
    p.add_argument(
        "--idle-exit",
        type=float,
        metavar="SECONDS",
        help="bounded run: stop when idle this long (default: METERING_IDLE_EXIT_SECONDS)",
    )
    p.set_defaults(func=cmd_worker)
    p = sub.add_parser("api", help="serve the read API and dashboard standalone")
    p.add_argument("--host", help="listen address (default: METERING_HTTP_HOST)")
    p.add_argument("--port", type=int, help="listen port (default: METERING_HTTP_PORT)")
    p.set_defaults(func=cmd_api)
    p = sub.add_parser("migrate", help="apply PostgreSQL migrations")
    _common(p)
    p.set_defaults(func=cmd_migrate)
    p = sub.add_parser("rebuild", help="rebuild Redis state from the PostgreSQL ledger")
    _common(p)
    p.add_argument("--org", action="append", help="only this org (repeatable; default: all)")
    p.set_defaults(func=cmd_rebuild)
    p = sub.add_parser(
        "stack", help="local Kafka/Redis/PostgreSQL (python -m devstack.stack)", add_help=False
    )
    p.add_argument("stack_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_stack)
    return parser


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None) -> int:
    """Entry point of ``metering`` and ``python -m worker``; returns the exit status."""
    out = out or sys.stdout
    argv = list(argv) if argv is not None else sys.argv[1:]
    if argv[:1] == ["stack"]:
        # Everything after "stack" belongs to devstack.stack, including its own --help.
        try:
            return int(_load("devstack.stack", "main", "stack")(argv[1:]) or 0)
        except CliError as exc:
            sys.stderr.write(f"metering: error: {exc}\n")
            return exc.status
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as exc:
        problems = "\n".join(
            f"  METERING_{'_'.join(str(p) for p in err['loc']).upper() or '?'}: {err['msg']}"
            for err in exc.errors()
        )
        sys.stderr.write(f"metering: invalid configuration:\n{problems}\n")
        return EXIT_USAGE
    except SettingsError as exc:
        from worker.config import settings_error_line

        sys.stderr.write(f"metering: invalid configuration:\n  {settings_error_line(exc)}\n")
        return EXIT_USAGE
    if args.check_config and args.command is None:
        return cmd_check_config(args, settings, out)
    if args.command is None:
        parser.print_help(out)
        return EXIT_USAGE

    from worker.logging import setup_logging

    setup_logging(settings)
    if args.func not in (cmd_worker, cmd_api, cmd_stack):
        # One-shot commands report connection failures themselves, in one line.
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    try:
        return int(args.func(args, settings, out))
    except CliError as exc:
        sys.stderr.write(f"metering: error: {exc}\n")
        return exc.status
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        sys.stderr.write(f"metering: error: {exc}\n")
        return EXIT_FAILURE
    except Exception as exc:
        # Connection failures from the clients surface as library-specific errors; show the
        # message, not a traceback (set METERING_LOG_LEVEL=DEBUG for details).
        if settings.log_level == "DEBUG":
            raise
        sys.stderr.write(f"metering: error: {type(exc).__name__}: {exc}\n")
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
