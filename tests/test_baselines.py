"""Baselines: SimSiam, BYOL, MoCo v2 and Models Genesis — losses by hand and against MONAI,
stop-gradients, EMA updates, the MoCo queue, clean restoration targets, what transfers, runs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.losses import ContrastiveLoss

from medssl_kit.config import get_profile
from medssl_kit.data.io import CaseVolume
from medssl_kit.errors import MedsslError
from medssl_kit.losses.contrastive import (
    byol_loss,
    info_nce,
    negative_cosine,
    normalized_mse,
    simsiam_loss,
)
from medssl_kit.losses.pcrlv2 import siamese_comparison_loss
from medssl_kit.losses.restoration import restoration_mse
from medssl_kit.methods.baselines import BYOL, MoCoV2, ModelsGenesis, SimSiam
from medssl_kit.methods.ema import ema_update_, frozen_copy, teacher_momentum
from medssl_kit.methods.registry import get_method
from medssl_kit.models.registry import build_backbone
from medssl_kit.train.checkpoint import load_checkpoint
from medssl_kit.train.finetune import FinetuneConfig, finetune
from medssl_kit.train.pretrain import PretrainConfig, load_method, run_pretraining
from medssl_kit.train.transfer import read_transferable

TINY = {2: (4, 8, 8, 8, 8), 3: (4, 8, 8, 8)}
HEADS = {"proj_hidden": 16, "proj_dim": 8}
CONTRASTIVE = {"simsiam": SimSiam, "byol": BYOL, "mocov2": MoCoV2}


def _method(cls, dims: int = 2, **cfg):
    torch.manual_seed(0)
    backbone = build_backbone("unet", dims, 1, 3, channels=TINY[dims])
    if cls is ModelsGenesis:
        sizes = {"crop_size": (32, 32)} if dims == 2 else {"patch_size": (8, 16, 16)}
        return cls(backbone, {**sizes, **cfg})
    extra = {"pred_hidden": 4} if cls is not MoCoV2 else {"queue_size": 6}
    return cls(backbone, {"crop_size": (32, 32), **HEADS, **extra, **cfg})


def _slices(n: int = 4, size: int = 40) -> list[dict]:
    g = torch.Generator().manual_seed(5)
    x = F.avg_pool2d(torch.rand(n, 1, size + 4, size + 4, generator=g), 5, stride=1)
    return [{"image": (s - s.min()) / (s.max() - s.min())} for s in x]


def _batch(method, seed: int = 0, n: int = 4):
    return method.make_batch(_slices(n), torch.Generator().manual_seed(seed))


# --- losses ------------------------------------------------------------------------------------


def test_siamese_losses_by_hand():
    e0, e1 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    diag = torch.tensor([[1.0, 1.0]])
    assert negative_cosine(e0, 3 * e0).item() == pytest.approx(-1.0)
    assert negative_cosine(e0, diag).item() == pytest.approx(-1 / math.sqrt(2))
    assert simsiam_loss(e0, e1, e1, e0).item() == pytest.approx(-1.0)  # p1 ∥ z2, p2 ∥ z1
    assert simsiam_loss(e0, e0, e1, e1).item() == pytest.approx(0.0, abs=1e-7)
    # BYOL: ‖p̄ − z̄‖² = 2 − 2 cos
    assert normalized_mse(e0, -e0).item() == pytest.approx(4.0)
    assert normalized_mse(e0, diag).item() == pytest.approx(2 - math.sqrt(2))
    assert byol_loss(e0, diag, e1, e1).item() == pytest.approx(2 - math.sqrt(2) + 2.0)
    g = torch.Generator().manual_seed(0)
    p1, z1, p2, z2 = torch.randn(4, 5, 8, generator=g).unbind(0)
    assert simsiam_loss(p1, z1, p2, z2).item() == pytest.approx(
        siamese_comparison_loss(p1, z1, p2, z2).item()  # PCRLv2 uses SimSiam's comparison
    )
    expected = (2 - 2 * F.cosine_similarity(p1, z2)).mean() + (
        2 - 2 * F.cosine_similarity(p2, z1)
    ).mean()
    assert byol_loss(p1, z1, p2, z2).item() == pytest.approx(expected.item(), rel=1e-5)
    clean = torch.zeros(1, 1, 2, 2)
    assert restoration_mse(torch.tensor([[[[1.0, 2.0], [0.0, 1.0]]]]), clean).item() == 1.5
    with pytest.raises(ValueError, match="differ in shape"):
        restoration_mse(clean, torch.zeros(1, 1, 2, 3))


def test_info_nce_by_hand():
    q = torch.tensor([[2.0, 0.0]])  # normalised inside
    k = torch.tensor([[1.0, 0.0]])
    queue = torch.tensor([[0.0, 1.0], [-3.0, 0.0]])
    tau = 0.5  # logits (1, 0, −1) / τ = (2, 0, −2)
    expected = -math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(-2)))
    assert info_nce(q, k, queue, tau).item() == pytest.approx(expected)
    assert info_nce(q, k, None, tau).item() == pytest.approx(0.0, abs=1e-7)  # no negative
    assert info_nce(q, k, queue[:0], tau).item() == pytest.approx(0.0, abs=1e-7)
    # in-batch negatives: the other sample's key and query
    q2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    k2 = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    c = 1 / math.sqrt(2)
    row0 = -math.log(math.exp(c / tau) / (math.exp(c / tau) + math.exp(0) + math.exp(0)))
    row1 = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + math.exp(c / tau) + math.exp(0)))
    got = info_nce(q2, k2, None, tau, in_batch_negatives=True).item()
    assert got == pytest.approx((row0 + row1) / 2)


def test_info_nce_equals_monai_contrastive_loss_exactly_when_settings_coincide():
    """MONAI's ContrastiveLoss is SimCLR's NT-Xent: both views are anchors and every other vector
    of the 2B is a negative. That is our InfoNCE with an empty queue and in-batch negatives,
    averaged over the two directions; with a queue or without in-batch negatives it differs."""
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(2, 6, 16, generator=g).unbind(0)
    for tau in (0.2, 0.5):
        monai = ContrastiveLoss(temperature=tau)(z1, z2)
        ours = 0.5 * (info_nce(z1, z2, None, tau, True) + info_nce(z2, z1, None, tau, True))
        torch.testing.assert_close(ours, monai, rtol=1e-5, atol=1e-6)
    monai = ContrastiveLoss(temperature=0.2)(z1, z2).item()
    one_way = info_nce(z1, z2, None, 0.2, True).item()
    assert one_way != pytest.approx(monai, rel=1e-3)
    no_batch = 0.5 * (info_nce(z1, z2, z1, 0.2) + info_nce(z2, z1, z2, 0.2))  # queue ≠ in-batch
    assert no_batch.item() != pytest.approx(monai, rel=1e-3)


def test_targets_keys_and_queue_get_no_gradient_in_the_losses():
    g = torch.Generator().manual_seed(0)
    p1, z1, p2, z2, queue = (torch.randn(4, 8, generator=g).requires_grad_() for _ in range(5))
    (simsiam_loss(p1, z1, p2, z2) + byol_loss(p1, z1, p2, z2)).backward()
    assert z1.grad is None and z2.grad is None and p1.grad.abs().sum() > 0
    info_nce(p1, z1, queue, 0.2, in_batch_negatives=True).backward()
    assert z1.grad is None and queue.grad is None and p1.grad.abs().sum() > 0


# --- stop-gradient in the methods ----------------------------------------------------------------


def test_simsiam_projections_get_gradient_only_through_their_predictor():
    method = _method(SimSiam).train()
    batch = _batch(method)
    total, via_predictor = [], []

    def keep_total(module, args, z):
        z.register_hook(total.append)

    method.projector.register_forward_hook(keep_total)
    method.predictor.register_full_backward_hook(lambda m, gin, gout: via_predictor.append(gin[0]))
    terms = method(batch, 0)
    assert set(terms) == {"loss", "z_std"} and -1 <= terms["loss"].item() <= 1
    terms["loss"].backward()
    assert len(total) == len(via_predictor) == 2
    for grad in total:
        assert grad.abs().sum() > 0
        assert any(torch.allclose(g, grad) for g in via_predictor)


def test_byol_target_gets_no_gradient_and_follows_the_ema_formula():
    method = _method(BYOL).train()
    outputs = []
    method.target["projector"].register_forward_hook(lambda m, i, out: outputs.append(out))
    terms = method(_batch(method), 0)
    terms["loss"].backward()
    assert len(outputs) == 2 and not any(o.requires_grad for o in outputs)
    assert all(p.grad is None and not p.requires_grad for p in method.target.parameters())
    for part in (method.backbone.encoder, method.projector, method.predictor):
        assert all(p.grad is not None for p in part.parameters())

    with torch.no_grad():
        for p in [*method.backbone.parameters(), *method.projector.parameters()]:
            p.add_(torch.randn_like(p))
    online = {n: p.detach().double().clone() for n, p in method.backbone.named_parameters()}
    online |= {
        f"p.{n}": p.detach().double().clone() for n, p in method.projector.named_parameters()
    }
    target = {n: p.double().clone() for n, p in method.target["backbone"].named_parameters()}
    target |= {
        f"p.{n}": p.double().clone() for n, p in method.target["projector"].named_parameters()
    }
    buffers = {n: b.clone() for n, b in method.target.named_buffers()}
    method.on_step_end(3, 10)  # the third of ten steps: k = 2 completed before this update
    tau = 1 - (1 - 0.996) * (math.cos(math.pi * 2 / 10) + 1) / 2
    assert teacher_momentum(2, 10) == pytest.approx(tau)
    updated = dict(method.target["backbone"].named_parameters())
    updated |= {f"p.{n}": p for n, p in method.target["projector"].named_parameters()}
    for name, p in updated.items():
        expected = tau * target[name] + (1 - tau) * online[name]
        torch.testing.assert_close(p.double(), expected, rtol=1e-6, atol=1e-7)
    assert all(torch.equal(b, buffers[n]) for n, b in method.target.named_buffers())


def test_ema_helper():
    torch.manual_seed(0)
    online = torch.nn.Linear(3, 2)
    target = frozen_copy(online)
    assert all(not p.requires_grad for p in target.parameters())
    with torch.no_grad():
        online.weight.add_(1.0)
    before = target.weight.clone()
    ema_update_(target, online, 0.9)
    torch.testing.assert_close(target.weight, 0.9 * before + 0.1 * online.weight)
    assert teacher_momentum(0, 10) == pytest.approx(0.996)
    assert teacher_momentum(10, 10) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="momentum"):
        ema_update_(target, online, 1.5)


# --- MoCo v2 -------------------------------------------------------------------------------------


def test_moco_keys_momentum_update_and_queue():
    method = _method(MoCoV2, key_momentum=0.9).train()
    batch = _batch(method)
    queue_before = method.queue.clone()
    terms = method(batch, 0)
    assert set(terms) == {"loss", "pos_cos", "neg_cos"}
    keys = method._pending_keys
    assert keys.shape == (4, 8) and not keys.requires_grad
    torch.testing.assert_close(keys.norm(dim=1), torch.ones(4))
    terms["loss"].backward()
    assert all(p.grad is None for p in method.key_encoder.parameters())
    assert all(p.grad is not None for p in method.backbone.encoder.parameters())

    query = {n: p.detach().double().clone() for n, p in method.backbone.named_parameters()}
    key = {n: p.double().clone() for n, p in method.key_encoder["backbone"].named_parameters()}
    with torch.no_grad():
        for n, p in method.backbone.named_parameters():
            p.add_(1.0)
            query[n] += 1.0
    method.on_step_end(1, 4)
    for n, p in method.key_encoder["backbone"].named_parameters():
        torch.testing.assert_close(p.double(), 0.9 * key[n] + 0.1 * query[n])
    # the batch's keys took queue rows 0-3; rows 4, 5 still hold their initial entries
    assert torch.equal(method.queue[:4], keys) and torch.equal(method.queue[4:], queue_before[4:])
    assert int(method.queue_ptr) == 4 and method._pending_keys is None


def test_moco_queue_is_fifo_and_wraps_around():
    method = _method(MoCoV2, queue_size=5)
    keys = torch.arange(14, dtype=torch.float32)[:, None].expand(14, 8).clone()
    for start in (0, 2, 4):
        method.enqueue(keys[start : start + 2])
    assert method.queue[:, 0].tolist() == [5, 1, 2, 3, 4] and int(method.queue_ptr) == 1
    method.enqueue(keys[6:13])  # more keys than rows: only the last five stay, oldest at ptr
    assert int(method.queue_ptr) == 3
    assert method.queue[:, 0].tolist() == [10, 11, 12, 8, 9]


def test_moco_shuffled_bn_keys_come_back_in_order():
    method = _method(MoCoV2, shuffle_bn_groups=2).eval()  # eval: no batch dependence at all
    batch = _batch(method)
    method(batch, 0)
    shuffled = method._pending_keys.clone()
    method({**batch, "key_order": torch.arange(4)}, 0)
    torch.testing.assert_close(shuffled, method._pending_keys)
    assert sorted(batch["key_order"].tolist()) == [0, 1, 2, 3]


# --- Models Genesis ------------------------------------------------------------------------------


ALL_ON = {"local_rate": 1.0, "nonlinear_rate": 1.0, "paint_rate": 1.0}


def _volume(depth: int = 10, size: int = 40) -> CaseVolume:
    g = torch.Generator().manual_seed(3)
    image = F.avg_pool3d(torch.rand(1, 1, depth + 2, size + 2, size + 2, generator=g), 3, 1)[0]
    image = (image - image.min()) / (image.max() - image.min())
    return CaseVolume("v0", image, None, (2.0, 1.0, 1.0), np.eye(4), np.eye(4), "pretrain")


@pytest.mark.parametrize("dims", [2, 3])
def test_genesis_corrupts_inputs_only_and_targets_are_clean_crops(dims):
    volume = _volume()
    source = volume.image.clone()
    method = _method(ModelsGenesis, dims, **ALL_ON)
    batch = method.make_batch([volume, volume], torch.Generator().manual_seed(4))
    assert torch.equal(volume.image, source)  # nothing is corrupted in place
    crop = method.crop
    assert batch["targets"].shape == batch["inputs"].shape == (2, 1, *crop)
    # replaying the draws: each target is a flipped crop of the clean volume (a clean slice)
    g = torch.Generator().manual_seed(4)
    targets = [method._flip(method._random_crop(method._image(volume, g), g), g) for _ in range(2)]
    for b in range(2):
        assert torch.equal(batch["targets"][b], targets[b])
        assert torch.isin(targets[b], source).all()
        assert not torch.equal(batch["inputs"][b], batch["targets"][b])
    off = _method(ModelsGenesis, dims, local_rate=0.0, nonlinear_rate=0.0, paint_rate=0.0)
    plain = off.make_batch([volume], torch.Generator().manual_seed(4))
    assert torch.equal(plain["inputs"], plain["targets"])


def test_genesis_corruptions_one_by_one():
    clean = _volume().image[:, 4]
    only = {"local_rate": 0.0, "nonlinear_rate": 0.0, "paint_rate": 0.0}

    def corrupt(**rates):
        method = _method(ModelsGenesis, **{**only, **rates})
        return method.corrupt(clean, torch.Generator().manual_seed(0))

    shuffled = corrupt(local_rate=1.0)  # a permutation of the voxels
    assert torch.equal(shuffled.flatten().sort().values, clean.flatten().sort().values)
    assert not torch.equal(shuffled, clean)
    curve = corrupt(nonlinear_rate=1.0)  # one monotone map of the intensities
    order = clean.flatten().argsort()
    steps = curve.flatten()[order].diff()
    assert (steps >= -1e-6).all() or (steps <= 1e-6).all()
    outpainted = corrupt(paint_rate=1.0, inpaint_rate=0.0)  # clean inside the kept boxes only
    kept = outpainted == clean
    assert 0.05 < kept.float().mean() < 0.95
    inpainted = corrupt(paint_rate=1.0, inpaint_rate=1.0)  # clean outside the noise boxes
    assert 0.3 < (inpainted == clean).float().mean() < 1.0


def test_genesis_restores_through_the_full_unet():
    method = _method(ModelsGenesis, **ALL_ON)
    batch = method.make_batch([_volume()] * 2, torch.Generator().manual_seed(0))
    terms = method(batch, 0)
    assert set(terms) == {"loss", "input_mse"}
    terms["loss"].backward()
    for part in (method.backbone.encoder, method.backbone.decoder, method.restoration_head):
        assert all(p.grad is not None for p in part.parameters())
    restored = method.restore(batch["inputs"])
    assert restored.shape == batch["targets"].shape and ((restored >= 0) & (restored <= 1)).all()


# --- settings and transfer -----------------------------------------------------------------------


@pytest.mark.parametrize("profile", ["smoke", "cpu", "gpu"])
def test_moco_queue_and_key_momentum_fit_the_profiles_data_and_budget(profile):
    # the documented reasoning as a property: the queue holds at most a fifth of the pre-training
    # slices (no stale copies of one slice), and the key encoder's memory, about 1 / (1 - m)
    # steps, is at most a fifth of the run wherever the run is long enough to have one
    cfg = PretrainConfig(method="mocov2", profile=profile).resolved()
    phantom = get_profile(profile).phantom
    slices = (phantom.split["pretrain"] + phantom.split["train"]) * phantom.shape[0]
    assert cfg.method_cfg["queue_size"] <= slices / 5
    if cfg.steps >= 100:
        assert 1 / (1 - cfg.method_cfg["key_momentum"]) <= cfg.steps / 5


def test_registry_and_transferable_state():
    for name, cls in {**CONTRASTIVE, "models_genesis": ModelsGenesis}.items():
        assert get_method(name) is cls
    with pytest.raises(MedsslError, match="runs in"):
        PretrainConfig(method="simsiam", profile="smoke", dims=3).resolved()

    for cls in CONTRASTIVE.values():
        method = _method(cls)
        state = method.transferable_state()
        assert state and set(state) == set(method.backbone.encoder_state_dict())
        with pytest.raises(MedsslError, match="unknown setting"):
            _method(cls, momentun=0.5)
    genesis = _method(ModelsGenesis)
    keys = set(genesis.transferable_state())
    assert keys == {
        k for k in genesis.backbone.state_dict() if k.startswith(("encoder.", "decoder."))
    }


# --- runs ----------------------------------------------------------------------------------------


def _run_cfg(name: str, dims: int = 2, **kw) -> PretrainConfig:
    return PretrainConfig(
        method=name, profile="smoke", dims=dims, steps=4, checkpoint_every=2,
        backbone_kwargs={"channels": TINY[dims]}, **kw,
    )  # fmt: skip


@pytest.mark.parametrize(
    "name, dims",
    [("simsiam", 2), ("byol", 2), ("mocov2", 2), ("models_genesis", 2), ("models_genesis", 3)],
)
def test_run_pretraining_then_finetune_loads_every_transferred_key(
    name, dims, tiny_phantom, tmp_path
):
    kw = {"patch_size": (8, 16, 16)} if dims == 3 else {}
    result = run_pretraining(
        _run_cfg(name, dims, **kw), tiny_phantom, tmp_path / "run", progress=False
    )
    log = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) for r in log) and result.summary["dims"] == dims
    header = read_transferable(tmp_path / "run")
    state = header["state_dict"]
    assert header["method"] == name and state
    restores = name == "models_genesis"
    assert any(k.startswith("decoder.") for k in state) is restores
    assert all(k.startswith(("encoder.", "decoder.")) for k in state)

    method = load_method(tmp_path / "run")
    saved = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["method"]
    assert all(torch.equal(v, saved[k]) for k, v in method.state_dict().items())

    ft = FinetuneConfig(
        profile="smoke", dims=dims, steps=2, val_every=2, batch_size=2,
        backbone_kwargs={"channels": TINY[dims]},
    )  # fmt: skip
    if dims == 3:
        ft.patch_size = (8, 16, 16)
    report = finetune(
        tmp_path / "run", tiny_phantom, ft, tmp_path / "ft", progress=False
    ).key_report
    assert set(report.matched) == set(state)
    assert not report.unexpected and not report.mismatched
    if restores:
        assert set(report.missing) == {"head.weight", "head.bias"}
    else:
        assert all(k.startswith(("decoder.", "head.")) for k in report.missing)


def test_moco_resume_continues_the_queue_exactly(tiny_phantom, tmp_path, monkeypatch):
    run_pretraining(_run_cfg("mocov2"), tiny_phantom, tmp_path / "a", progress=False)
    original = MoCoV2.on_step_end

    def crash(self, step, max_steps):
        if step == 3:
            raise KeyboardInterrupt
        original(self, step, max_steps)

    monkeypatch.setattr(MoCoV2, "on_step_end", crash)
    with pytest.raises(KeyboardInterrupt):
        run_pretraining(_run_cfg("mocov2"), tiny_phantom, tmp_path / "b", progress=False)
    monkeypatch.setattr(MoCoV2, "on_step_end", original)
    run_pretraining(_run_cfg("mocov2"), tiny_phantom, tmp_path / "b", resume=True, progress=False)
    a, b = (load_checkpoint(tmp_path / n / "checkpoint.pt")["method"] for n in "ab")
    assert int(a["queue_ptr"]) == (4 * 2) % 16
    assert all(torch.equal(a[k], b[k]) for k in a)
