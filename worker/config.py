"""Settings: one frozen class, every field overridable with a ``METERING_`` environment variable.

``python -m worker --check-config`` validates the environment and prints the effective settings
with secrets masked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from schemas.ids import is_valid_id
from worker.tokens import parse_tokens

# Ports are deliberately off the well-known ones so the local stack never clashes with a
# system Redis (6379), PostgreSQL (5432) or Kafka (9092) that may already run on the machine.
DEFAULT_KAFKA_PORT = 19092
DEFAULT_KAFKA_CONTROLLER_PORT = 19093
DEFAULT_REDIS_PORT = 16379
DEFAULT_REDIS_CLUSTER_PORTS = (17001, 17002, 17003)
DEFAULT_POSTGRES_PORT = 15432


class Settings(BaseSettings):
    """Worker, CLI and stack configuration (env prefix ``METERING_``)."""

    model_config = SettingsConfigDict(
        env_prefix="METERING_",
        frozen=True,
        extra="forbid",
        env_file=None,
    )

    # --- Kafka -------------------------------------------------------------------------------
    kafka_bootstrap: str = f"127.0.0.1:{DEFAULT_KAFKA_PORT}"
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = None
    kafka_ssl_certfile: Path | None = None
    kafka_ssl_keyfile: Path | None = None
    consumer_group: str = "credit-metering"
    client_id: str = "credit-metering-worker"

    topic_usage: str = "credits.usage.v1"
    topic_admin: str = "credits.admin.v1"
    topic_control: str = "credits.control.v1"
    topic_notifications: str = "credits.notifications.v1"
    topic_billing: str = "credits.billing.v1"
    topic_usage_dlq: str = "credits.usage.dlq.v1"
    topic_admin_dlq: str = "credits.admin.dlq.v1"
    topic_partitions: int = Field(default=6, ge=1, le=1024)

    # --- Redis -------------------------------------------------------------------------------
    redis_url: SecretStr = SecretStr(f"redis://127.0.0.1:{DEFAULT_REDIS_PORT}/0")
    redis_cluster: bool = False
    redis_key_prefix: str = "m"
    redis_shards: int = Field(default=16, ge=1, le=16384)
    """Virtual shards the orgs' keys are spread over (hash tags ``{s0}``..): one engine call
    applies many orgs of one shard. Fixed for a deployment's data: changing it means
    ``metering rebuild`` (docs/engine.md, "Key layout")."""

    # --- PostgreSQL --------------------------------------------------------------------------
    postgres_dsn: SecretStr = SecretStr(
        f"postgresql://metering@127.0.0.1:{DEFAULT_POSTGRES_PORT}/metering"
    )
    postgres_schema: str = "metering"
    postgres_sslmode: Literal["disable", "prefer", "require", "verify-ca", "verify-full"] = "prefer"
    postgres_pool_size: int = Field(default=4, ge=1, le=64)

    # --- Product rules -----------------------------------------------------------------------
    tiers: dict[str, int] = Field(default_factory=lambda: {"pro": 500, "max": 15_000})
    pool_block_credits: int = Field(default=500, ge=1)
    unknown_grace_seconds: int = Field(default=300, ge=0)
    max_clock_skew_seconds: int = Field(default=300, ge=0)
    max_message_bytes: int = Field(default=65_536, ge=1024)
    tick_interval_seconds: float = Field(default=0.0, ge=0.0)
    dedupe_window_seconds: int = Field(default=600, ge=1)
    claim_shards: int = Field(default=16, ge=1, le=1024)
    """Hash tags the global id claims are spread over (Redis Cluster slots)."""
    parked_max_per_org: int = Field(default=1_000, ge=0)
    """Usage events of one unknown org (or its unknown members) that may wait in the parking
    lot; more are dead-lettered at once with ``unknown_org``/``unknown_member``."""
    parked_max_total: int = Field(default=100_000, ge=0)
    """Usage events that may wait in the parking lot in all."""

    # --- Worker loop -------------------------------------------------------------------------
    batch_max_records: int = Field(default=20_000, ge=1)
    batch_timeout_ms: int = Field(default=100, ge=1)
    batch_target_seconds: float = Field(default=1.0, ge=0.0)
    """A batch grows (up to ``batch_max_records``) until applying it takes about this long:
    the latency a deep backlog adds; 0 turns the sizing off (always the maximum). A backlog
    batch may exceed the size by half, to take a partition's fetch whole (``Intake.fetch``)."""
    commit_interval_ms: int = Field(default=50, ge=0)
    """Shortest time between the starts of two commits (PostgreSQL transaction, outbox ack,
    Kafka commit): the batches applied meanwhile are committed together. Signals do not wait
    for it (they are published as the engine returns); the ledger and the committed offsets
    lag by up to this much more. 0: commit as soon as a batch is applied."""
    snapshot_every_effects: int = Field(default=10_000, ge=0)
    """An org's state is snapshotted into PostgreSQL each time its effect seq crosses a
    multiple of this (0: never); a rebuild restores the latest snapshot and replays at most
    about this many effects' decisions."""
    fetch_min_bytes: int = Field(default=64 * 1024, ge=1)
    """While traffic flows, the broker holds a fetch until this many bytes wait (at most 3 ms,
    worker/pipeline/pacing.py): fewer, larger fetches; a record waits at most those 3 ms for
    company. An idle worker's fetch is answered on the first record. 1 answers every fetch at
    once."""
    producer_linger_ms: int = Field(default=0, ge=0)
    """How long the producer holds a message to batch it with others. A pause signal waits this
    long on top of everything else; batches still form while a request is in flight."""
    shutdown_grace_seconds: float = Field(default=25.0, gt=0)
    retry_backoff_max_seconds: float = Field(default=10.0, gt=0)

    # --- HTTP API ----------------------------------------------------------------------------
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8080, ge=0, le=65535)
    api_tokens: SecretStr = SecretStr("{}")
    """JSON object from token to grant (``worker/tokens.py``): ``"org_id"`` (read-only),
    ``"*"`` (operator) or ``{"org": "org_id" | "*", "role": "read" | "admin"}``."""

    # --- Logging and local stack ---------------------------------------------------------------
    log_format: Literal["json", "console"] = "console"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    stack_dir: Path = Path(".stack")
    stack_external: bool = False
    """``python -m devstack.stack up`` starts nothing and only checks that the services answer."""

    @field_validator("tiers")
    @classmethod
    def _tiers_positive(cls, v: dict[str, int]) -> dict[str, int]:
        if not v:
            raise ValueError("at least one tier is required")
        for name, credits in v.items():
            if not is_valid_id(name) or credits < 0:
                raise ValueError(f"tier {name!r} must have a valid id as name and credits >= 0")
        return v

    @field_validator("api_tokens")
    @classmethod
    def _tokens_are_a_json_object(cls, v: SecretStr) -> SecretStr:
        # Checked here, not when the API starts: --check-config must catch it. The message
        # never echoes the value (it holds secrets).
        parse_tokens(v.get_secret_value())
        return v

    @field_validator("redis_key_prefix")
    @classmethod
    def _prefix_outside_hash_tags(cls, v: str) -> str:
        # The org's hash tag is the first "{...}" of every key: the prefix must not open one.
        if not v or any(c in v for c in "{}") or not v.isprintable():
            raise ValueError("must be non-empty and printable, without '{' or '}'")
        return v

    @model_validator(mode="after")
    def _cross_checks(self) -> Settings:
        topics = [
            self.topic_usage,
            self.topic_admin,
            self.topic_control,
            self.topic_notifications,
            self.topic_billing,
            self.topic_usage_dlq,
            self.topic_admin_dlq,
        ]
        if len(set(topics)) != len(topics):
            raise ValueError("topic names must be distinct")
        if self.kafka_security_protocol.startswith("SASL") and not (
            self.kafka_sasl_mechanism and self.kafka_sasl_username and self.kafka_sasl_password
        ):
            raise ValueError("SASL needs kafka_sasl_mechanism, _username and _password")
        return self

    @property
    def close_reserve_seconds(self) -> float:
        """The part of the shutdown grace period kept for closing clients (at most 5 s): the
        pipeline's retries give up this long before the end of the grace period."""
        return min(5.0, self.shutdown_grace_seconds / 3)

    def namespaced(self, name: str, **overrides: object) -> Settings:
        """A copy whose topics, consumer group, Postgres schema and Redis keys all carry ``name``.

        The demo and the benchmark run side by side with a real deployment's data this way.
        """
        prefix = f"{name}."
        update: dict[str, object] = {
            field: prefix + getattr(self, field)
            for field in type(self).model_fields
            if field.startswith("topic_") and field != "topic_partitions"
        }
        update |= {
            "consumer_group": f"{name}-worker",
            "postgres_schema": name.replace("-", "_"),
            "redis_key_prefix": name,
        }
        return self.model_copy(update=update | overrides)

    def redacted(self) -> dict[str, object]:
        """Settings as a dict with every secret masked (safe to print or log)."""
        out: dict[str, object] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                out[name] = "**********" if value.get_secret_value() else ""
            elif isinstance(value, Path):
                out[name] = str(value)
            else:
                out[name] = value
        return out


def load_settings(**overrides: object) -> Settings:
    """Read settings from the environment, with explicit overrides winning (tests use these)."""
    return Settings(**overrides)  # type: ignore[arg-type]


def settings_error_line(exc: SettingsError) -> str:
    """``METERING_<FIELD>: ...`` for pydantic-settings' "error parsing value" (no secret)."""
    text = str(exc)
    field = text.split('field "', 1)[1].split('"', 1)[0] if 'field "' in text else ""
    cause = exc.__cause__
    detail = f"not valid JSON ({cause})" if isinstance(cause, ValueError) else text
    return f"METERING_{field.upper()}: {detail}" if field else detail
