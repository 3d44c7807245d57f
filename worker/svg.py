"""Server-rendered SVG charts for the admin page: no scripts, no external assets.

Two shapes: vertical stacked bars over days (credits used per day, by what paid them) and
horizontal stacked bars per member. Values are millicredits (integers); every text (labels,
member ids, tooltips) is escaped, so producer ids are shown as data.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import NamedTuple


class Series(NamedTuple):
    """One stacked part of every bar: its key in the values, legend label and colour."""

    key: str
    label: str
    color: str


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def credits_text(mc: int) -> str:
    """Millicredits as credits with thousands separators: ``1234500`` -> ``1,234.5``."""
    value = Decimal(mc) / 1000
    text = f"{value:,.3f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _nice_max(value: int) -> int:
    """A round axis maximum >= value (1, 2 or 5 times a power of ten, in whole credits)."""
    credits = max(1, -(-value // 1000))
    step = 1
    while True:
        for m in (1, 2, 5):
            if credits <= m * step:
                return m * step * 1000
        step *= 10


def _legend(series: Sequence[Series], x: int, y: int) -> list[str]:
    out = []
    for s in series:
        out.append(f'<rect x="{x}" y="{y - 9}" width="10" height="10" fill="{_e(s.color)}"/>')
        out.append(f'<text x="{x + 14}" y="{y}" class="legend">{_e(s.label)}</text>')
        x += 24 + 7 * len(s.label)
    return out


def daily_bars(
    days: Sequence[tuple[str, Mapping[str, int]]],
    series: Sequence[Series],
    *,
    title: str,
    width: int = 900,
    height: int = 260,
) -> str:
    """Stacked bars, one per ``(day label, {series key: mc})``; an empty cycle shows an axis."""
    left, right, top, bottom = 70, 10, 28, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    totals = [sum(v.get(s.key, 0) for s in series) for _, v in days]
    top_mc = _nice_max(max(totals, default=0))
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" '
        f'viewBox="0 0 {width} {height}" width="{width}" height="{height}">',
        f"<title>{_e(title)}</title>",
    ]
    parts += _legend(series, left, 14)
    for i in range(5):
        value = top_mc * i // 4
        y = top + plot_h - plot_h * i // 4
        parts.append(f'<line x1="{left}" y1="{y}" x2="{width - right}" y2="{y}" class="grid"/>')
        parts.append(
            f'<text x="{left - 6}" y="{y + 4}" class="axis" text-anchor="end">'
            f"{_e(credits_text(value))}</text>"
        )
    n = max(1, len(days))
    slot = plot_w / n
    bar_w = max(2.0, slot * 0.7)
    label_every = max(1, -(-n // 16))
    for i, (label, values) in enumerate(days):
        bx = left + slot * i + (slot - bar_w) / 2
        by = float(top + plot_h)
        for s in series:
            mc = values.get(s.key, 0)
            if mc <= 0:
                continue
            h = plot_h * mc / top_mc
            by -= h
            parts.append(
                f'<rect x="{bx:.1f}" y="{by:.1f}" width="{bar_w:.1f}" height="{h:.1f}" '
                f'fill="{_e(s.color)}"><title>{_e(label)}: {_e(s.label)} '
                f"{_e(credits_text(mc))} credits</title></rect>"
            )
        if i % label_every == 0:
            parts.append(
                f'<text x="{bx + bar_w / 2:.1f}" y="{top + plot_h + 16}" class="axis" '
                f'text-anchor="middle">{_e(label)}</text>'
            )
    parts.append("</svg>")
    return "".join(parts)


def member_bars(
    rows: Sequence[tuple[str, Mapping[str, int]]],
    series: Sequence[Series],
    *,
    title: str,
    width: int = 900,
) -> str:
    """One horizontal stacked bar per ``(member id, {series key: mc})``, on a shared scale."""
    label_w, row_h, top = 220, 24, 28
    plot_w = width - label_w - 110
    height = top + row_h * max(1, len(rows)) + 8
    top_mc = max((sum(v.get(s.key, 0) for s in series) for _, v in rows), default=0) or 1
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" '
        f'viewBox="0 0 {width} {height}" width="{width}" height="{height}">',
        f"<title>{_e(title)}</title>",
    ]
    parts += _legend(series, label_w, 14)
    for i, (member, values) in enumerate(rows):
        y = top + row_h * i
        shown = member if len(member) <= 28 else member[:27] + "…"
        parts.append(
            f'<text x="{label_w - 8}" y="{y + 15}" class="axis" text-anchor="end">'
            f"<title>{_e(member)}</title>{_e(shown)}</text>"
        )
        x = float(label_w)
        total = 0
        for s in series:
            mc = values.get(s.key, 0)
            if mc <= 0:
                continue
            total += mc
            w = plot_w * mc / top_mc
            parts.append(
                f'<rect x="{x:.1f}" y="{y + 3}" width="{w:.1f}" height="{row_h - 8}" '
                f'fill="{_e(s.color)}"><title>{_e(member)}: {_e(s.label)} '
                f"{_e(credits_text(mc))} credits</title></rect>"
            )
            x += w
        parts.append(
            f'<text x="{x + 6:.1f}" y="{y + 15}" class="axis">{_e(credits_text(total))}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)
