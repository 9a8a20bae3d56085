"""The papermill pipeline: plan, parameter checks, failure and resume, and one real smoke run."""

from __future__ import annotations

import filecmp
import json
import re
import shutil
from pathlib import Path

import nbformat
import pytest

from medssl_kit.cli import main
from medssl_kit.data.manifest import load_manifest
from medssl_kit.pipeline import (
    NOTEBOOKS_DIR,
    PipelineConfig,
    PipelineError,
    Stage,
    check_parameters,
    plan,
    run_pipeline,
)
from medssl_kit.train.finetune import FinetuneConfig, finetune


def test_plan_orders_data_pretraining_finetuning_compare(tmp_path):
    cfg = PipelineConfig(profile="smoke", methods=["simsiam", "pixel_global"], seeds=[0, 1])
    stages = plan(cfg, tmp_path / "run")
    assert [s.name for s in stages] == [
        "data",
        "pretrain-simsiam",
        "pretrain-pixel_global",
        "finetune-scratch",
        "finetune-simsiam",
        "finetune-pixel_global",
        "compare",
    ]
    by_name = {s.name: s for s in stages}
    assert by_name["pretrain-simsiam"].notebook == "15_pretrain_baselines.ipynb"
    assert by_name["pretrain-simsiam"].parameters["method"] == "simsiam"
    assert by_name["pretrain-pixel_global"].notebook == "10_pretrain_pixel_global.ipynb"
    run = (tmp_path / "run").resolve()
    assert by_name["finetune-pixel_global"].parameters["init"] == str(run / "pretrain/pixel_global")
    assert by_name["finetune-scratch"].parameters["labeled"] == [1, "all"]  # smoke budgets
    assert by_name["finetune-scratch"].parameters["seeds"] == [0, 1]
    check_parameters(stages)  # every name is declared by its notebook


def test_budgets_and_seeds_default_to_the_profile(tmp_path):
    smoke = {s.name: s for s in plan(PipelineConfig(profile="smoke"), tmp_path / "a")}
    assert smoke["finetune-scratch"].parameters["seeds"] == [0]  # one seed keeps smoke short
    cpu = {s.name: s for s in plan(PipelineConfig(profile="cpu"), tmp_path / "b")}
    assert cpu["finetune-scratch"].parameters["labeled"] == [1, 2, 4, "all"]
    assert cpu["finetune-scratch"].parameters["seeds"] == [0, 1, 2]


def test_unknown_method_and_scratch_are_refused(tmp_path):
    with pytest.raises(PipelineError, match="unknown method.*simclr"):
        plan(PipelineConfig(profile="smoke", methods=["simclr"]), tmp_path)
    with pytest.raises(PipelineError, match="scratch"):
        plan(PipelineConfig(profile="smoke", methods=["scratch"]), tmp_path)


def test_a_parameter_typo_fails_before_anything_runs():
    stages = [Stage("finetune-x", "20_finetune.ipynb", {"init": "scratch", "seed": [0]})]
    with pytest.raises(PipelineError, match=r"stage 'finetune-x'.*no parameter\(s\) seed"):
        check_parameters(stages)
    with pytest.raises(PipelineError, match="not found"):
        check_parameters([Stage("x", "99_missing.ipynb", {})])


def _fake(fail_on: set[str], calls: list[str]):
    """An ``execute`` that records the stage and writes the output, failing on request."""

    def execute(stage, notebooks_dir, output, log_output):
        calls.append(stage.name)
        if stage.name in fail_on:
            raise RuntimeError("boom: the first line\nsecond line\n" + "x\n" * 20)
        Path(output).write_text(nbformat.writes(nbformat.v4.new_notebook()))

    return execute


def test_failure_stops_and_resume_reruns_from_the_failed_stage(tmp_path):
    cfg = PipelineConfig(profile="smoke", methods=["simsiam"], seeds=[0])
    out = tmp_path / "run"
    calls: list[str] = []
    with pytest.raises(PipelineError, match=r"stage 'finetune-scratch'.*boom: the first line"):
        run_pipeline(cfg, out, execute=_fake({"finetune-scratch"}, calls))
    assert calls == ["data", "pretrain-simsiam", "finetune-scratch"]
    record = json.loads((out / "pipeline.json").read_text())
    status = {s["name"]: s["status"] for s in record["stages"]}
    assert record["status"] == "failed"
    assert status["pretrain-simsiam"] == "completed" and status["finetune-scratch"] == "failed"
    assert status["compare"] == "pending"
    failed = next(s for s in record["stages"] if s["name"] == "finetune-scratch")
    assert failed["error"].startswith("RuntimeError: boom") and len(failed["error"]) < 200

    with pytest.raises(PipelineError, match="already holds a pipeline"):
        run_pipeline(cfg, out, execute=_fake(set(), calls))
    other = PipelineConfig(profile="smoke", methods=["byol"], seeds=[0])
    with pytest.raises(PipelineError, match="other stages or parameters"):
        run_pipeline(other, out, resume=True, execute=_fake(set(), calls))

    calls.clear()
    stages = run_pipeline(cfg, out, resume=True, execute=_fake(set(), calls))
    assert calls == ["finetune-scratch", "finetune-simsiam", "compare"]
    assert all(s.status == "completed" and s.seconds is not None for s in stages)
    record = json.loads((out / "pipeline.json").read_text())
    assert record["status"] == "completed"
    assert record["environment"]["libraries"]["torch"] and record["environment"]["python"]
    if (NOTEBOOKS_DIR.parent / ".git").exists():  # a checkout records its revision
        assert re.fullmatch(r"[0-9a-f]{40}", record["environment"]["git_revision"])
    assert record["config"]["profile"] == "smoke" and record["config"]["methods"] == ["simsiam"]
    stamped = nbformat.read(out / "notebooks" / "compare.ipynb", as_version=4)
    assert stamped.metadata["medssl_kit"]["stage"] == "compare"


def test_medssl_run_smoke_end_to_end(tiny_phantom, tmp_path, capsys):
    """A real papermill run on the tiny phantom: a bad manifest stops the first stage with its
    name; once the manifest exists, --resume runs every stage; the run folder holds the executed
    notebooks, pipeline.json, summary.csv and report.html; results match a direct run."""
    manifest = tmp_path / "data" / "manifest.json"
    out = tmp_path / "run"
    argv = ["run", "--profile", "smoke", "--out", str(out), "--manifest", str(manifest)]
    argv += ["--methods", "simsiam", "--labeled", "1", "--seeds", "0", "--quiet"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "stage 'data' (00_data_prep.ipynb) failed" in err and "--resume" in err

    shutil.copytree(Path(tiny_phantom).parent, manifest.parent)
    assert main([*argv, "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "| simsiam | 1 |" in printed and "report.html" in printed

    record = json.loads((out / "pipeline.json").read_text())
    names = ["data", "pretrain-simsiam", "finetune-scratch", "finetune-simsiam", "compare"]
    assert [s["name"] for s in record["stages"]] == names
    assert all(s["status"] == "completed" for s in record["stages"])
    for name in names:
        executed = json.loads((out / "notebooks" / f"{name}.ipynb").read_text())
        injected = executed["metadata"]["papermill"]["parameters"]
        assert injected == next(s for s in record["stages"] if s["name"] == name)["parameters"]
        stamp = executed["metadata"]["medssl_kit"]
        assert stamp["stage"] == name and stamp["environment"] == record["environment"]
    summary = (out / "summary.csv").read_text().splitlines()
    assert summary[0].startswith("method,labeled,organ_dice") and len(summary) == 3
    report = (out / "report.html").read_text()
    assert "scratch" in report and "simsiam" in report and "<table" in report

    # Same profile, seed and inputs: the direct run gives the identical results.csv.
    again = tmp_path / "again"
    cfg = FinetuneConfig(profile="smoke", labeled=1, seed=0)
    finetune("scratch", load_manifest(manifest), cfg, again)
    pipeline_run = out / "finetune" / "scratch" / "labeled-1_seed-0"
    assert filecmp.cmp(again / "results.csv", pipeline_run / "results.csv", shallow=False)


def test_mixcl_pre_trains_in_its_notebook_on_the_common_2d_unet(tmp_path):
    stages = {s.name: s for s in plan(PipelineConfig(profile="smoke", methods=["mixcl"]), tmp_path)}
    stage = stages["pretrain-mixcl"]
    assert stage.notebook == "12_pretrain_mixcl.ipynb"
    assert (stage.parameters["dims"], stage.parameters["backbone"]) == (2, "unet")
    assert stage.parameters["manifest"] == stages["finetune-scratch"].parameters["manifest"]
    check_parameters(list(stages.values()))


def test_notebooks_dir_holds_every_planned_notebook():
    methods = ["pixel_global", "pcrlv2", "mixcl", "ssmtl", "mocov2"]
    cfg = PipelineConfig(profile="smoke", methods=methods)
    for stage in plan(cfg, "/tmp/unused"):
        assert (NOTEBOOKS_DIR / stage.notebook).is_file(), stage.notebook
