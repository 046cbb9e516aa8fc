"""The VQ-VAE image tokenizer and BEiT-style masked image modelling: the shipped recipes trained for a few steps
on synthetic shapes (a tiny tokenizer shared by the module), the BEiT mask token, the masked loss, the checks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import ROOT
from vlkit.errors import VlkitError

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPES = ROOT / "vlkit" / "configs"
QUIET = ["progress=false", "tensorboard=false", "log_every=1000"]


def _trainer(recipe: str, overrides: list[str]):
    from vlkit.config.load import load_config
    from vlkit.train.trainer import Trainer

    return Trainer(load_config(RECIPES / recipe, [*overrides, *QUIET]))


@pytest.fixture(scope="module")
def tokenizer_run(synth, tmp_path_factory):
    """vqvae_synth with the tiny tokenizer (32 px, 4x4 tokens of 64 codes), 60 steps; its run folder and the
    validation metrics before and after training."""
    run = tmp_path_factory.mktemp("vqvae") / "run"
    trainer = _trainer("vqvae_synth.yaml", [f"datasets.synth.path={synth}", f"output_dir={run}",
                                            "model.name=vqvae-tiny", "max_steps=60", "batch_size=16",
                                            "optim.warmup_steps=5"])
    before = trainer.evaluate()
    after = trainer.run()
    return run, before, after


def test_vqvae_recipe_reconstruction_improves_and_codes_are_used(tokenizer_run):
    run, before, after = tokenizer_run
    assert after["val/synth/mse"] < 0.6 * before["val/synth/mse"], (before, after)
    assert after["val/synth/psnr"] > before["val/synth/psnr"] + 2
    # more than a handful of the 64 codes carry the images, and the histogram is far from one code
    assert after["val/synth/code_usage"] >= 0.25 and after["val/synth/perplexity"] > 8
    assert (run / "model" / "model.safetensors").exists() and not (run / "model" / "tokenizer.json").exists()


def test_vqvae_metrics_match_a_direct_pass(tokenizer_run, synth):
    """val mse / psnr / usage recomputed here from the saved tokenizer on the validation images."""
    from vlkit.data.dataset import LanceImageTextDataset
    from vlkit.models.vqvae import load_vqvae

    run, _, after = tokenizer_run
    model = load_vqvae(run)
    ds = LanceImageTextDataset(synth, "val", model.preprocess.image_transform(), None, captions="none")
    images = torch.cat([ds[i]["image"].reshape(-1, 3, 32, 32) for i in range(len(ds))])
    ids = model.encode(images)
    assert ids.shape == (len(ds), 4, 4) and ids.dtype == torch.long
    recon = model.decode(ids)
    with torch.no_grad():
        assert torch.allclose(recon, model(images).reconstruction, atol=1e-5)
    assert math.isclose(float(((recon - images) ** 2).mean()), after["val/synth/mse"], rel_tol=1e-3)
    mean, std = torch.tensor(model.preprocess.mean).view(1, 3, 1, 1), torch.tensor(model.preprocess.std).view(1, 3, 1, 1)
    mse_pixels = float((((recon * std + mean).clamp(0, 1) - (images * std + mean)) ** 2).mean())
    assert math.isclose(after["val/synth/psnr"], -10 * math.log10(mse_pixels), rel_tol=1e-3)
    assert math.isclose(after["val/synth/code_usage"], len(set(ids.flatten().tolist())) / 64)


def test_beit_masked_token_accuracy_beats_majority(tokenizer_run, synth, tmp_path):
    run, _, _ = tokenizer_run
    out = tmp_path / "beit"
    trainer = _trainer("beit_synth.yaml", [f"datasets.synth.path={synth}", f"output_dir={out}",
                                           "model.name=beit-tiny", f"tasks.0.tokenizer_run={run}", "max_steps=120",
                                           "batch_size=16", "optim.warmup_steps=10", "optim.lr_image=2e-3",
                                           "optim.lr_head=2e-3"])
    assert trainer.tasks[0].__dict__["vq"].num_codes == 64 == trainer.model.config.vocab_size
    assert not any(name.startswith("vq") for name, _ in trainer.tasks[0].named_parameters())  # frozen, apart
    metrics = trainer.run()
    acc, majority = metrics["val/synth/masked_accuracy"], metrics["val/synth/majority_accuracy"]
    assert acc > majority + 5, metrics
    from vlkit.models.beit.model import BEiT
    from vlkit.models.io import load_model

    saved = load_model(out / "model")  # the architecture is known to the loaders of eval and inference
    assert isinstance(saved, BEiT) and saved.config.vocab_size == 64
    # model.pretrained_image: a ViT image tower starts from the BEiT encoder
    import torch

    from vlkit.models.mae.transfer import load_pretrained_image
    from vlkit.modules.encoders.vit import VisionTransformer

    target = torch.nn.Module()
    target.visual = VisionTransformer(saved.config.vision)
    assert load_pretrained_image(target, out)
    for key, value in target.visual.state_dict().items():
        assert torch.equal(value, saved.encoder.state_dict()[key]), key


def test_beit_mask_token_hides_the_masked_patches():
    from vlkit.models.beit.builders import beit_tiny

    torch.manual_seed(0)
    model = beit_tiny().eval()
    images = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, [0, 5, 10]] = True  # patches (0,0), (1,1), (2,2) of the 4x4 grid
    changed = images.clone()
    changed[:, :, 8:16, 8:16] += 3.0  # the pixels of patch (1,1), which is masked
    with torch.no_grad():
        base, hidden = model(images, mask), model(changed, mask)
        assert torch.allclose(base, hidden, atol=1e-5), "a masked patch's pixels must not reach the model"
        visible = images.clone()
        visible[:, :, 0:8, 8:16] += 3.0  # patch (0,1): visible
        assert not torch.allclose(base, model(visible, mask), atol=1e-3)
        # with nothing masked the features are the plain ViT's
        assert torch.allclose(model.forward_features(images, torch.zeros_like(mask)),
                              model.encoder.forward_features(images), atol=1e-5)
        # without a mask the same pixels are seen
        assert not torch.allclose(model(images, torch.zeros_like(mask)), model(changed, torch.zeros_like(mask)))


def test_masked_token_loss_matches_slow_loop():
    from vlkit.models.beit.model import masked_token_loss

    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 6, 5, generator=gen)
    targets = torch.randint(0, 5, (3, 6), generator=gen)
    mask = torch.rand(3, 6, generator=gen) < 0.5
    mask[0, 0] = True
    losses, hits = [], []
    for b in range(3):
        for p in range(6):
            if mask[b, p]:
                row = logits[b, p].tolist()
                log_z = math.log(sum(math.exp(v) for v in row))
                losses.append(log_z - row[int(targets[b, p])])
                hits.append(max(range(5), key=row.__getitem__) == int(targets[b, p]))
    loss, acc = masked_token_loss(logits, targets, mask)
    assert math.isclose(float(loss), sum(losses) / len(losses), rel_tol=1e-5)
    assert math.isclose(float(acc), sum(hits) / len(hits), rel_tol=1e-6)


def test_tokenizer_images_converts_normalisation_and_size():
    from vlkit.models.preprocess import Preprocess
    from vlkit.tasks.beit import tokenizer_images

    src = Preprocess(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    dst = Preprocess(image_size=16, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
    pixels = torch.rand(1, 3, 32, 32)
    out = tokenizer_images((pixels - 0.5) / 0.5, src, dst)
    expected = F.interpolate(pixels, size=(16, 16), mode="bilinear", antialias=True, align_corners=False)
    expected = (expected - torch.tensor(dst.mean).view(1, 3, 1, 1)) / torch.tensor(dst.std).view(1, 3, 1, 1)
    assert out.shape == (1, 3, 16, 16) and torch.allclose(out, expected, atol=1e-5)


def test_config_checks_of_tokenizer_run(synth, tokenizer_run, tmp_path):
    from vlkit.config.load import load_config

    with pytest.raises(VlkitError, match=r"tasks\.0\.tokenizer_run: task beit needs"):
        load_config(RECIPES / "beit_synth.yaml", ["tasks.0.tokenizer_run=null"])
    with pytest.raises(VlkitError, match=r"tasks\.0\.tokenizer_run: only the beit task reads it"):
        load_config(RECIPES / "vqvae_synth.yaml", ["tasks.0.tokenizer_run=runs/x"])
    run, _, _ = tokenizer_run
    out = tmp_path / "beit_small"
    # beit-small's 8x8 patch grid at 64 px does not fit the tiny tokenizer's 4x4 tokens: refused before any writing
    with pytest.raises(VlkitError, match=r"tasks\.0\.tokenizer_run: .*4x4 tokens but the model's patch grid is 8x8"):
        _trainer("beit_synth.yaml", [f"datasets.synth.path={synth}", f"output_dir={out}", "model.args={vocab_size: 64}",
                                     f"tasks.0.tokenizer_run={run}"])
    assert not out.exists()
    with pytest.raises(VlkitError, match=r"tasks\.0\.name: task vqvae trains a VQ-VAE"):
        _trainer("vqvae_synth.yaml", [f"datasets.synth.path={synth}", f"output_dir={out}", "model.name=beit-tiny"])
    with pytest.raises(VlkitError, match="not a VQ-VAE tokenizer"):
        from vlkit.models.vqvae import load_vqvae
        from vlkit.models.io import save_model
        from vlkit.models.beit.builders import beit_tiny

        save_model(beit_tiny(), tmp_path / "not_vq")
        load_vqvae(tmp_path / "not_vq")


def test_named_sizes_are_registered():
    from vlkit.models.registry import create_model, list_models

    assert {"vqvae-tiny", "vqvae-small", "beit-tiny", "beit-small"} <= set(list_models())
    vq = create_model("vqvae-small")
    assert vq.token_grid() == (8, 8) and create_model("beit-small").num_patches() == 64
    assert Path(RECIPES / "vqvae_synth.yaml").exists()
