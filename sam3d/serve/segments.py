"""Named segments of one image: each its own clicks, hand edits, colour, undo and redo.

One :class:`~sam3d.inference.ClickSession` serves every segment of an image (the
preprocessed image and the cached encoder features are shared); :meth:`Segments.activate`
swaps the session's click state (clicks, their history, the decoded windows) for the
segment's. A segment's mask is the model's mask for its clicks, then its brush and
eraser strokes applied in order (a hand edit wins over the model until it is undone).

Masks are kept compact: the bounding box and the bool voxels inside it
(:class:`Compact`), never a full volume per segment.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sam3d.data.geometry import spacing_from_affine
from sam3d.errors import Sam3DError
from sam3d.serve.masks import mask_box

COLOURS = ["#ff3c3c", "#3cd23c", "#3c8cff", "#ffc83c", "#c864ff", "#3cdcdc", "#ff8c3c", "#ff64b4"]
MAX_SEGMENTS = 32
Box = tuple[int, int, int, int, int, int]
EMPTY: Box = (0, 0, 0, 0, 0, 0)


@dataclass
class Compact:
    """A bool mask as its box (half-open, original voxels) and the voxels inside it."""

    box: Box = EMPTY
    sub: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0), bool))

    @classmethod
    def of(cls, mask: np.ndarray, offset: Sequence[int] = (0, 0, 0)) -> Compact:
        """The compact form of ``mask`` (which starts at voxel ``offset``)."""
        b = mask_box(mask)
        if b[3] == 0:
            return cls()
        sub = np.ascontiguousarray(mask[b[0] : b[3], b[1] : b[4], b[2] : b[5]], dtype=bool)
        lo = [b[a] + offset[a] for a in range(3)]
        hi = [b[a + 3] + offset[a] for a in range(3)]
        return cls((lo[0], lo[1], lo[2], hi[0], hi[1], hi[2]), sub)

    @property
    def empty(self) -> bool:
        return self.box[3] == 0

    def paste(self, out: np.ndarray, offset: Sequence[int], value: Any = True) -> None:
        """Set ``out`` (a box starting at ``offset``) to ``value`` where this mask is on."""
        if self.empty:
            return
        b, o = self.box, offset
        view = out[b[0] - o[0] : b[3] - o[0], b[1] - o[1] : b[4] - o[1], b[2] - o[2] : b[5] - o[2]]
        view[self.sub] = value

    def voxels(self) -> int:
        return int(np.count_nonzero(self.sub))


def union_box(*boxes: Sequence[int]) -> Box:
    """The smallest box holding every non-empty box (EMPTY if none)."""
    full = [b for b in boxes if b[3] > b[0]]
    if not full:
        return EMPTY
    lo = [min(b[a] for b in full) for a in range(3)]
    hi = [max(b[a + 3] for b in full) for a in range(3)]
    return (lo[0], lo[1], lo[2], hi[0], hi[1], hi[2])


@dataclass
class Stroke:
    """Discs of ``radius_mm`` at ``points`` (voxels) on slice ``index`` of voxel axis ``axis``."""

    axis: int
    index: int
    points: np.ndarray  # n x 3, original voxels
    radius_mm: float
    value: bool  # True paints, False erases

    def box(self, shape: Sequence[int], spacing: Sequence[float]) -> Box:
        lo, hi = [0, 0, 0], [0, 0, 0]
        for a in range(3):
            if a == self.axis:
                lo[a], hi[a] = self.index, self.index + 1
                continue
            r = self.radius_mm / spacing[a]
            lo[a] = max(0, int(np.floor(self.points[:, a].min() - r)))
            hi[a] = min(shape[a], int(np.ceil(self.points[:, a].max() + r)) + 1)
        if any(h <= lo_ for lo_, h in zip(lo, hi)):
            return EMPTY
        return (lo[0], lo[1], lo[2], hi[0], hi[1], hi[2])

    def apply(self, out: np.ndarray, offset: Sequence[int], spacing: Sequence[float]) -> None:
        """Paint (or erase) the discs into ``out``, a box of the volume starting at ``offset``."""
        a = self.axis
        u, v = [x for x in range(3) if x != a]
        s = self.index - offset[a]
        if not 0 <= s < out.shape[a]:
            return
        index: list[Any] = [slice(None)] * 3
        index[a] = s
        plane = out[tuple(index)]  # a view: u x v
        cu = (np.arange(plane.shape[0]) + offset[u])[:, None]
        cv = (np.arange(plane.shape[1]) + offset[v])[None, :]
        hit = np.zeros(plane.shape, bool)
        for p in self.points:
            hit |= ((cu - p[u]) * spacing[u]) ** 2 + ((cv - p[v]) * spacing[v]) ** 2 <= (
                self.radius_mm**2
            )
        plane[hit] = self.value


@dataclass
class Segment:
    """One named segment: the model's mask for its clicks, hand strokes, undo and redo."""

    id: int
    name: str
    colour: str
    model: Compact = field(default_factory=Compact)
    strokes: list[Stroke] = field(default_factory=list)
    final: Compact = field(default_factory=Compact)
    undo: list[tuple] = field(default_factory=list)
    redo: list[tuple] = field(default_factory=list)
    saved: tuple | None = None  # the session's click state while another segment is active
    points: list[list[float]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)


class Segments:
    """The segments of one image over one ClickSession (see the module docstring).

    Every method that changes a segment returns ``(segment, changed_box)``: the box
    (half-open, original voxels) outside which the segment's mask did not change.
    """

    def __init__(self, session: Any) -> None:
        self.session = session
        self.shape = tuple(int(s) for s in session.original_shape)
        self.spacing = [float(v) for v in spacing_from_affine(session.original_affine)]
        self.items: dict[int, Segment] = {}
        self.active = 0
        self.add()

    def add(self, name: str | None = None) -> Segment:
        """A new empty segment (it becomes the active one)."""
        if len(self.items) >= MAX_SEGMENTS:
            raise Sam3DError(f"at most {MAX_SEGMENTS} segments per image")
        n = max(self.items, default=0) + 1
        seg = Segment(n, (name or f"lesion {n}").strip() or f"lesion {n}", COLOURS[(n - 1) % 8])
        self.items[n] = seg
        self.activate(n)
        return seg

    def get(self, sid: int) -> Segment:
        if sid not in self.items:
            raise Sam3DError(f"no segment {sid} in this image")
        return self.items[sid]

    def activate(self, sid: int) -> Segment:
        """Make ``sid`` the segment the session's clicks belong to."""
        seg = self.get(sid)
        if sid == self.active:
            return seg
        s = self.session
        if self.active in self.items:
            self.items[self.active].saved = (s._state, s._history, s._windows)
        if seg.saved is None:
            s._state, s._history, s._windows = type(s._state)([], [], []), [], []
        else:
            s._state, s._history, s._windows = seg.saved
            seg.saved = None
        s.mask, s.prob_grid = None, None  # the segment's own masks are kept compact
        self.active = sid
        return seg

    # -- edits --------------------------------------------------------------------

    def _model_from_session(self, seg: Segment) -> None:
        m = self.session.mask
        seg.model = Compact() if m is None else Compact.of(m.cpu().numpy())
        seg.points = [list(p) for p in self.session.points_vox]
        seg.labels = list(self.session.point_labels)

    def click(self, sid: int, point: Sequence[float], positive: bool) -> tuple[Segment, Box]:
        seg = self.activate(sid)
        self.session.click(point, positive=positive)
        self._model_from_session(seg)
        seg.undo.append(("click", [float(c) for c in point], int(positive)))
        seg.redo.clear()
        return seg, self._compose(seg)

    def stroke(
        self,
        sid: int,
        axis: int,
        points: Sequence[Sequence[float]],
        radius_mm: float,
        erase: bool,
    ) -> tuple[Segment, Box]:
        seg = self.get(sid)
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        index = int(round(pts[0, axis]))
        if not 0 <= index < self.shape[axis]:
            raise Sam3DError(f"slice {index} is outside the image (axis {axis})")
        st = Stroke(axis, index, pts, float(radius_mm), not erase)
        if st.box(self.shape, self.spacing) == EMPTY:
            raise Sam3DError("the stroke lies outside the image")
        seg.strokes.append(st)
        seg.undo.append(("stroke", st))
        seg.redo.clear()
        return seg, self._compose(seg)

    def undo(self, sid: int) -> tuple[Segment, Box]:
        seg = self.activate(sid)
        if not seg.undo:
            raise Sam3DError("nothing to undo")
        action = seg.undo.pop()
        if action[0] == "click":
            self.session.undo()
            self._model_from_session(seg)
        else:
            seg.strokes.pop()
        seg.redo.append(action)
        return seg, self._compose(seg)

    def redo(self, sid: int) -> tuple[Segment, Box]:
        seg = self.activate(sid)
        if not seg.redo:
            raise Sam3DError("nothing to redo")
        action = seg.redo.pop()
        if action[0] == "click":
            self.session.click(action[1], positive=bool(action[2]))
            self._model_from_session(seg)
        else:
            seg.strokes.append(action[1])
        seg.undo.append(action)
        return seg, self._compose(seg)

    def reset(self, sid: int) -> tuple[Segment, Box]:
        seg = self.activate(sid)
        self.session.reset()
        seg.model, seg.strokes, seg.points, seg.labels = Compact(), [], [], []
        seg.undo.clear()
        seg.redo.clear()
        return seg, self._compose(seg)

    # -- masks --------------------------------------------------------------------

    def _compose(self, seg: Segment) -> Box:
        """Recompute ``seg.final``; returns the box where it may have changed."""
        old = seg.final.box
        boxes = [seg.model.box] + [s.box(self.shape, self.spacing) for s in seg.strokes if s.value]
        box = union_box(*boxes)
        if box == EMPTY:
            seg.final = Compact()
        else:
            lo = box[:3]
            out = np.zeros([box[a + 3] - box[a] for a in range(3)], bool)
            seg.model.paste(out, lo)
            for s in seg.strokes:
                s.apply(out, lo, self.spacing)
            seg.final = Compact.of(out, lo)
        return union_box(old, seg.final.box)

    def window(self, seg: Segment, box: Box) -> np.ndarray:
        """``seg``'s mask inside ``box`` (bool)."""
        out = np.zeros([max(0, box[a + 3] - box[a]) for a in range(3)], bool)
        if box != EMPTY:
            seg.final.paste(out, box[:3])
        return out

    def label_map(self) -> np.ndarray:
        """uint8 ``I x J x K``: segment ``n``'s voxels are ``n`` (a later segment on top)."""
        out = np.zeros(self.shape, np.uint8)
        for seg in self.items.values():
            seg.final.paste(out, (0, 0, 0), seg.id)
        return out

    def nbytes(self) -> int:
        return sum(
            s.model.sub.nbytes + s.final.sub.nbytes + sum(st.points.nbytes for st in s.strokes)
            for s in self.items.values()
        )
