"""Compact mask messages for the viewer: a bounding box and its voxels as packed bits.

A message is ``uint32 n`` (little endian) + ``n`` bytes of UTF-8 JSON (the header) +
the payload. For a mask the header holds ``box = [i0, j0, k0, i1, j1, k1]`` (half-open,
original voxels; all zeros when the mask is empty) and the payload is the box's
voxels in C order (``k`` fastest), eight to a byte, most significant bit first
(:func:`numpy.packbits`). A 20 mm lesion in a 512 x 512 x 200 volume is a few
hundred bytes instead of 52 MB of one byte a voxel.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np


def pack_message(header: dict[str, Any], payload: bytes | memoryview = b"") -> bytes:
    """``uint32 len`` + JSON header + payload (one copy of the payload)."""
    head = json.dumps(header, separators=(",", ":")).encode()
    return b"".join((struct.pack("<I", len(head)), head, payload))


def unpack_message(data: bytes) -> tuple[dict[str, Any], bytes]:
    """Inverse of :func:`pack_message`: (header, payload)."""
    (n,) = struct.unpack_from("<I", data, 0)
    return json.loads(data[4 : 4 + n].decode()), data[4 + n :]


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int, int, int]:
    """Half-open bounding box ``(i0, j0, k0, i1, j1, k1)`` of a 3D mask; zeros if empty.

    One pass over the whole volume (rows of a C-contiguous mask as flat lines, which numpy
    reduces several times faster than ``any(axis=(1, 2))``); the other two axes look only
    at the slab.
    """
    rows = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))
    if len(rows) == 0:
        return (0, 0, 0, 0, 0, 0)
    i0, i1 = int(rows[0]), int(rows[-1]) + 1
    slab = mask[i0:i1]
    cols = np.flatnonzero(slab.any(axis=(0, 2)))
    j0, j1 = int(cols[0]), int(cols[-1]) + 1
    deep = np.flatnonzero(slab[:, j0:j1].any(axis=(0, 1)))
    return (i0, j0, int(deep[0]), i1, j1, int(deep[-1]) + 1)


def encode_mask(mask: np.ndarray) -> tuple[list[int], bytes]:
    """A bool/uint8 mask ``I x J x K`` -> (box, packed bits of the box in C order)."""
    box = mask_box(mask)
    if box[3] == 0:
        return list(box), b""
    sub = mask[box[0] : box[3], box[1] : box[4], box[2] : box[5]]
    return list(box), np.packbits(sub.astype(bool, copy=False), axis=None).tobytes()


def decode_mask(box: list[int], bits: bytes, shape: tuple[int, int, int]) -> np.ndarray:
    """Inverse of :func:`encode_mask`: the uint8 mask ``shape``."""
    out = np.zeros(shape, dtype=np.uint8)
    size = [box[3] - box[0], box[4] - box[1], box[5] - box[2]]
    n = int(np.prod(size))
    if n:
        flat = np.unpackbits(np.frombuffer(bits, dtype=np.uint8), count=n)
        out[box[0] : box[3], box[1] : box[4], box[2] : box[5]] = flat.reshape(size)
    return out
