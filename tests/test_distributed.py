"""Data-parallel training (torchrun / DDP, 2 processes with gloo on the CPU) and the GPU path.

The multi-process tests start real processes: ``torch.multiprocessing.spawn`` for the collective
helpers and losses, and ``medssl ... --nproc 2`` (torchrun's launcher) for whole runs. The
launcher's workers can run this module (``python -m test_distributed ...``), which injects a
worker failure where ``MEDSSL_TEST_FAIL=rank:step:exit_code`` says (a test-only hook).

Tests marked ``gpu`` need a CUDA GPU (``scripts/gpu_check.sh`` runs them); elsewhere they skip.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import medssl_kit.train.distributed as D
import medssl_kit.train.pretrain as P
from medssl_kit.cli import _without_nproc, main
from medssl_kit.distributed import (
    GatheredBatchNorm1d,
    all_gather_rows,
    convert_sync_batchnorm,
    derived_seed,
)
from medssl_kit.errors import MedsslError
from medssl_kit.losses.contrastive import info_nce
from medssl_kit.losses.mixcl import label_consistency_loss
from medssl_kit.losses.pixel_global import updated_center
from medssl_kit.methods.registry import available_methods, get_method
from medssl_kit.models.heads import MLPHead
from medssl_kit.models.registry import build_backbone
from medssl_kit.train.checkpoint import load_checkpoint, read_jsonl
from medssl_kit.train.pretrain import PretrainConfig, run_pretraining

HERE = Path(__file__).resolve().parent
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# A 2-rank pre-training run of a method without batch coupling: models_genesis on a unet with
# instance norm, SGD (Adam would turn the rounding noise of gradients that vanish in exact
# arithmetic, e.g. of the biases before a norm, into full-size steps).
STEPS, EVERY, BATCH = 6, 2, 4
LOOP = {"batch_size": BATCH, "checkpoint_every": EVERY, "optimizer": "sgd", "lr": 0.02}
NORM = {"norm": "instance"}


def _pretrain_args(manifest, out, *extra):
    sets = [f"{k}={v}" for k, v in LOOP.items()] + [f"backbone_kwargs={json.dumps(NORM)}"]
    args = ["pretrain", "--method", "models_genesis", "--manifest", str(manifest),
            "--profile", "smoke", "--out", str(out), "--steps", str(STEPS),
            "--device", "cpu"]  # fmt: skip
    for s in sets:
        args += ["--set", s]
    return [*args, *extra]


def _logged(run):
    """The run's log without the timings."""
    records = read_jsonl(run / "metrics.jsonl")
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


@pytest.fixture(scope="module")
def two_rank_run(tiny_phantom, tmp_path_factory):
    """The uninterrupted 2-rank run (through ``medssl pretrain --nproc 2``)."""
    out = tmp_path_factory.mktemp("ddp") / "full"
    assert main(_pretrain_args(tiny_phantom, out, "--nproc", "2")) == 0
    return out


# --- whole runs in two processes -------------------------------------------------------------


def test_two_ranks_train_as_one_process_on_the_same_global_batch(
    two_rank_run, tiny_phantom, tmp_path, monkeypatch
):
    """k steps of 2 ranks × batch b end with the weights of 1 process × batch 2b fed the two
    ranks' batches (concatenated), and log the same losses (the mean over the ranks)."""
    config = json.loads((two_rank_run / "config.json").read_text())
    assert config["processes"] == 2 and config["config"]["batch_size"] == BATCH

    def both_ranks(method, dataset, cfg, step, rank=None, world_size=None):
        parts = [original(method, dataset, cfg, step, r, 2) for r in range(2)]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    original = P.draw_batch
    monkeypatch.setattr(P, "draw_batch", both_ranks)
    cfg = PretrainConfig(
        method="models_genesis", profile="smoke", steps=STEPS, backbone_kwargs=dict(NORM),
        device="cpu", **LOOP,
    )  # fmt: skip
    run_pretraining(cfg, tiny_phantom, tmp_path / "one", progress=False)

    ddp = load_checkpoint(two_rank_run / "checkpoint.pt")
    one = load_checkpoint(tmp_path / "one" / "checkpoint.pt")
    assert ddp["step"] == one["step"] == STEPS
    assert ddp["method"].keys() == one["method"].keys()
    moved = max((one["method"][k] - ddp["method"][k]).abs().max() for k in one["method"])
    assert moved < 1e-5
    torch.manual_seed(0)  # the initial backbone, as run_pretraining builds it
    start = build_backbone("unet", 2, 1, 8, **cfg.resolved().backbone_kwargs).state_dict()
    trained = max((one["method"][f"backbone.{k}"] - v).abs().max() for k, v in start.items())
    assert trained > 100 * moved  # the agreement is not that of two untrained networks
    for a, b in zip(_logged(two_rank_run), _logged(tmp_path / "one"), strict=True):
        assert a["step"] == b["step"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_a_failed_rank_is_one_error_line_and_the_run_resumes_exactly(
    two_rank_run, tiny_phantom, tmp_path, monkeypatch, capfd
):
    killed = tmp_path / "killed"
    monkeypatch.setattr(D, "WORKER_MODULE", "test_distributed")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HERE), *sys.path]))
    monkeypatch.setenv("MEDSSL_TEST_FAIL", "1:5:3")  # rank 1 dies in step 5
    assert main(_pretrain_args(tiny_phantom, killed, "--nproc", "2")) == 1
    # the error may follow a progress bar's unfinished line (a killed rank's tqdm) on one line
    err = capfd.readouterr().err
    errors = [x[x.index("medssl: error:") :] for x in err.splitlines() if "medssl: error:" in x]
    assert errors == ["medssl: error: rank 1 of 2 failed (exit code 3)"], err[-2000:]
    # the last checkpoint is intact: step 4's, with both ranks' RNG states
    ckpt = load_checkpoint(killed / "checkpoint.pt")
    assert ckpt["step"] == 4 and ckpt["world_size"] == 2 and len(ckpt["rng_ranks"]) == 2
    assert [r["step"] for r in read_jsonl(killed / "metrics.jsonl")] == [1, 2, 3, 4]
    assert sorted(p.name for p in killed.iterdir()) == [
        "checkpoint.pt", "config.json", "metrics.jsonl"
    ]  # fmt: skip
    monkeypatch.delenv("MEDSSL_TEST_FAIL")

    # one process cannot continue a 2-process run: its draws would not be the same
    assert main(_pretrain_args(tiny_phantom, killed, "--resume")) == 1
    assert "written by a run of 2 process(es)" in capfd.readouterr().err

    assert main(_pretrain_args(tiny_phantom, killed, "--nproc", "2", "--resume")) == 0
    full = load_checkpoint(two_rank_run / "checkpoint.pt")
    resumed = load_checkpoint(killed / "checkpoint.pt")
    assert all(torch.equal(full["method"][k], resumed["method"][k]) for k in full["method"])
    pairs = zip(full["rng_ranks"], resumed["rng_ranks"], strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    assert _logged(killed) == _logged(two_rank_run)


def test_two_rank_finetune_validates_on_rank_zero_and_stops_together(tiny_phantom, tmp_path, capfd):
    """A 2-rank fine-tune with a learning rate too small to change the validation score stops
    early at its second validation on every rank (otherwise the ranks would fall out of step),
    and rank 0 alone writes the run folder, logs, validates and evaluates."""
    out = tmp_path / "ft"
    args = ["finetune", "--manifest", str(tiny_phantom), "--profile", "smoke", "--labeled", "2",
            "--steps", "6", "--out", str(out), "--nproc", "2", "--device", "cpu",
            "--set", "batch_size=4", "--set", "val_every=1", "--set", "patience=1",
            "--set", "lr=1e-12"]  # fmt: skip
    assert main(args) == 0
    captured = capfd.readouterr()
    assert captured.out.count("run folder:") == 1  # rank 0 reports
    summary = json.loads((out / "summary.json").read_text())
    assert summary["early_stopped"] and summary["steps_run"] == 2 and summary["best_step"] == 1
    log = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in log if "loss" in r] == [1, 2]
    assert [r["step"] for r in log if "val_score" in r] == [1, 2]
    assert (out / "results.csv").is_file()
    assert json.loads((out / "config.json").read_text())["processes"] == 2
    assert load_checkpoint(out / "checkpoint.pt")["world_size"] == 2


# --- collectives and the losses that gather -------------------------------------------------


def _inputs():
    """Global tensors (float64) the 2-rank workers split and the reference uses whole."""
    g = torch.Generator().manual_seed(7)
    r = partial(torch.randn, generator=g, dtype=torch.float64)
    return {
        "rows": r(5, 3),  # rank 0: rows 0-1, rank 1: rows 2-4
        "q": r(8, 6), "k": r(8, 6), "queue": r(5, 6),  # rank 0: rows 0-3, rank 1: rows 4-7
        "features": r(14, 5),  # rank 0: rows 0-5, rank 1: rows 6-13
        "classes": torch.tensor([0, 1, 2, 1, 0, 2, 1, 1, 0, 2, 0, 1, 2, 0]),
        "sources": torch.tensor([3, 3, 3, 9, 9, 9, 3, 9, 3, 9, 3, 9, 3, 9]) * 10**12,
        "x": r(8, 6), "weights": r(8, 4),  # batch norm: rank 0 rows 0-3
        "logits": r(6, 4),  # centre: rank 0 rows 0-2
    }  # fmt: skip


SPLITS = {"rows": (2, 5), "q": (4, 8), "features": (6, 14), "x": (4, 8), "logits": (3, 6)}


def _share(name, rank):
    stop0, stop1 = SPLITS[name]
    return slice(0, stop0) if rank == 0 else slice(stop0, stop1)


def _head():
    torch.manual_seed(3)
    return MLPHead(6, 8, 4, n_layers=3, last_norm=True).double()


def _collectives_worker(rank, store, out):
    torch.set_num_threads(1)  # a forked child: no OpenMP pool of the parent's
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        t, res = _inputs(), {}
        own = t["rows"][_share("rows", rank)].clone().requires_grad_()
        rows, start = all_gather_rows(own)
        (rows * (rank + 1) * torch.arange(15.0, dtype=torch.float64).view(5, 3)).sum().backward()
        res.update(rows=rows.detach(), start=start, rows_grad=own.grad)

        q = t["q"][_share("q", rank)].clone().requires_grad_()
        loss = info_nce(q, t["k"][_share("q", rank)], t["queue"], 0.2, in_batch_negatives=True)
        loss.backward()
        res.update(nce=loss.detach(), nce_grad=q.grad)

        f = t["features"][_share("features", rank)].clone().requires_grad_()
        cut = _share("features", rank)
        loss = label_consistency_loss(f, t["classes"][cut], t["sources"][cut], 0.1)
        loss.backward()
        res.update(label=loss.detach(), label_grad=f.grad)

        head = convert_sync_batchnorm(_head(), torch.device("cpu"))
        x = t["x"][_share("x", rank)].clone().requires_grad_()
        out_r = head(x)
        (out_r * t["weights"][_share("x", rank)]).sum().backward()
        grads = [p.grad.clone() for p in head.parameters()]
        for g in grads:  # what DDP does with the parameter gradients
            dist.all_reduce(g)
            g /= 2
        res.update(bn_out=out_r.detach(), bn_x_grad=x.grad, bn_param_grads=grads)
        res["bn_buffers"] = [b.clone() for b in head.buffers()]

        logits = t["logits"][_share("logits", rank)]
        res["center"] = updated_center(torch.zeros(4, dtype=torch.float64), logits, 0.9)
        torch.save(res, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_collectives_and_gathering_losses_match_one_process(tmp_path):
    """Two gloo processes: gathered rows and their gradient; MoCo's InfoNCE with in-batch
    negatives, MixCL's label loss (unequal pixel counts) and batch norm over the global batch
    give the one-process loss, output and gradient of the global batch; DINO's centre too."""
    args = (str(tmp_path / "store"), tmp_path)
    mp.start_processes(_collectives_worker, args=args, nprocs=2, start_method="fork")
    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    t = _inputs()

    weights = torch.arange(15.0, dtype=torch.float64).view(5, 3)
    for r in range(2):
        assert torch.equal(res[r]["rows"], t["rows"]) and res[r]["start"] == (0, 2)[r]
        assert torch.equal(res[r]["rows_grad"], 3 * weights[_share("rows", r)])  # (1 + 2) ×

    def check(name, loss_key, grad_key, reference):
        whole = t[name].clone().requires_grad_()
        expected = reference(whole)
        expected.backward()
        assert (res[0][loss_key] + res[1][loss_key]) / 2 == pytest.approx(float(expected.detach()))
        for r in range(2):  # DDP averages: the global loss's gradient is the ranks' mean
            assert torch.allclose(res[r][grad_key] / 2, whole.grad[_share(name, r)])

    check("q", "nce", "nce_grad", lambda q: info_nce(q, t["k"], t["queue"], 0.2, True))
    check(
        "features", "label", "label_grad",
        lambda f: label_consistency_loss(f, t["classes"], t["sources"], 0.1),
    )  # fmt: skip

    head = _head()
    x = t["x"].clone().requires_grad_()
    out = head(x)
    ((out * t["weights"]).sum() / 2).backward()
    for r in range(2):
        cut = _share("x", r)
        assert torch.allclose(res[r]["bn_out"], out[cut].detach())
        assert torch.allclose(res[r]["bn_x_grad"] / 2, x.grad[cut])
        for got, p in zip(res[r]["bn_param_grads"], head.parameters(), strict=True):
            assert torch.allclose(got, p.grad)
        for got, b in zip(res[r]["bn_buffers"], head.buffers(), strict=True):
            assert torch.allclose(got.double(), b.double())

    center = updated_center(torch.zeros(4, dtype=torch.float64), t["logits"], 0.9)
    assert all(torch.allclose(res[r]["center"], center) for r in range(2))


def test_sync_batchnorm_paths_of_the_methods_convert_on_the_cpu():
    """The methods' ``sync_batchnorm`` submodules exist and hold batch norms; converted for the
    CPU they keep their state-dict keys and tensors (checkpoints stay interchangeable)."""
    for name in ("simsiam", "byol", "pixel_global"):
        cls = get_method(name)
        backbone = build_backbone("unet", 2, 1, 2, channels=[4, 8, 8, 8, 8], dropout=0.1)
        method = cls(backbone, {"crop_size": (32, 32)})
        assert cls.sync_batchnorm
        before = method.state_dict()
        for path in cls.sync_batchnorm:
            owner_path, _, attr = path.rpartition(".")
            owner = method.get_submodule(owner_path) if owner_path else method
            part = getattr(owner, attr)
            assert any(isinstance(m, nn.BatchNorm1d) for m in part.modules()), path
            setattr(owner, attr, convert_sync_batchnorm(part, torch.device("cpu")))
            assert any(isinstance(m, GatheredBatchNorm1d) for m in getattr(owner, attr).modules())
        after = method.state_dict()
        assert after.keys() == before.keys()
        assert all(after[k] is before[k] or torch.equal(after[k], before[k]) for k in before)


# --- launching, shares, devices, precision (one process) ------------------------------------


def test_without_nproc_removes_the_option_in_every_spelling():
    argv = ["pretrain", "--method", "x", "--nproc", "2", "--steps", "3"]
    assert _without_nproc(argv) == ["pretrain", "--method", "x", "--steps", "3"]
    assert _without_nproc(["finetune", "--nproc=4", "--out", "o"]) == ["finetune", "--out", "o"]
    abbreviated = ["pretrain", "--npr", "2", "--set", "a=b"]
    assert _without_nproc(abbreviated) == ["pretrain", "--set", "a=b"]


def test_nproc_checks_before_starting_workers(tiny_phantom, tmp_path, monkeypatch, capsys):
    base = ["pretrain", "--method", "models_genesis", "--manifest", str(tiny_phantom),
            "--profile", "smoke", "--out", str(tmp_path / "r"), "--nproc", "2"]  # fmt: skip
    assert main([*base, "--set", "batch_size=3"]) == 1
    assert capsys.readouterr().err.strip() == (
        "medssl: error: batch_size 3 (the global batch) must be divisible by the 2 processes; "
        "choose a multiple of 2 (--set batch_size=...)"
    )
    monkeypatch.setenv("WORLD_SIZE", "2")  # already a torchrun worker
    assert main(base) == 2
    assert "under torchrun leave it out" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_rank_share_slices_the_global_batch_and_seeds_each_rank():
    index = list(range(10, 18))
    assert D.rank_share(index, 3, 0) == (index, None)  # one process: all of it, step generator
    shares = [D.rank_share(index, 3, 0, r, 2) for r in range(2)]
    assert [s[0] for s in shares] == [index[0::2], index[1::2]]
    draws = [torch.rand(4, generator=g) for _, g in shares]
    assert not torch.equal(*draws)
    again = torch.rand(4, generator=D.rank_share(index, 3, 0, 1, 2)[1])
    assert torch.equal(again, draws[1])  # reproducible: (seed, step, rank) fix it
    assert not torch.equal(torch.rand(4, generator=D.rank_share(index, 4, 0, 1, 2)[1]), again)
    with pytest.raises(MedsslError, match="divisible by the 3 processes"):
        D.rank_share(index, 3, 0, 0, 3)
    assert derived_seed(1, 0, 3, 1) != derived_seed(1, 0, 3, 0) and 0 <= derived_seed(5) < 2**63


def test_device_selection(monkeypatch, tiny_phantom, tmp_path, capsys):
    assert D.select_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert D.select_device("auto") == torch.device("cpu")
    with pytest.raises(MedsslError, match="--device cuda: PyTorch sees no CUDA GPU"):
        D.select_device("cuda")
    args = ["--manifest", str(tiny_phantom), "--profile", "smoke", "--device", "cuda"]
    assert main(["pretrain", "--method", "simsiam", *args, "--out", str(tmp_path / "p")]) == 1
    assert main(["finetune", *args, "--out", str(tmp_path / "f")]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(e.startswith("medssl: error: --device cuda: PyTorch") for e in err)
    assert not (tmp_path / "p").exists() and not (tmp_path / "f").exists()
    # with GPUs: a rank takes the GPU of its local rank, and no more processes than GPUs
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert D.select_device("auto", 1) == torch.device("cuda", 1)
    assert D.select_device("cuda") == torch.device("cuda", 0)
    with pytest.raises(MedsslError, match="needs GPU 2, but this machine has 2"):
        D.select_device("cuda", 2)


def test_precision_and_memory_format_follow_the_device(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert D.precision(cpu, False) == D.Precision(None, False)
    assert D.precision(cuda, False) == D.Precision(None, False)
    assert D.precision(cpu, True) == D.Precision(torch.bfloat16, False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert D.precision(cuda, True) == D.Precision(torch.bfloat16, False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert D.precision(cuda, True) == D.Precision(torch.float16, True)  # with a grad scaler
    assert D.channels_last(cuda, 2, None) and not D.channels_last(cuda, 3, None)
    assert not D.channels_last(cpu, 2, None) and D.channels_last(cpu, 2, True)
    assert D.default_workers(cpu) == 0 and 1 <= D.default_workers(cuda) <= 4


def test_unset_amp_is_on_for_cuda_and_for_the_laptop_on_a_cpu_with_native_bfloat16(
    monkeypatch, tiny_phantom, tmp_path
):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    monkeypatch.setattr(D, "native_cpu_bfloat16", lambda: True)
    assert D.default_amp(cuda, "cpu") and D.default_amp(cpu, "laptop")
    assert not D.default_amp(cpu, "cpu") and not D.default_amp(cpu, "smoke")
    cfg = PretrainConfig(method="simsiam", profile="laptop", steps=1, batch_size=2)
    run_pretraining(cfg, tiny_phantom, tmp_path / "bf16", progress=False)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["config"]["amp"] is True
    monkeypatch.setattr(D, "native_cpu_bfloat16", lambda: False)  # emulated: slower, so off
    assert not D.default_amp(cpu, "laptop") and D.default_amp(cuda, "laptop")


# Every registered method in each of its dimensions (a new method cannot be left out).
PRETRAIN_METHODS = [(m, d) for m in available_methods() for d in get_method(m).spatial_dims]


@pytest.mark.parametrize("method,dims", PRETRAIN_METHODS)
def test_every_method_pretrains_in_bfloat16_on_the_cpu(
    method, dims, tiny_phantom, tiny_phantom_3d, tmp_path
):
    """Mixed precision (the gpu profile's default, ``--set amp=true`` on the CPU) must not
    break a method: features read at sampled positions (grid_sample answers in float32 under
    autocast) and recorded batch statistics once came back in the wrong dtype."""
    cfg = PretrainConfig(method=method, profile="smoke", dims=dims, steps=2, amp=True)
    manifest = tiny_phantom_3d if dims == 3 else tiny_phantom
    result = run_pretraining(cfg, manifest, tmp_path / "run", progress=False)
    assert len(result.history) == 2
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history)


@pytest.mark.parametrize("channels", [16, 64])
def test_cpu_bfloat16_gives_conv3d_two_slices_deep_its_float32_weight_gradient(channels):
    """oneDNN's bfloat16 ``conv3d`` weight gradient is wrong at input depth 2 (torch 2.13:
    relative error ~0.8 to inf on every call); :class:`D.Depth2Conv3dInFloat32` runs it in
    float32, other depths stay in bfloat16."""
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    conv = nn.Conv3d(channels, channels, 3, padding=1)
    for depth, dtype in [(2, torch.float32), (4, torch.bfloat16)]:
        x = torch.randn(2, channels, depth, 8, 8)
        conv.zero_grad()
        conv(x).square().mean().backward()
        reference = conv.weight.grad.clone()
        for _ in range(4):
            conv.zero_grad()
            with D.precision(cpu, amp=True).autocast(cpu):
                y = conv(x)
            y.float().square().mean().backward()
            assert y.dtype == dtype
            error = (conv.weight.grad - reference).norm() / reference.norm()
            assert error < 1e-2, (depth, error.item())


def test_a_3d_run_in_cpu_bfloat16_is_deterministic(tiny_phantom_3d, tmp_path):
    """The wrong depth-2 gradients were also different on every call (torch 2.13, oneDNN):
    two 3D bfloat16 runs gave different second-step losses and, 1 call in 8, NaN."""
    cfg = PretrainConfig(method="models_genesis", profile="smoke", dims=3, steps=2, amp=True)
    losses = [
        [
            r["loss"]
            for r in run_pretraining(
                cfg, tiny_phantom_3d, tmp_path / f"r{i}", progress=False
            ).history
        ]
        for i in range(2)
    ]
    assert losses[0] == losses[1]
    assert all(torch.isfinite(torch.tensor(losses[0])))


def test_amp_on_the_cpu_trains_in_bfloat16_in_channels_last(tiny_phantom, tmp_path, monkeypatch):
    seen = []
    forward = get_method("models_genesis").forward

    def spy(self, batch, step):
        seen.append((torch.get_autocast_dtype("cpu"), torch.is_autocast_enabled("cpu")))
        seen.append(batch["inputs"].is_contiguous(memory_format=torch.channels_last))
        return forward(self, batch, step)

    monkeypatch.setattr(get_method("models_genesis"), "forward", spy)
    cfg = PretrainConfig(
        method="models_genesis", profile="smoke", steps=2, amp=True, channels_last=True
    )
    result = run_pretraining(cfg, tiny_phantom, tmp_path / "amp", progress=False)
    assert seen[:2] == [(torch.bfloat16, True), True]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history)
    config = json.loads((tmp_path / "amp" / "config.json").read_text())
    assert config["config"]["amp"] is True and config["device"] == "cpu"


def test_batches_built_in_worker_processes_are_the_same(tiny_phantom, tmp_path):
    """``workers`` > 0 builds the same batches as the loop itself, so the run is the same."""
    cfg = PretrainConfig(method="mocov2", profile="smoke", steps=3, batch_size=4).resolved()
    method = get_method("mocov2")(
        build_backbone("unet", 2, 1, 8, channels=[4, 8, 8, 8, 8]), {"crop_size": (32, 32)}
    )
    from medssl_kit.data.manifest import load_manifest

    dataset = P.build_dataset(get_method("mocov2"), load_manifest(tiny_phantom), cfg)
    make = partial(P.draw_batch, method, dataset, cfg)
    here = list(D.step_batches(make, range(1, 4)))
    forked = list(D.step_batches(make, range(1, 4), workers=2))
    assert len(here) == len(forked) == 3
    assert all(torch.equal(a[k], b[k]) for a, b in zip(here, forked, strict=True) for k in a)

    runs = {}
    for workers in (0, 1):
        run = PretrainConfig(method="models_genesis", profile="smoke", steps=3, workers=workers)
        run_pretraining(run, tiny_phantom, tmp_path / f"w{workers}", progress=False)
        runs[workers] = load_checkpoint(tmp_path / f"w{workers}" / "checkpoint.pt")["method"]
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


@pytest.mark.parametrize("world", ["1", "2"])
def test_a_worker_exits_without_the_interpreter_teardown(world):
    # issue 37: a finished gloo rank aborted in the interpreter's teardown; a worker of several
    # skips it (exit handlers never run), with its output flushed and its exit code kept
    script = (
        "import atexit, sys; atexit.register(lambda: print('teardown ran'));"
        "from medssl_kit.train.distributed import exit_process;"
        "print('done', end=''); print('warn', end='', file=sys.stderr); exit_process(3)"
    )
    env = {**os.environ, "WORLD_SIZE": world}
    ran = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert ran.returncode == 3 and ran.stderr == "warn"
    assert ran.stdout == ("done" if world == "2" else "doneteardown ran\n")


def test_failure_message_blames_the_rank_that_failed_first(tmp_path):
    class Failure:
        def __init__(self, exitcode):
            self.exitcode = exitcode

    (tmp_path / "rank-0.json").write_text(
        json.dumps({"message": "RuntimeError: Connection closed by peer", "collateral": True})
    )
    failures = {0: Failure(1), 1: Failure(-9)}
    assert D.failure_message(failures, tmp_path, 2) == "rank 1 of 2 failed (killed by SIGKILL)"
    (tmp_path / "rank-1.json").write_text(
        json.dumps({"message": "case 'x': bad label", "collateral": False, "time": 1.0})
    )
    assert D.failure_message({1: Failure(1)}, tmp_path, 4) == (
        "rank 1 of 4 failed (exit code 1): case 'x': bad label"
    )
    # neither wrote a report: the launcher's SIGTERM to the survivor is not the cause
    quiet = tmp_path / "none"
    quiet.mkdir()
    failures = {0: Failure(-signal.SIGTERM), 1: Failure(3)}
    assert D.failure_message(failures, quiet, 2) == "rank 1 of 2 failed (exit code 3)"


# --- on a CUDA GPU (scripts/gpu_check.sh) ---------------------------------------------------


@gpu
@needs_cuda
@pytest.mark.parametrize("method,dims", PRETRAIN_METHODS)
def test_gpu_pretrain_runs_every_method_in_mixed_precision(
    method, dims, tiny_phantom, tiny_phantom_3d, tmp_path
):
    manifest = tiny_phantom_3d if dims == 3 else tiny_phantom
    cfg = PretrainConfig(method=method, profile="smoke", dims=dims, steps=3, device="cuda")
    result = run_pretraining(cfg, manifest, tmp_path / "run", progress=False)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["device"].startswith("cuda") and config["config"]["amp"] is True
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history)
    # a GPU checkpoint resumes on the CPU (tensors map to the CPU; weights_only)
    cfg_cpu = PretrainConfig(method=method, profile="smoke", dims=dims, steps=4, device="cpu")
    run_pretraining(cfg_cpu, manifest, tmp_path / "run", resume=True, progress=False)
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 4


@gpu
@needs_cuda
def test_gpu_finetune_and_sync_batchnorm(tiny_phantom, tmp_path):
    from medssl_kit.train.finetune import FinetuneConfig, finetune

    cfg = FinetuneConfig(profile="smoke", labeled=1, device="cuda")
    result = finetune("scratch", tiny_phantom, cfg, tmp_path / "ft", progress=False)
    assert result.rows and json.loads((tmp_path / "ft" / "config.json").read_text())["device"]
    head = convert_sync_batchnorm(_head().cuda(), torch.device("cuda"))
    assert any(isinstance(m, nn.SyncBatchNorm) for m in head.modules())


@gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_gpu_two_rank_pretraining_with_nccl(tiny_phantom, tmp_path):
    out = tmp_path / "nccl"
    args = ["pretrain", "--method", "simsiam", "--manifest", str(tiny_phantom), "--profile",
            "smoke", "--out", str(out), "--steps", "4", "--set", "batch_size=4",
            "--device", "cuda", "--nproc", "2"]  # fmt: skip
    assert main(args) == 0
    assert load_checkpoint(out / "checkpoint.pt")["world_size"] == 2


# the tiny phantom's 12×48×48 volumes are smaller than the smoke profile's 3D patches
SMALL_VIEWS = {
    "mixcl": ["--dims", "2"],  # UNETR's patches need 16 slices
    "vox2vec": ["--set", "patch_size=[8,32,32]"],
    "hierarchical_dense": ["--set", "patch_size=[8,32,32]"],
}


@pytest.mark.skipif(
    os.environ.get("MEDSSL_DDP_ALL") != "1",
    reason="every method killed and resumed in 2 processes: MEDSSL_DDP_ALL=1 (≈ 4 min on 2 cores)",
)
@pytest.mark.parametrize("method", available_methods())
def test_every_method_runs_and_resumes_in_two_processes(
    method, tiny_phantom, tmp_path, monkeypatch
):
    """Each registered method trains in 2 processes, survives a rank's crash with its last
    checkpoint intact, and resumes to the end (exact equality with an uninterrupted run is
    tested above for one method; this checks that every method's state goes through)."""
    out = tmp_path / method
    monkeypatch.setattr(D, "WORKER_MODULE", "test_distributed")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HERE), *sys.path]))
    monkeypatch.setenv("MEDSSL_TEST_FAIL", "1:3:3")  # rank 1 dies in step 3
    args = ["pretrain", "--method", method, "--manifest", str(tiny_phantom), "--profile",
            "smoke", "--out", str(out), "--steps", "4", "--set", "batch_size=4", "--set",
            "checkpoint_every=2", "--device", "cpu", "--nproc", "2",
            *SMALL_VIEWS.get(method, [])]  # fmt: skip
    assert main(args) == 1
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 2
    monkeypatch.delenv("MEDSSL_TEST_FAIL")
    assert main([*args, "--resume"]) == 0
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["step"] == 4 and ckpt["world_size"] == 2 and len(ckpt["rng_ranks"]) == 2
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4]
    assert (out / "transferable.pt").is_file()


if __name__ == "__main__":  # a worker of the launcher tests (see the module docstring)
    failure = os.environ.get("MEDSSL_TEST_FAIL")
    if failure:
        fail_rank, fail_step, code = (int(x) for x in failure.split(":"))
        method_cls = get_method(sys.argv[sys.argv.index("--method") + 1])
        step_end = method_cls.on_step_end

        def failing(self, step, max_steps):
            if step == fail_step and int(os.environ["RANK"]) == fail_rank:
                os._exit(code)  # a hard crash: no cleanup, no message
            step_end(self, step, max_steps)

        method_cls.on_step_end = failing
    D.exit_process(main(sys.argv[1:]))
