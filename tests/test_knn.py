"""kNN dense label transfer: the voting rule, the balanced reference set, and ``--mode knn``."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medssl_kit.cli import main
from medssl_kit.data.datasets import SliceDataset, load_volumes
from medssl_kit.data.manifest import load_manifest
from medssl_kit.errors import MedsslError
from medssl_kit.evaluate.knn import balanced_reference, knn_vote
from medssl_kit.models.base import BackboneFeatures
from medssl_kit.train.finetune import FinetuneConfig, finetune, load_finetuned
from medssl_kit.train.finetune_config import MODES
from medssl_kit.train.knn_segmenter import _KnnSegmenter


def _naive_vote(reference, labels, query, n_classes, k, temperature):
    out = torch.zeros(len(query), n_classes)
    for i, q in enumerate(query):
        sim = F.cosine_similarity(reference, q[None], dim=1)
        top = sim.argsort(descending=True)[:k]
        for j in top:
            out[i, labels[j]] += torch.exp(sim[j] / temperature)
        out[i] /= out[i].sum()
    return out


def test_knn_vote_matches_the_formula_across_chunks():
    g = torch.Generator().manual_seed(0)
    reference = torch.randn(50, 6, generator=g)
    labels = torch.randint(0, 4, (50,), generator=g)
    query = torch.randn(23, 6, generator=g)
    expected = _naive_vote(reference, labels, query, 4, k=7, temperature=0.1)
    got = knn_vote(reference, labels, query, 4, k=7, temperature=0.1, chunk=5)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got.sum(1), torch.ones(23))
    # k larger than the reference set: every reference row votes
    everyone = knn_vote(reference, labels, query, 4, k=500, temperature=0.1)
    torch.testing.assert_close(everyone, _naive_vote(reference, labels, query, 4, 50, 0.1))


def test_knn_vote_returns_the_label_of_an_identical_reference():
    reference = torch.eye(3)
    labels = torch.tensor([2, 0, 1])
    probs = knn_vote(reference, labels, 5 * torch.eye(3), 3, k=1)  # scale does not matter
    assert probs.argmax(1).tolist() == [2, 0, 1]
    torch.testing.assert_close(probs.max(1).values, torch.ones(3))
    with pytest.raises(ValueError, match="share F"):
        knn_vote(reference, labels, torch.ones(2, 4), 3)
    with pytest.raises(ValueError, match="empty"):
        knn_vote(torch.zeros(0, 3), labels[:0], torch.ones(2, 3), 3)


def test_balanced_reference_caps_each_class_and_is_seeded():
    labels = torch.tensor([0] * 100 + [1] * 3 + [2] * 40)
    idx = balanced_reference(labels, 10, torch.Generator().manual_seed(1))
    counts = torch.bincount(labels[idx], minlength=3).tolist()
    assert counts == [10, 3, 10]
    assert len(idx.unique()) == len(idx) and torch.equal(idx, idx.sort().values)
    again = balanced_reference(labels, 10, torch.Generator().manual_seed(1))
    other = balanced_reference(labels, 10, torch.Generator().manual_seed(2))
    assert torch.equal(idx, again) and not torch.equal(idx, other)


class _LabelFeatures(nn.Module):
    """A fake backbone whose decoder features are the one-hot of round(image · 10)."""

    def forward_features(self, x):
        onehot = F.one_hot(x[:, 0].mul(10).round().long(), 8).movedim(-1, 1).float()
        return BackboneFeatures(encoder=[onehot], decoder=[onehot], output=onehot)


def test_knn_segmenter_labels_pixels_by_their_features(tiny_phantom):
    """Images whose intensity encodes the label: the segmenter must reproduce every label, so
    the reference pixels, their labels and the query reshaping line up."""
    manifest = load_manifest(tiny_phantom)
    vol = load_volumes(manifest, ["train"])[0]
    vol.image = vol.label.float() / 10 * (vol.label != manifest.ignore_index)
    slices = SliceDataset([vol], with_label=True)
    model = _KnnSegmenter(_LabelFeatures(), 8, FinetuneConfig(knn_k=5, knn_per_class=30))
    model.fit(slices, manifest, batch_size=3)
    present = vol.label[vol.label != manifest.ignore_index].unique()
    assert sorted(model.reference_labels.unique().tolist()) == present.tolist()
    assert torch.bincount(model.reference_labels).max() <= 30
    item = slices[len(slices) // 2]
    pred = model(item["image"][None]).argmax(1)[0]
    assert torch.equal(pred, item["label"][0].long())


def test_knn_mode_trains_nothing_and_evaluates(tiny_phantom, tmp_path, monkeypatch):
    def no_optimizer(*args, **kwargs):
        raise AssertionError("knn mode built an optimizer")

    monkeypatch.setattr(torch.optim, "Adam", no_optimizer)
    cfg = FinetuneConfig(mode="knn", profile="smoke", labeled=1, knn_per_class=50)
    result = finetune("scratch", tiny_phantom, cfg, tmp_path / "knn", progress=False)
    assert result.summary["steps_run"] == 0 and result.summary["mode"] == "knn"
    assert (result.run_dir / "metrics.jsonl").read_text() == ""
    assert not (result.run_dir / "checkpoint.pt").exists()
    assert 0 <= result.summary["organ_dice"] <= 1 and (result.run_dir / "results.csv").is_file()
    with pytest.raises(MedsslError, match="knn run"):
        load_finetuned(result.run_dir)
    encoder = FinetuneConfig(**{**vars(cfg), "knn_features": "encoder"})
    result = finetune("scratch", tiny_phantom, encoder, tmp_path / "knn-enc", progress=False)
    assert 0 <= result.summary["organ_dice"] <= 1
    with pytest.raises(MedsslError, match="knn mode works on 2D"):
        finetune("scratch", tiny_phantom, FinetuneConfig(mode="knn", dims=3), tmp_path / "x")
    with pytest.raises(MedsslError, match="knn_features"):
        bad = FinetuneConfig(mode="knn", knn_features="bottleneck")
        finetune("scratch", tiny_phantom, bad, tmp_path / "y")


def test_cli_runs_knn_mode(tiny_phantom, tmp_path, capsys):
    out = tmp_path / "cli-knn"
    args = ["finetune", "--mode", "knn", "--manifest", str(tiny_phantom), "--profile", "smoke"]
    assert main([*args, "--labeled", "1", "--set", "knn_per_class=20", "--out", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["mode"] == "knn"
    assert "organ_dice=" in capsys.readouterr().out
    assert "knn" in MODES
