"""Fine-tuning harness: label budgets, run folder, transfer, probe, classify, export."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from monai.networks.nets import BasicUNet

from medssl_kit.cli import main
from medssl_kit.data.manifest import load_manifest
from medssl_kit.errors import MedsslError
from medssl_kit.evaluate.metrics import auroc
from medssl_kit.methods.registry import available_methods, get_method
from medssl_kit.models.export import KeyReport
from medssl_kit.models.registry import build_backbone
from medssl_kit.train import finetune as finetune_module
from medssl_kit.train.checkpoint import load_checkpoint
from medssl_kit.train.finetune import (
    FinetuneConfig,
    _param_groups,
    choose_labeled_cases,
    finetune,
    label_budget_cases,
    run_budgets,
)
from medssl_kit.train.pretrain import PretrainConfig
from medssl_kit.train.transfer import (
    check_transferable_fits,
    load_transferable,
    read_transferable,
    save_transferable,
)

FAST = dict(profile="smoke", steps=4, val_every=2, checkpoint_every=2, batch_size=2)


def test_label_budgets_are_seeded_and_nested(tiny_phantom):
    manifest = load_manifest(tiny_phantom)
    train = [c.id for c in manifest.split("train")]
    one, two, every = (choose_labeled_cases(manifest, n, seed=5) for n in (1, 2, "all"))
    assert len(one) == 1 and len(two) == 2 and sorted(every) == sorted(train)
    assert two[:1] == one and every[:2] == two  # budgets of one seed are nested
    assert choose_labeled_cases(manifest, 2, seed=5) == two
    draws = {tuple(choose_labeled_cases(manifest, 1, seed=s)) for s in range(10)}
    assert len(draws) > 1  # the seed picks the cases
    assert len(choose_labeled_cases(manifest, 0.5, seed=0)) == 2  # round(0.5 * 3)
    with pytest.raises(MedsslError, match="exceeds"):
        choose_labeled_cases(manifest, 4, seed=0)
    with pytest.raises(MedsslError, match="budget"):
        choose_labeled_cases(manifest, -1, seed=0)


def test_budgets_selecting_the_same_cases_are_fine_tuned_once(tiny_phantom, tmp_path, monkeypatch):
    """With 3 labelled train cases, 1 and 0.34 select one case, 3 and "all" three: one run each,
    under the first budget named, with a note naming the merged budgets."""
    manifest = load_manifest(tiny_phantom)
    budgets = [1, 2, 3, "all", 0.34]
    assert label_budget_cases(manifest, budgets) == {1: 1, 2: 2, 3: 3, "all": 3, 0.34: 1}
    calls = []

    def fake_finetune(init, manifest, cfg, out_dir, **kw):
        calls.append((cfg.labeled, cfg.seed, Path(out_dir).name))
        return cfg.labeled

    monkeypatch.setattr(finetune_module, "finetune", fake_finetune)
    notes = []
    cfg = FinetuneConfig(**FAST)
    results = run_budgets("scratch", manifest, cfg, tmp_path, budgets, [0, 1], note=notes.append)
    assert calls == [(b, s, f"labeled-{b}_seed-{s}") for b in (1, 2, 3) for s in (0, 1)]
    assert results == [1, 1, 2, 2, 3, 3]
    assert notes == [
        "label budgets 1 and 0.34 both select 1 labelled 'train' case: fine-tuned once, as "
        "budget 1",
        "label budgets 3 and 'all' both select 3 labelled 'train' cases: fine-tuned once, as "
        "budget 3",
    ]
    calls.clear()
    run_budgets("scratch", manifest, cfg, tmp_path, [2, 1], [0], note=notes.append)
    assert calls == [(2, 0, "labeled-2_seed-0"), (1, 0, "labeled-1_seed-0")] and len(notes) == 2
    with pytest.raises(MedsslError, match="exceeds the 3 labelled train cases"):
        run_budgets("scratch", manifest, cfg, tmp_path, [1, 4], [0], note=notes.append)
    assert len(calls) == 2  # nothing ran: every budget is checked before the first run
    # reference budgets run at the first seed only, unless they select a compared budget's cases
    calls.clear()
    run_budgets("scratch", manifest, cfg, tmp_path, [1], [0, 1], reference=["all"])
    assert calls == [(1, 0, "labeled-1_seed-0"), (1, 1, "labeled-1_seed-1")] + [
        ("all", 0, "labeled-all_seed-0")
    ]
    calls.clear()
    notes.clear()
    run_budgets(
        "scratch", manifest, cfg, tmp_path, [3], [0, 1], reference=["all"], note=notes.append
    )
    assert calls == [(3, 0, "labeled-3_seed-0"), (3, 1, "labeled-3_seed-1")]
    assert notes and "3 and 'all' both select 3" in notes[0]


def test_training_on_the_pretrain_split_labels(tiny_phantom, tmp_path):
    """``train_split="pretrain"``: a supervised start on the pre-training pool's labels."""
    manifest = load_manifest(tiny_phantom)
    pool = {c.id for c in manifest.split("pretrain")}
    assert set(choose_labeled_cases(manifest, "all", seed=0, split="pretrain")) == pool
    with pytest.raises(MedsslError, match="exceeds the 2 labelled pretrain cases"):
        choose_labeled_cases(manifest, 3, seed=0, split="pretrain")
    cfg = FinetuneConfig(labeled="all", train_split="pretrain", **FAST)
    result = finetune("scratch", tiny_phantom, cfg, tmp_path / "sup", progress=False)
    config = json.loads((result.run_dir / "config.json").read_text())
    assert set(config["labeled_cases"]) == pool and result.summary["labeled"] == len(pool)
    assert config["threads"] == torch.get_num_threads()
    assert config["cpu_kernels"] == torch.backends.cpu.get_cpu_capability()
    assert result.summary["method"] == read_transferable(result.run_dir)["method"] == "supervised"
    assert set(pd.read_csv(result.run_dir / "results.csv")["case"]) == {
        c.id for c in manifest.split("test")
    }
    for held_out in ("val", "test"):
        with pytest.raises(MedsslError, match="train_split"):
            FinetuneConfig(profile="smoke", train_split=held_out).resolved()


@pytest.fixture(scope="module")
def scratch_run(tiny_phantom, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "scratch"
    result = finetune(
        "scratch", tiny_phantom, FinetuneConfig(labeled=1, seed=0, **FAST), out, progress=False
    )
    return result


def test_scratch_run_writes_the_run_folder(scratch_run, tiny_phantom):
    run = scratch_run.run_dir
    manifest = load_manifest(tiny_phantom)
    config = json.loads((run / "config.json").read_text())
    assert config["method"] == "scratch" and len(config["labeled_cases"]) == 1
    assert config["labeled_cases"][0] in {c.id for c in manifest.split("train")}
    df = pd.read_csv(run / "results.csv")
    tests = {c.id for c in manifest.split("test")}
    assert set(df["case"]) == tests
    assert len(df) == len(tests) * len(manifest.foreground_classes)
    assert {"method", "backbone", "dims", "labeled", "seed", "dice", "hd95", "iou"} <= set(df)
    assert (df["labeled"] == 1).all() and (df["method"] == "scratch").all()
    assert df["dice"].dropna().between(0, 1).all()
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in log if "val_score" in r] == [2, 4]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps_run"] == 4 and summary["best_step"] in (2, 4)
    assert 0 <= summary["organ_dice"] <= 1
    header = read_transferable(run)
    assert header["method"] == "scratch" and header["backbone"]["name"] == "unet"


def test_existing_run_folder_is_not_overwritten(scratch_run, tiny_phantom):
    before = (scratch_run.run_dir / "results.csv").read_bytes()
    with pytest.raises(MedsslError, match="resume"):
        finetune("scratch", tiny_phantom, FinetuneConfig(**FAST), scratch_run.run_dir)
    assert (scratch_run.run_dir / "results.csv").read_bytes() == before


def test_transferable_weights_round_trip_and_report(tmp_path):
    src = build_backbone("unet", 2, 1, 8, channels=(8, 16, 32, 64, 128))
    save_transferable(
        tmp_path / "transferable.pt", src, method="demo", state_dict=src.encoder_state_dict()
    )
    dst = build_backbone("unet", 2, 1, 8, channels=(8, 16, 32, 64, 128))
    report = load_transferable(dst, tmp_path)
    assert report.matched and all(k.startswith("encoder.") for k in report.matched)
    assert report.missing and all(not k.startswith("encoder.") for k in report.missing)
    for key in report.matched:
        assert torch.equal(dst.state_dict()[key], src.state_dict()[key])
    other = build_backbone("fpn", 2, 1, 8, n_levels=3, base_channels=8)
    with pytest.raises(MedsslError, match="no weight"):
        load_transferable(other, tmp_path)


def test_init_from_run_reports_keys_and_rejects_another_backbone(
    scratch_run, tiny_phantom, tmp_path
):
    result = finetune(
        scratch_run.run_dir, tiny_phantom, FinetuneConfig(**FAST), tmp_path / "ft", progress=False
    )
    assert result.key_report.complete  # the same backbone: every key loaded
    assert result.summary["method"] == "scratch"
    with pytest.raises(MedsslError, match="backbone"):
        finetune(
            scratch_run.run_dir,
            tiny_phantom,
            FinetuneConfig(backbone="fpn", **FAST),
            tmp_path / "fpn",
            progress=False,
        )


@pytest.mark.parametrize("profile", ["smoke", "laptop", "cpu", "gpu"])
@pytest.mark.parametrize("backbone", ["unet", "resunet"])
def test_every_method_pre_trains_the_network_fine_tuning_builds(profile, backbone):
    # scratch and every pre-trained start are one network: each method's pre-training network,
    # at every profile and backbone, passes the check fine-tuning applies to an init
    built: dict[tuple, dict] = {}

    def config(name: str, dims: int, kwargs: dict) -> dict:
        key = (name, dims, repr(sorted(kwargs.items())))
        if key not in built:
            built[key] = build_backbone(name, dims, 1, 8, **kwargs).config
        return built[key]

    ours = [n for n in available_methods() if get_method(n).__module__.startswith("medssl_kit.")]
    for name in ours:  # not the toy methods other tests register
        dims = get_method(name).spatial_dims[0]
        ft = FinetuneConfig(profile=profile, backbone=backbone, dims=dims).resolved()
        pre = PretrainConfig(method=name, profile=profile, backbone=backbone, dims=dims).resolved()
        own = config(backbone, dims, ft.backbone_kwargs)
        header = {"backbone": config(pre.backbone, dims, pre.backbone_kwargs)}
        check_transferable_fits(header, own, f"{name} at {profile}")
    assert len(ours) >= 8


def test_an_init_of_another_network_is_refused_unless_asked_for(tiny_phantom, tmp_path):
    src = build_backbone("unet", 2, 1, 8, channels=(4, 8, 8, 8, 8))
    save_transferable(tmp_path / "pre" / "transferable.pt", src, method="demo")
    with pytest.raises(MedsslError, match=r"channels=\[4, 8, 8, 8, 8\].*channels=\[8, 16, 32"):
        finetune(tmp_path / "pre", tiny_phantom, FinetuneConfig(**FAST), tmp_path / "a")
    assert not (tmp_path / "a" / "results.csv").exists()
    other = build_backbone("unet", 2, 1, 8, channels=(8, 16, 32, 64, 128), norm="instance")
    save_transferable(tmp_path / "inst" / "transferable.pt", other, method="demo")
    with pytest.raises(MedsslError, match="norm='instance'.*norm='batch'"):
        finetune(tmp_path / "inst", tiny_phantom, FinetuneConfig(**FAST), tmp_path / "b")

    # asked for: scratch (and the init) built like the init's run, and the method name says so
    like = FinetuneConfig(architecture_from=str(tmp_path / "pre"), **FAST)
    for init, name in (("scratch", "scratch"), (tmp_path / "pre", "demo")):
        result = finetune(init, tiny_phantom, like, tmp_path / f"like-{name}", progress=False)
        config = json.loads((result.run_dir / "config.json").read_text())
        assert config["backbone"]["channels"] == [4, 8, 8, 8, 8]
        assert result.summary["method"] == f"{name} [demo's network]"
        assert set(pd.read_csv(result.run_dir / "results.csv")["method"]) == {
            result.summary["method"]
        }


def test_pretraining_dropout_is_not_carried_into_fine_tuning(tiny_phantom, tmp_path):
    # A method that pre-trains with decoder dropout (pixel_global's MC dropout) is fine-tuned in
    # the same dropout-free architecture as scratch, unless fine-tuning asks for dropout.
    src = build_backbone("unet", 2, 1, 8, channels=(8, 16, 32, 64, 128), dropout=0.3)
    save_transferable(tmp_path / "pre" / "transferable.pt", src, method="demo")
    plain = finetune(tmp_path / "pre", tiny_phantom, FinetuneConfig(**FAST), tmp_path / "a")
    assert plain.key_report.complete
    built = json.loads((plain.run_dir / "config.json").read_text())["backbone"]
    assert built.get("dropout", 0.0) == 0.0
    assert built["channels"] == [8, 16, 32, 64, 128]  # the pre-trained widths are kept
    cfg = FinetuneConfig(backbone_kwargs={"dropout": 0.2}, **FAST)
    asked = finetune(tmp_path / "pre", tiny_phantom, cfg, tmp_path / "b")
    assert json.loads((asked.run_dir / "config.json").read_text())["backbone"]["dropout"] == 0.2


def test_probe_trains_only_the_head(scratch_run, tiny_phantom, tmp_path):
    result = finetune(
        scratch_run.run_dir,
        tiny_phantom,
        FinetuneConfig(mode="probe", **FAST),
        tmp_path / "probe",
        progress=False,
    )
    before = read_transferable(scratch_run.run_dir)["state_dict"]
    after = read_transferable(result.run_dir)["state_dict"]
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("head.") for k in changed)  # BN statistics included


def test_classify_mode_reports_auroc(tiny_phantom, tmp_path):
    # kidneys lie in the middle slices only: both classes occur in every case
    cfg = FinetuneConfig(mode="classify", target_class="kidney_left", **FAST)
    result = finetune("scratch", tiny_phantom, cfg, tmp_path / "cls", progress=False)
    pred = pd.read_csv(result.run_dir / "predictions.csv")
    assert len(pred) == result.summary["test_slices"] > 0
    assert pred["score"].between(0, 1).all()
    assert set(pred["target"]) <= {0, 1}
    assert result.summary["positive_slices"] == int(pred["target"].sum())
    assert not (result.run_dir / "results.csv").exists()
    assert pred["target"].nunique() == 2 and 0 <= result.summary["auroc"] <= 1
    # the file keeps every score distinct that the run saw: its AUROC is the summary's
    assert auroc(pred["score"].to_numpy(), pred["target"].to_numpy()) == pytest.approx(
        result.summary["auroc"], abs=1e-9
    )


def test_classify_needs_positive_and_negative_slices(tiny_phantom, tmp_path):
    manifest = load_manifest(tiny_phantom)
    cfg = FinetuneConfig(mode="classify", target_class="vertebra", **FAST)  # in every slice
    with pytest.raises(MedsslError, match="with and without 'vertebra'"):
        finetune("scratch", manifest, cfg, tmp_path / "v", progress=False)
    with pytest.raises(MedsslError, match="no class named 'pancreas'"):
        finetune(
            "scratch",
            manifest,
            FinetuneConfig(mode="classify", target_class="pancreas", **FAST),
            tmp_path / "p",
            progress=False,
        )


def test_export_loads_into_monai_basic_unet(scratch_run, tmp_path, capsys):
    out = tmp_path / "unet.pt"
    assert main(["export", str(scratch_run.run_dir), "--to", "monai-unet", "--out", str(out)]) == 0
    assert "BasicUNet" in capsys.readouterr().out
    ckpt = load_checkpoint(out)
    assert ckpt["missing"] == []
    net = BasicUNet(**ckpt["kwargs"])
    net.load_state_dict(ckpt["state_dict"], strict=True)
    ours = build_backbone(**{**read_transferable(scratch_run.run_dir)["backbone"]})
    ours.load_state_dict(read_transferable(scratch_run.run_dir)["state_dict"])
    x = torch.randn(2, 1, 48, 48)
    with torch.no_grad():
        assert torch.allclose(net.eval()(x), ours.eval()(x), atol=1e-5)


def test_cli_finetune_prints_summary_and_fails_cleanly(tiny_phantom, tmp_path, capsys):
    out = tmp_path / "cli"
    args = [
        "finetune",
        "--manifest",
        str(tiny_phantom),
        "--profile",
        "smoke",
        "--labeled",
        "1",
        "--out",
        str(out),
        "--steps",
        "2",
        "--set",
        "val_every=2",
        "--set",
        "batch_size=2",
    ]
    assert main(args) == 0
    assert "organ_dice=" in capsys.readouterr().out
    assert main(args) == 1  # the folder holds a run now
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "resume" in err and "Traceback" not in err
    assert main([*args[:-4], "--set", "nonsense=1"]) == 2
    assert "unknown setting" in capsys.readouterr().err


def test_encoder_only_transfer_leaves_the_decoder_random(scratch_run, tiny_phantom, tmp_path):
    src = read_transferable(scratch_run.run_dir)["state_dict"]
    backbone = build_backbone(**read_transferable(scratch_run.run_dir)["backbone"])
    report = load_transferable(backbone, scratch_run.run_dir, encoder_only=True)
    assert report.matched and all(k.startswith("encoder.") for k in report.matched)
    assert any(k.startswith("decoder.") for k in report.missing)
    state = backbone.state_dict()
    assert all(torch.equal(state[k], src[k]) for k in report.matched)
    result = finetune(scratch_run.run_dir, tiny_phantom,
                      FinetuneConfig(transfer="encoder", **FAST), tmp_path / "enc",
                      progress=False)  # fmt: skip
    assert not result.key_report.complete and result.key_report.matched == report.matched
    with pytest.raises(MedsslError, match="transfer"):
        finetune("scratch", tiny_phantom, FinetuneConfig(transfer="decoder", **FAST),
                 tmp_path / "bad", progress=False)  # fmt: skip


def test_pretrained_lr_scale_slows_or_freezes_only_the_loaded_weights(
    scratch_run, tiny_phantom, tmp_path
):
    # Adam's first step moves every weight with a non-negligible gradient by exactly its rate,
    # so one step shows the rate the loaded (encoder) weights trained at.
    before = read_transferable(scratch_run.run_dir)["state_dict"]
    one_step = dict(FAST, steps=1, val_every=1, checkpoint_every=1)
    lr = FinetuneConfig(**one_step).resolved().lr
    for scale in (1.0, 0.1, 0.0):
        cfg = FinetuneConfig(transfer="encoder", pretrained_lr_scale=scale, **one_step)
        run = finetune(scratch_run.run_dir, tiny_phantom, cfg, tmp_path / f"s{scale}",
                       progress=False)  # fmt: skip
        after = read_transferable(run.run_dir)["state_dict"]
        weights = [k for k in run.key_report.matched if k.endswith((".weight", ".bias"))]
        moved = max((after[k] - before[k]).abs().max().item() for k in weights)
        assert moved == pytest.approx(scale * lr, rel=0.02, abs=1e-12)
    with pytest.raises(MedsslError, match="pretrained_lr_scale"):
        finetune("scratch", tiny_phantom, FinetuneConfig(pretrained_lr_scale=-1, **FAST),
                 tmp_path / "bad", progress=False)  # fmt: skip


def test_pretrained_lr_scale_groups_loaded_and_fresh_parameters():
    backbone = build_backbone("unet", 2, 1, 3, channels=(4, 8, 16, 32, 64))
    names = [n for n, _ in backbone.named_parameters()]
    loaded = [n for n in names if n.startswith("encoder.")]
    report = KeyReport(matched=loaded)
    cfg = FinetuneConfig(lr=1e-2, pretrained_lr_scale=0.25)
    fresh, slow = _param_groups(backbone, report, cfg)
    params = dict(backbone.named_parameters())
    assert {id(p) for p in slow["params"]} == {id(params[n]) for n in loaded}
    assert slow["lr"] == pytest.approx(2.5e-3) and "lr" not in fresh  # fresh: the base rate
    assert len(fresh["params"]) == len(names) - len(loaded)
    assert len(_param_groups(backbone, None, cfg)) == 1  # scratch: nothing was loaded


def _logged_rates(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["lr"] for r in map(json.loads, lines) if "lr" in r]


def test_warmup_ramps_the_rate_then_decays_and_resumes_on_schedule(
    tiny_phantom, tmp_path, monkeypatch
):
    cfg = FinetuneConfig(**dict(FAST, steps=6, warmup_steps=3))
    lr = cfg.resolved().lr
    whole = finetune("scratch", tiny_phantom, cfg, tmp_path / "whole", progress=False)
    # Each logged rate is the one the next step trains at: steps 1-3 at lr/3, 2lr/3, lr, then
    # poly decay from lr over the last three steps.
    expected = [2 * lr / 3, lr, lr, lr * (2 / 3) ** 0.9, lr * (1 / 3) ** 0.9, 0.0]
    assert _logged_rates(whole.run_dir) == pytest.approx(expected, abs=1e-12)

    original = finetune_module.save_checkpoint

    def crash_after_step_2(path, payload):
        original(path, payload)
        if payload["state"]["step"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(finetune_module, "save_checkpoint", crash_after_step_2)
    with pytest.raises(KeyboardInterrupt):
        finetune("scratch", tiny_phantom, cfg, tmp_path / "cut", progress=False)
    monkeypatch.setattr(finetune_module, "save_checkpoint", original)
    cut = finetune("scratch", tiny_phantom, cfg, tmp_path / "cut", resume=True, progress=False)
    assert _logged_rates(cut.run_dir) == _logged_rates(whole.run_dir)
    a, b = (read_transferable(r.run_dir)["state_dict"] for r in (whole, cut))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(MedsslError, match="warmup_steps"):
        FinetuneConfig(**dict(FAST, warmup_steps=4)).resolved()  # FAST trains 4 steps
