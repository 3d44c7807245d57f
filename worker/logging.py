"""Structured logging: one JSON object per line in production, readable lines in a terminal.

``setup_logging(settings)`` configures the root logger once per process from
``Settings.log_format`` (``json`` | ``console``) and ``Settings.log_level``. Extra fields go in
``extra={...}`` and appear as JSON keys (or ``key=value`` pairs on the console). Values whose key
looks like a secret (password, token, dsn, url with credentials...) are masked, so a careless
``extra={"redis_url": ...}`` cannot leak a password.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import sys
from typing import TYPE_CHECKING, Any, TextIO

import orjson
from pydantic import SecretStr

if TYPE_CHECKING:
    from worker.config import Settings

MASK = "**********"

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD_ATTRS = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime"}
)
_SECRET_KEY = re.compile(r"(pass(word)?|secret|token|dsn|auth|credential|api_key|sasl)", re.I)
# scheme://user:password@host -> scheme://user:**********@host; the password runs to the last
# "@" of the URL, so one holding an unencoded "@" is masked whole.
_URL_PASSWORD = re.compile(
    r"(?P<head>[a-z][a-z0-9+.-]*://[^:/@\s]*:)[^\s/?#]*(?P<tail>@[^@\s/?#]*)", re.I
)
# ?password=x&... and &sslpassword=x in a URL's query string
_QUERY_PASSWORD = re.compile(r"(?P<head>[?&][a-z_]*pass(word)?=)[^&#\s]*", re.I)
# keyword/value DSNs: host=h password=secret, password='sec ret'
_KEYWORD_PASSWORD = re.compile(
    r"(?P<head>(?<![?&\w])[a-z_]*pass(word)?\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s'&]+)", re.I
)


def redact_text(text: str) -> str:
    """Mask passwords in URLs (``redis://:pw@host``, ``postgresql://u:p@ss@h``), in their query
    strings (``?password=pw``) and in keyword DSNs (``password=pw``, ``password='p w'``)."""
    text = _URL_PASSWORD.sub(rf"\g<head>{MASK}\g<tail>", text)
    text = _QUERY_PASSWORD.sub(rf"\g<head>{MASK}", text)
    return _KEYWORD_PASSWORD.sub(rf"\g<head>{MASK}", text)


def _clean(key: str, value: Any) -> Any:
    if isinstance(value, SecretStr):
        return MASK
    if _SECRET_KEY.search(key):
        return MASK if value else value
    if isinstance(value, str):
        return redact_text(value)
    return value


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {
        key: _clean(key, value)
        for key, value in vars(record).items()
        if key not in _STANDARD_ATTRS and not key.startswith("_")
    }


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``msg``, extras, ``exc``."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, tz=dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact_text(record.getMessage()),
        }
        out.update(_extras(record))
        if record.exc_info:
            out["exc"] = redact_text(self.formatException(record.exc_info))
        return orjson.dumps(out, default=str).decode()


class ConsoleFormatter(logging.Formatter):
    """``HH:MM:SS.mmm LEVEL logger: message key=value ...`` for humans at a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        ts = dt.datetime.fromtimestamp(record.created, tz=dt.UTC).strftime("%H:%M:%S.%f")[:-3]
        line = f"{ts} {record.levelname:<7} {record.name}: {redact_text(record.getMessage())}"
        extras = _extras(record)
        if extras:
            line += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        if record.exc_info:
            line += "\n" + redact_text(self.formatException(record.exc_info))
        return line


class RepeatFilter(logging.Filter):
    """Lets a library's repeated line through once per ``interval`` seconds.

    aiokafka logs "Topic ... not found in cluster metadata" on every metadata poll (some
    1,800 lines a second once the input topics are deleted) and a connection error on every
    retry. Records of loggers outside the worker with the same template and level are passed
    at most once per interval; the next one says how many were held back. The worker's own
    loggers already report outages once per interval (``worker/pipeline/backoff.py``).
    """

    def __init__(self, interval: float = 30.0, prefixes: tuple[str, ...] = ("aiokafka",)) -> None:
        super().__init__()
        self.interval = interval
        self.prefixes = prefixes
        self._seen: dict[tuple[str, int, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self.prefixes):
            return True
        key = (record.name, record.levelno, str(record.msg))
        now = record.created
        last = self._seen.get(key)
        if last is not None and now - last[0] < self.interval:
            self._seen[key] = (last[0], last[1] + 1)
            return False
        held = last[1] if last is not None else 0
        if len(self._seen) > 1_000:
            self._seen.clear()
        self._seen[key] = (now, 0)
        if held:
            record.msg = f"{record.msg} ({held} like it in the last {self.interval:.0f} s)"
        return True


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at emit time (test runners swap it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass


def setup_logging(
    settings: Settings | None = None,
    *,
    fmt: str | None = None,
    level: str | None = None,
    stream: TextIO | None = None,
) -> None:
    """Configure the root logger (idempotent: replaces handlers set up by an earlier call)."""
    fmt = fmt or (settings.log_format if settings else "console")
    level = level or (settings.log_level if settings else "INFO")
    handler: logging.StreamHandler = (  # type: ignore[type-arg]
        logging.StreamHandler(stream) if stream is not None else _StderrHandler()
    )
    handler.setFormatter(JsonFormatter() if fmt == "json" else ConsoleFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_metering", False):
            root.removeHandler(old)
    handler._metering = True  # type: ignore[attr-defined]
    handler.addFilter(RepeatFilter())
    root.addHandler(handler)
    root.setLevel(level)
    # aiokafka logs every connection retry at INFO/ERROR; keep its noise at WARNING.
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, root.level))
    logging.getLogger("aiohttp.access").setLevel(max(logging.WARNING, root.level))
