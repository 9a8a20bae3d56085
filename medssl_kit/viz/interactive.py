"""Interactive figures (plotly) for the comparison report (§7.3)."""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd
import plotly.graph_objects as go

from medssl_kit.evaluate.results import aggregate


def label_efficiency_plotly(
    df: pd.DataFrame,
    metric: str = "dice",
    classes: Iterable[int | str] | None = None,
    title: str | None = None,
) -> go.Figure:
    """Interactive twin of :func:`~medssl_kit.viz.plots.plot_label_efficiency`: mean ± sd over
    seeds of the case-mean ``metric`` against labelled cases, one line per method; the hover
    shows the number of seeds and test cases behind each point."""
    table = aggregate(df, by=("method", "labeled"), classes=classes, metrics=(metric,))
    fig = go.Figure()
    for method, rows in table.groupby("method"):
        rows = rows.sort_values("labeled")
        fig.add_trace(
            go.Scatter(
                x=rows["labeled"],
                y=rows[f"{metric}_mean"],
                error_y={"type": "data", "array": rows[f"{metric}_sd"].fillna(0.0).tolist()},
                mode="lines+markers",
                name=str(method),
                customdata=rows[["n_seeds", "n_cases"]].to_numpy(),
                hovertemplate=(
                    f"{method}<br>%{{x:g}} labelled cases<br>{metric} %{{y:.3f}}"
                    "<br>%{customdata[0]} seeds, %{customdata[1]} test cases<extra></extra>"
                ),
            )
        )
    fig.update_layout(
        title=title or f"label efficiency ({metric})",
        xaxis={"title": "labelled cases", "type": "log", "dtick": 0.30103},  # log2 ticks
        yaxis={"title": metric},
        template="plotly_white",
        width=640,
        height=420,
    )
    return fig
