"""Static figures (matplotlib): learning curves, loss terms, label-efficiency curves (§7.3)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.figure import Figure

from medssl_kit.evaluate.results import aggregate
from medssl_kit.train.checkpoint import read_jsonl
from medssl_kit.viz.interactive import UNIT_RANGE_METRICS


def plot_loss_terms(
    run_dir: str | Path, terms: Sequence[str] | None = None, smooth: int = 1
) -> Figure:
    """Every logged term of a run's ``metrics.jsonl`` against the step, one panel per term.

    ``terms`` defaults to every numeric key except ``step``, ``lr``, ``seconds`` and validation
    scores; ``smooth`` > 1 draws a centred rolling mean over that many steps on top.
    """
    records = [r for r in read_jsonl(Path(run_dir) / "metrics.jsonl") if "loss" in r]
    df = pd.DataFrame(records)
    skip = {"step", "lr", "seconds", "val_score"}
    terms = list(terms) if terms is not None else [c for c in df if c not in skip]
    fig, axes = plt.subplots(1, len(terms), figsize=(3.2 * len(terms), 2.8), squeeze=False)
    for ax, term in zip(axes[0], terms, strict=True):
        ax.plot(df["step"], df[term], alpha=0.4 if smooth > 1 else 1.0)
        if smooth > 1:
            ax.plot(df["step"], df[term].rolling(smooth, center=True, min_periods=1).mean())
        ax.set_title(term)
        ax.set_xlabel("step")
    fig.tight_layout()
    return fig


def plot_learning_curves(run_dirs: Iterable[str | Path]) -> Figure:
    """Training loss and validation score of fine-tuning runs, one line per run."""
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(9, 3.2))
    for run in map(Path, run_dirs):
        records = read_jsonl(run / "metrics.jsonl")
        train = [(r["step"], r["loss"]) for r in records if "loss" in r]
        val = [(r["step"], r["val_score"]) for r in records if "val_score" in r]
        if train:
            ax_loss.plot(*zip(*train, strict=True), label=run.name, alpha=0.8)
        if val:
            ax_val.plot(*zip(*val, strict=True), marker="o", label=run.name)
    ax_loss.set(title="training loss", xlabel="step", yscale="log")
    ax_val.set(title="validation score", xlabel="step", ylim=(0, 1))
    ax_val.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_label_efficiency(
    df: pd.DataFrame,
    metric: str = "dice",
    classes: Iterable[int | str] | None = None,
    title: str | None = None,
) -> Figure:
    """Mean ± sd over seeds of the case-mean ``metric`` against labelled cases, per method.

    Dice, IoU and AUROC are drawn on a 0–1 axis."""
    table = aggregate(df, by=("method", "labeled"), classes=classes, metrics=(metric,))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for method, rows in table.groupby("method"):
        rows = rows.sort_values("labeled")
        ax.errorbar(
            rows["labeled"],
            rows[f"{metric}_mean"],
            yerr=rows[f"{metric}_sd"].fillna(0.0),
            marker="o",
            capsize=3,
            label=method,
        )
    ax.set(xlabel="labelled cases", ylabel=metric, title=title or f"label efficiency ({metric})")
    ax.set_xscale("log", base=2)
    if metric in UNIT_RANGE_METRICS:
        ax.set_ylim(0.0, 1.0)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
