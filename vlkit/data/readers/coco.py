"""COCO captions JSON (``images`` + ``annotations``), and the Karpathy split file
(``images`` with ``filename``, ``split`` and ``sentences``)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from vlkit.data.records import Problem, Record
from vlkit.errors import DataError

from .common import bad_text, confinement_root, image_id, images_root_for, load_json

KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}


def read_coco(path: Path, images_root: Path | None, problems: list[Problem]) -> Iterator[Record]:
    data = load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{path}: not a COCO captions file (no 'images' list)")
    images = data["images"]
    if images and isinstance(images[0], dict) and "sentences" in images[0]:
        yield from _read_karpathy(path, images, images_root, problems)
        return
    annotations = data.get("annotations")
    if not isinstance(annotations, list):
        raise DataError(f"{path}: not a COCO captions file (no 'annotations' list)")
    first = next((im.get("file_name") for im in images if isinstance(im, dict)), None)
    root = images_root_for(path, images_root, first)
    by_coco_id: dict[object, Record] = {}
    for i, im in enumerate(images):
        where = f"images[{i}]"
        if not isinstance(im, dict) or "file_name" not in im or "id" not in im:
            problems.append(Problem(str(path), where, "image entry without 'id' and 'file_name'"))
            continue
        image_path = root / str(im["file_name"])
        extra = {k: im[k] for k in ("coco_url", "flickr_url", "license", "date_captured") if k in im}
        extra["coco_id"] = im["id"]
        by_coco_id[im["id"]] = Record(
            id=image_id(image_path, root), image_path=image_path, source=f"{path}:{where}", extra=extra,
            root=confinement_root(path, images_root),
        )
    for i, ann in enumerate(annotations):
        where = f"annotations[{i}]"
        if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
            problems.append(Problem(str(path), where, "annotation without 'image_id' and 'caption'"))
            continue
        rec = by_coco_id.get(ann["image_id"])
        if rec is None:
            problems.append(Problem(str(path), where, f"caption for unknown image_id {ann['image_id']}"))
            continue
        reason = bad_text(ann["caption"])
        if reason:
            problems.append(Problem(str(path), where, reason))
            continue
        rec.captions.append(ann["caption"].strip())
    yield from by_coco_id.values()


def _read_karpathy(
    path: Path, images: list, images_root: Path | None, problems: list[Problem]
) -> Iterator[Record]:
    first = images[0].get("filename") if images else None
    root = images_root_for(path, images_root, first)
    for i, im in enumerate(images):
        where = f"images[{i}]"
        if not isinstance(im, dict) or "filename" not in im:
            problems.append(Problem(str(path), where, "image entry without 'filename'"))
            continue
        image_path = root / im.get("filepath", "") / im["filename"]
        rec = Record(
            id=image_id(image_path, root),
            image_path=image_path,
            source=f"{path}:{where}",
            split=KARPATHY_SPLITS.get(im.get("split", ""), im.get("split")),
            root=confinement_root(path, images_root),
        )
        for j, sentence in enumerate(im.get("sentences", [])):
            text = sentence.get("raw") if isinstance(sentence, dict) else sentence
            reason = bad_text(text)
            if reason:
                problems.append(Problem(str(path), f"{where}.sentences[{j}]", reason))
                continue
            rec.captions.append(text.strip())
        yield rec
