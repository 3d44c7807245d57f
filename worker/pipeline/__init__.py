"""The worker's consumer pipeline: intake -> apply -> commit (see ``pipeline.py``).

- ``intake``: decode, dead-letter what is malformed, drop what is already decided;
- ``apply``: the engine calls, per org and chunk; ``classify``: what each outcome means;
- ``commit``: Kafka acks, the PostgreSQL transaction, outbox ack, offsets (the write order and
  the crash notes are its docstring);
- ``parking``: events waiting for their org or member; ``backoff``: outages vs data errors;
- ``batch``: what a batch carries; ``assignor``: one owner per org (co-partitioned
  assignment); ``faults``: the crash-test hook.
"""

from worker.pipeline.backoff import Backoff, DataFailure, GaveUp
from worker.pipeline.batch import Stats
from worker.pipeline.pipeline import Pipeline, ShutdownIncomplete, StartRefused

__all__ = [
    "Backoff",
    "DataFailure",
    "GaveUp",
    "Pipeline",
    "ShutdownIncomplete",
    "StartRefused",
    "Stats",
]
