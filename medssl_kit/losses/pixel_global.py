"""Losses of pixel-global SSL with the uncertainty-aware context stabilizer, as pure functions.

Zhang & Zhang, "Pixel-global Self-supervised Learning with Uncertainty-aware Context Stabilizer"
(the method :class:`medssl_kit.methods.pixel_global.PixelGlobal`, DESIGN §4.1). Notation of the
paper: ``z'`` are the projected global vectors after the softmax (eq. 3), ``y'`` the projected
pixel maps after the channel softmax (eq. 4), ``δ'`` the same for the context-stabilizer image
``x̃`` (eq. 5) and ``U`` the teacher's uncertainty (eq. 6); ``t`` is the teacher, ``s`` the
student.

Shapes: vectors are ``[..., K]`` with the class axis given by ``dim`` (default 1, so ``[N, K]``
vectors and ``[N, K, *S]`` pixel maps both work); per-pixel maps are ``[N, *S]``. Everything is
differentiable in the student's tensors; teacher tensors are expected to carry no gradient.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from medssl_kit.distributed import all_reduce_mean

DISCREPANCIES = ("kl", "cross_entropy")
STABILIZER_FORMS = ("excess", "absolute")


def _channel_view(center: Tensor, like: Tensor, dim: int) -> Tensor:
    """``center[K]`` reshaped to broadcast along axis ``dim`` of ``like``."""
    shape = [1] * like.ndim
    shape[dim] = -1
    return center.reshape(shape)


def teacher_probs(logits: Tensor, center: Tensor, temperature: float, dim: int = 1) -> Tensor:
    """The teacher's centred and sharpened distribution (DINO): ``softmax((z − c) / τ_t)``.

    This is ``z'_t`` of eq. 3 (global vectors) and ``y'_t`` / ``δ'_t`` of eq. 4–6 (per pixel, the
    softmax over channels). ``center`` is ``[K]``, the running mean of the teacher's logits
    (:func:`updated_center`); subtracting it keeps one output from dominating, the low
    temperature ``τ_t`` sharpens, and together they avoid collapse (Caron et al., 2021).
    """
    return torch.softmax((logits - _channel_view(center, logits, dim)) / temperature, dim=dim)


def student_log_probs(logits: Tensor, temperature: float, dim: int = 1) -> Tensor:
    """``log z'_s = log softmax(z / τ_s)`` (eq. 3), and per pixel ``log y'_s`` (eq. 4–6)."""
    return F.log_softmax(logits / temperature, dim=dim)


def cross_entropy(target: Tensor, log_probs: Tensor, dim: int = 1) -> Tensor:
    """``−Σ_k t_k log s_k`` along ``dim`` (eq. 3 per vector, eq. 4 per pixel)."""
    return -(target * log_probs).sum(dim)


def pixel_discrepancy(target: Tensor, log_probs: Tensor, kind: str = "kl", dim: int = 1) -> Tensor:
    """Per-pixel discrepancy between the teacher's ``y'_ti`` and the student's ``y'_si``.

    ``kind="cross_entropy"`` is the paper's literal term ``−y'_ti log y'_si`` (eq. 4).
    ``kind="kl"`` subtracts the teacher's own entropy:
    ``KL(y'_ti ‖ y'_si) = −y'_ti log y'_si + y'_ti log y'_ti``. The entropy carries no gradient,
    so both give the same student update wherever no absolute value is taken (eq. 4, and eq. 6
    without the stabilizer); the KL is zero when the two distributions agree, so inside eq. 5's
    absolute value it compares the *excess* discrepancy of ``x`` with that of ``x̃`` rather than
    mixing in the difference of the teacher's entropies on the two images.
    """
    if kind == "kl":
        return (torch.special.xlogy(target, target) - target * log_probs).sum(dim)
    if kind == "cross_entropy":
        return cross_entropy(target, log_probs, dim)
    raise ValueError(f"kind must be one of {DISCREPANCIES}, got {kind!r}")


def global_consistency_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    center: Tensor,
    student_temp: float,
    teacher_temp: float,
) -> Tensor:
    """Eq. 3, ``ℓ_global = −z'_t log z'_s``, symmetrised over the two views, batch mean.

    ``student_logits`` and ``teacher_logits`` are ``[2, B, K]`` (view 1, view 2). The student's
    view 1 predicts the teacher's view 2 and vice versa:
    ``ℓ = ½ [mean_b H(z'_t(x2_b), z'_s(x1_b)) + mean_b H(z'_t(x1_b), z'_s(x2_b))]`` with
    ``z'_t = softmax((z_t − c) / τ_t)`` and ``z'_s = softmax(z_s / τ_s)``.
    """
    if student_logits.ndim != 3 or student_logits.shape[0] != 2:
        raise ValueError(f"expected [2, B, K] logits, got {list(student_logits.shape)}")
    targets = teacher_probs(teacher_logits, center, teacher_temp, dim=-1).flip(0)
    log_probs = student_log_probs(student_logits, student_temp, dim=-1)
    return cross_entropy(targets, log_probs, dim=-1).mean()


def masked_mean(values: Tensor, valid: Tensor) -> Tensor:
    """Mean of ``values`` over the ``True`` entries of ``valid`` (0 when there are none).

    Entries outside ``valid`` are never read (``torch.where``), so they may hold anything.
    """
    total = torch.where(valid, values, torch.zeros_like(values)).sum()
    return total / valid.sum().clamp_min(1)


def local_consistency_loss(
    discrepancy: Tensor,
    valid: Tensor,
    stabilizer: Tensor | None = None,
    uncertainty: Tensor | None = None,
    form: str = "absolute",
) -> Tensor:
    """The pixel-level term ``ℓ_local`` of eq. 4, 5 or 6, averaged over the valid pixels.

    ``discrepancy`` is ``d_i`` between matched pixels of the two views of ``x`` (eq. 4's
    ``−y'_ti log y'_si``, see :func:`pixel_discrepancy`), ``stabilizer`` the same ``d̃_i`` for
    the context-stabilizer image ``x̃`` under the same augmentations (eq. 5's
    ``−δ'_ti log δ'_si``), ``uncertainty`` the teacher's ``U_ti`` in [0, 1] at the matched pixel
    and ``valid`` the pixels with a partner in the other view. All are ``[N, *S]``.

    - eq. 4 (no stabilizer, no uncertainty): ``Σ_i d_i``;
    - eq. 5 (stabilizer), ``form="absolute"`` (the paper's literal form):
      ``Σ_i |d_i − d̃_i|`` — per pixel, the difference, then the absolute value, then the sum;
      ``form="excess"``: ``Σ_i max(0, d_i − sg(d̃_i))`` — only the discrepancy in excess of the
      context gap that the same augmentations open on ``x̃`` is penalised, and ``d̃`` is a
      baseline (stop-gradient), not a second thing to fit;
    - eq. 6 (both): ``Σ_i (1 − U_ti) s_i`` with ``s_i`` the eq. 5 term (without a stabilizer:
      ``Σ_i (1 − U_ti) d_i``).

    Each sum runs over the valid pixels and is divided by their number (not by ``Σ (1 − U)``, so
    an uncertain teacher lowers the loss rather than being renormalised away).
    """
    if stabilizer is None:
        per_pixel = discrepancy
    elif form == "absolute":
        per_pixel = (discrepancy - stabilizer).abs()
    elif form == "excess":
        per_pixel = (discrepancy - stabilizer.detach()).clamp_min(0.0)
    else:
        raise ValueError(f"form must be one of {STABILIZER_FORMS}, got {form!r}")
    if uncertainty is not None:
        per_pixel = (1.0 - uncertainty) * per_pixel
    return masked_mean(per_pixel, valid)


def predictive_entropy(mean_probs: Tensor, dim: int = 1) -> Tensor:
    """Normalised predictive entropy, eq. 6's ``U``: ``−Σ_k p̄_k log p̄_k / log K``, in [0, 1].

    ``mean_probs`` is the average of the Monte-Carlo dropout passes' distributions (the entropy
    *of the mean*, which grows when the passes disagree, not the mean of the passes' entropies);
    dividing by the maximum ``log K`` maps a certain output to 0 and a uniform one to 1.
    """
    k = mean_probs.shape[dim]
    entropy = -torch.special.xlogy(mean_probs, mean_probs).sum(dim)
    return (entropy / math.log(k)).clamp(0.0, 1.0)


def mutual_information(mean_probs: Tensor, mean_entropy: Tensor, dim: int = 1) -> Tensor:
    """The passes' disagreement: ``(H(p̄) − mean_t H(p_t)) / log K``, in [0, 1].

    The mutual information between the prediction and the dropout mask (BALD; Kendall & Gal's
    epistemic part of :func:`predictive_entropy`): ``mean_probs`` is ``p̄``, the mean of the
    passes' distributions, ``mean_entropy`` the mean of their entropies (nats, ``[N, *S]``). It
    is 0 where every pass gives the same distribution, however flat, and grows with their
    disagreement; the predictive entropy also counts how flat the agreed distribution is.
    """
    k = mean_probs.shape[dim]
    entropy = -torch.special.xlogy(mean_probs, mean_probs).sum(dim)
    return ((entropy - mean_entropy) / math.log(k)).clamp(0.0, 1.0)


def updated_center(center: Tensor, teacher_logits: Tensor, momentum: float) -> Tensor:
    """DINO's centre update ``c ← m c + (1 − m) mean(z_t)``, the mean over all but axis 1.

    ``teacher_logits`` is ``[N, K]`` (global vectors) or ``[N, K, *S]`` (pixel maps: the mean
    runs over the batch and every pixel). Returns the new ``[K]`` centre. With several processes
    the batch mean is averaged over the ranks (their shares are equal), i.e. taken over the
    global batch, as DINO does across GPUs.
    """
    dims = [d for d in range(teacher_logits.ndim) if d != 1]
    batch_mean = all_reduce_mean(teacher_logits.detach().mean(dim=dims))
    return momentum * center + (1.0 - momentum) * batch_mean
