"""NLVR2: rows of two images (reader, storage, loader, contact sheet), the synthetic pairs, the nlvr2 task and
``vlkit eval --task nlvr2``."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

SIDE_COLORS = {0: (230, 20, 20), 1: (20, 20, 230)}  # left red, right blue


def _png(path: Path, color, size=(24, 16)) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, "PNG")
    return path.read_bytes()


def _official(root: Path) -> tuple[Path, dict[str, tuple[bytes, bytes]]]:
    """An NLVR2 file as released (dev.json, JSON lines) with its images in dev/ and train/<directory>/."""
    lines, pairs = [], {}
    for k in range(3):
        stem = f"dev-{850 + k}-0"
        pairs[stem] = (_png(root / "dev" / f"{stem}-img0.png", (40 * k, 200, 10), (20 + k, 16)),
                       _png(root / "dev" / f"{stem}-img1.png", (10, 40 * k, 200), (16, 20 + k)))
        for s, label in enumerate(("True", "False")):
            lines.append({"identifier": f"{stem}-{s}", "sentence": f"The left image has {k + s} dogs.",
                          "label": label, "writer": f"w{k}", "left_url": f"http://x/{k}.jpg", "synset": "dog"})
    stem = "train-7-1"
    pairs[stem] = (_png(root / "train" / "12" / f"{stem}-img0.png", (1, 2, 3)),
                   _png(root / "train" / "12" / f"{stem}-img1.png", (4, 5, 6)))
    lines.append({"identifier": f"{stem}-3", "sentence": "Both images show a bird.", "label": "True",
                  "writer": "w9", "directory": 12, "left_url": "http://x/t.jpg", "synset": "bird"})
    path = root / "dev.json"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path, pairs


def test_reader_ingests_official_file_exactly(tmp_path):
    from vlkit.data.ingest import ingest
    from vlkit.data.readers import detect_format
    from vlkit.data.store import dataset_info, open_dataset

    source, pairs = _official(tmp_path)
    assert detect_format(source) == "nlvr2"
    report = ingest([source], tmp_path / "n.lance", progress=False)
    assert report.rows_added == 7 and not report.problems
    ds = open_dataset(tmp_path / "n.lance")
    rows = ds.to_table(columns=["id", "captions", "label", "class_name", "split", "writer", "width2",
                                "height2"]).to_pylist()
    by_id = {r["id"]: r for r in rows}
    assert sorted(by_id) == sorted([f"dev-{850 + k}-0-{s}" for k in range(3) for s in range(2)] + ["train-7-1-3"])
    assert by_id["dev-851-0-1"]["captions"] == ["The left image has 2 dogs."]
    assert (by_id["dev-851-0-0"]["label"], by_id["dev-851-0-0"]["class_name"]) == (1, "true")
    assert (by_id["dev-851-0-1"]["label"], by_id["dev-851-0-1"]["class_name"]) == (0, "false")
    assert by_id["dev-852-0-0"]["split"] == "val" and by_id["train-7-1-3"]["split"] == "train"
    assert by_id["dev-852-0-0"]["writer"] == "w2"
    assert (by_id["dev-852-0-0"]["width2"], by_id["dev-852-0-0"]["height2"]) == (16, 22)
    offsets = list(range(len(rows)))
    lefts = ds.read_blobs("image", indices=offsets, preserve_order=True)
    rights = ds.read_blobs("image2", indices=offsets, preserve_order=True)
    for row, (_, left), (_, right) in zip(rows, lefts, rights):
        assert (left, right) == pairs[row["id"].rsplit("-", 1)[0]]  # both images' bytes, unchanged
    info = dataset_info(tmp_path / "n.lance")
    assert info["pairs"] == 7 and info["classes"] == ["false", "true"]


def test_explicit_left_right_paths(tmp_path):
    from vlkit.data.ingest import ingest
    from vlkit.data.store import open_dataset

    left, right = _png(tmp_path / "a.png", (9, 9, 9)), _png(tmp_path / "sub" / "b.png", (8, 8, 8))
    (tmp_path / "p.jsonl").write_text(json.dumps({"identifier": "x-1-0-0", "sentence": "s", "label": False,
                                                  "left": "a.png", "right": "sub/b.png", "split": "test"}) + "\n")
    ingest([tmp_path / "p.jsonl"], tmp_path / "p.lance", progress=False)
    ds = open_dataset(tmp_path / "p.lance")
    assert ds.to_table(columns=["split", "label"]).to_pylist() == [{"split": "test", "label": 0}]
    assert ds.read_blobs("image", indices=[0])[0][1] == left
    assert ds.read_blobs("image2", indices=[0])[0][1] == right


def test_missing_right_image_is_one_line_naming_the_row(tmp_path):
    source, _ = _official(tmp_path)
    (tmp_path / "dev" / "dev-851-0-img1.png").unlink()
    out = tmp_path / "n.lance"
    res = run_cli("ingest", source, "--out", out, "--strict")
    assert res.returncode == 2 and not out.exists()
    first = res.stderr.strip().splitlines()[0]
    assert first.startswith("vlkit: error: --strict: 2 problems found, nothing written")
    named = [line for line in res.stderr.splitlines() if "dev-851-0-img1.png" in line]
    assert len(named) == 2  # the two sentences of that pair
    assert re.search(r"second image .*dev-851-0-img1\.png: image file not found \(listed at .*dev\.json:3\)",
                     named[0])
    # without --strict the two rows are skipped and the others stored
    res = run_cli("ingest", source, "--out", out)
    assert res.returncode == 0, res.stderr
    from vlkit.data.store import open_dataset

    ids = set(open_dataset(out).to_table(columns=["id"]).column("id").to_pylist())
    assert len(ids) == 5 and not ids & {"dev-851-0-0", "dev-851-0-1"}


def test_right_image_outside_root_is_refused(tmp_path):
    from vlkit.data.ingest import ingest
    from vlkit.errors import DataError

    data = tmp_path / "data"
    _png(data / "a.png", (1, 1, 1))
    _png(tmp_path / "secret.png", (2, 2, 2))
    (data / "p.jsonl").write_text(json.dumps({"identifier": "x-1-0-0", "sentence": "s", "label": "True",
                                              "left": "a.png", "right": "../secret.png"}) + "\n")
    with pytest.raises(DataError, match=r"second image .*secret\.png: outside the images root"):
        ingest([data / "p.jsonl"], tmp_path / "p.lance", strict=True, progress=False)


def test_single_image_dataset_unchanged(synth):
    from vlkit.data.dataset import LanceImageTextDataset
    from vlkit.data.store import dataset_info, open_dataset
    from vlkit.data.transforms import ImageTransform
    from vlkit.errors import DataError

    ds = open_dataset(synth)
    assert "image2" not in ds.schema.names and dataset_info(synth)["pairs"] == 0
    loader = LanceImageTextDataset(synth, "train", ImageTransform(32, train=False), None, captions="first")
    batch = loader.__getitems__([0, 1])
    assert batch["image"].shape == (2, 3, 32, 32) and "image2" not in batch
    _, data = ds.read_blobs("image", indices=[loader.offsets[0]])[0]
    assert torch.equal(batch["image"][0], ImageTransform(32, train=False).normalize(
        ImageTransform(32, train=False)(data, random.Random(0), True)[None])[0])
    with pytest.raises(DataError, match="no second images .*image2"):
        LanceImageTextDataset(synth, "train", None, None, captions="first", pairs=True)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """400 synthetic pairs about backgrounds (learnable in seconds), ingested; 20% test, 10% val."""
    from vlkit.data.ingest import ingest
    from vlkit.data.synth_pairs import generate_pairs

    root = tmp_path_factory.mktemp("pairs")
    jsonl = generate_pairs(root, 400, seed=1, image_size=32, kinds=("background",))
    ingest([jsonl], root / "synth.lance", val_fraction=0.1, test_fraction=0.2, progress=False)
    return root


def test_loader_pairs_against_direct_transforms(pairs):
    from vlkit.data.dataset import LanceImageTextDataset
    from vlkit.data.store import open_dataset
    from vlkit.data.transforms import ImageTransform, mentions_side

    transform = ImageTransform(32, train=True)
    loader = LanceImageTextDataset(pairs / "synth.lance", "train", transform, None, captions="first", seed=5,
                                   pairs=True, normalize=False)
    loader.set_epoch(3)
    positions = list(range(12))
    batch = loader.__getitems__(positions)
    assert batch["image"].shape == batch["image2"].shape == (12, 3, 32, 32)
    ds = open_dataset(pairs / "synth.lance")
    offsets = [loader.offsets[i] for i in positions]
    lefts = ds.read_blobs("image", indices=offsets, preserve_order=True)
    rights = ds.read_blobs("image2", indices=offsets, preserve_order=True)
    stems = ds.take(offsets, columns=["id"]).column("id").to_pylist()
    for j, (offset, (_, left), (_, right), text) in enumerate(zip(offsets, lefts, rights, batch["text"])):
        assert left == (pairs / "images" / f"{stems[j].rsplit('-', 1)[0]}-img0.png").read_bytes()
        rng = random.Random(f"5:3:{offset}")  # the loader's per-sample generator: left image first, then right
        flip = not mentions_side(text)
        assert torch.equal(batch["image"][j], transform(left, rng, flip))
        assert torch.equal(batch["image2"][j], transform(right, rng, flip))
    assert any(mentions_side(t) for t in batch["text"])


def test_synthetic_labels_match_the_pixels(pairs):
    """Background sentences checked on the pixels: an image's background is the background colour most of its
    pixels lie near (within the noise)."""
    from vlkit.data.synth import _BACKGROUNDS

    lines = [json.loads(line) for line in (pairs / "synth.jsonl").read_text().splitlines()]
    truths = []
    for line in lines:
        stem = line["identifier"].rsplit("-", 1)[0]
        found = []
        for side in (0, 1):
            pixels = np.asarray(Image.open(pairs / "images" / f"{stem}-img{side}.png")).reshape(-1, 3).astype(int)
            near = {name: int((np.abs(pixels - np.array(rgb)).max(axis=1) <= 8).sum())
                    for name, rgb in _BACKGROUNDS.items()}
            found.append(max(near, key=near.get))
        said = re.fullmatch(r"(both images have|the (left|right) image has) an? (.+) background", line["sentence"])
        assert said, line["sentence"]
        wanted = said.group(3)
        if said.group(2) is None:
            truth = found[0] == wanted and found[1] == wanted
        else:
            truth = found[0 if said.group(2) == "left" else 1] == wanted
        assert line["label"] == ("True" if truth else "False"), line
        truths.append(truth)
    assert 0.4 < sum(truths) / len(truths) < 0.6
    # a sentence is as likely under either label: the text alone tells nothing
    by_sentence: dict[str, list[bool]] = {}
    for line, truth in zip(lines, truths):
        by_sentence.setdefault(line["sentence"], []).append(truth)
    assert all(0 < sum(v) < len(v) for v in by_sentence.values() if len(v) >= 8)


def test_synthetic_pairs_cli_and_every_kind(tmp_path):
    from vlkit.data.synth_pairs import SENTENCE_KINDS, generate_pairs

    res = run_cli("data", "synth", "--kind", "pairs", "--out", tmp_path / "p", "--n", "40", "--image-size", "32")
    assert res.returncode == 0, res.stderr
    lines = [json.loads(x) for x in (tmp_path / "p" / "synth.jsonl").read_text().splitlines()]
    assert len(lines) == 40 and {x["label"] for x in lines} == {"True", "False"}
    starts = {" ".join(x["sentence"].split()[:3]) for x in lines}
    assert {"both images contain", "the left image"} <= starts
    assert generate_pairs(tmp_path / "q", 40, image_size=32).read_bytes() == \
        (tmp_path / "p" / "synth.jsonl").read_bytes()  # the same arguments give the same files
    info = run_cli("data", "info", tmp_path / "p" / "synth.lance")
    assert "pairs       40 rows of two images" in info.stdout
    assert len(SENTENCE_KINDS) == 6
    res = run_cli("data", "synth", "--kind", "pairs", "--sentences", "background,color", "--out", tmp_path / "b",
                  "--n", "30", "--image-size", "32")
    assert res.returncode == 0, res.stderr
    written = (tmp_path / "b" / "synth.jsonl").read_text().splitlines()
    said = {json.loads(x)["sentence"].split()[-1] for x in written}
    assert said == {"background", "object"}
    for bad in (["--sentences", "color,nope"], ["--sentences", ""]):
        res = run_cli("data", "synth", "--kind", "pairs", *bad, "--out", tmp_path / "c", "--n", "3")
        assert res.returncode == 2 and "sentence kinds" in res.stderr and not (tmp_path / "c").exists()
    res = run_cli("data", "synth", "--sentences", "color", "--out", tmp_path / "c", "--n", "3")
    assert res.returncode == 2 and "--sentences applies to --kind pairs only" in res.stderr


def test_contact_sheet_shows_both_images(tmp_path):
    from vlkit.data.ingest import ingest
    from vlkit.data.sheet import contact_sheet

    _png(tmp_path / "l.png", SIDE_COLORS[0], (32, 32))
    _png(tmp_path / "r.png", SIDE_COLORS[1], (32, 32))
    (tmp_path / "p.jsonl").write_text(json.dumps({"identifier": "x-1-0-0", "sentence": "red then blue",
                                                  "label": "True", "left": "l.png", "right": "r.png"}) + "\n")
    ingest([tmp_path / "p.jsonl"], tmp_path / "p.lance", progress=False)
    sheet = np.asarray(Image.open(contact_sheet(tmp_path / "p.lance", tmp_path / "s.png", thumb=64)))
    assert tuple(sheet[8 + 32, 8 + 32]) == SIDE_COLORS[0]  # the left image's square
    assert tuple(sheet[8 + 32, 8 + 64 + 4 + 32]) == SIDE_COLORS[1]  # the right image, beside it


@pytest.fixture(scope="module")
def pairs_run(pairs, tmp_path_factory):
    """A tiny ALBEF trained by the shipped recipe nlvr2_synth on ``pairs`` (fewer, smaller steps)."""
    from vlkit.config.load import load_config
    from vlkit.train.trainer import Trainer

    run = tmp_path_factory.mktemp("nlvr2_run") / "run"
    recipe = Path(__file__).resolve().parent.parent / "vlkit" / "configs" / "nlvr2_synth.yaml"
    cfg = load_config(recipe, [f"datasets.pairs.path={pairs / 'synth.lance'}", f"output_dir={run}", "epochs=4",
                               "batch_size=16", "optim.warmup_steps=5", "progress=false", "tensorboard=false",
                               "log_every=1000"])
    trainer = Trainer(cfg)
    metrics = trainer.run()
    trainer.finish()
    return run, metrics, trainer.tasks[0]


def test_task_learns_above_chance_on_held_out_pairs(pairs, pairs_run, tmp_path):
    run, metrics, task = pairs_run
    assert metrics["val/pairs/accuracy"] > 60
    res = run_cli("eval", run, "--task", "nlvr2", "--data", pairs / "synth.lance", "--split", "test", "--json",
                  "--report", tmp_path / "report")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    page = (tmp_path / "report" / "index.html").read_text()
    assert "NLVR2: is the sentence true of the two images" in page and "Confusion matrix" in page
    assert out["pairs"] >= 60
    accuracy, majority = out["metrics"]["test/synth/accuracy"], out["metrics"]["test/synth/majority_accuracy"]
    assert accuracy > 62 and accuracy > majority + 5  # chance is 50, always answering the commoner label 59


def test_eval_matches_a_slow_loop(pairs, pairs_run):
    """vlkit eval's accuracy and answers against one pair at a time: each image fused alone, the saved head."""
    from safetensors.torch import load_file

    from vlkit.data.dataset import LanceImageTextDataset
    from vlkit.eval.evaluate import evaluate
    from vlkit.inference.loading import load_for_inference

    run, _, task = pairs_run
    saved = load_file(str(run / "model" / "nlvr2_head.safetensors"))
    for key, value in task.head.state_dict().items():  # the head the task trained, saved beside the model
        assert torch.equal(saved[key.removeprefix("head.")], value.cpu())
    result = evaluate(run, "nlvr2", pairs / "synth.lance", "test", batch_size=7, precision="fp32")
    loaded = load_for_inference(run)
    ds = LanceImageTextDataset(pairs / "synth.lance", "test", loaded.model.preprocess.image_transform(train=False),
                               None, captions="first", pairs=True)
    correct, answers = 0, []
    with torch.no_grad():
        for i in range(len(ds)):
            row = ds[i]
            tokens = loaded.tokenizer(row["text"])
            left = loaded.model.fuse(loaded.model.image_tokens(row["image"]), tokens["input_ids"],
                                     tokens["attention_mask"])[:, 0]
            right = loaded.model.fuse(loaded.model.image_tokens(row["image2"]), tokens["input_ids"],
                                      tokens["attention_mask"])[:, 0]
            h = torch.cat([left, right], dim=-1)
            for layer in (torch.nn.functional.linear,):
                h = layer(h, saved["mlp.0.weight"], saved["mlp.0.bias"])
            h = torch.nn.functional.layer_norm(h, h.shape[-1:], saved["mlp.1.weight"], saved["mlp.1.bias"])
            h = torch.nn.functional.linear(torch.nn.functional.gelu(h), saved["mlp.3.weight"], saved["mlp.3.bias"])
            answers.append(bool(h.argmax(-1).item()))
            correct += answers[-1] == bool(row["label"].item())
    assert [s["answer"] for s in result.samples] == answers
    assert result.metrics["test/synth/accuracy"] == pytest.approx(100 * correct / len(ds))
    assert result.summary()["confusion"]["classes"] == ["false", "true"]
    # vlkit predict: one line per pair with the same answers, whose accuracy is the evaluation's
    from vlkit.eval.predict import predict

    lines = predict(run, "nlvr2", pairs / "synth.lance", "test", batch_size=7, precision="fp32").lines
    assert [line["class"] == "true" for line in lines] == answers
    assert [line["id"] for line in lines] == [s["id"] for s in result.samples]
    right = sum(line["class"] == line["true_class"] for line in lines)
    assert 100 * right / len(lines) == pytest.approx(result.metrics["test/synth/accuracy"])
    assert all(abs(sum(line["probabilities"].values()) - 1) < 1e-5 for line in lines)


def test_eval_from_a_checkpoint_uses_its_head(pairs, pairs_run):
    from vlkit.eval.evaluate import evaluate

    run, _, _ = pairs_run
    final = evaluate(run, "nlvr2", pairs / "synth.lance", "val", precision="fp32")
    checkpoint = evaluate(run / "checkpoints" / "latest", "nlvr2", pairs / "synth.lance", "val", precision="fp32")
    assert checkpoint.metrics == final.metrics  # the last checkpoint is the final model, with its head


def test_eval_refusals(synth, pairs, pairs_run, tmp_path):
    from vlkit.models.io import save_model
    from vlkit.models.registry import create_model

    run, _, _ = pairs_run
    res = run_cli("eval", run, "--task", "nlvr2", "--data", synth, "--split", "val")
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1 and "no second images (column 'image2')" in res.stderr
    save_model(create_model("clip-tiny"), tmp_path / "clip")
    res = run_cli("eval", tmp_path / "clip", "--task", "nlvr2", "--data", pairs / "synth.lance", "--split", "val")
    assert res.returncode == 2 and "--task nlvr2 needs a fusion model (albef-*, vilt-*), not CLIP" in res.stderr
    save_model(create_model("albef-tiny"), tmp_path / "albef")  # a fusion model trained without the task
    res = run_cli("eval", tmp_path / "albef", "--task", "nlvr2", "--data", pairs / "synth.lance", "--split", "val")
    assert res.returncode == 2 and "has no NLVR2 head (nlvr2_head.safetensors)" in res.stderr


def test_pairs_appended_to_a_single_image_dataset(tmp_path):
    """A dataset of single images gains image2 when pairs are ingested into it: its rows stay as they were (no
    second image), the loader without pairs reads every row, with pairs only the pairs."""
    from vlkit.data.dataset import LanceImageTextDataset
    from vlkit.data.ingest import ingest
    from vlkit.data.store import open_dataset

    mixed = tmp_path / "mixed.lance"
    singles = tmp_path / "singles"
    for k in range(5):
        _png(singles / f"{k}.png", (50 * k, 0, 0))
    (singles / "c.jsonl").write_text("".join(json.dumps({"image": f"{k}.png", "text": f"caption {k}"}) + "\n"
                                             for k in range(5)))
    ingest([singles / "c.jsonl"], mixed, split="train", progress=False)
    before = open_dataset(mixed).to_table(columns=["id", "captions"]).to_pylist()
    source, _ = _official(tmp_path / "nlvr2")
    ingest([source], mixed, split="train", progress=False)
    ds = open_dataset(mixed)
    table = ds.to_table(columns=["id", "captions", "image2"])
    assert table.num_rows == len(before) + 7
    assert table.slice(0, len(before)).select(["id", "captions"]).to_pylist() == before
    assert table.column("image2").null_count == len(before)
    every = LanceImageTextDataset(mixed, "train", None, None, captions="first")
    only_pairs = LanceImageTextDataset(mixed, "train", None, None, captions="first", pairs=True)
    assert len(only_pairs) == 7 and len(every) == 5 + 7
    assert sorted(only_pairs.__getitems__(list(range(7)))["id"]) == sorted(
        r["id"] for r in table.to_pylist() if r["image2"] is not None)


@pytest.mark.parametrize("name", ["vilt-tiny", "albef-tiny"])
def test_pair_logits_against_one_image_at_a_time(name):
    """Both images in one forward pass give what each image fused alone gives, for both fusion families."""
    from vlkit.models.registry import create_model
    from vlkit.tasks.nlvr2 import PairHead, fused_width, pair_logits

    torch.manual_seed(0)
    model = create_model(name).eval()
    head = PairHead(fused_width(model)).eval()
    size = model.preprocess.image_size
    images, images2 = torch.randn(3, 3, size, size), torch.randn(3, 3, size, size)
    ids = torch.tensor([[2, 7, 8, 9, 3], [2, 10, 3, 0, 0], [2, 11, 12, 3, 0]])

    def tokenizer(texts):
        assert len(texts) == 3
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}

    with torch.no_grad():
        got = pair_logits(model, head, tokenizer, images, images2, ["a", "b", "c"], torch.device("cpu"))
        for i in range(3):
            mask = (ids[i:i + 1] != 0).long()
            left = model(images[i:i + 1], ids[i:i + 1], mask, head="cls")
            right = model(images2[i:i + 1], ids[i:i + 1], mask, head="cls")
            torch.testing.assert_close(got[i:i + 1], head(left, right), atol=1e-5, rtol=1e-4)


def test_training_on_single_images_is_refused_before_any_step(synth, tmp_path):
    from vlkit.config.load import load_config
    from vlkit.errors import DataError
    from vlkit.train.trainer import Trainer

    cfg = load_config(None, [f"datasets={{synth: {{path: {synth}}}}}", "tasks=[{name: nlvr2, dataset: synth}]",
                             "model.name=albef-tiny", f"output_dir={tmp_path / 'run'}", "progress=false"])
    with pytest.raises(DataError, match="has no column 'image2', which task nlvr2 reads"):
        Trainer(cfg)
    assert not (tmp_path / "run").exists()
