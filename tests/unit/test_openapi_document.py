"""``schemas/openapi.json`` is what ``python -m worker.openapi`` writes (no drift)."""

from __future__ import annotations

from worker import openapi
from worker.api_entitlement import BATCH_MAX_ITEMS


def test_checked_in_document_is_current() -> None:
    assert openapi.main(["--check"]) == 0, "run: python -m worker.openapi"


def test_document_states_the_batch_limit() -> None:
    schemas = openapi.document()["components"]["schemas"]
    assert schemas["EntitlementBatchRequest"]["properties"]["items"]["maxItems"] == BATCH_MAX_ITEMS
