"""Registry of phantom families: what ``write_phantom_dataset(kind, ...)`` and
``sam3d phantoms --kind`` accept, as :mod:`sam3d.models.registry` lists model kinds.

A family is one generator module plus one :class:`PhantomFamily` entry: how one case is
written (or, for a family with its own layout, the whole dataset), what its labels mean,
which keyword its ``--shape`` / ``--spacing`` options set, and whether training may use
it. Adding a family is one file in ``sam3d/data/phantoms/`` and one
:func:`register_family` call in its package ``__init__``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sam3d.errors import Sam3DError

# (index, case seed, output folder, generator kwargs) -> (dataset.json entry, case record)
CaseWriter = Callable[[int, int, Path, dict[str, Any]], tuple[dict[str, Any], dict[str, Any]]]
# (out, n, seed, progress, **kwargs) -> dataset.json path: a family with its own layout
DatasetWriter = Callable[..., Path]


@dataclass(frozen=True)
class PhantomFamily:
    """One registered phantom family.

    Attributes:
        name: the kind (``ct``, ``synth``, ...).
        description: one line for ``sam3d phantoms --help``.
        dims: spatial dimensions of a case (3 volumes, 2 images).
        modality: ``dataset.json``'s ``modality["0"]``.
        labels: label value (str) -> meaning, ``dataset.json``'s ``labels``.
        write_case: writes case ``index`` (seed ``case seed``) under the output folder and
            returns its ``dataset.json`` entry and its record in ``phantom.cases``; the
            shared writer makes the 60/20/20 MSD dataset around it.
        write_dataset: instead of ``write_case``, a writer of the whole dataset (its own
            layout and splits, e.g. prostate's sites): ``(out, n, seed, progress, **kwargs)``.
        shape_option / spacing_option: the generator keyword that ``--shape`` /
            ``--spacing`` set, None when the family takes none.
        stratify: case record -> group key; each group is split 60/20/20 on its own
            (``balance_contrast``), so that no split is all of one kind.
        training: whether training may use it. A held-out family (False) exists to measure
            generalisation to another generator; no training default may name it.
        defaults: generator keywords applied unless the caller gives them.
    """

    name: str
    description: str
    dims: int
    modality: str
    labels: Mapping[str, str]
    write_case: CaseWriter | None = None
    write_dataset: DatasetWriter | None = None
    shape_option: str | None = None
    spacing_option: str | None = None
    stratify: Callable[[dict[str, Any]], Any] | None = None
    training: bool = True
    defaults: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.write_case is None) == (self.write_dataset is None):
            raise ValueError(f"phantom family {self.name!r}: give write_case or write_dataset")


_FAMILIES: dict[str, PhantomFamily] = {}


def register_family(family: PhantomFamily) -> None:
    """Add a family (a new generator is one module plus one call)."""
    if family.name in _FAMILIES and _FAMILIES[family.name] != family:
        raise ValueError(f"phantom family {family.name!r} is already registered")
    _FAMILIES[family.name] = family


def family_names(training: bool | None = None) -> list[str]:
    """Registered family names in registration order; ``training`` True / False keeps only
    the families training may use / the held-out ones."""
    return [n for n, f in _FAMILIES.items() if training is None or f.training == training]


def get_family(name: str) -> PhantomFamily:
    """The family ``name``; one clear line for an unknown one."""
    if name not in _FAMILIES:
        raise Sam3DError(f"unknown phantom kind {name!r}: use one of {', '.join(family_names())}")
    return _FAMILIES[name]
