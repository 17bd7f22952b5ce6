"""Start-up of commands that never train: MONAI without its training-side dependencies.

``import monai`` imports every MONAI subpackage, and with them ignite (engines), mlflow
(handlers) and matplotlib (notebook helpers): about half of its import time, none of it
used to open a volume and click. :func:`import_monai_for_inference` imports MONAI with
those packages hidden, so MONAI records them as missing (its ``optional_import`` stubs)
and the process never loads them; packages this project imports directly afterwards
(matplotlib for a preview, say) load normally. Only for processes that never run MONAI's
engines or handlers: ``sam3d segment`` and ``sam3d segment-batch`` call it first.
"""

from __future__ import annotations

import importlib.abc
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

# what ``import monai`` pulls in for training and notebooks only
TRAINING_SIDE = (
    "ignite",
    "mlflow",
    "matplotlib",
    "pandas",
    "tensorboard",
    "tensorboardX",
    "sklearn",
    "torchvision",
)


class _Hidden(importlib.abc.MetaPathFinder):
    def __init__(self, names: Sequence[str]) -> None:
        self.names = set(names)

    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001
        if fullname.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"{fullname} is hidden while MONAI is imported")
        return None


@contextmanager
def hidden(names: Sequence[str]) -> Iterator[None]:
    """Within the block, importing a package of ``names`` (or below) fails as if missing."""
    finder = _Hidden(names)
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)


def import_monai_for_inference() -> bool:
    """Import MONAI without :data:`TRAINING_SIDE` unless it is imported already.

    Returns whether this call imported it (False: MONAI was there, nothing changed).
    """
    if "monai" in sys.modules:
        return False
    loaded = [n for n in TRAINING_SIDE if n in sys.modules]
    with hidden([n for n in TRAINING_SIDE if n not in loaded]):
        import monai  # noqa: F401
    return True
