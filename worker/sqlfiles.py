"""The SQL files of ``worker/sql/``: one loader for the named queries, one identifier quoter.

A query file holds ``-- name: <name>`` sections; the worker's store (``worker/ledger.py``), the
read API (``worker/api.py``) and the lag reader (``worker/lag.py``) take their statements from
here by name. Values always travel as ``$n`` parameters; the only text put into a statement is
the schema name from settings, quoted as an identifier.
"""

from __future__ import annotations

import re
from importlib import resources

_NAME_RE = re.compile(r"^--\s*name:\s*(\w+)\s*$", re.MULTILINE)


def named_queries(filename: str) -> dict[str, str]:
    """``{"name": "SQL"}`` of ``worker/sql/<filename>``."""
    text = resources.files("worker").joinpath("sql", filename).read_text(encoding="utf-8")
    parts = _NAME_RE.split(text)
    # parts = [preamble, name1, body1, name2, body2, ...]
    return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}


def quote_ident(name: str) -> str:
    """``name`` as a quoted SQL identifier (the schema name from settings)."""
    return '"' + name.replace('"', '""') + '"'
