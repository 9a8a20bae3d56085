"""The cluster reading of frozen features: NMI, spherical k-means, and ``medssl clusters``."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import medssl_kit.train.feature_clusters as fc
from medssl_kit.cli import main
from medssl_kit.errors import MedsslError
from medssl_kit.evaluate.clustering import (
    assign_clusters,
    grid_cells,
    normalized_mutual_information,
    quantile_bins,
    spherical_kmeans,
)
from medssl_kit.train.feature_clusters import ClusterConfig, feature_clusters


def test_nmi_of_a_hand_computed_case():
    # joint p(0,0)=1/2, p(1,0)=p(1,1)=1/4: H(A)=ln 2, H(B)=H(3/4, 1/4), I = H(B) − H(B|A),
    # H(B|A) = (1/2) ln 2; NMI = 2I / (H(A) + H(B)) = 0.34371 (scikit-learn gives the same)
    a, b = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 0, 1])
    h_b = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    expected = 2 * (h_b - 0.5 * math.log(2)) / (math.log(2) + h_b)
    assert normalized_mutual_information(a, b) == pytest.approx(expected, abs=1e-9)
    assert expected == pytest.approx(0.34371, abs=1e-5)
    assert normalized_mutual_information(b, a) == pytest.approx(expected, abs=1e-9)


def test_nmi_ignores_label_values_and_spans_zero_to_one():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (1000,), generator=g)
    assert normalized_mutual_information(a, 7 * a + 3) == pytest.approx(1.0)
    assert normalized_mutual_information(a, (a + 2) % 5) == pytest.approx(1.0)
    independent = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1])
    assert normalized_mutual_information(*independent) == pytest.approx(0.0, abs=1e-12)
    noisy = torch.where(torch.rand(1000, generator=g) < 0.3, torch.randint(0, 5, (1000,)), a)
    assert 0.2 < normalized_mutual_information(a, noisy) < 0.9
    assert normalized_mutual_information(torch.zeros(4), torch.ones(4)) == 1.0
    with pytest.raises(ValueError, match="one length"):
        normalized_mutual_information(a, a[:10])


def test_spherical_kmeans_finds_separated_directions():
    g = torch.Generator().manual_seed(0)
    truth = torch.randint(0, 5, (3000,), generator=g)
    directions = F.normalize(torch.randn(5, 16, generator=g), dim=1)
    x = (directions[truth] + 0.05 * torch.randn(3000, 16, generator=g)) * torch.rand(3000, 1) * 9
    centroids = spherical_kmeans(x, 5, torch.Generator().manual_seed(1), sample=1000)
    torch.testing.assert_close(centroids.norm(dim=1), torch.ones(5))
    clusters = assign_clusters(x, centroids, chunk=700)
    assert normalized_mutual_information(clusters, truth) == pytest.approx(1.0)
    again = spherical_kmeans(x, 5, torch.Generator().manual_seed(1), sample=1000)
    assert torch.equal(centroids, again)
    with pytest.raises(ValueError, match="N >= k"):
        spherical_kmeans(x[:3], 5, g)


def test_quantile_bins_and_grid_cells():
    bins = quantile_bins(torch.arange(80.0).flip(0).reshape(8, 10), 4)
    assert torch.bincount(bins.flatten()).tolist() == [20, 20, 20, 20]
    assert bins[0, 0] == 3 and bins[-1, -1] == 0  # the largest value, the smallest
    cells = grid_cells((6, 9), 3)
    assert cells.shape == (6, 9) and cells[0, 0] == 0 and cells[-1, -1] == 8
    assert cells[0, 3] == 1 and cells[2, 0] == 3 and cells.unique().tolist() == list(range(9))


class _Reader:
    """A stand-in for the frozen network: features made from the image by ``fn``."""

    def __init__(self, fn):
        self.fn = fn

    def eval(self):
        return self

    def pixel_features(self, x):
        return self.fn(x)


def _position_features(x):
    cells = grid_cells(tuple(x.shape[-2:]), 4)
    return F.one_hot(cells, 16).movedim(-1, 0).float().expand(len(x), -1, -1, -1)


def _intensity_features(x):
    angle = x[:, :1] * math.pi / 2
    return torch.cat([angle.cos(), angle.sin()], 1)


@pytest.mark.parametrize(
    ("fn", "factor"), [(_position_features, "position"), (_intensity_features, "intensity")]
)
def test_feature_clusters_name_what_the_features_follow(
    tiny_phantom, tmp_path, monkeypatch, fn, factor
):
    """Features that are the pixel's grid cell (or its intensity) must be read as following
    position (or intensity) above the other factors, so factor maps and pixels line up."""
    monkeypatch.setattr(fc, "build_model", lambda *a, **k: (_Reader(fn), "fake", None))
    cfg = ClusterConfig(profile="smoke", pixel_fraction=0.5, restarts=2)
    result = feature_clusters("scratch", tiny_phantom, cfg, out=tmp_path / "c.json")
    nmi = result["nmi"]
    others = [v for f, v in nmi.items() if f != factor]
    assert nmi[factor] > 0.6 and nmi[factor] > max(others) + 0.2
    if factor == "position":
        assert nmi["position"] > 0.95  # the clusters are the grid cells
    assert len(result["nmi_per_restart"]) == 2 and result["method"] == "fake"
    assert json.loads((tmp_path / "c.json").read_text())["nmi"] == pytest.approx(nmi)
    assert set(result["reference"]) == {"position", "intensity"}


def test_cli_clusters_a_random_network(tiny_phantom, tmp_path, capsys):
    out = tmp_path / "clusters.json"
    args = ["clusters", "--manifest", str(tiny_phantom), "--profile", "smoke", "--k", "4"]
    assert main([*args, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["method"] == "scratch" and result["config"]["k"] == 4
    assert all(0 <= v <= 1 for v in result["nmi"].values()) and result["pixels"] > 4
    assert "NMI with organ" in capsys.readouterr().out
    assert main([*args, "--features", "bottleneck"]) == 2
    with pytest.raises(MedsslError, match="k >= 2"):
        feature_clusters("scratch", tiny_phantom, ClusterConfig(profile="smoke", k=1))
    manifest = json.loads(tiny_phantom.read_text())
    manifest["base_dir"] = str(tiny_phantom.parent)
    manifest["cases"] = [c for c in manifest["cases"] if c["split"] != "val"]
    (tmp_path / "m.json").write_text(json.dumps(manifest))
    with pytest.raises(MedsslError, match="split 'val' has no case"):
        feature_clusters(
            "scratch", tmp_path / "m.json", ClusterConfig(profile="smoke", split="val")
        )


def test_feature_clusters_leave_out_ignored_pixels(tiny_phantom, monkeypatch):
    """Ignored pixels are unknown, not background: they stay out of the organ factor and of the
    clustered pixels."""
    monkeypatch.setattr(
        fc, "build_model", lambda *a, **k: (_Reader(_intensity_features), "fake", None)
    )
    cfg = ClusterConfig(profile="smoke", pixel_fraction=1.0, restarts=1, k=4)
    full = feature_clusters("scratch", tiny_phantom, cfg)
    load = fc.load_volumes

    def with_ignored_rows(manifest, splits):
        vols = load(manifest, splits)
        for v in vols:
            v.label[..., : v.label.shape[-2] // 2, :] = manifest.ignore_index
        return vols

    monkeypatch.setattr(fc, "load_volumes", with_ignored_rows)
    half = feature_clusters("scratch", tiny_phantom, cfg)
    assert half["slices"] == full["slices"]
    assert 4 <= half["pixels"] < 0.8 * full["pixels"]
