"""A checked, resumable store of frozen-encoder outputs: encode every image once, train many.

DeSAM trains only its mask decoder, so the SAM encoder's four maps per image (three taps
and the neck, ``C x g x g`` each) can be computed once. The reference writes one
compressed float32 ``.npz`` per slice (~67 MB at ViT-H, ~90 GB for its prostate set) and
trusts whatever it finds. Here:

- **one store per dataset**: ``features.npy``, a NumPy ``.npy`` file opened as a memory
  map (``N x sum(C) x g x g``, float16 by default: half the bytes, and SAM's activations
  sit well inside float16's range), plus ``labels.npy`` (``N x s x s`` uint8) and
  ``index.json``. Why NumPy memmap rather than safetensors or zarr: it is random access
  by row with no decompression and no copy until a row is used (the page cache serves
  repeated epochs), rows can be written in place one at a time (resumable), it is read
  back by plain ``numpy.load(mmap_mode="r")``, and it adds no dependency (safetensors
  writes a whole file at once; zarr would be a new dependency and compresses float noise
  poorly);
- **checked**: ``index.json`` holds the encoder's fingerprint (a change invalidates the
  whole store), and per row the SHA-1 of its input (a changed image is *stale*) and the
  CRC-32 of the row's stored bytes (a *truncated* or overwritten row fails it). Bad rows
  are recomputed, never used;
- **resumable**: the index is rewritten atomically after every batch, listing only rows
  whose bytes were flushed before it, so an interrupted build continues where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sam3d.data.io import atomic_write
from sam3d.errors import Sam3DError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
DTYPES = ("float16", "float32")


def encoder_fingerprint(model: torch.nn.Module, extra: dict[str, Any] | None = None) -> str:
    """SHA-1 over a DeSAM-like model's frozen encoder weights, taps and input size.

    ``model`` needs ``image_encoder`` and ``tap_blocks`` (as :class:`DeSAM`); ``extra``
    adds anything else that changes the stored maps (e.g. the preprocessing recipe).
    """
    h = hashlib.sha1()
    h.update(json.dumps({"taps": list(model.tap_blocks), **(extra or {})}, sort_keys=True).encode())
    for key, value in model.image_encoder.state_dict().items():
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass
class CacheReport:
    """What :meth:`EmbeddingCache.build` did: rows ``reused`` / ``computed``, why rows were
    recomputed (``missing``, ``stale``, ``corrupt``), and the store's size in bytes."""

    reused: int = 0
    computed: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    size_bytes: int = 0
    bytes_per_entry: int = 0


class EmbeddingCache:
    """``N`` rows of encoder outputs (+ one label mask each) under ``root``.

    Args:
        root: the store's folder (created).
        keys: one unique name per row (e.g. ``case/slice``), in row order.
        feature_shapes: ``C x g x g`` of each map (DeSAM's ``feature_shapes()``).
        label_shape: ``s x s`` of the label masks (uint8).
        fingerprint: the encoder's (:func:`encoder_fingerprint`).
        dtype: ``"float16"`` (default) or ``"float32"``.

    A row is used only when the index lists it with the same input digest and its bytes
    pass their CRC; :meth:`build` fills every other row.
    """

    def __init__(
        self,
        root: str | Path,
        keys: Sequence[str],
        feature_shapes: Sequence[Sequence[int]],
        label_shape: Sequence[int],
        fingerprint: str,
        dtype: str = "float16",
    ) -> None:
        if dtype not in DTYPES:
            raise Sam3DError(f"cache dtype must be one of {DTYPES}, got {dtype!r}")
        if len(set(keys)) != len(keys) or not keys:
            raise Sam3DError("cache keys must be unique and non-empty")
        shapes = [tuple(int(v) for v in s) for s in feature_shapes]
        if len({s[1:] for s in shapes}) != 1:
            raise Sam3DError(f"all cached maps must share one spatial size, got {shapes}")
        self.root = Path(root)
        self.keys = list(keys)
        self.feature_shapes = shapes
        self.channels = [s[0] for s in shapes]
        self.label_shape = tuple(int(v) for v in label_shape)
        self.fingerprint = fingerprint
        self.dtype = np.dtype(dtype)
        self.row_shape = (sum(self.channels), *shapes[0][1:])
        self.root.mkdir(parents=True, exist_ok=True)
        self._entries: dict[str, dict[str, Any]] = {}
        self._suspect: dict[int, str] = {}  # row -> why its stored bytes cannot be trusted
        self._open()

    # ------------------------------------------------------------------ files
    @property
    def features_path(self) -> Path:
        return self.root / "features.npy"

    @property
    def labels_path(self) -> Path:
        return self.root / "labels.npy"

    @property
    def index_path(self) -> Path:
        return self.root / "index.json"

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def size_bytes(self) -> int:
        """Bytes on disk of the store (features, labels, index)."""
        paths = (self.features_path, self.labels_path, self.index_path)
        return sum(p.stat().st_size for p in paths if p.exists())

    @property
    def bytes_per_entry(self) -> int:
        """Feature bytes of one row (one slice)."""
        return int(np.prod(self.row_shape)) * self.dtype.itemsize

    def _header(self) -> dict[str, Any]:
        return {
            "version": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "dtype": self.dtype.name,
            "feature_shapes": [list(s) for s in self.feature_shapes],
            "label_shape": list(self.label_shape),
            "keys": self.keys,
        }

    def _open_array(self, path: Path, shape: tuple[int, ...], dtype: np.dtype) -> np.memmap:
        """Open (or create) a ``.npy`` memmap of ``shape``; a short file is extended with
        zeros and the rows past its old end are marked truncated."""
        expected = None
        if path.exists():
            try:
                with open(path, "rb") as f:
                    version = np.lib.format.read_magic(f)
                    read = (
                        np.lib.format.read_array_header_1_0
                        if version == (1, 0)
                        else np.lib.format.read_array_header_2_0
                    )
                    hdr = read(f)  # (shape, fortran_order, dtype)
                    offset = f.tell()
                if tuple(hdr[0]) == shape and np.dtype(hdr[2]) == dtype and not hdr[1]:
                    expected = offset + int(np.prod(shape)) * dtype.itemsize
            except (ValueError, OSError):
                expected = None
        if expected is None:  # missing, foreign or of another shape: start this file anew
            path.unlink(missing_ok=True)
            return np.lib.format.open_memmap(path, "w+", dtype, shape)
        actual = path.stat().st_size
        if actual < expected:
            row_bytes = int(np.prod(shape[1:])) * dtype.itemsize
            first_bad = max(0, (actual - offset) // row_bytes)
            for row in range(int(first_bad), shape[0]):
                self._suspect[row] = "corrupt"
            logger.warning(
                f"embedding cache: {path} is truncated ({actual} of {expected} bytes); rows "
                f"from {first_bad} on will be recomputed"
            )
            with open(path, "r+b") as f:
                f.truncate(expected)
        return np.lib.format.open_memmap(path, "r+")

    def _open(self) -> None:
        index = None
        if self.index_path.exists():
            try:
                index = json.loads(self.index_path.read_text())
            except (OSError, ValueError):
                logger.warning(f"embedding cache: unreadable {self.index_path}; rebuilding")
        if index is not None:
            same = {k: index.get(k) for k in self._header()} == self._header()
            if not same:
                logger.warning(
                    f"embedding cache: {self.root} was built for another encoder, input set or "
                    "layout; recomputing every row"
                )
                index = None
        self._entries = dict(index["entries"]) if index else {}
        n = len(self.keys)
        self._features = self._open_array(self.features_path, (n, *self.row_shape), self.dtype)
        self._labels = self._open_array(self.labels_path, (n, *self.label_shape), np.dtype("u1"))

    def _save_index(self) -> None:
        text = json.dumps({**self._header(), "entries": self._entries})
        atomic_write(self.index_path, lambda tmp: tmp.write_text(text))

    # ------------------------------------------------------------------ checks
    def _crc(self, row: int) -> int:
        crc = zlib.crc32(memoryview(np.ascontiguousarray(self._features[row])).cast("B"))
        return zlib.crc32(memoryview(np.ascontiguousarray(self._labels[row])).cast("B"), crc)

    def status(self, row: int, digest: str | None = None) -> str:
        """``"ok"``, ``"missing"``, ``"stale"`` (input changed) or ``"corrupt"`` (bytes fail
        their CRC, e.g. a truncated file). ``digest``: the input's, if known."""
        entry = self._entries.get(self.keys[row])
        if entry is None:
            return "missing"
        if digest is not None and entry["digest"] != digest:
            return "stale"
        if self._suspect.get(row) or self._crc(row) != entry["crc32"]:
            return "corrupt"
        return "ok"

    def verify(self, progress: bool = False) -> dict[str, int]:
        """CRC-check every row listed in the index; returns counts by :meth:`status`."""
        from tqdm.auto import tqdm

        counts: dict[str, int] = {}
        for row in tqdm(range(len(self)), desc="verify cache", disable=not progress):
            s = self.status(row)
            counts[s] = counts.get(s, 0) + 1
        return counts

    # ------------------------------------------------------------------ build / read
    def build(
        self,
        load_input: Callable[[int], tuple[np.ndarray, np.ndarray]],
        encode: Callable[[np.ndarray], Sequence[torch.Tensor]],
        batch_size: int = 4,
        progress: bool = True,
    ) -> CacheReport:
        """Fill every row that is not ``ok``.

        Args:
            load_input: row -> (encoder input, label mask ``s x s`` uint8). The input's
                bytes are hashed (a changed input makes its row stale).
            encode: a stack of inputs ``b x ...`` -> the maps, each ``b x C x g x g``.
            batch_size: rows encoded per call.
        """
        from tqdm.auto import tqdm

        report = CacheReport()
        todo: list[tuple[int, np.ndarray, np.ndarray, str]] = []
        bar = tqdm(total=len(self), desc="embedding cache", disable=not progress, unit="img")

        def flush() -> None:
            if not todo:
                return
            maps = encode(np.stack([t[1] for t in todo]))
            feats = torch.cat([m.detach().float().cpu() for m in maps], dim=1).numpy()
            if feats.shape[1:] != self.row_shape:
                raise Sam3DError(f"encoder maps {feats.shape[1:]} do not fit {self.row_shape}")
            for j, (row, _, label, _) in enumerate(todo):
                self._features[row] = feats[j].astype(self.dtype)
                self._labels[row] = label
            self._features.flush()
            self._labels.flush()
            for row, _, _, digest in todo:
                self._entries[self.keys[row]] = {"digest": digest, "crc32": self._crc(row)}
                self._suspect.pop(row, None)
            self._save_index()  # only rows whose bytes are on disk are listed
            report.computed += len(todo)
            bar.update(len(todo))
            todo.clear()

        for row in range(len(self)):
            image, label = load_input(row)
            image, label = np.ascontiguousarray(image), np.ascontiguousarray(label, np.uint8)
            if label.shape != self.label_shape:
                raise Sam3DError(
                    f"label of {self.keys[row]} is {label.shape}, not {self.label_shape}"
                )
            digest = hashlib.sha1(image.tobytes() + label.tobytes()).hexdigest()
            state = self.status(row, digest)
            if state == "ok":
                report.reused += 1
                bar.update(1)
                continue
            report.reasons[state] = report.reasons.get(state, 0) + 1
            self._entries.pop(self.keys[row], None)
            todo.append((row, image, label, digest))
            if len(todo) >= batch_size:
                flush()
        flush()
        bar.close()
        self._save_index()
        report.size_bytes, report.bytes_per_entry = self.size_bytes, self.bytes_per_entry
        logger.info(
            f"embedding cache {self.root}: {report.reused} reused, {report.computed} computed "
            f"{report.reasons or ''}; {report.size_bytes / 2**20:.1f} MiB "
            f"({report.bytes_per_entry / 2**20:.2f} MiB of {self.dtype.name} maps per image)"
        )
        return report

    def features(self, row: int) -> list[torch.Tensor]:
        """The maps of one row as float32 tensors ``C x g x g`` (three taps, then neck)."""
        key = self.keys[row]
        if key not in self._entries or row in self._suspect:
            raise Sam3DError(f"embedding cache row {key!r} is not built; run build() first")
        block = torch.from_numpy(np.array(self._features[row], dtype=np.float32))
        return list(torch.split(block, self.channels, dim=0))

    def label(self, row: int) -> torch.Tensor:
        """The label mask of one row, ``1 x s x s`` float32 (0/1)."""
        return torch.from_numpy(np.array(self._labels[row], dtype=np.float32))[None]


class CachedSliceDataset(torch.utils.data.Dataset):
    """Training items from an :class:`EmbeddingCache`, with DeSAM's training prompt.

    Item: ``features`` (four maps ``C x g x g``), ``label`` ``1 x s x s``, ``points``
    ``1 x 2`` (x, y px of SAM's ``input_size`` frame), ``point_labels`` ``1`` (always 1),
    ``iou_target`` ``1``. As the reference: the point is drawn from the foreground or the
    background with probability 1/2 each; the IoU target is 1 inside the mask, 0 outside;
    the mask target is the whole mask either way. Draws are seeded by (seed, row, draw
    number), so two runs over the same order see the same prompts.
    """

    def __init__(self, cache: EmbeddingCache, input_size: int, seed: int = 0) -> None:
        self.cache, self.input_size, self.seed = cache, int(input_size), int(seed)
        self._draws = [0] * len(cache)

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, row: int) -> dict[str, Any]:
        label = self.cache.label(row)
        rng = np.random.default_rng([self.seed, row, self._draws[row]])
        self._draws[row] += 1
        point, inside = sample_training_point(label[0].numpy() > 0, rng)
        scale = self.input_size / label.shape[-1]
        return {
            "features": self.cache.features(row),
            "label": label,
            "points": torch.tensor([[(point[1] + 0.5) * scale, (point[0] + 0.5) * scale]]),
            "point_labels": torch.ones(1),
            "iou_target": torch.tensor([float(inside)]),
            "key": self.cache.keys[row],
        }


def sample_training_point(
    mask: np.ndarray, rng: np.random.Generator
) -> tuple[tuple[int, int], bool]:
    """One ``(row, col)`` pixel of ``mask`` (H x W bool): foreground or background with
    probability 1/2 each (whichever exists when the other is empty); and whether it is inside."""
    fg = rng.random() < 0.5
    if not mask.any():
        fg = False
    elif mask.all():
        fg = True
    candidates = np.argwhere(mask if fg else ~mask)
    r, c = candidates[rng.integers(len(candidates))]
    return (int(r), int(c)), bool(fg)
