"""Whole-volume inference: slice-wise (2D), sliding-window (3D) and MC dropout (DESIGN §6.2).

Volumes are ``[C, D, H, W]`` = channels, ``(z, y, x)``; outputs are softmax probabilities
``[K, D, H, W]`` on the image's device. The model runs on the device of its first parameter (the
image's device for a parameter-free callable). ``model`` is any ``nn.Module`` or callable mapping a
batch ``[B, C', *spatial]`` to logits ``[B, K, *spatial]`` with ``K >= 2``.

Everything runs under ``torch.no_grad()`` (not ``inference_mode``, so callers may modify the
returned tensors in place). An ``nn.Module`` is evaluated in eval mode (:func:`predict_volume`) or
eval mode with only its dropout layers active (:func:`mc_dropout_predict`); each submodule's
``training`` flag is restored afterwards, whatever it was.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext

import torch
from monai.inferers import sliding_window_inference
from torch import Tensor, nn

Model = nn.Module | Callable[[Tensor], Tensor]

DROPOUT_TYPES: tuple[type[nn.Module], ...] = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


@contextmanager
def _modes(model: Model, *, dropout: bool) -> Iterator[None]:
    """Eval mode (dropout layers in train mode if ``dropout``), restoring every flag on exit."""
    if not isinstance(model, nn.Module):
        yield
        return
    saved = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        if dropout:
            for m in model.modules():
                if isinstance(m, DROPOUT_TYPES):
                    m.train()
        yield
    finally:
        for m, flag in saved:
            m.training = flag


def _device_of(model: Model, fallback: torch.device) -> torch.device:
    if isinstance(model, nn.Module):
        for p in model.parameters():
            return p.device
    return fallback


def _forward(
    model: Model,
    x: Tensor,
    device: torch.device,
    roi_size: Sequence[int] | None,
    sw: dict[str, object],
) -> Tensor:
    """Logits of one batch on ``x``'s device, run on ``device``: directly, or by MONAI
    sliding-window inference over ``roi_size`` (windows moved to ``device`` one batch at a time).
    """
    if roi_size is None:
        out = model(x.to(device))
    else:
        out = sliding_window_inference(
            x, roi_size, predictor=model, sw_device=device, device=x.device, **sw
        )
    if not isinstance(out, Tensor):
        raise TypeError(f"the model must return a logits tensor, got {type(out).__name__}")
    if out.ndim != x.ndim or out.shape[0] != x.shape[0] or out.shape[2:] != x.shape[2:]:
        raise ValueError(
            f"model output {tuple(out.shape)} is not dense logits for input {tuple(x.shape)}: "
            "expected [B, K, *spatial] with the input's spatial size"
        )
    if out.shape[1] < 2:
        raise ValueError("softmax inference needs K >= 2 output channels (include background)")
    return out.to(x.device)


def _slice_batches(image: Tensor, batch_size: int, context: int) -> Iterator[tuple[int, Tensor]]:
    """``(z0, [b, (2·context+1)·C, H, W])`` batches of axial slices with their neighbours.

    Channels are slice-major: neighbour offsets −context … +context, each with all C channels
    (for C = 1: slices z−context … z+context in order); indices are clamped at the volume ends.
    """
    c, depth = image.shape[0], image.shape[1]
    offsets = torch.arange(-context, context + 1, device=image.device)
    for z0 in range(0, depth, batch_size):
        z = torch.arange(z0, min(z0 + batch_size, depth), device=image.device)
        idx = (z[:, None] + offsets[None, :]).clamp(0, depth - 1)  # [b, 2·context+1]
        x = image[:, idx]  # [C, b, 2·context+1, H, W]
        yield z0, x.permute(1, 2, 0, 3, 4).reshape(len(z), c * len(offsets), *image.shape[2:])


def _predict(
    model: Model,
    image: Tensor,
    spatial_dims: int,
    roi_size: Sequence[int] | None,
    batch_size: int,
    overlap: float,
    context: int,
    blend_mode: str,
) -> Tensor:
    """Softmax probabilities ``[K, D, H, W]`` with the model's modes as they are."""
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if image.ndim != 4:
        raise ValueError(f"image must be [C, D, H, W], got shape {tuple(image.shape)}")
    if image.numel() == 0:
        raise ValueError(f"image is empty, shape {tuple(image.shape)}")
    if batch_size < 1 or context < 0:
        raise ValueError(f"need batch_size >= 1 and context >= 0, got {batch_size}, {context}")
    image = image.as_subclass(Tensor)
    if not image.is_floating_point():
        image = image.float()
    device = _device_of(model, image.device)
    sw: dict[str, object] = {"sw_batch_size": batch_size, "overlap": overlap, "mode": blend_mode}
    if spatial_dims == 3:
        if roi_size is None:
            raise ValueError("3D inference needs roi_size (z, y, x) for the sliding window")
        if context:
            raise ValueError("context (neighbouring slices as channels) applies to 2D models only")
        logits = _forward(model, image[None], device, roi_size, sw)[0]
        return torch.softmax(logits.float(), dim=0)

    out: Tensor | None = None
    for z0, x in _slice_batches(image, batch_size, context):
        probs = torch.softmax(_forward(model, x, device, roi_size, sw).float(), dim=1)
        if out is None:
            out = image.new_empty((probs.shape[1], *image.shape[1:]), dtype=torch.float32)
        out[:, z0 : z0 + probs.shape[0]] = probs.transpose(0, 1)
    assert out is not None  # the volume has at least one slice
    return out


def predict_volume(
    model: Model,
    image: Tensor,
    spatial_dims: int,
    *,
    roi_size: Sequence[int] | None = None,
    batch_size: int = 16,
    overlap: float = 0.25,
    context: int = 0,
    blend_mode: str = "constant",
) -> Tensor:
    """Softmax probabilities ``[K, D, H, W]`` of a segmentation model over a whole volume.

    Args:
        model: an ``nn.Module`` (run in eval mode, modes restored) or a callable returning logits.
        image: ``[C, D, H, W]`` intensities (already preprocessed).
        spatial_dims: 2 — axial slices (along D) are predicted in batches of ``batch_size``;
            with ``roi_size`` ``(y, x)`` each slice is tiled by a 2D sliding window.
            3 — MONAI ``sliding_window_inference`` with ``roi_size`` ``(z, y, x)`` (required;
            a non-positive entry takes the image size on that axis, MONAI's convention) and
            ``batch_size`` windows per forward pass.
        overlap: sliding-window overlap fraction (MONAI ``overlap``).
        context: 2D only: stack ``context`` neighbouring slices on each side as extra channels
            (slice-major, clamped at the volume ends), so the model sees ``(2·context+1)·C``
            channels.
        blend_mode: how overlapping window logits are blended, ``"constant"`` or ``"gaussian"``.
    """
    with torch.no_grad(), _modes(model, dropout=False):
        return _predict(
            model, image, spatial_dims, roi_size, batch_size, overlap, context, blend_mode
        )


def mc_dropout_predict(
    model: nn.Module,
    image: Tensor,
    spatial_dims: int,
    n_samples: int = 20,
    *,
    roi_size: Sequence[int] | None = None,
    batch_size: int = 16,
    overlap: float = 0.25,
    context: int = 0,
    blend_mode: str = "constant",
    seed: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Monte-Carlo dropout inference: mean probabilities and normalised predictive entropy.

    The model runs ``n_samples`` times (arguments as in :func:`predict_volume`) with only its
    dropout layers (``nn.Dropout``, ``Dropout1d/2d/3d``, ``AlphaDropout``,
    ``FeatureAlphaDropout``) in train mode; batch / instance norm stay in eval mode, so running
    statistics are neither used from the batch nor updated. All modes are restored afterwards.

    Returns:
        ``mean_probs [K, D, H, W]`` — the average of the sampled softmax outputs — and
        ``entropy [D, H, W]`` — the predictive entropy of ``mean_probs``,
        −Σ_k p̄_k log p̄_k / log K, normalised by its maximum log K to [0, 1]
        (0: every sample certain of one class; 1: uniform mean prediction).

    Dropout masks come from torch's global RNG: the result is deterministic after
    ``torch.manual_seed``; with ``seed`` the call seeds a forked RNG and leaves the global state
    untouched. A model without dropout layers gives identical samples; it is run once, with a
    warning.
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    if not any(isinstance(m, DROPOUT_TYPES) for m in model.modules()):
        warnings.warn(
            "mc_dropout_predict: the model has no dropout layers, all samples would be identical; "
            "running it once",
            UserWarning,
            stacklevel=2,
        )
        n_samples = 1
    device = _device_of(model, image.device)
    rng = (
        torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
        if seed is not None
        else nullcontext()
    )
    with rng, torch.no_grad(), _modes(model, dropout=True):
        if seed is not None:
            torch.manual_seed(seed)
        total = _predict(
            model, image, spatial_dims, roi_size, batch_size, overlap, context, blend_mode
        )
        for _ in range(n_samples - 1):
            total += _predict(
                model, image, spatial_dims, roi_size, batch_size, overlap, context, blend_mode
            )
    mean = total / n_samples
    entropy = -torch.special.xlogy(mean, mean).sum(0) / math.log(mean.shape[0])
    return mean, entropy.clamp_(0.0, 1.0)


def predict_classes(probs: Tensor) -> Tensor:
    """Class map ``[D, H, W]`` (int64) from probabilities ``[K, D, H, W]``: argmax over K."""
    return probs.argmax(dim=0)
