"""Fast inference: precision choice, batch-norm folding, channels-last, decoding ahead, and what bf16 costs."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from torch import nn

from vlkit.errors import VlkitError
from vlkit.inference import speed
from vlkit.inference.speed import (InferenceCopy, fold_batch_norms, prefetch, prepared, resolve_precision,
                                   to_channels_last)

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------ precision
def test_precision_auto_follows_the_hardware(monkeypatch):
    monkeypatch.setattr(speed, "native_bf16", lambda device="cpu": True)
    assert resolve_precision("auto") == "bf16"
    monkeypatch.setattr(speed, "native_bf16", lambda device="cpu": False)
    assert resolve_precision("auto") == "fp32"
    assert resolve_precision("bf16") == "bf16" and resolve_precision("fp32") == "fp32"
    with pytest.raises(VlkitError, match="precision must be one of"):
        resolve_precision("fp16")


# ------------------------------------------------------------------------------------------------ folding
class ConvNet(nn.Module):
    """conv-BN-ReLU6 twice, a depthwise conv with a bias, and a BN that follows a ReLU (not foldable)."""

    def __init__(self, residual_reads_conv: bool = False):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=True), nn.BatchNorm2d(8)
        self.b3 = nn.BatchNorm2d(8)
        self.residual_reads_conv = residual_reads_conv

    def forward(self, x):
        h = torch.nn.functional.relu6(self.b1(self.c1(x)))
        y = self.c2(h)
        h = self.b2(y) + (y if self.residual_reads_conv else h)  # the conv's output read twice: folding is wrong
        return self.b3(torch.relu(h)).mean(dim=(2, 3))


def _randomised(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # statistics far from the identity, so an unfolded BN would show
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 3 + 0.2)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))
    return model.eval()


def test_folding_matches_the_unfolded_model_and_is_undone():
    model = _randomised(ConvNet())
    x = torch.randn(4, 3, 16, 16)
    params = {name: p for name, p in model.named_parameters()}
    with torch.no_grad():
        want = model(x)
        changes = InferenceCopy()
        folded = fold_batch_norms(model, lambda: model(x[:2]), changes)
        assert folded == 2  # b1 after c1, b2 after c2; b3 follows a ReLU
        assert isinstance(model.b1, nn.Identity) and isinstance(model.b2, nn.Identity)
        assert isinstance(model.b3, nn.BatchNorm2d)
        torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)
        changes.restore()
        assert isinstance(model.b1, nn.BatchNorm2d) and model.c1.bias is None
        assert all(p is params[name] for name, p in model.named_parameters())  # the very same objects
        assert torch.equal(model(x), want)


def test_folding_that_would_move_the_output_is_undone():
    model = _randomised(ConvNet(residual_reads_conv=True))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = model(x)
        changes = InferenceCopy()
        # c1 -> b1 folds exactly, but c2's output also feeds the residual: the check sees the change, undoes all
        assert fold_batch_norms(model, lambda: model(x), changes) == 0
        assert isinstance(model.b1, nn.BatchNorm2d) and isinstance(model.b2, nn.BatchNorm2d)
        assert torch.equal(model(x), want)


def test_prepared_channels_last_and_training_models_left_alone():
    model = _randomised(ConvNet())
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        want = model(x)
        with prepared(model, channels_last=True, example=lambda: model(x[:2])) as nhwc:
            assert nhwc and model.c1.weight.is_contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(model(to_channels_last(x)), want, atol=1e-5, rtol=1e-5)
        assert model.c1.weight.is_contiguous() and isinstance(model.b1, nn.BatchNorm2d)
        model.train()
        with prepared(model, channels_last=True, example=lambda: model(x[:2])) as nhwc:
            assert not nhwc and isinstance(model.b1, nn.BatchNorm2d)  # a model in training is not touched


# ------------------------------------------------------------------------------------------------ prefetch
def test_prefetch_keeps_order_and_raises_at_the_failing_item():
    assert list(prefetch(iter(range(50)), 3)) == list(range(50))
    assert list(prefetch(iter(range(5)), 0)) == list(range(5))

    def items():
        yield 1
        yield 2
        raise ValueError("bad row 3")

    got = []
    with pytest.raises(ValueError, match="bad row 3"):
        for item in prefetch(items(), 2):
            got.append(item)
    assert got == [1, 2]


def test_prefetch_runs_ahead_in_another_thread_and_stops_when_left():
    threads, made = [], []

    def items():
        for i in range(1000):
            threads.append(threading.current_thread().name)
            made.append(i)
            yield i

    for item in prefetch(items(), 2):
        time.sleep(0.05)  # the consumer is slow: the producer has the next items ready
        if item == 3:
            break
    time.sleep(0.3)
    assert set(threads) == {"vlkit-prefetch"}
    assert 4 <= len(made) <= 8  # it stopped soon after the consumer left, at most depth + 1 ahead


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def loaded(trained_run):
    from vlkit.inference.loading import load_for_inference

    return load_for_inference(trained_run[0])


def test_bf16_embeddings_keep_retrieval_within_tolerance(loaded, synth):
    """bf16 autocast against fp32 on the trained model over all 300 images: embeddings nearly parallel; recall@K
    within 4 points and rsum within 3% (the synthetic shapes hold many near-identical images, whose near ties
    bf16 rounding can flip; the benchmark measures real photos)."""
    from vlkit.inference.embed import compute_embeddings
    from vlkit.metrics.retrieval import retrieval_metrics

    fp32 = compute_embeddings(loaded, synth, None, precision="fp32", channels_last=False, prefetch_batches=0,
                              fold_batch_norms=False)
    bf16 = compute_embeddings(loaded, synth, None, precision="bf16")
    assert fp32.precision == "fp32" and bf16.precision == "bf16"
    assert fp32.ids == bf16.ids and fp32.captions == bf16.captions
    assert not torch.equal(fp32.image, bf16.image)  # bf16 did run
    cos_i = torch.nn.functional.cosine_similarity(fp32.image, bf16.image, dim=-1)
    cos_t = torch.nn.functional.cosine_similarity(fp32.text, bf16.text, dim=-1)
    assert cos_i.min() > 0.995 and cos_t.min() > 0.995
    a = retrieval_metrics(fp32.image, fp32.text, fp32.caption_image)
    b = retrieval_metrics(bf16.image, bf16.text, bf16.caption_image)
    for name in ("t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10"):
        assert abs(getattr(a, name) - getattr(b, name)) <= 4.0, name
    assert abs(a.rsum - b.rsum) <= 0.03 * a.rsum
    # the fast fp32 path (channels-last, folding, decoding ahead) gives the plain path's embeddings
    fast32 = compute_embeddings(loaded, synth, None, precision="fp32")
    torch.testing.assert_close(fast32.image, fp32.image, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fast32.text, fp32.text, atol=1e-5, rtol=1e-4)


def test_thumbnails_come_from_the_same_decode(loaded, synth):
    """Thumbnails made beside the embeddings equal the ones made from the stored image on their own."""
    import io

    import lance
    from PIL import Image

    from vlkit.data.store import split_indices
    from vlkit.inference.embed import compute_embeddings
    from vlkit.search.index import thumbnail

    emb = compute_embeddings(loaded, synth, "val", captions=False, limit=5, thumbnails=48, precision="fp32")
    ds = lance.dataset(str(synth))
    offsets = split_indices(ds, "val")[:5]
    assert ds.take(offsets, columns=["id"]).column("id").to_pylist() == emb.ids
    for (_, data), thumb in zip(ds.read_blobs("image", indices=offsets, preserve_order=True), emb.thumbnails):
        alone = thumbnail(data, 48)
        a, b = Image.open(io.BytesIO(thumb)), Image.open(io.BytesIO(alone))
        assert a.format == "JPEG" and a.size == b.size and max(a.size) <= 48
        diff = torch.tensor(list(a.convert("L").get_flattened_data()), dtype=torch.float) - \
            torch.tensor(list(b.convert("L").get_flattened_data()), dtype=torch.float)
        assert diff.abs().mean() < 4.0  # the same picture (JPEG re-encoding aside)


def test_a_cnn_model_folds_and_keeps_its_embeddings(tmp_path, synth):
    """EfficientNet-Lite0 (49 batch norms after convolutions): the fast fp32 path equals the plain one."""
    from vlkit.inference.embed import compute_embeddings
    from vlkit.inference.loading import LoadedModel
    from vlkit.models.io import load_tokenizer
    from vlkit.models.registry import create_model

    torch.manual_seed(0)
    model = create_model("brivl-lite0-minilm").eval()
    loaded = LoadedModel(model, load_tokenizer("", model), tmp_path, "test")
    kw = dict(captions=False, limit=6, batch_size=3)
    plain = compute_embeddings(loaded, synth, "val", precision="fp32", channels_last=False, prefetch_batches=0,
                               fold_batch_norms=False, **kw)
    folded: list[int] = []
    original = speed.fold_batch_norms

    def counting(*args, **kwargs):
        folded.append(original(*args, **kwargs))
        return folded[-1]

    speed.fold_batch_norms = counting
    try:
        fast = compute_embeddings(loaded, synth, "val", precision="fp32", **kw)
    finally:
        speed.fold_batch_norms = original
    assert folded == [49]
    torch.testing.assert_close(fast.image, plain.image, atol=1e-4, rtol=1e-3)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 49  # restored


# ------------------------------------------------------------------------------------------------ one open
@pytest.mark.parametrize("task", ["retrieval", "zeroshot", "linear-probe"])
def test_eval_opens_the_dataset_once(trained_run, synth, monkeypatch, task):
    """Every check before the evaluation, and the evaluation itself, read one handle of the dataset."""
    import lance

    from vlkit.eval.evaluate import evaluate

    opened: list[str] = []
    real = lance.dataset

    def counting(uri, *args, **kwargs):
        opened.append(str(uri))
        return real(uri, *args, **kwargs)

    monkeypatch.setattr(lance, "dataset", counting)
    result = evaluate(trained_run[0], task, synth, "test", limit=12, precision="fp32")
    assert result.metrics and result.dataset == synth
    assert opened == [str(synth)]
