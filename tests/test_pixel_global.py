"""pixel_global: the paper's losses, the context stabilizer, MC-dropout uncertainty, the EMA
teacher, the ablation switches and a run through the generic loop into fine-tuning."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from medssl_kit.data.views import build_view_pair, make_spatial_params, replay
from medssl_kit.errors import MedsslError
from medssl_kit.losses import pixel_global as L
from medssl_kit.methods.pixel_global import ABLATIONS, PixelGlobal, teacher_momentum
from medssl_kit.methods.registry import get_method
from medssl_kit.models.base import RecordedBatchStatistics
from medssl_kit.models.registry import build_backbone
from medssl_kit.train.checkpoint import load_checkpoint
from medssl_kit.train.finetune import FinetuneConfig, finetune
from medssl_kit.train.optim import build_optimizer, build_scheduler
from medssl_kit.train.pretrain import PretrainConfig, load_method, run_pretraining
from medssl_kit.train.transfer import read_transferable

TINY = {"channels": (4, 8, 8, 8, 8), "dropout": 0.2}
SMALL_HEADS = {"global_hidden": 16, "global_dim": 8, "pixel_hidden": 8, "pixel_dim": 6}


def make_method(dropout: float = 0.2, dropout_levels: int | None = None, **cfg) -> PixelGlobal:
    torch.manual_seed(0)
    kw = {**TINY, "dropout": dropout, "dropout_levels": dropout_levels}
    net = build_backbone("unet", 2, 1, 2, **kw)
    return PixelGlobal(net, {"crop_size": (32, 32), **SMALL_HEADS, **cfg})


def images(n: int = 3, size: int = 40, seed: int = 0) -> list[torch.Tensor]:
    """Smooth random slices in [0, 1] (blurred noise), ``[1, size, size]`` each."""
    g = torch.Generator().manual_seed(seed)
    x = F.avg_pool2d(torch.rand(n, 1, size + 6, size + 6, generator=g), 7, stride=1)
    return list((x - x.min()) / (x.max() - x.min()))


def crop_pair(image: torch.Tensor, start1=(4, 4), start2=(4, 4)):
    """Two 32² crops of a 40² image without scaling (identity intensity)."""
    sp1 = make_spatial_params((40, 40), (32, 32), start1, (32, 32))
    sp2 = make_spatial_params((40, 40), (32, 32), start2, (32, 32))
    return build_view_pair(image, sp1, sp2)


# --- pure losses ------------------------------------------------------------------------------


def test_global_loss_matches_a_hand_computation():
    s = torch.tensor([[[1.0, 0.0, -1.0]], [[0.5, 0.5, 0.0]]])  # [2 views, B=1, K=3]
    t = torch.tensor([[[0.2, 0.1, 0.0]], [[0.0, 0.3, 0.1]]])
    c = torch.tensor([0.1, 0.0, -0.1])
    tau_s, tau_t = 0.1, 0.04

    def softmax(v, tau, center=(0.0, 0.0, 0.0)):
        e = [math.exp((a - m) / tau) for a, m in zip(v, center, strict=True)]
        return [x / sum(e) for x in e]

    def ce(view_t, view_s):
        pt = softmax(t[view_t, 0].tolist(), tau_t, c.tolist())
        ps = softmax(s[view_s, 0].tolist(), tau_s)
        return -sum(a * math.log(b) for a, b in zip(pt, ps, strict=True))

    expected = (ce(1, 0) + ce(0, 1)) / 2  # student view 1 <- teacher view 2, and back
    got = L.global_consistency_loss(s, t, c, tau_s, tau_t)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_local_loss_equations_and_masking():
    g = torch.Generator().manual_seed(0)
    d, d_stab = torch.rand(2, 4, 4, generator=g), torch.rand(2, 4, 4, generator=g)
    u = torch.rand(2, 4, 4, generator=g)
    valid = torch.rand(2, 4, 4, generator=g) > 0.3
    n = valid.sum()
    assert torch.isclose(L.local_consistency_loss(d, valid), d[valid].sum() / n)  # eq. 4
    eq5 = (d - d_stab).abs()[valid].sum() / n
    assert torch.isclose(L.local_consistency_loss(d, valid, d_stab), eq5)
    eq6 = ((1 - u) * (d - d_stab).abs())[valid].sum() / n
    assert torch.isclose(L.local_consistency_loss(d, valid, d_stab, u), eq6)
    # invalid pixels are never read, whatever they hold
    junk = torch.where(valid, d, torch.full_like(d, float("inf")))
    assert L.local_consistency_loss(junk, valid, d_stab, u) == L.local_consistency_loss(
        d, valid, d_stab, u
    )
    assert L.local_consistency_loss(d, torch.zeros_like(valid)) == 0


def test_excess_stabilizer_penalises_only_the_excess_and_treats_the_gap_as_a_baseline():
    g = torch.Generator().manual_seed(3)
    d = torch.rand(2, 4, 4, generator=g).requires_grad_()
    d_stab = torch.rand(2, 4, 4, generator=g).requires_grad_()
    u = torch.rand(2, 4, 4, generator=g)
    valid = torch.rand(2, 4, 4, generator=g) > 0.3
    n = valid.sum()
    loss = L.local_consistency_loss(d, valid, d_stab, u, form="excess")
    expected = ((1 - u) * (d - d_stab).clamp_min(0))[valid].sum() / n
    assert torch.isclose(loss, expected)
    loss.backward()
    assert d_stab.grad is None  # the gap is a stop-gradient baseline
    above = valid & (d > d_stab)
    assert (d.grad[above] > 0).all()  # pulled down where it exceeds the gap
    assert (d.grad[~above] == 0).all()  # never pushed up towards the gap
    # the literal eq. 5 pushes d up where it is below the gap, and moves d̃ as well
    d.grad = None
    L.local_consistency_loss(d, valid, d_stab, u, form="absolute").backward()
    assert (d.grad[valid & (d < d_stab)] < 0).all() and d_stab.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="form"):
        L.local_consistency_loss(d, valid, d_stab, form="relative")


def test_pixel_discrepancy_is_zero_only_for_agreement():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 3, 3, generator=g)
    p = torch.softmax(logits, 1)
    kl_same = L.pixel_discrepancy(p, torch.log_softmax(logits, 1), "kl")
    assert kl_same.abs().max() < 1e-6
    other = torch.log_softmax(torch.randn(2, 5, 3, 3, generator=g), 1)
    assert (L.pixel_discrepancy(p, other, "kl") > 0).all()
    # the paper's cross-entropy = KL + the teacher's entropy
    ce = L.pixel_discrepancy(p, other, "cross_entropy")
    entropy = -(p * p.log()).sum(1)
    assert torch.allclose(ce, L.pixel_discrepancy(p, other, "kl") + entropy, atol=1e-5)


def test_uncertainty_is_in_unit_interval_and_higher_where_passes_disagree():
    k = 4
    agree = F.one_hot(torch.full((20,), 2), k).float()  # 20 passes, all say class 2
    disagree = F.one_hot(torch.arange(20) % k, k).float()  # passes spread over the classes
    mostly = F.one_hot(torch.tensor([1] * 17 + [0, 2, 3]), k).float()
    samples = torch.stack([agree, disagree, mostly], dim=-1)  # [T, K, 3 pixels]
    u = L.predictive_entropy(samples.mean(0)[None])[0]
    weights = 1 - u
    assert ((u >= 0) & (u <= 1)).all()
    assert u[0] == 0 and u[1] == pytest.approx(1.0) and 0 < u[2] < u[1]
    assert weights[1] < weights[2] < weights[0]


def test_mutual_information_is_zero_where_passes_agree_and_orders_their_disagreement():
    k = 4

    def passes(classes):  # one-hot passes, [T, K]
        return F.one_hot(torch.tensor(classes), k).float()

    agree = passes([2] * 20)
    flat = torch.full((20, k), 1 / k)  # every pass says "uniform": agreed, yet maximal entropy
    mostly = passes([1] * 17 + [0, 2, 3])
    half = passes([1] * 10 + [3] * 10)
    spread = passes([c % k for c in range(20)])
    samples = torch.stack([agree, flat, mostly, half, spread], dim=-1)  # [T, K, 5 pixels]
    mean = samples.mean(0)[None]
    mean_entropy = -torch.special.xlogy(samples, samples).sum(1).mean(0)[None]
    mi = L.mutual_information(mean, mean_entropy)[0]
    assert mi[0] == 0 and mi[1] == pytest.approx(0.0, abs=1e-7)
    assert 0 < mi[2] < mi[3] < mi[4] == pytest.approx(1.0)
    # the paper's predictive entropy counts the agreed flat output as certain-less, MI does not
    assert L.predictive_entropy(mean)[0, 1] == pytest.approx(1.0)


# --- the method -------------------------------------------------------------------------------


def test_local_loss_zero_for_identical_views_and_networks_positive_otherwise():
    # identical student and teacher (the teacher starts as a copy), same temperatures, zero
    # centre, no stabilizer, no uncertainty, no dropout (so train mode is deterministic)
    method = make_method(
        dropout=0.0,
        stabilizer=False,
        uncertainty=False,
        pixel_teacher_temp=0.1,
        pixel_student_temp=0.1,
    ).train()
    imgs = images(2)
    same = method.collate([crop_pair(x) for x in imgs], None, mc_seed=0)
    assert bool(same["valid"].all())
    assert method(same, 0)["local"].item() == pytest.approx(0.0, abs=1e-5)

    with torch.no_grad():
        for p in method.pixel_head.parameters():
            p.add_(0.1 * torch.randn_like(p))
    assert method(same, 0)["local"].item() > 1e-3  # different networks


def test_invalid_pixels_do_not_contribute():
    method = make_method(view={"scale": (0.2, 0.4), "max_rotation_deg": 30.0}).eval()
    batch = method.make_batch([{"image": x} for x in images(3)], torch.Generator().manual_seed(4))
    valid = batch["valid"]
    assert valid.any() and not valid.all()
    before = method(batch, 0)

    def perturb(where):
        def hook(module, inputs, output):
            noise = 50 * torch.randn_like(output)
            return output + noise * where.repeat(2, 1, 1)[:, None]  # x rows, then x-tilde rows

        return method.pixel_head.register_forward_hook(hook)

    handle = perturb(~valid)
    after = method(batch, 0)
    handle.remove()
    for key in ("loss", "local", "pixel", "stabilizer"):
        assert torch.equal(before[key], after[key]), key
    handle = perturb(valid)
    changed = method(batch, 0)
    handle.remove()
    assert not torch.isclose(before["local"], changed["local"])


def test_stabilizer_form_default_is_the_excess_over_a_stop_gradient_gap():
    assert make_method().cfg["stabilizer_form"] == "excess"
    with pytest.raises(MedsslError, match="stabilizer_form"):
        make_method(stabilizer_form="relative")
    batch = make_method().make_batch(
        [{"image": x} for x in images(3)], torch.Generator().manual_seed(5)
    )
    grads = {}
    for form in ("excess", "absolute"):
        torch.manual_seed(0)
        method = make_method(stabilizer_form=form, uncertainty=False).eval()
        x_tilde = {}

        def keep_grad(module, inputs, out, x_tilde=x_tilde):
            out.register_hook(lambda g: x_tilde.setdefault("g", g))

        handle = method.pixel_head.register_forward_hook(keep_grad)
        method(batch, 0)["local"].backward()
        handle.remove()
        grads[form] = x_tilde["g"][batch["views"].shape[0] :]  # rows of the x-tilde views
    assert grads["excess"].abs().sum() == 0  # the gap is a baseline, not fitted
    assert grads["absolute"].abs().sum() > 0  # the literal eq. 5 moves the x-tilde output too


def test_stabilizer_replays_the_main_pairs_parameters():
    method = make_method()
    imgs = images(3)
    pairs, stabs = method.sample_views(imgs, torch.Generator().manual_seed(7))
    assert stabs is not None and len(stabs) == 3
    for b, (pair, stab) in enumerate(zip(pairs, stabs, strict=True)):
        assert stab.spatial1 == pair.spatial1 and stab.spatial2 == pair.spatial2
        assert stab.intensity1 == pair.intensity1 and stab.intensity2 == pair.intensity2
        other = imgs[(b + 1) % 3]  # x-tilde: the next image of the batch
        expected = replay(pair, other)
        assert torch.equal(stab.view1, expected.view1) and torch.equal(stab.view2, expected.view2)
        assert not torch.equal(stab.view1, pair.view1)
    assert pairs[0].spatial1 != pairs[0].spatial2  # the two views do differ
    # make_batch draws the same views from a generator in the same state
    batch = method.make_batch([{"image": x} for x in imgs], torch.Generator().manual_seed(7))
    assert torch.equal(batch["views"][:3], torch.stack([p.view1 for p in pairs]))
    assert torch.equal(batch["stab_views"][3:], torch.stack([s.view2 for s in stabs]))
    # a slice of another size is resampled to the main slice's size first
    _, odd = method.sample_views([imgs[0], images(1, size=48)[0]], torch.Generator())
    assert odd is not None and odd[0].view1.shape == (1, 32, 32)
    with pytest.raises(MedsslError, match="batch_size >= 2"):
        method.sample_views(imgs[:1], torch.Generator())


def test_teacher_gets_no_gradient_and_follows_the_ema_formula():
    method = make_method().train()
    batch = method.make_batch([{"image": x} for x in images(2)], torch.Generator().manual_seed(0))
    terms = method(batch, 0)
    terms["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in method.teacher.parameters())
    for part in (method.backbone.encoder, method.backbone.decoder, method.pixel_head):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())

    with torch.no_grad():
        for p in method.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    student = {k: v.clone().double() for k, v in method.backbone.named_parameters()}
    teacher = {k: v.clone().double() for k, v in method.teacher["backbone"].named_parameters()}
    t_global = method.teacher["global_head"](
        method.teacher["backbone"].encode(batch["views"])[-1].flatten(2).mean(2)
    )
    center = method.center_global.clone()
    method.on_step_end(3, 10)  # the third step of ten: k = 2 steps were completed before it
    lam = 1 - (1 - 0.996) * (math.cos(math.pi * 2 / 10) + 1) / 2
    for k, p in method.teacher["backbone"].named_parameters():
        expected = lam * teacher[k] + (1 - lam) * student[k]  # theta_t <- lam theta_t + ...
        torch.testing.assert_close(p.double(), expected, rtol=1e-6, atol=1e-7)
    assert teacher_momentum(0, 10) == pytest.approx(0.996)
    assert teacher_momentum(10, 10) == pytest.approx(1.0)
    assert teacher_momentum(5, 10) == pytest.approx(0.998)
    # the centre moved towards the batch mean of the teacher's logits (DINO, momentum 0.9)
    assert not torch.equal(method.center_global, center)
    assert t_global.shape[1] == method.center_global.shape[0]


def _teacher_outputs(method: PixelGlobal, batch: dict) -> tuple[torch.Tensor, ...]:
    """The teacher's global logits and pixel logits of a batch's views, as ``forward`` computes
    them (train mode: the batch's statistics; the views and their x-tilde replays together)."""
    views = batch["views"]
    x = torch.cat([views, batch["stab_views"]]) if "stab_views" in batch else views
    teacher, n2 = method.teacher, views.shape[0]
    with torch.no_grad():
        enc = teacher["backbone"].encode(x)
        t_global = teacher["global_head"](enc[-1][:n2].flatten(2).mean(2))
        t_pix = teacher["pixel_head"](teacher["backbone"].decode(enc)[0][-1])[:n2]
    return t_global, t_pix


@pytest.mark.parametrize("measure", ["entropy", "mutual_information"])
def test_uncertainty_passes_normalise_as_the_target_pass_so_without_dropout_they_are_the_targets(
    measure,
):
    # Dropout off: the 20 passes must reproduce the teacher's targets exactly, which holds only
    # when their batch norm uses the target pass's batch statistics (not the running ones).
    method = make_method(uncertainty_measure=measure).train()
    for layer in method.teacher["backbone"].dropout_layers:
        layer.p = 0.0
    batch = method.make_batch([{"image": x} for x in images(3)], torch.Generator().manual_seed(2))
    running = [b.clone() for b in method.teacher.buffers()]
    terms = method(batch, 0)
    _, t_pix = _teacher_outputs(method, batch)
    targets = L.teacher_probs(t_pix, method.center_pixel, method.cfg["pixel_teacher_temp"])
    own = L.predictive_entropy(targets)
    n2 = t_pix.shape[0]
    partner = torch.arange(n2).roll(n2 // 2)
    warped = F.grid_sample(
        own[partner][:, None], batch["grid"], mode="bilinear", align_corners=True
    )[:, 0]
    expected = L.masked_mean(warped, batch["valid"])
    assert expected > 0.05  # the targets are not one-hot: U = 0 would not be trivial
    if measure == "entropy":  # U is the entropy of the targets themselves
        assert terms["mean_uncertainty"].item() == pytest.approx(expected.item(), abs=1e-5)
    else:  # passes that agree: no disagreement anywhere
        assert terms["mean_uncertainty"].item() == pytest.approx(0.0, abs=1e-6)

    # the passes leave the teacher's running statistics alone (only its target pass moves them)
    feats = method.teacher["backbone"].encode(batch["views"])
    after_target_pass = [b.clone() for b in method.teacher.buffers()]
    assert any(not torch.equal(a, b) for a, b in zip(running, after_target_pass, strict=True))
    method.teacher_uncertainty(feats, seed=0)
    assert all(
        torch.equal(a, b)
        for a, b in zip(after_target_pass, list(method.teacher.buffers()), strict=True)
    )


@pytest.mark.parametrize("dropout_levels", [None, 1])
def test_forwards_passes_start_from_the_target_pass_and_give_the_full_recomputations_u(
    dropout_levels, monkeypatch
):
    # forward hands the passes the target pass's input to the first dropout layer and notes
    # batch statistics only for the layers after it; U must equal the passes run from the
    # encoder features with every layer's statistics noted (the plain recipe), with dropout on.
    method = make_method(dropout=0.3, dropout_levels=dropout_levels).train()
    batch = method.make_batch([{"image": x} for x in images(3)], torch.Generator().manual_seed(4))
    real_u, seen = PixelGlobal.teacher_uncertainty, {}

    def spy(self, feats, seed, chunk=None, norm_stats=None, shared=None):
        seen.update(feats=feats, seed=seed, norm_stats=norm_stats, shared=shared)
        seen["u"] = real_u(self, feats, seed, chunk, norm_stats, shared)
        return seen["u"]

    monkeypatch.setattr(PixelGlobal, "teacher_uncertainty", spy)
    method(batch, 0)
    assert seen["shared"] is not None
    teacher, n2 = method.teacher, batch["views"].shape[0]
    full = RecordedBatchStatistics(teacher)
    with torch.no_grad():
        enc = teacher["backbone"].encode(torch.cat([batch["views"], batch["stab_views"]]))
        with full.recording():
            teacher["pixel_head"](teacher["backbone"].decode(enc)[0][-1])
    plain = real_u(method, [f[:n2] for f in enc], seen["seed"], norm_stats=full)
    torch.testing.assert_close(seen["u"], plain, rtol=0, atol=1e-5)
    assert seen["u"].std() > 0.01  # the passes do disagree
    # only the layers the passes run were noted: those after the first dropout, the pixel
    # head's included; not the norm before it nor the blocks before its block
    noted, every = set(seen["norm_stats"].stats), set(full.stats)
    blocks = list(teacher["backbone"].decoder)
    start = 0 if dropout_levels is None else len(blocks) - dropout_levels
    before = [blocks[start].convs.conv_0.adn.N]
    before += [m for b in blocks[:start] for m in b.modules() if m in every]
    assert len(before) == 1 + 2 * start and all(m in every for m in before)
    assert not noted & set(before)
    assert noted == every - set(before)  # the rest: what the passes run, the head's norm too
    assert teacher["pixel_head"].net[1] in noted


def test_uncertainty_grows_with_the_dropout_that_makes_passes_disagree():
    x = torch.stack(images(2, size=32))
    means = []
    for p in (0.0, 0.05, 0.3):
        method = make_method(uncertainty_measure="mutual_information").train()
        for layer in method.teacher["backbone"].dropout_layers:
            layer.p = p
        feats = method.teacher["backbone"].encode(x)
        means.append(method.teacher_uncertainty(feats, seed=5).mean().item())
    assert means[0] == pytest.approx(0.0, abs=1e-6) and 0 < means[1] < means[2]


def test_centres_follow_dinos_update_from_the_batch_just_used():
    method = make_method().train()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        method.center_global.copy_(torch.randn(method.center_global.shape, generator=g))
        method.center_pixel.copy_(torch.randn(method.center_pixel.shape, generator=g))
    c_global, c_pixel = method.center_global.clone(), method.center_pixel.clone()
    batch = method.make_batch([{"image": x} for x in images(3)], torch.Generator().manual_seed(1))
    method(batch, 0)
    t_global, t_pix = _teacher_outputs(method, batch)
    assert torch.equal(method.center_global, c_global)  # forward has no side effects
    method.on_step_end(1, 10)
    # DINO: c <- m c + (1 - m) mean of the batch's teacher logits, m = 0.9 (pixels: over the
    # batch and every pixel of the two views)
    torch.testing.assert_close(method.center_global, 0.9 * c_global + 0.1 * t_global.mean(0))
    torch.testing.assert_close(method.center_pixel, 0.9 * c_pixel + 0.1 * t_pix.mean((0, 2, 3)))


def test_every_pixel_meets_the_teachers_output_at_its_own_anatomical_point(monkeypatch):
    # Oracle through forward's own partner / swap indexing: the teacher's "probabilities" are
    # replaced by coordinate images (each view pixel's position in the original slice), so the
    # target a student pixel receives is the position its partner came from; it must be the
    # pixel's own position wherever the pixel has a partner.
    method = make_method(uncertainty=False, view={"scale": (0.3, 0.8)}).train()
    pairs, stabs = method.sample_views(images(3), torch.Generator().manual_seed(6))
    batch = method.collate(pairs, stabs, mc_seed=0)
    own = torch.stack([p.coords1 for p in pairs] + [p.coords2 for p in pairs]).float()
    coordinate_maps = torch.cat([own, own])  # the x-tilde replays share the pairs' geometry
    real_probs, targets = L.teacher_probs, []

    def coordinates(logits, center, temperature, dim=1):
        return coordinate_maps if logits.ndim == 4 else real_probs(logits, center, temperature, dim)

    def record(target, log_probs, kind="kl", dim=1):
        targets.append(target)
        return target.new_zeros(target.shape[0], *target.shape[2:])

    monkeypatch.setattr(L, "teacher_probs", coordinates)
    monkeypatch.setattr(L, "pixel_discrepancy", record)
    method(batch, 0)
    valid = batch["valid"]
    assert len(targets) == 2 and valid.float().mean() > 0.3  # x and x-tilde; enough partners
    for target in targets:
        error = (target - own).abs().amax(1)[valid]
        assert error.max() < 1e-3  # pixels (bilinear sampling of affine maps is exact)
    n2 = own.shape[0]
    partner = own[torch.arange(n2).roll(n2 // 2)]
    assert (partner - own).abs().amax(1)[valid].mean() > 2.0  # the views do differ


@pytest.mark.parametrize("dropout_levels", [None, 1])
def test_batched_mc_dropout_equals_a_loop_of_single_passes(dropout_levels):
    method = make_method(mc_samples=20, dropout_levels=dropout_levels).eval()
    x = torch.stack(images(2, size=32))
    feats = method.teacher["backbone"].encode(x)
    rng = torch.get_rng_state()
    batched = method.teacher_uncertainty(feats, seed=11)
    assert torch.equal(torch.get_rng_state(), rng)  # masks never touch the global RNG
    assert ((batched >= 0) & (batched <= 1)).all() and batched.max() > 0

    # the documented contract, re-implemented: pass t, 20 separate decoder calls, each dropout
    # layer keeps an element where rand(generator seeded 11 + t) >= p, rescaled by 1 / (1 - p)
    teacher = method.teacher
    state = {}

    def mask(module, inputs, output):
        keep = torch.rand(output.shape, generator=state["g"]) >= module.p
        return output * keep / (1 - module.p)

    handles = [m.register_forward_hook(mask) for m in teacher["backbone"].dropout_layers]
    probs = []
    with torch.no_grad():
        for t in range(20):
            state["g"] = torch.Generator().manual_seed(11 + t)
            logits = teacher["pixel_head"](teacher["backbone"].decode(feats)[0][-1])
            probs.append(L.teacher_probs(logits, method.center_pixel, 0.04))
    for h in handles:
        h.remove()
    naive = L.predictive_entropy(torch.stack(probs).mean(0))
    torch.testing.assert_close(batched, naive, rtol=0, atol=1e-5)
    torch.testing.assert_close(method.teacher_uncertainty(feats, 11, chunk=7), batched)
    assert not torch.allclose(method.teacher_uncertainty(feats, seed=12), batched)


@pytest.mark.parametrize("ablation", list(ABLATIONS))
def test_ablation_switches_remove_exactly_their_terms(ablation, monkeypatch):
    calls = {"local": [], "uncertainty": 0}
    real_local, real_u = L.local_consistency_loss, PixelGlobal.teacher_uncertainty

    def spy_local(d, valid, stabilizer=None, uncertainty=None, form="absolute"):
        calls["local"].append((stabilizer is not None, uncertainty is not None))
        return real_local(d, valid, stabilizer, uncertainty, form)

    def spy_u(self, *args, **kwargs):
        calls["uncertainty"] += 1
        return real_u(self, *args, **kwargs)

    noted, real_record = [], RecordedBatchStatistics._record

    def spy_record(self, module, inputs):
        noted.append(module)
        return real_record(self, module, inputs)

    monkeypatch.setattr(L, "local_consistency_loss", spy_local)
    monkeypatch.setattr(PixelGlobal, "teacher_uncertainty", spy_u)
    monkeypatch.setattr(RecordedBatchStatistics, "_record", spy_record)
    switches = ABLATIONS[ablation]
    method = make_method(**switches).train()
    batch = method.make_batch([{"image": x} for x in images(2)], torch.Generator().manual_seed(0))
    terms = method(batch, 0)
    terms["loss"].backward()
    assert ("stab_views" in batch) == switches["stabilizer"]
    if ablation == "GO":
        assert set(terms) == {"loss", "global"} and calls["local"] == []
        assert torch.equal(terms["loss"], terms["global"])
        assert all(p.grad is None for p in method.pixel_head.parameters())
        assert "grid" not in batch
    else:
        assert calls["local"] == [(switches["stabilizer"], switches["uncertainty"])]
        assert ("stabilizer" in terms) == switches["stabilizer"]
        assert ("mean_uncertainty" in terms) == switches["uncertainty"]
        assert torch.isclose(terms["loss"], terms["global"] + terms["local"])
    assert calls["uncertainty"] == int(switches["uncertainty"])
    assert bool(noted) == switches["uncertainty"]  # statistics are noted only for the passes
    if ablation == "GP":
        assert torch.isclose(terms["local"], terms["pixel"])  # plain eq. 4 mean
    if ablation == "Ours":
        assert 0 <= terms["mean_uncertainty"].item() <= 1


def test_gpu_setting_is_the_papers_resunet50_with_lars_and_warm_up():
    assert get_method("pixel_global") is PixelGlobal
    gpu = PretrainConfig(method="pixel_global", profile="gpu").resolved()
    net = build_backbone(gpu.backbone, 2, 1, 2, **gpu.backbone_kwargs)
    encoder = sum(p.numel() for k, p in net.named_parameters() if k.startswith("encoder."))
    assert 23.4e6 < encoder < 23.6e6  # ResNet-50 without its fc layer: 23.5 M weights
    assert net.dropout_layers  # MC dropout in the decoder
    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = build_optimizer(gpu.optimizer, [weight], gpu.lr, gpu.weight_decay)
    scheduler = build_scheduler(optimizer, gpu.schedule, gpu.steps, gpu.warmup_steps)
    assert type(optimizer).__name__ == "LARS"
    rates = []
    for _ in range(gpu.warmup_steps + 1):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    # the rate climbs to the paper's 0.2 over 2 of its 500 epochs
    assert rates[0] < 0.01 and rates[-1] == pytest.approx(0.2, rel=1e-3)
    assert gpu.warmup_steps / gpu.steps == pytest.approx(2 / 500, rel=0.02)
    assert gpu.method_cfg["mc_chunk"] is None  # all MC passes in one decoder call on a GPU
    cpu = PretrainConfig(method="pixel_global", profile="cpu").resolved()
    assert cpu.method_cfg["mc_chunk"] == 1  # on a CPU one pass per call is faster


@pytest.mark.parametrize("profile", ["smoke", "laptop", "cpu"])
def test_cpu_profiles_estimate_uncertainty_from_the_last_decoder_block_and_8_passes(profile):
    gpu = PretrainConfig(method="pixel_global", profile="gpu").resolved()
    assert gpu.method_cfg["mc_samples"] == 20  # the paper's estimate
    paper = build_backbone(gpu.backbone, 2, 1, 2, **gpu.backbone_kwargs)
    assert len(paper.dropout_layers) == 2 * len(paper.decoder.blocks)  # every decoder block
    cfg = PretrainConfig(method="pixel_global", profile=profile).resolved()
    assert cfg.method_cfg["mc_samples"] == 8
    net = build_backbone(cfg.backbone, 2, 1, 2, **cfg.backbone_kwargs)
    last = len(net.decoder) - 1
    names = [n for n, m in net.named_modules() if isinstance(m, torch.nn.Dropout)]
    assert names and all(n.startswith(f"decoder.{last}.") for n in names)


def test_bad_settings():
    with pytest.raises(MedsslError, match="unknown setting"):
        make_method(stabiliser=False)
    with pytest.raises(MedsslError, match="decoder dropout"):
        make_method(dropout=0.0)
    with pytest.raises(MedsslError, match="uncertainty_measure"):
        make_method(uncertainty_measure="variance")
    make_method(dropout=0.0, uncertainty=False)  # fine without the uncertainty weighting


@pytest.mark.parametrize("transfer", ["student", "teacher"])
def test_transfer_exports_the_chosen_network(transfer):
    method = make_method(transfer=transfer)
    with torch.no_grad():  # make student and teacher differ, as after training
        for p in method.backbone.parameters():
            p.add_(1.0)
    state = method.transferable_state()
    source = method.backbone if transfer == "student" else method.teacher["backbone"]
    other = method.teacher["backbone"] if transfer == "student" else method.backbone
    expected = {
        k: v for k, v in source.state_dict().items() if k.startswith(("encoder.", "decoder."))
    }
    assert set(state) == set(expected)
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    weights = [k for k in expected if k.endswith("conv.weight")]
    assert weights and not any(torch.equal(state[k], other.state_dict()[k]) for k in weights)
    with pytest.raises(MedsslError, match="transfer must be"):
        make_method(transfer="ema")


def test_resunet_backbone_works():
    torch.manual_seed(0)
    net = build_backbone("resunet", 2, 1, 2, dropout=0.1)
    method = PixelGlobal(net, {"crop_size": (32, 32), **SMALL_HEADS, "mc_samples": 3})
    batch = method.make_batch([{"image": x} for x in images(2)], torch.Generator().manual_seed(0))
    terms = method.train()(batch, 0)
    assert {"global", "local", "mean_uncertainty"} <= set(terms)
    assert all(torch.isfinite(v) for v in terms.values())
    assert set(method.transferable_state()) == {
        k for k in net.state_dict() if k.startswith(("encoder.", "decoder."))
    }


# --- through the loop -------------------------------------------------------------------------


def _cfg(**kw) -> PretrainConfig:
    return PretrainConfig(
        method="pixel_global",
        profile="smoke",
        crop_size=(32, 32),
        backbone_kwargs=dict(TINY),
        method_cfg={**SMALL_HEADS, "mc_samples": 4},
        **{"steps": 4, "batch_size": 2, "checkpoint_every": 2, **kw},
    )


def test_run_folder_transfer_and_exact_resume(tiny_phantom, tmp_path, monkeypatch):
    run = tmp_path / "run"
    result = run_pretraining(_cfg(), tiny_phantom, run, progress=False)
    for name in ("config.json", "metrics.jsonl", "checkpoint.pt", "transferable.pt"):
        assert (run / name).is_file(), name
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    keys = {"loss", "global", "local", "pixel", "stabilizer", "mean_uncertainty"}
    assert all(keys <= set(r) and all(math.isfinite(r[k]) for k in keys) for r in log)
    assert all(0 <= r["mean_uncertainty"] <= 1 for r in log)
    assert result.summary["steps"] == 4

    # the student's encoder + decoder, not the teacher's, not the untrained segmentation head
    state = read_transferable(run)["state_dict"]
    method_state = load_checkpoint(run / "checkpoint.pt")["method"]
    student = {
        k[len("backbone.") :]: v for k, v in method_state.items() if k.startswith("backbone.")
    }
    assert set(state) == {k for k in student if k.startswith(("encoder.", "decoder."))}
    assert all(torch.equal(state[k], student[k]) for k in state)
    assert any(
        not torch.equal(state[k], method_state[f"teacher.backbone.{k}"])
        for k in state
        if state[k].is_floating_point()
    )

    loaded = load_method(run)
    assert isinstance(loaded, PixelGlobal)
    assert all(torch.equal(v, method_state[k]) for k, v in loaded.state_dict().items())
    u = loaded.uncertainty_map(torch.rand(3, 1, 48, 48), batch_size=2)
    assert u.shape == (3, 48, 48) and ((u >= 0) & (u <= 1)).all()

    ft = finetune(
        run,
        tiny_phantom,
        FinetuneConfig(
            profile="smoke",
            labeled=1,
            steps=2,
            val_every=2,
            batch_size=2,
            backbone_kwargs={"channels": TINY["channels"]},
        ),  # fmt: skip
        tmp_path / "ft",
        progress=False,
    )
    report = ft.key_report
    assert report is not None and set(report.matched) == set(state)
    assert set(report.missing) == {"head.weight", "head.bias"}
    assert not report.unexpected and not report.mismatched
    assert (tmp_path / "ft" / "results.csv").is_file()

    # a run killed after its step-2 checkpoint and resumed ends where the uninterrupted one did
    original = PixelGlobal.on_step_end

    def crash(self, step, max_steps):
        if step == 3:
            raise KeyboardInterrupt
        original(self, step, max_steps)

    monkeypatch.setattr(PixelGlobal, "on_step_end", crash)
    with pytest.raises(KeyboardInterrupt):
        run_pretraining(_cfg(), tiny_phantom, tmp_path / "resumed", progress=False)
    monkeypatch.setattr(PixelGlobal, "on_step_end", original)
    run_pretraining(_cfg(), tiny_phantom, tmp_path / "resumed", resume=True, progress=False)
    resumed = load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")["method"]
    assert all(torch.equal(method_state[k], resumed[k]) for k in method_state)
