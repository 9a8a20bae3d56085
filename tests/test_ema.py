"""EMA teachers: at a profile's own budget the teacher forgets its random initialisation."""

from __future__ import annotations

import pytest
import torch

from medssl_kit.methods.ema import ema_base, init_share, teacher_momentum
from medssl_kit.methods.registry import get_method
from medssl_kit.models.registry import build_backbone
from medssl_kit.train.pretrain import PretrainConfig

TINY = {"channels": (4, 8, 8, 8, 8)}
SMALL = {
    "pixel_global": {"global_hidden": 8, "global_dim": 4, "pixel_hidden": 4, "pixel_dim": 4},
    "byol": {"proj_hidden": 8, "proj_dim": 4, "pred_hidden": 8},
}


def _teachers(method) -> list[torch.nn.Module]:
    return [method.teacher] if method.name == "pixel_global" else [method.target]


@pytest.mark.parametrize("profile, steps", [("cpu", None), ("laptop", None), ("cpu", 120)])
@pytest.mark.parametrize("name", ["pixel_global", "byol"])
def test_the_teacher_keeps_under_five_percent_of_its_init_at_the_runs_budget(name, profile, steps):
    # The teacher starts at 1 everywhere and the online network stays at 0, so after the run's
    # EMA updates every teacher weight *is* the share of its initial value still in it; at the
    # cpu budget, the laptop profile's shorter one and a user's much shorter run.
    cfg = PretrainConfig(method=name, profile=profile, steps=steps).resolved()
    backbone = build_backbone("unet", 2, 1, 2, **{**cfg.backbone_kwargs, **TINY})
    method = get_method(name)(backbone, {**cfg.method_cfg, **SMALL[name], "crop_size": (32, 32)})
    with torch.no_grad():
        for p in method.parameters():
            p.zero_()
        for teacher in _teachers(method):
            for p in teacher.parameters():
                p.fill_(1.0)
    for step in range(1, cfg.steps + 1):
        method.on_step_end(step, cfg.steps)
    shares = torch.cat([p.flatten() for t in _teachers(method) for p in t.parameters()])
    assert shares.max() < 0.05
    torch.testing.assert_close(shares, torch.full_like(shares, shares[0].item()))
    expected = init_share(cfg.steps, cfg.method_cfg["base_momentum"])
    assert shares[0].item() == pytest.approx(expected, rel=1e-5)  # float32 products


def test_the_papers_momentum_stays_at_gpu_and_init_share_is_the_product():
    for name in ("pixel_global", "byol"):
        gpu = PretrainConfig(method=name, profile="gpu").resolved()
        assert gpu.method_cfg["base_momentum"] == 0.996
        assert init_share(gpu.steps, 0.996) < 1e-10
        cpu = PretrainConfig(method=name, profile="cpu").resolved()  # long enough for 0.99?
        assert cpu.method_cfg["base_momentum"] == (0.99 if cpu.steps >= 800 else 1 - 8 / cpu.steps)
    assert ema_base(400, 0.99) == pytest.approx(0.98) and ema_base(20000, 0.996) == 0.996
    assert init_share(400, 0.996) == pytest.approx(0.448, abs=1e-3)  # the old cpu setting
    by_hand = 1.0
    for k in range(10):
        by_hand *= teacher_momentum(k, 10, 0.9)
    assert init_share(10, 0.9) == pytest.approx(by_hand)
