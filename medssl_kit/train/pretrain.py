"""The generic pre-training loop (DESIGN §5.1).

``pretrain(method, dataset, cfg, out_dir)`` runs any :class:`PretrainMethod` for ``cfg.steps``
optimizer steps: draws a batch of dataset items with a generator seeded by (seed, step), lets the
method build its views, optimises ``"loss"``, clips gradients, steps the warm-up + cosine (or
other) schedule, calls the method's ``on_step_end`` (EMA teachers), logs every term to
``metrics.jsonl`` and writes atomic checkpoints from which ``resume=True`` continues exactly.
At the end it writes ``transferable.pt`` (what ``medssl finetune --init RUN_DIR`` loads),
``config.json`` and ``summary.json`` (steps, wall time, seconds per step).

``run_pretraining(cfg, manifest, out_dir)`` builds the backbone, the method and its dataset from a
manifest's unlabelled pool and calls ``pretrain``; the CLI and notebooks use it.

Settings resolve in this order, later winning: the profile's budgets, the method's own
``default_config(profile)`` (its paper's optimizer, lr, ...), then the user's explicit values.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field, fields
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
    device: str = "auto"
    amp: bool = False

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


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def pretrain(
    method: PretrainMethod,
    dataset: Any,
    cfg: PretrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
) -> RunResult:
    """Run ``method`` on ``dataset`` (indexable) for ``cfg.steps`` steps; write the run folder."""
    cfg = cfg if cfg.steps is not None else cfg.resolved()
    out_dir = Path(out_dir)
    if len(dataset) == 0:
        raise MedsslError(f"nothing to pre-train on: the dataset for splits {cfg.splits} is empty")
    resuming = prepare_run_folder(out_dir, resume)
    device = _device(cfg.device)
    method.to(device)
    torch.manual_seed(cfg.seed)
    optimizer = build_optimizer(
        cfg.optimizer, method.parameters(), cfg.lr, cfg.weight_decay, cfg.momentum
    )
    scheduler = build_scheduler(optimizer, cfg.schedule, cfg.steps, cfg.warmup_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp and device.type == "cuda")
    step = 0
    metrics_path = out_dir / "metrics.jsonl"
    if resuming:
        ckpt = load_checkpoint(out_dir / CHECKPOINT_NAME)
        method.load_state_dict(ckpt["method"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng"])
        step = ckpt["step"]
        truncate_jsonl(metrics_path, step)
    else:
        metrics_path.write_text("")
    write_json(
        out_dir / "config.json",
        {
            "kind": "pretrain",
            "method": method.name,
            "config": asdict(cfg),
            "backbone": method.backbone.config,
            "version": __version__,
        },
    )

    started = time.perf_counter()
    first_step = step
    bar = tqdm(total=cfg.steps, initial=step, disable=not progress, desc=f"pretrain {method.name}")
    while step < cfg.steps:
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(step)
        index = torch.randint(len(dataset), (cfg.batch_size,), generator=generator).tolist()
        batch = _to(method.make_batch([dataset[i] for i in index], generator), device)
        method.train()
        t0 = time.perf_counter()
        with torch.autocast(device.type, enabled=scaler.is_enabled()):
            terms = method(batch, step)
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
        record = {k: float(v.detach()) for k, v in terms.items()}
        record.update(step=step, lr=scheduler.get_last_lr()[0], seconds=time.perf_counter() - t0)
        append_jsonl(metrics_path, record)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}")
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save_checkpoint(
                out_dir / CHECKPOINT_NAME,
                {
                    "method": method.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "rng": torch.get_rng_state(),
                    "step": step,
                },
            )
    bar.close()
    elapsed = time.perf_counter() - started

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
    }
    write_json(out_dir / "summary.json", summary)
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
