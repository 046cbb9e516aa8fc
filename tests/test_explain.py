"""Explanations: Grad-CAM heat maps against a hand computation and the synthetic shapes' masks, word weights,
the ``vlkit explain`` command."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

SEED, SIZE = 77, 64  # scenes the model never trained on (the ``synth`` fixture uses seed 4)


def scene(index: int):
    """Image ``index`` of the synthetic generator (seed ``SEED``) and its objects, recomputed as the generator
    placed them (the same random draws as ``_make_example``)."""
    from vlkit.data import synth

    image, record = synth._make_example(SEED, index, SIZE)
    rng = random.Random(f"vlkit-synth:{SEED}:{index}")
    rng.choice(sorted(synth._BACKGROUNDS))
    return image, record, synth._place_objects(rng, SIZE)


def object_mask(obj) -> np.ndarray:
    from vlkit.data import synth

    mask = np.zeros((SIZE, SIZE), bool)
    mask[obj.y0:obj.y0 + obj.size, obj.x0:obj.x0 + obj.size] = synth._shape_mask(obj.shape, obj.size)
    return mask


def png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def loaded(explain_run):
    from vlkit.inference.loading import load_for_inference

    return load_for_inference(explain_run)


def red_circle_scenes(n: int):
    """The first ``n`` scenes with a red circle among two or three shapes."""
    found, index = [], 0
    while len(found) < n:
        image, record, objects = scene(index)
        red = [o for o in objects if o.name == "red circle"]
        if red and len(objects) > 1:
            found.append((index, image, object_mask(red[0])))
        index += 1
    return found


def test_heat_map_lies_on_the_red_circle(loaded):
    """For "a red circle", most of the heat map's mass lies inside the red circle's mask, far above the share
    of the image the circle covers (measured: about 0.73 of the mass on about 0.07 of the image)."""
    from vlkit.explain.gradcam import explain, mass_inside

    model, transform = loaded.model, loaded.model.preprocess.image_transform(train=False)
    inside, covered = [], []
    for _, image, mask in red_circle_scenes(24):
        result = explain(model, loaded.tokenizer, transform.normalize(transform(png(image))[None]), "a red circle")
        assert result.method == "token-gradcam" and result.heat.shape == (32, 32)
        assert 0.0 <= float(result.heat.min()) and float(result.heat.max()) == pytest.approx(1.0)
        heat = F.interpolate(result.heat[None, None], size=(SIZE, SIZE), mode="bilinear")[0, 0]
        inside.append(mass_inside(heat, torch.from_numpy(mask)))
        covered.append(mask.mean())
    share, area = float(np.mean(inside)), float(np.mean(covered))
    print(f"heat mass inside the red circle {share:.3f}, circle area {area:.3f}, ratio {share / area:.1f}")
    assert share > 0.5
    assert share > 5 * area


def test_token_gradcam_matches_a_hand_computation(loaded):
    """The ViT map is gradient x activation of the patch tokens entering the last block, computed here by
    running the tower's blocks one by one (no hooks)."""
    from vlkit.explain.gradcam import explain

    model, tok = loaded.model, loaded.tokenizer
    transform = model.preprocess.image_transform(train=False)
    _, image, _ = red_circle_scenes(1)[0]
    pixels = transform.normalize(transform(png(image))[None])
    result = explain(model, tok, pixels, "a red circle")

    visual = model.visual
    x = visual._embed(pixels)
    for block in visual.blocks[:-1]:
        x = block(x)
    x = x.detach().requires_grad_(True)  # [1, 1 + 64, width]
    pooled = visual.ln_post(visual.blocks[-1](x)[:, 0])
    image_emb = model.visual_projection(pooled)
    tokens = tok(["a red circle"])
    text_emb = model.encode_text(tokens["input_ids"], tokens["attention_mask"])
    F.cosine_similarity(image_emb, text_emb).sum().backward()
    cam = (x.grad[0, 1:] * x[0, 1:].detach()).sum(-1).clamp(min=0).reshape(8, 8)
    expected = F.interpolate(cam[None, None], size=(32, 32), mode="bilinear", align_corners=False)[0, 0]
    expected = expected / expected.max()
    # the model's last block computes the class token only (a different attention kernel): float32 rounding
    # through the gradient moves the normalised map by up to about 1e-2
    torch.testing.assert_close(result.heat, expected, atol=2e-2, rtol=0)
    assert float(torch.corrcoef(torch.stack([result.heat.flatten(), expected.flatten()]))[0, 1]) > 0.999
    assert result.score == pytest.approx(float(F.cosine_similarity(image_emb, text_emb).detach()), abs=1e-5)


def test_cnn_gradcam_weights_channels_by_their_mean_gradient():
    """Classic Grad-CAM against a slow loop over channels and positions."""
    from vlkit.explain.gradcam import cam_from_map

    g = torch.Generator().manual_seed(0)
    act, grad = torch.randn(5, 3, 4, generator=g), torch.randn(5, 3, 4, generator=g)
    slow = torch.zeros(3, 4)
    for c in range(5):
        weight = sum(float(grad[c, i, j]) for i in range(3) for j in range(4)) / 12
        for i in range(3):
            for j in range(4):
                slow[i, j] += weight * float(act[c, i, j])
    torch.testing.assert_close(cam_from_map(act, grad, per_position=False), slow.clamp(min=0))


def test_word_weights_are_gradient_times_input(loaded):
    """Each word's weight is the gradient of the similarity with respect to its embedding, dotted with it:
    checked against a finite difference that scales one token's embedding."""
    from vlkit.explain.gradcam import explain
    from vlkit.explain.words import token_embedding

    model, tok = loaded.model, loaded.tokenizer
    transform = model.preprocess.image_transform(train=False)
    _, image, _ = red_circle_scenes(1)[0]
    pixels = transform.normalize(transform(png(image))[None])
    result = explain(model, tok, pixels, "a red circle")
    assert [w.token.replace("</w>", "") for w in result.words] == ["a", "red", "circle"]

    ids = tok(["a red circle"])
    position = [i for i, t in enumerate(ids["input_ids"][0].tolist()) if "red" in tok.decode([t])][0]
    emb = token_embedding(model)
    eps = 2e-2  # large enough to rise above float32 rounding of the similarity

    def similarity(scale: float) -> float:
        def hook(module, args, output):
            output = output.clone()
            output[:, position] *= scale
            return output

        handle = emb.register_forward_hook(hook)
        try:
            with torch.no_grad():
                return float(F.cosine_similarity(model.encode_image(pixels),
                                                 model.encode_text(ids["input_ids"], ids["attention_mask"])))
        finally:
            handle.remove()

    # d/ds sim(e * s) at s = 1 is grad . e
    numeric = (similarity(1 + eps) - similarity(1 - eps)) / (2 * eps)
    assert result.words[1].weight == pytest.approx(numeric, rel=1e-2, abs=1e-6)


def test_explain_command_writes_the_heat_map_and_the_words(explain_run, tmp_path):
    from PIL import Image

    _, image, _ = red_circle_scenes(1)[0]
    source = tmp_path / "scene.png"
    image.save(source)
    out = tmp_path / "figs" / "heat.png"
    result = run_cli("explain", explain_run, source, "a red circle", "--out", out, "--size", "96", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [w["token"].replace("</w>", "") for w in report["words"]] == ["a", "red", "circle"]
    assert report["method"] == "token-gradcam" and -1 <= report["score"] <= 1
    with Image.open(out) as written:
        assert written.size == (96, 96) and "vlkit-figure" in written.text
    # a second run replaces its own figure
    assert run_cli("explain", explain_run, source, "a red circle", "--out", out).returncode == 0

    # a file vlkit did not write is never overwritten; a bad image is named; both before the model loads
    theirs = tmp_path / "theirs.png"
    image.save(theirs)
    before = theirs.read_bytes()
    refused = run_cli("explain", explain_run, source, "a red circle", "--out", theirs)
    assert refused.returncode == 2 and "not a figure vlkit wrote" in refused.stderr
    assert theirs.read_bytes() == before
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    failed = run_cli("explain", explain_run, bad, "a red circle", "--out", tmp_path / "x.png")
    assert failed.returncode == 2 and str(bad) in failed.stderr and len(failed.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


def test_eval_report_shows_heat_maps_of_the_top_five(explain_run, synth, tmp_path):
    """The retrieval report draws the first query's top-5 images and, beneath, their heat maps."""
    import re

    import numpy as np
    from PIL import Image

    report = tmp_path / "report"
    result = run_cli("eval", explain_run, "--data", synth, "--report", report, "--precision", "fp32")
    assert result.returncode == 0, result.stderr[-2000:]
    page = (report / "index.html").read_text()
    assert "explanations.png" in re.findall(r'<img src="([^"]+\.png)"', page)
    with Image.open(report / "explanations.png") as figure:
        pixels = np.asarray(figure.convert("RGB"), dtype=int)
    assert pixels.shape == (2 * 216, 5 * 200, 3)
    images, heats = pixels[:200], pixels[216:416]
    changed = [np.abs(images[:, 200 * i:200 * (i + 1)] - heats[:, 200 * i:200 * (i + 1)]).mean() for i in range(5)]
    assert sum(c > 1 for c in changed) >= 4  # the heat is drawn over (almost) every image


def test_cnn_tower_gradcam_matches_a_hand_computation_on_brivl():
    """BriVL runs its frozen EfficientNet without autograd; the explanation still reaches its last feature map
    (found by hooks) and equals Grad-CAM computed here from ``backbone.forward_features``, and the frozen text
    encoder's token embeddings still get their gradient x input."""
    import vlkit
    from vlkit.explain.gradcam import cam_from_map, explain
    from vlkit.models.io import load_tokenizer

    torch.manual_seed(0)
    model = vlkit.create_model("brivl-tiny").eval()
    tok = load_tokenizer("/nonexistent", model)
    pixels = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    result = explain(model, tok, pixels, "a red circle")
    assert result.method == "gradcam" and result.heat.shape == (96, 96)
    assert [w.token for w in result.words] == ["a", "red", "circle"] and any(w.weight != 0 for w in result.words)

    fmap = model.backbone.forward_features(pixels).detach().requires_grad_(True)  # [1, 1280, 3, 3]
    image = F.normalize(model.image_head(model.mspp(fmap)), dim=-1)
    ids = tok(["a red circle"])
    with torch.no_grad():
        text = model.encode_text(ids["input_ids"], ids["attention_mask"])
    grad, = torch.autograd.grad(F.cosine_similarity(image, text).sum(), fmap)
    cam = cam_from_map(fmap[0].detach(), grad[0], per_position=False)
    expected = F.interpolate(cam[None, None], size=(96, 96), mode="bilinear", align_corners=False)[0, 0]
    expected = expected / expected.max() if expected.max() > 0 else expected
    torch.testing.assert_close(result.heat, expected, atol=1e-4, rtol=1e-4)
    assert model.config.trainable_backbone_blocks == 0  # lifted only during the call
