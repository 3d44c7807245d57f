"""Pipeline pieces that need no services: queries and migrations, effect rows, effect messages,
dead letters, the fault-injection hook parser, the commit queue, the fetch's partition turns."""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest
from aiokafka import TopicPartition

from schemas.decode import readable_ids
from worker.config import Settings
from worker.contract import CLAIM_MINE, CLAIM_NEW, CLAIM_TAKEN, UsageItem
from worker.effects import Charge, Effect, from_dict
from worker.ledger import QUERIES, FlushBatch, _migrations, quote_schema
from worker.pipeline.batch import Batch, Pending
from worker.pipeline.classify import Action, Verdict, classify
from worker.pipeline.faults import crash_plan as _crash_plan
from worker.pipeline.intake import SHARE_DIVISOR, Intake
from worker.pipeline.pipeline import CommitQueue
from worker.publisher import HEADER_SEQ, EffectEncoder, RawSource

SETTINGS = Settings()


def test_every_named_query_the_store_uses_exists_and_uses_bind_parameters() -> None:
    for name in (
        "decided_event_ids",
        "decided_command_ids",
        "insert_ledger_entries",
        "insert_usage_events",
        "insert_admin_commands",
        "upsert_signals",
        "insert_parked",
        "delete_parked",
        "parked_for_partitions",
        "upsert_org_seq",
        "upsert_offsets",
        "select_offsets",
        "rebuild_inputs",
    ):
        assert name in QUERIES, name
        assert "{" not in QUERIES[name]  # never formatted SQL
    assert "$1" in QUERIES["decided_event_ids"]


def test_migrations_are_numbered_from_one_without_gaps() -> None:
    versions = [v for v, _, _ in _migrations()]
    assert versions == list(range(1, len(versions) + 1))


@pytest.mark.parametrize("bad", ["", "1abc", "a-b", 'x"; DROP TABLE y; --', "a" * 64])
def test_schema_names_that_are_not_plain_identifiers_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        quote_schema(bad)


def test_schema_name_is_quoted() -> None:
    assert quote_schema("metering_1") == '"metering_1"'


def _effects() -> list[Effect]:
    return [from_dict({"org_id": "o", **e}) for e in _effect_dicts()]


def _effect_dicts() -> list[dict[str, object]]:
    return [
        {"kind": "command", "seq": 1, "command_id": "c1", "type": "member_add",
         "status": "applied", "code": None, "command": {"type": "member_add", "at_ms": 5},
         "source": "a:0", "offset": 3},
        {"kind": "ledger", "seq": 2, "member_id": "m", "source_kind": "usage", "source_id": "e1",
         "task_id": "t", "movement": "charge", "bucket": "allocation", "grant_id": None,
         "amount_mc": -1500, "cycle_start_ms": 0, "late": False, "at_ms": 9},
        {"kind": "usage", "seq": 3, "event_id": "e1", "member_id": "m", "task_id": "t",
         "credits_mc": 1500, "occurred_at_ms": 9, "status": "charged", "code": None,
         "late": False, "source": "u:0", "offset": 41},
        {"kind": "signal", "seq": 4, "member_id": "m", "signal": "pause",
         "reason": "pool_exhausted", "member_seq": 1, "issued_at_ms": 9},
        {"kind": "signal", "seq": 5, "member_id": "m", "signal": "resume", "reason": "funded",
         "member_seq": 2, "issued_at_ms": 10},
        {"kind": "invoice", "seq": 6, "cycle_start_ms": 0, "cycle_end_ms": 86_400_000,
         "negative_balance_mc": 1500, "amount_usd_cents": 2},
        {"kind": "notification", "seq": 7, "type": "pool_below_threshold", "member_id": None,
         "detail": {"balance_mc": 2500}, "at_ms": 10},
        {"kind": "refill_request", "seq": 8, "request_id": "r1", "credits_mc": 100_000,
         "amount_usd_cents": 100, "at_ms": 10},
    ]  # fmt: skip


def test_effects_become_one_row_per_table_and_the_org_high_water_mark() -> None:
    b = FlushBatch()
    b.add_effects(_effects())
    assert b.ledger == [
        ("o", 2, "m", "usage", "e1", "t", "charge", "allocation", None, -1500, 0, False, 9)
    ]
    assert b.usage == [("e1", "o", 3, "m", "t", 1500, 9, "charged", None, False, "u:0", 41)]
    assert [r[0] for r in b.commands] == ["c1"]
    assert orjson.loads(b.commands[0][6]) == {"type": "member_add", "at_ms": 5}
    # The last signal of a member is the one with the highest member seq.
    assert b.signals == {("o", "m"): ("o", "m", 5, "resume", "funded", 2, 10)}
    assert b.invoices == [("o", 6, 0, 86_400_000, 1500, 2)]
    assert b.refills == [("o", 8, "r1", 100_000, 100, 10)]
    assert b.org_seq == {"o": 8}


def test_a_compact_charge_becomes_the_same_two_rows_as_its_expanded_effects() -> None:
    charge = Charge(2, "o", "allocation", None, "e1", "m", "t", 1500, 9, False, "u:0", 41, 0, 9)
    compact, long = FlushBatch(), FlushBatch()
    compact.add_effects([charge])
    long.add_effects(charge.expand())
    # A charge waits as one object (a batch waiting for its commit holds less) until a
    # write asks for the rows; merged batches keep their charges.
    assert compact.ledger == [] and not compact.is_empty()
    merged = FlushBatch()
    merged.merge(compact)
    assert merged.rows_ready() is merged and merged.charges == []
    compact.rows_ready()
    assert compact.ledger == long.ledger == merged.ledger == _rows_of_ledger()
    assert merged.usage == compact.usage
    assert compact.usage == long.usage
    assert compact.org_seq == long.org_seq == {"o": 3}


def _rows_of_ledger() -> list[tuple[object, ...]]:
    return [("o", 2, "m", "usage", "e1", "t", "charge", "allocation", None, -1500, 0, False, 9)]


def test_offsets_only_move_forward_within_a_batch() -> None:
    b = FlushBatch()
    b.set_offset("t", 0, 10)
    b.set_offset("t", 0, 7)
    assert b.offsets == {("t", 0): 10}


def test_effect_messages_follow_the_wire_contract() -> None:
    enc = EffectEncoder(SETTINGS)
    msgs = enc.messages(_effects())
    by_topic: dict[str, list[object]] = {}
    for m in msgs:
        by_topic.setdefault(m.topic, []).append(m)
    control = by_topic[SETTINGS.topic_control]
    assert [m.key for m in control] == [b"o/m", b"o/m"]  # type: ignore[attr-defined]
    last = orjson.loads(control[-1].value)  # type: ignore[attr-defined]
    assert last == {
        "signal": "resume",
        "org_id": "o",
        "member_id": "m",
        "reason": "funded",
        "seq": 2,
        "issued_at": "1970-01-01T00:00:00.010Z",
    }
    assert dict(control[-1].headers)[HEADER_SEQ] == b"5"  # type: ignore[attr-defined]
    billing = [orjson.loads(m.value) for m in by_topic[SETTINGS.topic_billing]]  # type: ignore[attr-defined]
    assert billing[0]["type"] == "invoice"
    assert billing[0]["negative_balance_credits"] == "1.5"
    assert billing[1] == {
        "type": "refill_request",
        "request_id": "r1",
        "org_id": "o",
        "credits": "100",
        "amount_usd_cents": 100,
    }
    note = orjson.loads(by_topic[SETTINGS.topic_notifications][0].value)  # type: ignore[attr-defined]
    assert note["detail"] == {"balance": "2.5"}
    # Ledger, usage and command records are PostgreSQL's business, not Kafka's.
    assert len(msgs) == 5


def test_engine_rejection_becomes_a_dead_letter_with_the_original_bytes() -> None:
    enc = EffectEncoder(SETTINGS)
    effect = {"kind": "usage", "seq": 9, "event_id": "e9", "member_id": "m", "task_id": "t",
              "credits_mc": 1000, "occurred_at_ms": 0, "status": "rejected",
              "code": "member_removed", "late": False, "source": "credits.usage.v1:3",
              "offset": 77}  # fmt: skip
    original = RawSource(b"key", b'{"original": true}', "credits.usage.v1", 3, 77)
    typed = from_dict({"org_id": "o", **effect})
    [dl] = enc.messages([typed], lambda ident: original if ident == "e|e9" else None)
    assert dl.topic == SETTINGS.topic_usage_dlq
    assert (dl.key, dl.value) == (b"key", b'{"original": true}')
    headers = dict(dl.headers)
    assert headers["error.code"] == b"member_removed"
    assert headers["source.topic"] == b"credits.usage.v1"
    assert headers["source.partition"] == b"3"
    assert headers["source.offset"] == b"77"
    # Without the original at hand (outbox drained after a crash) the input is re-encoded.
    [again] = enc.messages([typed], None)
    assert orjson.loads(again.value)["event_id"] == "e9"
    assert dict(again.headers)["error.code"] == b"member_removed"


def test_ids_of_a_rejected_message_are_read_when_it_is_json() -> None:
    assert readable_ids(b'{"event_id": "e1", "org_id": "o", "credits": -1}') == {
        "event_id": "e1",
        "org_id": "o",
    }
    assert readable_ids(b"{nope") == {}
    assert readable_ids(b"[1]") == {}
    assert readable_ids(b'{"event_id": ""}') == {}


NOW = 1_000_000
GRACE = 300_000


def _verdict(**kw: object) -> Verdict:
    args: dict[str, object] = {
        "is_usage": True,
        "status": "applied",
        "code": None,
        "has_effect": False,
        "parked_at_ms": None,
        "now_ms": NOW,
        "grace_ms": GRACE,
        "park_room": True,
    }
    args.update(kw)
    return classify(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("case", "kw", "want"),
    [
        ("charged", {}, Verdict(Action.CHARGED)),
        ("charged parked retry", {"parked_at_ms": NOW - 1}, Verdict(Action.CHARGED, unpark=True)),
        ("duplicate", {"status": "duplicate"}, Verdict(Action.DUPLICATE)),
        ("replayed", {"status": "replayed"}, Verdict(Action.REPLAYED)),
        (
            "replayed offset whose claim is new: decided by nothing, sent to its partition again",
            {"status": "replayed", "fresh_claim": True},
            Verdict(Action.RESEND),
        ),
        (
            "replayed command whose claim is new: sent again too",
            {"is_usage": False, "status": "replayed", "fresh_claim": True},
            Verdict(Action.RESEND),
        ),
        ("replayed command", {"is_usage": False, "status": "replayed"}, Verdict(Action.REPLAYED)),
        (
            "unknown member parks",
            {"status": "unknown", "code": "unknown_member"},
            Verdict(Action.PARK, "unknown_member"),
        ),
        (
            "lot full: rejected at once",
            {"status": "unknown", "code": "unknown_org", "park_room": False},
            Verdict(Action.PIPELINE_REJECTS, "unknown_org"),
        ),
        (
            "parked within grace",
            {"status": "unknown", "code": "unknown_org", "parked_at_ms": NOW - GRACE + 1},
            Verdict(Action.STILL_PARKED),
        ),
        (
            "parked past grace",
            {"status": "unknown", "code": "unknown_org", "parked_at_ms": NOW - GRACE},
            Verdict(Action.PIPELINE_REJECTS, "unknown_org", unpark=True),
        ),
        (
            "rule rejection with its usage record",
            {"status": "rejected", "code": "member_removed", "has_effect": True},
            Verdict(Action.ENGINE_REJECTED, "member_removed"),
        ),
        (
            "rule rejection without a record",
            {"status": "rejected", "code": "invalid_amount"},
            Verdict(Action.PIPELINE_REJECTS, "invalid_amount"),
        ),
        ("command applied", {"is_usage": False}, Verdict(Action.COMMAND_APPLIED)),
        (
            "command for an unknown org",
            {"is_usage": False, "status": "rejected", "code": "unknown_org"},
            Verdict(Action.COMMAND_PIPELINE_REJECTS, "unknown_org"),
        ),
        (
            "command rejected by the rules",
            {"is_usage": False, "status": "rejected", "code": "unknown_tier", "has_effect": True},
            Verdict(Action.COMMAND_ENGINE_REJECTED, "unknown_tier"),
        ),
        (
            "usage read away from its org's home: sent on",
            {"status": "elsewhere", "code": "3"},
            Verdict(Action.FORWARD, "3"),
        ),
        (
            "command read away from its org's home: sent on",
            {"is_usage": False, "status": "elsewhere", "code": "0"},
            Verdict(Action.FORWARD, "0"),
        ),
        (
            "parked retry of an org homed elsewhere: handed to that partition, even past grace",
            {"status": "elsewhere", "code": "5", "parked_at_ms": NOW - GRACE},
            Verdict(Action.MOVE_PARKED, "5"),
        ),
    ],
)
def test_classify(case: str, kw: dict[str, object], want: Verdict) -> None:
    assert _verdict(**kw) == want, case


def test_fault_injection_hook_is_off_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("METERING_CRASH_AT", raising=False)
    assert _crash_plan() is None
    monkeypatch.setenv("METERING_CRASH_AT", "after_publish:3")
    assert _crash_plan() == ("after_publish", 3)
    monkeypatch.setenv("METERING_CRASH_AT", "after_script")
    assert _crash_plan() == ("after_script", 1)
    monkeypatch.setenv("METERING_CRASH_AT", "somewhere")
    with pytest.raises(ValueError):
        _crash_plan()


def test_reference_orchestrator_consumer_drops_repeats_and_stale_signals() -> None:
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "orchestrator_consumer.py"
    spec = importlib.util.spec_from_file_location("orchestrator_consumer", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while being defined
    try:
        spec.loader.exec_module(mod)
    finally:
        del sys.modules[spec.name]

    def rec(signal: str, seq: int) -> bytes:
        return orjson.dumps(
            {"signal": signal, "org_id": "o", "member_id": "m", "reason": "r", "seq": seq,
             "issued_at": "2026-01-01T00:00:00Z"}
        )  # fmt: skip

    view = mod.ControlView()
    assert view.apply(rec("pause", 1)) is not None
    assert view.apply(rec("pause", 1)) is None  # re-published after a crash
    assert view.apply(rec("resume", 2)) is not None
    assert view.apply(rec("pause", 1)) is None  # older record arriving late
    assert not view.paused("o", "m")
    assert view.dropped == 2
    # The example's key reader inverts the worker's key encoding for every id.
    from schemas.encode import control_key

    for org, member in [("a/b", "c"), ("a", "b/c"), ("100%", "%2F"), ("{}:", "😀/%25")]:
        assert mod.split_key(control_key(org, member)) == (org, member)


async def test_reference_cycles_are_collected_while_automatic_gc_is_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The pipeline turns automatic collection off; its timer must still free cycles (a worker
    # that runs for months would otherwise grow with every traceback a library keeps).
    import asyncio
    import gc
    import weakref

    from worker.pipeline import pipeline as consumer

    class Node:
        peer: Node

    monkeypatch.setattr(consumer, "GC_INTERVAL_SECONDS", 0.01)
    was_enabled = gc.isenabled()
    gc.disable()
    collector = asyncio.create_task(consumer.collect_garbage())
    try:
        a, b = Node(), Node()
        a.peer, b.peer = b, a
        gone = weakref.ref(a)
        del a, b
        assert gone() is not None  # a cycle: reference counting alone never frees it
        for _ in range(100):
            await asyncio.sleep(0.01)
            if gone() is None:
                break
        assert gone() is None
    finally:
        collector.cancel()
        if was_enabled:
            gc.enable()


async def test_the_commit_stage_commits_what_was_applied_within_the_interval_together() -> None:
    """A commit waits up to the interval for more applied batches (one transaction for the
    small batches of live traffic), but not once the queue is half full or has ended."""
    q = CommitQueue(max_records=100)
    await q.put(Batch(1, records=10), wait_seconds=1)
    taking = asyncio.create_task(q.take_all(linger_until=time.monotonic() + 0.5))
    await asyncio.sleep(0.05)
    await q.put(Batch(2, records=10), wait_seconds=1)
    batches, ended = await asyncio.wait_for(taking, 5)
    assert [b.number for b in batches] == [1, 2]
    assert not ended
    q.done(batches)

    # Half full: taken at once, however long the interval.
    q = CommitQueue(max_records=100)
    await q.put(Batch(3, records=50), wait_seconds=1)
    batches, _ = await asyncio.wait_for(q.take_all(linger_until=time.monotonic() + 60), 5)
    assert [b.number for b in batches] == [3]

    # The end (shutdown): taken at once.
    q = CommitQueue(max_records=100)
    await q.put(Batch(4, records=1), wait_seconds=1)
    await q.put(None, wait_seconds=1)
    batches, ended = await asyncio.wait_for(q.take_all(linger_until=time.monotonic() + 60), 5)
    assert [b.number for b in batches] == [4]
    assert ended


class _BufferedConsumer:
    """What ``Intake.fetch`` asks of aiokafka: the assignment, and ``getmany`` of one partition
    (or of all) from records already buffered."""

    def __init__(self, waiting: dict[TopicPartition, int]) -> None:
        self.buffers = {tp: list(range(n)) for tp, n in waiting.items()}

    def assignment(self) -> set[TopicPartition]:
        return set(self.buffers)

    async def getmany(
        self, *tps: TopicPartition, timeout_ms: int = 0, max_records: int = 0
    ) -> dict[TopicPartition, list[int]]:
        out: dict[TopicPartition, list[int]] = {}
        for tp in tps or sorted(self.buffers, key=lambda t: (t.topic, t.partition)):
            buf = self.buffers[tp]
            take = buf[: max_records - sum(len(r) for r in out.values())]
            if take:
                del buf[: len(take)]
                out[tp] = take
        return out


async def test_a_backlog_batch_comes_from_few_partitions_in_turn_and_none_waits_long() -> None:
    """Live traffic (less waiting than a batch takes) is fetched whole; in a backlog every
    partition with data gets a share (a lone urgent record is never held back), the rest of the
    batch comes from one partition after the other (an org's events together), and each batch
    goes on where the last one stopped."""
    usage = [TopicPartition(SETTINGS.topic_usage, p) for p in range(6)]
    admin = TopicPartition(SETTINGS.topic_admin, 0)
    intake = Intake(SETTINGS, None, None, None)  # type: ignore[arg-type]

    shallow = _BufferedConsumer({**{tp: 50 for tp in usage}, admin: 3})
    got = await intake.fetch(shallow, timeout_ms=0, max_records=2_400)  # type: ignore[arg-type]
    assert {tp: len(r) for tp, r in got.items()} == {**{tp: 50 for tp in usage}, admin: 3}

    deep = _BufferedConsumer({**{tp: 10_000 for tp in usage[:5]}, usage[5]: 1, admin: 1})
    intake = Intake(SETTINGS, None, None, None)  # type: ignore[arg-type]
    fair = 2_400 // (SHARE_DIVISOR * 7)
    focused: list[TopicPartition] = []
    for _ in range(5):
        got = await intake.fetch(deep, timeout_ms=0, max_records=2_400)  # type: ignore[arg-type]
        # At least the batch asked for, at most half more (a fetched run is taken whole).
        assert 2_400 <= sum(len(r) for r in got.values()) <= 3_600
        for recs in got.values():
            assert recs == sorted(recs)  # each partition's records in offset order
        big = [tp for tp, recs in got.items() if len(recs) > fair]
        assert len(big) == 1  # the rest of the batch from one partition
        focused.append(big[0])
        if len(focused) == 1:
            # The urgent records of the other partitions came in the first batch.
            assert got[usage[5]] == [0] and got[admin] == [0]
    assert focused == usage[:5]  # in turn: every deep partition once in five batches


async def test_batches_smaller_than_the_partitions_count_still_reach_every_partition() -> None:
    """A batch of fewer records than partitions (a small ``METERING_BATCH_MAX_RECORDS``, or
    the sizer's smallest batches) holds one record of a few partitions: the next batch goes on
    with the partitions after them, so none waits behind the others' backlogs."""
    usage = [TopicPartition(SETTINGS.topic_usage, p) for p in range(12)]
    deep = _BufferedConsumer({tp: 1_000 for tp in usage})
    intake = Intake(SETTINGS, None, None, None)  # type: ignore[arg-type]
    reached: set[TopicPartition] = set()
    for _ in range(3):
        got = await intake.fetch(deep, timeout_ms=0, max_records=5)  # type: ignore[arg-type]
        assert sum(len(r) for r in got.values()) == 5
        reached.update(got)
    assert reached == set(usage)


async def test_a_drawn_batch_takes_a_partitions_fetched_records_whole() -> None:
    """What a partition has fetched is drawn in one batch, even when that is more than the
    batch's size: split over two batches, its orgs would each cost two engine calls (a
    fetch of sparse events is a little over 20,000 records, the batch size 20,000). The
    draw stops once the batch is half full, so a batch holds at most half more."""
    usage = [TopicPartition(SETTINGS.topic_usage, p) for p in range(6)]
    fetched = _BufferedConsumer({tp: 3_000 for tp in usage})
    intake = Intake(SETTINGS, None, None, None)  # type: ignore[arg-type]
    drawn: list[TopicPartition] = []
    for _ in range(3):
        got = await intake.fetch(fetched, timeout_ms=0, max_records=2_400)  # type: ignore[arg-type]
        total = sum(len(r) for r in got.values())
        assert 2_400 <= total <= 3_600
        big = [tp for tp, recs in got.items() if len(recs) > 2_400 // 6]
        assert len(big) == 1
        assert fetched.buffers[big[0]] == []  # nothing of its fetch left for a later batch
        drawn.append(big[0])
    assert len(set(drawn)) == 3  # in turn

    # A partition with only a little left (the end of its fetch): the draw goes on to the
    # next partition's whole fetch.
    tail = _BufferedConsumer({usage[0]: 500, usage[1]: 3_000, usage[2]: 3_000})
    intake = Intake(SETTINGS, None, None, None)  # type: ignore[arg-type]
    got = await intake.fetch(tail, timeout_ms=0, max_records=2_400)  # type: ignore[arg-type]
    share = 2_400 // (SHARE_DIVISOR * 3)
    taken = {tp: len(r) for tp, r in got.items()}
    assert taken == {usage[0]: 500, usage[1]: 3_000, usage[2]: share}


class _Claims:
    """The claims and the PostgreSQL probe of ``drop_decided``, answering from a script."""

    def __init__(self, verdicts: dict[str, int], decided: set[str]) -> None:
        self.verdicts = verdicts
        self.decided = decided
        self.asked: list[tuple[str, str]] = []

    async def claim(self, entries: list[tuple[str, str]], passed: object = ()) -> list[int]:
        self.asked = list(entries)
        return [self.verdicts.get(claim_id, CLAIM_NEW) for claim_id, _ in entries]

    async def decided_ids(self, events: list[str], commands: list[str]) -> tuple[set, set]:
        return {e for e in events if e in self.decided}, set()

    async def retry(self, _what: str, call):  # type: ignore[no-untyped-def]
        return await call()


def _usage_batch(ids_by_org: dict[str, list[str]]) -> Batch:
    batch = Batch(1)
    offset = 0
    for org, ids in ids_by_org.items():
        for ident in ids:
            offset += 1
            raw = RawSource(org.encode(), b"{}", SETTINGS.topic_usage, 3, offset)
            item = UsageItem(ident, "m", "t", 1_000, 0, f"{SETTINGS.topic_usage}:3", offset)
            batch.by_org[org].append(Pending(ident, True, item, raw))
    batch.records = offset
    return batch


@pytest.mark.parametrize("dropped", [None, "e2", "e3"])
async def test_the_decided_id_check_keeps_new_records_and_records_their_claims(
    dropped: str | None,
) -> None:
    """Records whose ids are free go on in their order, each claim recorded as held here and
    its record told whether the claim is new (a replay of the same record is not); a record
    whose id is taken (e2) or already in PostgreSQL (e3) is a duplicate, and the others are
    unaffected. (Most batches drop nothing and take a bulk path; the rest go record by
    record: both must give the same.)"""
    claims = _Claims({"e|e4": CLAIM_MINE, "e|e2": CLAIM_TAKEN if dropped == "e2" else CLAIM_NEW},
                     {"e3"} if dropped == "e3" else set())  # fmt: skip
    intake = Intake(SETTINGS, claims, claims, claims)  # type: ignore[arg-type]
    batch = _usage_batch({"acme": ["e1", "e2"], "bolt": ["e3", "e4"]})
    await intake.drop_decided(batch)
    kept = {org: [p.ident for p in ps] for org, ps in batch.by_org.items()}
    every = {"acme": ["e1", "e2"], "bolt": ["e3", "e4"]}
    if dropped:
        every = {org: [i for i in ids if i != dropped] for org, ids in every.items()}
    assert kept == every
    assert batch.counts["duplicate"] == (1 if dropped else 0)
    held = [i for ids in every.values() for i in ids]
    assert batch.claimed == [f"e|{i}" for i in held]
    assert {k: v for k, v in intake.in_flight.items()} == {
        claim_id: claim for claim_id, claim in claims.asked if claim_id[2:] in held
    }
    fresh = {p.ident: p.fresh_claim for ps in batch.by_org.values() for p in ps}
    assert fresh == {i: i != "e4" for i in held}
    intake.release(batch)
    assert intake.in_flight == {}


def test_large_buffers_are_mapped_unless_the_operator_chose(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from worker.pipeline.pipeline import tune_malloc

    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert tune_malloc() is True  # glibc (Debian): the fixed threshold is taken
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert tune_malloc() is False  # the environment's own setting stays
