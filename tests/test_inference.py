import copy

import pytest
import torch
from torch import nn

from medssl_kit.evaluate.inference import mc_dropout_predict, predict_classes, predict_volume


def _image(c=2, d=7, h=10, w=12, seed=0):
    return torch.randn(c, d, h, w, generator=torch.Generator().manual_seed(seed))


def _conv2d(in_ch, k=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(in_ch, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, k, 1))


@pytest.mark.parametrize("context", [0, 1, 2])
def test_predict_volume_2d_equals_manual_slice_loop(context):
    image = _image()
    c, d = image.shape[:2]
    model = _conv2d(c * (2 * context + 1))
    probs = predict_volume(model, image, 2, batch_size=3, context=context)
    assert probs.shape == (3, *image.shape[1:]) and probs.dtype == torch.float32
    with torch.no_grad():
        for z in range(d):
            # slice-major channels: offsets -context..+context, each with all C channels
            idx = [min(max(z + o, 0), d - 1) for o in range(-context, context + 1)]
            x = torch.cat([image[:, i] for i in idx], dim=0)[None]
            expected = torch.softmax(model(x), dim=1)[0]
            torch.testing.assert_close(probs[:, z], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(probs.sum(0), torch.ones(image.shape[1:]))


def test_predict_volume_2d_sliding_window_pointwise_model():
    image = _image(c=1)
    model = nn.Sequential(nn.Conv2d(1, 4, 1), nn.Tanh(), nn.Conv2d(4, 3, 1))
    full = predict_volume(model, image, 2)
    tiled = predict_volume(model, image, 2, roi_size=(4, 5), overlap=0.5, blend_mode="gaussian")
    torch.testing.assert_close(tiled, full, rtol=1e-5, atol=1e-6)


def test_predict_volume_3d_roi_covering_everything_equals_full_forward():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(2, 6, 3, padding=1), nn.ReLU(), nn.Conv3d(6, 4, 3, padding=1))
    image = _image(d=6, h=8, w=9)
    probs = predict_volume(model, image, 3, roi_size=tuple(image.shape[1:]))
    with torch.no_grad():
        expected = torch.softmax(model(image[None]), dim=1)[0]
    torch.testing.assert_close(probs, expected, rtol=1e-5, atol=1e-6)


def test_predict_volume_3d_overlapping_windows_stitch_exactly():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv3d(2, 6, 1), nn.ReLU(), nn.Conv3d(6, 3, 1))
    image = _image(d=6, h=8, w=9)
    probs = predict_volume(model, image, 3, roi_size=(3, 4, 5), overlap=0.25, batch_size=2)
    with torch.no_grad():
        expected = torch.softmax(model(image[None]), dim=1)[0]
    torch.testing.assert_close(probs, expected, rtol=1e-5, atol=1e-6)


def test_predict_volume_argument_errors():
    image = _image()
    model3d = nn.Conv3d(2, 3, 1)
    with pytest.raises(ValueError, match="roi_size"):
        predict_volume(model3d, image, 3)
    with pytest.raises(ValueError, match="context"):
        predict_volume(model3d, image, 3, roi_size=(2, 2, 2), context=1)
    with pytest.raises(ValueError, match="K >= 2"):
        predict_volume(nn.Conv2d(2, 1, 1), image, 2)
    with pytest.raises(ValueError, match="spatial_dims"):
        predict_volume(model3d, image, 1)


def test_predict_volume_uses_eval_mode_and_restores_modes():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 3, 1))
    model[1].running_mean.uniform_(-1, 1)
    model[1].running_var.uniform_(0.5, 2)
    model.train()
    model[2].eval()
    before = copy.deepcopy(model.state_dict())
    image = _image()
    probs = predict_volume(model, image, 2, batch_size=4)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert [m.training for m in model.modules()] == [True, True, True, False]
    model.eval()
    with torch.no_grad():
        expected = torch.softmax(model(image.transpose(0, 1)), dim=1).transpose(0, 1)
    torch.testing.assert_close(probs, expected, rtol=1e-5, atol=1e-6)


def test_predict_volume_accepts_plain_callable_and_predict_classes():
    image = _image(c=1, d=3, h=4, w=5)
    probs = predict_volume(lambda x: torch.cat([x, -x], dim=1), image, 2)
    torch.testing.assert_close(probs[0], torch.sigmoid(2 * image[0]))
    torch.testing.assert_close(predict_classes(probs), (image[0] < 0).long())


class _DropoutNet(nn.Module):
    def __init__(self, p: float = 0.5):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(p)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        return self.head(self.drop(torch.relu(self.norm(self.conv(x)))))


def _dropout_net(p=0.5):
    torch.manual_seed(3)
    net = _DropoutNet(p)
    net.norm.running_mean.uniform_(-1, 1)
    net.norm.running_var.uniform_(0.5, 2)
    net.norm.num_batches_tracked.fill_(7)
    return net


def test_mc_dropout_keeps_batchnorm_in_eval_and_dropout_active():
    net = _dropout_net()
    net.train()
    before = copy.deepcopy(net.state_dict())
    image = _image(c=1, d=4, h=8, w=8)
    mean, entropy = mc_dropout_predict(net, image, 2, n_samples=6, seed=0)
    for k, v in net.state_dict().items():  # running stats untouched: BN never in train mode
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert all(m.training for m in net.modules())  # modes restored
    assert mean.shape == (3, 4, 8, 8) and entropy.shape == (4, 8, 8)
    torch.testing.assert_close(mean.sum(0), torch.ones(4, 8, 8))
    assert entropy.min() >= 0 and entropy.max() <= 1
    deterministic = predict_volume(net, image, 2)
    assert (mean - deterministic).abs().max() > 1e-3  # dropout was active
    one_a = mc_dropout_predict(net, image, 2, n_samples=1, seed=1)[0]
    one_b = mc_dropout_predict(net, image, 2, n_samples=1, seed=2)[0]
    assert (one_a - one_b).abs().max() > 1e-3  # samples differ
    # with p = 0 every sample equals the eval-mode prediction, which uses BN running stats
    net.drop.p = 0.0
    zero_p, _ = mc_dropout_predict(net, image, 2, n_samples=3)
    torch.testing.assert_close(zero_p, deterministic, rtol=1e-5, atol=1e-6)


def test_mc_dropout_is_deterministic_given_a_seed():
    net = _dropout_net()
    image = _image(c=1, d=3, h=8, w=8)
    state = torch.get_rng_state()
    a = mc_dropout_predict(net, image, 2, n_samples=4, seed=5)
    assert torch.equal(torch.get_rng_state(), state)  # seed= forks the RNG
    b = mc_dropout_predict(net, image, 2, n_samples=4, seed=5)
    torch.manual_seed(9)
    c = mc_dropout_predict(net, image, 2, n_samples=4)
    torch.manual_seed(9)
    d = mc_dropout_predict(net, image, 2, n_samples=4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(c[0], d[0]) and torch.equal(c[1], d[1])
    assert not torch.equal(a[0], c[0])


def test_mc_dropout_entropy_extremes_and_mixed_modes_restored():
    class SignNet(nn.Module):  # no dropout: one-hot output from the sign of the input
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.tensor(1e4))

        def forward(self, x):
            return torch.cat([x, -x, torch.zeros_like(x)], dim=1) * self.scale

    image = torch.randint(0, 2, (1, 3, 4, 5), generator=torch.Generator().manual_seed(0)) * 2.0 - 1
    with pytest.warns(UserWarning, match="no dropout"):
        mean, entropy = mc_dropout_predict(SignNet(), image, 2, n_samples=5)
    assert torch.equal(entropy, torch.zeros_like(entropy))
    torch.testing.assert_close(predict_classes(mean), (image[0] < 0).long())

    # dropout before a zero-weight conv: the logits are its bias, whatever the mask
    net = nn.Sequential(nn.Dropout(0.3), nn.Conv2d(1, 4, 1))
    nn.init.zeros_(net[1].weight)
    nn.init.zeros_(net[1].bias)
    net.train()
    net[1].eval()
    _, entropy = mc_dropout_predict(net, image, 2, n_samples=3)
    torch.testing.assert_close(entropy, torch.ones_like(entropy))  # uniform over K = 4
    with torch.no_grad():
        net[1].bias.copy_(torch.tensor([0.0, 0.0, -1e4, -1e4]))
    _, entropy = mc_dropout_predict(net, image, 2, n_samples=3)
    # two equally likely classes out of four: log 2 / log 4
    torch.testing.assert_close(entropy, torch.full_like(entropy, 0.5))
    assert [m.training for m in net.modules()] == [True, True, False]
