"""``python -m worker``: ``--check-config`` validates the environment; anything else is the CLI.

``--check-config`` is handled here, before the CLI is imported, so a broken configuration is
reported clearly even where the CLI's own dependencies or services are unavailable.
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Sequence

from pydantic import ValidationError
from pydantic_settings import SettingsError

EXIT_OK = 0
EXIT_CONFIG = 2


def check_config(out_json: bool = False) -> int:
    """Validate the ``METERING_*`` environment; print the settings with secrets masked."""
    from worker.config import Settings, settings_error_line

    try:
        settings = Settings()
    except ValidationError as exc:
        sys.stderr.write("invalid configuration:\n")
        for err in exc.errors():
            field = "_".join(str(p) for p in err["loc"]).upper()
            name = f"METERING_{field}" if field else "(settings)"
            sys.stderr.write(f"  {name}: {err['msg']}\n")
        return EXIT_CONFIG
    except SettingsError as exc:
        # A JSON setting (tiers, api tokens) that is not JSON at all.
        sys.stderr.write(f"invalid configuration:\n  {settings_error_line(exc)}\n")
        return EXIT_CONFIG
    redacted = settings.redacted()
    if out_json:
        sys.stdout.write(json.dumps(redacted, indent=2, default=str) + "\n")
    else:
        width = max(len(k) for k in redacted)
        for key, value in redacted.items():
            sys.stdout.write(f"{key.ljust(width)} = {value}\n")
        sys.stdout.write("configuration OK\n")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m worker``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--check-config" in args and set(args) <= {"--check-config", "--json"}:
        return check_config(out_json="--json" in args)
    try:
        cli = importlib.import_module("worker.cli")
    except ModuleNotFoundError as exc:
        if exc.name != "worker.cli":
            raise
        sys.stderr.write("the metering CLI (worker.cli) is not available; try --check-config\n")
        return EXIT_CONFIG
    return int(cli.main(args))


if __name__ == "__main__":
    sys.exit(main())
