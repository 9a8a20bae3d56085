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
(:func:`nonlinear_schedule`).

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
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from monai.metrics import compute_dice
from torch import Tensor, nn
from torch.optim.lr_scheduler import (
    LambdaLR,
    LinearLR,
    LRScheduler,
    PolynomialLR,
    SequentialLR,
)
from tqdm.auto import tqdm

from medssl_kit import __version__
from medssl_kit.atomic import atomic_write_text
from medssl_kit.config import architecture_kwargs, get_profile
from medssl_kit.data.datasets import PatchDataset, SliceDataset, known_labels, load_volumes
from medssl_kit.data.io import CaseVolume
from medssl_kit.data.manifest import Manifest, load_manifest
from medssl_kit.data.views import (
    ViewSpec,
    apply_intensity,
    apply_spatial,
    sample_intensity,
    sample_spatial,
)
from medssl_kit.errors import MedsslError
from medssl_kit.evaluate.inference import predict_volume
from medssl_kit.evaluate.knn import DEFAULT_K, balanced_reference, knn_vote
from medssl_kit.evaluate.metrics import auroc, segmentation_metrics, summarise
from medssl_kit.evaluate.report import split_classes
from medssl_kit.evaluate.results import load_results, write_results
from medssl_kit.losses.segmentation import PartialDiceCELoss
from medssl_kit.models.heads import ClassificationHead
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
    default_workers,
    mean_terms,
    on_rank_zero,
    precision,
    rank_share,
    restore_rng,
    rng_entries,
    seed_rank,
    session,
    step_batches,
)
from medssl_kit.train.transfer import (
    KeyReport,
    architecture_kwargs_of,
    check_transferable_fits,
    load_transferable,
    read_transferable,
    save_transferable,
)

MODES = ("full", "probe", "classify", "knn", "linear", "nonlinear")
# Modes that put their own head on an ``fpn`` (the vox2vec / hierarchical papers' evaluation).
FPN_HEAD_MODES = ("linear", "nonlinear")
KNN_FEATURES = ("decoder", "encoder")
TRAIN_SPLITS = ("train", "pretrain")


@dataclass
class FinetuneConfig:
    """Everything a fine-tuning run depends on. ``None`` budgets come from the profile."""

    profile: str | None = None
    mode: str = "full"
    labeled: int | float | str = "all"
    seed: int = 0
    backbone: str = "unet"
    dims: int = 2
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    context: int = 0  # 2D: neighbouring slices on each side stacked as input channels
    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float = 1e-5
    val_every: int | None = None
    patience: int | None = None
    checkpoint_every: int | None = None
    crop_size: tuple[int, int] | None = None  # 2D training crops (inference: whole slices)
    patch_size: tuple[int, int, int] | None = None  # 3D training patch and inference ROI
    augment: bool = True
    batch_dice: bool = True  # Dice sums pooled over the batch (nnU-Net); False: per sample
    target_class: str | None = None  # classify: the class whose presence is predicted
    transfer: str = "all"  # "all" transferable weights, or "encoder" only (decoder re-initialised)
    # Learning-rate multiplier for the weights loaded from the init run (discriminative
    # fine-tuning); 1.0: one rate for every weight, 0.0: the loaded weights stay frozen (their
    # batch-norm statistics still follow the fine-tuning data).
    pretrained_lr_scale: float = 1.0
    # Steps of linear learning-rate warm-up before the poly decay; 0 (the profiles' recipe): the
    # decay starts at the full rate on the first step.
    warmup_steps: int = 0
    # knn mode: neighbours per vote, reference pixels drawn per class from the labelled cases,
    # and the features: "decoder" (the last, full-resolution decoder map) or "encoder" (every
    # encoder level, each L2-normalised and upsampled to full resolution, concatenated).
    knn_k: int = DEFAULT_K
    knn_per_class: int = 1000
    knn_features: str = "decoder"
    # nonlinear mode (the hierarchical paper's fine-tuning: 15K of 45K steps frozen, then the
    # backbone's rate raised exponentially over 1.2K steps): the share of the steps the backbone
    # stays frozen, the share over which its rate then rises, and the factor of the base rate
    # it rises from (Lightning's BackboneFinetuning, which the public code uses: 1/10).
    unfreeze_at: float = 1 / 3
    ramp_fraction: float = 1.2 / 45
    ramp_from: float = 0.1
    # A run folder whose network to build instead of the one these settings give (e.g. scratch
    # built like a pre-trained init of another size); the run's method name then says so.
    architecture_from: str | None = None
    # The split whose labelled cases are trained on: "train", or "pretrain" to train on the
    # pre-training pool's labels (a supervised start, the upper bound for what SSL on that pool
    # could transfer: `--init` a run made this way).
    train_split: str = "train"
    device: str = "auto"  # auto (CUDA where available) | cpu | cuda
    amp: bool | None = None  # mixed precision in training; None: on CUDA, off on the CPU
    workers: int | None = None  # batch-building processes; None: 0 on the CPU, up to 4 on CUDA
    channels_last: bool | None = None  # NHWC 2D convolutions; None: on CUDA for 2D

    def resolved(self) -> FinetuneConfig:
        """A copy with every ``None`` budget filled in from the profile."""
        prof = get_profile(self.profile)
        ft = prof.finetune
        out = copy.deepcopy(self)
        out.profile = prof.name
        if out.mode not in MODES:
            raise MedsslError(f"unknown fine-tuning mode '{out.mode}'; choose one of {MODES}")
        if out.dims not in (2, 3):
            raise MedsslError(f"dims must be 2 or 3, got {out.dims}")
        if out.transfer not in ("all", "encoder"):
            raise MedsslError(f"transfer must be 'all' or 'encoder', got {out.transfer!r}")
        if out.mode == "knn" and (out.dims != 2 or out.knn_features not in KNN_FEATURES):
            raise MedsslError(
                f"knn mode works on 2D slices with knn_features in {KNN_FEATURES}; got dims "
                f"{out.dims}, knn_features {out.knn_features!r}"
            )
        if out.train_split not in TRAIN_SPLITS:
            raise MedsslError(
                f"train_split must be one of {TRAIN_SPLITS} (val and test stay held out), "
                f"got {out.train_split!r}"
            )
        if out.mode in FPN_HEAD_MODES and out.backbone != "fpn" and not out.architecture_from:
            raise MedsslError(
                f"{out.mode} mode puts its head on the fpn's pyramid levels; pass --backbone fpn"
            )
        if not (0 <= out.unfreeze_at < 1 and out.ramp_fraction >= 0 and 0 < out.ramp_from <= 1):
            raise MedsslError(
                "unfreeze_at must be in [0, 1), ramp_fraction >= 0 and ramp_from in (0, 1]; got "
                f"{out.unfreeze_at!r}, {out.ramp_fraction!r}, {out.ramp_from!r}"
            )
        if not out.pretrained_lr_scale >= 0:
            raise MedsslError(f"pretrained_lr_scale must be >= 0, got {out.pretrained_lr_scale!r}")
        out.steps = 0 if out.mode == "knn" else out.steps or ft.steps
        if out.steps and not 0 <= out.warmup_steps < out.steps:
            raise MedsslError(
                f"warmup_steps must be >= 0 and below the {out.steps} training steps, "
                f"got {out.warmup_steps!r}"
            )
        out.batch_size = out.batch_size or (ft.batch_size if out.dims == 2 else ft.batch_size_3d)
        out.lr = out.lr or ft.lr
        out.val_every = out.val_every or ft.val_every
        out.patience = out.patience or ft.patience
        out.checkpoint_every = out.checkpoint_every or ft.checkpoint_every
        out.patch_size = tuple(out.patch_size or ft.patch_size)
        out.crop_size = tuple(out.crop_size or ft.crop_size)
        out.backbone_kwargs = {
            **architecture_kwargs(prof.name, out.backbone, out.dims),
            **out.backbone_kwargs,
        }
        return out


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
        amp=cfg.amp if cfg.amp is not None else run.device.type == "cuda",
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


class _Classifier(nn.Module):
    """A backbone's encoder followed by a global-pooling classification head."""

    def __init__(self, backbone: nn.Module, n_classes: int = 2):
        super().__init__()
        self.backbone = backbone
        self.head = ClassificationHead(backbone.encoder_channels[-1], n_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone.encode(x)[-1])


class _KnnSegmenter(nn.Module):
    """A frozen backbone whose pixel features are labelled by kNN voting against a reference set
    of labelled pixels (:meth:`fit`); ``forward`` returns log class probabilities."""

    def __init__(self, backbone: nn.Module, n_classes: int, cfg: FinetuneConfig):
        super().__init__()
        self.backbone = backbone.eval()
        self.n_classes, self.k, self.features = n_classes, cfg.knn_k, cfg.knn_features
        self.per_class, self.seed = cfg.knn_per_class, cfg.seed
        self.reference: Tensor | None = None
        self.reference_labels: Tensor | None = None

    def pixel_features(self, x: Tensor) -> Tensor:
        """``[B, F, H, W]`` features of every input pixel."""
        feats = self.backbone.forward_features(x)
        maps = [feats.decoder[-1]] if self.features == "decoder" else feats.encoder
        size = tuple(x.shape[2:])
        return torch.cat(
            [
                F.interpolate(F.normalize(m, dim=1), size=size, mode="bilinear")
                if tuple(m.shape[2:]) != size
                else F.normalize(m, dim=1)
                for m in maps
            ],
            1,
        )

    @torch.no_grad()
    def fit(self, slices: SliceDataset, manifest: Manifest, batch_size: int = 16) -> None:
        """Draw the reference set: up to ``per_class`` pixels of each class labelled in the
        slices' cases (ignored pixels, and classes a case does not label, are left out)."""
        self.backbone.eval()
        items = [slices[i] for i in range(len(slices))]  # read each slice once
        labels = []
        labels = torch.stack(
            [known_labels(item["label"].flatten(), manifest, item["case_id"]) for item in items]
        )  # [slices, pixels]
        flat = labels.flatten()
        valid = (flat >= 0).nonzero().flatten()
        g = torch.Generator().manual_seed(self.seed)
        chosen = valid[balanced_reference(flat[valid], self.per_class, g)]
        if len(chosen) == 0:
            raise MedsslError("knn mode found no labelled pixel in the labelled cases")
        rows, cols = chosen // labels.shape[1], chosen % labels.shape[1]  # chosen is sorted
        reference = []
        for start in range(0, len(items), batch_size):
            stop = min(start + batch_size, len(items))
            x = torch.stack([item["image"] for item in items[start:stop]])
            feats = self.pixel_features(x).flatten(2)  # [b, F, pixels]
            inside = (rows >= start) & (rows < stop)
            reference.append(feats[rows[inside] - start, :, cols[inside]])
        self.reference, self.reference_labels = torch.cat(reference), flat[chosen]

    def forward(self, x: Tensor) -> Tensor:
        if self.reference is None:
            raise MedsslError("the kNN segmenter has no reference set; call fit() first")
        feats = self.pixel_features(x)
        query = feats.movedim(1, -1).reshape(-1, feats.shape[1])
        probs = knn_vote(self.reference, self.reference_labels, query, self.n_classes, k=self.k)
        probs = probs.reshape(*feats.shape[:1], *feats.shape[2:], self.n_classes).movedim(-1, 1)
        return probs.clamp_min(1e-12).log()


def model_backbone(model: nn.Module) -> nn.Module:
    """The backbone inside a fine-tuned model (the model itself for segmentation)."""
    return model.backbone if isinstance(model, (_Classifier, _KnnSegmenter)) else model


def build_model(
    init: str | Path, manifest: Manifest, cfg: FinetuneConfig
) -> tuple[nn.Module, str, KeyReport | None]:
    """The model a run of ``cfg`` (resolved) starts from: ``(model, method, key_report)``.

    The network is a function of the fine-tuning settings alone (``cfg.backbone`` and its
    resolved ``backbone_kwargs``: the profile's :func:`~medssl_kit.config.architecture_kwargs`
    and the user's), so that scratch and every pre-trained start are the same network. ``init``
    is ``"scratch"`` or a run folder whose transferable weights are loaded (``method`` names where
    they come from, ``key_report`` what matched); a run of another structure is refused
    (:func:`~medssl_kit.train.transfer.check_transferable_fits`). Only where the user asks for
    it, ``cfg.architecture_from`` (a run folder) builds that run's network instead, e.g. scratch
    like an init of another size; ``method`` then says so (``"scratch [pixel_global's
    network]"``), and so does every report. ``model`` is the segmentation backbone, or for
    ``mode`` ``classify`` / ``knn`` the classifier / frozen kNN segmenter around it.
    """
    in_channels = manifest.num_channels * (2 * cfg.context + 1 if cfg.dims == 2 else 1)
    out_channels = manifest.num_classes
    name, kwargs = cfg.backbone, dict(cfg.backbone_kwargs)
    if cfg.architecture_from:
        name, kwargs = architecture_kwargs_of(cfg.architecture_from)
    if cfg.mode in FPN_HEAD_MODES:
        if name != "fpn":
            raise MedsslError(f"{cfg.mode} mode needs an fpn network, not '{name}'")
        kwargs["head"] = cfg.mode
    backbone = build_backbone(name, cfg.dims, in_channels, out_channels, **kwargs)
    method, report = "scratch", None
    if str(init) != "scratch":
        header = read_transferable(init)
        method = header["method"]
        check_transferable_fits(header, backbone.config, init)
        report = load_transferable(backbone, Path(init), encoder_only=cfg.transfer == "encoder")
        if cfg.pretrained_lr_scale == 0:
            for key, p in backbone.named_parameters():
                p.requires_grad = p.requires_grad and key not in report.matched
    if cfg.architecture_from:
        method = f"{method} [{read_transferable(cfg.architecture_from)['method']}'s network]"
    if cfg.train_split != "train":  # trained on the pool's labels: not a scratch run any more
        method = "supervised" if method == "scratch" else f"{method}+supervised"
    if cfg.mode in ("probe", "linear"):
        _freeze_all_but_head(backbone)
    if cfg.mode == "knn":
        return _KnnSegmenter(backbone, out_channels, cfg), method, report
    model = _Classifier(backbone) if cfg.mode == "classify" else backbone
    return model, method, report


def _param_groups(
    model: nn.Module, key_report: KeyReport | None, cfg: FinetuneConfig
) -> list[dict[str, Any]]:
    """Trainable parameters at the base rate, then those loaded from the init run at
    ``cfg.pretrained_lr_scale`` × the base rate."""
    if cfg.mode == "nonlinear":  # the head, then the backbone (its own rate, see _lr_schedule)
        named = list(model.named_parameters())
        return [
            {"params": [p for n, p in named if n.startswith("head.")]},
            {"params": [p for n, p in named if not n.startswith("head.")]},
        ]
    loaded_names = set(key_report.matched) if key_report else set()
    loaded = {id(p) for name, p in model_backbone(model).named_parameters() if name in loaded_names}
    trainable = [p for p in model.parameters() if p.requires_grad]
    if cfg.pretrained_lr_scale in (0, 1):  # 0: build_model froze the loaded weights
        return [{"params": trainable}]
    groups = [
        {"params": [p for p in trainable if id(p) not in loaded]},
        {
            "params": [p for p in trainable if id(p) in loaded],
            "lr": cfg.lr * cfg.pretrained_lr_scale,
        },
    ]
    return [g for g in groups if g["params"]]


def _lr_schedule(optimizer: torch.optim.Optimizer, cfg: FinetuneConfig) -> LRScheduler:
    """nnU-Net's poly decay (power 0.9) to zero at ``cfg.steps``, after ``cfg.warmup_steps`` of
    linear warm-up (rate × (step + 1) / warmup_steps), when there are any."""
    if cfg.mode == "nonlinear":
        head, backbone = nonlinear_schedule(cfg)
        return LambdaLR(optimizer, [head, backbone])
    decay = PolynomialLR(optimizer, total_iters=cfg.steps - cfg.warmup_steps, power=0.9)
    if not cfg.warmup_steps:
        return decay
    warmup = LinearLR(
        optimizer, start_factor=1 / cfg.warmup_steps, total_iters=cfg.warmup_steps - 1
    )
    return SequentialLR(optimizer, [warmup, decay], milestones=[cfg.warmup_steps])


def unfreeze_step(cfg: FinetuneConfig) -> int:
    """nonlinear mode: the first step (counting from 0) at which the backbone trains."""
    return round(cfg.unfreeze_at * cfg.steps)


def nonlinear_schedule(
    cfg: FinetuneConfig,
) -> tuple[Callable[[int], float], Callable[[int], float]]:
    """nonlinear mode's rate factors of the head and of the backbone at step ``s`` (from 0).

    Head: nnU-Net's poly decay ``(1 − s/S)^0.9``, as every mode. Backbone: 0 before
    :func:`unfreeze_step` ``U``; then ``ramp_from^(1 − (s − U)/R)`` — exponential from
    ``ramp_from`` to 1 over ``R = max(1, round(ramp_fraction · S))`` steps — times the poly
    decay (the hierarchical paper raises the backbone's rate exponentially after 15K of 45K
    frozen steps over 1.2K steps).
    """
    start, ramp = unfreeze_step(cfg), max(1, round(cfg.ramp_fraction * cfg.steps))

    def poly(s: int) -> float:
        return (1.0 - min(s, cfg.steps) / cfg.steps) ** 0.9

    def backbone(s: int) -> float:
        if s < start:
            return 0.0
        return cfg.ramp_from ** max(0.0, 1.0 - (s - start) / ramp) * poly(s)

    return poly, backbone


def _freeze_all_but_head(backbone: nn.Module) -> None:
    head = [n for n, _ in backbone.named_parameters() if n.startswith("head.")]
    if not head:
        raise MedsslError(f"backbone '{backbone.name}' has no 'head' to train in probe mode")
    for name, p in backbone.named_parameters():
        p.requires_grad = name.startswith("head.")


class _Task:
    """What differs between segmentation (2D / 3D) and slice classification."""

    def __init__(self, cfg: FinetuneConfig, manifest: Manifest):
        self.cfg = cfg
        self.manifest = manifest
        self.classes = dict(manifest.labels)
        self.n_classes = manifest.num_classes

    @staticmethod
    def make(cfg: FinetuneConfig, manifest: Manifest, model: nn.Module) -> _Task:
        if cfg.mode == "classify":
            return _ClassifyTask(cfg, manifest)
        return _SegmentTask(cfg, manifest)

    def set_train_modes(self, model: nn.Module, step: int) -> None:
        """Frozen parts keep their normalisation statistics (eval mode) while probing; in
        nonlinear mode the backbone is frozen so before :func:`unfreeze_step`, then trains."""
        frozen = self.cfg.mode in ("probe", "linear")
        if self.cfg.mode == "nonlinear":
            frozen = step < unfreeze_step(self.cfg)
            for name, p in model.named_parameters():
                if not name.startswith("head."):
                    p.requires_grad = not frozen
        if frozen:
            for name, module in model.named_modules():
                if name and not name.startswith("head"):
                    module.eval()

    def generator(self, step: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)


class _SegmentTask(_Task):
    def __init__(self, cfg: FinetuneConfig, manifest: Manifest):
        super().__init__(cfg, manifest)
        self.criterion = PartialDiceCELoss(ignore_index=manifest.ignore_index, batch=cfg.batch_dice)
        self.organs, self.lesions = split_classes(self.classes)

    def labelled_mask(self, vol: CaseVolume) -> Tensor:
        mask = torch.zeros(self.n_classes, dtype=torch.bool)
        mask[[0, *self.manifest.labelled_classes(self.manifest.get_case(vol.case_id))]] = True
        return mask

    def batch_source(
        self, vols: list[CaseVolume]
    ) -> Callable[[int], tuple[Tensor, Tensor, Tensor]]:
        cfg = self.cfg
        masks = {v.case_id: self.labelled_mask(v) for v in vols}
        if cfg.dims == 2:
            data = SliceDataset(vols, context=cfg.context, skip_empty=True, with_label=True)
            spec = _crop_spec(cfg.crop_size, tuple(vols[0].image.shape[-2:]), cfg.augment)
        else:
            data = PatchDataset(vols, cfg.patch_size, samples_per_volume=8, seed=cfg.seed)
            spec = None

        def batch(step: int) -> tuple[Tensor, Tensor, Tensor]:
            g = self.generator(step)
            idx = torch.randint(len(data), (cfg.batch_size,), generator=g).tolist()
            idx, own = rank_share(idx, step, cfg.seed)  # one process: idx, None
            g = g if own is None else own
            images, labels, labelled = [], [], []
            for i in idx:
                item = data[i]
                image, label = item["image"], item["label"]
                if spec is not None:
                    spatial = sample_spatial(tuple(image.shape[1:]), spec, g)
                    image, _ = apply_spatial(image, spatial)
                    label, _ = apply_spatial(label.float(), spatial, mode="nearest")
                    image = apply_intensity(image, sample_intensity(spec, g))
                images.append(image)
                labels.append(label.long())
                labelled.append(masks[item["case_id"]])
            return torch.stack(images), torch.stack(labels), torch.stack(labelled)

        return batch

    def loss(self, logits: Tensor, target: Tensor, labelled: Tensor) -> Tensor:
        return self.criterion(logits, target, labelled)

    def _predict(self, model: nn.Module, vol: CaseVolume) -> Tensor:
        cfg = self.cfg
        probs = predict_volume(
            model,
            vol.image,
            cfg.dims,
            roi_size=cfg.patch_size if cfg.dims == 3 else getattr(model, "img_size", None),
            context=cfg.context,
        )
        return probs.argmax(0)

    def validate(self, model: nn.Module, vols: list[CaseVolume]) -> float:
        """Mean Dice over the labelled foreground classes present in each validation volume."""
        scores = []
        for vol in vols:
            target = vol.label[0]
            valid = target != self.manifest.ignore_index
            dice = compute_dice(
                self._onehot(self._predict(model, vol), valid),
                self._onehot(target, valid),
                include_background=False,
                ignore_empty=True,
            )[0]
            labelled = self.manifest.labelled_classes(self.manifest.get_case(vol.case_id))
            scores += [float(dice[c - 1]) for c in labelled if not torch.isnan(dice[c - 1])]
        return sum(scores) / max(len(scores), 1)

    def _onehot(self, classes: Tensor, valid: Tensor) -> Tensor:
        """[1, K, *S] one-hot of a class map, zero on ignored voxels."""
        onehot = F.one_hot(torch.where(valid, classes, 0), self.n_classes).movedim(-1, 0)
        return (onehot * valid)[None]

    def evaluate(self, model: nn.Module, vols: list[CaseVolume], out_dir: Path):
        rows = []
        for vol in vols:
            pred = self._predict(model, vol)
            case = self.manifest.get_case(vol.case_id)
            for r in segmentation_metrics(
                pred.numpy(),
                vol.label[0].numpy(),
                self.classes,
                vol.spacing,
                ignore_index=self.manifest.ignore_index,
                labelled_classes=self.manifest.labelled_classes(case),
                empty="nan",
            ):
                rows.append({"case": vol.case_id, **r})
        return rows, summarise(rows, self.organs, self.lesions)


class _ClassifyTask(_Task):
    """Slice-level "target class present" classification (AUROC), balanced sampling."""

    def __init__(self, cfg: FinetuneConfig, manifest: Manifest):
        super().__init__(cfg, manifest)
        if cfg.dims != 2:
            raise MedsslError("classify mode works on 2D slices; pass --dims 2")
        names = {name: c for c, name in self.classes.items()}
        lesions = split_classes(self.classes)[1]
        wanted = cfg.target_class or (self.classes[lesions[0]] if lesions else None)
        if wanted not in names:
            raise MedsslError(
                f"classify: no class named {wanted!r} in manifest '{manifest.display_path}' "
                f"(classes: {sorted(names)}); pass --set target_class=NAME"
            )
        self.target = names[wanted]
        self.target_name = wanted
        self.criterion = nn.CrossEntropyLoss()

    def _slices(self, vols: list[CaseVolume]) -> tuple[SliceDataset, Tensor]:
        data = SliceDataset(vols, context=self.cfg.context, skip_empty=True, with_label=True)
        present = torch.tensor(
            [bool((data[i]["label"] == self.target).any()) for i in range(len(data))]
        )
        return data, present

    def batch_source(self, vols):
        data, present = self._slices(vols)
        pos, neg = present.nonzero()[:, 0], (~present).nonzero()[:, 0]
        if len(pos) == 0 or len(neg) == 0:
            raise MedsslError(
                f"classify: the labelled train cases need slices with and without "
                f"'{self.target_name}' (got {len(pos)} with, {len(neg)} without); raise the budget"
            )

        def batch(step: int):
            g = self.generator(step)
            half = self.cfg.batch_size // 2
            idx = torch.cat(
                [
                    pos[torch.randint(len(pos), (half,), generator=g)],
                    neg[torch.randint(len(neg), (self.cfg.batch_size - half,), generator=g)],
                ]
            ).tolist()
            idx, _ = rank_share(idx, step, self.cfg.seed)  # one process: idx
            images = torch.stack([data[i]["image"] for i in idx])
            target = present[idx].long()
            return images, target, None

        return batch

    def loss(self, logits: Tensor, target: Tensor, labelled: Tensor | None) -> Tensor:
        return self.criterion(logits, target)

    def _scores(self, model: nn.Module, vols: list[CaseVolume]):
        data, present = self._slices(vols)
        model.eval()
        device = next(model.parameters()).device
        with torch.no_grad():
            scores = torch.cat(
                [
                    torch.softmax(
                        model(torch.stack([data[i]["image"] for i in chunk]).to(device)), 1
                    )[:, 1].cpu()
                    for chunk in torch.arange(len(data)).split(32)
                ]
            )
        return data, present, scores

    def validate(self, model: nn.Module, vols: list[CaseVolume]) -> float:
        _, present, scores = self._scores(model, vols)
        value = auroc(scores.numpy(), present.numpy())
        return 0.0 if math.isnan(value) else value

    def evaluate(self, model: nn.Module, vols: list[CaseVolume], out_dir: Path):
        data, present, scores = self._scores(model, vols)
        lines = ["case,slice,score,target"] + [
            f"{data[i]['case_id']},{data[i]['slice']},{float(scores[i]):.9g},{int(present[i])}"
            for i in range(len(data))
        ]
        atomic_write_text(out_dir / "predictions.csv", "\n".join(lines) + "\n")
        return [], {
            "target_class": self.target_name,
            "auroc": auroc(scores.numpy(), present.numpy()),
            "test_slices": len(data),
            "positive_slices": int(present.sum()),
        }


def _crop_spec(crop: tuple[int, int], image: tuple[int, int], augment: bool) -> ViewSpec:
    """2D training crops of ``crop`` pixels at about the native scale.

    With ``augment``: zoom ±15 %, aspect 0.85–1.18, rotation ≤ 10°, and the view module's
    intensity jitter; never flips nor 90° rotations (left and right organs would swap meaning).
    Without: plain random crops at the native scale.
    """
    crop = (min(crop[0], image[0]), min(crop[1], image[1]))
    fraction = crop[0] * crop[1] / (image[0] * image[1])
    jitter = (0.75, 1.3) if augment else (1.0, 1.0)
    ratio = crop[1] / crop[0]
    return ViewSpec(
        size=crop,
        scale=(fraction * jitter[0], min(1.0, fraction * jitter[1])),
        ratio=(ratio * 0.85, ratio * 1.18) if augment else (ratio, ratio),
        flip_prob=0.0,
        rot90_prob=0.0,
        max_rotation_deg=10.0 if augment else 0.0,
        **({} if augment else _NO_INTENSITY),
    )


_NO_INTENSITY = dict(
    gamma_prob=0.0, contrast_prob=0.0, brightness_prob=0.0, blur_prob=0.0, noise_prob=0.0
)


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
    progress: bool = False,
    note: Callable[[str], None] = print,
) -> list[FinetuneResult]:
    """Fine-tune once per budget × seed into ``out_dir/labeled-<b>_seed-<s>``.

    Budgets that select the same number of labelled cases (:func:`label_budget_cases`; e.g. 1
    and "all" when the manifest has one labelled training case) select the same cases for a seed,
    so they are fine-tuned once, under the first of them, and ``note`` is told which budgets
    were merged. A run folder that already holds a ``summary.json`` is a finished run and is read
    back, not repeated; one with a checkpoint but no summary (killed) is resumed.
    """
    manifest = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
    counts = label_budget_cases(manifest, list(budgets), cfg.train_split)
    kept: dict[int, list[int | float | str]] = {}
    for budget in dict.fromkeys(budgets):
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
        for seed in seeds:
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
