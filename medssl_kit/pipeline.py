"""The reproducible pipeline (DESIGN §7.3, §8): the ordered notebooks, run headlessly by papermill.

``medssl run`` and :func:`run_pipeline` execute, in order,

1. ``data`` — ``00_data_prep``: the profile's phantom (or the given manifest), validated;
2. ``pretrain-<method>`` per method — the method's own notebook (``10`` pixel-global, ``11``
   PCRLv2, ``12`` MixCL on the common 2D ``unet``, with the pipeline's manifest as its pool,
   ``13`` SSMTL / SSMTL+) or ``15_pretrain_baselines`` for the baselines;
3. ``finetune-<init>`` for ``scratch`` and every pre-trained method — ``20_finetune`` over the
   label budgets × seeds;
4. ``compare`` — ``40_compare``: label-efficiency curves, tables, Wilcoxon tests, ``report.html``
   and ``summary.csv``.

Each stage's executed notebook is saved in ``<out>/notebooks/<stage>.ipynb`` (its record: papermill
stores the injected parameters in the notebook's metadata, and ``metadata.medssl_kit`` the stage
and the environment: library versions and git revision), and
``<out>/pipeline.json`` records the plan, each stage's parameters, status, start and end times,
the package and library versions and the git revision. Parameter names are checked against each
notebook's ``parameters`` cell before anything runs. A failing stage stops the pipeline with
:class:`PipelineError` (the stage, its notebook and the first lines of the error); ``resume=True``
skips the completed stages and reruns from the failed one. Results are stored by the stages
themselves (finished fine-tuning runs are read back, killed ones resumed), so a rerun stage
repeats little work.

This module sits on top of the package, beside the CLI; the notebooks do the work in their kernels.
"""

from __future__ import annotations

import json
import platform
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from medssl_kit import __version__
from medssl_kit.atomic import atomic_write_text
from medssl_kit.config import get_profile
from medssl_kit.errors import MedsslError

NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"
KERNEL = "python3"
PIPELINE_FILE = "pipeline.json"

# The notebook that pre-trains each method, and the parameters that select it there.
PRETRAIN_NOTEBOOKS: dict[str, tuple[str, dict[str, Any]]] = {
    "pixel_global": ("10_pretrain_pixel_global.ipynb", {}),
    "pcrlv2": ("11_pretrain_pcrlv2.ipynb", {"dims": 2}),
    "mixcl": ("12_pretrain_mixcl.ipynb", {"dims": 2, "backbone": "unet"}),
    "ssmtl": ("13_pretrain_ssmtl.ipynb", {"variant": "ssmtl"}),
    "ssmtl_plus": ("13_pretrain_ssmtl.ipynb", {"variant": "ssmtl_plus"}),
}
GENERIC_PRETRAIN_NOTEBOOK = "15_pretrain_baselines.ipynb"
LIBRARIES = ("torch", "monai", "numpy", "pandas", "papermill", "nbformat", "plotly", "matplotlib")


class PipelineError(MedsslError):
    """A stage failed, or the pipeline's plan is invalid."""


@dataclass
class Stage:
    """One notebook execution: ``parameters`` are injected by papermill."""

    name: str
    notebook: str
    parameters: dict[str, Any]
    status: str = "pending"  # pending | running | completed | failed
    started: str | None = None
    ended: str | None = None
    seconds: float | None = None
    output: str | None = None  # the executed notebook, relative to the run folder
    error: str | None = None


@dataclass
class PipelineConfig:
    """What ``medssl run`` was asked for. ``None`` budgets and seeds come from the profile."""

    profile: str = "cpu"
    methods: list[str] = field(default_factory=list)
    manifest: str | None = None  # None: the profile's phantom in ``data_dir``
    data_dir: str | None = None  # None: ``data/phantom-<profile>`` under the current directory
    labeled: list[int | float | str] | None = None
    seeds: list[int] | None = None
    steps: int | None = None  # pre-training steps; None: the profile's budget

    def resolved(self) -> PipelineConfig:
        prof = get_profile(self.profile)
        from medssl_kit.methods.registry import available_methods

        known = available_methods()
        unknown = [m for m in self.methods if m not in known]
        if unknown:
            raise PipelineError(
                f"unknown method(s) {', '.join(unknown)}; available: {', '.join(known)}"
            )
        if "scratch" in self.methods:
            raise PipelineError("'scratch' is always run; list only pre-training methods")
        return PipelineConfig(
            profile=prof.name,
            methods=list(dict.fromkeys(self.methods)),
            manifest=str(Path(self.manifest).resolve()) if self.manifest else None,
            data_dir=str(Path(self.data_dir or f"data/phantom-{prof.name}").resolve()),
            labeled=list(self.labeled or prof.finetune.budgets),
            seeds=list(self.seeds or prof.finetune.seeds),
            steps=self.steps,
        )


def plan(cfg: PipelineConfig, out: str | Path) -> list[Stage]:
    """The ordered stages of ``cfg`` (resolved) writing under the run folder ``out``."""
    cfg, out = cfg.resolved(), Path(out).resolve()
    manifest = cfg.manifest or str(Path(cfg.data_dir) / "manifest.json")
    common = {"profile": cfg.profile, "manifest": manifest}
    data = {"profile": cfg.profile, "manifest": cfg.manifest, "phantom_dir": cfg.data_dir}
    stages = [Stage("data", "00_data_prep.ipynb", data)]
    inits = {"scratch": "scratch"}
    for method in cfg.methods:
        notebook, select = PRETRAIN_NOTEBOOKS.get(
            method, (GENERIC_PRETRAIN_NOTEBOOK, {"method": method})
        )
        run_dir = out / "pretrain" / method
        params = {**common, **select, "seed": cfg.seeds[0], "out_dir": str(run_dir)}
        if cfg.steps is not None:
            params["steps"] = cfg.steps
        stages.append(Stage(f"pretrain-{method}", notebook, params))
        inits[method] = str(run_dir)
    for method, init in inits.items():
        params = {
            **common,
            "init": init,
            "labeled": cfg.labeled,
            "seeds": cfg.seeds,
            "out_dir": str(out / "finetune" / method),
        }
        stages.append(Stage(f"finetune-{method}", "20_finetune.ipynb", params))
    compare = {"profile": cfg.profile, "results_dirs": [str(out)], "out_dir": str(out)}
    stages.append(Stage("compare", "40_compare.ipynb", compare))
    return stages


def check_parameters(stages: Sequence[Stage], notebooks_dir: str | Path = NOTEBOOKS_DIR) -> None:
    """Fail before running anything when a stage passes a name its notebook does not declare."""
    import papermill

    problems = []
    for stage in stages:
        path = Path(notebooks_dir) / stage.notebook
        if not path.is_file():
            problems.append(f"stage '{stage.name}': notebook {path} not found")
            continue
        declared = papermill.inspect_notebook(str(path))
        unknown = sorted(set(stage.parameters) - set(declared))
        if unknown:
            problems.append(
                f"stage '{stage.name}': {stage.notebook} has no parameter(s) "
                f"{', '.join(unknown)}; it declares {', '.join(declared)}"
            )
    if problems:
        raise PipelineError("; ".join(problems))


def _git(*args: str) -> str:
    """Output of ``git ARGS`` in the project folder; empty when git or the repository is absent."""
    try:
        done = subprocess.run(
            ["git", *args], cwd=NOTEBOOKS_DIR.parent, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def environment() -> dict[str, Any]:
    """Versions of Python, medssl_kit and the main libraries, and the git revision (if any)."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    revision = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "medssl_kit": __version__,
        "libraries": versions,
        "git_revision": revision or None,
        "git_dirty": bool(dirty) if revision else None,
    }


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _first_lines(text: str, n: int = 6) -> str:
    lines = [line for line in str(text).strip().splitlines() if line.strip()]
    return "\n".join(lines[:n])


def _stage_error(err: Exception) -> str:
    """The error's type and message (papermill's ``ename: evalue``), without the traceback."""
    ename, evalue = getattr(err, "ename", None), getattr(err, "evalue", None)
    if ename is not None:
        return _first_lines(f"{ename}: {evalue}")
    return _first_lines(f"{type(err).__name__}: {err}")


def _execute(stage: Stage, notebooks_dir: Path, output: Path, log_output: bool) -> None:
    import papermill

    papermill.execute_notebook(
        str(notebooks_dir / stage.notebook),
        str(output),
        parameters=stage.parameters,
        kernel_name=KERNEL,
        cwd=str(notebooks_dir),
        log_output=log_output,
        progress_bar=False,
    )


def _stamp(output: Path, stage: Stage, env: dict[str, Any]) -> None:
    """Record the stage and the environment in the executed notebook's metadata."""
    import nbformat

    if not output.is_file():
        return
    nb = nbformat.read(output, as_version=4)
    nb.metadata["medssl_kit"] = {"stage": stage.name, "environment": env}
    atomic_write_text(output, nbformat.writes(nb))


def run_pipeline(
    cfg: PipelineConfig,
    out: str | Path,
    *,
    resume: bool = False,
    notebooks_dir: str | Path = NOTEBOOKS_DIR,
    log_output: bool = True,
    execute: Callable[[Stage, Path, Path, bool], None] = _execute,
) -> list[Stage]:
    """Run every stage of ``plan(cfg, out)`` in order; return the stages with their records.

    ``resume``: continue the run in ``out`` — its stages must be the same (same config), the
    completed ones are skipped. Without it, ``out`` must not hold a pipeline already.
    Raises :class:`PipelineError` naming the failed stage; ``pipeline.json`` is written after
    every stage either way.
    """
    out = Path(out).resolve()
    notebooks_dir = Path(notebooks_dir).resolve()
    stages = plan(cfg, out)
    check_parameters(stages, notebooks_dir)
    record_path = out / PIPELINE_FILE
    if record_path.is_file() and not resume:
        raise PipelineError(
            f"'{out}' already holds a pipeline ({PIPELINE_FILE}); pass --resume to continue it "
            "or choose another --out"
        )
    if resume and record_path.is_file():
        previous = json.loads(record_path.read_text())
        done = {s["name"]: s for s in previous["stages"] if s["status"] == "completed"}
        planned = [[s.name, s.notebook, s.parameters] for s in stages]
        recorded = [[s["name"], s["notebook"], s["parameters"]] for s in previous["stages"]]
        if json.loads(json.dumps(planned)) != recorded:
            raise PipelineError(
                f"'{out}' holds a pipeline with other stages or parameters; resume it with the "
                "same options, or choose another --out"
            )
        for i, stage in enumerate(stages):
            if stage.name in done:
                stages[i] = Stage(**done[stage.name])
        first_started = previous.get("started")
    else:
        first_started = None
    (out / "notebooks").mkdir(parents=True, exist_ok=True)
    env = environment()
    record = {
        "config": asdict(cfg.resolved()),
        "environment": env,
        "started": first_started or _now(),
        "resumed": _now() if first_started else None,
        "ended": None,
        "status": "running",
    }

    def save() -> None:
        record["stages"] = [asdict(s) for s in stages]
        atomic_write_text(record_path, json.dumps(record, indent=2) + "\n")

    for stage in stages:
        if stage.status == "completed":
            continue
        output = out / "notebooks" / f"{stage.name}.ipynb"
        stage.status, stage.started, stage.error = "running", _now(), None
        stage.output = str(output.relative_to(out))
        save()
        start = time.perf_counter()
        try:
            execute(stage, notebooks_dir, output, log_output)
        except Exception as err:  # papermill raises its own errors and the kernel's
            _stamp(output, stage, env)
            stage.status, stage.error = "failed", _stage_error(err)
            stage.ended, stage.seconds = _now(), round(time.perf_counter() - start, 1)
            record["status"], record["ended"] = "failed", _now()
            save()
            raise PipelineError(
                f"stage '{stage.name}' ({stage.notebook}) failed: {stage.error}; its executed "
                f"notebook is {output}; fix the cause and rerun with --resume"
            ) from err
        _stamp(output, stage, env)
        stage.status, stage.ended = "completed", _now()
        stage.seconds = round(time.perf_counter() - start, 1)
        save()
    record["status"], record["ended"] = "completed", _now()
    save()
    return stages
