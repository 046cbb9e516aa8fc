"""ITM re-ranking (vlkit.inference.rerank) in eval and search, the matching interface of ALBEF and ViLT, and
fusion-only models (ViLT) in index and eval."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import vlkit
from tests.conftest import run_cli
from vlkit.data.text import build_word_tokenizer
from vlkit.inference.rerank import Reranked, order_by_itm, rerank_embeddings, topk_candidates
from vlkit.inference.rerank_ranks import DotScores, ranks_from_scores
from vlkit.metrics.retrieval import retrieval_metrics, retrieval_ranks
from vlkit.models.io import save_model
from vlkit.inference.embed import compute_embeddings
from vlkit.inference.loading import LoadedModel, load_for_inference

pytestmark = pytest.mark.usefixtures("one_thread")


def _tokenizer(dataset: Path):
    from vlkit.data.store import open_dataset

    captions = open_dataset(dataset).to_table(columns=["captions"]).column("captions").to_pylist()
    return build_word_tokenizer([c for row in captions for c in row or []], max_length=32)


@pytest.fixture(scope="module")
def albef_run(synth, tmp_path_factory):
    """A tiny ALBEF trained briefly on ``synth`` with the itm task (ITC + ITM + MLM)."""
    from vlkit.config.load import load_config
    from vlkit.train.trainer import Trainer

    run = tmp_path_factory.mktemp("albef") / "run"
    torch.manual_seed(0)
    cfg = load_config(None, [f"datasets={{synth: {{path: {synth}}}}}", "tasks=[{name: itm, dataset: synth}]",
                             f"output_dir={run}", "model.name=albef-tiny", "batch_size=32", "epochs=4",
                             "progress=false", "tensorboard=false", "precision=fp32", "optim.warmup_steps=5",
                             "optim.lr_image=1e-3", "optim.lr_text=1e-3", "optim.lr_head=1e-3",
                             "eval_every=1000", "save_every=1000", "best_metric=val/synth/rsum"])
    Trainer(cfg).run()
    return run


@pytest.fixture(scope="module")
def vilt_dir(synth, tmp_path_factory):
    """An untrained tiny ViLT saved with a word tokenizer of the synth captions."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("vilt") / "vilt"
    save_model(vlkit.create_model("vilt-tiny").eval(), out, tokenizer=_tokenizer(synth))
    return out


# ---------------------------------------------------------------------------------------------- the interface
@pytest.mark.parametrize("name", ["albef-tiny", "vilt-tiny"])
def test_match_scores_equal_itm_scores(name):
    torch.manual_seed(0)
    model = vlkit.create_model(name).eval()
    images = torch.randn(4, 3, 32, 32)
    ids = torch.randint(5, 200, (4, 9))
    mask = torch.ones_like(ids)
    ids[1, 6:], mask[1, 6:] = 0, 0
    with torch.no_grad():
        reference = model.itm_scores(images, ids, mask)
        features = model.match_features(images)
        # rows scored in another grouping: each pair's score is independent of the other rows
        order = torch.tensor([2, 0, 3, 1])
        shuffled = model.match_scores(features[order], ids[order], mask[order])
    assert features.shape[0] == 4
    assert torch.allclose(shuffled, reference[order], atol=1e-6)
    assert ((reference > 0) & (reference < 1)).all()


# ---------------------------------------------------------------------------------------------- ranks
def _slow_ranks(img, txt, owner, t2i, t2i_itm, i2t, i2t_itm, k):
    """Per-query reference: sort by similarity, put the top k in ITM order, read the correct answer's place."""
    t2i_ranks, i2t_ranks = [], []
    for j in range(txt.shape[0]):
        order = sorted(range(img.shape[0]), key=lambda i: -float(img[i] @ txt[j]))
        itm = dict(zip(t2i[j].tolist(), t2i_itm[j].tolist()))
        assert set(order[:k]) == set(itm)
        ranked = sorted(order[:k], key=lambda i: -itm[i]) + order[k:]
        t2i_ranks.append(ranked.index(int(owner[j])) + 1)
    for i in sorted(set(owner.tolist())):
        order = sorted(range(txt.shape[0]), key=lambda j: -float(img[i] @ txt[j]))
        itm = dict(zip(i2t[i].tolist(), i2t_itm[i].tolist()))
        ranked = sorted(order[:k], key=lambda j: -itm[j]) + order[k:]
        i2t_ranks.append(min(p for p, j in enumerate(ranked) if owner[j] == i) + 1)
    return t2i_ranks, i2t_ranks


def test_reranked_ranks_match_a_slow_loop_and_only_reorder_the_top_k():
    torch.manual_seed(1)
    n_img, n_txt, k = 29, 70, 6
    img = F.normalize(torch.randn(n_img, 8), dim=1)
    txt = F.normalize(torch.randn(n_txt, 8), dim=1)
    owner = torch.randint(0, n_img - 4, (n_txt,)).sort().values  # the last images have no caption
    t2i, t2i_sim = topk_candidates(txt, img, k, chunk_size=16)
    i2t, _ = topk_candidates(img, txt, k, chunk_size=16)
    assert torch.equal(t2i, (txt @ img.T).topk(k, dim=1).indices)
    t2i_new, t2i_itm = order_by_itm(t2i, torch.rand(t2i.shape))
    i2t_new, i2t_itm = order_by_itm(i2t, torch.rand(i2t.shape))
    # the same set of k candidates per query, in non-increasing ITM order
    assert torch.equal(t2i_new.sort(dim=1).values, t2i.sort(dim=1).values)
    assert (t2i_itm[:, :-1] >= t2i_itm[:, 1:]).all() and (i2t_itm[:, :-1] >= i2t_itm[:, 1:]).all()
    done = Reranked(k, t2i_new, t2i_itm, i2t_new, i2t_itm, pairs=0)
    t2i_ranks, i2t_ranks, _ = done.ranks(img, txt, owner, chunk_size=8)  # blocks smaller than the sets
    slow_t2i, slow_i2t = _slow_ranks(img, txt, owner, t2i_new, t2i_itm, i2t_new, i2t_itm, k)
    assert t2i_ranks.tolist() == slow_t2i and i2t_ranks.tolist() == slow_i2t
    # beyond k nothing moves: a rank above k before stays the same rank after
    before_t2i, before_i2t, _ = retrieval_ranks(img, txt, owner)
    assert torch.equal(t2i_ranks[before_t2i > k], before_t2i[before_t2i > k])
    assert torch.equal(i2t_ranks[before_i2t > k], before_i2t[before_i2t > k])
    assert ((t2i_ranks <= k) == (before_t2i <= k)).all()
    # the same counting without lifted entries is the retrieval metric's own
    plain = DotScores(img, txt)
    assert all(torch.equal(a, b) for a, b in zip(ranks_from_scores(plain, plain, n_img, owner, chunk_size=8),
                                                 retrieval_ranks(img, txt, owner)))


class OracleMatcher(torch.nn.Module):
    """Weak embeddings (an untrained ALBEF's) with an ITM head that knows the answer: it recognises each image
    by its pixels and each caption by its tokens, and scores 0.9 for a true pair, 0.1 otherwise."""

    def __init__(self, inner, images: dict[bytes, set[int]], captions: dict[tuple, set[int]]):
        super().__init__()
        self.inner, self.images, self.captions = inner, images, captions
        self.preprocess = inner.preprocess

    def encode_image(self, images):
        return self.inner.encode_image(images)

    def encode_text(self, input_ids, attention_mask=None):
        return self.inner.encode_text(input_ids, attention_mask)

    def match_features(self, images):
        return images

    def images_of(self, index: int) -> set[int]:
        """Whether image ``index`` of the split holds true pairs: the set of its positions (by pixels)."""
        return next(owners for owners in self.images.values() if index in owners)

    def owners_of(self, emb, caption: int) -> set[int]:
        """The images caption ``caption`` of ``emb`` belongs to (one caption text may describe several)."""
        text = emb.captions[caption]
        return {int(emb.caption_image[j]) for j, t in enumerate(emb.captions) if t == text}

    def match_scores(self, features, input_ids, attention_mask=None):
        out = []
        for pixels, ids, mask in zip(features, input_ids, attention_mask):
            owners = self.captions[tuple(ids[mask.bool()].tolist())]
            out.append(0.9 if self.images[pixels.numpy().tobytes()] & owners else 0.1)
        return torch.tensor(out)


def test_reranking_with_a_knowing_itm_head_lifts_recall_at_1_to_recall_at_k(synth):
    torch.manual_seed(0)
    inner = vlkit.create_model("albef-tiny").eval()
    tokenizer = _tokenizer(synth)
    emb = compute_embeddings(LoadedModel(inner, tokenizer, Path("tiny"), "tiny"), synth, "val")
    from vlkit.inference.rerank import split_images

    pixels: dict[bytes, set[int]] = {}
    loaded = LoadedModel(inner, tokenizer, Path("tiny"), "tiny")
    for start, batch in split_images(loaded, synth, "val", emb.ids, 16):
        for i, image in enumerate(batch):
            pixels.setdefault(image.numpy().tobytes(), set()).add(start + i)
    tokens = tokenizer(emb.captions)
    captions: dict[tuple, set[int]] = {}
    for j, (ids, mask) in enumerate(zip(tokens["input_ids"], tokens["attention_mask"])):
        captions.setdefault(tuple(ids[mask.bool()].tolist()), set()).add(int(emb.caption_image[j]))
    oracle = LoadedModel(OracleMatcher(inner, pixels, captions), tokenizer, Path("oracle"), "oracle")
    k = 5
    done = rerank_embeddings(oracle, synth, "val", emb, k, batch_size=16, pair_batch=37)
    before = retrieval_metrics(emb.image, emb.text, emb.caption_image)
    after = done.metrics(emb.image, emb.text, emb.caption_image)
    # every correct answer in the top k moves to the top: R@1 after is R@k before, R@k itself is unchanged
    assert after.t2i_r1 == pytest.approx(before.t2i_r5) and after.i2t_r1 == pytest.approx(before.i2t_r5)
    assert after.t2i_r5 == pytest.approx(before.t2i_r5) and after.t2i_r10 == pytest.approx(before.t2i_r10)
    assert after.t2i_r1 >= before.t2i_r1 and after.i2t_r1 >= before.i2t_r1
    assert after.t2i_r1 > before.t2i_r1 and after.i2t_r1 > before.i2t_r1  # built so that it must rise
    n_img, n_txt = len(emb.ids), len(emb.captions)
    # each direction's pairs are distinct; a pair that is a candidate both ways is scored once
    assert max(n_img, n_txt) * k <= done.pairs < (n_img + n_txt) * k
    # BLIP's ordering (ITM + contrastive similarity): a slow per-query sort of the same sums gives the same order
    summed = rerank_embeddings(oracle, synth, "val", emb, k, batch_size=16, score="itm+itc")
    sims = emb.text @ emb.image.T  # [captions, images]
    for q in range(0, n_txt, 7):
        top = sims[q].topk(k).indices.tolist()
        itm = [0.9 if oracle.model.images_of(j) & oracle.model.owners_of(emb, q) else 0.1 for j in top]
        value = {j: m + (float(sims[q, j]) + 1) / 2 for j, m in zip(top, itm)}
        assert summed.t2i[q].tolist() == sorted(top, key=lambda j: -value[j])
        assert summed.t2i_score[q].tolist() == pytest.approx(sorted(value.values(), reverse=True), abs=1e-5)
    assert summed.metrics(emb.image, emb.text, emb.caption_image).t2i_r1 >= before.t2i_r1


# ---------------------------------------------------------------------------------------------- command lines
def _main(capsys, *args) -> tuple[int, str, str]:
    """``vlkit ARGS`` in this process (for the quick paths; the main ones run as real subprocesses)."""
    from vlkit.cli import main

    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def clip_dir(synth, tmp_path_factory):
    """An untrained tiny CLIP (no matching head) saved with a word tokenizer."""
    out = tmp_path_factory.mktemp("clip") / "clip"
    save_model(vlkit.create_model("clip-tiny").eval(), out, tokenizer=_tokenizer(synth))
    return out


@pytest.fixture(scope="module")
def albef_index(albef_run, synth, tmp_path_factory):
    index = tmp_path_factory.mktemp("albef_index") / "index"
    built = run_cli("index", albef_run, "--data", synth, "--out", index, "--split", "val", "--no-progress")
    assert built.returncode == 0, built.stderr
    return index


def test_eval_rerank_end_to_end(albef_run, synth, capsys):
    res = run_cli("eval", albef_run, "--data", synth, "--split", "val", "--rerank", "8", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    m = out["metrics"]
    assert out["rerank"] == 8 and out["rerank_pairs"] > 0 and "rerank_note" in out
    assert out["rerank_score"] == "itm+itc"  # the default: BLIP's sum of the two scores
    # before re-ranking: the metrics of the contrastive embeddings alone
    loaded = load_for_inference(albef_run)
    emb = compute_embeddings(loaded, synth, "val")
    before = retrieval_metrics(emb.image, emb.text, emb.caption_image).as_dict("val/synth/")
    for key, value in before.items():
        assert m[key + "_itc"] == pytest.approx(value)
    # only the order inside the top 8 changes: whether the answer is in the top 8 does not, and ranks beyond 8
    # stay, so recall@10 is the same
    for key in ("t2i_r10", "i2t_r10"):
        assert m[f"val/synth/{key}"] == pytest.approx(m[f"val/synth/{key}_itc"])
    # the re-ranked metrics are those of the model's own ITM scores plus the similarities on the top 8 (in
    # process, the same weights)
    done = rerank_embeddings(loaded, synth, "val", emb, 8, score="itm+itc")
    after = done.metrics(emb.image, emb.text, emb.caption_image).as_dict("val/synth/")
    assert all(m[key] == pytest.approx(value) for key, value in after.items())
    i, j = int(done.t2i[0, 0]), 0  # the first caption's best image after re-ranking, scored directly
    images = next(batch for start, batch in _images(loaded, synth, emb.ids) if start <= i < start + len(batch))
    tokens = loaded.tokenizer([emb.captions[j]])
    with torch.no_grad():
        direct = loaded.model.itm_scores(images[i % 16][None], tokens["input_ids"], tokens["attention_mask"])
    assert float(done.t2i_itm[0, 0]) == pytest.approx(float(direct), abs=1e-5)
    code, table, _ = _main(capsys, "eval", albef_run, "--data", synth, "--split", "val", "--rerank", "8")
    assert code == 0 and "text->image itc" in table and "re-ranked" in table


def _images(loaded, synth, ids):
    from vlkit.inference.rerank import split_images

    return split_images(loaded, synth, "val", ids, 16)


def test_eval_rerank_refuses_a_model_without_matching_head(clip_dir, synth, capsys):
    res = run_cli("eval", clip_dir, "--data", synth, "--split", "val", "--rerank", "4")
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1 and "matching head" in res.stderr, res.stderr
    code, _, err = _main(capsys, "eval", clip_dir, "--data", synth, "--task", "zeroshot", "--rerank", "4")
    assert code == 2 and "--task retrieval only" in err


def test_search_rerank_end_to_end(albef_run, albef_index, synth, capsys):
    from vlkit.data.dataset import LanceImageTextDataset
    from vlkit.data.store import open_dataset
    from vlkit.search.searcher import Searcher

    res = run_cli("search", albef_index, "a red circle", "--k", "3", "--rerank", "10", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["rerank"] == 10 and out["score"] == "itm" and out["images_from"] == "dataset"
    hits = out["results"]
    assert len(hits) == 3
    assert all(h["score"] == h["itm"] and 0 < h["itm"] < 1 for h in hits)
    # the best 3 of the 10 nearest by cosine, in ITM order, their cosine kept
    nearest = {h.id: h.score for h in Searcher(albef_index).search_text("a red circle", 10)}
    assert all(h["id"] in nearest and h["cosine"] == pytest.approx(nearest[h["id"]], abs=1e-5) for h in hits)
    assert [h["itm"] for h in hits] == sorted((h["itm"] for h in hits), reverse=True)
    # the ITM scores are the model's itm_scores on the dataset's images of all 10
    model = load_for_inference(albef_run)
    every = open_dataset(synth).to_table(columns=["id"]).column("id").to_pylist()
    ds = LanceImageTextDataset(synth, None, model.model.preprocess.image_transform(train=False), None,
                               captions="none")
    ds.offsets = [every.index(i) for i in nearest]
    images = ds.__getitems__(list(range(len(nearest))))["image"]
    tokens = model.tokenizer(["a red circle"] * len(nearest))
    with torch.no_grad():
        expected = model.model.itm_scores(images, tokens["input_ids"], tokens["attention_mask"])
    best = torch.sort(expected, descending=True, stable=True).indices[:3].tolist()
    assert [h["id"] for h in hits] == [list(nearest)[i] for i in best]
    assert [h["itm"] for h in hits] == pytest.approx(expected[best].tolist(), abs=1e-5)
    small = run_cli("search", albef_index, "a red circle", "--k", "5", "--rerank", "3")
    assert small.returncode == 2 and len(small.stderr.strip().splitlines()) == 1 and "--rerank" in small.stderr
    code, table, _ = _main(capsys, "search", albef_index, "a red circle", "--k", "2", "--rerank", "5")
    assert code == 0 and "ITM" in table and len(table.strip().splitlines()) == 4


def test_search_rerank_falls_back_to_thumbnails(albef_index, synth, tmp_path, capsys):
    import shutil

    copy = tmp_path / "index"
    shutil.copytree(albef_index, copy)
    meta = json.loads((copy / "index.json").read_text())
    meta["dataset"] = str(tmp_path / "gone.lance")
    (copy / "index.json").write_text(json.dumps(meta))
    code, out, err = _main(capsys, "search", copy, "a red circle", "--k", "2", "--rerank", "4", "--json")
    assert code == 0 and "thumbnails" in err and "gone.lance" in err
    assert json.loads(out)["images_from"] == "thumbnails"


def test_vilt_index_refused_and_eval_retrieval_scored_by_itm(vilt_dir, albef_index, synth, tmp_path, capsys):
    res = run_cli("index", vilt_dir, "--data", synth, "--out", tmp_path / "index", "--no-progress")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "fusion-only" in res.stderr and not (tmp_path / "index").exists()
    for args in (("embed", vilt_dir, "--data", synth, "--no-progress"),
                 ("eval", vilt_dir, "--data", synth, "--task", "zeroshot"),
                 ("eval", vilt_dir, "--data", synth, "--task", "linear-probe")):
        code, _, err = _main(capsys, *args)
        assert code == 2 and "fusion-only" in err and len(err.strip().splitlines()) == 1, err
    code, _, err = _main(capsys, "search", albef_index, "a red circle", "--model", vilt_dir)
    assert code == 2 and "does not embed" in err and len(err.strip().splitlines()) == 1, err
    code, _, err = _main(capsys, "eval", vilt_dir, "--data", synth, "--split", "val", "--rerank", "3")
    assert code == 2 and len(err.strip().splitlines()) == 1, err

    res = run_cli("eval", vilt_dir, "--data", synth, "--split", "val", "--limit", "12", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["ranking"] == "itm" and out["images"] == 12 and out["pairs"] == 12 * out["captions"]
    # the same recall from the ITM matrix scored image by image with itm_scores
    from vlkit.data.dataset import LanceImageTextDataset, make_loader

    loaded = load_for_inference(vilt_dir)
    ds = LanceImageTextDataset(synth, "val", loaded.model.preprocess.image_transform(train=False), None,
                               captions="all")
    batch = next(iter(make_loader(ds, 12, list(range(12)))))
    tokens = loaded.tokenizer(batch["text"])
    n_img, n_txt = 12, len(batch["text"])
    assert n_txt == out["captions"]
    with torch.no_grad():
        matrix = torch.stack([loaded.model.itm_scores(batch["image"][i:i + 1].expand(n_txt, -1, -1, -1),
                                                      tokens["input_ids"], tokens["attention_mask"])
                              for i in range(n_img)])  # [images, captions]
    owner = batch["caption_image"]
    t2i_ranks = [1 + int((matrix[:, j] > matrix[owner[j], j] + 1e-6).sum()) for j in range(n_txt)]
    for r in (1, 5):
        expected = 100.0 * sum(rank <= r for rank in t2i_ranks) / n_txt
        assert out["metrics"][f"val/synth/t2i_r{r}"] == pytest.approx(expected)


def test_itm_retrieval_refuses_too_many_pairs(vilt_dir, synth):
    from vlkit.errors import VlkitError
    from vlkit.inference.rerank import itm_retrieval

    with pytest.raises(VlkitError, match="--limit"):
        itm_retrieval(load_for_inference(vilt_dir), synth, "val", max_pairs=100)
