"""vox2vec and hierarchical dense SSL: the voxel InfoNCE by hand, positives by a coordinate-image
oracle, the balanced projections' registration, runs in 2D / 3D, the fpn's linear and non-linear
fine-tuning modes, and a CLI round trip."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from medssl_kit.cli import EXIT_OK, main
from medssl_kit.data.io import CaseVolume
from medssl_kit.data.manifest import load_manifest
from medssl_kit.errors import MedsslError
from medssl_kit.losses.hierarchical_dense import hybrid_loss, voxel_info_nce
from medssl_kit.methods.hierarchical_dense import (
    HierarchicalDense,
    Vox2Vec,
    local_augmentation,
    sample_pyramid,
)
from medssl_kit.models.registry import build_backbone
from medssl_kit.train.checkpoint import load_checkpoint
from medssl_kit.train.finetune import FinetuneConfig, build_model, finetune
from medssl_kit.train.finetune_config import NONLINEAR_LR
from medssl_kit.train.finetune_schedule import frozen_trunk, nonlinear_schedule, unfreeze_step
from medssl_kit.train.finetune_tasks import _SegmentTask
from medssl_kit.train.pretrain import PretrainConfig, pretrain, run_pretraining
from medssl_kit.train.transfer import check_transferable_fits, read_transferable, save_transferable

SIZES = {"crop_size": (16, 16), "patch_size": (8, 16, 16)}
FPN = {"n_levels": 3, "base_channels": 4}


def volume(image: torch.Tensor, case: str = "c0") -> CaseVolume:
    return CaseVolume(case, image, None, (1.0, 1.0, 1.0), np.eye(4), np.eye(4), "pretrain")


def method(cls, dims: int, in_channels: int = 1, **cfg):
    backbone = build_backbone("fpn", dims, in_channels, 3, **FPN)
    return cls(backbone, {**SIZES, "voxels_per_pair": 64, **cfg})


# --- eq. 1 by hand --------------------------------------------------------------------------------


def test_voxel_info_nce_against_a_hand_computed_case():
    z1 = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8]]), dim=1)
    z2 = F.normalize(torch.tensor([[0.8, 0.6], [0.0, 1.0]]), dim=1)
    tau = 0.1
    every = [*z1, *z2]

    def term(anchor: int, positive: int) -> float:
        a = every[anchor]
        others = [math.exp(float(a @ v) / tau) for j, v in enumerate(every) if j != anchor]
        return -math.log(math.exp(float(a @ every[positive]) / tau) / sum(others))

    by_hand = (term(0, 2) + term(1, 3) + term(2, 0) + term(3, 1)) / 4
    assert voxel_info_nce(z1, z2, tau).item() == pytest.approx(by_hand, rel=1e-5)
    # both crops keep their gradient (one network sees both)
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    voxel_info_nce(a, b, tau).backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0
    assert hybrid_loss(torch.tensor(1.5), torch.tensor(0.2)).item() == pytest.approx(3.5)
    assert hybrid_loss(torch.tensor(1.5), None).item() == 1.5


# --- positives: the same physical voxel -----------------------------------------------------------


@pytest.mark.parametrize("cls", [Vox2Vec, HierarchicalDense])
@pytest.mark.parametrize("dims", [2, 3])
def test_positives_are_the_same_physical_voxel_by_a_coordinate_image(cls, dims):
    shape = (10, 28, 30)
    grid = torch.stack(torch.meshgrid(*[torch.arange(n) for n in shape], indexing="ij")).float()
    body = (grid[2] >= 12).float()[None]  # only x >= 12 is body
    image = torch.cat([body, grid + 1])  # channels: body, z+1, y+1, x+1 (voxel coordinates)
    m = method(cls, dims, in_channels=4)
    batch = m.make_batch([volume(image), volume(image)], torch.Generator().manual_seed(1))
    pos1, pos2 = batch["pos1"], batch["pos2"]
    assert len(pos1) == len(pos2) > 0
    assert torch.equal(pos1, pos1.round()) and torch.equal(pos2, pos2.round())
    for b in range(2):
        rows = pos1[:, 0] == b
        assert 0 < int(rows.sum()) <= 64
        i1 = pos1[rows, 1:].long()
        i2 = pos2[rows, 1:].long()
        at1 = batch["p1"][b][(slice(None), *i1.t())]  # [channels, n]
        at2 = batch["p2"][b][(slice(None), *i2.t())]
        assert torch.equal(at1, at2)  # the same voxel of the volume
        assert bool((at1[0] == 1).all()) and bool((at1[-1] >= 13).all())  # body voxels only
        assert len(torch.unique(i1, dim=0)) == len(i1)  # drawn without replacement
        # the full-resolution level is read exactly at the voxel
        read = sample_pyramid([batch["p1"]], pos1[rows], m.crop)
        assert torch.equal(read, at1.t())
    if cls is Vox2Vec:  # no local augmentation: the inputs are the crops
        assert torch.equal(batch["v1"], batch["p1"]) and torch.equal(batch["v2"], batch["p2"])
    else:
        assert not torch.equal(batch["v1"], batch["p1"])


def test_coarse_levels_are_read_by_linear_interpolation():
    level = torch.arange(16.0).view(1, 1, 4, 4)  # a 2x coarser map of an 8x8 crop
    positions = torch.tensor([[0.0, 1.0, 1.0], [0.0, 2.0, 3.0]])
    read = sample_pyramid([level], positions, (8, 8))[:, 0]
    # voxel p sits at cell (p + 0.5) / 2 - 0.5: voxel 1 -> 0.25, 2 -> 0.75, 3 -> 1.25; the map
    # is 4 y + x, which bilinear interpolation reproduces
    expected = [4 * 0.25 + 0.25, 4 * 0.75 + 1.25]
    assert read.tolist() == pytest.approx(expected)


# --- the balanced projections: registered, trained, saved -----------------------------------------


def test_every_balanced_projection_gets_a_gradient_is_stepped_and_saved(tmp_path):
    torch.manual_seed(0)
    m = method(HierarchicalDense, 3)
    params = {f"balance.{k}": p for k, p in m.balance.named_parameters()}
    assert len(params) == 2 * len(m.backbone.decoder_channels)  # a weight and a bias per level
    assert set(params) <= {k for k, _ in m.named_parameters()}
    before = {k: p.detach().clone() for k, p in params.items()}
    batch = m.make_batch([volume(torch.rand(1, 12, 24, 24))] * 2, torch.Generator().manual_seed(0))
    m(batch, 0)["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())

    # through the pre-training loop: the optimiser steps them and the checkpoint holds them
    cfg = PretrainConfig(
        method="hierarchical_dense", profile="smoke", dims=3, steps=1, batch_size=2,
        backbone="fpn", backbone_kwargs=FPN, patch_size=SIZES["patch_size"],
    ).resolved()  # fmt: skip
    m.zero_grad()
    pretrain(m, [volume(torch.rand(1, 12, 24, 24))], cfg, tmp_path / "run", progress=False)
    saved = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["method"]
    assert set(params) <= set(saved)
    assert all(not torch.equal(saved[k], before[k]) for k in params)
    assert all(torch.equal(saved[k], p.detach()) for k, p in params.items())


# --- runs -----------------------------------------------------------------------------------------


# --- the local augmentation (§2.1) ---------------------------------------------------------------


def test_local_augmentation_curve_keeps_the_intensity_order_as_the_public_code():
    """The public code's Bézier curve is always increasing (both coordinates sorted): a voxel
    brighter than another in the clean crop stays brighter in the augmented one. Models
    Genesis reverses the curve half the time; ``invert_rate`` reproduces that on request."""
    clean = torch.randperm(8 * 16 * 16).float().div(8 * 16 * 16 - 1).reshape(1, 8, 16, 16)
    kept = clean.clone()
    order = clean.flatten().argsort()
    for seed in range(16):
        gen = torch.Generator().manual_seed(seed)
        out = local_augmentation(clean, gen, shuffle_rate=0.0, nonlinear_rate=1.0, inpaint_boxes=0)
        assert not torch.equal(out, clean)
        assert (out.flatten()[order].diff() >= 0).all(), f"seed {seed}: the curve was reversed"
        gen = torch.Generator().manual_seed(seed)
        flipped = local_augmentation(clean, gen, 0.0, 1.0, 0, invert_rate=1.0)
        assert (flipped.flatten()[order].diff() <= 0).all()
    torch.testing.assert_close(clean, kept, rtol=0, atol=0)
    assert HierarchicalDense.defaults["invert_rate"] == 0.0


def test_local_augmentation_shuffles_and_inpaints_in_place_of_the_crop():
    clean = torch.rand(1, 32, 64, 64, generator=torch.Generator().manual_seed(0))
    shuffled = local_augmentation(clean, torch.Generator().manual_seed(1), 1.0, 0.0, 0)
    # the cpu crop: 5000 blocks of 1×3×3 voxels (1/20 of each side, rounded down), a quarter moves
    assert 0.2 < (shuffled != clean).float().mean() < 0.34
    painted = local_augmentation(clean, torch.Generator().manual_seed(1), 0.0, 0.0, 30)
    changed = painted != clean
    assert 0 < changed.float().mean() < 0.5  # some noise boxes, most of the crop kept
    off = local_augmentation(clean, torch.Generator().manual_seed(1), 0.0, 0.0, 0)
    assert torch.equal(off, clean) and off is not clean


@pytest.mark.parametrize("name", ["vox2vec", "hierarchical_dense"])
@pytest.mark.parametrize("dims", [2, 3])
def test_both_methods_run_at_smoke_in_2d_and_3d(name, dims, tiny_phantom, tmp_path):
    cfg = PretrainConfig(
        method=name, profile="smoke", dims=dims, steps=2, patch_size=(8, 32, 32),
        method_cfg={"voxels_per_pair": 128},
    )  # fmt: skip
    result = run_pretraining(cfg, tiny_phantom, tmp_path / "run", progress=False)
    log = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    recon = name == "hierarchical_dense"
    for r in log:
        assert math.isfinite(r["loss"]) and 0 < r["positives"] <= 128 * cfg.resolved().batch_size
        assert ("mse" in r) == recon
        assert r["loss"] == pytest.approx(r["infonce"] + 10 * r.get("mse", 0.0), rel=1e-5)
    assert result.summary["backbone"] == "fpn" and result.summary["dims"] == dims
    header = read_transferable(tmp_path / "run")
    assert header["state_dict"] and not any(k.startswith("head.") for k in header["state_dict"])
    # the network fine-tuning builds for the fpn is the one pre-trained
    ft = FinetuneConfig(profile="smoke", backbone="fpn", dims=dims, mode="linear").resolved()
    built = build_backbone("fpn", dims, 1, 8, **ft.backbone_kwargs).config
    check_transferable_fits(header, built, "run")


@pytest.mark.parametrize("cls", [Vox2Vec, HierarchicalDense])
def test_cpu_profile_trains_3d_within_its_budget_and_2d_at_the_profiles_steps(cls):
    three = PretrainConfig(method=cls.name, profile="cpu", dims=3).resolved()
    assert three.steps == cls.cpu_steps_3d and three.batch_size == 2
    two = PretrainConfig(method=cls.name, profile="cpu", dims=2).resolved()
    assert two.steps == PretrainConfig(method="simsiam", profile="cpu", dims=2).resolved().steps
    # 2048 sampled voxels a batch off the GPU in both (a 2D batch of 8 pairs × 1024 made the
    # loss's logits 16× larger and a laptop step ≈ 20 s); the papers' 1024 a pair at gpu
    assert three.method_cfg["voxels_per_pair"] * three.batch_size == 2048
    assert two.method_cfg["voxels_per_pair"] * two.batch_size == 2048
    laptop = PretrainConfig(method=cls.name, profile="laptop", dims=2).resolved()
    assert laptop.method_cfg["voxels_per_pair"] == 256
    assert (
        PretrainConfig(method=cls.name, profile="gpu", dims=2)
        .resolved()
        .method_cfg["voxels_per_pair"]
        == 1024
    )
    assert PretrainConfig(method=cls.name, profile="smoke", dims=3).resolved().steps < 50


def test_bad_settings_get_clear_errors(tiny_phantom, tmp_path):
    backbone = build_backbone("fpn", 3, 1, 3, n_levels=5, base_channels=4)
    with pytest.raises(MedsslError, match=r"coarsest level.*2\*\*4 = 16"):
        HierarchicalDense(backbone, {"patch_size": (8, 32, 32)})
    with pytest.raises(MedsslError, match="unknown setting"):
        Vox2Vec(build_backbone("fpn", 2, 1, 3, **FPN), {**SIZES, "augment": True})
    m = method(Vox2Vec, 3)
    with pytest.raises(MedsslError, match="case 'c0'.*smaller"):
        m.make_batch([volume(torch.rand(1, 6, 24, 24))], torch.Generator())
    with pytest.raises(MedsslError, match="--backbone fpn"):
        FinetuneConfig(profile="smoke", mode="linear").resolved()


# --- fine-tuning modes on the fpn -----------------------------------------------------------------


FAST = dict(profile="smoke", backbone="fpn", dims=2, steps=4, val_every=4, batch_size=2)


@pytest.fixture()
def fpn_init(tmp_path):
    torch.manual_seed(0)
    net = build_backbone("fpn", 2, 1, 8, n_levels=4, base_channels=8)
    state = {k: v for k, v in net.state_dict().items() if not k.startswith("head.")}
    save_transferable(tmp_path / "pre" / "transferable.pt", net, "vox2vec", state_dict=state)
    return tmp_path / "pre", state


def test_linear_probe_leaves_the_backbone_unchanged(fpn_init, tiny_phantom, tmp_path):
    init, state = fpn_init
    result = finetune(init, tiny_phantom, FinetuneConfig(mode="linear", **FAST), tmp_path / "ft")
    tuned = read_transferable(result.run_dir)
    assert tuned["backbone"]["head"] == "linear"
    assert all(torch.equal(tuned["state_dict"][k], v) for k, v in state.items())  # BN stats too
    heads = [k for k in tuned["state_dict"] if k.startswith("head.convs.")]
    assert len(heads) == 2 * 4  # a 1x1 convolution (weight, bias) per pyramid level
    assert set(pd.read_csv(result.run_dir / "results.csv")["mode"]) == {"linear"}


def test_nonlinear_schedule_freezes_then_ramps_the_backbone_exponentially():
    cfg = FinetuneConfig(mode="nonlinear", steps=30, ramp_fraction=0.1, backbone="fpn")
    head, backbone = nonlinear_schedule(cfg)
    assert unfreeze_step(cfg) == 10  # the paper's 15K of 45K steps: a third
    poly = [(1 - s / 30) ** 0.9 for s in range(30)]
    assert [backbone(s) for s in range(10)] == [0.0] * 10
    ramp = [backbone(s) / poly[s] for s in range(10, 15)]
    assert ramp == pytest.approx([0.1, 0.1 ** (2 / 3), 0.1 ** (1 / 3), 1.0, 1.0])
    assert [head(s) for s in range(30)] == pytest.approx(poly)


def test_nonlinear_mode_trains_the_backbone_only_after_unfreezing(fpn_init, tiny_phantom, tmp_path):
    init, state = fpn_init
    cfg = FinetuneConfig(mode="nonlinear", unfreeze_at=0.5, **FAST).resolved()
    model, _, _ = build_model(init, load_manifest(tiny_phantom), cfg)
    assert type(model.head).__name__ == "NonLinearHead"
    task = _SegmentTask(cfg, load_manifest(tiny_phantom))
    model.train()
    x = torch.randn(2, 1, 32, 32)
    task.set_train_modes(model, 1)
    trunk = dict(frozen_trunk(model))
    norms = [p for n, p in model.named_parameters() if not n.startswith("head.") and n not in trunk]
    assert (
        trunk
        and norms
        and set(trunk)
        == {n for n, _ in model.named_parameters() if not n.startswith("head.") and ".N." not in n}
    )
    assert not any(p.requires_grad for p in trunk.values())
    # normalisation layers train from the first step in training mode (BackboneFinetuning's
    # train_bn): unfreezing changes no activation, and nothing else runs in eval mode
    assert all(p.requires_grad for p in norms) and all(m.training for m in model.modules())
    with torch.no_grad():
        frozen_out = model(x)
    task.set_train_modes(model, 2)
    assert all(p.requires_grad for p in trunk.values())
    with torch.no_grad():
        assert torch.allclose(model(x), frozen_out)
    assert cfg.lr == NONLINEAR_LR == 3e-4  # the papers' rate, not the profile's
    assert FinetuneConfig(mode="nonlinear", lr=1e-3, **FAST).resolved().lr == 1e-3

    result = finetune(init, tiny_phantom, cfg, tmp_path / "ft", progress=False)
    tuned = read_transferable(result.run_dir)["state_dict"]
    assert any(not torch.equal(tuned[k], v) for k, v in state.items())
    assert result.summary["mode"] == "nonlinear"


def test_cli_pretrain_then_linear_probe_round_trip(tiny_phantom, tmp_path):
    run, ft = tmp_path / "run", tmp_path / "ft"
    args = ["--manifest", tiny_phantom, "--profile", "smoke", "--dims", "2", "--steps", "2"]
    assert main(["pretrain", "--method", "vox2vec", *map(str, args), "--out", str(run)]) == EXIT_OK
    assert (run / "transferable.pt").is_file()
    code = main(
        ["finetune", "--init", str(run), "--mode", "linear", "--backbone", "fpn", "--labeled",
         "1", *map(str, args), "--out", str(ft)]
    )  # fmt: skip
    assert code == EXIT_OK
    summary = json.loads((ft / "summary.json").read_text())
    assert summary["method"] == "vox2vec" and summary["mode"] == "linear"
    rows = pd.read_csv(ft / "results.csv")
    assert set(rows["method"]) == {"vox2vec"} and rows["dice"].dropna().between(0, 1).all()
