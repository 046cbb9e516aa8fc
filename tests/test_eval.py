"""``vlkit eval``: classification metrics against scikit-learn, zero-shot and linear probe against independent
computations, the CLI end to end on the trained synthetic model, the HTML report, and the errors."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import sklearn.metrics as sklearn_metrics
import torch
import torch.nn.functional as F
from PIL import Image

from vlkit.errors import DataError, VlkitError
from vlkit.metrics.classification import classification_metrics, topk_accuracy, true_class_ranks
from vlkit.metrics.retrieval import retrieval_metrics
from vlkit.tasks.linear_probe import DEFAULT_C_GRID, fit_probe, holdout_split
from vlkit.tasks.zeroshot import DEFAULT_TEMPLATES, fill_template, load_templates

from .conftest import jpeg_bytes, run_cli


# ---------------------------------------------------------------- classification metrics


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_classification_metrics_match_sklearn():
    g = torch.Generator().manual_seed(0)
    n_cls = 9
    labels = torch.randint(0, n_cls - 1, (300,), generator=g)  # the last class never occurs
    scores = torch.randn(300, n_cls, generator=g) + 1.5 * F.one_hot(labels, n_cls)
    m = classification_metrics(scores, labels)
    y, s = labels.numpy(), scores.numpy()
    pred = s.argmax(axis=1)
    assert m.top1 == pytest.approx(100 * sklearn_metrics.accuracy_score(y, pred))
    assert m.top5 == pytest.approx(100 * sklearn_metrics.top_k_accuracy_score(y, s, k=5, labels=range(n_cls)))
    assert m.mean_per_class_recall == pytest.approx(100 * sklearn_metrics.balanced_accuracy_score(y, pred))
    assert np.array_equal(m.confusion.numpy(), sklearn_metrics.confusion_matrix(y, pred, labels=range(n_cls)))
    recall = sklearn_metrics.recall_score(y, pred, labels=range(n_cls - 1), average=None)
    assert np.allclose(m.per_class_recall[:-1].numpy(), 100 * recall) and torch.isnan(m.per_class_recall[-1])
    assert 20 < m.top1 < 90 and m.top1 < m.top5 < 100  # neither trivial nor hopeless
    assert m.as_dict("test/x/") == {"test/x/top1": m.top1, "test/x/top5": m.top5,
                                    "test/x/mean_per_class_recall": m.mean_per_class_recall}


def test_ranks_ties_and_capped_k():
    scores = torch.tensor([[1.0, 1.0, 0.0], [0.2, 0.5, 0.9], [0.3, 0.3, 0.3]])
    labels = torch.tensor([1, 0, 2])
    # ties go to the lower class index, as argmax does
    assert true_class_ranks(scores, labels).tolist() == [2, 3, 3]
    assert topk_accuracy(scores, labels, ks=(1, 2, 5)) == {1: 0.0, 2: 100 / 3, 5: 100.0}  # k capped at 3 classes
    m = classification_metrics(scores, labels)
    assert m.top1 == 0.0 and m.top5 == 100.0 and m.confusion.trace() == 0
    with pytest.raises(VlkitError, match="outside"):
        classification_metrics(scores, torch.tensor([0, 1, 3]))
    with pytest.raises(VlkitError, match="integer"):
        classification_metrics(scores, torch.tensor([0.0, 1.0, 2.0]))


# ---------------------------------------------------------------- templates and the probe fit


def test_templates(tmp_path):
    assert 10 <= len(DEFAULT_TEMPLATES) <= 18 and all("{}" in t for t in DEFAULT_TEMPLATES)
    assert fill_template("a photo of a {}.", "orange circle") == "a photo of an orange circle."
    assert fill_template("A {} and the {}", "red square") == "A red square and the red square"
    good = tmp_path / "good.txt"
    good.write_text("# mine\na photo of a {}.\n\n  a sketch of the {}  \n")
    assert load_templates(good) == ["a photo of a {}.", "a sketch of the {}"]
    bad = tmp_path / "bad.txt"
    bad.write_text("a photo of a {}.\na photo of nothing\n")
    with pytest.raises(VlkitError, match=r"bad.txt line 2: .*no '\{\}'"):
        load_templates(bad)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# only a comment\n")
    with pytest.raises(VlkitError, match="no templates"):
        load_templates(empty)
    with pytest.raises(VlkitError, match="no such templates file"):
        load_templates(tmp_path / "missing.txt")


def test_fit_probe_chooses_c_on_the_held_out_part():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(3)
    y = rng.integers(0, 4, 200)
    x = rng.normal(size=(200, 6)) + 1.2 * np.eye(4, 6)[y]
    grid = (0.001, 0.1, 10.0)
    fit = fit_probe(x, y, grid, seed=5)
    fit_idx, held_idx = holdout_split(200, 0.2, seed=5)
    assert len(held_idx) == 40 and not set(fit_idx) & set(held_idx) and len(fit_idx) + len(held_idx) == 200
    for c in grid:  # the held-out accuracies, by a direct fit
        direct = LogisticRegression(C=c, max_iter=1000).fit(x[fit_idx], y[fit_idx])
        assert fit.holdout_accuracy[c] == pytest.approx(100 * (direct.predict(x[held_idx]) == y[held_idx]).mean())
    assert fit.c == max(grid, key=lambda c: (fit.holdout_accuracy[c], -c))
    assert fit.holdout_accuracy[0.001] < fit.holdout_accuracy[fit.c]  # the grid matters
    final = LogisticRegression(C=fit.c, max_iter=1000).fit(x, y)
    assert np.allclose(fit.classifier.coef_, final.coef_) and fit.num_train == 200
    with pytest.raises(VlkitError, match="one class"):
        fit_probe(x, np.zeros(200, dtype=int))


# ---------------------------------------------------------------- the CLI on the trained model


def _by_hand_image_embeddings(model, dataset, split):
    """Image embeddings and labels of a split, one image at a time, straight from the Lance rows."""
    from vlkit.data.store import open_dataset, split_indices

    ds = open_dataset(dataset)
    offsets = split_indices(ds, split)
    rows = ds.take(offsets, columns=["id", "captions", "label"]).to_pylist()
    transform = model.preprocess.image_transform(train=False)
    images = []
    with torch.no_grad():
        for (_, data) in ds.read_blobs("image", indices=offsets, preserve_order=True):
            images.append(model.encode_image(transform.normalize(transform(data)[None]))[0])
    return torch.stack(images), rows


@pytest.fixture(scope="module")
def loaded(trained_run):
    from vlkit.inference.loading import load_for_inference

    loaded = load_for_inference(trained_run[0])
    loaded.precision = "fp32"  # compared with embeddings computed by hand in fp32
    return loaded


def _html_pngs(report):
    page = (report / "index.html").read_text()
    pngs = re.findall(r'<img src="([^"]+\.png)"', page)
    for name in pngs:
        with Image.open(report / name) as img:
            assert img.format == "PNG" and img.width > 600 and img.height > 400, name
    return page, pngs


def test_retrieval_cli_matches_metrics_on_embeddings_by_hand(trained_run, synth, loaded, tmp_path):
    from vlkit.inference.embed import compute_embeddings

    run_dir, _ = trained_run
    report = tmp_path / "report"
    proc = run_cli("eval", run_dir, "--data", synth, "--json", "--report", report, "--precision", "fp32")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["task"] == "retrieval" and out["split"] == "test" and out["report"].endswith("index.html")

    model, tok = loaded.model, loaded.tokenizer
    images, rows = _by_hand_image_embeddings(model, synth, "test")
    texts, owner = [], []
    with torch.no_grad():
        for i, row in enumerate(rows):
            for caption in row["captions"]:
                t = tok([caption])
                texts.append(model.encode_text(t["input_ids"], t["attention_mask"])[0])
                owner.append(i)
    texts, owner = torch.stack(texts), torch.tensor(owner)
    assert out["images"] == len(rows) and out["captions"] == len(texts)
    # The embeddings the evaluation uses are the ones computed here image by image, caption by caption ...
    emb = compute_embeddings(loaded, synth, "test")
    assert torch.allclose(emb.image, images, atol=1e-5) and torch.allclose(emb.text, texts, atol=1e-5)
    assert torch.equal(emb.caption_image, owner)
    # ... and the CLI's metrics are exactly those of these embeddings.
    assert out["metrics"] == retrieval_metrics(emb.image, emb.text, emb.caption_image).as_dict("test/synth/")
    # Synthetic captions repeat across images, so scores tie exactly; rounding (1e-7) may break a tie here
    # and there, which moves at most a couple of queries.
    by_hand = retrieval_metrics(images, texts, owner).as_dict("test/synth/")
    for key in ("t2i_r1", "t2i_r5", "t2i_r10"):
        assert abs(out["metrics"]["test/synth/" + key] - by_hand["test/synth/" + key]) <= 2 * 100 / len(texts) + 1e-9
    for key in ("i2t_r1", "i2t_r5", "i2t_r10"):
        assert abs(out["metrics"]["test/synth/" + key] - by_hand["test/synth/" + key]) <= 2 * 100 / len(rows) + 1e-9
    assert out["metrics"]["test/synth/t2i_r10"] > 50  # the trained model retrieves far better than chance

    page, pngs = _html_pngs(report)
    assert {"similarity.png", "retrieval_examples.png"} <= set(pngs)
    assert "t2i_r1" in page and f"{out['metrics']['test/synth/t2i_r1']:.2f}" in page
    assert json.loads((report / "metrics.json").read_text())["metrics"] == out["metrics"]


def test_zeroshot_cli_matches_slow_loop_and_beats_chance(trained_run, synth, loaded, tmp_path):
    from vlkit.data.synth import CLASSES

    report = tmp_path / "zs"
    proc = run_cli("eval", trained_run[0], "--task", "zeroshot", "--data", synth, "--split", "train",
                   "--json", "--report", report, "--precision", "fp32")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["classes"] == len(CLASSES) and out["templates"] == list(DEFAULT_TEMPLATES)

    model, tok = loaded.model, loaded.tokenizer
    prompts = []
    with torch.no_grad():
        for name in CLASSES:  # one sentence at a time
            sentences = [t.replace("{}", name).replace("a orange", "an orange") for t in DEFAULT_TEMPLATES]
            vecs = []
            for sentence in sentences:
                t = tok([sentence])
                vecs.append(F.normalize(model.encode_text(t["input_ids"], t["attention_mask"])[0], dim=0))
            prompts.append(F.normalize(torch.stack(vecs).mean(0), dim=0))
    images, rows = _by_hand_image_embeddings(model, synth, "train")
    top1 = top5 = 0
    for image, row in zip(images, rows):
        sims = [float(image @ p) for p in prompts]
        order = sorted(range(len(sims)), key=lambda c: -sims[c])
        top1 += order[0] == row["label"]
        top5 += row["label"] in order[:5]
    n = len(rows)
    metrics = out["metrics"]
    assert out["images"] == n
    assert metrics["train/synth/top1"] == pytest.approx(100 * top1 / n)
    assert metrics["train/synth/top5"] == pytest.approx(100 * top5 / n)
    chance = 100 / len(CLASSES)
    assert metrics["train/synth/top1"] > 3 * chance and metrics["train/synth/mean_per_class_recall"] > 2 * chance
    recall = [v for v in out["per_class_recall"].values() if v is not None]
    assert np.mean(recall) == pytest.approx(metrics["train/synth/mean_per_class_recall"])

    page, pngs = _html_pngs(report)
    assert {"per_class.png", "confusion.png"} <= set(pngs)
    assert "Prompt templates" in page and "Most frequent confusions" in page


def test_zeroshot_with_a_templates_file(trained_run, synth, loaded, tmp_path, capsys):
    from vlkit.cli import main
    from vlkit.tasks.zeroshot import build_classifier

    one = tmp_path / "one.txt"
    one.write_text("a drawing of a {}\n")
    assert main(["eval", str(trained_run[0]), "--task", "zeroshot", "--data", str(synth),
                 "--templates", str(one), "--limit", "12"]) == 0
    text = capsys.readouterr().out
    present = _classes_of_first_rows(synth, "test", 12)
    assert 1 < len(present) < 18  # the first 12 images hold only some of the 18 classes
    assert f"12 images, {len(present)} classes, 1 templates" in text and "top-1 accuracy" in text
    assert f"classes present: {', '.join(present)} (scored against all 18 classes" in text
    assert f"chance (1/{len(present)})" in text and f"{100 / len(present):7.2f} %" in text
    classifier = build_classifier(loaded, ["red circle", "orange square"], ["a drawing of a {}"])
    t = loaded.tokenizer(["a drawing of a red circle", "a drawing of an orange square"])
    with torch.no_grad():
        direct = loaded.model.encode_text(t["input_ids"], t["attention_mask"])
    assert torch.allclose(classifier, F.normalize(direct, dim=-1), atol=1e-5)


def _classes_of_first_rows(dataset, split, n):
    """The class names of the first ``n`` rows of ``split``, by label, read straight from the Lance table."""
    import lance

    rows = [r for r in lance.dataset(str(dataset)).to_table(columns=["split", "label", "class_name"]).to_pylist()
            if r["split"] == split][:n]
    return [name for _, name in sorted({(r["label"], r["class_name"]) for r in rows})]


def test_zeroshot_limit_reports_the_classes_it_saw(trained_run, synth, tmp_path, capsys):
    from vlkit.cli import main
    from vlkit.data.synth import CLASSES

    present = _classes_of_first_rows(synth, "train", 4)
    assert len(present) < len(CLASSES)
    report = tmp_path / "zs"
    assert main(["eval", str(trained_run[0]), "--task", "zeroshot", "--data", str(synth), "--split", "train",
                 "--limit", "4", "--json", "--report", str(report)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["classes"] == len(present) and out["classes_present"] == present
    assert out["classes_scored"] == len(CLASSES)  # the classifier still scores every class
    assert out["chance"] == pytest.approx(100 / len(present))
    page = (report / "index.html").read_text()
    assert f"<td>chance (1 / classes present)</td><td>{100 / len(present):.1f} %</td>" in page
    assert f"{len(present)} of the {len(CLASSES)} scored" in page
    assert f"Classes present in the evaluated images: {', '.join(present)}." in page


def test_linear_probe_cli_beats_majority_and_matches_sklearn(trained_run, synth, loaded):
    from sklearn.linear_model import LogisticRegression

    from vlkit.inference.embed import compute_embeddings

    proc = run_cli("eval", trained_run[0], "--task", "linear-probe", "--data", synth, "--json", "--precision", "fp32")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["train_split"] == "train" and out["C"] in DEFAULT_C_GRID
    assert out["C"] == max(DEFAULT_C_GRID, key=lambda c: (out["holdout_accuracy"][f"{c:g}"], -c))

    train = compute_embeddings(loaded, synth, "train", captions=False)
    test = compute_embeddings(loaded, synth, "test", captions=False)
    assert out["train_images"] == len(train.ids) and out["images"] == len(test.ids)
    direct = LogisticRegression(C=out["C"], max_iter=1000).fit(train.image.numpy(), train.labels.numpy())
    accuracy = 100 * float((direct.predict(test.image.numpy()) == test.labels.numpy()).mean())
    top1 = out["metrics"]["test/synth/top1"]
    assert top1 == pytest.approx(accuracy, abs=100 / len(test.ids) + 1e-9)  # at most one image apart
    majority = 100 * np.bincount(test.labels.numpy()).max() / len(test.ids)
    assert top1 > majority + 10


# ---------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def captions_only(tmp_path_factory):
    """A 3-image dataset with captions and no labels, all in split 'test'."""
    from vlkit.data.ingest import ingest

    root = tmp_path_factory.mktemp("captions")
    for i, color in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        (root / f"{i}.jpg").write_bytes(jpeg_bytes(color))
    (root / "captions.csv").write_text("image,caption,split\n0.jpg,a red block,test\n1.jpg,a green block,test\n"
                                       "2.jpg,a blue block,test\n")
    ingest([root / "captions.csv"], root / "caps.lance", progress=False)
    return root / "caps.lance"


def _one_line_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vlkit: error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_cli_errors(trained_run, synth, captions_only, tmp_path):
    run_dir = trained_run[0]
    _one_line_error(run_cli("eval", run_dir, "--data", synth, "--split", "holdout"),
                    "split 'holdout'", "splits present")
    _one_line_error(run_cli("eval", run_dir, "--task", "zeroshot", "--data", captions_only),
                    "caps.lance", "no class labels")
    _one_line_error(run_cli("eval", tmp_path / "no-such-run", "--data", synth), "no-such-run", "no such run")


def test_api_errors(trained_run, synth, captions_only, tmp_path):
    from vlkit.eval import evaluate
    from vlkit.eval.report import write_report

    with pytest.raises(DataError, match="no class labels"):
        evaluate(trained_run[0], "linear-probe", captions_only, "test")
    without_model = tmp_path / "run"
    (without_model / "checkpoints").mkdir(parents=True)
    with pytest.raises(VlkitError, match="no final model"):
        evaluate(without_model, "retrieval", synth)
    with pytest.raises(DataError, match="same|both 'train'"):
        evaluate(trained_run[0], "linear-probe", synth, "train")
    # a checkpoint works as well as the run; the report refuses to replace a directory that is not a report
    result = evaluate(trained_run[0] / "checkpoints" / "best", "retrieval", synth, "val", limit=10)
    assert result.details["images"] == 10 and 0 <= result.metrics["val/synth/t2i_r1"] <= 100
    with pytest.raises(VlkitError, match="not an earlier vlkit eval report"):
        write_report(result, without_model)
    assert (without_model / "checkpoints").is_dir()
    index = write_report(result, tmp_path / "rep")
    assert index.exists() and write_report(result, tmp_path / "rep") == index  # an earlier report is replaced
