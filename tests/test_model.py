"""PFANet network: size, shapes, input checks, ablation switches, normalisation modes, dropout, attention ranges.

Expected values are worked out here from the layer shapes in PFANET.md, not read back from the implementation.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from pfanet.model import PFANet, PFANetConfig, upsample


def conv_params(cin: int, cout: int, kh: int, kw: int, bias: bool = True) -> int:
    return cin * cout * kh * kw + (cout if bias else 0)


def bn_params(c: int) -> int:
    return 2 * c  # gamma, beta (moving mean/variance are buffers, not parameters)


def official_param_count() -> int:
    """Trainable parameters of the official network, from the layer list in PFANET.md."""
    vgg = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256),
           (256, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)]
    n = sum(conv_params(i, o, 3, 3) for i, o in vgg)
    for cin in (256, 512, 512):  # CPFE on C3, C4, C5: 1x1 + three dilated 3x3, 32 each, no bias; BN on 128
        n += conv_params(cin, 32, 1, 1, bias=False) + 3 * conv_params(cin, 32, 3, 3, bias=False) + bn_params(128)
    n += conv_params(384, 96, 1, 1) + conv_params(96, 384, 1, 1)  # the two Dense layers of CA
    n += conv_params(384, 64, 1, 1) + bn_params(64)  # C345_conv, C345_BN
    n += conv_params(64, 64, 3, 3) + bn_params(64)  # C1_conv, C1_BN_BN
    n += conv_params(128, 64, 3, 3) + bn_params(64)  # C2_conv, C2_BN_BN
    n += conv_params(128, 64, 3, 3) + bn_params(64)  # C12_conv, C12_BN
    for _ in range(2):  # SA branches: (1,9) or (9,1) to 32 + BN, then (9,1) or (1,9) to 1 + BN
        n += conv_params(64, 32, 1, 9) + bn_params(32) + conv_params(32, 1, 9, 1) + bn_params(1)
    n += conv_params(128, 1, 3, 3)  # fusion conv "sa"
    return n


def test_parameter_count_matches_the_official_layer_shapes():
    expected = official_param_count()
    assert abs(expected - 16.18e6) < 0.01e6  # PFANET.md: "about 16.18 M"
    model = PFANet()
    assert sum(p.numel() for p in model.parameters()) == expected
    # BN moving statistics: 3 CPFE x 128, C345/C1/C2/C12 x 64, SA 2 x (32 + 1); each has mean and variance
    stats = sum(b.numel() for name, b in model.named_buffers() if name.endswith(("running_mean", "running_var")))
    assert stats == 2 * (3 * 128 + 4 * 64 + 2 * 33)


@pytest.mark.parametrize("h,w", [(32, 32), (64, 96), (96, 64), (128, 64)])
def test_output_is_one_channel_of_logits_at_input_size(h, w):
    torch.manual_seed(0)
    model = PFANet().eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, h, w))
        assert out.shape == (2, 1, h, w)
        assert torch.isfinite(out).all()
        # No sigmoid after the fusion conv: a constant fusion conv gives exactly its bias, negative included.
        model.fusion.weight.zero_()
        model.fusion.bias.fill_(-3.25)
        assert torch.equal(model(torch.randn(1, 3, h, w)), torch.full((1, 1, h, w), -3.25))


@pytest.mark.parametrize("shape", [(1, 3, 64, 80), (1, 3, 50, 64), (1, 3, 16, 16), (1, 3, 33, 64)])
def test_size_not_a_multiple_of_32_is_a_clear_error(shape):
    with pytest.raises(ValueError, match="multiples of 32"):
        PFANet()(torch.zeros(shape))


@pytest.mark.parametrize("shape", [(1, 1, 64, 64), (1, 4, 64, 64), (3, 64, 64), (1, 1, 3, 64, 64)])
def test_wrong_channel_count_or_rank_is_a_clear_error(shape):
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        PFANet()(torch.zeros(shape))


def test_unknown_norm_mode_is_an_error():
    with pytest.raises(ValueError, match="norm"):
        PFANetConfig(norm="group")


SWITCHES = list(itertools.product([True, False], repeat=5))


@pytest.mark.parametrize("norm", ["per-image", "batch"])
@pytest.mark.parametrize("cpfe,ca,sa,low,dropout", SWITCHES)
def test_every_ablation_builds_and_trains(cpfe, ca, sa, low, dropout, norm):
    torch.manual_seed(0)
    cfg = PFANetConfig(with_cpfe=cpfe, with_ca=ca, with_sa=sa, with_low_level=low, dropout=dropout, norm=norm)
    model = PFANet(cfg).train()
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 1, 64, 64)
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name
    # the switches really remove the parts (not just bypass them)
    names = {n.split(".")[0] for n, _ in model.named_parameters()}
    assert ("cpfe3" in names) == cpfe
    assert ("channel_attention" in names) == ca
    assert ("spatial_attention" in names) == (sa and low)
    assert ("c12_conv" in names) == low
    assert (model.channel_attention_weights() is not None) == ca


def two_images() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    # Very different images, so that shared statistics would change the result visibly.
    return torch.randn(1, 3, 64, 64, generator=g) * 50, torch.randn(1, 3, 64, 64, generator=g) * 5 + 20


@pytest.mark.parametrize("train", [False, True])
def test_per_image_norm_does_not_depend_on_the_batch(train):
    torch.manual_seed(0)
    model = PFANet(PFANetConfig(dropout=False, norm="per-image")).train(train)
    a, b = two_images()
    with torch.no_grad():
        together = model(torch.cat([a, b]))
        alone = torch.cat([model(a), model(b)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)


def test_batch_norm_in_training_mixes_the_batch():
    torch.manual_seed(0)
    model = PFANet(PFANetConfig(dropout=False, norm="batch")).train()
    a, b = two_images()
    with torch.no_grad():
        together = model(torch.cat([a, b]))
        alone = torch.cat([model(a), model(b)])
    assert (together - alone).abs().max() > 1e-2


def test_per_image_norm_is_keras_bn_with_the_image_statistics():
    """Each (image, channel) normalised by its own mean and biased variance, eps 1e-3, then gamma, beta, ReLU."""
    model = PFANet(PFANetConfig(norm="per-image"))
    bn = model.c345_bn
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, (2, 64, 4, 4)).astype(np.float32)
    gamma, beta = rng.uniform(0.5, 1.5, 64).astype(np.float32), rng.normal(0, 1, 64).astype(np.float32)
    with torch.no_grad():
        bn.weight.copy_(torch.from_numpy(gamma))
        bn.bias.copy_(torch.from_numpy(beta))
        bn.running_mean.fill_(100.0)  # must be ignored in this mode
        got = bn.eval()(torch.from_numpy(x)).numpy()
    mean = x.mean(axis=(2, 3), keepdims=True)
    var = ((x - mean) ** 2).mean(axis=(2, 3), keepdims=True)
    want = np.maximum((x - mean) / np.sqrt(var + 1e-3) * gamma[:, None, None] + beta[:, None, None], 0)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_batch_norm_eval_uses_running_statistics_with_keras_eps():
    bn = PFANet(PFANetConfig(norm="batch")).c1_bn.eval()
    with torch.no_grad():
        bn.running_mean.fill_(1.0)
        bn.running_var.fill_(4.0)
        x = torch.full((1, 64, 2, 2), 3.0)
        assert torch.allclose(bn(x), torch.full_like(x, 2.0 / math.sqrt(4.0 + 1e-3)))
        bn.train()(torch.zeros(2, 64, 2, 2))
    # Keras momentum 0.99: moving = 0.99 * moving + 0.01 * batch
    assert torch.allclose(bn.running_mean, torch.full((64,), 0.99))


def test_dropout_only_in_training_mode():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64) * 50
    model = PFANet(PFANetConfig(dropout=True))
    with torch.no_grad():
        model.train()
        assert not torch.equal(model(x), model(x))
        model.eval()
        assert torch.equal(model(x), model(x))
        model_off = PFANet(PFANetConfig(dropout=False)).train()
        assert torch.equal(model_off(x), model_off(x))


def test_spatial_attention_lies_in_half_open_half_to_one():
    torch.manual_seed(0)
    model = PFANet(PFANetConfig(dropout=False)).eval()
    seen = []
    model.spatial_attention.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64) * 50)
    (sa,) = seen
    assert sa.shape == (2, 1, 64, 64)  # one map, broadcast over the 64 low-level channels
    assert sa.min() >= 0.5 and sa.max() < 1.0
    assert sa.max() > 0.6  # not a degenerate constant


def test_upsampling_is_bilinear_with_aligned_corners():
    x = torch.tensor([[[[0.0, 3.0], [6.0, 9.0]]]])
    # align_corners=True: output pixel i samples input coordinate i * (2 - 1) / (4 - 1) = i / 3
    want = torch.tensor([[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7], [6, 7, 8, 9]], dtype=torch.float32)
    torch.testing.assert_close(upsample(x, 2)[0, 0], want)


def test_per_image_training_leaves_the_running_statistics_alone():
    bn = PFANet(PFANetConfig(norm="per-image")).c12_bn.train()
    bn(torch.randn(2, 64, 4, 4) * 3 + 5)
    assert torch.equal(bn.running_mean, torch.zeros(64)) and torch.equal(bn.running_var, torch.ones(64))
