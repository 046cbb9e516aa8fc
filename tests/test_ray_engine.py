"""The Ray engine of ``vlkit ingest`` and ``vlkit embed``, on one local Ray runtime of 2 workers.

Each engine's output is checked against the local engine's on the same input: the same set of rows with the
same content, the same report, the same embeddings. A failure on a worker must leave the dataset as it was.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import tarfile

import lance
import pytest
import torch

from tests.conftest import ROOT, jpeg_bytes, run_cli
from vlkit.errors import DataError

ray = pytest.importorskip("ray", reason="the 'ray' extra is not installed")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", autouse=True)
def ray_runtime():
    """One local Ray runtime with 2 CPUs for the whole module (starting Ray takes seconds)."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


def _shard(path, n: int, first: int = 0) -> None:
    """A WebDataset shard of ``n`` JPEGs with captions (its images are read from the tar by the workers)."""
    with tarfile.open(path, "w") as tar:
        for i in range(first, first + n):
            for name, data in ((f"{i:06d}.jpg", jpeg_bytes((10 * i % 255, 80, 160))),
                               (f"{i:06d}.txt", f"shard image {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A JSONL source of 40 synthetic images plus a broken and a missing image, and a 6-image tar shard."""
    from vlkit.data.synth import generate

    root = tmp_path_factory.mktemp("ray_src")
    manifest = generate(root / "synth", 40, seed=5)
    (manifest.parent / "images" / "broken.png").write_bytes(b"\x89PNG not really")
    with open(manifest, "a") as fh:
        fh.write(json.dumps({"image": "images/broken.png", "text": ["a broken image"]}) + "\n")
        fh.write(json.dumps({"image": "images/missing.png", "text": ["a missing image"]}) + "\n")
    _shard(root / "extra.tar", 6)
    return manifest, root / "extra.tar"


def _rows(path) -> dict[str, dict]:
    """id -> the row's every column, with the image's stored bytes."""
    ds = lance.dataset(str(path))
    rows = ds.to_table().drop_columns(["image"]).to_pylist()
    blobs = ds.read_blobs("image", indices=list(range(len(rows))), preserve_order=True)
    for row, (_, data) in zip(rows, blobs):
        row["image"] = data
    return {r["id"]: r for r in rows}


def _files(path) -> set[str]:
    return {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def both(sources, tmp_path_factory):
    """The JSONL source ingested by each engine: ``(local path, local report, ray path, ray report)``."""
    from vlkit.data.ingest import ingest

    manifest, _ = sources
    root = tmp_path_factory.mktemp("ray_ingest")
    local = ingest([manifest], root / "local.lance", fragment_rows=8, progress=False)
    remote = ingest([manifest], root / "ray.lance", fragment_rows=8, progress=False, engine="ray", ray_workers=2)
    return root / "local.lance", local, root / "ray.lance", remote


def test_ray_ingest_gives_the_local_rows(both):
    local_path, local, ray_path, remote = both
    rows = _rows(ray_path)
    assert rows == _rows(local_path)  # ids, captions, splits, labels, questions, sources and image bytes
    assert len(rows) == 40 and {r["split"] for r in rows.values()} == {"train", "val", "test"}
    assert remote.rows_added == local.rows_added == 40
    assert sorted(map(str, remote.problems)) == sorted(map(str, local.problems))
    assert {p.file.rsplit("/", 1)[-1] for p in remote.problems} == {"broken.png", "missing.png"}
    ds = lance.dataset(str(ray_path))
    assert len(ds.get_fragments()) == 5  # one per chunk of 8 records: the chunks were written apart
    local_ds = lance.dataset(str(local_path))
    assert ds.version == local_ds.version  # one data commit, then the same index refreshes
    assert {i.name for i in ds.describe_indices()} == {i.name for i in local_ds.describe_indices()}


def test_ray_append_skips_stored_ids_like_local(both, sources, tmp_path):
    from vlkit.data.ingest import ingest

    local_path, _, ray_path, _ = both
    manifest, shard = sources
    local_copy, ray_copy = tmp_path / "local.lance", tmp_path / "ray.lance"
    shutil.copytree(local_path, local_copy)
    shutil.copytree(ray_path, ray_copy)
    local = ingest([manifest, shard], local_copy, progress=False)
    remote = ingest([manifest, shard], ray_copy, progress=False, engine="ray", ray_workers=2)
    assert remote.rows_existing == local.rows_existing == 40
    assert remote.rows_added == local.rows_added == 6
    rows = _rows(ray_copy)
    assert rows == _rows(local_copy) and len(rows) == 46
    assert rows["000003"]["captions"] == ["shard image 3"]


def test_strict_problem_on_a_worker_commits_nothing(both, sources, tmp_path):
    from vlkit.data.ingest import ingest

    _, _, ray_path, _ = both
    manifest, shard = sources
    target = tmp_path / "ray.lance"
    shutil.copytree(ray_path, target)
    version = lance.dataset(str(target)).version
    with pytest.raises(DataError, match="--strict: 2 problems found, nothing written"):
        ingest([manifest, shard], target, strict=True, progress=False, engine="ray", ray_workers=2)
    assert lance.dataset(str(target)).version == version
    assert _files(target / "data") == _files(ray_path / "data")


def test_failed_worker_leaves_the_previous_version(both, sources, tmp_path, monkeypatch):
    from vlkit.data import ingest as ingest_mod
    from vlkit.data.records import Record

    _, _, ray_path, _ = both
    _, shard = sources
    target = tmp_path / "ray.lance"
    shutil.copytree(ray_path, target)
    version = lance.dataset(str(target)).version
    collect = ingest_mod.collect_records

    def with_a_failing_record(*args, **kwargs):
        def fail(max_bytes: int) -> bytes:
            raise RuntimeError("disk went away")  # raised on the worker, not an image problem

        records = collect(*args, **kwargs)
        return records + [Record("doomed", shard, "test", captions=["x"], image_data=fail)]

    monkeypatch.setattr(ingest_mod, "collect_records", with_a_failing_record)
    with pytest.raises(DataError, match="a Ray worker failed .*disk went away.*stays at version"):
        ingest_mod.ingest([shard], target, fragment_rows=2, progress=False, engine="ray", ray_workers=2)
    assert lance.dataset(str(target)).version == version
    assert _files(target / "data") == _files(ray_path / "data")  # the other workers' fragments were deleted
    fresh = tmp_path / "new.lance"
    with pytest.raises(DataError, match="was not created"):
        ingest_mod.ingest([shard], fresh, fragment_rows=2, progress=False, engine="ray", ray_workers=2)
    assert not (fresh / "data").exists() and not (fresh / "_versions").exists()


def test_lost_worker_creates_no_dataset(sources, tmp_path, monkeypatch):
    """A record that kills its worker process (as a crash in a decoder would): Ray retries the chunk, then the
    ingest fails; the fragments the other workers wrote are deleted and no dataset is left."""
    from vlkit.data import ingest as ingest_mod
    from vlkit.data.records import Record

    _, shard = sources
    collect = ingest_mod.collect_records

    def with_a_fatal_record(*args, **kwargs):
        def die(max_bytes: int) -> bytes:
            os._exit(3)

        return collect(*args, **kwargs) + [Record("fatal", shard, "test", captions=["x"], image_data=die)]

    monkeypatch.setattr(ingest_mod, "collect_records", with_a_fatal_record)
    out = tmp_path / "new.lance"
    with pytest.raises(DataError, match="a Ray worker failed .*WorkerCrashedError.*was not created"):
        ingest_mod.ingest([shard], out, fragment_rows=2, progress=False, engine="ray", ray_workers=2)
    assert not out.exists()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A saved clip-tiny (untrained, word vocabulary) that every actor loads."""
    import vlkit
    from vlkit.data.text import build_word_tokenizer
    from vlkit.models.io import save_model

    root = tmp_path_factory.mktemp("ray_model")
    torch.manual_seed(0)
    tokenizer = build_word_tokenizer(["an image of a red square", "shard image"], max_length=12)
    model = vlkit.create_model("clip-tiny", context_length=12, eos_token_id=tokenizer.token_id("[SEP]")).eval()
    save_model(model, root / "model", tokenizer)
    return root / "model"


def test_ray_embed_gives_the_local_embeddings(both, model_dir, tmp_path):
    from vlkit.cli import main
    from vlkit.inference.embed import IMAGE_COLUMN, TEXT_COLUMN, compute_embeddings
    from vlkit.inference.loading import load_for_inference
    from vlkit.inference.ray_embed import compute_embeddings_ray

    _, _, ray_path, _ = both
    loaded = load_for_inference(model_dir)
    local = compute_embeddings(loaded, ray_path, None, batch_size=4, precision="fp32")
    remote = compute_embeddings_ray(model_dir, ray_path, batch_size=4, workers=2,  # 5 parts of 2 batches
                                    precision="fp32")
    assert remote.precision == "fp32"
    assert remote.ids == local.ids and remote.captions == local.captions
    assert torch.equal(remote.caption_image, local.caption_image)
    torch.testing.assert_close(remote.image, local.image, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(remote.text, local.text, atol=1e-5, rtol=1e-5)

    target = tmp_path / "ray.lance"
    shutil.copytree(ray_path, target)
    version = lance.dataset(str(target)).version
    assert main(["embed", str(model_dir), "--data", str(target), "--engine", "ray", "--ray-workers", "2",
                 "--batch-size", "8", "--precision", "bf16", "--no-progress"]) == 0
    ds = lance.dataset(str(target))
    assert ds.version == version + 1  # the columns in one commit
    assert ds.schema.field(IMAGE_COLUMN).metadata[b"vlkit.precision"] == b"bf16"  # --precision reached the actors
    table = ds.to_table(columns=["id", IMAGE_COLUMN, TEXT_COLUMN])
    stored = dict(zip(table.column("id").to_pylist(), table.column(IMAGE_COLUMN).to_pylist()))
    bf16 = compute_embeddings(loaded, ray_path, None, batch_size=8, precision="bf16")
    expected = dict(zip(bf16.ids, bf16.image.tolist()))
    assert stored.keys() == expected.keys()
    for key, vector in expected.items():
        torch.testing.assert_close(torch.tensor(stored[key]), torch.tensor(vector), atol=1e-5, rtol=1e-5)


def test_failed_actor_is_one_line(both, tmp_path):
    from vlkit.errors import VlkitError
    from vlkit.inference.ray_embed import compute_embeddings_ray

    _, _, ray_path, _ = both
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{not json")
    with pytest.raises(VlkitError) as info:
        compute_embeddings_ray(tmp_path / "model", ray_path, batch_size=8, workers=1)
    message = str(info.value)
    assert len(message.splitlines()) == 1 and "\x1b" not in message
    assert message.startswith(f"{ray_path}: a Ray embedding worker failed ({tmp_path / 'model' / 'config.json'}: "
                              "invalid JSON")


def test_missing_ray_is_one_line(sources, tmp_path):
    fake = tmp_path / "fake"
    (fake / "ray").mkdir(parents=True)
    (fake / "ray" / "__init__.py").write_text("raise ImportError('no ray here')\n")
    manifest, _ = sources
    env_path = os.pathsep.join([str(fake), str(ROOT)])
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = env_path
    try:
        proc = run_cli("ingest", manifest, "--out", tmp_path / "x.lance", "--engine", "ray")
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "vlkit: error: --engine ray needs Ray Data, which is not installed: pip install 'vlkit[ray]'"]
    assert not (tmp_path / "x.lance").exists()
    assert sys.modules.get("ray") is ray  # this process's Ray was left alone
