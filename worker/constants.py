"""Units, bounds and the Redis key layout shared by the engine, the pipeline and the API."""

from __future__ import annotations

MC_PER_CREDIT = 1_000
"""Amounts are integer millicredits everywhere inside the worker (1 credit = 1,000 mc)."""

CENTS_PER_CREDIT = 1
"""100 credits = 1 USD, so one credit is one US cent."""
