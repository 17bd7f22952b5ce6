"""What a bundle run leaves behind besides checkpoints: the per-case CSV (and any CSV,
:func:`write_csv`), the executed config, and one-line exits for user errors."""

from __future__ import annotations

import csv
import io
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from sam3d.data.io import atomic_write
from sam3d.engine.distributed import is_rank0
from sam3d.errors import find_user_error

logger = logging.getLogger("sam3d.engine")


def _atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, newline=""))


def write_csv(path: str | Path, rows: Sequence[Sequence[Any]]) -> None:
    """Write ``rows`` (the header row first) as one CSV file at ``path``, atomically."""
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    _atomic_write_text(Path(path), buf.getvalue())


class _DropUserErrorLogs(logging.Filter):
    """Drops the log records an engine writes about an exception that is a user error
    (ignite's "Engine run is terminating due to exception", a handler's traceback): the
    user gets the one line of :func:`checked` instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            return find_user_error(record.exc_info[1]) is None
        return "run is terminating due to exception" not in str(record.msg)  # ignite's line


def checked(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``fn``; a :class:`Sam3DError` ends the program with its message and exit code 2.

    Bundle configs wrap their start-up checks and their engines' ``run`` in this so that
    a user error (unreachable tracking server, no dataset, a corrupt image or checkpoint,
    also when MONAI wrapped it in a transform error) prints one line instead of MONAI's
    nested traceback. Other exceptions pass through unchanged.
    """
    drop = _DropUserErrorLogs()
    handlers = list(logging.getLogger().handlers)
    for h in handlers:
        h.addFilter(drop)
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        user = find_user_error(e)
        if user is None:
            raise
        text = " ".join(str(user).split())
        print(f"sam3d bundle: error: {text}", file=sys.stderr, flush=True)
        raise SystemExit(user.exit_code) from None
    finally:
        for h in handlers:
            h.removeFilter(drop)


class CaseMetricsCSV:
    """Write one CSV row per case (``case`` and each metric) when an evaluator completes.

    Reads the per-case values that MONAI metric handlers keep with ``save_details=True``
    (``engine.state.metric_details``) and the case names from the image metadata.
    """

    def __init__(
        self, path: str | Path, metric_names: Sequence[str], image_key: str = "image"
    ) -> None:
        self.path = Path(path)
        self.metric_names = list(metric_names)
        self.image_key = image_key
        self._cases: list[str] = []

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, lambda e: self._cases.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def _collect(self, engine: Any) -> None:
        batch = engine.state.batch
        items = batch if isinstance(batch, list) else [batch]
        for item in items:
            img = item[self.image_key]
            names = img.meta.get("filename_or_obj", "?") if hasattr(img, "meta") else "?"
            names = names if isinstance(names, (list, tuple)) else [names]
            self._cases.extend(str(n).replace("\\", "/").rsplit("/", 1)[-1] for n in names)

    def write(self, engine: Any) -> None:
        if not is_rank0():
            return
        details = getattr(engine.state, "metric_details", {}) or {}
        columns = {}
        for name in self.metric_names:
            values = details.get(name)
            if values is None:
                raise RuntimeError(f"no per-case values for {name!r}: set save_details=True")
            t = torch.as_tensor(values, dtype=torch.float64).reshape(len(self._cases), -1)
            columns[name] = t.nanmean(1).tolist()
        rows = [["case", *self.metric_names]]
        for i, case in enumerate(self._cases):
            rows.append([case, *(f"{columns[n][i]:.6f}" for n in self.metric_names)])
        write_csv(self.path, rows)
        logger.info(f"evaluation: per-case metrics of {len(self._cases)} cases -> {self.path}")


def save_executed_config(path: str | Path) -> str:
    """Write the config being executed (files merged, command-line overrides applied).

    MONAI gives config expressions no handle on their parser, so this finds the
    ``ConfigParser`` that is evaluating the expression on the call stack. Returns the path.
    """
    from monai.bundle import ConfigParser

    frame = sys._getframe(1)
    while frame is not None:
        parser = frame.f_locals.get("self")
        if isinstance(parser, ConfigParser):
            path = Path(path)
            if is_rank0():
                _atomic_write_text(path, json.dumps(parser.get(), indent=2, default=str) + "\n")
            return str(path)
        frame = frame.f_back
    raise RuntimeError("save_executed_config must be called from a bundle config expression")


def report_written(folder: str | Path, pattern: str = "*", what: str = "masks") -> int:
    """Say where a bundle's inference wrote: ``inference: N masks (pattern) in /abs/folder``.

    Counts the files matching ``pattern`` in ``folder`` (what the run and any earlier run
    left there); prints one line on rank 0 and returns the count.
    """
    folder = Path(folder)
    n = len(list(folder.glob(pattern))) if folder.is_dir() else 0
    if is_rank0():
        print(f"inference: {n} {what} ({pattern}) in {folder.resolve()}", flush=True)
    return n
