"""Admin commands as the CLI and the admin page publish them: parse, build, validate, publish.

One path for both writers (``worker/cli.py`` and ``worker/api_admin.py``): input values are
parsed by the same functions, the command is checked by the worker's own admin decoder
(``schemas.decode_admin``) before it is sent, so what a writer accepts the worker accepts, and it
is published to ``Settings.topic_admin`` keyed by org. Each command gets a fresh ``command_id``
and ``at`` = now (the worker applies each ``command_id`` at most once).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

import orjson

from schemas.timestamps import datetime_to_ms, format_timestamp

if TYPE_CHECKING:
    from worker.config import Settings

DEFAULT_TIMEOUT_SECONDS = 15.0


class InvalidCommand(ValueError):
    """The worker's decoder would reject the command (``code``: its stable error code)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


# --- Values ----------------------------------------------------------------------------------
def parse_credits(text: str, *, allow_zero: bool = False) -> str:
    """A credit amount (> 0, or >= 0 with ``allow_zero``) with at most 3 decimals, as a decimal
    string; ``ValueError`` otherwise."""
    try:
        value = Decimal(text.strip().replace(",", ""))
    except InvalidOperation:
        raise ValueError(f"{text!r} is not a number of credits") from None
    if not value.is_finite() or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{text!r}: credits must be greater than 0")
    exponent = value.as_tuple().exponent
    if isinstance(exponent, int) and exponent < -3:
        raise ValueError(f"{text!r}: at most 3 decimal places (1 millicredit)")
    return "0" if value == 0 else format(value, "f")


def parse_limit(text: str, *, allow_inherit: bool) -> str | None:
    """A pool limit: whole credits, ``none`` (no limit) or, for members, ``inherit``."""
    lowered = text.strip().lower().replace(",", "")
    if lowered in ("none", "null", "unlimited"):
        return None
    if lowered == "inherit":
        if allow_inherit:
            return "inherit"
        raise ValueError("'inherit' applies to member limits only")
    if not lowered.isdigit():
        choices = "a whole number of credits, 'none'" + (" or 'inherit'" if allow_inherit else "")
        raise ValueError(f"{text!r}: expected {choices}")
    return str(int(lowered))


def rfc3339(value: dt.datetime) -> str:
    """RFC 3339 UTC with milliseconds."""
    return format_timestamp(datetime_to_ms(value))


def now_rfc3339() -> str:
    """Current wall-clock time as RFC 3339 UTC with milliseconds."""
    return rfc3339(dt.datetime.now(dt.UTC))


# --- Commands --------------------------------------------------------------------------------
def build_admin_command(
    cmd_type: str,
    org_id: str,
    fields: dict[str, Any],
    *,
    command_id: str | None = None,
    at: str | None = None,
    id_prefix: str = "cli",
) -> dict[str, Any]:
    """An AdminCommand dict (SPEC section 6) with a fresh ``command_id`` and ``at`` = now."""
    command: dict[str, Any] = {
        "type": cmd_type,
        "command_id": command_id or f"{id_prefix}-{uuid.uuid4()}",
        "org_id": org_id,
        "at": at or now_rfc3339(),
    }
    command.update(fields)
    return command


def check_admin_command(command: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """Check a command with the worker's own admin decoder; ``InvalidCommand`` if it would be
    rejected."""
    from schemas import Rejection, decode_admin

    result = decode_admin(
        orjson.dumps(command),
        now_ms=int(dt.datetime.now(dt.UTC).timestamp() * 1000),
        max_bytes=settings.max_message_bytes,
        max_skew_ms=settings.max_clock_skew_seconds * 1000,
        tiers=settings.tiers,
    )
    if isinstance(result, Rejection):
        hint = ""
        if result.code == "unknown_tier":
            hint = f" (known tiers: {', '.join(sorted(settings.tiers))})"
        raise InvalidCommand(
            f"invalid {command['type']} command: {result.code}: {result.detail}{hint}",
            result.code,
        )
    return command


class AdminPublisher:
    """A producer of admin commands (``acks=all``, idempotent), started on first use so that
    an API process starts and serves reads while Kafka is away."""

    def __init__(self, settings: Settings, *, timeout_s: float = DEFAULT_TIMEOUT_SECONDS) -> None:
        self._settings = settings
        self._timeout = timeout_s
        self._producer: Any = None
        self._lock = asyncio.Lock()

    async def _started(self) -> Any:
        async with self._lock:
            if self._producer is None:
                from aiokafka import AIOKafkaProducer

                from worker.connections import kafka_client_kwargs

                kwargs = kafka_client_kwargs(self._settings)
                kwargs["client_id"] = f"{self._settings.client_id}-admin"
                producer = AIOKafkaProducer(**kwargs, acks="all", enable_idempotence=True)
                try:
                    await asyncio.wait_for(producer.start(), self._timeout)
                except BaseException:
                    await producer.stop()
                    raise
                self._producer = producer
            return self._producer

    async def publish(self, command: dict[str, Any]) -> dict[str, Any]:
        """Send one command keyed by its org; its position. ``TimeoutError`` when Kafka does
        not answer in time."""
        producer = await self._started()
        meta = await asyncio.wait_for(
            producer.send_and_wait(
                self._settings.topic_admin,
                orjson.dumps(command),
                key=str(command["org_id"]).encode(),
            ),
            self._timeout,
        )
        return {"topic": meta.topic, "partition": meta.partition, "offset": meta.offset}

    async def close(self) -> None:
        """Flush and stop the producer (if it was started)."""
        if self._producer is not None:
            producer, self._producer = self._producer, None
            await producer.stop()
