"""Small JPEG thumbnails for the card, read back from the crawl's tars (and the eval sets').

Every picture goes through ``dedup.imagestore`` (the one module that knows the tar layout);
a thumbnail is named by what it shows (``<uid>.jpg``, ``eval-<hash>.jpg``), so a card written
again overwrites the same files and a uid shown in two sections is one file.
"""

from __future__ import annotations

import hashlib
import io
from collections import defaultdict
from pathlib import Path

from PIL import Image, ImageOps

from dedup.imagestore import ImageStore

THUMB_SIDE = 128
QUALITY = 80


def _thumbnail(data: bytes, side: int = THUMB_SIDE) -> bytes:
    """A JPEG at most side x side; transparency composed on white (clip-art is mostly alpha)."""
    with Image.open(io.BytesIO(data)) as im:
        im.draft("RGB", (side, side))  # JPEG: decode at a reduced scale, much faster
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA", "P", "PA"):
            im = im.convert("RGBA")
            bg = Image.new("RGB", im.size, (255, 255, 255))
            bg.paste(im, mask=im.getchannel("A"))
            im = bg
        else:
            im = im.convert("RGB")
        im.thumbnail((side, side))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=QUALITY, optimize=True)
        return buf.getvalue()


class Thumbs:
    """Collects the pictures a card shows, then writes them all in one pass per tar."""

    def __init__(self, folder: Path, run_dir: Path) -> None:
        self.folder = folder
        self.run_dir = run_dir
        self._wanted: dict[str, tuple[Path, str]] = {}  # file name -> (tar, key)
        self.written: dict[str, str] = {}  # file name -> relative path (thumbs/<name>)
        self.failed: dict[str, str] = {}  # file name -> why

    def want_crawled(self, uid: str, tar: str | None, key: str | None) -> str | None:
        """Ask for a crawled image (tar relative to the run folder); returns its file name."""
        if not tar or not key:
            return None
        name = f"{uid}.jpg"
        self._wanted[name] = (self.run_dir / tar, key)
        return name

    def want_member(self, tar: Path, key: str) -> str:
        """Ask for an image member of any tar (an eval set's); returns its file name."""
        name = "eval-" + hashlib.md5(f"{tar}:{key}".encode()).hexdigest()[:16] + ".jpg"
        self._wanted[name] = (tar, key)
        return name

    def write(self) -> int:
        """Write every wanted thumbnail that can be read; returns how many were written."""
        self.folder.mkdir(parents=True, exist_ok=True)
        by_tar: dict[Path, list[tuple[str, str]]] = defaultdict(list)
        for name, (tar, key) in self._wanted.items():
            by_tar[tar].append((name, key))
        with ImageStore() as store:
            for tar in sorted(by_tar):
                for name, key in sorted(by_tar[tar], key=lambda x: x[1]):
                    try:
                        data, _ = store.get(str(tar), key)
                        (self.folder / name).write_bytes(_thumbnail(data))
                    except (OSError, KeyError, ValueError, Image.DecompressionBombError) as e:
                        # a lost tar or an undecodable image is shown as such on its tile
                        self.failed[name] = f"{type(e).__name__}: {e}"
                        continue
                    self.written[name] = f"{self.folder.name}/{name}"
        self._wanted.clear()
        return len(self.written)

    def src(self, name: str | None) -> str | None:
        """The relative path of a written thumbnail, or None."""
        return self.written.get(name) if name else None
