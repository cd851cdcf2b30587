"""Images and video frame folders for a PreferencePair, as PIL images.

    loader = media.MediaLoader(missing="error", video_frames=8)
    images = loader.load(pair)          # list[PIL.Image]: 1 per image, `video_frames` for a video
    batch = loader.load_many(pairs)     # the same for a batch's pairs, in threads, in order
    loader.placeholders                 # rows that got a placeholder (counted, reported in metrics)

Paths resolve against `pair.media_base` (DataSource.media_uri, else the data file's folder): local
folders and s3:// prefixes. A video is a folder of frame images (jpg/png/webp...); `video_frames` of them
are sampled uniformly over the sorted file names (every frame when the folder has fewer); the collator
hands them to the model as its video input (Qwen2-VL / Qwen2.5-VL, LLaVA-OneVision). Video files
(.mp4 ...) are not decoded: extract frames first (e.g. `ffmpeg -i v.mp4 -vf fps=1 v/%05d.jpg`).

A missing image/folder raises DataError naming the row id and the path, unless `missing="placeholder"`:
then the row gets ONE grey image of `PLACEHOLDER_SIZE` and `placeholders` grows by one.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from mmalign.trainer import storage
from mmalign.trainer.data import DataError, PreferencePair

FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
VIDEO_FILE_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")
PLACEHOLDER_SIZE = (64, 64)


def resolve(path: str, base: str) -> str:
    """`path` if absolute or a URI, else `base`/`path` (base: folder or s3:// prefix)."""
    if "://" in path or os.path.isabs(path) or not base:
        return path
    if storage.is_remote(base):
        return storage.join(base, path)
    return os.path.join(storage.local_path(base) if base.startswith("file://") else base, path)


def uniform_indices(count: int, wanted: int) -> list[int]:
    """`wanted` indices spread evenly over range(count) (centres of equal segments); all if fewer."""
    if count <= wanted:
        return list(range(count))
    return [int((i + 0.5) * count / wanted) for i in range(wanted)]


def spread_indices(count: int, wanted: int) -> list[int]:
    """Exactly `wanted` indices into range(count), spread evenly: `uniform_indices` when the folder has
    more frames, each frame repeated about wanted/count times when it has fewer (LLaVA-OneVision's video
    input takes one frame count per batch: collate.Collator._video_frames)."""
    return [min(count - 1, int((i + 0.5) * count / wanted)) for i in range(wanted)]


def placeholder_image() -> Any:
    from PIL import Image

    return Image.new("RGB", PLACEHOLDER_SIZE, (128, 128, 128))


class MediaLoader:
    """Loads a pair's media; counts placeholders. One per stage; `load_many` loads a batch's pairs in
    `threads` threads (reads from S3 and PNG/JPEG decoding overlap; the counters take a lock)."""

    def __init__(self, missing: str = "error", video_frames: int = 8, threads: int = 8) -> None:
        if missing not in ("error", "placeholder"):
            raise ValueError(f"missing must be 'error' or 'placeholder', got {missing!r}")
        self.missing = missing
        self.video_frames = video_frames
        self.threads = threads
        self.placeholders = 0
        self.placeholder_rows: list[str] = []  # first 20 row uids, for the report
        self._lock = threading.Lock()

    def load_many(self, pairs: Sequence[PreferencePair]) -> list[list[Any]]:
        """`load` of every pair, in order, `threads` at a time; the first failing pair's error is raised."""
        if len(pairs) <= 1 or self.threads <= 1:
            return [self.load(pair) for pair in pairs]
        with ThreadPoolExecutor(min(self.threads, len(pairs)), thread_name_prefix="mmalign-media") as pool:
            return list(pool.map(self.load, pairs))

    @classmethod
    def from_spec(cls, spec: Any) -> MediaLoader:
        """From a config.DataSource (missing_media, video_frames)."""
        return cls(missing=spec.missing_media, video_frames=spec.video_frames)

    def load(self, pair: PreferencePair) -> list[Any]:
        """The pair's images (RGB PIL), [] for a text-only pair."""
        if not pair.media:
            return []
        try:
            if pair.media_kind == "video":
                return self._frames(resolve(pair.media[0], pair.media_base))
            return [_open_image(resolve(path, pair.media_base)) for path in pair.media]
        except _Missing as missing:
            if self.missing == "placeholder":
                with self._lock:
                    self.placeholders += 1
                    if len(self.placeholder_rows) < 20:
                        self.placeholder_rows.append(pair.uid)
                return [placeholder_image()]
            raise DataError(
                f"row {pair.id!r} ({pair.uid}): media not found: {missing}. Check data.mediaUri "
                "(relative paths resolve against it, default: the data file's folder), or set "
                "data.missingMedia: placeholder to train with a grey placeholder image (counted)."
            ) from None

    def _frames(self, folder: str) -> list[Any]:
        if folder.lower().endswith(VIDEO_FILE_SUFFIXES):
            raise DataError(
                f"{folder}: video files are not decoded; extract frames into a folder "
                "(e.g. ffmpeg -i video.mp4 -vf fps=1 folder/%05d.jpg) and point the row at it"
            )
        names = _frame_names(folder)
        if not names:
            raise _Missing(f"{folder} (no frame images in the folder)")
        return [_open_image(names[i]) for i in uniform_indices(len(names), self.video_frames)]


class _Missing(Exception):
    pass


def _frame_names(folder: str) -> list[str]:
    if storage.is_remote(folder):
        prefix = folder if folder.endswith("/") else folder + "/"
        try:
            infos = storage.list_prefix(prefix)
        except FileNotFoundError:
            return []
        return sorted(i.uri for i in infos if i.uri.lower().endswith(FRAME_SUFFIXES))
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.lower().endswith(FRAME_SUFFIXES))


def _open_image(uri: str) -> Any:
    from PIL import Image

    try:
        if storage.is_remote(uri):
            raw: Any = storage.open_bytes(uri)
        else:
            if not os.path.isfile(uri):
                raise _Missing(uri)
            raw = uri
        with Image.open(raw) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise _Missing(uri) from None
    except OSError as error:  # PIL.UnidentifiedImageError is an OSError
        raise DataError(f"{uri}: not a readable image ({error}); replace or remove the file") from None


def fit_pixels(image: Any, max_pixels: int | None) -> Any:
    """`image` scaled down (aspect kept, LANCZOS) so that width x height <= `max_pixels`; the image
    itself when it fits or there is no bound (data.maxPixels)."""
    width, height = image.size
    if max_pixels is None or width * height <= max_pixels:
        return image
    scale = (max_pixels / (width * height)) ** 0.5
    size = (max(1, int(width * scale)), max(1, int(height * scale)))
    from PIL import Image

    return image.resize(size, Image.Resampling.LANCZOS)


def image_bytes(image: Any, fmt: str = "PNG") -> bytes:
    """Encode a PIL image (export helpers and tests)."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


__all__ = ["MediaLoader", "resolve", "uniform_indices", "spread_indices", "placeholder_image", "fit_pixels"]
