"""pixel_global — pixel-global SSL with an uncertainty-aware context stabilizer (DESIGN §4.1).

Zhang & Zhang, "Pixel-global Self-supervised Learning with Uncertainty-aware Context Stabilizer".
A student and a teacher share one encoder-decoder backbone; the teacher is an exponential moving
average (EMA) of the student and gets no gradient. Each training slice ``x`` gives two augmented
views ``x1, x2``; both networks see both views. The loss (eq. 1) is ``ℓ = ℓ_global + ℓ_local``:

- ``ℓ_global`` (eq. 3): the bottleneck features, average-pooled and projected by an MLP to ``K``
  logits, turned into distributions with temperatures (DINO: the teacher centred and sharpened),
  ``−z'_t log z'_s``.
- ``ℓ_local`` (eq. 4–6): the decoder's full-resolution features projected per pixel by a 1×1-conv
  head, softmax over channels; every view-1 pixel is compared with the teacher's output at the
  same anatomical point of view 2 (the "augmentation prior dictionary": exact correspondence from
  the recorded augmentation parameters, :func:`~medssl_kit.data.views.correspondence`); pixels
  without a partner are left out. The context stabilizer (eq. 5) subtracts the same discrepancy
  measured on another training image ``x̃`` put through *the same* augmentations
  (:func:`~medssl_kit.data.views.replay`); the teacher's Monte-Carlo dropout uncertainty ``U``
  weights each pixel by ``1 − U`` (eq. 6).

Ablation switches (the paper's Fig. 4; :data:`ABLATIONS`): ``pixel_matching`` (off = "GO", global
only), ``stabilizer`` ("GPC" adds it to "GP"), ``uncertainty`` ("Ours" adds it to "GPC").
``stabilizer`` and ``uncertainty`` only act with ``pixel_matching``. Logged terms: ``loss``,
``global``, and with pixel matching ``local`` (the optimised eq. 4/5/6 value), ``pixel`` (the mean
discrepancy on ``x``), ``stabilizer`` (the same on ``x̃``), ``valid_fraction`` (view-1 pixels with
a partner) and ``mean_uncertainty`` (mean ``U`` over those pixels).

Choices the paper leaves open (or gets wrong), and why
------------------------------------------------------
- **EMA formula.** Eq. 2 reads ``θ_t ← λ θ_s + (1 − λ) θ_s`` (θ_s twice, a typo); implemented is
  the EMA of BYOL/DINO that the text describes, ``θ_t ← λ θ_t + (1 − λ) θ_s``, with
  ``λ_k = 1 − (1 − λ_0)(cos(π k / K) + 1) / 2``, ``K`` the run's steps and ``k`` the steps
  completed before this update (0 for the first, so the first update uses ``λ_0`` and the last
  one ``1 − O(K⁻²)``). ``λ_0`` (``base_momentum``) is the paper's 0.996 at ``gpu``; that value is
  made for ~10^5 steps, and after ``K`` steps the teacher still holds about
  ``exp(−(1 − λ_0) K / 2)`` of its random initialisation (0.45 at the ``cpu`` budget's 400
  steps), so the CPU profiles lower it to their ``ema_momentum`` (0.99), and a run too short for
  that to ``1 − 8 / K`` (:func:`~medssl_kit.methods.ema.ema_base`: 0.98 at ``cpu``'s 400 steps,
  a share of 0.018; :func:`~medssl_kit.methods.ema.init_share`).
  Only parameters are averaged; the teacher's batch-norm statistics are its own (updated by its
  forward passes, Mean-Teacher practice).
- **Temperatures and centring** (DINO's values; the paper only says "softmax"): student
  ``τ_s = 0.1``, teacher ``τ_t = 0.04``, teacher logits centred by a running mean with momentum
  0.9 (``student_temp``, ``teacher_temp``, ``center_momentum``). The pixel softmax uses its own
  settings with the same values (``pixel_student_temp``, ``pixel_teacher_temp``) and its own
  centre, the mean teacher pixel logit over the batch and all pixels of the two views. Centres
  are updated in :meth:`PixelGlobal.on_step_end` from the batch just used (DINO updates them
  right after the loss), so ``forward`` has no side effects.
- **Projections.** Global: average pooling of the encoder bottleneck, then a 3-layer MLP
  (Linear-BN-ReLU ×2, Linear; DINO/BYOL style without DINO's weight-normalised last layer),
  hidden 512 → ``K = 256`` on CPU, 2048 → 1024 on the ``gpu`` profile. Pixel: the decoder's
  last (full-resolution) feature map, not the segmentation logits, through a 2-layer 1×1-conv
  head (conv-BN-ReLU-conv), hidden 64 → 32 channels (128 → 64 on ``gpu``).
- **Symmetrisation.** The paper feeds ``x1`` to the student and ``x2`` to the teacher; here both
  directions are used (student view 1 ↔ teacher view 2 and student view 2 ↔ teacher view 1), for
  ``ℓ_global`` (averaged) and for ``ℓ_local`` (pixels of both directions pooled), as DINO does.
  The teacher runs on both views anyway, and the student gets twice the signal per step.
- **Pixel discrepancy.** ``local_discrepancy="kl"`` (default) uses ``KL(y'_t ‖ y'_s)``, i.e. the
  paper's cross-entropy minus the teacher's entropy (no gradient): identical updates for eq. 4
  and eq. 6 without stabilizer, zero at perfect agreement, and inside eq. 5's absolute value it
  compares the discrepancies of ``x`` and ``x̃`` without the difference of the teacher's
  entropies on the two images. ``"cross_entropy"`` is the literal eq. 4/5.
- **Matching.** The teacher's probability maps (and ``U``) of view 2 are sampled at the view-1
  pixels' partner points by bilinear interpolation (``align_corners=True``, the decoder output
  is at view resolution); an interpolated distribution is still a distribution. ``ℓ_local`` is
  normalised by the number of valid (matched) pixels, summed over both directions and the batch.
- **Context stabilizer.** ``x̃`` for sample ``b`` is the batch's next slice, ``x_{(b+1) mod B}``
  (a roll of the batch), resampled to ``x``'s size if the slices differ in size; it gets the
  pair's spatial *and* intensity parameters (noise seeds included), hence the same matching
  grid. It needs ``batch_size >= 2``. **How eq. 5 is applied** (``stabilizer_form``): the
  literal ``|d_i − d̃_i|``, differentiated through both terms (``"absolute"``), is minimised by
  any representation whose discrepancy on ``x`` equals that on ``x̃`` — an input-independent,
  near-uniform pixel distribution included — and half of its gradient pushes matched pixels
  *apart*. Measured at the ``cpu`` budget (400 steps, ``runs/pg-abl``): the teacher's mean
  normalised pixel entropy ends at 0.37 without the stabilizer (GP), 0.71 with the literal
  stabilizer (GPC) and 0.78 with it and the uncertainty weighting, whose ``1 − U`` then mutes
  what is left of the dense term (0.03). The default ``"excess"`` reads "cancel the gap" as a
  baseline: ``max(0, d_i − sg(d̃_i))`` penalises only the discrepancy beyond the gap the same
  augmentations open on another image, never rewards disagreement, and gives ``d̃`` no
  gradient (the student's ``x̃`` pass only supplies the baseline); it keeps the pixel
  distributions sharp (GPC: 0.40). ``stabilizer_form="absolute"`` reproduces the literal
  equation. The logged ``pixel`` term is the plain discrepancy ``d``, ``stabilizer`` is ``d̃``.
- **Uncertainty (eq. 6).** ``U`` is the predictive entropy of the mean of ``mc_samples = 20``
  teacher pixel distributions (the same centred, sharpened softmax as the targets), normalised by
  ``log K`` to [0, 1]; "average prediction entropy" is read as the entropy of the average
  prediction (UA-MT's, the paper's ref. 23: ``U`` grows when the passes disagree, and with how
  flat the teacher's output is). ``uncertainty_measure="mutual_information"`` keeps only the
  disagreement of the passes (BALD: that entropy minus the passes' mean entropy), 0 wherever the
  passes agree. **Batch norm in the passes normalises exactly as the pass that gave the
  targets**: in training, with the batch statistics that pass used (each layer's, recorded during
  the teacher's decoder pass and replayed as fixed statistics), in eval mode with the running
  statistics; so the passes differ from the targets by their dropout masks alone (with dropout
  off they reproduce the targets). Before, the passes ran with running statistics while the
  targets used batch statistics, and early in training the two agreed on the top prototype for
  only 11–28 % of pixels: ``1 − U`` tracked that mismatch. Efficiency: with a backbone that has
  ``pass_decoder`` (``unet``) nothing before the first dropout layer runs again: the passes
  start from the input the target pass gave that layer (captured with a forward pre-hook),
  statistics are noted only for the batch-norm layers after it, and only the rest of the
  decoder and the pixel head are repeated (other backbones repeat the whole decoder on the
  encoder features), ``mc_chunk`` passes per call (``None``: all in one call), under
  ``no_grad``; the replayed statistics make any chunking equal. Without the uncertainty
  weighting nothing is noted. Dropout masks are drawn explicitly, from one generator per pass
  seeded from the batch (forward hooks on the decoder's ``nn.Dropout`` layers, which otherwise
  stay off): any chunking gives the same ``U`` as a loop of single passes, results are
  reproducible, and the global RNG is untouched. The ``gpu`` profile batches all passes in one
  call; the CPU profiles use ``mc_chunk=1`` (each call still batches the ``2B`` views): on one
  CPU core at the ``cpu`` profile (16 views of 96²) one call of all 20 passes took 8–12 s
  against 2.6–3.6 s for 20 calls of one pass, because the 20× larger activations (~0.4 GB each)
  fall out of cache and memory traffic dominates.
- **The CPU profiles' cheaper estimate** (:data:`CPU_MC`). Even so, 20 passes through the whole
  decoder made a ``cpu`` step ×2.85–3.12 the step without uncertainty (benchmarks/RESULTS.md).
  The CPU profiles therefore put the dropout in the last decoder block only (``dropout_levels=1``,
  as UA-MT, the paper's ref. 23, drops out just before its output layer), so everything before it
  runs once for all passes (``UNet.pass_decoder``), and take 8 passes: ×1.24–1.67 in pairs of
  one benchmark run (20 passes with last-block dropout alone: ×2.37); since the passes start
  from the target pass's activations, ×1.35–1.63, median ×1.39 over four pairs of 40 steps
  (benchmarks/RESULTS.md, 2026-12-07). Measured on the trained Ours run's teacher
  (benchmarks/bench_mc_uncertainty.py, 32 test slices): this ``U`` correlates with the paper's
  estimate (every level, 20 passes) at r = 0.972, mean |ΔU| 0.036 for a mean ``U`` of 0.44
  (two draws of the paper's estimate: r = 0.999, 0.005). The ``gpu`` profile keeps the paper's
  estimate.
- **Student dropout.** The backbone has decoder dropout (needed for MC dropout, default 0.1);
  the student trains with it active, the teacher's targets are computed with it off.
- **Views.** ``sample_view_pair`` at ``crop_size`` pixels (``gpu``: 224² as in the paper; CPU
  profiles: the profile's crop): random resized crop of 40–100 % of the slice area (DINO's global
  crops; the paper gives no range), aspect 3/4–4/3, flips of each axis with p 0.5 (the paper's
  "vertical & horizontal flipping", although fine-tuning never flips: measured at ``cpu``,
  GP pre-trained without flips fine-tuned worse at one labelled case, docs/results.md), free
  rotation up to ±10° (no 90° turns), contrast ×0.75–1.25 and gamma 0.7–1.5 each with p 0.5;
  no brightness, blur or noise (the paper lists none). Override with the ``view`` setting (a
  dict of :class:`~medssl_kit.data.views.ViewSpec` fields).
- **Transfer.** :meth:`transferable_state` returns the *student*'s encoder and decoder (not the
  segmentation head, which pre-training never trains). The paper keeps the student ("we keep its
  parameters and fine-tune them"); DINO transfers the teacher, which is the better network in its
  experiments. ``transfer="teacher"`` switches, and the teacher is always in the checkpoint.
  Measured at ``cpu`` (GP, one labelled case): the teacher fine-tunes no better (docs/results.md).
- **Optimisation.** ``gpu``: the paper's setting — ResUNet50 (``resunet``, resnet50), batch 8,
  LARS lr 0.2 with cosine decay and a warm-up of 2 of 500 epochs (0.4 % of the steps: 80),
  weight decay 1.5e-6 (BYOL). CPU profiles: a ``unet`` with the loop's Adam 1e-3 and cosine, the
  optimiser every method uses at these budgets, so that CPU comparisons between methods differ
  in the method only (measured at ``cpu``, GP at one labelled case: the paper's LARS, with the
  ``unet`` or the ResUNet50, fine-tunes no better than scratch in the same network; see
  docs/results.md).
  The uncertainty weighting made this method the dearest per step (×3 with 20 passes through
  the whole decoder), so at ``cpu`` it trains 400 steps on 64² views (:data:`CPU_BUDGET`) within
  the profile's 10-minute pre-training budget; the other methods run the profile's 1000 steps on
  96² views.
- **Several processes** (DDP, ``--nproc N``; :mod:`medssl_kit.distributed`): as DINO across
  GPUs, the centres are updated with the teacher logits' mean over all ranks
  (:func:`~medssl_kit.losses.pixel_global.updated_center`) and the global heads' batch norm
  (student and teacher) normalises over the global batch (``SyncBatchNorm`` on CUDA,
  :class:`~medssl_kit.distributed.GatheredBatchNorm` on the CPU). The backbone's and the pixel
  head's batch norm, the MC-dropout passes and the context stabilizer (``x̃`` is the next image
  of the rank's share, so each rank needs a share of at least 2) stay per rank.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medssl_kit.config import get_profile
from medssl_kit.data.augment import randint
from medssl_kit.data.views import ViewPair, ViewSpec, correspondence, replay, sample_view_pair
from medssl_kit.errors import MedsslError
from medssl_kit.losses import pixel_global as L
from medssl_kit.methods.base import PretrainMethod
from medssl_kit.methods.ema import ema_update_, frozen_copy, teacher_momentum
from medssl_kit.models.base import RecordedBatchStatistics
from medssl_kit.models.heads import MLPHead, PixelProjectionHead

# The paper's ablation (Fig. 4) as settings.
ABLATIONS: dict[str, dict[str, bool]] = {
    "GO": {"pixel_matching": False, "stabilizer": False, "uncertainty": False},
    "GP": {"pixel_matching": True, "stabilizer": False, "uncertainty": False},
    "GPC": {"pixel_matching": True, "stabilizer": True, "uncertainty": False},
    "Ours": {"pixel_matching": True, "stabilizer": True, "uncertainty": True},
}

VIEW_DEFAULTS: dict[str, Any] = {
    "scale": (0.4, 1.0),
    "ratio": (3 / 4, 4 / 3),
    "flip_prob": 0.5,
    "rot90_prob": 0.0,
    "max_rotation_deg": 10.0,
    "gamma": (0.7, 1.5),
    "gamma_prob": 0.5,
    "contrast": (0.75, 1.25),
    "contrast_prob": 0.5,
    "brightness_prob": 0.0,
    "blur_prob": 0.0,
    "noise_prob": 0.0,
}

SETTINGS: dict[str, Any] = {
    **ABLATIONS["Ours"],
    "mc_samples": 20,
    "mc_chunk": None,
    "uncertainty_measure": "entropy",
    "student_temp": 0.1,
    "teacher_temp": 0.04,
    "pixel_student_temp": 0.1,
    "pixel_teacher_temp": 0.04,
    "center_momentum": 0.9,
    "base_momentum": 0.996,
    "global_hidden": 512,
    "global_dim": 256,
    "pixel_hidden": 64,
    "pixel_dim": 32,
    "local_discrepancy": "kl",
    "stabilizer_form": "excess",
    "transfer": "student",
    "view": {},
}
# The cpu profile's budget (≤ 10 minutes on 2 cores; docstring "Optimisation"): 64² views, the
# paper's 20 MC-dropout passes, 400 steps. Measured with benchmarks/bench_pretrain.py on a quiet
# 2-core machine: 1.36 s/step (64², 20 passes) against 3.5 s/step at the profile's 96² crops.
CPU_BUDGET: dict[str, Any] = {"steps": 400, "crop_size": (64, 64)}
# The CPU profiles' MC-dropout estimate (docstring "The CPU profiles' cheaper estimate"): dropout
# in the last decoder block only, 8 passes.
CPU_MC: dict[str, Any] = {"dropout_levels": 1, "mc_samples": 8}
DROPOUT = 0.1
UNCERTAINTY_MEASURES = ("entropy", "mutual_information")


def _swapped(pair: ViewPair) -> ViewPair:
    """The same pair with view 1 and view 2 exchanged (for view-2 → view-1 correspondence)."""
    return replace(
        pair,
        view1=pair.view2,
        view2=pair.view1,
        coords1=pair.coords2,
        coords2=pair.coords1,
        spatial1=pair.spatial2,
        spatial2=pair.spatial1,
        intensity1=pair.intensity2,
        intensity2=pair.intensity1,
    )


def _warp(maps: Tensor, grid: Tensor) -> Tensor:
    """Sample ``maps[N, C, *S]`` at ``grid[N, *S', 2]`` (bilinear, ``align_corners=True``)."""
    return F.grid_sample(maps, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


class _PassDropout:
    """Forward hooks making element-wise ``nn.Dropout`` layers draw one mask per MC pass.

    The layers stay in eval mode (identity); each hook multiplies its layer's output by
    ``Bernoulli(1 − p) / (1 − p)`` masks. An input of ``n · N`` rows holds ``n`` passes of ``N``
    rows (pass-major); pass ``t``'s mask is drawn from ``generators[t]``, so a batched call and
    a loop of single-pass calls draw the same masks.
    """

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        for layer in layers:
            if type(layer) is not nn.Dropout:
                raise MedsslError(
                    f"pixel_global's MC dropout needs element-wise nn.Dropout layers in the "
                    f"decoder, found {type(layer).__name__}"
                )
        self.generators: list[torch.Generator] = []
        self._handles = [layer.register_forward_hook(self._hook) for layer in layers]

    def _hook(self, module: nn.Module, inputs: Any, output: Tensor) -> Tensor:
        draws = torch.empty_like(output).unflatten(0, (len(self.generators), -1))
        for draw, g in zip(draws, self.generators, strict=True):
            draw.uniform_(generator=g)  # the same numbers torch.rand would draw
        keep = draws.flatten(0, 1) >= module.p
        return output.mul_(keep).div_(1.0 - module.p)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@contextmanager
def _inputs_of(layer: nn.Module | None) -> Iterator[list[Tensor]]:
    """Copies of the inputs ``layer`` is called with inside the block (none for ``None``)."""
    seen: list[Tensor] = []
    if layer is None:
        yield seen
        return
    handle = layer.register_forward_pre_hook(lambda _, inputs: seen.append(inputs[0].clone()))
    try:
        yield seen
    finally:
        handle.remove()


class PixelGlobal(PretrainMethod):
    """Pixel-global SSL with the uncertainty-aware context stabilizer (see the module docstring).

    Args:
        backbone: a 2D ``unet`` or ``resunet`` (any backbone with ``encode``/``decode`` and a
            full-resolution last decoder map); with ``uncertainty`` it needs decoder dropout.
        cfg: :data:`SETTINGS` keys (unknown keys are an error) plus ``crop_size`` (view size).
    """

    name = "pixel_global"
    spatial_dims = (2,)
    dataset_kind = "slices"
    default_backbone = "unet"
    sync_batchnorm = ("global_head", "teacher.global_head")

    def __init__(self, backbone: nn.Module, cfg: dict[str, Any] | None = None):
        super().__init__(backbone, cfg)
        self.cfg = cfg = self.resolve_settings(SETTINGS)
        if cfg["local_discrepancy"] not in L.DISCREPANCIES:
            raise MedsslError(
                f"pixel_global: local_discrepancy must be one of {L.DISCREPANCIES}, "
                f"got {cfg['local_discrepancy']!r}"
            )
        if cfg["stabilizer_form"] not in L.STABILIZER_FORMS:
            raise MedsslError(
                f"pixel_global: stabilizer_form must be one of {L.STABILIZER_FORMS}, "
                f"got {cfg['stabilizer_form']!r}"
            )
        if cfg["transfer"] not in ("student", "teacher"):
            raise MedsslError("pixel_global: transfer must be 'student' or 'teacher'")
        if cfg["uncertainty_measure"] not in UNCERTAINTY_MEASURES:
            raise MedsslError(
                f"pixel_global: uncertainty_measure must be one of {UNCERTAINTY_MEASURES}, "
                f"got {cfg['uncertainty_measure']!r}"
            )
        if int(cfg["mc_samples"]) < 1:
            raise MedsslError(f"pixel_global: mc_samples must be >= 1, got {cfg['mc_samples']}")
        if self.uses_uncertainty and not backbone.dropout_layers:
            raise MedsslError(
                "pixel_global: the uncertainty weighting needs a backbone with decoder dropout "
                "(backbone_kwargs dropout > 0), or set uncertainty=false"
            )
        crop = cfg.get("crop_size") or get_profile(None).pretrain.crop_size
        self.view_spec = ViewSpec(size=tuple(crop), **{**VIEW_DEFAULTS, **cfg["view"]})

        bottleneck = backbone.encoder_channels[-1]
        self.global_head = MLPHead(
            bottleneck, cfg["global_hidden"], cfg["global_dim"], n_layers=3, norm="batch"
        )
        self.pixel_head = PixelProjectionHead(
            2, backbone.decoder_channels[-1], cfg["pixel_hidden"], cfg["pixel_dim"], n_layers=2
        )
        student = nn.ModuleDict(
            {"backbone": backbone, "global_head": self.global_head, "pixel_head": self.pixel_head}
        )
        self.teacher = frozen_copy(student)  # the EMA teacher (methods.ema)
        self.register_buffer("center_global", torch.zeros(cfg["global_dim"]))
        self.register_buffer("center_pixel", torch.zeros(cfg["pixel_dim"]))
        self._pending_centers: tuple[Tensor, Tensor | None] | None = None

    # --- settings -----------------------------------------------------------------------------

    @classmethod
    def default_config(cls, profile: str, spatial_dims: int) -> dict[str, Any]:
        """The method's settings and, for ``gpu``, the paper's loop settings (see the docstring)."""
        settings = {**SETTINGS, "base_momentum": None}  # the run's (methods.ema.ema_base)
        cpu_mc = {"mc_chunk": 1, "mc_samples": CPU_MC["mc_samples"]}
        if profile == "cpu":
            return {**settings, **cpu_mc, **CPU_BUDGET}
        if profile != "gpu":
            return {**settings, **cpu_mc}
        warmup = round(get_profile(profile).pretrain.steps * 2 / 500)
        return {
            **settings,
            "global_hidden": 2048,
            "global_dim": 1024,
            "pixel_hidden": 128,
            "pixel_dim": 64,
            "backbone": "resunet",
            "optimizer": "lars",
            "lr": 0.2,
            "weight_decay": 1.5e-6,
            "warmup_steps": warmup,
            "batch_size": 8,
            "crop_size": (224, 224),
        }

    @classmethod
    def backbone_kwargs(cls, profile: str, spatial_dims: int, backbone: str) -> dict[str, Any]:
        """Decoder dropout for MC dropout, on the profile's fine-tuning network
        (:func:`~medssl_kit.config.architecture_kwargs`: at ``gpu`` the ``resunet`` is the
        paper's ResUNet50); in every decoder block at ``gpu``, in the last one on the CPU
        profiles (:data:`CPU_MC`)."""
        if profile == "gpu":
            return {"dropout": DROPOUT}
        return {"dropout": DROPOUT, "dropout_levels": CPU_MC["dropout_levels"]}

    @property
    def uses_stabilizer(self) -> bool:
        """Whether eq. 5's context stabilizer is on (it needs pixel matching)."""
        return bool(self.cfg["pixel_matching"] and self.cfg["stabilizer"])

    @property
    def uses_uncertainty(self) -> bool:
        """Whether eq. 6's uncertainty weighting is on (it needs pixel matching)."""
        return bool(self.cfg["pixel_matching"] and self.cfg["uncertainty"])

    def train(self, mode: bool = True) -> PixelGlobal:
        """Set the mode; the teacher's dropout stays off (its targets are deterministic)."""
        super().train(mode)
        self.teacher["backbone"].set_mc_dropout(False)
        return self

    # --- batches ------------------------------------------------------------------------------

    def sample_views(
        self, images: Sequence[Tensor], generator: torch.Generator
    ) -> tuple[list[ViewPair], list[ViewPair] | None]:
        """Two views of each ``image[C, H, W]`` and, with the stabilizer, its ``x̃`` replay.

        ``x̃`` of image ``b`` is image ``(b + 1) mod B`` (resized to image ``b``'s size when they
        differ) under pair ``b``'s spatial and intensity parameters.
        """
        n = len(images)
        if self.uses_stabilizer and n < 2:
            raise MedsslError(
                "pixel_global: the context stabilizer takes x̃ from the same batch and needs "
                "batch_size >= 2, with several processes 2 per process (or set stabilizer=false)"
            )
        pairs = [sample_view_pair(image, self.view_spec, generator) for image in images]
        if not self.uses_stabilizer:
            return pairs, None
        stabs = []
        for b, pair in enumerate(pairs):
            image, other = images[b], images[(b + 1) % n]
            if other.shape[1:] != image.shape[1:]:
                other = F.interpolate(
                    other[None], size=image.shape[1:], mode="bilinear", align_corners=True
                )[0]
            stabs.append(replay(pair, other))
        return pairs, stabs

    def collate(
        self, pairs: Sequence[ViewPair], stabs: Sequence[ViewPair] | None, mc_seed: int
    ) -> dict[str, Tensor]:
        """Stack view pairs into the tensors :meth:`forward` reads.

        ``views [2B, C, h, w]``: all views 1, then all views 2 (row ``r``'s partner view is row
        ``(r + B) mod 2B``); ``grid [2B, h, w, 2]`` and ``valid [2B, h, w]``: where each pixel of
        row ``r`` lies in its partner view; ``stab_views`` likewise for ``x̃`` (same grid);
        ``mc_seed``: seeds the MC-dropout masks of this batch.
        """
        batch = {
            "views": torch.stack([p.view1 for p in pairs] + [p.view2 for p in pairs]),
            "mc_seed": torch.tensor(mc_seed, dtype=torch.int64),
        }
        if stabs is not None:
            batch["stab_views"] = torch.stack([s.view1 for s in stabs] + [s.view2 for s in stabs])
        if self.cfg["pixel_matching"]:
            matches = [correspondence(p) for p in pairs] + [
                correspondence(_swapped(p)) for p in pairs
            ]
            batch["grid"] = torch.stack([g for g, _ in matches])
            batch["valid"] = torch.stack([v for _, v in matches])
        return batch

    def make_batch(self, items: list[Any], generator: torch.Generator) -> dict[str, Tensor]:
        """Views of the items' slices, their correspondence and the ``x̃`` replays."""
        pairs, stabs = self.sample_views([item["image"] for item in items], generator)
        return self.collate(pairs, stabs, mc_seed=randint(generator, 0, 2**62))

    # --- the loss -----------------------------------------------------------------------------

    def forward(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        """``{"loss", "global", ["local", "pixel", "stabilizer", "valid_fraction",
        "mean_uncertainty"]}`` for one batch (see the module docstring)."""
        cfg = self.cfg
        views = batch["views"]
        n2 = views.shape[0]
        x = views if "stab_views" not in batch else torch.cat([views, batch["stab_views"]])
        student, teacher = self.backbone, self.teacher

        s_enc = student.encode(x)
        s_global = self.global_head(s_enc[-1][:n2].flatten(2).mean(2))
        with torch.no_grad():
            t_enc = teacher["backbone"].encode(x)
            t_global = teacher["global_head"](t_enc[-1][:n2].flatten(2).mean(2))
        terms = {
            "global": L.global_consistency_loss(
                s_global.unflatten(0, (2, -1)),
                t_global.unflatten(0, (2, -1)),
                self.center_global,
                cfg["student_temp"],
                cfg["teacher_temp"],
            )
        }
        if not cfg["pixel_matching"]:
            self._pending_centers = (t_global, None)
            terms["loss"] = terms["global"]
            return terms

        s_pix = self.pixel_head(student.decode(s_enc)[0][-1])
        # The uncertainty passes start from this target pass's input to the first dropout layer
        # and normalise as it does (its batch statistics, noted for the layers after that one).
        uncertain = self.uses_uncertainty
        start = self._pass_start() if uncertain else None
        norm_stats = None
        if uncertain and teacher.training:
            norm_stats = RecordedBatchStatistics(teacher, after=start)
        with (
            torch.no_grad(),
            norm_stats.recording() if norm_stats else nullcontext(),
            _inputs_of(start) as shared,
        ):
            t_pix = teacher["pixel_head"](teacher["backbone"].decode(t_enc)[0][-1])
        with torch.no_grad():
            t_probs = L.teacher_probs(t_pix, self.center_pixel, cfg["pixel_teacher_temp"])
        if s_pix.shape[2:] != views.shape[2:]:
            raise MedsslError(
                f"pixel_global needs the backbone's last decoder map at view resolution; got "
                f"{list(s_pix.shape[2:])} for views of {list(views.shape[2:])}"
            )
        grid, valid = batch["grid"], batch["valid"]
        partner = torch.arange(n2, device=views.device).roll(n2 // 2)
        discrepancy = self._matched_discrepancy(s_pix[:n2], t_probs[:n2][partner], grid)
        stabilizer = None
        if "stab_views" in batch:
            stabilizer = self._matched_discrepancy(s_pix[n2:], t_probs[n2:][partner], grid)
        uncertainty = None
        if uncertain:
            own = self.teacher_uncertainty(
                [f[:n2] for f in t_enc],
                int(batch["mc_seed"]),
                norm_stats=norm_stats,
                shared=shared[0][:n2] if shared else None,
            )
            uncertainty = _warp(own[partner][:, None], grid)[:, 0]
        terms["local"] = L.local_consistency_loss(
            discrepancy, valid, stabilizer, uncertainty, cfg["stabilizer_form"]
        )
        terms["pixel"] = L.masked_mean(discrepancy.detach(), valid)
        if stabilizer is not None:
            terms["stabilizer"] = L.masked_mean(stabilizer.detach(), valid)
        if uncertainty is not None:
            terms["mean_uncertainty"] = L.masked_mean(uncertainty, valid)
        terms["valid_fraction"] = valid.float().mean()
        terms["loss"] = terms["global"] + terms["local"]
        self._pending_centers = (t_global, t_pix[:n2])
        return terms

    def _matched_discrepancy(
        self, student_logits: Tensor, partner_probs: Tensor, grid: Tensor
    ) -> Tensor:
        """Per-pixel discrepancy of the student's map with its partner view's teacher output."""
        target = _warp(partner_probs, grid)
        log_probs = L.student_log_probs(student_logits, self.cfg["pixel_student_temp"])
        return L.pixel_discrepancy(target, log_probs, self.cfg["local_discrepancy"])

    @torch.no_grad()
    def teacher_uncertainty(
        self,
        encoder_feats: Sequence[Tensor],
        seed: int,
        chunk: int | None = None,
        norm_stats: RecordedBatchStatistics | None = None,
        shared: Tensor | None = None,
    ) -> Tensor:
        """Eq. 6's ``U [N, *S]`` on the teacher's own pixels, from its encoder features.

        ``mc_samples`` passes of the teacher's decoder and pixel head with dropout active; batch
        norm normalises with ``norm_stats`` (the target pass's recorded batch statistics) where
        given, else with the running statistics (eval mode). The encoder features are repeated
        along the batch axis so that ``chunk`` passes (default ``mc_chunk``, else all) run in
        one call. Pass ``t``'s dropout masks come from a generator seeded ``seed + t``, so the
        result does not depend on ``chunk``. ``shared``: the input of the first dropout layer
        for these rows, from a pass that ran the decoder already (the backbone's
        ``pass_decoder`` then starts there). Returns the normalised predictive entropy of the
        mean distribution, or with ``uncertainty_measure="mutual_information"`` the passes'
        disagreement (:func:`~medssl_kit.losses.pixel_global.mutual_information`).
        """
        teacher = self.teacher
        samples = int(self.cfg["mc_samples"])
        chunk = int(chunk or self.cfg["mc_chunk"] or samples)
        n = encoder_feats[0].shape[0]
        device = encoder_feats[0].device
        generators = [torch.Generator(device=device).manual_seed(seed + t) for t in range(samples)]
        modes = [(m, m.training) for m in teacher.modules()]
        teacher.eval()
        masks = _PassDropout(teacher["backbone"].dropout_layers)
        disagreement = self.cfg["uncertainty_measure"] == "mutual_information"
        total = torch.zeros(())
        entropy = torch.zeros(())
        try:
            with norm_stats.replaying() if norm_stats else nullcontext():
                decode = self._pass_decoder(encoder_feats, shared)
                for first in range(0, samples, chunk):
                    masks.generators = generators[first : first + chunk]
                    passes = len(masks.generators)
                    logits = teacher["pixel_head"](decode(passes))
                    probs = L.teacher_probs(
                        logits, self.center_pixel, self.cfg["pixel_teacher_temp"]
                    ).unflatten(0, (passes, n))
                    total = total + probs.sum(0)
                    if disagreement:  # the passes' own entropies
                        entropy = entropy - torch.special.xlogy(probs, probs).sum((0, 2))
        finally:
            masks.remove()
            for module, flag in modes:
                module.training = flag
        if disagreement:
            return L.mutual_information(total / samples, entropy / samples)
        return L.predictive_entropy(total / samples)

    def _pass_start(self) -> nn.Module | None:
        """The teacher's first dropout layer where its backbone's ``pass_decoder`` can start
        the passes there (else ``None``: every pass runs the whole decoder)."""
        backbone = self.teacher["backbone"]
        return backbone.dropout_layers[0] if hasattr(backbone, "pass_decoder") else None

    def _pass_decoder(
        self, encoder_feats: Sequence[Tensor], shared: Tensor | None = None
    ) -> Callable[[int], Tensor]:
        """``passes → `` the teacher decoder's last map for that many repetitions of the
        features' rows (the backbone's ``pass_decoder`` where it has one: what every pass shares
        is computed once, or taken from ``shared``)."""
        backbone = self.teacher["backbone"]
        if hasattr(backbone, "pass_decoder"):
            return backbone.pass_decoder(encoder_feats, shared)
        return lambda passes: backbone.decode(
            [f.repeat(passes, *([1] * (f.ndim - 1))) for f in encoder_feats]
        )[0][-1]

    @torch.no_grad()
    def uncertainty_map(self, images: Tensor, seed: int = 0, batch_size: int = 8) -> Tensor:
        """The teacher's ``U [N, H, W]`` for slices ``images[N, C, H, W]`` (eval mode).

        For inspection (e.g. over every slice of a volume); batches of ``batch_size`` slices.
        """
        backbone = self.teacher["backbone"]
        modes = [(m, m.training) for m in self.teacher.modules()]
        self.teacher.eval()
        try:
            maps = [
                self.teacher_uncertainty(backbone.encode(chunk), seed + i)
                for i, chunk in enumerate(images.split(batch_size))
            ]
        finally:
            for module, flag in modes:
                module.training = flag
        return torch.cat(maps)

    # --- after the step -----------------------------------------------------------------------

    @torch.no_grad()
    def on_step_end(self, step: int, max_steps: int) -> None:
        """EMA update of the teacher (momentum ``teacher_momentum(step − 1, max_steps)``) and
        of the centres from the batch just used."""
        lam = teacher_momentum(step - 1, max_steps, self.cfg["base_momentum"])
        for part in ("backbone", "global_head", "pixel_head"):
            ema_update_(self.teacher[part], getattr(self, part), lam)
        if self._pending_centers is not None:
            t_global, t_pix = self._pending_centers
            m = self.cfg["center_momentum"]
            self.center_global.copy_(L.updated_center(self.center_global, t_global, m))
            if t_pix is not None:
                self.center_pixel.copy_(L.updated_center(self.center_pixel, t_pix, m))
            self._pending_centers = None

    def transferable_state(self) -> dict[str, Tensor]:
        """Encoder and decoder weights of the student (``transfer="teacher"``: the teacher's)."""
        source = self.backbone if self.cfg["transfer"] == "student" else self.teacher["backbone"]
        prefixes = tuple(source.encoder_prefixes) + tuple(source.decoder_prefixes)
        return {k: v for k, v in source.state_dict().items() if k.startswith(prefixes)}
