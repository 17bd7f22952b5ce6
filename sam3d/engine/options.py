"""Bundle options given on the command line: ``--resume false`` must mean False.

``python -m monai.bundle run --resume false`` hands the config the *string*
``'false'`` (fire only turns ``False`` into a bool), and a non-empty string is truthy.
Every boolean a bundle takes goes through :func:`as_bool`.
"""

from __future__ import annotations

from typing import Any

from sam3d.errors import Sam3DError

_TRUE = {"true", "yes", "on", "1", "y", "t"}
_FALSE = {"false", "no", "off", "0", "n", "f", "none", "null", ""}


def as_bool(value: Any, name: str = "option") -> bool:
    """``value`` as a bool: a bool, 0/1, or true/false/yes/no/on/off/1/0 in any case.

    Anything else (``'maybe'``, ``2``, a list) raises :class:`Sam3DError` naming ``name``.
    """
    if isinstance(value, bool):
        return value
    if value is None:
        return False
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy / torch scalar
        return as_bool(value.item(), name)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise Sam3DError(f"{name} must be true or false, got {value!r}")


def default_workers(cap: int = 4) -> int:
    """DataLoader workers for this machine: the CPUs this process may use, at most ``cap``.

    PyTorch warns ("N workers, suggested max M") when a loader has more workers than
    the CPUs of the process's affinity; a bundle's default must not make it warn.
    """
    import os

    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cpus = os.cpu_count() or 1
    return max(0, min(int(cap), cpus))
