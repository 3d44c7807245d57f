"""The msgspec hot path must accept and reject exactly what the pydantic models do.

Random and mutated usage events (valid ones, missing fields, wrong types, bools, floats,
exponent numbers, decimal strings, huge numbers, bad timestamps, unicode, extra and duplicated
fields, broken syntax) go through three decoders:

- ``reference_decode_usage``: the pydantic model alone (the contract);
- ``fast_decode_usage``: the msgspec struct alone, which may say "cannot decide" (None);
- ``decode_usage``: what the worker runs (fast path, falling back to the reference).

The fast path must never refuse what the reference accepts, must produce identical records,
and whenever it decides a rejection itself, the code must be the reference's.
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime, timedelta

from hypothesis import event, given, settings
from hypothesis import strategies as st

from schemas.decode import (
    Rejection,
    UsageRecord,
    decode_usage,
    fast_decode_usage,
    reference_decode_usage,
)

NOW_MS = 1_795_740_000_000  # 2026-11-27T00:40:00Z
SKEW_MS = 300_000
MAX_BYTES = 4_096
FIELDS = ("event_id", "org_id", "member_id", "task_id", "credits", "occurred_at")


def _string(text: str, ascii_only: bool) -> str:
    return json.dumps(text, ensure_ascii=ascii_only)


ids = st.one_of(
    st.text(min_size=1, max_size=12),
    st.text(alphabet="abc-_0123456789", min_size=1, max_size=12),
    st.sampled_from(
        [
            "",
            "x" * 128,
            "x" * 129,
            "é" * 128,
            "😀" * 128,
            "😀" * 129,
            " ",
            "\x00",
            "a\x00b",
            "a\x7fb",
            "a\x85b",
            "{}/:%",
        ]
    ),
)

plain_amounts = st.one_of(
    st.integers(min_value=-10, max_value=2_000_000).map(str),
    st.builds(
        lambda i, f: f"{i}.{f}",
        st.integers(min_value=0, max_value=1_000_001),
        st.from_regex(r"\A[0-9]{1,6}\Z"),
    ),
    st.sampled_from(["0", "-0", "-0.0", "0.000", "1000000", "1000000.000", "1000000.001", "0.001"]),
)
odd_amounts = st.sampled_from(
    ["1e3", "1E3", "1.5e+2", "12.", ".5", "+1", " 1", "1 ", "012", "00", "1_000", "0x10",
     "NaN", "Infinity", "-", "", "١", "12,5", "9" * 30, "1" + "0" * 45, "1." + "0" * 30]
)  # fmt: skip
# Near-misses of the amount grammar, as JSON strings and as bare tokens (many bare ones are not
# valid JSON, which both paths must agree on too).
fuzz_amounts = st.from_regex(
    r"\A[-+ ]?[0-9]{0,8}(\.[0-9]{0,5})?([eE][-+]?[0-9]{1,2})? ?\Z"
).flatmap(lambda text: st.sampled_from([text, json.dumps(text)]))
amount_tokens = st.one_of(
    fuzz_amounts,
    plain_amounts,  # as a JSON number
    plain_amounts.map(json.dumps),  # as a JSON string
    odd_amounts.map(json.dumps),
    st.sampled_from(["1e3", "1.5E+2", "-1e-3", "1" + "0" * 45, "12.50", "-0"]),  # number tokens
    st.sampled_from(["true", "false", "null", "[]", "[12]", '{"v": 12}', '"\\u0031\\u0032"']),
    st.floats(allow_nan=False, allow_infinity=False).map(json.dumps),
)


@st.composite
def timestamps(draw: st.DrawFn) -> str:
    ms = draw(
        st.one_of(
            st.integers(min_value=NOW_MS - 400 * 86_400_000, max_value=NOW_MS + 2 * SKEW_MS),
            st.integers(min_value=NOW_MS + SKEW_MS - 2, max_value=NOW_MS + SKEW_MS + 2),
        )
    )
    seconds, millis = divmod(ms, 1000)
    offset_min = draw(st.sampled_from([0, 0, 60, -300, 330, 23 * 60 + 59]))
    local = datetime.fromtimestamp(seconds, UTC) + timedelta(minutes=offset_min)
    frac = draw(
        st.sampled_from(["", f".{millis:03d}", f".{millis:03d}999", f".{millis // 100}", ".0"])
    )
    if offset_min == 0:
        zone = draw(st.sampled_from(["Z", "z", "+00:00", "-00:00", ""]))
    else:
        sign = "-" if offset_min < 0 else "+"
        zone = f"{sign}{abs(offset_min) // 60:02d}:{abs(offset_min) % 60:02d}"
    sep = draw(st.sampled_from(["T", "T", "t", " "]))
    return local.strftime(f"%Y-%m-%d{sep}%H:%M:%S") + frac + zone


# A few shared prefixes, so the decoder's prefix cache is hit with every kind of tail.
fuzz_times = st.builds(
    lambda prefix, tail: json.dumps(prefix + tail),
    st.sampled_from(
        ["2026-11-27T00:30:00", "2026-11-27T00:44:59", "2026-11-27T00:45:00", "2026-11-27T00:30:00"]
    ),
    st.from_regex(r"\A(\.[0-9]{0,5})?([Zz]|[-+][0-9]{2}:?[0-9]{2}|[-+]00:00)?[Zz ]?\Z"),
)
time_tokens = st.one_of(
    fuzz_times,
    timestamps().map(json.dumps),
    st.sampled_from(
        ["2026-02-30T00:00:00Z", "2026-11-27", "2026-11-27T24:00:00Z", "yesterday", "",
         "1969-12-31T23:59:59Z", "2026-11-27T00:00:00+24:00", "２０２６-11-27T00:00:00Z"]
    ).map(json.dumps),
    st.sampled_from(["1795740000", "1795740000.5", "null", "true", "[]", "{}"]),
)  # fmt: skip
any_tokens = st.one_of(
    st.text(max_size=8).map(json.dumps),
    st.integers().map(str),
    st.sampled_from(
        [
            "true",
            "false",
            "null",
            "[]",
            "{}",
            "[1, {}]",
            "1.5",
            "1e400",
            '"\\ud800"',
            '"a\\u0000"',
            "[" * 3_000 + "]" * 3_000,
        ]
    ),
)


good_ids = st.text(st.characters(exclude_categories=("Cs", "Cc")), min_size=1, max_size=16)
good_amounts = st.one_of(
    st.integers(min_value=1, max_value=1_000_000).map(str),
    st.sampled_from(  # the boundaries, including just past them
        ["1000000", "1000000.000", "999999.999", "1000000.001", "1000001", "9999999", "0.001"]
    ),
    st.builds(
        lambda i, f: f"{i}.{f}",
        st.integers(min_value=0, max_value=999_999),
        st.from_regex(r"\A[0-9]{0,3}[1-9]\Z"),
    ),
).flatmap(lambda text: st.sampled_from([text, json.dumps(text)]))
good_times = st.builds(
    lambda ms, frac: json.dumps(
        datetime.fromtimestamp(ms // 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S") + frac + "Z"
    ),
    st.one_of(
        st.integers(min_value=NOW_MS - 40 * 86_400_000, max_value=NOW_MS + SKEW_MS),
        st.integers(min_value=NOW_MS + SKEW_MS - 5_000, max_value=NOW_MS + SKEW_MS + 5_000),
    ),
    st.sampled_from(["", ".5", ".123", ".123456"]),
)


def _mostly(good: st.SearchStrategy[str], wild: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    # Each field is well-formed 3 times in 4, so whole messages are valid often enough for the
    # accept path (values equal) to be compared as thoroughly as the reject paths.
    return st.integers(0, 3).flatmap(lambda n: wild if n == 0 else good)


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    ascii_only = draw(st.booleans())
    tokens: dict[str, str] = {
        "event_id": _string(draw(_mostly(good_ids, ids)), ascii_only),
        "org_id": _string(draw(_mostly(good_ids, ids)), ascii_only),
        "member_id": _string(draw(_mostly(good_ids, ids)), ascii_only),
        "task_id": _string(draw(_mostly(good_ids, ids)), ascii_only),
        "credits": draw(_mostly(good_amounts, amount_tokens)),
        "occurred_at": draw(_mostly(good_times, time_tokens)),
    }
    pairs = list(tokens.items())
    mutation = draw(
        st.sampled_from(["none", "none", "none", "drop", "retype", "extra", "dup", "shuffle"])
    )
    if mutation == "drop":
        del pairs[draw(st.integers(0, len(pairs) - 1))]
    elif mutation == "retype":
        i = draw(st.integers(0, len(pairs) - 1))
        pairs[i] = (pairs[i][0], draw(any_tokens))
    elif mutation == "extra":
        key = draw(st.sampled_from(["region", "credits_mc", "Credits", "type", "é"]))
        pairs.insert(draw(st.integers(0, len(pairs))), (key, draw(any_tokens)))
    elif mutation == "dup":
        i = draw(st.integers(0, len(pairs) - 1))
        # Duplicates repeat a value of the same field: a valid first value and a second one.
        pairs.append((pairs[i][0], pairs[i][1]))
    elif mutation == "shuffle":
        pairs = draw(st.permutations(pairs))
    sep = draw(st.sampled_from([",", ", ", " ,\n"]))
    body = "{" + sep.join(f"{json.dumps(k)}:{v}" for k, v in pairs) + "}"
    raw = body.encode()
    damage = draw(st.sampled_from(["none"] * 16 + ["truncate", "bad_utf8", "wrap", "pad"]))
    if damage == "truncate":
        raw = raw[: draw(st.integers(0, len(raw) - 1))]
    elif damage == "bad_utf8":
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80"])) + raw[at:]
    elif damage == "wrap":
        raw = b"[" + raw + b"]"
    elif damage == "pad":
        raw = (
            raw[:-1] + b', "pad": "' + b"x" * draw(st.integers(MAX_BYTES - 300, MAX_BYTES)) + b'"}'
        )
    return raw


def _verdict(result: UsageRecord | Rejection) -> object:
    return result.code if isinstance(result, Rejection) else result


_stats: Counter[str] = Counter()


@settings(max_examples=600)
@given(messages())
def test_fast_path_matches_pydantic_models(raw: bytes) -> None:
    ref = reference_decode_usage(raw, now_ms=NOW_MS, max_bytes=MAX_BYTES, max_skew_ms=SKEW_MS)
    full = decode_usage(raw, now_ms=NOW_MS, max_bytes=MAX_BYTES, max_skew_ms=SKEW_MS)
    assert _verdict(full) == _verdict(ref)

    prechecked = (
        ref.code not in ("message_too_large", "invalid_utf8")
        if isinstance(ref, Rejection)
        else True
    )
    if prechecked:
        fast = fast_decode_usage(raw, now_ms=NOW_MS, max_skew_ms=SKEW_MS)
        if isinstance(ref, UsageRecord):
            assert fast == ref  # never refuses what the models accept, same values
        elif fast is not None:
            assert _verdict(fast) == ref.code
        _stats["fast-decided" if fast is not None else "fast-deferred"] += 1
    outcome = "accepted" if isinstance(ref, UsageRecord) else f"rejected:{ref.code}"
    _stats[outcome] += 1
    event(outcome)


def test_differential_run_covered_both_outcomes() -> None:
    # Runs after the property test in file order: a generator that only produced garbage (or
    # only valid events) would make the comparison above meaningless.
    if not _stats:
        test_fast_path_matches_pydantic_models()
    assert _stats["accepted"] >= 60, _stats
    rejected = {k for k in _stats if k.startswith("rejected:")}
    assert len(rejected) >= 10, _stats
