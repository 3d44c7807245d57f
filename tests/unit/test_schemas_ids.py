"""The id alphabet (SPEC section 6) and the encodings that make ids data in keys."""

from __future__ import annotations

import time

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.decode import Rejection, UsageRecord, decode_admin, decode_usage, readable_ids
from schemas.errors import ErrorCode
from schemas.ids import (
    derived_id,
    hash_tag_part,
    id_problem,
    is_valid_id,
    key_part,
    split_key,
    unhash_tag_part,
)

NOW_MS = int(time.time() * 1000)
FORBIDDEN = [chr(c) for c in [*range(0x00, 0x20), *range(0x7F, 0xA0)]]
TEXT = st.text(
    alphabet=st.characters(codec="utf-8") | st.sampled_from(["{", "}", "/", ":", "%", "|"]),
    max_size=140,
)


def _event(event_id: str, org_id: str = "o") -> bytes:
    return orjson.dumps(
        {
            "event_id": event_id,
            "org_id": org_id,
            "member_id": "m",
            "task_id": "t",
            "credits": 1,
            "occurred_at": "2026-01-01T00:00:00Z",
        }
    )


@pytest.mark.parametrize("char", FORBIDDEN, ids=lambda c: f"U+{ord(c):04X}")
def test_control_characters_are_not_ids(char: str) -> None:
    assert not is_valid_id(f"a{char}b")
    assert id_problem(f"a{char}b") == f"contains U+{ord(char):04X} at character 1"
    result = decode_usage(_event(f"e{char}"), now_ms=NOW_MS)
    assert isinstance(result, Rejection) and result.code == ErrorCode.INVALID_ID


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("x" * 128, True),
        ("x" * 129, False),
        ("é" * 128, True),  # 256 bytes, 128 characters
        ("😀" * 128, True),  # 512 bytes
        ("😀" * 129, False),
        ("", False),
        ("{}/:%|", True),
        ("\u200f\u00a0", True),  # a right-to-left mark and a no-break space are data
    ],
)
def test_length_counts_characters_not_bytes(value: str, ok: bool) -> None:
    assert is_valid_id(value) is ok
    result = decode_usage(_event(value), now_ms=NOW_MS)
    assert isinstance(result, UsageRecord) is ok
    if ok:
        assert result.event_id == value  # type: ignore[union-attr]


@given(TEXT)
def test_decoder_accepts_exactly_the_alphabet(value: str) -> None:
    result = decode_usage(_event(value, org_id=value), now_ms=NOW_MS)
    if is_valid_id(value):
        assert isinstance(result, UsageRecord)
        assert (result.event_id, result.org_id) == (value, value)
    else:
        assert isinstance(result, Rejection) and result.code == ErrorCode.INVALID_ID


@given(TEXT)
def test_readable_ids_are_valid_ids(value: str) -> None:
    raw = orjson.dumps({"event_id": value, "command_id": value, "credits": "x"})
    found = readable_ids(raw)
    assert ("event_id" in found) is is_valid_id(value)
    assert all(is_valid_id(v) for k, v in found.items() if k != "type")


def test_rejection_reader_reads_what_the_decoder_reads() -> None:
    # 1e999 is valid JSON for the decoder (a number token): the id is readable.
    assert readable_ids(b'{"event_id": "e1", "credits": 1e999}') == {"event_id": "e1"}
    # A lone surrogate anywhere makes the message invalid JSON: no id at all.
    assert readable_ids(b'{"event_id": "e1", "x": "\\ud800"}') == {}
    assert readable_ids(b'{"event_id": "e\\u0000"}') == {}
    assert readable_ids(b"\xff\xfe") == {}
    assert readable_ids(b'{"type": "made_up", "command_id": "c"}') == {"command_id": "c"}
    assert readable_ids(b'{"type": "tick", "command_id": "c"}') == {
        "command_id": "c",
        "type": "tick",
    }


@given(TEXT, TEXT, TEXT, TEXT)
def test_control_keys_never_collide(org_a: str, member_a: str, org_b: str, member_b: str) -> None:
    key_a = f"{key_part(org_a)}/{key_part(member_a)}"
    key_b = f"{key_part(org_b)}/{key_part(member_b)}"
    assert split_key(key_a) == (org_a, member_a)
    assert (key_a == key_b) == ((org_a, member_a) == (org_b, member_b))


def test_control_key_examples_from_the_spec() -> None:
    assert f"{key_part('a/b')}/{key_part('c')}" == "a%2Fb/c"
    assert f"{key_part('a')}/{key_part('b/c')}" == "a/b%2Fc"
    assert key_part("100%") == "100%25"


@given(TEXT)
def test_hash_tag_part_is_a_whole_nonempty_tag(value: str) -> None:
    part = hash_tag_part(value)
    assert "{" not in part and "}" not in part
    assert unhash_tag_part(part) == value


@given(st.text(min_size=1, max_size=128).filter(is_valid_id), st.integers(0, 10**12))
def test_derived_ids_are_valid_whatever_the_org(org_id: str, n: int) -> None:
    rid = derived_id("refill", org_id, n)
    assert is_valid_id(rid)
    assert rid != derived_id("refill", org_id + "x", n)
    tick = derived_id("tick", org_id, NOW_MS)
    command = orjson.dumps(
        {"type": "tick", "command_id": tick, "org_id": org_id, "at": "2026-01-01T00:00:00Z"}
    )
    decoded = decode_admin(command, now_ms=NOW_MS)
    assert not isinstance(decoded, Rejection), decoded
    assert decoded.command_id == tick
