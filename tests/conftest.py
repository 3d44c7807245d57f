"""Fixtures shared by the whole suite (unit and integration); nothing here needs a service."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

from worker.config import Settings

# "ci" keeps hypothesis' default example count but drops the per-example deadline: a 2-core CI
# machine shared with a Kafka broker has timing noise that would turn into flaky failures.
hypothesis_settings.register_profile(
    "ci", deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
# "dev" is for quick local iterations: HYPOTHESIS_PROFILE=dev pytest tests/unit
hypothesis_settings.register_profile(
    "dev", parent=hypothesis_settings.get_profile("ci"), max_examples=20
)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def settings() -> Settings:
    """The effective settings (``METERING_*`` environment applies), as the worker would see them."""
    return Settings()
