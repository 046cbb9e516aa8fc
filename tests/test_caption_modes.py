"""The ``longest`` caption mode: the caption with the most characters, the first of equally long ones."""

from __future__ import annotations

import json

import pytest

from vlkit.data.dataset import LanceImageTextDataset
from vlkit.data.ingest import ingest
from vlkit.errors import DataError

from .conftest import jpeg_bytes

CAPTIONS = [
    ["a dog", "a dog on the grass", "dog"],  # longest in the middle
    ["same length A", "same length B", "short"],  # a tie: the first of the two
    ["only one"],
    ["tiny", "a much longer caption than the first one"],  # longest last
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("longest")
    lines = []
    for i, caps in enumerate(CAPTIONS):
        (root / f"{i}.jpg").write_bytes(jpeg_bytes((40 * i, 80, 120)))
        lines.append(json.dumps({"image": f"{i}.jpg", "id": f"img{i}", "text": caps}))
    (root / "d.jsonl").write_text("\n".join(lines) + "\n")
    ingest([root / "d.jsonl"], root / "d.lance", split="train", progress=False)
    return root / "d.lance"


def test_longest_picks_the_longest_caption_and_the_first_on_ties(data):
    ds = LanceImageTextDataset(data, "train", None, captions="longest")
    batch = ds.__getitems__(list(range(len(ds))))
    by_id = {row_id: text for row_id, text in zip(batch["id"], batch["text"])}
    for i, caps in enumerate(CAPTIONS):
        # reference: a plain loop over the captions, keeping the first strictly longer one
        best = caps[0]
        for c in caps[1:]:
            if len(c) > len(best):
                best = c
        assert by_id[f"img{i}"] == best
    assert by_id["img1"] == "same length A"
    first = LanceImageTextDataset(data, "train", None, captions="first").__getitems__(list(range(len(ds))))
    assert first["text"] != batch["text"]  # the mode is not ignored: "first" gives other captions here


def test_longest_is_the_same_every_epoch_and_unknown_modes_are_refused(data):
    ds = LanceImageTextDataset(data, "train", None, captions="longest")
    texts = ds.__getitems__([0, 1, 2, 3])["text"]
    ds.set_epoch(5)
    assert ds.__getitems__([0, 1, 2, 3])["text"] == texts
    with pytest.raises(DataError, match="longest"):
        LanceImageTextDataset(data, "train", None, captions="shortest")


@pytest.mark.parametrize("mode", ["longest", "first"])
def test_a_task_trains_on_the_caption_mode_its_config_names(data, mode):
    """``tasks: [{name: retrieval, captions: longest}]`` reaches the training loader (and ``first`` differs)."""
    from vlkit.config.load import load_config
    from vlkit.models.registry import create_model
    from vlkit.tasks import build_task
    from vlkit.train.distributed import DistInfo
    from vlkit.train.model_setup import build_model_and_tokenizer

    cfg = load_config(None, [f"datasets={{d: {{path: {data}, val_split: null}}}}",
                             f"tasks=[{{name: retrieval, dataset: d, captions: {mode}}}]", "model.name=clip-tiny"])
    model, tokenizer = build_model_and_tokenizer(cfg, DistInfo())
    task = build_task("retrieval", "d", cfg.tasks[0], cfg.datasets["d"], tokenizer, model.preprocess, DistInfo())
    batch = next(iter(task.train_loader(4)))
    pick = (lambda caps: max(caps, key=len)) if mode == "longest" else (lambda caps: caps[0])
    want = {f"img{i}": pick(caps) for i, caps in enumerate(CAPTIONS)}
    assert {i: t for i, t in zip(batch["id"], batch["text"])} == {i: want[i] for i in batch["id"]}


def test_the_caption_mode_key_is_checked(data):
    from vlkit.config.load import load_config
    from vlkit.config.typeinfo import ConfigError

    base = [f"datasets={{d: {{path: {data}}}}}", "model.name=clip-tiny"]
    with pytest.raises(ConfigError, match=r"tasks\.0\.captions: 'shortest' is not one of random, first, longest"):
        load_config(None, [*base, "tasks=[{name: retrieval, dataset: d, captions: shortest}]"])
    with pytest.raises(ConfigError, match=r"tasks\.0\.captions: only the retrieval, itm, captioning tasks read it"):
        load_config(None, [*base, "tasks=[{name: vqa, dataset: d, captions: longest}]"])
