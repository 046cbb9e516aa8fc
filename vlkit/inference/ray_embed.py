"""``vlkit embed --engine ray``: embeddings computed by Ray actors that hold the model; written once here.

The rows of the dataset are cut into parts; a pool of Ray Data actors, each holding the model loaded once
(on its own GPU with ``gpus_per_worker``), runs :func:`vlkit.inference.embed.compute_embeddings` over one part
at a time and hands back its embeddings. The driver puts the parts back in dataset order and gives them to
:func:`vlkit.inference.embed.write_embeddings`, so the columns are written as the local engine writes them: in
one commit, under the dataset's write lock. A failed actor writes nothing.

Workers need vlkit installed and the run and the dataset at the same paths.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from vlkit.errors import VlkitError
from vlkit.inference.embed import Embeddings


MAX_RESTARTS = 2
"""Times a lost actor is started again (and its part run again)."""


class _OnDevice(nn.Module):
    """A model on a GPU behind the CPU interface that :func:`compute_embeddings` expects: inputs are moved to
    the device, embeddings come back to the CPU."""

    def __init__(self, model: nn.Module, device: torch.device):
        super().__init__()
        self.inner = model.to(device)
        self.device = device

    @property
    def preprocess(self) -> Any:
        return self.inner.preprocess

    def encode_image(self, images: Tensor) -> Tensor:
        return self.inner.encode_image(images.to(self.device)).cpu()  # [batch, dim]

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.inner.encode_text(input_ids.to(self.device), attention_mask.to(self.device)).cpu()


class _Embedder:
    """The Ray Data actor: loads the model once, then embeds one part of the rows per call."""

    def __init__(self, run: str, dataset: str, batch_size: int, gpu: bool, num_workers: int,
                 precision: str | None = None):
        from vlkit.inference.loading import load_for_inference

        self.loaded = load_for_inference(run)
        if precision is not None:
            self.loaded = dataclasses.replace(self.loaded, precision=precision)
        if gpu and torch.cuda.is_available():
            self.loaded = dataclasses.replace(self.loaded, model=_OnDevice(self.loaded.model, torch.device("cuda")))
        self.dataset = dataset
        self.batch_size = batch_size
        self.num_workers = num_workers

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        from vlkit.inference.embed import compute_embeddings

        rows = json.loads(batch["rows"][0])
        emb = compute_embeddings(self.loaded, self.dataset, None, batch_size=self.batch_size, rows=rows,
                                 num_workers=self.num_workers)
        return {"part": [int(batch["part"][0])], "ids": [json.dumps(emb.ids)], "dim": [int(emb.image.shape[1])],
                "image": [emb.image.numpy().astype(np.float32).tobytes()],
                "text": [emb.text.numpy().astype(np.float32).tobytes()],
                "caption_image": [emb.caption_image.numpy().astype(np.int64).tobytes()],
                "captions": [json.dumps(emb.captions)], "precision": [emb.precision]}


def part_rows(rows: int, workers: int, batch_size: int) -> int:
    """Rows per part: about four parts per worker (so that a slow worker does not hold up the end), rounded up
    to whole batches, so that the batches are those the local engine runs."""
    return -(-max(1, -(-rows // (4 * workers))) // batch_size) * batch_size


def compute_embeddings_ray(run: str | Path, dataset: str | Path, *, batch_size: int = 64,
                           workers: int | None = None, gpus_per_worker: float = 0, num_workers: int = 0,
                           precision: str | None = None, address: str | None = None) -> Embeddings:
    """Embed every image and caption of ``dataset`` on Ray actors; the same :class:`Embeddings`, in dataset
    order, as :func:`vlkit.inference.embed.compute_embeddings` over every row.

    Args:
        run: the run directory, model directory or checkpoint each actor loads.
        dataset: the Lance dataset.
        batch_size: images per forward pass.
        workers: actors (default: the cluster's GPUs divided by ``gpus_per_worker``, else its CPUs).
        gpus_per_worker: GPUs each actor holds (0: CPU actors).
        num_workers: decoding processes of each actor (a GPU actor needs several to keep its GPU busy); an
            actor reserves ``max(1, num_workers)`` CPUs.
        precision: what the actors compute in (as for ``compute_embeddings``; ``None``: the model's default).
        address: the cluster to join (default: ``RAY_ADDRESS``, else a local runtime).

    Raises:
        VlkitError: Ray is missing, the cluster has too few GPUs, or an actor failed (nothing is written).
        DataError: the dataset has no rows.
    """
    from vlkit.data.store import open_dataset
    from vlkit.errors import DataError
    from vlkit.utils.ray_runtime import actor_pool, cluster_cpus, failure_line, map_batches, ray_session

    if workers is not None and workers < 1:
        raise VlkitError("--ray-workers must be at least 1")
    if gpus_per_worker < 0:
        raise VlkitError("--gpus-per-worker must be at least 0")
    if num_workers < 0:
        raise VlkitError("--workers must be at least 0")
    total = open_dataset(dataset).count_rows()
    if total == 0:
        raise DataError(f"{dataset}: no rows")
    with ray_session(address) as ray:
        if gpus_per_worker:
            gpus = ray.cluster_resources().get("GPU", 0)
            if gpus < gpus_per_worker:
                raise VlkitError(f"--gpus-per-worker {gpus_per_worker}: the Ray cluster has {gpus:g} GPUs")
            workers = workers or max(1, int(gpus // gpus_per_worker))
        workers = workers or max(1, cluster_cpus(ray) // max(1, num_workers))
        size = part_rows(total, workers, batch_size)
        items = [{"part": i, "rows": json.dumps(list(range(start, min(start + size, total))))}
                 for i, start in enumerate(range(0, total, size))]
        data = ray.data.from_items(items, override_num_blocks=len(items))
        try:
            parts = map_batches(
                data, _Embedder, retries=MAX_RESTARTS, actors=True, batch_size=1, num_cpus=max(1, num_workers), num_gpus=gpus_per_worker or None,
                fn_constructor_kwargs=dict(run=str(run), dataset=str(dataset), batch_size=batch_size,
                                           gpu=bool(gpus_per_worker), num_workers=num_workers,
                                           precision=precision),
                compute=actor_pool(ray, min(workers, len(items)))).take_all()
        except Exception as exc:  # noqa: BLE001  (an actor failed or was lost: one line, nothing written)
            raise VlkitError(f"{dataset}: a Ray embedding worker failed ({failure_line(exc)}); "
                             "nothing was written") from None
    return _gather(sorted(parts, key=lambda p: int(p["part"])))


def _gather(parts: list[dict[str, Any]]) -> Embeddings:
    """The parts' embeddings as one :class:`Embeddings`, captions pointing at their images' new positions."""
    ids: list[str] = []
    captions: list[str] = []
    images, texts, owners = [], [], []
    for part in parts:
        dim = int(part["dim"])
        owners.append(np.frombuffer(part["caption_image"], np.int64) + len(ids))
        ids += json.loads(part["ids"])
        captions += json.loads(part["captions"])
        images.append(np.frombuffer(part["image"], np.float32).reshape(-1, dim))
        texts.append(np.frombuffer(part["text"], np.float32).reshape(-1, dim))
    emb = Embeddings(ids=ids, image=torch.from_numpy(np.concatenate(images)),
                     text=torch.from_numpy(np.concatenate(texts)),
                     caption_image=torch.from_numpy(np.concatenate(owners)), captions=captions)
    precisions = sorted({str(part["precision"]) for part in parts})
    if precisions:  # what the actors computed in, for the columns' metadata
        emb.precision = ",".join(precisions)
    return emb
