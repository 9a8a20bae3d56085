"""The papermill pipeline: plan, parameter checks, failure and resume, and one real smoke run."""

from __future__ import annotations

import filecmp
import json
import re
import shutil
from pathlib import Path

import nbformat
import pytest
import torch

from medssl_kit.cli import main
from medssl_kit.data.manifest import load_manifest
from medssl_kit.pipeline import (
    NOTEBOOKS_DIR,
    PipelineConfig,
    PipelineError,
    Stage,
    check_parameters,
    dependencies,
    eta_seconds,
    plan,
    run_pipeline,
)
from medssl_kit.train.finetune import FinetuneConfig, finetune
from medssl_kit.train.pretrain import PretrainConfig, run_pretraining


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
    with pytest.raises(PipelineError, match="unknown pre-training method.*simclr"):
        plan(PipelineConfig(profile="smoke", methods=["simclr"]), tmp_path)
    with pytest.raises(PipelineError, match="'pcrlv3' \\(did you mean 'pcrlv2'\\?\\)"):
        plan(PipelineConfig(profile="smoke", methods=["pcrlv3"]), tmp_path)
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

    def execute(stage, notebooks_dir, output, log_output, threads=None):
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
    """A real papermill run on the tiny phantom, two stages at a time at one thread each: a bad
    manifest stops the first stage with its name; once the manifest exists, --resume runs every
    stage; the run folder holds the executed notebooks, pipeline.json, summary.csv and
    report.html; results are byte-identical to direct runs, one after the other, at one thread."""
    manifest = tmp_path / "data" / "manifest.json"
    out = tmp_path / "run"
    argv = ["run", "--profile", "smoke", "--out", str(out), "--manifest", str(manifest)]
    argv += ["--methods", "simsiam", "--labeled", "1", "--seeds", "0", "--quiet"]
    argv += ["--jobs", "2", "--threads", "1"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "stage 'data' (00_data_prep.ipynb) failed" in err and "--resume" in err

    shutil.copytree(Path(tiny_phantom).parent, manifest.parent)
    assert main([*argv, "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "| simsiam | 1 |" in printed and "report.html" in printed
    assert "These are smoke-profile runs" in printed  # the numbers only prove the pipeline runs

    record = json.loads((out / "pipeline.json").read_text())
    assert (record["jobs"], record["threads_per_job"]) == (2, 1)
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

    # Same profile, seed, inputs and threads: direct runs in this process, one after the other,
    # give the results.csv the pipeline's kernels wrote side by side.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pretrained = tmp_path / "direct" / "simsiam"
        cfg = PretrainConfig(method="simsiam", profile="smoke", seed=0, dims=2)
        run_pretraining(cfg, manifest, pretrained, progress=False)
        tuning, data = FinetuneConfig(profile="smoke", labeled=1, seed=0), load_manifest(manifest)
        for init, source in (("scratch", "scratch"), ("simsiam", str(pretrained))):
            again = tmp_path / "direct" / f"finetune-{init}"
            finetune(source, data, tuning, again)
            ran = out / "finetune" / init / "labeled-1_seed-0" / "results.csv"
            assert filecmp.cmp(again / "results.csv", ran, shallow=False), init
    finally:
        torch.set_num_threads(threads)


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


# --- parallel stages ------------------------------------------------------------------------------


def test_dependencies_and_the_time_left():
    stages = plan(PipelineConfig(profile="smoke", methods=["simsiam", "byol"]), "/tmp/unused")
    needs = dependencies(stages)
    assert needs["data"] == set()
    assert needs["pretrain-simsiam"] == needs["finetune-scratch"] == {"data"}
    assert needs["finetune-byol"] == {"pretrain-byol"}
    assert needs["compare"] == {"finetune-scratch", "finetune-simsiam", "finetune-byol"}
    assert eta_seconds(stages) is None  # nothing timed yet
    for stage, seconds in zip(stages[:3], (10.0, 100.0, 300.0), strict=True):
        stage.status, stage.seconds = "completed", seconds  # data, both pre-trainings
    stages[2].name = "pretrain-byol"  # (the plan's third stage)
    # left: finetune-scratch, -simsiam, -byol (no finetune timed: overall mean 136.7) + compare
    assert eta_seconds(stages) == pytest.approx(4 * (410 / 3))
    stages[3].status, stages[3].seconds = "completed", 50.0  # finetune-scratch
    assert eta_seconds(stages) == pytest.approx(2 * 50 + 460 / 4)
    assert eta_seconds(stages, jobs=2) == pytest.approx((2 * 50 + 460 / 4) / 2)


def _stand_in_notebooks(folder: Path, stages: list[Stage]) -> None:
    """Notebooks under the plan's names that declare the stages' parameters, print the stage,
    its kernel's thread count and a start and end time, and take half a second."""
    for notebook in {s.notebook for s in stages}:
        names = sorted({k for s in stages if s.notebook == notebook for k in s.parameters})
        params = nbformat.v4.new_code_cell("\n".join(f"{k} = None" for k in names))
        params.metadata["tags"] = ["parameters"]
        work = nbformat.v4.new_code_cell(
            "import os, time\n"
            f"print('ran {notebook}', os.environ.get('OMP_NUM_THREADS'), time.time())\n"
            "time.sleep(0.5)\n"
            "print('end', time.time())"
        )
        nb = nbformat.v4.new_notebook(cells=[params, work])
        nb.metadata["kernelspec"] = {
            "name": "python3",
            "display_name": "Python 3",
            "language": "python",
        }
        nbformat.write(nb, folder / notebook)


def test_jobs_run_independent_stages_side_by_side_with_their_threads(tmp_path, capfd):
    cfg = PipelineConfig(profile="smoke", methods=["simsiam", "byol"], seeds=[0])
    (tmp_path / "nb").mkdir()
    _stand_in_notebooks(tmp_path / "nb", plan(cfg, tmp_path / "run"))
    lines: list[str] = []
    stages = run_pipeline(
        cfg, tmp_path / "run", notebooks_dir=tmp_path / "nb", jobs=2, threads=1,
        report=lines.append,
    )  # fmt: skip
    spans = {}
    for stage in stages:
        executed = nbformat.read(tmp_path / "run" / stage.output, as_version=4)
        text = "".join(o.get("text", "") for o in executed.cells[-1].outputs).split()
        assert text[2] == "1"  # the kernel ran with the stage's one thread
        spans[stage.name] = (float(text[3]), float(text[5]))
    needs = dependencies(stages)
    for name, (start, _) in spans.items():  # no stage starts before what it needs has ended
        assert all(spans[need][1] <= start for need in needs[name]), name
    starts = sorted((start, end) for start, end in spans.values())
    assert any(b[0] < a[1] for a, b in zip(starts, starts[1:], strict=False))  # two at a time
    assert len([x for x in lines if x.startswith("start ")]) == len(stages)
    assert any("min left" in x for x in lines if x.startswith("done "))
    record = json.loads((tmp_path / "run" / "pipeline.json").read_text())
    assert (record["jobs"], record["threads_per_job"]) == (2, 1)
    err = capfd.readouterr().err
    assert "[finetune-byol] " in err and "ran 20_finetune.ipynb" in err  # echoed, tagged
    assert "without encryption" not in err  # kernels over IPC, not TCP

    quiet = run_pipeline(cfg, tmp_path / "quiet", notebooks_dir=tmp_path / "nb", log_output=False)
    assert all(s.status == "completed" for s in quiet)
    assert "ran 20_finetune.ipynb" not in capfd.readouterr().err


def test_a_failure_in_parallel_stops_new_stages_and_names_the_stage(tmp_path):
    cfg = PipelineConfig(profile="smoke", methods=["simsiam", "byol"], seeds=[0])
    calls: list[str] = []
    with pytest.raises(PipelineError, match="stage 'pretrain-simsiam'"):
        run_pipeline(cfg, tmp_path / "run", jobs=2, execute=_fake({"pretrain-simsiam"}, calls))
    assert "compare" not in calls and "finetune-simsiam" not in calls
    status = {
        s["name"]: s["status"]
        for s in json.loads((tmp_path / "run" / "pipeline.json").read_text())["stages"]
    }
    assert status["pretrain-simsiam"] == "failed" and status["compare"] == "pending"


def test_the_laptop_profile_compares_every_method_at_one_case_with_scratchs_reference(tmp_path):
    stages = {s.name: s for s in plan(PipelineConfig(profile="laptop"), tmp_path)}
    from medssl_kit.methods.registry import available_methods

    assert {f"pretrain-{m}" for m in available_methods()} <= set(stages)  # every method
    scratch = stages["finetune-scratch"].parameters
    assert (scratch["labeled"], scratch["reference"]) == ([1], ["all"])  # the reference, seed 0
    assert stages["finetune-simsiam"].parameters["labeled"] == [1]
    assert stages["finetune-simsiam"].parameters["seeds"] == [0, 1]
    given = {s.name: s for s in plan(PipelineConfig(profile="laptop", labeled=[2]), tmp_path)}
    assert given["finetune-scratch"].parameters["labeled"] == [2]  # asked for: no reference
    assert "reference" not in given["finetune-scratch"].parameters
    check_parameters(list(stages.values()))  # 20_finetune declares ``reference``
    # the methods' cpu recipes at a fifth of their pre-training steps, the cpu fine-tuning
    # recipe (800 steps: at 400 all labels fell below one case)
    for method in ("pixel_global", "simsiam", "mixcl"):
        laptop = PretrainConfig(method=method, profile="laptop", dims=2).resolved()
        cpu = PretrainConfig(method=method, profile="cpu", dims=2).resolved()
        assert laptop.steps == round(cpu.steps / 5) and laptop.crop_size == cpu.crop_size
        assert laptop.backbone_kwargs == cpu.backbone_kwargs
    assert PretrainConfig(method="simsiam", profile="laptop", steps=7).resolved().steps == 7
    laptop_ft = FinetuneConfig(profile="laptop").resolved()
    assert (laptop_ft.steps, laptop_ft.lr) == (FinetuneConfig(profile="cpu").resolved().steps, 3e-3)
    assert (laptop_ft.steps, laptop_ft.val_every) == (800, 800)  # validated once, at the end
