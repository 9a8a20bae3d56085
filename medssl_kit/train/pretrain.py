"""The generic pre-training loop (DESIGN §5.1).

``pretrain(method, dataset, cfg, out_dir)`` runs any :class:`PretrainMethod` for ``cfg.steps``
optimizer steps: draws a batch of dataset items with a generator seeded by (seed, step), lets the
method build its views, optimises ``"loss"``, clips gradients, steps the warm-up + cosine (or
other) schedule, calls the method's ``on_step_end`` (EMA teachers), logs every term to
``metrics.jsonl`` and writes atomic checkpoints from which ``resume=True`` continues exactly.
At the end it writes ``transferable.pt`` (what ``medssl finetune --init RUN_DIR`` loads),
``config.json`` and ``summary.json`` (steps, wall time, seconds per step).

The same loop runs in several processes under ``torchrun`` / ``medssl pretrain --nproc N``
(:mod:`medssl_kit.train.distributed`): ``batch_size`` stays the global batch; the step's item
indices are drawn exactly as with one process and rank ``r`` takes its share
(:func:`draw_batch`), its views coming from a generator seeded by (seed, step, ``r``);
``DistributedDataParallel`` averages the gradients; the methods synchronise what their papers
synchronise across GPUs (:mod:`medssl_kit.distributed`); rank 0 alone logs (the mean of every
term over the ranks), checkpoints (with every rank's RNG state) and writes the run folder. With
one process nothing of this happens and a run is what it always was. On CUDA the loop uses
mixed precision (``amp``; bfloat16, or float16 with a gradient scaler), ``channels_last`` for 2D
networks and builds the batches in ``workers`` processes (:func:`~medssl_kit.train.distributed.
step_batches`); on the CPU, by default, none of these.

``run_pretraining(cfg, manifest, out_dir)`` builds the backbone, the method and its dataset from a
manifest's unlabelled pool and calls ``pretrain``; the CLI and notebooks use it.

Settings resolve in this order, later winning: the profile's budgets, the method's own
``default_config(profile)`` (its paper's optimizer, lr, ...), then the user's explicit values.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from medssl_kit import __version__
from medssl_kit.config import architecture_kwargs, get_profile
from medssl_kit.data.datasets import PatchDataset, SliceDataset, SliceSequenceDataset, load_volumes
from medssl_kit.data.io import CaseVolume
from medssl_kit.data.manifest import Manifest, load_manifest
from medssl_kit.distributed import convert_sync_batchnorm, env_local_rank, env_world_size
from medssl_kit.errors import MedsslError
from medssl_kit.methods.base import PretrainMethod
from medssl_kit.methods.ema import ema_base
from medssl_kit.methods.registry import get_method
from medssl_kit.models.registry import build_backbone
from medssl_kit.train.checkpoint import (
    CHECKPOINT_NAME,
    append_jsonl,
    load_checkpoint,
    prepare_run_folder,
    read_jsonl,
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
    rank_share,
    restore_rng,
    rng_entries,
    seed_rank,
    select_device,
    session,
    step_batches,
    to_device,
)
from medssl_kit.train.optim import build_optimizer, build_scheduler
from medssl_kit.train.transfer import save_transferable

# Loop settings a method's default_config may set; ``None`` in PretrainConfig means "not given".
LOOP_DEFAULTS: dict[str, Any] = {
    "optimizer": "adam",
    "lr": 1e-3,
    "weight_decay": 1e-5,
    "momentum": 0.9,
    "schedule": "cosine",
    "warmup_steps": 0,
    "grad_clip": None,
}


@dataclass
class PretrainConfig:
    """A pre-training run. ``None`` fields take the method's, then the profile's default."""

    method: str
    profile: str | None = None
    seed: int = 0
    dims: int | None = None  # None: the method's first (2 for most; MixCL's 3)
    backbone: str | None = None
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    steps: int | None = None
    batch_size: int | None = None
    checkpoint_every: int | None = None
    optimizer: str | None = None
    lr: float | None = None
    weight_decay: float | None = None
    momentum: float | None = None
    schedule: str | None = None
    warmup_steps: int | None = None
    grad_clip: float | None = None
    crop_size: tuple[int, ...] | None = None
    patch_size: tuple[int, int, int] | None = None
    # None: the method's, else ("pretrain", "train"), images only (MixCL: the pretrain split's
    # labelled cases; the train split's labels are the budgeted fine-tuning labels)
    splits: tuple[str, ...] | None = None
    method_cfg: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"  # auto (CUDA where available) | cpu | cuda
    # Mixed precision; None: on CUDA, and on a CPU with native bfloat16 where the profile asks
    # for it (train.distributed.default_amp: the laptop profile).
    amp: bool | None = None
    workers: int | None = None  # batch-building processes; None: 0 on the CPU, up to 4 on CUDA
    channels_last: bool | None = None  # NHWC 2D convolutions; None: on CUDA for 2D

    def resolved(self) -> PretrainConfig:
        """A copy with every ``None`` filled in (profile < method defaults < explicit values)."""
        prof = get_profile(self.profile)
        method_cls = get_method(self.method)
        out = copy.deepcopy(self)
        out.profile = prof.name
        out.dims = method_cls.spatial_dims[0] if out.dims is None else out.dims
        if out.dims not in method_cls.spatial_dims:
            raise MedsslError(
                f"method '{out.method}' runs in {method_cls.spatial_dims}-D, not {out.dims}-D"
            )
        defaults = method_cls.default_config(prof.recipes, out.dims)
        loop_names = {f.name for f in fields(PretrainConfig)}
        base = {
            **LOOP_DEFAULTS,
            "steps": prof.pretrain.steps,
            "batch_size": prof.pretrain.batch_size,
            "checkpoint_every": prof.pretrain.checkpoint_every,
            "crop_size": prof.pretrain.crop_size,
            "patch_size": prof.pretrain.patch_size,
            "backbone": method_cls.default_backbone,
            "splits": ("pretrain", "train"),
            **{k: v for k, v in defaults.items() if k in loop_names},
        }
        scale = out.steps is None and prof.pretrain.step_scale != 1.0
        for key, value in base.items():
            if getattr(out, key) is None:
                setattr(out, key, value)
        if scale:  # the profile runs the method's recipe for a share of its steps
            out.steps = max(1, round(out.steps * prof.pretrain.step_scale))
        out.crop_size = tuple(out.crop_size)
        out.patch_size = tuple(out.patch_size)
        out.splits = tuple(out.splits)
        out.method_cfg = {
            **{k: v for k, v in defaults.items() if k not in loop_names},
            **out.method_cfg,
        }
        if "base_momentum" in out.method_cfg and out.method_cfg["base_momentum"] is None:
            out.method_cfg["base_momentum"] = ema_base(out.steps, prof.pretrain.ema_momentum)
        out.backbone_kwargs = {
            **architecture_kwargs(prof.name, out.backbone, out.dims),
            **method_cls.backbone_kwargs(prof.recipes, out.dims, out.backbone),
            **out.backbone_kwargs,
        }
        return out


@dataclass
class RunResult:
    run_dir: Path
    summary: dict[str, Any]
    history: list[dict[str, Any]]


def draw_batch(
    method: PretrainMethod,
    dataset: Any,
    cfg: PretrainConfig,
    step: int,
    rank: int | None = None,
    world_size: int | None = None,
) -> dict[str, Any]:
    """The batch rank ``rank`` of ``world_size`` trains on at ``step`` (CPU tensors), as
    ``method.make_batch`` builds it from dataset items (defaults: this process's rank and the
    number of processes; one process: the whole batch).

    The item indices of the global batch (``cfg.batch_size``) are drawn from a generator seeded
    by (``cfg.seed``, ``step``); with one process the views are drawn from the same generator,
    with several, rank ``r`` takes its share of the indices and draws its views from a generator
    seeded by (seed, step, ``r``) (:func:`~medssl_kit.train.distributed.rank_share`). Nothing
    depends on earlier steps, so a resumed run draws what an uninterrupted one would."""
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(step)
    index = torch.randint(len(dataset), (cfg.batch_size,), generator=generator).tolist()
    index, own = rank_share(index, step, cfg.seed, rank, world_size)
    return method.make_batch([dataset[i] for i in index], generator if own is None else own)


def pretrain(
    method: PretrainMethod,
    dataset: Any,
    cfg: PretrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
) -> RunResult:
    """Run ``method`` on ``dataset`` (indexable) for ``cfg.steps`` steps; write the run folder.

    Under torchrun (``WORLD_SIZE`` > 1) every rank calls this with the same arguments; rank 0
    writes the run folder and returns the run's summary and history, the other ranks an empty
    summary and history once rank 0 is done."""
    cfg = cfg if cfg.steps is not None else cfg.resolved()
    out_dir = Path(out_dir)
    if len(dataset) == 0:
        raise MedsslError(f"nothing to pre-train on: the dataset for splits {cfg.splits} is empty")
    with session(cfg.device) as run:
        return _pretrain(method, dataset, cfg, out_dir, run, resume, progress)


def _pretrain(
    method: PretrainMethod,
    dataset: Any,
    cfg: PretrainConfig,
    out_dir: Path,
    run: Session,
    resume: bool,
    progress: bool,
) -> RunResult:
    device = run.device
    check_processes(cfg.batch_size, run.world_size)
    resuming = on_rank_zero(lambda: prepare_run_folder(out_dir, resume))
    nhwc = channels_last(device, method.backbone.spatial_dims, cfg.channels_last)
    cfg = replace(
        cfg,
        amp=cfg.amp if cfg.amp is not None else default_amp(device, cfg.profile),
        workers=cfg.workers if cfg.workers is not None else default_workers(device),
        channels_last=nhwc,
    )
    mixed = precision(device, cfg.amp)
    method.to(device)
    if run.world_size > 1:
        for path in method.sync_batchnorm:
            owner_path, _, name = path.rpartition(".")
            owner = method.get_submodule(owner_path) if owner_path else method
            setattr(owner, name, convert_sync_batchnorm(getattr(owner, name), device))
    memory_format = torch.channels_last if nhwc else None
    if memory_format is not None:
        method.to(memory_format=memory_format)
    seed_rank(cfg.seed)
    optimizer = build_optimizer(
        cfg.optimizer, method.parameters(), cfg.lr, cfg.weight_decay, cfg.momentum
    )
    scheduler = build_scheduler(optimizer, cfg.schedule, cfg.steps, cfg.warmup_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=mixed.scaler)
    step = 0
    metrics_path = out_dir / "metrics.jsonl"
    if resuming:
        ckpt = load_checkpoint(out_dir / CHECKPOINT_NAME)
        method.load_state_dict(ckpt["method"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt["scaler"]:
            scaler.load_state_dict(ckpt["scaler"])
        restore_rng(ckpt, device, out_dir / CHECKPOINT_NAME)
        step = ckpt["step"]
        if run.main:
            truncate_jsonl(metrics_path, step)
    elif run.main:
        metrics_path.write_text("")
    if run.main:
        write_json(
            out_dir / "config.json",
            {
                "kind": "pretrain",
                "method": method.name,
                "config": asdict(cfg),
                "backbone": method.backbone.config,
                "version": __version__,
                "device": str(device),
                "processes": run.world_size,
                **numerics(),
            },
        )
    model = data_parallel(method, device)

    started = time.perf_counter()
    first_step = step
    bar = tqdm(
        total=cfg.steps,
        initial=step,
        disable=not (progress and run.main),
        desc=f"pretrain {method.name}",
    )
    batches = step_batches(
        partial(draw_batch, method, dataset, cfg),
        range(step, cfg.steps),
        cfg.workers,
        pin_memory=device.type == "cuda",
    )
    for batch in batches:
        batch = to_device(batch, device, memory_format)
        method.train()
        t0 = time.perf_counter()
        with mixed.autocast(device):
            terms = model(batch, step)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(terms["loss"]).backward()
        if cfg.grad_clip:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(method.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        step += 1
        method.on_step_end(step, cfg.steps)
        record: dict[str, Any] = mean_terms(terms)
        record.update(step=step, lr=scheduler.get_last_lr()[0], seconds=time.perf_counter() - t0)
        if run.main:
            append_jsonl(metrics_path, record)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}")
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            rng = rng_entries(device)  # every rank's, gathered
            if run.main:
                save_checkpoint(
                    out_dir / CHECKPOINT_NAME,
                    {
                        "method": method.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict(),
                        **rng,
                        "step": step,
                    },
                )
    bar.close()
    elapsed = time.perf_counter() - started
    if not run.main:
        on_rank_zero(lambda: None)  # wait until rank 0 has written the run folder
        return RunResult(out_dir, {}, [])

    save_transferable(
        out_dir / "transferable.pt",
        method.backbone,
        method=method.name,
        state_dict=method.transferable_state(),
        input_normalization=method.input_normalization,
    )
    history = read_jsonl(metrics_path)
    step_times = sorted(r["seconds"] for r in history if "seconds" in r)
    summary = {
        "method": method.name,
        "backbone": method.backbone.name,
        "dims": method.backbone.spatial_dims,
        "steps": step,
        "steps_this_session": step - first_step,
        "wall_time_s": elapsed,
        "median_seconds_per_step": step_times[len(step_times) // 2] if step_times else None,
        "final_loss": history[-1]["loss"] if history else None,
        "processes": run.world_size,
        "device": str(device),
    }
    write_json(out_dir / "summary.json", summary)
    on_rank_zero(lambda: None)
    return RunResult(out_dir, summary, history)


def build_dataset(method_cls: type[PretrainMethod], manifest: Manifest, cfg: PretrainConfig) -> Any:
    """The dataset ``method_cls`` consumes, from ``cfg.splits`` of ``manifest``."""
    volumes = load_volumes(manifest, list(cfg.splits))
    if not volumes:
        raise MedsslError(
            f"manifest '{manifest.display_path}' has no case in splits {', '.join(cfg.splits)}"
        )
    kind = method_cls.dataset_kind
    if kind == "pooled_volumes":
        return pooled_volumes(volumes, manifest, cfg.splits)
    if kind == "slices":
        return SliceDataset(volumes, context=0, skip_empty=True, with_label=False)
    if kind == "sequences":
        return SliceSequenceDataset(
            volumes,
            t=int(cfg.method_cfg.get("t", 5)),
            plus=bool(cfg.method_cfg.get("plus", False)),
            ends="skip",
            seed=cfg.seed,
        )
    if kind == "patches":
        return PatchDataset(
            volumes, cfg.patch_size, foreground_ratio=0.0, seed=cfg.seed, with_label=False
        )
    return volumes


def pooled_volumes(
    volumes: list[CaseVolume], manifest: Manifest, splits: tuple[str, ...]
) -> list[dict[str, Any]]:
    """The labelled ``volumes``, each as ``{"volume", "partners", "ignore_index"}`` with the other
    labelled volumes of its source (the manifest's ``source``; one source without them)."""
    labelled = [v for v in volumes if v.label is not None]
    if not labelled:
        raise MedsslError(
            f"manifest '{manifest.display_path}' has no labelled case in splits "
            f"{', '.join(splits)}: this method pre-trains on labels as well as images"
        )
    return [
        {
            "volume": v,
            "partners": [o for o in labelled if o.source == v.source and o is not v],
            "ignore_index": manifest.ignore_index,
        }
        for v in labelled
    ]


def load_method(run_dir: str | Path) -> PretrainMethod:
    """The method of a pre-training run folder (backbone, heads, teachers, buffers) as of its
    latest checkpoint, in eval mode — to look at what it learned (uncertainty maps,
    restorations)."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise MedsslError(f"'{run_dir}' is not a run folder (no config.json)")
    config = json.loads(config_path.read_text())
    if config.get("kind") != "pretrain":
        raise MedsslError(f"'{run_dir}' is not a pre-training run (kind {config.get('kind')!r})")
    loop = config["config"]
    method_cls = get_method(config["method"])
    sizes = {"crop_size": tuple(loop["crop_size"]), "patch_size": tuple(loop["patch_size"])}
    method = method_cls(build_backbone(**config["backbone"]), {**loop["method_cfg"], **sizes})
    method.load_state_dict(load_checkpoint(run_dir / CHECKPOINT_NAME)["method"])
    return method.eval()


def run_pretraining(
    cfg: PretrainConfig,
    manifest: str | Path | Manifest,
    out_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
) -> RunResult:
    """Build backbone, method and dataset from ``cfg`` and ``manifest``; run :func:`pretrain`."""
    cfg = cfg.resolved()
    select_device(cfg.device, env_local_rank() if env_world_size() > 1 else 0)  # fail early
    manifest = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
    method_cls = get_method(cfg.method)
    torch.manual_seed(cfg.seed)
    backbone = build_backbone(
        cfg.backbone, cfg.dims, manifest.num_channels, manifest.num_classes, **cfg.backbone_kwargs
    )
    sizes = {"crop_size": cfg.crop_size, "patch_size": cfg.patch_size}
    method = method_cls(backbone, {**cfg.method_cfg, **sizes})
    dataset = build_dataset(method_cls, manifest, cfg)
    return pretrain(method, dataset, cfg, out_dir, resume=resume, progress=progress)
