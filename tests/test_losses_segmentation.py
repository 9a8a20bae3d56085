import pytest
import torch
from monai.losses import DiceCELoss

from medssl_kit.losses.segmentation import PartialDiceCELoss


@pytest.mark.parametrize("shape", [(2, 4, 9, 7), (2, 3, 5, 6, 4)])
def test_equals_monai_dicece_when_fully_labelled(shape):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(shape, generator=g)
    target = torch.randint(0, shape[1], (shape[0], 1, *shape[2:]), generator=g)
    ours = PartialDiceCELoss()(logits, target)
    ref = DiceCELoss(to_onehot_y=True, softmax=True)(logits, target)
    assert torch.allclose(ours, ref, atol=1e-5)


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
