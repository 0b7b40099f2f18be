"""Where an image's bytes are: a member of a WebDataset tar (img2dataset's or an eval set's).

The crawl records, per sample, the tar it landed in and the member key (``<key>.jpg`` next to
``<key>.txt`` and ``<key>.json``). Everything that needs pixels (pHash, decontamination, the
shard writer) goes through this module, so adapting to another layout is one place.
"""

from __future__ import annotations

import mmap
import os
import tarfile
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

# Columns of the crawl's kept.parquet that locate a sample's image.
TAR_COL = "tar"
KEY_COL = "key"
_ZERO_BLOCK = bytes(512)
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


class TarImages(NamedTuple):
    """The image members of one tar, in tar order (the first member per key), as columns:
    keys and extensions are UTF-8 bytes back to back with Arrow-style offsets (n + 1)."""

    key_data: np.ndarray  # uint8
    key_offsets: np.ndarray  # int64
    ext_data: np.ndarray  # uint8
    ext_offsets: np.ndarray  # int64
    offsets: np.ndarray  # int64: where each member's data starts in the tar
    sizes: np.ndarray  # int64

    @staticmethod
    def _strings(data: np.ndarray, offsets: np.ndarray) -> list[str]:
        raw = data.tobytes()
        bounds = offsets.tolist()
        return [raw[a:b].decode("utf-8") for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def keys(self) -> list[str]:
        return self._strings(self.key_data, self.key_offsets)

    def exts(self) -> list[str]:
        return self._strings(self.ext_data, self.ext_offsets)


def _packed(strings: list[str]) -> tuple[np.ndarray, np.ndarray]:
    raw = [x.encode("utf-8") for x in strings]
    ends = np.cumsum([len(x) for x in raw], dtype=np.int64)
    return (np.frombuffer(b"".join(raw), np.uint8),
            np.concatenate([np.zeros(1, np.int64), ends]))


def _octal_runs(field: np.ndarray) -> np.ndarray:
    """Value of the first run of octal digits in each row of a header field (numpy, all rows
    at once); leading spaces/NULs and the terminator are skipped as tarfile does."""
    digit = (field >= 48) & (field <= 55)
    started = np.logical_or.accumulate(digit, axis=1)
    stopped = np.logical_or.accumulate(started & ~digit, axis=1)
    use = digit & ~stopped
    value = np.zeros(len(field), np.int64)
    for j in range(field.shape[1]):
        value = np.where(use[:, j], value * 8 + (field[:, j].astype(np.int64) - 48), value)
    return value


def _walk_headers(mm: mmap.mmap) -> list[int] | None:
    """Offsets of every header up to the end-of-archive block. Only the size field is parsed
    per header (the chain of offsets is sequential); everything else is checked in bulk."""
    heads: list[int] = []
    add = heads.append
    offset, end = 0, len(mm) - 511
    try:
        while offset < end:
            size = int(mm[offset + 124:offset + 135], 8)  # 11 octal digits, else ValueError
            if size < 0:
                return None
            add(offset)
            offset += (size + 1023) & -512  # the header and the data padded to 512
    except ValueError:  # the end-of-archive block (zeros), or a header to leave to tarfile
        return heads if mm[offset:offset + 512] == _ZERO_BLOCK else None
    return heads if offset == len(mm) else None


def _headers(path: str | Path) -> tuple[np.ndarray, np.ndarray] | None:
    """(header rows (n, 512), header offsets) of every member of a plain ustar/v7 tar, checked
    (checksums, type flags: regular files and directories only), or None for anything else."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return np.zeros((0, 512), np.uint8), np.zeros(0, np.int64)
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            heads = _walk_headers(mm)
            if heads is None:
                return None
            blocks = np.frombuffer(mm, np.uint8, len(mm) // 512 * 512).reshape(-1, 512)
            rows = blocks[np.asarray(heads, np.int64) // 512]  # a copy: the mapping can close
            del blocks
    sums = (rows.sum(axis=1, dtype=np.uint32).astype(np.int64)
            - rows[:, 148:156].sum(axis=1, dtype=np.int64) + 256)
    if not (sums == _octal_runs(rows[:, 148:156])).all():
        return None
    if not np.isin(rows[:, 156], (48, 0, 53)).all():  # "0", NUL: regular files; "5": dirs
        return None
    starts = np.asarray(heads, np.int64)
    sizes = _octal_runs(rows[:, 124:136])
    if (starts[1:] != starts[:-1] + 512 + (sizes[:-1] + 511) // 512 * 512).any():
        return None  # the walk's size parse and the full field disagree
    return rows, starts


def _names(rows: np.ndarray) -> np.ndarray:
    """The 100-byte name fields, zeroed from each name's first NUL on."""
    names = rows[:, :100].copy()
    names[np.logical_or.accumulate(names == 0, axis=1)] = 0
    return names


def _prefixed(rows: np.ndarray) -> np.ndarray:
    return (rows[:, 257:262] == np.frombuffer(b"ustar", np.uint8)).all(axis=1) & (
        rows[:, 345] != 0)


_IMAGE_EXTS_S = np.array([e.encode() for e in IMAGE_EXTS], "S4")


def _scan_images_numpy(path: str | Path) -> TarImages | None:
    """scan_images for tars with ASCII names and no ustar prefixes (img2dataset's), with no
    Python work per member: WebDataset key/extension split and the image filter in numpy."""
    found = _headers(path)
    if found is None:
        return None
    rows, heads = found
    files = rows[:, 156] != 53
    rows, heads = rows[files], heads[files]
    names = _names(rows)
    if _prefixed(rows).any() or (names >= 128).any():
        return None
    width = int(np.flatnonzero(names.any(axis=0))[-1]) + 1 if len(names) else 1
    names = names[:, :width]  # names are short: work on the columns in use only
    idx = np.arange(width)
    length = (names != 0).sum(axis=1)
    slash = np.where(names == 47, idx, -1).max(axis=1, initial=-1)
    dots = (names == 46) & (idx > slash[:, None])
    has_dot = dots.any(axis=1)
    dot = np.where(has_dot, dots.argmax(axis=1), length)  # the key ends here
    ext_len = np.where(has_dot, length - dot - 1, 0)
    # extension lowercased, first 4 bytes (the longest image extension), as S4 strings
    pick = np.minimum(dot[:, None] + 1 + np.arange(4), width - 1)
    ext4 = np.where(np.arange(4) < ext_len[:, None], names[np.arange(len(names))[:, None], pick], 0)
    ext4 = np.where((ext4 >= 65) & (ext4 <= 90), ext4 | 32, ext4).astype(np.uint8)
    image = (ext_len <= 4) & np.isin(ext4.copy().view("S4").ravel(), _IMAGE_EXTS_S)
    sel = np.flatnonzero(image)
    key_mask = idx < dot[sel, None]
    keys = np.where(key_mask, names[sel], 0)
    _, first = np.unique(np.ascontiguousarray(keys).view(f"S{width}").ravel(),
                         return_index=True)
    if len(first) < len(sel):  # a key twice: its first image member wins, as in index_tar
        sel, key_mask = sel[np.sort(first)], key_mask[np.sort(first)]
    ext_mask = (idx > dot[sel, None]) & (idx < length[sel, None])
    zero = np.zeros(1, np.int64)
    return TarImages(
        names[sel][key_mask], np.concatenate([zero, np.cumsum(dot[sel])]),
        names[sel][ext_mask], np.concatenate([zero, np.cumsum(ext_len[sel])]),
        heads[sel] + 512, _octal_runs(rows[sel, 124:136]))


def scan_images(path: str | Path) -> TarImages:
    """Image members of one uncompressed tar (a header scan; data is not read)."""
    try:
        fast = _scan_images_numpy(path)
    except (OSError, ValueError):
        fast = None
    if fast is not None:
        return fast
    # anything else (non-ASCII names, ustar prefixes, pax/GNU records): tarfile
    try:
        with tarfile.open(path, "r:") as tf:
            members = [(m.name, m.offset_data, m.size) for m in tf if m.isfile()]
    except (tarfile.TarError, OSError) as e:
        raise ValueError(f"{path}: not a readable tar: {e}") from e
    keys: list[str] = []
    exts: list[str] = []
    offsets: list[int] = []
    sizes: list[int] = []
    seen: set[str] = set()
    for name, offset, size in members:
        key, ext = split_name(name)
        if ext.lower() in IMAGE_EXTS and key not in seen:
            seen.add(key)
            keys.append(key)
            exts.append(ext)
            offsets.append(offset)
            sizes.append(size)
    return TarImages(*_packed(keys), *_packed(exts), np.asarray(offsets, np.int64),
                     np.asarray(sizes, np.int64))


def index_tar(path: str | Path) -> dict[str, Member]:
    """Image members of one uncompressed tar, by key (a header scan; data is not read)."""
    t = scan_images(path)
    return {k: Member(k, e, o, s) for k, e, o, s in zip(
        t.keys(), t.exts(), t.offsets.tolist(), t.sizes.tolist(), strict=True)}


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
