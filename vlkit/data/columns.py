"""Adding or replacing columns of a Lance dataset in one commit, without rewriting the other columns.

Lance's ``drop_columns`` and ``merge`` each commit a version, so replacing a column with them leaves a version
without it in between (and a crash there leaves it for good). :func:`replace_columns` instead joins the new
columns into each fragment under staging names (new data files only), then commits one ``Merge`` whose schema
drops the old columns and gives the staged ones their final names.

Lance builds its schema objects only from a pyarrow schema (which renumbers every field) or from its own
field records, the ones a pickled schema carries; field ids must be kept, so the final schema is made by
editing those records: dropping the old fields and their children and renaming the staged ones.
"""

from __future__ import annotations

import lance
import pyarrow as pa
from lance.schema import LanceSchema

from vlkit.data.rows import reading
from vlkit.errors import DataError

_STAGED = "__vlkit_new__"

# Lance's Field record (protos/file.proto): 2 name (string), 3 id (int32), 4 parent_id (int32).
_NAME, _ID, _PARENT = 2, 3, 4


def replace_columns(ds: lance.LanceDataset, table: pa.Table, on: str = "id") -> lance.LanceDataset:
    """Add the columns of ``table`` to ``ds`` (replacing columns of the same names) in one new version.

    Rows are matched on ``on``; rows of ``ds`` missing from ``table`` get nulls. The data files of the other
    columns are kept as they are.

    Args:
        ds: the dataset, at the version to build on (a concurrent commit in between is a conflict for Lance).
        table: ``on`` and the new columns (with their field metadata).
        on: the key column, present in both.

    Returns:
        The dataset at its new version.

    Raises:
        RowError: a data file of the dataset is missing.
    """
    new = [n for n in table.column_names if n != on]
    old = [n for n in new if n in ds.schema.names]
    staged = table.rename_columns([n if n == on else _STAGED + n for n in table.column_names])
    fragments, schema = [], None
    with reading(ds.uri):
        for fragment in ds.get_fragments():
            metadata, schema = fragment.merge(staged, left_on=on)
            fragments.append(metadata)
    if schema is None:  # no fragments: nothing to join on
        raise DataError(f"{ds.uri}: the dataset has no rows to add columns to")
    schema, dropped = _drop_and_rename(schema, drop=old, rename={_STAGED + n: n for n in new})
    for metadata in fragments:  # as drop_columns does: a data file left with no column is let go
        metadata.files = [f for f in metadata.files if any(i >= 0 and i not in dropped for i in f.fields)]
    expected = [n for n in ds.schema.names if n not in old] + new
    if schema.to_pyarrow().names != expected:  # the edit of Lance's field records went wrong: write nothing
        raise RuntimeError(f"replacing columns {new} of {ds.uri} gave the columns {schema.to_pyarrow().names}")
    return lance.LanceDataset.commit(ds.uri, lance.LanceOperation.Merge(fragments, schema),
                                     read_version=ds.version)


def _drop_and_rename(schema: LanceSchema, drop: list[str], rename: dict[str, str]) -> tuple[LanceSchema, set[int]]:
    """``schema`` without the top-level fields ``drop`` (and their children), with top-level ``rename``;
    and the ids of the fields dropped."""
    build, (meta, *records) = schema.__reduce__()  # the pickle form: Lance's field records in field order
    dropped: set[int] = set()
    kept = []
    for record in records:
        fields = _parse(record)
        name = _value(fields, _NAME, b"").decode()
        field_id, parent = _value(fields, _ID, 0), _signed(_value(fields, _PARENT, 0))
        if (parent == -1 and name in drop) or parent in dropped:
            dropped.add(field_id)
            continue
        if parent == -1 and name in rename:
            record = b"".join(_encode(_NAME, rename[name].encode()) if tag == _NAME else raw
                              for tag, _, raw in fields)
        kept.append(record)
    return build(meta, *kept), dropped


def _parse(record: bytes) -> list[tuple[int, int | bytes, bytes]]:
    """The top-level entries of a protobuf record as ``(tag, value, raw bytes)``."""
    out, i = [], 0
    while i < len(record):
        start = i
        key, i = _varint(record, i)
        tag, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(record, i)
        elif wire == 2:
            length, i = _varint(record, i)
            value, i = record[i:i + length], i + length
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            value, i = record[i:i + width], i + width
        else:
            raise ValueError(f"unexpected protobuf wire type {wire} in a Lance field record")
        out.append((tag, value, record[start:i]))
    return out


def _value(fields: list[tuple[int, int | bytes, bytes]], tag: int, default):
    return next((value for t, value, _ in fields if t == tag), default)


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = buf[i]
        value |= (byte & 0x7F) << shift
        i += 1
        if byte < 0x80:
            return value, i
        shift += 7


def _signed(value: int) -> int:
    """An int32 stored as a protobuf varint (negative numbers take 64 bits)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _encode(tag: int, payload: bytes) -> bytes:
    out, n = bytearray(_to_varint(tag << 3 | 2)), len(payload)
    out += _to_varint(n)
    return bytes(out) + payload


def _to_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)
