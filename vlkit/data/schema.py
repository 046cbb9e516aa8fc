"""The Arrow schema of a vlkit Lance dataset and conversion of records into tables."""

from __future__ import annotations

import json
from typing import Any, Iterable

import lance
import pyarrow as pa

SCHEMA_VERSION = "1"

#: Columns every vlkit dataset has, in order. Extra source fields follow them.
CORE_FIELDS: list[pa.Field] = [
    pa.field("id", pa.string(), nullable=False),
    lance.blob_field("image"),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("format", pa.string()),
    pa.field("captions", pa.list_(pa.string())),
    pa.field("label", pa.int64()),
    pa.field("class_name", pa.string()),
    pa.field("questions", pa.list_(pa.string())),
    pa.field("answers", pa.list_(pa.list_(pa.string()))),
    pa.field("split", pa.string()),
    pa.field("source", pa.string()),
]
CORE_NAMES = [f.name for f in CORE_FIELDS]

#: Columns of datasets whose rows hold two images (NLVR2's left and right): ``image`` keeps the first, so every
#: reader of single images works unchanged, and these hold the second. Only datasets that have such rows get them.
PAIR_FIELDS: list[pa.Field] = [
    lance.blob_field("image2"),
    pa.field("width2", pa.int32()),
    pa.field("height2", pa.int32()),
    pa.field("source2", pa.string()),
]
PAIR_NAMES = [f.name for f in PAIR_FIELDS]

#: Columns of datasets of videos (:mod:`vlkit.data.ingest_videos`): ``image`` holds the middle frame as JPEG, so
#: every reader of images works unchanged, and these hold the original file and what it holds. Only datasets
#: that have videos get them.
VIDEO_FIELDS: list[pa.Field] = [
    lance.blob_field("video"),
    pa.field("fps", pa.float64()),
    pa.field("frames", pa.int32()),
    pa.field("duration", pa.float64()),
    pa.field("video_codec", pa.string()),
    pa.field("video_format", pa.string()),
]
VIDEO_NAMES = [f.name for f in VIDEO_FIELDS]
BLOB_NAMES = ("image", "image2", "video")


#: Extra columns of question-answering sources with a fixed type: per question (aligned with ``questions``)
#: whether it can be answered from the image (VizWiz) and its answer type; per image the words an OCR system
#: read in it (TextVQA). A source whose values do not fit the type gets an inferred column instead.
QA_EXTRA_TYPES: dict[str, pa.DataType] = {
    "answerable": pa.list_(pa.bool_()),
    "answer_type": pa.list_(pa.string()),
    "ocr_tokens": pa.list_(pa.string()),
    # Visual Dialog, per round (vlkit.data.readers.visdial)
    "dialog_questions": pa.list_(pa.string()),
    "dialog_answers": pa.list_(pa.string()),
    "dialog_options": pa.list_(pa.list_(pa.string())),
    "dialog_gt_index": pa.list_(pa.int32()),
    "dialog_relevance": pa.list_(pa.list_(pa.float32())),
}


def extra_field(name: str, values: list[Any]) -> pa.Field:
    """Arrow field for an extra source column: its declared type (:data:`QA_EXTRA_TYPES`) when the values fit
    it, else its inferred type, or JSON text when types disagree."""
    if name in QA_EXTRA_TYPES and all(v is None or isinstance(v, list) for v in values):
        try:
            pa.array(values, type=QA_EXTRA_TYPES[name])
            return pa.field(name, QA_EXTRA_TYPES[name])
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            pass
    try:
        typ = pa.array(values).type
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        typ = pa.string()
        return pa.field(name, typ, metadata={"vlkit.encoding": "json"})
    if pa.types.is_null(typ):
        typ = pa.string()
    return pa.field(name, typ)


def build_schema(extra_fields: Iterable[pa.Field] = (), metadata: dict[str, str] | None = None) -> pa.Schema:
    meta = {"vlkit.schema_version": SCHEMA_VERSION}
    meta.update(metadata or {})
    return pa.schema(CORE_FIELDS + list(extra_fields), metadata=meta)


def rows_to_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Turn row dicts (core columns plus extras, image as bytes) into a table of ``schema``."""
    columns = {}
    for f in schema:
        values = [row.get(f.name) for row in rows]
        if f.name in BLOB_NAMES:
            # a row without a second image (or a video) holds a null ``image2`` (``video``)
            columns[f.name] = pa.array([{"data": v} if f.name == "image" or v is not None else None
                                        for v in values], type=f.type)
        elif (f.metadata or {}).get(b"vlkit.encoding") == b"json":
            columns[f.name] = pa.array([None if v is None else json.dumps(v) for v in values], pa.string())
        else:
            columns[f.name] = pa.array(values, type=f.type)
    return pa.Table.from_pydict(columns, schema=schema)


def has_pairs(schema: pa.Schema) -> bool:
    """Whether a dataset of ``schema`` can hold rows of two images (it has the ``image2`` column)."""
    return "image2" in schema.names


def has_videos(schema: pa.Schema) -> bool:
    """Whether a dataset of ``schema`` can hold videos (it has the ``video`` column)."""
    return "video" in schema.names


def class_names(schema: pa.Schema) -> list[str]:
    """Class names by label index, as stored in the schema metadata (empty if none)."""
    raw = (schema.metadata or {}).get(b"vlkit.classes")
    return json.loads(raw) if raw else []
