"""The developer stack: local Kafka, Redis and PostgreSQL (``python -m devstack.stack``) and the
demo (``python -m devstack.demo``). Not part of the service: the worker never imports it."""
