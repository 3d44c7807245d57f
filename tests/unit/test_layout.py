"""The record layouts shared by Python and Lua are declared once (worker/layout.py)."""

from __future__ import annotations

from worker import layout
from worker.effects import decode_rows
from worker.engine import load_apply_script


def test_generated_lua_is_current() -> None:
    """``lib_layout.lua`` is what ``python -m worker.layout`` writes: a field added to the
    layout without regenerating it fails here, not in production."""
    assert layout.lua_path().read_text(encoding="utf-8") == layout.render_lua()
    assert layout.main(["--check"]) == 0


def test_the_apply_script_starts_with_the_layout() -> None:
    script = load_apply_script()
    assert script.startswith("#!lua\n")
    assert layout.render_lua() in script
    # every constructor the effect rows need is defined before the scripts that use them
    for kind in layout.EFFECT_KINDS:
        assert script.index(f"local function row_{kind}(") < script.index("local function emit(")


def test_every_kind_decodes_from_its_positional_row() -> None:
    """A row of each kind, built in the layout's order, decodes to the effect whose fields
    carry those values by name."""
    rows = []
    for code, kind in enumerate(layout.EFFECT_KINDS, 1):
        fields = layout.EFFECT_FIELDS[kind]
        values: list[object] = []
        for name in fields:
            if name == "command":
                values.append('{"type": "tick"}')
            elif name == "detail":
                values.append({"note": "x"})
            else:
                values.append(f"{kind}.{name}")
        rows.append([code, 10 + code, *values])
    effects = decode_rows("org", rows)
    for (code, kind), effect in zip(enumerate(layout.EFFECT_KINDS, 1), effects, strict=True):
        assert effect.kind == kind
        assert effect.seq == 10 + code and effect.org_id == "org"
        d = effect.as_dict()
        for name in layout.EFFECT_FIELDS[kind]:
            if name == "command":
                assert d[name] == {"type": "tick"}
            elif name == "detail":
                assert d[name] == {"note": "x"}
            else:
                assert d[name] == f"{kind}.{name}"
