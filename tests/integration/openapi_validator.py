"""A validator for the subset of JSON Schema 2020-12 that ``schemas/openapi.json`` uses.

``validate(doc, schema, value)`` returns the problems (empty when ``value`` conforms), with
``$ref`` resolved inside ``doc``. A keyword outside :data:`KEYWORDS` is itself a problem, so the
document cannot grow a rule this validator would silently skip.
"""

from __future__ import annotations

import re
from typing import Any

KEYWORDS = frozenset(
    {
        "type", "properties", "required", "additionalProperties", "items", "enum", "const",
        "pattern", "minLength", "maxLength", "minimum", "maximum", "maxItems", "oneOf", "$ref",
        "format", "description",
    }
)  # fmt: skip

_TYPES = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "null": lambda v: v is None,
}


def resolve(doc: dict[str, Any], ref: str) -> dict[str, Any]:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        node = node[part]
    return dict(node)


def validate(doc: dict[str, Any], schema: dict[str, Any], value: Any, at: str = "$") -> list[str]:
    """Problems of ``value`` against ``schema`` (a schema of ``doc``)."""
    problems = [f"{at}: unsupported keyword {k!r}" for k in schema if k not in KEYWORDS]
    if "$ref" in schema:
        problems += validate(doc, resolve(doc, schema["$ref"]), value, at)
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_TYPES[t](value) for t in types):
            return [*problems, f"{at}: {value!r:.80} is not of type {types}"]
    if "const" in schema and (value != schema["const"] or type(value) is not type(schema["const"])):
        problems.append(f"{at}: {value!r:.80} is not {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        problems.append(f"{at}: {value!r:.80} is not one of {schema['enum']}")
    if isinstance(value, str):
        if "minLength" in schema and len(value) < schema["minLength"]:
            problems.append(f"{at}: shorter than {schema['minLength']}")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            problems.append(f"{at}: longer than {schema['maxLength']}")
        if "pattern" in schema and re.search(schema["pattern"], value) is None:
            problems.append(f"{at}: {value!r:.80} does not match {schema['pattern']}")
    if _TYPES["number"](value):
        if "minimum" in schema and value < schema["minimum"]:
            problems.append(f"{at}: below {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            problems.append(f"{at}: above {schema['maximum']}")
    if isinstance(value, list):
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            problems.append(f"{at}: more than {schema['maxItems']} items")
        if "items" in schema:
            for i, item in enumerate(value):
                problems += validate(doc, schema["items"], item, f"{at}[{i}]")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in value:
                problems.append(f"{at}: {key!r} is missing")
        for key, item in value.items():
            if key in props:
                problems += validate(doc, props[key], item, f"{at}.{key}")
            elif schema.get("additionalProperties") is False:
                problems.append(f"{at}: {key!r} is not allowed")
            elif isinstance(schema.get("additionalProperties"), dict):
                problems += validate(doc, schema["additionalProperties"], item, f"{at}.{key}")
    if "oneOf" in schema:
        matches = [s for s in schema["oneOf"] if not validate(doc, s, value, at)]
        if len(matches) != 1:
            problems.append(f"{at}: matches {len(matches)} of oneOf, not exactly one")
    return problems


def schema_problems(doc: dict[str, Any], schema: Any, at: str) -> list[str]:
    """Keywords outside the subset anywhere inside ``schema`` (the document's own check)."""
    if not isinstance(schema, dict):
        return []
    problems = [f"{at}: unsupported keyword {k!r}" for k in schema if k not in KEYWORDS]
    for key in ("items", "additionalProperties"):
        problems += schema_problems(doc, schema.get(key), f"{at}.{key}")
    for name, sub in schema.get("properties", {}).items():
        problems += schema_problems(doc, sub, f"{at}.properties.{name}")
    for i, sub in enumerate(schema.get("oneOf", [])):
        problems += schema_problems(doc, sub, f"{at}.oneOf[{i}]")
    return problems
