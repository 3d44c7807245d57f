"""Prometheus metrics: every metric object of the worker, in one registry.

The metric names are a contract with ``deploy/prometheus-rules.yaml`` and
``deploy/grafana-dashboard.json`` (``tests/unit/test_deploy.py`` checks that every name those
files use is exported here). Import the objects or use the helpers; never create metrics
elsewhere, so one ``/metrics`` scrape shows the whole process.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    generate_latest,
)

from worker import __version__

# ``*_created`` series double the scrape size and no alert or panel uses them.
disable_created_metrics()  # type: ignore[no-untyped-call]

REGISTRY = CollectorRegistry(auto_describe=True)
"""The one registry of the process; ``/metrics`` renders exactly this."""

CONTENT_TYPE = CONTENT_TYPE_LATEST

EVENT_OUTCOMES = ("processed", "charged", "duplicate", "replayed", "rejected", "parked")
"""Values of the ``outcome`` label of ``metering_events_total``."""

# Batches are bounded by Settings.batch_max_records (default 5,000).
_BATCH_SIZE_BUCKETS = (1, 5, 10, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000)
# Latencies run from sub-millisecond Lua calls to multi-second stalls during a broker failover.
_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)

# --- Kafka ---------------------------------------------------------------------------------------
CONSUMER_LAG = Gauge(
    "metering_consumer_lag",
    "Log end offset minus the next offset to process, per input partition.",
    ["topic", "partition"],
    registry=REGISTRY,
)
CONSUMER_LAG_UPDATED = Gauge(
    "metering_consumer_lag_updated_timestamp_seconds",
    "Unix time of the last successful consumer-lag refresh (staleness check for alerts).",
    registry=REGISTRY,
)
ASSIGNED_PARTITIONS = Gauge(
    "metering_assigned_partitions",
    "Input partitions currently assigned to this worker.",
    ["topic"],
    registry=REGISTRY,
)
REBALANCES = Counter(
    "metering_rebalances_total",
    "Consumer-group rebalances seen by this worker.",
    registry=REGISTRY,
)
DLQ_MESSAGES = Counter(
    "metering_dlq_messages_total",
    "Messages published to a dead-letter topic.",
    ["topic"],
    registry=REGISTRY,
)
FORWARDED_MESSAGES = Counter(
    "metering_forwarded_messages_total",
    "Input records sent on to their org's home partition (a producer that does not key by "
    "org), by input topic.",
    ["topic"],
    registry=REGISTRY,
)
PUBLISHED_MESSAGES = Counter(
    "metering_published_messages_total",
    "Effect messages published (control, notifications, billing), by topic.",
    ["topic"],
    registry=REGISTRY,
)

# --- Events and commands -------------------------------------------------------------------------
EVENTS = Counter(
    "metering_events",
    "Usage events by outcome: processed (every decided event), charged, duplicate, replayed, "
    "rejected, parked (waiting for the org or member to exist).",
    ["outcome"],
    registry=REGISTRY,
)
EVENTS_REJECTED = Counter(
    "metering_events_rejected",
    "Usage events rejected to the dead-letter topic, by error code.",
    ["reason"],
    registry=REGISTRY,
)
COMMANDS = Counter(
    "metering_admin_commands",
    "Admin commands by type and status (applied, rejected, duplicate).",
    ["type", "status"],
    registry=REGISTRY,
)
CREDITS_CHARGED = Counter(
    "metering_credits_charged_millicredits",
    "Millicredits charged to usage, by bucket (promo, allocation, pool, debt).",
    ["bucket"],
    registry=REGISTRY,
)
SIGNALS = Counter(
    "metering_signals",
    "Pause/resume signals emitted, by signal and reason.",
    ["signal", "reason"],
    registry=REGISTRY,
)
NOTIFICATIONS = Counter(
    "metering_notifications",
    "Notifications emitted, by type.",
    ["type"],
    registry=REGISTRY,
)
REFILL_REQUESTS = Counter(
    "metering_refill_requests",
    "Auto-refill requests published to the billing topic.",
    registry=REGISTRY,
)
REFILL_FAILURES = Counter(
    "metering_refill_failures",
    "Auto-refill results with status failed (the org's pool is locked until funded).",
    registry=REGISTRY,
)
INVOICES = Counter(
    "metering_invoices",
    "Invoice records published at cycle end.",
    registry=REGISTRY,
)
PARKED_EVENTS = Gauge(
    "metering_parked_events",
    "Usage events waiting for their org or member to be created (grace period).",
    registry=REGISTRY,
)

# --- Batches and stores --------------------------------------------------------------------------
BATCH_SIZE = Histogram(
    "metering_batch_size",
    "Records per fetched batch.",
    buckets=_BATCH_SIZE_BUCKETS,
    registry=REGISTRY,
)
BATCH_SECONDS = Histogram(
    "metering_batch_seconds",
    "Wall time to process one batch end to end (decode, apply, flush, publish, commit).",
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
PG_FLUSH_SECONDS = Histogram(
    "metering_pg_flush_seconds",
    "Wall time of one PostgreSQL flush transaction (ledger rows and offsets).",
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
REDIS_SCRIPT_SECONDS = Histogram(
    "metering_redis_script_seconds",
    "Wall time of one Redis script call, by script.",
    ["script"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
OUTBOX_DEPTH = Gauge(
    "metering_outbox_depth",
    "Effects in Redis outboxes not yet acknowledged (written to PostgreSQL and Kafka).",
    registry=REGISTRY,
)
REBUILDS = Counter(
    "metering_rebuilds",
    "Redis state rebuilds from the PostgreSQL ledger.",
    ["reason"],
    registry=REGISTRY,
)
SNAPSHOTS = Counter(
    "metering_snapshots",
    "Org states read for a snapshot (stored by the batch's commit when the ledger covers them).",
    registry=REGISTRY,
)
ERRORS = Counter(
    "metering_errors",
    "Errors caught and retried by the worker loop, by stage (kafka, redis, postgres, publish).",
    ["stage"],
    registry=REGISTRY,
)

INPUT_TOPICS_MISSING = Gauge(
    "metering_input_topics_missing",
    "Input topics (usage, admin) the broker does not know: nothing can be consumed from them.",
    registry=REGISTRY,
)
QUARANTINED = Counter(
    "metering_quarantined",
    "Records set aside because a store refused their content (a data error, not an outage): "
    "stage engine (dead-lettered with engine_failed) or postgres (rows in quarantined_rows, "
    "inputs dead-lettered with storage_failed). Any increase needs an operator.",
    ["stage"],
    registry=REGISTRY,
)

# --- Process -------------------------------------------------------------------------------------
WORKER_UP = Gauge(
    "metering_worker_up",
    "1 while the worker loop runs and its dependencies are reachable, 0 otherwise.",
    registry=REGISTRY,
)
BUILD_INFO = Info(
    "metering_build",
    "Version of the running worker.",
    registry=REGISTRY,
)
BUILD_INFO.info({"version": __version__})
HTTP_REQUESTS = Counter(
    "metering_http_requests",
    "HTTP API requests, by route and status code.",
    ["route", "status"],
    registry=REGISTRY,
)

# Pre-create label values users filter on, so a dashboard shows 0 rather than "no data" and
# rate() alerts have a series to work with before the first event.
for _outcome in EVENT_OUTCOMES:
    EVENTS.labels(outcome=_outcome)
REFILL_REQUESTS.inc(0)
WORKER_UP.set(0)


# --- Helpers -------------------------------------------------------------------------------------
def count_outcomes(counts: Mapping[str, int]) -> None:
    """Add per-outcome event counts of one batch (keys from ``EVENT_OUTCOMES``)."""
    for outcome, n in counts.items():
        if n:
            EVENTS.labels(outcome=outcome).inc(n)


def count_rejected(reason: str, n: int = 1) -> None:
    """Count rejected usage events: both the outcome total and the per-reason counter."""
    EVENTS.labels(outcome="rejected").inc(n)
    EVENTS_REJECTED.labels(reason=reason).inc(n)


def charge(bucket: str, amount_mc: int) -> None:
    """Add millicredits charged from ``bucket`` (positive amount)."""
    if amount_mc > 0:
        CREDITS_CHARGED.labels(bucket=bucket).inc(amount_mc)


_SIGNAL_COUNTERS: dict[tuple[str, str], Any] = {}


def signal(signal_name: str, reason: str) -> None:
    """Count one pause/resume signal (one per pause under live traffic: the labelled counter
    is looked up once per signal and reason, not at every signal)."""
    counter = _SIGNAL_COUNTERS.get((signal_name, reason))
    if counter is None:
        counter = SIGNALS.labels(signal=signal_name, reason=reason)
        if len(_SIGNAL_COUNTERS) < 1000:  # the engine's reasons are a short fixed list
            _SIGNAL_COUNTERS[(signal_name, reason)] = counter
    counter.inc()


def dlq(topic: str, n: int = 1) -> None:
    """Count messages published to a dead-letter topic."""
    DLQ_MESSAGES.labels(topic=topic).inc(n)


def set_lag(topic: str, partition: int, lag: int) -> None:
    """Set the consumer lag of one partition (negative values are clamped to 0)."""
    CONSUMER_LAG.labels(topic=topic, partition=str(partition)).set(max(0, lag))


def forget_lag(topic: str, partition: int) -> None:
    """Drop the lag series of a partition this worker no longer owns (after a rebalance)."""
    with suppress(KeyError):
        CONSUMER_LAG.remove(topic, str(partition))


@contextmanager
def timed(histogram: Histogram, **labels: str) -> Iterator[None]:
    """Observe the wall time of the ``with`` block in ``histogram`` (with optional labels)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        target = histogram.labels(**labels) if labels else histogram
        target.observe(time.perf_counter() - start)


def redis_script_timer(script: str) -> Histogram:
    """The ``metering_redis_script_seconds`` child for ``script`` (use ``.time()``)."""
    return REDIS_SCRIPT_SECONDS.labels(script=script)


def render() -> bytes:
    """The registry in Prometheus text format."""
    return generate_latest(REGISTRY)


def exported_names() -> set[str]:
    """Every sample name this registry can export (``_total``, ``_bucket``... included)."""
    names: set[str] = set()
    for metric in REGISTRY.collect():
        names.add(metric.name)
        for sample in metric.samples:
            names.add(sample.name)
        if metric.type == "counter":
            names.update({metric.name + "_total", metric.name + "_created"})
        elif metric.type == "histogram":
            names.update(
                metric.name + suffix for suffix in ("_bucket", "_count", "_sum", "_created")
            )
        elif metric.type == "info":
            names.add(metric.name + "_info")
    return names


def rebuilt(reason: str) -> None:
    """Count one Redis rebuild from the ledger (``reason``: e.g. ``redis_behind``, ``manual``)."""
    REBUILDS.labels(reason=reason).inc()
