"""Where an image's bytes are: a member of a WebDataset tar (img2dataset's or an eval set's).

The crawl records, per sample, the tar it landed in and the member key (``<key>.jpg`` next to
``<key>.txt`` and ``<key>.json``). Everything that needs pixels (pHash, decontamination, the
shard writer) goes through this module, so adapting to another layout is one place.
"""

from __future__ import annotations

import os
import tarfile
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

# Columns of the crawl's kept.parquet that locate a sample's image.
TAR_COL = "tar"
KEY_COL = "key"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


@dataclass(frozen=True)
class Member:
    key: str  # WebDataset key: the member's path up to the first dot of its base name
    ext: str  # image extension, e.g. "jpg"
    offset: int  # byte offset of the member's data inside the tar
    size: int


def split_name(name: str) -> tuple[str, str]:
    """WebDataset's convention: ``dir/abc.seg.jpg`` → key ``dir/abc``, extension ``seg.jpg``."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), (ext if dot else "")


def index_tar(path: str | Path) -> dict[str, Member]:
    """Image members of one uncompressed tar, by key (a header scan; data is not read)."""
    out: dict[str, Member] = {}
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                key, ext = split_name(m.name)
                if ext.lower() in IMAGE_EXTS and key not in out:
                    out[key] = Member(key, ext, m.offset_data, m.size)
    except (tarfile.TarError, OSError) as e:
        raise ValueError(f"{path}: not a readable tar: {e}") from e
    return out


def iter_tar_images(path: str | Path) -> Iterator[tuple[str, bytes]]:
    """(key, image bytes) for every image member, read sequentially (fast on spinning/NFS)."""
    with open(path, "rb") as f:
        for m in index_tar(path).values():
            yield m.key, os.pread(f.fileno(), m.size, m.offset)


class ImageStore:
    """Random access to image members across many tars; each tar is indexed once."""

    def __init__(self, max_open: int = 64) -> None:
        self._index: dict[str, dict[str, Member]] = {}
        self._files: OrderedDict[str, int] = OrderedDict()
        self._max_open = max_open

    def members(self, tar: str) -> dict[str, Member]:
        if tar not in self._index:
            self._index[tar] = index_tar(tar)
        return self._index[tar]

    def _fd(self, tar: str) -> int:
        fd = self._files.pop(tar, None)
        if fd is None:
            fd = os.open(tar, os.O_RDONLY)
            if len(self._files) >= self._max_open:
                os.close(self._files.popitem(last=False)[1])
        self._files[tar] = fd
        return fd

    def read(self, tar: str, offset: int, size: int) -> bytes:
        data = os.pread(self._fd(tar), size, offset)
        if len(data) != size:
            raise ValueError(f"{tar}: short read at offset {offset} ({len(data)} of {size} bytes)")
        return data

    def get(self, tar: str, key: str) -> tuple[bytes, str]:
        m = self.members(tar).get(key)
        if m is None:
            raise KeyError(f"{tar}: no image member with key {key!r}")
        return self.read(tar, m.offset, m.size), m.ext

    def close(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()

    def __enter__(self) -> ImageStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_images(rows: Iterable[tuple[str, str, str]]) -> Iterator[tuple[str, bytes | None]]:
    """(uid, image bytes or None when missing) for rows of (uid, tar path, member key)."""
    with ImageStore() as store:
        for uid, tar, key in rows:
            try:
                yield uid, store.get(tar, key)[0]
            except (KeyError, ValueError, OSError):
                yield uid, None
