"""I2I-Galip networks and losses: generator, backbones, discriminator heads (CPU, tiny)."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from galip.runtime.errors import ConfigError
from galip.train.i2i import backbone as bb
from galip.train.i2i.heads import BatchNormLocal, ConvDiscriminator, DiscHead, ViTDiscriminator
from galip.train.i2i.losses import (LossWeights, clip_loss, cls_loss, lsgan_discriminator,
                                    lsgan_generator, total_generator_loss)
from galip.train.i2i.unet import I2IGalipUNet, UNetConfig, count_parameters


TINY_UNET = dict(base_channels=8, channel_mult=(1, 2, 2), groups=4, head_channels=8,
                 attention_ds=(2, 4), context_dim=16)
TINY_VIT = bb.TinyViTConfig(image_size=32, patch=8, width=16, depth=4, heads=2, taps=(1, 2, 3, 4),
                            embed_dim=24, context_dim=16, context_length=8, text_width=16)


@pytest.fixture(scope="module")
def reference_unet():
    torch.manual_seed(0)
    return I2IGalipUNet().eval()


# ------------------------------------------------------------------ generator
def test_reference_parameter_count_at_context_512(reference_unet):
    assert reference_unet.config.n_classes == 3          # T1/T2/PD rows, as in the reference
    assert count_parameters(reference_unet) == 13_242_881


def test_reference_parameter_count_at_context_768():
    assert count_parameters(I2IGalipUNet(UNetConfig(context_dim=768))) == 14_127_617


@pytest.mark.parametrize("n, h, w", [(1, 32, 32), (2, 64, 64), (3, 96, 64)])
def test_reference_output_shapes(reference_unet, n, h, w):
    x = torch.rand(n, 1, h, w)
    context = torch.randn(n, 7, 512)
    with torch.no_grad():
        y = reference_unet(x, context, torch.arange(n) % 3)
    assert y.shape == (n, 1, h, w)
    assert torch.isfinite(y).all()


def test_output_conv_is_zero_initialised_and_no_activation():
    unet = I2IGalipUNet(UNetConfig(**TINY_UNET))
    conv = unet.out[-1]
    assert conv.weight.abs().sum() == 0 and conv.bias.abs().sum() == 0
    with torch.no_grad():
        conv.bias.fill_(-3.0)                            # unbounded output: no tanh/sigmoid
        y = unet(torch.rand(1, 1, 32, 32), torch.randn(1, 3, 16), torch.tensor([0]))
    assert torch.allclose(y, torch.full_like(y, -3.0))


def test_intensity_curve_starts_at_zero_and_interpolates_its_knots():
    from galip.train.i2i.unet import IntensityCurve
    plain = I2IGalipUNet(UNetConfig(**TINY_UNET)).eval()
    curved = I2IGalipUNet(UNetConfig(**TINY_UNET, curve_knots=5)).eval()
    curved.load_state_dict(plain.state_dict(), strict=False)        # all but the (zero) curve
    x, context, label = torch.rand(2, 1, 32, 32), torch.randn(2, 3, 16), torch.tensor([0, 1])
    with torch.no_grad():
        assert torch.equal(plain(x, context, label), curved(x, context, label))
    curve = IntensityCurve(channels=4, knots=5)
    with torch.no_grad():
        curve.to_values.bias.copy_(torch.tensor([1.0, 0.0, 0.5, 0.5, 1.0]))   # knots at 0, .25, .5, .75, 1
    image = torch.tensor([0.0, 0.125, 0.25, 0.6, 1.0, 1.5]).view(1, 1, 1, 6)
    got = curve(image, torch.randn(1, 4, 2, 2)).flatten()
    assert torch.allclose(got, torch.tensor([1.0, 0.5, 0.0, 0.5, 1.0, 1.0]))    # above 1: clamped
    with pytest.raises(ValueError, match="one input channel"):
        I2IGalipUNet(UNetConfig(**TINY_UNET, curve_knots=5, in_channels=2))


def test_conditioning_changes_the_output():
    torch.manual_seed(1)
    unet = I2IGalipUNet(UNetConfig(**TINY_UNET)).eval()
    for p in unet.parameters():                          # undo the zero inits
        p.data.normal_(0, 0.2)
    x, c = torch.rand(1, 1, 32, 32), torch.randn(1, 3, 16)
    with torch.no_grad():
        base = unet(x, c, torch.tensor([0]))
        other_class = unet(x, c, torch.tensor([1]))
        other_context = unet(x, torch.randn(1, 3, 16), torch.tensor([0]))
    assert not torch.allclose(base, other_class)
    assert not torch.allclose(base, other_context)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_generator_exports_to_onnx_with_dynamic_shapes():
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    unet = I2IGalipUNet(UNetConfig(**TINY_UNET)).eval()
    for p in unet.parameters():
        p.data.normal_(0, 0.1)
    buffer = io.BytesIO()
    args = (torch.rand(2, 1, 32, 32), torch.randn(2, 5, 16), torch.tensor([0, 2]))
    torch.onnx.export(unet, args, buffer, dynamo=False, opset_version=17,
                      input_names=["image", "context", "class_id"], output_names=["translated"],
                      dynamic_axes={"image": {0: "n", 2: "h", 3: "w"}, "context": {0: "n", 1: "l"},
                                    "class_id": {0: "n"}, "translated": {0: "n", 2: "h", 3: "w"}})
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    x, c, k = torch.rand(3, 1, 64, 32), torch.randn(3, 7, 16), torch.tensor([1, 0, 2])
    (got,) = session.run(None, {"image": x.numpy(), "context": c.numpy(), "class_id": k.numpy()})
    with torch.no_grad():
        want = unet(x, c, k).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_config_round_trips_through_a_dict():
    config = UNetConfig(**TINY_UNET)
    assert UNetConfig.from_dict(config.to_dict()) == config


# ------------------------------------------------------------------ backbones
def test_tiny_vit_shapes_and_determinism():
    vit = bb.TinyViTBackbone(TINY_VIT)
    context, embedding = vit.encode_captions(["this MRI is T1-weighted", "this MRI is T2-weighted"])
    assert context.shape == (2, 8, 16) and embedding.shape == (2, 24)
    feats = vit.encode_image(torch.rand(3, 1, 48, 48))
    assert len(feats.patch_tokens) == 4
    assert all(t.shape == (3, 16, 16) for t in feats.patch_tokens)
    assert feats.cls.shape == (3, 16) and feats.embedding.shape == (3, 24)
    again = bb.TinyViTBackbone(TINY_VIT)
    torch.testing.assert_close(again.encode_captions(["this MRI is T1-weighted"])[1], embedding[:1])
    assert not any(p.requires_grad for p in vit.parameters())


def test_tiny_vit_default_matches_biomedclip_token_grid():
    vit = bb.TinyViTBackbone()
    feats = vit.encode_image(torch.rand(1, 1, 64, 64))
    assert [t.shape for t in feats.patch_tokens] == [torch.Size([1, 196, 64])] * 4
    assert feats.embedding.shape == (1, 512)
    assert vit.encode_captions(["x"])[0].shape[-1] == 512


def test_gradients_flow_through_the_frozen_vit():
    vit = bb.TinyViTBackbone(TINY_VIT)
    x = torch.rand(2, 1, 32, 32, requires_grad=True)
    vit.encode_image(x).embedding.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_clip_preprocess_gray_to_normalised_rgb():
    x = torch.full((1, 1, 10, 10), 0.5)
    y = bb.clip_preprocess(x, 20)
    assert y.shape == (1, 3, 20, 20)
    expected = (0.5 - torch.tensor(bb.CLIP_MEAN)) / torch.tensor(bb.CLIP_STD)
    torch.testing.assert_close(y[0, :, 3, 3], expected)


def test_biomedclip_without_open_clip_is_a_one_line_config_error():
    try:
        import open_clip  # noqa: F401
    except Exception:
        with pytest.raises(ConfigError, match="open_clip") as info:
            bb.make_backbone("biomedclip")
        assert "\n" not in str(info.value) and "torchvision" in str(info.value)
    else:
        pytest.skip("open_clip imports here; the missing-dependency path cannot be exercised")


def test_biomedclip_matches_the_interface():
    pytest.importorskip("open_clip", reason="open_clip needs torchvision (CUDA torch); not importable here")
    try:
        model = bb.BiomedCLIPBackbone()
    except ConfigError as error:
        pytest.skip(f"BiomedCLIP weights not cached: {error}")
    context, embedding = model.encode_captions(["this MRI is T1-weighted"])
    assert context.shape == (1, 256, 512) and embedding.shape == (1, 512)
    feats = model.encode_image(torch.rand(1, 1, 64, 64))
    assert [tuple(t.shape) for t in feats.patch_tokens] == [(1, 196, 768)] * 4
    assert feats.cls.shape == (1, 768) and feats.embedding.shape == (1, 512)


# ------------------------------------------------------------------ heads
def test_batch_norm_local_normalises_groups_of_samples():
    torch.manual_seed(0)
    bn = BatchNormLocal(3, virtual_bs=2)
    x = 5 + 3 * torch.randn(4, 3, 10)
    y = bn(x).reshape(2, 2, 3, 10)
    torch.testing.assert_close(y.mean(dim=(1, 3)), torch.zeros(2, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(dim=(1, 3), unbiased=False), torch.ones(2, 3), atol=1e-3, rtol=0)
    assert bn(torch.randn(3, 3, 10)).shape == (3, 3, 10)   # uneven batch still vectorised


def test_disc_head_reference_size_and_shapes():
    head = DiscHead(768, 512)
    # 4 heads per domain ≈ 23.9M parameters (paper Tab. 1)
    assert abs(4 * count_parameters(head) - 23.9e6) < 0.05e6
    out = DiscHead(16, 24)(torch.randn(3, 16, 16), torch.randn(3, 24))
    assert out.shape == (3, 16)


def test_disc_head_projection_depends_on_the_caption():
    torch.manual_seed(0)
    head = DiscHead(16, 24)
    tokens = torch.randn(2, 16, 16)
    assert not torch.allclose(head(tokens, torch.randn(2, 24)), head(tokens, torch.randn(2, 24)))


def test_vit_discriminator_uses_one_head_set_per_target_domain():
    torch.manual_seed(0)
    disc = ViTDiscriminator(3, 4, 16, 24)
    tokens = [torch.randn(2, 16, 16) for _ in range(4)]
    emb = torch.randn(2, 24)
    out0, out2 = disc(tokens, 0, emb), disc(tokens, 2, emb)
    assert out0.shape == (2, 64)
    assert not torch.allclose(out0, out2)


def test_conv_discriminator_shapes():
    disc = ConvDiscriminator(2, channels=8)
    assert disc(torch.rand(3, 1, 32, 64), 1).shape == (3, 4 * 8)


# ------------------------------------------------------------------ losses
def test_lsgan_targets():
    ones, zeros = torch.ones(2, 5), torch.zeros(2, 5)
    assert lsgan_generator(ones) == 0 and lsgan_generator(zeros) == 1
    assert lsgan_discriminator(ones, zeros) == 0 and lsgan_discriminator(zeros, ones) == 2


def test_cosine_losses():
    text = torch.tensor([[1.0, 0.0]])
    assert math.isclose(float(clip_loss(torch.tensor([[2.0, 0.0], [0.0, 3.0]]), text)), -0.5)
    a = torch.tensor([[1.0, 1.0]])
    assert math.isclose(float(cls_loss(a, -a)), 1.0, abs_tol=1e-6)


def test_total_loss_applies_the_paper_weights():
    terms = {k: torch.tensor(1.0) for k in ("cycle", "adv", "clip", "cls", "identity")}
    assert float(total_generator_loss(terms, LossWeights())) == 14.0
