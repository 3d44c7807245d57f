"""Client construction from settings, so TLS and authentication are configured in one place.

Every module that talks to Kafka, Redis or PostgreSQL builds its clients through these three
functions; a deployment switches to SASL/SSL, ``rediss://`` with AUTH, or Postgres TLS purely by
setting ``METERING_*`` variables.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster

    from worker.config import Settings


def kafka_client_kwargs(settings: Settings) -> dict[str, Any]:
    """Keyword arguments shared by aiokafka producers, consumers and admin clients.

    Covers ``bootstrap_servers``, ``client_id``, ``security_protocol``, SASL (PLAIN/SCRAM) and
    an SSL context built from the CA, certificate and key files (system CAs when no CA file is
    given).
    """
    kwargs: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap,
        "client_id": settings.client_id,
        "security_protocol": settings.kafka_security_protocol,
    }
    if settings.kafka_security_protocol in ("SSL", "SASL_SSL"):
        from aiokafka.helpers import create_ssl_context

        kwargs["ssl_context"] = create_ssl_context(
            cafile=str(settings.kafka_ssl_cafile) if settings.kafka_ssl_cafile else None,
            certfile=str(settings.kafka_ssl_certfile) if settings.kafka_ssl_certfile else None,
            keyfile=str(settings.kafka_ssl_keyfile) if settings.kafka_ssl_keyfile else None,
        )
    if settings.kafka_security_protocol.startswith("SASL"):
        kwargs["sasl_mechanism"] = settings.kafka_sasl_mechanism
        kwargs["sasl_plain_username"] = settings.kafka_sasl_username
        kwargs["sasl_plain_password"] = (
            settings.kafka_sasl_password.get_secret_value()
            if settings.kafka_sasl_password
            else None
        )
    return kwargs


def redis_client(settings: Settings, *, decode_responses: bool = False) -> Redis | RedisCluster:
    """An asyncio Redis client (``RedisCluster`` when ``Settings.redis_cluster``).

    TLS and AUTH come from the URL: ``rediss://user:password@host:port/db``.
    """
    url = settings.redis_url.get_secret_value()
    if settings.redis_cluster:
        from redis.asyncio.cluster import RedisCluster

        return RedisCluster.from_url(url, decode_responses=decode_responses)
    from redis.asyncio import Redis

    return Redis.from_url(url, decode_responses=decode_responses)


def pg_connect_kwargs(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for ``asyncpg.connect`` / ``asyncpg.create_pool``.

    ``ssl`` carries ``Settings.postgres_sslmode`` (asyncpg accepts the libpq mode names); a
    ``sslmode`` inside the DSN is overridden by it.
    """
    return {
        "dsn": settings.postgres_dsn.get_secret_value(),
        "ssl": settings.postgres_sslmode,
        "server_settings": {"application_name": settings.client_id},
    }
