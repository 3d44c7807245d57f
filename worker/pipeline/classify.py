"""What the pipeline does with each engine outcome: a pure function, testable without services.

The engine says what became of an item (``applied``, ``duplicate``, ``replayed``,
``rejected`` + code, ``unknown`` + code, ``elsewhere`` + the org's home partition). The
pipeline still has to decide what that means for the input record: count it, park it (the org
or member may be created soon), send it on to its org's home, dead-letter it itself, or leave
the dead letter to the effect the engine recorded. :func:`classify` is that
decision, in one place; ``worker/pipeline/apply.py`` carries it out.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Action(Enum):
    """What the pipeline does with one decided (or undecided) input."""

    CHARGED = "charged"  # usage applied: rows come from the engine's effects
    COMMAND_APPLIED = "command_applied"
    DUPLICATE = "duplicate"  # counted, nothing else
    COMMAND_DUPLICATE = "command_duplicate"
    REPLAYED = "replayed"  # an offset the engine already applied: nothing
    RESEND = "resend"  # an offset the engine passed undecided: sent to its partition again
    PARK = "park"  # unknown org/member: wait in the parking lot for the grace period
    STILL_PARKED = "still_parked"  # a parked retry that is still unknown, within its grace
    ENGINE_REJECTED = "engine_rejected"  # the engine recorded the rejection: its effect is the DLQ
    PIPELINE_REJECTS = "pipeline_rejects"  # the pipeline dead-letters and records it itself
    COMMAND_ENGINE_REJECTED = "command_engine_rejected"
    COMMAND_PIPELINE_REJECTS = "command_pipeline_rejects"
    FORWARD = "forward"  # the org's home is another partition: send the record on there
    MOVE_PARKED = "move_parked"  # a parked retry of such an org: the home's owner retries it


@dataclass(frozen=True, slots=True)
class Verdict:
    """``action`` for one input; ``code`` for rejections; ``unpark`` deletes its parked row."""

    action: Action
    code: str | None = None
    unpark: bool = False


def classify(
    *,
    is_usage: bool,
    status: str,
    code: str | None,
    has_effect: bool,
    parked_at_ms: int | None,
    now_ms: int,
    grace_ms: int,
    park_room: bool,
    fresh_claim: bool = False,
) -> Verdict:
    """The pipeline's verdict on one engine outcome.

    ``has_effect``: the engine left a ``usage``/``command`` record for the input (so its
    decision and dead letter come from the outbox). ``parked_at_ms``: when the input was parked
    (a retry), None for an input read from Kafka. ``park_room``: the parking lot may take one
    more event of this org (per-org and total caps). ``fresh_claim``: the input's claim on its
    id was new in this attempt (no record held the id) and no engine call of this attempt can
    have applied it yet (a call that failed may have: then it is False).

    ``replayed`` with a fresh claim is an offset the engine passed without deciding it: an
    earlier attempt dropped the record as a copy of another that then decided nothing (it was
    sent on to its org's home and gave its claim up), and a crash made this attempt read the
    record again. Nothing holds its id, and the engine will not decide this offset: the record
    is sent to its own partition again (``RESEND``), where the new copy is decided like any
    first record, or is a duplicate of the sent-on copy if that one claims first. Counting it
    replayed would hold the id with a claim that decides nothing, and the id would be lost.
    """
    parked = parked_at_ms is not None
    if status == "elsewhere":
        # Decided by the owner of the org's home partition (docs/delivery.md "One owner per
        # org"); ``code`` names it.
        return Verdict(Action.MOVE_PARKED if parked else Action.FORWARD, code)
    if not is_usage:
        if status == "applied":
            return Verdict(Action.COMMAND_APPLIED)
        if status == "duplicate":
            return Verdict(Action.COMMAND_DUPLICATE)
        if status == "replayed":
            return Verdict(Action.RESEND if fresh_claim else Action.REPLAYED)
        if has_effect:
            return Verdict(Action.COMMAND_ENGINE_REJECTED, code)
        # Rejected without a record in the org's outbox (the org does not exist).
        return Verdict(Action.COMMAND_PIPELINE_REJECTS, code or "rejected")
    if status == "applied":
        return Verdict(Action.CHARGED, unpark=parked)
    if status == "duplicate":
        return Verdict(Action.DUPLICATE, unpark=parked)
    if status == "replayed":
        return Verdict(Action.RESEND if fresh_claim else Action.REPLAYED)
    if status == "unknown":
        reason = code or "unknown_org"
        if not parked:
            if park_room:
                return Verdict(Action.PARK, reason)
            # The parking lot is full for this org (or in all): no wait, rejected at once.
            return Verdict(Action.PIPELINE_REJECTS, reason)
        if now_ms - parked_at_ms >= grace_ms:  # type: ignore[operator]
            return Verdict(Action.PIPELINE_REJECTS, reason, unpark=True)
        return Verdict(Action.STILL_PARKED)
    # Rejected by the rules (e.g. member_removed): a usage record usually carries it.
    if has_effect:
        return Verdict(Action.ENGINE_REJECTED, code, unpark=parked)
    return Verdict(Action.PIPELINE_REJECTS, code or "rejected", unpark=parked)
