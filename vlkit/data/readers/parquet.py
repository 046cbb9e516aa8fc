"""Parquet files of image-text pairs: img2dataset's layout and the Hugging Face layout.

The image column (``--image-column``; default ``image``, else ``jpg``) holds either the encoded bytes
(binary), a struct ``{bytes, path}`` as the Hugging Face ``Image`` feature stores it (the bytes when
present, else the path), or a path relative to the images root (``--images-root``, else the file's folder;
kept inside it like the other readers' paths). The text column (``--text-column``; default ``caption``, else
``text``) holds a caption or a list of captions. The id comes from ``--id-column`` (default ``key``, else
``id``), else from the image path relative to the images root for a path, or from the row number as
``<file name>#<row>`` for bytes. A ``split`` column is kept as the row's split;
other non-binary columns become extra columns.

The file is read in record batches (:meth:`pyarrow.parquet.ParquetFile.iter_batches`), never whole; the
bytes of the images are held until the ingest writes them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from vlkit.data.records import Problem, Record
from vlkit.errors import DataError

from .common import bad_text, confinement_root, image_id, images_root_for

if TYPE_CHECKING:  # pyarrow and Pillow load when a Parquet file is read, not when the CLI's parser is built
    import pyarrow as pa

IMAGE_COLUMNS = ("image", "jpg")
TEXT_COLUMNS = ("caption", "text")
ID_COLUMNS = ("key", "id")
BATCH_ROWS = 256


def held_bytes(data: bytes) -> Callable[[int], bytes]:
    """An ``image_data`` function for bytes already in memory: refuses them past the byte limit."""

    def read(max_bytes: int) -> bytes:
        from vlkit.data.images import ImageProblem, format_bytes

        if len(data) > max_bytes:
            raise ImageProblem(f"image is larger than the limit of {format_bytes(max_bytes)} "
                               "(raise it with --max-image-bytes)")
        return data

    return read


def choose_columns(schema: pa.Schema, where: str, image_column: str | None, text_column: str | None,
                   id_column: str | None) -> tuple[str, str, str | None]:
    """The (image, text, id) column names of ``schema``, given or by their default names.

    Raises:
        DataError: a named column is missing, or no default image/text column exists.
    """
    names = list(schema.names)

    def pick(given: str | None, defaults: tuple[str, ...], option: str, required: bool) -> str | None:
        if given:
            if given not in names:
                raise DataError(f"{where}: no column '{given}' ({option}); columns: {', '.join(names)}")
            return given
        found = next((c for c in defaults if c in names), None)
        if found is None and required:
            raise DataError(f"{where}: no {' or '.join(repr(c) for c in defaults)} column; name it with {option} "
                            f"(columns: {', '.join(names)})")
        return found

    return (pick(image_column, IMAGE_COLUMNS, "--image-column", True),
            pick(text_column, TEXT_COLUMNS, "--text-column", True),
            pick(id_column, ID_COLUMNS, "--id-column", False))


def extra_columns(schema: pa.Schema, used: set[str]) -> list[str]:
    """Columns kept as extras: all but the used ones, ``split`` and binary ones (e.g. other images)."""
    import pyarrow as pa

    return [f.name for f in schema if f.name not in used and f.name != "split"
            and not (pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type))]


def row_record(row: dict[str, Any], row_no: int, columns: tuple[str, str, str | None], extras: list[str],
               source: Path, images_root: Path | None, problems: list[Problem], where: str,
               default_id: str) -> Record | None:
    """The record of one row (a dict of column values), or None after reporting why it is skipped."""
    image_col, text_col, id_col = columns
    value = row.get(image_col)
    data, rel = None, None
    if isinstance(value, dict):  # the Hugging Face Image feature: {bytes, path}
        data, rel = value.get("bytes"), value.get("path")
    elif isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    elif isinstance(value, str):
        rel = value
    if not data and not rel:
        problems.append(Problem(where, row_no, f"no image in column '{image_col}'"))
        return None
    texts = row.get(text_col)
    texts = texts if isinstance(texts, list) else [texts]
    captions = []
    for text in texts:
        reason = bad_text(text)
        if reason:
            problems.append(Problem(where, row_no, f"{text_col}: {reason}"))
            return None
        captions.append(text.strip())
    split = row.get("split")
    extra = {k: row.get(k) for k in extras}
    if id_col is not None and row.get(id_col) is None:
        problems.append(Problem(where, row_no, f"no id in column '{id_col}'"))
        return None
    rec_id = str(row[id_col]) if id_col is not None else default_id
    if data:
        return Record(id=rec_id, image_path=Path(f"{where}#{row_no}"), source=f"{where}:{row_no}",
                      captions=captions, split=split, extra=extra, image_data=held_bytes(bytes(data)))
    base = images_root_for(source, images_root, rel)
    image_path = base / rel
    return Record(id=rec_id if id_col is not None else image_id(image_path, base), image_path=image_path,
                  source=f"{where}:{row_no}", captions=captions, split=split, extra=extra,
                  root=confinement_root(source, images_root))


def read_parquet(path: Path, images_root: Path | None, problems: list[Problem], *, image_column: str | None = None,
                 text_column: str | None = None, id_column: str | None = None) -> Iterator[Record]:
    """Records of one Parquet file, read in batches of :data:`BATCH_ROWS` rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    schema = pf.schema_arrow
    columns = choose_columns(schema, str(path), image_column, text_column, id_column)
    extras = extra_columns(schema, {c for c in columns if c})
    row_no = 0
    try:
        for batch in pf.iter_batches(batch_size=BATCH_ROWS):
            for row in batch.to_pylist():
                rec = row_record(row, row_no, columns, extras, path, images_root, problems, str(path),
                                 f"{path.name}#{row_no}")
                row_no += 1
                if rec is not None:
                    yield rec
    except (pa.ArrowException, OSError) as exc:
        problems.append(Problem(str(path), row_no, f"damaged Parquet file ({exc}); the rows before it are kept"))
