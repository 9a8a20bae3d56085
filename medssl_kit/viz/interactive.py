"""Interactive figures (plotly) for the comparison report (§7.3)."""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd
import plotly.graph_objects as go

from medssl_kit.evaluate.results import aggregate

# Scores bounded to [0, 1]: their axis always spans exactly that range (a constant score, e.g. the
# zeros of a smoke run, would otherwise get plotly's automatic -1 to 1).
UNIT_RANGE_METRICS = frozenset({"dice", "iou", "auroc"})


def count_text(n: float, noun: str) -> str:
    """``"1 seed"``, ``"3 seeds"``: a count written as an integer with the noun agreeing."""
    n = int(n)
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def budget_text(labeled: float) -> str:
    """A label budget for people: ``"1 labelled case"``, ``"8 labelled cases"`` or, for a
    fraction of the labelled cases, ``"25% of the labelled cases"``."""
    if float(labeled).is_integer():
        return count_text(labeled, "labelled case")
    return f"{float(labeled):.0%} of the labelled cases"


def label_efficiency_plotly(
    df: pd.DataFrame,
    metric: str = "dice",
    classes: Iterable[int | str] | None = None,
    title: str | None = None,
) -> go.Figure:
    """Interactive twin of :func:`~medssl_kit.viz.plots.plot_label_efficiency`: mean ± sd over
    seeds of the case-mean ``metric`` against labelled cases, one line per method; the hover
    shows the label budget, the score and the number of seeds and test cases behind each point
    (counts as integers: "1 labelled case", "3 seeds"). Dice, IoU and AUROC get a 0–1 axis."""
    table = aggregate(df, by=("method", "labeled"), classes=classes, metrics=(metric,))
    fig = go.Figure()
    for method, rows in table.groupby("method"):
        rows = rows.sort_values("labeled")
        hover = [
            [
                budget_text(r.labeled),
                count_text(r.n_seeds, "seed"),
                count_text(r.n_cases, "test case"),
            ]
            for r in rows.itertuples()
        ]
        fig.add_trace(
            go.Scatter(
                x=rows["labeled"].astype(float),
                y=rows[f"{metric}_mean"],
                error_y={"type": "data", "array": rows[f"{metric}_sd"].fillna(0.0).tolist()},
                mode="lines+markers",
                name=str(method),
                cliponaxis=False,  # markers at exactly 0 or 1 are drawn whole
                customdata=hover,
                hovertemplate=(
                    f"{method}<br>%{{customdata[0]}}<br>{metric} %{{y:.3f}}"
                    "<br>%{customdata[1]}, %{customdata[2]}<extra></extra>"
                ),
            )
        )
    yaxis: dict = {"title": metric}
    if metric in UNIT_RANGE_METRICS:
        yaxis["range"] = [0.0, 1.0]
    fig.update_layout(
        title=title or f"label efficiency ({metric})",
        xaxis={"title": "labelled cases", "type": "log", "dtick": 0.30103},  # log2 ticks
        yaxis=yaxis,
        template="plotly_white",
        width=640,
        height=420,
    )
    return fig
