import pytest
import torch
from monai.losses import DiceCELoss

from medssl_kit.losses.segmentation import PartialDiceCELoss


@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("shape", [(2, 4, 9, 7), (2, 3, 5, 6, 4)])
def test_equals_monai_dicece_when_fully_labelled(shape, batch):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(shape, generator=g)
    target = torch.randint(0, shape[1], (shape[0], 1, *shape[2:]), generator=g)
    ours = PartialDiceCELoss(batch=batch)(logits, target)
    ref = DiceCELoss(to_onehot_y=True, softmax=True, batch=batch)(logits, target)
    assert torch.allclose(ours, ref, atol=1e-5)


def test_batch_dice_does_not_punish_a_class_absent_from_one_sample():
    # Sample 0 contains class 1, sample 1 does not. A small spurious class-1 probability in
    # sample 1 costs a per-sample Dice term ~1 (0 / small), but barely moves the pooled Dice.
    target = torch.zeros(2, 1, 8, 8, dtype=torch.long)
    target[0, 0, :4] = 1
    logits = torch.zeros(2, 2, 8, 8)
    logits[0, 1, :4], logits[0, 0, 4:] = 6.0, 6.0
    logits[1, 0] = 3.0  # sample 1: background, p(class 1) ~ 0.05 everywhere
    per_sample = PartialDiceCELoss(batch=False, lambda_ce=0.0)(logits, target)
    pooled = PartialDiceCELoss(batch=True, lambda_ce=0.0)(logits, target)
    assert per_sample > 0.2  # half of sample 1's class mean
    assert pooled < 0.1


def test_batch_dice_with_partial_labels_counts_a_class_labelled_by_any_sample():
    # Sample 0 labels only class 1, sample 1 only class 2; a perfect prediction scores ~0 on the
    # Dice term, and a class labelled by no sample (3) is left out of the mean.
    target = torch.zeros(2, 1, 4, 4, dtype=torch.long)
    target[0, 0, :2] = 1
    target[1, 0, 2:] = 2
    logits = torch.full((2, 4, 4, 4), -8.0)
    logits[0, 1, :2], logits[0, 0, 2:] = 8.0, 8.0
    logits[1, 2, 2:], logits[1, 0, :2] = 8.0, 8.0
    labelled = torch.tensor([[True, True, False, False], [True, False, True, False]])
    loss = PartialDiceCELoss(batch=True, lambda_ce=0.0)(logits, target, labelled)
    assert loss < 1e-3
    # predicting class 2 in sample 0 (not labelled there) is free; in sample 1 it is not
    logits0 = logits.clone()
    logits0[0, 2, 2:], logits0[0, 0, 2:] = 8.0, -8.0
    assert PartialDiceCELoss(batch=True, lambda_ce=0.0)(logits0, target, labelled) < 1e-3
    logits1 = logits.clone()
    logits1[1, 2, :2], logits1[1, 0, :2] = 8.0, -8.0
    assert PartialDiceCELoss(batch=True, lambda_ce=0.0)(logits1, target, labelled) > 0.1


def test_ignored_voxels_do_not_contribute():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 3, 8, 8, generator=g, requires_grad=True)
    target = torch.randint(0, 3, (1, 1, 8, 8), generator=g)
    target[..., :4] = 255
    loss = PartialDiceCELoss()(logits, target)
    loss.backward()
    assert torch.all(logits.grad[..., :4] == 0)
    assert logits.grad[..., 4:].abs().sum() > 0
    # changing the logits of ignored voxels leaves the loss unchanged
    logits2 = logits.detach().clone()
    logits2[..., :4] = torch.randn(1, 3, 8, 4, generator=g) * 10
    assert torch.allclose(PartialDiceCELoss()(logits2, target), loss.detach(), atol=1e-6)


def test_unlabelled_class_merged_into_background():
    # A sample that labels only class 1: predicting class 2 where the label says background
    # costs nothing, unlike in the fully labelled loss.
    target = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    target[..., :2, :] = 1
    logits = torch.full((1, 3, 4, 4), -5.0)
    logits[:, 1, :2, :] = 5.0
    logits[:, 2, 2:, :] = 5.0  # confident "class 2" on voxels labelled background
    labelled = torch.tensor([[True, True, False]])
    partial = PartialDiceCELoss()(logits, target, labelled)
    full = PartialDiceCELoss()(logits, target)
    assert partial < 0.02
    assert full > 1.0


def test_all_ignored_gives_zero_with_gradient_graph():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    target = torch.full((1, 1, 4, 4), 255)
    loss = PartialDiceCELoss()(logits, target)
    assert torch.isfinite(loss)
    loss.backward()
