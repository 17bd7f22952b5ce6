"""Files written safely: to a temporary beside the target, then moved into place.

The one atomic writer of the project (:func:`atomic_write`, several files all or none
with :func:`commit_outputs`); it imports nothing of sam3d, so every package may use it.
"""

from __future__ import annotations

import glob
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

# Read once at import: os.umask can only be read by setting it.
_UMASK = os.umask(0o022)
os.umask(_UMASK)

TEMP_MARK = ".sam3d-tmp-"


def _suffix(name: str) -> str:
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def _temp_for(path: Path) -> Path:
    """A fresh temporary file beside ``path``: ``.<name>.sam3d-tmp-XXXX<suffix>``.

    The name keeps the target's suffix (writers pick a format from it) and is shortened
    so that it fits the file system's name limit whenever the target's name does.
    """
    stem = path.name[: max(1, 255 - len(TEMP_MARK) - 16 - len(_suffix(path.name)))]
    fd, tmp = tempfile.mkstemp(
        prefix=f".{stem}{TEMP_MARK}", suffix=_suffix(path.name), dir=path.parent
    )
    os.close(fd)
    return Path(tmp)


def leftover_temporaries(path: str | Path) -> list[Path]:
    """Temporary files of :func:`atomic_write` for ``path`` left by a killed writer."""
    path = Path(path)
    stem = path.name[: max(1, 255 - len(TEMP_MARK) - 16 - len(_suffix(path.name)))]
    if not path.parent.is_dir():
        return []
    return sorted(path.parent.glob(f".{glob.escape(stem)}{TEMP_MARK}*"))


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then move it into place.

    The temporary name keeps the target's suffix (``.nii.gz``, ``.png``) so writers
    that pick a format from the name work. On any error the temporary file is removed
    and nothing is left at ``path``. A ``path`` that is itself one of these temporaries
    (a writer called by :func:`commit_outputs`) is written in place.
    """
    path = Path(path)
    if TEMP_MARK in path.name:
        write(path)
        return path
    return commit_outputs({path: write})[0]


def commit_outputs(writers: dict[str | Path, Callable[[Path], None]]) -> list[Path]:
    """Write several files all or none: each to a temporary beside it, then all moved in.

    ``writers`` maps each target path to ``write(tmp)``. If any writer fails, every
    temporary is removed and no target is touched; the moves come only after all
    writes succeeded (a kill between two moves leaves the first output without the
    second, which callers that resume treat as not done).
    """
    staged: list[tuple[Path, Path]] = []
    try:
        for target, write in writers.items():
            target = Path(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = _temp_for(target)
            staged.append((tmp, target))
            write(tmp)
            os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions
        for tmp, target in staged:
            os.replace(tmp, target)
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    return [target for _, target in staged]
