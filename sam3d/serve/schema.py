"""The request bodies the viewer accepts, strictly (pydantic, strict mode, no extra keys).

Booleans are JSON booleans (``"false"`` is not one), coordinates are finite JSON numbers
(not strings, not booleans), names are bounded strings. A body that does not fit is
refused with 400 and the first problem named.
"""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, ValidationError

from sam3d.serve.guard import Refusal

Coord = FiniteFloat
Point = tuple[Coord, Coord, Coord]
SegmentId = Annotated[int, Field(ge=1, le=255)]


class Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class OpenBody(Body):
    file: Annotated[str, Field(min_length=1, max_length=255)]


class ClickBody(Body):
    point: Point
    positive: bool = True
    segment: SegmentId = 1


class SegmentBody(Body):
    """Undo, redo, reset: which segment."""

    segment: SegmentId = 1


class NewSegmentBody(Body):
    name: Annotated[str, Field(min_length=1, max_length=64)] | None = None


class BrushBody(Body):
    """A stroke on one slice: discs of ``radius_mm`` at ``points`` (voxels), all on the
    slice ``points[0][axis]`` of voxel axis ``axis``; ``erase`` removes instead of adds."""

    segment: SegmentId = 1
    axis: Annotated[int, Field(ge=0, le=2)]
    points: Annotated[list[Point], Field(min_length=1, max_length=512)]
    radius_mm: Annotated[float, Field(gt=0, le=100)]
    erase: bool = False


M = TypeVar("M", bound=Body)


def parse(model: type[M], raw: bytes) -> M:
    """``raw`` JSON -> ``model``; :class:`Refusal` (400) naming the first problem."""
    try:
        return model.model_validate_json(raw or b"{}")
    except ValidationError as e:
        err: dict[str, Any] = e.errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ())) or "body"
        raise Refusal(400, f"bad request body: {where}: {err.get('msg', 'invalid')}") from None
