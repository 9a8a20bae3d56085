"""SSMTL and SSMTL+: targets are the slices j ∓ t of the same case, k stays outside [j − t, j + t],
the losses of eqs. 1–3 by hand, the stop-gradient, what transfers, and runs into fine-tuning."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medssl_kit.data.datasets import SliceDataset, SliceSequenceDataset, load_volumes
from medssl_kit.data.io import CaseVolume
from medssl_kit.data.manifest import load_manifest
from medssl_kit.errors import MedsslError
from medssl_kit.losses.ssmtl import pretext_loss, similarity_loss, total_loss
from medssl_kit.methods.registry import get_method
from medssl_kit.methods.ssmtl import SSMTL, SSMTLPlus, instance_normalize
from medssl_kit.models.registry import build_backbone
from medssl_kit.train.checkpoint import load_checkpoint
from medssl_kit.train.finetune import FinetuneConfig, finetune
from medssl_kit.train.optim import build_optimizer, build_scheduler
from medssl_kit.train.pretrain import PretrainConfig, build_dataset, load_method, run_pretraining
from medssl_kit.train.transfer import read_transferable

TINY = (4, 8, 8, 8, 8)


def _method(plus: bool = False, **cfg) -> SSMTL:
    torch.manual_seed(0)
    backbone = build_backbone("unet", 2, 1, 3, channels=TINY)
    return (SSMTLPlus if plus else SSMTL)(backbone, cfg)


def _code(case: int, z: int) -> float:
    """The value every pixel of slice ``z`` of case ``case`` holds (exact in float32)."""
    return (case * 64 + z) / 1024


def _coded_volumes(depths=(20, 13)) -> list[CaseVolume]:
    """Volumes whose slices encode (case, slice index) in their values."""
    volumes = []
    for case, depth in enumerate(depths):
        codes = torch.tensor([_code(case, z) for z in range(depth)])
        image = codes.view(1, depth, 1, 1).expand(1, depth, 16, 16).clone()
        volumes.append(
            CaseVolume(
                f"case{case}", image, None, (2.0, 1.0, 1.0), np.eye(4), np.eye(4), "pretrain"
            )
        )
    return volumes


def _decode(slices: torch.Tensor) -> list[tuple[int, int]]:
    """(case, slice) of each ``[C, H, W]`` slice of a batch, checking every pixel agrees."""
    out = []
    for s in slices:
        assert torch.all(s == s.flatten()[0])
        value = round(float(s.flatten()[0]) * 1024)
        out.append(divmod(value, 64))
    return out


# --- the data the method builds ---------------------------------------------------------------


@pytest.mark.parametrize("t", [1, 3, 5])
def test_targets_are_slices_j_minus_and_plus_t_of_the_same_case(t):
    dataset = SliceSequenceDataset(_coded_volumes(), t=t, plus=True, ends="skip", seed=0)
    method = _method(plus=True, normalize="none", t=t)
    seen_offsets = set()
    for epoch in range(6):
        dataset.set_epoch(epoch)
        items = [dataset[i] for i in range(len(dataset))]
        batch = method.make_batch(items, torch.Generator().manual_seed(epoch))
        anchors = _decode(batch["image"])
        for key, offset in (("prev", -t), ("next", t)):
            assert _decode(batch[key]) == [(c, j + offset) for c, j in anchors]
        for (case, j), (case_k, k), k_item, j_item in zip(
            anchors, _decode(batch["other"]), batch["k"].tolist(), batch["slice"].tolist(),
            strict=True,
        ):  # fmt: skip
            assert case_k == case and k == k_item and j == j_item
            assert t + 1 <= abs(k - j) <= 2 * t  # never inside [j - t, j + t]
            seen_offsets.add(k - j)
    allowed = {o for o in range(-2 * t, 2 * t + 1) if abs(o) > t}
    assert seen_offsets == allowed  # every allowed offset occurs (both sides)


def test_build_dataset_gets_t_and_plus_from_the_method_settings(tiny_phantom):
    manifest = load_manifest(tiny_phantom)
    for name, plus in (("ssmtl", False), ("ssmtl_plus", True)):
        cfg = PretrainConfig(method=name, profile="smoke", method_cfg={"t": 2}).resolved()
        assert cfg.method_cfg["plus"] is plus and cfg.method_cfg["t"] == 2
        dataset = build_dataset(get_method(name), manifest, cfg)
        assert isinstance(dataset, SliceSequenceDataset)
        assert (dataset.t, dataset.plus, dataset.ends) == (2, plus, "skip")
        assert ("other" in dataset[0]) is plus


def test_instance_normalisation_resizing_and_padding():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 12, 10, generator=g) * 0.3 + 0.2
    z = instance_normalize(x)
    assert z.mean().abs() < 1e-6 and z.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)
    assert torch.equal(instance_normalize(torch.zeros(1, 4, 4)), torch.zeros(1, 4, 4))

    def item(h, w):
        return {k: torch.rand(1, h, w, generator=g) for k in ("image", "prev", "next")} | {
            "slice": 3
        }

    method = _method(normalize="instance")
    batch = method.make_batch([item(20, 16), item(16, 24)], g)
    assert batch["image"].shape == (2, 1, 20, 24)
    # each slice was normalised on its own, then zero-padded symmetrically
    first = batch["prev"][0, :, :, 4:20]
    assert first.mean().abs() < 1e-5 and first.std(unbiased=False) == pytest.approx(1, abs=1e-4)
    assert torch.all(batch["prev"][0, :, :, :4] == 0) and torch.all(
        batch["prev"][0, :, :, 20:] == 0
    )
    raw = _method(normalize="none", image_size=(32, 32))
    items = [item(20, 16)]
    resized = raw.make_batch(items, g)["next"][0]
    expected = F.interpolate(items[0]["next"][None], (32, 32), mode="bilinear", antialias=True)
    assert torch.allclose(resized, expected[0])
    resunet = build_backbone("resunet", 2, 1, 2, backbone="resnet10")
    assert SSMTL(resunet, {}).make_batch([item(40, 33)], g)["image"].shape == (1, 1, 64, 64)


def test_pre_training_feeds_the_slices_fine_tuning_feeds(tiny_phantom, tmp_path):
    # The default feeds the network the manifest's windowed slices, exactly the fine-tuning
    # input of the same slice; the paper's per-slice z-score is an option that fine-tuning refuses.
    manifest = load_manifest(tiny_phantom)
    volumes = load_volumes(manifest, ["pretrain"])
    sequences = SliceSequenceDataset(volumes, t=2, plus=False, ends="skip", seed=0)
    finetuning = {
        (item["case_id"], item["slice"]): item["image"]
        for item in (lambda d: [d[i] for i in range(len(d))])(SliceDataset(volumes, context=0))
    }
    method = _method(t=2)
    assert method.input_normalization == "window"
    items = [sequences[i] for i in range(0, len(sequences), 3)]
    batch = method.make_batch(items, torch.Generator().manual_seed(0))
    for row, item in zip(batch["image"], items, strict=True):
        assert torch.equal(row, finetuning[(item["case_id"], int(item["slice"]))])
    paper = _method(t=2, normalize="instance")
    assert paper.input_normalization == "instance"
    z_scored = paper.make_batch(items, torch.Generator().manual_seed(0))["image"]
    assert not torch.allclose(z_scored, batch["image"], atol=0.1)

    cfg = PretrainConfig(
        method="ssmtl", profile="smoke", steps=1, backbone_kwargs={"channels": TINY},
        method_cfg={"t": 2, "normalize": "instance"},
    )  # fmt: skip
    run_pretraining(cfg, tiny_phantom, tmp_path / "z", progress=False)
    assert read_transferable(tmp_path / "z")["input_normalization"] == "instance"
    ft = FinetuneConfig(profile="smoke", steps=1, backbone_kwargs={"channels": TINY})
    with pytest.raises(MedsslError, match="'instance'-normalised inputs"):
        finetune(tmp_path / "z", tiny_phantom, ft, tmp_path / "ft", progress=False)


# --- losses ------------------------------------------------------------------------------------


def test_pretext_loss_by_hand():
    pred_prev = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    pred_next = torch.ones(1, 1, 2, 2)
    total, minus, plus = pretext_loss(pred_prev, torch.zeros(1, 1, 2, 2), pred_next, 2 * pred_next)
    assert minus.item() == pytest.approx((1 + 4 + 9 + 16) / 4)
    assert plus.item() == pytest.approx(1.0)
    assert total.item() == pytest.approx(8.5)
    with pytest.raises(ValueError, match="differ"):
        pretext_loss(pred_prev, torch.zeros(1, 1, 3, 2), pred_next, pred_next)


def test_similarity_and_total_loss_by_hand_and_stop_gradient():
    p = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)
    z = torch.tensor([[1.0, 1.0], [0.0, -5.0]], requires_grad=True)
    sim = similarity_loss(p, z)
    assert sim.item() == pytest.approx((-1 / math.sqrt(2) + 1.0) / 2)
    sim.backward()
    assert z.grad is None and p.grad.abs().sum() > 0  # sg on q(x^k)
    pretext = torch.tensor(0.25)
    assert total_loss(pretext, sim.detach(), 1.0).item() == pytest.approx(0.25 + sim.item())
    assert total_loss(pretext, sim.detach(), 0.5).item() == pytest.approx(0.25 + sim.item() / 2)
    assert total_loss(pretext, None).item() == 0.25


# --- the method --------------------------------------------------------------------------------


def _batch(method: SSMTL, n: int = 3):
    dataset = SliceSequenceDataset(_coded_volumes((24, 24)), t=2, plus=method.plus, seed=0)
    g = torch.Generator().manual_seed(1)
    items = [dataset[i] for i in torch.randint(len(dataset), (n,), generator=g).tolist()]
    for item in items:  # some texture, so that the slices differ within a slice too
        for key in ("image", "prev", "next", "other"):
            if key in item:
                item[key] = item[key] + 0.1 * torch.rand(item[key].shape, generator=g)
    return method.make_batch(items, g)


def test_ssmtl_plus_terms_and_stop_gradient_on_the_k_branch():
    method = _method(plus=True, t=2).train()
    batch = _batch(method)
    bottlenecks = []
    method.backbone.encoder[-1].register_forward_hook(lambda m, i, out: bottlenecks.append(out))
    terms = method(batch, 0)
    passes = list(bottlenecks)
    assert set(terms) == {"loss", "pretext", "prev", "next", "sim"}
    # two encoder passes: x^j with a graph, x^k without (eq. 2's stop-gradient)
    assert len(passes) == 2
    assert passes[0].requires_grad and not passes[1].requires_grad
    # recomputed from the network's parts: g- predicts x^{j-t}, g+ x^{j+t}; sim = -cos(h(q(x^j)),
    # q(x^k)) with q the pooled bottleneck (the train-mode passes are deterministic: no dropout)
    with torch.no_grad():
        top = method.backbone.decode(method.backbone.encode(batch["image"]))[0][-1]
        prev, nxt = method.head_prev(top), method.head_next(top)
        q_j, q_k = (b.detach().mean((2, 3)) for b in passes)
        sim = -F.cosine_similarity(method.predictor(q_j), q_k).mean()
    assert terms["prev"].item() == pytest.approx(F.mse_loss(prev, batch["prev"]).item())
    assert terms["next"].item() == pytest.approx(F.mse_loss(nxt, batch["next"]).item())
    assert terms["prev"].item() != pytest.approx(F.mse_loss(prev, batch["next"]).item())
    assert terms["sim"].item() == pytest.approx(sim.item(), abs=1e-6)
    expected = F.mse_loss(prev, batch["prev"]) + F.mse_loss(nxt, batch["next"]) + sim
    assert terms["loss"].item() == pytest.approx(expected.item(), abs=1e-6)
    terms["loss"].backward()
    for part in (method.backbone.encoder, method.backbone.decoder, method.predictor):
        assert all(p.grad is not None for p in part.parameters())
    for head in (method.head_prev, method.head_next):
        assert head.weight.grad.abs().sum() > 0
    assert method.backbone.head.weight.grad is None  # the segmentation head is not trained

    # the sim term trains the encoder (through h(q(x^j))) and h, never the decoder
    method.zero_grad()
    method(batch, 0)["sim"].backward()
    assert all(p.grad is None for p in method.backbone.decoder.parameters())
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0 for p in method.backbone.encoder.parameters()
    )
    lam = _method(plus=True, t=2, lambda_sim=0.25)
    lam.load_state_dict(method.state_dict())
    terms = lam(batch, 0)
    assert terms["loss"].item() == pytest.approx((terms["pretext"] + 0.25 * terms["sim"]).item())


def test_ssmtl_has_no_similarity_term_and_predicts_at_full_resolution():
    method = _method(t=2)
    batch = _batch(method)
    terms = method(batch, 0)
    assert set(terms) == {"loss", "pretext", "prev", "next"}
    assert terms["loss"] == terms["pretext"] and not hasattr(method, "predictor")
    prev, nxt = method.predict_neighbours(batch["image"])
    assert prev.shape == nxt.shape == batch["prev"].shape and method.training


def test_transferable_state_is_encoder_and_decoder_only():
    for plus in (False, True):
        method = _method(plus=plus)
        state = method.transferable_state()
        backbone_keys = set(method.backbone.state_dict())
        assert set(state) == {k for k in backbone_keys if k.startswith(("encoder.", "decoder."))}
        assert any(k.startswith("decoder.") for k in state)
        assert not any(k.startswith("head.") for k in state)


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_the_papers_optimiser_keeps_a_fixed_rate_without_decay(profile):
    # "Adam with a fixed learning rate 1e-3" (no weight decay named): built from the resolved
    # settings, the rate is still 1e-3 after the run's last step and no weight is decayed
    cfg = PretrainConfig(method="ssmtl_plus", profile=profile).resolved()
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = build_optimizer(cfg.optimizer, [weight], cfg.lr, cfg.weight_decay)
    scheduler = build_scheduler(optimizer, cfg.schedule, cfg.steps, cfg.warmup_steps)
    assert isinstance(optimizer, torch.optim.Adam)
    for _ in range(cfg.steps):
        optimizer.zero_grad()
        (0.0 * weight.sum()).backward()  # a zero gradient: only weight decay could move it
        optimizer.step()
        scheduler.step()
    assert scheduler.get_last_lr() == [pytest.approx(1e-3)]
    assert torch.equal(weight.detach(), torch.ones(3))


def test_bad_settings():
    assert get_method("ssmtl") is SSMTL and get_method("ssmtl_plus") is SSMTLPlus
    net = build_backbone("unet", 2, 1, 2, channels=TINY)
    with pytest.raises(MedsslError, match="use the method 'ssmtl_plus'"):
        SSMTL(net, {"plus": True})
    with pytest.raises(MedsslError, match="use the method 'ssmtl'"):
        SSMTLPlus(net, {"plus": False})
    with pytest.raises(MedsslError, match="unknown setting"):
        SSMTL(net, {"tt": 3})
    with pytest.raises(MedsslError, match="normalize"):
        SSMTL(net, {"normalize": "batch"})
    with pytest.raises(MedsslError, match="needs slice-sequence items"):
        SSMTLPlus(net, {}).make_batch([{"image": torch.rand(1, 16, 16)}], torch.Generator())


def test_resunet_encoder_option():
    torch.manual_seed(0)
    backbone = build_backbone("resunet", 2, 1, 2, backbone="resnet10")
    method = SSMTLPlus(backbone, {"t": 2})
    terms = method(_batch(method, n=2), 0)
    terms["loss"].backward()
    assert method.predictor.net[0].in_features == 512  # q = pooled ResNet bottleneck
    assert all(k.startswith(("encoder.", "decoder.")) for k in method.transferable_state())


# --- runs --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ssmtl", "ssmtl_plus"])
def test_run_pretraining_then_finetune_loads_encoder_and_decoder(name, tiny_phantom, tmp_path):
    cfg = PretrainConfig(
        method=name, profile="smoke", steps=4, checkpoint_every=2,
        backbone_kwargs={"channels": TINY},
    )  # fmt: skip
    result = run_pretraining(cfg, tiny_phantom, tmp_path / "run", progress=False)
    log = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    terms = {"loss", "pretext", "prev", "next"} | ({"sim"} if name == "ssmtl_plus" else set())
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(terms <= set(r) and all(math.isfinite(r[k]) for k in terms) for r in log)
    assert result.summary["method"] == name
    header = read_transferable(tmp_path / "run")
    state = header["state_dict"]
    assert header["method"] == name
    assert any(k.startswith("decoder.") for k in state)
    assert all(k.startswith(("encoder.", "decoder.")) for k in state)

    method = load_method(tmp_path / "run")
    saved = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["method"]
    assert type(method) is get_method(name)
    assert all(torch.equal(v, saved[k]) for k, v in method.state_dict().items())
    assert all(torch.equal(state[k], saved[f"backbone.{k}"]) for k in state)

    ft_cfg = FinetuneConfig(
        profile="smoke", steps=2, val_every=2, batch_size=2, backbone_kwargs={"channels": TINY}
    )
    report = finetune(tmp_path / "run", tiny_phantom, ft_cfg, tmp_path / "ft", progress=False)
    report = report.key_report
    assert set(report.matched) == set(state)
    assert set(report.missing) == {"head.weight", "head.bias"}
    assert not report.unexpected and not report.mismatched
    if name == "ssmtl":
        ft_cfg.transfer = "encoder"
        enc = finetune(tmp_path / "run", tiny_phantom, ft_cfg, tmp_path / "enc", progress=False)
        matched = set(enc.key_report.matched)
        assert matched == {k for k in state if k.startswith("encoder.")}
        assert all(k.startswith(("decoder.", "head.")) for k in enc.key_report.missing)
