"""Collective helpers for data-parallel training (DESIGN §5.4), low enough for every layer.

The training loops (:mod:`medssl_kit.train.pretrain`, :mod:`medssl_kit.train.finetune`) run under
``torchrun`` / ``medssl ... --nproc N`` with PyTorch's ``DistributedDataParallel``: every process
(rank) trains on its share of the global batch and DDP averages the gradients. Where a method's
objective couples the samples of a batch (negatives, batch statistics, running centres), the
methods and losses use the helpers here so that the objective is the one of the *global* batch,
as the papers do across GPUs. With one process every helper is the identity (it returns its
argument itself and communicates nothing), so one-process runs are unchanged.

- :func:`all_gather_rows` — every rank's rows, in rank order, with a gradient: the forward pass
  gathers, the backward pass sums the gradient over the ranks (``all_reduce``) and keeps this
  rank's slice (the SimCLR / MoCo practice). Rows may differ in number between ranks (MixCL's
  sampled pixels). With DDP averaging the parameter gradients, the update equals that of the
  mean loss over the ranks computed on the gathered rows.
- :func:`all_reduce_mean` — the mean over ranks, no gradient (DINO's centres, logged terms).
- :class:`GatheredBatchNorm` and :func:`convert_sync_batchnorm` — batch norm with the statistics
  of the global batch: ``nn.SyncBatchNorm`` on CUDA; on CPU, where PyTorch's ``SyncBatchNorm``
  refuses to run ("expected input tensor to be on GPU"), :class:`GatheredBatchNorm` gathers the
  rows with :func:`all_gather_rows` and normalises them as one batch (exactly single-process
  batch norm over the concatenated batch; meant for the small inputs of projection heads).
- :func:`derived_seed` — seeds of per-rank generators: rank ``r`` draws the views of its share
  of step ``s`` from a generator seeded by (seed, ``s``, ``r``).

What each method synchronises across ranks
------------------------------------------
Every method: DDP averages the gradients, so the optimiser step is the one of the global batch
(each rank's loss is the mean over its share of equal size); logged terms are means over the
ranks; rank 0 logs and checkpoints. Beyond that:

==================  ==========================================================================
method              synchronised across ranks
==================  ==========================================================================
``mocov2``          the queue: every rank enqueues the keys of all ranks (rank order), so the
                    queue equals that of one process with the global batch; with
                    ``in_batch_negatives`` each query is contrasted with every rank's keys and
                    (gradient-carrying) queries. Shuffling BN stays per rank (MoCo shuffles
                    across GPUs; here each rank's sub-batches, as on one process).
``simsiam``         projector and predictor batch norm over the global batch (SyncBatchNorm;
                    on CPU :class:`GatheredBatchNorm`).
``byol``            the same for the online projector and predictor and the target projector.
``pixel_global``    the global head's batch norm (student and teacher) over the global batch,
                    and DINO's centres (global and pixel), updated with the mean of the teacher
                    logits over all ranks. The context stabilizer's ``x̃`` is the next image
                    of the rank's own share (each rank needs a share of >= 2).
``mixcl``           the label-consistency loss (eq. 6): every rank's sampled pixels are
                    anchors against the pixels of all ranks, averaged over all anchors. The
                    identity term (Barlow Twins over the pixels) and the projectors' batch
                    norm use the rank's own share (its pixels already number thousands).
``pcrlv2``          gradients only; each rank draws its own pyramid level per step, and the
                    comparison branch's batch norm uses the rank's share.
``ssmtl(_plus)``,   gradients only (no batch coupling besides the backbone's batch norm,
``models_genesis``  which in DDP, as usual, uses each rank's share; its running statistics
                    are rank 0's, broadcast by DDP).
==================  ==========================================================================
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "GatheredBatchNorm",
    "GatheredBatchNorm1d",
    "GatheredBatchNorm2d",
    "GatheredBatchNorm3d",
    "all_gather_object",
    "all_gather_rows",
    "all_reduce_mean",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "convert_sync_batchnorm",
    "derived_seed",
    "env_local_rank",
    "env_rank",
    "env_world_size",
    "rank",
    "world_size",
]


# --- who am I --------------------------------------------------------------------------------


def world_size() -> int:
    """Processes in the initialised process group; 1 without one."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the initialised process group; 0 without one."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def env_world_size() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_rank() -> int:
    """``RANK`` as torchrun sets it (0 when not launched by torchrun)."""
    return int(os.environ.get("RANK", "0"))


def env_local_rank() -> int:
    """``LOCAL_RANK`` (the rank on this machine) as torchrun sets it (0 otherwise)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def derived_seed(*keys: int) -> int:
    """A seed in [0, 2**63) mixed from non-negative integer ``keys`` (numpy's SeedSequence):
    different keys give unrelated seeds, and the same keys the same seed on every machine."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


# --- collectives -----------------------------------------------------------------------------


def all_reduce_mean(x: Tensor) -> Tensor:
    """The mean of ``x`` over the ranks (no gradient); ``x`` itself with one process."""
    if world_size() == 1:
        return x
    total = x.detach().clone()
    dist.all_reduce(total)
    return total / world_size()


def all_reduce_sum(x: Tensor) -> Tensor:
    """The sum of ``x`` over the ranks (no gradient); ``x`` itself with one process."""
    if world_size() == 1:
        return x
    total = x.detach().clone()
    dist.all_reduce(total)
    return total


def _row_counts(x: Tensor) -> list[int]:
    count = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
    counts = [torch.zeros_like(count) for _ in range(world_size())]
    dist.all_gather(counts, count)
    return [int(c) for c in counts]


class _GatherRows(torch.autograd.Function):
    """Forward: every rank's rows concatenated in rank order (padded for the transfer).
    Backward: the gradient summed over the ranks, then this rank's rows."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, counts: list[int], own: int) -> Tensor:
        ctx.counts, ctx.own = counts, own
        padded = x.new_zeros((max(counts), *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded)
        return torch.cat([part[:n] for part, n in zip(parts, counts, strict=True)])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        total = grad.contiguous().clone()
        dist.all_reduce(total)
        start = sum(ctx.counts[: ctx.own])
        return total[start : start + ctx.counts[ctx.own]], None, None


def all_gather_rows(x: Tensor) -> tuple[Tensor, int]:
    """Every rank's rows of ``x [n_r, ...]`` concatenated in rank order, and the index of this
    rank's first row in it. Differentiable (see the module docstring); ranks may hold different
    numbers of rows. With one process: ``(x, 0)``, ``x`` itself."""
    if world_size() == 1:
        return x, 0
    counts = _row_counts(x)
    own = rank()
    if max(counts) == 0:
        return x.new_zeros((0, *x.shape[1:])), 0
    return _GatherRows.apply(x.contiguous(), counts, own), sum(counts[:own])


def all_gather_object(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (pickled; small objects); ``[obj]`` alone."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (pickled; small objects); ``obj`` alone."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    """Wait for every rank (nothing with one process)."""
    if world_size() > 1:
        dist.barrier()


# --- batch norm over the global batch --------------------------------------------------------


class GatheredBatchNorm(_BatchNorm):
    """Batch norm with the statistics of every rank's rows, on CPU as on GPU (a mixin base of
    :class:`GatheredBatchNorm1d` / ``2d`` / ``3d``, which :func:`convert_sync_batchnorm` puts in
    place of ``BatchNorm1d`` / ``2d`` / ``3d`` on the CPU).

    In training with several processes, the input rows of all ranks are gathered
    (:func:`all_gather_rows`, with gradient) and normalised as one batch by the ordinary batch
    norm, running statistics included; this rank keeps its rows. That is single-process batch
    norm over the concatenated global batch, forward and backward. Otherwise (eval mode, one
    process) it is plain batch norm. Subclasses of the ``BatchNorm*d`` they replace, with the
    same parameters and buffers (checkpoints are interchangeable); not ``nn.SyncBatchNorm``,
    which ``DistributedDataParallel`` refuses on the CPU.
    """

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 (nn.Module's argument name)
        if not (self.training and world_size() > 1):
            return super().forward(input)
        rows, start = all_gather_rows(input)
        return super().forward(rows)[start : start + input.shape[0]]


class GatheredBatchNorm1d(GatheredBatchNorm, nn.BatchNorm1d):
    """:class:`GatheredBatchNorm` for ``[B, C]`` / ``[B, C, L]`` inputs."""


class GatheredBatchNorm2d(GatheredBatchNorm, nn.BatchNorm2d):
    """:class:`GatheredBatchNorm` for ``[B, C, H, W]`` inputs."""


class GatheredBatchNorm3d(GatheredBatchNorm, nn.BatchNorm3d):
    """:class:`GatheredBatchNorm` for ``[B, C, D, H, W]`` inputs."""


_GATHERED = {
    nn.BatchNorm1d: GatheredBatchNorm1d,
    nn.BatchNorm2d: GatheredBatchNorm2d,
    nn.BatchNorm3d: GatheredBatchNorm3d,
}


def _to_gathered(module: nn.Module) -> nn.Module:
    out = module
    cls = _GATHERED.get(type(module))
    if cls is not None:
        out = cls(
            module.num_features, module.eps, module.momentum, module.affine,
            module.track_running_stats,
        )  # fmt: skip
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _to_gathered(child))
    return out


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` with its ``BatchNorm*d`` layers normalising over the global batch: PyTorch's
    ``nn.SyncBatchNorm`` on CUDA, :class:`GatheredBatchNorm` on CPU. Parameters and buffers are
    the same tensors (an optimiser or EMA built on them keeps working)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _to_gathered(module)
