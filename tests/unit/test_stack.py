"""Pure parts of the local stack: which services it owns, names and configs it hands out."""

from __future__ import annotations

import base64

import pytest
from pydantic import SecretStr

from devstack import stack
from worker.config import Settings


def test_default_settings_mean_every_service_is_local() -> None:
    assert stack.local_services(Settings()) == {"kafka": True, "redis": True, "postgres": True}


@pytest.mark.parametrize(
    ("update", "external"),
    [
        ({"kafka_bootstrap": "kafka.prod:9092"}, "kafka"),
        ({"redis_url": SecretStr("redis://cache.prod:6379/0")}, "redis"),
        ({"postgres_dsn": SecretStr("postgresql://m:pw@db.prod:5432/metering")}, "postgres"),
    ],
)
def test_settings_pointing_elsewhere_make_that_service_external(
    update: dict[str, object], external: str
) -> None:
    local = stack.local_services(Settings().model_copy(update=update))
    assert local.pop(external) is False
    assert all(local.values())  # the others are still started locally


def test_local_redis_on_another_db_or_the_cluster_is_still_ours() -> None:
    s = Settings().model_copy(update={"redis_url": SecretStr("redis://127.0.0.1:16379/3")})
    assert stack.local_services(s)["redis"] is True
    c = Settings().model_copy(
        update={"redis_url": SecretStr("redis://127.0.0.1:17001/0"), "redis_cluster": True}
    )
    assert stack.local_services(c)["redis"] is True


def test_stack_external_starts_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METERING_STACK_EXTERNAL", "1")
    assert not any(stack.local_services(Settings()).values())


def test_redis_url_with_db_keeps_credentials_and_query() -> None:
    url = "redis://:pw@127.0.0.1:16379/0?socket_timeout=5"
    assert stack.redis_url_with_db(url, 7) == "redis://:pw@127.0.0.1:16379/7?socket_timeout=5"
    assert stack.redis_url_with_db("redis://h:1", 2) == "redis://h:1/2"


def test_topics_are_the_spec_topics_and_only_control_is_compacted() -> None:
    s = Settings()
    names = stack.topic_names(s)
    assert sorted(names.values()) == sorted(
        [
            "credits.usage.v1",
            "credits.admin.v1",
            "credits.control.v1",
            "credits.notifications.v1",
            "credits.billing.v1",
            "credits.usage.dlq.v1",
            "credits.admin.dlq.v1",
        ]
    )
    for name in names.values():
        configs = stack._topic_configs(s, name)
        assert (configs.get("cleanup.policy") == "compact") == (name == s.topic_control)
        # an oversize event must still reach the worker to be dead-lettered with a reason
        assert int(configs["max.message.bytes"]) > s.max_message_bytes


def test_kafka_cluster_id_is_a_kafka_uuid() -> None:
    cid = stack._kafka_cluster_id()
    assert len(cid) == 22 and "=" not in cid
    assert len(base64.urlsafe_b64decode(cid + "==")) == 16
    assert cid != stack._kafka_cluster_id()


def test_secrets_are_masked_in_printed_urls() -> None:
    assert (
        stack._mask_url("postgresql://m:hunter2@db:5432/x") == "postgresql://m:**********@db:5432/x"
    )
    assert "p@ss" not in stack._mask_url("postgresql://m:p@ss@db:5432/x?password=p@ss")
    assert stack._mask_url("redis://127.0.0.1:16379/0") == "redis://127.0.0.1:16379/0"


def test_kafka_sasl_settings_reach_the_client() -> None:
    s = Settings(
        kafka_bootstrap="b:9093",
        kafka_security_protocol="SASL_PLAINTEXT",
        kafka_sasl_mechanism="SCRAM-SHA-256",
        kafka_sasl_username="u",
        kafka_sasl_password=SecretStr("p"),
    )
    kw = stack.kafka_client_kwargs(s)
    assert kw["bootstrap_servers"] == "b:9093"
    assert kw["sasl_mechanism"] == "SCRAM-SHA-256"
    assert (kw["sasl_plain_username"], kw["sasl_plain_password"]) == ("u", "p")
