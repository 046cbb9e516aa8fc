"""WebDataset tar shards, as img2dataset writes them: ``<key>.jpg`` + ``<key>.txt`` and/or ``<key>.json``.

A source is one ``.tar`` or a brace pattern of shards (``shards/shard-{00000..00099}.tar``). Members are
grouped by key: the member's name up to the first dot of its basename (``part/000001.jpg`` has the key
``part/000001``). A key needs one image member (``.jpg``, ``.jpeg``, ``.png`` or ``.webp``) and a caption:
the ``.txt`` member and/or the ``caption`` field of the ``.json`` member (img2dataset's metadata); the other
JSON fields (``url``, ``status``, ``original_width``, ...) become extra columns.

The id is the key: img2dataset's keys are unique over a whole download (they begin with the shard
number), so they stay stable however the shards are passed. A key met again in a later shard of the same
source is a problem naming both shards, not a second image merged into the first.

Nothing is extracted and no member path is followed (``../x.jpg`` is only a name). The shard is read with
:mod:`tarfile` in random-access mode (uncompressed tar, as img2dataset writes): listing it reads only the
member headers; an image's bytes are read when the ingest checks it, and a member larger than
``--max-image-bytes`` is a problem without being read. A truncated shard is a problem naming it; the keys
wholly before the damage are kept.
"""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path
from typing import Any, Callable, Iterator

from vlkit.data.records import Problem, Record

from .common import bad_text

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
MAX_TEXT_BYTES = 1 << 20
"""The largest ``.txt``/``.json`` member read; a larger one is a problem."""
KNOWN_JSON = {"caption", "key"}
_END_BLOCKS = 1024  # a tar ends with two 512-byte blocks of zeros


def expand_shards(path: Path) -> list[Path]:
    """The shard files named by ``path``: its brace pattern expanded, or ``path`` itself."""
    text = str(path)
    if "{" not in text:
        return [path]
    from braceexpand import braceexpand

    return [Path(p) for p in braceexpand(text)]


def is_shard_pattern(path: Path) -> bool:
    """Whether ``path`` names tar shards: a ``.tar`` file or a brace pattern ending in ``.tar``."""
    return path.name.lower().endswith(".tar")


def split_key(name: str) -> tuple[str, str]:
    """``(key, extension)`` of a member name: ``dir/000001.jpg`` -> ``("dir/000001", "jpg")``."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _member_reader(shard: Path, member: tarfile.TarInfo) -> Callable[[int], bytes]:
    """A function of the byte limit that reads ``member``'s bytes from ``shard`` (one seek, one read)."""
    offset, size = member.offset_data, member.size

    def read(max_bytes: int) -> bytes:
        from vlkit.data.images import ImageProblem, format_bytes

        if size > max_bytes:
            raise ImageProblem(f"image member is larger than the limit of {format_bytes(max_bytes)} "
                               "(raise it with --max-image-bytes)")
        try:
            with open(shard, "rb") as fh:
                fh.seek(offset)
                data = fh.read(size)
        except OSError as exc:
            raise ImageProblem(f"cannot read the shard ({exc.strerror})") from None
        if len(data) != size:
            raise ImageProblem(f"image member cut short ({len(data)} of {size} bytes: truncated shard)")
        return data

    return read


def _read_text(fh, member: tarfile.TarInfo) -> tuple[str | None, str | None]:
    """(text, None) or (None, reason) for a ``.txt``/``.json`` member."""
    from vlkit.data.images import format_bytes

    if member.size > MAX_TEXT_BYTES:
        return None, f"{member.name}: larger than {format_bytes(MAX_TEXT_BYTES)}"
    fh.seek(member.offset_data)
    data = fh.read(member.size)
    if len(data) != member.size:
        return None, f"{member.name}: cut short (truncated shard)"
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError:
        return None, f"{member.name}: undecodable text (not valid UTF-8)"


def _list_members(shard: Path, problems: list[Problem]) -> dict[str, dict[str, tarfile.TarInfo]]:
    """Regular-file members grouped by key (then extension), in shard order; damage reported.

    In a truncated shard the key whose bytes are cut is dropped and named in the problem.
    """
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        tar = tarfile.open(shard, "r:")
    except (tarfile.TarError, OSError) as exc:
        problems.append(Problem(str(shard), None, f"not a readable (uncompressed) tar file ({exc})"))
        return groups
    damage = None
    with tar:
        try:
            for member in tar:
                if member.isfile():
                    key, ext = split_key(member.name)
                    groups.setdefault(key, {}).setdefault(ext, member)
            end = tar.offset
        except (tarfile.TarError, EOFError, OSError) as exc:
            damage = str(exc)
    size = os.path.getsize(shard)
    if damage is None:
        with open(shard, "rb") as fh:
            fh.seek(end)
            tail = fh.read(_END_BLOCKS)
        if len(tail) < _END_BLOCKS or any(tail):  # a header cut short, or no end-of-archive blocks
            damage = f"ends at byte {size}, inside a member header or without the end-of-archive blocks"
    if damage is not None:
        cut = [k for k, members in groups.items() if any(m.offset_data + m.size > size for m in members.values())]
        for key in cut:
            del groups[key]
        lost = f"; key {', '.join(cut)} cut short and skipped" if cut else ""
        problems.append(Problem(str(shard), None, f"truncated or damaged tar ({damage}){lost}; "
                                f"the {len(groups)} keys before it are kept"))
    return groups


def _record(shard: Path, key: str, members: dict[str, tarfile.TarInfo], fh,
            problems: list[Problem]) -> Record | None:
    where = f"{shard}:{key}"
    image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in members), None)
    if image_ext is None:
        problems.append(Problem(str(shard), key, f"no image member ({', '.join(IMAGE_EXTENSIONS)})"))
        return None
    captions: list[str] = []
    extra: dict[str, Any] = {}
    if "txt" in members:
        text, reason = _read_text(fh, members["txt"])
        reason = reason or bad_text(text)
        if reason:
            problems.append(Problem(str(shard), key, f"caption: {reason}"))
            return None
        captions.append(text.strip())
    if "json" in members:
        text, reason = _read_text(fh, members["json"])
        meta = None
        if not reason:
            try:
                meta = json.loads(text)
            except json.JSONDecodeError as exc:
                reason = f"{members['json'].name}: invalid JSON ({exc.msg})"
        if not reason and not isinstance(meta, dict):
            reason = f"{members['json'].name}: expected a JSON object"
        if reason:
            problems.append(Problem(str(shard), key, reason))
            return None
        if meta.get("caption") is not None:
            reason = bad_text(meta["caption"])
            if reason:
                problems.append(Problem(str(shard), key, f"json caption: {reason}"))
                return None
            if meta["caption"].strip() not in captions:
                captions.append(meta["caption"].strip())
        extra = {k: v for k, v in meta.items() if k not in KNOWN_JSON}
    if not captions:
        problems.append(Problem(str(shard), key, "no caption (.txt member or 'caption' in the .json member)"))
        return None
    image = members[image_ext]
    return Record(id=key, image_path=shard / image.name, source=where, captions=captions, extra=extra,
                  image_data=_member_reader(shard, image))


def read_webdataset(path: Path, images_root: Path | None, problems: list[Problem]) -> Iterator[Record]:
    """Records of one ``.tar`` shard or a brace pattern of shards (``images_root`` is not used)."""
    seen: dict[str, Path] = {}
    for shard in expand_shards(path):
        if not shard.is_file():
            problems.append(Problem(str(shard), None, "shard not found"))
            continue
        groups = _list_members(shard, problems)
        with open(shard, "rb") as fh:
            for key, members in groups.items():
                if key in seen:
                    problems.append(Problem(str(shard), key, f"key already read from {seen[key]}; skipped"))
                    continue
                seen[key] = shard
                rec = _record(shard, key, members, fh, problems)
                if rec is not None:
                    yield rec
