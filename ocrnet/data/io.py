"""File I/O shared by the loaders, the converters and the synthetic cache.

Images are decoded with OpenCV exactly as mmcv's ``LoadImageFromFile`` does by default
(``imdecode_backend='cv2'``, ``color_type='color'``): HxWx3 uint8 in **BGR** order, EXIF
orientation applied. Label maps are decoded with Pillow, as mmseg's ``LoadAnnotations`` does
(mmcv's pillow backend, flag 'unchanged'): single-channel values as stored; for palette ("P"
mode) PNGs such as VOC's ``SegmentationClass`` the **palette indices**, not the colours
(OpenCV would expand a palette to colours).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import cv2
import numpy as np

from ..utils.fileio import write_bytes_atomic

__all__ = ["DataError", "read_image", "read_label", "write_png_atomic", "Progress"]


class DataError(ValueError):
    """A data file is unreadable, corrupt or holds values the dataset does not allow."""


def _read_bytes(path: str | os.PathLike, what: str) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    data = path.read_bytes()
    if not data:
        raise DataError(f"{what} is empty (0 bytes): {path}")
    return data


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file to an (H, W, 3) uint8 array in BGR channel order.

    Raises FileNotFoundError if ``path`` is missing and :class:`DataError` if it cannot be
    decoded (truncated or corrupt file, unknown format).
    """
    data = _read_bytes(path, "image")
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None or img.ndim != 3 or img.shape[2] != 3 or img.size == 0:
        raise DataError(f"cannot decode image (corrupt or unsupported file): {path}")
    return img


def _open_label(data: bytes, path) -> np.ndarray:
    """Decode ``data`` with Pillow as mmcv's ``imfrombytes(..., flag='unchanged',
    backend='pillow')`` does: ``np.array`` of the image as stored, so "P" (palette) images give
    their indices, "L" its values, "I;16" uint16, "LA" / "RGB" / "RGBA" 2 / 3 / 4 channels."""
    try:
        from PIL import Image
    except ImportError as exc:  # imported here so that read_image works without Pillow
        raise ImportError("read_label needs Pillow (`pip install pillow`) to read label maps "
                          "as mmsegmentation does (palette PNGs as indices)") from exc
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format == "PNG":
                # Pillow's decoder checks no chunk CRCs and stops once it has every row;
                # verify() checks them and the chunks up to IEND, so that corrupt or
                # truncated files fail as they did with libpng (OpenCV).
                img.verify()
        with Image.open(io.BytesIO(data)) as img:  # verify() leaves the image unusable
            # Decoding is lazy: load() inside the try, so truncated data is a DataError too.
            img.load()
            # OpenCV, which read labels before, expanded 1-bit grayscale to 0/255; convert
            # keeps those values (np.array of mode "1" would give booleans).
            return np.array(img.convert("L") if img.mode == "1" else img)
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        # OSError covers UnidentifiedImageError (not an image) and "image file is truncated".
        raise DataError(f"cannot decode label (corrupt or unsupported file): {path}") from exc


def read_label(path: str | os.PathLike) -> np.ndarray:
    """Read a label map as (H, W) uint8, as mmseg's ``LoadAnnotations`` sees it.

    Grayscale PNGs give their stored values; palette PNGs give palette indices. Raises
    FileNotFoundError if missing, :class:`DataError` if undecodable, multi-channel
    (a colour-coded label image) or 16-bit with values above 255.
    """
    data = _read_bytes(path, "label")
    lab = _open_label(data, path)
    if lab.size == 0:
        raise DataError(f"cannot decode label (corrupt or unsupported file): {path}")
    if lab.ndim == 3:
        raise DataError(f"label must be single-channel (class ids), got {lab.shape[2]} "
                        f"channels: {path}")
    if lab.dtype != np.uint8:
        # Pillow gives big-endian arrays for some modes ("I;16B"); the message names the
        # native dtype, as OpenCV's arrays did.
        lab = lab.astype(lab.dtype.newbyteorder("="))
        if lab.dtype.kind not in "ui" or lab.min() < 0 or lab.max() > 255:
            raise DataError(f"label values must fit in 0..255 (dtype {lab.dtype}): {path}")
        lab = lab.astype(np.uint8)
    return lab


def write_png_atomic(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write (H, W) or (H, W, 3) uint8 (BGR) ``array`` as PNG, atomically (parent folders
    created)."""
    path = Path(path)
    array = np.ascontiguousarray(array)
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise ValueError(f"write_png_atomic: array must be 2-D or 3-D uint8, got "
                         f"{array.dtype} {array.shape} for {path}")
    ok, enc = cv2.imencode(".png", array)
    if not ok:
        raise DataError(f"PNG encoding failed for {path}")
    return write_bytes_atomic(path, enc.tobytes(), make_parents=True)


class Progress:
    """A count printed in place (``\\r``) to a stream, about 100 updates per run.

    ``Progress(total, "cityscapes")``; call :meth:`step` per item and :meth:`close` at the end.
    ``enabled=False`` prints nothing (tests, library use).
    """

    def __init__(self, total: int, label: str, enabled: bool = True, stream=None):
        import sys
        self.total, self.label, self.enabled = total, label, enabled and total > 0
        self.stream = stream if stream is not None else sys.stderr
        self.count = 0
        self._every = max(1, total // 100)

    def step(self, n: int = 1) -> None:
        self.count += n
        if self.enabled and (self.count % self._every == 0 or self.count == self.total):
            self.stream.write(f"\r{self.label}: {self.count}/{self.total}")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
