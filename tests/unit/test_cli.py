"""The ``metering`` CLI without services: help, argument errors, admin command construction,
secrets kept out of output."""

from __future__ import annotations

import datetime as dt
import io
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from worker import cli

ROOT = Path(__file__).resolve().parents[2]

SUBCOMMANDS = [
    [],
    ["lag"],
    ["org"],
    ["org", "show"],
    ["org", "create"],
    ["member"],
    ["member", "add"],
    ["member", "remove"],
    ["member", "tier"],
    ["limit", "tier"],
    ["limit", "member"],
    ["pool", "purchase"],
    ["refill", "set"],
    ["refill", "result"],
    ["promo", "grant"],
    ["credit", "request"],
    ["tick"],
    ["worker"],
    ["api"],
    ["migrate"],
    ["rebuild"],
    ["check-config"],
]


def run(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    try:
        status = cli.main(argv, out=out)
    except SystemExit as exc:  # argparse: --help and usage errors
        status = int(exc.code or 0)
    return status, out.getvalue()


def dry_run(argv: list[str]) -> dict[str, object]:
    status, out = run([*argv, "--dry-run", "--json"])
    assert status == 0, out
    doc = orjson.loads(out)
    assert doc["published"] is None
    command: dict[str, object] = doc["command"]
    return command


@pytest.mark.parametrize("argv", SUBCOMMANDS, ids=lambda a: " ".join(a) or "metering")
def test_help_everywhere(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    status, _ = run([*argv, "--help"])
    assert status == 0
    assert "usage: metering" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["member", "add", "acme", "alice"], "--tier"),
        (["pool", "purchase", "acme", "-5"], "greater than 0"),
        (["pool", "purchase", "acme", "1.2345"], "3 decimal"),
        (["pool", "purchase", "acme", "lots"], "not a number"),
        (["limit", "tier", "acme", "pro", "inherit"], "member limits only"),
        (["limit", "member", "acme", "alice", "12.5"], "whole number"),
        (["org", "create", "acme", "--anchor-day", "32"], "1..31"),
        (["promo", "grant", "acme", "alice", "5", "--expires-at", "2026-12-01"], "timezone"),
        (["promo", "grant", "acme", "alice", "5", "--expires-at", "tomorrow"], "RFC 3339"),
        (
            ["refill", "set", "acme", "--threshold", "1", "--amount", "1", "--monthly-limit", "1"],
            "--enabled",
        ),
        (["refill", "result", "acme", "r1", "maybe"], "invalid choice"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_argument_errors_exit_2_with_a_hint(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status, _ = run(argv)
    err = capsys.readouterr().err
    assert status == 2
    assert message in err
    assert "--help" in err


def test_no_command_prints_help_and_exits_2() -> None:
    status, out = run([])
    assert status == 2
    assert "COMMAND" in out


def test_admin_commands_match_the_wire_contract() -> None:
    before = dt.datetime.now(dt.UTC)
    cmd = dry_run(["member", "add", "acme", "alice", "--tier", "max"])
    assert cmd["type"] == "member_add"
    assert cmd["org_id"] == "acme" and cmd["member_id"] == "alice" and cmd["tier"] == "max"
    at = dt.datetime.fromisoformat(str(cmd["at"]).replace("Z", "+00:00"))
    assert before - dt.timedelta(seconds=1) <= at <= dt.datetime.now(dt.UTC)
    assert isinstance(cmd["command_id"], str) and cmd["command_id"]

    assert dry_run(["org", "create", "acme", "--anchor-day", "31"])["billing_anchor_day"] == 31
    assert dry_run(["member", "remove", "acme", "bob"])["type"] == "member_remove"
    tier = dry_run(["member", "tier", "acme", "bob", "pro"])
    assert (tier["type"], tier["tier"]) == ("member_set_tier", "pro")
    assert dry_run(["limit", "tier", "acme", "pro", "none"])["limit"] is None
    assert dry_run(["limit", "tier", "acme", "pro", "2000"])["limit"] == "2000"
    assert dry_run(["limit", "member", "acme", "bob", "inherit"])["limit"] == "inherit"
    assert dry_run(["limit", "member", "acme", "bob", "none"])["limit"] is None
    purchase = dry_run(["pool", "purchase", "acme", "1234.5"])
    assert (purchase["type"], purchase["credits"]) == ("pool_purchase", "1234.5")
    refill = dry_run(
        [
            "refill",
            "set",
            "acme",
            "--disabled",
            "--threshold",
            "0",
            "--amount",
            "500",
            "--monthly-limit",
            "2000",
        ]
    )
    assert refill == refill | {
        "type": "auto_refill_set",
        "enabled": False,
        "threshold": "0",
        "amount": "500",
        "monthly_limit": "2000",
    }
    promo = dry_run(
        [
            "promo",
            "grant",
            "acme",
            "bob",
            "25",
            "--expires-at",
            "2027-01-31T12:00:00+01:00",
            "--grant-id",
            "welcome",
        ]
    )
    assert promo["expires_at"] == "2027-01-31T11:00:00Z"
    assert promo["grant_id"] == "welcome" and promo["credits"] == "25"
    result = dry_run(["refill", "result", "acme", "req-1", "failed"])
    assert (result["request_id"], result["status"]) == ("req-1", "failed")
    request = dry_run(["credit", "request", "acme", "bob", "50", "--note", "big task"])
    assert request["note"] == "big task"
    assert dry_run(["tick", "acme"])["type"] == "tick"


def test_every_admin_command_gets_a_fresh_id_unless_given() -> None:
    a = dry_run(["tick", "acme"])
    b = dry_run(["tick", "acme"])
    assert a["command_id"] != b["command_id"]
    c = dry_run(["tick", "acme", "--command-id", "retry-7", "--at", "2026-11-01T00:00:00Z"])
    assert c["command_id"] == "retry-7"
    assert c["at"] == "2026-11-01T00:00:00Z"


def test_commands_the_worker_would_reject_are_refused_before_publishing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    status, out = run(["member", "add", "acme", "alice", "--tier", "gold", "--dry-run"])
    assert status == 2 and out == ""
    err = capsys.readouterr().err
    assert "unknown_tier" in err and "pro" in err

    future = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).isoformat()
    status, _ = run(["tick", "acme", "--at", future, "--dry-run"])
    assert status == 2
    assert "timestamp_in_future" in capsys.readouterr().err

    status, _ = run(["member", "add", "a" * 129, "alice", "--tier", "pro", "--dry-run"])
    assert status == 2


def test_unreachable_kafka_is_an_error_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("METERING_KAFKA_BOOTSTRAP", "127.0.0.1:1")
    monkeypatch.setattr(cli, "KAFKA_TIMEOUT_SECONDS", 3.0)
    status, _ = run(["tick", "acme"])
    assert status == 1
    err = capsys.readouterr().err
    assert err.startswith("metering: error:")
    assert "Traceback" not in err


def test_process_commands_report_a_missing_module(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "worker.recovery", None)  # import fails like a missing file
    status, _ = run(["rebuild"])
    assert status == 1
    assert "worker.recovery" in capsys.readouterr().err


def test_check_config_masks_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METERING_REDIS_URL", "rediss://metering:s3cret-redis@redis:6380/0")
    monkeypatch.setenv("METERING_POSTGRES_DSN", "postgresql://m:s3cret-pg@db/metering")
    monkeypatch.setenv("METERING_API_TOKENS", '{"s3cret-token": "*"}')
    monkeypatch.setenv("METERING_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("METERING_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("METERING_KAFKA_SASL_USERNAME", "metering")
    monkeypatch.setenv("METERING_KAFKA_SASL_PASSWORD", "s3cret-kafka")
    for argv in (["check-config"], ["check-config", "--json"], ["--check-config"]):
        status, out = run(argv)
        assert status == 0
        assert "s3cret" not in out
        assert "redis_url" in out and "kafka_sasl_username" in out
    status, out = run(["check-config", "--json"])
    doc = orjson.loads(out)
    assert doc["redis_url"] == "**********"
    assert doc["kafka_sasl_username"] == "metering"


def test_invalid_configuration_is_reported_by_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("METERING_HTTP_PORT", "not-a-port")
    status, _ = run(["lag"])
    assert status == 2
    assert "METERING_HTTP_PORT" in capsys.readouterr().err


def test_table_right_aligns_numbers() -> None:
    table = cli.format_table(["NAME", "LAG"], [("a", 5), ("bb", 1234), ("c", None)])
    lines = table.splitlines()
    assert lines[0] == "NAME   LAG"
    assert lines[2] == "a        5"
    assert lines[3] == "bb    1234"
    assert lines[4] == "c        -"


def test_org_show_renders_the_dashboard_in_a_terminal() -> None:
    text = cli.render_org(
        {
            "org_id": "acme",
            "cycle_start": "2026-11-01T00:00:00Z",
            "reset_at": "2026-12-01T00:00:00Z",
            "pool": {
                "balance": "1234.5",
                "used_this_cycle": "500",
                "locked": True,
                "refill_pending": False,
            },
            "members": [
                {
                    "member_id": "alice",
                    "tier": "pro",
                    "active": True,
                    "granted": "1000",
                    "used": "812.5",
                    "remaining": "187.5",
                    "pool_drawn": "500",
                    "pool_limit": None,
                    "negative_balance": "0",
                    "state": "paused",
                    "pause_reason": "refill_failed",
                },
            ],
        }
    )
    assert "pool balance 1234.5" in text and "LOCKED" in text
    assert "reset date 2026-12-01T00:00:00Z" in text
    row = next(line for line in text.splitlines() if line.startswith("alice"))
    assert row.split()[:8] == ["alice", "pro", "1000", "812.5", "187.5", "500", "none", "0"]
    assert "paused (refill_failed)" in row


def test_console_entry_point_dispatches_to_the_cli() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "worker", "tick", "acme", "--dry-run"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert orjson.loads(proc.stdout)["type"] == "tick"


def test_stack_arguments_pass_through_to_the_stack_script(
    capsys: pytest.CaptureFixture[str],
) -> None:
    status, _ = run(["stack", "--help"])
    assert status == 0
    assert "{up,down,status,topics,browser}" in capsys.readouterr().out
