import json

import numpy as np
import pandas as pd

from medssl_kit.viz.html_report import write_html_report
from medssl_kit.viz.interactive import budget_text, count_text, label_efficiency_plotly
from medssl_kit.viz.plots import plot_label_efficiency, plot_learning_curves, plot_loss_terms


def _run(folder, losses, vals):
    folder.mkdir()
    lines = [{"step": i + 1, "loss": v, "lr": 0.1, "seconds": 0.01, "extra": 2 * v}
             for i, v in enumerate(losses)]  # fmt: skip
    lines += [{"step": s, "val_score": v} for s, v in vals]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return folder


def test_loss_terms_and_learning_curves(tmp_path):
    a = _run(tmp_path / "a", [3.0, 2.0, 1.0], [(2, 0.4)])
    b = _run(tmp_path / "b", [2.0, 1.0, 0.5], [(2, 0.5), (3, 0.7)])
    fig = plot_loss_terms(a)
    assert [ax.get_title() for ax in fig.axes] == ["loss", "extra"]
    assert np.allclose(fig.axes[1].lines[0].get_ydata(), [6.0, 4.0, 2.0])
    curves = plot_learning_curves([a, b])
    loss_ax, val_ax = curves.axes
    assert len(loss_ax.lines) == 2
    assert np.allclose(val_ax.lines[1].get_ydata(), [0.5, 0.7])


def _efficiency_rows():
    rows = []
    for method, base in (("scratch", 0.5), ("ssl", 0.6)):
        for labeled in (1, 4):
            for seed in (0, 1):
                for case in ("c0", "c1"):
                    dice = base + 0.1 * (labeled == 4) + 0.02 * seed
                    rows.append(dict(method=method, backbone="unet", dims=2, labeled=labeled,
                                     seed=seed, case=case, class_id=1, **{"class": "liver"},
                                     dice=dice, hd95=1.0, iou=dice))  # fmt: skip
    return pd.DataFrame(rows)


def test_label_efficiency_plots_mean_over_seeds():
    fig = plot_label_efficiency(_efficiency_rows())
    ax = fig.axes[0]
    lines = {c.get_label(): c.lines[0] for c in ax.containers}
    assert set(lines) == {"scratch", "ssl"}
    assert np.allclose(lines["ssl"].get_xdata(), [1, 4])
    assert np.allclose(lines["ssl"].get_ydata(), [0.61, 0.71])


def test_interactive_label_efficiency_matches_the_static_one():
    fig = label_efficiency_plotly(_efficiency_rows())
    traces = {t.name: t for t in fig.data}
    assert set(traces) == {"scratch", "ssl"}
    assert np.allclose(traces["ssl"].x, [1, 4]) and np.allclose(traces["ssl"].y, [0.61, 0.71])
    assert np.allclose(traces["ssl"].error_y.array, [np.std([0.6, 0.62], ddof=1)] * 2)


def test_html_report_is_self_contained(tmp_path):
    df = _efficiency_rows()
    path = write_html_report(
        tmp_path / "r.html",
        "A <title>",
        [
            ("Figures", [label_efficiency_plotly(df), label_efficiency_plotly(df)]),
            ("Static", [plot_label_efficiency(df), "a note & more"]),
            ("Table", [df.head(3)]),
        ],
    )
    text = path.read_text()
    assert text.startswith("<!DOCTYPE html>") and "A &lt;title&gt;" in text
    assert text.count("<h2>") == 3 and text.count("<table") == 1
    assert "data:image/png;base64," in text and "a note &amp; more" in text
    # plotly.js is embedded once (offline), not fetched from a CDN
    assert text.count("plotly.js v") == 1 and '<script src="http' not in text
    assert text.count("Plotly.newPlot") == 2


def test_dice_axes_span_zero_to_one_even_for_a_constant_score():
    df = _efficiency_rows().assign(dice=0.0)  # e.g. a smoke run: plotly would pick -1 to 1
    assert tuple(label_efficiency_plotly(df).layout.yaxis.range) == (0.0, 1.0)
    assert plot_label_efficiency(df).axes[0].get_ylim() == (0.0, 1.0)
    assert label_efficiency_plotly(df, metric="hd95").layout.yaxis.range is None  # mm: free


def test_hover_writes_counts_as_integers_with_singular_nouns():
    one_seed = _efficiency_rows().query("seed == 0 and case == 'c0'")
    trace = {t.name: t for t in label_efficiency_plotly(one_seed).data}["ssl"]
    hover = trace.hovertemplate
    for i, text in enumerate(trace.customdata[0]):
        hover = hover.replace(f"%{{customdata[{i}]}}", text)
    assert "1 labelled case<br>" in hover and "1 seed, 1 test case" in hover
    four = {t.name: t for t in label_efficiency_plotly(_efficiency_rows()).data}["ssl"]
    assert list(four.customdata[1]) == ["4 labelled cases", "2 seeds", "2 test cases"]
    assert budget_text(0.25) == "25% of the labelled cases" and count_text(3.0, "seed") == "3 seeds"
    assert "%{x" not in trace.hovertemplate  # plotly would print 1 as "1.00000"


def test_html_report_renders_markdown_tables_and_scrolls_wide_tables(tmp_path):
    markdown = "| method | Dice |\n|---|---|\n| ssl | 0.71 ± 0.02 |\n| a<b | – |"
    wide = pd.DataFrame([{f"column_{i}": i for i in range(40)}])
    text = write_html_report(tmp_path / "r.html", "t", [("T", [markdown, wide])]).read_text()
    assert "|---|" not in text and "| ssl" not in text  # no raw Markdown left
    assert "<th>method</th><th>Dice</th>" in text and "<td>0.71 ± 0.02</td>" in text
    assert "<td>a&lt;b</td>" in text  # cells are escaped
    assert text.count('<div class="table-wrap">') == 2 and "overflow-x: auto" in text
    pivot = pd.DataFrame({"class": ["liver"], "dice": [0.5]}).pivot_table(columns="class")
    text = write_html_report(tmp_path / "p.html", "t", [("T", [pivot.reset_index()])]).read_text()
    assert "<th>class</th>" not in text  # the columns' name is not drawn as an empty column
