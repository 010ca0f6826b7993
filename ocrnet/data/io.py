"""File I/O shared by the loaders, the converters and the synthetic cache.

Images are decoded with OpenCV exactly as mmcv's ``LoadImageFromFile`` does by default
(``imdecode_backend='cv2'``, ``color_type='color'``): HxWx3 uint8 in **BGR** order, EXIF
orientation applied. Label maps follow mmseg's ``LoadAnnotations`` (Pillow, flag 'unchanged'):
single-channel values as stored; for palette ("P" mode) PNGs such as VOC's
``SegmentationClass`` the **palette indices**, not the colours. OpenCV always expands palettes
to colours, so :func:`read_label` maps the colours back through the file's PLTE chunk.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import cv2
import numpy as np

from ..utils.fileio import write_bytes_atomic

__all__ = ["DataError", "read_image", "read_label", "write_png_atomic", "Progress"]

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


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


def _png_palette(data: bytes) -> np.ndarray | None:
    """The PLTE entries (N, 3) uint8 RGB of a colour-type-3 PNG, None for any other file."""
    if not data.startswith(_PNG_SIGNATURE) or len(data) < 33:
        return None
    # IHDR is always the first chunk: length, b"IHDR", width, height, depth, colour type...
    if data[12:16] != b"IHDR" or data[25] != 3:
        return None
    pos = 8
    while pos + 8 <= len(data):
        length, ctype = struct.unpack(">I4s", data[pos:pos + 8])
        if ctype == b"PLTE":
            raw = data[pos + 8:pos + 8 + length]
            return np.frombuffer(raw[:len(raw) // 3 * 3], np.uint8).reshape(-1, 3)
        if ctype in (b"IDAT", b"IEND"):
            break
        pos += 12 + length
    return None


def _palette_indices(bgr: np.ndarray, palette_rgb: np.ndarray, path) -> np.ndarray | None:
    """Invert OpenCV's palette expansion: BGR pixels -> palette indices (H, W) uint8.

    None when a colour in use appears twice in the palette (e.g. palettes padded with black),
    where only decoding the raw indices (:func:`_decode_palette_png`) is exact.
    """
    pal = palette_rgb.astype(np.int64)
    pal_code = (pal[:, 0] << 16) | (pal[:, 1] << 8) | pal[:, 2]
    b, g, r = (bgr[..., i].astype(np.int64) for i in range(3))
    code = (r << 16) | (g << 8) | b
    uniq, inverse = np.unique(code, return_inverse=True)
    index_of = np.empty(len(uniq), np.int64)
    for k, c in enumerate(uniq.tolist()):
        hits = np.flatnonzero(pal_code == c)
        if len(hits) != 1:
            return None
        index_of[k] = hits[0]
    return index_of[inverse].reshape(code.shape).astype(np.uint8)


def _decode_palette_png(data: bytes, path) -> np.ndarray:
    """Decode the raw indices of a non-interlaced palette PNG (bit depth 1/2/4/8) with zlib
    and the PNG row filters; slow (Python loops for Average/Paeth rows), used only when
    colours cannot be mapped back to unique indices."""
    import zlib
    w, h, depth, _, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29])
    if interlace or depth not in (1, 2, 4, 8):
        raise DataError(f"palette PNG with duplicate palette colours and interlace={interlace}"
                        f", bit depth {depth} is not supported; save it as 8-bit grayscale: "
                        f"{path}")
    idat, pos = [], 8
    while pos + 8 <= len(data):
        length, ctype = struct.unpack(">I4s", data[pos:pos + 8])
        if ctype == b"IDAT":
            idat.append(data[pos + 8:pos + 8 + length])
        pos += 12 + length
    try:
        raw = zlib.decompress(b"".join(idat))
    except zlib.error as exc:
        raise DataError(f"corrupt PNG data ({exc}): {path}") from exc
    stride = (w * depth + 7) // 8
    if len(raw) < h * (stride + 1):
        raise DataError(f"truncated PNG data: {path}")
    rows = np.frombuffer(raw[:h * (stride + 1)], np.uint8).reshape(h, stride + 1)
    out = np.zeros((h, stride), np.uint8)
    prev = np.zeros(stride, np.int64)
    for y in range(h):
        ftype, line = rows[y, 0], rows[y, 1:].astype(np.int64)
        if ftype == 0:
            cur = line
        elif ftype == 1:  # Sub (1 byte per pixel for palettes): a running sum mod 256
            cur = np.cumsum(line) & 255
        elif ftype == 2:  # Up
            cur = (line + prev) & 255
        elif ftype in (3, 4):  # Average, Paeth: each byte depends on its left neighbour
            cur = np.empty(stride, np.int64)
            left = upleft = 0
            for x in range(stride):
                up = int(prev[x])
                if ftype == 3:
                    pred = (left + up) >> 1
                else:
                    p = left + up - upleft
                    pa, pb, pc = abs(p - left), abs(p - up), abs(p - upleft)
                    pred = left if pa <= pb and pa <= pc else (up if pb <= pc else upleft)
                left = cur[x] = (int(line[x]) + pred) & 255
                upleft = up
        else:
            raise DataError(f"bad PNG filter type {ftype} in row {y}: {path}")
        out[y], prev = cur, cur
    if depth < 8:
        bits = np.unpackbits(out, axis=1).reshape(h, -1, depth)
        weights = (1 << np.arange(depth - 1, -1, -1)).astype(np.uint8)
        out = (bits * weights).sum(-1).astype(np.uint8)
    return np.ascontiguousarray(out[:, :w])


def read_label(path: str | os.PathLike) -> np.ndarray:
    """Read a label map as (H, W) uint8, as mmseg's ``LoadAnnotations`` sees it.

    Grayscale PNGs give their stored values; palette PNGs give palette indices. Raises
    FileNotFoundError if missing, :class:`DataError` if undecodable, multi-channel
    (a colour-coded label image) or 16-bit with values above 255.
    """
    data = _read_bytes(path, "label")
    buf = np.frombuffer(data, np.uint8)
    palette = _png_palette(data)
    if palette is not None:
        bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR)
        if bgr is None:
            raise DataError(f"cannot decode label (corrupt or unsupported file): {path}")
        idx = _palette_indices(bgr, palette, path)
        return idx if idx is not None else _decode_palette_png(data, path)
    lab = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if lab is None or lab.size == 0:
        raise DataError(f"cannot decode label (corrupt or unsupported file): {path}")
    if lab.ndim == 3:
        if lab.shape[2] == 1:
            lab = lab[..., 0]
        else:
            raise DataError(f"label must be single-channel (class ids), got {lab.shape[2]} "
                            f"channels: {path}")
    if lab.dtype != np.uint8:
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
