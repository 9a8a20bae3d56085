"""A self-contained HTML report: headings, text, tables and figures in one file (§7.3).

Tables are :class:`pandas.DataFrame` or text holding a Markdown pipe table (such as
:func:`~medssl_kit.evaluate.report.to_markdown` writes), both rendered as HTML tables in a box that
scrolls sideways when a table is wider than the page; other text is a paragraph. Matplotlib figures
are embedded as PNG (base64); plotly figures stay interactive, with plotly.js embedded once so the
file opens offline.
"""

from __future__ import annotations

import base64
import html
import io
import re
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from matplotlib.figure import Figure

from medssl_kit.atomic import atomic_write_text

Block = str | pd.DataFrame | Figure | go.Figure

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; padding: 0 1em; max-width: 1100px;
       color: #222; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f2f2f2; }
img { max-width: 100%; }
.table-wrap { max-width: 100%; overflow-x: auto; margin: 0.5em 0 1.5em; }
.table-wrap table { margin: 0; }
"""
_MD_RULE = re.compile(r"\|(\s*:?-{3,}:?\s*\|)+")


def _markdown_table(text: str) -> str | None:
    """A Markdown pipe table (header row, ``|---|`` rule, body rows) as an HTML table; ``None``
    when ``text`` is not one."""
    lines = [line.strip() for line in text.strip().splitlines()]
    if len(lines) < 2 or not _MD_RULE.fullmatch(lines[1]):
        return None
    if not all(line.startswith("|") and line.endswith("|") for line in lines):
        return None

    def row(line: str, tag: str) -> str:
        cells = (html.escape(c.strip()) for c in line[1:-1].split("|"))
        return "<tr>" + "".join(f"<{tag}>{c}</{tag}>" for c in cells) + "</tr>"

    body = "".join(row(line, "td") for line in lines[2:])
    return f"<table><thead>{row(lines[0], 'th')}</thead><tbody>{body}</tbody></table>"


def _render(block: Block, plotly_included: bool) -> tuple[str, bool]:
    if isinstance(block, go.Figure):
        return block.to_html(full_html=False, include_plotlyjs=not plotly_included), True
    if isinstance(block, Figure):
        buf = io.BytesIO()
        block.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        data = base64.b64encode(buf.getvalue()).decode("ascii")
        return f'<img alt="figure" src="data:image/png;base64,{data}">', plotly_included
    if isinstance(block, pd.DataFrame):
        if not isinstance(block.columns, pd.MultiIndex):  # a pivot's column name ("class") would
            block = block.rename_axis(columns=None)  # be drawn as an extra, empty header column
        table = block.to_html(index=False, na_rep="–", float_format="{:.4g}".format)
        return f'<div class="table-wrap">{table}</div>', plotly_included
    table = _markdown_table(str(block))
    if table is not None:
        return f'<div class="table-wrap">{table}</div>', plotly_included
    return f"<p>{html.escape(str(block))}</p>", plotly_included


def write_html_report(
    path: str | Path, title: str, sections: Sequence[tuple[str, Sequence[Block]]]
) -> Path:
    """Write ``sections`` (heading, blocks) under ``title`` to ``path`` atomically; return it."""
    parts = [
        "<!DOCTYPE html>",
        f'<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>',
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    plotly_included = False
    for heading, blocks in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        for block in blocks:
            rendered, plotly_included = _render(block, plotly_included)
            parts.append(rendered)
    parts.append("</body></html>")
    atomic_write_text(path, "\n".join(parts) + "\n")
    return Path(path)
