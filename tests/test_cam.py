"""Grad-CAM for segmentation networks and slice classifiers (MONAI GradCAM underneath)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medssl_kit.data.datasets import SliceDataset, load_volumes
from medssl_kit.data.manifest import load_manifest
from medssl_kit.models.registry import build_backbone
from medssl_kit.train.finetune import _Classifier
from medssl_kit.viz.cam import (
    GradCAMExplainer,
    choose_target_class,
    classification_cam,
    default_target_layer,
    segmentation_cam,
)

A = (slice(2, 8), slice(3, 9))  # bright blob: class 0's evidence
B = (slice(20, 28), slice(18, 26))  # dark blob: class 1's evidence


class SignFeatures(nn.Module):
    """Channel 0 = ReLU(x), channel 1 = ReLU(−x), average-pooled 2×: the Grad-CAM layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
        self.pool = nn.AvgPool2d(2)

    def forward(self, x):
        return self.pool(torch.relu(self.conv(x)))


class RegionSegmenter(nn.Module):
    """Logit of class c at a pixel = channel c of the features: class 0 lives only where x > 0
    (blob A), class 1 only where x < 0 (blob B)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = SignFeatures()
        self.up = nn.Upsample(scale_factor=2)

    def forward(self, x):
        return self.up(self.features(x))


class RegionClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = SignFeatures()

    def forward(self, x):
        return self.features(x).mean(dim=(2, 3))


def _two_blobs() -> torch.Tensor:
    x = torch.zeros(1, 1, 32, 32)
    x[(0, 0, *A)] = 1.0
    x[(0, 0, *B)] = -1.0
    return x


def _share(cam: torch.Tensor, region: tuple[slice, slice], margin: int = 2) -> float:
    grown = tuple(slice(max(s.start - margin, 0), s.stop + margin) for s in region)
    return float(cam[(0, 0, *grown)].sum() / cam.sum())


# the toy networks' target layer is their first module: its input needs no gradient
TOY = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


@TOY
@pytest.mark.parametrize("task", ["segmentation", "classification"])
def test_cam_concentrates_where_the_class_evidence_is(task):
    x = _two_blobs()
    if task == "segmentation":
        net = RegionSegmenter()
        cam0 = segmentation_cam(net, x, 0, target_layer="features")
        cam1 = segmentation_cam(net, x, 1, target_layer="features")
    else:
        net = RegionClassifier()
        cam0 = classification_cam(net, x, 0, target_layer="features")
        cam1 = classification_cam(net, x, 1, target_layer="features")
    assert cam0.shape == cam1.shape == x.shape  # upsampled from the 16² layer to the input
    assert _share(cam0, A) > 0.95 and _share(cam1, B) > 0.95
    assert cam0[(0, 0, *B)].max() == 0 and cam1[(0, 0, *A)].max() == 0
    assert not torch.equal(cam0, cam1)  # the explicit class index changes the map


class MixedSegmenter(RegionSegmenter):
    """Class 0's logit is channel 0 on the left half of the image and channel 1 on the right."""

    def forward(self, x):
        f = self.up(self.features(x))
        left = torch.arange(x.shape[-1]) < x.shape[-1] // 2
        return torch.stack([torch.where(left, f[:, 0], f[:, 1]), f[:, 1]], dim=1)


@TOY
def test_segmentation_score_is_the_mean_over_the_given_mask():
    net, x = MixedSegmenter(), _two_blobs()
    left = torch.full((1, 32, 32), 1)
    left[..., :16] = 0  # class 0 labelled on the left half: its logits there read channel 0
    right = 1 - left  # class 0 labelled on the right half: channel 1
    cam_left = segmentation_cam(net, x, 0, mask=left, target_layer="features")
    cam_right = segmentation_cam(net, x, 0, mask=right, target_layer="features")
    assert _share(cam_left, A) > 0.95 and _share(cam_right, B) > 0.95


def _unet(dims: int = 2, **kw) -> nn.Module:
    torch.manual_seed(0)
    return build_backbone("unet", dims, 1, 3, channels=(4, 8, 8, 16, 16), **kw)


@pytest.mark.parametrize("dims", [2, 3])
def test_segmentation_cam_shapes_range_and_class_index(dims):
    net = _unet(dims)
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.rand(2, 1, *((32, 32) if dims == 2 else (16, 32, 32)))
    cams = {c: segmentation_cam(net, x, c) for c in (1, 2)}
    for cam in cams.values():
        assert cam.shape == (2, 1, *x.shape[2:])
        assert cam.min() >= 0 and cam.max() <= 1
        assert torch.allclose(cam.flatten(1).amax(1), torch.ones(2))  # each map spans [0, 1]
    assert not torch.equal(cams[1], cams[2])
    label = torch.randint(0, 3, (2, *x.shape[2:]))
    assert segmentation_cam(net, x, 1, mask=label).shape == cams[1].shape
    # the network passed in is untouched: same weights, mode and no hooks left behind
    assert net.training and all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert not any(m._forward_hooks or m._backward_hooks for m in net.modules())


def test_classifier_cam_and_default_layers():
    backbone = _unet(skips=False)
    classifier = _Classifier(backbone)
    assert default_target_layer(classifier) == "backbone.encoder.4"
    assert default_target_layer(backbone) == "encoder.4"
    resunet = build_backbone("resunet", 2, 1, 2)
    assert default_target_layer(resunet) == "encoder.layer4"
    x = torch.rand(3, 1, 32, 32)
    cam = classification_cam(classifier, x, 1)
    assert cam.shape == (3, 1, 32, 32) and cam.min() >= 0 and cam.max() <= 1
    other = classification_cam(classifier, x, 0, target_layer="backbone.encoder.3")
    assert other.shape == cam.shape
    with pytest.raises(ValueError, match="not a module"):
        classification_cam(classifier, x, 1, target_layer="backbone.nope")
    with pytest.raises(ValueError, match="no default"):
        default_target_layer(nn.Conv2d(1, 1, 1))
    with pytest.raises(ValueError, match="class_idx"):
        classification_cam(classifier, x, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="task"):
        GradCAMExplainer(classifier, "detection")


def test_volume_cam_equals_slice_by_slice():
    net = _unet()
    explainer = GradCAMExplainer(net, "segmentation")
    volume = torch.rand(1, 5, 32, 32)
    label = torch.randint(0, 3, (1, 5, 32, 32))
    maps = explainer.volume(volume, 2, mask=label, batch_size=2)
    assert maps.shape == (5, 32, 32)
    one = explainer(volume[:, 3:4].transpose(0, 1), 2, label[0, 3:4])
    assert torch.allclose(maps[3], one[0, 0], atol=1e-6)


def test_choose_target_class_has_positive_and_negative_slices(tiny_phantom):
    manifest = load_manifest(tiny_phantom)
    name = choose_target_class(manifest)
    class_id = {v: k for k, v in manifest.labels.items()}[name]
    for split in ("train", "test"):
        data = SliceDataset(load_volumes(manifest, [split]), skip_empty=True, with_label=True)
        present = [bool((data[i]["label"] == class_id).any()) for i in range(len(data))]
        assert any(present) and not all(present)
