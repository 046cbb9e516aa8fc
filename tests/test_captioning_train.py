"""Captioning end to end: the shipped coca_synth recipe trains a tiny CoCa whose captions name the shapes and
colours of held-out images, CIDEr is evaluated during training, the run's model writes the same captions after
saving and loading, and a generative model answers VQA questions."""

from __future__ import annotations

import json

import pytest
import torch

from vlkit.data.synth import COLORS, SHAPES

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def coca_run(synth, tmp_path_factory):
    from vlkit.config.load import load_config
    from vlkit.config.recipes import recipe_path
    from vlkit.train.trainer import Trainer

    run = tmp_path_factory.mktemp("coca") / "run"
    # the shipped recipe with a second task: the same decoder answers the questions (generative VQA), both
    # tasks every step
    cfg = load_config(recipe_path("coca_synth"), [
        f"datasets.synth.path={synth}", f"output_dir={run}", "epochs=20", "progress=false",
        "tasks=[{name: captioning, dataset: synth, loss: coca, eval_images: 32, num_beams: 2}, "
        "{name: vqa, dataset: synth, num_beams: 1}]"])
    metrics = Trainer(cfg).run()
    return run, metrics


def _named(caption: str, class_name: str) -> bool:
    color, shape = class_name.split()
    return color in caption.split() and (shape in caption or f"{shape}s" in caption)


def test_coca_synth_captions_name_shapes_and_colours(coca_run, synth):
    from vlkit.data.dataset import LanceImageTextDataset
    from vlkit.inference.captions import write_captions
    from vlkit.inference.loading import load_for_inference

    run, metrics = coca_run
    assert metrics["val/synth/cider"] > 50  # CIDEr on the validation split, evaluated during training
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    ciders = [h["val/synth/cider"] for h in history if "val/synth/cider" in h]
    assert len(ciders) >= 2 and ciders[-1] > ciders[0]
    key = "train/synth/captioning/caption_loss"  # two tasks on one dataset: logs named by task
    losses = [h[key] for h in history if key in h]
    assert losses[-1] < 0.6 * losses[0]
    loaded = load_for_inference(run)  # saved model + tokenizer
    ds = LanceImageTextDataset(synth, "test", loaded.model.preprocess.image_transform(train=False), None,
                               captions="none")
    batch = ds.__getitems__(list(range(len(ds))))
    images = batch["image"]  # normalised by the dataset
    written = write_captions(loaded.model, loaded.tokenizer, images, num_beams=2, max_new_tokens=12)
    from vlkit.data.store import open_dataset, split_indices

    lance_ds = open_dataset(synth)
    names = lance_ds.take(split_indices(lance_ds, "test"), columns=["class_name"]).column("class_name").to_pylist()
    captions = [w[0][0] for w in written]
    colour = sum(name.split()[0] in c.split() for c, name in zip(captions, names)) / len(names)
    both = sum(_named(c, name) for c, name in zip(captions, names)) / len(names)
    shown = list(zip(captions, names))[:8]
    # chance: 1 / 6 colours, 1 / 18 colour-shape pairs (the largest shape of each held-out image)
    assert colour > 3 / len(COLORS), (colour, both, shown)
    assert both > 3 / (len(COLORS) * len(SHAPES)), (colour, both, shown)


def test_generative_vqa_learns_the_answers(coca_run, synth):
    """The decoder trained on the synthetic questions beside the captions answers by writing, well above the
    majority answer of the validation split."""
    from collections import Counter

    from vlkit.data.store import open_dataset, split_indices
    from vlkit.metrics.vqa import vqa_metrics

    _, metrics = coca_run
    ds = open_dataset(synth)
    answers = [a for per_image in ds.take(split_indices(ds, "val"), columns=["answers"]).column("answers").to_pylist()
               for a in per_image or []]
    majority = Counter(x for a in answers for x in a).most_common(1)[0][0]
    baseline = vqa_metrics([majority] * len(answers), answers).accuracy
    assert metrics["val/synth/vqa_questions"] == len(answers)
    assert metrics["val/synth/vqa_acc"] > baseline + 15, (metrics, majority, baseline)
