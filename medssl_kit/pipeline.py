"""The reproducible pipeline (DESIGN §7.3, §8): the ordered notebooks, run headlessly by papermill.

``medssl run`` and :func:`run_pipeline` execute, in order,

1. ``data`` — ``00_data_prep``: the profile's phantom (or the given manifest), validated;
2. ``pretrain-<method>`` per method — the method's own notebook (``10`` pixel-global, ``11``
   PCRLv2, ``12`` MixCL on the common 2D ``unet``, with the pipeline's manifest as its pool,
   ``13`` SSMTL / SSMTL+, ``14`` vox2vec / hierarchical dense SSL on the common 2D ``unet``) or
   ``15_pretrain_baselines`` for the baselines;
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

``jobs`` > 1 runs independent stages side by side, each kernel with ``threads`` CPU threads
(``OMP_NUM_THREADS``; default: the cores shared out): the pre-training of different methods, and
the fine-tuning of different inits, each once its pre-training is done (:func:`dependencies`).
A run's numbers depend on its thread count, not on what runs beside it, so ``jobs`` 2 at 1
thread gives the results of ``jobs`` 1 at 1 thread. Kernels talk to papermill over IPC (local
sockets), not TCP. Progress — each stage's start and end and an estimate of the time left from
the stages already timed — goes to ``report`` (the CLI prints it).

This module sits on top of the package, beside the CLI; the notebooks do the work in their kernels.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
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
    # on the common 2D unet (its decoder maps as the pyramid), as every stage is fine-tuned
    "vox2vec": (
        "14_pretrain_hierarchical_dense.ipynb",
        {"method": "vox2vec", "dims": 2, "backbone": "unet"},
    ),
    "hierarchical_dense": (
        "14_pretrain_hierarchical_dense.ipynb",
        {"method": "hierarchical_dense", "dims": 2, "backbone": "unet"},
    ),
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
    """What ``medssl run`` was asked for. ``None`` budgets and seeds come from the profile,
    ``None`` methods are every registered method (an empty list: scratch alone)."""

    profile: str = "cpu"
    methods: list[str] | None = None
    manifest: str | None = None  # None: the profile's phantom in ``data_dir``
    data_dir: str | None = None  # None: ``data/phantom-<profile>`` under the current directory
    labeled: list[int | float | str] | None = None
    seeds: list[int] | None = None
    steps: int | None = None  # pre-training steps; None: the profile's budget
    # budgets scratch runs besides ``labeled``, at the first seed (a mark of what the data
    # allows, not a compared arm); None: the profile's reference budgets when ``labeled`` is the
    # profile's, none when it was given
    reference: list[int | float | str] | None = None

    def resolved(self) -> PipelineConfig:
        prof = get_profile(self.profile)
        from medssl_kit.methods.registry import available_methods, unknown_methods_message

        known = available_methods()
        methods = known if self.methods is None else list(self.methods)
        unknown = [m for m in methods if m not in known]
        if unknown:
            raise PipelineError(unknown_methods_message(unknown))
        if "scratch" in methods:
            raise PipelineError("'scratch' is always run; list only pre-training methods")
        return PipelineConfig(
            profile=prof.name,
            methods=list(dict.fromkeys(methods)),
            manifest=str(Path(self.manifest).resolve()) if self.manifest else None,
            data_dir=str(Path(self.data_dir or f"data/phantom-{prof.name}").resolve()),
            labeled=list(self.labeled or prof.finetune.budgets),
            seeds=list(self.seeds or prof.finetune.seeds),
            steps=self.steps,
            reference=list(
                self.reference
                if self.reference is not None
                else ([] if self.labeled else prof.finetune.reference_budgets)
            ),
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
        extra = [b for b in cfg.reference if b not in cfg.labeled] if method == "scratch" else []
        if extra:
            params["reference"] = extra
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


def _kernel_manager(threads: int | None) -> type:
    """A kernel manager whose kernels listen on IPC sockets (not TCP: no unencrypted-TCP warning,
    nothing on the network) and, with ``threads``, use that many CPU threads."""
    from jupyter_client.manager import AsyncKernelManager

    class StageKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.transport = "ipc"
            # a socket path of its own (the default derives it from a connection file that may
            # not be named yet, and kernels started side by side would share it)
            self.ip = str(Path(tempfile.gettempdir()) / f"medssl-kernel-{uuid.uuid4().hex}-ipc")

        async def _async_pre_start_kernel(self, **kw: Any) -> Any:
            if threads is not None:
                env = dict(kw.get("env") or os.environ)
                env.update({name: str(threads) for name in THREAD_VARIABLES})
                kw["env"] = env
            return await super()._async_pre_start_kernel(**kw)

    return StageKernelManager


THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _execute(
    stage: Stage, notebooks_dir: Path, output: Path, log_output: bool, threads: int | None = None
) -> None:
    import papermill

    papermill.execute_notebook(
        str(notebooks_dir / stage.notebook),
        str(output),
        parameters=stage.parameters,
        kernel_name=KERNEL,
        cwd=str(notebooks_dir),
        log_output=log_output,
        progress_bar=False,
        kernel_manager_class=_kernel_manager(threads),
    )


def dependencies(stages: Sequence[Stage]) -> dict[str, set[str]]:
    """The stages each stage waits for: pre-training and scratch's fine-tuning wait for the data,
    a method's fine-tuning for its pre-training, the comparison for every fine-tuning."""
    names = [s.name for s in stages]
    needs: dict[str, set[str]] = {}
    for name in names:
        if name == "data":
            needs[name] = set()
        elif name.startswith("pretrain-") or name == "finetune-scratch":
            needs[name] = {"data"}
        elif name.startswith("finetune-"):
            needs[name] = {"pretrain-" + name.removeprefix("finetune-")}
        else:
            needs[name] = {n for n in names if n.startswith("finetune-")}
    return {name: {n for n in need if n in names} for name, need in needs.items()}


def _kind(name: str) -> str:
    return name.split("-", 1)[0]


def eta_seconds(stages: Sequence[Stage], jobs: int = 1) -> float | None:
    """Seconds the stages not yet completed will take, from the completed stages' times: the
    mean of the same kind (data, pretrain, finetune, compare), else of all; ``None`` before any
    stage is timed. Divided by ``jobs``, as independent stages share the workers."""
    done = [s for s in stages if s.status == "completed" and s.seconds is not None]
    if not done:
        return None
    overall = sum(s.seconds for s in done) / len(done)
    by_kind: dict[str, list[float]] = {}
    for s in done:
        by_kind.setdefault(_kind(s.name), []).append(s.seconds)
    left = 0.0
    for s in stages:
        if s.status != "completed":
            times = by_kind.get(_kind(s.name))
            left += sum(times) / len(times) if times else overall
    return left / max(jobs, 1)


class _StageTag(logging.Filter):
    """Prefixes each echoed notebook line with the stage its thread runs."""

    def __init__(self) -> None:
        super().__init__()
        self.local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        stage = getattr(self.local, "stage", None)
        if stage:
            record.msg = f"[{stage}] {record.msg}"
        return True


def _echo(log_output: bool) -> _StageTag | None:
    """With ``log_output``, papermill's logger (which carries the cells' output) prints to
    stderr, each line tagged with its stage; returns the tagging filter."""
    if not log_output:
        return None
    logger = logging.getLogger("papermill")
    tag = _StageTag()
    handler = logging.StreamHandler()
    handler.addFilter(tag)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    tag.handler = handler  # type: ignore[attr-defined]
    return tag


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
    execute: Callable[..., None] = _execute,
    jobs: int = 1,
    threads: int | None = None,
    report: Callable[[str], None] | None = None,
) -> list[Stage]:
    """Run every stage of ``plan(cfg, out)``; return the stages with their records.

    ``resume``: continue the run in ``out`` — its stages must be the same (same config), the
    completed ones are skipped. Without it, ``out`` must not hold a pipeline already.
    ``jobs``: stages run side by side (their :func:`dependencies` respected), each kernel with
    ``threads`` CPU threads (default with ``jobs`` > 1: the cores shared out; with 1 job the
    environment's). ``log_output``: echo the notebooks' output to stderr. ``report``: called
    with a line at each stage's start and end (the time left estimated by :func:`eta_seconds`).
    Raises :class:`PipelineError` naming the failed stage (stages already running finish first;
    none is started after a failure); ``pipeline.json`` is written at every change either way.
    """
    if jobs < 1:
        raise PipelineError(f"jobs must be >= 1, got {jobs}")
    if threads is None and jobs > 1:
        threads = max(1, (os.cpu_count() or 1) // jobs)
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
        "jobs": jobs,
        "threads_per_job": threads,
        "started": first_started or _now(),
        "resumed": _now() if first_started else None,
        "ended": None,
        "status": "running",
    }
    lock = threading.Lock()
    say = report or (lambda line: None)

    def save() -> None:
        with lock:
            record["stages"] = [asdict(s) for s in stages]
            atomic_write_text(record_path, json.dumps(record, indent=2) + "\n")

    tag = _echo(log_output)

    def run(stage: Stage) -> None:
        output = out / "notebooks" / f"{stage.name}.ipynb"
        stage.status, stage.started, stage.error = "running", _now(), None
        stage.output = str(output.relative_to(out))
        save()
        say(f"start {stage.name} ({stage.notebook})")
        if tag is not None:
            tag.local.stage = stage.name
        start = time.perf_counter()
        try:
            execute(stage, notebooks_dir, output, log_output, threads)
        except Exception as err:  # papermill raises its own errors and the kernel's
            _stamp(output, stage, env)
            stage.status, stage.error = "failed", _stage_error(err)
            stage.ended, stage.seconds = _now(), round(time.perf_counter() - start, 1)
            save()
            say(f"failed {stage.name} after {stage.seconds:.0f} s")
            raise
        _stamp(output, stage, env)
        stage.status, stage.ended = "completed", _now()
        stage.seconds = round(time.perf_counter() - start, 1)
        save()
        left = eta_seconds(stages, jobs)
        eta = f"; about {left / 60:.0f} min left" if left is not None else ""
        done = sum(s.status == "completed" for s in stages)
        say(f"done {stage.name} in {stage.seconds:.0f} s ({done}/{len(stages)} stages{eta})")

    needs = dependencies(stages)
    failed: list[tuple[Stage, BaseException]] = []
    try:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            running: dict[Future, Stage] = {}
            while True:
                finished = {s.name for s in stages if s.status == "completed"}
                busy = {s.name for s in running.values()}
                ready = [
                    s
                    for s in stages
                    if s.status != "completed" and s.name not in busy and needs[s.name] <= finished
                ]
                while ready and len(running) < jobs and not failed:
                    stage = ready.pop(0)
                    running[pool.submit(run, stage)] = stage
                if not running:
                    break
                complete, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in complete:
                    stage = running.pop(future)
                    if future.exception() is not None:
                        failed.append((stage, future.exception()))
    finally:
        if tag is not None:
            logging.getLogger("papermill").removeHandler(tag.handler)  # type: ignore[attr-defined]
    stuck = [s.name for s in stages if s.status != "completed"]
    if stuck and not failed:
        raise PipelineError(f"stages {', '.join(stuck)} could not run: their dependencies did not")
    if failed:
        stage, err = failed[0]
        record["status"], record["ended"] = "failed", _now()
        save()
        output = out / "notebooks" / f"{stage.name}.ipynb"
        raise PipelineError(
            f"stage '{stage.name}' ({stage.notebook}) failed: {stage.error}; its executed "
            f"notebook is {output}; fix the cause and rerun with --resume"
        ) from err
    record["status"], record["ended"] = "completed", _now()
    save()
    return stages
