"""Supervised segmentation loss for fine-tuning with partially labelled data and ignored voxels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import Tensor, nn

_NEG = -1.0e4  # log-probability given to classes a sample cannot contain (exp() == 0 in float32)


class PartialDiceCELoss(nn.Module):
    """Dice + cross-entropy that ignores unlabelled classes and ``ignore_index`` voxels.

    A sample from a partially labelled source annotates only the classes ``L`` (background
    always); voxels of the other organs are marked background in its label map. Following the
    marginal loss of Shi et al. (MedIA 2021), the probabilities of the unlabelled classes are merged
    into background before the loss:

        p̂_0 = p_0 + Σ_{c ∉ L} p_c,     p̂_c = p_c for c ∈ L,
        ℓ = λ_dice · (1/|L|) Σ_{c ∈ L} (1 − Dice_c(p̂, y)) + λ_ce · CE(log p̂, y),

    where both terms run over the non-ignored voxels only. With every class labelled and no
    ignored voxel this is exactly ``monai.losses.DiceCELoss(to_onehot_y=True, softmax=True,
    batch=batch)`` (tested), which does the Dice part here.

    ``batch=True`` (nnU-Net's "batch Dice", the default of fine-tuning) pools the Dice sums over
    the whole batch: a class absent from one 2D crop is then not pushed to zero probability by that
    crop alone, which on CPU budgets is what lets small organs be learnt in few hundred steps. A
    class counts in the Dice term when at least one sample of the batch labels it; samples that do
    not label it contribute nothing to its sums (its merged probability and its target are 0).
    """

    def __init__(
        self,
        ignore_index: int = 255,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        batch: bool = False,
    ):
        super().__init__()
        self.ignore_index = ignore_index
        self.lambda_dice = lambda_dice
        self.lambda_ce = lambda_ce
        self.batch = batch
        self.dice = DiceLoss(include_background=True, reduction="none", batch=batch)

    def forward(self, logits: Tensor, target: Tensor, labelled: Tensor | None = None) -> Tensor:
        """logits [B, K, *S]; target [B, 1, *S] integer; labelled bool [B, K] or None."""
        n_classes = logits.shape[1]
        target = target[:, 0].long()
        logp = F.log_softmax(logits, dim=1)
        if labelled is None:
            labelled = torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
        else:
            labelled = labelled.clone().bool()
            labelled[:, 0] = True
            logp = _merge_unlabelled_into_background(logp, labelled)

        ce = F.nll_loss(logp, target, ignore_index=self.ignore_index)

        valid = (target != self.ignore_index).unsqueeze(1)
        onehot = F.one_hot(torch.where(valid[:, 0], target, 0), n_classes).movedim(-1, 1)
        per_class = self.dice(logp.exp() * valid, onehot.to(logp.dtype) * valid)
        per_class = per_class.reshape(-1, n_classes)
        weights = labelled.to(per_class.dtype)
        if self.batch:
            weights = weights.amax(0, keepdim=True)
        dice = ((per_class * weights).sum(1) / weights.sum(1)).mean()
        if torch.isnan(ce):  # every voxel ignored: nothing to learn from this batch
            ce = logits.sum() * 0.0
        return self.lambda_dice * dice + self.lambda_ce * ce


def _merge_unlabelled_into_background(logp: Tensor, labelled: Tensor) -> Tensor:
    """log p̂: background absorbs the unlabelled classes' probability; those get log 0."""
    mask = labelled[(...,) + (None,) * (logp.dim() - 2)].expand_as(logp)
    absorbed = torch.where(mask, torch.full_like(logp, _NEG), logp)
    absorbed[:, 0] = logp[:, 0]
    merged_bg = torch.logsumexp(absorbed, dim=1, keepdim=True)
    out = torch.where(mask, logp, torch.full_like(logp, _NEG))
    return torch.cat([merged_bg, out[:, 1:]], dim=1)
