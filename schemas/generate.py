"""Generate the JSON Schema files of the wire contract from the pydantic models.

``python -m schemas.generate`` rewrites ``schemas/*.schema.json``; ``--check`` only compares
and exits 1 when a checked-in file differs from the models (CI and a unit test run it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Final

from pydantic import BaseModel, TypeAdapter

from schemas.models import (
    ADMIN_COMMAND_ADAPTER,
    Invoice,
    Notification,
    RefillRequest,
    TaskControl,
    UsageEvent,
)

SCHEMA_DIR: Final = Path(__file__).resolve().parent
_DIALECT: Final = "https://json-schema.org/draft/2020-12/schema"

_TARGETS: Final[dict[str, tuple[type[BaseModel] | TypeAdapter[Any], str, str]]] = {
    "usage_event": (UsageEvent, "validation", "credits.usage.v1 value"),
    "admin_command": (ADMIN_COMMAND_ADAPTER, "validation", "credits.admin.v1 value"),
    "task_control": (TaskControl, "serialization", "credits.control.v1 value"),
    "notification": (Notification, "serialization", "credits.notifications.v1 value"),
    "refill_request": (RefillRequest, "serialization", "credits.billing.v1 value"),
    "invoice": (Invoice, "serialization", "credits.billing.v1 value"),
}


def render() -> dict[str, str]:
    """File name -> JSON text of every schema, exactly as checked in."""
    out: dict[str, str] = {}
    for name, (target, mode, topic) in _TARGETS.items():
        if isinstance(target, TypeAdapter):
            schema = target.json_schema(mode=mode, by_alias=True)  # type: ignore[arg-type]
            schema.setdefault("title", "AdminCommand")
        else:
            schema = target.model_json_schema(mode=mode, by_alias=True)  # type: ignore[arg-type]
        document = {"$schema": _DIALECT, "$id": f"{name}.schema.json", **schema}
        document.setdefault("description", topic)
        document["x-topic"] = topic
        out[f"{name}.schema.json"] = json.dumps(document, indent=2, sort_keys=True) + "\n"
    return out


def drift(directory: Path = SCHEMA_DIR) -> list[str]:
    """Names of the schema files that are missing or differ from the models."""
    return [
        name
        for name, text in render().items()
        if not (directory / name).is_file() or (directory / name).read_text() != text
    ]


def main(argv: list[str] | None = None) -> int:
    """Write (or with ``--check`` compare) the schema files; return the exit status."""
    parser = argparse.ArgumentParser(prog="python -m schemas.generate", description=__doc__)
    parser.add_argument("--check", action="store_true", help="only report drift, exit 1 if any")
    args = parser.parse_args(argv)
    if args.check:
        stale = drift()
        for name in stale:
            print(f"{name} is out of date: run python -m schemas.generate", file=sys.stderr)
        return 1 if stale else 0
    for name, text in render().items():
        (SCHEMA_DIR / name).write_text(text)
        print(f"wrote schemas/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
