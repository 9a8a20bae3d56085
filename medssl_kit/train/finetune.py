"""Fine-tuning and probing with few labels, evaluated on whole test volumes (DESIGN §5.2, §6).

``finetune(init, manifest, cfg, out_dir)`` trains a segmentation model (``mode="full"``), a frozen
backbone with a trainable 1×1 head (``mode="probe"``), or a slice-level "lesion present"
classifier on the backbone's encoder (``mode="classify"``), from scratch or from the transferable
weights of a run folder, using a label budget of fine-tuning cases chosen by the seed. It
validates for early stopping and model selection, then evaluates the selected model on every
test volume and writes the run folder. ``mode="knn"`` trains nothing: the frozen backbone's pixel
features of the labelled cases become a reference set and every test pixel is labelled by
weighted kNN voting (:mod:`medssl_kit.evaluate.knn`), a direct reading of what the features hold.
On the ``fpn`` (vox2vec, hierarchical dense SSL, or random weights), ``mode="linear"`` is the
papers' linear probe — the backbone frozen, each pyramid level through its own 1×1 convolution to
the classes, upsampled to full resolution and summed (``fpn`` ``head="linear"``) — and
``mode="nonlinear"`` their fine-tuning: a non-linear head on the pyramid (``head="nonlinear"``),
the backbone frozen for the first ``unfreeze_at`` of the steps, then trained with its rate raised
exponentially from ``ramp_from`` × the rate over ``ramp_fraction`` of the steps
(:func:`~medssl_kit.train.finetune_schedule.nonlinear_schedule`).

``config.json``      the resolved configuration, the labelled case ids, the key report
``metrics.jsonl``    one line per logged step (loss, lr) and per validation (score)
``checkpoint.pt``    the latest resumable state (atomic; ``resume=True`` continues from it)
``transferable.pt``  the selected model's backbone weights (another run's ``init``; export)
``results.csv``      one row per test case × class (segmentation modes, DESIGN §6.3)
``predictions.csv``  one row per test slice with score and target (``classify``)
``summary.json``     organ / lesion means (or AUROC), steps run, wall time

Conventions: label budgets count labelled cases of the ``train`` split (an int ≥ 1, a fraction
in (0, 1], or ``"all"``); the chosen cases are the first ``n`` of a permutation drawn from
``seed``, so every method fine-tuned with the same seed and budget sees the same cases. Lesion
rows use the nnU-Net convention for a lesion absent from both ground truth and prediction (NaN,
left out of means), because "no lesion, none predicted" would otherwise count as Dice 1 and
inflate the lesion figure; organs are present in every case.

Several processes (``medssl finetune --nproc N``, torchrun; :mod:`medssl_kit.train.distributed`):
``batch_size`` stays the global batch, each step's indices are drawn as with one process and
rank ``r`` trains on its share (augmented from a generator seeded by (seed, step, ``r``)) in
``DistributedDataParallel``; rank 0 alone validates, and every rank takes its score, so the
early-stopping decision is the same everywhere; rank 0 writes the run folder and evaluates the
test volumes. ``mode="knn"`` trains nothing and runs in one process. On CUDA a run trains with
mixed precision (``amp``), ``channels_last`` 2D convolutions and batches built in ``workers``
processes; on the CPU, by default, with none of these (validation and test inference always run
in float32).

This module is the loop and its orchestration. The settings are :mod:`.finetune_config`; the
network, built and loaded from ``init``, :mod:`.finetune_models` (the kNN segmenter,
:mod:`.knn_segmenter`); the tasks' batches, loss and scores, :mod:`.finetune_tasks`; the rates,
:mod:`.finetune_schedule`.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from medssl_kit import __version__
from medssl_kit.data.datasets import SliceDataset, load_volumes
from medssl_kit.data.io import CaseVolume
from medssl_kit.data.manifest import Manifest, load_manifest
from medssl_kit.errors import MedsslError
from medssl_kit.evaluate.results import load_results, write_results
from medssl_kit.models.registry import build_backbone
from medssl_kit.train.checkpoint import (
    CHECKPOINT_NAME,
    append_jsonl,
    load_checkpoint,
    prepare_run_folder,
    save_checkpoint,
    truncate_jsonl,
    write_json,
)
from medssl_kit.train.distributed import (
    Session,
    channels_last,
    check_processes,
    data_parallel,
    default_amp,
    default_workers,
    mean_terms,
    numerics,
    on_rank_zero,
    precision,
    restore_rng,
    rng_entries,
    seed_rank,
    session,
    step_batches,
)
from medssl_kit.train.finetune_config import FinetuneConfig
from medssl_kit.train.finetune_models import _Classifier, build_model, model_backbone
from medssl_kit.train.finetune_schedule import _lr_schedule, _param_groups
from medssl_kit.train.finetune_tasks import _Task
from medssl_kit.train.knn_segmenter import _KnnSegmenter
from medssl_kit.train.transfer import KeyReport, read_transferable, save_transferable


@dataclass
class FinetuneResult:
    run_dir: Path
    summary: dict[str, Any]
    rows: list[dict[str, Any]]
    key_report: KeyReport | None


def choose_labeled_cases(
    manifest: Manifest, labeled: int | float | str, seed: int, split: str = "train"
) -> list[str]:
    """Ids of the labelled ``split`` cases a budget selects (seeded, nested across budgets)."""
    pool = [c.id for c in manifest.split(split) if c.labelled]
    if not pool:
        raise MedsslError(
            f"manifest '{manifest.display_path}' has no labelled case in split '{split}'"
        )
    n = _budget_count(labeled, len(pool), split)
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed)).tolist()
    return [pool[i] for i in order[:n]]


def _budget_count(labeled: int | float | str, pool: int, split: str) -> int:
    if labeled == "all":
        return pool
    value = float(labeled)
    if 0 < value < 1:
        return max(1, round(value * pool))
    if value >= 1 and value == int(value):
        if value > pool:
            raise MedsslError(
                f"label budget {int(value)} exceeds the {pool} labelled {split} cases"
            )
        return int(value)
    raise MedsslError(
        f"label budget must be a case count >= 1, a fraction in (0, 1) or 'all'; got {labeled!r}"
    )


def finetune(
    init: str | Path,
    manifest: str | Path | Manifest,
    cfg: FinetuneConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
) -> FinetuneResult:
    """Fine-tune from ``init`` (``"scratch"`` or a run folder) and evaluate on the test split.

    Under torchrun (``WORLD_SIZE`` > 1) every rank calls this with the same arguments; rank 0
    returns the run's summary and test rows, the other ranks empty ones when training ends."""
    cfg = cfg.resolved()
    manifest = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
    out_dir = Path(out_dir)
    with session(cfg.device) as run:
        return _finetune(init, manifest, cfg, out_dir, run, resume, progress)


def _finetune(
    init: str | Path,
    manifest: Manifest,
    cfg: FinetuneConfig,
    out_dir: Path,
    run: Session,
    resume: bool,
    progress: bool,
) -> FinetuneResult:
    if run.world_size > 1 and cfg.mode == "knn":
        raise MedsslError("knn mode trains nothing: run it in one process (without --nproc)")
    if run.world_size > 1 and cfg.mode == "nonlinear":
        raise MedsslError("nonlinear mode unfreezes its backbone mid-run: run it in one process")
    check_processes(cfg.batch_size, run.world_size)
    cfg = replace(
        cfg,
        amp=cfg.amp if cfg.amp is not None else default_amp(run.device, cfg.profile),
        workers=cfg.workers if cfg.workers is not None else default_workers(run.device),
        channels_last=channels_last(run.device, cfg.dims, cfg.channels_last),
    )
    resuming = on_rank_zero(lambda: prepare_run_folder(out_dir, resume))
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)

    labeled_ids = choose_labeled_cases(manifest, cfg.labeled, cfg.seed, cfg.train_split)
    train_vols = load_volumes(manifest, [cfg.train_split], case_ids=labeled_ids)
    val_vols = [v for v in load_volumes(manifest, ["val"]) if v.label is not None]
    test_vols = [v for v in load_volumes(manifest, ["test"]) if v.label is not None]
    if not test_vols:
        raise MedsslError(f"manifest '{manifest.display_path}' has no labelled case in 'test'")

    model, method, key_report = build_model(init, manifest, cfg)
    task = _Task.make(cfg, manifest, model)
    if isinstance(model, _KnnSegmenter):
        model.fit(SliceDataset(train_vols, context=cfg.context, with_label=True), manifest)
    if run.main:
        write_json(
            out_dir / "config.json",
            {
                "kind": "finetune",
                "method": method,
                "init": str(init),
                "manifest": manifest.display_path,
                "labeled_cases": labeled_ids,
                "config": asdict(cfg),
                "backbone": model_backbone(model).config,
                "key_report": asdict(key_report) if key_report else None,
                "version": __version__,
                "device": str(run.device if cfg.steps else "cpu"),
                "processes": run.world_size,
                **numerics(),
            },
        )
    val_vols = val_vols or train_vols
    state = _train(
        model, task, train_vols, val_vols, key_report, cfg, out_dir, resuming, progress, run
    )
    if not run.main:
        return FinetuneResult(out_dir, {}, [], key_report)

    save_transferable(out_dir / "transferable.pt", model_backbone(model), method=method)
    rows, summary = task.evaluate(model, test_vols, out_dir)
    meta = {
        "method": method,
        "backbone": cfg.backbone,
        "dims": cfg.dims,
        "labeled": len(labeled_ids),
        "seed": cfg.seed,
        "mode": cfg.mode,
    }
    rows = [{**meta, **r} for r in rows]
    if rows:
        write_results(rows, out_dir / "results.csv")
    summary = {
        **meta,
        **summary,
        "labeled_cases": labeled_ids,
        "steps_run": state["step"],
        "best_step": state["best_step"],
        "best_val_score": state["best_score"] if state["best_step"] else None,
        "early_stopped": bool(state["stopped"]),
        "wall_time_s": time.perf_counter() - started,
    }
    write_json(out_dir / "summary.json", summary)
    return FinetuneResult(out_dir, summary, rows, key_report)


def _train(
    model: nn.Module,
    task: _Task,
    train_vols: list[CaseVolume],
    val_vols: list[CaseVolume],
    key_report: KeyReport | None,
    cfg: FinetuneConfig,
    out_dir: Path,
    resuming: bool,
    progress: bool,
    run: Session,
) -> dict:
    """Train ``model`` for ``cfg.steps`` (none in knn mode), validating on ``val_vols`` every
    ``cfg.val_every`` steps; leaves the best validated weights in ``model`` and returns the loop's
    state (``step``, ``best_score``, ``best_step``, ``bad_checks``, ``stopped``). Several
    processes: rank 0 validates and logs, every rank updates the state with its score."""
    metrics_path = out_dir / "metrics.jsonl"
    state = {"step": 0, "best_score": -math.inf, "best_step": 0, "bad_checks": 0, "stopped": False}
    if not cfg.steps:
        if run.main:
            metrics_path.write_text("")
        return state
    device, mixed = run.device, precision(run.device, cfg.amp)
    memory_format = torch.channels_last if cfg.channels_last else None
    model.to(device)
    if memory_format is not None:
        model.to(memory_format=memory_format)
    batches = task.batch_source(train_vols)
    optimizer = torch.optim.Adam(
        _param_groups(model, key_report, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    scheduler = _lr_schedule(optimizer, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=mixed.scaler)
    best_state = copy.deepcopy(model.state_dict())
    if resuming:
        ckpt = load_checkpoint(out_dir / CHECKPOINT_NAME)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        best_state = ckpt["best_model"]
        state = ckpt["state"]
        restore_rng(ckpt, device, out_dir / CHECKPOINT_NAME)
        if run.main:
            truncate_jsonl(metrics_path, state["step"])
    else:
        if run.world_size > 1:
            seed_rank(cfg.seed)  # each rank its own dropout masks
        if run.main:
            metrics_path.write_text("")
    ddp = data_parallel(model, device, find_unused_parameters=cfg.mode == "classify")

    shown = progress and run.main
    bar = tqdm(total=cfg.steps, initial=state["step"], disable=not shown, desc="fine-tune")
    drawn = step_batches(
        batches, range(state["step"], cfg.steps), cfg.workers, pin_memory=device.type == "cuda"
    )
    while state["step"] < cfg.steps and not state["stopped"]:
        step = state["step"]
        model.train()
        task.set_train_modes(model, step)
        inputs, target, labelled = (
            None if x is None else x.to(device, non_blocking=x.is_pinned()) for x in next(drawn)
        )
        if memory_format is not None:
            inputs = inputs.contiguous(memory_format=memory_format)
        with mixed.autocast(device):
            loss = task.loss(ddp(inputs), target, labelled)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        state["step"] = step + 1
        bar.update(1)
        logged = mean_terms({"loss": loss})["loss"]
        if run.main:
            append_jsonl(
                metrics_path,
                {"step": state["step"], "loss": logged, "lr": scheduler.get_last_lr()[0]},
            )
        if state["step"] % cfg.val_every == 0 or state["step"] == cfg.steps:
            score = on_rank_zero(lambda: task.validate(model, val_vols))
            if run.main:
                append_jsonl(metrics_path, {"step": state["step"], "val_score": score})
            bar.set_postfix(val=f"{score:.3f}")
            if score > state["best_score"]:
                state.update(best_score=score, best_step=state["step"], bad_checks=0)
                best_state = copy.deepcopy(model.state_dict())
            else:
                state["bad_checks"] += 1
                state["stopped"] = state["bad_checks"] >= cfg.patience
        last = state["stopped"] or state["step"] == cfg.steps
        if state["step"] % cfg.checkpoint_every == 0 or last:
            rng = rng_entries(device)  # every rank's, gathered
            if run.main:
                save_checkpoint(
                    out_dir / CHECKPOINT_NAME,
                    {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "best_model": best_state,
                        "state": state,
                        **rng,
                        **({"scaler": scaler.state_dict()} if scaler.is_enabled() else {}),
                    },
                )
    bar.close()

    model.load_state_dict(best_state)
    return state


def label_budget_cases(
    manifest: Manifest, budgets: list[int | float | str], split: str = "train"
) -> dict[int | float | str, int]:
    """How many labelled ``split`` cases each label budget selects (a count, a fraction, "all").

    Budgets can coincide: with one labelled case, 1, 0.5 and "all" all select that case.
    """
    pool = sum(1 for c in manifest.split(split) if c.labelled)
    if not pool:
        raise MedsslError(
            f"manifest '{manifest.display_path}' has no labelled case in split '{split}'"
        )
    return {budget: _budget_count(budget, pool, split) for budget in budgets}


def run_budgets(
    init: str | Path,
    manifest: str | Path | Manifest,
    cfg: FinetuneConfig,
    out_dir: str | Path,
    budgets: list[int | float | str],
    seeds: list[int],
    *,
    reference: Sequence[int | float | str] = (),
    progress: bool = False,
    note: Callable[[str], None] = print,
) -> list[FinetuneResult]:
    """Fine-tune once per budget × seed into ``out_dir/labeled-<b>_seed-<s>``, then each
    ``reference`` budget (e.g. the pipeline's all-labels mark of what the data allows) at the
    first seed only.

    Budgets that select the same number of labelled cases (:func:`label_budget_cases`; e.g. 1
    and "all" when the manifest has one labelled training case) select the same cases for a seed,
    so they are fine-tuned once, under the first of them, and ``note`` is told which budgets
    were merged. A run folder that already holds a ``summary.json`` is a finished run and is read
    back, not repeated; one with a checkpoint but no summary (killed) is resumed.
    """
    manifest = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
    wanted = [*budgets, *reference]
    counts = label_budget_cases(manifest, wanted, cfg.train_split)
    kept: dict[int, list[int | float | str]] = {}
    for budget in dict.fromkeys(wanted):
        kept.setdefault(counts[budget], []).append(budget)
    for n, same in kept.items():
        if len(same) > 1:
            named = " and ".join(repr(b) if isinstance(b, str) else f"{b:g}" for b in same)
            note(
                f"label budgets {named} {'both' if len(same) == 2 else 'all'} select {n} "
                f"labelled '{cfg.train_split}' "
                f"case{'s' if n != 1 else ''}: fine-tuned once, as budget {same[0]}"
            )
    results = []
    for budget in (same[0] for same in kept.values()):
        for seed in seeds if budget in budgets else seeds[:1]:
            run = Path(out_dir) / f"labeled-{budget}_seed-{seed}"
            if (run / "summary.json").is_file():
                results.append(read_finetune_run(run))
                continue
            run_cfg = copy.deepcopy(cfg)
            run_cfg.labeled, run_cfg.seed = budget, seed
            resume = (run / CHECKPOINT_NAME).is_file()
            results.append(finetune(init, manifest, run_cfg, run, resume=resume, progress=progress))
    return results


def read_finetune_run(run_dir: str | Path) -> FinetuneResult:
    """A finished fine-tuning run folder as a :class:`FinetuneResult`."""
    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise MedsslError(f"'{run_dir}' is not a finished fine-tuning run (no summary.json)")
    results_csv = run_dir / "results.csv"
    rows = load_results(results_csv).to_dict("records") if results_csv.is_file() else []
    return FinetuneResult(run_dir, json.loads(summary_path.read_text()), rows, None)


def load_finetuned(run_dir: str | Path) -> nn.Module:
    """The selected model of a fine-tuning run (segmentation backbone or slice classifier)."""
    run_dir = Path(run_dir)
    data = read_transferable(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    if config["config"]["mode"] == "knn":
        raise MedsslError(
            f"'{run_dir}' is a knn run: it trains no model (its predictions are recomputed from "
            "the init run's features and the labelled cases); load the init run instead"
        )
    backbone = build_backbone(**data["backbone"])
    if config["config"]["mode"] == "classify":
        model = _Classifier(backbone)
        model.load_state_dict(load_checkpoint(run_dir / CHECKPOINT_NAME)["best_model"])
    else:
        backbone.load_state_dict(data["state_dict"])
        model = backbone
    return model.eval()
