"""Static figures (matplotlib): learning curves, loss terms, label-efficiency curves (§7.3), and
voxel-embedding pictures (positive pairs of two crops, PCA to RGB; §4.5)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor

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


def pca_rgb(features: Tensor) -> np.ndarray:
    """Per-pixel features ``[C, *S]`` as an RGB image ``[*S, 3]`` in [0, 1]: the first three
    principal components over the pixels, each stretched from its 1st to 99th percentile (the
    picture vox2vec users know: similar features, similar colours)."""
    flat = features.detach().flatten(1).t().double()  # [pixels, C]
    centred = flat - flat.mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    components = centred @ v[: min(3, v.shape[0])].t()
    if components.shape[1] < 3:
        components = F.pad(components, (0, 3 - components.shape[1]))
    lo = components.quantile(0.01, dim=0)
    hi = components.quantile(0.99, dim=0)
    rgb = ((components - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)
    return rgb.reshape(*features.shape[1:], 3).float().numpy()


def plot_positive_pairs(
    crop1: Tensor, crop2: Tensor, pos1: Tensor, pos2: Tensor, pair: int = 0
) -> Figure:
    """A slice of both crops of positive pair ``pair`` with its sampled positives, one colour
    per voxel in both panels (the same colour marks the same physical voxel).

    ``crop1`` / ``crop2``: ``[C, *S]`` (2D, or 3D with axial slices first); ``pos1`` / ``pos2``
    ``[N, 1 + dims]`` (pair index, then the voxel index). In 3D the axial slice of crop 1 with
    the most positives is drawn, and the slice of crop 2 its voxels lie on. Drawn in array
    orientation (row 0 on top), so that the marks sit where the indices say.
    """
    rows = pos1[:, 0] == pair
    p1, p2 = pos1[rows, 1:].long(), pos2[rows, 1:].long()
    if crop1.ndim == 4:
        z = int(p1[:, 0].mode().values)
        on = p1[:, 0] == z
        slices = (crop1[0, z], crop2[0, int(p2[on, 0][0])])
        p1, p2 = p1[on, 1:], p2[on, 1:]
        titles = (f"crop 1, slice {z}", f"crop 2, slice {int(pos2[rows][on][0, 1])}")
    else:
        slices, titles = (crop1[0], crop2[0]), ("crop 1", "crop 2")
    colours = plt.get_cmap("hsv")(np.linspace(0, 1, len(p1), endpoint=False))
    fig, axes = plt.subplots(1, 2, figsize=(7, 3.6))
    for ax, image, points, title in zip(axes, slices, (p1, p2), titles, strict=True):
        ax.imshow(image.numpy(), cmap="gray", vmin=0, vmax=1)
        ax.scatter(points[:, 1], points[:, 0], s=6, c=colours)
        ax.set_title(f"{title}: {len(points)} positives", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    return fig
