"""A map-style PyTorch dataset over a vlkit Lance dataset that reads a whole batch per call.

``__getitems__`` fetches a batch with one ``take`` for the columns and one ``read_blobs`` for the image
bytes (per-row reads are several times slower). The Lance dataset is opened lazily in each process, so
DataLoader workers (forked or spawned) each hold their own handle and read only the rows they are given.

Every random choice for a sample (which caption, crop, flip) comes from a generator seeded by
``(seed, epoch, row)``: the same sample gets the same augmentation whichever worker or rank loads it,
and a resumed run sees exactly the data an uninterrupted run would. :func:`make_loader` sends the epoch
with every batch of indices, so persistent workers follow ``set_epoch`` made in the main process.

Workers are started with ``forkserver`` (or ``spawn``), never ``fork``: the parent has already used Lance,
whose background threads do not survive a fork. The pixel limit in force when the workers start
(:func:`vlkit.data.decode.max_pixels`) travels with the dataset, so workers decode with the same bound.

An image that does not decode (corrupt, or over the pixel limit) stops the batch with a one-line
:class:`~vlkit.data.rows.RowError` naming the dataset and the row id; so does a data file missing from the
dataset's ``data/`` folder, naming the file.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Sequence

import lance
import torch

from vlkit.data.decode import ImageDecodeError, max_pixels, set_max_pixels
from vlkit.data.rows import image_error, reading
from vlkit.data.store import OpenedDataset, open_dataset, split_indices
from vlkit.data.text import TextTokenizer
from vlkit.data.transforms import ImageError, ImageTransform, mentions_side
from vlkit.errors import DataError

CaptionMode = Literal["random", "first", "longest", "all", "none"]


class LanceImageTextDataset(torch.utils.data.Dataset):
    """Images (and captions, labels) of one split of a Lance dataset, batched at read time.

    Args:
        path: the Lance dataset (a path, or an :class:`~vlkit.data.store.OpenedDataset` used as it is).
        split: the split to read (``None``: every row).
        transform: decodes and augments images; ``None`` gives the raw encoded bytes.
        tokenizer: if given, batches carry ``input_ids`` and ``attention_mask``.
        captions: ``random`` (one caption per image, a new draw every epoch: training), ``first``, ``longest``
            (the caption with the most characters, the first of equally long ones), ``all``
            (every caption, flattened, with ``caption_image`` mapping each to its image: evaluation) or
            ``none``.
        seed: seed of the per-sample random choices.
        normalize: return float images normalised with the transform's mean/std (else uint8).
        columns: further columns to return as lists (e.g. ``["questions", "answers"]``).
        require: list columns that must be non-empty for a row to be used (e.g. ``["questions"]`` for VQA).
        thumbnails: also return a JPEG thumbnail of each image with this longer side (``thumbnail``, a list of
            bytes), made from the same decode as the image (an evaluation transform only).
        pairs: also return each row's second image (``image2``, as ``image``: NLVR2's right image), transformed
            with the same rules (no flip when the text names a side); only rows that have one are used.

    Example:
        >>> ds = LanceImageTextDataset("coco.lance", "train", ImageTransform(224, train=True), tok)
        >>> loader = make_loader(ds, batch_size=64, sampler=DistributedEpochSampler(len(ds)))
    """

    def __init__(
        self,
        path: str | Path,
        split: str | None = "train",
        transform: ImageTransform | None = None,
        tokenizer: TextTokenizer | None = None,
        captions: CaptionMode = "random",
        seed: int = 0,
        normalize: bool = True,
        columns: Sequence[str] = (),
        require: Sequence[str] = (),
        thumbnails: int | None = None,
        pairs: bool = False,
    ):
        if captions not in ("random", "first", "longest", "all", "none"):
            raise DataError(f"captions must be random, first, longest, all or none, not '{captions}'")
        self.path = str(path)
        self.split = split
        self.transform = transform
        self.tokenizer = tokenizer
        self.captions = captions
        self.seed = seed
        self.normalize = normalize
        self.thumbnails = thumbnails
        self.pairs = pairs
        if thumbnails is not None and (transform is None or transform.train or thumbnails < 1):
            raise DataError("thumbnails need an evaluation transform and a positive size")
        self.epoch = 0
        ds = open_dataset(path)
        self._handle = path if isinstance(path, OpenedDataset) else None
        with reading(self.path):
            self._check_rows(ds, columns, require)
        self._handle = None  # not carried into worker processes
        # a handle opened by the command is used in this process rather than opened again
        self._ds: lance.LanceDataset | None = ds if isinstance(path, OpenedDataset) else None
        self._pid = os.getpid() if self._ds is not None else -1

    def _check_rows(self, ds: lance.LanceDataset, columns: Sequence[str], require: Sequence[str]) -> None:
        """Find the rows of the split (with every ``require`` column non-empty) and check the columns."""
        path, split, captions = self.path, self.split, self.captions
        missing = [c for c in columns if c not in ds.schema.names]
        if missing:
            raise DataError(f"{path}: no column(s) {missing}; columns are {ds.schema.names}")
        self.columns = list(columns)
        self.offsets: list[int] = self._handle.split(split) if self._handle is not None else split_indices(ds, split)
        for name in require:
            if name not in ds.schema.names:
                raise DataError(f"{path}: no column '{name}'; columns are {ds.schema.names}")
            values = ds.to_table(columns=[name]).column(name)
            self.offsets = [i for i in self.offsets if values[i].is_valid and len(values[i]) > 0]
            if not self.offsets:
                raise DataError(f"{path}: no rows of split '{split}' have {name}")
        if self.pairs:
            if "image2" not in ds.schema.names:
                raise DataError(f"{path}: no second images (column 'image2'); pairs need a dataset of image "
                                "pairs, e.g. one ingested from NLVR2")
            second = ds.to_table(columns=["image2"]).column("image2")  # blob descriptions, not the bytes
            self.offsets = [i for i in self.offsets if second[i].is_valid]
            if not self.offsets:
                raise DataError(f"{path}: no rows of split '{split}' have a second image")
        if captions != "none":
            counts = ds.to_table(columns=["captions"]).column("captions")
            lengths = [len(counts[i]) if counts[i].is_valid else 0 for i in self.offsets]
            empty = sum(1 for n in lengths if n == 0)
            if empty == len(lengths):
                raise DataError(f"{path}: split '{split}' has no captions (use captions='none' for labels)")

    def __len__(self) -> int:
        return len(self.offsets)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random captions and augmentations the next batches use."""
        self.epoch = epoch

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_ds"], state["_pid"] = None, -1  # each process opens its own handle
        state["_max_pixels"] = max_pixels()  # a worker decodes with the limit of the process that made it
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        limit = state.pop("_max_pixels", None)
        self.__dict__.update(state)
        if limit is not None and limit != max_pixels():
            set_max_pixels(limit)

    def _dataset(self) -> lance.LanceDataset:
        if self._ds is None or self._pid != os.getpid():
            self._ds = lance.dataset(self.path)
            self._pid = os.getpid()
        return self._ds

    def _rng(self, offset: int) -> random.Random:
        return random.Random(f"{self.seed}:{self.epoch}:{offset}")

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])

    def __getitems__(self, indices: Sequence[int] | EpochBatch) -> dict[str, Any]:
        """One batch: ``image`` [batch, 3, H, W], ``text``, ``input_ids``/``attention_mask``, ``label``,
        ``id``, ``index`` (position in this dataset) and the extra columns.

        ``indices`` is a list of positions, or an :class:`EpochBatch` that also names the epoch."""
        if isinstance(indices, EpochBatch):
            self.epoch, indices = indices.epoch, indices.indices
        offsets = [self.offsets[i] for i in indices]
        names = ["id", "captions", "label", *self.columns]
        with reading(self.path):
            ds = self._dataset()
            rows = ds.take(offsets, columns=names).to_pydict()
            blobs = ds.read_blobs("image", indices=offsets, preserve_order=True)
            seconds = ds.read_blobs("image2", indices=offsets, preserve_order=True) if self.pairs else None
        batch: dict[str, Any] = {
            "index": torch.tensor(list(indices), dtype=torch.long),
            "id": rows["id"],
        }
        texts, caption_image, images, thumbs, images2 = [], [], [], [], []
        for pos, (offset, caps, (_, data)) in enumerate(zip(offsets, rows["captions"], blobs)):
            rng = self._rng(offset)
            caps = caps or []
            allow_flip = True
            if self.captions == "random" and caps:
                texts.append(caps[rng.randrange(len(caps))])
                allow_flip = not mentions_side(texts[-1])
            elif self.captions in ("first", "longest") and caps:
                texts.append(caps[0] if self.captions == "first" else max(caps, key=len))  # max keeps the first tie
                allow_flip = not mentions_side(texts[-1])
            elif self.captions == "all":
                texts.extend(caps)
                caption_image.extend([pos] * len(caps))
                allow_flip = not any(mentions_side(c) for c in caps)
            if self.thumbnails is not None:
                image, thumb = self._image(data, rng, allow_flip, rows["id"][pos], thumbnail=True)
                images.append(image)
                thumbs.append(thumb)
            else:
                images.append(data if self.transform is None else self._image(data, rng, allow_flip, rows["id"][pos]))
            if seconds is not None:  # the second image draws its augmentation after the first, from the same rng
                data2 = seconds[pos][1]
                images2.append(data2 if self.transform is None
                               else self._image(data2, rng, allow_flip, rows["id"][pos]))
        batch["image"] = images if self.transform is None else self._stack(images)
        if seconds is not None:
            batch["image2"] = images2 if self.transform is None else self._stack(images2)
        if self.thumbnails is not None:
            batch["thumbnail"] = thumbs
        if self.captions != "none":
            batch["text"] = texts
            if self.captions == "all":
                batch["caption_image"] = torch.tensor(caption_image, dtype=torch.long)
            if self.tokenizer is not None:
                batch.update(self.tokenizer(texts))
        labels = rows["label"]
        if all(label is not None for label in labels):
            batch["label"] = torch.tensor(labels, dtype=torch.long)
        for name in self.columns:
            batch[name] = rows[name]
        return batch

    def _image(self, data: bytes, rng: random.Random, allow_flip: bool, row_id: str, thumbnail: bool = False):
        """Decode and transform one image (and its thumbnail); a bad image raises a RowError naming the row."""
        try:
            if thumbnail:
                return self.transform.with_thumbnail(data, self.thumbnails)
            return self.transform(data, rng, allow_flip)
        except (ImageError, ImageDecodeError) as exc:
            raise image_error(self.path, row_id, exc) from None

    def _stack(self, images: list[torch.Tensor]) -> torch.Tensor:
        stacked = torch.stack(images)  # [batch, 3, H, W] uint8
        return self.transform.normalize(stacked) if self.normalize else stacked


@dataclass(frozen=True)
class EpochBatch:
    """Positions of one batch and the epoch they belong to (what the loader sends to its workers)."""

    epoch: int
    indices: list[int]


class EpochBatchSampler(torch.utils.data.Sampler[EpochBatch]):
    """Groups a sampler's indices into batches tagged with the dataset's current epoch."""

    def __init__(self, sampler: Iterable[int], batch_size: int, drop_last: bool, dataset: LanceImageTextDataset):
        if batch_size < 1:
            raise DataError(f"batch_size must be at least 1, got {batch_size}")
        self.sampler, self.batch_size, self.drop_last, self.dataset = sampler, batch_size, drop_last, dataset

    def __iter__(self) -> Iterator[EpochBatch]:
        epoch, batch = self.dataset.epoch, []
        for index in self.sampler:
            batch.append(index)
            if len(batch) == self.batch_size:
                yield EpochBatch(epoch, batch)
                batch = []
        if batch and not self.drop_last:
            yield EpochBatch(epoch, batch)

    def __len__(self) -> int:
        n = len(self.sampler)  # type: ignore[arg-type]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)


def _keep_batch(batch: Any) -> Any:
    return batch


def make_loader(
    dataset: LanceImageTextDataset,
    batch_size: int,
    sampler: torch.utils.data.Sampler[int] | None = None,
    num_workers: int = 0,
    drop_last: bool = False,
    pin_memory: bool = False,
    prefetch_factor: int | None = None,
    multiprocessing_context: str | None = None,
    persistent_workers: bool = True,
    seed: int = 0,
) -> torch.utils.data.DataLoader:
    """A DataLoader whose workers fetch whole batches through ``__getitems__`` (no per-row collation).

    Args:
        dataset: the Lance dataset to read.
        batch_size: samples per batch.
        sampler: order of the samples (default: dataset order), e.g. a ``DistributedEpochSampler``.
        num_workers: worker processes (0: read in this process).
        drop_last: drop a last, smaller batch.
        pin_memory: pin batches for faster copies to a GPU.
        prefetch_factor: batches each worker reads ahead.
        multiprocessing_context: ``forkserver`` (default where available) or ``spawn``; ``fork`` is refused.
        persistent_workers: keep workers across epochs (they still follow ``dataset.set_epoch``).
        seed: seed of the loader's own generator, so starting an iteration never draws from (and so never
            shifts) the global torch random state: a run resumed mid-epoch keeps the same random stream.
    """
    if num_workers < 0:
        raise DataError(f"the number of loader workers must be 0 or more, got {num_workers}")
    if multiprocessing_context == "fork":
        raise DataError("fork-started workers can hang on Lance's threads; use forkserver or spawn")
    if num_workers > 0 and multiprocessing_context is None:
        multiprocessing_context = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    batches = EpochBatchSampler(
        sampler if sampler is not None else range(len(dataset)), batch_size, drop_last, dataset
    )
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=_keep_batch,
        pin_memory=pin_memory,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        persistent_workers=persistent_workers and num_workers > 0,
        multiprocessing_context=multiprocessing_context if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),
    )
