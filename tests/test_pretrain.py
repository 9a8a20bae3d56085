"""The generic pre-training loop, with a small method defined here (no method-specific code)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from medssl_kit.errors import MedsslError
from medssl_kit.methods.base import PretrainMethod
from medssl_kit.methods.registry import available_methods, get_method, register
from medssl_kit.train.checkpoint import load_checkpoint
from medssl_kit.train.optim import LARS, build_scheduler, warmup_cosine
from medssl_kit.train.pretrain import PretrainConfig, run_pretraining
from medssl_kit.train.transfer import read_transferable


class ToyDenoise(PretrainMethod):
    """Denoising autoencoder with an EMA copy of the head weight (exercises on_step_end)."""

    name = "toy_denoise"
    spatial_dims = (2,)

    def __init__(self, backbone, cfg=None):
        super().__init__(backbone, cfg)
        self.register_buffer("ema", torch.zeros_like(backbone.head.weight))
        self.ema_calls = 0

    @classmethod
    def default_config(cls, profile, spatial_dims):
        return {"optimizer": "sgd", "lr": 0.05, "noise": 0.1}

    @classmethod
    def backbone_kwargs(cls, profile, spatial_dims, backbone):
        return {"channels": (4, 8, 8, 8, 8)}

    def make_batch(self, items, generator):
        x = torch.stack([it["image"][:, :32, :32] for it in items])
        noise = torch.randn(x.shape, generator=generator) * self.cfg["noise"]
        return {"clean": x, "noisy": x + noise}

    def forward(self, batch, step):
        out = self.backbone(batch["noisy"])[:, :1]
        mse = F.mse_loss(out, batch["clean"])
        return {"loss": mse, "mse": mse, "twice": 2 * mse}

    def on_step_end(self, step, max_steps):
        self.ema.mul_(0.5).add_(0.5 * self.backbone.head.weight.detach())
        self.ema_calls += 1

    def transferable_state(self):
        return self.backbone.encoder_state_dict()


register("toy_denoise", ToyDenoise)


def _cfg(**kw):
    return PretrainConfig(
        method="toy_denoise", profile="smoke", **{"steps": 6, "batch_size": 2,
                                                  "checkpoint_every": 2, **kw}
    )  # fmt: skip


def test_registry():
    assert "toy_denoise" in available_methods() and get_method("toy_denoise") is ToyDenoise
    with pytest.raises(MedsslError, match="unknown pre-training method"):
        get_method("nope")


def test_config_resolution_order():
    cfg = _cfg(lr=0.01).resolved()
    assert cfg.optimizer == "sgd"  # the method's default beats the loop's
    assert cfg.lr == 0.01  # an explicit value beats the method's
    assert cfg.method_cfg["noise"] == 0.1 and "noise" not in cfg.backbone_kwargs
    assert cfg.backbone == "unet" and cfg.backbone_kwargs["channels"] == (4, 8, 8, 8, 8)
    with pytest.raises(MedsslError, match="runs in"):
        PretrainConfig(method="toy_denoise", profile="smoke", dims=3).resolved()


def test_run_folder_logging_and_transfer(tiny_phantom, tmp_path):
    result = run_pretraining(_cfg(), tiny_phantom, tmp_path / "run", progress=False)
    log = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 7))
    assert all({"loss", "mse", "twice", "lr", "seconds"} <= set(r) for r in log)
    assert all(math.isclose(r["twice"], 2 * r["mse"], rel_tol=1e-6) for r in log)
    header = read_transferable(tmp_path / "run")
    assert header["method"] == "toy_denoise"
    assert header["state_dict"] and all(k.startswith("encoder.") for k in header["state_dict"])
    assert result.summary["steps"] == 6 and result.summary["median_seconds_per_step"] > 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["kind"] == "pretrain" and config["backbone"]["channels"] == [4, 8, 8, 8, 8]
    assert config["threads"] == torch.get_num_threads()
    assert config["cpu_kernels"] == torch.backends.cpu.get_cpu_capability()
    with pytest.raises(MedsslError, match="already holds a run"):
        run_pretraining(_cfg(), tiny_phantom, tmp_path / "run", progress=False)


def test_same_seed_same_weights_and_resume_is_exact(tiny_phantom, tmp_path, monkeypatch):
    run_pretraining(_cfg(), tiny_phantom, tmp_path / "a", progress=False)
    run_pretraining(_cfg(), tiny_phantom, tmp_path / "b", progress=False)

    # a run that crashes in step 5 (after the step-4 checkpoint), then is resumed
    def crash(self, step, max_steps):
        if step == 5:
            raise KeyboardInterrupt
        original(self, step, max_steps)

    original = ToyDenoise.on_step_end
    monkeypatch.setattr(ToyDenoise, "on_step_end", crash)
    with pytest.raises(KeyboardInterrupt):
        run_pretraining(_cfg(), tiny_phantom, tmp_path / "c", progress=False)
    monkeypatch.setattr(ToyDenoise, "on_step_end", original)
    assert len((tmp_path / "c" / "metrics.jsonl").read_text().splitlines()) == 4
    ckpt = load_checkpoint(tmp_path / "c" / "checkpoint.pt")
    assert ckpt["step"] == 4 and torch.count_nonzero(ckpt["method"]["ema"]) > 0
    run_pretraining(_cfg(), tiny_phantom, tmp_path / "c", resume=True, progress=False)
    a, b, c = (read_transferable(tmp_path / n)["state_dict"] for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(a[k], c[k]) for k in a)
    final = [load_checkpoint(tmp_path / n / "checkpoint.pt")["method"]["ema"] for n in "ac"]
    assert torch.equal(*final)  # method state (EMA buffers) is checkpointed too
    other = run_pretraining(_cfg(seed=1), tiny_phantom, tmp_path / "d", progress=False)
    d = read_transferable(other.run_dir)["state_dict"]
    assert any(not torch.equal(a[k], d[k]) for k in a)


def test_lars_matches_its_formula():
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ||w|| = 5
    b = torch.nn.Parameter(torch.tensor([1.0]))
    opt = LARS([w, b], lr=0.1, momentum=0.9, weight_decay=0.0, trust_coefficient=0.01)
    w.grad = torch.tensor([[0.0, 2.0]])  # ||g|| = 2 -> trust 0.01 * 5 / 2 = 0.025
    b.grad = torch.tensor([0.5])  # 1-D: no adaptation
    opt.step()
    assert torch.allclose(w, torch.tensor([[3.0, 4.0 - 0.1 * 0.025 * 2.0]]))
    assert torch.allclose(b, torch.tensor([1.0 - 0.1 * 0.5]))
    w.grad = torch.tensor([[0.0, 2.0]])
    w_before = w.detach().clone()
    opt.step()  # momentum: v = 0.9 * v + trust * g
    trust = 0.01 * torch.linalg.norm(w_before) / 2.0
    v = 0.9 * 0.025 * 2.0 + trust * 2.0
    assert torch.allclose(w[0, 1], w_before[0, 1] - 0.1 * v)


def test_warmup_cosine_schedule():
    assert warmup_cosine(0, 100, 10) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(10, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10) == pytest.approx(0.5)
    assert warmup_cosine(100, 100, 10) == pytest.approx(0.0)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, "poly", 10)
    for _ in range(5):
        opt.step()
        sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(0.5**0.9)


def test_cli_pretrain_routes_settings(tiny_phantom, tmp_path, capsys):
    from medssl_kit.cli import main

    out = tmp_path / "cli"
    args = ["pretrain", "--method", "toy_denoise", "--manifest", str(tiny_phantom),
            "--profile", "smoke", "--out", str(out), "--steps", "3",
            "--set", "noise=0.25", "--set", "lr=0.01"]  # fmt: skip
    assert main(args) == 0
    assert "toy_denoise: 3 steps" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())["config"]
    assert config["lr"] == 0.01 and config["method_cfg"]["noise"] == 0.25
    assert main(args) == 1 and "already holds a run" in capsys.readouterr().err
    assert main([*args[:2], "nope", *args[3:]]) == 1
    assert "unknown pre-training method 'nope'" in capsys.readouterr().err
