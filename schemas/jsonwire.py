"""JSON text -> field values for the models, with numbers kept as their raw text.

pydantic's own JSON parser reads ``12.5`` as a binary float before any validator runs, so the
models are fed from here instead: msgspec splits the top-level object into raw tokens, and each
field the model knows is converted on its own (strings, bools and null to Python values,
numbers to :class:`~schemas.amounts.JsonNumber`, arrays and objects to empty placeholders,
since no incoming field accepts them). Unknown fields are checked for JSON syntax only.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Final

import msgspec

from schemas.amounts import JsonNumber
from schemas.errors import ErrorCode, WireError

FIELDS_DECODER: Final = msgspec.json.Decoder(dict[str, msgspec.Raw])
VALUE_DECODER: Final = msgspec.json.Decoder(float_hook=JsonNumber)
NUMBER_START: Final = frozenset(b"-0123456789")
QUOTE: Final = ord('"')


def check_utf8(raw: bytes) -> None:
    """Raise ``invalid_utf8`` unless ``raw`` is valid UTF-8 (ASCII input costs one scan)."""
    if not raw.isascii():
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise WireError(ErrorCode.INVALID_UTF8, f"invalid UTF-8 at byte {err.start}") from None


def raw_fields(raw: bytes) -> dict[str, msgspec.Raw]:
    """The top-level JSON object as raw tokens; raises ``invalid_utf8``, ``invalid_json`` or
    ``wrong_type``."""
    check_utf8(raw)
    try:
        fields: dict[str, msgspec.Raw] = FIELDS_DECODER.decode(raw)
    except msgspec.ValidationError:
        raise WireError(ErrorCode.WRONG_TYPE, "message is not a JSON object") from None
    except msgspec.DecodeError as err:
        raise WireError(ErrorCode.INVALID_JSON, str(err)) from None
    except RecursionError:
        # Nesting deeper than the interpreter allows: refused, so it cannot crash the consumer.
        raise WireError(ErrorCode.INVALID_JSON, "JSON nested too deeply") from None
    return fields


def json_value(token: msgspec.Raw) -> object:
    """One raw token as the models expect it (see the module doc)."""
    data = bytes(token)
    first = data[0]
    if first == QUOTE:
        try:
            return VALUE_DECODER.decode(data)
        except msgspec.DecodeError as err:
            raise WireError(ErrorCode.INVALID_JSON, str(err)) from None
    if first in NUMBER_START:
        return JsonNumber(data.decode())
    if data == b"true":
        return True
    if data == b"false":
        return False
    if data == b"null":
        return None
    return [] if first == ord("[") else {}


def json_fields(raw: bytes, known: Collection[str]) -> dict[str, object]:
    """The ``known`` top-level fields of a JSON object, converted with :func:`json_value`."""
    return {key: json_value(token) for key, token in raw_fields(raw).items() if key in known}
