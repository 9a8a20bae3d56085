"""Tests of the models layer: backbones, heads, registry and export to MONAI networks."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import UNETR, FlexibleUNet
from torch import nn

from medssl_kit.models import (
    FPN,
    ClassificationHead,
    KeyReport,
    MLPHead,
    PixelProjectionHead,
    RestorationHead,
    ResUNet,
    SegmentationHead,
    UNet,
    UNETRBackbone,
    available_backbones,
    build_backbone,
    monai_spec,
    to_monai,
)
from medssl_kit.models.base import batch_statistics
from medssl_kit.models.export import monai_state_dict


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def small(name: str, dims: int, **kw) -> tuple[nn.Module, tuple[int, ...]]:
    """A small backbone of each kind and an input size it accepts."""
    if name == "unet":
        size = (32, 48) if dims == 2 else (16, 16, 32)
        net = UNet(dims, 2, 3, channels=(8, 16, 16, 32, 32), **kw)
    elif name == "resunet":
        size = (64, 96) if dims == 2 else (32, 32, 64)
        net = ResUNet(dims, 2, 3, backbone="resnet10", decoder_channels=(32, 16, 16, 8, 8), **kw)
    elif name == "fpn":
        size = (32, 48) if dims == 2 else (16, 16, 32)
        net = FPN(dims, 2, 3, n_levels=4, base_channels=8, **kw)
    else:
        size = (32, 48) if dims == 2 else (32, 32, 16)
        net = UNETRBackbone(dims, 2, 3, img_size=size, feature_size=8, hidden_size=48, **kw)
    return net, size


def warm_up(net: nn.Module, size: tuple[int, ...]) -> None:
    """Give normalisation layers non-trivial running statistics, then switch to eval mode."""
    net.train()
    with torch.no_grad():
        for _ in range(2):
            net(torch.randn(2, net.in_channels, *size) * 3 + 1)
    net.eval()


def spatial(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape[2:])


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("name", ["unet", "resunet", "fpn", "unetr"])
def test_feature_and_output_shapes(name: str, dims: int) -> None:
    net, size = small(name, dims)
    net.eval()
    x = torch.randn(2, 2, *size)
    with torch.no_grad():
        feats = net.forward_features(x)
        logits = net(x)
    assert feats.output.shape == (2, 3, *size)
    torch.testing.assert_close(feats.output, logits)
    assert [f.shape[1] for f in feats.encoder] == net.encoder_channels
    assert [f.shape[1] for f in feats.decoder] == net.decoder_channels
    assert all(f.shape[0] == 2 and f.ndim == dims + 2 for f in feats.encoder + feats.decoder)
    # encoder: highest resolution first; decoder: lowest first, full (input) resolution last
    enc_sizes = [spatial(f)[0] for f in feats.encoder]
    dec_sizes = [spatial(f)[0] for f in feats.decoder]
    assert enc_sizes == sorted(enc_sizes, reverse=True)
    assert dec_sizes == sorted(dec_sizes)
    assert spatial(feats.decoder[-1]) == size


def test_unet_level_resolutions_and_odd_input() -> None:
    net = UNet(2, 1, 2, channels=(8, 8, 16, 16)).eval()
    x = torch.randn(1, 1, 37, 45)
    feats = net.forward_features(x)
    assert [spatial(f) for f in feats.encoder] == [(37, 45), (18, 22), (9, 11), (4, 5)]
    assert [spatial(f) for f in feats.decoder] == [(9, 11), (18, 22), (37, 45)]
    assert feats.output.shape == (1, 2, 37, 45)


def test_fpn_levels_are_vox2vec_pyramid() -> None:
    net = FPN(3, 1, 2).eval()  # vox2vec default: 6 levels, base 16
    assert net.level_channels == [16, 32, 64, 128, 256, 512]
    assert sum(net.level_channels) == 1008
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        feats = net.forward_features(x)
    assert [f.shape[1] for f in feats.levels] == [16, 32, 64, 128, 256, 512]
    assert [spatial(f)[0] for f in feats.levels] == [32, 16, 8, 4, 2, 1]
    assert feats.levels[-1] is feats.encoder[-1]


def test_fpn_top_down_pathway_carries_coarse_context() -> None:
    net, size = small("fpn", 2)
    net.eval()
    enc = net.encode(torch.randn(1, 2, *size))
    levels, _ = net.decode(enc)
    changed = [*enc[:-1], enc[-1] + 1.0]
    levels2, _ = net.decode(changed)
    assert not torch.allclose(levels[-1], levels2[-1])  # the full-resolution level p_0


def test_unetr_exposes_all_layers() -> None:
    net, size = small("unetr", 3)
    net.eval()
    x = torch.randn(2, 2, *size)
    with torch.no_grad():
        feats = net.forward_features(x)
        reference = UNETR.forward(net, x)
    grid = tuple(s // 16 for s in size)
    assert len(feats.encoder) == len(feats.tokens) == 12
    assert all(m.shape == (2, 48, *grid) for m in feats.encoder)
    assert all(t.shape == (2, grid[0] * grid[1] * grid[2], 48) for t in feats.tokens)
    # a feature map is its layer's tokens laid out on the patch grid
    torch.testing.assert_close(feats.encoder[1].flatten(2).transpose(1, 2), feats.tokens[1])
    torch.testing.assert_close(feats.output, reference)
    with pytest.raises(ValueError, match="img_size"):
        net(torch.randn(1, 2, 48, 32, 16))


# --------------------------------------------------------------------------- encode / decode


@pytest.mark.parametrize("name", ["unet", "resunet", "fpn"])
def test_encode_then_decode_equals_forward(name: str) -> None:
    net, size = small(name, 2, **({} if name == "fpn" else {"dropout": 0.3}))
    warm_up(net, size)
    x = torch.randn(2, 2, *size)
    with torch.no_grad():
        decoded, logits = net.decode(net.encode(x))
        torch.testing.assert_close(logits, net(x))
        torch.testing.assert_close(decoded[-1], net.forward_features(x).decoder[-1])


def test_resunet_matches_flexible_unet_forward() -> None:
    for skips in (True, False):
        net, size = small("resunet", 2, skips=skips)
        warm_up(net, size)
        x = torch.randn(1, 2, *size)
        with torch.no_grad():
            torch.testing.assert_close(net(x), FlexibleUNet.forward(net, x))


# --------------------------------------------------------------------------- skips


@pytest.mark.parametrize("name", ["unet", "resunet"])
def test_skips_off_removes_every_skip_path(name: str) -> None:
    outputs = {}
    for skips in (True, False):
        net, size = small(name, 2, skips=skips)
        warm_up(net, size)
        enc = net.encode(torch.randn(2, 2, *size))
        with torch.no_grad():
            _, out = net.decode(enc)
            scrambled = [torch.randn_like(f) for f in enc[:-1]] + [enc[-1]]
            _, out_scrambled = net.decode(scrambled)
        outputs[skips] = torch.allclose(out, out_scrambled)

        # gradient proof: the logits depend on the non-bottleneck features only via skips
        leaves = [f.detach().requires_grad_(True) for f in enc]
        decoded, logits = net.decode(leaves)
        (logits.square().sum() + sum(d.square().sum() for d in decoded)).backward()
        grads = [leaf.grad for leaf in leaves]
        assert grads[-1] is not None and grads[-1].abs().sum() > 0
        if skips:
            assert all(g is not None and g.abs().sum() > 0 for g in grads[:-1])
        else:
            assert all(g is None for g in grads[:-1])
    assert outputs == {True: False, False: True}


def test_skip_and_nonskip_unet_share_the_encoder() -> None:
    """PCRLv2 pre-trains the non-skip UNet and fine-tunes its encoder inside a skip UNet."""
    pretrained = UNet(2, 1, 2, skips=False)
    finetune = UNet(2, 1, 4, skips=True)
    encoder = pretrained.encoder_state_dict()
    assert encoder and all(k.startswith("encoder.") for k in encoder)
    result = finetune.load_state_dict(encoder, strict=False)
    assert not result.unexpected_keys
    assert all(not k.startswith("encoder.") for k in result.missing_keys)
    torch.testing.assert_close(
        finetune.encoder[3].convs.conv_1.conv.weight, encoder["encoder.3.convs.conv_1.conv.weight"]
    )


@pytest.mark.parametrize("dims", [2, 3])
def test_nonskip_weights_embedded_in_a_skip_unet_compute_the_same_function(dims) -> None:
    """A non-skip UNet's decoder enters a skip UNet with zero skip inputs: same output, and
    the skip weights still get gradient (fine-tuning can learn to use them)."""
    torch.manual_seed(0)
    channels = (4, 8, 8, 16)
    nonskip = UNet(dims, 1, 3, channels=channels, skips=False).eval()
    skip = UNet(dims, 1, 3, channels=channels, skips=True).eval()
    state = skip.embed_nonskip_state(nonskip.state_dict())
    skip.load_state_dict(state)  # strict: every key fits
    x = torch.rand(2, 1, *([16] * dims))
    torch.testing.assert_close(skip(x), nonskip(x))
    first = skip.decoder[0].convs.conv_0.conv.weight
    assert first[:, : channels[-2]].abs().sum() == 0
    skip.train()
    skip(x).square().mean().backward()
    assert first.grad[:, : channels[-2]].abs().sum() > 0
    with pytest.raises(ValueError, match="does not fit"):
        skip.embed_nonskip_state({"decoder.0.convs.conv_0.conv.weight": torch.zeros(8, 3, 3, 3)})
    with pytest.raises(ValueError, match="skips=True"):
        nonskip.embed_nonskip_state(nonskip.state_dict())


# --------------------------------------------------------------------------- dropout


@pytest.mark.parametrize("name", ["unet", "resunet"])
def test_dropout_only_in_decoder_and_mc_controllable(name: str) -> None:
    net, size = small(name, 2, dropout=0.5)
    drop_names = [n for n, m in net.named_modules() if isinstance(m, nn.Dropout)]
    assert drop_names and all(n.startswith("decoder.") for n in drop_names)
    assert len(net.dropout_layers) == len(drop_names)
    if name == "unet":
        assert len(drop_names) == 2 * (net.n_levels - 1)  # both convolutions of every block

    x = torch.randn(2, 2, *size)
    with torch.no_grad():
        net.train()
        enc_a, enc_b = net.encode(x), net.encode(x)
        assert all(torch.equal(a, b) for a, b in zip(enc_a, enc_b, strict=True))
        assert not torch.allclose(net.decode(enc_a)[1], net.decode(enc_a)[1])

        net.eval()
        torch.testing.assert_close(net(x), net(x))
        net.set_mc_dropout(True)
        norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert norms and not any(m.training for m in norms)
        assert all(m.training for m in net.dropout_layers)
        enc = net.encode(x)
        assert not torch.allclose(net.decode(enc)[1], net.decode(enc)[1])
        # batched MC passes: repeat the encoder features, each copy gets its own masks
        _, batched = net.decode([f.repeat(4, *([1] * (f.ndim - 1))) for f in enc])
        assert not torch.allclose(batched[:2], batched[2:4])
        net.set_mc_dropout(False)
        torch.testing.assert_close(net(x), net(x))


@pytest.mark.parametrize("name", ["unet", "resunet"])
def test_dropout_levels_keep_dropout_in_the_last_decoder_blocks_only(name: str) -> None:
    full, _ = small(name, 2, dropout=0.5)
    blocks = full.decoder if name == "unet" else full.decoder.blocks
    per_block = len(full.dropout_layers) // len(blocks)
    for levels in (1, 2, len(blocks)):
        net, _ = small(name, 2, dropout=0.5, dropout_levels=levels)
        names = [n for n, m in net.named_modules() if isinstance(m, nn.Dropout)]
        assert len(names) == per_block * levels == len(net.dropout_layers)
        first = len(blocks) - levels  # deepest-first: only blocks first.. keep dropout
        prefix = "decoder." if name == "unet" else "decoder.blocks."
        assert {int(n[len(prefix) :].split(".")[0]) for n in names} == set(
            range(first, len(blocks))
        )
        assert net.config["dropout_levels"] == levels
        # the weights are those of the network with dropout everywhere
        assert net.state_dict().keys() == full.state_dict().keys()
    with pytest.raises(ValueError, match="dropout_levels"):
        small(name, 2, dropout=0.5, dropout_levels=len(blocks) + 1)


def test_no_active_dropout_without_dropout() -> None:
    unet, _ = small("unet", 2)
    assert unet.dropout_layers == []
    assert not any(isinstance(m, nn.Dropout) for m in unet.modules())
    resunet, _ = small("resunet", 2)  # FlexibleUNet keeps p=0 dropout modules
    assert all(m.p == 0 for m in resunet.dropout_layers)


def test_batch_statistics_normalises_with_the_batch_and_changes_nothing() -> None:
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Conv2d(4, 2, 1))
    with torch.no_grad():
        net[1].running_mean.fill_(5.0)
        net[1].running_var.fill_(100.0)
    net.eval()
    x = torch.randn(3, 1, 8, 8)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        in_eval = net(x)
        with batch_statistics(net):
            assert net[1].training and not net[2].training  # BN on the batch, dropout still off
            inside = net(x)
            again = net(x)
    h = net[0](x)
    mean, var = h.mean((0, 2, 3), keepdim=True), h.var((0, 2, 3), unbiased=False, keepdim=True)
    w, b = net[1].weight.view(1, -1, 1, 1), net[1].bias.view(1, -1, 1, 1)
    expected = net[3]((h - mean) / torch.sqrt(var + net[1].eps) * w + b)
    torch.testing.assert_close(inside, expected.detach())
    torch.testing.assert_close(inside, again)  # dropout stayed off: two calls agree
    assert not torch.allclose(inside, in_eval)
    assert not net[1].training and not net[2].training
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k  # running stats and num_batches_tracked restored
    net.train()
    with batch_statistics(net):
        pass
    assert net[1].training and net[2].training  # the modes it had, not eval


# --------------------------------------------------------------------------- validation


def test_unet_rejects_bad_configs_and_inputs() -> None:
    with pytest.raises(ValueError, match="norm"):
        UNet(2, 1, 2, norm="layer")
    with pytest.raises(ValueError, match="divisible"):
        UNet(2, 1, 2, channels=(12, 24), norm="group", norm_groups=8)
    with pytest.raises(ValueError, match="at least two"):
        UNet(2, 1, 2, channels=(16,))
    net = UNet(2, 1, 2, channels=(8, 16, 32))
    with pytest.raises(ValueError, match=r"\[B, 1"):
        net(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match=">= 4"):
        net(torch.randn(1, 1, 3, 32))
    with pytest.raises(ValueError, match="multiple of 32"):
        ResUNet(2, 1, 2)(torch.randn(1, 1, 48, 64))


@pytest.mark.parametrize("net", [UNet(2, 1, 2, channels=(8, 16, 32)), FPN(2, 1, 2, n_levels=3)])
def test_level_stack_encoders_check_their_input_under_their_own_name(net) -> None:
    with pytest.raises(ValueError, match=rf"^{net.name} needs every spatial side >= 4"):
        net.encode(torch.randn(1, 1, 3, 32))
    with pytest.raises(ValueError, match=rf"^{net.name} expects input of shape \[B, 1"):
        net.encode(torch.randn(1, 2, 32, 32))
    feats = net.encode(torch.randn(1, 1, 32, 32))
    assert net.n_levels == 3
    assert [f.shape[-1] for f in feats] == [32, 16, 8]


@pytest.mark.parametrize("norm", ["batch", "instance", "group"])
def test_unet_norms(norm: str) -> None:
    net = UNet(3, 1, 2, channels=(8, 8, 16, 16, 16), norm=norm, norm_groups=4).eval()
    assert net(torch.randn(1, 1, 16, 16, 32)).shape == (1, 2, 16, 16, 32)


# --------------------------------------------------------------------------- registry


def test_registry_builds_every_backbone_and_rebuilds_from_config() -> None:
    assert available_backbones() == ["fpn", "resunet", "unet", "unetr"]
    net = build_backbone("unet", 2, 1, 5, channels=(8, 16, 16, 32, 32), dropout=0.1)
    assert isinstance(net, UNet) and net.out_channels == 5
    default = build_backbone("unet", 2, 1, 2).eval()
    assert default.encoder_channels == [16, 32, 64, 128, 256]
    with torch.no_grad():
        assert default(torch.randn(1, 1, 128, 128)).shape == (1, 2, 128, 128)
    assert isinstance(build_backbone("resunet", 2, 1, 2), ResUNet)
    assert isinstance(build_backbone("fpn", 3, 1, 2), FPN)
    assert isinstance(build_backbone("unetr", 3, 1, 2, img_size=32), UNETRBackbone)
    for name in available_backbones():
        kw = {"img_size": 32} if name == "unetr" else {}
        original = build_backbone(name, 2, 1, 2, **kw)
        rebuilt = build_backbone(**original.config)
        assert type(rebuilt) is type(original)
        assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
            k: v.shape for k, v in original.state_dict().items()
        }


def test_registry_errors() -> None:
    with pytest.raises(ValueError, match="fpn, resunet, unet, unetr"):
        build_backbone("vnet", 2, 1, 2)
    with pytest.raises(TypeError, match="'chanels'.*accepts channels"):
        build_backbone("unet", 2, 1, 2, chanels=(8, 16))
    with pytest.raises(TypeError, match="img_size"):
        build_backbone("unetr", 3, 1, 2)


# --------------------------------------------------------------------------- export


EXPORT_CASES = [
    ("unet", 2, {}, "monai-unet"),
    ("unet", 3, {"norm": "instance", "act": ("leakyrelu", {"negative_slope": 0.1})}, "monai-unet"),
    ("unet", 2, {"norm": "group", "norm_groups": 4, "dropout": 0.2}, "monai-unet"),
    ("resunet", 2, {"dropout": 0.1}, "flexible-unet"),
    ("resunet", 3, {}, "flexible-unet"),
    ("unetr", 2, {}, "unetr"),
    ("unetr", 3, {"norm": "batch"}, "unetr"),
]


@pytest.mark.parametrize(("name", "dims", "kw", "target"), EXPORT_CASES)
def test_export_loads_strictly_and_reproduces_outputs(
    name: str, dims: int, kw: dict, target: str
) -> None:
    net, size = small(name, dims, **kw)
    warm_up(net, size)
    monai_net, report = to_monai(net, target)
    assert report.complete and not report.missing and not report.unexpected
    assert len(report.matched) == len(net.state_dict())
    assert "0 missing" in report.summary()

    # the exported state loads strictly into a freshly built MONAI network of the same spec
    spec = monai_spec(net, target)
    fresh = spec.build()
    assert type(fresh).__module__.startswith("monai.networks.nets")
    fresh.load_state_dict(monai_state_dict(net, target), strict=True)
    fresh.eval()
    x = torch.randn(2, 2, *size)
    with torch.no_grad():
        ours = net(x)
        torch.testing.assert_close(fresh(x), ours)
        torch.testing.assert_close(monai_net.eval()(x), ours)


def test_unet_export_key_mapping() -> None:
    state = monai_state_dict(UNet(2, 1, 2), "monai-unet")
    assert "conv_0.conv_0.conv.weight" in state
    assert "down_4.convs.conv_1.adn.N.running_mean" in state
    assert "upcat_4.upsample.deconv.weight" in state
    assert "upcat_1.convs.conv_0.conv.weight" in state
    assert "final_conv.weight" in state
    assert monai_spec(UNet(2, 1, 2), "monai-unet").qualified_name.endswith("BasicUNet")


def test_export_errors() -> None:
    with pytest.raises(ValueError, match="without skip connections"):
        to_monai(UNet(2, 1, 2, skips=False), "monai-unet")
    with pytest.raises(ValueError, match="without skip connections"):
        to_monai(ResUNet(2, 1, 2, backbone="resnet10", skips=False), "flexible-unet")
    with pytest.raises(ValueError, match="exactly 5 levels"):
        to_monai(UNet(2, 1, 2, channels=(16, 32, 64, 128)), "monai-unet")
    with pytest.raises(ValueError, match="takes a 'resunet' backbone"):
        to_monai(UNet(2, 1, 2), "flexible-unet")
    with pytest.raises(ValueError, match="takes a 'unet' backbone, got 'fpn'"):
        to_monai(FPN(2, 1, 2, n_levels=3), "monai-unet")
    with pytest.raises(ValueError, match="choose one of"):
        to_monai(UNet(2, 1, 2), "onnx")


def test_key_report() -> None:
    expected = {"a": torch.zeros(2), "b": torch.zeros(3), "c": torch.zeros(1)}
    provided = {"a": torch.ones(2), "b": torch.ones(4), "d": torch.ones(1)}
    report = KeyReport.compare(expected, provided)
    assert report.matched == ["a"]
    assert report.mismatched == ["b"]
    assert report.missing == ["c"]
    assert report.unexpected == ["d"]
    assert not report.complete
    text = report.summary()
    assert text.startswith("1 matched, 1 missing, 1 unexpected, 1 shape-mismatched")
    assert "missing: c" in text and "unexpected: d" in text


# --------------------------------------------------------------------------- heads


def count(module: nn.Module, kind: type[nn.Module]) -> int:
    return sum(isinstance(m, kind) for m in module.modules())


def test_mlp_head() -> None:
    x = torch.randn(4, 32)
    head = MLPHead(32, 64, 16, n_layers=3)
    assert head(x).shape == (4, 16)
    assert count(head, nn.Linear) == 3 and count(head, nn.BatchNorm1d) == 2
    assert count(head, nn.ReLU) == 2
    assert isinstance(head.net[-1], nn.Linear)  # no norm or activation after the output layer

    pcrl_predictor = MLPHead(32, 64, 32, n_layers=2)  # FC-BN-ReLU-FC, hidden 2C (PCRLv2 eq. 6)
    kinds = [type(m) for m in pcrl_predictor.net]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]

    projector = MLPHead(32, 64, 16, n_layers=3, last_norm=True)
    assert count(projector, nn.BatchNorm1d) == 3
    assert isinstance(projector.net[-1], nn.BatchNorm1d) and not projector.net[-1].affine
    assert projector(x).shape == (4, 16)

    plain = MLPHead(32, 64, 16, n_layers=2, norm="none")
    assert count(plain, nn.BatchNorm1d) == 0 and plain(x).shape == (4, 16)
    with pytest.raises(ValueError):
        MLPHead(32, 64, 16, norm="layer")


@pytest.mark.parametrize("dims", [2, 3])
def test_dense_heads(dims: int) -> None:
    size = (8,) * dims
    feats = torch.randn(2, 12, *size)
    proj = PixelProjectionHead(dims, 12, 12, 24, n_layers=3)  # MixCL projector: c, c, 2c
    assert proj(feats).shape == (2, 24, *size)
    convs = [m for m in proj.modules() if isinstance(m, nn.Conv2d | nn.Conv3d)]
    assert len(convs) == 3 and all(set(c.kernel_size) == {1} for c in convs)
    assert count(proj, nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d) == 2
    assert PixelProjectionHead(dims, 12, 0, 32, n_layers=1)(feats).shape == (2, 32, *size)

    restore = RestorationHead(dims, 12, 1)
    assert restore(feats).shape == (2, 1, *size)
    kinds = [type(m).__name__ for m in restore.net]
    assert kinds == [f"Conv{dims}d", f"BatchNorm{dims}d", "ReLU", f"Conv{dims}d"]

    assert SegmentationHead(dims, 12, 5)(feats).shape == (2, 5, *size)
    classify = ClassificationHead(12, 3)
    logits = classify(feats)
    assert logits.shape == (2, 3)
    torch.testing.assert_close(logits, classify.fc(feats.mean(dim=tuple(range(2, 2 + dims)))))


@pytest.mark.parametrize("skips", [True, False])
@pytest.mark.parametrize("dropout_levels", [None, 2])
def test_pass_decoder_is_decode_of_the_repeated_features(skips, dropout_levels):
    # odd sizes: max-pooling floors, the upsampled maps are padded back; dropout modules in the
    # last blocks (inactive here) move where the passes start to differ
    torch.manual_seed(0)
    kw = {"dropout": 0.3, "dropout_levels": dropout_levels}
    net = build_backbone("unet", 2, 1, 3, channels=(4, 8, 8, 16, 16), skips=skips, **kw).eval()
    with torch.no_grad():
        feats = net.encode(torch.rand(3, 1, 40, 36))
        decode = net.pass_decoder(feats)
        for passes in (4, 1):  # one preparation, several calls
            repeated = net.decode([f.repeat(passes, 1, 1, 1) for f in feats])[0][-1]
            got = decode(passes)
            assert got.shape == (3 * passes, 4, 40, 36)
            torch.testing.assert_close(got, repeated, rtol=0, atol=1e-6)
        # from a decoder pass's input to the first dropout layer: the same, without the
        # blocks before it (which must not run again)
        seen = []
        hook = net.dropout_layers[0].register_forward_pre_hook(lambda _, i: seen.append(i[0]))
        net.decode(feats)
        hook.remove()
        ran = []
        hooks = [b.register_forward_hook(lambda *_: ran.append(1)) for b in net.decoder]
        got = net.pass_decoder(feats, shared=seen[0])(2)
        for hook in hooks:
            hook.remove()
        repeated = net.decode([f.repeat(2, 1, 1, 1) for f in feats])[0][-1]
        torch.testing.assert_close(got, repeated, rtol=0, atol=1e-6)
        assert ran == []  # blocks are only called whole before the first dropout
    with pytest.raises(ValueError, match="encoder features"):
        net.pass_decoder(feats[1:])
