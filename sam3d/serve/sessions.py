"""Viewer sessions: one :class:`~sam3d.inference.ClickSession` per opened image.

An entry exists as soon as the image's voxels are read (the page can draw them); its
session (preprocessing) is built afterwards in a thread and :meth:`Entry.wait` blocks
until it is there. Each entry carries its own lock (requests on one image are answered
one at a time, in order), the time it was last used (entries idle longer than ``ttl_s``
expire), and an estimate of its memory (images, cached encoder features, masks); when a
new session would exceed ``max_sessions`` or ``max_bytes``, the least recently used idle
sessions are dropped first.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sam3d.errors import Sam3DError


class UnknownSession(LookupError):
    """No session with this id (never opened, expired or evicted)."""


def tensor_bytes(obj: Any) -> int:
    """Bytes held by the tensors in ``obj`` (nested dicts, lists, tuples)."""
    if isinstance(obj, torch.Tensor):
        return obj.element_size() * obj.nelement()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def session_bytes(session: Any) -> int:
    """Memory of one ClickSession: original + grid image, cached features, masks."""
    if session is None:
        return 0
    return (
        tensor_bytes(session.original_image)
        + tensor_bytes(session.grid_image)
        + tensor_bytes(session.predictor.cache)
        + tensor_bytes(session.prob_grid)
        + tensor_bytes(session.mask)
    )


@dataclass
class Voxels:
    """An image as the file stores it: values ``I x J x K`` and the voxel -> RAS mm affine."""

    data: np.ndarray  # C order, int16 or float32 (what the page takes)
    affine: np.ndarray
    dtype: str = "int16"
    value_range: list[float] = field(default_factory=lambda: [0.0, 0.0])

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


@dataclass
class Entry:
    """One opened image: its voxels, its session (once built), a name for the page."""

    id: str
    name: str
    session: Any
    source: Path
    upload: bool  # the file is ours (an upload) and is deleted with the session
    lock: threading.Lock = field(default_factory=threading.Lock)
    last_used: float = field(default_factory=time.monotonic)
    image: Voxels | None = None  # the file's voxels for the page (read before the session)
    segments: Any = None  # sam3d.serve.segments.Segments, with the session
    ready: threading.Event = field(default_factory=threading.Event)
    go: threading.Event = field(default_factory=threading.Event)  # build the session now
    error: BaseException | None = None

    def finish(
        self, session: Any = None, segments: Any = None, error: BaseException | None = None
    ) -> None:
        """The session is built (or failed with ``error``)."""
        self.session, self.segments, self.error = session, segments, error
        self.ready.set()

    def wait(self, timeout_s: float | None = None) -> Any:
        """The session, once built; re-raises the error that stopped it."""
        if not self.ready.wait(timeout_s):
            raise Sam3DError("the image is still being prepared; try again shortly")
        if self.error is not None:
            raise self.error
        return self.session

    def nbytes(self) -> int:
        extra = self.segments.nbytes() if self.segments is not None else 0
        voxels = self.image.nbytes if self.image is not None else 0
        return voxels + session_bytes(self.session) + extra


class SessionStore:
    """Sessions by id, with expiry and a memory bound.

    Args:
        ttl_s: an entry unused for this long is dropped.
        max_sessions: at most this many entries at once.
        max_bytes: estimated memory of all entries (see :func:`session_bytes`).
        clock: monotonic seconds (replaceable in tests).
    """

    def __init__(
        self,
        ttl_s: float = 3600.0,
        max_sessions: int = 8,
        max_bytes: int = 8 << 30,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s, self.max_sessions, self.max_bytes, self.clock = (
            ttl_s,
            max_sessions,
            max_bytes,
            clock,
        )
        self._entries: dict[str, Entry] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, sid: str) -> bool:
        return sid in self._entries

    def add(
        self,
        name: str,
        session: Any,
        source: Path,
        upload: bool = False,
        image: Any = None,
    ) -> Entry:
        """Register a new session, dropping expired and least recently used ones first.

        ``session=None`` with ``image``: the session is still being built (``Entry.finish``).
        """
        self.expire()
        entry = Entry(secrets.token_urlsafe(12), name, session, Path(source), upload, image=image)
        if session is not None:
            entry.ready.set()
        entry.last_used = self.clock()
        if entry.nbytes() > self.max_bytes:  # refused before anyone else is evicted
            self._drop(entry)
            raise Sam3DError(
                f"this image needs more memory than the server allows "
                f"({self.max_bytes / 2**30:.2f} GiB); start it with a larger --max-memory-gb"
            )
        with self._lock:
            self._entries[entry.id] = entry
            self._evict(keep=entry.id)
        return entry

    @contextmanager
    def use(self, sid: str) -> Iterator[Entry]:
        """The entry ``sid``, locked for the duration (one request at a time per session)."""
        self.expire()
        entry = self._entries.get(sid)
        if entry is None:
            raise UnknownSession(sid)
        with entry.lock:
            entry.last_used = self.clock()
            yield entry
            entry.last_used = self.clock()
        with self._lock:
            self._evict(keep=sid)

    def settle(self, keep: str) -> None:
        """Evict after an entry grew (its session was built), never ``keep``."""
        with self._lock:
            self._evict(keep=keep)

    def peek(self, sid: str) -> Entry:
        """The entry ``sid`` without its lock: for reading what never changes (its voxels)
        while a click may be waiting for the session."""
        self.expire()
        entry = self._entries.get(sid)
        if entry is None:
            raise UnknownSession(sid)
        entry.last_used = self.clock()
        return entry

    def expire(self) -> list[str]:
        """Drop entries idle longer than ``ttl_s``; returns their ids."""
        now = self.clock()
        with self._lock:
            old = [e for e in self._entries.values() if now - e.last_used > self.ttl_s]
            for e in old:
                if e.ready.is_set() and e.lock.acquire(blocking=False):
                    self._drop(e)
                    e.lock.release()
        return [e.id for e in old]

    def total_bytes(self) -> int:
        return sum(e.nbytes() for e in self._entries.values())

    def close(self) -> None:
        """Drop every entry (deleting uploaded files)."""
        with self._lock:
            for e in list(self._entries.values()):
                self._drop(e)

    def _evict(self, keep: str) -> None:
        # caller holds self._lock; least recently used first, never `keep` or a busy one
        while len(self._entries) > 1:
            over_count = len(self._entries) > self.max_sessions
            if not over_count and self.total_bytes() <= self.max_bytes:
                return
            idle = sorted(
                (
                    e
                    for e in self._entries.values()
                    if e.id != keep and not e.lock.locked() and e.ready.is_set()
                ),
                key=lambda e: e.last_used,
            )
            if not idle:
                return
            self._drop(idle[0])

    def _drop(self, entry: Entry) -> None:
        self._entries.pop(entry.id, None)
        if entry.upload:
            entry.source.unlink(missing_ok=True)
