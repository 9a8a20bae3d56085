"""MixCL: the identity loss against MONAI's Barlow Twins, eq. 7's weight map and sampling, the
label relation matrix and eq. 6 by hand, the method's batches and terms, and runs into
fine-tuning and export on 2D / 3D, ``unet`` / ``unetr``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.losses import BarlowTwinsLoss
from monai.networks.nets import UNETR

from medssl_kit.data.io import CaseVolume
from medssl_kit.data.phantom import make_phantom
from medssl_kit.errors import MedsslError
from medssl_kit.losses.mixcl import (
    IGNORED,
    NEGATIVE,
    POSITIVE,
    boundary_weight_map,
    identity_consistency_loss,
    label_consistency_loss,
    label_relation,
    pixel_barlow_twins,
    sample_class_pixels,
)
from medssl_kit.methods.mixcl import ABLATIONS, MixCL
from medssl_kit.methods.registry import get_method
from medssl_kit.models.registry import build_backbone
from medssl_kit.train.checkpoint import load_checkpoint
from medssl_kit.train.finetune import FinetuneConfig, finetune
from medssl_kit.train.pretrain import PretrainConfig, load_method, pooled_volumes, run_pretraining
from medssl_kit.train.transfer import export_run, read_transferable

UNET = {"channels": (4, 8, 8, 8, 8)}
UNETR_SMALL = {"hidden_size": 24, "mlp_dim": 48, "num_heads": 2, "feature_size": 4}
SIZES = {"crop_size": (32, 32), "patch_size": (16, 32, 32)}


# --- identity consistency (eqs. 4-5) -------------------------------------------------------------


def test_pixel_barlow_twins_is_monais_loss_with_pixel_m_of_each_view_as_a_pair():
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(2, 5, 3, 4, generator=g)
    z2 = z1 + 0.3 * torch.randn(2, 5, 3, 4, generator=g)
    rows = [z.permute(0, 2, 3, 1).reshape(-1, 5) for z in (z1, z2)]  # [M = 24 pixels, C = 5]
    expected = BarlowTwinsLoss(lambd=5e-3)(*rows)
    assert pixel_barlow_twins(z1, z2).item() == pytest.approx(expected.item(), rel=1e-6)
    # eqs. 4-5 by hand on the channel-standardised pixels
    a, b = ((r - r.mean(0)) / (r.std(0) + 1e-6) for r in rows)
    c = (a.t() @ b / a.shape[0]).tolist()
    by_hand = sum((1 - c[i][i]) ** 2 for i in range(5)) + 5e-3 * sum(
        c[i][j] ** 2 for i in range(5) for j in range(5) if i != j
    )
    assert pixel_barlow_twins(z1, z2).item() == pytest.approx(by_hand, rel=1e-5)
    # pixel m meets pixel m: the same maps with view 2's pixels shuffled give another value
    shuffled = z2.flatten(2)[:, :, torch.randperm(12, generator=g)].view_as(z2)
    assert pixel_barlow_twins(z1, shuffled).item() > expected.item() + 0.5
    # summed over layers
    layers = [z1, z1[:, :3]], [z2, z2[:, :3]]
    total = identity_consistency_loss(*layers)
    parts = pixel_barlow_twins(z1, z2) + pixel_barlow_twins(z1[:, :3], z2[:, :3])
    assert total.item() == pytest.approx(parts.item(), rel=1e-6)
    with pytest.raises(ValueError, match="differ in shape"):
        pixel_barlow_twins(z1, z2[:, :3])


# --- eq. 7: weight map and pixel sampling ---------------------------------------------------------


def test_boundary_weight_map_against_a_hand_computed_distance_map():
    mask = torch.zeros(9, 11, dtype=torch.bool)
    mask[2:7, 1:10] = True  # a 5 x 9 rectangle: the nearest outside pixel is straight across
    weight = boundary_weight_map(mask, mu=8.0, eps=0.05)
    for y in range(9):
        for x in range(11):
            if not mask[y, x]:
                assert weight[y, x] == 0
                continue
            d = min(y - 1, 7 - y, x - 0, 10 - x)  # pixels to the first outside pixel
            expected = 0.5 * math.sqrt(d) * math.exp(-d / 8.0) + 0.05
            assert weight[y, x].item() == pytest.approx(expected, rel=1e-6), (y, x)
    assert torch.equal(
        boundary_weight_map(torch.ones(4, 4, dtype=torch.bool)), torch.full((4, 4), 0.05)
    )
    assert not boundary_weight_map(torch.zeros(3, 3, 3, dtype=torch.bool)).any()


def test_sample_class_pixels_follows_the_weights_within_each_class():
    label = torch.zeros(12, 12, dtype=torch.long)
    label[2:10, 2:10] = 1
    label[5, 5] = 2  # one pixel: fewer than the budget, all of it is taken
    label[0, :] = 255  # ignored: never drawn
    idx, cls = sample_class_pixels(label, 10, torch.Generator().manual_seed(0), ignore_index=255)
    assert torch.equal(cls, label.flatten()[idx])  # every draw is of its own class
    assert sorted(set(cls.tolist())) == [0, 1, 2] and (cls == 2).sum() == 1
    assert (cls == 0).sum() == 10 and (cls == 1).sum() == 10 and len(set(idx.tolist())) == 21
    # one draw per call, many calls: the frequencies follow W within the class
    weight = boundary_weight_map(label == 1).flatten()
    counts = torch.zeros(144)
    g = torch.Generator().manual_seed(1)
    for _ in range(3000):
        i, c = sample_class_pixels(label, 1, g, ignore_index=255)
        counts[i[c == 1]] += 1
    assert (counts[weight == 0] == 0).all()
    assert (counts / 3000 - weight / weight.sum()).abs().max() < 0.02


# --- eq. 6: the label relation matrix and the loss ------------------------------------------------


def test_label_relation_on_a_two_source_toy_case():
    # source A (0) labels the liver (1), source B (1) the kidney (3); 0 is each one's background
    classes = torch.tensor([0, 1, 1, 0, 3, 3])
    sources = torch.tensor([0, 0, 0, 1, 1, 1])
    P, N, X = POSITIVE, NEGATIVE, IGNORED
    expected = torch.tensor(
        [
            [X, N, N, X, X, X],  # A background: ignored against all of B
            [N, X, P, X, N, N],  # A liver: positive with A liver, negative with B's kidney
            [N, P, X, X, N, N],
            [X, X, X, X, N, N],  # B background
            [X, N, N, N, X, P],
            [X, N, N, N, P, X],
        ],
        dtype=torch.int8,
    )
    assert torch.equal(label_relation(classes, sources), expected)
    # one label space: a liver labelled by two sources is a positive pair
    assert label_relation(torch.tensor([1, 1]), torch.tensor([0, 1]))[0, 1] == POSITIVE


def test_label_consistency_loss_by_hand():
    # pixels: two of class 1 and one of class 2, one source; features in the plane
    features = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]], requires_grad=True)
    classes, sources, tau = torch.tensor([1, 1, 2]), torch.zeros(3, dtype=torch.long), 0.1
    cos = [
        [1.0, 1 / math.sqrt(2), 0.0],
        [1 / math.sqrt(2), 1.0, 1 / math.sqrt(2)],
        [0.0, 1 / math.sqrt(2), 1.0],
    ]
    # anchor 0: positive 1, negative 2; anchor 1: positive 0, negative 2; anchor 2: no positive
    term0 = -math.log(
        math.exp(cos[0][1] / tau) / (math.exp(cos[0][1] / tau) + math.exp(cos[0][2] / tau))
    )
    term1 = -math.log(
        math.exp(cos[1][0] / tau) / (math.exp(cos[1][0] / tau) + math.exp(cos[1][2] / tau))
    )
    loss = label_consistency_loss(features, classes, sources, tau)
    assert loss.item() == pytest.approx((term0 + term1) / 2, rel=1e-5)
    loss.backward()
    assert features.grad.abs().sum() > 0


def test_cross_source_background_foreground_pairs_contribute_nothing():
    # A's background beside B's kidney: every anchor's only counted pair is its positive, so the
    # loss is 0 whatever the features; the same pixels from one source are negatives (loss > 0)
    g = torch.Generator().manual_seed(0)
    features = torch.randn(4, 8, generator=g, requires_grad=True)
    classes = torch.tensor([0, 0, 3, 3])
    two_sources = torch.tensor([0, 0, 1, 1])
    loss = label_consistency_loss(features, classes, two_sources)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    loss.backward()
    assert features.grad.abs().max() < 1e-6
    assert label_consistency_loss(features, classes, torch.zeros(4, dtype=torch.long)) > 0.01


# --- the method -----------------------------------------------------------------------------------


def _volume(case: str, source: str, seed: int, shape=(16, 40, 40)) -> CaseVolume:
    g = torch.Generator().manual_seed(seed)
    noise = F.avg_pool3d(torch.rand(1, 1, *[s + 4 for s in shape], generator=g), 5, stride=1)[0]
    label = torch.zeros(1, *shape, dtype=torch.long)
    label[:, 4:12, 8:30, 6:26] = 1 if source == "A" else 3
    image = 0.2 + 0.4 * (label > 0) + 2 * (noise - 0.5)  # an organ in textured tissue
    return CaseVolume(case, image, label, (2.0, 1.0, 1.0), np.eye(4), np.eye(4), "pretrain", source)


def _items(dims: int = 2) -> list[dict]:
    volumes = [_volume(f"{s}{i}", s, 10 * i + ord(s)) for s in "AB" for i in range(2)]
    items = [
        {"volume": v, "partners": [o for o in volumes if o.source == v.source and o is not v]}
        for v in volumes
    ]
    return [{**item, "ignore_index": 255} for item in items]


def _method(dims: int = 2, backbone: str = "unet", **cfg) -> MixCL:
    torch.manual_seed(0)
    kw = UNET if backbone == "unet" else {**UNETR_SMALL, "img_size": SIZES["patch_size"][-dims:]}
    if backbone == "unet" and dims == 3:
        kw = {"channels": (4, 8, 8, 8)}
    net = build_backbone(backbone, dims, 1, 4, **kw)
    return MixCL(net, {**SIZES, **cfg})


def test_views_share_their_patchs_geometry_and_the_sampled_pixels_carry_its_labels():
    method = _method(spatial_prob=0.0, intensity_prob=1.0)
    items = _items()
    batch = method.make_batch(items, torch.Generator().manual_seed(3))
    again = method.make_batch(items, torch.Generator().manual_seed(3))
    assert all(torch.equal(batch[k], again[k]) for k in batch)  # reproducible from the generator
    assert batch["v1"].shape == (4, 1, 32, 32) and batch["s1"].shape == (4, 32, 32)
    # without spatial augmentation the patch is a crop of its volume's slice, labels in register
    for b, item in enumerate(items):
        volume = item["volume"]
        found = False
        for z in range(volume.shape[0]):
            windows = volume.image[0, z].unfold(0, 32, 1).unfold(1, 32, 1)
            hits = (windows == batch["p1"][b, 0]).flatten(2).all(2).nonzero()
            if len(hits):
                y, x = hits[0].tolist()
                assert torch.equal(volume.label[0, z, y : y + 32, x : x + 32], batch["s1"][b])
                found = True
                break
        assert found, b
    # the views differ from their patch in intensity only: pixelwise they stay correlated
    for key in ("v1", "v1p"):
        assert not torch.equal(batch[key], batch["p1"])
        for b in range(4):
            r = torch.corrcoef(torch.stack([batch[key][b].flatten(), batch["p1"][b].flatten()]))
            assert r[0, 1] > 0.8
    # the drawn pixels carry the labels at their positions; sources index the batch's names
    for key in ("1", "2"):
        pix, cls = batch[f"pix{key}"], batch[f"cls{key}"]
        assert torch.equal(batch[f"s{key}"][pix[:, 0], pix[:, 1], pix[:, 2]], cls)
    assert batch["source"].tolist() == [0, 0, 1, 1]


def test_the_auxiliary_patch_comes_from_the_same_source_half_the_time():
    method = _method(spatial_prob=0.0, intensity_prob=0.0, label=False)
    items = _items()
    same_image, g = 0, torch.Generator().manual_seed(0)
    for _ in range(40):
        batch = method.make_batch(items, g)
        for b, item in enumerate(items):
            own = item["volume"].image[0]
            partner = item["partners"][0].image[0]

            def contains(volume, patch):
                windows = volume.unfold(1, 32, 1).unfold(2, 32, 1)
                return bool((windows == patch).flatten(3).all(3).any())

            inside_own = contains(own, batch["p2"][b, 0])
            assert inside_own or contains(partner, batch["p2"][b, 0])  # never another source
            same_image += inside_own
    assert 0.35 < same_image / 160 < 0.65


def test_pixel_features_are_read_at_the_pixels_own_position():
    method = _method()
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    coords = torch.stack([ys, xs])[None].repeat(2, 1, 1, 1)  # a coordinate image per sample
    pixels = torch.tensor([[0, 3, 17], [1, 31, 0], [1, 0, 31], [0, 12, 12]])
    features = method._pixel_features(coords, pixels)
    assert torch.allclose(features, pixels[:, 1:].float())
    half = F.avg_pool2d(coords, 2)  # a half-resolution map: centres at 2i + 0.5
    features = method._pixel_features(half, pixels)
    inside = (pixels[:, 1:] > 0) & (pixels[:, 1:] < 31)  # away from the clamped border
    assert torch.allclose(features[inside], pixels[:, 1:].float()[inside])


@pytest.mark.parametrize("ablation", list(ABLATIONS))
def test_ablations_remove_exactly_their_terms_and_the_total_is_eq_2(ablation):
    method = _method(**ABLATIONS[ablation]).train()
    batch = method.make_batch(_items(), torch.Generator().manual_seed(0))
    terms = method(batch, 0)
    switches = ABLATIONS[ablation]
    assert ("label" in terms) == switches["label"] and ("recon" in terms) == switches["recon"]
    expected = terms["identity"]
    expected = expected + 0.01 * terms["label"] if switches["label"] else expected
    expected = expected + 0.01 * terms["recon"] if switches["recon"] else expected
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    terms["loss"].backward()
    assert all(p.grad is not None for p in method.backbone.encoder.parameters())
    assert all(p.grad is not None for p in method.projectors.parameters())
    assert (method.recon_head.weight.grad is not None) == switches["recon"]
    if switches["recon"]:  # the restoration target is the undistorted patch
        restored = method.recon_head(method.backbone.forward_features(batch["v2"]).decoder[-1])
        assert restored.shape == batch["p2"].shape


def test_settings_and_bad_input():
    assert get_method("mixcl") is MixCL
    cfg = PretrainConfig(method="mixcl", profile="cpu").resolved()
    assert (cfg.dims, cfg.backbone, cfg.splits) == (3, "unetr", ("pretrain",))
    weight = torch.nn.Parameter(torch.ones(2))
    from medssl_kit.train.optim import build_optimizer

    assert isinstance(
        build_optimizer(cfg.optimizer, [weight], cfg.lr, cfg.weight_decay), torch.optim.AdamW
    )
    assert PretrainConfig(method="mixcl", profile="cpu", dims=2).resolved().backbone == "unet"
    with pytest.raises(MedsslError, match="unknown setting"):
        _method(alfa=1.0)
    with pytest.raises(MedsslError, match="label_layer"):
        _method(label_layer=9)
    with pytest.raises(MedsslError, match="input size"):
        MixCL(build_backbone("unetr", 2, 1, 4, img_size=(48, 48), **UNETR_SMALL), SIZES)
    unlabelled = _items()
    unlabelled[0]["volume"].label = None
    with pytest.raises(MedsslError, match="needs labelled cases"):
        _method().make_batch(unlabelled[:1], torch.Generator())
    small = [{**_items()[0], "volume": _volume("tiny", "A", 0, shape=(4, 20, 20))}]
    with pytest.raises(MedsslError, match="smaller than mixcl's patch"):
        _method().make_batch(small, torch.Generator())


# --- runs -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pooled_phantom(tmp_path_factory):
    """A phantom whose pre-training cases come from two partially labelled sources."""
    out = tmp_path_factory.mktemp("pooled")
    split = {"pretrain": 4, "train": 2, "val": 1, "test": 1}
    return make_phantom(out, cases=8, seed=5, shape=(16, 48, 48), split=split, sources=["A", "B"])


def test_pooled_dataset_keeps_labelled_pretrain_cases_with_their_sources_partners(pooled_phantom):
    from medssl_kit.data.datasets import load_volumes
    from medssl_kit.data.manifest import load_manifest

    manifest = load_manifest(pooled_phantom)
    items = pooled_volumes(load_volumes(manifest, ["pretrain"]), manifest, ("pretrain",))
    assert len(items) == 4 and all(item["volume"].split == "pretrain" for item in items)
    for item in items:
        assert all(
            p.source == item["volume"].source and p is not item["volume"] for p in item["partners"]
        )


@pytest.mark.parametrize("dims, backbone", [(2, "unet"), (3, "unet"), (3, "unetr"), (2, "unetr")])
def test_run_pretraining_then_finetune_and_export(dims, backbone, pooled_phantom, tmp_path):
    kw = {**UNETR_SMALL, "img_size": list(SIZES["patch_size" if dims == 3 else "crop_size"])}
    if backbone == "unet":
        kw = {"channels": (4, 8, 8, 8)} if dims == 3 else UNET
    cfg = PretrainConfig(
        method="mixcl", profile="smoke", dims=dims, backbone=backbone, steps=3, checkpoint_every=2,
        backbone_kwargs=kw, **SIZES,
    )  # fmt: skip
    run = tmp_path / "run"
    result = run_pretraining(cfg, pooled_phantom, run, progress=False)
    log = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all({"identity", "label", "recon"} <= set(r) for r in log)
    assert all(math.isfinite(r["loss"]) for r in log) and result.summary["dims"] == dims
    header = read_transferable(run)
    prefix = "vit." if backbone == "unetr" else "encoder."
    assert header["state_dict"] and all(k.startswith(prefix) for k in header["state_dict"])
    loaded = load_method(run)
    saved = load_checkpoint(run / "checkpoint.pt")["method"]
    assert all(torch.equal(v, saved[k]) for k, v in loaded.state_dict().items())

    ft = FinetuneConfig(
        profile="smoke", dims=dims, backbone=backbone, steps=2, val_every=2, batch_size=2,
        backbone_kwargs=kw, crop_size=SIZES["crop_size"], patch_size=SIZES["patch_size"],
    )  # fmt: skip
    tuned = finetune(run, pooled_phantom, ft, tmp_path / "ft", progress=False)
    assert set(tuned.key_report.matched) == set(header["state_dict"])
    assert not tuned.key_report.unexpected and not tuned.key_report.mismatched
    if backbone == "unetr" and dims == 3:
        report, spec = export_run(run, "unetr", tmp_path / "unetr.pt")
        exported = torch.load(tmp_path / "unetr.pt", weights_only=True)
        net = UNETR(**exported["kwargs"])
        net.load_state_dict(exported["state_dict"], strict=False)
        vit = {k: v for k, v in net.state_dict().items() if k.startswith("vit.")}
        assert set(vit) == set(header["state_dict"])
        assert all(torch.equal(vit[k], header["state_dict"][k]) for k in vit)


def test_resume_gives_the_same_weights(pooled_phantom, tmp_path, monkeypatch):
    cfg = PretrainConfig(
        method="mixcl", profile="smoke", dims=2, steps=4, checkpoint_every=2,
        backbone_kwargs=UNET, **SIZES,
    )  # fmt: skip
    run_pretraining(cfg, pooled_phantom, tmp_path / "a", progress=False)
    original = MixCL.on_step_end

    def crash(self, step, max_steps):
        if step == 3:
            raise KeyboardInterrupt
        original(self, step, max_steps)

    monkeypatch.setattr(MixCL, "on_step_end", crash)
    with pytest.raises(KeyboardInterrupt):
        run_pretraining(cfg, pooled_phantom, tmp_path / "b", progress=False)
    monkeypatch.setattr(MixCL, "on_step_end", original)
    run_pretraining(cfg, pooled_phantom, tmp_path / "b", resume=True, progress=False)
    a, b = (load_checkpoint(tmp_path / n / "checkpoint.pt")["method"] for n in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
